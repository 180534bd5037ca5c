//! The reaper: ends what nodes that died left behind in Postgres, and expires call requests
//! nobody took.
//!
//! A node writes a heartbeat every `heartbeat_interval_ms` (its own, in its `nodes` row). A
//! node not heard from for [`ReaperArgs::reap_after_heartbeats`] of its intervals is lost
//! (a crash, a kill, a pod evicted with its node; a node that stopped cleanly is reaped the
//! same way once that time has passed, so that its last writes are in). For each such node, in
//! one transaction:
//!
//! - each of its `active_calls` rows gets a CDR with reason `node lost`, ended at the node's
//!   last heartbeat (billed to then) and hung up by `system`, and the row goes;
//! - its call requests still `claimed`, `ringing` or `answered` are `failed` with `node lost`;
//! - its messages still `sending` are `failed` with `node lost`;
//! - its admitted calls (`trunk_admissions`, the cross-node trunk limits) are given back.
//!
//! Queued call requests past their `expires_at` are `failed` with `expired` in the same pass.
//! A failed request with a webhook is marked `final_webhook_pending` and announced on
//! [`REAPED_CHANNEL`]: a live node sends the webhook's `failed` event (the nodes hold the
//! webhook signing secret, the operator does not).
//! Every replica of the operator (and local mode) runs a reaper; a transaction-level advisory
//! lock lets one pass run at a time, and the others skip theirs. Every statement is idempotent:
//! a pass that fails halfway is rolled back and redone by the next.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// Advisory lock key of a reaper pass (ASCII "sb-reap").
const LOCK_KEY: i64 = 0x0073_622d_7265_6170;
/// The reason written into CDRs, requests and messages of a lost node.
pub const NODE_LOST: &str = "node lost";
/// Channel on which a pass announces requests whose final webhook a node should send.
pub const REAPED_CHANNEL: &str = "switchboard_call_requests_reaped";

/// Settings of the reaper.
#[derive(clap::Args, Debug, Clone)]
pub struct ReaperArgs {
    /// A node not heard from for this many of its heartbeat intervals is lost: its calls get a
    /// CDR with reason `node lost`, its call requests and messages in progress fail.
    #[arg(long, env = "SWITCHBOARD_REAP_AFTER_HEARTBEATS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub reap_after_heartbeats: u32,
    /// How often the reaper looks, in milliseconds.
    #[arg(long, env = "SWITCHBOARD_REAP_INTERVAL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub reap_interval_ms: u64,
}

