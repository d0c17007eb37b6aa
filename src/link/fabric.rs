//! The fabric budget: one physical fabric under every route of this migshaper, like an
//! HTB parent class above the routes' links.
//!
//! Each route's link stays its ceiling. The fabric knows, per direction, which routes are
//! backlogged (a connection holds data for the link: the ledger's `busy`) and the sum of
//! their payload rates, the *demand*. While the demand is within the fabric, nothing
//! changes. Beyond it, every backlogged route runs at its link rate scaled by
//! `fabric / demand`, so the routes share the fabric in proportion to their link rates
//! (100 and 250 Mb/s links on a 300 Mb/s fabric get 85.7 and 214.3) and together carry
//! exactly the fabric's rate. The bucket charges the extra line time this costs each chunk
//! to the link's ledger as [`Cause::Fabric`](super::Cause::Fabric) shortfall, so a record
//! says that it was fabric-limited and by how much.
//!
//! Scaling is decided per chunk from two atomics (the fabric's payload rate and the
//! demand), so routes never take each other's locks. The fabric's burst caps each
//! backlogged route's credit while the fabric is shared: credits at the scaled rates then
//! add up to at most the fabric's burst.
//!
//! Admission (`oversubscribe = "refuse"`) works on migrations, not on backlog: a new
//! migration is refused when the link rates of the routes with an active migration, plus
//! its own, would exceed the fabric. [`Fabric::admit`] checks and registers under one lock,
//! so two routes accepting at once cannot both squeeze in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Direction, Shape};
use crate::spec::{Burst, Framing, LinkRate};

/// What happens to a new migration whose route would lift the active routes' link rates
/// above the fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Oversubscribe {
    /// Admit it; backlogged routes share the fabric in proportion to their link rates.
    #[default]
    Share,
    /// Refuse it at accept, before any upstream connect.
    Refuse,
}

impl Oversubscribe {
    /// The name in the config, the control API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Oversubscribe::Share => "share",
            Oversubscribe::Refuse => "refuse",
        }
    }
}

impl std::str::FromStr for Oversubscribe {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "share" => Ok(Oversubscribe::Share),
            "refuse" => Ok(Oversubscribe::Refuse),
            _ => Err(format!(
                "invalid oversubscribe {s:?}: expected \"share\" (backlogged routes share the \
                 fabric in proportion to their link rates) or \"refuse\" (a migration that \
                 would exceed the fabric is refused at accept)"
            )),
        }
    }
}

/// A fabric's settings: its line rate, framing and burst (as a link's), and what to do
/// beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FabricConfig {
    /// The fabric's line rate, framing and burst. Never unlimited.
    pub shape: Shape,
    /// Share or refuse beyond the fabric.
    pub oversubscribe: Oversubscribe,
}

impl FabricConfig {
    /// A fabric of `rate` with the default framing and burst, sharing when oversubscribed.
    pub fn new(rate: LinkRate) -> Self {
        FabricConfig {
            shape: Shape {
                rate,
                burst: Burst::DEFAULT,
                framing: Framing::DEFAULT,
            },
            oversubscribe: Oversubscribe::Share,
        }
    }

    /// Payload bits per second the fabric carries (0 if unlimited, which config refuses).
    pub fn payload_bits(&self) -> u64 {
        self.shape
            .framing
            .payload_rate(self.shape.rate)
            .map_or(0, |b| b as u64)
    }

    /// The fabric's burst as time at its rate.
    fn burst_time(&self) -> Duration {
        match (
            self.shape.burst.bytes_at(self.shape.rate),
            self.shape.rate.bytes_per_second(),
        ) {
            (Some(bytes), Some(bps)) if bps > 0.0 => Duration::from_secs_f64(bytes as f64 / bps),
            _ => Duration::ZERO,
        }
    }
}

/// A route's want on the fabric: its link's payload and line rates, bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Want {
    /// Payload bits per second (what shares are computed on).
    pub payload: u64,
    /// Line bits per second (what is reported).
    pub line: u64,
}

