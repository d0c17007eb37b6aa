//! Wiring: bind every route first, then run them until a shutdown signal, then drain.
//!
//! Binding happens before anything runs so that a bad address or a port in use is a
//! start-up error (exit code 2), not a half-started server.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, RouteConfig, parse_listen};
use std::sync::Arc;

use crate::link::Link;
use crate::migration::{RecordSink, RouteAccounting};
use crate::proxy::{self, Route, RouteOptions};
use crate::spec::{LinkRate, format_bits};

/// A start-up failure: which route, which address, why.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address is invalid.
    #[error("route {route:?}: listen address {addr:?}: {reason}")]
    Address {
        /// Route name.
        route: String,
        /// The address as written.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// The records file cannot be opened for appending.
    #[error(
        "cannot open the records file {path}: {source} (check the directory exists and is writable)"
    )]
    Records {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The capture directory cannot be created.
    #[error("cannot create the capture directory {path}: {source}")]
    Capture {
        /// The directory.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Binding failed (port in use, permission denied, address not on this host).
    #[error(
        "route {route:?}: cannot listen on {addr}: {source} (is another process using the port?)"
    )]
    Bind {
        /// Route name.
        route: String,
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
}

/// A server with every route bound, not yet running.
#[derive(Debug)]
pub struct Server {
    routes: Vec<Route>,
    drain_timeout: Duration,
}

/// A handle to a route's live state, for reporting and for changing its link.
#[derive(Debug, Clone)]
pub struct RouteHandle {
    /// Route name.
    pub name: String,
    /// Bound listen address.
    pub local_addr: SocketAddr,
    /// Upstream as configured.
    pub upstream: String,
    /// The route's link.
    pub link: Link,
    /// The route's migrations.
    pub accounting: Arc<RouteAccounting>,
}

impl Server {
    /// Binds every route of `config`; fails without listening on anything if one fails.
    pub fn bind(config: &Config) -> Result<Server, StartError> {
        let sink = match &config.records {
            Some(path) => Some(Arc::new(RecordSink::open(path).map_err(|source| {
                StartError::Records {
                    path: path.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let capture = match &config.capture {
                Some(dir) => {
                    let dir = if config.routes.len() > 1 {
                        dir.join(&r.name)
                    } else {
                        dir.clone()
                    };
                    std::fs::create_dir_all(&dir).map_err(|source| StartError::Capture {
                        path: dir.clone(),
                        source,
                    })?;
                    Some(dir)
                }
                None => None,
            };
            let options = RouteOptions {
                no_parse: !r.parse,
                capture,
            };
            routes.push(bind_route(
                r,
                config.connect_timeout,
                sink.clone(),
                options,
            )?);
        }
        Ok(Server {
            routes,
            drain_timeout: config.drain_timeout,
        })
    }

    /// The routes, with their bound addresses.
    pub fn routes(&self) -> Vec<RouteHandle> {
        self.routes
            .iter()
            .map(|r| RouteHandle {
                name: r.name.clone(),
                local_addr: r.local_addr().expect("a bound listener has an address"),
                upstream: r.upstream.clone(),
                link: r.link.clone(),
                accounting: r.accounting.clone(),
            })
            .collect()
    }

    /// Runs until `shutdown` resolves, then stops accepting, lets open connections drain
    /// for up to the drain timeout, resets what is left, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let kill = CancellationToken::new();
        let tracker = TaskTracker::new();
        for r in self.routes() {
            log_route(&r);
        }
        for route in self.routes {
            tracker.spawn(route.run(stop_accepting.clone(), kill.clone(), tracker.clone()));
        }
        shutdown.await;
        info!(drain_timeout = ?self.drain_timeout, "shutting down: no new connections, draining open ones");
        stop_accepting.cancel();
        tracker.close();
        if tokio::time::timeout(self.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open_tasks = tracker.len(),
                "drain timeout expired; closing remaining connections"
            );
            kill.cancel();
            tracker.wait().await;
        }
        info!("stopped");
    }
}

fn bind_route(
    r: &RouteConfig,
    connect_timeout: Duration,
    sink: Option<Arc<RecordSink>>,
    options: RouteOptions,
) -> Result<Route, StartError> {
    let addr = parse_listen(&r.listen).map_err(|reason| StartError::Address {
        route: r.name.clone(),
        addr: r.listen.clone(),
        reason,
    })?;
    let listener = proxy::bind(addr).map_err(|source| StartError::Bind {
        route: r.name.clone(),
        addr,
        source,
    })?;
    let link = Link::new(r.shape, r.delay);
    let accounting = Arc::new(RouteAccounting::new(r.name.clone(), link.clone(), sink));
    Ok(Route::new(
        r.name.clone(),
        listener,
        r.upstream.clone(),
        link,
        connect_timeout,
        accounting,
        options,
    ))
}

fn log_route(r: &RouteHandle) {
    let shape = r.link.shape();
    let payload = match shape.rate {
        LinkRate::Unlimited => "unlimited".to_string(),
        rate => shape
            .framing
            .payload_rate(rate)
            .map(format_bits)
            .unwrap_or_default(),
    };
    let burst_bytes = shape.burst_payload_bytes();
    info!(
        route = %r.name,
        listen = %r.local_addr,
        upstream = %r.upstream,
        link = %shape.rate,
        framing = %shape.framing,
        burst = %shape.burst,
        burst_bytes,
        delay = ?r.link.delay(),
        expected_payload_rate = %payload,
        "listening"
    );
    if !r.local_addr.ip().is_loopback() {
        info!(route = %r.name, listen = %r.local_addr, "route listens on a non-loopback address");
    }
}
