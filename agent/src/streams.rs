//! Per-direction byte-stream reassembly for captured TCP socket I/O.
//!
//! This module owns turning syscall records (placed by their byte position in one direction of
//! a connection) back into an ordered byte stream: it delivers in-order records at once, holds
//! records that arrive ahead of a hole until the hole fills, trims bytes that were already
//! delivered, and declares gaps for truncated records and for holes that never fill (reorder
//! window expired, memory bound hit, connection closed). Everything it gives up is counted in
//! [`StreamStats`].
//!
//! It does not own connection lifecycle (the caller calls [`Streams::close`]), clocks (the
//! caller passes `now_ns` to [`Streams::flush_expired`]) or parsing of the delivered bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, Bytes};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Written by the traced process.
    Egress,
    /// Read by the traced process.
    Ingress,
}

/// One syscall's worth of bytes, as assembled by the capture stage.
#[derive(Clone, Debug)]
pub struct SyscallData {
    pub conn_id: u64,
    pub direction: Direction,
    pub tid: u32,
    /// Stream position of the syscall's first byte.
    pub pos: u64,
    /// Bytes the syscall moved (>= `data.len()`; a smaller value is treated as `data.len()`).
    pub len: u64,
    /// Captured prefix, contiguous from `pos`.
    pub data: Bytes,
    /// Monotonic ns at syscall entry.
    pub enter_ns: u64,
    /// Monotonic ns at syscall exit.
    pub exit_ns: u64,
}

/// Contiguous bytes delivered in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub conn_id: u64,
    pub direction: Direction,
    pub tid: u32,
    pub pos: u64,
    /// Empty only when the segment just reports a gap (a truncated syscall's missing tail).
    pub data: Bytes,
    /// Bytes known missing immediately before `pos` (0 = contiguous with the previous segment).
    pub gap_before: u64,
    pub enter_ns: u64,
    pub exit_ns: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// Out-of-order bytes held per direction before the hole is declared a gap.
    pub max_pending_per_direction: usize,
    /// Out-of-order bytes held across all connections.
    pub max_pending_total: usize,
    /// How long an out-of-order record waits (measured from its `exit_ns`) for the hole before
    /// it to fill.
    pub reorder_window: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_pending_per_direction: 256 * 1024,
            max_pending_total: 64 * 1024 * 1024,
            reorder_window: Duration::from_millis(200),
        }
    }
}

/// Counts of what reassembly had to give up; every one is visible to the user as a metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes declared missing (truncation + holes never filled).
    pub gap_bytes: u64,
    /// The part of `gap_bytes` that was known missing from the start: syscalls whose tail was
    /// not captured (capture limit, sendfile). Not a loss of the agent's; the rest of
    /// `gap_bytes` is.
    pub truncated_bytes: u64,
    /// Number of gaps declared.
    pub gaps: u64,
    /// Captured bytes dropped because their position was already delivered.
    pub duplicate_bytes: u64,
    /// Pending bytes released early because a memory bound was hit.
    pub overflow_bytes: u64,
    /// Records that arrived ahead of a hole and were later placed when the hole filled.
    pub reordered: u64,
}

/// Charged against the pending limits for every held record on top of its captured bytes.
///
/// Without it, records with little or no captured data (fully truncated syscalls) could be
/// held in unbounded numbers under a byte-only bound. Roughly the record plus its two index
/// entries.
pub const HELD_RECORD_OVERHEAD: usize = 160;

/// Orders held records of one direction by position; `seq` keeps duplicates at one position
/// apart.
type HeldKey = (u64, u64);

/// Orders held records of all connections by age: (`exit_ns`, `seq`).
type AgeKey = (u64, u64);

/// Where a held record lives, so expiry and the global bound can find it from the age index.
#[derive(Clone, Copy, Debug)]
struct AgeRef {
    conn_id: u64,
    direction: Direction,
    held: HeldKey,
}

/// State shared by all connections, split from the connection map so a direction's state and
/// the shared state can be borrowed at once.
struct Core {
    limits: StreamLimits,
    window_ns: u64,
    stats: StreamStats,
    /// Every held record, oldest first; the reorder window and the global bound evict from
    /// the front.
    by_age: BTreeMap<AgeKey, AgeRef>,
    next_seq: u64,
    /// Captured bytes held, all connections.
    pending_data: usize,
    /// `pending_data` plus `HELD_RECORD_OVERHEAD` per held record; what the limits bound.
    pending_cost: usize,
}

#[derive(Default)]
struct Conn {
    egress: Option<DirState>,
    ingress: Option<DirState>,
}

impl Conn {
    fn slot(&mut self, direction: Direction) -> &mut Option<DirState> {
        match direction {
            Direction::Egress => &mut self.egress,
            Direction::Ingress => &mut self.ingress,
        }
    }
}

