//! The OTLP/HTTP sink (http/protobuf): requests encoded by `encode.rs`, gzipped, POSTed with a
//! hyper client that keeps its connection alive between batches. gRPC stays with
//! opentelemetry-otlp (`otlp.rs`).
//!
//! Like the gRPC sink, each process of a batch is one request with one `ResourceSpans`, so a
//! retry never resends a process's spans that were accepted. Retries are the worker's; one call
//! here is one request per group.
//!
//! Settings, read once at start as opentelemetry-otlp's HTTP exporter reads them:
//! * the endpoint: the `--otlp-endpoint` option (`/v1/traces` added when it has no path), else
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, else `OTEL_EXPORTER_OTLP_ENDPOINT` with
//!   `/v1/traces` appended, else `http://localhost:4318/v1/traces` (the OTLP exporter
//!   specification's rules);
//! * headers: `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`, as
//!   `key=value,...` with percent-encoded values;
//! * the per-request timeout (connecting, sending, reading the answer):
//!   `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT`, in milliseconds,
//!   default 10 s.
//!
//! Answers, following the OTLP specification: 2xx delivered (a partial success is logged);
//! 429, 502, 503, 504, network errors and timeouts are worth a retry, after `Retry-After` when
//! the collector sends one; any other status is final.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{
    CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT,
};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;

use super::encode::TraceEncoder;
use super::otlp::{HTTP_TRACES_PATH, check_endpoint, endpoint_url};
use super::worker::{ResourceGroup, SinkError};
use super::{
    ExportError, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS,
    OTEL_EXPORTER_OTLP_TIMEOUT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, OtlpCompression,
    OtlpProtocol, Shared,
};
#[cfg(test)]
use super::{ExportItem, worker::EncodedSpan};

/// Where spans go when nothing says otherwise.
const DEFAULT_ENDPOINT: &str = "http://localhost:4318/v1/traces";
/// Per request, when no variable sets it (the OTLP exporter specification's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Larger request bodies (before or after compression) are not sent: the OTLP/HTTP
/// specification's recommended receiver limit, also opentelemetry-otlp's.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;
/// A collector's answer is read up to this size (opentelemetry-http's limit).
const MAX_RESPONSE_BODY: usize = 4 * 1024 * 1024;
/// gzip level 1, not the default 6: spans are repetitive (same keys, same resource), so level 1
/// compresses nearly as well for a fraction of the CPU. Measured with zlib-rs on the pipeline
/// bench's 1,024-span requests (466 bytes per span unpacked): 24 bytes per span and about
/// 0.2 us per span at level 1, 20 bytes and about 0.8-1.1 us at level 6.
const GZIP_LEVEL: Compression = Compression::fast();
/// The gzip header flate2's `GzEncoder` writes for [`GZIP_LEVEL`]: deflate, no flags, no
/// mtime, XFL 4 ("fastest"), OS 255 ("unknown"). Written here so one raw deflate state serves
/// every request (a `GzEncoder` allocates and clears its few hundred KiB of state each time).
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];
/// Retry-After values beyond this are capped (as opentelemetry-otlp does).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Retry-After values below this (0, or a date already past) are raised to it, so a collector
/// answering "retry now" again and again is not hammered until the batch is given up.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the sink needs from the environment, resolved once at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HttpSettings {
    /// The full URL requests are POSTed to.
    pub endpoint: Uri,
    /// From the headers variables, in order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub timeout: Duration,
}

impl HttpSettings {
    /// Resolves the settings from `endpoint` (the option) and the variables read through
    /// `lookup`. Empty values count as unset.
    pub fn resolve(
        endpoint: Option<&str>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ExportError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let endpoint = resolve_endpoint(endpoint, &get)?;
        let headers = [
            OTEL_EXPORTER_OTLP_TRACES_HEADERS,
            OTEL_EXPORTER_OTLP_HEADERS,
        ]
        .into_iter()
        .find_map(|name| get(name).map(|value| parse_headers(&value, name)))
        .unwrap_or_default();
        let timeout = resolve_timeout(&get);
        Ok(Self {
            endpoint,
            headers,
            timeout,
        })
    }
}

