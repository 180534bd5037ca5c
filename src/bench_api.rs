//! `switchboard bench-api`: REST API figures on a generated deployment, measured against the
//! real local stack (`switchboard local` as a child process, with its SIP node).
//!
//! - `GET /api/trunks` and `GET /api/calls/cdr?limit=100` with `--trunks` trunks (one manifest
//!   file each) and `--cdrs` CDRs: throughput and latency percentiles from a keep-alive HTTP/1.1
//!   load of `--connections` connections for `--seconds` seconds per endpoint.
//! - `POST /api/calls/initiate` → the INVITE arriving at the callee: a sipp UAS answers behind
//!   the from-number's trunk, and a UDP relay in front of it records when each INVITE arrives
//!   (keyed by the dialled number). The calls are posted one after another, so each figure is
//!   the path of one call (HTTP, the queue row, NOTIFY, the claim, the dial), not queueing.
//!
//! The load client is built in (tokio, raw HTTP/1.1), so the bench needs nothing beyond sipp.
//! Figures are printed, never asserted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio::process::Command;

use crate::bench::{wait_applied, with_database};
use crate::postgres::Postgres;
use crate::process::stop_child;

/// Arguments of `switchboard bench-api`.
#[derive(clap::Args, Debug)]
pub struct BenchApiArgs {
    /// Trunks in the generated folder (one file each, as the API writes them).
    #[arg(long, default_value_t = 100)]
    pub trunks: usize,
    /// CDRs inserted (spread over the last 30 days and all trunks).
    #[arg(long, default_value_t = 1_000_000)]
    pub cdrs: u64,
    /// Concurrent keep-alive connections of the load.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Seconds of load per endpoint.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Calls initiated one after another for the initiate → INVITE figure (0: skip).
    #[arg(long, default_value_t = 200)]
    pub calls: usize,
    /// Postgres server to use (a fresh database is created in it and dropped afterwards);
    /// without it a private cluster is started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

const SECRET: &str = "bench-api-secret-0123456789abcdef0123456789";
/// The caller id of the initiated calls: a number on the first trunk.
const FROM: &str = "+15550001000";

pub async fn run(args: BenchApiArgs) -> anyhow::Result<()> {
    if args.trunks == 0 || args.connections == 0 {
        bail!("the bench needs at least 1 trunk and 1 connection");
    }
    if args.calls > 0 && which("sipp").is_none() {
        bail!("sipp is required for the initiate → INVITE figure (Debian package sip-tester), or pass --calls 0");
    }
    let server = Postgres::ensure(args.database_url.clone()).await?;
    let database = format!("switchboard_bench_api_{}", std::process::id());
    let admin = switchboard_model::db::connect(server.url(), 1).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&admin).await?;
    let url = with_database(server.url(), &database)?;
    let result = measure(&args, &url).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")))
        .execute(&admin)
        .await;
    admin.close().await;
    server.stop().await;
    result
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(tool)).find(|p| p.is_file())
}

