//! The emulated link: one [`TokenBucket`] per direction (a real link is full duplex),
//! shared by every connection of a route, plus a one-way propagation delay.
//!
//! [`Link`] is a cheap-to-clone handle. The buckets sit behind `std::sync::Mutex`: the
//! critical section is a few integer operations with no `.await` inside, so an async mutex
//! would only add cost. Waiting happens outside the lock, with tokio's timer.

pub mod bucket;
pub mod fabric;
pub mod pacer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::time::Instant;

pub use bucket::{Cause, Fidelity, Shape, TokenBucket};

/// Which way bytes travel through a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Source QEMU → destination QEMU: the migration stream.
    ToDestination,
    /// Destination → source: the return path (post-copy page requests travel here).
    ToSource,
}

impl Direction {
    /// Both directions, in index order.
    pub const ALL: [Direction; 2] = [Direction::ToDestination, Direction::ToSource];

    /// The label used in logs, metrics (`direction`) and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToDestination => "to_destination",
            Direction::ToSource => "to_source",
        }
    }

    /// The direction's place in [`Direction::ALL`], for per-direction arrays.
    pub fn index(self) -> usize {
        match self {
            Direction::ToDestination => 0,
            Direction::ToSource => 1,
        }
    }

    /// The endpoints bytes of this direction leave and reach: (`sending`, `receiving`),
    /// each `source` or `destination`.
    pub fn sides(self) -> (&'static str, &'static str) {
        match self {
            Direction::ToDestination => ("source", "destination"),
            Direction::ToSource => ("destination", "source"),
        }
    }
}

/// Waits shorter than this are not slept: a thread wake-up costs about as much. Releasing
/// that little early is far inside the burst tolerance and does not move the schedule.
const MIN_SLEEP: Duration = Duration::from_micros(20);

/// A shared, live-reconfigurable link. Clone it into every connection of a route.
#[derive(Debug, Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    buckets: [Mutex<TokenBucket>; 2],
    delay_ns: AtomicU64,
    /// Bumped by every [`Link::set`], so connections notice a change cheaply.
    generation: AtomicU64,
    /// Flow ids handed out so far.
    flows: AtomicU64,
}

impl Link {
    /// A link with this shape and one-way delay, both buckets starting empty, shaped in
    /// user space alone (see [`Link::pace_in_kernel`]).
    pub fn new(shape: Shape, delay: Duration) -> Self {
        let now = Instant::now();
        Link {
            inner: Arc::new(Inner {
                buckets: [
                    Mutex::new(TokenBucket::new(shape, now)),
                    Mutex::new(TokenBucket::new(shape, now)),
                ],
                delay_ns: AtomicU64::new(duration_ns(delay)),
                generation: AtomicU64::new(0),
                flows: AtomicU64::new(0),
            }),
        }
    }

    /// Puts both directions of this link on `fabric`: while backlogged, each counts in the
    /// fabric's demand of its direction and, while that exceeds the fabric, runs at its
    /// share (see [`fabric`]).
    pub fn on_fabric(&self, fabric: &fabric::Fabric) {
        for dir in Direction::ALL {
            self.bucket(dir).on_fabric(fabric.clone(), dir);
        }
    }

    fn bucket(&self, dir: Direction) -> MutexGuard<'_, TokenBucket> {
        // A poisoned bucket only means another task panicked mid-arithmetic on plain
        // integers; the state is still a valid bucket, so keep shaping.
        self.inner.buckets[dir.index()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The shape in force (both directions always share it).
    pub fn shape(&self) -> Shape {
        self.bucket(Direction::ToDestination).shape()
    }

    /// The one-way propagation delay in force.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.inner.delay_ns.load(Ordering::Relaxed))
    }

