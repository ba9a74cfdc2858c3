//! The agent's self-metrics and readiness, served over HTTP when `--metrics-addr` is given.
//!
//! This module owns:
//! * [`Metrics`]: every counter and gauge the agent exports about itself (events read, bytes
//!   captured, losses in the kernel and in userspace, tracked connections, ...), registered in
//!   one `prometheus_client` registry under the `tracer_` prefix;
//! * readiness: whether every probe is attached, with a short human-readable reason;
//! * a small HTTP/1 server ([`bind`] + [`serve_on`], or [`serve`]) answering `GET /metrics`
//!   (OpenMetrics text), `GET /readyz` (200 once ready, 503 before) and 404 elsewhere.
//!
//! Units, so a reader of a dashboard never has to guess:
//! * `tracer_kernel_lost_events_total{reason}` and `tracer_userspace_lost_events_total{stage,reason}`
//!   count events (records / syscalls);
//! * `tracer_kernel_lost_bytes_total{reason}` and `tracer_userspace_lost_bytes_total{stage,reason}`
//!   count payload bytes;
//! * `tracer_spans_*` count spans, `tracer_export_batches_total` and `tracer_export_errors_total`
//!   count export requests (one per process in a batch, see `export`), and
//!   `tracer_export_queue_length` is in spans.
//!
//! Every label combination the agent can produce is created up front, so a scrape shows an
//! explicit `0` ("nothing lost") rather than an absent series.

use std::convert::Infallible;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Content type of `/metrics`: `prometheus_client` encodes OpenMetrics text (ending in `# EOF`),
/// which Prometheus parses when told so; `curl` does not care.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A slow or silent client must not hold a connection (and its task) forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Scrapers use one or two connections; the cap only bounds what a misbehaving client on a
/// non-loopback `--metrics-addr` can make the agent hold.
const MAX_CONNECTIONS: usize = 64;

/// `accept` fails mostly when the process is out of file descriptors; retrying at once would
/// spin, so wait a little for some to be freed.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A gauge of a non-negative quantity (a count or a byte size). Set it to absolute values
/// (`set(len as u64)`); `dec` below zero would wrap.
pub type CountGauge = Gauge<u64, AtomicU64>;

/// Why the kernel probes dropped something; the `reason` label of
/// `tracer_kernel_lost_events_total` and `tracer_kernel_lost_bytes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelLoss {
    /// The ring buffer had no room for the record.
    RingbufFull,
    /// Reading the payload from user memory failed.
    CopyFailed,
    /// A socket read or write made by a syscall the probes do not follow left a gap.
    UnfollowedSyscall,
    /// The connection map was full, so a connection went untracked.
    ConnMapFull,
}

impl KernelLoss {
    /// Every reason, to pre-create the series.
    pub const ALL: [Self; 4] = [
        Self::RingbufFull,
        Self::CopyFailed,
        Self::UnfollowedSyscall,
        Self::ConnMapFull,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RingbufFull => "ringbuf_full",
            Self::CopyFailed => "copy_failed",
            Self::UnfollowedSyscall => "unfollowed_syscall",
            Self::ConnMapFull => "conn_map_full",
        }
    }
}

impl EncodeLabelSet for KernelLoss {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        [("reason", self.as_str())].encode(encoder)
    }
}

/// Events the agent read but had to drop; the `{stage, reason}` labels of
/// `tracer_userspace_lost_events_total`. Counted in events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UserspaceEventLoss {
    /// `capture`/`decode_error`: a ring-buffer record could not be decoded.
    CaptureDecodeError,
    /// `capture`/`incomplete_syscall`: a syscall's records were incomplete, so it was dropped.
    CaptureIncompleteSyscall,
    /// `pipeline`/`no_connection`: reassembled data or an exchange whose connection was no
    /// longer known, so it could not be attributed and was dropped.
    PipelineNoConnection,
}

impl UserspaceEventLoss {
    /// Every kind, to pre-create the series.
    pub const ALL: [Self; 3] = [
        Self::CaptureDecodeError,
        Self::CaptureIncompleteSyscall,
        Self::PipelineNoConnection,
    ];

    /// The `stage` label value.
    pub fn stage(self) -> &'static str {
        match self {
            Self::CaptureDecodeError | Self::CaptureIncompleteSyscall => "capture",
            Self::PipelineNoConnection => "pipeline",
        }
    }

    /// The `reason` label value.
    pub fn reason(self) -> &'static str {
        match self {
            Self::CaptureDecodeError => "decode_error",
            Self::CaptureIncompleteSyscall => "incomplete_syscall",
            Self::PipelineNoConnection => "no_connection",
        }
    }
}