impl Default for ReaperArgs {
    fn default() -> Self {
        Self { reap_after_heartbeats: 3, reap_interval_ms: 5000 }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Nodes found lost that still had something to end.
    pub nodes: Vec<String>,
    pub calls: u64,
    pub requests: u64,
    pub messages: u64,
    pub expired: u64,
}

impl Reaped {
    fn is_empty(&self) -> bool {
        self.calls + self.requests + self.messages + self.expired == 0
    }
}

/// One pass; `Ok(None)` when another reaper holds the lock.
pub async fn reap_once(pool: &PgPool, after_heartbeats: u32) -> Result<Option<Reaped>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(LOCK_KEY).fetch_one(&mut *tx).await?;
    if !locked {
        return Ok(None);
    }
    let lost: Vec<String> = sqlx::query_scalar(
        "SELECT node_id FROM nodes
          WHERE heartbeat_at < now() - $1 * heartbeat_interval_ms * interval '1 millisecond'
          ORDER BY node_id",
    )
    .bind(i32::try_from(after_heartbeats).unwrap_or(i32::MAX))
    .fetch_all(&mut *tx)
    .await?;
    let mut reaped = Reaped::default();
    if !lost.is_empty() {
        reaped = end_lost(&mut tx, &lost).await?;
    }
    reaped.expired = sqlx::query(
        "UPDATE call_requests
            SET state = 'failed', error = 'expired: no SIP node claimed the request before its expires_at',
                final_webhook_pending = webhook_url IS NOT NULL, updated_at = now()
          WHERE state = 'queued' AND expires_at <= now()",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if reaped.requests + reaped.expired > 0 {
        sqlx::query("SELECT pg_notify($1, '')").bind(REAPED_CHANNEL).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(Some(reaped))
}

/// Ends the rows of the `lost` nodes.
async fn end_lost(tx: &mut Transaction<'_, Postgres>, lost: &[String]) -> Result<Reaped, sqlx::Error> {
    // The CDR of a call the node never ended: the attempt after the last one it wrote, ended at
    // the node's last heartbeat (the last moment the call is known to have been up), billed per
    // second rounded up as the node bills (store/billing.rs). Keyed by the node's call id, as
    // the `node lost` CDR a restarted node replays from its spool is: whichever comes first
    // stays, the other is a conflict.
    sqlx::query(
        "INSERT INTO cdrs (call_uuid, call_id, attempt, node_id, namespace, trunk_name, provider, direction,
            from_number, to_number, setup_at, answer_at, end_at, reason, hangup_by, billable_seconds, cost, currency)
         SELECT c.call_uuid, c.call_id,
            coalesce((SELECT max(attempt) FROM cdrs p WHERE p.call_uuid = c.call_uuid), 0) + 1,
            c.node_id, c.namespace, c.trunk_name, c.provider, c.direction, c.from_number, c.to_number,
            c.started_at, c.answered_at, e.end_at, $2, 'system', e.billable,
            round(coalesce(CASE c.direction WHEN 'outbound' THEN t.rate_outbound_per_minute
                                            ELSE t.rate_inbound_per_minute END, 0) * e.billable / 60, 6),
            coalesce(t.currency, 'USD')
           FROM active_calls c
           JOIN nodes n ON n.node_id = c.node_id
           LEFT JOIN trunks t ON t.namespace = c.namespace AND t.name = c.trunk_name
           CROSS JOIN LATERAL (SELECT greatest(n.heartbeat_at, c.started_at) AS end_at) AS x
           CROSS JOIN LATERAL (SELECT x.end_at,
                CASE WHEN c.answered_at IS NULL OR x.end_at <= c.answered_at THEN 0
                     ELSE ceil(extract(epoch FROM x.end_at - c.answered_at))::int END AS billable) AS e
          WHERE c.node_id = ANY($1)
         ON CONFLICT DO NOTHING",
    )
    .bind(lost)
    .bind(NODE_LOST)
    .execute(&mut **tx)
    .await?;
    let calls = sqlx::query("DELETE FROM active_calls WHERE node_id = ANY($1)")
        .bind(lost)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    let requests = sqlx::query(
        "UPDATE call_requests SET state = 'failed', error = $2, final_webhook_pending = webhook_url IS NOT NULL,
                updated_at = now()
          WHERE state IN ('claimed', 'ringing', 'answered') AND claimed_by = ANY($1)",
    )
    .bind(lost)
    .bind(NODE_LOST)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let messages = sqlx::query(
        "UPDATE messages SET status = 'failed', error = $2, updated_at = now()
          WHERE status = 'sending' AND claimed_by = ANY($1)",
    )
    .bind(lost)
    .bind(NODE_LOST)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let admitted = sqlx::query("DELETE FROM trunk_admissions WHERE node_id = ANY($1)")
        .bind(lost)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    let nodes = if calls + requests + messages + admitted > 0 { lost.to_vec() } else { vec![] };
    Ok(Reaped { nodes, calls, requests, messages, expired: 0 })
}

/// Runs a pass every `reap_interval_ms` until `shutdown`.
pub async fn run(pool: PgPool, args: ReaperArgs, shutdown: CancellationToken) {
    let every = Duration::from_millis(args.reap_interval_ms);
    let mut failing = false;
    loop {
        match reap_once(&pool, args.reap_after_heartbeats).await {
            Ok(Some(reaped)) => {
                failing = false;
                if !reaped.is_empty() {
                    tracing::warn!(
                        nodes = ?reaped.nodes,
                        calls = reaped.calls,
                        requests = reaped.requests,
                        messages = reaped.messages,
                        expired = reaped.expired,
                        "reaper: ended {} calls, {} call requests and {} messages of lost nodes {:?}; expired {} queued call requests",
                        reaped.calls,
                        reaped.requests,
                        reaped.messages,
                        reaped.nodes,
                        reaped.expired
                    );
                }
            }
            Ok(None) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "reaper pass failed: {error}; retrying");
            }
            Err(error) => tracing::debug!(%error, "reaper pass failed again"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests;