impl Want {
    /// The want of a link of `shape` (zero when unlimited: it cannot be shared).
    pub fn of(shape: &Shape) -> Want {
        Want {
            payload: shape
                .framing
                .payload_rate(shape.rate)
                .map_or(0, |b| b as u64),
            line: shape
                .rate
                .bytes_per_second()
                .map_or(0, |b| (b * 8.0) as u64),
        }
    }
}

/// The shared fabric. Cheap to clone; every route of the server holds one.
#[derive(Debug, Clone)]
pub struct Fabric {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Payload bits per second of the fabric.
    payload_bits: AtomicU64,
    /// The fabric's burst, ns at its rate.
    burst_ns: AtomicU64,
    /// Backlogged demand per direction: payload and line bits per second.
    demand: [[AtomicU64; 2]; 2],
    state: Mutex<State>,
    mode: AtomicU8,
}

#[derive(Debug)]
struct State {
    config: FabricConfig,
    /// Routes with an active migration, and their link's want when it was admitted.
    active: BTreeMap<String, Want>,
}

/// How far beyond the fabric the backlogged routes are, as a chunk sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Squeeze {
    /// Extra line time per unit of the link's own line time: `demand / fabric - 1`.
    pub over: f64,
    /// The fabric's burst: no route keeps more credit than this while it is shared.
    pub burst: Duration,
}

/// Why a new migration was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The fabric's payload rate, bits per second.
    pub fabric_bits: u64,
    /// What the routes with an active migration already take, payload bits per second.
    pub active_bits: u64,
    /// What the new migration's route would add.
    pub wanted_bits: u64,
    /// Those routes.
    pub active_routes: Vec<String>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused: the fabric carries {} of payload; routes with a migration ({}) take {} and \
             this route's link wants {} more (oversubscribe = \"refuse\"; wait for one to end, \
             raise the fabric or set oversubscribe = \"share\")",
            crate::spec::format_bits(self.fabric_bits as f64),
            if self.active_routes.is_empty() {
                "none".to_string()
            } else {
                self.active_routes.join(", ")
            },
            crate::spec::format_bits(self.active_bits as f64),
            crate::spec::format_bits(self.wanted_bits as f64),
        )
    }
}

/// A snapshot for the control API and `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct FabricView {
    /// The settings in force.
    pub config: FabricConfig,
    /// Backlogged demand per direction ([`Direction::index`]): payload and line bits/s.
    pub demand: [Want; 2],
    /// Routes with an active migration and their link's want.
    pub active: BTreeMap<String, Want>,
}

impl FabricView {
    /// The payload rate the active migrations' links want together, bits per second.
    pub fn active_bits(&self) -> u64 {
        self.active.values().map(|w| w.payload).sum()
    }

    /// What is left of the fabric for another migration (negative: oversubscribed).
    pub fn headroom_bits(&self) -> i64 {
        self.config.payload_bits() as i64 - self.active_bits() as i64
    }

    /// The share of its link a route backlogged in `dir` gets now (1.0: all of it).
    pub fn scale(&self, dir: Direction) -> f64 {
        let demand = self.demand[dir.index()].payload;
        let fabric = self.config.payload_bits();
        if demand <= fabric || demand == 0 {
            1.0
        } else {
            fabric as f64 / demand as f64
        }
    }
}

