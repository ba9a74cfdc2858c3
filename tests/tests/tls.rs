//! TLS end to end: the real agent puts uprobes on the real OpenSSL (Debian's libssl.so.3) of
//! real processes (curl, a Python `ssl` server with a certificate this test makes), and its
//! spans and dump show the plaintext HTTP, never the ciphertext.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use tracer_e2e::{
    Agent, Checks, Peer, STEP_TIMEOUT, TempDir, nginx_proxy,
    otlp_receiver::{KIND_CLIENT, KIND_SERVER, Protocol, ReceivedSpan, Receiver, summaries},
    python, wait_for_listen, wait_until,
};

const SPAN_WAIT: Duration = Duration::from_secs(20);
const BODY: &str = "hello over TLS\n";
const LIBSSL: &str = "/usr/lib/x86_64-linux-gnu/libssl.so.3";

/// A self-signed certificate and key for 127.0.0.1, made with the openssl command.
fn certificate(dir: &Path) {
    let status = Command::new("openssl")
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
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the openssl command is needed to make the test certificate");
    assert!(status.success(), "openssl req failed: {status}");
}

/// An HTTPS server (Python's http.server behind `ssl`, HTTP/1.1 keep-alive) serving /hello
/// from `dir`, which holds the certificate. Prints `port N` once listening.
const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = open(sys.argv[2], "rb").read() if self.path == "/hello" else b"not found\n"
        self.send_response(200 if self.path == "/hello" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1] + "/cert.pem", sys.argv[1] + "/key.pem")
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("port", server.server_address[1], flush=True)
server.serve_forever()
"#;

/// Starts the HTTPS server as `python3 -u <dir>/<script_name> <dir> <dir>/hello.txt` (a script
/// file, so `--exe` can select it by name). Returns it and its port.
fn https_server(dir: &TempDir, script_name: &str) -> (Peer, u16) {
    https_server_with(dir, script_name, &[])
}

/// [`https_server`] with more environment variables.
fn https_server_with(dir: &TempDir, script_name: &str, env: &[(&str, &Path)]) -> (Peer, u16) {
    fs::write(dir.path().join("hello.txt"), BODY).expect("write hello.txt");
    let script = dir.path().join(script_name);
    fs::write(&script, HTTPS_SERVER).expect("write the server script");
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(&script)
        .arg(dir.path())
        .arg(dir.path().join("hello.txt"))
        .envs(env.iter().copied());
    let mut server = Peer::spawn("https server", cmd);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    (server, port)
}

/// curl, waiting for a line on stdin before it runs (so the agent can be started first and
/// given its pid), then fetching `urls` over one connection.
fn curl(urls: &[String]) -> Peer {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "read go && exec curl \"$@\"", "curl"])
        .args([
            "-sS",
            "-k",
            "--max-time",
            "10",
            "-w",
            "result %{http_code}\\n",
        ])
        .args(urls);
    Peer::spawn("curl", cmd)
}

fn curl_ok(curl: &mut Peer, n: usize) {
    for _ in 0..n {
        let line = curl.expect("result");
        assert_eq!(line.trim(), "200", "curl got {line}\n{}", curl.output());
    }
}

fn exporting_agent(receiver: &Receiver, args: &[&str]) -> Agent {
    let endpoint = receiver.endpoint();
    let mut full = vec![
        "--exporter",
        "otlp",
        "--otlp-protocol",
        receiver.protocol.flag(),
        "--otlp-endpoint",
        endpoint.as_str(),
    ];
    full.extend(args);
    Agent::start_exporting(&full, &[])
}

fn of(spans: &[ReceivedSpan], kind: i32, pid: u32) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.span.kind == kind && s.pid() == Some(pid))
        .collect()
}

fn check<T: PartialEq + std::fmt::Debug>(checks: &mut Checks, what: &str, got: T, want: T) {
    checks.add((got != want).then(|| format!("{what}: expected {want:?}, got {got:?}")));
}

fn skip_without_libssl() -> bool {
    if Path::new(LIBSSL).exists() {
        return false;
    }
    eprintln!("skipped: {LIBSSL} is not installed");
    true
}

