//! The control API: HTTP/JSON on `--control ADDR` (default `127.0.0.1:9464`), served with
//! axum.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /healthz` | `{"status":"ok"}` while the server runs |
//! | `GET /routes`, `GET /routes/{name}` | routes with their link in force and active migration |
//! | `PUT /routes/{name}/link` | change any subset of `link`, `burst`, `delay`, `framing` |
//! | `GET /migrations[?route=R]` | active migrations (live phase, bytes, rate) and recent records |
//! | `GET /fabric`, `PUT /fabric` | the fabric budget: rate, demand, headroom, per route; change any subset of `rate`, `burst`, `framing`, `oversubscribe` (404 without a fabric) |
//!
//! Errors are `{"error": "..."}` with 400 (bad JSON, unknown field, bad value: the field
//! is named and the link is left unchanged), 401 (missing or wrong token), 404 (unknown
//! route) or 413 (body over [`MAX_BODY`]). When a token is configured, writes need
//! `Authorization: Bearer TOKEN`; it is compared in constant time and never logged. A
//! non-loopback control address without a token is refused at start-up.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ControlConfig, TOKEN_ENV, parse_listen};
use crate::link::LinkUpdate;
use crate::link::fabric::{Fabric, FabricConfig, FabricView, Oversubscribe};
use crate::metrics::{FabricMetrics, Metrics};
use crate::migration::{ActiveView, Record};
use crate::route::RouteHandle;
use crate::spec::{Burst, Framing, HumanDuration, LinkRate};

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// Time a client has to send a request head.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Time a request (body included) may take.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 64;

/// Bounds each request's time (a body sent byte by byte is cut off).
async fn request_timeout(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("request not completed within {REQUEST_TIMEOUT:?}"),
        )
        .into_response(),
    }
}

/// Why the control API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The address does not parse.
    #[error("--control {addr:?}: {reason}")]
    Address {
        /// As written.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// Non-loopback without a token.
    #[error(
        "--control {addr}: refusing to serve the control API on a non-loopback address without a token \
         (anyone who can reach it could change the link); set --control-token or {TOKEN_ENV}, or bind 127.0.0.1"
    )]
    NoToken {
        /// The address.
        addr: SocketAddr,
    },
    /// Binding failed.
    #[error(
        "--control {addr}: cannot listen: {source} (is another migshaper running? pick another port with --control)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
}

/// A bound control API, not yet serving.
#[derive(Debug)]
pub struct Control {
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
}

#[derive(Debug)]
struct ApiState {
    routes: Vec<RouteHandle>,
    metrics: Arc<Metrics>,
    token: Option<String>,
    fabric: Option<(Fabric, FabricMetrics)>,
    /// Serialises fabric changes, so concurrent partial updates never interleave.
    fabric_change: tokio::sync::Mutex<()>,
}

impl Control {
    /// Binds the control address. Refuses a non-loopback address without a token.
    pub fn bind(
        config: &ControlConfig,
        routes: Vec<RouteHandle>,
        metrics: Arc<Metrics>,
        fabric: Option<Fabric>,
    ) -> Result<Control, ControlError> {
        let addr = parse_listen(&config.addr).map_err(|reason| ControlError::Address {
            addr: config.addr.clone(),
            reason,
        })?;
        let token = config.token.clone().filter(|t| !t.is_empty());
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(ControlError::NoToken { addr });
        }
        let std_listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ControlError::Bind { addr, source })?;
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(|source| ControlError::Bind { addr, source })?;
        Ok(Control {
            listener,
            state: Arc::new(ApiState {
                fabric: fabric.map(|f| (f, metrics.fabric())),
                routes,
                metrics,
                token,
                fabric_change: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `stop` fires. Each client gets [`HEADER_TIMEOUT`] to send its request
    /// head and [`REQUEST_TIMEOUT`] per request; at most [`MAX_CLIENTS`] are served at once
    /// (more wait in the kernel's backlog), so slow or idle clients cannot pile up.
    pub async fn serve(self, stop: CancellationToken) {
        let addr = self.local_addr();
        info!(
            %addr,
            token = self.state.token.is_some(),
            "control API listening"
        );
        let app = router(self.state).layer(axum::middleware::from_fn(request_timeout));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (stream, _peer) = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%addr, error = %e, "control API accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
                }
            });
        }
    }
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/routes", get(routes))
        .route("/routes/{name}", get(route))
        .route("/routes/{name}/link", put(set_link).get(get_link))
        .route("/migrations", get(migrations))
        .route("/fabric", get(get_fabric).put(set_fabric))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// An API error: status and message, rendered as `{"error": "..."}`.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint; see GET /routes, /migrations, /fabric, /metrics, /healthz".into(),
    )
}

