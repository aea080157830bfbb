//! Splits one direction's byte stream into HTTP/2 frames (RFC 9113 §4.1) by stream offset.
//!
//! A frame is a 9-byte header (24-bit length, type, flags, 31-bit stream id), then its payload. Only
//! header block frames are kept whole, as HPACK needs every byte; of the others only the leading
//! payload bytes a decoder reads are kept, so DATA is never buffered. Bytes lost inside a frame only
//! cut that frame, whose length still says where the next one starts; bytes lost where a frame
//! header was lose the framing for good.

use super::{Desync, Piece, MAX_HEADER_BLOCK};

/// What a client sends first on a prior-knowledge h2c connection (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// SETTINGS payload kept: 170 settings, far more than the 7 defined.
const SETTINGS_KEPT: usize = 1020;
/// A kept-payload buffer that grew past this is released after its frame.
const KEPT_BUFFER_CAPACITY: usize = 64 << 10;

/// Frame types (RFC 9113 §6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags (RFC 9113 §6).
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub length: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream_id: u32,
}

impl FrameHeader {
    pub fn parse(bytes: [u8; HEADER_LEN]) -> Self {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = bytes;
        let stream_id = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
        Self { length: u32::from_be_bytes([0, l0, l1, l2]), kind, flags, stream_id }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    pub fn is_header_block(&self) -> bool {
        matches!(self.kind, kind::HEADERS | kind::PUSH_PROMISE | kind::CONTINUATION)
    }

    /// Payload bytes kept: all of a header block frame that may be decoded, the leading fields a
    /// decoder reads of the others.
    fn kept_len(&self) -> usize {
        let length = self.length as usize;
        let wanted = match self.kind {
            _ if self.is_header_block() => {
                if length > MAX_HEADER_BLOCK {
                    0
                } else {
                    length
                }
            }
            kind::DATA if self.has(flag::PADDED) => 1,
            kind::SETTINGS => SETTINGS_KEPT,
            kind::RST_STREAM => 4,
            kind::GOAWAY => 8,
            _ => 0,
        };
        wanted.min(length)
    }
}

/// Entry and exit of a syscall.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyscallTimes {
    pub start_ns: u64,
    pub end_ns: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    /// The payload's kept start: all of a header block frame up to [`MAX_HEADER_BLOCK`], the leading
    /// fields of others (or more, when the frame came whole in one piece); only its captured start
    /// when not `complete`.
    pub payload: &'a [u8],
    /// No payload byte was lost.
    pub complete: bool,
    /// The syscall that carried the frame's first byte.
    pub first: SyscallTimes,
    /// End of the syscall that carried its last byte (or of the last one before, when that was lost).
    pub end_ns: u64,
}

/// A `101` answer head longer than this is not HTTP/1.1 switching to h2c.
const MAX_UPGRADE_ANSWER: usize = 8 << 10;

/// Where a direction's frames go; an error stops the framing for good.
pub trait FrameSink {
    fn frame(&mut self, frame: Frame<'_>) -> Result<(), Desync>;
}

#[derive(Debug)]
enum State {
    /// The client preface, of which `seen` bytes matched.
    Preface {
        seen: usize,
    },
    /// An upgraded connection's `101` answer head, `seen` bytes of it so far, the last four in
    /// `tail`: the server's frames follow its blank line.
    UpgradeAnswer {
        seen: usize,
        tail: [u8; 4],
    },
    /// A frame header, of which `seen` bytes are in `bytes`.
    Header {
        bytes: [u8; HEADER_LEN],
        seen: usize,
        first: SyscallTimes,
    },
    Payload(Partial),
    Lost,
}

/// A frame whose payload is being read; the kept bytes go to the framer's buffer.
#[derive(Debug, Clone, Copy)]
struct Partial {
    header: FrameHeader,
    /// Stream offset just past the frame.
    end: u64,
    /// Some payload bytes were not captured.
    cut: bool,
    first: SyscallTimes,
}

/// The syscall of the last piece.
#[derive(Debug, Clone, Copy)]
struct LastSyscall {
    /// Stream offset just past it.
    end: u64,
    end_ns: u64,
}

/// Frames one direction of a connection.
#[derive(Debug)]
pub struct Framer {
    /// Stream offset of the next byte expected.
    next: u64,
    /// HTTP/2 starts at this direction's first piece rather than at offset 0 (HTTP/1.1 Upgrade).
    upgraded: bool,
    /// None before the first piece.
    last_syscall: Option<LastSyscall>,
    state: State,
    kept: Vec<u8>,
}

impl Framer {
    /// A direction seen from its first byte; the client's starts with the preface.
    pub fn new(preface: bool) -> Self {
        let state = if preface { State::Preface { seen: 0 } } else { header_start() };
        Self { next: 0, upgraded: false, last_syscall: None, state, kept: Vec::new() }
    }

