//! `qmp-ops` against real QEMU: policy denials send nothing, vm-control serialises run-state
//! commands, an idempotent rule runs one `chardev-add` for 50 concurrent identical calls, and
//! a retry across a killed and restarted daemon succeeds on the new session. Each scenario is a
//! runtime-neutral async function over an [`Rt`]; the modules at the end run them on tokio,
//! smol and async-std.
//!
//! [`ClientExec`] below wraps the client's own `qmp_ops::Execute` (feature `ops`) to count
//! what is sent and how many run-state commands overlap. Each test skips with a printed reason when QEMU is missing, and fails
//! instead under `QMP_REQUIRE_QEMU=1` (the launcher decides).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use qmp_client::{Builder, Client};
use qmp_ops::{
    BoxFuture, ErrorKind, ExecError, Execute, Hooks, Ops, Policy, Reconnecting, RetryPolicy, Rule,
    RunState, Sleep,
};
use qmp_proto::RawJson;
use qmp_testkit::launch::Launch;
use serde_json::value::RawValue;

/// Runs commands on a `qmp_client::Client`, counting them per name and tracking how many
/// run-state commands are in flight at once.
struct ClientExec {
    client: Client,
    sent: Mutex<Vec<String>>,
    run_state_now: AtomicUsize,
    run_state_max: AtomicUsize,
}

impl ClientExec {
    fn new(client: Client) -> Self {
        Self {
            client,
            sent: Mutex::new(Vec::new()),
            run_state_now: AtomicUsize::new(0),
            run_state_max: AtomicUsize::new(0),
        }
    }

    fn count(&self, name: &str) -> usize {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == name)
            .count()
    }
}

impl Execute for ClientExec {
    fn execute<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        Box::pin(async move {
            self.sent.lock().unwrap().push(name.to_owned());
            let run_state = matches!(name, "stop" | "cont");
            if run_state {
                let now = self.run_state_now.fetch_add(1, Ordering::SeqCst) + 1;
                self.run_state_max.fetch_max(now, Ordering::SeqCst);
            }
            // The client's own `Execute` (feature `ops`) does the work and the error mapping.
            let result = Execute::execute(&self.client, name, args).await;
            if run_state {
                self.run_state_now.fetch_sub(1, Ordering::SeqCst);
            }
            result
        })
    }
}

/// How one runtime connects (spawning the driver) and sleeps.
struct Rt {
    connect: fn(PathBuf) -> BoxFuture<'static, Result<Client, qmp_client::Error>>,
    sleep: fn(Duration) -> BoxFuture<'static, ()>,
}

/// A [`Sleep`] from a runtime's sleep function.
struct RtSleep(fn(Duration) -> BoxFuture<'static, ()>);

impl Sleep for RtSleep {
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        (self.0)(d)
    }
}

async fn connect(rt: &Rt, path: &Path) -> Arc<ClientExec> {
    let client = (rt.connect)(path.to_owned())
        .await
        .expect("connect to QEMU");
    Arc::new(ClientExec::new(client))
}

async fn read_only_policy_denies_quit_and_stop_without_sending_them(rt: &Rt) {
    let Some(mut qemu) = Launch::system().spawn() else {
        return;
    };
    let exec = connect(rt, qemu.socket_path()).await;
    let ops = Ops::builder(Arc::clone(&exec), Policy::read_only(), RtSleep(rt.sleep)).build();
    // The handshake's qmp_capabilities is already counted.
    let sent_before = exec.client.stats().requests_sent;
    for name in ["quit", "stop"] {
        let e = ops.execute(name, None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied, "{name}: {e}");
        assert_eq!(e.denial().unwrap().command, name);
    }
    assert_eq!(exec.count("quit") + exec.count("stop"), 0);
    assert_eq!(exec.client.stats().requests_sent, sent_before);
    // QEMU is still there and still paused (-S): neither command ran.
    let status = ops.query_status().await.unwrap();
    assert_eq!(
        (status.status, status.running),
        (RunState::Prelaunch, false)
    );
    assert!(!qemu.wait_exit(Duration::from_millis(100)));
    assert_eq!(exec.client.stats().requests_sent, sent_before + 1);
}

