//! HPACK header block decoding (RFC 7541): one [`Decoder`] per direction of a connection, as each
//! direction's encoder keeps its own dynamic table.
//!
//! Fields are handed to a callback as borrowed bytes, so fields nobody keeps cost no copy. Work per
//! block is bounded by the block's length plus [`MAX_DECODED_LIST`], memory by [`MAX_TABLE_SIZE`].

use std::collections::VecDeque;

use thiserror::Error;

use super::huffman::{self, HuffmanError};

/// Largest dynamic table followed: a size update above it fails decoding.
pub const MAX_TABLE_SIZE: usize = 64 << 10;
/// Decoded size of a block's fields (RFC 7541 §4.1: name + value + 32 each) above which decoding
/// fails. It bounds the work of blocks made of references to big table entries.
pub const MAX_DECODED_LIST: usize = 1 << 20;
/// The table size both ends start with (SETTINGS_HEADER_TABLE_SIZE's default).
const DEFAULT_TABLE_SIZE: usize = 4096;
/// Bytes an entry counts for beyond its name and value (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;
/// Scratch buffers that grew past this are released after a block.
const KEPT_SCRATCH_CAPACITY: usize = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block ends inside a field")]
    Truncated,
    /// An integer above 2^32 - 1.
    #[error("integer overflow")]
    IntegerOverflow,
    /// Index 0, or past the static and dynamic tables.
    #[error("no table entry at index {0}")]
    BadIndex(u32),
    /// A dynamic table size update above the largest size the decoding side announced (or above
    /// [`MAX_TABLE_SIZE`]).
    #[error("table size update to {size} above the limit {limit}")]
    TableSizeAboveLimit { size: u32, limit: usize },
    /// A dynamic table size update after a field of the block.
    #[error("table size update after a field")]
    LateTableSizeUpdate,
    /// The block decodes to more than [`MAX_DECODED_LIST`] bytes.
    #[error("decoded header list above {MAX_DECODED_LIST} bytes")]
    ListTooLarge,
    #[error(transparent)]
    Huffman(#[from] HuffmanError),
}

/// Decodes the header blocks one encoder sends.
#[derive(Debug)]
pub struct Decoder {
    table: DynamicTable,
    /// The largest SETTINGS_HEADER_TABLE_SIZE the decoding side announced, at most [`MAX_TABLE_SIZE`].
    limit: usize,
    /// Huffman-decoded name and value of the current field.
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            table: DynamicTable::new(DEFAULT_TABLE_SIZE),
            limit: DEFAULT_TABLE_SIZE,
            name: Vec::new(),
            value: Vec::new(),
        }
    }
}

impl Decoder {
    /// The decoding side announced SETTINGS_HEADER_TABLE_SIZE `size`; None when it may have but the
    /// SETTINGS frame was not captured whole.
    pub fn announce_table_size(&mut self, size: Option<u32>) {
        // The encoder may go on with a larger size until it sees a smaller one: the largest stands.
        let size = size.map_or(MAX_TABLE_SIZE, |size| usize::try_from(size).unwrap_or(usize::MAX));
        self.limit = self.limit.max(size.min(MAX_TABLE_SIZE));
    }

    /// Decodes a whole header block, handing each field (name, value) to `field` in order.
    pub fn decode(&mut self, block: &[u8], field: &mut impl FnMut(&[u8], &[u8])) -> Result<(), HpackError> {
        let result = self.decode_fields(block, field);
        for scratch in [&mut self.name, &mut self.value] {
            if scratch.capacity() > KEPT_SCRATCH_CAPACITY {
                *scratch = Vec::new();
            }
        }
        result
    }

    fn decode_fields(&mut self, block: &[u8], field: &mut impl FnMut(&[u8], &[u8])) -> Result<(), HpackError> {
        let mut rest = block;
        let mut budget = MAX_DECODED_LIST;
        let mut seen_field = false;
        while let Some(&first) = rest.first() {
            match first {
                0x80.. => self.indexed(&mut rest, &mut budget, field)?,
                0x40.. => self.literal_with_indexing(&mut rest, &mut budget, field)?,
                0x20.. if seen_field => return Err(HpackError::LateTableSizeUpdate),
                0x20.. => {
                    self.resize(read_integer(&mut rest, 5)?)?;
                    continue;
                }
                // Without indexing (0000) or never indexed (0001): the same to a decoder.
                _ => self.literal_without_indexing(&mut rest, &mut budget, field)?,
            }
            seen_field = true;
        }
        Ok(())
    }

