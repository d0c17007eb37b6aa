//! The link's own fidelity report, end to end through the real binary: a destination slower
//! than the link is reported as such (ratio, cause, WARN line), a healthy one is not, and
//! a source that pauses is idle, not short. (Late wake-ups are forced on fake time in the
//! bucket's own tests: `src/link/bucket.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Log, Seeded, Spawned, TempDir, migshaper};
use serde_json::Value;

/// 100 Mb/s with no framing: 12.5 MB/s of payload.
const RATE_BYTES: f64 = 12.5e6;

/// Forwards what `source` writes through a migshaper at 100 Mb/s (burst 50 ms: these tests
/// check the accounting, not how late this host's timers fire) to a destination that reads
/// with `dest`; returns the migration's record and the log.
fn through_link(
    name: &str,
    source: impl FnOnce(&mut TcpStream),
    dest: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> (Value, Log) {
    let dir = TempDir::new(name);
    let records = dir.path().join("records.jsonl");
    // A small receive buffer and an Ethernet MSS at the destination, as over a real NIC:
    // a slow reader then holds the link back within milliseconds, instead of after the
    // megabytes that loopback's 64 KiB segments let the kernel buffer on both sides.
    let sink = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sink.set_recv_buffer_size(64 * 1024).unwrap();
    sink.set_tcp_mss(1448).unwrap();
    sink.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sink.listen(1).unwrap();
    let sink: TcpListener = sink.into();
    let upstream = sink.local_addr().unwrap();
    let reader = thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        dest(&mut s);
    });
    let mut cmd = migshaper();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.to_string())
        .args(["--link", "100mbit", "--framing", "none", "--burst", "50ms"])
        .args(["--control", "127.0.0.1:0", "--records"])
        .arg(&records);
    let mut m = Spawned::start(cmd);
    let mut s = TcpStream::connect(m.listen()).unwrap();
    source(&mut s);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    reader.join().unwrap();
    m.log.wait_message("migration ended");
    let text = std::fs::read_to_string(&records).unwrap();
    let record: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    (record, m.log.clone())
}

/// Writes `n` bytes of a seeded pattern (not a QEMU stream: it is counted opaquely).
fn send(s: &mut TcpStream, n: usize, seed: u64) {
    let mut rng = Seeded::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len());
        rng.fill(&mut buf[..k]);
        s.write_all(&buf[..k]).unwrap();
        left -= k;
    }
}

/// Reads to the end as fast as possible.
fn drain(s: &mut TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    while s.read(&mut buf).unwrap() > 0 {}
}

fn to_destination(record: &Value) -> &Value {
    &record["fidelity"]["to_destination"]
}

#[test]
fn a_destination_reading_at_80_percent_of_the_link_is_reported_short_by_20_percent() {
    let (record, log) = through_link(
        "fidelity-slow",
        |s| send(s, 90_000_000, 1),
        |s| {
            // Reads at 80 % of the link's rate, paced by its own clock.
            let t0 = Instant::now();
            let mut total = 0u64;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                total += n as u64;
                let due = t0 + Duration::from_secs_f64(total as f64 / (0.8 * RATE_BYTES));
                thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        },
    );
    let f = to_destination(&record);
    let ratio = f["ratio"].as_f64().unwrap_or_else(|| panic!("{f}"));
    // 0.813 - 0.828 on VM-C. Above 0.8 by the end: the last megabytes sit in the kernel's
    // buffers when the link hands them over (the send buffer grows to 1 - 3 MB), and the
    // destination's 0.1 - 0.3 s to read them counts as idle; 90 MB keep that small.
    eprintln!("slow destination: {f}");
    assert!((0.75..=0.85).contains(&ratio), "ratio {ratio}: {f}");
    let dest = f["shortfall_bytes"]["destination"].as_u64().unwrap();
    let late = f["shortfall_bytes"]["late"].as_u64().unwrap();
    assert!(dest > 4 * late, "the shortfall is the destination's: {f}");
    // The log says so at WARN, with the cause.
    let warn = log
        .json()
        .into_iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("link fidelity low"))
        })
        .unwrap_or_else(|| panic!("no WARN line: {:?}", log.lines()));
    assert_eq!(warn["level"], "WARN", "{warn}");
    assert_eq!(warn["direction"], "to_destination", "{warn}");
    assert!(
        warn["hint"].as_str().unwrap().starts_with("destination"),
        "{warn}"
    );
    assert!(warn["host_cpu_stolen_percent"].is_number(), "{warn}");
}

#[test]
fn a_healthy_destination_gets_the_full_rate_and_no_warning() {
    let (record, log) = through_link("fidelity-healthy", |s| send(s, 20_000_000, 2), drain);
    let f = to_destination(&record);
    let ratio = f["ratio"].as_f64().unwrap_or_else(|| panic!("{f}"));
    assert!(ratio >= 0.99, "ratio {ratio}: {f}");
    // Backlogged for about the whole transfer: 20 MB at 12.5 MB/s.
    let backlogged = f["backlogged_seconds"].as_f64().unwrap();
    assert!((1.5..2.0).contains(&backlogged), "{f}");
    assert!(
        !log.lines().iter().any(|l| l.contains("link fidelity low")),
        "{:?}",
        log.lines()
    );
    // The return path carried nothing: no ratio.
    assert!(
        record["fidelity"]["to_source"]["ratio"].is_null(),
        "{record}"
    );
    // The host's share of stolen CPU time over the migration (Linux reports it).
    let stolen = record["fidelity"]["host_cpu_stolen"]
        .as_f64()
        .unwrap_or_else(|| panic!("no host_cpu_stolen: {record}"));
    assert!((0.0..=1.0).contains(&stolen), "{record}");
}

#[test]
fn a_source_that_pauses_is_idle_not_short() {
    let (record, _) = through_link(
        "fidelity-bursty",
        |s| {
            // 20 bursts of 150 kB (12 ms of link each), 30 ms of silence after each.
            for i in 0..20 {
                send(s, 150_000, 10 + i);
                thread::sleep(Duration::from_millis(30));
            }
        },
        drain,
    );
    let f = to_destination(&record);
    let ratio = f["ratio"].as_f64().unwrap_or_else(|| panic!("{f}"));
    assert!(ratio >= 0.99, "ratio {ratio}: {f}");
    let idle: f64 = f["idle_seconds"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_f64)
        .sum();
    assert!(idle >= 0.3, "the pauses are idle time: {f}");
}
