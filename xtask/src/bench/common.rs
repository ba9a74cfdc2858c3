//! What the parts share: the interleaved rounds, starting the agent and the idle target,
//! measuring the agent around one load run, the worker and server children, nginx's set-up,
//! and the cells of the report tables. Kept in one place so that every part measures and
//! prints a figure the same way.
use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fmt::Debug,
    io::{self, BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use super::{
    Agent, AgentCounters, Bench, NGINX_FILE_BYTES, NGINX_READY_TIMEOUT, NGINX_WORKERS, OtlpSink,
    Proc, clock_ticks_per_second, cpu_model, median, other_agents, paired_range, progress, spread,
};

/// The configurations of the saturated parts (C, E, G), as indexes into their samples: no
/// agent, the agent tracing an idle process, the agent tracing the server with OTLP export.
pub(super) const NONE: usize = 0;
pub(super) const IDLE: usize = 1;
pub(super) const TRACED: usize = 2;

/// Round `round`'s order of `all`: rotating it spreads any drift of the machine over every
/// configuration.
pub(super) fn rotated<T, const N: usize>(mut all: [T; N], round: u32) -> [T; N] {
    all.rotate_left(round as usize % N);
    all
}

impl Bench {
    /// Runs every configuration once per round, interleaved, each once no other agent runs
    /// (within the budget); `label` starts the progress line ("part E ", ...).
    pub(super) fn rounds<C: Copy, const N: usize>(
        &self,
        label: &str,
        rounds: u32,
        all: [C; N],
        describe: impl Fn(C) -> &'static str,
        mut run: impl FnMut(C) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        for round in 0..rounds {
            for config in rotated(all, round) {
                progress(&format!(
                    "{label}round {}/{rounds}: {}",
                    round + 1,
                    describe(config)
                ));
                self.wait_for_other_agents();
                run(config)
                    .with_context(|| format!("{label}round {}, {}", round + 1, describe(config)))?;
            }
        }
        Ok(())
    }

    /// The process the agent traces in its idle configurations: it waits until its stdin
    /// closes, so it never does I/O.
    pub(super) fn idle_target(&self) -> anyhow::Result<Proc> {
        Proc::spawn(
            "idle target",
            Command::new(&self.exe)
                .args(["bench", "worker-idle"])
                .stdin(Stdio::piped()),
        )
    }

    /// The agent of one configuration of C, E or G: none, tracing `idle`, or tracing `server`
    /// and exporting to `sink`.
    pub(super) fn agent_for(
        &self,
        config: usize,
        idle: &Proc,
        server: u32,
        sink: &OtlpSink,
    ) -> anyhow::Result<Option<Agent>> {
        Ok(match config {
            NONE => None,
            IDLE => Some(Agent::start(
                &self.agent_bin,
                &["--pid", &idle.pid().to_string()],
            )?),
            _ => Some(Agent::start_exporting(&self.agent_bin, server, sink)?),
        })
    }

    /// Runs `bench <args>` (a hidden worker subcommand) to completion and returns what it
    /// printed on stdout.
    pub(super) fn worker_output<S: AsRef<OsStr> + Debug>(
        &self,
        name: &'static str,
        args: &[S],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let mut worker = Proc::spawn(
            name,
            Command::new(&self.exe)
                .arg("bench")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
        )?;
        let status = worker
            .wait_timeout(timeout)?
            .ok_or_else(|| anyhow!("{name} {args:?} still running after {timeout:?}"))?;
        ensure!(status.success(), "{name} {args:?} failed: {status}");
        let mut out = String::new();
        if let Some(mut stdout) = worker.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        Ok(out)
    }
}

impl Agent {
    /// The agent tracing `pid` and exporting every span over OTLP/HTTP to `sink`.
    pub(super) fn start_exporting(bin: &Path, pid: u32, sink: &OtlpSink) -> anyhow::Result<Agent> {
        Agent::start(
            bin,
            &[
                "--pid",
                &pid.to_string(),
                "--exporter",
                "otlp",
                "--otlp-endpoint",
                &sink.url(),
            ],
        )
    }
}

/// The port a server child prints first on stdout; EOF or no line within `timeout` means
/// it did not start.
pub(super) fn read_port(proc: &mut Proc, timeout: Duration) -> anyhow::Result<u16> {
    let name = proc.name;
    let stdout = proc
        .child
        .stdout
        .take()
        .with_context(|| format!("{name} stdout"))?;
    // Read on a thread, so that a server stuck in its start-up cannot hang the bench.
    let (sender, receiver) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = sender.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
    });
    let line = receiver
        .recv_timeout(timeout)
        .with_context(|| format!("the {name} printed no port"))??;
    line.trim()
        .parse()
        .with_context(|| format!("the {name} printed {line:?}, not a port"))
}

