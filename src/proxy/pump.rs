//! One direction of one proxied connection: read a chunk, wait for the link, write it.
//!
//! Each direction runs as its own task, so a saturated migration stream can never starve
//! the return path behind it (one task for both, as in tokio's `copy_bidirectional`, held
//! it back for seconds). Bytes are forwarded unchanged and in order; an EOF is passed on
//! as a half-close and the other direction keeps flowing; an error on either socket
//! cancels the whole connection.

use std::io;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::splice::Pipe;
use crate::link::{Direction, Flow, Link};

use crate::tap::Tap;

/// Largest read per chunk. Large reads keep syscall overhead low at 10 Gb/s; the link caps
/// chunks further at its burst.
pub const MAX_CHUNK: usize = 256 * 1024;
/// First buffer size: idle and return-path directions never need more.
const MIN_CHUNK: usize = 16 * 1024;
/// Bytes a direction may hold in its delay line (the emulated wire's content). At 10 Gb/s
/// this covers 25 ms of one-way delay at full rate; beyond that the delay line caps the
/// window like a TCP window would.
const DELAY_LINE_BYTES: usize = 32 * 1024 * 1024;

/// Memory the read buffers of one route may take in total: with many busy connections each
/// direction's buffer shrinks towards [`MIN_CHUNK`] (measured: 256 connections at 10 Gb/s
/// held 139 MB of RSS with 256 KiB per direction; 61.5 MB with a 32 MiB budget, 45 MB with
/// this one; up to 48 busy connections still get the full 256 KiB).
pub const ROUTE_BUFFER_BUDGET: usize = 24 * 1024 * 1024;

/// Shares [`ROUTE_BUFFER_BUDGET`] between a route's open connections.
#[derive(Debug, Clone)]
pub struct BufferBudget {
    slots: Arc<Semaphore>,
    max: usize,
}

impl BufferBudget {
    /// A budget for a route whose open connections hold permits of `slots` (out of `max`).
    pub fn new(slots: Arc<Semaphore>, max: usize) -> Self {
        BufferBudget { slots, max }
    }

    /// Largest buffer one direction may use now.
    pub fn per_direction(&self) -> usize {
        let open = self
            .max
            .saturating_sub(self.slots.available_permits())
            .max(1);
        (ROUTE_BUFFER_BUDGET / (2 * open)).clamp(MIN_CHUNK, MAX_CHUNK)
    }
}

/// What a pump shares with its route besides the link: where its waits are counted and the
/// route's buffer budget.
#[derive(Debug, Clone)]
pub struct RouteShare {
    /// Seconds spent waiting for the link (`migshaper_shaping_wait_seconds_total`).
    pub wait: metrics::Gauge,
    /// The route's read-buffer budget.
    pub budget: BufferBudget,
    /// Whether chunks nobody looks at may be spliced instead of copied.
    pub zero_copy: bool,
}

/// Why a direction stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading from the sending side failed (e.g. it was reset).
    #[error("read from {side} failed: {source}")]
    Read {
        /// `source` or `destination`.
        side: &'static str,
        /// The socket error.
        source: io::Error,
    },
    /// Writing to the receiving side failed (e.g. it was reset).
    #[error("write to {side} failed: {source}")]
    Write {
        /// `source` or `destination`.
        side: &'static str,
        /// The socket error.
        source: io::Error,
    },
    /// The connection was cancelled (the other direction failed, or the drain expired).
    #[error("cancelled")]
    Cancelled,
}

/// Forwards `src` → `dst` through `link` until EOF (then half-closes `dst`), an error, or
/// `cancel`. Waits are added to `share.wait` (seconds); buffers follow `share.budget`. Returns the
/// bytes forwarded, and the tap for its final accounting.
pub async fn pump<T: Tap>(
    src: Arc<TcpStream>,
    dst: Arc<TcpStream>,
    link: Link,
    dir: Direction,
    cancel: CancellationToken,
    share: RouteShare,
    mut tap: T,
) -> (Result<u64, PumpError>, T) {
    let r = forward(src, dst, link, dir, cancel, &share, &mut tap).await;
    (r, tap)
}

