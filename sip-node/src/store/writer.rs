//! The writer task: drains the queue into transactions, retrying until Postgres takes them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Postgres, Transaction};

use super::plan::{CallOp, Plan, TrunkKey, TrunkOp};
use super::{Shared, StoreOptions};
use crate::retry::Backoff;

/// How often registration updates waiting for the node's row are retried.
const WAITING_RETRY: Duration = Duration::from_secs(1);
/// Queue capacity (events) kept when the queue is empty; more is released.
const SHRINK_ABOVE: usize = 4096;

/// Why a write failed.
enum Failure {
    /// Postgres refused the data itself: retrying the same rows cannot succeed.
    Refused(sqlx::Error),
    /// Anything else (unreachable, slow, not migrated): retry later.
    Transient(String),
}

/// What a committed plan did.
struct Written {
    /// False when the node's row was missing, so the registration upserts wrote nothing.
    trunks_upserted: bool,
}

pub(super) struct Writer {
    pool: PgPool,
    node_id: String,
    shared: Arc<Shared>,
    options: StoreOptions,
    backoff: Backoff,
    /// Registration updates waiting for the node's row in `nodes`.
    waiting: BTreeMap<TrunkKey, TrunkOp>,
    /// Whether the wait for the node's row has been logged.
    waiting_logged: bool,
    /// Start of the current outage and the number of failed attempts in it.
    outage: Option<(Instant, u64)>,
    /// Sequence number of the last event taken from the queue.
    taken: u64,
}

impl Writer {
    pub(super) fn new(pool: PgPool, node_id: String, shared: Arc<Shared>, options: StoreOptions) -> Self {
        let backoff = Backoff::new(options.min_retry_delay, options.max_retry_delay);
        Self {
            pool,
            node_id,
            shared,
            options,
            backoff,
            waiting: BTreeMap::new(),
            waiting_logged: false,
            outage: None,
            taken: 0,
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            let mut plan = Plan::with_trunks(std::mem::take(&mut self.waiting));
            let taken = self.take(&mut plan);
            if taken == 0 {
                let stopping = self.shared.stopping.load(Ordering::SeqCst);
                if stopping || plan.is_empty() {
                    self.waiting = plan.trunks;
                    if stopping {
                        return;
                    }
                    self.shared.wake.notified().await;
                    continue;
                }
                // Only registration updates waiting for the node's row: retry them now and
                // then, or as soon as something new arrives.
                tokio::select! {
                    _ = self.shared.wake.notified() => {}
                    _ = tokio::time::sleep(WAITING_RETRY) => {}
                }
                self.take(&mut plan);
            }
            self.write(plan).await;
            self.advance();
        }
    }

    /// Moves up to a batch of events from the queue into `plan`; returns how many. The lock is
    /// held only to move the events out, so that `record` never waits for the folding.
    fn take(&mut self, plan: &mut Plan) -> usize {
        let batch: Vec<_> = {
            let mut queue = self.shared.lock();
            let count = queue.events.len().min(self.options.batch_size.max(1));
            let batch = queue.events.drain(..count).collect();
            // Give back the memory of a long outage once it is written.
            if queue.events.is_empty() && queue.events.capacity() > SHRINK_ABOVE {
                queue.events.shrink_to(SHRINK_ABOVE);
            }
            batch
        };
        let count = batch.len();
        for (seq, event) in batch {
            self.taken = seq;
            plan.fold(seq, event);
        }
        count
    }

    /// Marks as written everything taken, except what still waits for the node's row.
    fn advance(&self) {
        let done = match self.waiting.values().map(|op| op.first_seq).min() {
            Some(first) => first - 1,
            None => self.taken,
        };
        self.shared.written.send_if_modified(|written| {
            let advanced = done > *written;
            if advanced {
                *written = done;
            }
            advanced
        });
        let recorded = self.shared.lock().recorded;
        self.shared.report_pending(recorded);
    }

