//! # leakproof: the client
//!
//! The tokio + hyper client with a URLSession-style API (sessions, configurations, a
//! delegate, data / download / upload tasks, a connection pool) drives `leakproof-core`, the
//! sans-IO lifecycle engine, and re-exports its error type. The client itself is being built
//! now; until it lands, this crate offers the engine's vocabulary.

pub use leakproof_core::{Error, Ledger, SessionState, TaskState, Timeout};
