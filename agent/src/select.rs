//! Which processes are traced: `--pid`, `--all`, `--exe`, `--port` (includes) minus
//! `--exclude-pid`, `--exclude-exe` (excludes); the agent itself is always excluded.
//!
//! The kernel holds the decision: one state byte per pid (`tracer_common::traced`) that forks
//! copy to the child and exits clear. This module writes those bytes: for the processes running
//! when the agent starts (one /proc scan), for every exec the probes report, and for stragglers
//! in the periodic sweep. It sees each ring buffer record before the pipeline does
//! ([`Selector::intercept`]).
//!
//! Pick-up at exec without a race: while exec watching is on (`--exe`, `--exclude-exe`), the
//! probe marks every process that execs (unless excluded for good) pending, which the probes
//! trace, and reports it. When the agent reads that EXEC record it decides: a match becomes
//! TRACED, anything else goes back to NONE (or EXCLUDED_EXE) and the records it produced in
//! between, which follow the EXEC record in the ring buffer, are dropped here. So a matching
//! process is traced from its first instruction however late the agent reads the record (1 to
//! 10 ms here: the ring buffer is drained every 10 ms), and a refused one costs the probes'
//! work for that while only. Each exec gives a new pending generation and the agent writes with
//! compare-and-swap, so a decision never lands on a later exec or on a process the probes just
//! traced for listening on a `--port`. A process whose EXEC record was lost (ring buffer full)
//! is decided by the sweep.
//!
//! `--port` needs no such care: the probe marks a process TRACED inside the listen() call on a
//! selected port, before it can accept, and reports it.
use std::{
    collections::{HashMap, HashSet},
    fmt, fs,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use log::{debug, info, warn};
use tracer_common::{kind, traced};

use crate::{
    capture::{
        self, Probes, TracedPids, Watch,
        decode::{self, SelectionEvent},
    },
    clock::Clock,
    resource::{Script, interpreter_script},
};

/// The selection options of the command line.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Choosing what to trace")]
pub struct SelectionArgs {
    /// Trace processes whose executable matches NAME_OR_GLOB: those running now, those that
    /// start later (from their first instruction), and what they fork. Without a `/` it is
    /// matched against file names: the program as run (the path given to exec, argv[0]) and
    /// as resolved (/proc/PID/exe), and for interpreters (python, node, ruby, perl, php, java)
    /// the script's file name or `-m` module: `python3`, `nginx`, `app.py`, `http.server`,
    /// `srv-*`. With a `/`, against full paths: `/usr/sbin/nginx`, `*/venv/bin/*`. Globs: `*`
    /// (any text, `/` included), `?`, `[a-z]`, `[!0-9]`; `\` escapes. Repeatable.
    #[arg(long = "exe", value_name = "NAME_OR_GLOB", value_parser = ExePattern::parse)]
    pub exes: Vec<ExePattern>,

    /// Trace processes that listen on this TCP port, in any network namespace: those listening
    /// now, and later listeners from their listen() call on, before their first accept.
    /// Repeatable.
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// Never trace this process or its descendants. Repeatable.
    #[arg(long = "exclude-pid", value_name = "PID")]
    pub exclude_pids: Vec<u32>,

    /// Never trace processes whose executable matches (as for --exe), even when selected
    /// otherwise; a process that later execs something else is decided again. Repeatable.
    #[arg(long = "exclude-exe", value_name = "NAME_OR_GLOB", value_parser = ExePattern::parse)]
    pub exclude_exes: Vec<ExePattern>,

    /// The node's log directory as the kubelet writes it (in a DaemonSet, the host's /var/log
    /// mounted read-only, e.g. /host/var/log): k8s.pod.name, k8s.namespace.name and
    /// k8s.container.name come from its `containers/` and `pods/` entries.
    #[arg(long = "k8s-log-dir", value_name = "DIR", default_value = "/var/log")]
    pub k8s_log_dir: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Patterns.

/// An `--exe` / `--exclude-exe` pattern: a file name glob, or a full path glob when it holds a
/// `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExePattern {
    text: String,
    full_path: bool,
    tokens: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `?`
    Any,
    /// `*`
    Star,
    /// `[...]`: inclusive ranges (a single char is a range of one).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// Why a pattern was refused; each says how to write it instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error(
        "the pattern is empty; give an executable name such as `nginx` or a glob such as `python3*`"
    )]
    Empty,
    #[error("a NUL byte cannot occur in an executable name or path")]
    Nul,
    #[error("`[` at byte {at} is never closed; write `\\[` for a literal `[`")]
    UnclosedClass { at: usize },
    #[error("`[]` at byte {at} matches nothing; write `\\[\\]` for literal brackets")]
    EmptyClass { at: usize },
    #[error("the range `{from}-{to}` is backwards; write `{to}-{from}`")]
    BackwardRange { from: char, to: char },
    #[error("the trailing `\\` escapes nothing; write `\\\\` for a literal backslash")]
    TrailingEscape,
    #[error(
        "`{pattern}` holds a `/`, so it is matched against full paths, which start with `/`: \
         write the whole path or start it with `*` (`*/{pattern}`); without a `/` it matches \
         file names"
    )]
    RelativePath { pattern: String },
    #[error(
        "`{pattern}` ends with `/`: an executable is a file, not a directory (try `{pattern}*`)"
    )]
    Directory { pattern: String },
}

