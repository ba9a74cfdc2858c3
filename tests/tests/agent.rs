//! The agent as an operator sees it: privileges, losses under pressure, `--all`.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tracer_e2e::{Agent, Peer, STEP_TIMEOUT, agent_bin, assert_stream, wait_until};

#[test]
fn non_root_run_fails_with_a_clear_message() {
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(agent_bin())
        .args(["--all", "--duration", "5", "--status-interval", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) is needed for this test");
    // It must refuse at once, not after --duration.
    let start = Instant::now();
    let finished = wait_until(Duration::from_secs(4), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !finished {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait for the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        finished,
        "non-root agent still running after {:?}; stderr:\n{stderr}",
        start.elapsed()
    );
    assert!(
        !out.status.success(),
        "non-root agent exited with {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("needs root"),
        "stderr should say it needs root:\n{stderr}"
    );
}

#[test]
fn ring_buffer_loss_is_counted_and_the_agent_keeps_going() {
    // A burst of 16 KiB writes, read by a thread of the same process, then (when told) one
    // small exchange on a new connection.
    const SCRIPT: &str = r#"
import threading
n, size = int(sys.argv[1]), int(sys.argv[2])
ls = listener(2)
wait()
c, s = loopback_pair(ls)
def drain():
    left = n * size
    while left > 0:
        left -= len(s.recv(1 << 16))
t = threading.Thread(target=drain)
t.start()
chunk = b"B" * size
for _ in range(n):
    c.sendall(chunk)
t.join()
say("burst done")
wait()
c2 = socket.create_connection(ls.getsockname())
s2, _ = ls.accept()
c2.sendall(b"after-the-burst")
assert recv_exact(s2, 15) == b"after-the-burst"
say("after done")
wait()
"#;
    const LOST: &str = r#"tracer_kernel_lost_events_total{reason="ringbuf_full"}"#;
    const RECEIVED: &str = "tracer_events_received_total";
    let mut peer = Peer::python("burst", SCRIPT, &["500", "16384"]);
    let mut agent = Agent::start(&[
        "--pid",
        &peer.pid().to_string(),
        "--ring-buffer-bytes",
        "4096",
    ]);
    assert_eq!(agent.metric(LOST), 0.0, "no loss before any traffic");
    peer.send("go");
    peer.expect("burst done");
    // Metrics are published every 100 ms.
    let lost_seen = wait_until(Duration::from_secs(5), || agent.metric(LOST) > 0.0);
    assert!(
        lost_seen,
        "{LOST} still 0 after an 8 MiB burst through a 4 KiB ring buffer\n{}",
        agent.metrics()
    );
    assert_eq!(agent.readyz(), 200, "readyz after the loss");
    let received = agent.metric(RECEIVED);

    peer.send("go");
    peer.expect("after done");
    let pid = peer.pid();
    agent.wait_events(
        "the exchange after the burst in the dump",
        STEP_TIMEOUT,
        |events| {
            events
                .data
                .iter()
                .any(|d| d.pid == pid && d.direction == "read" && d.data == b"after-the-burst")
        },
    );
    let rising = wait_until(Duration::from_secs(5), || agent.metric(RECEIVED) > received);
    assert!(
        rising,
        "{RECEIVED} stayed at {received} after the burst\n{}",
        agent.metrics()
    );
    agent.assert_running();
    assert_eq!(agent.readyz(), 200, "readyz at the end");
    peer.send("go");
    peer.finish();
    agent.stop_ok();
    let events = agent.events();
    let after = events.conn_of(pid, "the client after the burst", |o| {
        o.role == "client"
            && events
                .data_of(o.conn, "write")
                .iter()
                .any(|d| d.data == b"after-the-burst")
    });
    assert_stream(&events, after.conn, "write", b"after-the-burst");
}

#[test]
fn all_traces_unnamed_processes_but_not_the_agent_itself() {
    const SCRIPT: &str = r#"
ls = listener()
wait()
c, s = loopback_pair(ls)
c.sendall(b"seen without --pid")
assert recv_exact(s, 18) == b"seen without --pid"
s.sendall(b"reply \x00\xff")
assert recv_exact(c, 8) == b"reply \x00\xff"
c.close(); s.close()
say("done")
"#;
    let mut agent = Agent::start(&["--all"]);
    // Started after the agent and never named to it.
    let mut peer = Peer::python("unnamed", SCRIPT, &[]);
    peer.send("go");
    peer.expect("done");
    peer.finish();
    // Scrapes: this test process is traced (it is not the agent); the agent's side is not.
    for _ in 0..3 {
        agent.metrics();
    }
    let metrics_addr = agent.metrics_addr().to_string();
    let me = std::process::id();
    agent.wait_events("this test's metrics scrape", STEP_TIMEOUT, |events| {
        events
            .opens_of(me)
            .iter()
            .any(|o| o.remote.as_deref() == Some(metrics_addr.as_str()))
    });
    agent.stop_ok();
    let events = agent.events();

    let pid = peer.pid();
    let client = events.conn_of(pid, "the client", |o| o.role == "client");
    let server = events.conn_of(pid, "the server", |o| o.role == "server");
    assert_eq!(
        client.local, server.remote,
        "{}\n{}",
        client.line, server.line
    );
    assert_eq!(
        client.remote, server.local,
        "{}\n{}",
        client.line, server.line
    );
    assert_stream(&events, client.conn, "write", b"seen without --pid");
    assert_stream(&events, server.conn, "read", b"seen without --pid");
    assert_stream(&events, server.conn, "write", b"reply \x00\xff");
    assert_stream(&events, client.conn, "read", b"reply \x00\xff");

    let agent_pid = agent.pid();
    let own: Vec<&str> = events
        .all
        .iter()
        .filter(|(value, _)| {
            value.get("pid").and_then(|p| p.as_u64()) == Some(u64::from(agent_pid))
                || value.get("local").and_then(|l| l.as_str()) == Some(metrics_addr.as_str())
        })
        .map(|(_, line)| line.as_str())
        .collect();
    assert!(
        own.is_empty(),
        "the agent (pid {agent_pid}, metrics on {metrics_addr}) reported itself:\n{}",
        own.join("\n")
    );
}

/// Ids of the eBPF programs process `pid` holds open (its fds' `prog_id` in fdinfo).
fn programs_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether the kernel still has program `id` (`bpftool prog show id ID` succeeds).
fn program_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("bpftool is needed for this test (cargo xtask setup installs it)")
        .success()
}

#[test]
fn sigterm_flushes_queued_spans_to_the_collector() {
    use tracer_e2e::otlp_receiver::{Protocol, Receiver};
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let (server, port, _www) = tracer_e2e::http_server("hello.txt", "hello\n");
    let pid = server.pid().to_string();
    let endpoint = receiver.endpoint();
    // Batches would leave only after a minute: whatever arrives came from the flush at exit.
    let mut agent = Agent::start_exporting(
        &[
            "--exporter",
            "otlp",
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-endpoint",
            &endpoint,
            "--pid",
            &pid,
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "60000")],
    );
    for _ in 0..5 {
        let (code, _) = tracer_e2e::http_get(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            "/hello.txt",
        )
        .expect("GET");
        assert_eq!(code, 200);
    }
    agent.wait_metric("tracer_spans_created_total", 5.0, STEP_TIMEOUT);
    assert!(
        receiver.spans().is_empty(),
        "nothing is sent before the batch delay"
    );
    let start = Instant::now();
    assert!(agent.stop().success(), "the agent exits cleanly on SIGTERM");
    let took = start.elapsed();
    let spans = receiver.spans();
    assert_eq!(spans.len(), 5, "every queued span is flushed at SIGTERM");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}

