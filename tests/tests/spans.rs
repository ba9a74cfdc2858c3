//! Spans end to end: the real agent traces real processes (curl, python servers and clients)
//! over loopback, and its spans arrive at a real OTLP receiver in this test process (gRPC or
//! HTTP/protobuf), on the console, or in a JSON-lines file. Each test checks what a user of
//! the spans would look at: kinds, names, ids, attributes, status, timing, resources, and that
//! nothing is lost or duplicated when the collector is away.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use serde_json::Value;
use tracer_e2e::{
    Agent, Checks, Peer, TempDir, metric_value,
    otlp_receiver::{
        KIND_CLIENT, KIND_SERVER, Protocol, ReceivedSpan, Receiver, STATUS_ERROR, STATUS_UNSET,
        flatten, summaries,
    },
    wait_for_listen, wait_until,
};

/// How long spans may take to reach the receiver once the traffic is over (batches leave
/// after 100 ms here; the rest is the agent's processing and the export round trip).
const SPAN_WAIT: Duration = Duration::from_secs(20);

const HELLO: &str = "hello from the span test\n";

/// What curl prints after each transfer (`-w`): the status and the local port it used.
const CURL_RESULT: &str = "result %{http_code} %{local_port}\\n";

// ---------------------------------------------------------------------------------------------
// Peers.

/// `python3 -m http.server` serving hello.txt (HTTP/1.0, one request per connection).
fn http_server() -> (Peer, u16, TempDir) {
    tracer_e2e::http_server("hello.txt", HELLO)
}

/// An HTTP/1.1 keep-alive server: /ok 200, /fail 500, /chunked 200 in three chunks (it says
/// `last_chunk <unix ns>` just before writing the last one, 300 ms after the first), POST
/// /submit 200 (says `posted <bytes>`), anything else 404. Bodies end in a newline.
const KEEPALIVE_SERVER: &str = r#"
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/ok":
            self.reply(200, b"ok\n")
        elif self.path == "/fail":
            self.reply(500, b"server error\n")
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first\n", b"second\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                time.sleep(0.15)
            last = b"last\n"
            say("last_chunk", time.time_ns())
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))
        else:
            self.reply(404, b"not found\n")
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        say("posted", len(body))
        self.reply(200, b"stored %d bytes\n" % len(body))
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
say("port", server.server_address[1])
server.serve_forever()
"#;

fn keepalive_server() -> (Peer, u16) {
    let mut server = Peer::python("keep-alive server", KEEPALIVE_SERVER, &[]);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    (server, port)
}

/// A shell that execs `curl args...` once told "go": its pid exists before the agent starts,
/// so it can be named with --pid, and stays the same through exec.
fn curl(args: &[String]) -> Peer {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "read go && exec curl \"$@\"", "curl"])
        .args(args);
    Peer::spawn("curl", cmd)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// Reads curl's next `result` line (see [`CURL_RESULT`]): (status, local port).
fn curl_result(curl: &mut Peer) -> (u16, u16) {
    let line = curl.expect("result");
    let mut words = line.split_whitespace().map(str::parse::<u16>);
    match (words.next(), words.next()) {
        (Some(Ok(code)), Some(Ok(port))) => (code, port),
        _ => panic!("unexpected curl result line {line:?}\n{}", curl.output()),
    }
}

/// One GET of `url` by curl (not traced), which must answer 200.
fn curl_get(url: &str) {
    let mut curl = curl(&strings(&[
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "10",
        "-w",
        CURL_RESULT,
        url,
    ]));
    curl.send("go");
    assert_eq!(
        curl_result(&mut curl).0,
        200,
        "the peers themselves misbehaved"
    );
    curl.finish();
}

// ---------------------------------------------------------------------------------------------
// Assertions.

/// The one span matching `matches`; panics listing every span otherwise.
fn the_span<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    matches: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| matches(s)).collect();
    match found.as_slice() {
        [one] => one,
        _ => panic!(
            "expected exactly one {what}, found {}\n--- every span received ---\n{}",
            found.len(),
            summaries(spans)
        ),
    }
}

fn is_server_of(span: &ReceivedSpan, pid: u32) -> bool {
    span.span.kind == KIND_SERVER && span.pid() == Some(pid)
}

fn is_client_of(span: &ReceivedSpan, pid: u32) -> bool {
    span.span.kind == KIND_CLIENT && span.pid() == Some(pid)
}

/// `spans` of `pid` and `kind`, by start time (then end: pipelined requests leave in one write).
fn of_kind(spans: &[ReceivedSpan], pid: u32, kind: i32) -> Vec<ReceivedSpan> {
    let mut found: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.span.kind == kind && s.pid() == Some(pid))
        .cloned()
        .collect();
    found.sort_by_key(|s| (s.start_ns(), s.end_ns()));
    found
}

fn check<T: PartialEq + std::fmt::Debug>(checks: &mut Checks, what: &str, got: T, want: T) {
    checks.add((got != want).then(|| format!("{what}: expected {want:?}, got {got:?}")));
}

fn check_that(checks: &mut Checks, ok: bool, problem: impl FnOnce() -> String) {
    checks.add((!ok).then(problem));
}

/// An expected attribute value.
enum Want<'a> {
    Str(&'a str),
    Int(i64),
}
use Want::{Int, Str};

fn check_attributes(checks: &mut Checks, label: &str, span: &ReceivedSpan, want: &[(&str, Want)]) {
    for (key, want) in want {
        let what = format!("{label} {key}");
        match want {
            Str(value) => check(checks, &what, span.str(key), Some(*value)),
            Int(value) => check(checks, &what, span.int(key), Some(*value)),
        }
    }
}

