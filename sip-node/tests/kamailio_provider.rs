//! Kamailio (Debian's `kamailio`) as the wholesale provider: it challenges REGISTER (401) and
//! INVITE (407) with digest, checking a fixed password without a database. The node must
//! register, refresh, un-register on shutdown, and place calls through it to a sipp callee.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use switchboard_model::{AuthMethod, Credential, Destination, DestinationType, TrunkConfig};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-Pa55";

/// A Kamailio process with the provider configuration; stopped with SIGTERM on drop (so that
/// its worker processes go too).
struct Kamailio {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Kamailio {
    fn start(port: u16, uas_port: u16) -> Kamailio {
        let template =
            std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kamailio/provider.cfg"))
                .expect("read the Kamailio template");
        let config = template
            .replace("@KPORT@", &port.to_string())
            .replace("@UAS@", &format!("127.0.0.1:{uas_port}"))
            .replace("@USER@", USER)
            .replace("@PASSWORD@", PASSWORD);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kamailio.cfg");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("kamailio.log")).unwrap();
        let child = Command::new("kamailio")
            .args(["-DD", "-E", "-m", "32", "-M", "8", "-Y"])
            .arg(dir.path())
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("kamailio (Debian package kamailio) must be installed");
        // Bounded wait until it answers on its port.
        let deadline = Instant::now() + Duration::from_secs(10);
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let options = format!(
            "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKprobe\r\n\
             From: <sip:probe@127.0.0.1>;tag=p\r\nTo: <sip:127.0.0.1:{port}>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\n\
             Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            probe.local_addr().unwrap().port()
        );
        let mut buf = [0u8; 2048];
        loop {
            probe.send_to(options.as_bytes(), ("127.0.0.1", port)).unwrap();
            if probe.recv_from(&mut buf).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "kamailio did not start; see its log");
        }
        Kamailio { child, _dir: dir }
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

fn provider_trunk(port: u16) -> TrunkConfig {
    let mut trunk = trunk("kamailio", vec![("127.0.0.1".into(), port)]);
    trunk.auth_method = AuthMethod::Digest;
    trunk.allowed_source_cidrs = vec![];
    trunk
}

fn credential(password: &str) -> Credential {
    Credential {
        namespace: "default".into(),
        trunk_name: "kamailio".into(),
        username: USER.into(),
        password: password.into(),
        secret_name: "kamailio-credentials".into(),
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Registration {
    state: String,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<String>,
    reachable: Option<bool>,
    options_rtt_ms: Option<i32>,
}

async fn registration(pool: &PgPool) -> Option<Registration> {
    sqlx::query_as(
        "SELECT state, expires_at, last_error, reachable, options_rtt_ms FROM registrations WHERE trunk_name = 'kamailio'",
    )
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Waits (bounded) until the registration row satisfies `check`.
async fn wait_registration(pool: &PgPool, what: &str, check: impl Fn(&Registration) -> bool) -> Registration {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(row) = registration(pool).await
            && check(&row)
        {
            return row;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last: {:?}", registration(pool).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_node_registers_with_digest_refreshes_and_unregisters(pool: PgPool) {
    let port = free_port("127.0.0.1");
    let _kamailio = Kamailio::start(port, free_port("127.0.0.1"));
    let mut trunk = provider_trunk(port);
    trunk.registration_enabled = true;
    trunk.registration_expires = 3;
    trunk.options_interval_seconds = 1;
    let node = Node::start_with(&pool, vec![trunk], vec![], vec![credential(PASSWORD)]).await;
    let pinged = wait_registration(&pool, "reachable by OPTIONS", |r| r.reachable == Some(true)).await;
    assert!(pinged.options_rtt_ms.is_some());
    let first = wait_registration(&pool, "registered", |r| r.state == "registered").await;
    let first_expiry = first.expires_at.expect("a registered row has an expiry");
    // Refreshed before it expires: the expiry moves forward while the state stays registered.
    let refreshed = wait_registration(&pool, "a refresh", |r| {
        r.state == "registered" && r.expires_at.is_some_and(|e| e > first_expiry)
    })
    .await;
    assert!(refreshed.last_error.is_none());
    node.stop().await;
    wait_registration(&pool, "unregistered on shutdown", |r| r.state == "unregistered").await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_wrong_password_shows_as_a_failed_registration(pool: PgPool) {
    let port = free_port("127.0.0.1");
    let _kamailio = Kamailio::start(port, free_port("127.0.0.1"));
    let mut trunk = provider_trunk(port);
    trunk.registration_enabled = true;
    let node = Node::start_with(&pool, vec![trunk], vec![], vec![credential("wrong")]).await;
    let failed = wait_registration(&pool, "failed", |r| r.state == "failed").await;
    assert!(failed.last_error.as_deref().unwrap_or_default().contains("401"), "{failed:?}");
    assert!(!failed.last_error.unwrap_or_default().contains("wrong"), "the password must not leak into the state");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn calls_go_out_through_a_provider_that_challenges_invite(pool: PgPool) {
    let port = free_port("127.0.0.1");
    let callee = free_port("127.0.0.1");
    let _kamailio = Kamailio::start(port, callee);
    let inbound = trunk("carrier", vec![]);
    let destination = Destination {
        kind: DestinationType::Number,
        url: None,
        uri: None,
        number: Some("+15559990000".into()),
        trunk_ref: Some("kamailio".into()),
        reject_code: None,
    };
    let node = Node::start_with(
        &pool,
        vec![inbound, provider_trunk(port)],
        vec![number_to(destination)],
        vec![credential(PASSWORD)],
    )
    .await;
    let uas = uas(&["-sn", "uas"], callee, 1);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the call through Kamailio failed");
    assert!(uas.wait().await.success(), "the callee behind Kamailio did not get the call");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.sip_code), Some(200), "{cdrs:?}");
    assert_eq!(cdrs.last().and_then(|c| c.trunk_name.clone()).as_deref(), Some("kamailio"));
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_silent_gateway_is_unreachable(pool: PgPool) {
    // Nothing listens on this port: OPTIONS times out (64*T1 with T1 = 20 ms).
    let mut trunk = provider_trunk(free_port("127.0.0.1"));
    trunk.options_interval_seconds = 1;
    let node = Node::start_tuned(&pool, vec![trunk], vec![], vec![], |args| args.sip_t1_ms = 20).await;
    wait_registration(&pool, "unreachable", |r| r.reachable == Some(false)).await;
    node.stop().await;
}
