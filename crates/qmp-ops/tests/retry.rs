//! Backoff schedules and the retry decision for every outcome kind.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FakeExec, ManualClock, RecordingHooks, RecordingSleep, raw};
use futures_executor::block_on;
use qmp_ops::{
    ErrorKind, ExecError, Jitter, Ops, OpsError, Policy, RetryPolicy, Rule, SendStatus,
    is_retry_safe,
};
use qmp_proto::{CommandError, ErrorClass, Failure, LocalError};

const MS: Duration = Duration::from_millis(1);

#[test]
fn no_jitter_doubles_up_to_the_cap_then_stops_at_max_attempts() {
    let p = RetryPolicy::default()
        .max_attempts(7)
        .backoff(100 * MS, 1000 * MS)
        .jitter(Jitter::None);
    let mut rng = fastrand::Rng::with_seed(1);
    let got: Vec<_> = (1..=7).map(|a| p.delay(a, &mut rng)).collect();
    assert_eq!(
        got,
        vec![
            Some(100 * MS),
            Some(200 * MS),
            Some(400 * MS),
            Some(800 * MS),
            Some(1000 * MS),
            Some(1000 * MS),
            None
        ]
    );
}

#[test]
fn ceiling_saturates_instead_of_overflowing() {
    let p = RetryPolicy::default()
        .max_attempts(u32::MAX)
        .backoff(Duration::from_secs(1), Duration::from_secs(3600));
    assert_eq!(p.ceiling(200), Duration::from_secs(3600));
    assert_eq!(p.ceiling(1), Duration::from_secs(1));
}

/// The full-jitter schedule for seed 42 (base 100 ms, cap 1 s): the same seed always gives
/// exactly these delays.
const SEED42_FULL: [Duration; 5] = [
    Duration::from_nanos(SEED42_NANOS[0]),
    Duration::from_nanos(SEED42_NANOS[1]),
    Duration::from_nanos(SEED42_NANOS[2]),
    Duration::from_nanos(SEED42_NANOS[3]),
    Duration::from_nanos(SEED42_NANOS[4]),
];
const SEED42_NANOS: [u64; 5] = [79_079_965, 98_717_190, 321_783_493, 31_935_390, 542_002_544];

fn full_policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(6)
        .backoff(100 * MS, 1000 * MS)
        .deadline(None)
        .jitter(Jitter::Full)
}

#[test]
fn full_jitter_schedule_is_exact_for_a_seed() {
    let p = full_policy();
    let mut rng = fastrand::Rng::with_seed(42);
    let got: Vec<_> = (1..=6).map(|a| p.delay(a, &mut rng)).collect();
    let mut want: Vec<_> = SEED42_FULL.iter().copied().map(Some).collect();
    want.push(None);
    assert_eq!(got, want);
    for (a, d) in SEED42_FULL.iter().enumerate() {
        assert!(*d <= p.ceiling(a as u32 + 1));
    }
}

#[test]
fn equal_jitter_stays_in_the_upper_half() {
    let p = full_policy().jitter(Jitter::Equal);
    let mut rng = fastrand::Rng::with_seed(9);
    for a in 1..6 {
        let d = p.delay(a, &mut rng).unwrap();
        let c = p.ceiling(a);
        assert!(
            d >= c / 2 && d <= c,
            "attempt {a}: {d:?} not in [{:?}, {c:?}]",
            c / 2
        );
    }
}

#[test]
fn retry_decision_for_each_outcome_kind() {
    let generic = ExecError::Command(CommandError::new(ErrorClass::GenericError, "x"));
    let not_found = ExecError::Command(CommandError::new(ErrorClass::DeviceNotFound, "x"));
    let classes = [ErrorClass::GenericError];
    let cases: Vec<(ExecError, bool, &[ErrorClass], bool)> = vec![
        (ExecError::NotSent(Failure::PeerClosed), false, &[], true),
        (ExecError::NotSent(Failure::Timeout), false, &[], true),
        (ExecError::Connect("refused".into()), false, &[], true),
        (ExecError::Local(LocalError::Closed), false, &[], true),
        (
            ExecError::Local(LocalError::QueueFull { max: 8 }),
            false,
            &[],
            true,
        ),
        (
            ExecError::Local(LocalError::InvalidArguments("x".into())),
            true,
            &[],
            false,
        ),
        (ExecError::Unknown(Failure::Timeout), false, &[], false),
        (ExecError::Unknown(Failure::PeerClosed), true, &[], true),
        (generic.clone(), true, &[], false),
        (generic, false, &classes, true),
        (not_found, true, &classes, false),
    ];
    for (err, idempotent, classes, want) in cases {
        assert_eq!(
            is_retry_safe(&err, idempotent, classes),
            want,
            "{err:?} idempotent={idempotent}"
        );
    }
}

