//! Deduplication of identical idempotent calls, cancel safety, and the result cache.

mod common;

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::{FakeExec, ManualClock, RecordingHooks, RecordingSleep, args, poll_once, raw};
use futures_executor::block_on;
use futures_util::FutureExt;
use futures_util::future::join_all;
use qmp_ops::{ExecError, Ops, Policy, Rule, call_key};
use qmp_proto::Failure;

fn ops_with(
    policy: Policy,
    cache: usize,
) -> (
    Arc<FakeExec>,
    ManualClock,
    Arc<RecordingHooks>,
    Ops<Arc<FakeExec>>,
) {
    let exec = FakeExec::new();
    let clock = ManualClock::new(Instant::now());
    let hooks = Arc::new(RecordingHooks::default());
    let ops = Ops::builder(
        Arc::clone(&exec),
        policy,
        RecordingSleep::new(clock.clone()),
    )
    .clock(clock.clone())
    .shared_hooks(hooks.clone())
    .cache_capacity(cache)
    .seed(1)
    .build();
    (exec, clock, hooks, ops)
}

fn chardev_policy() -> Policy {
    Policy::deny_all().rule("chardev-add", Rule::allow().idempotent(true))
}

const CHARDEV: &str = r#"{"id":"rb0","backend":{"type":"ringbuf","data":{"size":1024}}}"#;
const CHARDEV_REORDERED: &str = r#"{"backend":{"data":{"size":1024},"type":"ringbuf"},"id":"rb0"}"#;

#[test]
fn fifty_identical_calls_share_one_execution() {
    let (exec, _, hooks, ops) = ops_with(chardev_policy(), 0);
    let answer = exec.push_later();
    let a = args(CHARDEV);
    let b = args(CHARDEV_REORDERED);
    let mut all = join_all((0..50).map(|i| {
        let ops = ops.clone();
        let arg = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { ops.execute("chardev-add", Some(&arg)).await }
    }));
    assert!(poll_once(&mut all).is_pending());
    assert_eq!(exec.count(), 1);
    assert_eq!(ops.in_flight(), 1);
    answer.send(Ok(raw("{}"))).unwrap();
    let Poll::Ready(results) = poll_once(&mut all) else {
        panic!("all callers must finish once the single execution answered")
    };
    assert_eq!(results.len(), 50);
    assert!(results.iter().all(|r| r.as_ref().unwrap().get() == "{}"));
    assert_eq!(exec.count(), 1);
    assert_eq!(ops.in_flight(), 0);
    let log = hooks.log();
    assert_eq!(log.iter().filter(|l| l.starts_with("shared ")).count(), 49);
    assert_eq!(log.iter().filter(|l| l.starts_with("attempt ")).count(), 1);
}

