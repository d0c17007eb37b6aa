//! `migshaper sink` and `migshaper probe`: can the real network between the two hosts carry
//! the links migshaper is asked to emulate?
//!
//! migshaper can only slow a path down. If the network between migshaper and the destination
//! carries less than a route's link, the migration sees the network, not the emulated link.
//! `probe` (on the source side) measures payload throughput to a `sink` (on the destination
//! host) in both directions over one or more TCP streams, and the round-trip time with and
//! without load, then says for each configured link whether the path carries it with
//! [`FAITHFUL_MARGIN`] to spare.
//!
//! # Wire protocol (version [`VERSION`])
//! Every connection starts with the client's 16-byte hello: [`MAGIC`] (`MSPB`), the version
//! byte, a mode byte ([`Mode`]), two zero bytes and a 64-bit session id (big-endian). The
//! sink answers with 8 bytes: [`MAGIC`], its version, a status (0: accepted, 1: other
//! version, 2: unknown mode) and two zero bytes. Then, by mode:
//! - upload: the client sends bytes until it resets the connection; the sink counts what it
//!   reads into the session's counter;
//! - download: the sink sends bytes until the client resets the connection;
//! - ping: the client sends 64-byte messages, the sink echoes each;
//! - control: the client sends `M`, the sink answers with its monotonic clock in nanoseconds
//!   and the session's byte counter (two 64-bit big-endian numbers). Two such marks bracket an
//!   upload measurement, so its figure is what reached the sink in that interval, not what
//!   was queued in socket buffers.
//!
//! The sink closes at once a connection whose first bytes are not [`MAGIC`] (a QEMU
//! migration stream starts with `QEVM`), and one that sends no complete hello within the
//! handshake timeout. The hello is not a QEMU stream either: a QEMU waiting with `-incoming`
//! that receives it fails its incoming migration, so never point a probe at one.
//!
//! Std threads and blocking sockets: a handful of streams per run, and a sink that serves
//! one probe at a time in practice; nothing here needs the async runtime.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::spec::{Framing, LinkRate};

/// The first bytes of every probe connection.
pub const MAGIC: [u8; 4] = *b"MSPB";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Length of the client's hello.
pub const HELLO_LEN: usize = 16;
/// Length of the sink's answer to the hello.
pub const REPLY_LEN: usize = 8;
/// How long either side waits for the other's half of the handshake (and the probe for its
/// connect).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A path is faithful to a link when it carries at least this multiple of the link's
/// payload rate. migshaper keeps every 100 ms window of a shaped link within about 1.6 % of
/// its rate (`docs/benchmarks.md`): with 2 % to spare the emulated link, not the path, stays
/// the bottleneck, also through those peaks.
pub const FAITHFUL_MARGIN: f64 = 1.02;
/// The longest measurement `--secs` accepts (the sink closes a connection idle for twice
/// as long).
pub const MAX_SECS: f64 = 60.0;
/// The most streams one measurement opens.
pub const MAX_STREAMS: usize = 64;
/// Connections a sink serves at once; more are closed at once.
pub const MAX_SINK_CONNECTIONS: usize = 256;

/// A sink closes a connection after this long without traffic (a vanished probe).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the probe waits for an echo or a mark answer (they queue behind the load).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of a ping message (about a post-copy page request).
const PING_LEN: usize = 64;
/// Pings are sent at most this often.
const PING_EVERY: Duration = Duration::from_millis(10);
/// Bulk write and read size.
const BULK: usize = 128 * 1024;
/// How often a bulk sender or reader blocked on its socket looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// A mark request on the control connection.
const MARK: u8 = b'M';

/// What a connection is for, the hello's mode byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Bulk bytes to the sink (to_destination).
    Upload = 1,
    /// Bulk bytes from the sink (to_source).
    Download = 2,
    /// Echoed 64-byte messages.
    Ping = 3,
    /// Marks: the sink's clock and a session's received bytes.
    Control = 4,
}

impl Mode {
    fn from_byte(b: u8) -> Option<Mode> {
        [Mode::Upload, Mode::Download, Mode::Ping, Mode::Control]
            .into_iter()
            .find(|m| *m as u8 == b)
    }
}

