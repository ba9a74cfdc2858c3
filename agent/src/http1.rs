//! HTTP/1.0 and HTTP/1.1 exchanges from the two reassembled byte streams of one TCP connection.
//!
//! [`Http1Connection`] takes the [`Segment`]s that [`crate::streams`] delivers for one
//! connection and frames messages per RFC 9112: the start line and header section are parsed
//! with `httparse` once the end of the header section has been seen; bodies are skipped by
//! Content-Length, chunked coding or connection close and never stored. Responses are paired
//! with requests first-in-first-out (pipelining), 1xx responses are kept as interim codes, and
//! one [`Exchange`] per request is emitted with the timing of both messages.
//!
//! Lost bytes (`gap_before`) inside a body of known length are skipped and parsing stays in
//! sync; anywhere else they lose sync: the message in progress is dropped (or, if its header
//! section was already parsed, reported as truncated), the loss is counted, and the direction
//! resynchronises by scanning line starts and segment starts for a plausible start line.
//! Every problem is reported as a named [`Http1Error`]; buffered bytes are bounded by
//! [`Http1Limits`]; no input makes it panic.
//!
//! It does not own protocol detection policy (beyond the cheap [`detect`]), connection
//! lifecycle (the caller calls [`Http1Connection::close`]) or export.

use std::{collections::VecDeque, mem::MaybeUninit};

use bytes::{Bytes, BytesMut};

use crate::field::{self, Arena, Field, Text};
use crate::streams::{Direction, Segment};

/// Request methods recognised as the start of a request line (case-sensitive, RFC 9110 §9.1).
///
/// Detection and resynchronisation anchor on these, so only methods seen on real servers are
/// listed: an unknown token is far likelier to be a binary protocol or body bytes.
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    // WebDAV, CalDAV and common extensions.
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"MKCALENDAR",
    b"REPORT",
    b"SEARCH",
    b"PURGE",
    b"QUERY",
];

/// How every HTTP/1 status line starts.
const RESPONSE_PREFIX: &[u8] = b"HTTP/1.";

/// Bytes [`classify`] needs to always decide: the longest pattern (method plus SP).
const CLASSIFY_LEN: usize = {
    let mut max = RESPONSE_PREFIX.len();
    let mut i = 0;
    while i < METHODS.len() {
        if METHODS[i].len() + 1 > max {
            max = METHODS[i].len() + 1;
        }
        i += 1;
    }
    max
};

/// A direction that has never produced a message is given up after scanning this much
/// without finding a start line: it is almost certainly not HTTP/1.
const NEVER_SYNCED_SCAN_LIMIT: u64 = 256 * 1024;

/// Header slots tried on the stack before counting lines for a heap-allocated array.
const STACK_HEADERS: usize = 64;

/// Which direction carries requests, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Requests are Ingress (the process reads requests and writes responses).
    Server,
    /// Requests are Egress.
    Client,
    /// Decided by the first start line seen in either direction.
    Unknown,
}

/// Cheap check on the first bytes of a direction.
///
/// `Some(true)`: starts like an HTTP/1 request (known method + SP) or response (`HTTP/1.`).
/// `Some(false)`: certainly not HTTP/1 (TLS, redis, postgres, binary, HTTP/2 preface...).
/// `None`: too few bytes to tell.
pub fn detect(first_bytes: &[u8]) -> Option<bool> {
    match classify(first_bytes, None) {
        Classified::Start(_) => Some(true),
        Classified::NotHttp => Some(false),
        Classified::NeedMore => None,
    }
}

/// One HTTP message as observed; the body itself is never kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// When the first byte moved: `exit_ns` of its segment if Ingress (the read returned it),
    /// `enter_ns` if Egress (the write began).
    pub start_ns: u64,
    /// `exit_ns` of the segment holding the last byte seen of the message.
    pub end_ns: u64,
    /// Thread of the segment holding the first byte.
    pub tid: u32,
    /// Header fields in order, names as sent, values raw (obs-fold replaced by one SP).
    pub headers: Vec<Field>,
    /// Trailer fields of a chunked body, kept apart from `headers` because they arrive after
    /// the body and may not be relied on for framing or routing.
    pub trailers: Vec<Field>,
    /// Body length: payload bytes seen or skipped (for chunked bodies, chunk data only).
    pub body_bytes: u64,
    /// Length of the start line and header section including the final empty line.
    pub header_bytes: usize,
    /// The body's end was not observed: the connection closed early, or chunk framing was
    /// lost to a gap or error. `body_bytes` and `end_ns` then cover what was seen.
    pub truncated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Text,
    pub target: Text,
    /// Minor version: 0 or 1.
    pub version: u8,
    pub msg: Message,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: Text,
    /// Minor version: 0 or 1.
    pub version: u8,
    pub msg: Message,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub conn_id: u64,
    /// Index of the request on its connection since the parser started (0, 1, ...).
    pub seq: u64,
    pub request: Request,
    /// None when the connection ended, or sync was lost, before the final response.
    pub response: Option<Response>,
    /// 1xx responses seen before the final one (100 Continue, 103 Early Hints...).
    pub interim: Vec<u16>,
}

/// Named reasons something could not be parsed; each is counted by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Http1Error {
    /// The stream does not start like HTTP/1 (or no start line was ever found); parsing stops.
    #[error("stream is not HTTP/1")]
    NotHttp,
    /// A request head was rejected by the parser (or arrived where responses were expected).
    #[error("malformed request head")]
    MalformedRequest,
    /// A response head was rejected by the parser (or arrived where requests were expected).
    #[error("malformed response head")]
    MalformedResponse,
    /// A header or trailer section exceeded `max_header_bytes`.
    #[error("header section larger than the limit")]
    HeadersTooLarge,
    /// Bytes were lost where a header section was, or may have started: one or more messages
    /// are lost and the direction resynchronises.
    #[error("bytes lost in or before a header section")]
    GapInHeaders,
    /// Bytes were lost in chunk framing: the message is reported truncated and the direction
    /// resynchronises.
    #[error("bytes lost in chunked framing")]
    GapInChunked,
    /// Content-Length invalid or conflicting (RFC 9112 §6.3 rule 5): the message is dropped.
    #[error("invalid or conflicting Content-Length")]
    BadContentLength,
    /// A request's Transfer-Encoding does not end in chunked (RFC 9112 §6.3 rule 4): its
    /// length cannot be known, so the message is dropped.
    #[error("request Transfer-Encoding without final chunked")]
    BadTransferEncoding,
    /// A chunk-size line, chunk terminator or trailer section is malformed.
    #[error("malformed chunked framing")]
    BadChunk,
    /// A final response with no request to pair it with (missed, or started after it).
    #[error("response without a request")]
    ResponseWithoutRequest,
    /// More than `max_pipelined` requests waited for responses: the oldest was emitted
    /// without one.
    #[error("too many requests waiting for responses")]
    PipelineOverflow,
    /// The connection closed in the middle of a header section or a body of known length.
    #[error("connection closed mid-message")]
    Truncated,
}

impl Http1Error {
    pub const ALL: [Http1Error; 12] = [
        Self::NotHttp,
        Self::MalformedRequest,
        Self::MalformedResponse,
        Self::HeadersTooLarge,
        Self::GapInHeaders,
        Self::GapInChunked,
        Self::BadContentLength,
        Self::BadTransferEncoding,
        Self::BadChunk,
        Self::ResponseWithoutRequest,
        Self::PipelineOverflow,
        Self::Truncated,
    ];

    /// Stable snake_case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotHttp => "not_http",
            Self::MalformedRequest => "malformed_request",
            Self::MalformedResponse => "malformed_response",
            Self::HeadersTooLarge => "headers_too_large",
            Self::GapInHeaders => "gap_in_headers",
            Self::GapInChunked => "gap_in_chunked",
            Self::BadContentLength => "bad_content_length",
            Self::BadTransferEncoding => "bad_transfer_encoding",
            Self::BadChunk => "bad_chunk",
            Self::ResponseWithoutRequest => "response_without_request",
            Self::PipelineOverflow => "pipeline_overflow",
            Self::Truncated => "truncated",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http1Limits {
    /// Largest header (or trailer, or chunk-size line) section buffered per direction; also
    /// the largest accepted. [`Http1Connection::buffered`] stays within twice this.
    pub max_header_bytes: usize,
    /// Requests waiting for responses before the oldest is emitted without one (min 1).
    pub max_pipelined: usize,
}

impl Default for Http1Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_pipelined: 64,
        }
    }
}

/// Why a connection stopped being parsed as HTTP/1 ([`Http1Connection::stop_reason`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The stream is not HTTP/1.
    NotHttp,
    /// 101 Switching Protocols; `protocol` is the response's Upgrade header (else the
    /// request's), e.g. `websocket` or `h2c`.
    Upgraded { protocol: Option<String> },
    /// A 2xx response to CONNECT turned the connection into a tunnel.
    Tunnel,
}

/// HTTP/1 parser for one TCP connection.
pub struct Http1Connection {
    shared: Shared,
    egress: DirParser,
    ingress: DirParser,
    closed: bool,
}

impl Http1Connection {
    pub fn new(conn_id: u64, side: Side, limits: Http1Limits) -> Self {
        Self {
            shared: Shared {
                conn_id,
                side,
                limits: Http1Limits {
                    max_pipelined: limits.max_pipelined.max(1),
                    ..limits
                },
                pending: VecDeque::new(),
                next_seq: 0,
                next_answer: 0,
                synced: false,
                stop: None,
                reported: 0,
            },
            egress: DirParser::new(Direction::Egress),
            ingress: DirParser::new(Direction::Ingress),
            closed: false,
        }
    }

    /// Feeds one segment; completed exchanges go to `out`, problems to `errors`.
    ///
    /// Segments of each direction must come in stream order; across directions, in the order
    /// the syscalls happened (a response pairs only with a request that started before it).
    /// A segment with empty `data` may carry just a gap. Ignored once done or closed.
    /// Header sections are copied into `arena` (one for all connections).
    pub fn push(
        &mut self,
        segment: &Segment,
        arena: &mut Arena,
        out: &mut Vec<Exchange>,
        errors: &mut Vec<Http1Error>,
    ) {
        if self.closed || self.shared.stop.is_some() {
            return;
        }
        let mut sink = Sink { out, errors, arena };
        let dir = match segment.direction {
            Direction::Egress => &mut self.egress,
            Direction::Ingress => &mut self.ingress,
        };
        dir.push(segment, &mut self.shared, &mut sink);
        if self.shared.stop.is_some() {
            self.egress.release();
            self.ingress.release();
        }
    }

    /// The connection closed: ends close-delimited bodies, reports messages cut short, and
    /// emits every request still waiting (response None if it never came).
    pub fn close(&mut self, out: &mut Vec<Exchange>, errors: &mut Vec<Http1Error>) {
        if self.closed {
            return;
        }
        self.closed = true;
        if self.shared.stop.is_none() {
            // Nothing is copied at close (a head completes only with its bytes).
            let mut arena = Arena::default();
            let mut sink = Sink {
                out,
                errors,
                arena: &mut arena,
            };
            self.egress.close(&mut self.shared, &mut sink);
            self.ingress.close(&mut self.shared, &mut sink);
            self.shared.flush_all(sink.out);
        }
        self.egress.release();
        self.ingress.release();
    }

    /// True once the stream is known not to be HTTP/1, or it switched protocols (101, or a
    /// CONNECT tunnel): stop feeding it. [`Self::stop_reason`] says which.
    pub fn is_done(&self) -> bool {
        self.shared.stop.is_some()
    }

    pub fn stop_reason(&self) -> Option<&Stop> {
        self.shared.stop.as_ref()
    }

    /// The protocol named by the Upgrade header after a 101 Switching Protocols.
    pub fn upgraded_protocol(&self) -> Option<&str> {
        match &self.shared.stop {
            Some(Stop::Upgraded { protocol }) => protocol.as_deref(),
            _ => None,
        }
    }

    /// Sequence numbers of the requests whose head parsed since the last call, oldest first:
    /// the linking stage learns of requests while they are in flight. Look each up with
    /// [`Self::request`] (or in the exchanges just emitted, if it already finished).
    pub fn take_started(&mut self) -> std::ops::Range<u64> {
        let from = std::mem::replace(&mut self.shared.reported, self.shared.next_seq);
        from..self.shared.next_seq
    }

    /// A request that has not been emitted yet.
    pub fn request(&self, seq: u64) -> Option<&Request> {
        let front = self.shared.pending.front()?.seq;
        let index = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.shared.pending.get(index).map(|p| &p.request)
    }

    /// The side given at creation, or the one learned from the first start line.
    pub fn side(&self) -> Side {
        self.shared.side
    }

    /// Bytes currently buffered (partial header sections, chunk lines, trailers); each
    /// direction holds at most `max_header_bytes`.
    pub fn buffered(&self) -> usize {
        self.egress.buf.len() + self.ingress.buf.len()
    }

    /// Requests parsed but not yet emitted (at most `max_pipelined`).
    pub fn pending_requests(&self) -> usize {
        self.shared.pending.len()
    }
}

/// What a direction's bytes start with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    Request,
    Response,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Classified {
    Start(Start),
    NeedMore,
    NotHttp,
}

/// Classifies the bytes at a possible message start; `role` restricts what is accepted.
fn classify(bytes: &[u8], role: Option<Start>) -> Classified {
    let mut undecided = false;
    if role != Some(Start::Request) {
        if bytes.starts_with(RESPONSE_PREFIX) {
            return Classified::Start(Start::Response);
        }
        undecided |= bytes.len() < RESPONSE_PREFIX.len() && RESPONSE_PREFIX.starts_with(bytes);
    }
    if role != Some(Start::Response) {
        for method in METHODS {
            if bytes.len() > method.len() {
                if bytes.starts_with(method) && bytes[method.len()] == b' ' {
                    return Classified::Start(Start::Request);
                }
            } else if method.starts_with(bytes) {
                undecided = true;
            }
        }
    }
    if undecided {
        Classified::NeedMore
    } else {
        Classified::NotHttp
    }
}

/// What a direction carries under `side`.
fn carries(side: Side, direction: Direction) -> Option<Start> {
    match (side, direction) {
        (Side::Server, Direction::Ingress) | (Side::Client, Direction::Egress) => {
            Some(Start::Request)
        }
        (Side::Server, Direction::Egress) | (Side::Client, Direction::Ingress) => {
            Some(Start::Response)
        }
        (Side::Unknown, _) => None,
    }
}

fn side_from(start: Start, direction: Direction) -> Side {
    match (start, direction) {
        (Start::Request, Direction::Egress) | (Start::Response, Direction::Ingress) => Side::Client,
        (Start::Request, Direction::Ingress) | (Start::Response, Direction::Egress) => Side::Server,
    }
}

/// Where and when a message's first byte was seen.
#[derive(Clone, Copy, Debug)]
struct Stamp {
    start_ns: u64,
    tid: u32,
}