#[test]
fn a_sigkilled_agent_leaves_the_traced_process_working_and_nothing_loaded() {
    let (server, port, _www) = tracer_e2e::http_server("hello.txt", "hello\n");
    let pid = server.pid().to_string();
    let agent = Agent::start(&["--pid", &pid]);
    let agent_pid = agent.pid();
    let loaded = programs_of(agent_pid);
    assert!(!loaded.is_empty(), "the running agent holds its programs");
    assert!(
        program_exists(loaded[0]),
        "bpftool sees the agent's programs"
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(
        tracer_e2e::http_get(addr, "/hello.txt").expect("GET").0,
        200
    );
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(agent_pid as libc::pid_t, libc::SIGKILL) };
    drop(agent);
    // The kernel frees programs whose last reference (the agent's fds) is gone; nothing was
    // pinned, so none of them may remain.
    let freed = wait_until(Duration::from_secs(10), || {
        !loaded.iter().any(|id| program_exists(*id))
    });
    assert!(freed, "programs {loaded:?} outlived the killed agent");
    let pinned = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("tracer"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(pinned.is_empty(), "pinned objects left: {pinned:?}");
    for _ in 0..3 {
        assert_eq!(
            tracer_e2e::http_get(addr, "/hello.txt")
                .expect("GET after the kill")
                .0,
            200,
            "the traced server keeps serving"
        );
    }
}