/// A failed sink or probe: the message to print (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A flag holds a value out of range.
    #[error("{0}")]
    Args(String),
    /// The links to check could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The sink cannot listen.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The target does not resolve.
    #[error("cannot resolve {target}: {reason} (expected HOST:PORT, e.g. 10.0.0.2:5201)")]
    Resolve {
        /// The target given.
        target: String,
        /// Why.
        reason: String,
    },
    /// Nothing accepts connections there.
    #[error("cannot connect to {addr}: {reason} — is `migshaper sink --listen ...` running there?")]
    Connect {
        /// The target.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Something accepted the connection but did not answer the hello.
    #[error(
        "{addr} accepted the connection but did not answer the probe handshake within {}: \
         it is not a migshaper sink (start `migshaper sink --listen ...` on a free port there)",
        humantime::format_duration(*timeout)
    )]
    NoAnswer {
        /// The target.
        addr: SocketAddr,
        /// How long the probe waited.
        timeout: Duration,
    },
    /// The connection was closed during the handshake.
    #[error(
        "{addr} closed the connection during the probe handshake: it is not a migshaper sink, \
         or a sink that refused the connection (too many open: see its log)"
    )]
    Closed {
        /// The target.
        addr: SocketAddr,
    },
    /// The answer was not a sink's.
    #[error("{addr} answered the probe handshake with {bytes}: it is not a migshaper sink")]
    NotASink {
        /// The target.
        addr: SocketAddr,
        /// What it sent, in hex.
        bytes: String,
    },
    /// A sink of another version.
    #[error(
        "{addr} is a migshaper sink speaking probe protocol version {theirs}, this probe \
         speaks version {VERSION}: run the same migshaper version on both hosts"
    )]
    Version {
        /// The target.
        addr: SocketAddr,
        /// The sink's version.
        theirs: u8,
    },
    /// A connection failed after its handshake.
    #[error("{what} with {addr} failed: {reason} (did the sink stop? see its log)")]
    Io {
        /// The target.
        addr: SocketAddr,
        /// Which connection and when.
        what: String,
        /// Why.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, ProbeError>;

// === sink ===

/// What `migshaper sink` runs.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// `IP:PORT` or `HOST:PORT` to listen on.
    pub listen: String,
    /// How long a connection may take to send its hello.
    pub handshake_timeout: Duration,
}

/// Upload bytes received for one probe run, shared by its upload and control connections.
#[derive(Debug, Default)]
struct Session {
    bytes: AtomicU64,
}

struct SinkState {
    /// The clock marks are read from.
    epoch: Instant,
    /// Sessions by id; an entry lives as long as a connection of the session is open.
    sessions: Mutex<HashMap<u64, Weak<Session>>>,
    open: AtomicUsize,
    handshake_timeout: Duration,
}

impl SinkState {
    fn session(&self, id: u64) -> Arc<Session> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(&id).and_then(Weak::upgrade) {
            return s;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(Session::default());
        map.insert(id, Arc::downgrade(&s));
        s
    }
}

/// Releases a connection slot when the connection's thread ends.
struct Slot(Arc<SinkState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds the sink's listener and logs `sink listening on ADDR` (the bound address).
pub fn bind_sink(opts: &SinkOptions) -> Result<TcpListener> {
    let listen_err = |reason: String| ProbeError::Listen {
        addr: opts.listen.clone(),
        reason,
    };
    let addr = crate::config::parse_listen(&opts.listen).map_err(listen_err)?;
    let listener = TcpListener::bind(addr).map_err(|e| listen_err(e.to_string()))?;
    let local = listener
        .local_addr()
        .map_err(|e| listen_err(e.to_string()))?;
    tracing::info!("sink listening on {local}");
    Ok(listener)
}

/// Serves probes on `listener` until the process ends: one thread per connection, at most
/// [`MAX_SINK_CONNECTIONS`] at once.
pub fn run_sink(listener: TcpListener, opts: &SinkOptions) {
    let state = Arc::new(SinkState {
        epoch: Instant::now(),
        sessions: Mutex::new(HashMap::new()),
        open: AtomicUsize::new(0),
        handshake_timeout: opts.handshake_timeout,
    });
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or memory: let open connections finish instead of
                // spinning on the error.
                tracing::warn!(error = %e, "cannot accept a connection");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if state.open.fetch_add(1, Ordering::Relaxed) >= MAX_SINK_CONNECTIONS {
            state.open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(
                %peer,
                "closing a connection: {MAX_SINK_CONNECTIONS} are open already"
            );
            continue;
        }
        let slot = Slot(state.clone());
        let spawned = thread::Builder::new()
            .name("sink-conn".into())
            .spawn(move || serve_connection(stream, peer, &slot.0));
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "cannot start a thread for a connection; closing it");
        }
    }
}

/// Why a connection's hello was refused.
enum Refused {
    Silent,
    Closed,
    NotProbe(Vec<u8>),
    Failed(io::Error),
}

