//! Choosing what to trace, and what the spans say about the process: `--all`, `--exe` and
//! `--exclude-exe` on processes started after the agent, `--port` on listeners old and new,
//! state released when a traced process exits, and the resource attributes a process gets from
//! its own environment, its cgroup (a Kubernetes pod's, made here under cgroup v2) and the
//! kubelet's log directory.
//!
//! Programs are told apart by the file name they are run as: each test runs python through a
//! symlink of its own (`srv-alpha-<test pid>`), whose name is what `--exe` matches, while
//! /proc/PID/exe still names the interpreter.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use tracer_e2e::{
    Agent, Checks, PY_PRELUDE, Peer, STEP_TIMEOUT, TempDir,
    otlp_receiver::{KIND_SERVER, Protocol, ReceivedSpan, Receiver, summaries},
    python, stream_problem, wait_for_listen, wait_until,
};

/// How long spans may take to reach the receiver once the traffic is over.
const SPAN_WAIT: Duration = Duration::from_secs(20);
/// `tracer_processes_traced` is refreshed every 10 s.
const REFRESH_WAIT: Duration = Duration::from_secs(25);

// ---------------------------------------------------------------------------------------------
// Peers.

/// A name for the python interpreter: a symlink `<name>-<test pid>` in `dir`. Run through it,
/// a process's exec'd file name and argv[0] are that name.
fn python_alias(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.path().join(format!("{name}-{}", std::process::id()));
    symlink(python(), &path).unwrap_or_else(|err| panic!("symlink {}: {err}", path.display()));
    path
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// `python -m http.server` run as `program`, on `port` (0: any free one), serving `www`, with
/// `env` added to its environment. Returns the server and its port once it listens.
fn serve(program: &Path, port: u16, www: &TempDir, env: &[(&str, &str)]) -> (Peer, u16) {
    let mut cmd = Command::new(program);
    cmd.args(["-u", "-m", "http.server"])
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--directory"])
        .arg(www.path())
        .envs(env.iter().copied());
    let mut server = Peer::spawn(&file_name(program), cmd);
    // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    let serving = server.expect("Serving HTTP on");
    let port: u16 = serving
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected http.server banner {serving:?}"));
    wait_for_listen(port);
    (server, port)
}

/// A directory holding hello.txt for the servers.
fn www() -> TempDir {
    let dir = TempDir::new("www");
    fs::write(dir.path().join("hello.txt"), "hello\n").expect("write hello.txt");
    dir
}

/// `curl` GET of hello.txt on `port`; panics unless it answers 200. Returns curl's pid.
fn get(port: u16) -> u32 {
    let child = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{port}/hello.txt"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("curl is needed for these tests");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for curl");
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && code == "200",
        "curl on port {port}: {} {code} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------------------------
// The agent and its spans.

/// An agent exporting OTLP http/protobuf to `receiver`, with `selection` arguments.
fn exporting_agent(receiver: &Receiver, selection: &[&str]) -> Agent {
    let endpoint = receiver.endpoint();
    let mut args = vec![
        "--exporter",
        "otlp",
        "--otlp-protocol",
        receiver.protocol.flag(),
        "--otlp-endpoint",
        endpoint.as_str(),
    ];
    args.extend_from_slice(selection);
    Agent::start_exporting(&args, &[])
}

fn spans_of(spans: &[ReceivedSpan], pid: u32, kind: i32) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.pid() == Some(pid) && s.span.kind == kind)
        .collect()
}

/// Waits until `pid` has `count` spans of `kind`.
fn wait_for_spans(
    receiver: &Receiver,
    what: &str,
    pid: u32,
    kind: i32,
    count: usize,
) -> Vec<ReceivedSpan> {
    receiver.wait_spans(what, SPAN_WAIT, |spans| {
        spans_of(spans, pid, kind).len() >= count
    })
}

fn check<T: PartialEq + std::fmt::Debug>(checks: &mut Checks, what: &str, got: T, want: T) {
    checks.add((got != want).then(|| format!("{what}: expected {want:?}, got {got:?}")));
}

