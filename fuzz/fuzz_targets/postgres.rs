//! Fuzzes PostgreSQL messages and SQL summaries (`zerotel::fuzzing::postgres`); the input format is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    zerotel::fuzzing::postgres(input);
});
