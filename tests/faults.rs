//! Limits and faults: connection limits, many idle connections.

mod common;

use std::time::{Duration, Instant};

use common::{config, route, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn connections_over_max_connections_are_refused_counted_and_the_slot_comes_back() {
    let dest = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut r = route(dest.local_addr().unwrap(), "unlimited");
    r.max_connections = 3;
    r.parse = false;
    let server = start(config(vec![r]));
    let mut held = Vec::new();
    for _ in 0..3 {
        let c = TcpStream::connect(server.addr()).await.unwrap();
        let (up, _) = dest.accept().await.unwrap();
        held.push((c, up));
    }
    // The fourth is accepted by the kernel, then closed by migshaper without an upstream.
    let mut extra = TcpStream::connect(server.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf))
        .await
        .expect("the refused connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let refused =
        r#"migshaper_connections_total{route="test",channel="unknown",outcome="refused"} 1"#;
    let active = r#"migshaper_connections_active{route="test",channel="unknown"} 3"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = server.metrics.render();
        if text.contains(refused) && text.contains(active) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} / {active} not in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), dest.accept())
            .await
            .is_err(),
        "no upstream connection for a refused client"
    );
    // The held connections still work.
    held[0].0.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    held[0].1.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still here");
    // Closing one frees its slot.
    let (c, mut up) = held.pop().unwrap();
    drop(c);
    let mut rest = Vec::new();
    up.read_to_end(&mut rest).await.unwrap();
    drop(up);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = TcpStream::connect(server.addr()).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), dest.accept()).await {
            Ok(Ok((mut up, _))) => {
                again.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                up.read_exact(&mut b).await.unwrap();
                break;
            }
            _ => {
                // The slot is released when the connection's tasks end; retry briefly.
                assert!(Instant::now() < deadline, "the freed slot never came back");
            }
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_leave_the_link_to_the_busy_one() {
    migshaper::raise_fd_limit().unwrap();
    const IDLE: usize = 1000;
    const BULK: usize = 40_000_000;
    let dest = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut r = route(dest.local_addr().unwrap(), "1g");
    r.parse = false;
    let server = start(config(vec![r]));
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let c = TcpStream::connect(server.addr()).await.unwrap();
        let (up, _) = dest.accept().await.unwrap();
        idle.push((c, up));
    }
    let mut bulk = TcpStream::connect(server.addr()).await.unwrap();
    let (mut up, _) = dest.accept().await.unwrap();
    let t0 = Instant::now();
    let send = tokio::spawn(async move {
        bulk.write_all(&vec![7u8; BULK]).await.unwrap();
        bulk.shutdown().await.unwrap();
        bulk
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = up.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(got, BULK);
    let _bulk = send.await.unwrap();
    let gbps = BULK as f64 * 8.0 / secs / 1e9;
    // 1 Gb/s with framing none; the bound is loose (a busy 2-core machine), the point is
    // that 1000 idle connections take nothing from the busy one.
    assert!(
        gbps > 0.6 && gbps < 1.05,
        "{gbps:.3} Gb/s with {IDLE} idle connections"
    );
    // The idle ones are all still open and working.
    let (c, u) = &mut idle[IDLE - 1];
    c.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    u.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    server.shutdown().await;
}
