//! Task handles. A task starts suspended; `resume` runs it. Dropping the handle of a
//! suspended task cancels it (nothing could resume it); a running task runs on (R10).
//!
//! Every kind of handle is a [`SessionTask`], so code that only runs, pauses, cancels or awaits
//! a task need not know which kind it holds.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::session::Shared;
use crate::{TaskHandle, TaskId, TaskState};

/// What every task handle does, whatever its kind: [`DataTask`], [`DownloadTask`],
/// [`UploadTask`], [`StreamTask`](crate::StreamTask) and
/// [`WebSocketTask`](crate::WebSocketTask), URLSession's `URLSessionTask`.
///
/// A task starts `Suspended`; [`resume`](Self::resume) runs it, [`suspend`](Self::suspend)
/// stops its reading and its timers until the next resume (R7), and resumes and suspends do
/// not nest. [`cancel`](Self::cancel) ends it with `did_complete(Cancelled)`. Once `Completed`
/// every call is a no-op. Each kind's own methods say what its first resume and its cancel do
/// (a websocket also has a close handshake, [`cancel_with`](crate::WebSocketTask::cancel_with)).
///
/// Dropping a handle never leaks: a suspended task whose handle goes is cancelled (nothing
/// could resume it), a running one runs on to its completion (R10).
///
/// The trait is implemented by the crate's handles only; it is there for generic code:
///
/// ```no_run
/// # async fn run() -> Result<(), leakproof::Error> {
/// use leakproof::{Configuration, Session, SessionTask, TaskState};
///
/// /// Run every task, then wait for each one's result.
/// async fn run_all(tasks: &[&dyn SessionTask]) {
///     for task in tasks {
///         task.resume();
///     }
///     for task in tasks {
///         let _ = std::future::poll_fn(|cx| task.poll_result(cx)).await;
///     }
/// }
///
/// let session = Session::new(Configuration::default(), None);
/// let get = |path: &str| http::Request::get(format!("http://127.0.0.1:8080{path}")).body(());
/// let data = session.data_task(get("/a").unwrap())?;
/// let download = session.download_task(get("/b").unwrap())?;
/// run_all(&[&data, &download]).await;
/// assert_eq!(data.state(), TaskState::Completed);
/// # Ok(()) }
/// ```
pub trait SessionTask: fmt::Debug + Send + Sync + sealed::Sealed {
    /// The task's id in its session.
    fn id(&self) -> TaskId;

    /// Where the task is in its lifecycle.
    fn state(&self) -> TaskState;

    /// Run the task; the first resume starts it (sends the request, or connects).
    fn resume(&self);

    /// Stop reading and stop the task's timers until it is resumed (R7).
    fn suspend(&self);

    /// Cancel the task: `did_complete(Cancelled)`, its buffers dropped, its connection closed.
    fn cancel(&self);

    /// The task's result once it is `Completed`: the one the delegate's `did_complete` gets,
    /// with or without a delegate. Awaiting it keeps nothing alive and changes nothing (a
    /// suspended task stays suspended: resume it); it may be awaited after completion, and
    /// from several places at once.
    fn result(&self) -> impl Future<Output = Result<(), crate::Error>> + Send + '_
    where
        Self: Sized,
    {
        std::future::poll_fn(|cx| self.poll_result(cx))
    }

    /// [`result`](Self::result), polled: how a `&dyn SessionTask` is awaited
    /// (`std::future::poll_fn(|cx| task.poll_result(cx)).await`). `Ready` once the task is
    /// `Completed`; otherwise `cx` is woken when it completes.
    fn poll_result(&self, cx: &mut Context<'_>) -> Poll<Result<(), crate::Error>>;
}

mod sealed {
    /// Only the crate's handles are [`SessionTask`](super::SessionTask)s.
    pub trait Sealed {}
}

/// Implement [`SessionTask`] for a handle whose [`Task`] is its field `$task`, over the
/// handle's own methods of the same names (each kind documents what they do for it). Invoked
/// where the field is visible.
macro_rules! session_task {
    ($name:ty, $task:tt) => {
        impl $crate::task::Sealed for $name {}

        impl $crate::task::SessionTask for $name {
            fn id(&self) -> $crate::TaskId {
                <$name>::id(self)
            }

            fn state(&self) -> $crate::TaskState {
                <$name>::state(self)
            }

            fn resume(&self) {
                <$name>::resume(self)
            }

            fn suspend(&self) {
                <$name>::suspend(self)
            }

            fn cancel(&self) {
                <$name>::cancel(self)
            }

            fn poll_result(
                &self,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<Result<(), $crate::Error>> {
                self.$task.handle().poll_result(cx)
            }
        }
    };
}
pub(crate) use sealed::Sealed;
pub(crate) use session_task;

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
            /// The task's id in its session.
            pub fn id(&self) -> TaskId {
                self.0.handle().id()
            }

            /// Where the task is in its lifecycle.
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
session_task!(DataTask, 0);
session_task!(DownloadTask, 0);
session_task!(UploadTask, 0);
