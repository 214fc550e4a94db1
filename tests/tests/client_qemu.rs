//! qmp-client against real QEMU programs: the same scenario list on tokio, smol and async-std.
//!
//! Each scenario is a runtime-neutral async function over a [`Rt`] (how to connect and spawn
//! on one runtime); the `tokio`, `smol` and `async_std` modules run every scenario on their
//! runtime. Each test starts its own QEMU process (skipped with a printed reason when the
//! binary is missing, a failure with `QMP_REQUIRE_QEMU=1`).

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use qmp_client::{Builder, Client, Error, ErrorClass, ErrorKind, EventItem, SendStatus};
use qmp_testkit::launch::{Launch, Qemu};
use qmp_tests::yield_now;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;
/// A client and its driver, not yet spawned.
type Session = (Client, qmp_client::Connection);

/// How one runtime connects and spawns the driver.
struct Rt {
    connect: fn(PathBuf, Builder) -> BoxFut<'static, Result<Session, Error>>,
    connect_tcp: fn(SocketAddr, Builder) -> BoxFut<'static, Result<Session, Error>>,
    /// Handshake over one end of a socketpair.
    from_pair: fn(UnixStream, Builder) -> BoxFut<'static, Result<Session, Error>>,
    /// Connect, retrying until the socket appears (up to 20 s).
    connect_wait: fn(PathBuf, Builder) -> BoxFut<'static, Result<Session, Error>>,
    /// Accept one connection on the listener and handshake.
    accept: fn(UnixListener, Builder) -> BoxFut<'static, Result<Session, Error>>,
    /// Accept one TCP connection on the listener and handshake.
    accept_tcp: fn(std::net::TcpListener, Builder) -> BoxFut<'static, Result<Session, Error>>,
    /// Spawns the driver, detached.
    spawn: fn(qmp_client::Connection),
    /// Spawns the driver and hands back its result.
    driver_result: fn(qmp_client::Connection) -> BoxFut<'static, Result<(), Error>>,
}

impl Rt {
    /// Waits for a session, spawns its driver and hands back the client.
    async fn up(&self, session: BoxFut<'static, Result<Session, Error>>) -> Result<Client, Error> {
        let (client, connection) = session.await?;
        (self.spawn)(connection);
        Ok(client)
    }
}

const T: Option<Duration> = Some(Duration::from_secs(10));

fn qsd() -> Option<Qemu> {
    Launch::storage_daemon().spawn()
}

#[derive(Debug, Deserialize)]
struct Version {
    qemu: Triple,
}

#[derive(Debug, Deserialize)]
struct Triple {
    major: u32,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Status {
    status: String,
    running: bool,
}

async fn handshake_typed_raw_and_errors(rt: &Rt) {
    let Some(q) = qsd() else { return };
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    assert_eq!(c.greeting().unwrap().version.qemu.major, 10);
    assert_eq!(c.capabilities(), vec!["oob".to_owned()]);
    let v: Version = c.execute("query-version", &()).await.unwrap();
    assert_eq!(v.qemu.major, 10);
    assert_eq!(
        c.execute_raw("query-block-jobs", &()).await.unwrap().get(),
        "[]"
    );

    let e = c
        .execute::<IgnoredAny, _>("blockdev-del", &json!({"node-name": "nope"}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command);
    assert_eq!(e.send_status(), Some(SendStatus::Answered));
    assert_eq!(e.command(), Some("blockdev-del"));
    let se = e.server_error().unwrap();
    assert_eq!(se.class, ErrorClass::GenericError);
    assert_eq!(se.desc, "Failed to find node with node-name='nope'");

    let e = c.execute_raw("no-such-command", &()).await.unwrap_err();
    assert_eq!(e.server_error().unwrap().class, ErrorClass::CommandNotFound);
    assert_eq!(
        e.server_error().unwrap().desc,
        "The command no-such-command has not been found"
    );
    // The wrong argument type is a server error, the wrong reply type a decode error.
    let e = c
        .execute_raw("blockdev-del", &json!({"node-name": 5}))
        .await
        .unwrap_err();
    assert_eq!(
        e.server_error().unwrap().desc,
        "Invalid parameter type for 'node-name', expected: string"
    );
    let e = c
        .execute::<Version, _>("query-block-jobs", &())
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Decode,
            Some(SendStatus::Answered),
            "query-block-jobs: the reply does not match the expected type: invalid length 0, \
             expected struct Version with 1 element at line 1 column 2"
        )
    );
    assert_eq!(c.pending(), 0);
}