    /// Applies a new shape and delay to both directions at once. Every connection picks it
    /// up with its next chunk; both buckets start empty (no burst at the switch).
    pub fn set(&self, shape: Shape, delay: Duration) {
        let now = Instant::now();
        for dir in Direction::ALL {
            self.bucket(dir).set_shape(shape, now);
        }
        self.inner
            .delay_ns
            .store(duration_ns(delay), Ordering::Relaxed);
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// Lets the kernel pace this link's connections: each flow's receiving socket is paced
    /// at [`Flow::pace_update`]'s rate and releases may run up to [`PACED_LEAD`] beyond
    /// the burst ahead of the wire (see [`TokenBucket::set_lead`]).
    pub fn pace_in_kernel(&self) {
        for dir in Direction::ALL {
            self.bucket(dir).set_lead(PACED_LEAD);
        }
    }

    /// Stops counting on kernel pacing (the kernel refused it): releases may not run ahead
    /// of the wire beyond the burst, and flows lift the pacing of their sockets.
    pub fn unpace(&self) {
        for dir in Direction::ALL {
            self.bucket(dir).set_lead(Duration::ZERO);
        }
    }

    /// Whether the kernel paces this link's connections (see [`Link::unpace`]).
    pub fn paced(&self) -> bool {
        !self.bucket(Direction::ToDestination).lead().is_zero()
    }

    /// Changes with every [`Link::set`].
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The largest chunk a reader of direction `dir` should take at once: at most `max`,
    /// a share of the credit (the burst, plus the lead while the kernel paces) that follows
    /// the host's lateness (half of it while wake-ups are on time, down to a tenth:
    /// [`TokenBucket::chunk_fraction`]), and, without kernel pacing, 1 ms of line rate (so
    /// a 100 ms window of a shaped link is never off by more than 1 % from chunking alone;
    /// on links slower than 12 Mb/s, 1500 bytes unless that is more than half the burst).
    /// A chunk plus its holder's lateness must fit in the credit: a release is checked
    /// against the wire's real output ([`TokenBucket::release`]), and credit beyond it is
    /// lost. With kernel pacing the kernel spreads each chunk at the rate, so larger chunks
    /// cost fewer wake-ups and no smoothness.
    pub fn chunk_limit(&self, dir: Direction, max: usize) -> usize {
        let (shape, fraction, squeeze, lead) = {
            let b = self.bucket(dir);
            (b.shape(), b.chunk_fraction(), b.squeeze(), b.lead())
        };
        let (Some(mut burst), Some(bits)) = (
            shape.burst_payload_bytes(),
            shape.framing.payload_rate(shape.rate),
        ) else {
            return max;
        };
        let mut per_ms = (bits / 8.0 / 1000.0) as u64;
        if !lead.is_zero() {
            burst += (lead.as_secs_f64() * bits / 8.0) as u64;
            per_ms = u64::MAX;
        }
        if let Some(s) = squeeze {
            // A chunk's line time stretches by 1 + over on a shared fabric and the credit is
            // the fabric's burst: the chunk shrinks so that it still fits in that credit.
            let stretch = 1.0 + s.over;
            let fabric_burst = (s.burst.as_secs_f64() * bits / 8.0) as u64;
            burst = ((burst.min(fabric_burst) as f64 / stretch) as u64).max(1);
            per_ms = ((per_ms as f64 / stretch) as u64).max(1);
        }
        let share = ((burst as f64 * fraction) as u64).max(MIN_CHUNK_LIMIT.min(burst / 2));
        let limit = share.max(1).min(per_ms.max(MIN_CHUNK_LIMIT));
        usize::try_from(limit).unwrap_or(usize::MAX).clamp(1, max)
    }

    /// What direction `dir` carried and lost so far (see [`Fidelity`]).
    pub fn fidelity(&self, dir: Direction) -> Fidelity {
        self.bucket(dir).fidelity(Instant::now())
    }

    /// A new connection direction's handle on this link.
    pub fn flow(&self, dir: Direction) -> Flow {
        Flow {
            link: self.clone(),
            dir,
            last_release: None,
            busy: false,
            id: self.inner.flows.fetch_add(1, Ordering::Relaxed),
            writing: false,
            pace_want: None,
            pace_set: None,
            timer: pacer::Timer::default(),
        }
    }
}

/// One connection direction's handle on its link: its place in the fair queue and its
/// state in the link's fidelity ledger (holding data or not, writing or not). Dropping it
/// (the connection ended) leaves the ledger.
#[derive(Debug)]
pub struct Flow {
    link: Link,
    dir: Direction,
    last_release: Option<Instant>,
    /// Holds data read for the link.
    busy: bool,
    /// Its key in the bucket's kernel pacing share.
    id: u64,
    /// Its released data is being written.
    writing: bool,
    /// The kernel pacing rate its receiving socket should have (`None`: unpaced).
    pace_want: Option<u64>,
    /// The rate last applied to it.
    pace_set: Option<u64>,
    /// The flow's own timer for its waits.
    timer: pacer::Timer,
}

impl Flow {
    /// Books the wire for `n` payload bytes at `now` and returns when they may leave; the
    /// flow counts as holding data from now on.
    ///
    /// A sparse flow (a small chunk after at least [`SPARSE_GAP`] of silence, such as a
    /// post-copy page request or a preempt-channel page) is served ahead of bulk bookings,
    /// like fair queueing on a real link; everything else is first come, first served.
    pub fn book(&mut self, n: usize, now: Instant) -> Instant {
        self.book_sparse(n, now).0
    }

