//! Fault tests (issue #8, short versions): a collector that refuses, answers 503 or answers
//! slowly; a traced server killed mid-request; thousands of short connections; garbage and
//! half-open connections; the agent restarted under traffic. Each test runs the real agent
//! against real processes and checks what a user would: the traced service is unaffected,
//! spans arrive once, and what is lost is counted in `/metrics` as what was actually lost.
//!
//! Collectors that misbehave on purpose are [`FakeCollector`]: a small OTLP/HTTP endpoint on
//! std sockets that decodes each request, answers what the test asks for, and logs both.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use tracer_e2e::{
    Agent, Peer, TempDir,
    otlp_receiver::{
        KIND_SERVER, Protocol, ReceivedSpan, Receiver, STATUS_ERROR, flatten, summaries,
    },
    wait_for_listen, wait_until,
};

/// How long spans may take to arrive once the traffic is over.
const SPAN_WAIT: Duration = Duration::from_secs(20);

/// Every `tracer_spans_dropped_total` reason.
const DROP_REASONS: [&str; 4] = ["queue_full", "export_failed", "shutdown", "sampled_out"];

fn dropped(reason: &str) -> String {
    format!(r#"tracer_spans_dropped_total{{reason="{reason}"}}"#)
}

fn total_dropped(agent: &Agent) -> f64 {
    DROP_REASONS
        .iter()
        .map(|reason| agent.metric(&dropped(reason)))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// A collector that misbehaves on purpose.

/// What [`FakeCollector`] answers to the next export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ok,
    /// This status at once; 503 comes with `Retry-After: 1` so the agent retries within a
    /// second instead of after its 5 s backoff.
    Status(u16),
    /// 200 after this long.
    Slow(Duration),
}

/// One export request as the collector handled it.
struct Export {
    status: u16,
    spans: Vec<ReceivedSpan>,
}

/// An OTLP/HTTP (protobuf) endpoint on std sockets: one thread per connection, keep-alive.
#[derive(Clone)]
struct FakeCollector {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    log: Arc<Mutex<Vec<Export>>>,
    in_flight: Arc<AtomicUsize>,
    /// Most requests handled at once.
    max_in_flight: Arc<AtomicUsize>,
}

impl FakeCollector {
    fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake collector");
        let collector = Self {
            addr: listener.local_addr().expect("local_addr"),
            answer: Arc::new(Mutex::new(answer)),
            log: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
        };
        let shared = collector.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                thread::spawn(move || shared.serve(stream));
            }
        });
        collector
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Serves requests on one connection until the agent closes it.
    fn serve(&self, stream: TcpStream) {
        let mut writer = stream.try_clone().expect("clone the collector's stream");
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut length = 0usize;
            let mut gzip = false;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                let (name, value) = header.split_once(':').unwrap_or((header, ""));
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "content-encoding" => gzip = value.trim() == "gzip",
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let answer = *self.answer.lock().unwrap();
            let decoded = decode(&body, gzip);
            let status = match (&decoded, answer) {
                (None, _) => 400,
                (Some(_), Answer::Ok) => 200,
                (Some(_), Answer::Status(code)) => code,
                (Some(_), Answer::Slow(delay)) => {
                    thread::sleep(delay);
                    200
                }
            };
            self.log.lock().unwrap().push(Export {
                status,
                spans: decoded.map(|r| flatten(&[r])).unwrap_or_default(),
            });
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let retry_after = if status == 503 {
                "Retry-After: 1\r\n"
            } else {
                ""
            };
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/x-protobuf\r\n\
                 Content-Length: 0\r\n{retry_after}\r\n"
            );
            if writer.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Spans of the requests answered `status`, in arrival order.
    fn spans_answered(&self, status: u16) -> Vec<ReceivedSpan> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.status == status)
            .flat_map(|e| e.spans.clone())
            .collect()
    }

    /// How many requests were answered `status`.
    fn requests_answered(&self, status: u16) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.status == status)
            .count()
    }

    fn report(&self) -> String {
        let log = self.log.lock().unwrap();
        let lines: Vec<String> = log
            .iter()
            .map(|e| format!("HTTP {} with {} spans", e.status, e.spans.len()))
            .collect();
        format!(
            "--- fake collector on {}: {} request(s) ---\n{}",
            self.addr,
            log.len(),
            lines.join("\n")
        )
    }
}

