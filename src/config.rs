//! Validated configuration: what `serve` runs, from flags or from a TOML file.
//!
//! Two stages, as in ripgrep's low/high args: the CLI (`cli.rs`) and the TOML schema below
//! are plain data; [`Config`] holds only validated values (parsed rates, checked addresses,
//! unique names and listen addresses). Every error names the file, the key and the value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::link::Shape;
use crate::link::fabric::FabricConfig;
use crate::spec::{Burst, Delay, Framing, HumanDuration, LinkRate};

/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time open connections get to finish after SIGINT/SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default TCP keepalive: a peer that vanished is noticed within a minute. Live peers
/// answer the probes, so an idle migration (post-copy paused, a stopped guest) is never cut;
/// the kernel's own default (2 h 11 min) would leave the other side hanging.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);

/// The default control API address (`serve --control`).
pub const DEFAULT_CONTROL: &str = "127.0.0.1:9464";
/// Environment variable holding the control token (server and CLI).
pub const TOKEN_ENV: &str = "MIGSHAPER_CONTROL_TOKEN";
/// Environment variable holding the control API URL the client subcommands use.
pub const CONTROL_URL_ENV: &str = "MIGSHAPER_CONTROL";
/// The default control API URL the client subcommands use (`--control`).
pub const DEFAULT_CONTROL_URL: &str = "http://127.0.0.1:9464";

/// Where the control API listens and the token writes need.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ControlConfig {
    /// `IP:PORT` to listen on.
    pub addr: String,
    /// Bearer token required for writes, if any.
    pub token: Option<String>,
}

impl std::fmt::Debug for ControlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("ControlConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// A configuration problem, found before anything listens.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, bad value).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line, column, key and value.
        message: String,
    },
    /// A key holds a value that parses but is not acceptable.
    #[error("{origin}: route {route:?}: key `{key}` = {value:?}: {reason}")]
    Invalid {
        /// The file, or `command line`.
        origin: String,
        /// The route's name.
        route: String,
        /// The key.
        key: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The `[fabric]` table (or `--fabric`) holds a value that parses but is not acceptable.
    #[error("{origin}: fabric: key `{key}` = {value:?}: {reason}")]
    Fabric {
        /// The file, or `command line`.
        origin: String,
        /// The key.
        key: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The file defines no route.
    #[error(
        "{0}: no routes defined: add at least one [[route]] table with name, listen, upstream and link"
    )]
    NoRoutes(String),
}

/// One route: a listening address, the upstream every accepted connection is forwarded
/// to, and the link emulated between them.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Unique name, used in logs, metrics and the control API.
    pub name: String,
    /// Where source QEMUs connect: `IP:PORT` (or a host name resolved at start-up).
    pub listen: String,
    /// The destination: `HOST:PORT` or `IP:PORT`, resolved at each connect.
    pub upstream: String,
    /// Rate, burst and framing of the emulated link.
    pub shape: Shape,
    /// One-way propagation delay per direction.
    pub delay: Duration,
    /// Parse the QEMU stream and account migrations (`parse = false`: forward and shape
    /// only).
    pub parse: bool,
    /// Forward with splice(2) while nothing looks at the bytes (`zero_copy = false`:
    /// always copy through user space; for comparisons, or a kernel whose splice misbehaves).
    pub zero_copy: bool,
    /// Let the kernel pace the forwarded sockets at the link's rate (`SO_MAX_PACING_RATE`)
    /// and the bucket run up to `link::PACED_LEAD` ahead of it (`kernel_pacing = true`;
    /// off by default: see docs/design.md for what it measured).
    pub kernel_pacing: bool,
    /// Connections open at once (accepted and not yet closed); more are refused.
    pub max_connections: usize,
}

/// Default per-route connection limit: QEMU opens at most 1 main + 255 multifd + 1 preempt
/// channels per migration; 1024 leaves room for several migrations and stray clients while
/// bounding file descriptors (2 sockets per connection, 4 more for zero-copy pipes) well
/// under the raised RLIMIT_NOFILE.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Everything `serve` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The routes, in file order.
    pub routes: Vec<RouteConfig>,
    /// Timeout for each upstream connect.
    pub connect_timeout: Duration,
    /// TCP keepalive on both sides of every connection: a vanished peer is noticed after
    /// about this long without traffic. Zero: off.
    pub keepalive: Duration,
    /// How long open connections may drain after a shutdown signal.
    pub drain_timeout: Duration,
    /// The file the routes came from, if any (re-read on SIGHUP).
    pub source: Option<PathBuf>,
    /// Where finished migrations are appended as JSON lines, if anywhere.
    pub records: Option<PathBuf>,
    /// Where each connection's bytes are written (`serve --capture`), if anywhere.
    pub capture: Option<PathBuf>,
    /// The control API, if enabled.
    pub control: Option<ControlConfig>,
    /// The fabric budget every route also draws from, if any.
    pub fabric: Option<FabricConfig>,
}