/// Polls a gauge until it equals `want`; panics with its last value after `timeout`.
fn wait_gauge(agent: &Agent, series: &str, want: f64, timeout: Duration) {
    let mut last = f64::NAN;
    let ok = wait_until(timeout, || {
        last = agent.metric_or_zero(series);
        last == want
    });
    assert!(
        ok,
        "{series} is {last} after {timeout:?}, expected {want}\n--- /metrics ---\n{}",
        agent.metrics()
    );
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// --all traces a server started after the agent, and the server's own OTEL_SERVICE_NAME and
/// OTEL_RESOURCE_ATTRIBUTES name its spans. `--exclude-exe` leaves out this test process, which
/// holds the receiver (traced, each export would make another span), but not the server it
/// starts: that one execs python and is decided again.
#[test]
fn all_picks_up_a_later_server_under_its_own_service_name() {
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let me = std::env::current_exe().expect("current_exe");
    let mut agent = exporting_agent(&receiver, &["--all", "--exclude-exe", &file_name(&me)]);
    let www = www();
    let (server, port) = serve(
        python(),
        0,
        &www,
        &[
            ("OTEL_SERVICE_NAME", "checkout"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=e2e,service.name=overridden,team=shop%20floor",
            ),
        ],
    );
    get(port);
    let spans = wait_for_spans(
        &receiver,
        "the later server's span",
        server.pid(),
        KIND_SERVER,
        1,
    );
    let span = spans_of(&spans, server.pid(), KIND_SERVER)[0];
    let mut checks = Checks::default();
    check(
        &mut checks,
        "service.name",
        span.resource_str("service.name"),
        Some("checkout"),
    );
    check(
        &mut checks,
        "deployment.environment",
        span.resource_str("deployment.environment"),
        Some("e2e"),
    );
    check(
        &mut checks,
        "team",
        span.resource_str("team"),
        Some("shop floor"),
    );
    check(
        &mut checks,
        "url.path",
        span.str("url.path"),
        Some("/hello.txt"),
    );
    check(
        &mut checks,
        "status",
        span.int("http.response.status_code"),
        Some(200),
    );
    checks.finish(&summaries(&spans));
    agent.stop_ok();
}

/// `--exe 'srv-*' --exclude-exe srv-beta-*`, started before both servers: alpha is traced from
/// its very first request, beta not at all (although the probes traced it provisionally until
/// the agent read its exec).
#[test]
fn exe_filter_traces_one_server_and_excludes_another() {
    let bin = TempDir::new("bin");
    let alpha = python_alias(&bin, "srv-alpha");
    let beta = python_alias(&bin, "srv-beta");
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let pattern = format!("srv-*-{}", std::process::id());
    let excluded = format!("srv-beta-{}", std::process::id());
    let mut agent = exporting_agent(&receiver, &["--exe", &pattern, "--exclude-exe", &excluded]);
    let www = www();
    let (alpha_server, alpha_port) = serve(&alpha, 0, &www, &[]);
    let (beta_server, beta_port) = serve(&beta, 0, &www, &[]);
    // Beta first: once alpha's spans are in, beta's would be too.
    get(beta_port);
    get(beta_port);
    get(alpha_port);
    get(alpha_port);
    let spans = wait_for_spans(
        &receiver,
        "alpha's two spans",
        alpha_server.pid(),
        KIND_SERVER,
        2,
    );
    let mut checks = Checks::default();
    check(
        &mut checks,
        "alpha's SERVER spans (its first request included)",
        spans_of(&spans, alpha_server.pid(), KIND_SERVER).len(),
        2,
    );
    check(
        &mut checks,
        "beta's spans (excluded)",
        spans
            .iter()
            .filter(|s| s.pid() == Some(beta_server.pid()))
            .count(),
        0,
    );
    let stderr = agent.stderr_text();
    let said = format!(
        "tracing pid {} ({}): --exe {pattern}",
        alpha_server.pid(),
        file_name(&alpha)
    );
    checks.add((!stderr.contains(&said)).then(|| format!("the agent never said {said:?}")));
    checks.add(
        stderr
            .contains(&format!("tracing pid {} ", beta_server.pid()))
            .then(|| "the agent says it traces beta".to_owned()),
    );
    // The same decisions on /metrics: alpha selected, beta refused (both were traced
    // provisionally from their exec); published every 100 ms.
    thread::sleep(Duration::from_millis(300));
    let selected = agent.metric_or_zero("tracer_selection_total{event=\"selected\"}");
    let refused = agent.metric_or_zero("tracer_selection_total{event=\"refused\"}");
    checks.add((selected < 1.0).then(|| format!("selected on /metrics: {selected}")));
    checks.add((refused < 1.0).then(|| format!("refused on /metrics: {refused}")));
    checks.finish(&summaries(&spans));
    agent.stop_ok();
}

/// A client selected by `--exe` writes its request about a millisecond after its exec (bash,
/// through its /dev/tcp), before the agent has read the exec (it drains the ring buffer every
/// 10 ms): the request is still captured from its first byte, because the probes trace every
/// exec'd process provisionally until the agent decides. (bash's redirections dup the socket
/// onto other fds, which the agent follows as separate connections, so this checks the dump
/// rather than spans.)
#[test]
fn exe_selected_client_is_traced_from_its_exec() {
    const CLIENT: &str = r#"exec 3<>"/dev/tcp/127.0.0.1/$1"
printf 'GET /hello.txt HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$1" >&3
while IFS= read -r -u 3 line || [ -n "$line" ]; do printf '%s\n' "$line"; done"#;
    let bin = TempDir::new("bin");
    // bash under a name of this test's own.
    let bash = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v bash"])
            .output()
            .expect("sh")
            .stdout,
    )
    .expect("utf-8");
    let client = bin.path().join(format!("fetch-{}", std::process::id()));
    symlink(bash.trim(), &client).expect("symlink bash");
    let mut agent = Agent::start(&["--exe", &file_name(&client)]);
    let www = www();
    let (_server, port) = serve(python(), 0, &www, &[]);
    let child = Command::new(&client)
        .args(["-c", CLIENT, "fetch"])
        .arg(port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run bash");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for the client");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.starts_with("HTTP/1.0 200"), "{out:?}");
    let request =
        format!("GET /hello.txt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    agent.wait_events("the client's whole request", STEP_TIMEOUT, |events| {
        events
            .opens_of(pid)
            .iter()
            .any(|open| stream_problem(events, open.conn, "write", request.as_bytes()).is_none())
    });
    let events = agent.wait_events("the reply's status line", STEP_TIMEOUT, |events| {
        events.opens_of(pid).iter().any(|open| {
            events
                .stream(open.conn, "read")
                .is_ok_and(|s| s.start == 0 && s.bytes.starts_with(b"HTTP/1.0 200"))
        })
    });
    // How long after the exec the agent decided (for the README).
    let stderr = agent.stderr_text();
    let decided = format!("tracing pid {pid} ");
    let line = stderr
        .lines()
        .find(|l| l.contains(&decided))
        .unwrap_or_else(|| {
            panic!(
                "no decision logged for pid {pid}:\n{stderr}\n{}",
                events.lines_of_pid(pid)
            )
        });
    eprintln!("{line}");
    agent.stop_ok();
}

