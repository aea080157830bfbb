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
