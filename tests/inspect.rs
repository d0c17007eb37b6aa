//! `migshaper inspect` against the real QEMU 7.2 captures (`fixtures/*/`): its RAM
//! counters must equal the source's final `query-migrate` (`result.json`) and its phases must
//! sum to the main channel's bytes. The binary itself is run for the JSON shape, a missing
//! file (exit 2) and bad input (empty, garbage, TLS, truncated, garbled: exit 0 with a clear
//! outcome).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use migshaper::inspect::{InspectOutcome, Report, inspect};

use common::fixtures::{fixture_dirs, fixtures_dir, plain_capture};
use common::migshaper;

/// The main capture, the return path if captured, and the multifd captures in order, as files
/// `inspect` reads (patched captures decompressed once, see tests/common/fixtures.rs).
fn fixture_files(dir: &Path) -> (PathBuf, Option<PathBuf>, Vec<PathBuf>) {
    let main = dir.join("c0.s2d.bin.zst");
    assert!(main.is_file(), "{} is missing", main.display());
    let rp = Some(dir.join("c0.d2s.bin.zst")).filter(|p| p.is_file());
    let multifd = (1..)
        .map(|n| dir.join(format!("c{n}.s2d.bin.zst")))
        .take_while(|p| p.is_file())
        .map(|p| plain_capture(&p))
        .collect();
    (plain_capture(&main), rp.map(|p| plain_capture(&p)), multifd)
}

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn u64_at(v: &serde_json::Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing or not an integer in {v}"))
}

fn assert_phases_sum(r: &Report, label: &str) {
    let p = r.phases;
    assert_eq!(
        p.setup + p.precopy + p.downtime + p.postcopy,
        r.bytes,
        "{label}: phases sum to bytes"
    );
}

#[test]
fn every_fixture_matches_query_migrate() {
    for dir in fixture_dirs() {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let (main, rp, multifd) = fixture_files(&dir);
        let r = inspect(&main, rp.as_deref(), &multifd)
            .unwrap_or_else(|e| panic!("{name}: inspect failed: {e}"));
        let result = read_json(&dir.join("result.json"));
        let summary = read_json(&dir.join("summary.json"));

        assert_eq!(r.outcome, InspectOutcome::Completed, "{name}");
        assert_eq!(r.channel, "main", "{name}");
        assert_eq!(r.page_size, Some(4096), "{name}");
        assert_eq!(r.opaque_bytes, 0, "{name}");
        assert_eq!(r.bytes, u64_at(&summary, "/connections/0/s2d"), "{name}");
        assert_phases_sum(&r, name);
        assert_eq!(
            r.return_path.bytes,
            u64_at(&summary, "/connections/0/d2s"),
            "{name}: return path bytes"
        );
        assert_eq!(r.multifd.channels, multifd.len() as u64, "{name}");
        assert!(r.precopy_passes >= 1, "{name}");

        let ram = |key: &str| u64_at(&result, &format!("/query_migrate/ram/{key}"));
        let checks = [
            ("ram.precopy_bytes", r.ram.precopy_bytes, "precopy-bytes"),
            ("ram.downtime_bytes", r.ram.downtime_bytes, "downtime-bytes"),
            ("ram.postcopy_bytes", r.ram.postcopy_bytes, "postcopy-bytes"),
            ("ram.normal_pages", r.ram.normal_pages, "normal"),
            ("ram.zero_pages", r.ram.zero_pages, "duplicate"),
            (
                "return_path.page_requests",
                r.return_path.page_requests,
                "postcopy-requests",
            ),
            ("multifd.bytes", r.multifd.bytes, "multifd-bytes"),
        ];
        for (ours, value, key) in checks {
            assert_eq!(value, ram(key), "{name}: {ours} vs query-migrate ram.{key}");
        }
        assert_eq!(
            r.ram.precopy_bytes + r.ram.downtime_bytes + r.ram.postcopy_bytes + r.multifd.bytes,
            ram("transferred"),
            "{name}: transferred"
        );

        // The ledger correction does not depend on the order the channels are given in.
        if multifd.len() > 1 {
            let reversed: Vec<PathBuf> = multifd.iter().rev().cloned().collect();
            let again = inspect(&main, rp.as_deref(), &reversed).expect("inspect reversed");
            assert_eq!(again.ram, r.ram, "{name}: multifd channels reversed");
            assert_eq!(
                again.multifd, r.multifd,
                "{name}: multifd channels reversed"
            );
        }

        // The human table renders without surprises.
        let table = r.to_string();
        assert!(table.contains("precopy-bytes"), "{name}: {table}");
        assert!(table.contains("completed"), "{name}: {table}");
    }
}

