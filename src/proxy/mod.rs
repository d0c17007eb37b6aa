//! The proxy: per route, an accept loop, an in-order upstream connector, and two pumps per
//! connection.
//!
//! Upstream connections are opened one at a time in accept order: QEMU destinations up to
//! 9.2 (and any version under TLS or with postcopy) assign channel roles by arrival order,
//! so a proxy that connected in parallel could swap the main and multifd channels.

pub mod pace;
pub mod pump;
pub mod splice;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::link::{Direction, Link};
use crate::metrics::{ConnMeter, ConnOutcome};
use crate::migration::{ForwardTap, ReverseTap, RouteAccounting, connection_ended};
use crate::tap::{CaptureTap, Tap};
use pump::{PumpError, pump};

/// Accepted connections queued for the connector before the accept loop waits.
const CONNECT_QUEUE: usize = 1024;

/// How long a connection that would be a migration's main channel may stay silent before
/// it is closed unforwarded. QEMU's source speaks first on the main channel, at once (the
/// stream header, or a TLS ClientHello), so only a port check or a stray client waits this
/// long; connections accepted after it wait too (their upstream connects keep accept order).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);

/// A route that is bound and ready to run.
#[derive(Debug)]
pub struct Route {
    /// The route's name.
    pub name: String,
    /// The upstream address, resolved at each connect.
    pub upstream: String,
    /// The link shared by all connections of this route.
    pub link: Link,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// The route's migrations.
    pub accounting: Arc<RouteAccounting>,
    /// Options that change what the proxy does with the bytes besides forwarding them.
    pub options: RouteOptions,
    listener: TcpListener,
}

/// Per-route options besides the link.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions {
    /// Parse the QEMU stream and account migrations (default). Off: forward and shape only.
    pub no_parse: bool,
    /// Never splice: copy every chunk through user space.
    pub no_zero_copy: bool,
    /// Write each connection's bytes to `DIR/c<N>.s2d.bin` and `DIR/c<N>.d2s.bin`
    /// (N in accept order from 0).
    pub capture: Option<std::path::PathBuf>,
    /// Connections open at once; more are refused. 0 means the default.
    pub max_connections: usize,
    /// TCP keepalive on both sockets of each connection: a peer that vanished is noticed
    /// after about this long without traffic (see [`set_keepalive`]). `None`: off.
    pub keepalive: Option<Duration>,
}

