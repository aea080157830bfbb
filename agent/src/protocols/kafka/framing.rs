//! Splits one direction's byte stream into frames (an INT32 size, then that many bytes) by stream offset.
//!
//! Bytes the kernel moved but did not copy, and bytes lost on the way, show up as a jump in the
//! stream offset. A jump inside a frame only spoils that frame: its size says where the next one
//! starts. A jump over a size field loses the framing; it is found again only where a syscall begins
//! with bytes the sink finds plausible as a frame start, since a client writes and a broker reads
//! whole frames far more often than not.

use super::Piece;

/// Frames up to this size are buffered when they span pieces; larger ones are skipped by size.
pub const MAX_BUFFERED_FRAME: u32 = 8 << 20;
/// A size above this (or negative) cannot be Kafka: the framing is lost.
const MAX_FRAME_SIZE: u32 = 1 << 30;
/// Resynchronising trusts a size only up to this.
const MAX_RESYNC_FRAME_SIZE: u32 = 64 << 20;
/// Bytes kept from the start of a frame that is not decoded whole: enough to match it and to read
/// the fields of a request that precede its records.
pub const FRAME_HEAD_BYTES: usize = 512;
/// Bytes of a syscall's start examined to resynchronise: a size, then a request header up to the
/// length of its client id.
const PROBE_BYTES: usize = 4 + 10;
/// Capacity the frame buffer may keep between frames; a bigger one is released.
const KEPT_BUFFER_CAPACITY: usize = 1 << 20;

/// One frame, without its size field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// All of the frame when `whole`; else its captured start, at most [`FRAME_HEAD_BYTES`].
    pub bytes: &'a [u8],
    pub whole: bool,
    /// start_ns of the syscall that carried the frame's first byte.
    pub start_ns: u64,
    /// end_ns of the syscall that carried its last byte; None when that syscall was lost.
    pub end_ns: Option<u64>,
}

/// Where a direction's frames go.
pub trait FrameSink {
    /// Whether a frame of `size` bytes starting with `head` is plausible enough to resynchronise on;
    /// None when `head` is too short to tell.
    fn plausible(&self, size: u32, head: &[u8]) -> Option<bool>;
    fn frame(&mut self, frame: Frame<'_>);
}

/// A syscall as its pieces describe it.
#[derive(Debug, Clone, Copy)]
struct Syscall {
    end: u64,
    end_ns: u64,
}

#[derive(Debug)]
enum State {
    /// The next byte starts a frame's size field, of which `seen` bytes are in `size`.
    Boundary {
        size: [u8; 4],
        seen: usize,
        start_ns: u64,
    },
    Inside(Partial),
    /// The framing is lost; `probe` holds the first bytes of the current syscall while they are judged.
    Lost {
        probe: Option<Probe>,
    },
}

/// A frame being read; its bytes go to the framer's buffer.
#[derive(Debug)]
struct Partial {
    /// Stream offset just past the frame.
    end: u64,
    /// Some bytes were not captured.
    cut: bool,
    /// Bigger than [`MAX_BUFFERED_FRAME`].
    oversized: bool,
    start_ns: u64,
}

impl Partial {
    fn whole(&self) -> bool {
        !self.cut && !self.oversized
    }
}

#[derive(Debug)]
struct Probe {
    start: u64,
    bytes: Vec<u8>,
    start_ns: u64,
}

/// Timing of the piece being consumed.
#[derive(Debug, Clone, Copy)]
struct Timing {
    start_ns: u64,
    end_ns: u64,
}

/// Frames one direction of a connection.
#[derive(Debug)]
pub struct Framer {
    /// Stream offset of the next byte expected.
    next: u64,
    /// The syscall of the last piece; None before the first piece.
    syscall: Option<Syscall>,
    state: State,
    buffer: Vec<u8>,
    desyncs: u64,
    truncated: u64,
    oversized: u64,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            next: 0,
            syscall: None,
            state: State::Boundary { size: [0; 4], seen: 0, start_ns: 0 },
            buffer: Vec::new(),
            desyncs: 0,
            truncated: 0,
            oversized: 0,
        }
    }
}

impl Framer {
    /// Times the framing was lost (not counting a stream first seen mid-way).
    pub fn desyncs(&self) -> u64 {
        self.desyncs
    }

