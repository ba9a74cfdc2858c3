//! Part E: a saturated gRPC unary server, side by side with no agent, the agent tracing
//! another (idle) process, and the agent tracing the server and exporting every span over
//! OTLP to a local sink, as part C does for nginx.
//!
//! The server is grpcio (PyPI, the tests' pinned version from target/e2e-venv) with a generic
//! echo handler, no generated code. The load is the hidden `worker-grpc-client` subcommand: a
//! tonic client on one HTTP/2 connection with a fixed number of calls in flight, each task
//! calling again as soon as it has an answer (closed loop: saturation). Python on the client
//! side would need about as much CPU per call as the server and, on two cores, be the
//! bottleneck itself; the Rust client needs a fraction of that.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use bytes::{Buf as _, BufMut as _, Bytes};
use tonic::{
    Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Endpoint,
};

use super::{
    Agent, AgentCounters, Bench, IO_TIMEOUT, Load, OtlpSink, Proc, clock_ticks_per_second, median,
    other_agents, paired_range, proc_stat, progress, rates, spread,
};

/// The generic handler's method.
const METHOD: &str = "/bench.Echo/Say";
/// grpcio's server with generic handlers: echoes the request bytes. Prints its port, serves
/// until stdin closes (the bench holds it, so a dead bench leaves no server behind).
const SERVER: &str = r#"
import grpc, sys
from concurrent import futures
def say(request, context):
    return request
handler = grpc.method_handlers_generic_handler(
    "bench.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(sys.argv[1])))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
server.stop(0)
"#;
/// grpcio's synchronous server: its thread pool runs the handlers, its C core does the I/O.
const SERVER_THREADS: u32 = 8;
/// Calls in flight on the one connection. Measured on 2 cores: calls/s stop growing at about
/// 8 (the server holds the GIL for most of a call), and more only add queueing to latency.
const CONCURRENCY: u32 = 8;
const PAYLOAD_BYTES: usize = 64;
/// Calls each client makes before timing starts (the connection, the server's threads).
const WARMUP_CALLS: u64 = 200;
/// Seconds per run (`--quick`: `SECONDS_QUICK`).
const SECONDS: f64 = 5.0;
const SECONDS_QUICK: f64 = 2.0;
/// Server start-up (importing grpcio takes a moment on a busy machine).
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);

const NONE: usize = 0;
const IDLE: usize = 1;
const TRACED: usize = 2;
const CONFIGS: [&str; 3] = [
    "no agent",
    "agent tracing an idle process",
    "agent tracing the server, OTLP export",
];

/// `worker-grpc-client` arguments.
#[derive(clap::Args)]
pub(super) struct ClientArgs {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    concurrency: u32,
    #[arg(long)]
    seconds: f64,
    #[arg(long)]
    payload: usize,
}

/// Messages as raw bytes: the generic handler has no schema either.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        *self
    }

    fn decoder(&mut self) -> RawCodec {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The worker: prints one `rates::LoadReport` line.
pub(super) fn client_worker(args: ClientArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(client(args))?;
    println!("{}", report.line());
    Ok(())
}

async fn client(args: ClientArgs) -> anyhow::Result<rates::LoadReport> {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", args.port))?
        .connect()
        .await
        .context("connecting to the gRPC server")?;
    let message = Bytes::from(vec![b'a'; args.payload]);
    let call = |mut grpc: tonic::client::Grpc<tonic::transport::Channel>, message: Bytes| async move {
        grpc.ready()
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        let reply = grpc
            .unary(
                Request::new(message.clone()),
                PathAndQuery::from_static(METHOD),
                RawCodec,
            )
            .await?
            .into_inner();
        if reply == message {
            Ok(())
        } else {
            Err(Status::data_loss("the server echoed other bytes"))
        }
    };
    // Warm-up outside the timing: the connection, the server's threads.
    for _ in 0..WARMUP_CALLS {
        call(tonic::client::Grpc::new(channel.clone()), message.clone()).await?;
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (channel, message) = (channel.clone(), message.clone());
            tokio::spawn(async move {
                let mut latencies = rates::new_histogram()?;
                let (mut in_time, mut errors, mut first_error) = (0u64, 0u64, None);
                while Instant::now() < end {
                    let sent = Instant::now();
                    let outcome = tokio::time::timeout(
                        IO_TIMEOUT,
                        call(tonic::client::Grpc::new(channel.clone()), message.clone()),
                    )
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer")));
                    let done = Instant::now();
                    match outcome {
                        Ok(()) => {
                            latencies.saturating_record(sent.elapsed().as_nanos() as u64);
                            if done <= end {
                                in_time += 1;
                            }
                        }
                        Err(status) => {
                            errors += 1;
                            first_error.get_or_insert(status);
                        }
                    }
                }
                anyhow::Ok((latencies, in_time, errors, first_error))
            })
        })
        .collect();
    let mut latencies = rates::new_histogram()?;
    let (mut in_time, mut errors, mut first_error) = (0, 0, None);
    for task in tasks {
        let (task_latencies, task_in_time, task_errors, task_error) = task.await??;
        latencies.add(&task_latencies)?;
        in_time += task_in_time;
        errors += task_errors;
        first_error = first_error.or(task_error);
    }
    if let Some(status) = first_error {
        eprintln!("worker-grpc-client: {errors} failed calls; the first: {status}");
    }
    Ok(rates::LoadReport::new(
        &latencies,
        in_time,
        WARMUP_CALLS + latencies.len(),
        errors,
        0,
        args.seconds,
    ))
}

