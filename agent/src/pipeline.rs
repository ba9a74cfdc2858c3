//! Runs the userspace stages in order on each ring buffer record:
//! decode -> assemble syscalls -> conntrack -> streams -> protocols -> link -> spans -> export
//! (and the dump). Single-threaded and synchronous: one record goes all the way through before the
//! next, so no stage needs locks; export queues without waiting.
use std::{io::Write, sync::Arc};

use log::{debug, warn};
use opentelemetry::trace::SpanKind;

use crate::{
    capture::{
        assemble::{Assembler, Syscall},
        decode::{RawEvent, decode},
    },
    conntrack::{ConnTable, Role},
    dump::Dump,
    export::{ExportHandle, ExportItem},
    link::{CallEnd, CallSide, CallStart, LinkMethod, Linked, Linker},
    metrics::{Metrics, SpanDrop, UserspaceByteLoss, UserspaceEventLoss},
    protocols::{Finished, Protocols},
    resource::ResourceBuilder,
    spans::SpanFactory,
    streams::{Segment, StreamLimits, Streams},
};

/// Userspace losses, each logged once and counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub events: u64,
    pub decode_errors: u64,
    pub dump_errors: u64,
    /// Segments or exchanges dropped because their connection was unknown.
    pub no_connection: u64,
    pub spans_created: u64,
    pub spans_sampled_out: u64,
    pub spans_queue_full: u64,
}

/// Counts a failed write of the dump (stdout closed or full disk), logging the first one.
fn note_dump(stats: &mut PipelineStats, result: std::io::Result<()>) {
    if let Err(err) = result {
        if stats.dump_errors == 0 {
            warn!("writing the dump failed ({err}); its lines are being lost, counting them");
        }
        stats.dump_errors += 1;
    }
}

/// Counts data that cannot be attributed to a connection (the connection table should always
/// have it: every record creates its entry), logging the first one.
fn note_no_connection(stats: &mut PipelineStats) {
    if stats.no_connection == 0 {
        warn!("data of an unknown connection was dropped; counting further ones");
    }
    stats.no_connection += 1;
}

/// Where spans go, and what builds them.
pub struct SpanStage {
    pub linker: Linker,
    pub factory: SpanFactory,
    pub resources: ResourceBuilder,
    pub export: ExportHandle,
}

pub struct Pipeline<W: Write> {
    conns: ConnTable,
    assembler: Assembler,
    streams: Streams,
    dump: Option<Dump<W>>,
    protocols: Protocols,
    spans: Option<SpanStage>,
    records: Vec<Syscall>,
    segments: Vec<Segment>,
    exchanges: Vec<Finished>,
    starts: Vec<CallStart>,
    linked: Vec<Linked>,
    pub stats: PipelineStats,
}

/// Which end of its calls a connection's process is. Requests found in the read direction
/// when the role was unknown make the process their server.
fn call_side(role: Role) -> CallSide {
    match role {
        Role::Client => CallSide::Client,
        Role::Server | Role::Unknown => CallSide::Server,
    }
}

impl<W: Write> Pipeline<W> {
    pub fn new(limits: StreamLimits, dump: Option<Dump<W>>, spans: Option<SpanStage>) -> Self {
        Self {
            conns: ConnTable::default(),
            assembler: Assembler::default(),
            streams: Streams::new(limits),
            dump,
            protocols: Protocols::default(),
            spans,
            records: Vec::new(),
            segments: Vec::new(),
            exchanges: Vec::new(),
            starts: Vec::new(),
            linked: Vec::new(),
            stats: PipelineStats::default(),
        }
    }

    /// Records the sockets the traced processes already hold (see `ConnTable::snapshot`).
    pub fn snapshot_sockets(&mut self, pids: &[u32]) {
        self.conns.snapshot(pids);
    }

