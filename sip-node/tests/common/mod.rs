//! Test harness shared by the cross-process SIP tests: the node in-process on a test
//! database, sipp and Kamailio as child processes with bounded waits, and configuration
//! builders.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use sqlx::PgPool;
use switchboard_model::{Credential, Destination, DestinationType, NumberConfig, RuleConfig, TrunkConfig};
use switchboard_node::config::{Snapshot, SnapshotHandle};
use switchboard_node::drain::Drain;
use switchboard_node::media::kernel::KernelMode;
use switchboard_node::signaling::{self, Listening, SipArgs};

pub mod agent;
pub mod kamailio;
pub mod pki;
pub mod process;
pub mod ua;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub const DID: &str = "+15550001111";

pub fn scenario(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sipp").join(name).to_string_lossy().into_owned()
}

/// A UDP port that was free a moment ago on `ip`.
pub fn free_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

pub fn trunk(name: &str, gateways: Vec<(String, u16)>) -> TrunkConfig {
    TrunkConfig::loopback(name, gateways)
}

pub fn number_to(destination: Destination) -> NumberConfig {
    NumberConfig {
        namespace: "default".into(),
        name: "did".into(),
        number: DID.into(),
        trunk_ref: "carrier".into(),
        routing_rule_ref: None,
        destination: Some(destination),
        message_webhook: None,
        caller_id_allowed: true,
    }
}

pub fn sip_destination(port: u16) -> Destination {
    Destination {
        kind: DestinationType::Sip,
        url: None,
        uri: Some(format!("sip:callee@127.0.0.1:{port}")),
        number: None,
        trunk_ref: None,
        reject_code: None,
    }
}

/// The node under test.
pub struct Node {
    pub addr: SocketAddr,
    /// The TLS listener (when the test gave the node a certificate).
    pub tls: Option<SocketAddr>,
    pub http: SocketAddr,
    stop: watch::Sender<bool>,
    /// The node's draining switch (what SIGTERM turns on in the binary).
    pub drain: Drain,
    tasks: JoinSet<()>,
    graceful: JoinSet<()>,
}

impl Node {
    pub async fn start(pool: &PgPool, trunks: Vec<TrunkConfig>, numbers: Vec<NumberConfig>) -> Node {
        Node::start_with(pool, trunks, numbers, vec![]).await
    }

    pub async fn start_with(
        pool: &PgPool,
        trunks: Vec<TrunkConfig>,
        numbers: Vec<NumberConfig>,
        credentials: Vec<Credential>,
    ) -> Node {
        Node::start_tuned(pool, trunks, numbers, credentials, |_| {}).await
    }

    /// Starts the node with `tune` applied to its SIP settings.
    pub async fn start_tuned(
        pool: &PgPool,
        trunks: Vec<TrunkConfig>,
        numbers: Vec<NumberConfig>,
        credentials: Vec<Credential>,
        tune: impl FnOnce(&mut SipArgs),
    ) -> Node {
        Node::start_full(pool, trunks, numbers, vec![], credentials, tune).await
    }

    /// Starts the node with routing rules (outbound rules decide where REFER targets may go).
    pub async fn start_routed(
        pool: &PgPool,
        trunks: Vec<TrunkConfig>,
        numbers: Vec<NumberConfig>,
        rules: Vec<RuleConfig>,
        tune: impl FnOnce(&mut SipArgs),
    ) -> Node {
        Node::start_full(pool, trunks, numbers, rules, vec![], tune).await
    }

    async fn start_full(
        pool: &PgPool,
        trunks: Vec<TrunkConfig>,
        numbers: Vec<NumberConfig>,
        rules: Vec<RuleConfig>,
        credentials: Vec<Credential>,
        tune: impl FnOnce(&mut SipArgs),
    ) -> Node {
        let snapshot = Snapshot::from_parts(1, trunks, numbers, rules, credentials).unwrap();
        Node::start_snapshot(pool, snapshot, tune).await
    }

    /// Starts the node serving `snapshot` (for parts `from_parts` does not take, such as the
    /// trunks' TLS material).
    pub async fn start_snapshot(pool: &PgPool, snapshot: Snapshot, tune: impl FnOnce(&mut SipArgs)) -> Node {
        sqlx::query("INSERT INTO nodes (node_id, hostname, version) VALUES ('sipp-node', 'test', 'test') ON CONFLICT DO NOTHING")
            .execute(pool)
            .await
            .unwrap();
        let handle = SnapshotHandle::new(snapshot);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut graceful = JoinSet::new();
        let mut args = SipArgs {
            sip_listen: vec!["127.0.0.1:0".parse().unwrap()],
            advertised_host: None,
            advertised_port: None,
            http_listen: "127.0.0.1:0".parse().unwrap(),
            sip_t1_ms: 500,
            per_source_rate: 20_000,
            webhook_secret: Some("test-webhook-secret".into()),
            // The tests' agents and webhooks listen on loopback, which the node refuses for
            // API-supplied URLs unless listed.
            egress_allow: vec!["127.0.0.0/8".into()],
            rtp_ports: "30000-39999".into(),
            media_threads: 0,
            kernel_forwarding: kernel_mode(),
            media_timeout_seconds: 30,
            final_codes: switchboard_node::sip::routing::DEFAULT_FINAL_CODES.to_vec(),
            agent: switchboard_node::bridge::answer::AgentArgs::default(),
            spool: None,
            guard: switchboard_node::sip::guard::GuardArgs::default(),
            tls: switchboard_node::sip::tls::TlsArgs::default(),
            session: Default::default(),
        };
        tune(&mut args);
        let drain = Drain::default();
        // The node gets a pool of its own, as in production: a #[sqlx::test] pool holds at most
        // 5 connections, which a node's listeners and workers, a second node of the same test
        // and the test's own queries would otherwise share (and time out on).
        let node_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect_lazy_with((*pool.connect_options()).clone());
        let Listening { sip, sip_tls, http } = signaling::start(
            &args,
            node_pool,
            "sipp-node",
            handle,
            signaling::NodeTasks { tasks: &mut tasks, graceful: &mut graceful, stop: stop_rx, drain: drain.clone() },
        )
        .await
        .unwrap();
        Node { addr: sip, tls: sip_tls, http, stop, drain, tasks, graceful }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ =
            tokio::time::timeout(Duration::from_secs(8), async { while self.graceful.join_next().await.is_some() {} })
                .await;
        self.tasks.shutdown().await;
    }
}