fn decode(body: &[u8], gzip: bool) -> Option<ExportTraceServiceRequest> {
    let plain = if gzip {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut plain)
            .ok()?;
        plain
    } else {
        body.to_vec()
    };
    ExportTraceServiceRequest::decode(plain.as_slice()).ok()
}

fn start_agent_to(collector: &FakeCollector, pid: u32, env: &[(&str, &str)]) -> Agent {
    let endpoint = collector.endpoint();
    let pid = pid.to_string();
    Agent::start_exporting(
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
        env,
    )
}

// ---------------------------------------------------------------------------------------------
// Peers.

/// An untraced client: `count` GETs of /hello.txt?n=1..=count, each on its own connection,
/// `gap` seconds apart, once told "go". Says `done <answered 200> <slowest ms>`.
const CLIENT: &str = r#"
port, count, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
wait()
ok, worst = 0, 0.0
for n in range(1, count + 1):
    start = time.monotonic()
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"GET /hello.txt?n=%d HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % n)
    reply = recv_to_eof(c)
    c.close()
    worst = max(worst, time.monotonic() - start)
    if reply.startswith(b"HTTP/1.0 200"):
        ok += 1
    if gap:
        time.sleep(gap)
say("done", ok, int(worst * 1000))
"#;

/// Runs [`CLIENT`] to the end: (requests answered 200, slowest in ms).
fn run_client(port: u16, count: usize, gap: f64) -> (usize, u64) {
    let mut client = Peer::python(
        "client",
        CLIENT,
        &[&port.to_string(), &count.to_string(), &gap.to_string()],
    );
    client.send("go");
    let done = client.expect("done");
    let mut words = done.split_whitespace().map(str::parse::<u64>);
    let result = match (words.next(), words.next()) {
        (Some(Ok(ok)), Some(Ok(worst))) => (ok as usize, worst),
        _ => panic!("unexpected client line {done:?}\n{}", client.output()),
    };
    client.finish();
    result
}

fn http_server() -> (Peer, u16, TempDir) {
    tracer_e2e::http_server("hello.txt", "hello from the fault test\n")
}

/// The `n` of each span's `url.query` (`n=<n>`), sorted; duplicates kept.
fn numbers(spans: &[ReceivedSpan]) -> Vec<usize> {
    let mut found: Vec<usize> = spans
        .iter()
        .filter_map(|s| s.str("url.query")?.strip_prefix("n=")?.parse().ok())
        .collect();
    found.sort_unstable();
    found
}

fn one_to(count: usize) -> Vec<usize> {
    (1..=count).collect()
}

// ---------------------------------------------------------------------------------------------
// The collector misbehaves.

#[test]
fn collector_answering_503_then_200_gets_every_span_once_and_errors_are_counted() {
    const COUNT: usize = 10;
    let (server, port, _www) = http_server();
    let collector = FakeCollector::start(Answer::Status(503));
    let mut agent = start_agent_to(&collector, server.pid(), &[]);
    assert_eq!(
        run_client(port, COUNT, 0.0).0,
        COUNT,
        "the server must answer"
    );
    agent.wait_metric("tracer_spans_created_total", COUNT as f64, SPAN_WAIT);
    // Retry-After: 1 -> a retry about every second; wait for a few refusals.
    agent.wait_metric("tracer_export_errors_total", 3.0, SPAN_WAIT);
    assert_eq!(
        agent.metric("tracer_export_queue_length"),
        COUNT as f64,
        "spans held while the collector answers 503\n{}",
        collector.report()
    );
    collector.set(Answer::Ok);
    let ok = wait_until(SPAN_WAIT, || {
        collector.spans_answered(200).len() >= COUNT
            && agent.metric("tracer_spans_exported_total") >= COUNT as f64
    });
    assert!(
        ok,
        "spans not delivered after recovery\n{}",
        collector.report()
    );
    let errors = agent.metric("tracer_export_errors_total");
    let drops = total_dropped(&agent);
    agent.stop_ok();

    let delivered = collector.spans_answered(200);
    assert_eq!(
        numbers(&delivered),
        one_to(COUNT),
        "each request delivered exactly once\n{}",
        summaries(&delivered)
    );
    // Every refusal the collector made is one error the agent counted, no more, no less.
    assert_eq!(
        errors,
        collector.requests_answered(503) as f64,
        "tracer_export_errors_total vs the 503s sent\n{}",
        collector.report()
    );
    assert_eq!(drops, 0.0, "no span dropped: the queue never filled");
    assert_eq!(collector.requests_answered(400), 0, "undecodable requests");
}

