//! The guided demo.
use crate::Out;
use crate::fail::Failure;

pub(crate) fn run(_rt: &tokio::runtime::Runtime, _fake: bool, _out: Out) -> Result<(), Failure> {
    Err(Failure::Usage("demo: not yet".to_owned()))
}