/// One direction of one connection.
///
/// Invariant between public calls: every held record starts after `expected` (otherwise it
/// would have been delivered).
struct DirState {
    /// Next stream position to deliver.
    expected: u64,
    /// Gap bytes declared (and counted) but not yet reported as a segment's `gap_before`.
    pending_gap: u64,
    held: BTreeMap<HeldKey, SyscallData>,
    held_data: usize,
    held_cost: usize,
}

/// Why held records are being delivered: only a filled hole counts as reordering.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Release {
    Filled,
    Forced,
}

fn held_cost(record: &SyscallData) -> usize {
    record.data.len().saturating_add(HELD_RECORD_OVERHEAD)
}

impl DirState {
    fn new(start: u64) -> Self {
        Self {
            expected: start,
            pending_gap: 0,
            held: BTreeMap::new(),
            held_data: 0,
            held_cost: 0,
        }
    }

    fn declare_gap(&mut self, bytes: u64, stats: &mut StreamStats) {
        if bytes == 0 {
            return;
        }
        stats.gaps += 1;
        stats.gap_bytes = stats.gap_bytes.saturating_add(bytes);
        self.pending_gap = self.pending_gap.saturating_add(bytes);
    }

    /// Delivers a record that starts at or before `expected`. Returns whether it advanced
    /// `expected` (a fully duplicate record does not).
    fn deliver(
        &mut self,
        record: SyscallData,
        stats: &mut StreamStats,
        out: &mut Vec<Segment>,
    ) -> bool {
        // `normalize` made `len >= data.len()` and `pos + data.len()` representable.
        let end = record.pos.saturating_add(record.len);
        if end <= self.expected {
            stats.duplicate_bytes = stats
                .duplicate_bytes
                .saturating_add(record.data.len() as u64);
            return false;
        }
        let behind = self.expected.saturating_sub(record.pos);
        // `cut <= data.len()`, so the narrowing cannot lose anything.
        let cut = behind.min(record.data.len() as u64) as usize;
        stats.duplicate_bytes = stats.duplicate_bytes.saturating_add(cut as u64);
        // Advanced rather than sliced: slicing a `Bytes` made from a `Vec` (what capture hands
        // over) allocates to share it, and nothing else holds this one.
        let mut data = record.data;
        data.advance(cut);
        if !data.is_empty() {
            // Non-empty remainder means `cut == behind`, so it starts exactly at `expected`.
            let pos = self.expected;
            self.expected = pos.saturating_add(data.len() as u64);
            out.push(Segment {
                conn_id: record.conn_id,
                direction: record.direction,
                tid: record.tid,
                pos,
                data,
                gap_before: std::mem::take(&mut self.pending_gap),
                enter_ns: record.enter_ns,
                exit_ns: record.exit_ns,
            });
        }
        // The uncaptured tail of a truncated syscall will never arrive: it is a gap now, and
        // is reported at once by an empty segment, so a parser can finish a message whose last
        // bytes were not captured instead of waiting for the next syscall.
        let tail = end - self.expected;
        self.declare_gap(tail, stats);
        stats.truncated_bytes = stats.truncated_bytes.saturating_add(tail);
        self.expected = end;
        if tail > 0 {
            out.push(Segment {
                conn_id: record.conn_id,
                direction: record.direction,
                tid: record.tid,
                pos: end,
                data: Bytes::new(),
                gap_before: std::mem::take(&mut self.pending_gap),
                enter_ns: record.enter_ns,
                exit_ns: record.exit_ns,
            });
        }
        true
    }

    fn hold(&mut self, record: SyscallData, core: &mut Core) {
        let seq = core.next_seq;
        core.next_seq = core.next_seq.wrapping_add(1);
        let cost = held_cost(&record);
        let key = (record.pos, seq);
        core.by_age.insert(
            (record.exit_ns, seq),
            AgeRef {
                conn_id: record.conn_id,
                direction: record.direction,
                held: key,
            },
        );
        self.held_data = self.held_data.saturating_add(record.data.len());
        self.held_cost = self.held_cost.saturating_add(cost);
        core.pending_data = core.pending_data.saturating_add(record.data.len());
        core.pending_cost = core.pending_cost.saturating_add(cost);
        self.held.insert(key, record);
    }

    /// Delivers held records that the stream has reached, in position order.
    fn drain_ready(&mut self, core: &mut Core, out: &mut Vec<Segment>, why: Release) {
        while let Some(entry) = self.held.first_entry() {
            if entry.key().0 > self.expected {
                break;
            }
            let ((_, seq), record) = entry.remove_entry();
            let cost = held_cost(&record);
            self.held_data = self.held_data.saturating_sub(record.data.len());
            self.held_cost = self.held_cost.saturating_sub(cost);
            core.pending_data = core.pending_data.saturating_sub(record.data.len());
            core.pending_cost = core.pending_cost.saturating_sub(cost);
            core.by_age.remove(&(record.exit_ns, seq));
            if self.deliver(record, &mut core.stats, out) && why == Release::Filled {
                core.stats.reordered += 1;
            }
        }
    }