/// How much of the agent a run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Counting {
    /// Nothing: no agent, or one whose figures the part does not report.
    Off,
    /// Its counters right after the run (the idle agent's CPU).
    AtEnd,
    /// Its counters once it has exported everything the run produced.
    Drained,
}

impl Counting {
    /// What C, E and G count under each configuration.
    pub(super) fn of(config: usize) -> Counting {
        match config {
            NONE => Counting::Off,
            IDLE => Counting::AtEnd,
            _ => Counting::Drained,
        }
    }
}

/// One load run with what happened around it.
pub(super) struct Measured<T> {
    pub run: T,
    /// Other tracer-agent processes before and after the run.
    pub others: (Vec<u32>, Vec<u32>),
    /// What the agent did, unless `Counting::Off`.
    pub agent: Option<AgentDelta>,
    /// Whether the agent finished exporting within `EXPORT_DRAIN_TIMEOUT` (always with
    /// `Counting::AtEnd`).
    pub drained: bool,
}

impl<T> Measured<T> {
    /// Another agent ran at either end of the run: its probes fire on the same tracepoints
    /// and inflate the figures.
    pub(super) fn disturbed(&self) -> bool {
        !self.others.0.is_empty() || !self.others.1.is_empty()
    }
}

/// Runs `run` with the agent's counters read around it as `counting` says.
pub(super) fn measure<T>(
    agent: Option<&Agent>,
    counting: Counting,
    sink: &OtlpSink,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<Measured<T>> {
    let ours = agent.map(Agent::pid);
    let counted = agent.filter(|_| counting != Counting::Off);
    let before = counted
        .map(|agent| AgentCounters::read(agent, sink))
        .transpose()?;
    let others_before = other_agents(ours);
    let run = run()?;
    let others_after = other_agents(ours);
    let (agent, drained) = match (counted, before) {
        (Some(agent), Some(before)) => {
            let (after, drained) = if counting == Counting::Drained {
                AgentCounters::settle(agent, sink)?
            } else {
                (AgentCounters::read(agent, sink)?, true)
            };
            (Some(AgentDelta::between(&before, &after)), drained)
        }
        _ => (None, true),
    };
    Ok(Measured {
        run,
        others: (others_before, others_after),
        agent,
        drained,
    })
}

/// What the agent did between two reads of its counters.
pub(super) struct AgentDelta {
    pub cpu_ms: f64,
    pub events: f64,
    pub created: f64,
    pub exported: f64,
    pub sink_bytes: u64,
    /// The loss and error series that moved.
    pub losses: BTreeMap<String, f64>,
}

impl AgentDelta {
    fn between(before: &AgentCounters, after: &AgentCounters) -> AgentDelta {
        AgentDelta {
            cpu_ms: ticks_ms(after.cpu_ticks - before.cpu_ticks),
            events: after.events - before.events,
            created: after.created - before.created,
            exported: after.exported - before.exported,
            sink_bytes: after.sink_bytes - before.sink_bytes,
            losses: after
                .losses
                .iter()
                .filter_map(|(series, value)| {
                    let delta = value - before.losses.get(series).copied().unwrap_or(0.0);
                    (delta != 0.0).then(|| (series.clone(), delta))
                })
                .collect(),
        }
    }

    /// Adds the series that moved to a part's sums over rounds.
    pub(super) fn add_losses(&self, sums: &mut BTreeMap<String, f64>) {
        for (series, delta) in &self.losses {
            *sums.entry(series.clone()).or_default() += delta;
        }
    }

    /// Compressed OTLP bytes the sink received per exported span, if any was.
    pub(super) fn otlp_bytes_per_span(&self) -> Option<f64> {
        (self.exported > 0.0).then(|| self.sink_bytes as f64 / self.exported)
    }
}

/// Clock ticks of /proc/PID/stat in milliseconds.
pub(super) fn ticks_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / clock_ticks_per_second()
}

