//! The HTTPS part of `cargo xtask bench` (`--only https`): what the TLS uprobes cost per
//! request. nginx terminates TLS (master + one worker, keep-alive, a small static file written
//! with write()) under `wrk` over https, in three configurations interleaved round by round as
//! in part C: no agent; the agent tracing an idle process (which gets uprobes on the system
//! libssl; nginx and wrk, untraced, get none, though they link the same libssl); the agent
//! tracing nginx and exporting every span over OTLP/HTTP to the bench's sink.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::{
    Agent, AgentCounters, Bench, EXPORT_DRAIN_TIMEOUT, Load, NGINX_FILE_BYTES, NGINX_READY_TIMEOUT,
    NGINX_WORKERS, Nginx, OtlpSink, Proc, TempDir, WRK_CONNECTIONS, WRK_THREADS, agent_revision,
    clock_ticks_per_second, command_args, cpu_model, free_loopback_addr, median, other_agents,
    paired_range, progress, spread, tree_cpu_ticks,
};

const NONE: usize = 0;
const IDLE: usize = 1;
const TRACED: usize = 2;
const CONFIGS: [&str; 3] = [
    "no agent",
    "agent tracing an idle process (uprobes attached)",
    "agent tracing nginx, OTLP export",
];

/// One value per round of each figure, by configuration.
#[derive(Default)]
struct Figures {
    rate: [Vec<f64>; 3],
    p50_us: [Vec<f64>; 3],
    p99_us: [Vec<f64>; 3],
    nginx_cpu_ms_per_1k: [Vec<f64>; 3],
    /// The agent's CPU per 1,000 requests, with an agent.
    agent_cpu_ms_per_1k: [Vec<f64>; 3],
    /// With the agent tracing nginx.
    spans_per_request: Vec<f64>,
    /// `tracer_tls_total{event="plaintext_lost_no_socket"}` over the traced runs.
    plaintext_lost: f64,
    /// Nonzero loss and error series over the traced runs.
    losses: std::collections::BTreeMap<String, f64>,
    undrained_runs: u32,
    wrk_errors: u64,
    disturbed_runs: u32,
}

/// Runs the part and returns its section of the report.
pub(super) fn run(bench: &Bench, rounds: u32) -> anyhow::Result<String> {
    let started = Instant::now();
    let load_before = Load::now();
    let idle = Proc::spawn(
        "idle target",
        Command::new(&bench.exe)
            .args(["bench", "worker-idle"])
            .stdin(Stdio::piped()),
    )?;
    let nginx = TlsNginx::start()?;
    let sink = OtlpSink::start()?;
    progress(&format!(
        "HTTPS: nginx with TLS (master pid {}) on port {}",
        nginx.proc.pid(),
        nginx.port
    ));
    // Warm-up outside any measurement; also checks that wrk speaks https here.
    let warm = bench.wrk(&nginx.url(), 1)?;
    ensure!(
        warm.requests > 0 && warm.errors == 0,
        "wrk over https: {} requests, {} errors in the warm-up",
        warm.requests,
        warm.errors
    );
    let mut figures = Figures::default();
    for round in 0..rounds {
        let mut order = [NONE, IDLE, TRACED];
        order.rotate_left(round as usize % CONFIGS.len());
        for config in order {
            progress(&format!(
                "HTTPS round {}/{rounds}: {}",
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
                        &nginx.proc.pid().to_string(),
                        "--exporter",
                        "otlp",
                        "--otlp-endpoint",
                        &sink.url(),
                    ],
                )?),
            };
            measure(bench, config, agent.as_ref(), &nginx, &sink, &mut figures)
                .with_context(|| format!("HTTPS round {}, {}", round + 1, CONFIGS[config]))?;
            if let Some(agent) = agent {
                agent.stop()?;
            }
        }
    }
    drop(nginx);
    drop(idle);
    let elapsed = started.elapsed();
    let load = load_before.describe(&Load::now(), elapsed);
    Ok(report(bench, &figures, rounds, elapsed, &load))
}

