//! Keeps the node's snapshot current: `LISTEN` for change notifications, a periodic generation
//! check that catches notifications lost while the listening connection was down, and a reload
//! that swaps the snapshot when the stored generation is newer.
//!
//! Two tasks: the listener owns the `LISTEN` connection and forwards what it hears over a
//! channel; the watcher decides when to reload. The listener is never cancelled half-way
//! through reading a message, and a slow reload never makes the listener miss notifications
//! (they queue and are coalesced).

use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use switchboard_model::db::{CONFIG_CHANNEL, current_generation};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, interval_at, timeout};

use super::{LoadError, SnapshotHandle, load_snapshot};
use crate::retry::{Backoff, DbHealth};

/// Bound on the generation check; the pool's acquire timeout (5 s) usually answers first.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a full snapshot load (tens of thousands of rows take well under a second).
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What the listener task reports.
#[derive(Debug)]
enum ListenEvent {
    /// `LISTEN` is in place (first connection or a reconnection) after an attempt that started
    /// at the given time: anything committed before may have been missed, so the generation
    /// must be checked.
    Listening(Instant),
    /// A notification; `None` when its payload is not a generation.
    Notified(Option<i64>),
    /// The listening connection failed or could not be opened, in an attempt that started at
    /// the given time; the listener retries with backoff.
    Lost(String, Instant),
}

/// What one check or reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A newer snapshot was swapped in.
    Applied(i64),
    /// Nothing newer to apply.
    UpToDate,
    /// The stored generation is invalid; the current snapshot stays.
    Rejected(i64),
    /// Postgres could not be read; the current snapshot stays.
    Unavailable,
}

/// The notification payload is the committed generation as a decimal string.
fn parse_generation(payload: &str) -> Option<i64> {
    payload.trim().parse().ok()
}

/// A pool of one connection for `LISTEN`, to the same database as `pool`. Kept apart from the
/// main pool so that the listening connection is never taken by a query, and never closed for
/// being idle.
pub(crate) fn listener_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Aborts a task when dropped, so that no task outlives the watcher that started it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reloads the snapshot behind a [`SnapshotHandle`] whenever the stored generation moves on.
pub(crate) struct Watcher {
    pool: PgPool,
    listener_pool: PgPool,
    handle: SnapshotHandle,
    health: DbHealth,
    poll_interval: Duration,
    /// The newest generation found invalid: not retried until a newer one is committed.
    rejected: Option<i64>,
    /// The last error Postgres itself returned (not a connection failure), logged once.
    last_server_error: Option<String>,
}

impl Watcher {
    /// `pool` serves the queries, `listener_pool` (see [`listener_pool`]) the `LISTEN`
    /// connection; `poll_interval` paces the generation check that catches missed
    /// notifications.
    pub(crate) fn new(
        pool: PgPool,
        listener_pool: PgPool,
        handle: SnapshotHandle,
        health: DbHealth,
        poll_interval: Duration,
    ) -> Self {
        Self { pool, listener_pool, handle, health, poll_interval, rejected: None, last_server_error: None }
    }