/// `--port`: a server listening on it before the agent starts and one that starts listening
/// after are traced; a server on another port is not.
#[test]
fn port_selects_listeners_old_and_new() {
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let www = www();
    let (old_server, old_port) = serve(python(), 0, &www, &[]);
    let new_port = free_port();
    let mut agent = exporting_agent(
        &receiver,
        &[
            "--port",
            &old_port.to_string(),
            "--port",
            &new_port.to_string(),
        ],
    );
    let (new_server, _) = serve(python(), new_port, &www, &[]);
    let (other_server, other_port) = serve(python(), 0, &www, &[]);
    get(other_port);
    get(old_port);
    get(new_port);
    let spans = receiver.wait_spans("spans of both selected servers", SPAN_WAIT, |spans| {
        !spans_of(spans, old_server.pid(), KIND_SERVER).is_empty()
            && !spans_of(spans, new_server.pid(), KIND_SERVER).is_empty()
    });
    let mut checks = Checks::default();
    check(
        &mut checks,
        "spans of the server on an unselected port",
        spans
            .iter()
            .filter(|s| s.pid() == Some(other_server.pid()))
            .count(),
        0,
    );
    let stderr = agent.stderr_text();
    let said = format!("tracing pid {} (python", new_server.pid());
    checks.add((!stderr.contains(&said)).then(|| format!("the agent never said {said:?}...")));
    checks.finish(&summaries(&spans));
    agent.stop_ok();
}

/// A traced process that exits with a connection still open: the agent forgets the process
/// and the connection (`tracer_processes_traced` and `tracer_connections_tracked` return to
/// where they were).
#[test]
fn exited_process_state_is_released() {
    const HOLDER: &str = r#"
ls = listener()
say("port", ls.getsockname()[1])
c, _ = ls.accept()
assert recv_exact(c, 4) == b"ping"
c.sendall(b"pong")
say("served")
wait()
os._exit(0)  # the connection is still open: no close() for the probes to see
"#;
    let bin = TempDir::new("bin");
    let holder = python_alias(&bin, "srv-holder");
    let mut agent = Agent::start(&["--exe", &file_name(&holder)]);
    wait_gauge(&agent, "tracer_processes_traced", 0.0, REFRESH_WAIT);
    let connections_before = agent.metric_or_zero("tracer_connections_tracked");

    let mut cmd = Command::new(&holder);
    cmd.arg("-u")
        .arg("-c")
        .arg(format!("{PY_PRELUDE}\n{HOLDER}"));
    let mut peer = Peer::spawn("holder", cmd);
    let pid: u32 = peer.expect_num("pid");
    let port: u16 = peer.expect_num("port");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the holder");
    stream.write_all(b"ping").expect("send ping");
    let mut pong = [0u8; 4];
    stream.read_exact(&mut pong).expect("read pong");
    assert_eq!(&pong, b"pong");
    peer.expect("served");

    agent.wait_events(
        "the holder's connection",
        Duration::from_secs(20),
        |events| !events.opens_of(pid).is_empty(),
    );
    wait_gauge(&agent, "tracer_processes_traced", 1.0, REFRESH_WAIT);
    wait_gauge(
        &agent,
        "tracer_connections_tracked",
        connections_before + 1.0,
        Duration::from_secs(10),
    );

    peer.send("exit");
    peer.finish();
    wait_gauge(
        &agent,
        "tracer_connections_tracked",
        connections_before,
        Duration::from_secs(10),
    );
    wait_gauge(&agent, "tracer_processes_traced", 0.0, REFRESH_WAIT);
    drop(stream);
    agent.stop_ok();
    let events = agent.events();
    assert!(
        events.all.iter().any(|(value, _)| {
            value.get("event").and_then(|e| e.as_str()) == Some("exit")
                && value.get("pid").and_then(|p| p.as_u64()) == Some(u64::from(pid))
        }),
        "no exit event for pid {pid}:\n{}",
        events.lines_of_pid(pid)
    );
}

