//! What the agent captures from real processes over real loopback sockets: bytes, tuples, roles.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use tracer_e2e::{
    Agent, Checks, Data, Events, Peer, STEP_TIMEOUT, TempDir, assert_stream, assert_tuple,
    data_summary, hex, stream_problem, tuple_problem,
};

/// A server that accepts one connection and plays rounds: read the client's message i (known
/// length), check it, send its own message i. Args: family (4|6), bind host, client messages,
/// server messages (hex, comma-separated), rounds before which to wait for a stdin line (-1:
/// before accept, the number of rounds: before close).
const ROUNDS_SERVER: &str = r#"
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
host = sys.argv[2]
cmsgs = [bytes.fromhex(m) for m in sys.argv[3].split(",")]
smsgs = [bytes.fromhex(m) for m in sys.argv[4].split(",")]
pauses = {int(r) for r in sys.argv[5].split(",") if r}
ls = socket.socket(fam, socket.SOCK_STREAM)
if fam == socket.AF_INET6:
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
ls.bind((host, 0))
ls.listen(1)
say("port", ls.getsockname()[1])
if -1 in pauses:
    wait()
conn, peer = ls.accept()
say("accepted", peer[1])
for i, (c, s) in enumerate(zip(cmsgs, smsgs)):
    if i in pauses:
        wait()
    got = recv_exact(conn, len(c))
    if got != c:
        sys.exit(f"server round {i}: got {got!r}, expected {c!r}")
    conn.sendall(s)
    say("round", i)
if len(cmsgs) in pauses:
    wait()
conn.close()
say("done")
"#;

/// The other side of [`ROUNDS_SERVER`]. Args: family, host, port, client messages, server
/// messages, pauses (-1: before connect, the number of rounds: before close).
const ROUNDS_CLIENT: &str = r#"
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
host, port = sys.argv[2], int(sys.argv[3])
cmsgs = [bytes.fromhex(m) for m in sys.argv[4].split(",")]
smsgs = [bytes.fromhex(m) for m in sys.argv[5].split(",")]
pauses = {int(r) for r in sys.argv[6].split(",") if r}
if -1 in pauses:
    wait()
c = socket.socket(fam, socket.SOCK_STREAM)
c.connect((host, port))
say("local", c.getsockname()[1])
for i, (cm, sm) in enumerate(zip(cmsgs, smsgs)):
    if i in pauses:
        wait()
    c.sendall(cm)
    got = recv_exact(c, len(sm))
    if got != sm:
        sys.exit(f"client round {i}: got {got!r}, expected {sm!r}")
    say("round", i)
if len(cmsgs) in pauses:
    wait()
c.close()
say("done")
"#;

fn hex_list(messages: &[&[u8]]) -> String {
    messages
        .iter()
        .map(|m| hex(m))
        .collect::<Vec<_>>()
        .join(",")
}

struct Exchange {
    server: Peer,
    client: Peer,
    port: u16,
}

impl Exchange {
    /// Starts both peers (not yet exchanging): the server listening on (`server_host`, 0), the
    /// client waiting to connect to (`client_host`, port).
    fn new(
        (server_family, server_host): (&str, &str),
        (client_family, client_host): (&str, &str),
        client_msgs: &[&[u8]],
        server_msgs: &[&[u8]],
        pauses: &str,
    ) -> Self {
        let (cm, sm) = (hex_list(client_msgs), hex_list(server_msgs));
        let mut server = Peer::python(
            "server",
            ROUNDS_SERVER,
            &[server_family, server_host, &cm, &sm, pauses],
        );
        let port: u16 = server.expect_num("port");
        let client = Peer::python(
            "client",
            ROUNDS_CLIENT,
            &[
                client_family,
                client_host,
                &port.to_string(),
                &cm,
                &sm,
                pauses,
            ],
        );
        Self {
            server,
            client,
            port,
        }
    }

    fn agent_args(&self) -> Vec<String> {
        vec![
            "--pid".into(),
            self.server.pid().to_string(),
            "--pid".into(),
            self.client.pid().to_string(),
        ]
    }
}

