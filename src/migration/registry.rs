//! A route's migrations: the active one (which new connections join), the recently
//! finished ones, and where finished records go.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::info;

use super::Migration;
use super::record::{ActiveView, LinkEntry, Record};
use super::sink::RecordSink;
use crate::link::Link;
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
            active: Mutex::new(None),
            recent: Mutex::new(VecDeque::new()),
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
            }
            self.metrics.migration_ended(
                outcome,
                Duration::from_secs_f64(record.duration_s),
                phase_times,
                current,
            );
        }
        info!(
            route = %self.route,
            migration = %id,
            outcome = %record.outcome,
            cause = record.cause.as_deref().unwrap_or(""),
            seconds = record.duration_s,
            "migration ended"
        );
        if let Some(sink) = &self.sink {
            sink.write(&record);
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_RECORDS {
            recent.pop_front();
        }
        recent.push_back(record);
    }
}
