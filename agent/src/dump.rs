//! `--dump`: a line per connection open, read, write, gap and close. Text for people (escaped
//! previews), JSON lines for scripts (every captured byte, in hex).
use std::{
    fmt::Write as _,
    io::{self, Write},
};

use serde_json::json;
use tracer_common::{data_flags, syscall};

use crate::{
    capture::assemble::Syscall,
    cli::DumpFormat,
    clock::Clock,
    conntrack::{Connection, Role},
    streams::Direction,
};

pub struct Dump<W: Write> {
    format: DumpFormat,
    preview: usize,
    out: W,
    clock: Clock,
}

fn syscall_name(nr: u32) -> &'static str {
    match nr {
        syscall::READ => "read",
        syscall::WRITE => "write",
        syscall::READV => "readv",
        syscall::WRITEV => "writev",
        syscall::RECVFROM => "recvfrom",
        syscall::SENDTO => "sendto",
        syscall::RECVMSG => "recvmsg",
        syscall::SENDMSG => "sendmsg",
        syscall::RECVMMSG => "recvmmsg",
        syscall::SENDMMSG => "sendmmsg",
        syscall::SENDFILE => "sendfile",
        syscall::SSL_READ => "SSL_read",
        syscall::SSL_WRITE => "SSL_write",
        syscall::OTHER => "other",
        _ => "?",
    }
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => "write",
        Direction::Ingress => "read",
    }
}

fn addr(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "?".to_owned(), |a| a.to_string())
}

