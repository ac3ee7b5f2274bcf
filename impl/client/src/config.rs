//! A session's configuration: timeouts, pool limits, default headers, the download directory.

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use crate::Error;

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
}

impl Default for Configuration {
    /// 60 s request timeout, 7 days resource timeout (URLSession's), 6 connections and 6 idle
    /// ones per host, idle connections closed after 90 s, downloads in the system temp dir.
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            resource_timeout: Duration::from_secs(7 * 24 * 3600),
            max_connections_per_host: 6,
            max_idle_per_host: 6,
            idle_timeout: Duration::from_secs(90),
            default_headers: HeaderMap::new(),
            download_dir: std::env::temp_dir(),
            read_buffer: 64 * 1024,
        }
    }
}

impl Configuration {
    /// Nothing outlives a task: no connection is kept alive between tasks. For code that must
    /// leave no state behind at all, at the price of a connection per request.
    pub fn ephemeral() -> Self {
        Self {
            max_idle_per_host: 0,
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

    /// A header added to every request that does not set it.
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

    /// How many bytes of a response hyper may read ahead of the reader (at least 8192): it
    /// bounds what a suspended or slow task keeps in memory.
    pub fn read_buffer(mut self, bytes: usize) -> Self {
        self.config.read_buffer = bytes;
        self.check(bytes >= 8192, || {
            "read_buffer must be at least 8192 bytes".into()
        })
    }

    pub fn build(self) -> Result<Configuration, Error> {
        match self.error {
            Some(error) => Err(Error::InvalidConfiguration(error)),
            None => Ok(self.config),
        }
    }
}
