//! Per-migration accounting in the proxy: which connections belong to which migration, how
//! many bytes each phase carried in each direction, how long each phase lasted, and the
//! JSON record written when the migration ends.
//!
//! The first connection a route accepts while no migration is active opens one (QEMU always
//! connects its main channel first); connections that arrive while it is active (multifd,
//! preempt, a post-copy recovery) join it. The main channel's parser drives the phase;
//! other channels take the main channel's phase at the time their bytes pass. A migration
//! ends when its last connection has closed in both directions.
//!
//! The per-chunk work is one parser `feed` (sans-IO, ≥ 10 GB/s) and one short lock.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | one migration's lifecycle: its state, phase timeline, and the record it ends with |
//! | [`registry`](RouteAccounting) | a route's migrations: which one is active, the recent records |
//! | [`taps`](ForwardTap) | the per-connection taps that parse and book the bytes |
//! | [`record`](Record) | the record and live-view types (the JSON shapes) |
//! | [`sink`](RecordSink) | the records file |

mod record;
mod registry;
mod sink;
mod taps;

pub use record::{
    ActiveView, DirBytes, DirFidelity, FidelityRecord, LinkEntry, RamRecord, RateView, Record,
    Series,
};
pub use registry::{FIDELITY_WARN_BELOW, RouteAccounting, STOLEN_WARN_ABOVE};
pub use sink::RecordSink;
pub use taps::{ForwardTap, ReverseTap, connection_ended};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::host::CpuTimes;
use crate::link::{Direction, Fidelity};
use crate::metrics::MigrationOutcome;
use crate::qemu::{DesyncReason, MultifdLedger, Outcome, Phase, RamCounters, Stats};
use record::rfc3339;

/// One migration in progress.
#[derive(Debug)]
pub struct Migration {
    /// Unique id: route, start time, sequence.
    pub id: String,
    route: Arc<RouteAccounting>,
    started: SystemTime,
    start: Instant,
    /// The machine's CPU times when the migration began (None off Linux).
    cpu_at_start: Option<CpuTimes>,
    /// The main channel's phase (its [`Phase::index`]), read lock-free by the other
    /// channels.
    phase: AtomicU8,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open_conns: u32,
    /// Phase changes of the main channel: (phase, when); only [`Phase::MIGRATION`] phases.
    timeline: Vec<(Phase, Instant)>,
    /// Bytes per direction and migration phase, by [`Direction::index`] and [`Phase::index`].
    bytes: [[u64; 4]; 2],
    series: [Vec<u64>; 2],
    passes: u32,
    page_size: Option<u32>,
    ram: RamCounters,
    opaque_bytes: u64,
    page_requests: u64,
    channels: BTreeMap<&'static str, u32>,
    ledger: MultifdLedger,
    main_outcome: Option<Outcome>,
    shut: Option<u32>,
    failure: Option<String>,
    links: Vec<LinkEntry>,
    /// The main channel's RAM counters so far (multifd channels report at close).
    live_ram: RamCounters,
    /// Guest RAM size from the main channel's MEM_SIZE list.
    ram_total: u64,
    /// The link's ledger per direction when the current phase began.
    fidelity_mark: [Fidelity; 2],
    /// The link's ledger per direction and migration phase, up to the current phase.
    fidelity: [[Fidelity; 4]; 2],
}

impl State {
    /// Bytes per phase of direction `d`.
    fn phase_bytes(&self, d: Direction) -> BTreeMap<&'static str, u64> {
        per_phase(|p| self.bytes[d.index()][p.index()])
    }
}

/// A map from each migration phase's label to `f` of it: a record's per-phase fields.
fn per_phase<T>(f: impl Fn(Phase) -> T) -> BTreeMap<&'static str, T> {
    Phase::MIGRATION
        .iter()
        .map(|&p| (p.as_str(), f(p)))
        .collect()
}

