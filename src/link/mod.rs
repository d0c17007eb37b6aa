//! The emulated link: one [`TokenBucket`] per direction (a real link is full duplex),
//! shared by every connection of a route, plus a one-way propagation delay.
//!
//! [`Link`] is a cheap-to-clone handle. The buckets sit behind `std::sync::Mutex`: the
//! critical section is a few integer operations with no `.await` inside, so an async mutex
//! would only add cost. Waiting happens outside the lock, with tokio's timer.

pub mod bucket;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

pub use bucket::{Shape, TokenBucket};

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

    /// The label used in logs, metrics and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToDestination => "to_destination",
            Direction::ToSource => "to_source",
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::ToDestination => 0,
            Direction::ToSource => 1,
        }
    }
}

/// Waits shorter than this are not slept: tokio's timer has millisecond granularity, so
/// sleeping for a few microseconds would cost a whole millisecond. Releasing that little
/// early is far inside the burst tolerance and does not move the schedule.
const MIN_SLEEP: Duration = Duration::from_micros(50);

/// A shared, live-reconfigurable link. Clone it into every connection of a route.
#[derive(Debug, Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    buckets: [Mutex<TokenBucket>; 2],
    delay_ns: AtomicU64,
}

impl Link {
    /// A link with this shape and one-way delay, both buckets starting empty.
    pub fn new(shape: Shape, delay: Duration) -> Self {
        let now = Instant::now().into_std();
        Link {
            inner: Arc::new(Inner {
                buckets: [
                    Mutex::new(TokenBucket::new(shape, now)),
                    Mutex::new(TokenBucket::new(shape, now)),
                ],
                delay_ns: AtomicU64::new(duration_ns(delay)),
            }),
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
        let now = Instant::now().into_std();
        for dir in Direction::ALL {
            self.bucket(dir).set_shape(shape, now);
        }
        self.inner
            .delay_ns
            .store(duration_ns(delay), Ordering::Relaxed);
    }

    /// The largest chunk a reader should take at once in this direction: never more than
    /// the burst, so that no single release exceeds it.
    pub fn chunk_limit(&self, max: usize) -> usize {
        match self.shape().burst_payload_bytes() {
            Some(b) => usize::try_from(b).unwrap_or(usize::MAX).clamp(1, max),
            None => max,
        }
    }

    /// Waits until `n` payload bytes may leave in direction `dir`; returns how long it
    /// waited (the saturation signal). Cancel-safe: dropping the future forfeits the slot.
    pub async fn acquire(&self, dir: Direction, n: usize) -> Duration {
        let now = Instant::now();
        let at = self.bucket(dir).reserve(n as u64, now.into_std());
        let wait = at.saturating_duration_since(now.into_std());
        if wait >= MIN_SLEEP {
            tokio::time::sleep_until(Instant::from_std(at)).await;
        }
        wait
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn acquire_paces_on_tokio_time() {
        let shape = Shape {
            rate: "1g".parse().unwrap(),
            burst: "4ms".parse().unwrap(),
            framing: "none".parse().unwrap(),
        };
        let link = Link::new(shape, Duration::ZERO);
        let t0 = Instant::now();
        for _ in 0..1000 {
            link.acquire(Direction::ToDestination, 125_000).await;
        }
        // 125 MB at 1 Gb/s: one second of (paused, auto-advanced) time.
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(999) && took <= Duration::from_millis(1001),
            "{took:?}"
        );
        // The reverse direction has its own bucket and is idle: no wait.
        let w = link.acquire(Direction::ToSource, 64).await;
        assert!(w < MIN_SLEEP, "{w:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn set_applies_to_the_next_chunk() {
        let g1 = Shape {
            rate: "1g".parse().unwrap(),
            burst: "4ms".parse().unwrap(),
            framing: "none".parse().unwrap(),
        };
        let link = Link::new(g1, Duration::ZERO);
        link.set(
            Shape {
                rate: "10g".parse().unwrap(),
                ..g1
            },
            Duration::from_millis(5),
        );
        assert_eq!(link.delay(), Duration::from_millis(5));
        let t0 = Instant::now();
        for _ in 0..1000 {
            link.acquire(Direction::ToDestination, 125_000).await;
        }
        let took = t0.elapsed();
        assert!(took <= Duration::from_millis(101), "{took:?}");
        assert_eq!(link.chunk_limit(1 << 20), 1 << 20);
        assert_eq!(link.chunk_limit(1 << 30), 5_000_000);
    }
}