async fn vm_control_serialises_stop_and_cont(rt: &Rt) {
    let Some(qemu) = Launch::system().spawn() else {
        return;
    };
    let exec = connect(rt, qemu.socket_path()).await;
    let ops = Ops::builder(Arc::clone(&exec), Policy::vm_control(), RtSleep(rt.sleep)).build();
    for round in 0..10 {
        // Both are polled in this order in one pass, so they queue for the lock as cont, stop.
        let (cont, stop) = futures_util::join!(ops.cont(), ops.stop());
        assert!(
            cont.is_ok() && stop.is_ok(),
            "round {round}: {cont:?} {stop:?}"
        );
    }
    assert_eq!((exec.count("cont"), exec.count("stop")), (10, 10));
    // They reached the client in the order they queued for the lock, round after round.
    let rounds: Vec<_> = (0..10).flat_map(|_| ["cont", "stop"]).collect();
    assert_eq!(*exec.sent.lock().unwrap(), rounds);
    assert_eq!(
        exec.run_state_max.load(Ordering::SeqCst),
        1,
        "stop and cont overlapped"
    );
    let status = ops.query_status().await.unwrap();
    assert_eq!((status.status, status.running), (RunState::Paused, false));
    assert_eq!(ops.active_locks(), 0);
}

/// Only on a single-threaded runtime: there the 50 calls all join the execution in one poll
/// pass, before the driver can read the reply. On a multi-threaded runtime the first call may
/// legitimately finish before the last one starts, and that one would then run anew.
async fn an_idempotent_rule_runs_one_chardev_add_for_50_identical_calls(rt: &Rt) {
    let Some(qemu) = Launch::storage_daemon().spawn() else {
        return;
    };
    let exec = connect(rt, qemu.socket_path()).await;
    let policy = Policy::read_only().rule("chardev-add", Rule::allow().idempotent(true));
    let ops = Ops::builder(Arc::clone(&exec), policy, RtSleep(rt.sleep)).build();
    let args = serde_json::json!({
        "id": "ops-rb0",
        "backend": {"type": "ringbuf", "data": {"size": 4096}}
    });
    let results = join_all((0..50).map(|_| ops.call("chardev-add", &args))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(exec.count("chardev-add"), 1);
    let chardevs: Vec<serde_json::Value> = ops
        .execute("query-chardev", None)
        .await
        .unwrap()
        .deserialize()
        .unwrap();
    let ours = chardevs.iter().filter(|c| c["label"] == "ops-rb0").count();
    assert_eq!(ours, 1, "{chardevs:?}");
    // Once it finished, the same call runs again (and QEMU refuses the duplicate id).
    let again = ops.call("chardev-add", &args).await.unwrap_err();
    assert_eq!(
        (again.kind(), again.to_string().as_str()),
        (
            ErrorKind::Command,
            "chardev-add failed after 1 attempt(s): qemu error: GenericError: Chardev with id \
             'ops-rb0' already exists"
        )
    );
    assert_eq!(exec.count("chardev-add"), 2);
}

#[derive(Default)]
struct RetryLog(Mutex<Vec<String>>);

impl Hooks for RetryLog {
    fn on_retry(&self, command: &str, attempt: u32, _delay: Duration, error: &ExecError) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{command} #{attempt}: {error}"));
    }
}

async fn a_retry_across_a_killed_and_restarted_daemon_succeeds_on_the_new_session(rt: &Rt) {
    let Some(mut first) = Launch::storage_daemon().spawn() else {
        return;
    };
    let path: Arc<Mutex<PathBuf>> = Arc::new(Mutex::new(first.socket_path().to_owned()));
    let connects = Arc::new(AtomicUsize::new(0));
    let reconnecting = {
        let (path, connects, connect) = (Arc::clone(&path), Arc::clone(&connects), rt.connect);
        Reconnecting::new(move || {
            let path = path.lock().unwrap().clone();
            connects.fetch_add(1, Ordering::SeqCst);
            let pending = connect(path);
            async move { pending.await.map(ClientExec::new) }
        })
    };
    let mut reconnected = reconnecting.subscribe();
    let exec = Arc::new(reconnecting);
    let hooks = Arc::new(RetryLog::default());
    let retry = RetryPolicy::default()
        .max_attempts(5)
        .backoff(Duration::from_millis(10), Duration::from_millis(100));
    let ops = Ops::builder(
        Arc::clone(&exec),
        Policy::read_only().default_retry(retry),
        RtSleep(rt.sleep),
    )
    .shared_hooks(hooks.clone())
    .seed(5)
    .build();

    let before = ops.query_version().await.unwrap();
    assert_eq!(exec.generation(), 1);

    first.kill();
    let Some(second) = Launch::storage_daemon().spawn() else {
        return;
    };
    *path.lock().unwrap() = second.socket_path().to_owned();

    let after = ops.query_version().await.unwrap();
    assert_eq!(after.qemu, before.qemu);
    assert_eq!(exec.generation(), 2);
    assert_eq!(connects.load(Ordering::SeqCst), 2);
    let log = hooks.0.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "{log:?}");
    // The old session saw QEMU go while the new daemon started: nothing was sent on it.
    assert_eq!(
        log[0],
        "query-version #1: not sent: the peer closed the connection"
    );
    let note = reconnected.next().await.unwrap();
    assert_eq!(note.generation, 2);
}

