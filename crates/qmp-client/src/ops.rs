//! `qmp_ops::Execute` for [`Client`] (feature `ops`).

use std::time::Duration;

use qmp_ops::{BoxFuture, ExecError, Execute, Sleep};
use qmp_proto::{Command, Failure, RawJson};
use serde_json::value::RawValue;

use crate::Client;
use crate::client::Refused;

impl Execute for Client {
    /// Runs the command and maps its outcome by send status: a closed session is
    /// [`ExecError::NotSent`], refused arguments [`ExecError::Local`].
    ///
    /// # Cancel safety
    /// Dropping the future abandons the request, as for every [`Client`] call.
    fn execute<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        Box::pin(run(self, name, args, None))
    }

    /// The machine's own per-command deadline, on the client's timer (`sleep` is not used): a
    /// request that times out before it is written fails as [`ExecError::NotSent`].
    fn execute_timeout<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
        timeout: Duration,
        _sleep: &'a dyn Sleep,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        Box::pin(run(self, name, args, Some(timeout)))
    }
}

async fn run(
    client: &Client,
    name: &str,
    args: Option<&RawValue>,
    timeout: Option<Duration>,
) -> Result<RawJson, ExecError> {
    let mut cmd = Command::new(name);
    if let Some(args) = args {
        cmd = cmd.raw_arguments(args.get()).map_err(ExecError::Local)?;
    }
    if timeout.is_some() {
        cmd = cmd.timeout(timeout);
    }
    #[cfg(unix)]
    let call = client.submit(cmd, Vec::new());
    #[cfg(not(unix))]
    let call = client.submit(cmd);
    match call {
        Ok(call) => ExecError::from_outcome(call.await),
        Err(Refused::Closed(reason)) => Err(ExecError::NotSent(reason.failure())),
        Err(Refused::Draining) => Err(ExecError::NotSent(Failure::LocalClose)),
        Err(Refused::Local(local)) => Err(ExecError::Local(local)),
    }
}
