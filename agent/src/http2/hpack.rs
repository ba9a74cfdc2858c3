//! HPACK (RFC 7541) header block decoding for an observer that may have missed bytes.
//!
//! One [`Decoder`] follows one direction of a connection and is fed its header blocks in
//! wire order. Its dynamic table is a list of the entries inserted since it was last in a
//! known state, newest first, followed possibly by an *unknown tail*: entries inserted before
//! the decoder started following (a connection that predates the agent) or inserted by blocks
//! lost to a capture gap.
//!
//! The property everything rests on: an entry at position `j` of our list is exactly the
//! encoder's entry at position `j` whenever the encoder's table has a position `j`. Inserts go
//! to the front and evictions take from the back, so the newest entries of both tables are the
//! same inserts in the same order, however many older entries either side keeps. Hence:
//! * references into our list always decode correctly, never to a wrong value;
//! * references past our list decode as unknown fields while the tail may exist, and are a
//!   desync (counted) when we believed we had the whole table; a literal whose name is such a
//!   reference still yields its value, kept apart as unnamed;
//! * evicting too little is harmless (the encoder never refers to what it evicted) and
//!   evicting too much (our memory cap) only grows the unknown tail.
//!
//! The tail is proven gone, and the decoder is back in sync, once our own entries fill the
//! table: when they alone exceed the table's maximum size (the encoder evicts oldest first, so
//! everything older went before them), or when what is left beside them is smaller than the
//! smallest possible entry (32 octets). The maximum is known exactly after a dynamic
//! table size update; otherwise its upper bound from SETTINGS_HEADER_TABLE_SIZE serves (for a
//! connection joined mid-way, the protocol default of 4096 is assumed: if that is wrong, later
//! references show up as counted desyncs and unknown fields, not as wrong values). A size
//! update to 0 empties the table and proves it at once.
//!
//! Encoders name each new value of a recurring field (a traceparent, a path) by referring to
//! the newest entry with that name. After a loss, such a field's name is an unknown entry, so
//! its inserted entry has an unknown name too, and so does the next one that refers to it:
//! that field stays nameless while everything else decodes again. Its values are still
//! decoded, and kept apart as unnamed values.
//!
//! A block that cannot be walked (truncated representation, integer overflow, index 0,
//! invalid Huffman string) means the bytes are not what the encoder sent: the rest of the block
//! is dropped and the whole table becomes unknown.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::field::{self, Field as HeaderField};

use super::huffman;

/// The protocol's initial SETTINGS_HEADER_TABLE_SIZE (RFC 9113 §6.5.2).
pub(super) const DEFAULT_TABLE_SIZE: usize = 4096;

/// Per-entry overhead in table size accounting (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// Integers above this are treated as malformed (no real index, length or size is near it).
const MAX_INT: u64 = u32::MAX as u64;

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
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

/// What went wrong in a block, beyond fields that were merely unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Problem {
    /// The block could not be walked; its rest is dropped and the table is unknown.
    Malformed,
    /// A reference past the table while the decoder believed it had all of it.
    Desync,
}

/// One decoded header block.
#[derive(Debug, Default)]
pub(super) struct Decoded {
    /// Fields in order; names as sent (lowercase in valid HTTP/2).
    pub fields: Vec<HeaderField>,
    /// Values decoded exactly whose field name referred to an unknown table entry.
    pub unnamed: Vec<Bytes>,
    /// Fields that could not be decoded (references to unknown entries, or the dropped rest
    /// of a malformed block counts as one), including those in `unnamed`.
    pub unknown: u32,
    /// The decoded list outgrew the limit: later fields were dropped (the table still
    /// followed them).
    pub too_large: bool,
    pub problem: Option<Problem>,
}

impl Decoded {
    pub fn complete(&self) -> bool {
        self.unknown == 0 && !self.too_large
    }
}

