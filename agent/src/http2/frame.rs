//! HTTP/2 framing (RFC 9113 §3.4, §4, §6) of one direction of a connection.
//!
//! A [`Reader`] takes that direction's segments in stream order, finds frames in them
//! whatever the syscall boundaries (a frame split over many segments, many frames in one),
//! and reports what the connection layer needs through [`Frames`]: complete header blocks
//! (HEADERS or PUSH_PROMISE with their CONTINUATIONs, padding and priority fields stripped),
//! DATA progress (counted, never stored), RST_STREAM, GOAWAY and SETTINGS.
//!
//! Lost bytes are placed by length: a gap inside a frame's payload leaves the framing intact
//! (a DATA frame just counts the lost bytes; a header block is lost, and with it the HPACK
//! state of the direction). A gap that reaches past the frame, or a frame header that breaks
//! the rules, loses the framing: the reader scans for a plausible frame header (a known type,
//! defined flags, a sane length, a stream id near those seen) followed by another one, or
//! filling a whole syscall. A candidate whose successor is not in the data yet (at a syscall
//! start, where writers begin frames, or ending exactly where the data ends) is read on
//! probation: what it delivers is held until the next frame header is plausible too, and
//! dropped otherwise.

use super::{Http2Error, Stamp};
use crate::streams::{Direction, Segment};

/// The client connection preface (RFC 9113 §3.4).
pub(super) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(super) const HEADER_LEN: usize = 9;

/// SETTINGS_MAX_FRAME_SIZE's initial value: frames are assumed no larger when resynchronising
/// unless the receiver announced more.
pub(super) const DEFAULT_MAX_FRAME: u32 = 16_384;

/// A direction that never produced a frame is given up after scanning this much.
const NEVER_SYNCED_SCAN_LIMIT: u64 = 256 * 1024;

/// Most SETTINGS parameters read from one frame (real peers send fewer than ten).
const MAX_SETTINGS: usize = 32;

/// Frame types (RFC 9113 §6).
mod ty {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FrameHeader {
    pub len: u32,
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
    /// The reserved bit before the stream id.
    pub reserved: bool,
}

impl FrameHeader {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            ty: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5] & 0x7f, b[6], b[7], b[8]]),
            reserved: b[5] & 0x80 != 0,
        }
    }

    fn at(bytes: &[u8], at: usize) -> Option<Self> {
        let b = bytes.get(at..at.checked_add(HEADER_LEN)?)?;
        Some(Self::parse(b.try_into().ok()?))
    }

    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    pub fn is_headers(&self) -> bool {
        self.ty == ty::HEADERS
    }

    /// Whether `next` may follow this frame: a header block left open must go on with a
    /// CONTINUATION on its stream, and only then (RFC 9113 §6.10).
    fn may_precede(&self, next: &FrameHeader) -> bool {
        let open = matches!(self.ty, ty::HEADERS | ty::PUSH_PROMISE | ty::CONTINUATION)
            && !self.has(flag::END_HEADERS);
        let continues = next.ty == ty::CONTINUATION && next.stream == self.stream;
        open == continues
    }

    /// Payload octets before the content: pad length, stream dependency and weight, promised
    /// stream id.
    fn prefix_len(&self) -> u32 {
        let padded = u32::from(self.has(flag::PADDED));
        match self.ty {
            ty::DATA => padded,
            ty::HEADERS => padded + if self.has(flag::PRIORITY) { 5 } else { 0 },
            ty::PUSH_PROMISE => padded + 4,
            _ => 0,
        }
    }

    /// Whether a peer could have sent this (fixed lengths, stream 0 rules, room for the
    /// prefix). Unknown types are fine: they are skipped (RFC 9113 §4.1).
    fn valid(&self) -> bool {
        let on_stream = self.stream != 0;
        match self.ty {
            ty::DATA | ty::HEADERS | ty::PUSH_PROMISE | ty::CONTINUATION => {
                on_stream && self.len >= self.prefix_len()
            }
            ty::PRIORITY => on_stream && self.len == 5,
            ty::RST_STREAM => on_stream && self.len == 4,
            ty::SETTINGS => {
                !on_stream && self.len.is_multiple_of(6) && (!self.has(flag::ACK) || self.len == 0)
            }
            ty::PING => !on_stream && self.len == 8,
            ty::GOAWAY => !on_stream && self.len >= 8,
            ty::WINDOW_UPDATE => self.len == 4,
            _ => true,
        }
    }

    /// Whether these 9 bytes look like a frame header a real peer sends: a known type, only
    /// defined flags, no reserved bit, a length within `max_len`. Used to find frames again
    /// after a loss, where a false positive would feed garbage to the parser.
    pub fn plausible(&self, max_len: u32) -> bool {
        let allowed = match self.ty {
            ty::DATA => flag::END_STREAM | flag::PADDED,
            ty::HEADERS => flag::END_STREAM | flag::END_HEADERS | flag::PADDED | flag::PRIORITY,
            ty::PUSH_PROMISE => flag::END_HEADERS | flag::PADDED,
            ty::SETTINGS | ty::PING => flag::ACK,
            ty::CONTINUATION => flag::END_HEADERS,
            ty::PRIORITY | ty::RST_STREAM | ty::GOAWAY | ty::WINDOW_UPDATE => 0,
            _ => return false,
        };
        !self.reserved && self.flags & !allowed == 0 && self.len <= max_len && self.valid()
    }
}

