//! The node's row in the `nodes` table: who it is, that it is alive (heartbeat), and which
//! configuration generation it serves. The operator turns these rows into the `Synced`
//! condition ("applied on k of n live nodes"), so a new generation is written as soon as it is
//! applied rather than at the next heartbeat.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::time::{MissedTickBehavior, interval, timeout};

use crate::config::{Snapshot, SnapshotHandle};
use crate::retry::DbHealth;

/// Bound on one write; the pool's acquire timeout (5 s) usually answers first.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the node says about itself in its row.
#[derive(Debug, Clone)]
pub(crate) struct NodeIdentity {
    pub(crate) node_id: String,
    pub(crate) hostname: String,
    pub(crate) version: &'static str,
    pub(crate) started_at: DateTime<Utc>,
}

/// The node's heartbeat interval (written in its row, so that "not seen for N heartbeats"
/// needs no knowledge of the node's flags) and its draining switch (a draining node says so
/// in `nodes.draining_at`: the operator's `Synced` and API call claiming leave it out).
#[derive(Debug, Clone)]
pub(crate) struct Liveness {
    pub(crate) every: Duration,
    pub(crate) drain: crate::drain::Drain,
}

impl Liveness {
    fn interval_ms(&self) -> i32 {
        i32::try_from(self.every.as_millis()).unwrap_or(i32::MAX).max(1)
    }
}

/// Inserts or replaces the node's row as of its start: a restarted node has applied nothing
/// yet (`applied_generation` 0, `applied_at` NULL) unless `applied` says otherwise, and is not
/// stopped.
async fn upsert(
    pool: &PgPool,
    node: &NodeIdentity,
    liveness: &Liveness,
    applied: Option<(i64, DateTime<Utc>)>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO nodes (node_id, hostname, version, started_at, heartbeat_at, applied_generation,
            applied_at, stopped_at, heartbeat_interval_ms, draining_at)
         VALUES ($1, $2, $3, $4, now(), $5, $6, NULL, $7, CASE WHEN $8 THEN now() END)
         ON CONFLICT (node_id) DO UPDATE SET hostname = EXCLUDED.hostname, version = EXCLUDED.version,
            started_at = EXCLUDED.started_at, heartbeat_at = now(),
            applied_generation = EXCLUDED.applied_generation, applied_at = EXCLUDED.applied_at,
            stopped_at = NULL, heartbeat_interval_ms = EXCLUDED.heartbeat_interval_ms,
            draining_at = EXCLUDED.draining_at",
    )
    .bind(&node.node_id)
    .bind(&node.hostname)
    .bind(node.version)
    .bind(node.started_at)
    .bind(applied.map_or(0, |(generation, _)| generation))
    .bind(applied.map(|(_, at)| at))
    .bind(liveness.interval_ms())
    .bind(liveness.drain.is_draining())
    .execute(pool)
    .await?;
    Ok(())
}

/// Refreshes the heartbeat, and the applied generation when `applied` is given. Returns
/// whether the row exists (it may have been removed while the node was cut off).
async fn update(
    pool: &PgPool,
    node_id: &str,
    draining: bool,
    applied: Option<(i64, DateTime<Utc>)>,
) -> Result<bool, sqlx::Error> {
    const DRAINING: &str = "draining_at = CASE WHEN $2 THEN coalesce(draining_at, now()) END";
    let done = match applied {
        Some((generation, at)) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE nodes SET heartbeat_at = now(), applied_generation = $3, applied_at = $4, stopped_at = NULL,
                    {DRAINING}
                 WHERE node_id = $1"
            )))
            .bind(node_id)
            .bind(draining)
            .bind(generation)
            .bind(at)
            .execute(pool)
            .await?
        }
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE nodes SET heartbeat_at = now(), stopped_at = NULL, {DRAINING} WHERE node_id = $1"
            )))
            .bind(node_id)
            .bind(draining)
            .execute(pool)
            .await?
        }
    };
    Ok(done.rows_affected() > 0)
}

