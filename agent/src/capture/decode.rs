//! Decoding of ring buffer records into typed events. Pure and total: any byte string gives
//! either an event or a [`DecodeError`], never a panic (fuzzed by a property test below).
use tracer_common::{
    CloseEvent, ConnEvent, DataEvent, EXEC_FILENAME_LEN, EventHeader, ExecEvent, ListenEvent, kind,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawEvent<'a> {
    Data(DataEvent, &'a [u8]),
    Open(ConnEvent),
    Close(CloseEvent),
    Exit(EventHeader),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte header")]
    Short { len: usize, need: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("data record says {captured} payload bytes but carries {carried}")]
    PayloadLength { captured: usize, carried: usize },
}

/// Reads a plain-old-data record from the front of `bytes`.
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked above; T is Pod, so any bit pattern is a valid T; the read is
    // unaligned-safe.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

pub fn decode(bytes: &[u8]) -> Result<RawEvent<'_>, DecodeError> {
    let header: EventHeader = read_pod(bytes)?;
    match header.kind {
        kind::DATA => {
            let event: DataEvent = read_pod(bytes)?;
            let payload = &bytes[size_of::<DataEvent>()..];
            let captured = event.captured_len as usize;
            // The ring buffer pads records to 8 bytes, so trailing bytes may follow.
            if payload.len() < captured {
                return Err(DecodeError::PayloadLength {
                    captured,
                    carried: payload.len(),
                });
            }
            Ok(RawEvent::Data(event, &payload[..captured]))
        }
        kind::OPEN => Ok(RawEvent::Open(read_pod(bytes)?)),
        kind::CLOSE => Ok(RawEvent::Close(read_pod(bytes)?)),
        kind::EXIT => Ok(RawEvent::Exit(header)),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// The header of any record, to route it before decoding the rest.
pub fn header(bytes: &[u8]) -> Result<EventHeader, DecodeError> {
    read_pod(bytes)
}

/// Records about which processes to trace. `select` handles them before the pipeline, which
/// never sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectionEvent {
    /// A process exec'd.
    Exec {
        header: EventHeader,
        /// Its `tracer_common::traced` state before the exec.
        prev_state: u8,
        /// The pending state the probe gave it.
        state: u8,
        /// The command name (at most 15 bytes).
        comm: String,
        /// The path given to execve, as bytes (cut at `EXEC_FILENAME_LEN - 1`).
        filename: Vec<u8>,
    },
    /// A process listens on a selected port (the probe has marked it traced).
    Listen {
        header: EventHeader,
        prev_state: u8,
        port: u16,
    },
}

/// The selection event in `bytes`, or None if it is another kind of record.
pub fn decode_selection(bytes: &[u8]) -> Option<Result<SelectionEvent, DecodeError>> {
    let header = match header(bytes) {
        Ok(header) => header,
        Err(err) => return Some(Err(err)),
    };
    match header.kind {
        kind::EXEC => Some(read_pod::<ExecEvent>(bytes).map(|event| {
            let len = (event.filename_len as usize).min(EXEC_FILENAME_LEN - 1);
            let name = &event.filename[..len];
            // The kernel copies up to the NUL; a cut name has none.
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            SelectionEvent::Exec {
                header,
                prev_state: event.prev_state as u8,
                state: event.state as u8,
                comm: c_string(&event.comm),
                filename: name.to_vec(),
            }
        })),
        kind::LISTEN => Some(
            read_pod::<ListenEvent>(bytes).map(|event| SelectionEvent::Listen {
                header,
                prev_state: event.prev_state as u8,
                port: event.port,
            }),
        ),
        _ => None,
    }
}

/// A NUL-terminated (or full) byte array as text.
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The bytes of a record as the probes write it: `value` then `payload`. For benchmarks,
/// fuzzing and tests, which feed the pipeline without a kernel.
pub fn encode_record<T: aya::Pod>(value: &T, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_of::<T>() + payload.len());
    // SAFETY: T is Pod: plain integers without padding, so its bytes are initialized.
    out.extend_from_slice(unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>())
    });
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tracer_common::data_flags;

    use super::*;

    fn data_event(captured: u32) -> DataEvent {
        DataEvent {
            header: EventHeader {
                kind: kind::DATA,
                pid: 10,
                tid: 11,
                fd: 3,
                conn_id: 7,
                ts_ns: 100,
            },
            syscall_len: captured as u64,
            captured_len: captured,
            flags: data_flags::FIRST_CHUNK | data_flags::LAST_CHUNK,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_data_with_payload_and_padding() {
        let mut bytes = encode_record(&data_event(5), b"hello");
        bytes.extend_from_slice(&[0, 0, 0]);
        match decode(&bytes).unwrap() {
            RawEvent::Data(event, payload) => {
                assert_eq!(event.header.conn_id, 7);
                assert_eq!(payload, b"hello");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(matches!(decode(&[1, 0]), Err(DecodeError::Short { .. })));
        let bytes = encode_record(&data_event(9), b"hello");
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::PayloadLength {
                captured: 9,
                carried: 5
            })
        );
        let mut unknown = encode_record(&data_event(0), b"");
        unknown[0] = 99;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));
    }

    #[test]
    fn decodes_other_kinds() {
        let open = ConnEvent {
            header: EventHeader {
                kind: kind::OPEN,
                ..Default::default()
            },
            role: 1,
            ..Default::default()
        };
        let bytes = unsafe {
            std::slice::from_raw_parts((&open as *const ConnEvent).cast::<u8>(), size_of_val(&open))
        };
        assert_eq!(decode(bytes), Ok(RawEvent::Open(open)));
        // A close record cut short is an error, not a panic.
        let mut close = bytes.to_vec();
        close[0] = kind::CLOSE as u8;
        close.truncate(40);
        assert!(matches!(decode(&close), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn decodes_selection_events() {
        let mut exec = ExecEvent {
            header: EventHeader {
                kind: kind::EXEC,
                pid: 42,
                ..Default::default()
            },
            prev_state: 1,
            state: 0xc5,
            filename_len: 12,
            ..Default::default()
        };
        exec.comm[..4].copy_from_slice(b"srv1");
        exec.filename[..13].copy_from_slice(b"/usr/bin/srv\0");
        let bytes = encode_record(&exec, b"");
        assert_eq!(
            decode_selection(&bytes),
            Some(Ok(SelectionEvent::Exec {
                header: exec.header,
                prev_state: 1,
                state: 0xc5,
                comm: "srv1".into(),
                filename: b"/usr/bin/srv".to_vec(),
            }))
        );
        // A length beyond the array is clamped, not trusted.
        exec.filename_len = u32::MAX;
        exec.filename = [b'a'; EXEC_FILENAME_LEN];
        match decode_selection(&encode_record(&exec, b"")) {
            Some(Ok(SelectionEvent::Exec { filename, .. })) => {
                assert_eq!(filename.len(), EXEC_FILENAME_LEN - 1)
            }
            other => panic!("unexpected {other:?}"),
        }
        let listen = ListenEvent {
            header: EventHeader {
                kind: kind::LISTEN,
                pid: 7,
                ..Default::default()
            },
            port: 8080,
            family: 2,
            ..Default::default()
        };
        assert!(matches!(
            decode_selection(&encode_record(&listen, b"")),
            Some(Ok(SelectionEvent::Listen { port: 8080, .. }))
        ));
        assert_eq!(decode_selection(&encode_record(&data_event(0), b"")), None);
        let mut short = encode_record(&listen, b"");
        short.truncate(40);
        assert!(matches!(
            decode_selection(&short),
            Some(Err(DecodeError::Short { .. }))
        ));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), kind in 0u32..8) {
            let mut bytes = bytes;
            if bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&kind.to_ne_bytes());
            }
            let _ = decode(&bytes);
            let _ = decode_selection(&bytes);
        }
    }
}
