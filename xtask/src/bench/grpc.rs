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
    Bench, IO_TIMEOUT, Load, OtlpSink, Proc,
    common::{
        AgentSamples, Counting, IDLE, NONE, ServerSamples, TRACED, drain_note, errors_note,
        losses_list, measure, per_1k, read_port, run_warnings, saturated_row, spread_or, ticks_ms,
    },
    proc_stat, progress, rates,
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
/// Server start-up (importing grpcio takes a moment on a busy machine).
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);

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
        // The port comes at once after start-up.
        let port = read_port(&mut proc, SERVER_READY_TIMEOUT)?;
        Ok(Server { proc, port })
    }
}

/// One value per round of each figure, by configuration.
#[derive(Default)]
struct Samples {
    /// Calls/s, latencies, and the server's utime + stime per 1,000 calls (the probes' kernel
    /// time included).
    runs: [ServerSamples; 3],
    errors: u64,
    /// The agent tracing the server, per call.
    agent: AgentSamples,
    peak_rss_kib: u64,
    losses: BTreeMap<String, f64>,
    undrained_runs: u32,
    disturbed_runs: u32,
    /// CPU ms per second of the agent tracing an idle process during a run: its fixed cost,
    /// which weighs on a server doing a few thousand calls/s more than on nginx.
    idle_agent_cpu_ms_per_s: Vec<f64>,
}

/// Runs part E and returns its report section.
pub(super) fn run(bench: &Bench, root: &Path, rounds: u32) -> anyhow::Result<String> {
    let started = Instant::now();
    let load_before = Load::now();
    // As long as part C's wrk runs.
    let seconds = bench.counts.wrk_seconds as f64;
    let python = crate::setup::venv_dir(root).join("bin").join("python");
    let version = Command::new(&python)
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .context("grpcio is not importable from target/e2e-venv: run `cargo xtask setup`")?;
    let idle = bench.idle_target()?;
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
            bench,
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
    bench.rounds(
        "part E ",
        rounds,
        [NONE, IDLE, TRACED],
        |config| CONFIGS[config],
        |config| {
            let agent = bench.agent_for(config, &idle, server.proc.pid(), &sink)?;
            let measured = measure(agent.as_ref(), Counting::of(config), &sink, || {
                let before = proc_stat(server.proc.pid())?.cpu_ticks;
                let run = client(seconds)?;
                let cpu_ms = ticks_ms(proc_stat(server.proc.pid())?.cpu_ticks - before);
                Ok((run, cpu_ms))
            })?;
            let (run, server_cpu_ms) = &measured.run;
            if measured.disturbed() {
                s.disturbed_runs += 1;
                progress("  warning: other tracer-agent processes ran during this run");
            }
            // Every call the server answered, warm-up included: all of them cost it and the
            // agent CPU and became spans.
            let server_cpu = per_1k(*server_cpu_ms, run.answered);
            s.runs[config].push(run.rate(), run.p50_us, run.p99_us, server_cpu);
            s.errors += run.errors;
            let mut detail = String::new();
            match (&agent, &measured.agent) {
                (Some(agent), Some(delta)) if config == TRACED => {
                    if !measured.drained {
                        s.undrained_runs += 1;
                    }
                    s.agent.push(delta, run.answered);
                    delta.add_losses(&mut s.losses);
                    s.peak_rss_kib = s.peak_rss_kib.max(agent.peak_rss_kib()?);
                    detail = format!(
                        ", agent CPU {:.1} ms per 1k, {:.3} spans exported per call{}",
                        per_1k(delta.cpu_ms, run.answered),
                        delta.exported / run.answered.max(1) as f64,
                        drain_note(measured.drained)
                    );
                }
                (Some(_), Some(delta)) => s.idle_agent_cpu_ms_per_s.push(delta.cpu_ms / seconds),
                _ => {}
            }
            progress(&format!(
                "  {:.0} calls/s, p50 {:.0} us, p99 {:.0} us, server CPU {:.1} ms per 1k{}{detail}",
                run.rate(),
                run.p50_us,
                run.p99_us,
                server_cpu,
                errors_note(run.errors)
            ));
            if let Some(agent) = agent {
                agent.check_alive()?;
                agent.stop()?;
            }
            Ok(())
        },
    )?;
    let requests = sink.requests.load(std::sync::atomic::Ordering::Relaxed);
    drop(server);
    drop(idle);
    let elapsed = started.elapsed();
    let load = load_before.describe(&Load::now(), elapsed);
    progress(&format!("part E done in {elapsed:.0?}"));
    ensure!(!s.runs[NONE].rate.is_empty(), "no rounds");
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
        line(saturated_row(name, config, &s.runs));
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
    let optional = |values: &[f64], decimals| spread_or(values, decimals, "n/a");
    let agent = &s.agent;
    line(format!(
        "| {} | {} | {} | {} | {} |",
        optional(&agent.cpu_ms_per_1k, 2),
        optional(&agent.events_per_request, 2),
        optional(&agent.spans_created_per_request, 4),
        optional(&agent.spans_exported_per_request, 4),
        optional(&agent.otlp_bytes_per_span, 0),
    ));
    line(String::new());
    line(format!(
        "For scale: the agent tracing an idle process spent {} ms of CPU per second during \
         the runs (timers, metrics, the ring buffer poll), a fixed cost that a server doing a \
         few thousand calls/s shares among few calls.",
        optional(&s.idle_agent_cpu_ms_per_s, 1)
    ));
    line(String::new());
    line(format!(
        "Agent peak RSS (VmHWM) tracing the server, highest over rounds: {:.1} MiB. The sink \
         answered {sink_requests} OTLP requests. Failed calls over every run: {}. Loss and \
         error counters that moved while the agent traced the server: {}. Spans are counted \
         once the agent's export queue is empty after each run, and divided by every call \
         the server answered in the run (its warm-up included).",
        s.peak_rss_kib as f64 / 1024.0,
        s.errors,
        losses_list(&s.losses)
    ));
    out.push_str(&run_warnings(s.undrained_runs, s.disturbed_runs));
    out
}