    /// Frames skipped because some of their bytes were not captured.
    pub fn truncated(&self) -> u64 {
        self.truncated
    }

    /// Frames skipped because they exceed [`MAX_BUFFERED_FRAME`].
    pub fn oversized(&self) -> u64 {
        self.oversized
    }

    pub fn push(&mut self, piece: &Piece<'_>, sink: &mut impl FrameSink) {
        let starts_syscall = self.syscall.is_none_or(|syscall| syscall.end != piece.syscall_end);
        if self.syscall.is_none() {
            // A stream first seen mid-way has no known frame boundary.
            self.next = piece.offset;
            if piece.offset != 0 {
                self.state = State::Lost { probe: None };
            }
        }
        let previous = self.syscall.replace(Syscall { end: piece.syscall_end, end_ns: piece.end_ns });
        // Bytes already accounted for (a repeated piece) are dropped.
        let already = self.next.saturating_sub(piece.offset);
        let Some(bytes) = usize::try_from(already).ok().and_then(|already| piece.bytes.get(already..)) else {
            return;
        };
        let offset = piece.offset.max(self.next);
        if offset > self.next {
            self.lose(offset, previous, sink);
        }
        let timing = Timing { start_ns: piece.start_ns, end_ns: piece.end_ns };
        self.consume(bytes, timing, starts_syscall && already == 0, sink);
    }

    /// Bytes up to `to` will never come.
    fn lose(&mut self, to: u64, previous: Option<Syscall>, sink: &mut impl FrameSink) {
        match &mut self.state {
            State::Boundary { .. } => self.desync(),
            State::Inside(partial) if to < partial.end => {
                partial.cut = true;
                self.buffer.truncate(FRAME_HEAD_BYTES);
            }
            State::Inside(partial) => {
                partial.cut = true;
                let end = partial.end;
                // The frame's last byte was in the previous syscall's uncaptured tail, or in a lost one.
                let end_ns = previous.filter(|syscall| syscall.end >= end).map(|syscall| syscall.end_ns);
                self.finish(end_ns, sink);
                if to > end {
                    self.desync();
                }
            }
            State::Lost { probe } => *probe = None,
        }
        self.next = to;
    }

    fn desync(&mut self) {
        self.desyncs += 1;
        self.state = State::Lost { probe: None };
    }

    fn consume(&mut self, mut bytes: &[u8], timing: Timing, mut syscall_start: bool, sink: &mut impl FrameSink) {
        while !bytes.is_empty() {
            let used = match self.state {
                State::Boundary { .. } => self.read_size(bytes, timing, sink),
                State::Inside(_) => self.fill(bytes, timing, sink),
                State::Lost { .. } => self.probe(bytes, timing, syscall_start, sink),
            };
            // Offsets come from the agent: saturate rather than trust them not to wrap.
            self.next = self.next.saturating_add(used as u64);
            bytes = &bytes[used..];
            syscall_start = false;
        }
    }

    /// At a boundary: a whole frame within `bytes` is handed over without copying; else the size
    /// field is gathered. Returns the bytes used.
    fn read_size(&mut self, bytes: &[u8], timing: Timing, sink: &mut impl FrameSink) -> usize {
        let State::Boundary { size, seen, start_ns } = &mut self.state else { return 0 };
        if *seen == 0 {
            *start_ns = timing.start_ns;
            if let Some(used) = whole_frame_in(bytes) {
                let frame = &bytes[4..used];
                sink.frame(Frame { bytes: frame, whole: true, start_ns: timing.start_ns, end_ns: Some(timing.end_ns) });
                return used;
            }
        }
        let used = (4 - *seen).min(bytes.len());
        size[*seen..*seen + used].copy_from_slice(&bytes[..used]);
        *seen += used;
        if *seen < 4 {
            return used;
        }
        let (size, start_ns) = (u32::from_be_bytes(*size), *start_ns);
        if size > MAX_FRAME_SIZE {
            self.desync();
            return used;
        }
        let oversized = size > MAX_BUFFERED_FRAME;
        self.oversized += u64::from(oversized);
        let end = self.next.saturating_add(used as u64).saturating_add(u64::from(size));
        self.state = State::Inside(Partial { end, cut: false, oversized, start_ns });
        if size == 0 {
            self.finish(Some(timing.end_ns), sink);
        }
        used
    }