#[test]
fn collector_answering_500_drops_the_batch_and_counts_exactly_what_it_refused() {
    // 500 is final in OTLP/HTTP: no retry, the spans of the refused request are dropped and
    // counted as export_failed; later batches go through once the collector accepts again.
    const FIRST: usize = 6;
    const SECOND: usize = 4;
    let (server, port, _www) = http_server();
    let collector = FakeCollector::start(Answer::Status(500));
    let mut agent = start_agent_to(&collector, server.pid(), &[]);
    assert_eq!(run_client(port, FIRST, 0.0).0, FIRST);
    agent.wait_metric(&dropped("export_failed"), FIRST as f64, SPAN_WAIT);
    collector.set(Answer::Ok);
    assert_eq!(run_client(port, SECOND, 0.0).0, SECOND);
    let ok = wait_until(SPAN_WAIT, || {
        collector.spans_answered(200).len() >= SECOND
            && agent.metric("tracer_spans_exported_total") >= SECOND as f64
    });
    assert!(ok, "second batch not delivered\n{}", collector.report());
    let failed = agent.metric(&dropped("export_failed"));
    let errors = agent.metric("tracer_export_errors_total");
    let exported = agent.metric("tracer_spans_exported_total");
    agent.stop_ok();

    let refused = collector.spans_answered(500);
    assert_eq!(
        numbers(&refused),
        one_to(FIRST),
        "the refused spans were each sent once, not retried\n{}",
        collector.report()
    );
    assert_eq!(
        failed,
        refused.len() as f64,
        "export_failed == spans refused"
    );
    assert_eq!(errors, collector.requests_answered(500) as f64);
    assert_eq!(exported, SECOND as f64);
    assert_eq!(numbers(&collector.spans_answered(200)), one_to(SECOND));
}

#[test]
fn slow_collector_does_not_slow_the_traced_server_and_gets_every_span() {
    // Each export takes 2 s (below the agent's 10 s request timeout): one batch in flight at
    // a time, the rest queue meanwhile.
    const COUNT: usize = 30;
    const SLOW: Duration = Duration::from_secs(2);
    let (server, port, _www) = http_server();
    let collector = FakeCollector::start(Answer::Slow(SLOW));
    let mut agent = start_agent_to(&collector, server.pid(), &[]);
    // ~3 s of traffic: several batches meet the slow collector.
    let started = Instant::now();
    let (ok, worst_ms) = run_client(port, COUNT, 0.1);
    let traffic = started.elapsed();
    assert_eq!(ok, COUNT, "the traced server must answer every request");
    let ok = wait_until(SPAN_WAIT, || {
        collector.spans_answered(200).len() >= COUNT
            && agent.metric("tracer_spans_exported_total") >= COUNT as f64
    });
    assert!(ok, "spans not delivered\n{}", collector.report());
    agent.assert_running();
    let errors = agent.metric("tracer_export_errors_total");
    let drops = total_dropped(&agent);
    agent.stop_ok();
    eprintln!(
        "slow collector: {COUNT} requests in {traffic:?}, slowest {worst_ms} ms, {} export \
         requests",
        collector.requests_answered(200)
    );
    // The agent exports from its own process: a traced request never waits for it. 1 s is far
    // above a loopback request on a loaded machine and far below the collector's 2 s.
    assert!(
        worst_ms < 1000,
        "slowest traced request took {worst_ms} ms while the collector was slow"
    );
    assert_eq!(numbers(&collector.spans_answered(200)), one_to(COUNT));
    assert_eq!(errors, 0.0, "2 s is within the export timeout");
    assert_eq!(drops, 0.0);
    assert!(
        collector.requests_answered(200) >= 2,
        "the traffic should span several batches\n{}",
        collector.report()
    );
    assert_eq!(
        collector.max_in_flight.load(Ordering::SeqCst),
        1,
        "one export in flight at a time"
    );
}