/// A fresh directory for this test's files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("migshaper-inspect-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

fn run(args: &[&std::ffi::OsStr]) -> Output {
    migshaper()
        .arg("inspect")
        .args(args)
        .output()
        .expect("run migshaper")
}

/// Runs `migshaper inspect --json` and parses its stdout; asserts exit 0.
fn run_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json".as_ref());
    let out = run(&all);
    assert!(
        out.status.success(),
        "inspect {all:?} failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn keys(v: &serde_json::Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

/// The exact shape the issue specifies.
fn assert_shape(v: &serde_json::Value) {
    assert_eq!(
        keys(v),
        [
            "bytes",
            "channel",
            "multifd",
            "opaque_bytes",
            "outcome",
            "page_size",
            "phases",
            "precopy_passes",
            "ram",
            "return_path"
        ]
    );
    assert_eq!(
        keys(&v["phases"]),
        ["downtime", "postcopy", "precopy", "setup"]
    );
    assert_eq!(
        keys(&v["ram"]),
        [
            "downtime_bytes",
            "normal_pages",
            "postcopy_bytes",
            "precopy_bytes",
            "zero_pages"
        ]
    );
    assert_eq!(keys(&v["return_path"]), ["bytes", "page_requests"]);
    assert_eq!(keys(&v["multifd"]), ["bytes", "channels"]);
    assert!(v["channel"].is_string() && v["outcome"].is_string(), "{v}");
    let phases: u64 = ["setup", "precopy", "downtime", "postcopy"]
        .iter()
        .map(|p| u64_at(v, &format!("/phases/{p}")))
        .sum();
    assert_eq!(phases, u64_at(v, "/bytes"), "phases sum to bytes: {v}");
}

#[test]
fn binary_prints_the_documented_json() {
    let dir = fixtures_dir().join("postcopy-s64-256m");
    let (main, rp, multifd) = fixture_files(&dir);
    assert!(multifd.is_empty());
    let rp = rp.expect("postcopy fixture has a return path");
    let v = run_json(&[main.as_os_str(), "--return-path".as_ref(), rp.as_os_str()]);
    assert_shape(&v);
    assert_eq!(v["channel"], "main");
    assert_eq!(v["outcome"], "completed");
    assert_eq!(v["page_size"], 4096);
    assert_eq!(v["bytes"], 304_474_105);
    assert_eq!(v["phases"]["setup"], 231);
    assert_eq!(v["phases"]["postcopy"], 67_556_015);
    assert_eq!(v["ram"]["postcopy_bytes"], 67_555_967);
    assert_eq!(v["return_path"]["bytes"], 1855);
    assert_eq!(v["return_path"]["page_requests"], 113);
    assert_eq!(v["multifd"]["channels"], 0);
    assert_eq!(v["multifd"]["bytes"], 0);

    // Multifd channels given after `--multifd`, and the table without `--json`.
    let dir = fixtures_dir().join("multifd2-idle-256m");
    let (main, _, multifd) = fixture_files(&dir);
    let mut args = vec![main.as_os_str(), "--multifd".as_ref()];
    args.extend(multifd.iter().map(|p| p.as_os_str()));
    let v = run_json(&args);
    assert_shape(&v);
    assert_eq!(v["outcome"], "completed");
    assert_eq!(v["multifd"]["channels"], 2);
    assert_eq!(v["multifd"]["bytes"], 56_104_448);
    assert_eq!(v["ram"]["normal_pages"], 13_638);
    let out = run(&args);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for word in [
        "setup", "precopy", "downtime", "postcopy", "normal", "multifd",
    ] {
        assert!(table.contains(word), "table lacks {word}:\n{table}");
    }
}

#[test]
fn missing_or_unreadable_file_exits_2_naming_it() {
    let dir = temp_dir("missing");
    let missing = dir.join("no-such-capture.s2d.bin.zst");
    let out = run(&[missing.as_os_str(), "--json".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-capture.s2d.bin.zst"), "stderr: {err}");
    assert!(out.stdout.is_empty());

    // A missing return path or multifd file fails the same way, before any parsing.
    let main = plain_capture(&fixtures_dir().join("precopy-idle-256m/c0.s2d.bin.zst"));
    for flag in ["--return-path", "--multifd"] {
        let missing = dir.join("absent-aux.bin");
        let out = run(&[main.as_os_str(), flag.as_ref(), missing.as_os_str()]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("absent-aux.bin"), "{flag}: {err}");
    }

    // A directory is unreadable as a capture.
    let out = run(&[dir.as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&*dir.to_string_lossy()));

    // A `.zst` name over bytes that are not zstd.
    let fake = dir.join("plain.bin.zst");
    std::fs::write(&fake, b"QEVM\0\0\0\x03 not compressed").expect("write");
    let out = run(&[fake.as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plain.bin.zst") && err.contains("zstd"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first `n` bytes of a capture (a fixture's `.zst`, or a plain file).
fn prefix(path: &Path, n: u64) -> Vec<u8> {
    let mut data = if path.extension().is_some_and(|e| e == "zst") {
        common::fixtures::load_capture(path)
    } else {
        std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    data.truncate(usize::try_from(n).unwrap_or(usize::MAX));
    data
}

#[test]
fn bad_input_is_counted_with_a_clear_outcome() {
    let dir = temp_dir("bad");
    let real = fixtures_dir().join("precopy-s64-256m/c0.s2d.bin.zst");
    let head = prefix(&real, 1 << 20);
    assert_eq!(head.len(), 1 << 20);

    let mut garbled = prefix(&real, 64 << 10);
    garbled.extend(std::iter::repeat_n(0xa5_u8, 100_000));

    let mut tls = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    tls.extend((0..5000u32).map(|i| (i * 7 + 3) as u8));

    let garbage: Vec<u8> = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
        .iter()
        .copied()
        .cycle()
        .take(10_000)
        .collect();

    let cases: [(&str, Vec<u8>, &str, &str); 5] = [
        ("empty.bin", Vec::new(), "empty", "none"),
        ("garbage.bin", garbage, "not_qemu", "unknown"),
        ("tls.bin", tls, "tls", "tls"),
        ("truncated.bin", head, "truncated", "main"),
        ("garbled.bin", garbled, "garbled", "main"),
    ];
    for (name, data, outcome, channel) in cases {
        let path = dir.join(name);
        std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v = run_json(&[path.as_os_str()]);
        assert_shape(&v);
        assert_eq!(v["outcome"], outcome, "{name}: {v}");
        assert_ne!(v["outcome"], "completed", "{name}");
        assert_eq!(v["channel"], channel, "{name}: {v}");
        assert_eq!(
            u64_at(&v, "/bytes"),
            data.len() as u64,
            "{name}: all bytes counted"
        );

        // The same bytes zstd-compressed give the same report.
        let zst = dir.join(format!("{name}.zst"));
        let compressed = zstd::stream::encode_all(&data[..], 1).expect("compress");
        std::fs::write(&zst, compressed).expect("write");
        assert_eq!(run_json(&[zst.as_os_str()]), v, "{name}.zst");

        // And the table renders.
        let out = run(&[path.as_os_str()]);
        assert!(out.status.success(), "{name}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(outcome),
            "{name}"
        );
    }

    // A truncated multifd channel makes the whole migration "truncated".
    let fixture = fixtures_dir().join("multifd2-idle-256m");
    let (main, _, multifd) = fixture_files(&fixture);
    let cut = dir.join("c1.cut.bin");
    std::fs::write(&cut, prefix(&multifd[0], 1_000_000)).expect("write");
    let r = inspect(&main, None, &[cut, multifd[1].clone()]).expect("inspect");
    assert_eq!(r.outcome, InspectOutcome::Truncated);
    assert_phases_sum(&r, "cut multifd");
    let _ = std::fs::remove_dir_all(&dir);
}
