//! Throughput: leakproof against hyper-util's legacy client, small GETs over keep-alive, over
//! http and over https.
//!
//! The clients run in one process, on one multi-thread tokio runtime (2 workers) shared with
//! two stages (`leakproof_check::stage::Stage`, loopback HTTP/1.1 servers: one plain, one
//! speaking TLS with a certificate of the tests' own CA, `tests/support/tls_ca.rs`), and
//! fetch `/bytes/64` (a 64-byte body framed by `Content-Length`) over kept-alive connections.
//! Over https the baseline is hyper-util's client over hyper-rustls; both sides use rustls on
//! ring, trust the same root, speak TLS 1.3 and ALPN `http/1.1`. Per scheme:
//!
//! - `sequential`: one request at a time; an iteration is one GET and reading its whole body;
//! - `concurrent_8`: an iteration is a batch of 8 GETs in flight at once, each a task spawned
//!   on the runtime (a `JoinSet`), the batch ending when all 8 bodies are read.
//!
//! Layout of `main`: build the runtime, the stages and the clients; warm every pool with
//! batches of 8 (so each holds 8 idle connections, handshakes done, and every measured
//! request reuses one); criterion's groups (`to_async(&runtime)`: each sample is one
//! `block_on` on the bench thread, the stages and the connections run on the workers, the
//! same for every client); then our own summary (see [`summary`]); then the teardown, which
//! checks that nothing leaks: the session is invalidated and holds nothing, and once every
//! client is gone each stage sees every socket it accepted closed.
//!
//! Nothing here asserts on speed: the figures are reported, never checked.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) criterion runs each benchmark
//! once; the summary is then skipped, and only the warm-up and the teardown's checks run.

#[path = "../tests/support/tls_ca.rs"]
mod tls_ca;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use http::Uri;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use leakproof::{Configuration, Session};
use leakproof_check::stage::Stage;
use tls_ca::TestCa;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

/// The body the stage sends for every request.
const BODY: usize = 64;
/// Requests in flight at once in `concurrent_8`.
const CONCURRENCY: usize = 8;

type HyperClient = Client<HttpConnector, Empty<Bytes>>;
type HyperTlsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// One of the clients under test. Cheap to clone (all are handles on shared state).
#[derive(Clone)]
enum Contender {
    Leakproof(Session),
    HyperUtil(HyperClient),
    HyperUtilTls(HyperTlsClient),
}

impl Contender {
    fn name(&self) -> &'static str {
        match self {
            Contender::Leakproof(_) => "leakproof",
            Contender::HyperUtil(_) | Contender::HyperUtilTls(_) => "hyper_util",
        }
    }

    /// One GET of `uri`, its whole body read. Panics on any failure: a benchmark of errors
    /// would measure nothing.
    async fn get(&self, uri: &Uri) {
        let len = match self {
            Contender::Leakproof(session) => {
                let request = http::Request::get(uri.clone()).body(()).expect("request");
                let response = session.data(request).await.expect("leakproof GET");
                assert_eq!(response.status(), http::StatusCode::OK);
                response.body().len()
            }
            Contender::HyperUtil(client) => {
                let request = http::Request::get(uri.clone())
                    .body(Empty::new())
                    .expect("request");
                let response = client.request(request).await.expect("hyper-util GET");
                assert_eq!(response.status(), http::StatusCode::OK);
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("hyper-util body");
                body.to_bytes().len()
            }
            Contender::HyperUtilTls(client) => {
                let request = http::Request::get(uri.clone())
                    .body(Empty::new())
                    .expect("request");
                let response = client.request(request).await.expect("hyper-rustls GET");
                assert_eq!(response.status(), http::StatusCode::OK);
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("hyper-rustls body");
                body.to_bytes().len()
            }
        };
        assert_eq!(len, BODY);
    }

    /// A batch of [`CONCURRENCY`] GETs, each in a task of its own, all in flight at once.
    async fn batch(&self, uri: &Uri) {
        let mut tasks = JoinSet::new();
        for _ in 0..CONCURRENCY {
            let (client, uri) = (self.clone(), uri.clone());
            tasks.spawn(async move { client.get(&uri).await });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a GET task panicked");
        }
    }
}

