//! The client over an in-memory pipe, a manual clock and a server scripted by hand, on a
//! single-threaded executor. No wall-clock sleeps.

mod support;

use std::future::Future;
use std::time::Duration;

use futures_channel::oneshot;
use futures_executor::{LocalPool, LocalSpawner};
use futures_util::FutureExt;
use futures_util::task::LocalSpawnExt;
use qmp_client::{
    Builder, Client, CloseReason, Error, ErrorClass, ErrorKind, EventItem, RemoteError, SendStatus,
};
use support::{ManualTimer, Server, pipe};

fn spawn<T: 'static>(
    sp: &LocalSpawner,
    fut: impl Future<Output = T> + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    sp.spawn_local(async move {
        let _ = tx.send(fut.await);
    })
    .unwrap();
    rx
}

fn done<T>(pool: &mut LocalPool, rx: &mut oneshot::Receiver<T>) -> Option<T> {
    pool.run_until_stalled();
    rx.try_recv().unwrap()
}

/// The kind and send status of the error a call finishes with now.
fn failed<T: std::fmt::Debug>(
    pool: &mut LocalPool,
    rx: &mut oneshot::Receiver<Result<T, Error>>,
) -> (ErrorKind, Option<SendStatus>) {
    let e = done(pool, rx).expect("finished").unwrap_err();
    (e.kind(), e.send_status())
}

struct Session {
    pool: LocalPool,
    sp: LocalSpawner,
    client: Client,
    srv: Server,
    timer: ManualTimer,
    driver: oneshot::Receiver<Result<(), Error>>,
}

const NEGOTIATE: &str = r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}"#;

fn session(builder: Builder) -> Session {
    let (s, conn) = unspawned(builder);
    let driver = spawn(&s.sp, conn);
    Session { driver, ..s }
}

impl Session {
    /// Spawns `execute_raw(name)` with no arguments; the receiver gets its result.
    fn call(&self, name: &'static str) -> oneshot::Receiver<Result<qmp_client::RawJson, Error>> {
        let c = self.client.clone();
        spawn(&self.sp, async move { c.execute_raw(name, &()).await })
    }
}

/// A handshake under way on a fresh executor, against a server scripted by the test.
struct Handshaking {
    pool: LocalPool,
    sp: LocalSpawner,
    srv: Server,
    timer: ManualTimer,
    hs: oneshot::Receiver<Result<(Client, qmp_client::Connection), Error>>,
}

fn handshaking(builder: Builder) -> Handshaking {
    handshaking_with(|io, timer| builder.handshake(io, timer))
}

/// As [`handshaking`], with the handshake `start` makes over the pipe and the clock.
fn handshaking_with<F>(start: impl FnOnce(support::PipeEnd, ManualTimer) -> F) -> Handshaking
where
    F: Future<Output = Result<(Client, qmp_client::Connection), Error>> + 'static,
{
    let pool = LocalPool::new();
    let sp = pool.spawner();
    let (io, srv) = pipe();
    let timer = ManualTimer::new();
    let hs = spawn(&sp, start(io, timer.clone()));
    Handshaking {
        pool,
        sp,
        srv,
        timer,
        hs,
    }
}

/// A session after its handshake, with its driver handed back instead of spawned. Its
/// `driver` receiver is already closed (it resolves as cancelled): wait on the driver itself.
fn unspawned(builder: Builder) -> (Session, qmp_client::Connection) {
    negotiated(handshaking(builder))
}

/// Greets and negotiates, and returns the session with its driver, not yet spawned.
fn negotiated(h: Handshaking) -> (Session, qmp_client::Connection) {
    let Handshaking {
        mut pool,
        sp,
        srv,
        timer,
        mut hs,
    } = h;
    assert!(done(&mut pool, &mut hs).is_none());
    assert_eq!(srv.take(), "");
    srv.greet();
    assert!(done(&mut pool, &mut hs).is_none());
    assert_eq!(srv.take(), NEGOTIATE);
    srv.send("{\"return\": {}, \"id\": 0}\r\n");
    let (client, conn) = done(&mut pool, &mut hs).unwrap().unwrap();
    let (_never, driver) = oneshot::channel();
    let s = Session {
        pool,
        sp,
        client,
        srv,
        timer,
        driver,
    };
    (s, conn)
}

#[derive(Debug, PartialEq, serde::Deserialize)]
struct Status {
    status: String,
    running: bool,
}

#[test]
fn client_is_send_sync_and_connection_is_send() {
    fn check<T: Send + Sync + Clone>() {}
    fn send<T: Send + 'static>() {}
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    check::<Client>();
    send::<qmp_client::Connection>();
    send::<qmp_client::EventStream>();
    error::<Error>();
}

#[test]
fn arguments_and_returns_of_the_callers_own_types() {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "kebab-case")]
    struct AddFd {
        fdset_id: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        opaque: Option<String>,
    }
    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Added {
        fd: i32,
        fdset_id: u32,
    }
    let mut s = session(Builder::new());
    for (id, opaque, wire) in [
        (
            1,
            None,
            r#"{"execute":"add-fd","arguments":{"fdset-id":3},"id":1}"#,
        ),
        (
            2,
            Some("a \"b\"".to_owned()),
            r#"{"execute":"add-fd","arguments":{"fdset-id":3,"opaque":"a \"b\""},"id":2}"#,
        ),
    ] {
        let c = s.client.clone();
        let args = AddFd {
            fdset_id: 3,
            opaque,
        };
        let mut call = spawn(&s.sp, async move {
            c.execute::<Added, _>("add-fd", &args).await
        });
        assert!(done(&mut s.pool, &mut call).is_none());
        assert_eq!(s.srv.take(), wire);
        s.srv.send(&format!(
            "{{\"return\": {{\"fd\": 25, \"fdset-id\": 3}}, \"id\": {id}}}\r\n"
        ));
        assert_eq!(
            done(&mut s.pool, &mut call).unwrap().unwrap(),
            Added {
                fd: 25,
                fdset_id: 3
            }
        );
    }
}

#[test]
fn handshake_then_typed_and_raw_execute() {
    let mut s = session(Builder::new());
    assert_eq!(s.client.capabilities(), vec!["oob".to_owned()]);
    assert_eq!(s.client.greeting().unwrap().version.qemu.major, 10);

    let c = s.client.clone();
    let mut typed = spawn(&s.sp, async move {
        c.execute::<Status, _>("query-status", &()).await
    });
    assert!(done(&mut s.pool, &mut typed).is_none());
    assert_eq!(s.srv.take(), r#"{"execute":"query-status","id":1}"#);
    s.srv
        .send("{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 1}\n");
    let st = done(&mut s.pool, &mut typed).unwrap().unwrap();
    assert_eq!(
        st,
        Status {
            status: "running".into(),
            running: true
        }
    );

    let c = s.client.clone();
    let mut raw = spawn(&s.sp, async move {
        c.execute_raw("query-name", &serde_json::json!({"x": 1}))
            .await
    });
    assert!(done(&mut s.pool, &mut raw).is_none());
    assert_eq!(
        s.srv.take(),
        r#"{"execute":"query-name","arguments":{"x":1},"id":2}"#
    );
    // A pretty-printed reply split across writes.
    s.srv.send("{\n    \"return\": {\n        \"name\"");
    assert!(done(&mut s.pool, &mut raw).is_none());
    s.srv.send(": \"vm\"\n    },\n    \"id\": 2\n}\n");
    let r = done(&mut s.pool, &mut raw).unwrap().unwrap();
    assert_eq!(r.get(), "{\n        \"name\": \"vm\"\n    }");
    assert_eq!(s.client.pending(), 0);
    assert_eq!(s.client.stats().replies, 2);
}

#[test]
fn server_error_carries_name_class_desc_and_status() {
    let mut s = session(Builder::new());
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move {
        c.execute::<serde::de::IgnoredAny, _>(
            "blockdev-del",
            &serde_json::json!({"node-name": "x"}),
        )
        .await
    });
    assert!(done(&mut s.pool, &mut call).is_none());
    s.srv.take();
    s.srv.send(r#"{"id": 1, "error": {"class": "GenericError", "desc": "Failed to find node with node-name='x'"}}"#);
    let err = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command);
    assert_eq!(err.command(), Some("blockdev-del"));
    assert_eq!(err.send_status(), Some(SendStatus::Answered));
    let server = err.server_error().unwrap();
    assert_eq!(server.class, ErrorClass::GenericError);
    assert_eq!(server.desc, "Failed to find node with node-name='x'");
    assert_eq!(
        err.to_string(),
        "blockdev-del: GenericError: Failed to find node with node-name='x'"
    );

    // A reply of the wrong shape is a decode error, answered.
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move {
        c.execute::<Status, _>("query-status", &()).await
    });
    assert!(done(&mut s.pool, &mut call).is_none());
    s.srv.take();
    s.srv.send(r#"{"return": [1, 2], "id": 2}"#);
    let err = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert_eq!(err.send_status(), Some(SendStatus::Answered));

    // Arguments that are not an object never leave.
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move { c.execute_raw("x", &[1, 2]).await });
    let err = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    assert!(err.is_not_sent());
    assert_eq!(s.srv.take(), "");
}

fn event(name: &str, n: u32) -> String {
    format!(
        "{{\"event\": \"{name}\", \"data\": {{\"n\": {n}}}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}\r\n"
    )
}