    /// A direction of a connection upgraded from HTTP/1.1 (RFC 7540 §3.2), from its first piece
    /// after the switch: the client's starts with the preface, the server's with its `101` answer.
    pub fn upgraded(preface: bool) -> Self {
        let state = if preface { State::Preface { seen: 0 } } else { State::UpgradeAnswer { seen: 0, tail: [0; 4] } };
        Self { next: 0, upgraded: true, last_syscall: None, state, kept: Vec::new() }
    }

    /// A direction no longer framed.
    pub fn lost() -> Self {
        Self { next: 0, upgraded: false, last_syscall: None, state: State::Lost, kept: Vec::new() }
    }

    /// Whether a piece came.
    pub fn started(&self) -> bool {
        self.last_syscall.is_some()
    }

    pub fn push(&mut self, piece: &Piece<'_>, sink: &mut impl FrameSink) -> Result<(), Desync> {
        let result = self.push_piece(piece, sink);
        if result.is_err() {
            *self = Self::lost();
        }
        result
    }

    fn push_piece(&mut self, piece: &Piece<'_>, sink: &mut impl FrameSink) -> Result<(), Desync> {
        if matches!(self.state, State::Lost) {
            return Ok(());
        }
        // Offsets come from the agent: saturate rather than trust them.
        let syscall_end = piece.syscall_end.max(piece.offset.saturating_add(piece.bytes.len() as u64));
        let previous = self.last_syscall.replace(LastSyscall { end: syscall_end, end_ns: piece.end_ns });
        if previous.is_none() && piece.offset != 0 {
            if !self.upgraded {
                return Err(Desync::NotFromStart);
            }
            self.next = piece.offset;
        }
        // Bytes already accounted for (a repeated piece) are dropped.
        let already = self.next.saturating_sub(piece.offset);
        let Some(bytes) = usize::try_from(already).ok().and_then(|already| piece.bytes.get(already..)) else {
            return Ok(());
        };
        let offset = piece.offset.max(self.next);
        if offset > self.next {
            self.lose(offset, previous, sink)?;
        }
        let times = SyscallTimes { start_ns: piece.start_ns, end_ns: piece.end_ns };
        self.consume(bytes, times, sink)?;
        self.settle_uncaptured_data(syscall_end, piece.end_ns, sink)
    }

    /// The last syscall returned at or before `now_ns`, when another one started: bytes it left
    /// uncaptured will never come, which may end a frame or lose the framing now rather than when
    /// this direction's next piece comes.
    pub fn settle_tail(&mut self, now_ns: u64, sink: &mut impl FrameSink) -> Result<(), Desync> {
        let Some(last) = self.last_syscall else { return Ok(()) };
        if matches!(self.state, State::Lost) || last.end <= self.next || last.end_ns > now_ns {
            return Ok(());
        }
        let result = self.lose(last.end, Some(last), sink);
        if result.is_err() {
            *self = Self::lost();
        }
        result
    }

