//! Linking stage: decides, for every request, which trace it belongs to and which span is its
//! parent, so that a request crossing uninstrumented processes comes out as one trace.
//!
//! The stage sees each call twice: when its request head is parsed ([`CallStart`]) and when the
//! exchange completes ([`CallEnd`]). Both are held for a short reorder window and then processed
//! in timestamp order, because the ring buffer can deliver a client's write after the server's
//! read of the same bytes (the writer is preempted between sending and its syscall exit), and
//! causality is only visible in the timestamps: a client's write starts before the server's read
//! returns, and a child call starts and ends while its parent is in flight.
//!
//! Rules, in order (each link records how it was made in the span attribute
//! [`LINK_ATTRIBUTE`] and in `tracer_span_links_total`):
//! * SERVER request:
//!   1. `peer_connection`: the agent saw the client end of this very TCP connection (a local
//!      peer): the server span is the child of that client call (matched by the connection's
//!      two addresses, request order and request line) and joins its trace.
//!   2. `traceparent` / `b3`: valid context in the request: joins that trace, remote parent.
//!   3. `root`: starts a new trace (the sampler decides).
//! * CLIENT request of a process with server requests in flight:
//!   1. `forwarded_context`: the request carries context of an in-flight server request's trace
//!      (proxies such as nginx forward traceparent verbatim): child of that server request.
//!   2. `thread`: exactly one server request in flight on the same thread.
//!   3. `only_in_process`: no server request on that thread, exactly one in the process.
//!   4. `forwarded_target`: several candidates; one of them received the same method and
//!      target (a proxy forwarding the request): the oldest such one not yet forwarded.
//!   5. `ambiguous`: several candidates and no evidence: no link is guessed; the call starts
//!      its own trace (a wrong parent is worse than a missing one).
//! * CLIENT request with context of no in-flight request: `own_context`, the caller (a user's
//!   `curl -H traceparent:`, or partial instrumentation) named this very call: the span takes
//!   those ids. Without any: `root`.
//!
//! Processes that export their own spans with an OpenTelemetry SDK get no spans from us (their
//! SDK makes them, and both follow the same traceparent). They are recognised by their
//! environment (`OTEL_TRACES_EXPORTER` other than `none`, or an OTLP traces endpoint), by
//! `opentelemetry-instrument` in their command line, or from their first OTLP trace export
//! seen on the wire.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use log::info;
use opentelemetry::trace::{SpanId, TraceId, TraceState};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

use crate::{
    conntrack::Connection,
    field::Text,
    protocols::{Finished, StartInfo},
    resource::ProcessInfo,
    sample::Sampler,
    tracecontext::{self, ContextError, ContextFormat, SpanContext},
};

/// Span attribute naming how the span's parent was found.
pub const LINK_ATTRIBUTE: &str = "tracer_agent.link";

/// Default time events wait for earlier ones that the ring buffer may deliver late.
pub const DEFAULT_REORDER_WINDOW_NS: u64 = 50_000_000;
/// Events waiting in the reorder window at most; beyond it the oldest are processed early.
const MAX_QUEUED: usize = 200_000;
/// Calls tracked between start and end at most (started calls whose end never comes are
/// dropped when their connection closes; this bounds the rest).
const MAX_CALLS: usize = 200_000;
/// Processes whose instrumentation is remembered at most.
const MAX_PROCESSES: usize = 65_536;
/// Unpaired client calls kept per connection tuple.
const MAX_PEER_QUEUE: usize = 64;

/// How a span's parent (or its absence) was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkMethod {
    PeerConnection,
    Traceparent,
    B3,
    ForwardedContext,
    Thread,
    OnlyInProcess,
    ForwardedTarget,
    Ambiguous,
    OwnContext,
    Root,
}

impl LinkMethod {
    pub const ALL: [LinkMethod; 10] = [
        LinkMethod::PeerConnection,
        LinkMethod::Traceparent,
        LinkMethod::B3,
        LinkMethod::ForwardedContext,
        LinkMethod::Thread,
        LinkMethod::OnlyInProcess,
        LinkMethod::ForwardedTarget,
        LinkMethod::Ambiguous,
        LinkMethod::OwnContext,
        LinkMethod::Root,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkMethod::PeerConnection => "peer_connection",
            LinkMethod::Traceparent => "traceparent",
            LinkMethod::B3 => "b3",
            LinkMethod::ForwardedContext => "forwarded_context",
            LinkMethod::Thread => "thread",
            LinkMethod::OnlyInProcess => "only_in_process",
            LinkMethod::ForwardedTarget => "forwarded_target",
            LinkMethod::Ambiguous => "ambiguous",
            LinkMethod::OwnContext => "own_context",
            LinkMethod::Root => "root",
        }
    }
}

/// Which end of the call the traced process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallSide {
    Server,
    Client,
}

/// A request on a connection: its index on that connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallKey {
    pub conn_id: u64,
    pub seq: u64,
}

/// A request whose head has been parsed.
#[derive(Clone, Debug)]
pub struct CallStart {
    pub key: CallKey,
    pub side: CallSide,
    /// Thread that read (server) or wrote (client) the request's first byte.
    pub tid: u32,
    pub start_ns: u64,
    pub method: Text,
    pub target: Text,
    pub context: Result<Option<SpanContext>, ContextError>,
    pub conn: Arc<Connection>,
    /// `key.seq` is an HTTP/2 stream id, the same at both ends.
    pub http2: bool,
}

impl CallStart {
    /// The start of a request, from its parsed head.
    pub fn new(conn_id: u64, side: CallSide, info: &StartInfo<'_>, conn: &Arc<Connection>) -> Self {
        Self {
            key: CallKey {
                conn_id,
                seq: info.seq,
            },
            side,
            tid: info.tid,
            start_ns: info.start_ns,
            method: info.method.clone(),
            target: info.target.clone(),
            context: tracecontext::extract(info.headers.iter().map(|(k, v)| (&**k, v.as_ref()))),
            conn: conn.clone(),
            http2: info.http2,
        }
    }
}