fn start_agent(args: &[String]) -> Agent {
    Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs a full exchange of `client_msgs`/`server_msgs` with both peers traced from before they
/// connect; returns the stopped agent's dump and (server pid, client pid, port, client port).
fn traced_exchange(
    server: (&str, &str),
    client: (&str, &str),
    client_msgs: &[&[u8]],
    server_msgs: &[&[u8]],
) -> (Agent, Events, u32, u32, u16, u16) {
    let mut ex = Exchange::new(server, client, client_msgs, server_msgs, "-1");
    let mut agent = start_agent(&ex.agent_args());
    ex.server.send("go");
    ex.client.send("go");
    let client_port: u16 = ex.client.expect_num("local");
    ex.client.expect("done");
    ex.server.expect("done");
    ex.client.finish();
    ex.server.finish();
    agent.stop_ok();
    let events = agent.events();
    let (spid, cpid) = (ex.server.pid(), ex.client.pid());
    (agent, events, spid, cpid, ex.port, client_port)
}

const CLIENT_MSGS: [&[u8]; 3] = [
    b"client hello\n",
    // Not UTF-8, with NULs and every high byte.
    b"\x00\xff\xfe\x80\xc3\x28 binary \x00\x01\x02\x03\xf0\x9f\x92",
    b"third client message, longer: 0123456789abcdefghijklmnopqrstuvwxyz0123456789",
];
const SERVER_MSGS: [&[u8]; 3] = [
    b"server reply one\r\n",
    b"\xde\xad\xbe\xef\x00\x00\xff\x7f\x80",
    b"server bye\n",
];

fn concat(messages: &[&[u8]]) -> Vec<u8> {
    messages.concat()
}

/// Checks both sides of a traced exchange: one connection each, tuple and role right, and the
/// four byte streams exactly what was sent.
fn assert_exchange(
    events: &Events,
    (server_pid, client_pid): (u32, u32),
    (server_local, server_remote): (&str, &str),
    client_msgs: &[&[u8]],
    server_msgs: &[&[u8]],
) {
    let (sent_by_client, sent_by_server) = (concat(client_msgs), concat(server_msgs));
    let server = events.conn_of(server_pid, "the accepted connection", |_| true);
    let client = events.conn_of(client_pid, "the connected socket", |_| true);
    let mut checks = Checks::default();
    checks.add(tuple_problem(server, "server", server_local, server_remote));
    checks.add(stream_problem(events, server.conn, "read", &sent_by_client));
    checks.add(stream_problem(
        events,
        server.conn,
        "write",
        &sent_by_server,
    ));
    checks.add(tuple_problem(client, "client", server_remote, server_local));
    checks.add(stream_problem(
        events,
        client.conn,
        "write",
        &sent_by_client,
    ));
    checks.add(stream_problem(events, client.conn, "read", &sent_by_server));
    checks.finish(&format!(
        "--- server conn ---\n{}\n--- client conn ---\n{}",
        events.lines_of(server.conn),
        events.lines_of(client.conn)
    ));
}

#[test]
fn tcp_exchange_is_captured_byte_for_byte_on_both_sides() {
    let (_agent, events, spid, cpid, port, cport) = traced_exchange(
        ("4", "127.0.0.1"),
        ("4", "127.0.0.1"),
        &CLIENT_MSGS,
        &SERVER_MSGS,
    );
    assert_exchange(
        &events,
        (spid, cpid),
        (&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{cport}")),
        &CLIENT_MSGS,
        &SERVER_MSGS,
    );
    // Each message is one sendall, and these are small: one data event per message.
    let client = events.conn_of(cpid, "the connected socket", |_| true);
    let writes = events.data_of(client.conn, "write");
    assert_eq!(
        writes.iter().map(|d| d.data.as_slice()).collect::<Vec<_>>(),
        CLIENT_MSGS.to_vec(),
        "one write event per client message\n{}",
        events.lines_of(client.conn)
    );
    assert!(
        writes.iter().all(|d| d.pid == cpid && d.tid == cpid),
        "writes not attributed to the client's pid/tid {cpid}\n{}",
        events.lines_of(client.conn)
    );
}

#[test]
fn ipv6_loopback_addresses_print_as_ipv6() {
    let (_agent, events, spid, cpid, port, cport) =
        traced_exchange(("6", "::1"), ("6", "::1"), &CLIENT_MSGS, &SERVER_MSGS);
    assert_exchange(
        &events,
        (spid, cpid),
        (&format!("[::1]:{port}"), &format!("[::1]:{cport}")),
        &CLIENT_MSGS,
        &SERVER_MSGS,
    );
}

#[test]
fn ipv4_client_of_dual_stack_server_prints_as_ipv4() {
    let (_agent, events, spid, cpid, port, cport) =
        traced_exchange(("6", "::"), ("4", "127.0.0.1"), &CLIENT_MSGS, &SERVER_MSGS);
    assert_exchange(
        &events,
        (spid, cpid),
        (&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{cport}")),
        &CLIENT_MSGS,
        &SERVER_MSGS,
    );
}

/// A writev of several iovecs, one of them straddling a 4 KiB chunk boundary, is one data
/// event carrying every byte in order (the probes pack iovecs into chunks).
#[test]
fn writev_of_several_iovecs_is_captured_whole() {
    let script = r#"
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
c = socket.create_connection(srv.getsockname())
s, _ = srv.accept()
say("ready")
wait()
parts = [b"HTTP/1.1 200 OK\r\n", b"Content-Length: 5125\r\n\r\n", bytes(range(256)) * 20, b"", b"tail!"]
n = os.writev(s.fileno(), parts)
got = recv_exact(c, n)
say("sent", n)
wait()
"#;
    let mut peer = Peer::python("writev", script, &[]);
    assert_eq!(peer.expect("ready"), "");
    let pid = peer.pid();
    let mut agent = start_agent(&["--pid".to_owned(), pid.to_string()]);
    peer.send("go");
    let sent: u64 = peer.expect_num("sent");
    let mut expected = b"HTTP/1.1 200 OK\r\nContent-Length: 5125\r\n\r\n".to_vec();
    for _ in 0..20 {
        expected.extend(0..=255u8);
    }
    expected.extend_from_slice(b"tail!");
    assert_eq!(sent, expected.len() as u64);
    let events = agent.wait_events("the writev and its read", STEP_TIMEOUT, |events| {
        events.data.iter().any(|d| d.syscall == "writev")
            && events
                .data
                .iter()
                .filter(|d| d.direction == "read")
                .map(|d| d.len)
                .sum::<u64>()
                >= sent
    });
    let writes: Vec<&Data> = events
        .data
        .iter()
        .filter(|d| d.pid == pid && d.direction == "write")
        .collect();
    assert_eq!(
        writes.len(),
        1,
        "one writev, one event:\n{}",
        agent.report()
    );
    let write = writes[0];
    assert_eq!(write.syscall, "writev");
    assert_eq!((write.len, write.captured), (sent, sent));
    assert!(!write.truncated);
    assert!(
        write.data == expected,
        "writev bytes differ:\n{}",
        write.line
    );
    let read = events.stream(
        events
            .data
            .iter()
            .find(|d| d.pid == pid && d.direction == "read")
            .expect("the read side")
            .conn,
        "read",
    );
    assert_eq!(read.map(|s| s.bytes), Ok(expected));
    peer.send("go");
    agent.stop_ok();
}

#[test]
fn keep_alive_connection_opened_before_the_agent() {
    keep_alive_exchange(true, "4");
}

/// The same over IPv6: the probes read the socket's IPv6 addresses.
#[test]
fn ipv6_keep_alive_connection_opened_before_the_agent() {
    keep_alive_exchange(true, "6");
}

/// The same, but both sides close and exit right after the later exchange, as a client making
/// its last request on a pooled connection does: what the agent reports must not depend on
/// the connection still being open when it gets to it.
#[test]
fn keep_alive_connection_opened_before_the_agent_then_closed() {
    keep_alive_exchange(false, "4");
}

/// `family` "4" runs over 127.0.0.1, "6" over ::1.
fn keep_alive_exchange(hold_open: bool, family: &str) {
    let loopback = if family == "6" { "::1" } else { "127.0.0.1" };
    let before: [&[u8]; 2] = [b"request before the agent\n", b"reply before the agent\n"];
    let after: [&[u8]; 2] = [
        b"request after the agent started \x00\xff\x10\n",
        b"reply after the agent started \xfe\x01\n",
    ];
    // Round 0 runs at once; both sides then wait (not blocked in a read) until told to go on,
    // and with `hold_open` keep the connection open after round 1 until the agent reported it.
    let mut ex = Exchange::new(
        (family, loopback),
        (family, loopback),
        &[before[0], after[0]],
        &[before[1], after[1]],
        if hold_open { "1,2" } else { "1" },
    );
    let client_port: u16 = ex.client.expect_num("local");
    assert_eq!(ex.client.expect("round"), "0");
    assert_eq!(ex.server.expect("round"), "0");

    let mut agent = start_agent(&ex.agent_args());
    ex.server.send("go");
    ex.client.send("go");
    assert_eq!(ex.client.expect("round"), "1");
    assert_eq!(ex.server.expect("round"), "1");
    let (spid, cpid) = (ex.server.pid(), ex.client.pid());
    if hold_open {
        agent.wait_events("both sides' reads of round 1", STEP_TIMEOUT, |events| {
            [(spid, after[0]), (cpid, after[1])]
                .iter()
                .all(|(pid, bytes)| {
                    events
                        .data
                        .iter()
                        .any(|d| d.pid == *pid && d.direction == "read" && d.data.ends_with(bytes))
                })
        });
        ex.server.send("go");
        ex.client.send("go");
    }
    ex.client.expect("done");
    ex.server.expect("done");
    ex.client.finish();
    ex.server.finish();
    agent.stop_ok();
    let events = agent.events();

    let host = if family == "6" { "[::1]" } else { "127.0.0.1" };
    let (server_addr, client_addr) = (
        format!("{host}:{}", ex.port),
        format!("{host}:{client_port}"),
    );
    let mut checks = Checks::default();
    let mut context = String::new();
    for (pid, role, local, remote, wrote, read) in [
        (
            spid,
            "server",
            &server_addr,
            &client_addr,
            after[1],
            after[0],
        ),
        (
            cpid,
            "client",
            &client_addr,
            &server_addr,
            after[0],
            after[1],
        ),
    ] {
        let open = events.conn_of(pid, "the pre-existing connection", |_| true);
        context += &format!("--- {role} conn ---\n{}\n", events.lines_of(open.conn));
        checks.add(tuple_problem(open, role, local, remote));
        // The probes read the tuple from the socket at its first syscall (or, without the
        // kernel's BTF, from tcp_rcv_space_adjust), so it never depends on /proc in time.
        checks.add(
            (open.tuple_source != "kernel")
                .then(|| format!("{role}: tuple_source should be kernel: {}", open.line)),
        );
        // Where positions start for a connection older than the agent is the agent's choice;
        // the bytes seen from there on must be exactly the later exchange.
        for (direction, expected) in [("write", wrote), ("read", read)] {
            checks.add(match events.stream(open.conn, direction) {
                Err(err) => Some(err),
                Ok(stream) if stream.bytes == expected => None,
                Ok(stream) => Some(format!(
                    "{role} {direction}: expected {}, got {} (from pos {})",
                    hex(expected),
                    hex(&stream.bytes),
                    stream.start
                )),
            });
        }
    }
    checks.finish(&context);
}

#[test]
fn forked_child_of_traced_server_is_traced() {
    // The parent accepts, the child (forked after the agent started) serves the connection.
    const FORKING_SERVER: &str = r#"
ls = listener(4)
say("port", ls.getsockname()[1])
conn, peer = ls.accept()
child = os.fork()
if child == 0:
    ls.close()
    req = recv_exact(conn, int(sys.argv[1]))
    conn.sendall(b"reply from child " + str(os.getpid()).encode() + b" to " + req)
    conn.close()
    os._exit(0)
conn.close()
say("child", child)
_, status = os.waitpid(child, 0)
say("done", status)
"#;
    let request: &[u8] = b"request to the forking server \x00\xff\n";
    let mut server = Peer::python(
        "forking server",
        FORKING_SERVER,
        &[&request.len().to_string()],
    );
    let port: u16 = server.expect_num("port");
    let parent = server.pid();
    let mut agent = Agent::start(&["--pid", &parent.to_string()]);

    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to forking server");
    stream.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let client_port = stream.local_addr().unwrap().port();
    let child: u32 = server.expect_num("child");
    stream.write_all(request).expect("send request");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("read reply");
    let expected_reply = [format!("reply from child {child} to ").as_bytes(), request].concat();
    assert_eq!(reply, expected_reply, "the peer itself misbehaved");
    assert_eq!(server.expect("done"), "0");
    server.finish();
    agent.stop_ok();
    let events = agent.events();

    let mut conns: Vec<u64> = events
        .data
        .iter()
        .filter(|d| d.pid == child)
        .map(|d| d.conn)
        .collect();
    conns.sort_unstable();
    conns.dedup();
    assert!(
        conns.len() == 1,
        "expected the child's (pid {child}) reads and writes on one connection, got conns \
         {conns:?}\n--- parent {parent} ---\n{}\n--- child {child} ---\n{}\n{}",
        events.lines_of_pid(parent),
        events.lines_of_pid(child),
        data_summary(&events)
    );
    let conn = conns[0];
    let open = events
        .open(conn)
        .unwrap_or_else(|| panic!("no open event for conn {conn}\n{}", events.lines_of(conn)));
    assert_tuple(
        open,
        "server",
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{client_port}"),
    );
    assert_stream(&events, conn, "read", request);
    assert_stream(&events, conn, "write", &expected_reply);
    let others: Vec<_> = events
        .data
        .iter()
        .filter(|d| d.conn == conn && d.pid != child)
        .map(|d| d.line.as_str())
        .collect();
    assert!(
        others.is_empty(),
        "only the child (pid {child}) read or wrote this connection, yet:\n{}",
        others.join("\n")
    );
}

#[test]
fn curl_against_python_http_server() {
    let body = "hello from the e2e test\n";
    let (server, port, _dir) = tracer_e2e::http_server("hello.txt", body);

    // A shell that execs curl when told: the pid exists before the agent starts, so it can be
    // named with --pid, and stays the same through exec.
    let url = format!("http://127.0.0.1:{port}/hello.txt");
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "read go && exec curl -sS --max-time 10 -w '\\nlocal_port %{local_port}\\n' \"$0\"",
        url.as_str(),
    ]);
    let mut curl = Peer::spawn("curl", cmd);
    let mut agent = Agent::start(&[
        "--pid",
        &server.pid().to_string(),
        "--pid",
        &curl.pid().to_string(),
    ]);
    curl.send("go");
    assert_eq!(curl.line(), body.trim_end(), "curl's output");
    let client_port: u16 = curl.expect_num("local_port");
    curl.finish();
    // The server handles the request in a thread; wait until its reply is in the dump.
    let spid = server.pid();
    agent.wait_events("the server's reply", STEP_TIMEOUT, |events| {
        events
            .data
            .iter()
            .any(|d| d.pid == spid && d.direction == "write" && d.data.ends_with(body.as_bytes()))
    });
    agent.stop_ok();
    let events = agent.events();

    let srv = events.conn_of(spid, "the accepted connection", |_| true);
    let cli = events.conn_of(curl.pid(), "curl's connection", |_| true);
    let (server_addr, client_addr) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{client_port}"),
    );
    assert_tuple(srv, "server", &server_addr, &client_addr);
    assert_tuple(cli, "client", &client_addr, &server_addr);
    assert_eq!(cli.exe, "curl", "exe after exec: {}", cli.line);

    let stream = |conn: u64, direction: &str| {
        events
            .stream(conn, direction)
            .unwrap_or_else(|err| panic!("{err}\n--- conn {conn} ---\n{}", events.lines_of(conn)))
            .bytes
    };
    let request = stream(srv.conn, "read");
    let response = stream(srv.conn, "write");
    let text = String::from_utf8_lossy(&request);
    assert!(
        text.starts_with("GET /hello.txt HTTP/1.1\r\n"),
        "server read: {text:?}"
    );
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.starts_with("HTTP/1.0 200 ") && text.ends_with(body),
        "server write: {text:?}"
    );
    // What one side wrote is exactly what the other read.
    assert_stream(&events, cli.conn, "write", &request);
    assert_stream(&events, cli.conn, "read", &response);
}

