//! A sub-millisecond timer for the link's waits.
//!
//! tokio's timer rounds every deadline up to the next millisecond tick. A link that
//! releases a 1 ms chunk of line rate therefore oversleeps by up to a millisecond per
//! chunk, and has to catch up with a burst afterwards: that is what forced a 4 ms burst and
//! showed up as peaks in 100 ms windows.
//!
//! Each flow waits on its own [`Timer`]: a `timerfd` in the runtime's epoll, armed at the
//! deadline with the kernel's hrtimer precision. The worker blocked in `epoll_wait` is woken
//! by the expiry itself. Cross-thread wake-ups, not bytes, are what shaping costs: with a
//! shared timer thread (a deadline heap on a condition variable, kept here as the fallback
//! when a flow cannot get a timerfd) every chunk cost the timer thread's own sleep and wake
//! plus a futex or eventfd hop to hand the task back to a worker, about 5 context switches
//! per chunk; the flow's own timer takes that to about 1.5, and halved migshaper's CPU at
//! 1 Gb/s on VM-C (`docs/benchmarks.md`).
//!
//! Cancel-safe: a dropped [`Sleep`] leaves a stale entry that only causes one spurious wake;
//! a dropped [`Timer::sleep_until`] leaves the timer armed, re-armed on the next wait.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, LazyLock, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

struct Entry {
    at: Instant,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.at.cmp(&o.at)
    }
}

struct Pacer {
    heap: Mutex<BinaryHeap<Reverse<Entry>>>,
    changed: Condvar,
}

static PACER: LazyLock<&'static Pacer> = LazyLock::new(|| {
    let p: &'static Pacer = Box::leak(Box::new(Pacer {
        heap: Mutex::new(BinaryHeap::new()),
        changed: Condvar::new(),
    }));
    std::thread::Builder::new()
        .name("migshaper-pacer".into())
        .spawn(move || p.run())
        .expect("spawning the pacer thread (out of threads?)");
    p
});

impl Pacer {
    fn run(&self) {
        let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            while heap.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = heap.pop() {
                    e.waker.wake();
                }
            }
            heap = match heap.peek() {
                Some(Reverse(e)) => {
                    let d = e.at.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(heap, d)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(heap).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    fn register(&self, at: Instant, waker: &Waker) {
        let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = heap.peek().is_none_or(|Reverse(e)| at < e.at);
        heap.push(Reverse(Entry {
            at,
            waker: waker.clone(),
        }));
        drop(heap);
        if earliest {
            self.changed.notify_one();
        }
    }
}

/// Sleeps until `at` with sub-millisecond precision.
pub fn sleep_until(at: Instant) -> Sleep {
    Sleep {
        at,
        registered: false,
    }
}

/// Future returned by [`sleep_until`].
#[derive(Debug)]
pub struct Sleep {
    at: Instant,
    registered: bool,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        // Register once: the pacer wakes the task at `at`; a spurious earlier poll (e.g.
        // from a select!) finds the deadline not reached and keeps that registration.
        if !self.registered {
            PACER.register(self.at, cx.waker());
            self.registered = true;
        }
        Poll::Pending
    }
}

/// A timer of one flow, registered with the runtime's I/O driver: a `timerfd` armed at the
/// deadline (absolute `CLOCK_MONOTONIC`, so the kernel's hrtimer precision, no rounding to
/// the millisecond as tokio's own timer does). The worker that sleeps in `epoll_wait` is
/// woken by the expiry itself: no pacer thread to wake, no futex or eventfd hop to hand the
/// task back to the runtime. One per flow, made on its first wait; falls back to the
/// shared pacer thread when the runtime has no I/O driver or the timer cannot be made.
#[derive(Default)]
pub struct Timer {
    fd: Option<Result<tokio::io::unix::AsyncFd<TimerFdRaw>, ()>>,
}

/// `TimerFd` with the `AsRawFd` that `AsyncFd` wants.
struct TimerFdRaw(nix::sys::timerfd::TimerFd);

impl std::os::fd::AsRawFd for TimerFdRaw {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("armed", &matches!(self.fd, Some(Ok(_))))
            .finish()
    }
}

