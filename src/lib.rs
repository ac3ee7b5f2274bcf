//! # leakproof-check: the suite
//!
//! The harness that checks leakproof's implementations against its specification
//! (`leakproof-model`):
//! - [`reference`]: the model as a proptest-state-machine reference;
//! - [`strategies`]: generators of op sequences;
//! - [`machine`]: the state machine test, generic over the [`machine::System`] under test,
//!   with the teardown that lets go of everything and checks the release;
//! - [`assertions`]: what a system showed, compared with the model, each difference named by
//!   the rule it breaks;
//! - [`engine_sut`]: `leakproof-core` driven by a simulated network and driver whose own
//!   account is the witness;
//! - [`run`]: seeded runs and their report, used by `cargo test` and `leakproof-check check`.

pub mod assertions;
pub mod engine_sut;
pub mod machine;
pub mod reference;
pub mod run;
pub mod strategies;
