//! Harness for the end-to-end tests (see tests/): runs the real agent binary with its probes in
//! this kernel, real peer processes (python3, curl) over loopback sockets, and reads what the
//! agent reports (`--dump=json` lines, `/metrics`, `/readyz`).
//!
//! Every process a test starts lives in a guard that kills it (and its process group, so forked
//! children too) on drop, so a failing test leaves nothing behind. When a test panics, the guards
//! print the agent's stderr, a summary of its dump and the peers' output, which libtest shows
//! with the failure.

pub mod otlp_receiver;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Loading the probes runs the kernel verifier; a loaded 2-core machine can take a while.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a peer may take to print an expected line, or an expected event to show up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// SIGTERM drains the ring buffer and flushes the dump; this is the most that may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent binary: `TRACER_AGENT_BIN`, else `<workspace>/target/debug/tracer-agent`.
pub fn agent_bin() -> PathBuf {
    let path = match std::env::var_os("TRACER_AGENT_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tracer-agent"),
    };
    assert!(
        path.is_file(),
        "agent binary {} not found: run `cargo xtask test` (it builds the agent and sets \
         TRACER_AGENT_BIN), or `cargo build -p tracer-agent` first",
        path.display()
    );
    path
}

/// A fresh directory for one test's files (the agent's full dump, its stderr), removed on drop
/// unless `TRACER_E2E_KEEP` is set and the test failed.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tracer-e2e-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() && std::env::var_os("TRACER_E2E_KEEP").is_some() {
            eprintln!("(test files kept in {})", self.0.display());
        } else {
            if thread::panicking() {
                eprintln!("(set TRACER_E2E_KEEP=1 to keep the full dump of a failing test)");
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Kills the child's whole process group (every spawned process leads its own group), then
/// reaps the child.
fn kill_group(child: &mut Child) {
    // Sent even when the leader has exited: children it forked may linger in its group. The
    // group id is the child's pid, ours until reaped below (reused only if pids wrapped around).
    // SAFETY: plain syscall; ESRCH when the group is already empty is fine.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => return None,
            Err(err) => panic!("waiting for pid {}: {err}", child.id()),
        }
    }
}

/// Polls `done` every 50 ms until it holds; false if `timeout` passes first.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The last `max` bytes of `text`, on a char boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

// ---------------------------------------------------------------------------------------------
// HTTP (the agent's /metrics and /readyz), raw HTTP/1.1 over std.

/// One `GET` with `Connection: close`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply);
    let bad = || std::io::Error::other(format!("not an HTTP reply: {reply:?}"));
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

/// The value of one sample of an OpenMetrics text, e.g.
/// `metric_value(text, r#"tracer_kernel_lost_events_total{reason="ringbuf_full"}"#)`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split(' ').next()?.parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------
// The agent.

/// A running `tracer-agent` with `--metrics-addr` on a free loopback port and stdout to a
/// file: the `--dump=json` ([`Agent::start`]) or the console/jsonl exporter's output
/// ([`Agent::start_exporting`]). Killed on drop if still running; dropped during a panic, it
/// prints its command line, environment, stderr and output.
pub struct Agent {
    child: Child,
    status: Option<ExitStatus>,
    metrics_addr: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
    args: Vec<String>,
    /// Environment set for the agent (beyond the test's own, less its `OTEL_*` variables).
    env: Vec<(String, String)>,
    /// Whether stdout is the `--dump=json` (else an exporter's output).
    dump: bool,
    _dir: TempDir,
}

/// Exporting agents send batches after 100 ms instead of the default 1 s, so tests wait less;
/// a test may override it.
const EXPORT_ENV: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "100")];

fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

impl Agent {
    /// Starts the agent with `args` plus `--dump=json --metrics-addr 127.0.0.1:<free port>`
    /// and waits until `/readyz` answers 200.
    pub fn start(args: &[&str]) -> Self {
        Self::launch(args, &[], true)
    }

    /// Starts the agent with `args` plus `--metrics-addr`, no `--dump` (stdout is the console
    /// or jsonl exporter's alone), [`EXPORT_ENV`] then `env`; waits until `/readyz` answers 200.
    pub fn start_exporting(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(args, env, false)
    }

