//! Prometheus metrics, updated live as bytes flow (not when a connection closes).
//!
//! Each [`crate::app::Server`] owns one [`Metrics`] registry (a `metrics-exporter-prometheus`
//! recorder that is *not* installed globally, so several servers in one process, as in the
//! tests, never mix their series). Every route pre-registers its handles once
//! ([`RouteMetrics`]); the hot path then only bumps atomics: no label lookup, no lock.
//!
//! Label sets are small and bounded: `route`, `direction` (2), `phase` (5), `channel` (6),
//! `outcome` (4). Nothing per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::link::{Cause, Direction, Fidelity, Shape};
use crate::qemu::{ChannelKind, Phase};

/// Histogram buckets for migration and phase durations: 0.1 s to 1 h.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 3600.0,
];

/// The `phase` label of `migshaper_bytes_total` for routes that do not parse the stream
/// (`--no-parse`); parsed bytes carry their [`Phase::MIGRATION`] label.
pub const UNPARSED: &str = "unparsed";
/// Place of [`UNPARSED`] after the migration phases in the byte counters.
const UNPARSED_SLOT: usize = Phase::MIGRATION.len();
/// How a connection ended: the `outcome` label of `migshaper_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnOutcome {
    /// Both directions ended with EOF.
    Closed,
    /// A socket error (reset, broken pipe) on either side.
    Reset,
    /// Closed by migshaper at the end of the drain timeout.
    Interrupted,
    /// The upstream connect failed or timed out.
    UpstreamError,
    /// Refused at accept: the route was at `max_connections`, or its migration would have
    /// lifted the active routes' links above a fabric that refuses oversubscription.
    Refused,
    /// Would have been a migration's main channel but closed (or stayed silent) without
    /// sending a byte: a port check, never forwarded to the destination.
    Empty,
}

impl ConnOutcome {
    /// Every outcome, in index order.
    pub const ALL: [ConnOutcome; 6] = [
        ConnOutcome::Closed,
        ConnOutcome::Reset,
        ConnOutcome::Interrupted,
        ConnOutcome::UpstreamError,
        ConnOutcome::Refused,
        ConnOutcome::Empty,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnOutcome::Closed => "closed",
            ConnOutcome::Reset => "reset",
            ConnOutcome::Interrupted => "interrupted",
            ConnOutcome::UpstreamError => "upstream_error",
            ConnOutcome::Refused => "refused",
            ConnOutcome::Empty => "empty",
        }
    }

    /// The outcome's place in [`ConnOutcome::ALL`].
    pub fn index(self) -> usize {
        match self {
            ConnOutcome::Closed => 0,
            ConnOutcome::Reset => 1,
            ConnOutcome::Interrupted => 2,
            ConnOutcome::UpstreamError => 3,
            ConnOutcome::Refused => 4,
            ConnOutcome::Empty => 5,
        }
    }
}

/// How a migration ended: the `outcome` label of the migration metrics and the `outcome`
/// of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// The stream ended with QEMU's end-of-stream marker and no failure; or, for a TLS
    /// stream (markers out of sight), every connection closed cleanly.
    Completed,
    /// A reset, an upstream error, a return-path SHUT with an error, a truncated stream.
    Failed,
    /// The stream could not be parsed (an unknown channel, a stream the parser lost).
    Unknown,
    /// Cut by migshaper at the end of the drain timeout.
    Interrupted,
    /// Refused at accept: its route would have lifted the active routes' links above the
    /// fabric (`oversubscribe = "refuse"`).
    Refused,
}

impl MigrationOutcome {
    /// Every outcome, in index order.
    pub const ALL: [MigrationOutcome; 5] = [
        MigrationOutcome::Completed,
        MigrationOutcome::Failed,
        MigrationOutcome::Unknown,
        MigrationOutcome::Interrupted,
        MigrationOutcome::Refused,
    ];

