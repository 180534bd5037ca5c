//! `/api/trunks`: the seed's trunk endpoints over the `Trunk` resource.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::store::{StoredTrunk, TrunkWrite, gitops_conflict};
use crate::trunk_model::{self, Counters, TrunkFields, TrunkResponse, name_of};
use switchboard_operator::crd::Condition;
use switchboard_operator::source::{Kind, ResourceKey, Spec};
use switchboard_operator::validate;

/// Resource status rows and call counters for the response.
pub(crate) struct Observed {
    status: HashMap<String, (bool, String)>,
    counters: HashMap<String, Counters>,
}

async fn observed(state: &AppState, names: Option<&str>) -> Result<Observed, ApiError> {
    let namespace = &state.namespace;
    let rows = sqlx::query(
        "SELECT name, ready, reason FROM resource_status
          WHERE kind = 'Trunk' AND namespace = $1 AND ($2::text IS NULL OR name = $2)",
    )
    .bind(namespace)
    .bind(names)
    .fetch_all(&state.pool)
    .await?;
    let mut status = HashMap::new();
    for row in rows {
        status.insert(row.try_get::<String, _>("name")?, (row.try_get("ready")?, row.try_get("reason")?));
    }
    // Today's CDRs by the setup_at index (not a join of every trunk with its CDRs), plus the
    // active calls.
    let rows = sqlx::query(
        "SELECT name, sum(current)::bigint AS current, sum(total)::bigint AS total, sum(answered)::bigint AS answered
           FROM (SELECT trunk_name AS name, 0::bigint AS current, count(*) AS total, count(answer_at) AS answered
                   FROM cdrs
                  WHERE namespace = $1 AND trunk_name IS NOT NULL AND ($2::text IS NULL OR trunk_name = $2)
                    AND setup_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                  GROUP BY trunk_name
                 UNION ALL
                 SELECT trunk_name, count(*), 0, 0 FROM active_calls
                  WHERE node_id IN (SELECT node_id FROM live_nodes) AND namespace = $1 AND trunk_name IS NOT NULL AND ($2::text IS NULL OR trunk_name = $2)
                  GROUP BY trunk_name) per_source
          GROUP BY name",
    )
    .bind(namespace)
    .bind(names)
    .fetch_all(&state.pool)
    .await?;
    let mut counters = HashMap::new();
    for row in rows {
        counters.insert(
            row.try_get::<String, _>("name")?,
            Counters {
                current: row.try_get("current")?,
                total: row.try_get("total")?,
                successful: row.try_get("answered")?,
                failed: row.try_get::<i64, _>("total")? - row.try_get::<i64, _>("answered")?,
            },
        );
    }
    Ok(Observed { status, counters })
}

/// How long the list's status and counters are reused: they aggregate today's CDRs, which under
/// load would otherwise be one aggregate per request; the trunks themselves are always read fresh.
const OBSERVED_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The status and counters of every trunk, computed at most once per [`OBSERVED_TTL`] (one
/// request computes, concurrent ones wait for it).
async fn observed_all(state: &AppState) -> Result<std::sync::Arc<Observed>, ApiError> {
    let mut cached = state.observed.lock().await;
    if let Some((at, observed)) = cached.as_ref()
        && at.elapsed() < OBSERVED_TTL
    {
        return Ok(observed.clone());
    }
    let observed = std::sync::Arc::new(observed(state, None).await?);
    *cached = Some((std::time::Instant::now(), observed.clone()));
    Ok(observed)
}

fn to_response(trunk: &StoredTrunk, observed: &Observed) -> TrunkResponse {
    let status = if trunk.spec.suspend {
        "suspended"
    } else {
        match observed.status.get(&trunk.name) {
            Some((true, _)) => "active",
            Some((false, _)) => "error",
            None => "pending",
        }
    };
    trunk_model::response(
        &trunk.trunk_id,
        &trunk.namespace,
        &trunk.name,
        &trunk.spec,
        status,
        observed.counters.get(&trunk.name).copied().unwrap_or_default(),
        trunk.gitops_owner.clone(),
    )
}

async fn find(state: &AppState, id: &str) -> Result<StoredTrunk, ApiError> {
    let name = name_of(id);
    state
        .store
        .get(&state.namespace, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no trunk {id:?} (Trunk {}/{name})", state.namespace)))
}

fn check_id(id: &str) -> Result<(), ApiError> {
    let name = name_of(id);
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "trunk_id",
            format!(
                "{id:?} is not a valid trunk id: use 1 to 63 letters, digits, '-' or '_', starting and ending with a letter or digit"
            ),
        ))
    }
}