/// curl -> Python ssl server, both traced: one CLIENT span on curl and one SERVER span on the
/// server per request, with https, the path, the status and the real addresses; the
/// connections carry no ciphertext in the dump.
#[test]
fn curl_https_to_python_ssl_server_gives_https_spans() {
    if skip_without_libssl() {
        return;
    }
    let dir = TempDir::new("tls");
    certificate(dir.path());
    let (server, port) = https_server(&dir, "https_server.py");
    let urls = vec![
        format!("https://127.0.0.1:{port}/hello"),
        format!("https://127.0.0.1:{port}/missing"),
    ];
    let mut curl = curl(&urls);
    let receiver = Receiver::start(Protocol::Grpc);
    let (spid, cpid) = (server.pid(), curl.pid());
    let (spid_text, cpid_text) = (spid.to_string(), cpid.to_string());
    let mut agent = exporting_agent(&receiver, &["--pid", &spid_text, "--pid", &cpid_text]);

    curl.send("go");
    curl_ok(&mut curl, 1);
    let line = curl.expect("result");
    assert_eq!(line.trim(), "404", "curl got {line}");
    curl.finish();
    receiver.wait_spans("two SERVER and two CLIENT spans", SPAN_WAIT, |s| {
        of(s, KIND_SERVER, spid).len() >= 2 && of(s, KIND_CLIENT, cpid).len() >= 2
    });
    let metrics = agent.metrics();
    agent.stop_ok();
    let spans = receiver.spans();
    let mut checks = Checks::default();
    check(&mut checks, "span count", spans.len(), 4);
    let mut servers = of(&spans, KIND_SERVER, spid);
    servers.sort_by_key(|s| s.start_ns());
    let mut clients = of(&spans, KIND_CLIENT, cpid);
    clients.sort_by_key(|s| s.start_ns());
    for (i, (path, status)) in [("/hello", 200), ("/missing", 404)].into_iter().enumerate() {
        let (Some(s), Some(c)) = (servers.get(i), clients.get(i)) else {
            break;
        };
        check(
            &mut checks,
            "server url.scheme",
            s.str("url.scheme"),
            Some("https"),
        );
        check(
            &mut checks,
            "server url.path",
            s.str("url.path"),
            Some(path),
        );
        check(
            &mut checks,
            "server status",
            s.int("http.response.status_code"),
            Some(status),
        );
        check(
            &mut checks,
            "server server.port",
            s.int("server.port"),
            Some(i64::from(port)),
        );
        check(
            &mut checks,
            "server network.protocol.version",
            s.str("network.protocol.version"),
            Some("1.1"),
        );
        let full = format!("https://127.0.0.1:{port}{path}");
        check(
            &mut checks,
            "client url.full",
            c.str("url.full"),
            Some(&full),
        );
        check(
            &mut checks,
            "client status",
            c.int("http.response.status_code"),
            Some(status),
        );
        check(
            &mut checks,
            "client network.peer.port",
            c.int("network.peer.port"),
            Some(i64::from(port)),
        );
    }
    let files = tracer_e2e::metric_value(&metrics, "tracer_tls_total{event=\"files_attached\"}");
    checks.add(
        (files.unwrap_or(0.0) < 1.0).then(|| format!("tracer_tls_total files_attached {files:?}")),
    );
    let cipher = tracer_e2e::metric_value(&metrics, "tracer_tls_total{event=\"ciphertext_bytes\"}");
    checks.add(
        (cipher.unwrap_or(0.0) < 1000.0)
            .then(|| format!("ciphertext bytes kept out: {cipher:?} (a handshake is several kB)")),
    );
    checks.finish(&format!("every span:\n{}", summaries(&spans)));
}

