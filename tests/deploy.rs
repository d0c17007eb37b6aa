//! The deployment files in `deploy/`: the systemd unit, the example configuration and the
//! Prometheus scrape configuration.
//!
//! The unit is checked by `systemd-analyze` (verify, and its offline security review); its
//! `ExecStart` is expanded as systemd expands it and run with the built binary on a copy of
//! `deploy/migshaper.toml` whose addresses are moved to free loopback ports; its `ExecReload`
//! command is run as written and must make the server apply a link change from the file, and
//! SIGTERM must end it with status 0 within `TimeoutStopSec`. The Prometheus configuration is
//! checked by `promtool check config`. Missing tools are failures, not skips: scripts/test
//! installs them (Debian packages `systemd`, `prometheus`, `procps`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Spawned, TempDir, migshaper};
use migshaper::config::Config;

const UNIT: &str = "deploy/systemd/migshaper.service";
const CONFIG: &str = "deploy/migshaper.toml";
const PROMETHEUS: &str = "deploy/prometheus/prometheus.yml";
/// Where the unit expects the binary (`ExecStart`'s first word).
const INSTALLED_BINARY: &str = "/usr/local/bin/migshaper";
/// Where the unit expects the configuration.
const INSTALLED_CONFIG: &str = "/etc/migshaper/migshaper.toml";
/// The highest overall exposure `systemd-analyze security` may give the unit, in tenths
/// (1.2 with systemd 252 on VM-C, Debian 12).
const MAX_EXPOSURE_TENTHS: u32 = 15;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    let p = repo().join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// A program on PATH. Missing is a failure, not a skip: the file would go unchecked.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH: install the Debian package {package}; scripts/test does"
            )
        })
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()))
}

fn text(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The `[Service]` section of a unit: each key's values in order (`Environment=` and
/// `SystemCallFilter=` may repeat).
struct Service(BTreeMap<String, Vec<String>>);

impl Service {
    fn parse(unit: &str) -> Service {
        let mut section = String::new();
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (n, line) in unit.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "{UNIT}:{}: continuation lines are not handled by this test",
                n + 1
            );
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_end_matches(']').to_string();
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{UNIT}:{}: not KEY=VALUE: {line}", n + 1));
            if section == "Service" {
                keys.entry(k.to_string()).or_default().push(v.to_string());
            }
        }
        Service(keys)
    }

    /// The only value of `key`.
    fn one(&self, key: &str) -> &str {
        match self.0.get(key).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{UNIT}: expected one {key}=, found {other:?}"),
        }
    }

    /// `Environment=` assignments (`NAME=value`, no quoting in this unit).
    fn environment(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for line in self.0.get("Environment").into_iter().flatten() {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("Environment={line}: not NAME=value"));
            assert!(
                !v.contains(char::is_whitespace) && !v.contains('"'),
                "Environment={line}: this test expands unquoted single words only"
            );
            env.insert(k.to_string(), v.to_string());
        }
        env
    }

    /// A command line expanded as systemd expands `ExecStart=`: `${NAME}` in place, `$NAME`
    /// as a word of its own split at whitespace (so an empty value is no argument).
    fn command(&self, key: &str, env: &BTreeMap<String, String>) -> Vec<String> {
        let line = self.one(key);
        let mut argv = Vec::new();
        for word in line.split_whitespace() {
            if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
                let value = env
                    .get(name)
                    .unwrap_or_else(|| panic!("{key}: ${name} has no Environment= default"));
                argv.extend(value.split_whitespace().map(str::to_string));
                continue;
            }
            let mut w = word.to_string();
            while let Some(start) = w.find("${") {
                let end = start + w[start..].find('}').expect("unclosed ${");
                let name = &w[start + 2..end];
                let value = env
                    .get(name)
                    .unwrap_or_else(|| panic!("{key}: ${{{name}}} has no Environment= default"));
                w.replace_range(start..=end, value);
            }
            argv.push(w);
        }
        argv
    }
}

fn service() -> Service {
    Service::parse(&read(UNIT))
}

/// The value after `flag` in `argv`.
fn flag_value<'a>(argv: &'a mut [String], flag: &str) -> &'a mut String {
    let i = argv
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {argv:?}"));
    argv.get_mut(i + 1)
        .unwrap_or_else(|| panic!("{flag} without a value"))
}

/// The unit with `ExecStart`'s binary replaced by the one cargo built, in `dir`.
fn unit_with_built_binary(dir: &Path) -> PathBuf {
    let unit = read(UNIT);
    let installed = format!("\nExecStart={INSTALLED_BINARY} ");
    assert_eq!(
        unit.matches(&installed).count(),
        1,
        "{UNIT}: one ExecStart= of {INSTALLED_BINARY}"
    );
    let built = format!("\nExecStart={} ", env!("CARGO_BIN_EXE_migshaper"));
    let path = dir.join("migshaper.service");
    std::fs::write(&path, unit.replace(&installed, &built)).unwrap();
    path
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze", "systemd");
    let tmp = TempDir::new("deploy-verify");
    let unit = unit_with_built_binary(tmp.path());
    let o = run(Command::new(&analyze).arg("verify").arg(&unit));
    // verify exits 0 on unknown keys and bad values (it only warns): any output is a finding.
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "systemd-analyze verify {}: {}",
        unit.display(),
        text(&o)
    );

    // Verify does look: a key it does not know is reported.
    let bad = tmp.path().join("bad.service");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(
        &bad,
        unit_text.replace("NoNewPrivileges=", "NoNewPrivilege="),
    )
    .unwrap();
    let o = run(Command::new(&analyze).arg("verify").arg(&bad));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("NoNewPrivilege"),
        "systemd-analyze verify did not report an unknown key: {}",
        text(&o)
    );
}