    /// Bytes up to `to` will never come.
    fn lose(&mut self, to: u64, previous: Option<LastSyscall>, sink: &mut impl FrameSink) -> Result<(), Desync> {
        match &mut self.state {
            State::Preface { .. } | State::UpgradeAnswer { .. } | State::Header { .. } => {
                return Err(Desync::LostFrameBoundary)
            }
            State::Payload(partial) if to < partial.end => partial.cut = true,
            State::Payload(partial) => {
                partial.cut = true;
                let end = partial.end;
                // The frame ended in the previous syscall's uncaptured tail, or in a lost syscall.
                let end_ns = previous.map_or(partial.first.end_ns, |syscall| syscall.end_ns);
                self.next = end;
                self.finish(end_ns, sink)?;
                if to > end {
                    return Err(Desync::LostFrameBoundary);
                }
            }
            State::Lost => {}
        }
        self.next = to;
        Ok(())
    }

    fn consume(&mut self, mut bytes: &[u8], times: SyscallTimes, sink: &mut impl FrameSink) -> Result<(), Desync> {
        while !bytes.is_empty() {
            let used = match self.state {
                State::Preface { .. } => self.read_preface(bytes)?,
                State::UpgradeAnswer { .. } => self.skip_upgrade_answer(bytes)?,
                State::Header { .. } => self.read_header(bytes, times, sink)?,
                State::Payload(_) => self.fill(bytes, times, sink)?,
                State::Lost => 0,
            };
            if used == 0 {
                break;
            }
            self.next = self.next.saturating_add(used as u64);
            bytes = bytes.get(used..).unwrap_or_default();
        }
        Ok(())
    }

    /// Skip the `101` answer's head, up to and including its blank line.
    fn skip_upgrade_answer(&mut self, bytes: &[u8]) -> Result<usize, Desync> {
        let State::UpgradeAnswer { seen, tail } = &mut self.state else { return Ok(0) };
        for (used, &byte) in bytes.iter().enumerate() {
            *tail = [tail[1], tail[2], tail[3], byte];
            *seen += 1;
            if *tail == *b"\r\n\r\n" {
                self.state = header_start();
                return Ok(used + 1);
            }
            if *seen > MAX_UPGRADE_ANSWER {
                return Err(Desync::UpgradeAnswerTooLong);
            }
        }
        Ok(bytes.len())
    }

    fn read_preface(&mut self, bytes: &[u8]) -> Result<usize, Desync> {
        let State::Preface { seen } = &mut self.state else { return Ok(0) };
        let expected = PREFACE.get(*seen..).unwrap_or_default();
        let used = expected.len().min(bytes.len());
        if bytes.get(..used) != expected.get(..used) {
            return Err(Desync::NoPreface);
        }
        *seen += used;
        if *seen == PREFACE.len() {
            self.state = header_start();
        }
        Ok(used)
    }

    /// At a frame header: a whole frame at the start of `bytes` goes to the sink without copying;
    /// else the header is gathered. Returns the bytes used.
    fn read_header(&mut self, bytes: &[u8], times: SyscallTimes, sink: &mut impl FrameSink) -> Result<usize, Desync> {
        let State::Header { bytes: header, seen, first } = &mut self.state else { return Ok(0) };
        if *seen == 0 {
            *first = times;
            if let Some((header, payload)) = whole_frame_in(bytes) {
                sink.frame(Frame { header, payload, complete: true, first: times, end_ns: times.end_ns })?;
                return Ok(HEADER_LEN + payload.len());
            }
        }
        let used = (HEADER_LEN - *seen).min(bytes.len());
        for (slot, byte) in header.iter_mut().skip(*seen).zip(bytes) {
            *slot = *byte;
        }
        *seen += used;
        if *seen < HEADER_LEN {
            return Ok(used);
        }
        let (header, first) = (FrameHeader::parse(*header), *first);
        let end = self.next.saturating_add(used as u64).saturating_add(u64::from(header.length));
        self.state = State::Payload(Partial { header, end, cut: false, first });
        if header.length == 0 {
            self.finish(times.end_ns, sink)?;
        }
        Ok(used)
    }

