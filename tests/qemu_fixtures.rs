//! The QEMU stream parser against real QEMU 7.2 captures (`fixtures/*/`): every RAM
//! counter must equal the source's final `query-migrate` (`result.json`), every byte must be
//! attributed to a phase, and feeding in random splits or byte by byte must not change a
//! single counter or event.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migshaper::qemu::{
    ChannelKind, Event, EventKind, MultifdLedger, Outcome, Phase, ReturnPathParser, Stats,
    StreamParser,
};

use common::fixtures::{fixture_dirs, fixtures_dir, load_capture as load};

/// `c<N>.s2d.bin.zst` / `c<N>.d2s.bin.zst` files of a fixture, by connection number.
fn captures(dir: &Path) -> BTreeMap<(u32, bool), PathBuf> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read fixture") {
        let path = e.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        let Some(rest) = name.strip_prefix('c') else {
            continue;
        };
        let Some((num, tail)) = rest.split_once('.') else {
            continue;
        };
        let Ok(num) = num.parse::<u32>() else {
            continue;
        };
        match tail {
            "s2d.bin.zst" => out.insert((num, false), path),
            "d2s.bin.zst" => out.insert((num, true), path),
            _ => continue,
        };
    }
    out
}

fn drain_stream(p: &mut StreamParser, into: &mut Vec<Event>) {
    while let Some(e) = p.poll_event() {
        into.push(e);
    }
}

/// Parses a source→destination capture fed in `chunks`, returning stats, outcome, events.
fn run_stream(data: &[u8], chunks: &[usize], now: Instant) -> (Stats, Outcome, Vec<Event>) {
    let mut p = StreamParser::new();
    let mut events = Vec::new();
    let mut at = 0;
    for &n in chunks {
        let end = (at + n).min(data.len());
        p.feed(&data[at..end], now);
        drain_stream(&mut p, &mut events);
        at = end;
    }
    p.feed(&data[at..], now);
    p.finish(now);
    drain_stream(&mut p, &mut events);
    (*p.stats(), p.outcome(), events)
}

fn ram_u64(ram: &serde_json::Value, key: &str) -> u64 {
    ram.get(key)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("query_migrate.ram.{key} missing"))
}

#[test]
fn every_fixture_matches_query_migrate() {
    for dir in fixture_dirs() {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_owned();
        let result: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("result.json")).expect("read result.json"),
        )
        .expect("parse result.json");
        let ram = &result["query_migrate"]["ram"];
        // The relay that recorded the 256 MiB captures calls post-copy after a pass
        // "postcopy"; scripts/lab calls it "hybrid".
        let postcopy_mode = matches!(
            result["config"]["mode"].as_str(),
            Some("postcopy" | "hybrid" | "postcopy-preempt")
        );
        let now = Instant::now();

        let mut total = Stats::default().ram;
        let mut ledger = MultifdLedger::new();
        let mut main_passes = None;
        for ((conn, d2s), path) in captures(&dir) {
            let data = load(&path);
            let label = format!("{name}/{}", path.display());
            let stats = if d2s {
                let mut p = ReturnPathParser::new();
                p.feed(&data, now);
                p.finish(now);
                assert_eq!(p.outcome(), Outcome::Completed, "{label}");
                assert_eq!(p.shut_code(), Some(0), "{label}");
                *p.stats()
            } else {
                let (stats, outcome, events) = run_stream(&data, &[1 << 20; 4096], now);
                assert_eq!(outcome, Outcome::Completed, "{label}");
                let kind = events.iter().find_map(|e| match e.kind {
                    EventKind::Channel(k) => Some(k),
                    _ => None,
                });
                let expected = if conn == 0 {
                    ChannelKind::Main
                } else {
                    ChannelKind::Multifd
                };
                assert_eq!(kind, Some(expected), "{label}");
                for e in &events {
                    if let EventKind::MultifdPacket(p) = e.kind {
                        ledger.record(&p);
                    }
                }
                if conn == 0 {
                    main_passes = Some(stats.passes);
                    assert!(events.iter().any(|e| e.kind == EventKind::Eof), "{label}");
                }
                stats
            };
            assert_eq!(stats.total_bytes, data.len() as u64, "{label}");
            assert_eq!(stats.phases.sum(), stats.total_bytes, "{label}: phases sum");
            assert_eq!(stats.unattributed_bytes, 0, "{label}");
            assert_eq!(stats.opaque_bytes, 0, "{label}");
            if d2s {
                assert_eq!(stats.phases.return_path, stats.total_bytes, "{label}");
            }
            if conn == 0 && !d2s {
                assert_eq!(stats.page_size, Some(4096), "{label}");
                assert_eq!(ram_u64(ram, "page-size"), 4096, "{label}");
            }
            let r = stats.ram;
            total.precopy_bytes += r.precopy_bytes;
            total.downtime_bytes += r.downtime_bytes;
            total.postcopy_bytes += r.postcopy_bytes;
            total.normal_pages += r.normal_pages;
            total.zero_pages += r.zero_pages;
            total.multifd_bytes += r.multifd_bytes;
            total.page_requests += r.page_requests;
        }
        total.normal_pages -= ledger.repeated_pages();

        let check = |what: &str, ours: u64, key: &str| {
            assert_eq!(
                ours,
                ram_u64(ram, key),
                "{name}: {what} vs query-migrate {key}"
            );
        };
        check("precopy_bytes", total.precopy_bytes, "precopy-bytes");
        check("downtime_bytes", total.downtime_bytes, "downtime-bytes");
        check("postcopy_bytes", total.postcopy_bytes, "postcopy-bytes");
        check("normal_pages", total.normal_pages, "normal");
        check("zero_pages", total.zero_pages, "duplicate");
        check("multifd_bytes", total.multifd_bytes, "multifd-bytes");
        check("page_requests", total.page_requests, "postcopy-requests");
        check("transferred", total.transferred(), "transferred");
        check(
            "normal_pages * page size",
            total.normal_pages * 4096,
            "normal-bytes",
        );

        // dirty-sync-count: one sync at setup, one per wrap of the page scan, then two at
        // precopy completion (pending check + final) or one at the postcopy switch; 7.2
        // multifd did a single final sync.
        let passes = u64::from(main_passes.expect("main channel"));
        let multifd = ram_u64(ram, "multifd-bytes") > 0;
        let extra = if postcopy_mode || multifd { 1 } else { 2 };
        check("passes + syncs", passes + extra, "dirty-sync-count");
    }
}

