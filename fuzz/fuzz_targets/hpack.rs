//! HPACK decoding (`tracer_agent::http2`'s decoder, through the public connection API): header
//! blocks sent as HEADERS frames, each opening a new request stream on a server's
//! connection, with whole blocks lost on the way.
//!
//! Byte 0: bit 0 selects the mode, bit 1 tight limits (small dynamic table, header list and
//! block bounds). Then records, each starting with a control byte `c`:
//! * raw mode: `c` bit 0 sends the block as a response (else a request), bit 1 loses it;
//!   then a little-endian `u16` length and the block's bytes. Seeded with blocks from real
//!   traffic; checks the memory bounds and that nothing panics.
//! * oracle mode: `c` bit 0 loses the block, bit 1 starts it with a dynamic table size update
//!   to 16 times the next byte, bits 2-7 are its number of fields after `:method: GET`. Each
//!   field is a kind byte, a parameter byte and, for literals, a length byte and that many
//!   value bytes; `tracer_fuzz::h2::Encoder`, an independent encoder, encodes it and knows the
//!   field it stands for. Checks what the decoder promises: until a block is lost every field
//!   decodes exactly; after a loss, what it decodes is a subsequence of what was sent (it may
//!   leave fields out, never get one wrong), and a block it calls complete is exact.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tracer_agent::{
    http1::Side,
    http2::{Http2Connection, Http2Event, Http2Limits},
    streams::{Direction, Segment},
};
use tracer_fuzz::{
    CONN_ID,
    h2::{self, Encoder, NAMES, Repr},
};

const TIGHT: Http2Limits = Http2Limits {
    max_header_block_bytes: 512,
    max_header_list_bytes: 256,
    max_table_bytes: 256,
    max_streams: 4,
};

type Field = (Vec<u8>, Vec<u8>);

/// Feeds frames as segments; a lost frame becomes the next segment's gap.
struct Feeder {
    conn: Http2Connection,
    limits: Http2Limits,
    out: Vec<Http2Event>,
    errors: Vec<tracer_agent::http2::Http2Error>,
    pos: [u64; 2],
    lost: [u64; 2],
    t: u64,
}

impl Feeder {
    fn new(limits: Http2Limits) -> Self {
        let mut feeder = Self {
            // A server: requests are read (Ingress).
            conn: Http2Connection::new(CONN_ID, Side::Server, limits),
            limits,
            out: Vec::new(),
            errors: Vec::new(),
            pos: [0; 2],
            lost: [0; 2],
            t: 1_000,
        };
        let mut client = h2::PREFACE.to_vec();
        client.extend(h2::settings());
        feeder.send(Direction::Ingress, &client);
        feeder.send(Direction::Egress, &h2::settings());
        feeder
    }

    fn send(&mut self, direction: Direction, bytes: &[u8]) {
        let k = usize::from(direction == Direction::Ingress);
        let gap_before = std::mem::take(&mut self.lost[k]);
        self.pos[k] += gap_before;
        self.t += 10;
        let segment = Segment {
            conn_id: CONN_ID,
            direction,
            tid: 1,
            pos: self.pos[k],
            data: Bytes::copy_from_slice(bytes),
            gap_before,
            enter_ns: self.t,
            exit_ns: self.t + 5,
        };
        self.pos[k] += bytes.len() as u64;
        self.conn.push(&segment, &mut self.out, &mut self.errors);
        let limits = self.limits;
        assert!(self.conn.buffered() <= 2 * (limits.max_header_block_bytes + 6 * 32 + 8));
        assert!(self.conn.open_streams() <= limits.max_streams);
        assert!(self.conn.table_bytes() <= 2 * limits.max_table_bytes);
    }

    fn lose(&mut self, direction: Direction, bytes: &[u8]) {
        self.lost[usize::from(direction == Direction::Ingress)] += bytes.len() as u64;
    }

