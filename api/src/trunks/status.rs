//! `GET /api/trunks/{trunk_id}/status` and `GET /api/trunks/status`: what the nodes report about
//! each trunk (registrations, OPTIONS reachability, active calls) with its resource conditions.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::find;
use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::store::StoredTrunk;
use switchboard_operator::crd::Condition;

/// One node's registration towards the trunk.
#[derive(Serialize, ToSchema, Debug)]
pub struct RegistrationState {
    pub node_id: String,
    /// registering, registered, failed or unregistered.
    pub state: String,
    pub registrar: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Whether OPTIONS keepalives get answers.
    pub reachable: Option<bool>,
    pub options_rtt_ms: Option<i32>,
    pub updated_at: DateTime<Utc>,
}

/// What is known about a trunk right now.
#[derive(Serialize, ToSchema, Debug)]
pub struct TrunkStatusResponse {
    pub trunk_id: String,
    pub provider: String,
    /// active, suspended, pending or error.
    pub status: String,
    pub ready: bool,
    /// The `Ready` reason and message, when the reconcile has seen the trunk.
    pub reason: Option<String>,
    pub message: Option<String>,
    /// True when at least one live node holds a registration (null when none registers).
    pub registered: Option<bool>,
    /// True when at least one node gets OPTIONS answers (null before any probe).
    pub reachable: Option<bool>,
    pub active_calls: i64,
    pub last_error: Option<String>,
    pub registrations: Vec<RegistrationState>,
    /// The resource's conditions (Ready, Synced, Registered, Reachable).
    #[schema(value_type = Vec<Object>)]
    pub conditions: Vec<Condition>,
}

/// The rows trunk statuses are built from, fetched with three queries whatever the number of
/// trunks (`GET /api/trunks/status` would otherwise cost three queries per trunk).
#[derive(Default)]
struct StatusRows {
    resources: HashMap<TrunkKey, ResourceRow>,
    registrations: HashMap<TrunkKey, Vec<RegistrationState>>,
    active: HashMap<TrunkKey, i64>,
}

/// (namespace, name) of a trunk.
type TrunkKey = (String, String);

/// A trunk's row of `resource_status`: ready, reason, message, conditions.
type ResourceRow = (bool, String, String, Vec<Condition>);

impl StatusRows {
    /// Loads the rows of one trunk (`Some`) or of every trunk.
    async fn load(state: &AppState, only: Option<&StoredTrunk>) -> Result<StatusRows, ApiError> {
        let (filter, filter_r, filter_active) = match only {
            Some(_) => (
                " AND namespace = $1 AND name = $2",
                " WHERE r.namespace = $1 AND r.trunk_name = $2",
                " AND namespace = $1 AND trunk_name = $2",
            ),
            None => ("", "", ""),
        };
        let resources_sql = format!(
            "SELECT namespace, name, ready, reason, message, conditions FROM resource_status WHERE kind = 'Trunk'{filter}"
        );
        let registrations_sql = format!(
            "SELECT r.namespace, r.trunk_name, r.node_id, r.state, r.registrar, r.expires_at, r.last_error, r.reachable,
                    r.options_rtt_ms, r.updated_at
               FROM registrations r JOIN nodes n ON n.node_id = r.node_id AND n.stopped_at IS NULL{filter_r}
              ORDER BY r.node_id"
        );
        let active_sql = format!(
            "SELECT namespace, trunk_name, count(*) FROM active_calls
              WHERE node_id IN (SELECT node_id FROM live_nodes) AND namespace IS NOT NULL AND trunk_name IS NOT NULL{filter_active}
              GROUP BY namespace, trunk_name"
        );
        let mut out = StatusRows::default();
        let fetch = |sql: &str| {
            let query = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()));
            match only {
                Some(trunk) => query.bind(trunk.namespace.clone()).bind(trunk.name.clone()),
                None => query,
            }
        };
        for row in fetch(&resources_sql).fetch_all(&state.pool).await? {
            let conditions: serde_json::Value = row.try_get("conditions")?;
            out.resources.insert(
                (row.try_get("namespace")?, row.try_get("name")?),
                (
                    row.try_get("ready")?,
                    row.try_get("reason")?,
                    row.try_get("message")?,
                    serde_json::from_value::<Vec<Condition>>(conditions).unwrap_or_default(),
                ),
            );
        }
        for row in fetch(&registrations_sql).fetch_all(&state.pool).await? {
            out.registrations.entry((row.try_get("namespace")?, row.try_get("trunk_name")?)).or_default().push(
                RegistrationState {
                    node_id: row.try_get("node_id")?,
                    state: row.try_get("state")?,
                    registrar: row.try_get("registrar")?,
                    expires_at: row.try_get("expires_at")?,
                    last_error: row.try_get("last_error")?,
                    reachable: row.try_get("reachable")?,
                    options_rtt_ms: row.try_get("options_rtt_ms")?,
                    updated_at: row.try_get("updated_at")?,
                },
            );
        }
        for row in fetch(&active_sql).fetch_all(&state.pool).await? {
            out.active.insert((row.try_get("namespace")?, row.try_get("trunk_name")?), row.try_get(2)?);
        }
        Ok(out)
    }
}