fn is_hex_id(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && text.bytes().any(|b| b != b'0')
}

/// Ids a span must have whatever its context: a valid trace id and span id.
fn check_ids(checks: &mut Checks, label: &str, span: &ReceivedSpan) {
    check_that(checks, is_hex_id(&span.trace_id(), 32), || {
        format!("{label}: invalid trace id {:?}", span.trace_id())
    });
    check_that(checks, is_hex_id(&span.span_id(), 16), || {
        format!("{label}: invalid span id {:?}", span.span_id())
    });
}

/// Start before end and a plausible duration for a loopback request.
fn check_timing(checks: &mut Checks, label: &str, span: &ReceivedSpan) {
    let (start, end) = (span.start_ns(), span.end_ns());
    check_that(checks, start > 0 && start < end, || {
        format!("{label}: start {start} must be before end {end}")
    });
    check_that(checks, end.saturating_sub(start) < 5_000_000_000, || {
        format!(
            "{label}: implausible duration {} ns",
            end.saturating_sub(start)
        )
    });
}

/// The SERVER span lies within the CLIENT span of the same request (one clock for both).
/// The client's request write begins before the server's read returns it, strictly; at the
/// end, the client's read of the last byte can return a few microseconds before the server's
/// write syscall does, so 1 ms is allowed there.
fn check_nested(checks: &mut Checks, label: &str, client: &ReceivedSpan, server: &ReceivedSpan) {
    check_that(checks, client.start_ns() <= server.start_ns(), || {
        format!(
            "{label}: the server span starts at {} before the client span at {}",
            server.start_ns(),
            client.start_ns()
        )
    });
    check_that(
        checks,
        server.end_ns() <= client.end_ns() + 1_000_000,
        || {
            format!(
                "{label}: the server span ends at {}, after the client span at {}",
                server.end_ns(),
                client.end_ns()
            )
        },
    );
}

fn resource_checks(checks: &mut Checks, label: &str, span: &ReceivedSpan, service: &str, pid: u32) {
    check(
        checks,
        &format!("{label} resource service.name"),
        span.resource_str("service.name"),
        Some(service),
    );
    check(
        checks,
        &format!("{label} resource process.pid"),
        span.resource_int("process.pid"),
        Some(i64::from(pid)),
    );
    check(
        checks,
        &format!("{label} resource telemetry.sdk.name"),
        span.resource_str("telemetry.sdk.name"),
        Some("tracer-agent"),
    );
}

