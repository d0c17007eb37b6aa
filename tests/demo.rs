//! `migshaper demo` end to end: the bundled capture replayed through the real binary.

mod common;

use common::migshaper;

#[test]
fn demo_replays_the_bundled_migration_at_both_links() {
    let out = migshaper()
        .args(["demo", "--links", "10g,unlimited"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("outcome completed").count(), 2, "{stdout}");
    for phase in ["setup", "precopy", "downtime", "postcopy", "total"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(phase)),
            "no {phase} row: {stdout}"
        );
    }
    // The bundled migration is a hybrid post-copy one: it has page requests, and the
    // 10g run cannot be slower than the unlimited one by much, nor faster than 10 Gb/s.
    let requests: Vec<u64> = stdout
        .lines()
        .filter_map(|l| {
            l.split(" post-copy page requests")
                .next()?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(requests.len(), 2, "{stdout}");
    assert!(requests[0] > 0 && requests[0] == requests[1], "{stdout}");
    // Both links report their fidelity: the shaped one a ratio, the unlimited one none.
    let fidelity: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(": link fidelity"))
        .collect();
    assert_eq!(fidelity.len(), 2, "{stdout}");
    assert!(
        fidelity[0].starts_with("10g: link fidelity ") && fidelity[0].contains(" %"),
        "{stdout}"
    );
    assert!(
        fidelity[1].starts_with("unlimited: link fidelity n/a"),
        "{stdout}"
    );
}

#[test]
fn demo_rejects_a_bad_link_or_a_missing_capture_with_exit_2() {
    let out = migshaper()
        .args(["demo", "--links", "1q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1q"));
    let out = migshaper()
        .args(["demo", "--capture", "/nonexistent/capture"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/capture"));
}