/// Reads the hello, checking each byte as it comes: a connection whose first bytes are not
/// [`MAGIC`] is refused as soon as they arrive.
fn read_hello(
    s: &mut TcpStream,
    timeout: Duration,
) -> std::result::Result<[u8; HELLO_LEN], Refused> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Refused::Silent);
        }
        s.set_read_timeout(Some(left)).map_err(Refused::Failed)?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(Refused::Closed),
            Ok(n) => {
                got += n;
                let k = got.min(MAGIC.len());
                if buf[..k] != MAGIC[..k] {
                    return Err(Refused::NotProbe(buf[..got].to_vec()));
                }
            }
            Err(e) if is_timeout(&e) => return Err(Refused::Silent),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Refused::Failed(e)),
        }
    }
    Ok(buf)
}

fn serve_connection(mut s: TcpStream, peer: SocketAddr, state: &SinkState) {
    let hello = match read_hello(&mut s, state.handshake_timeout) {
        Ok(h) => h,
        Err(Refused::NotProbe(bytes)) => {
            let qemu = if bytes.starts_with(b"QEVM") {
                " (a QEMU migration stream: point QEMU at its destination or at `migshaper serve`, not at the sink)"
            } else {
                ""
            };
            tracing::info!(
                %peer,
                "closed a connection whose first bytes {} are not a migshaper probe handshake{qemu}",
                hex(&bytes)
            );
            return;
        }
        Err(Refused::Silent) => {
            tracing::info!(
                %peer,
                "closed a connection that sent no probe handshake within {}",
                humantime::format_duration(state.handshake_timeout)
            );
            return;
        }
        Err(Refused::Closed) => {
            tracing::debug!(%peer, "connection closed before its handshake");
            return;
        }
        Err(Refused::Failed(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed during its handshake");
            return;
        }
    };
    let version = hello[4];
    let mode = Mode::from_byte(hello[5]);
    let session = u64::from_be_bytes(hello[8..16].try_into().unwrap_or([0; 8]));
    let status = match (version, mode) {
        (VERSION, Some(_)) => 0,
        (VERSION, None) => 2,
        _ => 1,
    };
    let mut reply = [0u8; REPLY_LEN];
    reply[..4].copy_from_slice(&MAGIC);
    reply[4] = VERSION;
    reply[5] = status;
    if let Err(e) = s.write_all(&reply) {
        tracing::debug!(%peer, error = %e, "cannot answer a handshake");
        return;
    }
    let Some(mode) = mode.filter(|_| status == 0) else {
        tracing::info!(
            %peer,
            "refused a probe speaking version {version} mode {}: this sink speaks version {VERSION}",
            hello[5]
        );
        return;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = s.set_write_timeout(Some(IDLE_TIMEOUT));
    tracing::debug!(%peer, ?mode, session, "probe connection");
    let result = match mode {
        Mode::Upload => sink_upload(&mut s, &state.session(session)),
        Mode::Download => sink_download(&mut s),
        Mode::Ping => sink_ping(&mut s),
        Mode::Control => sink_control(&mut s, &state.session(session), state.epoch),
    };
    if let Err(e) = result {
        // Probes end every bulk connection with a reset: that is the normal end.
        tracing::debug!(%peer, ?mode, error = %e, "probe connection ended");
    }
}

fn sink_upload(s: &mut TcpStream, session: &Session) -> io::Result<()> {
    let mut buf = vec![0u8; BULK];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                session.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn sink_download(s: &mut TcpStream) -> io::Result<()> {
    let buf = vec![0u8; BULK];
    loop {
        s.write_all(&buf)?;
    }
}

fn sink_ping(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; PING_LEN];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn sink_control(s: &mut TcpStream, session: &Session, epoch: Instant) -> io::Result<()> {
    let mut cmd = [0u8; 1];
    loop {
        match s.read(&mut cmd) {
            Ok(0) => return Ok(()),
            Ok(_) if cmd[0] == MARK => {
                let now = epoch.elapsed().as_nanos() as u64;
                let bytes = session.bytes.load(Ordering::Relaxed);
                let mut answer = [0u8; 16];
                answer[..8].copy_from_slice(&now.to_be_bytes());
                answer[8..].copy_from_slice(&bytes.to_be_bytes());
                s.write_all(&answer)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown control command {:#04x}", cmd[0]),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

// === probe ===

/// The links a probe checks.
#[derive(Debug, Clone)]
pub enum LinkSource {
    /// Every route of a `migshaper serve --config` file.
    Config(PathBuf),
    /// Link specs from the command line (named link1, link2, ...), with one framing.
    Specs(Vec<LinkRate>, Framing),
}

/// What `migshaper probe` runs.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// The sink: `HOST:PORT`.
    pub target: String,
    /// Length of each measurement, in seconds.
    pub secs: f64,
    /// The stream counts to measure, in order.
    pub streams: Vec<usize>,
    /// The links to judge.
    pub links: LinkSource,
    /// Connect and handshake timeout.
    pub handshake_timeout: Duration,
}

/// Minimum, median and 99th percentile of round-trip times, in seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rtt {
    /// Shortest.
    pub min: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
}

impl Rtt {
    fn of(samples: &mut [Duration]) -> Rtt {
        samples.sort_unstable();
        let rank = |p: f64| {
            let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len().max(1));
            samples.get(i - 1).map_or(0.0, Duration::as_secs_f64)
        };
        Rtt {
            min: rank(0.0),
            p50: rank(0.5),
            p99: rank(0.99),
        }
    }
}

/// Payload throughput each way, bits per second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    /// Probe → sink: what the sink read.
    pub to_destination: f64,
    /// Sink → probe: what the probe read.
    pub to_source: f64,
}

/// Round-trip times without and with load.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RttPair {
    /// On an otherwise idle path (measured once, before any load).
    pub idle: Rtt,
    /// While this row's upload runs.
    pub loaded: Rtt,
}

/// One stream count's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct StreamRow {
    /// Parallel TCP streams.
    pub streams: usize,
    /// Payload throughput each way.
    pub throughput_bits_per_second: Throughput,
    /// Round-trip times of 64-byte messages.
    pub rtt_seconds: RttPair,
}

/// Whether the path carries one link.
#[derive(Debug, Clone, Serialize)]
pub struct LinkVerdict {
    /// The route's name, or link1, link2, ... for `--link`.
    pub name: String,
    /// The line rate.
    pub link: String,
    /// The framing charged on it.
    pub framing: String,
    /// Payload bits per second the link carries (`None`: unlimited).
    pub needed_bits_per_second: Option<f64>,
    /// The best to_destination throughput measured.
    pub carried_bits_per_second: f64,
    /// The stream count that carried it.
    pub streams: usize,
    /// carried / needed (`None`: unlimited).
    pub ratio: Option<f64>,
    /// ratio ≥ [`FAITHFUL_MARGIN`] (or an unlimited link).
    pub faithful: bool,
    /// A route of a config file (printed as `route NAME`).
    #[serde(skip)]
    pub route: bool,
}

/// Everything a probe measured and concluded.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The sink's address.
    pub target: String,
    /// Length of each measurement.
    pub secs: f64,
    /// One row per stream count.
    pub streams: Vec<StreamRow>,
    /// One verdict per link.
    pub links: Vec<LinkVerdict>,
}

impl Report {
    /// True when every link fits the path (or none was given).
    pub fn all_faithful(&self) -> bool {
        self.links.iter().all(|l| l.faithful)
    }
}

/// Warm-up before each measured interval (slow start, socket buffers filling): a tenth of
/// the interval, at most a second.
pub fn warmup(secs: f64) -> Duration {
    Duration::from_secs_f64((secs / 10.0).min(1.0))
}

/// Runs the measurements and judges the links.
pub fn probe(opts: &ProbeOptions) -> Result<Report> {
    if !(opts.secs.is_finite() && opts.secs > 0.0 && opts.secs <= MAX_SECS) {
        return Err(ProbeError::Args(format!(
            "--secs {}: expected a number of seconds above 0 and at most {MAX_SECS}",
            opts.secs
        )));
    }
    if opts.streams.is_empty() || opts.streams.iter().any(|&n| n == 0 || n > MAX_STREAMS) {
        return Err(ProbeError::Args(format!(
            "--streams {:?}: expected stream counts from 1 to {MAX_STREAMS}, e.g. 1,4",
            opts.streams
        )));
    }
    let wanted = wanted_links(&opts.links)?;
    let addr = resolve(&opts.target)?;
    let p = Prober {
        addr,
        handshake: opts.handshake_timeout,
        secs: Duration::from_secs_f64(opts.secs),
        warmup: warmup(opts.secs),
    };
    tracing::info!(target = %addr, "measuring the idle round-trip time");
    let idle = p.idle_rtt()?;
    let mut rows = Vec::new();
    for &n in &opts.streams {
        tracing::info!(target = %addr, streams = n, "measuring to_destination");
        let (up, loaded) = p.upload(n)?;
        tracing::info!(target = %addr, streams = n, "measuring to_source");
        let down = p.download(n)?;
        rows.push(StreamRow {
            streams: n,
            throughput_bits_per_second: Throughput {
                to_destination: up,
                to_source: down,
            },
            rtt_seconds: RttPair { idle, loaded },
        });
    }
    let links = judge(&wanted, &rows);
    Ok(Report {
        target: addr.to_string(),
        secs: opts.secs,
        streams: rows,
        links,
    })
}

struct Wanted {
    name: String,
    route: bool,
    rate: LinkRate,
    framing: Framing,
}

fn wanted_links(src: &LinkSource) -> Result<Vec<Wanted>> {
    Ok(match src {
        LinkSource::Config(path) => {
            let config = Config::from_file(path)?;
            let mut wanted: Vec<Wanted> = config
                .routes
                .into_iter()
                .map(|r| Wanted {
                    name: r.name,
                    route: true,
                    rate: r.shape.rate,
                    framing: r.shape.framing,
                })
                .collect();
            // A fabric budget the path cannot carry would share out more than there is.
            if let Some(f) = config.fabric {
                wanted.push(Wanted {
                    name: "fabric".into(),
                    route: false,
                    rate: f.shape.rate,
                    framing: f.shape.framing,
                });
            }
            wanted
        }
        LinkSource::Specs(rates, framing) => rates
            .iter()
            .enumerate()
            .map(|(i, &rate)| Wanted {
                name: format!("link{}", i + 1),
                route: false,
                rate,
                framing: *framing,
            })
            .collect(),
    })
}

/// Judges each link against the best to_destination throughput of `rows`.
fn judge(wanted: &[Wanted], rows: &[StreamRow]) -> Vec<LinkVerdict> {
    let best = rows.iter().fold(None::<&StreamRow>, |best, r| match best {
        Some(b)
            if b.throughput_bits_per_second.to_destination
                >= r.throughput_bits_per_second.to_destination =>
        {
            Some(b)
        }
        _ => Some(r),
    });
    let (carried, streams) = best.map_or((0.0, 0), |b| {
        (b.throughput_bits_per_second.to_destination, b.streams)
    });
    wanted
        .iter()
        .map(|w| {
            let needed = w.framing.payload_rate(w.rate);
            let ratio = needed.map(|n| carried / n);
            LinkVerdict {
                name: w.name.clone(),
                link: w.rate.to_string(),
                framing: w.framing.to_string(),
                needed_bits_per_second: needed,
                carried_bits_per_second: carried,
                streams,
                ratio,
                faithful: ratio.is_none_or(|r| r >= FAITHFUL_MARGIN),
                route: w.route,
            }
        })
        .collect()
}

fn resolve(target: &str) -> Result<SocketAddr> {
    let err = |reason: String| ProbeError::Resolve {
        target: target.to_string(),
        reason,
    };
    if let Ok(a) = target.parse::<SocketAddr>() {
        return Ok(a);
    }
    crate::config::check_host_port(target).map_err(err)?;
    target
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("it resolves to no address".into()))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fresh session id: random enough that two probes of one sink never share one.
fn session_id() -> u64 {
    std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), std::time::SystemTime::now()))
}

