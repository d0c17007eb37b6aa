//! The core benchmark: how accurately and cheaply migshaper emulates a link.
//!
//! One invocation runs, interleaved round by round, direct loopback, migshaper unlimited,
//! 1g and 10g (`--framing none`), each with 1 and 4 bulk streams, and 1g and 10g again with
//! the zero-copy path off (`zero_copy = false`: every chunk copied through user space, as
//! for a QEMU stream that is parsed). Every run also measures
//! the post-copy pattern: a 64-byte ping sent every 10 ms by the receiver on the reverse
//! direction of bulk stream 0 and answered inside the bulk stream, and the same ping-pong
//! on a second, otherwise idle connection of the same route. migshaper runs as its own
//! process (the real binary), so its CPU time is read from /proc.
//!
//! Beside each migshaper row's measured mean it prints the fidelity the link itself reported
//! for the run (carried / (carried + shortfall) of the route's `to_destination` direction,
//! from `GET /metrics` before and after), whether the two agree within 1 %, and the
//! shortfall by cause (`late`: the link's own wake-ups later than the burst absorbs;
//! `destination`: the receiving side not taking the bytes), each as a share of the link time
//! the run needed.
//!
//! Each row also shows the host's side of the run: TCP retransmissions in this network
//! namespace (and how many the receivers reported as needless), and the share of the VM's
//! CPU time the hypervisor took (steal, from /proc/stat; worst round). A run with more than
//! 1 % stolen is flagged: a descheduled vCPU is a late wake-up and a receiver that does not
//! read, whatever the shaper does.
//!
//! Below the table it judges every shaped row against the link's targets, from the same run:
//! mean/target in [0.995, 1.005], the highest 100 ms window within 1 + burst/100 ms, and CPU
//! per Gb/s within 2× the unshaped path's at 1g and 1.5× at 10g. A rate is judged only where
//! direct loopback carried twice it and the hypervisor stole at most 1 % of the CPU time in
//! every round of the row; the unshaped migshaper row's rate is printed beside, the proxied
//! path's own ceiling on the host.
//!
//! As root with iproute2, one more row is the kernel's reference: "tc tbf 1gbit (veth)", the
//! same load over a veth pair into a network namespace the bench creates (and removes),
//! shaped by tbf on both ends. tbf counts 1514 bytes per 1448-byte segment, so its target
//! is the payload rate 1e9 × 1448/1514.
//!
//! Run: `cargo bench --bench link` (options: `-- --secs 3 --rounds 3 --burst 1ms
//! --realtime 10 --only "migshaper 1g,tc tbf"`).
//! Prints a Markdown table; figures are means over rounds.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{Spawned, cpu_ticks, fixtures, migshaper};
use migshaper::host::CpuTimes;

#[path = "../tests/common/mod.rs"]
mod common;

#[derive(Parser, Debug)]
struct Args {
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Rounds; each round runs every configuration once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// migshaper's --burst for the shaped routes.
    #[arg(long, default_value = "1ms")]
    burst: String,
    /// Run migshaper at SCHED_FIFO priority PRIO (through `chrt -f`; root), as a host
    /// shared with busy neighbours should (0: normal priority).
    #[arg(long, default_value_t = 0, value_name = "PRIO")]
    realtime: u8,
    /// Only run configurations whose name contains one of these (comma-separated).
    #[arg(long)]
    only: Option<String>,
    /// Ignored (cargo bench passes it).
    #[arg(long)]
    bench: bool,
}

/// Application record size of the bulk senders: QEMU's QEMUFile buffer is 32 KiB.
const RECORD: usize = 32 * 1024;
const PING_EVERY: Duration = Duration::from_millis(10);
const TAG_BULK: u8 = 0;
const TAG_PONG: u8 = 1;

/// The counters of the link's own ledger (payload bytes carried, bytes of link time lost).
const CARRIED: &str = "migshaper_link_carried_bytes_total";
const SHORTFALL: &str = "migshaper_link_shortfall_bytes_total";
/// The reference row: tbf on a veth pair, and the payload rate it carries.
const TC_ROW: &str = "tc tbf 1gbit (veth)";
const TC_PAYLOAD_RATE: f64 = 1e9 * 1448.0 / 1514.0;
/// The veth pair's addresses: this namespace's end, the bench namespace's end.
const TC_LOCAL: &str = "10.77.1.1";
const TC_REMOTE: &str = "10.77.1.2";

/// Routes of the migshaper under test: name, link, parse, zero copy, kernel pacing.
const ROUTES: [(&str, &str, bool, bool, bool); 9] = [
    ("unlimited", "unlimited", true, true, false),
    ("g1", "1g", true, true, false),
    ("g10", "10g", true, true, false),
    ("unlimited-noparse", "unlimited", false, true, false),
    ("g10-noparse", "10g", false, true, false),
    // The same links with the copy path only, for the zero-copy comparison.
    ("g1-copy", "1g", true, false, false),
    ("g10-copy", "10g", true, false, false),
    // The same links paced by the kernel (`kernel_pacing = true`), for that comparison.
    ("g1-kernel", "1g", true, true, true),
    ("g10-kernel", "10g", true, true, true),
];

#[derive(Clone)]
struct Target {
    name: &'static str,
    /// Line rate in bits/s (None: no target).
    rate: Option<f64>,
    /// The migshaper route it goes through (None: no proxy).
    route: Option<&'static str>,
    /// Where clients connect.
    addr: SocketAddr,
    /// The sink listener behind it.
    sink: Arc<TcpListener>,
    /// Replay a real QEMU migration stream, one migration per connection, instead of the
    /// synthetic bulk records (for the parsing-cost comparison).
    replay: bool,
}

