//! Socket-level tests of the proxy on 127.0.0.1:0: integrity, ordering, half-close,
//! resets, upstream failures, shaping bounds and the CLI's configuration errors.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_through_8_connections_arrives_unchanged() {
    const CONNS: u64 = 8;
    const PER_CONN: u64 = 128 * 1024 * 1024; // 8 x 128 MiB = 1 GiB each way
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "unlimited",
    )]));
    let addr = server.addr();

    // Destination: for each connection, check the client's stream and send its own.
    let dest = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..CONNS {
            let (s, _) = upstream.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut id = [0u8; 8];
                let (mut r, w) = s.into_split();
                r.read_exact(&mut id).await.unwrap();
                let id = u64::from_le_bytes(id);
                let send = tokio::spawn(send_seeded(w, 1000 + id, PER_CONN));
                let check = check_seeded(r, id, PER_CONN).await.unwrap();
                send.await.unwrap().unwrap();
                check
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });

    let mut clients = Vec::new();
    for id in 0..CONNS {
        clients.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(&id.to_le_bytes()).await.unwrap();
            let send = tokio::spawn(send_seeded(w, id, PER_CONN));
            let check = check_seeded(r, 1000 + id, PER_CONN).await.unwrap();
            send.await.unwrap().unwrap();
            check
        }));
    }
    for c in clients {
        assert_eq!(within(c).await.unwrap(), Ok(()), "destination -> source");
    }
    for r in within(dest).await.unwrap() {
        assert_eq!(r, Ok(()), "source -> destination");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn upstream_connections_open_in_accept_order() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "unlimited",
    )]));
    // Eight connections at once: each handshake completes (in the proxy's accept queue)
    // before the next starts, so the accept order is 0..8.
    let mut clients = Vec::new();
    for i in 0..8u8 {
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        s.write_all(&[i]).await.unwrap();
        clients.push(s);
    }
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (mut s, _) = within(upstream.accept()).await.unwrap();
        let mut b = [0u8; 1];
        within(s.read_exact(&mut b)).await.unwrap();
        seen.push(b[0]);
    }
    assert_eq!(seen, (0..8).collect::<Vec<u8>>());
    drop(clients);
    server.shutdown().await;
}

#[tokio::test]
async fn port_checks_never_reach_the_destination_and_the_migration_after_them_does() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "unlimited",
    )]));
    // Three `nc -z`-style checks: connect and close without a byte.
    for _ in 0..3 {
        drop(TcpStream::connect(server.addr()).await.unwrap());
    }
    // A client that connects and says nothing is closed after a while, unforwarded.
    let mut silent = TcpStream::connect(server.addr()).await.unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(within(silent.read(&mut b)).await, Ok(0) | Err(_)));
    // Then a migration: the first connection the destination ever sees is the one that
    // speaks, and it carries its bytes.
    let (c, d) = open_via(server.addr(), &upstream, b"QEVM").await;
    drop((c, d));
    let text = server.metrics.render();
    let empty = r#"migshaper_connections_total{route="test",channel="unknown",outcome="empty"} 4"#;
    assert!(text.contains(empty), "{text}");
    // Nothing else reached the destination.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), upstream.accept())
            .await
            .is_err(),
        "a port check was forwarded"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn half_close_is_passed_on_and_the_other_direction_keeps_flowing() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "unlimited",
    )]));
    let mut c = TcpStream::connect(server.addr()).await.unwrap();

    // Source sends a request and half-closes; the destination sees EOF after it...
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    let (mut d, _) = upstream.accept().await.unwrap();
    let mut got = Vec::new();
    within(d.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"request");
    // ...and can still answer at length, then close.
    let reply = vec![7u8; 3 * 1024 * 1024];
    d.write_all(&reply).await.unwrap();
    d.shutdown().await.unwrap();
    let mut back = Vec::new();
    within(c.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back.len(), reply.len());
    assert!(back == reply);

    // The other way round: the destination half-closes first (after the source's first
    // byte, which migshaper waits for before it connects upstream).
    let (mut c, mut d) = open_via(server.addr(), &upstream, b"x").await;
    d.shutdown().await.unwrap();
    let mut none = Vec::new();
    within(c.read_to_end(&mut none)).await.unwrap();
    assert!(none.is_empty());
    c.write_all(b"still flowing").await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(d.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"still flowing");
    server.shutdown().await;
}

