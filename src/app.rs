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

use std::sync::Arc;

use crate::config::{Config, RouteConfig, parse_listen};
use crate::control::{Control, ControlError};
use crate::link::fabric::Fabric;
use crate::link::{Link, LinkUpdate};
use crate::metrics::Metrics;
use crate::migration::{RecordSink, RouteAccounting};
use crate::proxy::{self, Route, RouteOptions};
pub use crate::route::RouteHandle;
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
    /// The control API cannot start.
    #[error(transparent)]
    Control(#[from] ControlError),
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
    /// One handle per route, in route order: shared by the control API and the reload.
    handles: Vec<RouteHandle>,
    drain_timeout: Duration,
    metrics: Arc<Metrics>,
    control: Option<Control>,
    source: Option<std::path::PathBuf>,
    fabric: Option<Fabric>,
}

impl Server {
    /// Binds every route of `config`; fails without listening on anything if one fails.
    pub fn bind(config: &Config) -> Result<Server, StartError> {
        let metrics = Metrics::new();
        let sink = match &config.records {
            Some(path) => Some(Arc::new(RecordSink::open(path).map_err(|source| {
                StartError::Records {
                    path: path.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        let fabric = config.fabric.map(Fabric::new);
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
                no_zero_copy: !r.zero_copy,
                capture,
                max_connections: r.max_connections,
                keepalive: (!config.keepalive.is_zero()).then_some(config.keepalive),
            };
            routes.push(bind_route(
                r,
                config.connect_timeout,
                sink.clone(),
                options,
                &metrics,
                fabric.as_ref(),
            )?);
        }
        let handles = routes
            .iter()
            .map(|r| {
                RouteHandle::new(
                    r.name.clone(),
                    r.local_addr().expect("a bound listener has an address"),
                    r.upstream.clone(),
                    r.link.clone(),
                    r.accounting.clone(),
                )
            })
            .collect();
        let mut server = Server {
            routes,
            handles,
            drain_timeout: config.drain_timeout,
            metrics,
            control: None,
            source: config.source.clone(),
            fabric,
        };
        if let Some(c) = &config.control {
            server.control = Some(Control::bind(
                c,
                server.routes(),
                server.metrics.clone(),
                server.fabric.clone(),
            )?);
        }
        Ok(server)
    }

    /// The control API's bound address, if it is enabled.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control.as_ref().map(Control::local_addr)
    }

    /// The server's metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The fabric every route draws from, if the server has one.
    pub fn fabric(&self) -> Option<&Fabric> {
        self.fabric.as_ref()
    }

    /// The routes, with their bound addresses.
    pub fn routes(&self) -> Vec<RouteHandle> {
        self.handles.clone()
    }

    /// Runs until `shutdown` resolves, then stops accepting, lets open connections drain
    /// for up to the drain timeout, resets what is left, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let kill = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Installed before anything is logged: a SIGHUP must never find the default
        // action (terminate) in place, with or without a config file.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(
                |e| warn!(error = %e, "cannot install the SIGHUP handler; config reload is off"),
            )
            .ok();
        let handles = self.routes();
        for r in &handles {
            log_route(r);
        }
        if let Some(f) = &self.fabric {
            log_fabric(f, "fabric");
        }
        let stop_control = CancellationToken::new();
        let control = self
            .control
            .map(|c| tokio::spawn(c.serve(stop_control.clone())));
        let upkeep = tokio::spawn(upkeep(self.metrics.clone()));
        let reload = hup.map(|hup| {
            tokio::spawn(reload_on_sighup(
                hup,
                self.source,
                handles.clone(),
                self.fabric.clone(),
            ))
        });
        for route in self.routes {
            tracker.spawn(route.run(stop_accepting.clone(), kill.clone(), tracker.clone()));
        }
        shutdown.await;
        if let Some(r) = &reload {
            r.abort();
        }
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
        upkeep.abort();
        stop_control.cancel();
        if let Some(c) = control {
            // A client that keeps a connection open must not hold the exit up.
            let _ = tokio::time::timeout(Duration::from_secs(1), c).await;
        }
        info!("stopped");
    }
}

fn bind_route(
    r: &RouteConfig,
    connect_timeout: Duration,
    sink: Option<Arc<RecordSink>>,
    options: RouteOptions,
    metrics: &Metrics,
    fabric: Option<&Fabric>,
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
    if r.kernel_pacing {
        link.pace_in_kernel();
    }
    if let Some(f) = fabric {
        link.on_fabric(f);
    }
    let accounting = Arc::new(RouteAccounting::new(
        r.name.clone(),
        link.clone(),
        sink,
        metrics.route(&r.name),
        fabric.cloned(),
    ));
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

fn log_fabric(f: &Fabric, what: &str) {
    let c = f.config();
    info!(
        rate = %c.shape.rate,
        framing = %c.shape.framing,
        burst = %c.shape.burst,
        oversubscribe = c.oversubscribe.as_str(),
        payload_rate = %format_bits(c.payload_bits() as f64),
        "{what}: every route also draws from this budget per direction"
    );
}

/// Drains histogram samples into their buckets now and then (rendering does it too).
async fn upkeep(metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        metrics.upkeep();
    }
}

/// Re-reads the config file on every SIGHUP and applies link changes.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    path: Option<std::path::PathBuf>,
    routes: Vec<RouteHandle>,
    fabric: Option<Fabric>,
) {
    while hup.recv().await.is_some() {
        let Some(path) = &path else {
            info!("SIGHUP: nothing to reload (started without --config); ignored");
            continue;
        };
        info!(path = %path.display(), "SIGHUP: re-reading the config file");
        match Config::from_file(path) {
            Ok(config) => {
                apply_reload(&config, &routes);
                reload_fabric(config.fabric, fabric.as_ref());
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "config reload failed; the running settings stay in force")
            }
        }
    }
}

