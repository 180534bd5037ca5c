//! Trunk limits held across nodes: `maxConcurrentCalls` and `callsPerSecond` admitted through
//! Postgres, so that N nodes behind one trunk allow the trunk's limit, not N times it.
//!
//! **Why a conditional update per call** (and not leases of capacity handed out in blocks):
//! the limits of wholesale trunks are small (a 10-channel trunk is common; a 1,000-channel
//! trunk at a 3-minute average call is about 6 calls per second), and leases in blocks strand
//! capacity on idle nodes exactly where limits are small: with a limit of 10 and two nodes, a
//! block of 5 each refuses the sixth call on one node while the other sits idle. One
//! `SELECT switchboard_admit(...)` per call (a round trip, measured by `cargo bench -p
//! switchboard-node --bench admission`: about 0.45 ms at p50 on loopback) is exact at any
//! limit, and at trunk call rates it is nothing for Postgres. The
//! function (migration 0004) serialises one trunk's admissions with an advisory lock, counts
//! the calls every live node holds (`trunk_admissions`) and the calls admitted in the current
//! second (`trunk_rate`).
//!
//! **Releases** are not on the call's path: a call's end is counted in memory and a worker
//! subtracts it in the background. **While Postgres is unreachable** (an admission without an
//! answer within [`ADMIT_TIMEOUT`], or one in the second after such a failure) the node admits
//! locally against `limit / live nodes` (the live nodes last counted, at least one each), and
//! marks the trunk for a resync: the worker then writes the node's true count of calls (the
//! node's own count is the truth for its row), so that the calls admitted during the outage
//! count once the database is back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Notify;

/// Longest an admission waits for Postgres before the node decides locally.
pub const ADMIT_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed admission, how long the node decides locally without asking again.
const DOWN_FOR: Duration = Duration::from_secs(1);
/// How often the worker resyncs trunks and counts the live nodes, when not woken earlier.
const WORKER_EVERY: Duration = Duration::from_secs(1);

/// `(namespace, trunk name)`.
pub type TrunkKey = (String, String);

/// What Postgres said about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// The trunk's concurrent calls, across nodes, are at the limit.
    Concurrent,
    /// The trunk admitted its calls per second already, across nodes.
    Rate,
    /// No answer: decide locally (see the module documentation).
    Unreachable,
}

/// The node's link to the shared admission tables; cheap to clone.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    node_id: String,
    state: Mutex<State>,
    /// Wakes the worker when a release or a resync is waiting.
    wake: Notify,
    /// Live nodes as last counted (at least 1).
    live_nodes: AtomicU32,
    /// Bumped by every resync, so that an admission that raced with one marks its trunk again.
    resyncs: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Until when admissions skip Postgres (it just failed).
    down_until: Option<Instant>,
    /// Calls ended and not yet subtracted in Postgres.
    releases: HashMap<TrunkKey, u32>,
    /// Trunks whose row must be rewritten with the node's own count.
    resync: HashSet<TrunkKey>,
}

