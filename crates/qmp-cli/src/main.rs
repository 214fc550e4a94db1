//! The `qmp` command-line tool.
fn main() {}
