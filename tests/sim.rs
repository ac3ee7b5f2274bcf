//! The real client in a turmoil simulation (`leakproof_check::sim`): a server host (hyper's
//! server side, counting the connections it sees closed) and a client host running a
//! leakproof `Session` whose transport is the simulated network. Time is the simulation's:
//! every timeout here runs out on the hosts' paused clocks, and no test waits on the wall
//! clock. Each wait inside a host is bounded on the simulated clock, and each simulation by
//! its duration, so a bug fails the run rather than hanging it.

#[path = "support/tls_ca.rs"]
mod tls_ca;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use leakproof::{Configuration, Error, Session, Timeout};
use leakproof_check::sim::{self, Trace, Turmoil, Witness};
use leakproof_check::stage::body;
use tls_ca::TestCa;
use tokio::time::Instant;

/// The server host's name and port.
const SERVER: &str = "server";
const PORT: u16 = 80;

/// The most simulated time a wait inside a host may take.
const PATIENCE: Duration = Duration::from_secs(10);

fn get(path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{SERVER}:{PORT}{path}"))
        .body(())
        .unwrap()
}

/// A session over the simulated network, no delegate (its callbacks would run on a thread of
/// their own, outside the simulation's schedule).
fn session(config: leakproof::ConfigurationBuilder) -> Session {
    let config = config.transport(Turmoil).build().expect("configuration");
    Session::new(config, None)
}

/// A simulation from `seed` with the server host on it.
fn world<'a>(seed: u64, witness: &Witness, trace: &Trace) -> turmoil::Sim<'a> {
    let mut sim = sim::sim(seed, Duration::from_secs(120));
    let (witness, trace) = (witness.clone(), trace.clone());
    sim.host(SERVER, move || {
        sim::serve(PORT, witness.clone(), trace.clone())
    });
    sim
}

/// Invalidate the session and wait for it; then no simulated connection is established on the
/// client host: its ends are closed when `invalidated()` resolves (R4), not some time later.
/// The server host sees `n` connections closed, within the patience on the simulated clock.
async fn server_sees_closed(server: &Witness, n: u64) {
    assert!(
        server.wait_closed(n, PATIENCE).await,
        "the server host saw {} of {} connections closed",
        server.closed(),
        server.accepted()
    );
}

async fn invalidate(session: Session) {
    session.finish_tasks_and_invalidate();
    tokio::time::timeout(PATIENCE, session.invalidated())
        .await
        .expect("invalidated within the patience, on the simulated clock");
    assert_eq!(
        turmoil::established_tcp_stream_count(),
        0,
        "the client host still has a connection established once invalidated() resolved"
    );
    assert!(
        session.resources().is_zero(),
        "the invalidated session holds something: {:?}",
        session.resources()
    );
}

#[test]
fn a_get_completes_and_the_server_sees_its_connection_closed_at_invalidation() {
    let (witness, trace) = (Witness::new(), Trace::new());
    let mut sim = world(1, &witness, &trace);
    let server = witness.clone();
    sim.client("client", async move {
        let session = session(Configuration::builder());
        let response = session.data(get("/bytes/4096")).await?;
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(&response.body()[..], &body(4096)[..]);
        // Read whole and reusable: pooled, still open on both sides (R5).
        assert_eq!((server.accepted(), server.closed()), (1, 0));
        assert_eq!(turmoil::established_tcp_stream_count(), 1);

        invalidate(session).await;
        server_sees_closed(&server, 1).await;
        Ok(())
    });
    sim.run().expect("the simulation");
    assert_eq!((witness.accepted(), witness.closed()), (1, 1));
}