/// Binds a listening socket with address reuse and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Sources get a 7 KiB MSS, not loopback's 64 KiB (see SOURCE_MSS): Linux sizes a
    // sender's socket buffer per segment, and the bytes waiting there are in front of
    // every in-band reply a post-copy page fault waits for.
    socket2::SockRef::from(&socket).set_tcp_mss(SOURCE_MSS)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Route {
    /// Wraps an already bound listener.
    pub fn new(
        name: String,
        listener: TcpListener,
        upstream: String,
        link: Link,
        connect_timeout: Duration,
        accounting: Arc<RouteAccounting>,
        options: RouteOptions,
    ) -> Self {
        Route {
            name,
            upstream,
            link,
            connect_timeout,
            accounting,
            options,
            listener,
        }
    }

    /// The address the route listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `stop_accepting` fires. Connections run on `tracker` and are reset
    /// when `kill` fires.
    pub async fn run(
        self,
        stop_accepting: CancellationToken,
        kill: CancellationToken,
        tracker: TaskTracker,
    ) {
        let Route {
            name,
            upstream,
            link,
            connect_timeout,
            accounting,
            options,
            listener,
        } = self;
        let metrics = accounting.metrics().clone();
        let max_connections = if options.max_connections == 0 {
            crate::config::DEFAULT_MAX_CONNECTIONS
        } else {
            options.max_connections
        };
        let (tx, rx) = mpsc::channel::<Accepted>(CONNECT_QUEUE);
        let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        let sized_for = link.clone();
        let mut sized_at: Option<u64> = None;
        let mut refused = Refusals::default();
        let connector = Connector {
            route: name.clone(),
            upstream,
            link,
            connect_timeout,
            accounting,
            options,
            kill,
            tracker: tracker.clone(),
            budget: pump::BufferBudget::new(slots.clone(), max_connections),
            running: Arc::new(()),
        };
        let connector_task = tracker.spawn(connector.run(rx, stop_accepting.clone()));
        let mut backoff = Duration::from_millis(10);
        loop {
            // Connections are born with the listener's receive buffer: a source that writes
            // as soon as it connects (QEMU does) then never has more in flight than the
            // buffer it meets, which shrinking it after accept would drop (the kernel prunes
            // and the source waits for a retransmission, 200 ms at worst).
            let generation = sized_for.generation();
            if sized_at != Some(generation) {
                limit_receive_buffer(&listener, &sized_for, sized_at.is_some());
                sized_at = Some(generation);
            }
            let accepted = tokio::select! {
                biased;
                _ = stop_accepting.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        // Over the limit: close at once, count it, log (at most once a
                        // second, with how many were refused meanwhile).
                        drop(stream);
                        metrics.refused();
                        refused.note(&name, peer, max_connections);
                        continue;
                    };
                    if tx.send((stream, peer, slot)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(route = %name, error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        drop(listener);
        info!(route = %name, "stopped accepting");
        drop(tx);
        let _ = connector_task.await;
    }
}

/// An accepted connection on its way to the connector, holding its slot.
type Accepted = (TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit);

/// Rate-limited logging of refused connections.
#[derive(Default)]
struct Refusals {
    last_log: Option<std::time::Instant>,
    unlogged: u64,
}

impl Refusals {
    fn note(&mut self, route: &str, peer: SocketAddr, max: usize) {
        self.unlogged += 1;
        let now = std::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            warn!(
                route,
                %peer,
                max_connections = max,
                refused = self.unlogged,
                "connection refused: the route has max_connections open (raise --max-connections or max_connections in the config)"
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        }
    }
}

/// Opens upstream connections one at a time, in accept order.
struct Connector {
    route: String,
    upstream: String,
    link: Link,
    connect_timeout: Duration,
    accounting: Arc<RouteAccounting>,
    options: RouteOptions,
    kill: CancellationToken,
    tracker: TaskTracker,
    budget: pump::BufferBudget,
    /// One clone per forwarded connection still open: none besides this one means that
    /// the next connection would start a migration.
    running: Arc<()>,
}

/// What a connection that would open a migration did before its first byte.
enum FirstByte {
    /// It sent data: forward it.
    Data,
    /// It closed, or reset, without sending anything.
    Closed,
    /// It sent nothing within [`FIRST_BYTE_TIMEOUT`].
    Silent,
}

/// Waits for a would-be main channel's first byte (without taking it off the socket).
async fn first_byte(client: &TcpStream) -> FirstByte {
    let mut b = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, client.peek(&mut b)).await {
        Ok(Ok(n)) if n > 0 => FirstByte::Data,
        Ok(_) => FirstByte::Closed,
        Err(_) => FirstByte::Silent,
    }
}

impl Connector {
    async fn run(self, mut rx: mpsc::Receiver<Accepted>, stop: CancellationToken) {
        let mut next_id = 0u64;
        while let Some((client, peer, slot)) = rx.recv().await {
            if stop.is_cancelled() {
                reset(&client);
                continue;
            }
            next_id += 1;
            let span = info_span!("conn", route = %self.route, id = next_id, %peer);
            if Arc::strong_count(&self.running) == 1 {
                // No connection of this route is open: this one would be a migration's main
                // channel, which the destination takes as its migration. Forward it only
                // once it speaks, so that a port check (`nc -z`, a health probe) never
                // reaches the destination and kills the migration it is waiting for.
                let silent = match first_byte(&client).await {
                    FirstByte::Data => None,
                    FirstByte::Closed => Some(false),
                    FirstByte::Silent => Some(true),
                };
                if let Some(silent) = silent {
                    self.accounting.metrics().empty();
                    span.in_scope(|| {
                        if silent {
                            info!(timeout = ?FIRST_BYTE_TIMEOUT, "connection sent nothing; closed without connecting upstream (QEMU speaks first on a migration's main channel)")
                        } else {
                            debug!("connection closed before sending anything; not forwarded")
                        }
                    });
                    drop(client);
                    continue;
                }
            }
            if !self.options.no_parse {
                // A fabric that refuses oversubscription decides before the destination
                // sees anything: a refused migration never reaches it.
                if let Err(refusal) = self.accounting.admit() {
                    span.in_scope(|| self.accounting.refused(peer, &refusal));
                    drop(client);
                    continue;
                }
            }
            let upstream = match tokio::time::timeout(self.connect_timeout, connect(&self.upstream))
                .instrument(span.clone())
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.connect_failed(format!("connect to {}: {e}", self.upstream));
                    span.in_scope(|| {
                        warn!(upstream = %self.upstream, error = %e, "upstream connect failed; closing the client connection (check that the destination is listening)")
                    });
                    reset(&client);
                    continue;
                }
                Err(_) => {
                    self.connect_failed(format!(
                        "connect to {} timed out after {:?}",
                        self.upstream, self.connect_timeout
                    ));
                    span.in_scope(|| {
                        warn!(upstream = %self.upstream, timeout = ?self.connect_timeout, "upstream connect timed out; closing the client connection (check the route to the destination)")
                    });
                    reset(&client);
                    continue;
                }
            };
            if let Some(after) = self.options.keepalive {
                set_keepalive(&client, after);
                set_keepalive(&upstream, after);
            }
            let metrics = self.accounting.metrics().clone();
            let meter = ConnMeter::open(&metrics);
            let mut attached = None;
            let (fwd_tap, rev_tap) = if self.options.no_parse {
                (
                    Tapped::Unparsed(metrics.unparsed_bytes(Direction::ToDestination)),
                    Tapped::Unparsed(metrics.unparsed_bytes(Direction::ToSource)),
                )
            } else {
                let (migration, main) = self.accounting.attach();
                attached = Some(migration.clone());
                (
                    Tapped::Parsed(
                        ForwardTap::new(migration.clone(), main).with_meter(meter.clone()),
                    ),
                    Tapped::Parsed(ReverseTap::new(migration, main)),
                )
            };
            let (fwd_capture, rev_capture) = match &self.options.capture {
                Some(dir) => span.in_scope(|| self.capture_files(dir, next_id - 1)),
                None => (None, None),
            };
            let conn = Connection {
                budget: self.budget.clone(),
                zero_copy: !self.options.no_zero_copy,
                client: Arc::new(client),
                upstream: Arc::new(upstream),
                link: self.link.clone(),
                cancel: self.kill.child_token(),
                kill: self.kill.clone(),
                meter,
                metrics,
                _slot: slot,
                migration: attached,
                _running: self.running.clone(),
                fwd_tap: (fwd_tap, fwd_capture),
                rev_tap: (rev_tap, rev_capture),
            };
            self.tracker
                .spawn(conn.run(self.tracker.clone()).instrument(span));
        }
    }
}