impl ExePattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.contains('\0') {
            return Err(PatternError::Nul);
        }
        let full_path = text.contains('/');
        if full_path && !(text.starts_with('/') || text.starts_with('*')) {
            return Err(PatternError::RelativePath {
                pattern: text.to_owned(),
            });
        }
        if full_path && text.ends_with('/') {
            return Err(PatternError::Directory {
                pattern: text.to_owned(),
            });
        }
        let mut tokens = Vec::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            let token = match c {
                '*' => {
                    // `**` is `*`.
                    if tokens.last() == Some(&Token::Star) {
                        continue;
                    }
                    Token::Star
                }
                '?' => Token::Any,
                '\\' => Token::Char(chars.next().ok_or(PatternError::TrailingEscape)?.1),
                '[' => {
                    let negated = chars.next_if(|&(_, c)| c == '!' || c == '^').is_some();
                    let mut ranges = Vec::new();
                    let mut closed = false;
                    while let Some((_, c)) = chars.next() {
                        let from = match c {
                            ']' => {
                                closed = true;
                                break;
                            }
                            '\\' => chars.next().ok_or(PatternError::TrailingEscape)?.1,
                            c => c,
                        };
                        let mut to = from;
                        // `a-z`; a `-` first or last in the class is literal.
                        if chars.peek().is_some_and(|&(_, c)| c == '-') {
                            let mut ahead = chars.clone();
                            ahead.next();
                            if let Some((_, end)) = ahead.next()
                                && end != ']'
                            {
                                chars.next();
                                to = match chars.next() {
                                    Some((_, '\\')) => {
                                        chars.next().ok_or(PatternError::TrailingEscape)?.1
                                    }
                                    Some((_, c)) => c,
                                    None => return Err(PatternError::UnclosedClass { at }),
                                };
                                if to < from {
                                    return Err(PatternError::BackwardRange { from, to });
                                }
                            }
                        }
                        ranges.push((from, to));
                    }
                    if !closed {
                        return Err(PatternError::UnclosedClass { at });
                    }
                    if ranges.is_empty() {
                        return Err(PatternError::EmptyClass { at });
                    }
                    Token::Class { negated, ranges }
                }
                c => Token::Char(c),
            };
            tokens.push(token);
        }
        Ok(Self {
            text: text.to_owned(),
            full_path,
            tokens,
        })
    }

    /// Whether the pattern matches `text` (a file name, or a full path for a path pattern).
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let (mut t, mut p) = (0, 0);
        // Where the last `*` resumes: (token after it, text position it has swallowed up to).
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(Token::Star) => {
                    star = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                Some(token) if token.accepts(text[t]) => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                // Let the last `*` swallow one more char and retry from there.
                Some((after, swallowed)) => {
                    star = Some((after, swallowed + 1));
                    p = after;
                    t = swallowed + 1;
                }
                None => return false,
            }
        }
        self.tokens[p.min(self.tokens.len())..]
            .iter()
            .all(|token| *token == Token::Star)
    }

    /// Whether the pattern matches the process described by `view`.
    pub fn matches_view(&self, view: &ExeView) -> bool {
        let candidates = if self.full_path {
            &view.paths
        } else {
            &view.names
        };
        candidates.iter().any(|c| self.matches(c))
    }
}

impl Token {
    fn accepts(&self, c: char) -> bool {
        match self {
            Self::Char(want) => c == *want,
            Self::Any => true,
            Self::Star => false,
            Self::Class { negated, ranges } => {
                ranges.iter().any(|&(from, to)| (from..=to).contains(&c)) != *negated
            }
        }
    }
}

impl fmt::Display for ExePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

// ---------------------------------------------------------------------------------------------
// What a pattern is matched against.

