//! `/api/trunks`: the seed's trunk endpoints over the `Trunk` resource. This module holds the
//! writes and reads of the trunks themselves; [`status`] the live status (registrations,
//! reachability, conditions) and [`stats`] today's call figures.

pub mod stats;
pub mod status;

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sqlx::Row;

use crate::AppState;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::store::{StoredTrunk, TrunkWrite, gitops_conflict};
use crate::trunk_model::{self, Counters, TrunkFields, TrunkResponse, name_of};
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

pub(crate) async fn find(state: &AppState, id: &str) -> Result<StoredTrunk, ApiError> {
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
        (status = 400, description = "The trunk asks for something Switchboard does not implement (`unsupported`)", body = ErrorBody),
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
        (status = 400, description = "Unsupported value (`unsupported`)", body = ErrorBody),
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