fn abort(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

#[tokio::test]
async fn a_reset_on_one_side_resets_the_other() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "unlimited",
    )]));

    // Source resets: the destination's read fails (not a clean EOF).
    let (c, mut d) = open_via(server.addr(), &upstream, b"x").await;
    let mut b = [0u8; 1];
    abort(c);
    let r = within(d.read(&mut b)).await;
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);

    // Destination resets: the source's read fails.
    let (mut c, d) = open_via(server.addr(), &upstream, b"x").await;
    abort(d);
    let r = within(c.read(&mut b)).await;
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    server.shutdown().await;
}

#[tokio::test]
async fn upstream_refusal_closes_the_client() {
    // A port that is bound but not listening: connecting to it is refused, and no other
    // test can take it meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = reserved.local_addr().unwrap();
    let server = start(config(vec![route(closed, "unlimited")]));
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    // The source speaks first: only then does migshaper connect upstream.
    c.write_all(b"QEVM").await.unwrap();
    let mut b = [0u8; 1];
    match within(c.read(&mut b)).await {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        Ok(n) => panic!("read {n} bytes from a refused upstream"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shaped_link_is_never_faster_than_its_rate() {
    const LEN: u64 = 5_000_000; // 40 Mbit: 0.4 s at 100 Mb/s
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "100mbit",
    )]));
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    let t0 = Instant::now();
    c.write_all(&[first_seeded_byte(7)]).await.unwrap();
    let (d, _) = upstream.accept().await.unwrap();
    let (_cr, cw) = c.into_split();
    let send = tokio::spawn(send_seeded_after(cw, 7, LEN, 1));
    assert_eq!(within(check_seeded(d, 7, LEN)).await.unwrap(), Ok(()));
    let took = t0.elapsed();
    send.await.unwrap().unwrap();
    // The bucket starts empty and may run ahead by at most its burst (4 ms).
    assert!(
        took >= Duration::from_millis(390),
        "5 MB crossed a 100 Mb/s link in {took:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_is_shared_by_all_connections_of_a_route() {
    const LEN: u64 = 2_500_000; // 4 x 20 Mbit = 0.8 s at 100 Mb/s if shared
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "100mbit",
    )]));
    let addr = server.addr();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&[first_seeded_byte(i)]).await.unwrap();
        let (d, _) = upstream.accept().await.unwrap();
        tasks.push(tokio::spawn(send_seeded_after(c, i, LEN, 1)));
        tasks.push(tokio::spawn(async move {
            assert_eq!(check_seeded(d, i, LEN).await.unwrap(), Ok(()));
            Ok(())
        }));
    }
    for t in tasks {
        within(t).await.unwrap().unwrap();
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(780),
        "4 x 2.5 MB took {took:?}: the limit is per route, not per connection"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_return_path_does_not_queue_behind_the_migration_stream() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(config(vec![route(
        upstream.local_addr().unwrap(),
        "100mbit",
    )]));
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    c.write_all(&[first_seeded_byte(1)]).await.unwrap();
    let (d, _) = upstream.accept().await.unwrap();
    let (mut cr, cw) = c.into_split();
    let (dr, mut dw) = d.into_split();
    // Saturate source -> destination for a while.
    let bulk = tokio::spawn(send_seeded_after(cw, 1, 6_000_000, 1));
    let sink = tokio::spawn(check_seeded(dr, 1, 6_000_000));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Small messages destination -> source cross at once, not after the bulk backlog.
    let mut worst = Duration::ZERO;
    for i in 0..10u8 {
        let t = Instant::now();
        dw.write_all(&[i; 16]).await.unwrap();
        let mut b = [0u8; 16];
        within(cr.read_exact(&mut b)).await.unwrap();
        assert_eq!(b, [i; 16]);
        worst = worst.max(t.elapsed());
    }
    // The bulk backlog at 100 Mb/s is hundreds of ms; the return path must not see it.
    assert!(
        worst < Duration::from_millis(100),
        "return-path message took {worst:?}"
    );
    within(bulk).await.unwrap().unwrap();
    assert_eq!(within(sink).await.unwrap().unwrap(), Ok(()));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_line_adds_one_way_delay_per_direction() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut r = route(upstream.local_addr().unwrap(), "1g");
    r.delay = Duration::from_millis(50);
    let server = start(config(vec![r]));
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    let t = Instant::now();
    c.write_all(b"ping").await.unwrap();
    let (mut d, _) = upstream.accept().await.unwrap();
    let mut b = [0u8; 4];
    within(d.read_exact(&mut b)).await.unwrap();
    d.write_all(b"pong").await.unwrap();
    within(c.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"pong");
    let rtt = t.elapsed();
    assert!(
        rtt >= Duration::from_millis(100),
        "rtt {rtt:?} with 50 ms each way"
    );
    // Order and integrity hold through the delay line, and EOF follows the data.
    let (_cr, cw) = c.into_split();
    let send = tokio::spawn(send_seeded(cw, 3, 4_000_000));
    assert_eq!(within(check_seeded(d, 3, 4_000_000)).await.unwrap(), Ok(()));
    send.await.unwrap().unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn the_shipped_example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/migshaper.toml");
    let c = migshaper::config::Config::from_file(&path).unwrap();
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].shape.rate, "1g".parse().unwrap());
    assert_eq!(c.routes[1].shape.framing, "ethernet:9000".parse().unwrap());
    let fabric = c.fabric.expect("the example has a [fabric] table");
    // 10 Gb/s x 1448 payload bytes per 1538 bytes of line time.
    assert_eq!(fabric.payload_bits(), 9_414_824_447, "{fabric:?}");
}