// ---------------------------------------------------------------------------------------------
// The traced process misbehaves.

#[test]
fn traced_server_killed_mid_request_gives_an_error_span_and_releases_its_state() {
    const SERVER: &str = r#"
ls = listener(8)
say("port", ls.getsockname()[1])
conn, _ = ls.accept()
data = b""
while b"\r\n\r\n" not in data:
    data += conn.recv(4096)
say("got")
time.sleep(600)
"#;
    let mut server = Peer::python("server", SERVER, &[]);
    let port: u16 = server.expect_num("port");
    let spid = server.pid();
    let receiver = Receiver::start(Protocol::Grpc);
    let mut agent = Agent::start_otlp(&receiver, &[spid], &[]);
    let conns_before = agent.metric("tracer_connections_tracked");
    let procs_before = agent.metric("tracer_processes_traced");

    let mut curl = Peer::spawn("curl", {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "15",
            "-w",
            "result %{http_code}\\n",
        ])
        .arg(format!("http://127.0.0.1:{port}/slow?n=1"));
        cmd
    });
    server.expect("got");
    // The agent has the request's head before the server dies.
    assert!(
        wait_until(SPAN_WAIT, || agent.metric("tracer_connections_tracked")
            > conns_before),
        "the request's connection was never tracked"
    );
    let started = Instant::now();
    drop(server); // SIGKILL to its process group
    assert_eq!(curl.expect("result"), "000", "curl got no answer");

    let spans = receiver.wait_spans("the killed request's span", SPAN_WAIT, |s| {
        s.iter().any(|s| s.pid() == Some(spid))
    });
    let took = started.elapsed();
    let span = &spans[0];
    assert_eq!(spans.len(), 1, "{}", summaries(&spans));
    assert_eq!(span.span.kind, KIND_SERVER, "{}", span.summary());
    assert_eq!(span.str("url.path"), Some("/slow"), "{}", span.summary());
    assert_eq!(span.str("error.type"), Some("_OTHER"), "{}", span.summary());
    assert_eq!(span.status_code(), STATUS_ERROR, "{}", span.summary());
    assert_eq!(
        span.int("http.response.status_code"),
        None,
        "{}",
        span.summary()
    );
    // The dead process's state is released. With --pid the processes gauge is refreshed every
    // 10 s (main.rs: walking /proc for descendants costs), hence most of this test's time.
    assert!(
        wait_until(SPAN_WAIT, || agent.metric("tracer_processes_traced")
            == procs_before
            && agent.metric("tracer_connections_tracked") == conns_before),
        "gauges did not return: processes {}, connections {} (before: {procs_before}, \
         {conns_before})",
        agent.metric("tracer_processes_traced"),
        agent.metric("tracer_connections_tracked")
    );
    agent.assert_running();
    assert_eq!(agent.readyz(), 200);
    eprintln!("killed mid-request: span {took:?} after the kill");
    agent.stop_ok();
}

