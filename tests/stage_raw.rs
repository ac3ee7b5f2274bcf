//! The stage's raw TCP listeners against plain sockets: offers (and their backpressure
//! witness), pacing, echo, the held connection's steps, and the counts.

use std::io;
use std::time::{Duration, Instant};

use leakproof_check::stage::{RawEnding, RawScript, Stage, body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Every await that touches a socket is bounded by this.
const LIMIT: Duration = Duration::from_secs(5);

async fn bounded<F: Future>(fut: F) -> F::Output {
    timeout(LIMIT, fut)
        .await
        .expect("the socket did not answer within 5 s")
}

async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    bounded(TcpStream::connect(addr)).await.unwrap()
}

async fn read_to_end(tcp: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut got = Vec::new();
    bounded(tcp.read_to_end(&mut got)).await?;
    Ok(got)
}

async fn all_closed(stage: &Stage) {
    assert!(
        stage.wait_all_closed(LIMIT).await,
        "{} of {} sockets still open",
        stage.open(),
        stage.accepted()
    );
}

#[tokio::test]
async fn an_offer_to_a_client_that_does_not_read_meets_backpressure() {
    const OFFER: u64 = 8 << 20;
    let stage = Stage::builder()
        .send_buffer(4096)
        .recv_buffer(4096)
        .start()
        .await
        .unwrap();
    let addr = stage.listen_raw(RawScript::offer(OFFER)).await.unwrap();
    let tcp = connect(addr).await;
    assert!(stage.wait_until(|s| s.raw_bytes_written() > 0, LIMIT).await);
    // Give the stage time to write all it can; only buffers fill, then writes wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = stage.raw_bytes_written();
    assert!(
        written < 1 << 20,
        "the stage wrote {written} bytes of {OFFER} to a client that reads nothing"
    );
    assert_eq!(stage.raw_open(), 1);
    // The client closes: the stage sees it even with its write waiting.
    drop(tcp);
    assert!(stage.wait_until(|s| s.raw_closed() == 1, LIMIT).await);
    all_closed(&stage).await;
    assert_eq!((stage.accepted(), stage.closed()), (1, 1));
    assert!(stage.raw_bytes_written() < 1 << 20);
}

#[tokio::test]
async fn an_offer_is_read_whole_then_the_close_is_the_clients() {
    let stage = Stage::start().await.unwrap();
    let addr = stage.listen_raw(RawScript::offer(100_000)).await.unwrap();
    let mut tcp = connect(addr).await;
    // The stage's FIN ends the offer.
    assert_eq!(read_to_end(&mut tcp).await.unwrap(), body(100_000));
    assert_eq!(stage.raw_bytes_written(), 100_000);
    // Its side is still open, reading, until the client closes.
    bounded(tcp.write_all(b"after")).await.unwrap();
    assert!(
        stage
            .wait_until(|s| s.raw_bytes_received() == 5, LIMIT)
            .await
    );
    assert_eq!(stage.open(), 1);
    drop(tcp);
    all_closed(&stage).await;
    assert_eq!(stage.raw_closed(), 1);
}