impl EncodeLabelSet for UserspaceEventLoss {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        [("stage", self.stage()), ("reason", self.reason())].encode(encoder)
    }
}

/// Stream bytes the agent could not deliver in order; the `{stage, reason}` labels of
/// `tracer_userspace_lost_bytes_total`. Counted in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UserspaceByteLoss {
    /// `streams`/`gap`: bytes lost in capture (ring buffer full, ...), skipped over. Tails the
    /// capture limit or sendfile left out are not counted here.
    StreamGap,
    /// `streams`/`overflow`: bytes discarded because the reassembly buffer was full.
    StreamOverflow,
    /// `streams`/`duplicate`: bytes seen a second time; the copy was discarded.
    StreamDuplicate,
}

impl UserspaceByteLoss {
    /// Every kind, to pre-create the series.
    pub const ALL: [Self; 3] = [Self::StreamGap, Self::StreamOverflow, Self::StreamDuplicate];

    /// The `stage` label value.
    pub fn stage(self) -> &'static str {
        match self {
            Self::StreamGap | Self::StreamOverflow | Self::StreamDuplicate => "streams",
        }
    }

    /// The `reason` label value.
    pub fn reason(self) -> &'static str {
        match self {
            Self::StreamGap => "gap",
            Self::StreamOverflow => "overflow",
            Self::StreamDuplicate => "duplicate",
        }
    }
}

impl EncodeLabelSet for UserspaceByteLoss {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        [("stage", self.stage()), ("reason", self.reason())].encode(encoder)
    }
}

/// Why a finished span never reached the exporter's destination; the `reason` label of
/// `tracer_spans_dropped_total`. Counted in spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpanDrop {
    /// The export queue was full (the collector is slow or away).
    QueueFull,
    /// The destination refused the spans, or kept failing until the retry budget ran out.
    ExportFailed,
    /// The agent stopped before the spans could be sent.
    Shutdown,
    /// The sampler decided not to keep the span.
    SampledOut,
}

impl SpanDrop {
    /// Every reason, to pre-create the series.
    pub const ALL: [Self; 4] = [
        Self::QueueFull,
        Self::ExportFailed,
        Self::Shutdown,
        Self::SampledOut,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
            Self::Shutdown => "shutdown",
            Self::SampledOut => "sampled_out",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::QueueFull => 0,
            Self::ExportFailed => 1,
            Self::Shutdown => 2,
            Self::SampledOut => 3,
        }
    }

    /// What the one-time log line says about this reason.
    fn explanation(self) -> &'static str {
        match self {
            Self::QueueFull => {
                "the export queue is full (collector slow or unreachable); raise \
                 OTEL_BSP_MAX_QUEUE_SIZE or check the collector"
            }
            Self::ExportFailed => {
                "the destination refused them or stayed unreachable past the retry budget"
            }
            Self::Shutdown => "the agent stopped before they could be sent",
            Self::SampledOut => "the sampler did not keep them (expected with sampling on)",
        }
    }
}

impl EncodeLabelSet for SpanDrop {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        [("reason", self.as_str())].encode(encoder)
    }
}

#[derive(Debug)]
struct Readiness {
    ready: bool,
    reason: String,
}

