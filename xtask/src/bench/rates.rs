//! Part F: nginx across request rates, with and without the agent tracing it, drawn as
//! docs/overhead.svg (with the points in docs/overhead.csv), plus the agent's RSS at 10,000
//! requests/s over 1,000 open connections.
//!
//! wrk only saturates, and wrk2 is not in Debian, so the load is ours: the hidden
//! `worker-http-load` subcommand sends GET requests over keep-alive connections on a fixed
//! schedule (open loop). Each connection gets every Nth request of the schedule, as in wrk2;
//! a request whose connection is still busy waits, and its latency is counted from when it was
//! due, not from when it went out, so a slow server cannot hide its queueing (coordinated
//! omission). The schedule is kept by a timerfd, since tokio's timers round to milliseconds
//! and at 20,000 requests/s requests are 50 µs apart. Rate 0 means closed loop (each
//! connection sends again as soon as it has an answer): the saturation point.
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use hdrhistogram::Histogram;
use tokio::{
    io::unix::AsyncFd,
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};

use super::{
    Agent, Bench, BodyPath, IO_TIMEOUT, Load, Nginx, OtlpSink, WRK_CONNECTIONS, agent_revision,
    command_args,
    common::{
        Counting, added_cell, errors_note, losses_list, machine, measure, per_1k, run_warnings,
        spread_or,
    },
    median, plot, progress, range, spread,
};

/// Offered rates of the sweep, requests/s; 0 is the closed-loop saturation point.
const RATES: [u32; 5] = [2_000, 5_000, 10_000, 20_000, 0];
/// The sweep's connections: part C's, so its saturation point is comparable with part C.
const SWEEP_CONNECTIONS: u32 = WRK_CONNECTIONS;
/// The issue's memory target is stated at this load.
const RSS_RATE: u32 = 10_000;
const RSS_CONNECTIONS: u32 = 1_000;
/// Requests still queued this long after the schedule ends are given up and counted as
/// missed: the server could not keep up with the offered rate.
const DRAIN: Duration = Duration::from_secs(2);
/// Latencies above this are recorded as this (the histogram's range).
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Part F's configurations, as indexes into `Samples`.
const NONE: usize = 0;
const TRACED: usize = 1;
const CONFIGS: [&str; 2] = ["no agent", "agent tracing nginx, OTLP export"];

/// One load point: the sweep's, then the RSS point.
#[derive(Clone, Copy)]
struct Point {
    rate: u32,
    connections: u32,
}

impl Point {
    fn all() -> Vec<Point> {
        let mut points: Vec<Point> = RATES
            .into_iter()
            .map(|rate| Point {
                rate,
                connections: SWEEP_CONNECTIONS,
            })
            .collect();
        points.push(Point {
            rate: RSS_RATE,
            connections: RSS_CONNECTIONS,
        });
        points
    }

    fn is_rss_point(self) -> bool {
        self.connections == RSS_CONNECTIONS
    }

    fn describe(self) -> String {
        if self.rate == 0 {
            format!("saturation (closed loop), {} connections", self.connections)
        } else {
            format!("{} requests/s, {} connections", self.rate, self.connections)
        }
    }
}

/// `worker-http-load` arguments.
#[derive(clap::Args)]
pub(super) struct LoadArgs {
    #[arg(long)]
    port: u16,
    /// Request path, e.g. /sendfile-off/file.txt.
    #[arg(long)]
    path: String,
    #[arg(long)]
    connections: u32,
    /// Requests per second over all connections; 0: closed loop.
    #[arg(long)]
    rate: u32,
    #[arg(long)]
    seconds: f64,
}

