//! Container and Kubernetes identity of a process, from `/proc/PID/cgroup`.
//!
//! Container runtimes and the kubelet encode the container id and the pod UID in the names of the
//! cgroups they create, so the values of the OpenTelemetry resource attributes `container.id` and
//! `k8s.pod.uid` can be read from `/proc/PID/cgroup` with no privilege beyond seeing the process
//! and no call to a runtime or the API server.
//!
//! Each line of the file is `hierarchy-id:controllers:path` (cgroup v1 has one line per
//! controller hierarchy, cgroup v2 a single `0::/path`, hybrid hosts both). Every line is parsed
//! and the most specific result wins: one with a container id over one without, then one with a
//! pod UID, then the deeper path. Paths are read segment by segment, outermost first:
//!
//! | segment                                               | gives                              |
//! |-------------------------------------------------------|------------------------------------|
//! | `kubepods-pod<uid_with_underscores>.slice`            | pod UID, QoS guaranteed (systemd)  |
//! | `kubepods-{burstable,besteffort}-pod<uid>.slice`      | pod UID, QoS (systemd)             |
//! | `kubepods/pod<uid>`                                   | pod UID, QoS guaranteed (cgroupfs) |
//! | `kubepods/{burstable,besteffort}/pod<uid>`            | pod UID, QoS (cgroupfs)            |
//! | `cri-containerd-<id>.scope`, `nerdctl-<id>.scope`     | container id, runtime containerd   |
//! | `crio-<id>.scope`, `crio-<id>`                        | container id, runtime cri-o        |
//! | `docker-<id>.scope`, `docker/<id>`                    | container id, runtime docker       |
//! | `libpod-<id>.scope`, `libpod_parent/libpod-<id>`      | container id, runtime podman       |
//! | `<pod slice>:cri-containerd:<id>` (runc's literal)    | pod UID, QoS, id, containerd       |
//! | `<id>` alone (cgroupfs drivers, `/../<id>`)           | container id, runtime unknown      |
//! | `crio-conmon-<id>.scope`, `libpod-conmon-<id>.scope`  | nothing: conmon, not the container |
//!
//! `<id>` is exactly 64 hex digits; `<uid>` is a UUID. So for example `0::/kubepods.slice/`
//! `kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`,
//! `3:memory:/kubepods/besteffort/pod<uid>/<id>`, `0::/system.slice/docker-<id>.scope`,
//! `0::/machine.slice/libpod-<id>.scope/container` and `12:pids:/docker/<id>` all give a container
//! id; `0::/init.scope`, `0::/user.slice/user-0.slice/session-1.scope` and
//! `0::/system.slice/nginx.service` give nothing.
//!
//! Nesting: any prefix is allowed (the kubelet's `--cgroup-root`, kind's `kubelet.slice`, a test
//! harness's own cgroup) and trailing segments without an id (`/init.scope`, `/container`) are
//! ignored. The innermost container id wins (docker-in-docker gives the inner container), and a
//! pod segment forgets any id above it, which belongs to an enclosing container such as a kind
//! node rather than to the pod.
//!
//! Paths are as seen from the reader's cgroup namespace: the agent should share the host's, or
//! paths of processes outside its namespace start with `/..` (still parsed, see above) and its own
//! is `/`.
//!
//! Not reported: static pods, whose kubelet-side UID is a 32-hex manifest hash rather than the
//! UUID of their mirror pod in the API, and ids that are not 64 hex (e.g. ECS Fargate's
//! `<task>-<n>`).

use std::fs;

/// What the cgroup path says about a process's container and pod. All `None` for a host process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// `container.id`: 64 lowercase hex digits.
    pub container_id: Option<String>,
    /// `k8s.pod.uid`: 8-4-4-4-12 lowercase hex with dashes.
    pub pod_uid: Option<String>,
    /// The runtime the cgroup name points to: "docker" | "containerd" | "cri-o" | "podman".
    /// Only set together with `container_id`, and `None` when the name does not tell (a bare id).
    pub runtime: Option<&'static str>,
    /// QoS class when the path says so: "guaranteed" | "burstable" | "besteffort".
    /// Only set together with `pod_uid`.
    pub qos: Option<&'static str>,
}

pub const DOCKER: &str = "docker";
pub const CONTAINERD: &str = "containerd";
pub const CRIO: &str = "cri-o";
pub const PODMAN: &str = "podman";

pub const GUARANTEED: &str = "guaranteed";
pub const BURSTABLE: &str = "burstable";
pub const BESTEFFORT: &str = "besteffort";