/// Resets `s` on close: queued bytes are dropped instead of still being sent (they would
/// load the path during the next measurement).
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

struct Prober {
    addr: SocketAddr,
    handshake: Duration,
    secs: Duration,
    warmup: Duration,
}

impl Prober {
    fn io_err(&self, what: impl Into<String>, e: &io::Error) -> ProbeError {
        let reason = if is_timeout(e) {
            format!(
                "no answer within {}",
                humantime::format_duration(ANSWER_TIMEOUT)
            )
        } else {
            e.to_string()
        };
        ProbeError::Io {
            addr: self.addr,
            what: what.into(),
            reason,
        }
    }

    /// Connects and completes the handshake for `mode`.
    fn open(&self, mode: Mode, session: u64) -> Result<TcpStream> {
        let addr = self.addr;
        let mut s = TcpStream::connect_timeout(&addr, self.handshake).map_err(|e| {
            let reason = match e.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                _ if is_timeout(&e) => format!(
                    "no answer within {}",
                    humantime::format_duration(self.handshake)
                ),
                _ => e.to_string(),
            };
            ProbeError::Connect { addr, reason }
        })?;
        let handshake_err = |e: io::Error| match e.kind() {
            _ if is_timeout(&e) => ProbeError::NoAnswer {
                addr,
                timeout: self.handshake,
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => ProbeError::Closed { addr },
            _ => self.io_err("the probe handshake", &e),
        };
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4] = VERSION;
        hello[5] = mode as u8;
        hello[8..].copy_from_slice(&session.to_be_bytes());
        s.set_nodelay(true).map_err(handshake_err)?;
        s.set_write_timeout(Some(self.handshake))
            .map_err(handshake_err)?;
        s.set_read_timeout(Some(self.handshake))
            .map_err(handshake_err)?;
        s.write_all(&hello).map_err(handshake_err)?;
        let mut reply = [0u8; REPLY_LEN];
        s.read_exact(&mut reply).map_err(handshake_err)?;
        if reply[..4] != MAGIC {
            return Err(ProbeError::NotASink {
                addr,
                bytes: hex(&reply),
            });
        }
        match reply[5] {
            0 => {}
            1 => {
                return Err(ProbeError::Version {
                    addr,
                    theirs: reply[4],
                });
            }
            other => {
                return Err(ProbeError::Io {
                    addr,
                    what: format!("the probe handshake (mode {})", mode as u8),
                    reason: format!("the sink refused it with status {other}"),
                });
            }
        }
        s.set_read_timeout(Some(ANSWER_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(ANSWER_TIMEOUT)))
            .map_err(|e| self.io_err("setting socket timeouts", &e))?;
        Ok(s)
    }

    fn idle_rtt(&self) -> Result<Rtt> {
        let mut s = self.open(Mode::Ping, 0)?;
        let until = Instant::now() + self.secs;
        let samples = ping(&mut s, || Instant::now() >= until)
            .map_err(|e| self.io_err("the idle ping connection", &e))?;
        let mut rtts: Vec<Duration> = samples.into_iter().map(|(_, d)| d).collect();
        Ok(Rtt::of(&mut rtts))
    }

    /// `n` upload streams for warm-up + secs, and a ping alongside: (throughput the sink
    /// received, loaded RTT).
    fn upload(&self, n: usize) -> Result<(f64, Rtt)> {
        let session = session_id();
        let mut control = self.open(Mode::Control, session)?;
        let conns = (0..n)
            .map(|_| self.open(Mode::Upload, session))
            .collect::<Result<Vec<_>>>()?;
        let mut pinger = self.open(Mode::Ping, 0)?;
        let stop = &AtomicBool::new(false);
        let (marks, sent, pings) = thread::scope(|scope| {
            let senders: Vec<_> = conns
                .iter()
                .map(|c| scope.spawn(move || send_until(c, stop)))
                .collect();
            let pings = scope.spawn(move || ping(&mut pinger, || stop.load(Ordering::Relaxed)));
            let marks = (|| {
                thread::sleep(self.warmup);
                let a = mark(&mut control)?;
                let start = Instant::now();
                thread::sleep(self.secs);
                let b = mark(&mut control)?;
                Ok::<_, io::Error>((a, b, start))
            })();
            stop.store(true, Ordering::Relaxed);
            let sent: Vec<io::Result<()>> = senders.into_iter().map(joined).collect();
            let pings = joined(pings);
            (marks, sent, pings)
        });
        conns.into_iter().for_each(reset);
        for (i, r) in sent.into_iter().enumerate() {
            r.map_err(|e| self.io_err(format!("upload stream {} of {n}", i + 1), &e))?;
        }
        let (a, b, start) = marks.map_err(|e| self.io_err("the control connection", &e))?;
        let pings = pings.map_err(|e| self.io_err("the loaded ping connection", &e))?;
        let mut loaded: Vec<Duration> = pings
            .iter()
            .filter(|(sent, _)| *sent >= start)
            .map(|(_, d)| *d)
            .collect();
        if loaded.is_empty() {
            loaded = pings.into_iter().map(|(_, d)| d).collect();
        }
        let ns = b.0.saturating_sub(a.0).max(1);
        let bits = b.1.saturating_sub(a.1) as f64 * 8.0;
        Ok((bits / (ns as f64 / 1e9), Rtt::of(&mut loaded)))
    }

    /// `n` download streams for warm-up + secs: the throughput this side read.
    fn download(&self, n: usize) -> Result<f64> {
        let conns = (0..n)
            .map(|_| self.open(Mode::Download, 0))
            .collect::<Result<Vec<_>>>()?;
        let stop = &AtomicBool::new(false);
        let total = &AtomicU64::new(0);
        let (window, read) = thread::scope(|scope| {
            let readers: Vec<_> = conns
                .iter()
                .map(|c| scope.spawn(move || read_until(c, stop, total)))
                .collect();
            thread::sleep(self.warmup);
            let (t0, b0) = (Instant::now(), total.load(Ordering::Relaxed));
            thread::sleep(self.secs);
            let (t1, b1) = (Instant::now(), total.load(Ordering::Relaxed));
            stop.store(true, Ordering::Relaxed);
            let read: Vec<io::Result<()>> = readers.into_iter().map(joined).collect();
            ((t1 - t0, b1 - b0), read)
        });
        conns.into_iter().for_each(reset);
        for (i, r) in read.into_iter().enumerate() {
            r.map_err(|e| self.io_err(format!("download stream {} of {n}", i + 1), &e))?;
        }
        Ok(window.1 as f64 * 8.0 / window.0.as_secs_f64().max(1e-9))
    }
}

