//! The per-key mutex: FIFO handoff, independence of keys, cancellation, no leftover entries.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use common::poll_once;
use futures_executor::block_on;
use futures_util::task::{ArcWake, waker};
use qmp_ops::KeyedMutex;

#[test]
fn waiters_get_the_lock_in_call_order_whatever_the_poll_order() {
    let m = KeyedMutex::new();
    let g0 = block_on(m.lock("vm"));
    let mut l1 = m.lock("vm");
    let mut l2 = m.lock("vm");
    let mut l3 = m.lock("vm");
    // Poll the latest first: nobody may jump the queue.
    assert!(poll_once(&mut l3).is_pending());
    assert!(poll_once(&mut l2).is_pending());
    assert!(poll_once(&mut l1).is_pending());
    assert_eq!(m.waiters(&"vm"), 3);
    drop(g0);
    assert!(poll_once(&mut l3).is_pending());
    assert!(poll_once(&mut l2).is_pending());
    let Poll::Ready(g1) = poll_once(&mut l1) else {
        panic!("first waiter must get the lock")
    };
    assert!(poll_once(&mut l3).is_pending());
    drop(g1);
    assert!(poll_once(&mut l3).is_pending());
    let Poll::Ready(g2) = poll_once(&mut l2) else {
        panic!("second waiter next")
    };
    drop(g2);
    let Poll::Ready(g3) = poll_once(&mut l3) else {
        panic!("third waiter last")
    };
    assert_eq!(*g3.key(), "vm");
    drop(g3);
    assert_eq!(m.active_keys(), 0);
}

#[test]
fn different_keys_do_not_wait_for_each_other() {
    let m = KeyedMutex::new();
    let _a = block_on(m.lock(1));
    let mut b = m.lock(2);
    let Poll::Ready(gb) = poll_once(&mut b) else {
        panic!("key 2 is free")
    };
    assert_eq!(m.active_keys(), 2);
    drop(gb);
    assert_eq!(m.active_keys(), 1);
}

struct Count(AtomicUsize);
impl ArcWake for Count {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn release_wakes_exactly_the_next_waiter() {
    let m = KeyedMutex::new();
    let g0 = block_on(m.lock("k"));
    let c1 = Arc::new(Count(AtomicUsize::new(0)));
    let c2 = Arc::new(Count(AtomicUsize::new(0)));
    let w1 = waker(c1.clone());
    let w2 = waker(c2.clone());
    let mut l1 = m.lock("k");
    let mut l2 = m.lock("k");
    assert!(
        Pin::new(&mut l1)
            .poll(&mut Context::from_waker(&w1))
            .is_pending()
    );
    assert!(
        Pin::new(&mut l2)
            .poll(&mut Context::from_waker(&w2))
            .is_pending()
    );
    drop(g0);
    assert_eq!(c1.0.load(Ordering::SeqCst), 1);
    assert_eq!(c2.0.load(Ordering::SeqCst), 0);
    drop(l1); // granted but never polled again: passes the lock on and wakes l2
    assert_eq!(c2.0.load(Ordering::SeqCst), 1);
    assert!(poll_once(&mut l2).is_ready());
}

#[test]
fn a_dropped_waiter_leaves_the_queue() {
    let m = KeyedMutex::new();
    let g0 = block_on(m.lock("k"));
    let mut l1 = m.lock("k");
    let mut l2 = m.lock("k");
    assert!(poll_once(&mut l1).is_pending());
    drop(l1);
    assert_eq!(m.waiters(&"k"), 1);
    drop(g0);
    let Poll::Ready(g2) = poll_once(&mut l2) else {
        panic!("l2 is next after l1 left")
    };
    drop(g2);
    assert_eq!(m.active_keys(), 0);
}

#[test]
fn unused_keys_leave_no_entries() {
    let m = KeyedMutex::new();
    for i in 0..1000 {
        let g = block_on(m.lock(i));
        let never_polled = m.lock(i);
        drop(never_polled);
        drop(g);
    }
    assert_eq!(m.active_keys(), 0);
    let l = m.lock(5);
    drop(l); // dropped before its first poll while it was already the owner
    assert_eq!(m.active_keys(), 0);
}

#[test]
fn threads_contending_for_one_key_never_overlap() {
    let m = KeyedMutex::new();
    let inside = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (m, inside, total) = (m.clone(), inside.clone(), total.clone());
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let g = block_on(m.lock("shared"));
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    total.fetch_add(1, Ordering::SeqCst);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(total.load(Ordering::SeqCst), 800);
    assert_eq!(m.active_keys(), 0);
}

/// A waker that, when its last copy is dropped, runs a function: as the last waker of a task
/// whose future holds (or asks for) a lock of the same map would.
struct DropProbe(Box<dyn Fn() + Send + Sync>);

impl ArcWake for DropProbe {
    fn wake_by_ref(_: &Arc<Self>) {}
}

impl Drop for DropProbe {
    fn drop(&mut self) {
        (self.0)();
    }
}

#[test]
fn a_waiter_s_old_waker_is_dropped_after_the_map_is_unlocked() {
    let (report, outcome) = std::sync::mpsc::channel();
    // On a thread of its own: before the fix this deadlocked.
    std::thread::spawn(move || {
        let m = KeyedMutex::new();
        let _held = block_on(m.lock("vm"));
        let probed = Arc::new(AtomicUsize::new(0));
        let probe = |m: &KeyedMutex<&'static str>| {
            let (m, probed) = (m.clone(), Arc::clone(&probed));
            waker(Arc::new(DropProbe(Box::new(move || {
                // Uses the map, as a dropped task's `Lock` or guard would.
                probed.fetch_add(m.waiters(&"vm"), Ordering::SeqCst);
            }))))
        };
        // Replaced by a poll with another waker.
        let mut replaced = m.lock("vm");
        let w = probe(&m);
        assert!(Future::poll(Pin::new(&mut replaced), &mut Context::from_waker(&w)).is_pending());
        drop(w);
        assert!(poll_once(&mut replaced).is_pending());
        // Dropped with its waiter.
        let mut cancelled = m.lock("vm");
        let w = probe(&m);
        assert!(Future::poll(Pin::new(&mut cancelled), &mut Context::from_waker(&w)).is_pending());
        drop(w);
        drop(cancelled);
        report.send(probed.load(Ordering::SeqCst)).unwrap();
    });
    let probed = outcome
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("no deadlock");
    // Each probe ran once and saw one waiter: `replaced` (the dropped one had left).
    assert_eq!(probed, 1 + 1);
}