fn stamp(seg: &Segment) -> Stamp {
    Stamp {
        start_ns: match seg.direction {
            Direction::Ingress => seg.exit_ns,
            Direction::Egress => seg.enter_ns,
        },
        tid: seg.tid,
    }
}

struct Sink<'a> {
    out: &'a mut Vec<Exchange>,
    errors: &'a mut Vec<Http1Error>,
    arena: &'a mut Arena,
}

/// A request waiting to be emitted.
struct Pending {
    seq: u64,
    request: Request,
    /// The request's body has ended.
    done: bool,
    /// Nothing more will be paired with it: its final response arrived, or sync was lost.
    settled: bool,
    response: Option<Response>,
    interim: Vec<u16>,
}

/// Connection state both directions need.
struct Shared {
    conn_id: u64,
    side: Side,
    limits: Http1Limits,
    /// Requests in order; sequence numbers are consecutive, so `seq - front.seq` indexes.
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// Sequence number of the request the next final response answers.
    next_answer: u64,
    /// Some message has parsed: from now on garbage is malformed rather than not-HTTP.
    synced: bool,
    stop: Option<Stop>,
    /// Requests from this sequence number on parsed since the last
    /// [`Http1Connection::take_started`] (numbers are given in order).
    reported: u64,
}

impl Shared {
    fn get_mut(&mut self, seq: u64) -> Option<&mut Pending> {
        let front = self.pending.front()?.seq;
        let index = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.pending.get_mut(index)
    }

    fn emit(&self, p: Pending, out: &mut Vec<Exchange>) {
        out.push(Exchange {
            conn_id: self.conn_id,
            seq: p.seq,
            request: p.request,
            response: p.response,
            interim: p.interim,
        });
    }

    /// Emits finished exchanges from the front, keeping request order.
    fn flush(&mut self, out: &mut Vec<Exchange>) {
        while self.pending.front().is_some_and(|p| p.done && p.settled) {
            if let Some(p) = self.pending.pop_front() {
                self.emit(p, out);
            }
        }
    }

    fn flush_all(&mut self, out: &mut Vec<Exchange>) {
        while let Some(p) = self.pending.pop_front() {
            self.emit(p, out);
        }
    }

    fn push_request(&mut self, request: Request, done: bool, sink: &mut Sink<'_>) -> u64 {
        if self.pending.len() >= self.limits.max_pipelined {
            // Usually the response direction is not being captured at all; emitting the oldest
            // bounds memory. Its response, if it ever comes, is consumed by its sequence number.
            if let Some(p) = self.pending.pop_front() {
                sink.errors.push(Http1Error::PipelineOverflow);
                self.emit(p, sink.out);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(Pending {
            seq,
            request,
            done,
            settled: false,
            response: None,
            interim: Vec::new(),
        });
        seq
    }

    /// The request a response that started at `start_ns` answers, if any; a final response
    /// moves the pairing on.
    fn answer_target(
        &mut self,
        start_ns: u64,
        is_final: bool,
        errors: &mut Vec<Http1Error>,
    ) -> Option<u64> {
        let seq = self.next_answer;
        if seq >= self.next_seq {
            if is_final {
                errors.push(Http1Error::ResponseWithoutRequest);
            }
            return None;
        }
        let Some(p) = self.get_mut(seq) else {
            // Emitted early by the pipeline bound: this response was its.
            if is_final {
                self.next_answer += 1;
            }
            return None;
        };
        // A response cannot start before its request: this one answers a request lost to a
        // gap, and pairing it would shift every later pair.
        if p.request.msg.start_ns > start_ns {
            if is_final {
                errors.push(Http1Error::ResponseWithoutRequest);
            }
            return None;
        }
        if is_final {
            self.next_answer += 1;
        }
        Some(seq)
    }

    fn deliver(&mut self, response: Response, target: Option<u64>, out: &mut Vec<Exchange>) {
        if let Some(p) = target.and_then(|seq| self.get_mut(seq)) {
            p.response = Some(response);
            p.settled = true;
        }
        self.flush(out);
    }

    fn settle(&mut self, target: Option<u64>) {
        if let Some(p) = target.and_then(|seq| self.get_mut(seq)) {
            p.settled = true;
        }
    }

    /// The response direction lost sync: the lost bytes may hold any number of responses, so
    /// no request waiting now can be paired safely.
    fn abandon(&mut self, out: &mut Vec<Exchange>) {
        let from = self.next_answer;
        for p in self.pending.iter_mut().filter(|p| p.seq >= from) {
            p.settled = true;
        }
        self.next_answer = self.next_seq;
        self.flush(out);
    }

    fn stop(&mut self, why: Stop, out: &mut Vec<Exchange>) {
        if self.stop.is_none() {
            self.stop = Some(why);
            self.flush_all(out);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeadMode {
    /// The direction's first message: garbage means the stream is not HTTP/1.
    First,
    /// Right after a message: garbage means the framing is broken.
    Normal,
    /// A candidate found while resynchronising: garbage is silently skipped.
    Tentative,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (with extensions) into the buffer.
    Size,
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd {
        saw_cr: bool,
    },
    /// Reading the trailer section into the buffer.
    Trailers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    /// Ends when the connection closes.
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head(HeadMode),
    Body(Body),
    /// Sync lost: scanning for a start line; `line_start` says the next byte begins a line.
    Resync {
        line_start: bool,
    },
}

/// The message whose body is being skipped.
struct Cur {
    kind: CurKind,
    body_bytes: u64,
    end_ns: u64,
    trailers: Vec<Field>,
}

enum CurKind {
    /// The request lives in the pending queue, so an early response can pair with it.
    Request(u64),
    Response {
        response: Response,
        target: Option<u64>,
    },
}

/// Incremental search for the empty line ending a header or trailer section (`\n\r\n` or
/// `\n\n`), carried across segments so no byte is examined twice.
#[derive(Clone, Copy, Debug, Default)]
struct EndScan {
    /// 0: inside a line; 1: just after `\n`; 2: just after `\n\r`.
    state: u8,
}

impl EndScan {
    /// Scanner positioned right after a line end (a trailer section may be empty).
    fn after_line() -> Self {
        Self { state: 1 }
    }

    /// Returns the offset just past the end of the section if it is in `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                0 => match memchr::memchr(b'\n', &bytes[i..]) {
                    Some(p) => {
                        i += p + 1;
                        self.state = 1;
                    }
                    None => return None,
                },
                state => {
                    match bytes[i] {
                        b'\n' => {
                            self.state = 0;
                            return Some(i + 1);
                        }
                        b'\r' if state == 1 => self.state = 2,
                        _ => self.state = 0,
                    }
                    i += 1;
                }
            }
        }
        None
    }
}

/// Parser state of one direction.
struct DirParser {
    direction: Direction,
    state: State,
    /// Partial header section, chunk-size line or trailer section; never above the limit.
    buf: BytesMut,
    scan: EndScan,
    /// What the head being read is, once its first bytes were classified.
    kind: Option<Start>,
    /// A tentative head's start line was checked with httparse.
    line_checked: bool,
    msg_start: Option<Stamp>,
    cur: Option<Cur>,
    never_synced_scan: u64,
}

impl DirParser {
    fn new(direction: Direction) -> Self {
        Self {
            direction,
            state: State::Head(HeadMode::First),
            buf: BytesMut::new(),
            scan: EndScan::default(),
            kind: None,
            line_checked: false,
            msg_start: None,
            cur: None,
            never_synced_scan: 0,
        }
    }

    fn release(&mut self) {
        self.buf = BytesMut::new();
        self.cur = None;
    }

    fn fits(&self, extra: usize, max: usize) -> bool {
        self.buf.len().saturating_add(extra) <= max
    }

    fn reset_head(&mut self) {
        // A fresh buffer rather than `clear` so a large head's capacity is not kept.
        self.buf = BytesMut::new();
        self.scan = EndScan::default();
        self.kind = None;
        self.line_checked = false;
        self.msg_start = None;
    }

    fn push(&mut self, seg: &Segment, sh: &mut Shared, sink: &mut Sink<'_>) {
        if seg.gap_before > 0 {
            self.on_gap(seg.gap_before, sh, sink);
        }
        let len = seg.data.len();
        let mut i = 0;
        let mut stalls = 0u32;
        while i < len && sh.stop.is_none() {
            let resyncing = matches!(
                self.state,
                State::Resync { .. } | State::Head(HeadMode::Tentative)
            );
            let before = self.state;
            let n = self.step(seg, i, sh, sink).min(len - i);
            if resyncing && !sh.synced {
                self.never_synced_scan = self.never_synced_scan.saturating_add(n as u64);
                if self.never_synced_scan > NEVER_SYNCED_SCAN_LIMIT {
                    sink.errors.push(Http1Error::NotHttp);
                    sh.stop(Stop::NotHttp, sink.out);
                }
            }
            // Steps that consume nothing change state; a long run of them would be a bug.
            if n == 0 && self.state == before {
                stalls += 1;
            } else {
                stalls = 0;
            }
            if stalls > 8 {
                debug_assert!(false, "http1 parser made no progress in {:?}", self.state);
                log::debug!("http1 parser stalled in {:?}; skipping a byte", self.state);
                self.reset_head();
                self.cur = None;
                self.state = State::Resync { line_start: false };
                i += 1;
                stalls = 0;
            }
            i += n;
        }
    }

    fn step(&mut self, seg: &Segment, i: usize, sh: &mut Shared, sink: &mut Sink<'_>) -> usize {
        let rest_len = seg.data.len() - i;
        match self.state {
            State::Head(mode) => self.step_head(seg, i, mode, sh, sink),
            State::Resync { line_start } => self.step_resync(seg, i, line_start, sh),
            State::Body(Body::Close) => {
                self.note_body(rest_len as u64, seg.exit_ns);
                rest_len
            }
            State::Body(Body::Length(remaining)) => {
                let take = remaining.min(rest_len as u64);
                self.note_body(take, seg.exit_ns);
                if take == remaining {
                    self.end_message(false, sh, sink.out);
                } else {
                    self.state = State::Body(Body::Length(remaining - take));
                }
                // `take <= rest_len`.
                take as usize
            }
            State::Body(Body::Chunked(chunk)) => {
                if let Some(cur) = self.cur.as_mut() {
                    cur.end_ns = seg.exit_ns;
                }
                self.step_chunk(seg, i, chunk, sh, sink)
            }
        }
    }

    fn note_body(&mut self, bytes: u64, exit_ns: u64) {
        if let Some(cur) = self.cur.as_mut() {
            cur.body_bytes = cur.body_bytes.saturating_add(bytes);
            cur.end_ns = exit_ns;
        }
    }

    fn step_head(
        &mut self,
        seg: &Segment,
        i: usize,
        mode: HeadMode,
        sh: &mut Shared,
        sink: &mut Sink<'_>,
    ) -> usize {
        let rest = &seg.data[i..];
        let max = sh.limits.max_header_bytes;
        let Some(kind) = self.kind else {
            return self.classify_head(seg, i, mode, sh, sink);
        };
        if mode == HeadMode::Tentative && !self.line_checked {
            // Check the candidate's start line before buffering a whole header section
            // behind it: body bytes often contain lines that begin like a request.
            let Some(q) = rest.iter().position(|&b| b == b'\n') else {
                if !self.fits(rest.len(), max) {
                    return self.too_large(rest, rest.len(), false, sh, sink);
                }
                // No line end, so the end scanner has nothing to see yet.
                self.buf.extend_from_slice(rest);
                return rest.len();
            };
            let line_len = q + 1;
            if !self.fits(line_len, max) {
                return self.too_large(rest, line_len, false, sh, sink);
            }
            let buffered = !self.buf.is_empty();
            let plausible = if buffered {
                self.buf.extend_from_slice(&rest[..line_len]);
                self.scan.feed(&rest[..line_len]);
                plausible_start_line(kind, &self.buf)
            } else {
                plausible_start_line(kind, &rest[..line_len])
            };
            if !plausible {
                self.reset_head();
                self.state = State::Resync { line_start: true };
                return line_len;
            }
            self.line_checked = true;
            return if buffered { line_len } else { 0 };
        }
        let role = carries(sh.side, self.direction);
        let role_fits = role.is_none_or(|role| role == kind);
        if self.buf.is_empty() && mode != HeadMode::Tentative && role_fits {
            // Nearly always the whole head is at the start of one segment: parsing it there
            // finds its end too (where httparse accepts a head, it ends at the first empty
            // line, as the scanner would find), which spares the scan over every line.
            if let Some((n, head)) = parse_at_start(rest, kind, max, sink.arena) {
                self.complete_head(Ok(head), n, seg, sh, sink);
                return n;
            }
        }
        let found = self.scan.feed(rest);
        let n = found.unwrap_or(rest.len());
        if !self.fits(n, max) {
            return self.too_large(rest, n, true, sh, sink);
        }
        if found.is_none() {
            self.buf.extend_from_slice(rest);
            return n;
        }
        let block = if self.buf.is_empty() {
            // The whole head is in this segment. Copied (once per message), because header
            // values outlive the segment and a slice would pin its whole, possibly large,
            // buffer.
            sink.arena.copy(&rest[..n])
        } else {
            self.buf.extend_from_slice(&rest[..n]);
            std::mem::take(&mut self.buf).freeze()
        };
        let parsed = match role {
            Some(role) if !role_fits => Err(match role {
                Start::Request => Http1Error::MalformedRequest,
                Start::Response => Http1Error::MalformedResponse,
            }),
            _ => parse_head(&block, kind),
        };
        self.complete_head(parsed, block.len(), seg, sh, sink);
        n
    }

    /// Decides from the first bytes of a head whether it can be a start line at all.
    fn classify_head(
        &mut self,
        seg: &Segment,
        i: usize,
        mode: HeadMode,
        sh: &mut Shared,
        sink: &mut Sink<'_>,
    ) -> usize {
        let rest = &seg.data[i..];
        if self.buf.is_empty() {
            if mode != HeadMode::Tentative {
                // RFC 9112 §2.2: ignore empty lines before a start line (some clients send
                // CRLF after a body).
                let blank = rest
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if blank > 0 {
                    return blank;
                }
            }
            if self.msg_start.is_none() {
                self.msg_start = Some(stamp(seg));
            }
        }
        // Undecided heads are strict prefixes of a pattern, so `buf` is short here.
        let mut probe = [0u8; CLASSIFY_LEN];
        let have = self.buf.len().min(CLASSIFY_LEN);
        probe[..have].copy_from_slice(&self.buf[..have]);
        let extra = rest.len().min(CLASSIFY_LEN - have);
        probe[have..have + extra].copy_from_slice(&rest[..extra]);
        match classify(&probe[..have + extra], carries(sh.side, self.direction)) {
            Classified::Start(kind) => {
                self.kind = Some(kind);
                0
            }
            Classified::NeedMore => {
                // All of `rest` went into the probe (else it would have decided), and a
                // pattern prefix holds no line end, so the end scanner can skip it.
                if !self.fits(rest.len(), sh.limits.max_header_bytes) {
                    return self.too_large(rest, rest.len(), mode != HeadMode::Tentative, sh, sink);
                }
                self.buf.extend_from_slice(rest);
                rest.len()
            }
            Classified::NotHttp => self.reject(mode, sh, sink),
        }
    }