/// The names and paths of one process's program that patterns are matched against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExeView {
    /// File names: of the program as run and as resolved, of an interpreter's script, or an
    /// interpreter's `-m` module.
    names: Vec<String>,
    /// Absolute paths of the same.
    paths: Vec<String>,
}

impl ExeView {
    /// From what is known of a process: the path given to exec (EXEC event), its /proc/PID/exe
    /// link, its command line, and its comm (used only when nothing else names it).
    pub fn new(filename: Option<&str>, exe: Option<&str>, cmdline: &[String], comm: &str) -> Self {
        let mut view = Self::default();
        // argv[0] unless a program rewrote it into a title (`nginx: master process ...`).
        let argv0 = cmdline
            .first()
            .map(String::as_str)
            .filter(|a| !a.contains(char::is_whitespace));
        let exe = exe.map(|e| e.strip_suffix(" (deleted)").unwrap_or(e));
        for path in [filename, exe, argv0].into_iter().flatten() {
            view.add_path(path);
        }
        let program = exe.or(filename).map(file_name).unwrap_or(comm);
        match interpreter_script(program, cmdline) {
            Some(Script::File(script)) => view.add_path(script),
            Some(Script::Module(module)) => view.add_name(module),
            None => {}
        }
        if view.names.is_empty() && !comm.is_empty() {
            view.add_name(comm);
        }
        view
    }

    /// Reads what /proc says about `pid` (an exited process gives what the event said).
    fn read(pid: u32, filename: Option<&str>, comm: &str) -> Self {
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let cmdline: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|bytes| {
                bytes
                    .split(|&b| b == 0)
                    .filter(|arg| !arg.is_empty())
                    .map(|arg| String::from_utf8_lossy(arg).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self::new(filename, exe.as_deref(), &cmdline, comm)
    }

    fn add_path(&mut self, path: &str) {
        if path.starts_with('/') && !self.paths.iter().any(|p| p == path) {
            self.paths.push(path.to_owned());
        }
        self.add_name(file_name(path));
    }

    fn add_name(&mut self, name: &str) {
        if !name.is_empty() && !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_owned());
        }
    }

    /// A short name for logs.
    fn label(&self) -> &str {
        self.names.first().map_or("?", String::as_str)
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The comm of a live process, None when it is gone.
fn read_comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_owned())
}

// ---------------------------------------------------------------------------------------------
// The rules.

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error("nothing to trace: give --pid PID, --all, --exe NAME_OR_GLOB or --port PORT")]
    Nothing,
    #[error("pid {pid} is both traced (--pid) and excluded (--exclude-pid)")]
    Contradiction { pid: u32 },
}

/// The selection rules, checked.
#[derive(Clone, Debug)]
pub struct Selection {
    all: bool,
    exes: Vec<ExePattern>,
    ports: Vec<u16>,
    exclude_pids: Vec<u32>,
    exclude_exes: Vec<ExePattern>,
}

/// Why a process is or is not traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict<'a> {
    Exclude(&'a ExePattern),
    All,
    /// Its parent was traced (--pid and its descendants, or any traced process that forked).
    Inherited,
    Exe(&'a ExePattern),
    Port,
    Skip,
}

impl Selection {
    /// Checks the rules; `all` and `pids` are `--all` and `--pid`.
    pub fn new(all: bool, pids: &[u32], args: &SelectionArgs) -> Result<Self, SelectionError> {
        if !all && pids.is_empty() && args.exes.is_empty() && args.ports.is_empty() {
            return Err(SelectionError::Nothing);
        }
        if let Some(&pid) = pids.iter().find(|pid| args.exclude_pids.contains(pid)) {
            return Err(SelectionError::Contradiction { pid });
        }
        if all && !(args.exes.is_empty() && args.ports.is_empty()) {
            warn!("--all traces every process: --exe and --port add nothing to it");
        }
        Ok(Self {
            all,
            exes: args.exes.clone(),
            ports: args.ports.clone(),
            exclude_pids: args.exclude_pids.clone(),
            exclude_exes: args.exclude_exes.clone(),
        })
    }

    /// What the probes must report for these rules.
    pub fn watch(&self) -> Watch {
        Watch {
            exec: self.watches_exec(),
            ports: self.ports.clone(),
            exclusions: !self.exclude_pids.is_empty() || !self.exclude_exes.is_empty(),
        }
    }

    fn watches_exec(&self) -> bool {
        !self.exes.is_empty() || !self.exclude_exes.is_empty()
    }

    fn judge(&self, view: &ExeView, inherited: bool, listens: bool) -> Verdict<'_> {
        if let Some(p) = self.exclude_exes.iter().find(|p| p.matches_view(view)) {
            Verdict::Exclude(p)
        } else if self.all {
            Verdict::All
        } else if inherited {
            Verdict::Inherited
        } else if let Some(p) = self.exes.iter().find(|p| p.matches_view(view)) {
            Verdict::Exe(p)
        } else if listens {
            Verdict::Port
        } else {
            Verdict::Skip
        }
    }

    /// Applies the rules to the processes running now (the --pid ones are already traced) and
    /// returns the selector that follows what happens next. Adds the processes it traces to
    /// `probes.targets`.
    pub fn start(self, probes: &mut Probes) -> Selector {
        let mut selector = Selector {
            traced: probes.traced.clone(),
            selection: Arc::new(self),
            refused: HashMap::new(),
            stragglers: HashMap::new(),
            stats: SelectorStats::default(),
        };
        let selected = selector.scan();
        probes.targets.retain(|&pid| selector.is_traced(pid));
        probes.targets.extend(selected);
        probes.targets.sort_unstable();
        probes.targets.dedup();
        selector
    }
}

