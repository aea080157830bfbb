//! Fuzzes Kafka framing, messages and record batches (`zerotel::fuzzing::kafka`); the input format is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    zerotel::fuzzing::kafka(input);
});
