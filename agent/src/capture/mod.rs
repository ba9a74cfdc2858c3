//! Capture stage: loads the kernel probes, attaches them to their tracepoints, targets the
//! requested processes, and turns ring buffer records into typed events. Owns the kernel side
//! of the agent; nothing else touches aya.
pub mod assemble;
pub mod decode;
pub mod privileges;

use std::{io, os::fd::AsRawFd, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use log::{debug, info, warn};
use tokio::io::unix::AsyncFd;
use tracer_common::{TRACED_PID_LIMIT, TracedSet, counter};

/// The probes, built by build.rs from ebpf-probes/kernel.
static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-probes"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// What to trace and how much to capture.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub trace_all: bool,
    pub pids: Vec<u32>,
    pub capture_limit: u32,
    pub ring_buffer_bytes: u32,
    /// Attach the do-nothing `floor` program in place of every real one (benchmarks).
    pub floor: bool,
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
}

/// Loaded and attached probes. Dropping it detaches everything.
pub struct Probes {
    /// Keeps programs and links alive.
    ebpf: Ebpf,
    /// Every attachment, by program name, for `detach`.
    links: Vec<(String, TracePointLinkId)>,
    /// Kernel log lines; must be kept alive (dropping it breaks later loads) and flushed.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub events: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    /// The --pid processes: what is traced now is them and their descendants.
    roots: Vec<u32>,
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
    if program.starts_with("sys_enter_") || program.starts_with("sys_exit_") {
        Some("syscalls")
    } else if program.starts_with("sock_") || program == "inet_sock_set_state" {
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

    let mut ebpf = EbpfLoader::new()
        .override_global("TRACE_ALL", &capture_all, true)
        .override_global("AGENT_TGID", &agent_tgid, true)
        .override_global("CAPTURE_LIMIT", &config.capture_limit, true)
        // A quarter full wakes the agent; below that it drains on its own timer.
        .override_global(
            "WAKEUP_BYTES",
            &u64::from(config.ring_buffer_bytes / 4),
            true,
        )
        .map_max_entries("EVENTS", config.ring_buffer_bytes)
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

    let mut traced: Array<MapData, TracedSet> = take_map(&mut ebpf, "TRACED")?;
    let mut set = zeroed_traced_set();
    for &pid in targets.iter().filter(|&&pid| pid < TRACED_PID_LIMIT) {
        set.pids[pid as usize] = 1;
    }
    store_traced_set(&mut traced, &set)?;
    let events: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;
    let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, "COUNTERS")?;

    // Exits before syscall entries would leave stale in-flight entries; attach exit programs,
    // sock and sched first, syscall entries last, so each entry finds its exit ready.
    let mut names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_owned()).collect();
    names.sort_by_key(|name| (name.starts_with("sys_enter_"), name.clone()));
    let mut attached = 0;
    let mut links = Vec::new();
    let mut floor_loaded = false;
    for name in names {
        let Some(category) = category(&name) else {
            continue;
        };
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
        roots: config.pids.clone(),
        targets,
        ebpf,
        links,
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

/// Stores the set by reference: by value, its 4 MiB would be copied onto the stack.
fn store_traced_set(
    map: &mut Array<MapData, TracedSet>,
    set: &TracedSet,
) -> Result<(), CaptureError> {
    map.set(0, set, 0).map_err(|source| CaptureError::Map {
        name: "TRACED",
        source,
    })
}

/// An empty traced set, made on the heap: 4 MiB would not fit every thread's stack.
fn zeroed_traced_set() -> Box<TracedSet> {
    let bytes = vec![0u8; size_of::<TracedSet>()].into_boxed_slice();
    // SAFETY: TracedSet is a repr(C) byte array of exactly this length (alignment 1), and
    // zero bytes are a valid value of it.
    unsafe { Box::from_raw(Box::into_raw(bytes).cast::<TracedSet>()) }
}

/// Every current descendant of `pid` (workers forked before the agent started).
fn descendants(pid: u32) -> Vec<u32> {
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

    /// Processes traced now with --pid: the roots still alive and their descendants, which is
    /// what the kernel follows. Reads /proc, so call it seldom.
    pub fn traced_count(&self) -> usize {
        self.roots
            .iter()
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .map(|&pid| 1 + descendants(pid).len())
            .sum()
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
        std::thread::scope(|scope| {
            for link in taken {
                scope.spawn(move || drop(link));
            }
        });
    }

    /// Forwards pending kernel log lines into the agent's log.
    pub fn poll_logger(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }
}