#[test]
fn cli_config_errors_exit_2_naming_file_key_and_value() {
    let tmp = TempDir::new("test");
    let dir = tmp.path();
    let cases = [
        (
            "unknown-key.toml",
            "[[route]]\nname='a'\nlisten='127.0.0.1:0'\nupstream='127.0.0.1:1'\nlink='1g'\nsped='x'\n",
            "sped",
        ),
        (
            "bad-link.toml",
            "[[route]]\nname='a'\nlisten='127.0.0.1:0'\nupstream='127.0.0.1:1'\nlink='1q'\n",
            "1q",
        ),
        (
            "bad-addr.toml",
            "[[route]]\nname='a'\nlisten='127.0.0.1'\nupstream='127.0.0.1:1'\nlink='1g'\n",
            "listen",
        ),
        (
            "dup.toml",
            "[[route]]\nname='a'\nlisten='127.0.0.1:7'\nupstream='h:1'\nlink='1g'\n[[route]]\nname='b'\nlisten='127.0.0.1:7'\nupstream='h:1'\nlink='1g'\n",
            "duplicate listen",
        ),
        (
            "dup-name.toml",
            "[[route]]\nname='a'\nlisten='127.0.0.1:0'\nupstream='h:1'\nlink='1g'\n[[route]]\nname='a'\nlisten='127.0.0.1:0'\nupstream='h:1'\nlink='10g'\n",
            "duplicate route name",
        ),
        (
            "bad-keepalive.toml",
            "keepalive='soon'\n[[route]]\nname='a'\nlisten='127.0.0.1:0'\nupstream='h:1'\nlink='1g'\n",
            "keepalive",
        ),
        ("no-routes.toml", "connect_timeout='5s'\n", "route"),
    ];
    /// Runs `serve --config path`, expects exit 2, returns stderr.
    fn config_fails(path: &std::path::Path) -> String {
        let out = migshaper()
            .args(["serve", "--control", "127.0.0.1:0", "--config"])
            .arg(path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        err
    }
    for (file, text, needle) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let err = config_fails(&path);
        assert!(err.contains(file) && err.contains(needle), "{file}: {err}");
    }
    assert!(config_fails(&dir.join("missing.toml")).contains("missing.toml"));
    // Unreadable: a directory, and bytes that are not UTF-8 (root reads any mode bits).
    let not_utf8 = dir.join("latin1.toml");
    std::fs::write(&not_utf8, b"[[route]]\nname='\xe9'\n").unwrap();
    for (path, needle) in [(dir.to_path_buf(), "directory"), (not_utf8, "UTF-8")] {
        let err = config_fails(&path);
        assert!(
            err.contains(&*path.to_string_lossy()) && err.contains(needle),
            "{err}"
        );
    }
    let out = migshaper()
        .args([
            "serve",
            "--control",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--link",
            "fast",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2.5gbit"));
    // A port already in use is a start-up error too.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = migshaper()
        .args([
            "serve",
            "--control",
            "127.0.0.1:0",
            "--listen",
            &busy.local_addr().unwrap().to_string(),
            "--upstream",
            "127.0.0.1:1",
            "--link",
            "1g",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&busy.local_addr().unwrap().to_string()) && err.contains("in use"),
        "{err}"
    );
}

/// Starts the real binary with its control API and a 1g link in front of `upstream`.
fn spawn_serve(upstream: std::net::SocketAddr, extra: &[&str]) -> Spawned {
    let mut cmd = migshaper();
    cmd.args([
        "serve",
        "--control",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--link",
        "1g",
    ])
    .args(["--upstream", &upstream.to_string()])
    .args(extra);
    Spawned::start(cmd)
}

#[test]
fn sigterm_stops_accepting_and_drains_open_connections() {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut server = spawn_serve(upstream.local_addr().unwrap(), &[]);
    let addr = server.listen();
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"before").unwrap();
    let (mut d, _) = upstream.accept().unwrap();
    let mut b = [0u8; 6];
    d.read_exact(&mut b).unwrap();
    server.signal("TERM");
    // New connections are refused once the listener is closed (probing earlier would
    // open a real connection that the drain then waits for)...
    server.log.wait_contains("stopped accepting");
    let refused = std::net::TcpStream::connect(addr).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // ...while the open one keeps flowing both ways until it closes.
    c.write_all(b"after!").unwrap();
    d.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"after!");
    d.write_all(b"reply!").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"reply!");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "exited with a connection open"
    );
    drop(c);
    drop(d);
    let (status, _) = server.wait_exit();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_drain_timeout_closes_what_is_left_and_exits_0() {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut server = spawn_serve(
        upstream.local_addr().unwrap(),
        &["--drain-timeout", "300ms"],
    );
    let mut c = std::net::TcpStream::connect(server.listen()).unwrap();
    // One byte, so that migshaper connects upstream; then the connection sits idle.
    c.write_all(b"x").unwrap();
    let (_d, _) = upstream.accept().unwrap();
    server.signal("TERM");
    let (status, took) = server.wait_exit();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(250),
        "exited after {took:?}, before the drain timeout"
    );
    server.log.wait_contains("drain timeout expired");
    // The idle connection was closed, not left hanging.
    let mut b = [0u8; 1];
    c.set_read_timeout(Some(WAIT)).unwrap();
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
}

#[tokio::test]
async fn ipv6_listen_and_upstream_by_host_name() {
    // Listen on [::1], forward to an upstream given as `localhost:PORT` (resolved at connect).
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut r = route(upstream.local_addr().unwrap(), "unlimited");
    r.listen = "[::1]:0".into();
    r.upstream = format!("localhost:{}", upstream.local_addr().unwrap().port());
    let server = start(config(vec![r]));
    assert!(server.addr().is_ipv6());
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    c.write_all(b"v6").await.unwrap();
    let (mut d, _) = within(upstream.accept()).await.unwrap();
    let mut b = [0u8; 2];
    within(d.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"v6");
    drop(c);
    drop(d);
    server.shutdown().await;
}