/// A measuring thread's result; a panic in it is an I/O failure of its connection.
fn joined<T>(h: thread::ScopedJoinHandle<'_, io::Result<T>>) -> io::Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(io::Error::other("panicked")))
}

/// Writes bulk bytes to `s` until `stop` is set.
fn send_until(s: &TcpStream, stop: &AtomicBool) -> io::Result<()> {
    let buf = vec![0u8; BULK];
    let mut s = s;
    s.set_write_timeout(Some(POLL))?;
    while !stop.load(Ordering::Relaxed) {
        match s.write(&buf) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads `s` until `stop` is set, adding what arrives to `total`.
fn read_until(s: &TcpStream, stop: &AtomicBool, total: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; BULK];
    let mut s = s;
    s.set_read_timeout(Some(POLL))?;
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) if !stop.load(Ordering::Relaxed) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the sink closed the stream",
                ));
            }
            Ok(n) => {
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Asks the sink for its clock and the session's bytes: (nanoseconds, bytes).
fn mark(control: &mut TcpStream) -> io::Result<(u64, u64)> {
    control.write_all(&[MARK])?;
    let mut answer = [0u8; 16];
    control.read_exact(&mut answer)?;
    let word = |r: std::ops::Range<usize>| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&answer[r]);
        u64::from_be_bytes(w)
    };
    Ok((word(0..8), word(8..16)))
}

