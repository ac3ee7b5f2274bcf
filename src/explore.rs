//! Exhaustive small-scope search: being written.
