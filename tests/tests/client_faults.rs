//! qmp-client against the testkit's fake QEMU with injected faults, on tokio, smol and
//! async-std: what the caller sees (a clear error, no hang) and that the session goes on where
//! QEMU's would.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use qmp_client::{Builder, Client, Error, ErrorClass, ErrorKind, SendStatus};
use qmp_testkit::fake::{Action, FakeQemu, Response, Script, faults};
use serde::de::IgnoredAny;

type BoxFut<T> = Pin<Box<dyn Future<Output = T>>>;

/// Where the fake listens.
enum Addr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl Addr {
    fn of(fake: &FakeQemu) -> Self {
        match fake.socket_path() {
            Some(path) => Self::Unix(path.into()),
            None => Self::Tcp(fake.tcp_addr().expect("a unix or a tcp fake")),
        }
    }
}

/// Connects, spawns the driver, and returns the client and the driver's result.
type Connect = fn(Addr, Builder) -> BoxFut<Result<(Client, BoxFut<Result<(), Error>>), Error>>;

async fn peer_gone_mid_command(connect: Connect) {
    let fake = FakeQemu::unix(Script::new().on("hang", Response::none())).unwrap();
    let (c, driver) = connect(Addr::of(&fake), Builder::new()).await.unwrap();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let c = c.clone();
            Box::pin(async move { c.execute_raw("hang", &()).await })
        })
        .collect();
    // `join` polls the calls first (submitting all 20: 8 go on the wire, the in-flight cap,
    // the rest wait locally), then this future, which waits for the fake to have read them
    // and hangs up. The driver runs on another thread meanwhile.
    let hang_up = async {
        let seen = fake.wait_requests(10, Duration::from_secs(5)).len();
        fake.disconnect();
        (seen, Instant::now())
    };
    let (results, (seen, gone)) =
        futures_util::future::join(futures_util::future::join_all(calls), hang_up).await;
    let took = gone.elapsed();
    assert_eq!(seen, 9, "qmp_capabilities and the 8 commands in flight");
    let mut unanswered = 0;
    for r in results {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Disconnected);
        // The message says how far the command got.
        match e.send_status() {
            Some(SendStatus::Unanswered) => {
                unanswered += 1;
                assert_eq!(
                    e.to_string(),
                    "hang: the peer closed the connection (sent, but no reply came)"
                );
            }
            Some(SendStatus::NotSent) => assert_eq!(
                e.to_string(),
                "hang: the peer closed the connection (not sent)"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(unanswered, 8);
    assert!(took < Duration::from_millis(100), "{took:?}");
    assert!(driver.await.is_ok());
    let e = c.execute_raw("hang", &()).await.unwrap_err();
    assert_eq!(e.send_status(), Some(SendStatus::NotSent));
}

async fn closed_mid_reply(connect: Connect) {
    let script = Script::new().on(
        "x",
        Response::actions(vec![
            Action::Raw(b"{\"return\": {\"a\"".to_vec()),
            Action::Close,
        ]),
    );
    let fake = FakeQemu::unix(script).unwrap();
    let (c, driver) = connect(Addr::of(&fake), Builder::new()).await.unwrap();
    let mut events = c.subscribe(qmp_client::EventFilter::all());
    let e = c.execute_raw("x", &()).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Disconnected,
            Some(SendStatus::Unanswered),
            "x: the peer closed the connection (sent, but no reply came)"
        )
    );
    assert!(matches!(driver.await, Ok(())));
    assert_eq!(c.stats().anomalies, 1, "the truncated reply");
    // The session is over, as QEMU's would be.
    assert_eq!(
        events.recv().await,
        Some(qmp_client::EventItem::Closed(
            qmp_client::CloseReason::PeerClosed
        ))
    );
    assert_eq!(events.recv().await, None);
    let e = c.execute_raw("x", &()).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Disconnected,
            Some(SendStatus::NotSent),
            "x: the peer closed the connection (not sent)"
        )
    );
}

