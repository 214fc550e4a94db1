//! Event subscriptions: a name filter and a bounded stream per subscriber.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use qmp_proto::{CloseReason, Event};

/// Which events a subscription receives, by name. Defaults to all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    names: Option<Vec<String>>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self { names: None }
    }

    /// Only events with one of these names (exact, case-sensitive, as QEMU spells them).
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self {
            names: Some(names.into_iter().map(Into::into).collect()),
        }
    }

    /// Whether an event named `name` passes.
    pub fn matches(&self, name: &str) -> bool {
        self.names
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

impl From<&str> for EventFilter {
    fn from(name: &str) -> Self {
        Self::names([name])
    }
}

impl<const N: usize> From<[&str; N]> for EventFilter {
    fn from(names: [&str; N]) -> Self {
        Self::names(names)
    }
}

impl From<&[&str]> for EventFilter {
    fn from(names: &[&str]) -> Self {
        Self::names(names.iter().copied())
    }
}

impl From<String> for EventFilter {
    fn from(name: String) -> Self {
        Self::names([name])
    }
}

impl From<&String> for EventFilter {
    fn from(name: &String) -> Self {
        Self::names([name.as_str()])
    }
}

impl From<Vec<String>> for EventFilter {
    fn from(names: Vec<String>) -> Self {
        Self::names(names)
    }
}

/// One item of an [`EventStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventItem {
    /// An event that passed the filter.
    Event(Event),
    /// This many events were dropped before reaching the subscriber: its oldest, when it fell
    /// behind; or, for a stream subscribed before the connection first ran, events read
    /// during the handshake that did not fit the queue size (counted by the stream's filter,
    /// except past 64 distinct event names, when every such stream counts them). A message
    /// from the server that could not be read (invalid, or over the size or depth limits) and
    /// answered no command may have been an event: every stream counts it, in its place
    /// (after the events that came before it).
    Lagged(u64),
    /// The connection closed; this is the last item, the stream ends after it.
    Closed(CloseReason),
}

/// What a stream's queue holds: events, and where events may have been lost between them.
#[derive(Debug)]
enum Slot {
    Event(Event),
    /// Events that may have been lost at this point of the stream (a message that could not
    /// be read, say): reported as [`EventItem::Lagged`] in its place, after the events that
    /// came before it.
    Lost(u64),
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Slot>,
    /// How many of `queue`'s slots are events (what the capacity bounds).
    events: usize,
    /// Events lost before everything queued: dropped from the front of a full queue, or
    /// noted while the queue was empty. Reported first.
    lagged: u64,
    closed: Option<CloseReason>,
    finished: bool,
    waker: Option<Waker>,
}

/// The subscriber side shared with the dispatcher.
#[derive(Debug)]
pub(crate) struct Subscriber {
    filter: EventFilter,
    capacity: usize,
    /// Whether the events read during the handshake are for it too: true for the caller's own
    /// subscriptions, false for those of a wait for an event that comes after the call.
    pub(crate) backlog: bool,
    state: Mutex<State>,
}

