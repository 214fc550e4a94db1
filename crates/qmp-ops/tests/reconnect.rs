//! The reconnecting executor: a retry after a disconnect runs on a fresh session, and
//! subscribers learn that events may have been missed.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{FakeExec, ManualClock, RecordingSleep};
use futures_channel::oneshot;
use futures_executor::{LocalPool, block_on};
use futures_util::task::LocalSpawnExt;
use futures_util::{StreamExt, future};
use qmp_ops::{
    BoxFuture, ErrorKind, ExecError, Execute, Jitter, Ops, Policy, Reconnected, Reconnecting,
    RetryPolicy, Rule, Sleep,
};
use qmp_proto::{Failure, RawJson};
use serde_json::value::RawValue;

/// A connect function handing out prepared sessions in order, counting the attempts; an
/// exhausted list fails to connect.
#[derive(Clone, Default)]
struct Sessions {
    queue: Arc<Mutex<Vec<Arc<FakeExec>>>>,
    connects: Arc<AtomicUsize>,
}

impl Sessions {
    fn add(&self) -> Arc<FakeExec> {
        let s = FakeExec::new();
        self.queue.lock().unwrap().push(Arc::clone(&s));
        s
    }

    fn connect(&self) -> impl Future<Output = Result<Arc<FakeExec>, String>> + use<> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let next = {
            let mut q = self.queue.lock().unwrap();
            (!q.is_empty()).then(|| q.remove(0))
        };
        async move { next.ok_or_else(|| "connection refused".to_owned()) }
    }
}

/// What a connect function returns here.
type Connected = BoxFuture<'static, Result<Arc<FakeExec>, String>>;

/// A connect function whose first call returns `first()` instead of connecting (later ones
/// take the next of `sessions`), and the count of its calls.
fn first_connect_is(
    sessions: &Sessions,
    first: fn() -> Connected,
) -> (
    impl Fn() -> Connected + Send + Sync + 'static,
    Arc<AtomicUsize>,
) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let (s, a) = (sessions.clone(), Arc::clone(&attempts));
    let connect = move || -> Connected {
        if a.fetch_add(1, Ordering::SeqCst) == 0 {
            first()
        } else {
            Box::pin(s.connect())
        }
    };
    (connect, attempts)
}

fn retry3() -> RetryPolicy {
    RetryPolicy::default().max_attempts(3)
}