#[test]
fn slow_subscriber_drops_oldest_reports_lag_and_ends_with_closed() {
    let mut s = session(Builder::new());
    let mut slow = s.client.subscribe_with_capacity("STOP", 2);
    let mut all = s.client.subscribe(qmp_client::EventFilter::all());
    for n in 0..5 {
        s.srv.send(&event("STOP", n));
    }
    s.srv.send(&event("RESUME", 9));
    s.pool.run_until_stalled();
    assert_eq!(slow.len(), 2);
    assert_eq!(all.len(), 6);

    let mut got = Vec::new();
    let mut slow_rx = spawn(&s.sp, async move {
        let mut items = Vec::new();
        while let Some(item) = slow.recv().await {
            items.push(match item {
                EventItem::Event(ev) => format!("{}:{}", ev.name, ev.data.unwrap()),
                EventItem::Lagged(n) => format!("lagged {n}"),
                EventItem::Closed(r) => format!("closed {r:?}"),
                _ => unreachable!(),
            });
        }
        items
    });
    s.pool.run_until_stalled();
    s.srv.hang_up();
    got.extend(done(&mut s.pool, &mut slow_rx).unwrap());
    assert_eq!(
        got,
        vec![
            "lagged 3".to_owned(),
            "STOP:{\"n\": 3}".to_owned(),
            "STOP:{\"n\": 4}".to_owned(),
            "closed PeerClosed".to_owned(),
        ]
    );
    // The other subscriber lost nothing.
    let mut all_rx = spawn(&s.sp, async move {
        let mut n = 0;
        while all.next_event().await.is_some() {
            n += 1;
        }
        n
    });
    assert_eq!(done(&mut s.pool, &mut all_rx), Some(6));
    assert!(matches!(done(&mut s.pool, &mut s.driver), Some(Ok(()))));
}

#[test]
fn builder_event_queue_sets_the_default_subscriber_capacity() {
    for (queue, expect) in [
        (
            3,
            vec!["lagged 2", r#"{"n": 2}"#, r#"{"n": 3}"#, r#"{"n": 4}"#],
        ),
        (0, vec!["lagged 4", r#"{"n": 4}"#]),
    ] {
        let mut s = session(Builder::new().event_queue(queue));
        let mut stops = s.client.subscribe("STOP");
        for n in 0..5 {
            s.srv.send(&event("STOP", n));
        }
        s.pool.run_until_stalled();
        s.srv.hang_up();
        let mut rx = spawn(&s.sp, async move {
            let mut items = Vec::new();
            while let Some(item) = stops.recv().await {
                match item {
                    EventItem::Event(ev) => items.push(ev.data.unwrap().get().to_owned()),
                    EventItem::Lagged(n) => items.push(format!("lagged {n}")),
                    _ => {}
                }
            }
            items
        });
        assert_eq!(
            done(&mut s.pool, &mut rx).unwrap(),
            expect,
            "event_queue({queue})"
        );
    }
}

#[test]
fn peer_gone_resolves_every_call_with_its_send_status() {
    let mut s = session(Builder::new().max_in_flight(1));
    let mut first = s.call("a");
    let mut second = s.call("b");
    let mut events = s.client.subscribe(qmp_client::EventFilter::all());
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"a","id":1}"#);
    s.srv.hang_up();
    let e1 = done(&mut s.pool, &mut first).unwrap().unwrap_err();
    let e2 = done(&mut s.pool, &mut second).unwrap().unwrap_err();
    assert_eq!(
        (e1.kind(), e1.send_status()),
        (ErrorKind::Disconnected, Some(SendStatus::Unanswered))
    );
    assert_eq!(
        (e2.kind(), e2.send_status()),
        (ErrorKind::Disconnected, Some(SendStatus::NotSent))
    );
    assert_eq!(e1.command(), Some("a"));
    assert!(matches!(done(&mut s.pool, &mut s.driver), Some(Ok(()))));

    // Later calls fail at once, not sent.
    let mut later = s.call("c");
    let e3 = done(&mut s.pool, &mut later).unwrap().unwrap_err();
    assert_eq!(
        (e3.kind(), e3.send_status()),
        (ErrorKind::Disconnected, Some(SendStatus::NotSent))
    );
    let mut ev = spawn(
        &s.sp,
        async move { (events.recv().await, events.recv().await) },
    );
    assert_eq!(
        done(&mut s.pool, &mut ev),
        Some((Some(EventItem::Closed(CloseReason::PeerClosed)), None))
    );
    // A subscription made after the close ends at once too.
    let mut late = s.client.subscribe("STOP");
    let mut ev = spawn(&s.sp, async move { late.recv().await });
    assert_eq!(
        done(&mut s.pool, &mut ev),
        Some(Some(EventItem::Closed(CloseReason::PeerClosed)))
    );
    assert!(s.client.is_closed());
}

#[test]
fn dropped_call_is_abandoned_and_its_late_reply_never_misrouted() {
    let mut s = session(Builder::new());
    let c = s.client.clone();
    let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
    let mut dropped = spawn(&s.sp, async move {
        futures_util::future::select(Box::pin(c.execute_raw("slow", &())), cancel_rx).await;
    });
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"slow","id":1}"#);
    assert_eq!(s.client.pending(), 1);
    cancel_tx.send(()).unwrap();
    assert_eq!(done(&mut s.pool, &mut dropped), Some(()));
    assert_eq!(s.client.pending(), 0);

    let mut next = s.call("fast");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"fast","id":2}"#);
    s.srv.send(r#"{"return": "late", "id": 1}"#);
    assert!(done(&mut s.pool, &mut next).is_none());
    s.srv.send(r#"{"return": "mine", "id": 2}"#);
    assert_eq!(
        done(&mut s.pool, &mut next).unwrap().unwrap().get(),
        "\"mine\""
    );
    assert_eq!(s.client.stats().late_replies, 1);
    assert_eq!(s.client.pending(), 0);
}

#[test]
fn a_call_dropped_before_it_was_written_never_goes_out() {
    let mut s = session(Builder::new().max_in_flight(1));
    let mut first = s.call("first");
    let c = s.client.clone();
    let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
    let mut queued = spawn(&s.sp, async move {
        futures_util::future::select(Box::pin(c.execute_raw("queued", &())), cancel_rx).await;
    });
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"first","id":1}"#);
    cancel_tx.send(()).unwrap();
    assert_eq!(done(&mut s.pool, &mut queued), Some(()));
    s.srv.send(r#"{"return": {}, "id": 1}"#);
    assert!(done(&mut s.pool, &mut first).unwrap().is_ok());
    assert_eq!(s.srv.take(), "");
    assert_eq!(s.client.pending(), 0);
}

#[test]
fn command_timeout_follows_the_manual_clock() {
    let mut s = session(Builder::new().command_timeout(Duration::from_secs(5)));
    let mut call = s.call("x");
    let c = s.client.clone();
    let mut short = spawn(&s.sp, async move {
        c.execute_timeout::<serde::de::IgnoredAny, _>("y", &(), Duration::from_secs(1))
            .await
    });
    s.pool.run_until_stalled();
    s.timer.advance(Duration::from_millis(999));
    assert!(done(&mut s.pool, &mut short).is_none());
    s.timer.advance(Duration::from_millis(1));
    assert_eq!(
        failed(&mut s.pool, &mut short),
        (ErrorKind::Timeout, Some(SendStatus::Unanswered))
    );
    assert!(done(&mut s.pool, &mut call).is_none());
    s.timer.advance(Duration::from_secs(4));
    let e = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert_eq!(e.to_string(), "x: timed out (sent, but no reply came)");
    // The session goes on.
    let mut ok = s.call("z");
    s.pool.run_until_stalled();
    s.srv.take();
    s.srv.send(r#"{"return": 7, "id": 3}"#);
    assert_eq!(done(&mut s.pool, &mut ok).unwrap().unwrap().get(), "7");
}

/// Polls a driver until told to stop, then hands it back: a driver that moves between tasks.
struct Handover {
    conn: Option<qmp_client::Connection>,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
    waker: std::rc::Rc<std::cell::RefCell<Option<std::task::Waker>>>,
}

impl Future for Handover {
    type Output = qmp_client::Connection;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<qmp_client::Connection> {
        if self.stop.get() {
            return std::task::Poll::Ready(self.conn.take().expect("polled after it ended"));
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        let conn = self.conn.as_mut().expect("polled after it ended");
        assert!(conn.poll_unpin(cx).is_pending(), "the session ended");
        std::task::Poll::Pending
    }
}

#[test]
fn a_driver_moved_to_another_task_still_gets_its_timeout() {
    let (mut s, conn) = unspawned(Builder::new().command_timeout(Duration::from_secs(5)));
    let stop = std::rc::Rc::new(std::cell::Cell::new(false));
    let waker = std::rc::Rc::default();
    let mut first = spawn(
        &s.sp,
        Handover {
            conn: Some(conn),
            stop: std::rc::Rc::clone(&stop),
            waker: std::rc::Rc::clone(&waker),
        },
    );
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    // The sleep for the deadline is armed, and it knows the first task's waker.
    stop.set(true);
    waker.borrow_mut().take().unwrap().wake();
    let conn = done(&mut s.pool, &mut first).unwrap();
    let mut second = spawn(&s.sp, conn);
    s.pool.run_until_stalled();
    s.timer.advance(Duration::from_secs(5));
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::Timeout, Some(SendStatus::Unanswered))
    );
    assert!(done(&mut s.pool, &mut second).is_none());
}

#[test]
fn commands_in_a_row_keep_one_timer_and_a_later_timeout_still_fires() {
    let mut s = session(Builder::new().command_timeout(Duration::from_secs(5)));
    let before = s.timer.sleeps();
    for i in 1..=50 {
        let mut call = s.call("x");
        assert!(done(&mut s.pool, &mut call).is_none());
        assert_eq!(s.srv.take(), format!(r#"{{"execute":"x","id":{i}}}"#));
        s.srv.send(&format!("{{\"return\": {i}, \"id\": {i}}}\r\n"));
        assert_eq!(
            done(&mut s.pool, &mut call).unwrap().unwrap().get(),
            i.to_string()
        );
        s.timer.advance(Duration::from_millis(10));
    }
    // The first command's deadline was the earliest; later ones kept its sleep.
    assert_eq!(s.timer.sleeps(), before + 1);

    // 0.5 s in: this deadline is at 5.5 s, the armed sleep at 5 s. It fires early, finds
    // nothing due, and the timer is armed again for 5.5 s.
    let mut call = s.call("x");
    assert!(done(&mut s.pool, &mut call).is_none());
    s.timer.advance(Duration::from_millis(4500));
    assert!(done(&mut s.pool, &mut call).is_none());
    assert_eq!(s.timer.sleeps(), before + 2);
    s.timer.advance(Duration::from_millis(499));
    assert!(done(&mut s.pool, &mut call).is_none());
    s.timer.advance(Duration::from_millis(1));
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::Timeout, Some(SendStatus::Unanswered))
    );
}

/// Runs a handshake with a 3 s timeout, greeting first if `greet`, and returns the error it
/// ends with once the timeout passes (and not a moment before), with the server end.
fn handshake_timed_out(greet: bool) -> (Error, Server) {
    let Handshaking {
        mut pool,
        srv,
        timer,
        mut hs,
        ..
    } = handshaking(Builder::new().handshake_timeout(Some(Duration::from_secs(3))));
    if greet {
        srv.greet();
    }
    assert!(done(&mut pool, &mut hs).is_none());
    timer.advance(Duration::from_secs(3));
    let err = done(&mut pool, &mut hs).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handshake);
    (err, srv)
}

#[test]
fn never_greeted_is_a_clear_handshake_error() {
    let (err, srv) = handshake_timed_out(false);
    assert_eq!(err.remote_error(), Some(&RemoteError::GreetingTimeout));
    assert_eq!(
        err.to_string(),
        "the server accepted the connection but sent no greeting in time (is another client \
         attached to this monitor, or is it a guest agent?)"
    );
    assert!(srv.client_closed());
}

#[test]
fn a_greeting_over_the_size_limit_is_named_in_the_handshake_error() {
    let Handshaking {
        mut pool,
        srv,
        timer,
        mut hs,
        ..
    } = handshaking(Builder::new().max_message_size(64));
    srv.greet();
    assert!(done(&mut pool, &mut hs).is_none());
    timer.advance(Duration::from_secs(10));
    let err = done(&mut pool, &mut hs).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handshake);
    assert_eq!(err.remote_error(), Some(&RemoteError::GreetingUnreadable));
    assert_eq!(
        err.to_string(),
        "no readable greeting came in time, but something else did: a message over the size or \
         depth limits (are they too small?), or text that is no QMP greeting (is this an HMP \
         monitor?)"
    );
}

