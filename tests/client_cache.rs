//! The seeds' leak 4, the cache half (the session memory-leak post: a session's URLCache
//! memory outlives the session): a session's response cache is its own, bounded by bytes,
//! counted in the ledger (`cached_bytes`), emptied by `reset()` and dropped once
//! `invalidated()` resolves. A hit opens no connection (the stage's accepted count is the
//! witness) and still gives the delegate its callbacks; a stale entry with a validator is
//! revalidated (the stage's `304` count). Every wait is bounded.

#[path = "support/tls_ca.rs"]
mod tls_ca;

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use leakproof::{
    CacheDisk, Configuration, Delegate, Disposition, Error, Session, TaskInfo, UrlCache,
};
use leakproof_check::scenario::{PATIENCE, bounded, eventually};
use leakproof_check::stage::{Stage, body};

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

/// No connection kept alive: every request the cache does not answer opens one, so the
/// stage's accepted count tells a hit from a miss.
fn no_pool() -> leakproof::ConfigurationBuilder {
    Configuration::builder().max_idle_per_host(0)
}

async fn fetch(session: &Session, url: String) -> http::Response<Bytes> {
    bounded("data", session.data(get(url))).await.unwrap()
}

/// What a delegate heard of its tasks.
#[derive(Debug, Default)]
struct Recorder {
    heard: Mutex<Vec<String>>,
    bytes: Mutex<Vec<u8>>,
}

impl Delegate for Recorder {
    fn did_receive_response(&self, _: &TaskInfo, response: &http::Response<()>) -> Disposition {
        let note = format!("response {}", response.status().as_u16());
        self.heard.lock().unwrap().push(note);
        Disposition::Allow
    }

    fn did_receive_data(&self, _: &TaskInfo, data: &Bytes) {
        self.bytes.lock().unwrap().extend_from_slice(data);
        let mut heard = self.heard.lock().unwrap();
        if heard.last().map(String::as_str) != Some("data") {
            heard.push("data".into());
        }
    }

    fn did_complete(&self, _: &TaskInfo, result: Result<(), Error>) {
        let note = format!("complete {}", if result.is_ok() { "ok" } else { "error" });
        self.heard.lock().unwrap().push(note);
    }
}

impl Recorder {
    fn take(&self) -> (Vec<String>, Vec<u8>) {
        (
            std::mem::take(&mut *self.heard.lock().unwrap()),
            std::mem::take(&mut *self.bytes.lock().unwrap()),
        )
    }

    async fn completed(&self) {
        eventually("did_complete", || {
            self.heard
                .lock()
                .unwrap()
                .iter()
                .any(|h| h.starts_with("complete"))
        })
        .await;
    }
}

#[tokio::test]
async fn a_fresh_response_is_answered_from_the_cache_without_a_connection() {
    let stage = Stage::start().await.unwrap();
    let session = Session::new(no_pool().build().unwrap(), None);
    let url = stage.url("/bytes/1000?max_age=60");
    let first = fetch(&session, url.clone()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.body().as_ref(), body(1000).as_slice());
    let cached = session.resources().cached_bytes;
    assert!(cached > 1000, "stored with its headers: {cached}");
    assert_eq!((stage.accepted(), stage.requests()), (1, 1));
    for _ in 0..3 {
        let again = fetch(&session, url.clone()).await;
        assert_eq!(again.status(), 200);
        assert_eq!(again.body(), first.body());
        assert!(again.headers().contains_key(http::header::AGE));
    }
    // The witness: the stage saw no other connection, nor request.
    assert_eq!((stage.accepted(), stage.requests()), (1, 1));
    let ledger = session.resources();
    assert_eq!(ledger.open_connections, 0, "{ledger:?}");
    assert_eq!(ledger.cached_bytes, cached);
    // Another URL is another entry.
    fetch(&session, stage.url("/bytes/1001?max_age=60")).await;
    assert_eq!(stage.accepted(), 2);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(PATIENCE).await);
}

