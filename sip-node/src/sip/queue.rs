//! Work queued in a Postgres table for whichever node claims it first (API-placed calls,
//! outbound messages). Rows are claimed one at a time by the caller's statement (`FOR UPDATE
//! SKIP LOCKED`) until none is left; then the loop waits for a NOTIFY on the table's channel,
//! or for [`POLL`], which also covers a lost LISTEN connection and a missed notification.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;

/// How long the loop waits for a notification before it looks again anyway.
pub const POLL: Duration = Duration::from_secs(2);

/// Claims rows with `claim` and hands each to `start`, until the task is dropped (the node
/// stops). `what` names the queue in logs. A claim that fails (the database is away) is
/// retried after the next wait.
pub async fn serve<T, C, F>(pool: &PgPool, channel: &str, what: &str, mut claim: C, mut start: impl FnMut(T))
where
    C: FnMut() -> F,
    F: Future<Output = Result<Option<T>, sqlx::Error>>,
{
    let mut listener = PgListener::connect_with(pool).await.ok();
    if let Some(listener) = listener.as_mut()
        && let Err(error) = listener.listen(channel).await
    {
        tracing::warn!(%error, what, "cannot LISTEN for queued work; polling only");
    }
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
        match listener.as_mut() {
            Some(listener) => {
                let _ = tokio::time::timeout(POLL, listener.try_recv()).await;
            }
            None => tokio::time::sleep(POLL).await,
        }
    }
}