    /// [`Agent::start_exporting`] over OTLP to `receiver` (its protocol), tracing `pids`.
    pub fn start_otlp(
        receiver: &crate::otlp_receiver::Receiver,
        pids: &[u32],
        env: &[(&str, &str)],
    ) -> Self {
        let endpoint = receiver.endpoint();
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut args = vec![
            "--exporter",
            "otlp",
            "--otlp-protocol",
            receiver.protocol.flag(),
            "--otlp-endpoint",
            endpoint.as_str(),
        ];
        for pid in &pids {
            args.extend(["--pid", pid.as_str()]);
        }
        Self::start_exporting(&args, env)
    }

    fn launch(args: &[&str], env: &[(&str, &str)], dump: bool) -> Self {
        let bin = agent_bin();
        let defaults: &[(&str, &str)] = if dump { &[] } else { EXPORT_ENV };
        let mut full_env: Vec<(String, String)> = Vec::new();
        for (key, value) in defaults.iter().chain(env) {
            full_env.retain(|(k, _)| k != key);
            full_env.push(((*key).to_owned(), (*value).to_owned()));
        }
        // The port is free when picked but another test could take it before the agent binds:
        // the agent then exits at once, and another port is tried.
        for attempt in 0..5 {
            let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
            let dir = TempDir::new("agent");
            let stdout = dir
                .path()
                .join(if dump { "dump.jsonl" } else { "stdout.txt" });
            let stderr = dir.path().join("stderr.txt");
            let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            if dump {
                full.push("--dump=json".to_owned());
            }
            full.extend(["--metrics-addr".to_owned(), metrics_addr.to_string()]);
            let mut cmd = Command::new(&bin);
            cmd.args(&full)
                .stdin(Stdio::null())
                .stdout(fs::File::create(&stdout).expect("create stdout file"))
                .stderr(fs::File::create(&stderr).expect("create stderr file"))
                .process_group(0);
            // The host's OpenTelemetry settings must not leak into what a test checks.
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
                dump,
                _dir: dir,
            };
            match agent.wait_ready() {
                Ok(()) => return agent,
                Err(why) if agent.stderr_text().contains("cannot listen on") && attempt < 4 => {
                    eprintln!("agent could not bind {metrics_addr} ({why}); trying another port");
                    agent.status = Some(agent.child.wait().expect("reap agent"));
                }
                Err(why) => {
                    let stderr = agent.stderr_text();
                    panic!(
                        "agent `{} {}` did not become ready: {why}\n--- agent stderr ---\n{}",
                        bin.display(),
                        agent.args.join(" "),
                        tail(&stderr, 8000)
                    );
                }
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

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Sends SIGTERM and waits for the agent to drain and exit; returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain syscall on our own child, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let Some(status) = wait_timeout(&mut self.child, STOP_TIMEOUT) else {
            kill_group(&mut self.child);
            panic!(
                "agent did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                self.report()
            )
        };
        self.status = Some(status);
        status
    }

    /// [`Agent::stop`], asserting a clean exit (SIGTERM is the normal way to stop it).
    pub fn stop_ok(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "agent exited with {status} after SIGTERM\n{}",
            self.report()
        );
    }

