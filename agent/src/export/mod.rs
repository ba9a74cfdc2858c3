//! Export: the last pipeline stage. Finished spans go into a bounded queue and leave in batches
//! for an OTLP collector (gRPC or HTTP/protobuf), the console (trace trees), or a JSON-lines file.
//!
//! This module owns the public API and the configuration:
//! * [`ExportItem`], what the pipeline hands over: one finished span and the resource of the
//!   process it describes;
//! * [`ExportConfig`] (defaults, `OTEL_BSP_*`, and the OTLP settings opentelemetry-otlp does not
//!   resolve itself) and [`ExportError`];
//! * [`ExportHandle`], the pipeline's side: synchronous, never waits; a full queue drops and
//!   counts;
//! * [`Exporter`], the task's side: [`Exporter::start`] and [`Exporter::shutdown`].
//!
//! The other files: `worker.rs` batches, retries and shuts down; `otlp_http.rs` POSTs
//! http/protobuf requests that `encode.rs` writes straight from the spans (each encoded when
//! [`ExportHandle::submit`] queues it); `otlp.rs` talks gRPC
//! through opentelemetry-otlp; `console.rs` prints trace trees; `jsonl.rs` writes OTLP/JSON.
//!
//! # Queue bound
//! `queue_size` bounds every span the exporter holds: queued, in the batch being sent, or waiting
//! for a retry. While the collector is away spans keep queueing up to that bound; beyond it
//! [`ExportHandle::submit`] drops and counts (`tracer_spans_dropped_total{reason="queue_full"}`).
//!
//! # Environment
//! Read here ([`ExportConfig::from_env`]): `OTEL_BSP_MAX_QUEUE_SIZE`,
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_EXPORT_TIMEOUT`;
//! `OTEL_EXPORTER_OTLP_{TRACES_,}PROTOCOL` (opentelemetry-otlp ignores it once a transport is
//! chosen); `OTEL_EXPORTER_OTLP_{TRACES_,}COMPRESSION` (to make gzip the default); and
//! `OTEL_EXPORTER_OTLP_{TRACES_,}ENDPOINT` are checked for a usable `http://` URL.
//! Read when the exporter is built (by opentelemetry-otlp for gRPC, by `otlp_http.rs` the same
//! way for http/protobuf): the endpoints (when no endpoint is given),
//! `OTEL_EXPORTER_OTLP_{TRACES_,}HEADERS` (gRPC metadata or HTTP headers) and
//! `OTEL_EXPORTER_OTLP_{TRACES_,}TIMEOUT` (milliseconds, per request, default 10 s).
//! `OTEL_EXPORTER_OTLP_INSECURE` changes nothing: endpoints must say `http://` (no TLS in this
//! build).

mod console;
mod encode;
mod jsonl;
mod otlp;
mod otlp_http;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::metrics::{Metrics, SpanDrop};

pub use console::{ConsoleConfig, TraceTrees, render_trace};
pub use encode::TraceEncoder;
pub use jsonl::encode_request;

/// `OTEL_BSP_MAX_QUEUE_SIZE`: spans the exporter may hold.
pub const OTEL_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
/// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans per batch.
pub const OTEL_BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
/// `OTEL_BSP_SCHEDULE_DELAY`: milliseconds a batch may wait to fill up.
pub const OTEL_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
/// `OTEL_BSP_EXPORT_TIMEOUT`: milliseconds one export attempt may take.
pub const OTEL_BSP_EXPORT_TIMEOUT: &str = "OTEL_BSP_EXPORT_TIMEOUT";
/// `grpc` or `http/protobuf` (default), for every signal.
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// Like [`OTEL_EXPORTER_OTLP_PROTOCOL`], for traces; wins over it.
pub const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// `gzip` (our default) or `none`, for every signal.
pub const OTEL_EXPORTER_OTLP_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_COMPRESSION";
/// Like [`OTEL_EXPORTER_OTLP_COMPRESSION`], for traces; wins over it.
pub const OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION";
/// Base URL of the collector, for every signal (`/v1/traces` is added for HTTP).
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Full URL of the collector's trace endpoint; wins over [`OTEL_EXPORTER_OTLP_ENDPOINT`].
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `key=value,...` (values percent-encoded): headers sent with every request, for every signal.
pub const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// Like [`OTEL_EXPORTER_OTLP_HEADERS`], for traces; wins over it.
pub const OTEL_EXPORTER_OTLP_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
/// Milliseconds one request may take (default 10 s), for every signal.
pub const OTEL_EXPORTER_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
/// Like [`OTEL_EXPORTER_OTLP_TIMEOUT`], for traces; wins over it.
pub const OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";