/// Validates `spec` as the operator would; a 422 with the API field on failure.
fn validate_spec(
    namespace: &str,
    name: &str,
    spec: &switchboard_operator::crd::TrunkSpec,
    fields: &TrunkFields,
) -> Result<(), ApiError> {
    let key = ResourceKey { kind: Kind::Trunk, namespace: namespace.into(), name: name.into() };
    // Round-trip through the manifest parser too, so that the stored YAML reads back as it was
    // validated.
    let value = serde_json::to_value(spec).map_err(|e| ApiError::internal("cannot render the spec", e))?;
    let parsed =
        validate::parse_spec(&key, value).map_err(|invalid| trunk_model::validation_error(&invalid.errors, fields))?;
    validate::validate(&key, &parsed).map_err(|invalid| trunk_model::validation_error(&invalid.errors, fields))?;
    let Spec::Trunk(_) = parsed else { unreachable!("a Trunk key parses a Trunk spec") };
    Ok(())
}

/// Create a trunk.
#[utoipa::path(post, path = "/api/trunks", tag = "trunks", request_body = TrunkFields,
    responses(
        (status = 201, description = "Created; the reconcile applies it shortly", body = TrunkResponse),
        (status = 409, description = "A trunk with this id exists", body = ErrorBody),
        (status = 400, description = "The trunk asks for something Switchboard does not implement (`unsupported`: transport TLS, authMethod certificate)", body = ErrorBody),
        (status = 422, description = "Invalid trunk; `field` names the first problem", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    ApiJson(mut fields): ApiJson<TrunkFields>,
) -> Result<(StatusCode, Json<TrunkResponse>), ApiError> {
    let password = fields.take_password();
    let Some(id) = fields.trunk_id.clone() else {
        return Err(ApiError::invalid("trunk_id", "trunk_id is required, e.g. \"skyetel_main\""));
    };
    check_id(&id)?;
    for required in [
        ("provider", fields.provider.is_none()),
        ("proxy_address", fields.proxy_address.is_none() && fields.gateways.is_none()),
    ] {
        if required.1 {
            return Err(ApiError::invalid(required.0, format!("{} is required", required.0)));
        }
    }
    let name = name_of(&id);
    let _guard = state.write_lock.lock().await;
    if let Some(existing) = state.store.get(&state.namespace, &name).await? {
        return Err(ApiError::conflict(
            "already_exists",
            format!(
                "trunk {:?} already exists (Trunk {}/{name}); change it with PUT /api/trunks/{}",
                existing.trunk_id, state.namespace, existing.trunk_id
            ),
        ));
    }
    let mut spec = trunk_model::default_spec();
    trunk_model::apply_fields(&mut spec, &name, &fields, password.is_some(), true)?;
    validate_spec(&state.namespace, &name, &spec, &fields)?;
    let write =
        TrunkWrite { namespace: state.namespace.clone(), name: name.clone(), trunk_id: id.clone(), spec, password };
    let spec = write.spec.clone();
    state.store.put(write).await?;
    tracing::info!(trunk = %name, store = %state.store.describe(), "trunk created");
    let stored = StoredTrunk { namespace: state.namespace.clone(), name, trunk_id: id, spec, gitops_owner: None };
    let observed = Observed { status: HashMap::new(), counters: HashMap::new() };
    Ok((StatusCode::CREATED, Json(to_response(&stored, &observed))))
}

/// List trunks.
#[utoipa::path(get, path = "/api/trunks", tag = "trunks",
    responses((status = 200, body = [TrunkResponse])), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<TrunkResponse>>, ApiError> {
    let mut trunks = state.store.list(&state.namespace).await?;
    trunks.sort_by(|a, b| a.name.cmp(&b.name));
    let observed = observed_all(&state).await?;
    Ok(Json(trunks.iter().map(|t| to_response(t, &observed)).collect()))
}

/// One trunk.
#[utoipa::path(get, path = "/api/trunks/{trunk_id}", tag = "trunks",
    params(("trunk_id" = String, Path, description = "The trunk's id")),
    responses((status = 200, body = TrunkResponse), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<TrunkResponse>, ApiError> {
    let trunk = find(&state, &id).await?;
    let observed = observed(&state, Some(&trunk.name)).await?;
    Ok(Json(to_response(&trunk, &observed)))
}

/// Change a trunk: only the given fields change.
#[utoipa::path(put, path = "/api/trunks/{trunk_id}", tag = "trunks", request_body = TrunkFields,
    params(("trunk_id" = String, Path, description = "The trunk's id")),
    responses(
        (status = 200, body = TrunkResponse),
        (status = 404, body = ErrorBody),
        (status = 400, description = "Unsupported value (`unsupported`: transport TLS, authMethod certificate)", body = ErrorBody),
        (status = 409, description = "Managed by Argo CD or Flux", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(mut fields): ApiJson<TrunkFields>,
) -> Result<Json<TrunkResponse>, ApiError> {
    let password = fields.take_password();
    let _guard = state.write_lock.lock().await;
    let trunk = find(&state, &id).await?;
    if let Some(given) = &fields.trunk_id
        && name_of(given) != trunk.name
    {
        return Err(ApiError::invalid("trunk_id", "trunk_id cannot be changed; create a new trunk instead"));
    }
    if let Some(owner) = &trunk.gitops_owner {
        return Err(gitops_conflict(&trunk.namespace, &trunk.name, owner));
    }
    let mut spec = trunk.spec.clone();
    trunk_model::apply_fields(&mut spec, &trunk.name, &fields, password.is_some(), false)?;
    validate_spec(&trunk.namespace, &trunk.name, &spec, &fields)?;
    write(&state, &trunk, spec.clone(), password).await?;
    tracing::info!(trunk = %trunk.name, "trunk updated");
    let observed = observed(&state, Some(&trunk.name)).await?;
    Ok(Json(to_response(&StoredTrunk { spec, ..trunk }, &observed)))
}

async fn write(
    state: &AppState,
    trunk: &StoredTrunk,
    spec: switchboard_operator::crd::TrunkSpec,
    password: Option<String>,
) -> Result<(), ApiError> {
    state
        .store
        .put(TrunkWrite {
            namespace: trunk.namespace.clone(),
            name: trunk.name.clone(),
            trunk_id: trunk.trunk_id.clone(),
            spec,
            password,
        })
        .await
}

/// Delete a trunk (and its password Secret when the API wrote it beside the trunk).
#[utoipa::path(delete, path = "/api/trunks/{trunk_id}", tag = "trunks",
    params(("trunk_id" = String, Path, description = "The trunk's id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let _guard = state.write_lock.lock().await;
    let trunk = find(&state, &id).await?;
    if let Some(owner) = &trunk.gitops_owner {
        return Err(gitops_conflict(&trunk.namespace, &trunk.name, owner));
    }
    if state.store.delete(&trunk.namespace, &trunk.name).await? {
        tracing::info!(trunk = %trunk.name, "trunk deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no trunk {id:?}")))
    }
}

/// Activate a trunk: clears `suspend`.
#[utoipa::path(post, path = "/api/trunks/{trunk_id}/activate", tag = "trunks",
    params(("trunk_id" = String, Path, description = "The trunk's id")),
    responses((status = 200, body = TrunkResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn activate(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<TrunkResponse>, ApiError> {
    let _guard = state.write_lock.lock().await;
    let trunk = find(&state, &id).await?;
    if trunk.spec.suspend {
        if let Some(owner) = &trunk.gitops_owner {
            return Err(gitops_conflict(&trunk.namespace, &trunk.name, owner));
        }
        let mut spec = trunk.spec.clone();
        spec.suspend = false;
        write(&state, &trunk, spec, None).await?;
        tracing::info!(trunk = %trunk.name, "trunk activated");
    }
    let mut spec = trunk.spec.clone();
    spec.suspend = false;
    let observed = observed(&state, Some(&trunk.name)).await?;
    Ok(Json(to_response(&StoredTrunk { spec, ..trunk }, &observed)))
}

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

/// Today's figures of one trunk (or the total).
#[derive(Serialize, ToSchema, Debug, Default, Clone)]
pub struct TrunkStats {
    /// The trunk's id; absent in the total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trunk_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Call attempts since midnight UTC.
    pub calls: i64,
    pub answered: i64,
    pub failed: i64,
    /// Answer-seizure ratio, 0..1 (null without calls).
    pub asr: Option<f64>,
    /// Average call duration of answered calls, seconds (null without answered calls).
    pub acd_seconds: Option<f64>,
    pub active_calls: i64,
    pub minutes: f64,
    /// Decimal string, e.g. "1.234500".
    pub cost: String,
    pub currency: String,
}

/// Per trunk and in total, since midnight UTC.
#[derive(Serialize, ToSchema, Debug)]
pub struct StatsSummary {
    pub since: DateTime<Utc>,
    pub trunks: Vec<TrunkStats>,
    pub total: TrunkStats,
}

/// Calls, answered, ASR, ACD, active calls, minutes and cost today, per trunk and in total.
#[utoipa::path(get, path = "/api/trunks/stats/summary", tag = "trunks",
    responses((status = 200, body = StatsSummary)), security(("bearer" = [])))]
pub async fn stats_summary(State(state): State<AppState>) -> Result<Json<StatsSummary>, ApiError> {
    let since: DateTime<Utc> =
        sqlx::query_scalar("SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'")
            .fetch_one(&state.pool)
            .await?;
    let rows = sqlx::query(
        "SELECT trunk_name, count(*) AS calls, count(answer_at) AS answered,
                coalesce(sum(billable_seconds) FILTER (WHERE answer_at IS NOT NULL), 0)::bigint AS seconds,
                coalesce(sum(cost), 0)::text AS cost, min(currency) AS currency
           FROM cdrs WHERE namespace = $1 AND setup_at >= $2 AND trunk_name IS NOT NULL
          GROUP BY trunk_name",
    )
    .bind(&state.namespace)
    .bind(since)
    .fetch_all(&state.pool)
    .await?;
    let mut by_trunk: HashMap<String, (i64, i64, i64, rust_decimal::Decimal, String)> = HashMap::new();
    for row in rows {
        let cost: String = row.try_get("cost")?;
        by_trunk.insert(
            row.try_get("trunk_name")?,
            (
                row.try_get("calls")?,
                row.try_get("answered")?,
                row.try_get("seconds")?,
                cost.parse().unwrap_or_default(),
                row.try_get::<Option<String>, _>("currency")?.unwrap_or_else(|| "USD".into()),
            ),
        );
    }
    let active: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT trunk_name, count(*) FROM active_calls
          WHERE node_id IN (SELECT node_id FROM live_nodes) AND namespace = $1 AND trunk_name IS NOT NULL
          GROUP BY trunk_name",
    )
    .bind(&state.namespace)
    .fetch_all(&state.pool)
    .await?
    .into_iter()
    .collect();
    let mut trunks = state.store.list(&state.namespace).await?;
    trunks.sort_by(|a, b| a.name.cmp(&b.name));
    let stats =
        |calls: i64, answered: i64, seconds: i64, cost: rust_decimal::Decimal, currency: String, active: i64| {
            TrunkStats {
                trunk_id: None,
                provider: None,
                calls,
                answered,
                failed: calls - answered,
                asr: (calls > 0).then(|| answered as f64 / calls as f64),
                acd_seconds: (answered > 0).then(|| seconds as f64 / answered as f64),
                active_calls: active,
                minutes: seconds as f64 / 60.0,
                cost: cost.round_dp(6).to_string(),
                currency,
            }
        };
    let mut total = (0, 0, 0, rust_decimal::Decimal::ZERO, 0);
    let mut out = Vec::new();
    for trunk in &trunks {
        let (calls, answered, seconds, cost, currency) = by_trunk.remove(&trunk.name).unwrap_or((
            0,
            0,
            0,
            rust_decimal::Decimal::ZERO,
            trunk.spec.rates.as_ref().map(|r| r.currency.clone()).unwrap_or_else(|| "USD".into()),
        ));
        let active = active.get(&trunk.name).copied().unwrap_or_default();
        total = (total.0 + calls, total.1 + answered, total.2 + seconds, total.3 + cost, total.4 + active);
        out.push(TrunkStats {
            trunk_id: Some(trunk.trunk_id.clone()),
            provider: Some(trunk.spec.provider.clone()),
            ..stats(calls, answered, seconds, cost, currency, active)
        });
    }
    Ok(Json(StatsSummary {
        since,
        trunks: out,
        total: stats(total.0, total.1, total.2, total.3, "USD".into(), total.4),
    }))
}
