//! The Grafana dashboard (`dashboards/migshaper.json`) against a real Prometheus.
//!
//! `every_dashboard_query_has_data_after_a_real_migration` starts the `migshaper` binary with
//! its control API, a Prometheus (the Debian `prometheus` binary) scraping its `/metrics`
//! every second, replays the bundled QEMU capture (a hybrid pre-copy → post-copy migration)
//! through the route, and then evaluates every panel query of the dashboard through
//! Prometheus' HTTP API with Grafana's variables substituted (`$instance` by the scraped
//! migshaper's address): each must succeed and return data, and none may return data for an
//! instance Prometheus does not scrape; every `migshaper_*` metric the dashboard names must be
//! in `/metrics`.
//! `the_dashboard_is_portable` checks, without any server, what makes the JSON work both
//! imported by hand and provisioned from files.

use std::collections::BTreeSet;
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Log, Spawned, TempDir, migshaper};
use serde_json::Value;

/// How long any one wait may take (start-up, the migration, scrapes) before the test fails.
const WAIT: Duration = Duration::from_secs(30);
/// Poll interval for conditions on Prometheus.
const POLL: Duration = Duration::from_millis(100);
/// The route name `serve` uses when `--name` is not given.
const ROUTE: &str = "default";
/// Grafana's macros and variables, as the test substitutes them (longest first), but for
/// `$instance` (see [`substitute`]).
const MACROS: &[(&str, &str)] = &[
    ("$__rate_interval", "5s"),
    ("$__interval", "1s"),
    ("$__range", "1h"),
    ("${route}", ROUTE),
    ("$route", ROUTE),
];
/// The template variables, in the order Grafana must resolve them: `route` lists the routes
/// of the selected instances.
const VARIABLES: &[&str] = &["datasource", "instance", "route"];
/// The datasource uid the provisioning file gives Prometheus.
const PROVISIONED_UID: &str = "migshaper-prometheus";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    let path = repo().join("dashboards/migshaper.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, the panels inside (collapsed) rows included.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// One panel query.
struct Query {
    panel: String,
    ref_id: String,
    expr: String,
    legend: Option<String>,
}

impl Query {
    fn name(&self) -> String {
        format!("panel {:?} query {}", self.panel, self.ref_id)
    }
}

fn queries(dash: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let panel = p["title"].as_str().unwrap_or("?").to_string();
            let ref_id = t["refId"].as_str().unwrap_or("?").to_string();
            let expr = t["expr"].as_str().unwrap_or_else(|| {
                panic!("panel {panel:?} target {ref_id} has no PromQL `expr`: {t}")
            });
            out.push(Query {
                panel,
                ref_id,
                expr: expr.to_string(),
                legend: t["legendFormat"].as_str().map(str::to_string),
            });
        }
    }
    assert!(
        out.len() >= 10,
        "only {} queries in the dashboard",
        out.len()
    );
    out
}

/// `expr` as Grafana would send it for route [`ROUTE`] on the migshaper `instance` (the
/// `instance` label Prometheus gives the target: its `HOST:PORT`).
fn substitute(expr: &str, instance: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in MACROS {
        e = e.replace(var, value);
    }
    e = e
        .replace("${instance}", instance)
        .replace("$instance", instance);
    assert!(
        !e.contains('$'),
        "an unknown Grafana variable is left in {e:?}"
    );
    e
}

/// The `migshaper_*` metric names in a PromQL expression (or `label_values(..)`).
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(i) = rest.find("migshaper_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
}

/// The template variable called `name`.
fn variable<'a>(dash: &'a Value, name: &str) -> &'a Value {
    dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("a `{name}` variable"))
}

/// A query variable's `label_values(SELECTOR, LABEL)` query.
fn variable_query(dash: &Value, name: &str) -> String {
    let v = variable(dash, name);
    let q = v["query"]["query"].as_str().or(v["query"].as_str());
    q.unwrap_or_else(|| panic!("the {name} variable's query"))
        .to_string()
}

/// `label_values(SELECTOR, LABEL)` → (SELECTOR, LABEL).
fn label_values(query: &str) -> (&str, &str) {
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not label_values(..): {query}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .expect("label_values(SELECTOR, LABEL)");
    (selector.trim(), label.trim())
}

