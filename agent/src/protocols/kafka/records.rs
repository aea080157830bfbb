//! Record batches (<https://kafka.apache.org/documentation/#recordbatch>): record counts, offsets and the
//! `traceparent` header of the first records, without copying keys or values.
//!
//! Magic 2 batches count their records in the batch header, so only the first [`MAX_TRACED_RECORDS`]
//! records are read, and a compressed batch is inflated only as far as those records reach (never
//! past [`MAX_INFLATED_BYTES`]). Legacy message sets (magic 0 and 1, Produce v0-2 / Fetch v0-3) have
//! no headers and no count: their messages are counted, inflating compressed wrappers (bounded too).
//! Batches are not CRC-checked: the frame was captured whole, and a corrupt one can only yield wrong
//! numbers, never a panic.

use std::io::Read;

use super::{
    wire::{Reader, WireError, WireResult},
    FetchedBatch, FetchedRecord,
};

/// Records per batch (Fetch) or per partition (Produce) whose traceparent is read.
pub const MAX_TRACED_RECORDS: usize = 64;
/// Decompressed bytes one batch may inflate to; the rest is not read.
pub const MAX_INFLATED_BYTES: usize = 8 << 20;
/// Records one message (all its batches) details at most; beyond them records are only counted.
pub const MAX_TRACED_PER_MESSAGE: usize = 4096;
/// Decompressed bytes one message may inflate to in all: a frame of many small compressed batches
/// must not cost more than a few big ones.
pub const MAX_INFLATED_PER_MESSAGE: usize = 32 << 20;
/// The zstd window that fits the bound above: frames declaring larger windows are refused, which caps
/// the decoder's memory too.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;
/// Decompressed bytes read between two attempts to parse records.
const INFLATE_STEP: usize = 16 << 10;
const ATTRIBUTE_COMPRESSION_MASK: i16 = 0x07;
const ATTRIBUTE_CONTROL: i16 = 0x20;
const XERIAL_SNAPPY_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
/// The xerial magic, version and compatible version before the first block.
const XERIAL_SNAPPY_HEADER_BYTES: usize = 16;
const TRACEPARENT: &[u8] = b"traceparent";

/// Compression codecs of batch (and legacy message) attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    fn from_attributes(attributes: i16) -> Option<Self> {
        match attributes & ATTRIBUTE_COMPRESSION_MASK {
            0 => Some(Self::None),
            1 => Some(Self::Gzip),
            2 => Some(Self::Snappy),
            3 => Some(Self::Lz4),
            4 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// Iterates the batches of a RECORDS field. Stops at the first partial batch (a Fetch response may end
/// with one, cut at the fetch size) or at bytes that are no batch.
pub struct Batches<'a> {
    reader: Reader<'a>,
}

/// What reading the batches of one message may still cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Records whose offset and traceparent may still be read.
    pub traced: usize,
    /// Bytes that may still be inflated.
    pub inflated: usize,
}

impl Default for Allowance {
    fn default() -> Self {
        Self { traced: MAX_TRACED_PER_MESSAGE, inflated: MAX_INFLATED_PER_MESSAGE }
    }
}

/// What one entry of a RECORDS field turned out to be.
enum Entry {
    Batch(FetchedBatch),
    /// A transaction marker or an unknown codec: no user records to report.
    Skipped,
    /// Not a batch: the rest of the field is not trusted.
    Invalid,
}

impl<'a> Batches<'a> {
    pub fn new(records: &'a [u8]) -> Self {
        Self { reader: Reader::new(records) }
    }

    /// The next batch, with at most `traced` of its first records detailed, as `allowance` permits.
    pub fn next_batch(&mut self, traced: usize, allowance: &mut Allowance) -> Option<FetchedBatch> {
        let traced = traced.min(allowance.traced);
        loop {
            let (base_offset, entry) = self.next_entry()?;
            let parsed = match entry.get(4) {
                Some(2) => read_batch(base_offset, entry, traced, &mut allowance.inflated),
                Some(0 | 1) => read_legacy(base_offset, entry, traced, &mut allowance.inflated),
                _ => Entry::Invalid,
            };
            match parsed {
                Entry::Batch(batch) => {
                    allowance.traced -= batch.records.len();
                    return Some(batch);
                }
                Entry::Skipped => continue,
                Entry::Invalid => {
                    self.reader = Reader::new(&[]);
                    return None;
                }
            }
        }
    }