fn resolve_endpoint(
    option: Option<&str>,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Uri, ExportError> {
    let (url, origin) = if let Some(option) = option {
        (
            endpoint_url(OtlpProtocol::HttpProtobuf, option)?,
            "the OTLP endpoint option",
        )
    } else if let Some(url) = get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
        // The signal's own variable is the full URL: used as it is.
        (url.trim().to_owned(), OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    } else if let Some(base) = get(OTEL_EXPORTER_OTLP_ENDPOINT) {
        // A base URL: the signal's path is appended, whatever path the base has.
        let base = base.trim();
        check_endpoint(base, OTEL_EXPORTER_OTLP_ENDPOINT)?;
        let path = if base.ends_with('/') {
            HTTP_TRACES_PATH.trim_start_matches('/')
        } else {
            HTTP_TRACES_PATH
        };
        (format!("{base}{path}"), OTEL_EXPORTER_OTLP_ENDPOINT)
    } else {
        (DEFAULT_ENDPOINT.to_owned(), "the default")
    };
    check_endpoint(&url, origin)
}

fn resolve_timeout(get: &impl Fn(&str) -> Option<String>) -> Duration {
    for name in [
        OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
        OTEL_EXPORTER_OTLP_TIMEOUT,
    ] {
        if let Some(value) = get(name) {
            match value.trim().parse::<u64>() {
                Ok(millis) => return Duration::from_millis(millis),
                // opentelemetry-otlp also passes over a value it cannot read.
                Err(_) => {
                    log::warn!("ignoring {name}={value:?}: expected a whole number of milliseconds")
                }
            }
        }
    }
    DEFAULT_TIMEOUT
}

/// `key1=value1,key2=value2` (W3C baggage style) with percent-encoded values, as
/// opentelemetry-otlp reads it: entries without `=` or with an empty key or value are skipped,
/// a value that does not percent-decode to UTF-8 is taken literally. Names or values HTTP does
/// not allow are skipped with a warning.
pub(super) fn parse_headers(input: &str, origin: &str) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    for entry in input.split_terminator(',').map(str::trim) {
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        let value = percent_decode(value).unwrap_or_else(|| value.to_owned());
        if key.is_empty() || value.is_empty() {
            continue;
        }
        match (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(value)) => headers.push((name, value)),
            _ => log::warn!("ignoring header {key:?} from {origin}: not a valid HTTP header"),
        }
    }
    headers
}

/// Decodes `%XX` sequences; None when one is cut short, not hex, or the bytes are not UTF-8
/// (opentelemetry-otlp's `url_decode`).
fn percent_decode(value: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut pending: Vec<u8> = Vec::new();
    let mut chars = value.chars();
    loop {
        let next = chars.next();
        if next == Some('%') {
            let high = chars.next()?.to_digit(16)?;
            let low = chars.next()?.to_digit(16)?;
            pending.push((high * 16 + low) as u8);
            continue;
        }
        if !pending.is_empty() {
            out.push_str(std::str::from_utf8(&pending).ok()?);
            pending.clear();
        }
        match next {
            Some(c) => out.push(c),
            None => return Some(out),
        }
    }
}

/// `Retry-After`: delay-seconds or an HTTP date, within [`MIN_RETRY_AFTER`,
/// `MAX_RETRY_AFTER`]; None when it is neither.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(delay.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER))
}

/// Whether an HTTP status is worth a retry (OTLP/HTTP specification).
fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

pub(super) struct HttpSink {
    client: Client<HttpConnector, Full<Bytes>>,
    endpoint: Uri,
    /// Sent with every request: content type and encoding, user agent, the variables' headers.
    headers: HeaderMap,
    timeout: Duration,
    gzip: bool,
    encoder: TraceEncoder,
    /// The request before compression; reused.
    encoded: Vec<u8>,
    /// Raw deflate state, reset for each request (see [`GZIP_HEADER`]).
    deflate: Compress,
    /// The body sent; its allocation comes back once hyper drops the last request's body.
    body: BytesMut,
    /// The collector's `Retry-After` on the last failure.
    retry_after: Option<Duration>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("gzip", &self.gzip)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// Resolves the settings from `endpoint` and the process environment; must run inside the
    /// tokio runtime (the client's pool uses its timer). Nothing connects yet.
    pub fn build(
        endpoint: Option<&str>,
        compression: OtlpCompression,
    ) -> Result<Self, ExportError> {
        let settings = HttpSettings::resolve(endpoint, super::env_lookup)?;
        Ok(Self::new(settings, compression))
    }

