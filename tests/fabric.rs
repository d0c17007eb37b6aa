//! The fabric budget end to end through the real binary: two backlogged routes share a
//! fabric smaller than their links in proportion to their rates and their records say so
//! (cause `fabric`); a fabric above the sum takes nothing; `oversubscribe = "refuse"`
//! refuses a second migration at accept (before any upstream connect) with a record, a log
//! line and a counter, and leaves the first one alone; `GET /fabric`, `PUT /fabric` and the
//! fabric's metrics. (The sharing arithmetic on fake time: `src/link/bucket.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Seeded, Spawned, TempDir, migshaper, series};
use serde_json::Value;

/// A destination that accepts one connection, reads everything and notes, per read, when
/// and how many bytes had arrived so far.
struct Destination {
    addr: SocketAddr,
    reader: thread::JoinHandle<Vec<(Instant, u64)>>,
}

impl Destination {
    fn start() -> Destination {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let reader = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            let mut marks = Vec::new();
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return marks,
                    Ok(n) => {
                        total += n as u64;
                        marks.push((Instant::now(), total));
                    }
                }
            }
        });
        Destination { addr, reader }
    }
}

/// Bytes that had arrived by `t` (the last mark at or before it).
fn arrived_by(marks: &[(Instant, u64)], t: Instant) -> u64 {
    marks
        .iter()
        .take_while(|(at, _)| *at <= t)
        .last()
        .map_or(0, |m| m.1)
}