/// What a complete header block was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BlockKind {
    Headers { end_stream: bool },
    PushPromise { promised: u32 },
}

/// A header block as the reader delivers it.
pub(super) struct Block<'a> {
    pub kind: BlockKind,
    pub stream: u32,
    /// None: the block's bytes were lost (gap, too large, broken framing); the reader has
    /// already reported why and that the direction's HPACK state is unknown.
    pub bytes: Option<&'a [u8]>,
    /// The first byte of the HEADERS or PUSH_PROMISE frame.
    pub start: Stamp,
    /// `exit_ns` of the segment holding the block's last byte.
    pub end_ns: u64,
}

/// The connection layer, as the reader sees it.
pub(super) trait Frames {
    fn block(&mut self, dir: Direction, block: Block<'_>);
    /// `bytes` more DATA payload on `stream`; `end` at the frame's end with its END_STREAM.
    fn data(&mut self, dir: Direction, stream: u32, bytes: u64, end: Option<bool>, exit_ns: u64);
    fn rst_stream(&mut self, dir: Direction, stream: u32, code: u32);
    fn goaway(&mut self, dir: Direction, last_stream: u32);
    fn setting(&mut self, dir: Direction, id: u16, value: u32);
    /// The direction's HPACK state is unknown from here on (header bytes may be lost).
    fn hpack_lost(&mut self, dir: Direction);
    /// This direction sent the client connection preface.
    fn preface(&mut self, dir: Direction);
    /// The direction is not HTTP/2 after all: stop the connection.
    fn not_http2(&mut self);
    fn error(&mut self, error: Http2Error);
    /// Largest frame the receiver of `dir` accepts, as far as known.
    fn max_frame_len(&self, dir: Direction) -> u32;
    /// Whether a frame found by scanning in `dir` fits the streams known (ids grow slowly, a
    /// request opens an odd one, a response answers an open one).
    fn plausible_stream(&self, dir: Direction, h: &FrameHeader) -> bool;
    /// A frame on `stream` was read.
    fn saw_stream(&mut self, stream: u32);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the first frame: the client preface may come first (`matched` octets so far).
    Start { matched: usize },
    /// Reading a frame header into `hdr`.
    Header,
    /// Inside the current frame's payload.
    Payload,
    /// Framing lost: looking for a plausible frame header.
    Scan,
    /// Not HTTP/2: everything is ignored.
    Dead,
}

/// The frame being read.
#[derive(Clone, Copy, Debug)]
struct Frame {
    h: FrameHeader,
    /// Payload octets consumed (seen or lost).
    pos: u32,
    prefix: [u8; 6],
    /// Where the content ends (before padding); the frame length until the prefix is read.
    content_end: u32,
    /// Part of the payload was lost, or it broke the rules: its content is not usable.
    spoiled: bool,
}

/// A header block being assembled from HEADERS/PUSH_PROMISE and CONTINUATION frames.
struct Building {
    kind: BlockKind,
    stream: u32,
    /// None once the block is lost (its cause reported).
    buf: Option<Vec<u8>>,
    start: Stamp,
}

/// What a tentative frame delivers once confirmed.
#[derive(Default)]
struct Held {
    /// DATA: stream, payload octets, END_STREAM once the frame ended, last `exit_ns`.
    data: Option<(u32, u64, Option<bool>, u64)>,
    /// A header block completed by the frame, with its `end_ns`.
    block: Option<(Building, u64)>,
}

/// Framing state of one direction.
pub(super) struct Reader {
    dir: Direction,
    state: State,
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    frame: Frame,
    /// Control frame payload (SETTINGS, RST_STREAM, GOAWAY), bounded by the type.
    ctl: Vec<u8>,
    block: Option<Building>,
    /// Spare block buffer kept between blocks (small capacities only).
    spare: Vec<u8>,
    frame_start: Stamp,
    /// The current frame was found by scanning where nothing confirms it (at a syscall
    /// start, or ending where the data does): what it would deliver waits in `held` until the
    /// next frame header turns out plausible too.
    tentative: bool,
    held: Held,
    last_exit_ns: u64,
    /// Bytes before this stream position are not HTTP/2 (an upgraded HTTP/1.1 connection).
    skip_until: u64,
    ever_synced: bool,
    never_synced_scan: u64,
    max_block: usize,
}

impl Reader {
    /// A direction read from its first byte (the preface, if it carries one, comes first).
    pub fn new(dir: Direction, max_block: usize) -> Self {
        Self {
            dir,
            state: State::Start { matched: 0 },
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            frame: Frame {
                h: FrameHeader::parse(&[0; HEADER_LEN]),
                pos: 0,
                prefix: [0; 6],
                content_end: 0,
                spoiled: false,
            },
            ctl: Vec::new(),
            block: None,
            spare: Vec::new(),
            frame_start: Stamp::default(),
            tentative: false,
            held: Held::default(),
            last_exit_ns: 0,
            skip_until: 0,
            ever_synced: false,
            never_synced_scan: 0,
            max_block,
        }
    }