    /// The label value and the record's `outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationOutcome::Completed => "completed",
            MigrationOutcome::Failed => "failed",
            MigrationOutcome::Unknown => "unknown",
            MigrationOutcome::Interrupted => "interrupted",
            MigrationOutcome::Refused => "refused",
        }
    }

    /// The outcome's place in [`MigrationOutcome::ALL`].
    pub fn index(self) -> usize {
        match self {
            MigrationOutcome::Completed => 0,
            MigrationOutcome::Failed => 1,
            MigrationOutcome::Unknown => 2,
            MigrationOutcome::Interrupted => 3,
            MigrationOutcome::Refused => 4,
        }
    }
}

/// One server's metrics registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_duration_seconds".into()),
                &DURATION_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics { recorder, handle };
        m.describe();
        Arc::new(m)
    }

    fn describe(&self) {
        metrics::with_local_recorder(&self.recorder, || {
            use metrics::{describe_counter, describe_gauge, describe_histogram};
            describe_counter!(
                "migshaper_bytes_total",
                Unit::Bytes,
                "Payload bytes forwarded, by direction and by the migration phase they belong to"
            );
            describe_gauge!(
                "migshaper_link_rate_bytes_per_second",
                "Emulated line rate per direction (0 = unlimited)"
            );
            describe_gauge!(
                "migshaper_link_payload_rate_bytes_per_second",
                "Payload rate the line rate allows after the framing overhead (0 = unlimited)"
            );
            describe_gauge!(
                "migshaper_link_burst_bytes",
                Unit::Bytes,
                "Burst tolerance of each direction's token bucket, in payload bytes"
            );
            describe_gauge!(
                "migshaper_link_delay_seconds",
                Unit::Seconds,
                "Emulated one-way propagation delay per direction"
            );
            describe_counter!(
                "migshaper_link_changes_total",
                "Link changes applied while running (control API or SIGHUP)"
            );
            describe_gauge!(
                "migshaper_shaping_wait_seconds_total",
                Unit::Seconds,
                "Time connections spent waiting for link tokens, summed over connections; \
                 monotonic (a float, hence exported as a gauge): use rate()"
            );
            describe_gauge!(
                "migshaper_link_backlogged_seconds_total",
                Unit::Seconds,
                "Time the shaped link had data to carry (line time of what it carried plus \
                 the time it lost); monotonic (a float, hence exported as a gauge): use rate()"
            );
            describe_counter!(
                "migshaper_link_carried_bytes_total",
                Unit::Bytes,
                "Payload bytes the shaped link carried"
            );
            describe_counter!(
                "migshaper_link_shortfall_bytes_total",
                Unit::Bytes,
                "Payload bytes the shaped link could have carried while backlogged and did not, \
                 by cause: late (its wake-ups came too late for the burst), destination (the \
                 receiving side did not take the writes), fabric (other routes shared the fabric \
                 budget beyond its rate). Fidelity = carried / (carried + shortfall)"
            );
            describe_gauge!(
                "migshaper_connections_active",
                "Open proxied connections, by channel kind (unknown until the first bytes)"
            );
            describe_counter!(
                "migshaper_connections_total",
                "Finished connections by channel kind and outcome"
            );
            describe_counter!(
                "migshaper_upstream_connect_errors_total",
                "Upstream connects that failed or timed out"
            );
            describe_gauge!("migshaper_migrations_active", "Migrations in progress");
            describe_counter!(
                "migshaper_migrations_total",
                "Finished migrations by outcome"
            );
            describe_histogram!(
                "migshaper_migration_duration_seconds",
                Unit::Seconds,
                "Migration duration (first connection to last close) by outcome"
            );
            describe_histogram!(
                "migshaper_migration_phase_duration_seconds",
                Unit::Seconds,
                "Time finished migrations spent in each phase"
            );
            describe_gauge!(
                "migshaper_migration_phase",
                "1 for the phase the active migration is in, else 0"
            );
            describe_counter!(
                "migshaper_precopy_passes_total",
                "Pre-copy passes over guest RAM started"
            );
            describe_gauge!(
                "migshaper_fabric_rate_bytes_per_second",
                "Payload rate of the fabric budget every route draws from, per direction \
                 (only with --fabric or a [fabric] table)"
            );
            describe_gauge!(
                "migshaper_fabric_demand_bytes_per_second",
                "Payload rate the routes backlogged now want from the fabric (the sum of their \
                 links' payload rates), per direction; above the fabric's rate they share it"
            );
            describe_counter!(
                "migshaper_postcopy_page_requests_total",
                "Post-copy page requests seen on the return path"
            );
        });
    }

    /// Pre-registers every series of route `route` (they appear at 0 before any traffic).
    pub fn route(&self, route: &str) -> RouteMetrics {
        let r = route.to_string();
        metrics::with_local_recorder(&self.recorder, || {
            use metrics::{counter, gauge, histogram};
            let dirs = Direction::ALL.map(Direction::as_str);
            let phases = Phase::MIGRATION.map(Phase::as_str);
            let channels = ChannelKind::ALL.map(ChannelKind::as_str);
            let migration_outcomes = MigrationOutcome::ALL.map(MigrationOutcome::as_str);
            let inner = RouteInner {
                bytes: dirs.map(|d| {
                    std::array::from_fn(|i| {
                        let p = phases.get(i).copied().unwrap_or(UNPARSED);
                        counter!("migshaper_bytes_total", "route" => r.clone(), "direction" => d, "phase" => p)
                    })
                }),
                rate: dirs.map(|d| {
                    gauge!("migshaper_link_rate_bytes_per_second", "route" => r.clone(), "direction" => d)
                }),
                payload_rate: dirs.map(|d| {
                    gauge!("migshaper_link_payload_rate_bytes_per_second", "route" => r.clone(), "direction" => d)
                }),
                burst: gauge!("migshaper_link_burst_bytes", "route" => r.clone()),
                delay: gauge!("migshaper_link_delay_seconds", "route" => r.clone()),
                changes: counter!("migshaper_link_changes_total", "route" => r.clone()),
                wait: dirs.map(|d| {
                    gauge!("migshaper_shaping_wait_seconds_total", "route" => r.clone(), "direction" => d)
                }),
                backlogged: dirs.map(|d| {
                    gauge!("migshaper_link_backlogged_seconds_total", "route" => r.clone(), "direction" => d)
                }),
                carried: dirs.map(|d| {
                    counter!("migshaper_link_carried_bytes_total", "route" => r.clone(), "direction" => d)
                }),
                shortfall: dirs.map(|d| {
                    Cause::ALL.map(|c| {
                        counter!("migshaper_link_shortfall_bytes_total", "route" => r.clone(), "direction" => d, "cause" => c.as_str())
                    })
                }),
                conns_active: channels
                    .map(|c| gauge!("migshaper_connections_active", "route" => r.clone(), "channel" => c)),
                conns_total: channels.map(|c| {
                    ConnOutcome::ALL.map(ConnOutcome::as_str).map(|o| {
                        counter!("migshaper_connections_total", "route" => r.clone(), "channel" => c, "outcome" => o)
                    })
                }),
                upstream_errors: counter!("migshaper_upstream_connect_errors_total", "route" => r.clone()),
                migrations_active: gauge!("migshaper_migrations_active", "route" => r.clone()),
                migrations_total: migration_outcomes
                    .map(|o| counter!("migshaper_migrations_total", "route" => r.clone(), "outcome" => o)),
                duration: migration_outcomes.map(|o| {
                    histogram!("migshaper_migration_duration_seconds", "route" => r.clone(), "outcome" => o)
                }),
                phase_duration: phases.map(|p| {
                    histogram!("migshaper_migration_phase_duration_seconds", "route" => r.clone(), "phase" => p)
                }),
                phase: phases
                    .map(|p| gauge!("migshaper_migration_phase", "route" => r.clone(), "phase" => p)),
                passes: counter!("migshaper_precopy_passes_total", "route" => r.clone()),
                page_requests: counter!("migshaper_postcopy_page_requests_total", "route" => r.clone()),
            };
            RouteMetrics {
                inner: Arc::new(inner),
            }
        })
    }

    /// Registers the fabric's series (only servers with a fabric have them).
    pub fn fabric(&self) -> FabricMetrics {
        metrics::with_local_recorder(&self.recorder, || {
            let dirs = Direction::ALL.map(Direction::as_str);
            FabricMetrics {
                rate: dirs.map(|d| {
                    metrics::gauge!("migshaper_fabric_rate_bytes_per_second", "direction" => d)
                }),
                demand: dirs.map(|d| {
                    metrics::gauge!("migshaper_fabric_demand_bytes_per_second", "direction" => d)
                }),
            }
        })
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// The fabric's gauges.
#[derive(Clone)]
pub struct FabricMetrics {
    rate: [Gauge; 2],
    demand: [Gauge; 2],
}

impl std::fmt::Debug for FabricMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FabricMetrics")
    }
}

