//! What differs between the unix systems the testkit runs on.

pub(crate) use recv::{RECV, cloexec};
use rustix::net::SendFlags;

/// Flags for every send: a peer gone away is an `EPIPE` error, not a `SIGPIPE`, even in a
/// process that has not ignored the signal. Apple systems have no `MSG_NOSIGNAL`; there the
/// sockets std makes (and those it accepts) carry `SO_NOSIGPIPE` instead.
#[cfg(not(target_vendor = "apple"))]
pub(crate) const SEND: SendFlags = SendFlags::NOSIGNAL;
#[cfg(target_vendor = "apple")]
pub(crate) const SEND: SendFlags = SendFlags::empty();

/// Where `recvmsg` can make received descriptors close-on-exec from the start
/// (`MSG_CMSG_CLOEXEC`).
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "dragonfly",
    target_os = "netbsd",
    target_os = "openbsd"
))]
mod recv {
    use std::os::fd::OwnedFd;

    /// Flags for every `recvmsg`: descriptors arrive close-on-exec.
    pub(crate) const RECV: rustix::net::RecvFlags = rustix::net::RecvFlags::CMSG_CLOEXEC;

    /// A received descriptor, already close-on-exec here.
    pub(crate) fn cloexec(fd: OwnedFd) -> OwnedFd {
        fd
    }
}

/// Elsewhere a received descriptor is made close-on-exec afterwards.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "dragonfly",
    target_os = "netbsd",
    target_os = "openbsd"
)))]
mod recv {
    use std::os::fd::OwnedFd;

    /// Flags for every `recvmsg`: no way to ask for close-on-exec descriptors.
    pub(crate) const RECV: rustix::net::RecvFlags = rustix::net::RecvFlags::empty();

    /// Makes a received descriptor close-on-exec, so that a program the caller starts later
    /// does not inherit it. Failing leaves it as it came, still owned and closed on drop.
    pub(crate) fn cloexec(fd: OwnedFd) -> OwnedFd {
        let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
        fd
    }
}
