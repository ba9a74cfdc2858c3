//! Protocol stage: decides what each connection speaks from its first bytes and runs the
//! matching parser over its reassembled segments: HTTP/1.x, HTTP/2 (prior knowledge, the
//! `Upgrade: h2c` path, or joined mid-connection). Anything else is left alone (and counted),
//! so redis, postgres or TLS bytes never become HTTP.
use std::collections::HashMap;

use crate::{
    conntrack::Role,
    field::{Arena, Field, Text},
    http1::{self, Exchange, Http1Connection, Http1Error, Http1Limits, Side},
    http2::{self, Http2Connection, Http2Error, Http2Event, Http2Exchange, Http2Limits},
    streams::Segment,
};

/// Segments held per connection while detection needs more bytes.
const MAX_DETECT_SEGMENTS: usize = 4;
/// Bytes of a direction detection looks at, at most.
const DETECT_BYTES: usize = 16 * 1024;

enum State {
    /// Not decided: segments wait here (bounded).
    Detecting(Vec<Segment>),
    Http1(Box<Http1Connection>),
    Http2(Box<Http2Connection>),
    /// Not a protocol we parse (or it switched to one we do not, e.g. websocket).
    Other,
}

/// A completed request/response exchange of any protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    Http1(Exchange),
    Http2(Http2Exchange),
    /// A started request that continues as another: the `Upgrade: h2c` request, whose
    /// answer is HTTP/2 stream 1. It makes no span.
    Replaced {
        conn_id: u64,
        seq: u64,
        end_ns: u64,
    },
}

impl Finished {
    pub fn conn_id(&self) -> u64 {
        match self {
            Finished::Http1(e) => e.conn_id,
            Finished::Http2(e) => e.conn_id,
            Finished::Replaced { conn_id, .. } => *conn_id,
        }
    }

    /// The request's index on its connection (HTTP/1) or its stream id (HTTP/2).
    pub fn seq(&self) -> u64 {
        match self {
            Finished::Http1(e) => e.seq,
            Finished::Http2(e) => u64::from(e.stream_id),
            Finished::Replaced { seq, .. } => *seq,
        }
    }

    /// When the exchange ended: the response's last byte, else the request's.
    pub fn end_ns(&self) -> u64 {
        let (start, end) = match self {
            Finished::Http1(e) => (
                e.request.msg.start_ns,
                e.response
                    .as_ref()
                    .map_or(e.request.msg.end_ns, |r| r.msg.end_ns),
            ),
            Finished::Http2(e) => (
                e.request.start_ns,
                e.response.as_ref().map_or(e.request.end_ns, |r| r.end_ns),
            ),
            Finished::Replaced { end_ns, .. } => (*end_ns, *end_ns),
        };
        end.max(start)
    }

    /// The request as the linking stage sees it (None for [`Finished::Replaced`]).
    pub fn start_info(&self) -> Option<StartInfo<'_>> {
        match self {
            Finished::Http1(e) => Some(StartInfo::http1(e.seq, &e.request)),
            Finished::Http2(e) => Some(StartInfo::http2(
                u64::from(e.stream_id),
                e.request.tid,
                e.request.start_ns,
                &e.request.headers,
            )),
            Finished::Replaced { .. } => None,
        }
    }
}

/// A request whose head has been parsed, while it is in flight.
#[derive(Clone, Debug)]
pub struct StartInfo<'a> {
    /// Index on the connection (HTTP/1) or stream id (HTTP/2).
    pub seq: u64,
    pub tid: u32,
    pub start_ns: u64,
    /// Shares the captured bytes: the linking stage keeps both without copying.
    pub method: Text,
    pub target: Text,
    /// Header fields (HTTP/2 pseudo-header fields included).
    pub headers: &'a [Field],
    /// `seq` is an HTTP/2 stream id, the same at both ends of the connection.
    pub http2: bool,
}

impl<'a> StartInfo<'a> {
    fn http1(seq: u64, request: &'a http1::Request) -> Self {
        Self {
            seq,
            tid: request.msg.tid,
            start_ns: request.msg.start_ns,
            method: request.method.clone(),
            target: request.target.clone(),
            headers: &request.msg.headers,
            http2: false,
        }
    }

