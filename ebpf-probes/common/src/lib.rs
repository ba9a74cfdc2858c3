//! The kernel/user boundary of tracer-agent: `#[repr(C)]`, `Copy`, padding-free records that the
//! probes write into the ring buffer and maps, and that the agent reads back.
//!
//! Every record in the `EVENTS` ring buffer starts with an [`EventHeader`] whose `kind` says
//! which record follows. Layouts are checked by size assertions at the bottom of this file, so a
//! change on one side that the other does not follow fails to compile.
#![no_std]

/// Payload bytes carried by one [`DataEvent`] chunk. A syscall larger than this is split into
/// several chunks, up to the capture limit.
pub const CHUNK_SIZE: usize = 4096;
/// Most chunks one syscall may produce: the hard ceiling on the per-syscall capture limit.
pub const MAX_CHUNKS_PER_SYSCALL: usize = 16;
/// Largest per-syscall capture limit the probes accept (bytes).
pub const MAX_CAPTURE_LIMIT: u32 = (CHUNK_SIZE * MAX_CHUNKS_PER_SYSCALL) as u32;
/// Default per-syscall capture limit (bytes).
pub const DEFAULT_CAPTURE_LIMIT: u32 = 16 * 1024;
/// iovec entries looked at per readv/writev/sendmsg/recvmsg; later ones count as not captured.
/// gRPC stacks write one HTTP/2 HEADERS frame as dozens of small slices: fewer would cut header
/// blocks and desynchronise HPACK for the rest of the connection.
pub const MAX_IOV: usize = 128;

/// Process ids the traced-process set covers: Linux's PID_MAX_LIMIT.
pub const TRACED_PID_LIMIT: u32 = 1 << 22;

/// The set of traced process (and thread) ids, one byte each (a [`traced`] state), as the single
/// 4 MiB value of the `TRACED` array map. An array lookup is inlined by the verifier, so the
/// check every syscall of every process pays is a few instructions, not a hash map helper
/// call. Bytes rather than bits: the BPF target has no atomic read-modify-write in Rust, and a
/// byte store cannot clobber a neighbour's entry. The map is mmapable: the agent changes single
/// bytes in place, never the whole value, so it cannot undo what the probes set meanwhile.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TracedSet {
    pub pids: [u8; TRACED_PID_LIMIT as usize],
}

/// States of a pid's byte in [`TracedSet`]. Forks copy the parent's state to the child.
pub mod traced {
    /// Not traced, unless the agent traces every process (`TRACE_ALL`).
    pub const NONE: u8 = 0;
    /// Traced: named by the agent, matched by it, or forked from a traced process.
    pub const TRACED: u8 = 1;
    /// Never traced, also across exec: `--exclude-pid` and the agent itself.
    pub const EXCLUDED: u8 = 3;
    /// Not traced while it runs an excluded executable; pending again at its next exec.
    pub const EXCLUDED_EXE: u8 = 4;
    /// Bit of every pending state, `0b1igggggg`: the process exec'd while the agent watches
    /// execs and is traced provisionally until the agent decides on that exec's EXEC event
    /// (dropping what came before a refusal), so a matching process is traced from its first
    /// instruction whatever the agent's delay.
    pub const PENDING: u8 = 0x80;
    /// In a pending state: it was traced before the exec, so it stays traced unless excluded.
    pub const PENDING_INHERITED: u8 = 0x40;
    /// In a pending state: a generation that differs from the previous exec's, so the agent
    /// changes the byte only if no later exec happened meanwhile.
    pub const PENDING_GENERATION: u8 = 0x3f;

    pub const fn is_pending(state: u8) -> bool {
        state & PENDING != 0
    }
}

/// `EventHeader::kind` values.
pub mod kind {
    /// A [`crate::DataEvent`] followed by `captured_len` payload bytes.
    pub const DATA: u32 = 1;
    /// A [`crate::ConnEvent`]: first sight of a TCP connection (its first read or write).
    pub const OPEN: u32 = 2;
    /// A [`crate::CloseEvent`]: TCP closed the socket of a tracked connection.
    pub const CLOSE: u32 = 3;
    /// An [`crate::EventHeader`] alone: the traced process (thread group) exited.
    pub const EXIT: u32 = 4;
    /// An [`crate::ExecEvent`]: a process exec'd while the agent watches execs.
    pub const EXEC: u32 = 5;
    /// A [`crate::ListenEvent`]: a process listens on a selected port and is now traced.
    pub const LISTEN: u32 = 6;
}

/// Which side of the TCP connection the traced process is on.
pub mod role {
    pub const UNKNOWN: u32 = 0;
    /// It called connect().
    pub const CLIENT: u32 = 1;
    /// It accepted the connection.
    pub const SERVER: u32 = 2;
}

/// Data direction, seen from the traced process.
pub mod direction {
    /// write/send: bytes leaving the process.
    pub const EGRESS: u32 = 0;
    /// read/recv: bytes entering the process.
    pub const INGRESS: u32 = 1;
}