/// Applies a re-read `[fabric]` table: its settings change live; adding or removing the
/// fabric needs a restart (the routes' links are put on it when they are bound).
pub fn reload_fabric(new: Option<crate::link::fabric::FabricConfig>, fabric: Option<&Fabric>) {
    match (new, fabric) {
        (Some(c), Some(f)) if c != f.config() => {
            f.set(c);
            log_fabric(f, "config reload: fabric changed");
        }
        (Some(_), None) => {
            warn!("config reload: [fabric] ignored (adding a fabric needs a restart)")
        }
        (None, Some(_)) => {
            warn!(
                "config reload: [fabric] missing from the file; the running fabric stays (removing it needs a restart)"
            )
        }
        _ => {}
    }
}

/// Applies a re-read configuration to the running routes: link settings change live (same
/// rules as the control API); what needs a restart (routes added or removed, listen or
/// upstream changed) is logged and left as it is.
pub fn apply_reload(config: &Config, routes: &[RouteHandle]) {
    for new in &config.routes {
        let Some(r) = routes.iter().find(|r| r.name == new.name) else {
            warn!(route = %new.name, "config reload: new route ignored (adding routes needs a restart)");
            continue;
        };
        if new.upstream != r.upstream {
            warn!(route = %new.name, running = %r.upstream, file = %new.upstream, "config reload: upstream change ignored (needs a restart)");
        }
        if parse_listen(&new.listen).ok() != Some(r.local_addr) && !new.listen.ends_with(":0") {
            warn!(route = %new.name, running = %r.local_addr, file = %new.listen, "config reload: listen change ignored (needs a restart)");
        }
        if new.shape != r.link.shape() || new.delay != r.link.delay() {
            let update = LinkUpdate {
                rate: Some(new.shape.rate),
                burst: Some(new.shape.burst),
                framing: Some(new.shape.framing),
                delay: Some(new.delay),
            };
            r.change_link(&update, "SIGHUP");
        }
    }
    for r in routes {
        if !config.routes.iter().any(|n| n.name == r.name) {
            warn!(route = %r.name, "config reload: route missing from the file keeps running (removing routes needs a restart)");
        }
    }
}
