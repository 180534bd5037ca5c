//! Database connection, migrations and the notification channel that carries config changes.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// `NOTIFY` channel on which every committed configuration change announces its generation.
pub const CONFIG_CHANNEL: &str = "switchboard_config";

/// Errors of the database layer, with the context a user needs to act on them.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to Postgres at {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
}

/// Removes the password from a connection URL so that it can be logged.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        // Unparsable: mask the password (between the user and the last '@') by hand.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(start), Some(end)) if end > start + 3 => {
                let userinfo = &url[start + 3..end];
                match userinfo.find(':') {
                    Some(colon) => format!("{}{}:***{}", &url[..start + 3], &userinfo[..colon], &url[end..]),
                    None => url.to_string(),
                }
            }
            _ => url.to_string(),
        },
    }
}

/// Opens a pool. `acquire_timeout` is short so that an unreachable database is reported
/// quickly instead of hanging the caller.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|source| DbError::Connect { url: redact_url(url), source })
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The current configuration generation.
pub async fn current_generation<'c, E>(executor: E) -> Result<i64, sqlx::Error>
where
    E: sqlx::PgExecutor<'c>,
{
    sqlx::query_scalar("SELECT generation FROM config_state WHERE singleton").fetch_one(executor).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://u:secret@h:notaport/db"), "postgres://u:***@h:notaport/db");
    }
}
