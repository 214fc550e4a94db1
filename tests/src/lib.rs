//! Cross-crate tests live in `tests/`; this library is empty.
#![cfg_attr(not(fuzzing), warn(missing_docs))]