#[derive(Default, Clone)]
struct RunResult {
    gbps: f64,
    /// Highest 100 ms window by socket arrival time, over the target (or the mean).
    max_window: f64,
    /// The same by the receiving thread's read time (includes its scheduling noise).
    max_window_read: f64,
    first_window: f64,
    conn_min_over_mean: f64,
    ping_inband: Vec<f64>,
    ping_second: Vec<f64>,
    cpu_pct: f64,
    /// What the route's link reported for its `to_destination` direction during the run
    /// (None: no proxy, or the binary exports no ledger).
    ledger: Option<Ledger>,
    /// Host-wide TCP retransmissions during the run (this network namespace), and how many
    /// of them the receiver reported as needless (DSACKs): on loopback those come from
    /// reordering, which cuts the sending connection's window like a loss would.
    retrans: Option<TcpRetrans>,
    /// Share of the VM's CPU time the hypervisor ran something else during the run (steal,
    /// from /proc/stat): a vCPU descheduled under a running shaper is a late wake-up and a
    /// receiver that does not read, whatever the shaper does.
    steal: Option<f64>,
}

/// Above this share of stolen CPU time a run measured the hypervisor as much as the link:
/// the threshold above which a migration's low-fidelity warning names the host.
const STEAL_LIMIT: f64 = migshaper::migration::STOLEN_WARN_ABOVE;

/// Deltas of `RetransSegs` (`/proc/net/snmp`) and `TCPDSACKRecv` (`/proc/net/netstat`).
#[derive(Default, Clone, Copy, Debug)]
struct TcpRetrans {
    segments: u64,
    needless: u64,
}

impl TcpRetrans {
    /// The counters now; None where /proc does not have them.
    fn now() -> Option<TcpRetrans> {
        Some(TcpRetrans {
            segments: proc_counter("/proc/net/snmp", "Tcp:", "RetransSegs")?,
            needless: proc_counter("/proc/net/netstat", "TcpExt:", "TCPDSACKRecv")?,
        })
    }

    fn since(&self, before: &TcpRetrans) -> TcpRetrans {
        TcpRetrans {
            segments: self.segments.saturating_sub(before.segments),
            needless: self.needless.saturating_sub(before.needless),
        }
    }
}

/// One counter of a /proc/net table: a header line and a value line share `prefix`.
fn proc_counter(path: &str, prefix: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = names.split_whitespace().position(|n| n == name) {
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

/// A link direction's own account over some runs, in payload bytes: what it carried, and
/// the link time it lost, by cause (`late`: its wake-ups came later than the burst absorbs;
/// `destination`: the receiving side did not take the bytes; `other`: any other cause).
#[derive(Default, Clone, Copy, Debug, PartialEq)]
struct Ledger {
    carried: f64,
    late: f64,
    destination: f64,
    other: f64,
}

impl Ledger {
    fn shortfall(&self) -> f64 {
        self.late + self.destination + self.other
    }

    fn minus(&self, before: &Ledger) -> Ledger {
        Ledger {
            carried: self.carried - before.carried,
            late: self.late - before.late,
            destination: self.destination - before.destination,
            other: self.other - before.other,
        }
    }

    fn plus(&self, o: &Ledger) -> Ledger {
        Ledger {
            carried: self.carried + o.carried,
            late: self.late + o.late,
            destination: self.destination + o.destination,
            other: self.other + o.other,
        }
    }

    /// carried / (carried + shortfall); None before the link carried anything.
    fn fidelity(&self) -> Option<f64> {
        (self.carried > 0.0).then(|| self.carried / (self.carried + self.shortfall()))
    }

    /// Each cause's share of the link time the run needed (carried + shortfall), as
    /// "late 1.2 %, destination 0.1 %" (other causes only when present).
    fn causes(&self) -> String {
        let whole = self.carried + self.shortfall();
        let share = |v: f64| if whole > 0.0 { v / whole * 100.0 } else { 0.0 };
        let mut s = format!(
            "late {:.2} %, destination {:.2} %",
            share(self.late),
            share(self.destination)
        );
        if self.other > 0.0 {
            s.push_str(&format!(", other {:.2} %", share(self.other)));
        }
        s
    }
}

fn main() {
    let args = Args::parse();
    let sinks: Vec<Arc<TcpListener>> = (0..=ROUTES.len())
        .map(|_| Arc::new(TcpListener::bind("127.0.0.1:0").expect("bind sink")))
        .collect();
    let (migshaper, routes) = start_migshaper(&args, &sinks[1..]);
    let pid = migshaper.pid();
    let control = migshaper.control;
    let target = |name, rate, i: usize, replay| Target {
        name,
        rate,
        route: (i > 0).then(|| ROUTES[i - 1].0),
        addr: if i == 0 {
            sinks[0].local_addr().unwrap()
        } else {
            routes[i - 1]
        },
        sink: sinks[i].clone(),
        replay,
    };
    let mut targets = vec![
        target("direct loopback", None, 0, false),
        target("migshaper unlimited", None, 1, false),
        target("migshaper 1g", Some(1e9), 2, false),
        target("migshaper 10g", Some(10e9), 3, false),
        target("migshaper 1g, copy path", Some(1e9), 6, false),
        target("migshaper 10g, copy path", Some(10e9), 7, false),
        target("migshaper 1g, kernel pacing", Some(1e9), 8, false),
        target("migshaper 10g, kernel pacing", Some(10e9), 9, false),
        target("QEMU stream: unlimited, parsing on", None, 1, true),
        target("QEMU stream: unlimited, parsing off", None, 4, true),
        target("QEMU stream: 1g, parsing on", Some(1e9), 2, true),
        target("QEMU stream: 10g, parsing on", Some(10e9), 3, true),
        target("QEMU stream: 10g, parsing off", Some(10e9), 5, true),
    ];
    let selected = |name: &str| {
        args.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|o| name.contains(o)))
    };
    // The kernel's reference link, when this bench may build one.
    let mut tc_link = None;
    let mut tc_skipped = None;
    if selected(TC_ROW) {
        match TcLink::create() {
            Ok((link, sink)) => {
                targets.push(Target {
                    name: TC_ROW,
                    rate: Some(TC_PAYLOAD_RATE),
                    route: None,
                    addr: sink.local_addr().unwrap(),
                    sink: Arc::new(sink),
                    replay: false,
                });
                tc_link = Some(link);
            }
            Err(why) => {
                eprintln!("{TC_ROW}: skipped: {why}");
                tc_skipped = Some(why);
            }
        }
    }
    let capture = Arc::new(load_capture());
    let mut configs = Vec::new();
    for t in &targets {
        for streams in if t.replay {
            &[1usize][..]
        } else {
            &[1usize, 4][..]
        } {
            let streams = *streams;
            if args
                .only
                .as_deref()
                .is_none_or(|o| o.split(',').any(|o| t.name.contains(o)))
            {
                configs.push((t.clone(), streams));
            }
        }
    }
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); configs.len()];
    let mut flushed = true;
    for round in 0..args.rounds {
        for (i, (t, streams)) in configs.iter().enumerate() {
            flushed &= forget_loopback_tcp_metrics();
            if let Some(link) = &tc_link {
                link.forget_tcp_metrics();
            }
            let before = t.route.and_then(|r| link_ledger(control, r));
            let retrans_before = TcpRetrans::now();
            let steal_before = CpuTimes::now();
            let mut r = if t.replay {
                run_replay(t, &capture, args.secs, pid)
            } else {
                run(t, *streams, args.secs, t.route.map(|_| pid))
            };
            // A route's counters appear with its first carried byte.
            r.ledger = t.route.and_then(|route| {
                let after = link_ledger(control, route)?;
                Some(after.minus(&before.unwrap_or_default()))
            });
            r.retrans = TcpRetrans::now()
                .zip(retrans_before)
                .map(|(a, b)| a.since(&b));
            r.steal = CpuTimes::stolen_between(steal_before, CpuTimes::now());
            eprintln!(
                "round {} {:>20} x{}: {:.3} Gb/s, fidelity {}, max100 {:.3}, first100 {:.3}, ping {:.2}/{:.2} ms, retrans {}, steal {}",
                round + 1,
                t.name,
                streams,
                r.gbps,
                ledger(std::slice::from_ref(&r))
                    .and_then(|l| Some(format!("{:.4} ({})", l.fidelity()?, l.causes())))
                    .unwrap_or_else(|| "n/a".into()),
                r.max_window,
                r.first_window,
                pct(&r.ping_inband, 50.0),
                pct(&r.ping_second, 50.0),
                r.retrans.map_or("n/a".into(), |x| format!(
                    "{} ({} needless)",
                    x.segments, x.needless
                )),
                r.steal
                    .map_or("n/a".into(), |x| format!("{:.1} %", x * 100.0))
            );
            results[i].push(r);
        }
    }
    drop(migshaper);
    drop(tc_link);
    if !flushed {
        eprintln!(
            "WARNING: could not flush the kernel's cached TCP metrics for 127.0.0.0/8 \
             (`ip tcp_metrics flush` needs root and iproute2): each run inherited the \
             reordering and cwnd the runs before it left, which inflates the senders' socket \
             buffers and the in-band ping (see docs/design.md, \"Cached TCP metrics\")"
        );
    }
    print_table(&args, &configs, &results);
    if let Some(why) = tc_skipped {
        println!("\n{TC_ROW}: skipped: {why}");
    }
    print_ping_check(&configs, &results);
    print_targets(&args, &configs, &results);
}