/// Every counter and gauge of the agent, plus readiness. Share it as `Arc<Metrics>`; the
/// handles (`Counter`, `Gauge`) are cheap to clone and update lock-free.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `tracer_events_received_total`: ring-buffer records the agent read.
    pub events_received: Counter,
    /// `tracer_bytes_captured_total`: payload bytes the kernel captured.
    pub bytes_captured: Counter,
    /// `tracer_bytes_not_captured_total`: socket bytes moved but not captured.
    pub bytes_not_captured: Counter,
    /// `tracer_connections_tracked`.
    pub connections_tracked: CountGauge,
    /// `tracer_processes_traced`.
    pub processes_traced: CountGauge,
    /// `tracer_probes_attached`.
    pub probes_attached: CountGauge,
    /// `tracer_stream_pending_bytes`: bytes held in reassembly buffers.
    pub stream_pending_bytes: CountGauge,
    /// `tracer_spans_created_total`: spans the pipeline built (before sampling).
    pub spans_created: Counter,
    /// `tracer_spans_exported_total`: spans the destination accepted.
    pub spans_exported: Counter,
    /// `tracer_export_errors_total`: failed export attempts (each retry counts).
    pub export_errors: Counter,
    /// `tracer_export_batches_total`: export requests that succeeded.
    pub export_batches: Counter,
    /// `tracer_export_queue_length`: spans held by the exporter (queued or being sent).
    pub export_queue_length: CountGauge,
    spans_dropped: Family<SpanDrop, Counter>,
    /// Whether a drop of each [`SpanDrop`] reason was logged already (index: `SpanDrop::index`).
    span_drop_logged: [AtomicBool; SpanDrop::ALL.len()],
    spans_kept: Family<[(&'static str, &'static str); 1], Counter>,
    tls: Family<[(&'static str, &'static str); 1], Counter>,
    selection: Family<[(&'static str, &'static str); 1], Counter>,
    kernel_lost_events: Family<KernelLoss, Counter>,
    kernel_lost_bytes: Family<KernelLoss, Counter>,
    userspace_lost_events: Family<UserspaceEventLoss, Counter>,
    userspace_lost_bytes: Family<UserspaceByteLoss, Counter>,
    parse_errors: Family<ParseLabels, Counter>,
    span_links: Family<OneLabel, Counter>,
    link_limits: Family<OneLabel, Counter>,
    calls_skipped: Family<OneLabel, Counter>,
    readiness: Mutex<Readiness>,
}

/// `event` values of `tracer_tls_total`.
pub const TLS_EVENTS: [&str; 9] = [
    "files_attached",
    "processes_attached",
    "processes_detached",
    "processes_without_ssl",
    "libssl_without_symbols",
    "errors",
    "plaintext_lost_no_socket",
    "calls_lost_map_full",
    "ciphertext_bytes",
];

/// `event` values of `tracer_selection_total`, as `select::SelectorStats` names them.
pub const SELECTION_EVENTS: [&str; 7] = [
    "execs",
    "listens",
    "selected",
    "refused",
    "records_dropped",
    "decided_late",
    "decode_errors",
];

/// `{parser, reason}` of `tracer_parse_errors_total`; both come from fixed sets of names.
pub type ParseLabels = [(&'static str, &'static str); 2];