/// `value` per 1,000 of `count` (at least 1, so an empty run divides by something).
pub(super) fn per_1k(value: f64, count: u64) -> f64 {
    value / (count.max(1) as f64 / 1000.0)
}

/// One value per round of each figure of a saturated server, for one configuration.
#[derive(Default)]
pub(super) struct ServerSamples {
    pub rate: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    /// utime + stime of the server's processes per 1,000 requests: the probes' kernel time
    /// is charged to the server.
    pub cpu_ms_per_1k: Vec<f64>,
}

impl ServerSamples {
    pub(super) fn push(&mut self, rate: f64, p50_us: f64, p99_us: f64, cpu_ms_per_1k: f64) {
        self.rate.push(rate);
        self.p50_us.push(p50_us);
        self.p99_us.push(p99_us);
        self.cpu_ms_per_1k.push(cpu_ms_per_1k);
    }
}

/// One value per round of what the agent did for a traced server's requests (calls, in E).
#[derive(Default)]
pub(super) struct AgentSamples {
    pub cpu_ms_per_1k: Vec<f64>,
    pub events_per_request: Vec<f64>,
    pub spans_created_per_request: Vec<f64>,
    pub spans_exported_per_request: Vec<f64>,
    /// Compressed OTLP bytes the sink received per exported span.
    pub otlp_bytes_per_span: Vec<f64>,
}

impl AgentSamples {
    /// Adds one run in which the server answered `requests`.
    pub(super) fn push(&mut self, delta: &AgentDelta, requests: u64) {
        let count = requests.max(1) as f64;
        self.cpu_ms_per_1k.push(per_1k(delta.cpu_ms, requests));
        self.events_per_request.push(delta.events / count);
        self.spans_created_per_request.push(delta.created / count);
        self.spans_exported_per_request.push(delta.exported / count);
        if let Some(bytes) = delta.otlp_bytes_per_span() {
            self.otlp_bytes_per_span.push(bytes);
        }
    }
}

/// The ratio of the medians, to 3 decimals, in bold when `bold`.
pub(super) fn ratio_cell(values: &[f64], base: &[f64], bold: bool) -> String {
    let bold = if bold { "**" } else { "" };
    format!("{bold}{:.3}{bold}", median(values) / median(base))
}

/// How much the median exceeds the base's, in percent, in bold when `bold`.
pub(super) fn added_cell(values: &[f64], base: &[f64], bold: bool) -> String {
    let bold = if bold { "**" } else { "" };
    format!(
        "{bold}{:+.1}%{bold}",
        (median(values) / median(base) - 1.0) * 100.0
    )
}

