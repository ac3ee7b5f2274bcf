//! A session's response cache (URLCache's role): complete `200` responses to GET requests,
//! kept as `http-cache-semantics` allows, bounded by bytes, least recently used first out.
//!
//! The cache is the session's own and goes with it (R4: nothing cached at `Invalidated`):
//! [`Cache::release`] drops the store and, for a directory the session made, the directory.
//! Whether a response may be stored, whether a stored one answers a request as it is, and
//! how to ask the server whether a stale one is still good, are the crate's decisions; this
//! keeps the bytes and their bounds.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};

use crate::config::{CacheDisk, UrlCache};
use crate::session::lock;

/// The response cache of one session.
pub(crate) struct Cache {
    config: UrlCache,
    /// The bodies' directory, if they go to disk.
    disk: Option<Disk>,
    /// `None` once released (the session is invalidated): nothing is stored after that.
    store: Mutex<Option<Arc<Store>>>,
    /// Names body files: `<session>-<n>.body`, never reused, not even across a reset, and
    /// never another session's (a directory of the caller's may serve several).
    session: String,
    files: AtomicU64,
    clock: Clock,
}

/// The cache's idea of now: the wall clock when the cache was made, moved on by tokio's
/// clock since, the one the session's timers run on. So entries age as the session's time
/// passes, also where that time is paused or simulated (tokio's test clock, a turmoil host),
/// and a step of the wall clock (an NTP correction) does not age or rejuvenate them at once.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: SystemTime,
    since: tokio::time::Instant,
}

impl Clock {
    /// Must be made within the session's runtime: tokio's clock is the runtime's.
    fn new() -> Clock {
        Clock {
            wall: SystemTime::now(),
            since: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> SystemTime {
        self.wall + self.since.elapsed()
    }
}

#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    /// Made by the session, removed with it.
    ephemeral: bool,
    capacity: u64,
}

/// The entries, behind their own lock so that the suite can watch the store die (`Weak`).
#[derive(Default)]
pub(crate) struct Store {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, Entry>,
    /// Least recently used first: use tick -> key.
    order: BTreeMap<u64, String>,
    tick: u64,
    /// Bytes held in memory (bodies kept in memory, heads, keys).
    memory: u64,
    /// Body bytes in files.
    disk: u64,
}

struct Entry {
    policy: CachePolicy,
    body: Body,
    /// What it counts for in memory.
    cost: u64,
    used: u64,
}

#[derive(Clone)]
enum Body {
    Memory(Bytes),
    File { path: PathBuf, len: u64 },
}

/// A stored response found for a request.
#[derive(Debug)]
pub(crate) struct Hit {
    pub head: http::response::Parts,
    pub body: Bytes,
}

/// What the cache says about a request.
pub(crate) enum Lookup {
    /// Nothing usable: send the request as it is.
    Miss,
    /// Fresh: answer with this, without the network.
    Fresh(Hit),
    /// Stored but stale: send this request instead (it asks the server whether the stored
    /// response is still good); a `304` is answered with [`Cache::revalidated`].
    Stale {
        request: http::request::Parts,
        policy: Box<CachePolicy>,
        body: Bytes,
    },
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.config)
            .field("disk", &self.disk)
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// A private cache: the session's user is its one user (URLCache is one too).
fn options() -> CacheOptions {
    CacheOptions {
        shared: false,
        ..CacheOptions::default()
    }
}

/// The key of a request: its method and absolute URL (`origin` is `scheme://host:port`).
pub(crate) fn key(method: &Method, origin: &str, target: &http::Uri) -> String {
    let target = target.path_and_query().map_or("/", |p| p.as_str());
    let method = method.as_str();
    let mut key = String::with_capacity(method.len() + 1 + origin.len() + target.len());
    key.push_str(method);
    key.push(' ');
    key.push_str(origin);
    key.push_str(target);
    key
}

/// Whether a request may use the cache at all: a GET with no range (the crate does not
/// merge partial responses, and a whole stored body does not answer a range).
pub(crate) fn applies(request: &http::request::Parts) -> bool {
    request.method == Method::GET && !request.headers.contains_key(http::header::RANGE)
}

impl Cache {
    /// The cache of the session named `session`; made within the session's runtime (its
    /// clock is the cache's).
    pub fn new(config: UrlCache, session: &str) -> Cache {
        let disk = config.disk.as_ref().map(|disk| match disk {
            CacheDisk::Ephemeral { capacity } => Disk {
                dir: std::env::temp_dir().join(format!("{session}-cache")),
                ephemeral: true,
                capacity: *capacity as u64,
            },
            CacheDisk::Dir { path, capacity } => Disk {
                dir: path.clone(),
                ephemeral: false,
                capacity: *capacity as u64,
            },
        });
        Cache {
            config,
            disk,
            store: Mutex::new(Some(Arc::default())),
            session: session.to_owned(),
            files: AtomicU64::new(0),
            clock: Clock::new(),
        }
    }

