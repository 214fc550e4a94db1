//! `qmp_ops::Execute` for [`Client`] (feature `ops`).

use qmp_ops::{BoxFuture, ExecError, Execute};
use qmp_proto::{CloseReason, Command, Failure, RawJson};
use serde_json::value::RawValue;

use crate::Client;

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
        Box::pin(async move {
            let mut cmd = Command::new(name);
            if let Some(args) = args {
                cmd = cmd.raw_arguments(args.get()).map_err(ExecError::Local)?;
            }
            match self.submit_outcome(cmd) {
                Ok(call) => ExecError::from_outcome(call.await),
                Err(Ok(reason)) => Err(ExecError::NotSent(match reason {
                    CloseReason::PeerClosed => Failure::PeerClosed,
                    CloseReason::Remote(_) => Failure::HandshakeFailed,
                    _ => Failure::LocalClose,
                })),
                Err(Err(local)) => Err(ExecError::Local(local)),
            }
        })
    }
}
