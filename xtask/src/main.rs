//! Developer tasks. `cargo xtask run -- ARGS` and `cargo xtask test` are the two README
//! commands; both install what is missing first (see `setup`).
mod bench;
mod fuzz;
mod manifests;
mod setup;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tracer-agent developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (Debian's rustc with a BPF core, LLVM 22, bpf-linker) and the
    /// test peers. Every other task runs this first; it is quick once done.
    Setup,
    /// Build the agent (and, through its build script, the probes) in release mode.
    Build,
    /// Build, then run the agent as root with the given arguments,
    /// e.g. `cargo xtask run -- --pid 1234 --dump`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: formatting, clippy, unit tests, and the end-to-end tests that load the
    /// probes into this kernel and trace real processes (needs root).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for the test harness, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the agent's overhead (untraced and traced processes, against no agent and the
    /// probe floor) and print a Markdown table. Needs root; takes a few minutes.
    Bench(bench::BenchArgs),
    /// Run the cargo-fuzz targets in fuzz/ (HTTP/1, trace context...) one after another for a
    /// set time or number of executions each, and print executions and result per target.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.task {
        Task::Setup => setup::test_deps(&root),
        Task::Build => {
            setup::build_deps()?;
            build_agent(true)
        }
        Task::Run { args } => {
            setup::build_deps()?;
            build_agent(true)?;
            let agent = root.join("target/release/tracer-agent");
            let mut cmd = if setup::is_root() {
                Command::new(&agent)
            } else {
                eprintln!("xtask: the agent needs root; running it through sudo");
                let mut cmd = Command::new("sudo");
                cmd.arg(&agent);
                cmd
            };
            Err(cmd.args(args).exec()).context("starting the agent")
        }
        Task::Test { no_lint, args } => test(&root, no_lint, &args),
        Task::Bench(args) => bench::main(&root, args),
        Task::Fuzz(args) => fuzz::main(&root, args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command, failing with its exit status.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Whether a command runs and succeeds (output discarded).
pub fn command_ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn build_agent(release: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    eprintln!(
        "xtask: building tracer-agent ({})",
        if release { "release" } else { "debug" }
    );
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--package", "tracer-agent"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    eprintln!("xtask:   built in {:.0?}", start.elapsed());
    Ok(())
}

fn test(root: &Path, no_lint: bool, args: &[String]) -> anyhow::Result<()> {
    setup::test_deps(root)?;
    if !setup::is_root() {
        bail!("the end-to-end tests load eBPF probes: run `sudo -E cargo xtask test`");
    }
    let start = Instant::now();
    if !no_lint {
        eprintln!("xtask: cargo fmt --check");
        run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))
            .context("formatting differs: run `cargo fmt --all`")?;
        eprintln!("xtask: cargo clippy");
        run(Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    manifests::check(root)?;
    // One debug build of the agent, shared by every end-to-end test (they run the binary).
    build_agent(false)?;
    let agent = root.join("target/debug/tracer-agent");
    eprintln!("xtask: cargo test (unit and end-to-end)");
    run(Command::new("cargo")
        // Every failing test binary is reported, not just the first.
        .args(["test", "--workspace", "--no-fail-fast", "--"])
        .args(args)
        .env("TRACER_AGENT_BIN", &agent)
        .env("TRACER_E2E_VENV", setup::venv_dir(root)))?;
    eprintln!("xtask: all tests passed in {:.0?}", start.elapsed());
    Ok(())
}
