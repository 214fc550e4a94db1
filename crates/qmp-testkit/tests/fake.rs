//! The fake's scripted behaviour and faults, seen from a raw socket client.

use std::io::{BufRead, ErrorKind, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qmp_testkit::fake::{Action, FakeQemu, Response, Script, faults};
use qmp_testkit::transcript::{Direction, Transcript};

const T: Duration = Duration::from_secs(10);
const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"qmp-testkit\"}, \"capabilities\": [\"oob\"]}}\r\n";
const NEGOTIATE: &[u8] = br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}"#;

/// A blocking client reading exact byte counts.
struct Client<S: Read + Write> {
    s: S,
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Reads one line ending in LF (CRLF included).
    fn line(&mut self) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while out.last() != Some(&b'\n') {
            match self.s.read(&mut b) {
                Ok(1) => out.push(b[0]),
                other => panic!("read: {other:?} after {:?}", String::from_utf8_lossy(&out)),
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }
}

fn unix(fake: &FakeQemu) -> Client<UnixStream> {
    let s = UnixStream::connect(fake.socket_path().unwrap()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    Client { s }
}

fn ready(fake: &FakeQemu) -> Client<UnixStream> {
    let mut c = unix(fake);
    assert_eq!(c.line(), GREETING);
    c.send(NEGOTIATE);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 0}\r\n");
    c
}

fn is_event(line: &str, name: &str) -> bool {
    line.starts_with("{\"timestamp\": {\"seconds\": ")
        && line.ends_with(&format!("\"event\": \"{name}\"}}\r\n"))
}

#[test]
fn event_before_the_negotiation_reply() {
    let fake = FakeQemu::unix(Script::new().on(
        "qmp_capabilities",
        Response::ok("{}").event_before("EARLY", None),
    ))
    .unwrap();
    let mut c = unix(&fake);
    assert_eq!(c.line(), GREETING);
    c.send(NEGOTIATE);
    let first = c.line();
    assert!(is_event(&first, "EARLY"), "{first}");
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 0}\r\n");
    let negotiation = &fake.requests()[0];
    assert_eq!(
        (
            negotiation.name.as_deref(),
            negotiation.arguments.as_deref(),
            negotiation.id.as_deref()
        ),
        (
            Some("qmp_capabilities"),
            Some(r#"{"enable":["oob"]}"#),
            Some("0")
        )
    );
}

#[test]
fn events_on_demand_and_after_a_reply() {
    let fake =
        FakeQemu::unix(Script::new().on("stop", Response::ok("{}").event_after("STOP", None)))
            .unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"execute":"stop","id":1}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 1}\r\n");
    assert!(is_event(&c.line(), "STOP"));
    fake.push_event("BLOCK_JOB_READY", Some(r#"{"device":"j"}"#));
    let line = c.line();
    assert!(
        line.ends_with("\"event\": \"BLOCK_JOB_READY\", \"data\": {\"device\": \"j\"}}\r\n"),
        "{line}"
    );
}

#[test]
fn an_event_pushed_just_before_a_disconnect_is_delivered_first() {
    let fake = FakeQemu::unix(Script::new()).unwrap();
    let mut c = ready(&fake);
    for i in 0..20 {
        fake.push_event("SHUTDOWN", Some(&format!("{{\"n\": {i}}}")));
    }
    fake.disconnect();
    for i in 0..20 {
        let line = c.line();
        assert!(
            line.ends_with(&format!("\"data\": {{\"n\": {i}}}}}\r\n")),
            "{line}"
        );
    }
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"", "EOF follows the events");
}

