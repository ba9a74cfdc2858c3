//! A real OTLP receiver for the span tests, in the test process: OTLP/gRPC (tonic, gzip
//! accepted) or OTLP/HTTP with protobuf bodies (hyper, gzip or not) on a loopback port. It
//! records every request as it arrived (path, headers, decoded body) and flattens the spans
//! with their resource for assertions.
//!
//! The tests are synchronous; the receivers run on one shared tokio runtime in the background.

use std::{
    convert::Infallible,
    io::Read as _,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::Span,
};
use prost::Message as _;

use crate::{hex, wait_until};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("start the receivers' tokio runtime")
    })
}

/// Which OTLP transport a receiver speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// The value of the agent's `--otlp-protocol`.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    /// HTTP path (empty for gRPC, whose path tonic routes).
    pub path: String,
    /// Lowercase header names (gRPC metadata or HTTP headers) and their values.
    pub headers: Vec<(String, String)>,
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

/// A span with the resource it arrived under.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

/// OTLP `Span.SpanKind`.
pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;
/// OTLP `Status.StatusCode`.
pub const STATUS_UNSET: i32 = 0;
pub const STATUS_ERROR: i32 = 2;

fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(value_of)
}

fn value_of(kv: &KeyValue) -> Option<&Value> {
    kv.value.as_ref().and_then(|value| value.value.as_ref())
}

fn as_str(value: Option<&Value>) -> Option<&str> {
    match value {
        Some(Value::StringValue(text)) => Some(text),
        _ => None,
    }
}

fn as_int(value: Option<&Value>) -> Option<i64> {
    match value {
        Some(Value::IntValue(number)) => Some(*number),
        _ => None,
    }
}

/// A value as the tests print it.
fn show(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(text)) => format!("{text:?}"),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
        None => "(none)".to_owned(),
    }
}

impl ReceivedSpan {
    pub fn str(&self, key: &str) -> Option<&str> {
        as_str(find(&self.span.attributes, key))
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        as_int(find(&self.span.attributes, key))
    }

    pub fn resource_str(&self, key: &str) -> Option<&str> {
        as_str(find(&self.resource, key))
    }

    pub fn resource_int(&self, key: &str) -> Option<i64> {
        as_int(find(&self.resource, key))
    }

    pub fn pid(&self) -> Option<u32> {
        self.resource_int("process.pid")
            .and_then(|pid| u32::try_from(pid).ok())
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Empty for a span without a parent.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    pub fn status_code(&self) -> i32 {
        self.span.status.as_ref().map_or(STATUS_UNSET, |s| s.code)
    }

    pub fn start_ns(&self) -> u64 {
        self.span.start_time_unix_nano
    }

    pub fn end_ns(&self) -> u64 {
        self.span.end_time_unix_nano
    }

    /// Every string value of the span and its resource (name, status message, attributes), to
    /// look for data that must not be exported.
    pub fn strings(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("(name)".to_owned(), self.span.name.clone()),
            ("(trace_state)".to_owned(), self.span.trace_state.clone()),
        ];
        if let Some(status) = &self.span.status {
            out.push(("(status message)".to_owned(), status.message.clone()));
        }
        for kv in self.span.attributes.iter().chain(&self.resource) {
            let text = match value_of(kv) {
                Some(Value::StringValue(text)) => text.clone(),
                other => show(other),
            };
            out.push((kv.key.clone(), text));
        }
        out
    }

    /// One line for failure messages.
    pub fn summary(&self) -> String {
        let kind = match self.span.kind {
            KIND_SERVER => "SERVER",
            KIND_CLIENT => "CLIENT",
            _ => "kind?",
        };
        let attributes: Vec<String> = self
            .span
            .attributes
            .iter()
            .map(|kv| format!("{}={}", kv.key, show(value_of(kv))))
            .collect();
        format!(
            "{kind} {:?} service={} pid={} trace={} span={} parent={} status={} \
             start={} end={} tracestate={:?} [{}]",
            self.span.name,
            show(find(&self.resource, "service.name")),
            show(find(&self.resource, "process.pid")),
            self.trace_id(),
            self.span_id(),
            self.parent_span_id(),
            self.status_code(),
            self.start_ns(),
            self.end_ns(),
            self.span.trace_state,
            attributes.join(" ")
        )
    }
}

