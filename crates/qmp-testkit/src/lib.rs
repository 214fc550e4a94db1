//! Test helpers for the QMP workspace.
