//! HPACK's static Huffman code (RFC 7541 §5.2 and appendix B).
//!
//! Codes of up to 8 bits (most header text) are looked up in a 256-entry table. Longer ones rely on
//! the code being canonical: codes of one length count up in symbol order, and each length's first
//! code follows the previous length's last, so per length only the first code and where that
//! length's symbols start in a length-then-symbol order are needed. Both tables are derived from
//! appendix B at compile time (a test checks it is canonical).

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HuffmanError {
    /// The string holds the EOS symbol, which encoders never emit.
    #[error("Huffman string holds EOS")]
    Eos,
    /// The string ends in more than 7 bits of padding, or in bits that are not EOS's leading 1s.
    #[error("Huffman string has invalid padding")]
    Padding,
}

const EOS: u16 = 256;
const MIN_CODE_LEN: usize = 5;
const MAX_CODE_LEN: usize = 30;
/// Codes up to this length (lowercase letters, digits, common punctuation) are looked up at once.
const FAST_BITS: usize = 8;
/// Bits examined per symbol: left-aligned in a u32, wide enough for the longest code.
const WINDOW_BITS: u32 = 32;

/// Decoding tables derived from [`CODES`].
struct Canonical {
    /// Per code length: left-aligned windows below this hold a code of at most that length.
    limits: [u64; MAX_CODE_LEN + 1],
    first_code: [u32; MAX_CODE_LEN + 1],
    /// Per code length: index in `symbols` of its first symbol.
    first_index: [u16; MAX_CODE_LEN + 1],
    /// Symbols by code length, then by value.
    symbols: [u16; 257],
}

const CANONICAL: Canonical = canonical();

/// Per value of a window's first [`FAST_BITS`] bits: the symbol whose code they start with, and its
/// length; length 0 when the code is longer.
const FAST: [(u8, u8); 1 << FAST_BITS] = fast_lookup();

const fn fast_lookup() -> [(u8, u8); 1 << FAST_BITS] {
    let mut table = [(0, 0); 1 << FAST_BITS];
    let mut symbol = 0;
    while symbol < 256 {
        let (code, len) = CODES[symbol];
        if len as usize <= FAST_BITS {
            let spare = FAST_BITS - len as usize;
            let mut suffix = 0;
            while suffix < 1 << spare {
                table[((code as usize) << spare) | suffix] = (symbol as u8, len);
                suffix += 1;
            }
        }
        symbol += 1;
    }
    table
}

const fn canonical() -> Canonical {
    let mut counts = [0u32; MAX_CODE_LEN + 1];
    let mut symbol = 0;
    while symbol < CODES.len() {
        counts[CODES[symbol].1 as usize] += 1;
        symbol += 1;
    }
    let mut table = Canonical {
        limits: [0; MAX_CODE_LEN + 1],
        first_code: [0; MAX_CODE_LEN + 1],
        first_index: [0; MAX_CODE_LEN + 1],
        symbols: [0; 257],
    };
    let (mut code, mut index, mut len) = (0u32, 0u16, 1);
    while len <= MAX_CODE_LEN {
        code = (code + counts[len - 1]) << 1;
        table.first_code[len] = code;
        table.first_index[len] = index;
        table.limits[len] = ((code + counts[len]) as u64) << (WINDOW_BITS as usize - len);
        let mut symbol = 0;
        while symbol < CODES.len() {
            if CODES[symbol].1 as usize == len {
                table.symbols[index as usize] = symbol as u16;
                index += 1;
            }
            symbol += 1;
        }
        len += 1;
    }
    table
}

/// The symbol whose code starts `window` (left-aligned), and the code's length.
fn lookup(window: u32) -> (u16, u32) {
    if let Some(&(symbol, len @ 1..)) = FAST.get((window >> (WINDOW_BITS as usize - FAST_BITS)) as usize) {
        return (u16::from(symbol), u32::from(len));
    }
    let window = u64::from(window);
    for len in MIN_CODE_LEN..=MAX_CODE_LEN {
        if window < CANONICAL.limits[len] {
            let code = (window >> (WINDOW_BITS as usize - len)) as u32;
            let index = usize::from(CANONICAL.first_index[len]) + code.wrapping_sub(CANONICAL.first_code[len]) as usize;
            return (CANONICAL.symbols.get(index).copied().unwrap_or(EOS), len as u32);
        }
    }
    // Unreachable: the code is complete, so the last limit is 2^32.
    (EOS, MAX_CODE_LEN as u32)
}

