//! Behaviour of the client machine, one test per rule, asserting exact outputs and bytes.

#![allow(
    clippy::disallowed_methods,
    reason = "tests take one real instant as virtual time zero"
)]

use std::time::{Duration, Instant};

use qmp_proto::{
    Anomaly, CloseReason, Command, CommandError, Config, Connection, ErrorClass, Failure,
    LocalError, Outcome, Output, Ready, RemoteError, RequestId, SendStatus, State,
};

const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2\"}, \"capabilities\": [\"oob\"]}}\r\n";
const GREETING_NO_OOB: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 9}, \"package\": \"\"}, \"capabilities\": []}}\r\n";
const NEGOTIATE_OOB: &str =
    r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}"#;
const OK0: &str = "{\"return\": {}, \"id\": 0}\r\n";

/// Writes everything the machine wants to send and returns it as text (lossy for 0xFF).
fn tx(c: &mut Connection) -> String {
    tx_at(c, Instant::now())
}

/// [`tx`], reporting the writes at `now`.
fn tx_at(c: &mut Connection, now: Instant) -> String {
    let mut all = Vec::new();
    while let Some(bytes) = c.poll_transmit() {
        let bytes = bytes.to_vec();
        c.handle_transmitted(now, bytes.len());
        all.extend_from_slice(&bytes);
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn outs(c: &mut Connection) -> Vec<Output> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

fn ok(id: u64, ret: &str) -> Output {
    replied(rid(id), ret)
}

/// The completion of request `id` with the return value `ret`.
fn replied(id: RequestId, ret: &str) -> Output {
    Output::Completed {
        id,
        outcome: Outcome::Replied(Ok(raw(ret))),
    }
}

fn raw(s: &str) -> qmp_proto::RawJson {
    qmp_proto::RawJson::from_string(s.to_owned()).unwrap()
}

fn rid(n: u64) -> RequestId {
    // Ids are assigned in order from 1; get one by sending on a scratch connection.
    let mut c = Connection::new(Instant::now(), Config::default());
    let mut id = c.send(Instant::now(), Command::new("x")).unwrap();
    for _ in 1..n {
        id = c.send(Instant::now(), Command::new("x")).unwrap();
    }
    id
}

fn ready(config: Config) -> (Instant, Connection) {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, config);
    c.handle_input(t0, GREETING.as_bytes());
    assert_eq!(tx(&mut c), NEGOTIATE_OOB);
    c.handle_input(t0, OK0.as_bytes());
    let o = outs(&mut c);
    assert!(matches!(o.last(), Some(Output::Ready(_))), "{o:?}");
    (t0, c)
}

fn ready_outputs() -> Vec<Output> {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    c.handle_input(t0, GREETING.as_bytes());
    c.handle_input(t0, OK0.as_bytes());
    outs(&mut c)
}

#[test]
fn handshake_negotiates_oob_and_releases_commands_queued_before_it() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    assert_eq!(c.state(), State::AwaitingGreeting);
    let id = c.send(t0, Command::new("query-status")).unwrap();
    assert_eq!(tx(&mut c), "", "nothing is written before the greeting");
    c.handle_input(t0, GREETING.as_bytes());
    assert_eq!(tx(&mut c), NEGOTIATE_OOB);
    assert_eq!(c.state(), State::Negotiating);
    c.handle_input(t0, OK0.as_bytes());
    assert_eq!(tx(&mut c), r#"{"execute":"query-status","id":1}"#);
    let o = outs(&mut c);
    assert!(matches!(&o[0], Output::Greeting(g) if g.version.package == "Debian 1:10.0.2"));
    assert_eq!(o[1], Output::Ready(ready_caps(&["oob"])));
    assert_eq!(o.len(), 2);
    assert!(c.has_capability("oob"));
    c.handle_input(
        t0,
        b"{\"return\": {\"status\": \"running\"}, \"id\": 1}\r\n",
    );
    assert_eq!(outs(&mut c), vec![replied(id, r#"{"status": "running"}"#)]);
}

fn ready_caps(caps: &[&str]) -> Ready {
    match ready_outputs().pop() {
        Some(Output::Ready(mut r)) => {
            r.capabilities = caps.iter().map(|s| s.to_string()).collect();
            r
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn capabilities_are_intersected_with_the_offer() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    c.handle_input(t0, GREETING_NO_OOB.as_bytes());
    assert_eq!(tx(&mut c), r#"{"execute":"qmp_capabilities","id":0}"#);
    let mut c = Connection::new(t0, Config::default().capabilities(Vec::<String>::new()));
    c.handle_input(t0, GREETING.as_bytes());
    assert_eq!(tx(&mut c), r#"{"execute":"qmp_capabilities","id":0}"#);
    c.handle_input(t0, OK0.as_bytes());
    assert!(!c.has_capability("oob"));
    assert_eq!(
        c.send(t0, Command::new("yank").oob()),
        Err(LocalError::OobNotNegotiated)
    );
}

#[test]
fn greeting_with_unknown_members_and_capabilities_is_accepted() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    c.handle_input(t0, br#"{"QMP": {"version": {"qemu": {"micro": 50, "minor": 1, "major": 11}, "package": "", "extra": [1]}, "capabilities": ["oob", "future-cap"], "new": {}}}"#);
    assert_eq!(tx(&mut c), NEGOTIATE_OOB);
    assert_eq!(
        c.greeting().unwrap().capabilities,
        vec!["oob", "future-cap"]
    );
    assert_eq!(c.greeting().unwrap().version.qemu.micro, 50);
}

#[test]
fn events_before_the_greeting_and_before_the_negotiation_reply_are_delivered() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    c.handle_input(
        t0,
        b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"EARLY\"}\r\n",
    );
    c.handle_input(t0, GREETING.as_bytes());
    let _ = tx(&mut c);
    c.handle_input(
        t0,
        b"{\"timestamp\": {\"seconds\": 3, \"microseconds\": 4}, \"event\": \"RESUME\"}\r\n",
    );
    c.handle_input(t0, OK0.as_bytes());
    let names: Vec<String> = outs(&mut c)
        .into_iter()
        .map(|o| match o {
            Output::Event(e) => format!("event {} {}", e.name, e.timestamp.seconds),
            Output::Greeting(_) => "greeting".into(),
            Output::Ready(_) => "ready".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        ["event EARLY 1", "greeting", "event RESUME 3", "ready"]
    );
    assert_eq!(c.stats().events, 2);
}

#[test]
fn negotiation_failure_closes_and_fails_queued_commands_as_not_sent() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    let id = c.send(t0, Command::new("query-status")).unwrap();
    c.handle_input(t0, GREETING.as_bytes());
    let _ = tx(&mut c);
    c.handle_input(t0, b"{\"id\": 0, \"error\": {\"class\": \"GenericError\", \"desc\": \"Capability oob not available\"}}\r\n");
    let o = outs(&mut c);
    let err = CommandError::new(ErrorClass::GenericError, "Capability oob not available");
    assert_eq!(
        o[1..],
        [
            Output::Completed {
                id,
                outcome: Outcome::NotSent(Failure::HandshakeFailed)
            },
            Output::Closed(CloseReason::Remote(RemoteError::NegotiationFailed(err))),
        ]
    );
    assert_eq!(c.send(t0, Command::new("x")), Err(LocalError::Closed));
}

#[test]
fn handshake_timeout_covers_a_monitor_that_never_greets() {
    let t0 = Instant::now();
    let mut c = Connection::new(
        t0,
        Config::default().handshake_timeout(Some(Duration::from_secs(2))),
    );
    let id = c.send(t0, Command::new("query-status")).unwrap();
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    c.handle_timeout(t0 + Duration::from_millis(1999));
    assert!(outs(&mut c).is_empty());
    c.handle_timeout(t0 + Duration::from_secs(2));
    assert_eq!(
        outs(&mut c),
        vec![
            Output::Completed {
                id,
                outcome: Outcome::NotSent(Failure::HandshakeFailed)
            },
            Output::Closed(CloseReason::Remote(RemoteError::GreetingTimeout)),
        ]
    );
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn handshake_timeouts_say_which_step_was_missing() {
    let t0 = Instant::now();
    let cfg = || Config::default().handshake_timeout(Some(Duration::from_secs(1)));
    let mut greeted = Connection::new(t0, cfg());
    greeted.handle_input(t0, GREETING.as_bytes());
    let _ = tx(&mut greeted);
    greeted.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(
        outs(&mut greeted).last(),
        Some(&Output::Closed(CloseReason::Remote(
            RemoteError::NegotiationTimeout
        )))
    );
    let mut agent = Connection::new(
        t0,
        Config::qga(1).handshake_timeout(Some(Duration::from_secs(1))),
    );
    agent.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(
        outs(&mut agent),
        vec![Output::Closed(CloseReason::Remote(
            RemoteError::SyncTimeout
        ))]
    );
    assert_eq!(
        RemoteError::GreetingTimeout.to_string(),
        "the server accepted the connection but sent no greeting in time (is another client \
         attached to this monitor, or is it a guest agent?)"
    );
}

#[test]
fn a_greeting_over_the_limits_is_named_when_the_handshake_times_out() {
    let t0 = Instant::now();
    let cfg = Config::default()
        .handshake_timeout(Some(Duration::from_secs(1)))
        .max_message_size(64);
    let mut c = Connection::new(t0, cfg);
    c.handle_input(t0, GREETING.as_bytes());
    assert_eq!(tx(&mut c), "", "no greeting was read: nothing to answer");
    c.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(
        outs(&mut c)[1..],
        [
            Output::Unreadable,
            Output::Closed(CloseReason::Remote(RemoteError::GreetingUnreadable)),
        ]
    );
    assert_eq!(
        RemoteError::GreetingUnreadable.to_string(),
        "no readable greeting came in time, but something else did: a message over the size or \
         depth limits (are they too small?), or text that is no QMP greeting (is this an HMP \
         monitor?)"
    );
}

#[test]
fn a_greeting_of_no_known_shape_is_named_when_the_handshake_times_out() {
    let t0 = Instant::now();
    let cfg = Config::default().handshake_timeout(Some(Duration::from_secs(1)));
    let mut c = Connection::new(t0, cfg);
    c.handle_input(t0, b"{\"QMP\": {\"version\": 10}}\r\n");
    assert_eq!(tx(&mut c), "");
    c.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(
        outs(&mut c),
        [
            unexpected(r#"{"QMP": {"version": 10}}"#),
            Output::Closed(CloseReason::Remote(RemoteError::GreetingUnreadable)),
        ]
    );
}

#[test]
fn an_hmp_banner_instead_of_a_greeting_is_named_when_the_handshake_times_out() {
    let t0 = Instant::now();
    let cfg = Config::default().handshake_timeout(Some(Duration::from_secs(1)));
    let mut c = Connection::new(t0, cfg);
    c.handle_input(
        t0,
        b"QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) ",
    );
    c.handle_timeout(t0 + Duration::from_secs(1));
    let o = outs(&mut c);
    assert_eq!(
        o.last(),
        Some(&Output::Closed(CloseReason::Remote(
            RemoteError::GreetingUnreadable
        ))),
        "{o:?}"
    );
    assert!(
        o[..o.len() - 1]
            .iter()
            .all(|x| matches!(x, Output::Anomaly(Anomaly::Garbage { .. }))),
        "{o:?}"
    );
}

#[test]
fn a_qmp_greeting_to_a_guest_agent_session_ends_it_at_once() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::qga(7));
    let _ = tx(&mut c);
    c.handle_input(t0, GREETING.as_bytes());
    assert_eq!(
        outs(&mut c),
        [Output::Closed(CloseReason::Remote(RemoteError::QmpNotQga))]
    );
    assert_eq!(
        RemoteError::QmpNotQga.to_string(),
        "the peer greeted as a QMP monitor, not a guest agent (connect to it as QMP)"
    );
}

#[test]
fn nothing_after_a_qmp_greeting_in_the_same_read_revives_a_guest_agent_session() {
    // The greeting ends the session; a 0xFF and more messages behind it in the same read
    // (a sync reply, an event, a second greeting) must not make it ready, deliver an event
    // or close it twice.
    for tail in ["{\"return\": 7}\n", "{\"event\": \"X\"}\n", GREETING] {
        let t0 = Instant::now();
        let mut c = Connection::new(t0, Config::qga(7));
        let _ = tx(&mut c);
        let mut input = GREETING.as_bytes().to_vec();
        input.push(0xFF);
        input.extend_from_slice(tail.as_bytes());
        c.handle_input(t0, &input);
        assert!(c.is_closed(), "{tail}");
        assert_eq!(
            outs(&mut c),
            [Output::Closed(CloseReason::Remote(RemoteError::QmpNotQga))],
            "{tail}"
        );
    }
}

#[test]
fn framing_does_not_depend_on_lines_or_read_boundaries() {
    // CRLF, LF, pretty-printed, two messages in one read, no separator at all.
    let stream = "{\"return\": 1, \"id\": 1}\r\n{\"return\": [2], \"id\": 2}\n{\r\n    \"return\": {\r\n        \"a\": \"}\\\"{\"\r\n    },\r\n    \"id\": 3\r\n}\r\n{\"return\": 4, \"id\": 4}{\"return\": 5, \"id\": 5}";
    let expect = vec![
        ok(1, "1"),
        ok(2, "[2]"),
        ok(3, "{\r\n        \"a\": \"}\\\"{\"\r\n    }"),
        ok(4, "4"),
        ok(5, "5"),
    ];
    for split in [usize::MAX, 1, 2, 3, 7, 64] {
        let (t0, mut c) = ready(Config::default());
        for _ in 0..5 {
            c.send(t0, Command::new("x")).unwrap();
        }
        let _ = tx(&mut c);
        for chunk in stream.as_bytes().chunks(split.min(stream.len())) {
            c.handle_input(t0, chunk);
        }
        assert_eq!(outs(&mut c), expect, "split {split}");
    }
}

#[test]
fn oversized_and_too_deep_messages_are_skipped_and_the_session_goes_on() {
    let (t0, mut c) = ready(Config::default().max_message_size(1000).max_depth(16));
    c.send(t0, Command::new("x")).unwrap();
    c.send(t0, Command::new("y")).unwrap();
    let _ = tx(&mut c);
    let big = format!("{{\"return\": \"{}\", \"id\": 1}}\r\n", "a".repeat(5000));
    let deep = format!(
        "{{\"return\": {}0{}, \"id\": 1}}\r\n",
        "[".repeat(20),
        "]".repeat(20)
    );
    for chunk in big.as_bytes().chunks(300) {
        c.handle_input(t0, chunk);
    }
    c.handle_input(t0, deep.as_bytes());
    c.handle_input(t0, b"{\"return\": {}, \"id\": 2}\r\n");
    // The oversized reply still shows its id at its end: request 1 resolves at once, as
    // answered but unreadable; the too-deep one then names an id no longer pending.
    assert_eq!(
        outs(&mut c),
        vec![
            Output::Anomaly(Anomaly::Oversized { len: big.len() - 2 }),
            lost(1),
            Output::Anomaly(Anomaly::TooDeep {
                len: deep.len() - 2
            }),
            ok(2, "{}"),
        ]
    );
    assert_eq!(c.stats().anomalies, 2);
    assert_eq!(c.pending(), 0);
}

fn lost(id: u64) -> Output {
    Output::Completed {
        id: rid(id),
        outcome: Outcome::Unknown(Failure::ReplyLost),
    }
}

#[test]
fn an_unreadable_reply_resolves_its_request_by_the_id_at_either_end() {
    let (t0, mut c) = ready(Config::default().max_message_size(200).max_depth(8));
    for _ in 0..3 {
        c.send(t0, Command::new("x").timeout(Some(Duration::from_secs(5))))
            .unwrap();
    }
    let _ = tx(&mut c);
    // An error reply writes its id first; nesting makes it too deep. Pretty-printed.
    let deep = format!(
        "{{\r\n    \"id\": 1,\r\n    \"error\": {}1{}\r\n}}\r\n",
        "[".repeat(10),
        "]".repeat(10)
    );
    c.handle_input(t0, deep.as_bytes());
    assert_eq!(
        outs(&mut c),
        vec![
            Output::Anomaly(Anomaly::TooDeep {
                len: deep.len() - 2
            }),
            lost(1),
        ]
    );
    // An oversized return, split anywhere, with its id last; "id" members nested inside the
    // value, or in a string, do not count.
    let big = format!(
        "{{\"return\": {{\"id\": 7, \"s\": \"{} \\\"id\\\": 9}}\"}}, \"id\": 2 }}\n",
        "a".repeat(500)
    );
    for chunk in big.as_bytes().chunks(7) {
        c.handle_input(t0, chunk);
    }
    assert_eq!(
        outs(&mut c),
        vec![
            Output::Anomaly(Anomaly::Oversized { len: big.len() - 1 }),
            lost(2)
        ]
    );
    // Their deadlines went with them; request 3 still times out on its own.
    assert_eq!(c.pending(), 1);
    c.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(
        outs(&mut c),
        vec![Output::Completed {
            id: rid(3),
            outcome: Outcome::Unknown(Failure::Timeout),
        }]
    );
}

#[test]
fn a_reply_to_a_later_in_band_request_resolves_an_earlier_one_whose_reply_was_unreadable() {
    let (t0, mut c) = ready(Config::default().max_message_size(200));
    for _ in 0..3 {
        c.send(t0, Command::new("x")).unwrap();
    }
    let _ = tx(&mut c);
    // No legible id: too large with the id in the middle, and not JSON.
    let big = format!(
        "{{\"return\": 1, \"id\": 1, \"pad\": \"{}\"}}\n",
        "a".repeat(300)
    );
    c.handle_input(t0, big.as_bytes());
    c.handle_input(t0, b"{\"return\": nope, \"id\": 2, \"x\": 0}\n");
    let o = outs(&mut c);
    assert_eq!(o.len(), 4, "{o:?}");
    assert_eq!(
        o[..2],
        [
            Output::Anomaly(Anomaly::Oversized { len: big.len() - 1 }),
            // For all the machine knows, an event was lost.
            Output::Unreadable,
        ]
    );
    assert!(
        matches!(o[2], Output::Anomaly(Anomaly::InvalidJson { .. })),
        "{o:?}"
    );
    assert_eq!(o[3], Output::Unreadable);
    assert_eq!(c.pending(), 3);
    // QEMU answers in-band requests in order, so 1 and 2 will never be answered now.
    c.handle_input(t0, b"{\"return\": {}, \"id\": 3}\n");
    assert_eq!(outs(&mut c), vec![lost(1), lost(2), ok(3, "{}")]);
    assert_eq!(c.pending(), 0);
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn a_reply_that_is_not_json_resolves_its_request_by_the_id_at_either_end() {
    // QEMU prints a non-finite double as `inf` or `nan`, which no JSON parser takes.
    let (t0, mut c) = ready(Config::default());
    let x = c.send(t0, Command::new("x")).unwrap();
    let y = c.send(t0, Command::new("y")).unwrap();
    let _ = tx(&mut c);
    c.handle_input(t0, b"{\"return\": {\"ratio\": inf}, \"id\": 1}\r\n");
    c.handle_input(t0, b"{\"id\": 2, \"return\": nan}\r\n");
    let o = outs(&mut c);
    assert_eq!(o.len(), 4, "{o:?}");
    assert!(
        matches!(o[0], Output::Anomaly(Anomaly::InvalidJson { len: 35, .. })),
        "{o:?}"
    );
    assert_eq!(o[1], lost(x.get()));
    assert!(
        matches!(o[2], Output::Anomaly(Anomaly::InvalidJson { len: 24, .. })),
        "{o:?}"
    );
    assert_eq!(o[3], lost(y.get()));
    assert_eq!(c.pending(), 0);
}

#[test]
fn invalid_json_non_utf8_nuls_and_garbage_are_anomalies_not_fatal() {
    let (t0, mut c) = ready(Config::default());
    c.send(t0, Command::new("x")).unwrap();
    let _ = tx(&mut c);
    c.handle_input(
        t0,
        b"{\"id\": -inf, \"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n",
    );
    c.handle_input(t0, b"{\"return\": \"\xff\xfe\", \"id\": 1, \"x\": 0}\r\n");
    c.handle_input(t0, b"\0\0\0\r\nthis is not json\r\n");
    c.handle_input(t0, b"{\"return\": \"ok\", \"id\": 1}\r\n");
    let o = outs(&mut c);
    assert!(
        matches!(&o[0], Output::Anomaly(Anomaly::InvalidJson { len: 61, .. })),
        "{o:?}"
    );
    assert_eq!(o[1], Output::Unreadable);
    assert!(
        matches!(&o[2], Output::Anomaly(Anomaly::InvalidJson { error, .. }) if error.starts_with("invalid UTF-8")),
        "{o:?}"
    );
    assert_eq!(o[3], Output::Unreadable);
    assert_eq!(
        o[4..],
        [
            Output::Anomaly(Anomaly::Garbage { len: 5 }),
            Output::Anomaly(Anomaly::Garbage { len: 18 }),
            ok(1, "\"ok\"")
        ]
    );
}

#[test]
fn idless_errors_and_unknown_ids_never_misroute_or_close() {
    let (t0, mut c) = ready(Config::default());
    let a = c.send(t0, Command::new("a")).unwrap();
    let _ = tx(&mut c);
    // One bad input can produce several id-less errors (QEMU's nesting-limit recovery).
    let parse_err = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\r\n";
    c.handle_input(t0, parse_err.repeat(3).as_bytes());
    c.handle_input(
        t0,
        b"{\"return\": {}, \"id\": 99}\r\n{\"return\": {}, \"id\": \"foreign\"}\r\n",
    );
    c.handle_input(t0, b"{\"return\": 7, \"id\": 1}\r\n");
    let e = CommandError::new(
        ErrorClass::GenericError,
        "JSON parse error, expecting value",
    );
    assert_eq!(
        outs(&mut c),
        vec![
            Output::Anomaly(Anomaly::IdlessError(e.clone())),
            Output::Anomaly(Anomaly::IdlessError(e.clone())),
            Output::Anomaly(Anomaly::IdlessError(e)),
            replied(a, "7"),
        ]
    );
    assert_eq!(c.stats().unknown_replies, 2);
    assert!(c.is_ready());
}

#[test]
fn errors_keep_an_open_class_and_the_description() {
    let (t0, mut c) = ready(Config::default());
    let id = c.send(t0, Command::new("nope")).unwrap();
    let _ = tx(&mut c);
    c.handle_input(t0, b"{\"id\": 1, \"error\": {\"class\": \"SomeFutureClass\", \"desc\": \"The command nope has not been found\"}}\r\n");
    assert_eq!(
        outs(&mut c),
        vec![Output::Completed {
            id,
            outcome: Outcome::Replied(Err(CommandError::new(
                ErrorClass::Other("SomeFutureClass".into()),
                "The command nope has not been found"
            )))
        }]
    );
}

#[test]
fn in_band_commands_are_capped_and_oob_bypasses_the_cap() {
    let (t0, mut c) = ready(Config::default());
    for _ in 0..10 {
        c.send(t0, Command::new("q")).unwrap();
    }
    let wire = tx(&mut c);
    assert_eq!(wire.matches("\"execute\"").count(), 8);
    assert_eq!((c.in_flight(), c.queued()), (8, 2));
    let oob = c.send(t0, Command::new("query-yank").oob()).unwrap();
    assert_eq!(tx(&mut c), r#"{"exec-oob":"query-yank","id":11}"#);
    assert_eq!(oob.get(), 11);
    c.handle_input(
        t0,
        b"{\"return\": [], \"id\": 11}\r\n{\"return\": {}, \"id\": 1}\r\n",
    );
    assert_eq!(tx(&mut c), r#"{"execute":"q","id":9}"#);
    assert_eq!((c.in_flight(), c.queued()), (8, 1));
}

#[test]
fn oob_queued_before_ready_goes_out_at_ready_ahead_of_the_in_band_cap() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default().max_in_flight(2));
    for _ in 0..3 {
        c.send(t0, Command::new("q")).unwrap();
    }
    let oob = c.send(t0, Command::new("query-yank").oob()).unwrap();
    c.handle_input(t0, GREETING.as_bytes());
    let _ = tx(&mut c);
    c.handle_input(t0, OK0.as_bytes());
    assert_eq!(
        tx(&mut c),
        r#"{"exec-oob":"query-yank","id":4}{"execute":"q","id":1}{"execute":"q","id":2}"#
    );
    assert_eq!((c.in_flight(), c.queued()), (2, 1));
    c.handle_input(
        t0,
        b"{\"return\": [], \"id\": 4}\r\n{\"return\": {}, \"id\": 1}\r\n",
    );
    assert_eq!(tx(&mut c), r#"{"execute":"q","id":3}"#);
    assert!(
        outs(&mut c)
            .iter()
            .any(|o| matches!(o, Output::Completed { id, .. } if *id == oob))
    );
}

#[test]
fn oob_queued_before_ready_fails_as_not_sent_when_not_offered() {
    let t0 = Instant::now();
    let mut c = Connection::new(t0, Config::default());
    let id = c.send(t0, Command::new("yank").oob()).unwrap();
    c.handle_input(t0, GREETING_NO_OOB.as_bytes());
    let _ = tx(&mut c);
    c.handle_input(t0, OK0.as_bytes());
    let o = outs(&mut c);
    assert_eq!(
        o.last(),
        Some(&Output::Completed {
            id,
            outcome: Outcome::NotSent(Failure::OobUnavailable)
        })
    );
    assert_eq!(tx(&mut c), "");
}

#[test]
fn timeouts_distinguish_not_sent_from_unknown_and_late_replies_are_dropped() {
    let cfg = Config::default()
        .max_in_flight(1)
        .command_timeout(Some(Duration::from_secs(5)));
    let (t0, mut c) = ready(cfg);
    let sent = c.send(t0, Command::new("slow")).unwrap();
    let queued = c
        .send(t0 + Duration::from_secs(1), Command::new("next"))
        .unwrap();
    assert_eq!(tx(&mut c), r#"{"execute":"slow","id":1}"#);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    c.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(
        outs(&mut c),
        vec![Output::Completed {
            id: sent,
            outcome: Outcome::Unknown(Failure::Timeout)
        }]
    );
    // QEMU still holds the timed-out command, so the slot stays taken.
    assert_eq!(tx(&mut c), "");
    c.handle_timeout(t0 + Duration::from_secs(6));
    assert_eq!(
        outs(&mut c),
        vec![Output::Completed {
            id: queued,
            outcome: Outcome::NotSent(Failure::Timeout)
        }]
    );
    // The late reply is dropped and counted, and frees the slot.
    c.handle_input(
        t0 + Duration::from_secs(7),
        b"{\"return\": {}, \"id\": 1}\r\n",
    );
    assert!(outs(&mut c).is_empty());
    assert_eq!(c.stats().late_replies, 1);
    let third = c
        .send(
            t0 + Duration::from_secs(7),
            Command::new("third").timeout(None),
        )
        .unwrap();
    assert_eq!(tx(&mut c), r#"{"execute":"third","id":3}"#);
    assert_eq!(c.poll_timeout(), None);
    c.handle_input(t0, b"{\"return\": 3, \"id\": 3}\r\n");
    assert_eq!(outs(&mut c), vec![replied(third, "3")]);
}

#[test]
fn eof_resolves_everything_with_the_right_outcome() {
    let (t0, mut c) = ready(Config::default().max_in_flight(1));
    let written = c.send(t0, Command::new("a")).unwrap();
    let _ = tx(&mut c);
    let partial = c.send(t0, Command::new("b").oob()).unwrap();
    let n = c.poll_transmit().unwrap().len();
    c.handle_transmitted(t0, n - 3);
    let queued = c.send(t0, Command::new("c")).unwrap();
    c.handle_input(t0, b"{\"return\": {}, \"i");
    c.handle_eof(t0);
    assert_eq!(
        outs(&mut c),
        vec![
            Output::Anomaly(Anomaly::Truncated { len: 17 }),
            Output::Completed {
                id: written,
                outcome: Outcome::Unknown(Failure::PeerClosed)
            },
            Output::Completed {
                id: partial,
                outcome: Outcome::Unknown(Failure::PeerClosed)
            },
            Output::Completed {
                id: queued,
                outcome: Outcome::NotSent(Failure::PeerClosed)
            },
            Output::Closed(CloseReason::PeerClosed),
        ]
    );
    assert!(c.is_closed());
    assert_eq!(c.poll_transmit(), None);
    assert_eq!(c.send(t0, Command::new("d")), Err(LocalError::Closed));
    c.handle_eof(t0);
    assert!(outs(&mut c).is_empty(), "closed is reported once");
}

#[test]
fn local_close_resolves_everything_and_drops_unsent_bytes() {
    let (t0, mut c) = ready(Config::default());
    let a = c.send(t0, Command::new("a")).unwrap();
    let _ = tx(&mut c);
    let b = c.send(t0, Command::new("b")).unwrap();
    c.close(t0);
    assert_eq!(
        outs(&mut c),
        vec![
            Output::Completed {
                id: a,
                outcome: Outcome::Unknown(Failure::LocalClose)
            },
            Output::Completed {
                id: b,
                outcome: Outcome::NotSent(Failure::LocalClose)
            },
            Output::Closed(CloseReason::Local),
        ]
    );
    assert_eq!(c.poll_transmit(), None);
}

#[test]
fn abandoning_never_leaves_half_a_request_on_the_wire() {
    let (t0, mut c) = ready(Config::default());
    let a = c.send(t0, Command::new("first")).unwrap();
    let b = c.send(t0, Command::new("second")).unwrap();
    let cc = c.send(t0, Command::new("third")).unwrap();
    c.handle_transmitted(t0, 5);
    // `a` is partly written: the rest still goes. `b` has no byte out: it vanishes.
    assert!(c.abandon(a));
    assert!(c.abandon(b));
    assert!(!c.abandon(b));
    assert_eq!(
        tx(&mut c),
        r#"cute":"first","id":1}{"execute":"third","id":3}"#
    );
    c.handle_input(
        t0,
        b"{\"return\": 1, \"id\": 1}\r\n{\"return\": 3, \"id\": 3}\r\n",
    );
    assert_eq!(outs(&mut c), vec![replied(cc, "3")]);
    assert_eq!(c.stats().late_replies, 1);
    assert_eq!(c.pending(), 0);
    assert_eq!(c.in_flight(), 0);
}

/// One in-band slot, held by an abandoned request whose tombstone is then evicted by more
/// abandoned (oob) requests than the machine keeps tombstones for; then `late_reply` to it.
/// The slot must be free again: the next command goes out and is answered.
fn late_reply_after_eviction(late_reply: &[u8]) {
    let mut one = Config::default();
    one.max_in_flight = 1;
    one.max_message_size = 1000;
    let (t0, mut c) = ready(one);
    let slow = c.send(t0, Command::new("slow")).unwrap();
    assert_eq!(tx(&mut c), r#"{"execute":"slow","id":1}"#);
    assert!(c.abandon(slow));
    for n in 2..=4098 {
        let id = c.send(t0, Command::new("query-yank").oob()).unwrap();
        assert_eq!(
            tx(&mut c),
            format!(r#"{{"exec-oob":"query-yank","id":{n}}}"#)
        );
        assert!(c.abandon(id));
    }
    let next = c.send(t0, Command::new("next")).unwrap();
    assert_eq!(tx(&mut c), "", "waits for the slot `slow` holds");
    c.handle_input(t0, late_reply);
    assert_eq!(c.stats().late_replies, 1);
    assert_eq!(c.stats().unknown_replies, 0);
    assert_eq!(tx(&mut c), r#"{"execute":"next","id":4099}"#);
    c.handle_input(t0, b"{\"return\": 7, \"id\": 4099}\r\n");
    let completions: Vec<Output> = outs(&mut c)
        .into_iter()
        .filter(|o| matches!(o, Output::Completed { .. }))
        .collect();
    assert_eq!(completions, vec![replied(next, "7")]);
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn a_late_reply_frees_its_slot_even_after_its_tombstone_was_evicted() {
    late_reply_after_eviction(b"{\"return\": {}, \"id\": 1}\r\n");
}

#[test]
fn an_unreadable_late_reply_frees_its_slot_even_after_its_tombstone_was_evicted() {
    let mut big = br#"{"id": 1, "return": ""#.to_vec();
    big.extend_from_slice(&[b'x'; 2000]);
    big.extend_from_slice(b"\"}\r\n");
    late_reply_after_eviction(&big);
}

#[test]
fn file_descriptor_requests_start_their_own_write() {
    let (t0, mut c) = ready(Config::default());
    c.send(t0, Command::new("a")).unwrap();
    let fd = c
        .send(
            t0,
            Command::new("getfd")
                .raw_arguments(r#"{"fdname":"f"}"#)
                .unwrap()
                .with_fds(),
        )
        .unwrap();
    assert_eq!(c.poll_fds(), None);
    let first = c.poll_transmit().unwrap().to_vec();
    assert_eq!(first, br#"{"execute":"a","id":1}"#);
    c.handle_transmitted(t0, first.len());
    assert_eq!(c.poll_fds(), Some(fd));
    assert_eq!(
        c.poll_transmit().unwrap(),
        br#"{"execute":"getfd","arguments":{"fdname":"f"},"id":2}"#
    );
    c.handle_transmitted(t0, 1);
    assert_eq!(c.poll_fds(), None, "fds go with the first byte only");
}

#[test]
fn arguments_with_more_tokens_than_qemu_reads_as_one_request_are_refused() {
    // Past 2,097,152 tokens QEMU drops what it has and parses the rest as new input, so the
    // tail of one request could run as a command of its own.
    let (t0, mut c) = ready(Config::default());
    let smuggle = |zeros: usize| {
        let list = vec!["0"; zeros].join(",");
        Command::new("x")
            .raw_arguments(format!(
                r#"{{"a":[{list}],"b":{{"execute":"quit","id":5}}}}"#
            ))
            .unwrap()
    };
    // {"a":[ and ],"b":{"execute":"quit","id":5}} are 18 tokens; each 0 and comma 2 more.
    assert_eq!(
        c.send(t0, smuggle(1_050_000)),
        Err(LocalError::RequestTooManyTokens {
            tokens: 2_100_017,
            max: 1 << 20
        })
    );
    assert_eq!(tx(&mut c), "");
    let mut few = Config::default();
    few.max_request_tokens = 11;
    let (t0, mut c) = ready(few);
    // { "a" : [ 1 , 2 ] , "s" : "x y, [z]" } : 13 tokens; {"a":[12.5e3,true]} : 9.
    assert_eq!(
        c.send(
            t0,
            Command::new("x")
                .raw_arguments(r#"{"a": [1, 2], "s": "x y, [z]"}"#)
                .unwrap()
        ),
        Err(LocalError::RequestTooManyTokens {
            tokens: 13,
            max: 11
        })
    );
    c.send(
        t0,
        Command::new("x")
            .raw_arguments(r#"{"a":[12.5e3,true]}"#)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        tx(&mut c),
        r#"{"execute":"x","arguments":{"a":[12.5e3,true]},"id":1}"#
    );
}

#[test]
fn requests_over_the_local_limits_are_refused_before_anything_is_written() {
    let (t0, mut c) = ready(Config::default());
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(600), "]".repeat(600));
    assert_eq!(
        c.send(t0, Command::new("x").raw_arguments(deep).unwrap()),
        Err(LocalError::RequestTooDeep { max: 512 })
    );
    assert_eq!(
        Command::new("x").raw_arguments("[1]"),
        Err(LocalError::InvalidArguments(
            "arguments must be a JSON object, got [1]".into()
        ))
    );
    assert_eq!(
        Command::new("x").raw_arguments("{"),
        Err(LocalError::InvalidArguments(
            "EOF while parsing an object at line 1 column 1".into()
        ))
    );
    assert_eq!(
        Command::new("x").arguments(&5),
        Err(LocalError::InvalidArguments(
            "arguments must be a JSON object, got 5".into()
        ))
    );
    let mut small = Config::default();
    small.max_request_size = 64;
    let (t0, mut c) = ready(small.clone());
    let big = || {
        Command::new("x")
            .arguments(&serde_json::json!({"s": "y".repeat(100)}))
            .unwrap()
    };
    assert!(matches!(
        c.send(t0, big()),
        Err(LocalError::RequestTooLarge { max: 64, .. })
    ));
    assert_eq!(tx(&mut c), "");
    // Refused with other bytes waiting to go: they go unchanged, and no id was used up.
    c.send(t0, Command::new("a")).unwrap();
    assert_eq!(
        c.send(t0, big()),
        Err(LocalError::RequestTooLarge { size: 143, max: 64 })
    );
    c.send(t0, Command::new("b")).unwrap();
    assert_eq!(
        tx(&mut c),
        r#"{"execute":"a","id":1}{"execute":"b","id":2}"#
    );
    // The same for a request that would have waited in the queue (before the greeting).
    let t0 = Instant::now();
    let mut c = Connection::new(t0, small);
    assert_eq!(
        c.send(t0, big()),
        Err(LocalError::RequestTooLarge { size: 143, max: 64 })
    );
    assert_eq!(c.stats().requests_sent, 0);
    let mut tiny = Config::default();
    tiny.max_queued = 1;
    let t0 = Instant::now();
    let mut c = Connection::new(t0, tiny);
    c.send(t0, Command::new("a")).unwrap();
    assert_eq!(
        c.send(t0, Command::new("b")),
        Err(LocalError::QueueFull { max: 1 })
    );
}

#[test]
fn stats_count_bytes_messages_and_drops() {
    let (t0, mut c) = ready(Config::default());
    c.send(t0, Command::new("a")).unwrap();
    let _ = tx(&mut c);
    let input = b"{\"return\": {}, \"id\": 1}\r\n{\"event\": \"X\", \"timestamp\": {\"seconds\": 0, \"microseconds\": 0}}\r\nxx\n";
    c.handle_input(t0, input);
    let s = c.stats();
    assert_eq!(
        s.bytes_sent as usize,
        NEGOTIATE_OOB.len() + r#"{"execute":"a","id":1}"#.len()
    );
    assert_eq!(
        s.bytes_received as usize,
        GREETING.len() + OK0.len() + input.len()
    );
    assert_eq!(
        (
            s.messages_received,
            s.replies,
            s.events,
            s.anomalies,
            s.requests_sent
        ),
        (4, 1, 1, 1, 2)
    );
}

mod qga {
    use super::*;

    const SYNC: &str = "\u{FFFD}{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4242}}";

    fn synced() -> (Instant, Connection) {
        synced_with(Config::qga(4242))
    }

    /// [`synced`] with `config` (whose sync seed must be 4242).
    fn synced_with(config: Config) -> (Instant, Connection) {
        let t0 = Instant::now();
        let mut c = Connection::new(t0, config);
        assert_eq!(c.state(), State::Syncing);
        assert_eq!(tx_at(&mut c, t0), SYNC);
        c.handle_input(t0, b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\n\xff{\"return\": 4242}\n");
        assert_eq!(outs(&mut c), vec![Output::Ready(ready_caps(&[]))]);
        (t0, c)
    }

    #[test]
    fn sync_discards_stale_input_up_to_the_delimiter() {
        let t0 = Instant::now();
        let mut c = Connection::new(t0, Config::qga(7));
        let id = c.send(t0, Command::new("guest-ping")).unwrap();
        assert_eq!(tx(&mut c), SYNC.replace("4242", "7"));
        // A previous client's half reply, a stale complete reply, then our marker and reply.
        c.handle_input(t0, b"{\"return\": {}, \"id\": 1}\n{\"return\": {\"half");
        c.handle_input(t0, b"\xff{\"return\": 6}\n{\"return\": 7}\n");
        assert_eq!(outs(&mut c), vec![Output::Ready(ready_caps(&[]))]);
        assert_eq!(tx(&mut c), r#"{"execute":"guest-ping","id":1}"#);
        c.handle_input(t0, b"{\"return\": {}, \"id\": 1}\n");
        assert_eq!(outs(&mut c), vec![replied(id, "{}")]);
        assert_eq!(c.stats().unknown_replies, 2);
    }

    #[test]
    fn an_agent_that_refuses_the_sync_ends_the_handshake_with_its_error() {
        // qemu-ga 10.0.2 started with --block-rpcs=guest-sync-delimited answers the 0xFF and
        // the sync with these two id-less errors (and never sends a 0xFF).
        let t0 = Instant::now();
        let mut c = Connection::new(t0, Config::qga(4242));
        let id = c.send(t0, Command::new("guest-ping")).unwrap();
        assert_eq!(tx(&mut c), SYNC);
        c.handle_input(
            t0,
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n"
                .as_bytes(),
        );
        assert!(outs(&mut c).is_empty());
        c.handle_input(t0, b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-sync-delimited has been disabled: the command is not allowed\"}}\n");
        let refused = RemoteError::SyncRefused(CommandError::new(
            ErrorClass::CommandNotFound,
            "Command guest-sync-delimited has been disabled: the command is not allowed",
        ));
        assert_eq!(
            refused.to_string(),
            "the guest agent refused guest-sync-delimited: CommandNotFound: Command \
             guest-sync-delimited has been disabled: the command is not allowed"
        );
        assert_eq!(
            outs(&mut c),
            vec![
                Output::Completed {
                    id,
                    outcome: Outcome::NotSent(Failure::HandshakeFailed)
                },
                Output::Closed(CloseReason::Remote(refused))
            ]
        );
    }

    #[test]
    fn id_less_errors_that_do_not_name_the_sync_leave_it_waiting() {
        // A previous client's error, or one for a later resync: only counted.
        let t0 = Instant::now();
        let mut c = Connection::new(t0, Config::qga(4242));
        assert_eq!(tx(&mut c), SYNC);
        c.handle_input(t0, b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command guest-nope has not been found\"}}\n");
        assert!(outs(&mut c).is_empty());
        assert_eq!(c.state(), State::Syncing);
        c.handle_input(t0, b"\xff{\"return\": 4242}\n");
        assert_eq!(outs(&mut c), vec![Output::Ready(ready_caps(&[]))]);
        assert_eq!(c.stats().unknown_replies, 1);
    }

    #[test]
    fn sync_ids_stay_below_two_to_the_63() {
        // The agent refuses ids above i64::MAX ("Invalid parameter type for 'id'").
        let t0 = Instant::now();
        let mut c = Connection::new(t0, Config::qga(u64::MAX));
        assert_eq!(tx(&mut c), SYNC.replace("4242", &i64::MAX.to_string()));
        let mut reply = vec![0xFF];
        reply.extend_from_slice(format!("{{\"return\": {}}}\n", i64::MAX).as_bytes());
        c.handle_input(t0, &reply);
        assert_eq!(outs(&mut c), vec![Output::Ready(ready_caps(&[]))]);
        let mut c = Connection::new(t0, Config::qga(1 << 63 | 5));
        assert_eq!(tx(&mut c), SYNC.replace("4242", "5"));
    }

    #[test]
    fn oob_is_refused_and_no_reply_commands_resolve_when_written() {
        let (t0, mut c) = synced();
        assert_eq!(
            c.send(t0, Command::new("x").oob()),
            Err(LocalError::OobUnsupported)
        );
        let id = c
            .send(t0, Command::new("guest-shutdown").no_reply())
            .unwrap();
        assert!(outs(&mut c).is_empty());
        assert_eq!(tx(&mut c), r#"{"execute":"guest-shutdown","id":1}"#);
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id,
                outcome: Outcome::Sent
            }]
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_no_reply_command_goes_in_turn_behind_waiting_requests() {
        let t0 = Instant::now();
        let mut one = Config::qga(4242);
        one.max_in_flight = 1;
        let mut c = Connection::new(t0, one);
        assert_eq!(tx(&mut c), SYNC);
        c.handle_input(t0, b"\xff{\"return\": 4242}\n");
        assert_eq!(outs(&mut c), vec![Output::Ready(ready_caps(&[]))]);
        let a = c.send(t0, Command::new("guest-fsfreeze-thaw")).unwrap();
        let b = c.send(t0, Command::new("guest-file-flush")).unwrap();
        let off = c
            .send(t0, Command::new("guest-shutdown").no_reply())
            .unwrap();
        // Only `a` has a slot; the shutdown waits behind `b` instead of overtaking it.
        assert_eq!(tx(&mut c), r#"{"execute":"guest-fsfreeze-thaw","id":1}"#);
        assert!(outs(&mut c).is_empty());
        c.handle_input(t0, b"{\"return\": 0, \"id\": 1}\n");
        assert_eq!(
            tx(&mut c),
            r#"{"execute":"guest-file-flush","id":2}{"execute":"guest-shutdown","id":3}"#
        );
        assert_eq!(
            outs(&mut c),
            vec![
                replied(a, "0"),
                Output::Completed {
                    id: off,
                    outcome: Outcome::Sent
                }
            ]
        );
        c.handle_input(t0, b"{\"return\": {}, \"id\": 2}\n");
        assert_eq!(outs(&mut c), vec![replied(b, "{}")]);
    }

    fn sent(id: RequestId) -> Output {
        Output::Completed {
            id,
            outcome: Outcome::Sent,
        }
    }

    #[test]
    fn a_command_that_answers_only_on_failure_succeeds_after_the_grace_of_silence() {
        let (t0, mut c) = synced();
        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        assert_eq!(tx_at(&mut c, t0), r#"{"execute":"guest-shutdown","id":1}"#);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        c.handle_timeout(t0 + Duration::from_millis(1999));
        assert!(outs(&mut c).is_empty());
        c.handle_timeout(t0 + Duration::from_secs(2));
        assert_eq!(outs(&mut c), vec![sent(off)]);
        assert_eq!(c.in_flight(), 0);
        // No resync followed, and an error that comes later is only counted.
        assert_eq!(tx(&mut c), "");
        c.handle_input(
            t0 + Duration::from_secs(3),
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"late\"}, \"id\": 1}\n",
        );
        assert!(outs(&mut c).is_empty());
        assert_eq!(c.stats().late_replies, 1);
    }

    #[test]
    fn a_command_that_answers_only_on_failure_reports_its_failure() {
        let (t0, mut c) = synced();
        let off = c.send(t0, Command::new("guest-suspend-ram")).unwrap();
        let _ = tx(&mut c);
        c.handle_input(t0 + Duration::from_secs(1), b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"the host's firmware does not support S3\"}, \"id\": 1}\n");
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id: off,
                outcome: Outcome::Replied(Err(CommandError::new(
                    ErrorClass::GenericError,
                    "the host's firmware does not support S3"
                )))
            }]
        );
    }

    #[test]
    fn a_later_reply_or_the_peer_leaving_means_it_succeeded() {
        let (t0, mut c) = synced();
        let suspend = c.send(t0, Command::new("guest-suspend-disk")).unwrap();
        let ping = c.send(t0, Command::new("guest-ping")).unwrap();
        let _ = tx(&mut c);
        // Replies come in order: the ping's answer says the suspend ran without one.
        c.handle_input(t0, b"{\"return\": {}, \"id\": 2}\n");
        assert_eq!(outs(&mut c), vec![sent(suspend), replied(ping, "{}")]);

        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        let _ = tx(&mut c);
        c.handle_eof(t0);
        assert_eq!(
            outs(&mut c),
            vec![sent(off), Output::Closed(CloseReason::PeerClosed)]
        );
    }

    #[test]
    fn the_grace_counts_from_the_write_and_explicit_marks_are_kept() {
        // Behind a slow freeze on a one-slot session, the shutdown is written only at 5 s.
        let (t0, mut c) = synced_with(Config::qga(4242).max_in_flight(1));
        let freeze = c.send(t0, Command::new("guest-fsfreeze-freeze")).unwrap();
        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        assert_eq!(
            tx_at(&mut c, t0),
            r#"{"execute":"guest-fsfreeze-freeze","id":1}"#
        );
        let t5 = t0 + Duration::from_secs(5);
        c.handle_input(t5, b"{\"return\": 2, \"id\": 1}\n");
        assert_eq!(outs(&mut c), vec![replied(freeze, "2")]);
        assert_eq!(tx_at(&mut c, t5), r#"{"execute":"guest-shutdown","id":2}"#);
        assert_eq!(c.poll_timeout(), Some(t5 + Duration::from_secs(2)));
        c.handle_timeout(t5 + Duration::from_secs(2));
        assert_eq!(outs(&mut c), vec![sent(off)]);

        // no_reply keeps resolving on the write; QMP mode never guesses.
        let (t0, mut c) = synced();
        let off = c
            .send(t0, Command::new("guest-shutdown").no_reply())
            .unwrap();
        let _ = tx(&mut c);
        assert_eq!(outs(&mut c), vec![sent(off)]);
        let (t0, mut c) = ready(Config::default());
        c.send(t0, Command::new("guest-shutdown")).unwrap();
        let _ = tx(&mut c);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn its_own_shorter_timeout_still_fails_it_as_unanswered() {
        // Silence for 0.5 s is not the 2 s grace: the caller's timeout wins, with no
        // claim that it worked.
        let (t0, mut c) = synced();
        let half = Duration::from_millis(500);
        let off = c
            .send(t0, Command::new("guest-shutdown").timeout(Some(half)))
            .unwrap();
        let _ = tx_at(&mut c, t0);
        assert_eq!(c.poll_timeout(), Some(t0 + half));
        c.handle_timeout(t0 + half);
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id: off,
                outcome: Outcome::Unknown(Failure::Timeout)
            }]
        );
        // A timeout longer than the grace leaves the grace in charge.
        let (t0, mut c) = synced();
        let long = c
            .send(
                t0,
                Command::new("guest-suspend-ram").timeout(Some(Duration::from_secs(60))),
            )
            .unwrap();
        let t1 = t0 + Duration::from_secs(1);
        let _ = tx_at(&mut c, t1);
        c.handle_timeout(t1 + Duration::from_secs(2));
        let out = outs(&mut c);
        assert_eq!(out.last(), Some(&sent(long)), "{out:?}");
    }

    #[test]
    fn a_resync_or_a_transport_failure_after_it_was_written() {
        // A resync answered in order: the quiet command written before it did not fail.
        let (t0, mut c, info) = synced_with_a_request_out();
        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        let _ = tx_at(&mut c, t0);
        c.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id: info,
                outcome: Outcome::Unknown(Failure::Timeout)
            }]
        );
        assert_eq!(tx_at(&mut c, t0), SYNC.replace("4242", "4243"));
        c.handle_input(t0, b"\xff{\"return\": 4243}\n");
        assert_eq!(outs(&mut c), vec![sent(off)]);

        // This side failing says nothing about the command: unknown.
        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        let _ = tx_at(&mut c, t0);
        c.handle_transport_error(t0);
        assert_eq!(
            outs(&mut c),
            vec![
                Output::Completed {
                    id: off,
                    outcome: Outcome::Unknown(Failure::TransportFailed)
                },
                Output::Closed(CloseReason::TransportFailed)
            ]
        );
    }

    #[test]
    fn a_parse_error_that_quotes_the_sync_does_not_end_the_handshake() {
        // A previous client cut off inside "guest-sync-delimited": our 0xFF makes the agent
        // report that token, naming the command, as a GenericError.
        let t0 = Instant::now();
        let mut c = Connection::new(t0, Config::qga(4242));
        let _ = tx_at(&mut c, t0);
        c.handle_input(t0, b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\\"guest-sync-delimited'\"}}\n");
        assert!(outs(&mut c).is_empty());
        assert_eq!(c.state(), State::Syncing);
    }

    #[test]
    fn the_grace_starts_when_the_requests_before_it_are_answered() {
        // The agent runs requests in turn: written behind a slow freeze, the shutdown's
        // silence counts only from the freeze's reply.
        let (t0, mut c) = synced();
        let freeze = c.send(t0, Command::new("guest-fsfreeze-freeze")).unwrap();
        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        let _ = tx_at(&mut c, t0);
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(t0 + Duration::from_secs(3));
        assert!(outs(&mut c).is_empty());
        let t5 = t0 + Duration::from_secs(5);
        c.handle_input(t5, b"{\"return\": 2, \"id\": 1}\n");
        assert_eq!(outs(&mut c), vec![replied(freeze, "2")]);
        assert_eq!(c.poll_timeout(), Some(t5 + Duration::from_secs(2)));
        c.handle_timeout(t5 + Duration::from_secs(2));
        assert_eq!(outs(&mut c), vec![sent(off)]);
    }

    #[test]
    fn one_that_times_out_or_is_abandoned_gives_its_slot_back() {
        // It may never answer, so no later reply would free its slot.
        let (t0, mut c) = synced_with(Config::qga(4242).max_in_flight(1));
        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        let ping = c.send(t0, Command::new("guest-ping")).unwrap();
        assert_eq!(tx_at(&mut c, t0), r#"{"execute":"guest-shutdown","id":1}"#);
        assert!(c.abandon(off));
        assert_eq!(tx_at(&mut c, t0), r#"{"execute":"guest-ping","id":2}"#);
        c.handle_input(t0, b"{\"return\": {}, \"id\": 2}\n");
        assert_eq!(outs(&mut c), vec![replied(ping, "{}")]);

        // On QMP, marked by hand, with its own shorter timeout.
        let (t0, mut c) = ready(Config::default().max_in_flight(1));
        let half = Duration::from_millis(500);
        let quiet = Command::new("x")
            .reply_optional(Duration::from_secs(2))
            .timeout(Some(half));
        let x = c.send(t0, quiet).unwrap();
        let y = c.send(t0, Command::new("y")).unwrap();
        assert_eq!(tx_at(&mut c, t0), r#"{"execute":"x","id":1}"#);
        c.handle_timeout(t0 + half);
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id: x,
                outcome: Outcome::Unknown(Failure::Timeout)
            }]
        );
        assert_eq!(tx_at(&mut c, t0 + half), r#"{"execute":"y","id":2}"#);
        c.handle_input(t0 + half, b"{\"return\": 1, \"id\": 2}\r\n");
        assert_eq!(outs(&mut c), vec![replied(y, "1")]);
    }

    #[test]
    fn an_unreadable_answer_during_a_resync_is_still_its_answer() {
        let (t0, mut c) = synced_with(Config::qga(4242).max_message_size(200));
        let off = c.send(t0, Command::new("guest-shutdown")).unwrap();
        let _ = tx_at(&mut c, t0);
        c.resync(t0);
        assert_eq!(tx_at(&mut c, t0), SYNC.replace("4242", "4243"));
        // Its error, too large to read, comes before the sync's marker.
        let big = format!(
            "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"{}\"}}, \"id\": 1}}\n",
            "x".repeat(300)
        );
        c.handle_input(t0, big.as_bytes());
        let out = outs(&mut c);
        assert!(
            out.contains(&Output::Completed {
                id: off,
                outcome: Outcome::Unknown(Failure::ReplyLost)
            }),
            "{out:?}"
        );
        c.handle_input(t0, b"\xff{\"return\": 4243}\n");
        assert!(
            !outs(&mut c)
                .iter()
                .any(|o| matches!(o, Output::Completed { .. }))
        );
    }

    /// A synced agent with a `guest-info` written, which times out after 1 s.
    fn synced_with_a_request_out() -> (Instant, Connection, RequestId) {
        let (t0, mut c) = synced();
        let id = c
            .send(
                t0,
                Command::new("guest-info").timeout(Some(Duration::from_secs(1))),
            )
            .unwrap();
        assert_eq!(tx(&mut c), r#"{"execute":"guest-info","id":1}"#);
        (t0, c, id)
    }

    #[test]
    fn a_timeout_triggers_a_resync_and_commands_wait_for_it() {
        let (t0, mut c, id) = synced_with_a_request_out();
        c.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id,
                outcome: Outcome::Unknown(Failure::Timeout)
            }]
        );
        assert_eq!(tx(&mut c), SYNC.replace("4242", "4243"));
        let next = c.send(t0, Command::new("guest-ping")).unwrap();
        assert_eq!(tx(&mut c), "", "commands wait for the sync");
        c.handle_input(
            t0,
            b"{\"return\": {\"late\": 1}, \"id\": 1}\n\xff{\"return\": 4243}\n",
        );
        assert_eq!(tx(&mut c), r#"{"execute":"guest-ping","id":2}"#);
        c.handle_input(t0, b"{\"return\": {}, \"id\": 2}\n");
        assert_eq!(outs(&mut c), vec![replied(next, "{}")]);
        assert_eq!(c.stats().late_replies, 1);
    }

    #[test]
    fn an_agent_that_never_reads_keeps_one_sync_waiting_not_one_per_timeout() {
        let (t0, mut c, id) = synced_with_a_request_out();
        // The agent stops reading: nothing more is written while syncs time out again and
        // again (the handshake timeout, 10 s by default).
        let mut now = t0 + Duration::from_secs(1);
        for _ in 0..5 {
            c.handle_timeout(now);
            now = c.poll_timeout().unwrap();
        }
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id,
                outcome: Outcome::Unknown(Failure::Timeout)
            }]
        );
        assert_eq!(tx(&mut c), SYNC.replace("4242", "4247"));
    }

    #[test]
    fn explicit_resync_after_a_reconnect() {
        let (t0, mut c) = synced();
        c.resync(t0);
        assert_eq!(tx(&mut c), SYNC.replace("4242", "4243"));
        c.handle_input(t0, b"garbage from before\xff{\"return\": 4243}\n");
        assert!(outs(&mut c).is_empty(), "already ready: no second Ready");
        assert_eq!(c.state(), State::Ready);
    }

    #[test]
    fn an_agent_that_lost_a_request_does_not_hold_its_slot_after_the_sync() {
        let t0 = Instant::now();
        let mut c = Connection::new(
            t0,
            Config::qga(4242)
                .max_in_flight(1)
                .command_timeout(Some(Duration::from_secs(1))),
        );
        let _ = tx(&mut c);
        c.handle_input(t0, b"\xff{\"return\": 4242}\n");
        let _ = outs(&mut c);
        c.send(t0, Command::new("guest-info")).unwrap();
        assert_eq!(tx(&mut c), r#"{"execute":"guest-info","id":1}"#);
        // No reply (the agent restarted): the timeout resyncs.
        c.handle_timeout(t0 + Duration::from_secs(1));
        let _ = outs(&mut c);
        assert_eq!(tx(&mut c), SYNC.replace("4242", "4243"));
        let t1 = t0 + Duration::from_secs(1);
        let next = c.send(t1, Command::new("guest-ping")).unwrap();
        c.handle_input(t1, b"\xff{\"return\": 4243}\n");
        // The lost request's reply will never come: its slot is free again.
        assert_eq!(c.in_flight(), 1);
        assert_eq!(tx(&mut c), r#"{"execute":"guest-ping","id":2}"#);
        c.handle_input(t1, b"{\"return\": {}, \"id\": 2}\n");
        assert_eq!(outs(&mut c), vec![replied(next, "{}")]);
    }

    #[test]
    fn a_request_written_before_a_sync_and_still_unanswered_is_lost() {
        let (t0, mut c) = synced();
        let id = c.send(t0, Command::new("guest-info")).unwrap();
        let _ = tx(&mut c);
        c.resync(t0);
        assert_eq!(tx(&mut c), SYNC.replace("4242", "4243"));
        c.handle_input(t0, b"\xff{\"return\": 4243}\n");
        assert_eq!(
            outs(&mut c),
            vec![Output::Completed {
                id,
                outcome: Outcome::Unknown(Failure::ReplyLost)
            }]
        );
        assert_eq!((c.pending(), c.in_flight()), (0, 0));
    }

    #[test]
    fn an_unanswered_resync_is_sent_again_after_the_handshake_timeout() {
        let (t0, mut c) = synced();
        c.resync(t0);
        assert_eq!(tx(&mut c), SYNC.replace("4242", "4243"));
        let id = c.send(t0, Command::new("guest-ping")).unwrap();
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        c.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(tx(&mut c), SYNC.replace("4242", "4244"));
        // The first sync's late answer is stale; the second one lets the command out.
        c.handle_input(t0, b"\xff{\"return\": 4243}\n");
        assert_eq!(tx(&mut c), "");
        c.handle_input(t0, b"\xff{\"return\": 4244}\n");
        assert_eq!(tx(&mut c), r#"{"execute":"guest-ping","id":1}"#);
        assert_eq!(c.poll_timeout(), None, "no deadline left behind");
        c.handle_input(t0, b"{\"return\": {}, \"id\": 1}\n");
        assert_eq!(outs(&mut c), vec![replied(id, "{}")]);
    }

    #[test]
    fn a_reply_naming_a_sync_key_completes_nothing() {
        let (t0, mut c) = synced();
        c.resync(t0);
        let _ = tx(&mut c);
        // The sync of 4243 is tracked under a key no user id takes; a peer naming it is not
        // answering any request of ours.
        let key = u64::MAX - 4243;
        let before = c.stats().unknown_replies;
        c.handle_input(t0, format!("{{\"return\": 1, \"id\": {key}}}\n").as_bytes());
        assert!(outs(&mut c).is_empty());
        assert_eq!(c.stats().unknown_replies, before + 1);
    }
}

#[test]
fn a_no_reply_command_leaves_no_deadline_once_written() {
    let (t0, mut c) = ready(Config::default().max_in_flight(1));
    c.send(t0, Command::new("a")).unwrap();
    // In-flight cap full, yet a no-reply command takes no slot: it goes out at once.
    let id = c
        .send(
            t0,
            Command::new("b")
                .no_reply()
                .timeout(Some(Duration::from_secs(5))),
        )
        .unwrap();
    assert_eq!(
        tx(&mut c),
        r#"{"execute":"a","id":1}{"execute":"b","id":2}"#
    );
    assert_eq!(
        outs(&mut c),
        vec![Output::Completed {
            id,
            outcome: Outcome::Sent
        }]
    );
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn abandoning_queued_requests_keeps_the_count_and_the_order() {
    let (t0, mut c) = ready(Config::default().max_in_flight(1).max_queued(1000));
    c.send(t0, Command::new("a")).unwrap();
    let queued: Vec<RequestId> = (0..1000)
        .map(|_| c.send(t0, Command::new("q")).unwrap())
        .collect();
    assert_eq!(
        c.send(t0, Command::new("over")),
        Err(LocalError::QueueFull { max: 1000 })
    );
    // Abandon all but three, scattered.
    for (i, id) in queued.iter().enumerate() {
        if !matches!(i, 10 | 500 | 999) {
            assert!(c.abandon(*id));
        }
    }
    assert_eq!(c.queued(), 3);
    assert_eq!(tx(&mut c), r#"{"execute":"a","id":1}"#);
    // Room again: a new one queues behind the three.
    c.send(t0, Command::new("late")).unwrap();
    let mut order = Vec::new();
    for id in [1, 12, 502, 1001, 1002] {
        c.handle_input(
            t0,
            format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes(),
        );
        order.push(tx(&mut c));
    }
    assert_eq!(
        order,
        [
            r#"{"execute":"q","id":12}"#,
            r#"{"execute":"q","id":502}"#,
            r#"{"execute":"q","id":1001}"#,
            r#"{"execute":"late","id":1002}"#,
            ""
        ]
    );
    assert_eq!((c.queued(), c.pending()), (0, 0));
}

#[test]
fn a_second_greeting_and_a_message_of_no_known_shape_are_anomalies() {
    let (t0, mut c) = ready(Config::default());
    c.handle_input(t0, GREETING.as_bytes());
    c.handle_input(t0, b"{\"foo\": 1}\r\n");
    c.handle_input(t0, b"{\"QMP\": 1}\r\n");
    c.handle_input(t0, b"{\"foo\": 1, \"id\": \"theirs\"}\r\n");
    assert_eq!(
        outs(&mut c),
        [
            unexpected("a second greeting"),
            unexpected(r#"{"foo": 1}"#),
            // With no id, it may have been an event.
            Output::Unreadable,
            // A greeting, or a reply to someone else, was no event.
            unexpected(r#"{"QMP": 1}"#),
            unexpected(r#"{"foo": 1, "id": "theirs"}"#),
        ]
    );
    assert_eq!((c.state(), c.stats().anomalies), (State::Ready, 4));
}

fn unexpected(text: &str) -> Output {
    Output::Anomaly(Anomaly::Unexpected(text.to_owned()))
}

#[test]
fn a_reply_of_no_known_shape_resolves_its_request_and_an_event_of_none_is_a_loss() {
    let (t0, mut c) = ready(Config::default());
    for _ in 0..4 {
        c.send(t0, Command::new("x")).unwrap();
    }
    let _ = tx(&mut c);
    let replies = [
        // A member of the wrong type, with the id last (as QEMU writes it) or first.
        r#"{"error": "no", "id": 1}"#,
        r#"{"id": 2, "return": 1, "timestamp": 3}"#,
        // Neither `return` nor `error`: the id is read wherever it is.
        r#"{"ret": 1, "id": 3, "x": 0}"#,
    ];
    for r in replies {
        c.handle_input(t0, format!("{r}\r\n").as_bytes());
    }
    let events = [
        r#"{"event": 5}"#,
        r#"{"event": "STOP", "timestamp": "now"}"#,
    ];
    for e in events {
        c.handle_input(t0, format!("{e}\n").as_bytes());
    }
    let mut expect = Vec::new();
    for (i, r) in replies.iter().enumerate() {
        expect.extend([unexpected(r), lost(i as u64 + 1)]);
    }
    for e in events {
        expect.extend([unexpected(e), Output::Unreadable]);
    }
    assert_eq!(outs(&mut c), expect);
    // The fourth is still answered normally.
    c.handle_input(t0, b"{\"return\": {}, \"id\": 4}\r\n");
    assert_eq!(outs(&mut c), [ok(4, "{}")]);
    assert_eq!((c.pending(), c.in_flight()), (0, 0));
}

#[test]
fn each_outcome_says_how_far_its_request_got() {
    let error = CommandError::new(ErrorClass::GenericError, "no");
    let cases = [
        (Outcome::Replied(Ok(raw("{}"))), SendStatus::Answered),
        (Outcome::Replied(Err(error)), SendStatus::Answered),
        (Outcome::Sent, SendStatus::Unanswered),
        (Outcome::NotSent(Failure::PeerClosed), SendStatus::NotSent),
        (Outcome::Unknown(Failure::Timeout), SendStatus::Unanswered),
        (Outcome::Unknown(Failure::ReplyLost), SendStatus::Unanswered),
    ];
    for (outcome, status) in cases {
        assert_eq!(outcome.send_status(), status, "{outcome:?}");
    }
}

#[test]
fn each_close_reason_names_the_failure_of_the_requests_it_ends() {
    let cases = [
        (CloseReason::PeerClosed, Failure::PeerClosed),
        (CloseReason::Local, Failure::LocalClose),
        (
            CloseReason::Remote(RemoteError::GreetingTimeout),
            Failure::HandshakeFailed,
        ),
    ];
    for (reason, failure) in cases {
        assert_eq!(reason.failure(), failure, "{reason:?}");
    }
}

fn getfd(name: &str) -> Command {
    Command::new("getfd")
        .raw_arguments(format!(r#"{{"fdname":"{name}"}}"#))
        .unwrap()
        .with_fds()
}

#[test]
fn one_request_with_descriptors_at_a_time_until_it_is_answered() {
    // QEMU keeps only the descriptors of its latest read, and reads ahead of the commands it
    // runs: a second set on the wire before the first command ran would replace the first.
    let (t0, mut c) = ready(Config::default());
    let a = c.send(t0, getfd("a")).unwrap();
    let b = c
        .send(t0, getfd("b").timeout(Some(Duration::from_secs(1))))
        .unwrap();
    let plain = c.send(t0, Command::new("query-status")).unwrap();
    let oob = c.send(t0, getfd("o").oob()).unwrap();
    assert_eq!(c.poll_fds(), Some(a));
    assert_eq!(
        tx(&mut c),
        r#"{"execute":"getfd","arguments":{"fdname":"a"},"id":1}"#,
        "the others wait, in order"
    );
    assert_eq!((c.in_flight(), c.queued()), (1, 3));
    c.handle_input(t0, b"{\"return\": {}, \"id\": 1}\r\n");
    assert_eq!(outs(&mut c), [replied(a, "{}")]);
    assert_eq!(c.poll_fds(), Some(b));
    assert_eq!(
        tx(&mut c),
        concat!(
            r#"{"execute":"getfd","arguments":{"fdname":"b"},"id":2}"#,
            r#"{"execute":"query-status","id":3}"#
        ),
        "`b` goes, and what only waited behind it"
    );
    assert_eq!(c.queued(), 1);

    // `b` times out unanswered: QEMU may still run it, so the next set waits for its late
    // reply (or for a reply to a later in-band request: QEMU answers those in order).
    let t1 = t0 + Duration::from_secs(1);
    c.handle_timeout(t1);
    assert_eq!(
        outs(&mut c),
        [Output::Completed {
            id: b,
            outcome: Outcome::Unknown(Failure::Timeout)
        }]
    );
    assert_eq!(tx(&mut c), "");
    c.handle_input(t1, b"{\"return\": {}, \"id\": 2}\r\n");
    assert_eq!(c.stats().late_replies, 1);
    assert_eq!(c.poll_fds(), Some(oob));
    assert_eq!(
        tx(&mut c),
        r#"{"exec-oob":"getfd","arguments":{"fdname":"o"},"id":4}"#
    );
    c.handle_input(t1, b"{\"return\": {}, \"id\": 3}\r\n");
    assert_eq!(outs(&mut c), [replied(plain, "{}")]);

    // A request with descriptors dropped before any byte went out frees the way at once.
    let (t0, mut c) = ready(Config::default());
    let first = c.send(t0, getfd("a")).unwrap();
    assert!(c.abandon(first));
    let second = c.send(t0, getfd("b")).unwrap();
    assert_eq!(c.poll_fds(), Some(second));
    assert_eq!(
        tx(&mut c),
        r#"{"execute":"getfd","arguments":{"fdname":"b"},"id":2}"#
    );
}

#[test]
fn an_in_flight_cap_of_zero_set_in_the_config_counts_as_one() {
    let mut config = Config::default();
    config.max_in_flight = 0;
    let (t0, mut c) = ready(config);
    c.send(t0, Command::new("a")).unwrap();
    c.send(t0, Command::new("b")).unwrap();
    assert_eq!(tx(&mut c), r#"{"execute":"a","id":1}"#);
    assert_eq!((c.in_flight(), c.queued()), (1, 1));
}

#[test]
fn refused_descriptors_fail_their_request_alone_and_a_transport_error_closes() {
    let (t0, mut c) = ready(Config::default());
    assert!(
        !c.handle_fds_refused(t0),
        "nothing with descriptors is next"
    );
    let a = c.send(t0, getfd("a")).unwrap();
    let next = c.send(t0, Command::new("query-status")).unwrap();
    let b = c.send(t0, getfd("b")).unwrap();
    assert_eq!(c.poll_fds(), Some(a));
    assert!(c.handle_fds_refused(t0));
    assert_eq!(
        outs(&mut c),
        [Output::Completed {
            id: a,
            outcome: Outcome::NotSent(Failure::FdsRefused)
        }]
    );
    // Its bytes are gone and it holds no slot: the others go, `b` with its descriptors.
    assert_eq!(
        tx(&mut c),
        concat!(
            r#"{"execute":"query-status","id":2}"#,
            r#"{"execute":"getfd","arguments":{"fdname":"b"},"id":3}"#
        )
    );
    assert_eq!(c.in_flight(), 2);

    c.handle_transport_error(t0);
    assert_eq!(
        outs(&mut c),
        [
            Output::Completed {
                id: next,
                outcome: Outcome::Unknown(Failure::TransportFailed)
            },
            Output::Completed {
                id: b,
                outcome: Outcome::Unknown(Failure::TransportFailed)
            },
            Output::Closed(CloseReason::TransportFailed),
        ]
    );
    assert_eq!(
        Failure::TransportFailed.to_string(),
        "the connection failed"
    );
}