    /// A direction joined mid-stream: it starts by looking for a frame header.
    pub fn joined(dir: Direction, max_block: usize) -> Self {
        Self {
            state: State::Scan,
            ..Self::new(dir, max_block)
        }
    }

    /// HTTP/2 starts at stream position `pos` (after an HTTP/1.1 upgrade).
    pub fn starting_at(mut self, pos: u64) -> Self {
        self.skip_until = pos;
        self
    }

    /// Bytes held: a partial header block and control payload.
    pub fn buffered(&self) -> usize {
        let block = self
            .block
            .as_ref()
            .and_then(|b| b.buf.as_ref())
            .map_or(0, Vec::len);
        block + self.ctl.len()
    }

    pub fn release(&mut self) {
        self.block = None;
        self.ctl = Vec::new();
        self.spare = Vec::new();
        self.state = State::Dead;
    }

    pub fn push(&mut self, seg: &Segment, sink: &mut impl Frames) {
        if self.state == State::Dead {
            return;
        }
        let mut data = &seg.data[..];
        let mut gap = seg.gap_before;
        let end = seg.pos.saturating_add(data.len() as u64);
        if end <= self.skip_until && self.skip_until > 0 {
            return;
        }
        if seg.pos < self.skip_until {
            // Trimmed to where HTTP/2 starts; whatever was lost before belonged to HTTP/1.
            let skip = (self.skip_until - seg.pos) as usize;
            data = &data[skip.min(data.len())..];
            gap = 0;
        }
        if gap > 0 {
            self.on_gap(gap, sink);
        }
        let mut i = 0;
        let mut stalls = 0u32;
        while i < data.len() && self.state != State::Dead {
            let before = self.state;
            let n = self.step(seg, data, i, sink).min(data.len() - i);
            if n == 0 && self.state == before {
                stalls += 1;
                if stalls > 8 {
                    debug_assert!(false, "http2 reader made no progress in {:?}", self.state);
                    self.lose_framing(sink);
                    i += 1;
                    stalls = 0;
                }
            } else {
                stalls = 0;
            }
            i += n;
        }
        if !data.is_empty() {
            self.last_exit_ns = seg.exit_ns;
        }
    }

    /// The connection closed: a frame or header block cut short is reported lost.
    pub fn close(&mut self, sink: &mut impl Frames) -> bool {
        if self.tentative {
            // A frame found after a loss that ended exactly where the data did: as good a
            // confirmation as the connection will give.
            if self.state == State::Header && self.hdr_len == 0 {
                self.confirm(sink);
            } else {
                self.discard();
            }
        }
        let cut = matches!(self.state, State::Payload)
            || (self.state == State::Header && self.hdr_len > 0)
            || self.block.is_some();
        if let Some(b) = self.block.take() {
            if b.buf.is_some() {
                sink.hpack_lost(self.dir);
            }
            self.deliver_lost(b, sink);
        }
        self.release();
        cut
    }

