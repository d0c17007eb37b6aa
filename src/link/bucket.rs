//! The sans-IO token bucket behind one direction of an emulated link.
//!
//! Pure arithmetic: callers pass `now` in and get back the instant at which their bytes may
//! leave. No clock, no tokio, no sleeping here, so every property is tested on fake time.
//!
//! # Model
//! The bucket is a virtual wire. `free_at` (the `booked` wire's end) is when the wire
//! finishes serialising everything reserved so far. A reservation of `n` payload bytes
//! starts at `max(free_at, now - burst)`
//! (an idle wire accrues at most `burst` of credit) and ends `cost(n)` later; the caller may
//! release its bytes at that end time (store-and-forward of one chunk, as a real link
//! delivers a frame's last bit after its serialisation time). Reservations are granted in
//! call order, so connections sharing the bucket are served first come, first served:
//! that is what makes the shared link fair and what bounds a small message's wait to one
//! chunk ahead of it.
//!
//! A booking is made when a chunk is read, but the bytes leave when the task that holds it
//! runs again. If it runs late (the process was descheduled for a few milliseconds), the
//! chunks booked behind it would leave together with it: a burst a real wire cannot send,
//! since it stayed idle meanwhile. So each release is checked a second time against the
//! wire as it really was ([`TokenBucket::release`]): the same rule, applied to the
//! instants bytes actually left. A late release uses up the burst credit, the chunks
//! behind it wait their serialisation time again, and the lost time is not made up
//! beyond the burst (plus a chunk whose holder, already held back, runs late once more;
//! in a simulation with 2 - 8 ms stalls the worst excess over the rate halved, from
//! 4.3 - 4.8 chunks to 1.9 - 2.7). In steady state both clocks agree and nothing waits.
//!
//! Costs are exact rationals (bits per second times framing ratio) carried with their
//! remainder, so long transfers never drift, at 1 Gb/s, 10 Gb/s or any other rate.
//!
//! # Late wake-ups
//! A holder that wakes late by `L` finds `L` of credit accrued meanwhile: nothing is lost as
//! long as its chunk plus `L` fits in the burst. So the chunk size follows the host: the
//! bucket tracks the 99th percentile of its holders' lateness ([`LATENESS_QUANTILE`]) and
//! [`TokenBucket::chunk_fraction`] shrinks chunks from half the burst towards a tenth of it
//! as wake-ups get later. On a host whose timers fire on time chunks stay large (fewer
//! wake-ups, the cost of shaping); on one that wakes up to 90 % of the burst late they are
//! small enough that the mean stays exact. A percentile, not the worst case: a rare stall
//! longer than the burst is lost whatever the chunk, and must not cost every other chunk.
//!
//! # Fidelity
//! The bucket also keeps the link's own ledger ([`Fidelity`]): what it carried, and every
//! stretch of time in which some connection held data for it while the wire's credit sat
//! full (the link could have sent and did not). That time is lost for good; it is booked
//! to a [`Cause`]: the receiving side not taking a write ([`Cause::Destination`]: counted
//! once the sender is seen to have had more data waiting, since a last chunk that is slow
//! to write before a pause delays nothing; a sender whose next bytes come within
//! [`SENDER_GRACE`] of a read that found none counts as having had them, gap included, as
//! on a busy host the source's bytes reach migshaper a scheduling moment late), or else
//! the link's holders waking too late ([`Cause::Late`]). Time in which no connection held
//! data (the sender had nothing to send) is idle, never shortfall. Connections report
//! their state through [`TokenBucket::busy`], [`TokenBucket::release`],
//! [`TokenBucket::written`] and [`TokenBucket::idle`].

use std::time::{Duration, Instant};

use super::fabric::{Seat, Squeeze};
use crate::spec::{Burst, Framing, LinkRate};

/// What a link direction emulates: its line rate, its burst tolerance and its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Line rate (on the wire, framing included).
    pub rate: LinkRate,
    /// How far the link may run ahead of its rate after idling or oversleeping.
    pub burst: Burst,
    /// Per-segment overhead charged on top of the payload.
    pub framing: Framing,
}

impl Shape {
    /// An unlimited link: no shaping, no framing charge.
    pub const UNLIMITED: Shape = Shape {
        rate: LinkRate::Unlimited,
        burst: Burst::DEFAULT,
        framing: Framing::None,
    };

    /// The most payload bytes that may leave at once: the burst expressed in payload bytes
    /// (`None` when unlimited). Readers cap their chunks at this, so that no single
    /// release exceeds the configured burst.
    pub fn burst_payload_bytes(&self) -> Option<u64> {
        let wire = self.burst.bytes_at(self.rate)?;
        let (w, p) = self.framing.wire_ratio();
        Some((u128::from(wire) * u128::from(p) / u128::from(w)).max(1) as u64)
    }
}

/// Largest chunk, as a share of the burst, for holders that wake on time: the other half
/// absorbs their lateness, and a holder held back on the real wire that then wakes late
/// still keeps every 100 ms window within the rate plus the burst (at 0.8 the sans-IO
/// simulation with four flows exceeded it by 0.3 %).
pub const MAX_CHUNK_FRACTION: f64 = 0.5;
/// Smallest chunk, as a share of the burst: absorbs wake-ups late by up to 90 % of it.
pub const MIN_CHUNK_FRACTION: f64 = 0.1;
/// A sender whose read found nothing but who has data again within this is taken to have
/// been backlogged all along: a scheduling moment, on a busy host, between its bytes and
/// ours (see [`TokenBucket::idle`]).
pub const SENDER_GRACE: Duration = Duration::from_millis(2);
/// Chunks leave room for this multiple of the recent worst lateness.
const LATENESS_MARGIN: f64 = 1.25;
/// How much faster than the link the kernel paces its sockets: a little, so that bytes
/// released early (after a late wake-up) drain and the kernel's queue does not grow
/// without bound when its pacing runs a hair slow (it measured 0.9998 of the asked rate at
/// 1 Gb/s on VM-C); little enough that a 100 ms window stays far inside the burst's bound.
pub const PACE_MARGIN: f64 = 0.002;

/// Exact cost parameters of a shaped link.
#[derive(Debug, Clone, Copy)]
struct Cost {
    /// Numerator per payload byte: 8 bits * 1e9 ns * wire.
    per_byte: u128,
    /// Denominator: bits per second * payload.
    denom: u128,
    /// Burst tolerance as time.
    tau: Duration,
}

impl Cost {
    /// The line time of `n` payload bytes, exactly: whole nanoseconds, with the remainder
    /// carried in `frac` (units of `1/denom` ns) to the next call.
    fn time_of(&self, n: u64, frac: &mut u128) -> Duration {
        let total = u128::from(n) * self.per_byte + *frac;
        *frac = total % self.denom;
        Duration::from_nanos((total / self.denom).min(u128::from(u64::MAX)) as u64)
    }

    /// The payload bytes the link carries in `d` at its full rate.
    fn bytes_in(&self, d: Duration) -> u64 {
        u64::try_from(d.as_nanos() * self.denom / self.per_byte).unwrap_or(u64::MAX)
    }
}

