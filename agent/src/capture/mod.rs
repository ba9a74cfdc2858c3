//! Capture stage: loads the kernel probes, attaches them to their tracepoints, targets the
//! requested processes, and turns ring buffer records into typed events. Owns the kernel side
//! of the agent; nothing else touches aya.
pub mod assemble;
pub mod btf;
pub mod decode;
pub mod privileges;

use std::{
    fs, io,
    num::NonZeroU32,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        trace_point::TracePointLinkId,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use log::{debug, info, warn};
use tokio::io::unix::AsyncFd;
use tracer_common::{SockLayout, TRACED_PID_LIMIT, TracedSet, counter, traced};

/// The probes, built by build.rs from ebpf-probes/kernel.
static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-probes"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// What to trace and how much to capture.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub trace_all: bool,
    pub pids: Vec<u32>,
    /// Which process events the selection needs from the probes.
    pub watch: Watch,
    pub capture_limit: u32,
    pub ring_buffer_bytes: u32,
    /// Entries of the kernel's connection map (`CONNS`).
    pub max_connections: u32,
    /// Attach the do-nothing `floor` program in place of every real one (benchmarks).
    pub floor: bool,
}

/// Process events the probes report for the selection (`select`): off unless asked for, so
/// that execs and listens cost nothing beyond their tracepoint otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// Report every exec (EXEC events) and trace exec'd processes until the agent decides.
    pub exec: bool,
    /// Trace processes that listen on these TCP ports (LISTEN events).
    pub ports: Vec<u16>,
    /// Some processes are excluded: with --all the probes must read their state.
    pub exclusions: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    NotPermitted(#[from] privileges::MissingCapabilities),
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({source}); mount it with \
         `mount -t tracefs tracefs {TRACEFS}` and try again"
    )]
    Tracefs {
        #[source]
        source: io::Error,
    },
    #[error("no process with pid {pid} (is it still running?)")]
    NoSuchProcess { pid: u32 },
    #[error("--pid {pid} is the agent itself")]
    SelfTarget { pid: u32 },
    #[error("loading the eBPF probes into the kernel failed: {hint}")]
    Load {
        hint: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the probe object has no {what} named {name}; the build is inconsistent")]
    Missing { what: &'static str, name: String },
    #[error("attaching {program} to tracepoint {category}:{name} failed")]
    Attach {
        program: String,
        category: &'static str,
        name: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("setting up the probe map {name} failed")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("watching the ring buffer failed")]
    Poll(#[source] io::Error),
    #[error("mapping the traced-process map into the agent failed")]
    MapTraced(#[source] io::Error),
}

/// Loaded and attached probes. Dropping it detaches everything.
pub struct Probes {
    /// Keeps programs and links alive.
    ebpf: Ebpf,
    /// Every attachment, by program name, for `detach`.
    links: Vec<(String, TracePointLinkId)>,
    /// The TLS uprobes (see `crate::tls`), by program name and the process they fire in
    /// (None: host-wide), for `detach` and `detach_ssl`.
    uprobe_links: Vec<(&'static str, Option<NonZeroU32>, UProbeLinkId)>,
    /// Whether the TLS uprobe programs are loaded into the kernel (on first use).
    uprobes_loaded: bool,
    /// Kernel log lines; must be kept alive (dropping it breaks later loads) and flushed.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub events: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    /// The kernel's traced set, mapped into the agent.
    pub traced: TracedPids,
    trace_all: bool,
    pub attached: usize,
    /// Processes traced from the start: the --pid targets and their children, or with --all
    /// every process but the agent.
    pub targets: Vec<u32>,
}

/// Kernel-side counters, summed over CPUs. Indexes: `tracer_common::counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; counter::COUNT as usize]);

impl KernelCounters {
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }
}

/// Checks what the kernel and our privileges allow, fixing what we can (tracefs).
pub fn preflight() -> Result<(), CaptureError> {
    privileges::check()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        warn!("kernel BTF (/sys/kernel/btf/vmlinux) is missing; loading may fail on this kernel");
    }
    if !Path::new(TRACEFS).join("events").exists()
        && !Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        mount_tracefs().map_err(|source| CaptureError::Tracefs { source })?;
        info!("mounted tracefs at {TRACEFS}");
    }
    Ok(())
}

fn mount_tracefs() -> io::Result<()> {
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The tracepoint category of each of our programs, which are named after their tracepoint.
fn category(program: &str) -> Option<&'static str> {
    if program.starts_with("sock_") || program == "inet_sock_set_state" {
        Some("sock")
    } else if program.starts_with("tcp_") {
        Some("tcp")
    } else if program.starts_with("sched_") {
        Some("sched")
    } else {
        // `floor` and anything else that is not named after a tracepoint.
        None
    }
}

/// Loads the probes, fills the traced-process map and attaches every program.
pub fn load(config: &ProbeConfig) -> Result<Probes, CaptureError> {
    let agent_tgid = std::process::id();
    let capture_all = u32::from(config.trace_all);
    let watch_exec = u32::from(config.watch.exec);
    let watch_listen = u32::from(!config.watch.ports.is_empty());
    let exclusions = u32::from(config.watch.exclusions);
    let mut targets = Vec::new();
    for &pid in &config.pids {
        if pid == agent_tgid {
            return Err(CaptureError::SelfTarget { pid });
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(CaptureError::NoSuchProcess { pid });
        }
        targets.push(pid);
        targets.extend(descendants(pid));
    }
    targets.sort_unstable();
    targets.dedup();

    // Without the kernel's BTF the probes cannot read a socket's tuple themselves, and
    // tcp_rcv_space_adjust stands in (see `btf`).
    let sock_layout = match btf::sock_layout_in_child() {
        Ok(layout) => layout,
        Err(err) => {
            info!(
                "socket layout unknown ({err}); tuples of connections older than the agent \
                 come from tcp:tcp_rcv_space_adjust, which costs every TCP receive a little"
            );
            SockLayout::default()
        }
    };
    let mut ebpf = EbpfLoader::new()
        .override_global("SOCK_LAYOUT", &sock_layout, true)
        .override_global("TRACE_ALL", &capture_all, true)
        .override_global("AGENT_TGID", &agent_tgid, true)
        .override_global("WATCH_EXEC", &watch_exec, true)
        .override_global("WATCH_LISTEN", &watch_listen, true)
        .override_global("EXCLUSIONS", &exclusions, true)
        .override_global("CAPTURE_LIMIT", &config.capture_limit, true)
        // A quarter full wakes the agent; below that it drains on its own timer.
        .override_global(
            "WAKEUP_BYTES",
            &u64::from(config.ring_buffer_bytes / 4),
            true,
        )
        .map_max_entries("EVENTS", config.ring_buffer_bytes)
        .map_max_entries("CONNS", config.max_connections)
        .load(PROBES)
        .map_err(|source| CaptureError::Load {
            hint: load_hint(&source),
            source: Box::new(source),
        })?;

    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(logger),
        Err(err) => {
            debug!("kernel log forwarding off: {err}");
            None
        }
    };

    let traced = match ebpf.take_map("TRACED") {
        Some(Map::Array(data)) => TracedPids::map(data).map_err(CaptureError::MapTraced)?,
        _ => {
            return Err(CaptureError::Missing {
                what: "array map",
                name: "TRACED".to_owned(),
            });
        }
    };
    for &pid in &targets {
        traced.set(pid, traced::TRACED);
    }
    // The agent is never traced, whatever is selected.
    traced.set(agent_tgid, traced::EXCLUDED);
    let mut ports: Array<MapData, u8> = take_map(&mut ebpf, "PORTS")?;
    for &port in &config.watch.ports {
        ports
            .set(u32::from(port), 1, 0)
            .map_err(|source| CaptureError::Map {
                name: "PORTS",
                source,
            })?;
    }
    let events: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;
    let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, "COUNTERS")?;

    let mut names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_owned()).collect();
    names.sort();
    let mut attached = 0;
    let mut links = Vec::new();
    let mut floor_loaded = false;
    for name in names {
        let Some(category) = category(&name) else {
            continue;
        };
        if name == "tcp_rcv_space_adjust" && sock_layout.known != 0 {
            continue;
        }
        // In floor mode one empty program stands in for each real one, on its tracepoint.
        let program_name = if config.floor { "floor" } else { name.as_str() };
        let program: &mut TracePoint = ebpf
            .program_mut(program_name)
            .ok_or_else(|| CaptureError::Missing {
                what: "program",
                name: program_name.to_owned(),
            })?
            .try_into()
            .map_err(|source| attach_error(&name, category, source))?;
        if !(config.floor && floor_loaded) {
            program
                .load()
                .map_err(|source| attach_error(&name, category, source))?;
            floor_loaded = config.floor;
        }
        let link = program
            .attach(category, &name)
            .map_err(|source| attach_error(&name, category, source))?;
        links.push((program_name.to_owned(), link));
        attached += 1;
    }
    info!(
        "{attached} probes attached; tracing {}",
        if config.trace_all {
            "every process".to_owned()
        } else if config.pids.is_empty() {
            "what the selection picks".to_owned()
        } else {
            format!("{} process(es): {:?}", targets.len(), targets)
        }
    );
    if config.trace_all {
        targets = procfs::process::all_processes()
            .map(|all| {
                all.filter_map(|p| p.ok().map(|p| p.pid as u32))
                    .filter(|&pid| pid != agent_tgid)
                    .collect()
            })
            .unwrap_or_default();
    }
    Ok(Probes {
        traced,
        trace_all: config.trace_all,
        targets,
        ebpf,
        links,
        uprobe_links: Vec::new(),
        uprobes_loaded: false,
        logger,
        events: register(events).map_err(CaptureError::Poll)?,
        counters,
        attached,
    })
}

