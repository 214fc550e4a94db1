//! The one error type of this crate.

use std::fmt;

use qmp_proto::{CloseReason, CommandError, Failure, LocalError, RemoteError, SendStatus};

/// What kind of failure an [`Error`] is. New kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The transport failed (read or write error other than a peer reset; the driver's result
    /// carries the I/O error), or refused a command's file descriptors.
    Io,
    /// The session never became ready: no greeting in time, negotiation refused, or the peer
    /// went away during the handshake.
    Handshake,
    /// The server answered with an error; see [`Error::server_error`].
    Command,
    /// The reply arrived but did not match the requested type.
    Decode,
    /// The command or wait ran out of time.
    Timeout,
    /// The peer closed the connection (EOF, reset, QEMU exited).
    Disconnected,
    /// The connection was closed on this side ([`Client::close`](crate::Client::close) or the
    /// driver future was dropped).
    Closed,
    /// The request is invalid: bad arguments, too large or too deep.
    InvalidRequest,
    /// Too many commands are already waiting locally.
    QueueFull,
    /// The session cannot do this: exec-oob without the `oob` capability, fds on a transport
    /// without fd passing, oob in guest-agent mode.
    Unsupported,
    /// Events were dropped from a full subscriber queue while waiting for one, or a message
    /// that could not be read came, so the one awaited may have been lost
    /// ([`Builder::event_queue`](crate::Builder::event_queue) sizes the queue).
    Lagged,
    /// The server answered but its reply could not be read: larger than the maximum message
    /// size, nested too deep, or not JSON. The command ran; whether it succeeded is unknown.
    ReplyLost,
}

/// An error from the client: its [`kind`](Self::kind), the command it concerns, the server's
/// class and description for [`ErrorKind::Command`], and the [`SendStatus`].
#[derive(thiserror::Error)]
#[error(transparent)]
pub struct Error {
    inner: Box<Inner>,
}

