//! A running route as the rest of the server sees it: its name and addresses, its link,
//! its migrations, and the one way its link changes (the control API, a SIGHUP reload).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::info;

use crate::link::{Direction, Link, LinkUpdate, Shape};
use crate::migration::RouteAccounting;

/// A handle to a route's live state, for reporting and for changing its link. Cheap to
/// clone; every clone changes the same route.
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
    /// Serialises link changes, so concurrent partial updates never interleave.
    link_change: Arc<Mutex<()>>,
}

impl RouteHandle {
    /// A handle to the route `name`, bound at `local_addr`, whose connections use `link`
    /// and book into `accounting`.
    pub fn new(
        name: String,
        local_addr: SocketAddr,
        upstream: String,
        link: Link,
        accounting: Arc<RouteAccounting>,
    ) -> Self {
        RouteHandle {
            name,
            local_addr,
            upstream,
            link,
            accounting,
            link_change: Arc::new(Mutex::new(())),
        }
    }

    /// Publishes the link's fidelity ledger of both directions to the route's metrics (the
    /// control API does it before every scrape, so the counters are current).
    pub fn publish_fidelity(&self) {
        let metrics = self.accounting.metrics();
        for dir in Direction::ALL {
            metrics.fidelity(dir, &self.link.fidelity(dir));
        }
    }

    /// Applies `update` to the route's link: every open connection uses it from its next
    /// chunk, both buckets start empty (no burst at the switch), the change is logged with
    /// its `origin`, counted, and appended to the active migration's record. Returns the
    /// link now in force (this change's, even if another one follows at once).
    pub fn change_link(&self, update: &LinkUpdate, origin: &str) -> (Shape, Duration) {
        let _serial = self.link_change.lock().unwrap_or_else(|p| p.into_inner());
        let (old_shape, old_delay) = (self.link.shape(), self.link.delay());
        let (shape, delay) = update.apply(old_shape, old_delay);
        self.link.set(shape, delay);
        let metrics = self.accounting.metrics();
        metrics.link(&shape, delay);
        metrics.link_changed();
        let (entry, migration) = self.accounting.link_changed();
        info!(
            route = %self.name,
            origin,
            link = %entry.link,
            burst = %entry.burst,
            framing = %entry.framing,
            delay = %entry.delay,
            previous_link = %old_shape.rate,
            migration = migration.as_deref().unwrap_or(""),
            "link changed"
        );
        (shape, delay)
    }
}