/// Escapes bytes for one line of text: printable ASCII as is, common escapes, else \xNN.
pub fn escape(bytes: &[u8], limit: usize) -> String {
    let mut out = String::with_capacity(bytes.len().min(limit) + 8);
    for &b in bytes.iter().take(limit) {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    if bytes.len() > limit {
        out.push_str("...");
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl<W: Write> Dump<W> {
    pub fn new(format: DumpFormat, preview: usize, out: W, clock: Clock) -> Self {
        Self {
            format,
            preview,
            out,
            clock,
        }
    }

    fn time(&self, mono_ns: u64) -> String {
        self.clock.format_time(mono_ns)
    }

    fn who(conn: &Connection, tid: Option<u32>) -> String {
        match tid {
            Some(tid) if tid != conn.pid => format!("{}[{}/{}]", conn.process.exe, conn.pid, tid),
            _ => format!("{}[{}]", conn.process.exe, conn.pid),
        }
    }

    pub fn open(&mut self, conn: &Connection, ts_ns: u64, via: u32) -> io::Result<()> {
        match self.format {
            DumpFormat::Text => {
                let arrow = match conn.role {
                    Role::Server => "<-",
                    _ => "->",
                };
                writeln!(
                    self.out,
                    "{} OPEN  #{} {} fd={} {} {} {} {}{} (via {}, tuple from {})",
                    self.time(ts_ns),
                    conn.id,
                    Self::who(conn, None),
                    conn.fd,
                    conn.role.as_str(),
                    addr(conn.local),
                    arrow,
                    addr(conn.remote),
                    if conn.tls { " TLS" } else { "" },
                    syscall_name(via),
                    conn.tuple_source.as_str(),
                )
            }
            DumpFormat::Json => self.json(json!({
                "event": "open",
                "time_unix_nano": self.clock.unix_nanos(ts_ns),
                "conn": conn.id,
                "pid": conn.pid,
                "exe": conn.process.exe,
                "fd": conn.fd,
                "role": conn.role.as_str(),
                "local": conn.local.map(|a| a.to_string()),
                "remote": conn.remote.map(|a| a.to_string()),
                "tuple_source": conn.tuple_source.as_str(),
                "tls": conn.tls,
                "via": syscall_name(via),
            })),
        }
    }

    pub fn data(&mut self, conn: &Connection, record: &Syscall) -> io::Result<()> {
        let data = &record.data;
        let captured = data.data.len();
        let truncated = record.truncated();
        match self.format {
            DumpFormat::Text => {
                let mut notes = String::new();
                if truncated {
                    let _ = write!(notes, " (captured {captured}, truncated)");
                }
                if record.flags & data_flags::NO_PAYLOAD != 0 {
                    notes.push_str(" (no payload: sendfile)");
                }
                if record.flags & data_flags::COPY_FAILED != 0 {
                    notes.push_str(" (copy failed)");
                }
                writeln!(
                    self.out,
                    "{} {:<5} #{} {} fd={} {} {} B{} \"{}\"",
                    self.time(data.exit_ns),
                    direction_name(data.direction).to_uppercase(),
                    conn.id,
                    Self::who(conn, Some(data.tid)),
                    conn.fd,
                    syscall_name(record.syscall),
                    data.len,
                    notes,
                    escape(&data.data, self.preview),
                )
            }
            DumpFormat::Json => self.json(json!({
                "event": "data",
                "time_unix_nano": self.clock.unix_nanos(data.exit_ns),
                "start_unix_nano": self.clock.unix_nanos(data.enter_ns),
                "conn": conn.id,
                "pid": record.pid,
                "tid": data.tid,
                "fd": record.fd,
                "direction": direction_name(data.direction),
                "syscall": syscall_name(record.syscall),
                "pos": data.pos,
                "len": data.len,
                "captured": captured,
                "truncated": truncated,
                "no_payload": record.flags & data_flags::NO_PAYLOAD != 0,
                "copy_failed": record.flags & data_flags::COPY_FAILED != 0,
                "data_hex": hex(&data.data),
            })),
        }
    }

    pub fn gap(
        &mut self,
        conn: &Connection,
        direction: Direction,
        pos: u64,
        bytes: u64,
    ) -> io::Result<()> {
        match self.format {
            DumpFormat::Text => writeln!(
                self.out,
                "                GAP   #{} {} {} bytes missing before position {}",
                conn.id,
                direction_name(direction),
                bytes,
                pos
            ),
            DumpFormat::Json => self.json(json!({
                "event": "gap",
                "conn": conn.id,
                "direction": direction_name(direction),
                "pos": pos,
                "bytes": bytes,
            })),
        }
    }

    pub fn close(
        &mut self,
        conn: &Connection,
        ts_ns: u64,
        sent: u64,
        received: u64,
    ) -> io::Result<()> {
        match self.format {
            DumpFormat::Text => writeln!(
                self.out,
                "{} CLOSE #{} {} fd={} sent {} B, received {} B",
                self.time(ts_ns),
                conn.id,
                Self::who(conn, None),
                conn.fd,
                sent,
                received
            ),
            DumpFormat::Json => self.json(json!({
                "event": "close",
                "time_unix_nano": self.clock.unix_nanos(ts_ns),
                "conn": conn.id,
                "pid": conn.pid,
                "fd": conn.fd,
                "sent": sent,
                "received": received,
            })),
        }
    }

    pub fn exit(&mut self, pid: u32, ts_ns: u64) -> io::Result<()> {
        match self.format {
            DumpFormat::Text => writeln!(self.out, "{} EXIT  pid {pid}", self.time(ts_ns)),
            DumpFormat::Json => self.json(json!({
                "event": "exit",
                "time_unix_nano": self.clock.unix_nanos(ts_ns),
                "pid": pid,
            })),
        }
    }

    fn json(&mut self, value: serde_json::Value) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, &value)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_bytes() {
        assert_eq!(escape(b"GET / HTTP/1.1\r\n", 64), "GET / HTTP/1.1\\r\\n");
        assert_eq!(escape(b"\x00\xff\"\\", 64), "\\x00\\xff\\\"\\\\");
        assert_eq!(escape(b"abcdef", 3), "abc...");
        assert_eq!(hex(b"\x01\xab"), "01ab");
    }
}