/// Parses the text of /proc/PID/cgroup (cgroup v1 and v2 lines: `hierarchy-id:controllers:path`).
///
/// Malformed lines are skipped; no input makes it panic.
pub fn parse(cgroup_file: &str) -> ContainerInfo {
    let mut best = ContainerInfo::default();
    let mut best_rank = (false, false, 0);
    for line in cgroup_file.lines() {
        let Some(path) = line_path(line) else {
            continue;
        };
        let (info, depth) = parse_path(path);
        let rank = (info.container_id.is_some(), info.pod_uid.is_some(), depth);
        // Strictly greater: on a tie the first line wins, so the result does not depend on how
        // many v1 hierarchies repeat the same path.
        if rank > best_rank {
            best = info;
            best_rank = rank;
        }
    }
    best
}

/// Reads /proc/PID/cgroup; a missing process or unreadable file gives the default (no error: a
/// host process simply has no container).
pub fn read(pid: u32) -> ContainerInfo {
    let path = format!("/proc/{pid}/cgroup");
    match fs::read(&path) {
        // Lossy: cgroup names are bytes; a stray invalid byte must not hide the rest of the file.
        Ok(bytes) => parse(&String::from_utf8_lossy(&bytes)),
        Err(err) => {
            log::debug!("no container identity for pid {pid}: reading {path}: {err}");
            ContainerInfo::default()
        }
    }
}

/// The path of one line, or `None` if the line is not `digits:controllers:/path`.
fn line_path(line: &str) -> Option<&str> {
    // At most 3 fields: the path itself may hold colons (`slice:cri-containerd:<id>`).
    let mut fields = line.splitn(3, ':');
    let hierarchy = fields.next()?;
    let _controllers = fields.next()?;
    let path = fields.next()?.trim_end();
    if hierarchy.is_empty() || !hierarchy.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The kernel marks a cgroup removed while the process still refers to it (a zombie).
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.starts_with('/').then_some(path)
}

/// Parses one cgroup path; also returns its depth in segments, for ranking lines.
fn parse_path(path: &str) -> (ContainerInfo, usize) {
    let mut walk = Walk::default();
    let mut depth = 0;
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        depth += 1;
        walk.step(segment);
    }
    (walk.info, depth)
}

/// State of a walk down one path, outermost segment first.
#[derive(Default)]
struct Walk<'a> {
    info: ContainerInfo,
    parent: &'a str,
    /// A cgroupfs `kubepods` segment was seen, or the path climbs out of the reader's cgroup
    /// namespace (`..`, ancestors unknown): only then is a bare `pod<uid>` taken as a pod.
    maybe_kubepods: bool,
    /// Below `containerd.service`, a bare id is a containerd container.
    under_containerd: bool,
}

impl<'a> Walk<'a> {
    fn step(&mut self, segment: &'a str) {
        match segment {
            "kubepods" | ".." => self.maybe_kubepods = true,
            "containerd.service" => self.under_containerd = true,
            _ => {}
        }
        let mut parts = segment.split(':');
        if let (Some(slice), Some(prefix), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            // runc's systemd cgroupsPath `slice:prefix:name`, used verbatim as a directory name
            // when the runtime is set up for systemd but its cgroups end up under cgroupfs.
            if let Some((uid, qos)) = systemd_pod(slice) {
                self.pod(uid, Some(qos));
            }
            if let Some(id) = hex_id(name)
                && !is_conmon(prefix)
            {
                self.container(id, prefix_runtime(prefix));
            }
        } else if let Some((uid, qos)) = systemd_pod(segment) {
            self.pod(uid, Some(qos));
        } else if let Some(uid) = self.cgroupfs_pod(segment) {
            let qos = match self.parent {
                "kubepods" => Some(GUARANTEED),
                "burstable" => Some(BURSTABLE),
                "besteffort" => Some(BESTEFFORT),
                _ => None,
            };
            self.pod(uid, qos);
        } else {
            // `.scope` is the systemd unit of a container; cgroupfs names have no suffix.
            let stem = segment.strip_suffix(".scope").unwrap_or(segment);
            if let Some(id) = hex_id(stem) {
                let runtime = match self.parent {
                    "docker" => Some(DOCKER),
                    "libpod_parent" => Some(PODMAN),
                    _ if self.under_containerd => Some(CONTAINERD),
                    _ => None,
                };
                self.container(id, runtime);
            } else if let Some((prefix, tail)) = stem.rsplit_once('-')
                && let Some(id) = hex_id(tail)
                && !is_conmon(prefix)
            {
                self.container(id, prefix_runtime(prefix));
            }
        }
        self.parent = segment;
    }

