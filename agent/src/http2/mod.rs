//! HTTP/2 exchanges (RFC 9113) from the two reassembled byte streams of one TCP connection.
//!
//! [`Http2Connection`] takes the [`Segment`]s that [`crate::streams`] delivers for one
//! connection, in syscall order, and turns them into one [`Http2Event::RequestStarted`] as
//! soon as a request's header block is decoded and one [`Http2Event::Exchange`] per stream
//! once it is over (END_STREAM both ways, RST_STREAM, GOAWAY past it, or connection close).
//! It covers the prior-knowledge preface, the HTTP/1.1 `Upgrade: h2c` path (the request that
//! carried the upgrade is stream 1), connections joined mid-way, interleaved streams, padding
//! and priority fields, CONTINUATION, trailers, 1xx responses and server push. DATA payloads
//! are counted, never stored.
//!
//! Layers: `frame` finds frames and header blocks in each direction whatever the syscall
//! boundaries; `hpack` decodes blocks with one dynamic table per direction, fed in wire order
//! (`huffman` is its string decoder); this module pairs blocks and DATA into streams.
//!
//! Lost bytes ([`Segment::gap_before`]) are placed by length. Inside a DATA payload they cost
//! nothing but the bytes; inside a header block they cost that block and the direction's HPACK
//! state; past a frame boundary the direction resynchronises on a plausible frame header. A
//! direction whose HPACK state is unknown (after a loss, or on a connection opened before the
//! agent) keeps decoding what does not depend on earlier blocks (static table entries and
//! literals: `:method`, `:status`, usually `:path` and `grpc-status` on first use, a
//! `traceparent` sent as a literal) and marks the rest unknown: an exchange then has
//! `incomplete_headers`. It never guesses: a field is either decoded exactly or left out. The
//! decoder recovers by itself once the entries from before the loss are provably evicted (see
//! `hpack`). A value whose field name refers to lost state is kept apart in
//! [`H2Message::unnamed_values`]: encoders name each new `traceparent` that way, so on such a
//! connection that is where it is.
//!
//! Every problem is a named [`Http2Error`]; memory is bounded by [`Http2Limits`]; no input
//! makes it panic ([`fuzz_feed`] is the entry point for fuzzing).
//!
//! It does not own protocol detection policy (beyond the cheap [`detect`] and
//! [`detect_midstream`]), gRPC semantics or spans.

mod frame;
mod hpack;
mod huffman;

use std::collections::BTreeMap;

use bytes::Bytes;

use self::frame::{Block, BlockKind, Frames, Reader};
use crate::field::Field;
use crate::http1::Side;
use crate::streams::{Direction, Segment};

/// Whether a direction starts with the client connection preface (`PRI * HTTP/2.0...`).
///
/// `Some(true)`: the preface; `Some(false)`: anything else; `None`: a strict prefix of it.
pub fn detect(first_bytes: &[u8]) -> Option<bool> {
    let n = first_bytes.len().min(frame::PREFACE.len());
    if first_bytes[..n] != frame::PREFACE[..n] {
        Some(false)
    } else if n == frame::PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// Whether the first bytes seen of a connection opened before the agent look like HTTP/2
/// frames: a frame header a real peer sends (known type, defined flags, sane length and
/// stream) whose frame fills the bytes exactly or is followed by another such header.
///
/// `None`: too few bytes to tell. Bytes that begin in the middle of a frame give
/// `Some(false)`; a caller may try again on a later segment.
pub fn detect_midstream(bytes: &[u8]) -> Option<bool> {
    frame::starts_with_frames(bytes)
}

/// Memory bounds of one connection; each is also the largest accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http2Limits {
    /// Largest header block (HEADERS or PUSH_PROMISE with its CONTINUATIONs, compressed)
    /// buffered per direction; a larger one is skipped and costs the direction's HPACK state.
    pub max_header_block_bytes: usize,
    /// Decoded name and value octets kept per header block; later fields are dropped (the
    /// dynamic table still follows them).
    pub max_header_list_bytes: usize,
    /// HPACK dynamic table octets kept per direction (peers use 4096 unless they announce
    /// more); entries beyond are forgotten and references to them decode as unknown.
    pub max_table_bytes: usize,
    /// Streams tracked at once; when a new one would exceed it, the oldest is emitted as it
    /// stands (min 1).
    pub max_streams: usize,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Self {
            max_header_block_bytes: 64 * 1024,
            max_header_list_bytes: 64 * 1024,
            max_table_bytes: 64 * 1024,
            max_streams: 256,
        }
    }
}