    fn http2(seq: u64, tid: u32, start_ns: u64, headers: &'a [Field]) -> Self {
        let field = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| Text::from_utf8(v.clone()))
                .unwrap_or_default()
        };
        Self {
            seq,
            tid,
            start_ns,
            method: field(":method"),
            target: field(":path"),
            headers,
            http2: true,
        }
    }
}

/// What the stage had to skip, for the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProtocolStats {
    pub http1_connections: u64,
    pub http2_connections: u64,
    pub other_connections: u64,
    /// Parse problems by reason.
    pub http1_errors: HashMap<Http1Error, u64>,
    pub http2_errors: HashMap<Http2Error, u64>,
}

#[derive(Default)]
pub struct Protocols {
    conns: foldhash::HashMap<u64, State>,
    pub stats: ProtocolStats,
    h2_events: Vec<Http2Event>,
    h1_out: Vec<Exchange>,
    /// Where HTTP/1 header sections are kept.
    arena: Arena,
}

fn side(role: Role) -> Side {
    match role {
        Role::Server => Side::Server,
        Role::Client => Side::Client,
        Role::Unknown => Side::Unknown,
    }
}

/// Reports the requests whose head parsed during a push. The request is looked up in the
/// parser, or among the exchanges the push just emitted.
fn report_started(
    parser: &mut Http1Connection,
    emitted: &[Exchange],
    on_start: &mut dyn FnMut(StartInfo<'_>),
) {
    for seq in parser.take_started() {
        let request = parser
            .request(seq)
            .or_else(|| emitted.iter().find(|e| e.seq == seq).map(|e| &e.request));
        if let Some(request) = request {
            on_start(StartInfo::http1(seq, request));
        }
    }
}

/// What detection decided from a direction's first bytes.
enum Detected {
    Http1,
    Http2,
    Http2Midstream,
    Other,
    NeedMore,
}

fn detect(first: &[u8]) -> Detected {
    match http2::detect(first) {
        Some(true) => return Detected::Http2,
        None => return Detected::NeedMore,
        Some(false) => {}
    }
    match http1::detect(first) {
        Some(true) => return Detected::Http1,
        None => return Detected::NeedMore,
        Some(false) => {}
    }
    match http2::detect_midstream(first) {
        Some(true) => Detected::Http2Midstream,
        Some(false) => Detected::Other,
        None => Detected::NeedMore,
    }
}

/// The HTTP/1.1 request that switched the connection to h2c, as stream 1 of the HTTP/2
/// connection. Positions hold when it was the connection's first request, as h2c requires.
fn upgrade_request(exchange: &Exchange) -> Option<http2::UpgradeRequest> {
    let response = exchange.response.as_ref()?;
    if exchange.seq != 0 || response.status != 101 {
        return None;
    }
    let request = &exchange.request;
    Some(http2::UpgradeRequest {
        method: request.method.to_string(),
        target: request.target.to_string(),
        headers: request.msg.headers.clone(),
        start_ns: request.msg.start_ns,
        end_ns: request.msg.end_ns,
        tid: request.msg.tid,
        body_bytes: request.msg.body_bytes,
        request_dir_pos: request.msg.header_bytes as u64 + request.msg.body_bytes,
        response_dir_pos: response.msg.header_bytes as u64,
    })
}

impl Protocols {
    /// Feeds one segment of a connection whose traced process has `role`. Completed exchanges
    /// go to `out`; each request whose head parsed is also reported to `on_start` while it is
    /// in flight.
    pub fn push(
        &mut self,
        segment: Segment,
        role: Role,
        out: &mut Vec<Finished>,
        on_start: &mut dyn FnMut(StartInfo<'_>),
    ) {
        let conn_id = segment.conn_id;
        let mut state = self
            .conns
            .remove(&conn_id)
            .unwrap_or_else(|| State::Detecting(Vec::new()));
        state = match state {
            State::Http1(parser) => self.run_http1(parser, &[segment], out, on_start),
            State::Http2(mut parser) => {
                self.run_http2(&mut parser, &segment, out, on_start);
                if parser.is_done() {
                    State::Other
                } else {
                    State::Http2(parser)
                }
            }
            State::Other => State::Other,
            State::Detecting(mut held) => {
                let first: Vec<u8> = held
                    .iter()
                    .chain(std::iter::once(&segment))
                    .filter(|s| s.direction == segment.direction)
                    .flat_map(|s| s.data.iter().copied())
                    // HTTP/1 and the HTTP/2 preface need a few bytes; a connection joined
                    // mid-way needs a whole frame plus the next frame header.
                    .take(DETECT_BYTES)
                    .collect();
                match detect(&first) {
                    Detected::Http1 => {
                        self.stats.http1_connections += 1;
                        let parser = Box::new(Http1Connection::new(
                            conn_id,
                            side(role),
                            Http1Limits::default(),
                        ));
                        held.push(segment);
                        self.run_http1(parser, &held, out, on_start)
                    }
                    found @ (Detected::Http2 | Detected::Http2Midstream) => {
                        self.stats.http2_connections += 1;
                        let mut parser = Box::new(if matches!(found, Detected::Http2) {
                            Http2Connection::new(conn_id, side(role), Http2Limits::default())
                        } else {
                            Http2Connection::midstream(conn_id, side(role), Http2Limits::default())
                        });
                        held.push(segment);
                        for seg in &held {
                            self.run_http2(&mut parser, seg, out, on_start);
                        }
                        if parser.is_done() {
                            State::Other
                        } else {
                            State::Http2(parser)
                        }
                    }
                    Detected::NeedMore if held.len() < MAX_DETECT_SEGMENTS => {
                        held.push(segment);
                        State::Detecting(held)
                    }
                    Detected::NeedMore | Detected::Other => {
                        self.stats.other_connections += 1;
                        State::Other
                    }
                }
            }
        };
        self.conns.insert(conn_id, state);
    }

    fn run_http1(
        &mut self,
        mut parser: Box<Http1Connection>,
        segments: &[Segment],
        out: &mut Vec<Finished>,
        on_start: &mut dyn FnMut(StartInfo<'_>),
    ) -> State {
        let mut errors = Vec::new();
        let mut emitted = std::mem::take(&mut self.h1_out);
        for (i, segment) in segments.iter().enumerate() {
            parser.push(segment, &mut self.arena, &mut emitted, &mut errors);
            report_started(&mut parser, &emitted, on_start);
            if parser.is_done() {
                let h2c = parser.upgraded_protocol() == Some("h2c");
                let upgrade = emitted.iter().rposition(|e| upgrade_request(e).is_some());
                if h2c && let Some(index) = upgrade {
                    // The upgrade request's answer comes as HTTP/2 stream 1: its span comes
                    // from there, not from the 101.
                    let exchange = emitted.remove(index);
                    out.push(Finished::Replaced {
                        conn_id: exchange.conn_id,
                        seq: exchange.seq,
                        end_ns: exchange.request.msg.start_ns,
                    });
                    self.count_h1(errors);
                    out.extend(emitted.drain(..).map(Finished::Http1));
                    self.h1_out = emitted;
                    let Some(request) = upgrade_request(&exchange) else {
                        return State::Other;
                    };
                    self.stats.http2_connections += 1;
                    let mut h2 = Box::new(Http2Connection::upgraded(
                        exchange.conn_id,
                        parser.side(),
                        Http2Limits::default(),
                        request,
                    ));
                    // HTTP/2 bytes may follow the 101 in this very segment; positions tell.
                    for seg in &segments[i..] {
                        self.run_http2(&mut h2, seg, out, on_start);
                    }
                    return if h2.is_done() {
                        State::Other
                    } else {
                        State::Http2(h2)
                    };
                }
                break;
            }
        }
        self.count_h1(errors);
        out.extend(emitted.drain(..).map(Finished::Http1));
        self.h1_out = emitted;
        if parser.is_done() {
            State::Other
        } else {
            State::Http1(parser)
        }
    }

    fn run_http2(
        &mut self,
        parser: &mut Http2Connection,
        segment: &Segment,
        out: &mut Vec<Finished>,
        on_start: &mut dyn FnMut(StartInfo<'_>),
    ) {
        let mut errors = Vec::new();
        let mut events = std::mem::take(&mut self.h2_events);
        parser.push(segment, &mut events, &mut errors);
        self.take_h2_events(&mut events, out, on_start);
        self.h2_events = events;
        self.count_h2(errors);
    }

    fn take_h2_events(
        &mut self,
        events: &mut Vec<Http2Event>,
        out: &mut Vec<Finished>,
        on_start: &mut dyn FnMut(StartInfo<'_>),
    ) {
        for event in events.drain(..) {
            match event {
                Http2Event::RequestStarted {
                    stream_id,
                    start_ns,
                    tid,
                    headers,
                    ..
                } => on_start(StartInfo::http2(
                    u64::from(stream_id),
                    tid,
                    start_ns,
                    &headers,
                )),
                Http2Event::Exchange(exchange) => out.push(Finished::Http2(exchange)),
            }
        }
    }

    /// The connection closed: finishes close-delimited messages, emits unanswered requests.
    pub fn close(&mut self, conn_id: u64, out: &mut Vec<Finished>) {
        match self.conns.remove(&conn_id) {
            Some(State::Http1(mut parser)) => {
                let mut errors = Vec::new();
                let mut emitted = Vec::new();
                parser.close(&mut emitted, &mut errors);
                out.extend(emitted.into_iter().map(Finished::Http1));
                self.count_h1(errors);
            }
            Some(State::Http2(mut parser)) => {
                let mut errors = Vec::new();
                let mut events = Vec::new();
                parser.close(&mut events, &mut errors);
                // Nothing starts at close; exchanges only.
                self.take_h2_events(&mut events, out, &mut |_| {});
                self.count_h2(errors);
            }
            _ => {}
        }
    }

    fn count_h1(&mut self, errors: Vec<Http1Error>) {
        for error in errors {
            *self.stats.http1_errors.entry(error).or_default() += 1;
        }
    }

    fn count_h2(&mut self, errors: Vec<Http2Error>) {
        for error in errors {
            *self.stats.http2_errors.entry(error).or_default() += 1;
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::Direction;

    /// A capture of `C hex` (client to server) and `S hex` lines, as the server's segments.
    fn server_segments(text: &str) -> Vec<Segment> {
        let (mut pos, mut ts) = ([0u64; 2], 1_000u64);
        let mut out = Vec::new();
        for line in text.lines() {
            let (direction, hex) = match line.split_once(' ') {
                Some(("C", hex)) => (Direction::Ingress, hex),
                Some(("S", hex)) => (Direction::Egress, hex),
                _ => continue,
            };
            let data: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
                .collect();
            let slot = usize::from(direction == Direction::Egress);
            ts += 1_000;
            out.push(Segment {
                conn_id: 7,
                direction,
                tid: 1,
                pos: pos[slot],
                data: bytes::Bytes::from(data.clone()),
                gap_before: 0,
                enter_ns: ts,
                exit_ns: ts + 10,
            });
            pos[slot] += data.len() as u64;
        }
        out
    }

    #[test]
    fn an_h2c_upgrade_continues_as_http2_stream_1() {
        let segments = server_segments(include_str!("http2/testdata/curl_upgrade_h2c.txt"));
        let mut protocols = Protocols::default();
        let (mut out, mut started) = (Vec::new(), Vec::new());
        for segment in segments {
            protocols.push(segment, Role::Server, &mut out, &mut |info| {
                started.push((info.seq, info.method.to_string(), info.http2))
            });
        }
        protocols.close(7, &mut out);
        // The HTTP/1.1 request was announced as request 0, then replaced by stream 1.
        assert_eq!(started.first(), Some(&(0, "GET".to_owned(), false)));
        assert!(
            started.contains(&(1, "GET".to_owned(), true)),
            "{started:?}"
        );
        assert!(
            out.iter()
                .any(|f| matches!(f, Finished::Replaced { seq: 0, .. })),
            "{out:?}"
        );
        let streams: Vec<&Http2Exchange> = out
            .iter()
            .filter_map(|f| match f {
                Finished::Http2(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(streams.len(), 1, "{out:?}");
        assert_eq!(streams[0].stream_id, 1);
        assert_eq!(
            streams[0].response.as_ref().and_then(|r| r.status()),
            Some(200)
        );
        assert!(
            !out.iter().any(|f| matches!(f, Finished::Http1(_))),
            "no 101 span: {out:?}"
        );
        assert_eq!(protocols.stats.http2_connections, 1);
    }
}