    fn indexed(
        &self,
        rest: &mut &[u8],
        budget: &mut usize,
        field: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let (name, value) = self.table.field(read_integer(rest, 7)?)?;
        charge(budget, name, value)?;
        field(name, value);
        Ok(())
    }

    fn literal_with_indexing(
        &mut self,
        rest: &mut &[u8],
        budget: &mut usize,
        field: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let index = read_integer(rest, 6)?;
        let Self { table, name: name_scratch, value: value_scratch, .. } = self;
        let name: &[u8] = if index == 0 {
            read_string(rest, name_scratch)?
        } else {
            // Copied: inserting may evict the entry it names.
            name_scratch.clear();
            name_scratch.extend_from_slice(table.field(index)?.0);
            name_scratch
        };
        let value = read_string(rest, value_scratch)?;
        charge(budget, name, value)?;
        field(name, value);
        table.insert(name, value);
        Ok(())
    }

    fn literal_without_indexing(
        &mut self,
        rest: &mut &[u8],
        budget: &mut usize,
        field: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let index = read_integer(rest, 4)?;
        let Self { table, name: name_scratch, value: value_scratch, .. } = self;
        let name = if index == 0 { read_string(rest, name_scratch)? } else { table.field(index)?.0 };
        let value = read_string(rest, value_scratch)?;
        charge(budget, name, value)?;
        field(name, value);
        Ok(())
    }

    fn resize(&mut self, size: u32) -> Result<(), HpackError> {
        let limit = self.limit;
        match usize::try_from(size) {
            Ok(max_size) if max_size <= limit => {
                self.table.resize(max_size);
                Ok(())
            }
            _ => Err(HpackError::TableSizeAboveLimit { size, limit }),
        }
    }

    /// A decoder whose table starts at `size` (RFC 7541's examples set it out of band).
    #[cfg(test)]
    pub fn with_table_size(size: usize) -> Self {
        Self { table: DynamicTable::new(size), limit: size, ..Self::default() }
    }

    /// The dynamic table, newest first, and its size.
    #[cfg(test)]
    pub fn table(&self) -> (Vec<(String, String)>, usize) {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let entries = self.table.entries.iter().map(|entry| (text(entry.name()), text(entry.value()))).collect();
        (entries, self.table.size)
    }
}

/// Counts a field against the block's decoded-size budget.
fn charge(budget: &mut usize, name: &[u8], value: &[u8]) -> Result<(), HpackError> {
    let size = name.len() + value.len() + ENTRY_OVERHEAD;
    *budget = budget.checked_sub(size).ok_or(HpackError::ListTooLarge)?;
    Ok(())
}

/// An integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1), at most 2^32 - 1.
fn read_integer(rest: &mut &[u8], prefix_bits: u32) -> Result<u32, HpackError> {
    let Some((&first, mut tail)) = rest.split_first() else { return Err(HpackError::Truncated) };
    let max_prefix = (1u32 << prefix_bits) - 1;
    let mut value = u32::from(first) & max_prefix;
    if value == max_prefix {
        let mut shift = 0;
        loop {
            let Some((&byte, after)) = tail.split_first() else { return Err(HpackError::Truncated) };
            tail = after;
            let sum = u64::from(value) + (u64::from(byte & 0x7f) << shift);
            value = u32::try_from(sum).map_err(|_| HpackError::IntegerOverflow)?;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            // Five continuation bytes hold 35 bits: more would only be zeros or an overflow.
            if shift > 28 {
                return Err(HpackError::IntegerOverflow);
            }
        }
    }
    *rest = tail;
    Ok(value)
}

