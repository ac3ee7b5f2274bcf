//! Task handles. A task starts suspended; `resume` runs it. Dropping the handle of a
//! suspended task cancels it (nothing could resume it); a running task runs on (R10).

use std::fmt;
use std::sync::Arc;

use crate::session::Shared;
use crate::{TaskHandle, TaskId, TaskState};

/// What every kind of task handle holds.
pub(crate) struct Task {
    handle: Option<TaskHandle>,
    shared: Arc<Shared>,
}

impl Task {
    pub(crate) fn new(handle: TaskHandle, shared: Arc<Shared>) -> Self {
        Self {
            handle: Some(handle),
            shared,
        }
    }

    pub(crate) fn handle(&self) -> &TaskHandle {
        self.handle.as_ref().expect("present until dropped")
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let id = handle.id();
        drop(handle); // may cancel it (R10)
        if self.shared.core.task_state(id) == TaskState::Completed {
            self.shared.forget(id);
        }
    }
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.handle(), f)
    }
}

macro_rules! task_kind {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(pub(crate) Task);

        impl $name {
            pub fn id(&self) -> TaskId {
                self.0.handle().id()
            }

            pub fn state(&self) -> TaskState {
                self.0.handle().state()
            }

            /// Run the task; the first resume sends the request. Resumes do not nest.
            pub fn resume(&self) {
                self.0.handle().resume();
            }

            /// Stop reading and stop the task's timers until it is resumed (R7).
            pub fn suspend(&self) {
                self.0.handle().suspend();
            }

            /// Cancel the task: `did_complete(Cancelled)`, its connection closed.
            pub fn cancel(&self) {
                self.0.handle().cancel();
            }

            /// The task's result once it is `Completed`: the one the delegate's
            /// `did_complete` gets, with or without a delegate. Awaiting it keeps nothing
            /// alive and changes nothing (a suspended task stays suspended: resume it); it
            /// may be awaited after completion, and from several places at once.
            pub async fn result(&self) -> Result<(), crate::Error> {
                std::future::poll_fn(|cx| self.0.handle().poll_result(cx)).await
            }
        }
    };
}

task_kind!(
    /// A task whose body goes to the delegate's `did_receive_data`.
    DataTask
);
task_kind!(
    /// A task whose body goes to a temp file handed to `did_finish_downloading`.
    DownloadTask
);
task_kind!(
    /// A task that sends a request body, its response handled as a data task's.
    UploadTask
);