impl Fabric {
    /// A fabric with these settings and nothing on it.
    pub fn new(config: FabricConfig) -> Fabric {
        let fabric = Fabric {
            inner: Arc::new(Inner {
                payload_bits: AtomicU64::new(0),
                burst_ns: AtomicU64::new(0),
                demand: Default::default(),
                state: Mutex::new(State {
                    config,
                    active: BTreeMap::new(),
                }),
                mode: AtomicU8::new(0),
            }),
        };
        fabric.set(config);
        fabric
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain data: a panic elsewhere leaves it valid.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies new settings at once: the next chunk of every route sees them.
    pub fn set(&self, config: FabricConfig) {
        let mut st = self.state();
        st.config = config;
        self.inner
            .payload_bits
            .store(config.payload_bits(), Ordering::Relaxed);
        self.inner.burst_ns.store(
            u64::try_from(config.burst_time().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.inner.mode.store(
            (config.oversubscribe == Oversubscribe::Refuse).into(),
            Ordering::Relaxed,
        );
    }

    /// The settings in force.
    pub fn config(&self) -> FabricConfig {
        self.state().config
    }

    /// A route's link became backlogged in `dir`: its want joins the demand.
    pub fn join(&self, dir: Direction, want: Want) {
        let d = &self.inner.demand[dir.index()];
        d[0].fetch_add(want.payload, Ordering::Relaxed);
        d[1].fetch_add(want.line, Ordering::Relaxed);
    }

    /// A route's link stopped being backlogged in `dir` (exactly the want it joined with).
    pub fn leave(&self, dir: Direction, want: Want) {
        let d = &self.inner.demand[dir.index()];
        // Never below zero, even if a caller's bookkeeping were off.
        let _ = d[0].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(want.payload))
        });
        let _ = d[1].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(want.line))
        });
    }

    /// How far beyond the fabric the backlogged routes of `dir` are, `None` while the
    /// fabric carries them all.
    pub fn squeeze(&self, dir: Direction) -> Option<Squeeze> {
        let demand = self.inner.demand[dir.index()][0].load(Ordering::Relaxed);
        let fabric = self.inner.payload_bits.load(Ordering::Relaxed);
        (demand > fabric && fabric > 0).then(|| Squeeze {
            over: demand as f64 / fabric as f64 - 1.0,
            burst: Duration::from_nanos(self.inner.burst_ns.load(Ordering::Relaxed)),
        })
    }

    /// Decides whether `route`, about to start a migration that wants `want`, may: in
    /// `share` mode always; in `refuse` mode only if the routes with an active migration
    /// plus this one fit in the fabric. Admitted routes count as active until
    /// [`Fabric::finished`].
    pub fn admit(&self, route: &str, want: Want) -> Result<(), Refusal> {
        let mut st = self.state();
        if st.config.oversubscribe == Oversubscribe::Refuse && !st.active.contains_key(route) {
            let active_bits: u64 = st.active.values().map(|w| w.payload).sum();
            let fabric_bits = st.config.payload_bits();
            if active_bits + want.payload > fabric_bits {
                return Err(Refusal {
                    fabric_bits,
                    active_bits,
                    wanted_bits: want.payload,
                    active_routes: st.active.keys().cloned().collect(),
                });
            }
        }
        st.active.insert(route.to_string(), want);
        Ok(())
    }

    /// Registers `route` as having an active migration that wants `want`, whatever the
    /// mode (admission, if any, was decided by [`Fabric::admit`]).
    pub fn register(&self, route: &str, want: Want) {
        self.state().active.insert(route.to_string(), want);
    }

    /// `route`'s migration ended: it no longer counts as active.
    pub fn finished(&self, route: &str) {
        self.state().active.remove(route);
    }

    /// True when new migrations beyond the fabric are refused.
    pub fn refuses(&self) -> bool {
        self.inner.mode.load(Ordering::Relaxed) == 1
    }

    /// The fabric as it is now.
    pub fn view(&self) -> FabricView {
        let st = self.state();
        let demand = std::array::from_fn(|i| Want {
            payload: self.inner.demand[i][0].load(Ordering::Relaxed),
            line: self.inner.demand[i][1].load(Ordering::Relaxed),
        });
        FabricView {
            config: st.config,
            demand,
            active: st.active.clone(),
        }
    }
}

/// A link direction's place on the fabric: whether it counts in the demand now, and with
/// what want.
#[derive(Debug)]
pub(crate) struct Seat {
    fabric: Fabric,
    dir: Direction,
    joined: Option<Want>,
}

impl Seat {
    pub(crate) fn new(fabric: Fabric, dir: Direction) -> Seat {
        Seat {
            fabric,
            dir,
            joined: None,
        }
    }

