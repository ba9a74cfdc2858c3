//! The OpenTelemetry resource of each traced process: who the spans are about.
//!
//! service.name, in order of precedence:
//! 1. the process's own `OTEL_SERVICE_NAME` (from /proc/PID/environ);
//! 2. `service.name` in the process's own `OTEL_RESOURCE_ATTRIBUTES`;
//! 3. the agent's `OTEL_SERVICE_NAME` (handy with a single `--pid`);
//! 4. derived from the command line: the script or module an interpreter runs
//!    (`python3 app.py` -> `app`, `python3 -m http.server` -> `http.server`,
//!    `node server.js` -> `server`), else the executable name (`nginx`).
//!
//! The agent's own `OTEL_RESOURCE_ATTRIBUTES` are added to every process's resource, below the
//! process's own attributes.
//!
//! Where each attribute comes from (all read once per process, with no API server access):
//!
//! | attribute | source |
//! |---|---|
//! | `service.name` | the rules above |
//! | `process.pid`, `process.executable.name`/`path` | the probes, `/proc/PID/exe` |
//! | `container.id`, `k8s.pod.uid` | `/proc/PID/cgroup` (see `cgroup`) |
//! | `k8s.namespace.name`, `k8s.pod.name`, `k8s.container.name` | the kubelet's log directory: `containers/<pod>_<namespace>_<container>-<container.id>.log`, else (no container name) `pods/<namespace>_<pod>_<k8s.pod.uid>/` |
//! | anything in `OTEL_RESOURCE_ATTRIBUTES` | the process's environment, then the agent's |
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use crate::cgroup::ContainerInfo;

/// What the agent knows about one process, read once from /proc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub exe_name: String,
    pub exe_path: String,
    pub cmdline: Vec<String>,
    /// OTEL_* variables from the process's environment.
    pub otel_env: HashMap<String, String>,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names
    /// this process instance uniquely.
    pub start_ticks: u64,
    /// Container and pod, from /proc/PID/cgroup.
    pub container: ContainerInfo,
}