    /// Inside a frame: buffers what it keeps of `bytes`, and hands the frame over at its end.
    fn fill(&mut self, bytes: &[u8], timing: Timing, sink: &mut impl FrameSink) -> usize {
        let State::Inside(partial) = &self.state else { return 0 };
        let left = partial.end.saturating_sub(self.next);
        let used = usize::try_from(left).map_or(bytes.len(), |left| left.min(bytes.len()));
        let kept = if partial.whole() { used } else { used.min(FRAME_HEAD_BYTES.saturating_sub(self.buffer.len())) };
        self.buffer.extend_from_slice(&bytes[..kept]);
        if used as u64 == left {
            self.finish(Some(timing.end_ns), sink);
        }
        used
    }

    /// Hands the current frame over and returns to a boundary.
    fn finish(&mut self, end_ns: Option<u64>, sink: &mut impl FrameSink) {
        let State::Inside(partial) = &self.state else { return };
        let whole = partial.whole();
        if partial.cut && !partial.oversized {
            self.truncated += 1;
        }
        let bytes = &self.buffer[..self.buffer.len().min(if whole { usize::MAX } else { FRAME_HEAD_BYTES })];
        sink.frame(Frame { bytes, whole, start_ns: partial.start_ns, end_ns });
        self.buffer.clear();
        if self.buffer.capacity() > KEPT_BUFFER_CAPACITY {
            self.buffer = Vec::new();
        }
        self.state = State::Boundary { size: [0; 4], seen: 0, start_ns: 0 };
    }

    /// Framing lost: judges the first bytes of each syscall, and resumes framing at a plausible one.
    fn probe(&mut self, bytes: &[u8], timing: Timing, syscall_start: bool, sink: &mut impl FrameSink) -> usize {
        let State::Lost { probe } = &mut self.state else { return 0 };
        if syscall_start {
            *probe =
                Some(Probe { start: self.next, bytes: Vec::with_capacity(PROBE_BYTES), start_ns: timing.start_ns });
        }
        let Some(current) = probe else { return bytes.len() };
        let used = (PROBE_BYTES - current.bytes.len()).min(bytes.len());
        current.bytes.extend_from_slice(&bytes[..used]);
        match judge(&current.bytes, sink) {
            None => used,
            Some(false) => {
                *probe = None;
                bytes.len()
            }
            Some(true) => {
                let Some(current) = probe.take() else { return used };
                self.resume(current, timing, sink);
                // resume() moved `next` past the probe, which ends with the bytes used here.
                self.next = self.next.saturating_sub(used as u64);
                used
            }
        }
    }

    /// Frames again from the probe's start, replaying its bytes.
    fn resume(&mut self, probe: Probe, timing: Timing, sink: &mut impl FrameSink) {
        self.next = probe.start;
        self.state = State::Boundary { size: [0; 4], seen: 0, start_ns: probe.start_ns };
        self.consume(&probe.bytes, Timing { start_ns: probe.start_ns, ..timing }, false, sink);
    }
}

/// The length of the whole frame (size field included) at the start of `bytes`, when all of it is there.
fn whole_frame_in(bytes: &[u8]) -> Option<usize> {
    let size = u32::from_be_bytes(*bytes.first_chunk::<4>()?);
    if size > MAX_BUFFERED_FRAME {
        return None;
    }
    let used = 4 + size as usize;
    (bytes.len() >= used).then_some(used)
}