/// One HTTP/2 message (a request or a response) as observed; the body itself is never kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct H2Message {
    /// Header fields in order, pseudo-header fields (`:method`, `:path`, `:status`...) first
    /// as sent. Names are lowercase as HTTP/2 requires; values raw.
    pub headers: Vec<Field>,
    /// Fields of a trailing header block (gRPC's `grpc-status` lives here, except in a
    /// Trailers-Only response, where it is in `headers`). When a response's header block was
    /// lost, a block that ends the stream without a readable `:status` is taken for trailers.
    pub trailers: Vec<Field>,
    /// Values decoded exactly whose field name could not be (it referred to HPACK state from
    /// before a loss, or before the agent joined the connection). Encoders send each new value
    /// of a recurring field as a literal with an indexed name, so this is where a
    /// `traceparent` ends up on such a connection; which field a value belongs to is not
    /// known, and nothing here is guessed.
    pub unnamed_values: Vec<Bytes>,
    /// When the first byte of the message's first frame moved: `exit_ns` of its segment if
    /// Ingress (the read returned it), `enter_ns` if Egress (the write began).
    pub start_ns: u64,
    /// `exit_ns` of the segment holding the last byte seen of the message.
    pub end_ns: u64,
    /// Thread of the segment holding the first byte.
    pub tid: u32,
    /// DATA payload octets, padding excluded (octets lost in a gap are counted too).
    pub body_bytes: u64,
    /// The message's end (END_STREAM) was not observed.
    pub truncated: bool,
}

impl H2Message {
    /// The first value of field `name` (lowercase), in the headers, then the trailers.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .chain(&self.trailers)
            .find(|(n, _)| n == name)
            .map(|(_, v)| &v[..])
    }

    /// `:status`, if present and numeric.
    pub fn status(&self) -> Option<u16> {
        status_of(&self.headers)
    }
}

/// One stream's request and response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http2Exchange {
    pub conn_id: u64,
    pub stream_id: u32,
    pub request: H2Message,
    /// None when the stream ended (reset, GOAWAY, close) before a final response.
    pub response: Option<H2Message>,
    /// 1xx responses before the final one (100 Continue, 103 Early Hints...).
    pub interim: Vec<u16>,
    /// RST_STREAM error code, from either side.
    pub reset: Option<u32>,
    /// Some header fields could not be decoded (HPACK state unknown, a header block lost or
    /// too large): the headers hold only what was decoded exactly.
    pub incomplete_headers: bool,
    /// The request was promised by the server (PUSH_PROMISE) rather than sent by the client.
    pub pushed: bool,
}

impl Http2Exchange {
    /// `grpc-status` from the response trailers, or its headers (Trailers-Only).
    pub fn grpc_status(&self) -> Option<u32> {
        let value = self.response.as_ref()?.field("grpc-status")?;
        std::str::from_utf8(value).ok()?.parse().ok()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Http2Event {
    /// A request's header block was decoded (HEADERS with its CONTINUATIONs, or a
    /// PUSH_PROMISE): emitted while the request is in flight, before its exchange.
    RequestStarted {
        conn_id: u64,
        stream_id: u32,
        start_ns: u64,
        tid: u32,
        /// Pseudo-header fields included, in order.
        headers: Vec<Field>,
        /// See [`H2Message::unnamed_values`].
        unnamed_values: Vec<Bytes>,
        /// Some fields could not be decoded (see [`Http2Exchange::incomplete_headers`]).
        incomplete_headers: bool,
    },
    /// A stream is over.
    Exchange(Http2Exchange),
}

/// The HTTP/1.1 request that asked for `Upgrade: h2c` and got 101 Switching Protocols: it
/// becomes stream 1 (RFC 7540 §3.2), already complete; its response comes as HTTP/2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub method: String,
    pub target: String,
    /// The HTTP/1.1 header fields as sent.
    pub headers: Vec<Field>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub tid: u32,
    pub body_bytes: u64,
    /// Stream position where HTTP/2 starts in the direction carrying requests (just past
    /// the upgrade request), and in the one carrying responses (just past the 101 response
    /// head): earlier bytes of segments fed to the connection are skipped. 0 if only
    /// HTTP/2 bytes are fed.
    pub request_dir_pos: u64,
    pub response_dir_pos: u64,
}

/// Named reasons something could not be parsed; each is counted by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Http2Error {
    /// No frame found in the first 256 KiB of a direction: parsing stops.
    #[error("stream is not HTTP/2")]
    NotHttp2,
    /// The client connection preface began but did not complete; the direction resyncs.
    #[error("malformed connection preface")]
    BadPreface,
    /// A frame broke the framing rules (a fixed length, padding past the payload, a frame
    /// inside a header block, CONTINUATION without HEADERS): the direction resyncs.
    #[error("malformed frame")]
    BadFrame,
    /// Bytes were lost where a frame header was or may have been: the direction resyncs on
    /// frame headers and its HPACK state is unknown.
    #[error("bytes lost across a frame header")]
    GapInFrameHeader,
    /// Bytes were lost inside a header block: that block and the direction's HPACK state are
    /// lost; framing stays in sync.
    #[error("bytes lost inside a header block")]
    GapInHeaderBlock,
    /// A header block exceeded `max_header_block_bytes`: skipped, HPACK state lost.
    #[error("header block larger than the limit")]
    HeaderBlockTooLarge,
    /// A decoded header list exceeded `max_header_list_bytes`: later fields dropped.
    #[error("decoded header list larger than the limit")]
    HeadersTooLarge,
    /// A header block could not be decoded (bad integer, truncated field, index 0, invalid
    /// Huffman): its rest is dropped and the direction's HPACK state is unknown.
    #[error("malformed HPACK header block")]
    HpackMalformed,
    /// A header block referred to a dynamic table entry the decoder did not have although it
    /// believed it was in sync: its HPACK state is unknown from then on.
    #[error("HPACK dynamic table out of sync")]
    HpackDesync,
    /// A header block had fields that referred to dynamic table entries the decoder does not
    /// know (HPACK state unknown): those fields are missing from the exchange.
    #[error("header fields not decodable without earlier HPACK state")]
    HeadersIncomplete,
    /// A header block for a stream whose start was not seen (opened before the agent, or
    /// lost): ignored.
    #[error("frame for a stream whose start was not seen")]
    UnknownStream,
    /// More than `max_streams` streams at once: the oldest was emitted as it stood.
    #[error("too many concurrent streams")]
    StreamLimit,
    /// The connection closed with a frame or a message unfinished.
    #[error("connection closed mid-message")]
    Truncated,
}

