//! HTTP/2 connection (`tracer_agent::http2`): frames and header blocks in both directions with
//! arbitrary segmentation, gaps and early close, on a connection seen from its start, joined
//! mid-way, or upgraded from HTTP/1.1 (h2c). The input format and the checks (memory bounds,
//! nothing left open after close) are those of the module's own entry point,
//! `tracer_agent::http2::fuzz_feed`, which its author keeps in step with the parser. Also the
//! detection run on a connection's first bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::http2;

/// The client connection preface's length: `detect` decides within it.
const PREFACE_LEN: usize = 24;

fuzz_target!(|input: &[u8]| {
    http2::fuzz_feed(input);
    let _ = http2::detect_midstream(input);
    // Once decided on a prefix, more bytes do not change the answer.
    if let Some(decided) = http2::detect(&input[..input.len().min(PREFACE_LEN)]) {
        assert_eq!(http2::detect(input), Some(decided));
    }
});