    /// Runs until the task is aborted: loads the current generation, then follows changes.
    pub(crate) async fn run(mut self) {
        let (events_tx, mut events) = mpsc::channel(256);
        let listener_pool = self.listener_pool.clone();
        let spawn_listener =
            |tx: &mpsc::Sender<ListenEvent>| AbortOnDrop(tokio::spawn(listen(listener_pool.clone(), tx.clone())));
        let mut listener = spawn_listener(&events_tx);
        let mut listening = false;

        self.check().await;
        let period = self.poll_interval;
        let mut poll = interval_at(tokio::time::Instant::now() + period, period);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                Some(event) = events.recv() => {
                    self.on_events(event, &mut events, &mut listening).await;
                }
                _ = poll.tick() => {
                    if self.check().await == Outcome::Unavailable && listening {
                        // The database did not answer while the listener believes it is
                        // connected: its connection may be half-open and silent forever.
                        // Start a fresh one; it reports `Listening` once it is back.
                        tracing::debug!("restarting the LISTEN connection after a failed generation check");
                        listening = false;
                        listener = spawn_listener(&events_tx);
                    }
                }
            }
            if listener.0.is_finished() {
                // Only a panic ends the listener; keep the node following changes regardless.
                tracing::error!("the LISTEN task stopped unexpectedly; restarting it");
                listener = spawn_listener(&events_tx);
            }
        }
    }

    /// Handles `first` and everything else already queued, then reloads at most once: a burst
    /// of notifications costs one reload.
    async fn on_events(&mut self, first: ListenEvent, events: &mut mpsc::Receiver<ListenEvent>, listening: &mut bool) {
        let mut must_check = false;
        let mut newest: Option<i64> = None;
        let mut next = Some(first);
        while let Some(event) = next {
            match event {
                ListenEvent::Listening(started) => {
                    *listening = true;
                    self.health.ok(started);
                    must_check = true;
                    tracing::debug!("listening on channel {CONFIG_CHANNEL}");
                }
                ListenEvent::Notified(Some(generation)) => {
                    newest = newest.max(Some(generation));
                }
                ListenEvent::Notified(None) => {
                    tracing::warn!("notification on {CONFIG_CHANNEL} without a generation; checking the database");
                    must_check = true;
                }
                ListenEvent::Lost(error, started) => {
                    *listening = false;
                    self.health.failed("LISTEN", &error, started, self.handle.generation());
                }
            }
            next = events.try_recv().ok();
        }
        if must_check {
            self.check().await;
        } else if let Some(generation) = newest
            && self.wants(generation)
        {
            self.reload().await;
        }
    }

    /// Whether `generation` is worth loading: newer than the applied one and than the last
    /// invalid one.
    fn wants(&self, generation: i64) -> bool {
        generation > self.handle.generation() && self.rejected.is_none_or(|rejected| generation > rejected)
    }

    /// Reports a failed query. An error returned by Postgres itself (a missing table, a
    /// permission) means the database is reachable but the node cannot use it: it is logged
    /// once at error level, not reported as an outage, and retried at the next check.
    fn query_failed(&mut self, what: &str, error: &sqlx::Error, started: Instant) {
        if !matches!(error, sqlx::Error::Database(_)) {
            self.health.failed(what, error, started, self.handle.generation());
            return;
        }
        self.health.ok(started);
        let message = error.to_string();
        if self.last_server_error.as_deref() != Some(message.as_str()) {
            tracing::error!(
                error = %message,
                applied_generation = self.handle.generation(),
                "{what} failed: {message}; keeping generation {} and retrying",
                self.handle.generation()
            );
            self.last_server_error = Some(message);
        }
    }

    /// Compares the stored generation with the applied one and reloads if it is newer.
    pub(crate) async fn check(&mut self) -> Outcome {
        let started = Instant::now();
        let generation = match timeout(CHECK_TIMEOUT, current_generation(&self.pool)).await {
            Ok(Ok(generation)) => generation,
            Ok(Err(error)) => {
                self.query_failed("config generation check", &error, started);
                return Outcome::Unavailable;
            }
            Err(_) => {
                let error = format!("no answer within {CHECK_TIMEOUT:?}");
                self.health.failed("config generation check", &error, started, self.handle.generation());
                return Outcome::Unavailable;
            }
        };
        self.health.ok(started);
        if self.handle.confirm(generation) {
            tracing::info!(
                generation,
                "Postgres confirms config generation {generation}; the saved snapshot is current"
            );
        }
        if self.wants(generation) { self.reload().await } else { Outcome::UpToDate }
    }

    /// Loads the current generation and swaps it in if it is newer than the applied one.
    pub(crate) async fn reload(&mut self) -> Outcome {
        let started = Instant::now();
        let loaded =
            timeout(LOAD_TIMEOUT, load_snapshot(&self.pool)).await.unwrap_or(Err(LoadError::TimedOut(LOAD_TIMEOUT)));
        let applied = self.handle.generation();
        let snapshot = match loaded {
            Ok(snapshot) => snapshot,
            Err(LoadError::Invalid { generation, problem }) => {
                self.health.ok(started);
                if self.rejected.is_none_or(|rejected| generation > rejected) {
                    tracing::error!(
                        generation,
                        applied_generation = applied,
                        "rejected config generation {generation}: {problem}; \
                         keeping generation {applied} until a newer generation fixes it"
                    );
                }
                self.rejected = self.rejected.max(Some(generation));
                return Outcome::Rejected(generation);
            }
            Err(LoadError::Database(error)) => {
                self.query_failed("config reload", &error, started);
                return Outcome::Unavailable;
            }
            Err(error) => {
                self.health.failed("config reload", &error, started, applied);
                return Outcome::Unavailable;
            }
        };
        self.health.ok(started);
        self.last_server_error = None;

        let generation = snapshot.generation();
        let (trunks, numbers, rules) = (snapshot.trunk_count(), snapshot.number_count(), snapshot.rules().len());
        let credentials = snapshot.credential_count();
        match self.handle.swap_if_newer(snapshot) {
            Some(previous) => {
                tracing::info!(
                    generation,
                    previous_generation = previous.generation(),
                    trunks,
                    numbers,
                    rules,
                    credentials,
                    load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "applied config generation {generation}: {trunks} trunks, {numbers} numbers, {rules} rules"
                );
                Outcome::Applied(generation)
            }
            None => Outcome::UpToDate,
        }
    }
}

