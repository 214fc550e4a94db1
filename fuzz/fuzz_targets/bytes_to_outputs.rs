//! Fuzz target `bytes_to_outputs`: see `qmp_proto::fuzzing::bytes_to_outputs` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto::fuzzing::bytes_to_outputs(data));