    /// Inside a payload: keeps what the frame keeps of `bytes`, and hands the frame over at its end.
    fn fill(&mut self, bytes: &[u8], times: SyscallTimes, sink: &mut impl FrameSink) -> Result<usize, Desync> {
        let State::Payload(partial) = &self.state else { return Ok(0) };
        let left = partial.end.saturating_sub(self.next);
        let used = usize::try_from(left).map_or(bytes.len(), |left| left.min(bytes.len()));
        // After a cut the bytes no longer follow the kept ones.
        let room = if partial.cut { 0 } else { partial.header.kept_len().saturating_sub(self.kept.len()) };
        self.kept.extend_from_slice(bytes.get(..used.min(room)).unwrap_or_default());
        if used as u64 == left {
            self.finish(times.end_ns, sink)?;
        }
        Ok(used)
    }

    /// Hands the current frame over and goes back to a frame header.
    fn finish(&mut self, end_ns: u64, sink: &mut impl FrameSink) -> Result<(), Desync> {
        let State::Payload(partial) = self.state else { return Ok(()) };
        self.state = header_start();
        let frame =
            Frame { header: partial.header, payload: &self.kept, complete: !partial.cut, first: partial.first, end_ns };
        let result = sink.frame(frame);
        self.kept.clear();
        if self.kept.capacity() > KEPT_BUFFER_CAPACITY {
            self.kept = Vec::new();
        }
        result
    }