/// The kernel's reference link: a network namespace, a veth pair into it and tbf 1gbit on
/// both ends' egress (`burst` max(4 ms, 64 KB), `latency 20ms`), as scripts/lab/compare-tc
/// builds it. Removed when dropped (also when the bench panics).
struct TcLink {
    ns: String,
    dev: String,
}

impl TcLink {
    /// Builds the link and binds the sink inside the namespace (a socket stays in the
    /// namespace it was created in, whichever thread uses it later). Err says why not.
    fn create() -> Result<(TcLink, TcpListener), String> {
        let euid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
                l.split_whitespace().nth(2)?.parse::<u32>().ok()
            });
        if euid != Some(0) {
            return Err("needs root (network namespace, veth pair, tc)".into());
        }
        for tool in ["ip", "tc"] {
            if !Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return Err(format!("`{tool}` not found (iproute2)"));
            }
        }
        let in_use = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "to", &format!("{TC_LOCAL}/30")])
            .output()
            .map_err(|e| e.to_string())?;
        if !in_use.stdout.is_empty() {
            return Err(format!(
                "{TC_LOCAL}/30 is in use here: {}",
                String::from_utf8_lossy(&in_use.stdout).trim()
            ));
        }
        let tag = format!("mslb{}", std::process::id());
        let link = TcLink {
            ns: tag.clone(),
            dev: format!("{tag}r"),
        };
        let peer = format!("{tag}n");
        let burst = (1e9_f64 * 0.004 / 8.0).max(65536.0).to_string();
        let tbf = |dev: &str| {
            vec![
                "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit", "burst", &burst,
                "latency", "20ms",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
        };
        let ns = link.ns.clone();
        let in_ns = |cmd: Vec<String>| {
            ["ip", "netns", "exec", &ns]
                .into_iter()
                .map(String::from)
                .chain(cmd)
                .collect::<Vec<_>>()
        };
        let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let steps = [
            words(&format!("ip netns add {}", link.ns)),
            words(&format!(
                "ip link add {} type veth peer name {peer} netns {}",
                link.dev, link.ns
            )),
            words(&format!("ip addr add {TC_LOCAL}/30 dev {}", link.dev)),
            words(&format!("ip link set {} up", link.dev)),
            words(&format!(
                "ip -n {} addr add {TC_REMOTE}/30 dev {peer}",
                link.ns
            )),
            words(&format!("ip -n {} link set {peer} up", link.ns)),
            words(&format!("ip -n {} link set lo up", link.ns)),
            tbf(&link.dev),
            in_ns(tbf(&peer)),
        ];
        // From here on, dropping `link` removes whatever was made.
        for step in steps {
            let out = Command::new(&step[0])
                .args(&step[1..])
                .output()
                .map_err(|e| format!("{}: {e}", step.join(" ")))?;
            if !out.status.success() {
                return Err(format!(
                    "`{}` failed: {}",
                    step.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        let path = format!("/var/run/netns/{}", link.ns);
        let sink = thread::spawn(move || -> std::io::Result<TcpListener> {
            // Only this thread enters the namespace; the listener stays there.
            let ns = std::fs::File::open(path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            TcpListener::bind((TC_REMOTE, 0))
        })
        .join()
        .expect("namespace thread")
        .map_err(|e| format!("cannot listen in the namespace: {e}"))?;
        Ok((link, sink))
    }

    /// The reference link's share of [`forget_loopback_tcp_metrics`]: both ends.
    fn forget_tcp_metrics(&self) {
        for args in [
            vec!["tcp_metrics", "flush", TC_REMOTE],
            vec!["-n", &self.ns, "tcp_metrics", "flush"],
        ] {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for TcLink {
    fn drop(&mut self) {
        // Deleting one end of the pair deletes both, with their qdiscs.
        for args in [
            vec!["link", "del", self.dev.as_str()],
            vec!["netns", "del", self.ns.as_str()],
        ] {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One GET to the control API; the response body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String, ureq::Error> {
    ureq::get(format!("http://{addr}{path}"))
        .call()?
        .into_body()
        .read_to_string()
}

/// The route's `to_destination` ledger from migshaper's metrics, summed over the cause
/// labels. None when the binary exports no such counters (or the route has not carried
/// anything yet).
fn link_ledger(control: SocketAddr, route: &str) -> Option<Ledger> {
    let text = http_get(control, "/metrics").ok()?;
    let want_route = format!("route=\"{route}\"");
    let mut l = Ledger::default();
    let mut seen = false;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        if name != CARRIED && name != SHORTFALL {
            continue;
        }
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let labels: Vec<&str> = labels.split(',').map(str::trim).collect();
        if !labels.contains(&want_route.as_str())
            || !labels.contains(&"direction=\"to_destination\"")
        {
            continue;
        }
        let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if name == CARRIED {
            l.carried += v;
            seen = true;
        } else if labels.contains(&"cause=\"late\"") {
            l.late += v;
        } else if labels.contains(&"cause=\"destination\"") {
            l.destination += v;
        } else {
            l.other += v;
        }
    }
    seen.then_some(l)
}

/// The ledger summed over these runs; None if any run has none.
fn ledger(rs: &[RunResult]) -> Option<Ledger> {
    rs.iter()
        .try_fold(Ledger::default(), |acc, r| r.ledger.map(|l| acc.plus(&l)))
}

/// carried / (carried + shortfall) over these runs; None if any run has no ledger.
fn fidelity(rs: &[RunResult]) -> Option<f64> {
    ledger(rs)?.fidelity()
}

/// The in-band ping through migshaper at 1g against tbf's, from the same run.
fn print_ping_check(configs: &[(Target, usize)], results: &[Vec<RunResult>]) {
    let p50 = |name: &str, streams: usize| {
        configs
            .iter()
            .zip(results)
            .find(|((t, s), _)| t.name == name && *s == streams)
            .map(|(_, rs)| {
                let v: Vec<f64> = rs.iter().flat_map(|r| r.ping_inband.clone()).collect();
                pct(&v, 50.0)
            })
    };
    for streams in [1, 4] {
        if let (Some(ms), Some(tc)) = (p50("migshaper 1g", streams), p50(TC_ROW, streams)) {
            println!(
                "in-band ping p50, {streams} stream(s): migshaper 1g {ms:.2} ms, {TC_ROW} {tc:.2} ms: {}",
                if ms <= tc {
                    "migshaper <= tbf"
                } else {
                    "migshaper ABOVE tbf"
                }
            );
        }
    }
}

/// Shaped rows whose mean/target falls outside this are short of (or over) their rate.
const MEAN_BAND: (f64, f64) = (0.995, 1.005);
/// The most a shaped row's %/(Gb/s) may cost against the unshaped path's (same streams, same
/// run): at 1 Gb/s and at 10 Gb/s.
const CPU_BOUND_1G: f64 = 2.0;
const CPU_BOUND_10G: f64 = 1.5;

/// Judges every shaped migshaper row of this run against the link's targets: mean/target
/// within [`MEAN_BAND`]; the highest 100 ms window within 1 + burst / 100 ms (a bucket of
/// that burst allows no more); CPU per Gb/s within [`CPU_BOUND_1G`] or [`CPU_BOUND_10G`] times
/// the unshaped row's of the same run. A rate is judged where direct loopback carried at
/// least twice it in this run and the hypervisor took at most [`STEAL_LIMIT`] of the VM's
/// CPU time in every round of the row (a host that cannot carry the traffic cannot shape
/// it); the unshaped migshaper row's rate is printed beside it, since that is the ceiling of
/// the proxied path on this host.
fn print_targets(args: &Args, configs: &[(Target, usize)], results: &[Vec<RunResult>]) {
    let find = |name: &str, streams: usize| {
        configs
            .iter()
            .zip(results)
            .find(|((t, s), rs)| t.name == name && *s == streams && !rs.is_empty())
            .map(|(_, rs)| rs)
    };
    let gbps = |rs: &Vec<RunResult>| mean(rs.iter().map(|r| r.gbps));
    let cpu_per_gbps = |rs: &Vec<RunResult>| mean(rs.iter().map(|r| r.cpu_pct)) / gbps(rs);
    let direct = find("direct loopback", 1).map(gbps);
    let peak_bound = humantime::parse_duration(&args.burst)
        .ok()
        .map(|b| 1.0 + b.as_secs_f64() / 0.1);
    println!(
        "\ntargets (same run; mean in [{}, {}], max 100 ms <= 1 + burst/100 ms, CPU per Gb/s <= {CPU_BOUND_1G}x unshaped at 1g and {CPU_BOUND_10G}x at 10g):",
        MEAN_BAND.0, MEAN_BAND.1
    );
    let (mut met, mut missed, mut unjudged) = (0, 0, 0);
    for ((t, streams), rs) in configs.iter().zip(results) {
        let (Some(rate), Some(_)) = (t.rate, t.route) else {
            continue;
        };
        if rs.is_empty() {
            continue;
        }
        let mut checks = Vec::new();
        let mut ok = true;
        let ratio = gbps(rs) * 1e9 / rate;
        let in_band = (MEAN_BAND.0..=MEAN_BAND.1).contains(&ratio);
        ok &= in_band;
        checks.push(format!(
            "mean {ratio:.4} {}",
            if in_band { "ok" } else { "MISSED" }
        ));
        let peak = mean(rs.iter().map(|r| r.max_window));
        if let (Some(bound), false) = (peak_bound, peak.is_nan()) {
            let within = peak <= bound;
            ok &= within;
            checks.push(format!(
                "max 100 ms {peak:.4} {}",
                if within { "ok" } else { "MISSED" }
            ));
        }
        let base_name = if t.replay {
            if t.name.ends_with("parsing off") {
                "QEMU stream: unlimited, parsing off"
            } else {
                "QEMU stream: unlimited, parsing on"
            }
        } else {
            "migshaper unlimited"
        };
        let bound = if rate >= 10e9 {
            CPU_BOUND_10G
        } else {
            CPU_BOUND_1G
        };
        if let Some(base) = find(base_name, *streams) {
            let x = cpu_per_gbps(rs) / cpu_per_gbps(base);
            let within = x <= bound;
            ok &= within;
            checks.push(format!(
                "CPU {x:.2}x unshaped {}",
                if within { "ok" } else { "MISSED" }
            ));
        }
        // Judged where the host could carry the traffic: direct loopback reached twice the
        // rate, and the hypervisor left the VM its CPUs through every round of the row.
        let carried = direct.is_some_and(|d| d * 1e9 >= 2.0 * rate);
        let undisturbed = worst_steal(rs).is_none_or(|x| x <= STEAL_LIMIT);
        let verdict = match (carried && undisturbed, ok) {
            (false, _) => {
                unjudged += 1;
                if carried {
                    "not judged (CPU stolen)"
                } else {
                    "not judged"
                }
            }
            (true, true) => {
                met += 1;
                "met"
            }
            (true, false) => {
                missed += 1;
                "MISSED"
            }
        };
        println!(
            "  {} x{streams}: {} -> {verdict}",
            t.name,
            checks.join(", ")
        );
    }
    let host = match (direct, find("migshaper unlimited", 1).map(gbps)) {
        (Some(d), Some(u)) => format!(
            "direct loopback x1 {d:.2} Gb/s (a rate is judged up to half of it), migshaper unlimited x1 {u:.2} Gb/s (the proxied path's ceiling here)"
        ),
        (Some(d), None) => {
            format!("direct loopback x1 {d:.2} Gb/s (a rate is judged up to half of it)")
        }
        _ => "direct loopback not run: no row judged (run without --only, or include \"direct\")"
            .to_owned(),
    };
    println!("  {met} met, {missed} missed, {unjudged} not judged; {host}");
    let stolen: Vec<f64> = results
        .iter()
        .filter_map(|rs| worst_steal(rs))
        .filter(|w| *w > STEAL_LIMIT)
        .collect();
    if !stolen.is_empty() {
        println!(
            "  host disturbed: the hypervisor took more than {:.0} % of this VM's CPU time in {} \
             of {} rows (up to {:.1} % in a round; see the last column): rows so disturbed are \
             not judged; run again when the host is quieter",
            STEAL_LIMIT * 100.0,
            stolen.len(),
            results.iter().filter(|rs| !rs.is_empty()).count(),
            stolen.iter().fold(0.0, |a: f64, b| a.max(*b)) * 100.0
        );
    }
    // The kernel's own shaper under the same load is the run's control: if it was short
    // too, the host (not the link) set this run's figures.
    for streams in [1, 4] {
        if let Some(tc) = find(TC_ROW, streams) {
            let r = gbps(tc) * 1e9 / TC_PAYLOAD_RATE;
            if !(TC_BAND.0..=TC_BAND.1).contains(&r) {
                println!(
                    "  host disturbed: {TC_ROW} x{streams} ran at {r:.4} of its rate in this run; \
                     the verdicts above reflect the host as much as the link: run again"
                );
            }
        }
    }
}

/// The most CPU time stolen in any of these runs; None if a run could not read it.
fn worst_steal(rs: &[RunResult]) -> Option<f64> {
    rs.iter()
        .map(|r| r.steal)
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().fold(0.0, f64::max))
}

/// Where tbf's mean/target must fall for the run's host to count as undisturbed.
const TC_BAND: (f64, f64) = (0.99, 1.01);

/// Forgets what the kernel learned about earlier loopback connections, so every run starts
/// from the same state. Linux caches per destination, among others, the reordering a
/// connection saw; loopback bursts trigger spurious retransmissions that raise it to the
/// maximum (300), and a new connection to 127.0.0.1 then sizes its send buffer for 301
/// segments: 2 MB at 1448-byte segments, 16 ms at 1 Gb/s in front of every in-band reply.
/// Without the flush, a configuration's figures depend on which one ran before it.
/// Returns false if the flush failed (not root, or no iproute2).
fn forget_loopback_tcp_metrics() -> bool {
    Command::new("ip")
        .args(["tcp_metrics", "flush", "127.0.0.0/8"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The binary serving [`ROUTES`] in front of `sinks`; the routes' addresses in that order.
fn start_migshaper(args: &Args, sinks: &[Arc<TcpListener>]) -> (Spawned, Vec<SocketAddr>) {
    let dir = std::env::temp_dir().join(format!("migshaper-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bench.toml");
    let mut text = String::new();
    for ((name, link, parse, zero_copy, pacing), sink) in ROUTES.iter().zip(sinks) {
        text += &format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nlink = \"{link}\"\nframing = \"none\"\nburst = \"{}\"\nparse = {parse}\nzero_copy = {zero_copy}\nkernel_pacing = {pacing}\n\n",
            sink.local_addr().unwrap(),
            args.burst
        );
    }
    std::fs::write(&config, text).unwrap();
    let mut cmd = if args.realtime > 0 {
        // chrt execs migshaper: the pid (and its CPU time in /proc) stays migshaper's.
        let mut c = Command::new("chrt");
        c.args(["-f", &args.realtime.to_string()])
            .arg(migshaper().get_program());
        c
    } else {
        migshaper()
    };
    cmd.args(["serve", "--control", "127.0.0.1:0", "--config"])
        .arg(&config);
    let server = Spawned::start(cmd);
    let addrs = ROUTES.iter().map(|r| server.route(r.0)).collect();
    (server, addrs)
}

/// The main channel of a real pre-copy migration (QEMU 7.2, 191 MB).
fn load_capture() -> Vec<u8> {
    fixtures::load_capture(&fixtures::fixtures_dir().join("precopy-s64-256m/c0.s2d.bin.zst"))
}

/// Replays the capture over and over, one migration per connection, for `secs`; the sink
/// reads each connection to its end. Measures throughput and migshaper's CPU.
fn run_replay(t: &Target, capture: &Arc<Vec<u8>>, secs: f64, pid: u32) -> RunResult {
    let deadline_d = Duration::from_secs_f64(secs);
    let sink = t.sink.clone();
    let stop_addr = sink.local_addr().unwrap();
    let t0 = Instant::now();
    let receiver = thread::spawn(move || {
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let (mut s, _) = sink.accept().unwrap();
            let mut first = [0u8; 4];
            if s.read_exact(&mut first).is_err() {
                continue;
            }
            if &first == b"STOP" {
                return total;
            }
            if t0.elapsed() < deadline_d {
                total += 4;
            }
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if t0.elapsed() < deadline_d {
                    total += n as u64;
                }
            }
        }
    });
    let cpu0 = cpu_ticks(pid);
    let deadline = t0 + deadline_d;
    while Instant::now() < deadline {
        let mut s = TcpStream::connect(t.addr).unwrap();
        for piece in capture.chunks(1 << 20) {
            if s.write_all(piece).is_err() || Instant::now() >= deadline {
                break;
            }
        }
        let _ = s.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
    TcpStream::connect(stop_addr)
        .unwrap()
        .write_all(b"STOP")
        .unwrap();
    let total = receiver.join().unwrap();
    let gbps = total as f64 * 8.0 / secs / 1e9;
    RunResult {
        gbps,
        max_window: f64::NAN,
        max_window_read: f64::NAN,
        first_window: f64::NAN,
        conn_min_over_mean: f64::NAN,
        ping_inband: Vec::new(),
        ping_second: Vec::new(),
        cpu_pct: cpu,
        ledger: None,
        retrans: None,
        steal: None,
    }
}

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn run(t: &Target, streams: usize, secs: f64, pid: Option<u32>) -> RunResult {
    let dur = Duration::from_secs_f64(secs);
    let bins_len = (secs * 1000.0) as usize + 1;
    // Sink side: accept streams + 1 connections, identified by their first byte.
    let sink = t.sink.clone();
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut handles = Vec::new();
            for _ in 0..=streams {
                let (mut s, _) = sink.accept().unwrap();
                s.set_nodelay(true).unwrap();
                let mut role = [0u8; 1];
                s.read_exact(&mut role).unwrap();
                let stop = stop.clone();
                handles.push(thread::spawn(move || match role[0] {
                    b'0' => SinkOut::Bulk(bulk_receiver(s, epoch, bins_len, true, stop)),
                    b'1'..=b'9' => SinkOut::Bulk(bulk_receiver(s, epoch, bins_len, false, stop)),
                    _ => SinkOut::Ping(ping_origin(s, epoch, stop)),
                }));
            }
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    };
    let cpu0 = pid.map(cpu_ticks);
    let t0 = Instant::now();
    let deadline = t0 + dur;
    // The bins are relative to `epoch`; shift so that run start is bin 0.
    let offset_ms = (t0 - epoch).as_millis() as usize;
    let mut senders = Vec::new();
    for i in 0..streams {
        let addr = t.addr;
        senders.push(thread::spawn(move || bulk_sender(addr, i, deadline)));
    }
    let echo = {
        let addr = t.addr;
        let stop = stop.clone();
        thread::spawn(move || ping_echo(addr, stop))
    };
    for s in senders {
        s.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let outs = acceptor.join().unwrap();
    echo.join().unwrap();
    let cpu = match (pid, cpu0) {
        (Some(p), Some(c0)) => (cpu_ticks(p) - c0) as f64 / 100.0 / secs * 100.0,
        _ => 0.0,
    };
    let mut bins = vec![0u64; bins_len];
    let mut read_bins = vec![0u64; bins_len];
    let mut per_conn = Vec::new();
    let mut inband = Vec::new();
    let mut second = Vec::new();
    for o in outs {
        match o {
            SinkOut::Bulk(b) => {
                let mut total = 0;
                for (i, v) in b.bins.iter().enumerate() {
                    if i >= offset_ms && i - offset_ms < bins_len {
                        bins[i - offset_ms] += v;
                        total += v;
                    }
                }
                for (i, v) in b.read_bins.iter().enumerate() {
                    if i >= offset_ms && i - offset_ms < bins_len {
                        read_bins[i - offset_ms] += v;
                    }
                }
                per_conn.push(total as f64);
                inband.extend(b.rtts);
            }
            SinkOut::Ping(p) => second.extend(p),
        }
    }
    let total: u64 = bins.iter().take((secs * 1000.0) as usize).sum();
    let gbps = total as f64 * 8.0 / secs / 1e9;
    let rate = t.rate.unwrap_or(gbps * 1e9);
    let win_of = |bins: &[u64], from: usize| {
        bins[from..from + 100].iter().sum::<u64>() as f64 * 8.0 / 0.1 / rate
    };
    let win = |from: usize| win_of(&bins, from);
    let max_of = |bins: &[u64]| {
        (0..(secs * 1000.0) as usize - 100)
            .map(|from| win_of(bins, from))
            .fold(0.0, f64::max)
    };
    let max_window = max_of(&bins);
    let max_window_read = max_of(&read_bins);
    let mean_conn = per_conn.iter().sum::<f64>() / per_conn.len() as f64;
    RunResult {
        gbps,
        max_window,
        max_window_read,
        first_window: win(0),
        conn_min_over_mean: per_conn.iter().cloned().fold(f64::MAX, f64::min) / mean_conn,
        ping_inband: inband,
        ping_second: second,
        cpu_pct: cpu,
        ledger: None,
        retrans: None,
        steal: None,
    }
}

enum SinkOut {
    Bulk(BulkOut),
    Ping(Vec<f64>),
}

struct BulkOut {
    /// Bytes per 1 ms bin by when the kernel received them (socket arrival).
    bins: Vec<u64>,
    /// Bytes per 1 ms bin by when the receiving thread read them.
    read_bins: Vec<u64>,
    rtts: Vec<f64>,
}

/// Reads once, with the kernel's receive time of the last segment read (ns since the Unix
/// epoch; SO_TIMESTAMPNS must be on).
#[allow(clippy::ptr_arg)] // nix's recvmsg takes the control buffer as `&mut Vec<u8>`
fn recv_stamped(
    s: &TcpStream,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
) -> std::io::Result<(usize, Option<u64>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty())?;
    let stamp = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::ScmTimestampns(t) => {
                Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            }
            _ => None,
        })
    });
    Ok((msg.bytes, stamp))
}

/// Sends framed records until the deadline: bulk records, and pongs for the pings that
/// arrive on the reverse direction (answered inside the bulk stream).
fn bulk_sender(addr: SocketAddr, i: usize, deadline: Instant) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&[b'0' + i as u8]).unwrap();
    let (tx, rx) = mpsc::channel::<[u8; 8]>();
    let mut rev = s.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut ping = [0u8; 8];
        while rev.read_exact(&mut ping).is_ok() {
            if tx.send(ping).is_err() {
                break;
            }
        }
    });
    let mut record = vec![0xA5u8; RECORD];
    record[0] = TAG_BULK;
    record[1..5].copy_from_slice(&((RECORD - 5) as u32).to_be_bytes());
    let mut pong = [0u8; 64];
    pong[0] = TAG_PONG;
    pong[1..5].copy_from_slice(&59u32.to_be_bytes());
    while Instant::now() < deadline {
        while let Ok(p) = rx.try_recv() {
            pong[5..13].copy_from_slice(&p);
            s.write_all(&pong).unwrap();
        }
        if s.write_all(&record).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    // The pong reader ends by itself when the receiver closes; don't wait for it here
    // (the receiver keeps pinging until every sender has finished).
    drop(reader);
}

/// Reads the framed bulk stream into 1 ms bins; on stream 0 also sends a ping every 10 ms
/// on the reverse direction and times the pongs found in the stream.
fn bulk_receiver(
    s: TcpStream,
    epoch: Instant,
    bins_len: usize,
    pinger: bool,
    stop: Arc<AtomicBool>,
) -> BulkOut {
    let mut bins = vec![0u64; bins_len + 60_000];
    let mut read_bins = vec![0u64; bins_len + 60_000];
    // Socket arrival times, not read times: a receiving thread that is descheduled for a
    // few ms and then reads the backlog at once would otherwise put that backlog into one
    // window. Each read is binned at its last segment's arrival (at most 256 KiB, 0.2 ms
    // at 10 Gb/s, late).
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
        .expect("SO_TIMESTAMPNS");
    let epoch_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        - now_ns(epoch);
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let (mut reads, mut unstamped) = (0u64, 0u64);
    let ping_thread = pinger.then(|| {
        let mut w = s.try_clone().unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if w.write_all(&now_ns(epoch).to_be_bytes()).is_err() {
                    break;
                }
                thread::sleep(PING_EVERY);
            }
            let _ = w.shutdown(Shutdown::Write);
        })
    });
    let r = s;
    let mut buf = vec![0u8; 256 * 1024];
    let mut rtts = Vec::new();
    // Record parser state: header bytes collected, payload bytes left.
    let mut hdr = [0u8; 5];
    let mut hdr_len = 0usize;
    let mut left = 0usize;
    let mut is_pong = false;
    let mut pong_bytes = Vec::new();
    loop {
        let (n, stamp) = match recv_stamped(&r, &mut buf, &mut cmsg) {
            Ok((0, _)) | Err(_) => break,
            Ok(x) => x,
        };
        let ms = epoch.elapsed().as_millis() as usize;
        if ms < read_bins.len() {
            read_bins[ms] += n as u64;
        }
        reads += 1;
        if stamp.is_none() {
            unstamped += 1;
        }
        let arrived = stamp.map_or(ms, |t| {
            (t.saturating_sub(epoch_unix_ns) / 1_000_000) as usize
        });
        if arrived < bins.len() {
            bins[arrived] += n as u64;
        }
        let mut p = &buf[..n];
        while !p.is_empty() {
            if left == 0 {
                let take = (5 - hdr_len).min(p.len());
                hdr[hdr_len..hdr_len + take].copy_from_slice(&p[..take]);
                hdr_len += take;
                p = &p[take..];
                if hdr_len == 5 {
                    hdr_len = 0;
                    is_pong = hdr[0] == TAG_PONG;
                    left = u32::from_be_bytes(hdr[1..5].try_into().unwrap()) as usize;
                    pong_bytes.clear();
                }
                continue;
            }
            let take = left.min(p.len());
            if is_pong {
                pong_bytes.extend_from_slice(&p[..take]);
            }
            left -= take;
            p = &p[take..];
            if left == 0 && is_pong {
                let sent = u64::from_be_bytes(pong_bytes[..8].try_into().unwrap());
                rtts.push((now_ns(epoch) - sent) as f64 / 1e6);
            }
        }
    }
    if let Some(t) = ping_thread {
        let _ = t.join();
    }
    assert!(
        unstamped * 100 <= reads,
        "{unstamped} of {reads} reads came without a kernel receive timestamp"
    );
    BulkOut {
        bins,
        read_bins,
        rtts,
    }
}

