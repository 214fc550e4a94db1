//! Records the golden transcripts under `tests/data/` from real QEMU programs.
//!
//! ```text
//! cargo run -p qmp-testkit --example record -- [OUT_DIR] [NAME...]
//! ```
//!
//! The client side is `qmp_proto::Connection` itself over a blocking `UnixStream` (through the
//! testkit's [`Recorder`]), so the recorded client bytes are exactly what qmp-proto writes.
//! `OUT_DIR` defaults to the workspace's `tests/data`; without names every scenario is recorded.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use qmp_proto::{Command, Config, Connection, Event, Outcome, Output, RequestId};
use qmp_testkit::launch::{Launch, Qemu};
use qmp_testkit::transcript::{Header, Recorder, Transcript};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
use serde_json::json;

/// A blocking driver of `qmp_proto::Connection`.
struct Driver {
    conn: Connection,
    stream: UnixStream,
    done: HashMap<RequestId, Outcome>,
    events: Vec<Event>,
    closed: bool,
    greeting_version: Option<String>,
}

impl Driver {
    fn new(stream: UnixStream, config: Config) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            conn: Connection::new(Instant::now(), config),
            stream,
            done: HashMap::new(),
            events: Vec::new(),
            closed: false,
            greeting_version: None,
        }
    }

    fn flush(&mut self) {
        while let Some(bytes) = self.conn.poll_transmit() {
            let bytes = bytes.to_vec();
            let n = if self.conn.poll_fds().is_some() {
                // Attach one descriptor (of /dev/null) to the first write of the request.
                let file = File::open("/dev/null").unwrap();
                let fds = [file.as_fd()];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                control.push(SendAncillaryMessage::ScmRights(&fds));
                sendmsg(
                    &self.stream,
                    &[IoSlice::new(&bytes)],
                    &mut control,
                    SendFlags::empty(),
                )
                .unwrap()
            } else {
                match self.stream.write(&bytes) {
                    Ok(n) => n,
                    Err(e) => panic!("write: {e}"),
                }
            };
            self.conn.handle_transmitted(n);
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.conn.poll_output() {
            match out {
                Output::Completed { id, outcome } => {
                    self.done.insert(id, outcome);
                }
                Output::Event(e) => self.events.push(e),
                Output::Greeting(g) => self.greeting_version = Some(g.version.to_string()),
                Output::Closed(_) => self.closed = true,
                _ => {}
            }
        }
    }

    /// Reads once (blocking) and feeds the machine.
    fn read_once(&mut self) {
        let mut buf = [0u8; 65536];
        match self.stream.read(&mut buf) {
            Ok(0) | Err(_) => self.conn.handle_eof(Instant::now()),
            Ok(n) => self.conn.handle_input(Instant::now(), &buf[..n]),
        }
        self.flush();
    }

    fn send(&mut self, cmd: Command) -> RequestId {
        let id = self.conn.send(Instant::now(), cmd).unwrap();
        self.flush();
        id
    }

    fn wait(&mut self, id: RequestId) -> Outcome {
        loop {
            if let Some(o) = self.done.remove(&id) {
                return o;
            }
            assert!(!self.closed, "closed while waiting for {id:?}");
            self.read_once();
        }
    }

    fn call(&mut self, cmd: Command) -> Outcome {
        let id = self.send(cmd);
        self.wait(id)
    }

    fn ready(&mut self) {
        while !self.conn.is_ready() {
            assert!(!self.closed, "closed during the handshake");
            self.read_once();
        }
    }

    fn wait_event(&mut self, name: &str, pred: impl Fn(&Event) -> bool) {
        while !self.events.iter().any(|e| e.name == name && pred(e)) {
            assert!(!self.closed, "closed while waiting for {name}");
            self.read_once();
        }
    }

    fn until_closed(&mut self) {
        while !self.closed {
            self.read_once();
        }
    }
}

fn cmd(name: &str) -> Command {
    Command::new(name)
}

fn with(name: &str, args: &serde_json::Value) -> Command {
    Command::new(name).arguments(args).unwrap()
}

fn ok(o: &Outcome) -> String {
    match o {
        Outcome::Replied(Ok(v)) => v.get().to_owned(),
        other => panic!("expected a return, got {other:?}"),
    }
}