// === TOML schema ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    connect_timeout: Option<HumanDuration>,
    keepalive: Option<HumanDuration>,
    drain_timeout: Option<HumanDuration>,
    records: Option<PathBuf>,
    fabric: Option<FileFabric>,
    #[serde(default)]
    route: Vec<FileRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFabric {
    rate: LinkRate,
    burst: Option<Burst>,
    framing: Option<Framing>,
    oversubscribe: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: String,
    listen: String,
    upstream: String,
    link: LinkRate,
    burst: Option<Burst>,
    framing: Option<Framing>,
    delay: Option<Delay>,
    parse: Option<bool>,
    zero_copy: Option<bool>,
    kernel_pacing: Option<bool>,
    max_connections: Option<usize>,
}

impl Config {
    /// Reads and validates a TOML config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let origin = path.display().to_string();
        if file.route.is_empty() {
            return Err(ConfigError::NoRoutes(origin));
        }
        let fabric = file
            .fabric
            .map(|f| -> Result<FabricConfig, ConfigError> {
                let mut c = FabricConfig::new(f.rate);
                c.shape.burst = f.burst.unwrap_or(Burst::DEFAULT);
                c.shape.framing = f.framing.unwrap_or(Framing::DEFAULT);
                if let Some(o) = f.oversubscribe {
                    c.oversubscribe = o.parse().map_err(|reason| ConfigError::Fabric {
                        origin: origin.clone(),
                        key: "oversubscribe",
                        value: o.clone(),
                        reason,
                    })?;
                }
                Ok(c)
            })
            .transpose()?;
        let routes = file
            .route
            .into_iter()
            .map(|r| RouteConfig {
                name: r.name,
                listen: r.listen,
                upstream: r.upstream,
                shape: Shape {
                    rate: r.link,
                    burst: r.burst.unwrap_or(Burst::DEFAULT),
                    framing: r.framing.unwrap_or(Framing::DEFAULT),
                },
                delay: r.delay.unwrap_or_default().0,
                parse: r.parse.unwrap_or(true),
                zero_copy: r.zero_copy.unwrap_or(true),
                kernel_pacing: r.kernel_pacing.unwrap_or(false),
                max_connections: r.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            })
            .collect();
        let config = Config {
            routes,
            connect_timeout: file
                .connect_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            keepalive: file.keepalive.map_or(DEFAULT_KEEPALIVE, |d| d.0),
            drain_timeout: file.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
            source: Some(path.to_path_buf()),
            records: file.records,
            capture: None,
            control: None,
            fabric,
        };
        config.validate(&origin)?;
        Ok(config)
    }

    /// Checks names, addresses and uniqueness. `origin` names the file or `command line`.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if let Some(f) = &self.fabric {
            check_fabric(f).map_err(|(key, value, reason)| ConfigError::Fabric {
                origin: origin.to_string(),
                key,
                value,
                reason,
            })?;
        }
        let mut names: HashMap<&str, ()> = HashMap::new();
        let mut listens: HashMap<SocketAddr, &str> = HashMap::new();
        for r in &self.routes {
            let invalid = |key, value: &str, reason: String| ConfigError::Invalid {
                origin: origin.to_string(),
                route: r.name.clone(),
                key,
                value: value.to_string(),
                reason,
            };
            let name_ok = !r.name.is_empty()
                && r.name.len() <= 64
                && r.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !name_ok {
                return Err(invalid(
                    "name",
                    &r.name,
                    "use 1-64 characters from [A-Za-z0-9._-]".into(),
                ));
            }
            if names.insert(&r.name, ()).is_some() {
                return Err(invalid("name", &r.name, "duplicate route name".into()));
            }
            let listen =
                parse_listen(&r.listen).map_err(|reason| invalid("listen", &r.listen, reason))?;
            if listen.port() != 0 {
                if let Some(other) = listens.insert(listen, &r.name) {
                    return Err(invalid(
                        "listen",
                        &r.listen,
                        format!("duplicate listen address, also used by route {other:?}"),
                    ));
                }
            }
            check_host_port(&r.upstream)
                .map_err(|reason| invalid("upstream", &r.upstream, reason))?;
            if r.max_connections == 0 {
                return Err(invalid(
                    "max_connections",
                    "0",
                    "must be at least 1 (QEMU needs one connection per channel)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a fabric's settings; on error, the key, its value and the reason.
pub fn check_fabric(f: &FabricConfig) -> Result<(), (&'static str, String, String)> {
    if f.shape.rate == LinkRate::Unlimited {
        return Err((
            "rate",
            f.shape.rate.to_string(),
            "a fabric needs a rate (e.g. 10gbit); leave the fabric out for none".into(),
        ));
    }
    if f.payload_bits() == 0 {
        return Err((
            "framing",
            f.shape.framing.to_string(),
            "the fabric carries no payload at this rate and framing; raise the rate".into(),
        ));
    }
    Ok(())
}

/// Parses a listen address: `IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT` resolved now.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    check_host_port(s)?;
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "resolves to no address".to_string())
}

/// Checks the syntax of `HOST:PORT`, `IP:PORT` or `[IPv6]:PORT` without resolving it.
pub fn check_host_port(s: &str) -> Result<(), String> {
    const HELP: &str = "expected HOST:PORT, IPv4:PORT or [IPv6]:PORT, e.g. 10.0.0.2:4444";
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| HELP.to_string())?;
    port.parse::<u16>()
        .map_err(|_| format!("bad port {port:?}: {HELP}"))?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !host_ok {
        return Err(format!("bad host {host:?}: {HELP}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    const ONE: &str = r#"
        [[route]]
        name = "gige"
        listen = "127.0.0.1:4444"
        upstream = "dest.example:4444"
        link = "1g"
    "#;

    #[test]
    fn defaults_apply() {
        let c = load(ONE).unwrap();
        let r = &c.routes[0];
        assert_eq!(r.shape.burst, Burst::DEFAULT);
        assert_eq!(r.shape.framing, Framing::DEFAULT);
        assert_eq!(r.delay, Duration::ZERO);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = load(&format!("{ONE}\nspeed = \"1g\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml") && e.contains("speed"), "{e}");
    }

    #[test]
    fn bad_link_names_file_line_and_value() {
        let e = load(&ONE.replace("\"1g\"", "\"1q\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains("1q") && e.contains("link"),
            "{e}"
        );
        assert!(e.contains("2.5gbit"), "lists valid forms: {e}");
    }

    #[test]
    fn bad_addresses() {
        for (key, bad) in [
            ("listen", "127.0.0.1"),
            ("listen", "127.0.0.1:99999"),
            ("upstream", "dest example:1"),
            ("upstream", "dest:"),
        ] {
            let text = match key {
                "listen" => ONE.replace("127.0.0.1:4444", bad),
                _ => ONE.replace("dest.example:4444", bad),
            };
            let e = load(&text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains(bad) && e.contains("test.toml"),
                "{e}"
            );
        }
    }

    #[test]
    fn duplicate_listen_and_names() {
        let two = format!("{ONE}{}", ONE.replace("gige", "other"));
        let e = load(&two).unwrap_err().to_string();
        assert!(e.contains("duplicate listen") && e.contains("gige"), "{e}");
        let two = format!(
            "{ONE}{}",
            ONE.replace("4444\"\n        upstream", "4445\"\n        upstream")
        );
        let e = load(&two).unwrap_err().to_string();
        assert!(e.contains("duplicate route name"), "{e}");
    }

    #[test]
    fn ipv6_and_hosts() {
        assert!(check_host_port("[::1]:4444").is_ok());
        assert!(check_host_port("dest-1.lab:4444").is_ok());
        assert!(check_host_port("::1:4444").is_err());
        assert_eq!(parse_listen("[::1]:0").unwrap().to_string(), "[::1]:0");
        assert_eq!(parse_listen("localhost:0").unwrap().port(), 0);
    }

    #[test]
    fn empty_file_says_what_to_add() {
        let e = load("").unwrap_err().to_string();
        assert!(e.contains("[[route]]"), "{e}");
    }
}