fn context(spans: &[ReceivedSpan]) -> String {
    format!("--- spans received ---\n{}", summaries(spans))
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn curl_and_http_server_give_a_client_and_a_server_span() {
    let (server, port, _www) = http_server();
    let url = format!("http://127.0.0.1:{port}/hello.txt");
    let mut curl = curl(&strings(&[
        "-sS",
        "--max-time",
        "10",
        "-w",
        CURL_RESULT,
        &url,
    ]));
    let receiver = Receiver::start(Protocol::Grpc);
    let (spid, cpid) = (server.pid(), curl.pid());
    let mut agent = Agent::start_otlp(&receiver, &[spid, cpid], &[]);

    curl.send("go");
    let (code, client_port) = curl_result(&mut curl);
    assert_eq!(code, 200, "the peers themselves misbehaved");
    curl.finish();
    receiver.wait_spans(
        "curl's CLIENT span and the server's SERVER span",
        SPAN_WAIT,
        |s| s.iter().any(|s| is_server_of(s, spid)) && s.iter().any(|s| is_client_of(s, cpid)),
    );
    // Stopping flushes whatever is left, so a duplicate would show up below.
    agent.stop_ok();
    let spans = receiver.spans();
    let server_span = the_span(&spans, "SERVER span of http.server", |s| {
        is_server_of(s, spid)
    });
    let client_span = the_span(&spans, "CLIENT span of curl", |s| is_client_of(s, cpid));

    let mut checks = Checks::default();
    check(&mut checks, "span count", spans.len(), 2);
    let port = i64::from(port);
    let s = server_span;
    resource_checks(&mut checks, "server", s, "http.server", spid);
    check(&mut checks, "server name", s.span.name.as_str(), "GET");
    check_attributes(
        &mut checks,
        "server",
        s,
        &[
            ("http.request.method", Str("GET")),
            ("url.path", Str("/hello.txt")),
            ("url.scheme", Str("http")),
            ("http.response.status_code", Int(200)),
            ("server.port", Int(port)),
            ("client.address", Str("127.0.0.1")),
            ("network.peer.address", Str("127.0.0.1")),
            ("network.peer.port", Int(i64::from(client_port))),
            ("network.protocol.version", Str("1.1")),
        ],
    );
    check_that(
        &mut checks,
        s.str("user_agent.original")
            .is_some_and(|ua| ua.starts_with("curl/")),
        || {
            format!(
                "server user_agent.original should be curl/..., is {:?}",
                s.str("user_agent.original")
            )
        },
    );
    check(&mut checks, "server status", s.status_code(), STATUS_UNSET);
    // No traceparent was sent, but the agent saw both ends of the connection: the server
    // span is the child of curl's client span, in its trace.
    check(
        &mut checks,
        "server parent (curl's span, linked by the local connection)",
        s.parent_span_id(),
        client_span.span_id(),
    );
    check(
        &mut checks,
        "server trace (curl's)",
        s.trace_id(),
        client_span.trace_id(),
    );
    check(
        &mut checks,
        "server link method",
        s.str("tracer_agent.link"),
        Some("peer_connection"),
    );
    check_ids(&mut checks, "server", s);
    check_timing(&mut checks, "server", s);

    let c = client_span;
    resource_checks(&mut checks, "client", c, "curl", cpid);
    check(&mut checks, "client name", c.span.name.as_str(), "GET");
    check_attributes(
        &mut checks,
        "client",
        c,
        &[
            ("http.request.method", Str("GET")),
            ("url.full", Str(&url)),
            ("server.address", Str("127.0.0.1")),
            ("server.port", Int(port)),
            ("network.peer.address", Str("127.0.0.1")),
            ("network.peer.port", Int(port)),
            ("http.response.status_code", Int(200)),
        ],
    );
    check(&mut checks, "client status", c.status_code(), STATUS_UNSET);
    check(
        &mut checks,
        "client parent (no traceparent sent)",
        c.parent_span_id(),
        String::new(),
    );
    check_ids(&mut checks, "client", c);
    check_timing(&mut checks, "client", c);
    check_nested(&mut checks, "curl -> http.server", c, s);
    checks.finish(&context(&spans));
}

#[test]
fn traceparent_from_the_caller_links_client_and_server_spans() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let (server, port, _www) = http_server();
    let url = format!("http://127.0.0.1:{port}/hello.txt");
    let traceparent = format!("traceparent: 00-{TRACE}-{SPAN}-01");
    let tracestate = format!("tracestate: {TRACESTATE}");
    let mut curl = curl(&strings(&[
        "-sS",
        "--max-time",
        "10",
        "-w",
        CURL_RESULT,
        "-H",
        &traceparent,
        "-H",
        &tracestate,
        &url,
    ]));
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let (spid, cpid) = (server.pid(), curl.pid());
    let mut agent = Agent::start_otlp(&receiver, &[spid, cpid], &[]);

    curl.send("go");
    assert_eq!(
        curl_result(&mut curl).0,
        200,
        "the peers themselves misbehaved"
    );
    curl.finish();
    receiver.wait_spans(
        "curl's CLIENT span and the server's SERVER span",
        SPAN_WAIT,
        |s| s.iter().any(|s| is_server_of(s, spid)) && s.iter().any(|s| is_client_of(s, cpid)),
    );
    agent.stop_ok();
    let spans = receiver.spans();
    let s = the_span(&spans, "SERVER span", |s| is_server_of(s, spid));
    let c = the_span(&spans, "CLIENT span", |s| is_client_of(s, cpid));

    let mut checks = Checks::default();
    // The server joins the caller's trace as a child of the span named in the header.
    check(&mut checks, "server trace id", s.trace_id().as_str(), TRACE);
    check(
        &mut checks,
        "server parent span id",
        s.parent_span_id().as_str(),
        SPAN,
    );
    check_that(
        &mut checks,
        s.span_id() != SPAN && is_hex_id(&s.span_id(), 16),
        || format!("server span id must be its own, is {:?}", s.span_id()),
    );
    check(
        &mut checks,
        "server tracestate",
        s.span.trace_state.as_str(),
        TRACESTATE,
    );
    // The header names curl's own call (spans.rs): the CLIENT span takes those ids, so the
    // server span above is its child.
    check(&mut checks, "client trace id", c.trace_id().as_str(), TRACE);
    check(&mut checks, "client span id", c.span_id().as_str(), SPAN);
    check(
        &mut checks,
        "client parent span id",
        c.parent_span_id(),
        String::new(),
    );
    check(
        &mut checks,
        "server url.path",
        s.str("url.path"),
        Some("/hello.txt"),
    );
    check(
        &mut checks,
        "client url.full",
        c.str("url.full"),
        Some(url.as_str()),
    );
    check_nested(&mut checks, "curl -> http.server", c, s);
    checks.finish(&context(&spans));
}