/// A config with two routes, `r100` (100 Mb/s) and `r250` (250 Mb/s), no framing, and a
/// fabric of `fabric` (no framing). 50 ms bursts: these tests check the sharing and its
/// accounting, not how late this host's timers fire.
fn two_routes(dir: &TempDir, fabric: &str, oversubscribe: &str, up: [SocketAddr; 2]) -> String {
    let text = format!(
        r#"
records = "{records}"

[fabric]
rate = "{fabric}"
framing = "none"
burst = "50ms"
oversubscribe = "{oversubscribe}"

[[route]]
name = "r100"
listen = "127.0.0.1:0"
upstream = "{a}"
link = "100mbit"
framing = "none"
burst = "50ms"

[[route]]
name = "r250"
listen = "127.0.0.1:0"
upstream = "{b}"
link = "250mbit"
framing = "none"
burst = "50ms"
"#,
        records = dir.path().join("records.jsonl").display(),
        a = up[0],
        b = up[1],
    );
    let path = dir.path().join("migshaper.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn serve(config: &str) -> Spawned {
    let mut cmd = migshaper();
    cmd.args(["serve", "--config", config, "--control", "127.0.0.1:0"]);
    Spawned::start(cmd)
}

/// The records written so far, by route.
fn records(dir: &TempDir) -> Vec<Value> {
    std::fs::read_to_string(dir.path().join("records.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn record_of<'a>(records: &'a [Value], route: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["route"] == route)
        .unwrap_or_else(|| panic!("no record for {route} in {records:?}"))
}

fn get(control: SocketAddr, path: &str) -> (u16, Value) {
    let mut resp = ureq::get(format!("http://{control}{path}"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_json().unwrap())
}

fn put(control: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    let mut resp = ureq::put(format!("http://{control}{path}"))
        .config()
        .http_status_as_error(false)
        .build()
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_json().unwrap())
}

fn metrics(control: SocketAddr) -> String {
    ureq::get(format!("http://{control}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// Both routes' sources write as fast as the link takes it for `secs`; returns each
/// route's payload rate (bit/s) over the middle of that time, when both were backlogged,
/// and the two records.
fn both_backlogged(fabric: &str, secs: f64) -> ([f64; 2], [Value; 2], Spawned) {
    let dir = TempDir::new(&format!("fabric-{fabric}"));
    let dests = [Destination::start(), Destination::start()];
    let config = two_routes(&dir, fabric, "share", [dests[0].addr, dests[1].addr]);
    let mut m = serve(&config);
    let start = Instant::now();
    let stop_at = start + Duration::from_secs_f64(secs);
    let sources: Vec<_> = ["r100", "r250"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let addr = m.route(name);
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                Seeded::new(i as u64).fill(&mut buf);
                while Instant::now() < stop_at {
                    s.write_all(&buf).unwrap();
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let _ = s.read_to_end(&mut Vec::new());
            })
        })
        .collect();
    for s in sources {
        s.join().unwrap();
    }
    let marks: Vec<_> = dests
        .into_iter()
        .map(|d| d.reader.join().unwrap())
        .collect();
    // The middle of the run: both connections open and backlogged.
    let (from, to) = (
        start + Duration::from_secs_f64(secs * 0.25),
        start + Duration::from_secs_f64(secs * 0.85),
    );
    let window = (to - from).as_secs_f64();
    let rates = [0, 1]
        .map(|i| (arrived_by(&marks[i], to) - arrived_by(&marks[i], from)) as f64 * 8.0 / window);
    eprintln!(
        "fabric {fabric}: r100 {:.2} Mb/s, r250 {:.2} Mb/s, sum {:.2} Mb/s",
        rates[0] / 1e6,
        rates[1] / 1e6,
        (rates[0] + rates[1]) / 1e6
    );
    m.log.wait_message("migration ended");
    m.log.wait_message("migration ended");
    let recs = records(&dir);
    let recs = [
        record_of(&recs, "r100").clone(),
        record_of(&recs, "r250").clone(),
    ];
    (rates, recs, m)
}

#[test]
fn two_backlogged_routes_share_a_smaller_fabric_in_proportion_and_say_so() {
    let (rates, recs, m) = both_backlogged("300mbit", 4.0);
    let sum = rates[0] + rates[1];
    assert!(
        (sum / 300e6 - 1.0).abs() <= 0.03,
        "sum {sum:.0} b/s, not 300 Mb/s ± 3 %: {rates:?}"
    );
    // 100:250 scaled to 300: 85.7 and 214.3 Mb/s.
    let split = rates[0] / rates[1];
    assert!(
        (split / 0.4 - 1.0).abs() <= 0.05,
        "split {split:.3}, not 100:250: {rates:?}"
    );
    for r in &recs {
        let f = &r["fidelity"]["to_destination"];
        let short = &f["shortfall_bytes"];
        let fabric = short["fabric"].as_u64().unwrap();
        assert!(
            fabric > short["late"].as_u64().unwrap() + short["destination"].as_u64().unwrap(),
            "the fabric is the main cause of the shortfall: {f}"
        );
        let ratio = f["ratio"].as_f64().unwrap();
        assert!(
            (0.80..=0.92).contains(&ratio),
            "ratio {ratio}: each route had 300/350 of its link: {f}"
        );
    }
    // The WARN line says the fabric did it and what to try.
    let lines = m.log.json();
    let warns: Vec<_> = lines
        .iter()
        .filter(|v| {
            v["level"] == "WARN"
                && v["fields"]["message"]
                    .as_str()
                    .or(v["message"].as_str())
                    .is_some_and(|t| t.starts_with("link fidelity low"))
        })
        .collect();
    assert!(!warns.is_empty(), "no fidelity warning: {lines:?}");
    for w in warns {
        let text = w.to_string();
        assert!(
            text.contains("fabric:") && text.contains("refuse"),
            "{text}"
        );
    }
}

#[test]
fn a_fabric_above_the_sum_of_the_links_takes_nothing() {
    let (rates, recs, m) = both_backlogged("400mbit", 3.0);
    for (rate, link) in rates.iter().zip([100e6, 250e6]) {
        assert!(
            (rate / link - 1.0).abs() <= 0.03,
            "{rate:.0} b/s on a {link} b/s link: {rates:?}"
        );
    }
    for r in &recs {
        let f = &r["fidelity"]["to_destination"];
        assert_eq!(f["shortfall_bytes"]["fabric"], 0, "{f}");
    }
    let text = metrics(m.control);
    assert_eq!(
        series(
            &text,
            "migshaper_fabric_rate_bytes_per_second",
            &[("direction", "to_destination")]
        ),
        Some(50e6)
    );
    assert!(
        series(
            &text,
            "migshaper_link_shortfall_bytes_total",
            &[
                ("route", "r250"),
                ("direction", "to_destination"),
                ("cause", "fabric")
            ]
        )
        .is_some()
    );
}

/// A source that opens a migration on `addr` and keeps it open, sending a little now and
/// then, until told to stop; returns what it sent.
fn hold_open(addr: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut rng = Seeded::new(7);
        let mut sent = Vec::new();
        let mut buf = vec![0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            rng.fill(&mut buf);
            s.write_all(&buf).unwrap();
            sent.extend_from_slice(&buf);
            thread::sleep(Duration::from_millis(20));
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
        sent
    })
}

#[test]
fn refuse_turns_away_a_migration_the_fabric_cannot_carry_and_leaves_the_first_alone() {
    let dir = TempDir::new("fabric-refuse");
    // r250's destination keeps what it gets; r100's must never see a connection.
    let keep = TcpListener::bind("127.0.0.1:0").unwrap();
    let never = TcpListener::bind("127.0.0.1:0").unwrap();
    never.set_nonblocking(true).unwrap();
    let up = [never.local_addr().unwrap(), keep.local_addr().unwrap()];
    let config = two_routes(&dir, "300mbit", "refuse", up);
    let mut m = serve(&config);
    let received = thread::spawn(move || {
        let (mut s, _) = keep.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let stop = Arc::new(AtomicBool::new(false));
    let first = hold_open(m.route("r250"), stop.clone());
    m.log.wait_message("migration started");
    let (status, fabric) = get(m.control, "/fabric");
    assert_eq!(status, 200, "{fabric}");
    assert_eq!(fabric["oversubscribe"], "refuse");
    assert_eq!(fabric["payload_rate_bits_per_second"], 300_000_000);
    assert_eq!(fabric["active_demand_bits_per_second"], 250_000_000);
    assert_eq!(fabric["headroom_bits_per_second"], 50_000_000);
    let r250 = fabric["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "r250")
        .unwrap();
    assert_eq!(r250["active"], true, "{fabric}");

    // A second migration on r100 would lift the active links to 350 Mb/s: refused.
    let mut second = TcpStream::connect(m.route("r100")).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = second.write_all(b"QEVM");
    let mut byte = [0u8; 1];
    let closed = matches!(second.read(&mut byte), Ok(0) | Err(_));
    assert!(closed, "the refused connection is closed");
    let line = m.log.wait_contains("migration refused");
    assert!(
        line.contains("r100") && line.contains("r250") && line.contains("share"),
        "{line}"
    );
    // Its record is written at once, with outcome `refused` and the reason.
    let refused = m.log.wait_for("the refused migration's end", |l| {
        let v: Value = serde_json::from_str(l).ok()?;
        (v["fields"]["message"] == "migration ended" || v["message"] == "migration ended")
            .then_some(v)
            .filter(|v| v.to_string().contains("r100"))
    });
    assert!(refused.to_string().contains("refused"), "{refused}");
    let recs = records(&dir);
    let rec = record_of(&recs, "r100");
    assert_eq!(rec["outcome"], "refused", "{rec}");
    let cause = rec["cause"].as_str().unwrap();
    assert!(cause.contains("300mbit") && cause.contains("r250"), "{rec}");
    // The destination behind r100 never saw a connection.
    assert_eq!(
        never.accept().map_err(|e| e.kind()).unwrap_err(),
        std::io::ErrorKind::WouldBlock
    );
    let text = metrics(m.control);
    assert_eq!(
        series(
            &text,
            "migshaper_connections_total",
            &[
                ("route", "r100"),
                ("channel", "unknown"),
                ("outcome", "refused")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            &text,
            "migshaper_migrations_total",
            &[("route", "r100"), ("outcome", "refused")]
        ),
        Some(1.0)
    );

    // The first migration went on: every byte arrived, in order.
    stop.store(true, Ordering::Relaxed);
    let sent = first.join().unwrap();
    let got = received.join().unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the first migration's bytes arrived unchanged");
    m.log.wait_message("migration ended");
    let recs = records(&dir);
    let first = record_of(&recs, "r250");
    assert_ne!(first["outcome"], "refused", "{first}");
    assert_eq!(
        common::sum(&first["bytes"]["to_destination"]),
        sent.len() as u64
    );
    // Once it ended, the fabric has room again.
    let (_, fabric) = get(m.control, "/fabric");
    assert_eq!(fabric["active_demand_bits_per_second"], 0, "{fabric}");
}

#[test]
fn the_fabric_changes_live_and_bad_changes_name_the_field() {
    let dir = TempDir::new("fabric-put");
    let unused = [
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    ];
    let up = [
        unused[0].local_addr().unwrap(),
        unused[1].local_addr().unwrap(),
    ];
    let config = two_routes(&dir, "300mbit", "share", up);
    let mut m = serve(&config);
    let (status, v) = put(
        m.control,
        "/fabric",
        r#"{"rate":"1g","oversubscribe":"refuse"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["oversubscribe"], "refuse");
    assert_eq!(v["payload_rate_bits_per_second"], 1_000_000_000);
    m.log.wait_message("fabric changed");
    for (body, field) in [
        (r#"{"rate":"fast"}"#, "rate"),
        (r#"{"rate":"unlimited"}"#, "rate"),
        (r#"{"oversubscribe":"maybe"}"#, "oversubscribe"),
        (r#"{"burst":4}"#, "burst"),
        (r#"{"color":"red"}"#, "color"),
    ] {
        let (status, v) = put(m.control, "/fabric", body);
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    // Nothing changed by the bad requests.
    let (_, v) = get(m.control, "/fabric");
    assert_eq!(v["payload_rate_bits_per_second"], 1_000_000_000);
    assert_eq!(v["oversubscribe"], "refuse");
    // A SIGHUP applies the file's [fabric] (the routes' links stay as they are).
    two_routes(&dir, "500mbit", "share", up);
    m.signal("HUP");
    m.log.wait_contains("config reload: fabric changed");
    let (_, v) = get(m.control, "/fabric");
    assert_eq!(v["payload_rate_bits_per_second"], 500_000_000, "{v}");
    assert_eq!(v["oversubscribe"], "share", "{v}");
    put(
        m.control,
        "/fabric",
        r#"{"rate":"1g","oversubscribe":"refuse"}"#,
    );
    // `status` shows the fabric.
    let out = migshaper()
        .args(["status", "--control", &format!("http://{}", m.control)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("fabric 1gbit (refuse): 1gbit of payload"),
        "{text}"
    );
}

#[test]
fn a_server_without_a_fabric_has_no_fabric_endpoint_or_series_and_bad_fabrics_exit_2() {
    let dest = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = migshaper();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(dest.local_addr().unwrap().to_string())
        .args(["--link", "1g", "--control", "127.0.0.1:0"]);
    let m = Spawned::start(cmd);
    let (status, v) = get(m.control, "/fabric");
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--fabric"), "{v}");
    assert!(!metrics(m.control).contains("migshaper_fabric_"));
    drop(m);

    let out = migshaper()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--link", "1g", "--fabric", "unlimited", "--control", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("fabric") && err.contains("rate"), "{err}");

    let dir = TempDir::new("fabric-bad");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[fabric]\nrate = \"10g\"\noversubscribe = \"sometimes\"\n\n[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nlink = \"1g\"\n",
    )
    .unwrap();
    let out = migshaper()
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--control", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("oversubscribe") && err.contains("sometimes"),
        "{err}"
    );
}