/// Appends the decoding of `encoded` to `out` (at most 8 symbols per 5 bytes).
pub fn decode(encoded: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    out.reserve(encoded.len() * 8 / 5);
    // Pending bits, right-aligned: fewer than MAX_CODE_LEN + 8.
    let (mut bits, mut count) = (0u64, 0u32);
    for &byte in encoded {
        bits = (bits << 8) | u64::from(byte);
        count += 8;
        while count >= MIN_CODE_LEN as u32 {
            // Padded with 0s: a code found within the pending bits is theirs, as no code is a
            // prefix of another; one reaching into the padding needs more bits.
            let (symbol, len) = lookup((bits << (64 - count) >> WINDOW_BITS) as u32);
            if len > count {
                break;
            }
            push_symbol(symbol, out)?;
            count -= len;
            bits &= mask(count);
        }
    }
    // What is left starts no whole code: it must be padding, up to 7 of EOS's leading 1s.
    if count > 7 || bits != mask(count) {
        return Err(HuffmanError::Padding);
    }
    Ok(())
}

fn push_symbol(symbol: u16, out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let byte = u8::try_from(symbol).map_err(|_| HuffmanError::Eos)?;
    out.push(byte);
    Ok(())
}

/// The `count` low bits set (count < 64).
fn mask(count: u32) -> u64 {
    (1u64 << count) - 1
}

/// Appends the Huffman encoding of `bytes` to `out`, padded with 1s (tests build header blocks with it).
#[cfg(test)]
pub fn encode(bytes: &[u8], out: &mut Vec<u8>) {
    let (mut bits, mut count) = (0u64, 0u32);
    for &byte in bytes {
        let (code, len) = CODES[usize::from(byte)];
        bits = (bits << len) | u64::from(code);
        count += u32::from(len);
        while count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
        bits &= mask(count);
    }
    if count > 0 {
        out.push(((bits << (8 - count)) | mask(8 - count)) as u8);
    }
}

