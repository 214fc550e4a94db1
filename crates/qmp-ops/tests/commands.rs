//! Typed helpers: tolerant decoding across QEMU versions.

mod common;

use std::time::Instant;

use common::{FakeExec, ManualClock, RecordingSleep};
use futures_executor::block_on;
use qmp_ops::{ErrorKind, ExecError, Ops, Policy, RetryPolicy, Rule, RunState, StatusInfo};
use qmp_proto::{Failure, VersionTriple};

fn ops(policy: Policy) -> (std::sync::Arc<FakeExec>, Ops<std::sync::Arc<FakeExec>>) {
    let exec = FakeExec::new();
    let sleep = RecordingSleep::new(ManualClock::new(Instant::now()));
    (
        exec.clone(),
        Ops::builder(exec, policy, sleep).seed(0).build(),
    )
}

#[test]
fn query_status_reads_old_and_new_qemu_replies() {
    let (exec, ops) = ops(Policy::read_only());
    exec.push_ok(r#"{"status": "paused", "singlestep": false, "running": false}"#);
    exec.push_ok(r#"{"status": "running", "running": true}"#);
    exec.push_ok(r#"{"status": "frobnicating", "running": false, "new-field": 1}"#);
    let old = block_on(ops.query_status()).unwrap();
    assert_eq!(
        (old.status.clone(), old.running, old.singlestep),
        (RunState::Paused, false, Some(false))
    );
    let new: StatusInfo = block_on(ops.query_status()).unwrap();
    assert_eq!(
        (new.status, new.running, new.singlestep),
        (RunState::Running, true, None)
    );
    let future = block_on(ops.query_status()).unwrap();
    assert_eq!(future.status, RunState::Other("frobnicating".into()));
    assert_eq!(future.status.as_str(), "frobnicating");
}

#[test]
fn query_version_and_a_decode_error() {
    let (exec, ops) = ops(Policy::read_only());
    exec.push_ok(
        r#"{"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2"}"#,
    );
    exec.push_ok(r#"{"qemu": "ten"}"#);
    let v = block_on(ops.query_version()).unwrap();
    assert_eq!(
        v.qemu,
        VersionTriple {
            major: 10,
            minor: 0,
            micro: 2
        }
    );
    assert_eq!(v.package, "Debian 1:10.0.2");
    assert_eq!(
        block_on(ops.query_version()).unwrap_err().kind(),
        ErrorKind::Decode
    );
}

#[test]
fn run_state_helpers_send_the_right_commands() {
    let (exec, ops) = ops(Policy::vm_control());
    block_on(async {
        ops.stop().await.unwrap();
        ops.cont().await.unwrap();
        ops.system_powerdown().await.unwrap();
        ops.system_reset().await.unwrap();
    });
    assert_eq!(
        exec.names(),
        ["stop", "cont", "system_powerdown", "system_reset"]
    );
    assert!(exec.calls().iter().all(|(_, a)| a.is_none()));
    assert_eq!(block_on(ops.quit()).unwrap_err().kind(), ErrorKind::Denied);
}

#[test]
fn quit_counts_the_peer_closing_after_send_as_success() {
    let (exec, ops) = ops(Policy::unrestricted_i_know_what_i_am_doing());
    exec.push_err(ExecError::Unknown(Failure::PeerClosed));
    exec.push_err(ExecError::Unknown(Failure::Timeout));
    block_on(ops.quit()).unwrap();
    assert_eq!(block_on(ops.quit()).unwrap_err().kind(), ErrorKind::Unknown);
}

#[test]
fn quit_is_not_retried_after_the_peer_closed_even_under_an_idempotent_rule() {
    let rule = Rule::allow()
        .idempotent(true)
        .retry(RetryPolicy::default().max_attempts(3));
    let (exec, ops) = ops(Policy::deny_all().rule("quit", rule));
    exec.push_err(ExecError::Unknown(Failure::PeerClosed));
    exec.push_err(ExecError::Unknown(Failure::PeerClosed));
    block_on(ops.quit()).unwrap();
    assert_eq!(exec.names(), ["quit"]);
    // Through `execute` it is the same single attempt, reported as it ended.
    let e = block_on(ops.execute("quit", None)).unwrap_err();
    assert_eq!(
        (e.attempts(), e.exec_error()),
        (1, Some(&ExecError::Unknown(Failure::PeerClosed)))
    );
    assert_eq!(exec.names(), ["quit", "quit"]);
    // A quit that timed out may be under way: not repeated either (a retry could find the
    // connection closed, reconnect, and end a new QEMU).
    exec.push_err(ExecError::Unknown(Failure::Timeout));
    let e = block_on(ops.quit()).unwrap_err();
    assert_eq!(
        (e.attempts(), e.exec_error()),
        (1, Some(&ExecError::Unknown(Failure::Timeout)))
    );
    // Not sent at all: retried as the rule allows.
    exec.push_err(ExecError::NotSent(Failure::LocalClose));
    block_on(ops.quit()).unwrap();
    assert_eq!(exec.names(), ["quit"; 5]);
}

#[test]
fn ops_runs_over_a_trait_object() {
    let fake = FakeExec::new();
    let exec: std::sync::Arc<dyn qmp_ops::Execute> = fake.clone();
    let sleep = RecordingSleep::new(ManualClock::new(Instant::now()));
    let ops = Ops::builder(exec, Policy::read_only(), sleep).build();
    fake.push_ok(r#"{"status": "running", "running": true}"#);
    assert!(block_on(ops.query_status()).unwrap().running);
    assert_eq!(fake.names(), ["query-status"]);
}

fn assert_send<T: Send>(_: &T) {}

#[test]
fn ops_futures_are_send_so_any_runtime_can_spawn_them() {
    let (_exec, ops) = ops(Policy::read_only());
    let raw = common::args("{}");
    assert_send(&ops.execute("query-status", Some(&raw)));
    assert_send(&ops.execute_with_key("k", "query-status", None));
    assert_send(&ops.call("query-status", &serde_json::json!({})));
    assert_send(&ops.query_status());
    assert_send(&ops.quit());
}

#[test]
fn call_with_no_arguments_sends_none_and_non_objects_are_refused() {
    let (exec, ops) = ops(Policy::read_only());
    exec.push_ok("{}");
    block_on(ops.call("query-status", &())).unwrap();
    assert_eq!(exec.calls(), vec![("query-status".to_owned(), None)]);
    let e = block_on(ops.call("query-status", &[1, 2])).unwrap_err();
    assert_eq!(
        (e.kind(), e.to_string()),
        (
            ErrorKind::InvalidArguments,
            "invalid arguments for query-status: arguments must be a JSON object".to_owned()
        )
    );
    assert_eq!(exec.count(), 1, "nothing more was sent");
}
