//! Delivery of a delegated session's callbacks: a thread of the session's own calls the
//! delegate, one callback at a time, in order. A slow delegate delays its own session's
//! callbacks, and its tasks' reading once it is a window behind (the engine counts a body's
//! bytes out when `did_receive_data` returns, R6), and nothing else; the thread ends right
//! after `did_become_invalid`, having dropped the delegate (R3).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use crate::delegate::{Delegate, TaskInfo};
use crate::responder::Responder;
use crate::session::Shared;
use crate::stream::StreamTask;
use crate::task::Task;
use crate::{Answer, Callback, Delivered, Delivery, TaskId};

/// What a callback needs to say which task it is about.
pub(crate) type Infos = Arc<Mutex<HashMap<TaskId, Arc<TaskInfo>>>>;

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Start the session's delivery thread. It holds the session's parts weakly (to wrap a
/// stream's handle for the delegate): the thread must not keep the session alive.
pub(crate) fn spawn(
    name: &str,
    mut delivery: Delivery<Arc<dyn Delegate>>,
    infos: Infos,
    shared: Weak<Shared>,
) -> std::io::Result<()> {
    thread::Builder::new()
        .name(format!("{name}-delegate"))
        .spawn(move || {
            let waker = Waker::from(Arc::new(Unpark(thread::current())));
            let mut cx = Context::from_waker(&waker);
            loop {
                match delivery.poll_deliver(&mut cx, |delegate, callback| {
                    hand_over(delegate.as_ref(), callback, &infos, &shared)
                        .unwrap_or(Answer::Default)
                }) {
                    Poll::Ready(Delivered::One) => {}
                    Poll::Ready(Delivered::Done) => break,
                    Poll::Pending => thread::park(),
                }
            }
        })
        .map(drop)
}

/// Call the delegate method for `callback`; return its answer for a response head or a
/// redirect.
fn hand_over(
    delegate: &dyn Delegate,
    callback: Callback,
    infos: &Infos,
    shared: &Weak<Shared>,
) -> Option<Answer> {
    let info = |task: TaskId| {
        infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&task)
            .cloned()
    };
    match callback {
        Callback::WillRedirect {
            task,
            response,
            request,
        } => {
            let info = info(task)?;
            let (responder, settle) = Responder::new(task, shared.clone());
            delegate.will_perform_redirection_with(&info, &response, *request, responder);
            Some(settle.settle())
        }
        Callback::ReceiveResponse { task, response } => {
            let info = info(task)?;
            let (responder, settle) = Responder::new(task, shared.clone());
            delegate.did_receive_response_with(&info, &response, responder);
            // Answered (or dropped) during the call: as if returned. Else it comes later, and
            // the delivery goes on with the session's other callbacks meanwhile.
            Some(settle.settle())
        }
        Callback::ReceiveData { task, data } => {
            delegate.did_receive_data(&*info(task)?, &data);
            None
        }
        Callback::BecomeDownload { task } => {
            delegate.did_become_download(&*info(task)?);
            None
        }
        Callback::FinishDownloading { task, location } => {
            delegate.did_finish_downloading(&*info(task)?, &location);
            None
        }
        Callback::BecomeStream { task, stream } => {
            // The engine counted this handle for the delegate; if it cannot be handed over it
            // is dropped here, and a stream nobody holds is cancelled.
            let handle = stream?;
            let shared = shared.upgrade()?;
            let stream = StreamTask::new(Task::new(handle, shared));
            delegate.did_become_stream(&*info(task)?, stream);
            None
        }
        Callback::Open { task, protocol } => {
            delegate.did_open(&*info(task)?, protocol.as_deref());
            None
        }
        Callback::Close { task, code, reason } => {
            delegate.did_close(&*info(task)?, code.into(), &reason);
            None
        }
        Callback::Complete { task, result } => {
            // R1: nothing comes about a task after this, so its info can go.
            let info = infos
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&task)?;
            delegate.did_complete(&info, result);
            None
        }
        Callback::BecomeInvalid => {
            delegate.did_become_invalid();
            None
        }
    }
}
