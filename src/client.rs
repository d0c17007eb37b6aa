//! The control API's command-line client: `migshaper link get|set|schedule` and
//! `migshaper status`. Blocking HTTP (ureq): one request at a time is all a CLI needs.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{ClientArgs, LinkSetArgs, ScheduleArgs, StatusArgs};
use crate::config::CONTROL_URL_ENV;
use crate::spec::{HumanDuration, LinkRate, format_bits};

/// A failed client command: the message to print (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(String);

type Result<T> = std::result::Result<T, ClientError>;

/// A connection to one server's control API.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `args.control` (`http://HOST:PORT` or `HOST:PORT`).
    pub fn new(args: &ClientArgs) -> Client {
        let base = args.control.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Client {
            base,
            token: args.control_token.clone().filter(|t| !t.is_empty()),
            agent,
        }
    }

    fn fail(&self, path: &str, e: impl std::fmt::Display) -> ClientError {
        ClientError(format!(
            "cannot reach the control API at {}{path}: {e} (is `migshaper serve` running with --control there? set --control or {CONTROL_URL_ENV})",
            self.base
        ))
    }

    fn finish(&self, path: &str, mut resp: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.fail(path, e))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_string);
        Err(ClientError(format!("server refused ({status}): {msg}")))
    }

    /// `GET path` → JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.fail(path, e))?;
        self.finish(path, resp)
    }

    /// `GET path` → JSON, or `None` when the server answers 404 (e.g. `/fabric` on a
    /// server without one).
    pub fn get_if_present(&self, path: &str) -> Result<Option<Value>> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.fail(path, e))?;
        if resp.status() == 404 {
            return Ok(None);
        }
        self.finish(path, resp).map(Some)
    }

    /// `PUT path` with a JSON body → JSON.
    pub fn put(&self, path: &str, body: &Value) -> Result<Value> {
        let mut req = self.agent.put(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req.send_json(body).map_err(|e| self.fail(path, e))?;
        self.finish(path, resp)
    }

    /// The route to act on: `route`, or the only one the server has.
    pub fn pick_route(&self, route: Option<&str>) -> Result<String> {
        if let Some(r) = route {
            return Ok(r.to_string());
        }
        let routes = self.get("/routes")?;
        let names: Vec<&str> = routes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("name").and_then(Value::as_str))
            .collect();
        match names.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(ClientError("the server has no routes".into())),
            many => Err(ClientError(format!(
                "the server has several routes ({}); choose one with --route",
                many.join(", ")
            ))),
        }
    }

    /// Changes a route's link; returns the route as the server now reports it.
    pub fn set_link(&self, route: &str, body: &Value) -> Result<Value> {
        self.put(&format!("/routes/{}/link", encode(route)), body)
    }
}

/// Characters left as they are in a path segment: RFC 3986's unreserved set.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a path segment (route names are usually plain).
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn link_line(name: &str, link: &Value) -> String {
    let s = |k: &str| {
        link.get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let payload = link
        .get("payload_rate_bits_per_second")
        .and_then(Value::as_f64)
        .map_or_else(|| "unlimited".to_string(), format_bits);
    format!(
        "{name}: link {} burst {} framing {} delay {} (payload {payload})",
        s("link"),
        s("burst"),
        s("framing"),
        s("delay")
    )
}

/// `migshaper link get`.
pub fn link_get(client: &ClientArgs, route: Option<&str>, json_out: bool) -> Result<String> {
    let c = Client::new(client);
    let routes = match route {
        Some(r) => vec![c.get(&format!("/routes/{}", encode(r)))?],
        None => c.get("/routes")?.as_array().cloned().unwrap_or_default(),
    };
    if json_out {
        let links: serde_json::Map<String, Value> = routes
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("?").to_string(),
                    r["link"].clone(),
                )
            })
            .collect();
        return Ok(Value::Object(links).to_string() + "\n");
    }
    let mut out = String::new();
    for r in &routes {
        let _ = writeln!(
            out,
            "{}",
            link_line(r["name"].as_str().unwrap_or("?"), &r["link"])
        );
    }
    Ok(out)
}

