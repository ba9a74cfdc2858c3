//! The agent as the span tests run it: an exporter chosen on the command line (`--exporter
//! otlp|console|jsonl`), an environment of our choosing (`OTEL_BSP_*`), `--metrics-addr` on a
//! free loopback port, and no `--dump`, so stdout is the console or jsonl exporter's alone.
//! [`crate::Agent`] always adds `--dump=json` and takes no environment, hence this runner.
//! Dropped during a panic, it prints its command line, environment, stderr and stdout.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{READY_TIMEOUT, TempDir, agent_bin, http_get, metric_value};

/// SIGTERM flushes the export queue (bounded by the agent at 5 s) before exiting.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Batches leave after 100 ms instead of the default 1 s, so tests wait less; a test may
/// override it.
const DEFAULT_ENV: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "100")];

/// Bytes of stderr and stdout shown in failure messages.
const REPORT_TAIL: usize = 8000;

pub struct SpanAgent {
    child: Child,
    status: Option<ExitStatus>,
    metrics_addr: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Holds stdout.txt and stderr.txt.
    _dir: TempDir,
}

fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn kill_group(child: &mut Child) {
    // SAFETY: plain syscall on the group our child leads; ESRCH when it is empty is fine.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

impl SpanAgent {
    /// Starts the agent with `args` plus `--metrics-addr`, the process environment without its
    /// `OTEL_*` variables (so the host's settings cannot leak in), [`DEFAULT_ENV`], then `env`;
    /// waits until `/readyz` answers 200.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let bin = agent_bin();
        let mut full_env: Vec<(String, String)> = Vec::new();
        for (key, value) in DEFAULT_ENV.iter().chain(env) {
            full_env.retain(|(k, _)| k != key);
            full_env.push(((*key).to_owned(), (*value).to_owned()));
        }
        // Another test may take the picked metrics port before the agent binds it; then the
        // agent exits at once and another port is tried.
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("pick a free port")
                .port();
            let metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
            let dir = TempDir::new("span-agent");
            let stdout = dir.path().join("stdout.txt");
            let stderr = dir.path().join("stderr.txt");
            let mut full: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            full.extend(["--metrics-addr".to_owned(), metrics_addr.to_string()]);
            let mut cmd = Command::new(&bin);
            cmd.args(&full)
                .stdin(Stdio::null())
                .stdout(fs::File::create(&stdout).expect("create stdout file"))
                .stderr(fs::File::create(&stderr).expect("create stderr file"))
                .process_group(0);
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("OTEL_") {
                    cmd.env_remove(key);
                }
            }
            cmd.envs(full_env.iter().map(|(k, v)| (k, v)));
            let child = cmd
                .spawn()
                .unwrap_or_else(|err| panic!("cannot run {}: {err}", bin.display()));
            let mut agent = Self {
                child,
                status: None,
                metrics_addr,
                stdout,
                stderr,
                args: full,
                env: full_env.clone(),
                _dir: dir,
            };
            match agent.wait_ready() {
                Ok(()) => return agent,
                Err(_) if agent.stderr_text().contains("cannot listen on") && attempt < 4 => {
                    agent.status = Some(agent.child.wait().expect("reap agent"));
                }
                Err(why) => panic!("agent did not become ready: {why}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < READY_TIMEOUT {
            if let Some(status) = self.child.try_wait().expect("try_wait agent") {
                self.status = Some(status);
                return Err(format!("it exited with {status}"));
            }
            match http_get(self.metrics_addr, "/readyz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("/readyz {code}: {}", body.trim()),
                Err(err) => last = format!("/readyz: {err}"),
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "no 200 from /readyz within {READY_TIMEOUT:?} (last: {last})"
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_text(&self) -> String {
        fs::read(&self.stdout)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        fs::read(&self.stderr)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// `/metrics` as text; panics unless it answers 200.
    pub fn metrics(&self) -> String {
        match http_get(self.metrics_addr, "/metrics") {
            Ok((200, body)) => body,
            Ok((code, body)) => panic!("/metrics answered {code}: {body}"),
            Err(err) => panic!("/metrics: {err}"),
        }
    }

    /// One sample of `/metrics`; panics if the series is absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.metrics();
        metric_value(&text, series)
            .unwrap_or_else(|| panic!("no sample {series} in /metrics:\n{text}"))
    }

    /// One sample of `/metrics`, 0 when the series does not exist (yet): label sets created on
    /// first use, such as `tracer_parse_errors_total{parser="tracecontext",...}`.
    pub fn metric_or_zero(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series).unwrap_or(0.0)
    }

    /// Polls `/metrics` until `series` reaches `at_least`; panics after `timeout`.
    pub fn wait_metric(&self, series: &str, at_least: f64, timeout: Duration) -> f64 {
        let mut value = 0.0;
        let ok = crate::wait_until(timeout, || {
            value = self.metric_or_zero(series);
            value >= at_least
        });
        if !ok {
            panic!(
                "{series} is {value} after {timeout:?}, expected at least {at_least}\n\
                 --- /metrics ---\n{}",
                self.metrics()
            );
        }
        value
    }

    /// Sends SIGTERM and waits for a clean exit (which flushes the export queue).
    pub fn stop_ok(&mut self) {
        if self.status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                // SAFETY: plain syscall on our own child, not reaped yet.
                unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match self.child.try_wait().expect("try_wait agent") {
                    Some(status) => {
                        self.status = Some(status);
                        break;
                    }
                    None if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                    None => {
                        kill_group(&mut self.child);
                        panic!("agent did not exit within {STOP_TIMEOUT:?} of SIGTERM");
                    }
                }
            }
        }
        let status = self.status.expect("set above");
        assert!(status.success(), "agent exited with {status} after SIGTERM");
    }

    /// Panics if the agent is no longer running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait agent") {
            self.status = Some(status);
            panic!("agent exited unexpectedly with {status}");
        }
    }

    /// Command line, environment, stderr and stdout, for failure messages.
    pub fn report(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "--- agent: {} {} {} (status {:?})\n--- agent stderr ---\n{}\n--- agent stdout \
             (last {REPORT_TAIL} bytes) ---\n{}",
            env.join(" "),
            agent_bin().display(),
            self.args.join(" "),
            self.status,
            tail(&self.stderr_text(), REPORT_TAIL),
            tail(&self.stdout_text(), REPORT_TAIL),
        )
    }
}

impl Drop for SpanAgent {
    fn drop(&mut self) {
        if self.status.is_none() {
            kill_group(&mut self.child);
        }
        if thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}