    /// Gives up on the lowest hole and delivers what waited behind it. Delivery must stay in
    /// order, so the lowest hole is the only one that can be released.
    fn release_first_hole(&mut self, core: &mut Core, out: &mut Vec<Segment>) {
        let Some((&(pos, _), _)) = self.held.first_key_value() else {
            return;
        };
        if pos > self.expected {
            self.declare_gap(pos - self.expected, &mut core.stats);
            self.expected = pos;
        }
        self.drain_ready(core, out, Release::Forced);
    }

    /// Releases holes until the held record `through` (and everything before it) is delivered.
    fn release_through(&mut self, through: HeldKey, core: &mut Core, out: &mut Vec<Segment>) {
        while self
            .held
            .first_key_value()
            .is_some_and(|(k, _)| *k <= through)
        {
            self.release_first_hole(core, out);
        }
    }

    fn release_all(&mut self, core: &mut Core, out: &mut Vec<Segment>) {
        while !self.held.is_empty() {
            self.release_first_hole(core, out);
        }
    }
}

/// Makes a record self-consistent so the rest of the module can rely on it.
fn normalize(record: &mut SyscallData) {
    // Bytes past u64::MAX have no position; dropping them keeps every end representable.
    let room = u64::MAX - record.pos;
    if record.data.len() as u64 > room {
        log::debug!(
            "conn {} record at {} runs past the end of the position space; truncating",
            record.conn_id,
            record.pos
        );
        // `room < data.len()`, so it fits in usize.
        record.data.truncate(room as usize);
    }
    // The capture stage promises len >= data.len(); if it is wrong the captured bytes win.
    record.len = record.len.max(record.data.len() as u64);
}

/// Releases one aged held record (and every hole before it); returns captured bytes released.
fn release_aged(
    conns: &mut foldhash::HashMap<u64, Conn>,
    core: &mut Core,
    age_key: AgeKey,
    age: AgeRef,
    out: &mut Vec<Segment>,
) -> usize {
    let mut released = 0;
    if let Some(dir) = conns
        .get_mut(&age.conn_id)
        .and_then(|conn| conn.slot(age.direction).as_mut())
    {
        let before = dir.held_data;
        dir.release_through(age.held, core, out);
        released = before.saturating_sub(dir.held_data);
    }
    // Normally already gone; removing it again guarantees callers looping on the age index
    // make progress even if the indexes ever disagreed.
    core.by_age.remove(&age_key);
    released
}

/// Reassembles the byte streams of all traced connections.
pub struct Streams {
    conns: foldhash::HashMap<u64, Conn>,
    core: Core,
}

