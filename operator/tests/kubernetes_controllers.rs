//! The real controllers (watchers, stores, passes, node poll, finalizers, status, events) against
//! the in-memory fake API server and a real Postgres: the lifecycle the end-to-end suite checks on
//! a cluster, and the throughput figure for 10,000 PhoneNumbers.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::fake_api::FakeApi;
use switchboard_operator::kubernetes::controller::{
    ControllerSettings, DEFAULT_SECRET_SELECTOR, FINALIZER, WatchScope, run_controllers,
};
use switchboard_operator::kubernetes::metrics::Metrics;
use switchboard_operator::reconcile::Reconciler;
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "your_did_password";

fn example_manifests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut manifests = Vec::new();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(file).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            manifests.push(Value::deserialize(document).unwrap());
        }
    }
    manifests
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

fn start(fake: &FakeApi, pool: &PgPool, node_poll: Duration) -> Running {
    switchboard_model::logging::init(switchboard_model::logging::LogFormat::Text);
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let settings = ControllerSettings {
        scope: WatchScope { namespace: None },
        secret_selector: DEFAULT_SECRET_SELECTOR.into(),
        node_poll,
        node_timeout: Duration::from_secs(30),
        pass_resync: Duration::from_secs(60),
    };
    let task = tokio::spawn(run_controllers(
        fake.client(),
        Reconciler::new(pool.clone()),
        metrics.clone(),
        Arc::new(AtomicBool::new(true)),
        settings,
        shutdown.clone(),
    ));
    Running { shutdown, task, metrics }
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn condition(object: &Value, type_: &str) -> Option<(String, String)> {
    object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| {
        (c["status"].as_str().unwrap_or_default().to_string(), c["reason"].as_str().unwrap_or_default().to_string())
    })
}

fn ready(object: &Value) -> bool {
    condition(object, "Ready").is_some_and(|(status, _)| status == "True")
        && object["status"]["observedGeneration"] == object["metadata"]["generation"]
}

