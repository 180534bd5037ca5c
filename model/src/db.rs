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

/// Removes the passwords from a connection URL so that it can be logged: the user-info
/// password, and libpq's `password=` and `sslpassword=` query parameters
/// (`postgres://u@h/db?password=...` is a valid way to write one).
pub fn redact_url(url: &str) -> String {
    let redacted = match url::Url::parse(url) {
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
    };
    redact_query(&redacted)
}

/// Masks the values of secret query parameters, leaving the rest of the URL as written.
fn redact_query(url: &str) -> String {
    let Some((base, rest)) = url.split_once('?') else { return url.to_string() };
    let (query, fragment) = match rest.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (rest, None),
    };
    let secret = |key: &str| {
        let key: String = url::form_urlencoded::parse(format!("{key}=").as_bytes())
            .next()
            .map(|(k, _)| k.to_ascii_lowercase())
            .unwrap_or_default();
        matches!(key.as_str(), "password" | "sslpassword")
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if secret(key) => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    let mut out = format!("{base}?{}", pairs.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
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

    /// libpq takes the password as a query parameter too; it was logged as written.
    #[test]
    fn redacts_passwords_in_the_query() {
        assert_eq!(
            redact_url("postgres://u@h:5432/db?sslmode=require&password=s3cret&application_name=x"),
            "postgres://u@h:5432/db?sslmode=require&password=***&application_name=x"
        );
        assert_eq!(redact_url("postgres://u@h/db?PassWord=s3cret"), "postgres://u@h/db?PassWord=***");
        assert_eq!(redact_url("postgres://u@h/db?pass%77ord=s3cret"), "postgres://u@h/db?pass%77ord=***");
        assert_eq!(redact_url("postgres://u@h/db?sslpassword=k3y"), "postgres://u@h/db?sslpassword=***");
        assert_eq!(redact_url("postgres://u:a@h:bad/db?password=b"), "postgres://u:***@h:bad/db?password=***");
        assert!(!redact_url("postgres://u@h/db?password=s3cret#frag").contains("s3cret"));
        assert_eq!(redact_url("postgres://u@h/db?sslmode=disable"), "postgres://u@h/db?sslmode=disable");
    }
}
