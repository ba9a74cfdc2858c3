//! Userspace fallback for identifying a TCP socket from `/proc`.
//!
//! The kernel probes report a connection's 4-tuple when they see it being set up. Sockets that
//! existed before the agent started never pass through those probes, so for them the agent only
//! has a process id and a file descriptor. This module turns that pair into the socket's local and
//! remote addresses and a client/server hint:
//!
//! 1. `/proc/PID/fd/FD` gives the socket inode (`socket:[INODE]`).
//! 2. `/proc/PID/net/tcp` and `/proc/PID/net/tcp6` give the TCP tables of the *process's* network
//!    namespace (the agent's own `/proc/net/tcp` shows only the agent's namespace, which is wrong
//!    for containers). The entry with that inode gives the addresses.
//! 3. The LISTEN entries of the same tables give the role: a socket whose local address is served
//!    by a listener in its namespace is the server end of the connection, any other connected
//!    socket is the client end.
//!
//! `PID` is a pid as seen in the agent's `/proc`, so the agent must share the host PID namespace
//! (the probes report host pids).
//!
//! Addresses are returned exactly as the kernel tables show them: an IPv4 peer of an IPv6 socket
//! appears as an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:port`), the same as `getsockname`
//! and `getpeername` on that socket would return. The tables carry no IPv6 scope id or flow info,
//! so those are always 0.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use procfs::ProcError;
use procfs::net::{TcpNetEntry, TcpState};
use procfs::process::{FDTarget, Process};

/// Which end of the connection the process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleHint {
    /// The socket's local address is not served by any listener in its network namespace.
    Client,
    /// The socket is listening, or its local address is served by a listener in its network
    /// namespace (it was accepted from that listener).
    Server,
    /// The socket is neither listening nor connected to a peer, so neither role applies.
    Unknown,
}

/// What `/proc` says about one TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    /// Local address. IPv4-mapped IPv6 addresses are kept as they are (see the module docs).
    pub local: SocketAddr,
    /// Peer address; unspecified with port 0 for a listening socket.
    pub remote: SocketAddr,
    pub role: RoleHint,
    /// Socket inode, as in `/proc/PID/fd/FD` -> `socket:[INODE]`.
    pub inode: u64,
}

/// Why a socket could not be identified. Every variant names the process and fd asked about.
///
/// Sources are shared (`Arc`) because one failed read of the process's `/proc` entries fails the
/// lookup of every fd in a batch.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LookupError {
    /// The process has exited, is a zombie, or is not visible in the agent's `/proc`.
    #[error(
        "process {pid} not found while looking up its fd {fd}: it has exited, or it is not \
         visible in the agent's /proc (run the agent in the host PID namespace)"
    )]
    ProcessGone {
        pid: u32,
        fd: i32,
        #[source]
        source: Arc<ProcError>,
    },
    /// The process is alive but the fd is not open: it was closed, or never existed.
    #[error("fd {fd} of process {pid} is not open (it was closed, or never opened)")]
    FdGone {
        pid: u32,
        fd: i32,
        #[source]
        source: Arc<ProcError>,
    },
    /// The fd refers to something other than a socket.
    #[error("fd {fd} of process {pid} is not a socket: it refers to {target}")]
    NotASocket { pid: u32, fd: i32, target: String },
    /// The fd is a socket, but not one in the process's TCP tables.
    #[error(
        "fd {fd} of process {pid} is socket inode {inode}, which is not in the process's TCP \
         tables (/proc/{pid}/net/tcp, tcp6): it is not a TCP socket (UDP, Unix, ...), or a TCP \
         socket that is neither connected nor listening (e.g. already closed)"
    )]
    NotInTcpTables { pid: u32, fd: i32, inode: u64 },
    /// The agent may not read the process's `/proc` entries.
    #[error(
        "permission denied reading {what} of process {pid} (fd {fd}): run the agent as root in \
         the host's user namespace (it needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH over the \
         process)"
    )]
    PermissionDenied {
        pid: u32,
        fd: i32,
        what: &'static str,
        #[source]
        source: Arc<ProcError>,
    },
    /// Any other failure reading or parsing the process's `/proc` entries.
    #[error("could not read {what} of process {pid} (fd {fd})")]
    ReadFailed {
        pid: u32,
        fd: i32,
        what: &'static str,
        #[source]
        source: Arc<ProcError>,
    },
}