    /// Writes `plan`, retrying until Postgres takes it; rows it refuses are dropped one by one.
    async fn write(&mut self, plan: Plan) {
        if plan.is_empty() {
            return;
        }
        match self.write_until_done(&plan).await {
            Ok(written) => self.settle(plan, written),
            Err(error) => {
                tracing::warn!(%error, "Postgres refused a batch of {} writes ({error}); writing them one by one", plan.len());
                for single in plan.split() {
                    match self.write_until_done(&single).await {
                        Ok(written) => self.settle(single, written),
                        Err(error) => {
                            tracing::error!(%error, "Postgres refused the {}: {error}; dropped", single.describe());
                            if let Some(metrics) = &self.shared.metrics {
                                metrics.store_dropped(1);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Keeps the registration updates of `plan` that the node's row is missing for.
    fn settle(&mut self, plan: Plan, written: Written) {
        if written.trunks_upserted {
            if self.waiting_logged && self.waiting.is_empty() {
                self.waiting_logged = false;
                tracing::info!(node_id = %self.node_id, "the node's row exists; registration state written");
            }
            return;
        }
        if !self.waiting_logged {
            self.waiting_logged = true;
            tracing::info!(
                node_id = %self.node_id,
                "registration state waits until the node's row is in the nodes table; retrying every {WAITING_RETRY:?}"
            );
        }
        self.waiting.extend(plan.into_waiting_trunks());
    }

    /// Attempts `plan` until it is committed (`Ok`) or refused as data (`Err`).
    async fn write_until_done(&mut self, plan: &Plan) -> Result<Written, sqlx::Error> {
        loop {
            let attempt = tokio::time::timeout(self.options.write_timeout, write_plan(&self.pool, &self.node_id, plan));
            let failure = match attempt.await {
                Ok(Ok(written)) => {
                    self.recovered();
                    return Ok(written);
                }
                Ok(Err(error)) => classify(error),
                Err(_) => Failure::Transient(format!("no answer within {:?}", self.options.write_timeout)),
            };
            match failure {
                Failure::Refused(error) => {
                    self.recovered();
                    return Err(error);
                }
                Failure::Transient(error) => {
                    let delay = self.backoff.next_delay();
                    self.failed(&error, delay);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn failed(&mut self, error: &str, delay: Duration) {
        let recorded = self.shared.lock().recorded;
        let pending = self.shared.pending(recorded);
        match &mut self.outage {
            Some((_, failures)) => {
                *failures += 1;
                tracing::debug!(pending, "store write failed again: {error}; retrying in {delay:?}");
            }
            None => {
                self.outage = Some((Instant::now(), 1));
                tracing::warn!(
                    %error,
                    pending,
                    "cannot write calls and CDRs to Postgres ({error}); keeping them in memory ({pending} pending) \
                     and retrying"
                );
            }
        }
    }

    fn recovered(&mut self) {
        self.backoff.reset();
        if let Some((since, failures)) = self.outage.take() {
            tracing::info!(
                failures,
                "writing calls and CDRs to Postgres again after {:.1?} ({failures} failed attempts)",
                since.elapsed()
            );
        }
    }
}

/// Errors that retrying the same rows cannot fix: data exceptions (SQLSTATE class 22) and
/// integrity violations (class 23), and values the driver cannot encode.
fn classify(error: sqlx::Error) -> Failure {
    let refused = match &error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    };
    if refused { Failure::Refused(error) } else { Failure::Transient(error.to_string()) }
}

fn int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// Writes `plan` in one transaction.
async fn write_plan(pool: &PgPool, node_id: &str, plan: &Plan) -> Result<Written, sqlx::Error> {
    let mut tx = pool.begin().await?;
    write_calls(&mut tx, node_id, plan).await?;
    write_cdrs(&mut tx, node_id, plan).await?;
    let trunks_upserted = write_trunks(&mut tx, node_id, plan).await?;
    tx.commit().await?;
    Ok(Written { trunks_upserted })
}

async fn write_calls(tx: &mut Transaction<'_, Postgres>, node_id: &str, plan: &Plan) -> Result<(), sqlx::Error> {
    if plan.clear_calls {
        sqlx::query("DELETE FROM active_calls WHERE node_id = $1").bind(node_id).execute(&mut **tx).await?;
    }
    let mut ended = Vec::new();
    let mut answered = (Vec::new(), Vec::new());
    let mut started = Vec::new();
    for (call_uuid, op) in &plan.calls {
        match op {
            CallOp::Delete => ended.push(*call_uuid),
            CallOp::Answer(at) => {
                answered.0.push(*call_uuid);
                answered.1.push(*at);
            }
            CallOp::Upsert(call) => started.push(call),
        }
    }
    if !ended.is_empty() {
        sqlx::query("DELETE FROM active_calls WHERE call_uuid = ANY($1)").bind(ended).execute(&mut **tx).await?;
    }
    if !started.is_empty() {
        sqlx::query(
            "INSERT INTO active_calls (call_uuid, call_id, node_id, namespace, trunk_name, provider, direction,
                from_number, to_number, state, started_at, answered_at)
             SELECT u.call_uuid, u.call_id, $1, u.namespace, u.trunk_name, u.provider, u.direction, u.from_number,
                u.to_number, u.state, u.started_at, u.answered_at
             FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::text[], $10::text[], $11::timestamptz[], $12::timestamptz[])
                AS u(call_uuid, call_id, namespace, trunk_name, provider, direction, from_number, to_number, state,
                started_at, answered_at)
             ON CONFLICT (call_uuid) DO UPDATE SET call_id = EXCLUDED.call_id, node_id = EXCLUDED.node_id,
                namespace = EXCLUDED.namespace, trunk_name = EXCLUDED.trunk_name, provider = EXCLUDED.provider,
                direction = EXCLUDED.direction, from_number = EXCLUDED.from_number, to_number = EXCLUDED.to_number,
                state = EXCLUDED.state, started_at = EXCLUDED.started_at, answered_at = EXCLUDED.answered_at",
        )
        .bind(node_id)
        .bind(started.iter().map(|c| c.call_uuid).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.call_id.as_str()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.namespace.as_deref()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.trunk_name.as_deref()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.provider.as_deref()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.direction.as_str()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.from_number.as_str()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.to_number.as_str()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.state.as_str()).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.started_at).collect::<Vec<_>>())
        .bind(started.iter().map(|c| c.answered_at).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !answered.0.is_empty() {
        sqlx::query(
            "UPDATE active_calls AS a SET answered_at = u.at, state = 'answered'
             FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(call_uuid, at)
             WHERE a.call_uuid = u.call_uuid",
        )
        .bind(answered.0)
        .bind(answered.1)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn write_cdrs(tx: &mut Transaction<'_, Postgres>, node_id: &str, plan: &Plan) -> Result<(), sqlx::Error> {
    let cdrs = &plan.cdrs;
    if cdrs.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO cdrs (call_uuid, call_id, attempt, node_id, namespace, trunk_name, provider, gateway, direction,
            from_number, to_number, setup_at, ring_at, answer_at, end_at, sip_code, reason, hangup_by,
            billable_seconds, cost, currency)
         SELECT u.call_uuid, u.call_id, u.attempt, $1, u.namespace, u.trunk_name, u.provider, u.gateway, u.direction,
            u.from_number, u.to_number, u.setup_at, u.ring_at, u.answer_at, u.end_at, u.sip_code, u.reason,
            u.hangup_by, u.billable_seconds, u.cost, u.currency
         FROM UNNEST($2::text[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], $14::timestamptz[],
            $15::int4[], $16::text[], $17::text[], $18::int4[], $19::numeric[], $20::text[], $21::uuid[])
            AS u(call_id, attempt, namespace, trunk_name, provider, gateway, direction, from_number, to_number,
            setup_at, ring_at, answer_at, end_at, sip_code, reason, hangup_by, billable_seconds, cost, currency,
            call_uuid)
         ON CONFLICT (call_uuid, attempt) DO NOTHING",
    )
    .bind(node_id)
    .bind(cdrs.iter().map(|c| c.call_id.as_str()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| int(c.attempt)).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.namespace.as_deref()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.trunk_name.as_deref()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.provider.as_deref()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.gateway.as_deref()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.direction.as_str()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.from_number.as_str()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.to_number.as_str()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.setup_at).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.ring_at).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.answer_at).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.end_at).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.sip_code.map(i32::from)).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.reason.as_deref()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.hangup_by.map(|h| h.as_str())).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| int(c.billable_seconds)).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.cost).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.currency.as_str()).collect::<Vec<_>>())
    .bind(cdrs.iter().map(|c| c.call_uuid).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Removals, then upserts; the upserts write only when the node's row exists. Returns whether
/// they wrote (or there were none).
async fn write_trunks(tx: &mut Transaction<'_, Postgres>, node_id: &str, plan: &Plan) -> Result<bool, sqlx::Error> {
    let removed: Vec<_> = plan.trunks.iter().filter(|(_, op)| op.remove).map(|(key, _)| key).collect();
    if !removed.is_empty() {
        sqlx::query(
            "DELETE FROM registrations AS r USING UNNEST($2::text[], $3::text[]) AS u(namespace, trunk_name)
             WHERE r.node_id = $1 AND r.namespace = u.namespace AND r.trunk_name = u.trunk_name",
        )
        .bind(node_id)
        .bind(removed.iter().map(|(namespace, _)| namespace.as_str()).collect::<Vec<_>>())
        .bind(removed.iter().map(|(_, trunk)| trunk.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !plan.upserts_trunks() {
        return Ok(true);
    }
    let registrations: Vec<_> = plan.trunks.values().filter_map(|op| op.registration.as_ref()).collect();
    let reachabilities: Vec<_> = plan.trunks.values().filter_map(|op| op.reachability.as_ref()).collect();
    let mut upserted = true;
    if !registrations.is_empty() {
        let done = sqlx::query(
            "INSERT INTO registrations (node_id, namespace, trunk_name, state, registrar, expires_at, last_error,
                last_attempt_at, updated_at)
             SELECT $1, u.namespace, u.trunk_name, u.state, u.registrar, u.expires_at, u.last_error,
                u.last_attempt_at, now()
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::text[],
                $8::timestamptz[])
                AS u(namespace, trunk_name, state, registrar, expires_at, last_error, last_attempt_at)
             WHERE EXISTS (SELECT 1 FROM nodes WHERE node_id = $1)
             ON CONFLICT (node_id, namespace, trunk_name) DO UPDATE SET state = EXCLUDED.state,
                registrar = EXCLUDED.registrar, expires_at = EXCLUDED.expires_at, last_error = EXCLUDED.last_error,
                last_attempt_at = EXCLUDED.last_attempt_at, updated_at = now()",
        )
        .bind(node_id)
        .bind(registrations.iter().map(|r| r.namespace.as_str()).collect::<Vec<_>>())
        .bind(registrations.iter().map(|r| r.trunk_name.as_str()).collect::<Vec<_>>())
        .bind(registrations.iter().map(|r| r.state.as_str()).collect::<Vec<_>>())
        .bind(registrations.iter().map(|r| r.registrar.as_deref()).collect::<Vec<_>>())
        .bind(registrations.iter().map(|r| r.expires_at).collect::<Vec<_>>())
        .bind(registrations.iter().map(|r| r.last_error.as_deref()).collect::<Vec<_>>())
        .bind(registrations.iter().map(|r| r.last_attempt_at).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        upserted &= done.rows_affected() > 0;
    }
    if !reachabilities.is_empty() {
        let done = sqlx::query(
            "INSERT INTO registrations (node_id, namespace, trunk_name, state, reachable, last_options_at,
                options_rtt_ms, unreachable_reason, updated_at)
             SELECT $1, u.namespace, u.trunk_name, 'unregistered', u.reachable, u.checked_at, u.rtt_ms, u.reason, now()
             FROM UNNEST($2::text[], $3::text[], $4::bool[], $5::timestamptz[], $6::int4[], $7::text[])
                AS u(namespace, trunk_name, reachable, checked_at, rtt_ms, reason)
             WHERE EXISTS (SELECT 1 FROM nodes WHERE node_id = $1)
             ON CONFLICT (node_id, namespace, trunk_name) DO UPDATE SET reachable = EXCLUDED.reachable,
                last_options_at = EXCLUDED.last_options_at, options_rtt_ms = EXCLUDED.options_rtt_ms,
                unreachable_reason = EXCLUDED.unreachable_reason, updated_at = now()",
        )
        .bind(node_id)
        .bind(reachabilities.iter().map(|r| r.namespace.as_str()).collect::<Vec<_>>())
        .bind(reachabilities.iter().map(|r| r.trunk_name.as_str()).collect::<Vec<_>>())
        .bind(reachabilities.iter().map(|r| r.reachable).collect::<Vec<_>>())
        .bind(reachabilities.iter().map(|r| r.checked_at).collect::<Vec<_>>())
        .bind(reachabilities.iter().map(|r| r.rtt_ms.map(int)).collect::<Vec<_>>())
        .bind(reachabilities.iter().map(|r| r.unreachable_reason.as_deref()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        upserted &= done.rows_affected() > 0;
    }
    Ok(upserted)
}
