//! The stage against raw sockets: each scripted behaviour, the held exchange, and the counts
//! the suite takes as its connection witness.

use std::io;
use std::time::{Duration, Instant};

use leakproof_check::stage::{Held, Stage, body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Every await that touches a socket is bounded by this.
const LIMIT: Duration = Duration::from_secs(5);
/// Long enough for loopback bytes to arrive, if any were sent.
const QUIET: Duration = Duration::from_millis(150);

async fn bounded<F: Future>(fut: F) -> F::Output {
    timeout(LIMIT, fut)
        .await
        .expect("the socket did not answer within 5 s")
}

/// A raw HTTP/1.1 client: just enough parsing to check what the stage sent.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        let found = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        found.map(|(_, value)| value.as_str())
    }
}

impl Client {
    async fn connect(stage: &Stage) -> Client {
        let stream = bounded(TcpStream::connect(stage.addr())).await.unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        bounded(self.stream.write_all(bytes)).await.unwrap();
    }

    async fn get(&mut self, target: &str) {
        self.send(format!("GET {target} HTTP/1.1\r\nhost: stage\r\n\r\n").as_bytes())
            .await;
    }

    /// Reads more into `buf`; the byte count, 0 at the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        bounded(self.stream.read_buf(&mut self.buf)).await
    }

    async fn head(&mut self) -> Head {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = response.parse(&self.buf).unwrap() {
                let head = Head {
                    status: response.code.unwrap(),
                    headers: response
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                self.buf.drain(..n);
                return head;
            }
            assert_ne!(
                self.fill().await.unwrap(),
                0,
                "closed before the head ended"
            );
        }
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert_ne!(self.fill().await.unwrap(), 0, "closed before {n} bytes");
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return line;
            }
            assert_ne!(self.fill().await.unwrap(), 0, "closed within a line");
        }
    }

    /// The next chunk's data; `None` for the last chunk.
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        let size = usize::from_str_radix(&self.line().await, 16).expect("a hex chunk size");
        if size == 0 {
            assert_eq!(self.line().await, "", "no trailers");
            return None;
        }
        let data = self.exact(size).await;
        assert_eq!(self.exact(2).await, b"\r\n");
        Some(data)
    }

    async fn response(&mut self) -> (Head, Vec<u8>) {
        let head = self.head().await;
        let body = match head.header("content-length") {
            Some(len) => self.exact(len.parse().unwrap()).await,
            None => {
                let mut body = Vec::new();
                while let Some(chunk) = self.chunk().await {
                    body.extend(chunk);
                }
                body
            }
        };
        (head, body)
    }

    /// Reads until the stream ends: what arrived, and how it ended (`Ok` for a FIN).
    async fn rest(&mut self) -> (Vec<u8>, io::Result<()>) {
        let ended = loop {
            match self.fill().await {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        };
        (std::mem::take(&mut self.buf), ended)
    }

    /// Whether nothing arrives, and the stream stays open, for a while.
    async fn quiet(&mut self) -> bool {
        timeout(QUIET, self.stream.read_buf(&mut self.buf))
            .await
            .is_err()
    }
}

async fn stage() -> Stage {
    Stage::start().await.unwrap()
}

#[tokio::test]
async fn bytes_come_with_a_content_length_and_the_pattern() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/100000").await;
    let (head, got) = client.response().await;

    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("100000"));
    assert_eq!(got, body(100_000));
    assert!(
        stage
            .wait_until(|s| s.body_bytes_written() == 100_000, LIMIT)
            .await
    );
    assert_eq!(
        stage.url("/bytes/1"),
        format!("http://{}/bytes/1", stage.addr())
    );
}

#[tokio::test]
async fn chunked_sends_one_chunk_per_write() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/25?chunked=1&chunk=10&status=203").await;
    let head = client.head().await;
    let chunks = [
        client.chunk().await,
        client.chunk().await,
        client.chunk().await,
    ];

    assert_eq!(head.status, 203);
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert_eq!(chunks.map(|c| c.unwrap().len()), [10, 10, 5]);
    assert_eq!(client.chunk().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_two_requests_on_one_socket() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/10").await;
    let first = client.response().await.1;
    client.get("/bytes/20?chunked=1").await;
    let second = client.response().await.1;

    assert_eq!((first, second), (body(10), body(20)));
    assert_eq!(
        (stage.accepted(), stage.requests(), stage.open()),
        (1, 2, 1)
    );
}

#[tokio::test]
async fn keep_alive_0_closes_after_the_response() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/10?keep_alive=0").await;
    let (head, got) = client.response().await;
    let (after, ended) = client.rest().await;

    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(got, body(10));
    assert!(after.is_empty() && ended.is_ok());
    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
}

#[tokio::test]
async fn a_client_closing_is_counted_closed_once() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;
    client.get("/bytes/10").await;
    client.response().await;
    assert_eq!(stage.open(), 1);

    drop(client);

    assert!(stage.wait_all_closed(LIMIT).await);
    tokio::time::sleep(QUIET).await;
    assert_eq!((stage.accepted(), stage.closed()), (1, 1));
}

