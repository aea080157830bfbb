//! Test support: the captured connections in `testdata/` (see its README) and ways to replay them.

use super::{Direction, Exchange, KafkaConnection, Piece};

/// One captured syscall.
#[derive(Debug, Clone)]
pub struct Syscall {
    pub direction: Direction,
    pub start_ns: u64,
    pub end_ns: u64,
    pub bytes: Vec<u8>,
}

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

/// Record: direction u8 (0 sent by the client), start_ns u64, end_ns u64, length u32 (big-endian), bytes.
pub fn syscalls(capture: &[u8]) -> Vec<Syscall> {
    let mut syscalls = Vec::new();
    let mut rest = capture;
    while let Some((head, tail)) = rest.split_first_chunk::<21>() {
        let direction = if head[0] == 0 { Direction::Request } else { Direction::Response };
        let start_ns = u64::from_be_bytes(head[1..9].try_into().unwrap());
        let end_ns = u64::from_be_bytes(head[9..17].try_into().unwrap());
        let len = u32::from_be_bytes(head[17..21].try_into().unwrap()) as usize;
        syscalls.push(Syscall { direction, start_ns, end_ns, bytes: tail[..len].to_vec() });
        rest = &tail[len..];
    }
    syscalls
}

/// A piece to push: which bytes of which syscall, as `Piece` fields.
#[derive(Debug, Clone)]
pub struct PlannedPiece {
    pub direction: Direction,
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub syscall_end: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Cuts each syscall into pieces where `cuts` says (offsets within the syscall, ascending), keeping
/// only its first `captured(index, len)` bytes; `skip(index)` drops a syscall as lost.
pub fn plan(
    syscalls: &[Syscall],
    mut cuts: impl FnMut(usize, usize) -> Vec<usize>,
    mut captured: impl FnMut(usize, usize) -> usize,
    mut skip: impl FnMut(usize) -> bool,
) -> Vec<PlannedPiece> {
    let mut offsets = [0u64; 2];
    let mut pieces = Vec::new();
    for (index, syscall) in syscalls.iter().enumerate() {
        let offset = &mut offsets[syscall.direction as usize];
        let syscall_end = *offset + syscall.bytes.len() as u64;
        if !skip(index) {
            let kept = captured(index, syscall.bytes.len()).min(syscall.bytes.len());
            let mut bounds: Vec<usize> = cuts(index, kept).into_iter().filter(|cut| *cut < kept).collect();
            bounds.push(kept);
            let mut from = 0;
            for to in bounds {
                pieces.push(PlannedPiece {
                    direction: syscall.direction,
                    offset: *offset + from as u64,
                    bytes: syscall.bytes[from..to].to_vec(),
                    syscall_end,
                    start_ns: syscall.start_ns,
                    end_ns: syscall.end_ns,
                });
                from = to;
            }
        }
        *offset = syscall_end;
    }
    pieces
}

pub fn push_all(connection: &mut KafkaConnection, pieces: &[PlannedPiece]) -> Vec<Exchange> {
    let mut out = Vec::new();
    for planned in pieces {
        let piece = Piece {
            direction: planned.direction,
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
    let pieces = plan(&syscalls(capture), |_, _| Vec::new(), |_, len| len, |_| false);
    let mut connection = KafkaConnection::new();
    let out = push_all(&mut connection, &pieces);
    (connection, out)
}

/// The whole frames of one direction of a capture (without size fields).
pub fn frames(capture: &[u8], direction: Direction) -> Vec<Vec<u8>> {
    let stream: Vec<u8> = syscalls(capture)
        .into_iter()
        .filter(|syscall| syscall.direction == direction)
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