    /// [`Flow::book`], also telling whether the chunk was served as a sparse flow's.
    fn book_sparse(&mut self, n: usize, now: Instant) -> (Instant, bool) {
        let sparse = n <= SPARSE_MAX
            && self
                .last_release
                .is_none_or(|t| now.saturating_duration_since(t) >= SPARSE_GAP);
        let at = {
            let mut bucket = self.link.bucket(self.dir);
            if !self.busy {
                bucket.busy(now);
                self.busy = true;
            }
            if sparse {
                bucket.reserve_sparse(n as u64, now)
            } else {
                bucket.bulk_booking(self.id, now);
                bucket.reserve(n as u64, now)
            }
        };
        self.last_release = Some(at);
        (at, sparse)
    }

    /// The largest chunk to read now (see [`Link::chunk_limit`]).
    pub fn chunk_limit(&self, max: usize) -> usize {
        self.link.chunk_limit(self.dir, max)
    }

    /// Books `n` bytes (see [`Flow::book`]) and waits until they may leave; returns how
    /// long it waited (the saturation signal). Then books the release on the wire's actual
    /// output ([`TokenBucket::release`]): if this task ran late, the bytes booked behind it
    /// wait again rather than leave in one burst with it. Cancel-safe: dropping the future
    /// forfeits the wait, not the charge. Call [`Flow::written`] once the bytes are handed
    /// to the receiving side.
    pub async fn acquire(&mut self, n: usize) -> Duration {
        let start = Instant::now();
        let (at, sparse) = self.book_sparse(n, start);
        let mut now = start;
        let mut due = None;
        if at.saturating_duration_since(now) >= MIN_SLEEP {
            self.timer.sleep_until(at).await;
            now = Instant::now();
            due = Some(at);
        }
        let go = {
            let mut bucket = self.link.bucket(self.dir);
            self.pace_want = bucket.pace_rate();
            bucket.release(n as u64, now, due)
        };
        self.writing = true;
        if sparse {
            // Charged on the real wire too, but a sparse message never waits behind bulk
            // chunks held back there (as it does not behind their bookings).
            return at.saturating_duration_since(start);
        }
        if go.saturating_duration_since(now) >= MIN_SLEEP {
            self.timer.sleep_until(go).await;
        }
        go.max(at).saturating_duration_since(start)
    }

    /// The bytes of the last [`Flow::acquire`] were handed to the receiving side.
    pub fn written(&mut self) {
        if std::mem::take(&mut self.writing) {
            self.link.bucket(self.dir).written(Instant::now());
        }
    }

