//! TLS discovery: finds OpenSSL (or a BoringSSL with the same symbols) in the traced processes
//! and says where the SSL_read/SSL_write uprobes go (ebpf-probes/kernel/src/tls.rs captures
//! the plaintext there; `capture::Probes::attach_ssl` attaches them).
//!
//! A process's copies are the files it maps executable (/proc/PID/maps): a shared libssl, or
//! a statically linked one inside its executable or another library, found by symbol name in
//! the ELF symbol tables. A file with TLS code but none of the symbols (a stripped static
//! copy, such as the BoringSSL inside grpcio's `cygrpc` module) cannot be probed: it gets a
//! log line naming it and a counter. Each file is inspected once, by (device, inode).
//!
//! Where the uprobes go depends on the scope. Per process (the default): each traced process
//! gets its own uprobes, so the kernel plants the breakpoints in that process only and
//! untraced processes using the same libssl pay nothing (a uprobe hit costs microseconds even
//! when the probe returns at once). When first seen it gets the system's libssl, mapped yet
//! or not: the kernel plants the breakpoints when the process maps it (Python's lazy
//! `import ssl`, an exec into curl). It is scanned for other copies then, on every scan for
//! [`YOUNG`] (libraries loaded at startup), then every [`RESCAN_EVERY`]; its uprobes are
//! detached when it exits or stops being traced. Host-wide (`--all`, everything is traced): each file gets one uprobe
//! that fires in every process mapping it, the system's libssl is attached at start, and each
//! process is scanned once.
use std::{
    collections::{HashMap, HashSet},
    fs,
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use object::{Object, ObjectSection, ObjectSymbol};

/// OpenSSL functions that move plaintext, with the kernel program that handles each entry.
/// Their return is handled by one program, [`RETURN_PROGRAM`].
pub const FUNCTIONS: [(&str, &str); 4] = [
    ("SSL_write", "ssl_write"),
    ("SSL_write_ex", "ssl_write_ex"),
    ("SSL_read", "ssl_read"),
    ("SSL_read_ex", "ssl_read_ex"),
];
pub const RETURN_PROGRAM: &str = "ssl_return";

/// Where libssl usually lives, for attaching before any process loads it.
const SYSTEM_DIRS: [&str; 5] = [
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
];

/// Processes without SSL logged at info level; later ones at debug (see `scan_process`).
const LOGGED_WITHOUT_SSL: u64 = 10;

/// Processes whose uprobes are logged at info level; later ones at debug.
const LOGGED_ATTACHED: u64 = 10;

/// How long after it is first seen a process is rescanned on every scan: the libraries a
/// program loads at startup (Python's `import ssl` included) are mapped by then.
pub const YOUNG: Duration = Duration::from_secs(2);

/// How often an older traced process is rescanned, for libraries it loads later.
pub const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// Files larger than this are not searched for symbols (reading them costs too much memory).
const MAX_FILE_BYTES: u64 = 512 << 20;

/// A label of the TLS 1.3 key schedule (RFC 8446, 7.1), in the read-only data of every TLS 1.3
/// implementation (OpenSSL, BoringSSL, Go's crypto/tls, rustls...) and of nothing else
/// likely: how a file with TLS code but no SSL symbols is recognised.
const TLS13_LABEL: &[u8] = b"c hs traffic";

/// Where the distribution's own libraries live: those link its libssl (mapped, so found by
/// name), so of them only libssl itself is read, not every library of every process.
const DISTRIBUTION_PREFIXES: [&str; 5] = [
    "/usr/lib/",
    "/lib/",
    "/usr/lib64/",
    "/lib64/",
    "/usr/lib32/",
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file the agent can read")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
}

/// An SSL implementation in a file: the file offset of each function found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SslFile {
    /// A path the agent can open (through /proc/PID/root for other mount namespaces).
    pub path: PathBuf,
    /// (function, file offset) for each of [`FUNCTIONS`] present.
    pub offsets: Vec<(&'static str, u64)>,
    /// Whether its read-only data holds TLS 1.3 code ([`TLS13_LABEL`]), symbols or not.
    pub tls_code: bool,
}

/// The file offsets of [`FUNCTIONS`] in the ELF file `data`, from its dynamic symbols or, for
/// static copies, its full symbol table. Empty when it has none (stripped, or no SSL at all).
pub fn ssl_offsets(data: &[u8]) -> Result<Vec<(&'static str, u64)>, object::Error> {
    let file = object::File::parse(data)?;
    let mut found: Vec<(&'static str, u64)> = Vec::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if !symbol.is_definition() {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        let Some(&(function, _)) = FUNCTIONS.iter().find(|(f, _)| *f == name) else {
            continue;
        };
        if found.iter().any(|(f, _)| *f == function) {
            continue;
        }
        // Uprobes are placed by file offset: the symbol's address within its section, plus
        // where that section sits in the file.
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let Ok(section) = file.section_by_index(index) else {
            continue;
        };
        let Some((section_offset, _)) = section.file_range() else {
            continue;
        };
        let Some(within) = symbol.address().checked_sub(section.address()) else {
            continue;
        };
        found.push((function, section_offset + within));
    }
    found.sort_by_key(|(f, _)| FUNCTIONS.iter().position(|(g, _)| g == f));
    Ok(found)
}