// ---------------------------------------------------------------------------------------------
// The selector at work.

/// Records of a refused process are dropped up to this long after the refusal: enough for a
/// syscall that passed the probes' check just before the byte changed.
const REFUSAL_SLACK_NS: u64 = 1_000_000_000;
/// Refusals are forgotten this long after their slack ran out (the ring buffer is drained far
/// more often than that).
const REFUSAL_KEEP_NS: u64 = 10_000_000_000;

/// What the selector did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectorStats {
    pub execs: u64,
    pub listens: u64,
    /// Processes newly traced by --exe or --port.
    pub selected: u64,
    /// Processes that were traced provisionally (or inherited) and turned down.
    pub refused: u64,
    /// Records of refused processes dropped before the pipeline.
    pub records_dropped: u64,
    /// Pending processes decided by the sweep: their EXEC record was lost.
    pub decided_late: u64,
    /// Selection records that could not be decoded.
    pub decode_errors: u64,
}

impl SelectorStats {
    /// Each figure with its `tracer_selection_total` event name (`metrics::SELECTION_EVENTS`).
    pub fn totals(&self) -> [(&'static str, u64); 7] {
        [
            ("execs", self.execs),
            ("listens", self.listens),
            ("selected", self.selected),
            ("refused", self.refused),
            ("records_dropped", self.records_dropped),
            ("decided_late", self.decided_late),
            ("decode_errors", self.decode_errors),
        ]
    }
}

pub struct Selector {
    /// Shared so a verdict can borrow a pattern while the selector changes its own state.
    selection: Arc<Selection>,
    traced: TracedPids,
    /// Refused pid -> kernel timestamp up to which its records are dropped.
    refused: HashMap<u32, u64>,
    /// Pending processes seen by the last sweep, and their state then.
    stragglers: HashMap<u32, u8>,
    pub stats: SelectorStats,
}

impl Selector {
    /// Handles selection records and drops records of refused processes: true when the
    /// record is consumed here and must not reach the pipeline.
    pub fn intercept(&mut self, record: &[u8]) -> bool {
        let Ok(header) = decode::header(record) else {
            return false; // the pipeline counts undecodable records
        };
        match header.kind {
            kind::EXEC | kind::LISTEN => {
                match decode::decode_selection(record) {
                    Some(Ok(event)) => self.handle(event),
                    Some(Err(err)) => {
                        if self.stats.decode_errors == 0 {
                            warn!("undecodable exec/listen record ({err}); counting further ones");
                        }
                        self.stats.decode_errors += 1;
                    }
                    None => {}
                }
                true
            }
            _ => {
                if self.refused.is_empty() {
                    return false;
                }
                let drop = self
                    .refused
                    .get(&header.pid)
                    .is_some_and(|&until| header.ts_ns <= until);
                self.stats.records_dropped += u64::from(drop);
                drop
            }
        }
    }

    fn handle(&mut self, event: SelectionEvent) {
        match event {
            SelectionEvent::Exec {
                header,
                prev_state: _,
                state,
                comm,
                filename,
            } => {
                self.stats.execs += 1;
                let pid = header.pid;
                // A new program: what was refused of the old one no longer applies.
                self.refused.remove(&pid);
                let filename = String::from_utf8_lossy(&filename);
                // /proc describes this exec only while the process is still in the state it
                // gave; after a later exec (which has its own record) it describes that one.
                let current = self.traced.get(pid) == state;
                let view = if current {
                    ExeView::read(pid, Some(&filename), &comm)
                } else {
                    ExeView::new(Some(&filename), None, &[], &comm)
                };
                let selection = Arc::clone(&self.selection);
                let inherited = state & traced::PENDING_INHERITED != 0;
                let verdict = selection.judge(&view, inherited, false);
                self.apply(
                    pid,
                    &view,
                    verdict,
                    current.then_some(state),
                    Some(header.ts_ns),
                );
            }
            SelectionEvent::Listen {
                header,
                prev_state,
                port,
            } => {
                self.stats.listens += 1;
                self.refused.remove(&header.pid);
                if prev_state != traced::TRACED {
                    self.stats.selected += 1;
                    let comm = read_comm(header.pid).unwrap_or_default();
                    info!(
                        "tracing pid {} ({comm}): it listens on port {port} (--port)",
                        header.pid
                    );
                }
            }
        }
    }