struct Slot {
    /// None: inserted by a field we could not decode.
    entry: Option<(Bytes, Bytes)>,
    /// Exact for known entries, a lower bound for unknown ones.
    size: usize,
}

/// A field's name or value as far as it could be decoded.
enum Part {
    Known(Bytes),
    /// Not decodable; at least this many octets long.
    Unknown(usize),
}

impl Part {
    fn min_len(&self) -> usize {
        match self {
            Part::Known(b) => b.len(),
            Part::Unknown(n) => *n,
        }
    }
}

/// What one representation yields.
enum Field {
    Decoded(Bytes, Bytes),
    /// The value of a field whose name is an unknown table entry.
    Unnamed(Bytes),
    /// A size update, or a field that could not be decoded.
    Nothing,
}

enum Lookup {
    Static(&'static str, &'static str),
    Dynamic(Bytes, Bytes),
    /// In our list, but inserted by a field we could not decode.
    UnknownEntry,
    /// Past our list (or index 0): see [`Decoder::get`].
    Missing,
}

/// Decoding context of one direction of a connection.
pub(super) struct Decoder {
    /// Newest first.
    entries: VecDeque<Slot>,
    /// Sum of `entries` sizes (a lower bound if some are unknown).
    size: usize,
    unknown_entries: usize,
    /// The table's current maximum size, if known exactly (after a size update, or from the
    /// start of the connection).
    max_size: Option<usize>,
    /// Upper bound of the maximum size: the largest SETTINGS_HEADER_TABLE_SIZE the decoding
    /// side announced (or assumed).
    bound: Option<usize>,
    /// Entries older than `entries` may exist that we do not know.
    tail: bool,
    /// Most octets of entries kept; older ones are forgotten (and become unknown).
    cap: usize,
}

