//! The capabilities the agent needs (`capture::privileges::CAPABILITIES`, the one list), end to
//! end. With exactly those it traces a process of another user and names it from that process's
//! environment and executable, both as root with every other capability dropped (what the
//! DaemonSet does) and as an unprivileged user holding them as ambient capabilities (what the
//! systemd unit does). With any one of them missing it refuses to start and names that one. And
//! deploy/ and the README grant and explain exactly that list.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tracer_agent::capture::privileges::{CAPABILITIES, Capability};
use tracer_e2e::{
    PY_PRELUDE, Peer, READY_TIMEOUT, TempDir, agent_bin, http_get,
    otlp_receiver::{KIND_SERVER, Protocol, Receiver},
    wait_until,
};

/// The traced process runs as nobody: neither the agent's user nor root.
const PEER_UID: u32 = 65534;
/// The agent's user when it is not root: any unprivileged uid other than the peer's.
const AGENT_UID: u32 = 64999;
const PEER_SERVICE: &str = "capabilities-peer";

/// How the agent gets its capabilities.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// uid 0 with the bounding set (and so the effective set) cut to the list.
    Root,
    /// `AGENT_UID` with the list as ambient capabilities.
    User,
}

/// `setpriv ... --` running the next program in `mode` with exactly `caps` and no_new_privs (as
/// `allowPrivilegeEscalation: false` and the unit's `NoNewPrivileges`).
fn setpriv(mode: Mode, caps: &[Capability]) -> Command {
    let list: String = caps
        .iter()
        .map(|cap| format!(",+{}", cap.name.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg("--no-new-privs");
    match mode {
        Mode::Root => {
            cmd.args(["--inh-caps=-all", "--ambient-caps=-all"]);
        }
        Mode::User => {
            cmd.arg(format!("--reuid={AGENT_UID}"))
                .arg(format!("--regid={AGENT_UID}"))
                .arg("--clear-groups")
                .arg(format!("--inh-caps=-all{list}"))
                .arg(format!("--ambient-caps=-all{list}"));
        }
    }
    cmd.arg(format!("--bounding-set=-all{list}")).arg("--");
    cmd
}

/// The agent binary copied where any user may run it (the workspace may sit under /root).
fn public_agent_copy() -> (PathBuf, TempDir) {
    let dir = TempDir::new("capabilities");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let bin = dir.path().join("tracer-agent");
    fs::copy(agent_bin(), &bin).expect("copy the agent binary");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod agent copy");
    (bin, dir)
}

/// The agent started through `setpriv`, its stderr in a file; killed on drop, which during a
/// panic prints its stderr.
struct CappedAgent {
    child: Child,
    stderr: PathBuf,
    what: String,
}

impl CappedAgent {
    fn spawn(
        bin: &Path,
        dir: &Path,
        mode: Mode,
        caps: &[Capability],
        args: &[String],
    ) -> CappedAgent {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let stderr = dir.join(format!("stderr-{run}-{mode:?}.txt"));
        let mut cmd = setpriv(mode, caps);
        cmd.arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("create stderr file"))
            .process_group(0);
        // The host's OpenTelemetry settings must not leak into what is checked.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("OTEL_BSP_SCHEDULE_DELAY", "100");
        let what = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("setpriv (util-linux) is needed: {what}: {err}"));
        CappedAgent {
            child,
            stderr,
            what,
        }
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls `/readyz` until it answers 200; panics if the agent exits or `READY_TIMEOUT` passes.
    fn wait_ready(&mut self, metrics: SocketAddr) {
        let mut last = String::from("no answer yet");
        let ready = wait_until(READY_TIMEOUT, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                last = format!("exited with {status}");
                return true;
            }
            match http_get(metrics, "/readyz") {
                Ok((200, _)) => return true,
                Ok((code, body)) => last = format!("/readyz {code}: {}", body.trim()),
                Err(err) => last = format!("/readyz: {err}"),
            }
            false
        });
        if !ready || last.starts_with("exited") {
            panic!(
                "agent `{}` did not become ready ({last})\n--- agent stderr ---\n{}",
                self.what,
                self.stderr_text()
            );
        }
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's process group.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- agent `{}` stderr ---\n{}",
                self.what,
                self.stderr_text()
            );
        }
    }
}

/// An HTTP/1.1 server run by Debian's python3 as `PEER_UID` (version managers keep their
/// interpreters under /root), with `OTEL_SERVICE_NAME` in its environment.
const SERVER: &str = r#"
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = b"traced\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
say("port", server.server_address[1])
server.serve_forever()
"#;

const SYSTEM_PYTHON: &str = "/usr/bin/python3";

fn peer_server() -> (Peer, u16) {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={PEER_UID}"))
        .arg(format!("--regid={PEER_UID}"))
        .args(["--clear-groups", "--inh-caps=-all", "--"])
        .arg(SYSTEM_PYTHON)
        .args(["-u", "-c", &format!("{PY_PRELUDE}\n{SERVER}")])
        .env("OTEL_SERVICE_NAME", PEER_SERVICE);
    let mut peer = Peer::spawn("peer http server", cmd);
    let pid: u32 = peer.expect_num("pid");
    assert_eq!(pid, peer.pid(), "setpriv should exec python in place");
    let port = peer.expect_num("port");
    (peer, port)
}

fn free_loopback_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}

