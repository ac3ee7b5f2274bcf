//! Answers given later: a [`Responder`] lets a delegate answer `did_receive_response` (or a
//! redirect) after its callback has returned, from any thread, as URLSession's completion
//! handlers do, while the session's other callbacks go on.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use crate::session::{Shared, lock};
use crate::{Answer, Disposition, Redirect, TaskId};

mod sealed {
    /// What a [`Responder`](super::Responder) can answer; not for others to implement.
    pub trait Sealed {
        fn into_answer(self) -> crate::Answer;
    }
}

/// An answer a [`Responder`] carries: a [`Disposition`] or a [`Redirect`].
pub trait Reply: sealed::Sealed + Send + 'static {}

impl sealed::Sealed for Disposition {
    fn into_answer(self) -> Answer {
        Answer::Disposition(self)
    }
}
impl Reply for Disposition {}

impl sealed::Sealed for Redirect {
    fn into_answer(self) -> Answer {
        Answer::Redirect(self)
    }
}
impl Reply for Redirect {}

/// Where an answer stands, shared by the responder and the delivery that handed it out.
enum Slot<A> {
    /// The callback has not returned, and no answer came yet.
    Asked,
    /// Answered before the callback returned: the delivery hands it over.
    Answered(A),
    /// Dropped unanswered before the callback returned: the delivery cancels the task.
    Dropped,
    /// The callback returned unanswered: the responder hands its answer to the engine itself.
    Later,
    /// Handed over.
    Done,
}

/// The way to answer a task's question (its response's [`Disposition`], a [`Redirect`])
/// now or later: [`answer`](Self::answer) it once, from any thread. Meanwhile the task reads
/// nothing and its request timeout stops (its resource timeout runs on); the session's other
/// callbacks are delivered as usual. Dropping it unanswered cancels the task
/// (`did_complete(Err(Cancelled))`). An answer after the task is over (cancelled, timed out,
/// its session invalidated) does nothing.
///
/// A delegate that keeps a responder must answer it or drop it: a task waiting for its answer
/// keeps its session from being invalidated, until the resource timeout ends it.
#[must_use = "dropping a Responder unanswered cancels its task"]
pub struct Responder<A: Reply> {
    task: TaskId,
    slot: Arc<Mutex<Slot<A>>>,
    shared: Weak<Shared>,
}

impl<A: Reply> fmt::Debug for Responder<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("task", &self.task)
            .finish()
    }
}

impl<A: Reply> Responder<A> {
    /// A responder for `task`, and the delivery's side of it.
    pub(crate) fn new(task: TaskId, shared: Weak<Shared>) -> (Responder<A>, Settle<A>) {
        let slot = Arc::new(Mutex::new(Slot::Asked));
        let settle = Settle(slot.clone());
        (Responder { task, slot, shared }, settle)
    }

    /// The task this answers for.
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// Answer. Before the delegate's callback returned, the answer is taken as if returned;
    /// after, it goes to the session now.
    pub fn answer(self, answer: A) {
        self.hand_over(Some(answer));
    }

    fn hand_over(&self, answer: Option<A>) {
        let mut slot = lock(&self.slot);
        match std::mem::replace(&mut *slot, Slot::Done) {
            Slot::Asked => {
                *slot = match answer {
                    Some(answer) => Slot::Answered(answer),
                    None => Slot::Dropped,
                }
            }
            Slot::Later => {
                // Under the slot's lock, so that the delivery never sees this answer twice.
                let answer = answer.map_or(Answer::Cancel, sealed::Sealed::into_answer);
                if let Some(shared) = self.shared.upgrade() {
                    shared.core.answer(self.task, answer);
                }
            }
            done => *slot = done,
        }
    }
}

impl<A: Reply> Drop for Responder<A> {
    fn drop(&mut self) {
        // Answered already: the slot is done, and this is a no-op.
        self.hand_over(None);
    }
}

/// The delivery's side of a [`Responder`].
pub(crate) struct Settle<A>(Arc<Mutex<Slot<A>>>);

impl<A: Reply> Settle<A> {
    /// The callback returned: its answer if it came, [`Answer::Cancel`] if the responder was
    /// dropped unanswered, else [`Answer::Later`] (the responder answers the engine itself).
    pub fn settle(self) -> Answer {
        let mut slot = lock(&self.0);
        match std::mem::replace(&mut *slot, Slot::Done) {
            Slot::Asked => {
                *slot = Slot::Later;
                Answer::Later
            }
            Slot::Answered(answer) => answer.into_answer(),
            Slot::Dropped | Slot::Later | Slot::Done => Answer::Cancel,
        }
    }
}