impl LookupError {
    /// The process id the failed lookup was for.
    pub fn pid(&self) -> u32 {
        match self {
            Self::ProcessGone { pid, .. }
            | Self::FdGone { pid, .. }
            | Self::NotASocket { pid, .. }
            | Self::NotInTcpTables { pid, .. }
            | Self::PermissionDenied { pid, .. }
            | Self::ReadFailed { pid, .. } => *pid,
        }
    }

    /// The file descriptor the failed lookup was for.
    pub fn fd(&self) -> i32 {
        match self {
            Self::ProcessGone { fd, .. }
            | Self::FdGone { fd, .. }
            | Self::NotASocket { fd, .. }
            | Self::NotInTcpTables { fd, .. }
            | Self::PermissionDenied { fd, .. }
            | Self::ReadFailed { fd, .. } => *fd,
        }
    }
}

/// Looks up one socket. Reads the process's tcp tables once.
///
/// # Errors
///
/// A [`LookupError`] when the process or fd is gone, the fd is not a TCP socket in the process's
/// tables, or its `/proc` entries cannot be read (see the variants).
pub fn lookup(pid: u32, fd: i32) -> Result<SocketInfo, LookupError> {
    let process = open_process(pid).map_err(|failure| failure.for_fd(pid, fd))?;
    let inode = socket_inode(&process, pid, fd)?;
    let tables = Tables::read(&process, &HashSet::from([inode]))
        .map_err(|failure| failure.for_fd(pid, fd))?;
    tables.resolve(pid, fd, inode)
}

/// Same for several fds of one process with one read of the tables (the agent batches).
///
/// Results are in the order of `fds`, one per entry (duplicates included). The tables are not read
/// at all when none of the fds is a socket.
#[must_use]
pub fn lookup_many(pid: u32, fds: &[i32]) -> Vec<(i32, Result<SocketInfo, LookupError>)> {
    let process = match open_process(pid) {
        Ok(process) => process,
        Err(failure) => {
            return fds
                .iter()
                .map(|&fd| (fd, Err(failure.for_fd(pid, fd))))
                .collect();
        }
    };
    let inodes: Vec<(i32, Result<u64, LookupError>)> = fds
        .iter()
        .map(|&fd| (fd, socket_inode(&process, pid, fd)))
        .collect();
    let wanted: HashSet<u64> = inodes
        .iter()
        .filter_map(|(_, inode)| inode.as_ref().ok().copied())
        .collect();
    // Nothing to look up when no fd is a socket; skip reading what may be large tables.
    let tables = if wanted.is_empty() {
        Ok(Tables::default())
    } else {
        Tables::read(&process, &wanted)
    };
    inodes
        .into_iter()
        .map(|(fd, inode)| {
            let info = inode.and_then(|inode| match &tables {
                Ok(tables) => tables.resolve(pid, fd, inode),
                Err(failure) => Err(failure.for_fd(pid, fd)),
            });
            (fd, info)
        })
        .collect()
}

/// A failure shared by every fd of one lookup (opening the process, reading its tables).
struct Failure {
    kind: FailureKind,
    what: &'static str,
    source: Arc<ProcError>,
}

#[derive(Clone, Copy)]
enum FailureKind {
    ProcessGone,
    PermissionDenied,
    Other,
}

impl Failure {
    /// Classifies `source`; `process_alive` is only consulted for "not found", where it tells a
    /// vanished process apart from a missing file.
    fn classify(
        source: ProcError,
        what: &'static str,
        process_alive: impl FnOnce() -> bool,
    ) -> Self {
        let kind = match &source {
            ProcError::NotFound(_) if !process_alive() => FailureKind::ProcessGone,
            ProcError::PermissionDenied(_) => FailureKind::PermissionDenied,
            _ => FailureKind::Other,
        };
        Self {
            kind,
            what,
            source: Arc::new(source),
        }
    }

    fn for_fd(&self, pid: u32, fd: i32) -> LookupError {
        let source = Arc::clone(&self.source);
        match self.kind {
            FailureKind::ProcessGone => LookupError::ProcessGone { pid, fd, source },
            FailureKind::PermissionDenied => LookupError::PermissionDenied {
                pid,
                fd,
                what: self.what,
                source,
            },
            FailureKind::Other => LookupError::ReadFailed {
                pid,
                fd,
                what: self.what,
                source,
            },
        }
    }
}

