//! The console sink: completed traces as indented trees on stdout, readable at a glance.
//!
//! ```text
//! trace 4bf92f3577b34da6a3ce929d0e0e4736  (2 spans, 12.3 ms)
//! └─ SERVER python3 (pid 1234)  GET /index.html  200  12.3 ms
//!    └─ CLIENT python3 (pid 1234)  GET http://127.0.0.1:9000/api  500 ERROR  3.1 ms
//! ```
//!
//! Spans arrive finished, children usually before their parent, so [`TraceTrees`] holds each
//! trace until it looks complete: it has a root (a span with no parent, or whose parent is
//! remote, i.e. in a process the agent does not see) and no span of it arrived for
//! `grace` (500 ms). A trace without such a root (its parent span is still running, or never
//! ends) is printed after `orphan_wait` (5 s) of quiet. Spans whose parent is not in the trace
//! are printed as trees of their own under the trace line, marked `(parent ... not seen)` unless
//! the parent is remote. A span of a trace arriving after the trace was printed starts a new
//! block with the same trace id.
//!
//! Memory: at most `max_pending_spans` spans wait; beyond that the oldest traces are printed at
//! once, incomplete, so nothing is dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use tokio::io::AsyncWriteExt as _;

use super::Shared;
use super::worker::{ResourceGroup, SinkError};

/// How the console waits for traces to complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Quiet time after which a trace with a root is printed; default 500 ms.
    pub grace: Duration,
    /// Quiet time after which a trace without a root is printed anyway; default 5 s.
    pub orphan_wait: Duration,
    /// Spans waiting at most; default 10,000.
    pub max_pending_spans: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_millis(500),
            orphan_wait: Duration::from_secs(5),
            max_pending_spans: 10_000,
        }
    }
}

#[derive(Debug)]
struct PendingTrace {
    spans: Vec<(Arc<Resource>, SpanData)>,
    first_seen: Instant,
    last_seen: Instant,
    has_root: bool,
}

/// Traces waiting to be printed. Time is passed in, so tests need no clock.
#[derive(Debug)]
pub struct TraceTrees {
    config: ConsoleConfig,
    pending: HashMap<TraceId, PendingTrace>,
    pending_spans: usize,
}

impl TraceTrees {
    pub fn new(config: ConsoleConfig) -> Self {
        Self {
            config,
            pending: HashMap::new(),
            pending_spans: 0,
        }
    }

    /// Adds a finished span. Returns the traces printed early to stay within
    /// `max_pending_spans` (usually none).
    pub fn push(&mut self, resource: Arc<Resource>, span: SpanData, now: Instant) -> Vec<String> {
        let is_root = span.parent_span_id == SpanId::INVALID || span.parent_span_is_remote;
        let trace = self
            .pending
            .entry(span.span_context.trace_id())
            .or_insert_with(|| PendingTrace {
                spans: Vec::new(),
                first_seen: now,
                last_seen: now,
                has_root: false,
            });
        trace.spans.push((resource, span));
        trace.last_seen = now;
        trace.has_root |= is_root;
        self.pending_spans += 1;

        let mut early = Vec::new();
        while self.pending_spans > self.config.max_pending_spans {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, trace)| trace.first_seen)
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => early.extend(self.take(id)),
                None => break,
            }
        }
        early
    }

    /// The traces complete at `now`, rendered, oldest first.
    pub fn take_ready(&mut self, now: Instant) -> Vec<String> {
        let mut ready: Vec<(Instant, TraceId)> = self
            .pending
            .iter()
            .filter(|(_, trace)| {
                let quiet = now.saturating_duration_since(trace.last_seen);
                (trace.has_root && quiet >= self.config.grace) || quiet >= self.config.orphan_wait
            })
            .map(|(id, trace)| (trace.first_seen, *id))
            .collect();
        ready.sort_by_key(|&(seen, id)| (seen, id.to_bytes()));
        ready
            .into_iter()
            .filter_map(|(_, id)| self.take(id))
            .collect()
    }

    /// Every waiting trace, rendered, oldest first (at shutdown).
    pub fn take_all(&mut self) -> Vec<String> {
        let mut all: Vec<(Instant, TraceId)> = self
            .pending
            .iter()
            .map(|(id, trace)| (trace.first_seen, *id))
            .collect();
        all.sort_by_key(|&(seen, id)| (seen, id.to_bytes()));
        all.into_iter()
            .filter_map(|(_, id)| self.take(id))
            .collect()
    }

    /// When the next trace may become ready.
    pub fn next_wake(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|trace| {
                let wait = if trace.has_root {
                    self.config.grace
                } else {
                    self.config.orphan_wait
                };
                trace.last_seen + wait
            })
            .min()
    }

    /// Spans waiting.
    pub fn pending_spans(&self) -> usize {
        self.pending_spans
    }

    fn take(&mut self, id: TraceId) -> Option<String> {
        let trace = self.pending.remove(&id)?;
        self.pending_spans -= trace.spans.len();
        Some(render_trace(&trace.spans))
    }
}

