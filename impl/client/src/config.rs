//! A session's configuration: timeouts, pool limits, default headers, the download directory,
//! and the bounds of streams and websockets (R6, R11).

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use rustls::pki_types::CertificateDer;

use crate::Error;
use crate::transport::{Connector, Transport};

/// TLS sessions a session keeps for resumption by default: see
/// [`ConfigurationBuilder::tls_session_cache`].
const DEFAULT_TLS_SESSION_CACHE: usize = 64;

/// The response cache a session has by default: 512 KiB in memory, no disk (see
/// [`ConfigurationBuilder::url_cache`]).
const DEFAULT_CACHE_MEMORY: usize = 512 * 1024;

/// A session's response cache (URLCache's role): how much it may hold in memory, where it
/// keeps bodies on disk if anywhere, and the largest response it stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlCache {
    pub(crate) memory_capacity: usize,
    pub(crate) max_entry: usize,
    pub(crate) disk: Option<CacheDisk>,
}

/// Where a [`UrlCache`] keeps its bodies on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheDisk {
    /// A directory the session makes for itself (in the system temp dir), emptied and removed
    /// when the session is invalidated.
    Ephemeral { capacity: usize },
    /// A directory of the caller's. The session's entries are written there, one file per
    /// body, and left there at invalidation; the session holds no file open between a write
    /// or a read.
    Dir { path: PathBuf, capacity: usize },
}

impl CacheDisk {
    /// The most body bytes kept on disk.
    pub fn capacity(&self) -> usize {
        match self {
            CacheDisk::Ephemeral { capacity } | CacheDisk::Dir { capacity, .. } => *capacity,
        }
    }
}

impl UrlCache {
    /// A cache of `capacity` bytes in memory (bodies and headers), storing responses of at
    /// most a twentieth of it (URLCache's rule); no disk.
    pub fn memory(capacity: usize) -> UrlCache {
        UrlCache {
            memory_capacity: capacity,
            max_entry: capacity / 20,
            disk: None,
        }
    }

    /// Keep bodies on disk as well, bounded by the disk's capacity; the largest response
    /// stored becomes a twentieth of that, unless [`max_entry`](Self::max_entry) says
    /// otherwise afterwards. Memory then holds only the index (heads and policies).
    pub fn disk(mut self, disk: CacheDisk) -> UrlCache {
        self.max_entry = self.max_entry.max(disk.capacity() / 20);
        self.disk = Some(disk);
        self
    }

    /// The largest response stored, in bytes (body and headers); larger ones are passed
    /// through and not kept.
    pub fn max_entry(mut self, bytes: usize) -> UrlCache {
        self.max_entry = bytes;
        self
    }

    pub fn memory_capacity(&self) -> usize {
        self.memory_capacity
    }

    pub fn max_entry_size(&self) -> usize {
        self.max_entry
    }

    pub fn disk_location(&self) -> Option<&CacheDisk> {
        self.disk.as_ref()
    }
}
/// [`ConfigurationBuilder::max_redirects`].
const DEFAULT_MAX_REDIRECTS: u32 = 10;

/// How a session behaves. Build one with [`Configuration::builder`], or take a preset:
/// [`Configuration::default`] or [`Configuration::ephemeral`].
#[derive(Debug, Clone)]
pub struct Configuration {
    pub(crate) request_timeout: Duration,
    pub(crate) resource_timeout: Duration,
    pub(crate) max_connections_per_host: usize,
    pub(crate) max_idle_per_host: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) default_headers: HeaderMap,
    pub(crate) download_dir: PathBuf,
    pub(crate) read_buffer: usize,
    pub(crate) stream_window: usize,
    pub(crate) delegate_window: usize,
    pub(crate) write_buffer: usize,
    pub(crate) close_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) max_body_size: usize,
    pub(crate) max_redirects: u32,
    pub(crate) tls_session_cache: usize,
    /// Roots trusted besides (or, without `webpki_roots`, instead of) webpki-roots', checked
    /// when built.
    pub(crate) root_certificates: Vec<CertificateDer<'static>>,
    pub(crate) webpki_roots: bool,
    pub(crate) url_cache: Option<UrlCache>,
    /// How connections are opened: TCP unless the builder plugs another transport.
    pub(crate) transport: Connector,
}