/// Boxed, so that `Result<T, Error>` stays one pointer wide.
#[derive(thiserror::Error)]
#[error("{}{message}", command_prefix(.command.as_deref()))]
struct Inner {
    kind: ErrorKind,
    command: Option<String>,
    status: Option<SendStatus>,
    server: Option<CommandError>,
    remote: Option<RemoteError>,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `name: ` before the message of an error about a command.
fn command_prefix(command: Option<&str>) -> String {
    command.map(|name| format!("{name}: ")).unwrap_or_default()
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                command: None,
                status: None,
                server: None,
                remote: None,
                message: message.into(),
                source: None,
            }),
        }
    }

    pub(crate) fn with_command(mut self, name: &str) -> Self {
        self.inner.command = Some(name.to_owned());
        self
    }

    pub(crate) fn with_status(mut self, status: SendStatus) -> Self {
        self.inner.status = Some(status);
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.inner.source = Some(Box::new(source));
        self
    }

    pub(crate) fn io(context: &str, e: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, format!("{context}: {e}")).with_source(e)
    }

    pub(crate) fn server(name: &str, e: CommandError) -> Self {
        let mut err = Self::new(ErrorKind::Command, e.to_string())
            .with_command(name)
            .with_status(SendStatus::Answered);
        err.inner.server = Some(e);
        err
    }

    /// The return value did not deserialise; `status` is [`SendStatus::Unanswered`] for a
    /// command that sends no reply (its value is `null`).
    pub(crate) fn decode(name: &str, e: serde_json::Error, status: SendStatus) -> Self {
        let message = if status == SendStatus::Answered {
            format!("the reply does not match the expected type: {e}")
        } else {
            format!("the command sends no reply, so there is no value of the expected type: {e}")
        };
        Self::new(ErrorKind::Decode, message)
            .with_command(name)
            .with_status(status)
            .with_source(e)
    }

    pub(crate) fn local(e: LocalError) -> Self {
        let kind = match e {
            LocalError::Closed => ErrorKind::Closed,
            LocalError::OobNotNegotiated | LocalError::OobUnsupported => ErrorKind::Unsupported,
            LocalError::QueueFull { .. } => ErrorKind::QueueFull,
            _ => ErrorKind::InvalidRequest,
        };
        Self::new(kind, e.to_string())
            .with_status(SendStatus::NotSent)
            .with_source(e)
    }

    /// A request that got no answer; `status` says whether it was sent (from
    /// [`Outcome::send_status`](qmp_proto::Outcome::send_status)).
    pub(crate) fn failure(failure: Failure, status: SendStatus) -> Self {
        let kind = match failure {
            Failure::Timeout => ErrorKind::Timeout,
            Failure::PeerClosed => ErrorKind::Disconnected,
            Failure::LocalClose => ErrorKind::Closed,
            Failure::HandshakeFailed => ErrorKind::Handshake,
            Failure::OobUnavailable => ErrorKind::Unsupported,
            Failure::ReplyLost => ErrorKind::ReplyLost,
            Failure::TransportFailed | Failure::FdsRefused => ErrorKind::Io,
            _ => ErrorKind::Closed,
        };
        let what = match (status, failure) {
            (SendStatus::NotSent, _) => "not sent",
            (_, Failure::ReplyLost) => "it ran, with an unknown result",
            _ => "sent, but no reply came",
        };
        Self::new(kind, format!("{failure} ({what})")).with_status(status)
    }

    pub(crate) fn closed(reason: &CloseReason) -> Self {
        match reason {
            // The proto says which step was missing: greeting, negotiation or QGA sync.
            CloseReason::Remote(e) => {
                let mut err = Self::new(ErrorKind::Handshake, e.to_string());
                err.inner.remote = Some(e.clone());
                err.with_status(SendStatus::NotSent)
            }
            _ => Self::failure(reason.failure(), SendStatus::NotSent),
        }
    }

    /// The session ended while waiting for an event: no command was involved, so there is
    /// no send status.
    pub(crate) fn wait_ended(reason: &CloseReason) -> Self {
        let mut err = Self::closed(reason);
        err.inner.status = None;
        if !matches!(reason, CloseReason::Remote(_)) {
            err.inner.message = format!("{} while waiting for an event", reason.failure());
        }
        err
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The command this error concerns, if any.
    pub fn command(&self) -> Option<&str> {
        self.inner.command.as_deref()
    }

    /// How far the command got; `None` when no command was involved (a handshake or a wait
    /// for an event).
    pub fn send_status(&self) -> Option<SendStatus> {
        self.inner.status
    }

    /// The server's error (class and description) for [`ErrorKind::Command`].
    pub fn server_error(&self) -> Option<&CommandError> {
        self.inner.server.as_ref()
    }

    /// The protocol failure that ended the session, for [`ErrorKind::Handshake`]: which
    /// handshake step timed out (greeting, negotiation reply, guest-agent sync) or why the
    /// negotiation was refused.
    pub fn remote_error(&self) -> Option<&RemoteError> {
        self.inner.remote.as_ref()
    }

    /// Whether retrying the command is safe whatever it does: nothing of it was sent.
    pub fn is_not_sent(&self) -> bool {
        self.inner.status == Some(SendStatus::NotSent)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("command", &self.inner.command)
            .field("status", &self.inner.status)
            .field("server", &self.inner.server)
            .field("remote", &self.inner.remote)
            .field("message", &self.inner.message)
            .finish()
    }
}

impl From<std::io::Error> for Error {
    /// A transport error ([`ErrorKind::Io`]), for adapters that open the transport.
    fn from(e: std::io::Error) -> Self {
        Self::io("cannot open the transport", e)
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match e.kind() {
            ErrorKind::Timeout => std::io::ErrorKind::TimedOut,
            ErrorKind::Disconnected => std::io::ErrorKind::ConnectionReset,
            ErrorKind::Closed => std::io::ErrorKind::NotConnected,
            ErrorKind::InvalidRequest | ErrorKind::Decode => std::io::ErrorKind::InvalidData,
            ErrorKind::Unsupported => std::io::ErrorKind::Unsupported,
            _ => std::io::ErrorKind::Other,
        };
        Self::new(kind, e)
    }
}