fn err(o: &Outcome) {
    assert!(
        matches!(o, Outcome::Replied(Err(_))),
        "expected an error, got {o:?}"
    );
}

fn start(launch: Launch) -> Qemu {
    launch.spawn().expect("QEMU is required to record")
}

fn qmp(qemu: &Qemu) -> (Recorder, Driver) {
    let (rec, stream) = Recorder::connect(qemu.socket_path()).unwrap();
    let mut d = Driver::new(stream, Config::qmp());
    d.ready();
    (rec, d)
}

fn finish(rec: Recorder, d: Driver, program: &str, note: &str) -> Transcript {
    let version = d
        .greeting_version
        .clone()
        .unwrap_or_default()
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    drop(d);
    rec.finish(Header::new(program, &version, note))
}

fn qsd_basic() -> Transcript {
    let qemu = start(Launch::storage_daemon());
    let (rec, mut d) = qmp(&qemu);
    ok(&d.call(cmd("query-version")));
    ok(&d.call(cmd("query-jobs")));
    ok(&d.call(cmd("query-named-block-nodes")));
    err(&d.call(cmd("no-such-command")));
    err(&d.call(with(
        "blockdev-add",
        &json!({"driver": "null-co", "node-name": "n0", "bogus": 1}),
    )));
    ok(&d.call(with(
        "blockdev-add",
        &json!({"driver": "null-co", "node-name": "n0"}),
    )));
    // Pipelined: five commands written before any reply is read.
    let ids: Vec<_> = [
        cmd("query-version"),
        cmd("query-jobs"),
        cmd("query-block-jobs"),
        with("query-named-block-nodes", &json!({"flat": true})),
        cmd("query-block-exports"),
    ]
    .into_iter()
    .map(|c| d.send(c))
    .collect();
    for id in ids {
        ok(&d.wait(id));
    }
    d.send(cmd("quit"));
    d.until_closed();
    finish(
        rec,
        d,
        "qemu-storage-daemon",
        "greeting, negotiation, queries, unknown command, bad argument, 5 pipelined commands, quit",
    )
}

fn qsd_jobs() -> Transcript {
    let qemu = start(Launch::storage_daemon());
    let image = qemu.dir().join("disk.img");
    let (rec, mut d) = qmp(&qemu);
    let create = with(
        "blockdev-create",
        &json!({"job-id": "j0", "options": {"driver": "file", "filename": image, "size": 1_048_576}}),
    );
    assert_eq!(ok(&d.call(create)), "{}");
    d.wait_event("JOB_STATUS_CHANGE", |e| {
        e.data
            .as_ref()
            .is_some_and(|r| r.get().contains("concluded"))
    });
    ok(&d.call(cmd("query-jobs")));
    ok(&d.call(with("job-dismiss", &json!({"id": "j0"}))));
    d.wait_event("JOB_STATUS_CHANGE", |e| {
        e.data.as_ref().is_some_and(|r| r.get().contains("null"))
    });
    ok(&d.call(with(
        "blockdev-add",
        &json!({"driver": "file", "node-name": "f0", "filename": image}),
    )));
    ok(&d.call(cmd("query-named-block-nodes")));
    err(&d.call(with("job-dismiss", &json!({"id": "j0"}))));
    finish(
        rec,
        d,
        "qemu-storage-daemon",
        "blockdev-create of a file (job events created..concluded), job-dismiss, blockdev-add of the file",
    )
}

fn qsd_pretty() -> Transcript {
    let qemu = start(Launch::storage_daemon().pretty());
    let (rec, mut d) = qmp(&qemu);
    ok(&d.call(cmd("query-version")));
    ok(&d.call(with(
        "blockdev-add",
        &json!({"driver": "null-co", "node-name": "n0"}),
    )));
    ok(&d.call(cmd("query-named-block-nodes")));
    ok(&d.call(cmd("query-jobs")));
    err(&d.call(cmd("no-such-command")));
    finish(
        rec,
        d,
        "qemu-storage-daemon",
        "pretty=on monitor: multi-line CRLF output, empty {} and [] over two lines",
    )
}

