//! A route's migrations: the active one (which new connections join), the recently
//! finished ones, and where finished records go.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::Migration;
use super::record::{ActiveView, LinkEntry, Record};
use super::sink::RecordSink;
use crate::link::Link;
use crate::link::fabric::{Fabric, Refusal, Want};
use crate::metrics::{MigrationOutcome, RouteMetrics};

/// A route's migrations: the active one, and where finished ones go.
#[derive(Debug)]
pub struct RouteAccounting {
    pub(super) route: String,
    pub(super) link: Link,
    sink: Option<Arc<RecordSink>>,
    pub(super) metrics: RouteMetrics,
    active: Mutex<Option<Arc<Migration>>>,
    recent: Mutex<VecDeque<Record>>,
    next_id: AtomicU64,
    /// The fabric beneath every route, if the server has one: a new migration registers
    /// there (and may be refused), an ended one leaves.
    fabric: Option<Fabric>,
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
        fabric: Option<Fabric>,
    ) -> Self {
        metrics.link(&link.shape(), link.delay());
        RouteAccounting {
            route,
            link,
            sink,
            metrics,
            active: Mutex::new(None),
            recent: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
            fabric,
        }
    }

    /// Decides, before its upstream connect, whether a connection that arrives now may
    /// proceed on a fabric that refuses oversubscription: a connection that joins the active
    /// migration always may; one that would start a new migration may only if its route's
    /// link fits beside the routes with an active migration (it is then registered, so two
    /// routes accepting at once cannot both squeeze in).
    pub fn admit(&self) -> Result<(), Refusal> {
        let Some(fabric) = self.fabric.as_ref().filter(|f| f.refuses()) else {
            return Ok(());
        };
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.as_ref().is_some_and(|m| m.lock().open_conns > 0) {
            return Ok(());
        }
        fabric.admit(&self.route, Want::of(&self.link.shape()))
    }

    /// Records a migration refused at accept: counted, logged with the reason, and written
    /// as a record with outcome `refused`. The connection never reached the destination.
    pub fn refused(self: &Arc<Self>, peer: std::net::SocketAddr, refusal: &Refusal) {
        self.metrics.refused();
        warn!(
            route = %self.route,
            %peer,
            fabric_bits_per_second = refusal.fabric_bits,
            active_bits_per_second = refusal.active_bits,
            wanted_bits_per_second = refusal.wanted_bits,
            "migration {refusal}"
        );
        let (m, _) = self.open(false);
        m.abandon_connection(refusal.to_string());
    }

    /// Ties a newly connected connection to a migration: joins the active one, or opens a
    /// new one (then this connection is its main channel).
    pub fn attach(self: &Arc<Self>) -> (Arc<Migration>, bool) {
        self.open(true)
    }

    /// [`RouteAccounting::attach`]; a new migration registers on the fabric when `register`.
    fn open(self: &Arc<Self>, register: bool) -> (Arc<Migration>, bool) {
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
        if let Some(f) = self.fabric.as_ref().filter(|_| register) {
            f.register(&self.route, Want::of(&self.link.shape()));
        }
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

    /// Notes that the route's link just changed: the link now in force is appended to
    /// the active migration's record. Returns that entry and the migration's id, if one
    /// is active.
    pub fn link_changed(&self) -> (LinkEntry, Option<String>) {
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
        (entry, migration.map(|m| m.id.clone()))
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

impl RouteAccounting {
    /// Takes a finished migration off the route: clears it as the active one (unless a
    /// newer one already replaced it), counts it, logs it, writes its record and keeps it
    /// among the recent ones.
    pub(super) fn finished(
        &self,
        id: &str,
        record: Record,
        outcome: MigrationOutcome,
        phase_times: &[Duration; 4],
    ) {
        {
            // Under the route's lock: a migration that attaches right now must not have
            // its phase gauge cleared by this one ending.
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let current = active.as_ref().is_some_and(|m| m.id == id);
            if current {
                *active = None;
                if let Some(f) = &self.fabric {
                    f.finished(&self.route);
                }
            }
            self.metrics.migration_ended(
                outcome,
                Duration::from_secs_f64(record.duration_s),
                phase_times,
                current,
            );
        }
        if let Some(sink) = &self.sink {
            sink.write(&record);
        }
        // Logged once the record is written and any fidelity warning is out: a reader
        // waiting on this line finds both.
        warn_low_fidelity(&self.route, id, &record);
        info!(
            route = %self.route,
            migration = %id,
            outcome = %record.outcome,
            cause = record.cause.as_deref().unwrap_or(""),
            seconds = record.duration_s,
            "migration ended"
        );
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_RECORDS {
            recent.pop_front();
        }
        recent.push_back(record);
    }
}

/// Below this ratio a finished migration's link is reported as not faithful.
pub const FIDELITY_WARN_BELOW: f64 = 0.99;

/// Less backlogged time than this says too little about the link to warn about.
const FIDELITY_MIN_BACKLOG_S: f64 = 0.01;

/// Above this share of the machine's CPU time stolen by a hypervisor during a migration,
/// the low-fidelity warning names the host first.
pub const STOLEN_WARN_ABOVE: f64 = 0.01;

/// What a low fidelity most likely came from and what to try: the main cause of the
/// shortfall.
fn fidelity_hint(late: u64, destination: u64, fabric: u64) -> &'static str {
    if fabric > late.max(destination) {
        "fabric: other routes of this migshaper were backlogged at the same time and their \
         links together wanted more than the fabric budget (--fabric / [fabric]), so each got \
         its share; run migrations one at a time, raise the fabric budget if the real \
         fabric carries more, or set oversubscribe = \"refuse\""
    } else if late >= destination {
        "late: migshaper's wake-ups came later than the burst absorbs (busy or virtualised \
         host); give migshaper a core of its own, keep the QEMUs off it, or raise --burst \
         (e.g. 4ms)"
    } else {
        "destination: the receiving side (or the real path under the emulated link) took \
         the bytes slower than the link; check the path's capacity or lower the emulated rate"
    }
}

/// When a hypervisor took more than [`STOLEN_WARN_ABOVE`] of the machine's CPU time during
/// the migration: what that means for the shortfall (no setting of migshaper's helps).
fn host_note(stolen: Option<f64>) -> Option<String> {
    let x = stolen.filter(|x| *x > STOLEN_WARN_ABOVE)?;
    Some(format!(
        "the hypervisor ran something else for {:.1} % of this machine's CPU time during the \
         migration (steal): a descheduled vCPU delays wake-ups and reads alike, and no setting \
         of migshaper's gets that time back; measure on a host with dedicated CPUs, or when \
         it is quieter",
        x * 100.0
    ))
}

/// Logs a WARN line for each direction whose link delivered less than
/// [`FIDELITY_WARN_BELOW`] of its rate while backlogged: by how much, why, what to try.
fn warn_low_fidelity(route: &str, id: &str, record: &Record) {
    let dirs = [
        ("to_destination", &record.fidelity.to_destination),
        ("to_source", &record.fidelity.to_source),
    ];
    for (direction, f) in dirs {
        let Some(ratio) = f.ratio else { continue };
        if ratio >= FIDELITY_WARN_BELOW || f.backlogged_seconds < FIDELITY_MIN_BACKLOG_S {
            continue;
        }
        let late = f.shortfall_bytes.get("late").copied().unwrap_or(0);
        let destination = f.shortfall_bytes.get("destination").copied().unwrap_or(0);
        let fabric = f.shortfall_bytes.get("fabric").copied().unwrap_or(0);
        let stolen = record.fidelity.host_cpu_stolen;
        let hint = fidelity_hint(late, destination, fabric);
        let host = host_note(stolen);
        warn!(
            route,
            migration = id,
            direction,
            ratio,
            short_percent = (1.0 - ratio) * 100.0,
            shortfall_late_bytes = late,
            shortfall_destination_bytes = destination,
            shortfall_fabric_bytes = fabric,
            host_cpu_stolen_percent = stolen.map(|x| x * 100.0),
            host = host.as_deref().unwrap_or(""),
            backlogged_seconds = f.backlogged_seconds,
            hint,
            "link fidelity low: the link delivered {:.1} % of its rate while it had data to \
             carry ({direction}), {:.1} % short: this migration saw a slower link than the \
             one configured",
            ratio * 100.0,
            (1.0 - ratio) * 100.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_names_the_main_cause() {
        assert!(fidelity_hint(10, 5, 0).starts_with("late:"));
        assert!(fidelity_hint(5, 10, 0).starts_with("destination:"));
        assert!(fidelity_hint(5, 10, 11).starts_with("fabric:"));
    }

    #[test]
    fn a_busy_hypervisor_is_named_above_the_threshold_only() {
        let h = host_note(Some(0.176)).unwrap();
        assert!(
            h.starts_with("the hypervisor ran something else for 17.6 %"),
            "{h}"
        );
        assert_eq!(host_note(Some(STOLEN_WARN_ABOVE)), None);
        assert_eq!(host_note(Some(0.0)), None);
        assert_eq!(host_note(None), None);
    }
}
