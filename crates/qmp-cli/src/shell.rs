//! The interactive shell.
use std::path::PathBuf;

use qmp_ops::Policy;

use crate::Out;
use crate::conn::{Target, Timeouts};
use crate::fail::Failure;

pub(crate) fn run(
    _rt: &tokio::runtime::Runtime,
    _target: &Target,
    _t: Timeouts,
    _policy: Option<Policy>,
    _history: Option<PathBuf>,
    _out: Out,
    _no_validate: bool,
) -> Result<(), Failure> {
    Err(Failure::Usage("shell: not yet".to_owned()))
}