#[test]
fn a_retry_after_a_disconnect_runs_on_a_new_session() {
    let sessions = Sessions::default();
    let first = sessions.add();
    let second = sessions.add();
    first.push_err(ExecError::NotSent(Failure::PeerClosed));
    second.push_ok(r#"{"status":"running"}"#);
    let s = sessions.clone();
    let exec = Reconnecting::new(move || s.connect());
    let mut events = exec.subscribe();
    let exec = Arc::new(exec);
    let clock = ManualClock::new(Instant::now());
    let ops = Ops::builder(
        Arc::clone(&exec),
        Policy::deny_all().rule("stop", Rule::allow().retry(retry3())),
        RecordingSleep::new(clock.clone()),
    )
    .clock(clock)
    .seed(3)
    .build();
    assert_eq!(exec.generation(), 0);
    let v = block_on(ops.execute("stop", None)).unwrap();
    assert_eq!(v.get(), r#"{"status":"running"}"#);
    assert_eq!(first.names(), ["stop"]);
    assert_eq!(second.names(), ["stop"]);
    assert_eq!(exec.generation(), 2);
    assert_eq!(sessions.connects.load(Ordering::SeqCst), 2);
    let note: Reconnected = block_on(events.next()).unwrap();
    assert_eq!(note.generation, 2);
}

#[test]
fn an_unknown_outcome_drops_the_session_but_is_not_replayed() {
    let sessions = Sessions::default();
    let first = sessions.add();
    let second = sessions.add();
    first.push_err(ExecError::Unknown(Failure::PeerClosed));
    let s = sessions.clone();
    let exec = Arc::new(Reconnecting::new(move || s.connect()));
    let clock = ManualClock::new(Instant::now());
    let ops = Ops::builder(
        Arc::clone(&exec),
        Policy::deny_all().rule("system_reset", Rule::allow().retry(retry3())),
        RecordingSleep::new(clock),
    )
    .seed(3)
    .build();
    let e = block_on(ops.execute("system_reset", None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unknown);
    assert_eq!(
        second.count(),
        0,
        "a non-idempotent command is not replayed"
    );
    assert!(!exec.is_connected());
    block_on(ops.execute("system_reset", None)).unwrap();
    assert_eq!(second.names(), ["system_reset"]);
    assert_eq!(exec.generation(), 2);
}

#[test]
fn connect_failures_are_not_sent_and_retried() {
    let sessions = Sessions::default();
    let s = sessions.clone();
    let exec = Arc::new(Reconnecting::new(move || s.connect()));
    let clock = ManualClock::new(Instant::now());
    let sleep = RecordingSleep::new(clock.clone());
    let ops = Ops::builder(
        Arc::clone(&exec),
        Policy::deny_all().rule("query-status", Rule::allow().retry(retry3())),
        sleep.clone(),
    )
    .clock(clock)
    .seed(3)
    .build();
    let e = block_on(ops.execute("query-status", None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connect);
    assert_eq!(e.attempts(), 3);
    assert_eq!(sleep.slept().len(), 2);
    assert_eq!(sessions.connects.load(Ordering::SeqCst), 3);
    assert_eq!(
        e.exec_error(),
        Some(&ExecError::Connect("connection refused".into()))
    );
}

#[test]
fn a_healthy_session_is_reused_and_command_errors_keep_it() {
    let sessions = Sessions::default();
    let only = sessions.add();
    only.push_err(ExecError::Command(qmp_proto::CommandError::new(
        qmp_proto::ErrorClass::GenericError,
        "nope",
    )));
    let s = sessions.clone();
    let exec = Reconnecting::new(move || s.connect());
    assert_eq!(
        block_on(exec.execute("a", None)).unwrap_err().to_string(),
        "qemu error: GenericError: nope"
    );
    assert!(block_on(exec.execute("b", None)).is_ok());
    assert_eq!(only.names(), ["a", "b"]);
    assert_eq!(sessions.connects.load(Ordering::SeqCst), 1);
    assert_eq!(exec.generation(), 1);
}

/// A session whose request queue is stuck: without a deadline a call waits for ever; with one,
/// the session's own deadline fires while the request is still queued, so it was not sent.
/// Records the timeouts it was given.
#[derive(Default)]
struct StuckQueue {
    timeouts: Mutex<Vec<Duration>>,
}

impl Execute for StuckQueue {
    fn execute<'a>(
        &'a self,
        _: &'a str,
        _: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        Box::pin(future::pending())
    }

    fn execute_timeout<'a>(
        &'a self,
        _: &'a str,
        _: Option<&'a RawValue>,
        timeout: Duration,
        _: &'a dyn Sleep,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        self.timeouts.lock().unwrap().push(timeout);
        Box::pin(async { Err(ExecError::NotSent(Failure::Timeout)) })
    }
}

/// `Ops` over `exec` allowing only `system_reset`, with a 2 s timeout and three attempts
/// (backoff 100 ms, then 200 ms); and the sleeper that records its waits.
fn timed_reset<E: Execute + 'static>(exec: E) -> (Ops<E>, RecordingSleep) {
    let clock = ManualClock::new(Instant::now());
    let sleep = RecordingSleep::new(clock.clone());
    let rule = Rule::allow()
        .timeout(Duration::from_secs(2))
        .retry(retry3().jitter(Jitter::None));
    let policy = Policy::deny_all().rule("system_reset", rule);
    let ops = Ops::builder(exec, policy, sleep.clone())
        .clock(clock)
        .build();
    (ops, sleep)
}

#[test]
fn a_rule_timeout_uses_the_sessions_own_deadline_so_an_unsent_request_may_be_retried() {
    let session = Arc::new(StuckQueue::default());
    let s = Arc::clone(&session);
    let exec = Reconnecting::new(move || {
        let s = Arc::clone(&s);
        async move { Ok::<_, String>(s) }
    });
    let (ops, sleep) = timed_reset(exec);
    let e = block_on(ops.execute("system_reset", None)).unwrap_err();
    // Not sent each time, so even a non-idempotent command was tried all three times.
    assert_eq!(
        (e.kind(), e.attempts(), e.exec_error()),
        (
            ErrorKind::NotSent,
            3,
            Some(&ExecError::NotSent(Failure::Timeout))
        )
    );
    assert_eq!(
        *session.timeouts.lock().unwrap(),
        [Duration::from_secs(2); 3]
    );
    // Connecting raced the timeout once; then the two backoff delays.
    assert_eq!(
        sleep.slept(),
        [
            Duration::from_secs(2),
            Duration::from_millis(100),
            Duration::from_millis(200)
        ]
    );
}

#[test]
fn a_connect_slower_than_the_rule_timeout_is_not_sent_and_the_retry_connects_again() {
    let sessions = Sessions::default();
    let only = sessions.add();
    only.push_ok(r#"{}"#);
    // The first connect never finishes; the second gets the prepared session.
    let (connect, attempts) = first_connect_is(&sessions, || Box::pin(future::pending()));
    let exec = Arc::new(Reconnecting::new(connect));
    let (ops, sleep) = timed_reset(Arc::clone(&exec));
    let v = block_on(ops.execute("system_reset", None)).unwrap();
    assert_eq!(v.get(), "{}");
    assert_eq!(only.names(), ["system_reset"]);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(exec.generation(), 1);
    // The first attempt's timeout cut its connect short; after the backoff, the second
    // attempt's connect and then its command (the fake has no deadline of its own) each raced
    // the timeout.
    assert_eq!(
        sleep.slept(),
        [
            Duration::from_secs(2),
            Duration::from_millis(100),
            Duration::from_secs(2),
            Duration::from_secs(2)
        ]
    );
}

/// A sleeper whose one sleep ends when the test says.
struct Alarm(Mutex<Option<oneshot::Receiver<()>>>);

impl Sleep for Alarm {
    fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
        let rx = self.0.lock().unwrap().take().expect("one sleep");
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[test]
fn a_caller_that_times_out_leaves_the_connect_to_the_callers_still_waiting() {
    let sessions = Sessions::default();
    let only = sessions.add();
    only.push_ok(r#"{"b":1}"#);
    // The first connect waits for the gate; a second one would find no session left.
    let (open, gate) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some(gate)));
    let s = sessions.clone();
    let exec = Arc::new(Reconnecting::new(move || {
        let gate = gate.lock().unwrap().take();
        let next = s.connect();
        async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            next.await
        }
    }));
    let (ring, alarm) = oneshot::channel();
    let alarm = Alarm(Mutex::new(Some(alarm)));
    let mut pool = LocalPool::new();
    let sp = pool.spawner();
    let (a_tx, mut a_rx) = oneshot::channel();
    let (b_tx, mut b_rx) = oneshot::channel();
    let (ea, eb) = (Arc::clone(&exec), Arc::clone(&exec));
    sp.spawn_local(async move {
        let alarm = alarm;
        let _ = a_tx.send(
            ea.execute_timeout("a", None, Duration::from_secs(1), &alarm)
                .await,
        );
    })
    .unwrap();
    sp.spawn_local(async move {
        let _ = b_tx.send(eb.execute("b", None).await);
    })
    .unwrap();
    pool.run_until_stalled();
    // A's timeout fires while both wait for the connect.
    ring.send(()).unwrap();
    pool.run_until_stalled();
    assert_eq!(
        a_rx.try_recv().unwrap().unwrap(),
        Err(ExecError::Connect(
            "no session within the command's timeout (1s)".into()
        ))
    );
    assert!(b_rx.try_recv().unwrap().is_none(), "B still waits");
    // The connect A started goes on for B, which gets its session.
    open.send(()).unwrap();
    pool.run_until_stalled();
    assert_eq!(
        b_rx.try_recv().unwrap().unwrap().unwrap().get(),
        r#"{"b":1}"#
    );
    assert_eq!(sessions.connects.load(Ordering::SeqCst), 1);
    assert_eq!(only.names(), ["b"]);
}

#[test]
fn a_connect_that_nobody_waits_for_any_more_is_dropped() {
    let sessions = Sessions::default();
    let only = sessions.add();
    // The first connect never finishes; the second gets the session.
    let (connect, attempts) = first_connect_is(&sessions, || Box::pin(future::pending()));
    let exec = Reconnecting::new(connect);
    let mut first = Box::pin(exec.execute("x", None));
    assert!(common::poll_once(&mut first).is_pending());
    drop(first);
    block_on(exec.execute("y", None)).unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(only.names(), ["y"]);
}

#[test]
fn a_connect_that_panics_fails_that_attempt_only() {
    let sessions = Sessions::default();
    let only = sessions.add();
    let (connect, attempts) = first_connect_is(&sessions, || {
        Box::pin(async { panic!("a bug in the connect function") })
    });
    let exec = Reconnecting::new(connect);
    assert_eq!(
        block_on(exec.execute("x", None)),
        Err(ExecError::Connect("the connect function panicked".into()))
    );
    block_on(exec.execute("y", None)).unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(only.names(), ["y"]);
}

/// A waker that runs a function when woken, as an executor that polls the task inside
/// `wake` would.
struct OnWake(Box<dyn Fn() + Send + Sync>);

impl futures_util::task::ArcWake for OnWake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        (arc_self.0)();
    }
}