#[test]
fn keepalive_connection_gives_one_span_per_request_with_its_status() {
    const MARKER: &str = "BODY-MARKER-5f0c2a";
    let body = format!("note={MARKER}&password=hunter2&pad={}", "x".repeat(100));
    let (mut server, port) = keepalive_server();
    let base = format!("http://127.0.0.1:{port}");
    let paths = ["/ok", "/missing", "/fail", "/chunked", "/submit"];
    let mut args = strings(&["-sS", "--max-time", "10", "-w", CURL_RESULT]);
    args.extend(paths[..4].iter().map(|p| format!("{base}{p}")));
    // --next: a second set of options (a POST) on the same connection.
    args.extend(strings(&[
        "--next",
        "-sS",
        "--max-time",
        "10",
        "-w",
        CURL_RESULT,
    ]));
    args.extend([
        "--data-binary".to_owned(),
        body.clone(),
        format!("{base}/submit"),
    ]);
    let mut curl = curl(&args);
    let receiver = Receiver::start(Protocol::Grpc);
    let (spid, cpid) = (server.pid(), curl.pid());
    let mut agent = Agent::start_otlp(&receiver, &[spid, cpid], &[]);

    curl.send("go");
    let results: Vec<(u16, u16)> = paths.iter().map(|_| curl_result(&mut curl)).collect();
    let codes: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(
        codes,
        [200, 404, 500, 200, 200],
        "the peers themselves misbehaved"
    );
    assert!(
        results.iter().all(|r| r.1 == results[0].1),
        "curl did not reuse one connection: {results:?}"
    );
    let last_chunk_ns: u64 = server.expect_num("last_chunk");
    assert_eq!(server.expect_num::<usize>("posted"), body.len());
    curl.finish();
    receiver.wait_spans("5 SERVER and 5 CLIENT spans", SPAN_WAIT, |s| {
        of_kind(s, spid, KIND_SERVER).len() >= 5 && of_kind(s, cpid, KIND_CLIENT).len() >= 5
    });
    agent.stop_ok();
    let spans = receiver.spans();
    let servers = of_kind(&spans, spid, KIND_SERVER);
    let clients = of_kind(&spans, cpid, KIND_CLIENT);

    let mut checks = Checks::default();
    check(&mut checks, "spans in all", spans.len(), 10);
    let server_paths: Vec<Option<&str>> = servers.iter().map(|s| s.str("url.path")).collect();
    check(
        &mut checks,
        "server spans' url.path, by start",
        server_paths,
        paths.map(Some).to_vec(),
    );
    let client_urls: Vec<Option<&str>> = clients.iter().map(|s| s.str("url.full")).collect();
    let want_urls: Vec<String> = paths.iter().map(|p| format!("{base}{p}")).collect();
    check(
        &mut checks,
        "client spans' url.full, by start",
        client_urls,
        want_urls.iter().map(|u| Some(u.as_str())).collect(),
    );
    let status_of = |s: &ReceivedSpan| {
        (
            s.int("http.response.status_code"),
            s.status_code(),
            s.str("error.type").map(str::to_owned),
        )
    };
    let ok = (Some(200), STATUS_UNSET, None);
    // 5xx is an error on both sides; 4xx only for the client, whose request failed.
    let want_server = [
        ok.clone(),
        (Some(404), STATUS_UNSET, None),
        (Some(500), STATUS_ERROR, Some("500".to_owned())),
        ok.clone(),
        ok.clone(),
    ];
    let want_client = [
        ok.clone(),
        (Some(404), STATUS_ERROR, Some("404".to_owned())),
        (Some(500), STATUS_ERROR, Some("500".to_owned())),
        ok.clone(),
        ok,
    ];
    check(
        &mut checks,
        "server (status code, span status, error.type)",
        servers.iter().map(status_of).collect::<Vec<_>>(),
        want_server.to_vec(),
    );
    check(
        &mut checks,
        "client (status code, span status, error.type)",
        clients.iter().map(status_of).collect::<Vec<_>>(),
        want_client.to_vec(),
    );
    let methods: Vec<Option<&str>> = servers
        .iter()
        .map(|s| s.str("http.request.method"))
        .collect();
    check(
        &mut checks,
        "server methods",
        methods,
        vec![
            Some("GET"),
            Some("GET"),
            Some("GET"),
            Some("GET"),
            Some("POST"),
        ],
    );

    for (side, list) in [("server", &servers), ("client", &clients)] {
        for span in list.iter() {
            let label = format!(
                "{side} {}",
                span.str("url.path").or(span.str("url.full")).unwrap_or("?")
            );
            check_timing(&mut checks, &label, span);
            check(
                &mut checks,
                &format!("{label} network.protocol.version"),
                span.str("network.protocol.version"),
                Some("1.1"),
            );
        }
        if list.len() == 5 {
            // The chunked response ends with its last chunk, 300 ms after the first; 5 ms
            // allows for the agent's monotonic-to-realtime mapping against python's clock.
            let chunked = &list[3];
            check_that(
                &mut checks,
                chunked.end_ns() + 5_000_000 >= last_chunk_ns,
                || {
                    format!(
                        "{side} /chunked span ends at {}, before the last chunk was written at {last_chunk_ns}",
                        chunked.end_ns()
                    )
                },
            );
            check_that(
                &mut checks,
                chunked.end_ns().saturating_sub(chunked.start_ns()) >= 300_000_000,
                || {
                    format!(
                        "{side} /chunked span lasts {} ns, less than the 300 ms the chunks took",
                        chunked.end_ns().saturating_sub(chunked.start_ns())
                    )
                },
            );
            let post = &list[4];
            check(
                &mut checks,
                &format!("{side} POST http.request.body.size"),
                post.int("http.request.body.size"),
                Some(body.len() as i64),
            );
        }
    }
    if servers.len() == 5 && clients.len() == 5 {
        for (c, s) in clients.iter().zip(&servers) {
            check_nested(&mut checks, s.str("url.path").unwrap_or("?"), c, s);
        }
    }
    // The request body is never exported: not in any attribute, not anywhere in a request.
    for span in &spans {
        for (key, value) in span.strings() {
            check_that(&mut checks, !value.contains(MARKER), || {
                format!(
                    "request body bytes exported in {key}={value:?} of {}",
                    span.summary()
                )
            });
        }
    }
    for received in receiver.received() {
        let encoded = received.request.encode_to_vec();
        check_that(
            &mut checks,
            !encoded
                .windows(MARKER.len())
                .any(|w| w == MARKER.as_bytes()),
            || "request body bytes found in an exported OTLP request".to_owned(),
        );
    }
    checks.finish(&context(&spans));
}