/// The syscall that moved the bytes, for display and statistics.
pub mod syscall {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const READV: u32 = 3;
    pub const WRITEV: u32 = 4;
    pub const RECVFROM: u32 = 5;
    pub const SENDTO: u32 = 6;
    pub const RECVMSG: u32 = 7;
    pub const SENDMSG: u32 = 8;
    pub const RECVMMSG: u32 = 9;
    pub const SENDMMSG: u32 = 10;
    pub const SENDFILE: u32 = 11;
    // 12-15 were connect, accept, accept4 and close, which the probes no longer follow.
    /// Plaintext handed to OpenSSL's SSL_write / SSL_write_ex (a uprobe, not a syscall).
    pub const SSL_WRITE: u32 = 16;
    /// Plaintext returned by OpenSSL's SSL_read / SSL_read_ex.
    pub const SSL_READ: u32 = 17;
    /// Bytes moved by a syscall the probes do not follow (see `counter::LOSS_UNFOLLOWED_SYSCALL`).
    pub const OTHER: u32 = 18;
}

/// `DataEvent::flags` bits.
pub mod data_flags {
    /// First chunk of this syscall's data.
    pub const FIRST_CHUNK: u32 = 1 << 0;
    /// Last chunk of this syscall's data.
    pub const LAST_CHUNK: u32 = 1 << 1;
    /// The syscall moved more bytes than were captured (capture limit, iovec or message limit).
    pub const TRUNCATED: u32 = 1 << 2;
    /// Reading the process's buffer failed; this chunk carries no bytes.
    pub const COPY_FAILED: u32 = 1 << 3;
    /// The bytes never passed through user memory (sendfile): only the length is known.
    pub const NO_PAYLOAD: u32 = 1 << 4;
}

/// `ConnEvent::flags` bits.
pub mod conn_flags {
    /// `tuple` is filled in (from `sock:inet_sock_set_state` or `tcp:tcp_rcv_space_adjust`).
    /// Without it the agent looks the socket up in /proc.
    pub const TUPLE_KNOWN: u32 = 1 << 0;
    /// The connection carries TLS: its first bytes were a TLS record, or they moved inside an
    /// SSL_* call. Its ciphertext is never sent; DATA events carry the plaintext instead.
    pub const TLS: u32 = 1 << 1;
}

/// Indexes of the per-CPU `COUNTERS` array. Every place the probes can lose data has one.
pub mod counter {
    /// Data chunks written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Payload bytes written to the ring buffer.
    pub const BYTES_CAPTURED: u32 = 1;
    /// Socket bytes moved by traced syscalls but not captured (capture limit, iovec limits).
    pub const BYTES_NOT_CAPTURED: u32 = 2;
    /// Events dropped because the ring buffer was full.
    pub const LOSS_RINGBUF_FULL: u32 = 3;
    /// Payload bytes lost with those events.
    pub const LOSS_RINGBUF_FULL_BYTES: u32 = 4;
    /// Reads of the process's buffers that failed.
    pub const LOSS_COPY_FAILED: u32 = 5;
    /// Socket reads and writes of traced processes made by a syscall whose buffers the probes
    /// do not know (splice, io_uring, a 32-bit task): their bytes are a gap in the stream,
    /// counted in BYTES_NOT_CAPTURED.
    pub const LOSS_UNFOLLOWED_SYSCALL: u32 = 6;
    /// Connections not tracked because the connection map was full.
    pub const LOSS_CONN_MAP_FULL: u32 = 7;
    /// Ciphertext bytes of TLS connections, not sent (their plaintext is, from the uprobes).
    pub const TLS_CIPHERTEXT_BYTES: u32 = 8;
    /// SSL_* calls that returned plaintext whose socket was never seen (no syscall inside
    /// this or an earlier call on the same SSL object): the plaintext is lost.
    pub const LOSS_TLS_NO_SOCKET: u32 = 9;
    /// Payload bytes lost with those calls.
    pub const LOSS_TLS_NO_SOCKET_BYTES: u32 = 10;
    /// SSL_* calls not followed because the in-flight SSL call map was full.
    pub const LOSS_TLS_CALL_MAP_FULL: u32 = 11;
    /// Number of counters.
    pub const COUNT: u32 = 12;
}

/// Common prefix of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`kind`].
    pub kind: u32,
    /// Process (thread group) id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// File descriptor in `pid`, or -1.
    pub fd: i32,
    /// Connection id, unique for the life of the agent; 0 when not about a connection.
    pub conn_id: u64,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) when the event happened (for data: when
    /// the bytes had moved, just before the syscall returns).
    pub ts_ns: u64,
}