impl Http2Error {
    pub const ALL: [Http2Error; 13] = [
        Self::NotHttp2,
        Self::BadPreface,
        Self::BadFrame,
        Self::GapInFrameHeader,
        Self::GapInHeaderBlock,
        Self::HeaderBlockTooLarge,
        Self::HeadersTooLarge,
        Self::HpackMalformed,
        Self::HpackDesync,
        Self::HeadersIncomplete,
        Self::UnknownStream,
        Self::StreamLimit,
        Self::Truncated,
    ];

    /// Stable snake_case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotHttp2 => "not_http2",
            Self::BadPreface => "bad_preface",
            Self::BadFrame => "bad_frame",
            Self::GapInFrameHeader => "gap_in_frame_header",
            Self::GapInHeaderBlock => "gap_in_header_block",
            Self::HeaderBlockTooLarge => "header_block_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::HpackMalformed => "hpack_malformed",
            Self::HpackDesync => "hpack_desync",
            Self::HeadersIncomplete => "headers_incomplete",
            Self::UnknownStream => "unknown_stream",
            Self::StreamLimit => "stream_limit",
            Self::Truncated => "truncated",
        }
    }
}

/// Where and when a frame's first byte was seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stamp {
    start_ns: u64,
    tid: u32,
}

/// SETTINGS parameters this parser uses (RFC 9113 §6.5.2).
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// Largest frame length the protocol allows (2^24 - 1).
const MAX_FRAME_LEN: u32 = (1 << 24) - 1;

/// How far above the highest stream id seen a frame found by scanning may be: new streams in
/// the bytes lost (ids grow by 2 per stream).
const STREAM_ID_WINDOW: u64 = 2 * 1024;

/// Interim responses kept per stream.
const MAX_INTERIM: usize = 8;

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

fn other(dir: Direction) -> Direction {
    match dir {
        Direction::Egress => Direction::Ingress,
        Direction::Ingress => Direction::Egress,
    }
}

/// The direction carrying requests under `side`, if known.
fn request_dir(side: Side) -> Option<Direction> {
    match side {
        Side::Server => Some(Direction::Ingress),
        Side::Client => Some(Direction::Egress),
        Side::Unknown => None,
    }
}

fn side_with_requests_on(dir: Direction) -> Side {
    match dir {
        Direction::Ingress => Side::Server,
        Direction::Egress => Side::Client,
    }
}

fn status_of(fields: &[Field]) -> Option<u16> {
    let value = fields.iter().find(|(n, _)| n == ":status")?;
    std::str::from_utf8(&value.1).ok()?.parse().ok()
}

fn has_field(fields: &[Field], name: &str) -> bool {
    fields.iter().any(|(n, _)| n == name)
}

/// A message being observed.
#[derive(Debug)]
struct Msg {
    m: H2Message,
    ended: bool,
}