/// Ping-pong on `s` every [`PING_EVERY`] until `done`: (send time, round-trip time) of each
/// (at least one).
fn ping(s: &mut TcpStream, done: impl Fn() -> bool) -> io::Result<Vec<(Instant, Duration)>> {
    let mut samples = Vec::new();
    let mut msg = [0u8; PING_LEN];
    let mut back = [0u8; PING_LEN];
    for seq in 0u64.. {
        msg[..8].copy_from_slice(&seq.to_be_bytes());
        let sent = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        samples.push((sent, sent.elapsed()));
        if back != msg {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the sink echoed other bytes than were sent",
            ));
        }
        if done() {
            break;
        }
        let next = sent + PING_EVERY;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
    }
    Ok(samples)
}

// === output ===

/// `9.41 Gb/s`, `941.19 Mb/s`, `12.50 kb/s` (decimal SI).
pub fn format_rate(bits_per_s: f64) -> String {
    let (v, unit) = if bits_per_s >= 1e12 {
        (bits_per_s / 1e12, "Tb/s")
    } else if bits_per_s >= 1e9 {
        (bits_per_s / 1e9, "Gb/s")
    } else if bits_per_s >= 1e6 {
        (bits_per_s / 1e6, "Mb/s")
    } else if bits_per_s >= 1e3 {
        (bits_per_s / 1e3, "kb/s")
    } else {
        (bits_per_s, "b/s")
    };
    format!("{v:.2} {unit}")
}