/// One wrk run under one configuration, with the agent's figures around it.
fn measure(
    bench: &Bench,
    config: usize,
    agent: Option<&Agent>,
    nginx: &TlsNginx,
    sink: &OtlpSink,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let ours = agent.map(Agent::pid);
    let others = other_agents(ours);
    let before = agent
        .map(|agent| AgentCounters::read(agent, sink))
        .transpose()?;
    let lost_before = agent.map(plaintext_lost).transpose()?.unwrap_or(0.0);
    let nginx_before = tree_cpu_ticks(nginx.proc.pid())?;
    let run = bench.wrk(&nginx.url(), bench.counts.wrk_seconds)?;
    let ticks_to_ms = |ticks: u64| ticks as f64 * 1000.0 / clock_ticks_per_second();
    let thousands = run.requests.max(1) as f64 / 1000.0;
    let nginx_cpu = ticks_to_ms(tree_cpu_ticks(nginx.proc.pid())? - nginx_before) / thousands;
    if !other_agents(ours).is_empty() || !others.is_empty() {
        figures.disturbed_runs += 1;
    }
    figures.wrk_errors += run.errors;
    figures.rate[config].push(run.rate);
    figures.p50_us[config].push(run.p50_us);
    figures.p99_us[config].push(run.p99_us);
    figures.nginx_cpu_ms_per_1k[config].push(nginx_cpu);
    let mut detail = String::new();
    if let (Some(agent), Some(before)) = (agent, before) {
        let (after, drained) = if config == TRACED {
            AgentCounters::settle(agent, sink)?
        } else {
            (AgentCounters::read(agent, sink)?, true)
        };
        let cpu = ticks_to_ms(after.cpu_ticks - before.cpu_ticks) / thousands;
        figures.agent_cpu_ms_per_1k[config].push(cpu);
        write!(detail, ", agent CPU {cpu:.1} ms per 1k")?;
        if config == TRACED {
            let spans = (after.exported - before.exported) / (thousands * 1000.0);
            figures.spans_per_request.push(spans);
            figures.plaintext_lost += plaintext_lost(agent)? - lost_before;
            for (series, value) in &after.losses {
                let delta = value - before.losses.get(series).copied().unwrap_or(0.0);
                if delta != 0.0 {
                    *figures.losses.entry(series.clone()).or_default() += delta;
                }
            }
            if !drained {
                figures.undrained_runs += 1;
            }
            write!(detail, ", {spans:.3} spans exported per request")?;
        }
        agent.check_alive()?;
    }
    progress(&format!(
        "  nginx https: {:.0} requests/s, p50 {:.0} us, p99 {:.0} us, nginx CPU {nginx_cpu:.1} \
         ms per 1k{}{detail}",
        run.rate,
        run.p50_us,
        run.p99_us,
        if run.errors > 0 {
            format!(", {} errors", run.errors)
        } else {
            String::new()
        }
    ));
    Ok(())
}

/// Plaintext the uprobes caught but could not tie to a socket.
fn plaintext_lost(agent: &Agent) -> anyhow::Result<f64> {
    const SERIES: &str = "tracer_tls_total{event=\"plaintext_lost_no_socket\"} ";
    Ok(agent
        .metrics_text()?
        .lines()
        .find_map(|line| line.strip_prefix(SERIES)?.trim().parse().ok())
        .unwrap_or(0.0))
}

