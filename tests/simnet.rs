//! The simulated network (`leakproof_check::simnet`): its semantics end to end (FIN,
//! half-close, a reset (the client reads what reached it, then fails), backpressure from
//! small pipes, each scheduled fault, a refused connect, the network's counts), then the stage over it with the real
//! client on a current-thread runtime with a paused clock (a GET, a held exchange the stage
//! resets, a raw stream, a websocket, the client's close counted when the session is
//! invalidated), and the determinism of a whole run. Every wait is bounded on the paused clock:
//! a run that cannot progress jumps to its deadline and fails.

#[path = "support/tls_ca.rs"]
mod tls_ca;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use leakproof::{Configuration, Error, Message, Session};
use leakproof_check::simnet::{Buffers, Fault, SimNet, Tally};
use leakproof_check::stage::{self, RawEnding, RawScript, Stage};
use leakproof_check::witness::client_sockets_of;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous bound for any single wait, on the paused clock.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<F: Future>(what: &str, work: F) -> F::Output {
    tokio::time::timeout(BOUND, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress within {BOUND:?} of simulated time"))
}

/// Whether `work` is still waiting after a long stretch of simulated time.
async fn blocked<F: Future>(work: F) -> bool {
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .is_err()
}

fn counts(tally: &Tally) -> (u64, u64, u64) {
    (
        tally.opened(),
        tally.client_ends_alive(),
        tally.closed_by_client(),
    )
}

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

fn session_on(net: &SimNet) -> Session {
    let config = Configuration::builder()
        .transport(net.clone())
        .build()
        .unwrap();
    Session::new(config, None)
}

async fn read_to_end(stream: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    bounded("read to end", stream.read_to_end(&mut out)).await?;
    Ok(out)
}

// The network alone.

#[tokio::test(start_paused = true)]
async fn a_fin_is_read_as_the_end_of_the_stream_after_the_bytes_before_it() {
    let net = SimNet::new();
    let listener = net.bind("127.0.0.1", 0).unwrap();
    let mut client = net.dial("127.0.0.1", listener.port()).unwrap();
    let (mut server, peer) = bounded("accept", listener.accept()).await.unwrap();
    assert_eq!(peer.port(), client.local_port());

    server.write_all(b"hello").await.unwrap();
    server.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await.unwrap(), b"hello");
    let late = server.write(b"more").await.unwrap_err();
    assert_eq!(late.kind(), io::ErrorKind::BrokenPipe);

    // The other way still works: a half-closed connection is open.
    client.write_all(b"ping").await.unwrap();
    let mut ping = [0; 4];
    bounded("read", server.read_exact(&mut ping)).await.unwrap();
    assert_eq!(&ping, b"ping");
}

