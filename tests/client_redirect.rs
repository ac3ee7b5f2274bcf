//! Redirects, against the stage: followed by default up to the configuration's limit, decided
//! by the delegate (follow, follow another request, refuse), RFC 9110's method and body rules,
//! credentials kept from other origins, and every hop's connection released: pooled when its
//! body was read whole and the server keeps it alive, closed otherwise. The witnesses are the
//! stage's count of accepted connections and its request log, and the kernel's list of this
//! process's sockets to the stage, read at the moment `did_complete` runs or the
//! convenience's future returns: a hop's socket is either the pool's or closed by then. Every wait is bounded; no assertion is about speed.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use leakproof::{
    Configuration, Delegate, Disposition, Error, Ledger, Observer, Redirect, Session, TaskId,
    TaskInfo, Timeout, UploadBody,
};
use leakproof_check::scenario::{bounded, eventually};
use leakproof_check::stage::{Seen, Stage, percent_encode};
use leakproof_check::witness::client_sockets_of;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

/// `/redirect/CODE` to `to`.
fn redirect(stage: &Stage, code: u16, to: &str) -> String {
    stage.url(&format!("/redirect/{code}?to={}", percent_encode(to)))
}

/// A stage that logs the requests it reads.
async fn logged() -> Stage {
    Stage::builder().log().start().await.unwrap()
}

fn plain() -> Session {
    Session::new(Configuration::default(), None)
}

fn with_limit(hops: u32) -> Configuration {
    Configuration::builder()
        .max_redirects(hops)
        .build()
        .unwrap()
}

/// What the stage and the session hold, as seen at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    /// Connections the stage accepted.
    accepted: u64,
    /// This process's sockets to the stage, by the kernel's list.
    sockets: usize,
    open_connections: u32,
    idle_connections: u32,
}

fn snapshot(stage: &Stage, ledger: Ledger) -> Snapshot {
    Snapshot {
        accepted: stage.accepted(),
        sockets: client_sockets_of(&stage.peers()).unwrap(),
        open_connections: ledger.open_connections,
        idle_connections: ledger.idle_connections,
    }
}

#[derive(Debug, Clone)]
enum Heard {
    Redirect {
        status: u16,
        method: http::Method,
        uri: http::Uri,
    },
    Response(u16),
    Data(usize),
    Complete(Result<(), Error>, Snapshot),
}

type Decide = Box<dyn Fn(&http::Response<()>, http::Request<()>) -> Redirect + Send + Sync>;

/// Records what it hears, answers redirects with `decide`, and notes the stage's counts and
/// the session's ledger when `did_complete` runs.
struct Recorder {
    heard: Mutex<Vec<(TaskId, Heard)>>,
    decide: Decide,
    stage: Arc<Stage>,
    observer: OnceLock<Observer>,
}

impl Recorder {
    fn new(stage: &Arc<Stage>, decide: Decide) -> Arc<Recorder> {
        Arc::new(Recorder {
            heard: Mutex::new(Vec::new()),
            decide,
            stage: stage.clone(),
            observer: OnceLock::new(),
        })
    }

    fn following(stage: &Arc<Stage>) -> Arc<Recorder> {
        Recorder::new(stage, Box::new(|_, request| Redirect::Follow(request)))
    }

    fn session(self: &Arc<Self>, config: Configuration) -> Session {
        let session = Session::new(config, Some(self.clone()));
        let _ = self.observer.set(session.observer());
        session
    }

    fn heard(&self) -> Vec<Heard> {
        let heard = self.heard.lock().unwrap();
        heard.iter().map(|(_, h)| h.clone()).collect()
    }

    fn completion(&self) -> Option<(Result<(), Error>, Snapshot)> {
        self.heard().into_iter().find_map(|h| match h {
            Heard::Complete(result, at) => Some((result, at)),
            _ => None,
        })
    }

    async fn completed(&self) -> (Result<(), Error>, Snapshot) {
        eventually("did_complete", || self.completion().is_some()).await;
        self.completion().unwrap()
    }

