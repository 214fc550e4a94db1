//! Typed helpers for common commands, tolerant of differences between QEMU versions.

use std::fmt;

use qmp_proto::{Failure, RawJson, VersionInfo};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::OpsError;
use crate::exec::{ExecError, Execute};
use crate::ops::Ops;

/// The VM run state from `query-status`. States this crate does not know are kept as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunState {
    /// `debug`
    Debug,
    /// `inmigrate`
    InMigrate,
    /// `internal-error`
    InternalError,
    /// `io-error`
    IoError,
    /// `paused`
    Paused,
    /// `postmigrate`
    PostMigrate,
    /// `prelaunch`
    Prelaunch,
    /// `finish-migrate`
    FinishMigrate,
    /// `restore-vm`
    RestoreVm,
    /// `running`
    Running,
    /// `save-vm`
    SaveVm,
    /// `shutdown`
    Shutdown,
    /// `suspended`
    Suspended,
    /// `watchdog`
    Watchdog,
    /// `guest-panicked`
    GuestPanicked,
    /// `colo`
    Colo,
    /// A state this crate does not know, as sent.
    Other(String),
}

impl RunState {
    /// The state as QEMU names it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Debug => "debug",
            Self::InMigrate => "inmigrate",
            Self::InternalError => "internal-error",
            Self::IoError => "io-error",
            Self::Paused => "paused",
            Self::PostMigrate => "postmigrate",
            Self::Prelaunch => "prelaunch",
            Self::FinishMigrate => "finish-migrate",
            Self::RestoreVm => "restore-vm",
            Self::Running => "running",
            Self::SaveVm => "save-vm",
            Self::Shutdown => "shutdown",
            Self::Suspended => "suspended",
            Self::Watchdog => "watchdog",
            Self::GuestPanicked => "guest-panicked",
            Self::Colo => "colo",
            Self::Other(s) => s,
        }
    }
}

impl From<&str> for RunState {
    fn from(s: &str) -> Self {
        match s {
            "debug" => Self::Debug,
            "inmigrate" => Self::InMigrate,
            "internal-error" => Self::InternalError,
            "io-error" => Self::IoError,
            "paused" => Self::Paused,
            "postmigrate" => Self::PostMigrate,
            "prelaunch" => Self::Prelaunch,
            "finish-migrate" => Self::FinishMigrate,
            "restore-vm" => Self::RestoreVm,
            "running" => Self::Running,
            "save-vm" => Self::SaveVm,
            "shutdown" => Self::Shutdown,
            "suspended" => Self::Suspended,
            "watchdog" => Self::Watchdog,
            "guest-panicked" => Self::GuestPanicked,
            "colo" => Self::Colo,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RunState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(Self::from(&*s))
    }
}

/// The reply to `query-status`. Unknown fields are ignored; `singlestep` is absent since
/// QEMU 8.1 (it was deprecated, then removed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct StatusInfo {
    /// Whether the guest CPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
    /// Single-step mode, on QEMU versions that still report it.
    #[serde(default)]
    pub singlestep: Option<bool>,
}

fn decode<T: DeserializeOwned>(command: &str, raw: &RawJson) -> Result<T, OpsError> {
    raw.deserialize().map_err(|e| OpsError::Decode {
        command: command.to_owned(),
        message: e.to_string(),
    })
}

impl<E: Execute + 'static> Ops<E> {
    /// `query-status`.
    ///
    /// # Errors
    /// As [`Ops::execute`], or [`OpsError::Decode`] for a reply of another shape.
    pub async fn query_status(&self) -> Result<StatusInfo, OpsError> {
        let raw = self.execute("query-status", None).await?;
        decode("query-status", &raw)
    }

    /// `query-version`.
    ///
    /// # Errors
    /// As [`Ops::execute`], or [`OpsError::Decode`] for a reply of another shape.
    pub async fn query_version(&self) -> Result<VersionInfo, OpsError> {
        let raw = self.execute("query-version", None).await?;
        decode("query-version", &raw)
    }

    /// `stop`: pause the guest CPUs.
    ///
    /// # Errors
    /// As [`Ops::execute`].
    pub async fn stop(&self) -> Result<(), OpsError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resume the guest CPUs.
    ///
    /// # Errors
    /// As [`Ops::execute`].
    pub async fn cont(&self) -> Result<(), OpsError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `system_powerdown`: ask the guest to power off (ACPI).
    ///
    /// # Errors
    /// As [`Ops::execute`].
    pub async fn system_powerdown(&self) -> Result<(), OpsError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: reset the machine.
    ///
    /// # Errors
    /// As [`Ops::execute`].
    pub async fn system_reset(&self) -> Result<(), OpsError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `quit`: end the QEMU process. QEMU may close the socket right after (or instead of)
    /// replying, so the peer closing the connection after the request was sent counts as
    /// success.
    ///
    /// # Errors
    /// As [`Ops::execute`], except the closed-after-send case above.
    pub async fn quit(&self) -> Result<(), OpsError> {
        match self.execute("quit", None).await {
            Ok(_) => Ok(()),
            Err(OpsError::Exec {
                error: ExecError::Unknown(Failure::PeerClosed),
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
