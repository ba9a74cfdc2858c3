//! Socket syscalls already in progress when the probes are attached.
//!
//! The probes remember a syscall's arguments at `sys_enter_*` and copy its bytes at
//! `sys_exit_*`. A thread that was already blocked in `read()` or `accept()` when the agent
//! started never passes the entry probe, so the request that wakes it would be lost: the first
//! request on every idle keep-alive connection of a thread-per-connection server. The kernel
//! shows what such a thread waits in (`/proc/PID/task/TID/syscall`: number and arguments), so
//! the agent writes the entry record itself; the exit probe then captures the data as usual.
//!
//! A thread that returns between the read of that file and the map update is simply missed
//! (as before). The record is inserted only where none exists, so it never replaces one the
//! entry probe wrote, and any later traced syscall of the thread replaces it.
use std::fs;

use tracer_common::{Inflight, syscall};

/// x86_64 syscall numbers of the socket syscalls the probes follow, with their `syscall` id.
/// Connect and sendfile are left out: a blocking connect carries no data, and sendfile's
/// arguments are not (fd, buf, count).
const ADOPTED: [(u64, u32); 12] = [
    (0, syscall::READ),
    (1, syscall::WRITE),
    (19, syscall::READV),
    (20, syscall::WRITEV),
    (43, syscall::ACCEPT),
    (44, syscall::SENDTO),
    (45, syscall::RECVFROM),
    (46, syscall::SENDMSG),
    (47, syscall::RECVMSG),
    (288, syscall::ACCEPT4),
    (299, syscall::RECVMMSG),
    (307, syscall::SENDMMSG),
];

/// The entry record for a thread blocked in a followed syscall, from the text of its
/// `/proc/PID/task/TID/syscall` ("NR ARG1 ... ARG6 SP PC", arguments in hex; "running" or
/// "-1 SP PC" when the thread is not in a syscall).
pub fn parse(line: &str, now_ns: u64) -> Option<Inflight> {
    let mut words = line.split_ascii_whitespace();
    let nr: u64 = words.next()?.parse().ok()?;
    let &(_, id) = ADOPTED.iter().find(|(n, _)| *n == nr)?;
    let mut args = [0u64; 3];
    for arg in &mut args {
        let word = words.next()?;
        *arg = u64::from_str_radix(word.strip_prefix("0x")?, 16).ok()?;
    }
    Some(Inflight {
        // When the agent learnt of it: the real start is unknown, and only writes use it.
        enter_ns: now_ns,
        buf: args[1],
        count: args[2],
        // The fd is an int; the kernel shows the register, whose upper half is not part of it.
        fd: args[0] as u32 as i32,
        syscall: id,
        ..Inflight::default()
    })
}

/// What a scan found: threads blocked in a followed syscall, keyed as the probes key them
/// (`tgid << 32 | tid`), and how many threads could not be looked at for want of permission
/// (reading another user's `syscall` file takes CAP_SYS_PTRACE). Threads that exited during
/// the scan are simply not there.
#[derive(Debug, Default)]
pub struct Scan {
    pub found: Vec<(u64, Inflight)>,
    pub denied: usize,
}

/// The threads of `pid` blocked in a followed syscall now.
pub fn scan(pid: u32, now_ns: u64) -> Scan {
    let mut scan = Scan::default();
    let tasks = match fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks,
        Err(err) => {
            scan.denied += usize::from(err.kind() == std::io::ErrorKind::PermissionDenied);
            return scan;
        }
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let line = match fs::read_to_string(task.path().join("syscall")) {
            Ok(line) => line,
            Err(err) => {
                scan.denied += usize::from(err.kind() == std::io::ErrorKind::PermissionDenied);
                continue;
            }
        };
        if let Some(inflight) = parse(&line, now_ns) {
            scan.found
                .push(((u64::from(pid) << 32) | u64::from(tid), inflight));
        }
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_reads_and_accepts_are_adopted() {
        let read = parse(
            "0 0x5 0x7f3a2c001000 0x10000 0x0 0x0 0x0 0x7ffd5e0c 0x7f3a2d1e\n",
            7,
        );
        assert_eq!(
            read,
            Some(Inflight {
                enter_ns: 7,
                buf: 0x7f3a_2c00_1000,
                count: 0x10000,
                fd: 5,
                syscall: syscall::READ,
                ..Inflight::default()
            })
        );
        let accept = parse("288 0x3 0x0 0x0 0x80800 0x0 0x0 0x7ffd 0x7f3a\n", 0).unwrap();
        assert_eq!((accept.fd, accept.syscall), (3, syscall::ACCEPT4));
        let recvmsg = parse("47 0xc 0x7ffd10 0x40 0x0 0x0 0x0 0x7ffd 0x7f3a", 0).unwrap();
        assert_eq!(
            (recvmsg.fd, recvmsg.buf, recvmsg.syscall),
            (12, 0x7ffd10, syscall::RECVMSG)
        );
    }

    #[test]
    fn other_states_are_not() {
        for line in [
            "running\n",
            "-1 0x7ffd5e0c 0x7f3a2d1e\n",
            // epoll_wait, futex: not socket I/O.
            "232 0x4 0x7ffd 0x200 0xffffffff 0x0 0x0 0x7ffd 0x7f3a\n",
            "202 0x7f3a 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f3a\n",
            // Truncated or garbled.
            "0 0x5 0x7f3a",
            "0 5 0x7f3a 0x10",
            "",
            "0 0xzz 0x1 0x2",
        ] {
            assert_eq!(parse(line, 0), None, "{line:?}");
        }
    }

    #[test]
    fn a_thread_blocked_in_read_is_found() {
        use std::io::{Read as _, Write as _};
        use std::os::{fd::AsRawFd as _, unix::net::UnixStream};
        let (mut a, b) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            a.read(&mut buf).unwrap()
        });
        // The thread is blocked in recv(fd, buf, 8) (std's read on a socket) once /proc says so.
        let mut found = Vec::new();
        for _ in 0..500 {
            found = scan(std::process::id(), 0)
                .found
                .into_iter()
                .filter(|(_, i)| i.fd == fd && i.count == 8)
                .collect();
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        (&b).write_all(b"x").unwrap();
        assert_eq!(reader.join().unwrap(), 1);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0 >> 32, u64::from(std::process::id()));
        assert!([syscall::READ, syscall::RECVFROM].contains(&found[0].1.syscall));
    }
}