    /// The bytes at a message start cannot begin a start line.
    fn reject(&mut self, mode: HeadMode, sh: &mut Shared, sink: &mut Sink<'_>) -> usize {
        match mode {
            HeadMode::Tentative => {}
            HeadMode::First if !sh.synced => {
                sink.errors.push(Http1Error::NotHttp);
                sh.stop(Stop::NotHttp, sink.out);
                return 1;
            }
            HeadMode::First | HeadMode::Normal => {
                sink.errors.push(match carries(sh.side, self.direction) {
                    Some(Start::Response) => Http1Error::MalformedResponse,
                    _ => Http1Error::MalformedRequest,
                });
                self.lose_sync(sh, sink.out);
            }
        }
        // Resume scanning right after the rejected first byte. A buffered candidate is a
        // pattern prefix without line ends, so nothing in it can start another candidate.
        let consumed = usize::from(self.buf.is_empty());
        self.reset_head();
        self.state = State::Resync { line_start: false };
        consumed
    }

    fn too_large(
        &mut self,
        rest: &[u8],
        n: usize,
        count: bool,
        sh: &mut Shared,
        sink: &mut Sink<'_>,
    ) -> usize {
        if count {
            sink.errors.push(Http1Error::HeadersTooLarge);
            self.lose_sync(sh, sink.out);
        }
        self.reset_head();
        // `n >= 1`: callers pass a non-empty prefix of a non-empty rest.
        let line_start = n > 0 && rest.get(n - 1) == Some(&b'\n');
        self.state = State::Resync { line_start };
        n
    }

    /// Drops whatever head was in progress; if this direction carries responses, the requests
    /// waiting can no longer be paired.
    fn lose_sync(&mut self, sh: &mut Shared, out: &mut Vec<Exchange>) {
        self.reset_head();
        if carries(sh.side, self.direction) == Some(Start::Response) {
            sh.abandon(out);
        }
    }

    /// Sync lost at a known point: report, end the current message truncated, scan on.
    fn break_sync(
        &mut self,
        error: Http1Error,
        line_start: bool,
        sh: &mut Shared,
        sink: &mut Sink<'_>,
    ) {
        sink.errors.push(error);
        self.finish(true, sh, sink.out);
        self.lose_sync(sh, sink.out);
        self.state = State::Resync { line_start };
    }

    fn step_resync(&mut self, seg: &Segment, i: usize, line_start: bool, sh: &Shared) -> usize {
        let rest = &seg.data[i..];
        let role = carries(sh.side, self.direction);
        let next_line = |from: usize| {
            rest[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|p| from + p + 1)
        };
        // Messages start at line starts or, far more often after a loss, at a syscall start.
        let mut cand = if line_start || i == 0 {
            0
        } else {
            match next_line(0) {
                Some(c) => c,
                None => {
                    self.state = State::Resync { line_start: false };
                    return rest.len();
                }
            }
        };
        loop {
            if cand >= rest.len() {
                self.state = State::Resync { line_start: true };
                return rest.len();
            }
            match classify(&rest[cand..], role) {
                Classified::NotHttp => match next_line(cand) {
                    Some(c) => cand = c,
                    None => {
                        self.state = State::Resync { line_start: false };
                        return rest.len();
                    }
                },
                Classified::Start(_) | Classified::NeedMore => {
                    self.reset_head();
                    self.state = State::Head(HeadMode::Tentative);
                    return cand;
                }
            }
        }
    }

    /// A head of `header_bytes` ended in `seg`; `parsed` is what it parsed to.
    fn complete_head(
        &mut self,
        parsed: Result<Head, Http1Error>,
        header_bytes: usize,
        seg: &Segment,
        sh: &mut Shared,
        sink: &mut Sink<'_>,
    ) {
        let stamp = self.msg_start.unwrap_or_else(|| stamp(seg));
        let end_ns = seg.exit_ns;
        self.reset_head();
        self.state = State::Head(HeadMode::Normal);
        let head = match parsed {
            Ok(head) => head,
            Err(e) => {
                sink.errors.push(e);
                self.lose_sync(sh, sink.out);
                self.state = State::Resync { line_start: true };
                return;
            }
        };
        if sh.side == Side::Unknown {
            let kind = match head {
                Head::Request { .. } => Start::Request,
                Head::Response { .. } => Start::Response,
            };
            sh.side = side_from(kind, self.direction);
        }
        sh.synced = true;
        let msg = Message {
            start_ns: stamp.start_ns,
            end_ns,
            tid: stamp.tid,
            headers: Vec::new(),
            trailers: Vec::new(),
            body_bytes: 0,
            header_bytes,
            truncated: false,
        };
        match head {
            Head::Request {
                method,
                target,
                version,
                headers,
            } => {
                let request = Request {
                    method,
                    target,
                    version,
                    msg: Message { headers, ..msg },
                };
                self.on_request(request, sh, sink);
            }
            Head::Response {
                status,
                reason,
                version,
                headers,
            } => {
                let response = Response {
                    status,
                    reason,
                    version,
                    msg: Message { headers, ..msg },
                };
                self.on_response(response, sh, sink);
            }
        }
    }

    fn on_request(&mut self, request: Request, sh: &mut Shared, sink: &mut Sink<'_>) {
        let body = match request_body(&request.msg.headers) {
            Ok(body) => body,
            Err(e) => {
                sink.errors.push(e);
                self.lose_sync(sh, sink.out);
                self.state = State::Resync { line_start: true };
                return;
            }
        };
        let end_ns = request.msg.end_ns;
        let seq = sh.push_request(request, body.is_none(), sink);
        match body {
            Some(body) => {
                self.cur = Some(Cur {
                    kind: CurKind::Request(seq),
                    body_bytes: 0,
                    end_ns,
                    trailers: Vec::new(),
                });
                self.state = State::Body(body);
            }
            None => sh.flush(sink.out),
        }
    }

    fn on_response(&mut self, response: Response, sh: &mut Shared, sink: &mut Sink<'_>) {
        let status = response.status;
        if (100..200).contains(&status) && status != 101 {
            // Interim: the final response is still to come for the same request.
            if let Some(p) = sh
                .answer_target(response.msg.start_ns, false, sink.errors)
                .and_then(|seq| sh.get_mut(seq))
            {
                p.interim.push(status);
            }
            return;
        }
        let target = sh.answer_target(response.msg.start_ns, true, sink.errors);
        let request = target.and_then(|seq| sh.get_mut(seq)).map(|p| &p.request);
        let method = request.map(|r| r.method.as_str());
        let (is_head, is_connect) = (method == Some("HEAD"), method == Some("CONNECT"));
        if status == 101 {
            let protocol = first_value(&response.msg.headers, "upgrade")
                .or_else(|| request.and_then(|r| first_value(&r.msg.headers, "upgrade")))
                .map(|v| String::from_utf8_lossy(v).into_owned());
            sh.deliver(response, target, sink.out);
            sh.stop(Stop::Upgraded { protocol }, sink.out);
            return;
        }
        if is_connect && (200..300).contains(&status) {
            sh.deliver(response, target, sink.out);
            sh.stop(Stop::Tunnel, sink.out);
            return;
        }
        match response_body(is_head, status, &response.msg.headers) {
            Err(e) => {
                // RFC 9112 §6.3: the response is discarded; its request stays unanswered.
                sink.errors.push(e);
                sh.settle(target);
                self.lose_sync(sh, sink.out);
                self.state = State::Resync { line_start: true };
            }
            Ok(None) => sh.deliver(response, target, sink.out),
            Ok(Some(body)) => {
                self.cur = Some(Cur {
                    body_bytes: 0,
                    end_ns: response.msg.end_ns,
                    trailers: Vec::new(),
                    kind: CurKind::Response { response, target },
                });
                self.state = State::Body(body);
            }
        }
    }

    fn step_chunk(
        &mut self,
        seg: &Segment,
        i: usize,
        chunk: Chunk,
        sh: &mut Shared,
        sink: &mut Sink<'_>,
    ) -> usize {
        let rest = &seg.data[i..];
        let max = sh.limits.max_header_bytes;
        match chunk {
            Chunk::Size => {
                let Some(q) = rest.iter().position(|&b| b == b'\n') else {
                    if !self.fits(rest.len(), max) {
                        self.break_sync(Http1Error::BadChunk, false, sh, sink);
                    } else {
                        self.buf.extend_from_slice(rest);
                    }
                    return rest.len();
                };
                let n = q + 1;
                if !self.fits(n, max) {
                    self.break_sync(Http1Error::BadChunk, true, sh, sink);
                    return n;
                }
                let parsed = if self.buf.is_empty() {
                    httparse::parse_chunk_size(&rest[..n])
                } else {
                    self.buf.extend_from_slice(&rest[..n]);
                    let parsed = httparse::parse_chunk_size(&self.buf);
                    self.buf.clear();
                    parsed
                };
                match parsed {
                    Ok(httparse::Status::Complete((_, 0))) => {
                        // The last-chunk line just ended, so an immediate empty line ends
                        // the (empty) trailer section.
                        self.scan = EndScan::after_line();
                        self.state = State::Body(Body::Chunked(Chunk::Trailers));
                    }
                    Ok(httparse::Status::Complete((_, size))) => {
                        self.state = State::Body(Body::Chunked(Chunk::Data(size)));
                    }
                    _ => self.break_sync(Http1Error::BadChunk, true, sh, sink),
                }
                n
            }
            Chunk::Data(remaining) => {
                let take = remaining.min(rest.len() as u64);
                self.note_body(take, seg.exit_ns);
                self.state = State::Body(Body::Chunked(if take == remaining {
                    Chunk::DataEnd { saw_cr: false }
                } else {
                    Chunk::Data(remaining - take)
                }));
                // `take <= rest.len()`.
                take as usize
            }
            Chunk::DataEnd { saw_cr } => match rest[0] {
                b'\n' => {
                    self.state = State::Body(Body::Chunked(Chunk::Size));
                    1
                }
                b'\r' if !saw_cr => {
                    self.state = State::Body(Body::Chunked(Chunk::DataEnd { saw_cr: true }));
                    1
                }
                _ => {
                    // This byte may be the next message if the length was wrong: rescan it.
                    self.break_sync(Http1Error::BadChunk, false, sh, sink);
                    0
                }
            },
            Chunk::Trailers => {
                let found = self.scan.feed(rest);
                let n = found.unwrap_or(rest.len());
                if !self.fits(n, max) {
                    let line_start = rest.get(n.wrapping_sub(1)) == Some(&b'\n');
                    self.break_sync(Http1Error::HeadersTooLarge, line_start, sh, sink);
                    return n;
                }
                if found.is_none() {
                    self.buf.extend_from_slice(rest);
                    return n;
                }
                let block = if self.buf.is_empty() {
                    Bytes::copy_from_slice(&rest[..n])
                } else {
                    self.buf.extend_from_slice(&rest[..n]);
                    std::mem::take(&mut self.buf).freeze()
                };
                self.scan = EndScan::default();
                match parse_fields(&block) {
                    Some(trailers) => {
                        if let Some(cur) = self.cur.as_mut() {
                            cur.trailers = trailers;
                        }
                        self.end_message(false, sh, sink.out);
                    }
                    None => self.break_sync(Http1Error::BadChunk, true, sh, sink),
                }
                n
            }
        }
    }

    /// Bytes were lost just before the next segment.
    fn on_gap(&mut self, gap: u64, sh: &mut Shared, sink: &mut Sink<'_>) {
        match self.state {
            State::Resync { .. } => {}
            State::Head(HeadMode::Tentative) if !self.line_checked => {
                // Only an unconfirmed candidate was lost; scanning goes on.
                self.reset_head();
                self.state = State::Resync { line_start: true };
            }
            State::Head(_) => {
                sink.errors.push(Http1Error::GapInHeaders);
                self.lose_sync(sh, sink.out);
                self.state = State::Resync { line_start: true };
            }
            State::Body(Body::Close) => self.skip_lost(gap),
            State::Body(Body::Length(remaining)) => {
                if gap < remaining {
                    self.skip_lost(gap);
                    self.state = State::Body(Body::Length(remaining - gap));
                } else {
                    // The body ended inside the gap; only what followed it is unknown.
                    self.skip_lost(remaining);
                    self.end_message(false, sh, sink.out);
                    if gap > remaining {
                        sink.errors.push(Http1Error::GapInHeaders);
                        self.lose_sync(sh, sink.out);
                        self.state = State::Resync { line_start: true };
                    }
                }
            }
            State::Body(Body::Chunked(Chunk::Data(remaining))) if gap <= remaining => {
                self.skip_lost(gap);
                self.state = State::Body(Body::Chunked(if gap == remaining {
                    Chunk::DataEnd { saw_cr: false }
                } else {
                    Chunk::Data(remaining - gap)
                }));
            }
            State::Body(Body::Chunked(chunk)) => {
                if let Chunk::Data(remaining) = chunk {
                    self.skip_lost(remaining);
                }
                self.break_sync(Http1Error::GapInChunked, true, sh, sink);
            }
        }
    }

    /// Lost body bytes still count as body; the end time stays that of the last byte seen,
    /// since a gap is normally the uncaptured tail of that same syscall.
    fn skip_lost(&mut self, bytes: u64) {
        if let Some(cur) = self.cur.as_mut() {
            cur.body_bytes = cur.body_bytes.saturating_add(bytes);
        }
    }

    /// Finishes the current message and expects the next head.
    fn end_message(&mut self, truncated: bool, sh: &mut Shared, out: &mut Vec<Exchange>) {
        self.finish(truncated, sh, out);
        self.buf = BytesMut::new();
        self.scan = EndScan::default();
        self.state = State::Head(HeadMode::Normal);
    }

    fn finish(&mut self, truncated: bool, sh: &mut Shared, out: &mut Vec<Exchange>) {
        let Some(cur) = self.cur.take() else {
            return;
        };
        let fill = |msg: &mut Message, trailers| {
            msg.body_bytes = cur.body_bytes;
            msg.end_ns = cur.end_ns;
            msg.trailers = trailers;
            msg.truncated = truncated;
        };
        match cur.kind {
            CurKind::Request(seq) => {
                if let Some(p) = sh.get_mut(seq) {
                    fill(&mut p.request.msg, cur.trailers);
                    p.done = true;
                }
                sh.flush(out);
            }
            CurKind::Response {
                mut response,
                target,
            } => {
                fill(&mut response.msg, cur.trailers);
                sh.deliver(response, target, out);
            }
        }
    }