    /// Panics if the agent is no longer running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait agent") {
            self.status = Some(status);
            panic!("agent exited unexpectedly with {status}\n{}", self.report());
        }
    }

    pub fn stderr_text(&self) -> String {
        fs::read(&self.stderr)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// What the agent wrote to stdout so far (the dump, or an exporter's output).
    pub fn stdout_text(&self) -> String {
        fs::read(&self.stdout)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Every complete line of the dump so far, parsed. Panics on a line that is not a JSON
    /// object (the dump promises one per line).
    pub fn events(&self) -> Events {
        let bytes = fs::read(&self.stdout).expect("read the agent's dump");
        let text = String::from_utf8(bytes).expect("the dump is not UTF-8");
        // While the agent runs, the last line may be half written.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        Events::parse(complete).unwrap_or_else(|err| panic!("{err}\n{}", self.report()))
    }

    /// Polls the dump until `done` holds for it; panics (saying `what`) after `timeout`.
    pub fn wait_events(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Events) -> bool,
    ) -> Events {
        let mut last = None;
        let ok = wait_until(timeout, || {
            let events = self.events();
            let ok = done(&events);
            last = Some(events);
            ok
        });
        if !ok {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.report()
            );
        }
        last.expect("polled at least once")
    }

    /// `/metrics` as text; panics unless it answers 200.
    pub fn metrics(&self) -> String {
        match http_get(self.metrics_addr, "/metrics") {
            Ok((200, body)) => body,
            Ok((code, body)) => panic!("/metrics answered {code}: {body}\n{}", self.report()),
            Err(err) => panic!("/metrics: {err}\n{}", self.report()),
        }
    }

    /// One sample of `/metrics`, e.g. `tracer_events_received_total`; panics if absent.
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
        let ok = wait_until(timeout, || {
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

    /// The status code of `/readyz`.
    pub fn readyz(&self) -> u16 {
        match http_get(self.metrics_addr, "/readyz") {
            Ok((code, _)) => code,
            Err(err) => panic!("/readyz: {err}\n{}", self.report()),
        }
    }

    /// The command line, environment, stderr and the dump (summarized) or the exporter's
    /// output, for failure messages.
    pub fn report(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !self.dump {
            return format!(
                "--- agent: {} {} {} (status {:?})\n--- agent stderr ---\n{}\n--- agent stdout \
                 (last 8000 bytes) ---\n{}",
                env.join(" "),
                agent_bin().display(),
                self.args.join(" "),
                self.status,
                tail(&self.stderr_text(), 8000),
                tail(&self.stdout_text(), 8000),
            );
        }
        let dump = fs::read_to_string(&self.stdout).unwrap_or_default();
        let lines = dump.lines().count();
        let mut summary = String::new();
        for line in dump.lines().filter(|l| !l.contains(r#""event":"exit""#)) {
            if summary.len() > 12_000 {
                summary.push_str("...\n");
                break;
            }
            summary.push_str(&shorten_line(line));
            summary.push('\n');
        }
        format!(
            "--- agent: {} {} (status {:?})\n--- agent stderr ---\n{}\n--- agent dump: {lines} \
             lines in {} (first ones, without exit events) ---\n{summary}",
            agent_bin().display(),
            self.args.join(" "),
            self.status,
            tail(&self.stderr_text(), 6000),
            self.stdout.display(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.status.is_none() {
            kill_group(&mut self.child);
        }
        if thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}

/// A dump line with long hex cut, for messages.
pub fn shorten_line(line: &str) -> String {
    match line.find(r#""data_hex":""#) {
        Some(at) => {
            let start = at + r#""data_hex":""#.len();
            let end = line[start..].find('"').map_or(line.len(), |e| start + e);
            if end - start > 96 {
                format!(
                    "{}...({} hex chars){}",
                    &line[..start + 96],
                    end - start,
                    &line[end..]
                )
            } else {
                line.to_owned()
            }
        }
        None => line.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The dump.

/// An `open` event.
#[derive(Clone, Debug)]
pub struct Open {
    pub conn: u64,
    pub pid: u32,
    pub fd: i64,
    pub exe: String,
    pub role: String,
    pub local: Option<String>,
    pub remote: Option<String>,
    pub tuple_source: String,
    pub via: String,
    pub line: String,
}

impl Open {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local.as_deref().and_then(|a| a.parse().ok())
    }

    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote.as_deref().and_then(|a| a.parse().ok())
    }
}

/// A `data` event (one read or write syscall).
#[derive(Clone, Debug)]
pub struct Data {
    pub conn: u64,
    pub pid: u32,
    pub tid: u32,
    pub fd: i64,
    pub direction: String,
    pub syscall: String,
    pub pos: u64,
    pub len: u64,
    pub captured: u64,
    pub truncated: bool,
    pub no_payload: bool,
    pub copy_failed: bool,
    pub data: Vec<u8>,
    pub line: String,
}

/// A `close` event.
#[derive(Clone, Debug)]
pub struct Close {
    pub conn: u64,
    pub pid: u32,
    pub sent: u64,
    pub received: u64,
    pub line: String,
}

/// The parsed dump.
#[derive(Clone, Debug, Default)]
pub struct Events {
    pub opens: Vec<Open>,
    pub data: Vec<Data>,
    pub closes: Vec<Close>,
    /// Every line, including gap and exit events.
    pub all: Vec<(Value, String)>,
}

fn field<'a>(value: &'a Value, name: &str, line: &str) -> Result<&'a Value, String> {
    value
        .get(name)
        .ok_or_else(|| format!("dump line without {name:?}: {line}"))
}

fn field_u64(value: &Value, name: &str, line: &str) -> Result<u64, String> {
    field(value, name, line)?
        .as_u64()
        .ok_or_else(|| format!("dump line with a non-integer {name:?}: {line}"))
}

fn field_i64(value: &Value, name: &str, line: &str) -> Result<i64, String> {
    field(value, name, line)?
        .as_i64()
        .ok_or_else(|| format!("dump line with a non-integer {name:?}: {line}"))
}

fn field_str(value: &Value, name: &str, line: &str) -> Result<String, String> {
    field(value, name, line)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("dump line with a non-string {name:?}: {line}"))
}

fn field_opt_str(value: &Value, name: &str, line: &str) -> Result<Option<String>, String> {
    match field(value, name, line)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(format!("dump line with a bad {name:?}: {line}")),
    }
}

fn field_bool(value: &Value, name: &str, line: &str) -> Result<bool, String> {
    field(value, name, line)?
        .as_bool()
        .ok_or_else(|| format!("dump line with a non-boolean {name:?}: {line}"))
}

fn field_u32(value: &Value, name: &str, line: &str) -> Result<u32, String> {
    let n = field_u64(value, name, line)?;
    u32::try_from(n).map_err(|_| format!("{name:?} out of range: {line}"))
}

/// Decodes lowercase or uppercase hex.
pub fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("odd-length hex: {text}"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| format!("not hex: {text}")))
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A connection direction rebuilt from its data events, in `pos` order.
#[derive(Clone, Debug)]
pub struct Stream {
    /// `pos` of the first event (0 for a connection seen from its start).
    pub start: u64,
    /// The captured bytes, concatenated.
    pub bytes: Vec<u8>,
    /// Sum of the events' `len`.
    pub len: u64,
    pub events: Vec<Data>,
}

