//! Resource status as the reconcile core records it in `resource_status`: the `Ready` condition
//! with a CamelCase reason and a message that says what to fix. Rows are written only when they
//! change, so a pass over an unchanged folder writes nothing.

use std::collections::HashMap;

use chrono::{SecondsFormat, Utc};
use sqlx::{PgConnection, Row};

use crate::crd::{Condition, ConditionStatus};
use crate::source::{Kind, ResourceKey};

/// Reasons of the `Ready` condition.
pub mod reason {
    pub const RECONCILED: &str = "Reconciled";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The spec asks for something the node does not implement (SIP over TLS).
    pub const UNSUPPORTED: &str = "Unsupported";
    pub const TRUNK_NOT_FOUND: &str = "TrunkNotFound";
    pub const ROUTING_RULE_NOT_FOUND: &str = "RoutingRuleNotFound";
    pub const ROUTING_RULE_NOT_INBOUND: &str = "RoutingRuleNotInbound";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const DUPLICATE_NUMBER: &str = "DuplicateNumber";
}

/// The observed state of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceStatus {
    pub key: ResourceKey,
    pub observed_generation: Option<i64>,
    pub ready: bool,
    pub reason: String,
    pub message: String,
    pub origin: String,
    /// Generation holding the resource's current rows; `None` when nothing is stored.
    pub config_generation: Option<i64>,
}

impl ResourceStatus {
    /// The Kubernetes-shaped conditions, keeping the transition time of an unchanged condition.
    pub fn conditions(&self, previous: Option<&StoredStatus>) -> Vec<Condition> {
        let status = if self.ready { ConditionStatus::True } else { ConditionStatus::False };
        let last_transition_time = previous
            .filter(|p| p.ready == self.ready)
            .and_then(|p| p.ready_since.clone())
            .unwrap_or_else(|| Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true));
        vec![Condition {
            type_: "Ready".into(),
            status,
            reason: self.reason.clone(),
            message: self.message.clone(),
            last_transition_time,
            observed_generation: self.observed_generation,
        }]
    }
}

/// A status row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredStatus {
    pub observed_generation: Option<i64>,
    pub ready: bool,
    pub reason: String,
    pub message: String,
    pub origin: Option<String>,
    pub config_generation: Option<i64>,
    /// `lastTransitionTime` of the stored Ready condition.
    pub ready_since: Option<String>,
}

impl StoredStatus {
    fn matches(&self, status: &ResourceStatus) -> bool {
        self.observed_generation == status.observed_generation
            && self.ready == status.ready
            && self.reason == status.reason
            && self.message == status.message
            && self.origin.as_deref() == Some(status.origin.as_str())
            && self.config_generation == status.config_generation
    }
}

fn kind_from_str(kind: &str) -> Option<Kind> {
    match kind {
        "Trunk" => Some(Kind::Trunk),
        "PhoneNumber" => Some(Kind::PhoneNumber),
        "RoutingRule" => Some(Kind::RoutingRule),
        _ => None,
    }
}

/// Every stored status row.
pub async fn load(conn: &mut PgConnection) -> Result<HashMap<ResourceKey, StoredStatus>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT kind, namespace, name, observed_generation, ready, reason, message, origin, config_generation,
                (SELECT c->>'lastTransitionTime' FROM jsonb_array_elements(conditions) c
                  WHERE c->>'type' = 'Ready' LIMIT 1) AS ready_since
           FROM resource_status",
    )
    .fetch_all(conn)
    .await?;
    let mut stored = HashMap::with_capacity(rows.len());
    for row in rows {
        let Some(kind) = kind_from_str(row.try_get("kind")?) else { continue };
        let key = ResourceKey { kind, namespace: row.try_get("namespace")?, name: row.try_get("name")? };
        stored.insert(
            key,
            StoredStatus {
                observed_generation: row.try_get("observed_generation")?,
                ready: row.try_get("ready")?,
                reason: row.try_get("reason")?,
                message: row.try_get("message")?,
                origin: row.try_get("origin")?,
                config_generation: row.try_get("config_generation")?,
                ready_since: row.try_get("ready_since")?,
            },
        );
    }
    Ok(stored)
}

/// Writes the statuses that differ from what is stored, in one statement. Returns how many.
pub(crate) async fn write_changed(
    conn: &mut PgConnection,
    statuses: &[ResourceStatus],
    stored: &HashMap<ResourceKey, StoredStatus>,
) -> Result<usize, sqlx::Error> {
    let changed: Vec<&ResourceStatus> =
        statuses.iter().filter(|s| stored.get(&s.key).is_none_or(|p| !p.matches(s))).collect();
    if changed.is_empty() {
        return Ok(0);
    }
    let mut kinds = Vec::with_capacity(changed.len());
    let mut namespaces = Vec::with_capacity(changed.len());
    let mut names = Vec::with_capacity(changed.len());
    let mut observed = Vec::with_capacity(changed.len());
    let mut ready = Vec::with_capacity(changed.len());
    let mut reasons = Vec::with_capacity(changed.len());
    let mut messages = Vec::with_capacity(changed.len());
    let mut conditions = Vec::with_capacity(changed.len());
    let mut origins = Vec::with_capacity(changed.len());
    let mut generations = Vec::with_capacity(changed.len());
    for status in &changed {
        kinds.push(status.key.kind.as_str());
        namespaces.push(status.key.namespace.as_str());
        names.push(status.key.name.as_str());
        observed.push(status.observed_generation);
        ready.push(status.ready);
        reasons.push(status.reason.as_str());
        messages.push(status.message.as_str());
        conditions
            .push(serde_json::to_value(status.conditions(stored.get(&status.key))).expect("conditions serialize"));
        origins.push(status.origin.as_str());
        generations.push(status.config_generation);
    }
    sqlx::query(
        "INSERT INTO resource_status (kind, namespace, name, observed_generation, ready, reason, message,
                conditions, origin, config_generation, updated_at)
         SELECT *, now() FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bool[], $6::text[],
                $7::text[], $8::jsonb[], $9::text[], $10::bigint[])
         ON CONFLICT (kind, namespace, name) DO UPDATE SET
            observed_generation = EXCLUDED.observed_generation, ready = EXCLUDED.ready,
            reason = EXCLUDED.reason, message = EXCLUDED.message, conditions = EXCLUDED.conditions,
            origin = EXCLUDED.origin, config_generation = EXCLUDED.config_generation, updated_at = now()",
    )
    .bind(&kinds)
    .bind(&namespaces)
    .bind(&names)
    .bind(&observed)
    .bind(&ready)
    .bind(&reasons)
    .bind(&messages)
    .bind(&conditions)
    .bind(&origins)
    .bind(&generations)
    .execute(conn)
    .await?;
    Ok(changed.len())
}

/// Removes the status of a resource that is gone.
pub async fn delete(conn: &mut PgConnection, key: &ResourceKey) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM resource_status WHERE kind = $1 AND namespace = $2 AND name = $3")
        .bind(key.kind.as_str())
        .bind(&key.namespace)
        .bind(&key.name)
        .execute(conn)
        .await?;
    Ok(())
}
