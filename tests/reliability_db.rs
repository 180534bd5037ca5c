//! What Postgres holds about the nodes stays true when nodes die, drain, share a trunk or get
//! reconfigured under load (issue 20, items 4 and 6–8), against real processes: the
//! `switchboard node` binary, sipp callers and callees on loopback, and Postgres.
//!
//! - a node killed with a call up, an API call and a message in flight: the reaper ends them
//!   (`node lost`), and a queued request nobody takes expires;
//! - a draining node says so in its row: the operator's `Synced` count and request claiming
//!   leave it out;
//! - two nodes behind one trunk with `maxConcurrentCalls: 10`, 40 calls offered: 10 answered,
//!   30 refused with 503 and `Retry-After`;
//! - the trunk's configuration changed every second while ~100 calls are up: every call
//!   completes and every generation is applied.
//!
//! sipp is required when `CI` is set (the tests fail without it) and skipped otherwise.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::types::{Decimal, chrono};
use switchboard_model::config::{bump_generation, notify_generation};
use switchboard_model::{Destination, DestinationType, NumberConfig, TrunkConfig};
use switchboard_operator::reaper::{NODE_LOST, reap_once};

// The root package is a binary: its private Postgres is compiled into this test directly.
#[allow(dead_code)]
#[path = "../src/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "../src/process.rs"]
mod process;

const DID: &str = "+15550001111";
const LIMIT: Duration = Duration::from_secs(30);
/// How long an answered call of the limit tests lasts: far longer than offering all 40 calls
/// takes (0.1 s at 200 calls/s), so that no call ends and frees a slot before the last offer.
const HOLD_MS: u32 = 8000;

/// Whether sipp can run here; with `CI` set its absence is a failure.
fn have_sipp() -> bool {
    let found = Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(std::env::var_os("CI").is_none(), "sipp (Debian package sip-tester) is required in CI");
        eprintln!("skipping: sipp is not installed");
    }
    found
}

fn scenario(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sip-node/tests/sipp").join(name).to_string_lossy().into_owned()
}

fn free_port() -> u16 {
    UdpSocket::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// The URL of the test's own database: `DATABASE_URL` with the database name replaced.
fn url_of(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for sqlx tests");
    let base = base.split('?').next().unwrap_or(&base);
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    let database = pool.connect_options().get_database().expect("test database name").to_owned();
    format!("{server}/{database}")
}

fn trunk(name: &str, gateways: &[u16]) -> TrunkConfig {
    TrunkConfig {
        failover_timeout_seconds: 30,
        ..TrunkConfig::loopback(name, gateways.iter().map(|port| ("127.0.0.1".to_owned(), *port)))
    }
}

/// [`DID`] on trunk `carrier`, delivered to a SIP callee on `port`.
fn number_to_callee(port: u16) -> NumberConfig {
    NumberConfig {
        namespace: "default".into(),
        name: "did".into(),
        number: DID.into(),
        trunk_ref: "carrier".into(),
        routing_rule_ref: None,
        destination: Some(Destination {
            kind: DestinationType::Sip,
            url: None,
            uri: Some(format!("sip:callee@127.0.0.1:{port}")),
            number: None,
            trunk_ref: None,
            reject_code: None,
        }),
        message_webhook: None,
        caller_id_allowed: true,
    }
}

/// Commits `trunks` and `numbers` as a new generation and announces it; returns the generation.
async fn publish(pool: &PgPool, trunks: &[TrunkConfig], numbers: &[NumberConfig]) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let generation = bump_generation(&mut tx).await.unwrap();
    for trunk in trunks {
        trunk.upsert(&mut tx, &format!("hash-{generation}"), generation).await.unwrap();
    }
    for number in numbers {
        number.upsert(&mut tx, &format!("hash-{generation}"), generation).await.unwrap();
    }
    notify_generation(&mut tx, generation).await.unwrap();
    tx.commit().await.unwrap();
    generation
}