/// The listener task: keeps a `LISTEN` connection open, reconnecting with backoff, and
/// forwards what it hears. Returns when the watcher is gone.
///
/// Reconnection is done here rather than by sqlx (`eager_reconnect(false)`), so that a lost
/// connection is reported the moment it is noticed and every new attempt is paced by the
/// backoff.
async fn listen(pool: PgPool, events: mpsc::Sender<ListenEvent>) {
    let mut backoff = Backoff::reconnect();
    loop {
        let attempt = Instant::now();
        let lost = match subscribe(&pool).await {
            Ok(mut listener) => {
                if events.send(ListenEvent::Listening(attempt)).await.is_err() {
                    return;
                }
                loop {
                    let event = match listener.try_recv().await {
                        Ok(Some(notification)) => ListenEvent::Notified(parse_generation(notification.payload())),
                        Ok(None) => {
                            break ListenEvent::Lost("the connection was closed".into(), Instant::now());
                        }
                        Err(error) => break ListenEvent::Lost(error.to_string(), Instant::now()),
                    };
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
            }
            Err(error) => ListenEvent::Lost(error.to_string(), attempt),
        };
        if events.send(lost).await.is_err() {
            return;
        }
        // A connection that lived a while was healthy: start the backoff over. One that died
        // at once keeps backing off, so a flapping server is not hammered.
        if attempt.elapsed() >= Duration::from_secs(10) {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn subscribe(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(CONFIG_CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Snapshot;
    use crate::config::fixtures::{number, trunk};
    use crate::test_support::{Change, publish, someone_listens, wait_for};

    const LIMIT: Duration = Duration::from_secs(10);
    const NEVER: Duration = Duration::from_secs(3600);

    /// A running watcher and what a test needs to observe and stop it.
    struct Running {
        handle: SnapshotHandle,
        task: JoinHandle<()>,
        listener_pool: PgPool,
    }

    impl Running {
        fn start(pool: &PgPool, poll_interval: Duration) -> Self {
            let handle = SnapshotHandle::default();
            let listener_pool = listener_pool(pool);
            let watcher =
                Watcher::new(pool.clone(), listener_pool.clone(), handle.clone(), DbHealth::default(), poll_interval);
            Self { handle, task: tokio::spawn(watcher.run()), listener_pool }
        }

        async fn wait_for_generation(&self, generation: i64, what: &str) {
            wait_for(what, LIMIT, || async { self.handle.generation() == generation }).await;
        }

        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
            self.listener_pool.close().await;
        }
    }

    fn numbered(generation: i64) -> Change {
        let e164 = format!("+1555000{generation:04}");
        Change { numbers: vec![number("default", &format!("n{generation}"), &e164, "main")], ..Change::default() }
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn notifications_are_applied(pool: PgPool) {
        // With the periodic check an hour away, only the start-up checks (at most two) and
        // notifications can apply a generation: three changes prove notifications work.
        let running = Running::start(&pool, NEVER);
        running.wait_for_generation(0, "the initial load").await;
        wait_for("the LISTEN connection", LIMIT, || someone_listens(&pool)).await;
        for _ in 0..3 {
            let generation = publish(&pool, numbered(running.handle.generation() + 1), true).await;
            running.wait_for_generation(generation, "a notified generation").await;
        }
        let snapshot = running.handle.current();
        assert_eq!(snapshot.number_count(), 3);
        assert!(snapshot.number("+15550000003").is_some());

        // A burst ends on its last generation.
        let mut last = 0;
        for _ in 0..20 {
            last = publish(&pool, numbered(running.handle.generation() + 1), true).await;
        }
        running.wait_for_generation(last, "the end of a burst").await;
        running.stop().await;
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn the_periodic_check_catches_missed_notifications(pool: PgPool) {
        let running = Running::start(&pool, Duration::from_millis(100));
        running.wait_for_generation(0, "the initial load").await;
        for _ in 0..3 {
            let generation = publish(&pool, numbered(running.handle.generation() + 1), false).await;
            running.wait_for_generation(generation, "an unannounced generation").await;
        }
        running.stop().await;
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn catches_up_after_the_listen_connection_is_killed(pool: PgPool) {
        let running = Running::start(&pool, NEVER);
        running.wait_for_generation(0, "the initial load").await;
        wait_for("the LISTEN connection", LIMIT, || someone_listens(&pool)).await;

        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(&pool)
        .await
        .expect("terminate the listener");
        assert_eq!(killed, 1);

        // Committed while the listener is down or reconnecting: its notification may be lost.
        let generation = publish(&pool, numbered(1), true).await;
        running.wait_for_generation(generation, "the generation committed during the outage").await;
        // And notifications flow again afterwards.
        for _ in 0..2 {
            let generation = publish(&pool, numbered(running.handle.generation() + 1), true).await;
            running.wait_for_generation(generation, "a generation after reconnecting").await;
        }
        running.stop().await;
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn invalid_data_keeps_the_last_good_snapshot(pool: PgPool) {
        let handle = SnapshotHandle::default();
        let listener_pool = listener_pool(&pool);
        let mut watcher = Watcher::new(pool.clone(), listener_pool, handle.clone(), DbHealth::default(), NEVER);

        let good = Change { trunks: vec![trunk("default", "main")], ..numbered(1) };
        let good = publish(&pool, good, true).await;
        assert_eq!(watcher.check().await, Outcome::Applied(good));

        let bad = Change { sql: vec![r#"UPDATE trunks SET gateways = '[{"address": "x"}]'"#], ..Change::default() };
        let bad = publish(&pool, bad, true).await;
        assert_eq!(watcher.check().await, Outcome::Rejected(bad));
        assert_eq!(handle.generation(), good);
        assert!(handle.current().trunk("default", "main").is_some());
        // The rejected generation is not retried on every check.
        assert_eq!(watcher.check().await, Outcome::UpToDate);
        assert_eq!(watcher.reload().await, Outcome::Rejected(bad));

        let fixed = Change { trunks: vec![trunk("default", "main")], ..Change::default() };
        let fixed = publish(&pool, fixed, true).await;
        assert_eq!(watcher.check().await, Outcome::Applied(fixed));
        assert_eq!(watcher.check().await, Outcome::UpToDate);
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn a_server_error_is_not_an_outage(pool: PgPool) {
        let handle = SnapshotHandle::default();
        let health = DbHealth::default();
        let mut watcher = Watcher::new(pool.clone(), listener_pool(&pool), handle.clone(), health.clone(), NEVER);
        assert_eq!(watcher.check().await, Outcome::Applied(0));
        publish(&pool, numbered(1), false).await;
        sqlx::query("DROP TABLE routing_rules").execute(&pool).await.expect("drop");
        assert_eq!(watcher.check().await, Outcome::Unavailable);
        assert!(!health.is_down());
        assert!(watcher.last_server_error.as_deref().is_some_and(|e| e.contains("routing_rules")));
        assert_eq!(handle.generation(), 0);
    }

    #[tokio::test]
    async fn an_unreachable_database_keeps_the_current_snapshot() {
        let pool = PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy("postgres://postgres@127.0.0.1:1/postgres")
            .expect("valid URL");
        let loaded = Snapshot::from_parts(5, vec![trunk("default", "main")], vec![], vec![], vec![]).expect("valid");
        let handle = SnapshotHandle::new(loaded);
        let health = DbHealth::default();
        let mut watcher = Watcher::new(pool.clone(), listener_pool(&pool), handle.clone(), health.clone(), NEVER);
        assert_eq!(watcher.check().await, Outcome::Unavailable);
        assert_eq!(watcher.reload().await, Outcome::Unavailable);
        assert!(health.is_down());
        assert_eq!(handle.generation(), 5);
        assert!(handle.current().trunk("default", "main").is_some());
    }

    #[test]
    fn payloads_parse_as_generations() {
        assert_eq!(parse_generation("42"), Some(42));
        assert_eq!(parse_generation(" 7\n"), Some(7));
        assert_eq!(parse_generation(""), None);
        assert_eq!(parse_generation("seven"), None);
        assert_eq!(parse_generation("99999999999999999999999"), None);
    }
}
