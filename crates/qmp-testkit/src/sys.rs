//! What differs between the unix systems the testkit runs on.

use std::os::fd::OwnedFd;

use rustix::net::{RecvFlags, SendFlags};

/// Flags for every send: a peer gone away is an `EPIPE` error, not a `SIGPIPE`, even in a
/// process that has not ignored the signal. Apple systems have no `MSG_NOSIGNAL`; there the
/// sockets std makes (and those it accepts) carry `SO_NOSIGPIPE` instead.
#[cfg(not(target_vendor = "apple"))]
pub(crate) const SEND: SendFlags = SendFlags::NOSIGNAL;
#[cfg(target_vendor = "apple")]
pub(crate) const SEND: SendFlags = SendFlags::empty();

/// Flags for every `recvmsg`: received descriptors are close-on-exec from the start where the
/// system can do that (`MSG_CMSG_CLOEXEC`); elsewhere [`cloexec`] sets it afterwards.
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "dragonfly",
    target_os = "netbsd",
    target_os = "openbsd"
))]
pub(crate) const RECV: RecvFlags = RecvFlags::CMSG_CLOEXEC;
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "dragonfly",
    target_os = "netbsd",
    target_os = "openbsd"
)))]
pub(crate) const RECV: RecvFlags = RecvFlags::empty();

/// Makes a received descriptor close-on-exec where [`RECV`] could not, so a program the caller
/// starts later does not inherit it. Where `RECV` did, it returns it as it is.
pub(crate) fn cloexec(fd: OwnedFd) -> OwnedFd {
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "dragonfly",
        target_os = "netbsd",
        target_os = "openbsd"
    )))]
    {
        // Failing leaves the descriptor as it came, still owned and closed on drop.
        let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
    }
    fd
}
