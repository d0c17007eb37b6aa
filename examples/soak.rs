//! Soak test driver (run by `scripts/soak`): the migshaper binary carries seeded random data
//! both ways on N connections for a while, its link switched every few seconds through the
//! control API; every byte is checked, its RSS and CPU are sampled, its log is scanned.
//!
//!   cargo run --release --example soak -- [--secs 600] [--conns 8] [--switch 5s]
//!       [--links 1g,10g] [--binary target/release/migshaper]
//!
//! Then a second phase opens `--wide` connections (default 256) at full rate for
//! `--wide-secs` and reports the RSS. Prints a Markdown summary; exits 1 on any checksum
//! mismatch, transfer error, or an ERROR/WARN line in migshaper's log.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    secs: u64,
    conns: usize,
    switch: Duration,
    links: Vec<String>,
    binary: String,
    wide: usize,
    wide_secs: u64,
}

fn args() -> Args {
    let mut a = Args {
        secs: 600,
        conns: 8,
        switch: Duration::from_secs(5),
        links: vec!["1g".into(), "10g".into()],
        binary: "target/release/migshaper".into(),
        wide: 256,
        wide_secs: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--secs" => a.secs = v.parse().expect("--secs N"),
            "--conns" => a.conns = v.parse().expect("--conns N"),
            "--switch" => {
                a.switch = humantime::parse_duration(&v).expect("--switch DURATION");
            }
            "--links" => a.links = v.split(',').map(str::to_string).collect(),
            "--binary" => a.binary = v,
            "--wide" => a.wide = v.parse().expect("--wide N"),
            "--wide-secs" => a.wide_secs = v.parse().expect("--wide-secs N"),
            _ => panic!("unknown option {k}"),
        }
    }
    a
}

// The tests' seeded splitmix64 stream (cheap to generate and to check at GB/s) and their
// handle on the binary as a child process.
#[path = "../tests/common/mod.rs"]
mod common;
use common::{Log, Seeded, Spawned};

#[derive(Default)]
struct Totals {
    bytes: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
}

/// Sends the seeded stream until `stop`, then half-closes; the first `skip` bytes were
/// written already.
async fn send(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    seed: u64,
    stop: Arc<AtomicBool>,
    skip: usize,
) -> u64 {
    let mut g = Seeded::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = skip as u64;
    let mut from = skip;
    while !stop.load(Ordering::Relaxed) {
        g.fill(&mut buf);
        if w.write_all(&buf[from..]).await.is_err() {
            return u64::MAX;
        }
        sent += (buf.len() - from) as u64;
        from = 0;
    }
    let _ = w.shutdown().await;
    sent
}

/// Reads to EOF checking the seeded stream; counts bytes into `totals`.
async fn check(mut r: tokio::net::tcp::OwnedReadHalf, seed: u64, totals: Arc<Totals>) -> u64 {
    let mut g = Seeded::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => return got,
            Ok(n) => n,
            Err(_) => {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                return got;
            }
        };
        g.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            totals.mismatches.fetch_add(1, Ordering::Relaxed);
            return got;
        }
        got += n as u64;
        totals.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// `conns` connections through `via` to `sink`, both ways, until `stop`.