    fn push(&self, task: &TaskInfo, heard: Heard) {
        self.heard.lock().unwrap().push((task.id, heard));
    }
}

impl Delegate for Recorder {
    fn will_perform_redirection(
        &self,
        task: &TaskInfo,
        response: &http::Response<()>,
        request: http::Request<()>,
    ) -> Redirect {
        let heard = Heard::Redirect {
            status: response.status().as_u16(),
            method: request.method().clone(),
            uri: request.uri().clone(),
        };
        self.push(task, heard);
        (self.decide)(response, request)
    }

    fn did_receive_response(&self, task: &TaskInfo, response: &http::Response<()>) -> Disposition {
        self.push(task, Heard::Response(response.status().as_u16()));
        Disposition::Allow
    }

    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        self.push(task, Heard::Data(data.len()));
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let ledger = self
            .observer
            .get()
            .map(Observer::resources)
            .unwrap_or_default();
        let at = snapshot(&self.stage, ledger);
        self.push(task, Heard::Complete(result, at));
    }
}

fn requests(stage: &Stage) -> Vec<(String, String)> {
    stage
        .log()
        .into_iter()
        .map(|Seen { method, target, .. }| (method, target))
        .collect()
}

fn pair(method: &str, target: &str) -> (String, String) {
    (method.to_owned(), target.to_owned())
}

// ---- followed by default ----