impl ProcessInfo {
    pub fn read(pid: u32) -> Self {
        let proc_dir = format!("/proc/{pid}");
        let exe_path = std::fs::read_link(format!("{proc_dir}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cmdline = split_nul(&std::fs::read(format!("{proc_dir}/cmdline")).unwrap_or_default());
        let exe_name = Path::new(&exe_path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| {
                std::fs::read_to_string(format!("{proc_dir}/comm"))
                    .ok()
                    .map(|c| c.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let otel_env = split_nul(&std::fs::read(format!("{proc_dir}/environ")).unwrap_or_default())
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                k.starts_with("OTEL_").then(|| (k.to_owned(), v.to_owned()))
            })
            .collect();
        let start_ticks = std::fs::read_to_string(format!("{proc_dir}/stat"))
            .ok()
            .and_then(|stat| {
                // Fields after the parenthesised comm, which may contain spaces.
                let rest = &stat[stat.rfind(')')? + 2..];
                rest.split(' ').nth(19)?.parse().ok()
            })
            .unwrap_or(0);
        Self {
            pid,
            exe_name,
            exe_path,
            cmdline,
            otel_env,
            start_ticks,
            container: crate::cgroup::read(pid),
        }
    }
}

fn split_nul(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// Parses `key=value,key2=value2` (OTEL_RESOURCE_ATTRIBUTES), percent-decoding values as the
/// specification asks; malformed members are skipped.
pub fn parse_resource_attributes(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|member| {
            let (k, v) = member.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            Some((k.to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

const INTERPRETERS: &[(&str, &str)] = &[
    ("python", "python"),
    ("node", "nodejs"),
    ("ruby", "ruby"),
    ("perl", "perl"),
    ("php", "php"),
    ("java", "java"),
    ("dotnet", "dotnet"),
];

/// The language runtime of a process, as telemetry.sdk.language names it, when it is known.
fn language(exe_name: &str) -> Option<&'static str> {
    INTERPRETERS
        .iter()
        .find(|(prefix, _)| exe_name.starts_with(prefix))
        .map(|(_, lang)| *lang)
        .filter(|lang| *lang != "perl")
}

/// What an interpreter runs, from its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script<'a> {
    /// A script file, as given (`app.py`, `/srv/app.py`).
    File(&'a str),
    /// A module (`python3 -m http.server`).
    Module(&'a str),
}

/// The script or module run by `exe_name` when it is a known interpreter: the first argument
/// that is not an option, or the one after `-m`. None for inline code (`-c`, `-e`).
pub fn interpreter_script<'a>(exe_name: &str, cmdline: &'a [String]) -> Option<Script<'a>> {
    let is_interpreter = INTERPRETERS
        .iter()
        .any(|(prefix, _)| exe_name.starts_with(prefix));
    if !is_interpreter {
        return None;
    }
    let mut args = cmdline.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-m" {
            return args.next().map(|module| Script::Module(module));
        } else if arg == "-c" || arg == "-e" {
            return None;
        } else if !arg.starts_with('-') {
            return Some(Script::File(arg));
        }
    }
    None
}

/// The service name derived from the command line (rule 4 above).
pub fn derived_service_name(info: &ProcessInfo) -> String {
    match interpreter_script(&info.exe_name, &info.cmdline) {
        Some(Script::Module(module)) => module.to_owned(),
        Some(Script::File(file)) => match Path::new(file).file_stem() {
            Some(stem) => stem.to_string_lossy().into_owned(),
            None => info.exe_name.clone(),
        },
        None => info.exe_name.clone(),
    }
}

/// Kubernetes names of a container, as the node's kubelet log directory shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    /// Known only from the container's log link, which names its container id.
    pub container: Option<String>,
}

/// The kubelet's log directory (`/var/log` on a node): readable without privileges beyond the
/// files, unlike the kubelet or runtime APIs. The kubelet names what it writes there:
/// * `containers/<pod>_<namespace>_<container>-<container id>.log`, a link to
/// * `pods/<namespace>_<pod>_<pod uid>/<container>/<restart>.log`.
///
/// Names cannot hold `_` (they are DNS labels and subdomains), so the split is unambiguous.
#[derive(Clone, Debug)]
pub struct KubeletLogs {
    dir: PathBuf,
}

impl KubeletLogs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Names for a process with this container identity: by container id (all three names),
    /// else by pod UID (namespace and pod). None when the directory does not know them.
    pub fn names(&self, container: &ContainerInfo) -> Option<PodNames> {
        let uid = container.pod_uid.as_deref();
        if let Some(id) = &container.container_id
            && let Some(names) = self.by_container(id, uid)
        {
            return Some(names);
        }
        self.by_pod(uid?)
    }

    fn by_container(&self, id: &str, uid: Option<&str>) -> Option<PodNames> {
        let suffix = format!("-{id}.log");
        for entry in std::fs::read_dir(self.dir.join("containers"))
            .ok()?
            .flatten()
        {
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(&suffix)) else {
                continue;
            };
            let mut parts = stem.split('_');
            let (Some(pod), Some(namespace), Some(container), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if ![pod, namespace, container].iter().all(|n| is_k8s_name(n)) {
                continue;
            }
            // The link names the pod's directory, UID included: it must be this pod's.
            if let Some(uid) = uid
                && let Ok(target) = std::fs::read_link(entry.path())
            {
                let pod_dir = format!("{namespace}_{pod}_{uid}");
                if !target.iter().any(|c| c.to_str() == Some(pod_dir.as_str())) {
                    continue;
                }
            }
            return Some(PodNames {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                container: Some(container.to_owned()),
            });
        }
        None
    }

    fn by_pod(&self, uid: &str) -> Option<PodNames> {
        let suffix = format!("_{uid}");
        for entry in std::fs::read_dir(self.dir.join("pods")).ok()?.flatten() {
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(&suffix)) else {
                continue;
            };
            if let Some((namespace, pod)) = stem.split_once('_')
                && is_k8s_name(namespace)
                && is_k8s_name(pod)
            {
                return Some(PodNames {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    container: None,
                });
            }
        }
        None
    }
}

/// A DNS label or subdomain, as Kubernetes names are.
fn is_k8s_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Builds resources; knows the agent-wide settings.
pub struct ResourceBuilder {
    host_name: String,
    agent_service_name: Option<String>,
    agent_attributes: Vec<(String, String)>,
    kubelet_logs: Option<KubeletLogs>,
}

impl ResourceBuilder {
    pub fn from_env() -> Self {
        Self::new(
            std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|s| !s.is_empty()),
            std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                .map(|v| parse_resource_attributes(&v))
                .unwrap_or_default(),
        )
    }