    fn store(&self) -> Option<Arc<Store>> {
        lock(&self.store).clone()
    }

    /// Bytes held: in memory and on disk (the ledger's `cached_bytes`).
    pub fn bytes(&self) -> u64 {
        self.store().map_or(0, |store| {
            let entries = lock(&store.entries);
            entries.memory + entries.disk
        })
    }

    /// Responses held (the ledger's `cached_responses`).
    pub fn responses(&self) -> u32 {
        self.store()
            .map_or(0, |store| lock(&store.entries).map.len() as u32)
    }

    /// For the suite: the store, not kept alive.
    #[cfg(feature = "test-util")]
    pub fn weak_store(&self) -> Option<std::sync::Weak<Store>> {
        self.store().map(|store| Arc::downgrade(&store))
    }

    /// What the cache has for `request` (whose `uri` is in the form sent, `key` names it).
    pub async fn lookup(&self, key: &str, request: &http::request::Parts) -> Lookup {
        let Some(store) = self.store() else {
            return Lookup::Miss;
        };
        let now = self.clock.now();
        let (answer, body) = {
            let mut entries = lock(&store.entries);
            let Some(entry) = entries.map.get(key) else {
                return Lookup::Miss;
            };
            let answer = match entry.policy.before_request(request, now) {
                // Another variant (Vary), say: not this entry's to answer, nor to revalidate.
                BeforeRequest::Stale { matches: false, .. } => return Lookup::Miss,
                answer => answer.map_policy(entry.policy.clone()),
            };
            let body = entry.body.clone();
            entries.touch(key);
            (answer, body)
        };
        let body = match body {
            Body::Memory(bytes) => bytes,
            // Read whole and closed: the session holds no open file.
            Body::File { path, .. } => match tokio::fs::read(&path).await {
                Ok(bytes) => Bytes::from(bytes),
                Err(_) => {
                    // Gone from under us: forget it.
                    self.remove(key);
                    return Lookup::Miss;
                }
            },
        };
        match answer {
            Answered::Fresh(head) => Lookup::Fresh(Hit { head, body }),
            Answered::Revalidate { request, policy } => Lookup::Stale {
                request,
                policy,
                body,
            },
        }
    }

    /// The server answered a revalidation (`request`, sent for a stale entry): on a `304`
    /// that matches, the stored body answers it, with the headers brought up to date, and
    /// the entry is refreshed. `None`: the response stands on its own.
    pub fn revalidated(
        &self,
        key: &str,
        policy: &CachePolicy,
        request: &http::request::Parts,
        response: &http::response::Parts,
        body: Bytes,
    ) -> Option<Hit> {
        if response.status != StatusCode::NOT_MODIFIED {
            return None;
        }
        match policy.after_response(request, response, self.clock.now()) {
            AfterResponse::NotModified(policy, head) => {
                if let Some(store) = self.store() {
                    let mut entries = lock(&store.entries);
                    if let Some(entry) = entries.map.get_mut(key) {
                        entry.policy = policy;
                    }
                }
                Some(Hit { head, body })
            }
            AfterResponse::Modified(..) => None,
        }
    }

    /// Whether the response to `request` may be stored, and so is worth keeping a copy of
    /// its body while it is read: a `200` the crate calls storable, fresh or with a
    /// validator to revalidate it by, and not announced larger than an entry may be.
    pub fn admits(
        &self,
        request: &http::request::Parts,
        response: &http::response::Parts,
    ) -> Option<CachePolicy> {
        // Freshness comes from Cache-Control or Expires, or by heuristic from Last-Modified;
        // a validator is an ETag or a Last-Modified (RFC 9111, 4.2 and 4.3). A response with
        // none of them can be neither fresh nor revalidated: no policy to work out.
        let headers = &response.headers;
        if response.status != StatusCode::OK
            || !headers.contains_key(http::header::CACHE_CONTROL)
                && !headers.contains_key(http::header::EXPIRES)
                && !headers.contains_key(http::header::ETAG)
                && !headers.contains_key(http::header::LAST_MODIFIED)
        {
            return None;
        }
        if self.store().is_none() || !applies(request) {
            return None;
        }
        let now = self.clock.now();
        let policy = CachePolicy::new_options(request, response, now, options());
        let validated = response.headers.contains_key(http::header::ETAG)
            || response.headers.contains_key(http::header::LAST_MODIFIED);
        let fresh = !policy.time_to_live(now).is_zero();
        let announced = content_length(&response.headers).unwrap_or(0);
        let fits = announced.saturating_add(overhead(request, response)) <= self.max_entry();
        (policy.is_storable() && (fresh || validated) && fits).then_some(policy)
    }

    /// The most body bytes worth copying for an entry.
    pub fn max_entry(&self) -> u64 {
        self.config.max_entry as u64
    }