/// A cgroup v2 directory shaped like a Kubernetes pod's container (systemd driver, containerd),
/// made for the test and removed after it.
struct PodCgroup {
    /// Outermost directory created, then the container's.
    root: PathBuf,
    leaf: PathBuf,
}

impl PodCgroup {
    fn new(uid: &str, container_id: &str) -> Self {
        let mount = cgroup2_mount();
        let root = mount.join(format!("tracer-e2e-{}", std::process::id()));
        let uid_ = uid.replace('-', "_");
        let leaf = root
            .join("kubepods.slice")
            .join("kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{uid_}.slice"))
            .join(format!("cri-containerd-{container_id}.scope"));
        fs::create_dir_all(&leaf)
            .unwrap_or_else(|err| panic!("cannot create cgroup {}: {err}", leaf.display()));
        Self { root, leaf }
    }

    fn enter(&self, pid: u32) {
        fs::write(self.leaf.join("cgroup.procs"), pid.to_string()).unwrap_or_else(|err| {
            panic!("cannot move pid {pid} into {}: {err}", self.leaf.display())
        });
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Innermost first; a directory still holding a process cannot go (its peer is dropped
        // before this guard, so it is gone by now).
        let mut dir = self.leaf.clone();
        while dir.starts_with(&self.root) {
            if let Err(err) = fs::remove_dir(&dir) {
                eprintln!("cannot remove cgroup {}: {err}", dir.display());
            }
            if !dir.pop() {
                break;
            }
        }
    }
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    mounts
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
        })
        .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/self/mountinfo:\n{mounts}"))
}

/// A server in a pod-shaped cgroup gets container.id and k8s.pod.uid from it, and the pod,
/// namespace and container names from a kubelet log directory laid out as on a node.
#[test]
fn pod_cgroup_and_kubelet_logs_name_the_container() {
    const UID: &str = "5f0c2a7e-9b1d-4c3e-8f2a-6d7e8f9a0b1c";
    let container_id = format!(
        "{:064x}",
        u128::from(std::process::id()) * 0x9e37_79b9_7f4a_7c15
    );
    let logs = TempDir::new("kubelet-logs");
    let pod_dir = logs
        .path()
        .join(format!("pods/shop_checkout-6b8f9_{UID}/web"));
    fs::create_dir_all(&pod_dir).expect("create pods/");
    fs::create_dir_all(logs.path().join("containers")).expect("create containers/");
    fs::write(pod_dir.join("0.log"), "").expect("write 0.log");
    symlink(
        format!("/var/log/pods/shop_checkout-6b8f9_{UID}/web/0.log"),
        logs.path().join(format!(
            "containers/checkout-6b8f9_shop_web-{container_id}.log"
        )),
    )
    .expect("symlink containers/");

    let cgroup = PodCgroup::new(UID, &container_id);
    let www = www();
    let (server, port) = serve(python(), 0, &www, &[]);
    cgroup.enter(server.pid());
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let log_dir = logs.path().to_string_lossy().into_owned();
    let mut agent = exporting_agent(
        &receiver,
        &[
            "--pid",
            &server.pid().to_string(),
            "--k8s-log-dir",
            &log_dir,
        ],
    );
    get(port);
    let spans = wait_for_spans(
        &receiver,
        "the pod server's span",
        server.pid(),
        KIND_SERVER,
        1,
    );
    let span = spans_of(&spans, server.pid(), KIND_SERVER)[0];
    let mut checks = Checks::default();
    for (key, want) in [
        ("container.id", container_id.as_str()),
        ("k8s.pod.uid", UID),
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.name", "checkout-6b8f9"),
        ("k8s.container.name", "web"),
        ("service.name", "http.server"),
    ] {
        check(&mut checks, key, span.resource_str(key), Some(want));
    }
    checks.finish(&summaries(&spans));
    agent.stop_ok();
    drop(server);
    drop(cgroup);
}
