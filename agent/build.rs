//! Builds the kernel programs (ebpf-probes/kernel) for bpfel-unknown-none and hands the object to
//! the agent, which embeds it. The probes need Debian's compiler, which ships a prebuilt `core`
//! for the BPF target (see the README); `cargo xtask setup` installs it as the rustup toolchain
//! `debian-bpf`. Set TRACER_PROBES_OBJ to use a prebuilt object instead.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const TOOLCHAIN: &str = "debian-bpf";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR")?).join("tracer-probes");
    let probes = manifest_dir.join("../ebpf-probes/kernel");
    let common = manifest_dir.join("../ebpf-probes/common");
    println!("cargo:rerun-if-env-changed=TRACER_PROBES_OBJ");
    for path in [
        probes.join("src"),
        probes.join("Cargo.toml"),
        probes.join(".cargo/config.toml"),
        common.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if let Some(obj) = env::var_os("TRACER_PROBES_OBJ") {
        fs::copy(&obj, &out).with_context(|| format!("copying TRACER_PROBES_OBJ {obj:?}"))?;
        return Ok(());
    }
    let target_dir = manifest_dir.join("../target/ebpf");
    build_probes(&probes, &target_dir)?;
    let built = target_dir.join("bpfel-unknown-none/release/tracer-probes");
    fs::copy(&built, &out).with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}

fn build_probes(probes: &Path, target_dir: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        TOOLCHAIN,
        "cargo",
        "build",
        "--release",
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(probes)
    // aya-ebpf needs asm_experimental_arch on a stable compiler; scoped to that crate so
    // nothing switches to -Z build-std (there is no rust-src here).
    .env("RUSTC_BOOTSTRAP", "aya_ebpf");
    // The outer build's compiler and flags must not leak into the BPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let status = match cmd.status() {
        Ok(status) => status,
        Err(err) => bail!(
            "cannot run rustup to build the eBPF probes ({err}); run `cargo xtask setup` first"
        ),
    };
    if !status.success() {
        bail!(
            "building the eBPF probes failed ({status}). If the toolchain `{TOOLCHAIN}` or \
             bpf-linker is missing, run `cargo xtask setup` (installs Debian's BPF-capable rustc \
             and bpf-linker)"
        );
    }
    Ok(())
}