async fn forward<T: Tap>(
    src: Arc<TcpStream>,
    dst: Arc<TcpStream>,
    link: Link,
    dir: Direction,
    cancel: CancellationToken,
    share: &RouteShare,
    tap: &mut T,
) -> Result<u64, PumpError> {
    let RouteShare {
        wait,
        budget,
        zero_copy,
    } = share;
    let (from, to) = dir.sides();
    let mut generation = link.generation();
    if dir == Direction::ToDestination {
        // Sized again after reading the generation: a change between the listener's
        // sizing and here is not missed.
        super::limit_receive_buffer(&src, &link, false);
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    let mut delay_line: Option<DelayLine> = None;
    let mut flow = link.flow(dir);
    // The zero-copy path's pipe, made once the direction is busy (a read filled the
    // buffer: idle connections and small messages never need one); `Err` once making one
    // failed (e.g. out of descriptors): the copy path serves the rest of the connection.
    let mut pipe: Option<Result<Pipe, ()>> = None;
    let mut busy = false;
    loop {
        let limit = flow.chunk_limit(budget.per_direction());
        // Splice while the tap does not look at the bytes and no delay line holds them.
        let splice_now =
            *zero_copy && !tap.wants_bytes() && delay_line.is_none() && link.delay().is_zero();
        if splice_now && busy && pipe.is_none() {
            pipe = Some(Pipe::new(limit).map_err(|e| {
                tracing::debug!(error = %e, "no pipe for zero-copy forwarding; copying");
            }));
        }
        let via_pipe = match &pipe {
            Some(Ok(p)) if splice_now => Some(p),
            _ => None,
        };
        let n = if let Some(p) = via_pipe {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(PumpError::Cancelled),
                r = fill(p, &src, limit, &mut flow) => r.map_err(|source| PumpError::Read { side: from, source })?,
            }
        } else {
            if buf.len() < limit.min(MIN_CHUNK) {
                buf.resize(limit.min(MIN_CHUNK), 0);
            } else if buf.len() > limit * 2 {
                // More connections now share the route's budget: give memory back.
                buf.truncate(limit);
                buf.shrink_to_fit();
            }
            let want = buf.len().min(limit);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(PumpError::Cancelled),
                r = read_chunk(&src, &mut buf[..want], &mut flow) => r.map_err(|source| PumpError::Read { side: from, source })?,
            }
        };
        if n == 0 {
            if let Some(line) = delay_line.take() {
                line.finish(&cancel).await?;
            } else {
                // Half-close: pass the FIN on; the other direction keeps flowing.
                let _ = socket2::SockRef::from(&*dst).shutdown(std::net::Shutdown::Write);
            }
            return Ok(total);
        }
        let waited = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(PumpError::Cancelled),
            w = flow.acquire(n) => w,
        };
        if !waited.is_zero() {
            wait.increment(waited.as_secs_f64());
        }
        if let Some(rate) = flow.pace_update() {
            if let Err(e) = super::pace::set(&dst, rate) {
                tracing::warn!(
                    side = to,
                    error = %e,
                    "kernel pacing (SO_MAX_PACING_RATE) refused: the link shapes in user space \
                     alone from now on (as without --kernel-pacing)"
                );
                flow.pace_failed();
            }
        }
        if generation != link.generation() {
            // The link changed: the source's receive window follows the new rate.
            generation = link.generation();
            if dir == Direction::ToDestination {
                super::limit_receive_buffer(&src, &link, true);
            }
        }
        total += n as u64;
        if let Some(p) = via_pipe {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(PumpError::Cancelled),
                r = p.drain(&dst, n) => r.map_err(|source| PumpError::Write { side: to, source })?,
            }
            flow.written();
            tap.on_unseen(n);
            continue;
        }
        let delay = link.delay();
        if delay_line.is_none() && !delay.is_zero() {
            delay_line = Some(DelayLine::spawn(dst.clone(), to, cancel.clone()));
        }
        match &delay_line {
            Some(line) => {
                line.send(&buf[..n], Instant::now() + delay, &cancel)
                    .await?
            }
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(PumpError::Cancelled),
                r = write_all(&dst, &buf[..n]) => r.map_err(|source| PumpError::Write { side: to, source })?,
            },
        }
        flow.written();
        tap.on_chunk(&buf[..n]);
        // A full read means a busy direction: grow the buffer towards MAX_CHUNK.
        if n == buf.len() {
            busy = true;
            if buf.len() < limit {
                buf.resize((buf.len() * 2).min(limit), 0);
            }
        }
    }
}