impl Migration {
    fn new(id: String, route: Arc<RouteAccounting>) -> Self {
        let start = Instant::now();
        let state = State {
            timeline: vec![(Phase::Setup, start)],
            links: vec![LinkEntry::now(&route.link)],
            fidelity_mark: Direction::ALL.map(|d| route.link.fidelity(d)),
            ..State::default()
        };
        Migration {
            id,
            route,
            started: SystemTime::now(),
            start,
            cpu_at_start: CpuTimes::now(),
            phase: AtomicU8::new(Phase::Setup.index() as u8),
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The main channel's current phase.
    pub fn phase(&self) -> Phase {
        let i = usize::from(self.phase.load(Ordering::Relaxed));
        Phase::MIGRATION[i.min(Phase::MIGRATION.len() - 1)]
    }

    /// The main channel entered `to` at `at`.
    fn enter_phase(&self, st: &mut State, to: Phase, at: Instant) {
        let to = to.migration_phase();
        let from = st.timeline.last().map_or(Phase::Setup, |t| t.0);
        if st.timeline.last().is_some_and(|t| t.0 == to) {
            // Already there (pre-copy started on a multifd channel, then the main channel's
            // first RAM section says so too).
            return;
        }
        for d in Direction::ALL {
            let now = self.route.link.fidelity(d);
            let part = now.since(&st.fidelity_mark[d.index()]);
            st.fidelity[d.index()][from.index()].add(&part);
            st.fidelity_mark[d.index()] = now;
        }
        st.timeline.push((to, at));
        self.phase.store(to.index() as u8, Ordering::Relaxed);
        self.route.metrics.set_phase(Some(to));
    }

    /// A connection of this migration ended without its taps (upstream connect failed, or
    /// its task panicked): the migration is failed with `cause` and the connection counted
    /// closed, so the migration still ends and writes its record.
    pub fn abandon_connection(&self, cause: String) {
        self.fail(cause);
        self.connection_closed(None, Instant::now());
    }

    /// Marks the migration failed (the first cause wins).
    pub fn fail(&self, cause: String) {
        let mut st = self.lock();
        if st.failure.is_none() {
            st.failure = Some(cause);
        }
    }

    /// The link's fidelity over this migration so far, per direction, and the share of the
    /// machine's CPU time stolen since it began as of `cpu_now` (read by the caller before
    /// it took the state lock, which the pumps take for every chunk).
    fn fidelity_record(&self, st: &State, cpu_now: Option<CpuTimes>) -> FidelityRecord {
        let current = st.timeline.last().map_or(Phase::Setup, |t| t.0);
        let dir = |d: Direction| {
            let mut phases = st.fidelity[d.index()];
            let part = self
                .route
                .link
                .fidelity(d)
                .since(&st.fidelity_mark[d.index()]);
            phases[current.index()].add(&part);
            DirFidelity::from_phases(&phases)
        };
        FidelityRecord {
            to_destination: dir(Direction::ToDestination),
            to_source: dir(Direction::ToSource),
            host_cpu_stolen: CpuTimes::stolen_between(self.cpu_at_start, cpu_now)
                .map(record::round4),
        }
    }

    fn view(&self, now: Instant) -> Option<ActiveView> {
        let cpu_now = CpuTimes::now();
        let st = self.lock();
        if st.open_conns == 0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.start);
        // The last complete second of the series (or the mean so far, in the first one).
        let last = |d: Direction| -> u64 {
            let now_slot = series_slot(elapsed);
            let per_s = (Duration::from_secs(1).as_nanos() / SERIES_INTERVAL.as_nanos()) as usize;
            let s = &st.series[d.index()];
            if now_slot >= per_s {
                s.iter().skip(now_slot - per_s).take(per_s).sum()
            } else {
                let secs = elapsed.as_secs_f64();
                let n: u64 = s.iter().sum();
                if secs > 0.0 {
                    (n as f64 / secs) as u64
                } else {
                    0
                }
            }
        };
        let pages = st.live_ram.normal_pages + st.live_ram.zero_pages;
        Some(ActiveView {
            id: self.id.clone(),
            route: self.route.route.clone(),
            start: rfc3339(self.started),
            elapsed_s: elapsed.as_secs_f64(),
            phase: self.phase().as_str(),
            precopy_passes: st.passes,
            page_requests: st.page_requests,
            open_connections: st.open_conns,
            bytes: DirBytes {
                to_destination: st.phase_bytes(Direction::ToDestination),
                to_source: st.phase_bytes(Direction::ToSource),
            },
            rate_bytes_per_second: RateView {
                to_destination: last(Direction::ToDestination),
                to_source: last(Direction::ToSource),
            },
            ram_total_bytes: (st.ram_total > 0).then_some(st.ram_total),
            ram_pages_sent: pages,
            ram_sent_ratio: match (st.ram_total, st.page_size) {
                (total, Some(p)) if total > 0 => Some(pages as f64 * f64::from(p) / total as f64),
                _ => None,
            },
            links: st.links.clone(),
            fidelity: self.fidelity_record(&st, cpu_now),
        })
    }

    fn add_series(&self, st: &mut State, dir: Direction, n: u64, now: Instant) {
        let sec = series_slot(now.saturating_duration_since(self.start));
        let s = &mut st.series[dir.index()];
        if s.len() <= sec {
            s.resize(sec + 1, 0);
        }
        s[sec] += n;
    }

    /// A connection of this migration closed (both directions), with its channel's final
    /// parser state. The last one to close writes the record.
    fn connection_closed(&self, channel: Option<ChannelSummary>, now: Instant) {
        let cpu_now = CpuTimes::now();
        let mut st = self.lock();
        if let Some(c) = channel {
            *st.channels.entry(c.kind).or_insert(0) += 1;
            st.opaque_bytes += c.stats.opaque_bytes;
            let r = &c.stats.ram;
            st.ram.precopy_bytes += r.precopy_bytes;
            st.ram.downtime_bytes += r.downtime_bytes;
            st.ram.postcopy_bytes += r.postcopy_bytes;
            st.ram.normal_pages += r.normal_pages;
            st.ram.zero_pages += r.zero_pages;
            st.ram.multifd_bytes += r.multifd_bytes;
            if c.main {
                st.main_outcome = Some(c.outcome);
            }
        }
        st.open_conns = st.open_conns.saturating_sub(1);
        if st.open_conns > 0 {
            return;
        }
        let (record, outcome, phase_times) = self.record(&st, now, cpu_now);
        drop(st);
        self.route.finished(&self.id, record, outcome, &phase_times);
    }

    /// The record of the migration ending at `now` (`cpu_now`: the machine's CPU times
    /// then), how it ended, and the time it spent in each of [`Phase::MIGRATION`].
    fn record(
        &self,
        st: &State,
        now: Instant,
        cpu_now: Option<CpuTimes>,
    ) -> (Record, MigrationOutcome, [Duration; 4]) {
        let Verdict {
            outcome,
            cause,
            basis,
        } = verdict(st);
        let mut durations = [Duration::ZERO; 4];
        for (i, (phase, at)) in st.timeline.iter().enumerate() {
            let until = st.timeline.get(i + 1).map_or(now, |n| n.1);
            durations[phase.index()] += until.saturating_duration_since(*at);
        }
        let sent = Direction::ToDestination.index();
        let mut ram = st.ram;
        ram.normal_pages = ram.normal_pages.saturating_sub(st.ledger.repeated_pages());
        let record = Record {
            id: self.id.clone(),
            route: self.route.route.clone(),
            start: rfc3339(self.started),
            end: rfc3339(self.started + now.saturating_duration_since(self.start)),
            duration_s: now.saturating_duration_since(self.start).as_secs_f64(),
            outcome: outcome.as_str().to_string(),
            cause,
            outcome_basis: basis.map(str::to_string),
            links: st.links.clone(),
            bytes: DirBytes {
                to_destination: st.phase_bytes(Direction::ToDestination),
                to_source: st.phase_bytes(Direction::ToSource),
            },
            duration_s_by_phase: per_phase(|p| durations[p.index()].as_secs_f64()),
            throughput_bytes_per_second: per_phase(|p| {
                let s = durations[p.index()].as_secs_f64();
                if s > 0.0 {
                    st.bytes[sent][p.index()] as f64 / s
                } else {
                    0.0
                }
            }),
            precopy_passes: st.passes,
            page_size: st.page_size,
            ram: RamRecord {
                precopy_bytes: ram.precopy_bytes,
                downtime_bytes: ram.downtime_bytes,
                postcopy_bytes: ram.postcopy_bytes,
                normal_pages: ram.normal_pages,
                zero_pages: ram.zero_pages,
                multifd_bytes: ram.multifd_bytes,
            },
            page_requests: st.page_requests,
            channels: st.channels.clone(),
            opaque_bytes: st.opaque_bytes,
            fidelity: self.fidelity_record(st, cpu_now),
            series: Series {
                interval_s: SERIES_INTERVAL.as_secs_f64(),
                to_destination: st.series[Direction::ToDestination.index()].clone(),
                to_source: st.series[Direction::ToSource.index()].clone(),
            },
        };
        (record, outcome, durations)
    }
}

/// How a migration ended, as its record says.
#[derive(Debug, PartialEq)]
struct Verdict {
    outcome: MigrationOutcome,
    /// Why it did not complete.
    cause: Option<String>,
    /// How the outcome was judged, when not from the stream's own end markers.
    basis: Option<&'static str>,
}

/// The basis of a `completed` judged from the connections alone: under TLS neither QEMU's
/// end-of-stream marker nor the return path's SHUT can be seen.
pub const TLS_COMPLETED_BASIS: &str =
    "encrypted stream (TLS): every connection closed cleanly, end of stream not visible";

/// How the migration in `st` ended: a failure on any connection first, then the return
/// path's SHUT, then how the main channel's stream ended.
fn verdict(st: &State) -> Verdict {
    let (outcome, cause) = if let Some(f) = &st.failure {
        if f.starts_with("interrupted") {
            (MigrationOutcome::Interrupted, Some(f.clone()))
        } else if f.starts_with("refused") {
            (MigrationOutcome::Refused, Some(f.clone()))
        } else {
            (MigrationOutcome::Failed, Some(f.clone()))
        }
    } else if let Some(code) = st.shut.filter(|c| *c != 0) {
        (
            MigrationOutcome::Failed,
            Some(format!("return-path SHUT code {code}")),
        )
    } else {
        match st.main_outcome {
            Some(Outcome::Completed) => (MigrationOutcome::Completed, None),
            Some(Outcome::Truncated) => (
                MigrationOutcome::Failed,
                Some("truncated stream".to_string()),
            ),
            Some(Outcome::Empty) | None => {
                (MigrationOutcome::Failed, Some("empty stream".to_string()))
            }
            Some(Outcome::Failed { code }) => (
                MigrationOutcome::Failed,
                Some(format!("return-path SHUT code {code}")),
            ),
            // Encrypted: the end markers are out of sight, but no connection of the
            // migration was reset, errored or cut, and every one closed with a FIN each
            // way. That is how a completed migration ends (and also one cancelled on the
            // source, which the basis leaves to the caller's job result to tell apart).
            Some(Outcome::Opaque(DesyncReason::Tls)) => {
                return Verdict {
                    outcome: MigrationOutcome::Completed,
                    cause: None,
                    basis: Some(TLS_COMPLETED_BASIS),
                };
            }
            Some(Outcome::Opaque(r)) => (
                MigrationOutcome::Unknown,
                Some(format!("stream not parsed: {r}")),
            ),
            Some(Outcome::Running) => (
                MigrationOutcome::Failed,
                Some("truncated stream".to_string()),
            ),
        }
    };
    Verdict {
        outcome,
        cause,
        basis: None,
    }
}

/// Time resolution of a record's throughput series: fine enough to plot a migration of a
/// second at 10 Gb/s, coarse enough to keep an hour-long one at 36,000 entries.
const SERIES_INTERVAL: Duration = Duration::from_millis(100);

fn series_slot(since_start: Duration) -> usize {
    (since_start.as_nanos() / SERIES_INTERVAL.as_nanos()) as usize
}

/// What a closing connection contributes.
#[derive(Debug)]
struct ChannelSummary {
    kind: &'static str,
    main: bool,
    stats: Stats,
    outcome: Outcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(main: Outcome, failure: Option<&str>) -> Verdict {
        let st = State {
            main_outcome: Some(main),
            failure: failure.map(str::to_string),
            ..State::default()
        };
        verdict(&st)
    }