/// A completed exchange.
#[derive(Clone, Debug)]
pub struct CallEnd {
    pub side: CallSide,
    pub finished: Finished,
    pub conn: Arc<Connection>,
}

/// The ids a span gets.
#[derive(Clone, Debug, PartialEq)]
pub struct CallIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// INVALID for a root.
    pub parent_span_id: SpanId,
    /// The parent is in another process (or outside the host).
    pub parent_is_remote: bool,
    pub sampled: bool,
    pub trace_state: TraceState,
    pub link: LinkMethod,
}

/// A completed call with its ids, ready to become a span.
#[derive(Debug)]
pub struct Linked {
    /// Kept in the box it was queued in: an exchange is a few hundred bytes, and moving it
    /// through the queue and out again was a visible share of the agent's CPU.
    pub end: Box<CallEnd>,
    pub ids: CallIds,
}

/// What the stage counted; the pipeline publishes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Spans by link method, indexed by the method's discriminant (see [`LinkStats::links`]):
    /// counted per exchange, where a hashed map's lookup was a measurable cost.
    pub links: [u64; LinkMethod::ALL.len()],
    /// Requests whose context header was invalid (a new trace was started), by reason.
    pub bad_context: HashMap<&'static str, u64>,
    /// Calls of self-instrumented processes, for which no span is made.
    pub instrumented_skipped: u64,
    /// Events processed before their reorder window passed, to bound memory.
    pub reorder_overflow: u64,
    /// Call starts not tracked because the table was full (their spans are still made, but
    /// cannot be parents).
    pub calls_full: u64,
}

impl LinkStats {
    /// Spans linked by `method`.
    pub fn links(&self, method: LinkMethod) -> u64 {
        self.links[method as usize]
    }
}

/// Queued event, ordered by timestamp then arrival.
struct Queued {
    ts: u64,
    event: Event,
}

enum Event {
    Start(Box<CallStart>),
    End(Box<CallEnd>),
}

/// A call between its start and its end.
struct Call {
    ids: CallIds,
    side: CallSide,
    pid: u32,
    tid: u32,
    start_ns: u64,
    method: Text,
    target: Text,
    /// Server calls: a client call was linked to it by `forwarded_target`.
    forwarded: bool,
    /// Client calls: the tuple under which it waits for its server end.
    peer: Option<PeerKey>,
    /// HTTP/2 stream id in `seq`.
    http2: bool,
    seq: u64,
}

/// (client address, server address) of a TCP connection, IPv4-mapped addresses unmapped.
type PeerKey = (SocketAddr, SocketAddr);

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn peer_key(conn: &Connection, side: CallSide) -> Option<PeerKey> {
    let (local, remote) = (unmap(conn.local?), unmap(conn.remote?));
    Some(match side {
        CallSide::Client => (local, remote),
        CallSide::Server => (remote, local),
    })
}

/// Why a process is taken as instrumented with an OpenTelemetry SDK, if it is.
pub fn self_instrumented(info: &ProcessInfo) -> Option<&'static str> {
    let env = |k: &str| info.otel_env.get(k).map(|v| v.trim().to_ascii_lowercase());
    if env("OTEL_SDK_DISABLED").as_deref() == Some("true") {
        return None;
    }
    match env("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => return None,
        Some(v) if !v.is_empty() => return Some("OTEL_TRACES_EXPORTER is set"),
        _ => {}
    }
    if env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some_and(|v| !v.is_empty())
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some_and(|v| !v.is_empty())
    {
        return Some("an OTLP endpoint is set in its environment");
    }
    if info
        .cmdline
        .iter()
        .take(3)
        .any(|arg| arg.ends_with("opentelemetry-instrument"))
    {
        return Some("it runs under opentelemetry-instrument");
    }
    None
}

/// An OTLP trace export request, by its target (HTTP) or path (gRPC).
fn is_otlp_trace_export(method: &str, target: &str) -> bool {
    method == "POST"
        && (target.ends_with("/v1/traces")
            || target.ends_with("/opentelemetry.proto.collector.trace.v1.TraceService/Export"))
}

pub struct Linker {
    window_ns: u64,
    /// Waiting events by timestamp, equal ones in arrival order. Nearly all arrive in order, so
    /// this is a queue with the odd late insert rather than a heap: popping a heap of a few
    /// thousand events was 5% of the agent's CPU under load.
    queue: VecDeque<Queued>,
    /// Newest event timestamp seen: events older than it by the window are safe to process.
    watermark: u64,
    calls: foldhash::HashMap<CallKey, Call>,
    /// Server calls in flight, per process, oldest first.
    inflight: foldhash::HashMap<u32, Vec<CallKey>>,
    /// Client calls waiting for their server end, per connection tuple.
    peers: foldhash::HashMap<PeerKey, VecDeque<CallKey>>,
    /// Processes known to export their own spans: (pid, start ticks) -> instrumented.
    instrumented: foldhash::HashMap<(u32, u64), bool>,
    ids: RandomIdGenerator,
    sampler: Sampler,
    pub stats: LinkStats,
}

impl Linker {
    pub fn new(sampler: Sampler, window_ns: u64) -> Self {
        Self {
            window_ns,
            queue: VecDeque::new(),
            watermark: 0,
            calls: Default::default(),
            inflight: Default::default(),
            peers: Default::default(),
            instrumented: Default::default(),
            ids: RandomIdGenerator::default(),
            sampler,
            stats: LinkStats::default(),
        }
    }

    pub fn start(&mut self, start: CallStart, out: &mut Vec<Linked>) {
        let ts = start.start_ns;
        self.enqueue(ts, Event::Start(Box::new(start)), out);
    }

    pub fn end(&mut self, end: CallEnd, out: &mut Vec<Linked>) {
        let ts = end.finished.end_ns();
        self.enqueue(ts, Event::End(Box::new(end)), out);
    }

