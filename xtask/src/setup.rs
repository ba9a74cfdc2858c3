//! Installs what building and testing the agent needs on a fresh Debian 12 machine with only
//! rustup: Debian's Rust (its `core` for bpfel-unknown-none makes -Z build-std unnecessary),
//! LLVM 22 for bpf-linker, bpf-linker itself, and the test peers. Each step checks first and
//! is skipped when already done, so repeated runs cost a few process spawns.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{command_ok, run};

/// rustup name given to Debian's compiler (`rustup toolchain link debian-bpf /usr`).
pub const BPF_TOOLCHAIN: &str = "debian-bpf";

const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
];

/// Real peers the end-to-end tests trace (python3 and curl come with the machine image, but a
/// fresh one may lack them).
const TEST_PACKAGES: &[&str] = &[
    "curl",
    "python3",
    "python3-venv",
    "libcap2-bin",
    "iproute2",
    "nginx-light",
    "nodejs",
    "bpftool",
    // systemd-analyze, which checks deploy/tracer-agent.service (systemd need not run).
    "systemd",
];

/// The saturated web server and the load generator of `cargo xtask bench` (part C).
const BENCH_PACKAGES: &[&str] = &["nginx-light", "wrk"];

fn step(what: &str) -> Instant {
    eprintln!("xtask: {what}");
    Instant::now()
}

fn done(start: Instant) {
    eprintln!("xtask:   done in {:.0?}", start.elapsed());
}

fn missing_packages(packages: &[&str]) -> Vec<String> {
    packages
        .iter()
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(out, Ok(out) if String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        })
        .map(|pkg| (*pkg).to_owned())
        .collect()
}

fn apt_install(packages: &[String]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}. Install them as root: apt-get install -y {}",
            packages.join(" "),
            packages.join(" ")
        );
    }
    let start = step(&format!(
        "installing Debian packages: {} (about a minute)",
        packages.join(" ")
    ));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    done(start);
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn has_bpf_toolchain() -> bool {
    command_ok(Command::new("rustup").args(["run", BPF_TOOLCHAIN, "rustc", "--version"]))
        && Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists()
}

fn has_bpf_linker() -> bool {
    command_ok(Command::new("bpf-linker").arg("--version"))
}

/// Everything needed to build the probes and the agent.
pub fn build_deps() -> anyhow::Result<()> {
    apt_install(&missing_packages(BUILD_PACKAGES))?;
    if !has_bpf_linker() {
        let start = step("installing bpf-linker 0.13 against LLVM 22 (about a minute)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "0.13.0"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path))
        .context("installing bpf-linker")?;
        done(start);
    }
    if !has_bpf_toolchain() {
        let start = step("linking Debian's rustc as the rustup toolchain debian-bpf");
        run(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))?;
        done(start);
        if !has_bpf_toolchain() {
            bail!(
                "Debian's rustc with the bpfel-unknown-none core library is not usable; check \
                 that libstd-rust-web-dev-bpf is installed and /usr/bin/rustc works"
            );
        }
    }
    Ok(())
}

/// Build dependencies plus the programs the end-to-end tests run.
pub fn test_deps(root: &Path) -> anyhow::Result<()> {
    build_deps()?;
    apt_install(&missing_packages(TEST_PACKAGES))?;
    python_env(root)?;
    Ok(())
}

/// Where the tests' Python packages live (tests/requirements.txt); the tests find it through
/// TRACER_E2E_VENV.
pub fn venv_dir(root: &Path) -> PathBuf {
    root.join("target").join("e2e-venv")
}

/// Creates the virtual environment and installs tests/requirements.txt into it, unless the
/// same requirements are installed already.
fn python_env(root: &Path) -> anyhow::Result<()> {
    let venv = venv_dir(root);
    let requirements = root.join("tests").join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let stamp = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    let start = step("installing the tests' Python packages (tests/requirements.txt)");
    if !venv.join("bin").join("python").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "creating a Python virtual environment; on Debian's python3 it needs the \
             python3-venv package",
        )?;
    }
    run(Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements))
    .context("installing tests/requirements.txt from PyPI")?;
    std::fs::write(&stamp, wanted)?;
    done(start);
    Ok(())
}

/// Build dependencies plus nginx and wrk for the benchmark.
pub fn bench_deps() -> anyhow::Result<()> {
    build_deps()?;
    apt_install(&missing_packages(BENCH_PACKAGES))?;
    Ok(())
}