/// The smallest `read_buffer` hyper accepts (`http1::Builder::max_buf_size`).
const MIN_READ_BUFFER: usize = 8192;

impl Default for Configuration {
    /// 60 s request timeout, 7 days resource timeout (URLSession's), 6 connections and 6 idle
    /// ones per host, idle connections closed after 90 s, downloads in the system temp dir;
    /// a 16 KiB read buffer, a 64 KiB stream window, delegate window and write buffer, a 5 s
    /// websocket close timeout, 16 MiB websocket messages and 16 MiB bodies collected by the
    /// conveniences; https trusting the webpki-roots (Mozilla's) roots, and those of the PEM
    /// file [`EXTRA_CA_CERTS_ENV`](crate::EXTRA_CA_CERTS_ENV) names if set, and at most 64 TLS
    /// sessions kept for resumption; a 512 KiB response cache in memory.
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            resource_timeout: Duration::from_secs(7 * 24 * 3600),
            max_connections_per_host: 6,
            max_idle_per_host: 6,
            idle_timeout: Duration::from_secs(90),
            default_headers: HeaderMap::new(),
            download_dir: std::env::temp_dir(),
            read_buffer: 16 * 1024,
            stream_window: 64 * 1024,
            delegate_window: 64 * 1024,
            write_buffer: 64 * 1024,
            close_timeout: Duration::from_secs(5),
            max_message_size: 16 * 1024 * 1024,
            max_body_size: 16 * 1024 * 1024,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            tls_session_cache: DEFAULT_TLS_SESSION_CACHE,
            root_certificates: Vec::new(),
            webpki_roots: true,
            url_cache: Some(UrlCache::memory(DEFAULT_CACHE_MEMORY)),
            transport: Connector::Tcp,
        }
    }
}

impl Configuration {
    /// Nothing outlives a task: no connection is kept alive between tasks, and no response
    /// is cached. For code that must leave no state behind at all, at the price of a
    /// connection per request.
    pub fn ephemeral() -> Self {
        Self {
            max_idle_per_host: 0,
            url_cache: None,
            ..Self::default()
        }
    }

    pub fn builder() -> ConfigurationBuilder {
        ConfigurationBuilder {
            config: Self::default(),
            error: None,
        }
    }

    /// Idle time allowed between bytes while a response is awaited or read.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Time allowed for a whole task, from resume to completion.
    pub fn resource_timeout(&self) -> Duration {
        self.resource_timeout
    }

    pub fn max_connections_per_host(&self) -> usize {
        self.max_connections_per_host
    }

    pub fn max_idle_per_host(&self) -> usize {
        self.max_idle_per_host
    }