    pub fn new(
        agent_service_name: Option<String>,
        agent_attributes: Vec<(String, String)>,
    ) -> Self {
        // The agent's own OTEL_RESOURCE_ATTRIBUTES may name the host: in a pod, gethostname
        // gives the agent's pod name, so the DaemonSet passes the node's name this way.
        let host_name = agent_attributes
            .iter()
            .rev()
            .find(|(k, v)| k == "host.name" && !v.is_empty())
            .map_or_else(host_name, |(_, v)| v.clone());
        Self {
            host_name,
            agent_service_name,
            agent_attributes,
            kubelet_logs: None,
        }
    }

    /// Takes Kubernetes names from this kubelet log directory (`--k8s-log-dir`).
    pub fn with_kubelet_logs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.kubelet_logs = Some(KubeletLogs::new(dir));
        self
    }

    pub fn build(&self, info: &ProcessInfo) -> Arc<Resource> {
        let own_attributes = info
            .otel_env
            .get("OTEL_RESOURCE_ATTRIBUTES")
            .map(|v| parse_resource_attributes(v))
            .unwrap_or_default();
        let service_name = info
            .otel_env
            .get("OTEL_SERVICE_NAME")
            .filter(|s| !s.is_empty())
            .cloned()
            .or_else(|| {
                own_attributes
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .or_else(|| self.agent_service_name.clone())
            .unwrap_or_else(|| derived_service_name(info));

        // Later entries win: agent-wide, then the process's own, then what we observed.
        let mut attributes: Vec<(String, opentelemetry::Value)> = Vec::new();
        let mut set = |key: &str, value: opentelemetry::Value| {
            attributes.retain(|(k, _)| k != key);
            attributes.push((key.to_owned(), value));
        };
        for (k, v) in self.agent_attributes.iter().chain(own_attributes.iter()) {
            set(k, v.clone().into());
        }
        set("service.name", service_name.into());
        set(
            "service.instance.id",
            format!("{}-{}-{}", self.host_name, info.pid, info.start_ticks).into(),
        );
        set("process.pid", i64::from(info.pid).into());
        set("process.executable.name", info.exe_name.clone().into());
        if !info.exe_path.is_empty() {
            set("process.executable.path", info.exe_path.clone().into());
        }
        set("host.name", self.host_name.clone().into());
        if let Some(id) = &info.container.container_id {
            set("container.id", id.clone().into());
        }
        if let Some(uid) = &info.container.pod_uid {
            set("k8s.pod.uid", uid.clone().into());
        }
        let in_container =
            info.container.container_id.is_some() || info.container.pod_uid.is_some();
        if in_container
            && let Some(names) = self
                .kubelet_logs
                .as_ref()
                .and_then(|k| k.names(&info.container))
        {
            set("k8s.namespace.name", names.namespace.into());
            set("k8s.pod.name", names.pod.into());
            if let Some(container) = names.container {
                set("k8s.container.name", container.into());
            }
        }
        set("telemetry.sdk.name", "tracer-agent".into());
        set("telemetry.sdk.version", env!("CARGO_PKG_VERSION").into());
        if let Some(lang) = language(&info.exe_name) {
            set("telemetry.sdk.language", lang.into());
        }
        Arc::new(
            Resource::builder_empty()
                .with_attributes(attributes.into_iter().map(|(k, v)| KeyValue::new(k, v)))
                .build(),
        )
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; gethostname NUL-terminates within it on success.
    let ret = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if ret != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use opentelemetry::Key;

    use super::*;

    fn info(exe: &str, cmdline: &[&str]) -> ProcessInfo {
        ProcessInfo {
            pid: 42,
            exe_name: exe.to_owned(),
            exe_path: format!("/usr/bin/{exe}"),
            cmdline: cmdline.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn derives_service_names() {
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "python3.11",
                &["python3", "-m", "http.server", "8000"],
                "http.server",
            ),
            ("python3.11", &["python3", "-u", "/srv/app.py"], "app"),
            ("python3.11", &["python3", "-c", "print(1)"], "python3.11"),
            ("node", &["node", "server.js"], "server"),
            ("nginx", &["nginx: worker process"], "nginx"),
            ("curl", &["curl", "http://x"], "curl"),
        ];
        for (exe, cmdline, want) in cases {
            assert_eq!(
                derived_service_name(&info(exe, cmdline)),
                *want,
                "{cmdline:?}"
            );
        }
    }

    fn attr(resource: &Resource, key: &str) -> Option<String> {
        resource
            .get(&Key::from(key.to_owned()))
            .map(|v| v.to_string())
    }

    #[test]
    fn service_name_precedence() {
        let builder = ResourceBuilder::new(
            Some("from-agent".into()),
            vec![("deployment.environment".into(), "prod".into())],
        );
        let mut p = info("python3.11", &["python3", "app.py"]);
        let r = builder.build(&p);
        assert_eq!(attr(&r, "service.name").as_deref(), Some("from-agent"));
        assert_eq!(attr(&r, "deployment.environment").as_deref(), Some("prod"));
        assert_eq!(
            attr(&r, "telemetry.sdk.name").as_deref(),
            Some("tracer-agent")
        );
        assert_eq!(
            attr(&r, "telemetry.sdk.language").as_deref(),
            Some("python")
        );
        assert_eq!(attr(&r, "process.pid").as_deref(), Some("42"));

        p.otel_env.insert(
            "OTEL_RESOURCE_ATTRIBUTES".into(),
            "service.name=from-attrs,team=a%2Cb".into(),
        );
        let r = builder.build(&p);
        assert_eq!(attr(&r, "service.name").as_deref(), Some("from-attrs"));
        assert_eq!(attr(&r, "team").as_deref(), Some("a,b"));

        p.container = crate::cgroup::parse(
            "0::/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d.slice/\
             cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n",
        );
        let r = builder.build(&p);
        assert_eq!(
            attr(&r, "container.id").as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert_eq!(
            attr(&r, "k8s.pod.uid").as_deref(),
            Some("1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d")
        );

        p.otel_env
            .insert("OTEL_SERVICE_NAME".into(), "from-process".into());
        let r = builder.build(&p);
        assert_eq!(attr(&r, "service.name").as_deref(), Some("from-process"));

        let plain =
            ResourceBuilder::new(None, vec![]).build(&info("python3.11", &["python3", "app.py"]));
        assert_eq!(attr(&plain, "service.name").as_deref(), Some("app"));
    }

    #[test]
    fn host_name_is_the_agents_unless_its_attributes_name_the_node() {
        let p = info("nginx", &["nginx"]);
        let own = ResourceBuilder::new(None, vec![]).build(&p);
        assert_eq!(attr(&own, "host.name"), Some(host_name()));
        // As the DaemonSet sets it: the node's name, not the agent pod's.
        let node = ResourceBuilder::new(None, vec![("host.name".into(), "node-7".into())]);
        let r = node.build(&p);
        assert_eq!(attr(&r, "host.name").as_deref(), Some("node-7"));
        let instance = attr(&r, "service.instance.id").unwrap();
        assert!(instance.starts_with("node-7-42-"), "{instance}");
    }

    #[test]
    fn kubernetes_names_from_the_kubelet_log_directory() {
        const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        const OTHER: &str = "aaaabbbbccccddddeeeeffff0000111122223333444455556666777788889999";
        const UID: &str = "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d";
        let dir = std::env::temp_dir().join(format!("tracer-kubelet-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pod_dir = dir.join(format!("pods/shop_checkout-7d9f_{UID}/web"));
        std::fs::create_dir_all(&pod_dir).unwrap();
        std::fs::create_dir_all(dir.join("containers")).unwrap();
        std::fs::write(pod_dir.join("0.log"), "").unwrap();
        std::os::unix::fs::symlink(
            format!("/var/log/pods/shop_checkout-7d9f_{UID}/web/0.log"),
            dir.join(format!("containers/checkout-7d9f_shop_web-{ID}.log")),
        )
        .unwrap();
        // A link whose target names another pod UID is not believed.
        std::os::unix::fs::symlink(
            "/var/log/pods/shop_other_00000000-0000-0000-0000-000000000000/web/0.log",
            dir.join(format!("containers/other_shop_web-{OTHER}.log")),
        )
        .unwrap();
        let logs = KubeletLogs::new(&dir);
        let container = |id: Option<&str>, uid: Option<&str>| ContainerInfo {
            container_id: id.map(str::to_owned),
            pod_uid: uid.map(str::to_owned),
            ..Default::default()
        };
        let full = PodNames {
            namespace: "shop".into(),
            pod: "checkout-7d9f".into(),
            container: Some("web".into()),
        };
        assert_eq!(
            logs.names(&container(Some(ID), Some(UID))),
            Some(full.clone())
        );
        assert_eq!(logs.names(&container(Some(ID), None)), Some(full));
        let pod_only = PodNames {
            container: None,
            ..logs.names(&container(Some(ID), None)).unwrap()
        };
        assert_eq!(
            logs.names(&container(None, Some(UID))),
            Some(pod_only.clone())
        );
        assert_eq!(
            logs.names(&container(Some(OTHER), Some(UID))),
            Some(pod_only)
        );
        assert_eq!(
            logs.names(&container(Some(OTHER), None)).map(|n| n.pod),
            Some("other".into())
        );
        assert_eq!(logs.names(&container(None, None)), None);
        assert_eq!(
            KubeletLogs::new("/nonexistent").names(&container(Some(ID), Some(UID))),
            None
        );

        let builder = ResourceBuilder::new(None, vec![]).with_kubelet_logs(&dir);
        let mut p = info("python3.11", &["python3", "app.py"]);
        p.container = container(Some(ID), Some(UID));
        let r = builder.build(&p);
        assert_eq!(attr(&r, "k8s.namespace.name").as_deref(), Some("shop"));
        assert_eq!(attr(&r, "k8s.pod.name").as_deref(), Some("checkout-7d9f"));
        assert_eq!(attr(&r, "k8s.container.name").as_deref(), Some("web"));
        // A host process gets no Kubernetes names, whatever the directory holds.
        let r = builder.build(&info("nginx", &["nginx"]));
        assert_eq!(attr(&r, "k8s.pod.name"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_own_process() {
        let me = ProcessInfo::read(std::process::id());
        assert!(!me.exe_name.is_empty());
        assert!(me.start_ticks > 0);
        assert!(!me.cmdline.is_empty());
    }

    #[test]
    fn parses_attribute_lists() {
        assert_eq!(
            parse_resource_attributes("a=1, b = x%20y ,bad,=v,c=%zz"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "%zz".into())
            ]
        );
    }
}