/// A string literal (RFC 7541 §5.2): raw bytes borrowed from the block, or Huffman-decoded into `scratch`.
fn read_string<'s, 'b: 's>(rest: &mut &'b [u8], scratch: &'s mut Vec<u8>) -> Result<&'s [u8], HpackError> {
    let huffman = rest.first().is_some_and(|first| first & 0x80 != 0);
    let len = usize::try_from(read_integer(rest, 7)?).map_err(|_| HpackError::IntegerOverflow)?;
    let (raw, tail) = rest.split_at_checked(len).ok_or(HpackError::Truncated)?;
    *rest = tail;
    if !huffman {
        return Ok(raw);
    }
    scratch.clear();
    huffman::decode(raw, scratch)?;
    Ok(scratch)
}

/// The entries an encoder added, newest first.
#[derive(Debug)]
struct DynamicTable {
    entries: VecDeque<Entry>,
    /// Sum of the entries' sizes (RFC 7541 §4.1).
    size: usize,
    max_size: usize,
}

#[derive(Debug)]
struct Entry {
    /// Name then value.
    field: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn name(&self) -> &[u8] {
        self.field.get(..self.name_len).unwrap_or_default()
    }

    fn value(&self) -> &[u8] {
        self.field.get(self.name_len..).unwrap_or_default()
    }

    fn size(&self) -> usize {
        self.field.len() + ENTRY_OVERHEAD
    }
}

impl DynamicTable {
    fn new(max_size: usize) -> Self {
        Self { entries: VecDeque::new(), size: 0, max_size }
    }

    /// The field at `index` of the static table (1..=61) then of this one (62..).
    fn field(&self, index: u32) -> Result<(&[u8], &[u8]), HpackError> {
        let position = usize::try_from(index).ok().and_then(|index| index.checked_sub(1));
        let Some(position) = position else { return Err(HpackError::BadIndex(index)) };
        if let Some((name, value)) = STATIC_TABLE.get(position) {
            return Ok((name.as_bytes(), value.as_bytes()));
        }
        let entry = self.entries.get(position - STATIC_TABLE.len()).ok_or(HpackError::BadIndex(index))?;
        Ok((entry.name(), entry.value()))
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        // An entry bigger than the table empties it and is not added (RFC 7541 §4.4).
        self.evict_down_to(self.max_size.saturating_sub(size));
        if size > self.max_size {
            return;
        }
        let field: Box<[u8]> = [name, value].concat().into_boxed_slice();
        self.entries.push_front(Entry { field, name_len: name.len() });
        self.size += size;
    }

    fn resize(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_down_to(max_size);
    }

    fn evict_down_to(&mut self, size: usize) {
        while self.size > size {
            let Some(oldest) = self.entries.pop_back() else { break };
            self.size -= oldest.size();
        }
        if self.entries.is_empty() {
            self.size = 0;
        }
    }
}