    fn close(&mut self, sh: &mut Shared, sink: &mut Sink<'_>) {
        match self.state {
            State::Body(Body::Close) => self.finish(false, sh, sink.out),
            State::Body(_) => {
                sink.errors.push(Http1Error::Truncated);
                self.finish(true, sh, sink.out);
            }
            State::Head(mode) => {
                let started = !self.buf.is_empty() || self.kind.is_some();
                if started && (mode != HeadMode::Tentative || self.line_checked) {
                    sink.errors.push(Http1Error::Truncated);
                }
            }
            State::Resync { .. } => {}
        }
        self.reset_head();
        self.state = State::Resync { line_start: false };
    }
}

/// A parsed start line and header section.
enum Head {
    Request {
        method: Text,
        target: Text,
        version: u8,
        headers: Vec<Field>,
    },
    Response {
        status: u16,
        reason: Text,
        version: u8,
        headers: Vec<Field>,
    },
}

enum ParseFail {
    TooManyHeaders,
    Malformed,
}

fn parse_head(block: &Bytes, kind: Start) -> Result<Head, Http1Error> {
    let malformed = match kind {
        Start::Request => Http1Error::MalformedRequest,
        Start::Response => Http1Error::MalformedResponse,
    };
    parse_unfolded(block, true, |block| {
        // Uninitialised: filling 64 slots cost more than parsing a typical head.
        let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        match parse_head_with(block, kind, &mut slots) {
            Err(ParseFail::TooManyHeaders) => {
                // Rare: size the array by the line count, which bounds the header count.
                let lines = block.iter().filter(|&&b| b == b'\n').count();
                let mut slots = Vec::with_capacity(lines);
                let (_, raw) = parse_head_with(block, kind, slots.spare_capacity_mut()).ok()?;
                raw.own(block, block)
            }
            Ok((_, raw)) => raw.own(block, block),
            Err(ParseFail::Malformed) => None,
        }
    })
    .ok_or(malformed)
}

/// The head at the start of `bytes`, and its length, if it ends there, is at most `max` bytes
/// long and parses as it is (no obs-fold, at most [`STACK_HEADERS`] fields); only the head is
/// copied into `arena`. Otherwise None, and the head is left to the scanner.
fn parse_at_start(
    bytes: &[u8],
    kind: Start,
    max: usize,
    arena: &mut Arena,
) -> Option<(usize, Head)> {
    let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let (n, raw) = parse_head_with(bytes, kind, &mut slots).ok()?;
    if n > max {
        return None;
    }
    let block = arena.copy(bytes.get(..n)?);
    raw.own(bytes, &block).map(|head| (n, head))
}

/// A start line and header section as httparse left them: slices of the parsed bytes.
enum RawHead<'h, 'b> {
    Request {
        method: &'b str,
        target: &'b str,
        version: u8,
        fields: &'h [httparse::Header<'b>],
    },
    Response {
        status: u16,
        reason: &'b str,
        version: u8,
        fields: &'h [httparse::Header<'b>],
    },
}

impl RawHead<'_, '_> {
    /// The head with its text and values in `block`, which holds the same bytes as `src`
    /// (the bytes parsed) from its start.
    fn own(&self, src: &[u8], block: &Bytes) -> Option<Head> {
        // UTF-8 is checked again (a few bytes) rather than assumed of `block`.
        let text = |sub: &str| Text::from_utf8(rebase(src, block, sub.as_bytes()));
        Some(match *self {
            RawHead::Request {
                method,
                target,
                version,
                fields,
            } => Head::Request {
                method: text(method)?,
                target: text(target)?,
                version,
                headers: own_fields(src, block, fields),
            },
            RawHead::Response {
                status,
                reason,
                version,
                fields,
            } => Head::Response {
                status,
                reason: text(reason)?,
                version,
                headers: own_fields(src, block, fields),
            },
        })
    }
}

/// Parses the head at the start of `src`: its length and its parts.
fn parse_head_with<'h, 'b>(
    src: &'b [u8],
    kind: Start,
    slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<(usize, RawHead<'h, 'b>), ParseFail> {
    let classify_err = |e| match e {
        httparse::Error::TooManyHeaders => ParseFail::TooManyHeaders,
        _ => ParseFail::Malformed,
    };
    match kind {
        Start::Request => {
            let mut req = httparse::Request::new(&mut []);
            let n = match req.parse_with_uninit_headers(src, slots) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Err(ParseFail::Malformed),
                Err(e) => return Err(classify_err(e)),
            };
            Ok((
                n,
                RawHead::Request {
                    method: req.method.unwrap_or_default(),
                    target: req.path.unwrap_or_default(),
                    version: req.version.unwrap_or_default(),
                    fields: req.headers,
                },
            ))
        }
        Start::Response => {
            let mut resp = httparse::Response::new(&mut []);
            // The default configuration, as `Response::parse` uses.
            let config = httparse::ParserConfig::default();
            let n = match config.parse_response_with_uninit_headers(&mut resp, src, slots) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Err(ParseFail::Malformed),
                Err(e) => return Err(classify_err(e)),
            };
            Ok((
                n,
                RawHead::Response {
                    status: resp.code.unwrap_or_default(),
                    reason: resp.reason.unwrap_or_default(),
                    version: resp.version.unwrap_or_default(),
                    fields: resp.headers,
                },
            ))
        }
    }
}

/// The part of `block` at the place of `sub` in `src`, where `block` holds the same bytes as
/// `src` from its start; a copy of `sub` if it is not inside both (httparse gives a static ""
/// for a missing reason phrase).
fn rebase(src: &[u8], block: &Bytes, sub: &[u8]) -> Bytes {
    let start = (sub.as_ptr() as usize).checked_sub(src.as_ptr() as usize);
    match start.and_then(|start| Some((start, start.checked_add(sub.len())?))) {
        Some((start, end)) if end <= src.len() && end <= block.len() => block.slice(start..end),
        _ => Bytes::copy_from_slice(sub),
    }
}

