//! What a runtime must provide: a [`Timer`], and for fd passing on unix sockets, [`FdWrite`].
//!
//! The transport itself is any futures-io `AsyncRead + AsyncWrite` value; nothing else is
//! needed unless you want to pass file descriptors.

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
/// completes. Tests may implement a manually advanced clock.
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

/// The signature of a function that writes with descriptors attached, as
/// [`FdWrite::poll_write_fds`] does, for [`WithFdWriter`].
#[cfg(unix)]
pub type FdWriteFn<T> = fn(
    Pin<&mut T>,
    &mut std::task::Context<'_>,
    &[u8],
    &[std::os::fd::BorrowedFd<'_>],
) -> std::task::Poll<std::io::Result<usize>>;

/// Pairs a futures-io stream with a function that writes to it with descriptors attached, so
/// an adapter gets an [`FdWrite`] transport without a wrapper type of its own.
#[cfg(unix)]
pub struct WithFdWriter<T> {
    io: T,
    write_fds: FdWriteFn<T>,
}

#[cfg(unix)]
impl<T> WithFdWriter<T> {
    /// `write_fds` MUST follow the contract of [`FdWrite::poll_write_fds`].
    pub fn new(io: T, write_fds: FdWriteFn<T>) -> Self {
        Self { io, write_fds }
    }

    /// The stream.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

#[cfg(unix)]
impl<T> std::fmt::Debug for WithFdWriter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithFdWriter").finish_non_exhaustive()
    }
}

#[cfg(unix)]
impl<T: futures_io::AsyncRead + Unpin> futures_io::AsyncRead for WithFdWriter<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

#[cfg(unix)]
impl<T: futures_io::AsyncWrite + Unpin> futures_io::AsyncWrite for WithFdWriter<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_close(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
}

#[cfg(unix)]
impl<T: futures_io::AsyncWrite + Unpin> FdWrite for WithFdWriter<T> {
    fn poll_write_fds(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        (this.write_fds)(Pin::new(&mut this.io), cx, buf, fds)
    }
}
