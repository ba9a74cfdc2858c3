//! Where the running kernel's `struct sock` keeps a socket's addresses and ports, from its BTF.
//!
//! The socket probe reads the tuple of a socket it meets for the first time (a connection older
//! than the agent) straight from the socket. Rust BPF has no CO-RE field relocations, so the
//! offsets are looked up here and handed to the probes as load-time globals. Without BTF the
//! probes fall back to the `tcp:tcp_rcv_space_adjust` tracepoint, which costs every TCP
//! receive on the host a tracepoint dispatch.
//!
//! btfparse builds a table of every type of the kernel (about 16 MiB at its peak), and the
//! agent's peak RSS is a figure users watch, so the lookup runs in a short-lived child: the
//! agent's own binary, started with [`CHILD_ENV`] set (see [`child_main`]).
use std::{path::Path, process::Command};

use btfparse::{Offset, Readable, TypeInformation};
use tracer_common::SockLayout;

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Set in the environment of the child that looks the layout up.
pub const CHILD_ENV: &str = "TRACER_AGENT_SOCK_LAYOUT_CHILD";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("running the layout lookup ({0})")]
    Child(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing the kernel's BTF: {0:?}")]
    Parse(btfparse::Error),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
    #[error("{0} is not at a whole byte")]
    Bitfield(String),
}

/// The BTF bytes, for btfparse.
struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buffer.len())?))
            .filter(|range| range.end <= self.0.len());
        match range {
            Some(range) => {
                buffer.copy_from_slice(&self.0[range]);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

/// The layout of `struct sock_common` in the running kernel, looked up by a child process.
pub fn sock_layout_in_child() -> Result<SockLayout, BtfError> {
    let output = Command::new("/proc/self/exe")
        .env(CHILD_ENV, VMLINUX_BTF)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|err| BtfError::Child(err.to_string()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(BtfError::Child(stderr.trim().to_owned()));
    }
    parse_layout(&text).ok_or_else(|| BtfError::Child(format!("unexpected output {text:?}")))
}

/// The child's side: prints the layout of the BTF named by [`CHILD_ENV`] as one line of
/// numbers, or the error on stderr. Call first thing in `main`.
pub fn child_main(btf: &std::ffi::OsStr) -> std::process::ExitCode {
    match sock_layout(Path::new(btf)) {
        Ok(layout) => {
            println!("{}", format_layout(&layout));
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn format_layout(l: &SockLayout) -> String {
    let fields = [
        l.family,
        l.daddr,
        l.rcv_saddr,
        l.dport,
        l.num,
        l.v6_daddr,
        l.v6_rcv_saddr,
    ];
    fields.map(|f| f.to_string()).join(" ")
}

fn parse_layout(text: &str) -> Option<SockLayout> {
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u32>().ok());
    let mut next = || fields.next().flatten();
    let layout = SockLayout {
        known: 1,
        family: next()?,
        daddr: next()?,
        rcv_saddr: next()?,
        dport: next()?,
        num: next()?,
        v6_daddr: next()?,
        v6_rcv_saddr: next()?,
    };
    next().is_none().then_some(layout)
}

/// The layout of `struct sock_common` in the BTF at `path`.
pub fn sock_layout(path: &Path) -> Result<SockLayout, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let types = TypeInformation::new(&Bytes(data)).map_err(BtfError::Parse)?;
    let id = |name: &str| {
        types
            .id_of(name)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))
    };
    let offset = |type_id: u32, path: &str| -> Result<u32, BtfError> {
        match types.offset_of(type_id, path) {
            Ok((_, Offset::ByteOffset(bytes))) => Ok(bytes),
            Ok((_, Offset::BitOffsetAndSize(..))) => Err(BtfError::Bitfield(path.to_owned())),
            Err(_) => Err(BtfError::Missing(format!("field {path}"))),
        }
    };
    // The probes take a socket pointer as a sock_common one.
    if offset(id("sock")?, "__sk_common")? != 0 {
        return Err(BtfError::Missing(
            "struct sock starting with __sk_common".into(),
        ));
    }
    let common = id("sock_common")?;
    Ok(SockLayout {
        known: 1,
        family: offset(common, "skc_family")?,
        daddr: offset(common, "skc_daddr")?,
        rcv_saddr: offset(common, "skc_rcv_saddr")?,
        dport: offset(common, "skc_dport")?,
        num: offset(common, "skc_num")?,
        v6_daddr: offset(common, "skc_v6_daddr")?,
        v6_rcv_saddr: offset(common, "skc_v6_rcv_saddr")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's layout. The first fields are fixed by the kernel's own casts
    /// (addresses, then hash, then ports, then family); the IPv6 ones depend on its config.
    #[test]
    fn this_kernels_sock_layout_is_found() {
        let layout = sock_layout(Path::new(VMLINUX_BTF)).expect("the kernel's BTF");
        assert_eq!(
            (
                layout.daddr,
                layout.rcv_saddr,
                layout.dport,
                layout.num,
                layout.family
            ),
            (0, 4, 12, 14, 16)
        );
        assert!(layout.v6_daddr >= 24 && layout.v6_rcv_saddr == layout.v6_daddr + 16);
    }

    #[test]
    fn the_layout_line_round_trips_and_rejects_anything_else() {
        let layout = sock_layout(Path::new(VMLINUX_BTF)).expect("the kernel's BTF");
        assert_eq!(parse_layout(&format_layout(&layout)), Some(layout));
        assert_eq!(parse_layout(""), None);
        assert_eq!(parse_layout("1 2 3 4 5 6"), None);
        assert_eq!(parse_layout("1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_layout("1 2 3 4 5 6 x"), None);
    }

    #[test]
    fn a_file_that_is_not_btf_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tracer-btf-test-{}", std::process::id()));
        std::fs::write(&dir, b"not btf at all").unwrap();
        let err = sock_layout(&dir).unwrap_err();
        std::fs::remove_file(&dir).ok();
        assert!(matches!(err, BtfError::Parse(_)), "{err}");
    }
}
