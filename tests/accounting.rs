//! Real QEMU captures replayed through the proxy: the migration record written when the
//! connections close must carry QEMU's own counters (`result.json`), every byte in a phase,
//! and the right channels and outcome; failures must be recorded with their cause.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

use common::fixtures::{fixtures_dir, load_capture as load};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("migshaper-acct-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("records.jsonl")
}

/// A fixture's streams: source->destination per connection, and the return path.
fn streams(name: &str) -> (Vec<Vec<u8>>, Vec<u8>, serde_json::Value) {
    let dir = fixture(name);
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("result.json")).unwrap()).unwrap();
    let mut s2d = Vec::new();
    for i in 0.. {
        let p = dir.join(format!("c{i}.s2d.bin.zst"));
        if !p.exists() {
            break;
        }
        s2d.push(load(&p));
    }
    let p = dir.join("c0.d2s.bin.zst");
    let d2s = if p.exists() { load(&p) } else { Vec::new() };
    (s2d, d2s, result)
}

/// Plays a migration's connections through `via` to `upstream` (main first, then the
/// others, all connected before the bulk of the data flows, as QEMU does; the main channel
/// speaks first, as QEMU's does, since migshaper forwards a would-be main channel only
/// once it has sent a byte).
async fn drive(
    via: std::net::SocketAddr,
    upstream: &TcpListener,
    mut s2d: Vec<Vec<u8>>,
    d2s: Vec<u8>,
) {
    let mut clients = Vec::new();
    let mut dests = Vec::new();
    for (i, data) in s2d.iter_mut().enumerate() {
        let mut c = TcpStream::connect(via).await.unwrap();
        if i == 0 && !data.is_empty() {
            c.write_all(&data[..1]).await.unwrap();
            data.remove(0);
        }
        clients.push(c);
        dests.push(upstream.accept().await.unwrap().0);
    }
    let mut tasks = Vec::new();
    for (i, (c, mut d)) in clients.into_iter().zip(dests).enumerate() {
        let data = std::mem::take(&mut s2d[i]);
        let rp = if i == 0 { d2s.clone() } else { Vec::new() };
        tasks.push(tokio::spawn(async move {
            let (mut cr, mut cw) = c.into_split();
            let send = tokio::spawn(async move {
                cw.write_all(&data).await.unwrap();
                cw.shutdown().await.unwrap();
            });
            // Destination: return path out, stream in, then close.
            d.write_all(&rp).await.unwrap();
            let mut buf = vec![0u8; 1 << 20];
            while d.read(&mut buf).await.unwrap() != 0 {}
            d.shutdown().await.unwrap();
            let mut back = Vec::new();
            cr.read_to_end(&mut back).await.unwrap();
            send.await.unwrap();
            assert_eq!(back, rp);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
}

fn read_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Replays a fixture's connections through a fresh server and returns its record.
async fn replay(name: &str, link: &str) -> (serde_json::Value, serde_json::Value) {
    let (s2d, d2s, result) = streams(name);
    let records = temp(name);
    let _ = std::fs::remove_file(&records);
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(upstream.local_addr().unwrap(), link)]);
    cfg.records = Some(records.clone());
    let server = start(cfg);
    drive(server.addr(), &upstream, s2d, d2s).await;
    server.shutdown().await;
    let mut lines = read_records(&records);
    assert_eq!(lines.len(), 1, "one migration, one record: {lines:?}");
    (lines.remove(0), result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_on_two_routes_at_once_stay_separate() {
    let records = temp("two-routes");
    let _ = std::fs::remove_file(&records);
    let up_a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut a = route(up_a.local_addr().unwrap(), "unlimited");
    a.name = "a".into();
    let mut b = route(up_b.local_addr().unwrap(), "10g");
    b.name = "b".into();
    let mut cfg = config(vec![a, b]);
    cfg.records = Some(records.clone());
    let server = start(cfg);
    let (addr_a, addr_b) = (server.routes[0].local_addr, server.routes[1].local_addr);
    let (s2d_a, d2s_a, result_a) = streams("precopy-s64-256m");
    let (s2d_b, d2s_b, result_b) = streams("postcopy-s64-256m");
    tokio::join!(
        drive(addr_a, &up_a, s2d_a, d2s_a),
        drive(addr_b, &up_b, s2d_b, d2s_b)
    );
    server.shutdown().await;
    let recs = read_records(&records);
    assert_eq!(recs.len(), 2, "{recs:?}");
    let by_route = |r: &str| recs.iter().find(|x| x["route"] == r).unwrap().clone();
    check_counters(&by_route("a"), &result_a);
    check_counters(&by_route("b"), &result_b);
    assert_eq!(by_route("b")["links"][0]["link"], "10gbit");
    assert_ne!(by_route("a")["id"], by_route("b")["id"]);
}

fn check_counters(record: &serde_json::Value, result: &serde_json::Value) {
    let q = &result["query_migrate"]["ram"];
    for (ours, qemu) in [
        ("precopy_bytes", "precopy-bytes"),
        ("downtime_bytes", "downtime-bytes"),
        ("postcopy_bytes", "postcopy-bytes"),
        ("normal_pages", "normal"),
        ("zero_pages", "duplicate"),
        ("multifd_bytes", "multifd-bytes"),
    ] {
        assert_eq!(
            record["ram"][ours], q[qemu],
            "{ours} vs QEMU {qemu}: {record}"
        );
    }
    assert_eq!(record["page_requests"], q["postcopy-requests"]);
    assert_eq!(record["outcome"], "completed", "{record}");
    // Seen ending with QEMU's own markers: no basis to state.
    assert!(record.get("outcome_basis").is_none(), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_capture_record_matches_qemu() {
    let (record, result) = replay("precopy-s64-256m", "unlimited").await;
    check_counters(&record, &result);
    let bytes = &record["bytes"]["to_destination"];
    assert_eq!(sum(bytes), 191_299_052, "every byte in a phase");
    assert!(bytes["precopy"].as_u64().unwrap() > 100_000_000);
    assert!(bytes["downtime"].as_u64().unwrap() > 60_000_000);
    assert_eq!(bytes["postcopy"], 0);
    assert_eq!(record["channels"]["main"], 1);
    assert!(record["precopy_passes"].as_u64().unwrap() >= 1);
    let series: u64 = record["series"]["to_destination"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(series, 191_299_052);
    assert_eq!(record["links"][0]["link"], "unlimited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_capture_counts_page_requests_and_the_return_path() {
    let (record, result) = replay("postcopy-s64-256m", "unlimited").await;
    check_counters(&record, &result);
    assert_eq!(sum(&record["bytes"]["to_destination"]), 304_474_105);
    assert_eq!(sum(&record["bytes"]["to_source"]), 1855);
    assert!(
        record["bytes"]["to_destination"]["postcopy"]
            .as_u64()
            .unwrap()
            > 60_000_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_channels_join_the_main_channels_migration() {
    let (record, result) = replay("multifd2-idle-256m", "unlimited").await;
    check_counters(&record, &result);
    assert_eq!(record["channels"]["main"], 1);
    assert_eq!(record["channels"]["multifd"], 2);
    assert_eq!(
        sum(&record["bytes"]["to_destination"]),
        581_966 + 24_914_880 + 31_189_696
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_pages_ahead_of_the_main_channels_first_ram_section_are_precopy() {
    // As libvirt's multifd runs showed: the multifd channels send pages while the main
    // channel is still in its setup sections. QEMU counts those pages as pre-copy.
    let (s2d, d2s, result) = streams("multifd2-idle-256m");
    // The main channel's setup part: up to its first RAM section (streamparse.txt).
    const MAIN_SETUP: usize = 196;
    let records = temp("multifd-early");
    let _ = std::fs::remove_file(&records);
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(upstream.local_addr().unwrap(), "unlimited")]);
    cfg.records = Some(records.clone());
    let server = start(cfg);
    let mut main = TcpStream::connect(server.addr()).await.unwrap();
    main.write_all(&s2d[0][..MAIN_SETUP]).await.unwrap();
    let (mut main_d, _) = upstream.accept().await.unwrap();
    let mut got = vec![0u8; MAIN_SETUP];
    main_d.read_exact(&mut got).await.unwrap();
    // Both multifd channels send everything while the main channel waits in setup.
    for data in &s2d[1..] {
        let mut c = TcpStream::connect(server.addr()).await.unwrap();
        let (mut d, _) = upstream.accept().await.unwrap();
        let (w, r) = tokio::join!(
            async {
                c.write_all(data).await.unwrap();
                c.shutdown().await.unwrap();
            },
            async {
                let mut all = Vec::new();
                d.read_to_end(&mut all).await.unwrap();
                all
            }
        );
        let _: () = w;
        assert_eq!(r.len(), data.len());
    }
    let live = server.routes[0]
        .accounting
        .active()
        .expect("a migration in progress");
    assert_eq!(live.phase, "precopy", "multifd pages started pre-copy");
    // Then the main channel's rest, and the return path.
    let rest = s2d[0][MAIN_SETUP..].to_vec();
    let (mut mr, mut mw) = main.into_split();
    let send = tokio::spawn(async move {
        mw.write_all(&rest).await.unwrap();
        mw.shutdown().await.unwrap();
    });
    let split = d2s.len().saturating_sub(8);
    main_d.write_all(&d2s[..split]).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while main_d.read(&mut buf).await.unwrap() != 0 {}
    main_d.write_all(&d2s[split..]).await.unwrap();
    main_d.shutdown().await.unwrap();
    let mut back = Vec::new();
    mr.read_to_end(&mut back).await.unwrap();
    send.await.unwrap();
    server.shutdown().await;
    let record = read_records(&records).pop().unwrap();
    check_counters(&record, &result);
    assert_eq!(record["outcome"], "completed", "{record}");
    // Setup holds the main channel's setup sections and the first multifd channel's initial
    // and (empty) SYNC packets: no page. The second channel connected once pre-copy had
    // begun, so all of its bytes are pre-copy's.
    let setup = record["bytes"]["to_destination"]["setup"].as_u64().unwrap();
    let first_channel = 64 + 320 + 8 * 128;
    assert_eq!(setup, (MAIN_SETUP + first_channel) as u64, "{record}");
    assert!(record["duration_s_by_phase"]["precopy"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_is_recorded_as_failed() {
    let records = temp("reset");
    let _ = std::fs::remove_file(&records);
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(upstream.local_addr().unwrap(), "unlimited")]);
    cfg.records = Some(records.clone());
    let server = start(cfg);
    let data = load(&fixture("precopy-idle-256m").join("c0.s2d.bin.zst"));
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    // The source speaks first (migshaper connects upstream on its first byte).
    c.write_all(&data[..1]).await.unwrap();
    let (mut d, _) = upstream.accept().await.unwrap();
    c.write_all(&data[1..1_000_000]).await.unwrap();
    let mut buf = vec![0u8; 1_000_000];
    d.read_exact(&mut buf).await.unwrap();
    c.set_zero_linger().unwrap();
    drop(c);
    let _ = d.read(&mut buf).await;
    server.shutdown().await;
    let text = std::fs::read_to_string(&records).unwrap();
    let r: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(r["outcome"], "failed");
    assert!(r["cause"].as_str().unwrap().starts_with("reset"), "{r}");
}

#[tokio::test]
async fn an_upstream_refusal_is_recorded_as_failed() {
    let records = temp("refused");
    let _ = std::fs::remove_file(&records);
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = config(vec![route(reserved.local_addr().unwrap(), "unlimited")]);
    cfg.records = Some(records.clone());
    let server = start(cfg);
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    c.write_all(b"QEVM").await.unwrap();
    let mut b = [0u8; 1];
    let _ = c.read(&mut b).await;
    server.shutdown().await;
    let text = std::fs::read_to_string(&records).unwrap();
    let r: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(r["outcome"], "failed");
    assert!(
        r["cause"].as_str().unwrap().starts_with("upstream error"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_writes_each_direction_of_each_connection_and_no_parse_writes_no_record() {
    let dir = temp("capture").parent().unwrap().join("cap");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let records = temp("capture");
    let _ = std::fs::remove_file(&records);
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut r = route(upstream.local_addr().unwrap(), "unlimited");
    r.parse = false;
    let mut cfg = config(vec![r]);
    cfg.records = Some(records.clone());
    cfg.capture = Some(dir.clone());
    let server = migshaper::app::Server::bind(&cfg).unwrap();
    let addr = server.routes()[0].local_addr;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    for i in 0..2u8 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&[b'a' + i; 1000]).await.unwrap();
        let (mut d, _) = upstream.accept().await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        d.write_all(&[b'A' + i; 10]).await.unwrap();
        d.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
    }
    let _ = tx.send(());
    task.await.unwrap();
    for i in 0..2u8 {
        assert_eq!(
            std::fs::read(dir.join(format!("c{i}.s2d.bin"))).unwrap(),
            vec![b'a' + i; 1000]
        );
        assert_eq!(
            std::fs::read(dir.join(format!("c{i}.d2s.bin"))).unwrap(),
            vec![b'A' + i; 10]
        );
    }
    assert_eq!(
        std::fs::read_to_string(&records).unwrap(),
        "",
        "parse = false: no accounting"
    );
}

/// Plays `main` (and `rp` back) through a fresh recording server; returns the one record.
async fn record_of(main: Vec<u8>, rp: Vec<u8>, name: &str) -> serde_json::Value {
    let records = temp(name);
    let _ = std::fs::remove_file(&records);
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(upstream.local_addr().unwrap(), "unlimited")]);
    cfg.records = Some(records.clone());
    let server = start(cfg);
    drive(server.addr(), &upstream, vec![main], rp).await;
    server.shutdown().await;
    let mut recs = read_records(&records);
    assert_eq!(recs.len(), 1);
    recs.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_short_is_recorded_as_truncated() {
    let mut main = load(&fixture("precopy-idle-256m").join("c0.s2d.bin.zst"));
    main.truncate(1_000_000);
    let r = record_of(main, Vec::new(), "truncated").await;
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["cause"], "truncated stream", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_path_shut_with_an_error_code_fails_the_migration() {
    let main = load(&fixture("precopy-idle-256m").join("c0.s2d.bin.zst"));
    // RP SHUT (type 1, length 4) with code 1: the destination failed to load the state.
    let rp = vec![0, 1, 0, 4, 0, 0, 0, 1];
    let r = record_of(main, rp, "shut").await;
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["cause"], "return-path SHUT code 1", "{r}");
}

// === TLS: the stream is encrypted, its end markers are out of sight ===

/// A TLS connection's bytes in one direction: a handshake record header (`16 03 01` from the
/// source, `16 03 03` from the destination), then `len` bytes that stand for ciphertext.
fn tls_bytes(version: u8, len: usize, seed: u32) -> Vec<u8> {
    let mut t = vec![0x16, 0x03, version, 0x02, 0x00, 0x01];
    t.extend(
        (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8),
    );
    t
}

/// A fresh recording server on an "unlimited" route: (server, its upstream, records file).
async fn recording(name: &str) -> (Running, TcpListener, PathBuf) {
    let records = temp(name);
    let _ = std::fs::remove_file(&records);
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(upstream.local_addr().unwrap(), "unlimited")]);
    cfg.records = Some(records.clone());
    (start(cfg), upstream, records)
}

/// Stops the server and returns the one record it wrote.
async fn only_record(server: Running, records: &Path) -> serde_json::Value {
    server.shutdown().await;
    let mut recs = read_records(records);
    assert_eq!(recs.len(), 1, "{recs:?}");
    recs.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_migration_whose_connections_all_close_cleanly_is_completed_with_its_basis() {
    // Main channel and two multifd channels, all TLS; the return path's bytes are TLS too.
    let s2d = vec![
        tls_bytes(0x01, 3_000_000, 1),
        tls_bytes(0x01, 1_000_000, 2),
        tls_bytes(0x01, 1_000_000, 3),
    ];
    let total: usize = s2d.iter().map(Vec::len).sum();
    let rp = tls_bytes(0x03, 5_000, 4);
    let (server, upstream, records) = recording("tls-clean").await;
    drive(server.addr(), &upstream, s2d, rp.clone()).await;
    let r = &only_record(server, &records).await;
    assert_eq!(r["outcome"], "completed", "{r}");
    assert!(r["cause"].is_null(), "{r}");
    assert_eq!(
        r["outcome_basis"],
        migshaper::migration::TLS_COMPLETED_BASIS,
        "{r}"
    );
    assert_eq!(r["channels"], serde_json::json!({"tls": 3}), "{r}");
    assert_eq!(sum(&r["bytes"]["to_destination"]), total as u64, "{r}");
    assert_eq!(r["opaque_bytes"], total as u64, "{r}");
    assert_eq!(sum(&r["bytes"]["to_source"]), rp.len() as u64, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_main_channel_the_destination_half_closes_first_is_completed() {
    // QEMU's order: the destination sends its last return-path message and closes first,
    // the source closes afterwards. Here the source still sends after the destination's
    // FIN; the destination reads it all (it only shut its sending side).
    let first = tls_bytes(0x01, 2_000_000, 5);
    let last = tls_bytes(0x01, 100_000, 6);
    let rp = tls_bytes(0x03, 3_000, 7);
    let (server, upstream, records) = recording("tls-dst-first").await;
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    c.write_all(&first[..1]).await.unwrap();
    let (mut d, _) = upstream.accept().await.unwrap();
    let mut got = vec![0u8; first.len()];
    let (w, r) = tokio::join!(c.write_all(&first[1..]), d.read_exact(&mut got));
    w.unwrap();
    r.unwrap();
    assert!(got == first);
    d.write_all(&rp).await.unwrap();
    d.shutdown().await.unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    assert_eq!(
        back, rp,
        "the destination's FIN reached the source after its bytes"
    );
    c.write_all(&last).await.unwrap();
    c.shutdown().await.unwrap();
    let mut tail = Vec::new();
    d.read_to_end(&mut tail).await.unwrap();
    assert!(
        tail == last,
        "the source's bytes after the destination's FIN arrived"
    );
    drop((c, d));
    let r = &only_record(server, &records).await;
    assert_eq!(r["outcome"], "completed", "{r}");
    assert_eq!(
        r["outcome_basis"],
        migshaper::migration::TLS_COMPLETED_BASIS,
        "{r}"
    );
    assert_eq!(
        sum(&r["bytes"]["to_destination"]),
        (first.len() + last.len()) as u64,
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_main_channel_the_destination_closes_with_bytes_unread_is_failed() {
    // The destination closes its socket while the source's bytes still wait in its receive
    // queue: its kernel answers with a reset, which fails the migration.
    let data = tls_bytes(0x01, 16_000_000, 8);
    let (server, upstream, records) = recording("tls-dst-abort").await;
    let c = TcpStream::connect(server.addr()).await.unwrap();
    let (mut cr, mut cw) = c.into_split();
    cw.write_all(&data[..1]).await.unwrap();
    let (mut d, _) = upstream.accept().await.unwrap();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        // Fails once migshaper resets the source's side.
        let _ = cw.write_all(&d2[1..]).await;
        let _ = cw.shutdown().await;
    });
    let mut got = vec![0u8; 1_000_000];
    d.read_exact(&mut got).await.unwrap();
    let mut one = [0u8; 1];
    assert_eq!(d.peek(&mut one).await.unwrap(), 1, "bytes wait unread");
    drop(d);
    // migshaper passes the reset on: the source's side ends with an error or EOF.
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the source's side was not closed");
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the source's writes end")
        .unwrap();
    let r = &only_record(server, &records).await;
    assert_eq!(r["outcome"], "failed", "{r}");
    let cause = r["cause"].as_str().unwrap();
    assert!(
        cause.starts_with("reset") && cause.contains("destination"),
        "{r}"
    );
    assert!(r.get("outcome_basis").is_none(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_migration_with_one_connection_reset_is_failed_though_the_main_channel_closed_cleanly()
 {
    let main = tls_bytes(0x01, 1_000_000, 9);
    let multifd = tls_bytes(0x01, 500_000, 10);
    let (server, upstream, records) = recording("tls-multifd-reset").await;
    let mut c = TcpStream::connect(server.addr()).await.unwrap();
    c.write_all(&main[..1]).await.unwrap();
    let (mut d, _) = upstream.accept().await.unwrap();
    let mut c2 = TcpStream::connect(server.addr()).await.unwrap();
    let (mut d2, _) = upstream.accept().await.unwrap();
    // The multifd channel carries some bytes, then the source resets it.
    let mut got = vec![0u8; multifd.len()];
    let (w, r) = tokio::join!(c2.write_all(&multifd), d2.read_exact(&mut got));
    w.unwrap();
    r.unwrap();
    c2.set_zero_linger().unwrap();
    drop(c2);
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), d2.read_to_end(&mut rest)).await;
    assert!(
        cut.is_ok(),
        "the destination's side of the multifd channel was not closed"
    );
    // The main channel ends cleanly both ways.
    let mut got = vec![0u8; main.len() - 1];
    let (w, r) = tokio::join!(c.write_all(&main[1..]), d.read_exact(&mut got));
    w.unwrap();
    r.unwrap();
    c.shutdown().await.unwrap();
    let mut tail = Vec::new();
    d.read_to_end(&mut tail).await.unwrap();
    d.shutdown().await.unwrap();
    c.read_to_end(&mut tail).await.unwrap();
    drop((c, d, d2));
    let r = &only_record(server, &records).await;
    assert_eq!(r["outcome"], "failed", "{r}");
    assert!(
        r["cause"]
            .as_str()
            .unwrap()
            .contains("read from source failed"),
        "{r}"
    );
    assert!(r.get("outcome_basis").is_none(), "{r}");
    assert_eq!(r["channels"]["tls"], 2, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_stream_the_parser_loses_stays_unknown_without_a_basis() {
    // A real pre-copy stream whose header claims stream version 4: the parser cannot
    // follow it, so its end cannot be judged although every connection closes cleanly.
    let mut main = load(&fixture("precopy-idle-256m").join("c0.s2d.bin.zst"));
    assert_eq!(&main[..8], &[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]);
    main[7] = 4;
    let len = main.len() as u64;
    let r = record_of(main, Vec::new(), "desync").await;
    assert_eq!(r["outcome"], "unknown", "{r}");
    assert_eq!(
        r["cause"], "stream not parsed: unsupported stream version 4",
        "{r}"
    );
    assert!(r.get("outcome_basis").is_none(), "{r}");
    assert_eq!(sum(&r["bytes"]["to_destination"]), len, "{r}");
}
