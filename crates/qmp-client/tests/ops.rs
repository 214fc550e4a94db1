//! `qmp_ops::Execute` for `Client`: outcomes mapped by send status.

mod support;

use std::time::Duration;

use futures_executor::LocalPool;
use futures_util::task::LocalSpawnExt;
use qmp_client::{Builder, Client, ErrorClass};
use qmp_ops::{BoxFuture, ExecError, Execute, Sleep};
use qmp_proto::Failure;
use serde_json::value::RawValue;
use support::{ManualTimer, Server, pipe};

/// A sleeper whose sleeps never end.
struct NeverWakes;

impl Sleep for NeverWakes {
    fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
        Box::pin(futures_util::future::pending())
    }
}

/// A session past its handshake, its driver spawned on the pool.
fn session(builder: Builder, timer: ManualTimer) -> (LocalPool, Server, Client) {
    let mut pool = LocalPool::new();
    let sp = pool.spawner();
    let (io, srv) = pipe();
    let (tx, mut rx) = futures_channel::oneshot::channel();
    sp.spawn_local(async move {
        let _ = tx.send(builder.handshake(io, timer).await);
    })
    .unwrap();
    srv.greet();
    pool.run_until_stalled();
    srv.take();
    srv.send(r#"{"return": {}, "id": 0}"#);
    pool.run_until_stalled();
    let (client, conn) = rx.try_recv().unwrap().unwrap().unwrap();
    sp.spawn_local(async move {
        let _ = conn.await;
    })
    .unwrap();
    (pool, srv, client)
}

#[test]
fn execute_maps_replies_errors_and_closed_sessions() {
    let (mut pool, srv, client) = session(Builder::new(), ManualTimer::new());
    let sp = pool.spawner();

    let c = client.clone();
    let (tx, mut rx) = futures_channel::oneshot::channel();
    sp.spawn_local(async move {
        let args = RawValue::from_string(r#"{"device": "r0"}"#.to_owned()).unwrap();
        let ok = Execute::execute(&c, "ringbuf-read", Some(&args)).await;
        let err = Execute::execute(&c, "nope", None).await;
        let _ = tx.send((ok, err));
    })
    .unwrap();
    pool.run_until_stalled();
    assert_eq!(
        srv.take(),
        r#"{"execute":"ringbuf-read","arguments":{"device": "r0"},"id":1}"#
    );
    srv.send(r#"{"return": "abc", "id": 1}"#);
    pool.run_until_stalled();
    assert_eq!(srv.take(), r#"{"execute":"nope","id":2}"#);
    srv.send(r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 2}"#);
    pool.run_until_stalled();
    let (ok, err) = rx.try_recv().unwrap().unwrap();
    assert_eq!(ok.unwrap().get(), "\"abc\"");
    match err.unwrap_err() {
        ExecError::Command(e) => assert_eq!(e.class, ErrorClass::CommandNotFound),
        other => panic!("{other:?}"),
    }

    srv.hang_up();
    pool.run_until_stalled();
    let c = client.clone();
    let (tx, mut rx) = futures_channel::oneshot::channel();
    sp.spawn_local(async move {
        let _ = tx.send(Execute::execute(&c, "x", None).await);
    })
    .unwrap();
    pool.run_until_stalled();
    match rx.try_recv().unwrap().unwrap().unwrap_err() {
        ExecError::NotSent(f) => assert_eq!(f, Failure::PeerClosed),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_timeout_before_the_request_left_the_queue_is_not_sent() {
    let timer = ManualTimer::new();
    let (mut pool, srv, client) = session(Builder::new().max_in_flight(1), timer.clone());
    let sp = pool.spawner();

    let second = Duration::from_secs(1);
    let c = client.clone();
    let (tx, mut rx) = futures_channel::oneshot::channel();
    sp.spawn_local(async move {
        // One slot: "a" goes out, "b" waits in the queue behind it.
        // The client uses its own timer, not the sleeper (which never wakes).
        let a = Execute::execute_timeout(&c, "a", None, second, &NeverWakes);
        let b = Execute::execute_timeout(&c, "b", None, second, &NeverWakes);
        let _ = tx.send(futures_util::future::join(a, b).await);
    })
    .unwrap();
    pool.run_until_stalled();
    assert_eq!(srv.take(), r#"{"execute":"a","id":1}"#);
    timer.advance(second);
    pool.run_until_stalled();
    let (a, b) = rx.try_recv().unwrap().unwrap();
    assert_eq!(
        (a.unwrap_err(), b.unwrap_err()),
        (
            ExecError::Unknown(Failure::Timeout),
            ExecError::NotSent(Failure::Timeout)
        )
    );
    assert_eq!(srv.take(), "", "b never went out");
}