impl Events {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut events = Self::default();
        for line in text.lines() {
            let value: Value = serde_json::from_str(line)
                .map_err(|err| format!("dump line is not JSON ({err}): {line}"))?;
            if !value.is_object() {
                return Err(format!("dump line is not a JSON object: {line}"));
            }
            let l = line;
            match field_str(&value, "event", l)?.as_str() {
                "open" => events.opens.push(Open {
                    conn: field_u64(&value, "conn", l)?,
                    pid: field_u32(&value, "pid", l)?,
                    fd: field_i64(&value, "fd", l)?,
                    exe: field_str(&value, "exe", l)?,
                    role: field_str(&value, "role", l)?,
                    local: field_opt_str(&value, "local", l)?,
                    remote: field_opt_str(&value, "remote", l)?,
                    tuple_source: field_str(&value, "tuple_source", l)?,
                    via: field_str(&value, "via", l)?,
                    line: line.to_owned(),
                }),
                "data" => {
                    let data = unhex(&field_str(&value, "data_hex", l)?)?;
                    let captured = field_u64(&value, "captured", l)?;
                    if captured != data.len() as u64 {
                        return Err(format!(
                            "captured is {captured} but data_hex holds {} bytes: {}",
                            data.len(),
                            shorten_line(line)
                        ));
                    }
                    events.data.push(Data {
                        conn: field_u64(&value, "conn", l)?,
                        pid: field_u32(&value, "pid", l)?,
                        tid: field_u32(&value, "tid", l)?,
                        fd: field_i64(&value, "fd", l)?,
                        direction: field_str(&value, "direction", l)?,
                        syscall: field_str(&value, "syscall", l)?,
                        pos: field_u64(&value, "pos", l)?,
                        len: field_u64(&value, "len", l)?,
                        captured,
                        truncated: field_bool(&value, "truncated", l)?,
                        no_payload: field_bool(&value, "no_payload", l)?,
                        copy_failed: field_bool(&value, "copy_failed", l)?,
                        data,
                        line: line.to_owned(),
                    });
                }
                "close" => events.closes.push(Close {
                    conn: field_u64(&value, "conn", l)?,
                    pid: field_u32(&value, "pid", l)?,
                    sent: field_u64(&value, "sent", l)?,
                    received: field_u64(&value, "received", l)?,
                    line: line.to_owned(),
                }),
                "gap" | "exit" => {}
                other => return Err(format!("unknown event {other:?}: {line}")),
            }
            events.all.push((value, line.to_owned()));
        }
        Ok(events)
    }

    /// The open events of `pid`.
    pub fn opens_of(&self, pid: u32) -> Vec<&Open> {
        self.opens.iter().filter(|o| o.pid == pid).collect()
    }

    pub fn open(&self, conn: u64) -> Option<&Open> {
        self.opens.iter().find(|o| o.conn == conn)
    }

    /// The one connection of `pid` matching `matches`; panics (listing the pid's connections)
    /// unless there is exactly one.
    pub fn conn_of(&self, pid: u32, what: &str, matches: impl Fn(&Open) -> bool) -> &Open {
        let found: Vec<&Open> = self
            .opens_of(pid)
            .into_iter()
            .filter(|o| matches(o))
            .collect();
        match found.as_slice() {
            [one] => one,
            _ => panic!(
                "expected exactly one connection of pid {pid} ({what}), found {}:\n{}\n\
                 --- every open event of pid {pid} ---\n{}",
                found.len(),
                found
                    .iter()
                    .map(|o| o.line.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.opens_of(pid)
                    .iter()
                    .map(|o| o.line.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }

    /// The data events of `conn` in `direction` ("read" or "write"), in `pos` order.
    pub fn data_of(&self, conn: u64, direction: &str) -> Vec<Data> {
        let mut data: Vec<Data> = self
            .data
            .iter()
            .filter(|d| d.conn == conn && d.direction == direction)
            .cloned()
            .collect();
        data.sort_by_key(|d| d.pos);
        data
    }

    /// One direction of `conn` rebuilt by `pos`: every event must start where the previous one
    /// ended (no hole, no overlap) and hold all its bytes (not truncated, copy not failed).
    pub fn stream(&self, conn: u64, direction: &str) -> Result<Stream, String> {
        let events = self.data_of(conn, direction);
        let Some(first) = events.first() else {
            return Err(format!("no {direction} events for conn {conn}"));
        };
        let start = first.pos;
        let mut next = start;
        let mut bytes = Vec::new();
        for d in &events {
            if d.pos != next {
                return Err(format!(
                    "{direction} of conn {conn}: event at pos {} where {next} was expected \
                     (hole or overlap): {}",
                    d.pos,
                    shorten_line(&d.line)
                ));
            }
            if d.truncated || d.copy_failed || d.no_payload || d.captured != d.len {
                return Err(format!(
                    "{direction} of conn {conn}: event without all its bytes: {}",
                    shorten_line(&d.line)
                ));
            }
            bytes.extend_from_slice(&d.data);
            next += d.len;
        }
        Ok(Stream {
            start,
            bytes,
            len: next - start,
            events,
        })
    }

    /// Every dump line about `conn` (opens, data, gaps, closes), shortened, for messages.
    pub fn lines_of(&self, conn: u64) -> String {
        self.all
            .iter()
            .filter(|(v, _)| v.get("conn").and_then(Value::as_u64) == Some(conn))
            .map(|(_, line)| shorten_line(line))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every dump line of `pid`, shortened, for messages.
    pub fn lines_of_pid(&self, pid: u32) -> String {
        self.all
            .iter()
            .filter(|(v, _)| v.get("pid").and_then(Value::as_u64) == Some(u64::from(pid)))
            .map(|(_, line)| shorten_line(line))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn close_of(&self, conn: u64) -> Option<&Close> {
        self.closes.iter().find(|c| c.conn == conn)
    }
}

/// Why `direction` of `conn` is not exactly `expected` from position 0 (the connection was
/// seen from its start), if it is not.
pub fn stream_problem(
    events: &Events,
    conn: u64,
    direction: &str,
    expected: &[u8],
) -> Option<String> {
    match events.stream(conn, direction) {
        Err(err) => Some(err),
        Ok(stream) if stream.start == 0 && stream.bytes == expected => None,
        Ok(stream) => Some(format!(
            "{direction} of conn {conn}: expected from pos 0\n  {}\nbut got from pos {}\n  {}",
            hex(expected),
            stream.start,
            hex(&stream.bytes),
        )),
    }
}

/// Asserts that `direction` of `conn` is exactly `expected` from position 0, showing both
/// and the connection's lines otherwise.
pub fn assert_stream(events: &Events, conn: u64, direction: &str, expected: &[u8]) {
    if let Some(problem) = stream_problem(events, conn, direction, expected) {
        panic!("{problem}\n--- conn {conn} ---\n{}", events.lines_of(conn));
    }
}

/// Why an open event's role or tuple (as the user reads them in the dump) are not these.
pub fn tuple_problem(open: &Open, role: &str, local: &str, remote: &str) -> Option<String> {
    let right = open.role == role
        && open.local.as_deref() == Some(local)
        && open.remote.as_deref() == Some(remote);
    (!right).then(|| {
        format!(
            "expected conn {} of pid {} to be {role} local={local} remote={remote}, got \
             role={} local={:?} remote={:?}: {}",
            open.conn, open.pid, open.role, open.local, open.remote, open.line
        )
    })
}

/// Asserts an open event's role and tuple.
pub fn assert_tuple(open: &Open, role: &str, local: &str, remote: &str) {
    if let Some(problem) = tuple_problem(open, role, local, remote) {
        panic!("{problem}");
    }
}

/// Collects failed checks so one run reports all of them, not only the first.
#[derive(Default)]
pub struct Checks(Vec<String>);

impl Checks {
    pub fn add(&mut self, problem: Option<String>) {
        self.0.extend(problem);
    }

    /// Panics with every problem found (and `context`), if any.
    pub fn finish(self, context: &str) {
        if !self.0.is_empty() {
            panic!(
                "{} problem(s):\n* {}\n{context}",
                self.0.len(),
                self.0.join("\n* ")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Peers.

/// The python interpreter `python3` on PATH resolves to, run directly: version managers put a
/// shell shim on PATH, which costs a fork-exec chain per start.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap_or_else(|err| panic!("python3 is needed for the peers: {err}"));
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && !path.is_empty(),
            "python3 -c 'print(sys.executable)' failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(path)
    })
}

/// Prepended to every python peer script: `say` prints a line for the test at once, `wait`
/// blocks until the test sends a line (and exits quietly if the test is gone), `listener` and
/// `loopback_pair` make a listening socket on 127.0.0.1 and a connected pair through it,
/// `recv_exact` reads a known number of bytes and `recv_to_eof` everything until the peer
/// closes.
pub const PY_PRELUDE: &str = r#"
import os, socket, sys, time
def say(*words):
    print(*words, flush=True)
def wait():
    line = sys.stdin.readline()
    if not line:
        os._exit(0)
    return line.strip()
def listener(backlog=1):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(backlog)
    return ls
def loopback_pair(ls):
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    return c, s
def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf
def recv_to_eof(sock, size=65536):
    buf = b""
    while True:
        chunk = sock.recv(size)
        if not chunk:
            return buf
        buf += chunk
say("pid", os.getpid())
"#;

/// A peer process: stdout read line by line (`expect`), stdin for `send`, stderr kept for
/// messages. Killed with its process group on drop.
pub struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Peer {
    /// `python3 -u -c PRELUDE+script args...`; waits for its `pid` line.
    pub fn python(name: &str, script: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(python());
        cmd.arg("-u")
            .arg("-c")
            .arg(format!("{PY_PRELUDE}\n{script}"))
            .args(args);
        let mut peer = Self::spawn(name, cmd);
        let pid: u32 = peer.expect("pid").parse().expect("pid line");
        assert_eq!(pid, peer.pid(), "{name}: python runs under another pid");
        peer
    }

    /// Spawns `cmd` in its own process group with piped stdio.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name} ({cmd:?}): {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next line starting with `key` and returns the rest of it (trimmed);
    /// panics with the peer's output if it exits or `STEP_TIMEOUT` passes.
    pub fn expect(&mut self, key: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(key)
                        && (rest.is_empty() || rest.starts_with(' '))
                    {
                        return rest.trim().to_owned();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no {key:?} line within {STEP_TIMEOUT:?}\n{}",
                        self.name,
                        self.output()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_timeout(&mut self.child, Duration::from_secs(5));
                    panic!(
                        "{}: exited ({status:?}) before printing {key:?}\n{}",
                        self.name,
                        self.output()
                    )
                }
            }
        }
    }

    /// The next line the peer prints, whatever it is.
    pub fn line(&mut self) -> String {
        match self.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(_) => panic!(
                "{}: no line within {STEP_TIMEOUT:?} (or it exited)\n{}",
                self.name,
                self.output()
            ),
        }
    }

    /// [`Peer::expect`] parsed as a number (ports, pids).
    pub fn expect_num<T: std::str::FromStr>(&mut self, key: &str) -> T {
        let text = self.expect(key);
        text.parse()
            .unwrap_or_else(|_| panic!("{}: {key:?} line is not a number: {text:?}", self.name))
    }

    /// Writes one line to the peer's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        if let Err(err) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            panic!(
                "{}: cannot write to stdin: {err}\n{}",
                self.name,
                self.output()
            );
        }
    }

    /// Closes stdin and waits for a successful exit.
    pub fn finish(&mut self) {
        self.stdin = None;
        match wait_timeout(&mut self.child, STEP_TIMEOUT) {
            Some(status) if status.success() => {}
            Some(status) => panic!("{} exited with {status}\n{}", self.name, self.output()),
            None => panic!(
                "{} still running after {STEP_TIMEOUT:?}\n{}",
                self.name,
                self.output()
            ),
        }
    }

    /// What the peer printed so far, for messages.
    pub fn output(&self) -> String {
        let mut seen = self.seen.clone();
        seen.extend(self.lines.try_iter());
        format!(
            "--- {} (pid {}) stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.pid(),
            seen.join("\n"),
            self.name,
            tail(&self.stderr.lock().unwrap_or_else(|e| e.into_inner()), 4000)
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stdin = None;
        kill_group(&mut self.child);
        if thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets.

/// Whether something listens on TCP `port` (any address, IPv4 or IPv6), from /proc/net/tcp*;
/// checking this way does not connect, so it leaves no connection in the server's queue.
/// `python3 -m http.server` on a free loopback port, serving a directory that holds `name`
/// with `body`; it answers HTTP/1.0, one request per connection. Returns the server, its port
/// and the directory (keep it alive as long as the server).
pub fn http_server(name: &str, body: &str) -> (Peer, u16, TempDir) {
    let dir = TempDir::new("www");
    fs::write(dir.path().join(name), body).expect("write the served file");
    let mut cmd = Command::new(python());
    cmd.args([
        "-u",
        "-m",
        "http.server",
        "0",
        "--bind",
        "127.0.0.1",
        "--directory",
    ])
    .arg(dir.path());
    let mut server = Peer::spawn("http.server", cmd);
    // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    let serving = server.expect("Serving HTTP on");
    let port: u16 = serving
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected http.server banner {serving:?}"));
    wait_for_listen(port);
    (server, port, dir)
}

pub fn is_listening(port: u16) -> bool {
    const LISTEN: &str = "0A";
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        let Ok(text) = fs::read_to_string(file) else {
            return false;
        };
        text.lines().skip(1).any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|local| local.rsplit(':').next())
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            local_port == Some(port) && cols.get(3) == Some(&LISTEN)
        })
    })
}