#[tokio::test(start_paused = true)]
async fn a_client_half_close_is_its_close_and_its_drop_is_the_end_of_the_stream() {
    let net = SimNet::new();
    let listener = net.bind("127.0.0.1", 0).unwrap();
    let tally = listener.tally();
    let mut client = net.dial("127.0.0.1", listener.port()).unwrap();
    let (mut server, _) = bounded("accept", listener.accept()).await.unwrap();

    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut server).await.unwrap(), b"request");
    assert_eq!(counts(&tally), (1, 1, 1), "shut down: closed, still alive");
    server.write_all(b"answer").await.unwrap();
    let mut answer = [0; 6];
    bounded("read", client.read_exact(&mut answer))
        .await
        .unwrap();
    assert_eq!(&answer, b"answer");

    drop(client);
    assert_eq!(counts(&tally), (1, 0, 1), "dropped: gone, closed once");
    assert!(server.client_dropped());
    let late = server.write(b"x").await.unwrap_err();
    assert_eq!(late.kind(), io::ErrorKind::BrokenPipe);

    // A client that just drops is seen as the end of the stream.
    let client = net.dial("127.0.0.1", listener.port()).unwrap();
    let (mut server, _) = bounded("accept", listener.accept()).await.unwrap();
    drop(client);
    assert_eq!(read_to_end(&mut server).await.unwrap(), b"");
    assert_eq!(counts(&tally), (2, 0, 2));
    assert_eq!(counts(&net.tally()), (2, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn a_reset_fails_both_ends_once_the_client_read_what_reached_it() {
    let net = SimNet::new();
    let listener = net.bind("127.0.0.1", 0).unwrap();
    let mut client = net.dial("127.0.0.1", listener.port()).unwrap();
    let (mut server, _) = bounded("accept", listener.accept()).await.unwrap();
    server.write_all(b"reached").await.unwrap();
    client.write_all(b"never read").await.unwrap();

    server.reset();
    // What reached the client is in its receive buffer, as a TCP receiver's: read first.
    let mut buf = [0; 16];
    let n = client.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"reached");
    let read = client.read(&mut buf).await.unwrap_err();
    assert_eq!(read.kind(), io::ErrorKind::ConnectionReset);
    let write = client.write(b"x").await.unwrap_err();
    assert_eq!(write.kind(), io::ErrorKind::ConnectionReset);
    // What the client sent is lost with the server's receive buffer.
    let server_read = server.read(&mut buf).await.unwrap_err();
    assert_eq!(server_read.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test(start_paused = true)]
async fn a_small_pipe_holds_the_writer_back_until_the_reader_reads() {
    let net = SimNet::with_buffers(Buffers {
        to_server: 4,
        to_client: 8,
    });
    let listener = net.bind("127.0.0.1", 0).unwrap();
    let mut client = net.dial("127.0.0.1", listener.port()).unwrap();
    let (mut server, _) = bounded("accept", listener.accept()).await.unwrap();

    let offer = stage::body(100);
    assert_eq!(server.write(&offer).await.unwrap(), 8, "what fits, no more");
    assert!(
        blocked(server.write(&offer[8..])).await,
        "a full pipe waits"
    );
    assert_eq!(server.written(), 8);
    let mut first = [0; 5];
    client.read_exact(&mut first).await.unwrap();
    assert_eq!(server.write(&offer[8..]).await.unwrap(), 5, "room for 5");
    assert_eq!(server.written(), 13);

    // The other direction has its own capacity.
    assert_eq!(client.write(b"abcdefgh").await.unwrap(), 4);
    assert!(blocked(client.write(b"efgh")).await);

    // The whole offer goes through as the client reads it.
    let (wrote, read) = tokio::join!(
        async {
            server.write_all(&offer[13..]).await.unwrap();
            server.shutdown().await.unwrap();
        },
        read_to_end(&mut client)
    );
    let () = wrote;
    let mut whole = first.to_vec();
    whole.extend(read.unwrap());
    assert_eq!(whole, offer);
}

/// A connection whose server writes `body(16)` in one `write_all`, then shuts down, with
/// `fault` scheduled after 6 bytes; what the client read (or the error), and the server's
/// write's result.
async fn with_fault(fault: Fault) -> (io::Result<Vec<u8>>, io::Result<()>) {
    let net = SimNet::new();
    let listener = net.bind("127.0.0.1", 0).unwrap();
    net.schedule("127.0.0.1", listener.port(), 0, 6, fault);
    let mut client = net.dial("127.0.0.1", listener.port()).unwrap();
    let (mut server, _) = bounded("accept", listener.accept()).await.unwrap();
    let wrote = async {
        server.write_all(&stage::body(16)).await?;
        server.shutdown().await
    }
    .await;
    let mut read = Vec::new();
    let got = match tokio::time::timeout(BOUND, client.read_to_end(&mut read)).await {
        Ok(Ok(_)) => Ok(read),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, hex(&read))),
    };
    (got, wrote)
}

