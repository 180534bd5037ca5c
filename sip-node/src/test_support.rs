//! Helpers for the Postgres tests: write configuration the way the operator does, and wait
//! for a condition with a bound.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use switchboard_model::config::{bump_generation, notify_generation};
use switchboard_model::{Credential, NumberConfig, RuleConfig, TrunkConfig};

/// One configuration change, committed in one transaction with a generation bump.
#[derive(Default)]
pub(crate) struct Change {
    pub(crate) trunks: Vec<TrunkConfig>,
    pub(crate) numbers: Vec<NumberConfig>,
    pub(crate) rules: Vec<RuleConfig>,
    pub(crate) credentials: Vec<Credential>,
    /// Raw SQL run after the upserts (to store what the operator never would).
    pub(crate) sql: Vec<&'static str>,
}

/// Commits `change` as the operator does: rows, generation bump, and (if `notify`) `NOTIFY`,
/// in one transaction. Returns the new generation.
pub(crate) async fn publish(pool: &PgPool, change: Change, notify: bool) -> i64 {
    let mut tx = pool.begin().await.expect("begin");
    let generation = bump_generation(&mut tx).await.expect("bump generation");
    for trunk in &change.trunks {
        trunk.upsert(&mut tx, "hash", generation).await.expect("upsert trunk");
    }
    for number in &change.numbers {
        number.upsert(&mut tx, "hash", generation).await.expect("upsert number");
    }
    for rule in &change.rules {
        rule.upsert(&mut tx, "hash", generation).await.expect("upsert rule");
    }
    for credential in &change.credentials {
        credential.upsert(&mut tx, generation).await.expect("upsert credential");
    }
    for sql in &change.sql {
        sqlx::query(sqlx::AssertSqlSafe(*sql)).execute(&mut *tx).await.expect("raw SQL");
    }
    if notify {
        notify_generation(&mut tx, generation).await.expect("notify");
    }
    tx.commit().await.expect("commit");
    generation
}

/// Polls `condition` every 20 ms until it holds; panics after `limit` (never loops forever).
pub(crate) async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a backend of this database is listening (its last statement was the `LISTEN`).
pub(crate) async fn someone_listens(pool: &PgPool) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
        > 0
}