    /// The piece left the end of its syscall uncaptured: a DATA frame ending there is done now, its
    /// end time known, rather than when the direction's next piece shows the gap (its payload is
    /// only counted). A later piece of the same syscall finds those bytes already accounted for.
    fn settle_uncaptured_data(
        &mut self,
        syscall_end: u64,
        end_ns: u64,
        sink: &mut impl FrameSink,
    ) -> Result<(), Desync> {
        let State::Payload(partial) = &mut self.state else { return Ok(()) };
        let prefix_kept = self.kept.len() >= partial.header.kept_len();
        if self.next >= syscall_end || partial.header.kind != kind::DATA || partial.end > syscall_end || !prefix_kept {
            return Ok(());
        }
        partial.cut = true;
        self.next = partial.end;
        self.finish(end_ns, sink)
    }
}

fn header_start() -> State {
    State::Header { bytes: [0; HEADER_LEN], seen: 0, first: SyscallTimes::default() }
}

/// The header and payload of a whole frame at the start of `bytes`.
fn whole_frame_in(bytes: &[u8]) -> Option<(FrameHeader, &[u8])> {
    let (header, rest) = bytes.split_first_chunk::<HEADER_LEN>()?;
    let header = FrameHeader::parse(*header);
    Some((header, rest.get(..header.length as usize)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as tests compare them: header, kept payload, complete, first syscall start, end_ns.
    type Seen = (FrameHeader, Vec<u8>, bool, u64, u64);

    #[derive(Default)]
    struct Recorder {
        frames: Vec<Seen>,
    }

    impl FrameSink for Recorder {
        fn frame(&mut self, frame: Frame<'_>) -> Result<(), Desync> {
            // As kept when the frame spans pieces.
            let kept = frame.payload.get(..frame.header.kept_len()).unwrap_or(frame.payload);
            self.frames.push((frame.header, kept.to_vec(), frame.complete, frame.first.start_ns, frame.end_ns));
            Ok(())
        }
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let length = (payload.len() as u32).to_be_bytes();
        [&length[1..], &[kind, flags], &stream_id.to_be_bytes(), payload].concat()
    }

    /// Feeds `pieces` (offset, bytes, syscall_end), timing each syscall by its end offset.
    fn feed(framer: &mut Framer, recorder: &mut Recorder, pieces: &[(u64, &[u8], u64)]) -> Result<(), Desync> {
        for (offset, bytes, syscall_end) in pieces {
            let piece = Piece {
                outgoing: true,
                offset: *offset,
                bytes,
                syscall_end: *syscall_end,
                start_ns: syscall_end * 10,
                end_ns: syscall_end * 10 + 1,
            };
            framer.push(&piece, recorder)?;
        }
        Ok(())
    }

    fn stream() -> Vec<u8> {
        [
            PREFACE,
            &frame(kind::SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]),
            &frame(kind::HEADERS, flag::END_HEADERS, 1, b"\x82\x86\x84"),
            &frame(kind::DATA, 0, 1, b""),
            &frame(kind::DATA, flag::PADDED | flag::END_STREAM, 1, b"\x02body\0\0"),
            &frame(0x42, 0, 0, b"unknown type"),
        ]
        .concat()
    }

    fn kinds(recorder: &Recorder) -> Vec<(u8, usize, bool)> {
        recorder.frames.iter().map(|(header, payload, complete, ..)| (header.kind, payload.len(), *complete)).collect()
    }

    #[test]
    fn frames_split_at_every_position() {
        let stream = stream();
        let expected =
            [(kind::SETTINGS, 6, true), (kind::HEADERS, 3, true), (0, 0, true), (0, 1, true), (0x42, 0, true)];
        for split in 0..=stream.len() {
            for same_syscall in [false, true] {
                let (mut framer, mut recorder) = (Framer::new(true), Recorder::default());
                let (head, tail) = stream.split_at(split);
                let first_end = if same_syscall { stream.len() as u64 } else { split as u64 };
                feed(&mut framer, &mut recorder, &[(0, head, first_end), (split as u64, tail, stream.len() as u64)])
                    .unwrap();
                // The padded DATA's payload: 69..76.
                if same_syscall && split > 69 && split < 76 {
                    // Its pad length kept: settled incomplete before the rest came.
                    assert!(!recorder.frames[3].2, "split {split}");
                    assert_eq!(recorder.frames[3].1, b"\x02");
                    continue;
                }
                assert_eq!(kinds(&recorder), expected, "split {split} same syscall {same_syscall}");
                let headers = &recorder.frames[1];
                assert_eq!((headers.0.stream_id, headers.0.flags, headers.1.as_slice()), (1, 4, &b"\x82\x86\x84"[..]));
                let last = recorder.frames.last().unwrap();
                assert_eq!(last.4, stream.len() as u64 * 10 + 1, "ends with the last syscall");
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let stream = stream();
        let (mut framer, mut recorder) = (Framer::new(true), Recorder::default());
        for (at, byte) in stream.iter().enumerate() {
            feed(&mut framer, &mut recorder, &[(at as u64, &[*byte][..], at as u64 + 1)]).unwrap();
        }
        assert_eq!(kinds(&recorder).len(), 5);
        assert!(recorder.frames.iter().all(|seen| seen.2));
        // The settings frame started in the syscall of its first byte (offset 24, ending at 25).
        assert_eq!(recorder.frames[0].3, 250);
    }

    #[test]
    fn not_http2_or_not_from_the_start() {
        let (mut framer, mut recorder) = (Framer::new(true), Recorder::default());
        assert_eq!(feed(&mut framer, &mut recorder, &[(0, b"GET / HTTP/1.1\r\n", 16)]), Err(Desync::NoPreface));
        assert_eq!(feed(&mut framer, &mut recorder, &[(16, &stream(), 100)]), Ok(()), "lost: ignores all");
        assert!(recorder.frames.is_empty());
        let (mut framer, mut recorder) = (Framer::new(false), Recorder::default());
        assert_eq!(feed(&mut framer, &mut recorder, &[(30, &stream()[24..], 100)]), Err(Desync::NotFromStart));
    }

    #[test]
    fn uncaptured_data_tail_is_settled_with_its_syscall() {
        let data = frame(kind::DATA, flag::END_STREAM, 1, &[7; 5000]);
        let next = frame(kind::RST_STREAM, 0, 1, &[0, 0, 0, 8]);
        let (mut framer, mut recorder) = (Framer::new(false), Recorder::default());
        // 1000 bytes of the first syscall captured: the frame ends in its tail.
        let end = data.len() as u64;
        feed(&mut framer, &mut recorder, &[(0, &data[..1000], end)]).unwrap();
        assert_eq!(recorder.frames.len(), 1, "settled without waiting");
        let (header, payload, complete, _, end_ns) = &recorder.frames[0];
        assert_eq!((header.length, payload.len(), *complete, *end_ns), (5000, 0, false, end * 10 + 1));
        // A later piece of the same syscall is already accounted for; framing goes on.
        feed(&mut framer, &mut recorder, &[(1000, &data[1000..2000], end), (end, &next, end + 13)]).unwrap();
        assert_eq!(kinds(&recorder), [(kind::DATA, 0, false), (kind::RST_STREAM, 4, true)]);
        assert!(framer.kept.capacity() < 64, "DATA is not buffered");
    }

    #[test]
    fn lost_bytes_inside_a_frame_cut_it_only() {
        let data = frame(kind::DATA, 0, 1, &[7; 100]);
        let headers = frame(kind::HEADERS, flag::END_HEADERS, 1, &[0x82; 50]);
        let rst = frame(kind::RST_STREAM, 0, 1, &[0, 0, 0, 8]);
        let stream = [data.clone(), headers.clone(), rst].concat();
        let (d, h) = (data.len() as u64, (data.len() + headers.len()) as u64);
        let (mut framer, mut recorder) = (Framer::new(false), Recorder::default());
        // The DATA frame spans two syscalls and loses bytes 50..60; the HEADERS frame loses its last
        // 10 bytes in a lost syscall: cut, end time from the syscall before.
        feed(&mut framer, &mut recorder, &[(0, &stream[..50], 50), (60, &stream[60..120], 120)]).unwrap();
        feed(&mut framer, &mut recorder, &[(h, &stream[h as usize..], stream.len() as u64)]).unwrap();
        let seen: Vec<(u8, bool, u64)> = recorder.frames.iter().map(|seen| (seen.0.kind, seen.2, seen.4)).collect();
        assert_eq!(seen, [(kind::DATA, false, 1201), (kind::HEADERS, false, 1201), (kind::RST_STREAM, true, 1811)]);
        assert_eq!(recorder.frames[1].1, &headers[9..9 + 120 - d as usize - 9], "the captured start of HEADERS");
    }

    #[test]
    fn lost_frame_boundary_desyncs() {
        let stream = [frame(kind::DATA, 0, 1, &[7; 10]), frame(kind::DATA, 0, 1, &[7; 10])].concat();
        for (cut_from, cut_to) in [(19, 20), (19, 25), (10, 25), (18, 30)] {
            let (mut framer, mut recorder) = (Framer::new(false), Recorder::default());
            let pieces = [(0, &stream[..cut_from], cut_from as u64), (cut_to as u64, &stream[cut_to..], 38)];
            assert_eq!(
                feed(&mut framer, &mut recorder, &pieces),
                Err(Desync::LostFrameBoundary),
                "{cut_from}..{cut_to}"
            );
        }
        // A gap ending exactly at a frame end keeps the framing.
        let (mut framer, mut recorder) = (Framer::new(false), Recorder::default());
        feed(&mut framer, &mut recorder, &[(0, &stream[..15], 15), (19, &stream[19..], 38)]).unwrap();
        assert_eq!(kinds(&recorder), [(0, 0, false), (0, 0, true)]);
    }

    #[test]
    fn repeated_bytes_are_dropped() {
        let stream = stream();
        let (mut framer, mut recorder) = (Framer::new(true), Recorder::default());
        let all = stream.len() as u64;
        feed(&mut framer, &mut recorder, &[(0, &stream[..40], 40), (30, &stream[30..], all), (0, &stream, all)])
            .unwrap();
        assert_eq!(kinds(&recorder).len(), 5);
    }

    #[test]
    fn header_blocks_beyond_the_bound_are_not_kept() {
        let big = frame(kind::HEADERS, 0, 1, &vec![0x82; MAX_HEADER_BLOCK + 1]);
        let (mut framer, mut recorder) = (Framer::new(false), Recorder::default());
        for (index, chunk) in big.chunks(1000).enumerate() {
            let offset = index as u64 * 1000;
            feed(&mut framer, &mut recorder, &[(offset, chunk, offset + chunk.len() as u64)]).unwrap();
        }
        // Complete, but its payload (too long to decode) was not kept.
        assert_eq!((recorder.frames[0].1.len(), recorder.frames[0].2), (0, true));
        assert!(framer.kept.capacity() < 64);
    }
}