#[test]
fn each_execution_error_says_how_far_its_request_got() {
    let cases = [
        (ExecError::NotSent(Failure::PeerClosed), SendStatus::NotSent),
        (ExecError::Local(LocalError::Closed), SendStatus::NotSent),
        (ExecError::Connect("refused".into()), SendStatus::NotSent),
        (ExecError::Unknown(Failure::Timeout), SendStatus::Unanswered),
        (
            ExecError::Unknown(Failure::ReplyLost),
            SendStatus::Unanswered,
        ),
        (
            ExecError::Command(CommandError::new(ErrorClass::GenericError, "x")),
            SendStatus::Answered,
        ),
    ];
    for (err, status) in cases {
        assert_eq!(err.send_status(), status, "{err:?}");
    }
}

struct Rig {
    exec: Arc<FakeExec>,
    sleep: RecordingSleep,
    clock: ManualClock,
    hooks: Arc<RecordingHooks>,
    ops: Ops<Arc<FakeExec>>,
}

fn rig(policy: Policy) -> Rig {
    let exec = FakeExec::new();
    let clock = ManualClock::new(Instant::now());
    let sleep = RecordingSleep::new(clock.clone());
    let hooks = Arc::new(RecordingHooks::default());
    let ops = Ops::builder(Arc::clone(&exec), policy, sleep.clone())
        .clock(clock.clone())
        .shared_hooks(hooks.clone())
        .seed(42)
        .build();
    Rig {
        exec,
        sleep,
        clock,
        hooks,
        ops,
    }
}

fn retrying(rule: Rule) -> Policy {
    Policy::deny_all().rule("cmd", rule.retry(full_policy()))
}