#[test]
fn greeted_but_no_negotiation_reply_says_so() {
    let (err, _srv) = handshake_timed_out(true);
    assert_eq!(err.remote_error(), Some(&RemoteError::NegotiationTimeout));
    assert_eq!(
        err.to_string(),
        "the server greeted but did not answer qmp_capabilities in time"
    );
}

/// The handshake's error when the server hangs up, after greeting or before.
fn hung_up_in_handshake(builder: Builder, greet: bool) -> Error {
    let Handshaking {
        mut pool,
        srv,
        mut hs,
        ..
    } = handshaking(builder);
    if greet {
        srv.greet();
    }
    assert!(done(&mut pool, &mut hs).is_none());
    srv.hang_up();
    let err = done(&mut pool, &mut hs).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handshake);
    assert_eq!(err.send_status(), None);
    err
}

#[test]
fn eof_during_handshake_says_when() {
    assert_eq!(
        hung_up_in_handshake(Builder::new(), true).to_string(),
        "the server closed the connection during capability negotiation"
    );
    assert_eq!(
        hung_up_in_handshake(Builder::new(), false).to_string(),
        "the server closed the connection before greeting"
    );
    assert_eq!(
        hung_up_in_handshake(Builder::new().qga(), false).to_string(),
        "the guest agent closed the connection before the sync step ended"
    );
}

/// Spawns `execute_then_wait("stop", .., "STOP", ..)` with `timeout`.
fn stop_then_wait_for_stop(
    s: &Session,
    timeout: Duration,
) -> oneshot::Receiver<Result<(serde::de::IgnoredAny, qmp_client::Event), Error>> {
    let c = s.client.clone();
    spawn(&s.sp, async move {
        c.execute_then_wait("stop", &(), "STOP", |_| true, Some(timeout))
            .await
    })
}

#[test]
fn execute_then_wait_sees_an_event_sent_before_the_reply() {
    let mut s = session(Builder::new());
    let mut call = stop_then_wait_for_stop(&s, Duration::from_secs(1));
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"stop","id":1}"#);
    s.srv.send(&event("STOP", 1));
    s.srv.send(r#"{"return": {}, "id": 1}"#);
    let (_, ev) = done(&mut s.pool, &mut call).unwrap().unwrap();
    assert_eq!(ev.name, "STOP");
    assert_eq!(ev.data.unwrap().get(), r#"{"n": 1}"#);

    // wait_event with a predicate and a timeout.
    let c = s.client.clone();
    let mut wait = spawn(&s.sp, async move {
        c.wait_event(
            ["RESUME"],
            |e| e.data::<serde_json::Value>().unwrap()["n"] == 2,
            Some(Duration::from_secs(2)),
        )
        .await
    });
    s.pool.run_until_stalled();
    s.srv.send(&event("RESUME", 1));
    s.srv.send(&event("STOP", 2));
    assert!(done(&mut s.pool, &mut wait).is_none());
    s.srv.send(&event("RESUME", 2));
    assert_eq!(
        done(&mut s.pool, &mut wait).unwrap().unwrap().name,
        "RESUME"
    );

    let c = s.client.clone();
    let mut wait = spawn(&s.sp, async move {
        c.wait_event("NOPE", |_| true, Some(Duration::from_secs(2)))
            .await
    });
    assert!(done(&mut s.pool, &mut wait).is_none());
    s.timer.advance(Duration::from_secs(2));
    assert_eq!(failed(&mut s.pool, &mut wait), (ErrorKind::Timeout, None));
}

#[test]
fn close_resolves_pending_calls_and_stops_the_driver() {
    let mut s = session(Builder::new());
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    let c = s.client.clone();
    let mut closing = spawn(&s.sp, async move { c.close().await });
    assert_eq!(done(&mut s.pool, &mut closing), Some(()));
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::Closed, Some(SendStatus::Unanswered))
    );
    assert!(matches!(done(&mut s.pool, &mut s.driver), Some(Ok(()))));
    assert!(s.srv.client_closed());
}

#[test]
fn dropping_the_connection_resolves_pending_calls() {
    let (mut s, conn) = unspawned(Builder::new());
    let mut call = s.call("x");
    assert!(done(&mut s.pool, &mut call).is_none());
    drop(conn);
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::Closed, Some(SendStatus::NotSent))
    );
}

#[test]
fn garbage_and_idless_errors_do_not_end_the_session() {
    let mut s = session(Builder::new());
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    s.srv.take();
    s.srv.send(
        "}}garbage{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\r\n",
    );
    s.srv
        .send(r#"{"return": 1, "id": 99}{"return": 2, "id": 1}"#);
    assert_eq!(done(&mut s.pool, &mut call).unwrap().unwrap().get(), "2");
    let st = s.client.stats();
    assert_eq!(st.unknown_replies, 1);
    assert_eq!(st.anomalies, 2, "{st:?}");
}

#[test]
fn subscribing_and_dropping_without_events_stays_bounded() {
    let mut s = session(Builder::new());
    for _ in 0..100_000 {
        drop(s.client.subscribe("STOP"));
    }
    let kept = s.client.subscribe("STOP");
    // The client keeps only a few dead entries around, whatever the loop count.
    let dbg = format!("{:?}", s.client);
    let slots: usize = dbg
        .split("subscriber_slots: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{dbg}"));
    assert!(slots <= 4, "{dbg}");
    s.srv.send(&event("STOP", 1));
    s.pool.run_until_stalled();
    assert_eq!(kept.len(), 1);
}