async fn never_greeted(connect: Connect) {
    let fake = FakeQemu::unix(Script::new().no_greeting()).unwrap();
    let start = Instant::now();
    let e = connect(
        Addr::of(&fake),
        Builder::new().handshake_timeout(Some(Duration::from_millis(200))),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert_eq!(
        e.to_string(),
        "the server accepted the connection but sent no greeting in time (is another client \
         attached to this monitor, or is it a guest agent?)"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

async fn stalled_server_times_out_then_recovers(connect: Connect) {
    let script = Script::new()
        .on_once(
            "slow",
            Response::actions(vec![Action::Stall, Action::Return("1".into())]),
        )
        .on("fast", Response::ok("2"));
    let fake = FakeQemu::unix(script).unwrap();
    let (c, _driver) = connect(Addr::of(&fake), Builder::new()).await.unwrap();
    let e = c
        .execute_timeout::<IgnoredAny, _>("slow", &(), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status()),
        (ErrorKind::Timeout, Some(SendStatus::Unanswered))
    );
    // Queued behind the stall: the server reads it but answers only after the release.
    let behind = c.execute::<u32, _>("fast", &());
    let release = async {
        let seen = fake.wait_requests(3, Duration::from_secs(5));
        fake.release();
        seen.len()
    };
    let (answer, seen) = futures_util::future::join(behind, release).await;
    assert_eq!(seen, 3);
    assert_eq!(answer.unwrap(), 2);
    let n: u32 = c.execute("fast", &()).await.unwrap();
    assert_eq!(n, 2);
    let st = c.stats();
    assert_eq!((st.late_replies, st.unknown_replies), (1, 0));
    assert_eq!(c.pending(), 0);
}

async fn a_server_that_stops_reading_does_not_stall_the_client(connect: Connect) {
    // Like QEMU with oob: 8 in-band commands queued and the fake stops reading the socket.
    // With 32 allowed in flight and requests of 64 KiB, the client's writes block too; every
    // command still completes, in order, once the first one is let go. Each `big` command
    // carries its number `n` and the fake answers it with that number, so a reply given to the
    // wrong command, or a command written out of order, shows.
    let script = Script::new()
        .on_once(
            "slow",
            Response::actions(vec![Action::Stall, Action::Return("0".into())]),
        )
        .handler(|req| {
            let args: serde_json::Value = serde_json::from_str(req.arguments.as_deref()?).ok()?;
            (req.name == "big").then(|| Response::ok(args["n"].to_string()))
        });
    let fake = FakeQemu::unix(script).unwrap();
    let (c, _driver) = connect(Addr::of(&fake), Builder::new().max_in_flight(32))
        .await
        .unwrap();
    let pad = "x".repeat(64 << 10);
    let args: Vec<_> = (1..32u32)
        .map(|n| serde_json::json!({ "pad": pad, "n": n }))
        .collect();
    type Call<'a> = Pin<Box<dyn Future<Output = Result<u32, Error>> + 'a>>;
    let slow: Call<'_> = Box::pin(c.execute("slow", &()));
    let calls = std::iter::once(slow)
        .chain(
            args.iter()
                .map(|a| -> Call<'_> { Box::pin(c.execute("big", a)) }),
        )
        .collect::<Vec<_>>();
    let release = async {
        let seen = fake.wait_requests(10, Duration::from_secs(5)).len();
        fake.release();
        seen
    };
    let (answers, seen) =
        futures_util::future::join(futures_util::future::join_all(calls), release).await;
    assert_eq!(
        seen, 10,
        "negotiation, the stalled command and 8 queued behind it"
    );
    let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(answers, (0..32).collect::<Vec<u32>>());
    let requests = fake.requests();
    let names: Vec<_> = requests.iter().filter_map(|r| r.name.as_deref()).collect();
    assert_eq!((requests.len(), names.len()), (33, 33));
    assert_eq!(names[..2], ["qmp_capabilities", "slow"]);
    assert!(names[2..].iter().all(|&n| n == "big"), "{names:?}");
    // The server read the `big` commands in the order they were made.
    let order: Vec<u64> = requests[2..]
        .iter()
        .map(|r| {
            let args: serde_json::Value =
                serde_json::from_str(r.arguments.as_deref().unwrap()).unwrap();
            args["n"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(order, (1..32).collect::<Vec<u64>>());
    assert_eq!(c.pending(), 0);
}

async fn bad_output_does_not_end_the_session(connect: Connect) {
    let script = Script::new()
        .on(
            "qmp_capabilities",
            Response::ok("{}").event_before("EARLY", None),
        )
        .on(
            "x",
            Response::actions(vec![
                Action::Raw(faults::idless_error(
                    "JSON parse error, invalid keyword 'x'",
                )),
                // Several for one bad input, as QEMU's parser can send.
                Action::Raw(faults::idless_errors(3)),
                Action::Raw(faults::oversized(99, 70_000)),
                Action::Raw(faults::too_deep(98, 2000)),
                Action::Raw(faults::INF_ID.to_vec()),
                Action::ReturnWithId {
                    id: "12345".into(),
                    value: "0".into(),
                },
                Action::Return("42".into()),
            ]),
        );
    let fake = FakeQemu::unix(script).unwrap();
    let (c, _driver) = connect(Addr::of(&fake), Builder::new().max_message_size(65_536))
        .await
        .unwrap();
    // Subscribed once the driver may have run: the event sent before the negotiation reply
    // reaches it only if it came first (unit tests check that backlog exactly).
    let mut events = c.subscribe(qmp_client::EventFilter::all());
    let n: u32 = c.execute("x", &()).await.unwrap();
    assert_eq!(n, 42);
    let _: IgnoredAny = c.execute("query-version", &()).await.unwrap();
    let mut first = events.recv().await;
    if let Some(qmp_client::EventItem::Event(ev)) = &first {
        assert_eq!(ev.name, "EARLY");
        first = events.recv().await;
    }
    // The reply with an `-inf` id could not be read and had no id to tie it to a command:
    // it may have been an event, lost after EARLY. Nothing else reached the stream.
    assert_eq!(first, Some(qmp_client::EventItem::Lagged(1)));
    assert_eq!(events.len(), 0);
    let st = c.stats();
    assert_eq!(st.events, 1, "{st:?}");
    assert_eq!(st.unknown_replies, 1, "{st:?}");
    assert_eq!(st.anomalies, 7, "{st:?}");
}

/// A reply too large or nested too deep to read fails its own command only, as one that ran
/// with an unknown result; a command answered after it, and the session, go on.
async fn an_unreadable_reply_fails_only_its_command(connect: Connect) {
    let script = Script::new()
        .on("big", Response::ok(format!("\"{}\"", "a".repeat(2000))))
        .on(
            "deep",
            Response::ok(format!("{}0{}", "[".repeat(40), "]".repeat(40))),
        )
        .on("n", Response::ok("7"));
    let fake = FakeQemu::unix(script).unwrap();
    let config = qmp_client::Config::default()
        .max_message_size(1000)
        .max_depth(16);
    let (c, _driver) = connect(Addr::of(&fake), Builder::with_config(config))
        .await
        .unwrap();
    for name in ["big", "deep"] {
        let (lost, next) = futures_util::join!(
            c.execute::<IgnoredAny, _>(name, &()),
            c.execute::<u32, _>("n", &())
        );
        let e = lost.unwrap_err();
        assert_eq!(
            (e.kind(), e.send_status(), e.command(), e.to_string()),
            (
                ErrorKind::ReplyLost,
                Some(SendStatus::Unanswered),
                Some(name),
                format!("{name}: its reply could not be read (it ran, with an unknown result)")
            )
        );
        assert_eq!(next.unwrap(), 7);
    }
    assert_eq!(c.stats().anomalies, 2);
}

/// QEMU can emit the event a command causes before or after the command's reply (block jobs
/// do both). `execute_then_wait` subscribes before sending, so it gets the event either way,
/// and skips events its predicate rejects.
async fn the_event_a_command_causes_before_or_after_its_reply(connect: Connect) {
    let change = |job: &str| format!(r#"{{"status": "created", "id": "{job}"}}"#);
    let script = Script::new()
        .on(
            "before",
            Response::ok("{}")
                .event_before("JOB_STATUS_CHANGE", Some(&change("other")))
                .event_before("JOB_STATUS_CHANGE", Some(&change("j1"))),
        )
        .on(
            "after",
            Response::ok("{}")
                .event_after("JOB_STATUS_CHANGE", Some(&change("other")))
                .event_after("JOB_STATUS_CHANGE", Some(&change("j2"))),
        );
    let fake = FakeQemu::unix(script).unwrap();
    let (c, _driver) = connect(Addr::of(&fake), Builder::new()).await.unwrap();
    for (command, job) in [("before", "j1"), ("after", "j2")] {
        let wanted = change(job);
        let (_, ev): (IgnoredAny, _) = c
            .execute_then_wait(
                command,
                &(),
                "JOB_STATUS_CHANGE",
                |e| e.data.as_ref().is_some_and(|d| d.get() == wanted),
                Some(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        assert_eq!(
            (ev.name.as_str(), ev.data.unwrap().get()),
            ("JOB_STATUS_CHANGE", wanted.as_str())
        );
    }
    assert_eq!(c.stats().events, 4);
}

/// A monitor connected during QEMU's start-up race greets twice: the second greeting arrives
/// after the client has sent `qmp_capabilities` (seen with qemu-storage-daemon 10.0.2; see
/// `qmp_testkit::launch`). The session goes on with the first greeting.
async fn greeted_twice_at_start_up(connect: Connect) {
    let again = br#"{"QMP": {"version": {"qemu": {"micro": 9, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
    let mut again = again.to_vec();
    again.extend_from_slice(b"\r\n");
    let script = Script::new().version(10, 0, 2).on(
        "qmp_capabilities",
        Response::actions(vec![Action::Raw(again), Action::Return("{}".into())]),
    );
    let fake = FakeQemu::unix(script).unwrap();
    let (c, _driver) = connect(Addr::of(&fake), Builder::new()).await.unwrap();
    assert_eq!(c.greeting().unwrap().version.qemu.micro, 2);
    assert_eq!(c.capabilities(), vec!["oob".to_owned()]);
    let _: IgnoredAny = c.execute("query-version", &()).await.unwrap();
    assert_eq!(c.stats().anomalies, 1);
}

async fn reset_after_quit_is_a_normal_close(connect: Connect) {
    // Over TCP, where closing with SO_LINGER 0 makes the client read ECONNRESET (a unix peer
    // would mostly see EOF).
    let script = Script::new().on("quit", Response::ok("{}").then(Action::Reset));
    let fake = FakeQemu::tcp(script).unwrap();
    let (c, driver) = connect(Addr::of(&fake), Builder::new()).await.unwrap();
    let mut events = c.subscribe(qmp_client::EventFilter::all());
    let _: IgnoredAny = c.execute("quit", &()).await.unwrap();
    assert!(matches!(driver.await, Ok(())));
    assert!(c.is_closed());
    assert_eq!(
        events.recv().await,
        Some(qmp_client::EventItem::Closed(
            qmp_client::CloseReason::PeerClosed
        ))
    );
}

async fn guest_agent_commands_that_answer_only_on_failure(connect: Connect) {
    // guest-shutdown and guest-suspend-* send no reply when they work: silence for the
    // grace, a later reply, or the agent going away means success; an error still counts.
    let script = Script::qga()
        .on("guest-suspend-ram", Response::none())
        .on(
            "guest-suspend-disk",
            Response::error(ErrorClass::GenericError, "suspend-to-disk not supported"),
        )
        .on("guest-shutdown", Response::none().then(Action::Close));
    let fake = FakeQemu::unix(script).unwrap();
    let builder = Builder::new().qga().quiet_grace(Duration::from_millis(200));
    let (c, driver) = connect(Addr::of(&fake), builder).await.unwrap();
    let start = Instant::now();
    let () = c.execute("guest-suspend-ram", &()).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(200));
    let e = c
        .execute::<(), _>("guest-suspend-disk", &())
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.to_string().as_str()),
        (
            ErrorKind::Command,
            "guest-suspend-disk: GenericError: suspend-to-disk not supported"
        )
    );
    // The agent closes without a word (the guest powered off), long before the grace ends.
    let slow = Builder::new().qga().quiet_grace(Duration::from_secs(60));
    drop((c, driver));
    let (c, driver) = connect(Addr::of(&fake), slow).await.unwrap();
    let () = c.execute("guest-shutdown", &()).await.unwrap();
    assert!(matches!(driver.await, Ok(())));
}

async fn a_tcp_connect_nobody_answers_gives_up_at_the_connect_timeout(connect: Connect) {
    // A listener whose accept queue is full drops further SYNs, as a host behind a firewall
    // that drops packets: the system would retry for about two minutes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    rustix::net::listen(&listener, 0).unwrap();
    let addr = listener.local_addr().unwrap();
    let _held: Vec<_> = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    let start = Instant::now();
    let builder = Builder::new().connect_timeout(Some(Duration::from_millis(300)));
    let e = connect(Addr::Tcp(addr), builder)
        .await
        .map(|_| ())
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(
        (e.kind(), e.to_string().as_str()),
        (
            ErrorKind::Io,
            "cannot open the transport: no connection within 300ms"
        )
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// `connect_unix_wait(path, builder, wait)`, the driver spawned as in [`Connect`].
type ConnectWait =
    fn(PathBuf, Builder, Duration) -> BoxFut<Result<(Client, BoxFut<Result<(), Error>>), Error>>;

/// What [`starting_monitor`] does with the connection it takes.
#[derive(Clone, Copy)]
enum Monitor {
    /// Closes it at once, as QEMU 10.0 can during its start-up race.
    CutsOff,
    /// Holds it without a word until the client closes it.
    Silent,
    /// Serves it with the fake until the client closes it.
    Serves,
}

/// A listener standing in for a QEMU that is still starting: it binds `path` after `delay`
/// and takes one connection. Joining it gives the number of connections it took.
fn starting_monitor(
    path: PathBuf,
    delay: Duration,
    what: Monitor,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (stream, _) = listener.accept().unwrap();
        match what {
            Monitor::CutsOff => drop(stream),
            Monitor::Silent => {
                let mut buf = [0u8; 64];
                while std::io::Read::read(&mut &stream, &mut buf).is_ok_and(|n| n > 0) {}
            }
            Monitor::Serves => {
                let fake = FakeQemu::from_stream(Script::new(), stream).unwrap();
                assert_eq!(fake.wait_closed(1, Duration::from_secs(10)), 1);
            }
        }
        // Anyone trying again would be refused from here on.
        listener.set_nonblocking(true).unwrap();
        1 + std::iter::from_fn(|| listener.accept().ok()).count()
    })
}

/// `connect_unix_wait` with `Duration::MAX`, the obvious "wait for ever", waits for the socket
/// to appear (it used to panic computing its deadline).
async fn connect_wait_for_ever(connect_wait: ConnectWait) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let monitor = starting_monitor(path.clone(), Duration::from_millis(50), Monitor::Serves);
    let (c, driver) = connect_wait(path, Builder::new(), Duration::MAX)
        .await
        .unwrap();
    let v: serde_json::Value = c.execute("query-version", &()).await.unwrap();
    assert_eq!(v["qemu"]["major"], 10);
    c.close().await;
    assert!(driver.await.is_ok());
    assert_eq!(monitor.join().unwrap(), 1);
}

/// `connect_unix_wait` waits for the socket to appear, but a monitor that closes the
/// connection before greeting is reported at once, not tried again until `wait` has passed:
/// a QEMU 10.0 monitor that does this does not recover (see qmp-client's docs).
async fn connect_wait_reports_a_cut_off_at_once(connect_wait: ConnectWait) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let monitor = starting_monitor(path.clone(), Duration::from_millis(50), Monitor::CutsOff);
    let start = Instant::now();
    let e = connect_wait(path, Builder::new(), Duration::from_secs(10))
        .await
        .err()
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert_eq!(e.send_status(), None);
    assert_eq!(
        e.to_string(),
        "the server closed the connection before greeting"
    );
    assert_eq!(monitor.join().unwrap(), 1);
}

/// Nor is a monitor that accepts and never greets (another client holds it): the handshake
/// timeout ends the wait, on the one connection.
async fn connect_wait_does_not_retry_a_silent_monitor(connect_wait: ConnectWait) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let monitor = starting_monitor(path.clone(), Duration::ZERO, Monitor::Silent);
    let start = Instant::now();
    let e = connect_wait(
        path,
        Builder::new().handshake_timeout(Some(Duration::from_millis(200))),
        Duration::from_secs(10),
    )
    .await
    .err()
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert_eq!(
        e.to_string(),
        "the server accepted the connection but sent no greeting in time (is another client \
         attached to this monitor, or is it a guest agent?)"
    );
    assert_eq!(monitor.join().unwrap(), 1);
}

macro_rules! faults_on {
    ($connect:expr, $connect_wait:expr, $block_on:path) => {
        #[test]
        fn connect_wait_for_ever() {
            $block_on(super::connect_wait_for_ever($connect_wait));
        }
        #[test]
        fn connect_wait_reports_a_cut_off_at_once() {
            $block_on(super::connect_wait_reports_a_cut_off_at_once($connect_wait));
        }
        #[test]
        fn connect_wait_does_not_retry_a_silent_monitor() {
            $block_on(super::connect_wait_does_not_retry_a_silent_monitor(
                $connect_wait,
            ));
        }
        #[test]
        fn peer_gone_mid_command() {
            $block_on(super::peer_gone_mid_command($connect));
        }
        #[test]
        fn closed_mid_reply() {
            $block_on(super::closed_mid_reply($connect));
        }
        #[test]
        fn never_greeted() {
            $block_on(super::never_greeted($connect));
        }
        #[test]
        fn stalled_server_times_out_then_recovers() {
            $block_on(super::stalled_server_times_out_then_recovers($connect));
        }
        #[test]
        fn a_server_that_stops_reading_does_not_stall_the_client() {
            $block_on(super::a_server_that_stops_reading_does_not_stall_the_client($connect));
        }
        #[test]
        fn bad_output_does_not_end_the_session() {
            $block_on(super::bad_output_does_not_end_the_session($connect));
        }
        #[test]
        fn reset_after_quit_is_a_normal_close() {
            $block_on(super::reset_after_quit_is_a_normal_close($connect));
        }
        #[test]
        fn an_unreadable_reply_fails_only_its_command() {
            $block_on(super::an_unreadable_reply_fails_only_its_command($connect));
        }
        #[test]
        fn the_event_a_command_causes_before_or_after_its_reply() {
            $block_on(super::the_event_a_command_causes_before_or_after_its_reply(
                $connect,
            ));
        }
        #[test]
        fn guest_agent_commands_that_answer_only_on_failure() {
            $block_on(super::guest_agent_commands_that_answer_only_on_failure(
                $connect,
            ));
        }
        #[test]
        fn a_tcp_connect_nobody_answers_gives_up_at_the_connect_timeout() {
            $block_on(
                super::a_tcp_connect_nobody_answers_gives_up_at_the_connect_timeout($connect),
            );
        }
        #[test]
        fn greeted_twice_at_start_up() {
            $block_on(super::greeted_twice_at_start_up($connect));
        }
    };
}

mod tokio_rt {
    faults_on!(
        |p, b| Box::pin(async move {
            let (c, conn) = match p {
                super::Addr::Unix(p) => qmp_tokio::connect_unix(p, b).await?,
                super::Addr::Tcp(a) => qmp_tokio::connect_tcp(a, b).await?,
            };
            let h = qmp_tokio::spawn_connection(conn);
            Ok((
                c,
                Box::pin(async move { h.await.unwrap() }) as super::BoxFut<_>,
            ))
        }),
        |p, b, wait| Box::pin(async move {
            let (c, conn) = qmp_tokio::connect_unix_wait(p, b, wait).await?;
            let h = qmp_tokio::spawn_connection(conn);
            Ok((
                c,
                Box::pin(async move { h.await.unwrap() }) as super::BoxFut<_>,
            ))
        }),
        qmp_tests::tokio_block_on
    );
}

mod smol_rt {
    faults_on!(
        |p, b| Box::pin(async move {
            let (c, conn) = match p {
                super::Addr::Unix(p) => qmp_smol::connect_unix(p, b).await?,
                super::Addr::Tcp(a) => qmp_smol::connect_tcp(a, b).await?,
            };
            let t = qmp_smol::spawn_connection(conn);
            Ok((c, Box::pin(t) as super::BoxFut<_>))
        }),
        |p, b, wait| Box::pin(async move {
            let (c, conn) = qmp_smol::connect_unix_wait(p, b, wait).await?;
            let t = qmp_smol::spawn_connection(conn);
            Ok((c, Box::pin(t) as super::BoxFut<_>))
        }),
        smol::block_on
    );
}

mod async_std_rt {
    faults_on!(
        |p, b| Box::pin(async move {
            let (c, conn) = match p {
                super::Addr::Unix(p) => qmp_async_std::connect_unix(p, b).await?,
                super::Addr::Tcp(a) => qmp_async_std::connect_tcp(a, b).await?,
            };
            let t = qmp_async_std::spawn_connection(conn);
            Ok((c, Box::pin(t) as super::BoxFut<_>))
        }),
        |p, b, wait| Box::pin(async move {
            let (c, conn) = qmp_async_std::connect_unix_wait(p, b, wait).await?;
            let t = qmp_async_std::spawn_connection(conn);
            Ok((c, Box::pin(t) as super::BoxFut<_>))
        }),
        async_std::task::block_on
    );
}