fn all_objects(fake: &FakeApi) -> Vec<Value> {
    ["Trunk", "PhoneNumber", "RoutingRule"].iter().flat_map(|k| fake.list(k)).collect()
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn examples_become_ready_follow_edits_secrets_and_nodes_and_are_cleaned_up(pool: PgPool) {
    let fake = FakeApi::default();
    let manifests = example_manifests();
    for manifest in &manifests {
        fake.apply(manifest.clone());
    }
    let running = start(&fake, &pool, Duration::from_millis(200));

    // Ready comes from the reconcile pass, Synced from the node-table poll that follows it: wait
    // for both, or the check below races the first poll.
    wait_for("every example Ready=True with the nodes' state read", Duration::from_secs(30), async || {
        let objects = all_objects(&fake);
        objects.len() == 6
            && objects.iter().all(ready)
            && objects.iter().all(|o| condition(o, "Synced").is_some_and(|(_, reason)| reason != "NodeStatusUnknown"))
    })
    .await;
    for object in all_objects(&fake) {
        assert_eq!(object["metadata"]["finalizers"], json!([FINALIZER]), "{object}");
        // No SIP node yet.
        assert_eq!(condition(&object, "Synced"), Some(("Unknown".into(), "NoLiveNodes".into())));
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM trunks").await, 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM phone_numbers").await, 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM routing_rules").await, 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM credentials").await, 1);
    let generation = count(&pool, "SELECT generation FROM config_state").await;

    // An edited trunk: a new generation, the row, and observedGeneration 2.
    let mut skyetel = manifests.iter().find(|m| m["metadata"]["name"] == "skyetel-example").unwrap().clone();
    skyetel["spec"]["limits"]["maxConcurrentCalls"] = json!(250);
    fake.apply(skyetel);
    wait_for("the edit stored", Duration::from_secs(10), async || {
        count(&pool, "SELECT max_concurrent_calls::bigint FROM trunks WHERE name = 'skyetel-example'").await == 250
    })
    .await;
    assert!(count(&pool, "SELECT generation FROM config_state").await > generation);
    wait_for("observedGeneration 2", Duration::from_secs(10), async || {
        fake.get("Trunk", "default", "skyetel-example")
            .is_some_and(|t| t["status"]["observedGeneration"] == 2 && ready(&t))
    })
    .await;

    // A changed password in the Secret reaches the credentials table.
    let mut secret = manifests.iter().find(|m| m["kind"] == "Secret").unwrap().clone();
    secret["stringData"]["password"] = json!("rotated-password");
    fake.apply(secret);
    wait_for("the rotated password stored", Duration::from_secs(10), async || {
        let password: String = sqlx::query_scalar("SELECT password FROM credentials").fetch_one(&pool).await.unwrap();
        password == "rotated-password"
    })
    .await;

    // A node that applied the current generation: Synced follows without a spec change.
    let current = count(&pool, "SELECT generation FROM config_state").await;
    sqlx::query(
        "INSERT INTO nodes (node_id, hostname, version, applied_generation, applied_at) VALUES ('node-1', 'h', 'v', $1, now())",
    )
    .bind(current)
    .execute(&pool)
    .await
    .unwrap();
    wait_for("Synced=True 1/1 everywhere", Duration::from_secs(10), async || {
        all_objects(&fake).iter().all(|o| {
            condition(o, "Synced") == Some(("True".into(), "Applied".into()))
                && o["status"]["nodes"] == json!({"applied": 1, "total": 1})
        })
    })
    .await;

    // Nothing secret anywhere the operator wrote.
    for object in all_objects(&fake) {
        assert!(!object["status"].to_string().contains("rotated-password"));
        assert!(!object["status"].to_string().contains(PASSWORD));
    }
    for event in fake.events() {
        let text = event.to_string();
        assert!(!text.contains("rotated-password") && !text.contains(PASSWORD), "{text}");
    }
    let reasons: Vec<String> = fake.events().iter().map(|e| e["reason"].as_str().unwrap().to_string()).collect();
    assert!(reasons.contains(&"Reconciled".to_string()) && reasons.contains(&"Applied".to_string()), "{reasons:?}");

    // Delete everything: rows go first, then the finalizers, then the objects.
    for object in all_objects(&fake) {
        let kind = object["kind"].as_str().unwrap().to_string();
        fake.delete(&kind, "default", object["metadata"]["name"].as_str().unwrap());
    }
    wait_for("every object finalized and gone", Duration::from_secs(15), async || all_objects(&fake).is_empty()).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM trunks").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM phone_numbers").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM routing_rules").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM credentials").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM resource_status").await, 0);
    let metrics = running.metrics.render();
    assert!(metrics.contains("switchboard_operator_reconcile_total{kind=\"PhoneNumber\"}"), "{metrics}");

    // Graceful stop.
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.task).await.expect("controllers stop on shutdown").unwrap();
}

/// The operator lists and watches only Secrets with the credentials label, so another
/// application's Secret never enters its memory; a password Secret that loses the label is as
/// good as gone (SecretNotFound, the stored password stays), and is back when labelled again.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn only_labelled_secrets_are_watched(pool: PgPool) {
    let fake = FakeApi::default();
    for manifest in example_manifests() {
        fake.apply(manifest);
    }
    fake.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "other-app-database", "namespace": "default"},
        "type": "Opaque", "stringData": {"password": "not-for-switchboard"},
    }));
    let running = start(&fake, &pool, Duration::from_millis(200));
    wait_for("every example Ready=True", Duration::from_secs(30), async || {
        let objects = all_objects(&fake);
        objects.len() == 6 && objects.iter().all(ready)
    })
    .await;
    let reads = fake.reads("Secret");
    assert!(!reads.is_empty());
    for query in &reads {
        assert!(
            query.contains("labelSelector=switchboard.dev%2Fcredentials%3Dtrue"),
            "unselected Secret read: {query}"
        );
    }

    // The password Secret without the label: the operator no longer sees it.
    let mut secret = example_manifests().into_iter().find(|m| m["kind"] == "Secret").unwrap();
    secret["metadata"]["labels"] = json!({});
    fake.apply(secret.clone());
    wait_for("SecretNotFound", Duration::from_secs(10), async || {
        fake.get("Trunk", "default", "didforsale-example")
            .is_some_and(|t| condition(&t, "Ready") == Some(("False".into(), "SecretNotFound".into())))
    })
    .await;
    let trunk = fake.get("Trunk", "default", "didforsale-example").unwrap();
    let ready_condition = trunk["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready");
    let message = ready_condition.unwrap()["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("switchboard.dev/credentials=true"), "the message says what to label: {message}");
    assert_eq!(count(&pool, "SELECT count(*) FROM credentials").await, 1, "the stored password stays");
    secret["metadata"]["labels"] = json!({"switchboard.dev/credentials": "true"});
    fake.apply(secret);
    wait_for("Ready again", Duration::from_secs(10), async || {
        fake.get("Trunk", "default", "didforsale-example").is_some_and(|t| ready(&t))
    })
    .await;
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.task).await.expect("controllers stop on shutdown").unwrap();
}

