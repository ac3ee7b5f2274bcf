//! The delegate: what a session tells its owner, serially and in order.

use std::path::Path;

use bytes::Bytes;

use crate::responder::Responder;
use crate::stream::StreamTask;
use crate::{CloseCode, Disposition, Error, Redirect, TaskId, TaskKind};

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
/// session's own: a slow delegate delays only its own session's callbacks, and the reading of
/// its own tasks' bodies once it is a window behind
/// ([`delegate_window`](crate::ConfigurationBuilder::delegate_window), R6).
/// Per task: `will_perform_redirection` for each redirect, `did_receive_response`, `did_receive_data`*, `did_become_download`,
/// `did_finish_downloading`, `did_become_stream`, `did_open` / `did_close` (websockets), then
/// exactly one `did_complete` (R1). Per session:
/// `did_become_invalid`, once, last (R2); the session drops the delegate right after it
/// returns (R3).
pub trait Delegate: Send + Sync + 'static {
    /// The response head arrived; answer what to do with the body: read it
    /// ([`Disposition::Allow`]), cancel the task, or, for a data task, make the body a
    /// download's file or a stream ([`Disposition::BecomeStream`], see
    /// [`did_become_stream`](Self::did_become_stream)).
    fn did_receive_response(&self, task: &TaskInfo, response: &http::Response<()>) -> Disposition {
        let _ = (task, response);
        Disposition::Allow
    }

    /// The server answered with a redirect (301, 302, 303, 307, 308 and a `Location`), and
    /// `request` is the one that follows it: its URL resolved against the last one, its method
    /// and body as RFC 9110 (15.4) says (a 303, and a 301 or 302 to a POST, become a GET
    /// without a body; 307 and 308 keep both), `Authorization` and `Cookie` removed when it
    /// goes to another origin. Answer [`Redirect::Follow`] with it, or with a request of your
    /// own, or [`Redirect::Refuse`]: the redirect is then the response (`did_receive_response`
    /// with it, its body, `did_complete(Ok)`). By default, follow. A task follows at most the
    /// configuration's [`max_redirects`](crate::ConfigurationBuilder::max_redirects).
    fn will_perform_redirection(
        &self,
        task: &TaskInfo,
        response: &http::Response<()>,
        request: http::Request<()>,
    ) -> Redirect {
        let _ = (task, response);
        Redirect::Follow(request)
    }

    /// [`did_receive_response`](Self::did_receive_response) with a [`Responder`], to answer
    /// now or later (from any thread, once the work that decides is done): the session's other
    /// callbacks are delivered meanwhile, while this task reads nothing and its request
    /// timeout stops. Dropping the responder unanswered cancels the task. By default, answers
    /// with `did_receive_response`'s disposition.
    fn did_receive_response_with(
        &self,
        task: &TaskInfo,
        response: &http::Response<()>,
        responder: Responder<Disposition>,
    ) {
        responder.answer(self.did_receive_response(task, response));
    }

    /// [`will_perform_redirection`](Self::will_perform_redirection) with a [`Responder`], to
    /// answer now or later, as [`did_receive_response_with`](Self::did_receive_response_with).
    /// By default, answers with `will_perform_redirection`'s.
    fn will_perform_redirection_with(
        &self,
        task: &TaskInfo,
        response: &http::Response<()>,
        request: http::Request<()>,
        responder: Responder<Redirect>,
    ) {
        responder.answer(self.will_perform_redirection(task, response, request));
    }

    /// Body bytes, in order. Not called for downloads. The task reads at most the session's
    /// [`delegate_window`](crate::ConfigurationBuilder::delegate_window) ahead of these calls
    /// (the one in progress included); a task cancelled or timed out meanwhile drops the bytes
    /// not handed over yet, and `did_complete` comes next.
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

    /// A data task answered [`Disposition::BecomeStream`]: its body, from its first unread
    /// byte, is read through `stream`, which is the delegate's to keep or hand on. The body is
    /// read no further ahead than the stream's window (R6). A stream whose every handle is
    /// dropped (this one, and the data task's own) is cancelled and its connection closed.
    fn did_become_stream(&self, task: &TaskInfo, stream: StreamTask) {
        let _ = (task, stream);
    }

    /// The websocket's upgrade was accepted, with this subprotocol if the server chose one.
    fn did_open(&self, task: &TaskInfo, protocol: Option<&str>) {
        let _ = (task, protocol);
    }

    /// The websocket's close handshake is done: the peer's close frame arrived, with this code
    /// and reason (ours went first, or it answers the peer's); [`CloseCode::NO_STATUS`] (1005) if the frame
    /// had no code.
    /// `did_complete` follows. A close frame the peer may not send (a code reserved or
    /// unassigned, one byte, a reason that is not UTF-8) gets no `did_close`: the websocket
    /// completes with [`Error::WebSocketProtocol`] instead.
    fn did_close(&self, task: &TaskInfo, code: CloseCode, reason: &str) {
        let _ = (task, code, reason);
    }

    /// The task is over: `Ok` on success, else why.
    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let _ = (task, result);
    }

    /// The session is invalidated: every task has completed and every resource is released.
    fn did_become_invalid(&self) {}
}