#[test]
fn refused_negotiation_is_a_handshake_error_and_no_oob_without_the_capability() {
    let Handshaking {
        mut pool,
        srv,
        mut hs,
        ..
    } = handshaking(Builder::new());
    srv.greet();
    assert!(done(&mut pool, &mut hs).is_none());
    srv.take();
    srv.send(r#"{"id": 0, "error": {"class": "GenericError", "desc": "Capabilities negotiation is already complete, command ignored"}}"#);
    let e = done(&mut pool, &mut hs).unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert_eq!(
        e.to_string(),
        "capability negotiation failed: GenericError: Capabilities negotiation is already complete, command ignored"
    );

    // A server that offers no capabilities: exec-oob is refused locally, nothing is sent.
    let Handshaking {
        mut pool,
        sp,
        srv,
        mut hs,
        ..
    } = handshaking(Builder::new());
    srv.send("{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 9}, \"package\": \"\"}, \"capabilities\": []}}\r\n");
    assert!(done(&mut pool, &mut hs).is_none());
    assert_eq!(srv.take(), r#"{"execute":"qmp_capabilities","id":0}"#);
    srv.send(r#"{"return": {}, "id": 0}"#);
    let (client, conn) = done(&mut pool, &mut hs).unwrap().unwrap();
    let _driver = spawn(&sp, conn);
    assert!(client.capabilities().is_empty());
    let c = client.clone();
    let mut call = spawn(&sp, async move {
        c.exec_oob::<serde::de::IgnoredAny, _>("query-yank", &())
            .await
    });
    assert_eq!(
        failed(&mut pool, &mut call),
        (ErrorKind::Unsupported, Some(SendStatus::NotSent))
    );
    assert_eq!(srv.take(), "");
}

#[test]
fn close_gracefully_lets_pending_calls_finish_and_refuses_new_ones() {
    let mut s = session(Builder::new());
    let mut a = s.call("a");
    let mut b = s.call("b");
    s.pool.run_until_stalled();
    assert_eq!(
        s.srv.take(),
        r#"{"execute":"a","id":1}{"execute":"b","id":2}"#
    );
    let c = s.client.clone();
    let mut closing = spawn(&s.sp, async move {
        c.close_gracefully(Duration::from_secs(10)).await
    });
    assert!(done(&mut s.pool, &mut closing).is_none());
    let mut late = s.call("late");
    let e = done(&mut s.pool, &mut late).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Closed,
            Some(SendStatus::NotSent),
            "late: the connection is closing (not sent)"
        )
    );
    s.srv.send(r#"{"return": 1, "id": 1}"#);
    assert_eq!(done(&mut s.pool, &mut a).unwrap().unwrap().get(), "1");
    assert!(done(&mut s.pool, &mut closing).is_none());
    s.srv.send(r#"{"return": 2, "id": 2}"#);
    assert_eq!(done(&mut s.pool, &mut b).unwrap().unwrap().get(), "2");
    assert_eq!(done(&mut s.pool, &mut closing), Some(()));
    assert!(s.srv.client_closed());
    assert_eq!(s.srv.take(), "");
}

#[test]
fn close_gracefully_gives_up_after_its_timeout() {
    let mut s = session(Builder::new());
    let mut a = s.call("a");
    s.pool.run_until_stalled();
    let c = s.client.clone();
    let mut closing = spawn(&s.sp, async move {
        c.close_gracefully(Duration::from_secs(2)).await
    });
    assert!(done(&mut s.pool, &mut closing).is_none());
    s.timer.advance(Duration::from_secs(2));
    assert_eq!(done(&mut s.pool, &mut closing), Some(()));
    assert_eq!(
        failed(&mut s.pool, &mut a),
        (ErrorKind::Closed, Some(SendStatus::Unanswered))
    );
}

#[test]
fn a_reply_too_large_to_read_fails_its_call_at_once_and_the_session_goes_on() {
    let mut s = session(Builder::new().max_message_size(1000));
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move {
        c.execute::<serde_json::Value, _>("query-qmp-schema", &())
            .await
    });
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"query-qmp-schema","id":1}"#);
    s.srv.send(&format!(
        "{{\"return\": [\"{}\"], \"id\": 1}}\r\n",
        "x".repeat(5000)
    ));
    let e = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::ReplyLost,
            Some(SendStatus::Unanswered),
            "query-qmp-schema: its reply could not be read (it ran, with an unknown result)"
        )
    );
    let mut next = s.call("x");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":2}"#);
    s.srv.send(r#"{"return": 7, "id": 2}"#);
    assert_eq!(done(&mut s.pool, &mut next).unwrap().unwrap().get(), "7");
    assert_eq!(s.client.stats().anomalies, 1);
}

#[test]
fn wait_event_subscribes_when_called_not_when_first_polled() {
    let mut s = session(Builder::new());
    let wait = s.client.wait_event("STOP", |_| true, None);
    s.srv.send(&event("STOP", 1));
    s.pool.run_until_stalled();
    // First polled only now, after the event went by.
    let ev = wait.now_or_never().expect("the event was queued").unwrap();
    assert_eq!(ev.data.unwrap().get(), r#"{"n": 1}"#);
}

#[test]
fn waiting_reports_lost_events_instead_of_missing_the_one_awaited() {
    let mut s = session(Builder::new().event_queue(2));
    let wait = s.client.wait_event("STOP", |e| e.data.is_none(), None);
    for n in 0..5 {
        s.srv.send(&event("STOP", n));
    }
    s.pool.run_until_stalled();
    let e = wait.now_or_never().expect("lag is reported").unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Lagged,
            None,
            "3 events were lost while waiting (dropped from the full queue, or unreadable); the \
             one awaited may be among them"
        )
    );
}

#[test]
fn a_message_too_large_to_read_counts_as_a_lost_event() {
    let mut s = session(Builder::new().max_message_size(200));
    let mut stream = s.client.subscribe("BLOCK_JOB_COMPLETED");
    let wait = s.client.wait_event("BLOCK_JOB_COMPLETED", |_| true, None);
    // Too large for the limit, with no id to read: for all anyone knows, the awaited event.
    s.srv.send(&format!(
        "{{\"event\": \"BLOCK_JOB_COMPLETED\", \"data\": {{\"pad\": \"{}\"}}}}\r\n",
        "x".repeat(300)
    ));
    s.srv.send(&event("BLOCK_JOB_COMPLETED", 1));
    s.pool.run_until_stalled();
    let e = wait
        .now_or_never()
        .expect("the loss is reported")
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.to_string().as_str()),
        (
            ErrorKind::Lagged,
            "1 events were lost while waiting (dropped from the full queue, or unreadable); the \
             one awaited may be among them"
        )
    );
    assert_eq!(
        items(&mut stream),
        ["Lagged(1)", "BLOCK_JOB_COMPLETED {\"n\": 1}"]
    );
    // A reply too large to read names its command, which fails: no event was lost.
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    s.srv.send(&format!(
        "{{\"return\": \"{}\", \"id\": 1}}\r\n",
        "x".repeat(300)
    ));
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::ReplyLost, Some(SendStatus::Unanswered))
    );
    assert_eq!(items(&mut stream), Vec::<String>::new());
}

#[test]
fn a_message_of_no_known_shape_fails_the_call_it_names_or_counts_as_a_lost_event() {
    let mut s = session(Builder::new());
    let mut stream = s.client.subscribe("STOP");
    let wait = s.client.wait_event("STOP", |_| true, None);
    // Valid JSON, but no event: for all anyone knows, the awaited one.
    s.srv
        .send("{\"event\": \"STOP\", \"timestamp\": \"now\"}\r\n");
    s.pool.run_until_stalled();
    let e = wait.now_or_never().expect("the loss is reported");
    assert_eq!(e.unwrap_err().kind(), ErrorKind::Lagged);
    assert_eq!(items(&mut stream), ["Lagged(1)"]);
    // Nor a reply, but it names its command, which fails at once: no event was lost.
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    s.srv.send("{\"error\": \"no\", \"id\": 1}\r\n");
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::ReplyLost, Some(SendStatus::Unanswered))
    );
    assert_eq!(items(&mut stream), Vec::<String>::new());
    assert_eq!(s.client.stats().anomalies, 2);
}

#[test]
fn a_lost_event_is_reported_where_it_was_lost() {
    // An unreadable message between two events may have been an event: a subscriber that
    // rebuilds its state on Lagged must see it after the first event, not before.
    let mut s = session(Builder::new());
    let mut stream = s.client.subscribe("STOP");
    let mut small = s.client.subscribe_with_capacity("STOP", 2);
    s.srv.send(&event("STOP", 1));
    s.srv.send("{\"event\": nope}\r\n");
    s.srv.send(&event("STOP", 2));
    s.pool.run_until_stalled();
    assert_eq!(
        items(&mut stream),
        ["STOP {\"n\": 1}", "Lagged(1)", "STOP {\"n\": 2}"]
    );
    assert_eq!(small.len(), 2);
    // A full queue drops its oldest event; a loss noted before that event moves up with it.
    s.srv.send(&event("STOP", 3));
    s.pool.run_until_stalled();
    assert_eq!(
        items(&mut small),
        ["Lagged(2)", "STOP {\"n\": 2}", "STOP {\"n\": 3}"]
    );
}

