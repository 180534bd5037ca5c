//! The node's connection to Postgres at start: connect with backoff, wait for the operator to
//! migrate the schema, and (during an outage, with a configuration saved on disk) go on with a
//! pool that connects once Postgres is back. URLs are only ever logged with their password
//! masked.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use switchboard_model::db::{self, DbError};

use crate::POOL_SIZE;
use crate::config::SnapshotHandle;
use crate::retry::Backoff;

/// Connects and waits for the schema; when that takes longer than `timeout` and a configuration
/// was saved on disk, serves it (stale) and goes on with a pool that connects when Postgres is
/// back, so that a node started during an outage takes calls.
pub(crate) async fn wait_for_database(
    url: &str,
    timeout: Duration,
    handle: &SnapshotHandle,
    disk: Option<&crate::config::disk::DiskSnapshot>,
) -> anyhow::Result<PgPool> {
    check_url(url)?;
    let ready = async {
        let pool = connect(url).await?;
        wait_for_schema(&pool).await;
        Ok::<_, anyhow::Error>(pool)
    };
    tokio::pin!(ready);
    let Some(disk) = disk else { return ready.await };
    if let Ok(result) = tokio::time::timeout(timeout, &mut ready).await {
        return result;
    }
    match disk.load() {
        Ok(Some(saved)) => {
            let generation = saved.snapshot.generation();
            if handle.serve_saved(saved.snapshot) {
                tracing::warn!(
                    generation,
                    saved_at = %saved.saved_at,
                    "Postgres did not answer within {timeout:?}; serving config generation {generation} saved on disk \
                     at {} (stale until Postgres confirms it)",
                    saved.saved_at
                );
                return lazy_pool(url);
            }
        }
        Ok(None) => tracing::info!("no configuration saved on disk yet; waiting for Postgres"),
        Err(error) => tracing::warn!(%error, "{error}; waiting for Postgres"),
    }
    ready.await
}

/// A pool that opens its connections when they are first needed.
fn lazy_pool(url: &str) -> anyhow::Result<PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url)
        .with_context(|| format!("the database URL {} is not usable", redact_url(url)))
}

/// Opens the query pool, retrying with backoff while Postgres is unreachable. Fails only when
/// the URL itself is unusable.
async fn connect(url: &str) -> anyhow::Result<PgPool> {
    check_url(url)?;
    let mut backoff = Backoff::reconnect();
    let mut failures = 0u32;
    loop {
        match db::connect(url, POOL_SIZE).await {
            Ok(pool) => {
                if failures > 0 {
                    tracing::info!("connected to Postgres at {} after {failures} failed attempts", redact_url(url));
                }
                return Ok(pool);
            }
            Err(DbError::Connect { source: sqlx::Error::Configuration(error), .. }) => {
                anyhow::bail!("the database URL {} is not usable: {error}", redact_url(url));
            }
            Err(error) => {
                failures += 1;
                let delay = backoff.next_delay();
                let error = match error {
                    DbError::Connect { source, .. } => source.to_string(),
                    other => other.to_string(),
                };
                // The first failure and every eighth one (about every 80 s once the backoff is
                // at its cap) at error level, the rest at debug: a long outage must not flood
                // the log, but must stay visible.
                if failures == 1 || failures.is_multiple_of(8) {
                    tracing::error!(
                        database = %redact_url(url),
                        attempts = failures,
                        "database unreachable: cannot connect to Postgres at {}: {error}; retrying (the node waits \
                         for the database and does not exit)",
                        redact_url(url)
                    );
                } else {
                    tracing::debug!(attempts = failures, "database still unreachable: {error}; retrying in {delay:?}");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The URL with its password masked, for logs and errors. `db::redact_url` returns a URL it
/// cannot parse unchanged, password included; this masks the user-info password by hand then.
pub(crate) fn redact_url(url: &str) -> String {
    let redacted = db::redact_url(url);
    if redacted != url {
        return redacted;
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return redacted;
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split_once(':').map_or(user_info, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        _ => redacted,
    }
}

/// Refuses a URL that no amount of waiting makes usable: not `postgres://` or
/// `postgresql://`, or malformed.
fn check_url(url: &str) -> anyhow::Result<()> {
    let scheme = url.split_once(':').map(|(scheme, _)| scheme.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("postgres" | "postgresql")) {
        anyhow::bail!("the database URL {} is not usable: it must start with postgres://", redact_url(url));
    }
    if let Err(error) = url.parse::<sqlx::postgres::PgConnectOptions>() {
        anyhow::bail!("the database URL {} is not usable: {error}", redact_url(url));
    }
    Ok(())
}

/// Whether the configuration schema is in place, as far as the node can tell.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SchemaState {
    Ready,
    /// `config_state` does not exist (or has no row): migrations have not run yet.
    NotMigrated,
    /// The check itself failed (the database went away again); the message says why.
    Unavailable(String),
}

pub(crate) async fn schema_state(pool: &PgPool) -> SchemaState {
    match db::current_generation(pool).await {
        Ok(_) => SchemaState::Ready,
        Err(sqlx::Error::RowNotFound) => SchemaState::NotMigrated,
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P01") => SchemaState::NotMigrated,
        Err(error) => SchemaState::Unavailable(error.to_string()),
    }
}

/// Waits until the operator (or local mode) has migrated the schema. The node never migrates
/// it: two writers of the schema would race.
pub(crate) async fn wait_for_schema(pool: &PgPool) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut reported = None;
    loop {
        let state = schema_state(pool).await;
        match &state {
            SchemaState::Ready => {
                if reported.is_some() {
                    tracing::info!("schema is migrated; continuing");
                }
                return;
            }
            _ if reported.as_ref() == Some(&state) => {}
            SchemaState::NotMigrated => tracing::warn!(
                "schema not migrated yet; waiting (the operator or `switchboard local` applies the migrations)"
            ),
            SchemaState::Unavailable(error) => {
                tracing::warn!("cannot check the database schema: {error}; retrying")
            }
        }
        reported = Some(state);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