impl FabricMetrics {
    /// Publishes the fabric as it is now.
    pub fn publish(&self, view: &crate::link::fabric::FabricView) {
        let rate = view.config.payload_bits() as f64 / 8.0;
        for d in Direction::ALL {
            self.rate[d.index()].set(rate);
            self.demand[d.index()].set(view.demand[d.index()].payload as f64 / 8.0);
        }
    }
}

/// A route's pre-registered metric handles. Cheap to clone.
#[derive(Clone)]
pub struct RouteMetrics {
    inner: Arc<RouteInner>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteMetrics")
    }
}

struct RouteInner {
    bytes: [[Counter; 5]; 2],
    rate: [Gauge; 2],
    payload_rate: [Gauge; 2],
    burst: Gauge,
    delay: Gauge,
    changes: Counter,
    wait: [Gauge; 2],
    backlogged: [Gauge; 2],
    carried: [Counter; 2],
    shortfall: [[Counter; 3]; 2],
    conns_active: [Gauge; 6],
    conns_total: [[Counter; 6]; 6],
    upstream_errors: Counter,
    migrations_active: Gauge,
    migrations_total: [Counter; 5],
    duration: [Histogram; 5],
    phase_duration: [Histogram; 4],
    phase: [Gauge; 4],
    passes: Counter,
    page_requests: Counter,
}

