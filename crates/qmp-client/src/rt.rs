//! What a runtime must provide: a [`Timer`], and for fd passing on unix sockets, [`FdWrite`]
//! (or a reactor's [`Readiness`], which [`UnixTransport`] turns into one).
//!
//! The transport itself is any futures-io `AsyncRead + AsyncWrite` value; nothing else is
//! needed unless you want to pass file descriptors.
//!
//! The driver writes to the transport and calls the [`Timer`] while it holds the session's
//! lock, so neither may call the [`Client`](crate::Client) nor poll a task inside a wake-up
//! they cause. A runtime's sockets and timers never do; an in-memory transport written for
//! tests must wake its peer only after releasing its own locks.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

/// The future a [`Timer`] returns: it completes at (or after) the requested instant.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A clock and a way to sleep until an instant, provided by the runtime adapter.
///
/// The client reads [`now`](Self::now) to feed the protocol machine and arms one
/// [`sleep_until`](Self::sleep_until) at a time for the earliest deadline. Implementations
/// MUST return instants that never go backwards, and the sleep MUST wake its task when it
/// completes. Once a poll of the sleep has returned `Pending`, the driver polls it again only
/// when its waker changed or the deadline has passed, so that poll MUST have arranged the
/// wake-up at the deadline: a sleep that may return `Pending` for another reason (tokio's
/// cooperative budget, say) must opt out of it, as `qmp-tokio`'s timer does. Tests may
/// implement a manually advanced clock.
pub trait Timer: Send + Sync + 'static {
    /// The current time. The default reads the monotonic system clock.
    fn now(&self) -> Instant {
        Instant::now()
    }

    /// A future that completes once [`now`](Self::now) has reached `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Sleep;
}

impl<T: Timer + ?Sized> Timer for std::sync::Arc<T> {
    fn now(&self) -> Instant {
        (**self).now()
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        (**self).sleep_until(deadline)
    }
}

/// A transport that can attach file descriptors (`SCM_RIGHTS`) to a write: unix sockets.
///
/// Only needed for [`Client::execute_with_fds`](crate::Client::execute_with_fds); pass the
/// transport to [`Builder::handshake_with_fds`](crate::Builder::handshake_with_fds). Plain
/// futures-io transports need nothing from this trait.
#[cfg(unix)]
pub trait FdWrite: futures_io::AsyncWrite {
    /// Writes some of `buf`, with `fds` attached to the first byte written. When it returns
    /// `Ready(Ok(n))` with `n > 0`, the descriptors MUST have been sent with those bytes;
    /// `Pending` and errors MUST send nothing. `fds` is never empty.
    fn poll_write_fds(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::task::Poll<std::io::Result<usize>>;
}

/// What a reactor provides for a nonblocking unix stream registered with it: readiness. Used
/// by [`UnixTransport`], which does the reads and writes itself.
///
/// Both polls register the task's waker when they return `Pending`, and MUST wake it once the
/// stream may have become ready in that direction. `Ready` means "try now": the transport
/// tries the syscall and polls again only after it would block (or after a short read), so an
/// implementation MUST NOT keep returning `Ready` for a readiness already reported and used.
#[cfg(unix)]
pub trait Readiness: Send + Unpin {
    /// The stream, set nonblocking.
    fn stream(&self) -> &std::os::unix::net::UnixStream;
    /// Ready once the stream may be readable.
    fn poll_readable(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>>;
    /// Ready once the stream may be writable. Only polled after a write would block.
    fn poll_writable(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>>;
    /// Called after each write that went through. An implementation that set something up to
    /// wait for writability (and was not polled again once it fired) can drop it here, so that
    /// its reactor does not keep watching. The default does nothing.
    fn wrote(&mut self) {}
}

/// A unix stream transport with fd passing, driven by a reactor's [`Readiness`]: it implements
/// futures-io `AsyncRead + AsyncWrite` and [`FdWrite`] for an adapter.
///
/// It saves syscalls per command compared with the runtimes' own streams: a read waits for
/// readiness only after the socket was found drained (a short read or `EAGAIN`), so a reply
/// costs one `recv`; a write goes straight to the socket and asks for writability only if it
/// would block, so the reactor need not watch (and wake up for) writability in the common case.
#[cfg(unix)]
pub struct UnixTransport<R> {
    ready: R,
    /// The last read drained the socket: wait for readability before the next one.
    drained: bool,
}

#[cfg(unix)]
impl<R: Readiness> UnixTransport<R> {
    /// Wraps a registered stream.
    pub fn new(ready: R) -> Self {
        // Where sends have no MSG_NOSIGNAL, the socket itself must not raise SIGPIPE when the
        // peer has gone (std sets this on the sockets it makes, not on inherited ones).
        #[cfg(target_vendor = "apple")]
        let _ = rustix::net::sockopt::set_socket_nosigpipe(ready.stream(), true);
        Self {
            ready,
            drained: false,
        }
    }

    /// Runs the nonblocking write `f` until it does not block.
    fn poll_send(
        &mut self,
        cx: &mut std::task::Context<'_>,
        f: impl Fn(&std::os::unix::net::UnixStream) -> std::io::Result<usize>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            match f(self.ready.stream()) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.ready.poll_writable(cx))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                res => {
                    if res.is_ok() {
                        self.ready.wrote();
                    }
                    return std::task::Poll::Ready(res);
                }
            }
        }
    }
}

