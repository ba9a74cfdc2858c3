//! The http/protobuf client against a scripted local collector: Retry-After, which statuses
//! are retried, one kept-alive connection for every batch, partial success, what each request
//! carries.

pub mod export_support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use export_support::{resource, simple_items, wait_until};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tracer_agent::export::{ExportConfig, Exporter, ExporterKind, OtlpProtocol, RetryConfig};
use tracer_agent::metrics::{Metrics, SpanDrop};

const LIMIT: Duration = Duration::from_secs(10);

/// One scripted answer: status, extra headers, body.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
}

struct Seen {
    at: Instant,
    headers: hyper::HeaderMap,
    path: String,
    /// None when the answer was a failure (the body is not decoded then).
    request: Option<ExportTraceServiceRequest>,
}

/// A collector answering from a script (then 200 with an empty body).
#[derive(Clone, Default)]
struct Collector {
    script: Arc<Mutex<VecDeque<Answer>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    addr: Arc<Mutex<Option<std::net::SocketAddr>>>,
}

impl Collector {
    async fn start(script: impl IntoIterator<Item = Answer>) -> Self {
        let collector = Self {
            script: Arc::new(Mutex::new(script.into_iter().collect())),
            ..Self::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        *collector.addr.lock().unwrap() = Some(listener.local_addr().unwrap());
        let state = collector.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| state.clone().handle(request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        collector
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr.lock().unwrap().unwrap())
    }

    async fn handle(self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Answer::status(200));
        let request = (answer.status == 200).then(|| {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(body.as_ref())
                .read_to_end(&mut plain)
                .unwrap();
            ExportTraceServiceRequest::decode(plain.as_slice()).unwrap()
        });
        self.seen.lock().unwrap().push(Seen {
            at: Instant::now(),
            headers: parts.headers,
            path: parts.uri.path().to_owned(),
            request,
        });
        let mut response = Response::new(Full::new(Bytes::from(answer.body)));
        *response.status_mut() = StatusCode::from_u16(answer.status).unwrap();
        for (name, value) in answer.headers {
            response
                .headers_mut()
                .insert(name, hyper::header::HeaderValue::from_str(&value).unwrap());
        }
        Ok(response)
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn accepted_spans(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|seen| seen.request.as_ref())
            .flat_map(|request| &request.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum()
    }
}

fn config(endpoint: String, initial_backoff: Duration) -> ExportConfig {
    let mut config = ExportConfig::new(ExporterKind::Otlp {
        protocol: Some(OtlpProtocol::HttpProtobuf),
        endpoint: Some(endpoint),
    });
    config.schedule_delay = Duration::from_millis(20);
    config.export_timeout = Duration::from_secs(5);
    config.retry = RetryConfig {
        initial_backoff,
        max_backoff: initial_backoff,
        give_up_after: Duration::from_secs(60),
    };
    config
}

#[tokio::test]
async fn retry_after_is_honoured_instead_of_the_backoff() {
    let collector = Collector::start([Answer {
        headers: vec![("retry-after", "1".to_owned())],
        ..Answer::status(429)
    }])
    .await;
    let metrics = Arc::new(Metrics::new());
    // Our own backoff would wait a minute: only Retry-After brings the retry within the limit.
    let (exporter, handle) = Exporter::start(
        config(collector.endpoint(), Duration::from_secs(60)),
        metrics.clone(),
    )
    .unwrap();
    for item in simple_items(3, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || collector.accepted_spans() == 3).await);
    exporter.shutdown(Duration::from_secs(2)).await;
    let seen = collector.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}"
    );
    assert_eq!(metrics.export_errors.get(), 1);
    assert_eq!(metrics.spans_exported.get(), 3);
}