#[tokio::test]
async fn an_https_hit_opens_no_connection_and_makes_no_handshake() {
    let ca = tls_ca::TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    let config = no_pool().add_root_certificate(ca.root()).build().unwrap();
    let session = Session::new(config, None);
    let url = stage.https_url("/bytes/1000?max_age=60");
    let first = fetch(&session, url.clone()).await;
    assert_eq!(first.body().as_ref(), body(1000).as_slice());
    assert_eq!((stage.accepted(), stage.requests()), (1, 1));
    for _ in 0..3 {
        let again = fetch(&session, url.clone()).await;
        assert_eq!(again.body(), first.body());
    }
    // The witness: no other connection, so no other handshake, full or resumed.
    assert_eq!((stage.accepted(), stage.requests()), (1, 1));
    assert_eq!(stage.tls_resumptions(), 0);
    // A miss after the hits connects as usual, resuming the TLS session cached.
    fetch(&session, stage.https_url("/bytes/10")).await;
    assert_eq!((stage.accepted(), stage.tls_resumptions()), (2, 1));
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(PATIENCE).await);
}

#[tokio::test]
async fn a_hit_leaves_the_pooled_connection_it_was_given_in_the_pool() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder().max_connections_per_host(1);
    let session = Session::new(config.build().unwrap(), None);
    let cached = stage.url("/bytes/1000?max_age=60");
    fetch(&session, cached.clone()).await;
    // The engine hands each of these the pooled connection; the hits give it back.
    for _ in 0..3 {
        fetch(&session, cached.clone()).await;
        let ledger = session.resources();
        assert_eq!(
            (ledger.open_connections, ledger.idle_connections),
            (0, 1),
            "{ledger:?}"
        );
    }
    // A miss, with one connection per host allowed, finds it and reuses it.
    fetch(&session, stage.url("/bytes/10")).await;
    assert_eq!((stage.accepted(), stage.requests()), (1, 2));
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(PATIENCE).await);
}

#[tokio::test]
async fn a_hit_gives_a_data_task_s_delegate_every_callback() {
    let stage = Stage::start().await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let config = no_pool().url_cache(Some(UrlCache::memory(4 << 20)));
    let session = Session::new(config.build().unwrap(), Some(recorder.clone()));
    // A chunked body, several windows of the delegate's, is stored whole too.
    let url = stage.url("/bytes/100000?max_age=60&chunked=1");
    let mut heard = Vec::new();
    for _ in 0..2 {
        let task = session.data_task(get(url.clone())).unwrap();
        task.resume();
        recorder.completed().await;
        let (callbacks, bytes) = recorder.take();
        assert_eq!(bytes, body(100_000));
        heard.push(callbacks);
    }
    let expected = ["response 200", "data", "complete ok"];
    assert_eq!(heard[0], expected);
    assert_eq!(heard[1], expected, "the hit's callbacks");
    assert_eq!(stage.accepted(), 1, "the hit opened a connection");
    // A download task is answered from the same entry, into its file.
    let download = bounded("download", session.download(get(url.clone())))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(download.body().path()).unwrap(),
        body(100_000)
    );
    assert_eq!(stage.accepted(), 1);
    drop(download);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
}

#[tokio::test]
async fn what_may_not_be_stored_is_not() {
    let stage = Stage::start().await.unwrap();
    let session = Session::new(no_pool().build().unwrap(), None);
    let urls = [
        // Neither fresh nor with a validator: nothing to answer with later.
        "/bytes/1000",
        "/bytes/1000?max_age=60&no_store=1",
        "/bytes/1000?max_age=60&status=404",
        // Larger than an entry may be: a twentieth of 512 KiB.
        "/bytes/30000?max_age=60",
        "/bytes/30000?max_age=60&chunked=1",
        // Not complete.
        "/bytes/1000?max_age=60&reset_after=500",
    ];
    for (i, path) in urls.iter().enumerate() {
        for _ in 0..2 {
            let _ = bounded(path, session.data(get(stage.url(path)))).await;
        }
        assert_eq!(session.resources().cached_bytes, 0, "{path}");
        assert_eq!(stage.accepted(), 2 * (i as u64 + 1), "{path}: a hit");
    }
    // A POST is never answered from the cache.
    let url = stage.url("/bytes/1000?max_age=60");
    fetch(&session, url.clone()).await;
    let post = http::Request::post(url.clone()).body(()).unwrap();
    bounded("post", session.data(post)).await.unwrap();
    assert_eq!(stage.requests(), 14);
    // And its success made the stored GET stale (RFC 9111, 4.4): asked again.
    fetch(&session, url).await;
    assert_eq!(stage.requests(), 15);
}

