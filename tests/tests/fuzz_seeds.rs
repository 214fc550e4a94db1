//! Replays the committed fuzz seeds (`fuzz/seeds/<target>/*`) through the same harnesses the
//! cargo-fuzz targets run, on stable, so every input that once found a bug stays fixed.

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        let data = std::fs::read(&path).expect("seed");
        let result = std::panic::catch_unwind(|| harness(&data));
        assert!(result.is_ok(), "seed {} failed", path.display());
        n += 1;
    }
    assert!(n >= 3, "expected at least 3 seeds for {target}, found {n}");
}

#[test]
fn framing_seeds() {
    replay("framing", qmp_proto::fuzzing::framing);
}

#[test]
fn bytes_to_outputs_seeds() {
    replay("bytes_to_outputs", qmp_proto::fuzzing::bytes_to_outputs);
}

#[test]
fn roundtrip_seeds() {
    replay("roundtrip", qmp_proto::fuzzing::roundtrip);
}

#[test]
fn op_sequence_seeds() {
    replay("op_sequence", qmp_proto::fuzzing::op_sequence);
}

#[test]
fn server_input_seeds() {
    replay("server_input", qmp_proto::fuzzing::server_input);
}
