//! The export task: collects batches from the queue, hands them to the sink (OTLP, console or
//! JSON lines), retries failed batches with backoff, and flushes on shutdown.
//!
//! One batch is in flight at a time, so spans leave in the order they came. While a batch waits
//! for a retry, new spans keep queueing (bounded by `queue_size`, see `mod.rs`); once the
//! destination is back the backlog leaves in full batches without waiting for
//! `schedule_delay`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use super::console::ConsoleSink;
use super::encode::encode_span;
use super::jsonl::JsonlSink;
use super::otlp::OtlpSink;
use super::otlp_http::HttpSink;
use super::{ExportConfig, ExportError, ExportItem, ExporterKind, OtlpProtocol, Shared};
use crate::metrics::SpanDrop;

/// Spans of a batch allocated for before they arrive, at most.
const MAX_BATCH_RESERVE: usize = 4_096;

/// A span in the queue: already encoded for the OTLP/HTTP sink, or as submitted for the
/// others. Boxed, as the queue and the batch move items by value: an encoded span is 136
/// bytes, a span 368.
#[derive(Debug)]
pub(super) enum Queued {
    Encoded(EncodedSpan),
    Span(Box<ExportItem>),
}

impl Queued {
    fn resource(&self) -> (u64, &Arc<Resource>) {
        match self {
            Self::Span(item) => (item.resource_id, &item.resource),
            Self::Encoded(span) => (span.resource_id, &span.resource),
        }
    }
}

/// A span as `encode.rs` writes it into a request, and what groups it there.
#[derive(Debug)]
pub(super) struct EncodedSpan {
    pub resource_id: u64,
    pub resource: Arc<Resource>,
    pub scope: InstrumentationScope,
    /// The `ScopeSpans.spans` field: key, length, `Span`.
    pub bytes: Vec<u8>,
}

/// Room for a typical span (an nginx exchange takes about 470 bytes); a longer one grows.
const ENCODED_SPAN_CAPACITY: usize = 512;

impl EncodedSpan {
    /// Encodes `item`'s span and drops the rest of it.
    pub fn new(item: ExportItem) -> Self {
        let ExportItem {
            resource_id,
            resource,
            span,
        } = item;
        let mut bytes = Vec::with_capacity(ENCODED_SPAN_CAPACITY);
        encode_span(&mut bytes, &span);
        Self {
            resource_id,
            resource,
            scope: span.instrumentation_scope,
            bytes,
        }
    }
}

/// The spans of one process within a batch: one OTLP request, one `ResourceSpans`.
#[derive(Debug)]
pub(super) struct ResourceGroup {
    pub resource_id: u64,
    pub resource: Arc<Resource>,
    /// The spans, for every sink but OTLP/HTTP.
    pub spans: Vec<SpanData>,
    /// The spans, for OTLP/HTTP (whose handle encodes them when queued).
    pub encoded: Vec<EncodedSpan>,
}

impl ResourceGroup {
    pub fn len(&self) -> usize {
        self.spans.len() + self.encoded.len()
    }
}

/// Groups a batch by process, in order of first appearance.
pub(super) fn group_by_resource(batch: Vec<Queued>) -> VecDeque<ResourceGroup> {
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut groups: VecDeque<ResourceGroup> = VecDeque::new();
    // Each item's group, found first so every group's spans are allocated once (spans are
    // large; growing by doubling would copy them again and again).
    let mut slots = Vec::with_capacity(batch.len());
    let mut counts: Vec<usize> = Vec::new();
    // Consecutive spans usually come from the same process: skip the hash then.
    let mut last: Option<(u64, usize)> = None;
    for item in &batch {
        let (resource_id, resource) = item.resource();
        let slot = match last {
            Some((id, slot)) if id == resource_id => slot,
            _ => {
                let slot = *index.entry(resource_id).or_insert_with(|| {
                    groups.push_back(ResourceGroup {
                        resource_id,
                        resource: Arc::clone(resource),
                        spans: Vec::new(),
                        encoded: Vec::new(),
                    });
                    counts.push(0);
                    groups.len() - 1
                });
                last = Some((resource_id, slot));
                slot
            }
        };
        counts[slot] += 1;
        slots.push(slot);
    }
    // A queue holds one kind of item: the sink's.
    let encoded = matches!(batch.first(), Some(Queued::Encoded(_)));
    for (group, count) in groups.iter_mut().zip(counts) {
        if encoded {
            group.encoded.reserve_exact(count);
        } else {
            group.spans.reserve_exact(count);
        }
    }
    for (item, slot) in batch.into_iter().zip(slots) {
        match item {
            Queued::Span(item) => groups[slot].spans.push(item.span),
            Queued::Encoded(span) => groups[slot].encoded.push(span),
        }
    }
    groups
}

fn span_count(groups: &VecDeque<ResourceGroup>) -> usize {
    groups.iter().map(ResourceGroup::len).sum()
}

