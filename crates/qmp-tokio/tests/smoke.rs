//! The tokio adapter over a socketpair with the testkit's fake QEMU: typed commands, fd
//! passing, and the timer on tokio's paused clock.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qmp_testkit::fake::{FakeQemu, Response, Script};
use qmp_tokio::{Builder, ErrorKind, SendStatus};

fn devnull() -> std::os::fd::OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// A file of this test's own, so that counting the descriptors open on it is not disturbed
/// by the tests running beside it.
struct Marker {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Marker {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marker");
        std::fs::File::create(&path).unwrap();
        Self { _dir: dir, path }
    }

    fn open(&self) -> std::os::fd::OwnedFd {
        std::fs::File::open(&self.path).unwrap().into()
    }

    /// How many descriptors of this process are open on the file.
    fn open_count(&self) -> usize {
        descriptors_of(&self.path)
    }
}

/// What descriptor `fd` of this process refers to (`socket:[inode]` for a socket).
fn fd_target(fd: std::os::fd::RawFd) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap()
}

/// How many descriptors of this process refer to `target`.
fn descriptors_of(target: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t == target)
        .count()
}

#[test]
fn a_client_used_outside_the_runtime_can_start_timers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (mine, theirs) = UnixStream::pair().unwrap();
    let _fake = FakeQemu::from_stream(Script::new(), theirs).unwrap();
    let c = rt.block_on(async {
        let (c, conn) = qmp_tokio::from_unix_stream(mine, Builder::new())
            .await
            .unwrap();
        qmp_tokio::spawn_connection(conn);
        c
    });
    // A plain thread with no tokio context: the wait's timeout starts a tokio timer.
    let e = std::thread::spawn(move || {
        futures_executor::block_on(c.wait_event("STOP", |_| true, Some(Duration::from_millis(50))))
    })
    .join()
    .unwrap()
    .unwrap_err();
    assert_eq!(
        (e.kind(), e.to_string().as_str()),
        (ErrorKind::Timeout, "no matching event arrived in time")
    );
}

#[tokio::test]
async fn socketpair_typed_command_and_fd_passing() {
    let (mine, theirs) = UnixStream::pair().unwrap();
    let fake =
        FakeQemu::from_stream(Script::new().on("getfd", Response::ok("{}")), theirs).unwrap();
    let (c, conn) = qmp_tokio::from_unix_stream(mine, Builder::new())
        .await
        .unwrap();
    let driver = qmp_tokio::spawn_connection(conn);
    let v: serde_json::Value = c.execute("query-version", &()).await.unwrap();
    assert_eq!(v["qemu"]["major"], 10);
    let marker = Marker::new();
    let _: serde::de::IgnoredAny = c
        .execute_with_fds(
            "getfd",
            &serde_json::json!({"fdname": "a"}),
            vec![marker.open(), marker.open()],
        )
        .await
        .unwrap();
    // Ours are closed once sent (the fake closes the copies it received).
    assert_eq!(marker.open_count(), 0);
    let reqs = fake.requests();
    let getfd = reqs
        .iter()
        .find(|r| r.name.as_deref() == Some("getfd"))
        .unwrap();
    assert_eq!(getfd.fds, 2);
    assert_eq!(getfd.arguments.as_deref(), Some(r#"{"fdname":"a"}"#));
    // More descriptors than one message can carry: refused before anything is sent, and the
    // session (which a failed sendmsg would have ended) goes on.
    let e = c
        .execute_with_fds::<serde::de::IgnoredAny, _>(
            "getfd",
            &serde_json::json!({"fdname": "b"}),
            (0..254).map(|_| marker.open()).collect(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::InvalidRequest,
            Some(SendStatus::NotSent),
            "getfd: 254 file descriptors in one message; the kernel passes at most 253"
        )
    );
    assert_eq!(marker.open_count(), 0, "the refused descriptors are closed");
    let v: serde_json::Value = c.execute("query-version", &()).await.unwrap();
    assert_eq!(v["qemu"]["major"], 10);
    assert_eq!(fake.requests().len(), reqs.len() + 1);
    c.close().await;
    assert!(driver.await.unwrap().is_ok());
}

#[tokio::test]
async fn command_timeout_runs_on_the_paused_tokio_clock() {
    // An hour-long timeout that the test does not wait for: TokioTimer follows tokio's clock.
    let (mine, theirs) = UnixStream::pair().unwrap();
    let _fake = FakeQemu::from_stream(Script::new().on("hang", Response::none()), theirs).unwrap();
    let builder = Builder::new().command_timeout(Duration::from_secs(3600));
    let (c, conn) = qmp_tokio::from_unix_stream(mine, builder).await.unwrap();
    qmp_tokio::spawn_connection(conn);
    // Paused after the handshake: the fake greets from another thread, which tokio's
    // auto-advance would not wait for. From here, an idle runtime jumps to the next timer.
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let e = c.execute_raw("hang", &()).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status()),
        (ErrorKind::Timeout, Some(SendStatus::Unanswered))
    );
    assert!(start.elapsed() >= Duration::from_secs(3600));
}

