//! Where the running kernel's `struct sock` keeps a socket's addresses and ports, from its BTF.
//!
//! The exit probe reads the tuple of a socket it meets for the first time (a connection older
//! than the agent) straight from the socket. Rust BPF has no CO-RE field relocations, so the
//! offsets are looked up here and handed to the probes as load-time globals. Without BTF the
//! probes fall back to the `tcp:tcp_rcv_space_adjust` tracepoint, which costs every TCP
//! receive on the host a tracepoint dispatch.
use std::path::Path;

use btfparse::{Offset, Readable, TypeInformation};
use tracer_common::SockLayout;

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
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
    fn a_file_that_is_not_btf_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tracer-btf-test-{}", std::process::id()));
        std::fs::write(&dir, b"not btf at all").unwrap();
        let err = sock_layout(&dir).unwrap_err();
        std::fs::remove_file(&dir).ok();
        assert!(matches!(err, BtfError::Parse(_)), "{err}");
    }
}
