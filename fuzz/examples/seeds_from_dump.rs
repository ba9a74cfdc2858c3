//! Turns real traffic captured by the agent (`tracer-agent --dump=json`) into seed inputs: per
//! HTTP/1 connection an `http1` seed (its reads and writes in capture order, gaps included),
//! per HTTP/2 connection an `http2` seed (the same) and an `hpack` seed (its header blocks),
//! and a `tracecontext` seed per distinct set of trace context headers in an HTTP/1 head.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example seeds_from_dump -- fuzz/seeds INPUT...
//!
//! An INPUT is a dump, or a connection recorded by agent/src/http2/testdata/capture.py.
//! `fuzz/capture-seeds.sh` produces the dump and passes those recordings; see fuzz/README.md.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use tracer_fuzz::{CapturedSegment, encode_http1, h2::PREFACE};

/// Seeds stay small so libFuzzer's default `-max_len` (the largest seed, at least 4096) stays
/// near 4 KiB: later segments of a long connection are dropped.
const MAX_SEED_DATA: usize = 4096;

/// Seeds made from one long connection, at most.
const MAX_WINDOWS: usize = 4;

/// `Side::Unknown` (the parser learns it), re-cut replay in pieces of 7 bytes.
const CONFIG: u8 = 2 | (6 << 3);

const CONTEXT_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

struct Captured {
    ingress: bool,
    gap: u64,
    data: Vec<u8>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, inputs @ ..] = args.as_slice() else {
        bail!("usage: seeds_from_dump OUT_DIR INPUT...");
    };
    let mut conns: Vec<Vec<Captured>> = Vec::new();
    for input in inputs {
        let text = fs::read_to_string(input).with_context(|| format!("reading {input}"))?;
        if text
            .lines()
            .any(|line| line.starts_with("C ") || line.starts_with("S "))
        {
            conns.push(recording(&text)?);
        } else {
            conns.extend(dump(&text)?.into_values());
        }
    }
    let dirs = ["http1", "tracecontext", "http2", "hpack"].map(|name| Path::new(out).join(name));
    for dir in &dirs {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let [http1_dir, context_dir, http2_dir, hpack_dir] = &dirs;
    let mut contexts = BTreeSet::new();
    let mut new_seeds = [0; 4];
    for segments in &conns {
        // HTTP/2 with prior knowledge: the client's first bytes are the preface (the server
        // may speak first). An h2c upgrade starts as HTTP/1.1 and goes to the http1 target.
        let client = segments.iter().find(|s| s.data.starts_with(&PREFACE[..14]));
        let first_of = |ingress| {
            segments
                .iter()
                .find(|s| s.ingress == ingress && !s.data.is_empty())
        };
        if let Some(client) =
            client.filter(|c| first_of(c.ingress).is_some_and(|first| std::ptr::eq(first, *c)))
        {
            for seed in http2_seeds(segments) {
                new_seeds[2] += write_seed(http2_dir, &seed)?;
            }
            if let Some(blocks) = header_blocks(segments, client.ingress) {
                for seed in hpack_seeds(&blocks) {
                    new_seeds[3] += write_seed(hpack_dir, &seed)?;
                }
            }
            continue;
        }
        let mut total = 0;
        let kept: Vec<CapturedSegment<'_>> = segments
            .iter()
            .take_while(|s| {
                total += s.data.len();
                total <= MAX_SEED_DATA
            })
            .map(|s| CapturedSegment {
                ingress: s.ingress,
                gap_byte: (s.gap > 0).then(|| gap_byte(s.gap)),
                data: &s.data,
            })
            .collect();
        new_seeds[0] += write_seed(http1_dir, &encode_http1(CONFIG, &kept))?;
        for seg in segments {
            if let Some(lines) = context_lines(&seg.data) {
                contexts.insert(lines);
            }
        }
    }
    for lines in &contexts {
        new_seeds[1] += write_seed(context_dir, lines.as_bytes())?;
    }
    let [http1, context, http2, hpack] = new_seeds;
    eprintln!(
        "{} connections; new seeds: {http1} http1, {context} tracecontext, {http2} http2, \
         {hpack} hpack",
        conns.len()
    );
    Ok(())
}