/// Waits until TCP `port` listens; panics after `STEP_TIMEOUT`.
pub fn wait_for_listen(port: u16) {
    assert!(
        wait_until(STEP_TIMEOUT, || is_listening(port)),
        "nothing listens on port {port} after {STEP_TIMEOUT:?}"
    );
}

/// A loopback port free a moment ago (bound, noted, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// nginx (one worker) on a free loopback port, proxying every request in plaintext to
/// `127.0.0.1:backend`, with its configuration, pid and temporary files in `dir`. `listen` is
/// appended to the listen address and `server` goes into the server block (TLS: `ssl` and the
/// certificate lines). Returns nginx and its port once it listens and its worker exists, so
/// that an agent started next traces the worker as the master's child.
pub fn nginx_proxy(dir: &Path, backend: u16, listen: &str, server: &str) -> (Peer, u16) {
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           server {{\n\
             listen 127.0.0.1:{port}{listen};\n\
             {server}\n\
             location / {{ proxy_pass http://127.0.0.1:{backend}; }}\n\
           }}\n\
         }}\n"
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&conf_path).arg("-p").arg(dir);
    let nginx = Peer::spawn("nginx", cmd);
    wait_for_listen(port);
    let pid = nginx.pid();
    let has_worker = || {
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .is_ok_and(|c| !c.trim().is_empty())
    };
    assert!(
        wait_until(STEP_TIMEOUT, has_worker),
        "nginx started no worker"
    );
    (nginx, port)
}

