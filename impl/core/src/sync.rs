//! The one place that chooses std or loom. Everything else imports `crate::sync::*`, so the
//! loom build (`RUSTFLAGS="--cfg loom"`) swaps every lock the engine takes.

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

/// Lock, ignoring poison: no code runs user callbacks under an engine lock, so a panic
/// elsewhere cannot leave the engine half-updated.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