async fn metrics(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    for r in &s.routes {
        r.publish_fidelity();
    }
    if let Some((f, m)) = &s.fabric {
        m.publish(&f.view());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    axum::Json(json!({ "status": "ok", "routes": s.routes.len() }))
}

/// The link in force on a route.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkView {
    /// Line rate as written (`1 Gbit/s`-style canonical form).
    pub link: String,
    /// Burst as configured.
    pub burst: String,
    /// Burst in payload bytes (none when unlimited).
    pub burst_bytes: Option<u64>,
    /// Framing charged per segment.
    pub framing: String,
    /// One-way delay.
    pub delay: String,
    /// Line rate in bit/s (none when unlimited).
    pub line_rate_bits_per_second: Option<f64>,
    /// Payload rate after framing, in bit/s (none when unlimited).
    pub payload_rate_bits_per_second: Option<f64>,
}

/// A route as the API shows it.
#[derive(Debug, Serialize)]
pub struct RouteView {
    /// Name.
    pub name: String,
    /// Bound listen address.
    pub listen: String,
    /// Upstream as configured.
    pub upstream: String,
    /// The link in force.
    pub link: LinkView,
    /// The migration in progress, if any.
    pub migration: Option<ActiveView>,
}

fn link_view(r: &RouteHandle) -> LinkView {
    link_view_of(r.link.shape(), r.link.delay())
}

fn link_view_of(shape: crate::link::Shape, delay: std::time::Duration) -> LinkView {
    LinkView {
        link: shape.rate.to_string(),
        burst: shape.burst.to_string(),
        burst_bytes: shape.burst_payload_bytes(),
        framing: shape.framing.to_string(),
        delay: HumanDuration(delay).to_string(),
        line_rate_bits_per_second: shape.rate.bytes_per_second().map(|b| b * 8.0),
        payload_rate_bits_per_second: shape.framing.payload_rate(shape.rate),
    }
}

fn route_view(r: &RouteHandle) -> RouteView {
    RouteView {
        name: r.name.clone(),
        listen: r.local_addr.to_string(),
        upstream: r.upstream.clone(),
        link: link_view(r),
        migration: r.accounting.active(),
    }
}

impl ApiState {
    fn find(&self, name: &str) -> Result<&RouteHandle, ApiError> {
        self.routes.iter().find(|r| r.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.routes.iter().map(|r| r.name.as_str()).collect();
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no route named {name:?}; routes: {}", names.join(", ")),
            )
        })
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(given) = given else {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                format!(
                    "this server requires a token for changes: send Authorization: Bearer TOKEN (the CLI reads {TOKEN_ENV})"
                ),
            ));
        };
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError(StatusCode::UNAUTHORIZED, "wrong token".into()))
        }
    }
}

/// Compares without an early exit on the first differing byte (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

async fn routes(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    axum::Json(s.routes.iter().map(route_view).collect::<Vec<_>>())
}

async fn route(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(route_view(s.find(&name)?)))
}

async fn get_link(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(link_view(s.find(&name)?)))
}

async fn set_link(
    State(s): State<Arc<ApiState>>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    s.authorize(&headers)?;
    let Path(name) = name.map_err(rejected)?;
    let r = s.find(&name)?;
    let body = body.map_err(rejected)?;
    let update = parse_link_update(&body)?;
    let (shape, delay) = r.change_link(&update, "control API");
    // The answer shows this request's link, even if another change follows at once.
    let mut view = route_view(r);
    view.link = link_view_of(shape, delay);
    Ok(axum::Json(view))
}

/// An extractor's rejection (body too large, bad path or query) as a JSON error.
fn rejected(e: impl IntoResponse + std::fmt::Display) -> ApiError {
    let msg = e.to_string();
    let status = e.into_response().status();
    ApiError(status, msg)
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: reads are GET, changes are PUT /routes/{name}/link and PUT /fabric"
            .into(),
    )
}

