//! Fuzzes ring-buffer records, decoded and dispatched (`zerotel::fuzzing::events`); the input format is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    zerotel::fuzzing::events(input);
});
