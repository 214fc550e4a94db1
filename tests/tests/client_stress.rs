//! Stress against one real qemu-storage-daemon, on tokio (two workers), smol and async-std.
//!
//! - 100,000 commands from 64 concurrent tasks; each task owns a ringbuf chardev and checks
//!   that every `ringbuf-read` returns exactly the string it wrote just before, and that a
//!   `blockdev-del` of a node name of its own between them fails naming that node, so a reply
//!   routed to the wrong task would show up as a mismatch.
//! - A cancellation storm: thousands of calls dropped at random points (before being written,
//!   while queued, while in flight), after which the session still answers correctly and no
//!   request is left pending. The client's counters show that some dropped calls were never
//!   written and some were dropped in flight (their replies counted as late).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::{Either, select};
use qmp_client::{Builder, Client};
use qmp_testkit::launch::Launch;
use qmp_tests::yield_now;
use serde::de::IgnoredAny;
use serde_json::json;

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the tests need from a runtime.
struct Rt {
    /// Connects and spawns the driver.
    connect: fn(std::path::PathBuf) -> BoxFut<Client>,
    /// Spawns a task on the runtime's pool; the future is its result.
    spawn: fn(BoxFut<u64>) -> BoxFut<u64>,
    /// The runtime's timer.
    sleep: fn(Duration) -> BoxFut<()>,
}

const TASKS: usize = 64;

async fn add_ringbuf(c: &Client, id: &str) {
    let _: IgnoredAny = c
        .execute(
            "chardev-add",
            &json!({"id": id, "backend": {"type": "ringbuf", "data": {"size": 4096}}}),
        )
        .await
        .unwrap();
}

/// Writes then reads back `rounds` unique strings on ringbuf `id`, with a `blockdev-del` of a
/// node name of its own between them (when `del`); returns the replies that were not this
/// task's.
async fn echo_rounds(c: Client, id: String, rounds: usize, del: bool) -> u64 {
    let mut mismatches = 0;
    for k in 0..rounds {
        let data = format!("{id}-{k}");
        let _: IgnoredAny = c
            .execute("ringbuf-write", &json!({"device": id, "data": data}))
            .await
            .unwrap();
        if del {
            let e = c
                .execute_raw("blockdev-del", &json!({"node-name": data}))
                .await
                .unwrap_err();
            let desc = &e.server_error().expect("QEMU's error").desc;
            if *desc != format!("Failed to find node with node-name='{data}'") {
                mismatches += 1;
                eprintln!("mismatch on {id}: deleted {data:?}, got {desc:?}");
            }
        }
        let back: String = c
            .execute("ringbuf-read", &json!({"device": id, "size": 4096}))
            .await
            .unwrap();
        if back != data {
            mismatches += 1;
            eprintln!("mismatch on {id}: wrote {data:?}, read {back:?}");
        }
    }
    mismatches
}

async fn hundred_thousand_commands_from_64_tasks_all_correlated(rt: &Rt) {
    let Some(q) = Launch::storage_daemon().spawn() else {
        return;
    };
    let c = (rt.connect)(q.socket_path().into()).await;
    for t in 0..TASKS {
        add_ringbuf(&c, &format!("t{t}")).await;
    }
    // 64 ringbuf chardevs were added: 64 commands; each round is three more.
    let rounds = (100_000 - TASKS).div_ceil(3 * TASKS);
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            (rt.spawn)(Box::pin(echo_rounds(
                c.clone(),
                format!("t{t}"),
                rounds,
                true,
            )))
        })
        .collect();
    let mut mismatches = 0;
    for t in tasks {
        mismatches += t.await;
    }
    let elapsed = start.elapsed();
    let st = c.stats();
    println!(
        "{} commands in {elapsed:?} ({:.0}/s)",
        st.replies,
        st.replies as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(mismatches, 0);
    // One reply per command (100,096); one more request, the negotiation.
    let commands = TASKS + 3 * TASKS * rounds;
    assert_eq!(commands, 100_096);
    assert_eq!(
        (st.replies as usize, st.requests_sent as usize),
        (commands, commands + 1),
        "{st:?}"
    );
    assert_eq!(
        (st.late_replies, st.unknown_replies, st.anomalies),
        (0, 0, 0)
    );
    assert_eq!(c.pending(), 0);
}

/// Yields to the executor `n` times, or for odd `n` sleeps about `n` * 20 µs, so calls are
/// dropped before being written, while queued, and while in flight.
async fn drop_point(sleep: fn(Duration) -> BoxFut<()>, n: u32) {
    if n % 2 == 1 {
        sleep(Duration::from_micros(u64::from(n) * 20)).await;
    } else {
        for _ in 0..n {
            yield_now().await;
        }
    }
}