/// Whether probe bytes start a plausible frame; None when more are needed.
fn judge(probe: &[u8], sink: &impl FrameSink) -> Option<bool> {
    let size = u32::from_be_bytes(*probe.first_chunk::<4>()?);
    if size > MAX_RESYNC_FRAME_SIZE {
        return Some(false);
    }
    let head = &probe[4..probe.len().min(4 + size as usize)];
    match sink.plausible(size, head) {
        // A frame shorter than the probe cannot grow: undecided means no.
        None if head.len() == size as usize || probe.len() == PROBE_BYTES => Some(false),
        verdict => verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::kafka::Direction;

    /// Frames as tests compare them: bytes, whole, start_ns, end_ns.
    type Seen = (Vec<u8>, bool, u64, Option<u64>);

    /// Accepts frames whose first byte is 0xAA when resynchronising.
    #[derive(Default)]
    struct Recorder {
        frames: Vec<Seen>,
    }

    impl FrameSink for Recorder {
        fn plausible(&self, _size: u32, head: &[u8]) -> Option<bool> {
            head.first().map(|first| *first == 0xAA)
        }

        fn frame(&mut self, frame: Frame<'_>) {
            self.frames.push((frame.bytes.to_vec(), frame.whole, frame.start_ns, frame.end_ns));
        }
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        [&(body.len() as u32).to_be_bytes()[..], body].concat()
    }

    /// Feeds `pieces` (offset, bytes, syscall_end), timing each syscall by its end offset.
    fn feed(framer: &mut Framer, recorder: &mut Recorder, pieces: &[(u64, &[u8], u64)]) {
        for (offset, bytes, syscall_end) in pieces {
            let piece = Piece {
                direction: Direction::Request,
                offset: *offset,
                bytes,
                syscall_end: *syscall_end,
                start_ns: syscall_end * 10,
                end_ns: syscall_end * 10 + 1,
            };
            framer.push(&piece, recorder);
        }
    }

    #[test]
    fn frames_split_at_every_position() {
        let stream = [frame(b"\xAAfirst"), frame(b""), frame(b"\xAAsecond frame")].concat();
        for split in 0..=stream.len() {
            for same_syscall in [false, true] {
                let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
                let (head, tail) = stream.split_at(split);
                let first_end = if same_syscall { stream.len() as u64 } else { split as u64 };
                feed(&mut framer, &mut recorder, &[(0, head, first_end), (split as u64, tail, stream.len() as u64)]);
                let bodies: Vec<&[u8]> = recorder.frames.iter().map(|seen| seen.0.as_slice()).collect();
                assert_eq!(bodies, [&b"\xAAfirst"[..], b"", b"\xAAsecond frame"], "split {split}");
                assert!(recorder.frames.iter().all(|seen| seen.1));
                assert_eq!((framer.desyncs(), framer.truncated()), (0, 0));
                // The first frame starts with the first syscall, the last ends with the last one.
                let carrier = if split == 0 { stream.len() as u64 } else { first_end };
                assert_eq!(recorder.frames[0].2, carrier * 10);
                assert_eq!(recorder.frames[2].3, Some(stream.len() as u64 * 10 + 1));
            }
        }
    }

    #[test]
    fn uncaptured_tail_skips_the_frame_and_keeps_framing() {
        let big = frame(&[7u8; 2000]);
        let next = frame(b"\xAAnext");
        let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
        // Only 1000 bytes of the first syscall were captured.
        let second_start = big.len() as u64;
        feed(&mut framer, &mut recorder, &[(0, &big[..1000], second_start), (second_start, &next, second_start + 12)]);
        assert_eq!(recorder.frames.len(), 2);
        let (head, whole, start_ns, end_ns) = &recorder.frames[0];
        assert_eq!(
            (head.len(), *whole, *start_ns, *end_ns),
            (FRAME_HEAD_BYTES, false, second_start * 10, Some(second_start * 10 + 1))
        );
        assert_eq!(recorder.frames[1].0, b"\xAAnext");
        assert_eq!((framer.truncated(), framer.desyncs()), (1, 0));
    }

    #[test]
    fn lost_size_field_desyncs_until_a_plausible_syscall() {
        let stream = [frame(b"\xAAone"), frame(b"\x01two"), frame(b"\xAAthree"), frame(b"\xAAfour")].concat();
        let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
        // Bytes 9..11 (inside frame two's size field) are lost; the syscall resuming at 11 is no frame
        // start. Frame three starts a syscall, in two pieces.
        feed(&mut framer, &mut recorder, &[(0, &stream[..9], 9), (11, &stream[11..16], 16)]);
        assert_eq!(framer.desyncs(), 1);
        feed(&mut framer, &mut recorder, &[(16, &stream[16..18], 26), (18, &stream[18..26], 26)]);
        feed(&mut framer, &mut recorder, &[(26, &stream[26..], stream.len() as u64)]);
        let bodies: Vec<&[u8]> = recorder.frames.iter().map(|seen| seen.0.as_slice()).collect();
        assert_eq!(bodies, [&b"\xAAone"[..], b"\xAAthree", b"\xAAfour"]);
        assert_eq!(recorder.frames[1].2, 260, "timed from the syscall that carried its first byte");
    }

    #[test]
    fn implausible_syscalls_and_mid_syscall_pieces_do_not_resync() {
        let stream = [frame(b"\x01two"), frame(b"\xAAthree")].concat();
        let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
        // First seen mid-stream: no frame boundary known, not counted as a desync.
        feed(&mut framer, &mut recorder, &[(100, &stream[..8], 200)]);
        // The plausible frame starts mid-syscall: not trusted.
        feed(&mut framer, &mut recorder, &[(108, &stream[8..], 200)]);
        assert!(recorder.frames.is_empty());
        assert_eq!(framer.desyncs(), 0);
        feed(&mut framer, &mut recorder, &[(200, &stream[8..], 210)]);
        assert_eq!(recorder.frames.len(), 1);
    }

    #[test]
    fn gap_ending_at_a_frame_end_keeps_framing() {
        let stream = [frame(b"\xAAone"), frame(b"\xAAtwo"), frame(b"\xAAthree")].concat();
        let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
        // Frame two's body is lost in a lost syscall: no end time for it.
        feed(&mut framer, &mut recorder, &[(0, &stream[..9], 9), (9, &stream[9..12], 12), (16, &stream[16..], 26)]);
        let seen: Vec<(&[u8], bool, Option<u64>)> =
            recorder.frames.iter().map(|(bytes, whole, _, end)| (bytes.as_slice(), *whole, *end)).collect();
        assert_eq!(
            seen,
            [(&b"\xAAone"[..], true, Some(91)), (&b""[..], false, None), (&b"\xAAthree"[..], true, Some(261))]
        );
        assert_eq!((framer.desyncs(), framer.truncated()), (0, 1));
    }

    #[test]
    fn oversized_frames_are_skipped_by_size() {
        let size = MAX_BUFFERED_FRAME + 1;
        let mut head = size.to_be_bytes().to_vec();
        head.extend_from_slice(&[1; 100]);
        let end = 4 + u64::from(size);
        let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
        feed(&mut framer, &mut recorder, &[(0, &head, 104)]);
        let filler = vec![0u8; 1 << 20];
        let mut offset = 104;
        while offset < end {
            let chunk = &filler[..filler.len().min((end - offset) as usize)];
            feed(&mut framer, &mut recorder, &[(offset, chunk, offset + chunk.len() as u64)]);
            offset += chunk.len() as u64;
        }
        feed(&mut framer, &mut recorder, &[(end, &frame(b"\xAAafter"), end + 10)]);
        assert!(framer.buffer.capacity() <= KEPT_BUFFER_CAPACITY);
        assert_eq!(recorder.frames.len(), 2);
        assert_eq!((recorder.frames[0].0.len(), recorder.frames[0].1), (FRAME_HEAD_BYTES, false));
        assert_eq!(recorder.frames[1].0, b"\xAAafter");
        assert_eq!((framer.oversized(), framer.truncated(), framer.desyncs()), (1, 0, 0));
    }

    #[test]
    fn absurd_sizes_desync() {
        let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
        feed(&mut framer, &mut recorder, &[(0, &[0xff, 0xff, 0xff, 0xf0, 1, 2, 3], 7)]);
        assert_eq!(framer.desyncs(), 1);
        feed(&mut framer, &mut recorder, &[(7, &frame(b"\xAAok"), 13)]);
        assert_eq!(recorder.frames.len(), 1);
    }

    #[test]
    fn repeated_bytes_are_dropped() {
        let stream = [frame(b"\xAAone"), frame(b"\xAAtwo")].concat();
        let (mut framer, mut recorder) = (Framer::default(), Recorder::default());
        feed(&mut framer, &mut recorder, &[(0, &stream[..10], 10), (5, &stream[5..], 16), (0, &stream, 16)]);
        assert_eq!(recorder.frames.len(), 2);
        assert_eq!(framer.desyncs(), 0);
    }
}