/// RFC 7541 appendix B: (code, bit length) per symbol 0..=255, then EOS (256); codes right-aligned.
#[rustfmt::skip]
pub(super) const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13), // 0
    (0x7fffd8, 23), // 1
    (0xfffffe2, 28), // 2
    (0xfffffe3, 28), // 3
    (0xfffffe4, 28), // 4
    (0xfffffe5, 28), // 5
    (0xfffffe6, 28), // 6
    (0xfffffe7, 28), // 7
    (0xfffffe8, 28), // 8
    (0xffffea, 24), // 9
    (0x3ffffffc, 30), // 10
    (0xfffffe9, 28), // 11
    (0xfffffea, 28), // 12
    (0x3ffffffd, 30), // 13
    (0xfffffeb, 28), // 14
    (0xfffffec, 28), // 15
    (0xfffffed, 28), // 16
    (0xfffffee, 28), // 17
    (0xfffffef, 28), // 18
    (0xffffff0, 28), // 19
    (0xffffff1, 28), // 20
    (0xffffff2, 28), // 21
    (0x3ffffffe, 30), // 22
    (0xffffff3, 28), // 23
    (0xffffff4, 28), // 24
    (0xffffff5, 28), // 25
    (0xffffff6, 28), // 26
    (0xffffff7, 28), // 27
    (0xffffff8, 28), // 28
    (0xffffff9, 28), // 29
    (0xffffffa, 28), // 30
    (0xffffffb, 28), // 31
    (0x14, 6), // 32
    (0x3f8, 10), // '!'
    (0x3f9, 10), // '"'
    (0xffa, 12), // '#'
    (0x1ff9, 13), // '$'
    (0x15, 6), // '%'
    (0xf8, 8), // '&'
    (0x7fa, 11), // 39
    (0x3fa, 10), // '('
    (0x3fb, 10), // ')'
    (0xf9, 8), // '*'
    (0x7fb, 11), // '+'
    (0xfa, 8), // ','
    (0x16, 6), // '-'
    (0x17, 6), // '.'
    (0x18, 6), // '/'
    (0x0, 5), // '0'
    (0x1, 5), // '1'
    (0x2, 5), // '2'
    (0x19, 6), // '3'
    (0x1a, 6), // '4'
    (0x1b, 6), // '5'
    (0x1c, 6), // '6'
    (0x1d, 6), // '7'
    (0x1e, 6), // '8'
    (0x1f, 6), // '9'
    (0x5c, 7), // ':'
    (0xfb, 8), // ';'
    (0x7ffc, 15), // '<'
    (0x20, 6), // '='
    (0xffb, 12), // '>'
    (0x3fc, 10), // '?'
    (0x1ffa, 13), // '@'
    (0x21, 6), // 'A'
    (0x5d, 7), // 'B'
    (0x5e, 7), // 'C'
    (0x5f, 7), // 'D'
    (0x60, 7), // 'E'
    (0x61, 7), // 'F'
    (0x62, 7), // 'G'
    (0x63, 7), // 'H'
    (0x64, 7), // 'I'
    (0x65, 7), // 'J'
    (0x66, 7), // 'K'
    (0x67, 7), // 'L'
    (0x68, 7), // 'M'
    (0x69, 7), // 'N'
    (0x6a, 7), // 'O'
    (0x6b, 7), // 'P'
    (0x6c, 7), // 'Q'
    (0x6d, 7), // 'R'
    (0x6e, 7), // 'S'
    (0x6f, 7), // 'T'
    (0x70, 7), // 'U'
    (0x71, 7), // 'V'
    (0x72, 7), // 'W'
    (0xfc, 8), // 'X'
    (0x73, 7), // 'Y'
    (0xfd, 8), // 'Z'
    (0x1ffb, 13), // '['
    (0x7fff0, 19), // 92
    (0x1ffc, 13), // ']'
    (0x3ffc, 14), // '^'
    (0x22, 6), // '_'
    (0x7ffd, 15), // '`'
    (0x3, 5), // 'a'
    (0x23, 6), // 'b'
    (0x4, 5), // 'c'
    (0x24, 6), // 'd'
    (0x5, 5), // 'e'
    (0x25, 6), // 'f'
    (0x26, 6), // 'g'
    (0x27, 6), // 'h'
    (0x6, 5), // 'i'
    (0x74, 7), // 'j'
    (0x75, 7), // 'k'
    (0x28, 6), // 'l'
    (0x29, 6), // 'm'
    (0x2a, 6), // 'n'
    (0x7, 5), // 'o'
    (0x2b, 6), // 'p'
    (0x76, 7), // 'q'
    (0x2c, 6), // 'r'
    (0x8, 5), // 's'
    (0x9, 5), // 't'
    (0x2d, 6), // 'u'
    (0x77, 7), // 'v'
    (0x78, 7), // 'w'
    (0x79, 7), // 'x'
    (0x7a, 7), // 'y'
    (0x7b, 7), // 'z'
    (0x7ffe, 15), // '{'
    (0x7fc, 11), // '|'
    (0x3ffd, 14), // '}'
    (0x1ffd, 13), // '~'
    (0xffffffc, 28), // 127
    (0xfffe6, 20), // 128
    (0x3fffd2, 22), // 129
    (0xfffe7, 20), // 130
    (0xfffe8, 20), // 131
    (0x3fffd3, 22), // 132
    (0x3fffd4, 22), // 133
    (0x3fffd5, 22), // 134
    (0x7fffd9, 23), // 135
    (0x3fffd6, 22), // 136
    (0x7fffda, 23), // 137
    (0x7fffdb, 23), // 138
    (0x7fffdc, 23), // 139
    (0x7fffdd, 23), // 140
    (0x7fffde, 23), // 141
    (0xffffeb, 24), // 142
    (0x7fffdf, 23), // 143
    (0xffffec, 24), // 144
    (0xffffed, 24), // 145
    (0x3fffd7, 22), // 146
    (0x7fffe0, 23), // 147
    (0xffffee, 24), // 148
    (0x7fffe1, 23), // 149
    (0x7fffe2, 23), // 150
    (0x7fffe3, 23), // 151
    (0x7fffe4, 23), // 152
    (0x1fffdc, 21), // 153
    (0x3fffd8, 22), // 154
    (0x7fffe5, 23), // 155
    (0x3fffd9, 22), // 156
    (0x7fffe6, 23), // 157
    (0x7fffe7, 23), // 158
    (0xffffef, 24), // 159
    (0x3fffda, 22), // 160
    (0x1fffdd, 21), // 161
    (0xfffe9, 20), // 162
    (0x3fffdb, 22), // 163
    (0x3fffdc, 22), // 164
    (0x7fffe8, 23), // 165
    (0x7fffe9, 23), // 166
    (0x1fffde, 21), // 167
    (0x7fffea, 23), // 168
    (0x3fffdd, 22), // 169
    (0x3fffde, 22), // 170
    (0xfffff0, 24), // 171
    (0x1fffdf, 21), // 172
    (0x3fffdf, 22), // 173
    (0x7fffeb, 23), // 174
    (0x7fffec, 23), // 175
    (0x1fffe0, 21), // 176
    (0x1fffe1, 21), // 177
    (0x3fffe0, 22), // 178
    (0x1fffe2, 21), // 179
    (0x7fffed, 23), // 180
    (0x3fffe1, 22), // 181
    (0x7fffee, 23), // 182
    (0x7fffef, 23), // 183
    (0xfffea, 20), // 184
    (0x3fffe2, 22), // 185
    (0x3fffe3, 22), // 186
    (0x3fffe4, 22), // 187
    (0x7ffff0, 23), // 188
    (0x3fffe5, 22), // 189
    (0x3fffe6, 22), // 190
    (0x7ffff1, 23), // 191
    (0x3ffffe0, 26), // 192
    (0x3ffffe1, 26), // 193
    (0xfffeb, 20), // 194
    (0x7fff1, 19), // 195
    (0x3fffe7, 22), // 196
    (0x7ffff2, 23), // 197
    (0x3fffe8, 22), // 198
    (0x1ffffec, 25), // 199
    (0x3ffffe2, 26), // 200
    (0x3ffffe3, 26), // 201
    (0x3ffffe4, 26), // 202
    (0x7ffffde, 27), // 203
    (0x7ffffdf, 27), // 204
    (0x3ffffe5, 26), // 205
    (0xfffff1, 24), // 206
    (0x1ffffed, 25), // 207
    (0x7fff2, 19), // 208
    (0x1fffe3, 21), // 209
    (0x3ffffe6, 26), // 210
    (0x7ffffe0, 27), // 211
    (0x7ffffe1, 27), // 212
    (0x3ffffe7, 26), // 213
    (0x7ffffe2, 27), // 214
    (0xfffff2, 24), // 215
    (0x1fffe4, 21), // 216
    (0x1fffe5, 21), // 217
    (0x3ffffe8, 26), // 218
    (0x3ffffe9, 26), // 219
    (0xffffffd, 28), // 220
    (0x7ffffe3, 27), // 221
    (0x7ffffe4, 27), // 222
    (0x7ffffe5, 27), // 223
    (0xfffec, 20), // 224
    (0xfffff3, 24), // 225
    (0xfffed, 20), // 226
    (0x1fffe6, 21), // 227
    (0x3fffe9, 22), // 228
    (0x1fffe7, 21), // 229
    (0x1fffe8, 21), // 230
    (0x7ffff3, 23), // 231
    (0x3fffea, 22), // 232
    (0x3fffeb, 22), // 233
    (0x1ffffee, 25), // 234
    (0x1ffffef, 25), // 235
    (0xfffff4, 24), // 236
    (0xfffff5, 24), // 237
    (0x3ffffea, 26), // 238
    (0x7ffff4, 23), // 239
    (0x3ffffeb, 26), // 240
    (0x7ffffe6, 27), // 241
    (0x3ffffec, 26), // 242
    (0x3ffffed, 26), // 243
    (0x7ffffe7, 27), // 244
    (0x7ffffe8, 27), // 245
    (0x7ffffe9, 27), // 246
    (0x7ffffea, 27), // 247
    (0x7ffffeb, 27), // 248
    (0xffffffe, 28), // 249
    (0x7ffffec, 27), // 250
    (0x7ffffed, 27), // 251
    (0x7ffffee, 27), // 252
    (0x7ffffef, 27), // 253
    (0x7fffff0, 27), // 254
    (0x3ffffee, 26), // 255
    (0x3fffffff, 30), // EOS
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::test_rng::XorShift;

    fn decoded(encoded: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(encoded, &mut out).map(|()| out)
    }

    fn encoded(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(bytes, &mut out);
        out
    }

    #[test]
    fn the_table_is_canonical_and_complete() {
        // The decoder relies on it: each code is its length's first code plus its rank there.
        let mut rank = [0u32; MAX_CODE_LEN + 1];
        for (symbol, &(code, len)) in CODES.iter().enumerate() {
            let len = usize::from(len);
            assert_eq!(code, CANONICAL.first_code[len] + rank[len], "symbol {symbol}");
            rank[len] += 1;
        }
        // Kraft: the lengths fill the code space exactly.
        let space: u64 = CODES.iter().map(|&(_, len)| 1u64 << (MAX_CODE_LEN - usize::from(len))).sum();
        assert_eq!(space, 1 << MAX_CODE_LEN);
        assert_eq!(CODES[usize::from(EOS)], (0x3fff_ffff, 30));
        assert_eq!(CODES.iter().map(|&(_, len)| usize::from(len)).min(), Some(MIN_CODE_LEN));
    }

    #[test]
    fn rfc_7541_strings() {
        // Appendix C.4.1, C.4.2, C.6.1.
        let cases: [(&str, &[u8]); 5] = [
            ("www.example.com", b"\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff"),
            ("no-cache", b"\xa8\xeb\x10\x64\x9c\xbf"),
            ("custom-key", b"\x25\xa8\x49\xe9\x5b\xa9\x7d\x7f"),
            ("302", b"\x64\x02"),
            (
                "Mon, 21 Oct 2013 20:13:21 GMT",
                b"\xd0\x7a\xbe\x94\x10\x54\xd4\x44\xa8\x20\x05\x95\x04\x0b\x81\x66\xe0\x82\xa6\x2d\x1b\xff",
            ),
        ];
        for (text, huffman) in cases {
            assert_eq!(decoded(huffman).unwrap(), text.as_bytes(), "{text}");
            assert_eq!(encoded(text.as_bytes()), huffman, "{text}");
        }
        assert_eq!(decoded(b"").unwrap(), b"");
    }

    #[test]
    fn every_symbol_round_trips() {
        for byte in 0..=255u8 {
            for text in [vec![byte], vec![byte; 7], vec![b'a', byte, b'0']] {
                assert_eq!(decoded(&encoded(&text)).unwrap(), text, "byte {byte}");
            }
        }
        let all: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
        assert_eq!(decoded(&encoded(&all)).unwrap(), all);
    }

    #[test]
    fn padding_rules() {
        // '0' is 00000: 3 bits of 1s pad it to a byte.
        assert_eq!(decoded(&[0b0000_0111]).unwrap(), b"0");
        // Padding that is not all 1s.
        assert_eq!(decoded(&[0b0000_0101]), Err(HuffmanError::Padding));
        assert_eq!(decoded(&[0b0000_0110]), Err(HuffmanError::Padding));
        // 8 bits of padding: a whole byte of 1s after a complete symbol.
        assert_eq!(decoded(&[0b0000_0111, 0xff]), Err(HuffmanError::Padding));
        assert_eq!(decoded(&[0xff]), Err(HuffmanError::Padding));
        // 7 bits of padding are fine.
        let five_ones = encoded(b"00000");
        assert_eq!(five_ones.len(), 4);
        assert_eq!(decoded(&five_ones).unwrap(), b"00000");
        // '\0' (13 bits), then 3 bits that start no code and are not padding.
        assert_eq!(decoded(&[0b1111_1111, 0b1100_0000]), Err(HuffmanError::Padding));
    }

    #[test]
    fn eos_is_an_error() {
        // EOS (30 ones) then 2 bits of padding.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError::Eos));
        // After a symbol.
        assert_eq!(decoded(&[0b0000_0111, 0xff, 0xff, 0xff, 0xff]), Err(HuffmanError::Eos));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x4855_4646_4d41_4e21);
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let bytes: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
            out.clear();
            if decode(&bytes, &mut out).is_ok() {
                assert!(out.len() <= bytes.len() * 8 / 5);
                assert_eq!(encoded(&out), bytes, "decoding is one to one");
            }
        }
    }
}
