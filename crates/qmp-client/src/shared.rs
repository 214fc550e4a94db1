//! State shared by the client handles and the driver.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Waker;
use std::time::Instant;

use futures_channel::oneshot;
use qmp_proto::{CloseReason, Outcome, Output, RequestId};

use crate::events::Subscriber;
use crate::rt::Timer;

pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) timer: Arc<dyn Timer>,
    pub(crate) supports_fds: bool,
    /// How many [`Handle`]s there are.
    handles: AtomicUsize,
}

/// A counted reference to the session, held by every `Client`. When the last one goes,
/// nothing can send on the session any more: it is closed (event streams end), and the driver
/// shuts the transport down and finishes.
pub(crate) struct Handle(Arc<Shared>);

impl Handle {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.handles.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(shared))
    }
}

impl Clone for Handle {
    fn clone(&self) -> Self {
        Self::new(&self.0)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.0.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.lock().close_now(&*self.0.timer);
        }
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handle")
    }
}

impl Deref for Handle {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub(crate) struct Inner {
    pub(crate) proto: qmp_proto::Connection,
    /// The latest `now` passed to the machine, so time never goes backwards.
    last_now: Instant,
    pub(crate) waiters: BTreeMap<RequestId, oneshot::Sender<Outcome>>,
    pub(crate) subscribers: Vec<Weak<Subscriber>>,
    #[cfg(unix)]
    pub(crate) fds: BTreeMap<RequestId, Vec<std::os::fd::OwnedFd>>,
    pub(crate) closed: Option<CloseReason>,
    pub(crate) driver_waker: Option<Waker>,
    pub(crate) driver_done: bool,
    /// Notified when the driver has finished. A listener dropped unnotified leaves nothing.
    pub(crate) done: event_listener::Event,
    /// How many graceful closes are under way; while any is, new commands are refused.
    pub(crate) draining: usize,
    /// Notified when the last pending command finishes.
    pub(crate) idle: event_listener::Event,
    /// Until the handshake has returned its `Client`, nobody can have subscribed: events read
    /// meanwhile (QEMU may send some before or with the negotiation reply) wait here, up to
    /// `event_queue` of them, for the driver's first turn after the handshake.
    pub(crate) handshaking: bool,
    early: std::collections::VecDeque<qmp_proto::Event>,
    /// The builder's queue size: of each subscriber's queue, and of `early`.
    pub(crate) event_queue: usize,
    /// Names of the early events dropped for want of room, with how many of each (at most
    /// `MAX_DROPPED_NAMES` names), and how many more beyond those names.
    early_dropped: Vec<(String, u64)>,
    early_dropped_other: u64,
}

/// How many distinct names of dropped early events are remembered, and how long a name may
/// be (QEMU's are under 32 bytes); other drops count as lag for every subscriber.
const MAX_DROPPED_NAMES: usize = 64;
const MAX_NAME_LEN: usize = 128;

impl Shared {
    pub(crate) fn new(
        proto_config: qmp_proto::Config,
        timer: Arc<dyn Timer>,
        event_queue: usize,
        supports_fds: bool,
    ) -> Arc<Self> {
        let now = timer.now();
        Arc::new(Self {
            inner: Mutex::new(Inner {
                proto: qmp_proto::Connection::new(now, proto_config),
                last_now: now,
                waiters: BTreeMap::new(),
                subscribers: Vec::new(),
                #[cfg(unix)]
                fds: BTreeMap::new(),
                closed: None,
                driver_waker: None,
                driver_done: false,
                done: event_listener::Event::new(),
                draining: 0,
                idle: event_listener::Event::new(),
                handshaking: true,
                early: std::collections::VecDeque::new(),
                event_queue: event_queue.max(1),
                early_dropped: Vec::new(),
                early_dropped_other: 0,
            }),
            timer,
            supports_fds,
            handles: AtomicUsize::new(0),
        })
    }

    /// Locks the shared state.
    ///
    /// If a panic poisoned the lock, the machine may have been left half-updated, and writing
    /// from it could put corrupt bytes on the wire. The session is then closed instead: pending
    /// calls resolve, new ones fail, and the driver stops.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| {
            let mut guard = PoisonError::into_inner(poisoned);
            guard.close_now(&*self.timer);
            guard
        })
    }
}

impl Inner {
    /// A `now` for the machine: the timer's, never earlier than one already used.
    pub(crate) fn now(&mut self, timer: &dyn Timer) -> Instant {
        let now = timer.now().max(self.last_now);
        self.last_now = now;
        now
    }

    /// Closes the session now (if it is not already): every pending call resolves, streams
    /// end, and the driver is woken to shut the transport.
    pub(crate) fn close_now(&mut self, timer: &dyn Timer) {
        let now = self.now(timer);
        self.proto.close(now);
        self.dispatch();
        self.wake_driver();
    }

    pub(crate) fn wake_driver(&mut self) {
        if let Some(w) = self.driver_waker.take() {
            w.wake();
        }
    }