#[test]
fn different_arguments_or_non_idempotent_rules_are_not_shared() {
    let policy = chardev_policy().rule("device_add", Rule::allow());
    let (exec, _, _, ops) = ops_with(policy, 0);
    let x = args(r#"{"id":"a"}"#);
    let y = args(r#"{"id":"b"}"#);
    let answers: Vec<_> = (0..4).map(|_| exec.push_later()).collect();
    let mut all = join_all([
        ops.execute("chardev-add", Some(&x)).boxed(),
        ops.execute("chardev-add", Some(&y)).boxed(),
        ops.execute("device_add", Some(&x)).boxed(),
        ops.execute("device_add", Some(&x)).boxed(),
    ]);
    // All four are in flight at once, and each went out on its own.
    assert!(poll_once(&mut all).is_pending());
    assert_eq!(exec.count(), 4);
    assert_eq!(
        ops.in_flight(),
        2,
        "one shared execution per chardev-add key; device_add none"
    );
    for a in answers {
        a.send(Ok(raw("{}"))).unwrap();
    }
    assert!(poll_once(&mut all).is_ready());
}

#[test]
fn dropping_the_leader_mid_flight_hands_the_execution_to_a_waiter() {
    let (exec, _, _, ops) = ops_with(chardev_policy(), 0);
    let answer = exec.push_later();
    let a = args(CHARDEV);
    let mut leader = ops.execute("chardev-add", Some(&a)).boxed();
    let mut follower = ops.execute("chardev-add", Some(&a)).boxed();
    assert!(poll_once(&mut leader).is_pending());
    assert!(poll_once(&mut follower).is_pending());
    assert_eq!(exec.count(), 1);
    drop(leader);
    assert_eq!(
        ops.in_flight(),
        1,
        "the follower still awaits the execution"
    );
    answer.send(Ok(raw(r#"{"ok":true}"#))).unwrap();
    let Poll::Ready(r) = poll_once(&mut follower) else {
        panic!("the follower must get the answer")
    };
    assert_eq!(r.unwrap().get(), r#"{"ok":true}"#);
    assert_eq!(exec.count(), 1);
    assert_eq!(ops.in_flight(), 0);
}

#[test]
fn dropping_every_caller_cancels_and_the_next_call_runs_again() {
    let (exec, _, _, ops) = ops_with(chardev_policy(), 0);
    let _abandoned = exec.push_later();
    let a = args(CHARDEV);
    let mut first = ops.execute("chardev-add", Some(&a)).boxed();
    assert!(poll_once(&mut first).is_pending());
    drop(first);
    assert_eq!(ops.in_flight(), 0);
    exec.push_ok("{}");
    assert_eq!(
        block_on(ops.execute("chardev-add", Some(&a)))
            .unwrap()
            .get(),
        "{}"
    );
    assert_eq!(exec.count(), 2);
}

#[test]
fn shared_failures_reach_every_caller() {
    let (exec, _, _, ops) = ops_with(
        Policy::deny_all().rule(
            "chardev-add",
            Rule::allow()
                .idempotent(true)
                .retry(qmp_ops::RetryPolicy::never()),
        ),
        0,
    );
    let answer = exec.push_later();
    let a = args(CHARDEV);
    let mut all = join_all((0..3).map(|_| ops.execute("chardev-add", Some(&a))));
    assert!(poll_once(&mut all).is_pending());
    answer
        .send(Err(ExecError::Unknown(Failure::PeerClosed)))
        .unwrap();
    let Poll::Ready(results) = poll_once(&mut all) else {
        panic!("every caller must see the failure")
    };
    for r in results {
        assert_eq!(
            r.unwrap_err().exec_error(),
            Some(&ExecError::Unknown(Failure::PeerClosed))
        );
    }
    assert_eq!(exec.count(), 1);
}

#[test]
fn call_key_sorts_object_keys_recursively() {
    let a = call_key("x", Some(&args(CHARDEV))).unwrap();
    let b = call_key("x", Some(&args(CHARDEV_REORDERED))).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        a,
        "x\n{\"backend\":{\"data\":{\"size\":1024},\"type\":\"ringbuf\"},\"id\":\"rb0\"}"
    );
    assert_ne!(call_key("y", Some(&args(CHARDEV))).unwrap(), a);
    assert_eq!(call_key("x", None).unwrap(), "x\n");
}

fn cached_policy() -> Policy {
    Policy::deny_all().rule(
        "query-*",
        Rule::allow()
            .idempotent(true)
            .cache_ttl(Duration::from_secs(10)),
    )
}

#[test]
fn cached_success_is_served_until_its_ttl_expires() {
    let (exec, clock, hooks, ops) = ops_with(cached_policy(), 4);
    exec.push_ok("1");
    exec.push_ok("2");
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "1");
    clock.advance(Duration::from_millis(9_999));
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "1");
    assert_eq!(exec.count(), 1);
    assert!(hooks.log().contains(&"cache-hit query-a".to_owned()));
    clock.advance(Duration::from_millis(1));
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "2");
    assert_eq!(exec.count(), 2);
}

#[test]
fn a_ttl_too_long_to_represent_never_runs_out() {
    let policy = Policy::deny_all().rule(
        "query-*",
        Rule::allow().idempotent(true).cache_ttl(Duration::MAX),
    );
    let (exec, clock, _, ops) = ops_with(policy, 4);
    exec.push_ok("1");
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "1");
    clock.advance(Duration::from_secs(10 * 365 * 24 * 3600));
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "1");
    assert_eq!(exec.count(), 1);
}

