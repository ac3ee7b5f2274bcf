//! # leakproof-check: the suite
//!
//! The harness that checks leakproof's implementations against its specification
//! (`leakproof-model`):
//! - [`reference`](mod@reference): the model as a proptest-state-machine reference;
//! - [`strategies`]: generators of op sequences;
//! - [`machine`]: the state machine test, generic over the [`machine::System`] under test,
//!   with the teardown that lets go of everything and checks the release;
//! - [`assertions`]: what a system showed, compared with the model, each difference named by
//!   the rule it breaks;
//! - [`client_sut`]: the real client against stages whose held exchanges play the model's
//!   server;
//! - [`coverage`]: which transitions of the model (state class and op kind) the suite drove a
//!   system through, against every one the model allows in some reachable state;
//! - [`engine_sut`]: `leakproof-core` driven by a simulated network and driver whose own
//!   account is the witness;
//! - [`explore`]: the exhaustive small-scope search of the model, and its replay against a
//!   system;
//! - [`heap`]: the heap witness of the model runs, a global allocator that counts per thread
//!   what a world leaves live;
//! - [`ops`]: the `.ops` repro format (parse, print, replay) and the repro of a failure;
//! - [`planted`]: bugs planted around the engine on purpose, each a system under test, to show
//!   the checks catch each one and name the rule it breaks;
//! - [`run`]: seeded runs and their report, used by `cargo test` and `leakproof-check check`;
//! - [`scenario`]: one terminal path of one kind of task against the stage, and the witnesses;
//! - [`sim`]: the simulated network (turmoil): the client's transport over it, a server host
//!   that counts the connections it sees closed, and a trace of events on the simulated clock;
//! - [`simnet`]: a deterministic in-memory network (listeners, connections as byte pipes,
//!   scheduled faults, the network's own count of client ends) and the client's transport over
//!   it; the stage runs over it too ([`stage::Builder::network`]);
//! - [`stage`]: the loopback HTTP/1.1 server the client is tested against, scriptable per
//!   request, counting the sockets it accepts and sees closed;
//! - [`witness`]: the counting global allocator, for heap-baseline tests.

pub mod assertions;
pub mod client_sut;
pub mod coverage;
pub mod engine_sut;
pub mod explore;
pub mod heap;
pub mod machine;
pub mod ops;
pub mod planted;
pub mod reference;
pub mod run;
pub mod scenario;
pub mod sim;
pub mod simnet;
pub mod stage;
pub mod strategies;
pub mod witness;