impl Msg {
    fn new(start: Stamp, end_ns: u64, fields: Fields, ended: bool) -> Self {
        Self {
            m: H2Message {
                headers: fields.fields,
                trailers: Vec::new(),
                unnamed_values: fields.unnamed,
                start_ns: start.start_ns,
                end_ns,
                tid: start.tid,
                body_bytes: 0,
                truncated: false,
            },
            ended,
        }
    }

    fn into_message(mut self) -> H2Message {
        self.m.truncated = !self.ended;
        self.m
    }

    /// A later block of the same message: trailers.
    fn add_trailers(&mut self, fields: Fields, end_ns: u64, end_stream: bool) {
        self.m.trailers.extend(fields.fields);
        self.m.unnamed_values.extend(fields.unnamed);
        self.m.end_ns = end_ns;
        self.ended |= end_stream;
    }
}

/// A decoded header block.
#[derive(Default)]
struct Fields {
    fields: Vec<Field>,
    unnamed: Vec<Bytes>,
    /// Some fields could not be decoded.
    incomplete: bool,
}

#[derive(Debug)]
struct Stream {
    /// The direction that carried the request (the client's writes).
    req_dir: Direction,
    pushed: bool,
    request: Msg,
    response: Option<Msg>,
    interim: Vec<u16>,
    reset: Option<u32>,
    incomplete: bool,
}

impl Stream {
    fn over(&self) -> bool {
        self.reset.is_some()
            || (self.request.ended && self.response.as_ref().is_some_and(|r| r.ended))
    }

    /// Whoever opened the stream: the client, or the server for a pushed one.
    fn initiator(&self) -> Direction {
        if self.pushed {
            other(self.req_dir)
        } else {
            self.req_dir
        }
    }
}

/// Connection state shared by both directions.
struct State {
    conn_id: u64,
    side: Side,
    limits: Http2Limits,
    /// Decoders of the blocks each direction carries.
    hpack: [hpack::Decoder; 2],
    /// Largest frame each direction's receiver announced it accepts (for resync plausibility).
    max_frame: [u32; 2],
    /// By stream id: the oldest first.
    streams: BTreeMap<u32, Stream>,
    /// Highest stream id the client opened: lower ids not tracked are over (or predate us).
    last_client_stream: u32,
    /// Highest stream id in any frame read.
    max_stream_seen: u32,
    /// The upgrade request's RequestStarted, emitted with the first push.
    pending: Option<Http2Event>,
    stop: bool,
}

/// The state plus where results go, as the frame readers see it.
struct Sink<'a> {
    st: &'a mut State,
    out: &'a mut Vec<Http2Event>,
    errors: &'a mut Vec<Http2Error>,
}

/// HTTP/2 parser for one TCP connection.
pub struct Http2Connection {
    st: State,
    egress: Reader,
    ingress: Reader,
    closed: bool,
}

impl Http2Connection {
    /// A connection seen from its start: the client preface begins one direction (with
    /// `Side::Unknown`, whichever sends it is the client).
    pub fn new(conn_id: u64, side: Side, limits: Http2Limits) -> Self {
        let max_block = limits.max_header_block_bytes;
        Self {
            st: State::new(conn_id, side, limits, false),
            egress: Reader::new(Direction::Egress, max_block),
            ingress: Reader::new(Direction::Ingress, max_block),
            closed: false,
        }
    }

    /// A connection joined mid-way (opened before the agent): both directions look for a frame
    /// header first, and both HPACK states start unknown.
    pub fn midstream(conn_id: u64, side: Side, limits: Http2Limits) -> Self {
        let max_block = limits.max_header_block_bytes;
        Self {
            st: State::new(conn_id, side, limits, true),
            egress: Reader::joined(Direction::Egress, max_block),
            ingress: Reader::joined(Direction::Ingress, max_block),
            closed: false,
        }
    }

