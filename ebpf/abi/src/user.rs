//! Userspace-only parts: aya `Pod` impls and decoding of ring-buffer records.

use crate::{
    ConnCloseEvent, ConnOpenEvent, ConnState, DataEvent, DataMeta, EventHeader, H2StreamIdsEvent, KernelOffsets,
    PgMessageHead, ProcessEvent, SpanIds, StreamChunkHead, kind, PG_BODY, STREAM_CHUNK_BYTES,
};

// SAFETY: all are #[repr(C)], Copy, made only of integers and byte arrays, with explicit padding.
unsafe impl aya::Pod for ConnState {}
unsafe impl aya::Pod for crate::InFlight {}
unsafe impl aya::Pod for KernelOffsets {}
unsafe impl aya::Pod for crate::Sampler {}

/// A ring-buffer record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    ConnOpen(ConnOpenEvent),
    /// Meta, the kernel's span ids when the event starts a request, and the captured payload
    /// (empty for body bytes that stayed in the kernel).
    Data(DataMeta, Option<SpanIds>, &'a [u8]),
    ConnClose(ConnCloseEvent),
    ProcessExec(ProcessEvent),
    ProcessExit(ProcessEvent),
    /// A PostgreSQL message and the first bytes of its body.
    PgMessage(PgMessageHead, &'a [u8]),
    /// A piece of a stream-captured connection's bytes.
    StreamChunk(StreamChunkHead, &'a [u8]),
    /// Ids the kernel decided for an HTTP/2 stream (injected into a request, or a served one's).
    H2StreamIds(H2StreamIdsEvent),
    /// A connection carries TLS.
    ConnTls(crate::ConnTlsEvent),
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its kind's struct.
    Truncated { kind: u32, len: usize },
    /// A kind this agent does not know (a newer kernel object?).
    UnknownKind(u32),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated { kind, len } => write!(f, "event of kind {kind} truncated at {len} bytes"),
            Self::UnknownKind(k) => write!(f, "unknown event kind {k}"),
        }
    }
}

/// Copy a `T` out of the front of `bytes` (ring-buffer records need not be aligned for `T`).
fn read<T: Copy>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
    if bytes.len() < core::mem::size_of::<T>() {
        return Err(DecodeError::Truncated { kind, len: bytes.len() });
    }
    // SAFETY: length checked above; T is a plain-old-data #[repr(C)] struct of this crate.
    Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decode one ring-buffer record. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let header: EventHeader = read(bytes, 0)?;
    match header.kind {
        kind::CONN_OPEN => read(bytes, header.kind).map(Event::ConnOpen),
        kind::CONN_CLOSE => read(bytes, header.kind).map(Event::ConnClose),
        kind::PROCESS_EXEC => read(bytes, header.kind).map(Event::ProcessExec),
        kind::PROCESS_EXIT => read(bytes, header.kind).map(Event::ProcessExit),
        kind::DATA_META => read(bytes, header.kind).map(|m| Event::Data(m, None, &[])),
        kind::DATA => decode_data(bytes),
        kind::PG_MESSAGE => decode_pg(bytes),
        kind::STREAM_CHUNK => decode_chunk(bytes),
        kind::H2_INJECTED | kind::H2_SERVED => read(bytes, header.kind).map(Event::H2StreamIds),
        kind::CONN_TLS => read(bytes, header.kind).map(Event::ConnTls),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn decode_data(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let meta: DataMeta = read(bytes, kind::DATA)?;
    let ids_at = core::mem::offset_of!(DataEvent, ids);
    let ids: SpanIds = read(bytes.get(ids_at..).unwrap_or_default(), kind::DATA)?;
    let start = core::mem::offset_of!(DataEvent, payload);
    let captured = (meta.captured as usize).min(crate::MAX_CAPTURE).min(meta.len as usize);
    let payload = bytes
        .get(start..start + captured)
        .ok_or(DecodeError::Truncated { kind: kind::DATA, len: bytes.len() })?;
    Ok(Event::Data(meta, (ids.valid == 1).then_some(ids), payload))
}

fn decode_pg(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let head: PgMessageHead = read(bytes, kind::PG_MESSAGE)?;
    let start = core::mem::size_of::<PgMessageHead>();
    let captured = (head.captured as usize).min(PG_BODY);
    let body = bytes
        .get(start..start + captured)
        .ok_or(DecodeError::Truncated { kind: kind::PG_MESSAGE, len: bytes.len() })?;
    Ok(Event::PgMessage(head, body))
}

fn decode_chunk(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let head: StreamChunkHead = read(bytes, kind::STREAM_CHUNK)?;
    let start = core::mem::size_of::<StreamChunkHead>();
    let captured = (head.captured as usize).min(STREAM_CHUNK_BYTES);
    let data = bytes
        .get(start..start + captured)
        .ok_or(DecodeError::Truncated { kind: kind::STREAM_CHUNK, len: bytes.len() })?;
    Ok(Event::StreamChunk(head, data))
}

impl ProcessEvent {
    /// `comm` up to its first NUL.
    pub fn comm(&self) -> &str {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(self.comm.len());
        core::str::from_utf8(&self.comm[..end]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::MAX_CAPTURE;

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: test-only view of a POD struct.
        unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>()) }
    }

    #[test]
    fn decodes_data_with_payload() {
        let mut ev = DataEvent { meta: DataMeta::default(), ids: SpanIds::default(), payload: [0; MAX_CAPTURE] };
        ev.meta.header.kind = kind::DATA;
        ev.meta.len = 100;
        ev.meta.captured = 3;
        ev.ids.valid = 1;
        ev.ids.span_id = [7; 8];
        ev.payload[..3].copy_from_slice(b"GET");
        match decode(as_bytes(&ev)) {
            Ok(Event::Data(meta, ids, payload)) => {
                assert_eq!(meta.len, 100);
                assert_eq!(ids.map(|i| i.span_id), Some([7; 8]));
                assert_eq!(payload, b"GET");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn captured_never_exceeds_len_or_buffer() {
        let mut ev = DataEvent { meta: DataMeta::default(), ids: SpanIds::default(), payload: [0; MAX_CAPTURE] };
        ev.meta.header.kind = kind::DATA;
        ev.meta.len = 2;
        ev.meta.captured = u16::MAX;
        let Ok(Event::Data(_, ids, payload)) = decode(as_bytes(&ev)) else { panic!("decode failed") };
        assert_eq!((payload.len(), ids), (2, None));
    }

    #[test]
    fn decodes_stream_chunks_within_their_record() {
        let mut record = std::vec::Vec::from(as_bytes(&StreamChunkHead {
            header: EventHeader { kind: kind::STREAM_CHUNK, ..Default::default() },
            offset: 10,
            syscall_end: 20,
            captured: 3,
            ..Default::default()
        }));
        record.extend_from_slice(b"abc");
        let Ok(Event::StreamChunk(head, data)) = decode(&record) else { panic!("decode failed") };
        assert_eq!((head.offset, head.syscall_end, data), (10, 20, &b"abc"[..]));
        record.truncate(record.len() - 1);
        assert!(matches!(decode(&record), Err(DecodeError::Truncated { .. })), "claims more than it has");
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(matches!(decode(&[1, 2, 3]), Err(DecodeError::Truncated { .. })));
        let header = EventHeader { kind: 99, ..Default::default() };
        assert_eq!(decode(as_bytes(&header)), Err(DecodeError::UnknownKind(99)));
        let header = EventHeader { kind: kind::CONN_OPEN, ..Default::default() };
        assert!(matches!(decode(as_bytes(&header)), Err(DecodeError::Truncated { .. })));
    }
}
