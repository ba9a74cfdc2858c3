//! Ground truth for trace reconstruction: real topologies of registry software, none of it
//! instrumented (but for one scenario), driven by a client that knows the true call graph, and
//! compared edge by edge with the spans the agent exported.
//!
//! Topology: curl -> nginx (reverse proxy, one worker: a single-threaded event loop) -> a
//! python ThreadingHTTPServer ("middle") -> a Node.js server ("leaf"). Request `i` goes to
//! `/chain/i`; the middle service calls `/leaf/i`. Every request therefore makes six spans
//! (curl CLIENT, nginx SERVER and CLIENT, middle SERVER and CLIENT, leaf SERVER) and five
//! parent edges, which the harness knows.
//!
//! Figures printed per scenario: parent-link precision (correct links / links made), recall
//! (correct links / true edges) and the share of requests that came out as exactly one
//! complete, correct trace.
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    process::Command,
    time::Duration,
};

use tracer_e2e::{
    Agent, Peer, TempDir, nginx_proxy,
    otlp_receiver::{KIND_CLIENT, KIND_SERVER, Protocol, ReceivedSpan, Receiver},
    python, venv_python, wait_for_listen,
};

const SPAN_WAIT: Duration = Duration::from_secs(60);

/// The middle service: `/chain/i` calls the leaf's `/leaf/i` on the handling thread. With
/// `sdk` it is instrumented by hand with the OpenTelemetry SDK (context extracted from the
/// request, injected into the call), exporting to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
const MIDDLE: &str = r#"
import http.server, urllib.request
LEAF = int(sys.argv[1])
SDK = sys.argv[2] == "sdk"
if SDK:
    from opentelemetry import trace, propagate
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    provider = TracerProvider(resource=Resource.create({"service.name": "middle-sdk"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("middle")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        rid = self.path.rsplit("/", 1)[-1]
        url = f"http://127.0.0.1:{LEAF}/leaf/{rid}"
        if SDK:
            carrier = {k.lower(): v for k, v in self.headers.items()}
            ctx = propagate.extract(carrier)
            with tracer.start_as_current_span("GET", context=ctx, kind=trace.SpanKind.SERVER,
                                              attributes={"url.path": self.path}):
                with tracer.start_as_current_span("GET", kind=trace.SpanKind.CLIENT,
                                                  attributes={"url.full": url}):
                    headers = {}
                    propagate.inject(headers)
                    body = urllib.request.urlopen(urllib.request.Request(url, headers=headers)).read()
        else:
            body = urllib.request.urlopen(url).read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True

server = Server(("127.0.0.1", 0), Handler)
say("port", server.server_address[1])
server.serve_forever()
"#;

/// The leaf: answers after 20 ms, so requests overlap all along the chain.
const LEAF: &str = r#"
const http = require("http");
const server = http.createServer((req, res) => {
  setTimeout(() => {
    const body = "leaf " + req.url;
    res.writeHead(200, { "Content-Length": Buffer.byteLength(body) });
    res.end(body);
  }, 20);
});
server.listen(0, "127.0.0.1", () => console.log("port " + server.address().port));
"#;

/// Runs curl (which the agent then traces as this process's child) on a config file:
/// `run PARALLEL CONFIG` answers `done STATUS`.
const DRIVER: &str = r#"
import subprocess
while True:
    words = wait().split()
    parallel, config = int(words[1]), words[2]
    cmd = ["curl", "-s", "-S", "--fail", "-K", config]
    if parallel > 1:
        cmd[1:1] = ["--parallel", "--parallel-max", str(parallel), "--parallel-immediate"]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    say("done", done.returncode)
"#;

/// The processes of one topology.
struct Topology {
    dir: TempDir,
    nginx: Peer,
    middle: Peer,
    leaf: Peer,
    driver: Peer,
    port: u16,
}

impl Topology {
    fn start(middle_env: &[(&str, &str)], sdk: bool) -> Self {
        let dir = TempDir::new("linking");
        let mut leaf_cmd = Command::new("node");
        leaf_cmd.args(["-e", LEAF]);
        let mut leaf = Peer::spawn("leaf (node)", leaf_cmd);
        let leaf_port: u16 = leaf.expect_num("port");
        wait_for_listen(leaf_port);

        let mut cmd = Command::new(if sdk {
            venv_python()
        } else {
            python().to_owned()
        });
        cmd.arg("-u")
            .arg("-c")
            .arg(format!("{}\n{MIDDLE}", tracer_e2e::PY_PRELUDE))
            .arg(leaf_port.to_string())
            .arg(if sdk { "sdk" } else { "plain" });
        for (key, value) in middle_env {
            cmd.env(key, value);
        }
        let mut middle = Peer::spawn("middle (python)", cmd);
        let _pid = middle.expect("pid");
        let middle_port: u16 = middle.expect_num("port");
        wait_for_listen(middle_port);

        let (nginx, port) = nginx_proxy(dir.path(), middle_port, "", "");

        let driver = Peer::python("driver", DRIVER, &[]);
        Self {
            dir,
            nginx,
            middle,
            leaf,
            driver,
            port,
        }
    }

    fn pids(&self) -> Vec<u32> {
        vec![
            self.nginx.pid(),
            self.middle.pid(),
            self.leaf.pid(),
            self.driver.pid(),
        ]
    }

    /// Sends requests `ids` through the chain, `parallel` at a time, each with the
    /// traceparent `context(i)` gives (if any).
    fn drive(
        &mut self,
        ids: std::ops::Range<u32>,
        parallel: u32,
        context: impl Fn(u32) -> Option<String>,
    ) {
        let mut config = String::new();
        for i in ids {
            if !config.is_empty() {
                config.push_str("next\n");
            }
            writeln!(config, "url = \"http://127.0.0.1:{}/chain/{i}\"", self.port).unwrap();
            if let Some(traceparent) = context(i) {
                writeln!(config, "header = \"traceparent: {traceparent}\"").unwrap();
            }
        }
        let path = self.dir.path().join(format!("curl-{parallel}.cfg"));
        fs::write(&path, config).expect("write the curl config");
        self.driver
            .send(&format!("run {parallel} {}", path.display()));
        let status = self.driver.expect("done");
        assert_eq!(status, "0", "curl failed: the topology itself is broken");
    }
}

/// Where a span sits in the true call graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    CurlClient,
    NginxServer,
    NginxClient,
    MiddleServer,
    MiddleClient,
    LeafServer,
}

/// (child, its true parent).
const EDGES: [(Role, Role); 5] = [
    (Role::NginxServer, Role::CurlClient),
    (Role::NginxClient, Role::NginxServer),
    (Role::MiddleServer, Role::NginxClient),
    (Role::MiddleClient, Role::MiddleServer),
    (Role::LeafServer, Role::MiddleClient),
];

/// The role and request id of a span, from its process and URL.
fn classify(span: &ReceivedSpan) -> Option<(Role, u32)> {
    let exe = span.resource_str("process.executable.name").unwrap_or("");
    let sdk = span.resource_str("service.name") == Some("middle-sdk");
    let kind = span.span.kind;
    let url = span.str("url.path").or_else(|| span.str("url.full"))?;
    let id: u32 = url.rsplit('/').next()?.parse().ok()?;
    let role = match (kind, exe, sdk) {
        (KIND_CLIENT, "curl", _) => Role::CurlClient,
        (KIND_SERVER, "nginx", _) => Role::NginxServer,
        (KIND_CLIENT, "nginx", _) => Role::NginxClient,
        (KIND_SERVER, _, true) => Role::MiddleServer,
        (KIND_CLIENT, _, true) => Role::MiddleClient,
        (KIND_SERVER, e, _) if e.starts_with("python") => Role::MiddleServer,
        (KIND_CLIENT, e, _) if e.starts_with("python") => Role::MiddleClient,
        (KIND_SERVER, "node", _) => Role::LeafServer,
        _ => return None,
    };
    Some((role, id))
}

/// How the exported spans compare with the true call graph.
#[derive(Debug, Default)]
struct Score {
    requests: usize,
    true_edges: usize,
    /// Child spans (of the five child roles) that have a parent.
    linked: usize,
    correct: usize,
    /// Requests whose six spans exist once each, share one trace and have every edge right.
    complete: usize,
    /// Spans of one role and request seen more than once.
    duplicates: usize,
    /// Requests whose spans form one tree: one trace, one root, every parent present.
    one_tree: usize,
    /// Per edge, how many were right (for the report).
    per_edge: BTreeMap<(Role, Role), usize>,
    /// Link methods of wrong or missing links (from the agent's attribute).
    misses: BTreeMap<String, usize>,
    /// Most requests nginx was serving at once (from its SERVER spans' times).
    max_in_flight: usize,
}

impl Score {
    fn of(spans: &[ReceivedSpan], ids: std::ops::Range<u32>) -> Self {
        let mut by: HashMap<(Role, u32), Vec<&ReceivedSpan>> = HashMap::new();
        for span in spans {
            if let Some(key) = classify(span) {
                by.entry(key).or_default().push(span);
            }
        }
        let mut score = Score {
            max_in_flight: max_overlap(
                by.iter()
                    .filter(|((role, _), _)| *role == Role::NginxServer)
                    .flat_map(|(_, v)| v.iter().map(|s| (s.start_ns(), s.end_ns()))),
            ),
            ..Score::default()
        };
        for i in ids {
            score.requests += 1;
            let one = |role: Role| by.get(&(role, i)).and_then(|v| v.first().copied());
            let mut all_right = true;
            for role in [
                Role::CurlClient,
                Role::NginxServer,
                Role::NginxClient,
                Role::MiddleServer,
                Role::MiddleClient,
                Role::LeafServer,
            ] {
                match by.get(&(role, i)).map_or(0, Vec::len) {
                    1 => {}
                    0 => all_right = false,
                    n => {
                        score.duplicates += n - 1;
                        all_right = false;
                    }
                }
            }
            for (child_role, parent_role) in EDGES {
                score.true_edges += 1;
                let Some(child) = one(child_role) else {
                    continue;
                };
                let linked = !child.parent_span_id().is_empty()
                    && child.parent_span_id() != "0000000000000000";
                score.linked += usize::from(linked);
                let right = one(parent_role).is_some_and(|parent| {
                    linked
                        && child.parent_span_id() == parent.span_id()
                        && child.trace_id() == parent.trace_id()
                });
                if right {
                    score.correct += 1;
                    *score.per_edge.entry((child_role, parent_role)).or_default() += 1;
                } else {
                    all_right = false;
                    let method = child.str("tracer_agent.link").unwrap_or("(sdk)").to_owned();
                    *score
                        .misses
                        .entry(format!("{child_role:?}<-{parent_role:?} via {method}"))
                        .or_default() += 1;
                }
            }
            score.complete += usize::from(all_right);
            // One tree: every span of the request in one trace, exactly one without a parent
            // among them.
            let mine: Vec<&ReceivedSpan> = by
                .iter()
                .filter(|((_, id), _)| *id == i)
                .flat_map(|(_, v)| v.iter().copied())
                .collect();
            let one_trace = mine.windows(2).all(|w| w[0].trace_id() == w[1].trace_id());
            let roots = mine
                .iter()
                .filter(|s| !mine.iter().any(|p| p.span_id() == s.parent_span_id()))
                .count();
            score.one_tree += usize::from(!mine.is_empty() && one_trace && roots == 1);
        }
        score
    }

    fn precision(&self) -> f64 {
        self.correct as f64 / self.linked.max(1) as f64
    }

    fn recall(&self) -> f64 {
        self.correct as f64 / self.true_edges.max(1) as f64
    }

    fn complete_share(&self) -> f64 {
        self.complete as f64 / self.requests.max(1) as f64
    }

    fn report(&self, scenario: &str) -> String {
        let mut text = format!(
            "linking [{scenario}]: {} requests, {} true edges: precision {:.2}% ({}/{} links \
             made), recall {:.2}%, complete traces {:.2}%, one tree {}/{}, duplicates {}, \
             at most {} requests in flight at nginx",
            self.requests,
            self.true_edges,
            100.0 * self.precision(),
            self.correct,
            self.linked,
            100.0 * self.recall(),
            100.0 * self.complete_share(),
            self.one_tree,
            self.requests,
            self.duplicates,
            self.max_in_flight,
        );
        for (what, n) in &self.misses {
            let _ = write!(text, "\n  wrong or missing: {what}: {n}");
        }
        text
    }
}

/// The most intervals that overlap at one instant.
fn max_overlap(intervals: impl Iterator<Item = (u64, u64)>) -> usize {
    let mut edges: Vec<(u64, i32)> = intervals
        .flat_map(|(start, end)| [(start, 1), (end, -1)])
        .collect();
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        max = max.max(now);
    }
    usize::try_from(max).unwrap_or(0)
}

/// Runs `count` requests, `parallel` at a time, and waits until the spans of every request
/// that should come from the agent (and the SDK) are in.
fn run(
    scenario: &str,
    middle_env: &[(&str, &str)],
    sdk: bool,
    count: u32,
    parallel: u32,
    context: impl Fn(u32) -> Option<String>,
) -> Score {
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let mut env: Vec<(&str, &str)> = middle_env.to_vec();
    let endpoint = format!("{}/v1/traces", receiver.endpoint());
    if sdk {
        env.push(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()));
    }
    let mut topology = Topology::start(&env, sdk);
    let mut agent = Agent::start_otlp(&receiver, &topology.pids(), &[]);
    topology.drive(0..count, parallel, context);
    let expected = 6 * count as usize;
    receiver.wait_spans(
        &format!("{expected} spans of {count} requests"),
        SPAN_WAIT,
        |spans| spans.iter().filter(|s| classify(s).is_some()).count() >= expected,
    );
    // Late duplicates would show up within the export interval.
    std::thread::sleep(Duration::from_millis(500));
    let spans = receiver.spans();
    agent.stop_ok();
    let score = Score::of(&spans, 0..count);
    eprintln!("{}", score.report(scenario));
    println!("{}", score.report(scenario));
    score
}