#[test]
fn two_thousand_short_connections_give_one_span_each_or_counted_losses() {
    const COUNT: usize = 2_000;
    let (server, port, _www) = http_server();
    let receiver = Receiver::start(Protocol::Grpc);
    let mut agent = Agent::start_otlp(&receiver, &[server.pid()], &[]);
    let started = Instant::now();
    let (ok, worst_ms) = run_client(port, COUNT, 0.0);
    let traffic = started.elapsed();
    assert_eq!(ok, COUNT, "the traced server must answer every request");
    // Every request's events are in the ring buffer by now; give the agent time to turn them
    // into spans (a shortfall that stays is checked against the loss counters below).
    let all_made = wait_until(SPAN_WAIT, || {
        agent.metric("tracer_spans_created_total") >= COUNT as f64
    });
    agent.wait_metric(
        "tracer_spans_exported_total",
        agent.metric("tracer_spans_created_total") - total_dropped(&agent),
        SPAN_WAIT,
    );
    let waited = started.elapsed();
    let metrics = agent.metrics();
    agent.stop_ok();
    let spans = receiver.spans();
    let value = |series: &str| tracer_e2e::metric_value(&metrics, series).unwrap_or(0.0);
    let lost_events: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tracer_kernel_lost_events_total")
                || l.starts_with("tracer_userspace_lost_events_total")
                || l.starts_with("tracer_userspace_lost_bytes_total")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let created = value("tracer_spans_created_total");
    let exported = value("tracer_spans_exported_total");
    let drops: f64 = DROP_REASONS.iter().map(|r| value(&dropped(r))).sum();
    eprintln!(
        "{COUNT} short connections in {traffic:?} (slowest {worst_ms} ms), spans all made: \
         {all_made} after {waited:?}: created {created}, exported {exported}, received {}, \
         dropped {drops}, capture losses {lost_events}",
        spans.len()
    );

    let got = numbers(&spans);
    let distinct: BTreeSet<usize> = got.iter().copied().collect();
    assert_eq!(distinct.len(), got.len(), "a request gave two spans");
    assert!(got.iter().all(|n| (1..=COUNT).contains(n)));
    assert!(spans.iter().all(|s| s.span.kind == KIND_SERVER));
    // What left the agent is what the collector got, and what was made but not sent is
    // counted as dropped.
    assert_eq!(
        exported,
        spans.len() as f64,
        "exported vs received\n{metrics}"
    );
    assert_eq!(
        created,
        exported + drops,
        "created vs exported + dropped\n{metrics}"
    );
    // Requests without a span are only acceptable when capture says it lost something.
    let missing = COUNT - spans.len();
    assert!(
        missing == 0 || lost_events > 0.0 || drops > 0.0,
        "{missing} requests without a span and no loss counted\n{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// Peers that misbehave.

/// A traced HTTP/1.1 server on raw sockets: answers `200 ok` to each complete request head
/// (it never looks at the bytes), closes when the client does.
const RAW_SERVER: &str = r#"
import threading
def serve(c):
    buf = b""
    while True:
        try:
            chunk = c.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        while b"\r\n\r\n" in buf:
            _, buf = buf.split(b"\r\n\r\n", 1)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    c.close()
ls = listener(16)
say("port", ls.getsockname()[1])
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Bytes that are not HTTP and hold no `\r\n\r\n` (a fixed xorshift sequence).
fn garbage(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // No CR or LF at all, so no request head can ever end.
            match (state >> 24) as u8 {
                b'\r' | b'\n' => 0xff,
                byte => byte,
            }
        })
        .collect()
}

