//! Connection table: connection id -> who (process, fd), which side (role) and where (local and
//! remote address). Tuples come from the kernel when it saw the connection start; for older
//! connections the agent asks /proc (see `procfs_sockets`).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, OnceLock},
};

use log::debug;
use tracer_common::{ConnEvent, Tuple, conn_flags, role};

use crate::{
    procfs_sockets::{self, RoleHint},
    resource::ProcessInfo,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Unknown => "unknown",
        }
    }
}

/// Where a connection's addresses came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TupleSource {
    Kernel,
    Procfs,
    Unknown,
}

impl TupleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TupleSource::Kernel => "kernel",
            TupleSource::Procfs => "procfs",
            TupleSource::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Connection {
    pub id: u64,
    pub pid: u32,
    pub fd: i32,
    pub role: Role,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub tuple_source: TupleSource,
    /// The connection carries TLS (`conn_flags::TLS`): its data is the plaintext the OpenSSL
    /// uprobes captured, so spans say `https` (the ciphertext never reaches the agent).
    pub tls: bool,
    pub process: Arc<Process>,
    /// Addresses as text, formatted once: every span of the connection shares them.
    pub text: AddressText,
}

#[derive(Clone, Debug, Default)]
pub struct AddressText {
    pub local_ip: Option<Arc<str>>,
    pub remote_ip: Option<Arc<str>>,
    /// `ip:port` of the remote end.
    pub remote: Option<Arc<str>>,
}

impl Connection {
    fn format_addresses(&mut self) {
        self.text = AddressText {
            local_ip: self.local.map(|a| a.ip().to_string().into()),
            remote_ip: self.remote.map(|a| a.ip().to_string().into()),
            remote: self.remote.map(|a| a.to_string().into()),
        };
    }
}

#[derive(Debug)]
pub struct Process {
    /// Executable file name, e.g. `python3.11`.
    pub exe: String,
    pub info: ProcessInfo,
    /// Built on the first span of this process.
    pub resource: OnceLock<Arc<opentelemetry_sdk::Resource>>,
}

impl Process {
    /// Reads /proc/PID; `comm` from the kernel names a process that already exited.
    fn read(pid: u32, comm: Option<&[u8; 16]>) -> Self {
        let mut info = ProcessInfo::read(pid);
        if info.exe_path.is_empty()
            && let Some(comm) = comm
        {
            let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
            if end > 0 {
                info.exe_name = String::from_utf8_lossy(&comm[..end]).into_owned();
            }
        }
        Self {
            exe: info.exe_name.clone(),
            info,
            resource: OnceLock::new(),
        }
    }
}

#[derive(Default)]
pub struct ConnTable {
    /// Shared with the calls in flight on them (connections do not change once known).
    conns: foldhash::HashMap<u64, Arc<Connection>>,
    processes: foldhash::HashMap<u32, Arc<Process>>,
    /// TCP sockets of the traced processes when the probes attached, by (pid, fd): the kernel
    /// never saw these connections start, and /proc may no longer show them by the time their
    /// first event is processed (a short exchange, then close).
    preexisting: HashMap<(u32, i32), procfs_sockets::SocketInfo>,
    /// The kernel's ephemeral port range, for guessing roles when nothing else tells.
    ephemeral: Option<(u16, u16)>,
    /// Connections whose tuple neither the kernel nor /proc could tell.
    pub unresolved: u64,
}