impl Timer {
    /// Sleeps until `at` with sub-millisecond precision.
    pub async fn sleep_until(&mut self, at: Instant) {
        if self.fd.is_none() {
            self.fd = Some(make_timer().map_err(|e| {
                tracing::debug!(error = %e, "no timerfd for the link's waits; using the pacer thread");
            }));
        }
        let Some(Ok(fd)) = &self.fd else {
            return sleep_until(at).await;
        };
        loop {
            if Instant::now() >= at {
                return;
            }
            // (Re-)armed on every turn: an expiry a hair before `at` by `Instant`'s reading
            // must not leave the flow waiting on a timer that already fired.
            if arm(fd.get_ref(), at).is_err() {
                return sleep_until(at).await;
            }
            let Ok(mut guard) = fd.readable().await else {
                return sleep_until(at).await;
            };
            // Clear tokio's readiness (else the next wait would poll once for nothing). The
            // expiry need not be read: re-arming resets the timer's count, and the epoll
            // registration is edge-triggered, so the next expiry wakes the worker again.
            guard.clear_ready();
        }
    }
}

fn make_timer() -> std::io::Result<tokio::io::unix::AsyncFd<TimerFdRaw>> {
    use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
    let t = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )?;
    // The safe constructor (deprecated in favour of an `unsafe` one for fds the wrapper
    // does not own; this one owns its fd).
    #[allow(deprecated)]
    tokio::io::unix::AsyncFd::with_interest(TimerFdRaw(t), tokio::io::Interest::READABLE)
}

/// Arms `t` to expire at `at` (std's `Instant` is `CLOCK_MONOTONIC` on Linux; the offset is
/// taken from two adjacent clock reads).
fn arm(t: &TimerFdRaw, at: Instant) -> nix::Result<()> {
    use nix::sys::time::{TimeSpec, TimeValLike};
    use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
    // `Instant` read first: the expiry can only fall after `at`, never before.
    let left = at.saturating_duration_since(Instant::now());
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let due = mono + TimeSpec::nanoseconds(i64::try_from(left.as_nanos()).unwrap_or(i64::MAX));
    t.0.set(
        Expiration::OneShot(due),
        TimerSetTimeFlags::TFD_TIMER_ABSTIME,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_at_the_deadline_not_before() {
        for us in [50u64, 300, 1500] {
            let at = Instant::now() + Duration::from_micros(us);
            sleep_until(at).await;
            assert!(Instant::now() >= at);
        }
        // Many concurrent sleepers, in any order, all wake.
        let t0 = Instant::now();
        let sleeps: Vec<_> = (0..50u64)
            .rev()
            .map(|i| tokio::spawn(sleep_until(t0 + Duration::from_micros(100 * i))))
            .collect();
        for s in sleeps {
            s.await.unwrap();
        }
        assert!(t0.elapsed() >= Duration::from_micros(4900));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flow_timer_wakes_at_every_deadline_not_before() {
        let mut timer = Timer::default();
        // Back-to-back short waits, as a busy link makes them: none early, none lost.
        for i in 0..2000u64 {
            let at = Instant::now() + Duration::from_micros(20 + (i * 37) % 300);
            tokio::time::timeout(Duration::from_secs(5), timer.sleep_until(at))
                .await
                .expect("a wait never woke");
            assert!(Instant::now() >= at);
        }
        // A deadline already passed returns at once; a wait dropped half-way leaves the
        // timer usable.
        timer.sleep_until(Instant::now()).await;
        let _ = tokio::time::timeout(
            Duration::from_micros(100),
            timer.sleep_until(Instant::now() + Duration::from_millis(50)),
        )
        .await;
        let at = Instant::now() + Duration::from_micros(200);
        timer.sleep_until(at).await;
        assert!(Instant::now() >= at);
    }
}