impl Decoder {
    /// A decoder that has followed the connection from its start.
    pub fn new(cap: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            unknown_entries: 0,
            max_size: Some(DEFAULT_TABLE_SIZE),
            bound: Some(DEFAULT_TABLE_SIZE),
            tail: false,
            cap,
        }
    }

    /// A decoder joining a connection whose earlier blocks it never saw.
    pub fn joined(cap: usize) -> Self {
        let mut d = Self::new(cap);
        d.lose();
        d
    }

    /// Blocks (or parts of blocks) were lost: positions in the table are unknown from now on.
    pub fn lose(&mut self) {
        self.entries.clear();
        self.size = 0;
        self.unknown_entries = 0;
        self.tail = true;
        // A size update may have been among the lost bytes.
        self.max_size = None;
    }

    /// Every reference will decode: the table is known entirely.
    pub fn synced(&self) -> bool {
        !self.tail && self.unknown_entries == 0
    }

    #[cfg(test)]
    pub fn max_size(&self) -> Option<usize> {
        self.max_size
    }

    /// Octets held by the table.
    pub fn held(&self) -> usize {
        self.size
    }

    /// The decoding side announced SETTINGS_HEADER_TABLE_SIZE = `value`.
    pub fn announce(&mut self, value: u32) {
        let value = value as usize;
        // Until the encoder acknowledges, the old value still applies: keep the larger.
        self.bound = Some(self.bound.map_or(value, |b| b.max(value)));
        self.evict();
    }

    /// Decodes one complete header block, keeping at most `list_limit` octets of names and
    /// values.
    pub fn decode(&mut self, block: &[u8], list_limit: usize) -> Decoded {
        // A field takes 1 to a few dozen octets; most blocks hold under 16 fields.
        let mut out = Decoded {
            fields: Vec::with_capacity(block.len().clamp(1, 16)),
            ..Decoded::default()
        };
        let mut list_bytes = 0usize;
        let mut p = 0;
        while p < block.len() {
            match self.representation(block, &mut p, &mut out) {
                Ok(Field::Decoded(name, value)) => {
                    // Counted as kept: invalid UTF-8 in a name grows when replaced.
                    let name = field::name(&String::from_utf8_lossy(&name));
                    list_bytes = list_bytes.saturating_add(name.len() + value.len());
                    if list_bytes > list_limit {
                        out.too_large = true;
                    } else {
                        out.fields.push((name, value));
                    }
                }
                Ok(Field::Unnamed(value)) => {
                    list_bytes = list_bytes.saturating_add(value.len());
                    if list_bytes > list_limit {
                        out.too_large = true;
                    } else {
                        out.unnamed.push(value);
                    }
                }
                Ok(Field::Nothing) => {}
                Err(()) => {
                    out.problem = Some(Problem::Malformed);
                    out.unknown += 1;
                    self.lose();
                    break;
                }
            }
        }
        out
    }

    /// Decodes the representation at `*p` and advances past it; unknown fields are counted in
    /// `out`.
    fn representation(
        &mut self,
        block: &[u8],
        p: &mut usize,
        out: &mut Decoded,
    ) -> Result<Field, ()> {
        let first = block[*p];
        if first & 0x80 != 0 {
            // Indexed field (§6.1).
            let index = integer(block, p, 7)?;
            return match self.get(index, out)? {
                Lookup::Static(n, v) => Ok(Field::Decoded(
                    Bytes::from_static(n.as_bytes()),
                    Bytes::from_static(v.as_bytes()),
                )),
                Lookup::Dynamic(n, v) => Ok(Field::Decoded(n, v)),
                Lookup::UnknownEntry | Lookup::Missing => {
                    out.unknown += 1;
                    Ok(Field::Nothing)
                }
            };
        }
        if first & 0xe0 == 0x20 {
            // Dynamic table size update (§6.3).
            let size = integer(block, p, 5)?;
            self.resize(size as usize);
            return Ok(Field::Nothing);
        }
        // Literal with incremental indexing (§6.2.1, 01xxxxxx), without indexing (0000xxxx)
        // or never indexed (0001xxxx).
        let indexing = first & 0x40 != 0;
        let index = integer(block, p, if indexing { 6 } else { 4 })?;
        let name = if index == 0 {
            string(block, p)?
        } else {
            match self.get(index, out)? {
                Lookup::Static(n, _) => Part::Known(Bytes::from_static(n.as_bytes())),
                Lookup::Dynamic(n, _) => Part::Known(n),
                Lookup::UnknownEntry | Lookup::Missing => Part::Unknown(0),
            }
        };
        let value = string(block, p)?;
        if indexing {
            let size = name.min_len() + value.min_len() + ENTRY_OVERHEAD;
            let entry = match (&name, &value) {
                (Part::Known(n), Part::Known(v)) => Some((n.clone(), v.clone())),
                _ => None,
            };
            self.insert(entry, size);
        }
        match (name, value) {
            (Part::Known(n), Part::Known(v)) => Ok(Field::Decoded(n, v)),
            (Part::Unknown(_), Part::Known(v)) => {
                out.unknown += 1;
                Ok(Field::Unnamed(v))
            }
            _ => {
                out.unknown += 1;
                Ok(Field::Nothing)
            }
        }
    }

    /// Table lookup (§2.3.3). Index 0 is malformed; an index past our list is unknown while
    /// the tail may exist, and a desync (which makes the tail possible) otherwise.
    fn get(&mut self, index: u64, out: &mut Decoded) -> Result<Lookup, ()> {
        let index = usize::try_from(index).map_err(|_| ())?;
        if index == 0 {
            return Err(());
        }
        if let Some(&(n, v)) = STATIC_TABLE.get(index - 1) {
            return Ok(Lookup::Static(n, v));
        }
        let j = index - 1 - STATIC_TABLE.len();
        if let Some(slot) = self.entries.get(j) {
            return Ok(match &slot.entry {
                Some((n, v)) => Lookup::Dynamic(n.clone(), v.clone()),
                None => Lookup::UnknownEntry,
            });
        }
        if !self.tail {
            out.problem = Some(Problem::Desync);
            self.tail = true;
        }
        Ok(Lookup::Missing)
    }

    fn insert(&mut self, entry: Option<(Bytes, Bytes)>, size: usize) {
        if entry.is_none() {
            self.unknown_entries += 1;
        }
        self.entries.push_front(Slot { entry, size });
        self.size = self.size.saturating_add(size);
        self.evict();
    }

    fn resize(&mut self, max: usize) {
        self.max_size = Some(max);
        self.evict();
    }

    /// Evicts to the table's maximum (or its bound: never more than the encoder evicts), then
    /// to our memory cap (forgetting entries the encoder may still have), and checks whether
    /// the unknown tail is proven gone.
    fn evict(&mut self) {
        let limit = self.max_size.or(self.bound);
        // Our own entries overflow the table: everything older than them is evicted first.
        if limit.is_some_and(|max| self.size > max) {
            self.tail = false;
        }
        while self.size > limit.unwrap_or(usize::MAX) {
            self.pop_oldest();
        }
        while self.size > self.cap {
            self.pop_oldest();
            self.tail = true;
        }
        if self.tail && limit.is_some_and(|max| self.size + ENTRY_OVERHEAD > max) {
            self.tail = false;
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(slot) = self.entries.pop_back() {
            self.size -= slot.size;
            if slot.entry.is_none() {
                self.unknown_entries -= 1;
            }
        }
    }
}

