//! The delegate: what a session tells its owner, serially and in order.

use std::path::Path;

use bytes::Bytes;

use crate::{Disposition, Error, TaskId, TaskKind};

/// What a callback is about.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub id: TaskId,
    /// The kind the task was created as (a data task that became a download says `Data`).
    pub kind: TaskKind,
    pub method: http::Method,
    pub uri: http::Uri,
}

/// Hears a session's callbacks. Every method has a default, so a delegate implements only
/// what it needs.
///
/// The callbacks of one session are delivered one at a time, in order, on a thread of the
/// session's own: a slow delegate delays only its own session's callbacks, never any IO.
/// Per task: `did_receive_response`, `did_receive_data`*, `did_become_download`,
/// `did_finish_downloading`, then exactly one `did_complete` (R1). Per session:
/// `did_become_invalid`, once, last (R2); the session drops the delegate right after it
/// returns (R3).
pub trait Delegate: Send + Sync + 'static {
    /// The response head arrived; answer what to do with the body.
    fn did_receive_response(&self, task: &TaskInfo, response: &http::Response<()>) -> Disposition {
        let _ = (task, response);
        Disposition::Allow
    }

    /// Body bytes, in order. Not called for downloads.
    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        let _ = (task, data);
    }

    /// A data task answered `BecomeDownload`: its body now goes to a file.
    fn did_become_download(&self, task: &TaskInfo) {
        let _ = task;
    }

    /// The download is complete at `location`; move the file during this call to keep it,
    /// since it is removed when the call returns.
    fn did_finish_downloading(&self, task: &TaskInfo, location: &Path) {
        let _ = (task, location);
    }

    /// The task is over: `Ok` on success, else why.
    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let _ = (task, result);
    }

    /// The session is invalidated: every task has completed and every resource is released.
    fn did_become_invalid(&self) {}
}