/// Counts data events by (conn, direction), for messages.
pub fn data_summary(events: &Events) -> String {
    let mut counts: BTreeMap<(u64, &str), (usize, u64)> = BTreeMap::new();
    for d in &events.data {
        let entry = counts.entry((d.conn, d.direction.as_str())).or_default();
        entry.0 += 1;
        entry.1 += d.len;
    }
    counts
        .iter()
        .map(|((conn, dir), (n, len))| format!("conn {conn} {dir}: {n} events, {len} bytes"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The python of the virtual environment holding tests/requirements.txt (the OpenTelemetry
/// SDK...), which `cargo xtask test` installs and names in TRACER_E2E_VENV.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("TRACER_E2E_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-venv"));
    let python = venv.join("bin").join("python");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask setup` installs tests/requirements.txt there",
        python.display()
    );
    python
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_line(conn: u64, pos: u64, hex: &str, truncated: bool, len: u64) -> String {
        format!(
            r#"{{"event":"data","time_unix_nano":1,"start_unix_nano":1,"conn":{conn},"pid":7,"tid":7,"fd":3,"direction":"write","syscall":"sendto","pos":{pos},"len":{len},"captured":{},"truncated":{truncated},"no_payload":false,"copy_failed":false,"data_hex":"{hex}"}}"#,
            hex.len() / 2
        )
    }

    #[test]
    fn streams_are_rebuilt_by_position_and_holes_are_caught() {
        let text = [
            data_line(1, 3, "ff00", false, 2),
            data_line(1, 0, "616263", false, 3),
            data_line(2, 0, "61", false, 1),
            data_line(2, 2, "62", false, 1),
            data_line(3, 0, "61", true, 5),
        ]
        .join("\n");
        let events = Events::parse(&text).unwrap();
        let stream = events.stream(1, "write").unwrap();
        assert_eq!(
            (stream.start, stream.bytes.as_slice()),
            (0, &b"abc\xff\x00"[..])
        );
        assert!(stream_problem(&events, 1, "write", b"abc\xff\x01").is_some());
        assert!(stream_problem(&events, 1, "write", b"abc\xff\x00").is_none());
        assert!(events.stream(2, "write").unwrap_err().contains("hole"));
        assert!(
            events
                .stream(3, "write")
                .unwrap_err()
                .contains("without all")
        );
        assert!(events.stream(1, "read").is_err());
    }

    #[test]
    fn bad_dump_lines_are_rejected() {
        assert!(Events::parse("not json").is_err());
        assert!(Events::parse(r#"{"event":"open","conn":1}"#).is_err());
        // captured must match the bytes in data_hex.
        let line = data_line(1, 0, "6162", false, 2).replace(r#""captured":2"#, r#""captured":3"#);
        assert!(Events::parse(&line).is_err());
    }

    #[test]
    fn metric_samples_are_found_by_exact_series() {
        let text =
            "# TYPE x counter\nx_total{reason=\"a\"} 3\nx_total{reason=\"ab\"} 5\ny 1.5\n# EOF\n";
        assert_eq!(metric_value(text, "x_total{reason=\"a\"}"), Some(3.0));
        assert_eq!(metric_value(text, "x_total{reason=\"ab\"}"), Some(5.0));
        assert_eq!(metric_value(text, "y"), Some(1.5));
        assert_eq!(metric_value(text, "x_total"), None);
    }
}