/// `migshaper link set`.
pub fn link_set(args: &LinkSetArgs) -> Result<String> {
    let c = Client::new(&args.client);
    let mut body = serde_json::Map::new();
    for (k, v) in [
        ("link", &args.link),
        ("burst", &args.burst),
        ("delay", &args.delay),
        ("framing", &args.framing),
    ] {
        if let Some(v) = v {
            body.insert(k.into(), json!(v));
        }
    }
    let route = c.pick_route(args.route.as_deref())?;
    let r = c.set_link(&route, &Value::Object(body))?;
    Ok(link_line(&route, &r["link"]) + "\n")
}

// === schedules ===

/// One step of a link schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The link spec as written (validated).
    pub link: String,
    /// How long it stays; `None` for a final step that stays.
    pub hold: Option<Duration>,
}

/// Parses `1g for 60s, 10g for 60s` (commas or newlines between steps, `#` comments).
pub fn parse_schedule(text: &str) -> std::result::Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    let items: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for (i, item) in items.iter().enumerate() {
        let words: Vec<&str> = item.split_whitespace().collect();
        let (spec, hold) = match words.as_slice() {
            [spec] => (*spec, None),
            [spec, kw, dur] if kw.eq_ignore_ascii_case("for") => {
                let d = dur
                    .parse::<HumanDuration>()
                    .map_err(|e| format!("step {} ({item:?}): duration: {e}", i + 1))?;
                if d.0.is_zero() {
                    return Err(format!("step {} ({item:?}): duration must be > 0", i + 1));
                }
                (*spec, Some(d.0))
            }
            _ => {
                return Err(format!(
                    "step {} ({item:?}): write `SPEC for DURATION`, e.g. `1g for 60s`",
                    i + 1
                ));
            }
        };
        spec.parse::<LinkRate>()
            .map_err(|e| format!("step {} ({item:?}): {e}", i + 1))?;
        if hold.is_none() && i + 1 != items.len() {
            return Err(format!(
                "step {} ({item:?}): only the last step may leave out `for DURATION`",
                i + 1
            ));
        }
        steps.push(Step {
            link: spec.to_string(),
            hold,
        });
    }
    if steps.is_empty() {
        return Err("empty schedule; write e.g. `1g for 60s, 10g for 60s`".into());
    }
    Ok(steps)
}

/// `migshaper link schedule`: applies each step, prints one line per change.
pub fn link_schedule(args: &ScheduleArgs) -> Result<()> {
    let text = match (&args.steps, &args.file) {
        (_, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| ClientError(format!("cannot read {}: {e}", path.display())))?,
        (Some(s), None) => s.clone(),
        (None, None) => String::new(),
    };
    let steps = parse_schedule(&text).map_err(ClientError)?;
    let c = Client::new(&args.client);
    let route = c.pick_route(args.route.as_deref())?;
    let mut round = 0u32;
    while args.forever || round < args.repeat {
        round += 1;
        for step in &steps {
            let r = c.set_link(&route, &json!({ "link": step.link }))?;
            let hold = step.hold.map_or_else(
                || "until changed".to_string(),
                |d| format!("for {}", HumanDuration(d)),
            );
            println!(
                "{} {} {hold}",
                humantime::format_rfc3339_millis(std::time::SystemTime::now()),
                link_line(&route, &r["link"])
            );
            match step.hold {
                Some(d) => std::thread::sleep(d),
                None => return Ok(()),
            }
        }
    }
    Ok(())
}

// === status ===

fn human_bytes(n: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", units[i])
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn sum(v: &Value) -> f64 {
    v.as_object()
        .map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum())
}

/// A record's (or live view's) link fidelity towards the destination, for one line:
/// `link fidelity 93.1 % (short 6.1 MB: late 4.2 MB, destination 1.9 MB)`, with the fabric's
/// share when other routes shared a fabric with it.
fn fidelity_text(m: &Value) -> String {
    let f = &m["fidelity"]["to_destination"];
    let Some(ratio) = f["ratio"].as_f64() else {
        return "link fidelity n/a (not backlogged or unlimited)".to_string();
    };
    let short = |c: &str| f["shortfall_bytes"][c].as_f64().unwrap_or(0.0);
    let (late, dest, fabric) = (short("late"), short("destination"), short("fabric"));
    let mut s = format!("link fidelity {:.1} %", ratio * 100.0);
    if late + dest + fabric > 0.0 {
        let _ = write!(
            s,
            " (short {}: late {}, destination {}",
            human_bytes(late + dest + fabric),
            human_bytes(late),
            human_bytes(dest)
        );
        if fabric > 0.0 {
            let _ = write!(s, ", fabric {}", human_bytes(fabric));
        }
        s.push(')');
    }
    if ratio < crate::migration::FIDELITY_WARN_BELOW {
        s.push_str(" LOW");
    }
    if let Some(x) = m["fidelity"]["host_cpu_stolen"]
        .as_f64()
        .filter(|x| *x > crate::migration::STOLEN_WARN_ABOVE)
    {
        let _ = write!(s, ", host CPU stolen {:.1} %", x * 100.0);
    }
    s
}