    /// A read found nothing ready: the sender has nothing for the link now (idle time is
    /// never shortfall).
    pub fn idle(&mut self) {
        if std::mem::take(&mut self.busy) {
            self.link.bucket(self.dir).idle(Instant::now());
        }
    }

    /// The kernel pacing rate (payload bytes per second) to apply to this flow's receiving
    /// socket before writing the chunk of the last [`Flow::acquire`], if it changed since
    /// the last one applied: `Some(None)` lifts the pacing (the link became unlimited or
    /// unpaced). The caller applies it, or calls [`Flow::pace_failed`].
    pub fn pace_update(&mut self) -> Option<Option<u64>> {
        if self.pace_want == self.pace_set {
            return None;
        }
        self.pace_set = self.pace_want;
        Some(self.pace_want)
    }

    /// The kernel refused pacing: the link runs without it from now on (see
    /// [`Link::unpace`]).
    pub fn pace_failed(&mut self) {
        self.link.unpace();
        self.pace_want = None;
        self.pace_set = None;
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.written();
        self.idle();
        self.link.bucket(self.dir).forget(self.id);
    }
}

/// A change to a link: any subset of its settings (the rest stay as they are).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkUpdate {
    /// New line rate.
    pub rate: Option<crate::spec::LinkRate>,
    /// New burst.
    pub burst: Option<crate::spec::Burst>,
    /// New framing.
    pub framing: Option<crate::spec::Framing>,
    /// New one-way delay.
    pub delay: Option<Duration>,
}

impl LinkUpdate {
    /// `shape` and `delay` with this update applied.
    pub fn apply(&self, shape: Shape, delay: Duration) -> (Shape, Duration) {
        (
            Shape {
                rate: self.rate.unwrap_or(shape.rate),
                burst: self.burst.unwrap_or(shape.burst),
                framing: self.framing.unwrap_or(shape.framing),
            },
            self.delay.unwrap_or(delay),
        )
    }

    /// True if nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == LinkUpdate::default()
    }
}

/// How far beyond the burst releases may run ahead of the wire while the kernel paces the
/// receiving sockets: a holder waking up to the burst plus this late loses nothing, since
/// the kernel keeps sending what was released before. 4 ms covers the wake-ups measured
/// late on VM-C (2-core VM, two TCG QEMUs beside the proxy) but for rare stalls; each ms
/// of it can add up to 1 ms of queueing to the link's one-way latency after a stall.
pub const PACED_LEAD: Duration = Duration::from_millis(4);