/// The dump of a traced HTTPS server: its connection is marked TLS, and what it read and wrote
/// is the plaintext request and response, by SSL_read/SSL_write, with no ciphertext at all.
#[test]
fn dump_shows_plaintext_and_no_ciphertext() {
    if skip_without_libssl() {
        return;
    }
    let dir = TempDir::new("tls");
    certificate(dir.path());
    let (server, port) = https_server(&dir, "https_server.py");
    let spid = server.pid();
    let mut agent = Agent::start(&["--pid", &spid.to_string()]);
    let mut curl = curl(&[format!("https://127.0.0.1:{port}/hello")]);
    curl.send("go");
    curl_ok(&mut curl, 1);
    curl.finish();
    let events = agent.wait_events("the server's response", STEP_TIMEOUT, |e| {
        e.data
            .iter()
            .any(|d| d.pid == spid && d.data.ends_with(BODY.as_bytes()))
    });
    let open = events.conn_of(spid, "the HTTPS connection", |o| o.role == "server");
    let conn = open.conn;
    let mut checks = Checks::default();
    let tls_flag = events
        .all
        .iter()
        .find(|(v, _)| v["event"] == "open" && v["conn"] == conn)
        .map(|(v, _)| v["tls"].clone());
    check(
        &mut checks,
        "open.tls",
        tls_flag,
        Some(serde_json::Value::Bool(true)),
    );
    let syscalls: Vec<&str> = events
        .data
        .iter()
        .filter(|d| d.conn == conn)
        .map(|d| d.syscall.as_str())
        .collect();
    checks.add(syscalls.iter().any(|s| !s.starts_with("SSL_")).then(|| {
        format!("data of the TLS connection other than SSL_read/SSL_write: {syscalls:?}")
    }));
    match events.stream(conn, "read") {
        Ok(stream) => {
            let text = String::from_utf8_lossy(&stream.bytes).into_owned();
            checks.add(
                (!text.starts_with("GET /hello HTTP/1.1\r\n") || !text.ends_with("\r\n\r\n"))
                    .then(|| format!("request stream: {text:?}")),
            );
        }
        Err(err) => checks.add(Some(err)),
    }
    match events.stream(conn, "write") {
        Ok(stream) => {
            let text = String::from_utf8_lossy(&stream.bytes).into_owned();
            checks.add(
                (!text.starts_with("HTTP/1.0 200 OK\r\n")
                    && !text.starts_with("HTTP/1.1 200 OK\r\n")
                    || !text.ends_with(BODY))
                .then(|| format!("response stream: {text:?}")),
            );
        }
        Err(err) => checks.add(Some(err)),
    }
    agent.stop_ok();
    checks.finish(&events.lines_of(conn));
}

/// A server that starts after the agent (selected by `--exe`, by its script's name) is traced
/// over TLS: the agent gives it uprobes of its own within 100 ms of its exec, which the test
/// waits for (`processes_attached`) before its request, as a user would wait for the
/// agent's log line.
#[test]
fn https_server_started_after_the_agent_is_traced() {
    if skip_without_libssl() {
        return;
    }
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let mut agent = exporting_agent(&receiver, &["--exe", "late_tls_server.py"]);
    let dir = TempDir::new("tls");
    certificate(dir.path());
    let (server, port) = https_server(&dir, "late_tls_server.py");
    let spid = server.pid();
    agent.wait_metric(
        "tracer_tls_total{event=\"processes_attached\"}",
        1.0,
        STEP_TIMEOUT,
    );
    let mut curl = curl(&[format!("https://127.0.0.1:{port}/hello")]);
    curl.send("go");
    curl_ok(&mut curl, 1);
    curl.finish();
    receiver.wait_spans("the late server's SERVER span", SPAN_WAIT, |s| {
        !of(s, KIND_SERVER, spid).is_empty()
    });
    agent.stop_ok();
    let spans = receiver.spans();
    let servers = of(&spans, KIND_SERVER, spid);
    let mut checks = Checks::default();
    check(&mut checks, "server spans", servers.len(), 1);
    if let Some(s) = servers.first() {
        check(
            &mut checks,
            "url.scheme",
            s.str("url.scheme"),
            Some("https"),
        );
        check(&mut checks, "url.path", s.str("url.path"), Some("/hello"));
        check(
            &mut checks,
            "status",
            s.int("http.response.status_code"),
            Some(200),
        );
    }
    checks.finish(&summaries(&spans));
}

/// An untraced Python HTTPS client, using the same libssl and talking to it.
const UNTRACED_CLIENT: &str = r#"
import ssl, sys, urllib.request
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
print("ready", flush=True)
sys.stdin.readline()
for _ in range(3):
    urllib.request.urlopen("https://127.0.0.1:%s/hello" % sys.argv[1], context=ctx).read()
print("done", flush=True)
sys.stdin.readline()
"#;

