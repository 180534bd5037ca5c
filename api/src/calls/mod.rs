//! `/api/calls` and `/api/sms`, the API side: requests are queued in Postgres (`call_requests`,
//! `messages`) for a SIP node to take; the lists read what nodes wrote. This module places calls
//! and reads them back; [`cdr`] lists the call detail records, [`sms`] sends and lists messages,
//! and both kinds of request pass the same [`checks`] first.

pub mod cdr;
mod checks;
mod paging;
pub mod sms;
pub mod transfer;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Claims;
use crate::error::{ApiError, ApiJson, ErrorBody};
use checks::{e164, outbound_allowed, rate_limit, url};
use switchboard_operator::crd::NAME_PATTERN;

/// Start an outbound call.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct InitiateCall {
    /// Caller id (E.164), one of this deployment's numbers.
    #[schema(example = "+15551234567")]
    pub from_number: String,
    /// Destination (E.164); an outbound RoutingRule in the from-number's namespace must match it
    /// (403 `destination_not_allowed` otherwise).
    #[schema(example = "+19876543210")]
    pub to_number: String,
    /// Status callbacks (initiated, ringing, answered, completed) are POSTed here. Must be a
    /// public target: loopback, link-local, private and cluster-internal hosts are refused (422)
    /// unless the deployment allow-lists them (`SWITCHBOARD_EGRESS_ALLOW`); redirects are not
    /// followed.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Bridge the answered call to this AI agent (ws:// or wss://, Twilio Media Streams); the
    /// same target rule as `webhook_url`.
    #[serde(default)]
    pub agent_websocket_url: Option<String>,
    /// Or handle the answered call as this inbound RoutingRule says.
    #[serde(default)]
    pub routing_rule: Option<String>,
    /// Fail the request (`error` starts with `expired`) when no SIP node has taken it within
    /// this many seconds, instead of dialling it whenever a node appears (default 60).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400, example = 60)]
    pub expires_in_seconds: Option<i64>,
}

/// Default of [`InitiateCall::expires_in_seconds`].
pub const DEFAULT_EXPIRES_IN_SECONDS: i64 = 60;

/// A queued call.
#[derive(Serialize, ToSchema, Debug)]
pub struct CallRequestResponse {
    /// Id of the call request (also `call_id` in status callbacks).
    pub call_id: Uuid,
    /// queued, claimed, ringing, answered, completed or failed.
    pub status: String,
    pub from_number: String,
    pub to_number: String,
    pub created_at: DateTime<Utc>,
    /// A request still queued at this time fails with `expired`.
    pub expires_at: DateTime<Utc>,
    /// The SIP Call-ID once a node placed the call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sip_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Queue an outbound call; a live SIP node places it through the matching outbound rule's trunks.
#[utoipa::path(post, path = "/api/calls/initiate", tag = "calls", request_body = InitiateCall,
    responses(
        (status = 202, description = "Queued", body = CallRequestResponse),
        (status = 403, description = "The token lacks the `calls` scope, or no outbound RoutingRule matches `to_number` (`destination_not_allowed`)", body = ErrorBody),
        (status = 422, description = "Invalid field; `webhook_url`/`agent_websocket_url` naming a loopback, link-local, private or cluster-internal target is refused unless allow-listed", body = ErrorBody),
        (status = 429, description = "Over the rate limit of the token's subject or the from-number; see `Retry-After`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed"))),
    ),
    security(("bearer" = [])))]