/// One finished span and the process it describes.
#[derive(Clone, Debug)]
pub struct ExportItem {
    /// Names `resource` cheaply: equal ids mean the same process (and the same resource).
    pub resource_id: u64,
    /// The process's resource (service.name, process.pid, telemetry.sdk.* naming this agent...).
    pub resource: Arc<Resource>,
    pub span: SpanData,
}

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExporterKind {
    /// An OTLP collector. `None` fields come from the standard environment variables
    /// (protocol default: http/protobuf, as the OpenTelemetry specification says; endpoint
    /// default: `http://localhost:4317` for gRPC, `http://localhost:4318/v1/traces` for HTTP).
    Otlp {
        protocol: Option<OtlpProtocol>,
        /// A base URL such as `http://collector:4317`. For http/protobuf, `/v1/traces` is added
        /// when the URL has no path (as for `OTEL_EXPORTER_OTLP_ENDPOINT`).
        endpoint: Option<String>,
    },
    /// Completed traces as indented trees on stdout.
    Console,
    /// One OTLP/JSON `ExportTraceServiceRequest` per line, appended to `path` (None: stdout).
    Jsonl { path: Option<PathBuf> },
}

impl ExporterKind {
    /// The default when no exporter is chosen: OTLP when an OTLP endpoint variable is set,
    /// otherwise the console.
    pub fn default_from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let configured = [
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
            OTEL_EXPORTER_OTLP_ENDPOINT,
        ]
        .iter()
        .any(|name| lookup(name).is_some_and(|value| !value.is_empty()));
        if configured {
            Self::Otlp {
                protocol: None,
                endpoint: None,
            }
        } else {
            Self::Console
        }
    }

    /// [`Self::default_from_lookup`] over the process environment.
    pub fn default_from_env() -> Self {
        Self::default_from_lookup(env_lookup)
    }
}

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (tonic), usually port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (our encoder, hyper), usually port 4318.
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The value used in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Compression of OTLP requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpCompression {
    /// gzip: the default, roughly 70% less traffic for spans.
    Gzip,
    /// No compression (`OTEL_EXPORTER_OTLP_COMPRESSION=none`).
    Uncompressed,
}

/// Backoff while the destination fails. Defaults: first retry after 5 s, doubling, at most
/// 30 s apart, and a batch is given up 300 s after its first failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub give_up_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// Everything the export stage needs. Build it with [`ExportConfig::new`] (defaults) or
/// [`ExportConfig::from_env`], then adjust fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    pub kind: ExporterKind,
    /// Spans held at most (queued, being sent or retried); default 10,000.
    pub queue_size: usize,
    /// Spans per batch at most; default 1,024.
    pub max_batch: usize,
    /// How long a batch may wait to fill up; default 1 s.
    pub schedule_delay: Duration,
    /// How long one export attempt may take (all of a batch's requests); default 30 s.
    pub export_timeout: Duration,
    /// OTLP only; default gzip.
    pub compression: OtlpCompression,
    pub retry: RetryConfig,
    /// Console only.
    pub console: ConsoleConfig,
}

