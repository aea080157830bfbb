//! Test support shared by the stream parsers (Kafka, HTTP/2): captured syscalls in the testdata
//! record format, and plans that cut them into the pieces the kernel could have reported.

/// One captured syscall.
#[derive(Debug, Clone)]
pub struct Syscall {
    /// The traced process sent these bytes (a Kafka client's requests).
    pub outgoing: bool,
    pub start_ns: u64,
    pub end_ns: u64,
    pub bytes: Vec<u8>,
}

/// Record: direction u8 (0: the traced process sent), start_ns u64, end_ns u64, length u32
/// (big-endian), bytes.
pub fn syscalls(capture: &[u8]) -> Vec<Syscall> {
    let mut syscalls = Vec::new();
    let mut rest = capture;
    while let Some((head, tail)) = rest.split_first_chunk::<21>() {
        let start_ns = u64::from_be_bytes(head[1..9].try_into().unwrap());
        let end_ns = u64::from_be_bytes(head[9..17].try_into().unwrap());
        let len = u32::from_be_bytes(head[17..21].try_into().unwrap()) as usize;
        syscalls.push(Syscall { outgoing: head[0] == 0, start_ns, end_ns, bytes: tail[..len].to_vec() });
        rest = &tail[len..];
    }
    syscalls
}

/// A piece to push: which bytes of which syscall, as the parsers' `Piece` fields.
#[derive(Debug, Clone)]
pub struct PlannedPiece {
    pub outgoing: bool,
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
        let offset = &mut offsets[usize::from(syscall.outgoing)];
        let syscall_end = *offset + syscall.bytes.len() as u64;
        if !skip(index) {
            let kept = captured(index, syscall.bytes.len()).min(syscall.bytes.len());
            let mut bounds: Vec<usize> = cuts(index, kept).into_iter().filter(|cut| *cut < kept).collect();
            bounds.push(kept);
            let mut from = 0;
            for to in bounds {
                pieces.push(PlannedPiece {
                    outgoing: syscall.outgoing,
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

/// One piece per syscall, all captured.
pub fn whole(syscalls: &[Syscall]) -> Vec<PlannedPiece> {
    plan(syscalls, |_, _| Vec::new(), |_, len| len, |_| false)
}