fn report(bench: &Bench, f: &Figures, rounds: u32, elapsed: Duration, load: &str) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line("### HTTPS: nginx terminating TLS under wrk".into());
    line(String::new());
    line(format!("- Command: `cargo xtask {}`", command_args()));
    line(format!(
        "- Machine: {} CPUs, {}; {load}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    ));
    line(format!("- Agent: {}", agent_revision()));
    line(format!(
        "- {rounds} rounds in {elapsed:.0?}; each runs `wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} \
         -d{}s --latency https://...` once per configuration, in rotating order.",
        bench.counts.wrk_seconds
    ));
    line(String::new());
    line(format!(
        "nginx {}: master + {NGINX_WORKERS} worker, TLS 1.3 with a self-signed RSA 2048 \
         certificate, a {NGINX_FILE_BYTES} B static file (`sendfile off`: the body goes through \
         SSL_write) over keep-alive connections (up to 1,000 requests each), access_log off. \
         The agent's uprobes go into the processes it traces only: wrk, which links the same \
         libssl, never pays for them, nor does nginx unless traced.",
        nginx_version()
    ));
    line(String::new());
    line(
        "| configuration | requests/s | / no agent | per-round ratio range | p50 µs | p99 µs | \
         nginx CPU ms per 1,000 requests | agent CPU ms per 1,000 requests | spans per request |"
            .into(),
    );
    line("|---|---|---|---|---|---|---|---|---|".into());
    for (config, name) in CONFIGS.into_iter().enumerate() {
        let (ratio, ratio_range) = if config == NONE {
            ("1".into(), String::new())
        } else {
            (
                format!("**{:.3}**", median(&f.rate[config]) / median(&f.rate[NONE])),
                paired_range(&f.rate[config], &f.rate[NONE], 3),
            )
        };
        let agent_cpu = if config == NONE {
            String::new()
        } else {
            spread(&f.agent_cpu_ms_per_1k[config], 1)
        };
        let spans = if config == TRACED {
            spread(&f.spans_per_request, 3)
        } else {
            String::new()
        };
        line(format!(
            "| {name} | {} | {ratio} | {ratio_range} | {} | {} | {} | {agent_cpu} | {spans} |",
            spread(&f.rate[config], 0),
            spread(&f.p50_us[config], 0),
            spread(&f.p99_us[config], 0),
            spread(&f.nginx_cpu_ms_per_1k[config], 1),
        ));
    }
    line(String::new());
    line("Medians over rounds (min–max).".into());
    line(String::new());
    let mut notes = Vec::new();
    if f.plaintext_lost > 0.0 {
        notes.push(format!(
            "{:.0} SSL calls' plaintext could not be tied to a socket (`plaintext_lost_no_socket`).",
            f.plaintext_lost
        ));
    }
    for (series, value) in &f.losses {
        notes.push(format!(
            "`{series}` rose by {value:.0} over the traced runs."
        ));
    }
    if f.undrained_runs > 0 {
        notes.push(format!(
            "After {} traced run(s) the agent had not finished exporting within \
             {EXPORT_DRAIN_TIMEOUT:?}: spans per request and agent CPU are undercounted.",
            f.undrained_runs
        ));
    }
    if f.wrk_errors > 0 {
        notes.push(format!(
            "wrk counted {} errors over all runs.",
            f.wrk_errors
        ));
    }
    if f.disturbed_runs > 0 {
        notes.push(format!(
            "Another tracer-agent was running during {} run(s): its probes slow every \
             configuration.",
            f.disturbed_runs
        ));
    }
    if notes.is_empty() {
        notes.push("No loss, error or other agent during the traced runs.".into());
    }
    for note in notes {
        line(format!("- {note}"));
    }
    line(String::new());
    out
}

/// nginx with TLS on a free loopback port, from a generated configuration and certificate in
/// a temporary directory (removed with it). Stops with the bench.
struct TlsNginx {
    // Field order: the process stops before its directory goes.
    proc: Proc,
    _dir: TempDir,
    port: u16,
}

impl TlsNginx {
    fn start() -> anyhow::Result<TlsNginx> {
        let dir = TempDir::new("tracer-bench-nginx-tls")?;
        let root = dir.path();
        certificate(root)?;
        // Workers run as an unprivileged user (nobody): the files must be readable by all
        // (the key is read by the master, as root).
        let www = root.join("www");
        std::fs::create_dir(&www)?;
        let body: String = "tracer-agent bench 0123456789abcdef\n"
            .chars()
            .cycle()
            .take(NGINX_FILE_BYTES)
            .collect();
        std::fs::write(www.join("file.txt"), &body)?;
        for entry in [root, &www] {
            std::fs::set_permissions(entry, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::create_dir(root.join("tmp"))?;
        let port = free_loopback_addr()?.port();
        let config = root.join("nginx.conf");
        std::fs::write(&config, Self::config(root, port))?;
        let error_log = root.join("error.log");
        let mut cmd = Command::new(Nginx::binary());
        cmd.arg("-p")
            .arg(root)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: as in `Nginx::start`: prctl is async-signal-safe and touches no memory of
        // ours; the master gets SIGTERM should the bench die.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut proc = Proc::spawn("nginx (TLS)", &mut cmd)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + NGINX_READY_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            let log = || std::fs::read_to_string(&error_log).unwrap_or_default();
            if let Some(status) = proc.try_wait()? {
                bail!("nginx exited at start ({status}); its log:\n{}", log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx did not listen on {addr} within {NGINX_READY_TIMEOUT:?}; its log:\n{}",
                    log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(TlsNginx {
            proc,
            _dir: dir,
            port,
        })
    }

    fn config(root: &Path, port: u16) -> String {
        let root = root.display();
        let temp = |name: &str| format!("{name}_temp_path {root}/tmp/{name};");
        format!(
            "# Generated by `cargo xtask bench` (HTTPS part).
daemon off;
master_process on;
worker_processes {NGINX_WORKERS};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 75s;
    sendfile off;
    {}
    {}
    {}
    {}
    {}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {root}/cert.pem;
        ssl_certificate_key {root}/key.pem;
        root {root}/www;
    }}
}}
",
            temp("client_body"),
            temp("proxy"),
            temp("fastcgi"),
            temp("uwsgi"),
            temp("scgi"),
        )
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/file.txt", self.port)
    }
}

fn nginx_version() -> String {
    Command::new(Nginx::binary())
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

/// A self-signed certificate for 127.0.0.1 (`cert.pem`, `key.pem` in `dir`), made with the
/// openssl command.
fn certificate(dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdin(Stdio::null())
        .output()
        .context("running openssl (Debian package openssl) to make a test certificate")?;
    ensure!(
        out.status.success(),
        "openssl req failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