async fn measure(args: &BenchApiArgs, url: &str) -> anyhow::Result<()> {
    let pool = switchboard_model::db::connect(url, 2).await?;
    switchboard_model::db::migrate(&pool).await?;
    let started = Instant::now();
    insert_cdrs(&pool, args).await?;
    println!("{} CDRs inserted in {:.1} s", args.cdrs, started.elapsed().as_secs_f64());

    // The callee: sipp's UAS behind a relay that timestamps INVITEs.
    let relay = Relay::start().await?;
    let uas_port = free_udp_port()?;
    let mut uas = match args.calls {
        0 => None,
        _ => Some(
            Command::new("sipp")
                .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &uas_port.to_string(), "-nostdin"])
                .arg("-max_socket")
                .arg("4096")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting sipp")?,
        ),
    };
    relay.forward_to(SocketAddr::from(([127, 0, 0, 1], uas_port)));

    let folder = tempfile::tempdir()?;
    generate(folder.path(), args.trunks, relay.port)?;
    let api_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let api = SocketAddr::from(([127, 0, 0, 1], api_port));
    let log_path = std::env::temp_dir().join(format!("switchboard-bench-api-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let mut local = Command::new(std::env::current_exe()?)
        .args(["local", "--database-url", url, "--node-id", "bench-api"])
        .arg(folder.path())
        .env("SWITCHBOARD_SIP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_HTTP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_API_LISTEN", api.to_string())
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        // The bench places its calls one after another as fast as they go.
        .env("SWITCHBOARD_API_RATE_PER_SUBJECT", "1000000")
        .env("SWITCHBOARD_API_RATE_PER_NUMBER", "1000000")
        .env("SWITCHBOARD_API_RATE_BURST", "100000")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting `switchboard local`")?;
    let outcome = async {
        let token = switchboard_api::auth::JwtVerifier::new(SECRET.as_bytes(), "switchboard").mint("bench-api", 3600);
        let client = Client { address: api, token };
        wait_for_api(&client, &pool, args.trunks).await?;
        println!(
            "local stack on {} trunks ({} files), release build: {}; {} connections × {} s per endpoint",
            args.trunks,
            args.trunks + 1,
            !cfg!(debug_assertions),
            args.connections,
            args.seconds
        );
        for path in ["/api/trunks", "/api/calls/cdr?limit=100", "/api/calls/cdr?provider=twilio&limit=100"] {
            let (status, body) = client.connect().await?.send("GET", path, None).await?;
            if status != 200 {
                bail!("GET {path} answered {status}: {}", String::from_utf8_lossy(&body));
            }
            let load = load(&client, path, args.connections, Duration::from_secs(args.seconds)).await?;
            println!("GET {path:28} {load} ({} bytes per response)", body.len());
        }
        if args.calls > 0 {
            initiate_to_invite(&client, &relay, args.calls).await?;
        }
        anyhow::Ok(())
    }
    .await;
    stop_child(&mut local, Signal::SIGTERM, Duration::from_secs(10)).await;
    if let Some(uas) = uas.as_mut() {
        let _ = uas.kill().await;
    }
    match &outcome {
        Ok(()) => {
            let _ = std::fs::remove_file(&log_path);
        }
        Err(_) => eprintln!("the stack's log: {}", log_path.display()),
    }
    outcome
}

/// Inserts the CDRs in one statement: 30 days back from now, round-robin over the trunks, 60 %
/// answered.
async fn insert_cdrs(pool: &PgPool, args: &BenchApiArgs) -> anyhow::Result<()> {
    if args.cdrs == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO cdrs (call_id, attempt, node_id, namespace, trunk_name, provider, gateway, direction,
                           from_number, to_number, setup_at, ring_at, answer_at, end_at, sip_code, reason,
                           hangup_by, billable_seconds, cost, currency)
         SELECT 'bench-' || i, 1, 'bench-node', 'default', 'bench-' || lpad((i % $2)::text, 3, '0'), 'bench',
                '127.0.0.1:5060', CASE WHEN i % 4 = 0 THEN 'inbound' ELSE 'outbound' END,
                '+15550001000', '+1987' || lpad((i % 10000000)::text, 7, '0'),
                t, t + interval '2 seconds', CASE WHEN i % 5 < 3 THEN t + interval '4 seconds' END,
                t + interval '94 seconds', CASE WHEN i % 5 < 3 THEN 200 ELSE 486 END,
                CASE WHEN i % 5 < 3 THEN 'normal' ELSE 'busy' END, 'caller',
                CASE WHEN i % 5 < 3 THEN 90 ELSE 0 END, CASE WHEN i % 5 < 3 THEN 0.0045 ELSE 0 END, 'USD'
           FROM (SELECT i, now() - (i * (2592000.0 / $1)) * interval '1 second' AS t
                   FROM generate_series(1, $1::bigint) AS i) s",
    )
    .bind(args.cdrs as i64)
    .bind(args.trunks as i64)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE cdrs").execute(pool).await?;
    Ok(())
}