    pub fn new(settings: HttpSettings, compression: OtlpCompression) -> Self {
        let gzip = compression == OtlpCompression::Gzip;
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        if gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("tracer-agent/", env!("CARGO_PKG_VERSION"))),
        );
        // After ours, so they win, as in opentelemetry-otlp.
        for (name, value) in settings.headers {
            headers.insert(name, value);
        }

        let mut connector = HttpConnector::new();
        // A request is written in a few pieces and the answer awaited: no Nagle delay.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            // One request at a time: one connection to keep.
            .pool_max_idle_per_host(1)
            .build(connector);
        Self {
            client,
            endpoint: settings.endpoint,
            headers,
            timeout: settings.timeout,
            gzip,
            encoder: TraceEncoder::new(),
            encoded: Vec::new(),
            deflate: Compress::new(GZIP_LEVEL, false),
            body: BytesMut::new(),
            retry_after: None,
        }
    }

    /// Sends `groups`, one request each, removing each from the front once accepted.
    pub async fn export(
        &mut self,
        groups: &mut VecDeque<ResourceGroup>,
        shared: &Shared,
    ) -> Result<(), SinkError> {
        self.retry_after = None;
        while let Some(group) = groups.front() {
            let count = group.len();
            let body = self.body(group)?;
            self.send(body, count).await?;
            groups.pop_front();
            shared.delivered(count, 1);
        }
        Ok(())
    }

    /// The collector's `Retry-After` on the last failed export, taken.
    pub fn take_retry_after(&mut self) -> Option<Duration> {
        self.retry_after.take()
    }

    pub fn finish(&mut self) {
        // Dropping the client closes its idle connection; nothing else to flush.
    }

    /// Encodes (and compresses) the request for `group`.
    fn body(&mut self, group: &ResourceGroup) -> Result<Bytes, SinkError> {
        self.encoded.clear();
        // Spans come encoded (see `ExportHandle`); a group of spans is encoded here.
        debug_assert!(group.spans.is_empty() || group.encoded.is_empty());
        if group.encoded.is_empty() {
            self.encoder.encode_resource_spans(
                &mut self.encoded,
                &group.resource,
                group.spans.iter(),
            );
        } else {
            let spans = group
                .encoded
                .iter()
                .map(|span| (&span.scope, span.bytes.as_slice()));
            self.encoder
                .write_resource_spans(&mut self.encoded, &group.resource, spans);
        }
        check_body_size(self.encoded.len(), "uncompressed")?;
        self.body.clear();
        if self.gzip {
            gzip(&mut self.deflate, &self.encoded, &mut self.body).map_err(|error| SinkError {
                permanent: true,
                message: format!("cannot gzip the request: {error}"),
            })?;
            check_body_size(self.body.len(), "compressed")?;
        } else {
            self.body.extend_from_slice(&self.encoded);
        }
        Ok(self.body.split().freeze())
    }

    /// POSTs `body` (the request for `count` spans) and reads the answer.
    async fn send(&mut self, body: Bytes, count: usize) -> Result<(), SinkError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.endpoint.clone();
        *request.headers_mut() = self.headers.clone();
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            // A body too long or cut short only loses the partial-success details.
            let body = Limited::new(body, MAX_RESPONSE_BODY)
                .collect()
                .await
                .map(|collected| collected.to_bytes());
            Ok::<_, hyper_util::client::legacy::Error>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                return Err(SinkError {
                    permanent: false,
                    message: format!("cannot reach {}: {}", self.endpoint, chain(&error)),
                });
            }
            Err(_) => {
                return Err(SinkError {
                    permanent: false,
                    message: format!(
                        "no answer from {} within {:?} (OTEL_EXPORTER_OTLP_TIMEOUT)",
                        self.endpoint, self.timeout
                    ),
                });
            }
        };

        if parts.status.is_success() {
            if let Ok(body) = body {
                log_partial_success(&body, count);
            }
            return Ok(());
        }
        if let Ok(body) = &body {
            // The answer may echo credentials: debug only.
            log::debug!(
                "the collector answered {}: {}",
                parts.status,
                String::from_utf8_lossy(body)
            );
        }
        let permanent = !is_retryable(parts.status);
        if !permanent {
            self.retry_after = parts
                .headers
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()));
        }
        Err(SinkError {
            permanent,
            message: format!("{} answered HTTP {}", self.endpoint, parts.status),
        })
    }
}

