//! The operator's reconcile against a mocked Kubernetes API (every request it sends is asserted)
//! and a real Postgres (a fresh database per test): finalizer, status, events, for the happy path
//! and each failure reason, a 409 on the status write, deletion, and 0 writes on an unchanged
//! resync.

mod support;

use std::sync::Arc;

use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::*;
use switchboard_operator::crd::{PhoneNumber, Trunk};
use switchboard_operator::kubernetes::controller::{Error, FINALIZER, Managed, reconcile};

const TRUNKS: &str = "/apis/switchboard.dev/v1alpha1/namespaces/default/trunks";
const NUMBERS: &str = "/apis/switchboard.dev/v1alpha1/namespaces/default/phonenumbers";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const PASSWORD: &str = "your_did_password";

fn spawn<K: Managed>(
    h: &Harness,
    object: K,
) -> tokio::task::JoinHandle<Result<kube::runtime::controller::Action, Error>> {
    tokio::spawn(reconcile(Arc::new(object), h.ctx.clone()))
}

/// Expects one event per (type, reason), in order, and answers each.
async fn expect_events(h: &mut Harness, expected: &[(&str, &str)]) -> Vec<Value> {
    let mut events = Vec::new();
    for (type_, reason) in expected {
        let (event, content_type, send) = h.expect(Method::POST, EVENTS).await;
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(event["type"], *type_, "{event}");
        assert_eq!(event["reason"], *reason, "{event}");
        assert_eq!(event["reportingController"], "switchboard-operator");
        assert!(!event.to_string().contains(PASSWORD), "a password in an event: {event}");
        send.send_response(ok(&event));
        events.push(event);
    }
    events
}

/// Expects the status merge patch on `path`, answers it, returns the patch.
async fn expect_status<K: Managed>(h: &mut Harness, path: &str, object: &K) -> (Value, K) {
    let (patch, content_type, send) = h.expect(Method::PATCH, &format!("{path}/status")).await;
    assert_eq!(content_type.as_deref(), Some("application/merge-patch+json"));
    assert!(!patch.to_string().contains(PASSWORD), "a password in a status: {patch}");
    assert_eq!(patch["status"]["observedGeneration"], 1, "{patch}");
    for condition in patch["status"]["conditions"].as_array().unwrap() {
        assert_eq!(condition["observedGeneration"], 1, "{condition}");
        assert!(condition["lastTransitionTime"].is_string());
    }
    let updated = with_status(object, &patch);
    send.send_response(ok(&updated));
    (patch, updated)
}