async fn applied(pool: &PgPool, node_id: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT applied_generation FROM nodes WHERE node_id = $1 AND applied_at IS NOT NULL")
        .bind(node_id)
        .fetch_optional(pool)
        .await
        .unwrap_or(None)
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `switchboard node` process; killed on drop.
struct NodeProc {
    child: Child,
    id: String,
    log: Arc<Mutex<Vec<String>>>,
    /// The node's `--state-dir` (spool, saved configuration): the test's own, so that nothing
    /// a killed node spooled reaches another test's database.
    _state: tempfile::TempDir,
}

impl NodeProc {
    fn start(pool: &PgPool, id: &str, rtp_ports: &str) -> NodeProc {
        NodeProc::start_at(&url_of(pool), id, rtp_ports)
    }

    fn start_at(url: &str, id: &str, rtp_ports: &str) -> NodeProc {
        let state = tempfile::tempdir().expect("state directory");
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["node", "--database-url", url, "--node-id", id])
            .arg("--state-dir")
            .arg(state.path())
            .args(["--heartbeat-interval-ms", "200", "--config-poll-interval-ms", "200"])
            .args(["--sip-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--rtp-ports", rtp_ports])
            .args(["--drain-seconds", "60"])
            .env("RUST_LOG", "info")
            // Nodes refuse to start without one (webhook signatures must be verifiable).
            .env("SWITCHBOARD_WEBHOOK_SECRET", "reliability-test-webhook-secret")
            .env_remove("SWITCHBOARD_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchboard node");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        NodeProc { child, id: id.into(), log, _state: state }
    }

    fn dump(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The SIP address it logged once listening.
    async fn sip(&self) -> SocketAddr {
        let deadline = Instant::now() + LIMIT;
        loop {
            let found =
                self.log.lock().expect("log lock").iter().find(|l| l.contains("SIP listening")).and_then(|l| {
                    l.split_whitespace().find_map(|w| w.strip_prefix("sip=")).and_then(|a| a.parse().ok())
                });
            if let Some(addr) = found {
                return addr;
            }
            assert!(Instant::now() < deadline, "the node never listened; log:\n{}", self.dump());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_applied(&self, pool: &PgPool, generation: i64) {
        let deadline = Instant::now() + LIMIT;
        while applied(pool, &self.id).await != Some(generation) {
            assert!(Instant::now() < deadline, "{} never applied {generation}; log:\n{}", self.id, self.dump());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().expect("kill").success());
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sipp process in its own directory (for `-trace_counts`); killed on drop.
struct Sipp {
    child: Child,
    dir: tempfile::TempDir,
}

impl Sipp {
    fn start(args: &[String]) -> Sipp {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("sipp")
            .args(args)
            .args(["-nostdin", "-trace_counts", "-trace_err"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sipp");
        Sipp { child, dir }
    }

    /// A callee on `port` that answers every call and waits for the caller's BYE.
    fn callee(port: u16) -> Sipp {
        Sipp::start(&[
            "-sf".into(),
            scenario("uas_answer_until_bye.xml"),
            "-i".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ])
    }

    /// `calls` callers to [`DID`] through `node`, at `rate` per second, each holding an answered
    /// call for `hold_ms`.
    fn callers(node: SocketAddr, calls: u32, rate: u32, hold_ms: u32) -> Sipp {
        let args = [
            "-sf".to_string(),
            scenario("uac_hold_or_503.xml"),
            node.to_string(),
            "-s".into(),
            DID.into(),
            "-i".into(),
            "127.0.0.1".into(),
            "-p".into(),
            free_port().to_string(),
            "-m".into(),
            calls.to_string(),
            "-l".into(),
            calls.to_string(),
            "-r".into(),
            rate.to_string(),
            "-d".into(),
            hold_ms.to_string(),
            "-timeout".into(),
            "120s".into(),
            "-timeout_error".into(),
        ];
        Sipp::start(&args)
    }

    async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sipp did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The final per-message counts (`-trace_counts`), by column (`4_200_Recv`, ...).
    fn counts(&self) -> HashMap<String, u64> {
        let file: PathBuf = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map_while(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("_counts.csv"))
            .expect("sipp wrote its counts");
        let text = std::fs::read_to_string(file).unwrap();
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines.next().expect("header").split(';').collect();
        let last: Vec<&str> = lines.next_back().expect("a row").split(';').collect();
        header
            .iter()
            .zip(last)
            .filter_map(|(name, value)| Some((name.to_string(), value.trim().parse().ok()?)))
            .collect()
    }

    fn received(&self, code: &str) -> u64 {
        self.counts().iter().filter(|(k, _)| k.ends_with(&format!("_{code}_Recv"))).map(|(_, v)| v).sum()
    }

    fn errors(&self) -> String {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map_while(Result::ok)
            .filter(|e| e.path().to_string_lossy().ends_with("_errors.log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook receiver on loopback: every JSON body POSTed to it, answered 200.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if let Ok(event) = serde_json::from_slice(&body) {
                        sink.lock().unwrap().push(event);
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// Most answered calls up at the same time, from the CDRs' answer and end times.
async fn peak_answered(pool: &PgPool) -> usize {
    let spans: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT answer_at, end_at FROM cdrs WHERE answer_at IS NOT NULL").fetch_all(pool).await.unwrap();
    let mut edges: Vec<(chrono::DateTime<chrono::Utc>, i32)> =
        spans.iter().flat_map(|(start, end)| [(*start, 1), (*end, -1)]).collect();
    // Ends before starts at the same instant.
    edges.sort();
    let (mut up, mut peak) = (0i32, 0i32);
    for (_, step) in edges {
        up += step;
        peak = peak.max(up);
    }
    peak as usize
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.unwrap()
}

/// Item 7: two nodes behind one trunk with `maxConcurrentCalls: 10`; 40 callers at once, 20 to
/// each node, each holding an answered call for 8 s. Exactly 10 are answered (never more than
/// 10 up at once, by the CDRs' times), the other 30 get 503 with `Retry-After`; once the calls
/// end, the trunk's admitted count is back to 0.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn two_nodes_hold_one_trunk_limit_between_them(pool: PgPool) {
    if !have_sipp() {
        return;
    }
    let callee_port = free_port();
    let mut carrier = trunk("carrier", &[]);
    carrier.max_concurrent_calls = Some(10);
    let generation = publish(&pool, &[carrier], &[number_to_callee(callee_port)]).await;
    let a = NodeProc::start(&pool, "limit-a", "42000-42999");
    let b = NodeProc::start(&pool, "limit-b", "43000-43999");
    a.wait_applied(&pool, generation).await;
    b.wait_applied(&pool, generation).await;
    let (sip_a, sip_b) = (a.sip().await, b.sip().await);
    let _callee = Sipp::callee(callee_port);
    // Both nodes must see each other live before the calls (heartbeats every 200 ms).
    wait_until("both nodes live", LIMIT, || async { count(&pool, "SELECT count(*) FROM live_nodes").await == 2 }).await;
    // Each node counts the live nodes once a second (for its fallback of `limit / live nodes`
    // when an admission query is slow): let both count the other before the calls.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let mut to_a = Sipp::callers(sip_a, 20, 200, HOLD_MS);
    let mut to_b = Sipp::callers(sip_b, 20, 200, HOLD_MS);
    let status_a = to_a.wait(Duration::from_secs(60)).await;
    let status_b = to_b.wait(Duration::from_secs(60)).await;
    assert!(status_a.success() && status_b.success(), "sipp failed: {}{}", to_a.errors(), to_b.errors());
    let answered = to_a.received("200") + to_b.received("200");
    let refused = to_a.received("503") + to_b.received("503");
    // Each answered call also counts its BYE's 200.
    println!(
        "40 calls offered to 2 nodes: {} answered ({} on a, {} on b), {refused} refused with 503",
        answered / 2,
        to_a.received("200") / 2,
        to_b.received("200") / 2
    );
    assert_eq!(answered / 2, 10, "answered calls across both nodes; logs:\n{}\n{}", a.dump(), b.dump());
    assert_eq!(refused, 30);
    wait_until("the answered calls' CDRs", LIMIT, || async {
        count(&pool, "SELECT count(*) FROM cdrs WHERE answer_at IS NOT NULL").await == 10
    })
    .await;
    assert!(peak_answered(&pool).await <= 10);
    wait_until("the admitted calls released", LIMIT, || async {
        count(&pool, "SELECT coalesce(sum(active), 0)::bigint FROM trunk_admissions").await == 0
    })
    .await;
}

/// Item 8: the trunk's configuration is changed every second, 20 times, while callers keep
/// about 100 calls up (30 calls per second, 3 s each, 720 calls). Every call completes, every
/// generation is applied by the node while calls are up.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn configuration_churn_during_live_calls_loses_no_call(pool: PgPool) {
    if !have_sipp() {
        return;
    }
    const CALLS: u32 = 720;
    const CHANGES: usize = 20;
    let callee_port = free_port();
    let mut carrier = trunk("carrier", &[]);
    carrier.max_concurrent_calls = Some(1000);
    let number = number_to_callee(callee_port);
    let generation = publish(&pool, std::slice::from_ref(&carrier), std::slice::from_ref(&number)).await;
    let node = NodeProc::start(&pool, "churn", "44000-45999");
    node.wait_applied(&pool, generation).await;
    let sip = node.sip().await;
    let _callee = Sipp::callee(callee_port);
    let mut callers = Sipp::callers(sip, CALLS, 30, 3000);

    let mut up_at_change = Vec::new();
    let mut generations = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for change in 0..CHANGES {
        let started = Instant::now();
        // A new rate, limit and name each time: a new snapshot for the node to swap in.
        carrier.rate_inbound_per_minute = Decimal::new(6 + change as i64, 3);
        carrier.max_concurrent_calls = Some(1000 + change as u32);
        carrier.display_name = Some(format!("churn {change}"));
        let generation = publish(&pool, std::slice::from_ref(&carrier), &[]).await;
        node.wait_applied(&pool, generation).await;
        generations.push(generation);
        up_at_change.push(count(&pool, "SELECT count(*) FROM active_calls").await);
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    }
    let status = callers.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "sipp failed: {}", callers.errors());
    let answered = callers.received("200") / 2;
    println!(
        "{CHANGES} changes (generations {:?}..{:?}) applied during {CALLS} calls; calls up at each change: {up_at_change:?}; \
         {answered} answered, {} refused",
        generations.first(),
        generations.last(),
        callers.received("503")
    );
    assert_eq!(answered, u64::from(CALLS), "every call completes; log:\n{}", node.dump());
    assert!(up_at_change.iter().all(|up| *up > 0), "calls were up at every change: {up_at_change:?}");
    wait_until("every CDR", LIMIT, || async {
        count(&pool, "SELECT count(*) FROM cdrs WHERE answer_at IS NOT NULL AND sip_code = 200").await
            == i64::from(CALLS)
    })
    .await;
}

/// Items 4 and 6: a draining node says so in its row (the operator's Synced count and request
/// claiming leave it out); a node killed with a call up, an API call ringing nowhere and a
/// message in flight leaves rows the reaper ends with `node lost`, and a queued request nobody
/// takes expires; a live node then sends those requests' final webhook `failed`. Reads of
/// active calls joined on live nodes (as the API's) leave the dead node's calls out.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_lost_node_leaves_nothing_stuck(pool: PgPool) {
    if !have_sipp() {
        return;
    }
    let callee_port = free_port();
    // Outbound trunk whose gateway never answers: API calls and messages stay in flight.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let outbound = trunk("outbound", &[silent.local_addr().unwrap().port()]);
    let mut from = number_to_callee(callee_port);
    from.name = "from".into();
    from.number = "+15550002222".into();
    from.trunk_ref = "outbound".into();
    let generation = publish(&pool, &[trunk("carrier", &[]), outbound], &[number_to_callee(callee_port), from]).await;
    let node = NodeProc::start(&pool, "doomed", "46000-46999");
    node.wait_applied(&pool, generation).await;
    let sip = node.sip().await;
    let _callee = Sipp::callee(callee_port);
    let _caller = Sipp::callers(sip, 1, 1, 600_000);
    let (hook, events) = webhook_receiver().await;
    wait_until("the call answered", LIMIT, || async {
        count(&pool, "SELECT count(*) FROM active_calls WHERE state = 'answered'").await == 1
    })
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO call_requests (id, from_number, to_number, state, webhook_url)
         VALUES ('00000000-0000-0000-0000-0000000000aa', '+15550002222', '+15559990000', 'queued', '{hook}');
         INSERT INTO messages (id, direction, namespace, trunk_name, from_number, to_number, body, status)
         VALUES (gen_random_uuid(), 'outbound', 'default', 'outbound', '+15550002222', '+15559990000', 'hi', 'queued');
         SELECT pg_notify('switchboard_call_requests', 'x'), pg_notify('switchboard_messages', 'x')"
    )))
    .execute(&pool)
    .await
    .unwrap();
    wait_until("the request and the message taken", LIMIT, || async {
        count(&pool, "SELECT count(*) FROM call_requests WHERE claimed_by = 'doomed'").await == 1
            && count(&pool, "SELECT count(*) FROM messages WHERE status = 'sending'").await == 1
    })
    .await;

    // Draining: the row says so; Synced counts only nodes that are not draining, and the
    // draining node claims nothing.
    node.signal("-TERM");
    wait_until("draining_at", LIMIT, || async {
        count(&pool, "SELECT count(*) FROM nodes WHERE draining_at IS NOT NULL").await == 1
    })
    .await;
    let facts = switchboard_operator::kubernetes::nodes::NodeFacts::load(&pool, Duration::from_secs(30)).await.unwrap();
    assert_eq!(facts.applied(generation), (0, 0), "a draining node does not count for Synced");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO call_requests (id, from_number, to_number, state, expires_at, webhook_url)
         VALUES ('00000000-0000-0000-0000-0000000000ee', '+15550002222', '+15559990000', 'queued',
                 now() + interval '2 seconds', '{hook}');
         SELECT pg_notify('switchboard_call_requests', 'x')"
    )))
    .execute(&pool)
    .await
    .unwrap();

    // The node dies (SIGKILL: nothing is written on the way out).
    node.signal("-KILL");
    let last_beat: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT heartbeat_at FROM nodes WHERE node_id = 'doomed'").fetch_one(&pool).await.unwrap();
    wait_until("the node no longer live", LIMIT, || async {
        count(&pool, "SELECT count(*) FROM live_nodes").await == 0
    })
    .await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM active_calls WHERE node_id IN (SELECT node_id FROM live_nodes)").await,
        0,
        "reads joined on live nodes leave the dead node's calls out before the reaper runs"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reaped = reap_once(&pool, 3).await.unwrap().expect("no other reaper");
    println!("reaped: {reaped:?}");
    // Two calls: the one in, and the API call being placed (it has its row too).
    assert_eq!((reaped.calls, reaped.requests, reaped.messages, reaped.expired), (2, 1, 1, 1));

    let (reason, end_at, hangup_by): (String, chrono::DateTime<chrono::Utc>, String) =
        sqlx::query_as("SELECT reason, end_at, hangup_by FROM cdrs WHERE reason = $1 AND direction = 'inbound'")
            .bind(NODE_LOST)
            .fetch_one(&pool)
            .await
            .expect("the lost call's CDR");
    assert_eq!((reason.as_str(), hangup_by.as_str()), (NODE_LOST, "system"));
    // Ended at the node's last heartbeat (read just after the kill, one beat of slack).
    assert!((end_at - last_beat).num_milliseconds().abs() <= 1000, "ended {end_at}, last heartbeat {last_beat}");
    assert_eq!(count(&pool, "SELECT count(*) FROM active_calls").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs WHERE reason = 'node lost'").await, 2);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM call_requests WHERE state = 'failed' AND error = 'node lost'").await,
        1
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM messages WHERE status = 'failed' AND error = 'node lost'").await, 1);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM call_requests WHERE id = '00000000-0000-0000-0000-0000000000ee'
                AND state = 'failed' AND error LIKE 'expired%' AND claimed_by IS NULL"
        )
        .await,
        1,
        "the request queued while the only node drained was never claimed and expired"
    );

    // A live node sends the reaped requests' final webhooks (it holds the signing secret).
    let survivor = NodeProc::start(&pool, "survivor", "47000-47999");
    let failed =
        |id: &str| events.lock().unwrap().iter().find(|e| e["request_id"] == id && e["status"] == "failed").cloned();
    wait_until("the final webhooks", LIMIT, || async {
        failed("00000000-0000-0000-0000-0000000000aa").is_some()
            && failed("00000000-0000-0000-0000-0000000000ee").is_some()
    })
    .await;
    assert_eq!(failed("00000000-0000-0000-0000-0000000000aa").unwrap()["reason"], NODE_LOST);
    let expired = failed("00000000-0000-0000-0000-0000000000ee").unwrap();
    assert!(expired["reason"].as_str().unwrap().starts_with("expired"), "{expired}");
    assert_eq!(count(&pool, "SELECT count(*) FROM call_requests WHERE final_webhook_pending").await, 0);
    drop(survivor);
}