/// Whether the read-only data of the ELF file `data` holds [`TLS13_LABEL`].
pub fn has_tls_code(data: &[u8]) -> Result<bool, object::Error> {
    let file = object::File::parse(data)?;
    Ok(file
        .sections()
        .filter(|section| section.name().is_ok_and(|name| name.starts_with(".rodata")))
        .filter_map(|section| section.data().ok())
        .any(|bytes| contains(bytes, TLS13_LABEL)))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    // Scan for the first byte, then compare: fast enough in a debug build for a few MB.
    let mut at = 0;
    while let Some(i) = haystack[at..].iter().position(|&b| b == first) {
        let start = at + i + 1;
        if haystack.get(start..start + rest.len()) == Some(rest) {
            return true;
        }
        at = start;
    }
    false
}

/// Inspects one file: its SSL functions, if any.
pub fn inspect(path: &Path) -> Result<SslFile, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let len = fs::metadata(path).map_err(read)?.len();
    if len > MAX_FILE_BYTES {
        return Ok(SslFile {
            path: path.to_owned(),
            offsets: Vec::new(),
            tls_code: false,
        });
    }
    let data = fs::read(path).map_err(read)?;
    let parse = |source| TlsError::Parse {
        path: path.to_owned(),
        source,
    };
    let offsets = ssl_offsets(&data).map_err(parse)?;
    let tls_code = offsets.is_empty() && has_tls_code(&data).map_err(parse)?;
    Ok(SslFile {
        path: path.to_owned(),
        offsets,
        tls_code,
    })
}

/// One executable file mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// (device, inode): the identity of the file, whatever path names it.
    pub id: (String, u64),
    /// Path inside the process's mount namespace.
    pub path: String,
}

/// The distinct files a process maps executable, from the text of /proc/PID/maps.
pub fn executable_files(maps: &str) -> Vec<Mapped> {
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_range), Some(perms), Some(_offset), Some(dev), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = fields.collect::<Vec<_>>().join(" ");
        let Ok(inode) = inode.parse::<u64>() else {
            continue;
        };
        if inode == 0
            || !perms.contains('x')
            || !path.starts_with('/')
            || path.ends_with(" (deleted)")
        {
            continue;
        }
        let id = (dev.to_owned(), inode);
        if seen.insert(id.clone()) {
            files.push(Mapped { id, path });
        }
    }
    files
}

fn distribution_library(path: &str) -> bool {
    DISTRIBUTION_PREFIXES.iter().any(|p| path.starts_with(p))
}

fn looks_like_libssl(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("libssl.so") || name.starts_with("libssl-"))
}

/// What the scans found, for metrics (`tracer_tls_*`) and the status line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsStats {
    /// Files with SSL functions that got uprobes (host-wide, or in at least one process).
    pub files_attached: u64,
    /// Processes that got uprobes of their own (per-process scope).
    pub processes_attached: u64,
    /// Processes whose uprobes were detached: they exited or stopped being traced.
    pub processes_detached: u64,
    /// Processes scanned that map no SSL implementation (past their startup, [`YOUNG`]).
    pub processes_without_ssl: u64,
    /// Files named libssl*, or holding TLS code, whose symbol tables hold none of the
    /// functions (stripped, or another API): their processes' TLS stays ciphertext.
    pub libssl_without_symbols: u64,
    /// Files that could not be read or attached (host-wide, or for a live process).
    pub errors: u64,
}

/// Attaches uprobes to a file; implemented by the capture stage.
pub trait Attach {
    /// Attaches every function of `file`, firing in process `pid` only, or in every process
    /// mapping the file when `pid` is None; returns how many probes went on.
    fn attach_ssl(&mut self, file: &SslFile, pid: Option<NonZeroU32>) -> Result<usize, String>;
    /// Detaches the uprobes attached for `pid`; returns how many there were.
    fn detach_ssl(&mut self, pid: NonZeroU32) -> usize;
}

