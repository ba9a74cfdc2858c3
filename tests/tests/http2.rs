//! HTTP/2 and gRPC end to end: real grpcio peers (Python, from PyPI), a Node.js h2c server
//! and curl, traced by the real agent and received on a real OTLP endpoint.
use std::{process::Command, time::Duration};

use tracer_e2e::{
    Agent, Peer,
    otlp_receiver::{
        KIND_CLIENT, KIND_SERVER, Protocol, ReceivedSpan, Receiver, STATUS_ERROR, STATUS_UNSET,
    },
    venv_python, wait_for_listen,
};

const SPAN_WAIT: Duration = Duration::from_secs(30);

/// A grpcio server with generic handlers (no generated code): unary `demo.Echo/Say` (NOT_FOUND
/// for "missing", slow for "slow"), server-streaming `demo.Echo/Count`. Each request's
/// `traceparent` metadata, if any, is printed.
const GRPC_SERVER: &str = r#"
import grpc, time
from concurrent import futures

def say(request, context):
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"slow":
        time.sleep(0.5)
    return b"hello " + request

def count(request, context):
    for i in range(int(request)):
        yield str(i).encode()

handlers = grpc.method_handlers_generic_handler("demo.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Count": grpc.unary_stream_rpc_method_handler(count),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handlers,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print("port", port, flush=True)
server.wait_for_termination()
"#;

/// A grpcio client on one channel, driven by lines: `say WORD [TRACEPARENT]`,
/// `slow` (0.1 s deadline), `count N`, `many N` (N concurrent calls). Answers `ok ...`.
const GRPC_CLIENT: &str = r#"
import grpc, sys
channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
say = channel.unary_unary("/demo.Echo/Say")
count = channel.unary_stream("/demo.Echo/Count")
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    try:
        if words[0] == "say":
            metadata = (("traceparent", words[2]),) if len(words) > 2 else None
            reply = say(words[1].encode(), metadata=metadata)
            print("ok", reply.decode(), flush=True)
        elif words[0] == "slow":
            say(b"slow", timeout=0.1)
            print("ok unexpected", flush=True)
        elif words[0] == "count":
            print("ok", len(list(count(words[1].encode()))), flush=True)
        elif words[0] == "many":
            calls = [say.future(b"m%d" % i) for i in range(int(words[1]))]
            print("ok", sum(1 for c in calls if c.result().startswith(b"hello")), flush=True)
    except grpc.RpcError as e:
        print("ok", e.code().name, flush=True)
"#;

struct Grpc {
    server: Peer,
    client: Peer,
}

impl Grpc {
    fn start() -> Self {
        let mut cmd = Command::new(venv_python());
        cmd.args(["-u", "-c", GRPC_SERVER]);
        let mut server = Peer::spawn("grpc server", cmd);
        let port: u16 = server.expect_num("port");
        wait_for_listen(port);
        let mut cmd = Command::new(venv_python());
        cmd.args(["-u", "-c", GRPC_CLIENT, &port.to_string()]);
        let mut client = Peer::spawn("grpc client", cmd);
        client.expect("ready");
        Self { server, client }
    }

    fn call(&mut self, line: &str) -> String {
        self.client.send(line);
        self.client.expect("ok")
    }
}

fn rpc_spans<'a>(spans: &'a [ReceivedSpan], kind: i32, method: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.span.kind == kind && s.str("rpc.method") == Some(method))
        .collect()
}