/// Reads once for the link: first without waiting; when nothing is ready the sender has
/// nothing for the link now, and `flow` goes idle before the read waits.
async fn read_chunk(s: &TcpStream, buf: &mut [u8], flow: &mut Flow) -> io::Result<usize> {
    match s.try_read(buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            flow.idle();
            read(s, buf).await
        }
        r => r,
    }
}

/// [`read_chunk`] for the zero-copy path.
async fn fill(p: &Pipe, src: &TcpStream, limit: usize, flow: &mut Flow) -> io::Result<usize> {
    match p.try_fill(src, limit) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            flow.idle();
            p.fill(src, limit).await
        }
        r => r,
    }
}

/// Reads once from a shared socket.
pub async fn read(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Writes all of `buf` to a shared socket.
pub async fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// === impl DelayLine ===

enum Slot {
    Data(Vec<u8>, Instant, tokio::sync::OwnedSemaphorePermit),
    Eof,
}

/// A propagation delay: chunks enter with a due time and a writer task hands them to the
/// socket when due. Created on the first chunk that sees a non-zero delay and kept for the
/// rest of the connection, so order holds even if the delay changes live.
struct DelayLine {
    tx: mpsc::UnboundedSender<Slot>,
    budget: Arc<Semaphore>,
    writer: tokio::task::JoinHandle<Result<(), PumpError>>,
}

impl DelayLine {
    fn spawn(dst: Arc<TcpStream>, side: &'static str, cancel: CancellationToken) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Slot>();
        let writer = tokio::spawn(async move {
            while let Some(slot) = rx.recv().await {
                match slot {
                    Slot::Data(bytes, due, _permit) => {
                        tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return Err(PumpError::Cancelled),
                            r = async {
                                tokio::time::sleep_until(due).await;
                                write_all(&dst, &bytes).await
                            } => if let Err(source) = r {
                                // The reader only learns of this through the token.
                                tracing::warn!(side, error = %source, "write failed in delay line");
                                cancel.cancel();
                                return Err(PumpError::Write { side, source });
                            },
                        }
                    }
                    Slot::Eof => {
                        let _ = socket2::SockRef::from(&*dst).shutdown(std::net::Shutdown::Write);
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        DelayLine {
            tx,
            budget: Arc::new(Semaphore::new(DELAY_LINE_BYTES)),
            writer,
        }
    }

    async fn send(
        &self,
        chunk: &[u8],
        due: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), PumpError> {
        let permits = u32::try_from(chunk.len().min(DELAY_LINE_BYTES)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(PumpError::Cancelled),
            p = self.budget.clone().acquire_many_owned(permits) => p.map_err(|_| PumpError::Cancelled)?,
        };
        self.tx
            .send(Slot::Data(chunk.to_vec(), due, permit))
            .map_err(|_| PumpError::Cancelled)
    }

    async fn finish(self, cancel: &CancellationToken) -> Result<(), PumpError> {
        let _ = self.tx.send(Slot::Eof);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(PumpError::Cancelled),
            r = self.writer => r.unwrap_or(Err(PumpError::Cancelled)),
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn buffers_shrink_as_connections_open_and_grow_back() {
        let slots = Arc::new(Semaphore::new(1024));
        let budget = BufferBudget::new(slots.clone(), 1024);
        assert_eq!(budget.per_direction(), MAX_CHUNK, "no connection open yet");
        let few = slots.clone().try_acquire_many_owned(8).unwrap();
        assert_eq!(
            budget.per_direction(),
            MAX_CHUNK,
            "8 busy connections keep full buffers"
        );
        let many = slots.clone().try_acquire_many_owned(248).unwrap();
        // 256 open: 24 MiB / 512 directions = 48 KiB each.
        assert_eq!(budget.per_direction(), 48 * 1024);
        let all = slots.clone().try_acquire_many_owned(768).unwrap();
        assert_eq!(budget.per_direction(), MIN_CHUNK, "never below the minimum");
        drop((few, many, all));
        assert_eq!(budget.per_direction(), MAX_CHUNK);
    }
}