#[test]
fn a_subscriber_woken_by_a_reconnection_may_subscribe_inside_the_wake() {
    let (report, outcome) = std::sync::mpsc::channel();
    // On a thread of its own: before the fix this deadlocked.
    std::thread::spawn(move || {
        let sessions = Sessions::default();
        for _ in 0..3 {
            sessions.add();
        }
        let s = sessions.clone();
        let exec = Arc::new(Reconnecting::new(move || s.connect()));
        let mut first = exec.subscribe();
        let later = Arc::new(Mutex::new(Vec::new()));
        let (e, l) = (Arc::clone(&exec), Arc::clone(&later));
        let waker = futures_util::task::waker(Arc::new(OnWake(Box::new(move || {
            l.lock().unwrap().push(e.subscribe());
        }))));
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(first.poll_next_unpin(&mut cx).is_pending());
        for _ in 0..2 {
            let (generation, _) = block_on(exec.session()).unwrap();
            exec.invalidate(generation);
        }
        block_on(exec.session()).unwrap();
        let firsts: Vec<u64> = std::iter::from_fn(|| first.try_recv().ok())
            .map(|r| r.generation)
            .collect();
        let mut later = later.lock().unwrap();
        let laters: Vec<Vec<u64>> = later
            .iter_mut()
            .map(|rx| {
                std::iter::from_fn(|| rx.try_recv().ok())
                    .map(|r| r.generation)
                    .collect()
            })
            .collect();
        report.send((firsts, laters)).unwrap();
    });
    let (firsts, laters) = outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("no deadlock");
    assert_eq!(firsts, [2, 3]);
    // Subscribed inside the wake for generation 2: told of generation 3 only. (The waker is
    // registered once, so it ran once.)
    assert_eq!(laters, [vec![3]]);
}