#[test]
fn random_mixes_of_events_losses_and_reads_keep_order_count_and_place() {
    // Seeded runs of: an event, a message that cannot be read, or a read of a few items,
    // against queues of 1 to 4 events. Whatever is dropped, the stream must say so.
    for seed in 0..300 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let cap = rng.usize(1..5);
        let mut s = session(Builder::new());
        let mut stream = s.client.subscribe_with_capacity("STOP", cap);
        let (mut events, mut unreadable) = (0u64, 0u64);
        // For each unreadable message, how many events went before it.
        let mut marks = Vec::new();
        let mut got = Vec::new();
        for _ in 0..rng.usize(1..60) {
            match rng.u8(0..3) {
                0 => {
                    events += 1;
                    s.srv.send(&event("STOP", u32::try_from(events).unwrap()));
                }
                1 => {
                    unreadable += 1;
                    marks.push(events);
                    s.srv.send("{\"event\": nope}\r\n");
                }
                _ => {
                    s.pool.run_until_stalled();
                    assert!(stream.len() <= cap, "seed {seed}");
                    for _ in 0..rng.usize(0..3) {
                        match stream.recv().now_or_never().flatten() {
                            Some(item) => got.push(item),
                            None => break,
                        }
                    }
                }
            }
        }
        s.pool.run_until_stalled();
        got.extend(std::iter::from_fn(|| {
            stream.recv().now_or_never().flatten()
        }));
        // Each item as (event number, 0) or (0, lost count).
        let seen: Vec<(u64, u64)> = got
            .iter()
            .map(|item| match item {
                EventItem::Event(ev) => {
                    let data: serde_json::Value = ev.data().unwrap();
                    (data["n"].as_u64().unwrap(), 0)
                }
                EventItem::Lagged(k) => (0, *k),
                other => panic!("seed {seed}: {other:?}"),
            })
            .collect();
        let delivered: Vec<u64> = seen.iter().map(|s| s.0).filter(|&n| n > 0).collect();
        assert!(
            delivered.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: {seen:?}"
        );
        let lost: u64 = seen.iter().map(|s| s.1).sum();
        assert_eq!(
            lost + delivered.len() as u64,
            events + unreadable,
            "seed {seed}: {seen:?}"
        );
        // A loss between two events that both arrived is reported between them.
        for &m in &marks {
            let at = |n: u64| seen.iter().position(|s| s.0 == n);
            // Before any event, the stream's start stands for event 0.
            let after = if m == 0 {
                Some(0)
            } else {
                at(m).map(|a| a + 1)
            };
            if let (Some(a), Some(b)) = (after, at(m + 1)) {
                assert!(
                    seen[a..b].iter().any(|s| s.1 > 0),
                    "seed {seed}: loss after event {m} not reported before {}: {seen:?}",
                    m + 1
                );
            }
        }
    }
}

#[test]
fn a_loss_during_the_handshake_is_reported_in_its_place_too() {
    let before = format!("{}{{\"event\": nope}}\r\n", event("STOP", 1));
    assert_eq!(
        early_items(Builder::new(), &before, &event("STOP", 2)),
        ["STOP {\"n\": 1}", "Lagged(1)", "STOP {\"n\": 2}"]
    );
}

/// What a STOP subscriber made right after a handshake that read `before` and `after` (see
/// [`handshake_with_events`]) gets, once the driver has run.
fn early_items(builder: Builder, before: &str, after: &str) -> Vec<String> {
    let (mut pool, _sp, _srv, client, conn) = handshake_with_events(builder, before, after);
    let mut stream = client.subscribe("STOP");
    pool.spawner()
        .spawn_local(async move { drop(conn.await) })
        .unwrap();
    pool.run_until_stalled();
    items(&mut stream)
}

#[test]
fn unreadable_messages_during_the_handshake_do_not_push_events_out() {
    // Kept as one count between the events, not as room taken from them.
    let before = format!("{}{}", event("STOP", 1), "{\"event\": nope}\r\n".repeat(5));
    assert_eq!(
        early_items(Builder::new().event_queue(2), &before, &event("STOP", 2)),
        ["STOP {\"n\": 1}", "Lagged(5)", "STOP {\"n\": 2}"]
    );
}

#[test]
fn an_unreadable_message_during_the_handshake_counts_as_a_lost_event() {
    let (mut pool, _sp, _srv, client, conn) =
        handshake_with_events(Builder::new(), "{\"event\": nope}\r\n", &event("STOP", 1));
    let mut stream = client.subscribe("STOP");
    let mut other = client.subscribe("RESUME");
    pool.spawner()
        .spawn_local(async move { drop(conn.await) })
        .unwrap();
    pool.run_until_stalled();
    assert_eq!(items(&mut stream), ["Lagged(1)", "STOP {\"n\": 1}"]);
    assert_eq!(items(&mut other), ["Lagged(1)"]);
}

#[test]
fn execute_then_wait_after_the_reply_reports_the_command_as_answered() {
    let mut s = session(Builder::new());
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move {
        c.execute_then_wait::<serde::de::IgnoredAny, _>(
            "device_del",
            &serde_json::json!({"id": "d0"}),
            "DEVICE_DELETED",
            |_| true,
            Some(Duration::from_secs(5)),
        )
        .await
    });
    s.pool.run_until_stalled();
    assert_eq!(
        s.srv.take(),
        r#"{"execute":"device_del","arguments":{"id":"d0"},"id":1}"#
    );
    s.srv.send(r#"{"return": {}, "id": 1}"#);
    s.pool.run_until_stalled();
    s.srv.hang_up();
    let e = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.command(), e.send_status()),
        (
            ErrorKind::Disconnected,
            Some("device_del"),
            Some(SendStatus::Answered)
        )
    );
}

#[test]
fn execute_then_wait_bounds_the_command_itself_by_its_timeout() {
    let mut s = session(Builder::new());
    let mut call = stop_then_wait_for_stop(&s, Duration::from_secs(3));
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"stop","id":1}"#);
    s.timer.advance(Duration::from_secs(3));
    let e = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.command(), e.send_status()),
        (
            ErrorKind::Timeout,
            Some("stop"),
            Some(SendStatus::Unanswered)
        )
    );
}

#[test]
fn timeouts_too_long_to_represent_mean_no_timeout_not_a_panic() {
    let mut s = session(Builder::new().command_timeout(Duration::MAX));
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move {
        c.execute_timeout::<u32, _>("x", &(), Duration::MAX).await
    });
    let c = s.client.clone();
    let mut wait = spawn(&s.sp, async move {
        c.wait_event("STOP", |_| true, Some(Duration::MAX)).await
    });
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    s.timer.advance(Duration::from_secs(1 << 40));
    assert!(done(&mut s.pool, &mut call).is_none());
    assert!(done(&mut s.pool, &mut wait).is_none());
    s.srv.send(r#"{"return": 5, "id": 1}"#);
    s.srv.send(&event("STOP", 1));
    assert_eq!(done(&mut s.pool, &mut call).unwrap().unwrap(), 5);
    assert_eq!(done(&mut s.pool, &mut wait).unwrap().unwrap().name, "STOP");
    let c = s.client.clone();
    let mut closing = spawn(
        &s.sp,
        async move { c.close_gracefully(Duration::MAX).await },
    );
    assert_eq!(done(&mut s.pool, &mut closing), Some(()));
}