#[tokio::test]
async fn a_session_without_a_cache_asks_the_network_every_time() {
    let stage = Stage::start().await.unwrap();
    let session = Session::new(no_pool().url_cache(None).build().unwrap(), None);
    let url = stage.url("/bytes/1000?max_age=60");
    for _ in 0..3 {
        fetch(&session, url.clone()).await;
        assert_eq!(session.resources().cached_bytes, 0);
    }
    assert_eq!(stage.accepted(), 3);
    let ephemeral = Session::new(Configuration::ephemeral(), None);
    fetch(&ephemeral, url.clone()).await;
    fetch(&ephemeral, url).await;
    assert_eq!(stage.accepted(), 5);
}

#[tokio::test]
async fn a_stale_entry_with_a_validator_is_revalidated() {
    let stage = Stage::start().await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let session = Session::new(Configuration::default(), Some(recorder.clone()));
    // Stale at once, but with an ETag: asked again with If-None-Match, answered 304.
    let url = stage.url("/bytes/2000?max_age=0&etag=v1");
    let first = fetch(&session, url.clone()).await;
    assert!(session.resources().cached_bytes > 2000);
    let second = fetch(&session, url.clone()).await;
    assert_eq!(stage.not_modified(), 1);
    assert_eq!(second.status(), 200, "the stored response, not the 304");
    assert_eq!(second.body(), first.body());
    assert_eq!(second.headers()["etag"], "\"v1\"");
    // Through a delegate too: response, data, complete, from one 304.
    let task = session.data_task(get(url.clone())).unwrap();
    task.resume();
    recorder.completed().await;
    let (heard, bytes) = recorder.take();
    assert_eq!(heard, ["response 200", "data", "complete ok"]);
    assert_eq!(bytes, body(2000));
    assert_eq!(stage.not_modified(), 2);
    assert_eq!(stage.requests(), 3);
    // The connection was pooled after each 304: one connection for the three.
    assert_eq!(stage.accepted(), 1);
    assert_eq!(session.resources().idle_connections, 1);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(session.resources().is_zero());
}

#[tokio::test]
async fn the_least_recently_used_go_first_and_the_cache_stays_within_its_capacity() {
    let stage = Stage::start().await.unwrap();
    let capacity = 20_000;
    let cache = UrlCache::memory(capacity).max_entry(8_000);
    let session = Session::new(no_pool().url_cache(Some(cache)).build().unwrap(), None);
    let url = |n: usize| stage.url(&format!("/bytes/{}?max_age=60", 5000 + n));
    for n in 0..3 {
        fetch(&session, url(n)).await;
    }
    assert_eq!(stage.accepted(), 3);
    // 0 is used again: 1 is now the least recently used, and goes for 3.
    fetch(&session, url(0)).await;
    assert_eq!(stage.accepted(), 3);
    fetch(&session, url(3)).await;
    assert_eq!(stage.accepted(), 4);
    fetch(&session, url(0)).await;
    assert_eq!(
        stage.accepted(),
        4,
        "0, used more recently than 1, was evicted"
    );
    fetch(&session, url(1)).await;
    assert_eq!(stage.accepted(), 5, "1, the least recently used, stayed");
    for n in 4..12 {
        fetch(&session, url(n)).await;
        let cached = session.resources().cached_bytes;
        assert!(cached <= capacity as u64, "{cached} > {capacity}");
    }
    let accepted = stage.accepted();
    fetch(&session, url(11)).await;
    assert_eq!(stage.accepted(), accepted, "the newest was not kept");
}