fn status_of(rows: &mut StatusRows, trunk: &StoredTrunk) -> TrunkStatusResponse {
    let key = (trunk.namespace.clone(), trunk.name.clone());
    let (ready, reason, message, conditions) = match rows.resources.remove(&key) {
        Some((ready, reason, message, conditions)) => (ready, Some(reason), Some(message), conditions),
        None => (false, None, None, Vec::new()),
    };
    let registrations = rows.registrations.remove(&key).unwrap_or_default();
    let active_calls = rows.active.get(&key).copied().unwrap_or(0);
    let registering = trunk.spec.registration.as_ref().is_some_and(|r| r.enabled);
    let registered = registering.then(|| registrations.iter().any(|r| r.state == "registered"));
    let probes: Vec<bool> = registrations.iter().filter_map(|r| r.reachable).collect();
    let reachable = (!probes.is_empty()).then(|| probes.iter().any(|r| *r));
    let last_error = registrations
        .iter()
        .filter_map(|r| r.last_error.clone())
        .next()
        .or_else(|| (!ready).then(|| message.clone()).flatten());
    let status = if trunk.spec.suspend {
        "suspended"
    } else if reason.is_none() {
        "pending"
    } else if ready {
        "active"
    } else {
        "error"
    };
    TrunkStatusResponse {
        trunk_id: trunk.trunk_id.clone(),
        provider: trunk.spec.provider.clone(),
        status: status.into(),
        ready,
        reason,
        message,
        registered,
        reachable,
        active_calls,
        last_error,
        registrations,
        conditions,
    }
}

/// Registration, reachability, active calls, last error and conditions of one trunk.
#[utoipa::path(get, path = "/api/trunks/{trunk_id}/status", tag = "trunks",
    params(("trunk_id" = String, Path, description = "The trunk's id")),
    responses((status = 200, body = TrunkStatusResponse), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TrunkStatusResponse>, ApiError> {
    let trunk = find(&state, &id).await?;
    let mut rows = StatusRows::load(&state, Some(&trunk)).await?;
    Ok(Json(status_of(&mut rows, &trunk)))
}

/// The status of every trunk.
#[utoipa::path(get, path = "/api/trunks/status", tag = "trunks",
    responses((status = 200, body = [TrunkStatusResponse])), security(("bearer" = [])))]
pub async fn status_all(State(state): State<AppState>) -> Result<Json<Vec<TrunkStatusResponse>>, ApiError> {
    let mut trunks = state.store.list(&state.namespace).await?;
    trunks.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rows = StatusRows::load(&state, None).await?;
    Ok(Json(trunks.iter().map(|trunk| status_of(&mut rows, trunk)).collect()))
}