    #[test]
    fn a_tls_migration_whose_connections_all_closed_cleanly_is_completed_with_its_basis() {
        let v = ended(Outcome::Opaque(DesyncReason::Tls), None);
        assert_eq!(v.outcome, MigrationOutcome::Completed);
        assert_eq!(v.cause, None);
        assert_eq!(v.basis, Some(TLS_COMPLETED_BASIS));
    }

    #[test]
    fn a_tls_migration_with_a_failed_connection_keeps_its_failure() {
        for (failure, outcome) in [
            (
                "reset: read from destination failed: Connection reset by peer (os error 104)",
                MigrationOutcome::Failed,
            ),
            (
                "upstream error: connect to 127.0.0.1:1 failed",
                MigrationOutcome::Failed,
            ),
            (
                "interrupted: drain timeout expired",
                MigrationOutcome::Interrupted,
            ),
            ("refused: fabric full", MigrationOutcome::Refused),
        ] {
            let v = ended(Outcome::Opaque(DesyncReason::Tls), Some(failure));
            assert_eq!(v.outcome, outcome, "{failure}");
            assert_eq!(v.cause.as_deref(), Some(failure));
            assert_eq!(v.basis, None, "{failure}");
        }
    }

    #[test]
    fn a_plain_stream_the_parser_lost_stays_unknown_without_a_basis() {
        for r in [
            DesyncReason::UnknownChannel,
            DesyncReason::BadFooter,
            DesyncReason::UnexpectedRecord(0x42),
        ] {
            let v = ended(Outcome::Opaque(r), None);
            assert_eq!(v.outcome, MigrationOutcome::Unknown, "{r}");
            assert_eq!(v.cause, Some(format!("stream not parsed: {r}")));
            assert_eq!(v.basis, None, "{r}");
        }
    }

    #[test]
    fn a_parsed_stream_is_judged_by_its_end_markers_without_a_basis() {
        let v = ended(Outcome::Completed, None);
        assert_eq!(
            (v.outcome, v.cause, v.basis),
            (MigrationOutcome::Completed, None, None)
        );
        let v = ended(Outcome::Truncated, None);
        assert_eq!(v.outcome, MigrationOutcome::Failed);
        assert_eq!(v.basis, None);
    }
}