impl ExportConfig {
    /// The defaults the design asks for, with no environment read.
    pub fn new(kind: ExporterKind) -> Self {
        Self {
            kind,
            queue_size: 10_000,
            max_batch: 1_024,
            schedule_delay: Duration::from_secs(1),
            export_timeout: Duration::from_secs(30),
            compression: OtlpCompression::Gzip,
            retry: RetryConfig::default(),
            console: ConsoleConfig::default(),
        }
    }

    /// Applies OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_SCHEDULE_DELAY,
    /// OTEL_BSP_EXPORT_TIMEOUT over the defaults (queue 10,000 spans, batch 1,024, delay 1 s,
    /// timeout 30 s), and for OTLP resolves the protocol and compression from the
    /// `OTEL_EXPORTER_OTLP_*` variables; invalid values -> error naming the variable.
    pub fn from_env(kind: ExporterKind) -> Result<Self, ExportError> {
        Self::from_lookup(kind, env_lookup)
    }

    /// [`Self::from_env`] with the variables read through `lookup` (tests pass a map, so they
    /// need not touch the process environment). Empty values count as unset.
    pub fn from_lookup(
        kind: ExporterKind,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ExportError> {
        let get = |name: &'static str| lookup(name).filter(|value| !value.trim().is_empty());
        let mut config = Self::new(kind);
        if let Some(value) = get(OTEL_BSP_MAX_QUEUE_SIZE) {
            config.queue_size = parse_count(OTEL_BSP_MAX_QUEUE_SIZE, &value)?;
        }
        if let Some(value) = get(OTEL_BSP_MAX_EXPORT_BATCH_SIZE) {
            config.max_batch = parse_count(OTEL_BSP_MAX_EXPORT_BATCH_SIZE, &value)?;
        }
        // The specification: the batch size must not exceed the queue size.
        config.max_batch = config.max_batch.min(config.queue_size);
        if let Some(value) = get(OTEL_BSP_SCHEDULE_DELAY) {
            config.schedule_delay = parse_millis(OTEL_BSP_SCHEDULE_DELAY, &value, true)?;
        }
        if let Some(value) = get(OTEL_BSP_EXPORT_TIMEOUT) {
            config.export_timeout = parse_millis(OTEL_BSP_EXPORT_TIMEOUT, &value, false)?;
        }

        if let ExporterKind::Otlp { protocol, endpoint } = &mut config.kind {
            if protocol.is_none() {
                *protocol = Some(resolve_protocol(&get)?);
            }
            if endpoint.is_none() {
                for name in [
                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                    OTEL_EXPORTER_OTLP_ENDPOINT,
                ] {
                    if let Some(value) = get(name) {
                        otlp::check_endpoint(&value, name)?;
                        // The trace-specific variable wins, as in opentelemetry-otlp.
                        break;
                    }
                }
            }
            config.compression = resolve_compression(&get)?;
        }
        Ok(config)
    }
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn parse_count(name: &'static str, value: &str) -> Result<usize, ExportError> {
    match value.trim().parse::<usize>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(ExportError::InvalidEnv {
            name,
            value: value.to_owned(),
            expected: "a whole number of spans above 0",
        }),
    }
}

fn parse_millis(name: &'static str, value: &str, zero_ok: bool) -> Result<Duration, ExportError> {
    match value.trim().parse::<u64>() {
        Ok(millis) if zero_ok || millis > 0 => Ok(Duration::from_millis(millis)),
        _ => Err(ExportError::InvalidEnv {
            name,
            value: value.to_owned(),
            expected: if zero_ok {
                "a whole number of milliseconds"
            } else {
                "a whole number of milliseconds above 0"
            },
        }),
    }
}

fn resolve_protocol(
    get: &impl Fn(&'static str) -> Option<String>,
) -> Result<OtlpProtocol, ExportError> {
    for name in [
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
        OTEL_EXPORTER_OTLP_PROTOCOL,
    ] {
        if let Some(value) = get(name) {
            return match value.trim().to_ascii_lowercase().as_str() {
                "grpc" => Ok(OtlpProtocol::Grpc),
                "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
                _ => Err(ExportError::InvalidEnv {
                    name,
                    value,
                    expected: "grpc or http/protobuf (http/json is not supported)",
                }),
            };
        }
    }
    Ok(OtlpProtocol::HttpProtobuf)
}

fn resolve_compression(
    get: &impl Fn(&'static str) -> Option<String>,
) -> Result<OtlpCompression, ExportError> {
    for name in [
        OTEL_EXPORTER_OTLP_TRACES_COMPRESSION,
        OTEL_EXPORTER_OTLP_COMPRESSION,
    ] {
        if let Some(value) = get(name) {
            return match value.trim().to_ascii_lowercase().as_str() {
                "gzip" => Ok(OtlpCompression::Gzip),
                "none" => Ok(OtlpCompression::Uncompressed),
                _ => Err(ExportError::InvalidEnv {
                    name,
                    value,
                    expected: "gzip or none",
                }),
            };
        }
    }
    Ok(OtlpCompression::Gzip)
}

/// Why the export stage could not start. Each message says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// An environment variable has a value the agent cannot use.
    #[error("invalid {name}={value:?}: expected {expected}; fix or unset it")]
    InvalidEnv {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A setting passed in [`ExportConfig`] is out of range.
    #[error("invalid export setting {name} = {value}: {expected}")]
    InvalidSetting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The OTLP endpoint is not a URL the agent can send to.
    #[error("invalid OTLP endpoint {endpoint:?} (from {origin}): {reason}")]
    InvalidEndpoint {
        endpoint: String,
        /// The option or variable it came from.
        origin: String,
        /// What is wrong and what to pass instead.
        reason: String,
    },
    /// opentelemetry-otlp refused its configuration (gRPC: endpoint, headers, ...).
    #[error(
        "cannot set up the OTLP exporter: {error}; check the endpoint and the \
         OTEL_EXPORTER_OTLP_* variables"
    )]
    OtlpSetup {
        #[source]
        error: opentelemetry_otlp::ExporterBuildError,
    },
    /// The `--output` file cannot be opened for appending.
    #[error(
        "cannot open --output {path}: {error}; pass a writable file path, or leave --output \
         out to write to stdout",
        path = path.display()
    )]
    OpenOutput {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// [`Exporter::start`] was called outside a tokio runtime.
    #[error("the exporter must be started from inside the agent's tokio runtime")]
    NoRuntime,
}

