//! Fuzz target `framing`: see `qmp_proto::fuzzing::framing` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto::fuzzing::framing(data));