impl RouteMetrics {
    /// Handles bound to a private registry nobody renders (tools and tests that need no
    /// metrics).
    pub fn detached(route: &str) -> RouteMetrics {
        Metrics::new().route(route)
    }

    /// Counts `n` bytes of `dir` in `phase` (the return path's as post-copy).
    pub fn bytes(&self, dir: Direction, phase: Phase, n: u64) {
        if n > 0 {
            self.inner.bytes[dir.index()][phase.migration_phase().index()].increment(n);
        }
    }

    /// The counter of `dir` for a route that does not parse.
    pub fn unparsed_bytes(&self, dir: Direction) -> Counter {
        self.inner.bytes[dir.index()][UNPARSED_SLOT].clone()
    }

    /// Sets the link gauges to `shape` and `delay`.
    pub fn link(&self, shape: &Shape, delay: Duration) {
        let line = shape.rate.bytes_per_second().unwrap_or(0.0);
        let payload = shape
            .framing
            .payload_rate(shape.rate)
            .map_or(0.0, |b| b / 8.0);
        for d in Direction::ALL {
            self.inner.rate[d.index()].set(line);
            self.inner.payload_rate[d.index()].set(payload);
        }
        self.inner
            .burst
            .set(shape.burst_payload_bytes().map_or(0.0, |b| b as f64));
        self.inner.delay.set(delay.as_secs_f64());
    }

