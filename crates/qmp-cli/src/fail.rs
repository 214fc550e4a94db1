//! Failures and the exit codes they map to.

use qmp_tokio::{CommandError, ErrorKind};

/// Exit codes, as documented in `--help`.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  QEMU answered with an error (its class and description are printed)
  2  usage error: bad options or arguments, or a command or argument QEMU's schema
     does not have (not checked with --no-validate or --qga); nothing is sent. From
     the shell: its input could not be read (the lines before that ran)
  3  connection or protocol failure: cannot connect, no greeting, disconnected, no reply
  4  denied by the policy (--policy/--profile); the rule is named and nothing is sent
  5  `qmp events`: --timeout passed before --count events arrived";

/// Why a run failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// QEMU's error reply.
    Qmp(CommandError),
    /// Bad command line or arguments.
    Usage(String),
    /// Cannot connect, or the session broke.
    Connection(String),
    /// The policy refused the command.
    Denied(String),
    /// Waited too long for events.
    Timeout(String),
    /// Stopped by this signal (SIGHUP, SIGINT or SIGTERM) after cleaning up.
    Signal(i32),
}

impl Failure {
    pub(crate) fn code(&self) -> u8 {
        match self {
            Self::Qmp(_) => 1,
            Self::Usage(_) => 2,
            Self::Connection(_) => 3,
            Self::Denied(_) => 4,
            Self::Timeout(_) => 5,
            // As a shell reports a process the signal ended: 128 + its number.
            Self::Signal(n) => u8::try_from(128 + n).unwrap_or(u8::MAX),
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            Self::Qmp(e) => format!("error: {}: {}", e.class.as_str(), e.desc),
            Self::Usage(m) | Self::Connection(m) | Self::Timeout(m) => m.clone(),
            Self::Denied(m) => format!("{m}; nothing was sent"),
            Self::Signal(2) => "interrupted".to_owned(),
            Self::Signal(n) => format!("stopped by signal {n}"),
        }
    }
}

impl From<qmp_tokio::Error> for Failure {
    fn from(e: qmp_tokio::Error) -> Self {
        match e.kind() {
            ErrorKind::Command => match e.server_error() {
                Some(s) => Self::Qmp(s.clone()),
                None => Self::Connection(e.to_string()),
            },
            // Nothing was sent: the request, or what it asks of the session (exec-oob on the
            // guest agent, say), is at fault.
            ErrorKind::InvalidRequest | ErrorKind::Unsupported => Self::Usage(e.to_string()),
            _ => Self::Connection(e.to_string()),
        }
    }
}
