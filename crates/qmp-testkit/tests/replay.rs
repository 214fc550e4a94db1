//! Replays every golden transcript to the same `qmp_proto::Connection` scenario that recorded
//! it: the client must send exactly the recorded bytes, in the recorded order, and every
//! command must get the recorded outcome. This pins qmp-proto's request bytes and the
//! recorder/replay pair together.

#[path = "../examples/scenarios/mod.rs"]
mod scenarios;

use std::path::Path;
use std::time::Duration;

use qmp_testkit::transcript::{Replay, Transcript};

fn replay(name: &str) {
    let scenario = scenarios::ALL
        .iter()
        .find(|s| s.name == name)
        .expect("a scenario");
    let path = format!(
        "{}/../../tests/data/{name}.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let transcript = Transcript::load(&path).unwrap();
    let (replay, stream) = Replay::start(transcript, Duration::from_secs(10)).unwrap();
    let driver = scenario.run(stream, Path::new("/nonexistent"));
    drop(driver);
    replay.finish().unwrap();
}

#[test]
fn qsd_basic() {
    replay("qsd-basic");
}

#[test]
fn qsd_pretty() {
    replay("qsd-pretty");
}

#[test]
fn system_basic() {
    replay("system-basic");
}

#[test]
fn system_oob() {
    replay("system-oob");
}

#[test]
fn system_fds() {
    replay("system-fds");
}

#[test]
fn qga_basic() {
    replay("qga-basic");
}

#[test]
fn qga_resync() {
    replay("qga-resync");
}

/// qsd-jobs embeds the recording run's temp-dir path in its requests, so it is replayed
/// with that path taken from the transcript.
#[test]
fn qsd_jobs() {
    let path = format!(
        "{}/../../tests/data/qsd-jobs.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let transcript = Transcript::load(&path).unwrap();
    let text =
        String::from_utf8_lossy(&transcript.bytes_from(qmp_testkit::transcript::Direction::Client))
            .into_owned();
    let start = text.find("\"filename\":\"").unwrap() + "\"filename\":\"".len();
    let image = &text[start..start + text[start..].find('"').unwrap()];
    let dir = Path::new(image).parent().unwrap().to_owned();
    let scenario = scenarios::ALL
        .iter()
        .find(|s| s.name == "qsd-jobs")
        .unwrap();
    let (replay, stream) = Replay::start(transcript, Duration::from_secs(10)).unwrap();
    drop(scenario.run(stream, &dir));
    replay.finish().unwrap();
}
