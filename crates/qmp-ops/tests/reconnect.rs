//! The reconnecting executor: a retry after a disconnect runs on a fresh session, and
//! subscribers learn that events may have been missed.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::{FakeExec, ManualClock, RecordingSleep};
use futures_executor::block_on;
use futures_util::StreamExt;
use qmp_ops::{
    ErrorKind, ExecError, Execute, Ops, Policy, Reconnected, Reconnecting, RetryPolicy, Rule,
};
use qmp_proto::Failure;

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
    assert!(block_on(exec.execute("a", None)).is_err());
    assert!(block_on(exec.execute("b", None)).is_ok());
    assert_eq!(only.names(), ["a", "b"]);
    assert_eq!(sessions.connects.load(Ordering::SeqCst), 1);
    assert_eq!(exec.generation(), 1);
}