    fn step(&mut self, seg: &Segment, data: &[u8], i: usize, sink: &mut impl Frames) -> usize {
        let rest = &data[i..];
        match self.state {
            State::Dead => rest.len(),
            State::Start { matched } => {
                let n = rest.len().min(PREFACE.len() - matched);
                if rest[..n] == PREFACE[matched..matched + n] {
                    if matched == 0 {
                        self.frame_start = stamp(seg);
                    }
                    if matched + n == PREFACE.len() {
                        self.ever_synced = true;
                        self.state = State::Header;
                        sink.preface(self.dir);
                    } else {
                        self.state = State::Start {
                            matched: matched + n,
                        };
                    }
                    n
                } else if matched == 0 {
                    // No preface: the server's side starts with its SETTINGS frame.
                    self.state = State::Header;
                    0
                } else {
                    sink.error(Http2Error::BadPreface);
                    self.lose_framing(sink);
                    0
                }
            }
            State::Header => {
                if self.hdr_len == 0 {
                    self.frame_start = stamp(seg);
                }
                let n = rest.len().min(HEADER_LEN - self.hdr_len);
                self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&rest[..n]);
                self.hdr_len += n;
                if self.hdr_len == HEADER_LEN {
                    self.hdr_len = 0;
                    let h = FrameHeader::parse(&self.hdr);
                    if self.tentative {
                        let max_len = sink.max_frame_len(self.dir);
                        if h.plausible(max_len)
                            && sink.plausible_stream(self.dir, &h)
                            && self.frame.h.may_precede(&h)
                        {
                            self.confirm(sink);
                        } else {
                            // The frame before was noise after all.
                            self.discard();
                            self.lose_framing(sink);
                            return n;
                        }
                    }
                    self.begin_frame(h, seg, sink);
                }
                n
            }
            State::Payload => self.step_payload(seg, rest, sink),
            State::Scan => self.step_scan(seg, rest, i == 0, sink),
        }
    }

    /// A frame header was read (or found by the scan).
    fn begin_frame(&mut self, h: FrameHeader, seg: &Segment, sink: &mut impl Frames) {
        if !h.valid() {
            sink.error(Http2Error::BadFrame);
            self.lose_framing(sink);
            return;
        }
        if !self.tentative {
            self.ever_synced = true;
            sink.saw_stream(h.stream);
        }
        if let Some(b) = &self.block {
            // RFC 9113 §6.10: nothing may interleave a header block.
            if h.ty != ty::CONTINUATION || h.stream != b.stream {
                sink.error(Http2Error::BadFrame);
                let b = self.block.take();
                if let Some(b) = b {
                    if b.buf.is_some() {
                        sink.hpack_lost(self.dir);
                    }
                    self.deliver_lost(b, sink);
                }
            }
        } else if h.ty == ty::CONTINUATION {
            // Its HEADERS was lost (already counted) or never sent: skip it.
            sink.error(Http2Error::BadFrame);
        }
        self.frame = Frame {
            h,
            pos: 0,
            prefix: [0; 6],
            content_end: h.len,
            spoiled: false,
        };
        self.ctl.clear();
        if h.ty == ty::HEADERS || h.ty == ty::PUSH_PROMISE {
            let mut buf = std::mem::take(&mut self.spare);
            buf.clear();
            self.block = Some(Building {
                kind: if h.ty == ty::HEADERS {
                    BlockKind::Headers {
                        end_stream: h.has(flag::END_STREAM),
                    }
                } else {
                    BlockKind::PushPromise { promised: 0 }
                },
                stream: h.stream,
                buf: Some(buf),
                start: self.frame_start,
            });
        }
        self.state = State::Payload;
        if h.len == 0 {
            self.finish_frame(seg.exit_ns, sink);
        }
    }

