//! Fuzz target `roundtrip`: see `qmp_proto::fuzzing::roundtrip` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto::fuzzing::roundtrip(data));
