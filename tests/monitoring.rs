//! The chart's alert rules and Grafana dashboard against what the processes really export.
//!
//! Every PromQL expression of `charts/switchboard/files/prometheus-rules.yaml` and of every
//! panel of `charts/switchboard/files/dashboard.json` is parsed (promql-parser), the dashboard's
//! queries are also checked by `promtool check rules` as recording rules of a generated rules
//! file, and every metric they select must be on the `/metrics` of a running process: the SIP
//! node and the REST API of `switchboard local` on `examples/`, and `switchboard operator`.
//! A label a selector matches on must be a label of that metric's series.
//!
//! What each family needs to show, so that the check is honest about it:
//! - node: the trunk series (calls, durations, active calls, limits, registration) exist at 0
//!   from the moment a trunk is configured, drain and store series from the start; the test
//!   waits for the node to apply the examples' configuration;
//! - REST API: `switchboard_api_requests_total` has a series once a request was served; the
//!   test's own `GET /healthz` is that request;
//! - operator: the kind-labelled series exist at 0 from the start; the operator runs without a
//!   reachable Kubernetes API server here (it serves `/metrics` before it connects, and keeps
//!   retrying the leader Lease), so `switchboard_resource_condition`, whose series name
//!   resources, is checked by its `# HELP`/`# TYPE` declaration, which the operator prints for a
//!   family with no series yet (and its labels by the operator's unit test).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde::Deserialize;

const WAIT: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An expression with where it comes from (alert name or panel title).
struct Query {
    origin: String,
    expr: String,
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
}

fn rule_queries() -> Vec<Query> {
    let path = root().join("charts/switchboard/files/prometheus-rules.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let file: RuleFile = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.groups
        .into_iter()
        .flat_map(|g| g.rules)
        .map(|r| Query { origin: format!("rule {}", r.alert.or(r.record).unwrap_or_default()), expr: r.expr })
        .collect()
}

/// The dashboard's panels' queries; the dashboard must be valid JSON with at least one panel.
fn dashboard_queries() -> Vec<Query> {
    let path = root().join("charts/switchboard/files/dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("the dashboard has panels") {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("untitled");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no queries");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: a target without expr"));
            queries.push(Query { origin: format!("panel {title:?}"), expr: expr.to_string() });
        }
    }
    queries
}

/// A metric a query selects, with the label names its matchers use.
#[derive(Default)]
struct Selected {
    labels: BTreeSet<String>,
    origins: BTreeSet<String>,
}

struct Selectors<'a> {
    origin: &'a str,
    found: &'a mut BTreeMap<String, Selected>,
    nameless: Vec<String>,
}

impl Selectors<'_> {
    fn add(&mut self, selector: &parser::VectorSelector) {
        let Some(name) = selector.name.clone() else {
            self.nameless.push(format!("{}: {selector}", self.origin));
            return;
        };
        let entry = self.found.entry(name).or_default();
        entry.origins.insert(self.origin.to_string());
        for matcher in &selector.matchers.matchers {
            if matcher.name != "__name__" {
                entry.labels.insert(matcher.name.clone());
            }
        }
    }
}

impl ExprVisitor for Selectors<'_> {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(selector) => self.add(selector),
            Expr::MatrixSelector(matrix) => self.add(&matrix.vs),
            _ => {}
        }
        Ok(true)
    }
}

/// Every metric the queries select; panics naming the query that does not parse.
fn selected(queries: &[Query]) -> BTreeMap<String, Selected> {
    let mut found = BTreeMap::new();
    let mut problems = Vec::new();
    for query in queries {
        match parser::parse(&query.expr) {
            Ok(expr) => {
                let mut visitor = Selectors { origin: &query.origin, found: &mut found, nameless: Vec::new() };
                let _ = walk_expr(&mut visitor, &expr);
                problems.extend(visitor.nameless.into_iter().map(|s| format!("selector without a metric name: {s}")));
            }
            Err(error) => problems.push(format!("{} does not parse: {error}\n{}", query.origin, query.expr)),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    found
}

/// The families of one `/metrics` text: name → label names of its series (empty set for a
/// family that is only declared).
#[derive(Default, Debug)]
struct Exported {
    families: BTreeMap<String, Family>,
}

#[derive(Default, Debug)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
    series: usize,
    source: String,
}

impl Exported {
    fn add(&mut self, source: &str, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                let family = self.families.entry(name.to_string()).or_default();
                family.kind = kind.trim().to_string();
                family.source = source.to_string();
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).expect("a sample line");
            let name = &line[..end];
            let family_name = self.family_of(name);
            let family = self.families.entry(family_name).or_default();
            family.series += 1;
            if line[end..].starts_with('{') {
                let labels = &line[end + 1..line.rfind('}').expect("closing brace")];
                for pair in labels.split("\",") {
                    if let Some((label, _)) = pair.split_once('=') {
                        family.labels.insert(label.trim().to_string());
                    }
                }
            }
        }
    }

    /// `x_bucket`, `x_sum`, `x_count` of a histogram `x` belong to `x`.
    fn family_of(&self, sample: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && self.families.get(base).is_some_and(|f| f.kind == "histogram" || f.kind == "summary")
            {
                return base.to_string();
            }
        }
        sample.to_string()
    }

    /// The family a selected name belongs to, with the name as a histogram's sample.
    fn lookup(&self, selected: &str) -> Option<&Family> {
        self.families.get(&self.family_of(selected)).filter(|f| !f.kind.is_empty())
    }
}