/// One file per trunk (all dialling the relay), and the from-number on the first trunk.
fn generate(dir: &Path, trunks: usize, relay_port: u16) -> anyhow::Result<()> {
    for t in 0..trunks {
        std::fs::write(
            dir.join(format!("trunk-bench-{t:03}.yaml")),
            format!(
                "# Generated by switchboard bench-api.\napiVersion: switchboard.dev/v1alpha1\nkind: Trunk\nmetadata:\n  name: bench-{t:03}\n  namespace: default\n  annotations:\n    switchboard.dev/trunk-id: bench_{t:03}\nspec:\n  provider: bench\n  displayName: Bench trunk {t}\n  authMethod: ip\n  gateways:\n    - address: 127.0.0.1\n      port: {relay_port}\n      transport: UDP\n  inbound:\n    enabled: true\n    allowedSourceCidrs: [127.0.0.1/32]\n  outbound:\n    enabled: true\n  optionsIntervalSeconds: 0\n  limits:\n    maxConcurrentCalls: 100000\n    callsPerSecond: 10000\n  rates:\n    perMinuteOutbound: \"0.0030\"\n    currency: USD\n"
            ),
        )?;
    }
    std::fs::write(
        dir.join("number.yaml"),
        format!(
            "apiVersion: switchboard.dev/v1alpha1\nkind: PhoneNumber\nmetadata:\n  name: bench-caller\n  namespace: default\nspec:\n  number: \"{FROM}\"\n  trunkRef: bench-000\n  callerId: true\n"
        ),
    )?;
    // The API places calls only to destinations an outbound rule covers.
    std::fs::write(
        dir.join("rule.yaml"),
        "apiVersion: switchboard.dev/v1alpha1\nkind: RoutingRule\nmetadata:\n  name: bench-outbound\n  namespace: default\nspec:\n  direction: outbound\n  match:\n    destinationPatterns: ['^\\+1']\n  trunks: [bench-000]\n",
    )?;
    Ok(())
}

async fn wait_for_api(client: &Client, pool: &PgPool, expected_trunks: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut connection) = client.connect().await
            && let Ok((200, _)) = connection.send("GET", "/healthz", None).await
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the local stack's API did not come up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The folder is reconciled and the node has it before calls are placed.
    let generation: i64 = loop {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT (SELECT generation FROM config_state), (SELECT count(DISTINCT name) FROM trunks)")
                .fetch_optional(pool)
                .await
                .unwrap_or(None);
        if let Some((generation, trunks)) = row
            && generation > 0
            && trunks as usize == expected_trunks
        {
            break generation;
        }
        if Instant::now() > deadline {
            bail!("the folder was not reconciled (expected {expected_trunks} trunks)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    wait_applied(pool, generation, Duration::from_secs(60)).await
}

/// The API's address and token.
struct Client {
    address: SocketAddr,
    token: String,
}

impl Client {
    async fn connect(&self) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(self.address).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream: BufReader::new(stream), host: self.address.to_string(), token: self.token.clone() })
    }
}

/// One keep-alive HTTP/1.1 connection (responses with Content-Length, as the API sends them).
struct Connection {
    stream: BufReader<TcpStream>,
    host: String,
    token: String,
}

impl Connection {
    async fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\n",
            self.host, self.token
        );
        if let Some(body) = body {
            request
                .push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
        } else {
            request.push_str("\r\n");
        }
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status line")?;
        let mut length = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("chunked responses are not read by the bench client");
                }
            }
        }
        let mut body = vec![0; length.context("no Content-Length")?];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

