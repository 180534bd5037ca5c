//! Reads one consistent snapshot from Postgres.
//!
//! The generation and the four configuration tables are read in one `REPEATABLE READ`
//! transaction, so the snapshot is exactly what the operator committed as of that generation
//! even while it keeps writing.
//!
//! Temporary home of the row decoding: `switchboard_model`'s `load_all` functions take a
//! `&PgPool`, which runs each query on its own connection and so outside the transaction. The
//! SQL and the decoding below mirror the model's (plus the row's key in error messages); they
//! belong in the model as `load_all(impl PgExecutor)` and can move there unchanged.

use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use switchboard_model::db::current_generation;
use switchboard_model::{Credential, NumberConfig, RuleConfig, TrunkConfig};

use super::Snapshot;

/// Why a snapshot could not be loaded. The node keeps serving its current snapshot in every
/// case; the variants differ in whether retrying the same generation can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Postgres could not be queried (unreachable, restarting, schema missing): retry later.
    #[error("cannot read the configuration from Postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// The load did not finish in time: retry later.
    #[error("reading the configuration from Postgres took longer than {0:?}")]
    TimedOut(Duration),
    /// The stored rows of `generation` cannot be used; retrying the same generation gives the
    /// same error, so the node waits for a newer one.
    #[error("configuration generation {generation} is invalid: {problem}")]
    Invalid {
        /// The generation whose rows are bad.
        generation: i64,
        /// Which row and what is wrong with it.
        problem: String,
    },
}

/// Loads the snapshot of the current configuration generation in one read-only
/// `REPEATABLE READ` transaction.
pub async fn load_snapshot(pool: &PgPool) -> Result<Snapshot, LoadError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let generation = current_generation(&mut *tx).await?;
    let trunks = load_rows(
        &mut tx,
        generation,
        TRUNKS_SQL,
        "trunk",
        &["namespace", "name"],
        trunk_from_row,
    )
    .await?;
    let numbers = load_rows(
        &mut tx,
        generation,
        NUMBERS_SQL,
        "phone number",
        &["namespace", "name"],
        number_from_row,
    )
    .await?;
    let rules = load_rows(
        &mut tx,
        generation,
        RULES_SQL,
        "routing rule",
        &["namespace", "name"],
        rule_from_row,
    )
    .await?;
    let credentials = load_rows(
        &mut tx,
        generation,
        CREDENTIALS_SQL,
        "credential of trunk",
        &["namespace", "trunk_name"],
        credential_from_row,
    )
    .await?;
    tx.commit().await?;
    Snapshot::from_parts(generation, trunks, numbers, rules, credentials)
}

const TRUNKS_SQL: &str = "SELECT * FROM trunks ORDER BY namespace, name";
const NUMBERS_SQL: &str = "SELECT * FROM phone_numbers ORDER BY number";
const RULES_SQL: &str = "SELECT * FROM routing_rules ORDER BY priority, namespace, name";
const CREDENTIALS_SQL: &str =
    "SELECT namespace, trunk_name, username, password, secret_name FROM credentials";

