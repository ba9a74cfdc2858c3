//! `cargo xtask fuzz`: runs the cargo-fuzz targets in fuzz/ one after another, each for a set
//! time or number of executions, and prints what each did.
//!
//! Only the stable toolchain is assumed: cargo-fuzz's `-Z` flags (sanitizer, coverage) are
//! allowed with `RUSTC_BOOTSTRAP=1`, scoped to the fuzz build. The targets link the agent
//! library but never load its probes, so an empty object stands in for them: no BPF toolchain,
//! and nothing is built under the main target/ directory.
use std::{
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::run;

/// cargo-fuzz from crates.io, pinned so runs are comparable.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const DEFAULT_SECONDS: u64 = 60;
/// One input running this long is a hang.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds per target (default 60).
    #[arg(long, conflicts_with = "runs")]
    seconds: Option<u64>,
    /// Executions per target, instead of a time.
    #[arg(long)]
    runs: Option<u64>,
    /// `address` (AddressSanitizer, the default) or `none` (about twice as many executions
    /// per second; the parsers are safe Rust, but their dependencies are not all).
    #[arg(long, value_enum, default_value_t = Sanitizer::Address)]
    sanitizer: Sanitizer,
    /// Targets to run (default: all of them, see fuzz/fuzz_targets).
    targets: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Sanitizer {
    Address,
    None,
}

impl Sanitizer {
    fn as_str(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::None => "none",
        }
    }
}

/// What one target's run did, from libFuzzer's final report.
struct Outcome {
    target: String,
    executions: Option<u64>,
    seconds: f64,
    coverage: Option<u64>,
    /// libFuzzer's corpus at the end: inputs kept (each adds coverage) and their size.
    corpus: Option<String>,
    /// None: no crash. Some: libFuzzer's artifact (the crashing input), if it wrote one.
    failure: Option<Failure>,
}

struct Failure {
    artifact: Option<String>,
    log: PathBuf,
}

