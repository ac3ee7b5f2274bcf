//! Coverage of the model's transitions: being written.

use leakproof_model::{Model, Op};

/// Note that `op` was applied to a system when the model stood at `before`.
pub fn record(before: &Model, op: &Op) {
    let _ = (before, op);
}
