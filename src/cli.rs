//! The command line, as plain clap data. Validation into a [`Config`] happens in
//! [`ServeArgs::into_config`], so `main.rs` stays a shell.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    CONTROL_URL_ENV, Config, ConfigError, ControlConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONTROL,
    DEFAULT_CONTROL_URL, DEFAULT_DRAIN_TIMEOUT, RouteConfig, TOKEN_ENV,
};
use crate::link::Shape;
use crate::spec::{Burst, Framing, HumanDuration, LinkRate};

/// migshaper: an inline TCP proxy for QEMU live migration that emulates a 1 Gb/s, 10 Gb/s
/// (or any) link and accounts the migration's bytes per phase.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy: one route from flags, or several from a TOML file.
    Serve(ServeArgs),
    /// Analyse captured migration streams offline (plain or .zst) and print the bytes per
    /// phase and QEMU's RAM counters.
    Inspect(InspectArgs),
    /// Replay a real QEMU migration (bundled, or a capture directory) through an
    /// in-process migshaper at 1 Gb/s and at 10 Gb/s and print both records side by side.
    Demo(DemoArgs),
    /// Show or change a running server's link (through its control API).
    #[command(subcommand)]
    Link(LinkCommand),
    /// Show a running server's routes, links and active migrations.
    Status(StatusArgs),
    /// Receive, discard and answer `migshaper probe` on the destination host.
    Sink(SinkArgs),
    /// Measure the path to a `migshaper sink` (throughput both ways, RTT idle and loaded)
    /// and say whether it carries each link with margin (exit 3 when one does not).
    Probe(ProbeArgs),
}

/// How to reach a running server's control API.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The server's control API.
    #[arg(
        long,
        env = CONTROL_URL_ENV,
        default_value = DEFAULT_CONTROL_URL
    )]
    pub control: String,
    /// Bearer token for changes (when the server was started with one).
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    pub control_token: Option<String>,
}

/// `migshaper link ...`
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Print the link in force on each route (or one).
    Get {
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The server to ask.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change the link of a route; open connections follow within a chunk, starting with
    /// an empty bucket.
    Set(LinkSetArgs),
    /// Apply a timed sequence of links, e.g. "1g for 60s, 10g for 60s".
    Schedule(ScheduleArgs),
}

/// `migshaper link set` arguments.
#[derive(Debug, Args)]
pub struct LinkSetArgs {
    /// New line rate: 1g, 10g, 2.5gbit, 100mbit, 125MB/s, unlimited.
    #[arg(value_name = "SPEC", required_unless_present_any = ["burst", "delay", "framing"])]
    pub link: Option<String>,
    /// The route (may be left out when the server has one route).
    #[arg(long)]
    pub route: Option<String>,
    /// New burst: a duration of line rate or bytes.
    #[arg(long)]
    pub burst: Option<String>,
    /// New one-way delay.
    #[arg(long)]
    pub delay: Option<String>,
    /// New framing: none | ethernet[:MTU].
    #[arg(long)]
    pub framing: Option<String>,
    /// The server to ask.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `migshaper link schedule` arguments.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Steps separated by commas: `SPEC for DURATION` (the last may omit `for ...`: it stays).
    #[arg(value_name = "STEPS", required_unless_present = "file")]
    pub steps: Option<String>,
    /// Read the steps from a file instead: one per line, `#` comments.
    #[arg(long, conflicts_with = "steps")]
    pub file: Option<PathBuf>,
    /// Run the whole sequence this many times.
    #[arg(long, default_value_t = 1, conflicts_with = "forever")]
    pub repeat: u32,
    /// Repeat until interrupted.
    #[arg(long)]
    pub forever: bool,
    /// The route (may be left out when the server has one route).
    #[arg(long)]
    pub route: Option<String>,
    /// The server to ask.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `migshaper status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Refresh until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval with --watch.
    #[arg(long, default_value = "1s")]
    pub interval: HumanDuration,
    /// Print the server's JSON (routes and migrations) instead of the table.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// The server to ask.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `migshaper demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// A capture directory (c0.s2d.bin[.zst], c0.d2s.bin[.zst]) instead of the bundled one,
    /// e.g. one recorded with `serve --capture DIR`.
    #[arg(long, value_name = "DIR")]
    pub capture: Option<PathBuf>,
    /// The links to compare, in order.
    #[arg(long, value_delimiter = ',', default_value = "1g,10g")]
    pub links: Vec<String>,
}