/// The second connection's source side: echo every 64-byte ping back immediately.
fn ping_echo(addr: SocketAddr, stop: Arc<AtomicBool>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"P").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 64];
    let mut have = 0;
    loop {
        match s.read(&mut b[have..]) {
            Ok(0) => break,
            Ok(n) => {
                have += n;
                if have == 64 {
                    s.write_all(&b).unwrap();
                    have = 0;
                }
            }
            Err(_) if !stop.load(Ordering::SeqCst) => continue,
            Err(_) => break,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// The second connection's destination side: ping every 10 ms, time the echo.
fn ping_origin(mut s: TcpStream, epoch: Instant, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut rtts = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    while !stop.load(Ordering::SeqCst) {
        let mut p = [0u8; 64];
        p[..8].copy_from_slice(&now_ns(epoch).to_be_bytes());
        if s.write_all(&p).is_err() {
            break;
        }
        if s.read_exact(&mut p).is_err() {
            break;
        }
        rtts.push((now_ns(epoch) - u64::from_be_bytes(p[..8].try_into().unwrap())) as f64 / 1e6);
        thread::sleep(PING_EVERY);
    }
    let _ = s.shutdown(Shutdown::Write);
    rtts
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((p / 100.0) * (s.len() - 1) as f64).round() as usize]
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

fn print_table(args: &Args, configs: &[(Target, usize)], results: &[Vec<RunResult>]) {
    println!(
        "\nmigshaper link benchmark: {} rounds x {} s per run, burst {}, framing none, {} cores, migshaper at {}\n",
        args.rounds,
        args.secs,
        args.burst,
        thread::available_parallelism().map_or(0, |n| n.get()),
        if args.realtime > 0 {
            format!("SCHED_FIFO {}", args.realtime)
        } else {
            "normal priority".to_string()
        }
    );
    println!(
        "| configuration | streams | Gb/s | mean/target | link fidelity | agree | shortfall by cause | max 100 ms/target | max 100 ms at read/target | first 100 ms/target | conn min/mean | in-band ping p50 / p99 (ms) | 2nd-conn ping p50 / p99 (ms) | proxy CPU % | CPU %/(Gb/s) | TCP retransmits per s (needless) | CPU stolen by the hypervisor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let direct1 = configs
        .iter()
        .zip(results)
        .find(|((t, s), _)| t.name == "direct loopback" && *s == 1)
        .map(|(_, r)| mean(r.iter().map(|x| x.gbps)));
    for ((t, streams), rs) in configs.iter().zip(results) {
        let gbps = mean(rs.iter().map(|r| r.gbps));
        // Unshaped runs have no target: their peaks are shown against their own mean,
        // which is the measurement's noise floor on this machine.
        let ratio = |f: &dyn Fn(&RunResult) -> f64| match t.rate {
            Some(_) => format!("{:.4}", mean(rs.iter().map(f))),
            None => format!("({:.3} of mean)", mean(rs.iter().map(f))),
        };
        let mean_t = match t.rate {
            Some(rate) => format!("{:.4}", gbps * 1e9 / rate),
            None => match direct1 {
                Some(d) if t.name != "direct loopback" => format!("{:.3}x direct", gbps / d),
                _ => "-".into(),
            },
        };
        let inband: Vec<f64> = rs.iter().flat_map(|r| r.ping_inband.clone()).collect();
        let second: Vec<f64> = rs.iter().flat_map(|r| r.ping_second.clone()).collect();
        let cpu = mean(rs.iter().map(|r| r.cpu_pct));
        let via_proxy = t.route.is_some();
        // The link's own account beside the measured mean: they should agree within 1 %
        // whenever the link was backlogged for the whole run.
        let fid = fidelity(rs);
        let (fid_s, agree) = match (via_proxy, fid, t.rate) {
            (false, _, _) => ("-".to_owned(), "-".to_owned()),
            (true, None, _) => ("n/a".to_owned(), "-".to_owned()),
            (true, Some(f), None) => (format!("{f:.4}"), "-".to_owned()),
            (true, Some(f), Some(rate)) => (
                format!("{f:.4}"),
                if (f - gbps * 1e9 / rate).abs() <= 0.01 {
                    "yes".to_owned()
                } else {
                    "no".to_owned()
                },
            ),
        };
        let causes = match ledger(rs) {
            Some(l) if via_proxy && t.rate.is_some() => l.causes(),
            _ => "-".to_owned(),
        };
        let retrans = rs
            .iter()
            .map(|r| r.retrans)
            .collect::<Option<Vec<_>>>()
            .map_or("n/a".to_owned(), |v| {
                let per_s = |f: &dyn Fn(&TcpRetrans) -> u64| {
                    v.iter().map(f).sum::<u64>() as f64 / (args.secs * v.len() as f64)
                };
                format!(
                    "{:.0} ({:.0})",
                    per_s(&|x| x.segments),
                    per_s(&|x| x.needless)
                )
            });
        let row = format!(
            "| {} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {} | {} | {} |",
            t.name,
            streams,
            gbps,
            mean_t,
            fid_s,
            agree,
            causes,
            ratio(&|r| r.max_window),
            ratio(&|r| r.max_window_read),
            ratio(&|r| r.first_window),
            mean(rs.iter().map(|r| r.conn_min_over_mean)),
            pct(&inband, 50.0),
            pct(&inband, 99.0),
            pct(&second, 50.0),
            pct(&second, 99.0),
            if via_proxy {
                format!("{cpu:.1}")
            } else {
                "-".into()
            },
            if via_proxy {
                format!("{:.2}", cpu / gbps)
            } else {
                "-".into()
            },
            retrans,
            worst_steal(rs).map_or("n/a".to_owned(), |x| format!("{:.1} %", x * 100.0)),
        );
        // Rows without a figure (e.g. pings in the replay runs) show "-".
        println!("{}", row.replace("NaN", "-"));
    }
}
