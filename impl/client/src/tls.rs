//! TLS for https and wss: rustls on ring, one client configuration and one bounded resumption
//! store per session, dropped when the session is invalidated.
//!
//! The TLS stream lives inside the session's closable socket (see `pool::Socket`), so closing
//! a socket from outside its reader (the driver carrying out an abort, invalidation) drops
//! the TLS connection with it there and then: its buffers, and its hold on the session's
//! configuration and store.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::Tls13ClientSessionValue;
use rustls::client::{ClientSessionStore, Resumption, Tls12ClientSessionValue};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, NamedGroup, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::Configuration;
use crate::{Error, TlsFailure};

/// What https speaks over TLS (ALPN): HTTP/1.1 only, the websocket upgrade included.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The crypto provider: ring, made once for the process.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The environment variable that names a PEM file of root certificates to trust besides
/// webpki-roots', in every configuration that trusts those (the default's, and so the shared
/// session's): a private CA, as with Node's `NODE_EXTRA_CA_CERTS`. Read once, when the first
/// configuration that needs it is built or used; `webpki_roots(false)` ignores it.
pub const EXTRA_CA_CERTS_ENV: &str = "LEAKPROOF_EXTRA_CA_CERTS";

/// The roots [`EXTRA_CA_CERTS_ENV`] names, read once for the process (none if it is unset or
/// empty); why they cannot be used, naming the variable and the file.
fn extra_roots() -> Result<&'static [CertificateDer<'static>], String> {
    static EXTRA: OnceLock<Result<Vec<CertificateDer<'static>>, String>> = OnceLock::new();
    EXTRA
        .get_or_init(|| match std::env::var_os(EXTRA_CA_CERTS_ENV) {
            Some(path) if !path.is_empty() => pem_roots(Path::new(&path)),
            _ => Ok(Vec::new()),
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// The certificates of the PEM file at `path`: at least one, every one readable.
pub(crate) fn pem_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let what = || format!("{EXTRA_CA_CERTS_ENV}={}", path.display());
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", what()))?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", what()))?;
    if roots.is_empty() {
        return Err(format!(
            "{}: no certificate in it (PEM, -----BEGIN CERTIFICATE-----)",
            what()
        ));
    }
    Ok(roots)
}

/// The roots `config` trusts: webpki-roots' and [`EXTRA_CA_CERTS_ENV`]'s unless turned off,
/// and the ones it adds. Why not, for the configuration's error.
pub(crate) fn roots(config: &Configuration) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if config.webpki_roots {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for (i, der) in extra_roots()?.iter().enumerate() {
            roots.add(der.clone()).map_err(|e| {
                format!("{EXTRA_CA_CERTS_ENV}: certificate {i} is not a usable root: {e}")
            })?;
        }
    }
    for (i, der) in config.root_certificates.iter().enumerate() {
        roots.add(der.clone()).map_err(|e| {
            format!("root certificate {i} (add_root_certificate) is not a usable certificate: {e}")
        })?;
    }
    if roots.is_empty() {
        return Err(
            "no root certificates: with webpki_roots(false), add at least one with \
                    add_root_certificate, or https could trust no server"
                .into(),
        );
    }
    Ok(roots)
}

/// A session's TLS state: its client configuration (which holds its store).
#[derive(Debug, Clone)]
pub(crate) struct TlsState {
    config: Arc<ClientConfig>,
    store: Arc<Store>,
}

impl TlsState {
    pub fn new(config: &Configuration) -> Result<TlsState, Error> {
        let roots = roots(config).map_err(Error::InvalidConfiguration)?;
        let store = Arc::new(Store::new(config.tls_session_cache));
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidConfiguration(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        client.resumption = Resumption::store(store.clone());
        Ok(TlsState {
            config: Arc::new(client),
            store,
        })
    }

    /// Forget every TLS session kept (a connection still open on the old configuration may
    /// add more until it closes; nothing new connects with it).
    pub fn clear(&self) {
        let old = std::mem::take(&mut *self.store.lock());
        drop(old);
    }

    /// TLS sessions cached for resumption now.
    pub fn cached(&self) -> u32 {
        u32::try_from(self.store.len()).unwrap_or(u32::MAX)
    }

    /// The session's client configuration, as its connections hold it.
    #[cfg(feature = "test-util")]
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// Make `stream` (the transport's) a TLS connection to `host`; a handshake that fails is
    /// [`Error::Tls`].
    pub async fn connect<S>(&self, stream: S, host: &str) -> Result<TlsStream<S>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| Error::InvalidUrl {
            url: host.to_owned(),
            reason: "not a DNS name or an IP address a TLS certificate can be checked for".into(),
        })?;
        TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| handshake_error(host, e))
    }
}

/// What a failed handshake tells the user.
fn handshake_error(host: &str, error: io::Error) -> Error {
    let tls = |kind, detail: String| Error::Tls {
        host: host.to_owned(),
        kind,
        detail,
    };
    if let Some(failure) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        let kind = match failure {
            rustls::Error::InvalidCertificate(certificate) => match certificate {
                CertificateError::UnknownIssuer => TlsFailure::UnknownIssuer,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => TlsFailure::NameMismatch,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    TlsFailure::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    TlsFailure::NotYetValid
                }
                _ => TlsFailure::BadCertificate,
            },
            _ => TlsFailure::Protocol,
        };
        return tls(kind, failure.to_string());
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => tls(
            TlsFailure::Protocol,
            format!("the server closed the connection during the handshake ({error})"),
        ),
        _ => Error::Io(Arc::new(error)),
    }
}