    fn pod(&mut self, uid: String, qos: Option<&'static str>) {
        self.info = ContainerInfo {
            pod_uid: Some(uid),
            qos,
            // An id above the pod is an enclosing container (a kind node), not the pod's.
            container_id: None,
            runtime: None,
        };
    }

    fn container(&mut self, id: String, runtime: Option<&'static str>) {
        self.info.container_id = Some(id);
        self.info.runtime = runtime;
    }

    /// cgroupfs driver: `pod<dashed uid>`.
    fn cgroupfs_pod(&self, segment: &str) -> Option<String> {
        if !self.maybe_kubepods {
            return None;
        }
        uuid(segment.strip_prefix("pod")?, b'-')
    }
}

/// systemd driver: `<...>kubepods[-burstable|-besteffort]-pod<uid with underscores>.slice`
/// (the kubelet turns each dash of the UID into `_` since `-` nests slices).
fn systemd_pod(segment: &str) -> Option<(String, &'static str)> {
    let stem = segment.strip_suffix(".slice")?;
    let (head, uid) = stem.rsplit_once("-pod")?;
    let qos = if ends_with_component(head, "kubepods") {
        GUARANTEED
    } else if ends_with_component(head, "kubepods-burstable") {
        BURSTABLE
    } else if ends_with_component(head, "kubepods-besteffort") {
        BESTEFFORT
    } else {
        return None;
    };
    Some((uuid(uid, b'_')?, qos))
}

/// `head` is `tail` or ends with `-tail` (kind prefixes its slices with `kubelet-`).
fn ends_with_component(head: &str, tail: &str) -> bool {
    head.strip_suffix(tail)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('-'))
}

/// The runtime named by the prefix of a `<prefix>-<id>` or `<slice>:<prefix>:<id>` cgroup name.
fn prefix_runtime(prefix: &str) -> Option<&'static str> {
    match prefix {
        "cri-containerd" | "containerd" | "nerdctl" => Some(CONTAINERD),
        "crio" => Some(CRIO),
        "docker" => Some(DOCKER),
        "libpod" => Some(PODMAN),
        _ => None,
    }
}

/// conmon (`crio-conmon-<id>`, `libpod-conmon-<id>`) monitors a container from outside it: the
/// id in its name is not the id of the container the process is in.
fn is_conmon(prefix: &str) -> bool {
    prefix.ends_with("conmon")
}