/// Registers an fd-owning value with the reactor, for readability only.
fn register<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: the ring buffer owns its map fd and keeps it open and unchanged until it is
    // dropped, which happens with the AsyncFd.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|err| err.into_parts().1)
}

fn attach_error(
    program: &str,
    category: &'static str,
    source: aya::programs::ProgramError,
) -> CaptureError {
    CaptureError::Attach {
        program: program.to_owned(),
        category,
        name: program.to_owned(),
        source: Box::new(source),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| CaptureError::Missing {
        what: "map",
        name: name.to_owned(),
    })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

fn load_hint(err: &aya::EbpfError) -> String {
    let text = format!("{err:?}");
    if text.contains("EPERM") || text.contains("Operation not permitted") {
        // The capabilities were checked before loading: something else refuses.
        "permission denied although the agent has the capabilities it needs: a seccomp profile \
         or a security module (SELinux, AppArmor) refuses bpf() (README, \"Deploying\")"
            .to_owned()
    } else if text.contains("verifier") {
        "the kernel verifier rejected a program (run with --log-level debug for its log)".to_owned()
    } else {
        "is BPF enabled in this kernel (CONFIG_BPF_SYSCALL) and the agent run as root?".to_owned()
    }
}

/// The kernel's traced set (`TRACED`, one [`traced`] state byte per pid), mmapped into the
/// agent. Bytes are read and written with single-byte atomics on the shared pages, so a change
/// by the agent never overwrites a neighbour's byte or the probes' concurrent writes, and
/// [`TracedPids::replace`] refuses when the probes changed the byte first. Cheap to clone.
#[derive(Clone)]
pub struct TracedPids(Arc<Mapping>);

struct Mapping {
    base: NonNull<AtomicU8>,
    len: usize,
    /// Keeps the map's fd open as long as the mapping (the mapping alone would keep the map).
    _map: MapData,
}

// SAFETY: the mapping is shared memory accessed only through atomics; it stays valid until
// Drop unmaps it, which happens when the last clone goes.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base and len are exactly what mmap returned; nothing refers to it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl TracedPids {
    fn map(map: MapData) -> io::Result<Self> {
        let len = size_of::<TracedSet>();
        // SAFETY: a shared read-write mapping of the map's value area, which the kernel allows
        // for BPF_F_MMAPABLE arrays; the length is the value size (a whole number of pages).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<AtomicU8>()).ok_or_else(|| io::Error::other("null"))?;
        Ok(Self(Arc::new(Mapping {
            base,
            len,
            _map: map,
        })))
    }

    fn byte(&self, pid: u32) -> Option<&AtomicU8> {
        (pid < TRACED_PID_LIMIT).then(|| {
            // SAFETY: pid < TRACED_PID_LIMIT == len, so the byte is inside the live mapping;
            // AtomicU8 has the size and alignment of u8.
            unsafe { &*self.0.base.as_ptr().add(pid as usize) }
        })
    }

    /// The state of `pid` (a [`traced`] value).
    pub fn get(&self, pid: u32) -> u8 {
        self.byte(pid)
            .map_or(traced::NONE, |b| b.load(Ordering::Relaxed))
    }

    pub fn set(&self, pid: u32, state: u8) {
        if let Some(byte) = self.byte(pid) {
            byte.store(state, Ordering::Relaxed);
        }
    }

    /// Sets `pid` to `new` if it is still `current`; otherwise returns what it is.
    pub fn replace(&self, pid: u32, current: u8, new: u8) -> Result<(), u8> {
        match self.byte(pid) {
            Some(byte) => byte
                .compare_exchange(current, new, Ordering::Relaxed, Ordering::Relaxed)
                .map(drop),
            None => Err(traced::NONE),
        }
    }

    /// Every pid whose state (never NONE) satisfies `wanted`. Scans the set up to the kernel's
    /// pid_max, eight bytes at a time, skipping empty words (most of it).
    pub fn pids_where(&self, wanted: impl Fn(u8) -> bool) -> Vec<u32> {
        let pid_max = fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(self.0.len);
        let words = pid_max.min(self.0.len).div_ceil(8);
        // SAFETY: the mapping is page-aligned and len is a multiple of 8, so it is `words`
        // aligned u64s; AtomicU64 has the layout of u64.
        let base = self.0.base.as_ptr().cast::<std::sync::atomic::AtomicU64>();
        let mut found = Vec::new();
        for word in 0..words {
            // SAFETY: word < words, inside the mapping (see above).
            if unsafe { &*base.add(word) }.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let first = (word * 8) as u32;
            found.extend((first..first + 8).filter(|&pid| {
                let state = self.get(pid);
                state != traced::NONE && wanted(state)
            }));
        }
        found
    }
}