/// The byte at file offset `offset` of the `libssl.so.3` that process `pid` maps executable,
/// read from its memory (None when it maps none there).
fn libssl_byte(pid: u32, offset: u64) -> Option<u8> {
    use std::os::unix::fs::FileExt as _;
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let address = maps.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [range, perms, file_offset, _, _, path] = fields[..] else {
            return None;
        };
        if !perms.contains('x') || !path.ends_with("/libssl.so.3") {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let file_offset = u64::from_str_radix(file_offset, 16).ok()?;
        (file_offset..file_offset + (end - start))
            .contains(&offset)
            .then(|| start + offset - file_offset)
    })?;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut byte = [0u8];
    mem.read_exact_at(&mut byte, address).ok()?;
    Some(byte[0])
}

/// Uprobes go into the traced processes only: the kernel's breakpoint (int3, 0xcc) is at the
/// entry of every SSL function in the traced server's memory and in none of an untraced client
/// that uses the same libssl and talks to that server; only the server is counted in
/// `processes_attached`, and its uprobes are detached when it exits. Both use a private copy
/// of libssl (LD_LIBRARY_PATH), so other agents on the machine, whose host-wide uprobes are
/// on the system's, cannot put a breakpoint in the client.
#[test]
fn untraced_processes_using_the_same_libssl_get_no_uprobe() {
    if skip_without_libssl() {
        return;
    }
    let dir = TempDir::new("tls");
    certificate(dir.path());
    let libs = dir.path().join("lib");
    fs::create_dir(&libs).expect("mkdir lib");
    fs::copy(LIBSSL, libs.join("libssl.so.3")).expect("copy libssl");
    let env = [("LD_LIBRARY_PATH", libs.as_path())];
    let (server, port) = https_server_with(&dir, "https_server.py", &env);
    let spid = server.pid();
    let mut agent = Agent::start(&["--pid", &spid.to_string()]);
    agent.wait_metric(
        "tracer_tls_total{event=\"processes_attached\"}",
        1.0,
        STEP_TIMEOUT,
    );
    let mut client = Peer::spawn("untraced https client", {
        let mut cmd = Command::new(python());
        cmd.args(["-u", "-c", UNTRACED_CLIENT])
            .arg(port.to_string())
            .envs(env);
        cmd
    });
    let cpid = client.pid();
    client.expect("ready");
    client.send("go");
    client.expect("done");
    // Past the agent's next scans: a wrong agent would have had time to attach to the client.
    std::thread::sleep(Duration::from_millis(500));

    let data = fs::read(libs.join("libssl.so.3")).expect("read the libssl copy");
    let offsets = tracer_agent::tls::ssl_offsets(&data).expect("libssl parses");
    let mut checks = Checks::default();
    check(&mut checks, "functions found", offsets.len(), 4);
    for (function, offset) in &offsets {
        let traced = libssl_byte(spid, *offset);
        let untraced = libssl_byte(cpid, *offset);
        checks.add(
            (traced != Some(0xcc))
                .then(|| format!("{function} in the traced server: {traced:x?}, not int3")),
        );
        checks.add((untraced.is_none() || untraced == Some(0xcc)).then(|| {
            format!("{function} in the untraced client: {untraced:x?}, not the original code")
        }));
    }
    check(
        &mut checks,
        "processes_attached",
        agent.metric("tracer_tls_total{event=\"processes_attached\"}"),
        1.0,
    );
    check(
        &mut checks,
        "errors",
        agent.metric("tracer_tls_total{event=\"errors\"}"),
        0.0,
    );
    drop(server);
    let detached = wait_until(STEP_TIMEOUT, || {
        agent.metric_or_zero("tracer_tls_total{event=\"processes_detached\"}") >= 1.0
    });
    checks.add((!detached).then(|| "the server's uprobes were not detached on exit".to_owned()));
    client.finish();
    let stderr = agent.stderr_text();
    agent.stop_ok();
    checks.finish(&format!("--- agent stderr ---\n{stderr}"));
}