/// Whether criterion measures (`cargo bench`) rather than runs each benchmark once as a test
/// (`cargo test --benches`, `cargo bench -- --test`) or lists them. As criterion decides it.
fn benchmarking() -> bool {
    let has = |flag: &str| std::env::args().any(|a| a == flag);
    has("--bench")
        && !has("--test")
        && !has("--list")
        && !std::env::args().any(|a| a.starts_with("--profile-time"))
}

/// The two clients compared over one scheme, and the URL they fetch.
struct Pair {
    /// `http` or `https`: the groups' prefix (none for http, as before).
    scheme: &'static str,
    uri: Uri,
    contenders: [Contender; 2],
}

impl Pair {
    fn group(&self, concurrent: bool) -> String {
        let shape = if concurrent {
            format!("concurrent_{CONCURRENCY}")
        } else {
            "sequential".to_owned()
        };
        match self.scheme {
            "http" => shape,
            scheme => format!("{scheme}_{shape}"),
        }
    }
}

/// hyper-util's client over hyper-rustls, trusting `ca` alone: rustls on ring, as ours.
fn hyper_tls_client(ca: &TestCa) -> HyperTlsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root().into()).expect("the test CA's root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ca = TestCa::new("leakproof bench CA");
    let (stage, tls_stage) = runtime.block_on(async {
        let stage = Stage::start().await.expect("stage");
        (stage, ca.stage().await)
    });
    let path = format!("/bytes/{BODY}");

    // leakproof's pool defaults to 6 connections per host, fewer than the 8 requests of
    // `concurrent_8`; hyper-util's legacy client has no limit. Let both keep 8, so that the
    // batches compare clients rather than pool sizes. Timeouts and the rest stay default; the
    // test CA's root is trusted besides webpki-roots'.
    let config = Configuration::builder()
        .max_connections_per_host(CONCURRENCY)
        .max_idle_per_host(CONCURRENCY)
        .add_root_certificate(ca.root())
        .build()
        .expect("configuration");
    let session = {
        let _context = runtime.enter();
        Session::new(config, None)
    };
    let (hyper, hyper_tls) = {
        let _context = runtime.enter();
        let hyper: HyperClient = Client::builder(TokioExecutor::new()).build_http();
        (hyper, hyper_tls_client(&ca))
    };
    let pairs = [
        Pair {
            scheme: "http",
            uri: stage.url(&path).parse().expect("uri"),
            contenders: [
                Contender::Leakproof(session.clone()),
                Contender::HyperUtil(hyper.clone()),
            ],
        },
        Pair {
            scheme: "https",
            uri: tls_stage.https_url(&path).parse().expect("uri"),
            contenders: [
                Contender::Leakproof(session.clone()),
                Contender::HyperUtilTls(hyper_tls.clone()),
            ],
        },
    ];

    // Warm every pool: a few batches of 8 open (up to) 8 connections each, handshakes
    // included, then everything measured below finds an idle connection waiting.
    runtime.block_on(async {
        for pair in &pairs {
            for contender in &pair.contenders {
                for _ in 0..3 {
                    contender.batch(&pair.uri).await;
                }
            }
        }
    });
    let accepted_after_warmup = stage.accepted() + tls_stage.accepted();

    let mut criterion = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    for pair in &pairs {
        for concurrent in [false, true] {
            let mut group = criterion.benchmark_group(pair.group(concurrent));
            if concurrent {
                group.throughput(Throughput::Elements(CONCURRENCY as u64));
                bench_each(&mut group, &runtime, pair, |contender, uri| async move {
                    contender.batch(&uri).await;
                });
            } else {
                group.throughput(Throughput::Elements(1));
                bench_each(&mut group, &runtime, pair, |contender, uri| async move {
                    contender.get(&uri).await;
                });
            }
            group.finish();
        }
    }

    criterion.final_summary();

    if benchmarking() {
        let report = runtime.block_on(summary(&pairs));
        println!("{report}");
    }
    let accepted_while_measuring = stage.accepted() + tls_stage.accepted() - accepted_after_warmup;
    // The stages count every client's sockets together; leakproof's own ledger says how many
    // of them are its own, so any extra connection can be told apart.
    let leakproof_idle = session.resources().idle_connections;

    // Teardown: nothing may outlive the clients.
    drop(pairs);
    runtime.block_on(async {
        session.finish_tasks_and_invalidate();
        tokio::time::timeout(Duration::from_secs(10), session.invalidated())
            .await
            .expect("the session was not invalidated within 10 s");
        let held = session.resources();
        assert!(
            held.is_zero(),
            "the invalidated session still holds {held:?}"
        );
        drop(session);
        // hyper-util's pool closes its idle connections when the last client clone goes.
        drop(hyper);
        drop(hyper_tls);
        for stage in [&stage, &tls_stage] {
            assert!(
                stage.wait_all_closed(Duration::from_secs(10)).await,
                "{} of the {} sockets the {} stage accepted are still open after every client \
                 is gone",
                stage.open(),
                stage.accepted(),
                if stage.is_tls() { "https" } else { "http" },
            );
        }
    });
    println!(
        "teardown: session invalidated holding nothing; all {} sockets closed \
         ({accepted_after_warmup} opened while warming up, {accepted_while_measuring} after; \
         leakproof's pools held {leakproof_idle})",
        stage.accepted() + tls_stage.accepted(),
    );
    drop((stage, tls_stage));
}