    fn enqueue(&mut self, ts: u64, event: Event, out: &mut Vec<Linked>) {
        let queued = Queued { ts, event };
        if self.queue.back().is_none_or(|last| last.ts <= ts) {
            self.queue.push_back(queued);
        } else {
            // After every event with the same timestamp: those arrived first.
            let at = self.queue.partition_point(|q| q.ts <= ts);
            self.queue.insert(at, queued);
        }
        self.watermark = self.watermark.max(ts);
        while self.queue.len() > MAX_QUEUED {
            self.stats.reorder_overflow += 1;
            self.process_next(out);
        }
        self.release(self.watermark.saturating_sub(self.window_ns), out);
    }

    /// Processes the events older than `now_ns` minus the window (monotonic clock).
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Linked>) {
        self.release(now_ns.saturating_sub(self.window_ns), out);
    }

    /// Processes every waiting event (at shutdown).
    pub fn flush(&mut self, out: &mut Vec<Linked>) {
        while !self.queue.is_empty() {
            self.process_next(out);
        }
    }

    /// The process exited: forgets whether it was instrumented (its calls were finished by
    /// the connections' closes).
    pub fn forget_process(&mut self, pid: u32) {
        self.instrumented.retain(|(p, _), _| *p != pid);
        self.inflight.remove(&pid);
    }

    /// Events waiting in the reorder window, and calls in flight.
    pub fn pending(&self) -> (usize, usize) {
        (self.queue.len(), self.calls.len())
    }

    fn release(&mut self, upto: u64, out: &mut Vec<Linked>) {
        while self.queue.front().is_some_and(|q| q.ts <= upto) {
            self.process_next(out);
        }
    }

    fn process_next(&mut self, out: &mut Vec<Linked>) {
        let Some(queued) = self.queue.pop_front() else {
            return;
        };
        match queued.event {
            Event::Start(start) => self.on_start(start),
            Event::End(end) => self.on_end(end, out),
        }
    }

    fn is_instrumented(&mut self, conn: &Connection) -> bool {
        if self.instrumented.len() >= MAX_PROCESSES {
            // Exits race with calls still in the reorder window; start over rather than grow.
            // The environment rule is re-read from memory; only OTLP-seen marks are lost.
            self.instrumented.clear();
        }
        let info = &conn.process.info;
        *self
            .instrumented
            .entry((conn.pid, info.start_ticks))
            .or_insert_with(|| match self_instrumented(info) {
                Some(why) => {
                    info!(
                        "process {} ({}) exports its own spans ({why}); the agent makes none for it",
                        conn.pid, info.exe_name
                    );
                    true
                }
                None => false,
            })
    }

    /// A process seen sending OTLP trace exports is instrumented from then on.
    fn note_export(&mut self, start: &CallStart) {
        if start.side == CallSide::Client && is_otlp_trace_export(&start.method, &start.target) {
            let info = &start.conn.process.info;
            let known = self
                .instrumented
                .insert((start.conn.pid, info.start_ticks), true);
            if known != Some(true) {
                info!(
                    "process {} ({}) sends OTLP trace exports; the agent makes no more spans for it",
                    start.conn.pid, info.exe_name
                );
            }
        }
    }

    fn on_start(&mut self, start: Box<CallStart>) {
        self.note_export(&start);
        if self.is_instrumented(&start.conn) {
            return;
        }
        if self.calls.len() >= MAX_CALLS {
            self.stats.calls_full += 1;
            return;
        }
        let ids = match start.side {
            CallSide::Server => self.link_server(&start),
            CallSide::Client => self.link_client(&start),
        };
        let peer = match start.side {
            CallSide::Client => peer_key(&start.conn, CallSide::Client),
            CallSide::Server => None,
        };
        if let Some(key) = peer {
            let queue = self.peers.entry(key).or_default();
            if queue.len() >= MAX_PEER_QUEUE {
                // Its server end is not traced (or never came): stop waiting for the oldest.
                if let Some(old) = queue.pop_front()
                    && let Some(call) = self.calls.get_mut(&old)
                {
                    call.peer = None;
                }
            }
            queue.push_back(start.key);
        }
        if start.side == CallSide::Server {
            if self.inflight.len() >= MAX_PROCESSES {
                // Empty lists of processes that exited while their calls were still queued.
                self.inflight.retain(|_, list| !list.is_empty());
            }
            self.inflight
                .entry(start.conn.pid)
                .or_default()
                .push(start.key);
        }
        self.calls.insert(
            start.key,
            Call {
                ids,
                side: start.side,
                pid: start.conn.pid,
                tid: start.tid,
                start_ns: start.start_ns,
                method: start.method,
                target: start.target,
                forwarded: false,
                peer,
                http2: start.http2,
                seq: start.key.seq,
            },
        );
    }

    fn on_end(&mut self, end: Box<CallEnd>, out: &mut Vec<Linked>) {
        let key = CallKey {
            conn_id: end.finished.conn_id(),
            seq: end.finished.seq(),
        };
        let tracked = self.calls.remove(&key);
        if let Some(call) = &tracked {
            self.forget(key, call);
        }
        let Some(info) = end.finished.start_info() else {
            // Replaced by another call (h2c upgrade): nothing to make.
            return;
        };
        let ids = match tracked {
            Some(call) => call.ids,
            None => {
                // Its start was never tracked (instrumented process, or a full table).
                if self.is_instrumented(&end.conn) {
                    self.stats.instrumented_skipped += 1;
                    return;
                }
                let start = CallStart::new(key.conn_id, end.side, &info, &end.conn);
                self.note_export(&start);
                match end.side {
                    CallSide::Server => self.link_server(&start),
                    CallSide::Client => self.link_client(&start),
                }
            }
        };
        self.stats.links[ids.link as usize] += 1;
        out.push(Linked { end, ids });
    }

    fn forget(&mut self, key: CallKey, call: &Call) {
        if call.side == CallSide::Server
            && let Some(list) = self.inflight.get_mut(&call.pid)
        {
            // Kept when empty: a server handling one request at a time would otherwise
            // allocate a list per request. forget_process drops it.
            list.retain(|k| *k != key);
        }
        if let Some(peer) = call.peer
            && let Some(queue) = self.peers.get_mut(&peer)
        {
            queue.retain(|k| *k != key);
            if queue.is_empty() {
                self.peers.remove(&peer);
            }
        }
    }

    fn count_bad_context(&mut self, start: &CallStart) {
        if let Err(err) = &start.context {
            let count = self.stats.bad_context.entry(err.label()).or_default();
            if *count == 0 {
                log::warn!(
                    "a request carried an invalid trace context header ({err}); it starts a new \
                     trace. Counting further ones in tracer_parse_errors_total"
                );
            }
            *count += 1;
        }
    }

    fn root(&self, link: LinkMethod) -> CallIds {
        let trace_id = self.ids.new_trace_id();
        CallIds {
            trace_id,
            span_id: self.ids.new_span_id(),
            parent_span_id: SpanId::INVALID,
            parent_is_remote: false,
            sampled: self.sampler.should_sample(&trace_id.to_bytes(), None),
            trace_state: TraceState::default(),
            link,
        }
    }

    /// A propagated decision goes through the configured sampler (parentbased_* follows it).
    fn sample_remote(&self, ctx: &SpanContext) -> bool {
        let trace_id = ctx.trace_id.0;
        if ctx.sampling_deferred {
            // B3 senders may leave the decision to the receiver.
            self.sampler.should_sample(&trace_id, None)
        } else {
            self.sampler.should_sample(&trace_id, Some(ctx.sampled))
        }
    }

    fn child_of(&self, parent: &CallIds, remote: bool, link: LinkMethod) -> CallIds {
        CallIds {
            trace_id: parent.trace_id,
            span_id: self.ids.new_span_id(),
            parent_span_id: parent.span_id,
            parent_is_remote: remote,
            sampled: parent.sampled,
            trace_state: parent.trace_state.clone(),
            link,
        }
    }

    fn link_server(&mut self, start: &CallStart) -> CallIds {
        self.count_bad_context(start);
        if let Some(client) = self.take_peer(start) {
            return client;
        }
        match &start.context {
            Ok(Some(ctx)) => CallIds {
                trace_id: TraceId::from_bytes(ctx.trace_id.0),
                span_id: self.ids.new_span_id(),
                parent_span_id: SpanId::from_bytes(ctx.span_id.0),
                parent_is_remote: true,
                sampled: self.sample_remote(ctx),
                trace_state: trace_state(ctx),
                link: match ctx.format {
                    ContextFormat::W3C => LinkMethod::Traceparent,
                    ContextFormat::B3Single | ContextFormat::B3Multi => LinkMethod::B3,
                },
            },
            _ => self.root(LinkMethod::Root),
        }
    }

    /// The client end of this connection's request, if the agent traced it: the server call
    /// becomes its child. HTTP/1 requests pair in order, HTTP/2 streams by id; the request
    /// line must agree, so a client whose earlier requests the agent missed is not paired with
    /// the wrong one.
    fn take_peer(&mut self, start: &CallStart) -> Option<CallIds> {
        let key = peer_key(&start.conn, CallSide::Server)?;
        let queue = self.peers.get_mut(&key)?;
        let position = queue.iter().position(|k| {
            self.calls.get(k).is_some_and(|c| {
                c.start_ns <= start.start_ns
                    && c.method == start.method
                    && c.target == start.target
                    && (!start.http2 || (c.http2 && c.seq == start.key.seq))
            })
        })?;
        let client_key = queue.remove(position)?;
        if queue.is_empty() {
            self.peers.remove(&key);
        }
        let client = self.calls.get_mut(&client_key)?;
        client.peer = None;
        let parent = client.ids.clone();
        Some(self.child_of(&parent, true, LinkMethod::PeerConnection))
    }

    fn link_client(&mut self, start: &CallStart) -> CallIds {
        self.count_bad_context(start);
        let candidates: Vec<CallKey> = self
            .inflight
            .get(&start.conn.pid)
            .map(|list| {
                list.iter()
                    .copied()
                    .filter(|k| {
                        self.calls
                            .get(k)
                            .is_some_and(|c| c.start_ns <= start.start_ns)
                    })
                    .collect()
            })
            .unwrap_or_default();

        if let Ok(Some(ctx)) = &start.context {
            let trace_id = TraceId::from_bytes(ctx.trace_id.0);
            let forwarded = candidates.iter().copied().find(|k| {
                self.calls
                    .get(k)
                    .is_some_and(|c| c.ids.trace_id == trace_id)
            });
            if let Some(parent) = forwarded.and_then(|k| self.calls.get(&k)) {
                let mut ids = self.child_of(&parent.ids, false, LinkMethod::ForwardedContext);
                let own = SpanId::from_bytes(ctx.span_id.0);
                // The process put a span id of its own in the header: take it, so the server
                // that reads the header finds this span as its parent.
                if own != parent.ids.span_id && own != parent.ids.parent_span_id {
                    ids.span_id = own;
                }
                return ids;
            }
            return CallIds {
                trace_id,
                span_id: SpanId::from_bytes(ctx.span_id.0),
                parent_span_id: SpanId::INVALID,
                parent_is_remote: false,
                sampled: self.sample_remote(ctx),
                trace_state: trace_state(ctx),
                link: LinkMethod::OwnContext,
            };
        }

        let same_thread: Vec<CallKey> = candidates
            .iter()
            .copied()
            .filter(|k| self.calls.get(k).is_some_and(|c| c.tid == start.tid))
            .collect();
        let (pool, single) = if same_thread.is_empty() {
            (candidates, LinkMethod::OnlyInProcess)
        } else {
            (same_thread, LinkMethod::Thread)
        };
        let parent = match pool.as_slice() {
            [] => return self.root(LinkMethod::Root),
            [only] => Some((*only, single)),
            many => self
                .forwarding_candidate(many, start)
                .map(|k| (k, LinkMethod::ForwardedTarget)),
        };
        match parent {
            Some((key, link)) => {
                let Some(call) = self.calls.get_mut(&key) else {
                    return self.root(LinkMethod::Root);
                };
                if link == LinkMethod::ForwardedTarget {
                    call.forwarded = true;
                }
                let parent = call.ids.clone();
                self.child_of(&parent, false, link)
            }
            None => self.root(LinkMethod::Ambiguous),
        }
    }

    /// Among several in-flight server calls, the oldest not yet forwarded whose request had
    /// this method and target, if only one has; or, for a proxy that strips a path prefix, the
    /// only one whose target ends with this one (a non-root path). Several equal requests in
    /// flight give no answer: which of them a proxy forwards first is not knowable here.
    fn forwarding_candidate(&self, pool: &[CallKey], start: &CallStart) -> Option<CallKey> {
        let exact = |c: &Call| c.method == start.method && c.target == start.target;
        let suffix = |c: &Call| {
            c.method == start.method
                && start.target.len() > 1
                && c.target.ends_with(start.target.as_str())
        };
        for matches in [&exact as &dyn Fn(&Call) -> bool, &suffix] {
            let mut found = pool.iter().copied().filter(|k| {
                self.calls
                    .get(k)
                    .is_some_and(|c| !c.forwarded && matches(c))
            });
            match (found.next(), found.next()) {
                (Some(only), None) => return Some(only),
                (Some(_), Some(_)) => return None,
                _ => {}
            }
        }
        None
    }
}