/// The client certificate of a certificate-auth trunk (mutual TLS) as its Secret holds it.
fn client_cert_secret(cert: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "skyetel-client", "namespace": "default", "labels": {"switchboard.dev/credentials": "true"}},
        "type": "kubernetes.io/tls",
        "stringData": {
            "tls.crt": format!("-----BEGIN CERTIFICATE-----\n{cert}\n-----END CERTIFICATE-----\n"),
            "tls.key": "-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n",
        },
    })
}

async fn stored_client_cert(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT client_cert_pem FROM trunk_tls WHERE trunk_name = 'skyetel-example'")
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten()
}

/// A certificate-auth Trunk (mutual TLS) reads its client certificate from the Secret named by
/// `tls.clientCertSecretRef`: `Ready=False` with `SecretNotFound` (saying which Secret and
/// label) until the Secret exists, then Ready with the certificate stored for the nodes; a
/// renewed certificate in the Secret (cert-manager) reaches the stored row without any change
/// to the Trunk.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_certificate_auth_trunk_stores_the_client_certificate_of_its_secret(pool: PgPool) {
    let fake = FakeApi::default();
    for mut manifest in example_manifests() {
        if manifest["metadata"]["name"] == "skyetel-example" {
            manifest["spec"]["gateways"][0]["transport"] = json!("TLS");
            manifest["spec"]["gateways"][1]["transport"] = json!("TLS");
            manifest["spec"]["authMethod"] = json!("certificate");
            manifest["spec"]["tls"] = json!({"clientCertSecretRef": {"name": "skyetel-client"}});
        }
        fake.apply(manifest);
    }
    let running = start(&fake, &pool, Duration::from_millis(200));
    wait_for("SecretNotFound", Duration::from_secs(30), async || {
        fake.get("Trunk", "default", "skyetel-example")
            .is_some_and(|t| condition(&t, "Ready") == Some(("False".into(), "SecretNotFound".into())))
    })
    .await;
    let trunk = fake.get("Trunk", "default", "skyetel-example").unwrap();
    let ready_condition = trunk["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready");
    let message = ready_condition.unwrap()["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("default/skyetel-client") && message.contains("clientCertSecretRef"), "{message}");
    assert!(message.contains("switchboard.dev/credentials=true"), "{message}");

    fake.apply(client_cert_secret("first"));
    wait_for("Ready with the client certificate", Duration::from_secs(10), async || {
        fake.get("Trunk", "default", "skyetel-example").is_some_and(|t| ready(&t))
    })
    .await;
    let stored = stored_client_cert(&pool).await.expect("the client certificate is stored");
    assert!(stored.contains("first"), "{stored}");

    fake.apply(client_cert_secret("renewed"));
    wait_for("the renewed certificate stored", Duration::from_secs(10), async || {
        stored_client_cert(&pool).await.is_some_and(|c| c.contains("renewed"))
    })
    .await;
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.task).await.expect("controllers stop on shutdown").unwrap();
}