    fn step_payload(&mut self, seg: &Segment, rest: &[u8], sink: &mut impl Frames) -> usize {
        let f = &mut self.frame;
        let prefix_len = f.h.prefix_len();
        let n;
        if f.pos < prefix_len {
            let at = f.pos as usize;
            n = rest.len().min((prefix_len - f.pos) as usize);
            f.prefix[at..at + n].copy_from_slice(&rest[..n]);
            f.pos += n as u32;
            if f.pos == prefix_len {
                self.prefix_done(sink);
            }
        } else if f.pos < f.content_end {
            n = rest.len().min((f.content_end - f.pos) as usize);
            f.pos += n as u32;
            self.content(&rest[..n], seg.exit_ns, sink);
        } else {
            // Padding.
            n = rest.len().min((f.h.len - f.pos) as usize);
            f.pos += n as u32;
        }
        if self.frame.pos == self.frame.h.len {
            self.finish_frame(seg.exit_ns, sink);
        }
        n
    }

    /// The payload prefix is complete: padding and the promised stream are known.
    fn prefix_done(&mut self, sink: &mut impl Frames) {
        let f = &mut self.frame;
        if f.spoiled {
            // Part of the prefix was lost; `lose_payload` already settled the frame.
            return;
        }
        let prefix_len = f.h.prefix_len();
        let pad = if f.h.has(flag::PADDED) {
            u32::from(f.prefix[0])
        } else {
            0
        };
        if pad > f.h.len - prefix_len {
            // RFC 9113 §6.1: padding longer than the payload. Lengths still frame it.
            f.spoiled = true;
            f.content_end = prefix_len;
            sink.error(Http2Error::BadFrame);
            self.spoil_block(sink);
            return;
        }
        f.content_end = f.h.len - pad;
        if f.h.ty == ty::PUSH_PROMISE {
            let at = usize::from(f.h.has(flag::PADDED));
            let id = u32::from_be_bytes([
                f.prefix[at] & 0x7f,
                f.prefix[at + 1],
                f.prefix[at + 2],
                f.prefix[at + 3],
            ]);
            if let Some(b) = self.block.as_mut() {
                b.kind = BlockKind::PushPromise { promised: id };
            }
        }
    }

    fn content(&mut self, bytes: &[u8], exit_ns: u64, sink: &mut impl Frames) {
        let h = self.frame.h;
        match h.ty {
            ty::DATA => self.data(h.stream, bytes.len() as u64, None, exit_ns, sink),
            ty::HEADERS | ty::PUSH_PROMISE | ty::CONTINUATION => {
                let max = self.max_block;
                let Some(b) = self.block.as_mut() else {
                    return;
                };
                let Some(buf) = b.buf.as_mut() else {
                    return;
                };
                if buf.len() + bytes.len() > max {
                    sink.error(Http2Error::HeaderBlockTooLarge);
                    self.spoil_block(sink);
                } else {
                    buf.extend_from_slice(bytes);
                }
            }
            ty::SETTINGS | ty::RST_STREAM | ty::GOAWAY => {
                let cap = match h.ty {
                    ty::SETTINGS => 6 * MAX_SETTINGS,
                    ty::RST_STREAM => 4,
                    _ => 8,
                };
                let take = bytes.len().min(cap.saturating_sub(self.ctl.len()));
                self.ctl.extend_from_slice(&bytes[..take]);
            }
            _ => {}
        }
    }

    /// The current frame's last byte was consumed (seen, or lost in a gap) at `end_ns`.
    fn finish_frame(&mut self, end_ns: u64, sink: &mut impl Frames) {
        self.state = State::Header;
        let f = self.frame;
        let h = f.h;
        match h.ty {
            ty::DATA => self.data(h.stream, 0, Some(h.has(flag::END_STREAM)), end_ns, sink),
            ty::HEADERS | ty::PUSH_PROMISE | ty::CONTINUATION
                if h.has(flag::END_HEADERS)
                    && self.block.as_ref().is_some_and(|b| b.stream == h.stream) =>
            {
                if let Some(b) = self.block.take() {
                    self.deliver(b, end_ns, sink);
                }
            }
            // A control frame on probation is not worth holding.
            _ if self.tentative => {}
            ty::RST_STREAM if !f.spoiled && self.ctl.len() == 4 => {
                let code = u32::from_be_bytes([self.ctl[0], self.ctl[1], self.ctl[2], self.ctl[3]]);
                sink.rst_stream(self.dir, h.stream, code);
            }
            ty::GOAWAY if !f.spoiled && self.ctl.len() >= 8 => {
                let last =
                    u32::from_be_bytes([self.ctl[0] & 0x7f, self.ctl[1], self.ctl[2], self.ctl[3]]);
                sink.goaway(self.dir, last);
            }
            ty::SETTINGS if !f.spoiled && !h.has(flag::ACK) => {
                for p in self.ctl.chunks_exact(6) {
                    let id = u16::from_be_bytes([p[0], p[1]]);
                    let value = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                    sink.setting(self.dir, id, value);
                }
            }
            _ => {}
        }
        self.ctl.clear();
    }

