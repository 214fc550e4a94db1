//! State shared by the client handles and the driver.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
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
    driver_waker: Option<Waker>,
    pub(crate) driver_done: bool,
    /// How many graceful closes are under way; while any is, new commands are refused.
    pub(crate) draining: usize,
    /// Told when the driver has finished.
    done_waiters: Vec<oneshot::Sender<()>>,
    /// Told when no command is pending any more.
    idle_waiters: Vec<oneshot::Sender<()>>,
    /// The wake-ups due, made when the lock is released (see [`Locked`]).
    wakes: Vec<Wake>,
    /// Until the handshake has returned its `Client`, nobody can have subscribed: events read
    /// meanwhile (QEMU may send some before or with the negotiation reply) wait here, up to
    /// `event_queue` of them, for the driver's first turn after the handshake.
    pub(crate) handshaking: bool,
    early: std::collections::VecDeque<Early>,
    /// How many of `early`'s items are events (what `event_queue` bounds).
    early_events: usize,
    /// The builder's queue size: of each subscriber's queue, and of `early`.
    pub(crate) event_queue: usize,
    /// Names of the early events dropped for want of room, with how many of each (at most
    /// `MAX_DROPPED_NAMES` names), and how many more beyond those names.
    early_dropped: Vec<(String, u64)>,
    early_dropped_other: u64,
}

/// Pushes `item` onto a list whose entries can go stale (their other end dropped). Stale ones
/// are dropped whenever the list is full, and it then keeps as much room again as it holds
/// live ones: it stays within about twice the most live at once, at amortised O(1) per push.
pub(crate) fn push_pruned<T>(list: &mut Vec<T>, item: T, live: impl FnMut(&T) -> bool) {
    if list.len() == list.capacity() {
        list.retain(live);
        list.reserve(list.len());
    }
    list.push(item);
}

/// Adds a waiter to `list` (see [`push_pruned`]).
fn wait_on(list: &mut Vec<oneshot::Sender<()>>) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    push_pruned(list, tx, |tx| !tx.is_canceled());
    rx
}

/// What the handshake read for the first subscribers: an event, or a message that could not
/// be read and may have been one.
#[derive(Debug)]
pub(crate) enum Early {
    Event(qmp_proto::Event),
    /// This many messages in a row that could not be read.
    Unreadable(u64),
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
                draining: 0,
                done_waiters: Vec::new(),
                idle_waiters: Vec::new(),
                wakes: Vec::new(),
                handshaking: true,
                early: std::collections::VecDeque::new(),
                early_events: 0,
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
    pub(crate) fn lock(&self) -> Locked<'_> {
        let guard = self.inner.lock().unwrap_or_else(|poisoned| {
            let mut guard = PoisonError::into_inner(poisoned);
            guard.close_now(&*self.timer);
            guard
        });
        Locked { guard: Some(guard) }
    }
}

/// A wake-up decided under the lock and made after it, so that no waker of the caller's tasks
/// runs (nor is dropped) while the session is locked: an executor that polls a task inside
/// `wake` (or drops its future with its last waker) could otherwise re-enter the lock and
/// deadlock. Replies and signals go through channels that wake their receivers, so they are
/// sent after the unlock too.
enum Wake {
    Task(Waker),
    /// A waker replaced or no longer needed, dropped after the unlock.
    Discard(Waker),
    /// The driver's timer future, replaced or done (it may hold a waker), dropped likewise.
    DiscardSleep(crate::rt::Sleep),
    Reply(oneshot::Sender<Outcome>, Outcome),
    /// One waiting for the driver's end or for no pending command.
    Signal(oneshot::Sender<()>),
}

impl Wake {
    fn fire(self) {
        match self {
            Self::Task(w) => w.wake(),
            Self::Discard(w) => drop(w),
            Self::DiscardSleep(s) => drop(s),
            // The caller may have gone; then nobody wants the outcome.
            Self::Reply(tx, outcome) => drop(tx.send(outcome)),
            Self::Signal(tx) => drop(tx.send(())),
        }
    }
}