#[test]
fn a_dropped_close_gracefully_calls_the_close_off() {
    let mut s = session(Builder::new());
    let mut a = s.call("a");
    s.pool.run_until_stalled();
    let c = s.client.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut closing = spawn(&s.sp, async move {
        let close = std::pin::pin!(c.close_gracefully(Duration::from_secs(10)));
        futures_util::future::select(close, stopped).await;
    });
    assert!(done(&mut s.pool, &mut closing).is_none());
    let mut refused = s.call("b");
    assert_eq!(
        done(&mut s.pool, &mut refused).unwrap().unwrap_err().kind(),
        ErrorKind::Closed
    );
    stop.send(()).unwrap();
    assert_eq!(done(&mut s.pool, &mut closing), Some(()));
    assert!(!s.client.is_closed());
    let mut b = s.call("b");
    s.pool.run_until_stalled();
    assert_eq!(
        s.srv.take(),
        r#"{"execute":"a","id":1}{"execute":"b","id":2}"#
    );
    s.srv
        .send(r#"{"return": 1, "id": 1}{"return": 2, "id": 2}"#);
    assert_eq!(done(&mut s.pool, &mut a).unwrap().unwrap().get(), "1");
    assert_eq!(done(&mut s.pool, &mut b).unwrap().unwrap().get(), "2");
}

#[test]
fn a_dropped_close_gracefully_leaves_another_one_draining() {
    let mut s = session(Builder::new());
    let mut a = s.call("a");
    s.pool.run_until_stalled();
    let c = s.client.clone();
    let mut long = spawn(&s.sp, async move {
        c.close_gracefully(Duration::from_secs(60)).await
    });
    let c = s.client.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut short = spawn(&s.sp, async move {
        let close = std::pin::pin!(c.close_gracefully(Duration::from_secs(10)));
        futures_util::future::select(close, stopped).await;
    });
    assert!(done(&mut s.pool, &mut long).is_none());
    assert!(done(&mut s.pool, &mut short).is_none());
    stop.send(()).unwrap();
    assert_eq!(done(&mut s.pool, &mut short), Some(()));
    // The remaining close still refuses new commands...
    let mut refused = s.call("b");
    assert_eq!(
        done(&mut s.pool, &mut refused)
            .unwrap()
            .unwrap_err()
            .to_string(),
        "b: the connection is closing (not sent)"
    );
    // ...and closes as soon as the last pending command has finished, not at its timeout.
    s.srv.send(r#"{"return": 1, "id": 1}"#);
    assert_eq!(done(&mut s.pool, &mut a).unwrap().unwrap().get(), "1");
    assert_eq!(done(&mut s.pool, &mut long), Some(()));
    assert!(s.client.is_closed());
    assert_eq!(s.srv.take(), r#"{"execute":"a","id":1}"#);
}

#[test]
fn builder_qga_keeps_the_settings_made_before_it() {
    let config = Builder::new()
        .max_queued(3)
        .max_message_size(4096)
        .command_timeout(Duration::from_secs(4))
        .qga()
        .config()
        .clone();
    assert!(matches!(config.mode, qmp_client::Mode::Qga { .. }));
    assert_eq!(
        (
            config.max_queued,
            config.max_message_size,
            config.command_timeout,
            config.capabilities.len()
        ),
        (3, 4096, Some(Duration::from_secs(4)), 0)
    );
}

#[test]
fn event_filters_from_owned_and_borrowed_strings() {
    let name = String::from("STOP");
    for f in [qmp_client::EventFilter::from(&name), name.clone().into()] {
        assert!(f.matches("STOP"));
        assert!(!f.matches("RESUME"));
    }
}

#[test]
fn builder_capabilities_choose_what_is_negotiated() {
    let Handshaking {
        mut pool,
        sp,
        srv,
        mut hs,
        ..
    } = handshaking(Builder::new().capabilities(Vec::<String>::new()));
    srv.greet();
    assert!(done(&mut pool, &mut hs).is_none());
    // The server offers oob; none was asked for.
    assert_eq!(srv.take(), r#"{"execute":"qmp_capabilities","id":0}"#);
    srv.send("{\"return\": {}, \"id\": 0}\r\n");
    let (client, conn) = done(&mut pool, &mut hs).unwrap().unwrap();
    let _driver = spawn(&sp, conn);
    assert!(client.capabilities().is_empty());
    let c = client.clone();
    let mut oob = spawn(&sp, async move { c.exec_oob::<u32, _>("x", &()).await });
    assert_eq!(
        failed(&mut pool, &mut oob),
        (ErrorKind::Unsupported, Some(SendStatus::NotSent))
    );
}

#[test]
fn a_subscriber_that_never_reads_slows_neither_replies_nor_other_subscribers() {
    let mut s = session(Builder::new());
    let _stuck = s.client.subscribe_with_capacity("STOP", 1);
    let mut other = s.client.subscribe("STOP");
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    let mut burst: String = (0..500).map(|n| event("STOP", n)).collect();
    burst.push_str(r#"{"return": 3, "id": 1}"#);
    s.srv.send(&burst);
    assert_eq!(done(&mut s.pool, &mut call).unwrap().unwrap().get(), "3");
    let mut seen = 0;
    while let Some(Some(item)) = futures_util::StreamExt::next(&mut other).now_or_never() {
        assert!(matches!(item, EventItem::Event(_)), "{item:?}");
        seen += 1;
    }
    assert_eq!(seen, 500);
}

#[test]
fn a_transport_error_ends_the_session_and_the_driver_reports_it_whole() {
    let mut s = session(Builder::new());
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    s.srv
        .fail_reads(std::io::Error::from_raw_os_error(5 /* EIO */));
    // Not the peer's doing: the callers are told the connection failed, not that QEMU left.
    let e = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Io,
            Some(SendStatus::Unanswered),
            "x: the connection failed (sent, but no reply came)"
        )
    );
    assert_eq!(
        driver_os_error(&mut s),
        Some(5),
        "the OS error code is kept"
    );
    assert!(s.client.is_closed());
}

/// The OS error code of the transport error the finished driver returned.
fn driver_os_error(s: &mut Session) -> Option<i32> {
    let e = done(&mut s.pool, &mut s.driver).unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("the io::Error is the source")
        .raw_os_error()
}

#[test]
fn a_failed_flush_ends_the_session_as_a_failed_write_does() {
    let mut s = session(Builder::new());
    s.srv
        .fail_flushes(std::io::Error::from_raw_os_error(5 /* EIO */));
    let mut call = s.call("x");
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::Io, Some(SendStatus::Unanswered))
    );
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    assert_eq!(driver_os_error(&mut s), Some(5));
    assert!(s.client.is_closed());
}

#[test]
fn the_first_transport_error_is_the_one_the_driver_reports() {
    let mut s = session(Builder::new());
    s.srv.block_flushes();
    let mut call = s.call("x");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"x","id":1}"#);
    // A read fails, then (in the same turn) the flush still waiting does too.
    s.srv
        .fail_reads(std::io::Error::from_raw_os_error(5 /* EIO */));
    s.srv
        .fail_flushes(std::io::Error::from_raw_os_error(28 /* ENOSPC */));
    assert_eq!(
        failed(&mut s.pool, &mut call),
        (ErrorKind::Io, Some(SendStatus::Unanswered))
    );
    assert_eq!(driver_os_error(&mut s), Some(5), "the first error ended it");
}

#[test]
fn a_full_local_queue_refuses_a_command_unsent_and_the_queue_drains_in_order() {
    let mut s = session(Builder::new().max_in_flight(1).max_queued(1));
    let mut a = s.call("a");
    let mut b = s.call("b");
    let mut third = s.call("c");
    s.pool.run_until_stalled();
    assert_eq!(s.srv.take(), r#"{"execute":"a","id":1}"#);
    let e = done(&mut s.pool, &mut third).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.command()),
        (ErrorKind::QueueFull, Some(SendStatus::NotSent), Some("c"))
    );
    s.srv.send(r#"{"return": 1, "id": 1}"#);
    assert_eq!(done(&mut s.pool, &mut a).unwrap().unwrap().get(), "1");
    assert_eq!(s.srv.take(), r#"{"execute":"b","id":2}"#);
    s.srv.send(r#"{"return": 2, "id": 2}"#);
    assert_eq!(done(&mut s.pool, &mut b).unwrap().unwrap().get(), "2");
}

#[test]
fn run_with_a_no_reply_command_returns_null_once_written() {
    let mut s = session(Builder::new());
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move {
        c.run::<()>(qmp_client::Command::new("guest-shutdown").no_reply())
            .await
    });
    assert_eq!(done(&mut s.pool, &mut call).unwrap().unwrap(), ());
    assert_eq!(s.srv.take(), r#"{"execute":"guest-shutdown","id":1}"#);
}

#[test]
fn a_no_reply_command_read_as_a_value_fails_as_unanswered() {
    let mut s = session(Builder::new());
    let c = s.client.clone();
    let mut call = spawn(&s.sp, async move {
        c.run::<u32>(qmp_client::Command::new("guest-shutdown").no_reply())
            .await
    });
    let e = done(&mut s.pool, &mut call).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Decode,
            Some(SendStatus::Unanswered),
            "guest-shutdown: the command sends no reply, so there is no value of the expected \
             type: invalid type: null, expected u32 at line 1 column 4"
        )
    );
}

#[test]
fn a_wait_for_an_event_ended_by_the_peer_has_no_send_status() {
    let mut s = session(Builder::new());
    let c = s.client.clone();
    let mut wait = spawn(
        &s.sp,
        async move { c.wait_event("STOP", |_| true, None).await },
    );
    assert!(done(&mut s.pool, &mut wait).is_none());
    s.srv.hang_up();
    let e = done(&mut s.pool, &mut wait).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Disconnected,
            None,
            "the peer closed the connection while waiting for an event"
        )
    );
    assert!(!e.is_not_sent());
}