    /// How long a kept-alive connection waits in the pool before it is closed.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    pub fn default_headers(&self) -> &HeaderMap {
        &self.default_headers
    }

    /// Where download tasks write their temp files.
    pub fn download_dir(&self) -> &std::path::Path {
        &self.download_dir
    }

    /// How many bytes of a response (or of a stream's socket) are read ahead of the reader
    /// into the transport's buffer.
    pub fn read_buffer(&self) -> usize {
        self.read_buffer
    }

    /// The most unread bytes a stream task holds, its transport's buffer included (R6).
    pub fn stream_window(&self) -> usize {
        self.stream_window
    }

    /// The most body bytes a data or upload task holds that its delegate has not finished
    /// with, its transport's buffer included (R6).
    pub fn delegate_window(&self) -> usize {
        self.delegate_window
    }

    /// The most bytes a stream or websocket queues of what its user writes.
    pub fn write_buffer(&self) -> usize {
        self.write_buffer
    }

    /// How long a websocket's close handshake may take before its connection is closed
    /// regardless (R11).
    pub fn close_timeout(&self) -> Duration {
        self.close_timeout
    }

    /// The largest websocket message (and frame) received or sent.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// The largest response body [`Session::data`](crate::Session::data) and
    /// [`Session::upload`](crate::Session::upload) collect in memory.
    pub fn max_body_size(&self) -> usize {
        self.max_body_size
    }

    /// The most redirects a task follows (0: none, a redirect is the response).
    pub fn max_redirects(&self) -> u32 {
        self.max_redirects
    }

    /// The most TLS sessions kept for resumption (0: none, every https connection makes a
    /// full handshake).
    pub fn tls_session_cache(&self) -> usize {
        self.tls_session_cache
    }

    /// The session's response cache, if it has one.
    pub fn url_cache(&self) -> Option<&UrlCache> {
        self.url_cache.as_ref()
    }

    /// The roots https trusts besides webpki-roots' (DER).
    pub fn root_certificates(&self) -> &[CertificateDer<'static>] {
        &self.root_certificates
    }

    /// Whether https trusts the roots of the webpki-roots crate (Mozilla's).
    pub fn webpki_roots(&self) -> bool {
        self.webpki_roots
    }

    /// What the engine may hold for a stream: the window less the transport's buffer (R6).
    pub(crate) fn read_ahead(&self) -> usize {
        self.stream_window.saturating_sub(self.read_buffer)
    }

    /// What the engine may queue for a delegate: its window less the transport's buffer (R6).
    pub(crate) fn delegate_ahead(&self) -> usize {
        self.delegate_window.saturating_sub(self.read_buffer)
    }
}

/// Builds a [`Configuration`]; [`build`](Self::build) reports the first invalid value.
#[derive(Debug)]
pub struct ConfigurationBuilder {
    config: Configuration,
    error: Option<String>,
}

impl ConfigurationBuilder {
    fn check(mut self, ok: bool, what: impl FnOnce() -> String) -> Self {
        if !ok && self.error.is_none() {
            self.error = Some(what());
        }
        self
    }