/// `migshaper inspect` arguments.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Capture of the main channel, source→destination bytes (`.zst`: zstd-compressed).
    #[arg(value_name = "CAPTURE")]
    pub capture: PathBuf,
    /// Capture of the main connection's destination→source bytes (the return path).
    #[arg(long, value_name = "FILE")]
    pub return_path: Option<PathBuf>,
    /// Captures of the multifd channels' source→destination bytes (one or more; the flag may
    /// be repeated).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub multifd: Vec<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `migshaper serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with [[route]] tables (name, listen, upstream, link, burst, framing, delay).
    #[arg(long, conflicts_with_all = ["listen", "upstream", "link", "burst", "framing", "delay", "name"])]
    pub config: Option<PathBuf>,
    /// Where the source QEMU connects: IP:PORT, [IPv6]:PORT or HOST:PORT.
    #[arg(long, required_unless_present = "config")]
    pub listen: Option<String>,
    /// The destination QEMU's migration port: HOST:PORT (resolved at each connect).
    #[arg(long, required_unless_present = "config")]
    pub upstream: Option<String>,
    /// Line rate: 1g, 10g, 2.5gbit, 100mbit, 125MB/s, 1.25GB/s, unlimited (decimal SI).
    #[arg(long, required_unless_present = "config")]
    pub link: Option<LinkRate>,
    /// Burst tolerance: a duration of line rate (default 1ms) or bytes (e.g. 125KB).
    #[arg(long)]
    pub burst: Option<Burst>,
    /// Per-segment overhead charged: none | ethernet[:MTU] (default ethernet:1500, so 1g
    /// carries ~941 Mb/s of payload like a real GbE link).
    #[arg(long)]
    pub framing: Option<Framing>,
    /// One-way propagation delay per direction, e.g. 250us, 5ms (default 0).
    #[arg(long)]
    pub delay: Option<crate::spec::Delay>,
    /// Route name for logs and metrics.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Upstream connect timeout.
    #[arg(long, default_value_t = HumanDuration(DEFAULT_CONNECT_TIMEOUT))]
    pub connect_timeout: HumanDuration,
    /// TCP keepalive on both sides of each connection: a peer that vanished (host crash,
    /// cable pulled) is noticed after about this long without traffic, and the other side
    /// is closed. 0 turns it off.
    #[arg(long, default_value_t = HumanDuration(crate::config::DEFAULT_KEEPALIVE))]
    pub keepalive: HumanDuration,
    /// How long open connections may finish after SIGINT/SIGTERM before they are closed.
    #[arg(long, default_value_t = HumanDuration(DEFAULT_DRAIN_TIMEOUT))]
    pub drain_timeout: HumanDuration,
    /// Append one JSON line per finished migration to this file.
    #[arg(long)]
    pub records: Option<PathBuf>,
    /// Forward and shape only: do not parse the QEMU stream (no phases, no records).
    #[arg(long, conflicts_with = "config")]
    pub no_parse: bool,
    /// Always copy the bytes through user space, never splice(2) them (for comparisons, or
    /// a kernel whose splice misbehaves).
    #[arg(long, conflicts_with = "config")]
    pub no_zero_copy: bool,
    /// Let the kernel pace the forwarded sockets at the link's rate (SO_MAX_PACING_RATE)
    /// and the link run up to 4 ms ahead of it, so that late wake-ups cost less; smoother
    /// for one stream on a quiet host, burstier on a busy one (see docs/design.md).
    #[arg(long, conflicts_with = "config")]
    pub kernel_pacing: bool,
    /// Write every connection's bytes to DIR/c<N>.s2d.bin and DIR/c<N>.d2s.bin (N in
    /// accept order; DIR/<route>/ with several routes), e.g. to record captures for
    /// `migshaper inspect`.
    #[arg(long, value_name = "DIR")]
    pub capture: Option<PathBuf>,
    /// Connections a route keeps open at once; more are refused (logged and counted).
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_CONNECTIONS, conflicts_with = "config")]
    pub max_connections: usize,
    /// Control API (HTTP/JSON: metrics, routes, live link changes) address, or `off`.
    #[arg(long, value_name = "ADDR|off", default_value = DEFAULT_CONTROL)]
    pub control: String,
    /// Token required for changes through the control API (needed when --control is not
    /// a loopback address).
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    pub control_token: Option<String>,
    /// A fabric budget every route also draws from, per direction (e.g. 10gbit): when the
    /// backlogged routes' links together want more, they share it in proportion to their
    /// rates. Overrides a config file's `[fabric]` rate. Default: none.
    #[arg(long, value_name = "RATE")]
    pub fabric: Option<LinkRate>,
}

impl ServeArgs {
    fn control_config(&self) -> Option<ControlConfig> {
        (!self.control.eq_ignore_ascii_case("off")).then(|| ControlConfig {
            addr: self.control.clone(),
            token: self.control_token.clone(),
        })
    }

