//! Input formats of the fuzz targets, shared with the seed tool (`examples/seeds_from_dump.rs`)
//! so that seeds recorded from real traffic decode to exactly the segments that were captured.
//!
//! Every byte string decodes to something: the formats have no invalid inputs, so the fuzzer
//! never spends executions on rejected ones.

pub mod h2;

use bytes::Bytes;
use tracer_agent::{
    http1::{Http1Limits, Side},
    streams::{Direction, Segment},
};

/// The connection id given to every fuzzed connection.
pub const CONN_ID: u64 = 7;

/// Limits small enough for the fuzzer to reach the header-size and pipelining bounds.
pub const TIGHT_LIMITS: Http1Limits = Http1Limits {
    max_header_bytes: 128,
    max_pipelined: 2,
};

/// How the `http1` target reads its input.
///
/// Byte 0 configures the connection:
/// * bits 0-1: the [`Side`] given at creation (0 server, 1 client, 2 and 3 unknown);
/// * bit 2: [`TIGHT_LIMITS`] instead of the defaults;
/// * bits 3-7: `k - 1`, where the target replays the same segments cut into pieces of at most
///   `k` bytes (1 to 32) and compares the results.
///
/// Then segments, each a control byte `c`, a gap byte if `c & 2`, a little-endian `u16`
/// length and that many data bytes (fewer if the input ends first):
/// * bit 0: Ingress (read by the traced process), else Egress;
/// * bit 1: bytes were lost before this segment ([`gap_len`] of the gap byte);
/// * bits 2-3: the thread (four threads);
/// * bits 4-7: how long the syscall took, in units of a third of the spacing between
///   syscalls: past 3 it overlaps the next one, so a read can end after a later write began.
///
/// Positions are consecutive per direction, gaps included, as [`tracer_agent::streams`]
/// delivers them.
#[derive(Clone, Debug)]
pub struct Http1Input {
    pub side: Side,
    pub limits: Http1Limits,
    /// Largest piece in the re-cut replay.
    pub piece: usize,
    pub segments: Vec<Segment>,
}

/// Time between the starts of consecutive syscalls, in ns.
const SPACING_NS: u64 = 30;

/// Gap byte to bytes lost: 1 to 240 directly, then powers of two up to 2^40, so both small
/// losses inside a body and losses of whole messages are reachable.
pub fn gap_len(g: u8) -> u64 {
    match g {
        0..0xf0 => u64::from(g) + 1,
        _ => 1 << (8 + 2 * u32::from(g - 0xf0)),
    }
}

impl Http1Input {
    pub fn decode(input: &[u8]) -> Self {
        let (&config, mut rest) = input.split_first().unwrap_or((&0, &[]));
        let side = match config & 3 {
            0 => Side::Server,
            1 => Side::Client,
            _ => Side::Unknown,
        };
        let limits = if config & 4 != 0 {
            TIGHT_LIMITS
        } else {
            Http1Limits::default()
        };
        let piece = usize::from(config >> 3) + 1;
        let mut segments = Vec::new();
        let mut pos = [0u64; 2];
        let mut t = 1_000u64;
        while let Some((&c, after)) = rest.split_first() {
            rest = after;
            let mut gap_before = 0;
            if c & 2 != 0 {
                let Some((&g, after)) = rest.split_first() else {
                    break;
                };
                rest = after;
                gap_before = gap_len(g);
            }
            let len = match rest {
                [lo, hi, after @ ..] => {
                    rest = after;
                    usize::from(u16::from_le_bytes([*lo, *hi]))
                }
                _ => {
                    rest = &[];
                    0
                }
            };
            let (data, after) = rest.split_at(len.min(rest.len()));
            rest = after;
            let direction = if c & 1 != 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            let at = &mut pos[usize::from(c & 1)];
            *at = at.saturating_add(gap_before);
            let enter_ns = t;
            t += SPACING_NS;
            segments.push(Segment {
                conn_id: CONN_ID,
                direction,
                tid: 100 + u32::from((c >> 2) & 3),
                pos: *at,
                data: Bytes::copy_from_slice(data),
                gap_before,
                enter_ns,
                exit_ns: enter_ns + u64::from(c >> 4) * SPACING_NS / 3,
            });
            *at = at.saturating_add(data.len() as u64);
        }
        Self {
            side,
            limits,
            piece,
            segments,
        }
    }

    /// The same byte streams cut into pieces of at most `piece` bytes; each piece keeps its
    /// segment's thread and timestamps, and only the first keeps the gap.
    pub fn recut(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        for seg in &self.segments {
            if seg.data.is_empty() {
                out.push(seg.clone());
                continue;
            }
            for (i, start) in (0..seg.data.len()).step_by(self.piece).enumerate() {
                let end = (start + self.piece).min(seg.data.len());
                out.push(Segment {
                    pos: seg.pos + start as u64,
                    data: seg.data.slice(start..end),
                    gap_before: if i == 0 { seg.gap_before } else { 0 },
                    ..seg.clone()
                });
            }
        }
        out
    }
}

/// One captured syscall, for [`encode_http1`].
pub struct CapturedSegment<'a> {
    pub ingress: bool,
    pub gap_byte: Option<u8>,
    pub data: &'a [u8],
}

/// Encodes captured segments in the [`Http1Input`] format (the inverse of its decoding for
/// segments of at most 65535 bytes; longer ones are split).
pub fn encode_http1(config: u8, segments: &[CapturedSegment<'_>]) -> Vec<u8> {
    let mut out = vec![config];
    for seg in segments {
        let mut chunks: Vec<&[u8]> = seg.data.chunks(usize::from(u16::MAX)).collect();
        if chunks.is_empty() {
            // A gap with no data after it.
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let gap = seg.gap_byte.filter(|_| i == 0);
            out.push(u8::from(seg.ingress) | if gap.is_some() { 2 } else { 0 });
            out.extend(gap);
            out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
            out.extend_from_slice(chunk);
        }
    }
    out
}
