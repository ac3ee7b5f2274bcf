//! The counting allocator, installed in a test binary of its own: it counts every thread in
//! the process, so this binary holds a single test and nothing runs beside it.

use std::time::Duration;

use leakproof_check::stage::Stage;
use leakproof_check::witness::CountingAllocator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

const LIMIT: Duration = Duration::from_secs(5);

/// One test only: a second would allocate on its own thread while this one measures.
#[test]
fn the_counting_allocator_witnesses_the_heap() {
    allocations_reallocations_and_the_peak_are_counted();
    a_stage_round_trip_returns_the_heap_to_its_baseline();
}

fn allocations_reallocations_and_the_peak_are_counted() {
    let (bytes, allocations) = (ALLOC.live_bytes(), ALLOC.live_allocations());
    ALLOC.reset_peak();

    let mut v: Vec<u8> = Vec::with_capacity(1000);
    let allocated = (
        ALLOC.live_bytes() - bytes,
        ALLOC.live_allocations() - allocations,
    );
    v.reserve_exact(4000);
    let grown = ALLOC.live_bytes() - bytes;
    v.shrink_to(10);
    let shrunk = ALLOC.live_bytes() - bytes;
    drop(v);

    assert_eq!(allocated, (1000, 1));
    assert_eq!((grown, shrunk), (4000, 10), "realloc counts the difference");
    assert_eq!(
        (ALLOC.live_bytes(), ALLOC.live_allocations()),
        (bytes, allocations)
    );
    assert_eq!(ALLOC.peak_bytes(), bytes + 4000);
}

fn a_stage_round_trip_returns_the_heap_to_its_baseline() {
    // The first run warms up what lives for the process (tokio's and std's lazy globals).
    round_trip();
    let baseline = ALLOC.live_bytes();

    round_trip();

    assert_eq!(ALLOC.live_bytes(), baseline);
}

/// A runtime, a stage, one request answered over a real socket, then all of it dropped.
fn round_trip() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stage = Stage::start().await.unwrap();
        let mut client = timeout(LIMIT, TcpStream::connect(stage.addr()))
            .await
            .unwrap()
            .unwrap();
        let request = b"GET /bytes/100000?keep_alive=0 HTTP/1.1\r\nhost: stage\r\n\r\n";
        timeout(LIMIT, client.write_all(request))
            .await
            .unwrap()
            .unwrap();
        let mut response = Vec::new();
        timeout(LIMIT, client.read_to_end(&mut response))
            .await
            .unwrap()
            .unwrap();
        assert!(response.ends_with(b"leakproof "));
        assert!(stage.wait_all_closed(LIMIT).await);
    });
}