    /// The offset and bytes of the next entry; None when what remains is shorter than it says.
    fn next_entry(&mut self) -> Option<(i64, &'a [u8])> {
        let mut reader = self.reader;
        let base_offset = reader.i64().ok()?;
        let length = usize::try_from(reader.i32().ok()?).ok()?;
        let entry = reader.take(length).ok()?;
        self.reader = reader;
        Some((base_offset, entry))
    }
}

/// A magic 2 batch; `entry` starts at partitionLeaderEpoch.
fn read_batch(base_offset: i64, entry: &[u8], traced: usize, inflatable: &mut usize) -> Entry {
    read_batch_fields(base_offset, entry, traced, inflatable).unwrap_or(Entry::Invalid)
}

fn read_batch_fields(base_offset: i64, entry: &[u8], traced: usize, inflatable: &mut usize) -> WireResult<Entry> {
    let mut reader = Reader::new(entry);
    // partitionLeaderEpoch, magic, crc.
    reader.skip(4 + 1 + 4)?;
    let attributes = reader.i16()?;
    // lastOffsetDelta, baseTimestamp, maxTimestamp, producerId, producerEpoch, baseSequence.
    reader.skip(4 + 8 + 8 + 8 + 2 + 4)?;
    let count = u32::try_from(reader.i32()?).map_err(|_| WireError::BadLength(-1))?;
    if attributes & ATTRIBUTE_CONTROL != 0 {
        return Ok(Entry::Skipped);
    }
    let Some(codec) = Codec::from_attributes(attributes) else { return Ok(Entry::Skipped) };
    let traced = traced.min(count as usize);
    let records = match codec {
        Codec::None => {
            let mut walk = RecordWalk::new(base_offset, traced);
            walk.advance(reader.rest());
            walk.records
        }
        compressed => traced_compressed_records(compressed, reader.rest(), base_offset, traced, inflatable),
    };
    Ok(Entry::Batch(FetchedBatch { base_offset, record_count: count, records }))
}

/// Parses records, as bytes become available, until enough are detailed.
struct RecordWalk {
    base_offset: i64,
    wanted: usize,
    records: Vec<FetchedRecord>,
    /// Bytes of the input consumed by complete records.
    consumed: usize,
    /// A record did not parse: nothing after it is trusted.
    broken: bool,
}

impl RecordWalk {
    fn new(base_offset: i64, wanted: usize) -> Self {
        Self { base_offset, wanted, records: Vec::with_capacity(wanted), consumed: 0, broken: false }
    }

    fn finished(&self) -> bool {
        self.broken || self.records.len() >= self.wanted
    }

    /// Reads the complete records at the start of `bytes`, noting how many bytes they took.
    fn advance(&mut self, bytes: &[u8]) {
        let mut reader = Reader::new(bytes);
        while !self.finished() {
            let Ok(length) = reader.varint() else { break };
            let Ok(length) = usize::try_from(length) else {
                self.broken = true;
                break;
            };
            let Ok(body) = reader.take(length) else { break };
            match read_record(body) {
                Ok((offset_delta, traceparent)) => {
                    let offset = self.base_offset.wrapping_add(i64::from(offset_delta));
                    self.records.push(FetchedRecord { offset, traceparent: traceparent.map(<[u8]>::to_vec) });
                    self.consumed = bytes.len() - reader.remaining();
                }
                Err(_) => self.broken = true,
            }
        }
    }
}