/// A sipp process; killed on drop if still running.
pub struct Sipp {
    child: Child,
    name: String,
    /// How long sipp may run (its `-timeout`); [`Sipp::wait`] waits 10 s more.
    limit: Duration,
}

impl Sipp {
    pub fn start(name: &str, args: &[String]) -> Sipp {
        Sipp::start_for(name, args, Duration::from_secs(20))
    }

    /// Like [`Sipp::start`] for scenarios that take longer than 20 s (session timers).
    pub fn start_for(name: &str, args: &[String], limit: Duration) -> Sipp {
        let timeout = format!("{}s", limit.as_secs());
        let child = Command::new("sipp")
            .args(args)
            .args(["-timeout", &timeout, "-timeout_error", "-nostdin", "-trace_err", "-error_file"])
            .arg(std::env::temp_dir().join(format!("sipp-{name}-{}.log", std::process::id())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp (Debian package sip-tester) must be installed");
        Sipp { child, name: name.into(), limit }
    }

    /// Waits (bounded) for sipp to exit.
    pub async fn wait(mut self) -> ExitStatus {
        let deadline = Instant::now() + self.limit + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sipp {} did not finish", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn uas(scenario_arg: &[&str], port: u16, calls: u32) -> Sipp {
    let mut args: Vec<String> = scenario_arg.iter().map(|s| s.to_string()).collect();
    args.extend(["-i", "127.0.0.1", "-p", &port.to_string(), "-m", &calls.to_string()].map(String::from));
    Sipp::start("uas", &args)
}

pub fn uac(scenario_arg: &[&str], node: SocketAddr, local_ip: &str, calls: u32, extra: &[&str]) -> Sipp {
    Sipp::start("uac", &uac_args(scenario_arg, node, local_ip, calls, extra))
}

fn uac_args(scenario_arg: &[&str], node: SocketAddr, local_ip: &str, calls: u32, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = scenario_arg.iter().map(|s| s.to_string()).collect();
    args.push(node.to_string());
    args.extend(
        ["-s", DID, "-i", local_ip, "-p", &free_port(local_ip).to_string(), "-m", &calls.to_string()].map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// One call from a caller scenario that may run for `limit` (session timers).
pub fn long_uac(scenario: &str, node: SocketAddr, limit: Duration) -> Sipp {
    Sipp::start_for("uac", &uac_args(&["-sf", scenario], node, "127.0.0.1", 1, &[]), limit)
}

/// One call to a callee scenario that may run for `limit` (session timers).
pub fn long_uas(scenario: &str, port: u16, limit: Duration) -> Sipp {
    let mut args: Vec<String> = vec!["-sf".into(), scenario.into()];
    args.extend(["-i", "127.0.0.1", "-p", &port.to_string(), "-m", "1"].map(String::from));
    Sipp::start_for("uas", &args, limit)
}

#[derive(Debug, sqlx::FromRow)]
pub struct Cdr {
    pub attempt: i32,
    pub sip_code: Option<i32>,
    pub hangup_by: Option<String>,
    pub trunk_name: Option<String>,
    pub gateway: Option<String>,
    pub answer_at: Option<chrono::DateTime<chrono::Utc>>,
    pub cost: Decimal,
    pub reason: Option<String>,
}

/// CDRs once the store has written `expected` of them (bounded wait).
pub async fn cdrs(pool: &PgPool, expected: usize) -> Vec<Cdr> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<Cdr> = sqlx::query_as(
            "SELECT attempt, sip_code, hangup_by, trunk_name, gateway, answer_at, cost, reason FROM cdrs ORDER BY call_id, attempt",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        if rows.len() >= expected || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn active_calls(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM active_calls").fetch_one(pool).await.unwrap()
}

/// GET on the node's HTTP endpoint with a plain HTTP/1.1 request; returns the body.
/// A metric without labels from the node's `/metrics`, if it exports it.
/// The tests' kernel forwarding (`SWITCHBOARD_TEST_KERNEL_FORWARDING`): scripts/test requires it
/// where it can load (root, clang at build time) and runs the media tests once more with it
/// off, for the user-space path; `auto` elsewhere.
pub fn kernel_mode() -> KernelMode {
    match std::env::var("SWITCHBOARD_TEST_KERNEL_FORWARDING").as_deref() {
        Ok("off") => KernelMode::Off,
        Ok("on") => KernelMode::On,
        _ => KernelMode::Auto,
    }
}

pub async fn metric(node: &Node, name: &str) -> Option<f64> {
    let text = http_get(node.http, "/metrics").await;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await.unwrap().unwrap();
    response
}

/// Stops a child process the test started: SIGTERM, up to 5 s for it to exit, then SIGKILL.
/// For the `Drop` of process guards (Kamailio), so that a failing test leaves nothing running.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