/// One direction of a link: a virtual wire with a reservation queue.
#[derive(Debug)]
pub struct TokenBucket {
    shape: Shape,
    cost: Option<Cost>,
    /// When the virtual wire finishes everything reserved so far (`free_at` in the model).
    booked: Wire,
    /// When the wire finished the chunks actually released so far, by their release
    /// instants rather than their bookings (see [`TokenBucket::release`]).
    released: Wire,
    /// What the link carried and lost, and how late its holders wake.
    ledger: Ledger,
    /// The fabric beneath, if the server has one.
    seat: Option<Seat>,
    /// Credit beyond the burst that releases may run ahead of the wire while the kernel
    /// paces the receiving sockets (see [`TokenBucket::set_lead`]); zero when it does not.
    lead: Duration,
    /// Connections that released bulk data (not a sparse flow's message) lately, by flow
    /// id, with when they last did: the kernel pacing rate is shared between them.
    bulk: Vec<(u64, Instant)>,
    /// When the last connection holding data stopped holding any.
    idle_since: Instant,
}

/// Why a backlogged link carried less than its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The link's own wake-ups came later than the burst could absorb (host scheduling).
    Late,
    /// A write to the receiving side could not proceed (the receiver, or the real path
    /// beneath, was slower than the emulated link).
    Destination,
    /// The fabric beneath the route was shared with other backlogged routes beyond its
    /// rate (see [`super::fabric`]).
    Fabric,
}

impl Cause {
    /// Every cause, in index order.
    pub const ALL: [Cause; 3] = [Cause::Late, Cause::Destination, Cause::Fabric];

    /// The label in metrics (`cause`) and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Late => "late",
            Cause::Destination => "destination",
            Cause::Fabric => "fabric",
        }
    }

    /// The cause's place in [`Cause::ALL`].
    pub fn index(self) -> usize {
        match self {
            Cause::Late => 0,
            Cause::Destination => 1,
            Cause::Fabric => 2,
        }
    }
}

/// What one direction of a link carried while it had something to carry, and what it lost,
/// cumulative since the link was made; [`Fidelity::since`] gives any stretch in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fidelity {
    /// Payload bytes the shaped link carried.
    pub carried_bytes: u64,
    /// Their line time at the rate in force when each left.
    pub line: Duration,
    /// Time the link lost while backlogged, by [`Cause::index`].
    pub lost: [Duration; 3],
    /// Payload bytes the link could have carried in that time, by [`Cause::index`].
    pub shortfall_bytes: [u64; 3],
    /// Time no connection held data for the link (the sender had nothing ready).
    pub idle: Duration,
}

impl Fidelity {
    /// Time the link had something to carry: the line time of what it carried plus the
    /// time it lost.
    pub fn backlogged(&self) -> Duration {
        self.line + self.lost.iter().sum::<Duration>()
    }

    /// Shortfall of every cause, in payload bytes.
    pub fn shortfall_total(&self) -> u64 {
        self.shortfall_bytes.iter().sum()
    }

    /// Carried over what the rate allowed in the backlogged time (`None` if the link was
    /// never backlogged or is unlimited): 1.0 is a link that delivered its rate whenever
    /// it had something to deliver.
    pub fn ratio(&self) -> Option<f64> {
        let want = self.carried_bytes + self.shortfall_total();
        (want > 0).then(|| self.carried_bytes as f64 / want as f64)
    }

    /// What happened between `earlier` and this reading.
    pub fn since(&self, earlier: &Fidelity) -> Fidelity {
        Fidelity {
            carried_bytes: self.carried_bytes.saturating_sub(earlier.carried_bytes),
            line: self.line.saturating_sub(earlier.line),
            lost: std::array::from_fn(|i| self.lost[i].saturating_sub(earlier.lost[i])),
            shortfall_bytes: std::array::from_fn(|i| {
                self.shortfall_bytes[i].saturating_sub(earlier.shortfall_bytes[i])
            }),
            idle: self.idle.saturating_sub(earlier.idle),
        }
    }

    /// Adds another stretch's figures to these.
    pub fn add(&mut self, o: &Fidelity) {
        self.carried_bytes += o.carried_bytes;
        self.line += o.line;
        for i in 0..self.lost.len() {
            self.lost[i] += o.lost[i];
            self.shortfall_bytes[i] += o.shortfall_bytes[i];
        }
        self.idle += o.idle;
    }
}

/// The share of wake-ups whose lateness chunks are sized to absorb.
pub const LATENESS_QUANTILE: f64 = 0.99;
/// Step of the percentile tracker, as a share of the burst: it climbs to a new lateness in
/// about 30 late wake-ups and comes back down in about 3,000 on-time ones.
const LATENESS_STEP: f64 = 1.0 / 32.0;

/// The fidelity ledger of one direction (see the module docs).
#[derive(Debug, Clone)]
struct Ledger {
    /// Accounted up to here.
    at: Instant,
    /// Connections holding data for the link (read, not yet handed to the receiver).
    busy: u32,
    /// Of those, connections whose data was released and is being written.
    writing: u32,
    /// Time lost while a write was pending, and its bytes: the destination's once a
    /// sender is seen to have had more data (a release), idle if a read finds nothing.
    pending: (Duration, u64),
    /// A pending write's lost time and bytes whose sender's next read found nothing, and
    /// when: the destination's if the sender has data again within [`SENDER_GRACE`], else
    /// idle.
    parked: Option<(Duration, u64, Instant)>,
    totals: Fidelity,
    /// Sub-nanosecond remainder of `totals.line`, in units of `1/denom` ns.
    line_frac: u128,
    /// The tracked [`LATENESS_QUANTILE`] of holders' lateness, as a share of the burst.
    late_q: f64,
}

impl Ledger {
    fn new(now: Instant) -> Ledger {
        Ledger {
            at: now,
            busy: 0,
            writing: 0,
            pending: (Duration::ZERO, 0),
            parked: None,
            totals: Fidelity::default(),
            line_frac: 0,
            late_q: 0.0,
        }
    }

    /// Books a parked write's lost time (see [`Ledger::parked`]) as of `now`: to the
    /// destination if the sender had data again (`resumed`) within [`SENDER_GRACE`], to
    /// idle once that has passed; otherwise it stays parked.
    fn unpark(&mut self, now: Instant, resumed: bool) {
        let Some((lost, bytes, at)) = self.parked else {
            return;
        };
        let soon = now.saturating_duration_since(at) <= SENDER_GRACE;
        if resumed && soon {
            let d = Cause::Destination.index();
            self.totals.lost[d] += lost;
            self.totals.shortfall_bytes[d] += bytes;
        } else if !soon {
            self.totals.idle += lost;
        } else {
            return;
        }
        self.parked = None;
    }

    /// Moves the percentile towards a wake-up `late` (a share of the burst): up by
    /// `q` steps when it was later, down by `1 - q` when not, which settles where a share
    /// `1 - q` of wake-ups is later (stochastic quantile tracking).
    fn learn_lateness(&mut self, late: f64) {
        let step = if late > self.late_q {
            LATENESS_STEP * LATENESS_QUANTILE
        } else {
            -LATENESS_STEP * (1.0 - LATENESS_QUANTILE)
        };
        self.late_q = (self.late_q + step).clamp(0.0, 1.0);
    }
}

/// A wire's schedule: when it finishes what it carries, exactly.
#[derive(Debug, Clone, Copy)]
struct Wire {
    end: Instant,
    /// Sub-nanosecond remainder of `end`, in units of `1/denom` ns.
    frac: u128,
}

impl Wire {
    fn idle_at(now: Instant) -> Wire {
        Wire { end: now, frac: 0 }
    }

    /// Appends `n` bytes at `cost` and returns how long they take.
    fn charge(&mut self, n: u64, cost: &Cost) -> Duration {
        let d = cost.time_of(n, &mut self.frac);
        self.end += d;
        d
    }