/// Parses a trailer section (field lines and the final empty line).
fn parse_fields(block: &Bytes) -> Option<Vec<Field>> {
    parse_unfolded(block, false, |block| {
        let mut slots = [httparse::EMPTY_HEADER; STACK_HEADERS];
        match httparse::parse_headers(block, &mut slots) {
            Ok(httparse::Status::Complete((_, fields))) => Some(own_fields(block, block, fields)),
            Err(httparse::Error::TooManyHeaders) => {
                let lines = block.iter().filter(|&&b| b == b'\n').count();
                let mut slots = vec![httparse::EMPTY_HEADER; lines];
                match httparse::parse_headers(block, &mut slots) {
                    Ok(httparse::Status::Complete((_, fields))) => {
                        Some(own_fields(block, block, fields))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    })
}

/// `parse(block)`, or if that fails and the block has obs-folds, `parse` of it unfolded.
///
/// httparse rejects a field line that starts with SP or HT, so a block it accepts has no fold:
/// looking for folds only after a failure spares a pass over every section, with the same
/// result as unfolding first.
fn parse_unfolded<T>(
    block: &Bytes,
    skip_first_line: bool,
    parse: impl Fn(&Bytes) -> Option<T>,
) -> Option<T> {
    parse(block).or_else(|| parse(&unfold(block, skip_first_line)?))
}

/// Names are copied (they are short); values share the header block's buffer (`block`, which
/// holds the bytes parsed, `src`).
fn own_fields(src: &[u8], block: &Bytes, fields: &[httparse::Header<'_>]) -> Vec<Field> {
    fields
        .iter()
        .map(|h| (field::name(h.name), rebase(src, block, h.value)))
        .collect()
}

/// Replaces each obs-fold (a line break followed by SP/HT, RFC 9112 §5.2) and the whitespace
/// around it with one SP, so httparse (which rejects folds) sees one value.
///
/// `skip_first_line` leaves the start line alone: whitespace right after it is not a fold but
/// an invalid message (RFC 9112 §2.2), which the parser then rejects.
///
/// None when there is no fold.
fn unfold(block: &Bytes, skip_first_line: bool) -> Option<Bytes> {
    let from = if skip_first_line {
        memchr::memchr(b'\n', block)? + 1
    } else {
        0
    };
    let folded = memchr::memchr_iter(b'\n', &block[from..])
        .any(|q| matches!(block.get(from + q + 1), Some(b' ' | b'\t')));
    if !folded {
        return None;
    }
    let mut out = Vec::with_capacity(block.len());
    out.extend_from_slice(&block[..from]);
    let mut k = from;
    while k < block.len() {
        let b = block[k];
        if b == b'\n' && matches!(block.get(k + 1), Some(b' ' | b'\t')) {
            while matches!(out.last(), Some(b' ' | b'\t' | b'\r')) {
                out.pop();
            }
            out.push(b' ');
            k += 1;
            while matches!(block.get(k), Some(b' ' | b'\t')) {
                k += 1;
            }
        } else {
            out.push(b);
            k += 1;
        }
    }
    Some(Bytes::from(out))
}

/// Whether a complete start line (ending in LF) parses as one, checked with httparse: it
/// reports an incomplete message (headers still to come) for a valid line and an error
/// otherwise.
fn plausible_start_line(kind: Start, line: &[u8]) -> bool {
    let mut none: [httparse::Header<'_>; 0] = [];
    let result = match kind {
        Start::Request => httparse::Request::new(&mut none).parse(line),
        Start::Response => httparse::Response::new(&mut none).parse(line),
    };
    matches!(result, Ok(httparse::Status::Partial))
}

fn values<'a>(headers: &'a [Field], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| &v[..])
}

fn first_value<'a>(headers: &'a [Field], name: &'a str) -> Option<&'a [u8]> {
    values(headers, name).next()
}

/// Content-Length per RFC 9110 §8.6: digits only; repeated (or listed) values must agree.
fn content_length(headers: &[Field]) -> Result<Option<u64>, Http1Error> {
    let mut found = None;
    for value in values(headers, "content-length") {
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(Http1Error::BadContentLength);
            }
            let n = item.iter().try_fold(0u64, |acc, &d| {
                acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            });
            match (n, found) {
                (None, _) => return Err(Http1Error::BadContentLength),
                (Some(n), Some(f)) if n != f => return Err(Http1Error::BadContentLength),
                (Some(n), _) => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// None without Transfer-Encoding; else whether its final coding is chunked.
fn final_coding_is_chunked(headers: &[Field]) -> Option<bool> {
    let mut present = false;
    let mut chunked = false;
    for value in values(headers, "transfer-encoding") {
        present = true;
        for item in value.split(|&b| b == b',') {
            let coding = item
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if !coding.is_empty() {
                chunked = coding.eq_ignore_ascii_case(b"chunked");
            }
        }
    }
    present.then_some(chunked)
}

/// Request body framing (RFC 9112 §6.3 rules 3, 4, 5, 6, 7).
fn request_body(headers: &[Field]) -> Result<Option<Body>, Http1Error> {
    match final_coding_is_chunked(headers) {
        // Chunked overrides any Content-Length.
        Some(true) => return Ok(Some(Body::Chunked(Chunk::Size))),
        Some(false) => return Err(Http1Error::BadTransferEncoding),
        None => {}
    }
    Ok(match content_length(headers)? {
        None | Some(0) => None,
        Some(n) => Some(Body::Length(n)),
    })
}

/// Response body framing (RFC 9112 §6.3 rules 1, 3, 4, 5, 6, 8); 101 and CONNECT 2xx are
/// handled by the caller.
fn response_body(
    to_head: bool,
    status: u16,
    headers: &[Field],
) -> Result<Option<Body>, Http1Error> {
    if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(None);
    }
    match final_coding_is_chunked(headers) {
        Some(true) => return Ok(Some(Body::Chunked(Chunk::Size))),
        Some(false) => return Ok(Some(Body::Close)),
        None => {}
    }
    Ok(match content_length(headers)? {
        Some(0) => None,
        Some(n) => Some(Body::Length(n)),
        None => Some(Body::Close),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const E: Direction = Direction::Egress;
    const I: Direction = Direction::Ingress;
    const CONN: u64 = 7;

    /// The segments of one connection, with stream positions tracked per direction.
    #[derive(Clone, Default)]
    struct Script {
        segs: Vec<Segment>,
        pos: [u64; 2],
    }

    impl Script {
        fn new() -> Self {
            Self::default()
        }

        /// One syscall of `dir` by `tid`, from `enter_ns` to `exit_ns`, moving `data`.
        fn io(self, dir: Direction, tid: u32, enter_ns: u64, exit_ns: u64, data: &[u8]) -> Self {
            self.lost(dir, 0, tid, enter_ns, exit_ns, data)
        }

        /// Like `io`, with `gap` bytes missing just before it.
        fn lost(
            mut self,
            dir: Direction,
            gap: u64,
            tid: u32,
            enter_ns: u64,
            exit_ns: u64,
            data: &[u8],
        ) -> Self {
            let k = usize::from(dir == I);
            self.pos[k] += gap;
            self.segs.push(Segment {
                conn_id: CONN,
                direction: dir,
                tid,
                pos: self.pos[k],
                data: Bytes::copy_from_slice(data),
                gap_before: gap,
                enter_ns,
                exit_ns,
            });
            self.pos[k] += data.len() as u64;
            self
        }
    }

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter()
            .map(|(n, v)| (n.to_string().into(), Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    /// A message whose head is `head`, with no body.
    fn msg(head: &str, start_ns: u64, end_ns: u64, tid: u32, headers: &[(&str, &str)]) -> Message {
        Message {
            start_ns,
            end_ns,
            tid,
            headers: fields(headers),
            trailers: Vec::new(),
            body_bytes: 0,
            header_bytes: head.len(),
            truncated: false,
        }
    }

    fn req(method: &str, target: &str, version: u8, msg: Message) -> Request {
        Request {
            method: method.into(),
            target: target.into(),
            version,
            msg,
        }
    }

    fn resp(status: u16, reason: &str, version: u8, msg: Message) -> Response {
        Response {
            status,
            reason: reason.into(),
            version,
            msg,
        }
    }

    fn ex(request: Request, response: Option<Response>) -> Exchange {
        Exchange {
            conn_id: CONN,
            seq: 0,
            request,
            response,
            interim: Vec::new(),
        }
    }

    fn cat(parts: &[&str]) -> Vec<u8> {
        parts.concat().into_bytes()
    }

    type Outcome = (Vec<Exchange>, Vec<Http1Error>, Option<Stop>, Side);

    fn feed(side: Side, limits: Http1Limits, segs: &[Segment], close: bool) -> Outcome {
        let mut conn = Http1Connection::new(CONN, side, limits);
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let mut arena = Arena::default();
        for seg in segs {
            conn.push(seg, &mut arena, &mut out, &mut errors);
            assert!(conn.egress.buf.len() <= limits.max_header_bytes);
            assert!(conn.ingress.buf.len() <= limits.max_header_bytes);
            assert!(conn.pending_requests() <= limits.max_pipelined.max(1));
        }
        if close {
            conn.close(&mut out, &mut errors);
            assert_eq!(conn.buffered(), 0);
            assert_eq!(conn.pending_requests(), 0);
        }
        (out, errors, conn.stop_reason().cloned(), conn.side())
    }

    /// The same bytes, one per syscall, with the original syscall's timing and thread.
    fn one_byte_pieces(segs: &[Segment]) -> Vec<Segment> {
        let mut pieces = Vec::new();
        for seg in segs {
            if seg.data.is_empty() {
                pieces.push(seg.clone());
            }
            for k in 0..seg.data.len() {
                pieces.push(Segment {
                    pos: seg.pos + k as u64,
                    data: seg.data.slice(k..k + 1),
                    gap_before: if k == 0 { seg.gap_before } else { 0 },
                    ..seg.clone()
                });
            }
        }
        pieces
    }

    struct Case {
        name: &'static str,
        side: Side,
        limits: Http1Limits,
        script: Script,
        close: bool,
        want: Vec<Exchange>,
        errors: Vec<Http1Error>,
        stop: Option<Stop>,
    }

    fn case(name: &'static str, side: Side, script: Script) -> Case {
        Case {
            name,
            side,
            limits: Http1Limits::default(),
            script,
            close: true,
            want: Vec::new(),
            errors: Vec::new(),
            stop: None,
        }
    }

    /// Runs a case as scripted and again with every syscall split into 1-byte syscalls: the
    /// result must be the same (syscall boundaries only matter to resynchronisation, and the
    /// cases below resync at line starts).
    fn check(mut case: Case) {
        // Every parsed request is emitted exactly once and in order, so the emitted sequence
        // numbers are always 0, 1, 2...
        for (k, want) in case.want.iter_mut().enumerate() {
            want.seq = k as u64;
        }
        let got = feed(case.side, case.limits, &case.script.segs, case.close);
        assert_eq!(got.0, case.want, "{}: exchanges", case.name);
        assert_eq!(got.1, case.errors, "{}: errors", case.name);
        assert_eq!(got.2, case.stop, "{}: stop", case.name);
        let split = feed(
            case.side,
            case.limits,
            &one_byte_pieces(&case.script.segs),
            case.close,
        );
        assert_eq!(split, got, "{}: 1-byte segmentation differs", case.name);
    }

    const CURL_GET: &str = "GET /api/items?id=7 HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    const CURL_GET_FIELDS: &[(&str, &str)] = &[
        ("Host", "example.com:8080"),
        ("User-Agent", "curl/8.5.0"),
        ("Accept", "*/*"),
    ];

    #[test]
    fn curl_get_with_content_length() {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 24\r\nDate: Mon, 02 Jun 2025 10:00:00 GMT\r\n\r\n";
        let body = "{\"id\":7,\"name\":\"widget\"}";
        assert_eq!(body.len(), 24);
        let mut c = case(
            "curl GET",
            Side::Client,
            Script::new()
                .io(E, 11, 1000, 1010, CURL_GET.as_bytes())
                .io(I, 11, 1500, 2000, &cat(&[head, &body[..10]]))
                .io(I, 11, 2050, 2100, &body.as_bytes()[10..]),
        );
        c.want = vec![ex(
            req(
                "GET",
                "/api/items?id=7",
                1,
                msg(CURL_GET, 1000, 1010, 11, CURL_GET_FIELDS),
            ),
            Some(resp(
                200,
                "OK",
                1,
                Message {
                    body_bytes: 24,
                    ..msg(
                        head,
                        2000,
                        2100,
                        11,
                        &[
                            ("Content-Type", "application/json"),
                            ("Content-Length", "24"),
                            ("Date", "Mon, 02 Jun 2025 10:00:00 GMT"),
                        ],
                    )
                },
            )),
        )];
        check(c);
    }

    #[test]
    fn python_http_server_http10_close_delimited() {
        let get = "GET /report.txt HTTP/1.1\r\nHost: localhost:8000\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
        let head = "HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.12.3\r\nDate: Mon, 02 Jun 2025 10:00:00 GMT\r\nContent-type: text/plain\r\n\r\n";
        let mut c = case(
            "python http.server",
            Side::Server,
            Script::new()
                .io(I, 21, 900, 1000, get.as_bytes())
                .io(E, 21, 1100, 1110, head.as_bytes())
                .io(E, 21, 1200, 1210, b"line one\n")
                .io(E, 21, 1300, 1310, b"line two\n"),
        );
        c.want = vec![ex(
            req(
                "GET",
                "/report.txt",
                1,
                msg(
                    get,
                    1000,
                    1000,
                    21,
                    &[
                        ("Host", "localhost:8000"),
                        ("User-Agent", "curl/8.5.0"),
                        ("Accept", "*/*"),
                    ],
                ),
            ),
            Some(resp(
                200,
                "OK",
                0,
                Message {
                    body_bytes: 18,
                    ..msg(
                        head,
                        1100,
                        1310,
                        21,
                        &[
                            ("Server", "SimpleHTTP/0.6 Python/3.12.3"),
                            ("Date", "Mon, 02 Jun 2025 10:00:00 GMT"),
                            ("Content-type", "text/plain"),
                        ],
                    )
                },
            )),
        )];
        check(c);

        // Without close() the close-delimited response never ends.
        let (out, errors, _, _) = feed(
            Side::Server,
            Http1Limits::default(),
            &c_script_http10(get, head),
            false,
        );
        assert!(out.is_empty());
        assert!(errors.is_empty());
    }

    fn c_script_http10(get: &str, head: &str) -> Vec<Segment> {
        Script::new()
            .io(I, 21, 900, 1000, get.as_bytes())
            .io(E, 21, 1100, 1110, &cat(&[head, "body"]))
            .segs
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let post = "POST /upload HTTP/1.1\r\nHost: files.internal\r\nTransfer-Encoding: chunked\r\nTrailer: Digest\r\n\r\n";
        let chunks1 = "5;name=val\r\nhello\r\n6;a;b=\"q x\"\r\n wo";
        let chunks2 = "rld\r\n0\r\nDigest: sha-256=abc\r\n\r\n";
        // Chunked (the final coding) overrides Content-Length.
        let head = "HTTP/1.1 201 Created\r\nContent-Length: 999\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let next = "GET /next HTTP/1.1\r\nHost: files.internal\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        let mut c = case(
            "chunked",
            Side::Client,
            Script::new()
                .io(E, 5, 1000, 1010, &cat(&[post, chunks1]))
                .io(E, 5, 1100, 1110, chunks2.as_bytes())
                .io(I, 5, 1200, 1300, &cat(&[head, "4\r\nWiki\r\n"]))
                .io(I, 5, 1350, 1400, b"0\r\n\r\n")
                .io(E, 5, 1500, 1510, next.as_bytes())
                .io(I, 5, 1600, 1700, &cat(&[ok, "ok"])),
        );
        c.want = vec![
            ex(
                req(
                    "POST",
                    "/upload",
                    1,
                    Message {
                        body_bytes: 11,
                        trailers: fields(&[("Digest", "sha-256=abc")]),
                        ..msg(
                            post,
                            1000,
                            1110,
                            5,
                            &[
                                ("Host", "files.internal"),
                                ("Transfer-Encoding", "chunked"),
                                ("Trailer", "Digest"),
                            ],
                        )
                    },
                ),
                Some(resp(
                    201,
                    "Created",
                    1,
                    Message {
                        body_bytes: 4,
                        ..msg(
                            head,
                            1300,
                            1400,
                            5,
                            &[
                                ("Content-Length", "999"),
                                ("Transfer-Encoding", "gzip, chunked"),
                            ],
                        )
                    },
                )),
            ),
            ex(
                req(
                    "GET",
                    "/next",
                    1,
                    msg(next, 1500, 1510, 5, &[("Host", "files.internal")]),
                ),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 2,
                        ..msg(ok, 1700, 1700, 5, &[("Content-Length", "2")])
                    },
                )),
            ),
        ];
        check(c);
    }

    #[test]
    fn head_response_has_no_body() {
        let head_req = "HEAD /big.iso HTTP/1.1\r\nHost: mirror\r\n\r\n";
        let head_resp =
            "HTTP/1.1 200 OK\r\nContent-Length: 4700000000\r\nAccept-Ranges: bytes\r\n\r\n";
        let get = "GET /small HTTP/1.1\r\nHost: mirror\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        let mut c = case(
            "HEAD",
            Side::Client,
            Script::new()
                .io(E, 1, 100, 110, head_req.as_bytes())
                .io(I, 1, 150, 200, head_resp.as_bytes())
                .io(E, 1, 300, 310, get.as_bytes())
                .io(I, 1, 350, 400, &cat(&[ok, "ok"])),
        );
        c.want = vec![
            ex(
                req(
                    "HEAD",
                    "/big.iso",
                    1,
                    msg(head_req, 100, 110, 1, &[("Host", "mirror")]),
                ),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(
                        head_resp,
                        200,
                        200,
                        1,
                        &[("Content-Length", "4700000000"), ("Accept-Ranges", "bytes")],
                    ),
                )),
            ),
            ex(
                req(
                    "GET",
                    "/small",
                    1,
                    msg(get, 300, 310, 1, &[("Host", "mirror")]),
                ),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 2,
                        ..msg(ok, 400, 400, 1, &[("Content-Length", "2")])
                    },
                )),
            ),
        ];
        check(c);
    }

    #[test]
    fn no_body_for_204_and_304() {
        let del = "DELETE /items/7 HTTP/1.1\r\nHost: api\r\n\r\n";
        let r204 = "HTTP/1.1 204 No Content\r\nDate: Mon, 02 Jun 2025 10:00:00 GMT\r\n\r\n";
        let cond = "GET /style.css HTTP/1.1\r\nHost: api\r\nIf-None-Match: \"abc\"\r\n\r\n";
        let r304 = "HTTP/1.1 304 Not Modified\r\nETag: \"abc\"\r\nContent-Length: 512\r\n\r\n";
        let get = "GET /x HTTP/1.1\r\nHost: api\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        let mut c = case(
            "204/304",
            Side::Client,
            Script::new()
                .io(E, 1, 100, 110, del.as_bytes())
                .io(I, 1, 150, 200, r204.as_bytes())
                .io(E, 1, 300, 310, cond.as_bytes())
                .io(I, 1, 350, 400, r304.as_bytes())
                .io(E, 1, 500, 510, get.as_bytes())
                .io(I, 1, 550, 600, &cat(&[ok, "abc"])),
        );
        c.want = vec![
            ex(
                req(
                    "DELETE",
                    "/items/7",
                    1,
                    msg(del, 100, 110, 1, &[("Host", "api")]),
                ),
                Some(resp(
                    204,
                    "No Content",
                    1,
                    msg(
                        r204,
                        200,
                        200,
                        1,
                        &[("Date", "Mon, 02 Jun 2025 10:00:00 GMT")],
                    ),
                )),
            ),
            ex(
                req(
                    "GET",
                    "/style.css",
                    1,
                    msg(
                        cond,
                        300,
                        310,
                        1,
                        &[("Host", "api"), ("If-None-Match", "\"abc\"")],
                    ),
                ),
                Some(resp(
                    304,
                    "Not Modified",
                    1,
                    msg(
                        r304,
                        400,
                        400,
                        1,
                        &[("ETag", "\"abc\""), ("Content-Length", "512")],
                    ),
                )),
            ),
            ex(
                req("GET", "/x", 1, msg(get, 500, 510, 1, &[("Host", "api")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 3,
                        ..msg(ok, 600, 600, 1, &[("Content-Length", "3")])
                    },
                )),
            ),
        ];
        check(c);
    }

    #[test]
    fn expect_100_continue() {
        let post = "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n";
        let cont = "HTTP/1.1 100 Continue\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        let mut c = case(
            "100-continue",
            Side::Client,
            Script::new()
                .io(E, 3, 1000, 1010, post.as_bytes())
                .io(I, 3, 1100, 1200, cont.as_bytes())
                .io(E, 3, 1300, 1310, b"hello world")
                .io(I, 3, 1400, 1500, &cat(&[ok, "ok"])),
        );
        c.want = vec![Exchange {
            interim: vec![100],
            ..ex(
                req(
                    "POST",
                    "/upload",
                    1,
                    Message {
                        body_bytes: 11,
                        ..msg(
                            post,
                            1000,
                            1310,
                            3,
                            &[
                                ("Host", "a"),
                                ("Content-Length", "11"),
                                ("Expect", "100-continue"),
                            ],
                        )
                    },
                ),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 2,
                        ..msg(ok, 1500, 1500, 3, &[("Content-Length", "2")])
                    },
                )),
            )
        }];
        check(c);
    }

    #[test]
    fn pipelined_pair_matches_fifo() {
        let a = "GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
        let b = "GET /b HTTP/1.1\r\nHost: h\r\n\r\n";
        let ra = "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n";
        let rb = "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n";
        let mut c = case(
            "pipelined",
            Side::Client,
            Script::new().io(E, 4, 1000, 1010, &cat(&[a, b])).io(
                I,
                4,
                1100,
                1200,
                &cat(&[ra, "A", rb, "BB"]),
            ),
        );
        let cl = |n: &'static str| [("Content-Length", n)];
        c.want = vec![
            ex(
                req("GET", "/a", 1, msg(a, 1000, 1010, 4, &[("Host", "h")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 1,
                        ..msg(ra, 1200, 1200, 4, &cl("1"))
                    },
                )),
            ),
            ex(
                req("GET", "/b", 1, msg(b, 1000, 1010, 4, &[("Host", "h")])),
                Some(resp(
                    404,
                    "Not Found",
                    1,
                    Message {
                        body_bytes: 2,
                        ..msg(rb, 1200, 1200, 4, &cl("2"))
                    },
                )),
            ),
        ];
        check(c);
    }

    #[test]
    fn keep_alive_three_in_a_row() {
        let g1 = "GET /1 HTTP/1.1\r\nHost: svc\r\n\r\n";
        let r1 = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        let p2 = "POST /2 HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\n";
        let r2 = "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n";
        let g3 = "GET /3 HTTP/1.1\r\nHost: svc\r\n\r\n";
        let hints = "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
        let r3 = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "keep-alive",
            Side::Server,
            Script::new()
                .io(I, 8, 50, 100, g1.as_bytes())
                .io(E, 8, 200, 210, &cat(&[r1, "hello"]))
                .io(I, 8, 250, 300, p2.as_bytes())
                // Old clients send a stray CRLF after a body (RFC 9112 §2.2).
                .io(I, 9, 350, 400, b"data\r\n")
                .io(E, 9, 500, 510, &cat(&[r2, "3\r\nabc\r\n0\r\n\r\n"]))
                .io(I, 8, 550, 600, g3.as_bytes())
                .io(E, 8, 700, 710, hints.as_bytes())
                .io(E, 8, 800, 810, r3.as_bytes()),
        );
        c.want = vec![
            ex(
                req("GET", "/1", 1, msg(g1, 100, 100, 8, &[("Host", "svc")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 5,
                        ..msg(r1, 200, 210, 8, &[("Content-Length", "5")])
                    },
                )),
            ),
            ex(
                req(
                    "POST",
                    "/2",
                    1,
                    Message {
                        body_bytes: 4,
                        ..msg(p2, 300, 400, 8, &[("Host", "svc"), ("Content-Length", "4")])
                    },
                ),
                Some(resp(
                    201,
                    "Created",
                    1,
                    Message {
                        body_bytes: 3,
                        ..msg(r2, 500, 510, 9, &[("Transfer-Encoding", "chunked")])
                    },
                )),
            ),
            Exchange {
                interim: vec![103],
                ..ex(
                    req("GET", "/3", 1, msg(g3, 600, 600, 8, &[("Host", "svc")])),
                    Some(resp(
                        200,
                        "OK",
                        1,
                        msg(r3, 800, 810, 8, &[("Content-Length", "0")]),
                    )),
                )
            },
        ];
        check(c);
    }

    #[test]
    fn obs_fold_is_joined() {
        let get =
            "GET /fold HTTP/1.1\r\nHost: a\r\nX-Note: first \r\n  second\r\nAccept: */*\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nX-Folded: a\r\n\tb\r\n c\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "obs-fold",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, get.as_bytes())
                .io(I, 1, 30, 40, ok.as_bytes()),
        );
        c.want = vec![ex(
            req(
                "GET",
                "/fold",
                1,
                msg(
                    get,
                    10,
                    20,
                    1,
                    &[("Host", "a"), ("X-Note", "first second"), ("Accept", "*/*")],
                ),
            ),
            Some(resp(
                200,
                "OK",
                1,
                msg(
                    ok,
                    40,
                    40,
                    1,
                    &[("X-Folded", "a b c"), ("Content-Length", "0")],
                ),
            )),
        )];
        check(c);
    }

    #[test]
    fn sections_with_more_fields_than_stack_slots_and_folds_parse_whole() {
        // Past the stack's header slots, with a fold at the end of each section: the fold
        // fails the first parse, and the larger retry must see it unfolded too.
        let many: Vec<(String, String)> = (0..STACK_HEADERS + 6)
            .map(|i| (format!("X-F{i}"), i.to_string()))
            .collect();
        let lines: String = many.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
        let post = format!(
            "POST /many HTTP/1.1\r\n{lines}Transfer-Encoding: chunked\r\nX-Last: a\r\n b\r\n\r\n"
        );
        let body = format!("1\r\nx\r\n0\r\n{lines}X-Sum: c\r\n\td\r\n\r\n");
        let ok = format!("HTTP/1.1 204 No Content\r\n{lines}X-Last: e\r\n  f\r\n\r\n");
        let mut c = case(
            "many fields and folds",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, &cat(&[&post, &body]))
                .io(I, 1, 30, 40, ok.as_bytes()),
        );
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut list: Vec<(&str, &str)> =
                many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            list.extend_from_slice(extra);
            list
        };
        c.want = vec![ex(
            req(
                "POST",
                "/many",
                1,
                Message {
                    body_bytes: 1,
                    trailers: fields(&with(&[("X-Sum", "c d")])),
                    ..msg(
                        &post,
                        10,
                        20,
                        1,
                        &with(&[("Transfer-Encoding", "chunked"), ("X-Last", "a b")]),
                    )
                },
            ),
            Some(resp(
                204,
                "No Content",
                1,
                msg(&ok, 40, 40, 1, &with(&[("X-Last", "e f")])),
            )),
        )];
        check(c);
    }

    #[test]
    fn one_byte_syscalls_time_each_message_by_its_own_bytes() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        let mut script = Script::new();
        for (k, b) in CURL_GET.bytes().enumerate() {
            let t = 1000 + 10 * k as u64;
            script = script.io(E, 1 + k as u32 % 2, t, t + 5, &[b]);
        }
        for (k, b) in ok.bytes().enumerate() {
            let t = 5000 + 10 * k as u64;
            script = script.io(I, 3, t, t + 5, &[b]);
        }
        let (out, errors, _, _) = feed(Side::Client, Http1Limits::default(), &script.segs, false);
        let last_req = 1000 + 10 * (CURL_GET.len() as u64 - 1) + 5;
        let last_resp = 5000 + 10 * (ok.len() as u64 - 1) + 5;
        let head = &ok[..ok.len() - 3];
        assert_eq!(errors, vec![]);
        assert_eq!(
            out,
            vec![ex(
                req(
                    "GET",
                    "/api/items?id=7",
                    1,
                    msg(CURL_GET, 1000, last_req, 1, CURL_GET_FIELDS)
                ),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 3,
                        ..msg(head, 5005, last_resp, 3, &[("Content-Length", "3")])
                    },
                )),
            )]
        );
    }

    #[test]
    fn gap_inside_body_stays_in_sync() {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
        let get2 = "GET /2 HTTP/1.1\r\nHost: a\r\n\r\n";
        let ok2 = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let get1 = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut c = case(
            "gap in body",
            Side::Client,
            Script::new()
                .io(E, 1, 1000, 1010, get1.as_bytes())
                .io(I, 1, 1500, 2000, &cat(&[head, &"x".repeat(100)]))
                .lost(I, 850, 1, 2100, 2200, "y".repeat(50).as_bytes())
                .io(E, 1, 3000, 3010, get2.as_bytes())
                .io(I, 1, 3100, 3200, ok2.as_bytes()),
        );
        c.want = vec![
            ex(
                req("GET", "/1", 1, msg(get1, 1000, 1010, 1, &[("Host", "a")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 1000,
                        ..msg(head, 2000, 2200, 1, &[("Content-Length", "1000")])
                    },
                )),
            ),
            ex(
                req("GET", "/2", 1, msg(get2, 3000, 3010, 1, &[("Host", "a")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(ok2, 3200, 3200, 1, &[("Content-Length", "0")]),
                )),
            ),
        ];
        check(c);
    }

    #[test]
    fn gap_carried_by_an_empty_segment_completes_the_body_at_once() {
        let get = "GET /big HTTP/1.1\r\nHost: a\r\n\r\n";
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n";
        let script = Script::new()
            .io(E, 1, 1000, 1010, get.as_bytes())
            .io(I, 1, 1500, 2000, &cat(&[head, &"x".repeat(100)]))
            .lost(I, 200, 1, 2100, 2100, b"");
        let (out, errors, _, _) = feed(Side::Client, Http1Limits::default(), &script.segs, false);
        assert!(errors.is_empty());
        assert_eq!(out.len(), 1);
        let response = out[0]
            .response
            .as_ref()
            .map(|r| (r.msg.body_bytes, r.msg.end_ns));
        assert_eq!(response, Some((300, 2000)));
    }

    #[test]
    fn gap_inside_request_headers_resyncs() {
        let found = "GET /found HTTP/1.1\r\nHost: a\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "gap in request headers",
            Side::Server,
            Script::new()
                .io(I, 2, 900, 1000, b"GET /lost HTTP/1.1\r\nHost: a\r\nX-Pad")
                .lost(
                    I,
                    40,
                    2,
                    1050,
                    1100,
                    b"ding: 1\r\n\r\nGET is what this is not\r\n",
                )
                .io(I, 2, 1150, 1200, found.as_bytes())
                .io(E, 2, 1300, 1310, ok.as_bytes()),
        );
        c.want = vec![ex(
            req(
                "GET",
                "/found",
                1,
                msg(found, 1200, 1200, 2, &[("Host", "a")]),
            ),
            Some(resp(
                200,
                "OK",
                1,
                msg(ok, 1300, 1310, 2, &[("Content-Length", "0")]),
            )),
        )];
        c.errors = vec![Http1Error::GapInHeaders];
        check(c);
    }

    #[test]
    fn gap_inside_response_headers_resyncs_and_unanswers_waiting_requests() {
        let a = "GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
        let b = "GET /b HTTP/1.1\r\nHost: h\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "gap in response headers",
            Side::Client,
            Script::new()
                .io(E, 1, 1000, 1010, a.as_bytes())
                .io(I, 1, 1050, 1100, b"HTTP/1.1 200 OK\r\nContent-Le")
                .lost(I, 30, 1, 1150, 1200, b"\r\n\r\nbody of a\n")
                .io(E, 1, 1300, 1310, b.as_bytes())
                .io(I, 1, 1350, 1400, ok.as_bytes()),
        );
        c.want = vec![
            ex(
                req("GET", "/a", 1, msg(a, 1000, 1010, 1, &[("Host", "h")])),
                None,
            ),
            ex(
                req("GET", "/b", 1, msg(b, 1300, 1310, 1, &[("Host", "h")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(ok, 1400, 1400, 1, &[("Content-Length", "0")]),
                )),
            ),
        ];
        c.errors = vec![Http1Error::GapInHeaders];
        check(c);
    }

    #[test]
    fn resync_at_a_syscall_start_mid_line() {
        // After a loss, the next message usually starts a syscall even if the bytes before it
        // did not end a line.
        let found = "GET /next HTTP/1.1\r\nHost: a\r\n\r\n";
        let script = Script::new()
            .io(I, 2, 900, 1000, b"GET /lost HTTP/1.1\r\nHo")
            .lost(I, 10, 2, 1050, 1100, b"body without newline")
            .io(I, 2, 1150, 1200, found.as_bytes());
        let (out, errors, _, _) = feed(Side::Server, Http1Limits::default(), &script.segs, true);
        assert_eq!(errors, vec![Http1Error::GapInHeaders]);
        assert_eq!(
            out,
            vec![ex(
                req(
                    "GET",
                    "/next",
                    1,
                    msg(found, 1200, 1200, 2, &[("Host", "a")])
                ),
                None
            )]
        );
    }

    #[test]
    fn response_to_a_lost_request_is_not_paired_with_a_later_one() {
        // Server side: the response to a request lost in a gap was being written (enter 1000)
        // before the next request was read (exit 1200), so it cannot answer that request.
        let a = "GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
        let r = "GET /r HTTP/1.1\r\nHost: h\r\n\r\n";
        let ok =
            |who: &str| format!("HTTP/1.1 200 OK\r\nX-For: {who}\r\nContent-Length: 0\r\n\r\n");
        let (ok_a, ok_lost, ok_r) = (ok("a"), ok("lost"), ok("r"));
        let mut c = case(
            "response to lost request",
            Side::Server,
            Script::new()
                .io(I, 1, 50, 100, a.as_bytes())
                .io(E, 1, 150, 160, ok_a.as_bytes())
                .lost(I, 40, 1, 1100, 1200, r.as_bytes())
                .io(E, 1, 1000, 1500, ok_lost.as_bytes())
                .io(E, 1, 1600, 1610, ok_r.as_bytes()),
        );
        let fields_for = |who| [("X-For", who), ("Content-Length", "0")];
        c.want = vec![
            ex(
                req("GET", "/a", 1, msg(a, 100, 100, 1, &[("Host", "h")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(&ok_a, 150, 160, 1, &fields_for("a")),
                )),
            ),
            ex(
                req("GET", "/r", 1, msg(r, 1200, 1200, 1, &[("Host", "h")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(&ok_r, 1600, 1610, 1, &fields_for("r")),
                )),
            ),
        ];
        c.errors = vec![Http1Error::GapInHeaders, Http1Error::ResponseWithoutRequest];
        check(c);
    }

    #[test]
    fn upgrade_101_ends_parsing() {
        let ws = "GET /chat HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let r101 = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let mut c = case(
            "websocket",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, ws.as_bytes())
                .io(I, 1, 30, 40, &[r101.as_bytes(), b"\x81\x05hello"].concat())
                .io(
                    E,
                    1,
                    50,
                    60,
                    b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
                ),
        );
        c.want = vec![ex(
            req(
                "GET",
                "/chat",
                1,
                msg(
                    ws,
                    10,
                    20,
                    1,
                    &[
                        ("Host", "chat"),
                        ("Upgrade", "websocket"),
                        ("Connection", "Upgrade"),
                        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                        ("Sec-WebSocket-Version", "13"),
                    ],
                ),
            ),
            Some(resp(
                101,
                "Switching Protocols",
                1,
                msg(
                    r101,
                    40,
                    40,
                    1,
                    &[
                        ("Upgrade", "websocket"),
                        ("Connection", "Upgrade"),
                        ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                    ],
                ),
            )),
        )];
        c.stop = Some(Stop::Upgraded {
            protocol: Some("websocket".into()),
        });
        check(c);

        let h2c = "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
        let mut conn = Http1Connection::new(CONN, Side::Client, Http1Limits::default());
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        for seg in Script::new()
            .io(E, 1, 10, 20, h2c.as_bytes())
            .io(
                I,
                1,
                30,
                40,
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\0\0\x12\x04\0\0\0\0\0",
            )
            .segs
        {
            conn.push(&seg, &mut Arena::default(), &mut out, &mut errors);
        }
        assert!(conn.is_done());
        assert_eq!(conn.upgraded_protocol(), Some("h2c"));
        assert_eq!(out.len(), 1);
        assert_eq!(conn.buffered(), 0);
    }

    #[test]
    fn connect_2xx_ends_parsing() {
        let connect = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        let est = "HTTP/1.1 200 Connection established\r\n\r\n";
        let mut c = case(
            "CONNECT",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, connect.as_bytes())
                .io(I, 1, 30, 40, est.as_bytes())
                .io(
                    E,
                    1,
                    50,
                    60,
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                ),
        );
        c.want = vec![ex(
            req(
                "CONNECT",
                "example.com:443",
                1,
                msg(connect, 10, 20, 1, &[("Host", "example.com:443")]),
            ),
            Some(resp(
                200,
                "Connection established",
                1,
                msg(est, 40, 40, 1, &[]),
            )),
        )];
        c.stop = Some(Stop::Tunnel);
        check(c);
    }

    #[test]
    fn detect_first_bytes() {
        let client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x1b";
        let postgres_startup =
            b"\x00\x00\x00\x4e\x00\x03\x00\x00user\x00postgres\x00database\x00app\x00\x00";
        let postgres_ssl = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
        let binary = [0x9c, 0x01, 0xff, 0x00, 0x42, 0x13, 0x37, 0x80];
        let table: &[(&[u8], Option<bool>)] = &[
            (b"GET / HTTP/1.1\r\n", Some(true)),
            (b"DELETE /x HTTP/1.1\r\n", Some(true)),
            (b"MKCALENDAR /cal", Some(true)),
            (b"HTTP/1.1 200 OK\r\n", Some(true)),
            (b"HTTP/1.0 404 Not Found", Some(true)),
            (client_hello, Some(false)),
            (b"*1\r\n$4\r\nPING\r\n", Some(false)),
            (b"+PONG\r\n", Some(false)),
            (postgres_startup, Some(false)),
            (postgres_ssl, Some(false)),
            (&binary, Some(false)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(false)),
            (b"HTTP/2 200\r\n", Some(false)),
            (b"get / HTTP/1.1\r\n", Some(false)),
            (b"GETX / HTTP/1.1", Some(false)),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Some(false)),
            (b"", None),
            (b"G", None),
            (b"GE", None),
            (b"GET", None),
            (b"H", None),
            (b"HTTP/1", None),
            (b"PROPPATC", None),
        ];
        for (bytes, want) in table {
            assert_eq!(detect(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
        for method in METHODS {
            assert!(method.len() < CLASSIFY_LEN);
        }
    }

    #[test]
    fn unknown_side_is_learned_from_the_first_start_line() {
        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for (req_dir, resp_dir, side) in [(E, I, Side::Client), (I, E, Side::Server)] {
            let script = Script::new().io(req_dir, 1, 10, 20, get.as_bytes()).io(
                resp_dir,
                1,
                30,
                40,
                ok.as_bytes(),
            );
            for segs in [script.segs.clone(), one_byte_pieces(&script.segs)] {
                let (out, errors, stop, learned) =
                    feed(Side::Unknown, Http1Limits::default(), &segs, true);
                assert_eq!(learned, side);
                assert_eq!(errors, vec![]);
                assert_eq!(stop, None);
                assert_eq!(out.len(), 1);
                assert_eq!(out[0].response.as_ref().map(|r| r.status), Some(200));
            }
        }
    }

    #[test]
    fn not_http_stops_at_once() {
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        for side in [Side::Unknown, Side::Server, Side::Client] {
            for dir in [E, I] {
                let script = Script::new().io(dir, 1, 10, 20, hello);
                let (out, errors, stop, _) = feed(side, Http1Limits::default(), &script.segs, true);
                assert!(out.is_empty());
                assert_eq!(errors, vec![Http1Error::NotHttp]);
                assert_eq!(stop, Some(Stop::NotHttp));
            }
        }
        // Redis split so the first syscall alone cannot tell.
        let script = Script::new()
            .io(E, 1, 10, 20, b"")
            .io(E, 1, 10, 20, b"*")
            .io(E, 1, 30, 40, b"1\r\n");
        let (_, errors, stop, _) = feed(Side::Unknown, Http1Limits::default(), &script.segs, false);
        assert_eq!(
            (errors, stop),
            (vec![Http1Error::NotHttp], Some(Stop::NotHttp))
        );
    }

    #[test]
    fn never_synced_scan_is_bounded() {
        let junk = vec![b'x'; 64 * 1024];
        let mut script = Script::new().lost(I, 10, 1, 1, 2, &junk);
        for k in 0..5 {
            script = script.io(I, 1, 10 + k, 20 + k, &junk);
        }
        let (_, errors, stop, _) = feed(Side::Unknown, Http1Limits::default(), &script.segs, false);
        assert_eq!(errors, vec![Http1Error::GapInHeaders, Http1Error::NotHttp]);
        assert_eq!(stop, Some(Stop::NotHttp));
    }

    #[test]
    fn content_length_rules() {
        let bad = "POST /a HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        let good = "POST /b HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "conflicting Content-Length",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, &cat(&[bad, "hello!"]))
                .io(E, 1, 30, 40, &cat(&[good, "abc"]))
                .io(I, 1, 50, 60, ok.as_bytes()),
        );
        c.want = vec![ex(
            req(
                "POST",
                "/b",
                1,
                Message {
                    body_bytes: 3,
                    ..msg(good, 30, 40, 1, &[("Content-Length", "3, 3")])
                },
            ),
            Some(resp(
                200,
                "OK",
                1,
                msg(ok, 60, 60, 1, &[("Content-Length", "0")]),
            )),
        )];
        c.errors = vec![Http1Error::BadContentLength];
        check(c);

        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut c = case(
            "invalid response Content-Length",
            Side::Client,
            Script::new().io(E, 1, 10, 20, get.as_bytes()).io(
                I,
                1,
                30,
                40,
                b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\n",
            ),
        );
        c.want = vec![ex(
            req("GET", "/", 1, msg(get, 10, 20, 1, &[("Host", "a")])),
            None,
        )];
        c.errors = vec![Http1Error::BadContentLength];
        check(c);

        type Want = Result<Option<u64>, Http1Error>;
        let cases: &[(&[(&str, &str)], Want)] = &[
            (&[], Ok(None)),
            (&[("content-length", "0")], Ok(Some(0))),
            (
                &[("Content-Length", "42"), ("CONTENT-LENGTH", "42")],
                Ok(Some(42)),
            ),
            (&[("Content-Length", "42,42")], Ok(Some(42))),
            (
                &[("Content-Length", "18446744073709551615")],
                Ok(Some(u64::MAX)),
            ),
            (
                &[("Content-Length", "18446744073709551616")],
                Err(Http1Error::BadContentLength),
            ),
            (&[("Content-Length", "")], Err(Http1Error::BadContentLength)),
            (
                &[("Content-Length", "-1")],
                Err(Http1Error::BadContentLength),
            ),
            (
                &[("Content-Length", "+1")],
                Err(Http1Error::BadContentLength),
            ),
            (
                &[("Content-Length", "1,")],
                Err(Http1Error::BadContentLength),
            ),
            (
                &[("Content-Length", "1, 2")],
                Err(Http1Error::BadContentLength),
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(content_length(&fields(headers)), *want, "{headers:?}");
        }
    }

    #[test]
    fn transfer_encoding_rules() {
        let te = |v: &[&str]| {
            let list: Vec<(&str, &str)> = v.iter().map(|v| ("Transfer-Encoding", *v)).collect();
            final_coding_is_chunked(&fields(&list))
        };
        assert_eq!(te(&[]), None);
        assert_eq!(te(&["chunked"]), Some(true));
        assert_eq!(te(&["CHUNKED"]), Some(true));
        assert_eq!(te(&["gzip", "chunked"]), Some(true));
        assert_eq!(te(&["gzip, chunked ,"]), Some(true));
        assert_eq!(te(&["chunked, gzip"]), Some(false));
        assert_eq!(te(&["gzip"]), Some(false));

        // A request whose length cannot be known is dropped.
        let get = "GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let close = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        let mut c = case(
            "transfer-encoding",
            Side::Client,
            Script::new()
                .io(
                    E,
                    1,
                    10,
                    20,
                    b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                )
                .io(E, 1, 30, 40, get.as_bytes())
                // A response with a non-chunked coding is delimited by close.
                .io(I, 1, 50, 60, &cat(&[close, "0123456789"])),
        );
        c.want = vec![ex(
            req("GET", "/ok", 1, msg(get, 30, 40, 1, &[("Host", "a")])),
            Some(resp(
                200,
                "OK",
                1,
                Message {
                    body_bytes: 10,
                    ..msg(close, 60, 60, 1, &[("Transfer-Encoding", "gzip")])
                },
            )),
        )];
        c.errors = vec![Http1Error::BadTransferEncoding];
        check(c);
    }

    #[test]
    fn headers_too_large_resyncs_within_the_limit() {
        let limits = Http1Limits {
            max_header_bytes: 64,
            max_pipelined: 64,
        };
        let big = format!("GET /big HTTP/1.1\r\nCookie: {}\r\n\r\n", "c".repeat(100));
        let small = "GET /small HTTP/1.1\r\nHost: a\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "too large",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, &big.as_bytes()[..40])
                .io(E, 1, 30, 40, &big.as_bytes()[40..])
                .io(E, 1, 50, 60, small.as_bytes())
                .io(I, 1, 70, 80, ok.as_bytes()),
        );
        c.limits = limits;
        c.want = vec![ex(
            req("GET", "/small", 1, msg(small, 50, 60, 1, &[("Host", "a")])),
            Some(resp(
                200,
                "OK",
                1,
                msg(ok, 80, 80, 1, &[("Content-Length", "0")]),
            )),
        )];
        c.errors = vec![Http1Error::HeadersTooLarge];
        check(c);
    }

    #[test]
    fn pipeline_overflow_emits_the_oldest() {
        let get = |n: u32| format!("GET /{n} HTTP/1.1\r\nHost: a\r\n\r\n");
        let ok = |n: u32| format!("HTTP/1.1 200 OK\r\nX-N: {n}\r\nContent-Length: 0\r\n\r\n");
        let mut script = Script::new();
        for n in 1..=3 {
            script = script.io(
                E,
                1,
                u64::from(n) * 10,
                u64::from(n) * 10 + 5,
                get(n).as_bytes(),
            );
        }
        for n in 1..=3 {
            script = script.io(
                I,
                1,
                100 + u64::from(n),
                100 + u64::from(n),
                ok(n).as_bytes(),
            );
        }
        let mut c = case("overflow", Side::Client, script);
        c.limits = Http1Limits {
            max_header_bytes: 1024,
            max_pipelined: 2,
        };
        let request = |n: u32| {
            let head = get(n);
            let t = u64::from(n) * 10;
            req(
                "GET",
                &format!("/{n}"),
                1,
                msg(&head, t, t + 5, 1, &[("Host", "a")]),
            )
        };
        let response = |n: u32| {
            let head = ok(n);
            let t = 100 + u64::from(n);
            let tag = n.to_string();
            resp(
                200,
                "OK",
                1,
                msg(&head, t, t, 1, &[("X-N", &tag), ("Content-Length", "0")]),
            )
        };
        c.want = vec![
            ex(request(1), None),
            ex(request(2), Some(response(2))),
            ex(request(3), Some(response(3))),
        ];
        c.errors = vec![Http1Error::PipelineOverflow];
        check(c);
    }

    #[test]
    fn response_without_request_is_skipped() {
        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let mut c = case(
            "response without request",
            Side::Client,
            Script::new()
                .io(I, 1, 5, 6, ok.as_bytes())
                .io(E, 1, 10, 20, get.as_bytes())
                .io(I, 1, 30, 40, ok.as_bytes()),
        );
        let head = &ok[..ok.len() - 2];
        c.want = vec![ex(
            req("GET", "/", 1, msg(get, 10, 20, 1, &[("Host", "a")])),
            Some(resp(
                200,
                "OK",
                1,
                Message {
                    body_bytes: 2,
                    ..msg(head, 40, 40, 1, &[("Content-Length", "2")])
                },
            )),
        )];
        c.errors = vec![Http1Error::ResponseWithoutRequest];
        check(c);
    }

    #[test]
    fn close_mid_message_truncates() {
        let post = "POST /up HTTP/1.1\r\nContent-Length: 100\r\n\r\n";
        let mut c = case(
            "close mid body",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, &cat(&[post, "0123456789"]))
                .io(I, 1, 30, 40, b"HTTP/1.1 413 Content Too Large\r\nConn"),
        );
        c.want = vec![ex(
            req(
                "POST",
                "/up",
                1,
                Message {
                    body_bytes: 10,
                    truncated: true,
                    ..msg(post, 10, 20, 1, &[("Content-Length", "100")])
                },
            ),
            None,
        )];
        c.errors = vec![Http1Error::Truncated, Http1Error::Truncated];
        check(c);
    }

    #[test]
    fn bad_chunk_reports_truncated_message_and_resyncs() {
        let post = "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let get = "GET /d HTTP/1.1\r\nHost: a\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "bad chunk",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, &cat(&[post, "3\r\nabc\r\nzz\r\n"]))
                .io(E, 1, 30, 40, get.as_bytes())
                .io(I, 1, 50, 60, ok.as_bytes())
                .io(I, 1, 70, 80, ok.as_bytes()),
        );
        c.want = vec![
            ex(
                req(
                    "POST",
                    "/c",
                    1,
                    Message {
                        body_bytes: 3,
                        truncated: true,
                        ..msg(post, 10, 20, 1, &[("Transfer-Encoding", "chunked")])
                    },
                ),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(ok, 60, 60, 1, &[("Content-Length", "0")]),
                )),
            ),
            ex(
                req("GET", "/d", 1, msg(get, 30, 40, 1, &[("Host", "a")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(ok, 80, 80, 1, &[("Content-Length", "0")]),
                )),
            ),
        ];
        c.errors = vec![Http1Error::BadChunk];
        check(c);
    }

    #[test]
    fn gap_in_chunk_framing_loses_sync() {
        let get = "GET /s HTTP/1.1\r\nHost: a\r\n\r\n";
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let get2 = "GET /t HTTP/1.1\r\nHost: a\r\n\r\n";
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut c = case(
            "gap in chunked",
            Side::Client,
            Script::new()
                .io(E, 1, 10, 20, get.as_bytes())
                .io(I, 1, 30, 40, &cat(&[head, "a\r\n0123"]))
                // Within the chunk: stays in sync.
                .lost(I, 2, 1, 50, 60, b"6789\r\n1")
                // In a chunk-size line: lost.
                .lost(I, 5, 1, 70, 80, b"\r\nxyz\r\n0\r\n\r\n")
                .io(E, 1, 90, 95, get2.as_bytes())
                .io(I, 1, 100, 110, ok.as_bytes()),
        );
        c.want = vec![
            ex(
                req("GET", "/s", 1, msg(get, 10, 20, 1, &[("Host", "a")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    Message {
                        body_bytes: 10,
                        truncated: true,
                        ..msg(head, 40, 60, 1, &[("Transfer-Encoding", "chunked")])
                    },
                )),
            ),
            ex(
                req("GET", "/t", 1, msg(get2, 90, 95, 1, &[("Host", "a")])),
                Some(resp(
                    200,
                    "OK",
                    1,
                    msg(ok, 110, 110, 1, &[("Content-Length", "0")]),
                )),
            ),
        ];
        c.errors = vec![Http1Error::GapInChunked];
        check(c);
    }

    #[test]
    fn error_names_are_distinct() {
        let names: std::collections::HashSet<_> =
            Http1Error::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names.len(), Http1Error::ALL.len());
    }

    // ---- Property tests ----

    /// One generated exchange: its bytes and what parsing must report (timing aside).
    #[derive(Clone, Debug)]
    struct GenExchange {
        request: Vec<u8>,
        /// Interim heads then the final response.
        response: Vec<u8>,
        /// Where the final response starts in `response`.
        final_at: usize,
        want: Exchange,
    }

    #[derive(Clone, Debug)]
    enum GenBody {
        None,
        Length(Vec<u8>),
        Chunked {
            chunks: Vec<Vec<u8>>,
            ext: bool,
            trailers: Vec<(String, String)>,
        },
        Close,
    }

    /// A rendered message and the values parsing must report for it.
    struct Rendered {
        bytes: Vec<u8>,
        fields: Vec<(String, String)>,
        header_bytes: usize,
        body_bytes: u64,
        trailers: Vec<(String, String)>,
    }

    fn render(
        start: &str,
        headers: &[(String, String)],
        body: &GenBody,
        no_body: bool,
    ) -> Rendered {
        let mut all = headers.to_vec();
        match body {
            GenBody::Length(b) => all.push(("Content-Length".into(), b.len().to_string())),
            GenBody::Chunked { .. } => all.push(("Transfer-Encoding".into(), "chunked".into())),
            GenBody::None | GenBody::Close => {}
        }
        let mut bytes = start.as_bytes().to_vec();
        for (n, v) in &all {
            bytes.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        let header_bytes = bytes.len();
        let mut body_bytes = 0;
        let mut trailers_out = Vec::new();
        if !no_body {
            match body {
                GenBody::None => {}
                GenBody::Length(b) => {
                    bytes.extend_from_slice(b);
                    body_bytes = b.len() as u64;
                }
                GenBody::Close => {
                    // Looks like more messages, but is body until the close.
                    let tail = b"close-delimited body\r\n\r\nGET / HTTP/1.1\r\n";
                    bytes.extend_from_slice(tail);
                    body_bytes = tail.len() as u64;
                }
                GenBody::Chunked {
                    chunks,
                    ext,
                    trailers,
                } => {
                    for c in chunks {
                        let ext = if *ext { ";ext=\"v\"" } else { "" };
                        bytes.extend_from_slice(format!("{:x}{ext}\r\n", c.len()).as_bytes());
                        bytes.extend_from_slice(c);
                        bytes.extend_from_slice(b"\r\n");
                        body_bytes += c.len() as u64;
                    }
                    bytes.extend_from_slice(b"0\r\n");
                    for (n, v) in trailers {
                        bytes.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
                    }
                    bytes.extend_from_slice(b"\r\n");
                    trailers_out = trailers.clone();
                }
            }
        }
        Rendered {
            bytes,
            fields: all,
            header_bytes,
            body_bytes,
            trailers: trailers_out,
        }
    }

    fn owned(list: &[(String, String)]) -> Vec<Field> {
        list.iter()
            .map(|(n, v)| (n.clone().into(), Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    fn blank_msg(
        headers: Vec<Field>,
        header_bytes: usize,
        body_bytes: u64,
        trailers: Vec<Field>,
    ) -> Message {
        Message {
            start_ns: 0,
            end_ns: 0,
            tid: 0,
            headers,
            trailers,
            body_bytes,
            header_bytes,
            truncated: false,
        }
    }

    fn field_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(("X-[A-Za-z0-9-]{1,12}", "[!-~]([ -~]{0,20}[!-~])?"), 0..5)
    }

    fn body_strategy(allow_close: bool) -> impl Strategy<Value = GenBody> {
        let data = prop::collection::vec(any::<u8>(), 1..40);
        let chunked = (
            prop::collection::vec(data.clone(), 0..4),
            any::<bool>(),
            field_strategy(),
        )
            .prop_map(|(chunks, ext, trailers)| GenBody::Chunked {
                chunks,
                ext,
                trailers,
            });
        let close_weight = if allow_close { 1 } else { 0 };
        prop_oneof![
            2 => Just(GenBody::None),
            3 => prop::collection::vec(any::<u8>(), 0..60).prop_map(GenBody::Length),
            3 => chunked,
            close_weight => Just(GenBody::Close),
        ]
    }

    fn exchange_strategy(last: bool) -> impl Strategy<Value = GenExchange> {
        let method = prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH",
        ]);
        let status = prop::sample::select(vec![200u16, 201, 204, 301, 304, 404, 500]);
        (
            method,
            "/[a-z0-9/._-]{0,20}",
            field_strategy(),
            body_strategy(false).prop_filter("no close-delimited requests", |b| {
                !matches!(b, GenBody::Close)
            }),
            prop::collection::vec(prop::sample::select(vec![100u16, 102, 103]), 0..3),
            status,
            field_strategy(),
            body_strategy(last),
        )
            .prop_map(
                |(
                    method,
                    target,
                    req_fields,
                    req_body,
                    interim,
                    status,
                    resp_fields,
                    resp_body,
                )| {
                    let target = format!("/{target}");
                    let rq = render(
                        &format!("{method} {target} HTTP/1.1\r\n"),
                        &req_fields,
                        &req_body,
                        false,
                    );
                    let mut response = Vec::new();
                    for code in &interim {
                        response.extend_from_slice(
                            format!("HTTP/1.1 {code} Interim\r\n\r\n").as_bytes(),
                        );
                    }
                    let final_at = response.len();
                    let no_body = method == "HEAD" || status == 204 || status == 304;
                    // Close-delimited needs a body-bearing response; otherwise send an explicit length.
                    let resp_body = match resp_body {
                        GenBody::Close if no_body => GenBody::None,
                        b => b,
                    };
                    let rs = render(
                        &format!("HTTP/1.1 {status} Reason Phrase\r\n"),
                        &resp_fields,
                        &resp_body,
                        no_body,
                    );
                    response.extend_from_slice(&rs.bytes);
                    // A response with no framing header and a body is close-delimited; it only
                    // occurs for the last exchange (the strategy allows Close only there).
                    let want = Exchange {
                        conn_id: CONN,
                        seq: 0,
                        request: Request {
                            method: method.into(),
                            target: target.into(),
                            version: 1,
                            msg: blank_msg(
                                owned(&rq.fields),
                                rq.header_bytes,
                                rq.body_bytes,
                                owned(&rq.trailers),
                            ),
                        },
                        response: Some(Response {
                            status,
                            reason: "Reason Phrase".into(),
                            version: 1,
                            msg: blank_msg(
                                owned(&rs.fields),
                                rs.header_bytes,
                                rs.body_bytes,
                                owned(&rs.trailers),
                            ),
                        }),
                        interim,
                    };
                    GenExchange {
                        request: rq.bytes,
                        response,
                        final_at,
                        want,
                    }
                },
            )
            .prop_filter("responses without framing must be last", move |g| {
                last || g.want.response.as_ref().is_none_or(|r| {
                    let no_body =
                        g.want.request.method == "HEAD" || r.status == 204 || r.status == 304;
                    no_body
                        || r.msg
                            .headers
                            .iter()
                            .any(|(n, _)| n == "Content-Length" || n == "Transfer-Encoding")
                })
            })
    }

    fn exchanges_strategy() -> impl Strategy<Value = Vec<GenExchange>> {
        (
            prop::collection::vec(exchange_strategy(false), 0..5),
            exchange_strategy(true),
        )
            .prop_map(|(mut v, last)| {
                v.push(last);
                v
            })
    }

    /// Syscalls over one direction's stream: (start, end) ranges.
    fn cut(len: usize, cuts: &[prop::sample::Index]) -> Vec<(usize, usize)> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
        points.push(0);
        points.push(len);
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// A piece of stream `[a, b)` as a syscall at time `t`.
    fn piece(dir: Direction, stream: &[u8], (a, b): (usize, usize), t: u64) -> Segment {
        Segment {
            conn_id: CONN,
            direction: dir,
            tid: (t % 5) as u32,
            pos: a as u64,
            data: Bytes::copy_from_slice(&stream[a..b]),
            gap_before: 0,
            enter_ns: t,
            exit_ns: t + 3,
        }
    }

    /// Fills in timing: the syscall holding a message's first byte gives start and tid, the one
    /// holding its last byte gives the end.
    fn time(msg: &mut Message, segs: &[Segment], range: (usize, usize)) {
        let holding = |at: usize| {
            segs.iter()
                .find(|s| s.pos as usize <= at && at < s.pos as usize + s.data.len())
        };
        if let (Some(first), Some(last)) = (holding(range.0), holding(range.1 - 1)) {
            msg.start_ns = stamp(first).start_ns;
            msg.tid = first.tid;
            msg.end_ns = last.exit_ns;
        }
    }

    fn strip_timing(mut v: Vec<Exchange>) -> Vec<Exchange> {
        for e in &mut v {
            for m in
                std::iter::once(&mut e.request.msg).chain(e.response.as_mut().map(|r| &mut r.msg))
            {
                m.start_ns = 0;
                m.end_ns = 0;
                m.tid = 0;
            }
        }
        v
    }

    fn garbage_chunk() -> impl Strategy<Value = Vec<u8>> {
        let snippets = prop::sample::select(vec![
            &b"GET / HTTP/1.1\r\n"[..],
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"\r\n",
            b"\n",
            b"5\r\nhello\r\n",
            b"0\r\n\r\n",
            b"ffffffffffffffff\r\n",
            b"HEAD /x HTTP/1.0\r\n\r\n",
            b"CONNECT h:1 HTTP/1.1\r\n\r\n",
            b"X-Fold: a\r\n b\r\n",
            b"\x16\x03\x01",
            b"GE",
            b"HTTP/1.",
        ]);
        prop_oneof![
            3 => prop::collection::vec(snippets, 1..6).prop_map(|v| v.concat()),
            1 => prop::collection::vec(any::<u8>(), 0..80),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Valid exchanges cut at arbitrary points parse to exactly what was generated, with
        /// each message timed by the syscalls holding its first and last bytes, and the same
        /// as when each direction arrives in one piece.
        #[test]
        fn valid_exchanges_parse_at_any_split(
            exchanges in exchanges_strategy(),
            req_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
            resp_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
            pipelined in any::<bool>(),
            side in prop::sample::select(vec![Side::Client, Side::Server, Side::Unknown]),
        ) {
            let (req_dir, resp_dir) = if side == Side::Server { (I, E) } else { (E, I) };
            let req_stream: Vec<u8> = exchanges.iter().flat_map(|g| g.request.clone()).collect();
            let resp_stream: Vec<u8> = exchanges.iter().flat_map(|g| g.response.clone()).collect();
            // Message ranges in each stream.
            let mut req_ranges = Vec::new();
            let mut resp_ranges = Vec::new();
            let (mut rq, mut rs) = (0, 0);
            for g in &exchanges {
                req_ranges.push((rq, rq + g.request.len()));
                resp_ranges.push((rs, rs + g.response.len(), rs + g.final_at));
                rq += g.request.len();
                rs += g.response.len();
            }
            let mut segs = Vec::new();
            let mut t = 1000;
            if pipelined {
                // Every request, then every response: cuts may join any messages.
                for r in cut(req_stream.len(), &req_cuts) {
                    segs.push(piece(req_dir, &req_stream, r, t));
                    t += 10;
                }
                for r in cut(resp_stream.len(), &resp_cuts) {
                    segs.push(piece(resp_dir, &resp_stream, r, t));
                    t += 10;
                }
            } else {
                // Request, response, request...: cuts inside each message only.
                for (k, g) in exchanges.iter().enumerate() {
                    for (a, b) in cut(g.request.len(), &req_cuts[..req_cuts.len().min(k * 3 + 3)]) {
                        segs.push(piece(req_dir, &req_stream, (req_ranges[k].0 + a, req_ranges[k].0 + b), t));
                        t += 10;
                    }
                    for (a, b) in cut(g.response.len(), &resp_cuts[..resp_cuts.len().min(k * 3 + 3)]) {
                        segs.push(piece(resp_dir, &resp_stream, (resp_ranges[k].0 + a, resp_ranges[k].0 + b), t));
                        t += 10;
                    }
                }
            }
            segs.retain(|s| !s.data.is_empty());
            let req_segs: Vec<Segment> = segs.iter().filter(|s| s.direction == req_dir).cloned().collect();
            let resp_segs: Vec<Segment> = segs.iter().filter(|s| s.direction == resp_dir).cloned().collect();
            let mut want = Vec::new();
            for (k, g) in exchanges.iter().enumerate() {
                let mut w = g.want.clone();
                w.seq = k as u64;
                time(&mut w.request.msg, &req_segs, (req_ranges[k].0, req_ranges[k].1));
                if let Some(r) = w.response.as_mut() {
                    time(&mut r.msg, &resp_segs, (resp_ranges[k].2, resp_ranges[k].1));
                }
                want.push(w);
            }
            let limits = Http1Limits::default();
            let (got, errors, stop, learned) = feed(side, limits, &segs, true);
            prop_assert_eq!(&errors, &Vec::<Http1Error>::new());
            prop_assert_eq!(stop, None);
            prop_assert_eq!(learned, if side == Side::Server { Side::Server } else { Side::Client });
            prop_assert_eq!(&got, &want);

            let whole = vec![
                piece(req_dir, &req_stream, (0, req_stream.len()), 1),
                piece(resp_dir, &resp_stream, (0, resp_stream.len()), 100),
            ];
            let (unsplit, unsplit_errors, _, _) = feed(side, limits, &whole, true);
            prop_assert!(unsplit_errors.is_empty());
            prop_assert_eq!(strip_timing(got), strip_timing(unsplit));
        }

        /// Arbitrary segments (HTTP fragments, random bytes, random gaps, both directions)
        /// never panic or stall, and buffering stays within the limits.
        #[test]
        fn garbage_is_survivable(
            ops in prop::collection::vec(
                (any::<bool>(), prop_oneof![6 => Just(0u64), 2 => 0u64..64, 1 => any::<u64>()], garbage_chunk(), 0u64..1000),
                0..60,
            ),
            side in prop::sample::select(vec![Side::Client, Side::Server, Side::Unknown]),
            max_header_bytes in 1usize..200,
            max_pipelined in 0usize..4,
            started in any::<bool>(),
        ) {
            let limits = Http1Limits { max_header_bytes, max_pipelined };
            let mut conn = Http1Connection::new(CONN, side, limits);
            let (mut out, mut errors) = (Vec::new(), Vec::new());
            if started {
                // Start lines first, so the garbage reaches header, body and resync states
                // rather than stopping the connection as not HTTP.
                let (req_dir, resp_dir) = if side == Side::Server { (I, E) } else { (E, I) };
                for (dir, start) in [(req_dir, &b"GET / HTTP/1.1\r\n"[..]), (resp_dir, b"HTTP/1.1 200 OK\r\n")] {
                    let seg = Segment {
                        conn_id: CONN,
                        direction: dir,
                        tid: 0,
                        pos: 0,
                        data: Bytes::from_static(start),
                        gap_before: 0,
                        enter_ns: 0,
                        exit_ns: 0,
                    };
                    conn.push(&seg, &mut Arena::default(), &mut out, &mut errors);
                }
            }
            for (k, (egress, gap, data, t)) in ops.into_iter().enumerate() {
                let seg = Segment {
                    conn_id: CONN,
                    direction: if egress { E } else { I },
                    tid: k as u32,
                    pos: 0,
                    data: Bytes::from(data),
                    gap_before: gap,
                    enter_ns: t,
                    exit_ns: t + 1,
                };
                conn.push(&seg, &mut Arena::default(), &mut out, &mut errors);
                prop_assert!(conn.egress.buf.len() <= max_header_bytes);
                prop_assert!(conn.ingress.buf.len() <= max_header_bytes);
                prop_assert!(conn.buffered() <= 2 * max_header_bytes);
                prop_assert!(conn.pending_requests() <= max_pipelined.max(1));
            }
            conn.close(&mut out, &mut errors);
            prop_assert_eq!(conn.buffered(), 0);
            prop_assert_eq!(conn.pending_requests(), 0);
            for e in &out {
                prop_assert_eq!(e.conn_id, CONN);
                prop_assert!(e.request.version <= 1);
            }
        }
    }
}