#[test]
fn errors_are_not_cached() {
    let (exec, _, _, ops) = ops_with(cached_policy(), 4);
    exec.push_err(ExecError::Command(qmp_proto::CommandError::new(
        qmp_proto::ErrorClass::GenericError,
        "no",
    )));
    assert_eq!(
        block_on(ops.execute("query-a", None))
            .unwrap_err()
            .to_string(),
        "query-a failed after 1 attempt(s): qemu error: GenericError: no"
    );
    assert_eq!(ops.cached(), 0);
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "{}");
    assert_eq!(exec.count(), 2);
}

#[test]
fn the_cache_is_bounded_and_evicts_the_oldest() {
    let (exec, clock, _, ops) = ops_with(cached_policy(), 2);
    for name in ["query-a", "query-b", "query-c"] {
        block_on(ops.execute(name, None)).unwrap();
        clock.advance(Duration::from_millis(1));
    }
    assert_eq!(ops.cached(), 2);
    assert_eq!(exec.count(), 3);
    block_on(ops.execute("query-c", None)).unwrap();
    block_on(ops.execute("query-b", None)).unwrap();
    assert_eq!(exec.count(), 3, "b and c are still cached");
    block_on(ops.execute("query-a", None)).unwrap();
    assert_eq!(exec.count(), 4, "a was evicted first");
    assert_eq!(ops.cached(), 2);
    assert_eq!(exec.names(), ["query-a", "query-b", "query-c", "query-a"]);
}

#[test]
fn the_cache_is_off_by_default() {
    let exec = FakeExec::new();
    let clock = ManualClock::new(Instant::now());
    let ops = Ops::builder(
        Arc::clone(&exec),
        cached_policy(),
        RecordingSleep::new(clock),
    )
    .build();
    block_on(ops.execute("query-a", None)).unwrap();
    block_on(ops.execute("query-a", None)).unwrap();
    assert_eq!(exec.count(), 2);
    assert_eq!(ops.cached(), 0);
}