    /// Validates the flags (or loads the file they name) into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut c = self.routes_config()?;
        if let Some(rate) = self.fabric {
            // The flag sets the rate; a file's framing, burst and oversubscribe stay.
            let mut f = c
                .fabric
                .unwrap_or_else(|| crate::link::fabric::FabricConfig::new(rate));
            f.shape.rate = rate;
            c.fabric = Some(f);
            c.validate(if self.config.is_some() {
                "--fabric"
            } else {
                "command line"
            })?;
        }
        Ok(c)
    }

    fn routes_config(&self) -> Result<Config, ConfigError> {
        let timeouts = |c: &mut Config| {
            c.connect_timeout = self.connect_timeout.0;
            c.drain_timeout = self.drain_timeout.0;
            c.keepalive = self.keepalive.0;
        };
        if let Some(path) = &self.config {
            let mut c = Config::from_file(path)?;
            // Flags given explicitly win over the file; defaults do not override it.
            if self.connect_timeout.0 != DEFAULT_CONNECT_TIMEOUT {
                c.connect_timeout = self.connect_timeout.0;
            }
            if self.drain_timeout.0 != DEFAULT_DRAIN_TIMEOUT {
                c.drain_timeout = self.drain_timeout.0;
            }
            if self.keepalive.0 != crate::config::DEFAULT_KEEPALIVE {
                c.keepalive = self.keepalive.0;
            }
            if self.records.is_some() {
                c.records = self.records.clone();
            }
            c.capture = self.capture.clone();
            c.control = self.control_config();
            return Ok(c);
        }
        // clap enforces presence; these defaults are never used.
        let route = RouteConfig {
            name: self.name.clone(),
            listen: self.listen.clone().unwrap_or_default(),
            upstream: self.upstream.clone().unwrap_or_default(),
            shape: Shape {
                rate: self.link.unwrap_or(LinkRate::Unlimited),
                burst: self.burst.unwrap_or(Burst::DEFAULT),
                framing: self.framing.unwrap_or(Framing::DEFAULT),
            },
            delay: self.delay.unwrap_or_default().0,
            parse: !self.no_parse,
            zero_copy: !self.no_zero_copy,
            kernel_pacing: self.kernel_pacing,
            max_connections: self.max_connections,
        };
        let mut c = Config {
            routes: vec![route],
            connect_timeout: Duration::ZERO,
            keepalive: Duration::ZERO,
            drain_timeout: Duration::ZERO,
            source: None,
            records: self.records.clone(),
            capture: self.capture.clone(),
            control: self.control_config(),
            fabric: None,
        };
        timeouts(&mut c);
        c.validate("command line")?;
        Ok(c)
    }
}

/// `migshaper sink` arguments.
#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Where probes connect: IP:PORT, [IPv6]:PORT or HOST:PORT (port 0: any free port; the
    /// bound address is logged as `sink listening on ADDR`).
    #[arg(long)]
    pub listen: String,
    /// How long a connection may take to send its probe handshake.
    #[arg(long, hide = true, default_value_t = HumanDuration(crate::probe::DEFAULT_HANDSHAKE_TIMEOUT))]
    pub handshake_timeout: HumanDuration,
}

impl SinkArgs {
    /// The sink's options.
    pub fn options(&self) -> crate::probe::SinkOptions {
        crate::probe::SinkOptions {
            listen: self.listen.clone(),
            handshake_timeout: self.handshake_timeout.0,
        }
    }
}

/// `migshaper probe` arguments.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The sink: HOST:PORT (`migshaper sink --listen` on the destination host).
    #[arg(value_name = "DEST:PORT")]
    pub target: String,
    /// Seconds per measurement (each stream count, each direction), at most 60.
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// Stream counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub streams: Vec<usize>,
    /// Judge every route of this `migshaper serve --config` file.
    #[arg(long, conflicts_with_all = ["link", "framing"])]
    pub config: Option<PathBuf>,
    /// Judge this link (repeatable; named link1, link2, ...): 1g, 10g, 2.5gbit, 125MB/s.
    #[arg(long, value_name = "SPEC")]
    pub link: Vec<LinkRate>,
    /// Framing of the --link specs: none | ethernet[:MTU] (default ethernet:1500).
    #[arg(long)]
    pub framing: Option<Framing>,
    /// Print one JSON object instead of the table and verdicts.
    #[arg(long)]
    pub json: bool,
    /// Connect and handshake timeout.
    #[arg(long, hide = true, default_value_t = HumanDuration(crate::probe::DEFAULT_HANDSHAKE_TIMEOUT))]
    pub handshake_timeout: HumanDuration,
}

impl ProbeArgs {
    /// The probe's options.
    pub fn options(&self) -> crate::probe::ProbeOptions {
        use crate::probe::{LinkSource, ProbeOptions};
        ProbeOptions {
            target: self.target.clone(),
            secs: self.secs,
            streams: self.streams.clone(),
            links: match &self.config {
                Some(path) => LinkSource::Config(path.clone()),
                None => {
                    LinkSource::Specs(self.link.clone(), self.framing.unwrap_or(Framing::DEFAULT))
                }
            },
            handshake_timeout: self.handshake_timeout.0,
        }
    }
}