/// Reads an integer with an `n`-bit prefix (§5.1) at `*p`.
fn integer(block: &[u8], p: &mut usize, n: u32) -> Result<u64, ()> {
    let mask = (1u8 << n) - 1;
    let first = *block.get(*p).ok_or(())?;
    *p += 1;
    let mut value = u64::from(first & mask);
    if value < u64::from(mask) {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*p).ok_or(())?;
        *p += 1;
        value += u64::from(b & 0x7f) << shift;
        if value > MAX_INT {
            return Err(());
        }
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 28 {
            return Err(());
        }
    }
}

/// Reads a string literal (§5.2) at `*p`. An invalid Huffman string leaves the walk aligned
/// but means the bytes are not what an encoder produced.
fn string(block: &[u8], p: &mut usize) -> Result<Part, ()> {
    let huffman = block.get(*p).ok_or(())? & 0x80 != 0;
    let len = usize::try_from(integer(block, p, 7)?).map_err(|_| ())?;
    let end = p.checked_add(len).ok_or(())?;
    let raw = block.get(*p..end).ok_or(())?;
    *p = end;
    if !huffman {
        return Ok(Part::Known(Bytes::copy_from_slice(raw)));
    }
    let mut out = Vec::new();
    match huffman::decode(raw, &mut out) {
        Ok(()) => Ok(Part::Known(Bytes::from(out))),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fields(d: &Decoded) -> Vec<(&str, &str)> {
        d.fields
            .iter()
            .map(|(n, v)| (&**n, std::str::from_utf8(v).unwrap()))
            .collect()
    }

    fn table(d: &Decoder) -> (Vec<(String, String)>, usize) {
        let entries = d
            .entries
            .iter()
            .map(|s| {
                let (n, v) = s.entry.as_ref().unwrap();
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect();
        (entries, d.size)
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    const LIMIT: usize = 64 * 1024;

    /// RFC 7541 C.2: one representation of each kind, each on a fresh context.
    #[test]
    fn rfc_c2_single_representations() {
        let cases: [(&str, (&str, &str), usize); 4] = [
            (
                "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
                ("custom-key", "custom-header"),
                55,
            ),
            (
                "040c 2f73 616d 706c 652f 7061 7468",
                (":path", "/sample/path"),
                0,
            ),
            (
                "1008 7061 7373 776f 7264 0673 6563 7265 74",
                ("password", "secret"),
                0,
            ),
            ("82", (":method", "GET"), 0),
        ];
        for (block, field, size) in cases {
            let mut d = Decoder::new(LIMIT);
            let got = d.decode(&hex(block), LIMIT);
            assert_eq!(fields(&got), [field]);
            assert!(got.complete() && got.problem.is_none());
            assert_eq!(d.size, size, "{block}");
            assert!(d.synced());
        }
    }

    struct Step {
        block: &'static str,
        want: &'static [(&'static str, &'static str)],
        table: &'static [(&'static str, &'static str)],
        size: usize,
    }

    fn run_steps(max: usize, steps: &[Step]) {
        let mut d = Decoder::new(LIMIT);
        // The examples run with SETTINGS_HEADER_TABLE_SIZE as the table's size.
        d.max_size = Some(max);
        d.bound = Some(max);
        for (i, step) in steps.iter().enumerate() {
            let got = d.decode(&hex(step.block), LIMIT);
            assert_eq!(fields(&got), step.want, "step {i}");
            assert!(got.complete() && got.problem.is_none(), "step {i}");
            assert_eq!(table(&d), (owned(step.table), step.size), "step {i}");
        }
    }

    const REQ1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQ2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQ3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const REQ_T1: &[(&str, &str)] = &[(":authority", "www.example.com")];
    const REQ_T2: &[(&str, &str)] = &[
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const REQ_T3: &[(&str, &str)] = &[
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];

    #[test]
    fn rfc_c3_requests_without_huffman() {
        run_steps(
            4096,
            &[
                Step {
                    block: "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    want: REQ1,
                    table: REQ_T1,
                    size: 57,
                },
                Step {
                    block: "8286 84be 5808 6e6f 2d63 6163 6865",
                    want: REQ2,
                    table: REQ_T2,
                    size: 110,
                },
                Step {
                    block: "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
                    want: REQ3,
                    table: REQ_T3,
                    size: 164,
                },
            ],
        );
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        run_steps(
            4096,
            &[
                Step {
                    block: "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                    want: REQ1,
                    table: REQ_T1,
                    size: 57,
                },
                Step {
                    block: "8286 84be 5886 a8eb 1064 9cbf",
                    want: REQ2,
                    table: REQ_T2,
                    size: 110,
                },
                Step {
                    block: "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                    want: REQ3,
                    table: REQ_T3,
                    size: 164,
                },
            ],
        );
    }

    const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const LOC: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
    const RESP1: &[(&str, &str)] = &[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOC),
    ];
    const RESP2: &[(&str, &str)] = &[
        (":status", "307"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOC),
    ];
    const RESP3: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "private"),
        ("date", DATE2),
        ("location", LOC),
        ("content-encoding", "gzip"),
        ("set-cookie", COOKIE),
    ];
    const RESP_T1: &[(&str, &str)] = &[
        ("location", LOC),
        ("date", DATE1),
        ("cache-control", "private"),
        (":status", "302"),
    ];
    const RESP_T2: &[(&str, &str)] = &[
        (":status", "307"),
        ("location", LOC),
        ("date", DATE1),
        ("cache-control", "private"),
    ];
    const RESP_T3: &[(&str, &str)] = &[
        ("set-cookie", COOKIE),
        ("content-encoding", "gzip"),
        ("date", DATE2),
    ];

    /// C.5: a 256-octet table, so entries are evicted.
    #[test]
    fn rfc_c5_responses_without_huffman() {
        run_steps(
            256,
            &[
                Step {
                    block: "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    want: RESP1,
                    table: RESP_T1,
                    size: 222,
                },
                Step {
                    block: "4803 3330 37c1 c0bf",
                    want: RESP2,
                    table: RESP_T2,
                    size: 222,
                },
                Step {
                    block: "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
                    want: RESP3,
                    table: RESP_T3,
                    size: 215,
                },
            ],
        );
    }

    #[test]
    fn rfc_c6_responses_with_huffman() {
        run_steps(
            256,
            &[
                Step {
                    block: "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                    want: RESP1,
                    table: RESP_T1,
                    size: 222,
                },
                Step {
                    block: "4883 640e ffc1 c0bf",
                    want: RESP2,
                    table: RESP_T2,
                    size: 222,
                },
                Step {
                    block: "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                    want: RESP3,
                    table: RESP_T3,
                    size: 215,
                },
            ],
        );
    }

    /// C.3 joined after its first block: the static and literal fields decode, the reference
    /// to the entry inserted before we joined is unknown, and the entry inserted while we
    /// follow resolves in the third block.
    #[test]
    fn joined_decoder_decodes_what_it_can_and_never_guesses() {
        let mut d = Decoder::joined(LIMIT);
        let second = d.decode(&hex("8286 84be 5808 6e6f 2d63 6163 6865"), LIMIT);
        assert_eq!(
            fields(&second),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("cache-control", "no-cache"),
            ]
        );
        assert_eq!((second.unknown, second.problem), (1, None));
        let third = d.decode(
            &hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
            LIMIT,
        );
        // 0xbf is index 63: :authority, inserted before we joined, so unknown.
        assert_eq!(
            fields(&third),
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                ("custom-key", "custom-value"),
            ]
        );
        assert_eq!(third.unknown, 1);
        assert!(!d.synced());
        // A reference to the newest entries resolves: 0xbe = 62 = custom-key, 0xbf = 63 =
        // cache-control (both inserted while we followed).
        let fourth = d.decode(&hex("bebf"), LIMIT);
        assert_eq!(
            fields(&fourth),
            [
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache")
            ]
        );
        assert_eq!(fourth.unknown, 0);
    }

    #[test]
    fn size_update_to_zero_resyncs_a_joined_decoder() {
        let mut d = Decoder::joined(LIMIT);
        assert!(!d.synced());
        // Size update 0, then back to 4096, then :method GET.
        let got = d.decode(&hex("20 3fe1 1f 82"), LIMIT);
        assert_eq!(fields(&got), [(":method", "GET")]);
        assert!(d.synced());
        assert_eq!(d.max_size, Some(4096));
    }

    #[test]
    fn own_inserts_overflowing_the_table_resync_a_joined_decoder() {
        let mut d = Decoder::joined(LIMIT);
        // Literals with indexing, name "x-k", 100-octet value: 135 octets each with the
        // overhead. 30 of them (4050) leave room for an older entry of up to 46 octets.
        let literal = |i: u8| {
            let mut b = vec![0x40, 3, b'x', b'-', b'k', 100];
            b.extend(std::iter::repeat_n(b'a' + i % 26, 100));
            b
        };
        let block: Vec<u8> = (0..30).flat_map(literal).collect();
        assert_eq!(d.decode(&block, LIMIT).fields.len(), 30);
        assert!(!d.synced());
        // The 31st overflows 4096 on its own: every older entry has been evicted.
        assert_eq!(d.decode(&literal(30), LIMIT).fields.len(), 1);
        assert!(d.synced());
        assert_eq!(d.entries.len(), 30);
        // From now on a reference past the table is a desync, not an unknown field.
        let got = d.decode(&hex("ff 7f"), LIMIT);
        assert_eq!(got.problem, Some(Problem::Desync));
        assert!(!d.synced());
    }

    #[test]
    fn a_synced_decoder_reports_references_past_its_table() {
        let mut d = Decoder::new(LIMIT);
        let got = d.decode(&hex("82 be 84"), LIMIT);
        assert_eq!(fields(&got), [(":method", "GET"), (":path", "/")]);
        assert_eq!((got.unknown, got.problem), (1, Some(Problem::Desync)));
        // The next reference past the table is merely unknown.
        let got = d.decode(&hex("be"), LIMIT);
        assert_eq!((got.unknown, got.problem), (1, None));
    }

    #[test]
    fn malformed_blocks_drop_their_rest_and_the_table() {
        let cases = [
            "80",                      // index 0
            "82 44",                   // literal cut before its value
            "82 0f",                   // integer cut
            "ff ff ff ff ff ff ff 7f", // integer overflow
            "04 85 ffff ffff fc",      // Huffman EOS
        ];
        for block in cases {
            let mut d = Decoder::new(LIMIT);
            d.decode(&hex("4003 6b65 7903 7661 6c"), LIMIT);
            let got = d.decode(&hex(block), LIMIT);
            assert_eq!(got.problem, Some(Problem::Malformed), "{block}");
            assert!(!d.synced(), "{block}");
            assert!(d.entries.is_empty(), "{block}");
        }
    }

    #[test]
    fn decoded_list_is_bounded_but_the_table_follows() {
        let mut d = Decoder::new(LIMIT);
        // Four literals with indexing of 10-octet values, limit 30 octets of list.
        let mut block = Vec::new();
        for _ in 0..4 {
            block.extend_from_slice(&[0x40, 1, b'k', 10]);
            block.extend_from_slice(b"0123456789");
        }
        let got = d.decode(&block, 30);
        assert_eq!(got.fields.len(), 2);
        assert!(got.too_large);
        assert_eq!(d.entries.len(), 4);
        assert!(d.synced());
    }

    #[test]
    fn list_limit_counts_names_as_kept() {
        // A name of four invalid UTF-8 octets becomes four 3-octet replacement characters.
        let block = hex("0004 ffff ffff 0178");
        let got = Decoder::new(LIMIT).decode(&block, 13);
        assert_eq!(got.fields.len(), 1);
        assert_eq!(got.fields[0].0, "\u{fffd}".repeat(4));
        let got = Decoder::new(LIMIT).decode(&block, 12);
        assert!(got.fields.is_empty() && got.too_large);
    }

    #[test]
    fn memory_cap_forgets_the_oldest_entries_as_unknown() {
        let mut d = Decoder::new(100);
        d.decode(&hex("4003 6b65 7903 7661 6c"), LIMIT); // key: val, 38 octets
        d.decode(&hex("4003 6b65 7903 7661 6d"), LIMIT);
        assert!(d.synced());
        d.decode(&hex("4003 6b65 7903 7661 6e"), LIMIT); // 114 > 100: oldest forgotten
        assert!(!d.synced());
        let got = d.decode(&hex("be bf c0"), LIMIT);
        assert_eq!(fields(&got), [("key", "van"), ("key", "vam")]);
        assert_eq!((got.unknown, got.problem), (1, None));
    }

    #[test]
    fn literal_with_unknown_name_inserts_a_placeholder_that_keeps_positions() {
        let mut d = Decoder::joined(LIMIT);
        // Literal with indexing, name from index 62 (unknown), value "v".
        let got = d.decode(&hex("7e 0176"), LIMIT);
        assert_eq!(got.unknown, 1);
        // Then a known insert; 62 is it, 63 the placeholder.
        d.decode(&hex("4001 6b01 77"), LIMIT);
        let got = d.decode(&hex("be bf"), LIMIT);
        assert_eq!(fields(&got), [("k", "w")]);
        assert_eq!(got.unknown, 1);
    }

    proptest::proptest! {
        #[test]
        fn any_block_is_survivable(
            blocks in proptest::collection::vec(
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..8),
            joined in proptest::prelude::any::<bool>(),
        ) {
            let mut d = if joined { Decoder::joined(512) } else { Decoder::new(512) };
            for block in blocks {
                let got = d.decode(&block, 256);
                let list: usize = got.fields.iter().map(|(n, v)| n.len() + v.len()).sum();
                proptest::prop_assert!(list <= 256);
                proptest::prop_assert!(d.size <= 512);
                let sum: usize = d.entries.iter().map(|s| s.size).sum();
                proptest::prop_assert_eq!(sum, d.size);
            }
        }
    }
}