/// Chunks never shrink below this, however slow the link.
const MIN_CHUNK_LIMIT: u64 = 1500;
/// Largest chunk that counts as a sparse flow's message.
pub const SPARSE_MAX: usize = 8 * 1024;
/// Silence after which a flow counts as sparse again.
pub const SPARSE_GAP: Duration = Duration::from_millis(1);

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rate: &str) -> Shape {
        Shape {
            rate: rate.parse().unwrap(),
            burst: "4ms".parse().unwrap(),
            framing: "none".parse().unwrap(),
        }
    }

    #[test]
    fn directions_have_separate_buckets_shared_by_all_flows() {
        let link = Link::new(shape("1g"), Duration::ZERO);
        let t0 = Instant::now();
        let (mut a, mut b) = (
            link.flow(Direction::ToDestination),
            link.flow(Direction::ToDestination),
        );
        // Two bulk flows share one bucket: 2 x 125 kB take 2 ms in total.
        a.book(125_000, t0);
        let second = b.book(125_000, t0);
        assert!(
            second - t0 >= Duration::from_micros(1900),
            "{:?}",
            second - t0
        );
        // The reverse direction is idle: a small message leaves at once.
        let rp = link.flow(Direction::ToSource).book(64, t0);
        assert!(rp - t0 < Duration::from_micros(1));
    }

    #[test]
    fn sparse_flows_skip_the_bulk_queue_busy_flows_do_not() {
        let link = Link::new(shape("1g"), Duration::ZERO);
        let t0 = Instant::now();
        let mut bulk = link.flow(Direction::ToDestination);
        for _ in 0..8 {
            bulk.book(125_000, t0);
        }
        // 8 ms of bulk is booked; a page request on another flow goes first.
        let mut pages = link.flow(Direction::ToDestination);
        let first = pages.book(4096, t0);
        assert!(first - t0 < Duration::from_micros(40), "{:?}", first - t0);
        // Right after, the same flow is not sparse any more: it queues like everyone.
        let again = pages.book(4096, t0);
        assert!(again - t0 > Duration::from_millis(8));
        // Large chunks are never sparse.
        let big = link.flow(Direction::ToDestination).book(65536, t0);
        assert!(big - t0 > Duration::from_millis(8));
    }

    #[test]
    fn set_applies_to_the_next_booking_with_an_empty_bucket() {
        let link = Link::new(shape("1g"), Duration::ZERO);
        let t0 = Instant::now();
        link.set(shape("10g"), Duration::from_millis(5));
        assert_eq!(link.delay(), Duration::from_millis(5));
        assert_eq!(link.shape(), shape("10g"));
        let at = link
            .flow(Direction::ToDestination)
            .book(125_000, Instant::now());
        // 100 us at 10 Gb/s (not 1 ms at 1 Gb/s), and no credit from before the switch.
        assert!(at - t0 >= Duration::from_micros(100) && at - t0 < Duration::from_millis(1));
        // 1 ms of 10 Gb/s is 1.25 MB; the burst (4 ms) is larger.
        assert_eq!(
            link.chunk_limit(Direction::ToDestination, 1 << 30),
            1_250_000
        );
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 20), 1 << 20);
        // With a 1 ms burst at 1 Gb/s, chunks are half the burst: 62.5 kB.
        link.set(
            Shape {
                burst: "1ms".parse().unwrap(),
                ..shape("1g")
            },
            Duration::ZERO,
        );
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 30), 62_500);
        // The 1500-byte floor (for slow links) never lifts a chunk above half the burst.
        link.set(
            Shape {
                burst: "2000".parse().unwrap(),
                ..shape("1g")
            },
            Duration::ZERO,
        );
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 30), 1000);
        // At 1 Mb/s (125 bytes a ms) with a 4 ms burst (500 bytes): half the burst...
        link.set(shape("1mbit"), Duration::ZERO);
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 30), 250);
        // ...and with a 64 kB burst the floor.
        link.set(
            Shape {
                burst: "64KB".parse().unwrap(),
                ..shape("1mbit")
            },
            Duration::ZERO,
        );
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 30), 1500);
    }

    #[test]
    fn kernel_pacing_widens_chunks_to_a_share_of_burst_plus_lead() {
        let link = Link::new(
            Shape {
                burst: "1ms".parse().unwrap(),
                ..shape("1g")
            },
            Duration::ZERO,
        );
        assert!(!link.paced());
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 30), 62_500);
        link.pace_in_kernel();
        assert!(link.paced());
        // Half of 1 ms + 4 ms at 1 Gb/s, beyond the 1 ms cap: the kernel spreads it.
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 30), 312_500);
        link.unpace();
        assert!(!link.paced());
        assert_eq!(link.chunk_limit(Direction::ToDestination, 1 << 30), 62_500);
    }

    #[tokio::test]
    async fn acquire_waits_until_the_booking() {
        let t0 = Instant::now();
        let link = Link::new(shape("1g"), Duration::ZERO);
        let mut flow = link.flow(Direction::ToDestination);
        for _ in 0..20 {
            flow.acquire(125_000).await;
            flow.written();
        }
        // 2.5 MB at 1 Gb/s: never less than 20 ms (the bucket starts empty), but for the
        // last wait, which is not slept when shorter than MIN_SLEEP.
        assert!(
            t0.elapsed() >= Duration::from_millis(20) - MIN_SLEEP,
            "{:?}",
            t0.elapsed()
        );
    }
}
