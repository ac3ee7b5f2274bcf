//! Delivery of a delegated session's callbacks: a thread of the session's own calls the
//! delegate, one callback at a time, in order. A slow delegate delays its own session's
//! callbacks, and its tasks' reading once it is a window behind (the engine counts a body's
//! bytes out when `did_receive_data` returns, R6), and nothing else; the thread ends right
//! after `did_become_invalid`, having dropped the delegate (R3).
//!
//! With the `test-util` feature, a session can deliver from a task on its own runtime instead
//! ([`SessionBuilder::deliver_on_runtime`](crate::SessionBuilder::deliver_on_runtime)): the
//! suite's simulated world runs everything on one thread, so that its paused clock sees when
//! nothing can make progress and every run is the same.

use std::collections::HashMap;
#[cfg(feature = "test-util")]
use std::future::Future;
#[cfg(feature = "test-util")]
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use crate::delegate::{Delegate, TaskInfo};
use crate::responder::{Responder, Settle};
use crate::session::Shared;
use crate::stream::StreamTask;
use crate::task::Task;
use crate::{Answer, Callback, Delivered, Delivery, Disposition, Receipt, Redirect, TaskId};

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
                let (callback, receipt) = match delivery.poll_begin(&mut cx) {
                    Poll::Ready(Ok(taken)) => taken,
                    Poll::Ready(Err(_)) => break,
                    Poll::Pending => {
                        thread::park();
                        continue;
                    }
                };
                let asked = call(&delivery, callback, &infos, &shared);
                if finish(&mut delivery, receipt, asked) == Delivered::Done {
                    break;
                }
            }
        })
        .map(drop)
}

/// What the world awaits after each callback has returned, before the engine is told (see
/// [`SessionBuilder::deliver_on_runtime`](crate::SessionBuilder::deliver_on_runtime)).
#[cfg(feature = "test-util")]
pub(crate) type Returned = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Deliver from a task on `runtime`: the same steps as the thread's, and after each callback
/// `returned()` is awaited before the engine hears that the delegate returned. Meanwhile the
/// engine counts the delegate as in the callback, as it does a thread blocked in it.
#[cfg(feature = "test-util")]
pub(crate) fn spawn_on(
    runtime: &tokio::runtime::Handle,
    mut delivery: Delivery<Arc<dyn Delegate>>,
    infos: Infos,
    shared: Weak<Shared>,
    returned: Returned,
) {
    runtime.spawn(async move {
        while let Ok((callback, receipt)) = std::future::poll_fn(|cx| delivery.poll_begin(cx)).await
        {
            let asked = call(&delivery, callback, &infos, &shared);
            returned().await;
            if finish(&mut delivery, receipt, asked) == Delivered::Done {
                break;
            }
        }
    });
}

/// Hand `callback` to the delivery's delegate.
fn call(
    delivery: &Delivery<Arc<dyn Delegate>>,
    callback: Callback,
    infos: &Infos,
    shared: &Weak<Shared>,
) -> Option<Asked> {
    let delegate = delivery
        .delegate()
        .expect("callbacks are queued only while the delegate is held");
    hand_over(delegate.as_ref(), callback, infos, shared)
}

/// The delegate has returned: tell the engine, with its answer if it was asked a question.
fn finish(
    delivery: &mut Delivery<Arc<dyn Delegate>>,
    receipt: Receipt,
    asked: Option<Asked>,
) -> Delivered {
    let answer = match asked {
        Some(Asked::Disposition(settle)) => settle.settle(),
        Some(Asked::Redirect(settle)) => settle.settle(),
        None => Answer::Default,
    };
    delivery.finish(receipt, answer)
}

/// A question put to the delegate, whose answer is taken once its callback has returned.
enum Asked {
    Disposition(Settle<Disposition>),
    Redirect(Settle<Redirect>),
}

/// Call the delegate method for `callback`; for a response head or a redirect, the question
/// whose answer is settled when the callback has returned.
fn hand_over(
    delegate: &dyn Delegate,
    callback: Callback,
    infos: &Infos,
    shared: &Weak<Shared>,
) -> Option<Asked> {
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
            Some(Asked::Redirect(settle))
        }
        Callback::ReceiveResponse { task, response } => {
            let info = info(task)?;
            let (responder, settle) = Responder::new(task, shared.clone());
            delegate.did_receive_response_with(&info, &response, responder);
            // Answered (or dropped) during the call: as if returned. Else it comes later, and
            // the delivery goes on with the session's other callbacks meanwhile.
            Some(Asked::Disposition(settle))
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