/// The connections of an agent's `--dump=json` output, by connection id.
fn dump(text: &str) -> Result<BTreeMap<u64, Vec<Captured>>> {
    let mut conns: BTreeMap<u64, Vec<Captured>> = BTreeMap::new();
    let mut pending_gap: BTreeMap<(u64, bool), u64> = BTreeMap::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(kind), Some(conn)) = (event["event"].as_str(), event["conn"].as_u64()) else {
            continue;
        };
        // The dump names directions from the traced process: it reads what comes in.
        let ingress = event["direction"].as_str() == Some("read");
        match kind {
            "gap" => {
                *pending_gap.entry((conn, ingress)).or_default() +=
                    event["bytes"].as_u64().unwrap_or(0);
            }
            "data" => {
                let data = unhex(event["data_hex"].as_str().unwrap_or_default())?;
                let gap = pending_gap.remove(&(conn, ingress)).unwrap_or(0);
                // A syscall captured short (capture limit): its missing tail is a gap before
                // the next segment of that direction.
                let len = event["len"].as_u64().unwrap_or(0);
                let tail = len.saturating_sub(data.len() as u64);
                if tail > 0 {
                    *pending_gap.entry((conn, ingress)).or_default() += tail;
                }
                conns
                    .entry(conn)
                    .or_default()
                    .push(Captured { ingress, gap, data });
            }
            _ => {}
        }
    }
    Ok(conns)
}

/// One connection recorded by agent/src/http2/testdata/capture.py: `C HEX` for what the client
/// sent, `S HEX` for the server, one read per line; seen from the server.
fn recording(text: &str) -> Result<Vec<Captured>> {
    text.lines()
        .filter_map(|line| {
            let (who, hex) = line.split_once(' ')?;
            let ingress = match who {
                "C" => true,
                "S" => false,
                _ => return None,
            };
            Some(unhex(hex.trim()).map(|data| Captured {
                ingress,
                gap: 0,
                data,
            }))
        })
        .collect()
}

/// `tracer_agent::http2::fuzz_feed`'s format: a mode byte, then records of at most 255 bytes:
/// direction bit (1: read), gap flag and byte, length byte, data. A long connection becomes
/// up to [`MAX_WINDOWS`] seeds: its start (mode 2: seen from its start, side unknown), then
/// later stretches as connections joined mid-way (mode 6).
fn http2_seeds(segments: &[Captured]) -> Vec<Vec<u8>> {
    let mut seeds = vec![vec![2]];
    for seg in segments {
        if seeds
            .last()
            .is_some_and(|seed| seed.len() + seg.data.len() > MAX_SEED_DATA)
        {
            if seeds.len() == MAX_WINDOWS {
                break;
            }
            seeds.push(vec![6]);
        }
        let Some(out) = seeds.last_mut() else {
            break;
        };
        // A read larger than a seed keeps only its start; the next seed joins after it.
        let data = &seg.data[..seg.data.len().min(MAX_SEED_DATA)];
        let mut chunks: Vec<&[u8]> = data.chunks(255).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let gap = (i == 0 && seg.gap > 0).then(|| seg.gap.min(255) as u8);
            out.push(u8::from(seg.ingress) | if gap.is_some() { 2 } else { 0 });
            out.extend(gap);
            out.push(chunk.len() as u8);
            out.extend_from_slice(chunk);
        }
    }
    seeds
}