/// A failed export attempt.
#[derive(Debug)]
pub(super) struct SinkError {
    /// Retrying cannot help (the destination refused the data, a local write failed).
    pub permanent: bool,
    pub message: String,
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where batches go.
#[derive(Debug)]
pub(super) enum Sink {
    /// OTLP/gRPC through opentelemetry-otlp.
    Otlp(OtlpSink),
    /// OTLP http/protobuf, our encoder and client. Boxed: by far the largest sink.
    OtlpHttp(Box<HttpSink>),
    Console(ConsoleSink),
    Jsonl(JsonlSink),
}

impl Sink {
    /// Builds the destination; must run inside the tokio runtime.
    pub fn open(config: &ExportConfig) -> Result<Self, ExportError> {
        Ok(match &config.kind {
            ExporterKind::Otlp { protocol, endpoint } => {
                match protocol.unwrap_or(OtlpProtocol::HttpProtobuf) {
                    OtlpProtocol::Grpc => Self::Otlp(OtlpSink::build_grpc(
                        endpoint.as_deref(),
                        config.compression,
                    )?),
                    OtlpProtocol::HttpProtobuf => Self::OtlpHttp(Box::new(HttpSink::build(
                        endpoint.as_deref(),
                        config.compression,
                    )?)),
                }
            }
            ExporterKind::Console => Self::Console(ConsoleSink::stdout(config.console.clone())),
            ExporterKind::Jsonl { path } => Self::Jsonl(JsonlSink::open(path.as_deref())?),
        })
    }

    /// Whether spans are queued encoded ([`EncodedSpan`]) for this sink.
    pub fn takes_encoded(&self) -> bool {
        matches!(self, Self::OtlpHttp(_))
    }

    /// Sends `groups`, removing each from the front once delivered (and reporting it to
    /// `shared`), so a retry never sends a group twice.
    async fn export(
        &mut self,
        groups: &mut VecDeque<ResourceGroup>,
        shared: &Shared,
    ) -> Result<(), SinkError> {
        match self {
            Self::Otlp(sink) => sink.export(groups, shared).await,
            Self::OtlpHttp(sink) => sink.export(groups, shared).await,
            Self::Console(sink) => sink.export(groups, shared).await,
            Self::Jsonl(sink) => sink.export(groups, shared).await,
        }
    }

    /// When the sink wants [`Self::on_timer`] called (the console's grace period).
    fn next_wake(&self) -> Option<Instant> {
        match self {
            Self::Console(sink) => sink.next_wake(),
            Self::Otlp(_) | Self::OtlpHttp(_) | Self::Jsonl(_) => None,
        }
    }

    /// How long the destination asked to be left alone after the last failure (HTTP
    /// `Retry-After`), taken.
    fn take_retry_after(&mut self) -> Option<Duration> {
        match self {
            Self::OtlpHttp(sink) => sink.take_retry_after(),
            Self::Otlp(_) | Self::Console(_) | Self::Jsonl(_) => None,
        }
    }

    async fn on_timer(&mut self) {
        if let Self::Console(sink) = self {
            sink.on_timer().await;
        }
    }

    /// Last call: print what waits, flush, close connections.
    async fn finish(&mut self) {
        match self {
            Self::Otlp(sink) => sink.finish(),
            Self::OtlpHttp(sink) => sink.finish(),
            Self::Console(sink) => sink.finish().await,
            Self::Jsonl(sink) => sink.finish().await,
        }
    }
}

/// What woke the collecting loop.
enum Event {
    Stop(Instant),
    Item(Queued),
    Closed,
    FlushDue,
    SinkTimer,
}

pub(super) struct Worker {
    rx: mpsc::UnboundedReceiver<Queued>,
    sink: Sink,
    config: ExportConfig,
    shared: Arc<Shared>,
    /// Taken once the stop signal arrived.
    stop: Option<oneshot::Receiver<Instant>>,
    /// Set when stopping: nothing is sent after it.
    deadline: Option<Instant>,
    /// No more items will come (queue closed and drained).
    closed: bool,
    /// The destination is failing: log the first failure and the recovery, not every retry.
    failing: bool,
}

impl Worker {
    pub fn new(
        rx: mpsc::UnboundedReceiver<Queued>,
        sink: Sink,
        config: ExportConfig,
        shared: Arc<Shared>,
        stop: oneshot::Receiver<Instant>,
    ) -> Self {
        Self {
            rx,
            sink,
            config,
            shared,
            stop: Some(stop),
            deadline: None,
            closed: false,
            failing: false,
        }
    }

    pub async fn run(mut self) {
        loop {
            let batch = self.next_batch().await;
            if !batch.is_empty() {
                self.deliver(batch).await;
            } else if self.closed {
                break;
            }
        }
        self.sink.finish().await;
    }

    /// Stops accepting spans; what is queued still goes out until `deadline`.
    fn begin_stop(&mut self, deadline: Instant) {
        self.stop = None;
        self.deadline = Some(deadline);
        self.rx.close();
    }

