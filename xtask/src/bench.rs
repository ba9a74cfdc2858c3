//! `cargo xtask bench`: what the agent costs, measured side by side in one run.
//!
//! A. An untraced process does small `write()`s (to /dev/null, then on a loopback TCP socket)
//!    with no agent, with the agent's do-nothing programs on the same tracepoints
//!    (`--probe-floor`, the floor any tracepoint program costs), and with the real probes
//!    tracing another, idle process. The real probes should cost untraced processes about what
//!    the floor does: the table gives the ratio of the two extra costs.
//! B. A traced echo server answers round trips over loopback, with no agent and with the agent
//!    tracing it: throughput, the agent's CPU time and its peak RSS.
//!
//! The machine is shared and noisy, so configurations are interleaved round by round and the
//! table gives medians (with the range over rounds where it matters). Every process the bench
//! starts is a child held by a guard that stops it on any exit path; the workloads run in
//! children too (hidden `worker-*` subcommands of this binary), so none of them is the bench.
use std::{
    cell::Cell,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{Arc, Barrier, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::{Args, Subcommand};

use crate::setup;

/// Loading the probes takes a few seconds; a concurrent build can make it much slower.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// After /readyz the agent may still be scanning /proc; let that finish before measuring.
const SETTLE: Duration = Duration::from_millis(500);
/// Per workload process; the default counts take a second or two.
const WORKER_TIMEOUT: Duration = Duration::from_secs(120);
/// Any socket read or write stalled this long is a hang, not a slow machine.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Echo round trips per connection before timing starts (connection set-up, caches).
const ECHO_WARMUP: u64 = 200;
const ECHO_CONNECTIONS: usize = 4;
const ECHO_SIZES: [usize; 2] = [64, 1024];
const WRITE_SIZE: usize = 64;
/// Part A workers time their work in this many equal chunks.
const CHUNKS: u64 = 10;
/// Longest the whole run waits for other agents (end-to-end tests) to exit.
const QUIET_BUDGET: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct BenchArgs {
    /// Rounds; every configuration runs once per round, interleaved, and the table gives
    /// medians over rounds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// About a fifth of the default counts: a rough figure in well under a minute.
    #[arg(long)]
    quick: bool,
    #[command(subcommand)]
    worker: Option<Worker>,
}

/// Workloads, run as child processes of the bench so that they are separate, untraced (or
/// traced) processes with nothing else in them.
#[derive(Subcommand)]
enum Worker {
    /// Waits until stdin closes: the idle process the agent traces in part A.
    #[command(name = "worker-idle", hide = true)]
    Idle,
    /// `count` small writes to /dev/null; prints the nanoseconds each tenth took.
    #[command(name = "worker-dev-null", hide = true)]
    DevNull {
        #[arg(long)]
        count: u64,
    },
    /// `count` small messages written on a loopback TCP connection and read at its other end,
    /// both ends in this process; prints the nanoseconds each tenth took.
    #[command(name = "worker-tcp", hide = true)]
    Tcp {
        #[arg(long)]
        count: u64,
    },
    /// Echo server on 127.0.0.1; prints its port, serves until stdin closes.
    #[command(name = "worker-echo-server", hide = true)]
    EchoServer,
}

pub fn main(root: &Path, args: BenchArgs) -> anyhow::Result<()> {
    if let Some(worker) = args.worker {
        return run_worker(worker);
    }
    if !setup::is_root() {
        bail!("the agent loads eBPF probes: run `sudo -E cargo xtask bench`");
    }
    setup::build_deps()?;
    crate::build_agent(true)?;
    let started = Instant::now();
    let load_before = Load::now();
    let bench = Bench {
        agent_bin: root.join("target/release/tracer-agent"),
        exe: std::env::current_exe().context("locating the xtask binary")?,
        counts: Counts::new(args.quick),
        quiet_budget: Cell::new(QUIET_BUDGET),
    };
    ensure!(
        bench.agent_bin.exists(),
        "{} is missing after the build",
        bench.agent_bin.display()
    );
    let idle = Proc::spawn(
        "idle target",
        Command::new(&bench.exe)
            .args(["bench", "worker-idle"])
            .stdin(Stdio::piped()),
    )?;
    let mut samples = Samples::default();
    for round in 0..args.rounds {
        // Rotating the order spreads any drift of the machine over every configuration.
        let mut order = Config::ALL;
        order.rotate_left(round as usize % Config::ALL.len());
        for config in order {
            progress(&format!(
                "round {}/{}: {}",
                round + 1,
                args.rounds,
                config.describe()
            ));
            bench
                .run_config(config, idle.pid(), &mut samples)
                .with_context(|| format!("round {}, {}", round + 1, config.describe()))?;
        }
    }
    drop(idle);
    let elapsed = started.elapsed();
    progress(&format!("done in {elapsed:.0?}"));
    let load = load_before.describe(&Load::now(), elapsed);
    print!(
        "{}",
        report(&bench.counts, &samples, args.rounds, elapsed, &load)
    );
    Ok(())
}

fn progress(what: &str) {
    eprintln!("xtask: bench: {what}");
}

struct Counts {
    dev_null_writes: u64,
    tcp_messages: u64,
    echo_round_trips: u64,
}

impl Counts {
    fn new(quick: bool) -> Self {
        let divisor = if quick { 5 } else { 1 };
        Counts {
            dev_null_writes: 2_000_000 / divisor,
            tcp_messages: 200_000 / divisor,
            echo_round_trips: 50_000 / divisor,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    NoAgent,
    Floor,
    AgentIdle,
    AgentServer,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::NoAgent,
        Config::Floor,
        Config::AgentIdle,
        Config::AgentServer,
    ];

    fn describe(self) -> &'static str {
        match self {
            Config::NoAgent => "no agent",
            Config::Floor => "agent --probe-floor (tracing an idle process)",
            Config::AgentIdle => "agent tracing an idle process",
            Config::AgentServer => "agent tracing the echo server",
        }
    }
}

/// Part A's three configurations, as indexes into `Samples`.
const A_NONE: usize = 0;
const A_FLOOR: usize = 1;
const A_AGENT: usize = 2;
/// Part B's two configurations.
const B_NONE: usize = 0;
const B_TRACED: usize = 1;

/// One value per round for each figure.
#[derive(Default)]
struct Samples {
    dev_null: PartA,
    tcp: PartA,
    /// Round trips per second, by message size then part B configuration.
    echo_rate: [[Vec<f64>; 2]; 2],
    /// Agent CPU milliseconds per 1,000 round trips, by message size.
    echo_agent_cpu: [Vec<f64>; 2],
    /// Events the agent received per round trip, by message size.
    echo_events: [Vec<f64>; 2],
    echo_lost_events: f64,
    peak_rss_kib: u64,
    /// Events the real probes reported from the untraced workloads (should stay 0).
    untraced_events: f64,
    /// Workload runs during which some other tracer-agent was running: its probes fire on
    /// the same tracepoints and inflate every configuration.
    disturbed_runs: u32,
}

/// ns per operation of one part A workload, by configuration.
#[derive(Default)]
struct PartA {
    /// Of each run's fastest tenth: interference only ever adds time, so this is the
    /// figure least blurred by the machine's noise.
    fastest: [Vec<f64>; 3],
    /// Of each whole run.
    whole: [Vec<f64>; 3],
}

impl PartA {
    fn push(&mut self, config: usize, chunks: &[f64], ops_per_chunk: u64) -> (f64, f64) {
        let fastest = chunks.iter().copied().fold(f64::INFINITY, f64::min) / ops_per_chunk as f64;
        let whole = chunks.iter().sum::<f64>() / (ops_per_chunk * chunks.len() as u64) as f64;
        self.fastest[config].push(fastest);
        self.whole[config].push(whole);
        (fastest, whole)
    }
}

struct Bench {
    agent_bin: PathBuf,
    exe: PathBuf,
    counts: Counts,
    /// What is left of the time the bench may spend waiting for other agents to exit.
    quiet_budget: Cell<Duration>,
}

impl Bench {
    fn run_config(
        &self,
        config: Config,
        idle_pid: u32,
        samples: &mut Samples,
    ) -> anyhow::Result<()> {
        let idle = idle_pid.to_string();
        self.wait_for_other_agents();
        match config {
            Config::NoAgent => {
                self.part_a(A_NONE, None, samples)?;
                let server = self.echo_server()?;
                for (size_index, size) in ECHO_SIZES.into_iter().enumerate() {
                    let rate = self.echo(&server, size, None, samples)?.rate;
                    samples.echo_rate[size_index][B_NONE].push(rate);
                }
            }
            Config::Floor => {
                let agent = Agent::start(&self.agent_bin, &["--probe-floor", "--pid", &idle])?;
                self.part_a(A_FLOOR, Some(&agent), samples)?;
                agent.stop()?;
            }
            Config::AgentIdle => {
                let agent = Agent::start(&self.agent_bin, &["--pid", &idle])?;
                let before = agent.metric("tracer_events_received_total")?;
                self.part_a(A_AGENT, Some(&agent), samples)?;
                samples.untraced_events += agent.metric("tracer_events_received_total")? - before;
                agent.stop()?;
            }
            Config::AgentServer => {
                let server = self.echo_server()?;
                let agent =
                    Agent::start(&self.agent_bin, &["--pid", &server.proc.pid().to_string()])?;
                for (size_index, size) in ECHO_SIZES.into_iter().enumerate() {
                    let run = self.echo(&server, size, Some(&agent), samples)?;
                    samples.echo_rate[size_index][B_TRACED].push(run.rate);
                    samples.echo_agent_cpu[size_index].push(run.agent_cpu_ms_per_1k);
                    samples.echo_events[size_index].push(run.events_per_round_trip);
                }
                samples.echo_lost_events += agent.metric("tracer_kernel_lost_events_total")?;
                samples.peak_rss_kib = samples.peak_rss_kib.max(agent.peak_rss_kib()?);
                agent.stop()?;
            }
        }
        Ok(())
    }

    /// Both untraced small-write workloads under one part A configuration.
    fn part_a(
        &self,
        config: usize,
        agent: Option<&Agent>,
        samples: &mut Samples,
    ) -> anyhow::Result<()> {
        let ours = agent.map(Agent::pid);
        let count = self.counts.dev_null_writes;
        let chunks = self.worker_chunks(
            &["worker-dev-null", "--count", &count.to_string()],
            ours,
            samples,
        )?;
        let (fastest, whole) = samples.dev_null.push(config, &chunks, count / CHUNKS);
        progress(&format!(
            "  {WRITE_SIZE} B writes to /dev/null: {fastest:.0} ns per write in the fastest \
             tenth, {whole:.0} over the run"
        ));
        let count = self.counts.tcp_messages;
        let chunks = self.worker_chunks(
            &["worker-tcp", "--count", &count.to_string()],
            ours,
            samples,
        )?;
        let (fastest, whole) = samples.tcp.push(config, &chunks, count / CHUNKS);
        progress(&format!(
            "  {WRITE_SIZE} B messages on loopback TCP: {fastest:.0} ns per write + read in the \
             fastest tenth, {whole:.0} over the run"
        ));
        if let Some(agent) = agent {
            agent.check_alive()?;
        }
        Ok(())
    }

    /// Waits (within the run's budget) until no tracer-agent but ours runs: the end-to-end
    /// tests start agents, and their probes would weigh on every configuration alike.
    fn wait_for_other_agents(&self) {
        let started = Instant::now();
        let budget = self.quiet_budget.get();
        let mut others = other_agents(None);
        if others.is_empty() {
            return;
        }
        progress(&format!(
            "  waiting for other tracer-agent processes to exit: {others:?}"
        ));
        while !others.is_empty() && started.elapsed() < budget {
            thread::sleep(Duration::from_millis(500));
            others = other_agents(None);
        }
        self.quiet_budget
            .set(budget.saturating_sub(started.elapsed()));
        if !others.is_empty() {
            progress(&format!(
                "  measuring anyway (waiting budget spent); still running: {others:?}"
            ));
        }
    }

    /// Counts the run as disturbed when another agent runs at either end of it.
    fn note_other_agents(ours: Option<u32>, before: &[u32], samples: &mut Samples) {
        let after = other_agents(ours);
        if !before.is_empty() || !after.is_empty() {
            samples.disturbed_runs += 1;
            progress(&format!(
                "  warning: other tracer-agent processes ran during this run: {before:?} {after:?}"
            ));
        }
    }

    /// Runs a timing worker to completion and returns the nanoseconds of each of its chunks.
    fn worker_chunks(
        &self,
        args: &[&str],
        ours: Option<u32>,
        samples: &mut Samples,
    ) -> anyhow::Result<Vec<f64>> {
        let others = other_agents(ours);
        let mut worker = Proc::spawn(
            "workload",
            Command::new(&self.exe)
                .arg("bench")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
        )?;
        let status = worker
            .wait_timeout(WORKER_TIMEOUT)?
            .ok_or_else(|| anyhow!("workload {args:?} still running after {WORKER_TIMEOUT:?}"))?;
        ensure!(status.success(), "workload {args:?} failed: {status}");
        let mut out = String::new();
        if let Some(mut stdout) = worker.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        Self::note_other_agents(ours, &others, samples);
        let chunks: Vec<f64> = out
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("workload {args:?} printed {out:?}, not nanoseconds"))?;
        ensure!(
            chunks.len() == CHUNKS as usize,
            "workload {args:?} printed {out:?}"
        );
        Ok(chunks)
    }

    fn echo_server(&self) -> anyhow::Result<EchoServer> {
        let mut proc = Proc::spawn(
            "echo server",
            Command::new(&self.exe)
                .args(["bench", "worker-echo-server"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        let stdout = proc.child.stdout.take().context("echo server stdout")?;
        // The server prints its port at once; EOF here means it died.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .trim()
            .parse()
            .with_context(|| format!("echo server printed {line:?}, not a port"))?;
        Ok(EchoServer { proc, port })
    }

    /// Round trips of `size` bytes against the server, timed; with the agent's CPU time and
    /// event count around it when there is an agent.
    fn echo(
        &self,
        server: &EchoServer,
        size: usize,
        agent: Option<&Agent>,
        samples: &mut Samples,
    ) -> anyhow::Result<EchoRun> {
        let others = other_agents(agent.map(Agent::pid));
        let before = match agent {
            Some(agent) => Some((
                agent.cpu_ticks()?,
                agent.metric("tracer_events_received_total")?,
            )),
            None => None,
        };
        let per_connection = self.counts.echo_round_trips / ECHO_CONNECTIONS as u64;
        let elapsed = echo_clients(server.port, size, per_connection)?;
        Self::note_other_agents(agent.map(Agent::pid), &others, samples);
        let timed = per_connection * ECHO_CONNECTIONS as u64;
        let rate = timed as f64 / elapsed.as_secs_f64();
        let mut run = EchoRun {
            rate,
            agent_cpu_ms_per_1k: 0.0,
            events_per_round_trip: 0.0,
        };
        if let (Some(agent), Some((ticks, events))) = (agent, before) {
            // The agent reads the ring buffer as events come and publishes metrics every
            // 100 ms: let it catch up so its whole share of the work is counted.
            thread::sleep(Duration::from_millis(300));
            agent.check_alive()?;
            let all = (per_connection + ECHO_WARMUP) * ECHO_CONNECTIONS as u64;
            let cpu_ms = (agent.cpu_ticks()? - ticks) as f64 * 1000.0 / clock_ticks_per_second();
            run.agent_cpu_ms_per_1k = cpu_ms / (all as f64 / 1000.0);
            run.events_per_round_trip =
                (agent.metric("tracer_events_received_total")? - events) / all as f64;
        }
        progress(&format!(
            "  echo {size} B x {timed}: {rate:.0} round trips/s{}",
            if agent.is_some() {
                format!(
                    ", agent CPU {:.1} ms per 1k, {:.1} events per round trip",
                    run.agent_cpu_ms_per_1k, run.events_per_round_trip
                )
            } else {
                String::new()
            }
        ));
        Ok(run)
    }
}

struct EchoServer {
    proc: Proc,
    port: u16,
}

struct EchoRun {
    rate: f64,
    agent_cpu_ms_per_1k: f64,
    events_per_round_trip: f64,
}

/// `ECHO_CONNECTIONS` client threads each doing `per_connection` round trips after a warm-up;
/// returns the time from when all are warmed up until the last one finishes.
fn echo_clients(port: u16, size: usize, per_connection: u64) -> anyhow::Result<Duration> {
    let barrier = Arc::new(Barrier::new(ECHO_CONNECTIONS + 1));
    let clients: Vec<_> = (0..ECHO_CONNECTIONS)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || -> io::Result<()> {
                let message = vec![0xa5; size];
                let mut reply = vec![0; size];
                let mut round_trip = |stream: &mut TcpStream| -> io::Result<()> {
                    stream.write_all(&message)?;
                    stream.read_exact(&mut reply)
                };
                let setup = (|| {
                    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.set_write_timeout(Some(IO_TIMEOUT))?;
                    for _ in 0..ECHO_WARMUP {
                        round_trip(&mut stream)?;
                    }
                    Ok::<_, io::Error>(stream)
                })();
                // Every thread reaches the barrier exactly once, even on error, so that the
                // bench never waits forever on it.
                barrier.wait();
                let mut stream = setup?;
                for _ in 0..per_connection {
                    round_trip(&mut stream)?;
                }
                if reply != message {
                    return Err(io::Error::other("the echo server returned other bytes"));
                }
                Ok(())
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for client in clients {
        client
            .join()
            .map_err(|_| anyhow!("echo client panicked"))?
            .context("echo client")?;
    }
    Ok(start.elapsed())
}

/// A child process, stopped (stdin closed, SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    reaped: bool,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {name}: {cmd:?}"))?;
        let stdin = child.stdin.take();
        Ok(Proc {
            name,
            child,
            stdin,
            reaped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks the process to stop and waits; kills it if it does not within `STOP_TIMEOUT`.
    fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.stdin = None;
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill has no memory preconditions, and the pid is our child that has not been
        // reaped, so it cannot have been reused.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        if let Some(status) = self.wait_timeout(STOP_TIMEOUT)? {
            return Ok(status);
        }
        self.child.kill()?;
        self.child.wait()?;
        self.reaped = true;
        bail!(
            "the {} ignored SIGTERM for {STOP_TIMEOUT:?}: killed",
            self.name
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.stop();
        }
    }
}

/// A running agent, ready (/readyz answered 200) and with its metrics on a loopback port.
struct Agent {
    proc: Proc,
    addr: SocketAddr,
    /// Everything the agent wrote on stderr, shown when it fails.
    log: Arc<Mutex<String>>,
}

impl Agent {
    fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Agent> {
        let started = Instant::now();
        let addr = free_loopback_addr()?;
        let mut proc = Proc::spawn(
            "agent",
            Command::new(bin)
                .args(args)
                .args([
                    "--metrics-addr",
                    &addr.to_string(),
                    "--status-interval",
                    "0",
                    // Should the bench be killed before it can stop the agent, the agent
                    // still ends; no configuration takes anywhere near this long.
                    "--duration",
                    "600",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = proc.child.stderr.take() {
            let log = log.clone();
            // Drained continuously so the agent never blocks on a full pipe; ends at its exit.
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut log) = log.lock() {
                        log.push_str(&line);
                        log.push('\n');
                    }
                }
            });
        }
        let agent = Agent { proc, addr, log };
        let deadline = started + READY_TIMEOUT;
        loop {
            agent.check_alive()?;
            if matches!(http_get(agent.addr, "/readyz"), Ok((200, _))) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent was not ready after {READY_TIMEOUT:?}; its log:\n{}",
                    agent.log_text()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        progress(&format!(
            "  agent {} ready in {:.1?}",
            args.join(" "),
            started.elapsed()
        ));
        thread::sleep(SETTLE);
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn log_text(&self) -> String {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    /// Fails if the agent has exited: figures measured while it was not running mean nothing.
    fn check_alive(&self) -> anyhow::Result<()> {
        // /proc/PID/stat of an exited, unreaped child says Z (zombie).
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.proc.pid()))?;
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        if matches!(state, Some(rest) if rest.starts_with('Z') || rest.starts_with('X')) {
            bail!(
                "the agent exited during the measurement; its log:\n{}",
                self.log_text()
            );
        }
        Ok(())
    }

    /// utime + stime of every thread of the agent, in clock ticks.
    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.proc.pid()))?;
        // The command name may hold spaces and parentheses; fields are counted after its end.
        let rest = stat.rsplit_once(')').context("odd /proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of proc(5); `rest` starts at field 3.
        let ticks = |field: usize| -> anyhow::Result<u64> {
            Ok(fields
                .get(field - 3)
                .context("short /proc/PID/stat")?
                .parse()?)
        };
        Ok(ticks(14)? + ticks(15)?)
    }

    fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))?;
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .context("no VmHWM in /proc/PID/status")?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    }

    /// Sum of every series of one metric (all label sets) from /metrics.
    fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (status, body) = http_get(self.addr, "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(body
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// SIGTERM, then checks that the agent stopped cleanly.
    fn stop(mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let status = self.proc.stop()?;
        ensure!(
            status.success(),
            "the agent exited with {status}; its log:\n{}",
            self.log_text()
        );
        progress(&format!("  agent stopped in {:.1?}", started.elapsed()));
        Ok(())
    }
}

