//! Fuzz target `op_sequence`: see `qmp_proto::fuzzing::op_sequence` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto::fuzzing::op_sequence(data));