/// A traced process with no OpenSSL in it, and one that maps a "libssl" without SSL symbols
/// (libcrypto under libssl's name, preloaded): each gets a log line and its own counter, and
/// the agent carries on.
#[test]
fn processes_without_openssl_are_logged_and_counted() {
    if skip_without_libssl() {
        return;
    }
    let dir = TempDir::new("tls");
    let fake = dir.path().join("libssl.so.3");
    fs::copy("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", &fake).expect("copy libcrypto");
    let mut plain = Peer::spawn("sleep", {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready; exec sleep 60"]);
        cmd
    });
    plain.expect("ready");
    let mut preloaded = Peer::spawn("preloaded sleep", {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready; exec sleep 60"])
            .env("LD_PRELOAD", &fake);
        cmd
    });
    preloaded.expect("ready");
    // The exec must be done before the agent reads the process's maps.
    let exec_done = |pid: u32| {
        wait_until(STEP_TIMEOUT, || {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
    };
    assert!(exec_done(plain.pid()) && exec_done(preloaded.pid()));
    let started = Instant::now();
    let mut agent = Agent::start(&[
        "--pid",
        &plain.pid().to_string(),
        "--pid",
        &preloaded.pid().to_string(),
    ]);
    agent.wait_metric(
        "tracer_tls_total{event=\"processes_without_ssl\"}",
        1.0,
        STEP_TIMEOUT,
    );
    agent.wait_metric(
        "tracer_tls_total{event=\"libssl_without_symbols\"}",
        1.0,
        STEP_TIMEOUT,
    );
    agent.assert_running();
    let stderr = agent.stderr_text();
    let mut checks = Checks::default();
    let plain_line = format!("pid {} (sleep): no OpenSSL in it now", plain.pid());
    checks.add((!stderr.contains(&plain_line)).then(|| format!("no line {plain_line:?}")));
    checks.add(
        (!stderr.contains(&format!(
            "{} (pid {}) has no SSL_read/SSL_write symbols",
            fake.display(),
            preloaded.pid()
        )))
        .then(|| "no line about the libssl without symbols".to_owned()),
    );
    // The preloaded one has an SSL library, only without symbols: said about the file, not
    // counted among processes without SSL.
    let preloaded_line = format!("pid {} (sleep): no OpenSSL", preloaded.pid());
    checks.add(
        stderr
            .contains(&preloaded_line)
            .then(|| format!("a line {preloaded_line:?}")),
    );
    check(
        &mut checks,
        "processes_without_ssl",
        agent.metric("tracer_tls_total{event=\"processes_without_ssl\"}"),
        1.0,
    );
    check(
        &mut checks,
        "libssl_without_symbols",
        agent.metric("tracer_tls_total{event=\"libssl_without_symbols\"}"),
        1.0,
    );
    check(
        &mut checks,
        "errors",
        agent.metric("tracer_tls_total{event=\"errors\"}"),
        0.0,
    );
    agent.stop_ok();
    checks.finish(&format!(
        "after {:?}\n--- agent stderr ---\n{stderr}",
        started.elapsed()
    ));
}

/// nginx terminating TLS on a free port and proxying to `backend` in plaintext, one worker
/// (started before it returns, so the agent traces it as the master's child). Returns nginx
/// and its port.
fn nginx_tls_proxy(dir: &TempDir, backend: u16) -> (Peer, u16) {
    let d = dir.path().display();
    nginx_proxy(
        dir.path(),
        backend,
        " ssl",
        &format!("ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;"),
    )
}

/// curl -> nginx (TLS) -> python http.server (plaintext), nginx and the backend traced: per
/// request an https SERVER span on nginx, a plaintext CLIENT span from nginx to the backend
/// and the backend's SERVER span, in one trace, nginx's CLIENT under its SERVER and the
/// backend's SERVER under nginx's CLIENT.
#[test]
fn nginx_terminating_tls_in_front_of_a_plaintext_backend() {
    if skip_without_libssl() {
        return;
    }
    let (backend, backend_port, _www) = tracer_e2e::http_server("hello.txt", BODY);
    let dir = TempDir::new("tls-nginx");
    certificate(dir.path());
    let (nginx, port) = nginx_tls_proxy(&dir, backend_port);
    let receiver = Receiver::start(Protocol::Grpc);
    let (npid, bpid) = (nginx.pid(), backend.pid());
    let mut agent = exporting_agent(
        &receiver,
        &["--pid", &npid.to_string(), "--pid", &bpid.to_string()],
    );
    // Two requests on one TLS connection: the second one's bytes may come from OpenSSL's
    // buffer without a syscall inside SSL_read.
    let mut curl = curl(&[
        format!("https://127.0.0.1:{port}/hello.txt"),
        format!("https://127.0.0.1:{port}/missing"),
    ]);
    curl.send("go");
    curl_ok(&mut curl, 1);
    let line = curl.expect("result");
    assert_eq!(line.trim(), "404", "curl got {line}\n{}", curl.output());
    curl.finish();
    let nginx_spans = |s: &[ReceivedSpan], kind| {
        s.iter()
            .filter(|s| {
                s.span.kind == kind && s.resource_str("process.executable.name") == Some("nginx")
            })
            .count()
    };
    receiver.wait_spans(
        "nginx SERVER and CLIENT spans, backend SERVER spans",
        SPAN_WAIT,
        |s| {
            nginx_spans(s, KIND_SERVER) >= 2
                && nginx_spans(s, KIND_CLIENT) >= 2
                && of(s, KIND_SERVER, bpid).len() >= 2
        },
    );
    agent.stop_ok();
    let spans = receiver.spans();
    let mut checks = Checks::default();
    let by = |kind: i32, backend_side: bool| {
        let mut found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                s.span.kind == kind
                    && if backend_side {
                        s.pid() == Some(bpid)
                    } else {
                        s.resource_str("process.executable.name") == Some("nginx")
                    }
            })
            .collect();
        found.sort_by_key(|s| s.start_ns());
        found
    };
    let (servers, clients, backends) = (
        by(KIND_SERVER, false),
        by(KIND_CLIENT, false),
        by(KIND_SERVER, true),
    );
    check(&mut checks, "nginx SERVER spans", servers.len(), 2);
    check(&mut checks, "nginx CLIENT spans", clients.len(), 2);
    check(&mut checks, "backend SERVER spans", backends.len(), 2);
    check(&mut checks, "span count", spans.len(), 6);
    for (i, (path, status)) in [("/hello.txt", 200), ("/missing", 404)]
        .into_iter()
        .enumerate()
    {
        let (Some(s), Some(c), Some(b)) = (servers.get(i), clients.get(i), backends.get(i)) else {
            break;
        };
        check(
            &mut checks,
            "nginx SERVER url.scheme",
            s.str("url.scheme"),
            Some("https"),
        );
        check(
            &mut checks,
            "nginx SERVER method",
            s.str("http.request.method"),
            Some("GET"),
        );
        check(
            &mut checks,
            "nginx SERVER url.path",
            s.str("url.path"),
            Some(path),
        );
        check(
            &mut checks,
            "nginx SERVER status",
            s.int("http.response.status_code"),
            Some(status),
        );
        check(
            &mut checks,
            "nginx SERVER server.port",
            s.int("server.port"),
            Some(i64::from(port)),
        );
        let full = format!("http://127.0.0.1:{backend_port}{path}");
        check(
            &mut checks,
            "nginx CLIENT url.full",
            c.str("url.full"),
            Some(&full),
        );
        check(
            &mut checks,
            "nginx CLIENT status",
            c.int("http.response.status_code"),
            Some(status),
        );
        check(
            &mut checks,
            "backend url.scheme",
            b.str("url.scheme"),
            Some("http"),
        );
        check(
            &mut checks,
            "backend url.path",
            b.str("url.path"),
            Some(path),
        );
        check(
            &mut checks,
            "backend status",
            b.int("http.response.status_code"),
            Some(status),
        );
        check(
            &mut checks,
            "nginx CLIENT trace",
            c.trace_id(),
            s.trace_id(),
        );
        check(&mut checks, "backend trace", b.trace_id(), s.trace_id());
        check(
            &mut checks,
            "nginx CLIENT parent",
            c.parent_span_id(),
            s.span_id(),
        );
        check(
            &mut checks,
            "backend parent",
            b.parent_span_id(),
            c.span_id(),
        );
    }
    checks.finish(&format!("every span:\n{}", summaries(&spans)));
}

