//! `migshaper demo`: replays a real QEMU migration through an in-process migshaper at 1 Gb/s
//! and then at 10 Gb/s, and prints what migshaper recorded for each, side by side.
//!
//! Everything runs on loopback inside this process: a source that writes the captured
//! main channel, migshaper with one route, and a destination that reads the stream and
//! replays the captured return path (its final SHUT after the stream has ended). The
//! numbers printed are the migration records, exactly as `serve --records` writes them.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::Server;
use crate::config::{Config, RouteConfig};
use crate::link::Shape;
use crate::migration::Record;
use crate::qemu::Phase;
use crate::spec::{Burst, Framing, format_bits};

/// The capture bundled with the binary: a real QEMU 7.2 hybrid post-copy migration
/// (`fixtures/hybrid-s16-128m`, recorded by `scripts/lab/capture`, which regenerates it).
const BUNDLED_MAIN: &[u8] = include_bytes!("../fixtures/hybrid-s16-128m/c0.s2d.bin.zst");
const BUNDLED_RETURN_PATH: &[u8] = include_bytes!("../fixtures/hybrid-s16-128m/c0.d2s.bin.zst");

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A capture file could not be read or decompressed.
    #[error("cannot read capture {path}: {source}")]
    Capture {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Loopback networking failed.
    #[error("loopback I/O failed: {0} (the demo needs 127.0.0.1)")]
    Io(#[from] std::io::Error),
    /// The in-process server could not start.
    #[error("cannot start the in-process migshaper: {0}")]
    Start(#[from] crate::app::StartError),
    /// The migration produced no record.
    #[error("no migration record was produced for the {0} run")]
    NoRecord(String),
}

/// A migration to replay: the main channel and its return path.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Where it came from, for the report.
    pub name: String,
    /// Source → destination bytes of the main connection (shared: no copy per run).
    pub main: Arc<Vec<u8>>,
    /// Destination → source bytes of the main connection (the return path).
    pub return_path: Vec<u8>,
}

impl Replay {
    /// The capture bundled with the binary.
    pub fn bundled() -> Result<Replay, DemoError> {
        let unzstd = |b: &[u8], name: &str| {
            zstd::stream::decode_all(b).map_err(|source| DemoError::Capture {
                path: PathBuf::from(name),
                source,
            })
        };
        Ok(Replay {
            name: "bundled capture fixtures/hybrid-s16-128m (QEMU 7.2, hybrid post-copy, 128 MiB guest dirtying 16 MiB)".into(),
            main: Arc::new(unzstd(BUNDLED_MAIN, "fixtures/hybrid-s16-128m/c0.s2d.bin.zst")?),
            return_path: unzstd(BUNDLED_RETURN_PATH, "fixtures/hybrid-s16-128m/c0.d2s.bin.zst")?,
        })
    }

    /// A capture directory with `c0.s2d.bin[.zst]` and optionally `c0.d2s.bin[.zst]`.
    pub fn from_dir(dir: &Path) -> Result<Replay, DemoError> {
        let read = |stem: &str| -> Result<Option<Vec<u8>>, DemoError> {
            for (name, zst) in [(format!("{stem}.zst"), true), (stem.to_string(), false)] {
                let path = dir.join(&name);
                if !path.exists() {
                    continue;
                }
                let err = |source| DemoError::Capture {
                    path: path.clone(),
                    source,
                };
                let f = std::fs::File::open(&path).map_err(err)?;
                let mut out = Vec::new();
                if zst {
                    zstd::stream::read::Decoder::new(f)
                        .and_then(|mut d| d.read_to_end(&mut out))
                        .map_err(|source| DemoError::Capture {
                            path: path.clone(),
                            source,
                        })?;
                } else {
                    std::io::BufReader::new(f)
                        .read_to_end(&mut out)
                        .map_err(|source| DemoError::Capture {
                            path: path.clone(),
                            source,
                        })?;
                }
                return Ok(Some(out));
            }
            Ok(None)
        };
        let main = read("c0.s2d.bin")?.ok_or_else(|| DemoError::Capture {
            path: dir.join("c0.s2d.bin.zst"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no main channel capture"),
        })?;
        Ok(Replay {
            name: dir.display().to_string(),
            main: Arc::new(main),
            return_path: read("c0.d2s.bin")?.unwrap_or_default(),
        })
    }
}

/// Replays `replay` through migshaper with link `rate` and returns the migration record.
pub async fn replay_through(replay: &Replay, rate: &str) -> Result<Record, DemoError> {
    let dest = TcpListener::bind("127.0.0.1:0").await?;
    let config = Config {
        fabric: None,
        routes: vec![RouteConfig {
            name: format!("demo-{rate}"),
            listen: "127.0.0.1:0".into(),
            upstream: dest.local_addr()?.to_string(),
            shape: Shape {
                rate: rate.parse().expect("the demo's link specs are valid"),
                burst: Burst::DEFAULT,
                framing: Framing::DEFAULT,
            },
            delay: Duration::ZERO,
            parse: true,
            zero_copy: true,
            kernel_pacing: false,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
        }],
        connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
        keepalive: crate::config::DEFAULT_KEEPALIVE,
        drain_timeout: Duration::from_secs(5),
        source: None,
        records: None,
        capture: None,
        control: None,
    };
    let server = Server::bind(&config)?;
    let route = server.routes().remove(0);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let outcome = transfer(replay, route.local_addr, dest).await;
    let _ = stop.send(());
    let _ = running.await;
    outcome?;
    route
        .accounting
        .recent()
        .pop()
        .ok_or_else(|| DemoError::NoRecord(rate.to_string()))
}

async fn transfer(replay: &Replay, via: SocketAddr, dest: TcpListener) -> Result<(), DemoError> {
    let mut source = TcpStream::connect(via).await?;
    // QEMU's source speaks first on the main channel, and migshaper connects upstream only
    // then (a port check never reaches the destination).
    let main = replay.main.clone();
    let first = main.len().min(1);
    source.write_all(&main[..first]).await?;
    let (mut d, _) = dest.accept().await?;
    let (mut sr, mut sw) = source.into_split();
    let send = tokio::spawn(async move {
        sw.write_all(&main[first..]).await?;
        sw.shutdown().await
    });
    // The return path, except its last message (SHUT, 8 bytes), goes out at once; SHUT
    // follows the end of the stream, as QEMU's destination sends it.
    let rp = &replay.return_path;
    let split = rp.len().saturating_sub(8);
    d.write_all(&rp[..split]).await?;
    let mut buf = vec![0u8; 1 << 20];
    while d.read(&mut buf).await? != 0 {}
    d.write_all(&rp[split..]).await?;
    d.shutdown().await?;
    let mut back = Vec::new();
    sr.read_to_end(&mut back).await?;
    send.await.map_err(std::io::Error::other)??;
    Ok(())
}

/// Renders the records of the runs side by side.
pub fn render(replay: &Replay, runs: &[(String, Record)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Replayed {} ({:.1} MB source->destination, {} B return path) through migshaper.\n",
        replay.name,
        replay.main.len() as f64 / 1e6,
        replay.return_path.len()
    );
    let _ = write!(out, "{:<10}", "phase");
    for (link, r) in runs {
        let payload = r
            .links
            .first()
            .map(|l| format!("{link} ({})", l.framing))
            .unwrap_or_else(|| link.clone());
        let _ = write!(out, " | {payload:^38}");
    }
    let _ = writeln!(out);
    let _ = write!(out, "{:<10}", "");
    for _ in runs {
        let _ = write!(out, " | {:>12} {:>10} {:>13}", "MB", "seconds", "Mb/s");
    }
    let _ = writeln!(out);
    for phase in Phase::MIGRATION.map(Phase::as_str) {
        let _ = write!(out, "{phase:<10}");
        for (_, r) in runs {
            let b = r.bytes.to_destination.get(phase).copied().unwrap_or(0);
            let s = r.duration_s_by_phase.get(phase).copied().unwrap_or(0.0);
            let rate = if s > 0.0 {
                b as f64 * 8.0 / s / 1e6
            } else {
                0.0
            };
            let _ = write!(
                out,
                " | {:>12.3} {:>10.3} {:>13.1}",
                b as f64 / 1e6,
                s,
                rate
            );
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "{:<10}", "total");
    for (_, r) in runs {
        let b: u64 = r.bytes.to_destination.values().sum();
        let _ = write!(
            out,
            " | {:>12.3} {:>10.3} {:>13.1}",
            b as f64 / 1e6,
            r.duration_s,
            b as f64 * 8.0 / r.duration_s.max(1e-9) / 1e6
        );
    }
    let _ = writeln!(
        out,
        "\n(phase times are taken where migshaper forwards the bytes, to about a millisecond)\n"
    );
    for (link, r) in runs {
        let _ = writeln!(
            out,
            "{link}: outcome {}, {} pre-copy passes, {} post-copy page requests, \
             QEMU counters: precopy-bytes {} downtime-bytes {} postcopy-bytes {}, \
             return path {} B; mean {}",
            r.outcome,
            r.precopy_passes,
            r.page_requests,
            r.ram.precopy_bytes,
            r.ram.downtime_bytes,
            r.ram.postcopy_bytes,
            r.bytes.to_source.values().sum::<u64>(),
            format_bits(
                r.bytes.to_destination.values().sum::<u64>() as f64 * 8.0 / r.duration_s.max(1e-9)
            ) + "/s"
        );
    }
    for (link, r) in runs {
        let f = &r.fidelity.to_destination;
        let idle: f64 = f.idle_seconds.values().sum();
        let short = |c: &str| f.shortfall_bytes.get(c).copied().unwrap_or(0);
        let _ = match f.ratio {
            Some(ratio) => writeln!(
                out,
                "{link}: link fidelity {:.2} % (delivered of the rate while backlogged, {:.3} s; \
                 short: late {} B, destination {} B, fabric {} B; idle waiting for the source {:.3} s; \
                 host CPU stolen by a hypervisor {}){}",
                ratio * 100.0,
                f.backlogged_seconds,
                short("late"),
                short("destination"),
                short("fabric"),
                idle,
                r.fidelity
                    .host_cpu_stolen
                    .map_or("n/a".to_owned(), |x| format!("{:.1} %", x * 100.0)),
                if ratio < crate::migration::FIDELITY_WARN_BELOW {
                    " - below 99 %: see \"Is the link faithful?\" in the README"
                } else {
                    ""
                }
            ),
            None => writeln!(out, "{link}: link fidelity n/a (never backlogged)"),
        };
    }
    if let [(a, ra), (b, rb)] = runs {
        let _ = writeln!(
            out,
            "\nThe same migration took {:.2} s at {a} and {:.2} s at {b} ({:.1}x).",
            ra.duration_s,
            rb.duration_s,
            ra.duration_s / rb.duration_s.max(1e-9)
        );
    }
    out
}