fn system_basic() -> Transcript {
    let qemu = start(Launch::system());
    let (rec, mut d) = qmp(&qemu);
    ok(&d.call(cmd("query-status")));
    ok(&d.call(cmd("cont")));
    d.wait_event("RESUME", |_| true);
    ok(&d.call(cmd("query-status")));
    ok(&d.call(cmd("stop")));
    d.wait_event("STOP", |_| true);
    ok(&d.call(cmd("system_reset")));
    d.wait_event("RESET", |_| true);
    ok(&d.call(cmd("query-status")));
    d.send(cmd("quit"));
    d.until_closed();
    finish(
        rec,
        d,
        "qemu-system-x86_64",
        "query-status, cont/RESUME, stop/STOP, system_reset/RESET, quit with SHUTDOWN",
    )
}

fn system_oob() -> Transcript {
    let qemu = start(Launch::system());
    let (rec, mut d) = qmp(&qemu);
    ok(&d.call(cmd("query-yank").oob()));
    ok(&d.call(cmd("query-yank")));
    err(&d.call(cmd("query-status").oob()));
    ok(&d.call(cmd("query-status")));
    finish(
        rec,
        d,
        "qemu-system-x86_64",
        "oob negotiated; exec-oob query-yank, in-band query-yank, exec-oob of a non-oob command",
    )
}

fn system_fds() -> Transcript {
    let qemu = start(Launch::system());
    let (rec, mut d) = qmp(&qemu);
    ok(&d.call(with("getfd", &json!({"fdname": "fd0"})).with_fds()));
    err(&d.call(with("getfd", &json!({"fdname": "fd1"}))));
    ok(&d.call(with("closefd", &json!({"fdname": "fd0"}))));
    ok(&d.call(with("add-fd", &json!({"fdset-id": 3, "opaque": "null"})).with_fds()));
    ok(&d.call(cmd("query-fdsets")));
    ok(&d.call(with("remove-fd", &json!({"fdset-id": 3}))));
    ok(&d.call(cmd("query-fdsets")));
    finish(
        rec,
        d,
        "qemu-system-x86_64",
        "SCM_RIGHTS: getfd with an fd, getfd without one, closefd, add-fd, query-fdsets, remove-fd",
    )
}

fn qga(resync: bool) -> Transcript {
    let qemu = start(Launch::guest_agent());
    let (rec, stream) = Recorder::connect(qemu.socket_path()).unwrap();
    let mut d = Driver::new(stream, Config::qga(1_000));
    ok(&d.call(cmd("guest-ping")));
    let info = ok(&d.call(cmd("guest-info")));
    let version = serde_json::from_str::<serde_json::Value>(&info).unwrap()["version"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let note = if resync {
        d.conn.resync();
        d.flush();
        ok(&d.call(cmd("guest-ping")));
        d.conn.resync();
        d.flush();
        ok(&d.call(cmd("guest-get-time")));
        "guest-sync-delimited (0xFF), guest-ping, guest-info, then two resyncs each followed by a command"
    } else {
        ok(&d.call(cmd("guest-get-time")));
        err(&d.call(cmd("guest-exec")));
        "guest-sync-delimited (0xFF), guest-ping, guest-info, guest-get-time, a disabled command"
    };
    drop(d);
    rec.finish(Header::new("qemu-ga", &version, note))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args.next().map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data"),
        PathBuf::from,
    );
    let names: Vec<String> = args.collect();
    type Scenario = (&'static str, fn() -> Transcript);
    let all: [Scenario; 8] = [
        ("qsd-basic", qsd_basic),
        ("qsd-jobs", qsd_jobs),
        ("qsd-pretty", qsd_pretty),
        ("system-basic", system_basic),
        ("system-oob", system_oob),
        ("system-fds", system_fds),
        ("qga-basic", || qga(false)),
        ("qga-resync", || qga(true)),
    ];
    std::fs::create_dir_all(&out).unwrap();
    for (name, record) in all {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        let t = record();
        let path = out.join(format!("{name}.jsonl"));
        t.save(&path).unwrap();
        println!("{}: {} chunks", path.display(), t.chunks.len());
    }
}
