//! A per-key, FIFO-fair async mutex with no runtime in it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// An async mutual exclusion per key.
///
/// Holders of different keys never wait for each other. For one key, waiters are granted the
/// lock in the order [`KeyedMutex::lock`] was called (FIFO), and the lock is handed directly to
/// the next waiter on release, so no later caller can overtake. A key's entry exists only while
/// someone holds or waits for it: the map does not grow with keys that are no longer used.
///
/// It uses only `std` and [`Waker`]s: it works on any executor. It does no I/O and reads no
/// clock.
///
/// # Cancel safety
/// Dropping a [`Lock`] future before it completes removes it from the queue; if the lock had
/// already been handed to it, the lock passes on to the next waiter. Nothing is lost or leaked.
///
/// # Example
/// ```
/// let locks = qmp_ops::KeyedMutex::new();
/// futures_executor::block_on(async {
///     let held = locks.lock("vm-1").await;
///     let other = locks.lock("vm-2").await; // another key: no waiting
///     assert_eq!(locks.active_keys(), 2);
///     drop((held, other));
///     assert_eq!(locks.active_keys(), 0); // no entry outlives its last user
/// });
/// ```
pub struct KeyedMutex<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    state: Mutex<State<K>>,
}

struct State<K> {
    next_ticket: u64,
    entries: HashMap<K, Entry>,
}

struct Entry {
    /// The ticket that holds the lock (granted, possibly not yet polled).
    owner: u64,
    /// Waiting tickets in arrival order, with the waker of their last poll.
    queue: VecDeque<(u64, Option<Waker>)>,
}

impl<K> Clone for KeyedMutex<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Eq + Hash + Clone> Default for KeyedMutex<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> fmt::Debug for KeyedMutex<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedMutex").finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone> KeyedMutex<K> {
    /// An empty mutex map.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    next_ticket: 0,
                    entries: HashMap::new(),
                }),
            }),
        }
    }

    /// Queues for the lock on `key`. The place in the queue is taken now, at the call, not at
    /// the first poll.
    ///
    /// # Cancel safety
    /// See the type's documentation: dropping the future is always safe.
    pub fn lock(&self, key: K) -> Lock<K> {
        let mut st = self.inner.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        match st.entries.get_mut(&key) {
            Some(entry) => entry.queue.push_back((ticket, None)),
            None => {
                st.entries.insert(
                    key.clone(),
                    Entry {
                        owner: ticket,
                        queue: VecDeque::new(),
                    },
                );
            }
        }
        drop(st);
        Lock {
            inner: Some(Arc::clone(&self.inner)),
            key: Some(key),
            ticket,
        }
    }

    /// How many keys currently have a holder or a waiter.
    pub fn active_keys(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether a ticket issued after `ticket` holds or waits for `key`: someone asked for the
    /// lock later and has not given up.
    pub(crate) fn taken_after(&self, key: &K, ticket: u64) -> bool {
        self.inner
            .lock()
            .entries
            .get(key)
            .is_some_and(|e| e.owner > ticket || e.queue.back().is_some_and(|&(t, _)| t > ticket))
    }

    /// How many callers wait (not counting the holder) for `key`.
    pub fn waiters(&self, key: &K) -> usize {
        self.inner
            .lock()
            .entries
            .get(key)
            .map_or(0, |e| e.queue.len())
    }
}

impl<K> Inner<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // A panic while holding this std mutex cannot leave the map inconsistent (every update
        // is a single step), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<K: Eq + Hash> Inner<K> {
    /// Passes the lock on `key` held by `ticket` to the next waiter, or removes the entry.
    fn release(&self, key: &K, ticket: u64) {
        let mut st = self.lock();
        let Some(entry) = st.entries.get_mut(key) else {
            return;
        };
        if entry.owner != ticket {
            return;
        }
        match entry.queue.pop_front() {
            Some((next, waker)) => {
                entry.owner = next;
                drop(st);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            None => {
                st.entries.remove(key);
            }
        }
    }

    /// Removes a waiting `ticket` that gave up; hands the lock on if it was already its turn.
    fn cancel(&self, key: &K, ticket: u64) {
        let mut st = self.lock();
        let Some(entry) = st.entries.get_mut(key) else {
            return;
        };
        if entry.owner == ticket {
            drop(st);
            self.release(key, ticket);
            return;
        }
        let place = entry.queue.iter().position(|&(t, _)| t == ticket);
        let gone = place.and_then(|i| entry.queue.remove(i));
        drop(st);
        // Its waker goes after the unlock: dropping the last one may drop a task whose future
        // holds another lock of this map.
        drop(gone);
    }
}

/// The future returned by [`KeyedMutex::lock`]; resolves to a [`KeyedGuard`].
#[must_use = "the lock is only taken when the future is awaited"]
pub struct Lock<K: Eq + Hash> {
    inner: Option<Arc<Inner<K>>>,
    key: Option<K>,
    ticket: u64,
}

impl<K: Eq + Hash> fmt::Debug for Lock<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash> Lock<K> {
    /// This request's place in line: tickets are issued in increasing order, across keys.
    pub(crate) fn ticket(&self) -> u64 {
        self.ticket
    }
}

impl<K: Eq + Hash> Unpin for Lock<K> {}

impl<K: Eq + Hash> Future for Lock<K> {
    type Output = KeyedGuard<K>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let inner = this.inner.as_ref().expect("Lock polled after completion");
        let key = this.key.as_ref().expect("Lock polled after completion");
        {
            let mut st = inner.lock();
            let entry = st
                .entries
                .get_mut(key)
                .expect("a queued ticket keeps its entry alive");
            if entry.owner != this.ticket {
                let mut old = None;
                if let Some(slot) = entry.queue.iter_mut().find(|(t, _)| *t == this.ticket) {
                    match &mut slot.1 {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        w => old = w.replace(cx.waker().clone()),
                    }
                }
                // The replaced waker goes after the unlock, as in `cancel`.
                drop(st);
                drop(old);
                return Poll::Pending;
            }
        }
        let inner = this.inner.take().expect("checked above");
        let key = this.key.take().expect("checked above");
        Poll::Ready(KeyedGuard {
            inner,
            key: Some(key),
            ticket: this.ticket,
        })
    }
}

impl<K: Eq + Hash> Drop for Lock<K> {
    fn drop(&mut self) {
        if let (Some(inner), Some(key)) = (self.inner.take(), self.key.take()) {
            inner.cancel(&key, self.ticket);
        }
    }
}

/// Holds the lock on one key; dropping it hands the lock to the next waiter.
#[must_use = "dropping the guard releases the lock at once"]
pub struct KeyedGuard<K: Eq + Hash> {
    inner: Arc<Inner<K>>,
    key: Option<K>,
    ticket: u64,
}

impl<K: Eq + Hash> KeyedGuard<K> {
    /// The key this guard holds.
    pub fn key(&self) -> &K {
        self.key.as_ref().expect("present until drop")
    }
}

impl<K: Eq + Hash + fmt::Debug> fmt::Debug for KeyedGuard<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedGuard")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash> Drop for KeyedGuard<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.inner.release(&key, self.ticket);
        }
    }
}