/// A grpcio server over TLS (the test's certificate), unary `demo.Echo/Say`.
const GRPC_TLS_SERVER: &str = r#"
import grpc, sys
from concurrent import futures
handlers = grpc.method_handlers_generic_handler("demo.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(lambda request, context: b"hello " + request),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handlers,))
key = open(sys.argv[1] + "/key.pem", "rb").read()
cert = open(sys.argv[1] + "/cert.pem", "rb").read()
port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
server.start()
print("port", port, flush=True)
server.wait_for_termination()
"#;

/// A grpcio client over TLS trusting the test's certificate: each line `say WORD` makes one
/// call and answers `ok REPLY`.
const GRPC_TLS_CLIENT: &str = r#"
import grpc, sys
cert = open(sys.argv[1] + "/cert.pem", "rb").read()
channel = grpc.secure_channel("127.0.0.1:" + sys.argv[2], grpc.ssl_channel_credentials(cert))
say = channel.unary_unary("/demo.Echo/Say")
print("ready", flush=True)
for line in sys.stdin:
    print("ok", say(line.split()[1].encode()).decode(), flush=True)
"#;

/// The cygrpc module of the test venv's grpcio: BoringSSL linked in statically, stripped.
fn cygrpc_module() -> Option<std::path::PathBuf> {
    let venv = tracer_e2e::venv_python();
    let lib = venv.parent()?.parent()?.join("lib");
    for python in fs::read_dir(lib).ok()?.flatten() {
        let dir = python.path().join("site-packages/grpc/_cython");
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("cygrpc") {
                return Some(entry.path());
            }
        }
    }
    None
}