    /// The link became backlogged with `shape`.
    pub(crate) fn join(&mut self, shape: &Shape) {
        self.leave();
        let want = Want::of(shape);
        self.fabric.join(self.dir, want);
        self.joined = Some(want);
    }

    /// The link stopped being backlogged.
    pub(crate) fn leave(&mut self) {
        if let Some(want) = self.joined.take() {
            self.fabric.leave(self.dir, want);
        }
    }

    /// The link's shape changed: a backlogged link's want follows.
    pub(crate) fn reshape(&mut self, shape: &Shape) {
        if self.joined.is_some() {
            self.join(shape);
        }
    }

    pub(crate) fn squeeze(&self) -> Option<Squeeze> {
        self.fabric.squeeze(self.dir)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rate: &str) -> Shape {
        Shape {
            rate: rate.parse().unwrap(),
            burst: Burst::DEFAULT,
            framing: Framing::None,
        }
    }

    fn fabric(rate: &str, mode: Oversubscribe) -> Fabric {
        Fabric::new(FabricConfig {
            shape: shape(rate),
            oversubscribe: mode,
        })
    }

    #[test]
    fn demand_within_the_fabric_squeezes_nothing_beyond_it_scales() {
        let f = fabric("300mbit", Oversubscribe::Share);
        let (mut a, mut b) = (
            Seat::new(f.clone(), Direction::ToDestination),
            Seat::new(f.clone(), Direction::ToDestination),
        );
        a.join(&shape("100mbit"));
        assert_eq!(f.squeeze(Direction::ToDestination), None);
        b.join(&shape("250mbit"));
        let s = f.squeeze(Direction::ToDestination).unwrap();
        assert!((s.over - (350.0 / 300.0 - 1.0)).abs() < 1e-9, "{s:?}");
        assert_eq!(s.burst, Duration::from_millis(1));
        // The other direction is not backlogged.
        assert_eq!(f.squeeze(Direction::ToSource), None);
        let v = f.view();
        assert!((v.scale(Direction::ToDestination) - 300.0 / 350.0).abs() < 1e-9);
        assert_eq!(v.demand[0].line, 350_000_000);
        // A reshape while backlogged replaces the want; leaving restores the fabric.
        b.reshape(&shape("200mbit"));
        assert_eq!(f.squeeze(Direction::ToDestination), None);
        b.reshape(&shape("250mbit"));
        drop(b);
        assert_eq!(f.squeeze(Direction::ToDestination), None);
        a.leave();
        a.leave();
        assert_eq!(f.view().demand[0], Want::default());
    }

    #[test]
    fn refuse_admits_what_fits_and_names_what_does_not() {
        let f = fabric("300mbit", Oversubscribe::Refuse);
        assert!(f.refuses());
        f.admit("r250", Want::of(&shape("250mbit"))).unwrap();
        // Re-admitting a route that is already active is not a new demand.
        f.admit("r250", Want::of(&shape("250mbit"))).unwrap();
        let e = f.admit("r100", Want::of(&shape("100mbit"))).unwrap_err();
        assert_eq!(e.active_routes, vec!["r250".to_string()]);
        let text = e.to_string();
        assert!(
            text.contains("refused") && text.contains("r250") && text.contains("share"),
            "{text}"
        );
        f.finished("r250");
        f.admit("r100", Want::of(&shape("100mbit"))).unwrap();
        assert_eq!(f.view().headroom_bits(), 200_000_000);
        // Share mode admits beyond the fabric.
        f.set(FabricConfig {
            oversubscribe: Oversubscribe::Share,
            ..f.config()
        });
        f.admit("r250", Want::of(&shape("250mbit"))).unwrap();
        assert_eq!(f.view().headroom_bits(), -50_000_000);
    }

    #[test]
    fn oversubscribe_parses_and_explains() {
        assert_eq!("Refuse".parse(), Ok(Oversubscribe::Refuse));
        assert_eq!(" share".parse(), Ok(Oversubscribe::Share));
        let e = "deny".parse::<Oversubscribe>().unwrap_err();
        assert!(e.contains("deny") && e.contains("refuse"), "{e}");
    }
}
