//! Joins the chunks of one syscall back into one record. The probes split a large read or
//! write into chunks that arrive in order; a missing chunk (ring buffer full) ends the record
//! early, and the record keeps its full length so reassembly sees the hole.

use bytes::{Bytes, BytesMut};
use tracer_common::{DataEvent, data_flags, direction};

use crate::streams::{Direction, SyscallData};

/// One socket read or write of a traced process.
#[derive(Clone, Debug)]
pub struct Syscall {
    pub data: SyscallData,
    pub pid: u32,
    pub fd: i32,
    /// One of `tracer_common::syscall`.
    pub syscall: u32,
    /// `tracer_common::data_flags`, merged over the chunks (FIRST/LAST cleared).
    pub flags: u32,
}

impl Syscall {
    pub fn truncated(&self) -> bool {
        (self.data.data.len() as u64) < self.data.len
    }
}

struct Partial {
    record: Syscall,
    buf: BytesMut,
    next_index: u32,
}

/// Chunks waiting for the rest of their syscall, by (connection, direction).
#[derive(Default)]
pub struct Assembler {
    partial: foldhash::HashMap<(u64, u32), Partial>,
    /// Syscalls delivered without all their chunks.
    pub incomplete: u64,
}

fn direction_of(event: &DataEvent) -> Direction {
    if event.direction == direction::INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}

fn start(event: &DataEvent) -> Syscall {
    Syscall {
        data: SyscallData {
            conn_id: event.header.conn_id,
            direction: direction_of(event),
            tid: event.header.tid,
            pos: event.syscall_pos,
            len: event.syscall_len,
            data: Bytes::new(),
            enter_ns: event.enter_ns,
            exit_ns: event.header.ts_ns,
        },
        pid: event.header.pid,
        fd: event.header.fd,
        syscall: event.syscall,
        flags: event.flags & !(data_flags::FIRST_CHUNK | data_flags::LAST_CHUNK),
    }
}

impl Assembler {
    /// Adds one chunk; pushes every syscall it completes (or cuts short) to `out`.
    pub fn push(&mut self, event: &DataEvent, payload: &[u8], out: &mut Vec<Syscall>) {
        let key = (event.header.conn_id, event.direction);
        let first = event.flags & data_flags::FIRST_CHUNK != 0;
        let last = event.flags & data_flags::LAST_CHUNK != 0;
        let continues = self.partial.get(&key).is_some_and(|p| {
            !first && p.record.data.pos == event.syscall_pos && p.next_index == event.chunk_index
        });
        if !continues {
            // Whatever waited for more chunks will not get them.
            if let Some(partial) = self.partial.remove(&key) {
                self.incomplete += 1;
                out.push(finish(partial));
            }
            if !first {
                // The head of this syscall was lost: its bytes before this chunk are a hole,
                // so only the length is kept.
                self.incomplete += 1;
                if last {
                    out.push(start(event));
                    return;
                }
                // Drop the rest of this syscall's chunks: they cannot be placed contiguously.
                return;
            }
            if last {
                // The common case: one chunk, one syscall.
                let mut record = start(event);
                record.data.data = Bytes::copy_from_slice(payload);
                out.push(record);
                return;
            }
            let mut buf = BytesMut::with_capacity(event.syscall_len.min(64 * 1024) as usize);
            buf.extend_from_slice(payload);
            self.partial.insert(
                key,
                Partial {
                    record: start(event),
                    buf,
                    next_index: event.chunk_index + 1,
                },
            );
            return;
        }
        let Some(partial) = self.partial.get_mut(&key) else {
            return;
        };
        partial.buf.extend_from_slice(payload);
        partial.next_index += 1;
        partial.record.flags |= event.flags & !(data_flags::FIRST_CHUNK | data_flags::LAST_CHUNK);
        partial.record.data.exit_ns = event.header.ts_ns;
        if last && let Some(partial) = self.partial.remove(&key) {
            out.push(finish(partial));
        }
    }

    /// Forgets a closed connection, delivering anything cut short.
    pub fn close(&mut self, conn_id: u64, out: &mut Vec<Syscall>) {
        for dir in [direction::EGRESS, direction::INGRESS] {
            if let Some(partial) = self.partial.remove(&(conn_id, dir)) {
                self.incomplete += 1;
                out.push(finish(partial));
            }
        }
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

fn finish(partial: Partial) -> Syscall {
    let mut record = partial.record;
    record.data.data = partial.buf.freeze();
    record
}

#[cfg(test)]
mod tests {
    use tracer_common::{EventHeader, kind};

    use super::*;

    fn chunk(index: u32, offset: u32, len: u32, flags: u32) -> DataEvent {
        DataEvent {
            header: EventHeader {
                kind: kind::DATA,
                pid: 1,
                tid: 2,
                fd: 3,
                conn_id: 9,
                ts_ns: 1000 + index as u64,
            },
            enter_ns: 900,
            syscall_pos: 100,
            syscall_len: 10,
            chunk_offset: offset,
            captured_len: len,
            direction: direction::EGRESS,
            syscall: tracer_common::syscall::WRITE,
            flags,
            chunk_index: index,
        }
    }

    #[test]
    fn single_chunk() {
        let mut asm = Assembler::default();
        let mut out = Vec::new();
        let flags = data_flags::FIRST_CHUNK | data_flags::LAST_CHUNK;
        asm.push(&chunk(0, 0, 10, flags), b"0123456789", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].data.data[..], b"0123456789");
        assert!(!out[0].truncated());
        assert_eq!(asm.pending(), 0);
    }

    #[test]
    fn three_chunks_joined() {
        let mut asm = Assembler::default();
        let mut out = Vec::new();
        asm.push(&chunk(0, 0, 4, data_flags::FIRST_CHUNK), b"0123", &mut out);
        asm.push(&chunk(1, 4, 4, 0), b"4567", &mut out);
        assert!(out.is_empty());
        asm.push(&chunk(2, 8, 2, data_flags::LAST_CHUNK), b"89", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].data.data[..], b"0123456789");
        assert_eq!(out[0].data.exit_ns, 1002);
        assert_eq!(asm.incomplete, 0);
    }

    #[test]
    fn lost_middle_chunk_cuts_record_short() {
        let mut asm = Assembler::default();
        let mut out = Vec::new();
        asm.push(&chunk(0, 0, 4, data_flags::FIRST_CHUNK), b"0123", &mut out);
        asm.push(&chunk(2, 8, 2, data_flags::LAST_CHUNK), b"89", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0].data.data[..], b"0123");
        assert!(out[0].truncated());
        assert!(
            out[1].data.data.is_empty(),
            "tail without head keeps only its length"
        );
        assert_eq!(asm.incomplete, 2);
    }

    #[test]
    fn close_flushes_partial() {
        let mut asm = Assembler::default();
        let mut out = Vec::new();
        asm.push(&chunk(0, 0, 4, data_flags::FIRST_CHUNK), b"0123", &mut out);
        asm.close(9, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(asm.pending(), 0);
    }
}