fn trace_state(ctx: &SpanContext) -> TraceState {
    ctx.tracestate
        .as_ref()
        .and_then(|ts| {
            TraceState::from_key_value(ts.entries().iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use bytes::Bytes;

    use super::*;
    use crate::{
        conntrack::{AddressText, Process, Role, TupleSource},
        http1::{Exchange, Message, Request, Response},
    };

    const TP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const TP_PARENT: &str = "00f067aa0ba902b7";

    fn process(pid: u32, env: &[(&str, &str)]) -> Arc<Process> {
        Arc::new(Process {
            exe: format!("p{pid}"),
            info: ProcessInfo {
                pid,
                exe_name: format!("p{pid}"),
                otel_env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                start_ticks: 7,
                ..Default::default()
            },
            resource: Default::default(),
        })
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A connection of `process` from local port `local` to remote port `remote`.
    fn conn(
        id: u64,
        process: &Arc<Process>,
        role: Role,
        local: u16,
        remote: u16,
    ) -> Arc<Connection> {
        Arc::new(Connection {
            id,
            pid: process.info.pid,
            fd: 3,
            role,
            local: Some(addr(local)),
            remote: Some(addr(remote)),
            tuple_source: TupleSource::Kernel,
            process: Arc::clone(process),
            text: AddressText::default(),
            tls: false,
        })
    }

    fn message(tid: u32, start_ns: u64, end_ns: u64, headers: &[(&str, &str)]) -> Message {
        Message {
            start_ns,
            end_ns,
            tid,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string().into(), Bytes::from(v.to_string())))
                .collect(),
            trailers: Vec::new(),
            body_bytes: 0,
            header_bytes: 0,
            truncated: false,
        }
    }

    /// One scripted call: its request at `start`, its response ending at `end`.
    struct Script {
        linker: Linker,
        out: Vec<Linked>,
    }

    struct Call<'a> {
        conn: &'a Arc<Connection>,
        seq: u64,
        tid: u32,
        start: u64,
        end: u64,
        method: &'a str,
        target: &'a str,
        headers: &'a [(&'a str, &'a str)],
    }

    fn side(conn: &Connection) -> CallSide {
        match conn.role {
            Role::Client => CallSide::Client,
            _ => CallSide::Server,
        }
    }

    fn exchange(c: &Call<'_>) -> Exchange {
        Exchange {
            conn_id: c.conn.id,
            seq: c.seq,
            request: Request {
                method: c.method.into(),
                target: c.target.into(),
                version: 1,
                msg: message(c.tid, c.start, c.start + 1, c.headers),
            },
            response: Some(Response {
                status: 200,
                reason: "OK".into(),
                version: 1,
                msg: message(c.tid, c.end - 1, c.end, &[]),
            }),
            interim: Vec::new(),
        }
    }

    impl Script {
        fn new() -> Self {
            Self {
                linker: Linker::new(Sampler::default(), 1_000),
                out: Vec::new(),
            }
        }

        fn start(&mut self, c: &Call<'_>) {
            let finished = Finished::Http1(exchange(c));
            let info = finished.start_info().expect("an exchange");
            let start = CallStart::new(c.conn.id, side(c.conn), &info, c.conn);
            self.linker.start(start, &mut self.out);
        }

        fn end(&mut self, c: &Call<'_>) {
            let end = CallEnd {
                side: side(c.conn),
                finished: Finished::Http1(exchange(c)),
                conn: c.conn.clone(),
            };
            self.linker.end(end, &mut self.out);
        }

        fn call(&mut self, c: &Call<'_>) {
            self.start(c);
            self.end(c);
        }

        /// Links everything; (conn, seq) -> ids.
        fn finish(mut self) -> HashMap<(u64, u64), CallIds> {
            self.linker.flush(&mut self.out);
            self.out
                .into_iter()
                .map(|l| ((l.end.finished.conn_id(), l.end.finished.seq()), l.ids))
                .collect()
        }
    }

    fn call<'a>(conn: &'a Arc<Connection>, seq: u64, tid: u32, start: u64, end: u64) -> Call<'a> {
        Call {
            conn,
            seq,
            tid,
            start,
            end,
            method: "GET",
            target: "/",
            headers: &[],
        }
    }

    #[track_caller]
    fn assert_child(ids: &HashMap<(u64, u64), CallIds>, child: (u64, u64), parent: (u64, u64)) {
        let (c, p) = (&ids[&child], &ids[&parent]);
        assert_eq!(
            c.parent_span_id, p.span_id,
            "{child:?} under {parent:?}: {c:?}"
        );
        assert_eq!(
            c.trace_id, p.trace_id,
            "{child:?} in the trace of {parent:?}"
        );
    }

    #[track_caller]
    fn assert_root(ids: &HashMap<(u64, u64), CallIds>, call: (u64, u64), link: LinkMethod) {
        let c = &ids[&call];
        assert_eq!(
            c.parent_span_id,
            SpanId::INVALID,
            "{call:?} is a root: {c:?}"
        );
        assert_eq!(c.link, link);
    }

    #[test]
    fn a_thread_reused_for_the_next_request_parents_only_its_own_calls() {
        let p = process(1, &[]);
        let (s1, s2) = (
            conn(1, &p, Role::Server, 80, 5001),
            conn(2, &p, Role::Server, 80, 5002),
        );
        let (c1, c2) = (
            conn(3, &p, Role::Client, 6001, 90),
            conn(4, &p, Role::Client, 6002, 90),
        );
        let mut s = Script::new();
        s.start(&call(&s1, 0, 10, 100, 400));
        s.call(&call(&c1, 0, 10, 200, 300));
        s.end(&call(&s1, 0, 10, 100, 400));
        s.start(&call(&s2, 0, 10, 500, 800));
        s.call(&call(&c2, 0, 10, 600, 700));
        s.end(&call(&s2, 0, 10, 500, 800));
        let ids = s.finish();
        assert_child(&ids, (3, 0), (1, 0));
        assert_child(&ids, (4, 0), (2, 0));
        assert_eq!(ids[&(3, 0)].link, LinkMethod::Thread);
        assert_ne!(ids[&(1, 0)].trace_id, ids[&(2, 0)].trace_id);
    }

    #[test]
    fn thread_pool_links_by_thread_then_by_the_only_request_in_flight() {
        let p = process(1, &[]);
        let (s1, s2) = (
            conn(1, &p, Role::Server, 80, 5001),
            conn(2, &p, Role::Server, 80, 5002),
        );
        let (c1, c2) = (
            conn(3, &p, Role::Client, 6001, 90),
            conn(4, &p, Role::Client, 6002, 90),
        );
        let mut s = Script::new();
        // Two requests in flight on threads 10 and 11; thread 11 calls out.
        s.start(&call(&s1, 0, 10, 100, 900));
        s.start(&call(&s2, 0, 11, 110, 500));
        s.call(&call(&c1, 0, 11, 200, 300));
        s.end(&call(&s2, 0, 11, 110, 500));
        // Only s1 is left; a worker thread 20 that read no request calls out for it.
        s.call(&call(&c2, 0, 20, 600, 700));
        s.end(&call(&s1, 0, 10, 100, 900));
        let ids = s.finish();
        assert_child(&ids, (3, 0), (2, 0));
        assert_eq!(ids[&(3, 0)].link, LinkMethod::Thread);
        assert_child(&ids, (4, 0), (1, 0));
        assert_eq!(ids[&(4, 0)].link, LinkMethod::OnlyInProcess);
    }

    #[test]
    fn several_candidates_and_no_evidence_link_nothing() {
        let p = process(1, &[]);
        let (s1, s2) = (
            conn(1, &p, Role::Server, 80, 5001),
            conn(2, &p, Role::Server, 80, 5002),
        );
        let c1 = conn(3, &p, Role::Client, 6001, 90);
        let mut s = Script::new();
        s.start(&call(&s1, 0, 10, 100, 900));
        s.start(&call(&s2, 0, 11, 110, 900));
        s.call(&call(&c1, 0, 30, 200, 300));
        s.end(&call(&s1, 0, 10, 100, 900));
        s.end(&call(&s2, 0, 11, 110, 900));
        let ids = s.finish();
        assert_root(&ids, (3, 0), LinkMethod::Ambiguous);
    }

    #[test]
    fn an_event_loop_proxy_is_linked_by_the_forwarded_target() {
        let p = process(1, &[]);
        let servers: Vec<Arc<Connection>> = (0..3)
            .map(|i| conn(1 + i, &p, Role::Server, 80, 5000 + i as u16))
            .collect();
        let clients: Vec<Arc<Connection>> = (0..3)
            .map(|i| conn(10 + i, &p, Role::Client, 6000 + i as u16, 90))
            .collect();
        let targets = ["/r/0", "/r/1", "/r/2"];
        let mut s = Script::new();
        for (i, sc) in servers.iter().enumerate() {
            s.start(&Call {
                target: targets[i],
                ..call(sc, 0, 10, 100 + i as u64, 900)
            });
        }
        // Forwarded out of order, all on the one thread.
        for (k, i) in [2usize, 0, 1].into_iter().enumerate() {
            s.call(&Call {
                target: targets[i],
                ..call(&clients[i], 0, 10, 200 + k as u64, 300)
            });
        }
        for (i, sc) in servers.iter().enumerate() {
            s.end(&Call {
                target: targets[i],
                ..call(sc, 0, 10, 100 + i as u64, 900)
            });
        }
        let ids = s.finish();
        for i in 0..3u64 {
            assert_child(&ids, (10 + i, 0), (1 + i, 0));
            assert_eq!(ids[&(10 + i, 0)].link, LinkMethod::ForwardedTarget);
        }
    }

    #[test]
    fn equal_requests_in_flight_on_one_thread_are_not_guessed() {
        let p = process(1, &[]);
        let (s1, s2) = (
            conn(1, &p, Role::Server, 80, 5001),
            conn(2, &p, Role::Server, 80, 5002),
        );
        let c1 = conn(3, &p, Role::Client, 6001, 90);
        let mut s = Script::new();
        s.start(&call(&s1, 0, 10, 100, 900));
        s.start(&call(&s2, 0, 10, 110, 900));
        s.call(&call(&c1, 0, 10, 200, 300));
        s.end(&call(&s1, 0, 10, 100, 900));
        s.end(&call(&s2, 0, 10, 110, 900));
        assert_root(&s.finish(), (3, 0), LinkMethod::Ambiguous);
    }

    #[test]
    fn a_forwarded_traceparent_and_the_peer_connection_chain_three_processes() {
        let (proxy, backend) = (process(1, &[]), process(2, &[]));
        let inbound = conn(1, &proxy, Role::Server, 80, 5001);
        let outbound = conn(2, &proxy, Role::Client, 6001, 8080);
        let accepted = conn(3, &backend, Role::Server, 8080, 6001);
        let traceparent = format!("00-{TP_TRACE}-{TP_PARENT}-01");
        let headers = [("traceparent", traceparent.as_str())];
        let mut s = Script::new();
        s.start(&Call {
            headers: &headers,
            ..call(&inbound, 0, 10, 100, 900)
        });
        // The proxy forwards the header verbatim; the backend reads it.
        let forwarded = Call {
            headers: &headers,
            ..call(&outbound, 0, 10, 200, 700)
        };
        s.start(&forwarded);
        s.call(&Call {
            headers: &headers,
            ..call(&accepted, 0, 30, 250, 650)
        });
        s.end(&forwarded);
        s.end(&Call {
            headers: &headers,
            ..call(&inbound, 0, 10, 100, 900)
        });
        let ids = s.finish();
        let root = &ids[&(1, 0)];
        assert_eq!(root.trace_id.to_string(), TP_TRACE);
        assert_eq!(root.parent_span_id.to_string(), TP_PARENT);
        assert_eq!(root.link, LinkMethod::Traceparent);
        assert_child(&ids, (2, 0), (1, 0));
        assert_eq!(ids[&(2, 0)].link, LinkMethod::ForwardedContext);
        assert_child(&ids, (3, 0), (2, 0));
        assert_eq!(ids[&(3, 0)].link, LinkMethod::PeerConnection);
        assert!(ids[&(3, 0)].parent_is_remote);
    }

    #[test]
    fn keep_alive_and_pipelined_requests_pair_in_order_across_processes() {
        let (client, server) = (process(1, &[]), process(2, &[]));
        let c = conn(1, &client, Role::Client, 40000, 8080);
        let sv = conn(2, &server, Role::Server, 8080, 40000);
        let mut s = Script::new();
        // Two pipelined writes before the server reads either, then a keep-alive third.
        let cs = [
            call(&c, 0, 1, 100, 400),
            call(&c, 1, 1, 110, 500),
            call(&c, 2, 1, 600, 900),
        ];
        let ss = [
            call(&sv, 0, 2, 200, 350),
            call(&sv, 1, 2, 360, 450),
            call(&sv, 2, 2, 700, 850),
        ];
        for x in cs.iter().chain(&ss) {
            s.start(x);
        }
        for x in cs.iter().chain(&ss) {
            s.end(x);
        }
        let ids = s.finish();
        for k in 0..3 {
            assert_child(&ids, (2, k), (1, k));
        }
    }

    #[test]
    fn events_are_linked_in_timestamp_order_and_equal_ones_in_arrival_order() {
        let server = process(2, &[]);
        let sv = conn(2, &server, Role::Server, 8080, 40000);
        let mut s = Script::new();
        // Ends at 300, 300, then a late one at 100, then 300 again: linked as 100 first,
        // then the three at 300 in the order they came.
        for (seq, end) in [(0, 300), (1, 300), (2, 100), (3, 300)] {
            s.end(&call(&sv, seq, 2, end - 10, end));
        }
        s.linker.flush(&mut s.out);
        let order: Vec<u64> = s.out.iter().map(|l| l.end.finished.seq()).collect();
        assert_eq!(order, [2, 0, 1, 3]);
    }

    #[test]
    fn a_server_read_delivered_before_the_client_write_still_links() {
        let (client, server) = (process(1, &[]), process(2, &[]));
        let c = conn(1, &client, Role::Client, 40000, 8080);
        let sv = conn(2, &server, Role::Server, 8080, 40000);
        let mut s = Script::new();
        // Ring order: the server's read first, though the client's write began earlier.
        s.start(&call(&sv, 0, 2, 200, 300));
        s.start(&call(&c, 0, 1, 150, 400));
        s.end(&call(&sv, 0, 2, 200, 300));
        s.end(&call(&c, 0, 1, 150, 400));
        let ids = s.finish();
        assert_child(&ids, (2, 0), (1, 0));
    }

    #[test]
    fn a_client_request_the_agent_missed_does_not_shift_the_pairs() {
        let (client, server) = (process(1, &[]), process(2, &[]));
        let c = conn(1, &client, Role::Client, 40000, 8080);
        let sv = conn(2, &server, Role::Server, 8080, 40000);
        let mut s = Script::new();
        // The client's parser starts at the second request; the server's at the first.
        let client_2 = Call {
            target: "/2",
            ..call(&c, 0, 1, 300, 500)
        };
        let server_1 = Call {
            target: "/1",
            ..call(&sv, 0, 2, 100, 200)
        };
        let server_2 = Call {
            target: "/2",
            ..call(&sv, 1, 2, 350, 450)
        };
        for x in [&server_1, &client_2, &server_2] {
            s.start(x);
        }
        for x in [&server_1, &server_2, &client_2] {
            s.end(x);
        }
        let ids = s.finish();
        assert_root(&ids, (2, 0), LinkMethod::Root);
        assert_child(&ids, (2, 1), (1, 0));
    }

    #[test]
    fn http2_streams_pair_by_stream_id_not_by_order() {
        let (client, server) = (process(1, &[]), process(2, &[]));
        let c = conn(1, &client, Role::Client, 40000, 8080);
        let sv = conn(2, &server, Role::Server, 8080, 40000);
        let mut s = Script::new();
        let headers = |path: &str| -> Vec<crate::field::Field> {
            vec![
                (":method".into(), Bytes::from_static(b"POST")),
                (":path".into(), Bytes::from(path.to_owned())),
            ]
        };
        let h = headers("/demo.Echo/Say");
        let start = |conn: &Arc<Connection>, stream: u64, ts: u64| {
            let info = StartInfo {
                seq: stream,
                tid: 1,
                start_ns: ts,
                method: "POST".into(),
                target: "/demo.Echo/Say".into(),
                headers: &h,
                http2: true,
            };
            CallStart::new(conn.id, side(conn), &info, conn)
        };
        // Two concurrent calls with the same method; the server's view of stream 3 is
        // processed first.
        s.linker.start(start(&c, 1, 100), &mut s.out);
        s.linker.start(start(&c, 3, 110), &mut s.out);
        s.linker.start(start(&sv, 3, 200), &mut s.out);
        s.linker.start(start(&sv, 1, 210), &mut s.out);
        let pairs = [(1u64, 3u64), (2, 3), (2, 1), (1, 1)];
        let ids: HashMap<(u64, u64), CallIds> = {
            s.linker.flush(&mut s.out);
            let calls = &s.linker.calls;
            pairs
                .iter()
                .map(|&(conn, seq)| {
                    let key = CallKey { conn_id: conn, seq };
                    ((conn, seq), calls[&key].ids.clone())
                })
                .collect()
        };
        assert_child(&ids, (2, 1), (1, 1));
        assert_child(&ids, (2, 3), (1, 3));
    }

    #[test]
    fn a_reused_port_pairs_with_the_new_connection_only() {
        let (client, server) = (process(1, &[]), process(2, &[]));
        let old = conn(1, &client, Role::Client, 40000, 8080);
        let new = conn(2, &client, Role::Client, 40000, 8080);
        let accepted = conn(3, &server, Role::Server, 8080, 40000);
        let mut s = Script::new();
        // The old connection's request got no traced server end (e.g. before the server was
        // traced); the new one, on the same ports, does.
        s.call(&call(&old, 0, 1, 100, 200));
        s.start(&call(&new, 0, 1, 300, 600));
        s.call(&call(&accepted, 0, 2, 400, 500));
        s.end(&call(&new, 0, 1, 300, 600));
        let ids = s.finish();
        assert_child(&ids, (3, 0), (2, 0));
        assert_ne!(ids[&(3, 0)].trace_id, ids[&(1, 0)].trace_id);
    }

    #[test]
    fn an_instrumented_process_gets_no_spans_but_its_context_is_followed() {
        let sdk = process(1, &[("OTEL_TRACES_EXPORTER", "otlp")]);
        let plain = process(2, &[]);
        let out = conn(1, &sdk, Role::Client, 40000, 8080);
        let accepted = conn(2, &plain, Role::Server, 8080, 40000);
        let traceparent = format!("00-{TP_TRACE}-{TP_PARENT}-01");
        let headers = [("traceparent", traceparent.as_str())];
        let mut s = Script::new();
        s.call(&Call {
            headers: &headers,
            ..call(&out, 0, 1, 100, 400)
        });
        s.call(&Call {
            headers: &headers,
            ..call(&accepted, 0, 2, 200, 300)
        });
        let skipped = s.linker.stats.instrumented_skipped;
        let ids = s.finish();
        assert!(!ids.contains_key(&(1, 0)));
        assert_eq!(ids[&(2, 0)].parent_span_id.to_string(), TP_PARENT);
        assert_eq!(
            skipped, 0,
            "its start was seen, so nothing counted at the end yet"
        );
    }

    #[test]
    fn a_process_seen_exporting_otlp_gets_no_more_spans() {
        let p = process(1, &[]);
        let (c1, c2) = (
            conn(1, &p, Role::Client, 6001, 4318),
            conn(2, &p, Role::Client, 6002, 90),
        );
        let mut s = Script::new();
        s.call(&Call {
            method: "POST",
            target: "/v1/traces",
            ..call(&c1, 0, 1, 100, 200)
        });
        s.call(&call(&c2, 0, 1, 300, 400));
        let ids = s.finish();
        assert!(ids.is_empty(), "{ids:?}");
        assert!(is_otlp_trace_export("POST", "/v1/traces"));
        assert!(!is_otlp_trace_export("GET", "/v1/traces"));
    }

    #[test]
    fn link_counts_are_indexed_by_each_methods_position_in_all() {
        for (i, method) in LinkMethod::ALL.into_iter().enumerate() {
            assert_eq!(method as usize, i, "{method:?}");
        }
    }

    #[test]
    fn instrumentation_is_read_from_the_environment() {
        let info = |env: &[(&str, &str)], cmdline: &[&str]| ProcessInfo {
            otel_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cmdline: cmdline.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(self_instrumented(&info(&[], &["python3", "app.py"])).is_none());
        assert!(self_instrumented(&info(&[("OTEL_SERVICE_NAME", "x")], &[])).is_none());
        assert!(self_instrumented(&info(&[("OTEL_TRACES_EXPORTER", "none")], &[])).is_none());
        assert!(self_instrumented(&info(&[("OTEL_TRACES_EXPORTER", "otlp")], &[])).is_some());
        assert!(
            self_instrumented(&info(
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")],
                &[]
            ))
            .is_some()
        );
        assert!(
            self_instrumented(&info(
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_SDK_DISABLED", "true")
                ],
                &[]
            ))
            .is_none()
        );
        assert!(
            self_instrumented(&info(
                &[],
                &["/venv/bin/opentelemetry-instrument", "python3"]
            ))
            .is_some()
        );
    }
}
