//! The error type of [`crate::Ops`].

use crate::exec::ExecError;
use crate::policy::Denial;

/// What kind of failure an [`OpsError`] is, for matching without destructuring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The policy refused the command; nothing was sent.
    Denied,
    /// The command was not sent (and retries, if any, did not get it sent).
    NotSent,
    /// The command was sent but its outcome is unknown.
    Unknown,
    /// QEMU answered with an error.
    Command,
    /// The client refused the request locally.
    Local,
    /// No session could be established.
    Connect,
    /// The retry deadline passed before the command succeeded.
    Deadline,
    /// The arguments are not a JSON object.
    InvalidArguments,
    /// The reply did not have the expected shape.
    Decode,
}

/// Why an [`crate::Ops`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// The policy refused the command; nothing was sent.
    #[error("{0}")]
    Denied(Denial),
    /// The last attempt failed and no further attempt was allowed or possible.
    #[error("{command} failed after {attempts} attempt(s): {error}")]
    Exec {
        /// The command.
        command: String,
        /// Attempts made, the first included.
        attempts: u32,
        /// The last attempt's failure.
        error: ExecError,
    },
    /// The next retry would have started after the overall deadline.
    #[error("{command}: retry deadline exceeded after {attempts} attempt(s), last error: {last}")]
    DeadlineExceeded {
        /// The command.
        command: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: ExecError,
    },
    /// The arguments are not a JSON object or could not be serialised.
    #[error("invalid arguments for {command}: {message}")]
    InvalidArguments {
        /// The command.
        command: String,
        /// What is wrong.
        message: String,
    },
    /// The reply could not be decoded into the expected type.
    #[error("cannot decode the reply to {command}: {message}")]
    Decode {
        /// The command.
        command: String,
        /// What is wrong.
        message: String,
    },
}

impl OpsError {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Denied(_) => ErrorKind::Denied,
            Self::Exec { error, .. } => match error {
                ExecError::NotSent(_) => ErrorKind::NotSent,
                ExecError::Unknown(_) => ErrorKind::Unknown,
                ExecError::Command(_) => ErrorKind::Command,
                ExecError::Local(_) => ErrorKind::Local,
                ExecError::Connect(_) => ErrorKind::Connect,
            },
            Self::DeadlineExceeded { .. } => ErrorKind::Deadline,
            Self::InvalidArguments { .. } => ErrorKind::InvalidArguments,
            Self::Decode { .. } => ErrorKind::Decode,
        }
    }

    /// The last execution failure, if the command got that far.
    pub fn exec_error(&self) -> Option<&ExecError> {
        match self {
            Self::Exec { error, .. } => Some(error),
            Self::DeadlineExceeded { last, .. } => Some(last),
            _ => None,
        }
    }

    /// Attempts made (0 when nothing was tried).
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Exec { attempts, .. } | Self::DeadlineExceeded { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    /// The denial, when the policy refused the command.
    pub fn denial(&self) -> Option<&Denial> {
        match self {
            Self::Denied(d) => Some(d),
            _ => None,
        }
    }
}
