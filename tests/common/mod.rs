//! Shared helpers for the integration tests, the benchmarks and the soak example: an
//! in-process server on 127.0.0.1:0, the `migshaper` binary as a child process with its
//! log, seeded data.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use migshaper::app::{RouteHandle, Server};
use migshaper::config::{Config, RouteConfig};
use migshaper::link::Shape;
use tokio::sync::oneshot;

pub mod fixtures;

/// A running in-process server.
pub struct Running {
    pub routes: Vec<RouteHandle>,
    /// The control API's address, when the config enables it.
    pub control: Option<SocketAddr>,
    /// The server's metrics registry.
    pub metrics: std::sync::Arc<migshaper::metrics::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.routes[0].local_addr
    }

    /// Signals shutdown and waits for the server to return.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap();
    }
}

pub fn route(upstream: SocketAddr, link: &str) -> RouteConfig {
    RouteConfig {
        name: "test".into(),
        listen: "127.0.0.1:0".into(),
        upstream: upstream.to_string(),
        shape: Shape {
            rate: link.parse().unwrap(),
            burst: "4ms".parse().unwrap(),
            framing: "none".parse().unwrap(),
        },
        delay: Duration::ZERO,
        parse: true,
        zero_copy: true,
        kernel_pacing: false,
        max_connections: migshaper::config::DEFAULT_MAX_CONNECTIONS,
    }
}

pub fn config(routes: Vec<RouteConfig>) -> Config {
    Config {
        routes,
        connect_timeout: Duration::from_secs(5),
        keepalive: migshaper::config::DEFAULT_KEEPALIVE,
        drain_timeout: Duration::from_secs(5),
        source: None,
        records: None,
        capture: None,
        control: None,
        fabric: None,
    }
}

pub fn start(config: Config) -> Running {
    let server = Server::bind(&config).expect("bind");
    let routes = server.routes();
    let control = server.control_addr();
    let metrics = server.metrics().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running {
        routes,
        control,
        metrics,
        stop: Some(tx),
        task,
    }
}

/// How long any wait on a child's log may take before the caller fails.
pub const LOG_WAIT: Duration = Duration::from_secs(30);

/// The `migshaper` binary cargo built for this test or benchmark. Cargo gives examples no
/// such path: they start their binary with [`Command::new`] and a path of their own.
pub fn migshaper() -> Command {
    match option_env!("CARGO_BIN_EXE_migshaper") {
        Some(path) => Command::new(path),
        None => panic!("cargo sets CARGO_BIN_EXE_migshaper for tests and benchmarks only"),
    }
}

/// A child's stderr, read line by line by a thread and kept. Waits block until the awaited
/// line arrives (no polling), and every line stays available for assertions and failure
/// messages.
#[derive(Clone)]
pub struct Log {
    who: String,
    shared: Arc<(Mutex<Lines>, Condvar)>,
    /// Lines before this index have been passed by [`Log::wait_for`].
    next: usize,
}

#[derive(Default)]
struct Lines {
    all: Vec<String>,
    /// The child closed its stderr (it exited).
    ended: bool,
}