    /// After an HTTP/1.1 `Upgrade: h2c` request answered by 101: that request is stream 1.
    /// `side` must be known (the HTTP/1 parser learns it); with `Side::Unknown` the positions
    /// in `request` cannot be placed and are ignored.
    pub fn upgraded(
        conn_id: u64,
        side: Side,
        limits: Http2Limits,
        request: UpgradeRequest,
    ) -> Self {
        let mut conn = Self::new(conn_id, side, limits);
        let req_dir = request_dir(side);
        if let Some(dir) = req_dir {
            let (req_pos, resp_pos) = (request.request_dir_pos, request.response_dir_pos);
            let (egress_pos, ingress_pos) = match dir {
                Direction::Egress => (req_pos, resp_pos),
                Direction::Ingress => (resp_pos, req_pos),
            };
            let max_block = limits.max_header_block_bytes;
            conn.egress = Reader::new(Direction::Egress, max_block).starting_at(egress_pos);
            conn.ingress = Reader::new(Direction::Ingress, max_block).starting_at(ingress_pos);
        }
        let headers = upgrade_headers(&request);
        let start = Stamp {
            start_ns: request.start_ns,
            tid: request.tid,
        };
        let fields = Fields {
            fields: headers.clone(),
            unnamed: Vec::new(),
            incomplete: false,
        };
        let mut msg = Msg::new(start, request.end_ns, fields, true);
        msg.m.body_bytes = request.body_bytes;
        conn.st.pending = Some(Http2Event::RequestStarted {
            conn_id,
            stream_id: 1,
            start_ns: request.start_ns,
            tid: request.tid,
            headers,
            unnamed_values: Vec::new(),
            incomplete_headers: false,
        });
        conn.st.streams.insert(
            1,
            Stream {
                req_dir: req_dir.unwrap_or(Direction::Egress),
                pushed: false,
                request: msg,
                response: None,
                interim: Vec::new(),
                reset: None,
                incomplete: false,
            },
        );
        conn.st.last_client_stream = 1;
        conn
    }

    /// Feeds one segment; events go to `out`, problems to `errors`.
    ///
    /// Segments of each direction must come in stream order; across directions, in the order
    /// the syscalls happened. A segment with empty `data` may carry just a gap. Ignored once
    /// done or closed.
    pub fn push(
        &mut self,
        segment: &Segment,
        out: &mut Vec<Http2Event>,
        errors: &mut Vec<Http2Error>,
    ) {
        if self.closed || self.st.stop {
            return;
        }
        out.extend(self.st.pending.take());
        let mut sink = Sink {
            st: &mut self.st,
            out,
            errors,
        };
        match segment.direction {
            Direction::Egress => self.egress.push(segment, &mut sink),
            Direction::Ingress => self.ingress.push(segment, &mut sink),
        }
        if self.st.stop {
            self.egress.release();
            self.ingress.release();
            self.st.streams.clear();
        }
    }

    /// The connection closed: every stream still open is emitted, messages not ended marked
    /// truncated.
    pub fn close(&mut self, out: &mut Vec<Http2Event>, errors: &mut Vec<Http2Error>) {
        if self.closed {
            return;
        }
        self.closed = true;
        if self.st.stop {
            return;
        }
        out.extend(self.st.pending.take());
        let mut sink = Sink {
            st: &mut self.st,
            out,
            errors,
        };
        let mut cut = self.egress.close(&mut sink);
        cut |= self.ingress.close(&mut sink);
        let streams = std::mem::take(&mut self.st.streams);
        for (id, s) in streams {
            if !s.request.ended || !s.response.as_ref().is_some_and(|r| r.ended) {
                errors.push(Http2Error::Truncated);
                cut = false;
            }
            emit(self.st.conn_id, id, s, out);
        }
        // A frame cut short with no message left open is counted once.
        if cut {
            errors.push(Http2Error::Truncated);
        }
    }

    /// True once the connection is known not to be HTTP/2: stop feeding it.
    pub fn is_done(&self) -> bool {
        self.st.stop
    }

    /// The side given at creation, or the one learned from the preface or the first header
    /// blocks.
    pub fn side(&self) -> Side {
        self.st.side
    }

    /// Streams open (at most `max_streams`).
    pub fn open_streams(&self) -> usize {
        self.st.streams.len()
    }

    /// Bytes buffered by the framing (partial header blocks, control payloads): at most
    /// `max_header_block_bytes` plus a few hundred per direction.
    pub fn buffered(&self) -> usize {
        self.egress.buffered() + self.ingress.buffered()
    }

    /// Octets held by the two HPACK dynamic tables (at most `max_table_bytes` each).
    pub fn table_bytes(&self) -> usize {
        self.st.hpack.iter().map(hpack::Decoder::held).sum()
    }

    /// Whether the HPACK state of the blocks `dir` carries is fully known.
    pub fn hpack_synced(&self, dir: Direction) -> bool {
        self.st.hpack[index(dir)].synced()
    }
}

impl State {
    fn new(conn_id: u64, side: Side, limits: Http2Limits, joined: bool) -> Self {
        let decoder = || {
            if joined {
                hpack::Decoder::joined(limits.max_table_bytes)
            } else {
                hpack::Decoder::new(limits.max_table_bytes)
            }
        };
        Self {
            conn_id,
            side,
            limits: Http2Limits {
                max_streams: limits.max_streams.max(1),
                ..limits
            },
            hpack: [decoder(), decoder()],
            max_frame: [frame::DEFAULT_MAX_FRAME; 2],
            streams: BTreeMap::new(),
            last_client_stream: 0,
            max_stream_seen: 0,
            pending: None,
            stop: false,
        }
    }
}