/// A 64-hex container id, lowercased.
fn hex_id(s: &str) -> Option<String> {
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

/// A UUID whose four separators are `sep`, as 8-4-4-4-12 lowercase with dashes.
fn uuid(s: &str, sep: u8) -> Option<String> {
    let bytes = s.as_bytes();
    let valid = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == sep,
            _ => b.is_ascii_hexdigit(),
        });
    valid.then(|| {
        bytes
            .iter()
            .map(|&b| {
                if b == sep {
                    '-'
                } else {
                    char::from(b.to_ascii_lowercase())
                }
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "3f2a1b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708";
    const ID2: &str = "aaaabbbbccccddddeeeeffff0000111122223333444455556666777788889999";
    const UID: &str = "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d";
    const UID_: &str = "1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d";
    /// Pod slices of UID under the systemd driver.
    const SD_BURSTABLE: &str = "/kubepods.slice/kubepods-burstable.slice/\
                                kubepods-burstable-pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d.slice";
    const SD_BESTEFFORT: &str = "/kubepods.slice/kubepods-besteffort.slice/\
                                 kubepods-besteffort-pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d.slice";

    /// A cgroup v1 file: every controller hierarchy shows `path`, as on a v1 host where every
    /// controller follows the same layout.
    fn v1(path: &str) -> String {
        [
            "12:pids",
            "11:hugetlb",
            "10:net_cls,net_prio",
            "9:perf_event",
            "8:freezer",
            "7:cpuset",
            "6:memory",
            "5:blkio",
            "4:devices",
            "3:cpu,cpuacct",
            "2:rdma",
            "1:name=systemd",
        ]
        .iter()
        .map(|h| format!("{h}:{path}\n"))
        .collect()
    }

    /// A cgroup v2 file.
    fn v2(path: &str) -> String {
        format!("0::{path}\n")
    }

    fn info(
        container_id: Option<&str>,
        pod_uid: Option<&str>,
        runtime: Option<&'static str>,
        qos: Option<&'static str>,
    ) -> ContainerInfo {
        ContainerInfo {
            container_id: container_id.map(str::to_owned),
            pod_uid: pod_uid.map(str::to_owned),
            runtime,
            qos,
        }
    }

    fn pod(id: Option<&str>, runtime: Option<&'static str>, qos: &'static str) -> ContainerInfo {
        info(id, Some(UID), runtime, Some(qos))
    }

    fn container(runtime: Option<&'static str>) -> ContainerInfo {
        info(Some(ID), None, runtime, None)
    }

    #[test]
    fn shapes() {
        let none = ContainerInfo::default();
        let rows: Vec<(&str, String, ContainerInfo)> = vec![
            // systemd driver, cgroup v2.
            (
                "systemd burstable containerd",
                v2(&format!("{SD_BURSTABLE}/cri-containerd-{ID}.scope")),
                pod(Some(ID), Some(CONTAINERD), BURSTABLE),
            ),
            (
                "systemd burstable cri-o",
                v2(&format!("{SD_BURSTABLE}/crio-{ID}.scope")),
                pod(Some(ID), Some(CRIO), BURSTABLE),
            ),
            (
                "systemd burstable cri-o, crun's container subgroup",
                v2(&format!("{SD_BURSTABLE}/crio-{ID}.scope/container")),
                pod(Some(ID), Some(CRIO), BURSTABLE),
            ),
            (
                "systemd burstable docker",
                v2(&format!("{SD_BURSTABLE}/docker-{ID}.scope")),
                pod(Some(ID), Some(DOCKER), BURSTABLE),
            ),
            (
                "systemd guaranteed",
                v2(&format!(
                    "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
                )),
                pod(Some(ID), Some(CONTAINERD), GUARANTEED),
            ),
            (
                "systemd besteffort (the test harness's shape)",
                v2(&format!("{SD_BESTEFFORT}/cri-containerd-{ID}.scope")),
                pod(Some(ID), Some(CONTAINERD), BESTEFFORT),
            ),
            (
                "systemd besteffort nested below another cgroup",
                v2(&format!(
                    "/tracer-test{SD_BESTEFFORT}/cri-containerd-{ID}.scope"
                )),
                pod(Some(ID), Some(CONTAINERD), BESTEFFORT),
            ),
            (
                "kind: kubelet.slice root, uppercase id",
                v2(&format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                     kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{}.scope",
                    ID.to_ascii_uppercase()
                )),
                pod(Some(ID), Some(CONTAINERD), BESTEFFORT),
            ),
            (
                "systemd v1 hierarchies",
                v1(&format!("{SD_BURSTABLE}/docker-{ID}.scope")),
                pod(Some(ID), Some(DOCKER), BURSTABLE),
            ),
            (
                "pod slice only (no container)",
                v2(SD_BURSTABLE),
                pod(None, None, BURSTABLE),
            ),
            (
                "cri-o conmon: pod, no container",
                v2(&format!("{SD_BURSTABLE}/crio-conmon-{ID}.scope")),
                pod(None, None, BURSTABLE),
            ),
            (
                "runc slice:prefix:name under containerd.service",
                v1(&format!(
                    "/system.slice/containerd.service/\
                     kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"
                )),
                pod(Some(ID), Some(CONTAINERD), BESTEFFORT),
            ),
            // cgroupfs driver, cgroup v1 and v2.
            (
                "cgroupfs burstable v1",
                v1(&format!("/kubepods/burstable/pod{UID}/{ID}")),
                pod(Some(ID), None, BURSTABLE),
            ),
            (
                "cgroupfs guaranteed v2",
                v2(&format!("/kubepods/pod{UID}/{ID}")),
                pod(Some(ID), None, GUARANTEED),
            ),
            (
                "cgroupfs besteffort v1",
                v1(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
                pod(Some(ID), None, BESTEFFORT),
            ),
            (
                "cgroupfs cri-o",
                v1(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}")),
                pod(Some(ID), Some(CRIO), BESTEFFORT),
            ),
            (
                "cgroupfs pod uid in uppercase",
                v2(&format!(
                    "/kubepods/burstable/pod{}/{ID}",
                    UID.to_ascii_uppercase()
                )),
                pod(Some(ID), None, BURSTABLE),
            ),
            (
                "kind node (docker) running a cgroupfs pod: the pod's container wins",
                v1(&format!("/docker/{ID2}/kubepods/burstable/pod{UID}/{ID}")),
                pod(Some(ID), None, BURSTABLE),
            ),
            (
                "kind node process in the pod cgroup: the node's id is not the pod's",
                v1(&format!("/docker/{ID2}/kubepods/burstable/pod{UID}")),
                pod(None, None, BURSTABLE),
            ),
            // Plain containers.
            (
                "docker v1",
                v1(&format!("/docker/{ID}")),
                container(Some(DOCKER)),
            ),
            (
                "docker v2 systemd",
                v2(&format!("/system.slice/docker-{ID}.scope")),
                container(Some(DOCKER)),
            ),
            (
                "docker v2 with systemd inside: init.scope",
                v2(&format!("/system.slice/docker-{ID}.scope/init.scope")),
                container(Some(DOCKER)),
            ),
            (
                "docker-in-docker: the inner container",
                v1(&format!("/docker/{ID2}/docker/{ID}")),
                container(Some(DOCKER)),
            ),
            (
                "docker-in-docker on systemd",
                v2(&format!("/system.slice/docker-{ID2}.scope/docker/{ID}")),
                container(Some(DOCKER)),
            ),
            (
                "podman",
                v2(&format!("/machine.slice/libpod-{ID}.scope")),
                container(Some(PODMAN)),
            ),
            (
                "podman with crun's container subgroup",
                v2(&format!("/machine.slice/libpod-{ID}.scope/container")),
                container(Some(PODMAN)),
            ),
            (
                "podman pod: the pod slice's id is not a container's",
                v2(&format!(
                    "/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope/container"
                )),
                container(Some(PODMAN)),
            ),
            (
                "rootless podman",
                v2(&format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/\
                     libpod-{ID}.scope/container"
                )),
                container(Some(PODMAN)),
            ),
            (
                "podman cgroupfs",
                v1(&format!("/libpod_parent/libpod-{ID}")),
                container(Some(PODMAN)),
            ),
            (
                "podman conmon",
                v2(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
                none.clone(),
            ),
            (
                "nerdctl",
                v2(&format!("/system.slice/nerdctl-{ID}.scope")),
                container(Some(CONTAINERD)),
            ),
            (
                "containerd without k8s, under containerd.service",
                v2(&format!("/system.slice/containerd.service/default/{ID}")),
                container(Some(CONTAINERD)),
            ),
            (
                "containerd.service itself (the shims)",
                v2("/system.slice/containerd.service"),
                none.clone(),
            ),
            (
                "ctr with cgroupfs: namespace/id",
                v1(&format!("/default/{ID}")),
                container(None),
            ),
            (
                "outside the reader's cgroup namespace",
                v2(&format!("/../{ID}")),
                container(None),
            ),
            (
                "outside the reader's cgroup namespace, cgroupfs pod",
                v2(&format!("/../../besteffort/pod{UID}/{ID}")),
                pod(Some(ID), None, BESTEFFORT),
            ),
            (
                "zombie in a removed cgroup",
                v2(&format!("/system.slice/docker-{ID}.scope (deleted)")),
                container(Some(DOCKER)),
            ),
            // Hybrid: v1 controllers at the root, the path only on the systemd lines.
            (
                "hybrid, the path on one line only",
                format!(
                    "{}1:name=systemd:/system.slice/docker-{ID}.scope\n\
                     0::/system.slice/docker-{ID}.scope\n",
                    v1("/")
                        .lines()
                        .take(11)
                        .map(|l| format!("{l}\n"))
                        .collect::<String>()
                ),
                container(Some(DOCKER)),
            ),
            (
                "lines disagree: the one with the pod and container wins",
                format!("0::/system.slice/docker-{ID2}.scope\n0::/kubepods/pod{UID}/{ID}\n"),
                pod(Some(ID), None, GUARANTEED),
            ),
            (
                "lines equally specific: the first wins",
                format!("3:cpu:/docker/{ID}\n0::/docker/{ID2}\n"),
                container(Some(DOCKER)),
            ),
            // Not containers.
            (
                "session",
                v2("/user.slice/user-0.slice/session-1.scope"),
                none.clone(),
            ),
            ("init", v2("/init.scope"), none.clone()),
            ("service", v2("/system.slice/nginx.service"), none.clone()),
            ("root v2", v2("/"), none.clone()),
            ("root v1", v1("/"), none.clone()),
            (
                "32-hex sandbox id is not a container id",
                format!(
                    "4:memory:/process_api/189f7b6dffd90db6b01738f987586e4a\n{}",
                    v2("/")
                ),
                none.clone(),
            ),
            (
                "63 and 65 hex digits",
                v2(&format!("/docker/{}/{ID}0", &ID[1..])),
                none.clone(),
            ),
            (
                "static pod: 32-hex UID is not a UUID",
                v2(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/\
                     kubepods-burstable-pod36b6d6be73b1065af369b3985edafa09.slice/\
                     cri-containerd-{ID}.scope"
                )),
                container(Some(CONTAINERD)),
            ),
            (
                "pod<uid> outside kubepods is not a pod",
                v2(&format!("/foo/pod{UID}/{ID}")),
                container(None),
            ),
            (
                "pod slice without kubepods is not a pod",
                v2(&format!("/machine.slice/machine-pod{UID_}.slice")),
                none.clone(),
            ),
            (
                "malformed lines are skipped",
                format!(
                    "garbage\nx::/docker/{ID2}\n0:/docker/{ID2}\n1:cpu:docker/{ID2}\n\n\
                     0::/docker/{ID}\n"
                ),
                container(Some(DOCKER)),
            ),
            ("empty file", String::new(), none.clone()),
        ];
        for (name, file, want) in rows {
            assert_eq!(parse(&file), want, "{name}:\n{file}");
        }
    }

    #[test]
    fn crlf_and_trailing_space() {
        let file = format!("0::/system.slice/docker-{ID}.scope \r\n");
        assert_eq!(parse(&file), container(Some(DOCKER)));
    }

    #[test]
    fn read_current_process() {
        // Whatever this test runs in (host, container, CI sandbox), it must not panic and must
        // return well-formed values.
        let info = read(std::process::id());
        check_invariants(&info);
    }

    #[test]
    fn read_missing_process() {
        // Beyond the kernel's pid_max (at most 2^22), so never a live process.
        assert_eq!(read(u32::MAX), ContainerInfo::default());
    }

    fn check_invariants(info: &ContainerInfo) {
        if let Some(id) = &info.container_id {
            assert_eq!(id.len(), 64, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        } else {
            assert_eq!(info.runtime, None);
        }
        if let Some(uid) = &info.pod_uid {
            assert_eq!(uuid(uid, b'-').as_ref(), Some(uid), "{uid}");
        } else {
            assert_eq!(info.qos, None);
        }
    }

    /// Segments that exercise the parser: real names, near misses, and noise.
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("kubepods".to_owned()),
            Just("kubepods.slice".to_owned()),
            Just("burstable".to_owned()),
            Just("besteffort".to_owned()),
            Just("docker".to_owned()),
            Just("..".to_owned()),
            Just("containerd.service".to_owned()),
            Just(format!("pod{UID}")),
            Just(format!("kubepods-burstable-pod{UID_}.slice")),
            Just(format!("cri-containerd-{ID}.scope")),
            Just(format!("crio-conmon-{ID}.scope")),
            Just(format!("kubepods-pod{UID_}.slice:cri-containerd:{ID}")),
            Just(ID.to_owned()),
            "[0-9a-fA-F_:.-]{0,70}",
            "(pod|crio-|docker-|kubepods-pod)?[0-9a-fA-F_-]{30,66}(\\.scope|\\.slice)?",
            ".{0,20}",
        ]
    }

    fn cgroup_file() -> impl Strategy<Value = String> {
        let line = (
            "[0-9]{0,2}|x",
            "[a-z,=_]{0,12}",
            prop::collection::vec(segment(), 0..8),
        )
            .prop_map(|(h, c, segs)| format!("{h}:{c}:/{}", segs.join("/")));
        prop::collection::vec(line, 0..6).prop_map(|lines| lines.join("\n"))
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".*") {
            check_invariants(&parse(&text));
        }

        #[test]
        fn cgroup_like_text_never_panics(text in cgroup_file()) {
            check_invariants(&parse(&text));
        }

        #[test]
        fn pod_path_parses_below_any_prefix(
            prefix in prop::collection::vec("[a-z.@_-]{1,12}", 0..4)
        ) {
            let prefix: String = prefix.iter().map(|s| format!("/{s}")).collect();
            let file = v2(&format!(
                "{prefix}{SD_BESTEFFORT}/cri-containerd-{ID}.scope"
            ));
            prop_assert_eq!(parse(&file), pod(Some(ID), Some(CONTAINERD), BESTEFFORT));
        }
    }
}
