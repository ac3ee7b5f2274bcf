//! Every terminal path of every kind of task, against the stage, with every witness (see
//! `leakproof_check::scenario`). Timeout scenarios run on paused tokio time.

use leakproof_check::scenario::{Ending, Kind, ending};

macro_rules! cells {
    ($($name:ident: $kind:ident $ending:ident $(, $paused:ident)?;)*) => {$(
        #[tokio::test $( ($paused = true) )?]
        async fn $name() {
            ending(Kind::$kind, Ending::$ending).await;
        }
    )*};
}

cells! {
    data_completion: Data Completion;
    data_cancel_before_resume: Data CancelBeforeResume;
    data_cancel_while_connecting: Data CancelWhileConnecting;
    data_cancel_mid_body: Data CancelMidBody;
    data_suspend_then_cancel: Data SuspendThenCancel;
    data_invalidate_and_cancel: Data InvalidateAndCancel;
    data_finish_tasks_and_invalidate: Data FinishTasksAndInvalidate;
    data_last_handle_dropped: Data LastHandleDropped;
    data_server_reset: Data ServerReset;
    data_malformed: Data Malformed;
    data_request_timeout: Data RequestTimeout, start_paused;
    data_resource_timeout: Data ResourceTimeout, start_paused;

    download_completion: Download Completion;
    download_cancel_before_resume: Download CancelBeforeResume;
    download_cancel_while_connecting: Download CancelWhileConnecting;
    download_cancel_mid_body: Download CancelMidBody;
    download_suspend_then_cancel: Download SuspendThenCancel;
    download_invalidate_and_cancel: Download InvalidateAndCancel;
    download_finish_tasks_and_invalidate: Download FinishTasksAndInvalidate;
    download_last_handle_dropped: Download LastHandleDropped;
    download_server_reset: Download ServerReset;
    download_malformed: Download Malformed;
    download_request_timeout: Download RequestTimeout, start_paused;
    download_resource_timeout: Download ResourceTimeout, start_paused;

    upload_completion: Upload Completion;
    upload_cancel_before_resume: Upload CancelBeforeResume;
    upload_cancel_while_connecting: Upload CancelWhileConnecting;
    upload_cancel_mid_body: Upload CancelMidBody;
    upload_suspend_then_cancel: Upload SuspendThenCancel;
    upload_invalidate_and_cancel: Upload InvalidateAndCancel;
    upload_finish_tasks_and_invalidate: Upload FinishTasksAndInvalidate;
    upload_last_handle_dropped: Upload LastHandleDropped;
    upload_server_reset: Upload ServerReset;
    upload_malformed: Upload Malformed;
    upload_request_timeout: Upload RequestTimeout, start_paused;
    upload_resource_timeout: Upload ResourceTimeout, start_paused;
}