/// A row of a saturated server's table (parts C and E); `lead` is its first cell(s). The
/// traced configuration's ratios are in bold.
pub(super) fn saturated_row(lead: &str, config: usize, runs: &[ServerSamples; 3]) -> String {
    let (this, none) = (&runs[config], &runs[NONE]);
    let (ratio, ratio_range, p99_added) = if config == NONE {
        ("1".into(), String::new(), String::new())
    } else {
        let bold = config == TRACED;
        (
            ratio_cell(&this.rate, &none.rate, bold),
            paired_range(&this.rate, &none.rate, 3),
            added_cell(&this.p99_us, &none.p99_us, bold),
        )
    };
    format!(
        "| {lead} | {} | {ratio} | {ratio_range} | {} | {} | {p99_added} | {} |",
        spread(&this.rate, 0),
        spread(&this.p50_us, 0),
        spread(&this.p99_us, 0),
        spread(&this.cpu_ms_per_1k, 2),
    )
}

/// `spread`, or `empty` when there is no value (a configuration that has no such figure).
pub(super) fn spread_or(values: &[f64], decimals: usize, empty: &str) -> String {
    if values.is_empty() {
        empty.to_owned()
    } else {
        spread(values, decimals)
    }
}

/// The loss and error series that moved, as a list for a sentence.
pub(super) fn losses_list(losses: &BTreeMap<String, f64>) -> String {
    if losses.is_empty() {
        return "none".to_owned();
    }
    losses
        .iter()
        .map(|(series, value)| format!("`{series}` {value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The warnings that close parts E and F, each after a blank line.
pub(super) fn run_warnings(undrained_runs: u32, disturbed_runs: u32) -> String {
    let mut out = String::new();
    if undrained_runs > 0 {
        out.push_str(&format!(
            "\n**Warning**: after {undrained_runs} run(s) the agent had not finished exporting \
             in time.\n"
        ));
    }
    if disturbed_runs > 0 {
        out.push_str(&format!(
            "\n**Warning**: {disturbed_runs} run(s) overlapped with other tracer-agent \
             processes.\n"
        ));
    }
    out
}

/// The end of a progress line for a run with failed requests.
pub(super) fn errors_note(errors: u64) -> String {
    if errors > 0 {
        format!(", {errors} errors")
    } else {
        String::new()
    }
}

/// The end of a progress line for a run after which the agent had not exported everything.
pub(super) fn drain_note(drained: bool) -> &'static str {
    if drained {
        ""
    } else {
        " (export not finished in time)"
    }
}

/// "2 CPUs, <model>", for the report headers.
pub(super) fn machine() -> String {
    format!(
        "{} CPUs, {}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    )
}

/// Writes the static file nginx serves (`NGINX_FILE_BYTES`) as `file.txt` in each of `dirs`
/// under `root`/www, readable by nginx's unprivileged workers (nobody); returns its text.
pub(super) fn write_site(root: &Path, dirs: &[&str]) -> anyhow::Result<String> {
    let www = root.join("www");
    let body: String = "tracer-agent bench 0123456789abcdef\n"
        .chars()
        .cycle()
        .take(NGINX_FILE_BYTES)
        .collect();
    for dir in dirs {
        let dir = www.join(dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("file.txt"), &body)?;
    }
    for entry in [www.clone(), root.to_path_buf()]
        .into_iter()
        .chain(dirs.iter().map(|dir| www.join(dir)))
    {
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(body)
}

/// An nginx configuration with everything under `root`: master + `NGINX_WORKERS` workers,
/// no access log. `part` names who generated it; `main` and `http` are the part's own
/// directives (whole lines) at those levels, `server` the server block's.
pub(super) fn nginx_config(
    root: &Path,
    part: &str,
    main: &str,
    worker_connections: u32,
    http: &str,
    server: &str,
) -> String {
    let root = root.display();
    let temps: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .map(|name| format!("    {name}_temp_path {root}/tmp/{name};\n"))
        .concat();
    format!(
        "# Generated by `cargo xtask bench` ({part}).
daemon off;
master_process on;
worker_processes {NGINX_WORKERS};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
{main}events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    default_type text/plain;
{http}{temps}    server {{
{server}    }}
}}
"
    )
}

/// Debian's nginx, even when PATH lacks /usr/sbin (a user's PATH kept by `sudo -E`).
pub(super) fn nginx_binary() -> &'static str {
    const DEBIAN: &str = "/usr/sbin/nginx";
    if Path::new(DEBIAN).exists() {
        DEBIAN
    } else {
        "nginx"
    }
}

/// nginx's version, as `nginx -v` says it.
pub(super) fn nginx_version() -> String {
    Command::new(nginx_binary())
        .arg("-v")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            Some(
                text.trim()
                    .strip_prefix("nginx version: nginx/")?
                    .to_owned(),
            )
        })
        .unwrap_or_else(|| "(unknown version)".into())
}