#[test]
fn pipelined_requests_give_two_spans_in_order() {
    // Both requests go out in one write before any response is read.
    const PIPELINER: &str = r#"
import re
port = int(sys.argv[1])
wait()
c = socket.create_connection(("127.0.0.1", port))
host = f"127.0.0.1:{port}".encode()
c.sendall(b"GET /ok HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
          b"GET /missing HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
data = recv_to_eof(c)
say("statuses", *[code.decode() for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)])
c.close()
"#;
    let (server, port) = keepalive_server();
    let mut client = Peer::python("pipelining client", PIPELINER, &[&port.to_string()]);
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let (spid, cpid) = (server.pid(), client.pid());
    let mut agent = Agent::start_otlp(&receiver, &[spid, cpid], &[]);

    client.send("go");
    assert_eq!(
        client.expect("statuses"),
        "200 404",
        "the peers themselves misbehaved"
    );
    client.finish();
    receiver.wait_spans("2 SERVER and 2 CLIENT spans", SPAN_WAIT, |s| {
        of_kind(s, spid, KIND_SERVER).len() >= 2 && of_kind(s, cpid, KIND_CLIENT).len() >= 2
    });
    agent.stop_ok();
    let spans = receiver.spans();
    let servers = of_kind(&spans, spid, KIND_SERVER);
    let clients = of_kind(&spans, cpid, KIND_CLIENT);

    let mut checks = Checks::default();
    check(&mut checks, "spans in all", spans.len(), 4);
    let got: Vec<(Option<&str>, Option<i64>)> = servers
        .iter()
        .map(|s| (s.str("url.path"), s.int("http.response.status_code")))
        .collect();
    check(
        &mut checks,
        "server spans (url.path, status), by start",
        got,
        vec![(Some("/ok"), Some(200)), (Some("/missing"), Some(404))],
    );
    let got: Vec<(Option<&str>, Option<i64>)> = clients
        .iter()
        .map(|s| (s.str("url.full"), s.int("http.response.status_code")))
        .collect();
    let (ok, missing) = (
        format!("http://127.0.0.1:{port}/ok"),
        format!("http://127.0.0.1:{port}/missing"),
    );
    check(
        &mut checks,
        "client spans (url.full, status), by start",
        got,
        vec![
            (Some(ok.as_str()), Some(200)),
            (Some(missing.as_str()), Some(404)),
        ],
    );
    if servers.len() == 2 && clients.len() == 2 {
        // Each exchange ends with its own response: the first before the second.
        check_that(
            &mut checks,
            servers[0].end_ns() <= servers[1].end_ns(),
            || "server: the first response must end no later than the second".to_owned(),
        );
        for (c, s) in clients.iter().zip(&servers) {
            check_nested(&mut checks, s.str("url.path").unwrap_or("?"), c, s);
        }
    }
    for span in servers.iter().chain(&clients) {
        check_timing(&mut checks, &span.summary(), span);
    }
    checks.finish(&context(&spans));
}

/// One traced request to python http.server exported over `protocol`: returns the receiver,
/// the server's pid and the spans.
fn export_one_request(protocol: Protocol, path: &str) -> (Receiver, u32, Vec<ReceivedSpan>) {
    let (server, port, _www) = http_server();
    let receiver = Receiver::start(protocol);
    let spid = server.pid();
    let mut agent = Agent::start_otlp(&receiver, &[spid], &[]);
    let url = format!("http://127.0.0.1:{port}{path}");
    curl_get(&url);
    receiver.wait_spans("the SERVER span", SPAN_WAIT, |s| {
        s.iter().any(|s| is_server_of(s, spid))
    });
    agent.stop_ok();
    let spans = receiver.spans();
    (receiver, spid, spans)
}

#[test]
fn otlp_grpc_export_reaches_a_tonic_receiver_gzipped() {
    let (receiver, spid, spans) = export_one_request(Protocol::Grpc, "/hello.txt?via=grpc");
    let span = the_span(&spans, "SERVER span", |s| is_server_of(s, spid));
    let mut checks = Checks::default();
    check(
        &mut checks,
        "url.query",
        span.str("url.query"),
        Some("via=grpc"),
    );
    check(
        &mut checks,
        "status code",
        span.int("http.response.status_code"),
        Some(200),
    );
    for received in receiver.received() {
        check(
            &mut checks,
            "grpc-encoding",
            received.header("grpc-encoding"),
            Some("gzip"),
        );
        check_that(
            &mut checks,
            received
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/grpc")),
            || {
                format!(
                    "content-type should be application/grpc: {:?}",
                    received.headers
                )
            },
        );
    }
    checks.finish(&context(&spans));
}

#[test]
fn otlp_http_protobuf_export_posts_gzipped_protobuf_to_v1_traces() {
    let (receiver, spid, spans) = export_one_request(Protocol::HttpProtobuf, "/hello.txt?via=http");
    let span = the_span(&spans, "SERVER span", |s| is_server_of(s, spid));
    let mut checks = Checks::default();
    check(
        &mut checks,
        "url.query",
        span.str("url.query"),
        Some("via=http"),
    );
    check(
        &mut checks,
        "status code",
        span.int("http.response.status_code"),
        Some(200),
    );
    for received in receiver.received() {
        check(&mut checks, "path", received.path.as_str(), "/v1/traces");
        check(
            &mut checks,
            "content-encoding",
            received.header("content-encoding"),
            Some("gzip"),
        );
        check(
            &mut checks,
            "content-type",
            received.header("content-type"),
            Some("application/x-protobuf"),
        );
    }
    checks.finish(&context(&spans));
}

