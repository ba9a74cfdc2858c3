//! Runs the userspace stages in order on each ring buffer record:
//! decode -> assemble syscalls -> conntrack -> streams -> sinks (dump). Single-threaded and
//! synchronous: one record goes all the way through before the next, so no stage needs locks.
use std::io::Write;

use log::warn;

use crate::{
    capture::{
        assemble::{Assembler, Syscall},
        decode::{RawEvent, decode},
    },
    conntrack::ConnTable,
    dump::Dump,
    metrics::{Metrics, UserspaceByteLoss, UserspaceEventLoss},
    streams::{Segment, StreamLimits, Streams},
};

/// Userspace losses, each logged once and counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub events: u64,
    pub decode_errors: u64,
    pub dump_errors: u64,
}

pub struct Pipeline<W: Write> {
    conns: ConnTable,
    assembler: Assembler,
    streams: Streams,
    dump: Option<Dump<W>>,
    records: Vec<Syscall>,
    segments: Vec<Segment>,
    pub stats: PipelineStats,
}

impl<W: Write> Pipeline<W> {
    pub fn new(limits: StreamLimits, dump: Option<Dump<W>>) -> Self {
        Self {
            conns: ConnTable::default(),
            assembler: Assembler::default(),
            streams: Streams::new(limits),
            dump,
            records: Vec::new(),
            segments: Vec::new(),
            stats: PipelineStats::default(),
        }
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
                    self.stats.dump_errors += u64::from(result.is_err());
                }
            }
            RawEvent::Close(event) => {
                let id = event.header.conn_id;
                self.assembler.close(id, &mut self.records);
                self.drain_records();
                self.streams.close(id, &mut self.segments);
                self.drain_segments();
                if let Some(conn) = self.conns.close(id)
                    && let Some(dump) = self.dump.as_mut()
                {
                    let result = dump.close(
                        &conn,
                        event.header.ts_ns,
                        event.egress_bytes,
                        event.ingress_bytes,
                    );
                    self.stats.dump_errors += u64::from(result.is_err());
                }
            }
            RawEvent::Exit(header) => {
                for id in self.conns.ids_of(header.pid) {
                    self.assembler.close(id, &mut self.records);
                    self.drain_records();
                    self.streams.close(id, &mut self.segments);
                    self.drain_segments();
                }
                self.conns.exit(header.pid);
                if let Some(dump) = self.dump.as_mut() {
                    let result = dump.exit(header.pid, header.ts_ns);
                    self.stats.dump_errors += u64::from(result.is_err());
                }
            }
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
                self.stats.dump_errors += u64::from(result.is_err());
            }
            self.streams.push(record.data, &mut self.segments);
        }
        self.records = records;
        self.drain_segments();
    }

    /// Hands reassembled bytes to the protocol stages (later issues); shows gaps in the dump.
    fn drain_segments(&mut self) {
        for segment in self.segments.drain(..) {
            if segment.gap_before == 0 {
                continue;
            }
            if let Some(dump) = self.dump.as_mut()
                && let Some(conn) = self.conns.get(segment.conn_id)
            {
                let result = dump.gap(conn, segment.direction, segment.pos, segment.gap_before);
                self.stats.dump_errors += u64::from(result.is_err());
            }
        }
    }

    /// Periodic work: releases data held for holes that will not fill.
    pub fn tick(&mut self, now_ns: u64) {
        self.streams.flush_expired(now_ns, &mut self.segments);
        self.drain_segments();
    }

    pub fn flush(&mut self) {
        if let Some(dump) = self.dump.as_mut()
            && dump.flush().is_err()
        {
            self.stats.dump_errors += 1;
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
        ] {
            metrics.observe_total(&metrics.userspace_lost_events(loss), total);
        }
        for (loss, total) in [
            (UserspaceByteLoss::StreamGap, streams.gap_bytes),
            (UserspaceByteLoss::StreamOverflow, streams.overflow_bytes),
            (UserspaceByteLoss::StreamDuplicate, streams.duplicate_bytes),
        ] {
            metrics.observe_total(&metrics.userspace_lost_bytes(loss), total);
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