/// One label from a fixed set of names.
pub type OneLabel = [(&'static str, &'static str); 1];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family, with all known label sets at 0; not ready yet.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tracer");

        let events_received = Counter::default();
        registry.register(
            "events_received",
            "Ring-buffer records read by the agent",
            events_received.clone(),
        );
        let bytes_captured = Counter::default();
        registry.register(
            "bytes_captured",
            "Socket payload bytes the kernel captured",
            bytes_captured.clone(),
        );
        let bytes_not_captured = Counter::default();
        registry.register(
            "bytes_not_captured",
            "Socket payload bytes sent or received but not captured: beyond the capture limit, \
             in an unfollowed syscall, or on a connection beyond --max-connections",
            bytes_not_captured.clone(),
        );

        let kernel_lost_events = precreated(KernelLoss::ALL);
        registry.register(
            "kernel_lost_events",
            "Events the kernel probes dropped, by reason (ringbuf_full: ring buffer full; \
             copy_failed: reading user memory failed; unfollowed_syscall: a socket read or write \
             made by a syscall whose buffers the probes do not know (splice, io_uring, a 32-bit \
             process), its bytes a gap counted in bytes_not_captured; conn_map_full: a read or write on a \
             connection beyond --max-connections, its bytes counted in bytes_not_captured)",
            kernel_lost_events.clone(),
        );
        let kernel_lost_bytes = precreated([KernelLoss::RingbufFull]);
        registry.register(
            "kernel_lost_bytes",
            "Payload bytes of the events the kernel probes dropped, by reason (ringbuf_full)",
            kernel_lost_bytes.clone(),
        );

        let userspace_lost_events = precreated(UserspaceEventLoss::ALL);
        registry.register(
            "userspace_lost_events",
            "Events the agent read but dropped, by stage and reason (capture/decode_error: \
             undecodable record; capture/incomplete_syscall: a syscall's records were incomplete; \
             pipeline/no_connection: data whose connection was unknown)",
            userspace_lost_events.clone(),
        );
        let userspace_lost_bytes = precreated(UserspaceByteLoss::ALL);
        registry.register(
            "userspace_lost_bytes",
            "Stream bytes the agent could not deliver in order, by stage and reason \
             (streams/gap: bytes lost in capture and skipped over, not counting the uncaptured \
             tails in tracer_bytes_not_captured_total; streams/overflow: discarded because the \
             reassembly buffer was full; streams/duplicate: bytes seen twice, copy discarded)",
            userspace_lost_bytes.clone(),
        );
        let parse_errors = Family::<ParseLabels, Counter>::default();
        for reason in crate::http1::Http1Error::ALL {
            let _ = parse_errors.get_or_create(&[("parser", "http1"), ("reason", reason.as_str())]);
        }
        for reason in crate::http2::Http2Error::ALL {
            let _ = parse_errors.get_or_create(&[("parser", "http2"), ("reason", reason.as_str())]);
        }
        registry.register(
            "parse_errors",
            "Messages or headers the agent could not use, by parser and reason (http1: an \
             HTTP/1 message dropped or cut short; http2: an HTTP/2 frame or header block that could \
             not be used, including HPACK state lost (hpack_*); tracecontext: a traceparent/tracestate/b3 \
             header that was invalid, so the request started a new trace)",
            parse_errors.clone(),
        );

        let span_links = Family::<OneLabel, Counter>::default();
        for method in crate::link::LinkMethod::ALL {
            let _ = span_links.get_or_create(&[("method", method.as_str())]);
        }
        registry.register(
            "span_links",
            "Spans by how their parent was found (peer_connection: the client end of the same \
             local connection; traceparent, b3: propagated context; forwarded_context, thread, \
             only_in_process, forwarded_target: the server request in flight in the same \
             process; own_context: ids the caller put in its request; ambiguous: several \
             candidates, none linked; root: no parent)",
            span_links.clone(),
        );
        let link_limits = precreated_one("reason", &["reorder_overflow", "calls_full"]);
        registry.register(
            "link_limits",
            "Times the linking stage hit a memory bound (reorder_overflow: events linked before \
             their reorder window passed; calls_full: a request not tracked as a possible parent)",
            link_limits.clone(),
        );
        let calls_skipped = precreated_one("reason", &["self_instrumented"]);
        registry.register(
            "calls_skipped",
            "Requests that got no span by design (self_instrumented: the process exports its own \
             spans with an OpenTelemetry SDK)",
            calls_skipped.clone(),
        );

        let connections_tracked = CountGauge::default();
        registry.register(
            "connections_tracked",
            "Connections the agent currently tracks",
            connections_tracked.clone(),
        );
        let processes_traced = CountGauge::default();
        registry.register(
            "processes_traced",
            "Processes currently traced",
            processes_traced.clone(),
        );
        let probes_attached = CountGauge::default();
        registry.register(
            "probes_attached",
            "eBPF programs currently attached",
            probes_attached.clone(),
        );
        let stream_pending_bytes = CountGauge::default();
        registry.register(
            "stream_pending_bytes",
            "Bytes buffered in stream reassembly, waiting for missing data",
            stream_pending_bytes.clone(),
        );

        let spans_created = Counter::default();
        registry.register(
            "spans_created",
            "Spans the pipeline built, before sampling",
            spans_created.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "spans_exported",
            "Spans the export destination accepted",
            spans_exported.clone(),
        );
        let spans_dropped = precreated(SpanDrop::ALL);
        registry.register(
            "spans_dropped",
            "Spans that were never delivered, by reason (queue_full: export queue full; \
             export_failed: refused or retried until the budget ran out; shutdown: still queued \
             when the agent stopped; sampled_out: not kept by the sampler)",
            spans_dropped.clone(),
        );
        let spans_kept = precreated([[("reason", "error")], [("reason", "slow")]]);
        registry.register(
            "spans_kept",
            "Spans the sampler dropped but --keep-errors (error) or --keep-slower-than (slow) \
             exported anyway",
            spans_kept.clone(),
        );
        let export_errors = Counter::default();
        registry.register(
            "export_errors",
            "Export attempts that failed (each retry counts)",
            export_errors.clone(),
        );
        let export_batches = Counter::default();
        registry.register(
            "export_batches",
            "Export requests that succeeded (one per traced process in a batch)",
            export_batches.clone(),
        );
        let tls = precreated(TLS_EVENTS.map(|event| [("event", event)]));
        registry.register(
            "tls",
            "TLS capture (uprobes on OpenSSL): files attached, processes given uprobes and \
             processes whose uprobes were detached (exited or no longer traced), processes or \
             libssl files without SSL symbols, inspect/attach errors, plaintext lost for want of a socket, SSL calls \
             missed (call map full), ciphertext bytes kept out of the pipeline",
            tls.clone(),
        );
        let selection = precreated(SELECTION_EVENTS.map(|event| [("event", event)]));
        registry.register(
            "selection",
            "Process selection (--exe, --port, exclusions): execs and listens seen, processes \
             selected and refused, records of refused processes dropped, processes decided late \
             (their exec record was lost), undecodable selection records",
            selection.clone(),
        );
        let export_queue_length = CountGauge::default();
        registry.register(
            "export_queue_length",
            "Spans held by the exporter: queued, or being sent and retried",
            export_queue_length.clone(),
        );

        Self {
            registry,
            events_received,
            bytes_captured,
            bytes_not_captured,
            connections_tracked,
            processes_traced,
            probes_attached,
            stream_pending_bytes,
            kernel_lost_events,
            kernel_lost_bytes,
            userspace_lost_events,
            userspace_lost_bytes,
            spans_created,
            spans_exported,
            export_errors,
            export_batches,
            export_queue_length,
            spans_dropped,
            span_drop_logged: Default::default(),
            spans_kept,
            tls,
            selection,
            parse_errors,
            span_links,
            link_limits,
            calls_skipped,
            readiness: Mutex::new(Readiness {
                ready: false,
                reason: "starting: probes not attached yet".to_owned(),
            }),
        }
    }

    /// `tracer_kernel_lost_events_total{reason}`, in events.
    pub fn kernel_lost_events(&self, reason: KernelLoss) -> Counter {
        self.kernel_lost_events.get_or_create_owned(&reason)
    }

    /// `tracer_kernel_lost_bytes_total{reason}`, in bytes. Only `ringbuf_full` is shown from
    /// the start; another reason appears once first used.
    pub fn kernel_lost_bytes(&self, reason: KernelLoss) -> Counter {
        self.kernel_lost_bytes.get_or_create_owned(&reason)
    }

    /// `tracer_userspace_lost_events_total{stage,reason}`, in events.
    pub fn userspace_lost_events(&self, loss: UserspaceEventLoss) -> Counter {
        self.userspace_lost_events.get_or_create_owned(&loss)
    }

    /// `tracer_userspace_lost_bytes_total{stage,reason}`, in bytes.
    pub fn userspace_lost_bytes(&self, loss: UserspaceByteLoss) -> Counter {
        self.userspace_lost_bytes.get_or_create_owned(&loss)
    }

    /// `tracer_spans_dropped_total{reason}`, in spans. Prefer [`Self::drop_spans`], which also
    /// logs the first drop of each reason.
    /// `tracer_parse_errors_total{parser, reason}`.
    pub fn parse_errors(&self, parser: &'static str, reason: &'static str) -> Counter {
        self.parse_errors
            .get_or_create(&[("parser", parser), ("reason", reason)])
            .clone()
    }

    /// `tracer_span_links_total{method}`.
    pub fn span_links(&self, method: &'static str) -> Counter {
        self.span_links.get_or_create(&[("method", method)]).clone()
    }

    /// `tracer_link_limits_total{reason}`.
    pub fn link_limits(&self, reason: &'static str) -> Counter {
        self.link_limits
            .get_or_create(&[("reason", reason)])
            .clone()
    }

    /// `tracer_calls_skipped_total{reason}`.
    pub fn calls_skipped(&self, reason: &'static str) -> Counter {
        self.calls_skipped
            .get_or_create(&[("reason", reason)])
            .clone()
    }

    pub fn spans_dropped(&self, reason: SpanDrop) -> Counter {
        self.spans_dropped.get_or_create_owned(&reason)
    }

    /// `tracer_tls_total{event}`, one of [`TLS_EVENTS`].
    pub fn tls(&self, event: &'static str) -> Counter {
        self.tls.get_or_create_owned(&[("event", event)])
    }

    /// `tracer_selection_total{event}`.
    pub fn selection(&self, event: &'static str) -> Counter {
        self.selection.get_or_create_owned(&[("event", event)])
    }

    /// `tracer_spans_kept_total{reason}` (`error`, `slow`): spans exported although sampled out.
    pub fn spans_kept(&self, reason: &'static str) -> Counter {
        self.spans_kept.get_or_create_owned(&[("reason", reason)])
    }

    /// Counts `count` spans dropped for `reason`; the first drop of each reason is logged (as a
    /// warning, except `sampled_out`, which is by design), later ones only counted.
    pub fn drop_spans(&self, reason: SpanDrop, count: u64) {
        if count == 0 {
            return;
        }
        self.spans_dropped(reason).inc_by(count);
        if !self.span_drop_logged[reason.index()].swap(true, Ordering::Relaxed) {
            let level = match reason {
                SpanDrop::SampledOut => log::Level::Info,
                _ => log::Level::Warn,
            };
            log::log!(
                level,
                "dropping spans ({}): {}; counted in tracer_spans_dropped_total{{reason=\"{}\"}}, \
                 logged only once",
                reason.as_str(),
                reason.explanation(),
                reason.as_str()
            );
        }
    }

    /// Raises `counter` to `total`, an absolute total read elsewhere (e.g. per-CPU kernel
    /// counters summed). A lower total (a map re-created, a racing older read) is ignored so
    /// the counter stays monotonic, as Prometheus requires.
    pub fn observe_total(&self, counter: &Counter, total: u64) {
        // `fetch_max` rather than get + inc_by: two concurrent observers cannot both add the
        // same difference.
        counter.inner().fetch_max(total, Ordering::Relaxed);
    }

    /// [`Self::observe_total`] for `tracer_kernel_lost_events_total{reason}`.
    pub fn observe_kernel_lost_events(&self, reason: KernelLoss, total: u64) {
        self.observe_total(&self.kernel_lost_events(reason), total);
    }

    /// [`Self::observe_total`] for `tracer_kernel_lost_bytes_total{reason}`.
    pub fn observe_kernel_lost_bytes(&self, reason: KernelLoss, total: u64) {
        self.observe_total(&self.kernel_lost_bytes(reason), total);
    }

    /// Every family in OpenMetrics text (see [`METRICS_CONTENT_TYPE`]), ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an error would come from a broken label encoder.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            log::error!("cannot encode metrics: {error}");
        }
        text
    }

    /// Records readiness; `reason` is what `/readyz` answers, e.g. "12 of 14 probes attached".
    pub fn set_ready(&self, ready: bool, reason: &str) {
        let mut readiness = self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        readiness.ready = ready;
        reason.clone_into(&mut readiness.reason);
    }

    /// Whether the agent is ready, and why (or why not).
    pub fn is_ready(&self) -> (bool, String) {
        // A writer cannot leave the pair half-updated in a way that matters, so a poisoned
        // lock is still worth reading.
        let readiness = self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (readiness.ready, readiness.reason.clone())
    }
}

