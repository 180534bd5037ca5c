//! The `switchboard-node` binary as a process: waits for the schema and for Postgres, applies
//! generations (the log line local mode looks for, the `nodes` row the operator reads), and
//! exits 0 on SIGTERM after recording that it stopped.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use switchboard_model::NumberConfig;
use switchboard_model::config::{bump_generation, notify_generation};

const LIMIT: Duration = Duration::from_secs(20);

/// A running node process whose stderr is collected line by line.
struct Node {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The node's `--state-dir` (spool, saved configuration), removed with the node.
    _state: tempfile::TempDir,
}

impl Node {
    fn start(database_url: &str, node_id: &str) -> Self {
        Node::start_with(database_url, node_id, &[])
    }

    /// Starts the node with `extra` flags after the usual ones.
    fn start_with(database_url: &str, node_id: &str, extra: &[&str]) -> Self {
        let state = tempfile::tempdir().expect("state directory");
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard-node"))
            .env("SWITCHBOARD_STATE_DIR", state.path())
            .args(["--database-url", database_url, "--node-id", node_id])
            .args(["--heartbeat-interval-ms", "200", "--config-poll-interval-ms", "200"])
            .args(["--sip-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            // Nodes refuse to start without one (webhook signatures must be verifiable).
            .env("SWITCHBOARD_WEBHOOK_SECRET", "node-process-test-webhook-secret")
            .env_remove("SWITCHBOARD_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchboard-node");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        Self { child, log, _state: state }
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.lock().expect("log lock").iter().any(|line| line.contains(needle))
    }

    fn dump(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    async fn wait_for_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !self.logged(needle) {
            assert!(tokio::time::Instant::now() < deadline, "no log line containing {needle:?}; log:\n{}", self.dump());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) for the node to exit by itself.
    async fn exited(self) -> (ExitStatus, String) {
        self.wait_for_exit("the node kept running").await
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    async fn terminate(self) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        self.wait_for_exit("the node did not exit after SIGTERM").await
    }

    /// The exit status and the whole log once the node has exited; panics with `otherwise`
    /// (the node is then killed on drop) if it has not within [`LIMIT`].
    async fn wait_for_exit(mut self, otherwise: &str) -> (ExitStatus, String) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the node") {
                // Let the stderr reader take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return (status, self.dump());
            }
            assert!(tokio::time::Instant::now() < deadline, "{otherwise}; log:\n{}", self.dump());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Never leave a node running behind a failed assertion.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The URL of the test's own database: `DATABASE_URL` with the database name replaced.
fn url_of(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for sqlx tests");
    let base = base.split('?').next().unwrap_or(&base);
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    let database = pool.connect_options().get_database().expect("test database name").to_owned();
    format!("{server}/{database}")
}

async fn applied_generation(pool: &PgPool, node_id: &str) -> Option<(i64, bool)> {
    sqlx::query_as::<_, (i64, bool)>("SELECT applied_generation, applied_at IS NOT NULL FROM nodes WHERE node_id = $1")
        .bind(node_id)
        .fetch_optional(pool)
        .await
        .unwrap_or(None)
}

async fn wait_for_applied(pool: &PgPool, node: &Node, node_id: &str, generation: i64) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while applied_generation(pool, node_id).await != Some((generation, true)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nodes.applied_generation never reached {generation}; log:\n{}",
            node.dump()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn follows_changes_and_stops_cleanly(pool: PgPool) {
    let node = Node::start(&url_of(&pool), "proc-node");
    node.wait_for_log("schema not migrated yet; waiting").await;

    switchboard_model::db::migrate(&pool).await.expect("migrate");
    node.wait_for_log("applied config generation 0: 0 trunks, 0 numbers, 0 rules").await;
    wait_for_applied(&pool, &node, "proc-node", 0).await;

    let mut tx = pool.begin().await.expect("begin");
    let generation = bump_generation(&mut tx).await.expect("bump");
    let number = NumberConfig {
        namespace: "default".into(),
        name: "support".into(),
        number: "+15550001111".into(),
        trunk_ref: "main".into(),
        routing_rule_ref: None,
        destination: None,
        message_webhook: None,
        caller_id_allowed: true,
    };
    number.upsert(&mut tx, "hash", generation).await.expect("upsert");
    notify_generation(&mut tx, generation).await.expect("notify");
    tx.commit().await.expect("commit");

    node.wait_for_log(&format!("applied config generation {generation}: 0 trunks, 1 numbers, 0 rules")).await;
    wait_for_applied(&pool, &node, "proc-node", generation).await;

    let (status, log) = node.terminate().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");
    let stopped: bool = sqlx::query_scalar("SELECT stopped_at IS NOT NULL FROM nodes WHERE node_id = 'proc-node'")
        .fetch_one(&pool)
        .await
        .expect("nodes row");
    assert!(stopped, "stopped_at not set; log:\n{log}");
}

#[tokio::test]
async fn waits_for_an_unreachable_database_and_stops_on_sigterm() {
    // Nothing listens on port 1.
    let node = Node::start("postgres://postgres:hunter2@127.0.0.1:1/postgres", "proc-unreachable");
    node.wait_for_log("database unreachable").await;
    assert!(!node.logged("hunter2"), "the password was logged:\n{}", node.dump());
    assert!(node.logged("postgres://postgres:***@127.0.0.1:1/postgres"), "{}", node.dump());
    let (status, log) = node.terminate().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");

    // libpq's other way of writing the password, as a query parameter, is masked too.
    let node =
        Node::start("postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&password=hunter3", "proc-unreachable");
    node.wait_for_log("database unreachable").await;
    assert!(!node.logged("hunter3"), "the password was logged:\n{}", node.dump());
    assert!(node.logged("postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&password=***"), "{}", node.dump());
    let (status, log) = node.terminate().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");
}

/// A TCP proxy in front of Postgres that a test can cut and restore, to stage an outage
/// without touching the shared server.
struct Proxy {
    port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let mut proxy = Self { port, upstream, task: None };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the task closes every one of them.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Refuses new connections and cuts the open ones.
    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Accepts connections again on the same port.
    async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.expect("rebind proxy");
        self.serve(listener);
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn keeps_its_snapshot_through_an_outage_and_catches_up(pool: PgPool) {
    let options = pool.connect_options();
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    let mut proxy = Proxy::start(upstream).await;
    let url = url_of(&pool).replacen(
        &format!("@{}:{}/", options.get_host(), options.get_port()),
        &format!("@127.0.0.1:{}/", proxy.port),
        1,
    );
    assert!(url.contains(&format!(":{}/", proxy.port)), "cannot route {url} through the proxy");

    let node = Node::start(&url, "outage-node");
    node.wait_for_log("applied config generation 0:").await;

    proxy.cut().await;
    node.wait_for_log("lost connection to Postgres").await;
    // A change the node cannot see: committed (and notified) during the outage.
    let mut tx = pool.begin().await.expect("begin");
    let generation = bump_generation(&mut tx).await.expect("bump");
    notify_generation(&mut tx, generation).await.expect("notify");
    tx.commit().await.expect("commit");
    // Several retries of the listener, the poll and the heartbeat fail meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!node.logged(&format!("applied config generation {generation}:")), "{}", node.dump());
    let warnings = node.log.lock().expect("log lock").iter().filter(|l| l.contains("lost connection")).count();
    assert_eq!(warnings, 1, "one warning per outage; log:\n{}", node.dump());

    proxy.restore().await;
    node.wait_for_log(&format!("applied config generation {generation}: 0 trunks, 0 numbers, 0 rules")).await;
    node.wait_for_log("Postgres is reachable again").await;
    wait_for_applied(&pool, &node, "outage-node", generation).await;

    let (status, log) = node.terminate().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");
}

/// A CA file for `wss://` agents that cannot be used stops the node at start-up with an error
/// naming the flag, instead of failing every call to a `wss://` agent later.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_unusable_agent_ca_file_stops_the_node_at_start_up(pool: PgPool) {
    let node = Node::start_with(&url_of(&pool), "proc-node-ca", &["--agent-ca-file", "/nonexistent/agents-ca.pem"]);
    let (status, log) = node.exited().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("--agent-ca-file") && log.contains("/nonexistent/agents-ca.pem"), "{log}");
}

/// A node without a webhook secret (or with a short one) does not start: with a random key of
/// its own, nobody could verify the signatures of its status callbacks and message webhooks.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_node_without_a_webhook_secret_does_not_start(pool: PgPool) {
    let node = Node::start_with(&url_of(&pool), "proc-node-nosecret", &["--webhook-secret="]);
    let (status, log) = node.exited().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("no webhook secret: set SWITCHBOARD_WEBHOOK_SECRET"), "{log}");
    let node = Node::start_with(&url_of(&pool), "proc-node-shortsecret", &["--webhook-secret", "short"]);
    let (status, log) = node.exited().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("at least 16"), "{log}");
}

