//! The Linux capabilities the agent needs, checked before anything is loaded so that a missing
//! one is named at once rather than surfacing later as EPERM from some syscall, or as spans
//! quietly missing their process attributes.
//!
//! [`CAPABILITIES`] is the one list: the DaemonSet and the systemd unit in deploy/ grant exactly
//! these, and tests/tests/capabilities.rs checks that they agree, that the agent traces with
//! these alone (as root with the rest dropped, and as another user with ambient capabilities),
//! and that it refuses to start without any one of them. The set was found by experiment on
//! kernel 6.18: each one missing makes something fail (see each `why`); nothing else is needed
//! (no CAP_SYS_ADMIN when tracefs is mounted, no CAP_NET_ADMIN, and no CAP_IPC_LOCK or
//! CAP_SYS_RESOURCE since BPF memory is charged to the cgroup rather than RLIMIT_MEMLOCK).

use std::fmt;

/// A capability the agent needs, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// As capabilities(7) spells it, e.g. `CAP_BPF`.
    pub name: &'static str,
    /// Its bit in the capability sets (linux/capability.h).
    pub bit: u32,
    /// Whether CAP_SYS_ADMIN stands in for it: the kernel still accepts it for BPF and perf
    /// events, for programs older than CAP_BPF and CAP_PERFMON (Linux 5.8).
    pub sys_admin_suffices: bool,
    /// What fails without it.
    pub why: &'static str,
}

const CAP_SYS_ADMIN_BIT: u32 = 21;

/// Every capability the agent needs; root has them all.
pub const CAPABILITIES: &[Capability] = &[
    Capability {
        name: "CAP_BPF",
        bit: 39,
        sys_admin_suffices: true,
        why: "to create the probes' maps and load the probes",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: 38,
        sys_admin_suffices: true,
        why: "to load tracing programs and attach them to tracepoints",
    },
    Capability {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        sys_admin_suffices: false,
        why: "to read /proc/PID/exe, environ and fd of processes with other credentials",
    },
    Capability {
        name: "CAP_DAC_READ_SEARCH",
        bit: 2,
        sys_admin_suffices: false,
        why: "to open /proc/PID/environ and /proc/PID/fd of other users' processes, and \
              tracefs when not running as root",
    },
];

/// The agent lacks some of [`CAPABILITIES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the agent needs root or the capabilities {all}; it lacks {missing}. Run it with sudo, or \
     grant all of them (README, \"Deploying\")",
    all = names(CAPABILITIES),
    missing = Explained(&self.missing)
)]
pub struct MissingCapabilities {
    pub missing: Vec<Capability>,
}

/// Checks this process's effective capabilities.
pub fn check() -> Result<(), MissingCapabilities> {
    // Unreadable status (no /proc?) counts as no capabilities: the error then names them all.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    check_effective(effective_set(&status).unwrap_or(0))
}

/// The `CapEff:` mask of a /proc/PID/status text.
fn effective_set(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn check_effective(effective: u64) -> Result<(), MissingCapabilities> {
    let has = |bit: u32| effective & (1 << bit) != 0;
    let missing: Vec<Capability> = CAPABILITIES
        .iter()
        .filter(|cap| !(has(cap.bit) || (cap.sys_admin_suffices && has(CAP_SYS_ADMIN_BIT))))
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities { missing })
    }
}

/// `A, B and C`.
fn names(caps: &[Capability]) -> String {
    let names: Vec<&str> = caps.iter().map(|cap| cap.name).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// `A (why); B (why)`.
struct Explained<'a>(&'a [Capability]);

impl fmt::Display for Explained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, cap) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{} ({})", cap.name, cap.why)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(names: &[&str]) -> u64 {
        names
            .iter()
            .map(|name| {
                let cap = CAPABILITIES.iter().find(|cap| cap.name == *name).unwrap();
                1u64 << cap.bit
            })
            .fold(0, |a, b| a | b)
    }

    fn missing(effective: u64) -> Vec<&'static str> {
        match check_effective(effective) {
            Ok(()) => Vec::new(),
            Err(err) => err.missing.iter().map(|cap| cap.name).collect(),
        }
    }

    #[test]
    fn root_and_exactly_the_list_pass() {
        assert_eq!(missing(u64::MAX), Vec::<&str>::new());
        assert_eq!(missing((1 << 41) - 1), Vec::<&str>::new());
        let all: Vec<&str> = CAPABILITIES.iter().map(|cap| cap.name).collect();
        assert_eq!(missing(mask(&all)), Vec::<&str>::new());
    }

    #[test]
    fn each_missing_capability_is_named_with_its_reason() {
        let all: Vec<&str> = CAPABILITIES.iter().map(|cap| cap.name).collect();
        for cap in CAPABILITIES {
            let rest: Vec<&str> = all.iter().copied().filter(|n| *n != cap.name).collect();
            let err = check_effective(mask(&rest)).unwrap_err();
            assert_eq!(err.missing, vec![*cap]);
            let text = err.to_string();
            assert!(
                text.contains(&format!("it lacks {} ({}).", cap.name, cap.why)),
                "{text}"
            );
            assert!(text.contains("needs root"), "{text}");
        }
        assert_eq!(missing(0), all);
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_only() {
        let sys_admin = 1 << CAP_SYS_ADMIN_BIT;
        assert_eq!(
            missing(sys_admin | mask(&["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"])),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing(sys_admin),
            vec!["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
        );
    }

    #[test]
    fn effective_set_is_read_from_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000000c000080004\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(effective_set(status), Some(0xc0_0008_0004));
        assert_eq!(check_effective(0xc0_0008_0004), Ok(()));
        assert_eq!(effective_set("CapEff:\tzz\n"), None);
        assert_eq!(effective_set(""), None);
    }
}
