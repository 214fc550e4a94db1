//! In-memory duplex pipe, manual timer and a hand-driven scripted server.
#![allow(dead_code, unreachable_pub)] // shared by several test files, each using a part

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_io::{AsyncRead, AsyncWrite};
use qmp_client::rt::{Sleep, Timer};

#[derive(Default)]
struct Half {
    data: VecDeque<u8>,
    closed: bool,
    /// The error the next read returns.
    error: Option<io::Error>,
    /// The error the next flush of the writing side returns.
    flush_error: Option<io::Error>,
    /// Whether flushes of the writing side wait (for `flush_error`), and who waits.
    flush_blocked: bool,
    flusher: Option<Waker>,
    reader: Option<Waker>,
}

/// The client's end of an in-memory pipe.
pub struct PipeEnd {
    rx: Arc<Mutex<Half>>,
    tx: Arc<Mutex<Half>>,
}

/// The test's end: what the client wrote, and a way to answer.
#[derive(Clone)]
pub struct Server {
    from_client: Arc<Mutex<Half>>,
    to_client: Arc<Mutex<Half>>,
}

pub fn pipe() -> (PipeEnd, Server) {
    let a = Arc::new(Mutex::new(Half::default()));
    let b = Arc::new(Mutex::new(Half::default()));
    (
        PipeEnd {
            rx: Arc::clone(&a),
            tx: Arc::clone(&b),
        },
        Server {
            from_client: b,
            to_client: a,
        },
    )
}

impl Server {
    /// Everything the client wrote since the last call, as text.
    pub fn take(&self) -> String {
        let mut h = self.from_client.lock().unwrap();
        let bytes: Vec<u8> = h.data.drain(..).collect();
        String::from_utf8(bytes).unwrap()
    }

    /// Sends `text` to the client.
    pub fn send(&self, text: &str) {
        let mut h = self.to_client.lock().unwrap();
        h.data.extend(text.as_bytes());
        let reader = h.reader.take();
        drop(h);
        // After the unlock: a reader polled inside `wake` reads at once.
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Closes the server's sending side (the client reads EOF).
    pub fn hang_up(&self) {
        let mut h = self.to_client.lock().unwrap();
        h.closed = true;
        let reader = h.reader.take();
        drop(h);
        // After the unlock: a reader polled inside `wake` reads at once.
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Makes the client's next read fail with `e`.
    pub fn fail_reads(&self, e: io::Error) {
        let mut h = self.to_client.lock().unwrap();
        h.error = Some(e);
        let reader = h.reader.take();
        drop(h);
        // After the unlock: a reader polled inside `wake` reads at once.
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Makes the client's next flush fail with `e` (waking a flush that waits).
    pub fn fail_flushes(&self, e: io::Error) {
        let mut h = self.from_client.lock().unwrap();
        h.flush_error = Some(e);
        h.flush_blocked = false;
        let flusher = h.flusher.take();
        drop(h);
        if let Some(w) = flusher {
            w.wake();
        }
    }

    /// Makes the client's flushes wait until [`Server::fail_flushes`].
    pub fn block_flushes(&self) {
        self.from_client.lock().unwrap().flush_blocked = true;
    }

    /// Whether the client closed its sending side.
    pub fn client_closed(&self) -> bool {
        self.from_client.lock().unwrap().closed
    }

    pub fn greet(&self) {
        self.send(GREETING);
    }
}

pub const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

impl AsyncRead for PipeEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut h = self.rx.lock().unwrap();
        if let Some(e) = h.error.take() {
            return Poll::Ready(Err(e));
        }
        if h.data.is_empty() {
            if h.closed {
                return Poll::Ready(Ok(0));
            }
            h.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(h.data.len());
        for (dst, src) in buf.iter_mut().zip(h.data.drain(..n)) {
            *dst = src;
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut h = self.tx.lock().unwrap();
        if h.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        h.data.extend(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut h = self.tx.lock().unwrap();
        match h.flush_error.take() {
            Some(e) => Poll::Ready(Err(e)),
            None if h.flush_blocked => {
                h.flusher = Some(cx.waker().clone());
                Poll::Pending
            }
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.lock().unwrap().closed = true;
        Poll::Ready(Ok(()))
    }
}

/// Whether a sleep fired, and who waits for it.
type Slot = Arc<Mutex<(bool, Option<Waker>)>>;

#[derive(Default)]
struct Clock {
    offset: Duration,
    sleepers: Vec<(Duration, Slot)>,
    /// Sleeps created so far.
    armed: usize,
}

/// A clock that moves only when the test says so.
#[derive(Clone)]
pub struct ManualTimer {
    t0: Instant,
    clock: Arc<Mutex<Clock>>,
}

impl ManualTimer {
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            clock: Arc::default(),
        }
    }

    /// How many sleeps the driver has created.
    pub fn sleeps(&self) -> usize {
        self.clock.lock().unwrap().armed
    }

    pub fn advance(&self, d: Duration) {
        let mut c = self.clock.lock().unwrap();
        c.offset += d;
        let now = c.offset;
        let mut due = Vec::new();
        c.sleepers.retain(|(at, slot)| {
            if *at <= now {
                let mut s = slot.lock().unwrap();
                s.0 = true;
                due.extend(s.1.take());
                false
            } else {
                true
            }
        });
        drop(c);
        // After the unlock: a driver polled inside `wake` reads the clock at once.
        for w in due {
            w.wake();
        }
    }
}

impl Timer for ManualTimer {
    fn now(&self) -> Instant {
        self.t0 + self.clock.lock().unwrap().offset
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        let at = deadline.saturating_duration_since(self.t0);
        let slot = Arc::new(Mutex::new((false, None::<Waker>)));
        {
            let mut c = self.clock.lock().unwrap();
            c.armed += 1;
            if at <= c.offset {
                slot.lock().unwrap().0 = true;
            } else {
                c.sleepers.push((at, Arc::clone(&slot)));
            }
        }
        Box::pin(futures_util::future::poll_fn(move |cx| {
            let mut s = slot.lock().unwrap();
            if s.0 {
                Poll::Ready(())
            } else {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }))
    }
}
