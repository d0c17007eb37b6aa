//! Throughput of the sans-IO QEMU stream parser on the real captures.
//!
//! Every capture of `fixtures/*/` (main channels `c0.s2d`, multifd channels `c<N>.s2d`,
//! the return path `c0.d2s`) is decompressed once into memory, then each iteration feeds it
//! through a fresh parser in 64 KiB chunks (the size of a proxy read), draining the events
//! after every chunk as a proxy does, and calls `finish`. Multifd channels get the page size
//! their main channel learned, as the proxy would pass it on.
//!
//! Before measuring, each capture is parsed once and checked: every byte attributed to a
//! phase and no desync, so that the figures are those of a real parse and never of the
//! opaque fast path.
//!
//! Target: at least 10 GB/s per capture (criterion prints GiB/s; 10 GB/s = 9.31 GiB/s).
//!
//! Run: `cargo bench --bench parser` (filter: `cargo bench --bench parser -- multifd`).
//! Fixtures: the repository's `fixtures/`, or `$MIGSHAPER_FIXTURES`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use migshaper::qemu::{ChannelKind, Outcome, ReturnPathParser, Stats, StreamParser};

/// Bytes per `feed` call.
const CHUNK: usize = 64 * 1024;

#[path = "../tests/common/fixtures.rs"]
mod fixtures;
use fixtures::load_capture as load;

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("MIGSHAPER_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => fixtures::fixtures_dir(),
    }
}

/// One capture to benchmark.
struct Capture {
    /// `fixture/cN.dir`.
    name: String,
    data: Vec<u8>,
    /// Return path (destination→source of connection 0).
    return_path: bool,
    /// Page size hint for a multifd channel (from its main channel).
    page_hint: Option<u32>,
}

/// `(connection, d2s)` → path for the `c<N>.{s2d,d2s}.bin.zst` files of a fixture.
fn capture_files(dir: &Path) -> BTreeMap<(u32, bool), PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((num, tail)) = name.strip_prefix('c').and_then(|r| r.split_once('.')) else {
            continue;
        };
        let Ok(num) = num.parse::<u32>() else {
            continue;
        };
        let d2s = match tail {
            "s2d.bin.zst" => false,
            "d2s.bin.zst" => true,
            _ => continue,
        };
        out.insert((num, d2s), path);
    }
    out
}

fn parse_stream(data: &[u8], page_hint: Option<u32>) -> StreamParser {
    let mut p = StreamParser::new();
    if let Some(ps) = page_hint {
        p.set_page_size_hint(ps);
    }
    for chunk in data.chunks(CHUNK) {
        p.feed(chunk, Instant::now());
        while let Some(e) = p.poll_event() {
            black_box(e);
        }
    }
    p.finish(Instant::now());
    while let Some(e) = p.poll_event() {
        black_box(e);
    }
    p
}

fn parse_return_path(data: &[u8]) -> ReturnPathParser {
    let mut p = ReturnPathParser::new();
    for chunk in data.chunks(CHUNK) {
        p.feed(chunk, Instant::now());
        while let Some(e) = p.poll_event() {
            black_box(e);
        }
    }
    p.finish(Instant::now());
    while let Some(e) = p.poll_event() {
        black_box(e);
    }
    p
}

fn check(name: &str, len: usize, s: &Stats, outcome: Outcome) {
    assert_eq!(s.total_bytes, len as u64, "{name}: total_bytes");
    assert_eq!(
        s.phases.sum(),
        s.total_bytes,
        "{name}: phase tallies do not add up"
    );
    assert!(
        outcome == Outcome::Completed,
        "{name}: outcome {outcome:?}: the benchmark would not measure a real parse"
    );
}

/// Loads and validates every capture, main channel first in each fixture.
fn load_captures() -> Vec<Capture> {
    let root = fixtures_dir();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| {
            panic!(
                "fixture directory {}: {e} (set MIGSHAPER_FIXTURES to the captures)",
                root.display()
            )
        })
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let fixture = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_owned();
        let mut main_page_size = None;
        for ((conn, d2s), path) in capture_files(&dir) {
            let data = load(&path);
            let name = format!("{fixture}/c{conn}.{}", if d2s { "d2s" } else { "s2d" });
            if d2s {
                if conn != 0 {
                    continue; // only the main connection has a return path
                }
                let p = parse_return_path(&data);
                check(&name, data.len(), p.stats(), p.outcome());
                out.push(Capture {
                    name,
                    data,
                    return_path: true,
                    page_hint: None,
                });
                continue;
            }
            // Connection 0 sorts first: the main channel's page size is known for the rest.
            let hint = if conn == 0 { None } else { main_page_size };
            let p = parse_stream(&data, hint);
            let s = p.stats();
            check(&name, data.len(), p.stats(), p.outcome());
            match p.channel() {
                Some(ChannelKind::Main) => main_page_size = s.page_size,
                Some(ChannelKind::Multifd) => {}
                other => panic!("{name}: unexpected channel kind {other:?}"),
            }
            out.push(Capture {
                name,
                data,
                return_path: false,
                page_hint: hint,
            });
        }
    }
    assert!(!out.is_empty(), "no capture found under {}", root.display());
    out
}

fn parser_throughput(c: &mut Criterion) {
    let captures = load_captures();
    let mut g = c.benchmark_group("parser");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for cap in &captures {
        g.throughput(Throughput::Bytes(cap.data.len() as u64));
        if cap.return_path {
            g.bench_function(&cap.name, |b| {
                b.iter(|| black_box(*parse_return_path(black_box(&cap.data)).stats()))
            });
        } else {
            g.bench_function(&cap.name, |b| {
                b.iter(|| black_box(*parse_stream(black_box(&cap.data), cap.page_hint).stats()))
            });
        }
    }
    // Every capture, each through a fresh parser, as one workload: the aggregate rate.
    let total: usize = captures.iter().map(|c| c.data.len()).sum();
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("all captures", |b| {
        b.iter(|| {
            for cap in &captures {
                if cap.return_path {
                    black_box(*parse_return_path(black_box(&cap.data)).stats());
                } else {
                    black_box(*parse_stream(black_box(&cap.data), cap.page_hint).stats());
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, parser_throughput);
criterion_main!(benches);