/// One record's offset delta and traceparent header value (the first, when several).
fn read_record(body: &[u8]) -> WireResult<(i32, Option<&[u8]>)> {
    let mut reader = Reader::new(body);
    let _attributes = reader.i8()?;
    let _timestamp_delta = reader.varlong()?;
    let offset_delta = reader.varint()?;
    let _key = varint_bytes(&mut reader)?;
    let _value = varint_bytes(&mut reader)?;
    let header_count = reader.varint()?;
    let mut traceparent = None;
    // Each header takes two bytes at least, so a hostile count ends at the first missing byte.
    for _ in 0..header_count.max(0) {
        let key = varint_bytes(&mut reader)?.unwrap_or_default();
        let value = varint_bytes(&mut reader)?;
        if traceparent.is_none() && key.eq_ignore_ascii_case(TRACEPARENT) {
            traceparent = value;
        }
    }
    Ok((offset_delta, traceparent))
}

/// Record-level bytes: a varint length (-1 for null) and that many bytes.
fn varint_bytes<'a>(reader: &mut Reader<'a>) -> WireResult<Option<&'a [u8]>> {
    match reader.varint()? {
        -1 => Ok(None),
        length => {
            let length = usize::try_from(length).map_err(|_| WireError::BadLength(i64::from(length)))?;
            reader.take(length).map(Some)
        }
    }
}

/// Inflates a compressed batch step by step until its first `traced` records are read.
fn traced_compressed_records(
    codec: Codec,
    compressed: &[u8],
    base_offset: i64,
    traced: usize,
    inflatable: &mut usize,
) -> Vec<FetchedRecord> {
    let mut walk = RecordWalk::new(base_offset, traced);
    if traced == 0 {
        return walk.records;
    }
    let Some(mut inflater) = Inflater::open(codec, compressed, *inflatable) else { return walk.records };
    let mut pending = Vec::new();
    loop {
        // Bytes inflated before a corruption still count.
        let more = inflater.step(&mut pending);
        walk.advance(&pending);
        if !more || walk.finished() {
            *inflatable -= inflater.produced();
            return walk.records;
        }
        // Keep only the incomplete record at the end.
        pending.drain(..walk.consumed);
        walk.consumed = 0;
    }
}

/// A decompressor that produces at most [`MAX_INFLATED_BYTES`], or its `limit` when lower.
enum Inflater<'a> {
    Stream { reader: Box<dyn Read + 'a>, produced: usize, limit: usize },
    Snappy(SnappyBlocks<'a>),
}

impl<'a> Inflater<'a> {
    fn open(codec: Codec, compressed: &'a [u8], limit: usize) -> Option<Self> {
        let limit = limit.min(MAX_INFLATED_BYTES);
        let reader: Box<dyn Read + 'a> = match codec {
            Codec::None => Box::new(compressed),
            // Multi-member: some producers concatenate gzip members.
            Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(compressed)),
            Codec::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(compressed)),
            Codec::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed).ok()?;
                decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).ok()?;
                Box::new(decoder)
            }
            Codec::Snappy => return Some(Self::Snappy(SnappyBlocks::new(compressed, limit))),
        };
        Some(Self::Stream { reader, produced: 0, limit })
    }

    /// Bytes inflated so far.
    fn produced(&self) -> usize {
        match self {
            Self::Stream { produced, .. } => *produced,
            Self::Snappy(blocks) => blocks.produced,
        }
    }

    /// Appends the next decompressed bytes to `out`; false at the end, on corrupt input, or at the bound.
    fn step(&mut self, out: &mut Vec<u8>) -> bool {
        match self {
            Self::Stream { reader, produced, limit } => {
                let budget = INFLATE_STEP.min(*limit - *produced) as u64;
                match reader.by_ref().take(budget).read_to_end(out) {
                    Ok(read) if read > 0 => {
                        *produced += read;
                        true
                    }
                    _ => false,
                }
            }
            Self::Snappy(blocks) => blocks.step(out),
        }
    }

    /// Everything, up to the bound; None when corrupt or past the bound (a part would miscount).
    fn inflate_all(&mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        while self.step(&mut out) {}
        let complete = match self {
            Self::Stream { reader, .. } => matches!(reader.read(&mut [0u8; 1]), Ok(0)),
            Self::Snappy(blocks) => blocks.rest.is_empty(),
        };
        complete.then_some(out)
    }
}