/// The fabric in one line: `fabric 10 Gbit/s (share): 9.41 Gb/s of payload, active
/// migrations want 1.88 Gb/s, headroom 7.53 Gb/s; backlogged to destination 11.3 Gb/s:
/// each route at 0.83 of its link`.
fn fabric_line(f: &Value) -> String {
    let bits = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut s = format!(
        "fabric {} ({}): {} of payload, active migrations want {}, headroom {}",
        f["rate"].as_str().unwrap_or("?"),
        f["oversubscribe"].as_str().unwrap_or("?"),
        format_bits(bits(&f["payload_rate_bits_per_second"])),
        format_bits(bits(&f["active_demand_bits_per_second"])),
        format_bits(bits(&f["headroom_bits_per_second"])),
    );
    for (dir, label) in [
        ("to_destination", "to destination"),
        ("to_source", "to source"),
    ] {
        let d = &f["directions"][dir];
        let scale = d["scale"].as_f64().unwrap_or(1.0);
        if scale < 1.0 {
            let _ = write!(
                s,
                "; backlogged {label} {}: each route at {scale:.2} of its link",
                format_bits(bits(&d["backlogged_demand_bits_per_second"]))
            );
        }
    }
    s
}

/// Renders routes and migrations as the `status` table.
pub fn render_status(routes: &Value, migrations: &Value, fabric: &Value) -> String {
    let mut out = String::new();
    if !fabric.is_null() {
        let _ = writeln!(out, "{}", fabric_line(fabric));
    }
    for r in routes.as_array().into_iter().flatten() {
        let name = r["name"].as_str().unwrap_or("?");
        let _ = writeln!(
            out,
            "{}  [{} -> {}]",
            link_line(name, &r["link"]),
            r["listen"].as_str().unwrap_or("?"),
            r["upstream"].as_str().unwrap_or("?")
        );
        let m = &r["migration"];
        if m.is_null() {
            let _ = writeln!(out, "  no migration in progress");
            continue;
        }
        let progress = match (m["ram_sent_ratio"].as_f64(), m["ram_total_bytes"].as_f64()) {
            (Some(x), Some(total)) => {
                let bar = (x.min(1.0) * 20.0).round() as usize;
                format!(
                    "[{}{}] {:.2}x of {} RAM sent",
                    "#".repeat(bar),
                    ".".repeat(20 - bar),
                    x,
                    human_bytes(total)
                )
            }
            _ => "RAM size not known yet".to_string(),
        };
        let _ = writeln!(
            out,
            "  migration {}: {} (pass {}), {:.1} s, {} to destination at {}/s, {} page requests, {} connections\n  {progress}\n  {}",
            m["id"].as_str().unwrap_or("?"),
            m["phase"].as_str().unwrap_or("?"),
            m["precopy_passes"],
            m["elapsed_s"].as_f64().unwrap_or(0.0),
            human_bytes(sum(&m["bytes"]["to_destination"])),
            format_bits(
                m["rate_bytes_per_second"]["to_destination"]
                    .as_f64()
                    .unwrap_or(0.0)
                    * 8.0
            ),
            m["page_requests"],
            m["open_connections"],
            fidelity_text(m),
        );
    }
    let recent = migrations["recent"].as_array().cloned().unwrap_or_default();
    if !recent.is_empty() {
        let _ = writeln!(out, "recent migrations:");
        for rec in recent.iter().rev().take(5) {
            let _ = writeln!(
                out,
                "  {} {} {:.2} s, {} to destination{}, {}",
                rec["id"].as_str().unwrap_or("?"),
                rec["outcome"].as_str().unwrap_or("?"),
                rec["duration_s"].as_f64().unwrap_or(0.0),
                human_bytes(sum(&rec["bytes"]["to_destination"])),
                // Why it failed, or what a completion of an encrypted stream rests on.
                rec["cause"]
                    .as_str()
                    .or(rec["outcome_basis"].as_str())
                    .map_or_else(String::new, |c| format!(" ({c})")),
                fidelity_text(rec),
            );
        }
    }
    out
}