fn to_addr(family: u16, addr: [u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match family {
        2 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        10 => {
            let v6 = Ipv6Addr::from(addr);
            // Show IPv4 clients of dual-stack sockets as IPv4, as people expect.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

pub fn tuple_addrs(tuple: &Tuple) -> Option<(SocketAddr, SocketAddr)> {
    Some((
        to_addr(tuple.family, tuple.saddr, tuple.sport)?,
        to_addr(tuple.family, tuple.daddr, tuple.dport)?,
    ))
}

impl ConnTable {
    fn process(&mut self, pid: u32, comm: Option<&[u8; 16]>) -> Arc<Process> {
        self.processes
            .entry(pid)
            .or_insert_with(|| Arc::new(Process::read(pid, comm)))
            .clone()
    }

    /// Records a connection the kernel announced.
    pub fn open(&mut self, event: &ConnEvent) -> &Arc<Connection> {
        let header = &event.header;
        let role = match event.role {
            role::CLIENT => Role::Client,
            role::SERVER => Role::Server,
            _ => Role::Unknown,
        };
        let mut conn = Connection {
            id: header.conn_id,
            pid: header.pid,
            fd: header.fd,
            role,
            local: None,
            remote: None,
            tuple_source: TupleSource::Unknown,
            tls: event.flags & conn_flags::TLS != 0,
            process: self.process(header.pid, Some(&event.comm)),
            text: AddressText::default(),
        };
        if event.flags & conn_flags::TUPLE_KNOWN != 0
            && let Some((local, remote)) = tuple_addrs(&event.tuple)
        {
            conn.local = Some(local);
            conn.remote = Some(remote);
            conn.tuple_source = TupleSource::Kernel;
        }
        if conn.local.is_none() || conn.role == Role::Unknown {
            self.resolve(&mut conn);
        }
        conn.format_addresses();
        self.conns.insert(conn.id, Arc::new(conn));
        &self.conns[&header.conn_id]
    }

    /// The connection for data whose open event was lost: resolved from /proc.
    pub fn get_or_resolve(&mut self, conn_id: u64, pid: u32, fd: i32) -> &Arc<Connection> {
        if !self.conns.contains_key(&conn_id) {
            let mut conn = Connection {
                id: conn_id,
                pid,
                fd,
                role: Role::Unknown,
                local: None,
                remote: None,
                tuple_source: TupleSource::Unknown,
                tls: false,
                process: self.process(pid, None),
                text: AddressText::default(),
            };
            self.resolve(&mut conn);
            conn.format_addresses();
            self.conns.insert(conn_id, Arc::new(conn));
        }
        &self.conns[&conn_id]
    }

    /// Records the TCP sockets that `pids` hold now (call right after the probes attach).
    pub fn snapshot(&mut self, pids: &[u32]) {
        for &pid in pids {
            let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let fds: Vec<i32> = entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            for (fd, info) in procfs_sockets::lookup_many(pid, &fds) {
                if let Ok(info) = info {
                    self.preexisting.insert((pid, fd), info);
                }
            }
        }
        self.ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
                Some((it.next()??, it.next()??))
            });
        debug!(
            "{} TCP sockets existed before the probes attached",
            self.preexisting.len()
        );
    }

    fn resolve(&mut self, conn: &mut Connection) {
        let found = match self.preexisting.remove(&(conn.pid, conn.fd)) {
            Some(info) => Ok(info),
            None => procfs_sockets::lookup(conn.pid, conn.fd),
        };
        if found.is_err()
            && let (Some(local), Some(remote), Some((low, high))) =
                (conn.local, conn.remote, self.ephemeral)
            && conn.role == Role::Unknown
        {
            // Last resort: the side on an ephemeral port is the client.
            let ephemeral = |port: u16| (low..=high).contains(&port);
            conn.role = match (ephemeral(local.port()), ephemeral(remote.port())) {
                (false, true) => Role::Server,
                (true, false) => Role::Client,
                _ => Role::Unknown,
            };
        }
        match found {
            Ok(info) => {
                if conn.local.is_none() {
                    conn.local = Some(unmap(info.local));
                    conn.remote = Some(unmap(info.remote));
                    conn.tuple_source = TupleSource::Procfs;
                }
                if conn.role == Role::Unknown {
                    conn.role = match info.role {
                        RoleHint::Client => Role::Client,
                        RoleHint::Server => Role::Server,
                        RoleHint::Unknown => Role::Unknown,
                    };
                }
            }
            Err(err) => {
                self.unresolved += 1;
                debug!("connection {} of pid {}: {err}", conn.id, conn.pid);
            }
        }
    }

    pub fn close(&mut self, conn_id: u64) -> Option<Arc<Connection>> {
        self.conns.remove(&conn_id)
    }

    pub fn get(&self, conn_id: u64) -> Option<&Arc<Connection>> {
        self.conns.get(&conn_id)
    }

    /// Processes with connections that no longer exist: their EXIT event was lost (ring buffer
    /// full), so the sweep must release them.
    pub fn vanished_processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.conns.values().map(|c| c.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        pids
    }

    /// Connections of one process.
    pub fn ids_of(&self, pid: u32) -> Vec<u64> {
        self.conns
            .values()
            .filter(|c| c.pid == pid)
            .map(|c| c.id)
            .collect()
    }

    /// Forgets an exited process and its connections.
    pub fn exit(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.preexisting.retain(|(p, _), _| *p != pid);
        self.conns.retain(|_, c| c.pid != pid);
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn processes(&self) -> usize {
        self.processes.len()
    }
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_finds_processes_that_exited_unseen() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let mut table = ConnTable::default();
        for (conn_id, pid) in [(1, gone), (2, std::process::id())] {
            table.open(&ConnEvent {
                header: tracer_common::EventHeader {
                    kind: tracer_common::kind::OPEN,
                    pid,
                    fd: 3,
                    conn_id,
                    ..Default::default()
                },
                role: role::CLIENT,
                comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
                ..Default::default()
            });
        }
        // Gone before /proc could be read: named from the kernel's comm.
        assert_eq!(table.get(1).unwrap().process.exe, "curl");
        assert_eq!(table.vanished_processes(), vec![gone]);
        table.exit(gone);
        assert_eq!(table.len(), 1);
        assert!(table.vanished_processes().is_empty());
    }

    #[test]
    fn tuple_to_addresses() {
        let mut tuple = Tuple {
            family: 2,
            sport: 8080,
            dport: 51000,
            ..Default::default()
        };
        tuple.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        tuple.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let (local, remote) = tuple_addrs(&tuple).unwrap();
        assert_eq!(local.to_string(), "127.0.0.1:8080");
        assert_eq!(remote.to_string(), "10.1.2.3:51000");

        let v6 = Tuple {
            family: 10,
            sport: 1,
            dport: 2,
            saddr: Ipv6Addr::LOCALHOST.octets(),
            daddr: Ipv4Addr::new(1, 2, 3, 4).to_ipv6_mapped().octets(),
            ..Default::default()
        };
        let (local, remote) = tuple_addrs(&v6).unwrap();
        assert_eq!(local.to_string(), "[::1]:1");
        assert_eq!(remote.to_string(), "1.2.3.4:2");
        assert!(
            tuple_addrs(&Tuple {
                family: 1,
                ..Default::default()
            })
            .is_none()
        );
    }
}
