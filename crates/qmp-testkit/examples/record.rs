//! Records the golden transcripts under `tests/data/` from real QEMU programs.
//!
//! ```text
//! cargo run -p qmp-testkit --example record -- [OUT_DIR] [NAME...]
//! ```
//!
//! The client side is `qmp_proto::Connection` itself over a blocking `UnixStream` (through the
//! testkit's `Recorder`), so the recorded client bytes are exactly what qmp-proto writes.
//! `OUT_DIR` defaults to the workspace's `tests/data`; without names every scenario is recorded.
//! The scenarios live in `examples/scenarios/mod.rs`; `tests/replay.rs` replays them.

mod scenarios;

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args.next().map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data"),
        PathBuf::from,
    );
    let names: Vec<String> = args.collect();
    std::fs::create_dir_all(&out).unwrap();
    for scenario in &scenarios::ALL {
        if !names.is_empty() && !names.iter().any(|n| n == scenario.name) {
            continue;
        }
        let t = scenario.record();
        let path = out.join(format!("{}.jsonl", scenario.name));
        t.save(&path).unwrap();
        println!("{}: {} chunks", path.display(), t.chunks.len());
    }
}