fn hex(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(start_paused = true)]
async fn each_scheduled_fault_strikes_at_its_byte() {
    let whole = stage::body(16);

    let (read, wrote) = with_fault(Fault::Reset).await;
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(wrote.unwrap_err().kind(), io::ErrorKind::ConnectionReset);

    let (read, wrote) = with_fault(Fault::HalfClose).await;
    assert_eq!(
        read.unwrap(),
        &whole[..6],
        "the end of the stream at byte 6"
    );
    wrote.expect("the server is not told: its later bytes vanish");

    let (read, wrote) = with_fault(Fault::Stall).await;
    let stalled = read.unwrap_err();
    assert_eq!(stalled.kind(), io::ErrorKind::TimedOut);
    assert_eq!(
        stalled.to_string(),
        hex(&whole[..6]),
        "6 bytes, then nothing"
    );
    wrote.expect("the pipe had room for the rest");

    let (read, wrote) = with_fault(Fault::Garbage(b"%%".to_vec())).await;
    let mut garbled = whole[..6].to_vec();
    garbled.extend_from_slice(b"%%");
    garbled.extend_from_slice(&whole[6..]);
    assert_eq!(read.unwrap(), garbled);
    wrote.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stall_fills_the_pipe_and_then_holds_the_server_back() {
    let net = SimNet::with_buffers(Buffers {
        to_server: 64,
        to_client: 32,
    });
    let listener = net.bind("127.0.0.1", 0).unwrap();
    let mut client = net.dial("127.0.0.1", listener.port()).unwrap();
    let (mut server, _) = bounded("accept", listener.accept()).await.unwrap();
    server.schedule(10, Fault::Stall);
    let offer = stage::body(1000);
    let mut sent = 0;
    while let Ok(Ok(n)) = tokio::time::timeout(BOUND, server.write(&offer[sent..])).await {
        sent += n;
    }
    assert_eq!(sent, 32, "the pipe's capacity, then the server waits");
    let mut got = vec![0; 10];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, &offer[..10]);
    assert!(blocked(client.read_u8()).await, "nothing past byte 10");
    // The 10 bytes read made room, which the server fills; what it wrote is not delivered.
    assert_eq!(server.write(&offer[sent..]).await.unwrap(), 10);
    assert!(
        blocked(server.write(&offer[sent + 10..])).await,
        "the pipe is full again"
    );
    assert!(blocked(client.read_u8()).await, "and nothing is delivered");
}

#[tokio::test(start_paused = true)]
async fn faults_are_scheduled_per_connection() {
    let net = SimNet::new();
    let listener = net.bind("127.0.0.1", 0).unwrap();
    net.schedule("127.0.0.1", listener.port(), 1, 0, Fault::Reset);
    for (n, reset) in [(0, false), (1, true), (2, false)] {
        let mut client = net.dial("127.0.0.1", listener.port()).unwrap();
        let (mut server, _) = bounded("accept", listener.accept()).await.unwrap();
        let wrote = server.write_all(b"hi").await;
        let mut buf = [0; 2];
        let read = client.read_exact(&mut buf).await;
        assert_eq!(wrote.is_err(), reset, "connection {n}");
        assert_eq!(read.is_err(), reset, "connection {n}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_connect_where_nothing_listens_is_refused() {
    let net = SimNet::new();
    let refused = net.dial("127.0.0.1", 80).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    let listener = net.bind("server.test", 80).unwrap();
    assert_eq!(
        net.bind("server.test", 80).unwrap_err().kind(),
        io::ErrorKind::AddrInUse
    );
    assert!(net.dial("server.test", 80).is_ok(), "a name is a host too");
    assert!(listener.local_addr().is_err(), "but not an IP address");
    drop(listener);
    let refused = net.dial("server.test", 80).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

    // Through the client: a typed error.
    let session = session_on(&net);
    let error = bounded("data", session.data(get("http://127.0.0.1:81/".into())))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::ConnectionRefused { addr } if addr == "127.0.0.1:81"),
        "{error}"
    );
    assert_eq!(net.tally().opened(), 1, "only the connect that was taken");
}

#[tokio::test(start_paused = true)]
async fn the_counts_are_kept_per_listener_per_group_and_per_network() {
    let net = SimNet::new();
    let group = Tally::new();
    let a = net.bind_in("127.0.0.1", 0, Some(&group)).unwrap();
    let b = net.bind_in("127.0.0.1", 0, Some(&group)).unwrap();
    let c = net.bind("127.0.0.2", 0).unwrap();
    assert_ne!(a.port(), b.port());
    let ends: Vec<_> = [&a, &b, &b, &c]
        .iter()
        .map(|l| net.dial(l.host(), l.port()).unwrap())
        .collect();
    assert_eq!(counts(&a.tally()), (1, 1, 0));
    assert_eq!(counts(&b.tally()), (2, 2, 0));
    assert_eq!(counts(&group), (3, 3, 0));
    assert_eq!(counts(&net.tally()), (4, 4, 0));
    drop(ends);
    assert_eq!(counts(&group), (3, 0, 3));
    assert_eq!(counts(&c.tally()), (1, 0, 1));
    assert_eq!(counts(&net.tally()), (4, 0, 4));
}

// The stage over the network, with the real client.