/// The figure: 10,000 PhoneNumbers (plus the example trunks and rules) from the first list to
/// every one Ready=True, then a relist (an expired watch) of the unchanged cluster, whose API
/// writes should be 0. `SWITCHBOARD_BENCH_NUMBERS` changes the count.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
#[ignore = "a figure, not a check: cargo test -p switchboard-operator --test kubernetes_controllers -- --ignored --nocapture"]
async fn throughput_of_10000_phone_numbers_and_writes_per_unchanged_resync(pool: PgPool) {
    let n: usize = std::env::var("SWITCHBOARD_BENCH_NUMBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let fake = FakeApi::default();
    for manifest in example_manifests().into_iter().filter(|m| m["kind"] != "PhoneNumber") {
        fake.apply(manifest);
    }
    for i in 0..n {
        fake.apply(json!({
            "apiVersion": "switchboard.dev/v1alpha1", "kind": "PhoneNumber",
            "metadata": {"name": format!("n{i:05}"), "namespace": "default"},
            "spec": {"number": format!("+1555{i:07}"), "trunkRef": "skyetel-example", "routingRuleRef": "inbound-ai-agent"},
        }));
    }
    let total = n + 4;
    let started = Instant::now();
    let running = start(&fake, &pool, Duration::from_secs(3600));
    wait_for("every object Ready=True", Duration::from_secs(600), async || {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ["Trunk", "PhoneNumber", "RoutingRule"].iter().map(|k| fake.count(k, ready)).sum::<usize>() == total
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!(count(&pool, "SELECT count(*) FROM phone_numbers").await as usize, n);
    let writes = fake.writes();
    println!(
        "FIGURE first reconcile through the Kubernetes source: {total} objects ({n} PhoneNumbers) Ready in {:.2} s = {:.0} resources/s; API writes {} (status {}, finalizer {}, events {}, conflicts {})",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        writes.total(),
        writes.status,
        writes.finalizer,
        writes.events,
        writes.conflicts
    );

    // Let the last events and the watch echo of our own writes settle, then relist everything
    // unchanged.
    let mut settled = fake.writes();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if fake.writes() == settled {
            break;
        }
        settled = fake.writes();
    }
    let before = fake.writes();
    println!(
        "FIGURE all writes of the first reconcile done after {:.2} s: {} (status {}, finalizer {}, events {})",
        started.elapsed().as_secs_f64() - 2.0,
        before.total(),
        before.status,
        before.finalizer,
        before.events
    );
    let reconciles_before = reconcile_count(&running.metrics);
    let resync_started = Instant::now();
    fake.expire_watches();
    wait_for("every object reconciled again", Duration::from_secs(600), async || {
        reconcile_count(&running.metrics) >= reconciles_before + total as u64
    })
    .await;
    let resync = resync_started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = fake.writes();
    println!(
        "FIGURE unchanged resync (relist of {total} objects): reconciled in {:.2} s; API writes {} (status {}, finalizer {}, events {})",
        resync.as_secs_f64(),
        after.total() - before.total(),
        after.status - before.status,
        after.finalizer - before.finalizer,
        after.events - before.events
    );
    assert_eq!(after.total(), before.total(), "an unchanged resync writes nothing");
    running.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

fn reconcile_count(metrics: &Metrics) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("switchboard_operator_reconcile_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// SIGTERM while the API server has not yet answered the watches' first lists (right after a
/// replica wins the lease): the controllers stop at once. kube-runtime's applier waits for a
/// store that its own graceful shutdown keeps from ever filling; run_controllers drops such a
/// controller instead (it hung the end-to-end suite's replica for good before).
#[tokio::test]
async fn controllers_shut_down_before_their_first_list_stop_at_once() {
    let (service, _unanswered) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
    let client = kube::Client::new(service, "default");
    // Never connected: nothing reaches the database before the stores are ready.
    let pool = PgPool::connect_lazy("postgres://nobody@127.0.0.1:9/nothing").unwrap();
    let shutdown = CancellationToken::new();
    let settings = ControllerSettings {
        scope: WatchScope { namespace: None },
        secret_selector: DEFAULT_SECRET_SELECTOR.into(),
        node_poll: Duration::from_secs(1),
        node_timeout: Duration::from_secs(30),
        pass_resync: Duration::from_secs(60),
    };
    let task = tokio::spawn(run_controllers(
        client,
        Reconciler::new(pool),
        Arc::new(Metrics::new()),
        Arc::new(AtomicBool::new(true)),
        settings,
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished(), "the controllers ended before shutdown");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the controllers did not stop within 10 s of shutdown")
        .unwrap();
}
