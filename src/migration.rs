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

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tracing::{info, warn};

use crate::link::{Direction, Link, LinkUpdate};
use crate::metrics::{ConnMeter, RouteMetrics};
use crate::proxy::pump::Tap;
use crate::qemu::{
    ChannelKind, EventKind, MultifdLedger, Outcome, Phase, PhaseBytes, RamCounters,
    ReturnPathParser, Stats, StreamParser,
};

/// The phases a record reports, in order.
const PHASES: [Phase; 4] = [
    Phase::Setup,
    Phase::Precopy,
    Phase::Downtime,
    Phase::Postcopy,
];

use crate::metrics::phase_index;

fn phase_from_index(i: u8) -> Phase {
    PHASES[usize::from(i).min(3)]
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::ToDestination => 0,
        Direction::ToSource => 1,
    }
}

// === RecordSink ===

/// The records file: one JSON line per finished migration, written and flushed at once.
#[derive(Debug)]
pub struct RecordSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl RecordSink {
    /// Opens (creates, appends to) the records file.
    pub fn open(path: &Path) -> std::io::Result<RecordSink> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(RecordSink {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    fn write(&self, record: &Record) {
        let mut line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot serialise a migration record");
                return;
            }
        };
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // One write of the whole line (O_APPEND), then flush: a crash elsewhere never
        // leaves half a record, and no record waits in a buffer.
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.flush()) {
            warn!(path = %self.path.display(), error = %e, "cannot write the migration record");
        }
    }
}

// === RouteAccounting ===

/// A route's migrations: the active one, and where finished ones go.
#[derive(Debug)]
pub struct RouteAccounting {
    route: String,
    link: Link,
    sink: Option<Arc<RecordSink>>,
    metrics: RouteMetrics,
    /// Serialises link changes, so concurrent partial updates never interleave.
    link_change: Mutex<()>,
    active: Mutex<Option<Arc<Migration>>>,
    recent: Mutex<std::collections::VecDeque<Record>>,
    next_id: AtomicU64,
}

/// Finished migrations kept in memory per route (for `demo` and the control API).
const RECENT_RECORDS: usize = 32;