/// A session's TLS sessions kept for resumption: at most `limit` of them (TLS 1.3 tickets and
/// TLS 1.2 sessions, all servers together), the oldest evicted first, so that it stays
/// bounded however many servers or connections the session sees. Each server's key-exchange
/// hint is kept too, for as many servers.
pub(crate) struct Store {
    limit: usize,
    inner: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Stamps each session with its age, for eviction.
    next: u64,
    len: usize,
    servers: HashMap<ServerName<'static>, Sessions>,
    hints: HashMap<ServerName<'static>, NamedGroup>,
}

#[derive(Default)]
struct Sessions {
    tls12: Option<(u64, Tls12ClientSessionValue)>,
    tls13: VecDeque<(u64, Tls13ClientSessionValue)>,
}

impl Sessions {
    fn oldest(&self) -> Option<u64> {
        let tls12 = self.tls12.as_ref().map(|(age, _)| *age);
        let tls13 = self.tls13.front().map(|(age, _)| *age);
        tls12.into_iter().chain(tls13).min()
    }

    fn is_empty(&self) -> bool {
        self.tls12.is_none() && self.tls13.is_empty()
    }
}

impl Store {
    fn new(limit: usize) -> Store {
        Store {
            limit,
            inner: Mutex::new(Cache::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Add a session for `server` (by `add`, which says whether it replaced one), then evict
    /// the oldest until the cache is within its limit.
    fn insert(&self, server: ServerName<'static>, add: impl FnOnce(&mut Sessions, u64) -> bool) {
        if self.limit == 0 {
            return;
        }
        let mut cache = self.lock();
        let age = cache.next;
        cache.next += 1;
        let replaced = add(cache.servers.entry(server).or_default(), age);
        if !replaced {
            cache.len += 1;
        }
        while cache.len > self.limit {
            let oldest = cache
                .servers
                .iter()
                .filter_map(|(name, sessions)| Some((sessions.oldest()?, name)))
                .min_by_key(|(age, _)| *age)
                .map(|(_, name)| name.clone());
            let Some(name) = oldest else { break };
            cache.remove_oldest(&name);
        }
    }
}

impl Cache {
    fn remove_oldest(&mut self, name: &ServerName<'static>) {
        let Some(sessions) = self.servers.get_mut(name) else {
            return;
        };
        let tls12 = sessions.tls12.as_ref().map(|(age, _)| *age);
        let tls13 = sessions.tls13.front().map(|(age, _)| *age);
        match (tls12, tls13) {
            (Some(a), Some(b)) if b < a => drop(sessions.tls13.pop_front()),
            (Some(_), _) => sessions.tls12 = None,
            (None, Some(_)) => drop(sessions.tls13.pop_front()),
            (None, None) => {}
        }
        self.len -= 1;
        self.forget_if_empty(name);
    }

    fn forget_if_empty(&mut self, name: &ServerName<'static>) {
        if self.servers.get(name).is_some_and(Sessions::is_empty) {
            self.servers.remove(name);
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("limit", &self.limit)
            .field("len", &self.len())
            .finish()
    }
}

impl ClientSessionStore for Store {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        if self.limit == 0 {
            return;
        }
        let mut cache = self.lock();
        if cache.hints.len() >= self.limit && !cache.hints.contains_key(&server_name) {
            // Full: one hint goes (a hint only saves a round trip).
            let any = cache.hints.keys().next().cloned();
            if let Some(any) = any {
                cache.hints.remove(&any);
            }
        }
        cache.hints.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().hints.get(&server_name.to_owned()).copied()
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.insert(server_name, |sessions, age| {
            sessions.tls12.replace((age, value)).is_some()
        });
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        let cache = self.lock();
        let sessions = cache.servers.get(&server_name.to_owned())?;
        sessions.tls12.as_ref().map(|(_, value)| value.clone())
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        let mut cache = self.lock();
        let removed = cache
            .servers
            .get_mut(server_name)
            .and_then(|sessions| sessions.tls12.take());
        if removed.is_some() {
            cache.len -= 1;
            cache.forget_if_empty(server_name);
        }
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.insert(server_name, |sessions, age| {
            sessions.tls13.push_back((age, value));
            false
        });
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        let mut cache = self.lock();
        // The newest first, as rustls's own cache does: it is the likeliest still valid.
        let taken = cache
            .servers
            .get_mut(server_name)
            .and_then(|sessions| sessions.tls13.pop_back());
        taken.map(|(_, value)| {
            cache.len -= 1;
            cache.forget_if_empty(server_name);
            value
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of this test's own in the temp dir, removed when dropped.
    struct File(std::path::PathBuf);

    impl File {
        fn new(name: &str, contents: &[u8]) -> File {
            let path =
                std::env::temp_dir().join(format!("leakproof-{}-{name}.pem", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            File(path)
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_roots_file_that_cannot_be_used_is_an_error_naming_the_variable_and_the_file() {
        let missing = std::env::temp_dir().join("leakproof-no-such-roots.pem");
        let error = pem_roots(&missing).unwrap_err();
        let prefix = format!("{EXTRA_CA_CERTS_ENV}={}: cannot read it", missing.display());
        assert!(error.starts_with(&prefix), "{error}");
        let empty = File::new("empty", b"no certificate here\n");
        let error = pem_roots(&empty.0).unwrap_err();
        assert!(error.contains("no certificate in it"), "{error}");
        let garbled = File::new(
            "garbled",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let error = pem_roots(&garbled.0).unwrap_err();
        assert!(error.contains("not PEM certificates"), "{error}");
    }
}