/// Where the uprobes fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// In each traced process, attached for it (the default).
    PerProcess,
    /// In every process mapping an attached file (`--all`: everything is traced).
    HostWide,
}

/// What a file inspected holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Holds {
    /// SSL functions at these offsets (host-wide: with uprobes on them).
    Ssl(Vec<(&'static str, u64)>),
    /// An SSL library without the symbols to probe (see [`TlsStats::libssl_without_symbols`]).
    WithoutSymbols,
    /// No SSL, or a file that could not be read (or, host-wide, attached).
    Nothing,
}

/// A traced process, per-process scope.
struct Process {
    /// Its start time (/proc/PID/stat), to tell a reused pid from the process.
    started: u64,
    first_seen: Instant,
    last_scan: Instant,
    /// A thread of another process: its process gets the uprobes (they fire per address
    /// space, so a thread's own would fire a second time for every call).
    thread: bool,
    /// Files with uprobes for it, and files whose attach failed (not retried).
    attached: HashSet<(String, u64)>,
    failed: HashSet<(String, u64)>,
    /// Counted in `processes_without_ssl` (or found to have a library without symbols).
    reported: bool,
}

/// The TLS stage's state: files inspected, processes scanned.
pub struct Tls {
    scope: Scope,
    /// Every file inspected, by (device, inode).
    files: HashMap<(String, u64), Holds>,
    /// Files attached in at least one process (per-process scope).
    files_attached: HashSet<(String, u64)>,
    /// Host-wide: processes scanned (once each).
    scanned: HashSet<u32>,
    /// Per process: the traced processes.
    processes: HashMap<u32, Process>,
    /// Per process: the system's libssl(s), given to every traced process when first seen.
    system: Vec<((String, u64), SslFile)>,
    pub stats: TlsStats,
}

impl Tls {
    pub fn new(scope: Scope) -> Self {
        Self {
            scope,
            files: HashMap::new(),
            files_attached: HashSet::new(),
            scanned: HashSet::new(),
            processes: HashMap::new(),
            system: Vec::new(),
            stats: TlsStats::default(),
        }
    }

    /// Finds the system's libssl(s). Host-wide they are attached now, whether or not a process
    /// maps them yet (Python maps it on `import ssl`); per process, each traced process gets
    /// them when first seen, mapped yet or not (see [`Tls::scan`]).
    pub fn attach_system(&mut self, probes: &mut impl Attach) {
        for dir in SYSTEM_DIRS {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                // Versioned names only: libssl.so is a dev symlink to one of them.
                if !name.starts_with("libssl.so.") {
                    continue;
                }
                let path = entry.path();
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                let id = (dev_text(&meta), std::os::unix::fs::MetadataExt::ino(&meta));
                let shown = path.display().to_string();
                if let Holds::Ssl(offsets) = self.file(probes, id.clone(), &path, &shown, None)
                    && self.scope == Scope::PerProcess
                {
                    self.system.push((
                        id,
                        SslFile {
                            path,
                            offsets,
                            tls_code: false,
                        },
                    ));
                }
            }
        }
    }

    /// Scans the traced processes `pids` as due (see the module comment); forgets those that
    /// are gone, detaching their uprobes.
    pub fn scan(&mut self, probes: &mut impl Attach, pids: &[u32], now: Instant) {
        let live: HashSet<u32> = pids.iter().copied().collect();
        if self.scope == Scope::HostWide {
            self.scanned.retain(|pid| live.contains(pid));
            for &pid in pids {
                if self.scanned.insert(pid) {
                    self.scan_process(probes, pid, now);
                }
            }
            return;
        }
        let gone: Vec<u32> = self
            .processes
            .keys()
            .filter(|pid| !live.contains(pid))
            .copied()
            .collect();
        for pid in gone {
            self.release(probes, pid, "exited or no longer traced");
        }
        for &pid in pids {
            // Known processes cost nothing until their next scan is due; threads never do.
            if let Some(known) = self.processes.get(&pid) {
                let due = now.duration_since(known.first_seen) < YOUNG
                    || now.duration_since(known.last_scan) >= RESCAN_EVERY;
                if known.thread || !due {
                    continue;
                }
                match start_time(pid) {
                    None => continue, // gone; released once it leaves the traced set
                    Some(started) if started == known.started => {
                        if let Some(known) = self.processes.get_mut(&pid) {
                            known.last_scan = now;
                        }
                        self.scan_process(probes, pid, now);
                        continue;
                    }
                    Some(_) => self.release(probes, pid, "its pid was reused"),
                }
            }
            let Some(started) = start_time(pid) else {
                continue;
            };
            let thread = crate::select::thread_group(pid).is_some_and(|tgid| tgid != pid);
            self.processes.insert(
                pid,
                Process {
                    started,
                    first_seen: now,
                    last_scan: now,
                    thread,
                    attached: HashSet::new(),
                    failed: HashSet::new(),
                    reported: false,
                },
            );
            if !thread {
                // Uprobes for a file the process has not mapped yet wait in the kernel and are
                // planted when it maps it: a lazy `import ssl`, or an exec into curl, is
                // covered from its first call.
                for (id, file) in self.system.clone() {
                    let shown = file.path.display().to_string();
                    self.attach_in(probes, pid, id, &shown, &file);
                }
                self.scan_process(probes, pid, now);
            }
        }
    }

    /// Detaches the uprobes of `pid` and forgets it.
    fn release(&mut self, probes: &mut impl Attach, pid: u32, why: &str) {
        let Some(process) = self.processes.remove(&pid) else {
            return;
        };
        let Some(id) = NonZeroU32::new(pid) else {
            return;
        };
        if process.attached.is_empty() && process.failed.is_empty() {
            return;
        }
        let n = probes.detach_ssl(id);
        if !process.attached.is_empty() {
            self.stats.processes_detached += 1;
        }
        debug!("TLS: pid {pid} {why}: {n} uprobes detached");
    }

    fn scan_process(&mut self, probes: &mut impl Attach, pid: u32, now: Instant) {
        let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return; // gone already
        };
        // libssl by name, static copies in the executable and in libraries from outside the
        // distribution (a Python wheel's module); each file is read once.
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        let mut with_ssl = false;
        let mut without_symbols = false;
        for mapped in executable_files(&maps) {
            if !looks_like_libssl(&mapped.path)
                && exe.as_deref() != Some(Path::new(&mapped.path))
                && distribution_library(&mapped.path)
            {
                continue;
            }
            let path = PathBuf::from(format!("/proc/{pid}/root{}", mapped.path));
            match self.file(probes, mapped.id.clone(), &path, &mapped.path, Some(pid)) {
                Holds::Ssl(offsets) => {
                    with_ssl = true;
                    if self.scope == Scope::PerProcess {
                        let file = SslFile {
                            path,
                            offsets,
                            tls_code: false,
                        };
                        self.attach_in(probes, pid, mapped.id, &mapped.path, &file);
                    }
                }
                Holds::WithoutSymbols => without_symbols = true,
                Holds::Nothing => {}
            }
        }
        // Per process, a process is judged once its startup is over (it may load libssl
        // then); host-wide it is scanned once.
        let judged = match self.processes.get_mut(&pid) {
            Some(process) => {
                let due = !process.reported
                    && (with_ssl || now.duration_since(process.first_seen) >= YOUNG);
                process.reported |= due;
                due
            }
            None => true,
        };
        if !judged || with_ssl {
            return;
        }
        if without_symbols {
            // Logged with the file, when it was first seen.
            debug!("pid {pid}: its TLS library has no symbols to probe; its TLS stays ciphertext");
            return;
        }
        self.stats.processes_without_ssl += 1;
        let name = comm(pid);
        // With --all most processes have none: the first few are logged, the rest counted.
        let level = if self.stats.processes_without_ssl <= LOGGED_WITHOUT_SSL {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "pid {pid} ({name}): no OpenSSL in it now (no libssl mapped, no SSL_read/SSL_write \
             symbols in its executable files); its TLS stays ciphertext unless it loads a \
             libssl later{}",
            if self.stats.processes_without_ssl == LOGGED_WITHOUT_SSL {
                " (further ones are counted in tracer_tls_total, logged at debug level)"
            } else {
                ""
            }
        );
    }

    /// Per process: attaches `file` (mapped by `pid` as `shown`) for `pid`, once.
    fn attach_in(
        &mut self,
        probes: &mut impl Attach,
        pid: u32,
        id: (String, u64),
        shown: &str,
        file: &SslFile,
    ) {
        let (Some(process), Some(target)) = (self.processes.get_mut(&pid), NonZeroU32::new(pid))
        else {
            return;
        };
        if process.attached.contains(&id) || process.failed.contains(&id) {
            return;
        }
        match probes.attach_ssl(file, Some(target)) {
            Ok(n) => {
                let first = process.attached.is_empty();
                process.attached.insert(id.clone());
                if first {
                    self.stats.processes_attached += 1;
                }
                if self.files_attached.insert(id) {
                    self.stats.files_attached += 1;
                }
                let level = if self.stats.processes_attached <= LOGGED_ATTACHED {
                    log::Level::Info
                } else {
                    log::Level::Debug
                };
                let names: Vec<&str> = file.offsets.iter().map(|(f, _)| *f).collect();
                log::log!(
                    level,
                    "TLS: {n} uprobes on {shown} ({}) for pid {pid} ({}){}",
                    names.join(", "),
                    comm(pid),
                    if self.stats.processes_attached == LOGGED_ATTACHED && first {
                        " (further processes are counted in tracer_tls_total \
                         {event=\"processes_attached\"}, logged at debug level)"
                    } else {
                        ""
                    }
                );
            }
            Err(err) => {
                process.failed.insert(id);
                // A process that exited meanwhile is no failure.
                if start_time(pid) != Some(process.started) {
                    debug!("TLS: pid {pid} exited before its uprobes on {shown} went on: {err}");
                    return;
                }
                self.stats.errors += 1;
                warn!(
                    "TLS: attaching uprobes to {shown} for pid {pid} ({}) failed: {err}; its TLS \
                     through that file stays ciphertext",
                    comm(pid)
                );
            }
        }
    }

    /// Inspects (once) the file, `shown` as `pid` maps it; host-wide, attaches it.
    fn file(
        &mut self,
        probes: &mut impl Attach,
        id: (String, u64),
        path: &Path,
        shown: &str,
        pid: Option<u32>,
    ) -> Holds {
        if let Some(known) = self.files.get(&id) {
            return known.clone();
        }
        let holds = self.inspect(path, shown, pid);
        let holds = match holds {
            Holds::Ssl(offsets) if self.scope == Scope::HostWide => {
                let file = SslFile {
                    path: path.to_owned(),
                    offsets,
                    tls_code: false,
                };
                self.attach_host_wide(probes, &file, shown)
            }
            holds => holds,
        };
        self.files.insert(id, holds.clone());
        holds
    }

    fn attach_host_wide(&mut self, probes: &mut impl Attach, file: &SslFile, shown: &str) -> Holds {
        match probes.attach_ssl(file, None) {
            Ok(n) => {
                self.stats.files_attached += 1;
                let names: Vec<&str> = file.offsets.iter().map(|(f, _)| *f).collect();
                info!(
                    "TLS: {n} uprobes on {shown} ({}), host-wide",
                    names.join(", ")
                );
                Holds::Ssl(file.offsets.clone())
            }
            Err(err) => {
                self.stats.errors += 1;
                warn!("TLS: attaching uprobes to {shown} failed: {err}");
                Holds::Nothing
            }
        }
    }

    fn inspect(&mut self, path: &Path, shown: &str, pid: Option<u32>) -> Holds {
        let found = match inspect(path) {
            Ok(file) => file,
            Err(err) => {
                if looks_like_libssl(shown) {
                    self.stats.errors += 1;
                    warn!("TLS: cannot inspect {shown}: {err}");
                } else {
                    debug!("TLS: cannot inspect {shown}: {err}");
                }
                return Holds::Nothing;
            }
        };
        if !found.offsets.is_empty() {
            return Holds::Ssl(found.offsets);
        }
        if !looks_like_libssl(shown) && !found.tls_code {
            return Holds::Nothing;
        }
        self.stats.libssl_without_symbols += 1;
        let of_pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        if found.tls_code && !looks_like_libssl(shown) {
            warn!(
                "TLS: {shown}{of_pid} holds a TLS library without SSL_read/SSL_write \
                 symbols (a stripped static copy, like grpcio's BoringSSL, or another \
                 API); uprobes cannot find it, so the TLS of processes using it stays \
                 ciphertext and gets no spans"
            );
        } else {
            warn!(
                "TLS: {shown}{of_pid} has no SSL_read/SSL_write symbols (stripped?); the \
                 TLS of processes using it stays ciphertext"
            );
        }
        Holds::WithoutSymbols
    }
}

