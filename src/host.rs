//! What the host itself took from a run: CPU time stolen by a hypervisor.
//!
//! On a virtual machine the hypervisor may run something else on a vCPU that has work
//! (Linux counts that time as *steal* in `/proc/stat`). While it does, migshaper's wake-ups
//! are late and the receiving side does not read, whatever migshaper does: the link's
//! ledger books that time as `late` or `destination`, and no setting of migshaper's gets it
//! back. Each migration record therefore carries the share of the machine's CPU time that
//! was stolen while it ran, so that a low fidelity can be told apart from a slow host.
//!
//! On VM-C (2-core Firecracker VM), `cargo bench --bench link` measured 0.0 – 0.5 % stolen
//! while every 1g row held its rate, and 17.6 % over a round in which migshaper's 1g rows
//! fell to 0.79 – 0.97 of the rate (`docs/benchmarks.md`).

/// The machine's CPU time so far, in clock ticks: how much of it was stolen, out of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time a vCPU had work but the hypervisor ran something else.
    pub steal: u64,
    /// All CPU time: user, nice, system, idle, iowait, irq, softirq and steal.
    pub total: u64,
}

impl CpuTimes {
    /// The machine's counters now; None where `/proc/stat` is not there or not understood
    /// (not Linux), in which case nothing is reported.
    pub fn now() -> Option<CpuTimes> {
        parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The share of the CPU time between two readings that was stolen; None if either
    /// reading is missing (not Linux) or no time passed.
    pub fn stolen_between(before: Option<CpuTimes>, after: Option<CpuTimes>) -> Option<f64> {
        let (before, after) = (before?, after?);
        let total = after.total.checked_sub(before.total)?;
        if total == 0 {
            return None;
        }
        let steal = after.steal.saturating_sub(before.steal);
        Some((steal as f64 / total as f64).min(1.0))
    }
}

/// The aggregate `cpu` line of `/proc/stat`. Its first eight fields are user, nice, system,
/// idle, iowait, irq, softirq and steal (kernels before 2.6.11 have no steal field: None);
/// guest time is already inside user and nice.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 8 {
        return None;
    }
    Some(CpuTimes {
        steal: fields[7],
        total: fields.iter().sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  2586212 295128 493156 12263594 13356 0 92084 79247 0 0\n\
                        cpu0 1293106 147564 246578 6131797 6678 0 46042 39623 0 0\n\
                        intr 1 2 3\n";

    #[test]
    fn reads_the_aggregate_line() {
        let t = parse_proc_stat(STAT).unwrap();
        assert_eq!(t.steal, 79247);
        assert_eq!(
            t.total,
            2586212 + 295128 + 493156 + 12263594 + 13356 + 92084 + 79247
        );
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        assert_eq!(parse_proc_stat(""), None);
        assert_eq!(
            parse_proc_stat("cpu  1 2 3 4 5 6 7\n"),
            None,
            "no steal field"
        );
        assert_eq!(parse_proc_stat("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(
            parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n"),
            None,
            "not the aggregate"
        );
    }

    #[test]
    fn stolen_share_between_two_readings() {
        let a = CpuTimes {
            steal: 100,
            total: 1000,
        };
        let b = CpuTimes {
            steal: 276,
            total: 2000,
        };
        let between = CpuTimes::stolen_between;
        assert_eq!(between(Some(a), Some(b)), Some(0.176));
        assert_eq!(between(Some(a), Some(a)), None, "no time passed");
        assert_eq!(between(Some(b), Some(a)), None, "counters went backwards");
        assert_eq!(between(None, Some(b)), None, "no first reading");
        assert_eq!(between(Some(a), None), None, "no second reading");
    }
}
