//! Fuzz target `server_input`: see `qmp_proto::fuzzing::server_input` for the invariants it
//! checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto::fuzzing::server_input(data));