fn emit(conn_id: u64, stream_id: u32, s: Stream, out: &mut Vec<Http2Event>) {
    out.push(Http2Event::Exchange(Http2Exchange {
        conn_id,
        stream_id,
        request: s.request.into_message(),
        response: s.response.map(Msg::into_message),
        interim: s.interim,
        reset: s.reset,
        incomplete_headers: s.incomplete,
        pushed: s.pushed,
    }));
}

/// Stream 1's request fields from the HTTP/1.1 upgrade request: pseudo-header fields as an
/// HTTP/2 client would send them, then the header fields (lowercased) minus the ones that are
/// connection-specific in HTTP/2 (RFC 9113 §8.2.2) and Host (now `:authority`).
fn upgrade_headers(r: &UpgradeRequest) -> Vec<Field> {
    const DROP: &[&str] = &[
        "host",
        "connection",
        "upgrade",
        "http2-settings",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
    ];
    let mut fields: Vec<Field> = vec![
        (":method".into(), Bytes::from(r.method.clone())),
        (":scheme".into(), Bytes::from_static(b"http")),
        (":path".into(), Bytes::from(r.target.clone())),
    ];
    if let Some((_, host)) = r
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        fields.push((":authority".into(), host.clone()));
    }
    for (name, value) in &r.headers {
        let name = name.to_ascii_lowercase();
        if !DROP.contains(&name.as_str()) {
            fields.push((name.into(), value.clone()));
        }
    }
    fields
}

impl Sink<'_> {
    /// Emits the stream if it is over.
    fn settle(&mut self, id: u32) {
        if self.st.streams.get(&id).is_some_and(Stream::over)
            && let Some(s) = self.st.streams.remove(&id)
        {
            emit(self.st.conn_id, id, s, self.out);
        }
    }

    fn open(&mut self, id: u32, stream: Stream) {
        if self.st.streams.len() >= self.st.limits.max_streams {
            // Usually the other direction is not being captured; emitting the oldest bounds
            // memory.
            if let Some((old, s)) = self.st.streams.pop_first() {
                self.errors.push(Http2Error::StreamLimit);
                emit(self.st.conn_id, old, s, self.out);
            }
        }
        self.out.push(Http2Event::RequestStarted {
            conn_id: self.st.conn_id,
            stream_id: id,
            start_ns: stream.request.m.start_ns,
            tid: stream.request.m.tid,
            headers: stream.request.m.headers.clone(),
            unnamed_values: stream.request.m.unnamed_values.clone(),
            incomplete_headers: stream.incomplete,
        });
        self.st.streams.insert(id, stream);
    }

    /// Decodes a block with the direction's HPACK state; counts what went wrong.
    fn decode(&mut self, dir: Direction, bytes: Option<&[u8]>) -> Fields {
        let Some(bytes) = bytes else {
            return Fields {
                fields: Vec::new(),
                unnamed: Vec::new(),
                incomplete: true,
            };
        };
        let limit = self.st.limits.max_header_list_bytes;
        let decoded = self.st.hpack[index(dir)].decode(bytes, limit);
        match decoded.problem {
            Some(hpack::Problem::Malformed) => self.errors.push(Http2Error::HpackMalformed),
            Some(hpack::Problem::Desync) => self.errors.push(Http2Error::HpackDesync),
            None if decoded.unknown > 0 => self.errors.push(Http2Error::HeadersIncomplete),
            None => {}
        }
        if decoded.too_large {
            self.errors.push(Http2Error::HeadersTooLarge);
        }
        Fields {
            incomplete: !decoded.complete(),
            fields: decoded.fields,
            unnamed: decoded.unnamed,
        }
    }

    /// Which direction carries requests; learned from the first block that tells if the side
    /// is unknown (a request has `:method`, a response `:status`).
    fn request_dir_for(&mut self, dir: Direction, fields: &[Field]) -> Option<Direction> {
        if let Some(d) = request_dir(self.st.side) {
            return Some(d);
        }
        let req = if has_field(fields, ":status") {
            other(dir)
        } else if has_field(fields, ":method") {
            dir
        } else {
            return None;
        };
        self.st.side = side_with_requests_on(req);
        Some(req)
    }

    fn on_headers(&mut self, dir: Direction, b: &Block<'_>, end_stream: bool) {
        let fields = self.decode(dir, b.bytes);
        let incomplete = fields.incomplete;
        let id = b.stream;
        let known = self.st.streams.get(&id).map(|s| s.req_dir);
        let Some(req_dir) = known.or_else(|| self.request_dir_for(dir, &fields.fields)) else {
            // Trailers, or a block too damaged to tell, before anything told the side.
            self.errors.push(Http2Error::UnknownStream);
            return;
        };
        if dir == req_dir {
            if let Some(s) = self.st.streams.get_mut(&id) {
                // A second block from the client: trailers.
                if s.pushed {
                    return;
                }
                s.request.add_trailers(fields, b.end_ns, end_stream);
                s.incomplete |= incomplete;
                self.settle(id);
                return;
            }
            // A new request has pseudo-header fields; a complete block without them is the
            // trailers of a stream opened before we started following.
            let is_request = has_field(&fields.fields, ":method") || incomplete;
            if id <= self.st.last_client_stream || !is_request {
                self.errors.push(Http2Error::UnknownStream);
                return;
            }
            self.st.last_client_stream = id;
            let request = Msg::new(b.start, b.end_ns, fields, end_stream);
            self.open(
                id,
                Stream {
                    req_dir,
                    pushed: false,
                    request,
                    response: None,
                    interim: Vec::new(),
                    reset: None,
                    incomplete,
                },
            );
            return;
        }
        let Some(s) = self.st.streams.get_mut(&id) else {
            self.errors.push(Http2Error::UnknownStream);
            return;
        };
        s.incomplete |= incomplete;
        match s.response.as_mut() {
            Some(r) => r.add_trailers(fields, b.end_ns, end_stream),
            None => match status_of(&fields.fields) {
                Some(status @ 100..=199) if status != 101 => {
                    if s.interim.len() < MAX_INTERIM {
                        s.interim.push(status);
                    }
                }
                // A block ending the stream without a readable :status follows response
                // headers that were lost: it is the trailers.
                None if end_stream => {
                    let mut response = Msg::new(b.start, b.end_ns, Fields::default(), false);
                    response.add_trailers(fields, b.end_ns, true);
                    s.response = Some(response);
                    s.incomplete = true;
                }
                _ => s.response = Some(Msg::new(b.start, b.end_ns, fields, end_stream)),
            },
        }
        self.settle(id);
    }

    fn on_push_promise(&mut self, dir: Direction, b: &Block<'_>, promised: u32) {
        // The block is decoded whatever becomes of it: it updates the HPACK state.
        let fields = self.decode(dir, b.bytes);
        let incomplete = fields.incomplete;
        if self.st.side == Side::Unknown {
            // Only servers push.
            self.st.side = side_with_requests_on(other(dir));
        }
        if promised == 0
            || self.st.streams.contains_key(&promised)
            || !self.st.streams.contains_key(&b.stream)
        {
            self.errors.push(Http2Error::UnknownStream);
            return;
        }
        let request = Msg::new(b.start, b.end_ns, fields, true);
        self.open(
            promised,
            Stream {
                req_dir: other(dir),
                pushed: true,
                request,
                response: None,
                interim: Vec::new(),
                reset: None,
                incomplete,
            },
        );
    }
}