#[test]
fn phases_follow_the_fixture_streams() {
    let dir = fixtures_dir().join("postcopy-s64-256m");
    let data = load(&dir.join("c0.s2d.bin.zst"));
    let (stats, _, events) = run_stream(&data, &[1 << 20; 4096], Instant::now());
    let changes: Vec<(u64, Phase)> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::PhaseChanged { to, .. } => Some((e.offset, to)),
            _ => None,
        })
        .collect();
    // Offsets from the fixture's reference reading (streamparse.txt).
    assert_eq!(
        changes,
        vec![
            (231, Phase::Precopy),
            (236_904_271, Phase::Downtime),
            (236_918_090, Phase::Postcopy),
        ]
    );
    assert_eq!(stats.phases.setup, 231);
    assert_eq!(stats.phases.precopy, 236_904_040);
    assert_eq!(stats.phases.downtime, 13_819);
    assert_eq!(stats.phases.postcopy, 67_556_015);
}

/// A small deterministic generator (no dev-dependency needed for split sizes).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// Events without their timestamps, which depend on `now` only.
fn untimed(events: &[Event]) -> Vec<(u64, EventKind)> {
    events.iter().map(|e| (e.offset, e.kind)).collect()
}

#[test]
fn random_splits_and_byte_by_byte_give_identical_results() {
    let now = Instant::now();
    for (fixture, file) in [
        ("precopy-idle-256m", "c0.s2d.bin.zst"),
        ("postcopy-s64-256m", "c0.s2d.bin.zst"),
        ("multifd2-idle-256m", "c0.s2d.bin.zst"),
        ("multifd2-idle-256m", "c1.s2d.bin.zst"),
    ] {
        let data = load(&fixtures_dir().join(fixture).join(file));
        let whole = run_stream(&data, &[], now);
        let mut rng = Lcg(0x5eed ^ data.len() as u64);
        for round in 0..3 {
            // Split sizes from 1 byte to 64 KiB, biased small to cut headers everywhere.
            let mut chunks = Vec::new();
            let mut left = data.len();
            while left > 0 {
                let max = [16, 600, 70_000][(rng.next() % 3) as usize];
                let n = (1 + (rng.next() % max) as usize).min(left);
                chunks.push(n);
                left -= n;
            }
            let split = run_stream(&data, &chunks, now);
            assert_eq!(split.0, whole.0, "{fixture}/{file} round {round}: stats");
            assert_eq!(split.1, whole.1, "{fixture}/{file} round {round}: outcome");
            assert_eq!(
                untimed(&split.2),
                untimed(&whole.2),
                "{fixture}/{file} round {round}: events"
            );
        }
        // Byte by byte over a prefix that covers setup, precopy and (for the small main
        // channel) the whole downtime with its device sections.
        let prefix = &data[..data.len().min(4 << 20)];
        let whole_prefix = run_stream(prefix, &[], now);
        let ones = vec![1; prefix.len()];
        let bytewise = run_stream(prefix, &ones, now);
        assert_eq!(
            bytewise.0, whole_prefix.0,
            "{fixture}/{file}: byte by byte stats"
        );
        assert_eq!(
            bytewise.1, whole_prefix.1,
            "{fixture}/{file}: byte by byte outcome"
        );
        assert_eq!(
            untimed(&bytewise.2),
            untimed(&whole_prefix.2),
            "{fixture}/{file}"
        );
    }
}

#[test]
fn return_path_byte_by_byte_is_identical() {
    let data = load(&fixtures_dir().join("postcopy-s64-256m/c0.d2s.bin.zst"));
    let now = Instant::now();
    let mut whole = ReturnPathParser::new();
    whole.feed(&data, now);
    whole.finish(now);
    let mut bytes = ReturnPathParser::new();
    for b in data.chunks(1) {
        bytes.feed(b, now + Duration::from_millis(1));
    }
    bytes.finish(now);
    assert_eq!(whole.stats(), bytes.stats());
    assert_eq!(whole.outcome(), bytes.outcome());
    let mut a = Vec::new();
    while let Some(e) = whole.poll_event() {
        a.push((e.offset, e.kind));
    }
    let mut b = Vec::new();
    while let Some(e) = bytes.poll_event() {
        b.push((e.offset, e.kind));
    }
    assert_eq!(a, b);
    assert_eq!(a.len(), 4 + 113 + 1, "4 PONGs, 113 page requests, SHUT");
}