#[tokio::test]
async fn throttling_and_gateway_errors_are_retried() {
    for status in [429, 502, 503, 504] {
        let collector = Collector::start([Answer::status(status)]).await;
        let metrics = Arc::new(Metrics::new());
        let (exporter, handle) = Exporter::start(
            config(collector.endpoint(), Duration::from_millis(50)),
            metrics.clone(),
        )
        .unwrap();
        for item in simple_items(2, 1, 1, &resource("python3", 1)) {
            assert!(handle.submit(item));
        }
        assert!(
            wait_until(LIMIT, || collector.accepted_spans() == 2).await,
            "{status}"
        );
        exporter.shutdown(Duration::from_secs(2)).await;
        assert_eq!(collector.requests(), 2, "{status}");
        assert_eq!(metrics.spans_exported.get(), 2, "{status}");
        assert_eq!(
            metrics.spans_dropped(SpanDrop::ExportFailed).get(),
            0,
            "{status}"
        );
    }
}

#[tokio::test]
async fn other_failures_are_final() {
    for status in [400, 401, 403, 404, 413, 500, 501] {
        let collector = Collector::start([Answer::status(status)]).await;
        let metrics = Arc::new(Metrics::new());
        let (exporter, handle) = Exporter::start(
            config(collector.endpoint(), Duration::from_millis(50)),
            metrics.clone(),
        )
        .unwrap();
        for item in simple_items(2, 1, 1, &resource("python3", 1)) {
            assert!(handle.submit(item));
        }
        assert!(
            wait_until(LIMIT, || metrics
                .spans_dropped(SpanDrop::ExportFailed)
                .get()
                == 2)
            .await,
            "{status}"
        );
        // Time for a retry, had there been one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        exporter.shutdown(Duration::from_secs(1)).await;
        assert_eq!(collector.requests(), 1, "{status}");
        assert_eq!(metrics.spans_exported.get(), 0, "{status}");
    }
}

#[tokio::test]
async fn batches_share_one_kept_alive_connection() {
    let collector = Collector::start([]).await;
    let metrics = Arc::new(Metrics::new());
    let (exporter, handle) = Exporter::start(
        config(collector.endpoint(), Duration::from_millis(50)),
        metrics.clone(),
    )
    .unwrap();
    for batch in 0..3_u64 {
        for item in simple_items(2, 1 + batch * 2, 1, &resource("python3", 1)) {
            assert!(handle.submit(item));
        }
        let expected = (batch as usize + 1) * 2;
        assert!(wait_until(LIMIT, || collector.accepted_spans() == expected).await);
    }
    exporter.shutdown(Duration::from_secs(2)).await;
    assert_eq!(collector.requests(), 3);
    assert_eq!(collector.connections.load(Ordering::SeqCst), 1);
    for seen in collector.seen.lock().unwrap().iter() {
        assert_eq!(seen.path, "/v1/traces");
        let header = |name: &str| seen.headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(header("content-type"), Some("application/x-protobuf"));
        assert_eq!(header("content-encoding"), Some("gzip"));
        assert!(header("content-length").is_some());
        assert!(
            header("user-agent").is_some_and(|agent| agent.starts_with("tracer-agent/")),
            "{:?}",
            header("user-agent")
        );
    }
}

#[tokio::test]
async fn a_partial_success_counts_as_delivered() {
    let answer = ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess {
            rejected_spans: 1,
            error_message: "span too old".to_owned(),
        }),
    };
    let collector = Collector::start([Answer {
        headers: vec![("content-type", "application/x-protobuf".to_owned())],
        body: answer.encode_to_vec(),
        ..Answer::status(200)
    }])
    .await;
    let metrics = Arc::new(Metrics::new());
    let (exporter, handle) = Exporter::start(
        config(collector.endpoint(), Duration::from_millis(50)),
        metrics.clone(),
    )
    .unwrap();
    for item in simple_items(2, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || metrics.spans_exported.get() == 2).await);
    exporter.shutdown(Duration::from_secs(1)).await;
    assert_eq!(collector.requests(), 1);
    assert_eq!(metrics.export_errors.get(), 0);
}