#[test]
fn a_custom_key_shares_calls_whose_arguments_differ() {
    let (exec, _, _, ops) = ops_with(chardev_policy(), 0);
    let answer = exec.push_later();
    let x = args(r#"{"id":"rb0","note":"first"}"#);
    let y = args(r#"{"id":"rb0","note":"second"}"#);
    let mut both = join_all([
        ops.execute_with_key("rb0", "chardev-add", Some(&x)).boxed(),
        ops.execute_with_key("rb0", "chardev-add", Some(&y)).boxed(),
    ]);
    assert!(poll_once(&mut both).is_pending());
    answer.send(Ok(raw("{}"))).unwrap();
    let Poll::Ready(results) = poll_once(&mut both) else {
        panic!("both callers share the one execution")
    };
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        exec.calls(),
        [("chardev-add".to_owned(), Some(x.get().to_owned()))]
    );
}

#[test]
fn a_read_made_after_a_write_returned_never_joins_one_answered_before_it() {
    let (exec, _, _, ops) = ops_with(Policy::vm_control(), 0);
    let answer = exec.push_later();
    let mut first = ops.execute("query-status", None).boxed();
    assert!(poll_once(&mut first).is_pending());
    // QEMU answers the query, then a `stop`; the query's caller has not looked yet.
    let running = r#"{"status":"running","running":true}"#;
    answer.send(Ok(raw(running))).unwrap();
    exec.push_ok("{}");
    block_on(ops.execute("stop", None)).unwrap();
    let paused = r#"{"status":"paused","running":false}"#;
    exec.push_ok(paused);
    assert_eq!(
        block_on(ops.execute("query-status", None)).unwrap().get(),
        paused
    );
    assert_eq!(exec.names(), ["query-status", "stop", "query-status"]);
    // The first caller still gets the answer to its own query.
    let Poll::Ready(r) = poll_once(&mut first) else {
        panic!("answered")
    };
    assert_eq!(r.unwrap().get(), running);
    assert_eq!(ops.in_flight(), 0);
}

/// Hooks whose `on_retry` panics.
struct PanickingRetryHook;

impl qmp_ops::Hooks for PanickingRetryHook {
    fn on_retry(&self, _: &str, _: u32, _: Duration, _: &ExecError) {
        panic!("the retry hook failed");
    }
}

#[test]
fn a_panic_in_a_shared_execution_reaches_each_caller_and_poisons_nothing() {
    let exec = FakeExec::new();
    let clock = ManualClock::new(Instant::now());
    let ops = Ops::builder(
        Arc::clone(&exec),
        Policy::read_only(),
        RecordingSleep::new(clock.clone()),
    )
    .clock(clock)
    .hooks(PanickingRetryHook)
    .build();
    let answer = exec.push_later();
    let mut a = ops.execute("query-status", None).boxed();
    let mut b = ops.execute("query-status", None).boxed();
    assert!(poll_once(&mut a).is_pending());
    assert!(poll_once(&mut b).is_pending());
    assert_eq!(exec.count(), 1, "b joined a");
    // Not sent: a retry is safe, and its hook panics.
    answer
        .send(Err(ExecError::NotSent(Failure::PeerClosed)))
        .unwrap();
    let message = |r: Result<_, Box<dyn std::any::Any + Send>>| match r {
        Ok(_) => "no panic".to_owned(),
        Err(p) => p.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_once(&mut a)));
    assert_eq!(message(caught), "the retry hook failed");
    // A call made meanwhile starts afresh instead of joining the failed execution.
    exec.push_ok(r#"{"status":"running"}"#);
    assert_eq!(
        block_on(ops.execute("query-status", None)).unwrap().get(),
        r#"{"status":"running"}"#
    );
    // The other caller is not left waiting: it raises the same panic.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_once(&mut b)));
    assert_eq!(message(caught), "the retry hook failed");
    drop((a, b));
    assert_eq!(ops.in_flight(), 0);
    assert_eq!(exec.count(), 2);
}

#[test]
fn a_write_that_finished_makes_cached_results_from_before_it_stale() {
    let policy = cached_policy().rule("stop", Rule::allow());
    let (exec, _, _, ops) = ops_with(policy, 4);
    exec.push_ok("1");
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "1");
    exec.push_ok("{}");
    block_on(ops.execute("stop", None)).unwrap();
    exec.push_ok("2");
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "2");
    assert_eq!(block_on(ops.execute("query-a", None)).unwrap().get(), "2");
    // A query answered before a write finished, but looked at after it, is not cached.
    let answer = exec.push_later();
    let mut before = ops.execute("query-b", None).boxed();
    assert!(poll_once(&mut before).is_pending());
    answer.send(Ok(raw("\"old\""))).unwrap();
    exec.push_ok("{}");
    block_on(ops.execute("stop", None)).unwrap();
    let Poll::Ready(old) = poll_once(&mut before) else {
        panic!("answered")
    };
    assert_eq!(old.unwrap().get(), "\"old\"");
    exec.push_ok("\"new\"");
    assert_eq!(
        block_on(ops.execute("query-b", None)).unwrap().get(),
        "\"new\""
    );
    assert_eq!(
        exec.names(),
        ["query-a", "stop", "query-a", "query-b", "stop", "query-b"]
    );
}