    /// Appends `n` bytes arriving at `now`: an idle wire accrues at most `burst` of credit
    /// (the fabric's burst, if less, while the fabric is shared). Returns when they are
    /// through and the extra time the fabric's share added (see [`Wire::squeezed`]).
    fn book(
        &mut self,
        n: u64,
        cost: &Cost,
        now: Instant,
        credit: Duration,
        squeeze: Option<Squeeze>,
    ) -> (Instant, Duration) {
        let earliest = now.checked_sub(credit).unwrap_or(now);
        if earliest > self.end {
            *self = Wire::idle_at(earliest);
        }
        let extra = self.squeezed(n, cost, squeeze);
        (self.end, extra)
    }

    /// Appends `n` bytes: their line time, plus, while the fabric is shared beyond its
    /// rate, that time scaled by `over` (the link runs at its share of the fabric).
    /// Returns the extra.
    fn squeezed(&mut self, n: u64, cost: &Cost, squeeze: Option<Squeeze>) -> Duration {
        let d = self.charge(n, cost);
        let extra = squeeze.map_or(Duration::ZERO, |s| d.mul_f64(s.over));
        self.end += extra;
        extra
    }
}

/// The credit in force: the link's burst plus the pacing lead, or the fabric's burst if
/// less while it is shared.
fn credit(cost: &Cost, lead: Duration, squeeze: Option<Squeeze>) -> Duration {
    let own = cost.tau + lead;
    squeeze.map_or(own, |s| own.min(s.burst))
}

impl TokenBucket {
    /// A bucket that starts empty at `now`: the first bytes wait their serialisation time,
    /// nothing leaves as a burst at start.
    pub fn new(shape: Shape, now: Instant) -> Self {
        TokenBucket {
            shape,
            cost: Self::cost_of(&shape),
            booked: Wire::idle_at(now),
            released: Wire::idle_at(now),
            ledger: Ledger::new(now),
            seat: None,
            lead: Duration::ZERO,
            bulk: Vec::new(),
            idle_since: now,
        }
    }

    /// Lets releases run up to `lead` beyond the burst ahead of the wire: the caller
    /// promises that the kernel paces every receiving socket at no more than
    /// [`TokenBucket::pace_rate`], so the bytes released early queue in the kernel and
    /// leave at the rate (a wire never runs ahead), while a holder that wakes late by up to
    /// the burst plus `lead` finds its credit still there and the kernel's queue still
    /// sending. Zero (the default) when the kernel does not pace.
    pub fn set_lead(&mut self, lead: Duration) {
        self.lead = lead;
    }

    /// The lead in force (see [`TokenBucket::set_lead`]).
    pub fn lead(&self) -> Duration {
        self.lead
    }

    /// The credit a holder may find: the burst plus the lead (while one connection carries
    /// the link's bulk), or the fabric's burst if less while it is shared; zero when
    /// unlimited.
    ///
    /// The lead is for one bulk connection: its socket alone holds what was released early
    /// and the kernel sends it at the rate. Each socket is paced on its own, so with several
    /// bulk connections the early bytes of all of them would leave side by side, faster
    /// than the link; they keep the burst alone, as without kernel pacing.
    fn credit(&self) -> Duration {
        let lead = if self.bulk.len() > 1 {
            Duration::ZERO
        } else {
            self.lead
        };
        self.cost
            .map_or(Duration::ZERO, |c| credit(&c, lead, self.squeeze()))
    }

    /// The kernel pacing rate, in payload bytes per second, for each receiving socket of
    /// this direction: the link's payload rate plus [`PACE_MARGIN`]. `None` when the link
    /// is unlimited or runs without a lead (no kernel pacing).
    pub fn pace_rate(&self) -> Option<u64> {
        if self.lead.is_zero() {
            return None;
        }
        let bits = self.shape.framing.payload_rate(self.shape.rate)?;
        Some((bits / 8.0 * (1.0 + PACE_MARGIN)).ceil() as u64)
    }

    /// Flow `id` booked a bulk chunk at `now`: while more than one flow did within the
    /// lead's span, the lead is off (see [`TokenBucket::credit`]). Nothing to track
    /// without a lead.
    pub fn bulk_booking(&mut self, id: u64, now: Instant) {
        if self.lead.is_zero() {
            return;
        }
        let span = self.lead + self.cost.map_or(Duration::ZERO, |c| c.tau);
        self.bulk
            .retain(|(f, at)| *f != id && now.saturating_duration_since(*at) <= span);
        self.bulk.push((id, now));
    }

    /// Flow `id` ended.
    pub fn forget(&mut self, id: u64) {
        self.bulk.retain(|(f, _)| *f != id);
    }

    /// Puts this bucket on `fabric` as direction `dir` of its route: while the route is
    /// backlogged, its link rate counts in the fabric's demand, and while that demand
    /// exceeds the fabric, the bucket runs at its share of it.
    pub fn on_fabric(&mut self, fabric: super::fabric::Fabric, dir: super::Direction) {
        let mut seat = Seat::new(fabric, dir);
        if self.ledger.busy > 0 {
            seat.join(&self.shape);
        }
        self.seat = Some(seat);
    }

    /// How far beyond its fabric this bucket's direction is now, if it is on one.
    pub(super) fn squeeze(&self) -> Option<Squeeze> {
        self.seat.as_ref().and_then(Seat::squeeze)
    }

    fn cost_of(shape: &Shape) -> Option<Cost> {
        let LinkRate::BitsPerSecond(bits) = shape.rate else {
            return None;
        };
        let (wire, payload) = shape.framing.wire_ratio();
        let wire_burst = shape.burst.bytes_at(shape.rate)?;
        let tau_ns = u128::from(wire_burst) * 8 * 1_000_000_000 / u128::from(bits.get());
        Some(Cost {
            per_byte: 8 * 1_000_000_000 * u128::from(wire),
            denom: u128::from(bits.get()) * u128::from(payload),
            tau: Duration::from_nanos(tau_ns.min(u128::from(u64::MAX)) as u64),
        })
    }

    /// The shape in force.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Switches to a new shape at `now`, starting with an empty bucket: no burst at the
    /// switch (unlike `tc`, which refills its bucket on change). Reservations already
    /// granted keep their release times.
    pub fn set_shape(&mut self, shape: Shape, now: Instant) {
        self.advance(now);
        self.shape = shape;
        self.cost = Self::cost_of(&shape);
        self.booked = Wire::idle_at(self.booked.end.max(now));
        self.released = Wire::idle_at(self.released.end.max(now));
        if let Some(seat) = &mut self.seat {
            seat.reshape(&shape);
        }
    }

    /// Reserves the wire for `n` payload bytes at `now` and returns when they may leave.
    /// Never earlier than `now`; exactly `now` when the link is unlimited or has credit.
    pub fn reserve(&mut self, n: u64, now: Instant) -> Instant {
        let Some(cost) = self.cost else {
            return now;
        };
        let (credit, squeeze) = (self.credit(), self.squeeze());
        self.booked.book(n, &cost, now, credit, squeeze).0.max(now)
    }