/// `GET /fabric`: the fabric's settings and what is on it now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FabricApiView {
    /// Line rate as configured.
    pub rate: String,
    /// Framing charged per segment.
    pub framing: String,
    /// Burst as configured.
    pub burst: String,
    /// `share` or `refuse`.
    pub oversubscribe: String,
    /// Payload rate of the fabric, bit/s (per direction).
    pub payload_rate_bits_per_second: u64,
    /// Payload rate the routes with an active migration want together, bit/s.
    pub active_demand_bits_per_second: u64,
    /// Fabric payload rate left beside them, bit/s (negative: oversubscribed).
    pub headroom_bits_per_second: i64,
    /// Per direction: what the routes backlogged now want and the share each gets.
    pub directions: std::collections::BTreeMap<String, FabricDirectionView>,
    /// Every route of the server on the fabric.
    pub routes: Vec<FabricRouteView>,
}

/// One direction of the fabric now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FabricDirectionView {
    /// Sum of the backlogged routes' link payload rates, bit/s.
    pub backlogged_demand_bits_per_second: u64,
    /// The share of its link each backlogged route gets (1: all of it).
    pub scale: f64,
}

/// A route on the fabric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FabricRouteView {
    /// Route name.
    pub name: String,
    /// Its link's payload rate, bit/s (0: unlimited, never shared).
    pub link_payload_bits_per_second: u64,
    /// Whether it has an active migration counted against the fabric.
    pub active: bool,
    /// What it gets now towards the destination if backlogged, bit/s: its link, or its
    /// share of the fabric while the backlogged routes want more than the fabric.
    pub share_bits_per_second: u64,
}

fn fabric_view(v: &FabricView, routes: &[RouteHandle]) -> FabricApiView {
    use crate::link::Direction;
    FabricApiView {
        rate: v.config.shape.rate.to_string(),
        framing: v.config.shape.framing.to_string(),
        burst: v.config.shape.burst.to_string(),
        oversubscribe: v.config.oversubscribe.as_str().to_string(),
        payload_rate_bits_per_second: v.config.payload_bits(),
        active_demand_bits_per_second: v.active_bits(),
        headroom_bits_per_second: v.headroom_bits(),
        directions: Direction::ALL
            .iter()
            .map(|d| {
                (
                    d.as_str().to_string(),
                    FabricDirectionView {
                        backlogged_demand_bits_per_second: v.demand[d.index()].payload,
                        scale: v.scale(*d),
                    },
                )
            })
            .collect(),
        routes: routes
            .iter()
            .map(|r| {
                let payload = crate::link::fabric::Want::of(&r.link.shape()).payload;
                FabricRouteView {
                    name: r.name.clone(),
                    link_payload_bits_per_second: payload,
                    active: v.active.contains_key(&r.name),
                    share_bits_per_second: (payload as f64 * v.scale(Direction::ToDestination))
                        as u64,
                }
            })
            .collect(),
    }
}

impl ApiState {
    fn fabric(&self) -> Result<&Fabric, ApiError> {
        self.fabric.as_ref().map(|(f, _)| f).ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                "this server has no fabric; start it with --fabric RATE or a [fabric] table".into(),
            )
        })
    }
}

async fn get_fabric(State(s): State<Arc<ApiState>>) -> Result<impl IntoResponse, ApiError> {
    let f = s.fabric()?;
    Ok(axum::Json(fabric_view(&f.view(), &s.routes)))
}

async fn set_fabric(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    s.authorize(&headers)?;
    let f = s.fabric()?;
    let body = body.map_err(rejected)?;
    let _serial = s.fabric_change.lock().await;
    let old = f.config();
    let new = parse_fabric_update(&body, old)?;
    f.set(new);
    info!(
        origin = "control API",
        rate = %new.shape.rate,
        framing = %new.shape.framing,
        burst = %new.shape.burst,
        oversubscribe = new.oversubscribe.as_str(),
        previous_rate = %old.shape.rate,
        "fabric changed"
    );
    Ok(axum::Json(fabric_view(&f.view(), &s.routes)))
}

/// A `PUT` body's fields: a JSON object whose values are all strings (rates, durations,
/// names). Every error names the field and shows `example`.
fn string_fields(body: &[u8], example: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("body is not valid JSON ({e}); send e.g. {example}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!("body must be a JSON object, e.g. {example}"));
    };
    map.into_iter()
        .map(|(key, v)| match v {
            serde_json::Value::String(text) => Ok((key, text)),
            v => Err(format!(
                "field {key:?}: expected a string as in {example}, got {v}"
            )),
        })
        .collect()
}

/// `field "KEY": ERROR`, for a value that does not parse.
fn field_error(key: &str) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |e| format!("field {key:?}: {e}")
}