    /// Writes the verdict into the traced set, if the process is still in the `expected`
    /// state (None: a later exec superseded the one judged), along with its children forked
    /// meanwhile; refuses the records of a process turned down. `exec_ns`: when the judged
    /// exec happened, to report how long the decision took.
    fn apply(
        &mut self,
        pid: u32,
        view: &ExeView,
        verdict: Verdict<'_>,
        expected: Option<u8>,
        exec_ns: Option<u64>,
    ) {
        let now = Clock::monotonic_now();
        let target = match verdict {
            Verdict::Exclude(_) => traced::EXCLUDED_EXE,
            // NONE is traced with --all.
            Verdict::All | Verdict::Skip => traced::NONE,
            Verdict::Inherited | Verdict::Exe(_) | Verdict::Port => traced::TRACED,
        };
        let refuse = matches!(verdict, Verdict::Exclude(_) | Verdict::Skip);
        let mut written = false;
        if let Some(expected) = expected {
            written = match self.traced.replace(pid, expected, target) {
                Ok(()) => true,
                // The probe traced it meanwhile for listening on a --port: that stands,
                // unless the process is excluded.
                Err(traced::TRACED) if verdict == Verdict::Skip => return,
                Err(traced::TRACED) if refuse => {
                    self.traced.replace(pid, traced::TRACED, target).is_ok()
                }
                // Exited, or exec'd again: that exec has its own record.
                Err(_) => false,
            };
            // Children forked before the decision share the pending state; any exec of
            // theirs has its own record.
            if written && traced::is_pending(expected) {
                for child in descendants(pid) {
                    if self.traced.replace(child, expected, target).is_ok() && refuse {
                        self.refuse(child, now);
                    }
                }
            }
        }
        if refuse {
            self.refuse(pid, now);
        }
        match verdict {
            Verdict::Exclude(pattern) => {
                debug!(
                    "not tracing pid {pid} ({}): --exclude-exe {pattern}",
                    view.label()
                );
            }
            // Not written when it exited (or exec'd again) before the decision: what it did
            // was traced all the same, provisionally.
            Verdict::Exe(_) | Verdict::Port if written || expected.is_none() => {
                self.stats.selected += 1;
                let why = match verdict {
                    Verdict::Exe(pattern) => format!("--exe {pattern}"),
                    _ => "listening on a --port".to_owned(),
                };
                // Traced provisionally since the exec, so the delay lost nothing; it is how
                // long a refused process is traced for nothing.
                let delay = exec_ns
                    .map(|at| {
                        format!(
                            " (decided {:.1} ms after its exec)",
                            now.saturating_sub(at) as f64 / 1e6
                        )
                    })
                    .unwrap_or_default();
                info!("tracing pid {pid} ({}): {why}{delay}", view.label());
            }
            _ => {}
        }
    }

    fn refuse(&mut self, pid: u32, now: u64) {
        self.stats.refused += 1;
        self.refused.insert(pid, now + REFUSAL_SLACK_NS);
    }

    fn is_traced(&self, pid: u32) -> bool {
        match self.traced.get(pid) {
            traced::TRACED => true,
            traced::NONE => self.selection.all,
            state => traced::is_pending(state),
        }
    }