/// A counter family with `label_sets` already at 0, so they show up before anything happens.
fn precreated_one(label: &'static str, values: &[&'static str]) -> Family<OneLabel, Counter> {
    let family = Family::<OneLabel, Counter>::default();
    for value in values {
        let _ = family.get_or_create(&[(label, *value)]);
    }
    family
}

fn precreated<S>(label_sets: impl IntoIterator<Item = S>) -> Family<S, Counter>
where
    S: Clone + Eq + Hash,
{
    let family = Family::default();
    for labels in label_sets {
        // The returned guard holds the family's read lock; only the insertion is wanted.
        drop(family.get_or_create(&labels));
    }
    family
}

/// Errors of the metrics HTTP server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The listening socket could not be created.
    #[error("cannot listen on {addr} for metrics: {error}; {}", bind_hint(.error))]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "pass a port above 1023 in --metrics-addr, or run with CAP_NET_BIND_SERVICE"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "pass an address of this host in --metrics-addr (e.g. 127.0.0.1:9464)"
        }
        _ => "pass another --metrics-addr",
    }
}

/// Creates the listening socket, so the caller learns a bad `--metrics-addr` before spawning
/// [`serve_on`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| MetricsError::Bind { addr, error })
}

/// Serves `/metrics` and `/readyz` (and 404 elsewhere) until the future is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), MetricsError> {
    let listener = bind(addr).await?;
    serve_on(listener, metrics).await
}