fn traces_with_only_the_listed_capabilities(mode: Mode) {
    let (bin, dir) = public_agent_copy();
    let (peer, port) = peer_server();
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let metrics = free_loopback_addr();
    let args: Vec<String> = [
        "--pid",
        &peer.pid().to_string(),
        "--exporter",
        "otlp",
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--metrics-addr",
        &metrics.to_string(),
        "--status-interval",
        "0",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let mut agent = CappedAgent::spawn(&bin, dir.path(), mode, CAPABILITIES, &args);
    agent.wait_ready(metrics);

    let path = format!("/capabilities-{mode:?}");
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let reply = http_get(server, &path).expect("GET from the peer server");
    assert_eq!(reply, (200, "traced\n".to_owned()));

    let spans = receiver.wait_spans(
        &format!("the SERVER span of GET {path}"),
        Duration::from_secs(20),
        |spans| {
            spans
                .iter()
                .any(|s| s.span.kind == KIND_SERVER && s.str("url.path") == Some(&path))
        },
    );
    let span = spans
        .iter()
        .find(|s| s.span.kind == KIND_SERVER && s.str("url.path") == Some(&path))
        .expect("waited for it");
    let exe = fs::canonicalize(SYSTEM_PYTHON).expect("resolve /usr/bin/python3");
    // CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: /proc/PID/environ of another user's process.
    assert_eq!(
        span.resource_str("service.name"),
        Some(PEER_SERVICE),
        "service.name should come from the peer's environment\n{}",
        span.summary()
    );
    // CAP_SYS_PTRACE: /proc/PID/exe.
    assert_eq!(
        span.resource_str("process.executable.path"),
        exe.to_str(),
        "process.executable.path should come from /proc/PID/exe\n{}",
        span.summary()
    );
    assert_eq!(span.pid(), Some(peer.pid()), "{}", span.summary());
    assert!(
        !agent.stderr_text().contains("permission denied"),
        "the agent reported a permission problem:\n{}",
        agent.stderr_text()
    );
}

#[test]
fn traces_as_root_with_only_the_listed_capabilities() {
    traces_with_only_the_listed_capabilities(Mode::Root);
}

#[test]
fn traces_as_another_user_with_the_listed_ambient_capabilities() {
    traces_with_only_the_listed_capabilities(Mode::User);
}

/// For each capability in turn, the agent started with all the others must exit at once,
/// naming the one it lacks and what it is for (and no other).
#[test]
fn refuses_to_start_without_any_one_capability() {
    let (bin, dir) = public_agent_copy();
    let args: Vec<String> = ["--all", "--exporter", "none", "--duration", "20"]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
    for mode in [Mode::Root, Mode::User] {
        for missing in CAPABILITIES {
            let rest: Vec<Capability> = CAPABILITIES
                .iter()
                .filter(|cap| cap.name != missing.name)
                .copied()
                .collect();
            let mut agent = CappedAgent::spawn(&bin, dir.path(), mode, &rest, &args);
            let start = Instant::now();
            let exited = wait_until(Duration::from_secs(10), || {
                matches!(agent.child.try_wait(), Ok(Some(_)))
            });
            let stderr = agent.stderr_text();
            assert!(
                exited,
                "{mode:?} without {}: still running after {:?}\n{stderr}",
                missing.name,
                start.elapsed()
            );
            let status = agent.child.wait().expect("reap the agent");
            assert!(
                !status.success(),
                "{mode:?} without {}: exited with {status}\n{stderr}",
                missing.name
            );
            let expected = format!("it lacks {} ({}).", missing.name, missing.why);
            assert!(
                stderr.contains(&expected),
                "{mode:?} without {}: stderr should say {expected:?}:\n{stderr}",
                missing.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/ and the README against the list.

fn workspace_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    fs::read_to_string(&full).unwrap_or_else(|err| panic!("reading {}: {err}", full.display()))
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

fn listed() -> Vec<String> {
    sorted(CAPABILITIES.iter().map(|cap| cap.name.to_owned()).collect())
}

/// The one line of `text` that starts with `prefix` (after indentation); panics unless exactly one.
fn only_line<'a>(text: &'a str, prefix: &str, file: &str) -> &'a str {
    let found: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix(prefix))
        .collect();
    match found.as_slice() {
        [one] => one.trim(),
        _ => panic!("{file}: expected one line starting with {prefix:?}, found {found:?}"),
    }
}

#[test]
fn daemonset_adds_exactly_the_listed_capabilities_and_drops_the_rest() {
    let file = "deploy/kubernetes.yaml";
    let yaml = workspace_file(file);
    let flow = |prefix: &str| -> Vec<String> {
        only_line(&yaml, prefix, file)
            .strip_prefix('[')
            .and_then(|list| list.strip_suffix(']'))
            .unwrap_or_else(|| panic!("{file}: {prefix} should be a [flow, list]"))
            .split(',')
            .map(|name| name.trim().to_owned())
            .collect()
    };
    let added = flow("add:")
        .into_iter()
        .map(|name| format!("CAP_{name}"))
        .collect();
    assert_eq!(sorted(added), listed(), "{file}: capabilities.add");
    assert_eq!(flow("drop:"), ["ALL"], "{file}: capabilities.drop");
    assert_eq!(only_line(&yaml, "privileged:", file), "false");
    assert_eq!(only_line(&yaml, "hostPID:", file), "true");
}

#[test]
fn systemd_unit_grants_exactly_the_listed_capabilities() {
    let file = "deploy/tracer-agent.service";
    let unit = workspace_file(file);
    for key in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
        let names = only_line(&unit, key, file)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(sorted(names), listed(), "{file}: {key}");
    }
}

#[test]
fn readme_explains_every_listed_capability() {
    let readme = workspace_file("README.md");
    let deploying = readme
        .split("\n## ")
        .find(|section| section.starts_with("Deploying"))
        .expect("README.md has a \"Deploying\" section");
    for cap in CAPABILITIES {
        assert!(
            deploying.contains(&format!("`{}`", cap.name)),
            "README.md, Deploying, should explain {}",
            cap.name
        );
    }
}
