//! The driver future: the only code that touches the transport.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_io::{AsyncRead, AsyncWrite};
use qmp_proto::CloseReason;

use crate::error::Error;
use crate::rt::Sleep;
use crate::shared::Shared;

/// The transport, erased: plain futures-io, or with fd passing.
pub(crate) trait Transport: Send {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>>;
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>>;
    /// Writes with descriptors attached. Only transports built with fd passing override it;
    /// the client refuses descriptors on the others, so the default is never reached.
    #[cfg(unix)]
    fn poll_write_fds(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
        _fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this transport cannot pass file descriptors",
        )))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A futures-io transport without fd passing.
pub(crate) struct Plain<T>(pub(crate) T);

/// A unix transport with fd passing.
#[cfg(unix)]
pub(crate) struct WithFds<T>(pub(crate) T);

macro_rules! delegate_io {
    () => {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_close(cx)
        }
    };
}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for Plain<T> {
    delegate_io!();
}

#[cfg(unix)]
impl<T: AsyncRead + crate::rt::FdWrite + Send + Unpin> Transport for WithFds<T> {
    delegate_io!();

    fn poll_write_fds(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_fds(cx, buf, fds)
    }
}

/// Read buffer size.
const READ_BUF: usize = 64 * 1024;
/// Loop turns before the driver yields to the executor.
const BUDGET: usize = 64;

/// The driver future of one QMP session: it reads and writes the transport, arms the timer,
/// and routes replies and events to the [`Client`](crate::Client) handles.
///
/// It is the only code that touches the transport. It does not spawn anything and reads the
/// clock only through the [`Timer`](crate::rt::Timer). The caller MUST spawn it (or await it
/// alongside its other work) for any command to make progress.
///
/// It completes when the session closes: `Ok(())` after a local close (including the one
/// made when the last [`Client`](crate::Client) is dropped) or when the peer went away (EOF
/// or reset, as after `quit`); an error when the peer broke the protocol or the transport
/// failed.
///
/// # Drop behavior
/// Dropping it closes the session: every pending command resolves at once (as not sent, or
/// sent but unanswered) and event streams end.
#[must_use = "the connection does nothing unless spawned or awaited"]
pub struct Connection {
    shared: Arc<Shared>,
    io: Pin<Box<dyn Transport>>,
    buf: Box<[u8]>,
    /// The transport error that ended the session, if one did (a peer going away is not one).
    io_error: Option<io::Error>,
    need_flush: bool,
    sleep: Option<(Instant, Sleep)>,
    /// The waker the armed sleep last saw, so that it is polled again only when that changes
    /// or its instant has come (a poll costs more than a clock read).
    sleep_waker: Option<std::task::Waker>,
    finished: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// Ends the session after the transport failed with `e`: as the peer's doing when it went
/// away, else as a transport failure, whose error (kept in `io_error`) the driver returns.
fn failed(
    io_error: &mut Option<io::Error>,
    proto: &mut qmp_proto::Connection,
    now: Instant,
    e: io::Error,
) {
    // The first failure ended the session; what comes after says nothing more.
    if proto.is_closed() {
        return;
    }
    if is_peer_gone(&e) {
        proto.handle_eof(now);
    } else {
        *io_error = Some(e);
        proto.handle_transport_error(now);
    }
}

/// Whether a write with descriptors attached failed because of the descriptors, leaving the
/// socket usable: too many in flight (`ETOOMANYREFS`), too many or a bad one (`EINVAL`,
/// `EBADF`), or no memory for them (`ENOMEM`, `ENOBUFS`). `sendmsg` then sent nothing.
#[cfg(unix)]
fn refuses_fds(e: &io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(e).is_some_and(|errno| {
        [
            Errno::TOOMANYREFS,
            Errno::INVAL,
            Errno::BADF,
            Errno::NOMEM,
            Errno::NOBUFS,
        ]
        .contains(&errno)
    })
}

fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

impl Connection {
    pub(crate) fn new(shared: Arc<Shared>, io: Pin<Box<dyn Transport>>) -> Self {
        Self {
            shared,
            io,
            buf: vec![0; READ_BUF].into_boxed_slice(),
            io_error: None,
            need_flush: false,
            sleep: None,
            sleep_waker: None,
            finished: false,
        }
    }

