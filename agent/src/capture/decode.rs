//! Decoding of ring buffer records into typed events. Pure and total: any byte string gives
//! either an event or a [`DecodeError`], never a panic (fuzzed by a property test below).
use tracer_common::{CloseEvent, ConnEvent, DataEvent, EventHeader, kind};

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

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), kind in 0u32..6) {
            let mut bytes = bytes;
            if bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&kind.to_ne_bytes());
            }
            let _ = decode(&bytes);
        }
    }
}