/// Snappy as Kafka clients write it: xerial-framed blocks (Java) or one raw block (librdkafka).
struct SnappyBlocks<'a> {
    rest: &'a [u8],
    framed: bool,
    produced: usize,
    limit: usize,
}

impl<'a> SnappyBlocks<'a> {
    fn new(compressed: &'a [u8], limit: usize) -> Self {
        let (rest, framed) = match compressed.strip_prefix(XERIAL_SNAPPY_MAGIC) {
            Some(_) => (compressed.get(XERIAL_SNAPPY_HEADER_BYTES..).unwrap_or_default(), true),
            None => (compressed, false),
        };
        Self { rest, framed, produced: 0, limit }
    }

    fn step(&mut self, out: &mut Vec<u8>) -> bool {
        let block = if self.framed {
            let mut reader = Reader::new(self.rest);
            let Ok(Some(block)) = reader.bytes(false) else { return false };
            self.rest = reader.rest();
            block
        } else {
            std::mem::take(&mut self.rest)
        };
        if block.is_empty() {
            return false;
        }
        // The declared length is checked before anything is allocated for it.
        let Ok(length) = snap::raw::decompress_len(block) else { return false };
        if length > self.limit - self.produced {
            return false;
        }
        let start = out.len();
        out.resize(start + length, 0);
        match snap::raw::Decoder::new().decompress(block, &mut out[start..]) {
            Ok(written) => {
                out.truncate(start + written);
                self.produced += written;
                true
            }
            Err(_) => {
                out.truncate(start);
                false
            }
        }
    }
}

/// A legacy (magic 0/1) message: one record, or a compressed wrapper around a message set.
fn read_legacy(offset: i64, entry: &[u8], traced: usize, inflatable: &mut usize) -> Entry {
    let Ok(LegacyMessage { magic, codec, value }) = legacy_message(entry) else { return Entry::Invalid };
    match codec {
        Some(Codec::None) => {
            let records = if traced > 0 { vec![FetchedRecord { offset, traceparent: None }] } else { Vec::new() };
            Entry::Batch(FetchedBatch { base_offset: offset, record_count: 1, records })
        }
        Some(codec) => legacy_wrapper(offset, magic, codec, value.unwrap_or_default(), traced, inflatable),
        None => Entry::Skipped,
    }
}

/// The fields of a legacy message that matter here.
struct LegacyMessage<'a> {
    magic: i8,
    /// None for a codec Kafka does not define.
    codec: Option<Codec>,
    value: Option<&'a [u8]>,
}

fn legacy_message(entry: &[u8]) -> WireResult<LegacyMessage<'_>> {
    let mut reader = Reader::new(entry);
    let _crc = reader.i32()?;
    let magic = reader.i8()?;
    let attributes = reader.i8()?;
    if magic == 1 {
        let _timestamp = reader.i64()?;
    }
    let _key = reader.bytes(false)?;
    let value = reader.bytes(false)?;
    Ok(LegacyMessage { magic, codec: Codec::from_attributes(i16::from(attributes)), value })
}

/// Counts the messages of a compressed wrapper. Inner offsets are absolute in magic 0; in magic 1
/// they are relative and the wrapper carries the last message's absolute offset.
fn legacy_wrapper(
    offset: i64,
    magic: i8,
    codec: Codec,
    compressed: &[u8],
    traced: usize,
    inflatable: &mut usize,
) -> Entry {
    let Some(mut inflater) = Inflater::open(codec, compressed, *inflatable) else { return Entry::Skipped };
    let inner = inflater.inflate_all();
    *inflatable -= inflater.produced();
    let Some(inner) = inner else { return Entry::Skipped };
    let mut messages = Batches::new(&inner);
    let mut offsets = Vec::new();
    let mut count = 0u32;
    let mut last_inner = 0i64;
    while let Some((inner_offset, _)) = messages.next_entry() {
        count += 1;
        last_inner = inner_offset;
        if offsets.len() < traced {
            offsets.push(inner_offset);
        }
    }
    let shift = if magic == 1 { offset.wrapping_sub(last_inner) } else { 0 };
    let records: Vec<FetchedRecord> =
        offsets.iter().map(|inner| FetchedRecord { offset: inner.wrapping_add(shift), traceparent: None }).collect();
    let base_offset = records.first().map_or(offset, |record| record.offset);
    Entry::Batch(FetchedBatch { base_offset, record_count: count, records })
}