fn parse_errors(agent: &Agent) -> BTreeMap<String, f64> {
    agent
        .metrics()
        .lines()
        .filter(|l| l.starts_with("tracer_parse_errors_total{parser=\"http1\""))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

#[test]
fn garbage_and_half_open_connections_give_no_span_and_the_agent_stays_healthy() {
    let mut server = Peer::python("raw server", RAW_SERVER, &[]);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    let spid = server.pid();
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let mut agent = Agent::start_otlp(&receiver, &[spid], &[]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let captured_before = agent.metric("tracer_bytes_captured_total");

    // 1. Random bytes, then our side closes.
    let mut noise = TcpStream::connect(addr).expect("connect");
    noise.write_all(&garbage(4096)).expect("send garbage");
    noise.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    noise.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "the server answered garbage: {rest:?}");
    // 2. Connects and closes without a byte.
    drop(TcpStream::connect(addr).expect("connect"));
    // 3. Half a request head, held open while the agent is checked.
    let mut half = TcpStream::connect(addr).expect("connect");
    let head = b"GET /half HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ";
    half.write_all(head).expect("send half a request");
    // The agent saw the bytes (the garbage and the half head, read by the server).
    assert!(
        wait_until(SPAN_WAIT, || agent.metric("tracer_bytes_captured_total")
            >= captured_before + 4096.0 + head.len() as f64),
        "the agent did not see the garbage and the half request"
    );
    agent.assert_running();
    assert_eq!(agent.readyz(), 200, "ready while a request hangs half sent");
    drop(half);

    // A control request: its span proves export works, and spans leave in order.
    let mut control = TcpStream::connect(addr).expect("connect");
    control
        .write_all(b"GET /control HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send the control request");
    let mut reply = [0u8; 12];
    control.read_exact(&mut reply).expect("control reply");
    assert_eq!(&reply, b"HTTP/1.1 200");
    drop(control);
    receiver.wait_spans("the control span", SPAN_WAIT, |s| {
        s.iter().any(|s| s.str("url.path") == Some("/control"))
    });
    // The half request's connection closed before the control one: its close is processed.
    assert!(
        wait_until(SPAN_WAIT, || agent.metric("tracer_connections_tracked")
            == 0.0),
        "connections still tracked after every client closed"
    );
    let errors = parse_errors(&agent);
    let created = agent.metric("tracer_spans_created_total");
    agent.assert_running();
    assert_eq!(agent.readyz(), 200);
    agent.stop_ok();
    let spans = receiver.spans();
    assert_eq!(
        spans
            .iter()
            .filter_map(|s| s.str("url.path"))
            .collect::<Vec<_>>(),
        vec!["/control"],
        "only the control request is a span\n{}",
        summaries(&spans)
    );
    assert_eq!(created, 1.0, "spans created");
    // The garbage is no HTTP (left alone, not an error); the head cut short by the close is.
    assert_eq!(
        errors,
        BTreeMap::from([(
            r#"tracer_parse_errors_total{parser="http1",reason="truncated"}"#.to_owned(),
            1.0
        )]),
        "http1 parse errors"
    );
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// The agent restarts.

/// An HTTP/1.1 keep-alive server: 200 `ok` on any GET.
const KEEPALIVE_SERVER: &str = r#"
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
say("port", server.server_address[1])
server.serve_forever()
"#;

/// A client with one keep-alive connection: a GET (`n=1`), then, when told, another (`n=2`).
const TWO_REQUEST_CLIENT: &str = r#"
import http.client
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
for n in (1, 2):
    if n == 2:
        wait()
    conn.request("GET", f"/ok?n={n}")
    r = conn.getresponse()
    r.read()
    say("status", r.status)
"#;

/// The server thread of an idle keep-alive connection sits in read() when the agent starts, so
/// the syscall began before any probe was attached; the request that wakes it is still traced
/// like any other (the exit probe reads the syscall's arguments from the saved registers).
#[test]
fn a_read_already_blocked_when_the_agent_starts_is_captured() {
    let mut server = Peer::python("keep-alive server", KEEPALIVE_SERVER, &[]);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    let mut client = Peer::python("client", TWO_REQUEST_CLIENT, &[&port.to_string()]);
    assert_eq!(client.expect("status"), "200");
    // Let the handler thread go back to waiting for the next request.
    thread::sleep(Duration::from_millis(300));
    let receiver = Receiver::start(Protocol::Grpc);
    let mut agent = Agent::start_otlp(&receiver, &[server.pid()], &[]);
    client.send("next");
    assert_eq!(client.expect("status"), "200");
    client.finish();
    receiver.wait_spans("the request after the agent started", SPAN_WAIT, |spans| {
        spans.iter().any(|s| s.str("url.query") == Some("n=2"))
    });
    agent.stop_ok();
    let spans = receiver.spans();
    let second: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.str("url.query") == Some("n=2"))
        .collect();
    assert_eq!(second.len(), 1, "{}", summaries(&spans));
    assert_eq!(second[0].str("url.path"), Some("/ok"));
    assert_eq!(second[0].int("http.response.status_code"), Some(200));
    assert!(
        spans.iter().all(|s| s.str("url.query") != Some("n=1")),
        "a request made before the agent started has a span\n{}",
        summaries(&spans)
    );
}

/// An untraced client looping until told to stop: every 50 ms one GET on its one keep-alive
/// connection (`c=ka`) and one on a new connection (`c=new`). Then says `req <query> <start
/// unix ns> <end unix ns>` for each request that got a 200, and `done <ok> <failed> <first
/// failures>`.
const LOOP_CLIENT: &str = r#"
import http.client, threading
port = int(sys.argv[1])
ka = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
done, failed, stop = [], [], False
def run():
    n = 0
    while not stop:
        n += 1
        for kind in ("ka", "new"):
            conn = ka if kind == "ka" else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            query = f"c={kind}&n={n}"
            try:
                start = time.time_ns()
                conn.request("GET", "/ok?" + query)
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    done.append((query, start, time.time_ns()))
                else:
                    failed.append(f"{query}:{r.status}")
            except Exception as e:
                failed.append(f"{query}:{e!r}")
            if kind == "new":
                conn.close()
        time.sleep(0.05)
t = threading.Thread(target=run)
t.start()
say("started")
wait()
stop = True
t.join()
for query, start, end in done:
    say("req", query, start, end)
say("done", len(done), len(failed), ",".join(failed[:5]))
"#;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

#[test]
fn agent_restarted_under_traffic_traces_again_including_old_keepalive_connections() {
    let mut server = Peer::python("keep-alive server", KEEPALIVE_SERVER, &[]);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    let spid = server.pid();
    let receiver = Receiver::start(Protocol::Grpc);
    let mut first = Agent::start_otlp(&receiver, &[spid], &[]);
    let mut client = Peer::python("loop client", LOOP_CLIENT, &[&port.to_string()]);
    client.expect("started");
    let of = |spans: &[ReceivedSpan], kind: &str, after: u64| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| {
                s.start_ns() >= after
                    && s.str("url.query")
                        .is_some_and(|q| q.starts_with(&format!("c={kind}&")))
            })
            .cloned()
            .collect()
    };
    receiver.wait_spans("spans of both kinds from the first agent", SPAN_WAIT, |s| {
        !of(s, "ka", 0).is_empty() && !of(s, "new", 0).is_empty()
    });
    // A second more of traffic under each agent, for the count below.
    thread::sleep(Duration::from_secs(1));
    let stopping = unix_ns();
    first.stop_ok();

    let mut second = Agent::start_otlp(&receiver, &[spid], &[]);
    let ready = unix_ns();
    receiver.wait_spans(
        "spans of both kinds from the second agent",
        SPAN_WAIT,
        |s| !of(s, "ka", ready).is_empty() && !of(s, "new", ready).is_empty(),
    );
    thread::sleep(Duration::from_secs(1));
    client.send("stop");
    // (query, start, end) of every request that succeeded.
    let mut requests: Vec<(String, u64, u64)> = Vec::new();
    let done = loop {
        let line = client.line();
        if let Some(rest) = line.strip_prefix("done ") {
            break rest.to_owned();
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["req", query, start, end] => requests.push((
                (*query).to_owned(),
                start.parse().expect("start ns"),
                end.parse().expect("end ns"),
            )),
            _ => panic!("unexpected client line {line:?}"),
        }
    };
    client.finish();
    second.assert_running();
    // SIGTERM drains what the probes captured: every request made so far is in a span now.
    second.stop_ok();
    let spans = receiver.spans();
    drop(server);

    let failed = done.split(' ').nth(1);
    assert_eq!(
        failed,
        Some("0"),
        "the traced server failed requests across the restart: {done}"
    );
    // Every request made entirely while an agent ran is exactly one span; requests in the gap
    // (or across its edges) may have none, never two.
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for span in &spans {
        *count
            .entry(span.str("url.query").unwrap_or("(none)"))
            .or_default() += 1;
    }
    let traced: Vec<&(String, u64, u64)> = requests
        .iter()
        .filter(|(_, start, end)| *end < stopping || *start >= ready)
        .collect();
    let missing: Vec<&str> = traced
        .iter()
        .filter(|(query, _, _)| !count.contains_key(query.as_str()))
        .map(|(query, _, _)| query.as_str())
        .collect();
    let doubled: Vec<(&&str, &usize)> = count.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "restart: {} requests ok, agent down for {} ms, {} made while an agent ran, {} spans",
        requests.len(),
        (ready - stopping) / 1_000_000,
        traced.len(),
        spans.len()
    );
    assert!(
        missing.is_empty() && doubled.is_empty(),
        "requests made while an agent ran without a span: {missing:?}; several spans: \
         {doubled:?}\n{}",
        summaries(&spans)
    );
    // The keep-alive connection is one connection throughout: the same client port before the
    // restart and after it.
    let ports = |spans: Vec<ReceivedSpan>| -> BTreeSet<i64> {
        spans
            .iter()
            .filter_map(|s| s.int("network.peer.port"))
            .collect()
    };
    let before = ports(of(&spans, "ka", 0));
    let after = ports(of(&spans, "ka", ready));
    assert_eq!(
        before.len(),
        1,
        "one keep-alive connection\n{}",
        summaries(&spans)
    );
    assert_eq!(
        after, before,
        "the second agent traced the keep-alive connection opened before it started"
    );
}