async fn run_conns(
    via: SocketAddr,
    sink: &TcpListener,
    conns: usize,
    seed0: u64,
    stop: Arc<AtomicBool>,
    totals: Arc<Totals>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..conns as u64 {
        let up = seed0 + 2 * i;
        let down = seed0 + 2 * i + 1;
        let mut c = TcpStream::connect(via).await.expect("connect to migshaper");
        // The source speaks first: migshaper connects a connection upstream only once it
        // has sent a byte, when it would open a migration.
        let mut first = [0u8; 1];
        Seeded::new(up).fill(&mut first);
        c.write_all(&first).await.expect("first byte to migshaper");
        let (d, _) = sink.accept().await.expect("accept from migshaper");
        let (cr, cw) = c.into_split();
        let (dr, dw) = d.into_split();
        let (s1, s2) = (stop.clone(), stop.clone());
        let (t1, t2, t3) = (totals.clone(), totals.clone(), totals.clone());
        tasks.push(tokio::spawn(async move {
            let (a, b, sent_up, sent_down) = tokio::join!(
                check(dr, up, t1),
                check(cr, down, t2),
                send(cw, up, s1, 1),
                send(dw, down, s2, 0)
            );
            if a != sent_up || b != sent_down {
                // Everything sent must arrive (sent == u64::MAX: a write failed).
                eprintln!("connection {i}: sent {sent_up}/{sent_down}, received {a}/{b}");
                t3.errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tasks
}

/// RSS of `pid` in KiB, 0 if it cannot be read.
fn rss_kib(pid: u32) -> u64 {
    common::rss_kib(pid).unwrap_or(0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    common::cpu_ticks(pid) as f64 / 100.0
}

fn start(binary: &str, upstream: SocketAddr, link: &str) -> Spawned {
    let mut cmd = Command::new(binary);
    cmd.args(["serve", "--name", "soak", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string(), "--link", link])
        .args(["--control", "127.0.0.1:0", "--no-parse"]);
    Spawned::start(cmd)
}

fn set_link(control: SocketAddr, link: &str) {
    let body = format!(r#"{{"link":"{link}"}}"#);
    ureq::put(format!("http://{control}/routes/soak/link"))
        .content_type("application/json")
        .send(body)
        .unwrap_or_else(|e| panic!("PUT link {link}: {e}"));
}

/// migshaper's ERROR and WARN lines.
fn log_problems(log: &Log) -> Vec<String> {
    log.lines()
        .into_iter()
        .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
        .collect()
}

#[tokio::main]
async fn main() {
    let a = args();
    let _ = migshaper::raise_fd_limit();
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();

    // Phase 1: N connections both ways, link switched every `switch`.
    let server = start(&a.binary, sink.local_addr().unwrap(), &a.links[0]);
    let pid = server.pid();
    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = run_conns(
        server.listen(),
        &sink,
        a.conns,
        1,
        stop.clone(),
        totals.clone(),
    )
    .await;
    let t0 = Instant::now();
    let bytes0 = totals.bytes.load(Ordering::Relaxed);
    let cpu0 = cpu_secs(pid);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut next_switch = t0 + a.switch;
    let mut li = 0;
    let mut switches = 0;
    let mut last_print = t0;
    while t0.elapsed() < Duration::from_secs(a.secs) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if Instant::now() >= next_switch {
            li = (li + 1) % a.links.len();
            let control = server.control;
            let link = a.links[li].clone();
            tokio::task::spawn_blocking(move || set_link(control, &link))
                .await
                .unwrap();
            switches += 1;
            next_switch += a.switch;
        }
        if samples
            .last()
            .is_none_or(|s| t0.elapsed().as_secs_f64() - s.0 >= 1.0)
        {
            samples.push((t0.elapsed().as_secs_f64(), rss_kib(pid)));
        }
        if last_print.elapsed() >= Duration::from_secs(30) {
            last_print = Instant::now();
            eprintln!(
                "soak: {:.0} s, {:.1} GB checked, RSS {} KiB, {} switches",
                t0.elapsed().as_secs_f64(),
                totals.bytes.load(Ordering::Relaxed) as f64 / 1e9,
                rss_kib(pid),
                switches
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    let window = totals.bytes.load(Ordering::Relaxed) - bytes0;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let moved = totals.bytes.load(Ordering::Relaxed);
    let after_minute: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= 60.0_f64.min(secs / 2.0))
        .map(|s| s.1)
        .collect();
    let (lo, hi) = (
        after_minute.iter().copied().min().unwrap_or(0),
        after_minute.iter().copied().max().unwrap_or(0),
    );
    let problems = log_problems(&server.log);
    drop(server);

    // Phase 2: many connections at full rate; RSS.
    let server = start(&a.binary, sink.local_addr().unwrap(), "10g");
    let wpid = server.pid();
    let wtotals = Arc::new(Totals::default());
    let wstop = Arc::new(AtomicBool::new(false));
    let wtasks = run_conns(
        server.listen(),
        &sink,
        a.wide,
        1000,
        wstop.clone(),
        wtotals.clone(),
    )
    .await;
    let w0 = Instant::now();
    let wbytes0 = wtotals.bytes.load(Ordering::Relaxed);
    let mut wide_max = 0;
    while w0.elapsed() < Duration::from_secs(a.wide_secs) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        wide_max = wide_max.max(rss_kib(wpid));
    }
    let wsecs = w0.elapsed().as_secs_f64();
    // The rate over the window only: not the ramp-up, not the drain after the stop.
    let wide_window = wtotals.bytes.load(Ordering::Relaxed) - wbytes0;
    wstop.store(true, Ordering::Relaxed);
    for t in wtasks {
        let _ = t.await;
    }
    let wide_moved = wide_window;
    let wide_problems = log_problems(&server.log);
    drop(server);

    let mismatches =
        totals.mismatches.load(Ordering::Relaxed) + wtotals.mismatches.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed) + wtotals.errors.load(Ordering::Relaxed);
    let steady = if lo > 0 {
        hi as f64 / lo as f64
    } else {
        f64::NAN
    };
    println!("| soak | value |\n|---|---|");
    println!(
        "| duration, connections | {secs:.0} s, {} both ways, link {} switched every {:?} ({switches} switches) |",
        a.conns,
        a.links.join("/"),
        a.switch
    );
    println!(
        "| bytes checked | {:.1} GB ({:.2} Gb/s mean over the run, both directions together) |",
        moved as f64 / 1e9,
        window as f64 * 8.0 / secs / 1e9
    );
    println!("| checksum mismatches, transfer errors | {mismatches}, {errors} |");
    println!(
        "| RSS after the first minute | {:.1}–{:.1} MB (max/min {steady:.3}) |",
        lo as f64 / 1024.0,
        hi as f64 / 1024.0
    );
    println!(
        "| migshaper CPU | {:.1} % of one core ({cpu:.0} s over {secs:.0} s) |",
        cpu / secs * 100.0
    );
    println!(
        "| ERROR/WARN log lines | {} |",
        problems.len() + wide_problems.len()
    );
    println!(
        "| {} connections at 10g | max RSS {:.1} MB, {:.2} Gb/s both directions together over {wsecs:.0} s |",
        a.wide,
        wide_max as f64 / 1024.0,
        wide_moved as f64 * 8.0 / wsecs / 1e9
    );
    for p in problems.iter().chain(&wide_problems).take(10) {
        eprintln!("soak: log: {p}");
    }
    let ok = mismatches == 0
        && errors == 0
        && problems.is_empty()
        && wide_problems.is_empty()
        && (steady.is_nan() || steady <= 1.10);
    if !ok {
        eprintln!("soak: FAILED");
        std::process::exit(1);
    }
}
