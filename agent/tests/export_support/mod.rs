//! Shared by the export_*.rs tests: span and resource builders, and real local OTLP receivers
//! (gRPC on tonic, HTTP/protobuf on hyper) that record what arrives.
//! Each test file declares it `pub mod`, so the parts a file does not use are not dead code.

use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue as ProtoKeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as ProtoValue;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prost::Message as _;
use tokio::net::TcpListener;
use tracer_agent::export::ExportItem;

pub const TRACE: u128 = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736;

/// 2024-01-01T00:00:00Z plus `millis`.
pub fn at(millis: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(1_704_067_200)
        + Duration::from_secs_f64(millis / 1e3)
}

/// A process's resource, with telemetry.sdk.* naming the agent as the span stage does.
pub fn resource(service: &str, pid: i64) -> Arc<Resource> {
    Arc::new(
        Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", service.to_owned()),
                KeyValue::new("process.pid", pid),
                KeyValue::new("telemetry.sdk.name", "tracer-agent"),
                KeyValue::new("telemetry.sdk.language", "rust"),
                KeyValue::new("telemetry.sdk.version", "0.1.0"),
            ])
            .build(),
    )
}

pub struct SpanSpec {
    pub trace: u128,
    pub id: u64,
    pub parent: u64,
    pub kind: SpanKind,
    pub name: &'static str,
    pub start_ms: f64,
    pub end_ms: f64,
    pub attributes: Vec<KeyValue>,
    pub error: bool,
}

impl SpanSpec {
    pub fn new(id: u64, parent: u64, kind: SpanKind) -> Self {
        Self {
            trace: TRACE,
            id,
            parent,
            kind,
            name: "GET",
            start_ms: 0.0,
            end_ms: 1.0,
            attributes: Vec::new(),
            error: false,
        }
    }

    pub fn build(self) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(self.trace),
                SpanId::from(self.id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(self.parent),
            parent_span_is_remote: false,
            span_kind: self.kind,
            name: self.name.into(),
            start_time: at(self.start_ms),
            end_time: at(self.end_ms),
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if self.error {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: InstrumentationScope::builder("tracer-agent").build(),
        }
    }
}

/// `count` simple spans of one process, ids `first_id..`.
pub fn simple_items(
    count: u64,
    first_id: u64,
    resource_id: u64,
    resource: &Arc<Resource>,
) -> Vec<ExportItem> {
    (first_id..first_id + count)
        .map(|id| ExportItem {
            resource_id,
            resource: Arc::clone(resource),
            span: SpanSpec::new(id, 0, SpanKind::Server).build(),
        })
        .collect()
}

/// What a receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Accept,
    /// gRPC status code (gRPC receiver) or HTTP status (HTTP receiver).
    Fail(i32),
}

/// One accepted request.
#[derive(Clone, Debug)]
pub struct Received {
    /// Lowercase header names with their values (gRPC metadata or HTTP headers).
    pub headers: Vec<(String, String)>,
    pub path: String,
    pub request: ExportTraceServiceRequest,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Shared state of a receiver.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    /// Requests answered with a failure.
    refused: Arc<Mutex<usize>>,
}

impl Receiver {
    fn new(addr: SocketAddr, answer: Answer) -> Self {
        Self {
            addr,
            received: Arc::default(),
            answer: Arc::new(Mutex::new(answer)),
            refused: Arc::default(),
        }
    }

    pub fn set_answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn refused(&self) -> usize {
        *self.refused.lock().unwrap()
    }

    pub fn resource_spans(&self) -> Vec<ResourceSpans> {
        self.received()
            .into_iter()
            .flat_map(|received| received.request.resource_spans)
            .collect()
    }

    /// Span ids of every accepted span, in arrival order.
    pub fn span_ids(&self) -> Vec<u64> {
        self.resource_spans()
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .map(|span| u64::from_be_bytes(span.span_id.as_slice().try_into().unwrap()))
            .collect()
    }

    /// What to answer now; counts refusals.
    fn decide(&self) -> Answer {
        let answer = *self.answer.lock().unwrap();
        if answer != Answer::Accept {
            *self.refused.lock().unwrap() += 1;
        }
        answer
    }