    /// Processes one ring buffer record.
    pub fn handle(&mut self, bytes: &[u8]) {
        self.stats.events += 1;
        let event = match decode(bytes) {
            Ok(event) => event,
            Err(err) => {
                if self.stats.decode_errors == 0 {
                    warn!("undecodable record from the probes ({err}); counting further ones");
                }
                self.stats.decode_errors += 1;
                return;
            }
        };
        match event {
            RawEvent::Data(event, payload) => {
                self.assembler.push(&event, payload, &mut self.records);
                self.drain_records();
            }
            RawEvent::Open(event) => {
                let conn = self.conns.open(&event);
                if let Some(dump) = self.dump.as_mut() {
                    let result = dump.open(conn, event.header.ts_ns, event.syscall);
                    note_dump(&mut self.stats, result);
                }
            }
            RawEvent::Close(event) => {
                let id = event.header.conn_id;
                self.assembler.close(id, &mut self.records);
                self.drain_records();
                self.streams.close(id, &mut self.segments);
                self.drain_segments();
                self.protocols.close(id, &mut self.exchanges);
                self.drain_exchanges();
                if let Some(conn) = self.conns.close(id)
                    && let Some(dump) = self.dump.as_mut()
                {
                    let result = dump.close(
                        &conn,
                        event.header.ts_ns,
                        event.egress_bytes,
                        event.ingress_bytes,
                    );
                    note_dump(&mut self.stats, result);
                }
            }
            RawEvent::Exit(header) => {
                self.forget_process(header.pid);
                if let Some(dump) = self.dump.as_mut() {
                    let result = dump.exit(header.pid, header.ts_ns);
                    note_dump(&mut self.stats, result);
                }
            }
        }
    }

    /// Releases a process's connections from every stage, finishing what they hold.
    fn forget_process(&mut self, pid: u32) {
        for id in self.conns.ids_of(pid) {
            self.assembler.close(id, &mut self.records);
            self.drain_records();
            self.streams.close(id, &mut self.segments);
            self.drain_segments();
            self.protocols.close(id, &mut self.exchanges);
            self.drain_exchanges();
        }
        self.conns.exit(pid);
        if let Some(stage) = self.spans.as_mut() {
            stage.linker.forget_process(pid);
        }
    }

    /// Releases the state of processes that are gone although their EXIT event never came
    /// (lost to a full ring buffer). Call it now and then: it checks /proc.
    pub fn sweep(&mut self) {
        let vanished = self.conns.vanished_processes();
        if !vanished.is_empty() {
            debug!("releasing {} processes that exited unseen", vanished.len());
        }
        for pid in vanished {
            self.forget_process(pid);
        }
    }

    fn drain_records(&mut self) {
        let mut records = std::mem::take(&mut self.records);
        for record in records.drain(..) {
            let data = &record.data;
            let conn = self
                .conns
                .get_or_resolve(data.conn_id, record.pid, record.fd);
            if let Some(dump) = self.dump.as_mut() {
                let result = dump.data(conn, &record);
                note_dump(&mut self.stats, result);
            }
            self.streams.push(record.data, &mut self.segments);
        }
        self.records = records;
        self.drain_segments();
    }

    /// Hands reassembled bytes to the protocol stage; shows gaps in the dump.
    fn drain_segments(&mut self) {
        let mut segments = std::mem::take(&mut self.segments);
        for segment in segments.drain(..) {
            let Some(conn) = self.conns.get(segment.conn_id) else {
                note_no_connection(&mut self.stats);
                continue;
            };
            if segment.gap_before > 0
                && let Some(dump) = self.dump.as_mut()
            {
                let result = dump.gap(conn, segment.direction, segment.pos, segment.gap_before);
                note_dump(&mut self.stats, result);
            }
            if self.spans.is_some() {
                let starts = &mut self.starts;
                let side = call_side(conn.role);
                let conn_id = segment.conn_id;
                self.protocols
                    .push(segment, conn.role, &mut self.exchanges, &mut |info| {
                        starts.push(CallStart::new(conn_id, side, &info, conn))
                    });
            }
        }
        self.segments = segments;
        self.drain_exchanges();
    }

    /// Hands started requests and finished exchanges to the linking stage, then turns what it
    /// linked into spans.
    fn drain_exchanges(&mut self) {
        let Some(stage) = self.spans.as_mut() else {
            self.exchanges.clear();
            self.starts.clear();
            return;
        };
        for start in self.starts.drain(..) {
            stage.linker.start(start, &mut self.linked);
        }
        for exchange in self.exchanges.drain(..) {
            let Some(conn) = self.conns.get(exchange.conn_id()) else {
                note_no_connection(&mut self.stats);
                continue;
            };
            let end = CallEnd {
                side: call_side(conn.role),
                finished: exchange,
                conn: conn.clone(),
            };
            stage.linker.end(end, &mut self.linked);
        }
        self.drain_linked();
    }