/// Serves `/metrics` and `/readyz` on `listener` until the future is dropped, which also ends
/// the connections in flight. Errors on a connection or on `accept` are logged and do not stop
/// the server, so this only returns (with an error) if `serve` fails to bind.
pub async fn serve_on(listener: TcpListener, metrics: Arc<Metrics>) -> Result<(), MetricsError> {
    match listener.local_addr() {
        Ok(addr) => log::info!("serving metrics on http://{addr}/metrics and /readyz"),
        Err(error) => log::info!("serving metrics (local address unknown: {error})"),
    }
    // Connections live in a JoinSet owned by this future: dropping it aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= MAX_CONNECTIONS {
                        log::debug!("metrics: refusing connection from {peer}: too many open");
                        continue;
                    }
                    connections.spawn(serve_connection(stream, peer, Arc::clone(&metrics)));
                }
                Err(error) => {
                    log::warn!("metrics: cannot accept a connection: {error}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            // Reap finished connections so the set does not grow with every scrape.
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = joined {
                    log::warn!("metrics: connection task failed: {error}");
                }
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, metrics: Arc<Metrics>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(request.method(), request.uri().path(), &metrics);
        async move { Ok::<_, Infallible>(response) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = result {
        log::debug!("metrics: connection from {peer}: {error}");
    }
}

fn respond(method: &Method, path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    let known = matches!(path, "/metrics" | "/readyz");
    if known && method != Method::GET && method != Method::HEAD {
        let mut response = text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let mut response = text_response(StatusCode::OK, metrics.encode());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        "/readyz" => {
            let (ready, reason) = metrics.is_ready();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let reason = match (reason.is_empty(), ready) {
                (false, _) => reason,
                (true, true) => "ready".to_owned(),
                (true, false) => "not ready".to_owned(),
            };
            text_response(status, format!("{reason}\n"))
        }
        _ => text_response(
            StatusCode::NOT_FOUND,
            "not found; try /metrics or /readyz\n".to_owned(),
        ),
    }
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    // Built by hand rather than with `Response::builder()`, whose `body()` is fallible.
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const FAMILIES: [&str; 11] = [
        "tracer_events_received",
        "tracer_bytes_captured",
        "tracer_bytes_not_captured",
        "tracer_kernel_lost_events",
        "tracer_kernel_lost_bytes",
        "tracer_userspace_lost_events",
        "tracer_userspace_lost_bytes",
        "tracer_connections_tracked",
        "tracer_processes_traced",
        "tracer_probes_attached",
        "tracer_stream_pending_bytes",
    ];

    #[test]
    fn span_families_are_zero_at_start_and_drops_count() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        for series in [
            "tracer_spans_created_total 0\n",
            "tracer_spans_exported_total 0\n",
            "tracer_spans_dropped_total{reason=\"queue_full\"} 0\n",
            "tracer_spans_dropped_total{reason=\"export_failed\"} 0\n",
            "tracer_spans_dropped_total{reason=\"shutdown\"} 0\n",
            "tracer_spans_dropped_total{reason=\"sampled_out\"} 0\n",
            "tracer_export_errors_total 0\n",
            "tracer_export_batches_total 0\n",
            "tracer_export_queue_length 0\n",
        ] {
            assert!(text.contains(series), "missing {series:?} in\n{text}");
        }
        metrics.drop_spans(SpanDrop::QueueFull, 3);
        metrics.drop_spans(SpanDrop::QueueFull, 2);
        metrics.drop_spans(SpanDrop::Shutdown, 0);
        assert_eq!(metrics.spans_dropped(SpanDrop::QueueFull).get(), 5);
        assert_eq!(metrics.spans_dropped(SpanDrop::Shutdown).get(), 0);
        assert!(
            metrics
                .encode()
                .contains("tracer_spans_dropped_total{reason=\"queue_full\"} 5\n")
        );
    }

    #[test]
    fn every_family_is_zero_at_start() {
        let text = Metrics::new().encode();
        for family in FAMILIES {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family}\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family}\n{text}"
            );
        }
        let zero_series = [
            "tracer_events_received_total 0\n",
            "tracer_bytes_captured_total 0\n",
            "tracer_bytes_not_captured_total 0\n",
            "tracer_kernel_lost_events_total{reason=\"ringbuf_full\"} 0\n",
            "tracer_kernel_lost_events_total{reason=\"copy_failed\"} 0\n",
            "tracer_kernel_lost_events_total{reason=\"unfollowed_syscall\"} 0\n",
            "tracer_kernel_lost_events_total{reason=\"conn_map_full\"} 0\n",
            "tracer_kernel_lost_bytes_total{reason=\"ringbuf_full\"} 0\n",
            "tracer_userspace_lost_events_total{stage=\"capture\",reason=\"decode_error\"} 0\n",
            "tracer_userspace_lost_events_total{stage=\"capture\",reason=\"incomplete_syscall\"} 0\n",
            "tracer_userspace_lost_events_total{stage=\"pipeline\",reason=\"no_connection\"} 0\n",
            "tracer_userspace_lost_bytes_total{stage=\"streams\",reason=\"gap\"} 0\n",
            "tracer_userspace_lost_bytes_total{stage=\"streams\",reason=\"overflow\"} 0\n",
            "tracer_userspace_lost_bytes_total{stage=\"streams\",reason=\"duplicate\"} 0\n",
            "tracer_connections_tracked 0\n",
            "tracer_processes_traced 0\n",
            "tracer_probes_attached 0\n",
            "tracer_stream_pending_bytes 0\n",
        ];
        for series in zero_series {
            assert!(text.contains(series), "missing {series:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn observe_total_is_monotonic() {
        let metrics = Metrics::new();
        let counter = metrics.kernel_lost_events(KernelLoss::CopyFailed);
        metrics.observe_total(&counter, 10);
        assert_eq!(counter.get(), 10);
        metrics.observe_total(&counter, 3);
        assert_eq!(counter.get(), 10);
        metrics.observe_total(&counter, 10);
        assert_eq!(counter.get(), 10);
        metrics.observe_total(&counter, u64::MAX);
        assert_eq!(counter.get(), u64::MAX);
        metrics.observe_total(&counter, 0);
        assert_eq!(counter.get(), u64::MAX);

        metrics.observe_kernel_lost_bytes(KernelLoss::RingbufFull, 4096);
        metrics.observe_kernel_lost_bytes(KernelLoss::RingbufFull, 1);
        assert!(
            metrics
                .encode()
                .contains("tracer_kernel_lost_bytes_total{reason=\"ringbuf_full\"} 4096\n")
        );
    }

    #[test]
    fn readiness_round_trips() {
        let metrics = Metrics::new();
        assert!(!metrics.is_ready().0);
        metrics.set_ready(true, "all 3 probes attached");
        assert_eq!(
            metrics.is_ready(),
            (true, "all 3 probes attached".to_owned())
        );
    }

    #[tokio::test]
    async fn bind_error_names_the_address_and_the_flag() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = bind(addr).await.unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("cannot listen on {addr} for metrics: ")),
            "{error}"
        );
        assert!(error.ends_with("; pass another --metrics-addr"), "{error}");
    }

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    async fn request(addr: SocketAddr, raw: &str) -> Reply {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(raw.as_bytes()).await.unwrap();
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).await.unwrap();
            String::from_utf8(bytes).unwrap()
        };
        let text = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("server did not answer in time");
        let (head, body) = text.split_once("\r\n\r\n").expect("no end of headers");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("no status code");
        Reply {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    #[tokio::test]
    async fn server_answers_metrics_readyz_and_404() {
        let metrics = Arc::new(Metrics::new());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_on(listener, Arc::clone(&metrics)));

        metrics.events_received.inc_by(7);
        metrics.bytes_captured.inc_by(1500);
        metrics.connections_tracked.set(3);
        metrics
            .userspace_lost_bytes(UserspaceByteLoss::StreamGap)
            .inc_by(42);
        metrics.observe_kernel_lost_events(KernelLoss::RingbufFull, 5);

        let reply = get(addr, "/metrics").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(
            reply
                .head
                .contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{}",
            reply.head
        );
        for series in [
            "tracer_events_received_total 7\n",
            "tracer_bytes_captured_total 1500\n",
            "tracer_connections_tracked 3\n",
            "tracer_userspace_lost_bytes_total{stage=\"streams\",reason=\"gap\"} 42\n",
            "tracer_kernel_lost_events_total{reason=\"ringbuf_full\"} 5\n",
            "tracer_kernel_lost_events_total{reason=\"copy_failed\"} 0\n",
        ] {
            assert!(
                reply.body.contains(series),
                "missing {series:?} in\n{}",
                reply.body
            );
        }

        let reply = get(addr, "/readyz").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, "starting: probes not attached yet\n");
        metrics.set_ready(true, "all 14 probes attached");
        let reply = get(addr, "/readyz").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "all 14 probes attached\n");

        let reply = get(addr, "/").await;
        assert_eq!(reply.status, 404);
        let reply = get(addr, "/metrics/extra").await;
        assert_eq!(reply.status, 404);

        let reply = request(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(reply.status, 405);
        assert!(reply.head.contains("allow: get, head"), "{}", reply.head);

        // A broken request only ends its own connection.
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage
            .write_all(b"\x00\x01 not http\r\n\r\n")
            .await
            .unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut sink)).await;
        assert_eq!(get(addr, "/readyz").await.status, 200);

        // Two requests on one keep-alive connection, as a scraper does.
        let reply = request(
            addr,
            "GET /readyz HTTP/1.1\r\nHost: test\r\n\r\n\
             GET /readyz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.body.matches("HTTP/1.1 200 OK").count(),
            1,
            "{}",
            reply.body
        );

        server.abort();
        assert!(server.await.unwrap_err().is_cancelled());
    }
}