/// Every `migshaper_*` selector in `expr` with its label matchers (empty when it has none).
fn selectors(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("migshaper_") {
        rest = &rest[i..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[name.len()..];
        let matchers = match rest.strip_prefix('{') {
            Some(m) => m[..m.find('}').expect("unclosed {")].to_string(),
            None => String::new(),
        };
        out.push((name, matchers));
    }
    out
}

/// The label lists of every `by (...)` in `expr`.
fn groupings(expr: &str) -> Vec<Vec<String>> {
    expr.match_indices("by (")
        .map(|(i, m)| {
            let rest = &expr[i + m.len()..];
            rest[..rest.find(')').expect("unclosed by (")]
                .split(',')
                .map(|l| l.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn the_dashboard_is_portable() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "migshaper");
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(
        dash.get("__inputs").is_none() && dash.get("__requires").is_none(),
        "__inputs is resolved by the UI import only; provisioning would leave it literal"
    );
    let text = serde_json::to_string(&dash).unwrap();
    assert!(
        !text.contains("DS_"),
        "a ${{DS_..}} import input is referenced"
    );

    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    assert_eq!(
        ds["current"]["value"], PROVISIONED_UID,
        "the datasource variable defaults to the provisioned datasource"
    );
    let names: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, VARIABLES, "template variables, in resolution order");
    let want = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    for (name, query) in [
        (
            "instance",
            "label_values(migshaper_link_rate_bytes_per_second, instance)",
        ),
        (
            "route",
            r#"label_values(migshaper_link_rate_bytes_per_second{instance=~"$instance"}, route)"#,
        ),
    ] {
        let v = variable(&dash, name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["multi"], true, "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["datasource"], want, "{name} variable");
        assert_eq!(variable_query(&dash, name), query);
        assert_eq!(
            v["definition"], query,
            "{name}: definition and query differ"
        );
    }
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: no gridPos");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], want, "panel {title:?}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            assert_eq!(
                t["datasource"], want,
                "panel {title:?} target {}",
                t["refId"]
            );
        }
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "panel {title:?} has no description"
        );
    }
    for q in queries(&dash) {
        // Every selector filters by both variables, so no series of an unselected host or
        // route enters any part of the query.
        let sel = selectors(&q.expr);
        assert!(!sel.is_empty(), "{} selects no migshaper metric", q.name());
        for (metric, matchers) in sel {
            // The fabric's series belong to the host, not to a route.
            let filters: &[&str] = if metric.starts_with("migshaper_fabric_") {
                &[r#"instance=~"$instance""#]
            } else {
                &[r#"instance=~"$instance""#, r#"route=~"$route""#]
            };
            for &filter in filters {
                assert!(
                    matchers.contains(filter),
                    "{}: {metric}{{{matchers}}} lacks {filter}: {}",
                    q.name(),
                    q.expr
                );
            }
        }
        // Per-route series stay apart per host: routes of the same name on two hosts are two
        // routes.
        for by in groupings(&q.expr) {
            assert!(
                !by.iter().any(|l| l == "route") || by.iter().any(|l| l == "instance"),
                "{}: `by ({})` merges routes of different instances: {}",
                q.name(),
                by.join(", "),
                q.expr
            );
        }
        let legend = q.legend.as_deref().unwrap_or("");
        assert!(
            !legend.contains("{{route}}") || legend.contains("{{instance}}"),
            "{}: legend {legend:?} names the route but not the instance",
            q.name()
        );
        substitute(&q.expr, "host-a.example:9464");
    }

    let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap();
    let datasource = read("dashboards/provisioning/datasources/migshaper.yaml");
    for needle in [
        "apiVersion: 1",
        "type: prometheus",
        "url: http://localhost:9090",
    ] {
        assert!(
            datasource.contains(needle),
            "datasource YAML lacks {needle}"
        );
    }
    assert!(datasource.contains(&format!("uid: {PROVISIONED_UID}")));
    let provider = read("dashboards/provisioning/dashboards/migshaper.yaml");
    for needle in ["apiVersion: 1", "type: file", "path: "] {
        assert!(
            provider.contains(needle),
            "dashboard provider YAML lacks {needle}"
        );
    }
}

/// A child process, killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `prometheus` on PATH. Missing is a failure, not a skip: the dashboard would go untested.
fn prometheus_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .expect(
            "the `prometheus` binary is not on PATH: install the Debian package prometheus; \
             scripts/test does",
        )
}

/// `migshaper serve` with its control API in front of `upstream`.
fn start_migshaper(upstream: SocketAddr) -> Spawned {
    let mut cmd = migshaper();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.to_string())
        .args(["--link", "10g", "--control", "127.0.0.1:0"])
        // A fabric, so that the fabric panel's series exist too.
        .args(["--fabric", "10g"]);
    Spawned::start(cmd)
}

/// A Prometheus on a free port scraping `target`'s `/metrics` every second.
fn start_prometheus(dir: &Path, target: SocketAddr) -> (Reaped, Log, SocketAddr) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: migshaper\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(prometheus_binary())
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn prometheus");
    let mut log = Log::read("prometheus", child.stderr.take().unwrap());
    let child = Reaped(child);
    // `... component=web msg="Listening on" address=127.0.0.1:PORT`
    let addr = log.wait_for("the port it listens on", |line| {
        let rest = &line[line.find("msg=\"Listening on\"")?..];
        let addr = rest.split("address=").nth(1)?.split_whitespace().next()?;
        addr.parse().ok()
    });
    (child, log, addr)
}