fn dump(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| s.summary())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn grpc_calls_become_rpc_spans_with_status_and_context() {
    let receiver = Receiver::start(Protocol::Grpc);
    let mut grpc = Grpc::start();
    let mut agent = Agent::start_otlp(&receiver, &[grpc.server.pid(), grpc.client.pid()], &[]);
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    assert_eq!(grpc.call("say world"), "hello world");
    assert_eq!(grpc.call("say missing"), "NOT_FOUND");
    assert_eq!(grpc.call("slow"), "DEADLINE_EXCEEDED");
    assert_eq!(grpc.call("count 5"), "5");
    assert_eq!(
        grpc.call(&format!("say traced {traceparent}")),
        "hello traced"
    );
    assert_eq!(grpc.call("many 20"), "20");
    // say x 4 (world, missing, slow, traced) + 20 concurrent, count x 1; both ends.
    let spans = receiver.wait_spans("the gRPC spans of both ends", SPAN_WAIT, |spans| {
        rpc_spans(spans, KIND_SERVER, "Say").len() >= 24
            && rpc_spans(spans, KIND_CLIENT, "Say").len() >= 24
            && !rpc_spans(spans, KIND_CLIENT, "Count").is_empty()
            && !rpc_spans(spans, KIND_SERVER, "Count").is_empty()
    });
    agent.stop_ok();
    let all = dump(&spans);

    // The plain call: name, attributes, status, and the server under the client.
    let with_peer = |kind: i32, peer: &str| -> &ReceivedSpan {
        let found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.span.kind == kind && s.str("rpc.method") == Some("Say"))
            .filter(|s| {
                s.int("rpc.grpc.status_code").is_some() || peer == "slow" // the deadline may leave the server without a status
            })
            .collect();
        assert!(!found.is_empty(), "no {kind} Say span:\n{all}");
        found[0]
    };
    let client = with_peer(KIND_CLIENT, "world");
    assert_eq!(client.span.name, "demo.Echo/Say", "{all}");
    assert_eq!(client.str("rpc.system"), Some("grpc"), "{all}");
    assert_eq!(client.str("rpc.service"), Some("demo.Echo"), "{all}");
    assert_eq!(client.str("network.protocol.version"), Some("2"), "{all}");

    let by_status = |kind: i32, code: i64| -> Vec<&ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.span.kind == kind && s.int("rpc.grpc.status_code") == Some(code))
            .collect()
    };
    // OK: 1 world + 1 traced + 20 many on each side (Count too).
    assert!(by_status(KIND_CLIENT, 0).len() >= 23, "{all}");
    assert!(by_status(KIND_SERVER, 0).len() >= 23, "{all}");
    for span in by_status(KIND_CLIENT, 0)
        .iter()
        .chain(&by_status(KIND_SERVER, 0))
    {
        assert_eq!(
            span.status_code(),
            STATUS_UNSET,
            "OK is not an error: {}",
            span.summary()
        );
    }
    // NOT_FOUND: an error for the client, not for the server.
    let (c404, s404) = (by_status(KIND_CLIENT, 5), by_status(KIND_SERVER, 5));
    assert_eq!((c404.len(), s404.len()), (1, 1), "NOT_FOUND spans:\n{all}");
    assert_eq!(c404[0].status_code(), STATUS_ERROR, "{all}");
    assert_eq!(s404[0].status_code(), STATUS_UNSET, "{all}");
    assert_eq!(
        s404[0].parent_span_id(),
        c404[0].span_id(),
        "server under client: {all}"
    );
    // DEADLINE_EXCEEDED: the client gave up: an error on the client span.
    let deadline: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            s.span.kind == KIND_CLIENT
                && s.str("rpc.method") == Some("Say")
                && s.status_code() == STATUS_ERROR
                && s.int("rpc.grpc.status_code") != Some(5)
        })
        .collect();
    assert_eq!(
        deadline.len(),
        1,
        "one failed client call (the deadline):\n{all}"
    );

    // Metadata carrying a traceparent: the client span takes its ids, the server joins.
    let traced: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id() == "0af7651916cd43dd8448eb211c80319c")
        .collect();
    assert_eq!(traced.len(), 2, "both ends of the traced call:\n{all}");
    let server = traced
        .iter()
        .find(|s| s.span.kind == KIND_SERVER)
        .expect("server");
    assert_eq!(server.parent_span_id(), "b7ad6b7169203331", "{all}");

    // Interleaved streams on one connection: every concurrent call has both ends, linked.
    let servers = rpc_spans(&spans, KIND_SERVER, "Say");
    let clients = rpc_spans(&spans, KIND_CLIENT, "Say");
    for server in &servers {
        if server.int("rpc.grpc.status_code") != Some(0) {
            continue;
        }
        assert!(
            clients.iter().any(
                |c| c.span_id() == server.parent_span_id() && c.trace_id() == server.trace_id()
            ),
            "server span without its client span as parent: {}\n{all}",
            server.summary()
        );
    }
    // Server streaming.
    let streaming = rpc_spans(&spans, KIND_SERVER, "Count");
    assert_eq!(streaming[0].int("rpc.grpc.status_code"), Some(0), "{all}");
}