impl Frames for Sink<'_> {
    fn block(&mut self, dir: Direction, block: Block<'_>) {
        match block.kind {
            BlockKind::Headers { end_stream } => self.on_headers(dir, &block, end_stream),
            BlockKind::PushPromise { promised } => self.on_push_promise(dir, &block, promised),
        }
    }

    fn data(&mut self, dir: Direction, stream: u32, bytes: u64, end: Option<bool>, exit_ns: u64) {
        let Some(s) = self.st.streams.get_mut(&stream) else {
            return;
        };
        let msg = if dir == s.req_dir && !s.pushed {
            Some(&mut s.request)
        } else if dir != s.req_dir {
            s.response.as_mut()
        } else {
            None
        };
        let Some(msg) = msg else {
            return;
        };
        msg.m.body_bytes = msg.m.body_bytes.saturating_add(bytes);
        msg.m.end_ns = exit_ns;
        if end == Some(true) {
            msg.ended = true;
            self.settle(stream);
        }
    }

    fn rst_stream(&mut self, _dir: Direction, stream: u32, code: u32) {
        let Some(s) = self.st.streams.get_mut(&stream) else {
            return;
        };
        s.reset = Some(code);
        self.settle(stream);
    }

    fn goaway(&mut self, dir: Direction, last_stream: u32) {
        // Streams the receiver of the GOAWAY opened above `last_stream` were not processed.
        let gone: Vec<u32> = self
            .st
            .streams
            .range(last_stream.saturating_add(1)..)
            .filter(|(_, s)| s.initiator() != dir)
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(s) = self.st.streams.remove(&id) {
                emit(self.st.conn_id, id, s, self.out);
            }
        }
    }

    fn setting(&mut self, dir: Direction, id: u16, value: u32) {
        // A peer's settings govern what it receives: the other direction.
        let peer = index(other(dir));
        match id {
            SETTINGS_HEADER_TABLE_SIZE => self.st.hpack[peer].announce(value),
            SETTINGS_MAX_FRAME_SIZE => {
                self.st.max_frame[peer] = self.st.max_frame[peer].max(value.min(MAX_FRAME_LEN));
            }
            _ => {}
        }
    }

    fn hpack_lost(&mut self, dir: Direction) {
        self.st.hpack[index(dir)].lose();
    }

    fn preface(&mut self, dir: Direction) {
        if self.st.side == Side::Unknown {
            self.st.side = side_with_requests_on(dir);
        }
    }

    fn not_http2(&mut self) {
        self.st.stop = true;
    }

    fn error(&mut self, error: Http2Error) {
        self.errors.push(error);
    }

    fn max_frame_len(&self, dir: Direction) -> u32 {
        self.st.max_frame[index(dir)]
    }

    fn plausible_stream(&self, dir: Direction, h: &frame::FrameHeader) -> bool {
        let (seen, id) = (self.st.max_stream_seen, h.stream);
        if id == 0 || seen == 0 {
            return true;
        }
        if u64::from(id) > u64::from(seen) + STREAM_ID_WINDOW {
            return false;
        }
        if !h.is_headers() || self.st.streams.contains_key(&id) {
            return true;
        }
        // A block on a stream not open: a new request, on an odd id (even ones are pushed
        // and opened by PUSH_PROMISE).
        request_dir(self.st.side).is_none_or(|d| d == dir) && id % 2 == 1
    }

    fn saw_stream(&mut self, stream: u32) {
        self.st.max_stream_seen = self.st.max_stream_seen.max(stream);
    }
}