    /// Turns linked exchanges into spans and queues them for export.
    fn drain_linked(&mut self) {
        let Some(stage) = self.spans.as_mut() else {
            self.linked.clear();
            return;
        };
        for linked in self.linked.drain(..) {
            let kind = match linked.end.side {
                CallSide::Client => SpanKind::Client,
                CallSide::Server => SpanKind::Server,
            };
            self.stats.spans_created += 1;
            // Spans of sampled-out traces are built only when --keep-errors/--keep-slower-than
            // may keep them (sample.rs).
            if !linked.ids.sampled && !crate::sample::keep_policy_active() {
                self.stats.spans_sampled_out += 1;
                continue;
            }
            let span = match &linked.end.finished {
                Finished::Http1(exchange) => {
                    stage
                        .factory
                        .http1(exchange, &linked.end.conn, kind, &linked.ids)
                }
                Finished::Http2(exchange) => {
                    stage
                        .factory
                        .http2(exchange, &linked.end.conn, kind, &linked.ids)
                }
                Finished::Replaced { .. } => continue,
            };
            if !linked.ids.sampled && !crate::sample::keep_anyway(&span) {
                self.stats.spans_sampled_out += 1;
                continue;
            }
            let process = &linked.end.conn.process;
            let resource = process
                .resource
                .get_or_init(|| stage.resources.build(&process.info))
                .clone();
            let item = ExportItem {
                resource_id: u64::from(linked.end.conn.pid) << 32
                    | (process.info.start_ticks & 0xffff_ffff),
                resource: Arc::clone(&resource),
                span,
            };
            if !stage.export.submit(item) {
                self.stats.spans_queue_full += 1;
            }
        }
    }

    /// Periodic work: releases data held for holes that will not fill.
    /// `now_ns` is the monotonic clock; `u64::MAX` at shutdown also links every call still
    /// waiting in the reorder window.
    pub fn tick(&mut self, now_ns: u64) {
        self.streams.flush_expired(now_ns, &mut self.segments);
        self.drain_segments();
        if let Some(stage) = self.spans.as_mut() {
            if now_ns == u64::MAX {
                stage.linker.flush(&mut self.linked);
            } else {
                stage.linker.tick(now_ns, &mut self.linked);
            }
        }
        self.drain_linked();
    }

    pub fn flush(&mut self) {
        if let Some(dump) = self.dump.as_mut() {
            let result = dump.flush();
            note_dump(&mut self.stats, result);
        }
    }

    /// Publishes userspace figures and losses to the metrics.
    pub fn publish(&self, metrics: &Metrics) {
        let streams = self.streams.stats();
        metrics.observe_total(&metrics.events_received, self.stats.events);
        for (loss, total) in [
            (
                UserspaceEventLoss::CaptureDecodeError,
                self.stats.decode_errors,
            ),
            (
                UserspaceEventLoss::CaptureIncompleteSyscall,
                self.assembler.incomplete,
            ),
            (
                UserspaceEventLoss::PipelineNoConnection,
                self.stats.no_connection,
            ),
        ] {
            metrics.observe_total(&metrics.userspace_lost_events(loss), total);
        }
        for (loss, total) in [
            // Truncated tails are not lost by us: tracer_bytes_not_captured_total has them.
            (
                UserspaceByteLoss::StreamGap,
                streams.gap_bytes.saturating_sub(streams.truncated_bytes),
            ),
            (UserspaceByteLoss::StreamOverflow, streams.overflow_bytes),
            (UserspaceByteLoss::StreamDuplicate, streams.duplicate_bytes),
        ] {
            metrics.observe_total(&metrics.userspace_lost_bytes(loss), total);
        }
        metrics.observe_total(&metrics.spans_created, self.stats.spans_created);
        metrics.observe_total(
            &metrics.spans_dropped(SpanDrop::SampledOut),
            self.stats.spans_sampled_out,
        );
        if let Some(stage) = self.spans.as_ref() {
            let link = &stage.linker.stats;
            for (reason, total) in &link.bad_context {
                metrics.observe_total(&metrics.parse_errors("tracecontext", reason), *total);
            }
            for method in LinkMethod::ALL {
                let total = link.links(method);
                metrics.observe_total(&metrics.span_links(method.as_str()), total);
            }
            metrics.observe_total(
                &metrics.link_limits("reorder_overflow"),
                link.reorder_overflow,
            );
            metrics.observe_total(&metrics.link_limits("calls_full"), link.calls_full);
            metrics.observe_total(
                &metrics.calls_skipped("self_instrumented"),
                link.instrumented_skipped,
            );
        }
        for (error, total) in &self.protocols.stats.http1_errors {
            metrics.observe_total(&metrics.parse_errors("http1", error.as_str()), *total);
        }
        for (error, total) in &self.protocols.stats.http2_errors {
            metrics.observe_total(&metrics.parse_errors("http2", error.as_str()), *total);
        }
        metrics.connections_tracked.set(self.conns.len() as u64);
        metrics
            .stream_pending_bytes
            .set(self.streams.pending_bytes() as u64);
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn processes(&self) -> usize {
        self.conns.processes()
    }
}