/// grpcio over TLS, client and server traced: their TLS is BoringSSL inside grpcio's cygrpc
/// module, stripped, so there is nothing to put uprobes on. The agent says so once, naming
/// the file and a pid, counts it, and keeps the ciphertext out of the parsers: no span at all
/// (rather than garbage ones), no parse error, the handshake counted as ciphertext.
#[test]
fn grpcio_over_tls_with_stripped_boringssl_is_logged_counted_and_kept_out() {
    let module = cygrpc_module().expect("grpcio is installed in the test venv");
    let module = fs::canonicalize(&module).expect("canonical cygrpc path");
    let dir = TempDir::new("tls-grpc");
    certificate(dir.path());
    let mut cmd = Command::new(tracer_e2e::venv_python());
    cmd.args(["-u", "-c", GRPC_TLS_SERVER]).arg(dir.path());
    let mut server = Peer::spawn("grpc tls server", cmd);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    let mut cmd = Command::new(tracer_e2e::venv_python());
    cmd.args(["-u", "-c", GRPC_TLS_CLIENT])
        .arg(dir.path())
        .arg(port.to_string());
    let mut client = Peer::spawn("grpc tls client", cmd);
    client.expect("ready");
    let receiver = Receiver::start(Protocol::Grpc);
    let (spid, cpid) = (server.pid(), client.pid());
    let mut agent = exporting_agent(
        &receiver,
        &["--pid", &spid.to_string(), "--pid", &cpid.to_string()],
    );
    // The channel connects on the first call: the handshake happens under the agent.
    for word in ["one", "two", "three"] {
        client.send(&format!("say {word}"));
        assert_eq!(client.expect("ok"), format!("hello {word}"));
    }
    let files = agent.wait_metric(
        "tracer_tls_total{event=\"libssl_without_symbols\"}",
        1.0,
        STEP_TIMEOUT,
    );
    let cipher = agent.wait_metric(
        "tracer_tls_total{event=\"ciphertext_bytes\"}",
        2000.0,
        STEP_TIMEOUT,
    );
    let metrics = agent.metrics();
    agent.stop_ok();
    let stderr = agent.stderr_text();
    let spans = receiver.spans();
    let mut checks = Checks::default();
    check(&mut checks, "files without symbols", files, 1.0);
    let shown = module.display().to_string();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&shown) && l.contains("without SSL_read/SSL_write symbols"))
        .collect();
    check(&mut checks, "lines about the cygrpc module", lines.len(), 1);
    let named_pid = lines.first().is_some_and(|l| {
        l.contains(&format!("(pid {spid})")) || l.contains(&format!("(pid {cpid})"))
    });
    check(&mut checks, "the line names a pid", named_pid, true);
    checks.add(
        (cipher < 2000.0).then(|| format!("ciphertext bytes kept out: {cipher} (a handshake)")),
    );
    let ours: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.pid() == Some(spid) || s.pid() == Some(cpid))
        .collect();
    check(&mut checks, "spans of the grpc peers", ours.len(), 0);
    let parse_errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tracer_parse_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    check(&mut checks, "parse errors", parse_errors, 0.0);
    checks.finish(&format!(
        "spans:\n{}\n--- agent stderr ---\n{stderr}",
        summaries(&spans)
    ));
}