pub async fn initiate(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
    ApiJson(body): ApiJson<InitiateCall>,
) -> Result<(StatusCode, Json<CallRequestResponse>), ApiError> {
    e164("from_number", &body.from_number)?;
    e164("to_number", &body.to_number)?;
    if let Some(webhook) = &body.webhook_url {
        url(&state, "webhook_url", webhook, &["http", "https"])?;
    }
    if let Some(agent) = &body.agent_websocket_url {
        url(&state, "agent_websocket_url", agent, &["ws", "wss"])?;
    }
    if let Some(rule) = &body.routing_rule {
        static NAME: std::sync::LazyLock<regex::Regex> =
            std::sync::LazyLock::new(|| regex::Regex::new(NAME_PATTERN).expect("name pattern"));
        if !NAME.is_match(rule) || rule.len() > 253 {
            return Err(ApiError::invalid("routing_rule", format!("{rule:?} is not a RoutingRule name")));
        }
    }
    if body.agent_websocket_url.is_some() && body.routing_rule.is_some() {
        return Err(ApiError::invalid("routing_rule", "give agent_websocket_url or routing_rule, not both"));
    }
    let expires_in = body.expires_in_seconds.unwrap_or(DEFAULT_EXPIRES_IN_SECONDS);
    if !(1..=86_400).contains(&expires_in) {
        return Err(ApiError::invalid(
            "expires_in_seconds",
            format!("{expires_in} is not between 1 and 86400 seconds"),
        ));
    }
    rate_limit(&state.limits.calls, &claims, &body.from_number)?;
    outbound_allowed(&state, &body.from_number, &body.to_number).await?;
    let destination = body.agent_websocket_url.as_ref().map(|url| serde_json::json!({"type": "websocket", "url": url}));
    let id = Uuid::new_v4();
    let (created_at, expires_at): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO call_requests (id, from_number, to_number, webhook_url, destination, routing_rule_ref, state,
            expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'queued', now() + make_interval(secs => $7)) RETURNING created_at, expires_at",
    )
    .bind(id)
    .bind(&body.from_number)
    .bind(&body.to_number)
    .bind(&body.webhook_url)
    .bind(&destination)
    .bind(&body.routing_rule)
    .bind(expires_in as f64)
    .fetch_one(&state.pool)
    .await?;
    // Wakes nodes that LISTEN; those that do not poll.
    let _ = sqlx::query("SELECT pg_notify('switchboard_call_requests', $1)")
        .bind(id.to_string())
        .execute(&state.pool)
        .await;
    tracing::info!(call_request = %id, "outbound call queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(CallRequestResponse {
            call_id: id,
            status: "queued".into(),
            from_number: body.from_number,
            to_number: body.to_number,
            created_at,
            expires_at,
            sip_call_id: None,
            error: None,
        }),
    ))
}

/// The state of one call request.
#[utoipa::path(get, path = "/api/calls/{call_id}", tag = "calls",
    params(("call_id" = Uuid, Path, description = "Id returned by /api/calls/initiate")),
    responses((status = 200, body = CallRequestResponse), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_call(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<CallRequestResponse>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found(format!("no call {id:?}")))?;
    let row = sqlx::query(
        "SELECT id, state, from_number, to_number, created_at, expires_at, call_id, error FROM call_requests
          WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no call {id}")))?;
    Ok(Json(CallRequestResponse {
        call_id: row.try_get("id")?,
        status: row.try_get("state")?,
        from_number: row.try_get("from_number")?,
        to_number: row.try_get("to_number")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        sip_call_id: row.try_get("call_id")?,
        error: row.try_get("error")?,
    }))
}

/// A call in progress.
#[derive(Serialize, ToSchema, Debug)]
pub struct ActiveCall {
    /// The node's id of the call (unique; its CDRs carry the same).
    pub call_uuid: Uuid,
    /// The SIP Call-ID of the call's first leg (chosen by the caller: not necessarily unique).
    pub call_id: String,
    pub node_id: String,
    pub trunk: Option<String>,
    pub provider: Option<String>,
    pub direction: String,
    pub from_number: String,
    pub to_number: String,
    pub state: String,
    pub started_at: DateTime<Utc>,
    pub answered_at: Option<DateTime<Utc>>,
    pub duration_seconds: f64,
}

/// Calls in progress on every live node (a node not heard from for three heartbeats is left
/// out; the reaper ends its calls).
#[utoipa::path(get, path = "/api/calls/active", tag = "calls",
    responses((status = 200, body = [ActiveCall])), security(("bearer" = [])))]
pub async fn active(State(state): State<AppState>) -> Result<Json<Vec<ActiveCall>>, ApiError> {
    let rows = sqlx::query(
        "SELECT call_uuid, call_id, node_id, trunk_name, provider, direction, from_number, to_number, state, started_at,
                answered_at,
                extract(epoch FROM now() - started_at)::float8 AS duration
           FROM active_calls WHERE node_id IN (SELECT node_id FROM live_nodes)
          ORDER BY started_at DESC, call_id LIMIT 10000",
    )
    .fetch_all(&state.pool)
    .await?;
    let calls = rows
        .into_iter()
        .map(|row| {
            Ok(ActiveCall {
                call_uuid: row.try_get("call_uuid")?,
                call_id: row.try_get("call_id")?,
                node_id: row.try_get("node_id")?,
                trunk: row.try_get("trunk_name")?,
                provider: row.try_get("provider")?,
                direction: row.try_get("direction")?,
                from_number: row.try_get("from_number")?,
                to_number: row.try_get("to_number")?,
                state: row.try_get("state")?,
                started_at: row.try_get("started_at")?,
                answered_at: row.try_get("answered_at")?,
                duration_seconds: row.try_get::<f64, _>("duration")?.max(0.0),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(calls))
}
