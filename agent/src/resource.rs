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
use std::{collections::HashMap, path::Path, sync::Arc};

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

/// The service name derived from the command line (rule 4 above).
pub fn derived_service_name(info: &ProcessInfo) -> String {
    let is_interpreter = INTERPRETERS
        .iter()
        .any(|(prefix, _)| info.exe_name.starts_with(prefix));
    if is_interpreter {
        let mut args = info.cmdline.iter().skip(1);
        while let Some(arg) = args.next() {
            if arg == "-m" {
                if let Some(module) = args.next() {
                    return module.clone();
                }
            } else if arg == "-c" || arg == "-e" {
                break;
            } else if !arg.starts_with('-')
                && let Some(stem) = Path::new(arg).file_stem()
            {
                return stem.to_string_lossy().into_owned();
            }
        }
    }
    info.exe_name.clone()
}

/// Builds resources; knows the agent-wide settings.
pub struct ResourceBuilder {
    host_name: String,
    agent_service_name: Option<String>,
    agent_attributes: Vec<(String, String)>,
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
        Self {
            host_name: host_name(),
            agent_service_name,
            agent_attributes,
        }
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