/// Records that the node stopped. Best effort, bounded by `limit`: a node that is shutting
/// down must not hang on an unreachable database.
pub(crate) async fn mark_stopped(pool: &PgPool, node_id: &str, limit: Duration) {
    let query = sqlx::query("UPDATE nodes SET stopped_at = now(), heartbeat_at = now() WHERE node_id = $1")
        .bind(node_id)
        .execute(pool);
    match timeout(limit, query).await {
        Ok(Ok(done)) if done.rows_affected() > 0 => {
            tracing::info!(%node_id, "recorded the node as stopped")
        }
        Ok(Ok(_)) => {
            tracing::debug!(%node_id, "the node was never registered; nothing to mark as stopped")
        }
        Ok(Err(error)) => {
            tracing::warn!(%node_id, %error, "could not record the node as stopped: {error}")
        }
        Err(_) => tracing::warn!(%node_id, "could not record the node as stopped within {limit:?}"),
    }
}

/// The node-state task: registers the node, then writes a heartbeat every `liveness.every`,
/// the applied generation as soon as the snapshot changes and `draining_at` as soon as the
/// node begins to drain. Failures are retried at the next tick or change; the watcher never
/// waits for this task. Runs until aborted.
pub(crate) async fn run(
    pool: PgPool,
    node: NodeIdentity,
    handle: SnapshotHandle,
    health: DbHealth,
    liveness: Liveness,
) {
    let mut changes = handle.subscribe();
    let mut ticks = interval(liveness.every);
    let drain = liveness.drain.clone();
    let mut drain_started = std::pin::pin!(drain.started());
    let mut drain_written = false;
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Whether the row is known to exist (the first write is an upsert), and the applied
    // generation it holds (`None`: nothing applied yet).
    let mut registered = false;
    let mut reported: Option<i64> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = &mut drain_started, if !drain_written => drain_written = true,
        }
        changes.mark_unchanged();
        let snapshot = handle.current();
        let applied = applied_of(&snapshot);
        let started = Instant::now();
        let result =
            timeout(WRITE_TIMEOUT, write(&pool, &node, &liveness, applied, registered.then_some(reported))).await;
        match result {
            Ok(Ok(())) => {
                health.ok(started);
                registered = true;
                reported = applied.map(|(generation, _)| generation);
            }
            Ok(Err(error)) => health.failed("heartbeat", &error, started, snapshot.generation()),
            Err(_) => {
                let error = format!("no answer within {WRITE_TIMEOUT:?}");
                health.failed("heartbeat", &error, started, snapshot.generation());
            }
        }
    }
}

/// The generation to report, if the node has loaded one.
fn applied_of(snapshot: &Snapshot) -> Option<(i64, DateTime<Utc>)> {
    (snapshot.generation() != Snapshot::UNLOADED).then(|| (snapshot.generation(), snapshot.loaded_at()))
}