/// `migshaper status [--watch]`.
pub fn status(args: &StatusArgs) -> Result<()> {
    let c = Client::new(&args.client);
    loop {
        let routes = c.get("/routes")?;
        let migrations = c.get("/migrations")?;
        let fabric = c.get_if_present("/fabric")?.unwrap_or(Value::Null);
        if args.json {
            println!(
                "{}",
                json!({ "routes": routes, "migrations": migrations, "fabric": fabric })
            );
            return Ok(());
        }
        let text = render_status(&routes, &migrations, &fabric);
        if !args.watch {
            print!("{text}");
            return Ok(());
        }
        // Clear the screen and redraw.
        print!("\x1b[H\x1b[2J{text}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::thread::sleep(args.interval.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_errors_say_which_step() {
        let s = parse_schedule("1g for 60s, 10g for 1m").unwrap();
        assert_eq!(
            s,
            vec![
                Step {
                    link: "1g".into(),
                    hold: Some(Duration::from_secs(60))
                },
                Step {
                    link: "10g".into(),
                    hold: Some(Duration::from_secs(60))
                },
            ]
        );
        let file = "# warm-up\n100mbit for 500ms\n\n1g  # stays\n";
        let s = parse_schedule(file).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].hold, None);
        for (text, needle) in [
            ("1g for 60s, fast for 1s", "step 2"),
            ("1g, 10g for 1s", "only the last step"),
            ("1g during 5s", "SPEC for DURATION"),
            ("1g for soon", "duration"),
            ("1g for 0s", "> 0"),
            ("# nothing", "empty schedule"),
        ] {
            let e = parse_schedule(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn status_renders_progress() {
        let routes = json!([{
            "name": "r", "listen": "127.0.0.1:1", "upstream": "d:2",
            "link": {"link": "1g", "burst": "2ms", "framing": "ethernet:1500", "delay": "0s",
                     "payload_rate_bits_per_second": 941.5e6},
            "migration": {"id": "r-1", "phase": "precopy", "precopy_passes": 2, "elapsed_s": 3.5,
                          "bytes": {"to_destination": {"setup": 10, "precopy": 2_000_000}},
                          "rate_bytes_per_second": {"to_destination": 117_000_000},
                          "page_requests": 0, "open_connections": 1,
                          "ram_sent_ratio": 1.5, "ram_total_bytes": 134_217_728,
                          "fidelity": {"to_destination": {"ratio": 0.93,
                              "shortfall_bytes": {"late": 4_000_000, "destination": 0}},
                              "host_cpu_stolen": 0.125}}
        }]);
        let recent = json!({"active": [], "recent": [{"id": "r-0", "outcome": "completed",
            "duration_s": 1.0, "bytes": {"to_destination": {"precopy": 5}},
            "fidelity": {"to_destination": {"ratio": 1.0,
                "shortfall_bytes": {"late": 0, "destination": 0}}, "host_cpu_stolen": 0.004}},
            {"id": "r-1", "outcome": "completed", "duration_s": 2.0,
             "outcome_basis": "encrypted stream (TLS): every connection closed cleanly",
             "bytes": {"to_destination": {"precopy": 7}}}]});
        let text = render_status(&routes, &recent, &Value::Null);
        assert!(
            text.contains(
                "link fidelity 93.0 % (short 4.0 MB: late 4.0 MB, destination 0 B) LOW, \
                 host CPU stolen 12.5 %"
            ),
            "{text}"
        );
        assert!(
            text.contains("r-0 completed 1.00 s, 5 B to destination, link fidelity 100.0 %\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "r-1 completed 2.00 s, 7 B to destination \
                 (encrypted stream (TLS): every connection closed cleanly)"
            ),
            "{text}"
        );
        assert!(text.contains("precopy (pass 2)"), "{text}");
        assert!(text.contains("1.50x of 134.2 MB RAM sent"), "{text}");
        assert!(text.contains("[####################]"), "{text}");
        assert!(
            text.contains("2.0 MB to destination at 936mbit/s"),
            "{text}"
        );
    }

    #[test]
    fn route_names_are_encoded() {
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(encode("ok-1_2.3"), "ok-1_2.3");
    }
}