impl RouteAccounting {
    /// Accounting for `route`, writing finished migrations to `sink` and live figures to
    /// `metrics`.
    pub fn new(
        route: String,
        link: Link,
        sink: Option<Arc<RecordSink>>,
        metrics: RouteMetrics,
    ) -> Self {
        metrics.link(&link.shape(), link.delay());
        RouteAccounting {
            route,
            link,
            sink,
            metrics,
            link_change: Mutex::new(()),
            active: Mutex::new(None),
            recent: Mutex::new(std::collections::VecDeque::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Ties a newly connected connection to a migration: joins the active one, or opens a
    /// new one (then this connection is its main channel).
    pub fn attach(self: &Arc<Self>) -> (Arc<Migration>, bool) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = active.as_ref() {
            let mut st = m.lock();
            if st.open_conns > 0 {
                st.open_conns += 1;
                return (m.clone(), false);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let m = Arc::new(Migration::new(
            format!("{}-{}-{id}", self.route, unix_secs()),
            self.clone(),
        ));
        m.lock().open_conns = 1;
        *active = Some(m.clone());
        self.metrics.migration_started();
        info!(route = %self.route, migration = %m.id, "migration started");
        (m, true)
    }

    /// The route's metric handles.
    pub fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    /// The route's link.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Applies `update` to the route's link: every open connection uses it from its next
    /// chunk, both buckets start empty (no burst at the switch), the change is logged,
    /// counted, and appended to the active migration's record. Returns the link now in
    /// force (this change's, even if another one follows at once).
    pub fn change_link(&self, update: &LinkUpdate, origin: &str) -> (crate::link::Shape, Duration) {
        let _serial = self.link_change.lock().unwrap_or_else(|p| p.into_inner());
        let (old_shape, old_delay) = (self.link.shape(), self.link.delay());
        let (shape, delay) = update.apply(old_shape, old_delay);
        self.link.set(shape, delay);
        self.metrics.link(&shape, delay);
        self.metrics.link_changed();
        let entry = LinkEntry::now(&self.link);
        let migration = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(m) = &migration {
            let mut st = m.lock();
            if st.open_conns > 0 {
                st.links.push(entry.clone());
            }
        }
        info!(
            route = %self.route,
            origin,
            link = %entry.link,
            burst = %entry.burst,
            framing = %entry.framing,
            delay = %entry.delay,
            previous_link = %old_shape.rate,
            migration = migration.as_ref().map_or("", |m| m.id.as_str()),
            "link changed"
        );
        (shape, delay)
    }

    /// The active migration, as seen now.
    pub fn active(&self) -> Option<ActiveView> {
        let m = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        m.view(Instant::now())
    }

    /// The most recently finished migrations, oldest first.
    pub fn recent(&self) -> Vec<Record> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Records an upstream connect failure: it fails the active migration, or a new one.
    pub fn connect_failed(self: &Arc<Self>, cause: String) {
        let (m, _) = self.attach();
        m.abandon_connection(format!("upstream error: {cause}"));
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// === Migration ===

/// One migration in progress.
#[derive(Debug)]
pub struct Migration {
    /// Unique id: route, start time, sequence.
    pub id: String,
    route: Arc<RouteAccounting>,
    started: SystemTime,
    start: Instant,
    /// The main channel's phase, read lock-free by the other channels.
    phase: AtomicU8,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open_conns: u32,
    /// Phase changes of the main channel: (phase, when).
    timeline: Vec<(Phase, Instant)>,
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
}

impl State {
    /// Bytes per phase of direction `d` (0: to the destination, 1: to the source).
    fn phase_bytes(&self, d: usize) -> BTreeMap<&'static str, u64> {
        PHASES
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), self.bytes[d][i]))
            .collect()
    }
}

impl Migration {
    fn new(id: String, route: Arc<RouteAccounting>) -> Self {
        let start = Instant::now();
        let state = State {
            timeline: vec![(Phase::Setup, start)],
            links: vec![LinkEntry::now(&route.link)],
            ..State::default()
        };
        Migration {
            id,
            route,
            started: SystemTime::now(),
            start,
            phase: AtomicU8::new(0),
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The main channel's current phase.
    pub fn phase(&self) -> Phase {
        phase_from_index(self.phase.load(Ordering::Relaxed))
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

    fn view(&self, now: Instant) -> Option<ActiveView> {
        let st = self.lock();
        if st.open_conns == 0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.start);
        // The last complete second of the series (or the mean so far, in the first one).
        let last = |d: usize| -> u64 {
            let now_slot = series_slot(elapsed);
            let per_s = (Duration::from_secs(1).as_nanos() / SERIES_INTERVAL.as_nanos()) as usize;
            let s = &st.series[d];
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
        let bytes = |d: usize| st.phase_bytes(d);
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
                to_destination: bytes(0),
                to_source: bytes(1),
            },
            rate_bytes_per_second: RateView {
                to_destination: last(0),
                to_source: last(1),
            },
            ram_total_bytes: (st.ram_total > 0).then_some(st.ram_total),
            ram_pages_sent: pages,
            ram_sent_ratio: match (st.ram_total, st.page_size) {
                (total, Some(p)) if total > 0 => Some(pages as f64 * f64::from(p) / total as f64),
                _ => None,
            },
            links: st.links.clone(),
        })
    }

    fn add_series(&self, st: &mut State, dir: Direction, n: u64, now: Instant) {
        let sec = series_slot(now.saturating_duration_since(self.start));
        let s = &mut st.series[dir_index(dir)];
        if s.len() <= sec {
            s.resize(sec + 1, 0);
        }
        s[sec] += n;
    }

    /// A connection of this migration closed (both directions), with its channel's final
    /// parser state. The last one to close writes the record.
    fn connection_closed(&self, channel: Option<ChannelSummary>, now: Instant) {
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
        let (record, phase_times) = self.record(&st, now);
        drop(st);
        {
            // Under the route's lock: a migration that attaches right now must not have
            // its phase gauge cleared by this one ending.
            let mut active = self.route.active.lock().unwrap_or_else(|p| p.into_inner());
            let current = active.as_ref().is_some_and(|m| m.id == self.id);
            if current {
                *active = None;
            }
            self.route.metrics.migration_ended(
                &record.outcome,
                Duration::from_secs_f64(record.duration_s),
                &phase_times,
                current,
            );
        }
        info!(
            route = %self.route.route,
            migration = %self.id,
            outcome = %record.outcome,
            cause = record.cause.as_deref().unwrap_or(""),
            seconds = record.duration_s,
            "migration ended"
        );
        if let Some(sink) = &self.route.sink {
            sink.write(&record);
        }
        let mut recent = self.route.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_RECORDS {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    fn record(&self, st: &State, now: Instant) -> (Record, [Duration; 4]) {
        let (outcome, cause) = if let Some(f) = &st.failure {
            if f.starts_with("interrupted") {
                ("interrupted", Some(f.clone()))
            } else {
                ("failed", Some(f.clone()))
            }
        } else if let Some(code) = st.shut.filter(|c| *c != 0) {
            ("failed", Some(format!("return-path SHUT code {code}")))
        } else {
            match st.main_outcome {
                Some(Outcome::Completed) => ("completed", None),
                Some(Outcome::Truncated) => ("failed", Some("truncated stream".to_string())),
                Some(Outcome::Empty) | None => ("failed", Some("empty stream".to_string())),
                Some(Outcome::Failed { code }) => {
                    ("failed", Some(format!("return-path SHUT code {code}")))
                }
                Some(Outcome::Opaque(r)) => ("unknown", Some(format!("stream not parsed: {r}"))),
                Some(Outcome::Running) => ("failed", Some("truncated stream".to_string())),
            }
        };
        let mut durations = [Duration::ZERO; 4];
        for (i, (phase, at)) in st.timeline.iter().enumerate() {
            let until = st.timeline.get(i + 1).map_or(now, |n| n.1);
            durations[phase_index(*phase)] += until.saturating_duration_since(*at);
        }
        let per_phase = |f: &dyn Fn(usize) -> f64| -> BTreeMap<&'static str, f64> {
            PHASES
                .iter()
                .enumerate()
                .map(|(i, p)| (p.as_str(), f(i)))
                .collect()
        };
        let bytes = |d: usize| st.phase_bytes(d);
        let mut ram = st.ram;
        ram.normal_pages = ram.normal_pages.saturating_sub(st.ledger.repeated_pages());
        let record = Record {
            id: self.id.clone(),
            route: self.route.route.clone(),
            start: rfc3339(self.started),
            end: rfc3339(self.started + now.saturating_duration_since(self.start)),
            duration_s: now.saturating_duration_since(self.start).as_secs_f64(),
            outcome: outcome.to_string(),
            cause,
            links: st.links.clone(),
            bytes: DirBytes {
                to_destination: bytes(0),
                to_source: bytes(1),
            },
            duration_s_by_phase: per_phase(&|i| durations[i].as_secs_f64()),
            throughput_bytes_per_second: per_phase(&|i| {
                let s = durations[i].as_secs_f64();
                if s > 0.0 {
                    st.bytes[0][i] as f64 / s
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
            series: Series {
                interval_s: SERIES_INTERVAL.as_secs_f64(),
                to_destination: st.series[0].clone(),
                to_source: st.series[1].clone(),
            },
        };
        (record, durations)
    }
}

/// Time resolution of a record's throughput series: fine enough to plot a migration of a
/// second at 10 Gb/s, coarse enough to keep an hour-long one at 36,000 entries.
const SERIES_INTERVAL: Duration = Duration::from_millis(100);

fn series_slot(since_start: Duration) -> usize {
    (since_start.as_nanos() / SERIES_INTERVAL.as_nanos()) as usize
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// What a closing connection contributes.
#[derive(Debug)]
struct ChannelSummary {
    kind: &'static str,
    main: bool,
    stats: Stats,
    outcome: Outcome,
}

// === Taps ===

/// Parses and accounts the source → destination bytes of one connection.
#[derive(Debug)]
pub struct ForwardTap {
    mig: Arc<Migration>,
    main: bool,
    parser: StreamParser,
    last: PhaseBytes,
    /// The main channel's page size was passed on (non-main channels).
    hinted: bool,
    /// The connection's place in the connection metrics, until its kind is known.
    meter: Option<Arc<ConnMeter>>,
}

impl ForwardTap {
    /// A tap for a connection of `mig`; `main` if it opened the migration.
    pub fn new(mig: Arc<Migration>, main: bool) -> Self {
        ForwardTap {
            mig,
            main,
            parser: StreamParser::new(),
            last: PhaseBytes::default(),
            hinted: false,
            meter: None,
        }
    }

    /// Reports the channel kind to `meter` once the first bytes tell it.
    pub fn with_meter(mut self, meter: Arc<ConnMeter>) -> Self {
        self.meter = Some(meter);
        self
    }

    fn account(&mut self, n: u64, now: Instant) {
        let ForwardTap {
            mig,
            main,
            parser,
            last,
            ..
        } = self;
        let stats = parser.stats();
        let phases = stats.phases;
        let metrics = &mig.route.metrics;
        let mut st = mig.lock();
        for p in PHASES {
            let d = phases.get(p).saturating_sub(last.get(p));
            st.bytes[0][phase_index(p)] += d;
            metrics.bytes(Direction::ToDestination, phase_index(p), d);
        }
        *last = phases;
        if *main {
            st.live_ram = stats.ram;
            st.ram_total = stats.ram_total_bytes;
        }
        mig.add_series(&mut st, Direction::ToDestination, n, now);
        while let Some(ev) = parser.poll_event() {
            match ev.kind {
                EventKind::PhaseChanged { to, .. } if *main => {
                    st.timeline.push((to, ev.at));
                    mig.phase.store(phase_index(to) as u8, Ordering::Relaxed);
                    metrics.set_phase(Some(phase_index(to)));
                }
                EventKind::PassStarted { pass } if *main => {
                    metrics.passes(u64::from(pass.saturating_sub(st.passes)));
                    st.passes = st.passes.max(pass);
                }
                EventKind::PageSize(p) if *main => st.page_size = Some(p),
                EventKind::MultifdPacket(p) => st.ledger.record(&p),
                _ => {}
            }
        }
        if let Some(kind) = parser.channel() {
            if let Some(meter) = self.meter.take() {
                meter.set_channel(kind);
            }
        }
        // Other channels learn the page size from the main channel, once it is known.
        if !*main && !self.hinted {
            if let Some(p) = st.page_size {
                parser.set_page_size_hint(p);
                self.hinted = true;
            }
        }
    }

    /// Settles the parser at the end of the stream and reports the channel.
    fn finish(mut self, now: Instant) -> ChannelSummary {
        self.parser.finish(now);
        self.account(0, now);
        ChannelSummary {
            kind: self.parser.channel().map_or("unknown", ChannelKind::as_str),
            main: self.main,
            stats: *self.parser.stats(),
            outcome: self.parser.outcome(),
        }
    }
}

impl Tap for ForwardTap {
    fn on_chunk(&mut self, chunk: &[u8]) {
        let now = Instant::now();
        if !self.main {
            self.parser.follow_phase(self.mig.phase(), now);
        }
        self.parser.feed(chunk, now);
        self.account(chunk.len() as u64, now);
    }

    fn wants_bytes(&self) -> bool {
        !self.parser.is_opaque()
    }

    fn on_unseen(&mut self, n: usize) {
        let now = Instant::now();
        if !self.main {
            self.parser.follow_phase(self.mig.phase(), now);
        }
        self.parser.feed_opaque(n, now);
        self.account(n as u64, now);
    }
}

/// Accounts the destination → source bytes of one connection; parses the return path on
/// the main channel.
#[derive(Debug)]
pub struct ReverseTap {
    mig: Arc<Migration>,
    rp: Option<ReturnPathParser>,
}

impl ReverseTap {
    /// A tap for a connection of `mig`; parses the return path if `main`.
    pub fn new(mig: Arc<Migration>, main: bool) -> Self {
        ReverseTap {
            mig,
            rp: main.then(ReturnPathParser::new),
        }
    }

    fn finish(mut self, now: Instant) {
        if let Some(rp) = &mut self.rp {
            rp.finish(now);
            drain_rp(rp, &mut self.mig.lock(), &self.mig.route.metrics);
        }
    }
}

impl Tap for ReverseTap {
    fn on_chunk(&mut self, chunk: &[u8]) {
        let now = Instant::now();
        if let Some(rp) = &mut self.rp {
            rp.feed(chunk, now);
        }
        self.account(chunk.len(), now);
    }

    fn wants_bytes(&self) -> bool {
        self.rp.is_some()
    }

    fn on_unseen(&mut self, n: usize) {
        self.account(n, Instant::now());
    }
}

impl ReverseTap {
    fn account(&mut self, n: usize, now: Instant) {
        let mig = &self.mig;
        let metrics = &mig.route.metrics;
        let phase = phase_index(mig.phase());
        metrics.bytes(Direction::ToSource, phase, n as u64);
        let mut st = mig.lock();
        st.bytes[1][phase] += n as u64;
        mig.add_series(&mut st, Direction::ToSource, n as u64, now);
        if let Some(rp) = &mut self.rp {
            drain_rp(rp, &mut st, metrics);
        }
    }
}

/// Takes the return path's events into the migration.
fn drain_rp(rp: &mut ReturnPathParser, st: &mut State, metrics: &RouteMetrics) {
    while let Some(ev) = rp.poll_event() {
        match ev.kind {
            EventKind::PageRequest { .. } => {
                st.page_requests += 1;
                metrics.page_request();
            }
            EventKind::Shut(code) => st.shut = Some(code),
            _ => {}
        }
    }
}

/// Ends a connection's part in its migration: settles both taps, notes a failure.
pub fn connection_ended(fwd: ForwardTap, rev: ReverseTap, failure: Option<String>) {
    let now = Instant::now();
    let mig = fwd.mig.clone();
    if let Some(f) = failure {
        mig.fail(f);
    }
    rev.finish(now);
    let summary = fwd.finish(now);
    mig.connection_closed(Some(summary), now);
}

// === the record ===

/// The link in force at a time.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LinkEntry {
    /// From when (RFC 3339).
    pub at: String,
    /// Line rate.
    pub link: String,
    /// Burst.
    pub burst: String,
    /// Framing.
    pub framing: String,
    /// One-way delay.
    pub delay: String,
}

impl LinkEntry {
    /// The link in force on `link` now.
    pub fn now(link: &Link) -> LinkEntry {
        let shape = link.shape();
        LinkEntry {
            at: rfc3339(SystemTime::now()),
            link: shape.rate.to_string(),
            burst: shape.burst.to_string(),
            framing: shape.framing.to_string(),
            delay: crate::spec::HumanDuration(link.delay()).to_string(),
        }
    }
}

/// A migration in progress, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveView {
    /// Unique id.
    pub id: String,
    /// Route name.
    pub route: String,
    /// First connection accepted (RFC 3339).
    pub start: String,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// The main channel's phase.
    pub phase: &'static str,
    /// Pre-copy passes so far.
    pub precopy_passes: u32,
    /// Post-copy page requests so far.
    pub page_requests: u64,
    /// Connections of this migration still open.
    pub open_connections: u32,
    /// Bytes per phase and direction so far.
    pub bytes: DirBytes,
    /// Bytes in the last complete second.
    pub rate_bytes_per_second: RateView,
    /// Guest RAM size, once the setup announced it.
    pub ram_total_bytes: Option<u64>,
    /// Pages (normal and zero) the main channel carried so far.
    pub ram_pages_sent: u64,
    /// Progress indication: RAM covered by the pages sent so far, as a multiple of guest
    /// RAM (reaches 1 at the end of the first pass; later passes resend dirty pages).
    pub ram_sent_ratio: Option<f64>,
    /// Link settings in force, with the time each took effect.
    pub links: Vec<LinkEntry>,
}

/// Bytes per second, per direction.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateView {
    /// Source → destination.
    pub to_destination: u64,
    /// Destination → source.
    pub to_source: u64,
}

/// Bytes per phase, per direction.
#[derive(Debug, Clone, Serialize)]
pub struct DirBytes {
    /// Source → destination.
    pub to_destination: BTreeMap<&'static str, u64>,
    /// Destination → source (return path), by the main channel's phase at the time.
    pub to_source: BTreeMap<&'static str, u64>,
}

/// QEMU's RAM counters, as QEMU defines them.
#[derive(Debug, Clone, Serialize)]
pub struct RamRecord {
    /// QEMU `precopy-bytes`.
    pub precopy_bytes: u64,
    /// QEMU `downtime-bytes`.
    pub downtime_bytes: u64,
    /// QEMU `postcopy-bytes`.
    pub postcopy_bytes: u64,
    /// QEMU `normal`.
    pub normal_pages: u64,
    /// QEMU `duplicate`.
    pub zero_pages: u64,
    /// QEMU `multifd-bytes`.
    pub multifd_bytes: u64,
}

/// Per-second byte counts of both directions.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Seconds per entry.
    pub interval_s: f64,
    /// Source → destination bytes per interval since the start (interval 0.1 s).
    pub to_destination: Vec<u64>,
    /// Destination → source bytes per interval since the start.
    pub to_source: Vec<u64>,
}

/// One finished migration, as written to the records file.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Unique id.
    pub id: String,
    /// Route name.
    pub route: String,
    /// First connection accepted (RFC 3339).
    pub start: String,
    /// Last connection closed (RFC 3339).
    pub end: String,
    /// `end - start` in seconds.
    pub duration_s: f64,
    /// `completed`, `failed` or `unknown` (stream not parsed, e.g. TLS).
    pub outcome: String,
    /// Why it failed: reset, upstream error, return-path SHUT code, truncated stream.
    pub cause: Option<String>,
    /// Link settings in force, with the time each took effect.
    pub links: Vec<LinkEntry>,
    /// Bytes per phase and direction.
    pub bytes: DirBytes,
    /// Wall time per phase, in seconds.
    pub duration_s_by_phase: BTreeMap<&'static str, f64>,
    /// Source → destination bytes per second of each phase.
    pub throughput_bytes_per_second: BTreeMap<&'static str, f64>,
    /// Pre-copy passes.
    pub precopy_passes: u32,
    /// Target page size, when learned.
    pub page_size: Option<u32>,
    /// QEMU's RAM counters.
    pub ram: RamRecord,
    /// Post-copy page requests on the return path.
    pub page_requests: u64,
    /// Connections by channel kind.
    pub channels: BTreeMap<&'static str, u32>,
    /// Bytes the parser could not interpret (counted in their phase all the same).
    pub opaque_bytes: u64,
    /// Throughput over time.
    pub series: Series,
}