/// A plain HTTP GET on loopback (the processes under test speak HTTP/1.1).
fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.into() };
    Some((code, body))
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process stopped by PID (SIGTERM, bounded wait, SIGKILL) when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(command: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `address` `path` until `ready` accepts the body; panics with the process log after
/// [`WAIT`].
fn wait_for(process: &Process, address: &str, path: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((200, body)) = http_get(address, path)
            && ready(&body)
        {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: not there after {WAIT:?}; log:\n{}", process.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// `promtool check rules` on the dashboard's queries as recording rules: Prometheus' own parser
/// accepts each of them.
fn promtool_checks_dashboard(queries: &[Query], dir: &Path) {
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing in CI (Debian package `prometheus`)");
        println!(
            "monitoring: promtool not installed (Debian package `prometheus`): dashboard queries parsed by promql-parser only"
        );
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let expr = serde_json::to_string(&query.expr).unwrap(); // a JSON string is a YAML string
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {expr}\n"));
    }
    let path = dir.join("dashboard-rules.yaml");
    std::fs::write(&path, rules).unwrap();
    let output = Command::new("promtool").args(["check", "rules"]).arg(&path).output().unwrap();
    assert!(
        output.status.success(),
        "promtool refuses a dashboard query:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A kubeconfig whose API server does not answer: the operator starts, serves `/metrics` and
/// keeps retrying the leader Lease.
fn unreachable_kubeconfig(dir: &Path) -> PathBuf {
    let port = free_port();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: none\n  user:\n    token: unused\ncontexts:\n- name: none\n  context:\n    cluster: none\n    user: none\ncurrent-context: none\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn every_metric_in_the_rules_and_the_dashboard_is_exported() {
    let rules = rule_queries();
    let panels = dashboard_queries();
    let mut wanted = selected(&rules);
    for (name, selected) in selected(&panels) {
        let entry = wanted.entry(name).or_default();
        entry.labels.extend(selected.labels);
        entry.origins.extend(selected.origins);
    }
    let dir = tempfile::tempdir().unwrap();
    promtool_checks_dashboard(&panels, dir.path());

    let Ok(server) = std::env::var("DATABASE_URL") else {
        assert!(std::env::var_os("CI").is_none(), "DATABASE_URL must be set in CI (scripts/test sets it)");
        println!("monitoring: skipped the scrape: DATABASE_URL is not set (scripts/test sets it)");
        return;
    };
    let database = format!("switchboard_monitoring_{}", std::process::id());
    let psql = |sql: &str| Command::new("psql").args([server.as_str(), "-XAtqc", sql]).status();
    assert!(psql(&format!("DROP DATABASE IF EXISTS {database}")).is_ok_and(|s| s.success()));
    assert!(psql(&format!("CREATE DATABASE {database}")).is_ok_and(|s| s.success()), "cannot create a database");
    let url = match server.rsplit_once('/') {
        Some((host, _)) => format!("{host}/{database}"),
        None => panic!("DATABASE_URL without a database name"),
    };

    let exported = {
        let folder = dir.path().join("manifests");
        std::fs::create_dir(&folder).unwrap();
        copy_dir(&root().join("examples"), &folder);
        let (api, node) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let stack = Process::start(
            Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args(["local", "--database-url", &url, "--node-id", "monitoring"])
                .arg(&folder)
                .env("SWITCHBOARD_SIP_LISTEN", "127.0.0.1:0")
                .env("SWITCHBOARD_HTTP_LISTEN", &node)
                .env("SWITCHBOARD_API_LISTEN", &api)
                .env("SWITCHBOARD_JWT_SECRET", "monitoring-test-secret-of-enough-length-0123456789"),
            dir.path().join("local.log"),
        );
        let operator_metrics = format!("127.0.0.1:{}", free_port());
        let operator = Process::start(
            Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args(["operator", "--database-url", &url, "--metrics-address", &operator_metrics])
                .args(["--lease-namespace", "switchboard-test", "--identity", "monitoring-test"])
                .env("KUBECONFIG", unreachable_kubeconfig(dir.path()))
                .env_remove("SWITCHBOARD_JWT_SECRET")
                .env_remove("SWITCHBOARD_JWT_SECRET_FILE"),
            dir.path().join("operator.log"),
        );

        let mut exported = Exported::default();
        // The API counts requests: this GET is the one that makes its series appear.
        wait_for(&stack, &api, "/healthz", "the REST API", |_| true);
        exported.add(
            "api",
            &wait_for(&stack, &api, "/metrics", "the API's request counter", |body| {
                body.contains("switchboard_api_requests_total{")
            }),
        );
        // The node, once it applied the examples (a trunk's call series exist then).
        exported.add(
            "node",
            &wait_for(&stack, &node, "/metrics", "the node's trunk series", |body| {
                body.contains("sip_calls_total{") && !body.contains("switchboard_config_generation -1")
            }),
        );
        exported.add(
            "operator",
            &wait_for(&operator, &operator_metrics, "/metrics", "the operator's metrics", |body| {
                body.contains("switchboard_operator_reconcile_total{")
            }),
        );
        drop(operator);
        drop(stack);
        exported
    };
    let _ = psql(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"));

    let mut problems = Vec::new();
    for (name, selected) in &wanted {
        let origins = selected.origins.iter().cloned().collect::<Vec<_>>().join(", ");
        let Some(family) = exported.lookup(name) else {
            problems.push(format!("{name} (used by {origins}) is exported by no process"));
            continue;
        };
        if family.series == 0 {
            // Declared only (see the module doc): nothing to compare labels with.
            println!("monitoring: {name}: declared by the {} with no series yet", family.source);
            continue;
        }
        for label in &selected.labels {
            if !family.labels.contains(label) {
                problems.push(format!(
                    "{name} (used by {origins}) has no label {label:?}; the {}'s series carry {:?}",
                    family.source, family.labels
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!(
        "monitoring: {} metrics of {} rule and {} panel queries, all exported",
        wanted.len(),
        rules.len(),
        panels.len()
    );
}