async fn cancellation_storm_leaves_a_correct_session(rt: &Rt) {
    let Some(q) = Launch::storage_daemon().spawn() else {
        return;
    };
    let c = (rt.connect)(q.socket_path().into()).await;
    let finished = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let sleep = rt.sleep;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let c = c.clone();
            let (finished, dropped) = (Arc::clone(&finished), Arc::clone(&dropped));
            (rt.spawn)(Box::pin(async move {
                let mut rng = fastrand::Rng::with_seed(t as u64);
                for k in 0..80 {
                    let name = format!("n{t}-{k}");
                    let call = Box::pin(async {
                        c.execute_raw("blockdev-del", &json!({ "node-name": name }))
                            .await
                    });
                    match select(call, Box::pin(drop_point(sleep, rng.u32(0..200)))).await {
                        Either::Left((res, _)) => {
                            let e = res.unwrap_err();
                            assert_eq!(
                                e.server_error().unwrap().desc,
                                format!("Failed to find node with node-name='{name}'")
                            );
                            finished.fetch_add(1, Ordering::Relaxed);
                        }
                        Either::Right(_) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                0
            }))
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let (finished, dropped) = (
        finished.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
    );
    println!("storm: {finished} answered, {dropped} dropped");
    assert_eq!(finished + dropped, (TASKS * 80) as u64);
    assert!(dropped > 1000, "the storm dropped too few calls: {dropped}");
    assert!(finished > 100, "too few calls finished: {finished}");
    assert_eq!(c.pending(), 0);
    // Nor does the client keep a channel or descriptors for any of them.
    let state = format!("{c:?}");
    assert!(state.contains(", waiters: 0, fd_sets: 0, "), "{state}");
    let storm = c.stats();
    // The negotiation, then the storm calls that were written: the others were dropped
    // before being written (still queued behind the in-flight cap, or not yet flushed).
    let written = storm.requests_sent - 1;
    assert!(
        written < (TASKS * 80) as u64,
        "every storm call was written: {storm:?}"
    );

    // The session still answers correctly, reply for reply.
    for t in 0..TASKS {
        add_ringbuf(&c, &format!("s{t}")).await;
    }
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| (rt.spawn)(Box::pin(echo_rounds(c.clone(), format!("s{t}"), 20, false))))
        .collect();
    for t in tasks {
        assert_eq!(t.await, 0);
    }
    assert_eq!(c.pending(), 0);
    assert_eq!(c.in_flight(), 0);
    let st = c.stats();
    assert_eq!(st.unknown_replies, 0, "{st:?}");
    // After the storm, exactly the 64 `chardev-add` and 64 * 20 * 2 ringbuf commands were
    // written: no dropped storm call was written late.
    let after = (TASKS + TASKS * 20 * 2) as u64;
    assert_eq!(st.requests_sent, storm.requests_sent + after, "{st:?}");
    // Every reply is either delivered or counted as late; none is lost or misrouted.
    assert_eq!(st.replies + st.late_replies, st.requests_sent - 1, "{st:?}");
    // Calls dropped in flight: written, then abandoned, their replies arriving late.
    assert!(st.late_replies > 0, "no call was dropped in flight: {st:?}");
    // Storm replies delivered: every finished call, plus any whose reply was delivered just
    // as the call was dropped.
    let storm_replies = st.replies - after;
    assert!(storm_replies >= finished, "{st:?} {finished}");
    assert!(st.late_replies <= dropped, "{st:?} {dropped}");
    println!(
        "storm: {} never written, {} dropped in flight",
        (TASKS * 80) as u64 - written,
        st.late_replies
    );
    let close = c.close();
    let limit = (rt.sleep)(Duration::from_secs(5));
    match select(Box::pin(close), limit).await {
        Either::Left(_) => {}
        Either::Right(_) => panic!("close took over 5 s"),
    }
}

macro_rules! stress_on {
    ($rt:expr, $block_on:expr) => {
        #[test]
        fn hundred_thousand_commands_from_64_tasks_all_correlated() {
            $block_on(super::hundred_thousand_commands_from_64_tasks_all_correlated(&$rt));
        }
        #[test]
        fn cancellation_storm_leaves_a_correct_session() {
            $block_on(super::cancellation_storm_leaves_a_correct_session(&$rt));
        }
    };
}

mod tokio_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p| {
            Box::pin(async move {
                let (c, conn) = qmp_tokio::connect_unix(p, Builder::new()).await.unwrap();
                qmp_tokio::spawn_connection(conn);
                c
            })
        },
        spawn: |f| {
            let h = tokio::spawn(f);
            Box::pin(async move { h.await.unwrap() })
        },
        sleep: |d| Box::pin(tokio::time::sleep(d)),
    };

    stress_on!(RT, qmp_tests::tokio_block_on);
}

mod smol_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p| {
            Box::pin(async move {
                let (c, conn) = qmp_smol::connect_unix(p, Builder::new()).await.unwrap();
                qmp_smol::spawn_connection(conn).detach();
                c
            })
        },
        spawn: |f| Box::pin(smol::spawn(f)),
        sleep: |d| {
            Box::pin(async move {
                smol::Timer::after(d).await;
            })
        },
    };

    stress_on!(RT, smol::block_on);
}

mod async_std_rt {
    use super::*;

    const RT: Rt = Rt {
        connect: |p| {
            Box::pin(async move {
                let (c, conn) = qmp_async_std::connect_unix(p, Builder::new())
                    .await
                    .unwrap();
                drop(qmp_async_std::spawn_connection(conn));
                c
            })
        },
        spawn: |f| Box::pin(async_std::task::spawn(f)),
        sleep: |d| Box::pin(async_std::task::sleep(d)),
    };

    stress_on!(RT, async_std::task::block_on);
}