/// The locked shared state. Dropping it unlocks, then makes the wake-ups decided meanwhile
/// (all of them, even if one panics).
pub(crate) struct Locked<'a> {
    guard: Option<MutexGuard<'a, Inner>>,
}

impl Deref for Locked<'_> {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        self.guard.as_deref().expect("held until dropped")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.guard.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        if guard.wakes.is_empty() {
            return;
        }
        let wakes = std::mem::take(&mut guard.wakes);
        drop(guard);
        // A waker that panics must not cost the others their wake-up (a lost reply, a driver
        // never woken): the first panic goes on once all are made.
        let mut panic = None;
        for wake in wakes {
            let fired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wake.fire()));
            if let Err(p) = fired {
                panic.get_or_insert(p);
            }
        }
        // Already unwinding (this guard dropped by a panic, or taken by a destructor that runs
        // during one): a second panic would abort.
        if let Some(p) = panic
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(p);
        }
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

    /// Wakes the driver (once the lock is released).
    pub(crate) fn wake_driver(&mut self) {
        let w = self.driver_waker.take();
        self.wake_later(w);
    }

    /// Wakes `waker`, if any, once the lock is released.
    fn wake_later(&mut self, waker: Option<Waker>) {
        if let Some(w) = waker {
            self.wakes.push(Wake::Task(w));
        }
    }

    /// Sets the driver's waker (unless it is the same), dropping the one it replaces once the
    /// lock is released.
    pub(crate) fn set_driver_waker(&mut self, waker: &Waker) {
        if self
            .driver_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(waker))
        {
            return;
        }
        if let Some(old) = self.driver_waker.replace(waker.clone()) {
            self.discard_waker(old);
        }
    }

    /// Drops `waker` once the lock is released.
    pub(crate) fn discard_waker(&mut self, waker: Waker) {
        self.wakes.push(Wake::Discard(waker));
    }

    /// Drops the driver's `sleep` once the lock is released.
    pub(crate) fn discard_sleep(&mut self, sleep: crate::rt::Sleep) {
        self.wakes.push(Wake::DiscardSleep(sleep));
    }

    /// Wakes whoever waits for no command to be pending, if none is.
    fn check_idle(&mut self) {
        if self.waiters.is_empty() {
            self.wake_idle();
        }
    }

    /// Drops what is kept for request `id` (its caller's channel and its descriptors) and
    /// returns the channel.
    fn release(&mut self, id: RequestId) -> Option<oneshot::Sender<Outcome>> {
        #[cfg(unix)]
        self.fds.remove(&id);
        self.waiters.remove(&id)
    }

    /// Forgets a request whose caller went away. Returns its channel, to be dropped after the
    /// lock is released (dropping it wakes the receiver's task).
    #[must_use = "the channel is to be dropped after the unlock"]
    pub(crate) fn abandon(&mut self, id: RequestId) -> Option<oneshot::Sender<Outcome>> {
        let tx = self.release(id);
        self.check_idle();
        if self.proto.abandon(id) {
            self.wake_driver();
        }
        tx
    }

    /// Routes every output of the machine: completions to their callers, events to the
    /// subscribers, and the close to everyone.
    pub(crate) fn dispatch(&mut self) {
        if !self.handshaking && (!self.early.is_empty() || self.early_dropped_other > 0) {
            self.flush_early();
        }
        while let Some(out) = self.proto.poll_output() {
            match out {
                Output::Completed { id, outcome } => {
                    if let Some(tx) = self.release(id) {
                        self.wakes.push(Wake::Reply(tx, outcome));
                    }
                    // After the reply: a graceful close waiting for it ends the session.
                    self.check_idle();
                }
                Output::Event(ev) if self.handshaking => {
                    self.keep_early(Early::Event(ev));
                }
                Output::Event(ev) => self.each_subscriber(|sub| sub.offer(&ev)),
                // Perhaps an event, of a name nobody can know: a loss for every stream.
                Output::Unreadable if self.handshaking => self.keep_early(Early::Unreadable(1)),
                Output::Unreadable => self.each_subscriber(|sub| sub.lag(1)),
                Output::Closed(reason) => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!(?reason, "qmp connection closed");
                    for sub in std::mem::take(&mut self.subscribers) {
                        if let Some(sub) = sub.upgrade() {
                            let w = sub.close(&reason);
                            self.wake_later(w);
                        }
                    }
                    self.closed = Some(reason);
                    // Every request has been completed before the close output; a waiter left
                    // would belong to nothing, and gets what a dropped channel means.
                    let lost = Outcome::Unknown(qmp_proto::Failure::LocalClose);
                    for tx in std::mem::take(&mut self.waiters).into_values() {
                        self.wakes.push(Wake::Reply(tx, lost.clone()));
                    }
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

    /// Keeps what the handshake read for the first subscribers, dropping the oldest (counted)
    /// when the buffer is full.
    fn keep_early(&mut self, item: Early) {
        match item {
            Early::Unreadable(n) => match self.early.back_mut() {
                // Merged, so markers never outnumber the events they sit between.
                Some(Early::Unreadable(m)) => *m += n,
                _ => self.early.push_back(Early::Unreadable(n)),
            },
            Early::Event(ev) => {
                if self.early_events == self.event_queue {
                    // Drop the oldest event, with the markers before it (counted for all).
                    while let Some(old) = self.early.pop_front() {
                        match old {
                            Early::Unreadable(m) => self.early_dropped_other += m,
                            Early::Event(old) => {
                                self.early_events -= 1;
                                self.count_dropped(old.name);
                                break;
                            }
                        }
                    }
                }
                self.early_events += 1;
                self.early.push_back(Early::Event(ev));
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
        self.early_events = 0;
        let dropped = std::mem::take(&mut self.early_dropped);
        let other = std::mem::take(&mut self.early_dropped_other);
        self.subscribers.retain(|w| w.strong_count() > 0);
        let wakes = &mut self.wakes;
        for sub in self.subscribers.iter().filter_map(Weak::upgrade) {
            if !sub.backlog {
                continue;
            }
            let lost: u64 = dropped
                .iter()
                .filter(|(name, _)| sub.wants(name))
                .map(|(_, n)| n)
                .sum();
            wakes.extend(sub.lag(lost + other).map(Wake::Task));
            for item in &early {
                let wake = match item {
                    Early::Event(ev) => sub.offer(ev),
                    // In its place among the events, as after the handshake.
                    Early::Unreadable(n) => sub.lag(*n),
                };
                wakes.extend(wake.map(Wake::Task));
            }
        }
    }

    /// Gives something to every live subscriber (`f` returns the waker to wake), forgetting
    /// those gone.
    fn each_subscriber(&mut self, f: impl Fn(&Subscriber) -> Option<Waker>) {
        let wakes = &mut self.wakes;
        self.subscribers.retain(|w| match w.upgrade() {
            Some(sub) => {
                wakes.extend(f(&sub).map(Wake::Task));
                true
            }
            None => false,
        });
    }

    /// Wakes whoever waits for the last pending command to finish.
    pub(crate) fn wake_idle(&mut self) {
        self.wakes
            .extend(self.idle_waiters.drain(..).map(Wake::Signal));
    }

    /// Marks the driver finished and wakes whoever waits for it.
    pub(crate) fn finish_driver(&mut self) {
        self.driver_done = true;
        if let Some(old) = self.driver_waker.take() {
            self.discard_waker(old);
        }
        self.wakes
            .extend(self.done_waiters.drain(..).map(Wake::Signal));
        self.wake_idle();
    }

    /// A receiver told when the driver has finished (or when the session is dropped).
    pub(crate) fn wait_done(&mut self) -> oneshot::Receiver<()> {
        wait_on(&mut self.done_waiters)
    }

    /// A receiver told when no command is pending any more, when the session closes, or when
    /// the driver finishes.
    pub(crate) fn wait_idle(&mut self) -> oneshot::Receiver<()> {
        wait_on(&mut self.idle_waiters)
    }

    /// How many wait on the driver's end (live or given up), and the list's capacity.
    #[cfg(test)]
    pub(crate) fn done_waiters(&self) -> (usize, usize) {
        (self.done_waiters.len(), self.done_waiters.capacity())
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
