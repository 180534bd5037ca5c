//! Kamailio with its TLS module (Debian's `kamailio-tls-modules`) as a provider that speaks SIP
//! over TLS: the node registers with digest over TLS, places calls through it over TLS, takes
//! calls it relays over TLS (admitted by Kamailio's client certificate on a certificate-auth
//! trunk, and refused with another or none), and refuses a provider whose certificate it cannot
//! trust or that has expired. Every certificate is made at test time (rcgen); Kamailio logs the
//! transport it saw (`$pr`), so the tests know the messages really went over TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pki::{Ca, Leaf};
use common::*;
use sqlx::PgPool;
use switchboard_model::{AuthMethod, Credential, Destination, DestinationType, Transport, TrunkConfig, TrunkTls};
use switchboard_node::config::Snapshot;
use switchboard_node::sip::tls::TlsArgs;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-Pa55";
const MODULES: &str = "/usr/lib/x86_64-linux-gnu/kamailio/modules/";

/// A TCP port that was free a moment ago on loopback.
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The ports and certificates of one test: the CA both sides trust, Kamailio's certificate.
struct Provider {
    udp: u16,
    tls: u16,
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Provider {
    fn new() -> Provider {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("provider CA");
        ca.leaf(&["127.0.0.1"]).write(dir.path(), "provider");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Provider { udp: free_port("127.0.0.1"), tls: free_tcp_port(), dir, ca }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The node's TLS settings: a listener certificate from the provider's CA (Kamailio checks
    /// it when it requires certificates) and the CA as trusted for the provider (`trust`).
    fn node_tls(&self, trust: bool) -> TlsArgs {
        let node_dir = self.dir.path().join("node");
        std::fs::create_dir_all(&node_dir).unwrap();
        let (cert, key) = self.ca.leaf(&["127.0.0.1"]).write(&node_dir, "node");
        TlsArgs {
            cert: Some(cert),
            key: Some(key),
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            ca_file: trust.then(|| self.ca_file()),
            handshake_timeout_ms: 2_000,
            ..TlsArgs::default()
        }
    }

    /// The trunk towards the provider's TLS port.
    fn trunk(&self) -> TrunkConfig {
        let mut trunk = trunk("kamailio", vec![("127.0.0.1".into(), self.tls)]);
        trunk.gateways[0].transport = Transport::Tls;
        trunk.auth_method = AuthMethod::Digest;
        trunk.allowed_source_cidrs = vec![];
        trunk
    }
}

/// A Kamailio process; stopped with SIGTERM on drop.
struct Kamailio {
    child: Child,
    log: PathBuf,
}

impl Kamailio {
    fn start(
        provider: &Provider,
        uas_port: u16,
        node_tls: Option<std::net::SocketAddr>,
        require_cert: bool,
    ) -> Kamailio {
        Kamailio::start_with(provider, uas_port, node_tls, require_cert, None)
    }

    /// Kamailio relaying calls to the node's TLS listener and presenting `caller` (a leaf of
    /// the provider's CA) as its client certificate there (`[client:default]` of a tls.cfg).
    fn start_presenting(provider: &Provider, node_tls: std::net::SocketAddr, caller: &Leaf) -> Kamailio {
        let dir = provider.dir.path();
        let (cert, key) = caller.write(dir, "caller");
        let server = format!(
            "method = TLSv1.2+\nverify_certificate = no\nrequire_certificate = no\ncertificate = {d}/provider.crt\n\
             private_key = {d}/provider.key\nca_list = {d}/ca.pem\n",
            d = dir.display()
        );
        let client = format!(
            "method = TLSv1.2+\nverify_certificate = no\nrequire_certificate = no\ncertificate = {}\nprivate_key = {}\n",
            cert.display(),
            key.display()
        );
        let path = dir.join("tls.cfg");
        std::fs::write(&path, format!("[server:default]\n{server}\n[client:default]\n{client}")).unwrap();
        Kamailio::start_with(provider, free_port("127.0.0.1"), Some(node_tls), false, Some(path))
    }

    fn start_with(
        provider: &Provider,
        uas_port: u16,
        node_tls: Option<std::net::SocketAddr>,
        require_cert: bool,
        tls_config: Option<PathBuf>,
    ) -> Kamailio {
        assert!(
            Path::new(MODULES).join("tls.so").exists(),
            "Kamailio's TLS module is missing: apt-get install -y kamailio-tls-modules"
        );
        let template =
            std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kamailio/provider-tls.cfg"))
                .unwrap();
        let config = template
            .replace("@KPORT@", &provider.udp.to_string())
            .replace("@KTLS@", &provider.tls.to_string())
            .replace("@UAS@", &format!("127.0.0.1:{uas_port}"))
            .replace("@NODE_TLS@", &node_tls.map(|a| a.to_string()).unwrap_or_else(|| "127.0.0.1:9".into()))
            .replace("@DID@", DID)
            .replace("@USER@", USER)
            .replace("@PASSWORD@", PASSWORD)
            .replace("@DIR@", &provider.dir.path().display().to_string())
            .replace("@REQUIRE_CERT@", if require_cert { "1" } else { "0" })
            .replace(
                "@TLS_CONFIG@",
                &tls_config.map(|p| format!("modparam(\"tls\", \"config\", \"{}\")", p.display())).unwrap_or_default(),
            );
        let path = provider.dir.path().join("kamailio.cfg");
        std::fs::write(&path, config).unwrap();
        let log = provider.dir.path().join("kamailio.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("kamailio")
            .args(["-DD", "-E", "-m", "32", "-M", "8", "-Y"])
            .arg(provider.dir.path())
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("kamailio (Debian package kamailio) must be installed");
        let kamailio = Kamailio { child, log };
        // Bounded wait until the TLS port accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", provider.tls)).is_err() {
            assert!(Instant::now() < deadline, "kamailio did not start: {}", kamailio.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        kamailio
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until Kamailio's log has `line`.
    async fn wait_log(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log().contains(line) {
            assert!(Instant::now() < deadline, "kamailio never logged {line:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

fn credential() -> Credential {
    Credential {
        namespace: "default".into(),
        trunk_name: "kamailio".into(),
        username: USER.into(),
        password: PASSWORD.into(),
        secret_name: "kamailio-credentials".into(),
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct Registration {
    state: String,
    last_error: Option<String>,
    reachable: Option<bool>,
    unreachable_reason: Option<String>,
}

/// Waits (bounded) until the trunk's registration row satisfies `check`. The bound is wide:
/// under CI's load (two tests at once, each with a Kamailio doing TLS) a registration that
/// takes 3 s alone stayed "registering" past 20 s once.
async fn wait_registration(pool: &PgPool, what: &str, check: impl Fn(&Registration) -> bool) -> Registration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row: Option<Registration> = sqlx::query_as(
            "SELECT state, last_error, reachable, unreachable_reason FROM registrations WHERE trunk_name = 'kamailio'",
        )
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(row) = row.as_ref().filter(|r| check(r)) {
            return row.clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last: {row:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Short SIP timers, so that a refused handshake shows as a failed registration quickly.
fn tuned(tls: TlsArgs) -> impl FnOnce(&mut switchboard_node::signaling::SipArgs) {
    move |args| {
        args.sip_t1_ms = 100;
        args.tls = tls;
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_node_registers_with_digest_over_tls_and_answers_options(pool: PgPool) {
    let provider = Provider::new();
    let kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), None, false);
    let mut trunk = provider.trunk();
    trunk.registration_enabled = true;
    trunk.registration_expires = 60;
    trunk.options_interval_seconds = 1;
    let node = Node::start_tuned(&pool, vec![trunk], vec![], vec![credential()], tuned(provider.node_tls(true))).await;
    wait_registration(&pool, "registered", |r| r.state == "registered").await;
    let reachable = wait_registration(&pool, "reachable", |r| r.reachable == Some(true)).await;
    assert_eq!(reachable.unreachable_reason, None);
    kamailio.wait_log("REGISTER accepted for alice over tls").await;
    kamailio.wait_log("OPTIONS answered over tls").await;
    assert!(!kamailio.log().contains("over udp"), "nothing went in plaintext:\n{}", kamailio.log());
    node.stop().await;
    wait_registration(&pool, "unregistered on shutdown", |r| r.state == "unregistered").await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_untrusted_provider_certificate_is_refused_with_the_reason(pool: PgPool) {
    let provider = Provider::new();
    let kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), None, false);
    let mut trunk = provider.trunk();
    trunk.registration_enabled = true;
    trunk.options_interval_seconds = 1;
    // The node trusts only the web PKI roots: the provider's private CA is unknown to it.
    let node = Node::start_tuned(&pool, vec![trunk], vec![], vec![credential()], tuned(provider.node_tls(false))).await;
    let failed = wait_registration(&pool, "a failed registration", |r| r.state == "failed").await;
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("certificate is not trusted"), "{error}");
    // The OPTIONS keepalive says why too (the operator puts it into Reachable=False).
    let unreachable = wait_registration(&pool, "unreachable", |r| r.reachable == Some(false)).await;
    let reason = unreachable.unreachable_reason.unwrap_or_default();
    assert!(reason.contains("certificate is not trusted (unknown issuer)"), "{reason}");
    assert!(!kamailio.log().contains("REGISTER accepted"), "{}", kamailio.log());
    node.stop().await;
}

/// A provider that admits only clients with a certificate from its CA (Kamailio's
/// `require_certificate`): the node registers when it presents its client certificate
/// (`--sip-tls-client-cert`), and not without one.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_provider_requiring_a_client_certificate_admits_the_node_only_with_one(pool: PgPool) {
    let provider = Provider::new();
    let kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), None, true);
    let mut trunk = provider.trunk();
    trunk.registration_enabled = true;
    trunk.options_interval_seconds = 1;

    let without = provider.node_tls(true);
    let node = Node::start_tuned(&pool, vec![trunk.clone()], vec![], vec![credential()], tuned(without)).await;
    let failed = wait_registration(&pool, "a failed registration", |r| r.state == "failed").await;
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("refused the handshake"), "{error}");
    assert!(!kamailio.log().contains("REGISTER accepted"), "{}", kamailio.log());
    node.stop().await;

    let client_dir = provider.dir.path().join("client");
    std::fs::create_dir_all(&client_dir).unwrap();
    let (client_cert, client_key) = provider.ca.leaf(&["node.switchboard.test"]).write(&client_dir, "client");
    let with = TlsArgs { client_cert: Some(client_cert), client_key: Some(client_key), ..provider.node_tls(true) };
    let node = Node::start_tuned(&pool, vec![trunk], vec![], vec![credential()], tuned(with)).await;
    wait_registration(&pool, "registered with a client certificate", |r| r.state == "registered").await;
    kamailio.wait_log("REGISTER accepted for alice over tls").await;
    node.stop().await;
}

/// A certificate-auth trunk (`authMethod: certificate`) with its own client certificate and
/// CA (`tls.clientCertSecretRef`, `tls.caSecretRef`, as the operator stores them): the node has
/// neither a node-wide CA nor a client certificate, so the trunk's are the only way in. With
/// them the provider, which requires a client certificate, takes the REGISTER and answers the
/// OPTIONS keepalives; with the trunk's CA but no client certificate it refuses the handshake.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_certificate_auth_trunk_presents_its_own_client_certificate(pool: PgPool) {
    let provider = Provider::new();
    let kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), None, true);
    let mut trunk = provider.trunk();
    trunk.auth_method = AuthMethod::Certificate;
    trunk.registration_enabled = true;
    trunk.registration_expires = 60;
    trunk.options_interval_seconds = 1;
    let ca_only = TrunkTls {
        namespace: "default".into(),
        trunk_name: "kamailio".into(),
        ca_pem: Some(provider.ca.pem()),
        ca_secret_name: Some("kamailio-ca".into()),
        ..TrunkTls::default()
    };
    let snapshot = |tls: TrunkTls| {
        Snapshot::from_parts(1, vec![trunk.clone()], vec![], vec![], vec![credential()])
            .unwrap()
            .with_trunk_tls(vec![tls])
    };

    // The trunk's CA but no client certificate: the provider refuses the handshake.
    let node = Node::start_snapshot(&pool, snapshot(ca_only.clone()), tuned(provider.node_tls(false))).await;
    let failed = wait_registration(&pool, "a failed registration", |r| r.state == "failed").await;
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("refused the handshake"), "{error}");
    assert!(!kamailio.log().contains("REGISTER accepted"), "{}", kamailio.log());
    node.stop().await;

    // The trunk's client certificate (from its Secret): registered and reachable over TLS.
    let client = provider.ca.leaf(&["trunk.switchboard.test"]);
    let with_cert = TrunkTls {
        client_cert_pem: Some(client.cert_pem.clone()),
        client_key_pem: Some(client.key_pem.clone()),
        client_secret_name: Some("kamailio-client".into()),
        ..ca_only
    };
    let node = Node::start_snapshot(&pool, snapshot(with_cert), tuned(provider.node_tls(false))).await;
    wait_registration(&pool, "registered with the trunk's certificate", |r| r.state == "registered").await;
    let reachable = wait_registration(&pool, "reachable", |r| r.reachable == Some(true)).await;
    assert_eq!(reachable.unreachable_reason, None);
    kamailio.wait_log("REGISTER accepted for alice over tls").await;
    kamailio.wait_log("OPTIONS answered over tls").await;
    node.stop().await;
}

/// A call through a certificate-auth trunk: the provider requires a client certificate, and
/// the node has only the trunk's (and trusts the provider through the trunk's CA alone).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_call_goes_out_through_a_certificate_auth_trunk(pool: PgPool) {
    let provider = Provider::new();
    let callee = free_port("127.0.0.1");
    let kamailio = Kamailio::start(&provider, callee, None, true);
    let mut certificate_trunk = provider.trunk();
    certificate_trunk.auth_method = AuthMethod::Certificate;
    let client = provider.ca.leaf(&["trunk.switchboard.test"]);
    let tls = TrunkTls {
        namespace: "default".into(),
        trunk_name: "kamailio".into(),
        client_cert_pem: Some(client.cert_pem.clone()),
        client_key_pem: Some(client.key_pem.clone()),
        ca_pem: Some(provider.ca.pem()),
        client_secret_name: Some("kamailio-client".into()),
        ca_secret_name: Some("kamailio-ca".into()),
    };
    let destination = Destination {
        kind: DestinationType::Number,
        url: None,
        uri: None,
        number: Some("+15559990000".into()),
        trunk_ref: Some("kamailio".into()),
        reject_code: None,
    };
    let snapshot = Snapshot::from_parts(
        1,
        vec![trunk("carrier", vec![]), certificate_trunk],
        vec![number_to(destination)],
        vec![],
        vec![credential()],
    )
    .unwrap()
    .with_trunk_tls(vec![tls]);
    let node = Node::start_snapshot(&pool, snapshot, tuned(provider.node_tls(false))).await;
    let uas = uas(&["-sf", &scenario("uas_record_route.xml")], callee, 1);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the call through the certificate-auth trunk failed:\n{}", kamailio.log());
    assert!(uas.wait().await.success(), "the callee behind Kamailio did not get the call:\n{}", kamailio.log());
    kamailio.wait_log("INVITE authenticated for").await;
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.sip_code), Some(200), "{cdrs:?}");
    node.stop().await;
}

/// A trunk whose client certificate does not parse is unreachable with a reason naming the
/// trunk and its Secret, instead of silently connecting without a certificate.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_trunk_with_an_unusable_client_certificate_says_which_secret(pool: PgPool) {
    let provider = Provider::new();
    let _kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), None, true);
    let mut trunk = provider.trunk();
    trunk.auth_method = AuthMethod::Certificate;
    trunk.registration_enabled = true;
    trunk.options_interval_seconds = 1;
    let broken = TrunkTls {
        namespace: "default".into(),
        trunk_name: "kamailio".into(),
        client_cert_pem: Some("not a certificate".into()),
        client_key_pem: Some("not a key".into()),
        client_secret_name: Some("kamailio-client".into()),
        ..TrunkTls::default()
    };
    let snapshot =
        Snapshot::from_parts(1, vec![trunk], vec![], vec![], vec![credential()]).unwrap().with_trunk_tls(vec![broken]);
    let node = Node::start_snapshot(&pool, snapshot, tuned(provider.node_tls(true))).await;
    let unreachable = wait_registration(&pool, "unreachable", |r| r.reachable == Some(false)).await;
    let reason = unreachable.unreachable_reason.unwrap_or_default();
    assert!(reason.contains("trunk default/kamailio") && reason.contains("kamailio-client"), "{reason}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn calls_go_out_over_tls_through_a_provider_that_challenges_invite(pool: PgPool) {
    let provider = Provider::new();
    let callee = free_port("127.0.0.1");
    let kamailio = Kamailio::start(&provider, callee, None, false);
    let destination = Destination {
        kind: DestinationType::Number,
        url: None,
        uri: None,
        number: Some("+15559990000".into()),
        trunk_ref: Some("kamailio".into()),
        reject_code: None,
    };
    let node = Node::start_tuned(
        &pool,
        vec![trunk("carrier", vec![]), provider.trunk()],
        vec![number_to(destination)],
        vec![credential()],
        tuned(provider.node_tls(true)),
    )
    .await;
    let uas = uas(&["-sf", &scenario("uas_record_route.xml")], callee, 1);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the call through Kamailio over TLS failed:\n{}", kamailio.log());
    assert!(uas.wait().await.success(), "the callee behind Kamailio did not get the call:\n{}", kamailio.log());
    kamailio.wait_log("INVITE authenticated for").await;
    // The INVITE, and the ACK and BYE along the provider's route, all over TLS.
    let log = kamailio.log();
    for method in ["INVITE", "ACK", "BYE"] {
        assert!(log.contains(&format!("request {method} ")), "no {method}:\n{log}");
        assert!(
            !log.lines().any(|l| l.contains(&format!("request {method} ")) && !l.ends_with("over tls")),
            "{method} not over TLS:\n{log}"
        );
    }
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.sip_code), Some(200), "{cdrs:?}");
    assert_eq!(cdrs.last().and_then(|c| c.trunk_name.clone()).as_deref(), Some("kamailio"));
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn calls_come_in_over_tls_from_the_provider(pool: PgPool) {
    let provider = Provider::new();
    let callee = free_port("127.0.0.1");
    let mut number = number_to(sip_destination(callee));
    number.trunk_ref = "kamailio".into();
    let node = Node::start_tuned(
        &pool,
        vec![provider.trunk()],
        vec![number],
        vec![credential()],
        tuned(provider.node_tls(true)),
    )
    .await;
    let node_tls = node.tls.expect("the node listens on TLS");
    let kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), Some(node_tls), false);
    let uas = uas(&["-sn", "uas"], callee, 1);
    let entry = std::net::SocketAddr::from(([127, 0, 0, 1], provider.udp));
    let uac = uac(&["-sf", &scenario("uac_record_route.xml")], entry, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the call from Kamailio over TLS failed:\n{}", kamailio.log());
    assert!(uas.wait().await.success(), "the callee did not get the call");
    kamailio.wait_log("relayed over TLS").await;
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.sip_code), Some(200), "{cdrs:?}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_message_goes_out_over_tls(pool: PgPool) {
    let provider = Provider::new();
    let kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), None, false);
    let mut number = number_to(sip_destination(free_port("127.0.0.1")));
    number.trunk_ref = "kamailio".into();
    let node = Node::start_tuned(
        &pool,
        vec![provider.trunk()],
        vec![number],
        vec![credential()],
        tuned(provider.node_tls(true)),
    )
    .await;
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO messages (id, direction, namespace, trunk_name, from_number, to_number, body, status)
         VALUES ($1, 'outbound', 'default', 'kamailio', $2, '+15559990000', 'Hello over TLS', 'queued')",
    )
    .bind(id)
    .bind(DID)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_messages', $1)").bind(id.to_string()).execute(&pool).await.unwrap();
    kamailio.wait_log("with body [Hello over TLS] over tls").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, code): (String, Option<i32>) =
            sqlx::query_as("SELECT status, sip_code FROM messages WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        if status != "queued" && status != "sending" {
            assert_eq!((status.as_str(), code), ("sent", Some(202)));
            break;
        }
        assert!(Instant::now() < deadline, "the message was not sent: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

/// The peer name the certificate-auth trunk of the inbound mutual-TLS tests expects.
const CALLER_NAME: &str = "caller.provider.test";

/// Inbound mutual TLS: the Kamailio trunk authenticates callers by certificate
/// (`tls.peerNames: [caller.provider.test]`, chained to the provider's CA from
/// `tls.caSecretRef`), and its number rings a sipp callee.
fn mutual_tls_snapshot(provider: &Provider, callee: u16) -> Snapshot {
    let mut trunk = provider.trunk();
    trunk.auth_method = AuthMethod::Certificate;
    trunk.tls_peer_names = vec![CALLER_NAME.into()];
    let mut number = number_to(sip_destination(callee));
    number.trunk_ref = "kamailio".into();
    let ca = TrunkTls {
        namespace: "default".into(),
        trunk_name: "kamailio".into(),
        ca_pem: Some(provider.ca.pem()),
        ca_secret_name: Some("kamailio-ca".into()),
        ..TrunkTls::default()
    };
    Snapshot::from_parts(1, vec![trunk], vec![number], vec![], vec![credential()]).unwrap().with_trunk_tls(vec![ca])
}

/// The node's count of requests refused for their client certificate, by `reason`.
async fn tls_peer_refusals(node: &Node, reason: &str) -> u64 {
    let text = http_get(node.http, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("switchboard_sip_tls_peer_refused_total{"))
        .filter(|l| l.contains(&format!("reason=\"{reason}\"")) && l.contains("trunk=\"kamailio\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Kamailio relays a call to the node over TLS presenting a client certificate from the
/// provider's CA that carries the trunk's peer name: the node asks for it, admits the call on
/// the certificate-auth trunk, and the callee answers.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_call_over_mutual_tls_is_admitted_by_the_callers_certificate(pool: PgPool) {
    let provider = Provider::new();
    let callee = free_port("127.0.0.1");
    let node =
        Node::start_snapshot(&pool, mutual_tls_snapshot(&provider, callee), tuned(provider.node_tls(true))).await;
    let node_tls = node.tls.expect("the node listens on TLS");
    let kamailio = Kamailio::start_presenting(&provider, node_tls, &provider.ca.leaf(&[CALLER_NAME]));
    let uas = uas(&["-sn", "uas"], callee, 1);
    let entry = std::net::SocketAddr::from(([127, 0, 0, 1], provider.udp));
    let uac = uac(&["-sf", &scenario("uac_record_route.xml")], entry, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the call over mutual TLS failed:\n{}", kamailio.log());
    assert!(uas.wait().await.success(), "the callee did not get the call:\n{}", kamailio.log());
    kamailio.wait_log("relayed over TLS").await;
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.sip_code), Some(200), "{cdrs:?}");
    assert_eq!(cdrs.last().and_then(|c| c.trunk_name.clone()).as_deref(), Some("kamailio"));
    node.stop().await;
}

/// The same call with Kamailio presenting a certificate from the provider's CA that names
/// someone else: `403`, whose Reason says what was presented, and counted.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_call_over_mutual_tls_with_another_certificate_is_refused(pool: PgPool) {
    let provider = Provider::new();
    let callee = free_port("127.0.0.1");
    let node =
        Node::start_snapshot(&pool, mutual_tls_snapshot(&provider, callee), tuned(provider.node_tls(true))).await;
    let node_tls = node.tls.expect("the node listens on TLS");
    let _kamailio = Kamailio::start_presenting(&provider, node_tls, &provider.ca.leaf(&["someone-else.test"]));
    let caller = ua::Ua::new().await;
    let entry = std::net::SocketAddr::from(([127, 0, 0, 1], provider.udp));
    let offer = ua::sdp(caller.rtp_port(), "0", "sendrecv");
    caller.send(&ua::invite_to_did(entry, caller.sip_addr(), "mtls-other-cert", &offer), entry).await;
    let response = caller.final_response().await;
    assert!(response.starts_with("SIP/2.0 403"), "{response}");
    let reason = ua::header(&response, "Reason").unwrap_or_default();
    assert!(reason.contains("DNS:someone-else.test") && reason.contains("SHA-256 "), "{response}");
    assert!(
        reason.contains("matches no tls.peerNames or tls.peerFingerprints of trunk default/kamailio"),
        "{response}"
    );
    assert_eq!(tls_peer_refusals(&node, "no_match").await, 1);
    node.stop().await;
}

/// Without a client certificate, or not over TLS at all, the certificate-auth trunk refuses
/// the call even from its gateway's address, saying which.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_certificate_auth_trunk_refuses_calls_without_a_certificate(pool: PgPool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Provider::new();
    let node = Node::start_snapshot(
        &pool,
        mutual_tls_snapshot(&provider, free_port("127.0.0.1")),
        tuned(provider.node_tls(true)),
    )
    .await;
    let node_tls = node.tls.expect("the node listens on TLS");

    // Over TLS, without a client certificate (a rustls client trusting the provider's CA).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(provider.ca.der())).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let stream = tokio::net::TcpStream::connect(node_tls).await.unwrap();
    let local = stream.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, stream).await.unwrap();
    let invite = ua::invite_to_did(node_tls, local, "mtls-no-cert", &ua::sdp(4000, "0", "sendrecv")).replacen(
        "SIP/2.0/UDP",
        "SIP/2.0/TLS",
        1,
    );
    tls.write_all(invite.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.split_once("SIP/2.0 403").is_some_and(|(_, rest)| rest.contains("\r\n\r\n")) {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed without an answer: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("none was presented on this TLS connection"), "{seen}");
    assert_eq!(tls_peer_refusals(&node, "no_certificate").await, 1);

    // Over UDP from the gateway's address: the certificate is the credential, so refused.
    let caller = ua::Ua::new().await;
    caller
        .send(&ua::invite_to_did(node.addr, caller.sip_addr(), "mtls-udp", &ua::sdp(4002, "0", "sendrecv")), node.addr)
        .await;
    let response = caller.final_response().await;
    assert!(response.starts_with("SIP/2.0 403"), "{response}");
    assert!(response.contains("this request came over UDP"), "{response}");
    assert_eq!(tls_peer_refusals(&node, "not_tls").await, 1);

    // A MESSAGE for the trunk's number over UDP: refused the same way (and nothing stored).
    let (node_addr, from) = (node.addr, caller.sip_addr());
    let body = "hello";
    let message = format!(
        "MESSAGE sip:{DID}@{node_addr} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-mtls-message\r\n\
         From: <sip:+15557654321@{from}>;tag=m\r\nTo: <sip:{DID}@{node_addr}>\r\nCall-ID: mtls-message\r\n\
         CSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    caller.send(&message, node_addr).await;
    let response = caller.final_response().await;
    assert!(response.starts_with("SIP/2.0 403"), "{response}");
    assert_eq!(tls_peer_refusals(&node, "not_tls").await, 2);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 0);
    node.stop().await;
}

/// A provider whose server certificate has expired: the node refuses the handshake and the
/// trunk says so (`Reachable=False` with the reason, `Registered=False`).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_expired_provider_certificate_is_refused_with_the_reason(pool: PgPool) {
    let provider = Provider::new();
    provider.ca.expired_leaf(&["127.0.0.1"]).write(provider.dir.path(), "provider");
    let kamailio = Kamailio::start(&provider, free_port("127.0.0.1"), None, false);
    let mut trunk = provider.trunk();
    trunk.registration_enabled = true;
    trunk.options_interval_seconds = 1;
    let node = Node::start_tuned(&pool, vec![trunk], vec![], vec![credential()], tuned(provider.node_tls(true))).await;
    let failed = wait_registration(&pool, "a failed registration", |r| r.state == "failed").await;
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("certificate has expired"), "{error}");
    let unreachable = wait_registration(&pool, "unreachable", |r| r.reachable == Some(false)).await;
    let reason = unreachable.unreachable_reason.unwrap_or_default();
    assert!(reason.contains("the server's certificate has expired"), "{reason}");
    assert!(!kamailio.log().contains("REGISTER accepted"), "{}", kamailio.log());
    node.stop().await;
}