#[tokio::test]
async fn invalidation_releases_the_cache() {
    let stage = Stage::start().await.unwrap();
    for finish in [true, false] {
        let session = Session::new(Configuration::default(), None);
        let store = session.cache_store().expect("a live session's cache");
        fetch(&session, stage.url("/bytes/1000?max_age=60")).await;
        assert!(session.resources().cached_bytes > 0);
        if finish {
            session.finish_tasks_and_invalidate();
        } else {
            session.invalidate_and_cancel();
        }
        bounded("invalidated", session.invalidated()).await;
        assert!(
            store.upgrade().is_none(),
            "the cache outlived invalidated()"
        );
        assert!(session.cache_store().is_none());
        let ledger = session.resources();
        assert!(ledger.is_zero(), "{ledger:?}");
    }
    // Dropping the last handle releases it too (R10).
    let session = Session::new(Configuration::default(), None);
    let store = session.cache_store().unwrap();
    fetch(&session, stage.url("/bytes/1000?max_age=60")).await;
    let observer = session.observer();
    drop(session);
    bounded("invalidated", observer.invalidated()).await;
    assert!(store.upgrade().is_none());
    assert_eq!(observer.resources().cached_bytes, 0);
}

/// The files under `dir` that this process has open.
fn open_files_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

#[tokio::test]
async fn an_ephemeral_disk_cache_is_removed_at_invalidation() {
    let stage = Stage::start().await.unwrap();
    let cache = UrlCache::memory(64 * 1024).disk(CacheDisk::Ephemeral { capacity: 4 << 20 });
    let session = Session::new(no_pool().url_cache(Some(cache)).build().unwrap(), None);
    let dir = session.cache_directory().expect("a disk cache").to_owned();
    // A body larger than memory's twentieth: its bound is the disk's twentieth.
    let url = stage.url("/bytes/100000?max_age=60");
    fetch(&session, url.clone()).await;
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    assert!(session.resources().cached_bytes > 100_000);
    let again = fetch(&session, url).await;
    assert_eq!(again.body().as_ref(), body(100_000).as_slice());
    assert_eq!(stage.accepted(), 1, "the hit opened a connection");
    assert_eq!(open_files_under(&dir), 0);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(!dir.exists(), "{dir:?} outlived the session");
    assert!(session.resources().is_zero());
}