    fn deliver(&mut self, b: Building, end_ns: u64, sink: &mut impl Frames) {
        if self.tentative {
            self.held.block = Some((b, end_ns));
            return;
        }
        sink.block(
            self.dir,
            Block {
                kind: b.kind,
                stream: b.stream,
                bytes: b.buf.as_deref(),
                start: b.start,
                end_ns,
            },
        );
        if let Some(buf) = b.buf {
            // Keep a small buffer for the next block; let a large one go.
            if buf.capacity() <= 16 * 1024 {
                self.spare = buf;
            }
        }
    }

    /// A block abandoned before END_HEADERS: the connection layer still learns its stream.
    fn deliver_lost(&mut self, b: Building, sink: &mut impl Frames) {
        let end_ns = self.last_exit_ns.max(b.start.start_ns);
        self.deliver(Building { buf: None, ..b }, end_ns, sink);
    }

    /// The block being assembled cannot be decoded: its bytes go, HPACK is unknown.
    fn spoil_block(&mut self, sink: &mut impl Frames) {
        if let Some(b) = self.block.as_mut()
            && b.buf.take().is_some()
        {
            sink.hpack_lost(self.dir);
        }
    }

    /// Bytes were lost just before the next segment.
    fn on_gap(&mut self, gap: u64, sink: &mut impl Frames) {
        if self.tentative {
            // Nothing can confirm the frame now.
            self.discard();
            self.lose_framing(sink);
            return;
        }
        match self.state {
            State::Dead | State::Scan => {}
            State::Start { .. } | State::Header => {
                sink.error(Http2Error::GapInFrameHeader);
                self.lose_framing(sink);
            }
            State::Payload => {
                let f = self.frame;
                let remaining = u64::from(f.h.len - f.pos);
                let lost = gap.min(remaining);
                self.lose_payload(lost as u32, sink);
                if gap >= remaining {
                    let end_ns = self.last_exit_ns;
                    self.finish_frame(end_ns, sink);
                    if gap > remaining {
                        sink.error(Http2Error::GapInFrameHeader);
                        self.lose_framing(sink);
                    }
                }
            }
        }
    }

    /// `n` octets of the current frame's payload were lost (`n` <= what remains).
    fn lose_payload(&mut self, n: u32, sink: &mut impl Frames) {
        if n == 0 {
            return;
        }
        let f = &mut self.frame;
        let prefix_len = f.h.prefix_len();
        let (from, to) = (f.pos, f.pos + n);
        f.pos = to;
        let prefix_lost = from < prefix_len;
        if prefix_lost {
            // The padding length (or promised stream) is gone: the rest counts as content.
            f.spoiled = true;
            f.content_end = f.h.len;
        }
        let content_lost = to.min(f.content_end).saturating_sub(from.max(prefix_len));
        let h = f.h;
        match h.ty {
            ty::DATA if content_lost > 0 => {
                let exit_ns = self.last_exit_ns;
                sink.data(self.dir, h.stream, u64::from(content_lost), None, exit_ns);
            }
            ty::HEADERS | ty::PUSH_PROMISE | ty::CONTINUATION
                if prefix_lost || content_lost > 0 =>
            {
                if self.block.as_ref().is_some_and(|b| b.buf.is_some()) {
                    sink.error(Http2Error::GapInHeaderBlock);
                }
                self.spoil_block(sink);
            }
            _ => self.frame.spoiled = true,
        }
    }

    /// DATA progress, held while the frame is tentative.
    fn data(
        &mut self,
        stream: u32,
        bytes: u64,
        end: Option<bool>,
        exit_ns: u64,
        sink: &mut impl Frames,
    ) {
        if self.tentative {
            let held = self.held.data.get_or_insert((stream, 0, None, exit_ns));
            held.1 += bytes;
            held.2 = end.or(held.2);
            held.3 = exit_ns;
        } else {
            sink.data(self.dir, stream, bytes, end, exit_ns);
        }
    }