async fn rows(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn happy_path_adds_finalizer_writes_status_posts_events_and_then_stays_quiet(pool: PgPool) {
    let objects = Objects::examples();
    let mut h = Harness::new(pool.clone(), &objects);
    let trunk = objects.trunk("skyetel-example");
    let path = format!("{TRUNKS}/skyetel-example");
    let task = spawn(&h, trunk.clone());

    // 1. The finalizer, with a JSON patch that fails if someone else changed the list.
    let (patch, content_type, send) = h.expect(Method::PATCH, &path).await;
    assert_eq!(content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        patch,
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ])
    );
    let trunk = with_finalizer(&trunk);
    send.send_response(ok(&trunk));

    // 2. The status, after the pass stored the rows.
    let (patch, trunk) = expect_status(&mut h, &path, &trunk).await;
    assert_eq!(patch["metadata"]["resourceVersion"], "100", "optimistic concurrency");
    assert_eq!(cond(&patch, "Ready"), ("True".into(), "Reconciled".into()));
    assert_eq!(cond(&patch, "Synced"), ("True".into(), "Applied".into()));
    assert_eq!(cond(&patch, "Registered"), ("True".into(), "RegistrationDisabled".into()));
    assert_eq!(cond(&patch, "Reachable"), ("Unknown".into(), "NotProbed".into()));
    assert_eq!(patch["status"]["nodes"], json!({ "applied": 1, "total": 1 }));
    assert_eq!(patch["status"]["activeCalls"], 0);
    assert_eq!(patch["status"]["callsLastHour"], 0);
    assert!(condition(&patch, "Synced")["message"].as_str().unwrap().contains("applied by 1 of 1 live nodes"));

    // 3. One event per condition that changed.
    expect_events(
        &mut h,
        &[("Normal", "Reconciled"), ("Normal", "Applied"), ("Normal", "RegistrationDisabled"), ("Normal", "NotProbed")],
    )
    .await;
    let action = task.await.unwrap().unwrap();
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300)));
    assert_eq!(rows(&pool, "SELECT count(*) FROM trunks").await, 2, "the pass stored every trunk");
    assert_eq!(rows(&pool, "SELECT count(*) FROM credentials").await, 1);

    // 4. An unchanged resync: no request at all.
    let writes = h.metrics.api_writes_total();
    let task = spawn(&h, trunk);
    h.expect_nothing().await;
    task.await.unwrap().unwrap();
    assert_eq!(h.metrics.api_writes_total(), writes, "0 API writes on an unchanged resync");
    let metrics = h.metrics.render();
    assert!(
        metrics.contains(
            r#"switchboard_resource_condition{condition="Ready",kind="Trunk",name="skyetel-example",namespace="default",status="True"} 1"#
        ),
        "{metrics}"
    );
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn invalid_spec_is_ready_false_with_the_field_path(pool: PgPool) {
    let mut objects = Objects::examples();
    let mut trunk = with_finalizer(&objects.trunk("skyetel-example"));
    trunk.spec.backup_trunks = vec!["skyetel-example".into()];
    objects.trunks.retain(|t| t.metadata.name.as_deref() != Some("skyetel-example"));
    objects.trunks.push(trunk.clone());
    let mut h = Harness::new(pool.clone(), &objects);
    let path = format!("{TRUNKS}/skyetel-example");
    let task = spawn(&h, trunk.clone());
    let (patch, _) = expect_status(&mut h, &path, &trunk).await;
    assert_eq!(cond(&patch, "Ready"), ("False".into(), "InvalidSpec".into()));
    let message = condition(&patch, "Ready")["message"].as_str().unwrap();
    assert!(message.contains("spec.backupTrunks[0]") && message.contains("own backup"), "{message}");
    assert_eq!(cond(&patch, "Synced"), ("False".into(), "NotStored".into()));
    expect_events(
        &mut h,
        &[
            ("Warning", "InvalidSpec"),
            ("Warning", "NotStored"),
            ("Normal", "RegistrationDisabled"),
            ("Normal", "NotProbed"),
        ],
    )
    .await;
    task.await.unwrap().unwrap();
    assert_eq!(rows(&pool, "SELECT count(*) FROM trunks WHERE name = 'skyetel-example'").await, 0);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn missing_trunk_is_trunk_not_found(pool: PgPool) {
    let mut objects = Objects::examples();
    let mut number = with_finalizer(&objects.number("main-line"));
    number.spec.trunk_ref = "no-such-trunk".into();
    objects.numbers.retain(|n| n.metadata.name.as_deref() != Some("main-line"));
    objects.numbers.push(number.clone());
    let mut h = Harness::new(pool.clone(), &objects);
    let task = spawn(&h, number.clone());
    let (patch, _) = expect_status(&mut h, &format!("{NUMBERS}/main-line"), &number).await;
    assert_eq!(cond(&patch, "Ready"), ("False".into(), "TrunkNotFound".into()));
    let message = condition(&patch, "Ready")["message"].as_str().unwrap();
    assert!(
        message.contains("Trunk default/no-such-trunk does not exist") && message.contains("trunkRef"),
        "{message}"
    );
    assert_eq!(cond(&patch, "Synced"), ("True".into(), "Applied".into()), "stored anyway, it heals later");
    assert!(patch["status"].get("activeCalls").is_none(), "trunk fields only on trunks");
    expect_events(&mut h, &[("Warning", "TrunkNotFound"), ("Normal", "Applied")]).await;
    task.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn missing_secret_is_secret_not_found_without_leaking_anything(pool: PgPool) {
    let mut objects = Objects::examples();
    objects.secrets.clear();
    let trunk = with_finalizer(&objects.trunk("didforsale-example"));
    let mut h = Harness::new(pool.clone(), &objects);
    let task = spawn(&h, trunk.clone());
    let (patch, _) = expect_status(&mut h, &format!("{TRUNKS}/didforsale-example"), &trunk).await;
    assert_eq!(cond(&patch, "Ready"), ("False".into(), "SecretNotFound".into()));
    let message = condition(&patch, "Ready")["message"].as_str().unwrap();
    assert!(message.contains("default/didforsale-credentials"), "{message}");
    // A registering trunk with one live node that has not registered yet.
    assert_eq!(cond(&patch, "Registered"), ("False".into(), "Registering".into()));
    assert_eq!(patch["status"]["registeredNodes"], 0);
    expect_events(
        &mut h,
        &[("Warning", "SecretNotFound"), ("Normal", "Applied"), ("Warning", "Registering"), ("Normal", "NotProbed")],
    )
    .await;
    task.await.unwrap().unwrap();
    assert_eq!(rows(&pool, "SELECT count(*) FROM credentials").await, 0);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_older_claim_wins_and_the_newer_is_duplicate_number(pool: PgPool) {
    let mut objects = Objects::examples();
    // Sorts first by name, but was created last: creation time decides.
    let mut copy = with_finalizer(&objects.number("main-line"));
    copy.metadata.name = Some("aaa-copy".into());
    copy.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1_800_000_000).unwrap()));
    objects.numbers.push(copy.clone());
    let mut h = Harness::new(pool.clone(), &objects);

    let task = spawn(&h, copy.clone());
    let (patch, _) = expect_status(&mut h, &format!("{NUMBERS}/aaa-copy"), &copy).await;
    assert_eq!(cond(&patch, "Ready"), ("False".into(), "DuplicateNumber".into()));
    let message = condition(&patch, "Ready")["message"].as_str().unwrap();
    assert!(message.contains("+15551234567 is already used by PhoneNumber default/main-line"), "{message}");
    expect_events(&mut h, &[("Warning", "DuplicateNumber"), ("Warning", "NotStored")]).await;
    task.await.unwrap().unwrap();

    let original = with_finalizer(&objects.number("main-line"));
    let task = spawn(&h, original.clone());
    let (patch, _) = expect_status(&mut h, &format!("{NUMBERS}/main-line"), &original).await;
    assert_eq!(cond(&patch, "Ready"), ("True".into(), "Reconciled".into()));
    expect_events(&mut h, &[("Normal", "Reconciled"), ("Normal", "Applied")]).await;
    task.await.unwrap().unwrap();
    let holder: String = sqlx::query_scalar("SELECT name FROM phone_numbers WHERE number = '+15551234567'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(holder, "main-line");
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn database_down_is_ready_false_database_unavailable_and_retried(_pool: PgPool) {
    let objects = Objects::examples();
    let mut h = Harness::new(dead_pool(), &objects);
    let trunk = with_finalizer(&objects.trunk("skyetel-example"));
    let task = spawn(&h, trunk.clone());
    let (patch, _) = expect_status(&mut h, &format!("{TRUNKS}/skyetel-example"), &trunk).await;
    assert_eq!(cond(&patch, "Ready"), ("False".into(), "DatabaseUnavailable".into()));
    assert!(condition(&patch, "Ready")["message"].as_str().unwrap().contains("Postgres"));
    expect_events(&mut h, &[("Warning", "DatabaseUnavailable")]).await;
    let error = task.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Database(_)), "{error}");
    let action = switchboard_operator::kubernetes::controller::error_policy(Arc::new(trunk), &error, h.ctx.clone());
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5)));
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_409_on_the_status_write_rereads_and_retries(pool: PgPool) {
    let objects = Objects::examples();
    let mut h = Harness::new(pool.clone(), &objects);
    let trunk = with_finalizer(&objects.trunk("skyetel-example"));
    let path = format!("{TRUNKS}/skyetel-example");
    let task = spawn(&h, trunk.clone());

    let (patch, _, send) = h.expect(Method::PATCH, &format!("{path}/status")).await;
    assert_eq!(patch["metadata"]["resourceVersion"], "100");
    send.send_response(api_error(409, "Conflict"));
    // Someone else wrote meanwhile: the operator reads the object again...
    let (_, _, send) = h.expect(Method::GET, &format!("{path}/status")).await;
    let mut newer = trunk.clone();
    newer.metadata.resource_version = Some("150".into());
    newer.metadata.labels = Some([("team".to_string(), "voice".to_string())].into());
    send.send_response(ok(&newer));
    // ...and writes against the version it read.
    let (patch, _) = expect_status(&mut h, &path, &newer).await;
    assert_eq!(patch["metadata"]["resourceVersion"], "150");
    assert_eq!(cond(&patch, "Ready"), ("True".into(), "Reconciled".into()));
    expect_events(
        &mut h,
        &[("Normal", "Reconciled"), ("Normal", "Applied"), ("Normal", "RegistrationDisabled"), ("Normal", "NotProbed")],
    )
    .await;
    task.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn deleting_removes_the_rows_then_the_finalizer(pool: PgPool) {
    let objects = Objects::examples();
    let mut h = Harness::new(pool.clone(), &objects);
    let outcome = h.ctx.passes.ensure(h.ctx.passes.epoch()).await;
    let generation = outcome.result.as_ref().unwrap().generation;
    assert_eq!(rows(&pool, "SELECT count(*) FROM phone_numbers WHERE name = 'main-line'").await, 1);

    // kubectl delete: the API server sets deletionTimestamp; the watcher delivers it.
    let mut number: PhoneNumber = with_finalizer(&objects.number("main-line"));
    number.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    number.metadata.generation = Some(2);
    let event = watcher::Event::Apply(number.clone());
    h.writers.numbers.apply_watcher_event(&event);
    h.epoch.observe(&event);

    let task = spawn(&h, number.clone());
    let (patch, content_type, send) = h.expect(Method::PATCH, &format!("{NUMBERS}/main-line")).await;
    assert_eq!(content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        patch,
        json!([
            { "op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER },
            { "op": "remove", "path": "/metadata/finalizers/0" },
        ])
    );
    // The rows were gone before the finalizer was released.
    assert_eq!(rows(&pool, "SELECT count(*) FROM phone_numbers WHERE name = 'main-line'").await, 0);
    assert_eq!(rows(&pool, "SELECT count(*) FROM resource_status WHERE name = 'main-line'").await, 0);
    assert!(rows(&pool, "SELECT generation FROM config_state").await > generation);
    let mut released = number.clone();
    released.metadata.finalizers = None;
    send.send_response(ok(&released));
    task.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn deleting_while_the_database_is_down_keeps_the_finalizer_and_says_why(_pool: PgPool) {
    let objects = Objects::examples();
    let mut h = Harness::new(dead_pool(), &objects);
    let mut trunk: Trunk = with_finalizer(&objects.trunk("skyetel-example"));
    trunk.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let task = spawn(&h, trunk.clone());
    let (patch, _) = expect_status(&mut h, &format!("{TRUNKS}/skyetel-example"), &trunk).await;
    assert_eq!(cond(&patch, "Ready"), ("False".into(), "DatabaseUnavailable".into()));
    expect_events(&mut h, &[("Warning", "DatabaseUnavailable")]).await;
    assert!(task.await.unwrap().is_err());
    h.expect_nothing().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn node_changes_move_synced_and_registered_without_a_spec_change(pool: PgPool) {
    use switchboard_operator::kubernetes::nodes::{NodeFacts, TrunkFacts};
    let objects = Objects::examples();
    let mut h = Harness::new(pool.clone(), &objects);
    let trunk = with_finalizer(&objects.trunk("didforsale-example"));
    let path = format!("{TRUNKS}/didforsale-example");
    let task = spawn(&h, trunk.clone());
    let (_, trunk) = expect_status(&mut h, &path, &trunk).await;
    expect_events(
        &mut h,
        &[("Normal", "Reconciled"), ("Normal", "Applied"), ("Warning", "Registering"), ("Normal", "NotProbed")],
    )
    .await;
    task.await.unwrap().unwrap();

    // Two live nodes: one applied and registered, one behind and failing.
    let mut facts = NodeFacts { live_applied: vec![Some(i64::MAX), Some(0)], ..NodeFacts::default() };
    facts.trunks.insert(
        ("default".into(), "didforsale-example".into()),
        TrunkFacts {
            registered: 1,
            failed: 1,
            last_error: Some("403 Forbidden".into()),
            reachable: 2,
            active_calls: 3,
            calls_last_hour: 7,
            ..TrunkFacts::default()
        },
    );
    h.facts.send_replace(Some(Arc::new(facts)));
    let task = spawn(&h, trunk.clone());
    let (patch, _) = expect_status(&mut h, &path, &trunk).await;
    assert_eq!(cond(&patch, "Ready"), ("True".into(), "Reconciled".into()));
    assert_eq!(cond(&patch, "Synced"), ("False".into(), "Pending".into()));
    assert_eq!(cond(&patch, "Registered"), ("False".into(), "RegistrationFailed".into()));
    assert!(condition(&patch, "Registered")["message"].as_str().unwrap().contains("403 Forbidden"));
    assert_eq!(cond(&patch, "Reachable"), ("True".into(), "Reachable".into()));
    assert_eq!(patch["status"]["nodes"], json!({ "applied": 1, "total": 2 }));
    assert_eq!(
        (patch["status"]["activeCalls"].clone(), patch["status"]["callsLastHour"].clone()),
        (json!(3), json!(7))
    );
    // Ready did not change: it keeps its transition time and gets no event.
    expect_events(&mut h, &[("Warning", "Pending"), ("Warning", "RegistrationFailed"), ("Normal", "Reachable")]).await;
    task.await.unwrap().unwrap();
}
