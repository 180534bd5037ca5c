//! The reconcile core against a real Postgres (a fresh database per test, migrations applied).

use std::path::{Path, PathBuf};

use sqlx::{PgPool, Row};
use switchboard_model::config::{Credential, NumberConfig, TrunkConfig};
use switchboard_operator::reconcile::{ReconcileReport, Reconciler};
use switchboard_operator::source::folder::FolderSource;

/// A temporary manifest folder seeded with the examples.
struct Folder {
    dir: tempfile::TempDir,
}

impl Folder {
    fn with_examples() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for entry in std::fs::read_dir(examples).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
            }
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    fn edit(&self, name: &str, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.path(name)).unwrap();
        assert!(text.contains(from), "{name} does not contain {from:?}");
        self.write(name, &text.replacen(from, to, 1));
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.path(name)).unwrap();
    }

    async fn reconcile(&self, pool: &PgPool) -> ReconcileReport {
        let state = FolderSource::new(self.dir.path()).read().unwrap();
        Reconciler::new(pool.clone()).reconcile_all(&state).await.unwrap()
    }
}

async fn ready(pool: &PgPool, kind: &str, name: &str) -> (bool, String, String) {
    let row = sqlx::query("SELECT ready, reason, message FROM resource_status WHERE kind = $1 AND name = $2")
        .bind(kind)
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("no status for {kind} {name}: {e}"));
    (row.get("ready"), row.get("reason"), row.get("message"))
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    let sql = match table {
        "trunks" => "SELECT count(*) FROM trunks",
        "phone_numbers" => "SELECT count(*) FROM phone_numbers",
        "routing_rules" => "SELECT count(*) FROM routing_rules",
        "credentials" => "SELECT count(*) FROM credentials",
        _ => panic!("unknown table {table}"),
    };
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn examples_reconcile_once_and_then_are_idempotent(pool: PgPool) {
    let folder = Folder::with_examples();
    let first = folder.reconcile(&pool).await;
    assert_eq!(first.generation, 1);
    assert_eq!(first.changed.len(), 6);
    assert!(first.not_ready.is_empty(), "{:?}", first.not_ready);
    assert_eq!((count(&pool, "trunks").await, count(&pool, "phone_numbers").await), (2, 2));
    assert_eq!((count(&pool, "routing_rules").await, count(&pool, "credentials").await), (2, 1));

    let trunks = TrunkConfig::load_all(&pool).await.unwrap();
    let skyetel = trunks.iter().find(|t| t.name == "skyetel-example").unwrap();
    assert_eq!(skyetel.rate_outbound_per_minute.normalize().to_string(), "0.003", "exact decimal");
    assert_eq!(skyetel.gateways.len(), 2);
    let credentials = Credential::load_all(&pool).await.unwrap();
    assert_eq!(credentials[0].password, "your_did_password");

    let second = folder.reconcile(&pool).await;
    assert_eq!(second.generation, 1, "nothing changed, so no new generation");
    assert!(second.changed.is_empty() && second.deleted.is_empty());
    assert_eq!(second.statuses_written, 0, "unchanged statuses are not rewritten");
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn one_edit_bumps_the_generation_once_and_notifies(pool: PgPool) {
    let folder = Folder::with_examples();
    folder.reconcile(&pool).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.unwrap();
    listener.listen(switchboard_model::db::CONFIG_CHANNEL).await.unwrap();

    folder.edit("trunk-skyetel.yaml", "maxConcurrentCalls: 100", "maxConcurrentCalls: 250");
    let report = folder.reconcile(&pool).await;
    assert_eq!(report.generation, 2);
    assert_eq!(report.changed.len(), 1);
    let notification =
        tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv()).await.unwrap().unwrap();
    assert_eq!(notification.payload(), "2");
    let stored: i32 = sqlx::query_scalar("SELECT max_concurrent_calls FROM trunks WHERE name = 'skyetel-example'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 250);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_dangling_trunk_reference_is_stored_and_heals(pool: PgPool) {
    let folder = Folder::with_examples();
    folder.remove("trunk-skyetel.yaml");
    let report = folder.reconcile(&pool).await;
    let (is_ready, reason, message) = ready(&pool, "PhoneNumber", "main-line").await;
    assert!(!is_ready);
    assert_eq!(reason, "TrunkNotFound");
    assert!(message.contains("skyetel-example"), "{message}");
    assert_eq!(count(&pool, "phone_numbers").await, 2, "stored despite the missing trunk");
    assert!(
        report.not_ready.iter().any(|(k, r, _)| k.name == "didforsale-example" && r == "TrunkNotFound"),
        "backup trunk missing"
    );

    let folder_with_trunk = Folder::with_examples();
    for name in ["trunk-didforsale.yaml", "numbers.yaml", "rule-inbound-ai-agent.yaml", "rule-outbound-us.yaml"] {
        folder.write(name, &std::fs::read_to_string(folder_with_trunk.path(name)).unwrap());
    }
    folder.write("trunk-skyetel.yaml", &std::fs::read_to_string(folder_with_trunk.path("trunk-skyetel.yaml")).unwrap());
    let healed = folder.reconcile(&pool).await;
    assert!(healed.not_ready.is_empty(), "{:?}", healed.not_ready);
    assert_eq!(ready(&pool, "PhoneNumber", "main-line").await.1, "Reconciled");
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_duplicate_number_is_refused_naming_the_holder(pool: PgPool) {
    let folder = Folder::with_examples();
    folder.reconcile(&pool).await;
    folder.write(
        "zz-duplicate.yaml",
        "apiVersion: switchboard.dev/v1alpha1\nkind: PhoneNumber\nmetadata: {name: copy}\nspec: {number: \"+15551234567\", trunkRef: skyetel-example}\n",
    );
    folder.reconcile(&pool).await;
    let (is_ready, reason, message) = ready(&pool, "PhoneNumber", "copy").await;
    assert!(!is_ready);
    assert_eq!(reason, "DuplicateNumber");
    assert!(message.contains("default/main-line"), "{message}");
    let numbers = NumberConfig::load_all(&pool).await.unwrap();
    assert_eq!(numbers.iter().find(|n| n.number == "+15551234567").unwrap().name, "main-line");

    // When the holder lets go of the number, the waiting resource gets it.
    folder.edit("numbers.yaml", "+15551234567", "+15550000001");
    let report = folder.reconcile(&pool).await;
    assert!(report.not_ready.is_empty(), "{:?}", report.not_ready);
    let numbers = NumberConfig::load_all(&pool).await.unwrap();
    assert_eq!(numbers.iter().find(|n| n.number == "+15551234567").unwrap().name, "copy");
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_invalid_edit_keeps_the_last_good_config(pool: PgPool) {
    let folder = Folder::with_examples();
    folder.reconcile(&pool).await;
    folder.edit("trunk-skyetel.yaml", "maxConcurrentCalls: 100", "maxConcurrentCalls: 0");
    let report = folder.reconcile(&pool).await;
    assert_eq!(report.generation, 1, "no rows changed");
    let (is_ready, reason, message) = ready(&pool, "Trunk", "skyetel-example").await;
    assert!(!is_ready);
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("spec.limits.maxConcurrentCalls"), "{message}");
    assert!(message.contains("trunk-skyetel.yaml"), "{message}");
    assert!(message.contains("last valid configuration stays in force"), "{message}");
    let stored: i32 = sqlx::query_scalar("SELECT max_concurrent_calls FROM trunks WHERE name = 'skyetel-example'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 100);
    // The other resources are unaffected.
    assert!(ready(&pool, "Trunk", "didforsale-example").await.0);
}

/// A trunk set to TLS is ready and its gateway is stored as TLS (the node speaks SIP over TLS);
/// certificate authentication (mutual TLS) without a client certificate is not ready with
/// reason `InvalidSpec` saying what to set, and with its Secret (a local-mode Secret file) the
/// certificate and CA are stored for the nodes.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn tls_is_stored_and_certificate_auth_needs_its_client_certificate(pool: PgPool) {
    let folder = Folder::with_examples();
    folder.reconcile(&pool).await;
    folder.edit("trunk-skyetel.yaml", "transport: UDP", "transport: TLS");
    let report = folder.reconcile(&pool).await;
    assert_eq!(report.generation, 2, "the TLS gateway is a change");
    assert!(ready(&pool, "Trunk", "skyetel-example").await.0);
    let tls: i64 = sqlx::query_scalar("SELECT count(*) FROM trunks WHERE gateways::text LIKE '%TLS%'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tls, 1);

    folder.edit("trunk-skyetel.yaml", "authMethod: ip", "authMethod: certificate");
    folder.reconcile(&pool).await;
    let (is_ready, reason, message) = ready(&pool, "Trunk", "skyetel-example").await;
    assert!(!is_ready);
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("spec.tls.clientCertSecretRef"), "{message}");

    // The second gateway too: a certificate-auth trunk's gateways are all TLS.
    folder.edit("trunk-skyetel.yaml", "transport: UDP", "transport: TLS");
    folder.edit(
        "trunk-skyetel.yaml",
        "authMethod: certificate",
        "authMethod: certificate\n  tls: {clientCertSecretRef: {name: skyetel-client}, caSecretRef: {name: skyetel-ca}}",
    );
    folder.write(
        "skyetel-tls.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: skyetel-client}\ntype: kubernetes.io/tls\n\
         stringData: {tls.crt: \"-----BEGIN CERTIFICATE-----\\nc\\n-----END CERTIFICATE-----\", \
         tls.key: \"-----BEGIN PRIVATE KEY-----\\nk\\n-----END PRIVATE KEY-----\"}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: skyetel-ca}\n\
         stringData: {ca.crt: \"-----BEGIN CERTIFICATE-----\\nca\\n-----END CERTIFICATE-----\"}\n",
    );
    folder.reconcile(&pool).await;
    let (is_ready, reason, message) = ready(&pool, "Trunk", "skyetel-example").await;
    assert!(is_ready, "{reason}: {message}");
    let (cert, key, ca): (Option<String>, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT client_cert_pem, client_key_pem, ca_pem FROM trunk_tls WHERE trunk_name = 'skyetel-example'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(cert.unwrap().contains("BEGIN CERTIFICATE") && key.unwrap().contains("PRIVATE KEY"));
    assert!(ca.unwrap().contains("\nca\n"));

    // Back to ip authentication without spec.tls: the material is removed.
    folder.edit("trunk-skyetel.yaml", "authMethod: certificate", "authMethod: ip");
    folder.edit(
        "trunk-skyetel.yaml",
        "\n  tls: {clientCertSecretRef: {name: skyetel-client}, caSecretRef: {name: skyetel-ca}}",
        "",
    );
    folder.reconcile(&pool).await;
    assert!(ready(&pool, "Trunk", "skyetel-example").await.0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM trunk_tls").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_broken_file_deletes_nothing_and_a_removed_file_deletes_its_rows(pool: PgPool) {
    let folder = Folder::with_examples();
    folder.reconcile(&pool).await;
    folder.write("numbers.yaml", "apiVersion: switchboard.dev/v1alpha1\nkind: PhoneNumber\nmetadata: {name: [\n");
    let report = folder.reconcile(&pool).await;
    assert!(report.deleted.is_empty(), "{:?}", report.deleted);
    assert_eq!(count(&pool, "phone_numbers").await, 2);

    folder.remove("numbers.yaml");
    let report = folder.reconcile(&pool).await;
    assert_eq!(report.deleted.len(), 2);
    assert_eq!(count(&pool, "phone_numbers").await, 0);
    let statuses: i64 = sqlx::query_scalar("SELECT count(*) FROM resource_status WHERE kind = 'PhoneNumber'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(statuses, 0);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_missing_secret_is_reported_and_a_new_password_is_applied(pool: PgPool) {
    let folder = Folder::with_examples();
    let didforsale = std::fs::read_to_string(folder.path("trunk-didforsale.yaml")).unwrap();
    let trunk_only = didforsale.split("\n---\n").next().unwrap().to_string();
    folder.write("trunk-didforsale.yaml", &trunk_only);
    folder.reconcile(&pool).await;
    let (is_ready, reason, message) = ready(&pool, "Trunk", "didforsale-example").await;
    assert!(!is_ready);
    assert_eq!(reason, "SecretNotFound");
    assert!(message.contains("default/didforsale-credentials"), "{message}");
    assert_eq!(count(&pool, "credentials").await, 0);

    folder.write("trunk-didforsale.yaml", &didforsale.replace("your_did_password", "rotated"));
    let report = folder.reconcile(&pool).await;
    assert!(report.not_ready.is_empty(), "{:?}", report.not_ready);
    assert_eq!(Credential::load_all(&pool).await.unwrap()[0].password, "rotated");
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_failure_mid_pass_writes_nothing_and_a_retry_converges(pool: PgPool) {
    // The database fails after the trunks were written, while the numbers are (a trigger stands
    // in for a connection lost mid-transaction).
    sqlx::query(
        "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'simulated outage'; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("CREATE TRIGGER outage BEFORE INSERT ON phone_numbers FOR EACH ROW EXECUTE FUNCTION fail_insert()")
        .execute(&pool)
        .await
        .unwrap();
    let folder = Folder::with_examples();
    let state = FolderSource::new(folder.dir.path()).read().unwrap();
    let reconciler = Reconciler::new(pool.clone());
    let error = reconciler.reconcile_all(&state).await.unwrap_err();
    assert!(error.to_string().contains("nothing was written"), "{error}");
    assert_eq!(count(&pool, "trunks").await, 0, "no half-written change");
    assert_eq!(switchboard_model::db::current_generation(&pool).await.unwrap(), 0);

    sqlx::query("DROP TRIGGER outage ON phone_numbers").execute(&pool).await.unwrap();
    let report = reconciler.reconcile_all(&state).await.unwrap();
    assert_eq!(report.generation, 1);
    assert_eq!(count(&pool, "phone_numbers").await, 2);
}