#[tokio::test]
async fn a_convenience_follows_a_redirect_and_pools_the_one_connection_both_hops_used() {
    let stage = logged().await;
    let session = plain();
    let response = bounded("data", session.data(get(redirect(&stage, 302, "/bytes/5"))))
        .await
        .unwrap();
    let at = snapshot(&stage, session.resources());
    assert_eq!(response.status(), 200);
    assert_eq!(&response.body()[..], b"leakp");
    assert_eq!(
        requests(&stage),
        [
            pair("GET", "/redirect/302?to=%2Fbytes%2F5"),
            pair("GET", "/bytes/5")
        ]
    );
    // One connection served both: the redirect's body was read whole, so it went back to the
    // pool and the next hop took it; at the return it is the pool's, nothing else is open.
    let expected = Snapshot {
        accepted: 1,
        sockets: 1,
        open_connections: 0,
        idle_connections: 1,
    };
    assert_eq!(at, expected);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn the_shared_session_follows_too() {
    let stage = logged().await;
    let response = bounded(
        "data",
        Session::shared().data(get(redirect(&stage, 308, "/bytes/5"))),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(stage.requests(), 2);
}

#[tokio::test]
async fn a_delegate_task_hears_each_redirect_then_the_final_response_only() {
    let stage = Arc::new(logged().await);
    let recorder = Recorder::following(&stage);
    let session = recorder.session(Configuration::default());
    let task = session
        .data_task(get(stage.url("/chain/2?code=301")))
        .unwrap();
    task.resume();
    let (result, at) = recorder.completed().await;
    assert!(result.is_ok(), "{result:?}");
    let heard = recorder.heard();
    let hops: Vec<(u16, String, String)> = heard
        .iter()
        .filter_map(|h| match h {
            Heard::Redirect {
                status,
                method,
                uri,
            } => Some((*status, method.to_string(), uri.to_string())),
            _ => None,
        })
        .collect();
    let get = || "GET".to_owned();
    assert_eq!(
        hops,
        [
            (301, get(), stage.url("/chain/1?code=301")),
            (301, get(), stage.url("/chain/0?code=301")),
        ]
    );
    let responses: Vec<u16> = heard
        .iter()
        .filter_map(|h| match h {
            Heard::Response(status) => Some(*status),
            _ => None,
        })
        .collect();
    assert_eq!(
        responses,
        [200],
        "did_receive_response for the last hop only"
    );
    // Three exchanges on one connection, pooled at did_complete.
    assert_eq!(
        at,
        Snapshot {
            accepted: 1,
            sockets: 1,
            open_connections: 0,
            idle_connections: 1
        }
    );
    drop(task);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_hop_whose_server_closes_leaves_its_connection_closed_not_pooled() {
    let stage = Arc::new(logged().await);
    let recorder = Recorder::following(&stage);
    let session = recorder.session(Configuration::default());
    let url = stage.url(&format!(
        "/redirect/307?to={}&keep_alive=0",
        percent_encode("/bytes/5")
    ));
    let task = session.data_task(get(url)).unwrap();
    task.resume();
    let (result, at) = recorder.completed().await;
    assert!(result.is_ok(), "{result:?}");
    // The redirect's connection said close and is closed; the last one is pooled.
    assert_eq!(
        at,
        Snapshot {
            accepted: 2,
            sockets: 1,
            open_connections: 0,
            idle_connections: 1
        }
    );
    session.invalidate_and_cancel();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_redirect_with_a_large_body_closes_its_connection_rather_than_read_it_all() {
    let stage = logged().await;
    let session = plain();
    let url = stage.url(&format!(
        "/redirect/302?to={}&len=16000000",
        percent_encode("/bytes/5")
    ));
    let response = bounded("data", session.data(get(url))).await.unwrap();
    assert_eq!(response.status(), 200);
    let at = snapshot(&stage, session.resources());
    assert_eq!(
        at,
        Snapshot {
            accepted: 2,
            sockets: 1,
            open_connections: 0,
            idle_connections: 1
        }
    );
    assert!(
        stage.body_bytes_written() < 16_000_000,
        "the redirect's body was not read to its end"
    );
}

// ---- the limit and loops ----

#[tokio::test]
async fn ten_redirects_are_followed_and_an_eleventh_is_too_many() {
    let stage = logged().await;
    let session = plain();
    let ten = bounded("data", session.data(get(stage.url("/chain/10")))).await;
    assert_eq!(ten.unwrap().status(), 200);
    let eleven = bounded("data", session.data(get(stage.url("/chain/11")))).await;
    assert!(
        matches!(eleven, Err(Error::TooManyRedirects { limit: 10 })),
        "{eleven:?}"
    );
    let message = eleven.unwrap_err().to_string();
    assert!(message.contains("max_redirects"), "{message}");
    // The eleventh redirect was not followed: 11 + 11 requests, the last one a redirect.
    assert_eq!(stage.requests(), 22);
    assert_eq!(session.resources().open_connections, 0);
}

#[tokio::test]
async fn the_limit_is_the_configuration_s_and_zero_delivers_the_redirect_as_the_response() {
    let stage = Arc::new(logged().await);
    let two = Session::new(with_limit(2), None);
    let result = bounded("data", two.data(get(stage.url("/chain/3")))).await;
    assert!(
        matches!(result, Err(Error::TooManyRedirects { limit: 2 })),
        "{result:?}"
    );
    let none = Session::new(with_limit(0), None);
    let response = bounded("data", none.data(get(stage.url("/chain/1"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(response.headers()["location"], "/chain/0?code=302");
    assert_eq!(response.body().len(), 16);
    // A delegate is not asked either: the redirect is its response.
    let recorder = Recorder::following(&stage);
    let session = recorder.session(with_limit(0));
    let task = session.data_task(get(stage.url("/chain/1"))).unwrap();
    task.resume();
    let (result, _) = recorder.completed().await;
    assert!(result.is_ok(), "{result:?}");
    let heard = recorder.heard();
    assert!(
        matches!(
            heard[..],
            [Heard::Response(302), Heard::Data(16), Heard::Complete(..)]
        ),
        "{heard:?}"
    );
}

#[tokio::test]
async fn a_redirect_loop_is_an_error_and_its_connections_are_released() {
    let stage = Arc::new(logged().await);
    let recorder = Recorder::following(&stage);
    let session = recorder.session(Configuration::default());
    let task = session.data_task(get(stage.url("/loop/0"))).unwrap();
    task.resume();
    let (result, at) = recorder.completed().await;
    match &result {
        Err(Error::RedirectLoop { method, url }) => {
            assert_eq!(method, "GET");
            assert_eq!(url, &stage.url("/loop/1?code=302"));
        }
        other => panic!("expected a redirect loop, got {other:?}"),
    }
    // /loop/0, /loop/1?code=302, /loop/0?code=302 asked for, /loop/1?code=302 not again: the
    // loop is seen before the repeat is sent. The connection it ended on is closed with the
    // task; the others are the pool's.
    assert_eq!(stage.requests(), 3);
    assert_eq!(at.open_connections, 0);
    assert_eq!(at.sockets, at.idle_connections as usize);
}

// ---- the delegate decides ----

#[tokio::test]
async fn a_refused_redirect_is_the_response_with_its_body() {
    let stage = Arc::new(logged().await);
    let recorder = Recorder::new(&stage, Box::new(|_, _| Redirect::Refuse));
    let session = recorder.session(Configuration::default());
    let task = session
        .data_task(get(redirect(&stage, 308, "/bytes/5")))
        .unwrap();
    task.resume();
    let (result, at) = recorder.completed().await;
    assert!(result.is_ok(), "{result:?}");
    let heard = recorder.heard();
    assert!(
        matches!(
            heard[..],
            [
                Heard::Redirect { status: 308, .. },
                Heard::Response(308),
                Heard::Data(16),
                Heard::Complete(..)
            ]
        ),
        "{heard:?}"
    );
    assert_eq!(stage.requests(), 1);
    assert_eq!(
        at,
        Snapshot {
            accepted: 1,
            sockets: 1,
            open_connections: 0,
            idle_connections: 1
        }
    );
}

#[tokio::test]
async fn the_delegate_can_follow_a_request_of_its_own() {
    let stage = Arc::new(logged().await);
    let elsewhere = stage.url("/bytes/7");
    let recorder = Recorder::new(
        &stage,
        Box::new(move |_, request| {
            let (mut parts, ()) = request.into_parts();
            parts.uri = elsewhere.parse().unwrap();
            parts
                .headers
                .insert("x-hop", http::HeaderValue::from_static("changed"));
            Redirect::Follow(http::Request::from_parts(parts, ()))
        }),
    );
    let session = recorder.session(Configuration::default());
    let task = session
        .data_task(get(redirect(&stage, 302, "/bytes/5")))
        .unwrap();
    task.resume();
    let (result, _) = recorder.completed().await;
    assert!(result.is_ok(), "{result:?}");
    let log = stage.log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].target, "/bytes/7");
    assert_eq!(log[1].header("x-hop"), Some("changed"));
    let bytes: usize = recorder
        .heard()
        .iter()
        .map(|h| match h {
            Heard::Data(n) => *n,
            _ => 0,
        })
        .sum();
    assert_eq!(bytes, 7);
}

// ---- methods and bodies (RFC 9110, 15.4) ----

fn post(url: String) -> http::Request<()> {
    http::Request::post(url)
        .header("content-type", "text/plain")
        .body(())
        .unwrap()
}

#[tokio::test]
async fn a_303_turns_a_post_into_a_get_without_its_body() {
    let stage = logged().await;
    let session = plain();
    let body = UploadBody::Bytes(Bytes::from_static(b"the form"));
    let response = bounded(
        "upload",
        session.upload(post(redirect(&stage, 303, "/bytes/5")), body),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let log = stage.log();
    assert_eq!((log[0].method.as_str(), log[0].body_len), ("POST", 8));
    assert_eq!((log[1].method.as_str(), log[1].body_len), ("GET", 0));
    assert_eq!(log[1].header("content-length"), None);
    assert_eq!(log[1].header("content-type"), None);
}

#[tokio::test]
async fn a_301_or_302_turns_a_post_into_a_get_but_keeps_other_methods() {
    let stage = logged().await;
    let session = plain();
    for code in [301, 302] {
        let body = UploadBody::Bytes(Bytes::from_static(b"the form"));
        let url = redirect(&stage, code, "/bytes/5");
        bounded("upload", session.upload(post(url), body))
            .await
            .unwrap();
        let body = UploadBody::Bytes(Bytes::from_static(b"the file"));
        let put = http::Request::put(redirect(&stage, code, "/bytes/5"))
            .body(())
            .unwrap();
        bounded("upload", session.upload(put, body)).await.unwrap();
    }
    let hops: Vec<(String, u64)> = stage
        .log()
        .into_iter()
        .filter(|seen| seen.target == "/bytes/5")
        .map(|seen| (seen.method, seen.body_len))
        .collect();
    let get = ("GET".to_owned(), 0);
    let put = ("PUT".to_owned(), 8);
    assert_eq!(hops, [get.clone(), put.clone(), get, put]);
}

#[tokio::test]
async fn a_307_or_308_sends_the_method_and_body_again_bytes_or_file() {
    let stage = logged().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload");
    std::fs::write(&file, vec![b'x'; 70_000]).unwrap();
    let session = plain();
    let bytes = UploadBody::Bytes(Bytes::from_static(b"the form"));
    let url = redirect(&stage, 307, "/bytes/5");
    bounded("upload", session.upload(post(url), bytes))
        .await
        .unwrap();
    let url = redirect(&stage, 308, "/bytes/5");
    bounded("upload", session.upload(post(url), UploadBody::File(file)))
        .await
        .unwrap();
    let log: Vec<(String, u64)> = stage
        .log()
        .into_iter()
        .map(|seen| (seen.method, seen.body_len))
        .collect();
    let posts = |n| ("POST".to_owned(), n);
    assert_eq!(log, [posts(8), posts(8), posts(70_000), posts(70_000)]);
}

// ---- origins and locations ----

#[tokio::test]
async fn credentials_go_to_the_same_origin_only() {
    let stage = logged().await;
    let other = logged().await;
    let session = plain();
    let with_credentials = |url: String| {
        http::Request::get(url)
            .header("authorization", "Bearer secret")
            .header("cookie", "session=1")
            .header("x-kept", "yes")
            .body(())
            .unwrap()
    };
    // Same origin: kept.
    let url = redirect(&stage, 302, "/bytes/5");
    bounded("data", session.data(with_credentials(url)))
        .await
        .unwrap();
    let log = stage.log();
    assert_eq!(log[1].header("authorization"), Some("Bearer secret"));
    assert_eq!(log[1].header("cookie"), Some("session=1"));
    // Another origin (another port): removed, the rest kept; `Host` is the new origin's.
    let url = redirect(&stage, 302, &other.url("/bytes/5"));
    bounded("data", session.data(with_credentials(url)))
        .await
        .unwrap();
    let seen = &other.log()[0];
    assert_eq!(seen.target, "/bytes/5");
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("cookie"), None);
    assert_eq!(seen.header("x-kept"), Some("yes"));
    assert_eq!(seen.header("host"), Some(other.addr().to_string().as_str()));
    // The first stage's connection is pooled, the other's too: one each, nothing busy.
    let at = session.resources();
    assert_eq!((at.open_connections, at.idle_connections), (0, 2));
    assert_eq!((stage.open(), other.open()), (1, 1));
}

#[tokio::test]
async fn a_session_s_default_credentials_go_to_the_same_origin_only_too() {
    let stage = logged().await;
    let other = logged().await;
    let config = Configuration::builder()
        .default_header("authorization", "Bearer secret")
        .default_header("x-kept", "yes")
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let url = redirect(&stage, 302, &other.url("/bytes/5"));
    bounded("data", session.data(get(url))).await.unwrap();
    assert_eq!(
        stage.log()[0].header("authorization"),
        Some("Bearer secret")
    );
    let seen = &other.log()[0];
    assert_eq!(seen.target, "/bytes/5");
    assert_eq!(
        seen.header("authorization"),
        None,
        "a default credential followed a redirect to another origin"
    );
    assert_eq!(seen.header("x-kept"), Some("yes"));
    // A request the user sends to that origin itself carries it: the user chose the origin.
    bounded("data", session.data(get(other.url("/bytes/5"))))
        .await
        .unwrap();
    assert_eq!(
        other.log()[1].header("authorization"),
        Some("Bearer secret")
    );
}

#[tokio::test]
async fn a_relative_location_resolves_against_the_request_s_url() {
    let stage = logged().await;
    let session = plain();
    for (to, expected) in [
        ("../bytes/5?status=201", "/bytes/5?status=201"),
        ("//127.0.0.1:PORT/bytes/6", "/bytes/6"),
        ("./../../bytes/7", "/bytes/7"),
    ] {
        let to = to.replace("PORT", &stage.addr().port().to_string());
        bounded("data", session.data(get(redirect(&stage, 302, &to))))
            .await
            .unwrap();
        let log = stage.log();
        assert_eq!(log.last().unwrap().target, expected, "{to}");
    }
}

#[tokio::test]
async fn a_bad_location_is_a_typed_error_and_its_connection_is_released() {
    let stage = Arc::new(logged().await);
    for (url, why) in [
        (stage.url("/redirect/302"), "no Location"),
        (redirect(&stage, 302, "ftp://127.0.0.1/file"), "scheme"),
        (redirect(&stage, 302, "http://[::1/"), "URL"),
        (redirect(&stage, 302, "http://127.0.0.1:99999/"), "port"),
    ] {
        let recorder = Recorder::following(&stage);
        let session = recorder.session(Configuration::default());
        let task = session.data_task(get(url.clone())).unwrap();
        task.resume();
        let (result, at) = recorder.completed().await;
        match &result {
            Err(error @ Error::InvalidRedirect { reason, .. }) => {
                assert!(
                    error.to_string().contains(why) || reason.contains(why),
                    "{url}: {error}"
                );
            }
            other => panic!("{url}: expected an invalid redirect, got {other:?}"),
        }
        assert_eq!(at.open_connections, 0, "{url}");
        assert_eq!(at.sockets, at.idle_connections as usize, "{url}");
        session.invalidate_and_cancel();
        bounded("invalidated", session.invalidated()).await;
    }
    assert!(stage.wait_all_closed(Duration::from_secs(5)).await);
}

// ---- timers and endings across hops ----

#[tokio::test]
async fn the_resource_timeout_spans_every_hop() {
    let stage = Arc::new(logged().await);
    let recorder = Recorder::following(&stage);
    let session = recorder.session(Configuration::default());
    let task = session
        .data_task(get(redirect(&stage, 302, "/hold/late")))
        .unwrap();
    task.resume();
    let held = bounded("held", stage.held("late", Duration::from_secs(5)))
        .await
        .expect("the redirect was followed");
    // The resource timer armed at resume still runs on the second exchange.
    session.observer().time_passes(task.id(), Timeout::Resource);
    let (result, at) = recorder.completed().await;
    assert!(
        matches!(result, Err(Error::TimedOut(Timeout::Resource))),
        "{result:?}"
    );
    // The redirect's connection went back to the pool and the held exchange took it again;
    // the timeout closed it, and nothing else was opened.
    assert_eq!(
        at,
        Snapshot {
            accepted: 1,
            sockets: 0,
            open_connections: 0,
            idle_connections: 0
        }
    );
    drop(held);
}

#[tokio::test]
async fn cancelling_a_task_mid_chain_closes_the_hop_s_connection() {
    let stage = Arc::new(logged().await);
    let recorder = Recorder::following(&stage);
    let session = recorder.session(Configuration::default());
    let task = session
        .data_task(get(redirect(&stage, 307, "/hold/mid")))
        .unwrap();
    task.resume();
    let held = bounded("held", stage.held("mid", Duration::from_secs(5)))
        .await
        .expect("the redirect was followed");
    task.cancel();
    let (result, at) = recorder.completed().await;
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    // Both exchanges on one connection, closed by did_complete.
    assert_eq!(
        at,
        Snapshot {
            accepted: 1,
            sockets: 0,
            open_connections: 0,
            idle_connections: 0
        }
    );
    drop(held);
}