/// What a load worker prints, one `key=value` line (the gRPC client prints the same).
#[derive(Debug, Default, PartialEq)]
pub(super) struct LoadReport {
    /// Answers that arrived within the scheduled time: the achieved rate is this over
    /// `seconds`.
    pub requests: u64,
    /// Every answer the server gave this worker (warm-up and late ones too): what the agent
    /// traced, so what its CPU and spans are divided by.
    pub answered: u64,
    /// Requests that failed (connection error, timeout, unexpected answer).
    pub errors: u64,
    /// Scheduled requests never sent: still queued `DRAIN` after the schedule ended.
    pub missed: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LoadReport {
    pub fn new(
        latencies_ns: &Histogram<u64>,
        requests: u64,
        answered: u64,
        errors: u64,
        missed: u64,
        seconds: f64,
    ) -> LoadReport {
        let us = |quantile: f64| latencies_ns.value_at_quantile(quantile) as f64 / 1000.0;
        LoadReport {
            requests,
            answered,
            errors,
            missed,
            seconds,
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: latencies_ns.max() as f64 / 1000.0,
        }
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    pub fn line(&self) -> String {
        format!(
            "requests={} answered={} errors={} missed={} seconds={:.6} p50_us={:.1} \
             p99_us={:.1} p999_us={:.1} max_us={:.1}",
            self.requests,
            self.answered,
            self.errors,
            self.missed,
            self.seconds,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us
        )
    }

    pub fn parse(line: &str) -> anyhow::Result<LoadReport> {
        let fields: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|field| field.split_once('='))
            .collect();
        let get = |key: &str| -> anyhow::Result<f64> {
            fields
                .get(key)
                .with_context(|| format!("no {key}= in {line:?}"))?
                .parse::<f64>()
                .with_context(|| format!("{key}= in {line:?}"))
        };
        Ok(LoadReport {
            requests: get("requests")? as u64,
            answered: get("answered")? as u64,
            errors: get("errors")? as u64,
            missed: get("missed")? as u64,
            seconds: get("seconds")?,
            p50_us: get("p50_us")?,
            p99_us: get("p99_us")?,
            p999_us: get("p999_us")?,
            max_us: get("max_us")?,
        })
    }
}

pub(super) fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)?)
}

/// Runs a load worker (`bench <args>`) to completion and parses its report; `deadline` is
/// how long it may take.
pub(super) fn run_load_worker(
    bench: &Bench,
    args: &[String],
    deadline: Duration,
) -> anyhow::Result<LoadReport> {
    LoadReport::parse(bench.worker_output("load worker", args, deadline)?.trim())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the timerfd keeps.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A timerfd on CLOCK_MONOTONIC, awaited through tokio's reactor.
struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create has no memory preconditions; the fd is checked, then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd, which the AsyncFd owns, keeps the descriptor open and the same
        // until the AsyncFd is dropped.
        Ok(Timer(unsafe { AsyncFd::register(fd) }?))
    }

    async fn sleep_until(&self, deadline_ns: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        let fd = self.0.get_ref().as_raw_fd();
        // SAFETY: fd is our timerfd; spec is a valid itimerspec; the old value is not wanted.
        let set = unsafe {
            libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut guard = self.0.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into the array we own.
            let n = unsafe { libc::read(fd, expirations.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }
}

/// The worker: prints one `LoadReport` line.
pub(super) fn load_worker(args: LoadArgs) -> anyhow::Result<()> {
    raise_open_files_limit(args.connections)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(load(args))?;
    println!("{}", report.line());
    Ok(())
}

/// 1,000 connections need more descriptors than a default soft limit of 1,024 leaves.
fn raise_open_files_limit(connections: u32) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the rlimit we own.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit: {}",
            io::Error::last_os_error()
        );
        let wanted = u64::from(connections) + 64;
        if limit.rlim_cur < wanted {
            ensure!(
                limit.rlim_max >= wanted,
                "{connections} connections need {wanted} open files; the hard limit is {}",
                limit.rlim_max
            );
            limit.rlim_cur = wanted;
            ensure!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
                "setrlimit: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// What one connection did.
struct ConnectionResult {
    latencies_ns: Histogram<u64>,
    /// Answers that arrived before the schedule ended.
    in_time: u64,
    errors: u64,
    missed: u64,
    /// The first error, reported once by the worker.
    first_error: Option<String>,
}

async fn load(args: LoadArgs) -> anyhow::Result<LoadReport> {
    ensure!(args.connections > 0, "no connections");
    let request: Arc<[u8]> = format!("GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", args.path)
        .into_bytes()
        .into();
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, args.port));
    // Every connection is open and has had one answer before the schedule starts, so
    // connecting is not measured. One at a time: 1,000 connects in a burst overflow nginx's
    // accept queue (backlog 511), and the connections dropped there fail or stall later.
    let mut streams = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..args.connections {
        let mut stream = None;
        exchange(addr, &mut stream, &request, &mut buf)
            .await
            .with_context(|| format!("a first request on a new connection to {addr}"))?;
        streams.push(stream);
    }
    let span_ns = (args.seconds * 1e9) as u64;
    let start = now_ns() + 10_000_000;
    let end = start + span_ns;
    let drain_end = end + DRAIN.as_nanos() as u64;
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for stream in streams {
        let tickets = if args.rate > 0 {
            let (sender, receiver) = mpsc::unbounded_channel::<u64>();
            senders.push(sender);
            Some(receiver)
        } else {
            None
        };
        let request = request.clone();
        tasks.push(tokio::spawn(connection(
            addr, stream, request, tickets, start, end, drain_end,
        )));
    }
    if args.rate > 0 {
        let timer = Timer::new()?;
        let period = 1e9 / f64::from(args.rate);
        let due = |n: u64| start + (n as f64 * period) as u64;
        let mut next = 0u64;
        while due(next) < end {
            if now_ns() < due(next) {
                timer.sleep_until(due(next)).await?;
            }
            let now = now_ns();
            while due(next) <= now && due(next) < end {
                // A closed channel means that connection's task ended early on an error it
                // counted; its share of the schedule is missed.
                let _ = senders[(next % senders.len() as u64) as usize].send(due(next));
                next += 1;
            }
        }
        drop(senders);
    }
    let mut latencies = new_histogram()?;
    let (mut in_time, mut errors, mut missed) = (0, 0, 0);
    let mut first_error = None;
    for task in tasks {
        let result = task.await?;
        latencies.add(&result.latencies_ns)?;
        in_time += result.in_time;
        errors += result.errors;
        missed += result.missed;
        first_error = first_error.or(result.first_error);
    }
    if let Some(error) = first_error {
        eprintln!("worker-http-load: {errors} failed requests; the first: {error}");
    }
    Ok(LoadReport::new(
        &latencies,
        in_time,
        // The first requests too: the server answered them.
        latencies.len() + u64::from(args.connections),
        errors,
        missed,
        span_ns as f64 / 1e9,
    ))
}

