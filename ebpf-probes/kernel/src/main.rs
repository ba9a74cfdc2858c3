//! tracer-agent kernel programs. Tracepoints only: this must run where kprobes and fentry are
//! unavailable (see shared notes on the kernel). No syscall tracepoints either: enabling any one
//! of them sends every syscall of every process on the host down the kernel's slow path.
//!
//! How a socket read or write becomes events:
//! * `sock:sock_{send,recv}_length` fire inside the syscall, in the caller's context, once its
//!   bytes have moved. They name the socket, its family and protocol, and the byte count; the
//!   syscall's own arguments are still in the user registers saved at its entry
//!   (`bpf_task_pt_regs`): which syscall (`orig_ax`), the fd and where the bytes are. Files
//!   and pipes never reach these tracepoints.
//! * The program copies up to the capture limit from user memory and writes `DataEvent` chunks
//!   to `EVENTS`, each placed by its byte position in that direction of the connection;
//!   `tcp:tcp_sendmsg_locked` says when a send began.
//!
//! Connections are keyed by socket (`CONNS`): first seen at their first read or write, ended
//! when the kernel frees the socket (`tcp:tcp_destroy_sock`). Tuples and roles come from
//! `sock:inet_sock_set_state`, keyed by sk pointer; a socket older than the agent is read
//! directly (`SOCK_LAYOUT`, or without BTF `tcp:tcp_rcv_space_adjust`).
//! Entry points are thin; each losing path increments a `COUNTERS` slot.
//!
//! Which processes are traced is one byte per pid in `TRACED` (states in
//! `tracer_common::traced`): forks copy the parent's byte, exits clear it. With exec watching on
//! (`--exe`), `sched_process_exec` marks a newly exec'd process PENDING (traced provisionally)
//! and reports it; the agent decides. With listen watching on (`--port`), a process that starts
//! listening on a selected port is marked traced right here, before it can accept anything.
#![no_std]
#![no_main]

mod tls;

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes,
        generated::{
            bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_loop, bpf_probe_read_user,
            bpf_task_pt_regs,
        },
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{
    CHUNK_SIZE, CloseEvent, ConnEvent, DataEvent, EXEC_FILENAME_LEN, EventHeader, ExecEvent,
    ListenEvent, MAX_CAPTURE_LIMIT, MAX_CHUNKS_PER_SYSCALL, MAX_IOV, SockLayout, TRACED_PID_LIMIT,
    TracedSet, Tuple, conn_flags, counter, data_flags, direction, kind, role, syscall, traced,
};

// ---- load-time configuration (set by the agent with EbpfLoader::set_global) ----

/// 1: trace every process but the agent and the excluded ones; 0: only the tgids in `TRACED`.
#[unsafe(no_mangle)]
static TRACE_ALL: u32 = 0;
/// 1: report execs (EXEC events) and mark untraced exec'd processes PENDING (`--exe`).
#[unsafe(no_mangle)]
static WATCH_EXEC: u32 = 0;
/// 1: trace processes that listen on a port set in `PORTS` (`--port`).
#[unsafe(no_mangle)]
static WATCH_LISTEN: u32 = 0;
/// 1: some processes are excluded (`--exclude-*`), so with TRACE_ALL their bytes are read too.
#[unsafe(no_mangle)]
static EXCLUSIONS: u32 = 0;
/// The agent's own tgid, never traced.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;
/// Bytes captured per syscall at most (clamped to MAX_CAPTURE_LIMIT).
#[unsafe(no_mangle)]
static CAPTURE_LIMIT: u32 = tracer_common::DEFAULT_CAPTURE_LIMIT;
/// Where `struct sock` keeps addresses and ports in this kernel (from its BTF), for tuples of
/// sockets no tracepoint described (connections older than the agent).
#[unsafe(no_mangle)]
static SOCK_LAYOUT: SockLayout = SockLayout {
    known: 0,
    family: 0,
    daddr: 0,
    rcv_saddr: 0,
    dport: 0,
    num: 0,
    v6_daddr: 0,
    v6_rcv_saddr: 0,
};
/// Wake the agent only once this many bytes wait in the ring buffer; it also drains on a short
/// timer. One wakeup per event would cost the agent a context switch per syscall.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 1 << 20;

// ---- maps ----

/// Traced thread-group ids (and, briefly, thread ids of their new threads: see fork).
/// Mmapable, so the agent can change one byte without rewriting the 4 MiB value.
#[map]
static TRACED: Array<TracedSet> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Ports whose listeners are traced (non-zero), indexed by port number.
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