#[test]
fn console_exporter_prints_the_trace_tree() {
    let (server, port, _www) = http_server();
    let spid = server.pid();
    let pid = spid.to_string();
    let mut agent = Agent::start_exporting(&["--exporter", "console", "--pid", &pid], &[]);
    let url = format!("http://127.0.0.1:{port}/hello.txt");
    curl_get(&url);
    // A trace is printed once it has been quiet for 500 ms.
    let printed = wait_until(SPAN_WAIT, || agent.stdout_text().contains("SERVER"));
    agent.stop_ok();
    let stdout = agent.stdout_text();
    assert!(
        printed,
        "no SERVER line on stdout within {SPAN_WAIT:?}:\n{stdout}"
    );
    // trace 4bf9...  (1 span, 3.7 ms)
    // └─ SERVER http.server (pid 1234)  GET /hello.txt  200  3.7 ms
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("SERVER"))
        .expect("checked above");
    let words: Vec<&str> = lines[at].split_whitespace().collect();
    let pid_word = format!("{spid})");
    let expected = [
        "SERVER",
        "http.server",
        "(pid",
        &pid_word,
        "GET",
        "/hello.txt",
        "200",
    ];
    assert!(
        words.windows(expected.len()).any(|w| w == expected),
        "expected a tree line with {expected:?}, got {:?}\n--- stdout ---\n{stdout}",
        lines[at]
    );
    let header = at.checked_sub(1).map(|i| lines[i]).unwrap_or_default();
    let trace_id = header
        .strip_prefix("trace ")
        .and_then(|rest| rest.split_whitespace().next());
    assert!(
        trace_id.is_some_and(|id| is_hex_id(id, 32)) && header.contains("(1 span,"),
        "the tree line should follow a `trace <id>  (1 span, ...)` line, got {header:?}\n--- stdout ---\n{stdout}"
    );
}

#[test]
fn jsonl_exporter_writes_otlp_json_lines_with_hex_ids() {
    let (server, port, _www) = http_server();
    let spid = server.pid();
    let out = TempDir::new("jsonl");
    let path = out.path().join("spans.jsonl");
    let path_arg = path.to_str().expect("utf-8 temp path").to_owned();
    let pid = spid.to_string();
    let mut agent = Agent::start_exporting(
        &["--exporter", "jsonl", "--output", &path_arg, "--pid", &pid],
        &[],
    );
    let url = format!("http://127.0.0.1:{port}/hello.txt?via=jsonl");
    curl_get(&url);
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    let written = wait_until(SPAN_WAIT, || read().contains("via=jsonl"));
    agent.stop_ok();
    let text = read();
    assert!(
        written,
        "the span never reached {path_arg} within {SPAN_WAIT:?}:\n{text}"
    );

    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("line {} is not JSON ({err}): {line}", n + 1));
        for rs in value["resourceSpans"]
            .as_array()
            .unwrap_or_else(|| panic!("line {} has no resourceSpans: {line}", n + 1))
        {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    let id = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                    assert!(
                        is_hex_id(&id("traceId"), 32),
                        "traceId is not 32 hex digits: {span}"
                    );
                    assert!(
                        is_hex_id(&id("spanId"), 16),
                        "spanId is not 16 hex digits: {span}"
                    );
                    let parent = id("parentSpanId");
                    assert!(
                        parent.is_empty() || is_hex_id(&parent, 16),
                        "parentSpanId: {span}"
                    );
                }
            }
        }
        // And it is an OTLP/JSON ExportTraceServiceRequest, as a collector would read it.
        let request: ExportTraceServiceRequest = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("line {} is not OTLP/JSON ({err}): {line}", n + 1));
        requests.push(request);
    }
    let spans = flatten(&requests);
    let span = the_span(&spans, "SERVER span", |s| is_server_of(s, spid));
    let mut checks = Checks::default();
    check(&mut checks, "name", span.span.name.as_str(), "GET");
    check(
        &mut checks,
        "url.path",
        span.str("url.path"),
        Some("/hello.txt"),
    );
    check(
        &mut checks,
        "url.query",
        span.str("url.query"),
        Some("via=jsonl"),
    );
    check(
        &mut checks,
        "status code",
        span.int("http.response.status_code"),
        Some(200),
    );
    resource_checks(&mut checks, "server", span, "http.server", spid);
    checks.finish(&format!("--- {path_arg} ---\n{text}"));
}

/// Makes `count` requests with one curl (one connection each: http.server is HTTP/1.0), query
/// `n=1..=count`; asserts each got 200.
fn requests(port: u16, count: usize) {
    let mut args = strings(&["-sS", "--max-time", "10", "-w", CURL_RESULT]);
    for n in 1..=count {
        args.extend([
            "-o".to_owned(),
            "/dev/null".to_owned(),
            format!("http://127.0.0.1:{port}/hello.txt?n={n}"),
        ]);
    }
    let mut curl = curl(&args);
    curl.send("go");
    let codes: Vec<u16> = (0..count).map(|_| curl_result(&mut curl).0).collect();
    assert_eq!(
        codes,
        vec![200; count],
        "the traced server must keep serving while the collector is down"
    );
    curl.finish();
}

