//! Validates the deployment files in deploy/: the Kubernetes manifests against the API schemas
//! of the oldest and newest Kubernetes they are meant for (kubernetes-validate, from the tests'
//! virtualenv), and the systemd unit with `systemd-analyze verify`. That their capabilities
//! equal the agent's is checked by tests/tests/capabilities.rs.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{command_ok, run, setup};

/// The oldest Kubernetes the manifests support (securityContext.appArmorProfile is 1.30) and
/// the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

const MANIFESTS: &[&str] = &["deploy/kubernetes.yaml"];
const UNIT: &str = "deploy/tracer-agent.service";

pub fn check(root: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    eprintln!("xtask: validating deploy/ (Kubernetes schemas, systemd unit)");
    let validate = kubernetes_validate(root)?;
    for manifest in MANIFESTS {
        for version in KUBERNETES_VERSIONS {
            run(Command::new(&validate)
                .args(["--strict", "--quiet", "--kubernetes-version", version])
                .arg(root.join(manifest)))
            .with_context(|| {
                format!(
                    "{manifest} does not validate against the Kubernetes {version} API (the error \
                     above names the field): fix the manifest"
                )
            })?;
        }
    }
    verify_unit(root)?;
    eprintln!("xtask:   deploy/ valid in {:.0?}", start.elapsed());
    Ok(())
}

/// kubernetes-validate from the tests' virtualenv (pinned in tests/requirements.txt and
/// installed by `setup::test_deps`).
fn kubernetes_validate(root: &Path) -> anyhow::Result<PathBuf> {
    let bin = setup::venv_dir(root)
        .join("bin")
        .join("kubernetes-validate");
    if !command_ok(Command::new(&bin).arg("--version")) {
        bail!(
            "{} is missing: `cargo xtask setup` installs tests/requirements.txt, which pins \
             kubernetes-validate, from PyPI (check that pypi.org is reachable)",
            bin.display()
        );
    }
    Ok(bin)
}

/// `systemd-analyze verify` on the unit, with ExecStart pointed at an executable that exists
/// here (it checks that), failing on warnings too (it exits 0 on unknown keys).
fn verify_unit(root: &Path) -> anyhow::Result<()> {
    if !command_ok(Command::new("systemd-analyze").arg("--version")) {
        bail!(
            "systemd-analyze is needed to check {UNIT}: install systemd (apt-get install -y \
             systemd; it need not be running)"
        );
    }
    let unit =
        std::fs::read_to_string(root.join(UNIT)).with_context(|| format!("reading {UNIT}"))?;
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let exec_starts = unit.lines().filter(|l| l.starts_with("ExecStart=")).count();
    if exec_starts != 1 {
        bail!("{UNIT} has {exec_starts} ExecStart= lines; expected one");
    }
    let copy: String = unit
        .lines()
        .map(|line| match line.strip_prefix("ExecStart=") {
            Some(command) => {
                let args = command.split_once(' ').map_or("", |(_, args)| args);
                format!("ExecStart={} {args}\n", exe.display())
            }
            None => format!("{line}\n"),
        })
        .collect();
    let dir = root.join("target/xtask-unit");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tracer-agent.service");
    std::fs::write(&path, copy)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .context("running systemd-analyze verify")?;
    let complaints = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() || !complaints.is_empty() {
        bail!(
            "systemd-analyze verify rejects {UNIT} ({}):\n{complaints}\nfix the unit",
            out.status
        );
    }
    Ok(())
}
