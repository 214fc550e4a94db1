//! The fake answers like real qemu-storage-daemon: the same raw requests, sent one at a time,
//! give the same sequence of reply shapes, error classes, descriptions and echoed ids.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qmp_proto::ErrorClass;
use qmp_testkit::fake::{FakeQemu, Response, Script};
use qmp_testkit::launch::Launch;

/// One request and how many replies it draws.
const SCRIPT: &[(&str, usize)] = &[
    (r#"{"execute":"query-version","id":"early"}"#, 1),
    (
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}"#,
        1,
    ),
    (r#"{"execute":"qmp_capabilities","id":1}"#, 1),
    (r#"{"execute":"query-version","id":{"a" :[1, 2]}}"#, 1),
    (r#"{"execute":"query-jobs","id":3}"#, 1),
    (r#"{"execute":"no-such-command","id":4}"#, 1),
    (r#"{"execute":"query-jobs","x":1,"id":5}"#, 1),
    (r#"{"execute":"query-jobs","arguments":[],"id":6}"#, 1),
    (r#"{"execute":7,"id":7}"#, 1),
    (r#"{"id":8}"#, 1),
    (
        r#"{"execute":"query-jobs","exec-oob":"query-jobs","id":9}"#,
        1,
    ),
    (r#"{"exec-oob":"query-version","id":10}"#, 1),
    (r#"[1, 2]"#, 1),
    (
        r#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","bogus":1},"id":12}"#,
        1,
    ),
    (
        r#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0"},"id":13}"#,
        1,
    ),
    (r#"{"execute":"query-jobs","id":-14}"#, 1),
    (r#"{"execute":"query-version"}"#, 1),
    (r#"{"execute":"quit","id":"bye"}"#, 1),
];

/// A reply reduced to what must match: kind, class, description (errors) and the echoed id.
fn shape(reply: &serde_json::Value) -> String {
    let id = reply.get("id").map_or("-".to_owned(), ToString::to_string);
    if let Some(r) = reply.get("return") {
        let kind = match r {
            serde_json::Value::Object(_) => "object",
            serde_json::Value::Array(_) => "array",
            _ => "scalar",
        };
        return format!("return {kind} id={id}");
    }
    if let Some(e) = reply.get("error") {
        return format!("error {} {} id={id}", e["class"], e["desc"]);
    }
    format!("other {reply}")
}

/// Sends each request and collects the shapes of the replies (events are skipped).
fn run(mut stream: UnixStream) -> (String, Vec<String>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = Reader {
        stream: stream.try_clone().unwrap(),
        buf: Vec::new(),
    };
    let greeting = reader.message().expect("greeting");
    let greeting = shape_greeting(&greeting);
    let mut shapes = Vec::new();
    for (request, replies) in SCRIPT {
        stream.write_all(request.as_bytes()).unwrap();
        let mut got = 0;
        while got < *replies {
            let msg = reader.message().expect("a reply");
            if msg.get("event").is_some() {
                continue;
            }
            shapes.push(shape(&msg));
            got += 1;
        }
    }
    // After quit the program closes the connection (EOF, or a reset on some versions).
    assert!(reader.message().is_none(), "nothing after the quit reply");
    (greeting, shapes)
}

fn shape_greeting(g: &serde_json::Value) -> String {
    format!(
        "caps={} version-keys={:?}",
        g["QMP"]["capabilities"],
        g["QMP"]["version"]["qemu"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
    )
}

/// Reads CRLF-terminated messages.
struct Reader {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Reader {
    fn message(&mut self) -> Option<serde_json::Value> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Some(serde_json::from_slice(&line).expect("valid JSON"));
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn fake_script() -> Script {
    Script::new()
        .oob_commands(Vec::<String>::new())
        .on("query-jobs", Response::ok("[]"))
        .on_args(
            "blockdev-add",
            r#"{"bogus":1}"#,
            Response::error(ErrorClass::GenericError, "Parameter 'bogus' is unexpected"),
        )
        .on("blockdev-add", Response::ok("{}"))
}

#[test]
fn fake_and_storage_daemon_answer_alike() {
    let Some(qemu) = Launch::storage_daemon().spawn() else {
        return;
    };
    let (real_greeting, real) = run(UnixStream::connect(qemu.socket_path()).unwrap());
    let fake = FakeQemu::unix(fake_script()).unwrap();
    let (fake_greeting, faked) = run(UnixStream::connect(fake.socket_path().unwrap()).unwrap());
    assert_eq!(fake_greeting, real_greeting);
    assert_eq!(faked, real);
    assert_eq!(real.len(), SCRIPT.len());
    // Spot checks that the comparison is not vacuous.
    assert_eq!(
        real[0],
        "error \"CommandNotFound\" \"Expecting capabilities negotiation with 'qmp_capabilities'\" id=\"early\""
    );
    assert_eq!(real[3], "return object id={\"a\":[1,2]}");
    assert_eq!(real[16], "return object id=-");
}

/// The same for the guest agent: the framing (LF, 0xFF before the sync reply, the id-less
/// error the 0xFF draws) and the dispatcher's answers match qemu-ga byte for byte.
#[test]
fn fake_and_guest_agent_answer_alike() {
    let Some(qga) = Launch::guest_agent().spawn() else {
        return;
    };
    let script: &[&[u8]] = &[
        b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":77}}",
        br#"{"execute":"guest-ping","id":1}"#,
        br#"{"execute":"guest-sync","arguments":{"id":78}}"#,
        br#"{"execute":"qmp_capabilities","id":2}"#,
        br#"{"exec-oob":"guest-ping","id":3}"#,
        br#"{"execute":"guest-ping","x":1,"id":4}"#,
        br#"{"execute":"guest-exec","id":5}"#,
        br#"{"execute":"guest-ping","id":{"nested":[1,"two"]}}"#,
        // A request cut short by a 0xFF: the agent drops it and answers the sync.
        b"{\"execute\":\"guest-ping\",\"arguments\":{\"a\":[1,\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":79}}",
        // 0xFE does the same.
        b"{\"execute\":\"guest-ping\",\"arguments\":{\"a\":[1,\xfe{\"execute\":\"guest-ping\",\"id\":6}",
        br#"{"execute":"guest-ping","id":7}"#,
    ];
    // Replies per request: the 0xFF draws an error before the sync reply.
    let counts = [2, 1, 1, 1, 1, 1, 1, 1, 2, 2, 1];
    let run = |path: &std::path::Path| -> Vec<u8> {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        for (request, n) in script.iter().zip(counts) {
            s.write_all(request).unwrap();
            let mut lines = 0;
            while lines < n {
                let mut b = [0u8; 1];
                assert_eq!(s.read(&mut b).unwrap(), 1);
                all.push(b[0]);
                lines += usize::from(b[0] == b'\n');
            }
        }
        all
    };
    let real = run(qga.socket_path());
    let fake = FakeQemu::unix(Script::qga().on(
        "guest-exec",
        Response::error(
            ErrorClass::CommandNotFound,
            "Command guest-exec has been disabled: the command is not allowed",
        ),
    ))
    .unwrap();
    let faked = run(fake.socket_path().unwrap());
    assert_eq!(
        String::from_utf8_lossy(&faked),
        String::from_utf8_lossy(&real)
    );
    assert_eq!(faked, real);
    assert!(real.starts_with(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n\xff{\"return\": 77}\n"));
}