    fn past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Waits for the stop signal; forever once it came.
    async fn stop_signal(
        stop: &mut Option<oneshot::Receiver<Instant>>,
        fallback: Duration,
    ) -> Instant {
        match stop {
            // A dropped `Exporter` (sender gone) stops like a shutdown with the export timeout.
            Some(receiver) => receiver.await.unwrap_or_else(|_| Instant::now() + fallback),
            None => std::future::pending().await,
        }
    }

    /// The next batch: `max_batch` spans, or fewer once the first one has waited
    /// `schedule_delay`, or whatever is left when stopping. Empty only when closed.
    async fn next_batch(&mut self) -> Vec<Queued> {
        let max = self.config.max_batch;
        // Room for a full batch up front (bounded: a huge max_batch should not reserve memory
        // for spans that may never come); spans are large, so growing by doubling costs.
        let mut batch = Vec::with_capacity(max.min(MAX_BATCH_RESERVE));
        let mut flush_at: Option<Instant> = None;
        loop {
            // Take what is already queued without waiting (a backlog after an outage).
            while batch.len() < max {
                match self.rx.try_recv() {
                    Ok(item) => {
                        flush_at.get_or_insert_with(|| Instant::now() + self.config.schedule_delay);
                        batch.push(item);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        break;
                    }
                }
            }
            if batch.len() >= max || self.closed || (!batch.is_empty() && self.deadline.is_some()) {
                return batch;
            }

            let wake = self.sink.next_wake();
            let event = tokio::select! {
                deadline = Self::stop_signal(&mut self.stop, self.config.export_timeout) => {
                    Event::Stop(deadline)
                }
                item = self.rx.recv() => item.map_or(Event::Closed, Event::Item),
                () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    Event::FlushDue
                }
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    Event::SinkTimer
                }
            };
            match event {
                Event::Stop(deadline) => self.begin_stop(deadline),
                Event::Item(item) => {
                    flush_at.get_or_insert_with(|| Instant::now() + self.config.schedule_delay);
                    batch.push(item);
                }
                Event::Closed => self.closed = true,
                Event::FlushDue => return batch,
                Event::SinkTimer => self.sink.on_timer().await,
            }
        }
    }

    /// Sends one batch, retrying with backoff until it is delivered, refused, given up, or
    /// the shutdown deadline passes.
    async fn deliver(&mut self, batch: Vec<Queued>) {
        let mut groups = group_by_resource(batch);
        let retry = self.config.retry;
        let mut backoff = retry.initial_backoff;
        let mut first_failure: Option<Instant> = None;
        loop {
            if self.past_deadline() {
                self.shared.dropped(SpanDrop::Shutdown, span_count(&groups));
                return;
            }
            let mut attempt_limit = self.config.export_timeout;
            if let Some(deadline) = self.deadline {
                attempt_limit =
                    attempt_limit.min(deadline.saturating_duration_since(Instant::now()));
            }
            let attempt =
                tokio::time::timeout(attempt_limit, self.sink.export(&mut groups, &self.shared));
            let error = match attempt.await {
                Ok(Ok(())) => {
                    if self.failing {
                        self.failing = false;
                        log::info!("export recovered: the destination accepts spans again");
                    }
                    return;
                }
                Ok(Err(error)) => error,
                Err(_) => SinkError {
                    permanent: false,
                    message: format!("no answer within {attempt_limit:?}"),
                },
            };
            self.shared.metrics.export_errors.inc();
            let pending = span_count(&groups);
            if error.permanent {
                log::warn!(
                    "export failed and retrying cannot help: {error}; dropping {pending} spans"
                );
                self.shared.dropped(SpanDrop::ExportFailed, pending);
                return;
            }
            // Asked for by the destination (Retry-After): that wait instead of our backoff.
            let delay = self.sink.take_retry_after().unwrap_or(backoff);
            let now = Instant::now();
            let started = *first_failure.get_or_insert(now);
            let give_up_at = started + retry.give_up_after;
            if now >= give_up_at {
                log::warn!(
                    "export still failing after {:?}: {error}; giving up on {pending} spans",
                    retry.give_up_after
                );
                self.shared.dropped(SpanDrop::ExportFailed, pending);
                return;
            }
            if !self.failing {
                self.failing = true;
                log::warn!(
                    "export failed: {error}; retrying with backoff (first in {delay:?}, at most \
                     {:?} apart, for {:?}); up to {} spans wait meanwhile",
                    retry.max_backoff,
                    retry.give_up_after,
                    self.config.queue_size
                );
            } else {
                log::debug!("export failed again: {error}; next try in {delay:?}");
            }
            let mut wake = (now + delay).min(give_up_at);
            if let Some(deadline) = self.deadline {
                wake = wake.min(deadline);
            }
            tokio::select! {
                // Stopping: try once more right away, the destination may be back.
                deadline = Self::stop_signal(&mut self.stop, self.config.export_timeout) => {
                    self.begin_stop(deadline);
                }
                () = sleep_until(wake) => {}
            }
            backoff = backoff.saturating_mul(2).min(retry.max_backoff);
        }
    }
}