/// What a load run measured.
struct Load {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:8.0} req/s, p50 {:6.2} ms, p99 {:6.2} ms, max {:6.2} ms ({} requests, {} errors)",
            self.requests as f64 / self.elapsed.as_secs_f64(),
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
            self.requests,
            self.errors
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q` quantile of sorted latencies (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn load(client: &Client, path: &str, connections: usize, duration: Duration) -> anyhow::Result<Load> {
    // One second of warm-up (connections, caches, prepared statements), not counted.
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut connection = client.connect().await?;
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let result = connection.send("GET", &path, None).await;
                let counted = started >= warm_until;
                match result {
                    Ok((200, _)) if counted => latencies.push(started.elapsed()),
                    Ok((200, _)) => {}
                    Ok(_) => errors += usize::from(counted),
                    // The connection is gone: this one stops.
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, failed) = task.await?;
        all.extend(latencies);
        errors += failed;
    }
    all.sort();
    Ok(Load { requests: all.len(), errors, elapsed: duration, latencies: all })
}

/// A UDP relay between the node and the UAS that notes when each INVITE arrives, by the
/// user part of its Request-URI (the dialled number, after the trunk's number format).
struct Relay {
    port: u16,
    socket: Arc<UdpSocket>,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn start() -> anyhow::Result<Self> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let port = socket.local_addr()?.port();
        Ok(Self { port, socket, arrivals: Arc::default(), notify: Arc::default() })
    }

    /// Runs the relay: datagrams from the UAS go back to the node, the rest to the UAS.
    fn forward_to(&self, uas: SocketAddr) {
        let (socket, arrivals, notify) = (self.socket.clone(), self.arrivals.clone(), self.notify.clone());
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 65536];
            let mut node: Option<SocketAddr> = None;
            loop {
                let Ok((length, from)) = socket.recv_from(&mut buffer).await else { return };
                let arrived = Instant::now();
                let datagram = &buffer[..length];
                if from == uas {
                    if let Some(node) = node {
                        let _ = socket.send_to(datagram, node).await;
                    }
                    continue;
                }
                node = Some(from);
                if datagram.starts_with(b"INVITE ")
                    && let Some(user) = request_user(datagram)
                {
                    arrivals.lock().unwrap_or_else(|p| p.into_inner()).entry(user).or_insert(arrived);
                    notify.notify_waiters();
                }
                let _ = socket.send_to(datagram, uas).await;
            }
        });
    }

    async fn wait_for(&self, user: &str, timeout: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(at) = self.arrivals.lock().unwrap_or_else(|p| p.into_inner()).get(user) {
                return Some(*at);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// The user part of a request line `INVITE sip:USER@host SIP/2.0`.
fn request_user(datagram: &[u8]) -> Option<String> {
    let line = datagram.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let uri = line.split_whitespace().nth(1)?;
    let rest = uri.strip_prefix("sip:").or_else(|| uri.strip_prefix("sips:"))?;
    Some(rest.split(['@', ';']).next()?.to_string())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn initiate_to_invite(client: &Client, relay: &Relay, calls: usize) -> anyhow::Result<()> {
    let mut connection = client.connect().await?;
    let mut latencies = Vec::with_capacity(calls);
    let mut lost = 0;
    for i in 0..calls {
        let to = format!("+1987655{i:04}");
        let body = format!(r#"{{"from_number": "{FROM}", "to_number": "{to}"}}"#);
        let started = Instant::now();
        let (status, response) = connection.send("POST", "/api/calls/initiate", Some(&body)).await?;
        if status != 202 {
            bail!("POST /api/calls/initiate answered {status}: {}", String::from_utf8_lossy(&response));
        }
        // The node dials the number as given, or without the leading +.
        let user = to.trim_start_matches('+').to_string();
        let arrived = tokio::select! {
            a = relay.wait_for(&to, Duration::from_secs(5)) => a,
            a = relay.wait_for(&user, Duration::from_secs(5)) => a,
        };
        match arrived {
            Some(at) => latencies.push(at.saturating_duration_since(started)),
            None => lost += 1,
        }
    }
    latencies.sort();
    println!(
        "POST /api/calls/initiate → INVITE at the UAS: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} calls one after another, {} INVITEs not seen within 5 s)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
        latencies.len(),
        lost
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_operator::source::folder::FolderSource;

    #[test]
    fn generated_folder_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 3, 5062).unwrap();
        let state = FolderSource::new(dir.path()).read().unwrap();
        assert!(state.problems.is_empty() && state.broken.is_empty(), "{:?} {:?}", state.problems, state.broken);
        assert_eq!(state.resources.len(), 5, "3 trunks, the number and the outbound rule");
        for resource in &state.resources {
            switchboard_operator::validate::validate(&resource.key, &resource.spec).unwrap();
        }
    }

    #[test]
    fn request_users_and_percentiles() {
        assert_eq!(
            request_user(b"INVITE sip:+19876550001@127.0.0.1:5060;transport=udp SIP/2.0\r\n").unwrap(),
            "+19876550001"
        );
        assert_eq!(request_user(b"INVITE sips:1987@h SIP/2.0\r\n").unwrap(), "1987");
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&sorted, 0.50), Duration::from_millis(50));
    }
}