#[test]
fn a_request_timeout_fires_on_the_simulated_clock() {
    let (witness, trace) = (Witness::new(), Trace::new());
    let mut sim = world(2, &witness, &trace);
    let server = witness.clone();
    sim.client("client", async move {
        let timeout = Duration::from_secs(30);
        let session = session(Configuration::builder().request_timeout(timeout));
        let start = Instant::now();
        let result = session.data(get("/stall")).await;
        let waited = start.elapsed();
        assert!(
            matches!(result, Err(Error::TimedOut(Timeout::Request))),
            "a stalled server ends the request with a request timeout: {result:?}"
        );
        // On the simulated clock: no sooner than the timeout, and not much later (the
        // network's latencies and a tick).
        assert!(
            waited >= timeout && waited < timeout + Duration::from_millis(100),
            "the request timed out after {waited:?} of simulated time, not {timeout:?}"
        );
        // The timed-out exchange's connection is closed, not pooled (R12, R5).
        server_sees_closed(&server, 1).await;
        invalidate(session).await;
        Ok(())
    });
    sim.run().expect("the simulation");
    assert_eq!((witness.accepted(), witness.closed()), (1, 1));
}

/// Four GETs at once, answered after different simulated delays: four connections, idle in
/// the pool once they are read.
async fn four_gets_at_once(session: &Session, log: &Trace) {
    let gets = [(64, 30), (1000, 5), (20_000, 15), (10, 0)].map(|(len, delay_ms)| {
        let (session, log) = (session.clone(), log.clone());
        async move {
            let path = format!("/bytes/{len}?delay_ms={delay_ms}");
            let response = session.data(get(&path)).await.expect("GET");
            assert_eq!(response.body().len(), len);
            log.record("client", format_args!("{path}: {}", response.status()));
        }
    });
    futures_util::future::join_all(gets).await;
}

/// Four GETs at once, two more one after the other (on pooled connections), then the
/// invalidation, which closes the four: the trace of both sides, from `seed`.
fn concurrent_gets(seed: u64) -> String {
    let (witness, trace) = (Witness::new(), Trace::new());
    let mut sim = world(seed, &witness, &trace);
    let (server, log) = (witness.clone(), trace.clone());
    sim.client("client", async move {
        let session = session(Configuration::builder());
        four_gets_at_once(&session, &log).await;
        for len in [7, 8] {
            let response = session.data(get(&format!("/bytes/{len}"))).await?;
            log.record(
                "client",
                format_args!("/bytes/{len}: {}", response.status()),
            );
        }
        log.record(
            "client",
            format_args!("resources {:?}", session.resources()),
        );
        invalidate(session).await;
        log.record("client", "invalidated");
        let accepted = server.accepted();
        server_sees_closed(&server, accepted).await;
        log.record(
            "client",
            format_args!("the server saw all {accepted} closed"),
        );
        Ok(())
    });
    sim.run().expect("the simulation");
    trace.text()
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    for seed in [3, 4] {
        let first = concurrent_gets(seed);
        let second = concurrent_gets(seed);
        assert_eq!(
            first, second,
            "seed {seed}: two runs of one seed traced differently"
        );
    }
    // And the seed matters: the trace is not the same whatever the seed.
    let traces: BTreeSet<String> = (5..9).map(concurrent_gets).collect();
    assert!(traces.len() > 1, "four seeds gave one trace");
}

/// Four GETs at once, then `reset()`, which closes the four idle connections: the trace of
/// both sides, from `seed`.
fn reset_after_concurrent_gets(seed: u64) -> String {
    let (witness, trace) = (Witness::new(), Trace::new());
    let mut sim = world(seed, &witness, &trace);
    let (server, log) = (witness.clone(), trace.clone());
    sim.client("client", async move {
        let session = session(Configuration::builder());
        four_gets_at_once(&session, &log).await;
        tokio::time::timeout(PATIENCE, session.reset())
            .await
            .expect("reset within the patience");
        log.record("client", "reset");
        server_sees_closed(&server, 4).await;
        log.record("client", "the server saw all 4 closed");
        invalidate(session).await;
        Ok(())
    });
    sim.run().expect("the simulation");
    trace.text()
}

