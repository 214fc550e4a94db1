//! The recording scenarios, shared by `examples/record.rs` (against real QEMU) and
//! `tests/replay.rs` (against the recorded transcripts).
#![allow(dead_code, unreachable_pub)] // each includer uses a different part

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qmp_proto::{Command, Config, Connection, Event, Outcome, Output, RequestId};
use qmp_testkit::launch::Launch;
use qmp_testkit::transcript::{Header, Recorder, Transcript};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
use serde_json::json;

/// A blocking driver of `qmp_proto::Connection`.
pub(crate) struct Driver {
    /// The program version, when a scenario learns it from a reply (QGA).
    pub(crate) version: Option<String>,
    pub(crate) conn: Connection,
    /// Every command's outcome, in completion order (for the replay's checks).
    pub(crate) completed: Vec<(RequestId, Outcome)>,
    stream: UnixStream,
    done: HashMap<RequestId, Outcome>,
    events: Vec<Event>,
    closed: bool,
    greeting_version: Option<String>,
}

impl Driver {
    pub(crate) fn new(stream: UnixStream, config: Config) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            conn: Connection::new(Instant::now(), config),
            completed: Vec::new(),
            stream,
            done: HashMap::new(),
            events: Vec::new(),
            closed: false,
            greeting_version: None,
            version: None,
        }
    }

    pub(crate) fn flush(&mut self) {
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
            self.conn.handle_transmitted(Instant::now(), n);
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.conn.poll_output() {
            match out {
                Output::Completed { id, outcome } => {
                    self.completed.push((id, outcome.clone()));
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

    pub(crate) fn ready(&mut self) {
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

/// One recorded session.
pub(crate) struct Scenario {
    /// The file stem under `tests/data`.
    pub(crate) name: &'static str,
    /// The program, for the header.
    pub(crate) program: &'static str,
    /// The header note.
    pub(crate) note: &'static str,
    /// How to start the program.
    pub(crate) launch: fn() -> Launch,
    /// QMP or QGA (with the sync seed 1000).
    pub(crate) qga: bool,
    /// The commands; the path is the program's temp dir.
    pub(crate) body: fn(&mut Driver, &Path),
}

impl Scenario {
    /// The client configuration.
    pub(crate) fn config(&self) -> Config {
        if self.qga {
            Config::qga(1_000)
        } else {
            Config::qmp()
        }
    }

    /// Runs the scenario over `stream` (QMP: after the handshake).
    pub(crate) fn run(&self, stream: UnixStream, dir: &Path) -> Driver {
        let mut d = Driver::new(stream, self.config());
        if !self.qga {
            d.ready();
        }
        (self.body)(&mut d, dir);
        d
    }

    /// Records the scenario against the real program.
    pub(crate) fn record(&self) -> Transcript {
        let qemu = (self.launch)().spawn().expect("QEMU is required to record");
        let (rec, stream) = Recorder::connect(qemu.socket_path()).unwrap();
        let d = self.run(stream, qemu.dir());
        let version = d
            .version
            .clone()
            .or_else(|| d.greeting_version.clone())
            .unwrap_or_default();
        let version = version.split(' ').next().unwrap_or_default().to_owned();
        drop(d);
        rec.finish(Header::new(self.program, &version, self.note))
    }
}

fn qsd_basic(d: &mut Driver, _: &Path) {
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
}

fn qsd_jobs(d: &mut Driver, dir: &Path) {
    let image = dir.join("disk.img");
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
}

fn qsd_pretty(d: &mut Driver, _: &Path) {
    ok(&d.call(cmd("query-version")));
    ok(&d.call(with(
        "blockdev-add",
        &json!({"driver": "null-co", "node-name": "n0"}),
    )));
    ok(&d.call(cmd("query-named-block-nodes")));
    ok(&d.call(cmd("query-jobs")));
    err(&d.call(cmd("no-such-command")));
}

fn system_basic(d: &mut Driver, _: &Path) {
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
}

fn system_oob(d: &mut Driver, _: &Path) {
    ok(&d.call(cmd("query-yank").oob()));
    ok(&d.call(cmd("query-yank")));
    err(&d.call(cmd("query-status").oob()));
    ok(&d.call(cmd("query-status")));
}

fn system_fds(d: &mut Driver, _: &Path) {
    ok(&d.call(with("getfd", &json!({"fdname": "fd0"})).with_fds()));
    err(&d.call(with("getfd", &json!({"fdname": "fd1"}))));
    ok(&d.call(with("closefd", &json!({"fdname": "fd0"}))));
    ok(&d.call(with("add-fd", &json!({"fdset-id": 3, "opaque": "null"})).with_fds()));
    ok(&d.call(cmd("query-fdsets")));
    ok(&d.call(with("remove-fd", &json!({"fdset-id": 3}))));
    ok(&d.call(cmd("query-fdsets")));
}

fn qga_start(d: &mut Driver) {
    ok(&d.call(cmd("guest-ping")));
    let info = ok(&d.call(cmd("guest-info")));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    d.version = info["version"].as_str().map(str::to_owned);
}

fn qga_basic(d: &mut Driver, _: &Path) {
    qga_start(d);
    ok(&d.call(cmd("guest-get-time")));
    err(&d.call(cmd("guest-exec")));
}

fn qga_resync(d: &mut Driver, _: &Path) {
    qga_start(d);
    d.conn.resync(Instant::now());
    d.flush();
    ok(&d.call(cmd("guest-ping")));
    d.conn.resync(Instant::now());
    d.flush();
    ok(&d.call(cmd("guest-get-time")));
}

/// Every scenario, in recording order.
pub(crate) const ALL: [Scenario; 8] = [
    Scenario {
        name: "qsd-basic",
        program: "qemu-storage-daemon",
        note: "greeting, negotiation, queries, unknown command, bad argument, 5 pipelined commands, quit",
        launch: Launch::storage_daemon,
        qga: false,
        body: qsd_basic,
    },
    Scenario {
        name: "qsd-jobs",
        program: "qemu-storage-daemon",
        note: "blockdev-create of a file (job events created..concluded), job-dismiss, blockdev-add of the file",
        launch: Launch::storage_daemon,
        qga: false,
        body: qsd_jobs,
    },
    Scenario {
        name: "qsd-pretty",
        program: "qemu-storage-daemon",
        note: "pretty=on monitor: multi-line CRLF output, empty {} and [] over two lines",
        launch: || Launch::storage_daemon().pretty(),
        qga: false,
        body: qsd_pretty,
    },
    Scenario {
        name: "system-basic",
        program: "qemu-system-x86_64",
        note: "query-status, cont/RESUME, stop/STOP, system_reset/RESET, quit with SHUTDOWN",
        launch: Launch::system,
        qga: false,
        body: system_basic,
    },
    Scenario {
        name: "system-oob",
        program: "qemu-system-x86_64",
        note: "oob negotiated; exec-oob query-yank, in-band query-yank, exec-oob of a non-oob command",
        launch: Launch::system,
        qga: false,
        body: system_oob,
    },
    Scenario {
        name: "system-fds",
        program: "qemu-system-x86_64",
        note: "SCM_RIGHTS: getfd with an fd, getfd without one, closefd, add-fd, query-fdsets, remove-fd",
        launch: Launch::system,
        qga: false,
        body: system_fds,
    },
    Scenario {
        name: "qga-basic",
        program: "qemu-ga",
        note: "guest-sync-delimited (0xFF), guest-ping, guest-info, guest-get-time, a disabled command",
        launch: Launch::guest_agent,
        qga: true,
        body: qga_basic,
    },
    Scenario {
        name: "qga-resync",
        program: "qemu-ga",
        note: "guest-sync-delimited (0xFF), guest-ping, guest-info, then two resyncs each followed by a command",
        launch: Launch::guest_agent,
        qga: true,
        body: qga_resync,
    },
];