#[tokio::test]
async fn a_write_that_blocks_completes_and_fds_still_pass() {
    // 8 MiB of arguments overflow the socket buffer: the transport waits for writability.
    let (mine, theirs) = UnixStream::pair().unwrap();
    let socket = fd_target(std::os::fd::AsRawFd::as_raw_fd(&mine));
    let script = Script::new()
        .on("big", Response::ok("{}"))
        .on("getfd", Response::ok("{}"));
    let fake = FakeQemu::from_stream(script, theirs).unwrap();
    let (c, conn) = qmp_tokio::from_unix_stream(mine, Builder::new())
        .await
        .unwrap();
    let driver = qmp_tokio::spawn_connection(conn);
    let data = "x".repeat(8 << 20);
    for _ in 0..2 {
        let _: serde::de::IgnoredAny = c
            .execute("big", &serde_json::json!({ "data": data }))
            .await
            .unwrap();
        // The duplicate descriptor registered for the wait is gone once the write is done,
        // so the reactor no longer watches writability.
        assert_eq!(descriptors_of(&socket), 1);
    }
    let _: serde::de::IgnoredAny = c
        .execute_with_fds(
            "getfd",
            &serde_json::json!({"fdname": "a"}),
            vec![devnull()],
        )
        .await
        .unwrap();
    let reqs = fake.requests();
    assert_eq!(
        reqs.iter()
            .filter(|r| r.name.as_deref() == Some("big"))
            .count(),
        2
    );
    assert_eq!(reqs.last().unwrap().fds, 1);
    c.close().await;
    assert!(driver.await.unwrap().is_ok());
}

#[tokio::test]
async fn any_tokio_stream_without_fd_passing() {
    let (mine, theirs) = UnixStream::pair().unwrap();
    let _fake = FakeQemu::from_stream(Script::new(), theirs).unwrap();
    mine.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(mine).unwrap();
    let (c, conn) = qmp_tokio::from_stream(stream, Builder::new())
        .await
        .unwrap();
    let driver = qmp_tokio::spawn_connection(conn);
    let v: serde_json::Value = c.execute("query-version", &()).await.unwrap();
    assert_eq!(v["qemu"]["major"], 10);
    let e = c
        .execute_with_fds::<serde::de::IgnoredAny, _>("getfd", &(), vec![devnull()])
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status()),
        (ErrorKind::Unsupported, Some(SendStatus::NotSent))
    );
    c.close().await;
    assert!(driver.await.unwrap().is_ok());
}

/// The crate's example, run as a user would, against a real VM.
#[test]
fn the_status_example_follows_a_real_vm() {
    qmp_testkit::example::check_status_example("tokio_status");
}

