//! Tiny in-kernel classifier: does a payload begin an HTTP/1 message? Kept to 4-byte compares so it
//! costs a few instructions; the agent's parser decides for real.

const METHODS: [[u8; 4]; 9] = [
    *b"GET ", *b"POST", *b"PUT ", *b"DELE", *b"HEAD", *b"OPTI", *b"PATC", *b"CONN", *b"TRAC",
];

#[inline(always)]
pub fn is_http_request_start(prefix: &[u8; 8]) -> bool {
    let head = [prefix[0], prefix[1], prefix[2], prefix[3]];
    let mut i = 0;
    while i < METHODS.len() {
        if head == METHODS[i] {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
pub fn is_http_response_start(prefix: &[u8; 8]) -> bool {
    prefix[..7] == *b"HTTP/1."
}

#[inline(always)]
pub fn is_http_start(prefix: &[u8; 8]) -> bool {
    is_http_request_start(prefix) || is_http_response_start(prefix)
}

/// The first 8 bytes of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
#[inline(always)]
pub fn is_http2_preface(prefix: &[u8; 8]) -> bool {
    *prefix == *b"PRI * HT"
}

/// A server's first write may be its own preface, an empty or short SETTINGS frame on stream 0,
/// sent before it reads the client's (Go's HTTP/2 server and grpc-go do this).
#[inline(always)]
pub fn is_http2_server_preface(prefix: &[u8; 8]) -> bool {
    let len = u32::from_be_bytes([0, prefix[0], prefix[1], prefix[2]]);
    const SETTINGS: u8 = 0x4;
    prefix[3] == SETTINGS && prefix[4] == 0 && prefix[5..8] == [0, 0, 0] && len % 6 == 0 && len <= 6 * 16
}

/// A TLS record header (RFC 8446 §5.1): handshake, application data, alert or change cipher
/// spec, legacy version 3.x, a length a record may have. What a TLS connection starts with, and
/// what one first seen mid-stream shows.
#[inline(always)]
pub fn is_tls_record(prefix: &[u8; 8]) -> bool {
    let len = u16::from_be_bytes([prefix[3], prefix[4]]);
    matches!(prefix[0], 0x14..=0x17) && prefix[1] == 3 && prefix[2] <= 4 && len > 0 && len <= 16_384 + 2048
}
