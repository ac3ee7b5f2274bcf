//! A pooled connection the server closes just as it goes idle: a request sent on it before
//! the client saw the close gets no response at all. An idempotent request with no body is
//! then sent again on a new connection (RFC 9112, 9.3.1), once; any other fails as before.
//! The stage's held exchanges play the server: the first close comes with no byte of
//! response, the second connection answers. Every wait is bounded.

use leakproof::{Configuration, Error, Session};
use leakproof_check::scenario::{PATIENCE, bounded};
use leakproof_check::stage::Stage;

fn request(method: &str, url: String) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(url)
        .body(())
        .unwrap()
}

/// A session with one connection in its pool, to the stage.
async fn pooled(stage: &Stage) -> Session {
    // No response cache: every request goes to the stage.
    let config = Configuration::builder().url_cache(None).build().unwrap();
    let session = Session::new(config, None);
    let warm = bounded("warm", session.data(request("GET", stage.url("/bytes/10")))).await;
    assert_eq!(warm.unwrap().status(), 200);
    assert_eq!(session.resources().idle_connections, 1);
    session
}

#[tokio::test]
async fn a_get_the_server_closed_its_pooled_connection_on_is_sent_again() {
    let stage = Stage::start().await.unwrap();
    let session = pooled(&stage).await;
    let url = stage.url("/hold/get");
    let asked = session.clone();
    let response = tokio::spawn(async move { asked.data(request("GET", url)).await });
    let first = stage.held("get", PATIENCE).await.expect("the request");
    assert_eq!(stage.accepted(), 1, "sent on the pooled connection");
    first.close().await.unwrap();
    let again = stage
        .held("get", PATIENCE)
        .await
        .expect("sent again on a new connection");
    assert_eq!(stage.accepted(), 2);
    again.head(200, false, Some(5)).await.unwrap();
    again.send(5).await.unwrap();
    again.end().await.unwrap();
    let response = bounded("response", response).await.unwrap().unwrap();
    assert_eq!(
        (response.status().as_u16(), response.body().len()),
        (200, 5)
    );
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(PATIENCE).await);
}

#[tokio::test]
async fn a_post_is_not_sent_again() {
    let stage = Stage::start().await.unwrap();
    let session = pooled(&stage).await;
    let url = stage.url("/hold/post");
    let asked = session.clone();
    let response = tokio::spawn(async move { asked.data(request("POST", url)).await });
    let first = stage.held("post", PATIENCE).await.expect("the request");
    first.close().await.unwrap();
    let outcome = bounded("outcome", response).await.unwrap();
    assert!(
        matches!(outcome, Err(Error::ConnectionReset)),
        "{outcome:?}"
    );
    assert_eq!((stage.accepted(), stage.requests()), (1, 2));
}