#[tokio::test]
async fn a_client_resetting_with_unread_bytes_is_counted_closed() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;
    client.get("/bytes/1000000?stall_after=100000").await;
    client.head().await;

    // Unread bytes in its receive buffer: the close is a reset (DESIGN.md, pitfalls).
    drop(client);

    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
}

#[tokio::test]
async fn reset_after_resets_the_connection() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/100000?reset_after=1000").await;
    client.head().await;
    let (_, ended) = client.rest().await;

    assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
}

#[tokio::test]
async fn close_after_ends_short_of_the_content_length() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/1000?close_after=100").await;
    let head = client.head().await;
    let (got, ended) = client.rest().await;

    assert_eq!(head.header("content-length"), Some("1000"));
    assert_eq!(got, body(100));
    assert!(ended.is_ok());
    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
}

#[tokio::test]
async fn no_response_closes_without_a_byte() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/10?no_response=1").await;
    let (got, ended) = client.rest().await;

    assert!(got.is_empty() && ended.is_ok());
    assert_eq!(stage.requests(), 1);
    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
}

#[tokio::test]
async fn malformed_status_is_not_http_and_waits_for_the_client() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/10?malformed=status").await;
    client.fill().await.unwrap();
    let mut headers = [httparse::EMPTY_HEADER; 4];

    assert!(
        httparse::Response::new(&mut headers)
            .parse(&client.buf)
            .is_err()
    );
    assert!(client.quiet().await, "the stage holds the socket");
    drop(client);
    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
}

#[tokio::test]
async fn malformed_chunk_has_a_size_that_is_not_hex() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    client.get("/bytes/10?malformed=chunk").await;
    let head = client.head().await;

    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert!(usize::from_str_radix(&client.line().await, 16).is_err());
}

#[tokio::test]
async fn stalls_hold_the_socket_until_the_client_closes() {
    let stage = stage().await;
    let mut headers_stalled = Client::connect(&stage).await;
    let mut body_stalled = Client::connect(&stage).await;

    headers_stalled.get("/bytes/10?stall_headers=1").await;
    body_stalled.get("/bytes/1000?stall_after=300").await;
    body_stalled.head().await;
    let got = body_stalled.exact(300).await;

    assert_eq!(got, body(300));
    assert!(headers_stalled.quiet().await && body_stalled.quiet().await);
    assert_eq!(stage.open(), 2);
    drop((headers_stalled, body_stalled));
    assert!(stage.wait_all_closed(LIMIT).await);
    assert_eq!(stage.closed(), 2);
}

#[tokio::test]
async fn header_delay_and_pace_spread_the_response() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;
    let start = Instant::now();

    client
        .get("/bytes/5000?chunk=1000&pace_ms=20&header_delay_ms=50")
        .await;
    let (_, got) = client.response().await;

    assert_eq!(got, body(5000));
    assert!(start.elapsed() >= Duration::from_millis(50 + 4 * 20));
}

#[tokio::test]
async fn the_stage_refuses_what_it_cannot_play() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;
    let mut garbage = Client::connect(&stage).await;

    client.get("/nowhere").await;
    let unknown = client.response().await.0.status;
    client.get("/bytes/10?chunk=0").await;
    let bad_query = client.response().await.0.status;
    client.get("/bytes/10?stall_after=1&reset_after=1").await;
    let two_endings = client.response().await.0.status;
    garbage.send(b"\x00\x01 not http\r\n\r\n").await;
    let not_http = garbage.head().await.status;

    assert_eq!(
        (unknown, bad_query, two_endings, not_http),
        (404, 400, 400, 400)
    );
    assert!(
        garbage.rest().await.1.is_ok(),
        "a request that is not HTTP is closed"
    );
    client.get("/bytes/3").await;
    assert_eq!(
        client.response().await.1,
        body(3),
        "a refusal keeps the connection"
    );
}

#[tokio::test]
async fn uploads_are_counted_and_the_connection_kept() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;

    let upload = vec![7u8; 70_000];
    client
        .send(b"POST /bytes/2 HTTP/1.1\r\nhost: stage\r\ncontent-length: 70000\r\n\r\n")
        .await;
    client.send(&upload).await;
    let first = client.response().await.1;
    client
        .send(b"PUT /bytes/3 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    client.send(b"bb8\r\n").await;
    client.send(&upload[..3000]).await;
    client
        .send(b"\r\n5;ext=1\r\nhello\r\n0\r\ntrailer: x\r\n\r\n")
        .await;
    let second = client.response().await.1;

    assert_eq!((first, second), (body(2), body(3)));
    assert_eq!(stage.request_body_bytes(), 73_005);
    assert_eq!((stage.accepted(), stage.requests()), (1, 2));
}