    /// Counts a link change.
    pub fn link_changed(&self) {
        self.inner.changes.increment(1);
    }

    /// The shaping-wait accumulator of `dir`.
    pub fn wait(&self, dir: Direction) -> Gauge {
        self.inner.wait[dir.index()].clone()
    }

    /// Publishes the link ledger of `dir` (cumulative since the link was made).
    pub fn fidelity(&self, dir: Direction, f: &Fidelity) {
        let d = dir.index();
        self.inner.backlogged[d].set(f.backlogged().as_secs_f64());
        self.inner.carried[d].absolute(f.carried_bytes);
        for c in Cause::ALL {
            self.inner.shortfall[d][c.index()].absolute(f.shortfall_bytes[c.index()]);
        }
    }

    /// Counts a failed upstream connect (and the connection it ended).
    pub fn upstream_error(&self) {
        self.inner.upstream_errors.increment(1);
        self.inner.conns_total[ChannelKind::Unknown.index()][ConnOutcome::UpstreamError.index()]
            .increment(1);
    }

    /// Counts a connection refused because the route is at `max_connections`.
    pub fn refused(&self) {
        self.inner.conns_total[ChannelKind::Unknown.index()][ConnOutcome::Refused.index()]
            .increment(1);
    }

    /// Counts a would-be main channel that sent nothing (never forwarded).
    pub fn empty(&self) {
        self.inner.conns_total[ChannelKind::Unknown.index()][ConnOutcome::Empty.index()]
            .increment(1);
    }

    /// A migration started: it is active and in setup.
    pub fn migration_started(&self) {
        self.inner.migrations_active.increment(1.0);
        self.set_phase(Some(Phase::Setup));
    }

    /// The active migration entered `phase` (`None`: no migration is active).
    pub fn set_phase(&self, phase: Option<Phase>) {
        let active = phase.map(|p| p.migration_phase().index());
        for (i, g) in self.inner.phase.iter().enumerate() {
            g.set(if Some(i) == active { 1.0 } else { 0.0 });
        }
    }

    /// A pre-copy pass started.
    pub fn passes(&self, n: u64) {
        self.inner.passes.increment(n);
    }

    /// A post-copy page request passed on the return path.
    pub fn page_request(&self) {
        self.inner.page_requests.increment(1);
    }

    /// A migration ended with `outcome` after `duration`, having spent `phases[i]` in
    /// phase [`Phase::MIGRATION`]`[i]`. `current`: it was the route's active migration,
    /// so the phase gauge goes back to 0.
    pub fn migration_ended(
        &self,
        outcome: MigrationOutcome,
        duration: Duration,
        phases: &[Duration; 4],
        current: bool,
    ) {
        let i = outcome.index();
        self.inner.migrations_active.decrement(1.0);
        self.inner.migrations_total[i].increment(1);
        self.inner.duration[i].record(duration.as_secs_f64());
        for (p, d) in phases.iter().enumerate() {
            if !d.is_zero() {
                self.inner.phase_duration[p].record(d.as_secs_f64());
            }
        }
        if current {
            self.set_phase(None);
        }
    }
}

/// One connection's place in `migshaper_connections_active` / `_total`: counted as
/// `unknown` until its first bytes tell its channel kind.
#[derive(Debug)]
pub struct ConnMeter {
    metrics: RouteMetrics,
    channel: AtomicUsize,
}

impl ConnMeter {
    /// A connection opened.
    pub fn open(metrics: &RouteMetrics) -> Arc<ConnMeter> {
        let unknown = ChannelKind::Unknown.index();
        metrics.inner.conns_active[unknown].increment(1.0);
        Arc::new(ConnMeter {
            metrics: metrics.clone(),
            channel: AtomicUsize::new(unknown),
        })
    }