fn traceparent(i: u32) -> Option<String> {
    Some(format!(
        "00-{:032x}-{:016x}-01",
        0xabc0_0000 + u64::from(i),
        0x5eed_0000 + u64::from(i)
    ))
}

#[test]
fn sequential_requests_through_the_chain_come_out_as_one_exact_trace_each() {
    let score = run("sequential", &[], false, 20, 1, |_| None);
    assert_eq!(score.duplicates, 0, "{}", score.report("sequential"));
    assert_eq!(
        score.correct,
        score.true_edges,
        "{}",
        score.report("sequential")
    );
    assert_eq!(
        score.complete,
        score.requests,
        "{}",
        score.report("sequential")
    );
}

#[test]
fn an_entry_traceparent_puts_the_whole_tree_under_it() {
    let score = run(
        "sequential, entry traceparent",
        &[],
        false,
        20,
        1,
        traceparent,
    );
    assert_eq!(
        score.correct,
        score.true_edges,
        "{}",
        score.report("traceparent")
    );
    assert_eq!(
        score.complete,
        score.requests,
        "{}",
        score.report("traceparent")
    );
}

#[test]
fn fifty_requests_in_flight_link_with_high_precision_and_recall() {
    let count = 300;
    let score = run("50 in flight", &[], false, count, 50, |_| None);
    let report = score.report("50 in flight");
    assert!(
        score.max_in_flight >= 40,
        "the load was not concurrent: {report}"
    );
    assert_eq!(score.duplicates, 0, "{report}");
    assert!(score.precision() >= 0.99, "precision below 99%: {report}");
    assert!(score.recall() >= 0.95, "recall below 95%: {report}");
}

#[test]
fn fifty_in_flight_with_entry_traceparents_link_with_high_precision_and_recall() {
    let score = run(
        "50 in flight, entry traceparent",
        &[],
        false,
        300,
        50,
        traceparent,
    );
    let report = score.report("50 in flight, traceparent");
    assert!(
        score.max_in_flight >= 40,
        "the load was not concurrent: {report}"
    );
    assert!(score.precision() >= 0.99, "precision below 99%: {report}");
    assert!(score.recall() >= 0.95, "recall below 95%: {report}");
}

#[test]
fn an_instrumented_middle_service_gets_no_duplicate_spans_and_one_tree() {
    // The SDK's own spans replace the agent's for the middle service. nginx forwards the
    // entry's traceparent verbatim, so the SDK's server span hangs under curl's span, not
    // under nginx's client span (no agent can change that without rewriting traffic): the
    // request is still one trace and one tree.
    let score = run("instrumented middle", &[], true, 20, 1, traceparent);
    let report = score.report("instrumented middle");
    assert_eq!(score.duplicates, 0, "{report}");
    assert_eq!(score.one_tree, score.requests, "{report}");
}
