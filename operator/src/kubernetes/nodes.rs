//! What the SIP nodes report in Postgres (heartbeats, applied generations, registrations,
//! OPTIONS results, calls), read with a bounded poll and summarised per trunk. Only facts that
//! change when something real happens go into a status: round-trip times, which move with every
//! probe, stay out, so that an unchanged cluster causes no status writes.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{PgPool, Row};

/// Live nodes and per-trunk facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// For every live node, the configuration generation it applied (`None`: nothing yet).
    pub live_applied: Vec<Option<i64>>,
    /// By (namespace, trunk name).
    pub trunks: HashMap<(String, String), TrunkFacts>,
}

/// What the live nodes report about one trunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrunkFacts {
    pub registered: u32,
    pub registering: u32,
    pub failed: u32,
    /// The most recent registration failure, as the node recorded it.
    pub last_error: Option<String>,
    pub reachable: u32,
    pub unreachable: u32,
    /// Why a node last found the trunk unreachable, when it knows (a refused TLS handshake).
    pub unreachable_reason: Option<String>,
    pub active_calls: u32,
    pub calls_last_hour: u32,
}

impl NodeFacts {
    /// Live nodes, and how many applied generation `generation` or later.
    pub fn applied(&self, generation: i64) -> (u32, u32) {
        let applied = self.live_applied.iter().filter(|a| a.is_some_and(|a| a >= generation)).count();
        (applied as u32, self.live_applied.len() as u32)
    }

    pub fn trunk(&self, namespace: &str, name: &str) -> TrunkFacts {
        self.trunks.get(&(namespace.to_string(), name.to_string())).cloned().unwrap_or_default()
    }

    /// Reads the facts. A node is live when it has not stopped and its last heartbeat is younger
    /// than `node_timeout`; a draining node does not count for `live_applied`.
    pub async fn load(pool: &PgPool, node_timeout: Duration) -> Result<Self, sqlx::Error> {
        let timeout = node_timeout.as_secs_f64();
        let mut conn = pool.acquire().await?;
        let live_applied = sqlx::query(
            "SELECT CASE WHEN applied_at IS NULL THEN NULL ELSE applied_generation END AS applied
               FROM nodes
              WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)
                -- a draining node keeps its calls but is on its way out: Synced does not wait for it
                AND draining_at IS NULL
              ORDER BY node_id",
        )
        .bind(timeout)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get::<Option<i64>, _>("applied"))
        .collect::<Result<Vec<_>, _>>()?;

        let mut trunks: HashMap<(String, String), TrunkFacts> = HashMap::new();
        let registrations = sqlx::query(
            "SELECT r.namespace, r.trunk_name,
                    count(*) FILTER (WHERE r.state = 'registered' AND (r.expires_at IS NULL OR r.expires_at > now())) AS registered,
                    count(*) FILTER (WHERE r.state = 'registering') AS registering,
                    count(*) FILTER (WHERE r.state = 'failed') AS failed,
                    (array_agg(r.last_error ORDER BY r.last_attempt_at DESC NULLS LAST, r.node_id)
                        FILTER (WHERE r.state = 'failed' AND r.last_error IS NOT NULL))[1] AS last_error,
                    count(*) FILTER (WHERE r.reachable) AS reachable,
                    count(*) FILTER (WHERE r.reachable = FALSE) AS unreachable,
                    (array_agg(r.unreachable_reason ORDER BY r.last_options_at DESC NULLS LAST, r.node_id)
                        FILTER (WHERE r.reachable = FALSE AND r.unreachable_reason IS NOT NULL))[1] AS unreachable_reason
               FROM registrations r JOIN nodes n USING (node_id)
              WHERE n.stopped_at IS NULL AND n.heartbeat_at > now() - make_interval(secs => $1)
              GROUP BY r.namespace, r.trunk_name",
        )
        .bind(timeout)
        .fetch_all(&mut *conn)
        .await?;
        for row in registrations {
            let facts = trunks.entry((row.try_get("namespace")?, row.try_get("trunk_name")?)).or_default();
            facts.registered = row.try_get::<i64, _>("registered")? as u32;
            facts.registering = row.try_get::<i64, _>("registering")? as u32;
            facts.failed = row.try_get::<i64, _>("failed")? as u32;
            facts.last_error = row.try_get("last_error")?;
            facts.reachable = row.try_get::<i64, _>("reachable")? as u32;
            facts.unreachable = row.try_get::<i64, _>("unreachable")? as u32;
            facts.unreachable_reason = row.try_get("unreachable_reason")?;
        }

        let active = sqlx::query(
            "SELECT c.namespace, c.trunk_name, count(*) AS calls
               FROM active_calls c JOIN nodes n USING (node_id)
              WHERE c.namespace IS NOT NULL AND c.trunk_name IS NOT NULL
                AND n.stopped_at IS NULL AND n.heartbeat_at > now() - make_interval(secs => $1)
              GROUP BY c.namespace, c.trunk_name",
        )
        .bind(timeout)
        .fetch_all(&mut *conn)
        .await?;
        for row in active {
            let facts = trunks.entry((row.try_get("namespace")?, row.try_get("trunk_name")?)).or_default();
            facts.active_calls = row.try_get::<i64, _>("calls")? as u32;
        }

        let recent = sqlx::query(
            "SELECT namespace, trunk_name, count(DISTINCT call_id) AS calls
               FROM cdrs
              WHERE setup_at > now() - interval '1 hour' AND namespace IS NOT NULL AND trunk_name IS NOT NULL
              GROUP BY namespace, trunk_name",
        )
        .fetch_all(&mut *conn)
        .await?;
        for row in recent {
            let facts = trunks.entry((row.try_get("namespace")?, row.try_get("trunk_name")?)).or_default();
            facts.calls_last_hour = row.try_get::<i64, _>("calls")? as u32;
        }
        Ok(Self { live_applied, trunks })
    }
}
