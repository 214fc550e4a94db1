//! Replays the transcripts recorded from real QEMU programs (`tests/data/*.jsonl` at the
//! workspace root; format in `tests/data/README.md`).
//!
//! For each transcript, the requests the recording client sent are re-issued at the same
//! points, and the server's bytes are fed back: whole, one byte at a time, and split at every
//! single position. Every run must write exactly the recorded client bytes and produce exactly
//! the same outputs.

#![allow(
    clippy::disallowed_methods,
    reason = "tests take one real instant as virtual time zero"
)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use qmp_proto::{Command, Config, Connection, Outcome, Output};
use serde_json::Value;

#[derive(Debug, Clone)]
enum Step {
    /// Bytes the client wrote; `fds` when they carried file descriptors.
    Client {
        bytes: Vec<u8>,
        fds: bool,
    },
    Server(Vec<u8>),
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

fn load(name: &str) -> Vec<Step> {
    let text = std::fs::read_to_string(data_dir().join(name)).expect("transcript");
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().expect("header")).expect("json");
    assert_eq!(header["transcript"], 1);
    lines
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("json line");
            let bytes = match (&v["text"], &v["hex"]) {
                (Value::String(t), _) => t.as_bytes().to_vec(),
                (_, Value::String(h)) => (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                    .collect(),
                _ => panic!("chunk without bytes: {line}"),
            };
            match v["from"].as_str() {
                Some("client") => Step::Client {
                    bytes,
                    fds: v["fds"].as_u64().unwrap_or(0) > 0,
                },
                Some("server") => Step::Server(bytes),
                other => panic!("bad direction {other:?}"),
            }
        })
        .collect()
}

/// What the client asked for in one chunk of its bytes.
#[derive(Debug)]
enum Ask {
    /// Written by the machine itself: `qmp_capabilities` or the first sync.
    Automatic,
    /// A sync after the first: the recording client called `resync`.
    Resync,
    Send(Command),
}

/// Splits client bytes into requests (skipping 0xFF sync markers).
fn asks(bytes: &[u8], fds: bool, first_sync: &mut bool) -> Vec<Ask> {
    let text: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0xFF).collect();
    let mut out = Vec::new();
    for v in serde_json::Deserializer::from_slice(&text).into_iter::<Value>() {
        let v = v.expect("client bytes are whole requests");
        let (name, oob) = match (&v["execute"], &v["exec-oob"]) {
            (Value::String(n), _) => (n.clone(), false),
            (_, Value::String(n)) => (n.clone(), true),
            _ => panic!("not a request: {v}"),
        };
        if name == "qmp_capabilities" {
            out.push(Ask::Automatic);
            continue;
        }
        if name == "guest-sync-delimited" {
            out.push(if std::mem::take(first_sync) {
                Ask::Automatic
            } else {
                Ask::Resync
            });
            continue;
        }
        let mut cmd = Command::new(name);
        if let Some(args) = v.get("arguments") {
            cmd = cmd
                .raw_arguments(serde_json::to_string(args).unwrap())
                .unwrap();
        }
        if oob {
            cmd = cmd.oob();
        }
        if fds {
            cmd = cmd.with_fds();
        }
        out.push(Ask::Send(cmd));
    }
    out
}

/// How many commands the client sent itself (the handshake's requests not counted).
fn requests(steps: &[Step]) -> usize {
    let mut first_sync = true;
    steps
        .iter()
        .map(|s| match s {
            Step::Client { bytes, fds } => asks(bytes, *fds, &mut first_sync)
                .iter()
                .filter(|a| matches!(a, Ask::Send(_)))
                .count(),
            Step::Server(_) => 0,
        })
        .sum()
}

fn config_for(steps: &[Step]) -> Config {
    // A QGA transcript starts with the client's 0xFF and sync request.
    match steps.first() {
        Some(Step::Client { bytes, .. }) if bytes.first() == Some(&0xFF) => {
            let v: Value = serde_json::from_slice(&bytes[1..]).expect("sync request");
            Config::qga(v["arguments"]["id"].as_u64().expect("sync id"))
        }
        _ => Config::default(),
    }
}

/// Re-cuts one server chunk, given its offset in the whole server stream, into pieces.
type Cut<'a> = &'a dyn Fn(usize, &[u8]) -> Vec<Vec<u8>>;