/// Blocking HTTP for the test: the body of a GET, whatever the status.
struct Http(ureq::Agent);

impl Http {
    fn new() -> Http {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build();
        Http(config.into())
    }

    fn get(&self, url: &str, query: &[(&str, &str)]) -> Result<(u16, String), String> {
        let mut req = self.0.get(url);
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
        Ok((status, body))
    }
}

/// Prometheus' HTTP API.
struct Prometheus {
    http: Http,
    base: String,
}

impl Prometheus {
    /// An instant query at the current time: the result's samples, or why it failed.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!("{}/api/v1/query", self.base);
        let (status, body) = self.http.get(&url, &[("query", expr)])?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}, {}: {}", v["errorType"], v["error"]));
        }
        match v["data"]["resultType"].as_str() {
            Some("vector") | Some("matrix") => {
                Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
            }
            // A scalar or string is one value.
            _ => Ok(vec![v["data"]["result"].clone()]),
        }
    }

    /// The value of the first sample of `expr`, if any.
    fn value(&self, expr: &str) -> Option<f64> {
        let samples = self.query(expr).ok()?;
        samples.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Polls until `expr` has a first sample value `ok` accepts.
    fn wait_until(&self, what: &str, expr: &str, ok: impl Fn(f64) -> bool, log: &Log) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.value(expr).filter(|v| ok(*v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: `{expr}` = {:?}; prometheus log:\n{}",
                    self.query(expr),
                    log.lines().join("\n")
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

fn load(name: &str) -> Vec<u8> {
    let path = repo().join("fixtures/hybrid-s16-128m").join(name);
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    zstd::decode_all(file).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                s.set_write_timeout(Some(WAIT)).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "migshaper never connected upstream"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Replays a captured migration through `via`: a source writes `s2d` and reads the return
/// path; the destination behind `dest` reads the stream and writes `d2s`, its final SHUT
/// (8 bytes) after the stream has ended, as QEMU's destination does.
fn replay(via: SocketAddr, dest: &TcpListener, s2d: &[u8], d2s: &[u8]) {
    let mut source = TcpStream::connect(via).expect("connect to the route");
    source.set_read_timeout(Some(WAIT)).unwrap();
    source.set_write_timeout(Some(WAIT)).unwrap();
    // The source speaks first (migshaper connects upstream on its first byte).
    source.write_all(&s2d[..1]).unwrap();
    let mut d = accept(dest);
    let back = std::thread::scope(|s| {
        let mut w = source.try_clone().unwrap();
        let send = s.spawn(move || {
            w.write_all(&s2d[1..]).expect("source: write the stream");
            w.shutdown(Shutdown::Write).unwrap();
        });
        let destination = s.spawn(move || {
            let split = d2s.len().saturating_sub(8);
            d.write_all(&d2s[..split]).unwrap();
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match d.read(&mut buf).expect("destination: read the stream") {
                    0 => break,
                    n => got += n,
                }
            }
            d.write_all(&d2s[split..]).unwrap();
            d.shutdown(Shutdown::Write).unwrap();
            got
        });
        let mut back = Vec::new();
        (&source)
            .read_to_end(&mut back)
            .expect("source: read the return path");
        send.join().unwrap();
        assert_eq!(destination.join().unwrap(), s2d.len(), "stream length");
        back
    });
    assert!(back == d2s, "the return path arrived changed");
}

/// `labels=value` of each sample, for the test's output.
fn summary(samples: &[Value]) -> String {
    let one = |s: &Value| {
        let labels: Vec<String> = s["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
            .collect();
        format!(
            "{{{}}}={}",
            labels.join(","),
            s["value"][1].as_str().unwrap_or("?")
        )
    };
    samples.iter().map(one).collect::<Vec<_>>().join(" ")
}

/// The sample names in a Prometheus text exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_dashboard_query_has_data_after_a_real_migration() {
    let started = Instant::now();
    let dash = dashboard();
    let queries = queries(&dash);
    let prometheus_bin = prometheus_binary();
    let (s2d, d2s) = (load("c0.s2d.bin.zst"), load("c0.d2s.bin.zst"));
    let tmp = TempDir::new("dashboards");

    let dest = TcpListener::bind("127.0.0.1:0").unwrap();
    let migshaper = start_migshaper(dest.local_addr().unwrap());
    let (route, control) = (migshaper.listen(), migshaper.control);
    let (_prometheus, plog, prom) = start_prometheus(&tmp.0, control);
    let prom = Prometheus {
        http: Http::new(),
        base: format!("http://{prom}"),
    };
    eprintln!(
        "{} with migshaper's control API on {control}, Prometheus on {} ({:.1?})",
        prometheus_bin.display(),
        prom.base,
        started.elapsed()
    );

    // A scrape before the migration, so that increases over the range start from zero.
    prom.wait_until(
        "the first scrape of migshaper",
        r#"up{job="migshaper"}"#,
        |v| v == 1.0,
        &plog,
    );
    let t = Instant::now();
    replay(route, &dest, &s2d, &d2s);
    eprintln!(
        "replayed {} MB through the route in {:.2?}",
        s2d.len() / 1_000_000,
        t.elapsed()
    );
    let completed =
        format!(r#"sum(migshaper_migrations_total{{route="{ROUTE}",outcome="completed"}})"#);
    prom.wait_until(
        "Prometheus to see the completed migration",
        &completed,
        |v| v >= 1.0,
        &plog,
    );
    // Two more scrapes, so that every rate window holds samples from after the migration.
    let last_scrape = r#"timestamp(up{job="migshaper"})"#;
    let seen = prom.value(last_scrape).unwrap();
    prom.wait_until("two more scrapes", last_scrape, |v| v >= seen + 2.0, &plog);

    let mut failures = Vec::new();

    // Every metric the dashboard names is exported.
    let (status, metrics) = prom
        .http
        .get(&format!("http://{control}/metrics"), &[])
        .unwrap();
    assert_eq!(status, 200, "GET /metrics: {metrics}");
    let exposed = exposed_names(&metrics);
    let mut referenced = BTreeSet::new();
    for q in &queries {
        metric_names(&q.expr, &mut referenced);
    }
    for name in ["instance", "route"] {
        metric_names(&variable_query(&dash, name), &mut referenced);
    }
    for name in &referenced {
        if !exposed.contains(name) {
            failures.push(format!("metric {name} is not in migshaper's /metrics"));
        }
    }

    // The `instance` label Prometheus gives the scraped migshaper: what the instance
    // variable must list and the panels filter by.
    let up = prom.query(r#"up{job="migshaper"}"#).unwrap();
    let instance = up[0]["metric"]["instance"]
        .as_str()
        .unwrap_or_else(|| panic!("up has no instance label: {up:?}"))
        .to_string();

    // The variables list the instance, and the route of that instance, as Grafana asks
    // Prometheus for them (the series API with the variable's selector).
    for (name, want) in [("instance", instance.as_str()), ("route", ROUTE)] {
        let query = variable_query(&dash, name);
        let (selector, label) = label_values(&query);
        let selector = substitute(selector, &instance);
        let (_, body) = prom
            .http
            .get(
                &format!("{}/api/v1/label/{label}/values", prom.base),
                &[("match[]", selector.as_str())],
            )
            .unwrap();
        let values: Value = serde_json::from_str(&body).unwrap();
        if !values["data"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == want))
        {
            failures.push(format!(
                "variable {name}: label_values({selector}, {label}) lacks {want:?}: {body}"
            ));
        }
    }

    // Every panel query succeeds with data. Data present now stays (counters, gauges and
    // cumulative histograms), so a short retry only covers a scrape landing in between.
    let deadline = Instant::now() + Duration::from_secs(5);
    let failed_queries = loop {
        let mut failed = Vec::new();
        let mut report = Vec::new();
        for q in &queries {
            let expr = substitute(&q.expr, &instance);
            match prom.query(&expr) {
                Ok(samples) if samples.is_empty() => {
                    failed.push(format!("{}: no data: {expr}", q.name()));
                }
                Ok(samples) => report.push(format!("{}: {}", q.name(), summary(&samples))),
                Err(e) => failed.push(format!("{}: {e}: {expr}", q.name())),
            }
        }
        if failed.is_empty() {
            eprintln!("{}", report.join("\n"));
        }
        if failed.is_empty() || Instant::now() > deadline {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    failures.extend(failed_queries);

    // With another host selected, nothing of this one shows.
    let elsewhere = "not-scraped.example:9464";
    for q in &queries {
        let expr = substitute(&q.expr, elsewhere);
        match prom.query(&expr) {
            Ok(samples) if samples.is_empty() => {}
            Ok(samples) => failures.push(format!(
                "{}: data for instance {elsewhere}, which Prometheus does not scrape: {}: {expr}",
                q.name(),
                summary(&samples)
            )),
            Err(e) => failures.push(format!("{}: {e}: {expr}", q.name())),
        }
    }

    assert!(
        failures.is_empty(),
        "{} problems ({} queries, {} metrics checked):\n{}\n\nmigshaper's /metrics:\n{metrics}\n\
         migshaper's log:\n{}",
        failures.len(),
        queries.len(),
        referenced.len(),
        failures.join("\n"),
        migshaper.log.lines().join("\n")
    );
    eprintln!(
        "{} queries and {} metrics checked in {:.1?}",
        queries.len(),
        referenced.len(),
        started.elapsed()
    );
}
