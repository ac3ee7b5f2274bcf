//! The seeds' leak 4 on the shared session: `Session::shared()` never goes away (R9), so its
//! TLS resumption store must stay within its bound (`tls_session_cache`, 64 by default) however
//! many servers and handshakes it sees. It trusts the default roots: webpki-roots', and those of
//! the PEM file `LEAKPROOF_EXTRA_CA_CERTS` names, which is how this test (and a user behind a
//! private CA) reaches servers of its own CA.
//!
//! Stages on several loopback addresses are several TLS servers (a server name each); each
//! hands out stateless tickets, so the server side keeps nothing per session. Every request asks
//! for `Connection: close`, so each is a connection and a handshake of its own (resumed when the
//! store holds a ticket for its server), and each handshake brings new tickets. The witnesses:
//! the ledger's count of cached TLS sessions never exceeds the bound (and reaches it), and the
//! heap (a counting allocator, so this binary holds one test) comes back within 64 KiB of its
//! baseline after the store is full, while an unbounded store would grow by more than a
//! kilobyte per handshake. `LEAKPROOF_SHARED_TLS_ROUNDS` sets the measured rounds (40 by
//! default, each one request to every server).

#[path = "support/tls_ca.rs"]
mod tls_ca;

use std::net::Ipv4Addr;
use std::time::Duration;

use leakproof::Session;
use leakproof_check::scenario::bounded;
use leakproof_check::stage::Stage;
use leakproof_check::witness::CountingAllocator;
use tls_ca::TestCa;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// TLS servers, on 127.0.0.1 to 127.0.0.8.
const SERVERS: u8 = 8;
/// Rounds before the baseline: more handshakes than the store holds tickets, so it is full.
const WARM_UP: usize = 20;
const DEFAULT_ROUNDS: usize = 40;
const SLACK: usize = 64 * 1024;

/// One request to every stage, each on a connection of its own; the most TLS sessions the
/// shared session's ledger counted after any of them.
async fn round(session: &Session, stages: &[Stage]) -> u32 {
    let mut most = 0;
    for stage in stages {
        let request = http::Request::get(stage.https_url("/bytes/64?keep_alive=0"))
            .body(())
            .unwrap();
        let response = bounded("the request", session.data(request))
            .await
            .expect("the shared session reaches the stage through the extra root");
        assert_eq!(response.body().len(), 64);
        most = most.max(session.resources().tls_sessions);
    }
    most
}

/// The heap once every stage has seen all its sockets closed, `requests` of them each.
async fn settled(stages: &[Stage], requests: usize) -> usize {
    for stage in stages {
        assert!(
            stage
                .wait_until(
                    |s| s.accepted() == requests as u64 && s.open() == 0,
                    Duration::from_secs(10)
                )
                .await,
            "the stage at {} saw {} of {} sockets closed",
            stage.addr(),
            stage.closed(),
            stage.accepted()
        );
    }
    ALLOC.live_bytes()
}

#[test]
fn the_shared_session_s_tls_store_stays_within_its_bound() {
    let rounds = std::env::var("LEAKPROOF_SHARED_TLS_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    let ca = TestCa::new("leakproof test CA");
    let roots = std::env::temp_dir().join(format!("leakproof-{}-roots.pem", std::process::id()));
    std::fs::write(&roots, ca.root_pem()).unwrap();
    // SAFETY: this binary's one test sets it before it starts a thread of its own, and before
    // anything reads the environment.
    unsafe { std::env::set_var(leakproof::EXTRA_CA_CERTS_ENV, &roots) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut stages = Vec::new();
        for host in 1..=SERVERS {
            stages.push(ca.stage_on(Ipv4Addr::new(127, 0, 0, host)).await);
        }
        let session = Session::shared();
        let bound = session.configuration().tls_session_cache() as u32;
        let mut most = 0;
        for _ in 0..WARM_UP {
            most = most.max(round(&session, &stages).await);
        }
        // The roots were read once, when the shared session was made: the file may go.
        std::fs::remove_file(&roots).unwrap();
        let baseline = settled(&stages, WARM_UP).await;
        for _ in 0..rounds {
            most = most.max(round(&session, &stages).await);
        }
        let after = settled(&stages, WARM_UP + rounds).await;
        let handshakes: u64 = stages.iter().map(Stage::accepted).sum();
        let resumed: u64 = stages.iter().map(Stage::tls_resumptions).sum();
        let growth = after as isize - baseline as isize;
        println!(
            "shared session's TLS store: {handshakes} handshakes ({resumed} resumed) with \
             {SERVERS} servers; at most {most} TLS sessions cached (bound {bound}); live heap \
             {baseline} B once full, {after} B after {} more handshakes (difference {growth} B, \
             allowed {SLACK} B)",
            rounds * SERVERS as usize,
        );
        assert!(most <= bound, "{most} TLS sessions cached, bound {bound}");
        assert_eq!(most, bound, "the store filled to its bound");
        assert!(resumed > 0, "the cached sessions were used");
        assert!(
            after.abs_diff(baseline) <= SLACK,
            "the heap grew from {baseline} to {after} bytes over {} handshakes",
            rounds * SERVERS as usize
        );
    });
}