/// One keep-alive connection: sends a request per ticket (open loop) or back to back until
/// `end` (closed loop), reconnecting when nginx closes (after 1,000 requests by default).
async fn connection(
    addr: std::net::SocketAddr,
    mut stream: Option<TcpStream>,
    request: Arc<[u8]>,
    mut tickets: Option<mpsc::UnboundedReceiver<u64>>,
    start: u64,
    end: u64,
    drain_end: u64,
) -> ConnectionResult {
    let mut result = ConnectionResult {
        latencies_ns: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
            .expect("constant histogram bounds are valid"),
        in_time: 0,
        errors: 0,
        missed: 0,
        first_error: None,
    };
    let mut buf = Vec::with_capacity(4096);
    if tickets.is_none() {
        // Closed loop: start with everyone else.
        let timer = Timer::new();
        if let Ok(timer) = &timer {
            let _ = timer.sleep_until(start).await;
        }
    }
    loop {
        let due = match &mut tickets {
            Some(tickets) => match tickets.recv().await {
                Some(due) => due,
                None => break,
            },
            None => {
                let now = now_ns();
                if now >= end {
                    break;
                }
                now
            }
        };
        if now_ns() > drain_end {
            result.missed += 1;
            continue;
        }
        let outcome =
            tokio::time::timeout(IO_TIMEOUT, exchange(addr, &mut stream, &request, &mut buf))
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")));
        let done = now_ns();
        match outcome {
            Ok(()) => {
                let _ = result
                    .latencies_ns
                    .record(done.saturating_sub(due).clamp(1, MAX_LATENCY_NS));
                if done <= end {
                    result.in_time += 1;
                }
            }
            Err(err) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| err.to_string());
                stream = None;
            }
        }
    }
    result
}

/// One request and its answer on the connection, opening a new one if there is none; leaves
/// `stream` empty when the server said it closes.
async fn exchange(
    addr: std::net::SocketAddr,
    stream: &mut Option<TcpStream>,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let conn = match stream {
        Some(conn) => conn,
        None => {
            let conn = TcpStream::connect(addr).await?;
            conn.set_nodelay(true)?;
            stream.insert(conn)
        }
    };
    conn.write_all(request).await?;
    buf.clear();
    let (header_len, body_len, close) = loop {
        if conn.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before an answer",
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(header_len)) => {
                if response.code != Some(200) {
                    return Err(io::Error::other(format!("status {:?}", response.code)));
                }
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let body_len: usize = header("content-length")
                    .and_then(|value| value.trim().parse().ok())
                    .ok_or_else(|| io::Error::other("no content-length"))?;
                let close =
                    header("connection").is_some_and(|value| value.eq_ignore_ascii_case("close"));
                break (header_len, body_len, close);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(err) => return Err(io::Error::other(format!("bad answer: {err}"))),
        }
    };
    while buf.len() < header_len + body_len {
        if conn.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed within the body",
            ));
        }
    }
    if close {
        *stream = None;
    }
    Ok(())
}