/// Tracked connections by socket (sk pointer); the agent sets the size (`--max-connections`).
/// Not LRU: an eviction would end a connection without a CLOSE and restart it mid-stream,
/// unseen. Every TCP socket is destroyed through `tcp_destroy_sock`, which removes its entry,
/// so nothing leaks; a full map refuses new connections and counts them (conn_map_full).
#[map]
static CONNS: HashMap<u64, ConnState> = HashMap::with_max_entries(65_536, 0);

/// Tuple and role of TCP sockets by sk pointer, host-wide.
#[map]
static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65_536, 0);

/// Events to the agent. The agent sets the size at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Statistics and loss counters, indexed by `tracer_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-CPU sequence for connection ids.
#[map]
static CONN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU staging area for one data chunk: header then payload. The payload area is twice a
/// chunk so that `offset < CHUNK_SIZE` plus `len <= CHUNK_SIZE` is always in bounds for the
/// verifier.
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    /// Kept here rather than on the stack: the verifier does not track map value contents, so
    /// the copy loop's callback is verified once instead of once per possible iteration.
    copy: CopyState,
    event: DataEvent,
    data: [u8; CHUNK_SIZE * 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ConnState {
    id: u64,
    /// Next byte position per direction (index: tracer_common::direction).
    pos: [u64; 2],
    /// The process and fd that first moved bytes on it: its CLOSE, sent from whatever context
    /// TCP destroys the socket in, names them.
    tgid: u32,
    fd: i32,
    /// 1 once the connection is known to carry TLS (see `tls`): its syscalls' bytes are
    /// ciphertext, not sent; positions count the plaintext the uprobes emit.
    tls: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SockInfo {
    tuple: Tuple,
    role: u32,
    _pad: u32,
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: u32 = 2;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_LISTEN: i32 = 10;
const BPF_F_MMAPABLE: u32 = 1 << 10;

// ---- small helpers ----

#[inline(always)]
fn read<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // Tracepoint records may be read directly; the verifier checks the offset.
    unsafe { *(ctx.as_ptr() as *const u8).add(offset).cast::<T>() }
}

#[inline(always)]
fn count(index: u32, n: u64) -> u64 {
    match COUNTERS.get_ptr_mut(index) {
        Some(p) => unsafe {
            let before = *p;
            *p = before + n;
            before
        },
        None => 0,
    }
}

/// The traced-set byte of `pid`.
#[inline(always)]
fn traced_entry(pid: u32) -> Option<*mut u8> {
    let set = TRACED.get_ptr_mut(0)?;
    let index = (pid & (TRACED_PID_LIMIT - 1)) as usize;
    Some(unsafe { (*set).pids.as_mut_ptr().add(index) })
}

#[inline(always)]
fn state(pid: u32) -> u8 {
    match traced_entry(pid) {
        Some(entry) => unsafe { *entry },
        None => traced::NONE,
    }
}

#[inline(always)]
fn set_state(pid: u32, value: u8) {
    if let Some(entry) = traced_entry(pid) {
        unsafe { *entry = value };
    }
}

#[inline(always)]
fn trace_all() -> bool {
    unsafe { read_volatile(&TRACE_ALL) != 0 }
}

/// Whether a process in `state` is traced.
#[inline(always)]
fn state_traced(state: u8) -> bool {
    if trace_all() {
        state != traced::EXCLUDED && state != traced::EXCLUDED_EXE
    } else {
        state == traced::TRACED || traced::is_pending(state)
    }
}

#[inline(always)]
fn is_traced(tgid: u32) -> bool {
    if trace_all() {
        if tgid == unsafe { read_volatile(&AGENT_TGID) } {
            return false;
        }
        // Without exclusions every byte says traced: skip the lookup.
        if unsafe { read_volatile(&EXCLUSIONS) } == 0 {
            return true;
        }
    }
    state_traced(state(tgid))
}

/// Ring buffer flags: wake the agent only when enough data waits (see WAKEUP_BYTES).
#[inline(always)]
fn wakeup_flags() -> u64 {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= unsafe { read_volatile(&WAKEUP_BYTES) } {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
fn capture_limit() -> u64 {
    let limit = unsafe { read_volatile(&CAPTURE_LIMIT) };
    if limit > MAX_CAPTURE_LIMIT {
        MAX_CAPTURE_LIMIT as u64
    } else {
        limit as u64
    }
}

#[inline(always)]
fn header(kind: u32, pid_tgid: u64, fd: i32, conn_id: u64) -> EventHeader {
    EventHeader {
        kind,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        conn_id,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

#[inline(always)]
fn output<T>(value: &T) -> bool {
    if EVENTS.output::<T>(value, wakeup_flags()).is_err() {
        count(counter::LOSS_RINGBUF_FULL, 1);
        return false;
    }
    true
}

/// Connection ids: a per-CPU sequence with the CPU number in the low 10 bits, so ids are unique
/// without atomics and stay short enough to read in the dump.
fn new_conn_id() -> u64 {
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let seq = match CONN_SEQ.get_ptr_mut(0) {
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    };
    (seq << 10) | (cpu & 1023)
}

// ---- inside the syscall: when a send began ----

/// When a thread's current send began: `tcp_sendmsg_locked` fills this CPU's slot and
/// `sock_send_length`, at the end of the same send, takes it. Per CPU, not per thread: no hash
/// map work on every send. A send that slept and woke on another CPU finds no slot of its own
/// there and is taken to start when it ended.
#[repr(C)]
#[derive(Clone, Copy)]
struct SendStart {
    pid_tgid: u64,
    ns: u64,
}

#[map]
static SEND_START: PerCpuArray<SendStart> = PerCpuArray::with_max_entries(1, 0);

/// A slot this old was left by a send that moved CPU, not begun by the one ending now.
const SEND_STALE_NS: u64 = 100_000_000;

/// Fires once per TCP send call, before its bytes are queued: the start of a write.
#[tracepoint]
pub fn tcp_sendmsg_locked(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    if let Some(slot) = SEND_START.get_ptr_mut(0) {
        let ns = unsafe { bpf_ktime_get_ns() };
        unsafe { *slot = SendStart { pid_tgid, ns } };
    }
    0
}

/// The start of this thread's send that ends at `now`, if this CPU saw it begin.
#[inline(always)]
fn take_send_start(pid_tgid: u64, now: u64) -> Option<u64> {
    let slot = unsafe { &mut *SEND_START.get_ptr_mut(0)? };
    if slot.pid_tgid != pid_tgid {
        return None;
    }
    slot.pid_tgid = 0;
    (now.wrapping_sub(slot.ns) < SEND_STALE_NS).then_some(slot.ns)
}

/// Tuple fields common to inet_sock_set_state and tcp_rcv_space_adjust, at their offsets.
#[inline(always)]
fn read_tuple(
    ctx: &TracePointContext,
    sport: usize,
    family: usize,
    saddr: usize,
    saddr_v6: usize,
) -> Option<Tuple> {
    let family: u16 = read(ctx, family);
    let mut tuple = Tuple {
        family,
        sport: read(ctx, sport),
        dport: read(ctx, sport + 2),
        _pad: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    // Address arrays are copied with a helper: the compiler turns direct copies into
    // pointer-walking loops over ctx, which the verifier rejects.
    match family {
        AF_INET => {
            let s: [u8; 4] = unsafe { ctx.read_at(saddr) }.ok()?;
            let d: [u8; 4] = unsafe { ctx.read_at(saddr + 4) }.ok()?;
            tuple.saddr[..4].copy_from_slice(&s);
            tuple.daddr[..4].copy_from_slice(&d);
        }
        AF_INET6 => {
            tuple.saddr = unsafe { ctx.read_at(saddr_v6) }.ok()?;
            tuple.daddr = unsafe { ctx.read_at(saddr_v6 + 16) }.ok()?;
        }
        _ => return None,
    }
    Some(tuple)
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let protocol: u16 = read(&ctx, 30);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    let sk: u64 = read(&ctx, 8);
    let old: i32 = read(&ctx, 16);
    let new: i32 = read(&ctx, 20);
    if new == TCP_LISTEN {
        return listen(&ctx);
    }
    if new == TCP_SYN_SENT && let Some(conn) = unsafe { CONNS.get(sk) } {
        // The socket connects again (after connect(AF_UNSPEC)): its old connection is over.
        emit_close(conn);
        let _ = CONNS.remove(sk);
    }
    // SYN_SENT fires before connect() picks the source port; SYN_SENT -> ESTABLISHED
    // refreshes the tuple with it.
    let role = match (old, new) {
        (_, TCP_SYN_SENT) | (TCP_SYN_SENT, TCP_ESTABLISHED) => role::CLIENT,
        (_, TCP_SYN_RECV) | (TCP_SYN_RECV, TCP_ESTABLISHED) => role::SERVER,
        _ => return 0,
    };
    let Some(tuple) = read_tuple(&ctx, 24, 28, 32, 40) else {
        return 0;
    };
    let _ = SOCKS.insert(
        sk,
        SockInfo {
            tuple,
            role,
            _pad: 0,
        },
        0,
    );
    0
}

/// The socket is freed: no read or write can follow, so its connection ends here. Not at the
/// move to TCP_CLOSE, which a socket still open in its process can outlive: after
/// shutdown(SHUT_WR) the peer's FIN closes it while the response waits unread.
#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let sk: u64 = read(&ctx, 8);
    if let Some(conn) = unsafe { CONNS.get(sk) } {
        emit_close(conn);
        let _ = CONNS.remove(sk);
    }
    // The next socket at this address is another one.
    let _ = SOCKS.remove(sk);
    0
}

/// CLOSE -> LISTEN fires inside listen(), in the listening process's context: a listener on a
/// selected port is traced from here on, before its first accept.
#[inline(always)]
fn listen(ctx: &TracePointContext) -> u32 {
    if unsafe { read_volatile(&WATCH_LISTEN) } == 0 {
        return 0;
    }
    let port: u16 = read(ctx, 24);
    if PORTS.get(port as u32).copied().unwrap_or(0) == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == unsafe { read_volatile(&AGENT_TGID) } {
        return 0;
    }
    let Some(entry) = traced_entry(tgid) else {
        return 0;
    };
    let prev = unsafe { *entry };
    if prev == traced::EXCLUDED || prev == traced::EXCLUDED_EXE {
        return 0;
    }
    unsafe { *entry = traced::TRACED };
    let family: u16 = read(ctx, 28);
    let mut event = ListenEvent {
        header: header(kind::LISTEN, pid_tgid, -1, 0),
        prev_state: prev as u32,
        family,
        port,
        addr: [0; 16],
    };
    if let Some(tuple) = read_tuple(ctx, 24, 28, 32, 40) {
        event.addr = tuple.saddr;
    }
    output(&event);
    0
}

/// Receives on connections that predate the agent reveal their tuple here. Attached only when
/// the kernel's BTF is missing: otherwise `emit_open` reads the tuple from the socket.
#[tracepoint]
pub fn tcp_rcv_space_adjust(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let sk: u64 = read(&ctx, 8);
    if SOCKS.get_ptr(sk).is_some() {
        return 0;
    }
    let Some(tuple) = read_tuple(&ctx, 16, 20, 22, 30) else {
        return 0;
    };
    let _ = SOCKS.insert(
        sk,
        SockInfo {
            tuple,
            role: role::UNKNOWN,
            _pad: 0,
        },
        0,
    );
    0
}

// ---- process life ----

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    // The forking task is current; child_pid is the new task's id (a tid for new threads,
    // whose byte is harmless and cleared when the thread exits). The child inherits the
    // parent's state: traced, pending, or excluded.
    let parent = state((bpf_get_current_pid_tgid() >> 32) as u32);
    if parent == traced::NONE {
        return 0;
    }
    let child: i32 = read(&ctx, 20);
    set_state(child as u32, parent);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let was_traced = is_traced(tgid);
    if !was_traced && state(tgid) == traced::NONE && state(tid) == traced::NONE {
        return 0;
    }
    let group_dead: u8 = read(&ctx, 32);
    // Excluded processes' bytes are cleared too, so a reused pid starts untraced.
    if tid != tgid {
        set_state(tid, traced::NONE);
    }
    if group_dead != 0 {
        set_state(tgid, traced::NONE);
        if was_traced {
            output(&header(kind::EXIT, pid_tgid, -1, 0));
        }
    }
    0
}

/// A process exec'd. Only with exec watching on: unless excluded for good, it becomes pending
/// (traced until the agent decides, so nothing it does before the agent reads this is missed;
/// see `traced::PENDING`), and the agent hears of it.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if unsafe { read_volatile(&WATCH_EXEC) } == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == unsafe { read_volatile(&AGENT_TGID) } {
        return 0;
    }
    let Some(entry) = traced_entry(tgid) else {
        return 0;
    };
    let prev = unsafe { *entry };
    if prev == traced::EXCLUDED {
        return 0; // for good: nothing to decide
    }
    let inherited = !trace_all()
        && (prev == traced::TRACED
            || (traced::is_pending(prev) && prev & traced::PENDING_INHERITED != 0));
    // Differs from the previous exec's generation; a fresh one starts anywhere.
    let generation = if traced::is_pending(prev) {
        prev.wrapping_add(1)
    } else {
        (unsafe { bpf_ktime_get_ns() } >> 10) as u8
    } & traced::PENDING_GENERATION;
    let next = traced::PENDING
        | if inherited {
            traced::PENDING_INHERITED
        } else {
            0
        }
        | generation;
    unsafe { *entry = next };
    emit_exec(&ctx, pid_tgid, prev, next);
    0
}

fn emit_exec(ctx: &TracePointContext, pid_tgid: u64, prev: u8, next: u8) {
    // Reserved in place: the record is too large for the BPF stack.
    let Some(mut slot) = EVENTS.reserve::<ExecEvent>(0) else {
        count(counter::LOSS_RINGBUF_FULL, 1);
        return;
    };
    let event = slot.as_mut_ptr();
    // `filename` is a __data_loc field: offset in the low 16 bits, length in the high ones.
    let loc: u32 = read(ctx, 8);
    let src = unsafe { (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize) };
    unsafe {
        (*event).header = header(kind::EXEC, pid_tgid, -1, 0);
        (*event).prev_state = prev as u32;
        (*event).state = next as u32;
        (*event)._pad = 0;
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        let name = &mut (*event).filename;
        let len = match bpf_probe_read_kernel_str_bytes(src, &mut name[..EXEC_FILENAME_LEN - 1]) {
            Ok(bytes) => bytes.len(),
            Err(_) => 0,
        };
        (*event).filename_len = len as u32;
    }
    slot.submit(wakeup_flags());
}

// ---- connections ----

fn emit_open(pid_tgid: u64, sk: u64, conn: &ConnState, nr: u32) {
    let mut event = ConnEvent {
        header: header(kind::OPEN, pid_tgid, conn.fd, conn.id),
        role: role::UNKNOWN,
        flags: 0,
        tuple: Tuple::default(),
        syscall: nr,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    if let Some(info) = unsafe { SOCKS.get(sk) } {
        event.tuple = info.tuple;
        event.flags = conn_flags::TUPLE_KNOWN;
        event.role = info.role;
    } else if let Some(tuple) = sock_tuple(sk) {
        event.tuple = tuple;
        event.flags = conn_flags::TUPLE_KNOWN;
    }
    if conn.tls != 0 {
        event.flags |= conn_flags::TLS;
    }
    output(&event);
}

/// The tuple of socket `sk`, read from the socket itself (see `SOCK_LAYOUT`).
fn sock_tuple(sk: u64) -> Option<Tuple> {
    let layout = unsafe { read_volatile(&SOCK_LAYOUT) };
    if layout.known == 0 || sk == 0 {
        return None;
    }
    let field = |offset: u32| sk + offset as u64;
    let family: u16 = read_kernel(field(layout.family))?;
    let dport: u16 = read_kernel(field(layout.dport))?;
    let mut tuple = Tuple {
        family,
        sport: read_kernel(field(layout.num))?,
        dport: u16::from_be(dport),
        _pad: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    match family {
        AF_INET => {
            tuple.saddr[..4].copy_from_slice(&read_kernel::<[u8; 4]>(field(layout.rcv_saddr))?);
            tuple.daddr[..4].copy_from_slice(&read_kernel::<[u8; 4]>(field(layout.daddr))?);
        }
        AF_INET6 => {
            tuple.saddr = read_kernel(field(layout.v6_rcv_saddr))?;
            tuple.daddr = read_kernel(field(layout.v6_daddr))?;
        }
        _ => return None,
    }
    Some(tuple)
}

/// Address of the first byte at `source` (0 when there is none to read).
#[inline(always)]
fn first_byte(source: Source) -> u64 {
    match source {
        Source::Buf(buf) => buf,
        Source::Iov(iov, n) if n > 0 => read_user::<Iovec>(iov).map_or(0, |seg| seg.base),
        _ => 0,
    }
}

/// Reports the end of `conn`, in the name of the process that first used it.
fn emit_close(conn: &ConnState) {
    let owner = ((conn.tgid as u64) << 32) | conn.tgid as u64;
    output(&CloseEvent {
        header: header(kind::CLOSE, owner, conn.fd, conn.id),
        egress_bytes: conn.pos[direction::EGRESS as usize],
        ingress_bytes: conn.pos[direction::INGRESS as usize],
    });
}

/// The connection on socket `sk`, created and announced at its first read or write, which
/// `io` describes and whose bytes are at `source`.
#[inline(always)]
fn conn_for(
    ctx: &TracePointContext,
    pid_tgid: u64,
    sk: u64,
    io: &Io,
    source: Source,
) -> Option<*mut ConnState> {
    if let Some(conn) = CONNS.get_ptr_mut(sk) {
        return Some(conn);
    }
    let state = ConnState {
        id: new_conn_id(),
        pos: [0, 0],
        tgid: (pid_tgid >> 32) as u32,
        fd: io.fd,
        tls: tls::starts_tls(pid_tgid, first_byte(source)),
        _pad: 0,
    };
    if CONNS.insert(sk, state, 0).is_err() {
        if count(counter::LOSS_CONN_MAP_FULL, 1) == 0 {
            warn!(ctx, "connection map full: a connection is not traced");
        }
        return None;
    }
    emit_open(pid_tgid, sk, &state, io.syscall);
    CONNS.get_ptr_mut(sk)
}

/// Where a syscall's bytes are in user memory.
#[derive(Clone, Copy)]
enum Source {
    /// One buffer.
    Buf(u64),
    /// An iovec array and its length.
    Iov(u64, u64),
    /// Nothing to copy (sendfile).
    None,
    /// Bytes in user memory the probes do not locate (a round of *mmsg, a syscall not
    /// followed): the stream gets a gap of their length, counted as not captured.
    Skip,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// `struct user_msghdr` as far as we need it (stable user ABI, x86_64).
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;

#[inline(always)]
fn read_user<T: Copy>(addr: u64) -> Option<T> {
    // Into uninitialised memory: a zeroed value costs a byte-by-byte memset call in BPF.
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(addr as *const T) }.ok()
}

#[inline(always)]
fn read_kernel<T: Copy>(addr: u64) -> Option<T> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// Sends one staged chunk of `fill` bytes.
#[inline(always)]
fn flush_chunk(scratch: *mut Scratch, fill: u64, last: bool) {
    let len = if fill > CHUNK_SIZE as u64 {
        CHUNK_SIZE as u64
    } else {
        fill
    };
    unsafe {
        let event = &mut (*scratch).event;
        event.captured_len = len as u32;
        if last {
            event.flags |= data_flags::LAST_CHUNK;
        }
        let size = core::mem::size_of::<DataEvent>() as u64 + len;
        let bytes =
            core::slice::from_raw_parts(event as *const DataEvent as *const u8, size as usize);
        if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_err() {
            count(counter::LOSS_RINGBUF_FULL, 1);
            count(counter::LOSS_RINGBUF_FULL_BYTES, len);
        } else {
            count(counter::EVENTS, 1);
            count(counter::BYTES_CAPTURED, len);
        }
        event.flags &= !data_flags::FIRST_CHUNK;
        event.chunk_offset += len as u32;
        event.chunk_index += 1;
    }
}

/// State of one payload copy, shared with the `bpf_loop` callback through `SCRATCH`.
#[repr(C)]
struct CopyState {
    /// iovec array (or 0 for a single buffer) and its length.
    iov: u64,
    iov_count: u64,
    /// Index of the current segment.
    index: u64,
    seg_base: u64,
    seg_left: u64,
    /// Bytes still to capture.
    remaining: u64,
    captured: u64,
    /// Bytes staged in the current chunk: iovecs are packed into one chunk rather than one
    /// record each (a header + body writev is one record, not two).
    fill: u64,
    /// 1 once the LAST chunk has gone out or copying stopped.
    done: u64,
}

/// One step of a payload copy: moves to the next iovec, or copies into the staged chunk and
/// sends it once full or complete.
/// Runs under bpf_loop, so the verifier checks it once instead of once per unrolled iteration.
extern "C" fn copy_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let state = unsafe { &mut (*scratch).copy };
    if state.remaining == 0 || state.done != 0 {
        return 1;
    }
    if state.seg_left == 0 {
        state.index += 1;
        if state.iov == 0 || state.index >= state.iov_count || state.index >= MAX_IOV as u64 {
            return 1;
        }
        let addr = state.iov + state.index * core::mem::size_of::<Iovec>() as u64;
        let Some(seg) = read_user::<Iovec>(addr) else {
            return 1;
        };
        state.seg_base = seg.base;
        state.seg_left = seg.len;
        return 0;
    }
    // The staged chunk is flushed when full, so fill < CHUNK_SIZE here; the mask says so to
    // the verifier, and offset + n stays inside the 2 x CHUNK_SIZE staging area.
    let offset = state.fill & (CHUNK_SIZE as u64 - 1);
    let mut n = state.remaining;
    if n > state.seg_left {
        n = state.seg_left;
    }
    if n > CHUNK_SIZE as u64 - offset {
        n = CHUNK_SIZE as u64 - offset;
    }
    if n > CHUNK_SIZE as u64 {
        n = CHUNK_SIZE as u64;
    }
    let ret = unsafe {
        bpf_probe_read_user(
            (*scratch).data.as_mut_ptr().add(offset as usize) as *mut _,
            (n as u32) & (CHUNK_SIZE as u32 * 2 - 1),
            state.seg_base as *const _,
        )
    };
    if ret != 0 {
        count(counter::LOSS_COPY_FAILED, 1);
        unsafe { (*scratch).event.flags |= data_flags::COPY_FAILED };
        return 1;
    }
    state.seg_base += n;
    state.seg_left -= n;
    state.remaining -= n;
    state.captured += n;
    state.fill = offset + n;
    let last = state.remaining == 0;
    if last || state.fill >= CHUNK_SIZE as u64 {
        flush_chunk(scratch, state.fill, last);
        state.fill = 0;
    }
    if last {
        state.done = 1;
        return 1;
    }
    0
}

/// Copies up to `limit` of the `total` bytes at `source` into DataEvent chunks. The header in
/// `scratch` must already be filled in. Returns the bytes captured.
#[inline(always)]
fn emit_payload(scratch: *mut Scratch, source: Source, total: u64, limit: u64) -> u64 {
    let want = if total < limit { total } else { limit };
    let (iov, iov_count, seg) = match source {
        Source::Buf(buf) => (
            0,
            0,
            Iovec {
                base: buf,
                len: want,
            },
        ),
        Source::Iov(iov, n) => {
            let seg = read_user::<Iovec>(iov).unwrap_or(Iovec { base: 0, len: 0 });
            (iov, n, seg)
        }
        Source::None | Source::Skip => (0, 0, Iovec { base: 0, len: 0 }),
    };
    // One volatile write: a plain one becomes byte-loop memset calls for the zeroed fields.
    unsafe {
        core::ptr::write_volatile(
            &mut (*scratch).copy,
            CopyState {
                iov,
                iov_count,
                index: 0,
                seg_base: seg.base,
                seg_left: seg.len,
                remaining: want,
                captured: 0,
                fill: 0,
                done: 0,
            },
        )
    };
    unsafe {
        bpf_loop(
            (MAX_CHUNKS_PER_SYSCALL + MAX_IOV) as u32,
            copy_step as *mut _,
            core::ptr::null_mut(),
            0,
        );
    }
    let state = unsafe { &(*scratch).copy };
    let captured = state.captured;
    if state.done == 0 {
        // Stopped early (iovec limit, failed copy): send what is staged as the LAST chunk so
        // the agent knows the syscall is complete.
        let staged = state.fill;
        unsafe { (*scratch).event.flags |= data_flags::TRUNCATED };
        flush_chunk(scratch, staged, true);
    }
    captured
}

/// What `emit_data` needs of the call that moved the bytes.
#[derive(Clone, Copy)]
struct Io {
    /// When it began (a send) or ended (a receive).
    enter_ns: u64,
    fd: i32,
    /// A [`syscall`] value.
    syscall: u32,
}

/// Emits the bytes of one syscall (or one round of a syscall that sends in rounds) on `conn`.
#[inline(always)]
fn emit_data(
    pid_tgid: u64,
    io: &Io,
    conn: *mut ConnState,
    dir: u32,
    source: Source,
    len: u64,
    now: u64,
) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let conn = unsafe { &mut *conn };
    let dir_index = (dir & 1) as usize;
    let pos = conn.pos[dir_index];
    conn.pos[dir_index] = pos + len;
    let limit = capture_limit();
    let mut flags = data_flags::FIRST_CHUNK;
    match source {
        Source::None => flags |= data_flags::NO_PAYLOAD,
        Source::Skip => flags |= data_flags::TRUNCATED,
        _ if len > limit => flags |= data_flags::TRUNCATED,
        _ => {}
    }
    unsafe {
        (*scratch).event = DataEvent {
            header: EventHeader {
                kind: kind::DATA,
                pid: (pid_tgid >> 32) as u32,
                tid: pid_tgid as u32,
                fd: io.fd,
                conn_id: conn.id,
                ts_ns: now,
            },
            enter_ns: io.enter_ns,
            syscall_pos: pos,
            syscall_len: len,
            chunk_offset: 0,
            captured_len: 0,
            direction: dir,
            syscall: io.syscall,
            flags,
            chunk_index: 0,
        };
    }
    let captured = match source {
        Source::None | Source::Skip => {
            flush_chunk(scratch, 0, true);
            0
        }
        _ => emit_payload(scratch, source, len, limit),
    };
    if captured < len {
        count(counter::BYTES_NOT_CAPTURED, len - captured);
    }
}

/// The user registers saved at syscall entry, r10 to cs (x86_64 `struct pt_regs`, whose layout
/// is user ABI): a syscall's arguments are still there while it runs.
#[repr(C)]
#[derive(Clone, Copy)]
struct SyscallRegs {
    r10: u64,
    r9: u64,
    r8: u64,
    ax: u64,
    cx: u64,
    dx: u64,
    si: u64,
    di: u64,
    /// The syscall number.
    orig_ax: u64,
    ip: u64,
    cs: u64,
}

/// Offset of r10 in `struct pt_regs`.
const PT_REGS_R10: u64 = 7 * 8;
/// `cs` of a 64-bit user task. Kernel workers (io_uring's) have zeroed registers and 32-bit
/// tasks number their syscalls differently: their registers say nothing we can use.
const USER_CS: u64 = 0x33;

/// x86_64 syscall numbers.
mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDFILE: u64 = 40;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const RECVMMSG: u64 = 299;
    pub const SENDMMSG: u64 = 307;
}

/// Fields of the `sock:sock_{send,recv}_length` records.
const SOCK_SK: usize = 8;
const SOCK_FAMILY: usize = 16;
const SOCK_PROTOCOL: usize = 18;
const SOCK_RET: usize = 20;
const SOCK_FLAGS: usize = 24;

/// The syscall in flight on this thread, from its saved registers, if it is one whose buffers
/// we know: its fd, its `syscall` id and where the `dir` bytes are.
#[inline(always)]
fn followed_syscall(dir: u32, enter_ns: u64) -> Option<(Io, Source)> {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let r = read_kernel::<SyscallRegs>(regs + PT_REGS_R10)?;
    if r.cs != USER_CS {
        return None;
    }
    let ingress = dir == direction::INGRESS;
    let (id, source) = match r.orig_ax {
        nr::READ if ingress => (syscall::READ, Source::Buf(r.si)),
        nr::WRITE if !ingress => (syscall::WRITE, Source::Buf(r.si)),
        nr::RECVFROM if ingress => (syscall::RECVFROM, Source::Buf(r.si)),
        nr::SENDTO if !ingress => (syscall::SENDTO, Source::Buf(r.si)),
        nr::READV if ingress => (syscall::READV, Source::Iov(r.si, r.dx)),
        nr::WRITEV if !ingress => (syscall::WRITEV, Source::Iov(r.si, r.dx)),
        nr::RECVMSG | nr::SENDMSG => {
            let id = if ingress {
                syscall::RECVMSG
            } else {
                syscall::SENDMSG
            };
            let iov: u64 = read_user(r.si + MSGHDR_IOV).unwrap_or(0);
            let iovlen: u64 = read_user(r.si + MSGHDR_IOVLEN).unwrap_or(0);
            (id, Source::Iov(iov, iovlen))
        }
        nr::SENDFILE if !ingress => (syscall::SENDFILE, Source::None),
        // One message per round, and nothing here says which: a gap (rare on TCP).
        nr::RECVMMSG if ingress => (syscall::RECVMMSG, Source::Skip),
        nr::SENDMMSG if !ingress => (syscall::SENDMMSG, Source::Skip),
        _ => return None,
    };
    let io = Io {
        enter_ns,
        fd: r.di as i32,
        syscall: id,
    };
    Some((io, source))
}

/// A read or write on a socket, once its bytes have moved (a syscall that sends in rounds,
/// sendfile, fires once per round). Untraced tasks stop at the traced-set byte.
#[inline(always)]
fn sock_io(ctx: &TracePointContext, dir: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // Taken even when this send failed, so no later send inherits it.
    let enter_ns = if dir == direction::EGRESS {
        take_send_start(pid_tgid, now).unwrap_or(now)
    } else {
        now
    };
    let ret: i32 = read(ctx, SOCK_RET);
    let family: u16 = read(ctx, SOCK_FAMILY);
    let protocol: u16 = read(ctx, SOCK_PROTOCOL);
    if ret <= 0 || protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
        return 0;
    }
    if dir == direction::INGRESS && read::<u32>(ctx, SOCK_FLAGS) & MSG_PEEK != 0 {
        return 0; // peeked bytes are read again
    }
    let sk: u64 = read(ctx, SOCK_SK);
    let len = ret as u64;
    let followed = followed_syscall(dir, enter_ns);
    let conn = match followed {
        Some((io, source)) => conn_for(ctx, pid_tgid, sk, &io, source),
        None => {
            // Without a syscall's fd only a connection already known can take the bytes.
            count(counter::LOSS_UNFOLLOWED_SYSCALL, 1);
            CONNS.get_ptr_mut(sk)
        }
    };
    let Some(conn) = conn else {
        count(counter::BYTES_NOT_CAPTURED, len);
        return 0;
    };
    if tls::ciphertext(pid_tgid, sk, conn, len) {
        return 0;
    }
    let (io, source) = followed.unwrap_or_else(|| {
        let io = Io {
            enter_ns,
            fd: unsafe { (*conn).fd },
            syscall: syscall::OTHER,
        };
        (io, Source::Skip)
    });
    emit_data(pid_tgid, &io, conn, dir, source, len, now);
    0
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    sock_io(&ctx, direction::EGRESS)
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    sock_io(&ctx, direction::INGRESS)
}

/// Does nothing. Benchmarks attach it to every tracepoint the real programs use, to measure
/// the floor: what any program on these tracepoints costs before it does any work.
#[tracepoint]
pub fn floor(_ctx: TracePointContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