/// The `hpack` target's raw mode: config 0, then per block a direction byte (0: from the
/// client), a little-endian `u16` length and the block; up to [`MAX_WINDOWS`] seeds of
/// consecutive blocks (the later ones refer to table entries their seed does not insert).
fn hpack_seeds(blocks: &[(bool, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut seeds = vec![vec![0]];
    // A block too large for a seed is left out; the blocks after it refer to what it
    // inserted, which raw mode does not mind.
    for (from_client, block) in blocks.iter().filter(|(_, b)| b.len() < MAX_SEED_DATA / 2) {
        if seeds
            .last()
            .is_some_and(|seed| seed.len() + block.len() > MAX_SEED_DATA)
        {
            if seeds.len() == MAX_WINDOWS {
                break;
            }
            seeds.push(vec![0]);
        }
        let Some(out) = seeds.last_mut() else {
            break;
        };
        out.push(u8::from(!from_client));
        out.extend_from_slice(&(block.len() as u16).to_le_bytes());
        out.extend_from_slice(block);
    }
    seeds
}

/// The header blocks (HEADERS or PUSH_PROMISE plus CONTINUATIONs) of an HTTP/2 connection in
/// capture order, each with whether the client sent it. None if bytes were lost.
fn header_blocks(segments: &[Captured], client_ingress: bool) -> Option<Vec<(bool, Vec<u8>)>> {
    const PADDED: u8 = 0x8;
    const PRIORITY: u8 = 0x20;
    const END_HEADERS: u8 = 0x4;
    let mut bufs: [Vec<u8>; 2] = Default::default();
    let mut partial: [Vec<u8>; 2] = Default::default();
    let mut preface_left = PREFACE.len();
    let mut blocks = Vec::new();
    for seg in segments {
        if seg.gap > 0 {
            return None;
        }
        let from_client = seg.ingress == client_ingress;
        let k = usize::from(from_client);
        let buf = &mut bufs[k];
        buf.extend_from_slice(&seg.data);
        if from_client && preface_left > 0 {
            let n = preface_left.min(buf.len());
            buf.drain(..n);
            preface_left -= n;
        }
        while let Some(header) = buf.get(..9) {
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (kind, flags) = (header[3], header[4]);
            let Some(payload) = buf.get(9..9 + len) else {
                break;
            };
            let mut fragment = payload;
            if matches!(kind, 0x1 | 0x5) && flags & PADDED != 0 {
                let pad = usize::from(*fragment.first()?);
                fragment = fragment.get(1..fragment.len().checked_sub(pad)?)?;
            }
            match kind {
                0x1 if flags & PRIORITY != 0 => fragment = fragment.get(5..)?,
                0x5 => fragment = fragment.get(4..)?,
                _ => {}
            }
            if matches!(kind, 0x1 | 0x5 | 0x9) {
                partial[k].extend_from_slice(fragment);
                if flags & END_HEADERS != 0 {
                    blocks.push((from_client, std::mem::take(&mut partial[k])));
                }
            }
            buf.drain(..9 + len);
        }
    }
    Some(blocks)
}

/// The trace context headers of a message head at the start of `data`, one `name: value` per
/// line, if it has any.
fn context_lines(data: &[u8]) -> Option<String> {
    let head = data.split(|&b| b == b'\n').skip(1);
    let mut lines = String::new();
    for line in head {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        let Some((name, _)) = text.split_once(':') else {
            continue;
        };
        if CONTEXT_HEADERS
            .iter()
            .any(|known| name.eq_ignore_ascii_case(known))
        {
            lines.push_str(&text);
            lines.push('\n');
        }
    }
    (!lines.is_empty()).then_some(lines)
}

/// The gap byte whose `gap_len` is closest to `bytes` from below (exact up to 240).
fn gap_byte(bytes: u64) -> u8 {
    (0..=u8::MAX)
        .rev()
        .find(|&g| tracer_fuzz::gap_len(g) <= bytes)
        .unwrap_or(0)
}

/// Writes a seed named by its content hash, as libFuzzer names corpus entries; returns 1 if
/// it is new.
fn write_seed(dir: &Path, bytes: &[u8]) -> Result<usize> {
    // FNV-1a: stable across runs and platforms, enough to tell seeds apart.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("{hash:016x}"));
    if path.exists() {
        return Ok(0);
    }
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(1)
}

fn unhex(hex: &str) -> Result<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        bail!("odd hex length");
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .with_context(|| format!("bad hex {hex:?}"))
        })
        .collect()
}
