//! Test support: the captured connections in `testdata/` (see its README) and ways to replay them.

use super::{Direction, Exchange, KafkaConnection, Piece};
pub use crate::protocols::replay::{plan, syscalls, whole, PlannedPiece, Syscall};

macro_rules! capture {
    ($name:literal) => {
        ($name, include_bytes!(concat!("testdata/", $name, ".capture")).as_slice())
    };
}

/// Every capture, by name.
pub const CAPTURES: [(&str, &[u8]); 22] = [
    capture!("fetch_v3_legacy"),
    capture!("fetch_v5"),
    capture!("fetch_v10"),
    capture!("fetch_v11"),
    capture!("fetch_v16"),
    capture!("fetch_v16_zstd_200"),
    capture!("group_v3"),
    capture!("group_v5_flexible"),
    capture!("metadata_v4"),
    capture!("metadata_v13"),
    capture!("produce_v2_legacy"),
    capture!("produce_v2_legacy_gzip"),
    capture!("produce_v3_gzip"),
    capture!("produce_v7_snappy"),
    capture!("produce_v8"),
    capture!("produce_v10_acks0"),
    capture!("produce_v10_gzip"),
    capture!("produce_v10_lz4"),
    capture!("produce_v10_none"),
    capture!("produce_v10_snappy"),
    capture!("produce_v10_zstd"),
    capture!("produce_v10_zstd_200"),
];

pub fn capture(name: &str) -> &'static [u8] {
    CAPTURES.iter().find(|(known, _)| *known == name).map(|(_, bytes)| *bytes).expect("a known capture")
}

pub fn push_all(connection: &mut KafkaConnection, pieces: &[PlannedPiece]) -> Vec<Exchange> {
    let mut out = Vec::new();
    for planned in pieces {
        let piece = Piece {
            direction: if planned.outgoing { Direction::Request } else { Direction::Response },
            offset: planned.offset,
            bytes: &planned.bytes,
            syscall_end: planned.syscall_end,
            start_ns: planned.start_ns,
            end_ns: planned.end_ns,
        };
        connection.push(&piece, &mut out);
    }
    out
}

/// Replays a capture one piece per syscall.
pub fn replay(capture: &[u8]) -> (KafkaConnection, Vec<Exchange>) {
    let pieces = whole(&syscalls(capture));
    let mut connection = KafkaConnection::new();
    let out = push_all(&mut connection, &pieces);
    (connection, out)
}

/// The whole frames of one direction of a capture (without size fields).
pub fn frames(capture: &[u8], direction: Direction) -> Vec<Vec<u8>> {
    let stream: Vec<u8> = syscalls(capture)
        .into_iter()
        .filter(|syscall| syscall.outgoing == (direction == Direction::Request))
        .flat_map(|syscall| syscall.bytes)
        .collect();
    let mut frames = Vec::new();
    let mut rest = stream.as_slice();
    while let Some((size, tail)) = rest.split_first_chunk::<4>() {
        let size = u32::from_be_bytes(*size) as usize;
        let Some(frame) = tail.get(..size) else { break };
        frames.push(frame.to_vec());
        rest = &tail[size..];
    }
    frames
}

/// A traceparent as the capture scripts write them (see testdata/README.md).
pub fn traceparent(trace: u64, span: u64) -> Vec<u8> {
    format!("00-{trace:032x}-{span:016x}-01").into_bytes()
}