/// Renders the spans of one trace as a tree (see the module docs), ending in a newline.
pub fn render_trace(spans: &[(Arc<Resource>, SpanData)]) -> String {
    let Some((_, first)) = spans.first() else {
        return String::new();
    };
    let start = spans.iter().map(|(_, span)| span.start_time).min();
    let end = spans.iter().map(|(_, span)| span.end_time).max();
    let total = match (start, end) {
        (Some(start), Some(end)) => elapsed(start, end),
        _ => Duration::ZERO,
    };
    let mut out = format!(
        "trace {}  ({} span{}, {})\n",
        first.span_context.trace_id(),
        spans.len(),
        if spans.len() == 1 { "" } else { "s" },
        format_duration(total)
    );

    let ids: HashSet<SpanId> = spans
        .iter()
        .map(|(_, span)| span.span_context.span_id())
        .collect();
    let mut children: HashMap<SpanId, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (index, (_, span)) in spans.iter().enumerate() {
        if span.parent_span_id != SpanId::INVALID && ids.contains(&span.parent_span_id) {
            children.entry(span.parent_span_id).or_default().push(index);
        } else {
            roots.push(index);
        }
    }
    let by_start = |a: &usize, b: &usize| spans[*a].1.start_time.cmp(&spans[*b].1.start_time);
    roots.sort_by(by_start);
    for list in children.values_mut() {
        list.sort_by(by_start);
    }

    // Spans caught in a parent cycle (bad input) have no root; print them as roots at the end
    // rather than lose them.
    let mut printed: HashSet<usize> = HashSet::new();
    print_subtrees(&mut out, spans, &roots, &children, &mut printed);
    let unreached: Vec<usize> = (0..spans.len())
        .filter(|index| !printed.contains(index))
        .collect();
    print_subtrees(&mut out, spans, &unreached, &children, &mut printed);
    out
}

/// Prints the trees under `roots`, depth-first, skipping spans already `printed`.
fn print_subtrees(
    out: &mut String,
    spans: &[(Arc<Resource>, SpanData)],
    roots: &[usize],
    children: &HashMap<SpanId, Vec<usize>>,
    printed: &mut HashSet<usize>,
) {
    // (span index, prefix of its line, is the last sibling, is a root)
    let mut stack: VecDeque<(usize, String, bool, bool)> = roots
        .iter()
        .enumerate()
        .map(|(position, &root)| (root, String::new(), position + 1 == roots.len(), true))
        .collect();
    while let Some((index, prefix, last, is_root)) = stack.pop_front() {
        if !printed.insert(index) {
            continue;
        }
        let (resource, span) = &spans[index];
        let branch = if last { "└─ " } else { "├─ " };
        let _ = writeln!(
            out,
            "{prefix}{branch}{}",
            span_line(resource, span, is_root)
        );
        let child_prefix = format!("{prefix}{}", if last { "   " } else { "│  " });
        if let Some(list) = children.get(&span.span_context.span_id()) {
            for (position, &child) in list.iter().enumerate().rev() {
                let last_child = position + 1 == list.len();
                stack.push_front((child, child_prefix.clone(), last_child, false));
            }
        }
    }
}

