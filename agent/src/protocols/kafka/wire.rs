//! Kafka's primitive types (<https://kafka.apache.org/protocol#protocol_types>) read from a byte slice.
//!
//! Every read checks what remains first, and counts are checked against the bytes left before anything
//! is sized by them, so a hostile length can neither panic nor allocate.

/// Why bytes could not be read as the expected field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes end inside a field.
    #[error("bytes end inside a field")]
    Truncated,
    /// A length or count is negative (other than null) or larger than the bytes left.
    #[error("invalid length or count {0}")]
    BadLength(i64),
    /// A varint runs past its widest encoding.
    #[error("varint too long")]
    BadVarint,
}

pub type WireResult<T> = Result<T, WireError>;

/// Reads fields front to back; what it returns borrows the input.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub fn take(&mut self, count: usize) -> WireResult<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(count).ok_or(WireError::Truncated)?;
        self.rest = rest;
        Ok(taken)
    }

    pub fn skip(&mut self, count: usize) -> WireResult<()> {
        self.take(count).map(|_| ())
    }

    fn array<const N: usize>(&mut self) -> WireResult<[u8; N]> {
        let (taken, rest) = self.rest.split_first_chunk::<N>().ok_or(WireError::Truncated)?;
        self.rest = rest;
        Ok(*taken)
    }

    pub fn i8(&mut self) -> WireResult<i8> {
        self.array::<1>().map(i8::from_be_bytes)
    }

    pub fn i16(&mut self) -> WireResult<i16> {
        self.array::<2>().map(i16::from_be_bytes)
    }

    pub fn i32(&mut self) -> WireResult<i32> {
        self.array::<4>().map(i32::from_be_bytes)
    }

    pub fn i64(&mut self) -> WireResult<i64> {
        self.array::<8>().map(i64::from_be_bytes)
    }

    pub fn uuid(&mut self) -> WireResult<[u8; 16]> {
        self.array::<16>()
    }

    /// An unsigned LEB128 integer of at most `max_bytes` bytes.
    fn leb128(&mut self, max_bytes: u32) -> WireResult<u64> {
        let mut value = 0u64;
        for index in 0..max_bytes {
            let byte = self.array::<1>()?[0];
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WireError::BadVarint)
    }

    /// UNSIGNED_VARINT: lengths and counts of flexible versions.
    pub fn unsigned_varint(&mut self) -> WireResult<u32> {
        // Five bytes carry 35 bits; the extra high bits of a hostile fifth byte are dropped.
        self.leb128(5).map(|value| value as u32)
    }

    /// VARINT (zigzag): lengths inside records.
    pub fn varint(&mut self) -> WireResult<i32> {
        let raw = self.leb128(5)? as u32;
        Ok((raw >> 1) as i32 ^ -((raw & 1) as i32))
    }

    /// VARLONG (zigzag): timestamp deltas inside records.
    pub fn varlong(&mut self) -> WireResult<i64> {
        let raw = self.leb128(10)?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    /// A length that is -1 for null, else must fit in what remains.
    fn checked_length(&self, length: i64) -> WireResult<Option<usize>> {
        match length {
            -1 => Ok(None),
            0.. if length as u64 <= self.rest.len() as u64 => Ok(Some(length as usize)),
            _ => Err(WireError::BadLength(length)),
        }
    }

    /// The length of a STRING/BYTES (classic: i16/i32; flexible: unsigned varint + 1), None when null.
    fn field_length(&mut self, flexible: bool, classic_is_i16: bool) -> WireResult<Option<usize>> {
        let length = match (flexible, classic_is_i16) {
            (true, _) => i64::from(self.unsigned_varint()?) - 1,
            (false, true) => i64::from(self.i16()?),
            (false, false) => i64::from(self.i32()?),
        };
        self.checked_length(length)
    }

    /// A (NULLABLE_)STRING or COMPACT_(NULLABLE_)STRING as raw bytes; None when null.
    pub fn string(&mut self, flexible: bool) -> WireResult<Option<&'a [u8]>> {
        match self.field_length(flexible, true)? {
            Some(length) => self.take(length).map(Some),
            None => Ok(None),
        }
    }

    /// A (NULLABLE_)BYTES/RECORDS or its compact form; None when null.
    pub fn bytes(&mut self, flexible: bool) -> WireResult<Option<&'a [u8]>> {
        match self.field_length(flexible, false)? {
            Some(length) => self.take(length).map(Some),
            None => Ok(None),
        }
    }

    /// The element count of an ARRAY or COMPACT_ARRAY; null counts as empty. Every element the
    /// decoders read takes at least one byte, so a count above the bytes left is malformed.
    pub fn array_len(&mut self, flexible: bool) -> WireResult<usize> {
        let count = if flexible { i64::from(self.unsigned_varint()?) - 1 } else { i64::from(self.i32()?) };
        Ok(self.checked_length(count)?.unwrap_or(0))
    }

    /// Skips the tagged fields that end every structure of a flexible version.
    pub fn skip_tagged_fields(&mut self, flexible: bool) -> WireResult<()> {
        if !flexible {
            return Ok(());
        }
        let count = self.unsigned_varint()?;
        for _ in 0..count {
            let _tag = self.unsigned_varint()?;
            let size = self.unsigned_varint()?;
            self.skip(size as usize)?;
        }
        Ok(())
    }

    /// Skips an array of fixed-size elements (e.g. INT32 node ids).
    pub fn skip_fixed_array(&mut self, flexible: bool, element_size: usize) -> WireResult<()> {
        let count = self.array_len(flexible)?;
        self.skip(count.saturating_mul(element_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_big_endian() {
        let mut reader = Reader::new(&[0xff, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x80]);
        assert_eq!(reader.i8(), Ok(-1));
        assert_eq!(reader.i16(), Ok(1));
        assert_eq!(reader.i32(), Ok(2));
        assert_eq!(reader.i16(), Err(WireError::Truncated));
        assert_eq!(reader.i8(), Ok(-128));
        assert_eq!(reader.remaining(), 0);
    }

    #[test]
    fn varints() {
        for (bytes, value) in [(&[0x00][..], 0), (&[0x01], -1), (&[0x02], 1), (&[0x03], -2), (&[0xac, 0x02], 150)] {
            assert_eq!(Reader::new(bytes).varint(), Ok(value), "{bytes:?}");
        }
        assert_eq!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x0f]).varint(), Ok(i32::MIN));
        assert_eq!(Reader::new(&[0xfe, 0xff, 0xff, 0xff, 0x0f]).varint(), Ok(i32::MAX));
        assert_eq!(Reader::new(&[0xff; 6]).varint(), Err(WireError::BadVarint));
        assert_eq!(Reader::new(&[0xff; 3]).varint(), Err(WireError::Truncated));
        assert_eq!(Reader::new(&[0x81, 0x01]).unsigned_varint(), Ok(129));
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(Reader::new(&max).varlong(), Ok(i64::MIN));
        assert_eq!(Reader::new(&[0xff; 11]).varlong(), Err(WireError::BadVarint));
    }

    #[test]
    fn strings_classic_and_compact() {
        let mut reader = Reader::new(b"\x00\x02hi\xff\xff\x03ok\x00");
        assert_eq!(reader.string(false), Ok(Some(&b"hi"[..])));
        assert_eq!(reader.string(false), Ok(None));
        assert_eq!(reader.string(true), Ok(Some(&b"ok"[..])));
        assert_eq!(reader.string(true), Ok(None));
        assert_eq!(Reader::new(b"\x00\x05hi").string(false), Err(WireError::BadLength(5)));
        assert_eq!(Reader::new(b"\xff\xfe").string(false), Err(WireError::BadLength(-2)));
        assert_eq!(Reader::new(b"\x7f\xff\xff\xff").bytes(false), Err(WireError::BadLength(i64::from(i32::MAX))));
    }

    #[test]
    fn hostile_counts_are_refused_before_use() {
        assert_eq!(Reader::new(b"\x7f\xff\xff\xff").array_len(false), Err(WireError::BadLength(i64::from(i32::MAX))));
        assert_eq!(Reader::new(b"\xff\xff\xff\xff").array_len(false), Ok(0));
        assert_eq!(Reader::new(b"\x00").array_len(true), Ok(0));
        assert_eq!(Reader::new(b"\x03ab").array_len(true), Ok(2));
        assert_eq!(Reader::new(b"\x04ab").array_len(true), Err(WireError::BadLength(3)));
        assert_eq!(Reader::new(b"\x00\x00\x00\x02abc").skip_fixed_array(false, 4), Err(WireError::Truncated));
    }

    #[test]
    fn tagged_fields_are_skipped() {
        let mut reader = Reader::new(b"\x02\x00\x01x\x05\x02yz!");
        assert_eq!(reader.skip_tagged_fields(true), Ok(()));
        assert_eq!(reader.rest(), b"!");
        let mut classic = Reader::new(b"\x02");
        assert_eq!(classic.skip_tagged_fields(false), Ok(()));
        assert_eq!(classic.remaining(), 1);
        assert_eq!(Reader::new(b"\x01\x00\x05ab").skip_tagged_fields(true), Err(WireError::Truncated));
    }
}