impl Connector {
    /// Records an upstream connect failure in the route's migrations (when it accounts).
    fn connect_failed(&self, cause: String) {
        self.accounting.metrics().upstream_error();
        if !self.options.no_parse {
            self.accounting.connect_failed(cause);
        }
    }

    /// Opens the capture files of connection `n`; a failure is logged and skips capture.
    fn capture_files(
        &self,
        dir: &std::path::Path,
        n: u64,
    ) -> (Option<CaptureTap>, Option<CaptureTap>) {
        let open = |suffix: &str| {
            let path = dir.join(format!("c{n}.{suffix}.bin"));
            CaptureTap::create(path.clone())
                .map_err(
                    |e| warn!(path = %path.display(), error = %e, "cannot create capture file"),
                )
                .ok()
        };
        (open("s2d"), open("d2s"))
    }
}

/// Resolves `upstream` and connects to the first address that answers.
async fn connect(upstream: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(upstream).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        match socket.connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
}

/// Turns on TCP keepalive so that a peer that disappeared without a FIN or reset (host
/// crashed, cable pulled) is noticed on an idle connection: a migration can sit idle for
/// minutes (post-copy paused, a stopped guest), and without keepalive the other side of
/// the proxy would wait forever instead of failing the way a direct connection would.
/// First probe after `after / 2` of silence, then 3 probes `after / 6` apart (each at
/// least 1 s, the kernel's granularity): the connection fails about `after` after the
/// peer went quiet. A peer that is merely slow answers the probes and is never cut.
pub(crate) fn set_keepalive(s: &TcpStream, after: Duration) {
    let secs = |d: Duration| d.max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(secs(after / 2))
        .with_interval(secs(after / 6))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// MSS advertised to sources. A saturated Linux sender keeps its socket buffer full, and
/// sizes that buffer as 3 (BBR; 2 for CUBIC) x congestion window x the memory of one
/// segment: MSS plus about 0.5 KiB of headers rounded up to a power of two, plus 256 bytes
/// (`tcp_sndbuf_expand`). With loopback's 64 KiB segments that is 128 KiB per segment and
/// the buffer hits the 4 MB cap (32 ms at 1 Gb/s); 1448-byte segments take 2.3 KiB each,
/// and the buffer measured 1.5 MB.
/// The window in bytes is about the same at any MSS (3 TSO quanta of 64 KB plus the ACK
/// aggregation), so the buffer is smallest where the rounding wastes least: 7 KiB segments
/// take 8.25 KiB (with room for kernels whose headers need up to 1 KiB). Measured at 1 Gb/s,
/// fresh TCP metrics, BBR: a 1.2 MB send buffer at the source (cwnd 44 - 46 segments) and an
/// in-band reply p50 of 9.0 - 10.4 ms, against 1.5 MB (cwnd 206) and 13.1 ms at 1448 and
/// 10.3 - 10.9 ms at 3400. The emulated link's
/// framing is charged separately (`--framing`) and does not depend on this.
const SOURCE_MSS: u32 = 7168;

/// How much line time the source may have in flight into our receive buffer on a shaped
/// link. Measured (`docs/benchmarks.md`): 0.5 ms keeps the in-band reply latency at 1 Gb/s
/// near a real link's while the mean rate stays within 0.1 %; 2 ms added 5 ms of latency.
const RCVBUF_TIME: Duration = Duration::from_micros(500);
/// The same with kernel pacing: reads as large as the chunks the lead allows.
const PACED_RCVBUF_TIME: Duration = Duration::from_millis(2);

/// On a shaped link, keeps the backlog in the sender: a small receive window on the
/// source side means the bytes waiting for the link sit in the source's socket, not in
/// ours, as they would before a real NIC. Unlimited routes keep kernel autotuning. Set on
/// the listener, so that connections are born with it, and on each connection when the
/// link changes.
pub(crate) fn limit_receive_buffer(socket: &impl std::os::fd::AsFd, link: &Link, changed: bool) {
    let shape = link.shape();
    let time = if link.paced() {
        PACED_RCVBUF_TIME
    } else {
        RCVBUF_TIME
    };
    let size = match shape.framing.payload_rate(shape.rate) {
        Some(bits) => (bits / 8.0 * time.as_secs_f64()) as usize,
        // Unlimited after a change: the size set for the old rate locked autotuning off;
        // give the largest window instead.
        None if changed => MAX_RCVBUF,
        None => return,
    };
    let _ = socket2::SockRef::from(socket).set_recv_buffer_size(size.clamp(32 * 1024, MAX_RCVBUF));
}

/// Largest receive buffer set (the kernel caps it at net.core.rmem_max, 4 MiB by default).
const MAX_RCVBUF: usize = 4 << 20;

/// Closes a socket with a reset, so the peer sees a failure rather than a clean end.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// One proxied connection: the client (source side) and its upstream (destination side).
struct Connection {
    client: Arc<TcpStream>,
    upstream: Arc<TcpStream>,
    link: Link,
    cancel: CancellationToken,
    kill: CancellationToken,
    meter: Arc<ConnMeter>,
    metrics: crate::metrics::RouteMetrics,
    /// The route's connection slot, freed when the connection ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Shares the route's buffer memory between its connections.
    budget: pump::BufferBudget,
    /// Splice chunks nobody looks at.
    zero_copy: bool,
    /// The migration this connection belongs to (parsed routes).
    migration: Option<Arc<crate::migration::Migration>>,
    /// Counts it among the route's open connections (see `Connector::running`).
    _running: Arc<()>,
    fwd_tap: (Tapped<ForwardTap>, Option<CaptureTap>),
    rev_tap: (Tapped<ReverseTap>, Option<CaptureTap>),
}

/// What a direction does with its bytes besides forwarding them.
enum Tapped<T> {
    /// Parse and account them in the connection's migration.
    Parsed(T),
    /// Only count them (route with parsing off).
    Unparsed(metrics::Counter),
}

impl<T: Tap> Tap for Tapped<T> {
    fn on_chunk(&mut self, chunk: &[u8]) {
        match self {
            Tapped::Parsed(t) => t.on_chunk(chunk),
            Tapped::Unparsed(c) => c.on_chunk(chunk),
        }
    }

    fn wants_bytes(&self) -> bool {
        match self {
            Tapped::Parsed(t) => t.wants_bytes(),
            Tapped::Unparsed(c) => c.wants_bytes(),
        }
    }

    fn on_unseen(&mut self, n: usize) {
        match self {
            Tapped::Parsed(t) => t.on_unseen(n),
            Tapped::Unparsed(c) => c.on_unseen(n),
        }
    }
}

impl Connection {
    async fn run(self, tracker: TaskTracker) {
        let Connection {
            client,
            upstream,
            link,
            cancel,
            kill,
            meter,
            fwd_tap,
            rev_tap,
            metrics,
            _slot,
            _running,
            migration,
            budget,
            zero_copy,
        } = self;
        let _ = client.set_nodelay(true);
        debug!(local = ?upstream.local_addr().ok(), "connected upstream");
        let span = tracing::Span::current();
        let fwd = tracker.spawn(
            pump(
                client.clone(),
                upstream.clone(),
                link.clone(),
                Direction::ToDestination,
                cancel.clone(),
                pump::RouteShare {
                    wait: metrics.wait(Direction::ToDestination),
                    budget: budget.clone(),
                    zero_copy,
                },
                fwd_tap,
            )
            .instrument(span.clone()),
        );
        let rev = tracker.spawn(
            pump(
                upstream.clone(),
                client.clone(),
                link,
                Direction::ToSource,
                cancel.clone(),
                pump::RouteShare {
                    wait: metrics.wait(Direction::ToSource),
                    budget,
                    zero_copy,
                },
                rev_tap,
            )
            .instrument(span),
        );
        let sockets = (&client, &upstream, &cancel);
        let ((fwd_r, fwd_tap), (rev_r, rev_tap)) =
            tokio::join!(watch(fwd, sockets), watch(rev, sockets));
        let failure = match (&fwd_r, &rev_r) {
            (Ok(to_dst), Ok(to_src)) => {
                info!(
                    to_destination = to_dst,
                    to_source = to_src,
                    "connection closed"
                );
                meter.close(ConnOutcome::Closed);
                None
            }
            _ => {
                info!("connection aborted");
                let err = [fwd_r, rev_r]
                    .into_iter()
                    .filter_map(Result::err)
                    .find(|e| !matches!(e, PumpError::Cancelled));
                let interrupted = err.is_none() && kill.is_cancelled();
                meter.close(if interrupted {
                    ConnOutcome::Interrupted
                } else {
                    ConnOutcome::Reset
                });
                Some(match err {
                    Some(e) => format!("reset: {e}"),
                    None if interrupted => "interrupted: drain timeout expired".to_string(),
                    None => "reset".to_string(),
                })
            }
        };
        match (fwd_tap, rev_tap) {
            (Some((Tapped::Parsed(fwd_tap), _)), Some((Tapped::Parsed(rev_tap), _))) => {
                connection_ended(fwd_tap, rev_tap, failure);
            }
            // A pump panicked and took its tap with it: still end this connection's part
            // in the migration, or it would stay active forever.
            _ => {
                if let Some(m) = migration {
                    m.abandon_connection("internal error: a forwarding task panicked".into());
                }
            }
        }
    }
}

/// Awaits one direction; on failure resets both sockets and cancels the other one.
async fn watch<T>(
    task: tokio::task::JoinHandle<(Result<u64, PumpError>, T)>,
    (client, upstream, cancel): (&Arc<TcpStream>, &Arc<TcpStream>, &CancellationToken),
) -> (Result<u64, PumpError>, Option<T>) {
    let (result, tap) = match task.await {
        Ok((r, t)) => (r, Some(t)),
        // The pump panicked: nothing to account, but the connection must still close.
        Err(_) => (Err(PumpError::Cancelled), None),
    };
    if let Err(e) = &result {
        if !matches!(e, PumpError::Cancelled) || !cancel.is_cancelled() {
            warn!(error = %e, "closing both sides");
        }
        reset(client);
        reset(upstream);
        cancel.cancel();
    }
    (result, tap)
}