/// The grpcio server process.
struct Server {
    proc: Proc,
    port: u16,
}

impl Server {
    fn start(python: &Path) -> anyhow::Result<Server> {
        let mut proc = Proc::spawn(
            "gRPC server",
            Command::new(python)
                .args(["-c", SERVER, &SERVER_THREADS.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        let stdout = proc.child.stdout.take().context("gRPC server stdout")?;
        // The port comes at once after start-up; EOF means the server died.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = sender.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let line = receiver
            .recv_timeout(SERVER_READY_TIMEOUT)
            .context("the gRPC server printed no port")??;
        let port = line
            .trim()
            .parse()
            .with_context(|| format!("the gRPC server printed {line:?}, not a port"))?;
        Ok(Server { proc, port })
    }
}

/// One value per round of each figure, by configuration.
#[derive(Default)]
struct Samples {
    rate: [Vec<f64>; 3],
    p50_us: [Vec<f64>; 3],
    p99_us: [Vec<f64>; 3],
    /// utime + stime of the server per 1,000 calls (the probes' kernel time included).
    server_cpu_ms_per_1k: [Vec<f64>; 3],
    errors: u64,
    agent_cpu_ms_per_1k: Vec<f64>,
    events_per_call: Vec<f64>,
    spans_created_per_call: Vec<f64>,
    spans_exported_per_call: Vec<f64>,
    otlp_bytes_per_span: Vec<f64>,
    peak_rss_kib: u64,
    losses: BTreeMap<String, f64>,
    undrained_runs: u32,
    disturbed_runs: u32,
    /// CPU ms per second of the agent tracing an idle process during a run: its fixed cost,
    /// which weighs on a server doing a few thousand calls/s more than on nginx.
    idle_agent_cpu_ms_per_s: Vec<f64>,
}

/// Runs part E and returns its report section.
pub(super) fn run(bench: &Bench, root: &Path, rounds: u32, quick: bool) -> anyhow::Result<String> {
    let started = Instant::now();
    let load_before = Load::now();
    let seconds = if quick { SECONDS_QUICK } else { SECONDS };
    let python = crate::setup::venv_dir(root).join("bin").join("python");
    let version = Command::new(&python)
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .context("grpcio is not importable from target/e2e-venv: run `cargo xtask setup`")?;
    let idle = Proc::spawn(
        "idle target",
        Command::new(&bench.exe)
            .args(["bench", "worker-idle"])
            .stdin(Stdio::piped()),
    )?;
    let server = Server::start(&python)?;
    let sink = OtlpSink::start()?;
    progress(&format!(
        "part E: grpcio {version} server (pid {}) on port {}; OTLP sink at {}",
        server.proc.pid(),
        server.port,
        sink.url()
    ));
    let client = |seconds: f64| {
        rates::run_load_worker(
            &bench.exe,
            &[
                "worker-grpc-client".to_owned(),
                format!("--port={}", server.port),
                format!("--concurrency={CONCURRENCY}"),
                format!("--seconds={seconds}"),
                format!("--payload={PAYLOAD_BYTES}"),
            ],
            Duration::from_secs_f64(seconds) + IO_TIMEOUT * 2,
        )
    };
    client(1.0).context("warming the gRPC server up")?;
    let mut s = Samples::default();
    for round in 0..rounds {
        let mut order = [NONE, IDLE, TRACED];
        order.rotate_left(round as usize % CONFIGS.len());
        for config in order {
            progress(&format!(
                "part E round {}/{rounds}: {}",
                round + 1,
                CONFIGS[config]
            ));
            bench.wait_for_other_agents();
            let agent = match config {
                NONE => None,
                IDLE => Some(Agent::start(
                    &bench.agent_bin,
                    &["--pid", &idle.pid().to_string()],
                )?),
                _ => Some(Agent::start(
                    &bench.agent_bin,
                    &[
                        "--pid",
                        &server.proc.pid().to_string(),
                        "--exporter",
                        "otlp",
                        "--otlp-endpoint",
                        &sink.url(),
                    ],
                )?),
            };
            let ours = agent.as_ref().map(Agent::pid);
            let others = other_agents(ours);
            let traced = agent.as_ref().filter(|_| config == TRACED);
            let before = traced
                .map(|agent| AgentCounters::read(agent, &sink))
                .transpose()?;
            let server_before = proc_stat(server.proc.pid())?.cpu_ticks;
            let idle_agent_before = match (&agent, config) {
                (Some(agent), IDLE) => Some(agent.cpu_ticks()?),
                _ => None,
            };
            let run = client(seconds)
                .with_context(|| format!("round {}, {}", round + 1, CONFIGS[config]))?;
            let server_cpu_ms = (proc_stat(server.proc.pid())?.cpu_ticks - server_before) as f64
                * 1000.0
                / clock_ticks_per_second();
            if !others.is_empty() || !other_agents(ours).is_empty() {
                s.disturbed_runs += 1;
                progress("  warning: other tracer-agent processes ran during this run");
            }
            // Every call the server answered, warm-up included: all of them cost it and the
            // agent CPU and became spans.
            let calls = run.answered.max(1) as f64;
            if let (Some(agent), Some(ticks)) = (&agent, idle_agent_before) {
                let cpu_ms =
                    (agent.cpu_ticks()? - ticks) as f64 * 1000.0 / clock_ticks_per_second();
                s.idle_agent_cpu_ms_per_s.push(cpu_ms / seconds);
            }
            s.rate[config].push(run.rate());
            s.p50_us[config].push(run.p50_us);
            s.p99_us[config].push(run.p99_us);
            s.server_cpu_ms_per_1k[config].push(server_cpu_ms / (calls / 1000.0));
            s.errors += run.errors;
            let mut detail = String::new();
            if let (Some(agent), Some(before)) = (traced, before) {
                let (after, drained) = AgentCounters::settle(agent, &sink)?;
                if !drained {
                    s.undrained_runs += 1;
                }
                let cpu_ms =
                    (after.cpu_ticks - before.cpu_ticks) as f64 * 1000.0 / clock_ticks_per_second();
                let exported = after.exported - before.exported;
                s.agent_cpu_ms_per_1k.push(cpu_ms / (calls / 1000.0));
                s.events_per_call
                    .push((after.events - before.events) / calls);
                s.spans_created_per_call
                    .push((after.created - before.created) / calls);
                s.spans_exported_per_call.push(exported / calls);
                if exported > 0.0 {
                    s.otlp_bytes_per_span
                        .push((after.sink_bytes - before.sink_bytes) as f64 / exported);
                }
                for (series, value) in &after.losses {
                    let delta = value - before.losses.get(series).copied().unwrap_or(0.0);
                    if delta != 0.0 {
                        *s.losses.entry(series.clone()).or_default() += delta;
                    }
                }
                s.peak_rss_kib = s.peak_rss_kib.max(agent.peak_rss_kib()?);
                detail = format!(
                    ", agent CPU {:.1} ms per 1k, {:.3} spans exported per call{}",
                    cpu_ms / (calls / 1000.0),
                    exported / calls,
                    if drained {
                        ""
                    } else {
                        " (export not finished in time)"
                    }
                );
            }
            progress(&format!(
                "  {:.0} calls/s, p50 {:.0} us, p99 {:.0} us, server CPU {:.1} ms per 1k{}{detail}",
                run.rate(),
                run.p50_us,
                run.p99_us,
                server_cpu_ms / (calls / 1000.0),
                if run.errors > 0 {
                    format!(", {} errors", run.errors)
                } else {
                    String::new()
                }
            ));
            if let Some(agent) = agent {
                agent.check_alive()?;
                agent.stop()?;
            }
        }
    }
    let requests = sink.requests.load(std::sync::atomic::Ordering::Relaxed);
    drop(server);
    drop(idle);
    let elapsed = started.elapsed();
    let load = load_before.describe(&Load::now(), elapsed);
    progress(&format!("part E done in {elapsed:.0?}"));
    ensure!(!s.rate[NONE].is_empty(), "no rounds");
    Ok(report(
        &s, &version, rounds, seconds, requests, elapsed, &load,
    ))
}

fn report(
    s: &Samples,
    version: &str,
    rounds: u32,
    seconds: f64,
    sink_requests: u64,
    elapsed: Duration,
    load: &str,
) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(String::new());
    line("### E. Saturated gRPC unary server".into());
    line(String::new());
    line(format!(
        "grpcio {version} (Python, `grpc.server` with {SERVER_THREADS} handler threads, a \
         generic handler echoing {PAYLOAD_BYTES} B messages), loaded by `worker-grpc-client` \
         (tonic, one HTTP/2 connection, {CONCURRENCY} calls in flight, each task calling again \
         as soon as it has an answer) for {seconds} s per run; {rounds} round(s), \
         configurations interleaved. Configurations: no agent; the agent tracing another, idle \
         process; the agent tracing the server (`--pid`) and exporting every span over OTLP \
         http/protobuf to a sink in the bench process. Run time {elapsed:.0?}; load: {load}."
    ));
    line(String::new());
    line(
        "| configuration | calls/s | / no agent | per-round ratio range | p50 µs | p99 µs | p99 \
         added | server CPU ms per 1,000 calls |"
            .into(),
    );
    line("|---|---|---|---|---|---|---|---|".into());
    for (config, name) in CONFIGS.into_iter().enumerate() {
        let (ratio, ratio_range, p99_added) = if config == NONE {
            ("1".into(), String::new(), String::new())
        } else {
            let bold = if config == TRACED { "**" } else { "" };
            (
                format!(
                    "{bold}{:.3}{bold}",
                    median(&s.rate[config]) / median(&s.rate[NONE])
                ),
                paired_range(&s.rate[config], &s.rate[NONE], 3),
                format!(
                    "{bold}{:+.1}%{bold}",
                    (median(&s.p99_us[config]) / median(&s.p99_us[NONE]) - 1.0) * 100.0
                ),
            )
        };
        line(format!(
            "| {name} | {} | {ratio} | {ratio_range} | {} | {} | {p99_added} | {} |",
            spread(&s.rate[config], 0),
            spread(&s.p50_us[config], 0),
            spread(&s.p99_us[config], 0),
            spread(&s.server_cpu_ms_per_1k[config], 2),
        ));
    }
    line(String::new());
    line("Agent tracing the server, per run (median, min–max over rounds):".into());
    line(String::new());
    line(
        "| agent CPU ms per 1,000 calls | events per call | spans created per call | spans \
         exported per call | OTLP bytes per span (gzip) |"
            .into(),
    );
    line("|---|---|---|---|---|".into());
    let optional = |values: &[f64], decimals| {
        if values.is_empty() {
            "n/a".to_owned()
        } else {
            spread(values, decimals)
        }
    };
    line(format!(
        "| {} | {} | {} | {} | {} |",
        optional(&s.agent_cpu_ms_per_1k, 2),
        optional(&s.events_per_call, 2),
        optional(&s.spans_created_per_call, 4),
        optional(&s.spans_exported_per_call, 4),
        optional(&s.otlp_bytes_per_span, 0),
    ));
    line(String::new());
    line(format!(
        "For scale: the agent tracing an idle process spent {} ms of CPU per second during \
         the runs (timers, metrics, the ring buffer poll), a fixed cost that a server doing a \
         few thousand calls/s shares among few calls.",
        optional(&s.idle_agent_cpu_ms_per_s, 1)
    ));
    line(String::new());
    let losses: Vec<String> = s
        .losses
        .iter()
        .map(|(series, value)| format!("`{series}` {value}"))
        .collect();
    line(format!(
        "Agent peak RSS (VmHWM) tracing the server, highest over rounds: {:.1} MiB. The sink \
         answered {sink_requests} OTLP requests. Failed calls over every run: {}. Loss and \
         error counters that moved while the agent traced the server: {}. Spans are counted \
         once the agent's export queue is empty after each run, and divided by every call \
         the server answered in the run (its warm-up included).",
        s.peak_rss_kib as f64 / 1024.0,
        s.errors,
        if losses.is_empty() {
            "none".to_owned()
        } else {
            losses.join(", ")
        }
    ));
    if s.undrained_runs > 0 {
        line(String::new());
        line(format!(
            "**Warning**: after {} run(s) the agent had not finished exporting in time.",
            s.undrained_runs
        ));
    }
    if s.disturbed_runs > 0 {
        line(String::new());
        line(format!(
            "**Warning**: {} run(s) overlapped with other tracer-agent processes.",
            s.disturbed_runs
        ));
    }
    out
}