/// State shared by the handles and the export task.
#[derive(Debug)]
struct Shared {
    /// Spans held: queued, in the batch being sent, or waiting for a retry.
    held: AtomicUsize,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// Takes a place in the queue, unless it is full.
    fn reserve(&self) -> bool {
        let reserved = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.capacity).then_some(held + 1)
            });
        match reserved {
            Ok(before) => {
                self.metrics.export_queue_length.set(before as u64 + 1);
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back `count` places (spans delivered or dropped).
    fn release(&self, count: usize) {
        if count == 0 {
            return;
        }
        let before = self.held.fetch_sub(count, Ordering::AcqRel);
        self.metrics
            .export_queue_length
            .set(before.saturating_sub(count) as u64);
    }

    /// `spans` accepted by the destination in `requests` requests.
    fn delivered(&self, spans: usize, requests: u64) {
        self.metrics.spans_exported.inc_by(spans as u64);
        self.metrics.export_batches.inc_by(requests);
        self.release(spans);
    }

    /// `spans` that will never be delivered.
    fn dropped(&self, reason: SpanDrop, spans: usize) {
        self.metrics.drop_spans(reason, spans as u64);
        self.release(spans);
    }
}

/// The pipeline's side of the export queue. Cheap to clone; [`Self::submit`] never waits.
#[derive(Clone, Debug)]
pub struct ExportHandle {
    tx: mpsc::UnboundedSender<worker::Queued>,
    shared: Arc<Shared>,
    /// Encode each span here (OTLP/HTTP): its strings are still in the cache from being built,
    /// which makes it cheaper than in the batch later, and the queue holds a few hundred bytes
    /// per span instead of the span.
    encode: bool,
}

impl ExportHandle {
    /// Queues a span; when the queue is full the span is dropped and counted (reason
    /// queue_full), after shutdown it is dropped and counted (reason shutdown). Returns false
    /// when dropped.
    pub fn submit(&self, item: ExportItem) -> bool {
        if !self.shared.reserve() {
            self.shared.metrics.drop_spans(SpanDrop::QueueFull, 1);
            return false;
        }
        let queued = if self.encode {
            worker::Queued::Encoded(worker::EncodedSpan::new(item))
        } else {
            worker::Queued::Span(Box::new(item))
        };
        // The channel is unbounded; `held` is the bound, so a send never waits.
        if self.tx.send(queued).is_err() {
            self.shared.dropped(SpanDrop::Shutdown, 1);
            return false;
        }
        true
    }

    /// Spans held by the exporter now (queued, being sent or retried).
    pub fn queue_len(&self) -> usize {
        self.shared.held.load(Ordering::Acquire)
    }
}

/// The export task. Dropping it without [`Self::shutdown`] stops it too: the handles stop
/// accepting spans and the task flushes for up to `export_timeout` on its own.
#[derive(Debug)]
pub struct Exporter {
    stop: oneshot::Sender<tokio::time::Instant>,
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Exporter {
    /// Starts the export task on the current tokio runtime. Nothing here waits on the
    /// network: the OTLP connection is made on the first export.
    pub fn start(
        config: ExportConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Exporter, ExportHandle), ExportError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
        let mut config = config;
        if config.queue_size == 0 {
            return Err(ExportError::InvalidSetting {
                name: "queue_size",
                value: "0".to_owned(),
                expected: "at least 1 span",
            });
        }
        if config.max_batch == 0 {
            return Err(ExportError::InvalidSetting {
                name: "max_batch",
                value: "0".to_owned(),
                expected: "at least 1 span",
            });
        }
        config.max_batch = config.max_batch.min(config.queue_size);
        // The tonic channel spawns its worker while being built, and the HTTP client's pool
        // takes the runtime's timer: enter the runtime for them.
        let sink = {
            let _entered = runtime.enter();
            worker::Sink::open(&config)?
        };

        let shared = Arc::new(Shared {
            held: AtomicUsize::new(0),
            capacity: config.queue_size,
            metrics,
        });
        let encode = sink.takes_encoded();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let worker = worker::Worker::new(rx, sink, config, Arc::clone(&shared), stop_rx);
        let task = runtime.spawn(worker.run());
        Ok((
            Exporter {
                stop: stop_tx,
                task,
                shared: Arc::clone(&shared),
            },
            ExportHandle { tx, shared, encode },
        ))
    }

    /// Flushes what is queued (bounded by `timeout`) and stops. Spans not sent are counted as
    /// dropped (reason shutdown); spans submitted afterwards too.
    pub async fn shutdown(self, timeout: Duration) {
        let Self {
            stop,
            mut task,
            shared,
        } = self;
        let deadline = tokio::time::Instant::now() + timeout;
        // An error means the task already ended; joining it below is still right.
        let _ = stop.send(deadline);
        // The task honours the deadline itself; the margin covers a request that ignores
        // cancellation for a moment.
        let margin = Duration::from_millis(200);
        match tokio::time::timeout_at(deadline + margin, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => log::error!("export task failed: {error}"),
            Err(_) => {
                log::warn!("export did not stop within {timeout:?}; abandoning it");
                task.abort();
            }
        }
        // Whatever is still held (task aborted or failed) will never be sent.
        let left = shared.held.swap(0, Ordering::AcqRel);
        if left > 0 {
            shared.metrics.drop_spans(SpanDrop::Shutdown, left as u64);
        }
        shared.metrics.export_queue_length.set(0);
    }
}