/// One value per round of each figure of one point under one configuration.
#[derive(Default)]
pub(super) struct PointSamples {
    pub rate: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    pub p999_us: Vec<f64>,
    pub errors: u64,
    pub missed: u64,
    /// Agent tracing nginx only.
    pub agent_cpu_ms_per_1k: Vec<f64>,
    pub spans_exported_per_request: Vec<f64>,
}

/// Part F's figures.
pub(super) struct Samples {
    /// By configuration, then point (`Point::all()` order).
    pub points: [Vec<PointSamples>; 2],
    /// Agent VmHWM after the RSS point, which each traced round runs first with a fresh
    /// agent, in KiB; and after the whole round.
    pub rss_point_hwm_kib: Vec<f64>,
    pub round_hwm_kib: Vec<f64>,
    /// Every loss or error series that moved, summed over rounds.
    pub losses: BTreeMap<String, f64>,
    pub undrained_runs: u32,
    pub disturbed_runs: u32,
}

/// Runs part F and returns its report section; writes docs/overhead.svg and .csv.
pub(super) fn run(bench: &Bench, root: &Path, rounds: u32) -> anyhow::Result<String> {
    let started = Instant::now();
    let load_before = Load::now();
    // Seconds per point: as long as part C's wrk runs.
    let seconds = bench.counts.wrk_seconds as f64;
    let nginx = Nginx::start()?;
    let sink = OtlpSink::start()?;
    progress(&format!(
        "part F: nginx {} on port {} across request rates; OTLP sink at {}",
        nginx.version,
        nginx.port,
        sink.url()
    ));
    let points = Point::all();
    let path = format!("{}file.txt", BodyPath::Write.location());
    let load = |point: Point| -> anyhow::Result<LoadReport> {
        let args = [
            "worker-http-load".to_owned(),
            format!("--port={}", nginx.port),
            format!("--path={path}"),
            format!("--connections={}", point.connections),
            format!("--rate={}", point.rate),
            format!("--seconds={seconds}"),
        ];
        run_load_worker(
            bench,
            &args,
            Duration::from_secs_f64(seconds) + DRAIN + IO_TIMEOUT * 2,
        )
    };
    // Warm nginx up outside any measurement.
    load(Point {
        rate: 0,
        connections: SWEEP_CONNECTIONS,
    })?;
    let mut samples = Samples {
        points: [
            points.iter().map(|_| PointSamples::default()).collect(),
            points.iter().map(|_| PointSamples::default()).collect(),
        ],
        rss_point_hwm_kib: Vec::new(),
        round_hwm_kib: Vec::new(),
        losses: BTreeMap::new(),
        undrained_runs: 0,
        disturbed_runs: 0,
    };
    bench.rounds(
        "part F ",
        rounds,
        [NONE, TRACED],
        |config| CONFIGS[config],
        |config| {
            let agent = if config == TRACED {
                Some(Agent::start_exporting(
                    &bench.agent_bin,
                    nginx.proc.pid(),
                    &sink,
                )?)
            } else {
                None
            };
            // The RSS point first, so a fresh agent's peak is that load's.
            let order = points
                .iter()
                .enumerate()
                .filter(|(_, p)| p.is_rss_point())
                .chain(points.iter().enumerate().filter(|(_, p)| !p.is_rss_point()));
            for (index, &point) in order {
                let measured = measure(agent.as_ref(), Counting::Drained, &sink, || {
                    load(point).with_context(|| point.describe())
                })?;
                let report = &measured.run;
                if measured.disturbed() {
                    samples.disturbed_runs += 1;
                    progress("  warning: other tracer-agent processes ran during this run");
                }
                let figures = &mut samples.points[config][index];
                figures.rate.push(report.rate());
                figures.p50_us.push(report.p50_us);
                figures.p99_us.push(report.p99_us);
                figures.p999_us.push(report.p999_us);
                figures.errors += report.errors;
                figures.missed += report.missed;
                let mut detail = String::new();
                if let (Some(agent), Some(delta)) = (&agent, &measured.agent) {
                    if !measured.drained {
                        samples.undrained_runs += 1;
                    }
                    let cpu = per_1k(delta.cpu_ms, report.answered);
                    figures.agent_cpu_ms_per_1k.push(cpu);
                    let exported = delta.exported / report.answered.max(1) as f64;
                    figures.spans_exported_per_request.push(exported);
                    delta.add_losses(&mut samples.losses);
                    if point.is_rss_point() {
                        samples.rss_point_hwm_kib.push(agent.peak_rss_kib()? as f64);
                    }
                    detail = format!(
                        ", agent CPU {cpu:.1} ms per 1k, {exported:.3} spans exported per \
                         request{}",
                        if point.is_rss_point() {
                            format!(
                                ", agent peak RSS {:.1} MiB",
                                agent.peak_rss_kib()? as f64 / 1024.0
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                progress(&format!(
                    "  {}: {:.0} requests/s, p50 {:.0} us, p99 {:.0} us{}{}{detail}",
                    point.describe(),
                    report.rate(),
                    report.p50_us,
                    report.p99_us,
                    errors_note(report.errors),
                    if report.missed > 0 {
                        format!(", {} not sent (overloaded)", report.missed)
                    } else {
                        String::new()
                    },
                ));
                if let Some(agent) = &agent {
                    agent.check_alive()?;
                }
            }
            if let Some(agent) = agent {
                samples.round_hwm_kib.push(agent.peak_rss_kib()? as f64);
                agent.stop()?;
            }
            Ok(())
        },
    )?;
    let nginx_version = nginx.version.clone();
    drop(nginx);
    let elapsed = started.elapsed();
    let load = load_before.describe(&Load::now(), elapsed);
    let docs = root.join("docs");
    std::fs::create_dir_all(&docs)?;
    let caption = format!(
        "cargo xtask {}; {}; {}; {}",
        command_args(),
        machine(),
        agent_revision(),
        load
    );
    let chart = plot::Chart {
        title: format!(
            "nginx {} ({} worker, {} B file, {SWEEP_CONNECTIONS} keep-alive connections) \
             with and without tracer-agent",
            nginx_version,
            super::NGINX_WORKERS,
            super::NGINX_FILE_BYTES
        ),
        caption,
        labels: RATES
            .iter()
            .map(|&rate| {
                if rate == 0 {
                    "max".to_owned()
                } else {
                    format!("{}k", rate / 1000)
                }
            })
            .collect(),
        series: [NONE, TRACED]
            .into_iter()
            .map(|config| plot::Series {
                name: CONFIGS[config].to_owned(),
                rate: samples.points[config][..RATES.len()]
                    .iter()
                    .map(|p| plot::Value::of(&p.rate))
                    .collect(),
                p99_us: samples.points[config][..RATES.len()]
                    .iter()
                    .map(|p| plot::Value::of(&p.p99_us))
                    .collect(),
            })
            .collect(),
    };
    let svg = docs.join("overhead.svg");
    std::fs::write(&svg, plot::svg(&chart))
        .with_context(|| format!("writing {}", svg.display()))?;
    let csv_path = docs.join("overhead.csv");
    std::fs::write(&csv_path, csv(&points, &samples))
        .with_context(|| format!("writing {}", csv_path.display()))?;
    progress(&format!(
        "part F done in {elapsed:.0?}; wrote {} and {}",
        svg.display(),
        csv_path.display()
    ));
    Ok(report(&points, &samples, rounds, seconds, elapsed, &load))
}

/// The points, medians over rounds, one row per configuration and point.
fn csv(points: &[Point], s: &Samples) -> String {
    let mut out = String::from(
        "configuration,connections,offered_requests_per_s,achieved_requests_per_s,p50_us,\
         p99_us,p999_us,errors,not_sent,agent_cpu_ms_per_1000_requests,\
         spans_exported_per_request,agent_peak_rss_mib\n",
    );
    for config in [NONE, TRACED] {
        for (index, point) in points.iter().enumerate() {
            let p = &s.points[config][index];
            let optional = |values: &[f64], decimals: usize| {
                if values.is_empty() {
                    String::new()
                } else {
                    format!("{:.decimals$}", median(values))
                }
            };
            let rss = if config == TRACED && point.is_rss_point() {
                optional(&s.rss_point_hwm_kib, 0)
                    .parse::<f64>()
                    .map(|kib| format!("{:.1}", kib / 1024.0))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{rss}\n",
                CONFIGS[config],
                point.connections,
                if point.rate == 0 {
                    "saturation".to_owned()
                } else {
                    point.rate.to_string()
                },
                optional(&p.rate, 0),
                optional(&p.p50_us, 0),
                optional(&p.p99_us, 0),
                optional(&p.p999_us, 0),
                p.errors,
                p.missed,
                optional(&p.agent_cpu_ms_per_1k, 2),
                optional(&p.spans_exported_per_request, 4),
            ));
        }
    }
    out
}

/// Part F's section of the report.
fn report(
    points: &[Point],
    s: &Samples,
    rounds: u32,
    seconds: f64,
    elapsed: Duration,
    load: &str,
) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(String::new());
    line("### F. nginx across request rates (docs/overhead.svg)".into());
    line(String::new());
    line(format!(
        "The nginx of part C (`sendfile off`), loaded by `worker-http-load` (open loop: GET \
         requests on a fixed schedule over keep-alive connections, each connection taking every \
         Nth request, latency counted from when a request was due; `max` is closed loop, each \
         connection sending again as soon as it has an answer). {seconds} s per point, \
         {rounds} round(s), configurations interleaved, a fresh agent per round that runs the \
         {RSS_CONNECTIONS}-connection point first. Run time {elapsed:.0?}; load: {load}. \
         Medians (min–max over rounds)."
    ));
    line(String::new());
    line(
        "| load | configuration | requests/s | p50 µs | p99 µs | p99.9 µs | p99 added | agent \
         CPU ms per 1,000 requests | spans exported per request | errors | not sent |"
            .into(),
    );
    line("|---|---|---|---|---|---|---|---|---|---|---|".into());
    for (index, point) in points.iter().enumerate() {
        for config in [NONE, TRACED] {
            let p = &s.points[config][index];
            let none = &s.points[NONE][index];
            let added = if config == TRACED {
                added_cell(&p.p99_us, &none.p99_us, false)
            } else {
                String::new()
            };
            let optional = |values: &[f64], decimals| spread_or(values, decimals, "");
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {added} | {} | {} | {} | {} |",
                point.describe(),
                CONFIGS[config],
                spread(&p.rate, 0),
                spread(&p.p50_us, 0),
                spread(&p.p99_us, 0),
                spread(&p.p999_us, 0),
                optional(&p.agent_cpu_ms_per_1k, 2),
                optional(&p.spans_exported_per_request, 4),
                p.errors,
                p.missed,
            ));
        }
    }
    line(String::new());
    let rss = |values: &[f64]| {
        if values.is_empty() {
            "n/a".to_owned()
        } else {
            let (lo, hi) = range(values);
            format!(
                "{:.1} MiB ({:.1}–{:.1})",
                median(values) / 1024.0,
                lo / 1024.0,
                hi / 1024.0
            )
        }
    };
    line(format!(
        "Agent peak RSS (VmHWM) after {RSS_RATE} requests/s over {RSS_CONNECTIONS} open \
         connections with a fresh agent: **{}** (issue target: under 64 MiB); after the whole \
         sweep: {}. Not sent: requests still queued {DRAIN:?} after the schedule ended (the \
         server fell behind the offered rate).",
        rss(&s.rss_point_hwm_kib),
        rss(&s.round_hwm_kib),
    ));
    line(format!(
        "Loss and error counters that moved while the agent traced nginx: {}.",
        losses_list(&s.losses)
    ));
    out.push_str(&run_warnings(s.undrained_runs, s.disturbed_runs));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_report_round_trips_through_its_line() {
        let mut histogram = new_histogram().unwrap();
        for us in 1..=1000u64 {
            histogram.record(us * 1000).unwrap();
        }
        let report = LoadReport::new(&histogram, 990, 1000, 3, 7, 2.0);
        assert_eq!(report.rate(), 495.0);
        let parsed = LoadReport::parse(&report.line()).unwrap();
        assert_eq!(parsed.requests, 990);
        assert_eq!(parsed.answered, 1000);
        assert_eq!(parsed.errors, 3);
        assert_eq!(parsed.missed, 7);
        assert!((parsed.p50_us - 500.0).abs() < 1.0, "{parsed:?}");
        assert!((parsed.p99_us - 990.0).abs() < 1.0, "{parsed:?}");
        assert!(LoadReport::parse("requests=1").is_err());
    }

    #[test]
    fn the_rss_point_is_the_issue_target() {
        let points = Point::all();
        assert_eq!(points.len(), RATES.len() + 1);
        let rss: Vec<_> = points.iter().filter(|p| p.is_rss_point()).collect();
        assert_eq!(rss.len(), 1);
        assert_eq!((rss[0].rate, rss[0].connections), (10_000, 1_000));
    }
}