/// 300 commands in flight at once, each with a reply only it can match.
async fn pipelining(rt: &Rt) {
    let Some(q) = qsd() else { return };
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    let calls = (0..300).map(|i| {
        let c = c.clone();
        async move {
            if i % 3 == 0 {
                let v: Version = c.execute("query-version", &()).await.unwrap();
                assert_eq!(v.qemu.major, 10);
            } else {
                let name = format!("node{i}");
                let e = c
                    .execute_raw("blockdev-del", &json!({ "node-name": name }))
                    .await
                    .unwrap_err();
                assert_eq!(
                    e.server_error().unwrap().desc,
                    format!("Failed to find node with node-name='{name}'")
                );
            }
        }
    });
    join_all(calls).await;
    let st = c.stats();
    assert_eq!(st.replies, 300, "{st:?}");
    assert_eq!((st.late_replies, st.unknown_replies), (0, 0));
}

#[derive(Debug, Deserialize)]
struct JobStatus {
    id: String,
    status: String,
}

/// blockdev-create runs a job whose whole life cycle is reported by events.
async fn block_job_events(rt: &Rt) {
    let Some(q) = qsd() else { return };
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    let mut events = c.subscribe("JOB_STATUS_CHANGE");
    let img = q.dir().join("new.img");
    let args =
        json!({"job-id": "j1", "options": {"driver": "file", "filename": img, "size": 1048576}});
    let (_, concluded): (IgnoredAny, _) = c
        .execute_then_wait(
            "blockdev-create",
            &args,
            "JOB_STATUS_CHANGE",
            |e| e.data::<JobStatus>().unwrap().status == "concluded",
            T,
        )
        .await
        .unwrap();
    assert_eq!(concluded.data::<JobStatus>().unwrap().id, "j1");
    let _: IgnoredAny = c
        .execute("job-dismiss", &json!({"id": "j1"}))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("null") {
        match events.recv().await.unwrap() {
            EventItem::Event(ev) => seen.push(ev.data::<JobStatus>().unwrap().status),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1048576);
}

#[derive(Debug, Deserialize, PartialEq)]
struct Job {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

/// A mirror slowed down by `speed` is paused, resumed and cancelled. A step's
/// JOB_STATUS_CHANGE can come before the step's reply or after it; `execute_then_wait` must
/// see it either way. QEMU 10.0.2 reports `created` and `running` while it handles
/// `blockdev-mirror` (checked below) and `paused` before `job-pause`'s reply, but a cancelled
/// job reaches `null` only after `job-cancel`'s reply, in a later main-loop turn.
async fn block_job_pause_resume_cancel(rt: &Rt) {
    let Some(q) = qsd() else { return };
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    for node in ["src", "dst"] {
        let args = json!({"driver": "null-co", "node-name": node, "size": 1u64 << 30});
        let _: IgnoredAny = c.execute("blockdev-add", &args).await.unwrap();
    }
    let mut cancelled = c.subscribe("BLOCK_JOB_CANCELLED");
    let step = async |name: &str, args: Value, status: &str| {
        let (_, ev): (IgnoredAny, _) = c
            .execute_then_wait(
                name,
                &args,
                "JOB_STATUS_CHANGE",
                |e| e.data::<JobStatus>().unwrap().status == status,
                T,
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ev.data::<JobStatus>().unwrap().id, "m1");
    };
    let mirror = json!({"job-id": "m1", "device": "src", "target": "dst", "sync": "full",
        "speed": 1 << 20});
    let mut early = c.subscribe("JOB_STATUS_CHANGE");
    let _: IgnoredAny = c.execute("blockdev-mirror", &mirror).await.unwrap();
    // Both events came before the reply: they were queued when the call returned.
    assert_eq!(early.len(), 2);
    for want in ["created", "running"] {
        match early.recv().await.unwrap() {
            EventItem::Event(ev) => assert_eq!(ev.data::<JobStatus>().unwrap().status, want),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(early);
    step("job-pause", json!({"id": "m1"}), "paused").await;
    let paused = Job {
        id: "m1".into(),
        kind: "mirror".into(),
        status: "paused".into(),
    };
    let jobs: Vec<Job> = c.execute("query-jobs", &()).await.unwrap();
    assert_eq!(jobs, [paused]);
    step("job-resume", json!({"id": "m1"}), "running").await;
    // Cancelled before it was ready: the job ends and is dismissed by itself.
    step("job-cancel", json!({"id": "m1"}), "null").await;
    match cancelled.recv().await.unwrap() {
        EventItem::Event(ev) => {
            let data: Value = ev.data().unwrap();
            assert_eq!(
                (&data["device"], &data["type"], &data["speed"], &data["len"]),
                (
                    &json!("m1"),
                    &json!("mirror"),
                    &json!(1 << 20),
                    &json!(1u64 << 30)
                )
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let jobs: Vec<Job> = c.execute("query-jobs", &()).await.unwrap();
    assert_eq!(jobs, []);
}

async fn tcp_and_pretty(rt: &Rt) {
    let Some(q) = Launch::storage_daemon().tcp().pretty().spawn() else {
        return;
    };
    let c = rt
        .up((rt.connect_tcp)(q.tcp_addr().unwrap(), Builder::new()))
        .await
        .unwrap();
    // QEMU's pretty layout: CRLF line ends, 4-space indents, an empty array over two lines.
    let raw = c.execute_raw("query-block-jobs", &()).await.unwrap();
    assert_eq!(raw.get(), "[\r\n    ]");
    let raw = c.execute_raw("query-version", &()).await.unwrap();
    let g = &c.greeting().unwrap().version;
    assert_eq!(
        raw.get(),
        format!(
            "{{\r\n        \"qemu\": {{\r\n            \"micro\": {},\r\n            \
             \"minor\": {},\r\n            \"major\": {}\r\n        }},\r\n        \
             \"package\": {}\r\n    }}",
            g.qemu.micro,
            g.qemu.minor,
            g.qemu.major,
            Value::from(g.package.as_str())
        )
    );
    let v: Version = raw.deserialize().unwrap();
    assert_eq!(v.qemu.major, 10);
    let e = c
        .execute_raw("blockdev-del", &json!({"node-name": "x"}))
        .await
        .unwrap_err();
    assert_eq!(
        e.server_error().unwrap().desc,
        "Failed to find node with node-name='x'"
    );
    // Events are framed in the pretty stream as well.
    let img = q.dir().join("p.img");
    let args = json!({"job-id": "p", "options": {"driver": "file", "filename": img, "size": 4096}});
    let (_, ev): (IgnoredAny, _) = c
        .execute_then_wait(
            "blockdev-create",
            &args,
            "JOB_STATUS_CHANGE",
            |e| e.data::<JobStatus>().unwrap().status == "concluded",
            T,
        )
        .await
        .unwrap();
    assert_eq!(ev.data::<JobStatus>().unwrap().id, "p");
    // The unix monitor works too, alongside.
    let c2 = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    let _: Version = c2.execute("query-version", &()).await.unwrap();
}

/// QEMU killed with commands in flight: every call resolves promptly, later calls fail at once,
/// and event streams end with a terminal item.
async fn peer_killed(rt: &Rt) {
    let Some(mut q) = qsd() else { return };
    let (c, conn) = (rt.connect)(q.socket_path().into(), Builder::new())
        .await
        .unwrap();
    let driver = (rt.driver_result)(conn);
    let mut events = c.subscribe(qmp_client::EventFilter::all());
    let calls: Vec<_> = (0..2000)
        .map(|_| {
            let c = c.clone();
            Box::pin(async move { c.execute::<Version, _>("query-version", &()).await })
        })
        .collect();
    // `join` polls the calls first (all 2000 are submitted: 8 on the wire, the rest queued
    // locally), then kills QEMU while the driver works through them on another thread.
    let kill = async {
        std::thread::sleep(Duration::from_millis(20));
        q.kill();
        Instant::now()
    };
    let (results, killed) = futures_util::future::join(join_all(calls), kill).await;
    let took = killed.elapsed();
    let (mut ok, mut unanswered, mut not_sent) = (0, 0, 0);
    for r in results {
        match r {
            Ok(v) => {
                assert_eq!(v.qemu.major, 10);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
                let what = match e.send_status() {
                    Some(SendStatus::NotSent) => {
                        not_sent += 1;
                        "not sent"
                    }
                    Some(SendStatus::Unanswered) => {
                        unanswered += 1;
                        "sent, but no reply came"
                    }
                    other => panic!("{other:?}"),
                };
                // A kill gives EOF or a reset: both read as the peer closing.
                let eof = format!("query-version: the peer closed the connection ({what})");
                assert_eq!(e.to_string(), eof);
            }
        }
    }
    println!(
        "peer killed: {ok} answered, {unanswered} unanswered, {not_sent} not sent, all resolved {took:?} after the kill"
    );
    assert!(not_sent > 0, "{ok} {unanswered} {not_sent}");
    assert!(
        unanswered <= 8,
        "at most the in-flight cap is unanswered: {unanswered}"
    );
    assert!(took < Duration::from_millis(100), "{took:?}");
    assert!(driver.await.is_ok());
    let e = c.execute_raw("query-version", &()).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status()),
        (ErrorKind::Disconnected, Some(SendStatus::NotSent))
    );
    assert_eq!(
        events.recv().await,
        Some(EventItem::Closed(qmp_client::CloseReason::PeerClosed))
    );
    assert_eq!(events.recv().await, None);
}

/// A second client is accepted but never greeted while the first holds the monitor.
async fn second_client_never_greeted(rt: &Rt) {
    let Some(q) = qsd() else { return };
    let _first = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    let start = Instant::now();
    let e = rt
        .up((rt.connect)(
            q.socket_path().into(),
            Builder::new().handshake_timeout(Some(Duration::from_millis(300))),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert_eq!(
        e.to_string(),
        "the server accepted the connection but sent no greeting in time (is another client \
         attached to this monitor, or is it a guest agent?)"
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// Dropping the last client ends the session, even with an event stream left: the driver
/// completes, the connection closes, and QEMU greets the next client at once (a monitor serves
/// one client at a time).
async fn dropping_the_client_frees_the_monitor(rt: &Rt) {
    let Some(q) = qsd() else { return };
    let mut previous = None;
    for round in 0..3 {
        // Greeted only if the previous session (if any) has let the monitor go.
        let (c, connection) = (rt.connect)(q.socket_path().into(), Builder::new())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        if let Some(driver) = previous.take() {
            let result: Result<(), Error> = driver.await;
            result.unwrap();
        }
        let mut events = c.subscribe(qmp_client::EventFilter::all());
        let driver = (rt.driver_result)(connection);
        let jobs = c.execute_raw("query-block-jobs", &()).await.unwrap();
        assert_eq!(jobs.get(), "[]");
        let clone = c.clone();
        drop(c);
        let jobs = clone.execute_raw("query-block-jobs", &()).await.unwrap();
        assert_eq!(jobs.get(), "[]", "a clone keeps the session");
        drop(clone);
        // A stream does not hold the session: it ends.
        assert_eq!(
            events.recv().await,
            Some(EventItem::Closed(qmp_client::CloseReason::Local))
        );
        assert_eq!(events.recv().await, None);
        previous = Some(driver);
    }
    previous.unwrap().await.unwrap();
}

fn system() -> Option<Qemu> {
    Launch::system().spawn()
}

/// Runs `cmd`, waits for the event it causes (subscribed before sending), and checks the run
/// state that follows.
async fn run_state_step(c: &Client, cmd: &str, event: &str, status: &str, running: bool) {
    let (_, ev): (IgnoredAny, _) = c
        .execute_then_wait(cmd, &(), event, |_| true, T)
        .await
        .unwrap();
    assert_eq!((ev.name.as_str(), ev.data), (event, None));
    let st: Status = c.execute("query-status", &()).await.unwrap();
    assert_eq!(
        st,
        Status {
            status: status.into(),
            running
        }
    );
}

async fn vm_stop_cont_reset_quit(rt: &Rt) {
    let Some(mut q) = system() else { return };
    let (c, conn) = (rt.connect)(q.socket_path().into(), Builder::new())
        .await
        .unwrap();
    let driver = (rt.driver_result)(conn);
    let st: Status = c.execute("query-status", &()).await.unwrap();
    assert_eq!(
        st,
        Status {
            status: "prelaunch".into(),
            running: false
        }
    );

    run_state_step(&c, "cont", "RESUME", "running", true).await;
    run_state_step(&c, "stop", "STOP", "paused", false).await;

    // A subscriber that reads nothing while ten run-state events come keeps the last two and
    // says how many it lost; one that keeps up loses none.
    let mut slow = c.subscribe_with_capacity(["STOP", "RESUME"], 2);
    let all = c.subscribe(["STOP", "RESUME"]);
    for _ in 0..5 {
        run_state_step(&c, "cont", "RESUME", "running", true).await;
        run_state_step(&c, "stop", "STOP", "paused", false).await;
    }
    let mut items = Vec::new();
    for _ in 0..3 {
        items.push(match slow.recv().await.unwrap() {
            EventItem::Event(ev) => ev.name,
            EventItem::Lagged(n) => format!("lagged {n}"),
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(items, ["lagged 8", "RESUME", "STOP"]);
    assert_eq!((slow.len(), all.len()), (0, 10));

    let (_, ev): (IgnoredAny, _) = c
        .execute_then_wait("system_reset", &(), "RESET", |_| true, T)
        .await
        .unwrap();
    assert_eq!(
        ev.data::<Value>().unwrap()["reason"],
        "host-qmp-system-reset"
    );
    // A powerdown request is announced even with no guest to act on it.
    let (_, ev): (IgnoredAny, _) = c
        .execute_then_wait("system_powerdown", &(), "POWERDOWN", |_| true, T)
        .await
        .unwrap();
    assert_eq!((ev.name.as_str(), ev.data), ("POWERDOWN", None));

    let mut events = c.subscribe(["SHUTDOWN"]);
    let _: IgnoredAny = c.execute("quit", &()).await.unwrap();
    let ev = events.next_event().await.unwrap();
    assert_eq!(ev.data::<Value>().unwrap()["reason"], "host-qmp-quit");
    assert_eq!(
        events.recv().await,
        Some(EventItem::Closed(qmp_client::CloseReason::PeerClosed))
    );
    assert!(
        driver.await.is_ok(),
        "EOF or reset after quit is a normal close"
    );
    assert!(q.wait_exit(Duration::from_secs(10)));
    let e = c.execute_raw("query-status", &()).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status()),
        (ErrorKind::Disconnected, Some(SendStatus::NotSent))
    );
}

/// USB hot-unplug completes without guest help: `device_del` then `DEVICE_DELETED`.
async fn vm_hotplug_device_deleted(rt: &Rt) {
    let Some(q) = system() else { return };
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    let _: IgnoredAny = c
        .execute(
            "device_add",
            &json!({"driver": "usb-tablet", "id": "tab", "bus": "xhci.0"}),
        )
        .await
        .unwrap();
    let (_, ev): (IgnoredAny, _) = c
        .execute_then_wait(
            "device_del",
            &json!({"id": "tab"}),
            "DEVICE_DELETED",
            |e| e.data::<Value>().unwrap()["device"] == "tab",
            T,
        )
        .await
        .unwrap();
    assert_eq!(
        ev.data::<Value>().unwrap()["path"],
        "/machine/peripheral/tab"
    );
    let e = c
        .execute_raw("device_del", &json!({"id": "tab"}))
        .await
        .unwrap_err();
    let se = e.server_error().unwrap();
    assert_eq!(
        (&se.class, se.desc.as_str()),
        (&ErrorClass::DeviceNotFound, "Device 'tab' not found")
    );
}

#[derive(Debug, Deserialize)]
struct AddFd {
    #[serde(rename = "fdset-id")]
    fdset_id: u64,
    fd: i64,
}

#[derive(Debug, Deserialize)]
struct FdSet {
    #[serde(rename = "fdset-id")]
    fdset_id: u64,
    fds: Vec<FdSetFd>,
}

#[derive(Debug, Deserialize)]
struct FdSetFd {
    fd: i64,
    opaque: Option<String>,
}

fn devnull() -> std::os::fd::OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

async fn vm_fd_passing_oob_and_hmp(rt: &Rt) {
    let Some(q) = system() else { return };
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();

    let _: IgnoredAny = c
        .execute_with_fds("getfd", &json!({"fdname": "f1"}), vec![devnull()])
        .await
        .unwrap();
    let _: IgnoredAny = c
        .execute("closefd", &json!({"fdname": "f1"}))
        .await
        .unwrap();
    let e = c
        .execute_raw("closefd", &json!({"fdname": "f1"}))
        .await
        .unwrap_err();
    assert_eq!(
        e.server_error().unwrap().desc,
        "File descriptor named 'f1' not found"
    );
    // getfd without a descriptor is refused by QEMU.
    let e = c
        .execute_raw("getfd", &json!({"fdname": "f2"}))
        .await
        .unwrap_err();
    assert_eq!(
        e.server_error().unwrap().desc,
        "No file descriptor supplied via SCM_RIGHTS"
    );

    let added: AddFd = c
        .execute_with_fds(
            "add-fd",
            &json!({"fdset-id": 3, "opaque": "mine"}),
            vec![devnull()],
        )
        .await
        .unwrap();
    assert_eq!(added.fdset_id, 3);
    let sets: Vec<FdSet> = c.execute("query-fdsets", &()).await.unwrap();
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].fdset_id, 3);
    assert_eq!(sets[0].fds.len(), 1);
    assert_eq!(sets[0].fds[0].fd, added.fd);
    assert_eq!(sets[0].fds[0].opaque.as_deref(), Some("mine"));

    // Several at once, each with a file of its own. QEMU keeps only the descriptors of its
    // last read, and its I/O thread reads ahead of the commands it runs: each must still get
    // its own file.
    let files: Vec<PathBuf> = (0..4)
        .map(|i| {
            let path = q.dir().join(format!("passed-{i}"));
            std::fs::write(&path, b"").unwrap();
            path
        })
        .collect();
    let adds = files.iter().enumerate().map(|(i, path)| {
        let fd: std::os::fd::OwnedFd = std::fs::File::open(path).unwrap().into();
        let args = json!({"fdset-id": 10 + i, "opaque": format!("file {i}")});
        let c = &c;
        async move {
            c.execute_with_fds::<AddFd, _>("add-fd", &args, vec![fd])
                .await
        }
    });
    let added = join_all(adds).await;
    let mut bound = Vec::new();
    for (i, add) in added.into_iter().enumerate() {
        let add = add.unwrap_or_else(|e| panic!("add-fd {i}: {e}"));
        assert_eq!(add.fdset_id, 10 + i as u64);
        let target = std::fs::read_link(format!("/proc/{}/fd/{}", q.pid(), add.fd)).unwrap();
        bound.push(target);
    }
    assert_eq!(bound, files);

    // The launch has one chardev, the monitor's m0.
    let yank: Vec<Value> = c.exec_oob("query-yank", &()).await.unwrap();
    assert_eq!(yank, [json!({"type": "chardev", "id": "m0"})]);
    // `yank` itself, out of band, on nothing: accepted; on an unknown instance: refused.
    let none: Value = c.exec_oob("yank", &json!({"instances": []})).await.unwrap();
    assert_eq!(none, json!({}));
    let e = c
        .exec_oob::<Value, _>(
            "yank",
            &json!({"instances": [{"type": "chardev", "id": "nope"}]}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "yank: DeviceNotFound: Instance not found");

    let out: String = c
        .execute(
            "human-monitor-command",
            &json!({"command-line": "info status"}),
        )
        .await
        .unwrap();
    assert_eq!(out, "VM status: paused (prelaunch)\r\n");
}

/// QEMU's main loop blocks in `dump-guest-memory` opening a FIFO nobody reads; an in-band
/// `query-status` queues behind it, and an `exec-oob` `query-yank` overtakes both. Reading the
/// FIFO then lets the in-band commands finish, in order.
async fn oob_overtakes_a_blocked_main_loop(rt: &Rt) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Some(q) = system() else { return };
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new()))
        .await
        .unwrap();
    let fifo = q.dir().join("dump.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let order = AtomicUsize::new(0);
    let t = Duration::from_secs(20);
    let dump_args = json!({"paging": false, "protocol": format!("file:{}", fifo.display())});
    let dump = async {
        let r = c
            .execute_timeout::<IgnoredAny, _>("dump-guest-memory", &dump_args, t)
            .await;
        (r.map(|_| ()), order.fetch_add(1, Ordering::SeqCst))
    };
    let status = async {
        let r = c.execute_timeout::<Status, _>("query-status", &(), t).await;
        (r, order.fetch_add(1, Ordering::SeqCst))
    };
    let base = c.stats().requests_sent;
    let oob = async {
        // Sent only once both in-band commands are on the wire, so that it must overtake
        // them; with a timeout, so that a broken oob fails the test (the reader below still
        // unblocks QEMU) instead of hanging it.
        let give_up = Instant::now() + t;
        while c.stats().requests_sent < base + 2 {
            assert!(
                !c.is_closed() && Instant::now() < give_up,
                "the in-band commands never went out"
            );
            yield_now().await;
        }
        let r = c
            .run::<Vec<Value>>(
                qmp_client::Command::new("query-yank")
                    .oob()
                    .timeout(Some(t)),
            )
            .await;
        let rank = order.fetch_add(1, Ordering::SeqCst);
        // Now unblock the main loop: read the dump to the end.
        let path = fifo.clone();
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::open(path).unwrap();
            std::io::copy(&mut f, &mut std::io::sink()).unwrap()
        });
        (r, rank, reader)
    };
    let ((d, d_rank), (st, st_rank), (y, y_rank, reader)) =
        futures_util::future::join3(dump, status, oob).await;
    assert_eq!((y_rank, d_rank, st_rank), (0, 1, 2));
    assert_eq!(y.unwrap(), [json!({"type": "chardev", "id": "m0"})]);
    d.unwrap();
    assert_eq!(st.unwrap().status, "prelaunch");
    assert!(reader.join().unwrap() > 64 << 20);
}

#[derive(Debug, Deserialize)]
struct GuestInfo {
    version: String,
}

async fn guest_agent(rt: &Rt) {
    let Some(q) = Launch::guest_agent().spawn() else {
        return;
    };
    // A previous client left half a request in the agent's parser, which outlives its
    // connection (a plain `guest-sync` would now be swallowed): the 0xFF sync recovers.
    {
        use std::io::Write;
        let mut previous = UnixStream::connect(q.socket_path()).unwrap();
        previous
            .write_all(br#"{"execute":"guest-ping","arguments":{"a":[1,"#)
            .unwrap();
    }
    let c = rt
        .up((rt.connect)(q.socket_path().into(), Builder::new().qga()))
        .await
        .unwrap();
    assert!(c.greeting().is_none());
    let ping = c.execute_raw("guest-ping", &()).await.unwrap();
    assert_eq!(ping.get(), "{}");
    let info: GuestInfo = c.execute("guest-info", &()).await.unwrap();
    assert!(info.version.starts_with("10."), "{info:?}");
    let e = c
        .execute_raw("guest-exec", &json!({"path": "/bin/true"}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command);
    let se = e.server_error().unwrap();
    assert_eq!(
        (&se.class, se.desc.as_str()),
        (
            &ErrorClass::CommandNotFound,
            "Command guest-exec has been disabled: the command is not allowed"
        )
    );
    let e = c
        .exec_oob::<IgnoredAny, _>("guest-ping", &())
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status()),
        (ErrorKind::Unsupported, Some(SendStatus::NotSent))
    );

    // An agent that blocks guest-sync-delimited answers the sync with an error (no 0xFF):
    // the handshake ends with it at once, not at its 10 s deadline.
    let Some(q) = Launch::guest_agent()
        .arg("--block-rpcs=guest-sync-delimited")
        .spawn()
    else {
        return;
    };
    let start = Instant::now();
    let e = (rt.connect)(q.socket_path().into(), Builder::new().qga())
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{e}");
    assert_eq!(
        (e.kind(), e.to_string().as_str()),
        (
            ErrorKind::Handshake,
            "the guest agent refused guest-sync-delimited: CommandNotFound: Command \
             guest-sync-delimited has been disabled: the command is not allowed"
        )
    );
    assert!(matches!(
        e.remote_error(),
        Some(qmp_client::RemoteError::SyncRefused(_))
    ));
}

/// QEMU gets one end of a socketpair as `fd=N`, and dials a socket we listen on
/// (`server=off`): both monitors work like the usual one.
async fn socketpair_and_accept(rt: &Rt) {
    let dir = std::env::temp_dir().join(format!(
        "qmp-accept-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = dir.join("ours.sock");
    let listener = UnixListener::bind(&ours).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (mine, theirs) = UnixStream::pair().unwrap();
    // The child must inherit its end.
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty()).unwrap();
    let fd = theirs.as_raw_fd();
    let Some(q) = Launch::storage_daemon()
        .arg("--chardev")
        .arg(format!("socket,fd={fd},id=mp"))
        .arg("--monitor")
        .arg("chardev=mp")
        .arg("--chardev")
        .arg(format!("socket,path={},server=off,id=md", ours.display()))
        .arg("--monitor")
        .arg("chardev=md")
        .arg("--chardev")
        .arg(format!(
            "socket,host=127.0.0.1,port={port},server=off,id=mt"
        ))
        .arg("--monitor")
        .arg("chardev=mt")
        .spawn()
    else {
        return;
    };
    drop(theirs);
    let pair = rt.up((rt.from_pair)(mine, Builder::new())).await.unwrap();
    let dialed = rt.up((rt.accept)(listener, Builder::new())).await.unwrap();
    let dialed_tcp = rt.up((rt.accept_tcp)(tcp, Builder::new())).await.unwrap();
    for c in [&pair, &dialed, &dialed_tcp] {
        let v: Version = c.execute("query-version", &()).await.unwrap();
        assert_eq!(v.qemu.major, 10);
        let e = c
            .execute_raw("blockdev-del", &json!({"node-name": "x"}))
            .await
            .unwrap_err();
        let se = e.server_error().unwrap();
        assert_eq!(
            (&se.class, se.desc.as_str()),
            (
                &ErrorClass::GenericError,
                "Failed to find node with node-name='x'"
            )
        );
    }
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `connect_unix_wait` called before QEMU has created its socket.
async fn connect_before_the_socket_exists(rt: &Rt) {
    // Checked first: without the program the client would retry for its whole wait.
    if !Launch::storage_daemon().available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "qmp-late-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let late = dir.join("late.sock");
    let path = late.clone();
    let starter = std::thread::spawn(move || {
        // Let the client start retrying first.
        std::thread::sleep(Duration::from_millis(150));
        Launch::storage_daemon()
            .arg("--chardev")
            // `wait=on`, as the launcher does: with `wait=off` a client this quick can meet
            // QEMU's start-up race (see `qmp_testkit::launch`).
            .arg(format!(
                "socket,path={},server=on,wait=on,id=late",
                path.display()
            ))
            .arg("--monitor")
            .arg("chardev=late")
            .spawn()
    });
    assert!(!late.exists());
    let res = rt.up((rt.connect_wait)(late, Builder::new())).await;
    let Some(q) = starter.join().unwrap() else {
        return;
    };
    let c = res.unwrap();
    let v: Version = c.execute("query-version", &()).await.unwrap();
    assert_eq!(v.qemu.major, 10);
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

macro_rules! scenarios {
    ($rt:expr, $block_on:path) => {
        #[test]
        fn handshake_typed_raw_and_errors() {
            $block_on(super::handshake_typed_raw_and_errors(&$rt));
        }
        #[test]
        fn pipelining() {
            $block_on(super::pipelining(&$rt));
        }
        #[test]
        fn block_job_events() {
            $block_on(super::block_job_events(&$rt));
        }
        #[test]
        fn block_job_pause_resume_cancel() {
            $block_on(super::block_job_pause_resume_cancel(&$rt));
        }
        #[test]
        fn tcp_and_pretty() {
            $block_on(super::tcp_and_pretty(&$rt));
        }
        #[test]
        fn peer_killed() {
            $block_on(super::peer_killed(&$rt));
        }
        #[test]
        fn dropping_the_client_frees_the_monitor() {
            $block_on(super::dropping_the_client_frees_the_monitor(&$rt));
        }
        #[test]
        fn second_client_never_greeted() {
            $block_on(super::second_client_never_greeted(&$rt));
        }
        #[test]
        fn vm_stop_cont_reset_quit() {
            $block_on(super::vm_stop_cont_reset_quit(&$rt));
        }
        #[test]
        fn vm_fd_passing_oob_and_hmp() {
            $block_on(super::vm_fd_passing_oob_and_hmp(&$rt));
        }
        #[test]
        fn socketpair_and_accept() {
            $block_on(super::socketpair_and_accept(&$rt));
        }
        #[test]
        fn connect_before_the_socket_exists() {
            $block_on(super::connect_before_the_socket_exists(&$rt));
        }
        #[test]
        fn oob_overtakes_a_blocked_main_loop() {
            $block_on(super::oob_overtakes_a_blocked_main_loop(&$rt));
        }
        #[test]
        fn vm_hotplug_device_deleted() {
            $block_on(super::vm_hotplug_device_deleted(&$rt));
        }
        #[test]
        fn guest_agent() {
            $block_on(super::guest_agent(&$rt));
        }
    };
}

mod tokio_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p, b| Box::pin(qmp_tokio::connect_unix(p, b)),
        connect_tcp: |a, b| Box::pin(qmp_tokio::connect_tcp(a, b)),
        from_pair: |s, b| Box::pin(qmp_tokio::from_unix_stream(s, b)),
        connect_wait: |p, b| Box::pin(qmp_tokio::connect_unix_wait(p, b, Duration::from_secs(20))),
        accept: |l, b| {
            Box::pin(async move {
                l.set_nonblocking(true)?;
                let l = tokio::net::UnixListener::from_std(l)?;
                qmp_tokio::accept(&l, b).await
            })
        },
        accept_tcp: |l, b| {
            Box::pin(async move {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                qmp_tokio::accept_tcp(&l, b).await
            })
        },
        spawn: |conn| drop(qmp_tokio::spawn_connection(conn)),
        driver_result: |conn| {
            let h = qmp_tokio::spawn_connection(conn);
            Box::pin(async move { h.await.unwrap() })
        },
    };

    scenarios!(RT, qmp_tests::tokio_block_on);
}

mod smol_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p, b| Box::pin(qmp_smol::connect_unix(p, b)),
        connect_tcp: |a, b| Box::pin(qmp_smol::connect_tcp(a, b)),
        from_pair: |s, b| Box::pin(qmp_smol::from_unix_stream(s, b)),
        connect_wait: |p, b| Box::pin(qmp_smol::connect_unix_wait(p, b, Duration::from_secs(20))),
        accept: |l, b| {
            Box::pin(async move { qmp_smol::accept(&async_io::Async::new(l)?, b).await })
        },
        accept_tcp: |l, b| Box::pin(async move { qmp_smol::accept_tcp(&l.try_into()?, b).await }),
        spawn: |conn| qmp_smol::spawn_connection(conn).detach(),
        driver_result: |conn| Box::pin(qmp_smol::spawn_connection(conn)),
    };

    scenarios!(RT, smol::block_on);
}

mod async_std_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p, b| Box::pin(qmp_async_std::connect_unix(p, b)),
        connect_tcp: |a, b| Box::pin(qmp_async_std::connect_tcp(a, b)),
        from_pair: |s, b| Box::pin(qmp_async_std::from_unix_stream(s, b)),
        connect_wait: |p, b| {
            Box::pin(qmp_async_std::connect_unix_wait(
                p,
                b,
                Duration::from_secs(20),
            ))
        },
        accept: |l, b| Box::pin(async move { qmp_async_std::accept(&l.into(), b).await }),
        accept_tcp: |l, b| Box::pin(async move { qmp_async_std::accept_tcp(&l.into(), b).await }),
        spawn: |conn| drop(qmp_async_std::spawn_connection(conn)),
        driver_result: |conn| Box::pin(qmp_async_std::spawn_connection(conn)),
    };

    scenarios!(RT, async_std::task::block_on);
}
