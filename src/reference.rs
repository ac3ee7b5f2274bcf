//! The reference side of the state machine test: the specification, as proptest-state-machine
//! sees it. The state is the model plus what the last op did, so the system under test can
//! compare its own step with the model's.

use proptest::prelude::*;
use proptest_state_machine::ReferenceStateMachine;

use leakproof_model::{Model, Op, Step};

use crate::strategies;

/// The model after an op, and that op's step.
#[derive(Debug, Clone, Default)]
pub struct RefState {
    pub model: Model,
    pub last: Step,
}

/// The specification as a proptest-state-machine reference.
#[derive(Debug)]
pub struct Reference;

impl ReferenceStateMachine for Reference {
    type State = RefState;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<RefState> {
        Just(RefState::default()).boxed()
    }

    fn transitions(state: &RefState) -> BoxedStrategy<Op> {
        strategies::op(&state.model)
    }

    fn preconditions(state: &RefState, op: &Op) -> bool {
        // Shrinking removes ops; what a removed op made possible is filtered out here.
        state.model.allows(op)
    }

    fn apply(mut state: RefState, op: &Op) -> RefState {
        state.last = state.model.apply(op);
        state
    }
}
