//! The `switchboard-node` binary as a process: waits for the schema and for Postgres, applies
//! generations (the log line local mode looks for, the `nodes` row the operator reads), and
//! exits 0 on SIGTERM after recording that it stopped.

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
}

impl Node {
    fn start(database_url: &str, node_id: &str) -> Self {
        Node::start_with(database_url, node_id, &[])
    }

    /// Starts the node with `extra` flags after the usual ones.
    fn start_with(database_url: &str, node_id: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard-node"))
            .args(["--database-url", database_url, "--node-id", node_id])
            .args(["--heartbeat-interval-ms", "200", "--config-poll-interval-ms", "200"])
            .args(["--sip-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
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
        Self { child, log }
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