#[test]
fn stable_rpc_conventions_on_request() {
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let mut grpc = Grpc::start();
    let mut agent = Agent::start_otlp(
        &receiver,
        &[grpc.server.pid()],
        &[("OTEL_SEMCONV_STABILITY_OPT_IN", "rpc")],
    );
    assert_eq!(grpc.call("say missing"), "NOT_FOUND");
    let spans = receiver.wait_spans("the server span", SPAN_WAIT, |spans| !spans.is_empty());
    agent.stop_ok();
    let span = &spans[0];
    assert_eq!(
        span.str("rpc.system.name"),
        Some("grpc"),
        "{}",
        span.summary()
    );
    assert_eq!(
        span.str("rpc.method"),
        Some("demo.Echo/Say"),
        "{}",
        span.summary()
    );
    assert_eq!(
        span.str("rpc.response.status_code"),
        Some("NOT_FOUND"),
        "{}",
        span.summary()
    );
    assert_eq!(
        span.str("rpc.system"),
        None,
        "old attributes are gone: {}",
        span.summary()
    );
}

#[test]
fn an_agent_started_on_an_open_channel_degrades_without_wrong_values() {
    let receiver = Receiver::start(Protocol::Grpc);
    let mut grpc = Grpc::start();
    // The channel's connection and its HPACK tables exist before the agent.
    for _ in 0..3 {
        assert_eq!(grpc.call("say before"), "hello before");
    }
    let mut agent = Agent::start_otlp(&receiver, &[grpc.server.pid(), grpc.client.pid()], &[]);
    for _ in 0..5 {
        assert_eq!(grpc.call("say after"), "hello after");
    }
    assert_eq!(grpc.call("count 3"), "3");
    let spans = receiver.wait_spans("spans of the calls after the start", SPAN_WAIT, |spans| {
        spans.len() >= 12
    });
    let metrics = agent.metrics();
    agent.stop_ok();
    let all = dump(&spans);
    // Whatever could not be decoded is missing, never wrong: a method is the one called.
    for span in &spans {
        if let Some(method) = span.str("rpc.method") {
            assert!(["Say", "Count"].contains(&method), "{all}");
        }
        assert!(
            span.int("rpc.grpc.status_code").is_none_or(|c| c == 0),
            "only OK calls were made: {all}"
        );
    }
    assert!(
        metrics.contains("parser=\"http2\""),
        "the http2 parse counters are exported:\n{metrics}"
    );
}

/// Node's built-in h2c server, answering every request with its path.
const H2C_SERVER: &str = r#"
const http2 = require("http2");
const server = http2.createServer();
server.on("stream", (stream, headers) => {
  const status = headers[":path"] === "/missing" ? 404 : 200;
  stream.respond({ ":status": status, "content-type": "text/plain" });
  stream.end("path " + headers[":path"]);
});
server.listen(0, "127.0.0.1", () => console.log("port " + server.address().port));
"#;

#[test]
fn curl_with_prior_knowledge_against_an_h2c_server_gives_http2_spans() {
    let receiver = Receiver::start(Protocol::Grpc);
    let mut cmd = Command::new("node");
    cmd.args(["-e", H2C_SERVER]);
    let mut server = Peer::spawn("h2c server (node)", cmd);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    let mut agent = Agent::start_otlp(&receiver, &[server.pid()], &[]);
    for path in ["/a?token=secret", "/missing"] {
        let out = Command::new("curl")
            .args(["-s", "--http2-prior-knowledge"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()
            .expect("run curl");
        assert!(out.status.success(), "curl failed: {out:?}");
    }
    let spans = receiver.wait_spans("two HTTP/2 server spans", SPAN_WAIT, |spans| {
        spans.len() >= 2
    });
    agent.stop_ok();
    let all = dump(&spans);
    let a = spans
        .iter()
        .find(|s| s.str("url.path") == Some("/a"))
        .unwrap_or_else(|| panic!("no /a span:\n{all}"));
    assert_eq!(a.span.kind, KIND_SERVER, "{all}");
    assert_eq!(a.span.name, "GET", "{all}");
    assert_eq!(a.str("url.query"), Some("token=REDACTED"), "{all}");
    assert_eq!(a.str("network.protocol.version"), Some("2"), "{all}");
    assert_eq!(a.int("http.response.status_code"), Some(200), "{all}");
    let missing = spans
        .iter()
        .find(|s| s.str("url.path") == Some("/missing"))
        .unwrap_or_else(|| panic!("no /missing span:\n{all}"));
    assert_eq!(missing.int("http.response.status_code"), Some(404), "{all}");
    assert_eq!(
        missing.status_code(),
        STATUS_UNSET,
        "4xx is no server error: {all}"
    );
}
