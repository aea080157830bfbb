//! Fuzzes HTTP/2 frames, HPACK and streams (`zerotel::fuzzing::http2`); the input format is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    zerotel::fuzzing::http2(input);
});