#[test]
fn one_mebibyte_write_is_reported_whole_and_truncated() {
    const SIZE: usize = 1 << 20;
    const LIMIT: u64 = 16384; // the default --capture-limit
    const RECEIVER: &str = r#"
size = int(sys.argv[1])
ls = listener()
say("port", ls.getsockname()[1])
wait()
conn, _ = ls.accept()
total = 0
while total < size:
    chunk = conn.recv(1 << 20)
    if not chunk:
        sys.exit(f"EOF after {total} bytes")
    total += len(chunk)
conn.sendall(b"ok")
conn.close()
say("done", total)
"#;
    const SENDER: &str = r#"
port, size = int(sys.argv[1]), int(sys.argv[2])
payload = (bytes(range(251)) * (size // 251 + 1))[:size]
wait()
c = socket.create_connection(("127.0.0.1", port))
c.sendall(payload)
if recv_exact(c, 2) != b"ok":
    sys.exit("no ok")
c.close()
say("done")
"#;
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let mut receiver = Peer::python("receiver", RECEIVER, &[&SIZE.to_string()]);
    let port: u16 = receiver.expect_num("port");
    let mut sender = Peer::python("sender", SENDER, &[&port.to_string(), &SIZE.to_string()]);
    let mut agent = Agent::start(&[
        "--pid",
        &receiver.pid().to_string(),
        "--pid",
        &sender.pid().to_string(),
    ]);
    receiver.send("go");
    sender.send("go");
    sender.expect("done");
    assert_eq!(receiver.expect("done"), SIZE.to_string());
    sender.finish();
    receiver.finish();
    // The agent is still up and ready after digesting the burst.
    std::thread::sleep(Duration::from_millis(300));
    agent.assert_running();
    assert_eq!(agent.readyz(), 200, "readyz after the 1 MiB transfer");
    let not_captured = agent.metric("tracer_bytes_not_captured_total");
    agent.stop_ok();
    let events = agent.events();

    let writer = events.conn_of(sender.pid(), "the sender's connection", |_| true);
    let reader = events.conn_of(receiver.pid(), "the receiver's connection", |_| true);
    for (open, direction) in [(writer, "write"), (reader, "read")] {
        let data = events.data_of(open.conn, direction);
        let context = || {
            format!(
                "{direction} events of conn {}:\n{}",
                open.conn,
                data.iter()
                    .map(|d| tracer_e2e::shorten_line(&d.line))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        };
        let total: u64 = data.iter().map(|d| d.len).sum();
        assert_eq!(total, SIZE as u64, "sum of len\n{}", context());
        let mut next = 0;
        for d in &data {
            assert_eq!(
                d.pos,
                next,
                "positions must follow each other\n{}",
                context()
            );
            next += d.len;
            if d.len > LIMIT {
                assert!(
                    d.truncated && d.captured <= LIMIT,
                    "a {} B syscall must be truncated to at most {LIMIT} B: {}",
                    d.len,
                    tracer_e2e::shorten_line(&d.line)
                );
            } else {
                assert!(
                    !d.truncated && d.captured == d.len,
                    "a {} B syscall fits the capture limit: {}",
                    d.len,
                    tracer_e2e::shorten_line(&d.line)
                );
            }
            let at = d.pos as usize;
            assert!(
                d.data.as_slice() == &pattern[at..at + d.data.len()],
                "captured bytes differ from what was sent at pos {at}: {}",
                tracer_e2e::shorten_line(&d.line)
            );
        }
    }
    assert_stream(&events, writer.conn, "read", b"ok");
    assert_stream(&events, reader.conn, "write", b"ok");
    let close = events.close_of(writer.conn).unwrap_or_else(|| {
        panic!(
            "no close event for the sender's connection\n{}",
            events.lines_of(writer.conn)
        )
    });
    assert!(
        close.sent == SIZE as u64 && close.received == 2,
        "close should count {SIZE} B sent and 2 received: {}",
        close.line
    );
    assert!(
        not_captured > 0.0,
        "tracer_bytes_not_captured_total should count the truncated bytes, is {not_captured}"
    );
}

#[test]
fn file_pipe_and_unix_socket_io_is_not_reported() {
    const SCRIPT: &str = r#"
marker = sys.argv[1].encode()
path = sys.argv[2]
def files_and_pipes():
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, marker)
    os.lseek(fd, 0, os.SEEK_SET)
    assert os.read(fd, 1000) == marker
    os.close(fd)
    r, w = os.pipe()
    os.write(w, marker)
    assert os.read(r, 1000) == marker
    os.close(r); os.close(w)
    a, b = socket.socketpair()
    a.sendall(marker)
    assert b.recv(1000) == marker
    a.close(); b.close()
wait()
files_and_pipes()
ls = listener()
c, s = loopback_pair(ls)
c.sendall(b"tcp request")
assert recv_exact(s, 11) == b"tcp request"
s.sendall(b"tcp reply")
assert recv_exact(c, 9) == b"tcp reply"
files_and_pipes()
# A file opened on the number of a just-closed socket is still a file.
freed = c.fileno()
c.close()
fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
say("reused", fd == freed)
os.write(fd, marker)
os.close(fd)
s.close(); ls.close()
say("done")
"#;
    let dir = TempDir::new("files");
    let marker = "MARKER-not-a-socket-7f3a9c";
    let file = dir.path().join("marker.txt");
    let mut peer = Peer::python("file/pipe peer", SCRIPT, &[marker, file.to_str().unwrap()]);
    let mut agent = Agent::start(&["--pid", &peer.pid().to_string()]);
    peer.send("go");
    assert_eq!(
        peer.expect("reused"),
        "True",
        "the file did not reuse the fd"
    );
    peer.expect("done");
    peer.finish();
    agent.stop_ok();
    let events = agent.events();
    let pid = peer.pid();

    // The TCP exchange is there: the agent did trace this process.
    let client = events.conn_of(pid, "the TCP client", |o| o.role == "client");
    assert_stream(&events, client.conn, "write", b"tcp request");
    assert_stream(&events, client.conn, "read", b"tcp reply");

    let leaked: Vec<String> = events
        .data
        .iter()
        .filter(|d| d.data.windows(marker.len()).any(|w| w == marker.as_bytes()))
        .map(|d| tracer_e2e::shorten_line(&d.line))
        .collect();
    assert!(
        leaked.is_empty(),
        "file, pipe or unix-socket bytes reported as socket data:\n{}",
        leaked.join("\n")
    );
    for d in &events.data {
        let open = events.open(d.conn);
        assert!(
            open.is_some_and(|o| o.local_addr().is_some() && o.remote_addr().is_some()),
            "data event whose connection has no open event with a TCP tuple: {}\nopen: {:?}",
            tracer_e2e::shorten_line(&d.line),
            open.map(|o| &o.line)
        );
    }
}

/// Bytes moved by a syscall whose buffers the probes cannot read (splice from a pipe into the
/// socket) are a counted gap of the right length, not silently missing: the writes after them
/// keep their byte positions, and the reading side, an ordinary recv, has every byte.
#[test]
fn spliced_bytes_are_a_counted_gap_and_later_writes_keep_their_place() {
    const SPLICER: &str = r#"
ls = listener()
c, s = loopback_pair(ls)
wait()
body = b"spliced body " * 10
c.sendall(b"head ")
r, w = os.pipe()
os.write(w, body)
n = 0
while n < len(body):
    n += os.splice(r, c.fileno(), len(body) - n)
c.sendall(b"tail")
got = recv_exact(s, 5 + len(body) + 4)
say("spliced", n)
wait()
c.close(); s.close()
say("done")
"#;
    let body = b"spliced body ".repeat(10);
    let mut peer = Peer::python("splicer", SPLICER, &[]);
    let pid = peer.pid();
    let mut agent = Agent::start(&["--pid", &pid.to_string()]);
    let unfollowed = r#"tracer_kernel_lost_events_total{reason="unfollowed_syscall"}"#;
    let before = agent.metric(unfollowed);
    peer.send("go");
    assert_eq!(peer.expect_num::<usize>("spliced"), body.len());
    assert!(
        tracer_e2e::wait_until(STEP_TIMEOUT, || agent.metric(unfollowed) > before),
        "the splice was not counted"
    );
    let counted = agent.metric(unfollowed) - before;
    peer.send("go");
    peer.expect("done");
    peer.finish();
    agent.stop_ok();
    let events = agent.events();

    let client = events.conn_of(pid, "the connecting socket", |o| o.role == "client");
    let server = events.conn_of(pid, "the accepted socket", |o| o.role == "server");
    let writes = events.data_of(client.conn, "write");
    let lines = events.lines_of(client.conn);
    let gaps: Vec<&Data> = writes.iter().filter(|d| d.syscall == "other").collect();
    assert_eq!(
        gaps.len() as f64,
        counted,
        "one count per gap event\n{lines}"
    );
    assert!(
        gaps.iter()
            .all(|d| d.captured == 0 && d.truncated && d.data.is_empty()),
        "a gap carries no bytes\n{lines}"
    );
    assert_eq!(gaps.first().map(|d| d.pos), Some(5), "{lines}");
    assert_eq!(
        gaps.iter().map(|d| d.len).sum::<u64>(),
        body.len() as u64,
        "{lines}"
    );
    let tail = writes
        .iter()
        .find(|d| d.data == b"tail")
        .unwrap_or_else(|| panic!("no write of the tail\n{lines}"));
    assert_eq!(tail.pos, 5 + body.len() as u64, "{lines}");
    assert_stream(
        &events,
        server.conn,
        "read",
        &[&b"head "[..], &body, b"tail"].concat(),
    );
}

/// The kernel follows at most `--max-connections` connections. Beyond that a connection's
/// reads and writes are counted, byte for byte, instead of captured; a connection the kernel
/// frees makes room again, so later connections are followed (no entry leaks).
#[test]
fn connections_beyond_max_connections_are_counted_and_closed_ones_make_room() {
    const PAIRS: &str = r#"
ls = listener(64)
def exchange(first, count):
    pairs = []
    for i in range(first, first + count):
        c, s = loopback_pair(ls)
        msg = b"pair %02d " % i * 16
        c.sendall(msg)
        recv_exact(s, len(msg))
        pairs.append((c, s))
        say("port", c.getsockname()[1])
    return pairs
wait()
pairs = exchange(0, 12)
say("filled")
wait()
for c, s in pairs:
    c.close(); s.close()
say("closed")
wait()
later = exchange(12, 4)
say("again")
wait()
say("done")
"#;
    // Each pair is two connections: the client socket's write and the accepted one's read.
    // Eight entries take the first four pairs; the next eight pairs do not fit.
    const MSG_LEN: f64 = 128.0;
    let msg = |i: usize| format!("pair {i:02} ").repeat(16).into_bytes();
    let mut peer = Peer::python("pairs", PAIRS, &[]);
    let pid = peer.pid();
    let mut agent = Agent::start(&["--pid", &pid.to_string(), "--max-connections", "8"]);
    let full = r#"tracer_kernel_lost_events_total{reason="conn_map_full"}"#;
    let not_captured = "tracer_bytes_not_captured_total";
    let (full_before, bytes_before) = (agent.metric(full), agent.metric(not_captured));
    let mut ports = Vec::new();
    peer.send("go");
    for _ in 0..12 {
        ports.push(peer.expect_num::<u16>("port"));
    }
    peer.expect("filled");
    let lost_bytes = 8.0 * 2.0 * MSG_LEN;
    assert!(
        tracer_e2e::wait_until(STEP_TIMEOUT, || {
            agent.metric(not_captured) - bytes_before >= lost_bytes
        }),
        "the connections beyond the limit were not counted: {} bytes",
        agent.metric(not_captured) - bytes_before
    );
    let full_after = agent.metric(full);
    assert!(
        full_after - full_before >= 16.0,
        "one count per read or write refused, 16 at least: {}",
        full_after - full_before
    );

    peer.send("go");
    peer.expect("closed");
    assert!(
        tracer_e2e::wait_until(STEP_TIMEOUT, || {
            agent.metric("tracer_connections_tracked") == 0.0
        }),
        "the closed connections did not end"
    );
    peer.send("go");
    for _ in 0..4 {
        ports.push(peer.expect_num::<u16>("port"));
    }
    peer.expect("again");
    peer.send("go");
    peer.expect("done");
    peer.finish();
    // Settled: the counts are exact, and the later pairs fit where the closed ones were.
    assert_eq!(agent.metric(not_captured) - bytes_before, lost_bytes);
    assert_eq!(agent.metric(full), full_after);
    agent.stop_ok();
    let events = agent.events();
    for (i, &port) in ports.iter().enumerate() {
        let of_port = |o: &tracer_e2e::Open| o.local_addr().is_some_and(|a| a.port() == port);
        let to_port = |o: &tracer_e2e::Open| o.remote_addr().is_some_and(|a| a.port() == port);
        if (4..12).contains(&i) {
            assert!(
                !events
                    .opens_of(pid)
                    .into_iter()
                    .any(|o| of_port(o) || to_port(o)),
                "pair {i} is beyond the limit, yet followed\n{}",
                events.lines_of_pid(pid)
            );
            continue;
        }
        let client = events.conn_of(pid, &format!("pair {i}'s client"), of_port);
        assert_stream(&events, client.conn, "write", &msg(i));
        let server = events.conn_of(pid, &format!("pair {i}'s server"), to_port);
        assert_stream(&events, server.conn, "read", &msg(i));
    }
}

/// A half-closed client (`shutdown(SHUT_WR)`) that reads the response only after the server
/// has closed: TCP has closed its socket by then (FIN both ways), yet the read still belongs
/// to the same connection, which ends when the socket is freed.
#[test]
fn a_response_read_after_both_fins_stays_on_its_connection() {
    const HALF_CLOSE: &str = r#"
ls = listener()
c, s = loopback_pair(ls)
wait()
c.sendall(b"question")
c.shutdown(socket.SHUT_WR)
got = recv_to_eof(s, 100)
s.sendall(b"answer after " + got)
s.close()
time.sleep(0.2)
say("server closed")
wait()
reply = recv_to_eof(c, 100)
say("reply", reply.decode())
c.close()
say("done")
"#;
    let mut peer = Peer::python("half-close", HALF_CLOSE, &[]);
    let pid = peer.pid();
    let mut agent = Agent::start(&["--pid", &pid.to_string()]);
    peer.send("go");
    peer.expect("server closed");
    peer.send("go");
    assert_eq!(peer.expect("reply"), "answer after question");
    peer.expect("done");
    peer.finish();
    assert!(
        tracer_e2e::wait_until(STEP_TIMEOUT, || {
            agent.metric("tracer_connections_tracked") == 0.0
        }),
        "the connections did not end"
    );
    agent.stop_ok();
    let events = agent.events();
    let client = events.conn_of(pid, "the half-closed client", |o| o.role == "client");
    assert_stream(&events, client.conn, "write", b"question");
    assert_stream(&events, client.conn, "read", b"answer after question");
    let server = events.conn_of(pid, "the accepted socket", |o| o.role == "server");
    assert_stream(&events, server.conn, "read", b"question");
    assert!(
        events.close_of(client.conn).is_some(),
        "{}",
        events.lines_of(client.conn)
    );
}

/// A socket disconnected with connect(AF_UNSPEC) and connected again is two connections: the
/// second does not continue the first's byte positions or take its tuple.
#[test]
fn a_socket_that_connects_again_starts_a_new_connection() {
    const RECONNECT: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
one = socket.socket(); one.bind(("127.0.0.1", 0)); one.listen(1)
two = socket.socket(); two.bind(("127.0.0.1", 0)); two.listen(1)
c = socket.socket()
wait()
c.connect(one.getsockname())
s1, _ = one.accept()
c.sendall(b"to the first")
recv_exact(s1, 12)
unspec = (ctypes.c_ubyte * 16)()
if libc.connect(c.fileno(), unspec, 16) != 0:
    raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
c.connect(two.getsockname())
s2, _ = two.accept()
c.sendall(b"to the second")
recv_exact(s2, 13)
say("ports", one.getsockname()[1], two.getsockname()[1])
wait()
c.close(); s1.close(); s2.close()
say("done")
"#;
    let mut peer = Peer::python("reconnect", RECONNECT, &[]);
    let pid = peer.pid();
    let mut agent = Agent::start(&["--pid", &pid.to_string()]);
    peer.send("go");
    let ports: Vec<u16> = peer
        .expect("ports")
        .split_whitespace()
        .map(|p| p.parse().expect("a port"))
        .collect();
    peer.send("go");
    peer.expect("done");
    peer.finish();
    agent.stop_ok();
    let events = agent.events();
    let to = |port: u16| {
        move |o: &tracer_e2e::Open| {
            o.role == "client" && o.remote_addr().is_some_and(|a| a.port() == port)
        }
    };
    let first = events.conn_of(pid, "the first connection", to(ports[0]));
    let second = events.conn_of(pid, "the second connection", to(ports[1]));
    assert_stream(&events, first.conn, "write", b"to the first");
    assert_stream(&events, second.conn, "write", b"to the second");
    assert!(
        events.close_of(first.conn).is_some(),
        "the first connection ended\n{}",
        events.lines_of(first.conn)
    );
}