/// One chunk of one socket read or write. `captured_len` payload bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataEvent {
    pub header: EventHeader,
    /// CLOCK_MONOTONIC nanoseconds when the call began: a send's start (`tcp_sendmsg_locked`,
    /// else `ts_ns`), an SSL_* call's entry; for a receive, `ts_ns`.
    pub enter_ns: u64,
    /// Position in this direction's byte stream of the syscall's first byte.
    pub syscall_pos: u64,
    /// Bytes the syscall moved (its return value, summed over messages for *mmsg).
    pub syscall_len: u64,
    /// Offset of this chunk's first byte within the syscall's bytes.
    pub chunk_offset: u32,
    /// Payload bytes that follow this header.
    pub captured_len: u32,
    /// One of [`direction`].
    pub direction: u32,
    /// One of [`syscall`].
    pub syscall: u32,
    /// [`data_flags`] bits.
    pub flags: u32,
    /// Chunk index within the syscall, from 0.
    pub chunk_index: u32,
}

/// Addresses and ports of a TCP connection as the kernel reported them. IPv4 addresses sit in
/// the first four bytes of `saddr`/`daddr`; ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Local port.
    pub sport: u16,
    /// Remote port.
    pub dport: u16,
    pub _pad: u16,
    /// Local address.
    pub saddr: [u8; 16],
    /// Remote address.
    pub daddr: [u8; 16],
}

/// First sight of a TCP connection: its first read or write by a traced process (pid, fd).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    /// One of [`role`].
    pub role: u32,
    /// [`conn_flags`] bits.
    pub flags: u32,
    pub tuple: Tuple,
    /// The syscall of that first read or write.
    pub syscall: u32,
    pub _pad: u32,
    /// The task's command name: the agent's fallback when a short-lived process (curl) has
    /// exited before /proc/PID can be read.
    pub comm: [u8; 16],
}

/// TCP closed the socket of a tracked connection (both sides closed, or a reset). The header
/// names the process and fd of its OPEN: the close may happen in any context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseEvent {
    pub header: EventHeader,
    /// Bytes written on the connection while traced.
    pub egress_bytes: u64,
    /// Bytes read on the connection while traced.
    pub ingress_bytes: u64,
}

/// Bytes of the exec'd file name an [`ExecEvent`] carries; longer names are cut.
pub const EXEC_FILENAME_LEN: usize = 256;

/// A process exec'd (only while the agent watches execs: `--exe`, `--exclude-exe`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Its [`traced`] state before the exec.
    pub prev_state: u32,
    /// The pending state the probe gave it (or EXCLUDED, unchanged).
    pub state: u32,
    /// Bytes of `filename` filled, without the NUL.
    pub filename_len: u32,
    pub _pad: u32,
    /// The new command name (the file name, cut to 15 bytes).
    pub comm: [u8; 16],
    /// The path given to execve (a script's path for `#!` scripts), NUL-terminated.
    pub filename: [u8; EXEC_FILENAME_LEN],
}

impl Default for ExecEvent {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            prev_state: 0,
            state: 0,
            filename_len: 0,
            _pad: 0,
            comm: [0; 16],
            filename: [0; EXEC_FILENAME_LEN],
        }
    }
}

/// A process started listening on a port the agent selects (`--port`); the probe has already
/// marked it traced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenEvent {
    pub header: EventHeader,
    /// Its [`traced`] state before.
    pub prev_state: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// The local port, host byte order.
    pub port: u16,
    /// The local address (IPv4 in the first four bytes).
    pub addr: [u8; 16],
}

/// Byte offsets of `struct sock_common` fields (the start of every `struct sock`) in the
/// running kernel, from its BTF; the agent sets them at load time. `known` 0: no BTF, so the
/// probes cannot read a socket's tuple themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLayout {
    pub known: u32,
    pub family: u32,
    /// IPv4 peer and local address (`skc_daddr`, `skc_rcv_saddr`).
    pub daddr: u32,
    pub rcv_saddr: u32,
    /// Peer port (network order) and local port (host order).
    pub dport: u32,
    pub num: u32,
    /// IPv6 peer and local address.
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, made only of integers and arrays of integers, and has
    // no padding (checked by the size assertions below), so every bit pattern is valid.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::DataEvent {}
    unsafe impl aya::Pod for super::Tuple {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::CloseEvent {}
    unsafe impl aya::Pod for super::TracedSet {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::ListenEvent {}
    unsafe impl aya::Pod for super::SockLayout {}
}

// No padding anywhere: the size is the sum of the fields.
const _: () = assert!(core::mem::size_of::<EventHeader>() == 32);
const _: () = assert!(core::mem::size_of::<DataEvent>() == 32 + 8 * 3 + 4 * 6);
const _: () = assert!(core::mem::size_of::<Tuple>() == 40);
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 32 + 8 + 40 + 8 + 16);
const _: () = assert!(core::mem::size_of::<CloseEvent>() == 48);
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 32 + 16 + 16 + EXEC_FILENAME_LEN);
const _: () = assert!(core::mem::size_of::<ListenEvent>() == 32 + 8 + 16);
const _: () = assert!(core::mem::size_of::<SockLayout>() == 4 * 8);
const _: () = assert!(CHUNK_SIZE.is_power_of_two());
