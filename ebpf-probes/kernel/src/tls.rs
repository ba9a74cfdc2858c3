//! TLS plaintext from OpenSSL's SSL_read/SSL_write (and their `_ex` variants), by uprobes.
//!
//! The socket of an SSL call is not among its arguments (an SSL* is opaque), so it is learnt
//! from the socket reads and writes the call makes on the same thread: the entry uprobe saves
//! the call in `SSL_CALLS` by pid_tgid, the socket probe (`crate::sock_io`) finds it there,
//! records the socket and keeps the ciphertext to itself, and `SSL_SOCKS` remembers
//! SSL* -> socket for calls served from OpenSSL's buffer without a syscall. The return uprobe then emits the plaintext
//! as DATA on that connection, in the same byte positions the agent's streams expect.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{counter, direction, syscall};

use crate::{CONNS, ConnState, Io, Source, count, emit_data, is_traced, read_user};

/// SSL_* calls in flight, by pid_tgid. Not LRU: a failed insert is counted.
#[map]
static SSL_CALLS: HashMap<u64, SslCall> = HashMap::with_max_entries(16_384, 0);

/// The socket under each SSL object, for calls that make no syscall (data already buffered).
#[map]
static SSL_SOCKS: LruHashMap<SslKey, u64> = LruHashMap::with_max_entries(65_536, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslCall {
    ssl: u64,
    buf: u64,
    /// `size_t *written` / `*readbytes` of the `_ex` variants; 0 for SSL_read/SSL_write.
    len_ptr: u64,
    enter_ns: u64,
    /// The socket (sk pointer) a syscall inside this call used, or 0.
    sk: u64,
    /// `syscall::SSL_READ` or `syscall::SSL_WRITE`.
    nr: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SslKey {
    ssl: u64,
    tgid: u32,
    _pad: u32,
}

#[inline(always)]
fn enter(ctx: &ProbeContext, nr: u32, ex: bool) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let call = SslCall {
        ssl: ctx.arg::<u64>(0).unwrap_or(0),
        buf: ctx.arg::<u64>(1).unwrap_or(0),
        len_ptr: if ex {
            ctx.arg::<u64>(3).unwrap_or(0)
        } else {
            0
        },
        enter_ns: unsafe { bpf_ktime_get_ns() },
        sk: 0,
        nr,
        _pad: 0,
    };
    if SSL_CALLS.insert(pid_tgid, call, 0).is_err() {
        count(counter::LOSS_TLS_CALL_MAP_FULL, 1);
    }
    0
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, syscall::SSL_WRITE, false)
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, syscall::SSL_WRITE, true)
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, syscall::SSL_READ, false)
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, syscall::SSL_READ, true)
}

/// Return of any of the four: emits the plaintext moved, if any.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { SSL_CALLS.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = SSL_CALLS.remove(pid_tgid);
    // Every variant returns int: a byte count, or 1 for success of the `_ex` ones.
    let ret: i32 = ctx.ret();
    if ret <= 0 {
        return 0;
    }
    let len = if call.len_ptr != 0 {
        read_user::<u64>(call.len_ptr).unwrap_or(0)
    } else {
        ret as u64
    };
    if len == 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let key = SslKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    let sk = if call.sk != 0 {
        call.sk
    } else {
        match unsafe { SSL_SOCKS.get(key) } {
            Some(&sk) => sk,
            None => return lost(len),
        }
    };
    let Some(conn) = CONNS.get_ptr_mut(sk) else {
        return lost(len);
    };
    let fd = unsafe {
        (*conn).tls = 1;
        (*conn).fd
    };
    let dir = if call.nr == syscall::SSL_READ {
        direction::INGRESS
    } else {
        direction::EGRESS
    };
    let io = Io {
        enter_ns: call.enter_ns,
        fd,
        syscall: call.nr,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    emit_data(pid_tgid, &io, conn, dir, Source::Buf(call.buf), len, now);
    0
}

#[inline(always)]
fn lost(len: u64) -> u32 {
    count(counter::LOSS_TLS_NO_SOCKET, 1);
    count(counter::LOSS_TLS_NO_SOCKET_BYTES, len);
    0
}

/// Called for every socket read/write of a traced process, on its connection: ties a syscall
/// made inside an SSL_* call to that call, and says whether the bytes are ciphertext, to be
/// kept from the agent (true) rather than emitted.
#[inline(always)]
pub fn ciphertext(pid_tgid: u64, sk: u64, conn: *mut ConnState, len: u64) -> bool {
    let conn = unsafe { &mut *conn };
    if let Some(call) = SSL_CALLS.get_ptr_mut(pid_tgid) {
        let ssl = unsafe {
            (*call).sk = sk;
            (*call).ssl
        };
        let key = SslKey {
            ssl,
            tgid: (pid_tgid >> 32) as u32,
            _pad: 0,
        };
        let _ = SSL_SOCKS.insert(key, sk, 0);
        conn.tls = 1;
    }
    if conn.tls == 0 {
        return false;
    }
    count(counter::TLS_CIPHERTEXT_BYTES, len);
    true
}

/// Whether this syscall's bytes are TLS, judged when its connection is first seen: made inside
/// an SSL_* call, or starting with a TLS record header (content type 20..23, version 3.x),
/// which no plaintext protocol we parse begins with. Catches handshakes made outside SSL_read
/// and SSL_write (SSL_connect, SSL_do_handshake) and connections of processes whose libssl
/// has no uprobes.
#[inline(always)]
pub fn starts_tls(pid_tgid: u64, first_byte: u64) -> u32 {
    if SSL_CALLS.get_ptr(pid_tgid).is_some() {
        return 1;
    }
    if first_byte == 0 {
        return 0;
    }
    match read_user::<[u8; 3]>(first_byte) {
        Some([20..=23, 3, 0..=4]) => 1,
        _ => 0,
    }
}