/// Replays with server chunks re-cut by `cut`; returns the bytes written and the outputs.
fn replay(steps: &[Step], cut: Cut<'_>) -> (Vec<u8>, Vec<Output>) {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, config_for(steps));
    let mut written = Vec::new();
    let mut outputs = Vec::new();
    let mut server_offset = 0;
    let mut first_sync = true;
    let flush = |c: &mut Connection, written: &mut Vec<u8>, outputs: &mut Vec<Output>| {
        while let Some(bytes) = c.poll_transmit() {
            let bytes = bytes.to_vec();
            c.handle_transmitted(t0, bytes.len());
            written.extend_from_slice(&bytes);
        }
        outputs.extend(std::iter::from_fn(|| c.poll_output()));
    };
    for step in steps {
        match step {
            Step::Client { bytes, fds } => {
                for ask in asks(bytes, *fds, &mut first_sync) {
                    match ask {
                        Ask::Automatic => {}
                        Ask::Resync => c.resync(t0),
                        Ask::Send(cmd) => {
                            let with_fds = *fds;
                            let id = c.send(t0, cmd).expect("send");
                            if with_fds {
                                assert_eq!(c.poll_fds(), Some(id), "fds must go with this request");
                            }
                        }
                    }
                }
                flush(&mut c, &mut written, &mut outputs);
            }
            Step::Server(bytes) => {
                for piece in cut(server_offset, bytes) {
                    c.handle_input(t0, &piece);
                    flush(&mut c, &mut written, &mut outputs);
                }
                server_offset += bytes.len();
            }
        }
    }
    c.handle_eof(t0);
    flush(&mut c, &mut written, &mut outputs);
    (written, outputs)
}

fn check(name: &str) {
    let steps = load(name);
    let recorded: Vec<u8> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Client { bytes, .. } => Some(bytes.clone()),
            Step::Server(_) => None,
        })
        .flatten()
        .collect();
    let server: Vec<u8> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Server(b) => Some(b.clone()),
            Step::Client { .. } => None,
        })
        .flatten()
        .collect();

    let (written, whole) = replay(&steps, &|_, b| vec![b.to_vec()]);
    assert_eq!(
        String::from_utf8_lossy(&written),
        String::from_utf8_lossy(&recorded),
        "{name}: client bytes differ from the recording"
    );
    // The recording itself is a healthy session: no anomalies, every command answered.
    assert!(
        !whole.iter().any(|o| matches!(o, Output::Anomaly(_))),
        "{name}: {whole:#?}"
    );
    let events = whole
        .iter()
        .filter(|o| matches!(o, Output::Event(_)))
        .count();
    assert_eq!(
        events,
        count(&server, b"\"event\""),
        "{name}: events delivered"
    );
    // Every request was completed by its reply (or, sent with no reply expected, by being
    // written), none by the end of the session.
    let completed: Vec<&Outcome> = whole
        .iter()
        .filter_map(|o| match o {
            Output::Completed { outcome, .. } => Some(outcome),
            _ => None,
        })
        .collect();
    let answered = completed
        .iter()
        .filter(|o| matches!(o, Outcome::Replied(_) | Outcome::Sent))
        .count();
    assert_eq!(
        (answered, completed.len()),
        (requests(&steps), requests(&steps)),
        "{name}: {whole:#?}"
    );

    let (w, bytewise) = replay(&steps, &|_, b| b.iter().map(|&x| vec![x]).collect());
    assert_eq!(w, written, "{name}: bytes written, one byte at a time");
    assert_eq!(bytewise, whole, "{name}: outputs, one byte at a time");

    for split in 1..server.len() {
        let (w, outs) = replay(&steps, &|off, b| {
            if split > off && split < off + b.len() {
                let k = split - off;
                vec![b[..k].to_vec(), b[k..].to_vec()]
            } else {
                vec![b.to_vec()]
            }
        });
        assert_eq!(w, written, "{name}: bytes written, split at {split}");
        assert_eq!(outs, whole, "{name}: outputs, split at {split}");
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| w == &needle).count()
}

/// The outputs of the whole replay, for transcript-specific asserts.
fn outputs(name: &str) -> Vec<Output> {
    replay(&load(name), &|_, b| vec![b.to_vec()]).1
}

macro_rules! transcript_tests {
    ($($test:ident => $file:literal,)*) => {$(
        #[test]
        fn $test() {
            check($file);
        }
    )*};
}

transcript_tests! {
    qsd_basic => "qsd-basic.jsonl",
    qsd_jobs => "qsd-jobs.jsonl",
    qsd_pretty => "qsd-pretty.jsonl",
    system_basic => "system-basic.jsonl",
    system_oob => "system-oob.jsonl",
    system_fds => "system-fds.jsonl",
    qga_basic => "qga-basic.jsonl",
    qga_resync => "qga-resync.jsonl",
}

#[test]
fn qsd_basic_replies_have_the_recorded_shapes() {
    let errors: Vec<(String, String)> = outputs("qsd-basic.jsonl")
        .into_iter()
        .filter_map(|o| match o {
            Output::Completed {
                outcome: Outcome::Replied(Err(e)),
                ..
            } => Some((e.class.to_string(), e.desc)),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors[0],
        (
            "CommandNotFound".to_owned(),
            "The command no-such-command has not been found".to_owned()
        )
    );
    assert_eq!(
        errors[1],
        (
            "GenericError".to_owned(),
            "Parameter 'bogus' is unexpected".to_owned()
        )
    );
}

#[test]
fn every_transcript_is_replayed() {
    let mut files: Vec<String> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "qga-basic.jsonl",
            "qga-resync.jsonl",
            "qsd-basic.jsonl",
            "qsd-jobs.jsonl",
            "qsd-pretty.jsonl",
            "system-basic.jsonl",
            "system-fds.jsonl",
            "system-oob.jsonl"
        ],
        "a new transcript needs a test above"
    );
}