    fn close(mut self) -> Vec<Http2Event> {
        self.conn.close(&mut self.out, &mut self.errors);
        assert_eq!(self.conn.open_streams(), 0);
        self.out
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = input.split_at(n.min(input.len()));
    *input = tail;
    head
}

fn byte(input: &mut &[u8]) -> u8 {
    take(input, 1).first().copied().unwrap_or(0)
}

fn raw(mut input: &[u8], limits: Http2Limits) {
    let mut feeder = Feeder::new(limits);
    let mut stream = 1u32;
    while !input.is_empty() {
        let c = byte(&mut input);
        let len = u16::from_le_bytes([byte(&mut input), byte(&mut input)]);
        let block = take(&mut input, usize::from(len));
        let (direction, id) = if c & 1 == 0 {
            stream += 2;
            (Direction::Ingress, stream - 2)
        } else {
            (Direction::Egress, stream.saturating_sub(2).max(1))
        };
        let frames = h2::header_frames(id, block);
        if c & 2 != 0 {
            feeder.lose(direction, &frames);
        } else {
            feeder.send(direction, &frames);
        }
    }
    feeder.close();
}

/// One field from the input: its representation, then what the encoder says it stands for.
fn encode_field(input: &mut &[u8], encoder: &mut Encoder, block: &mut Vec<u8>) -> Option<Field> {
    let kind = byte(input);
    let p = usize::from(byte(input));
    let dynamic = encoder.dynamic_len();
    let static_index = 1 + p % 61;
    let any_index = if kind & 8 != 0 && dynamic > 0 {
        62 + p % dynamic
    } else {
        static_index
    };
    let name_index = (kind & 16 != 0).then_some(any_index);
    let repr = match kind % 5 {
        0 => Repr::Indexed(any_index),
        1 => Repr::Incremental(name_index),
        2 => Repr::WithoutIndexing(name_index),
        3 => Repr::NeverIndexed(name_index),
        _ => Repr::Incremental(None),
    };
    let mut value = Vec::new();
    if !matches!(repr, Repr::Indexed(_)) {
        let len = usize::from(byte(input) % 24);
        value = take(input, len).iter().map(|b| 0x20 + b % 0x5f).collect();
    }
    let name = NAMES[p % NAMES.len()].as_bytes();
    encoder.encode(repr, name, &value, block)
}

fn is_subsequence<T: PartialEq>(part: &[T], whole: &[T]) -> bool {
    let mut whole = whole.iter();
    part.iter().all(|x| whole.any(|y| y == x))
}

fn oracle(mut input: &[u8], limits: Http2Limits, tight: bool) {
    let mut feeder = Feeder::new(limits);
    let mut encoder = Encoder::default();
    // Stream id -> (fields sent, whether a block was lost before it).
    let mut sent: BTreeMap<u32, (Vec<Field>, bool)> = BTreeMap::new();
    let mut lost_any = false;
    let mut stream = 1u32;
    while !input.is_empty() {
        let c = byte(&mut input);
        let mut block = Vec::new();
        if c & 2 != 0 {
            let size = usize::from(byte(&mut input)) * 16;
            encoder.size_update(size, &mut block);
        }
        let mut fields = vec![
            encoder
                .encode(Repr::Indexed(2), b"", b"", &mut block)
                .expect("static entry 2 exists"),
        ];
        for _ in 0..c >> 2 {
            fields.extend(encode_field(&mut input, &mut encoder, &mut block));
        }
        let frames = h2::header_frames(stream, &block);
        if c & 1 != 0 {
            feeder.lose(Direction::Ingress, &frames);
            lost_any = true;
        } else {
            feeder.send(Direction::Ingress, &frames);
            sent.insert(stream, (fields, lost_any));
        }
        stream += 2;
    }
    let mut seen = 0;
    for event in feeder.close() {
        let Http2Event::RequestStarted {
            stream_id,
            headers,
            unnamed_values,
            incomplete_headers,
            ..
        } = event
        else {
            continue;
        };
        let (fields, after_loss) = sent.get(&stream_id).expect("a stream that was sent");
        seen += 1;
        let sent_fields: Vec<(&[u8], &[u8])> = fields
            .iter()
            .map(|(name, value)| (&name[..], &value[..]))
            .collect();
        let decoded: Vec<(&[u8], &[u8])> = headers
            .iter()
            .map(|(name, value)| (name.as_bytes(), &value[..]))
            .collect();
        let sent_values: Vec<&[u8]> = fields.iter().map(|(_, value)| &value[..]).collect();
        let unnamed: Vec<&[u8]> = unnamed_values.iter().map(|value| &value[..]).collect();
        assert!(
            is_subsequence(&decoded, &sent_fields),
            "stream {stream_id}: decoded {decoded:?}, sent {sent_fields:?}"
        );
        assert!(is_subsequence(&unnamed, &sent_values));
        if !incomplete_headers {
            assert_eq!(decoded, sent_fields, "stream {stream_id} complete");
        }
        if !after_loss && !tight {
            assert!(!incomplete_headers, "stream {stream_id}: nothing was lost");
            assert_eq!(decoded, sent_fields);
        }
    }
    if !lost_any && !tight {
        assert_eq!(seen, sent.len(), "one RequestStarted per block");
    }
}

fuzz_target!(|input: &[u8]| {
    let (&config, rest) = input.split_first().unwrap_or((&0, &[]));
    let tight = config & 2 != 0;
    let limits = if tight { TIGHT } else { Http2Limits::default() };
    if config & 1 == 0 {
        raw(rest, limits);
    } else {
        oracle(rest, limits, tight);
    }
});
