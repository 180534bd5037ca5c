//! The configuration tables as a whole, for the reconcile: deleting a resource's row, reading
//! every row's spec hash to diff against, and the configuration generation that a committed
//! change bumps and announces to the nodes.

use sqlx::{PgConnection, Row};

/// The stored hash and generation that tell whether a resource's rows are current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHash {
    pub namespace: String,
    pub name: String,
    pub spec_hash: String,
    /// The configuration generation that last wrote the row.
    pub config_generation: i64,
}

/// The three configuration tables, one per resource kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConfigTable {
    Trunks,
    PhoneNumbers,
    RoutingRules,
}

impl ConfigTable {
    fn delete_sql(self) -> &'static str {
        match self {
            Self::Trunks => "DELETE FROM trunks WHERE namespace = $1 AND name = $2",
            Self::PhoneNumbers => "DELETE FROM phone_numbers WHERE namespace = $1 AND name = $2",
            Self::RoutingRules => "DELETE FROM routing_rules WHERE namespace = $1 AND name = $2",
        }
    }

    fn hashes_sql(self) -> &'static str {
        match self {
            Self::Trunks => "SELECT namespace, name, spec_hash, config_generation FROM trunks",
            Self::PhoneNumbers => "SELECT namespace, name, spec_hash, config_generation FROM phone_numbers",
            Self::RoutingRules => "SELECT namespace, name, spec_hash, config_generation FROM routing_rules",
        }
    }

    /// Deletes a resource's row; returns whether there was one.
    pub async fn delete(self, conn: &mut PgConnection, namespace: &str, name: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(self.delete_sql()).bind(namespace).bind(name).execute(conn).await?;
        Ok(done.rows_affected() > 0)
    }

    /// The stored spec hash of every row, to tell what changed without reading whole rows.
    pub async fn hashes(self, conn: &mut PgConnection) -> Result<Vec<StoredHash>, sqlx::Error> {
        let rows = sqlx::query(self.hashes_sql()).fetch_all(conn).await?;
        rows.iter()
            .map(|row| {
                Ok(StoredHash {
                    namespace: row.try_get("namespace")?,
                    name: row.try_get("name")?,
                    spec_hash: row.try_get("spec_hash")?,
                    config_generation: row.try_get("config_generation")?,
                })
            })
            .collect()
    }
}

/// Bumps the configuration generation inside the caller's transaction and returns the new value.
pub async fn bump_generation(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE config_state SET generation = generation + 1, updated_at = now() WHERE singleton RETURNING generation",
    )
    .fetch_one(conn)
    .await
}

/// Announces a committed generation to listening nodes. Inside a transaction the notification
/// is delivered at commit, so a node never sees a generation before its rows.
pub async fn notify_generation(conn: &mut PgConnection, generation: i64) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::db::CONFIG_CHANNEL)
        .bind(generation.to_string())
        .execute(conn)
        .await?;
    Ok(())
}
