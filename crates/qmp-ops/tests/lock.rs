//! Lock groups serialise commands through Ops, in call order.

mod common;

use std::task::Poll;
use std::time::Instant;

use common::{FakeExec, ManualClock, RecordingSleep, poll_once, raw};
use futures_util::FutureExt;
use qmp_ops::{Ops, Policy};

#[test]
fn reads_are_outside_the_run_state_lock_group() {
    let exec = FakeExec::new();
    let ops = Ops::builder(
        exec.clone(),
        Policy::vm_control(),
        RecordingSleep::new(ManualClock::new(Instant::now())),
    )
    .seed(0)
    .build();
    let cont_answer = exec.push_later();
    let mut stop = ops.stop().boxed();
    let mut cont = ops.cont().boxed();
    let mut status = ops.query_status().boxed();
    exec.push_ok(r#"{"status":"running","running":true}"#);
    let stop_answer = exec.push_later();
    assert!(poll_once(&mut cont).is_pending());
    assert!(poll_once(&mut stop).is_pending());
    // Reads are not in the lock group: query-status goes through at once.
    assert!(poll_once(&mut status).is_ready());
    // cont was polled first and holds the group; stop waits; the read was not held up.
    assert_eq!(exec.names(), ["cont", "query-status"]);
    cont_answer.send(Ok(raw("{}"))).unwrap();
    assert_eq!(poll_once(&mut cont), Poll::Ready(Ok(())));
    assert!(poll_once(&mut stop).is_pending());
    assert_eq!(exec.names(), ["cont", "query-status", "stop"]);
    stop_answer.send(Ok(raw("{}"))).unwrap();
    assert_eq!(poll_once(&mut stop), Poll::Ready(Ok(())));
}

#[test]
fn the_second_run_state_command_waits_for_the_first() {
    let exec = FakeExec::new();
    let ops = Ops::builder(
        exec.clone(),
        Policy::vm_control(),
        RecordingSleep::new(ManualClock::new(Instant::now())),
    )
    .seed(0)
    .build();
    let stop_answer = exec.push_later();
    let mut stop = ops.stop().boxed();
    let mut cont = ops.cont().boxed();
    let mut reset = ops.system_reset().boxed();
    assert!(poll_once(&mut stop).is_pending());
    assert!(poll_once(&mut cont).is_pending());
    assert!(poll_once(&mut reset).is_pending());
    assert_eq!(exec.names(), ["stop"], "cont and reset wait for the lock");
    assert_eq!(ops.active_locks(), 1);
    stop_answer.send(Ok(raw("{}"))).unwrap();
    assert_eq!(poll_once(&mut stop), Poll::Ready(Ok(())));
    // FIFO in the order the calls first ran: cont queued before reset, so reset, though
    // polled first now, still waits.
    assert!(poll_once(&mut reset).is_pending());
    assert_eq!(poll_once(&mut cont), Poll::Ready(Ok(())));
    assert_eq!(poll_once(&mut reset), Poll::Ready(Ok(())));
    assert_eq!(exec.names(), ["stop", "cont", "system_reset"]);
    assert_eq!(ops.active_locks(), 0);
}

fn vm_control(exec: &std::sync::Arc<FakeExec>) -> Ops<std::sync::Arc<FakeExec>> {
    Ops::builder(
        exec.clone(),
        Policy::vm_control(),
        RecordingSleep::new(ManualClock::new(Instant::now())),
    )
    .seed(0)
    .build()
}

#[test]
fn a_stop_made_after_a_waiting_cont_runs_after_it_instead_of_sharing_an_earlier_stop() {
    let exec = FakeExec::new();
    let ops = vm_control(&exec);
    let first_stop = exec.push_later();
    let mut a = ops.stop().boxed();
    assert!(poll_once(&mut a).is_pending());
    let mut b = ops.cont().boxed();
    assert!(poll_once(&mut b).is_pending());
    // An identical stop is running, but a cont was asked for since: sharing the running stop
    // would leave the VM running although the last caller asked for it to stop.
    let mut c = ops.stop().boxed();
    assert!(poll_once(&mut c).is_pending());
    assert_eq!(exec.names(), ["stop"]);
    exec.push_ok("{}");
    exec.push_ok("{}");
    first_stop.send(Ok(raw("{}"))).unwrap();
    assert_eq!(poll_once(&mut a), Poll::Ready(Ok(())));
    assert!(poll_once(&mut c).is_pending(), "behind the cont");
    assert_eq!(poll_once(&mut b), Poll::Ready(Ok(())));
    assert_eq!(poll_once(&mut c), Poll::Ready(Ok(())));
    assert_eq!(exec.names(), ["stop", "cont", "stop"]);
    assert_eq!(ops.in_flight(), 0);
    assert_eq!(ops.active_locks(), 0);
}

#[test]
fn a_stop_with_nothing_asked_for_since_shares_the_running_one() {
    let exec = FakeExec::new();
    let ops = vm_control(&exec);
    let answer = exec.push_later();
    let mut a = ops.stop().boxed();
    assert!(poll_once(&mut a).is_pending());
    let mut c = ops.stop().boxed();
    assert!(poll_once(&mut c).is_pending());
    // A cont asked for after both queues behind the one shared stop.
    let mut b = ops.cont().boxed();
    assert!(poll_once(&mut b).is_pending());
    exec.push_ok("{}");
    answer.send(Ok(raw("{}"))).unwrap();
    assert_eq!(poll_once(&mut c), Poll::Ready(Ok(())));
    assert_eq!(poll_once(&mut a), Poll::Ready(Ok(())));
    assert_eq!(poll_once(&mut b), Poll::Ready(Ok(())));
    assert_eq!(exec.names(), ["stop", "cont"]);
}