/// Item 7, without the database: two nodes behind one trunk with `maxConcurrentCalls: 10` on a
/// private Postgres that the test then stops. Each node admits against its share, limit / live
/// nodes = 5: 40 callers get 10 answered calls and 30 refusals with `Retry-After`.
#[tokio::test]
async fn without_postgres_two_nodes_split_the_trunk_limit() {
    if !have_sipp() {
        return;
    }
    let cluster = match tokio::time::timeout(Duration::from_secs(120), postgres::PrivateCluster::start()).await {
        Ok(Ok(cluster)) => cluster,
        other => {
            let why = match other {
                Ok(Err(error)) => error.to_string(),
                _ => "it did not start within 120 s".to_string(),
            };
            assert!(std::env::var_os("CI").is_none(), "CI must be able to start a private Postgres: {why}");
            eprintln!("skipping: no private Postgres ({why})");
            return;
        }
    };
    let url = cluster.url().to_string();
    let pool = switchboard_model::db::connect(&url, 2).await.unwrap();
    switchboard_model::db::migrate(&pool).await.unwrap();
    let callee_port = free_port();
    let mut carrier = trunk("carrier", &[]);
    carrier.max_concurrent_calls = Some(10);
    let generation = publish(&pool, &[carrier], &[number_to_callee(callee_port)]).await;
    let a = NodeProc::start_at(&url, "share-a", "48000-48999");
    let b = NodeProc::start_at(&url, "share-b", "49000-49999");
    a.wait_applied(&pool, generation).await;
    b.wait_applied(&pool, generation).await;
    let (sip_a, sip_b) = (a.sip().await, b.sip().await);
    wait_until("both nodes live", LIMIT, || async { count(&pool, "SELECT count(*) FROM live_nodes").await == 2 }).await;
    // The nodes count the live nodes every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    pool.close().await;
    cluster.stop().await;

    let _callee = Sipp::callee(callee_port);
    let mut to_a = Sipp::callers(sip_a, 20, 200, HOLD_MS);
    let mut to_b = Sipp::callers(sip_b, 20, 200, HOLD_MS);
    let status_a = to_a.wait(Duration::from_secs(90)).await;
    let status_b = to_b.wait(Duration::from_secs(90)).await;
    assert!(status_a.success() && status_b.success(), "sipp failed: {}{}", to_a.errors(), to_b.errors());
    let (on_a, on_b) = (to_a.received("200") / 2, to_b.received("200") / 2);
    let refused = to_a.received("503") + to_b.received("503");
    println!(
        "Postgres stopped: 40 calls offered to 2 nodes: {on_a} answered on a, {on_b} on b, {refused} refused with 503"
    );
    assert_eq!((on_a, on_b, refused), (5, 5, 30), "logs:\n{}\n{}", a.dump(), b.dump());
}