#[cfg(unix)]
impl<R> std::fmt::Debug for UnixTransport<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixTransport").finish_non_exhaustive()
    }
}

#[cfg(unix)]
impl<R: Readiness> futures_io::AsyncRead for UnixTransport<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.drained {
                std::task::ready!(this.ready.poll_readable(cx))?;
                this.drained = false;
            }
            match recv(this.ready.stream(), buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => this.drained = true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return std::task::Poll::Ready(Err(e)),
                Ok((n, more)) => {
                    // A stream socket returns all it holds, up to `buf.len()`: a short read
                    // (or EOF) left it empty, unless it stopped early.
                    this.drained = n < buf.len() && !more;
                    return std::task::Poll::Ready(Ok(n));
                }
            }
        }
    }
}

#[cfg(unix)]
impl<R: Readiness> futures_io::AsyncWrite for UnixTransport<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        // std writes to a socket with MSG_NOSIGNAL where there is one (Linux): a peer gone
        // away is an EPIPE error, not a SIGPIPE.
        self.get_mut().poll_send(cx, |mut s| s.write(buf))
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_close(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(self.ready.stream().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(unix)]
impl<R: Readiness> FdWrite for UnixTransport<R> {
    fn poll_write_fds(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().poll_send(cx, |s| send_with_fds(s, buf, fds))
    }
}

/// Whether connecting to a unix socket that failed with `e` is worth another try while QEMU
/// starts: the socket is not there yet, nobody listens on it yet, or its backlog is full
/// (`WouldBlock`; async-io, which takes that for a connect in progress, reports
/// `NotConnected` instead). Used by the adapters' `connect_unix_wait`.
pub fn worth_retrying(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::NotConnected
    )
}

/// One nonblocking read into `buf`: the count, and whether the socket may hold more although
/// the read was short. The kernel ends a read after bytes that came with descriptors (which,
/// with no room offered for them, it closes and flags as `MSG_CTRUNC`), so such a read says
/// nothing about what follows; taking it for an empty socket would leave the rest unread on an
/// edge-triggered reactor.
#[cfg(unix)]
fn recv(sock: &std::os::unix::net::UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, bool)> {
    use rustix::net::{RecvAncillaryBuffer, RecvFlags, ReturnFlags};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut control = RecvAncillaryBuffer::new(&mut []);
    let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::empty())?;
    Ok((msg.bytes, msg.flags.contains(ReturnFlags::CTRUNC)))
}

/// The flags of a `sendmsg`: a peer gone away must be an `EPIPE` error, not a `SIGPIPE`. Apple
/// systems have no `MSG_NOSIGNAL`; [`UnixTransport::new`] sets `SO_NOSIGPIPE` there instead.
#[cfg(all(unix, not(target_vendor = "apple")))]
const SEND_FLAGS: rustix::net::SendFlags = rustix::net::SendFlags::NOSIGNAL;
#[cfg(target_vendor = "apple")]
const SEND_FLAGS: rustix::net::SendFlags = rustix::net::SendFlags::empty();

/// One nonblocking `sendmsg` of `buf` with `fds` attached as `SCM_RIGHTS`.
#[cfg(unix)]
fn send_with_fds(
    sock: &std::os::unix::net::UnixStream,
    buf: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage};
    let mut space =
        vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        // The space is sized for them; should it not be, nothing goes without its descriptors.
        return Err(std::io::Error::other(
            "no room for the descriptors in the message",
        ));
    }
    let iov = [std::io::IoSlice::new(buf)];
    Ok(rustix::net::sendmsg(sock, &iov, &mut control, SEND_FLAGS)?)
}
