//! Replays every golden transcript to the same `qmp_proto::Connection` scenario that recorded
//! it: the client must send exactly the recorded bytes, in the recorded order, and every
//! command must get the recorded outcome: the `return` value or the error of the recorded reply
//! with its id, so a reply given to the wrong command fails. This pins qmp-proto's request
//! bytes, its reply correlation and the recorder/replay pair together.

#[path = "../examples/scenarios/mod.rs"]
mod scenarios;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use qmp_proto::{CommandError, Outcome, RequestId};
use qmp_testkit::transcript::{Direction, Replay, Transcript};
use serde_json::Value;

/// The replies in `transcript` that answer the scenario's commands, by id: the negotiation's
/// reply is left out, and so are QGA sync replies and id-less errors (they carry no id).
fn recorded_replies(transcript: &Transcript) -> BTreeMap<u64, Value> {
    let messages = |from| -> Vec<Value> {
        // QGA's 0xFF delimiter is not JSON (and never part of a JSON text).
        let bytes: Vec<u8> = transcript
            .bytes_from(from)
            .into_iter()
            .filter(|&b| b != 0xFF)
            .collect();
        serde_json::Deserializer::from_slice(&bytes)
            .into_iter()
            .map(Result::unwrap)
            .collect()
    };
    let negotiation: Vec<Value> = messages(Direction::Client)
        .into_iter()
        .filter(|r| r["execute"] == "qmp_capabilities")
        .map(|r| r["id"].clone())
        .collect();
    messages(Direction::Server)
        .into_iter()
        .filter(|m| m.get("id").is_some_and(|id| !negotiation.contains(id)))
        .map(|m| (m["id"].as_u64().expect("a numeric id"), m))
        .collect()
}

/// Each command completed once, with the return value or error of the recorded reply that
/// has its id, and every recorded reply answered a command.
fn check_outcomes(recorded: &BTreeMap<u64, Value>, completed: &[(RequestId, Outcome)]) {
    let got: BTreeMap<u64, &Outcome> = completed.iter().map(|(id, o)| (id.get(), o)).collect();
    assert_eq!(got.len(), completed.len(), "a command completed twice");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        recorded.keys().collect::<Vec<_>>(),
        "commands completed vs replies recorded"
    );
    for (id, outcome) in got {
        let reply = &recorded[&id];
        match outcome {
            Outcome::Replied(Ok(v)) => {
                let value: Value = serde_json::from_str(v.get()).unwrap();
                assert_eq!(Some(&value), reply.get("return"), "#{id}: {reply}");
            }
            Outcome::Replied(Err(e)) => {
                let error = reply
                    .get("error")
                    .unwrap_or_else(|| panic!("#{id}: {reply}"));
                let error: CommandError = serde_json::from_value(error.clone()).unwrap();
                assert_eq!(e, &error, "#{id}");
            }
            other => panic!("#{id}: {other:?}, recorded {reply}"),
        }
    }
}

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
    let recorded = recorded_replies(&transcript);
    let (replay, stream) = Replay::start(transcript, Duration::from_secs(10)).unwrap();
    let mut driver = scenario.run(stream, Path::new("/nonexistent"));
    let completed = std::mem::take(&mut driver.completed);
    drop(driver);
    replay.finish().unwrap();
    check_outcomes(&recorded, &completed);
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
    let text = String::from_utf8_lossy(&transcript.bytes_from(Direction::Client)).into_owned();
    let start = text.find("\"filename\":\"").unwrap() + "\"filename\":\"".len();
    let image = &text[start..start + text[start..].find('"').unwrap()];
    let dir = Path::new(image).parent().unwrap().to_owned();
    let scenario = scenarios::ALL
        .iter()
        .find(|s| s.name == "qsd-jobs")
        .unwrap();
    let recorded = recorded_replies(&transcript);
    let (replay, stream) = Replay::start(transcript, Duration::from_secs(10)).unwrap();
    let mut driver = scenario.run(stream, &dir);
    let completed = std::mem::take(&mut driver.completed);
    drop(driver);
    replay.finish().unwrap();
    check_outcomes(&recorded, &completed);
}
