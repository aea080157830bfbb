//! Fuzzes HTTP/1 exchanges (`zerotel::fuzzing::http1`); the input format is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    zerotel::fuzzing::http1(input);
});