mod tokio_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p| {
            Box::pin(async move {
                let (c, conn) = qmp_tokio::connect_unix(p, Builder::new()).await?;
                qmp_tokio::spawn_connection(conn);
                Ok(c)
            })
        },
        sleep: |d| Box::pin(tokio::time::sleep(d)),
    };

    fn block_on<F: Future>(multi_thread: bool, f: F) -> F::Output {
        let mut b = if multi_thread {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        } else {
            tokio::runtime::Builder::new_current_thread()
        };
        b.enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn read_only_policy_denies_quit_and_stop_without_sending_them() {
        block_on(
            true,
            super::read_only_policy_denies_quit_and_stop_without_sending_them(&RT),
        );
    }

    #[test]
    fn vm_control_serialises_stop_and_cont() {
        block_on(true, super::vm_control_serialises_stop_and_cont(&RT));
    }

    #[test]
    fn an_idempotent_rule_runs_one_chardev_add_for_50_identical_calls() {
        block_on(
            false,
            super::an_idempotent_rule_runs_one_chardev_add_for_50_identical_calls(&RT),
        );
    }

    #[test]
    fn a_retry_across_a_killed_and_restarted_daemon_succeeds_on_the_new_session() {
        block_on(
            true,
            super::a_retry_across_a_killed_and_restarted_daemon_succeeds_on_the_new_session(&RT),
        );
    }
}

mod smol_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p| {
            Box::pin(async move {
                let (c, conn) = qmp_smol::connect_unix(p, Builder::new()).await?;
                qmp_smol::spawn_connection(conn).detach();
                Ok(c)
            })
        },
        sleep: |d| {
            Box::pin(async move {
                smol::Timer::after(d).await;
            })
        },
    };

    #[test]
    fn read_only_policy_denies_quit_and_stop_without_sending_them() {
        smol::block_on(super::read_only_policy_denies_quit_and_stop_without_sending_them(&RT));
    }

    #[test]
    fn vm_control_serialises_stop_and_cont() {
        smol::block_on(super::vm_control_serialises_stop_and_cont(&RT));
    }

    #[test]
    fn a_retry_across_a_killed_and_restarted_daemon_succeeds_on_the_new_session() {
        smol::block_on(
            super::a_retry_across_a_killed_and_restarted_daemon_succeeds_on_the_new_session(&RT),
        );
    }
}

mod async_std_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p| {
            Box::pin(async move {
                let (c, conn) = qmp_async_std::connect_unix(p, Builder::new()).await?;
                qmp_async_std::spawn_connection(conn);
                Ok(c)
            })
        },
        sleep: |d| Box::pin(async_std::task::sleep(d)),
    };

    #[test]
    fn read_only_policy_denies_quit_and_stop_without_sending_them() {
        async_std::task::block_on(
            super::read_only_policy_denies_quit_and_stop_without_sending_them(&RT),
        );
    }

    #[test]
    fn vm_control_serialises_stop_and_cont() {
        async_std::task::block_on(super::vm_control_serialises_stop_and_cont(&RT));
    }

    #[test]
    fn a_retry_across_a_killed_and_restarted_daemon_succeeds_on_the_new_session() {
        async_std::task::block_on(
            super::a_retry_across_a_killed_and_restarted_daemon_succeeds_on_the_new_session(&RT),
        );
    }
}
