//! A sub-millisecond timer for the link's waits.
//!
//! tokio's timer rounds every deadline up to the next millisecond tick. A link that
//! releases a 1 ms chunk of line rate therefore oversleeps by up to a millisecond per
//! chunk, and has to catch up with a burst afterwards: that is what forced a 4 ms burst and
//! showed up as peaks in 100 ms windows. This timer is one thread with a deadline heap
//! that sleeps on a condition variable (a futex with a nanosecond timeout, so the kernel's
//! hrtimer precision, tens of microseconds) and wakes the waiting tasks.
//!
//! Cancel-safe: a dropped [`Sleep`] leaves a stale entry that only causes one spurious wake.

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
}