#[test]
fn negotiation_rules_and_builtins() {
    let fake = FakeQemu::unix(Script::new().version(9, 2, 50)).unwrap();
    let mut c = unix(&fake);
    let greeting = c.line();
    assert!(greeting.starts_with(
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 50, \"minor\": 2, \"major\": 9}"
    ));
    c.send(br#"{"execute":"query-version","id":1}"#);
    assert_eq!(
        c.line(),
        "{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
    );
    c.send(NEGOTIATE);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 0}\r\n");
    c.send(br#"{"execute":"query-version","id":2}{"execute":"nope","id":3}"#);
    assert_eq!(
        c.line(),
        "{\"return\": {\"qemu\": {\"micro\": 50, \"minor\": 2, \"major\": 9}, \"package\": \"qmp-testkit\"}, \"id\": 2}\r\n"
    );
    assert_eq!(
        c.line(),
        "{\"id\": 3, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"
    );
    let reqs = fake.wait_requests(4, T);
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[0].name.as_deref(), Some("query-version"));
    assert!(reqs[0].rejected.is_some());
    assert_eq!(reqs[3].id.as_deref(), Some("3"));
    let mut sent = br#"{"execute":"query-version","id":1}"#.to_vec();
    sent.extend_from_slice(NEGOTIATE);
    sent.extend_from_slice(br#"{"execute":"query-version","id":2}{"execute":"nope","id":3}"#);
    assert_eq!(fake.received_bytes(), vec![sent]);
}

#[test]
fn argument_rules_handler_and_once() {
    let fake = FakeQemu::unix(
        Script::new()
            .on_args(
                "human-monitor-command",
                r#"{"command-line":"info version"}"#,
                Response::ok(r#""10.0.2\r\n""#),
            )
            .on_once("query-status", Response::ok(r#"{"status":"paused"}"#))
            .handler(|req| {
                (req.name == "query-status").then(|| Response::ok(r#"{"status":"running"}"#))
            }),
    )
    .unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"execute":"human-monitor-command","arguments":{"command-line":"info version"},"id":1}"#);
    assert_eq!(c.line(), "{\"return\": \"10.0.2\\r\\n\", \"id\": 1}\r\n");
    c.send(
        br#"{"execute":"human-monitor-command","arguments":{"command-line":"info cpus"},"id":2}"#,
    );
    assert_eq!(
        c.line(),
        "{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command human-monitor-command has not been found\"}}\r\n"
    );
    c.send(br#"{"execute":"query-status","id":3}{"execute":"query-status","id":4}"#);
    assert_eq!(
        c.line(),
        "{\"return\": {\"status\": \"paused\"}, \"id\": 3}\r\n"
    );
    assert_eq!(
        c.line(),
        "{\"return\": {\"status\": \"running\"}, \"id\": 4}\r\n"
    );
}

#[test]
fn delays_keep_in_band_order_and_oob_overtakes_a_stall() {
    let fake = FakeQemu::unix(
        Script::new()
            .on("slow", Response::ok("1").delay(Duration::from_millis(50)))
            .on("fast", Response::ok("2"))
            .on(
                "blocked",
                Response::ok("3").delay(Duration::ZERO).then(Action::Stall),
            )
            .on("query-yank", Response::ok("[]")),
    )
    .unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"execute":"slow","id":1}{"execute":"fast","id":2}"#);
    assert_eq!(c.line(), "{\"return\": 1, \"id\": 1}\r\n");
    assert_eq!(c.line(), "{\"return\": 2, \"id\": 2}\r\n");
    // A stalled command holds the in-band queue; exec-oob runs at once.
    c.send(
        br#"{"execute":"blocked","id":3}{"execute":"fast","id":4}{"exec-oob":"query-yank","id":5}"#,
    );
    assert_eq!(c.line(), "{\"return\": 3, \"id\": 3}\r\n");
    assert_eq!(c.line(), "{\"return\": [], \"id\": 5}\r\n");
    fake.release();
    assert_eq!(c.line(), "{\"return\": 2, \"id\": 4}\r\n");
}

#[test]
fn stops_reading_after_eight_queued_commands() {
    let fake = FakeQemu::unix(
        Script::new()
            .on(
                "hold",
                Response::actions(vec![Action::Stall, Action::Return("0".into())]),
            )
            .on("n", Response::ok("1"))
            .on("query-yank", Response::ok("[]")),
    )
    .unwrap();
    let mut c = ready(&fake);
    let mut input = br#"{"execute":"hold","id":"h"}"#.to_vec();
    for i in 0..10 {
        input.extend_from_slice(format!(r#"{{"execute":"n","id":{i}}}"#).as_bytes());
    }
    input.extend_from_slice(br#"{"exec-oob":"query-yank","id":"oob"}"#);
    c.send(&input);
    // qmp_capabilities, hold, then 8 queued: 10 read; the rest (and the OOB one) wait.
    assert_eq!(fake.wait_requests(10, T).len(), 10);
    assert_eq!(fake.wait_requests(11, Duration::from_millis(200)).len(), 10);
    fake.release();
    assert_eq!(c.line(), "{\"return\": 0, \"id\": \"h\"}\r\n");
    let mut lines: Vec<String> = (0..11).map(|_| c.line()).collect();
    // The OOB command is read once the queue has room, so it may overtake queued ones.
    let oob = lines
        .iter()
        .position(|l| l == "{\"return\": [], \"id\": \"oob\"}\r\n")
        .expect("oob reply");
    lines.remove(oob);
    let expected: Vec<String> = (0..10)
        .map(|i| format!("{{\"return\": 1, \"id\": {i}}}\r\n"))
        .collect();
    assert_eq!(lines, expected);
    assert_eq!(fake.requests().len(), 13);
}

#[test]
fn without_oob_one_command_at_a_time() {
    let fake = FakeQemu::unix(Script::new().on(
        "hold",
        Response::actions(vec![Action::Stall, Action::Return("0".into())]),
    ))
    .unwrap();
    let mut c = unix(&fake);
    assert_eq!(c.line(), GREETING);
    c.send(br#"{"execute":"qmp_capabilities","id":0}{"execute":"hold","id":1}{"execute":"hold","id":2}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 0}\r\n");
    assert_eq!(fake.wait_requests(2, T).len(), 2);
    assert_eq!(fake.wait_requests(3, Duration::from_millis(200)).len(), 2);
    fake.release();
    assert_eq!(c.line(), "{\"return\": 0, \"id\": 1}\r\n");
    fake.release();
    assert_eq!(c.line(), "{\"return\": 0, \"id\": 2}\r\n");
}

#[test]
fn malformed_output_faults() {
    let fake = FakeQemu::unix(
        Script::new()
            .on(
                "bad",
                Response::actions(vec![
                    Action::Raw(faults::idless_errors(2)),
                    Action::ReturnWithId {
                        id: "999".into(),
                        value: "{}".into(),
                    },
                    Action::Raw(faults::INF_ID.to_vec()),
                    Action::Return("{}".into()),
                ]),
            )
            .on("silent", Response::none())
            .on(
                "big",
                Response::actions(vec![Action::Raw(faults::oversized(3, 100))]),
            )
            .on(
                "deep",
                Response::actions(vec![Action::Raw(faults::too_deep(4, 3))]),
            ),
    )
    .unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"execute":"bad","id":1}{"execute":"silent","id":2}{"execute":"big","id":3}{"execute":"deep","id":4}"#);
    let idless = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\r\n";
    assert_eq!(c.line(), idless);
    assert_eq!(c.line(), idless);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 999}\r\n");
    assert_eq!(c.line(), "{\"return\": {}, \"id\": -inf}\r\n");
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 1}\r\n");
    let big = c.line();
    assert_eq!(big.len(), 100 + "{\"return\": \"\", \"id\": 3}\r\n".len());
    assert_eq!(c.line(), "{\"return\": [[[]]], \"id\": 4}\r\n");
    assert_eq!(fake.wait_requests(5, T)[2].name.as_deref(), Some("silent"));
}

#[test]
fn close_mid_message_then_serve_the_next_client() {
    let fake = FakeQemu::unix(Script::new().on(
        "cut",
        Response::actions(vec![
            Action::Raw(b"{\"return\": {\"a".to_vec()),
            Action::Close,
        ]),
    ))
    .unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"execute":"cut","id":1}"#);
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"{\"return\": {\"a");
    assert_eq!(fake.wait_closed(1, T), 1);
    let mut c2 = unix(&fake);
    assert_eq!(c2.line(), GREETING);
}

#[test]
fn second_client_waits_for_its_greeting() {
    let fake = FakeQemu::unix(Script::new()).unwrap();
    let mut c1 = ready(&fake);
    let mut c2 = unix(&fake);
    c2.s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    let err = c2.s.read(&mut b).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    c1.send(br#"{"execute":"quit","id":9}"#);
    assert_eq!(c1.line(), "{\"return\": {}, \"id\": 9}\r\n");
    c2.s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(c2.line(), GREETING);
    assert_eq!(fake.connections(), 2);
}

#[test]
fn reset_after_quit_over_tcp() {
    let fake =
        FakeQemu::tcp(Script::new().on("quit", Response::ok("{}").then(Action::Reset))).unwrap();
    let s = TcpStream::connect(fake.tcp_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut c = Client { s };
    assert_eq!(c.line(), GREETING);
    c.send(NEGOTIATE);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 0}\r\n");
    c.send(br#"{"execute":"quit","id":1}"#);
    // The reply may or may not be readable before the reset discards it; the end is a reset.
    let mut buf = [0u8; 256];
    let end = loop {
        match c.s.read(&mut buf) {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => break Some(e.kind()),
        }
    };
    assert_eq!(end, Some(ErrorKind::ConnectionReset));
}

#[test]
fn pretty_output() {
    let fake = FakeQemu::unix(Script::new().pretty()).unwrap();
    let mut c = unix(&fake);
    let greeting: Vec<String> = (0..15).map(|_| c.line()).collect();
    assert_eq!(greeting[0], "{\r\n");
    assert_eq!(greeting[1], "    \"QMP\": {\r\n");
    assert_eq!(greeting[14], "}\r\n");
    c.send(NEGOTIATE);
    assert_eq!(
        [c.line(), c.line(), c.line(), c.line(), c.line()].concat(),
        "{\r\n    \"return\": {\r\n    },\r\n    \"id\": 0\r\n}\r\n"
    );
}

#[test]
fn qga_framing_matches_the_recorded_agent() {
    let fake =
        FakeQemu::unix(Script::qga().on("guest-info", Response::ok(r#"{"version":"10.0.2"}"#)))
            .unwrap();
    let mut c = unix(&fake);
    let golden = Transcript::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/qga-basic.jsonl"
    ))
    .unwrap();
    // The recorded client's first chunk: 0xFF + guest-sync-delimited with id 1000.
    assert_eq!(golden.chunks[0].from, Direction::Client);
    c.send(&golden.chunks[0].bytes);
    let expected: Vec<u8> = golden.chunks[1..3]
        .iter()
        .inspect(|ch| assert_eq!(ch.from, Direction::Server))
        .flat_map(|ch| ch.bytes.clone())
        .collect();
    assert_eq!(c.exact(expected.len()), expected);
    c.send(br#"{"execute":"guest-ping","id":1}{"execute":"guest-sync","arguments":{"id":7}}{"execute":"guest-info","id":2}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 1}\n");
    assert_eq!(c.line(), "{\"return\": 7}\n");
    assert_eq!(
        c.line(),
        "{\"return\": {\"version\": \"10.0.2\"}, \"id\": 2}\n"
    );
    // Without its required id, as real qemu-ga 10.0.2 answers (seen).
    c.send(br#"{"execute":"guest-sync"}{"execute":"guest-sync-delimited"}"#);
    for _ in 0..2 {
        assert_eq!(
            c.line(),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'id' is missing\"}}\n"
        );
    }
}

#[test]
fn socketpair_and_fd_passing() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fake = FakeQemu::from_stream(
        Script::new()
            .on("getfd", Response::ok("{}"))
            .capabilities(Vec::<String>::new()),
        theirs,
    )
    .unwrap();
    ours.set_read_timeout(Some(T)).unwrap();
    let mut c = Client { s: ours };
    let greeting = c.line();
    assert!(
        greeting.ends_with("\"capabilities\": []}}\r\n"),
        "{greeting}"
    );
    c.send(br#"{"execute":"qmp_capabilities","id":0}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 0}\r\n");
    let file = std::fs::File::open("/dev/null").unwrap();
    let fds = [file.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
    let msg = br#"{"execute":"getfd","arguments":{"fdname":"f"},"id":1}"#;
    let n = rustix::net::sendmsg(
        &c.s,
        &[IoSlice::new(msg)],
        &mut control,
        rustix::net::SendFlags::empty(),
    )
    .unwrap();
    assert_eq!(n, msg.len());
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 1}\r\n");
    let reqs = fake.wait_requests(2, T);
    assert_eq!(reqs[1].fds, 1);
    assert_eq!(reqs[1].arguments.as_deref(), Some(r#"{"fdname":"f"}"#));
    assert_eq!(reqs[0].fds, 0);
    // exec-oob is refused when oob was not negotiated.
    c.send(br#"{"exec-oob":"query-yank","id":2}"#);
    assert_eq!(
        c.line(),
        "{\"id\": 2, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'exec-oob' is unexpected\"}}\r\n"
    );
}

#[test]
fn oob_support_is_per_command() {
    let fake = FakeQemu::unix(Script::new().on("query-status", Response::ok("{}"))).unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"exec-oob":"query-status","id":1}{"exec-oob":"nope","id":2}"#);
    assert_eq!(
        c.line(),
        "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"The command query-status does not support OOB\"}}\r\n"
    );
    assert_eq!(
        c.line(),
        "{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"
    );
}

#[test]
fn a_command_refused_out_of_band_does_not_use_up_its_one_time_rule() {
    let fake =
        FakeQemu::unix(Script::new().on_once("query-status", Response::ok("{\"a\": 1}"))).unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"exec-oob":"query-status","id":1}{"execute":"query-status","id":2}"#);
    assert_eq!(
        c.line(),
        "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"The command query-status does not support OOB\"}}\r\n"
    );
    assert_eq!(c.line(), "{\"return\": {\"a\": 1}, \"id\": 2}\r\n");
}

#[test]
fn golden_transcripts_round_trip() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            let text = std::fs::read_to_string(&path).unwrap();
            let t = Transcript::parse(&text).unwrap();
            assert_eq!(t.to_jsonl(), text, "{}", path.display());
            assert!(t.chunks.len() > 5);
            names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "qga-basic",
            "qga-resync",
            "qsd-basic",
            "qsd-jobs",
            "qsd-pretty",
            "system-basic",
            "system-fds",
            "system-oob"
        ]
    );
}

#[test]
fn dropping_the_fake_while_the_client_does_not_read() {
    let big = "x".repeat(1 << 20);
    let fake = FakeQemu::unix(Script::new().on("big", Response::ok(format!("\"{big}\"")))).unwrap();
    let mut c = ready(&fake);
    // 8 MiB of replies that the client never reads: the fake holds them, as QEMU does.
    for i in 0..8 {
        c.send(format!(r#"{{"execute":"big","id":{i}}}"#).as_bytes());
    }
    assert_eq!(fake.wait_requests(9, T).len(), 9);
    drop(fake); // must not hang
}

#[test]
fn keeps_reading_while_the_client_does_not_read_its_replies() {
    // QEMU's monitor keeps output the client has not taken in memory and goes on reading and
    // running commands. A client that writes all its requests before reading any reply (2 MB
    // of replies here, far more than the socket buffers) must not be left blocked writing.
    const N: usize = 20_000;
    let reply = format!("\"{}\"", "y".repeat(80));
    let fake = FakeQemu::unix(
        Script::new()
            .on("n", Response::ok(reply.clone()))
            .record(false),
    )
    .unwrap();
    let mut c = ready(&fake);
    c.s.set_write_timeout(Some(T)).unwrap();
    let mut input = Vec::new();
    for i in 0..N {
        input.extend_from_slice(format!(r#"{{"execute":"n","id":{i}}}"#).as_bytes());
    }
    c.send(&input);
    let mut replies = std::io::BufReader::new(&c.s);
    let mut line = String::new();
    for i in 0..N {
        line.clear();
        replies.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{{\"return\": {reply}, \"id\": {i}}}\r\n"));
    }
}

#[test]
fn a_client_that_hangs_up_gets_no_more_replies_and_its_queue_is_dropped() {
    let fake = FakeQemu::unix(
        Script::new()
            .on(
                "slow",
                Response::actions(vec![
                    Action::Delay(Duration::from_secs(5)),
                    Action::Return("0".into()),
                ]),
            )
            .on("n", Response::ok("1")),
    )
    .unwrap();
    let mut c = ready(&fake);
    // `slow` runs (for 5 s, unless the session ends), `n` queues behind it; then the client shuts down its sending side.
    c.send(br#"{"execute":"slow","id":1}{"execute":"n","id":2}"#);
    assert_eq!(fake.wait_requests(3, T).len(), 3);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    // As QEMU: the queued request is dropped, the running one's reply goes nowhere, and the
    // connection ends.
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "");
    assert_eq!(fake.wait_closed(1, T), 1);
}

#[test]
fn a_hang_up_is_noticed_while_the_fake_does_not_read() {
    let fake = FakeQemu::unix(Script::new().on(
        "hold",
        Response::actions(vec![Action::Stall, Action::Return("0".into())]),
    ))
    .unwrap();
    let mut c = ready(&fake);
    let mut input = Vec::new();
    for i in 0..9 {
        input.extend_from_slice(format!(r#"{{"execute":"hold","id":{i}}}"#).as_bytes());
    }
    c.send(&input);
    // One stalled, eight queued: the fake has stopped reading (as QEMU does).
    assert_eq!(fake.wait_requests(10, T).len(), 10);
    drop(c);
    // QEMU still watches for the hang-up, ends the session and can greet the next client.
    assert_eq!(fake.wait_closed(1, T), 1);
    let mut next = unix(&fake);
    assert_eq!(next.line(), GREETING);
}

#[test]
fn json_the_fake_cannot_parse_is_sent_as_scripted() {
    let deep = format!("{}0{}", "[".repeat(200), "]".repeat(200));
    let fake = FakeQemu::unix(
        Script::new()
            .on("deep", Response::ok(deep.clone()))
            .on("broken", Response::ok("{nope"))
            .on(
                "other",
                Response::actions(vec![
                    Action::ReturnWithId {
                        id: "7".into(),
                        value: "[1,".into(),
                    },
                    Action::Event {
                        name: "E\"1".into(),
                        data: Some("{x}".into()),
                    },
                ]),
            ),
    )
    .unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"execute":"deep","id":1}{"execute":"broken","id":"b"}{"execute":"other"}"#);
    assert_eq!(c.line(), format!("{{\"return\": {deep}, \"id\": 1}}\r\n"));
    assert_eq!(c.line(), "{\"return\": {nope, \"id\": \"b\"}\r\n");
    assert_eq!(c.line(), "{\"return\": [1,, \"id\": 7}\r\n");
    let ev = c.line();
    assert!(ev.starts_with("{\"timestamp\": {\"seconds\": "), "{ev}");
    assert!(
        ev.ends_with("}, \"event\": \"E\\\"1\", \"data\": {x}}\r\n"),
        "{ev}"
    );
    // Events pushed from the test too.
    fake.push_event("PUSHED", Some("[oops"));
    assert!(
        c.line()
            .ends_with("\"event\": \"PUSHED\", \"data\": [oops}\r\n")
    );
    // The guest agent's line ending, and no id.
    let fake = FakeQemu::unix(Script::qga().on("broken", Response::ok("{nope"))).unwrap();
    let mut c = unix(&fake);
    c.send(br#"{"execute":"broken"}"#);
    assert_eq!(c.line(), "{\"return\": {nope}\n");
}

#[test]
fn a_panic_in_a_handler_fails_the_test_instead_of_vanishing() {
    let fake = FakeQemu::unix(Script::new().handler(|req| {
        assert_ne!(req.name, "other", "the handler's own assertion");
        None
    }))
    .unwrap();
    let mut c = ready(&fake);
    c.send(br#"{"execute":"other","id":1}"#);
    // The thread is gone: the connection ends, and the fake says why.
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    let message = |p: Box<dyn std::any::Any + Send>| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    };
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fake.wait_requests(3, T);
    }));
    assert_eq!(
        message(waited.expect_err("the log accessors panic")),
        "the fake QEMU's thread panicked (in a script handler?); see its message above"
    );
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(fake)));
    assert!(
        message(dropped.expect_err("dropping it raises the handler's panic"))
            .contains("the handler's own assertion"),
    );
}

#[test]
fn a_delay_of_duration_max_waits_for_ever_without_a_panic() {
    let fake = FakeQemu::unix(
        Script::new()
            .on("never", Response::ok("0").delay(Duration::MAX))
            .on("n", Response::ok("1")),
    )
    .unwrap();
    let mut c = ready(&fake);
    c.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c.send(br#"{"execute":"never","id":1}{"execute":"n","id":2}"#);
    let mut b = [0u8; 1];
    assert_eq!(
        c.s.read(&mut b).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "no reply: `never` still runs, `n` waits behind it"
    );
    assert_eq!(fake.wait_requests(3, T).len(), 3);
    drop(fake); // and the thread is alive, not panicked: dropping raises nothing
}

#[test]
fn disconnect_ends_the_session_of_a_client_that_does_not_read() {
    let fake = FakeQemu::unix(Script::new()).unwrap();
    let c = ready(&fake);
    // Far more than the socket holds, never read.
    fake.push_raw(&vec![b' '; 8 << 20]);
    fake.disconnect();
    assert_eq!(fake.wait_closed(1, T), 1);
    // Served again: the next client is greeted.
    let mut next = unix(&fake);
    assert_eq!(next.line(), GREETING);
    drop(c);
}

#[test]
fn the_recorder_forwards_a_client_that_writes_everything_before_reading() {
    use qmp_testkit::transcript::Recorder;
    const N: usize = 100_000;
    // About 2.7 MB of requests and 13 MB of replies, far more than the sockets hold. The fake
    // answers at once, whether or not anyone reads, so replies pile up on the client's side
    // while it still writes.
    let reply = format!("\"{}\"", "r".repeat(100));
    let fake = FakeQemu::unix(Script::new().on("n", Response::ok(reply)).record(false)).unwrap();
    let path = fake.socket_path().unwrap().to_owned();
    let (report, outcome) = std::sync::mpsc::channel();
    // On a thread of its own: a recorder that wedges leaves it blocked.
    std::thread::spawn(move || {
        let (recorder, s) = Recorder::connect(&path).unwrap();
        let mut c = Client { s };
        assert_eq!(c.line(), GREETING);
        let mut input = NEGOTIATE.to_vec();
        for i in 0..N {
            input.extend_from_slice(format!(r#"{{"execute":"n","id":{i}}}"#).as_bytes());
        }
        c.send(&input);
        let mut replies = std::io::BufReader::new(&c.s);
        let mut line = String::new();
        let mut last = String::new();
        for _ in 0..=N {
            line.clear();
            replies.read_line(&mut line).unwrap();
            std::mem::swap(&mut line, &mut last);
        }
        drop(recorder); // must not hang either
        let _ = report.send(last);
    });
    let last = outcome
        .recv_timeout(Duration::from_secs(60))
        .expect("the recorder forwards both ways without wedging");
    assert!(
        last.ends_with(&format!(", \"id\": {}}}\r\n", N - 1)),
        "{last}"
    );
}

#[test]
fn a_client_that_stopped_reading_raises_no_sigpipe_where_it_is_not_ignored() {
    const CHILD: &str = "QMP_TESTKIT_SIGPIPE_CHILD";
    if std::env::var_os(CHILD).is_none() {
        // Run this test again in a process of its own, where SIGPIPE would kill.
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_client_that_stopped_reading_raises_no_sigpipe_where_it_is_not_ignored",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{:?}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(String::from_utf8_lossy(&o.stdout).contains("1 passed"));
        return;
    }
    // As a C host or a fuzzer has it: Rust's runtime ignores SIGPIPE, so restore the default.
    // SAFETY: no other thread of this process is handling signals.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let fake = FakeQemu::unix(Script::new()).unwrap();
    let mut c = ready(&fake);
    // The client will read no more: writing to it fails with EPIPE (and raises SIGPIPE unless
    // the write says not to).
    c.s.shutdown(std::net::Shutdown::Read).unwrap();
    c.send(br#"{"execute":"query-version","id":1}"#);
    assert_eq!(
        fake.wait_closed(1, T),
        1,
        "the session ended on the failed write"
    );
}