async fn sim_stage(net: &SimNet) -> Stage {
    Stage::builder().network(net).start().await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_get_through_the_stage_on_the_network() {
    let net = SimNet::new();
    let stage = sim_stage(&net).await;
    assert!(stage.url("/x").starts_with("http://127.0.0.1:"));
    let session = session_on(&net);
    for _ in 0..2 {
        let response = bounded("data", session.data(get(stage.url("/bytes/100000"))))
            .await
            .unwrap();
        assert_eq!(response.body(), &Bytes::from(stage::body(100_000)));
    }
    assert_eq!((stage.accepted(), stage.requests()), (1, 2), "kept alive");
    assert_eq!(stage.client_ends_open(), Some(1), "pooled");
    assert_eq!(stage.body_bytes_written(), 200_000);
}

#[tokio::test(start_paused = true)]
async fn a_held_exchange_reset_by_the_stage_fails_the_task_and_frees_the_connection() {
    let net = SimNet::new();
    let stage = sim_stage(&net).await;
    let session = session_on(&net);
    let fetch = tokio::spawn({
        let (session, url) = (session.clone(), stage.url("/hold/r"));
        async move { session.data(get(url)).await }
    });
    let held = bounded("held", stage.held("r", BOUND)).await.unwrap();
    held.head(200, false, Some(1000)).await.unwrap();
    held.send(100).await.unwrap();
    let liveness = held.liveness();
    held.reset().await.unwrap();
    assert!(!liveness.is_open());
    let error = bounded("the fetch", fetch).await.unwrap().unwrap_err();
    assert!(
        matches!(error, Error::ConnectionReset | Error::Io(_)),
        "{error}"
    );
    assert_eq!((stage.accepted(), stage.closed()), (1, 1));
    assert_eq!(
        stage.client_ends_open(),
        Some(0),
        "R5: the failed task's end is dropped by its completion"
    );
}

#[tokio::test(start_paused = true)]
async fn a_raw_stream_reads_the_offer_and_its_end() {
    let net = SimNet::new();
    let stage = Stage::builder()
        .network(&net)
        .send_buffer(1024)
        .start()
        .await
        .unwrap();
    let offer = stage
        .listen_raw(RawScript::offer(50_000).then(RawEnding::Close))
        .await
        .unwrap();
    let session = session_on(&net);
    let stream = session.stream_task("127.0.0.1", offer.port()).unwrap();
    stream.resume();
    let mut read = Vec::new();
    while let Some(bytes) = bounded("read", stream.read_some(1, 8192)).await.unwrap() {
        read.extend_from_slice(&bytes);
    }
    assert_eq!(read, stage::body(50_000));
    stream.close_write();
    bounded("the stream's end", stream.result()).await.unwrap();
    assert_eq!((stage.raw_accepted(), stage.raw_closed()), (1, 1));
    assert_eq!(stage.raw_bytes_written(), 50_000);
    assert_eq!(stage.client_ends_open(), Some(0));

    // A held raw connection: the test drives it.
    let held_at = stage.listen_raw(RawScript::hold("h")).await.unwrap();
    let stream = session.stream_task("127.0.0.1", held_at.port()).unwrap();
    stream.resume();
    bounded("write", stream.write_all(b"hello")).await.unwrap();
    let held = bounded("held", stage.held_raw("h", BOUND)).await.unwrap();
    assert!(bounded("received", held.wait_received(5, BOUND)).await);
    assert_eq!(held.received(), b"hello");
    held.send(7).await.unwrap();
    let got = bounded("read", stream.read_some(7, 7)).await.unwrap();
    assert_eq!(got.as_deref(), Some(&stage::body(7)[..]));
    held.reset().await.unwrap();
    let after = bounded("read after the reset", stream.read_some(1, 1)).await;
    assert!(after.is_err(), "{after:?}");
}

#[tokio::test(start_paused = true)]
async fn a_websocket_echoes_and_closes() {
    let net = SimNet::new();
    let stage = sim_stage(&net).await;
    let session = session_on(&net);
    let ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    let hello = Message::Text("hello".into());
    bounded("send", ws.send(hello.clone())).await.unwrap();
    assert_eq!(bounded("receive", ws.receive()).await.unwrap(), hello);
    ws.cancel_with(1000, "done").unwrap();
    bounded("the websocket's end", ws.result()).await.unwrap();
    assert_eq!(stage.ws_upgrades(), 1);
    assert_eq!(stage.ws_messages_received(), 1);
    assert_eq!(stage.ws_close_frames_received(), 1);
    assert!(bounded("closed", stage.wait_all_closed(BOUND)).await);
    assert_eq!(stage.client_ends_open(), Some(0));

    // A held websocket: the stage closes it with a code.
    let ws = session
        .websocket_task(stage.ws_url("/ws/hold/w"), &[])
        .unwrap();
    ws.resume();
    let held = bounded("held", stage.held_ws("w", BOUND)).await.unwrap();
    held.send_text("from the stage").await.unwrap();
    let got = bounded("receive", ws.receive()).await.unwrap();
    assert_eq!(got, Message::Text("from the stage".into()));
    held.close(4000, "bye").await.unwrap();
    let ended = bounded("the websocket's end", ws.result()).await;
    assert!(ended.is_ok(), "{ended:?}");
    assert!(bounded("closed", stage.wait_all_closed(BOUND)).await);
    assert_eq!(stage.client_ends_open(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn the_network_sees_the_clients_close_when_the_session_is_invalidated() {
    let net = SimNet::new();
    let stage = sim_stage(&net).await;
    let tally = stage.tally().unwrap();
    let session = session_on(&net);
    bounded("data", session.data(get(stage.url("/bytes/10"))))
        .await
        .unwrap();
    assert_eq!(counts(&tally), (1, 1, 0), "pooled, open");
    assert_eq!(client_sockets_of(&stage.peers()).unwrap(), 1);

    session.finish_tasks_and_invalidate();
    bounded("invalidation", session.invalidated()).await;
    // At the moment of the promise (R4), no grace period.
    assert_eq!(counts(&tally), (1, 0, 1), "R4: the client's end is closed");
    assert_eq!(client_sockets_of(&stage.peers()).unwrap(), 0);
    assert!(bounded("the stage's count", stage.wait_all_closed(BOUND)).await);
    assert_eq!(stage.closed(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_scripted_endings_play_over_the_network() {
    let net = SimNet::new();
    let stage = sim_stage(&net).await;
    let config = Configuration::builder()
        .transport(net.clone())
        .request_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let fetch = |path: &str| session.data(get(stage.url(path)));

    let reset = bounded("reset", fetch("/bytes/1000?reset_after=100")).await;
    assert!(
        matches!(reset, Err(Error::ConnectionReset | Error::Io(_))),
        "{reset:?}"
    );
    let closed = bounded("close", fetch("/bytes/1000?close_after=100")).await;
    assert!(closed.is_err(), "a body cut short: {closed:?}");
    let garbage = bounded("garbage", fetch("/bytes/10?malformed=status")).await;
    assert!(
        matches!(garbage, Err(Error::MalformedResponse(_))),
        "{garbage:?}"
    );
    let silent = bounded("no response", fetch("/bytes/10?no_response=1")).await;
    assert!(silent.is_err(), "{silent:?}");
    let started = tokio::time::Instant::now();
    let stalled = bounded("stall", fetch("/bytes/1000?stall_headers=1")).await;
    assert!(
        matches!(stalled, Err(Error::TimedOut(leakproof::Timeout::Request))),
        "{stalled:?}"
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "on schedule, exactly"
    );
    let whole = bounded("whole", fetch("/bytes/10")).await.unwrap();
    assert_eq!(whole.body().len(), 10, "and the stage serves on");

    assert_eq!(stage.client_ends_open(), Some(1), "only the pooled one");
    assert!(
        bounded(
            "closed",
            stage.wait_until(|s| s.closed() == s.accepted() - 1, BOUND)
        )
        .await
    );
}

#[tokio::test(start_paused = true)]
async fn tls_runs_over_the_network() {
    let ca = tls_ca::TestCa::new("leakproof test CA");
    let cert = ca.server();
    let net = SimNet::new();
    let stage = Stage::builder()
        .network(&net)
        .tls(cert.chain, cert.key)
        .start()
        .await
        .unwrap();
    let config = Configuration::builder()
        .transport(net.clone())
        .add_root_certificate(ca.root())
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let response = bounded("https", session.data(get(stage.https_url("/bytes/5000"))))
        .await
        .unwrap();
    assert_eq!(response.body(), &Bytes::from(stage::body(5000)));
    let ws = session
        .websocket_task(stage.wss_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    let hello = Message::Binary(Bytes::from_static(b"over tls"));
    bounded("send", ws.send(hello.clone())).await.unwrap();
    assert_eq!(bounded("receive", ws.receive()).await.unwrap(), hello);
    ws.cancel_with(1000, "done").unwrap();
    bounded("the websocket's end", ws.result()).await.unwrap();
    session.finish_tasks_and_invalidate();
    bounded("invalidation", session.invalidated()).await;
    assert_eq!(stage.client_ends_open(), Some(0));
    assert!(bounded("closed", stage.wait_all_closed(BOUND)).await);
    assert_eq!(stage.accepted(), 2);
}

// Determinism.

/// A scripted run: pooled GETs, a paced body, a held exchange driven step by step, a timeout
/// on a stall, a raw echo; each event written down with the simulated time and the counts.
async fn scripted_run() -> Vec<String> {
    let start = tokio::time::Instant::now();
    let net = SimNet::new();
    let stage = Stage::builder().network(&net).log().start().await.unwrap();
    let echo = stage.listen_raw(RawScript::echo()).await.unwrap();
    let config = Configuration::builder()
        .transport(net.clone())
        .request_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let mut trace = Vec::new();
    let mut note = |what: String, stage: &Stage| {
        trace.push(format!(
            "{:>8?} {what}: accepted {} closed {} open ends {:?} written {}",
            start.elapsed(),
            stage.accepted(),
            stage.closed(),
            stage.client_ends_open(),
            stage.body_bytes_written(),
        ));
    };
    for path in [
        "/bytes/1000",
        "/bytes/300000?chunked=1&chunk=4096&pace_ms=7",
        "/bytes/10?header_delay_ms=250",
    ] {
        let got = bounded("data", session.data(get(stage.url(path)))).await;
        note(format!("{path}: {:?}", got.map(|r| r.body().len())), &stage);
    }
    let fetch = tokio::spawn({
        let (session, url) = (session.clone(), stage.url("/hold/k"));
        async move { session.data(get(url)).await.map(|r| r.body().len()) }
    });
    let held = bounded("held", stage.held("k", BOUND)).await.unwrap();
    held.head(200, true, None).await.unwrap();
    for n in [10, 20, 30] {
        tokio::time::sleep(Duration::from_millis(n)).await;
        held.send(n).await.unwrap();
    }
    held.end().await.unwrap();
    let got = bounded("held fetch", fetch).await.unwrap();
    note(format!("held: {got:?}"), &stage);
    let stalled = bounded(
        "stall",
        session.data(get(stage.url("/bytes/100?stall_after=5"))),
    )
    .await;
    note(
        format!("stall: {:?}", stalled.map(|r| r.body().len())),
        &stage,
    );
    let stream = session.stream_task("127.0.0.1", echo.port()).unwrap();
    stream.resume();
    bounded("write", stream.write_all(b"echo me"))
        .await
        .unwrap();
    let read = bounded("read", stream.read_some(7, 7)).await;
    note(format!("echo: {read:?}"), &stage);
    session.invalidate_and_cancel();
    bounded("invalidation", session.invalidated()).await;
    note("invalidated".into(), &stage);
    for seen in stage.log() {
        trace.push(format!(
            "{} {} {:?}",
            seen.method, seen.target, seen.headers
        ));
    }
    trace
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn the_same_scripted_run_twice_gives_the_same_trace() {
    let first = paused_runtime().block_on(scripted_run());
    let second = paused_runtime().block_on(scripted_run());
    assert_eq!(first, second);
    let text = first.join("\n");
    assert!(text.contains("TimedOut"), "the stall timed out:\n{text}");
    assert!(text.contains("held: Ok(60)"), "{text}");
    assert!(text.contains("open ends Some(0)"), "{text}");
}

// Why the simulated tier is not on turmoil: the cost of a long timer.

/// A future that counts its polls.
struct Polls<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicU64>,
}

impl<F: Future> Future for Polls<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

#[test]
fn a_sixty_second_timer_costs_turmoil_a_step_a_millisecond_and_the_paused_clock_two_polls() {
    let timer = Duration::from_secs(60);

    let polls = Arc::new(AtomicU64::new(0));
    let sleeping = Polls {
        inner: Box::pin(async move { tokio::time::sleep(timer).await }),
        polls: Arc::clone(&polls),
    };
    paused_runtime().block_on(sleeping);
    let paused_polls = polls.load(Ordering::Relaxed);

    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .build();
    sim.client("sleeper", async move {
        tokio::time::sleep(timer).await;
        Ok(())
    });
    let mut steps = 0_u64;
    while !sim.step().unwrap() {
        steps += 1;
    }

    assert_eq!(paused_polls, 2, "the paused clock jumps to the deadline");
    assert!(
        steps >= 60_000,
        "turmoil steps its 1 ms tick: {steps} steps for {timer:?}"
    );
}