impl Streams {
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            conns: Default::default(),
            core: Core {
                limits,
                window_ns: u64::try_from(limits.reorder_window.as_nanos()).unwrap_or(u64::MAX),
                stats: StreamStats::default(),
                by_age: BTreeMap::new(),
                next_seq: 0,
                pending_data: 0,
                pending_cost: 0,
            },
        }
    }

    /// Places one record; appends every segment that became deliverable to `out`, in order.
    ///
    /// Records with `len == 0` and no data carry nothing and are ignored (they do not start a
    /// stream). With a memory bound hit, `out` may also receive segments of other connections.
    pub fn push(&mut self, mut record: SyscallData, out: &mut Vec<Segment>) {
        normalize(&mut record);
        if record.len == 0 {
            return;
        }
        let Self { conns, core } = self;
        let start = record.pos;
        // The only map access on the in-order path.
        let dir = conns
            .entry(record.conn_id)
            .or_default()
            .slot(record.direction)
            // The first record seen defines the start: the connection may predate the agent.
            .get_or_insert_with(|| DirState::new(start));

        if record.pos <= dir.expected {
            if dir.deliver(record, &mut core.stats, out) && !dir.held.is_empty() {
                dir.drain_ready(core, out, Release::Filled);
            }
            return;
        }

        dir.hold(record, core);
        if dir.held_cost > core.limits.max_pending_per_direction {
            let before = dir.held_data;
            while dir.held_cost > core.limits.max_pending_per_direction && !dir.held.is_empty() {
                dir.release_first_hole(core, out);
            }
            let released = before.saturating_sub(dir.held_data);
            log::debug!("per-direction reorder bound hit; released {released} bytes");
            core.stats.overflow_bytes = core.stats.overflow_bytes.saturating_add(released as u64);
        }
        if core.pending_cost > core.limits.max_pending_total {
            // Evict the oldest held records of any connection: they are the likeliest to be
            // behind holes that will never fill.
            let mut released = 0usize;
            while core.pending_cost > core.limits.max_pending_total {
                let Some((&age_key, &age)) = core.by_age.first_key_value() else {
                    break;
                };
                released = released.saturating_add(release_aged(conns, core, age_key, age, out));
            }
            log::debug!("total reorder bound hit; released {released} bytes");
            core.stats.overflow_bytes = core.stats.overflow_bytes.saturating_add(released as u64);
        }
    }

    /// Declares holes older than the reorder window (relative to `now_ns`) as gaps and
    /// delivers what waited behind them.
    ///
    /// A held record expires when `now_ns - exit_ns > reorder_window`; one with `exit_ns` in
    /// the future waits until then (or until a memory bound or `close`).
    pub fn flush_expired(&mut self, now_ns: u64, out: &mut Vec<Segment>) {
        let Self { conns, core } = self;
        while let Some((&age_key, &age)) = core.by_age.first_key_value() {
            if now_ns.saturating_sub(age_key.0) <= core.window_ns {
                // The index is ordered by exit_ns: everything after this is younger.
                break;
            }
            release_aged(conns, core, age_key, age, out);
        }
    }

    /// Forgets a connection (closed); delivers whatever was pending for it first (with gaps).
    pub fn close(&mut self, conn_id: u64, out: &mut Vec<Segment>) {
        let Some(mut conn) = self.conns.remove(&conn_id) else {
            return;
        };
        for dir in [conn.egress.as_mut(), conn.ingress.as_mut()]
            .into_iter()
            .flatten()
        {
            dir.release_all(&mut self.core, out);
        }
    }

    /// Captured bytes currently held out of order, all connections.
    pub fn pending_bytes(&self) -> usize {
        self.core.pending_data
    }

    /// Connections with state (at least one record seen and not closed).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn stats(&self) -> StreamStats {
        self.core.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const E: Direction = Direction::Egress;
    const I: Direction = Direction::Ingress;

    /// A record whose syscall moved exactly the captured bytes.
    fn rec(conn: u64, dir: Direction, pos: u64, data: &'static [u8], exit_ns: u64) -> SyscallData {
        rec_len(conn, dir, pos, data, data.len() as u64, exit_ns)
    }

    fn rec_len(
        conn: u64,
        dir: Direction,
        pos: u64,
        data: &'static [u8],
        len: u64,
        exit_ns: u64,
    ) -> SyscallData {
        SyscallData {
            conn_id: conn,
            direction: dir,
            tid: 7,
            pos,
            len,
            data: Bytes::from_static(data),
            enter_ns: exit_ns.saturating_sub(1),
            exit_ns,
        }
    }

    /// The segment a record (delivered whole) produces.
    fn seg(
        conn: u64,
        dir: Direction,
        pos: u64,
        data: &'static [u8],
        gap_before: u64,
        exit_ns: u64,
    ) -> Segment {
        Segment {
            conn_id: conn,
            direction: dir,
            tid: 7,
            pos,
            data: Bytes::from_static(data),
            gap_before,
            enter_ns: exit_ns.saturating_sub(1),
            exit_ns,
        }
    }

    enum Step {
        Push(SyscallData),
        Flush(u64),
        Close(u64),
    }
    use Step::{Close, Flush, Push};

    struct Case {
        name: &'static str,
        limits: StreamLimits,
        steps: Vec<Step>,
        want: Vec<Segment>,
        stats: StreamStats,
        pending: usize,
        connections: usize,
    }

    const MS: u64 = 1_000_000;
    const WINDOW: u64 = 200 * MS;

    fn run(case: Case) {
        let mut streams = Streams::new(case.limits);
        let mut out = Vec::new();
        for step in case.steps {
            match step {
                Push(r) => streams.push(r, &mut out),
                Flush(now) => streams.flush_expired(now, &mut out),
                Close(conn) => streams.close(conn, &mut out),
            }
            check_invariants(&streams);
        }
        assert_eq!(out, case.want, "{}: segments", case.name);
        assert_eq!(streams.stats(), case.stats, "{}: stats", case.name);
        assert_eq!(
            streams.pending_bytes(),
            case.pending,
            "{}: pending",
            case.name
        );
        assert_eq!(
            streams.connections(),
            case.connections,
            "{}: connections",
            case.name
        );
    }

    /// Bookkeeping agrees with the held records and the limits hold.
    fn check_invariants(streams: &Streams) {
        let limits = streams.core.limits;
        let (mut data, mut cost, mut records) = (0, 0, 0);
        for conn in streams.conns.values() {
            for dir in [&conn.egress, &conn.ingress].into_iter().flatten() {
                let d: usize = dir.held.values().map(|r| r.data.len()).sum();
                let c: usize = dir.held.values().map(held_cost).sum();
                assert_eq!(dir.held_data, d);
                assert_eq!(dir.held_cost, c);
                assert!(dir.held_cost <= limits.max_pending_per_direction);
                assert!(dir.held.keys().all(|&(pos, _)| pos > dir.expected));
                data += d;
                cost += c;
                records += dir.held.len();
            }
        }
        assert_eq!(streams.core.pending_data, data);
        assert_eq!(streams.core.pending_cost, cost);
        assert_eq!(streams.core.by_age.len(), records);
        assert!(streams.core.pending_cost <= limits.max_pending_total);
        assert!(streams.pending_bytes() <= limits.max_pending_total);
    }

    #[test]
    fn in_order() {
        let d = StreamLimits::default();
        run(Case {
            name: "in order",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"abc", 10)),
                Push(rec(1, E, 3, b"de", 20)),
            ],
            want: vec![seg(1, E, 0, b"abc", 0, 10), seg(1, E, 3, b"de", 0, 20)],
            stats: StreamStats::default(),
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn truncated_record_then_next() {
        let d = StreamLimits::default();
        run(Case {
            name: "truncated record then next",
            limits: d,
            steps: vec![
                Push(rec_len(1, E, 0, b"ab", 5, 10)),
                Push(rec(1, E, 5, b"xyz", 20)),
            ],
            want: vec![
                seg(1, E, 0, b"ab", 0, 10),
                // The missing tail is reported at once, by an empty segment.
                seg(1, E, 5, b"", 3, 10),
                seg(1, E, 5, b"xyz", 0, 20),
            ],
            stats: StreamStats {
                gap_bytes: 3,
                truncated_bytes: 3,
                gaps: 1,
                ..Default::default()
            },
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn nothing_captured_no_segment_whole_length_is_a_gap() {
        let d = StreamLimits::default();
        run(Case {
            name: "nothing captured: no segment, whole length is a gap",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"a", 10)),
                Push(rec_len(1, E, 1, b"", 4, 20)),
                Push(rec(1, E, 5, b"b", 30)),
            ],
            want: vec![
                seg(1, E, 0, b"a", 0, 10),
                seg(1, E, 5, b"", 4, 20),
                seg(1, E, 5, b"b", 0, 30),
            ],
            stats: StreamStats {
                gap_bytes: 4,
                truncated_bytes: 4,
                gaps: 1,
                ..Default::default()
            },
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn out_of_order_pair() {
        let d = StreamLimits::default();
        run(Case {
            name: "out-of-order pair",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"ab", 10)),
                Push(rec(1, E, 4, b"ef", 30)),
                Push(rec(1, E, 2, b"cd", 20)),
            ],
            want: vec![
                seg(1, E, 0, b"ab", 0, 10),
                seg(1, E, 2, b"cd", 0, 20),
                seg(1, E, 4, b"ef", 0, 30),
            ],
            stats: StreamStats {
                reordered: 1,
                ..Default::default()
            },
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn hole_never_filled_gap_after_the_reorder_window() {
        let d = StreamLimits::default();
        run(Case {
            name: "hole never filled: gap after the reorder window",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"ab", 10)),
                Push(rec(1, E, 4, b"ef", 1000)),
                Push(rec(1, E, 6, b"gh", 2000)),
                // Exactly at the window: not older than it yet.
                Flush(1000 + WINDOW),
            ],
            want: vec![seg(1, E, 0, b"ab", 0, 10)],
            stats: StreamStats::default(),
            pending: 4,
            connections: 1,
        });
    }

    #[test]
    fn hole_never_filled_flushed_one_ns_later() {
        let d = StreamLimits::default();
        run(Case {
            name: "hole never filled: flushed one ns later",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"ab", 10)),
                Push(rec(1, E, 4, b"ef", 1000)),
                Push(rec(1, E, 6, b"gh", 2000)),
                Flush(1001 + WINDOW),
                // A filler arriving after the gap was declared is a duplicate.
                Push(rec(1, E, 2, b"cd", 3000)),
            ],
            want: vec![
                seg(1, E, 0, b"ab", 0, 10),
                seg(1, E, 4, b"ef", 2, 1000),
                seg(1, E, 6, b"gh", 0, 2000),
            ],
            stats: StreamStats {
                gap_bytes: 2,
                gaps: 1,
                duplicate_bytes: 2,
                ..Default::default()
            },
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn expiry_releases_only_holes_up_to_the_expired_record() {
        let d = StreamLimits::default();
        run(Case {
            name: "expiry releases only holes up to the expired record",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"a", 10)),
                Push(rec(1, E, 2, b"c", 100)),
                Push(rec(1, E, 4, b"e", WINDOW + 100)),
                Flush(WINDOW + 101),
            ],
            want: vec![seg(1, E, 0, b"a", 0, 10), seg(1, E, 2, b"c", 1, 100)],
            stats: StreamStats {
                gap_bytes: 1,
                gaps: 1,
                ..Default::default()
            },
            pending: 1,
            connections: 1,
        });
    }

    #[test]
    fn per_direction_overflow_releases_the_lowest_hole() {
        let d = StreamLimits::default();
        run(Case {
            name: "per-direction overflow releases the lowest hole",
            limits: StreamLimits {
                max_pending_per_direction: 2 * HELD_RECORD_OVERHEAD + 10,
                ..d
            },
            steps: vec![
                Push(rec(1, E, 0, b"a", 10)),
                Push(rec(1, E, 10, b"kkkkkk", 20)),
                Push(rec(1, E, 20, b"uuuuuu", 30)),
            ],
            want: vec![seg(1, E, 0, b"a", 0, 10), seg(1, E, 10, b"kkkkkk", 9, 20)],
            stats: StreamStats {
                gap_bytes: 9,
                gaps: 1,
                overflow_bytes: 6,
                ..Default::default()
            },
            pending: 6,
            connections: 1,
        });
    }

    #[test]
    fn total_overflow_evicts_the_oldest_record_of_any_connection() {
        let d = StreamLimits::default();
        run(Case {
            name: "total overflow evicts the oldest record of any connection",
            limits: StreamLimits {
                max_pending_total: 2 * HELD_RECORD_OVERHEAD + 10,
                ..d
            },
            steps: vec![
                Push(rec(1, E, 0, b"a", 10)),
                Push(rec(2, I, 0, b"a", 10)),
                Push(rec(2, I, 5, b"cccccc", 50)),
                Push(rec(1, E, 5, b"bbbbbb", 100)),
            ],
            want: vec![
                seg(1, E, 0, b"a", 0, 10),
                seg(2, I, 0, b"a", 0, 10),
                seg(2, I, 5, b"cccccc", 4, 50),
            ],
            stats: StreamStats {
                gap_bytes: 4,
                gaps: 1,
                overflow_bytes: 6,
                ..Default::default()
            },
            pending: 6,
            connections: 2,
        });
    }

    #[test]
    fn duplicate_and_overlap_trimming() {
        let d = StreamLimits::default();
        run(Case {
            name: "duplicate and overlap trimming",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"abcd", 10)),
                Push(rec(1, E, 2, b"cdef", 20)),
                Push(rec(1, E, 0, b"ab", 30)),
                // Two overlapping records ahead of the hole [6, 8).
                Push(rec(1, E, 10, b"klm", 40)),
                Push(rec(1, E, 8, b"ijkl", 50)),
                Push(rec(1, E, 8, b"ij", 55)),
                Push(rec(1, E, 6, b"gh", 60)),
            ],
            want: vec![
                seg(1, E, 0, b"abcd", 0, 10),
                seg(1, E, 4, b"ef", 0, 20),
                seg(1, E, 6, b"gh", 0, 60),
                seg(1, E, 8, b"ijkl", 0, 50),
                seg(1, E, 12, b"m", 0, 40),
            ],
            stats: StreamStats {
                // "cd", "ab", "ij" (whole duplicate), "kl".
                duplicate_bytes: 8,
                reordered: 2,
                ..Default::default()
            },
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn first_record_at_nonzero_pos() {
        let d = StreamLimits::default();
        run(Case {
            name: "first record at pos > 0",
            limits: d,
            steps: vec![
                Push(rec(1, I, 1000, b"xyz", 10)),
                Push(rec(1, I, 1003, b"w", 20)),
            ],
            want: vec![seg(1, I, 1000, b"xyz", 0, 10), seg(1, I, 1003, b"w", 0, 20)],
            stats: StreamStats::default(),
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn close_delivers_pending() {
        let d = StreamLimits::default();
        run(Case {
            name: "close delivers pending",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"a", 10)),
                Push(rec(1, E, 5, b"f", 20)),
                Push(rec(1, E, 3, b"d", 30)),
                Push(rec(1, I, 0, b"x", 40)),
                Push(rec(1, I, 2, b"z", 50)),
                Close(1),
                Close(1),
            ],
            want: vec![
                seg(1, E, 0, b"a", 0, 10),
                seg(1, I, 0, b"x", 0, 40),
                seg(1, E, 3, b"d", 2, 30),
                seg(1, E, 5, b"f", 1, 20),
                seg(1, I, 2, b"z", 1, 50),
            ],
            stats: StreamStats {
                gap_bytes: 4,
                gaps: 3,
                ..Default::default()
            },
            pending: 0,
            connections: 0,
        });
    }

    #[test]
    fn a_closed_connection_id_starts_over() {
        let d = StreamLimits::default();
        run(Case {
            name: "a closed connection id starts over",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"ab", 10)),
                Close(1),
                Push(rec(1, E, 0, b"cd", 20)),
            ],
            want: vec![seg(1, E, 0, b"ab", 0, 10), seg(1, E, 0, b"cd", 0, 20)],
            stats: StreamStats::default(),
            pending: 0,
            connections: 1,
        });
    }

    #[test]
    fn both_directions_independent() {
        let d = StreamLimits::default();
        run(Case {
            name: "both directions independent",
            limits: d,
            steps: vec![
                Push(rec(1, E, 0, b"ab", 10)),
                Push(rec(1, I, 100, b"xy", 20)),
                Push(rec(1, I, 104, b"!", 25)),
                Push(rec(1, E, 2, b"cd", 30)),
                Push(rec(1, I, 102, b"z", 40)),
            ],
            want: vec![
                seg(1, E, 0, b"ab", 0, 10),
                seg(1, I, 100, b"xy", 0, 20),
                seg(1, E, 2, b"cd", 0, 30),
                seg(1, I, 102, b"z", 0, 40),
            ],
            stats: StreamStats::default(),
            // Ingress still waits for 103.
            pending: 1,
            connections: 1,
        });
    }

    #[test]
    fn hostile_inputs() {
        let d = StreamLimits::default();
        run(Case {
            name: "hostile inputs",
            limits: d,
            steps: vec![
                // Zero-length records are ignored and do not start a stream.
                Push(rec_len(9, E, 5, b"", 0, 1)),
                // Data runs past u64::MAX: cut to what has a position.
                Push(rec(1, E, u64::MAX - 1, b"abc", 10)),
                Push(rec(1, E, u64::MAX, b"d", 20)),
                // Behind the end: the one byte with a position is a duplicate.
                Push(rec(1, E, u64::MAX - 1, b"ab", 25)),
                // len past u64::MAX saturates.
                Push(rec_len(1, I, 5, b"x", u64::MAX, 30)),
                Push(rec(1, I, u64::MAX, b"y", 40)),
                // len smaller than the data: the data wins.
                Push(rec_len(2, E, 0, b"abcd", 1, 50)),
                Push(rec(2, E, 4, b"e", 60)),
            ],
            want: vec![
                seg(1, E, u64::MAX - 1, b"a", 0, 10),
                seg(1, I, 5, b"x", 0, 30),
                seg(1, I, u64::MAX, b"", u64::MAX - 6, 30),
                seg(2, E, 0, b"abcd", 0, 50),
                seg(2, E, 4, b"e", 0, 60),
            ],
            stats: StreamStats {
                gap_bytes: u64::MAX - 6,
                truncated_bytes: u64::MAX - 6,
                gaps: 1,
                duplicate_bytes: 1,
                ..Default::default()
            },
            pending: 0,
            connections: 2,
        });
    }

    #[test]
    fn many_connections() {
        let mut streams = Streams::new(StreamLimits::default());
        let mut out = Vec::new();
        for conn in 0..1000 {
            streams.push(rec(conn, E, 0, b"ab", 10), &mut out);
            streams.push(rec(conn, I, 0, b"cd", 10), &mut out);
            // Held behind the hole [2, 4) of each egress direction.
            streams.push(rec(conn, E, 4, b"ef", 20), &mut out);
        }
        assert_eq!(streams.connections(), 1000);
        assert_eq!(streams.pending_bytes(), 2000);
        assert_eq!(out.len(), 2000);
        check_invariants(&streams);
        for conn in 0..1000 {
            streams.push(rec(conn, E, 2, b"cd", 30), &mut out);
        }
        assert_eq!(streams.pending_bytes(), 0);
        assert_eq!(streams.stats().reordered, 1000);
        assert_eq!(out.len(), 4000);
        for conn in 0..1000 {
            streams.close(conn, &mut out);
        }
        assert_eq!(streams.connections(), 0);
        assert_eq!(out.len(), 4000);
        let egress: Vec<u8> = out
            .iter()
            .filter(|s| s.conn_id == 500 && s.direction == E)
            .flat_map(|s| s.data.iter().copied())
            .collect();
        assert_eq!(egress, b"abcdef");
    }

    /// Splits `len` bytes at `cuts` into (start, end) ranges.
    fn chunks(len: usize, cuts: &[prop::sample::Index]) -> Vec<(usize, usize)> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(len)).collect();
        points.push(0);
        points.push(len);
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| (w[0], w[1])).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Without losses, any arrival order (after the first record, which defines the start)
        /// and any duplicates reproduce the original stream exactly.
        #[test]
        fn permuted_stream_reassembles(
            stream in prop::collection::vec(any::<u8>(), 1..2000),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
            dups in prop::collection::vec(
                (any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..10),
            swaps in prop::collection::vec(any::<prop::sample::Index>(), 64),
            start in 0u64..1_000_000,
        ) {
            let stream = Bytes::from(stream);
            let len = stream.len();
            let mut ranges = chunks(len, &cuts);
            for (a, b) in &dups {
                let (a, b) = (a.index(len), b.index(len + 1));
                ranges.push((a.min(b), a.max(b)));
            }
            // Fisher-Yates over everything but the first range (it defines the start).
            for i in (2..ranges.len()).rev() {
                let j = 1 + swaps[i % swaps.len()].index(i);
                ranges.swap(i, j);
            }
            let mut streams = Streams::new(StreamLimits::default());
            let mut out = Vec::new();
            let mut pushed = 0;
            for (n, &(a, b)) in ranges.iter().enumerate() {
                let exit_ns = 1_000 + n as u64 * 1_000;
                streams.push(
                    SyscallData {
                        conn_id: 3,
                        direction: Direction::Ingress,
                        tid: n as u32,
                        pos: start + a as u64,
                        len: (b - a) as u64,
                        data: stream.slice(a..b),
                        enter_ns: exit_ns - 10,
                        exit_ns,
                    },
                    &mut out,
                );
                pushed += b - a;
                // Within the window: must not declare anything.
                streams.flush_expired(exit_ns, &mut out);
            }
            let mut got = Vec::new();
            let mut next = start;
            for s in &out {
                prop_assert_eq!(s.gap_before, 0);
                prop_assert_eq!(s.pos, next);
                prop_assert!(!s.data.is_empty());
                next += s.data.len() as u64;
                got.extend_from_slice(&s.data);
            }
            prop_assert_eq!(&got[..], &stream[..]);
            let stats = streams.stats();
            prop_assert_eq!(stats.gaps, 0);
            prop_assert_eq!(stats.gap_bytes, 0);
            prop_assert_eq!(stats.overflow_bytes, 0);
            prop_assert_eq!(stats.duplicate_bytes, (pushed - len) as u64);
            prop_assert_eq!(streams.pending_bytes(), 0);
        }

        /// Arbitrary records never panic, keep memory within the limits, and every segment is
        /// accounted for: its position is the previous end plus the gap it reports.
        #[test]
        fn garbage_is_survivable(ops in prop::collection::vec(garbage_op(), 0..200)) {
            let limits = StreamLimits {
                max_pending_per_direction: 2 * HELD_RECORD_OVERHEAD + 50,
                max_pending_total: 5 * HELD_RECORD_OVERHEAD + 100,
                reorder_window: Duration::from_nanos(500),
            };
            let mut streams = Streams::new(limits);
            // Mirror of where each direction's delivered stream currently ends.
            let mut ends: HashMap<(u64, Direction), u64> = HashMap::new();
            let mut out = Vec::new();
            for op in ops {
                out.clear();
                let mut closed = None;
                match op {
                    GarbageOp::Push(r) => {
                        // As `normalize` does: bytes past u64::MAX are dropped.
                        let data_len = (r.data.len() as u64).min(u64::MAX - r.pos);
                        if r.len.max(data_len) > 0 {
                            ends.entry((r.conn_id, r.direction)).or_insert(r.pos);
                        }
                        streams.push(r, &mut out);
                    }
                    GarbageOp::Flush(now) => streams.flush_expired(now, &mut out),
                    GarbageOp::Close(conn) => {
                        streams.close(conn, &mut out);
                        closed = Some(conn);
                    }
                }
                for s in &out {
                    // Empty segments exist only to report a gap.
                    prop_assert!(!s.data.is_empty() || s.gap_before > 0);
                    let end = ends.get_mut(&(s.conn_id, s.direction));
                    prop_assert!(end.is_some());
                    if let Some(end) = end {
                        prop_assert_eq!(s.pos, *end + s.gap_before);
                        *end = s.pos + s.data.len() as u64;
                    }
                }
                if let Some(conn) = closed {
                    ends.remove(&(conn, Direction::Egress));
                    ends.remove(&(conn, Direction::Ingress));
                }
                check_invariants(&streams);
            }
            streams.flush_expired(u64::MAX, &mut out);
            prop_assert_eq!(streams.pending_bytes(), 0);
        }
    }

    #[derive(Debug)]
    enum GarbageOp {
        Push(SyscallData),
        Flush(u64),
        Close(u64),
    }

    fn garbage_op() -> impl Strategy<Value = GarbageOp> {
        let pos = prop_oneof![
            4 => 0u64..300,
            1 => (0u64..100).prop_map(|d| u64::MAX - d),
            1 => any::<u64>(),
        ];
        let len = prop_oneof![
            4 => 0u64..60,
            1 => any::<u64>(),
        ];
        let record = (
            0u64..4,
            any::<bool>(),
            pos,
            len,
            prop::collection::vec(any::<u8>(), 0..40),
            0u64..5000,
        )
            .prop_map(|(conn, egress, pos, len, data, exit_ns)| SyscallData {
                conn_id: conn,
                direction: if egress {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                tid: 1,
                pos,
                len,
                data: Bytes::from(data),
                enter_ns: exit_ns,
                exit_ns,
            });
        prop_oneof![
            8 => record.prop_map(GarbageOp::Push),
            1 => (0u64..10_000).prop_map(GarbageOp::Flush),
            1 => (0u64..4).prop_map(GarbageOp::Close),
        ]
    }
}