/// A ratio truncated (not rounded) to two decimals, so that a printed 1.02 is faithful.
fn ratio_text(r: f64) -> String {
    format!("{:.2}", (r * 100.0).floor() / 100.0)
}

impl fmt::Display for LinkVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.route {
            write!(f, "route {}: ", self.name)?;
        } else {
            write!(f, "{}: ", self.name)?;
        }
        f.write_str(&self.link)?;
        if self.framing != Framing::DEFAULT.to_string() {
            write!(f, " (framing {})", self.framing)?;
        }
        let carried = format_rate(self.carried_bits_per_second);
        let streams = match self.streams {
            1 => "1 stream".to_string(),
            n => format!("{n} streams"),
        };
        match (self.needed_bits_per_second, self.ratio) {
            (Some(needed), Some(ratio)) => write!(
                f,
                " needs {} of payload; path carried {carried} ({streams}): {} ({})",
                format_rate(needed),
                if self.faithful {
                    "faithful"
                } else {
                    "NOT faithful"
                },
                ratio_text(ratio)
            ),
            _ => write!(
                f,
                ": no rate to check; the path's own {carried} ({streams}) applies"
            ),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "probe of {}: {} s per measurement, after a {} s warm-up",
            self.target,
            self.secs,
            warmup(self.secs).as_secs_f64()
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:>7}  {:>14}  {:>14}  {:>28}  {:>28}",
            "streams",
            "to_destination",
            "to_source",
            "RTT idle min/p50/p99",
            "RTT loaded min/p50/p99"
        )?;
        let ms = |r: &Rtt| {
            format!(
                "{:.3}/{:.3}/{:.3} ms",
                r.min * 1e3,
                r.p50 * 1e3,
                r.p99 * 1e3
            )
        };
        for r in &self.streams {
            writeln!(
                f,
                "{:>7}  {:>14}  {:>14}  {:>28}  {:>28}",
                r.streams,
                format_rate(r.throughput_bits_per_second.to_destination),
                format_rate(r.throughput_bits_per_second.to_source),
                ms(&r.rtt_seconds.idle),
                ms(&r.rtt_seconds.loaded)
            )?;
        }
        if !self.links.is_empty() {
            writeln!(f)?;
        }
        for l in &self.links {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(streams: usize, up: f64) -> StreamRow {
        let rtt = Rtt {
            min: 0.0,
            p50: 0.0,
            p99: 0.0,
        };
        StreamRow {
            streams,
            throughput_bits_per_second: Throughput {
                to_destination: up,
                to_source: 0.0,
            },
            rtt_seconds: RttPair {
                idle: rtt,
                loaded: rtt,
            },
        }
    }

    fn wanted(spec: &str, framing: &str) -> Wanted {
        Wanted {
            name: "r10g".into(),
            route: true,
            rate: spec.parse().unwrap(),
            framing: framing.parse().unwrap(),
        }
    }

    #[test]
    fn verdict_lines_use_the_payload_rate_and_the_best_stream_count() {
        let rows = [row(1, 5.0e9), row(4, 7.52e9)];
        let v = judge(&[wanted("10gbit", "ethernet")], &rows);
        assert_eq!(
            v[0].to_string(),
            "route r10g: 10gbit needs 9.41 Gb/s of payload; path carried 7.52 Gb/s (4 streams): NOT faithful (0.79)"
        );
        assert!(!v[0].faithful);
        let rows = [row(1, 1.3e9)];
        let v = judge(&[wanted("1g", "ethernet:1500")], &rows);
        assert_eq!(
            v[0].to_string(),
            "route r10g: 1gbit needs 941.48 Mb/s of payload; path carried 1.30 Gb/s (1 stream): faithful (1.38)"
        );
        assert!(v[0].faithful);
    }

    #[test]
    fn the_margin_is_exact_and_the_printed_ratio_never_rounds_up_to_it() {
        let needed = Framing::None.payload_rate("1g".parse().unwrap()).unwrap();
        let at = judge(&[wanted("1g", "none")], &[row(1, needed * FAITHFUL_MARGIN)]);
        assert!(at[0].faithful, "{}", at[0]);
        let below = judge(
            &[wanted("1g", "none")],
            &[row(1, needed * (FAITHFUL_MARGIN - 0.001))],
        );
        assert!(!below[0].faithful);
        assert!(
            below[0].to_string().ends_with("NOT faithful (1.01)"),
            "{}",
            below[0]
        );
        assert!(
            below[0].to_string().contains("(framing none)"),
            "{}",
            below[0]
        );
    }

    #[test]
    fn unlimited_links_fit_any_path() {
        let v = judge(&[wanted("unlimited", "ethernet")], &[row(2, 1e6)]);
        assert!(v[0].faithful && v[0].ratio.is_none());
        assert!(v[0].to_string().contains("no rate to check"), "{}", v[0]);
    }

    #[test]
    fn percentiles_are_ordered_nearest_ranks() {
        let mut s: Vec<Duration> = (1..=200).rev().map(Duration::from_millis).collect();
        let r = Rtt::of(&mut s);
        assert_eq!((r.min, r.p50, r.p99), (0.001, 0.1, 0.198));
        let r = Rtt::of(&mut [Duration::from_millis(3)]);
        assert_eq!((r.min, r.p50, r.p99), (0.003, 0.003, 0.003));
    }

    #[test]
    fn rates_print_with_units() {
        assert_eq!(format_rate(9.41e9), "9.41 Gb/s");
        assert_eq!(format_rate(941.19e6), "941.19 Mb/s");
        assert_eq!(format_rate(12.5e3), "12.50 kb/s");
        assert_eq!(format_rate(0.0), "0.00 b/s");
    }
}
