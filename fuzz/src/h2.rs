//! HTTP/2 framing and an HPACK encoder for the `hpack` target.
//!
//! The encoder is written from RFC 7541 independently of the agent's decoder, so that it can
//! serve as the decoder's oracle: it keeps its own model of the dynamic table and knows which
//! field every representation it emits stands for. It never Huffman-codes (the raw-block mode
//! of the target, seeded from real traffic, exercises the Huffman decoder).

use std::collections::VecDeque;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// SETTINGS_MAX_FRAME_SIZE's initial value.
const MAX_FRAME: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE's initial value.
pub const DEFAULT_TABLE_SIZE: usize = 4096;
const ENTRY_OVERHEAD: usize = 32;

/// RFC 7541 Appendix A: index 1 is the first entry. A copy of its own, not the decoder's: a
/// wrong entry in the decoder's table would otherwise decode "exactly" to the oracle too.
pub const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// One frame: 24-bit length, type, flags, stream id (RFC 9113 §4.1).
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .min(0xff_ffff);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&payload[..len as usize]);
    out
}

/// An empty SETTINGS frame.
pub fn settings() -> Vec<u8> {
    frame(SETTINGS, 0, 0, &[])
}

/// A header block as HEADERS (END_STREAM) plus CONTINUATION frames of at most the initial
/// maximum frame size.
pub fn header_frames(stream: u32, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut first = true;
    loop {
        let chunk = chunks.next().unwrap_or_default();
        let last = chunks.peek().is_none();
        let kind = if first { HEADERS } else { CONTINUATION };
        let mut flags = if last { END_HEADERS } else { 0 };
        if first {
            flags |= END_STREAM;
        }
        out.extend(frame(kind, flags, stream, chunk));
        first = false;
        if last {
            return out;
        }
    }
}

/// How a field is represented (RFC 7541 §6).
#[derive(Clone, Copy, Debug)]
pub enum Repr {
    /// §6.1, by absolute index (1-61 static, 62 and up dynamic).
    Indexed(usize),
    /// §6.2.1: the field is added to the dynamic table. Name by index, or literal if None.
    Incremental(Option<usize>),
    /// §6.2.2.
    WithoutIndexing(Option<usize>),
    /// §6.2.3.
    NeverIndexed(Option<usize>),
}

/// An HPACK encoder with its model of the dynamic table (newest first).
pub struct Encoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
}

impl Default for Encoder {
    fn default() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
        }
    }
}

impl Encoder {
    pub fn dynamic_len(&self) -> usize {
        self.table.len()
    }

    /// The field at an absolute index, if there is one.
    pub fn lookup(&self, index: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        match index {
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Some((name.as_bytes().to_vec(), value.as_bytes().to_vec()))
            }
            _ => self.table.get(index.checked_sub(62)?).cloned(),
        }
    }

    /// §6.3; only valid at the start of a block, at most the announced maximum.
    pub fn size_update(&mut self, size: usize, out: &mut Vec<u8>) {
        self.max_size = size.min(DEFAULT_TABLE_SIZE);
        self.evict(0);
        integer(self.max_size, 5, 0x20, out);
    }

    /// Encodes one field and returns it as the decoder must see it: `value` is used by the
    /// literal representations, and the name comes from `name` unless it is indexed. None if
    /// an index does not exist.
    pub fn encode(
        &mut self,
        repr: Repr,
        name: &[u8],
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        let (name_index, prefix, pattern) = match repr {
            Repr::Indexed(index) => {
                let field = self.lookup(index)?;
                integer(index, 7, 0x80, out);
                return Some(field);
            }
            Repr::Incremental(name_index) => (name_index, 6, 0x40),
            Repr::WithoutIndexing(name_index) => (name_index, 4, 0x00),
            Repr::NeverIndexed(name_index) => (name_index, 4, 0x10),
        };
        let name = match name_index {
            Some(index) => {
                let (name, _) = self.lookup(index)?;
                integer(index, prefix, pattern, out);
                name
            }
            None => {
                integer(0, prefix, pattern, out);
                string(name, out);
                name.to_vec()
            }
        };
        string(value, out);
        if matches!(repr, Repr::Incremental(_)) {
            self.insert(name.clone(), value.to_vec());
        }
        Some((name, value.to_vec()))
    }

    /// §4.4: evicts until the new entry fits; an entry larger than the table empties it.
    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        self.evict(size);
        if size <= self.max_size {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }
}

/// §5.1: an integer with an N-bit prefix, `pattern` in the bits above it.
fn integer(value: usize, prefix: u32, pattern: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(pattern | value as u8);
        return;
    }
    out.push(pattern | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// §5.2: a string literal, not Huffman-coded.
fn string(bytes: &[u8], out: &mut Vec<u8>) {
    integer(bytes.len(), 7, 0, out);
    out.extend_from_slice(bytes);
}

/// Header names the `hpack` target's literals use: a few, so that later fields refer back
/// to earlier ones by name.
pub const NAMES: [&str; 8] = [
    "x-a",
    "x-b",
    "traceparent",
    "tracestate",
    "grpc-status",
    "cookie",
    "x-request-id",
    "user-agent",
];
