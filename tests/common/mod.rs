//! Shared helpers for the integration tests: start a server on 127.0.0.1:0, seeded data.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

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