    /// Idle time allowed between bytes (R12). Must be more than zero.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self.check(!timeout.is_zero(), || {
            "request_timeout must be more than zero".into()
        })
    }

    /// Time allowed for a whole task (R12). Must be more than zero.
    pub fn resource_timeout(mut self, timeout: Duration) -> Self {
        self.config.resource_timeout = timeout;
        self.check(!timeout.is_zero(), || {
            "resource_timeout must be more than zero".into()
        })
    }

    /// At most this many connections to one host at once; more tasks wait. At least 1.
    pub fn max_connections_per_host(mut self, max: usize) -> Self {
        self.config.max_connections_per_host = max;
        self.check(max > 0, || {
            "max_connections_per_host must be at least 1".into()
        })
    }

    /// At most this many kept-alive connections per host; 0 keeps none.
    pub fn max_idle_per_host(mut self, max: usize) -> Self {
        self.config.max_idle_per_host = max;
        self
    }

    /// How long an idle connection stays in the pool. Must be more than zero.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self.check(!timeout.is_zero(), || {
            "idle_timeout must be more than zero".into()
        })
    }

    /// A header added to every request that does not set it. A credential (`Authorization`,
    /// `Cookie`, `Proxy-Authorization`) is not added to a redirect's request to another
    /// origin, as the request's own credentials are not carried there.
    pub fn default_header(mut self, name: &str, value: &str) -> Self {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(name), Ok(value)) => {
                self.config.default_headers.insert(name, value);
                self
            }
            _ => self.check(false, || {
                format!("invalid default header {name:?}: {value:?}")
            }),
        }
    }

    /// Where download tasks write their temp files. It must exist when a download starts.
    pub fn download_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.download_dir = dir.into();
        self
    }

    /// How many bytes of a response hyper may read ahead of the reader (at least 8192; 16 KiB
    /// by default): it bounds what a suspended or slow task keeps in memory. It is hyper's
    /// `max_buf_size`, and the size of a stream's scratch buffer for socket reads, so it counts
    /// in a stream's window (see [`stream_window`](Self::stream_window)).
    pub fn read_buffer(mut self, bytes: usize) -> Self {
        self.config.read_buffer = bytes;
        self.check(bytes >= MIN_READ_BUFFER, || {
            format!("read_buffer must be at least {MIN_READ_BUFFER} bytes")
        })
    }

    /// R6: the most unread bytes a stream task may hold, 64 KiB by default. The window covers
    /// the transport's buffer too: the engine queues at most `stream_window - read_buffer`
    /// bytes for the reader, and the socket is not read while that queue is full
    /// (backpressure, not prefetch). It must be more than [`read_buffer`](Self::read_buffer).
    pub fn stream_window(mut self, bytes: usize) -> Self {
        self.config.stream_window = bytes;
        self
    }

    /// R6: the most body bytes a delegated data or upload task holds that its delegate has not
    /// finished with, 64 KiB by default, as much as a stream's window and for the same reason:
    /// a few read buffers' worth keeps a delegate that keeps up busy, and one that does not
    /// costs no more than a stream nobody reads. The window covers the transport's buffer too:
    /// the engine queues at most `delegate_window - read_buffer` bytes of `did_receive_data`
    /// (the call in progress included), and while that queue is full the task reads the socket
    /// no further (backpressure, not prefetch), and its request timeout, which is the network's
    /// idle time, is disarmed until the delegate catches up; its resource timeout runs on.
    /// Downloads write to their file, and the async conveniences collect their body
    /// themselves: neither has this window. It must be more than
    /// [`read_buffer`](Self::read_buffer).
    pub fn delegate_window(mut self, bytes: usize) -> Self {
        self.config.delegate_window = bytes;
        self
    }

    /// The most bytes a stream or websocket queues of what its user writes before writes wait
    /// (64 KiB by default; a websocket message larger than this is queued alone). It is also
    /// tungstenite's `write_buffer_size`, and bounds its `max_write_buffer_size` (this plus one
    /// message), so that nothing buffers writes without bound. More than zero.
    pub fn write_buffer(mut self, bytes: usize) -> Self {
        self.config.write_buffer = bytes;
        self.check(bytes > 0, || "write_buffer must be more than zero".into())
    }

    /// R11: how long a websocket's close handshake may take, 5 s by default. Our close waits
    /// this long for the peer's close frame; the peer's close waits this long for our answer
    /// to be written; then the connection is closed regardless. More than zero.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.config.close_timeout = timeout;
        self.check(!timeout.is_zero(), || {
            "close_timeout must be more than zero".into()
        })
    }

    /// The largest websocket message, received or sent, 16 MiB by default; also the largest
    /// frame received. A larger message from the peer fails the websocket
    /// ([`Error::WebSocketProtocol`]); a larger one to send is refused. More than zero.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_size = bytes;
        self.check(bytes > 0, || {
            "max_message_size must be more than zero".into()
        })
    }

    /// The largest response body the conveniences that collect one in memory
    /// ([`Session::data`](crate::Session::data), [`Session::upload`](crate::Session::upload))
    /// accept, 16 MiB by default, as a websocket message: one body held whole is bounded as one
    /// message is. A larger body fails the task with [`Error::BodyTooLarge`] (at the head when
    /// its `Content-Length` says so, else once that many bytes arrived) and its connection is
    /// closed. Larger bodies belong to [`Session::download`](crate::Session::download), a data
    /// task's delegate, or a stream. More than zero.
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.config.max_body_size = bytes;
        self.check(bytes > 0, || "max_body_size must be more than zero".into())
    }

    /// The most redirects one task follows, 10 by default (reqwest's; browsers allow 20,
    /// URLSession 16): real chains are a few hops long (http to https, a trailing slash, a
    /// login), so 10 leaves room while a misconfigured server's endless chain fails fast, with
    /// [`Error::TooManyRedirects`]. 0 follows none: a redirect is delivered as the response.
    pub fn max_redirects(mut self, hops: u32) -> Self {
        self.config.max_redirects = hops;
        self
    }

    /// The most TLS sessions (TLS 1.3 tickets and TLS 1.2 sessions, all servers together) the
    /// session keeps for resumption, 64 by default; the oldest goes first. Each is a few
    /// hundred bytes to a few KiB, so the default bounds the cache at some 100 KiB in the worst
    /// case while covering the few servers a session usually talks to (a server hands out a
    /// couple of tickets per connection, and each resumption takes one). 0 keeps none: every
    /// https connection makes a full handshake. The cache is the session's own, never shared
    /// with another session, and is dropped when the session is invalidated; the ledger counts
    /// it ([`Ledger::tls_sessions`](crate::Ledger::tls_sessions)).
    pub fn tls_session_cache(mut self, sessions: usize) -> Self {
        self.config.tls_session_cache = sessions;
        self
    }

    /// The session's response cache (URLCache's role), or `None` for no cache. By default
    /// `UrlCache::memory(512 * 1024)`: URLSession's default sessions cache in memory too, and
    /// 512 KiB (URLCache's memory default) with responses of at most 25.6 KiB stored bounds
    /// what a session keeps while serving small, fresh, repeated requests without a
    /// connection. Only GET data and download tasks use it; only complete `200` responses that
    /// `http-cache-semantics` calls storable for a private cache, and that are fresh or carry
    /// a validator, are stored; the least recently used go first so that the cache never
    /// holds more than its capacity. The cache is the session's own, counted in the ledger
    /// ([`Ledger::cached_bytes`](crate::Ledger::cached_bytes)), emptied by
    /// [`Session::reset`](crate::Session::reset), and dropped when the session is invalidated.
    pub fn url_cache(mut self, cache: Option<UrlCache>) -> Self {
        self.config.url_cache = cache;
        self
    }

    /// Trust this root certificate (DER) for https and wss, besides the webpki-roots ones
    /// (see [`webpki_roots`](Self::webpki_roots)): a private CA, a test CA. A certificate that
    /// is not one is reported by [`build`](Self::build).
    pub fn add_root_certificate(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.config
            .root_certificates
            .push(CertificateDer::from(der.into()));
        self
    }

    /// Whether https trusts the roots of the webpki-roots crate (Mozilla's, compiled in), and
    /// those [`EXTRA_CA_CERTS_ENV`](crate::EXTRA_CA_CERTS_ENV) names, true by default. False
    /// trusts only the roots added with [`add_root_certificate`](Self::add_root_certificate).
    pub fn webpki_roots(mut self, trust: bool) -> Self {
        self.config.webpki_roots = trust;
        self
    }

    /// How the session opens its connections: [`Tcp`](crate::Tcp) by default. Every
    /// connection goes through it (pooled HTTP exchanges, stream tasks, websockets); the
    /// session layers TLS (for `https://` and `wss://`) and HTTP over the stream it yields,
    /// owns that stream, and drops it to close it (see [`Transport`]). A simulated network
    /// plugs in here.
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.config.transport = Connector::new(transport);
        self
    }

    /// The configuration, or [`Error::InvalidConfiguration`] naming the first invalid value.
    pub fn build(self) -> Result<Configuration, Error> {
        let (window, read_buffer) = (self.config.stream_window, self.config.read_buffer);
        let delegate_window = self.config.delegate_window;
        let this = self
            .check(window > read_buffer, || {
                format!(
                    "stream_window ({window} bytes) must be more than read_buffer \
                     ({read_buffer} bytes): the window covers the transport's buffer and the \
                     read-ahead queue (R6)"
                )
            })
            .check(delegate_window > read_buffer, || {
                format!(
                    "delegate_window ({delegate_window} bytes) must be more than read_buffer \
                     ({read_buffer} bytes): the window covers the transport's buffer and the \
                     delegate's queue (R6)"
                )
            });
        let roots = crate::tls::roots(&this.config);
        let this = match roots {
            Ok(_) => this,
            Err(why) => this.check(false, || why),
        };
        match this.error {
            Some(error) => Err(Error::InvalidConfiguration(error)),
            None => Ok(this.config),
        }
    }
}