/// Pids of the tracer-agent processes running, but `ours`.
fn other_agents(ours: Option<u32>) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| Some(pid) != ours)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "tracer-agent")
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// A loopback port free right now, for the agent's metrics server.
fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?)
}

/// Minimal HTTP/1.1 GET: status code and body.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP reply from {addr}{path}"))?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn run_worker(worker: Worker) -> anyhow::Result<()> {
    match worker {
        Worker::Idle => {
            io::stdin().read_to_end(&mut Vec::new())?;
        }
        Worker::DevNull { count } => {
            let mut null = File::options().write(true).open("/dev/null")?;
            let buf = [0u8; WRITE_SIZE];
            // One write() each: /dev/null always takes the whole buffer.
            let mut writes = |n: u64| -> io::Result<()> {
                for _ in 0..n {
                    null.write_all(&buf)?;
                }
                Ok(())
            };
            // Warm caches and let the CPU clock up before timing.
            writes(count / CHUNKS)?;
            print_chunks(|| writes(count / CHUNKS))?;
        }
        Worker::Tcp { count } => {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let mut client = TcpStream::connect(listener.local_addr()?)?;
            let (mut server, _) = listener.accept()?;
            // One segment per write, like a request/response protocol.
            client.set_nodelay(true)?;
            client.set_write_timeout(Some(IO_TIMEOUT))?;
            server.set_read_timeout(Some(IO_TIMEOUT))?;
            let message = [0x5au8; WRITE_SIZE];
            let mut buf = [0u8; WRITE_SIZE];
            // One thread writes a few messages then reads them back on the other end, so the
            // syscall count is fixed (a read of WRITE_SIZE bytes takes one message) and no
            // cross-CPU wake-up or blocking buries the probes' cost in scheduling noise. Batches
            // stay under the initial congestion window (10 segments), so reads never wait.
            let mut messages = |n: u64| -> io::Result<()> {
                let mut left = n;
                while left > 0 {
                    let batch = left.min(8);
                    for _ in 0..batch {
                        client.write_all(&message)?;
                    }
                    for _ in 0..batch {
                        server.read_exact(&mut buf)?;
                    }
                    left -= batch;
                }
                Ok(())
            };
            messages(count / CHUNKS)?;
            print_chunks(|| messages(count / CHUNKS))?;
        }
        Worker::EchoServer => {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            println!("{}", listener.local_addr()?.port());
            io::stdout().flush()?;
            // The bench holds our stdin: when it closes (bench done, or the bench died), exit,
            // so a crashed bench leaves no server behind.
            thread::spawn(|| {
                let _ = io::stdin().read_to_end(&mut Vec::new());
                std::process::exit(0);
            });
            for conn in listener.incoming() {
                let mut conn = conn?;
                thread::spawn(move || {
                    let _ = echo_connection(&mut conn);
                });
            }
        }
    }
    Ok(())
}