/// Appends to `out` `input` as a gzip member (RFC 1952): [`GZIP_HEADER`], the raw deflate
/// stream from `deflate` (reset first), CRC-32 and length.
fn gzip(deflate: &mut Compress, input: &[u8], out: &mut BytesMut) -> Result<(), String> {
    out.extend_from_slice(&GZIP_HEADER);
    deflate.reset();
    let mut rest = input;
    loop {
        // Room for a typical compression ratio; more rounds if needed.
        let start = out.len();
        out.resize(start + rest.len() / 4 + 64, 0);
        let (read, written) = (deflate.total_in(), deflate.total_out());
        let status = deflate
            .compress(rest, &mut out[start..], FlushCompress::Finish)
            .map_err(|error| error.to_string())?;
        let written = (deflate.total_out() - written) as usize;
        let consumed = (deflate.total_in() - read) as usize;
        out.truncate(start + written);
        rest = &rest[consumed..];
        match status {
            Status::StreamEnd => break,
            Status::Ok | Status::BufError if written > 0 || consumed > 0 => {}
            // No progress although there was room: not expected from deflate.
            Status::Ok | Status::BufError => return Err("deflate made no progress".to_owned()),
        }
    }
    let mut crc = Crc::new();
    crc.update(input);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    // ISIZE: the length modulo 2^32 (requests are far smaller, see MAX_REQUEST_BODY).
    out.extend_from_slice(&(input.len() as u32).to_le_bytes());
    Ok(())
}

fn check_body_size(len: usize, representation: &str) -> Result<(), SinkError> {
    if len > MAX_REQUEST_BODY {
        return Err(SinkError {
            permanent: true,
            message: format!(
                "the {representation} request is {len} bytes, above the {MAX_REQUEST_BODY} a \
                 collector accepts; lower OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
            ),
        });
    }
    Ok(())
}

/// A 2xx answer may still say some spans were rejected (`partial_success`): worth a warning,
/// not a retry (the OTLP specification).
fn log_partial_success(body: &[u8], count: usize) {
    if body.is_empty() {
        return;
    }
    match ExportTraceServiceResponse::decode(body) {
        Ok(response) => {
            if let Some(partial) = response.partial_success
                && (partial.rejected_spans > 0 || !partial.error_message.is_empty())
            {
                log::warn!(
                    "the collector rejected {} of {count} spans: {}",
                    partial.rejected_spans,
                    partial.error_message
                );
            }
        }
        Err(error) => log::debug!("cannot read the collector's answer: {error}"),
    }
}