/// The address a `key=ADDR` field of the first log line containing `message` names.
fn logged_addr(node: &Node, message: &str, key: &str) -> std::net::SocketAddr {
    let log = node.log.lock().expect("log lock");
    let line = log.iter().find(|line| line.contains(message)).unwrap_or_else(|| panic!("no {message:?} line"));
    let field = line.split_whitespace().find_map(|word| word.strip_prefix(&format!("{key}="))).expect("address field");
    field.parse().unwrap_or_else(|_| panic!("not an address: {field:?} in {line:?}"))
}

/// SIGTERM during a call: the node takes no new calls (503 with Retry-After to INVITE and
/// OPTIONS, /readyz 503) but the call in progress goes on to its end and is billed; then the
/// node exits 0 by itself, long before its drain time.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn sigterm_drains_the_calls_in_progress_and_refuses_new_ones(pool: PgPool) {
    use common::ua::*;
    let callee = Ua::new().await;
    let mut tx = pool.begin().await.expect("begin");
    let generation = bump_generation(&mut tx).await.expect("bump");
    common::trunk("carrier", vec![]).upsert(&mut tx, "hash", generation).await.expect("trunk");
    common::number_to(common::sip_destination(callee.sip_addr().port()))
        .upsert(&mut tx, "hash", generation)
        .await
        .expect("number");
    notify_generation(&mut tx, generation).await.expect("notify");
    tx.commit().await.expect("commit");

    let node = Node::start_with(&url_of(&pool), "proc-drain", &["--drain-seconds", "60", "--rtp-ports", "41000-41999"]);
    wait_for_applied(&pool, &node, "proc-drain", generation).await;
    node.wait_for_log("metrics and health on HTTP").await;
    let sip = logged_addr(&node, "SIP listening", "sip");
    let http = logged_addr(&node, "metrics and health on HTTP", "http");

    // A call: caller -> node -> callee, answered.
    let caller = Ua::new().await;
    caller.send(&invite_to_did(sip, caller.sip_addr(), "drain-1", &sdp(caller.rtp_port(), "0", "sendrecv")), sip).await;
    let (invite, from) = callee.request("INVITE").await;
    callee
        .send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&sdp(callee.rtp_port(), "0", "sendrecv"))), from)
        .await;
    let _ = callee.request("ACK").await;
    let ok = caller.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let tag = to_tag(&ok);
    caller.send(&caller_in_dialog("ACK", sip, caller.sip_addr(), "drain-1", &tag, 1), sip).await;
    assert!(common::http_get(http, "/readyz").await.starts_with("HTTP/1.1 200"));

    let pid = node.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    node.wait_for_log("draining").await;

    // New calls and pings are refused; the node is not ready.
    let late = Ua::new().await;
    late.send(&invite_to_did(sip, late.sip_addr(), "drain-2", &sdp(late.rtp_port(), "0", "sendrecv")), sip).await;
    let refused = late.final_response().await;
    assert!(refused.starts_with("SIP/2.0 503"), "{refused}");
    assert!(header(&refused, "Retry-After").is_some(), "{refused}");
    let options = format!(
        "OPTIONS sip:{sip} SIP/2.0\r\nVia: SIP/2.0/UDP {0};branch=z9hG4bK-drain-ping\r\nFrom: <sip:ping@{0}>;tag=p\r\n\
         To: <sip:{sip}>\r\nCall-ID: drain-ping\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        late.sip_addr()
    );
    late.send(&options, sip).await;
    let pong = late.final_response().await;
    assert!(pong.starts_with("SIP/2.0 503"), "{pong}");
    let ready = common::http_get(http, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");

    // The call in progress is still up: the caller hangs up through the node.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(node_running(&node), "the node stopped with a call up; log:\n{}", node.dump());
    caller.send(&caller_in_dialog("BYE", sip, caller.sip_addr(), "drain-1", &tag, 2), sip).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    let bye_ok = caller.final_response().await;
    assert!(bye_ok.starts_with("SIP/2.0 200"), "{bye_ok}");

    // The last call ended: the node stops by itself, having written the call's CDR.
    let (status, log) = node.exited().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("drained"), "{log}");
    let answered: i64 = sqlx::query_scalar("SELECT count(*) FROM cdrs WHERE answer_at IS NOT NULL AND sip_code = 200")
        .fetch_one(&pool)
        .await
        .expect("cdrs");
    assert_eq!(answered, 1, "the drained call's CDR; log:\n{log}");
}

fn node_running(node: &Node) -> bool {
    let status = Command::new("kill").args(["-0", &node.child.id().to_string()]).status().expect("kill -0");
    status.success()
}