#[tokio::test]
async fn a_directory_of_the_caller_s_keeps_its_files_and_no_file_is_held_open() {
    let stage = Stage::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mine"), b"the caller's").unwrap();
    let cache = UrlCache::memory(64 * 1024).disk(CacheDisk::Dir {
        path: dir.path().to_owned(),
        capacity: 1 << 20,
    });
    let session = Session::new(no_pool().url_cache(Some(cache)).build().unwrap(), None);
    for n in 0..3 {
        fetch(
            &session,
            stage.url(&format!("/bytes/{}?max_age=60", 1000 + n)),
        )
        .await;
    }
    fetch(&session, stage.url("/bytes/1000?max_age=60")).await;
    assert_eq!(stage.accepted(), 3);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    assert_eq!(open_files_under(dir.path()), 0);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(session.resources().is_zero());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    assert_eq!(open_files_under(dir.path()), 0);
    // Another session on the same directory writes files of its own beside them, and its
    // reset removes its own only.
    let cache = UrlCache::memory(64 * 1024).disk(CacheDisk::Dir {
        path: dir.path().to_owned(),
        capacity: 1 << 20,
    });
    let session = Session::new(no_pool().url_cache(Some(cache)).build().unwrap(), None);
    for n in 0..2 {
        fetch(
            &session,
            stage.url(&format!("/bytes/{}?max_age=60", 1000 + n)),
        )
        .await;
    }
    assert_eq!(
        stage.accepted(),
        5,
        "a new session reads no earlier session's files"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 6);
    bounded("reset", session.reset()).await;
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    assert_eq!(session.resources().cached_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_empties_the_cache_closes_idle_connections_and_forgets_tls_sessions() {
    let ca = tls_ca::TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    let config = Configuration::builder()
        .add_root_certificate(ca.root())
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let url = stage.https_url("/bytes/1000?max_age=60");
    fetch(&session, url.clone()).await;
    fetch(&session, stage.https_url("/bytes/10")).await;
    eventually("a ticket cached", || session.resources().tls_sessions > 0).await;
    let before = session.resources();
    assert!(before.cached_bytes > 0, "{before:?}");
    assert_eq!(before.idle_connections, 1, "{before:?}");
    let store = session.cache_store().unwrap();
    let tls = session.tls_config().unwrap();
    assert_eq!((stage.accepted(), stage.closed()), (1, 0));
    bounded("reset", session.reset()).await;
    let after = session.resources();
    assert_eq!(after.cached_bytes, 0, "{after:?}");
    assert_eq!(after.idle_connections, 0, "{after:?}");
    assert_eq!(after.tls_sessions, 0, "{after:?}");
    // The witnesses: the stage sees the idle connection closed; the old cache store and TLS
    // configuration are gone (no connection holds the latter any more).
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "{} open",
        stage.open()
    );
    assert!(
        store.upgrade().is_none(),
        "the old cache store outlived reset()"
    );
    eventually("the old TLS configuration dropped", || {
        tls.upgrade().is_none()
    })
    .await;
    // The session goes on: the next request misses the cache, opens a new connection, and
    // makes a full handshake (nothing to resume).
    let resumed = stage.tls_resumptions();
    let again = fetch(&session, url).await;
    assert_eq!(again.body().as_ref(), body(1000).as_slice());
    assert_eq!((stage.accepted(), stage.requests()), (2, 3));
    assert_eq!(stage.tls_resumptions(), resumed);
    assert!(session.resources().cached_bytes > 0);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(session.resources().is_zero());
    bounded("reset after invalidation", session.reset()).await;
    assert!(session.resources().is_zero());
}

#[tokio::test]
async fn the_shared_session_s_cache_stays_within_its_capacity() {
    let stage = Stage::start().await.unwrap();
    let session = Session::shared();
    let capacity = session
        .configuration()
        .url_cache()
        .expect("the shared session caches")
        .memory_capacity() as u64;
    let mut most = 0;
    // 60 entries of some 20 KiB: more than twice the capacity.
    for n in 0..60 {
        fetch(
            &session,
            stage.url(&format!("/bytes/{}?max_age=600", 20_000 + n)),
        )
        .await;
        most = most.max(session.resources().cached_bytes);
    }
    assert!(most <= capacity, "{most} > {capacity}");
    assert!(most > capacity / 2, "{most}: the cache was used");
    bounded("reset", session.reset()).await;
    assert_eq!(session.resources().cached_bytes, 0);
}

/// The figure: hits against misses, by the stage's count of connections and requests.
#[tokio::test]
async fn figure_hits_open_no_connection() {
    let stage = Stage::start().await.unwrap();
    let session = Session::new(no_pool().build().unwrap(), None);
    let (urls, rounds) = (10, 5);
    for _ in 0..rounds {
        for n in 0..urls {
            fetch(
                &session,
                stage.url(&format!("/bytes/{}?max_age=60", 4096 + n)),
            )
            .await;
        }
    }
    let requests = urls * rounds;
    let misses = stage.requests();
    println!(
        "cache figure: {requests} GETs of {urls} URLs: {misses} misses ({} connections \
         accepted), {} hits (0 connections); {} bytes cached",
        stage.accepted(),
        requests as u64 - misses,
        session.resources().cached_bytes
    );
    assert_eq!(misses, urls as u64);
    assert_eq!(stage.accepted(), urls as u64);
}