    /// Reserves the wire for a sparse flow's `n` bytes at `now`: they jump ahead of the
    /// bookings already granted to busy flows, as a real link's fair queueing (fq_codel's
    /// "new flows") serves a flow that had nothing queued before the bulk backlog. The
    /// bytes are still charged: the next booking starts that much later, so the rate holds.
    /// The caller decides what is sparse (see `Link::acquire`).
    pub fn reserve_sparse(&mut self, n: u64, now: Instant) -> Instant {
        let Some(cost) = self.cost else {
            return now;
        };
        if self.booked.end <= now {
            return self.reserve(n, now);
        }
        let squeeze = self.squeeze();
        let start = self.booked.end;
        self.booked.squeezed(n, &cost, squeeze);
        now + (self.booked.end - start)
    }

    /// Books the real wire for a chunk of `n` payload bytes whose booking (from
    /// [`TokenBucket::reserve`]) fell due, at the instant `now` its holder is about to
    /// release it, and returns when it may go: `now` or earlier in steady state, later only
    /// after releases ran late by more than the burst. The holder then sleeps until that
    /// instant and goes without asking again, so waiting chunks keep their order. `due` is
    /// the booking's instant when the holder slept until it (its lateness is learned, see
    /// [`TokenBucket::chunk_fraction`]). The bytes count as carried, and as being written
    /// until [`TokenBucket::written`].
    ///
    /// Applies the booking rule to release instants: a chunk ends `cost(n)` after the
    /// later of the previous release's end and `now - burst`. When releases ran late, the
    /// bookings made from now on start after the real wire, so the two clocks agree again.
    pub fn release(&mut self, n: u64, now: Instant, due: Option<Instant>) -> Instant {
        self.advance(now);
        let l = &mut self.ledger;
        let (lost, bytes) = std::mem::take(&mut l.pending);
        let d = Cause::Destination.index();
        l.totals.lost[d] += lost;
        l.totals.shortfall_bytes[d] += bytes;
        l.writing += 1;
        let Some(cost) = self.cost else {
            return now;
        };
        if let Some(due) = due {
            let late = now.saturating_duration_since(due).as_nanos() as f64;
            let tau = self.credit().as_nanos() as f64;
            if tau > 0.0 {
                self.ledger.learn_lateness(late / tau);
            }
        }
        let l = &mut self.ledger;
        l.totals.carried_bytes += n;
        let total = u128::from(n) * cost.per_byte + l.line_frac;
        l.line_frac = total % cost.denom;
        l.totals.line +=
            Duration::from_nanos((total / cost.denom).min(u128::from(u64::MAX)) as u64);
        let (credit, squeeze) = (self.credit(), self.squeeze());
        let (go, extra) = self.released.book(n, &cost, now, credit, squeeze);
        if !extra.is_zero() {
            // The fabric's share stretched this chunk's line time: lost to the fabric.
            let l = &mut self.ledger;
            let f = Cause::Fabric.index();
            l.totals.lost[f] += extra;
            l.totals.shortfall_bytes[f] += cost.bytes_in(extra);
        }
        if go > self.booked.end {
            // Releases ran late: the wire lost that time; later bookings start after it.
            self.booked = self.released;
        }
        go
    }

    /// A connection now holds data for this direction (it read some while holding none).
    pub fn busy(&mut self, now: Instant) {
        self.advance(now);
        self.ledger.unpark(now, true);
        self.ledger.busy += 1;
        if self.ledger.busy == 1 {
            if !self.lead.is_zero() {
                self.idle_credit(now);
            }
            if let Some(seat) = &mut self.seat {
                seat.join(&self.shape);
            }
        }
    }

    /// A connection's released data has been handed to the receiving side.
    pub fn written(&mut self, now: Instant) {
        self.advance(now);
        self.ledger.writing = self.ledger.writing.saturating_sub(1);
    }

    /// A busy connection found nothing more to read: it holds no data now.
    pub fn idle(&mut self, now: Instant) {
        self.advance(now);
        let l = &mut self.ledger;
        l.busy = l.busy.saturating_sub(1);
        // The sender has nothing more right now. If that lasts, the link would have idled
        // during the write too; if its next bytes come a moment later (the sender's thread,
        // or the kernel's delivery to us, ran late), the write did hold the link back.
        l.unpark(now, false);
        let (lost, bytes) = std::mem::take(&mut l.pending);
        if !lost.is_zero() {
            l.totals.idle += l.parked.take().map_or(Duration::ZERO, |p| p.0);
            l.parked = Some((lost, bytes, now));
        }
        if l.busy == 0 {
            self.idle_since = now;
            if let Some(seat) = &mut self.seat {
                seat.leave();
            }
        }
    }

    /// Caps the credit of a link that was idle until `now`: the lead is for holders that
    /// wake late while the link is backlogged; an idle link accrues only the burst (as
    /// without the lead), on top of the credit it still had when it went idle. Without
    /// this, the first bytes after a pause would leave with the whole lead, faster than
    /// the kernel paces a new connection's first segments.
    fn idle_credit(&mut self, now: Instant) {
        let Some(cost) = self.cost else {
            return;
        };
        let full = self.credit();
        let burst = credit(&cost, Duration::ZERO, self.squeeze());
        for wire in [&mut self.booked, &mut self.released] {
            let kept = self
                .idle_since
                .saturating_duration_since(wire.end)
                .min(full);
            let earliest = now.checked_sub(kept.max(burst)).unwrap_or(now);
            if wire.end < earliest {
                *wire = Wire::idle_at(earliest);
            }
        }
    }

    /// The ledger up to `now`.
    pub fn fidelity(&mut self, now: Instant) -> Fidelity {
        self.advance(now);
        self.ledger.unpark(now, false);
        self.ledger.totals
    }

    /// The share of the burst a chunk should take: half of it while holders wake on time,
    /// down to a tenth as their lateness (its [`LATENESS_QUANTILE`]) grows, so that a chunk
    /// plus the lateness still fits in the burst (see the module docs).
    pub fn chunk_fraction(&self) -> f64 {
        (1.0 - LATENESS_MARGIN * self.ledger.late_q).clamp(MIN_CHUNK_FRACTION, MAX_CHUNK_FRACTION)
    }

    /// Books the time from the last event to `now`: idle when no connection held data;
    /// when some did and the wire's credit sat full (it could have sent and nobody
    /// released), lost, to the destination if a write was pending, else to lateness.
    fn advance(&mut self, now: Instant) {
        let tau = self.credit();
        let l = &mut self.ledger;
        if now <= l.at {
            return;
        }
        let from = std::mem::replace(&mut l.at, now);
        let full = self.released.end + tau;
        let start = from.max(full);
        if l.busy == 0 {
            // Nobody holds data. Right after a write that held the link back, that may be
            // the sender's next bytes a moment away: the time the link could have sent in
            // waits with the parked write for the sender's return (see `Ledger::unpark`).
            l.unpark(now, false);
            let parked = l.parked.as_mut().zip(self.cost);
            match parked {
                Some((p, cost)) if now > start => {
                    p.0 += now - start;
                    p.1 += cost.bytes_in(now - start);
                    l.totals.idle += start - from;
                }
                _ => l.totals.idle += now - from,
            }
            return;
        }
        let Some(cost) = self.cost else {
            return;
        };
        if now <= start {
            return;
        }
        let lost = now - start;
        let bytes = cost.bytes_in(lost);
        if l.writing > 0 {
            // Whether the sender had more to send is known at its next read.
            l.pending.0 += lost;
            l.pending.1 += bytes;
        } else {
            let late = Cause::Late.index();
            l.totals.lost[late] += lost;
            l.totals.shortfall_bytes[late] += bytes;
        }
    }

