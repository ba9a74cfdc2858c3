//! The HTTPS part of `cargo xtask bench` (`--only https`): what the TLS uprobes cost per
//! request. nginx terminates TLS (master + one worker, keep-alive, a small static file written
//! with write()) under `wrk` over https, in three configurations interleaved round by round as
//! in part C: no agent; the agent tracing an idle process (which gets uprobes on the system
//! libssl; nginx and wrk, untraced, get none, though they link the same libssl); the agent
//! tracing nginx and exporting every span over OTLP/HTTP to the bench's sink.
use std::{
    fmt::Write as _,
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{
    Agent, Bench, EXPORT_DRAIN_TIMEOUT, Load, NGINX_FILE_BYTES, NGINX_WORKERS, OtlpSink, Proc,
    TempDir, WRK_CONNECTIONS, WRK_THREADS,
    common::{
        Counting, IDLE, NONE, ServerSamples, TRACED, errors_note, measure, nginx_config,
        nginx_version, per_1k, ratio_cell, spawn_nginx, write_site,
    },
    free_loopback_addr, paired_range, progress, spread,
};

const CONFIGS: [&str; 3] = [
    "no agent",
    "agent tracing an idle process (uprobes attached)",
    "agent tracing nginx, OTLP export",
];

/// One value per round of each figure, by configuration.
#[derive(Default)]
struct Figures {
    /// wrk's figures and nginx's CPU per 1,000 requests.
    runs: [ServerSamples; 3],
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
    let idle = bench.idle_target()?;
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
    bench.rounds(
        "HTTPS ",
        rounds,
        [NONE, IDLE, TRACED],
        |config| CONFIGS[config],
        |config| {
            let agent = bench.agent_for(config, &idle, nginx.proc.pid(), &sink)?;
            one_run(bench, config, agent.as_ref(), &nginx, &sink, &mut figures)?;
            if let Some(agent) = agent {
                agent.stop()?;
            }
            Ok(())
        },
    )?;
    drop(nginx);
    drop(idle);
    let elapsed = started.elapsed();
    let load = load_before.describe(&Load::now(), elapsed);
    Ok(report(bench, &figures, rounds, elapsed, &load))
}

/// One wrk run under one configuration, with the agent's figures around it.
fn one_run(
    bench: &Bench,
    config: usize,
    agent: Option<&Agent>,
    nginx: &TlsNginx,
    sink: &OtlpSink,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let lost_before = agent.map(plaintext_lost).transpose()?.unwrap_or(0.0);
    let measured = measure(agent, Counting::of(config), sink, || {
        bench.wrk_server(&nginx.url(), nginx.proc.pid())
    })?;
    let (run, nginx_cpu) = &measured.run;
    if measured.disturbed() {
        figures.disturbed_runs += 1;
    }
    figures.wrk_errors += run.errors;
    figures.runs[config].push(run.rate, run.p50_us, run.p99_us, *nginx_cpu);
    let mut detail = String::new();
    if let (Some(agent), Some(delta)) = (agent, &measured.agent) {
        let cpu = per_1k(delta.cpu_ms, run.requests);
        figures.agent_cpu_ms_per_1k[config].push(cpu);
        write!(detail, ", agent CPU {cpu:.1} ms per 1k")?;
        if config == TRACED {
            let spans = delta.exported / run.requests.max(1) as f64;
            figures.spans_per_request.push(spans);
            figures.plaintext_lost += plaintext_lost(agent)? - lost_before;
            delta.add_losses(&mut figures.losses);
            if !measured.drained {
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
        errors_note(run.errors)
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
    // A blank line first: the part before may not end with one. Command, machine and agent
    // are in the run's header.
    line(String::new());
    line("### G. HTTPS: nginx terminating TLS under wrk".into());
    line(String::new());
    line(format!("- Machine load: {load}"));
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
        let (this, none) = (&f.runs[config], &f.runs[NONE]);
        let (ratio, ratio_range) = if config == NONE {
            ("1".into(), String::new())
        } else {
            (
                ratio_cell(&this.rate, &none.rate, true),
                paired_range(&this.rate, &none.rate, 3),
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
            spread(&this.rate, 0),
            spread(&this.p50_us, 0),
            spread(&this.p99_us, 0),
            spread(&this.cpu_ms_per_1k, 1),
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
        // The key is read by the master, as root; the workers only read the site.
        write_site(root, &[""])?;
        let port = free_loopback_addr()?.port();
        // Listening is enough: wrk's warm-up checks the answers.
        let (proc, ()) = spawn_nginx(
            "nginx (TLS)",
            root,
            port,
            &Self::config(root, port),
            |addr| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .ok()
                    .map(drop)
            },
        )?;
        Ok(TlsNginx {
            proc,
            _dir: dir,
            port,
        })
    }

    fn config(root: &Path, port: u16) -> String {
        let dir = root.display();
        nginx_config(
            root,
            "HTTPS part",
            "",
            1024,
            "    keepalive_timeout 75s;\n    sendfile off;\n",
            &format!(
                "        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        root {dir}/www;
"
            ),
        )
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/file.txt", self.port)
    }
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