fn queries(spans: &[ReceivedSpan]) -> Vec<String> {
    let mut found: Vec<String> = spans
        .iter()
        .map(|s| s.str("url.query").unwrap_or("(none)").to_owned())
        .collect();
    found.sort_by_key(|q| {
        q.trim_start_matches("n=")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    found
}

/// A loopback port nothing listens on yet: bound, noted, released. (Another process could
/// take it meanwhile; the receiver then fails to bind and says so.)
fn reserved_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}

#[test]
fn collector_down_then_up_gets_every_span_once() {
    const COUNT: usize = 20;
    let (server, port, _www) = http_server();
    let spid = server.pid();
    let addr = reserved_port();
    let endpoint = format!("http://{addr}");
    let pid = spid.to_string();
    let mut agent = Agent::start_exporting(
        &[
            "--exporter",
            "otlp",
            "--otlp-protocol",
            "grpc",
            "--otlp-endpoint",
            &endpoint,
            "--pid",
            &pid,
        ],
        &[],
    );
    let down_since = Instant::now();
    requests(port, COUNT);
    agent.wait_metric("tracer_spans_created_total", COUNT as f64, SPAN_WAIT);
    // Two failed attempts (the first, and the retry 5 s later): the spans wait through both.
    agent.wait_metric("tracer_export_errors_total", 2.0, SPAN_WAIT);
    assert_eq!(
        agent.metric("tracer_export_queue_length"),
        COUNT as f64,
        "spans held while down"
    );
    assert_eq!(
        agent.metric(r#"tracer_spans_dropped_total{reason="queue_full"}"#),
        0.0
    );
    agent.assert_running();
    // The outage the issue names: the collector stays away for 10 s in all.
    if let Some(rest) = Duration::from_secs(10).checked_sub(down_since.elapsed()) {
        std::thread::sleep(rest);
    }
    agent.assert_running();

    let receiver = Receiver::start_on(Protocol::Grpc, addr);
    let up_after = down_since.elapsed();
    // The next retry comes 10 s after the previous one at most.
    receiver.wait_spans(
        &format!("{COUNT} spans after the collector came up"),
        SPAN_WAIT,
        |s| s.len() >= COUNT,
    );
    // The receiver holds the spans a moment before the agent has counted the reply.
    agent.wait_metric("tracer_spans_exported_total", COUNT as f64, SPAN_WAIT);
    // Stopping flushes whatever is left, so a duplicate would show up below.
    let metrics = agent.metrics();
    agent.stop_ok();
    let spans = receiver.spans();
    let want: Vec<String> = (1..=COUNT).map(|n| format!("n={n}")).collect();
    let mut checks = Checks::default();
    check(
        &mut checks,
        "url.query of every span received (each once)",
        queries(&spans),
        want,
    );
    check_that(
        &mut checks,
        spans.iter().all(|s| is_server_of(s, spid)),
        || "a span not from the server".to_owned(),
    );
    let ids: BTreeSet<String> = spans.iter().map(ReceivedSpan::span_id).collect();
    check(&mut checks, "distinct span ids", ids.len(), COUNT);
    check(
        &mut checks,
        "queue_full drops",
        metric_value(
            &metrics,
            r#"tracer_spans_dropped_total{reason="queue_full"}"#,
        ),
        Some(0.0),
    );
    check(
        &mut checks,
        "tracer_spans_exported_total",
        metric_value(&metrics, "tracer_spans_exported_total"),
        Some(COUNT as f64),
    );
    checks.finish(&format!(
        "collector was down for {up_after:?}\n{}",
        context(&spans)
    ));
}

#[test]
fn tiny_queue_while_collector_down_keeps_the_first_spans_and_counts_the_rest() {
    // OTEL_BSP_MAX_QUEUE_SIZE bounds every span the exporter holds, including the batch being
    // retried (export/mod.rs): with 5, the first 5 spans wait for the collector and the other
    // 15 are dropped and counted as they come.
    const COUNT: usize = 20;
    const QUEUE: usize = 5;
    let (server, port, _www) = http_server();
    let spid = server.pid();
    let addr = reserved_port();
    let endpoint = format!("http://{addr}");
    let pid = spid.to_string();
    let queue = QUEUE.to_string();
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
        &[("OTEL_BSP_MAX_QUEUE_SIZE", &queue)],
    );
    requests(port, COUNT);
    agent.wait_metric("tracer_spans_created_total", COUNT as f64, SPAN_WAIT);
    agent.wait_metric("tracer_export_errors_total", 1.0, SPAN_WAIT);
    let dropped = r#"tracer_spans_dropped_total{reason="queue_full"}"#;
    assert_eq!(
        agent.metric(dropped),
        (COUNT - QUEUE) as f64,
        "queue_full drops while down"
    );
    assert_eq!(
        agent.metric("tracer_export_queue_length"),
        QUEUE as f64,
        "spans held while down"
    );
    agent.assert_running();
    assert_eq!(agent.readyz(), 200, "readyz while the collector is down");

    let receiver = Receiver::start_on(Protocol::HttpProtobuf, addr);
    receiver.wait_spans(
        &format!("{QUEUE} spans after the collector came up"),
        SPAN_WAIT,
        |s| s.len() >= QUEUE,
    );
    // The receiver holds the spans a moment before the agent has counted the reply.
    agent.wait_metric("tracer_spans_exported_total", QUEUE as f64, SPAN_WAIT);
    // Recovered without a restart: a request now goes straight through (its curl numbers it
    // n=1 again).
    requests(port, 1);
    agent.wait_metric("tracer_spans_exported_total", (QUEUE + 1) as f64, SPAN_WAIT);
    let metrics = agent.metrics();
    agent.stop_ok();
    let spans = receiver.spans();
    let want: Vec<String> = [1]
        .into_iter()
        .chain(1..=QUEUE)
        .map(|n| format!("n={n}"))
        .collect();
    let mut checks = Checks::default();
    check(
        &mut checks,
        "url.query of the spans received",
        queries(&spans),
        want,
    );
    check(
        &mut checks,
        "queue_full drops",
        metric_value(&metrics, dropped),
        Some((COUNT - QUEUE) as f64),
    );
    check(
        &mut checks,
        "tracer_spans_exported_total",
        metric_value(&metrics, "tracer_spans_exported_total"),
        Some((QUEUE + 1) as f64),
    );
    // Every span is delivered or counted as dropped, and queue_full is the only reason.
    let all_dropped: f64 = ["queue_full", "export_failed", "shutdown", "sampled_out"]
        .iter()
        .filter_map(|reason| {
            metric_value(
                &metrics,
                &format!(r#"tracer_spans_dropped_total{{reason="{reason}"}}"#),
            )
        })
        .sum();
    check(
        &mut checks,
        "spans delivered + dropped",
        spans.len() as f64 + all_dropped,
        (COUNT + 1) as f64,
    );
    checks.finish(&context(&spans));
}

#[test]
fn invalid_traceparent_starts_a_new_trace_and_is_counted() {
    const UPPER: &str = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
    const ZERO: &str = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let (server, port, _www) = http_server();
    let receiver = Receiver::start(Protocol::Grpc);
    let spid = server.pid();
    let mut agent = Agent::start_otlp(&receiver, &[spid], &[]);
    let series = |reason: &str| {
        format!(r#"tracer_parse_errors_total{{parser="tracecontext",reason="{reason}"}}"#)
    };
    let before = [
        agent.metric_or_zero(&series("uppercase_hex")),
        agent.metric_or_zero(&series("all_zero_trace_id")),
    ];
    assert_eq!(before, [0.0, 0.0], "no context errors before any request");

    let mut args = Vec::new();
    for (case, header) in [("upper", UPPER), ("zero", ZERO)] {
        if !args.is_empty() {
            args.push("--next".to_owned());
        }
        args.extend(strings(&[
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            "-w",
            CURL_RESULT,
            "-H",
        ]));
        args.push(format!("traceparent: {header}"));
        args.push(format!("http://127.0.0.1:{port}/hello.txt?case={case}"));
    }
    let mut curl = curl(&args);
    curl.send("go");
    assert_eq!(
        [curl_result(&mut curl).0, curl_result(&mut curl).0],
        [200, 200],
        "the peers themselves misbehaved"
    );
    curl.finish();
    receiver.wait_spans("2 SERVER spans", SPAN_WAIT, |s| {
        of_kind(s, spid, KIND_SERVER).len() >= 2
    });
    let metrics = agent.metrics();
    agent.stop_ok();
    let spans = receiver.spans();

    let mut checks = Checks::default();
    for (case, bad_trace) in [
        ("upper", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("zero", "00000000000000000000000000000000"),
    ] {
        let query = format!("case={case}");
        let span = the_span(&spans, &format!("SERVER span for {query}"), |s| {
            is_server_of(s, spid) && s.str("url.query") == Some(query.as_str())
        });
        check(
            &mut checks,
            &format!("{case}: parent span id"),
            span.parent_span_id(),
            String::new(),
        );
        check_ids(&mut checks, case, span);
        check_that(&mut checks, span.trace_id() != bad_trace, || {
            format!("{case}: the invalid header's trace id was used")
        });
        check(
            &mut checks,
            &format!("{case}: tracestate"),
            span.span.trace_state.as_str(),
            "",
        );
    }
    check(
        &mut checks,
        "uppercase_hex errors",
        metric_value(&metrics, &series("uppercase_hex")),
        Some(1.0),
    );
    check(
        &mut checks,
        "all_zero_trace_id errors",
        metric_value(&metrics, &series("all_zero_trace_id")),
        Some(1.0),
    );
    checks.finish(&format!("{}\n--- /metrics ---\n{metrics}", context(&spans)));
}

#[test]
fn non_http_traffic_gives_no_span() {
    const REDIS_SERVER: &str = r#"
ls = listener()
say("port", ls.getsockname()[1])
conn, _ = ls.accept()
for _ in range(3):
    assert recv_exact(conn, 14) == b"*1\r\n$4\r\nPING\r\n"
    conn.sendall(b"+PONG\r\n")
conn.close()
say("done")
"#;
    const REDIS_CLIENT: &str = r#"
port = int(sys.argv[1])
wait()
c = socket.create_connection(("127.0.0.1", port))
for _ in range(3):
    c.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert recv_exact(c, 7) == b"+PONG\r\n"
c.close()
say("done")
"#;
    let mut redis = Peer::python("redis-like server", REDIS_SERVER, &[]);
    let redis_port: u16 = redis.expect_num("port");
    let mut client = Peer::python(
        "redis-like client",
        REDIS_CLIENT,
        &[&redis_port.to_string()],
    );
    // A control: HTTP to a traced server afterwards must give a span, so "no span" above
    // means the agent skipped the traffic, not that export is broken.
    let (http, http_port, _www) = http_server();
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let pids = [redis.pid(), client.pid(), http.pid()];
    let mut agent = Agent::start_otlp(&receiver, &pids, &[]);

    client.send("go");
    client.expect("done");
    redis.expect("done");
    client.finish();
    redis.finish();
    // Both sides of 3 x (14 + 7) bytes: the agent saw the traffic.
    agent.wait_metric("tracer_bytes_captured_total", 126.0, SPAN_WAIT);
    let url = format!("http://127.0.0.1:{http_port}/hello.txt");
    curl_get(&url);
    // Spans leave in the order they were made, so once the control span is in, a span of the
    // redis-like exchange would be too.
    receiver.wait_spans("the control HTTP span", SPAN_WAIT, |s| {
        s.iter().any(|s| is_server_of(s, http.pid()))
    });
    let metrics = agent.metrics();
    agent.stop_ok();
    let spans = receiver.spans();
    assert!(
        spans.len() == 1 && is_server_of(&spans[0], http.pid()),
        "only the control span expected; the redis-like exchange (pids {}, {}) must give none\n{}",
        pids[0],
        pids[1],
        context(&spans)
    );
    assert_eq!(
        metric_value(&metrics, "tracer_spans_created_total"),
        Some(1.0),
        "spans created\n{metrics}"
    );
}