#[tokio::test]
async fn a_held_exchange_is_driven_step_by_step() {
    let stage = stage().await;
    let mut client = Client::connect(&stage).await;
    client.get("/hold/a?x=1").await;
    let held = stage.held("a", LIMIT).await.expect("the request is parked");
    assert_eq!((held.method(), held.target()), ("GET", "/hold/a?x=1"));

    held.head(200, true, None).await.unwrap();
    let head = client.head().await;
    held.send(5).await.unwrap();
    let first = client.chunk().await;
    held.send(7).await.unwrap();
    let second = client.chunk().await;
    held.end().await.unwrap();
    let last = client.chunk().await;

    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert_eq!(first, Some(body(5)));
    assert_eq!(second.as_deref(), Some(&body(12)[5..]));
    assert_eq!(last, None);
    client.get("/bytes/3").await;
    assert_eq!(
        client.response().await.1,
        body(3),
        "the connection is kept alive"
    );
    assert_eq!((stage.accepted(), stage.requests()), (1, 2));
}

/// Parks a request to `/hold/KEY` on a new connection and takes it.
async fn hold(stage: &Stage, key: &str) -> (Client, Held) {
    let mut client = Client::connect(stage).await;
    client.get(&format!("/hold/{key}")).await;
    let held = stage.held(key, LIMIT).await.expect("the request is parked");
    (client, held)
}

#[tokio::test]
async fn a_held_exchange_ends_closes_or_resets_with_the_close_counted() {
    let stage = stage().await;
    let (mut ended, held) = hold(&stage, "end").await;
    held.head(200, false, Some(10)).await.unwrap();
    held.send(10).await.unwrap();
    held.end_and_close().await.unwrap();
    assert_eq!(stage.closed(), 1, "counted before end_and_close returns");
    ended.head().await;
    assert_eq!(ended.rest().await.0, body(10));

    let (mut reset, held) = hold(&stage, "reset").await;
    held.head(200, false, Some(10)).await.unwrap();
    held.reset().await.unwrap();
    assert_eq!(stage.closed(), 2);
    let (_, how) = reset.rest().await;
    assert_eq!(how.unwrap_err().kind(), io::ErrorKind::ConnectionReset);

    let (mut closed, held) = hold(&stage, "close").await;
    held.close().await.unwrap();
    assert_eq!(stage.closed(), 3);
    assert!(closed.rest().await.1.is_ok());
}

#[tokio::test]
async fn a_held_exchange_sends_garbage_or_closes_when_dropped() {
    let stage = stage().await;
    let (mut garbled, held) = hold(&stage, "garbage").await;
    held.head(200, true, None).await.unwrap();
    held.malformed().await.unwrap();
    garbled.head().await;
    assert!(usize::from_str_radix(&garbled.line().await, 16).is_err());
    assert_eq!(stage.open(), 1, "held until the client closes");

    let (mut abandoned, held) = hold(&stage, "dropped").await;
    drop(held);
    let (got, how) = abandoned.rest().await;

    assert!(got.is_empty() && how.is_ok());
    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
}

#[tokio::test]
async fn a_held_exchange_reports_misuse_and_a_gone_client_without_panicking() {
    let stage = stage().await;
    assert!(
        stage
            .held("never", Duration::from_millis(20))
            .await
            .is_none()
    );
    let (client, held) = hold(&stage, "gone").await;

    let early = held.send(1).await.unwrap_err();
    held.head(200, false, None).await.unwrap();
    let twice = held.head(200, false, None).await.unwrap_err();
    drop(client);
    assert!(stage.wait_until(|s| s.closed() == 1, LIMIT).await);
    let after = held.send(1).await.unwrap_err();

    assert_eq!(early.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(twice.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(after.kind(), io::ErrorKind::NotConnected);
}

#[tokio::test]
async fn dropping_the_stage_closes_its_connections() {
    let stage = stage().await;
    let mut idle = Client::connect(&stage).await;
    let mut stalled = Client::connect(&stage).await;
    let (mut parked, _held) = hold(&stage, "parked").await;
    idle.get("/bytes/1").await;
    idle.response().await;
    stalled.get("/bytes/10?stall_headers=1").await;
    assert!(stage.wait_until(|s| s.requests() == 3, LIMIT).await);

    drop(stage);

    for client in [&mut idle, &mut stalled, &mut parked] {
        // A FIN, or a reset if the stage had unread bytes: either way, the end.
        let (got, _) = client.rest().await;
        assert!(got.is_empty());
    }
}

#[tokio::test]
async fn a_small_send_buffer_shows_backpressure() {
    const LEN: u64 = 4 << 20;
    let stage = Stage::builder().send_buffer(4096).start().await.unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = bounded(socket.connect(stage.addr())).await.unwrap();
    let mut client = Client {
        stream,
        buf: Vec::new(),
    };

    client.get(&format!("/bytes/{LEN}")).await;
    tokio::time::sleep(QUIET).await;
    let written_unread = stage.body_bytes_written();
    client.head().await;
    let got = client.exact(LEN as usize).await;

    assert!(
        written_unread < 256 << 10,
        "{written_unread} bytes written to a client that reads nothing"
    );
    assert_eq!(got.len() as u64, LEN);
    assert!(
        stage
            .wait_until(|s| s.body_bytes_written() == LEN, LIMIT)
            .await
    );
}