#[test]
fn the_unit_is_hardened() {
    let analyze = tool("systemd-analyze", "systemd");
    let tmp = TempDir::new("deploy-security");
    let unit = unit_with_built_binary(tmp.path());
    let o = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE_TENTHS}"))
        .arg(&unit));
    let out = String::from_utf8_lossy(&o.stdout);
    let overall = out
        .lines()
        .chain(String::from_utf8_lossy(&o.stderr).lines())
        .find(|l| l.contains("Overall exposure level"))
        .map(str::to_string);
    assert!(
        o.status.success(),
        "systemd-analyze security: exposure above {}.{}: {overall:?}\n{}",
        MAX_EXPOSURE_TENTHS / 10,
        MAX_EXPOSURE_TENTHS % 10,
        text(&o)
    );
    eprintln!("{}", overall.unwrap_or_default());

    let s = service();
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("DynamicUser", "yes"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert_eq!(s.one(key), want, "{UNIT}: {key}");
    }
    let nofile: u64 = s
        .one("LimitNOFILE")
        .parse()
        .expect("LimitNOFILE is a number");
    assert!(nofile >= 65536, "LimitNOFILE={nofile}");
}

#[test]
fn the_example_config_loads_and_fits_the_unit() {
    let config = Config::from_file(&repo().join(CONFIG)).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["to-dst-b", "to-dst-c"]);
    assert!(
        config.fabric.is_some(),
        "the example has this host's [fabric] share"
    );
    for r in &config.routes {
        let listen: std::net::SocketAddr = r.listen.parse().unwrap();
        assert!(
            listen.ip().is_loopback() && listen.port() >= 1024,
            "route {}: {listen}: the unit has no capabilities; sources are local",
            r.name
        );
        assert!(
            !(49152..=49215).contains(&listen.port()),
            "route {}: port in libvirt's automatic range",
            r.name
        );
    }

    let s = service();
    // Records go where the dynamic user may write: the unit's StateDirectory.
    let state = Path::new("/var/lib").join(s.one("StateDirectory"));
    let records = config
        .records
        .as_deref()
        .expect("the example keeps records");
    assert!(
        records.starts_with(&state),
        "records {} outside the StateDirectory {} (ProtectSystem=strict)",
        records.display(),
        state.display()
    );
    // systemd's stop timeout leaves the drain time to finish.
    let stop = humantime::parse_duration(s.one("TimeoutStopSec")).unwrap();
    assert!(
        config.drain_timeout + Duration::from_secs(5) <= stop,
        "drain_timeout {:?} vs TimeoutStopSec {stop:?}",
        config.drain_timeout
    );
}

/// `deploy/migshaper.toml` with every listen port 0 and the records in `dir`.
fn local_copy(dir: &Path, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let mut table: toml::Table = read(CONFIG).parse().expect("the example is TOML");
    let records = dir.join("migrations.jsonl");
    table.insert(
        "records".into(),
        toml::Value::String(records.display().to_string()),
    );
    for route in table["route"].as_array_mut().expect("[[route]] tables") {
        let listen = route["listen"].as_str().unwrap();
        let host = listen.rsplit_once(':').unwrap().0.to_string();
        route["listen"] = toml::Value::String(format!("{host}:0"));
    }
    edit(&mut table);
    let path = dir.join("migshaper.toml");
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    path
}

/// `ExecStart` as systemd runs it with the unit's defaults, for the built binary, the
/// configuration at `config` and the control API on a free loopback port. The first word is
/// checked and dropped.
fn exec_start(config: &Path) -> Vec<String> {
    let s = service();
    let mut argv = s.command("ExecStart", &s.environment());
    assert_eq!(argv[0], INSTALLED_BINARY);
    assert_eq!(&argv[1..4], ["serve", "--config", INSTALLED_CONFIG]);
    *flag_value(&mut argv, "--config") = config.display().to_string();
    let control = flag_value(&mut argv, "--control");
    let default: std::net::SocketAddr = control.parse().expect("--control default IP:PORT");
    assert!(
        default.ip().is_loopback(),
        "the default control address {default} needs no token only on loopback"
    );
    *control = "127.0.0.1:0".into();
    argv.remove(0);
    argv
}