/// nginx's error log in `root`, for failure messages.
pub(super) fn nginx_log(root: &Path) -> String {
    std::fs::read_to_string(root.join("error.log")).unwrap_or_default()
}

/// Starts nginx from `config` in `root` (the site already written there) and waits until
/// `ready` gets an answer from `port`, which it returns.
pub(super) fn spawn_nginx<T>(
    name: &'static str,
    root: &Path,
    port: u16,
    config: &str,
    ready: impl Fn(SocketAddr) -> Option<T>,
) -> anyhow::Result<(Proc, T)> {
    // nginx creates its temporary directories, not their parent.
    std::fs::create_dir(root.join("tmp"))?;
    let config_path = root.join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let mut cmd = Command::new(nginx_binary());
    cmd.arg("-p")
        .arg(root)
        .arg("-e")
        .arg(root.join("error.log"))
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches no memory of ours. With
    // PR_SET_PDEATHSIG the nginx master gets SIGTERM when the bench dies, so a killed
    // bench leaves no server behind (the master stops its workers).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut proc = Proc::spawn(name, &mut cmd)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + NGINX_READY_TIMEOUT;
    loop {
        if let Some(status) = proc.try_wait()? {
            bail!(
                "nginx exited at start ({status}); its log:\n{}",
                nginx_log(root)
            );
        }
        if let Some(answer) = ready(addr) {
            return Ok((proc, answer));
        }
        if Instant::now() >= deadline {
            bail!(
                "nginx did not answer on {addr} within {NGINX_READY_TIMEOUT:?}; its log:\n{}",
                nginx_log(root)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configuration_goes_first_once_per_cycle() {
        let firsts: Vec<usize> = (0..3)
            .map(|round| rotated([NONE, IDLE, TRACED], round)[0])
            .collect();
        assert_eq!(firsts, [NONE, IDLE, TRACED]);
        assert_eq!(rotated([NONE, IDLE, TRACED], 4), [IDLE, TRACED, NONE]);
    }

    #[test]
    fn agent_delta_keeps_the_series_that_moved() {
        let counters = |ticks, exported, sink_bytes, losses: &[(&str, f64)]| AgentCounters {
            cpu_ticks: ticks,
            events: 10.0,
            created: exported,
            exported,
            queued: 0.0,
            sink_bytes,
            losses: losses.iter().map(|(s, v)| (s.to_string(), *v)).collect(),
        };
        let before = counters(100, 5.0, 1000, &[("a", 1.0), ("b", 2.0)]);
        let after = counters(100, 9.0, 1400, &[("a", 1.0), ("b", 5.0), ("c", 1.0)]);
        let delta = AgentDelta::between(&before, &after);
        assert_eq!(delta.cpu_ms, 0.0);
        assert_eq!(delta.exported, 4.0);
        assert_eq!(delta.otlp_bytes_per_span(), Some(100.0));
        let mut sums = BTreeMap::from([("b".to_owned(), 1.0)]);
        delta.add_losses(&mut sums);
        assert_eq!(sums, BTreeMap::from([("b".into(), 4.0), ("c".into(), 1.0)]));
        assert_eq!(losses_list(&sums), "`b` 4, `c` 1");
        assert_eq!(losses_list(&BTreeMap::new()), "none");
    }
}
