//! Redirects: which responses are followed, the request that follows one (RFC 9110, 15.4),
//! and the chain's limit and loops.
//!
//! A task's exchange follows redirects itself, one hop after another, on the IO it started
//! with: the engine hears each redirect (`Core::redirect`, the delegate's
//! `will_perform_redirection`) and each hop (`Core::hop`, which pools or closes the connection
//! left), so that its per-origin accounting, its ledger and its timers stay true across hops.

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderName};
use http::{Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full, StreamBody};

use crate::Error;
use crate::config::Configuration;
use crate::pool::{Body, Origin};
use crate::session::UploadBody;

/// The most of a followed redirect's body read so that its connection can be pooled; a
/// longer one closes it instead. Redirect bodies are a line of HTML, if anything.
pub(crate) const DRAIN_LIMIT: usize = 64 * 1024;

/// Headers about the body, dropped with it when a redirect changes the method (RFC 9110,
/// 15.4, the note on 301 and 302).
const CONTENT: [HeaderName; 5] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LOCATION,
];

/// Credentials for the origin that asked for them, dropped on a hop to another origin.
pub(crate) const CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// An upload's body, kept so that a 307 or 308 can send it again: the bytes, or the file
/// (opened anew for each hop). Rides in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Replay(pub UploadBody);

/// A request body for `body`, streamed from the file if it is one.
pub(crate) fn upload_body(body: &UploadBody) -> Body {
    match body {
        UploadBody::Bytes(bytes) => Full::new(bytes.clone())
            .map_err(|never| match never {})
            .boxed(),
        UploadBody::File(path) => {
            let chunks = futures_util::stream::once(tokio::fs::File::open(path.clone()))
                .map_ok(tokio_util::io::ReaderStream::new)
                .try_flatten()
                .map_ok(hyper::body::Frame::data);
            StreamBody::new(chunks).boxed()
        }
    }
}