/// One heartbeat: an upsert when the row is not known to exist (`reported` is `None`) or has
/// vanished, otherwise an update that carries the applied generation only when it differs from
/// the `reported` one.
async fn write(
    pool: &PgPool,
    node: &NodeIdentity,
    liveness: &Liveness,
    applied: Option<(i64, DateTime<Utc>)>,
    reported: Option<Option<i64>>,
) -> Result<(), sqlx::Error> {
    let Some(reported) = reported else {
        upsert(pool, node, liveness, applied).await?;
        tracing::info!(node_id = %node.node_id, "registered node {} in Postgres", node.node_id);
        return Ok(());
    };
    let changed = applied.filter(|(generation, _)| Some(*generation) != reported);
    if !update(pool, &node.node_id, liveness.drain.is_draining(), changed).await? {
        tracing::warn!(node_id = %node.node_id, "the node's row was removed; registering it again");
        upsert(pool, node, liveness, applied).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::wait_for;
    use chrono::SubsecRound as _;

    const LIMIT: Duration = Duration::from_secs(10);

    fn identity() -> NodeIdentity {
        NodeIdentity {
            node_id: "node-a".into(),
            hostname: "host-a".into(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: Utc::now(),
        }
    }

    #[derive(Debug, sqlx::FromRow)]
    struct Row {
        hostname: String,
        version: String,
        applied_generation: i64,
        applied_at: Option<DateTime<Utc>>,
        heartbeat_at: DateTime<Utc>,
        stopped_at: Option<DateTime<Utc>>,
    }

    async fn row(pool: &PgPool) -> Option<Row> {
        sqlx::query_as("SELECT * FROM nodes WHERE node_id = 'node-a'").fetch_optional(pool).await.expect("query nodes")
    }

    async fn draining_at(pool: &PgPool) -> (Option<DateTime<Utc>>, i32) {
        sqlx::query_as("SELECT draining_at, heartbeat_interval_ms FROM nodes WHERE node_id = 'node-a'")
            .fetch_one(pool)
            .await
            .expect("query nodes")
    }

    fn snapshot(generation: i64) -> Snapshot {
        Snapshot::from_parts(generation, vec![], vec![], vec![], vec![]).expect("valid")
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn writes_heartbeats_and_the_applied_generation(pool: PgPool) {
        // A leftover row from a previous run of the same node, stopped and at generation 9.
        sqlx::query(
            "INSERT INTO nodes (node_id, hostname, version, applied_generation, applied_at, stopped_at)
             VALUES ('node-a', 'old-host', '0.0.0', 9, now(), now())",
        )
        .execute(&pool)
        .await
        .expect("seed");

        let handle = SnapshotHandle::default();
        let health = DbHealth::default();
        // The heartbeat interval is an hour: every write after the first comes from a swap.
        let drain = crate::drain::Drain::default();
        let liveness = Liveness { every: Duration::from_secs(3600), drain: drain.clone() };
        let task = tokio::spawn(run(pool.clone(), identity(), handle.clone(), health, liveness));

        wait_for("the registration", LIMIT, || async { row(&pool).await.is_some_and(|r| r.hostname == "host-a") })
            .await;
        let registered = row(&pool).await.expect("row");
        assert_eq!(registered.version, env!("CARGO_PKG_VERSION"));
        assert_eq!((registered.applied_generation, registered.applied_at), (0, None));
        assert_eq!(registered.stopped_at, None);

        // Generation 0 (an empty configuration) is a generation like any other.
        handle.swap_if_newer(snapshot(0));
        wait_for("applied generation 0", LIMIT, || async { row(&pool).await.is_some_and(|r| r.applied_at.is_some()) })
            .await;
        assert_eq!(row(&pool).await.map(|r| r.applied_generation), Some(0));

        handle.swap_if_newer(snapshot(3));
        wait_for("applied generation 3", LIMIT, || async {
            row(&pool).await.is_some_and(|r| r.applied_generation == 3)
        })
        .await;
        let applied = row(&pool).await.expect("row");
        assert_eq!(applied.applied_at, Some(handle.current().loaded_at()).map(|t| t.trunc_subsecs(6)));
        assert!(applied.heartbeat_at >= registered.heartbeat_at);

        // Draining is written at once (the heartbeat is an hour away), with its interval.
        assert_eq!(draining_at(&pool).await, (None, 3_600_000));
        drain.begin();
        wait_for("draining_at", LIMIT, || async { draining_at(&pool).await.0.is_some() }).await;

        // A row removed behind the node's back is registered again, with what it applied.
        sqlx::query("DELETE FROM nodes").execute(&pool).await.expect("delete");
        handle.swap_if_newer(snapshot(4));
        wait_for("re-registration", LIMIT, || async { row(&pool).await.is_some_and(|r| r.applied_generation == 4) })
            .await;

        task.abort();
        let _ = task.await;
        mark_stopped(&pool, "node-a", Duration::from_secs(2)).await;
        assert!(row(&pool).await.expect("row").stopped_at.is_some());
    }
}
