//! The `.ops` repro format: being written.