/// An error and its sources, `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{Read as _, Write as _};
    use std::sync::Arc;

    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status as SpanStatus, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{InstrumentationScope, KeyValue};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

    fn gunzip(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .expect("a valid gzip member");
        out
    }

    /// Spans `ids` of a process `pid`, each with a path as long as its id says; queued as
    /// spans or, as the OTLP/HTTP handle queues them, `encoded`.
    fn group(pid: i64, ids: std::ops::Range<u64>, encoded: bool) -> ResourceGroup {
        let scope = InstrumentationScope::builder("tracer-agent").build();
        let spans = ids
            .map(|id| SpanData {
                span_context: SpanContext::new(
                    TraceId::from(u128::from(id) << 64 | 1),
                    SpanId::from(id),
                    TraceFlags::SAMPLED,
                    false,
                    TraceState::default(),
                ),
                parent_span_id: SpanId::INVALID,
                parent_span_is_remote: false,
                span_kind: SpanKind::Server,
                name: format!("GET /{id}").into(),
                start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + id),
                end_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001 + id),
                attributes: vec![KeyValue::new("url.path", "/x".repeat(id as usize))],
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status: SpanStatus::Unset,
                instrumentation_scope: scope.clone(),
            })
            .collect::<Vec<_>>();
        let resource = Arc::new(
            Resource::builder_empty()
                .with_attributes([KeyValue::new("process.pid", pid)])
                .build(),
        );
        let (spans, encoded) = if encoded {
            let encoded = spans
                .into_iter()
                .map(|span| {
                    EncodedSpan::new(ExportItem {
                        resource_id: pid as u64,
                        resource: Arc::clone(&resource),
                        span,
                    })
                })
                .collect();
            (Vec::new(), encoded)
        } else {
            (spans, Vec::new())
        };
        ResourceGroup {
            resource_id: pid as u64,
            resource,
            spans,
            encoded,
        }
    }

    /// What a collector reads from a body: (process.pid, span ids).
    fn received(body: &[u8], gzip: bool) -> (String, Vec<u64>) {
        let raw = if gzip { gunzip(body) } else { body.to_vec() };
        let request = ExportTraceServiceRequest::decode(raw.as_slice()).expect("protobuf");
        assert_eq!(request.resource_spans.len(), 1, "one process per request");
        let resource_spans = &request.resource_spans[0];
        let pid = format!(
            "{:?}",
            resource_spans
                .resource
                .as_ref()
                .expect("resource")
                .attributes[0]
                .value
                .as_ref()
                .and_then(|v| v.value.as_ref())
        );
        let ids = resource_spans
            .scope_spans
            .iter()
            .flat_map(|scope| &scope.spans)
            .map(|span| u64::from_be_bytes(span.span_id.as_slice().try_into().expect("8 bytes")))
            .collect();
        (pid, ids)
    }

    #[test]
    fn consecutive_requests_carry_exactly_their_own_spans() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        for compression in [OtlpCompression::Gzip, OtlpCompression::Uncompressed] {
            let gzip = compression == OtlpCompression::Gzip;
            let settings = HttpSettings::resolve(None, lookup(&[])).unwrap();
            let mut sink = HttpSink::new(settings, compression);
            // A large request, then smaller ones: reused buffers must not leak the tail of an
            // earlier one, nor the compressor its history.
            for (pid, ids) in [(7, 1..300), (8, 300..302), (7, 5..6), (9, 40..140)] {
                let mut bodies = Vec::new();
                for encoded in [true, false] {
                    let group = group(pid, ids.clone(), encoded);
                    let body = sink.body(&group).expect("body");
                    let (got_pid, got_ids) = received(&body, gzip);
                    let what = format!("{compression:?}, encoded when queued: {encoded}");
                    assert_eq!(got_pid, format!("{:?}", Some(any_int(pid))), "{what}");
                    assert_eq!(got_ids, ids.clone().collect::<Vec<_>>(), "{what}");
                    bodies.push(if gzip { gunzip(&body) } else { body.to_vec() });
                }
                assert_eq!(bodies[0], bodies[1], "the same request either way");
            }
        }
    }

    fn any_int(value: i64) -> opentelemetry_proto::tonic::common::v1::any_value::Value {
        opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(value)
    }

    #[test]
    fn gzip_members_decode_and_frame_like_flate2s_gz_encoder() {
        let mut deflate = Compress::new(GZIP_LEVEL, false);
        let mut out = BytesMut::new();
        // Empty, tiny, repetitive and incompressible (more output than the first room).
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let inputs = [Vec::new(), b"a".to_vec(), b"span ".repeat(100_000), noise];
        for input in &inputs {
            out.clear();
            gzip(&mut deflate, input, &mut out).expect("gzip");
            let mut reference = flate2::write::GzEncoder::new(Vec::new(), GZIP_LEVEL);
            reference.write_all(input).unwrap();
            let reference = reference.finish().unwrap();
            // The deflate blocks may be cut elsewhere (all input comes with the finish flag),
            // the content, header and trailer (CRC-32, length) are the same.
            assert_eq!(gunzip(&out), *input);
            assert_eq!(out[..10], reference[..10], "header");
            assert_eq!(
                out[out.len() - 8..],
                reference[reference.len() - 8..],
                "trailer"
            );
        }
    }

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn endpoint(option: Option<&str>, vars: &[(&str, &str)]) -> String {
        HttpSettings::resolve(option, lookup(vars))
            .unwrap()
            .endpoint
            .to_string()
    }

    #[test]
    fn endpoints_follow_the_exporter_specification() {
        assert_eq!(endpoint(None, &[]), "http://localhost:4318/v1/traces");
        // The option: /v1/traces only when there is no path.
        assert_eq!(
            endpoint(Some("http://c:4318"), &[]),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            endpoint(Some("http://c:4318/custom"), &[]),
            "http://c:4318/custom"
        );
        // The option wins over the variables.
        assert_eq!(
            endpoint(
                Some("http://c:1"),
                &[(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://t:2/x")]
            ),
            "http://c:1/v1/traces"
        );
        // The traces variable as it is, even without a path.
        assert_eq!(
            endpoint(
                None,
                &[
                    (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://t:2"),
                    (OTEL_EXPORTER_OTLP_ENDPOINT, "http://b:3")
                ]
            ),
            "http://t:2/"
        );
        assert_eq!(
            endpoint(
                None,
                &[(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://t:2/custom/path")]
            ),
            "http://t:2/custom/path"
        );
        // The base variable always gets /v1/traces, after any path, without a double slash.
        for (base, url) in [
            ("http://b:3", "http://b:3/v1/traces"),
            ("http://b:3/", "http://b:3/v1/traces"),
            ("http://b:3/prefix", "http://b:3/prefix/v1/traces"),
            ("http://b:3/prefix/", "http://b:3/prefix/v1/traces"),
        ] {
            assert_eq!(
                endpoint(None, &[(OTEL_EXPORTER_OTLP_ENDPOINT, base)]),
                url,
                "{base}"
            );
        }
        // Empty counts as unset.
        assert_eq!(
            endpoint(
                None,
                &[
                    (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, ""),
                    (OTEL_EXPORTER_OTLP_ENDPOINT, "http://b:3")
                ]
            ),
            "http://b:3/v1/traces"
        );
        for (name, bad) in [
            (
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                "https://t:4318/v1/traces",
            ),
            (OTEL_EXPORTER_OTLP_ENDPOINT, "collector:4318"),
        ] {
            let error = HttpSettings::resolve(None, lookup(&[(name, bad)])).unwrap_err();
            assert!(
                matches!(&error, ExportError::InvalidEndpoint { origin, .. } if origin == name),
                "{error}"
            );
        }
    }

    #[test]
    fn headers_are_parsed_and_percent_decoded() {
        let headers = parse_headers(
            " x-tenant = acme ,authorization=Bearer%20s3cret,empty=,=novalue,junk,\
             x-utf8=caf%C3%A9,x-bad=%zz,bad name=1",
            "test",
        );
        let text: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<opaque>").to_owned()))
            .collect();
        assert_eq!(
            text,
            [
                ("x-tenant", "acme"),
                ("authorization", "Bearer s3cret"),
                ("x-utf8", "<opaque>"),
                ("x-bad", "%zz"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(headers[2].1.as_bytes(), "café".as_bytes());
        assert_eq!(percent_decode("a%4"), None);
        assert_eq!(
            percent_decode("%E2%82%AC and %41"),
            Some("€ and A".to_owned())
        );
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn the_traces_variables_win_and_timeouts_are_milliseconds() {
        let settings = HttpSettings::resolve(
            None,
            lookup(&[
                (OTEL_EXPORTER_OTLP_HEADERS, "a=1"),
                (OTEL_EXPORTER_OTLP_TRACES_HEADERS, "b=2"),
                (OTEL_EXPORTER_OTLP_TIMEOUT, "2500"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.headers.len(), 1);
        assert_eq!(settings.headers[0].0, "b");
        assert_eq!(settings.timeout, Duration::from_millis(2500));

        let settings = HttpSettings::resolve(
            None,
            lookup(&[
                (OTEL_EXPORTER_OTLP_TIMEOUT, "2500"),
                (OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, "750"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.timeout, Duration::from_millis(750));
        // Unreadable: passed over.
        let settings = HttpSettings::resolve(
            None,
            lookup(&[
                (OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, "soon"),
                (OTEL_EXPORTER_OTLP_TIMEOUT, "300"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.timeout, Duration::from_millis(300));
        assert_eq!(
            HttpSettings::resolve(None, lookup(&[])).unwrap().timeout,
            DEFAULT_TIMEOUT
        );
    }

    #[test]
    fn statuses_and_retry_after_follow_otlp() {
        for (status, retryable) in [
            (429, true),
            (502, true),
            (503, true),
            (504, true),
            (400, false),
            (401, false),
            (404, false),
            (413, false),
            (500, false),
            (501, false),
        ] {
            assert_eq!(
                is_retryable(StatusCode::from_u16(status).unwrap()),
                retryable,
                "{status}"
            );
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(MIN_RETRY_AFTER));
        assert_eq!(parse_retry_after("0", now), Some(MIN_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