fn open_process(pid: u32) -> Result<Process, Failure> {
    const WHAT: &str = "the /proc directory";
    // Pids above i32::MAX cannot exist; report them the way procfs reports any absent pid.
    let Ok(raw_pid) = i32::try_from(pid) else {
        let missing = ProcError::NotFound(Some(PathBuf::from(format!("/proc/{pid}"))));
        return Err(Failure::classify(missing, WHAT, || false));
    };
    Process::new(raw_pid).map_err(|err| Failure::classify(err, WHAT, || false))
}

/// Resolves `/proc/PID/fd/FD` to a socket inode.
fn socket_inode(process: &Process, pid: u32, fd: i32) -> Result<u64, LookupError> {
    const WHAT: &str = "the fd entry";
    match process.fd_from_fd(fd) {
        Ok(info) => match info.target {
            FDTarget::Socket(inode) => Ok(inode),
            other => Err(LookupError::NotASocket {
                pid,
                fd,
                target: describe_target(&other),
            }),
        },
        // A missing fd entry is the normal outcome for a closed fd, but also what an exited
        // process looks like through the directory handle we still hold.
        Err(err @ ProcError::NotFound(_)) if process.is_alive() => Err(LookupError::FdGone {
            pid,
            fd,
            source: Arc::new(err),
        }),
        Err(err) => Err(Failure::classify(err, WHAT, || false).for_fd(pid, fd)),
    }
}

/// Renders an fd target the way `readlink /proc/PID/fd/FD` shows it.
fn describe_target(target: &FDTarget) -> String {
    match target {
        FDTarget::Path(path) => path.display().to_string(),
        FDTarget::Socket(inode) => format!("socket:[{inode}]"),
        FDTarget::Net(inode) => format!("net:[{inode}]"),
        FDTarget::Pipe(inode) => format!("pipe:[{inode}]"),
        FDTarget::AnonInode(name) => format!("anon_inode:{name}"),
        FDTarget::MemFD(name) => format!("/memfd:{name}"),
        FDTarget::Other(kind, inode) => format!("{kind}:[{inode}]"),
        FDTarget::Unknown(kind, rest) => format!("{kind}:{rest}"),
    }
}

/// The parts of one read of a process's `tcp` and `tcp6` tables that a lookup needs.
#[derive(Default)]
struct Tables {
    /// Entries for the inodes asked about only: busy hosts have very large tables.
    by_inode: HashMap<u64, TcpNetEntry>,
    listeners: Listeners,
}

impl Tables {
    fn read(process: &Process, wanted: &HashSet<u64>) -> Result<Self, Failure> {
        let v4 = process.tcp().map_err(|err| {
            Failure::classify(err, "the TCP table (net/tcp)", || process.is_alive())
        })?;
        let v6 = match process.tcp6() {
            Ok(entries) => entries,
            // Without IPv6 (ipv6.disable=1) the file does not exist; there are simply no v6
            // sockets. Unless the process has just exited, which is a real failure.
            Err(ProcError::NotFound(_)) if process.is_alive() => {
                log::debug!(
                    "/proc/{}/net/tcp6 does not exist (IPv6 disabled); using the IPv4 table only",
                    process.pid
                );
                Vec::new()
            }
            Err(err) => {
                return Err(Failure::classify(err, "the TCP table (net/tcp6)", || {
                    process.is_alive()
                }));
            }
        };

        let mut by_inode = HashMap::with_capacity(wanted.len());
        let mut listeners = Listeners::default();
        for entry in v4.into_iter().chain(v6) {
            if entry.state == TcpState::Listen {
                listeners.add(entry.local_address);
            }
            // Inode 0 (TIME_WAIT, request sockets) never matches an fd, and `wanted` has no 0.
            if wanted.contains(&entry.inode) {
                by_inode.insert(entry.inode, entry);
            }
        }
        Ok(Self {
            by_inode,
            listeners,
        })
    }

    fn resolve(&self, pid: u32, fd: i32, inode: u64) -> Result<SocketInfo, LookupError> {
        let entry = self
            .by_inode
            .get(&inode)
            .ok_or(LookupError::NotInTcpTables { pid, fd, inode })?;
        Ok(SocketInfo {
            local: entry.local_address,
            remote: entry.remote_address,
            role: role_of(
                entry.local_address,
                entry.remote_address,
                entry.state == TcpState::Listen,
                &self.listeners,
            ),
            inode,
        })
    }
}