/// Runs `chunk` `CHUNKS` times and prints how many nanoseconds each took.
fn print_chunks(mut chunk: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut times = Vec::new();
    for _ in 0..CHUNKS {
        let start = Instant::now();
        chunk()?;
        times.push(start.elapsed().as_nanos().to_string());
    }
    println!("{}", times.join(" "));
    Ok(())
}

fn echo_connection(conn: &mut TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0; 64 * 1024];
    loop {
        match conn.read(&mut buf)? {
            0 => return Ok(()),
            n => conn.write_all(&buf[..n])?,
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// "median (min–max)".
fn spread(values: &[f64], decimals: usize) -> String {
    let (lo, hi) = range(values);
    format!(
        "{:.decimals$} ({lo:.decimals$}–{hi:.decimals$})",
        median(values)
    )
}

/// How busy the machine was, to judge the figures by: the load average, and the share of
/// time some task waited for a CPU (pressure stall information, which includes ours).
struct Load {
    loadavg: String,
    cpu_wait_us: Option<u64>,
}

impl Load {
    fn now() -> Self {
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
            .to_owned();
        // "some avg10=.. avg60=.. avg300=.. total=MICROSECONDS"
        let cpu_wait_us = std::fs::read_to_string("/proc/pressure/cpu")
            .ok()
            .and_then(|psi| {
                psi.lines()
                    .find(|line| line.starts_with("some"))?
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("total="))?
                    .parse()
                    .ok()
            });
        Load {
            loadavg,
            cpu_wait_us,
        }
    }

    fn describe(&self, end: &Load, elapsed: Duration) -> String {
        let mut text = format!(
            "1-minute load average {} at the start, {} at the end",
            self.loadavg, end.loadavg
        );
        if let (Some(before), Some(after)) = (self.cpu_wait_us, end.cpu_wait_us) {
            let share = (after.saturating_sub(before)) as f64 / elapsed.as_micros() as f64;
            text.push_str(&format!(
                "; some task waited for a CPU {:.0}% of the time",
                share * 100.0
            ));
        }
        text
    }
}

fn report(counts: &Counts, s: &Samples, rounds: u32, elapsed: Duration, load: &str) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line("## tracer-agent overhead".into());
    line(String::new());
    line(format!("- Command: `cargo xtask {}`", command_args()));
    line(format!(
        "- Machine: {} CPUs, {}, kernel {}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));
    line(format!("- Load: {load}"));
    line(format!("- Agent: {}", agent_revision()));
    line(format!(
        "- {rounds} rounds, configurations interleaved, each agent started fresh; medians \
         (min–max over rounds). Run time {:.0?}.",
        elapsed
    ));
    line(String::new());
    line("### A. Untraced process doing small writes".into());
    line(String::new());
    line(
        "ns/op: wall time per write() (per write() + read() pair for TCP) in a process the \
         agent does not trace, timed in ten chunks per run: `fastest tenth` is the quickest \
         chunk (the machine's noise only adds time), `whole run` all of them. Floor: \
         `--probe-floor`, do-nothing programs on the same tracepoints. Agent: real probes, \
         tracing another, idle process. Extra: over no agent, from the medians."
            .into(),
    );
    line(String::new());
    line(
        "| workload | no agent ns/op | floor ns/op | agent ns/op | floor extra | agent \
         extra | agent extra / floor extra | per-round ratio range |"
            .into(),
    );
    line("|---|---|---|---|---|---|---|---|".into());
    let workloads = [
        (
            format!(
                "{WRITE_SIZE} B write() to /dev/null ({} per run)",
                thousands(counts.dev_null_writes)
            ),
            &s.dev_null,
        ),
        (
            format!(
                "{WRITE_SIZE} B write() + read() on loopback TCP ({} per run)",
                thousands(counts.tcp_messages)
            ),
            &s.tcp,
        ),
    ];
    for (name, part) in workloads {
        for (which, values) in [("fastest tenth", &part.fastest), ("whole run", &part.whole)] {
            line(part_a_row(&format!("{name}, {which}"), values));
        }
    }
    line(String::new());
    line("Target: agent extra / floor extra <= 1.2.".into());
    if s.untraced_events > 0.0 {
        line(format!(
            "**Warning**: the agent received {} events from the untraced workloads.",
            s.untraced_events
        ));
    }
    line(String::new());
    line(format!(
        "### B. Traced echo server ({ECHO_CONNECTIONS} connections, {} round trips per size)",
        thousands(counts.echo_round_trips)
    ));
    line(String::new());
    line(
        "| message | no agent round trips/s | traced round trips/s | traced / untraced | agent \
         CPU ms per 1,000 round trips | events per round trip |"
            .into(),
    );
    line("|---|---|---|---|---|---|".into());
    for (i, size) in ECHO_SIZES.into_iter().enumerate() {
        let none = median(&s.echo_rate[i][B_NONE]);
        let traced = median(&s.echo_rate[i][B_TRACED]);
        line(format!(
            "| {} | {} | {} | {:.3} | {} | {:.1} |",
            if size >= 1024 {
                format!("{} KiB", size / 1024)
            } else {
                format!("{size} B")
            },
            spread(&s.echo_rate[i][B_NONE], 0),
            spread(&s.echo_rate[i][B_TRACED], 0),
            traced / none,
            spread(&s.echo_agent_cpu[i], 1),
            median(&s.echo_events[i]),
        ));
    }
    line(String::new());
    line(format!(
        "Agent peak RSS (VmHWM, highest over rounds): {:.1} MiB. Kernel-side lost events: {}. \
         Agent CPU counts the agent process only; the probes' own kernel time is charged to \
         the traced server and shows in its round trips/s.",
        s.peak_rss_kib as f64 / 1024.0,
        s.echo_lost_events
    ));
    if s.disturbed_runs > 0 {
        line(String::new());
        line(format!(
            "**Warning**: {} workload run(s) overlapped with other tracer-agent processes (the \
             end-to-end tests of concurrent work); their probes slow every configuration.",
            s.disturbed_runs
        ));
    }
    out
}

/// One row of part A's table: the three configurations, the extra costs and their ratio.
fn part_a_row(name: &str, values: &[Vec<f64>; 3]) -> String {
    let none = median(&values[A_NONE]);
    let floor_extra = median(&values[A_FLOOR]) - none;
    let agent_extra = median(&values[A_AGENT]) - none;
    let ratio = if floor_extra > 0.0 {
        format!("**{:.2}**", agent_extra / floor_extra)
    } else {
        "n/a (floor extra not above noise)".into()
    };
    // Paired by round, so drift between rounds cancels; shows how noisy the ratio is.
    let per_round: Vec<f64> = (0..values[A_NONE].len())
        .filter_map(|r| {
            let base = values[A_NONE].get(r)?;
            let floor = values[A_FLOOR].get(r)? - base;
            let agent = values[A_AGENT].get(r)? - base;
            (floor > 0.0).then_some(agent / floor)
        })
        .collect();
    let per_round = if per_round.is_empty() {
        "n/a".into()
    } else {
        let (lo, hi) = range(&per_round);
        format!("{lo:.2}–{hi:.2}")
    };
    format!(
        "| {name} | {} | {} | {} | {floor_extra:+.0} ns | {agent_extra:+.0} ns | {ratio} | \
         {per_round} |",
        spread(&values[A_NONE], 0),
        spread(&values[A_FLOOR], 0),
        spread(&values[A_AGENT], 0),
    )
}

fn command_args() -> String {
    std::env::args().skip(1).collect::<Vec<_>>().join(" ")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Commit and whether the tree differs from it: others edit the agent while benches run.
fn agent_revision() -> String {
    let output = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let Some(commit) = output(&["rev-parse", "--short", "HEAD"]) else {
        return "target/release/tracer-agent (no git revision)".into();
    };
    // --no-optional-locks: a read-only look, without refreshing the index.
    let dirty = output(&["--no-optional-locks", "status", "--porcelain"])
        .is_some_and(|status| !status.is_empty());
    format!(
        "target/release/tracer-agent built from {commit}{}",
        if dirty {
            " plus uncommitted changes"
        } else {
            ""
        }
    )
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
