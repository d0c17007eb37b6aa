//! The control API, live metrics and link switching, against in-process servers and the
//! binary (CLI client, SIGHUP, start-up refusal).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    Running, Spawned, TempDir, check_seeded, config, first_seeded_byte, migshaper, route,
    send_seeded_after, start,
};
use migshaper::config::ControlConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn control(token: Option<&str>) -> Option<ControlConfig> {
    Some(ControlConfig {
        addr: "127.0.0.1:0".into(),
        token: token.map(str::to_string),
    })
}

/// One HTTP request (blocking client on a worker thread): status and body.
async fn http(
    method: &'static str,
    url: String,
    body: Option<String>,
    token: Option<&str>,
) -> (u16, String) {
    let token = token.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match method {
            "GET" => agent.get(&url).call(),
            _ => {
                let mut req = agent.put(&url).content_type("application/json");
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(body.unwrap_or_default())
            }
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap())
    })
    .await
    .unwrap()
}

async fn get_json(base: SocketAddr, path: &str) -> Value {
    let (status, body) = http("GET", format!("http://{base}{path}"), None, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn metrics(base: SocketAddr) -> String {
    let (status, body) = http("GET", format!("http://{base}/metrics"), None, None).await;
    assert_eq!(status, 200);
    body
}

/// The value of one series in a Prometheus text exposition (labels in any order).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    common::series(text, name, labels)
        .unwrap_or_else(|| panic!("no series {name}{labels:?} in\n{text}"))
}

fn phase_bytes(text: &str, route: &str, dir: &str, phase: &str) -> u64 {
    metric(
        text,
        "migshaper_bytes_total",
        &[("route", route), ("direction", dir), ("phase", phase)],
    ) as u64
}

/// Polls `cond` every 5 ms until it holds or `within` passes.
async fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_migrations_follow_a_migration_live_and_match_its_record() {
    let replay = migshaper::demo::Replay::bundled().unwrap();
    let dest = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(dest.local_addr().unwrap(), "1g")]);
    cfg.control = control(None);
    let server = start(cfg);
    let base = server.control.unwrap();
    let r = "test";

    let mut source = TcpStream::connect(server.addr()).await.unwrap();
    // The source speaks first (migshaper connects upstream on its first byte).
    source.write_all(&replay.main[..1]).await.unwrap();
    let (mut d, _) = dest.accept().await.unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let rp = replay.return_path.clone();
    let got = received.clone();
    let destination = tokio::spawn(async move {
        let split = rp.len().saturating_sub(8);
        d.write_all(&rp[..split]).await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = d.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.fetch_add(n as u64, Ordering::Relaxed);
        }
        d.write_all(&rp[split..]).await.unwrap();
        d.shutdown().await.unwrap();
    });

    // First 30 MB: the migration is in its first pre-copy pass. Hold the rest back.
    let first = 30_000_000;
    source.write_all(&replay.main[1..first]).await.unwrap();
    until(Duration::from_secs(30), "30 MB at the destination", || {
        received.load(Ordering::Relaxed) >= first as u64
    })
    .await;
    // The counters follow the bytes while the connection is open (up to the few hundred
    // bytes of a record header the parser may hold undecided, and the moment between a
    // write and its accounting).
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = metrics(base).await;
        let to_dst: u64 = ["setup", "precopy", "downtime", "postcopy"]
            .iter()
            .map(|p| phase_bytes(&m, r, "to_destination", p))
            .sum();
        assert!(to_dst <= first as u64, "{to_dst}");
        if to_dst + 512 >= first as u64 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "bytes_total stuck at {to_dst} of {first}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(phase_bytes(&m, r, "to_destination", "precopy") > 20_000_000);
    assert_eq!(
        metric(&m, "migshaper_migrations_active", &[("route", r)]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_migration_phase",
            &[("route", r), ("phase", "precopy")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_migration_phase",
            &[("route", r), ("phase", "setup")]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_connections_active",
            &[("route", r), ("channel", "main")]
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            "migshaper_shaping_wait_seconds_total",
            &[("route", r), ("direction", "to_destination")]
        ) > 0.0,
        "30 MB through a 1g link waits for tokens"
    );
    let live = get_json(base, "/migrations").await;
    let active = &live["active"][0];
    assert_eq!(active["phase"], "precopy", "{live}");
    assert_eq!(active["route"], r);
    assert!(
        active["ram_total_bytes"].as_u64().unwrap() >= 128 << 20,
        "{active}"
    );
    let ratio = active["ram_sent_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 1.0, "first pass under way: {ratio}");
    let route_view = get_json(base, "/routes/test").await;
    assert_eq!(route_view["migration"]["id"], active["id"]);
    // The link's fidelity so far, live: 30 MB carried towards the destination.
    let live_fidelity = &active["fidelity"]["to_destination"];
    assert!(
        live_fidelity["carried_bytes"].as_u64().unwrap() + 512 >= first as u64,
        "{live_fidelity}"
    );
    assert!(
        live_fidelity["ratio"].as_f64().unwrap() > 0.0,
        "{live_fidelity}"
    );
    assert!(
        live_fidelity["backlogged_seconds"].as_f64().unwrap() > 0.2,
        "{live_fidelity}"
    );

    // Switch the link mid-migration; the record notes it.
    let (status, body) = http(
        "PUT",
        format!("http://{base}/routes/test/link"),
        Some(r#"{"link":"10g"}"#.into()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let changed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(changed["link"]["link"], "10gbit");

    source.write_all(&replay.main[first..]).await.unwrap();
    source.shutdown().await.unwrap();
    let mut back = Vec::new();
    source.read_to_end(&mut back).await.unwrap();
    destination.await.unwrap();
    assert_eq!(back, replay.return_path, "return path arrives unchanged");

    let rec = loop {
        if let Some(rec) = server.routes[0].accounting.recent().pop() {
            break rec;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(rec.outcome, "completed", "{:?}", rec.cause);
    assert_eq!(rec.links.len(), 2, "{:?}", rec.links);
    assert_eq!(rec.links[0].link, "1gbit");
    assert_eq!(rec.links[1].link, "10gbit");

    let m = metrics(base).await;
    for (dir, bytes) in [
        ("to_destination", &rec.bytes.to_destination),
        ("to_source", &rec.bytes.to_source),
    ] {
        for (phase, n) in bytes {
            assert_eq!(phase_bytes(&m, r, dir, phase), *n, "{dir} {phase}");
        }
    }
    assert_eq!(
        metric(&m, "migshaper_precopy_passes_total", &[("route", r)]),
        f64::from(rec.precopy_passes)
    );
    assert!(rec.page_requests > 0);
    assert_eq!(
        metric(
            &m,
            "migshaper_postcopy_page_requests_total",
            &[("route", r)]
        ),
        rec.page_requests as f64
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_migrations_total",
            &[("route", r), ("outcome", "completed")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "migshaper_migrations_active", &[("route", r)]),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_migration_duration_seconds_count",
            &[("route", r), ("outcome", "completed")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_migration_phase_duration_seconds_count",
            &[("route", r), ("phase", "postcopy")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_connections_total",
            &[("route", r), ("channel", "main"), ("outcome", "closed")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_connections_active",
            &[("route", r), ("channel", "main")]
        ),
        0.0
    );
    assert_eq!(
        metric(&m, "migshaper_link_changes_total", &[("route", r)]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "migshaper_link_rate_bytes_per_second",
            &[("route", r), ("direction", "to_source")]
        ),
        1.25e9
    );
    // The record's fidelity agrees with the link's counters (this was the route's only
    // migration, and nothing else used its link).
    let f = &rec.fidelity.to_destination;
    let fdir = [("route", r), ("direction", "to_destination")];
    assert_eq!(
        metric(&m, "migshaper_link_carried_bytes_total", &fdir),
        f.carried_bytes as f64
    );
    assert_eq!(
        f.carried_bytes,
        rec.bytes.to_destination.values().sum::<u64>()
    );
    for cause in ["late", "destination"] {
        let labels = [
            ("route", r),
            ("direction", "to_destination"),
            ("cause", cause),
        ];
        let counted = metric(&m, "migshaper_link_shortfall_bytes_total", &labels);
        // The record closes its ledger when the migration ends; a scrape later may add a
        // little lost time of the last moments, never less.
        assert!(counted >= f.shortfall_bytes[cause] as f64, "{cause}");
    }
    let backlogged = metric(&m, "migshaper_link_backlogged_seconds_total", &fdir);
    assert!(
        backlogged >= f.backlogged_seconds - 1e-6,
        "{backlogged} {f:?}"
    );
    assert!(f.ratio.is_some_and(|x| x > 0.0 && x <= 1.0), "{f:?}");
    for phase in ["precopy", "postcopy"] {
        assert!(f.phases[phase].is_some(), "{phase}: {f:?}");
    }
    let done = get_json(base, "/migrations").await;
    assert_eq!(done["active"], json!([]));
    assert_eq!(
        done["recent"][0]["fidelity"]["to_destination"]["carried_bytes"],
        f.carried_bytes
    );
    assert_eq!(done["recent"][0]["id"], rec.id.as_str());
    server.shutdown().await;
}

#[tokio::test]
async fn control_api_validates_authorizes_and_leaves_the_link_alone_on_error() {
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(sink.local_addr().unwrap(), "1g")]);
    cfg.control = control(Some("s3cret"));
    let server = start(cfg);
    let base = server.control.unwrap();
    let url = format!("http://{base}/routes/test/link");
    let put = |body: &str, token: Option<&'static str>| {
        http("PUT", url.clone(), Some(body.to_string()), token)
    };

    assert_eq!(get_json(base, "/healthz").await["status"], "ok");
    let (s, b) = put(r#"{"link":"10g"}"#, None).await;
    assert_eq!(s, 401, "{b}");
    assert!(b.contains("Authorization: Bearer"), "{b}");
    let (s, b) = put(r#"{"link":"10g"}"#, Some("wrong")).await;
    assert_eq!((s, b.as_str()), (401, r#"{"error":"wrong token"}"#));
    for (body, status, needle) in [
        (r#"{"link":"10g""#, 400, "not valid JSON"),
        (
            r#"{"link":"10g","sped":"1"}"#,
            400,
            "unknown field \\\"sped\\\"",
        ),
        (r#"{"link":"warp9"}"#, 400, "field \\\"link\\\""),
        (r#"{"delay":"soon"}"#, 400, "field \\\"delay\\\""),
        (r#"{"delay":"100000000s"}"#, 400, "at most 10s"),
        (r#"{"burst":4}"#, 400, "field \\\"burst\\\""),
    ] {
        let (s, b) = put(body, Some("s3cret")).await;
        assert_eq!(s, status, "{body}: {b}");
        assert!(
            b.starts_with(r#"{"error":"#) && b.contains(needle),
            "{body}: {b}"
        );
    }
    let (s, _) = put(
        &format!(r#"{{"link":"{}"}}"#, "1".repeat(64 * 1024)),
        Some("s3cret"),
    )
    .await;
    assert_eq!(s, 413, "huge bodies are refused");
    let (s, b) = http(
        "PUT",
        format!("http://{base}/routes/nope/link"),
        Some(r#"{"link":"1g"}"#.into()),
        Some("s3cret"),
    )
    .await;
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("routes: test"), "{b}");
    // Nothing above changed the link.
    let link = get_json(base, "/routes/test/link").await;
    assert_eq!(link["link"], "1gbit");
    assert_eq!(server.routes[0].link.shape().rate, "1g".parse().unwrap());

    let (s, b) = put(r#"{"link":"2.5g","delay":"1ms"}"#, Some("s3cret")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(server.routes[0].link.shape().rate, "2.5g".parse().unwrap());
    assert_eq!(server.routes[0].link.delay(), Duration::from_millis(1));
    // A subset leaves the rest as it was.
    let (s, _) = put(r#"{"burst":"4ms"}"#, Some("s3cret")).await;
    assert_eq!(s, 200);
    let link = get_json(base, "/routes/test/link").await;
    assert_eq!(
        (
            link["link"].as_str(),
            link["burst"].as_str(),
            link["delay"].as_str()
        ),
        (Some("2.5gbit"), Some("4ms"), Some("1ms"))
    );
    for (method, path, status) in [
        ("GET", "/nowhere", 404),
        ("GET", "/routes/nope", 404),
        ("PUT", "/routes/test", 405),
    ] {
        let url = format!("http://{base}{path}");
        let (s, b) = http(method, url, Some("{}".into()), Some("s3cret")).await;
        assert_eq!(s, status, "{method} {path}: {b}");
        assert!(b.starts_with(r#"{"error":"#), "{method} {path}: {b}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_link_changes_end_in_the_last_accepted_one() {
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(sink.local_addr().unwrap(), "1g")]);
    cfg.control = control(None);
    let server = start(cfg);
    let base = server.control.unwrap();
    // Eight clients at once (each request on its own task and blocking thread).
    let clients: Vec<_> = (1..=8)
        .map(|i| {
            tokio::spawn(http(
                "PUT",
                format!("http://{base}/routes/test/link"),
                Some(format!(r#"{{"link":"{i}00mbit","delay":"{i}ms"}}"#)),
                None,
            ))
        })
        .collect();
    let pair = |v: &Value| {
        (
            v["link"].as_str().unwrap().to_string(),
            v["delay"].as_str().unwrap().to_string(),
        )
    };
    for (i, c) in (1..=8).zip(clients) {
        let (s, b) = c.await.unwrap();
        assert_eq!(s, 200, "{b}");
        // Each answer shows its own request's link, never a mix of two.
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(
            pair(&v["link"]),
            (format!("{i}00mbit"), format!("{i}ms")),
            "{b}"
        );
    }
    // The final state is one whole request's link, and the link in force agrees.
    let link = get_json(base, "/routes/test/link").await;
    let fin = pair(&link);
    let digit = fin.0.chars().next().unwrap();
    assert_eq!(fin.1, format!("{digit}ms"), "{fin:?}");
    assert_eq!(
        server.routes[0].link.delay(),
        Duration::from_millis(u64::from(digit.to_digit(10).unwrap()))
    );
    let m = metrics(base).await;
    assert_eq!(
        metric(&m, "migshaper_link_changes_total", &[("route", "test")]),
        8.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_change_reaches_every_open_connection_and_drops_nothing() {
    const CONNS: u64 = 4;
    const LEN: u64 = 24_000_000;
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(sink.local_addr().unwrap(), "100mbit")]);
    cfg.control = control(None);
    let server = start(cfg);
    let base = server.control.unwrap();
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..CONNS).map(|_| AtomicU64::new(0)).collect());
    let mut checks = Vec::new();
    let mut sends = Vec::new();
    for i in 0..CONNS {
        let mut c = TcpStream::connect(server.addr()).await.unwrap();
        c.write_all(&[first_seeded_byte(100 + i)]).await.unwrap();
        let (up, _) = sink.accept().await.unwrap();
        let counters = counters.clone();
        checks.push(tokio::spawn(async move {
            // Count as bytes arrive, and check them all.
            let (r, _w) = up.into_split();
            let counted = CountingReader {
                inner: r,
                count: counters,
                i: i as usize,
            };
            check_seeded(counted, 100 + i, LEN).await.unwrap()
        }));
        sends.push(tokio::spawn(async move {
            let (_r, w) = c.into_split();
            send_seeded_after(w, 100 + i, LEN, 1).await.unwrap();
        }));
    }
    // Let the 100 Mb/s link fill.
    until(Duration::from_secs(30), "traffic at 100 Mb/s", || {
        counters.iter().all(|c| c.load(Ordering::Relaxed) > 200_000)
    })
    .await;
    let (s, b) = http(
        "PUT",
        format!("http://{base}/routes/test/link"),
        Some(r#"{"link":"1g"}"#.into()),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let secs = t0.elapsed().as_secs_f64();
    let after: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    // At 100 Mb/s each of 4 connections gets 3.1 MB/s. In the window from 100 ms to about
    // 250 ms after the switch each must be clearly above that: the window is what tests
    // "within 100 ms"; the bound (1 Gb/s shares are 31 MB/s) is loose for a busy machine.
    for i in 0..CONNS as usize {
        let rate = (after[i] - before[i]) as f64 / secs;
        assert!(
            rate > 3.0 * 100e6 / 8.0 / CONNS as f64,
            "connection {i} still at {:.1} MB/s after the switch",
            rate / 1e6
        );
    }
    for s in sends {
        s.await.unwrap();
    }
    for (i, c) in checks.into_iter().enumerate() {
        c.await
            .unwrap()
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    server.shutdown().await;
}

/// Counts bytes as they are read.
struct CountingReader<R> {
    inner: R,
    count: Arc<Vec<AtomicU64>>,
    i: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.count[self.i].fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

#[test]
fn a_non_loopback_control_address_needs_a_token() {
    let mut cfg = config(vec![route("127.0.0.1:9".parse().unwrap(), "1g")]);
    cfg.control = Some(ControlConfig {
        addr: "0.0.0.0:0".into(),
        token: None,
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let e = migshaper::app::Server::bind(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("without a token") && e.contains("--control-token"),
        "{e}"
    );
    cfg.control.as_mut().unwrap().token = Some("t".into());
    let server = migshaper::app::Server::bind(&cfg).unwrap();
    assert!(!server.control_addr().unwrap().ip().is_loopback());

    // The binary refuses at start-up with exit code 2.
    let out = migshaper()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--link", "1g", "--control", "0.0.0.0:0"])
        .env_remove("MIGSHAPER_CONTROL_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without a token"), "{err}");
}

/// Runs the CLI against `base` on a worker thread: exit code, stdout, stderr.
async fn cli(base: SocketAddr, args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let mut cmd = migshaper();
    cmd.args(args)
        .env("MIGSHAPER_CONTROL", format!("http://{base}"));
    match token {
        Some(t) => cmd.env("MIGSHAPER_CONTROL_TOKEN", t),
        None => cmd.env_remove("MIGSHAPER_CONTROL_TOKEN"),
    };
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_gets_sets_schedules_and_reports_server_errors() {
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(sink.local_addr().unwrap(), "1g")]);
    cfg.control = control(Some("tok"));
    let server: Running = start(cfg);
    let base = server.control.unwrap();

    let (code, out, err) = cli(base, &["link", "get"], None).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("test: link 1gbit burst 4ms framing none"),
        "{out}"
    );

    let (code, _, err) = cli(base, &["link", "set", "10g"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("401") && err.contains("token"), "{err}");
    let (code, out, err) = cli(base, &["link", "set", "10g", "--delay", "2ms"], Some("tok")).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("link 10gbit") && out.contains("delay 2ms"),
        "{out}"
    );
    let (code, _, err) = cli(
        base,
        &["link", "set", "fast", "--route", "test"],
        Some("tok"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("400") && err.contains("field \"link\""),
        "{err}"
    );
    let (code, _, err) = cli(base, &["link", "set", "1g", "--route", "nope"], Some("tok")).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    let (code, out, err) = cli(base, &["status"], None).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no migration in progress"), "{out}");

    // The schedule script, with a short sequence.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/link-schedule");
    let mut cmd = std::process::Command::new(script);
    cmd.args(["100mbit for 50ms, 2.5g for 50ms, 1g"])
        .env("MIGSHAPER", env!("CARGO_BIN_EXE_migshaper"))
        .env("MIGSHAPER_CONTROL", format!("http://{base}"))
        .env("MIGSHAPER_CONTROL_TOKEN", "tok");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(
        stdout.lines().last().unwrap().contains("link 1gbit"),
        "{stdout}"
    );
    assert_eq!(server.routes[0].link.shape().rate, "1g".parse().unwrap());
    let m = metrics(base).await;
    assert_eq!(
        metric(&m, "migshaper_link_changes_total", &[("route", "test")]),
        4.0
    );

    // No server there: a clear error, exit 1.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let (code, _, err) = cli(dead_addr, &["status"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the control API"), "{err}");
    server.shutdown().await;
}

#[test]
fn sighup_reloads_link_settings_and_keeps_them_on_a_bad_file() {
    let dir = TempDir::new("hup");
    let path = dir.path().join("routes.toml");
    let file = |link: &str, delay: &str| {
        format!(
            "[[route]]\nname = \"lab\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nlink = \"{link}\"\ndelay = \"{delay}\"\n"
        )
    };
    std::fs::write(&path, file("1g", "0s")).unwrap();
    let mut cmd = migshaper();
    cmd.args(["serve", "--control", "127.0.0.1:0", "--config"])
        .arg(&path);
    let mut server = Spawned::start(cmd);
    let addr = server.control;
    let get_link = || -> Value {
        let mut resp = ureq::get(format!("http://{addr}/routes/lab/link"))
            .call()
            .unwrap();
        resp.body_mut().read_json().unwrap()
    };
    assert_eq!(get_link()["link"], "1gbit");

    std::fs::write(&path, file("10g", "3ms")).unwrap();
    server.signal("HUP");
    let changed = server.log.wait_message("link changed");
    assert_eq!(changed["origin"], "SIGHUP");
    let link = get_link();
    assert_eq!(
        (link["link"].as_str(), link["delay"].as_str()),
        (Some("10gbit"), Some("3ms"))
    );

    std::fs::write(&path, file("sideways", "3ms")).unwrap();
    server.signal("HUP");
    let failed = server
        .log
        .wait_message("config reload failed; the running settings stay in force");
    assert!(
        failed["error"].as_str().unwrap().contains("sideways"),
        "{failed}"
    );
    assert_eq!(get_link()["link"], "10gbit");

    server.signal("TERM");
    assert!(server.wait_exit().0.success());
}

#[test]
fn sighup_without_a_config_file_is_ignored_not_fatal() {
    let mut cmd = migshaper();
    cmd.args(["serve", "--listen", "127.0.0.1:0"]).args([
        "--upstream",
        "127.0.0.1:9",
        "--link",
        "1g",
        "--control",
        "127.0.0.1:0",
    ]);
    let mut server = Spawned::start(cmd);
    let first = server.log.logged("listening");
    assert_eq!(first["route"], "default");
    // Everything is logged after the SIGHUP handler is installed: signalling now is safe.
    for _ in 0..3 {
        server.signal("HUP");
    }
    server
        .log
        .wait_message("SIGHUP: nothing to reload (started without --config); ignored");
    let healthy: Value = ureq::get(format!("http://{}/healthz", server.control))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(healthy["status"], "ok");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server survived SIGHUP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_control_clients_are_cut_off_and_cannot_lock_others_out() {
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config(vec![route(sink.local_addr().unwrap(), "1g")]);
    cfg.control = control(None);
    let server = start(cfg);
    let base = server.control.unwrap();
    // More silent clients than the API serves at once, and one that sends half a head.
    let mut silent = Vec::new();
    for _ in 0..migshaper::control::MAX_CLIENTS + 8 {
        silent.push(TcpStream::connect(base).await.unwrap());
    }
    let mut partial = TcpStream::connect(base).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    // A well-behaved client still gets its answer once the silent ones time out.
    let health = get_json(base, "/healthz").await;
    assert_eq!(health["status"], "ok");
    let waited = t0.elapsed();
    assert!(
        waited < migshaper::control::HEADER_TIMEOUT * 4,
        "healthz took {waited:?}"
    );
    // The silent and the partial clients are closed by the server.
    let mut buf = [0u8; 256];
    for c in silent.iter_mut().chain(std::iter::once(&mut partial)) {
        let r = tokio::time::timeout(migshaper::control::HEADER_TIMEOUT * 4, async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // a 408 answer, then the close
                }
            }
        })
        .await;
        assert!(
            r.is_ok(),
            "a client that sent no complete head stayed connected"
        );
    }
    server.shutdown().await;
}

#[test]
fn delays_above_ten_seconds_are_refused_at_start_up_with_exit_2() {
    let out = migshaper()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--link", "1g", "--delay", "100000000s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--delay") && err.contains("at most 10s"),
        "{err}"
    );
    // The same in a configuration file: the error names the route's field.
    let dir = common::TempDir::new("delay");
    let file = dir.path().join("routes.toml");
    std::fs::write(
        &file,
        "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
         link = \"1g\"\ndelay = \"11s\"\n",
    )
    .unwrap();
    let out = migshaper()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("delay") && err.contains("at most 10s"),
        "{err}"
    );
}