/// Runs `sql` and decodes every row; a row that does not decode makes the whole generation
/// invalid, with the row named in the message.
async fn load_rows<T>(
    conn: &mut PgConnection,
    generation: i64,
    sql: &'static str,
    kind: &str,
    key_columns: &[&str; 2],
    decode: fn(&PgRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, LoadError> {
    let rows = sqlx::query(sql).fetch_all(conn).await?;
    rows.iter()
        .map(|row| {
            decode(row).map_err(|error| LoadError::Invalid {
                generation,
                problem: format!("{kind} {}: {error}", row_key(row, key_columns)),
            })
        })
        .collect()
}

/// `namespace/name` of a row for error messages, even when other columns do not decode.
fn row_key(row: &PgRow, [namespace, name]: &[&str; 2]) -> String {
    let text = |column: &str| {
        row.try_get::<String, _>(column)
            .unwrap_or_else(|_| "?".into())
    };
    format!("{}/{}", text(namespace), text(name))
}

// ---- row decoding, as in switchboard_model::config (see the module comment) ----

fn parse_text<T: std::str::FromStr<Err = String>>(
    row: &PgRow,
    column: &str,
) -> Result<T, sqlx::Error> {
    let text: String = row.try_get(column)?;
    text.parse().map_err(|e: String| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: e.into(),
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(row: &PgRow, column: &str) -> Result<T, sqlx::Error> {
    let value: serde_json::Value = row.try_get(column)?;
    serde_json::from_value(value).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: e.into(),
    })
}

fn parse_opt_json<T: serde::de::DeserializeOwned>(
    row: &PgRow,
    column: &str,
) -> Result<Option<T>, sqlx::Error> {
    let value: Option<serde_json::Value> = row.try_get(column)?;
    value
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| sqlx::Error::ColumnDecode {
            index: column.to_string(),
            source: e.into(),
        })
}

fn opt_u16(row: &PgRow, column: &str) -> Result<Option<u16>, sqlx::Error> {
    Ok(row
        .try_get::<Option<i32>, _>(column)?
        .map(|v| v.clamp(0, i32::from(u16::MAX)) as u16))
}

fn opt_u32(row: &PgRow, column: &str) -> Result<Option<u32>, sqlx::Error> {
    Ok(row
        .try_get::<Option<i32>, _>(column)?
        .map(|v| v.max(0) as u32))
}

fn u32_col(row: &PgRow, column: &str) -> Result<u32, sqlx::Error> {
    Ok(row.try_get::<i32, _>(column)?.max(0) as u32)
}

fn trunk_from_row(row: &PgRow) -> Result<TrunkConfig, sqlx::Error> {
    let codecs: Vec<String> = row.try_get("codecs")?;
    let codecs = codecs
        .iter()
        .map(|c| c.parse())
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| sqlx::Error::ColumnDecode {
            index: "codecs".into(),
            source: e.into(),
        })?;
    Ok(TrunkConfig {
        namespace: row.try_get("namespace")?,
        name: row.try_get("name")?,
        provider: row.try_get("provider")?,
        display_name: row.try_get("display_name")?,
        suspended: row.try_get("suspended")?,
        gateways: parse_json(row, "gateways")?,
        registrar_address: row.try_get("registrar_address")?,
        registrar_port: opt_u16(row, "registrar_port")?,
        realm: row.try_get("realm")?,
        auth_method: parse_text(row, "auth_method")?,
        registration_enabled: row.try_get("registration_enabled")?,
        registration_expires: u32_col(row, "registration_expires")?,
        inbound_enabled: row.try_get("inbound_enabled")?,
        allowed_source_cidrs: row.try_get("allowed_source_cidrs")?,
        outbound_enabled: row.try_get("outbound_enabled")?,
        dial_prefix: row.try_get("dial_prefix")?,
        strip_digits: u32_col(row, "strip_digits")?,
        prepend_digits: row.try_get("prepend_digits")?,
        max_concurrent_calls: opt_u32(row, "max_concurrent_calls")?,
        calls_per_second: opt_u32(row, "calls_per_second")?,
        codecs,
        dtmf_relay: row.try_get("dtmf_relay")?,
        rtp_timeout_seconds: u32_col(row, "rtp_timeout_seconds")?,
        options_interval_seconds: u32_col(row, "options_interval_seconds")?,
        failover_timeout_seconds: u32_col(row, "failover_timeout_seconds")?,
        backup_trunks: row.try_get("backup_trunks")?,
        rate_outbound_per_minute: row.try_get("rate_outbound_per_minute")?,
        rate_inbound_per_minute: row.try_get("rate_inbound_per_minute")?,
        rate_per_message: row.try_get("rate_per_message")?,
        currency: row.try_get("currency")?,
    })
}

fn number_from_row(row: &PgRow) -> Result<NumberConfig, sqlx::Error> {
    Ok(NumberConfig {
        namespace: row.try_get("namespace")?,
        name: row.try_get("name")?,
        number: row.try_get("number")?,
        trunk_ref: row.try_get("trunk_ref")?,
        routing_rule_ref: row.try_get("routing_rule_ref")?,
        destination: parse_opt_json(row, "destination")?,
        message_webhook: row.try_get("message_webhook")?,
        caller_id_allowed: row.try_get("caller_id_allowed")?,
    })
}

fn rule_from_row(row: &PgRow) -> Result<RuleConfig, sqlx::Error> {
    Ok(RuleConfig {
        namespace: row.try_get("namespace")?,
        name: row.try_get("name")?,
        direction: parse_text(row, "direction")?,
        priority: row.try_get("priority")?,
        match_spec: parse_json(row, "match_spec")?,
        destination: parse_opt_json(row, "destination")?,
        trunks: row.try_get("trunks")?,
        trunk_selection: parse_text(row, "trunk_selection")?,
        status_callback: row.try_get("status_callback")?,
    })
}

