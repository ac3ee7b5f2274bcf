//! # leakproof: an HTTP client that cannot leak
//!
//! A URLSession-style HTTP/1.1 client on tokio and hyper, over TCP or TLS (rustls on ring:
//! `https://` and `wss://`): [`Session`]s with a [`Configuration`] and an optional
//! [`Delegate`]; data, download and upload tasks that start suspended; async conveniences
//! ([`Session::data`], [`Session::download`], [`Session::upload`]); a connection pool per
//! session. Stream tasks ([`StreamTask`], direct or a response's body) read no further ahead
//! than their window (R6); websocket tasks ([`WebSocketTask`]) close within the close timeout
//! whatever the peer does (R11). Every kind of task handle is a [`SessionTask`], for code
//! that runs, cancels or awaits tasks whatever their kind.
//!
//! In the async ecosystem: every task's `result()` can be awaited for the outcome its
//! delegate's `did_complete` gets, with or without a delegate; [`StreamTask`] is a tokio
//! `AsyncRead` + `AsyncWrite` with untimed reads and writes for `tokio::time::timeout` to
//! bound; [`WebSocketTask`] is a futures `Stream` of messages and `Sink` of messages, its close
//! codes a [`CloseCode`].
//!
//! Its lifecycle is `leakproof-core`'s engine, checked against the specification in
//! `leakproof-model`: every terminal path of a task or a session releases its connections,
//! buffered bytes, temp files and delegate. Forgetting to invalidate is harmless: dropping the
//! last [`Session`] clone finishes its tasks and releases everything (R10).
//!
//! https trusts the webpki-roots roots, and those the configuration adds
//! ([`ConfigurationBuilder::add_root_certificate`]); a failed handshake is [`Error::Tls`]
//! with a [`TlsFailure`]. Each session has its own TLS configuration and resumption cache
//! (at most [`ConfigurationBuilder::tls_session_cache`] sessions), dropped with the session.
//!
//! ```no_run
//! # async fn run() -> Result<(), leakproof::Error> {
//! use leakproof::{Configuration, Session};
//!
//! let session = Session::new(Configuration::default(), None);
//! let response = session
//!     .data(http::Request::get("http://127.0.0.1:8080/").body(()).unwrap())
//!     .await?;
//! println!("{} bytes", response.body().len());
//! session.finish_tasks_and_invalidate();
//! session.invalidated().await; // every socket closed, every byte released
//! # Ok(()) }
//! ```
//!
//! Each session has its own response cache too ([`UrlCache`]: 512 KiB in memory by default,
//! the rules `http-cache-semantics`'), counted in the ledger, emptied by [`Session::reset`]
//! and dropped with the session.
//!
//! ```no_run
//! # async fn cached() -> Result<(), leakproof::Error> {
//! use leakproof::{CacheDisk, Configuration, Session, UrlCache};
//!
//! let cache = UrlCache::memory(1 << 20).disk(CacheDisk::Ephemeral { capacity: 16 << 20 });
//! let config = Configuration::builder().url_cache(Some(cache)).build()?;
//! let session = Session::new(config, None);
//! let url = "http://127.0.0.1:8080/a";
//! session.data(http::Request::get(url).body(()).unwrap()).await?;
//! // Fresh (Cache-Control: max-age=...): answered from the cache, no connection opened.
//! session.data(http::Request::get(url).body(()).unwrap()).await?;
//! session.reset().await; // cache emptied, idle connections closed, TLS sessions forgotten
//! # Ok(()) }
//! ```

mod cache;
mod close;
mod config;
mod delegate;
mod delivery;
mod driver;
mod exchange;
mod pool;
mod redirect;
mod responder;
mod session;
mod stream;
mod task;
mod tls;
mod transport;
mod websocket;

pub use close::CloseCode;
pub use config::{CacheDisk, Configuration, ConfigurationBuilder, UrlCache};
pub use delegate::{Delegate, TaskInfo};
pub use leakproof_core::{
    Disposition, Error, GOING_AWAY, Ledger, Message, Operation, Redirect, SessionState, TaskId,
    TaskKind, TaskState, Timeout, TlsFailure,
};
pub use responder::{Reply, Responder};
pub use session::{DownloadedFile, Observer, Session, SessionBuilder, UploadBody};
pub use stream::StreamTask;
pub use task::{DataTask, DownloadTask, SessionTask, UploadTask};
pub use tls::EXTRA_CA_CERTS_ENV;
pub use transport::{Endpoint, Tcp, Transport};
pub use websocket::{IntoWebSocketRequest, WebSocketTask};

use leakproof_core::{
    Action, Answer, Callback, Config, ConnId, Core, Delivered, Delivery, Intake, Outgoing, Proceed,
    Receipt, Release, Route, SessionHandle, SessionKind, Start, TaskHandle, TimerId, session,
};