    /// How long the wire is booked beyond `now` (zero when idle): the queue a newcomer
    /// would wait behind.
    pub fn backlog(&self, now: Instant) -> Duration {
        self.booked.end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rate: &str, burst: &str, framing: &str) -> Shape {
        Shape {
            rate: rate.parse().unwrap(),
            burst: burst.parse().unwrap(),
            framing: framing.parse().unwrap(),
        }
    }

    /// Feeds `chunk`-byte reservations as fast as they are granted for `secs` of fake time
    /// and returns the payload bytes released by then.
    fn saturate(mut b: TokenBucket, t0: Instant, chunk: u64, secs: f64) -> u64 {
        let end = t0 + Duration::from_secs_f64(secs);
        let mut now = t0;
        let mut sent = 0;
        loop {
            let at = b.reserve(chunk, now);
            if at > end {
                return sent;
            }
            now = at;
            sent += chunk;
        }
    }

    #[test]
    fn exact_rate_at_1g_and_10g_over_long_runs() {
        for (rate, bps) in [("1g", 125e6), ("10g", 1.25e9), ("2.5gbit", 312.5e6)] {
            for chunk in [1000, 1448, 65536, 262144] {
                let t0 = Instant::now();
                let b = TokenBucket::new(shape(rate, "4ms", "none"), t0);
                let sent = saturate(b, t0, chunk, 10.0) as f64;
                let expect = bps * 10.0;
                let err = (sent - expect).abs() / expect;
                // Off by at most one chunk: the schedule itself never drifts.
                assert!(
                    sent <= expect && expect - sent <= chunk as f64,
                    "{rate} {chunk}: {err}"
                );
            }
        }
    }