/// Fuzzing entry point: drives a connection with arbitrary bytes, gaps and segmentation and
/// checks its memory bounds. `data`: one mode byte (connection kind, side), then records of a
/// control byte (bit 0: direction, bit 1: a gap follows as one byte, bit 2: close now), a
/// length byte and that many bytes.
#[doc(hidden)]
pub fn fuzz_feed(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let limits = Http2Limits {
        max_header_block_bytes: 512,
        max_header_list_bytes: 512,
        max_table_bytes: 512,
        max_streams: 4,
    };
    let side = match mode & 3 {
        0 => Side::Server,
        1 => Side::Client,
        _ => Side::Unknown,
    };
    let mut conn = match (mode >> 2) % 3 {
        0 => Http2Connection::new(1, side, limits),
        1 => Http2Connection::midstream(1, side, limits),
        _ => Http2Connection::upgraded(
            1,
            side,
            limits,
            UpgradeRequest {
                method: "GET".into(),
                target: "/".into(),
                headers: vec![("Host".into(), Bytes::from_static(b"h"))],
                start_ns: 0,
                end_ns: 0,
                tid: 0,
                body_bytes: 0,
                request_dir_pos: u64::from(mode >> 5),
                response_dir_pos: 0,
            },
        ),
    };
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    let mut pos = [0u64; 2];
    let mut t = 0u64;
    while let Some((&ctl, tail)) = rest.split_first() {
        rest = tail;
        let direction = if ctl & 1 == 0 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let mut gap = 0;
        if ctl & 2 != 0
            && let Some((&g, tail)) = rest.split_first()
        {
            gap = u64::from(g);
            rest = tail;
        }
        let len = rest
            .first()
            .map_or(0, |&n| usize::from(n))
            .min(rest.len().saturating_sub(1));
        let bytes = rest.get(1..1 + len).unwrap_or_default();
        rest = rest.get(1 + len..).unwrap_or_default();
        let k = index(direction);
        pos[k] += gap;
        t += 10;
        let seg = Segment {
            conn_id: 1,
            direction,
            tid: 1,
            pos: pos[k],
            data: Bytes::copy_from_slice(bytes),
            gap_before: gap,
            enter_ns: t,
            exit_ns: t + 5,
        };
        pos[k] += bytes.len() as u64;
        conn.push(&seg, &mut out, &mut errors);
        assert!(conn.buffered() <= 2 * (limits.max_header_block_bytes + 6 * 32 + 8));
        assert!(conn.open_streams() <= limits.max_streams);
        assert!(conn.table_bytes() <= 2 * limits.max_table_bytes);
        if ctl & 4 != 0 {
            break;
        }
    }
    conn.close(&mut out, &mut errors);
    assert_eq!(conn.open_streams(), 0);
    for event in &out {
        if let Http2Event::RequestStarted { headers, .. } = event {
            let list: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
            assert!(list <= limits.max_header_list_bytes.max(64));
        }
    }
}

#[cfg(test)]
mod tests;