/// Every current descendant of `pid` (workers forked before the agent started).
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = all
        .filter_map(|p| p.ok()?.stat().ok())
        .map(|stat| (stat.pid as u32, stat.ppid as u32))
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, ppid)| ppid == parent)
                .map(|&(child, _)| child),
        );
        i += 1;
    }
    found.remove(0);
    found
}

impl Probes {
    /// Current kernel counters summed over CPUs.
    pub fn counters(&self) -> KernelCounters {
        let mut totals = KernelCounters::default();
        for (index, total) in totals.0.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(index as u32), 0) {
                *total = values.iter().sum();
            }
        }
        totals
    }

    /// Live processes the kernel traces now (their state in the traced set, or every one but
    /// the agent and the excluded with --all). Lists /proc, so call it seldom.
    pub fn traced_count(&self) -> usize {
        let Ok(all) = procfs::process::all_processes() else {
            return 0;
        };
        let agent = std::process::id();
        all.filter_map(|p| p.ok().map(|p| p.pid as u32))
            .filter(|&pid| pid != agent)
            .filter(|&pid| match self.traced.get(pid) {
                traced::TRACED => true,
                traced::NONE => self.trace_all,
                state => traced::is_pending(state),
            })
            .count()
    }

    /// Detaches every program, in parallel: each detach waits for a kernel RCU grace period
    /// (about 70 ms here), and one after another 35 of them took 2.5 s. Concurrent waiters
    /// share grace periods. The maps stay readable, so the ring buffer can still be drained.
    pub fn detach(&mut self) {
        let mut taken = Vec::new();
        for (name, link) in self.links.drain(..) {
            let program: Option<&mut TracePoint> =
                self.ebpf.program_mut(&name).and_then(|p| p.try_into().ok());
            match program.map(|p| p.take_link(link)) {
                Some(Ok(link)) => taken.push(link),
                Some(Err(err)) => warn!("detaching {name}: {err}"),
                None => warn!("detaching {name}: program not found"),
            }
        }
        let mut taken_uprobes = Vec::new();
        for (name, _, link) in std::mem::take(&mut self.uprobe_links) {
            if let Some(link) = self.take_uprobe_link(name, link) {
                taken_uprobes.push(link);
            }
        }
        std::thread::scope(|scope| {
            for link in taken {
                scope.spawn(move || drop(link));
            }
            for link in taken_uprobes {
                scope.spawn(move || drop(link));
            }
        });
    }

    fn take_uprobe_link(&mut self, name: &str, link: UProbeLinkId) -> Option<UProbeLink> {
        let program: Option<&mut UProbe> =
            self.ebpf.program_mut(name).and_then(|p| p.try_into().ok());
        match program.map(|p| p.take_link(link)) {
            Some(Ok(link)) => Some(link),
            Some(Err(err)) => {
                warn!("detaching {name}: {err}");
                None
            }
            None => {
                warn!("detaching {name}: program not found");
                None
            }
        }
    }

    fn uprobe(&mut self, name: &str) -> Result<&mut UProbe, String> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the probe object has no program {name}"))?
            .try_into()
            .map_err(|err| format!("{name}: {err}"))
    }

    /// Forwards pending kernel log lines into the agent's log.
    pub fn poll_logger(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }
}

