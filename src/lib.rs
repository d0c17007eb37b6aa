//! migshaper: an inline TCP proxy for QEMU live migration.
//!
//! It sits between a source QEMU (or libvirt) and the destination's migration port,
//! forwards every byte unchanged and in order, and emulates a link of a chosen speed:
//! 1 Gb/s, 10 Gb/s or any rate, full duplex, shared by all connections of a route.
//!
//! # Layout
//! | module | job |
//! |---|---|
//! | [`spec`] | the small value languages: link rates (`1g`, `125MB/s`), bursts, framing, durations |
//! | [`link`] | the shared full-duplex link: one sans-IO [`link::TokenBucket`] per direction, a delay; [`link::Direction`] |
//! | [`config`] | validated configuration from flags or a TOML file, and the defaults and limits the CLI, config and control API share; every error names file, key, value |
//! | [`qemu`] | sans-IO parser of the QEMU migration stream, return path and multifd channels: channel kind, phases, QEMU's own RAM counters |
//! | [`tap`] | the [`tap::Tap`] interface: what sees each forwarded chunk (meters, parsers, captures) |
//! | [`metrics`] | the Prometheus registry (one per server) and each route's pre-registered handles, bumped live on the hot path |
//! | [`migration`] | per-migration accounting: connections tied to migrations, bytes and time per phase and direction, the taps that book them, JSON records |
//! | [`proxy`] | accept loop, in-order upstream connector, one pump task per direction (copy or zero-copy `splice`) |
//! | [`route`] | [`route::RouteHandle`]: a running route's link and accounting, and the one way its link changes |
//! | [`control`] | the HTTP/JSON control API (axum): `/metrics`, `/routes`, live link changes, `/migrations` |
//! | [`app`] | bind every route, run, reload on SIGHUP, drain on shutdown |
//! | [`demo`] | `migshaper demo`: a bundled real migration replayed at 1g and 10g through an in-process migshaper |
//! | [`inspect`] | `migshaper inspect`: offline analysis of capture files (plain or `.zst`) into bytes per phase and QEMU's RAM counters |
//! | [`probe`] | `migshaper sink` and `migshaper probe`: does the real path between the hosts carry the configured links with margin? |
//! | [`cli`] | clap definitions; `main.rs` is a thin shell over them |
//! | [`client`] | `migshaper link get/set/schedule` and `migshaper status`: the control API's CLI client |
//!
//! # Layering
//! Modules use only modules above them in this order (`tests/layering.rs` checks that the
//! `crate::` paths form no cycle):
//!
//! `spec` → `link` → `config`, `qemu`, `tap` → `metrics` → `migration` → `proxy` →
//! `route` → `control` → `app` → `demo`, `inspect`, `probe` → `cli` → `client` (→ `main.rs`).
//!
//! The pumps ([`proxy`]) and the accounting ([`migration`]) meet only through [`tap::Tap`];
//! link changes go through [`route::RouteHandle::change_link`], never through the
//! accounting.
//!
//! # Data flow
//! 1. `main` parses [`cli::Cli`] into a [`config::Config`], binds every route
//!    ([`app::Server::bind`]) and runs it until SIGINT/SIGTERM.
//! 2. Each route accepts source connections; a single connector task opens the upstream
//!    connections one at a time, in accept order (QEMU assigns channel roles by order).
//! 3. Each connection gets two pump tasks ([`proxy::pump::pump`]): read a chunk (at most
//!    half the burst), book the route's bucket for that direction ([`link::Link::acquire`]),
//!    wait until the booking's release time, book the release on the wire as it really was
//!    (a late release spends the burst credit instead of pulling the next chunks along),
//!    write the chunk (through the delay line if a delay is set), repeat. EOF is passed on
//!    as a half-close; an error resets both sides.
//! 4. After each write the chunk goes to the connection's taps ([`tap::Tap`]): the forward
//!    tap ([`migration::ForwardTap`]) feeds the sans-IO [`qemu::StreamParser`] and books
//!    the bytes per phase into the connection's [`migration::Migration`] (the first
//!    connection of a route opens one in its [`migration::RouteAccounting`], later ones
//!    join it); the reverse tap parses the return path on the main channel. When a
//!    migration's last connection closes, its record is written (`--records`). While a
//!    tap needs no bytes (parsing off, TLS or opaque streams), a busy direction moves its
//!    chunks socket → pipe → socket ([`proxy::splice`]) and the tap only counts.
//! 5. Everything countable goes to the route's [`metrics::RouteMetrics`] as it happens (bytes
//!    per phase from the taps, waits from the pumps, phases from the parser events), and the
//!    control API ([`control`]) renders them and changes a route's link: a change goes
//!    through [`route::RouteHandle::change_link`], which sets the [`link::Link`] (empty
//!    buckets), updates the gauges and notes the change in the active record. SIGHUP
//!    re-reads the config file and applies link changes the same way
//!    ([`app::apply_reload`]).
//! 6. The bucket is pure arithmetic on `now`: reservations are granted first come, first
//!    served, which makes the shared link fair and bounds a small message's wait to the
//!    chunk ahead of it; the return path has its own bucket, so it never queues behind
//!    the migration stream.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod demo;
pub mod host;
pub mod inspect;
pub mod link;
pub mod metrics;
pub mod migration;
pub mod probe;
pub mod proxy;
pub mod qemu;
pub mod route;
pub mod spec;
pub mod tap;

/// Raises the soft limit on open files to the hard limit (each proxied connection holds
/// two sockets; Debian's default soft limit of 1024 would cap a route near 500
/// connections). Returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Installs the SIGINT and SIGTERM handlers now and returns a future that resolves on the
/// first of them. Call it before anything is logged: a signal that arrived between the
/// "listening" line and a lazily installed handler would meet the default action, which
/// kills the process without draining (seen under load in the SIGTERM tests). Must be
/// called within a tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let install = |kind: SignalKind, name: &str| {
        signal(kind)
            .map_err(|e| tracing::error!(error = %e, "cannot install the {name} handler"))
            .ok()
    };
    let term = install(SignalKind::terminate(), "SIGTERM");
    let int = install(SignalKind::interrupt(), "SIGINT");
    async move {
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(term) => {}
            _ = recv(int) => {}
        }
    }
}