fn empty() -> Body {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// One task's chain of redirects.
#[derive(Debug)]
pub(crate) struct Chain {
    limit: u32,
    followed: u32,
    /// The request last sent, its URL absolute, without its body; `None` until the first
    /// redirect, which makes it of the task's request (most responses are not redirects, and
    /// their requests need not pay for a copy).
    current: Option<http::Request<()>>,
    /// Every request sent, by method and URL: one asked for again is a loop.
    visited: Vec<(Method, String)>,
    /// The upload's body, if it has one.
    replay: Option<UploadBody>,
    /// Whether the request proposed for the last redirect keeps the body.
    keeps_body: bool,
}

impl Chain {
    /// The chain of a task's request; `replay` is its upload's body, if it has one.
    pub fn new(replay: Option<&Replay>, limit: u32) -> Chain {
        Chain {
            limit,
            followed: 0,
            current: None,
            visited: Vec::new(),
            replay: replay.map(|r| r.0.clone()),
            keeps_body: false,
        }
    }

    /// The request last sent: at the first redirect, `first` (the task's request, in origin
    /// form, as sent to `origin`) made absolute, and counted visited.
    fn current(&mut self, first: &http::request::Parts, origin: &Origin) -> &http::Request<()> {
        self.current.get_or_insert_with(|| {
            let path = first.uri.path_and_query().map_or("/", |p| p.as_str());
            let uri = absolute(origin, path);
            self.visited.push((first.method.clone(), uri.to_string()));
            let mut current = http::Request::new(());
            *current.method_mut() = first.method.clone();
            *current.uri_mut() = uri;
            *current.headers_mut() = first.headers.clone();
            current
        })
    }

    /// The request that follows `response` if it is a redirect to follow: `Ok(None)` for any
    /// other response, and for every response when the limit is 0. A redirect that cannot be
    /// followed (no `Location`, a bad one, one hop too many) is an error.
    ///
    /// `first` is the task's request as sent to `origin`, the chain's first hop: what a first
    /// redirect is made from.
    pub fn next(
        &mut self,
        response: &http::response::Parts,
        first: &http::request::Parts,
        origin: &Origin,
    ) -> Result<Option<http::Request<()>>, Error> {
        let status = response.status;
        let followed = [
            StatusCode::MOVED_PERMANENTLY,
            StatusCode::FOUND,
            StatusCode::SEE_OTHER,
            StatusCode::TEMPORARY_REDIRECT,
            StatusCode::PERMANENT_REDIRECT,
        ];
        if self.limit == 0 || !followed.contains(&status) {
            return Ok(None);
        }
        let invalid = |location: &str, reason: &str| Error::InvalidRedirect {
            location: location.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(location) = response.headers.get(header::LOCATION) else {
            return Err(invalid("", "the response has no Location header"));
        };
        let location = location
            .to_str()
            .map_err(|_| invalid("", "the Location header is not text"))?;
        if self.followed >= self.limit {
            return Err(Error::TooManyRedirects { limit: self.limit });
        }
        let current = self.current(first, origin);
        let uri = resolve(current.uri(), location).map_err(|why| invalid(location, &why))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(invalid(location, "the scheme must be http or https"));
        }
        let method = current.method();
        let (method, keeps_body) = match status {
            StatusCode::SEE_OTHER if method != Method::HEAD => (Method::GET, false),
            StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND if method == Method::POST => {
                (Method::GET, false)
            }
            _ => (method.clone(), true),
        };
        let mut headers = current.headers().clone();
        // The next request's own, from its URL.
        headers.remove(header::HOST);
        if !keeps_body {
            for name in CONTENT {
                headers.remove(name);
            }
        }
        if !same_origin(current.uri(), &uri) {
            for name in CREDENTIALS {
                headers.remove(name);
            }
        }
        self.keeps_body = keeps_body;
        let mut next = http::Request::new(());
        *next.method_mut() = method;
        *next.uri_mut() = uri;
        *next.headers_mut() = headers;
        Ok(Some(next))
    }

    /// Follow with `next` (the request proposed, or the delegate's own): the request to send,
    /// with its body if the hop keeps it, and where to. A request sent before in this chain
    /// is a loop.
    pub fn follow(
        &mut self,
        next: http::Request<()>,
        config: &Configuration,
    ) -> Result<(http::Request<Body>, Origin), Error> {
        // The session's default credentials go to the origin the chain is on, not another.
        let stays =
            (self.current.as_ref()).is_none_or(|current| same_origin(current.uri(), next.uri()));
        let location = next.uri().to_string();
        let key = (next.method().clone(), location.clone());
        if self.visited.contains(&key) {
            return Err(Error::RedirectLoop {
                method: key.0.to_string(),
                url: key.1,
            });
        }
        self.visited.push(key);
        self.followed += 1;
        let body = match &self.replay {
            Some(replay) if self.keeps_body => {
                let length = match replay {
                    UploadBody::Bytes(bytes) => bytes.len() as u64,
                    UploadBody::File(path) => std::fs::metadata(path)?.len(),
                };
                (upload_body(replay), Some(length))
            }
            _ => (empty(), None),
        };
        let (body, length) = body;
        self.current = Some(next.clone());
        let mut request = next.map(|()| body);
        if let Some(length) = length {
            request
                .headers_mut()
                .insert(header::CONTENT_LENGTH, length.into());
        }
        crate::session::prepare_with(request, config, stays).map_err(|error| match error {
            Error::InvalidUrl { reason, .. } => Error::InvalidRedirect { location, reason },
            error => error,
        })
    }
}

/// `scheme://host[:port]path`, the port left out when it is the scheme's default.
fn absolute(origin: &Origin, path: &str) -> Uri {
    let (scheme, default) = match origin.scheme {
        crate::pool::Scheme::Https => ("https", 443),
        crate::pool::Scheme::Http | crate::pool::Scheme::Tcp => ("http", 80),
    };
    let host = if origin.host.contains(':') {
        format!("[{}]", origin.host)
    } else {
        origin.host.clone()
    };
    let authority = if origin.port == default {
        host
    } else {
        format!("{host}:{}", origin.port)
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

/// Whether two absolute URLs have one origin: scheme, host and port.
fn same_origin(a: &Uri, b: &Uri) -> bool {
    let port = |u: &Uri| {
        u.port_u16().unwrap_or(if u.scheme_str() == Some("https") {
            443
        } else {
            80
        })
    };
    a.scheme_str() == b.scheme_str()
        && a.host().map(str::to_ascii_lowercase) == b.host().map(str::to_ascii_lowercase)
        && port(a) == port(b)
}

/// Resolve `reference` (a `Location`) against the absolute URL `base` (RFC 3986, 5.2; a
/// fragment is dropped: a request never carries one).
pub(crate) fn resolve(base: &Uri, reference: &str) -> Result<Uri, String> {
    let reference = reference.split('#').next().unwrap_or_default().trim();
    let not_a_url = || format!("{reference:?} is not a valid URL");
    if reference.is_empty() {
        return Ok(base.clone());
    }
    let has_scheme = reference
        .split_once(':')
        .is_some_and(|(scheme, _)| is_scheme(scheme));
    let scheme = base.scheme_str().unwrap_or("http");
    let resolved = if has_scheme {
        reference.to_owned()
    } else if let Some(rest) = reference.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else {
        let authority = base.authority().map_or("", |a| a.as_str());
        let (path, query) = match reference.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (reference, None),
        };
        // RFC 3986, 5.2.2: no path keeps the base's, and its query unless one is given.
        let query = match query {
            Some(query) => Some(query),
            None if path.is_empty() => base.query(),
            None => None,
        };
        let path = if path.is_empty() {
            base.path().to_owned()
        } else if path.starts_with('/') {
            remove_dot_segments(path)
        } else {
            let base_path = base.path();
            let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
            let dir = if dir.is_empty() { "/" } else { dir };
            remove_dot_segments(&format!("{dir}{path}"))
        };
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{authority}{path}{query}")
    };
    let uri: Uri = resolved.parse().map_err(|_| not_a_url())?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(not_a_url());
    }
    Ok(uri)
}

/// RFC 3986, 3.1: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// RFC 3986, 5.2.4, for an absolute path: `.` and `..` segments applied, none above the root.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            segment => out.push(segment),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Uri {
        "http://a/b/c/d;p?q".parse().unwrap()
    }

    #[test]
    fn references_resolve_as_rfc_3986_says() {
        // RFC 3986, 5.4.1 and 5.4.2 (those without a fragment).
        for (reference, expected) in [
            ("g", "http://a/b/c/g"),
            ("./g", "http://a/b/c/g"),
            ("g/", "http://a/b/c/g/"),
            ("/g", "http://a/g"),
            ("//g", "http://g/"),
            ("?y", "http://a/b/c/d;p?y"),
            ("g?y", "http://a/b/c/g?y"),
            ("", "http://a/b/c/d;p?q"),
            (".", "http://a/b/c/"),
            ("./", "http://a/b/c/"),
            ("..", "http://a/b/"),
            ("../", "http://a/b/"),
            ("../g", "http://a/b/g"),
            ("../..", "http://a/"),
            ("../../g", "http://a/g"),
            ("../../../g", "http://a/g"),
            ("/./g", "http://a/g"),
            ("/../g", "http://a/g"),
            ("g.", "http://a/b/c/g."),
            ("g..", "http://a/b/c/g.."),
            ("./../g", "http://a/b/g"),
            ("g/../h", "http://a/b/c/h"),
            ("https://other:8443/x?y", "https://other:8443/x?y"),
            ("g#frag", "http://a/b/c/g"),
        ] {
            let resolved = resolve(&base(), reference).unwrap();
            assert_eq!(resolved.to_string(), expected, "{reference:?}");
        }
    }

    #[test]
    fn a_reference_that_is_no_url_is_refused() {
        for reference in ["http://[::1/", "http:///path", "http://a b/"] {
            assert!(resolve(&base(), reference).is_err(), "{reference:?}");
        }
    }
}