#[test]
fn dropping_the_last_client_closes_the_session() {
    let (s, conn) = unspawned(Builder::new());
    let Session {
        mut pool,
        sp,
        client,
        srv,
        ..
    } = s;
    let mut driver = spawn(&sp, conn);
    let clone = client.clone();
    let mut events = client.subscribe("STOP");
    drop(client);
    assert!(done(&mut pool, &mut driver).is_none(), "a clone holds it");
    // The clone still works.
    let c = clone.clone();
    let mut call = spawn(&sp, async move { c.execute_raw("query-status", &()).await });
    pool.run_until_stalled();
    assert_eq!(srv.take(), r#"{"execute":"query-status","id":1}"#);
    srv.send(&format!(
        "{{\"return\": {{}}, \"id\": 1}}\r\n{}",
        event("STOP", 1)
    ));
    assert_eq!(done(&mut pool, &mut call).unwrap().unwrap().get(), "{}");
    assert!(!srv.client_closed());
    // A stream does not hold the session: it ends after what it holds.
    drop(clone);
    assert!(matches!(done(&mut pool, &mut driver), Some(Ok(()))));
    assert!(srv.client_closed());
    assert_eq!(srv.take(), "");
    assert_eq!(items(&mut events), ["STOP {\"n\": 1}", "Closed(Local)"]);
}

/// What a stream holds now: events as `NAME DATA`, other items as their `Debug`.
fn items(s: &mut qmp_client::EventStream) -> Vec<String> {
    std::iter::from_fn(|| s.recv().now_or_never().flatten())
        .map(|item| match item {
            EventItem::Event(ev) => format!("{} {}", ev.name, ev.data.unwrap().get()),
            other => format!("{other:?}"),
        })
        .collect()
}

/// A handshake in which the server sends `before`, the negotiation reply and `after` in one
/// read; returns the client and its driver, not yet spawned.
fn handshake_with_events(
    builder: Builder,
    before: &str,
    after: &str,
) -> (
    LocalPool,
    LocalSpawner,
    Server,
    Client,
    qmp_client::Connection,
) {
    let Handshaking {
        mut pool,
        sp,
        srv,
        timer: _timer,
        mut hs,
    } = handshaking(builder);
    srv.greet();
    assert!(done(&mut pool, &mut hs).is_none());
    assert_eq!(srv.take(), NEGOTIATE);
    srv.send(&format!(
        "{before}{{\"return\": {{}}, \"id\": 0}}\r\n{after}"
    ));
    let (client, conn) = done(&mut pool, &mut hs).unwrap().unwrap();
    (pool, sp, srv, client, conn)
}

#[test]
fn events_read_during_the_handshake_reach_streams_subscribed_before_the_driver_runs() {
    // QEMU may emit events before the negotiation reply; more come in the same read. Of
    // these four, three are kept (the queue size): the oldest goes, and is reported.
    let (mut pool, sp, srv, client, conn) = handshake_with_events(
        Builder::new().event_queue(3),
        &format!("{}{}", event("A", 0), event("A", 1)),
        &format!("{}{}", event("B", 2), event("B", 3)),
    );
    // Read in the driver's first turn, after the kept ones.
    srv.send(&event("B", 4));
    let mut all = client.subscribe_with_capacity(qmp_client::EventFilter::all(), 8);
    let mut only_b = client.subscribe("B");
    // A wait counts only events that come after it is made, not the kept ones. It subscribes
    // when first polled: before the driver runs.
    let c = client.clone();
    let mut wait = spawn(&sp, async move {
        c.wait_event("B", |_| true, None)
            .await
            .map(|e| e.data.unwrap().get().to_owned())
    });
    pool.run_until_stalled();
    let mut driver = spawn(&sp, conn);
    pool.run_until_stalled();
    let mut late = client.subscribe(qmp_client::EventFilter::all());
    assert_eq!(
        items(&mut all),
        [
            "Lagged(1)",
            "A {\"n\": 1}",
            "B {\"n\": 2}",
            "B {\"n\": 3}",
            "B {\"n\": 4}"
        ]
    );
    // The dropped event was an A: nothing lost for this one.
    assert_eq!(
        items(&mut only_b),
        ["B {\"n\": 2}", "B {\"n\": 3}", "B {\"n\": 4}"]
    );
    assert_eq!(done(&mut pool, &mut wait).unwrap().unwrap(), "{\"n\": 4}");
    assert_eq!(late.len(), 0);
    // From then on, events go to the streams there are when they arrive.
    srv.send(&event("C", 5));
    pool.run_until_stalled();
    assert_eq!(items(&mut late), ["C {\"n\": 5}"]);
    assert_eq!(items(&mut all), ["C {\"n\": 5}"]);
    assert_eq!(client.stats().events, 6);
    drop(client);
    assert!(matches!(done(&mut pool, &mut driver), Some(Ok(()))));
}

#[test]
fn a_stream_waiting_for_kept_events_is_woken_by_their_loss() {
    // One event kept (B), one dropped (A): the A stream gets only the loss, and must wake.
    let (mut pool, sp, _srv, client, conn) = handshake_with_events(
        Builder::new().event_queue(1),
        &format!("{}{}", event("A", 0), event("B", 1)),
        "",
    );
    let mut a = client.subscribe("A");
    let mut first = spawn(&sp, async move { a.recv().await });
    assert!(done(&mut pool, &mut first).is_none(), "parked");
    let _driver = spawn(&sp, conn);
    assert_eq!(
        done(&mut pool, &mut first),
        Some(Some(EventItem::Lagged(1)))
    );
}

#[test]
fn kept_events_lost_under_many_names_and_a_close_before_the_driver_runs() {
    // Queue size 1: of 66 events with distinct names, the last is kept; 64 names are counted
    // one by one, the 65th only as "some other event".
    let sent: String = (0..66).map(|i| event(&format!("N{i}"), i)).collect();
    let (mut pool, sp, srv, client, conn) =
        handshake_with_events(Builder::new().event_queue(1), &sent, "");
    let mut all = client.subscribe(qmp_client::EventFilter::all());
    let mut first = client.subscribe("N0");
    let mut kept = client.subscribe("N65");
    let mut beyond = client.subscribe("N64");
    // The last client goes before the driver ever ran: the kept events are still handed out,
    // then the streams end.
    drop(client);
    let last = "N65 {\"n\": 65}";
    assert_eq!(items(&mut all), ["Lagged(65)", last, "Closed(Local)"]);
    assert_eq!(items(&mut first), ["Lagged(2)", "Closed(Local)"]);
    assert_eq!(items(&mut kept), ["Lagged(1)", last, "Closed(Local)"]);
    assert_eq!(items(&mut beyond), ["Lagged(1)", "Closed(Local)"]);
    let mut driver = spawn(&sp, conn);
    assert!(matches!(done(&mut pool, &mut driver), Some(Ok(()))));
    assert!(srv.client_closed());
}

/// A task that its waker polls at once, inside `wake`, on the waking thread (as some executors
/// do). A wake that comes while it is being polled makes it poll again after.
struct Inline {
    fut: std::sync::Mutex<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>>,
    again: std::sync::atomic::AtomicBool,
}

impl std::task::Wake for Inline {
    fn wake(self: std::sync::Arc<Self>) {
        Self::run(&self);
    }
}

impl Inline {
    fn start(fut: impl Future<Output = ()> + Send + 'static) -> std::sync::Arc<Self> {
        let task = std::sync::Arc::new(Self {
            fut: std::sync::Mutex::new(Some(Box::pin(fut))),
            again: std::sync::atomic::AtomicBool::new(false),
        });
        Self::run(&task);
        task
    }

    fn run(this: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        this.again.store(true, SeqCst);
        let Ok(mut slot) = this.fut.try_lock() else {
            return;
        };
        let waker = std::task::Waker::from(std::sync::Arc::clone(this));
        while this.again.swap(false, SeqCst) {
            if let Some(fut) = slot.as_mut()
                && fut
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(&waker))
                    .is_ready()
            {
                *slot = None;
            }
        }
    }

    fn finished(&self) -> bool {
        self.fut.lock().unwrap().is_none()
    }
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn note(log: &Log, line: String) {
    log.lock().unwrap().push(line);
}

/// Runs `f` on a thread of its own and returns what it logged. A deadlock fails the test after
/// a while instead of hanging it (the thread is left blocked); a panic is passed on.
fn logged_on_a_thread(f: impl FnOnce(&Log) + Send + 'static) -> Vec<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let log = Log::default();
        f(&log);
        let _ = tx.send(std::mem::take(&mut *log.lock().unwrap()));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(log) => log,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(thread.join().expect_err("it sent nothing: it panicked"))
        }
        Err(timeout) => panic!("the thread is stuck (a deadlock): {timeout}"),
    }
}

/// An event stream's items as `NAME DATA`, or `Debug`, with `pending()` read when each came.
fn log_stream(
    log: &Log,
    client: &Client,
    mut events: qmp_client::EventStream,
) -> impl Future<Output = ()> + Send + 'static {
    let (c, l) = (client.clone(), log.clone());
    async move {
        while let Some(item) = events.recv().await {
            let item = match item {
                EventItem::Event(ev) => format!("{} {}", ev.name, ev.data.unwrap().get()),
                other => format!("{other:?}"),
            };
            note(&l, format!("{item} pending={}", c.pending()));
        }
        note(&l, "stream ended".into());
    }
}

#[test]
fn an_executor_polling_inside_wake_finds_the_session_unlocked() {
    // Every task here, the driver included, is polled inside the `wake` that concerns it, and
    // locks the session (a `Client` method) as soon as it runs. Had anything woken a task
    // under the session's lock, the thread would deadlock.
    let log = logged_on_a_thread(|log| {
        let two = format!("{}{}", event("A", 1), event("A", 2));
        let (_pool, _sp, srv, client, conn) =
            handshake_with_events(Builder::new().event_queue(1), &two, "");
        // Waits for the events kept from the handshake: the driver's first turn wakes it.
        let stream = Inline::start(log_stream(log, &client, client.subscribe("A")));
        let (c, l, peer) = (client.clone(), log.clone(), srv.clone());
        let closed = Inline::start(async move {
            c.closed().await;
            let shut = peer.client_closed();
            note(
                &l,
                format!("closed() is_closed={} shut={shut}", c.is_closed()),
            );
        });
        let l = log.clone();
        let driver = Inline::start(async move {
            let end = conn.await;
            note(&l, format!("driver {end:?}"));
        });
        assert!(!stream.finished());

        // A reply, and a command that wakes the driver.
        let (c, l) = (client.clone(), log.clone());
        let call = Inline::start(async move {
            let r = c.execute_raw("query-status", &()).await.unwrap();
            note(&l, format!("reply {} pending={}", r.get(), c.pending()));
        });
        assert_eq!(srv.take(), r#"{"execute":"query-status","id":1}"#);
        srv.send("{\"return\": {}, \"id\": 1}\r\n");
        assert!(call.finished());

        // A call dropped from outside the task that polls it: its channel wakes that task.
        type Pending =
            std::pin::Pin<Box<dyn Future<Output = Result<qmp_client::RawJson, Error>> + Send>>;
        let c = client.clone();
        let slow: Pending = Box::pin(async move { c.execute_raw("slow", &()).await });
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(slow)));
        let (s, c, l) = (slot.clone(), client.clone(), log.clone());
        let poller = Inline::start(async move {
            let polled = futures_util::future::poll_fn(|cx| match s.lock().unwrap().as_mut() {
                Some(call) => call.as_mut().poll(cx).map(|r| r.is_ok()),
                None => std::task::Poll::Ready(false),
            });
            let answered = polled.await;
            let (pending, wire) = (c.pending(), c.in_flight());
            note(
                &l,
                format!("slow answered={answered} pending={pending} in_flight={wire}"),
            );
        });
        assert_eq!(srv.take(), r#"{"execute":"slow","id":2}"#);
        let call = slot.lock().unwrap().take();
        drop(call);
        assert!(poller.finished());

        // The peer goes: the stream ends, the driver finishes.
        srv.hang_up();
        assert!(stream.finished() && closed.finished() && driver.finished());
        assert!(srv.client_closed());
    });
    assert_eq!(
        log,
        [
            "Lagged(1) pending=0",
            r#"A {"n": 2} pending=0"#,
            "reply {} pending=0",
            // Abandoned, yet on the wire until its reply comes (to be discarded).
            "slow answered=false pending=0 in_flight=1",
            "Closed(PeerClosed) pending=0",
            "stream ended",
            "closed() is_closed=true shut=true",
            "driver Ok(())",
        ]
    );
}