impl Subscriber {
    pub(crate) fn new(filter: EventFilter, capacity: usize, backlog: bool) -> Arc<Self> {
        Arc::new(Self {
            filter,
            capacity: capacity.max(1),
            backlog,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                events: 0,
                lagged: 0,
                closed: None,
                finished: false,
                waker: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `ev` if it passes the filter, dropping the oldest when full. Never blocks.
    /// Returns the stream's waker to wake (after the caller's locks are released).
    #[must_use = "the stream's waker is to be woken"]
    pub(crate) fn offer(&self, ev: &Event) -> Option<Waker> {
        if !self.filter.matches(&ev.name) {
            return None;
        }
        let mut st = self.lock();
        if st.closed.is_some() {
            return None;
        }
        if st.events >= self.capacity {
            // Drop the oldest event, and fold the losses noted around it into the count
            // reported first: nothing queued comes before them any more.
            let mut dropped = false;
            loop {
                let lost = match st.queue.front() {
                    Some(Slot::Lost(n)) => *n,
                    Some(Slot::Event(_)) if !dropped => {
                        dropped = true;
                        st.events -= 1;
                        1
                    }
                    _ => break,
                };
                st.lagged += lost;
                st.queue.pop_front();
            }
        }
        st.queue.push_back(Slot::Event(ev.clone()));
        st.events += 1;
        st.waker.take()
    }

    /// Whether an event named `name` would pass the filter.
    pub(crate) fn wants(&self, name: &str) -> bool {
        self.filter.matches(name)
    }

    /// Counts `n` events lost on their way to this subscriber, after the events it holds:
    /// reported as [`EventItem::Lagged`] once those are read, before the events offered
    /// next. Returns the waker to wake, as [`offer`](Self::offer) does.
    #[must_use = "the stream's waker is to be woken"]
    pub(crate) fn lag(&self, n: u64) -> Option<Waker> {
        if n == 0 {
            return None;
        }
        let mut st = self.lock();
        if st.closed.is_some() {
            return None;
        }
        match st.queue.back_mut() {
            Some(Slot::Lost(m)) => *m += n,
            Some(Slot::Event(_)) => st.queue.push_back(Slot::Lost(n)),
            None => st.lagged += n,
        }
        st.waker.take()
    }

    /// Ends the stream with `reason`. Returns the waker to wake, as [`offer`](Self::offer)
    /// does.
    #[must_use = "the stream's waker is to be woken"]
    pub(crate) fn close(&self, reason: &CloseReason) -> Option<Waker> {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(reason.clone());
        }
        st.waker.take()
    }
}

/// A stream of the events one subscription receives, from
/// [`Client::subscribe`](crate::Client::subscribe).
///
/// It has its own bounded queue. When the queue is full the oldest event is dropped and the
/// stream yields [`EventItem::Lagged`] with the count before the events that follow, so a slow
/// reader never delays command replies or other subscribers. A message that could not be
/// read, and so may have been an event, is reported as `Lagged(1)` where it came, between the
/// events before and after it. When the connection closes, the
/// remaining events are yielded, then [`EventItem::Closed`], then the stream ends.
///
/// # Drop behavior
/// Dropping the stream unsubscribes it. A stream does not keep the session open: when the
/// last [`Client`](crate::Client) is dropped, it yields what it holds, then
/// [`EventItem::Closed`].
#[derive(Debug)]
#[must_use = "streams do nothing unless polled"]
pub struct EventStream {
    sub: Arc<Subscriber>,
}

impl EventStream {
    pub(crate) fn new(sub: Arc<Subscriber>) -> Self {
        Self { sub }
    }

    /// The next item, or `None` once the stream has ended.
    ///
    /// # Cancel safety
    /// Cancel safe: an item is removed only when it is returned.
    pub async fn recv(&mut self) -> Option<EventItem> {
        futures_util::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The next event, skipping [`EventItem::Lagged`]; `None` once the connection has closed.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.recv().await? {
                EventItem::Event(ev) => return Some(ev),
                EventItem::Lagged(_) => {}
                EventItem::Closed(_) => return None,
            }
        }
    }

    /// Events queued and not yet read.
    pub fn len(&self) -> usize {
        self.sub.lock().events
    }

    /// Whether no event is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        let mut st = self.sub.lock();
        if st.lagged > 0 {
            let n = std::mem::take(&mut st.lagged);
            return Poll::Ready(Some(EventItem::Lagged(n)));
        }
        match st.queue.pop_front() {
            Some(Slot::Event(ev)) => {
                st.events -= 1;
                return Poll::Ready(Some(EventItem::Event(ev)));
            }
            Some(Slot::Lost(n)) => return Poll::Ready(Some(EventItem::Lagged(n))),
            None => {}
        }
        if st.finished {
            return Poll::Ready(None);
        }
        if let Some(reason) = st.closed.clone() {
            st.finished = true;
            return Poll::Ready(Some(EventItem::Closed(reason)));
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let old = st.waker.replace(cx.waker().clone());
            // Dropped after the unlock: dropping a waker may run the executor's code.
            drop(st);
            drop(old);
        }
        Poll::Pending
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // The session may hold the subscriber a moment longer, and drop it under its lock: take
        // the waker out now, so nothing of the caller's executor is dropped there.
        let waker = self.sub.lock().waker.take();
        drop(waker);
    }
}

impl futures_core::Stream for EventStream {
    type Item = EventItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        self.get_mut().poll_item(cx)
    }
}

impl futures_core::FusedStream for EventStream {
    fn is_terminated(&self) -> bool {
        self.sub.lock().finished
    }
}
