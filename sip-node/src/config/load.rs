//! Reads one consistent snapshot from Postgres.
//!
//! The generation and the four configuration tables are read in one `REPEATABLE READ`
//! transaction, so the snapshot is exactly what the operator committed as of that generation
//! even while it keeps writing. The SQL and the row decoding are `switchboard_model`'s.

use std::time::Duration;

use sqlx::PgPool;
use switchboard_model::db::current_generation;
use switchboard_model::{Credential, NumberConfig, RuleConfig, TrunkConfig, TrunkTls};

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
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let generation = current_generation(&mut *tx).await?;
    let invalid = |error| rows_invalid(generation, error);
    let trunks = TrunkConfig::load_all(&mut *tx).await.map_err(invalid)?;
    let numbers = NumberConfig::load_all(&mut *tx).await.map_err(invalid)?;
    let rules = RuleConfig::load_all(&mut *tx).await.map_err(invalid)?;
    let credentials = Credential::load_all(&mut *tx).await.map_err(invalid)?;
    let trunk_tls = TrunkTls::load_all(&mut *tx).await.map_err(invalid)?;
    tx.commit().await?;
    Ok(Snapshot::from_parts(generation, trunks, numbers, rules, credentials)?.with_trunk_tls(trunk_tls))
}

/// Classifies an error of a model `load_all`: a row that does not decode
/// ([`sqlx::Error::Decode`], whose message names the row) makes the whole generation invalid;
/// anything else is the database's and worth retrying.
fn rows_invalid(generation: i64, error: sqlx::Error) -> LoadError {
    match error {
        sqlx::Error::Decode(problem) => LoadError::Invalid { generation, problem: problem.to_string() },
        other => LoadError::Database(other),
    }
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
        assert_eq!((snapshot.trunk_count(), snapshot.number_count(), snapshot.rules().len()), (0, 0, 0));
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
        let second = publish(&pool, Change { trunks: vec![trunk("default", "late")], ..Change::default() }, true).await;
        assert_eq!((first, second), (1, 2));

        let snapshot = load_snapshot(&pool).await.expect("load");
        assert_eq!(snapshot.generation(), 2);
        assert_eq!(snapshot.trunk_count(), 3);
        assert_eq!(snapshot.trunk("default", "main").map(|t| t.as_ref()), Some(&main));
        assert_eq!(snapshot.number("+15550002222").map(|n| n.name.as_str()), Some("sales"));
        assert_eq!(snapshot.rules().iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["us-out", "to-agent"]);
        assert_eq!(snapshot.inbound_rules().len(), 1);
        assert_eq!(snapshot.rule("default", "to-agent").map(|r| r.priority), Some(50));
        let secret = snapshot.credential("default", "main").expect("credential");
        assert_eq!(secret, &credential("default", "main"));
    }

    #[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
    async fn a_bad_row_names_itself_and_fails_the_whole_generation(pool: PgPool) {
        publish(&pool, Change { trunks: vec![trunk("default", "main")], ..Change::default() }, false).await;
        let change =
            Change { sql: vec!["UPDATE trunks SET codecs = '{PCMU,G729}' WHERE name = 'main'"], ..Change::default() };
        let generation = publish(&pool, change, false).await;
        let error = load_snapshot(&pool).await.expect_err("G729 is not a codec");
        match &error {
            LoadError::Invalid { generation: bad, problem } => {
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
        let error = load_snapshot(&pool).await.expect_err("match_spec is malformed");
        assert!(error.to_string().contains("routing rule default/broken: "), "{error}");
        assert!(error.to_string().contains("match_spec"), "{error}");
    }
}