/// Every span of `requests`, in arrival order, with its resource.
pub fn flatten(requests: &[ExportTraceServiceRequest]) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for request in requests {
        for rs in &request.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| r.attributes.clone())
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    spans.push(ReceivedSpan {
                        resource: resource.clone(),
                        span: span.clone(),
                    });
                }
            }
        }
    }
    spans
}

/// Spans as lines, for failure messages.
pub fn summaries(spans: &[ReceivedSpan]) -> String {
    if spans.is_empty() {
        return "(no spans)".to_owned();
    }
    spans
        .iter()
        .map(ReceivedSpan::summary)
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Requests the receiver could not decode (answered 400), for messages.
    errors: Vec<String>,
}

/// A running receiver; clones share what it received.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    /// A receiver of `protocol` on a free loopback port.
    pub fn start(protocol: Protocol) -> Self {
        Self::start_on(protocol, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// A receiver of `protocol` on `addr` (e.g. a port reserved earlier); panics if it is taken.
    pub fn start_on(protocol: Protocol, addr: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|err| panic!("OTLP receiver cannot listen on {addr}: {err}"));
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let _entered = runtime().enter();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let receiver = Self {
            addr,
            protocol,
            state: Arc::default(),
        };
        match protocol {
            Protocol::Grpc => {
                let service = TraceServiceServer::new(GrpcService(receiver.clone()))
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
                runtime().spawn(async move {
                    let served = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                        .await;
                    if let Err(err) = served {
                        eprintln!("OTLP/gRPC receiver on {addr} stopped: {err}");
                    }
                });
            }
            Protocol::HttpProtobuf => {
                let state = receiver.clone();
                runtime().spawn(async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let state = state.clone();
                        tokio::spawn(async move {
                            let service =
                                service_fn(move |request| handle_http(state.clone(), request));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            }
        }
        receiver
    }

    /// `http://127.0.0.1:PORT`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let requests: Vec<ExportTraceServiceRequest> = self
            .lock()
            .received
            .iter()
            .map(|r| r.request.clone())
            .collect();
        flatten(&requests)
    }

    /// What the receiver got, for failure messages.
    pub fn report(&self) -> String {
        let state = self.lock();
        let requests: Vec<ExportTraceServiceRequest> =
            state.received.iter().map(|r| r.request.clone()).collect();
        format!(
            "--- OTLP {} receiver on {}: {} request(s), {} undecodable ---\n{}{}",
            self.protocol.flag(),
            self.addr,
            state.received.len(),
            state.errors.len(),
            summaries(&flatten(&requests)),
            state
                .errors
                .iter()
                .map(|e| format!("\nundecodable: {e}"))
                .collect::<String>()
        )
    }

    /// Polls until `done` holds for the spans received; panics after `timeout` saying `what`,
    /// with what was received (a [`crate::Agent`] adds its report when dropped
    /// during the panic).
    pub fn wait_spans(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let mut last = Vec::new();
        let ok = wait_until(timeout, || {
            last = self.spans();
            done(&last)
        });
        if !ok {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.report()
            );
        }
        last
    }

    fn record(&self, received: Received) {
        self.lock().received.push(received);
    }

    fn error(&self, error: String) {
        self.lock().errors.push(error);
    }
}

struct GrpcService(Receiver);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
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
            path: String::new(),
            headers,
            request: request.into_inner(),
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn handle_http(
    state: Receiver,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(key, value)| {
            (
                key.as_str().to_owned(),
                value.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let decoded = async {
        let body = body
            .collect()
            .await
            .map_err(|err| format!("reading the body: {err}"))?
            .to_bytes();
        let gzip = parts
            .headers
            .get("content-encoding")
            .is_some_and(|value| value == "gzip");
        let body = if gzip {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(body.as_ref())
                .read_to_end(&mut plain)
                .map_err(|err| format!("gunzip: {err}"))?;
            plain
        } else {
            body.to_vec()
        };
        ExportTraceServiceRequest::decode(body.as_slice())
            .map_err(|err| format!("not an ExportTraceServiceRequest: {err}"))
    }
    .await;
    let request = match decoded {
        Ok(request) => request,
        Err(err) => {
            state.error(format!("{} {}: {err}", parts.method, parts.uri));
            let mut response = Response::new(Full::new(Bytes::from(err)));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        }
    };
    state.record(Received {
        path: parts.uri.path().to_owned(),
        headers,
        request,
    });
    let mut response = Response::new(Full::new(Bytes::from(
        ExportTraceServiceResponse::default().encode_to_vec(),
    )));
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(response)
}