#[cfg(test)]
pub mod tests {
    use std::io::Write;

    use super::*;

    /// A record as tests describe it: offset delta, value, headers.
    pub struct TestRecord<'a> {
        pub offset_delta: i32,
        pub value: &'a [u8],
        pub headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
    }

    fn put_varint(out: &mut Vec<u8>, value: i64) {
        let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
        loop {
            let byte = (zigzag & 0x7f) as u8;
            zigzag >>= 7;
            if zigzag == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn put_varint_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
        match bytes {
            Some(bytes) => {
                put_varint(out, bytes.len() as i64);
                out.extend_from_slice(bytes);
            }
            None => put_varint(out, -1),
        }
    }

    pub fn encode_records(records: &[TestRecord<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for record in records {
            let mut body = vec![0u8];
            put_varint(&mut body, 7);
            put_varint(&mut body, i64::from(record.offset_delta));
            put_varint_bytes(&mut body, None);
            put_varint_bytes(&mut body, Some(record.value));
            put_varint(&mut body, record.headers.len() as i64);
            for (key, value) in &record.headers {
                put_varint_bytes(&mut body, Some(key));
                put_varint_bytes(&mut body, *value);
            }
            put_varint(&mut out, body.len() as i64);
            out.extend_from_slice(&body);
        }
        out
    }

    pub fn compress(codec: i16, raw: &[u8]) -> Vec<u8> {
        match codec {
            0 => raw.to_vec(),
            1 => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                encoder.write_all(raw).unwrap();
                encoder.finish().unwrap()
            }
            2 => snap::raw::Encoder::new().compress_vec(raw).unwrap(),
            3 => {
                let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::new());
                encoder.write_all(raw).unwrap();
                encoder.finish().unwrap()
            }
            4 => zstd::encode_all(raw, 3).unwrap(),
            _ => unreachable!(),
        }
    }

    /// A magic 2 batch (CRC left zero: it is not checked).
    pub fn encode_batch(base_offset: i64, attributes: i16, count: i32, records: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&0i32.to_be_bytes());
        body.push(2);
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&attributes.to_be_bytes());
        body.extend_from_slice(&(count - 1).to_be_bytes());
        body.extend_from_slice(&[0u8; 8 + 8 + 8 + 2 + 4]);
        body.extend_from_slice(&count.to_be_bytes());
        body.extend_from_slice(records);
        let mut out = base_offset.to_be_bytes().to_vec();
        out.extend_from_slice(&(body.len() as i32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn traced_records(count: usize) -> Vec<u8> {
        let values: Vec<String> = (0..count).map(|index| format!("00-{index:032x}-{index:016x}-01")).collect();
        let records: Vec<TestRecord<'_>> = values
            .iter()
            .enumerate()
            .map(|(index, traceparent)| TestRecord {
                offset_delta: index as i32,
                value: b"payload",
                headers: if index % 2 == 0 { vec![(b"traceparent", Some(traceparent.as_bytes()))] } else { vec![] },
            })
            .collect();
        encode_records(&records)
    }

    fn all_batches(records: &[u8], traced: usize) -> Vec<FetchedBatch> {
        let mut batches = Batches::new(records);
        let mut allowance = Allowance::default();
        std::iter::from_fn(|| batches.next_batch(traced, &mut allowance)).collect()
    }

    #[test]
    fn every_codec_yields_the_same_records() {
        let raw = traced_records(100);
        for codec in 0..=4 {
            let batch = encode_batch(1000, codec, 100, &compress(codec, &raw));
            let batches = all_batches(&batch, MAX_TRACED_RECORDS);
            assert_eq!(batches.len(), 1, "codec {codec}");
            assert_eq!(batches[0].base_offset, 1000);
            assert_eq!(batches[0].record_count, 100);
            assert_eq!(batches[0].records.len(), MAX_TRACED_RECORDS);
            assert_eq!(batches[0].records[3], FetchedRecord { offset: 1003, traceparent: None });
            let expected = format!("00-{:032x}-{:016x}-01", 62, 62).into_bytes();
            assert_eq!(batches[0].records[62], FetchedRecord { offset: 1062, traceparent: Some(expected) });
        }
    }

    #[test]
    fn header_names_match_case_insensitively_and_first_wins() {
        let records = encode_records(&[TestRecord {
            offset_delta: 0,
            value: b"v",
            headers: vec![(b"x", Some(b"1")), (b"TraceParent", Some(b"first")), (b"traceparent", Some(b"second"))],
        }]);
        let batches = all_batches(&encode_batch(5, 0, 1, &records), 1);
        assert_eq!(batches[0].records[0].traceparent.as_deref(), Some(&b"first"[..]));
        let null_value =
            encode_records(&[TestRecord { offset_delta: 0, value: b"v", headers: vec![(b"traceparent", None)] }]);
        assert_eq!(all_batches(&encode_batch(5, 0, 1, &null_value), 1)[0].records[0].traceparent, None);
    }

    #[test]
    fn partial_tail_batch_is_ignored() {
        let raw = traced_records(3);
        let mut records = encode_batch(0, 0, 3, &raw);
        let second = encode_batch(3, 4, 3, &compress(4, &raw));
        records.extend_from_slice(&second[..second.len() - 5]);
        let batches = all_batches(&records, MAX_TRACED_RECORDS);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].record_count, 3);
        // A tail too short for even the entry prefix.
        records.truncate(records.len() - second.len() + 7);
        assert_eq!(all_batches(&records, MAX_TRACED_RECORDS).len(), 1);
    }

    #[test]
    fn control_batches_are_skipped() {
        let raw = traced_records(1);
        let mut records = encode_batch(0, ATTRIBUTE_CONTROL, 1, &raw);
        records.extend(encode_batch(1, 0, 1, &raw));
        let batches = all_batches(&records, MAX_TRACED_RECORDS);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].base_offset, 1);
    }

    #[test]
    fn inflating_stops_at_the_bound() {
        // 16 MiB of zeros compress to a few KiB: a bomb for a decoder that trusts its input.
        let bomb = vec![0u8; 2 * MAX_INFLATED_BYTES];
        for codec in [1, 3, 4] {
            let compressed = compress(codec, &bomb);
            let mut inflater = Inflater::open(Codec::from_attributes(codec).unwrap(), &compressed, usize::MAX).unwrap();
            let mut out = Vec::new();
            while inflater.step(&mut out) {}
            assert_eq!(out.len(), MAX_INFLATED_BYTES, "codec {codec}");
            let batch = encode_batch(0, codec, 1, &compressed);
            assert_eq!(all_batches(&batch, 1)[0].records, [], "codec {codec}");
        }
        // Snappy declares its length up front: refused before allocating.
        let compressed = compress(2, &bomb);
        let mut out = Vec::new();
        assert!(!SnappyBlocks::new(&compressed, MAX_INFLATED_BYTES).step(&mut out));
        assert!(out.capacity() == 0);
    }

    #[test]
    fn xerial_framed_snappy() {
        let raw = traced_records(10);
        let mut framed = XERIAL_SNAPPY_MAGIC.to_vec();
        framed.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
        for chunk in raw.chunks(100) {
            let block = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
            framed.extend_from_slice(&(block.len() as i32).to_be_bytes());
            framed.extend_from_slice(&block);
        }
        let batches = all_batches(&encode_batch(0, 2, 10, &framed), MAX_TRACED_RECORDS);
        assert_eq!(batches[0].records.len(), 10);
        assert!(batches[0].records[8].traceparent.is_some());
    }

    #[test]
    fn corrupt_compressed_data_keeps_the_count() {
        let raw = traced_records(5);
        for codec in 1..=4 {
            let mut compressed = compress(codec, &raw);
            let middle = compressed.len() / 2;
            compressed[middle..].iter_mut().for_each(|byte| *byte ^= 0x5a);
            let batches = all_batches(&encode_batch(0, codec, 5, &compressed), MAX_TRACED_RECORDS);
            assert_eq!(batches[0].record_count, 5, "codec {codec}");
            assert!(batches[0].records.len() <= 5);
        }
    }

    fn legacy_message(offset: i64, magic: i8, attributes: i8, value: &[u8]) -> Vec<u8> {
        let mut message = vec![0, 0, 0, 0, magic as u8, attributes as u8];
        if magic == 1 {
            message.extend_from_slice(&0i64.to_be_bytes());
        }
        message.extend_from_slice(&(-1i32).to_be_bytes());
        message.extend_from_slice(&(value.len() as i32).to_be_bytes());
        message.extend_from_slice(value);
        let mut out = offset.to_be_bytes().to_vec();
        out.extend_from_slice(&(message.len() as i32).to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    #[test]
    fn legacy_message_sets_are_counted() {
        let mut set = legacy_message(7, 0, 0, b"a");
        set.extend(legacy_message(8, 1, 0, b"b"));
        let inner: Vec<u8> = (0..3).flat_map(|relative| legacy_message(relative, 1, 0, b"x")).collect();
        set.extend(legacy_message(11, 1, 1, &compress(1, &inner)));
        let absolute: Vec<u8> = (20..22).flat_map(|offset| legacy_message(offset, 0, 0, b"x")).collect();
        set.extend(legacy_message(21, 0, 1, &compress(1, &absolute)));
        let batches = all_batches(&set, MAX_TRACED_RECORDS);
        let summary: Vec<(i64, u32, Vec<i64>)> = batches
            .iter()
            .map(|batch| (batch.base_offset, batch.record_count, batch.records.iter().map(|r| r.offset).collect()))
            .collect();
        assert_eq!(summary, [(7, 1, vec![7]), (8, 1, vec![8]), (9, 3, vec![9, 10, 11]), (20, 2, vec![20, 21])]);
    }

    #[test]
    fn a_message_shares_one_allowance() {
        // One record longer than a batch may inflate: its end is never found.
        let mut raw = Vec::new();
        put_varint(&mut raw, 2 * MAX_INFLATED_BYTES as i64);
        raw.resize(2 * MAX_INFLATED_BYTES, 0);
        let batch = encode_batch(0, 4, 1, &compress(4, &raw));
        let records: Vec<u8> = std::iter::repeat_n(batch.as_slice(), 10).flatten().copied().collect();
        let mut batches = Batches::new(&records);
        let mut allowance = Allowance::default();
        let mut count = 0;
        while let Some(batch) = batches.next_batch(1, &mut allowance) {
            assert_eq!(batch.record_count, 1, "still counted");
            count += 1;
        }
        assert_eq!(count, 10);
        assert_eq!(allowance.inflated, 0, "four bombs used it all, the others inflated nothing");
        // Legacy wrappers past the allowance are not counted: their count needs inflating.
        let inner: Vec<u8> = (0..3).flat_map(|relative| legacy_message(relative, 1, 0, b"x")).collect();
        let wrapper = legacy_message(2, 1, 1, &compress(1, &inner));
        let mut exhausted = Allowance { traced: 10, inflated: 0 };
        assert_eq!(Batches::new(&wrapper).next_batch(10, &mut exhausted), None);
    }

    #[test]
    fn garbage_stops_iteration() {
        let mut records = encode_batch(0, 0, 1, &traced_records(1));
        records.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 9]);
        records.extend(encode_batch(1, 0, 1, &traced_records(1)));
        assert_eq!(all_batches(&records, 1).len(), 1);
    }
}