/// Parses a `PUT /fabric` body onto `old`; every error names the field.
pub fn parse_fabric_update(body: &[u8], old: FabricConfig) -> Result<FabricConfig, String> {
    let fields = string_fields(body, r#"{"rate":"10g","oversubscribe":"refuse"}"#)?;
    if fields.is_empty() {
        return Err(
            "nothing to change: give at least one of rate, burst, framing, oversubscribe".into(),
        );
    }
    let mut c = old;
    for (key, text) in &fields {
        let field = field_error(key);
        match key.as_str() {
            "rate" => c.shape.rate = text.parse::<LinkRate>().map_err(|e| field(&e))?,
            "burst" => c.shape.burst = text.parse::<Burst>().map_err(|e| field(&e))?,
            "framing" => c.shape.framing = text.parse::<Framing>().map_err(|e| field(&e))?,
            "oversubscribe" => {
                c.oversubscribe = text.parse::<Oversubscribe>().map_err(|e| field(&e))?
            }
            _ => {
                return Err(format!(
                    "unknown field {key:?}; the fields are rate, burst, framing, oversubscribe"
                ));
            }
        }
    }
    crate::config::check_fabric(&c)
        .map_err(|(key, value, reason)| format!("field {key:?} = {value:?}: {reason}"))?;
    Ok(c)
}

/// Parses a `PUT /routes/{name}/link` body; every error names the field.
pub fn parse_link_update(body: &[u8]) -> Result<LinkUpdate, String> {
    let mut u = LinkUpdate::default();
    for (key, text) in &string_fields(body, r#"{"link":"10g","burst":"4ms"}"#)? {
        let field = field_error(key);
        match key.as_str() {
            "link" => u.rate = Some(text.parse::<LinkRate>().map_err(|e| field(&e))?),
            "burst" => u.burst = Some(text.parse::<Burst>().map_err(|e| field(&e))?),
            "framing" => u.framing = Some(text.parse::<Framing>().map_err(|e| field(&e))?),
            "delay" => u.delay = Some(text.parse::<crate::spec::Delay>().map_err(|e| field(&e))?.0),
            _ => {
                return Err(format!(
                    "unknown field {key:?}; the fields are link, burst, delay, framing"
                ));
            }
        }
    }
    if u.is_empty() {
        return Err("nothing to change: give at least one of link, burst, delay, framing".into());
    }
    Ok(u)
}

impl From<String> for ApiError {
    fn from(msg: String) -> Self {
        bad_request(msg)
    }
}

#[derive(Debug, Deserialize)]
struct MigrationsQuery {
    route: Option<String>,
}

/// `GET /migrations`.
#[derive(Debug, Serialize)]
pub struct MigrationsView {
    /// In progress.
    pub active: Vec<ActiveView>,
    /// Recently finished, oldest first (per route, up to 32 each).
    pub recent: Vec<Record>,
}

async fn migrations(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<MigrationsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q.map_err(rejected)?;
    let selected: Vec<&RouteHandle> = match &q.route {
        Some(name) => vec![s.find(name)?],
        None => s.routes.iter().collect(),
    };
    let mut view = MigrationsView {
        active: selected
            .iter()
            .filter_map(|r| r.accounting.active())
            .collect(),
        recent: selected
            .iter()
            .flat_map(|r| r.accounting.recent())
            .collect(),
    };
    view.recent.sort_by(|a, b| a.end.cmp(&b.end));
    Ok(axum::Json(view))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_update_errors_name_the_field() {
        let u = parse_link_update(br#"{"link":"10g","delay":"1ms"}"#).unwrap();
        assert_eq!(u.rate, Some("10g".parse().unwrap()));
        assert_eq!(u.delay, Some(std::time::Duration::from_millis(1)));
        assert!(u.burst.is_none() && u.framing.is_none());
        for (body, needle) in [
            (&br#"{"link":"fast"}"#[..], "field \"link\""),
            (br#"{"burst":"-1ms"}"#, "field \"burst\""),
            (br#"{"framing":"token-ring"}"#, "field \"framing\""),
            (br#"{"delay":5}"#, "field \"delay\": expected a string"),
            (br#"{"speed":"1g"}"#, "unknown field \"speed\""),
            (br#"{"link":"1g""#, "not valid JSON"),
            (br#"["1g"]"#, "JSON object"),
            (br#"{}"#, "nothing to change"),
        ] {
            let e = parse_link_update(body).unwrap_err();
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
    }

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let c = ControlConfig {
            addr: "127.0.0.1:1".into(),
            token: Some("hunter2".into()),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
