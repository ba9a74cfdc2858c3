//! Protocol stage: decides what each connection speaks from its first bytes and runs the
//! matching parser over its reassembled segments. HTTP/1.x today; anything else is left alone
//! (and counted), so redis, postgres or TLS bytes never become HTTP.
use std::collections::HashMap;

use crate::{
    conntrack::Role,
    http1::{self, Exchange, Http1Connection, Http1Error, Http1Limits, Side},
    streams::Segment,
};

/// Segments held per connection while detection needs more bytes.
const MAX_DETECT_SEGMENTS: usize = 4;

enum State {
    /// Not decided: segments wait here (bounded).
    Detecting(Vec<Segment>),
    Http1(Box<Http1Connection>),
    /// Not a protocol we parse (or it switched away, e.g. 101 Upgrade).
    Other,
}

/// What the stage had to skip, for the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProtocolStats {
    pub http1_connections: u64,
    pub other_connections: u64,
    /// Parse problems by reason.
    pub http1_errors: HashMap<Http1Error, u64>,
}

#[derive(Default)]
pub struct Protocols {
    conns: HashMap<u64, State>,
    pub stats: ProtocolStats,
}

fn side(role: Role) -> Side {
    match role {
        Role::Server => Side::Server,
        Role::Client => Side::Client,
        Role::Unknown => Side::Unknown,
    }
}

impl Protocols {
    /// Feeds one segment of a connection whose traced process has `role`.
    pub fn push(&mut self, segment: Segment, role: Role, out: &mut Vec<Exchange>) {
        let state = self
            .conns
            .entry(segment.conn_id)
            .or_insert_with(|| State::Detecting(Vec::new()));
        let mut errors = Vec::new();
        match state {
            State::Http1(parser) => {
                parser.push(&segment, out, &mut errors);
                if parser.is_done() {
                    *state = State::Other;
                }
            }
            State::Other => {}
            State::Detecting(held) => {
                let first: Vec<u8> = held
                    .iter()
                    .chain(std::iter::once(&segment))
                    .filter(|s| s.direction == segment.direction)
                    .flat_map(|s| s.data.iter().copied())
                    .take(64)
                    .collect();
                match http1::detect(&first) {
                    Some(true) => {
                        self.stats.http1_connections += 1;
                        let mut parser = Box::new(Http1Connection::new(
                            segment.conn_id,
                            side(role),
                            Http1Limits::default(),
                        ));
                        for held in held.drain(..) {
                            parser.push(&held, out, &mut errors);
                        }
                        parser.push(&segment, out, &mut errors);
                        *state = if parser.is_done() {
                            State::Other
                        } else {
                            State::Http1(parser)
                        };
                    }
                    Some(false) => {
                        self.stats.other_connections += 1;
                        *state = State::Other;
                    }
                    None if held.len() < MAX_DETECT_SEGMENTS => held.push(segment),
                    None => {
                        self.stats.other_connections += 1;
                        *state = State::Other;
                    }
                }
            }
        }
        self.count(errors);
    }

    /// The connection closed: finishes close-delimited messages, emits unanswered requests.
    pub fn close(&mut self, conn_id: u64, out: &mut Vec<Exchange>) {
        if let Some(State::Http1(mut parser)) = self.conns.remove(&conn_id) {
            let mut errors = Vec::new();
            parser.close(out, &mut errors);
            self.count(errors);
        }
    }

    fn count(&mut self, errors: Vec<Http1Error>) {
        for error in errors {
            *self.stats.http1_errors.entry(error).or_default() += 1;
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}