#[tokio::test]
async fn an_offer_ends_as_scripted() {
    let stage = Stage::start().await.unwrap();
    let closing = RawScript::offer(10).then(RawEnding::Close);
    let mut tcp = connect(stage.listen_raw(closing).await.unwrap()).await;
    assert_eq!(read_to_end(&mut tcp).await.unwrap(), body(10));
    all_closed(&stage).await;

    let resetting = RawScript::offer(10).then(RawEnding::Reset);
    let mut tcp = connect(stage.listen_raw(resetting).await.unwrap()).await;
    assert!(stage.wait_until(|s| s.raw_closed() == 2, LIMIT).await);
    let mut got = vec![0; 10];
    // The bytes may or may not survive the reset; the reset itself is seen.
    let err = loop {
        match bounded(tcp.read(&mut got)).await {
            Ok(n) => assert_ne!(n, 0, "a FIN, not a reset"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);

    let holding = RawScript::offer(10).then(RawEnding::Hold);
    let mut tcp = connect(stage.listen_raw(holding).await.unwrap()).await;
    let mut got = vec![0; 10];
    bounded(tcp.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, body(10));
    // No FIN: the next read waits.
    assert!(
        timeout(Duration::from_millis(100), tcp.read(&mut got))
            .await
            .is_err()
    );
    assert_eq!(stage.raw_open(), 1);
    drop(tcp);
    all_closed(&stage).await;
    assert_eq!(stage.raw_accepted(), 3);
}

#[tokio::test]
async fn a_paced_offer_writes_a_little_at_a_time() {
    let stage = Stage::start().await.unwrap();
    let pause = Duration::from_millis(30);
    let addr = stage
        .listen_raw(RawScript::paced(30, 10, pause))
        .await
        .unwrap();
    let started = Instant::now();
    let mut tcp = connect(addr).await;
    let mut first = vec![0; 30];
    let n = bounded(tcp.read(&mut first)).await.unwrap();
    assert_eq!(&first[..n], &body(10)[..n]);
    assert!(n <= 10, "a paced write of 10 bytes arrived as {n}");
    let mut got = first[..n].to_vec();
    got.extend(read_to_end(&mut tcp).await.unwrap());
    assert_eq!(got, body(30));
    // Two pauses between three writes.
    assert!(started.elapsed() >= 2 * pause, "{:?}", started.elapsed());
    drop(tcp);
    all_closed(&stage).await;
}

#[tokio::test]
async fn echo_writes_back_what_it_reads() {
    let stage = Stage::start().await.unwrap();
    let addr = stage.listen_raw(RawScript::echo()).await.unwrap();
    let mut tcp = connect(addr).await;
    bounded(tcp.write_all(b"hello")).await.unwrap();
    let mut got = [0; 5];
    bounded(tcp.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"hello");
    let big = body(200_000);
    bounded(tcp.write_all(&big)).await.unwrap();
    let mut back = vec![0; big.len()];
    bounded(tcp.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, big);
    // The client is done sending: the stage closes, the client reads the end.
    bounded(tcp.shutdown()).await.unwrap();
    assert!(read_to_end(&mut tcp).await.unwrap().is_empty());
    all_closed(&stage).await;
    assert_eq!(stage.raw_bytes_received(), 200_005);
    assert_eq!(stage.raw_bytes_written(), 200_005);
}

#[tokio::test]
async fn held_steps_drive_the_connection() {
    let stage = Stage::start().await.unwrap();
    let addr = stage.listen_raw(RawScript::hold("a")).await.unwrap();
    let mut tcp = connect(addr).await;
    let held = stage.held_raw("a", LIMIT).await.unwrap();
    let live = held.liveness();

    held.send(5).await.unwrap();
    held.send(5).await.unwrap();
    let mut got = [0; 10];
    bounded(tcp.read_exact(&mut got)).await.unwrap();
    assert_eq!(got[..], body(10)[..]);

    bounded(tcp.write_all(b"abc")).await.unwrap();
    assert!(held.wait_received(3, LIMIT).await);
    assert_eq!(held.received(), b"abc");
    assert_eq!(held.received_len(), 3);

    // A FIN; the connection reads on.
    held.end().await.unwrap();
    assert!(read_to_end(&mut tcp).await.unwrap().is_empty());
    let err = held.send(1).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    bounded(tcp.write_all(b"de")).await.unwrap();
    assert!(held.wait_received(5, LIMIT).await);
    assert_eq!(held.received(), b"abcde");
    assert!(live.is_open());

    // The client closes it.
    drop(tcp);
    all_closed(&stage).await;
    assert!(!live.is_open());
    let err = held.send(1).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    assert_eq!(stage.raw_bytes_written(), 10);
    assert_eq!(stage.raw_bytes_received(), 5);
}

#[tokio::test]
async fn held_close_and_reset_return_once_the_close_is_counted() {
    let stage = Stage::start().await.unwrap();
    let addr = stage.listen_raw(RawScript::hold("b")).await.unwrap();

    let mut tcp = connect(addr).await;
    let held = stage.held_raw("b", LIMIT).await.unwrap();
    held.send(3).await.unwrap();
    held.close().await.unwrap();
    assert_eq!(stage.closed(), 1);
    assert_eq!(read_to_end(&mut tcp).await.unwrap(), body(3));

    let mut tcp = connect(addr).await;
    let held = stage.held_raw("b", LIMIT).await.unwrap();
    held.reset().await.unwrap();
    assert_eq!(stage.closed(), 2);
    let err = read_to_end(&mut tcp).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);

    // Dropping the handle closes the connection.
    let mut tcp = connect(addr).await;
    drop(stage.held_raw("b", LIMIT).await.unwrap());
    assert!(read_to_end(&mut tcp).await.unwrap().is_empty());
    all_closed(&stage).await;
    assert_eq!(stage.raw_closed(), 3);
}

#[tokio::test]
async fn a_held_send_waits_for_the_client_to_read() {
    let stage = Stage::builder()
        .send_buffer(4096)
        .recv_buffer(4096)
        .start()
        .await
        .unwrap();
    let addr = stage.listen_raw(RawScript::hold("c")).await.unwrap();
    let mut tcp = connect(addr).await;
    let held = stage.held_raw("c", LIMIT).await.unwrap();
    let sending = tokio::spawn(async move {
        held.send(4 << 20).await.unwrap();
        held
    });
    // The client reads it all: the send completes.
    let mut got = vec![0; 4 << 20];
    bounded(tcp.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, body(4 << 20));
    let held = bounded(sending).await.unwrap();
    drop(held);
    all_closed(&stage).await;
}