impl crate::tls::Attach for Probes {
    /// Uprobes on each function's entry and return. With a pid the kernel plants them in that
    /// process's address space only (all its threads); without, in every process that maps
    /// the file, and the programs keep the traced ones.
    fn attach_ssl(
        &mut self,
        file: &crate::tls::SslFile,
        pid: Option<NonZeroU32>,
    ) -> Result<usize, String> {
        use crate::tls::{FUNCTIONS, RETURN_PROGRAM};
        if !self.uprobes_loaded {
            for name in FUNCTIONS.iter().map(|(_, p)| *p).chain([RETURN_PROGRAM]) {
                self.uprobe(name)?
                    .load()
                    .map_err(|err| format!("loading {name}: {err}"))?;
            }
            self.uprobes_loaded = true;
        }
        let mut attached = 0;
        for &(function, offset) in &file.offsets {
            let Some(&(_, entry)) = FUNCTIONS.iter().find(|(f, _)| *f == function) else {
                continue;
            };
            for program in [entry, RETURN_PROGRAM] {
                let link = self
                    .uprobe(program)?
                    .attach(
                        UProbeAttachLocation::AbsoluteOffset(offset),
                        &file.path,
                        pid.map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess),
                    )
                    .map_err(|err| format!("{program} on {function}: {err}"))?;
                self.uprobe_links.push((program, pid, link));
                attached += 1;
            }
        }
        self.attached += attached;
        Ok(attached)
    }

    /// Detaches on a thread of their own: each detach waits for the kernel's RCU grace
    /// periods (tens of ms), which the event loop must not.
    fn detach_ssl(&mut self, pid: NonZeroU32) -> usize {
        let (mine, others) = std::mem::take(&mut self.uprobe_links)
            .into_iter()
            .partition(|(_, owner, _)| *owner == Some(pid));
        self.uprobe_links = others;
        let mut taken: Vec<UProbeLink> = Vec::new();
        for (name, _, link) in mine {
            taken.extend(self.take_uprobe_link(name, link));
        }
        let n = taken.len();
        self.attached = self.attached.saturating_sub(n);
        if n > 0 {
            let spawned = std::thread::Builder::new()
                .name("uprobe-detach".into())
                .spawn(move || {
                    std::thread::scope(|scope| {
                        for link in taken {
                            scope.spawn(move || drop(link));
                        }
                    })
                });
            if let Err(err) = spawned {
                // The links went with the closure: detached in line.
                warn!("starting a thread to detach the uprobes of pid {pid} failed: {err}");
            }
        }
        n
    }
}