#[test]
fn exec_start_serves_the_example_and_exec_reload_applies_it() {
    let tmp = TempDir::new("deploy-serve");
    let config = local_copy(tmp.path(), |_| {});
    let argv = exec_start(&config);

    // Under a low open-files limit the server says how many it needs: no more than the
    // unit's LimitNOFILE. (Lowering a limit needs no privilege.)
    let mut cmd = Command::new(tool("prlimit", "util-linux"));
    cmd.args(["--nofile=256:256", "--"])
        .arg(env!("CARGO_BIN_EXE_migshaper"))
        .args(&argv);
    let mut server = Spawned::start(cmd);
    let names: Vec<&str> = server.routes.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["to-dst-b", "to-dst-c"], "routes of {CONFIG}");
    let warned = server.log.json().into_iter().find(|v| v["needed"].is_u64());
    let needed = warned
        .as_ref()
        .and_then(|v| v["needed"].as_u64())
        .unwrap_or_else(|| {
            panic!(
                "no open-files warning at limit 256: {:?}",
                server.log.lines()
            )
        });
    let limit: u64 = service().one("LimitNOFILE").parse().unwrap();
    assert!(
        needed <= limit,
        "{CONFIG} needs {needed} descriptors; the unit's LimitNOFILE is {limit}"
    );

    // `systemctl reload`: ExecReload as written, $MAINPID being the server.
    let changed = local_copy(tmp.path(), |t| {
        t["route"][0]["link"] = toml::Value::String("2.5gbit".into());
        t["fabric"]["rate"] = toml::Value::String("7gbit".into());
    });
    assert_eq!(changed, config);
    let reload = service()
        .one("ExecReload")
        .replace("$MAINPID", &server.pid().to_string());
    let words: Vec<&str> = reload.split_whitespace().collect();
    let o = run(Command::new(words[0]).args(&words[1..]));
    assert!(o.status.success(), "ExecReload {reload}: {}", text(&o));
    let change = server.log.wait_message("link changed");
    assert_eq!(change["origin"], "SIGHUP", "{change}");
    assert_eq!(change["route"], "to-dst-b", "{change}");
    assert_ne!(change["link"], change["previous_link"], "{change}");
    let fabric = server.log.wait_for("the fabric change", |line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v["message"]
            .as_str()?
            .starts_with("config reload: fabric changed")
            .then_some(v)
    });
    assert_eq!(fabric["rate"], "7gbit", "{fabric}");

    // `systemctl stop`: SIGTERM (the unit keeps systemd's KillSignal), status 0, so
    // Restart=on-failure leaves it stopped, within TimeoutStopSec.
    assert!(!service().0.contains_key("KillSignal"));
    server.signal("TERM");
    let (status, took) = server.wait_exit();
    let stop = humantime::parse_duration(service().one("TimeoutStopSec")).unwrap();
    assert!(status.success(), "SIGTERM: {status}");
    assert!(
        took < stop,
        "stopping took {took:?}, TimeoutStopSec is {stop:?}"
    );
}

#[test]
fn exec_start_with_a_bad_config_exits_2_which_the_unit_does_not_restart() {
    let tmp = TempDir::new("deploy-bad");
    let config = local_copy(tmp.path(), |t| {
        t["route"][1]["link"] = toml::Value::String("10q".into());
    });
    let o = run(migshaper().args(exec_start(&config)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        err.contains("10q") && err.contains(&config.display().to_string()),
        "{err}"
    );
    assert_eq!(service().one("RestartPreventExitStatus"), "2");
}

#[test]
fn the_prometheus_config_passes_promtool() {
    let promtool = tool("promtool", "prometheus");
    let path = repo().join(PROMETHEUS);
    let o = run(Command::new(&promtool).args(["check", "config"]).arg(&path));
    assert!(o.status.success(), "promtool check config: {}", text(&o));

    // promtool does look: a scrape timeout above the interval is refused.
    let tmp = TempDir::new("deploy-promtool");
    let bad = tmp.path().join("prometheus.yml");
    let yml = read(PROMETHEUS);
    assert!(
        yml.contains("scrape_timeout: 4s"),
        "the test edits this line"
    );
    std::fs::write(
        &bad,
        yml.replace("scrape_timeout: 4s", "scrape_timeout: 1m"),
    )
    .unwrap();
    let o = run(Command::new(&promtool).args(["check", "config"]).arg(&bad));
    assert!(!o.status.success(), "promtool accepted {}", text(&o));

    // The job the dashboard expects, several hosts, and the scrape interval the provisioned
    // Grafana datasource assumes for $__rate_interval.
    assert!(yml.contains("job_name: migshaper"));
    let targets = yml
        .lines()
        .filter(|l| l.trim_start().starts_with("- targets:"))
        .count();
    assert!(targets >= 3, "{targets} static_configs");
    let datasource = read("dashboards/provisioning/datasources/migshaper.yaml");
    let interval = |text: &str, key: &str| -> String {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}"))
            .split('#')
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        interval(&yml, "scrape_interval:"),
        interval(&datasource, "timeInterval:"),
        "Prometheus' scrape_interval and the Grafana datasource's timeInterval"
    );
}
