//! Work queued in a Postgres table for whichever node claims it first (API-placed calls,
//! outbound messages, transfer commands, final webhooks of reaped requests). Rows are claimed
//! one at a time by the caller's statement (`FOR UPDATE SKIP LOCKED`) until none is left; then
//! the loop waits for a NOTIFY on the table's channel, or for [`POLL`], which also covers a
//! lost LISTEN connection and a missed notification.
//!
//! One LISTEN connection ([`Wakeups`]) serves every queue of the node, outside the query pool:
//! a listener per queue inside the pool took every connection of the node's small pool once
//! there were four queues, and the heartbeat and config checks then timed out.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

/// How long the loop waits for a notification before it looks again anyway.
pub const POLL: Duration = Duration::from_secs(2);

/// The node's one LISTEN connection for its queues: a notification on a queue's channel wakes
/// that queue's loop. Cheap to clone.
#[derive(Clone, Default)]
pub struct Wakeups {
    channels: Arc<HashMap<&'static str, Arc<Notify>>>,
}

impl Wakeups {
    /// Wake-ups for `channels`; nothing fires until [`Wakeups::relay`] runs.
    pub fn new(channels: &[&'static str]) -> Self {
        Self { channels: Arc::new(channels.iter().map(|channel| (*channel, Arc::new(Notify::new()))).collect()) }
    }

    /// The wake-up of `channel`'s queue (one that never fires for a channel not listened to:
    /// that queue polls).
    pub fn of(&self, channel: &str) -> Arc<Notify> {
        self.channels.get(channel).cloned().unwrap_or_default()
    }

    /// Listens on every channel on a connection of its own (not one of `pool`'s: see the
    /// module doc), reconnecting when it is lost, until dropped.
    pub async fn relay(self, pool: PgPool) {
        let listener_pool = crate::config::listener_pool(&pool);
        let channels: Vec<&str> = self.channels.keys().copied().collect();
        loop {
            let mut listener = match PgListener::connect_with(&listener_pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::debug!(%error, "cannot open the queues' LISTEN connection; polling meanwhile");
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            if let Err(error) = listener.listen_all(channels.iter().copied()).await {
                tracing::warn!(%error, "cannot LISTEN for queued work; polling meanwhile");
                tokio::time::sleep(POLL).await;
                continue;
            }
            // Whatever was notified while not listening: every queue looks once.
            self.channels.values().for_each(|wakeup| wakeup.notify_one());
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => {
                        if let Some(wakeup) = self.channels.get(notification.channel()) {
                            wakeup.notify_one();
                        }
                    }
                    // The connection was lost; try_recv reconnects on the next call.
                    Ok(None) => self.channels.values().for_each(|wakeup| wakeup.notify_one()),
                    Err(error) => {
                        tracing::debug!(%error, "the queues' LISTEN connection failed; reconnecting");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Claims rows with `claim` and hands each to `start`, until the task is dropped (the node
/// stops). `what` names the queue in logs. A claim that fails (the database is away) is
/// retried after the next wait: a `wakeup` (a NOTIFY on the queue's channel) or [`POLL`].
pub async fn serve<T, C, F>(wakeup: Arc<Notify>, what: &str, mut claim: C, mut start: impl FnMut(T))
where
    C: FnMut() -> F,
    F: Future<Output = Result<Option<T>, sqlx::Error>>,
{
    loop {
        loop {
            match claim().await {
                Ok(Some(item)) => start(item),
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, what, "cannot claim queued work now");
                    break;
                }
            }
        }
        let _ = tokio::time::timeout(POLL, wakeup.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NOTIFY wakes its own queue only, and the LISTEN connection is not one of the query
    /// pool's: with a pool of one connection, queries still get it while the node listens.
    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn a_notification_wakes_its_queue_and_leaves_the_pool_free(pool: PgPool) {
        let small = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap();
        let wakeups = Wakeups::new(&["sb_test_calls", "sb_test_messages"]);
        let relay = tokio::spawn(wakeups.clone().relay(small.clone()));
        let (calls, messages) = (wakeups.of("sb_test_calls"), wakeups.of("sb_test_messages"));
        // Once listening, every queue is woken once (for what was notified before).
        let within = Duration::from_secs(10);
        tokio::time::timeout(within, calls.notified()).await.expect("listening never started");
        tokio::time::timeout(within, messages.notified()).await.unwrap();

        sqlx::query("SELECT pg_notify('sb_test_calls', '')").execute(&small).await.expect("the pool's one connection");
        tokio::time::timeout(within, calls.notified()).await.expect("the NOTIFY did not wake its queue");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), messages.notified()).await.is_err(),
            "another queue was woken"
        );
        // A channel nobody listens to has a wake-up that never fires (that queue polls).
        assert!(tokio::time::timeout(Duration::from_millis(100), wakeups.of("elsewhere").notified()).await.is_err());
        relay.abort();
    }
}