#[test]
fn the_last_client_dropped_or_a_graceful_close_inside_wake_finds_the_session_unlocked() {
    let log = logged_on_a_thread(|log| {
        // The stream's task holds the last `Client`, and drops it once woken by an event.
        let (s, conn) = unspawned(Builder::new());
        let l = log.clone();
        let driver = Inline::start(async move {
            let end = conn.await;
            note(&l, format!("driver {end:?}"));
        });
        let mut events = s.client.subscribe("STOP");
        let (c, l) = (s.client, log.clone());
        let stream = Inline::start(async move {
            let Some(EventItem::Event(ev)) = events.recv().await else {
                panic!("the event comes first");
            };
            note(&l, format!("{} pending={}", ev.name, c.pending()));
            drop(c);
            note(&l, format!("then {:?}", events.recv().await));
        });
        s.srv.send(&event("STOP", 1));
        assert!(stream.finished() && driver.finished());
        assert!(s.srv.client_closed());

        // A graceful close woken by the last reply, then by the driver's end.
        let (s, conn) = unspawned(Builder::new());
        let l = log.clone();
        let driver = Inline::start(async move {
            let end = conn.await;
            note(&l, format!("driver {end:?}"));
        });
        let (c, l) = (s.client.clone(), log.clone());
        let call = Inline::start(async move {
            let r = c.execute_raw("a", &()).await;
            note(&l, format!("a: {}", r.unwrap().get()));
        });
        assert_eq!(s.srv.take(), r#"{"execute":"a","id":1}"#);
        let (c, l) = (s.client.clone(), log.clone());
        let closing = Inline::start(async move {
            c.close_gracefully(Duration::from_secs(10)).await;
            let (closed, pending) = (c.is_closed(), c.pending());
            note(&l, format!("closed={closed} pending={pending}"));
        });
        assert!(!closing.finished());
        s.srv.send(r#"{"return": 1, "id": 1}"#);
        assert!(call.finished() && closing.finished() && driver.finished());
        assert!(s.srv.client_closed());
    });
    assert_eq!(
        log,
        [
            "STOP pending=0",
            "then Some(Closed(Local))",
            "driver Ok(())",
            // The last reply, then the close it let go on.
            "a: 1",
            "closed=true pending=0",
            "driver Ok(())",
        ]
    );
}

/// A waker that logs, once dropped, what a `Client` method returns then; or that panics when
/// woken.
struct Probe {
    log: Log,
    client: std::sync::Mutex<Option<Client>>,
    panics: bool,
}

impl std::task::Wake for Probe {
    fn wake(self: std::sync::Arc<Self>) {
        assert!(!self.panics, "a waker that panics");
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(c) = self.client.lock().unwrap().take() {
            note(&self.log, format!("waker dropped, pending={}", c.pending()));
        }
    }
}

#[test]
fn a_waker_the_session_replaces_is_dropped_unlocked() {
    let log = logged_on_a_thread(|log| {
        // No timer either: only the pipe and the session keep the driver's waker.
        let (s, mut conn) = unspawned(Builder::new().handshake_timeout(None));
        let first = std::task::Waker::from(std::sync::Arc::new(Probe {
            log: log.clone(),
            client: std::sync::Mutex::new(Some(s.client.clone())),
            panics: false,
        }));
        let mut cx = std::task::Context::from_waker(&first);
        assert!(std::pin::Pin::new(&mut conn).poll(&mut cx).is_pending());
        drop(first);
        note(log, "polled again".into());
        // The driver moves to another task: the session drops the first waker, its last copy.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::pin::Pin::new(&mut conn).poll(&mut cx).is_pending());
        note(log, "moved".into());
    });
    assert_eq!(log, ["polled again", "waker dropped, pending=0", "moved"]);
}

#[test]
fn a_waker_that_panics_costs_the_other_callers_nothing() {
    let mut s = session(Builder::new());
    let c = s.client.clone();
    let mut a = Box::pin(async move { c.execute_raw("a", &()).await });
    let panicky = std::task::Waker::from(std::sync::Arc::new(Probe {
        log: Log::default(),
        client: std::sync::Mutex::new(None),
        panics: true,
    }));
    assert!(
        a.as_mut()
            .poll(&mut std::task::Context::from_waker(&panicky))
            .is_pending()
    );
    let mut b = s.call("b");
    s.pool.run_until_stalled();
    assert_eq!(
        s.srv.take(),
        r#"{"execute":"a","id":1}{"execute":"b","id":2}"#
    );
    // Both replies in one read: waking `a` panics in the driver's task, after which `b` has
    // its reply all the same, and so has `a`.
    s.srv
        .send("{\"return\": 1, \"id\": 1}\r\n{\"return\": 2, \"id\": 2}\r\n");
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.pool.run_until_stalled();
    }));
    let panic = run.expect_err("the waker's panic reached the driver's executor");
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"a waker that panics"));
    assert_eq!(done(&mut s.pool, &mut b).unwrap().unwrap().get(), "2");
    let a = a.as_mut().now_or_never().expect("answered");
    assert_eq!(a.unwrap().get(), "1");
}

/// The test pipe with fd passing that fails writes with descriptors with the OS error in
/// `refuse` while it is not 0 (as `sendmsg` does with `ETOOMANYREFS`), and otherwise counts
/// those it passed.
struct FdPipe {
    pipe: support::PipeEnd,
    refuse: std::sync::Arc<std::sync::atomic::AtomicI32>,
    passed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl futures_io::AsyncRead for FdPipe {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl futures_io::AsyncWrite for FdPipe {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.pipe).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.pipe).poll_close(cx)
    }
}

impl qmp_client::rt::FdWrite for FdPipe {
    fn poll_write_fds(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::sync::atomic::Ordering::SeqCst;
        let errno = self.refuse.load(SeqCst);
        if errno != 0 {
            return std::task::Poll::Ready(Err(std::io::Error::from_raw_os_error(errno)));
        }
        self.passed.fetch_add(fds.len(), SeqCst);
        futures_io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.pipe), cx, buf)
    }
}

#[test]
fn descriptors_the_transport_refuses_fail_their_command_alone() {
    use std::sync::atomic::Ordering::SeqCst;
    let too_many = rustix::io::Errno::TOOMANYREFS.raw_os_error();
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(too_many));
    let passed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, p) = (refuse.clone(), passed.clone());
    let (s, conn) = negotiated(handshaking_with(move |pipe, timer| {
        let io = FdPipe {
            pipe,
            refuse: r,
            passed: p,
        };
        Builder::new().handshake_with_fds(io, timer)
    }));
    let Session {
        mut pool,
        sp,
        client,
        srv,
        ..
    } = s;
    let _driver = spawn(&sp, conn);
    let devnull = || std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let getfd = |name: &'static str| {
        let c = client.clone();
        let fd = devnull();
        spawn(&sp, async move {
            let args = serde_json::json!({ "fdname": name });
            c.execute_with_fds::<serde_json::Value, _>("getfd", &args, vec![fd])
                .await
        })
    };
    let mut refused = getfd("a");
    let c = client.clone();
    let mut after = spawn(&sp, async move { c.execute_raw("query-status", &()).await });
    let e = done(&mut pool, &mut refused).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Io,
            Some(SendStatus::NotSent),
            "getfd: the transport refused its file descriptors (not sent)"
        )
    );
    // Nothing of it went out; the command after it did, and the session goes on.
    assert_eq!(srv.take(), r#"{"execute":"query-status","id":2}"#);
    srv.send("{\"return\": {}, \"id\": 2}\r\n");
    assert_eq!(done(&mut pool, &mut after).unwrap().unwrap().get(), "{}");
    refuse.store(0, SeqCst);
    let mut accepted = getfd("b");
    pool.run_until_stalled();
    assert_eq!(
        srv.take(),
        r#"{"execute":"getfd","arguments":{"fdname":"b"},"id":3}"#
    );
    assert_eq!(passed.load(SeqCst), 1);
    srv.send("{\"return\": {}, \"id\": 3}\r\n");
    assert_eq!(
        done(&mut pool, &mut accepted).unwrap().unwrap(),
        serde_json::json!({})
    );
    assert!(!client.is_closed());
    // Any other error on such a write is the transport's: the session ends.
    refuse.store(rustix::io::Errno::IO.raw_os_error(), SeqCst);
    let mut broken = getfd("c");
    let e = done(&mut pool, &mut broken).unwrap().unwrap_err();
    assert_eq!(
        (e.kind(), e.send_status(), e.to_string().as_str()),
        (
            ErrorKind::Io,
            Some(SendStatus::NotSent),
            "getfd: the connection failed (not sent)"
        )
    );
    assert!(client.is_closed());
}