    /// Drops what is kept for request `id` (its caller's channel and its descriptors) and
    /// returns the channel.
    fn release(&mut self, id: RequestId) -> Option<oneshot::Sender<Outcome>> {
        #[cfg(unix)]
        self.fds.remove(&id);
        let tx = self.waiters.remove(&id);
        if self.waiters.is_empty() {
            self.wake_idle();
        }
        tx
    }

    /// Forgets a request whose caller went away.
    pub(crate) fn abandon(&mut self, id: RequestId) {
        self.release(id);
        if self.proto.abandon(id) {
            self.wake_driver();
        }
    }

    /// Routes every output of the machine: completions to their callers, events to the
    /// subscribers, and the close to everyone.
    pub(crate) fn dispatch(&mut self) {
        // Any drop leaves the buffer full, so an empty one has nothing to report either.
        if !self.handshaking && !self.early.is_empty() {
            self.flush_early();
        }
        while let Some(out) = self.proto.poll_output() {
            match out {
                Output::Completed { id, outcome } => {
                    if let Some(tx) = self.release(id) {
                        // The caller may have gone; then nobody wants the outcome.
                        let _ = tx.send(outcome);
                    }
                }
                Output::Event(ev) if self.handshaking => {
                    if self.early.len() == self.event_queue
                        && let Some(old) = self.early.pop_front()
                    {
                        self.count_dropped(old.name);
                    }
                    self.early.push_back(ev);
                }
                Output::Event(ev) => self.route(&ev),
                Output::Closed(reason) => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!(?reason, "qmp connection closed");
                    for sub in self.subscribers.drain(..).filter_map(|w| w.upgrade()) {
                        sub.close(&reason);
                    }
                    self.closed = Some(reason);
                    // Every request has been completed before the close output; any waiter
                    // left belongs to nothing.
                    self.waiters.clear();
                    self.wake_idle();
                }
                Output::Anomaly(_a) => {
                    #[cfg(feature = "tracing")]
                    tracing::warn!(anomaly = ?_a, "qmp protocol anomaly");
                }
                Output::Greeting(_) | Output::Ready(_) => {}
                _ => {}
            }
        }
    }

    fn count_dropped(&mut self, name: String) {
        if let Some((_, n)) = self.early_dropped.iter_mut().find(|(n, _)| *n == name) {
            *n += 1;
        } else if self.early_dropped.len() < MAX_DROPPED_NAMES && name.len() <= MAX_NAME_LEN {
            self.early_dropped.push((name, 1));
        } else {
            self.early_dropped_other += 1;
        }
    }

    /// Hands the events kept from the handshake to the caller's own subscriptions, each told
    /// first how many it lost to the full buffer.
    fn flush_early(&mut self) {
        let early = std::mem::take(&mut self.early);
        let dropped = std::mem::take(&mut self.early_dropped);
        let other = std::mem::take(&mut self.early_dropped_other);
        self.subscribers.retain(|w| w.strong_count() > 0);
        for sub in self.subscribers.iter().filter_map(Weak::upgrade) {
            if !sub.backlog {
                continue;
            }
            let lost: u64 = dropped
                .iter()
                .filter(|(name, _)| sub.wants(name))
                .map(|(_, n)| n)
                .sum();
            sub.lag(lost + other);
            for ev in &early {
                sub.offer(ev);
            }
        }
    }

    /// Offers `ev` to every live subscriber, forgetting those gone.
    fn route(&mut self, ev: &qmp_proto::Event) {
        self.subscribers.retain(|w| match w.upgrade() {
            Some(sub) => {
                sub.offer(ev);
                true
            }
            None => false,
        });
    }

    /// Wakes whoever waits for the last pending command to finish.
    pub(crate) fn wake_idle(&mut self) {
        // Only a graceful close listens, and it counts itself in `draining` first.
        if self.draining > 0 {
            self.idle.notify(usize::MAX);
        }
    }

    /// Marks the driver finished and wakes whoever waits for it.
    pub(crate) fn finish_driver(&mut self) {
        self.driver_done = true;
        self.driver_waker = None;
        self.done.notify(usize::MAX);
        self.wake_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rt::Sleep;

    struct NoTimer;

    impl Timer for NoTimer {
        fn sleep_until(&self, _deadline: Instant) -> Sleep {
            Box::pin(std::future::pending())
        }
    }

    #[test]
    fn a_panic_under_the_lock_closes_the_session() {
        let shared = Shared::new(qmp_proto::Config::default(), Arc::new(NoTimer), 8, false);
        let queued = {
            let mut inner = shared.lock();
            let now = inner.now(&NoTimer);
            let id = inner
                .proto
                .send(now, qmp_proto::Command::new("query-status"))
                .unwrap();
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(id, tx);
            rx
        };
        let s = Arc::clone(&shared);
        let result = std::thread::spawn(move || {
            let _guard = s.lock();
            panic!("a bug while the state is borrowed");
        })
        .join();
        assert!(result.is_err(), "the thread panicked");
        let inner = shared.lock();
        assert!(inner.proto.is_closed());
        assert_eq!(inner.proto.poll_transmit(), None, "nothing more is written");
        drop(inner);
        let outcome = futures_executor::block_on(queued).expect("resolved");
        assert_eq!(outcome, Outcome::NotSent(qmp_proto::Failure::LocalClose));
    }
}
