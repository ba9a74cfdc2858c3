//! HTTP/1 parser (`tracer_agent::http1`): one connection fed arbitrary segments in both
//! directions, with gaps, then closed; and `detect` on each segment.
//!
//! Besides not panicking (a stall trips the parser's own debug assertion here), it checks what
//! the module promises: the buffering and pipelining bounds, nothing left behind after close,
//! and that where the bytes are cut does not change the result. The input format is
//! [`tracer_fuzz::Http1Input`].
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::{
    http1::{self, Exchange, Http1Connection, Http1Error, Http1Limits, Side, Stop},
    streams::{Direction, Segment},
};
use tracer_fuzz::{CONN_ID, Http1Input};

/// Longest prefix `detect` is checked on byte by byte: past the longest method it decides.
const DETECT_PREFIX: usize = 16;

struct Outcome {
    exchanges: Vec<Exchange>,
    errors: Vec<Http1Error>,
    stop: Option<Stop>,
    side: Side,
}

fn run(side: Side, limits: Http1Limits, segments: &[Segment]) -> Outcome {
    let mut conn = Http1Connection::new(CONN_ID, side, limits);
    let mut exchanges = Vec::new();
    let mut errors = Vec::new();
    for seg in segments {
        conn.push(seg, &mut exchanges, &mut errors);
        assert!(
            conn.buffered() <= 2 * limits.max_header_bytes,
            "buffered {} bytes, limit {}",
            conn.buffered(),
            limits.max_header_bytes
        );
        assert!(conn.pending_requests() <= limits.max_pipelined.max(1));
    }
    conn.close(&mut exchanges, &mut errors);
    assert_eq!(conn.buffered(), 0, "bytes still buffered after close");
    assert_eq!(
        conn.pending_requests(),
        0,
        "requests still pending after close"
    );
    for exchange in &exchanges {
        assert_eq!(exchange.conn_id, CONN_ID);
        assert!(exchange.request.version <= 1);
        assert!(exchange.request.msg.header_bytes > 0);
        if let Some(response) = &exchange.response {
            assert!(response.version <= 1);
            assert!(response.msg.header_bytes > 0);
            // A response cannot start before the request it answers.
            assert!(response.msg.start_ns >= exchange.request.msg.start_ns);
        }
    }
    Outcome {
        exchanges,
        errors,
        stop: conn.stop_reason().cloned(),
        side: conn.side(),
    }
}

/// Once `detect` decides on a prefix, longer prefixes get the same answer.
fn check_detect(data: &[u8]) {
    let mut decided = None;
    for len in 0..=data.len().min(DETECT_PREFIX) {
        let now = http1::detect(&data[..len]);
        if decided.is_some() {
            assert_eq!(now, decided, "detect changed its mind at {len} bytes");
        }
        decided = decided.or(now);
    }
    if let Some(decided) = decided {
        assert_eq!(http1::detect(data), Some(decided));
    }
}

fuzz_target!(|input: &[u8]| {
    let input = Http1Input::decode(input);
    // The agent calls detect on the first bytes of each direction.
    for direction in [Direction::Egress, Direction::Ingress] {
        if let Some(first) = input
            .segments
            .iter()
            .find(|s| s.direction == direction && !s.data.is_empty())
        {
            check_detect(&first.data);
        }
    }
    let whole = run(input.side, input.limits, &input.segments);
    let recut = run(input.side, input.limits, &input.recut());
    // Segment starts are resynchronisation candidates, so cutting may change what is found
    // after sync was lost; without any error nothing was lost, and cutting must not matter.
    if whole.errors.is_empty() || recut.errors.is_empty() {
        assert_eq!(whole.errors, recut.errors);
        assert_eq!(whole.exchanges, recut.exchanges);
        assert_eq!(whole.stop, recut.stop);
        assert_eq!(whole.side, recut.side);
    }
});