    fn record(&self, received: Received) {
        self.received.lock().unwrap().push(received);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Shows the agent's log lines in a failing test's output.
pub fn init_logs() {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_level(log::LevelFilter::Debug)
        .try_init();
}

/// Polls `condition` every 20 ms for up to `limit`.
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

pub async fn local_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// An address nothing listens on (yet): bound, noted, released.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

// ---- gRPC ----------------------------------------------------------------------------------

struct GrpcService(Receiver);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Answer::Fail(code) = self.0.decide() {
            return Err(tonic::Status::new(
                tonic::Code::from(code),
                "test receiver refuses",
            ));
        }
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(key, value)| {
                (
                    key.as_str().to_owned(),
                    value.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        self.0.record(Received {
            headers,
            path: String::new(),
            request: request.into_inner(),
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts an OTLP/gRPC receiver on `listener` (gzip accepted).
pub fn grpc_receiver_on(listener: TcpListener, answer: Answer) -> Receiver {
    let receiver = Receiver::new(listener.local_addr().unwrap(), answer);
    let service = TraceServiceServer::new(GrpcService(receiver.clone()))
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    receiver
}

pub async fn grpc_receiver(answer: Answer) -> Receiver {
    grpc_receiver_on(local_listener().await, answer)
}

// ---- HTTP ----------------------------------------------------------------------------------

/// Starts an OTLP/HTTP receiver (protobuf, gzip or not) on a local port.
pub async fn http_receiver(answer: Answer) -> Receiver {
    http_receiver_on(local_listener().await, answer)
}

/// Starts an OTLP/HTTP receiver on `listener`.
pub fn http_receiver_on(listener: TcpListener, answer: Answer) -> Receiver {
    let receiver = Receiver::new(listener.local_addr().unwrap(), answer);
    let state = receiver.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| handle_http(state.clone(), request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    receiver
}

async fn handle_http(
    state: Receiver,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    if let Answer::Fail(status) = state.decide() {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::from_u16(status as u16).unwrap();
        return Ok(response);
    }
    let gzip = parts
        .headers
        .get("content-encoding")
        .is_some_and(|value| value == "gzip");
    let body = if gzip {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(body.as_ref())
            .read_to_end(&mut plain)
            .unwrap();
        plain
    } else {
        body.to_vec()
    };
    let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
    let headers = parts
        .headers
        .iter()
        .map(|(key, value)| {
            (
                key.as_str().to_owned(),
                value.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    state.record(Received {
        headers,
        path: parts.uri.path().to_owned(),
        request,
    });
    let reply = ExportTraceServiceResponse::default().encode_to_vec();
    let mut response = Response::new(Full::new(Bytes::from(reply)));
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(response)
}

// ---- assertions on protobuf ----------------------------------------------------------------

/// Spans of two processes in one trace: python3 (server + client) and nginx (server).
pub fn two_process_items() -> Vec<ExportItem> {
    let python = resource("python3", 1234);
    let nginx = resource("nginx", 99);
    let server = SpanSpec {
        name: "GET",
        start_ms: 0.0,
        end_ms: 12.3,
        attributes: vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("url.path", "/index.html"),
            KeyValue::new("http.response.status_code", 200_i64),
        ],
        ..SpanSpec::new(0x1111, 0, SpanKind::Server)
    };
    let client = SpanSpec {
        start_ms: 2.0,
        end_ms: 5.1,
        attributes: vec![
            KeyValue::new("url.full", "http://127.0.0.1:9000/api"),
            KeyValue::new("http.response.status_code", 500_i64),
        ],
        error: true,
        ..SpanSpec::new(0x2222, 0x1111, SpanKind::Client)
    };
    let upstream = SpanSpec {
        start_ms: 2.5,
        end_ms: 4.9,
        attributes: vec![KeyValue::new("url.path", "/api")],
        ..SpanSpec::new(0x3333, 0x2222, SpanKind::Server)
    };
    vec![
        ExportItem {
            resource_id: 1,
            resource: Arc::clone(&python),
            span: server.build(),
        },
        ExportItem {
            resource_id: 2,
            resource: nginx,
            span: upstream.build(),
        },
        ExportItem {
            resource_id: 1,
            resource: python,
            span: client.build(),
        },
    ]
}

/// Checks what a receiver got for [`two_process_items`]: one ResourceSpans per process with its
/// resource, and every span field intact.
pub fn assert_two_processes(receiver: &Receiver) {
    let resource_spans = receiver.resource_spans();
    assert_eq!(resource_spans.len(), 2, "{resource_spans:#?}");
    let by_service = |service: &str| {
        resource_spans
            .iter()
            .find(|rs| {
                proto_str(&rs.resource.as_ref().unwrap().attributes, "service.name")
                    == Some(service)
            })
            .unwrap_or_else(|| panic!("no ResourceSpans for {service}"))
    };
    let python = by_service("python3");
    let nginx = by_service("nginx");
    for (rs, pid, spans) in [(python, 1234, 2), (nginx, 99, 1)] {
        let attributes = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(proto_int(attributes, "process.pid"), Some(pid));
        assert_eq!(
            proto_str(attributes, "telemetry.sdk.name"),
            Some("tracer-agent")
        );
        assert_eq!(
            proto_str(attributes, "telemetry.sdk.language"),
            Some("rust")
        );
        assert_eq!(
            attributes.len(),
            5,
            "only the process's own attributes: {attributes:?}"
        );
        let count: usize = rs.scope_spans.iter().map(|ss| ss.spans.len()).sum();
        assert_eq!(count, spans);
    }

    let spans: Vec<_> = python.scope_spans.iter().flat_map(|ss| &ss.spans).collect();
    let server = spans
        .iter()
        .find(|s| s.span_id == 0x1111_u64.to_be_bytes())
        .unwrap();
    let client = spans
        .iter()
        .find(|s| s.span_id == 0x2222_u64.to_be_bytes())
        .unwrap();
    let upstream = &nginx.scope_spans[0].spans[0];

    for span in [server, client, upstream] {
        assert_eq!(span.trace_id, TRACE.to_be_bytes());
        assert_eq!(span.name, "GET");
    }
    assert!(server.parent_span_id.is_empty(), "a root has no parent id");
    assert_eq!(client.parent_span_id, 0x1111_u64.to_be_bytes());
    assert_eq!(upstream.span_id, 0x3333_u64.to_be_bytes());
    assert_eq!(upstream.parent_span_id, 0x2222_u64.to_be_bytes());
    // OTLP SpanKind: SERVER = 2, CLIENT = 3.
    assert_eq!(server.kind, 2);
    assert_eq!(client.kind, 3);
    assert_eq!(upstream.kind, 2);
    assert_eq!(server.start_time_unix_nano, nanos(at(0.0)));
    assert_eq!(server.end_time_unix_nano, nanos(at(12.3)));
    assert_eq!(client.start_time_unix_nano, nanos(at(2.0)));
    assert_eq!(client.end_time_unix_nano, nanos(at(5.1)));
    assert_eq!(
        proto_str(&server.attributes, "url.path"),
        Some("/index.html")
    );
    assert_eq!(
        proto_str(&server.attributes, "http.request.method"),
        Some("GET")
    );
    assert_eq!(
        proto_int(&server.attributes, "http.response.status_code"),
        Some(200)
    );
    assert_eq!(
        proto_str(&client.attributes, "url.full"),
        Some("http://127.0.0.1:9000/api")
    );
    assert_eq!(
        proto_int(&client.attributes, "http.response.status_code"),
        Some(500)
    );
    // OTLP StatusCode: UNSET = 0, ERROR = 2.
    assert_eq!(server.status.as_ref().unwrap().code, 0);
    assert_eq!(client.status.as_ref().unwrap().code, 2);
}

pub fn proto_attr<'a>(attributes: &'a [ProtoKeyValue], key: &str) -> Option<&'a ProtoValue> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value| value.value.as_ref())
}

pub fn proto_str<'a>(attributes: &'a [ProtoKeyValue], key: &str) -> Option<&'a str> {
    match proto_attr(attributes, key) {
        Some(ProtoValue::StringValue(value)) => Some(value),
        _ => None,
    }
}

pub fn proto_int(attributes: &[ProtoKeyValue], key: &str) -> Option<i64> {
    match proto_attr(attributes, key) {
        Some(ProtoValue::IntValue(value)) => Some(*value),
        _ => None,
    }
}

pub fn nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