/// The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None
/// when it is gone.
fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold anything: count from after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// The device as /proc/PID/maps writes it (`major:minor`, hex), so ids from both agree.
fn dev_text(meta: &fs::Metadata) -> String {
    let dev = std::os::unix::fs::MetadataExt::dev(meta);
    format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_files_keeps_distinct_executable_file_mappings() {
        let maps = "\
55d0a1e00000-55d0a1e2a000 r--p 00000000 fe:01 1311 /usr/bin/python3.11
55d0a1e2a000-55d0a2100000 r-xp 0002a000 fe:01 1311 /usr/bin/python3.11
7f0c1c000000-7f0c1c021000 rw-p 00000000 00:00 0 
7f0c1d400000-7f0c1d45e000 r-xp 0001f000 fe:01 2290 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0c1d460000-7f0c1d470000 r-xp 00000000 fe:01 2290 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0c1d500000-7f0c1d510000 r-xp 00000000 00:05 77 /memfd:jit (deleted)
7ffd1c5e0000-7ffd1c5e2000 r-xp 00000000 00:00 0 [vdso]
7f0c1d600000-7f0c1d610000 r-xp 00000000 fe:01 99 /opt/my app/libx.so
";
        let files = executable_files(maps);
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/usr/bin/python3.11",
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/opt/my app/libx.so"
            ]
        );
        assert_eq!(files[1].id, ("fe:01".to_owned(), 2290));
    }

    #[test]
    fn executable_files_survives_garbage() {
        for text in [
            "",
            "\n\n",
            "x",
            "a b c d e",
            "a r-xp c d notanumber /x",
            "\u{0}\u{1}",
        ] {
            assert!(executable_files(text).is_empty(), "{text:?}");
        }
    }

    #[test]
    fn start_time_is_field_22_whatever_the_command_name() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        let own = start_time(std::process::id());
        assert!(own.is_some_and(|t| t > 0), "{own:?}");
        for text in ["", ")", "1 (x) S 1 2", "1 (x", "\u{0})\u{1}"] {
            assert_eq!(parse_start_time(text), None, "{text:?}");
        }
    }

    #[test]
    fn ssl_offsets_rejects_non_elf_without_panicking() {
        assert!(ssl_offsets(b"").is_err());
        assert!(ssl_offsets(b"\x7fELF\x02\x01\x01garbage").is_err());
    }

    /// Debian's libssl 3 (a real file, when installed): every function found, at distinct
    /// offsets inside the file.
    #[test]
    fn finds_the_four_functions_in_the_system_libssl() {
        let path = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let Ok(data) = fs::read(path) else {
            eprintln!("skipped: {} is not installed", path.display());
            return;
        };
        let offsets = ssl_offsets(&data).unwrap();
        let names: Vec<&str> = offsets.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            names,
            ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"]
        );
        let mut seen: Vec<u64> = offsets.iter().map(|(_, o)| *o).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4);
        assert!(seen.iter().all(|&o| o > 0 && o < data.len() as u64));
    }

    #[test]
    fn contains_finds_a_needle_anywhere_and_only_there() {
        let label = TLS13_LABEL;
        assert!(contains(label, label));
        assert!(contains(b"xxc hs trafficyy", label));
        assert!(contains(b"c hs trafficc hs traffic", label));
        assert!(contains(b"cc hs traffic", label));
        assert!(!contains(b"c hs traffi", label));
        assert!(!contains(b"c hs trafficx"[1..].as_ref(), label));
        assert!(!contains(b"", label));
        assert!(contains(b"", b""));
    }

    /// libssl holds the TLS 1.3 key schedule, libcrypto (same project, no TLS) does not: the
    /// label tells TLS code from other crypto code.
    #[test]
    fn tls_code_is_found_in_libssl_and_not_in_libcrypto() {
        let dir = Path::new("/usr/lib/x86_64-linux-gnu");
        let (Ok(ssl), Ok(crypto)) = (
            fs::read(dir.join("libssl.so.3")),
            fs::read(dir.join("libcrypto.so.3")),
        ) else {
            eprintln!("skipped: OpenSSL 3 is not installed");
            return;
        };
        assert!(has_tls_code(&ssl).unwrap());
        assert!(!has_tls_code(&crypto).unwrap());
        assert!(has_tls_code(b"not elf").is_err());
    }

    /// The agent's own executable has no SSL: found empty, not an error.
    #[test]
    fn a_file_without_ssl_has_no_offsets() {
        let exe = std::env::current_exe().unwrap();
        let file = inspect(&exe).unwrap();
        assert!(file.offsets.is_empty());
    }
}