    /// The connection's channel kind became known.
    pub fn set_channel(&self, kind: ChannelKind) {
        let new = kind.index();
        let old = self.channel.swap(new, Ordering::Relaxed);
        if old != new {
            self.metrics.inner.conns_active[old].decrement(1.0);
            self.metrics.inner.conns_active[new].increment(1.0);
        }
    }

    /// The connection closed.
    pub fn close(&self, outcome: ConnOutcome) {
        let c = self.channel.load(Ordering::Relaxed);
        self.metrics.inner.conns_active[c].decrement(1.0);
        self.metrics.inner.conns_total[c][outcome.index()].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn series_exist_before_traffic_and_move_live() {
        let m = Metrics::new();
        let r = m.route("r1");
        let text = m.render();
        assert_eq!(
            value(
                &text,
                r#"migshaper_bytes_total{route="r1",direction="to_destination",phase="precopy"}"#
            ),
            Some(0.0),
            "{text}"
        );
        r.bytes(Direction::ToDestination, Phase::Precopy, 1000);
        r.bytes(Direction::ToSource, Phase::Postcopy, 64);
        let shape = Shape {
            rate: "1g".parse().unwrap(),
            burst: "2ms".parse().unwrap(),
            framing: "none".parse().unwrap(),
        };
        r.link(&shape, Duration::from_millis(5));
        let c = ConnMeter::open(&r);
        c.set_channel(ChannelKind::Multifd);
        let text = m.render();
        let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("{s} missing in\n{text}"));
        assert_eq!(
            v(r#"migshaper_bytes_total{route="r1",direction="to_destination",phase="precopy"}"#),
            1000.0
        );
        assert_eq!(
            v(r#"migshaper_bytes_total{route="r1",direction="to_source",phase="postcopy"}"#),
            64.0
        );
        assert_eq!(
            v(r#"migshaper_link_rate_bytes_per_second{route="r1",direction="to_source"}"#),
            125e6
        );
        assert_eq!(v(r#"migshaper_link_burst_bytes{route="r1"}"#), 250_000.0);
        assert_eq!(v(r#"migshaper_link_delay_seconds{route="r1"}"#), 0.005);
        assert_eq!(
            v(r#"migshaper_connections_active{route="r1",channel="multifd"}"#),
            1.0
        );
        assert_eq!(
            v(r#"migshaper_connections_active{route="r1",channel="unknown"}"#),
            0.0
        );
        c.close(ConnOutcome::Reset);
        r.migration_started();
        r.migration_ended(
            MigrationOutcome::Completed,
            Duration::from_secs(3),
            &[
                Duration::from_millis(50),
                Duration::from_secs(2),
                Duration::ZERO,
                Duration::from_secs(1),
            ],
            true,
        );
        let text = m.render();
        let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("{s} missing in\n{text}"));
        assert_eq!(
            v(r#"migshaper_connections_total{route="r1",channel="multifd",outcome="reset"}"#),
            1.0
        );
        assert_eq!(
            v(r#"migshaper_migrations_total{route="r1",outcome="completed"}"#),
            1.0
        );
        assert_eq!(
            v(
                r#"migshaper_migration_duration_seconds_bucket{route="r1",outcome="completed",le="5"}"#
            ),
            1.0
        );
        assert_eq!(
            v(
                r#"migshaper_migration_duration_seconds_bucket{route="r1",outcome="completed",le="2.5"}"#
            ),
            0.0
        );
        assert_eq!(
            v(r#"migshaper_migration_phase_duration_seconds_count{route="r1",phase="downtime"}"#),
            0.0
        );
        assert_eq!(v(r#"migshaper_migrations_active{route="r1"}"#), 0.0);
    }

    #[test]
    fn registries_are_separate() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.route("x")
            .bytes(Direction::ToDestination, Phase::Setup, 5);
        b.route("y");
        assert!(!b.render().contains("route=\"x\""));
        assert!(a.render().contains("route=\"x\""));
    }
}