    /// Runs the loop until nothing more can happen without a wake-up. Returns `Ready` once the
    /// session is closed.
    pub(crate) fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        let shared = &*self.shared;
        let timer = &*shared.timer;
        // Set once a read returned `Pending` in this call: the waker is registered, so reading
        // again before the task is woken would only cost a syscall on some runtimes.
        let mut read_pending = false;
        for _ in 0..BUDGET {
            let mut progress = false;

            // Read without holding the lock; handle what came under the turn's one lock.
            let read = if read_pending {
                Poll::Pending
            } else {
                self.io.as_mut().poll_read(cx, &mut self.buf)
            };
            read_pending = read.is_pending();
            let mut inner = shared.lock();
            if let Poll::Ready(res) = read {
                progress = true;
                let now = inner.now(timer);
                match res {
                    Ok(0) => inner.proto.handle_eof(now),
                    // `min`: a transport that claims more than the buffer holds is wrong, but
                    // not a reason to panic.
                    Ok(n) => inner
                        .proto
                        .handle_input(now, &self.buf[..n.min(self.buf.len())]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => failed(&mut self.io_error, &mut inner.proto, now, e),
                }
            }

            // 1. Write what the machine shows, attaching fds where it says so.
            loop {
                let inner = &mut *inner;
                let Some(bytes) = inner.proto.poll_transmit() else {
                    break;
                };
                #[cfg(unix)]
                let fd_id = inner.proto.poll_fds();
                #[cfg(unix)]
                let res = match fd_id.and_then(|id| inner.fds.get(&id)) {
                    Some(fds) if !fds.is_empty() => {
                        use std::os::fd::AsFd;
                        let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
                        self.io.as_mut().poll_write_fds(cx, bytes, &borrowed)
                    }
                    _ => self.io.as_mut().poll_write(cx, bytes),
                };
                #[cfg(not(unix))]
                let res = self.io.as_mut().poll_write(cx, bytes);
                // The request whose descriptors go with this write, if any.
                #[cfg(unix)]
                let with_fds = fd_id.filter(|id| inner.fds.get(id).is_some_and(|f| !f.is_empty()));
                match res {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        #[cfg(unix)]
                        if let Some(id) = fd_id {
                            // Sent with these bytes; our copies can go.
                            inner.fds.remove(&id);
                        }
                        let now = inner.now(timer);
                        inner.proto.handle_transmitted(now, n);
                        self.need_flush = true;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Descriptors refused (too many in flight, say): that command fails, not
                    // sent, and the session goes on.
                    #[cfg(unix)]
                    Poll::Ready(Err(e)) if with_fds.is_some() && refuses_fds(&e) => {
                        #[cfg(feature = "tracing")]
                        tracing::warn!(error = %e, "the transport refused a command's descriptors");
                        let _ = e;
                        let now = inner.now(timer);
                        inner.proto.handle_fds_refused(now);
                        if let Some(id) = with_fds {
                            inner.fds.remove(&id);
                        }
                        progress = true;
                    }
                    Poll::Ready(res) => {
                        let now = inner.now(timer);
                        match res {
                            Err(e) => failed(&mut self.io_error, &mut inner.proto, now, e),
                            // Nothing written and no error: the peer is gone.
                            Ok(_) => inner.proto.handle_eof(now),
                        }
                        progress = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if self.need_flush
                && let Poll::Ready(res) = self.io.as_mut().poll_flush(cx)
            {
                self.need_flush = false;
                // A flush that fails ends the session as a failed write does.
                if let Err(e) = res
                    && e.kind() != io::ErrorKind::Interrupted
                {
                    let now = inner.now(timer);
                    failed(&mut self.io_error, &mut inner.proto, now, e);
                    progress = true;
                }
            }

            // 2. One timer, never later than the earliest deadline. A later or no deadline
            // keeps the armed sleep: it fires early at most once, which costs less than a new
            // sleep for every command (each command with a timeout moves the deadline, and a new
            // async-io timer wakes its reactor).
            if let Some(at) = inner.proto.poll_timeout()
                && self.sleep.as_ref().is_none_or(|(armed, _)| at < *armed)
            {
                // The replaced sleep and its waker go after the unlock, like every waker.
                if let Some((_, old)) = self.sleep.replace((at, timer.sleep_until(at))) {
                    inner.discard_sleep(old);
                }
                if let Some(old) = self.sleep_waker.take() {
                    inner.discard_waker(old);
                }
            }
            if let Some((at, sleep)) = &mut self.sleep {
                let new_waker = self
                    .sleep_waker
                    .as_ref()
                    .is_none_or(|w| !w.will_wake(cx.waker()));
                if new_waker || timer.now() >= *at {
                    if sleep.as_mut().poll(cx).is_ready() {
                        if let Some((_, done)) = self.sleep.take() {
                            inner.discard_sleep(done);
                        }
                        let now = inner.now(timer);
                        inner.proto.handle_timeout(now);
                        progress = true;
                    } else if new_waker
                        && let Some(old) = self.sleep_waker.replace(cx.waker().clone())
                    {
                        inner.discard_waker(old);
                    }
                }
            }

            // 3. Route the outputs.
            inner.dispatch();

            if inner.proto.is_closed() {
                let result = match (self.io_error.take(), &inner.closed) {
                    (Some(e), _) => Err(Error::io("the transport failed", e)),
                    (None, Some(reason @ CloseReason::Remote(_))) => Err(Error::closed(reason)),
                    _ => Ok(()),
                };
                drop(inner);
                // Best effort: the session is over whatever the transport says (a close still
                // pending, as a TLS one may be, is not waited for).
                let _ = self.io.as_mut().poll_close(cx);
                // Only now, so that `closed()` comes after the transport was asked to close.
                // (Should the close panic, dropping the driver finishes it.)
                self.finished = true;
                shared.lock().finish_driver();
                return Poll::Ready(result);
            }
            if !progress {
                inner.set_driver_waker(cx.waker());
                return Poll::Pending;
            }
        }
        // Out of budget: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Future for Connection {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_drive(cx)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut inner = self.shared.lock();
        inner.close_now(&*self.shared.timer);
        inner.finish_driver();
    }
}