/// `KIND service (pid N)  name target  code STATUS  duration`.
fn span_line(resource: &Resource, span: &SpanData, is_root: bool) -> String {
    let kind = match span.span_kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Producer => "PRODUCER",
        SpanKind::Consumer => "CONSUMER",
        SpanKind::Internal => "INTERNAL",
    };
    let service = resource
        .get(&Key::from_static_str("service.name"))
        .map_or_else(|| "unknown_service".to_owned(), |value| value.to_string());
    let mut who = format!("{kind} {service}");
    if let Some(pid) = resource.get(&Key::from_static_str("process.pid")) {
        let _ = write!(who, " (pid {pid})");
    }

    let mut what = span.name.to_string();
    if let Some(target) = target(span) {
        what.push(' ');
        what.push_str(&target);
    }

    let mut parts = vec![who, what];
    let mut outcome = Vec::new();
    if let Some(code) = attribute(span, "http.response.status_code") {
        outcome.push(code.to_string());
    } else if let Some(code) = attribute(span, "rpc.grpc.status_code") {
        outcome.push(format!("grpc {code}"));
    }
    if let Status::Error { .. } = span.status {
        outcome.push("ERROR".to_owned());
    }
    if !outcome.is_empty() {
        parts.push(outcome.join(" "));
    }
    parts.push(format_duration(elapsed(span.start_time, span.end_time)));
    if is_root && span.parent_span_id != SpanId::INVALID && !span.parent_span_is_remote {
        parts.push(format!("(parent {} not seen)", span.parent_span_id));
    }
    parts.join("  ")
}

/// What the span was about: the full URL of a client request, the path (and query) of a
/// server request.
fn target(span: &SpanData) -> Option<String> {
    if let Some(full) = attribute(span, "url.full") {
        return Some(full.to_string());
    }
    let path = attribute(span, "url.path")?;
    Some(match attribute(span, "url.query") {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    })
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn elapsed(start: SystemTime, end: SystemTime) -> Duration {
    end.duration_since(start).unwrap_or(Duration::ZERO)
}

/// `420 µs`, `12.3 ms`, `1.25 s`.
fn format_duration(duration: Duration) -> String {
    if duration < Duration::from_millis(1) {
        format!("{} µs", duration.as_micros())
    } else if duration < Duration::from_secs(1) {
        format!("{:.1} ms", duration.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", duration.as_secs_f64())
    }
}

/// The console as a sink: trees go to stdout through tokio, so a slow terminal never blocks
/// the pipeline's thread.
pub(super) struct ConsoleSink {
    trees: TraceTrees,
    out: tokio::io::Stdout,
    /// A write failed (stdout closed): logged once.
    write_failed: bool,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("trees", &self.trees)
            .finish_non_exhaustive()
    }
}

impl ConsoleSink {
    pub fn stdout(config: ConsoleConfig) -> Self {
        Self {
            trees: TraceTrees::new(config),
            out: tokio::io::stdout(),
            write_failed: false,
        }
    }

    /// Takes the spans into the trace buffer (they count as exported there) and prints what
    /// is complete.
    pub async fn export(
        &mut self,
        groups: &mut VecDeque<ResourceGroup>,
        shared: &Shared,
    ) -> Result<(), SinkError> {
        let now = Instant::now();
        let mut early = Vec::new();
        let mut count = 0;
        for group in groups.drain(..) {
            count += group.spans.len();
            for span in group.spans {
                early.extend(self.trees.push(Arc::clone(&group.resource), span, now));
            }
        }
        shared.delivered(count, 1);
        self.print(early).await;
        let ready = self.trees.take_ready(now);
        self.print(ready).await;
        Ok(())
    }

    pub fn next_wake(&self) -> Option<tokio::time::Instant> {
        self.trees.next_wake().map(tokio::time::Instant::from_std)
    }

    pub async fn on_timer(&mut self) {
        let ready = self.trees.take_ready(Instant::now());
        self.print(ready).await;
    }

    pub async fn finish(&mut self) {
        let all = self.trees.take_all();
        self.print(all).await;
    }

    async fn print(&mut self, traces: Vec<String>) {
        if traces.is_empty() {
            return;
        }
        let text = traces.concat();
        let written = async {
            self.out.write_all(text.as_bytes()).await?;
            self.out.flush().await
        }
        .await;
        if let Err(error) = written
            && !self.write_failed
        {
            self.write_failed = true;
            log::warn!("cannot print traces on stdout: {error}");
        }
    }
}