    /// The start-up pass over /proc; returns the processes it traced.
    fn scan(&mut self) -> Vec<u32> {
        let agent = std::process::id();
        let now = Clock::monotonic_now();
        // Exclusions by pid first: they win over everything and cover descendants.
        let mut excluded = HashSet::new();
        let selection = Arc::clone(&self.selection);
        for &pid in &selection.exclude_pids {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                warn!("--exclude-pid {pid}: no such process (nothing to exclude)");
            }
            for p in std::iter::once(pid).chain(capture::descendants(pid)) {
                if self.is_traced(p) {
                    self.refuse(p, now);
                }
                self.traced.set(p, traced::EXCLUDED);
                excluded.insert(p);
            }
        }
        let mut selected = Vec::new();
        if !selection.watches_exec() && selection.ports.is_empty() {
            return selected;
        }
        let listening = listeners(&selection.ports);
        let Ok(all) = procfs::process::all_processes() else {
            warn!("cannot list /proc: only --pid processes are traced until they exec");
            return selected;
        };
        let pids: Vec<u32> = all
            .filter_map(|p| p.ok().map(|p| p.pid as u32))
            .filter(|&pid| pid != agent && !excluded.contains(&pid))
            .collect();
        for pid in pids {
            let Some(comm) = read_comm(pid) else { continue };
            let state = self.traced.get(pid);
            let view = ExeView::read(pid, None, &comm);
            let inherited = state == traced::TRACED
                || (traced::is_pending(state) && state & traced::PENDING_INHERITED != 0);
            let verdict = selection.judge(&view, inherited, listening.contains(&pid));
            if verdict == Verdict::Skip && !self.is_traced(pid) {
                continue; // nothing to change, nothing of it to drop
            }
            self.apply(pid, &view, verdict, Some(state), None);
            if matches!(verdict, Verdict::Exe(_) | Verdict::Port) {
                selected.push(pid);
                // Its existing children, as --pid does; later forks inherit in the kernel.
                for child in descendants(pid) {
                    if self
                        .traced
                        .replace(child, traced::NONE, traced::TRACED)
                        .is_ok()
                    {
                        selected.push(child);
                    }
                }
            }
        }
        info!(
            "selection: {} running process(es) traced by --exe/--port{}",
            selected.len(),
            if selection.watches_exec() {
                "; watching execs for new ones"
            } else {
                ""
            }
        );
        selected
    }

    /// Periodic upkeep: forgets old refusals, and decides processes left pending (their EXEC
    /// record was lost to a full ring buffer).
    pub fn sweep(&mut self) {
        let now = Clock::monotonic_now();
        self.refused
            .retain(|_, until| until.saturating_add(REFUSAL_KEEP_NS) > now);
        if !self.selection.watches_exec() {
            return;
        }
        let previous = std::mem::take(&mut self.stragglers);
        for pid in self.traced.pids_where(traced::is_pending) {
            let state = self.traced.get(pid);
            // Threads inherit their process's byte at creation; only the process's counts.
            if thread_group(pid) != Some(pid) {
                let _ = self.traced.replace(pid, state, traced::NONE);
                continue;
            }
            // Most are decided by their EXEC record, still in the ring buffer: only one pending
            // in the same state since the last sweep, 10 s ago, had its record lost.
            if previous.get(&pid) != Some(&state) {
                self.stragglers.insert(pid, state);
                continue;
            }
            let comm = read_comm(pid).unwrap_or_default();
            if self.stats.decided_late == 0 {
                info!(
                    "pid {pid} ({comm}) was still traced provisionally: deciding it now (its \
                     exec event was lost); counting further ones"
                );
            }
            self.stats.decided_late += 1;
            let view = ExeView::read(pid, None, &comm);
            let selection = Arc::clone(&self.selection);
            let inherited = state & traced::PENDING_INHERITED != 0;
            let verdict = selection.judge(&view, inherited, false);
            self.apply(pid, &view, verdict, Some(state), None);
        }
    }
}

/// The thread group (process) of a task id (Tgid in /proc/TID/status), None when it is gone.
pub(crate) fn thread_group(tid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|tgid| tgid.trim().parse().ok())
}

/// Every descendant of `pid`, from /proc/PID/task/*/children, or a /proc scan on kernels
/// without that file (CONFIG_PROC_CHILDREN).
fn descendants(pid: u32) -> Vec<u32> {
    static HAS_CHILDREN_FILES: OnceLock<bool> = OnceLock::new();
    if !*HAS_CHILDREN_FILES.get_or_init(|| Path::new("/proc/thread-self/children").exists()) {
        return capture::descendants(pid);
    }
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{parent}/task")) else {
            continue; // gone
        };
        for task in tasks.flatten() {
            let Ok(text) = fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in text.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !found.contains(&child) {
                    found.push(child);
                    queue.push(child);
                }
            }
        }
    }
    found
}

