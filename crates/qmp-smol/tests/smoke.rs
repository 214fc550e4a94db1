//! The smol adapter over a socketpair with the testkit's fake QEMU: typed commands, fd
//! passing, and a command timeout on the async-io timer.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qmp_smol::{Builder, ErrorKind, SendStatus};
use qmp_testkit::fake::{FakeQemu, Response, Script};

fn devnull() -> std::os::fd::OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

#[test]
fn socketpair_typed_command_and_fd_passing() {
    smol::block_on(async {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let script = Script::new().on("getfd", Response::ok("{}"));
        let fake = FakeQemu::from_stream(script, theirs).unwrap();
        let (c, conn) = qmp_smol::from_unix_stream(mine, Builder::new())
            .await
            .unwrap();
        let driver = qmp_smol::spawn_connection(conn);
        let v: serde_json::Value = c.execute("query-version", &()).await.unwrap();
        assert_eq!(v["qemu"]["major"], 10);
        let args = serde_json::json!({"fdname": "a"});
        let _: serde::de::IgnoredAny = c
            .execute_with_fds("getfd", &args, vec![devnull(), devnull()])
            .await
            .unwrap();
        let reqs = fake.requests();
        let getfd = reqs
            .iter()
            .find(|r| r.name.as_deref() == Some("getfd"))
            .unwrap();
        assert_eq!(getfd.fds, 2);
        assert_eq!(getfd.arguments.as_deref(), Some(r#"{"fdname":"a"}"#));
        c.close().await;
        assert!(driver.await.is_ok());
    });
}

#[test]
fn command_timeout_fires() {
    smol::block_on(async {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let _fake =
            FakeQemu::from_stream(Script::new().on("hang", Response::none()), theirs).unwrap();
        let builder = Builder::new().command_timeout(Duration::from_millis(50));
        let (c, conn) = qmp_smol::from_unix_stream(mine, builder).await.unwrap();
        let _driver = qmp_smol::spawn_connection(conn);
        let start = Instant::now();
        let e = c.execute_raw("hang", &()).await.unwrap_err();
        assert_eq!(
            (e.kind(), e.send_status()),
            (ErrorKind::Timeout, Some(SendStatus::Unanswered))
        );
        assert!(start.elapsed() >= Duration::from_millis(50));
    });
}

#[test]
fn a_write_that_blocks_completes_and_fds_still_pass() {
    // 8 MiB of arguments overflow the socket buffer: the transport waits for writability.
    smol::block_on(async {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let script = Script::new()
            .on("big", Response::ok("{}"))
            .on("getfd", Response::ok("{}"));
        let fake = FakeQemu::from_stream(script, theirs).unwrap();
        let (c, conn) = qmp_smol::from_unix_stream(mine, Builder::new())
            .await
            .unwrap();
        let driver = qmp_smol::spawn_connection(conn);
        let args = serde_json::json!({ "data": "x".repeat(8 << 20) });
        for _ in 0..2 {
            let _: serde::de::IgnoredAny = c.execute("big", &args).await.unwrap();
        }
        let fd_args = serde_json::json!({"fdname": "a"});
        let _: serde::de::IgnoredAny = c
            .execute_with_fds("getfd", &fd_args, vec![devnull()])
            .await
            .unwrap();
        let reqs = fake.requests();
        let big = reqs.iter().filter(|r| r.name.as_deref() == Some("big"));
        assert_eq!(big.count(), 2);
        assert_eq!(reqs.last().unwrap().fds, 1);
        c.close().await;
        assert!(driver.await.is_ok());
    });
}

#[test]
fn any_futures_io_stream_without_fd_passing() {
    smol::block_on(async {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let _fake = FakeQemu::from_stream(Script::new(), theirs).unwrap();
        let stream = smol::Async::new(mine).unwrap();
        let (c, conn) = qmp_smol::from_stream(stream, Builder::new()).await.unwrap();
        let driver = qmp_smol::spawn_connection(conn);
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
        assert!(driver.await.is_ok());
    });
}

/// The crate's example, run as a user would, against a real VM.
#[test]
fn the_status_example_follows_a_real_vm() {
    qmp_testkit::example::check_status_example("smol_status");
}

#[test]
fn waiting_for_a_socket_gives_up_at_once_on_errors_that_waiting_cannot_fix() {
    // A path through a regular file can never become a socket: with no time limit, the old
    // loop retried it for ever.
    let path = std::env::current_exe().unwrap().join("qmp.sock");
    let wait = qmp_smol::connect_unix_wait(&path, Builder::new(), Duration::MAX);
    let give_up = async {
        smol::Timer::after(Duration::from_secs(5)).await;
        panic!("still retrying");
    };
    let e = smol::block_on(smol::future::or(wait, give_up)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let io = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("the io::Error is the source");
    assert_eq!(io.kind(), std::io::ErrorKind::NotADirectory);
}

#[test]
fn waiting_for_a_socket_rides_out_a_full_backlog() {
    // A monitor's listen backlog is small, and QEMU stops accepting while a client holds it:
    // a connect then fails with EAGAIN, which is worth waiting out like a missing socket.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    rustix::net::listen(&listener, 0).unwrap();
    let first = UnixStream::connect(&path).unwrap();
    // The backlog is full now: a nonblocking connect is refused with EAGAIN.
    let probe = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    rustix::io::ioctl_fionbio(&probe, true).unwrap();
    let addr = rustix::net::SocketAddrUnix::new(&path).unwrap();
    assert_eq!(
        rustix::net::connect(&probe, &addr),
        Err(rustix::io::Errno::AGAIN)
    );
    drop(probe);
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let (held, _) = listener.accept().unwrap();
        let (ours, _) = listener.accept().unwrap();
        (held, FakeQemu::from_stream(Script::new(), ours).unwrap())
    });
    let (c, conn) = smol::block_on(qmp_smol::connect_unix_wait(
        &path,
        Builder::new(),
        Duration::from_secs(10),
    ))
    .unwrap();
    let (_held, _fake) = server.join().unwrap();
    let version: serde_json::Value =
        smol::block_on(smol::future::or(c.execute("query-version", &()), async {
            conn.await.unwrap();
            unreachable!("the connection ended first")
        }))
        .unwrap();
    assert_eq!(version["qemu"]["major"], 10);
    drop(first);
}

#[test]
fn a_reply_that_came_with_descriptors_does_not_hide_the_next_one() {
    // A peer may attach descriptors to what it sends (QEMU does not). The kernel ends a read
    // after the bytes they came with (and closes the descriptors, as no room was offered for
    // them); both replies must still arrive. async-io's readiness is level-triggered, so here
    // (unlike on tokio) taking the short read for an empty socket would not lose the second.
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
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
        let expected = br#"{"execute":"a","id":1}{"execute":"b","id":2}"#;
        let mut wrote = Vec::new();
        while wrote.len() < expected.len() {
            let n = theirs.read(&mut buf).unwrap();
            assert_ne!(n, 0, "the client closed early");
            wrote.extend_from_slice(&buf[..n]);
        }
        assert_eq!(wrote, expected);
        // The first reply carries a descriptor, the second follows at once.
        let text = "{\"return\": 1, \"id\": 1}\r\n";
        let sent = qmp_testkit::fake::send_with_fds(&theirs, text.as_bytes(), &[devnull().as_fd()]);
        assert_eq!(sent.unwrap(), text.len());
        theirs.write_all(b"{\"return\": 2, \"id\": 2}\r\n").unwrap();
        theirs
    });
    smol::block_on(async {
        let (c, conn) = qmp_smol::from_unix_stream(mine, Builder::new())
            .await
            .unwrap();
        let driver = smol::spawn(conn);
        let (a, b) = (c.clone(), c.clone());
        let calls = smol::future::zip(async move { a.execute_raw("a", &()).await }, async move {
            b.execute_raw("b", &()).await
        });
        let give_up = async {
            smol::Timer::after(Duration::from_secs(5)).await;
            panic!("a reply was left unread");
        };
        let (one, two) = smol::future::or(calls, give_up).await;
        assert_eq!((one.unwrap().get(), two.unwrap().get()), ("1", "2"));
        c.close().await;
        assert!(matches!(driver.await, Ok(())));
    });
    drop(server.join().unwrap());
}