/// Local addresses that LISTEN sockets in one network namespace accept connections on.
#[derive(Default)]
struct Listeners {
    /// Port -> listening IPs, canonical (IPv4-mapped folded to IPv4) so that v4 and v6 tables
    /// compare equal.
    by_port: HashMap<u16, Vec<IpAddr>>,
}

impl Listeners {
    fn add(&mut self, addr: SocketAddr) {
        self.by_port
            .entry(addr.port())
            .or_default()
            .push(addr.ip().to_canonical());
    }

    /// Whether a connection with this local address could have been accepted by a listener.
    ///
    /// The address matters, not just the port: a listener bound to one address never accepts
    /// connections to another. A wildcard listener counts for any local address on its port:
    /// `[::]` also accepts IPv4 unless `IPV6_V6ONLY` is set (the tables don't say), and the kernel
    /// does not hand a port held by a listener to a connecting client.
    fn accepts(&self, local: SocketAddr) -> bool {
        let ip = local.ip().to_canonical();
        self.by_port.get(&local.port()).is_some_and(|ips| {
            ips.iter()
                .any(|listener| listener.is_unspecified() || *listener == ip)
        })
    }
}

/// The role rule: listening or accepted from a listener is a server, anything else with a peer
/// is a client. A listener that has since been closed makes its accepted sockets look like
/// clients; this is a hint, not a fact.
fn role_of(
    local: SocketAddr,
    remote: SocketAddr,
    listening: bool,
    listeners: &Listeners,
) -> RoleHint {
    if listening || listeners.accepts(local) {
        RoleHint::Server
    } else if remote.port() == 0 {
        RoleHint::Unknown
    } else {
        RoleHint::Client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn me() -> u32 {
        std::process::id()
    }

    fn fd_of(socket: &impl AsRawFd) -> i32 {
        socket.as_raw_fd()
    }

    /// A listener, a client connected to it and the accepted server end.
    struct Connection {
        listener: TcpListener,
        client: TcpStream,
        accepted: TcpStream,
    }

    impl Connection {
        fn new(listen_on: SocketAddr, connect_to_ip: IpAddr) -> std::io::Result<Self> {
            let listener = TcpListener::bind(listen_on)?;
            let port = listener.local_addr()?.port();
            let client = TcpStream::connect(SocketAddr::new(connect_to_ip, port))?;
            let (accepted, _) = listener.accept()?;
            Ok(Self {
                listener,
                client,
                accepted,
            })
        }
    }

    /// Checks both ends of `conn` against what the sockets themselves report.
    fn check_connection(conn: &Connection) {
        let client_addr = conn.client.local_addr().expect("client local addr");
        let server_addr = conn.accepted.local_addr().expect("accepted local addr");

        let client = lookup(me(), fd_of(&conn.client)).expect("client lookup");
        assert_eq!(client.local, client_addr);
        assert_eq!(client.remote, conn.client.peer_addr().expect("client peer"));
        assert_eq!(client.role, RoleHint::Client);
        assert_ne!(client.inode, 0);

        let server = lookup(me(), fd_of(&conn.accepted)).expect("accepted lookup");
        assert_eq!(server.local, server_addr);
        assert_eq!(
            server.remote,
            conn.accepted.peer_addr().expect("accepted peer")
        );
        assert_eq!(server.role, RoleHint::Server);
        assert_ne!(server.inode, client.inode);

        let listening = lookup(me(), fd_of(&conn.listener)).expect("listener lookup");
        assert_eq!(
            listening.local,
            conn.listener.local_addr().expect("listener addr")
        );
        assert_eq!(listening.remote.port(), 0);
        assert!(listening.remote.ip().is_unspecified());
        assert_eq!(listening.role, RoleHint::Server);
    }

    #[test]
    fn ipv4_client_and_server() {
        let conn = Connection::new((Ipv4Addr::LOCALHOST, 0).into(), Ipv4Addr::LOCALHOST.into())
            .expect("IPv4 loopback connection");
        let listener_addr = conn.listener.local_addr().expect("listener addr");
        let client = lookup(me(), fd_of(&conn.client)).expect("client lookup");
        assert_eq!(client.remote, listener_addr);
        let server = lookup(me(), fd_of(&conn.accepted)).expect("accepted lookup");
        assert_eq!(server.local, listener_addr);
        assert_eq!(
            server.remote,
            conn.client.local_addr().expect("client addr")
        );
        check_connection(&conn);
    }

    #[test]
    fn ipv6_client_and_server() {
        let conn =
            match Connection::new((Ipv6Addr::LOCALHOST, 0).into(), Ipv6Addr::LOCALHOST.into()) {
                Ok(conn) => conn,
                Err(err) => {
                    eprintln!("skipping: no IPv6 loopback here ({err})");
                    return;
                }
            };
        let listener_addr = conn.listener.local_addr().expect("listener addr");
        assert!(listener_addr.is_ipv6());
        let client = lookup(me(), fd_of(&conn.client)).expect("client lookup");
        assert_eq!(client.remote, listener_addr);
        let server = lookup(me(), fd_of(&conn.accepted)).expect("accepted lookup");
        assert_eq!(server.local, listener_addr);
        check_connection(&conn);
    }

    /// An IPv4 client of a dual-stack `[::]` listener: the accepted socket is an IPv6 socket in
    /// `tcp6` with IPv4-mapped addresses, which are returned unconverted.
    #[test]
    fn ipv4_mapped_addresses_are_kept() {
        let conn = match Connection::new(
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            Ipv4Addr::LOCALHOST.into(),
        ) {
            Ok(conn) => conn,
            Err(err) => {
                eprintln!("skipping: no dual-stack IPv6 here ({err})");
                return;
            }
        };
        let port = conn.listener.local_addr().expect("listener addr").port();
        let server = lookup(me(), fd_of(&conn.accepted)).expect("accepted lookup");
        let mapped_loopback = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
        assert_eq!(server.local, SocketAddr::new(mapped_loopback.into(), port));
        assert!(server.remote.is_ipv6());
        assert_eq!(server.remote.ip(), IpAddr::V6(mapped_loopback));

        let client = lookup(me(), fd_of(&conn.client)).expect("client lookup");
        assert_eq!(
            client.remote,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
        );
        check_connection(&conn);
    }

    #[test]
    fn regular_file_is_not_a_socket() {
        let exe = std::env::current_exe().expect("current exe");
        let file = File::open(&exe).expect("open own executable");
        let err = lookup(me(), fd_of(&file)).expect_err("a file is not a socket");
        match &err {
            LookupError::NotASocket { pid, fd, target } => {
                assert_eq!((*pid, *fd), (me(), fd_of(&file)));
                assert_eq!(target, &exe.display().to_string());
            }
            other => panic!("expected NotASocket, got {other:?}"),
        }
        assert!(err.to_string().contains("not a socket"), "{err}");
    }

    #[test]
    fn udp_and_unix_sockets_are_not_tcp() {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP");
        let (unix, _peer) = UnixStream::pair().expect("unix socket pair");
        for fd in [fd_of(&udp), fd_of(&unix)] {
            let err = lookup(me(), fd).expect_err("not a TCP socket");
            assert!(
                matches!(err, LookupError::NotInTcpTables { fd: f, inode, .. } if f == fd && inode != 0),
                "fd {fd}: {err:?}"
            );
            assert!(err.to_string().contains("not a TCP socket"), "{err}");
        }
    }

    #[test]
    fn closed_or_nonexistent_fd() {
        // Not a closed-then-reused number: tests run in parallel threads of this process, so a
        // just-closed fd may already belong to another test. These can never be open.
        for fd in [-1, i32::MAX] {
            let err = lookup(me(), fd).expect_err("fd is not open");
            assert!(
                matches!(err, LookupError::FdGone { pid, fd: f, .. } if pid == me() && f == fd),
                "fd {fd}: {err:?}"
            );
            assert!(std::error::Error::source(&err).is_some());
            assert_eq!((err.pid(), err.fd()), (me(), fd));
        }
    }

    #[test]
    fn nonexistent_pid() {
        // Pids are always below pid_max; u32::MAX does not even fit a pid_t.
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .expect("read pid_max")
            .trim()
            .parse()
            .expect("parse pid_max");
        for pid in [pid_max, u32::MAX] {
            let err = lookup(pid, 0).expect_err("no such process");
            assert!(
                matches!(err, LookupError::ProcessGone { pid: p, fd: 0, .. } if p == pid),
                "pid {pid}: {err:?}"
            );
            assert!(err.to_string().contains(&pid.to_string()), "{err}");

            let many = lookup_many(pid, &[0, 1]);
            assert_eq!(many.len(), 2);
            for ((fd, result), want_fd) in many.into_iter().zip([0, 1]) {
                assert_eq!(fd, want_fd);
                assert!(matches!(result, Err(LookupError::ProcessGone { fd: f, .. }) if f == fd));
            }
        }
    }

    #[test]
    fn lookup_many_mixed_batch() {
        let v4 = Connection::new((Ipv4Addr::LOCALHOST, 0).into(), Ipv4Addr::LOCALHOST.into())
            .expect("IPv4 loopback connection");
        let v6 = Connection::new((Ipv6Addr::LOCALHOST, 0).into(), Ipv6Addr::LOCALHOST.into()).ok();
        let file = File::open(std::env::current_exe().expect("current exe")).expect("open exe");
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP");
        let (unix, _peer) = UnixStream::pair().expect("unix socket pair");

        let mut fds = vec![
            fd_of(&v4.client),
            fd_of(&v4.accepted),
            fd_of(&file),
            fd_of(&udp),
            fd_of(&unix),
            i32::MAX,
            fd_of(&v4.client), // duplicates are answered, not collapsed
        ];
        if let Some(v6) = &v6 {
            fds.extend([fd_of(&v6.client), fd_of(&v6.accepted)]);
        }

        let results = lookup_many(me(), &fds);
        assert_eq!(
            results.iter().map(|(fd, _)| *fd).collect::<Vec<_>>(),
            fds,
            "one result per fd, in order"
        );
        for (fd, result) in &results {
            let single = lookup(me(), *fd);
            match (result, &single) {
                (Ok(batch), Ok(one)) => assert_eq!(batch, one, "fd {fd}"),
                (Err(batch), Err(one)) => {
                    assert_eq!(batch.to_string(), one.to_string(), "fd {fd}");
                }
                _ => panic!("fd {fd}: batch {result:?} vs single {single:?}"),
            }
        }

        let role = |i: usize| results[i].1.as_ref().map(|info| info.role).ok();
        assert_eq!(role(0), Some(RoleHint::Client));
        assert_eq!(role(1), Some(RoleHint::Server));
        assert!(matches!(results[2].1, Err(LookupError::NotASocket { .. })));
        assert!(matches!(
            results[3].1,
            Err(LookupError::NotInTcpTables { .. })
        ));
        assert!(matches!(
            results[4].1,
            Err(LookupError::NotInTcpTables { .. })
        ));
        assert!(matches!(results[5].1, Err(LookupError::FdGone { .. })));
        assert_eq!(role(6), Some(RoleHint::Client));
        if v6.is_some() {
            assert_eq!(role(7), Some(RoleHint::Client));
            assert_eq!(role(8), Some(RoleHint::Server));
        }
    }

    #[test]
    fn lookup_many_without_sockets_or_fds() {
        assert!(lookup_many(me(), &[]).is_empty());
        let results = lookup_many(me(), &[i32::MAX]);
        assert!(matches!(
            results.as_slice(),
            [(fd, Err(LookupError::FdGone { .. }))] if *fd == i32::MAX
        ));
    }

    #[test]
    fn role_rule() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("test address");
        let mut listeners = Listeners::default();
        listeners.add(addr("10.0.0.1:80"));
        listeners.add(addr("[::]:443"));
        listeners.add(addr("0.0.0.0:8080"));
        let peer = addr("10.0.0.9:40000");

        let role = |local: &str| role_of(addr(local), peer, false, &listeners);
        assert_eq!(role("10.0.0.1:80"), RoleHint::Server);
        // Same port, but that listener is bound to another address.
        assert_eq!(role("10.0.0.2:80"), RoleHint::Client);
        // Wildcards of either family cover IPv4, IPv6 and IPv4-mapped locals.
        assert_eq!(role("10.0.0.2:443"), RoleHint::Server);
        assert_eq!(role("[fd00::1]:8080"), RoleHint::Server);
        assert_eq!(role("[::ffff:10.0.0.1]:80"), RoleHint::Server);
        assert_eq!(role("10.0.0.1:40001"), RoleHint::Client);

        let nobody = addr("0.0.0.0:0");
        assert_eq!(
            role_of(addr("10.0.0.1:9"), nobody, true, &listeners),
            RoleHint::Server
        );
        assert_eq!(
            role_of(addr("10.0.0.1:9"), nobody, false, &listeners),
            RoleHint::Unknown
        );
    }

    #[test]
    fn errors_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<LookupError>();
        assert_send_sync::<SocketInfo>();
    }
}