    /// Keep a response read whole. Its bytes are evicted first if need be, least recently
    /// used first; a response larger than an entry may be is not kept.
    pub fn insert(
        &self,
        key: String,
        policy: CachePolicy,
        request: &http::request::Parts,
        response: &http::response::Parts,
        body: Bytes,
    ) {
        let Some(store) = self.store() else {
            return;
        };
        let overhead = overhead(request, response) + key.len() as u64;
        if body.len() as u64 + overhead > self.max_entry() {
            self.remove(&key);
            return;
        }
        let (body, cost) = match &self.disk {
            None => {
                let cost = body.len() as u64 + overhead;
                if cost > self.config.memory_capacity as u64 {
                    return;
                }
                (Body::Memory(body), cost)
            }
            Some(disk) => {
                if body.len() as u64 > disk.capacity
                    || overhead > self.config.memory_capacity as u64
                {
                    return;
                }
                let n = self.files.fetch_add(1, Ordering::Relaxed);
                let path = disk.dir.join(format!("{}-{n}.body", self.session));
                let written =
                    std::fs::create_dir_all(&disk.dir).and_then(|()| std::fs::write(&path, &body));
                if written.is_err() {
                    let _ = std::fs::remove_file(&path);
                    return;
                }
                let len = body.len() as u64;
                (Body::File { path, len }, overhead)
            }
        };
        let mut entries = lock(&store.entries);
        entries.remove(&key);
        let disk_capacity = self.disk.as_ref().map_or(0, |disk| disk.capacity);
        while entries.memory + cost > self.config.memory_capacity as u64
            || entries.disk + body.disk_len() > disk_capacity
        {
            let Some((_, oldest)) = entries.order.pop_first() else {
                break;
            };
            entries.remove(&oldest);
        }
        entries.tick += 1;
        let used = entries.tick;
        entries.order.insert(used, key.clone());
        entries.memory += cost;
        entries.disk += body.disk_len();
        entries.map.insert(
            key,
            Entry {
                policy,
                body,
                cost,
                used,
            },
        );
    }

    /// Forget `key`'s entry (a response that replaces it was not stored, or its file went).
    pub fn remove(&self, key: &str) {
        if let Some(store) = self.store() {
            lock(&store.entries).remove(key);
        }
    }

    /// Empty the cache (`Session::reset`): the session goes on with an empty one.
    pub fn clear(&self) {
        let old = {
            let mut store = lock(&self.store);
            match store.as_mut() {
                Some(store) => std::mem::take(store),
                None => return,
            }
        };
        old.clear();
    }

    /// The session is released: the store goes, and with it every entry; a directory the
    /// session made is removed, one of the caller's keeps its files.
    pub fn release(&self) {
        let old = lock(&self.store).take();
        if let Some(old) = old {
            if self.disk.as_ref().is_some_and(|disk| disk.ephemeral) {
                old.clear();
            }
            drop(old);
        }
        if let Some(disk) = &self.disk
            && disk.ephemeral
        {
            let _ = std::fs::remove_dir_all(&disk.dir);
        }
    }

    /// The bodies' directory, if the cache keeps them on disk.
    pub fn dir(&self) -> Option<&Path> {
        self.disk.as_ref().map(|disk| disk.dir.as_path())
    }
}

impl Store {
    /// Forget every entry, and remove their files.
    fn clear(&self) {
        let entries = std::mem::take(&mut *lock(&self.entries));
        for entry in entries.map.into_values() {
            entry.body.remove_file();
        }
    }
}

impl Entries {
    fn touch(&mut self, key: &str) {
        let Some(entry) = self.map.get_mut(key) else {
            return;
        };
        self.tick += 1;
        let old = std::mem::replace(&mut entry.used, self.tick);
        if let Some(key) = self.order.remove(&old) {
            self.order.insert(self.tick, key);
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.map.remove(key) {
            self.order.remove(&entry.used);
            self.memory -= entry.cost;
            self.disk -= entry.body.disk_len();
            entry.body.remove_file();
        }
    }
}

impl Body {
    fn disk_len(&self) -> u64 {
        match self {
            Body::Memory(_) => 0,
            Body::File { len, .. } => *len,
        }
    }

    fn remove_file(&self) {
        if let Body::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the crate answered, before the body is read.
enum Answered {
    Fresh(http::response::Parts),
    Revalidate {
        request: http::request::Parts,
        policy: Box<CachePolicy>,
    },
}

trait MapPolicy {
    fn map_policy(self, policy: CachePolicy) -> Answered;
}

impl MapPolicy for BeforeRequest {
    fn map_policy(self, policy: CachePolicy) -> Answered {
        match self {
            BeforeRequest::Fresh(head) => Answered::Fresh(head),
            BeforeRequest::Stale { request, .. } => Answered::Revalidate {
                request,
                policy: Box::new(policy),
            },
        }
    }
}

/// What an entry's heads count for, besides its body: the request's and the response's
/// headers, which the policy keeps.
fn overhead(request: &http::request::Parts, response: &http::response::Parts) -> u64 {
    header_bytes(&request.headers) + header_bytes(&response.headers) + 64
}

fn header_bytes(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len() + 4) as u64)
        .sum()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
