//! TLS discovery: finds OpenSSL (or a BoringSSL with the same symbols) in the traced processes
//! and says where the SSL_read/SSL_write uprobes go (ebpf-probes/kernel/src/tls.rs captures
//! the plaintext there; `capture::Probes::attach_ssl` attaches them).
//!
//! A process's copies are the files it maps executable (/proc/PID/maps): a shared libssl, or
//! a statically linked one inside its executable or another library, found by symbol name in
//! the ELF symbol tables. A file with TLS code but none of the symbols (a stripped static
//! copy, such as the BoringSSL inside grpcio's `cygrpc` module) cannot be probed: it gets a
//! log line naming it and a counter. Each file is inspected and attached once, by (device, inode), with a
//! host-wide uprobe: the kernel fires it for every process mapping that file, the probe keeps
//! the traced ones, so a process that starts later with an attached libssl is covered from its
//! first call. The system's libssl is attached at start even when nothing maps it yet
//! (Python loads it on `import ssl`). Other copies in later processes are found by the
//! periodic scan of newly traced processes.
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
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

/// Files larger than this are not searched for symbols (reading them costs too much memory).
const MAX_FILE_BYTES: u64 = 512 << 20;

/// A label of the TLS 1.3 key schedule (RFC 8446, 7.1), in the read-only data of every TLS 1.3
/// implementation (OpenSSL, BoringSSL, Go's crypto/tls, rustls...) and of nothing else
/// likely: how a file with TLS code but no SSL symbols is recognised.
const TLS13_LABEL: &[u8] = b"c hs traffic";

/// Where the distribution's own libraries live: those link its libssl (attached at start),
/// so of them only libssl itself is read, not every library of every process.
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
    /// Files with SSL functions that got uprobes.
    pub files_attached: u64,
    /// Processes scanned that map no SSL implementation.
    pub processes_without_ssl: u64,
    /// Files named libssl*, or holding TLS code, whose symbol tables hold none of the
    /// functions (stripped, or another API): their processes' TLS stays ciphertext.
    pub libssl_without_symbols: u64,
    /// Files that could not be read or attached.
    pub errors: u64,
}

/// Attaches uprobes to a file; implemented by the capture stage.
pub trait Attach {
    /// Attaches every function of `file`; returns how many probes went on.
    fn attach_ssl(&mut self, file: &SslFile) -> Result<usize, String>;
}

/// What a file inspected holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holds {
    /// SSL functions, with uprobes on them.
    Attached,
    /// An SSL library without the symbols to probe (see [`TlsStats::libssl_without_symbols`]).
    WithoutSymbols,
    /// No SSL, or a file that could not be read or attached.
    Nothing,
}

/// The TLS stage's state: files inspected, processes scanned.
#[derive(Default)]
pub struct Tls {
    /// Every file inspected, by (device, inode).
    files: HashMap<(String, u64), Holds>,
    scanned: HashSet<u32>,
    pub stats: TlsStats,
}

impl Tls {
    /// Attaches the system's libssl(s), whether or not a process maps them yet.
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
                self.file(probes, id, &path, &path.display().to_string(), None);
            }
        }
    }

    /// Scans processes not scanned yet; forgets those that are gone.
    pub fn scan(&mut self, probes: &mut impl Attach, pids: &[u32]) {
        let live: HashSet<u32> = pids.iter().copied().collect();
        self.scanned.retain(|pid| live.contains(pid));
        for &pid in pids {
            if self.scanned.insert(pid) {
                self.scan_process(probes, pid);
            }
        }
    }

    fn scan_process(&mut self, probes: &mut impl Attach, pid: u32) {
        let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return; // gone already
        };
        // libssl by name, static copies in the executable and in libraries from outside the
        // distribution (a Python wheel's module); each file is read once.
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        let mut holds = Vec::new();
        for mapped in executable_files(&maps) {
            if !looks_like_libssl(&mapped.path)
                && exe.as_deref() != Some(Path::new(&mapped.path))
                && distribution_library(&mapped.path)
            {
                continue;
            }
            let path = PathBuf::from(format!("/proc/{pid}/root{}", mapped.path));
            holds.push(self.file(probes, mapped.id, &path, &mapped.path, Some(pid)));
        }
        if holds.contains(&Holds::WithoutSymbols) && !holds.contains(&Holds::Attached) {
            // Logged with the file, when it was first seen.
            debug!("pid {pid}: its TLS library has no symbols to probe; its TLS stays ciphertext");
        } else if !holds.contains(&Holds::Attached) {
            self.stats.processes_without_ssl += 1;
            let name = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // With --all most processes have none: the first few are logged, the rest counted.
            let level = if self.stats.processes_without_ssl <= LOGGED_WITHOUT_SSL {
                log::Level::Info
            } else {
                log::Level::Debug
            };
            log::log!(
                level,
                "pid {pid} ({}): no OpenSSL in it now (no libssl mapped, no SSL_read/SSL_write \
                 symbols in its executable files); its TLS stays ciphertext unless it loads an \
                 attached libssl later{}",
                name.trim(),
                if self.stats.processes_without_ssl == LOGGED_WITHOUT_SSL {
                    " (further ones are counted in tracer_tls_total, logged at debug level)"
                } else {
                    ""
                }
            );
        }
    }

    /// Inspects (once) and attaches the file, `shown` as `pid` maps it.
    fn file(
        &mut self,
        probes: &mut impl Attach,
        id: (String, u64),
        path: &Path,
        shown: &str,
        pid: Option<u32>,
    ) -> Holds {
        if let Some(&known) = self.files.get(&id) {
            return known;
        }
        let holds = self.inspect_and_attach(probes, path, shown, pid);
        self.files.insert(id, holds);
        holds
    }

    fn inspect_and_attach(
        &mut self,
        probes: &mut impl Attach,
        path: &Path,
        shown: &str,
        pid: Option<u32>,
    ) -> Holds {
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
        if found.offsets.is_empty() {
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
            return Holds::WithoutSymbols;
        }
        match probes.attach_ssl(&found) {
            Ok(n) => {
                self.stats.files_attached += 1;
                let names: Vec<&str> = found.offsets.iter().map(|(f, _)| *f).collect();
                info!("TLS: {n} uprobes on {shown} ({})", names.join(", "));
                Holds::Attached
            }
            Err(err) => {
                self.stats.errors += 1;
                warn!("TLS: attaching uprobes to {shown} failed: {err}");
                Holds::Nothing
            }
        }
    }
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