/// RFC 7541 appendix A.
#[rustfmt::skip]
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::test_rng::XorShift;

    type Fields = Vec<(String, String)>;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap()).collect()
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
    }

    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Fields, HpackError> {
        let mut out = Vec::new();
        let mut keep = |name: &[u8], value: &[u8]| {
            out.push((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()))
        };
        decoder.decode(block, &mut keep).map(|()| out)
    }

    /// Decodes `blocks` in turn, checking each one's fields and the table after it.
    fn check_sequence(mut decoder: Decoder, blocks: &[(&str, Fields, Fields, usize)]) {
        for (index, (block, expected, table, size)) in blocks.iter().enumerate() {
            assert_eq!(&decode(&mut decoder, &hex(block)).unwrap(), expected, "block {index}");
            assert_eq!(decoder.table(), (table.clone(), *size), "table after block {index}");
        }
    }

    #[test]
    fn rfc_7541_c2_single_fields() {
        let cases = [
            ("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572", ("custom-key", "custom-header"), 55),
            ("040c 2f73 616d 706c 652f 7061 7468", (":path", "/sample/path"), 0),
            ("1008 7061 7373 776f 7264 0673 6563 7265 74", ("password", "secret"), 0),
            ("82", (":method", "GET"), 0),
        ];
        for (block, field, size) in cases {
            let table = if size > 0 { fields(&[field]) } else { Vec::new() };
            check_sequence(Decoder::default(), &[(block, fields(&[field]), table, size)]);
        }
    }

    fn requests(blocks: [&str; 3]) -> Vec<(&str, Fields, Fields, usize)> {
        let first = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")];
        let second = [&first[..], &[("cache-control", "no-cache")]].concat();
        let third =
            [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"), (":authority", "www.example.com")];
        let third = [&third[..], &[("custom-key", "custom-value")]].concat();
        let authority = (":authority", "www.example.com");
        vec![
            (blocks[0], fields(&first), fields(&[authority]), 57),
            (blocks[1], fields(&second), fields(&[("cache-control", "no-cache"), authority]), 110),
            (
                blocks[2],
                fields(&third),
                fields(&[("custom-key", "custom-value"), ("cache-control", "no-cache"), authority]),
                164,
            ),
        ]
    }

    #[test]
    fn rfc_7541_c3_requests() {
        check_sequence(
            Decoder::default(),
            &requests([
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ]),
        );
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        check_sequence(
            Decoder::default(),
            &requests([
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ]),
        );
    }

    fn responses(blocks: [&str; 3]) -> Vec<(&str, Fields, Fields, usize)> {
        let date1 = ("date", "Mon, 21 Oct 2013 20:13:21 GMT");
        let date2 = ("date", "Mon, 21 Oct 2013 20:13:22 GMT");
        let (private, location) = (("cache-control", "private"), ("location", "https://www.example.com"));
        let cookie = ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1");
        vec![
            (
                blocks[0],
                fields(&[(":status", "302"), private, date1, location]),
                fields(&[location, date1, private, (":status", "302")]),
                222,
            ),
            (
                blocks[1],
                fields(&[(":status", "307"), private, date1, location]),
                fields(&[(":status", "307"), location, date1, private]),
                222,
            ),
            (
                blocks[2],
                fields(&[(":status", "200"), private, date2, location, ("content-encoding", "gzip"), cookie]),
                fields(&[cookie, ("content-encoding", "gzip"), date2]),
                215,
            ),
        ]
    }

    #[test]
    fn rfc_7541_c5_responses_with_eviction() {
        check_sequence(
            Decoder::with_table_size(256),
            &responses([
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 \
                 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "4803 3330 37c1 c0bf",
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 \
                 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 \
                 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
            ]),
        );
    }

    #[test]
    fn rfc_7541_c6_responses_with_huffman_and_eviction() {
        check_sequence(
            Decoder::with_table_size(256),
            &responses([
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad \
                 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                "4883 640e ffc1 c0bf",
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 \
                 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ]),
        );
    }

    #[test]
    fn integers() {
        // RFC 7541 C.1: 10 and 1337 with a 5-bit prefix, 42 with an 8-bit one (here 7).
        for (bytes, prefix, value) in [(&[0x0a][..], 5, 10), (&[0x1f, 0x9a, 0x0a], 5, 1337), (&[0x2a], 7, 42)] {
            let mut rest = bytes;
            assert_eq!(read_integer(&mut rest, prefix), Ok(value));
            assert!(rest.is_empty());
        }
        let max = [0x7f, 0x80, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(read_integer(&mut &max[..], 7), Ok(u32::MAX));
        assert_eq!(read_integer(&mut &[0x7f, 0x81, 0xff, 0xff, 0xff, 0x0f][..], 7), Err(HpackError::IntegerOverflow));
        assert_eq!(
            read_integer(&mut &[0x7f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00][..], 7),
            Err(HpackError::IntegerOverflow)
        );
        assert_eq!(read_integer(&mut &[0x7f, 0x80][..], 7), Err(HpackError::Truncated));
        assert_eq!(read_integer(&mut &[][..], 7), Err(HpackError::Truncated));
    }

    #[test]
    fn malformed_blocks_fail() {
        let cases: [(&[u8], HpackError); 8] = [
            (&[0x80], HpackError::BadIndex(0)),
            (&[0xbe], HpackError::BadIndex(62)),
            (&[0x40, 0x05, b'a'], HpackError::Truncated),
            (&[0x04], HpackError::Truncated),
            (&[0x7f], HpackError::Truncated),
            (&[0x3f, 0xe2, 0x1f], HpackError::TableSizeAboveLimit { size: 4097, limit: 4096 }),
            (&[0x82, 0x20], HpackError::LateTableSizeUpdate),
            (&[0x00, 0x81, 0xff, 0x00], HpackError::Huffman(HuffmanError::Padding)),
        ];
        for (block, error) in cases {
            assert_eq!(decode(&mut Decoder::default(), block), Err(error), "{block:02x?}");
        }
    }

    #[test]
    fn table_size_updates_follow_the_announced_limit() {
        let mut decoder = Decoder::default();
        // 4096 as a 5-bit prefix integer is 3f e1 1f; 8192 is 3f e1 3f.
        decode(&mut decoder, &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")).unwrap();
        assert_eq!(decoder.table().1, 55);
        // Two updates at the start: down to 0 (evicts all), then back up.
        assert_eq!(decode(&mut decoder, &hex("20 3f e1 1f 82")).unwrap(), fields(&[(":method", "GET")]));
        assert_eq!(decoder.table(), (Vec::new(), 0));
        assert!(decode(&mut decoder, &hex("3f e1 3f")).is_err());
        decoder.announce_table_size(Some(8192));
        assert!(decode(&mut decoder, &hex("3f e1 3f")).is_ok());
        // A smaller announcement does not lower the limit: the encoder may not have seen it yet.
        decoder.announce_table_size(Some(0));
        assert!(decode(&mut decoder, &hex("3f e1 3f")).is_ok());
        // Huge announcements are capped; unknown ones allow the cap.
        decoder.announce_table_size(Some(u32::MAX));
        assert_eq!(decode(&mut decoder, &hex("3f e1 ff 03")), Ok(Vec::new()), "65536");
        assert!(decode(&mut decoder, &hex("3f e2 ff 03")).is_err(), "65537");
        let mut unknown = Decoder::default();
        unknown.announce_table_size(None);
        assert_eq!(decode(&mut unknown, &hex("3f e1 ff 03")), Ok(Vec::new()));
    }

    #[test]
    fn entries_bigger_than_the_table_empty_it() {
        let mut decoder = Decoder::with_table_size(60);
        decode(&mut decoder, &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")).unwrap();
        assert_eq!(decoder.table().1, 55);
        // custom-key (the entry's own name, index 62) with a 20-byte value: 62 bytes, too big.
        let mut block = hex("7e 14");
        block.extend_from_slice(&[b'v'; 20]);
        assert_eq!(decode(&mut decoder, &block).unwrap(), fields(&[("custom-key", &"v".repeat(20))]));
        assert_eq!(decoder.table(), (Vec::new(), 0));
    }

    #[test]
    fn references_to_big_entries_are_bounded() {
        let mut decoder = Decoder::default();
        // announce 64 KiB, grow the table, add a 60000-byte value, then reference it many times.
        decoder.announce_table_size(Some(65536));
        let mut block = hex("3f e1 ff 03 40 01 78 7f e1 d3 03");
        block.extend(std::iter::repeat_n(b'v', 60000));
        decode(&mut decoder, &block).unwrap();
        let references = vec![0xbe; 100];
        assert_eq!(decode(&mut decoder, &references[..17]).map(|fields| fields.len()), Ok(17));
        assert_eq!(decode(&mut decoder, &references), Err(HpackError::ListTooLarge));
    }

    #[test]
    fn random_blocks_never_panic_and_stay_bounded() {
        let mut rng = XorShift(0x4850_4143_4b21_2121);
        let mut decoder = Decoder::default();
        decoder.announce_table_size(None);
        let seeds = [
            hex("828684410f7777772e6578616d706c652e636f6d"),
            hex("4882640258 85aec3771a4b 6196d07abe941054d444a8200595040b8166e082a62d1bff"),
        ];
        for _ in 0..20_000 {
            let mut block = if rng.chance(50) { seeds[rng.below(2)].clone() } else { Vec::new() };
            for _ in 0..rng.below(8) {
                let at = rng.below(block.len() + 1);
                block.insert(at, rng.next() as u8);
            }
            if rng.chance(5) {
                decoder = Decoder::default();
            }
            let mut count = 0usize;
            let _ = decoder.decode(&block, &mut |_, _| count += 1);
            assert!(decoder.table.size <= decoder.table.max_size && decoder.table.max_size <= MAX_TABLE_SIZE);
            assert_eq!(decoder.table.size, decoder.table.entries.iter().map(Entry::size).sum::<usize>());
        }
    }
}