#[test]
fn reset_closes_the_idle_connections_in_the_same_order_for_the_same_seed() {
    let first = reset_after_concurrent_gets(11);
    for run in 1..5 {
        assert_eq!(
            first,
            reset_after_concurrent_gets(11),
            "run {run} of seed 11 traced differently from the first"
        );
    }
}

#[test]
fn a_cached_response_goes_stale_on_the_simulated_clock() {
    let (witness, trace) = (Witness::new(), Trace::new());
    let mut sim = world(12, &witness, &trace);
    let server = witness.clone();
    sim.client("client", async move {
        // The default configuration caches in memory.
        let session = session(Configuration::builder());
        let path = "/bytes/100?max_age=2";
        session.data(get(path)).await?;
        session.data(get(path)).await?;
        assert_eq!(
            server.requests(),
            1,
            "a fresh response is answered from the cache"
        );
        // Three simulated seconds on: older than its max-age of 2, so stale, and with no
        // validator to revalidate it by: the next GET goes to the server.
        tokio::time::sleep(Duration::from_secs(3)).await;
        session.data(get(path)).await?;
        assert_eq!(
            server.requests(),
            2,
            "a response 3 s old by the simulated clock, max-age 2, was answered from the cache"
        );
        invalidate(session).await;
        Ok(())
    });
    sim.run().expect("the simulation");
}

#[test]
fn https_runs_over_the_simulated_stream() {
    let ca = TestCa::new("leakproof simulation CA");
    let cert = ca.server_for(&[SERVER], None);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(cert.chain, cert.key)
        })
        .expect("the server's TLS configuration");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);

    let (witness, trace) = (Witness::new(), Trace::new());
    let mut sim = sim::sim(13, Duration::from_secs(120));
    let (counts, log) = (witness.clone(), trace.clone());
    sim.host(SERVER, move || {
        sim::serve_tls(443, config.clone(), counts.clone(), log.clone())
    });
    let (server, root) = (witness.clone(), ca.root());
    sim.client("client", async move {
        let session = session(Configuration::builder().add_root_certificate(root));
        for _ in 0..2 {
            let request = http::Request::get(format!("https://{SERVER}/bytes/10000"))
                .body(())
                .unwrap();
            let response = session.data(request).await?;
            assert_eq!(&response.body()[..], &body(10_000)[..]);
        }
        assert_eq!(server.accepted(), 1, "one TLS connection, kept alive");
        assert_eq!(server.requests(), 2);
        invalidate(session).await;
        server_sees_closed(&server, 1).await;
        Ok(())
    });
    sim.run().expect("the simulation");
}

#[test]
fn an_idle_connection_closes_at_the_idle_timeout_on_the_simulated_clock() {
    let (witness, trace) = (Witness::new(), Trace::new());
    let mut sim = world(14, &witness, &trace);
    let server = witness.clone();
    sim.client("client", async move {
        let idle = Duration::from_secs(20);
        let session = session(Configuration::builder().idle_timeout(idle));
        session.data(get("/bytes/10")).await?;
        let parked = Instant::now();
        // Just short of the idle timeout (and of the network's latency after it), still open.
        tokio::time::sleep_until(parked + idle - Duration::from_millis(50)).await;
        assert_eq!((server.accepted(), server.closed()), (1, 0));
        assert_eq!(session.resources().idle_connections, 1);
        // Past it, closed by the driver's idle clock: the server host sees the close.
        assert!(
            server.wait_closed(1, Duration::from_secs(1)).await,
            "the idle connection was not closed at its idle timeout"
        );
        let closed_after = parked.elapsed();
        assert!(
            closed_after >= idle && closed_after < idle + Duration::from_millis(100),
            "the server saw the idle connection closed after {closed_after:?}, not {idle:?}"
        );
        assert_eq!(session.resources().idle_connections, 0);
        invalidate(session).await;
        Ok(())
    });
    sim.run().expect("the simulation");
}