#[test]
fn not_sent_is_retried_with_the_exact_seeded_schedule() {
    let r = rig(retrying(Rule::allow()));
    for _ in 0..3 {
        r.exec.push_err(ExecError::NotSent(Failure::PeerClosed));
    }
    r.exec.push_ok(r#"{"done":1}"#);
    let v = block_on(r.ops.execute("cmd", None)).unwrap();
    assert_eq!(v.get(), r#"{"done":1}"#);
    assert_eq!(r.exec.count(), 4);
    assert_eq!(r.sleep.slept(), SEED42_FULL[..3].to_vec());
    let total: Duration = SEED42_FULL[..3].iter().sum();
    assert_eq!(
        r.hooks.log(),
        vec![
            "attempt cmd 1".to_owned(),
            format!(
                "retry cmd 1 {:?} not sent: the peer closed the connection",
                SEED42_FULL[0]
            ),
            "attempt cmd 2".to_owned(),
            format!(
                "retry cmd 2 {:?} not sent: the peer closed the connection",
                SEED42_FULL[1]
            ),
            "attempt cmd 3".to_owned(),
            format!(
                "retry cmd 3 {:?} not sent: the peer closed the connection",
                SEED42_FULL[2]
            ),
            "attempt cmd 4".to_owned(),
            format!("outcome cmd {total:?} ok {{\"done\":1}}"),
        ]
    );
}

#[test]
fn unknown_is_not_retried_for_a_non_idempotent_command() {
    let r = rig(retrying(Rule::allow()));
    r.exec.push_err(ExecError::Unknown(Failure::PeerClosed));
    let e = block_on(r.ops.execute("cmd", None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unknown);
    assert_eq!(e.attempts(), 1);
    assert_eq!(r.exec.count(), 1);
    assert!(r.sleep.slept().is_empty());
}

#[test]
fn unknown_is_retried_for_an_idempotent_command() {
    let r = rig(retrying(Rule::allow().idempotent(true)));
    r.exec.push_err(ExecError::Unknown(Failure::Timeout));
    r.exec.push_ok("7");
    assert_eq!(block_on(r.ops.execute("cmd", None)).unwrap().get(), "7");
    assert_eq!(r.exec.count(), 2);
    assert_eq!(r.sleep.slept(), vec![SEED42_FULL[0]]);
}

#[test]
fn server_errors_are_retried_only_for_listed_classes() {
    let r = rig(retrying(
        Rule::allow().retry_classes([ErrorClass::DeviceNotActive]),
    ));
    r.exec.push_err(ExecError::Command(CommandError::new(
        ErrorClass::DeviceNotActive,
        "busy",
    )));
    r.exec.push_err(ExecError::Command(CommandError::new(
        ErrorClass::GenericError,
        "no",
    )));
    let e = block_on(r.ops.execute("cmd", None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command);
    assert_eq!(e.attempts(), 2);
    assert_eq!(
        e.exec_error(),
        Some(&ExecError::Command(CommandError::new(
            ErrorClass::GenericError,
            "no"
        )))
    );
    assert_eq!(r.sleep.slept(), vec![SEED42_FULL[0]]);
}

#[test]
fn invalid_arguments_refused_locally_are_not_retried() {
    let r = rig(retrying(Rule::allow().idempotent(true)));
    r.exec
        .push_err(ExecError::Local(LocalError::InvalidArguments("bad".into())));
    let e = block_on(r.ops.execute("cmd", None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Local);
    assert_eq!(r.exec.count(), 1);
}

#[test]
fn attempts_stop_at_max_attempts_with_the_last_error() {
    let r = rig(retrying(Rule::allow()));
    for _ in 0..10 {
        r.exec.push_err(ExecError::NotSent(Failure::PeerClosed));
    }
    let e = block_on(r.ops.execute("cmd", None)).unwrap_err();
    assert_eq!(
        e,
        OpsError::Exec {
            command: "cmd".into(),
            attempts: 6,
            error: ExecError::NotSent(Failure::PeerClosed)
        }
    );
    assert_eq!(r.exec.count(), 6);
    assert_eq!(r.sleep.slept(), SEED42_FULL.to_vec());
}

/// Up to 10 attempts of "cmd", 100 ms apart, within 250 ms overall.
fn rig_with_a_250ms_deadline() -> Rig {
    let retry = RetryPolicy::default()
        .max_attempts(10)
        .backoff(100 * MS, 100 * MS)
        .jitter(Jitter::None)
        .deadline(Some(250 * MS));
    rig(Policy::deny_all().rule("cmd", Rule::allow().retry(retry)))
}

#[test]
fn the_overall_deadline_stops_retries_before_sleeping_past_it() {
    let r = rig_with_a_250ms_deadline();
    for _ in 0..10 {
        r.exec.push_err(ExecError::NotSent(Failure::Timeout));
    }
    let e = block_on(r.ops.execute("cmd", None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Deadline);
    assert_eq!(e.attempts(), 3);
    assert_eq!(r.sleep.slept(), vec![100 * MS, 100 * MS]);
}

#[test]
fn time_spent_in_the_executor_counts_toward_the_deadline() {
    let r = rig_with_a_250ms_deadline();
    let answer = r.exec.push_later();
    let mut call = Box::pin(r.ops.execute("cmd", None));
    assert!(common::poll_once(&mut call).is_pending());
    // The first attempt takes 200 ms: a 100 ms backoff would end past the deadline.
    r.clock.advance(200 * MS);
    answer
        .send(Err(ExecError::NotSent(Failure::Timeout)))
        .unwrap();
    let std::task::Poll::Ready(Err(e)) = common::poll_once(&mut call) else {
        panic!("the deadline ends it at once")
    };
    assert_eq!((e.kind(), e.attempts()), (ErrorKind::Deadline, 1));
    assert!(r.sleep.slept().is_empty());
}

#[test]
fn a_timeout_makes_the_outcome_unknown() {
    let r = rig(Policy::deny_all().rule("cmd", Rule::allow().timeout(5 * MS).retry(full_policy())));
    let _never = r.exec.push_later();
    let e = block_on(r.ops.execute("cmd", None)).unwrap_err();
    assert_eq!(e.exec_error(), Some(&ExecError::Unknown(Failure::Timeout)));
    assert_eq!(r.sleep.slept(), vec![5 * MS]);
    assert_eq!(r.exec.count(), 1);
}

#[test]
fn from_outcome_maps_every_outcome() {
    use qmp_proto::Outcome;
    assert_eq!(
        ExecError::from_outcome(Outcome::Replied(Ok(raw("1"))))
            .unwrap()
            .get(),
        "1"
    );
    assert_eq!(
        ExecError::from_outcome(Outcome::Sent).unwrap().get(),
        "null"
    );
    let err = CommandError::new(ErrorClass::CommandNotFound, "nope");
    assert_eq!(
        ExecError::from_outcome(Outcome::Replied(Err(err.clone()))).unwrap_err(),
        ExecError::Command(err)
    );
    assert_eq!(
        ExecError::from_outcome(Outcome::NotSent(Failure::LocalClose)).unwrap_err(),
        ExecError::NotSent(Failure::LocalClose)
    );
    assert_eq!(
        ExecError::from_outcome(Outcome::Unknown(Failure::Timeout)).unwrap_err(),
        ExecError::Unknown(Failure::Timeout)
    );
}