impl Admission {
    /// Admission for node `node_id` through `pool`. Call [`Admission::run`] to start its worker.
    pub fn new(pool: PgPool, node_id: impl Into<String>) -> Self {
        Admission {
            inner: Arc::new(Inner {
                pool,
                node_id: node_id.into(),
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                live_nodes: AtomicU32::new(1),
                resyncs: AtomicU64::new(0),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Live nodes as last counted (at least 1): the divisor of the local fallback.
    pub fn live_nodes(&self) -> u32 {
        self.inner.live_nodes.load(Ordering::Relaxed).max(1)
    }

    /// Sets the live-node count as if counted (tests of the fallback).
    #[cfg(test)]
    pub(crate) fn assume_live_nodes(&self, n: u32) {
        self.inner.live_nodes.store(n, Ordering::Relaxed);
    }

    /// Asks Postgres to admit one call on `key` under `max` concurrent calls and `cps` calls per
    /// second (trunk-wide). The caller has already counted the call locally.
    pub async fn admit(&self, key: &TrunkKey, max: Option<u32>, cps: Option<u32>) -> Verdict {
        if self.state().down_until.is_some_and(|until| Instant::now() < until) {
            self.mark_resync(key);
            return Verdict::Unreachable;
        }
        let resyncs = self.inner.resyncs.load(Ordering::SeqCst);
        let query = sqlx::query_scalar::<_, String>("SELECT switchboard_admit($1, $2, $3, $4, $5)")
            .bind(&key.0)
            .bind(&key.1)
            .bind(&self.inner.node_id)
            .bind(max.map(|m| i32::try_from(m).unwrap_or(i32::MAX)))
            .bind(cps.map(|c| i32::try_from(c).unwrap_or(i32::MAX)))
            .fetch_one(&self.inner.pool);
        let verdict = match tokio::time::timeout(ADMIT_TIMEOUT, query).await {
            Ok(Ok(answer)) => match answer.as_str() {
                "ok" => Verdict::Admitted,
                "concurrent" => Verdict::Concurrent,
                "rate" => Verdict::Rate,
                other => {
                    tracing::warn!(answer = other, "unexpected answer from switchboard_admit; deciding locally");
                    Verdict::Unreachable
                }
            },
            Ok(Err(error)) => {
                tracing::debug!(%error, "trunk admission through Postgres failed; deciding locally");
                Verdict::Unreachable
            }
            Err(_) => Verdict::Unreachable,
        };
        match verdict {
            Verdict::Unreachable => {
                let mut state = self.state();
                if state.down_until.is_none_or(|until| Instant::now() >= until) {
                    tracing::warn!(
                        trunk = %key.1,
                        "cannot admit calls through Postgres; admitting against limit / {} live nodes until it answers",
                        self.live_nodes()
                    );
                }
                state.down_until = Some(Instant::now() + DOWN_FOR);
                state.resync.insert(key.clone());
            }
            // A resync that ran while this admission was in flight may have missed it.
            Verdict::Admitted if self.inner.resyncs.load(Ordering::SeqCst) != resyncs => self.mark_resync(key),
            _ => {}
        }
        verdict
    }

    /// Counts the end of a call admitted on `key`; the worker subtracts it in Postgres.
    pub fn release(&self, key: &TrunkKey) {
        *self.state().releases.entry(key.clone()).or_default() += 1;
        self.inner.wake.notify_one();
    }

    fn mark_resync(&self, key: &TrunkKey) {
        self.state().resync.insert(key.clone());
    }

    /// The worker: first adopts the rows an earlier run of this node id left (each is resynced
    /// to the node's own count, 0 for a trunk it has no call on; retried until the database
    /// answers, so that a node started during an outage still cleans up), then subtracts
    /// released calls, rewrites the rows of trunks marked for a resync with `count(trunk)` (the
    /// node's own count of its calls), and counts the live nodes. Runs until the task is aborted.
    pub async fn run(self, count: impl Fn(&TrunkKey) -> u32) {
        let mut adopted = false;
        let mut counted = tokio::time::Instant::now();
        loop {
            if !adopted {
                adopted = self.adopt().await;
            }
            tokio::select! {
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(WORKER_EVERY) => {}
            }
            // Counted on a schedule of its own: releases wake the worker often under load, and
            // a count skipped on every wake would leave the fallback's `limit / live nodes` stale.
            if counted.elapsed() >= WORKER_EVERY {
                self.count_live_nodes().await;
                counted = tokio::time::Instant::now();
            }
            let (releases, resync) = {
                let mut state = self.state();
                (std::mem::take(&mut state.releases), std::mem::take(&mut state.resync))
            };
            if !resync.is_empty() {
                self.inner.resyncs.fetch_add(1, Ordering::SeqCst);
            }
            let mut failed = HashSet::new();
            for key in &resync {
                if let Err(error) = self.write_count(key, count(key)).await {
                    tracing::debug!(%error, "cannot resync the trunk's admitted calls; retrying");
                    failed.insert(key.clone());
                }
            }
            for (key, n) in releases {
                // A resync wrote the node's whole count; the releases are in it.
                if resync.contains(&key) {
                    continue;
                }
                if let Err(error) = self.subtract(&key, n).await {
                    tracing::debug!(%error, "cannot record ended calls in Postgres; resyncing the trunk");
                    failed.insert(key);
                }
            }
            if !failed.is_empty() {
                self.state().resync.extend(failed);
                tokio::time::sleep(WORKER_EVERY).await;
            }
        }
    }

    async fn subtract(&self, key: &TrunkKey, n: u32) -> Result<(), sqlx::Error> {
        let query = sqlx::query(
            "UPDATE trunk_admissions SET active = greatest(active - $4, 0), updated_at = now()
              WHERE namespace = $1 AND trunk_name = $2 AND node_id = $3",
        )
        .bind(&key.0)
        .bind(&key.1)
        .bind(&self.inner.node_id)
        .bind(i32::try_from(n).unwrap_or(i32::MAX))
        .execute(&self.inner.pool);
        bounded(query).await.map(|_| ())
    }

    async fn write_count(&self, key: &TrunkKey, active: u32) -> Result<(), sqlx::Error> {
        let query = sqlx::query(
            "INSERT INTO trunk_admissions (namespace, trunk_name, node_id, active, updated_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (namespace, trunk_name, node_id) DO UPDATE SET active = EXCLUDED.active, updated_at = now()",
        )
        .bind(&key.0)
        .bind(&key.1)
        .bind(&self.inner.node_id)
        .bind(i32::try_from(active).unwrap_or(i32::MAX))
        .execute(&self.inner.pool);
        bounded(query).await.map(|_| ())
    }

    async fn count_live_nodes(&self) {
        let query = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM live_nodes").fetch_one(&self.inner.pool);
        if let Ok(n) = bounded(query).await {
            self.inner.live_nodes.store(u32::try_from(n).unwrap_or(u32::MAX).max(1), Ordering::Relaxed);
        }
    }

    /// Marks every row of this node for a resync; returns whether the database answered.
    async fn adopt(&self) -> bool {
        let query = sqlx::query_as::<_, (String, String)>(
            "SELECT namespace, trunk_name FROM trunk_admissions WHERE node_id = $1 AND active > 0",
        )
        .bind(&self.inner.node_id)
        .fetch_all(&self.inner.pool);
        match bounded(query).await {
            Ok(keys) => {
                if !keys.is_empty() {
                    tracing::info!(
                        trunks = keys.len(),
                        "resyncing the calls an earlier run of this node left admitted"
                    );
                    self.state().resync.extend(keys);
                    self.inner.wake.notify_one();
                }
                true
            }
            Err(error) => {
                tracing::debug!(%error, "cannot read this node's admitted calls yet; retrying");
                false
            }
        }
    }
}

async fn bounded<T>(query: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
    tokio::time::timeout(Duration::from_secs(5), query).await.unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// A trunk-wide limit split over `live` nodes for the local fallback: at least one call each,
/// so that a node never refuses everything because more nodes run than the limit allows.
pub fn local_share(limit: u32, live: u32) -> u32 {
    (limit / live.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_share_divides_and_keeps_one() {
        assert_eq!(local_share(10, 2), 5);
        assert_eq!(local_share(10, 3), 3);
        assert_eq!(local_share(10, 0), 10);
        assert_eq!(local_share(2, 5), 1);
    }

    async fn admitted(pool: &PgPool, node: &str) -> i64 {
        sqlx::query_scalar("SELECT coalesce(sum(active), 0)::bigint FROM trunk_admissions WHERE node_id = $1")
            .bind(node)
            .fetch_one(pool)
            .await
            .expect("sum")
    }

    async fn live_node(pool: &PgPool, node: &str) {
        sqlx::query("INSERT INTO nodes (node_id, hostname, version) VALUES ($1, 'h', 'v')")
            .bind(node)
            .execute(pool)
            .await
            .expect("node");
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn admission_holds_the_limit_across_nodes_and_ignores_dead_ones(pool: PgPool) {
        live_node(&pool, "a").await;
        live_node(&pool, "b").await;
        let a = Admission::new(pool.clone(), "a");
        let b = Admission::new(pool.clone(), "b");
        let key: TrunkKey = ("ns".into(), "t".into());
        let mut verdicts = Vec::new();
        for i in 0..8 {
            let node = if i % 2 == 0 { &a } else { &b };
            verdicts.push(node.admit(&key, Some(5), None).await);
        }
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Admitted).count(), 5, "{verdicts:?}");
        assert!(verdicts[5..].iter().all(|v| *v == Verdict::Concurrent), "{verdicts:?}");
        // Node b dies: its calls stop counting.
        sqlx::query("UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE node_id = 'b'")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(admitted(&pool, "b").await, 2);
        assert_eq!(a.admit(&key, Some(5), None).await, Verdict::Admitted);
        assert_eq!(a.admit(&key, Some(5), None).await, Verdict::Admitted);
        assert_eq!(a.admit(&key, Some(5), None).await, Verdict::Concurrent);

        // Releases go through the worker; a resync writes the node's own count. A restarted b
        // adopts its leftover rows: they are resynced to its count (none).
        let b_again = Admission::new(pool.clone(), "b");
        let adopter = tokio::spawn(b_again.run(|_| 0));
        crate::test_support::wait_for("b's rows adopted", Duration::from_secs(5), || async {
            admitted(&pool, "b").await == 0
        })
        .await;
        adopter.abort();
        // a's own count of its calls, as the limits keep it.
        let held = Arc::new(AtomicU32::new(5));
        let counted = Arc::clone(&held);
        let worker = tokio::spawn(a.clone().run(move |_| counted.load(Ordering::SeqCst)));
        held.store(4, Ordering::SeqCst);
        a.release(&key);
        crate::test_support::wait_for("the release", Duration::from_secs(5), || async {
            admitted(&pool, "a").await == 4
        })
        .await;
        held.store(1, Ordering::SeqCst);
        a.mark_resync(&key);
        a.inner.wake.notify_one();
        crate::test_support::wait_for("the resync", Duration::from_secs(5), || async {
            admitted(&pool, "a").await == 1
        })
        .await;
        worker.abort();
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn the_rate_counts_per_second_across_nodes(pool: PgPool) {
        let a = Admission::new(pool.clone(), "a");
        let b = Admission::new(pool.clone(), "b");
        let key: TrunkKey = ("ns".into(), "t".into());
        // Start at the beginning of a second so that the burst fits in one.
        let now = chrono::Utc::now();
        let to_next = 1_000_000_000u32.saturating_sub(now.timestamp_subsec_nanos());
        tokio::time::sleep(Duration::from_nanos(u64::from(to_next) + 10_000_000)).await;
        let mut admitted = 0;
        for i in 0..6 {
            let node = if i % 2 == 0 { &a } else { &b };
            if node.admit(&key, None, Some(3)).await == Verdict::Admitted {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
    }

    #[tokio::test]
    async fn an_unreachable_database_is_decided_locally_and_marked_for_resync() {
        // Nothing listens on port 1.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(100))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let a = Admission::new(pool, "a");
        let key: TrunkKey = ("ns".into(), "t".into());
        assert_eq!(a.admit(&key, Some(5), None).await, Verdict::Unreachable);
        // The next ones skip the database for a while.
        assert!(a.state().down_until.is_some_and(|until| until > Instant::now()));
        assert_eq!(a.admit(&key, Some(5), None).await, Verdict::Unreachable);
        assert!(a.state().resync.contains(&key));
    }
}