    #[test]
    fn starts_empty_no_burst_at_start() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("1g", "4ms", "none"), t0);
        // 125 kB at 1 Gb/s take exactly 1 ms, even though the burst would allow 500 kB.
        assert_eq!(b.reserve(125_000, t0), t0 + Duration::from_millis(1));
    }

    #[test]
    fn credit_after_idle_is_capped_at_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("1g", "4ms", "none"), t0);
        let later = t0 + Duration::from_secs(60);
        // After a minute of idling, only 4 ms (500 kB) leave at once...
        assert_eq!(b.reserve(500_000, later), later);
        // ...and the next byte waits its turn.
        assert!(b.reserve(125, later) > later);
        assert_eq!(b.backlog(later), Duration::from_micros(1));
    }

    #[test]
    fn late_wakeups_within_the_burst_are_caught_up() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("10g", "4ms", "none"), t0);
        // A caller that oversleeps 1 ms after each grant still gets the full rate.
        let mut now = t0;
        let mut sent = 0u64;
        let end = t0 + Duration::from_secs(2);
        while now < end {
            let at = b.reserve(65536, now);
            sent += 65536;
            if at > now {
                now = at + Duration::from_millis(1);
            }
        }
        let rate = sent as f64 / (now - t0).as_secs_f64();
        assert!((rate / 1.25e9 - 1.0).abs() < 0.001, "{rate}");
    }

    #[test]
    fn framing_charges_ethernet_overhead() {
        let t0 = Instant::now();
        let b = TokenBucket::new(shape("1g", "4ms", "ethernet:1500"), t0);
        let payload_bps = saturate(b, t0, 65536, 10.0) as f64 * 8.0 / 10.0;
        assert!((941.0e6..941.5e6).contains(&payload_bps), "{payload_bps}");
        let b = TokenBucket::new(shape("1g", "4ms", "ethernet:9000"), t0);
        let payload_bps = saturate(b, t0, 65536, 10.0) as f64 * 8.0 / 10.0;
        assert!((990.0e6..990.1e6).contains(&payload_bps), "{payload_bps}");
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Shape::UNLIMITED, t0);
        assert_eq!(b.reserve(u64::MAX / 2, t0), t0);
        assert_eq!(Shape::UNLIMITED.burst_payload_bytes(), None);
    }

    #[test]
    fn switch_starts_with_an_empty_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("1g", "4ms", "none"), t0);
        let later = t0 + Duration::from_secs(1); // a full bucket of credit by now
        b.set_shape(shape("10g", "4ms", "none"), later);
        // No credit survives the switch: 1.25 MB at 10 Gb/s take 1 ms.
        assert_eq!(
            b.reserve(1_250_000, later),
            later + Duration::from_millis(1)
        );
    }

    #[test]
    fn switch_keeps_granted_reservations() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("100mbit", "4ms", "none"), t0);
        let first = b.reserve(125_000, t0); // 10 ms at 100 Mb/s
        b.set_shape(shape("1g", "4ms", "none"), t0);
        // The new rate applies after the bytes already on the wire.
        assert_eq!(b.reserve(125_000, t0), first + Duration::from_millis(1));
    }

    #[test]
    fn fifo_bounds_a_small_message_behind_one_chunk() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("1g", "4ms", "none"), t0);
        // Bulk reserves 64 KiB chunks up to the present; a 64-byte ping then waits for
        // the chunk ahead of it only.
        let mut now = t0;
        for _ in 0..1000 {
            now = b.reserve(65536, now);
        }
        // The bulk sender's next chunk is booked and it sleeps until it may leave.
        let bulk = b.reserve(65536, now);
        assert!(bulk > now);
        let ping = b.reserve(64, now);
        assert!(
            ping > bulk,
            "FIFO: the ping goes after the chunk booked before it"
        );
        assert!(ping - now <= Duration::from_micros(525), "{:?}", ping - now);
    }

    #[test]
    fn a_sparse_flow_jumps_the_bulk_queue_but_is_charged() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("1g", "4ms", "none"), t0);
        // Four bulk flows each hold a 256 KiB booking: 8 ms of wire ahead.
        let mut last = t0;
        for _ in 0..4 {
            last = b.reserve(262_144, t0);
        }
        let ping = b.reserve_sparse(64, t0);
        assert!(ping - t0 < Duration::from_micros(1), "{:?}", ping - t0);
        // The bulk flows' next booking pays for the ping's 64 bytes.
        let next = b.reserve(262_144, t0);
        assert_eq!(next - last, Duration::from_nanos(2_097_152 + 512));
        // On an idle wire a sparse reservation is an ordinary one.
        let mut idle = TokenBucket::new(shape("1g", "4ms", "none"), t0);
        assert_eq!(
            idle.reserve_sparse(125_000, t0),
            t0 + Duration::from_millis(1)
        );
    }

    #[test]
    fn a_late_release_does_not_let_the_chunks_booked_behind_it_burst() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = TokenBucket::new(shape("1g", "1ms", "none"), t0);
        // Four flows book a 1 ms chunk each: due at 1, 2, 3 and 4 ms.
        let due: Vec<Instant> = (0..4).map(|_| b.reserve(125_000, t0)).collect();
        assert_eq!(due[3], t0 + ms(4));
        // The process is descheduled until 10 ms; every flow wakes then. The first chunk
        // goes on the 1 ms credit, the others wait their serialisation time again.
        let stall_end = t0 + ms(10);
        let go: Vec<Instant> = (0..4)
            .map(|_| b.release(125_000, stall_end, None))
            .collect();
        assert_eq!(go, [t0 + ms(10), t0 + ms(11), t0 + ms(12), t0 + ms(13)]);
        // A booking made now starts after the real wire, not after the stale bookings.
        assert_eq!(b.reserve(125_000, stall_end), t0 + ms(14));
    }

    /// Runs backlogged flows, one per bucket, on fake time until `end`: each books a
    /// 4 KiB chunk (within the burst, as the pump's chunk limit keeps it), is released when
    /// due, writes at once and books the next. Returns the bytes each released by `end`.
    fn run_flows(buckets: &mut [TokenBucket], from: Instant, end: Instant) -> Vec<u64> {
        const CHUNK: u64 = 4096;
        let mut next = vec![from; buckets.len()];
        let mut sent = vec![0; buckets.len()];
        loop {
            let (i, &now) = next
                .iter()
                .enumerate()
                .min_by_key(|(_, t)| **t)
                .expect("at least one flow");
            if now >= end {
                return sent;
            }
            let b = &mut buckets[i];
            let at = b.reserve(CHUNK, now);
            let go = b.release(CHUNK, at, Some(at));
            b.written(go);
            if go <= end {
                sent[i] += CHUNK;
            }
            next[i] = go.max(now + Duration::from_nanos(1));
        }
    }

    #[test]
    fn backlogged_routes_share_a_fabric_in_proportion_to_their_links_and_book_it() {
        use super::super::Direction;
        use super::super::fabric::{Fabric, FabricConfig, Oversubscribe};
        let t0 = Instant::now();
        let fabric = Fabric::new(FabricConfig {
            shape: shape("300mbit", "1ms", "none"),
            oversubscribe: Oversubscribe::Share,
        });
        let mut buckets = [
            TokenBucket::new(shape("100mbit", "1ms", "none"), t0),
            TokenBucket::new(shape("250mbit", "1ms", "none"), t0),
        ];
        for b in &mut buckets {
            b.on_fabric(fabric.clone(), Direction::ToDestination);
            b.busy(t0);
        }
        let secs = 2.0;
        let end = t0 + Duration::from_secs_f64(secs);
        let sent = run_flows(&mut buckets, t0, end);
        let mbit = |bytes: u64| bytes as f64 * 8.0 / secs / 1e6;
        let (a, b) = (mbit(sent[0]), mbit(sent[1]));
        // 100:250 scaled to 300: 85.71 and 214.29 Mb/s.
        assert!((a - 300.0 * 100.0 / 350.0).abs() < 0.5, "{a} Mb/s");
        assert!((b - 300.0 * 250.0 / 350.0).abs() < 0.5, "{b} Mb/s");
        assert!((a + b - 300.0).abs() < 0.6, "sum {} Mb/s", a + b);
        for (bucket, link) in buckets.iter_mut().zip([100e6, 250e6]) {
            let f = bucket.fidelity(end);
            let fab = Cause::Fabric.index();
            // Every second of backlog lost 1 - 300/350 of it to the fabric, nothing else.
            let ratio = f.carried_bytes as f64 * 8.0
                / link
                / (f.line + f.lost.iter().sum::<Duration>()).as_secs_f64();
            assert!((ratio - 300.0 / 350.0).abs() < 0.01, "ratio {ratio}: {f:?}");
            let expected = link / 8.0 * secs * 50.0 / 350.0;
            let short = f.shortfall_bytes[fab] as f64;
            assert!(
                (short / expected - 1.0).abs() < 0.02,
                "{short} vs {expected}: {f:?}"
            );
            assert_eq!(f.shortfall_bytes[Cause::Late.index()], 0, "{f:?}");
            assert_eq!(f.shortfall_bytes[Cause::Destination.index()], 0, "{f:?}");
        }
        // The 100 Mb/s route goes idle: the other one gets its whole link again, and a
        // fabric above the sum squeezes nobody.
        buckets[0].idle(end);
        let later = end + Duration::from_secs(1);
        let before = buckets[1].fidelity(end).shortfall_bytes[Cause::Fabric.index()];
        let alone = run_flows(&mut buckets[1..], end, later)[0];
        assert!(
            (mbit(alone) * secs - 250.0).abs() < 1.0,
            "{} Mb/s",
            mbit(alone) * secs
        );
        assert_eq!(
            buckets[1].fidelity(later).shortfall_bytes[Cause::Fabric.index()],
            before
        );
        assert_eq!(fabric.squeeze(Direction::ToDestination), None);
    }

    /// A tiny deterministic generator for the simulation below.
    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    /// Four flows share a 1g bucket; wake-ups are late by up to 100 us, and every ~50 ms
    /// the whole process stalls for 2 - 8 ms. Returns (release instant, bytes) in order.
    fn simulate(check_releases: bool, seed: u64) -> (Vec<(Instant, u64)>, Instant) {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("1g", "1ms", "none"), t0);
        let mut rng = seed;
        let mut stalls = Vec::new();
        let mut t = t0;
        for _ in 0..40 {
            t += Duration::from_micros(30_000 + lcg(&mut rng) % 40_000);
            let len = Duration::from_micros(2_000 + lcg(&mut rng) % 6_000);
            stalls.push((t, t + len));
            t += len;
        }
        let end = t;
        let wake = |at: Instant, rng: &mut u64| {
            let w = at + Duration::from_micros(lcg(rng) % 100);
            stalls
                .iter()
                .find(|(s, e)| w >= *s && w < *e)
                .map_or(w, |(_, e)| *e + Duration::from_micros(lcg(rng) % 50))
        };
        // Per flow: (next event instant, chunk size or 0 when about to read, whether the
        // release was already checked).
        let mut flows: Vec<(Instant, u64, bool)> = vec![(t0, 0, false); 4];
        let mut out = Vec::new();
        loop {
            let (i, &(now, n, checked)) =
                flows.iter().enumerate().min_by_key(|(_, f)| f.0).unwrap();
            if now >= end {
                return (out, end);
            }
            if n == 0 {
                let n = 60_000 + lcg(&mut rng) % 65_000;
                let at = b.reserve(n, now);
                flows[i] = (wake(at.max(now), &mut rng), n, false);
                continue;
            }
            if check_releases && !checked {
                let go = b.release(n, now, None);
                if go > now + Duration::from_micros(20) {
                    flows[i] = (wake(go, &mut rng), n, true);
                    continue;
                }
            }
            out.push((now, n));
            flows[i] = (now, 0, false);
        }
    }

    /// The largest excess of released bytes over `rate * span` in any span of releases,
    /// in bytes.
    fn worst_excess(out: &[(Instant, u64)], bytes_per_sec: f64) -> f64 {
        let mut worst = 0f64;
        for i in 0..out.len() {
            let mut sum = 0u64;
            for j in i..out.len() {
                sum += out[j].1;
                let span = (out[j].0 - out[i].0).as_secs_f64();
                worst = worst.max(sum as f64 - span * bytes_per_sec);
                if span > 0.2 {
                    break;
                }
            }
        }
        worst
    }

    #[test]
    fn output_stays_within_rate_and_burst_when_the_releaser_stalls() {
        for seed in 1..=12 {
            let (checked, end) = simulate(true, seed);
            let (unchecked, _) = simulate(false, seed);
            // Checked: beyond the rate, at most the burst (125 kB), one chunk (released
            // at the end of its serialisation), 20 us released early (not slept), and one
            // more chunk for a holder that was held back and then stalled again (measured:
            // 240 - 335 kB over these seeds).
            let excess = worst_excess(&checked, 125e6);
            assert!(excess <= 3.0 * 125_000.0 + 2_500.0, "seed {seed}: {excess}");
            // Unchecked (bookings alone), the chunks booked during a stall leave together
            // with it (measured: 540 - 600 kB): the test would catch that.
            let loose = worst_excess(&unchecked, 125e6);
            assert!(loose > 500_000.0, "seed {seed}: {loose}");
            // And stalls cost only their own time: the long-run rate stays near the line
            // rate minus the stalled time (about 10 % here), never above it.
            let total: u64 = checked.iter().map(|r| r.1).sum();
            let secs = (end - checked[0].0).as_secs_f64();
            let rate = total as f64 / secs / 125e6;
            assert!(rate <= 1.0 && rate > 0.8, "seed {seed}: {rate}");
        }
    }

    #[test]
    fn on_time_releases_are_never_held_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("10g", "1ms", "none"), t0);
        let mut rng = 7;
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(2) {
            let n = 1 + lcg(&mut rng) % 262_144;
            let at = b.reserve(n, now);
            // A caller that had to wait wakes up to 500 us late (within the 1 ms burst).
            if at > now {
                now = at + Duration::from_micros(lcg(&mut rng) % 500);
            }
            assert!(b.release(n, now, None) <= now);
            sent += n;
        }
        let rate = sent as f64 / (now - t0).as_secs_f64() / 1.25e9;
        assert!((rate - 1.0).abs() < 0.001, "{rate}");
    }

    /// A simulated connection direction driving a bucket on fake time, as the pump does:
    /// read a chunk sized by [`TokenBucket::chunk_fraction`], book it, sleep until due
    /// (waking `late()` after it), release, write (taking `write(n)`), read again.
    struct Sim {
        b: TokenBucket,
        t0: Instant,
        burst: u64,
        flows: usize,
        /// Bytes a flow sends before its sender pauses for `pause` (0: never pauses).
        burst_len: u64,
        pause: Duration,
    }

    #[derive(Clone, Copy)]
    enum St {
        Read,
        Release(u64, Option<Instant>),
        Written,
    }

    impl Sim {
        fn new(rate: &str, flows: usize) -> Sim {
            let t0 = Instant::now();
            let sh = shape(rate, "1ms", "none");
            Sim {
                b: TokenBucket::new(sh, t0),
                t0,
                burst: sh.burst_payload_bytes().unwrap(),
                flows,
                burst_len: 0,
                pause: Duration::ZERO,
            }
        }

        /// Runs for `secs` of fake time; returns the releases (instant, bytes).
        fn run(
            &mut self,
            secs: f64,
            mut late: impl FnMut() -> Duration,
            write: impl Fn(u64) -> Duration,
        ) -> Vec<(Instant, u64)> {
            let end = self.t0 + Duration::from_secs_f64(secs);
            let mut flows = vec![(self.t0, St::Read, false, 0u64); self.flows];
            let mut out = Vec::new();
            let min_sleep = Duration::from_micros(20);
            loop {
                let i = (0..flows.len()).min_by_key(|&i| flows[i].0).unwrap();
                let (now, st, busy, sent) = flows[i];
                if now >= end {
                    return out;
                }
                flows[i] = match st {
                    St::Read => {
                        let n = ((self.burst as f64 * self.b.chunk_fraction()) as u64).max(1);
                        if !busy {
                            self.b.busy(now);
                        }
                        let at = self.b.reserve(n, now);
                        if at > now + min_sleep {
                            (at + late(), St::Release(n, Some(at)), true, sent)
                        } else {
                            (now, St::Release(n, None), true, sent)
                        }
                    }
                    St::Release(n, due) => {
                        let go = self.b.release(n, now, due);
                        let t = if go > now + min_sleep {
                            go + late()
                        } else {
                            now
                        };
                        out.push((t, n));
                        (t + write(n), St::Written, busy, sent + n)
                    }
                    St::Written => {
                        self.b.written(now);
                        if self.burst_len > 0 && sent >= self.burst_len {
                            self.b.idle(now);
                            (now + self.pause, St::Read, false, 0)
                        } else {
                            (now, St::Read, busy, sent)
                        }
                    }
                };
            }
        }

        /// Payload bytes per second of the simulated link (framing none).
        fn bytes_per_sec(&self) -> f64 {
            match self.b.shape().rate {
                LinkRate::BitsPerSecond(b) => b.get() as f64 / 8.0,
                LinkRate::Unlimited => f64::INFINITY,
            }
        }
    }

    /// The largest 100 ms window of `out`, in bytes.
    fn max_window(out: &[(Instant, u64)]) -> u64 {
        let span = Duration::from_millis(100);
        let (mut j, mut sum, mut worst) = (0, 0u64, 0u64);
        for i in 0..out.len() {
            sum += out[i].1;
            while out[i].0 - out[j].0 >= span {
                sum -= out[j].1;
                j += 1;
            }
            worst = worst.max(sum);
        }
        worst
    }

    #[test]
    fn wakeups_late_by_up_to_90_percent_of_the_burst_cost_nothing() {
        for (rate, flows) in [("1g", 1), ("1g", 4), ("10g", 1), ("10g", 4)] {
            let mut sim = Sim::new(rate, flows);
            let tau_ns = 1_000_000u64;
            let mut rng = 11;
            let out = sim.run(
                10.0,
                || Duration::from_nanos(lcg(&mut rng) % (tau_ns * 9 / 10)),
                |_| Duration::ZERO,
            );
            let secs = (out.last().unwrap().0 - sim.t0).as_secs_f64();
            let sent: u64 = out.iter().map(|r| r.1).sum();
            let mean = sent as f64 / secs / sim.bytes_per_sec();
            assert!((mean - 1.0).abs() < 0.001, "{rate} x{flows}: mean {mean}");
            // Every 100 ms window within the rate plus the burst.
            let bound = sim.bytes_per_sec() * 0.1 + sim.burst as f64;
            let worst = max_window(&out) as f64;
            assert!(worst <= bound, "{rate} x{flows}: window {worst} > {bound}");
            // The ledger agrees: nothing lost, the link carried what was released.
            let f = sim.b.fidelity(out.last().unwrap().0);
            assert!(f.ratio().unwrap() > 0.999, "{rate} x{flows}: {f:?}");
            assert_eq!(f.carried_bytes, sent);
            // The chunks shrank to absorb the lateness.
            let frac = sim.b.chunk_fraction();
            assert!(frac < 0.2, "{rate} x{flows}: chunk fraction {frac}");
        }
    }

    #[test]
    fn on_time_wakeups_keep_chunks_at_half_the_burst() {
        let mut sim = Sim::new("1g", 1);
        let out = sim.run(2.0, || Duration::from_micros(5), |_| Duration::ZERO);
        let frac = sim.b.chunk_fraction();
        assert!(frac > 0.49, "{frac}");
        let f = sim.b.fidelity(out.last().unwrap().0);
        assert_eq!(f.shortfall_total(), 0, "{f:?}");
    }

    #[test]
    fn rare_stalls_beyond_the_burst_do_not_shrink_every_chunk() {
        let mut sim = Sim::new("1g", 1);
        let mut rng = 3;
        // Wake-ups 0 - 100 us late, and one in 300 stalls 3 ms: lost whatever the chunk.
        let out = sim.run(
            3.0,
            || {
                if lcg(&mut rng) % 300 == 0 {
                    Duration::from_millis(3)
                } else {
                    Duration::from_micros(lcg(&mut rng) % 100)
                }
            },
            |_| Duration::ZERO,
        );
        assert!(sim.b.chunk_fraction() > 0.49, "{}", sim.b.chunk_fraction());
        let f = sim.b.fidelity(out.last().unwrap().0);
        assert!(f.shortfall_bytes[Cause::Late.index()] > 0, "{f:?}");
    }

    /// One 1g flow for 5 s of fake time, every wake-up 1 - 3 ms late (far beyond a 1 ms
    /// burst), with this lead: the mean over the rate, the ledger, and the run's length.
    fn late_by_1_to_3_ms(lead: Duration) -> (f64, Fidelity, f64) {
        let mut sim = Sim::new("1g", 1);
        sim.b.set_lead(lead);
        let mut rng = 5;
        let out = sim.run(
            5.0,
            || Duration::from_micros(1000 + lcg(&mut rng) % 2000),
            |_| Duration::ZERO,
        );
        let end = out.last().unwrap().0;
        let secs = (end - sim.t0).as_secs_f64();
        let sent: u64 = out.iter().map(|r| r.1).sum();
        let mean = sent as f64 / secs / sim.bytes_per_sec();
        (mean, sim.b.fidelity(end), secs)
    }

    #[test]
    fn lateness_beyond_the_burst_is_lost_and_booked_late() {
        let (mean, f, secs) = late_by_1_to_3_ms(Duration::ZERO);
        let ratio = f.ratio().unwrap();
        assert!(mean < 0.8, "{mean}");
        assert!(
            (ratio - mean).abs() < 0.01,
            "ledger {ratio} vs measured {mean}"
        );
        assert!(f.shortfall_bytes[Cause::Late.index()] > 0);
        assert_eq!(f.shortfall_bytes[Cause::Destination.index()], 0);
        // Backlogged the whole time: line time plus lost time is the run.
        assert!(
            (f.backlogged().as_secs_f64() / secs - 1.0).abs() < 0.01,
            "{f:?}"
        );
    }

    #[test]
    fn with_the_kernel_paced_lead_lateness_beyond_the_burst_costs_nothing() {
        // The same late wake-ups that lose a quarter of the rate without the lead.
        let (mean, f, _) = late_by_1_to_3_ms(Duration::from_millis(4));
        assert!((mean - 1.0).abs() < 0.001, "{mean}");
        assert_eq!(f.shortfall_total(), 0, "{f:?}");
    }

    #[test]
    fn the_lead_is_credit_for_one_backlogged_flow_only() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(shape("1g", "1ms", "none"), t0);
        assert_eq!(b.pace_rate(), None, "no lead: the kernel does not pace");
        b.set_lead(Duration::from_millis(4));
        // The link's payload rate plus the margin, for every socket.
        assert_eq!(b.pace_rate(), Some(125_250_000));
        // A minute idle, then a flow holds data: only the burst (125 kB) leaves at once.
        let t = t0 + Duration::from_secs(60);
        b.busy(t);
        b.bulk_booking(1, t);
        assert_eq!(b.reserve(125_000, t), t);
        assert_eq!(b.reserve(125_000, t), t + Duration::from_millis(1));
        // Backlogged, its holder wakes 5 ms late: burst plus lead (625 kB) leave at once.
        let t = t + Duration::from_millis(6);
        b.bulk_booking(1, t);
        assert_eq!(b.reserve(625_000, t), t);
        // A second bulk flow: the burst alone again (the 625 kB end 4 ms after now).
        let t = t + Duration::from_millis(5);
        b.bulk_booking(2, t);
        assert_eq!(b.reserve(625_000, t), t + Duration::from_millis(4));
        // It ended: the lead is back.
        b.forget(2);
        let t = t + Duration::from_millis(9);
        assert_eq!(b.reserve(625_000, t), t);
        // Unlimited links are never paced.
        b.set_shape(Shape::UNLIMITED, t);
        assert_eq!(b.pace_rate(), None);
    }

    #[test]
    fn a_slow_write_is_the_destinations_if_the_sender_resumes_at_once_else_idle() {
        for (gap_ms, destination) in [(1, true), (10, false)] {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(shape("100mbit", "1ms", "none"), t0);
            b.busy(t0);
            let at = b.reserve(12_500, t0);
            b.release(12_500, at, Some(at));
            // The write takes 11 ms; the sender's next read then finds nothing.
            let done = at + Duration::from_millis(11);
            b.written(done);
            b.idle(done);
            let again = done + Duration::from_millis(gap_ms);
            b.busy(again);
            let f = b.fidelity(again);
            let lost = f.lost[Cause::Destination.index()];
            if destination {
                // 11 ms of write, less the 1 ms burst of credit, and the gap.
                assert_eq!(lost, Duration::from_millis(10 + gap_ms), "{f:?}");
                assert_eq!(f.idle, Duration::ZERO, "{f:?}");
            } else {
                assert_eq!(lost, Duration::ZERO, "{f:?}");
                assert_eq!(f.idle, Duration::from_millis(10 + gap_ms), "{f:?}");
            }
        }
    }

    #[test]
    fn a_receiver_slower_than_the_link_is_booked_to_the_destination() {
        let mut sim = Sim::new("100mbit", 1);
        let per_byte = 1.0 / sim.bytes_per_sec();
        // Each write takes as long as the chunk at 80 % of the rate.
        let out = sim.run(
            5.0,
            || Duration::from_micros(10),
            |n| Duration::from_secs_f64(n as f64 * per_byte / 0.8),
        );
        let f = sim.b.fidelity(out.last().unwrap().0);
        let ratio = f.ratio().unwrap();
        assert!((ratio - 0.8).abs() < 0.05, "{ratio} {f:?}");
        let dest = f.shortfall_bytes[Cause::Destination.index()];
        assert!(dest > 10 * f.shortfall_bytes[Cause::Late.index()], "{f:?}");
    }

    #[test]
    fn idle_time_is_never_shortfall() {
        let mut sim = Sim::new("1g", 2);
        // Each sender sends 300 kB, then has nothing for 20 ms.
        sim.burst_len = 300_000;
        sim.pause = Duration::from_millis(20);
        let out = sim.run(3.0, || Duration::from_micros(50), |_| Duration::ZERO);
        let f = sim.b.fidelity(out.last().unwrap().0);
        assert!(f.ratio().unwrap() >= 0.99, "{f:?}");
        assert!(f.idle > Duration::from_millis(500), "{f:?}");
        assert_eq!(f.shortfall_total(), 0, "{f:?}");
    }

    #[test]
    fn fidelity_differences_cover_the_time_between() {
        let a = Fidelity {
            carried_bytes: 10,
            line: Duration::from_millis(3),
            lost: [Duration::from_millis(1), Duration::ZERO, Duration::ZERO],
            shortfall_bytes: [4, 0, 0],
            idle: Duration::from_millis(7),
        };
        let mut b = a;
        b.add(&a);
        assert_eq!(b.since(&a), a);
        assert_eq!(a.backlogged(), Duration::from_millis(4));
        assert_eq!(a.ratio(), Some(10.0 / 14.0));
        assert_eq!(Fidelity::default().ratio(), None);
    }

    #[test]
    fn burst_in_payload_bytes() {
        assert_eq!(
            shape("1g", "4ms", "none").burst_payload_bytes(),
            Some(500_000)
        );
        assert_eq!(
            shape("1g", "64KB", "none").burst_payload_bytes(),
            Some(64_000)
        );
        let e = shape("1g", "4ms", "ethernet:1500")
            .burst_payload_bytes()
            .unwrap();
        assert_eq!(e, 500_000 * 1448 / 1538);
    }
}