pub fn main(root: &Path, args: FuzzArgs) -> anyhow::Result<()> {
    let fuzz_dir = root.join("fuzz");
    // One directory per sanitizer: switching does not rebuild everything.
    let target_dir = fuzz_dir.join("target").join(args.sanitizer.as_str());
    install_cargo_fuzz()?;
    fs::create_dir_all(target_dir.join("logs"))?;
    let no_probes = fuzz_dir.join("target").join("no-probes.o");
    if !no_probes.exists() {
        File::create(&no_probes).with_context(|| format!("creating {}", no_probes.display()))?;
    }
    let cargo_fuzz = |subcommand: &str| {
        let mut cmd = Command::new("cargo");
        cmd.args(["fuzz", subcommand, "--fuzz-dir"])
            .arg(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("TRACER_PROBES_OBJ", &no_probes);
        cmd
    };

    let all = list_targets(cargo_fuzz("list"))?;
    let targets = if args.targets.is_empty() {
        all
    } else {
        for target in &args.targets {
            if !all.contains(target) {
                bail!(
                    "no fuzz target {target}; the targets are: {}",
                    all.join(", ")
                );
            }
        }
        args.targets
    };

    let start = Instant::now();
    eprintln!(
        "xtask: building the fuzz targets (sanitizer {})",
        args.sanitizer.as_str()
    );
    let build_flags = ["--sanitizer", args.sanitizer.as_str(), "--target-dir"];
    run(cargo_fuzz("build").args(build_flags).arg(&target_dir))?;
    eprintln!("xtask:   built in {:.0?}", start.elapsed());

    let limit = match (args.runs, args.seconds) {
        (Some(runs), _) => format!("-runs={runs}"),
        (None, seconds) => format!("-max_total_time={}", seconds.unwrap_or(DEFAULT_SECONDS)),
    };
    let mut outcomes = Vec::new();
    for target in &targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let seeds = fuzz_dir.join("seeds").join(target);
        let dict = fuzz_dir.join("dicts").join(format!("{target}.dict"));
        let log = target_dir.join("logs").join(format!("{target}.log"));
        fs::create_dir_all(&corpus)?;
        eprintln!(
            "xtask: fuzzing {target} ({}; log {})",
            limit.trim_start_matches('-'),
            log.display()
        );
        let mut cmd = cargo_fuzz("run");
        cmd.args(build_flags).arg(&target_dir).arg(target);
        // New inputs go to the first directory; the committed seeds are only read.
        cmd.arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(&limit)
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg("-print_final_stats=1");
        if dict.is_file() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let status = cmd
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .stdin(Stdio::null())
            .status()
            .context("running cargo fuzz")?;
        let wall = started.elapsed().as_secs_f64();
        let text = fs::read_to_string(&log).unwrap_or_default();
        let outcome = Outcome {
            target: target.clone(),
            executions: final_stat(&text, "stat::number_of_executed_units:"),
            // libFuzzer's own count leaves out the build check and corpus loading.
            seconds: done_seconds(&text).unwrap_or(wall),
            coverage: status_field(&text, "cov:").and_then(|cov| cov.parse().ok()),
            corpus: status_field(&text, "corp:").map(str::to_owned),
            failure: (!status.success()).then(|| Failure {
                artifact: artifact(&text),
                log: log.clone(),
            }),
        };
        eprintln!("xtask:   {}", result_text(&outcome));
        outcomes.push(outcome);
    }

    println!("{}", table(&outcomes));
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for outcome in &failed {
        if let Some(Failure {
            artifact: Some(artifact),
            ..
        }) = &outcome.failure
        {
            eprintln!(
                "reproduce {}: RUSTC_BOOTSTRAP=1 TRACER_PROBES_OBJ={} cargo fuzz run --fuzz-dir \
                 fuzz --target-dir {} --sanitizer {} {} {artifact}",
                outcome.target,
                no_probes.display(),
                target_dir.display(),
                args.sanitizer.as_str(),
                outcome.target
            );
        }
    }
    bail!(
        "fuzz targets failed: {}",
        failed
            .iter()
            .map(|o| o.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn install_cargo_fuzz() -> anyhow::Result<()> {
    let version = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    if version == format!("cargo-fuzz {CARGO_FUZZ_VERSION}") {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
    .context("installing cargo-fuzz")
}

fn list_targets(mut cmd: Command) -> anyhow::Result<Vec<String>> {
    let out = cmd.output().context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect())
}

/// A `stat::name: value` line of `-print_final_stats=1`.
fn final_stat(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().parse().ok())
}

/// Seconds from libFuzzer's `Done N runs in S second(s)`.
fn done_seconds(log: &str) -> Option<f64> {
    log.lines().rev().find_map(|line| {
        let rest = line.strip_prefix("Done ")?;
        let (_, seconds) = rest.split_once(" runs in ")?;
        seconds.split_whitespace().next()?.parse().ok()
    })
}

/// A field of libFuzzer's last status line (`#N DONE cov: 1234 ft: ... corp: 1816/1324Kb`, or
/// the last `pulse` or `NEW` line if it stopped early).
fn status_field<'a>(log: &'a str, field: &str) -> Option<&'a str> {
    let line = log
        .lines()
        .rev()
        .find(|line| line.starts_with('#') && line.contains(field))?;
    let mut words = line.split_whitespace();
    words.find(|&word| word == field)?;
    words.next()
}

/// Where libFuzzer wrote the input that failed.
fn artifact(log: &str) -> Option<String> {
    log.lines().find_map(|line| {
        line.split_once("Test unit written to ")
            .map(|(_, path)| path.trim().to_owned())
    })
}

fn result_text(outcome: &Outcome) -> String {
    match &outcome.failure {
        None => "ok".to_owned(),
        Some(Failure {
            artifact: Some(artifact),
            ..
        }) => format!("FAILED, input saved as {artifact}"),
        Some(Failure { log, .. }) => format!("FAILED, see {}", log.display()),
    }
}

fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from(
        "| target | executions | seconds | executions/s | coverage | corpus (inputs/size) | \
         result |\n|---|---:|---:|---:|---:|---:|---|\n",
    );
    for o in outcomes {
        let executions = o.executions.map_or("?".to_owned(), |n| n.to_string());
        let rate = o
            .executions
            .map_or("?".to_owned(), |n| format!("{:.0}", n as f64 / o.seconds));
        let coverage = o.coverage.map_or("?".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "| {} | {executions} | {:.0} | {rate} | {coverage} | {} | {} |",
            o.target,
            o.seconds,
            o.corpus.as_deref().unwrap_or("?"),
            result_text(o)
        );
    }
    out
}