/// Benchmarks `routine` once per contender of `pair` in `group`, under the clients' names.
fn bench_each<F, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    pair: &Pair,
    routine: F,
) where
    F: Fn(Contender, Uri) -> Fut,
    Fut: Future<Output = ()>,
{
    for contender in &pair.contenders {
        group.bench_function(contender.name(), |b| {
            b.to_async(runtime)
                .iter(|| routine(contender.clone(), pair.uri.clone()));
        });
    }
}

/// Our own figures, since criterion does not hand its estimates back to the program.
///
/// How they are taken: per group, [`ROUNDS`] rounds; in each round each client does a fixed
/// amount of work (`sequential`: [`SEQUENTIAL_REQUESTS`] GETs one after another;
/// `concurrent_8`: [`BATCHES`] batches of 8) timed with `Instant` around a `block_on`-ed loop,
/// the same shape as criterion's. The two clients alternate within each round and the one
/// that goes first alternates between rounds, so drift and noise (other builds on these 2
/// cores) fall on both alike. Each client's figure is the median of its per-round rates; the
/// ratio is leakproof's median over hyper-util's, and the paired figure beside it is the
/// median of the per-round ratios (the two agree when the run was quiet), with the smallest
/// and the largest per-round ratio: the spread.
async fn summary(pairs: &[Pair]) -> String {
    const ROUNDS: usize = 11;
    const SEQUENTIAL_REQUESTS: usize = 1000;
    const BATCHES: usize = 150;

    let mut report = String::from(
        "\nsummary (median of alternating timed rounds, see summary(); paired: the median \
         per-round ratio, [min, max] over the rounds):",
    );
    for pair in pairs {
        for concurrent in [false, true] {
            let requests = if concurrent {
                BATCHES * CONCURRENCY
            } else {
                SEQUENTIAL_REQUESTS
            };
            let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            for round in 0..ROUNDS {
                for i in [round % 2, 1 - round % 2] {
                    let contender = &pair.contenders[i];
                    let start = Instant::now();
                    if concurrent {
                        for _ in 0..BATCHES {
                            contender.batch(&pair.uri).await;
                        }
                    } else {
                        for _ in 0..SEQUENTIAL_REQUESTS {
                            contender.get(&pair.uri).await;
                        }
                    }
                    rates[i].push(requests as f64 / start.elapsed().as_secs_f64());
                }
            }
            let mut ratios: Vec<f64> = rates[0].iter().zip(&rates[1]).map(|(l, h)| l / h).collect();
            let (leakproof, hyper_util) = (median(&mut rates[0]), median(&mut rates[1]));
            let paired = median(&mut ratios);
            // `median` sorted them.
            let (low, high) = (ratios[0], ratios[ratios.len() - 1]);
            let _ = write!(
                report,
                "\n{}: leakproof {} req/s, hyper-util {} req/s, ratio {:.2} (paired {:.2} \
                 [{:.2}, {:.2}])",
                pair.group(concurrent),
                thousands(leakproof),
                thousands(hyper_util),
                leakproof / hyper_util,
                paired,
                low,
                high,
            );
        }
    }
    report
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// `14213.7` as `14 214`: whole numbers, thousands apart.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(digit);
    }
    out
}