    /// The frame found by scanning is followed by a plausible one: deliver what it held.
    fn confirm(&mut self, sink: &mut impl Frames) {
        self.tentative = false;
        self.ever_synced = true;
        sink.saw_stream(self.frame.h.stream);
        let held = std::mem::take(&mut self.held);
        if let Some((stream, bytes, end, exit_ns)) = held.data {
            sink.data(self.dir, stream, bytes, None, exit_ns);
            if end.is_some() {
                sink.data(self.dir, stream, 0, end, exit_ns);
            }
        }
        if let Some((b, end_ns)) = held.block {
            self.deliver(b, end_ns, sink);
        }
    }

    /// The frame found by scanning was noise: forget it.
    fn discard(&mut self) {
        self.tentative = false;
        self.held = Held::default();
        self.block = None;
    }

    /// The framing is lost: any header block in progress is gone, HPACK state is unknown, and
    /// the reader scans for a frame header.
    fn lose_framing(&mut self, sink: &mut impl Frames) {
        if let Some(b) = self.block.take() {
            self.deliver_lost(b, sink);
        }
        sink.hpack_lost(self.dir);
        self.hdr_len = 0;
        self.ctl.clear();
        self.state = State::Scan;
    }

    fn step_scan(
        &mut self,
        seg: &Segment,
        rest: &[u8],
        syscall_start: bool,
        sink: &mut impl Frames,
    ) -> usize {
        let max_len = sink.max_frame_len(self.dir);
        let dir = self.dir;
        let plausible = |h: &FrameHeader| h.plausible(max_len) && sink.plausible_stream(dir, h);
        let mut found = None;
        for c in 0..rest.len().saturating_sub(HEADER_LEN - 1) {
            // Cheap filter first: the type byte of a known frame type.
            if rest[c + 3] > ty::CONTINUATION {
                continue;
            }
            let Some(h) = FrameHeader::at(rest, c) else {
                break;
            };
            if h.ty == ty::CONTINUATION || !plausible(&h) {
                continue;
            }
            let end = c + HEADER_LEN + h.len as usize;
            let (starts_syscall, ends_data) = (c == 0 && syscall_start, end == rest.len());
            // A whole syscall that is exactly one frame, or a frame followed by another.
            if (starts_syscall && ends_data)
                || FrameHeader::at(rest, end)
                    .is_some_and(|next| plausible(&next) && h.may_precede(&next))
            {
                found = Some((c, h, false));
                break;
            }
            if starts_syscall || ends_data {
                found = Some((c, h, true));
                break;
            }
        }
        let scanned = found.map_or(rest.len(), |(c, _, _)| c);
        if !self.ever_synced {
            self.never_synced_scan = self.never_synced_scan.saturating_add(scanned as u64);
            if self.never_synced_scan > NEVER_SYNCED_SCAN_LIMIT {
                sink.error(Http2Error::NotHttp2);
                sink.not_http2();
                self.release();
                return rest.len();
            }
        }
        match found {
            Some((c, h, tentative)) => {
                self.frame_start = stamp(seg);
                self.tentative = tentative;
                self.begin_frame(h, seg, sink);
                c + HEADER_LEN
            }
            None => rest.len(),
        }
    }
}

/// When and by which thread a byte moved: a read returned it (`exit_ns`) or a write began
/// (`enter_ns`).
pub(super) fn stamp(seg: &Segment) -> Stamp {
    Stamp {
        start_ns: match seg.direction {
            Direction::Ingress => seg.exit_ns,
            Direction::Egress => seg.enter_ns,
        },
        tid: seg.tid,
    }
}

/// Whether `bytes` start with frames: a plausible frame header whose frame ends exactly at
/// the end of `bytes` or is followed by another plausible one. None: too few bytes to tell.
pub(super) fn starts_with_frames(bytes: &[u8]) -> Option<bool> {
    let h = FrameHeader::at(bytes, 0)?;
    if h.ty == ty::CONTINUATION || !h.plausible(DEFAULT_MAX_FRAME) {
        return Some(false);
    }
    let end = HEADER_LEN + h.len as usize;
    if end == bytes.len() {
        return Some(true);
    }
    if bytes.len() < end + HEADER_LEN {
        return None;
    }
    Some(FrameHeader::at(bytes, end).is_some_and(|next| next.plausible(DEFAULT_MAX_FRAME)))
}