fn credential_from_row(row: &PgRow) -> Result<Credential, sqlx::Error> {
    Ok(Credential {
        namespace: row.try_get("namespace")?,
        trunk_name: row.try_get("trunk_name")?,
        username: row.try_get("username")?,
        password: row.try_get("password")?,
        secret_name: row.try_get("secret_name")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{credential, number, rule, trunk};
    use crate::test_support::{Change, publish};
    use switchboard_model::Direction;

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn an_empty_database_is_generation_zero(pool: PgPool) {
        let snapshot = load_snapshot(&pool).await.expect("load");
        assert_eq!(snapshot.generation(), 0);
        assert_eq!(
            (
                snapshot.trunk_count(),
                snapshot.number_count(),
                snapshot.rules().len()
            ),
            (0, 0, 0)
        );
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn loads_the_committed_rows_and_generation(pool: PgPool) {
        let mut main = trunk("default", "main");
        main.codecs = vec![switchboard_model::Codec::Pcma];
        let change = Change {
            trunks: vec![main.clone(), trunk("other", "backup")],
            numbers: vec![
                number("default", "support", "+15550001111", "main"),
                number("default", "sales", "+15550002222", "main"),
            ],
            rules: vec![
                rule("default", "to-agent", Direction::Inbound, 50),
                rule("default", "us-out", Direction::Outbound, 10),
            ],
            credentials: vec![credential("default", "main")],
            ..Change::default()
        };
        let first = publish(&pool, change, true).await;
        let second = publish(
            &pool,
            Change {
                trunks: vec![trunk("default", "late")],
                ..Change::default()
            },
            true,
        )
        .await;
        assert_eq!((first, second), (1, 2));

        let snapshot = load_snapshot(&pool).await.expect("load");
        assert_eq!(snapshot.generation(), 2);
        assert_eq!(snapshot.trunk_count(), 3);
        assert_eq!(
            snapshot.trunk("default", "main").map(|t| t.as_ref()),
            Some(&main)
        );
        assert_eq!(
            snapshot.number("+15550002222").map(|n| n.name.as_str()),
            Some("sales")
        );
        assert_eq!(
            snapshot
                .rules()
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["us-out", "to-agent"]
        );
        assert_eq!(snapshot.inbound_rules().len(), 1);
        assert_eq!(
            snapshot.rule("default", "to-agent").map(|r| r.priority),
            Some(50)
        );
        let secret = snapshot.credential("default", "main").expect("credential");
        assert_eq!(secret, &credential("default", "main"));
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn a_bad_row_names_itself_and_fails_the_whole_generation(pool: PgPool) {
        publish(
            &pool,
            Change {
                trunks: vec![trunk("default", "main")],
                ..Change::default()
            },
            false,
        )
        .await;
        let change = Change {
            sql: vec!["UPDATE trunks SET codecs = '{PCMU,G729}' WHERE name = 'main'"],
            ..Change::default()
        };
        let generation = publish(&pool, change, false).await;
        let error = load_snapshot(&pool).await.expect_err("G729 is not a codec");
        match &error {
            LoadError::Invalid {
                generation: bad,
                problem,
            } => {
                assert_eq!(*bad, generation);
                assert!(problem.starts_with("trunk default/main: "), "{problem}");
                assert!(problem.contains("G729"), "{problem}");
            }
            other => panic!("expected invalid data, got {other}"),
        }

        let change = Change {
            sql: vec![
                "UPDATE trunks SET codecs = '{PCMU}'",
                r#"INSERT INTO routing_rules (namespace, name, direction, match_spec, spec_hash, config_generation)
                   VALUES ('default', 'broken', 'inbound', '{"numbers": "not a list"}', 'h', 0)"#,
            ],
            ..Change::default()
        };
        publish(&pool, change, false).await;
        let error = load_snapshot(&pool)
            .await
            .expect_err("match_spec is malformed");
        assert!(
            error.to_string().contains("routing rule default/broken: "),
            "{error}"
        );
        assert!(error.to_string().contains("match_spec"), "{error}");
    }
}