#[tokio::test]
async fn a_reply_that_came_with_descriptors_does_not_hide_the_next_one() {
    // A peer may attach descriptors to what it sends (QEMU does not). The kernel ends a read
    // after the bytes they came with; on tokio's edge-triggered reactor, taking that short
    // read for an empty socket would leave the next reply unread until more data came.
    use std::io::{Read, Write};
    let (mine, mut theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        theirs.write_all(
            b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\r\n",
        ).unwrap();
        let mut buf = [0u8; 256];
        let n = theirs.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], br#"{"execute":"qmp_capabilities","id":0}"#);
        theirs
            .write_all(b"{\"return\": {}, \"id\": 0}\r\n")
            .unwrap();
        theirs
    });
    let (c, conn) = qmp_tokio::from_unix_stream(mine, Builder::new())
        .await
        .unwrap();
    let mut theirs = server.join().unwrap();
    let driver = tokio::spawn(conn);
    let calls = [("a", c.clone()), ("b", c.clone())]
        .map(|(name, c)| tokio::spawn(async move { c.execute_raw(name, &()).await }));
    // This runtime has one thread: the driver writes both requests while this task waits,
    // and does not run again until this task waits again.
    let expected = r#"{"execute":"a","id":1}{"execute":"b","id":2}"#;
    let mut wrote = Vec::new();
    for _ in 0..1000 {
        if wrote.len() >= expected.len() {
            break;
        }
        tokio::task::yield_now().await;
        theirs.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        if let Ok(n) = theirs.read(&mut buf) {
            wrote.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(String::from_utf8(wrote).unwrap(), expected);
    theirs.set_nonblocking(false).unwrap();
    let text = "{\"return\": 1, \"id\": 1}\r\n";
    let sent = qmp_testkit::fake::send_with_fds(&theirs, text.as_bytes(), &[devnull().as_fd()]);
    assert_eq!(sent.unwrap(), text.len());
    theirs.write_all(b"{\"return\": 2, \"id\": 2}\r\n").unwrap();
    let mut got = Vec::new();
    for call in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), call).await;
        got.push(r.expect("answered").unwrap().unwrap().get().to_owned());
    }
    assert_eq!(got, ["1", "2"]);
    c.close().await;
    assert!(driver.await.unwrap().is_ok());
}

#[tokio::test]
async fn waiting_for_a_socket_gives_up_at_once_on_errors_that_waiting_cannot_fix() {
    // A path through a regular file can never become a socket: with no time limit, the old
    // loop retried it for ever.
    let path = std::env::current_exe().unwrap().join("qmp.sock");
    let wait = qmp_tokio::connect_unix_wait(&path, Builder::new(), Duration::MAX);
    let e = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("no retries")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let io = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("the io::Error is the source");
    assert_eq!(io.kind(), std::io::ErrorKind::NotADirectory);
}

/// Polls the driver after using up the task's cooperative budget once, when `starve` is set:
/// as when the driver shares a task with other tokio work that took the budget.
struct Starved {
    conn: qmp_tokio::Connection,
    starve: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Future for Starved {
    type Output = Result<(), qmp_tokio::Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.starve.swap(false, std::sync::atomic::Ordering::SeqCst) {
            // Each budget unit is taken by a consume_budget() that completes; the first one
            // that returns Pending found the budget empty (and woke the task).
            loop {
                let mut unit = std::pin::pin!(tokio::task::consume_budget());
                if unit.as_mut().poll(cx).is_pending() {
                    break;
                }
            }
        }
        std::pin::Pin::new(&mut self.conn).poll(cx)
    }
}

#[tokio::test]
async fn a_timeout_armed_while_the_task_has_no_budget_left_still_fires() {
    // tokio's sleep returns Pending without arming its timer when the task's budget is used
    // up; the driver then polls it again only when it is due, which nothing would tell it.
    let (mine, theirs) = UnixStream::pair().unwrap();
    let _fake = FakeQemu::from_stream(Script::new().on("hang", Response::none()), theirs).unwrap();
    let (c, conn) = qmp_tokio::from_unix_stream(mine, Builder::new())
        .await
        .unwrap();
    let starve = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(Starved {
        conn,
        starve: starve.clone(),
    });
    starve.store(true, std::sync::atomic::Ordering::SeqCst);
    let call =
        c.execute_timeout::<serde::de::IgnoredAny, _>("hang", &(), Duration::from_millis(100));
    let e = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the command's 100 ms timeout never fired")
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status()),
        (ErrorKind::Timeout, Some(SendStatus::Unanswered))
    );
    assert!(
        !starve.load(std::sync::atomic::Ordering::SeqCst),
        "the budget was used up"
    );
}