impl Log {
    /// Starts reading `stderr` of the child called `who` (the name in failure messages).
    pub fn read(who: &str, stderr: impl std::io::Read + Send + 'static) -> Log {
        let shared = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let writer = shared.clone();
        std::thread::spawn(move || {
            let (lines, more) = &*writer;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lock(lines).all.push(line);
                more.notify_all();
            }
            lock(lines).ended = true;
            more.notify_all();
        });
        Log {
            who: who.to_string(),
            shared,
            next: 0,
        }
    }

    /// Every line logged so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.shared.0).all.clone()
    }

    /// Every line logged so far that is JSON (with `--log-format json`: all of them).
    pub fn json(&self) -> Vec<serde_json::Value> {
        lock(&self.shared.0)
            .all
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the first line after the ones already passed that `f` accepts, and
    /// moves past it.
    pub fn wait_for<T>(&mut self, what: &str, f: impl FnMut(&str) -> Option<T>) -> T {
        let (next, found) = self.wait_from(self.next, what, f);
        self.next = next;
        found
    }

    /// Waits for the first line since the start that `f` accepts.
    pub fn wait_any<T>(&self, what: &str, f: impl FnMut(&str) -> Option<T>) -> T {
        self.wait_from(0, what, f).1
    }

    /// [`Log::wait_for`] the next JSON line whose `message` is `message`.
    pub fn wait_message(&mut self, message: &str) -> serde_json::Value {
        self.wait_for(&format!("{message:?}"), |line| with_message(line, message))
    }

    /// [`Log::wait_any`] JSON line whose `message` is `message`.
    pub fn logged(&self, message: &str) -> serde_json::Value {
        self.wait_any(&format!("{message:?}"), |line| with_message(line, message))
    }

    /// [`Log::wait_for`] the next line that contains `needle`.
    pub fn wait_contains(&mut self, needle: &str) -> String {
        self.wait_for(&format!("a line with {needle:?}"), |line| {
            line.contains(needle).then(|| line.to_string())
        })
    }

    /// Waits until the child has closed its stderr, which it does by exiting.
    pub fn wait_end(&self) {
        let (lines, more) = &*self.shared;
        let deadline = Instant::now() + LOG_WAIT;
        let mut seen = lock(lines);
        while !seen.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{} did not exit", self.who);
            seen = more
                .wait_timeout(seen, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn wait_from<T>(
        &self,
        mut i: usize,
        what: &str,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> (usize, T) {
        let (lines, more) = &*self.shared;
        let deadline = Instant::now() + LOG_WAIT;
        let mut seen = lock(lines);
        loop {
            while i < seen.all.len() {
                i += 1;
                if let Some(found) = f(&seen.all[i - 1]) {
                    return (i, found);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if seen.ended || left.is_zero() {
                let why = if seen.ended { "it exited" } else { "timed out" };
                let log = seen.all.join("\n");
                drop(seen);
                panic!("{} never logged {what} ({why}); its log:\n{log}", self.who);
            }
            seen = more
                .wait_timeout(seen, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn with_message(line: &str, message: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["message"] == message).then_some(v)
}

/// The `migshaper` binary serving, as a child process with JSON logs; killed and reaped
/// when dropped.
pub struct Spawned {
    pub child: Child,
    pub log: Log,
    /// Each route's name and bound address, in the order they were logged.
    pub routes: Vec<(String, SocketAddr)>,
    /// The control API's bound address.
    pub control: SocketAddr,
}

impl Spawned {
    /// Starts `cmd` (the binary with its `serve` arguments) with JSON logs at level info
    /// and waits for its listening lines. The control API must be on (pass `--control
    /// 127.0.0.1:0`; `--control off` would leave this waiting): its "control API listening"
    /// line comes after every route's "listening" line, so all addresses are known once it
    /// is seen.
    pub fn start(mut cmd: Command) -> Spawned {
        cmd.args(["--log-format", "json"])
            .env("MIGSHAPER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let mut log = Log::read("migshaper", child.stderr.take().unwrap());
        let addr = |v: &serde_json::Value, key: &str| -> SocketAddr {
            let a = v[key]
                .as_str()
                .unwrap_or_else(|| panic!("no `{key}` in {v}"));
            a.parse().unwrap_or_else(|e| panic!("`{key}`: {e}: {v}"))
        };
        let mut routes = Vec::new();
        let control = log.wait_for("`listening` and `control API listening`", |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            match v["message"].as_str()? {
                "listening" => {
                    let name = v["route"].as_str().unwrap_or_default().to_string();
                    routes.push((name, addr(&v, "listen")));
                    None
                }
                "control API listening" => Some(addr(&v, "addr")),
                _ => None,
            }
        });
        Spawned {
            child,
            log,
            routes,
            control,
        }
    }

    /// The first route's address.
    pub fn listen(&self) -> SocketAddr {
        self.routes[0].1
    }

    /// The address of the route called `name`.
    pub fn route(&self, name: &str) -> SocketAddr {
        self.routes
            .iter()
            .find(|r| r.0 == name)
            .unwrap_or_else(|| panic!("no route {name} in {:?}", self.routes))
            .1
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the signal called `name` (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name} failed");
    }

    /// Waits until the child exits: its status and how long that took.
    pub fn wait_exit(&mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        self.log.wait_end();
        (self.child.wait().unwrap(), t.elapsed())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the series `name` with exactly `labels` (in any order) in a Prometheus text
/// exposition, if there is one.
pub fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (lbl, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let have: Vec<&str> = lbl.split(',').filter(|s| !s.is_empty()).collect();
        let all = have.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()));
        all.then(|| value.trim().parse().ok()).flatten()
    })
}

/// The sum of a JSON object's values (a record's bytes per phase).
pub fn sum(v: &serde_json::Value) -> u64 {
    v.as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum()
}

/// The resident set size of process `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The CPU time (user + system) process `pid` has used, in clock ticks (1/100 s), from
/// /proc; 0 if it cannot be read.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    f.get(11).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// A fresh directory under the system's temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `migshaper-{name}-{pid}`, emptied if it exists.
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("migshaper-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deterministic byte stream (splitmix64), cheap enough to generate at GB/s.
pub struct Seeded {
    state: u64,
    word: [u8; 8],
    pos: usize,
}

impl Seeded {
    pub fn new(seed: u64) -> Self {
        Seeded {
            state: seed,
            word: [0; 8],
            pos: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.pos == 8 {
                self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                self.word = (z ^ (z >> 31)).to_le_bytes();
                self.pos = 0;
            }
            *b = self.word[self.pos];
            self.pos += 1;
        }
    }
}

/// Writes `len` seeded bytes to `w`.
pub async fn send_seeded(
    mut w: impl tokio::io::AsyncWrite + Unpin,
    seed: u64,
    len: u64,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut g = Seeded::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        g.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await
}

/// Opens a connection through migshaper at `via` and takes its upstream end from `dest`:
/// the client first sends `first` (at least a byte: migshaper connects a would-be main
/// channel upstream only once it has spoken, as QEMU's source always does), which the
/// destination end has already read and checked when this returns.
pub async fn open_via(
    via: SocketAddr,
    dest: &tokio::net::TcpListener,
    first: &[u8],
) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert!(!first.is_empty(), "the source speaks first: give it a byte");
    let mut c = tokio::net::TcpStream::connect(via).await.unwrap();
    c.write_all(first).await.unwrap();
    let (mut d, _) = dest.accept().await.unwrap();
    let mut got = vec![0u8; first.len()];
    d.read_exact(&mut got).await.unwrap();
    assert_eq!(got, first, "the first bytes arrived changed");
    (c, d)
}

/// The first byte of the seeded stream `seed`: a test source writes it before the test
/// accepts at the destination, since migshaper connects a would-be main channel upstream
/// only once it has spoken (QEMU's source always speaks first). Continue with
/// [`send_seeded_after`]`(w, seed, len, 1)`.
pub fn first_seeded_byte(seed: u64) -> u8 {
    let mut b = [0u8; 1];
    Seeded::new(seed).fill(&mut b);
    b[0]
}

/// [`send_seeded`] without the first `skip` bytes (already written).
pub async fn send_seeded_after(
    mut w: impl tokio::io::AsyncWrite + Unpin,
    seed: u64,
    len: u64,
    skip: u64,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut g = Seeded::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        g.fill(&mut buf[..n]);
        let from = skip.saturating_sub(at).min(n as u64) as usize;
        w.write_all(&buf[from..n]).await?;
        at += n as u64;
    }
    w.shutdown().await
}

/// Reads `r` to EOF and checks it is exactly `len` bytes of the seeded stream.
/// Returns the offset of the first mismatch, if any.
pub async fn check_seeded(
    mut r: impl tokio::io::AsyncRead + Unpin,
    seed: u64,
    len: u64,
) -> std::io::Result<Result<(), String>> {
    use tokio::io::AsyncReadExt;
    let mut g = Seeded::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        g.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let i = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Ok(Err(format!("mismatch at byte {}", got + i as u64)));
        }
        got += n as u64;
    }
    if got != len {
        return Ok(Err(format!("got {got} bytes, expected {len}")));
    }
    Ok(Ok(()))
}