/// Processes holding a TCP socket that listens on one of `ports`, in any network namespace.
fn listeners(ports: &[u16]) -> HashSet<u32> {
    let mut found = HashSet::new();
    if ports.is_empty() {
        return found;
    }
    let Ok(all) = procfs::process::all_processes() else {
        return found;
    };
    // One read of the TCP tables per network namespace.
    let mut by_netns: HashMap<PathBuf, Vec<procfs::process::Process>> = HashMap::new();
    for process in all.flatten() {
        if let Ok(ns) = fs::read_link(format!("/proc/{}/ns/net", process.pid)) {
            by_netns.entry(ns).or_default().push(process);
        }
    }
    for processes in by_netns.values() {
        let Some(first) = processes.first() else {
            continue;
        };
        let inodes: HashSet<u64> = [first.tcp(), first.tcp6()]
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                entry.state == procfs::net::TcpState::Listen
                    && ports.contains(&entry.local_address.port())
            })
            .map(|entry| entry.inode)
            .collect();
        if inodes.is_empty() {
            continue;
        }
        for process in processes {
            let Ok(fds) = process.fd() else { continue };
            let holds = fds.flatten().any(|fd| {
                matches!(fd.target, procfs::process::FDTarget::Socket(inode) if inodes.contains(&inode))
            });
            if holds {
                found.insert(process.pid as u32);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use proptest::prelude::*;

    use super::*;

    fn p(text: &str) -> ExePattern {
        ExePattern::parse(text).unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    #[test]
    fn globs_match_like_a_shell() {
        let cases: &[(&str, &str, bool)] = &[
            ("nginx", "nginx", true),
            ("nginx", "nginx2", false),
            ("python3*", "python3.11", true),
            ("python3*", "python", false),
            ("*", "", true),
            ("*", "anything", true),
            ("srv-?", "srv-a", true),
            ("srv-?", "srv-ab", false),
            ("srv-[ab]", "srv-b", true),
            ("srv-[a-c]x", "srv-cx", true),
            ("srv-[!a-c]", "srv-d", true),
            ("srv-[!a-c]", "srv-a", false),
            ("srv-[^a]", "srv-a", false),
            ("[-a]", "-", true),
            ("[a-]", "-", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*.py", "app.py", true),
            ("*.py", "app.pyc", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("**x", "yyx", true),
            ("/usr/bin/*", "/usr/bin/python3.11", true),
            ("*/bin/python*", "/usr/local/bin/python3.11", true),
            ("/usr/bin/*", "/usr/sbin/nginx", false),
            ("h\u{e9}*", "h\u{e9}llo", true),
        ];
        for &(pattern, text, want) in cases {
            assert_eq!(p(pattern).matches(text), want, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn bad_patterns_are_explained() {
        let cases: &[(&str, PatternError)] = &[
            ("", PatternError::Empty),
            ("a\0b", PatternError::Nul),
            ("py[thon", PatternError::UnclosedClass { at: 2 }),
            ("py[]", PatternError::EmptyClass { at: 2 }),
            ("[z-a]", PatternError::BackwardRange { from: 'z', to: 'a' }),
            ("python\\", PatternError::TrailingEscape),
            (
                "bin/python",
                PatternError::RelativePath {
                    pattern: "bin/python".into(),
                },
            ),
            (
                "/usr/bin/",
                PatternError::Directory {
                    pattern: "/usr/bin/".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(ExePattern::parse(text).as_ref(), Err(want), "{text:?}");
            // Every message says what to do.
            let message = want.to_string();
            assert!(message.len() > 30, "{message}");
        }
    }

    #[test]
    fn views_name_the_program_as_run_as_resolved_and_the_script() {
        let cmd = |args: &[&str]| args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // A symlink exec'd by path: both names, both paths.
        let view = ExeView::new(
            Some("/tmp/x/srv-alpha"),
            Some("/usr/bin/python3.11"),
            &cmd(&["/tmp/x/srv-alpha", "-m", "http.server"]),
            "srv-alpha",
        );
        assert_eq!(view.names, ["srv-alpha", "python3.11", "http.server"]);
        assert_eq!(view.paths, ["/tmp/x/srv-alpha", "/usr/bin/python3.11"]);
        assert!(p("srv-a*").matches_view(&view));
        assert!(p("http.server").matches_view(&view));
        assert!(p("/usr/bin/python3*").matches_view(&view));
        assert!(!p("python3").matches_view(&view));
        // A script run by the interpreter, found from /proc (no exec event).
        let view = ExeView::new(
            None,
            Some("/usr/bin/python3.11"),
            &cmd(&["python3", "-u", "/srv/inventory.py", "--port", "1"]),
            "python3",
        );
        assert!(p("inventory.py").matches_view(&view));
        assert!(p("python3").matches_view(&view));
        assert!(p("/srv/*.py").matches_view(&view));
        // A title in place of argv[0], a replaced binary.
        let view = ExeView::new(
            None,
            Some("/usr/sbin/nginx (deleted)"),
            &cmd(&["nginx: worker process"]),
            "nginx",
        );
        assert_eq!(view.names, ["nginx"]);
        assert_eq!(view.paths, ["/usr/sbin/nginx"]);
        // Nothing but the comm (a process gone before /proc was read, a kernel thread).
        let view = ExeView::new(None, None, &[], "kworker/0:1");
        assert!(p("kworker*").matches_view(&view));
        // Inline code is no script.
        let view = ExeView::new(
            None,
            Some("/usr/bin/python3"),
            &cmd(&["python3", "-c", "x"]),
            "",
        );
        assert_eq!(view.names, ["python3"]);
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        selection: SelectionArgs,
    }

    #[test]
    fn options_parse_and_bad_ones_are_explained() {
        let cli = Cli::try_parse_from([
            "t",
            "--exe",
            "srv-*",
            "--exe",
            "/usr/sbin/nginx",
            "--port",
            "8080",
            "--exclude-pid",
            "1",
            "--exclude-exe",
            "curl",
        ])
        .unwrap();
        assert_eq!(cli.selection.exes.len(), 2);
        assert_eq!(cli.selection.ports, [8080]);
        assert_eq!(cli.selection.k8s_log_dir, PathBuf::from("/var/log"));
        let err = Cli::try_parse_from(["t", "--exe", "py[thon"]).unwrap_err();
        assert!(err.to_string().contains("never closed"), "{err}");
        let err = Cli::try_parse_from(["t", "--exe", "bin/python"]).unwrap_err();
        assert!(err.to_string().contains("*/bin/python"), "{err}");
        assert!(Cli::try_parse_from(["t", "--port", "0"]).is_err());
        assert!(Cli::try_parse_from(["t", "--port", "65536"]).is_err());
    }

    #[test]
    fn rules_are_checked_and_judged() {
        let args = SelectionArgs {
            exes: vec![p("srv-*")],
            exclude_exes: vec![p("srv-beta")],
            ..Default::default()
        };
        assert_eq!(
            Selection::new(false, &[], &SelectionArgs::default()).unwrap_err(),
            SelectionError::Nothing
        );
        let contradiction = SelectionArgs {
            exclude_pids: vec![5],
            ..Default::default()
        };
        assert_eq!(
            Selection::new(false, &[5], &contradiction).unwrap_err(),
            SelectionError::Contradiction { pid: 5 }
        );
        let rules = Selection::new(false, &[], &args).unwrap();
        assert_eq!(
            rules.watch(),
            Watch {
                exec: true,
                ports: vec![],
                exclusions: true,
            }
        );
        let view = |name: &str| ExeView::new(Some(&format!("/x/{name}")), None, &[], name);
        assert!(matches!(
            rules.judge(&view("srv-alpha"), false, false),
            Verdict::Exe(_)
        ));
        assert!(matches!(
            rules.judge(&view("srv-beta"), false, false),
            Verdict::Exclude(_)
        ));
        // Exclusion wins over inheritance and ports; inheritance keeps a traced child traced.
        assert!(matches!(
            rules.judge(&view("srv-beta"), true, true),
            Verdict::Exclude(_)
        ));
        assert_eq!(rules.judge(&view("sh"), true, false), Verdict::Inherited);
        assert_eq!(rules.judge(&view("sh"), false, true), Verdict::Port);
        assert_eq!(rules.judge(&view("sh"), false, false), Verdict::Skip);
        let all = Selection::new(true, &[], &args).unwrap();
        assert_eq!(all.judge(&view("sh"), false, false), Verdict::All);
        assert!(matches!(
            all.judge(&view("srv-beta"), false, false),
            Verdict::Exclude(_)
        ));
    }

    #[test]
    fn descendants_of_this_process_include_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let found = descendants(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?}");
    }

    proptest! {
        #[test]
        fn parsing_and_matching_never_panic(pattern in ".{0,24}", text in ".{0,40}") {
            if let Ok(pattern) = ExePattern::parse(&pattern) {
                let _ = pattern.matches(&text);
            }
        }

        #[test]
        fn a_literal_name_matches_itself(name in "[a-zA-Z0-9._-]{1,20}") {
            let pattern = ExePattern::parse(&name).unwrap();
            prop_assert!(pattern.matches(&name));
            let longer = format!("{name}x");
            prop_assert!(!pattern.matches(&longer));
        }

        #[test]
        fn star_matches_any_suffix(prefix in "[a-z]{0,8}", suffix in ".{0,16}") {
            let pattern = ExePattern::parse(&format!("{prefix}*")).unwrap();
            let text = format!("{prefix}{suffix}");
            prop_assert!(pattern.matches(&text));
        }
    }
}
