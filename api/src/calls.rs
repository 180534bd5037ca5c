//! `/api/calls` and `/api/sms`, the API side: requests are queued in Postgres (`call_requests`,
//! `messages`) for a SIP node to take; the lists read what nodes wrote.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::PgRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Claims;
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorBody};
use crate::limits::RouteLimits;
use switchboard_operator::crd::{E164_PATTERN, NAME_PATTERN};

fn e164(field: &str, value: &str) -> Result<(), ApiError> {
    static E164: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(E164_PATTERN).expect("E.164 pattern"));
    if E164.is_match(value) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{value:?} is not an E.164 number; write + then the country code and number, e.g. +15551234567"),
        ))
    }
}

/// A URL the node will connect to for the client: the right scheme, and a target the egress
/// policy allows (no loopback, link-local, private or cluster-internal host unless listed).
fn url(state: &AppState, field: &str, value: &str, schemes: &[&str]) -> Result<(), ApiError> {
    let ok = schemes.iter().any(|s| value.starts_with(&format!("{s}://")))
        && value.len() <= 2048
        && !value.contains(char::is_whitespace)
        && value.split("://").nth(1).is_some_and(|rest| !rest.is_empty());
    if !ok {
        return Err(ApiError::invalid(field, format!("{value:?} is not a {} URL", schemes.join("/"))));
    }
    state.egress.check_url(value).map(drop).map_err(|error| ApiError::invalid(field, error.to_string()))
}

/// Takes one request from the route's rate limits: 429 with `Retry-After` when over.
fn rate_limit(limits: &RouteLimits, claims: &Claims, from_number: &str) -> Result<(), ApiError> {
    limits.check(&claims.sub, from_number, std::time::Instant::now()).map_err(|limited| {
        let seconds = limited.retry_after.as_secs_f64().ceil() as u64;
        ApiError::too_many_requests(
            format!("too many requests for this {}; retry in {seconds} s", limited.what),
            seconds,
        )
    })
}

/// The toll-fraud guard: the from-number must be one of this deployment's PhoneNumbers, and an
/// outbound RoutingRule in its namespace must match the destination; a destination no rule
/// covers (premium-rate, international) is refused with 403 instead of being dialled through
/// the number's own trunk. Returns the number's namespace and trunk.
async fn outbound_allowed(state: &AppState, from: &str, to: &str) -> Result<(String, String), ApiError> {
    let number = sqlx::query("SELECT namespace, trunk_ref FROM phone_numbers WHERE number = $1")
        .bind(from)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                "from_number",
                format!("{from} is not a PhoneNumber of this deployment; use one of your DIDs"),
            )
        })?;
    let namespace: String = number.try_get("namespace")?;
    let trunk: String = number.try_get("trunk_ref")?;
    let rules: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT match_spec FROM routing_rules WHERE namespace = $1 AND direction = 'outbound' ORDER BY priority, name",
    )
    .bind(&namespace)
    .fetch_all(&state.pool)
    .await?;
    let matches = rules.iter().any(|spec| {
        let patterns = spec.get("destinationPatterns").and_then(|p| p.as_array());
        match patterns {
            None => true,
            Some(patterns) if patterns.is_empty() => true,
            Some(patterns) => {
                patterns.iter().filter_map(|p| p.as_str()).any(|p| regex::Regex::new(p).is_ok_and(|re| re.is_match(to)))
            }
        }
    });
    if !matches {
        return Err(ApiError::forbidden(
            "destination_not_allowed",
            format!(
                "no outbound RoutingRule in namespace {namespace} matches {to}; add one whose destinationPatterns cover it"
            ),
        )
        .with_field("to_number"));
    }
    Ok((namespace, trunk))
}

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

/// Filters and paging of the CDR list.
#[derive(Deserialize, IntoParams, Debug)]
#[serde(deny_unknown_fields)]
pub struct CdrQuery {
    /// Only this provider.
    pub provider: Option<String>,
    /// Only this trunk (its id or resource name).
    pub trunk: Option<String>,
    /// Calls set up at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Calls set up before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One call attempt.
#[derive(Serialize, ToSchema, Debug)]
pub struct Cdr {
    pub id: i64,
    /// The node's id of the call: every attempt of one call has the same.
    pub call_uuid: Uuid,
    /// The SIP Call-ID of the call's first leg (chosen by the caller: not necessarily unique).
    pub call_id: String,
    pub attempt: i32,
    pub node_id: String,
    pub trunk: Option<String>,
    pub provider: Option<String>,
    pub gateway: Option<String>,
    pub direction: String,
    pub from_number: String,
    pub to_number: String,
    pub setup_at: DateTime<Utc>,
    pub ring_at: Option<DateTime<Utc>>,
    pub answer_at: Option<DateTime<Utc>>,
    pub end_at: DateTime<Utc>,
    pub sip_code: Option<i32>,
    pub reason: Option<String>,
    pub hangup_by: Option<String>,
    pub billable_seconds: i32,
    /// Decimal string.
    pub cost: String,
    pub currency: String,
}

/// A page of results, newest first.
#[derive(Serialize, ToSchema, Debug)]
pub struct CdrPage {
    pub items: Vec<Cdr>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn encode_cursor(at: DateTime<Utc>, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}|{id}", at.timestamp_micros()))
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, String), ApiError> {
    let bad = || {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "cursor is not one this API returned")
            .with_field("cursor")
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = text.split_once('|').ok_or_else(bad)?;
    let at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok((at, id.to_string()))
}

fn limit(value: Option<i64>) -> Result<i64, ApiError> {
    match value.unwrap_or(100) {
        n @ 1..=1000 => Ok(n),
        n => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit {n} is out of range; use 1 to 1000"),
        )
        .with_field("limit")),
    }
}

fn cdr(row: &PgRow) -> Result<Cdr, sqlx::Error> {
    Ok(Cdr {
        id: row.try_get("id")?,
        call_uuid: row.try_get("call_uuid")?,
        call_id: row.try_get("call_id")?,
        attempt: row.try_get("attempt")?,
        node_id: row.try_get("node_id")?,
        trunk: row.try_get("trunk_name")?,
        provider: row.try_get("provider")?,
        gateway: row.try_get("gateway")?,
        direction: row.try_get("direction")?,
        from_number: row.try_get("from_number")?,
        to_number: row.try_get("to_number")?,
        setup_at: row.try_get("setup_at")?,
        ring_at: row.try_get("ring_at")?,
        answer_at: row.try_get("answer_at")?,
        end_at: row.try_get("end_at")?,
        sip_code: row.try_get("sip_code")?,
        reason: row.try_get("reason")?,
        hangup_by: row.try_get("hangup_by")?,
        billable_seconds: row.try_get("billable_seconds")?,
        cost: row.try_get("cost")?,
        currency: row.try_get("currency")?,
    })
}

/// Call detail records, newest first, with keyset pagination on (setup_at, id).
#[utoipa::path(get, path = "/api/calls/cdr", tag = "calls", params(CdrQuery),
    responses((status = 200, body = CdrPage), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn cdrs(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<CdrQuery>,
) -> Result<Json<CdrPage>, ApiError> {
    let limit = limit(query.limit)?;
    let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let (cursor_at, cursor_id) = match cursor {
        Some((at, id)) => (Some(at), Some(id.parse::<i64>().map_err(|_| decode_cursor("!").unwrap_err())?)),
        None => (None, None),
    };
    let trunk = query.trunk.as_deref().map(crate::trunk_model::name_of);
    // Only the given filters go into the statement. With `$1 IS NULL OR provider = $1` the one
    // statement's generic plan walks the setup_at index and filters (0.3 s for a provider without
    // CDRs among a million), so Postgres must plan every execution anew, and a server on
    // `plan_cache_mode = force_generic_plan` gets the slow plan; each combination of filters is
    // its own prepared statement, whose generic plan uses the matching index.
    let mut sql = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "SELECT id, call_uuid, call_id, attempt, node_id, trunk_name, provider, gateway, direction, from_number,
                to_number, setup_at, ring_at, answer_at, end_at, sip_code, reason, hangup_by, billable_seconds, cost::text AS cost, currency
           FROM cdrs WHERE TRUE",
    );
    if let Some(provider) = &query.provider {
        sql.push(" AND provider = ").push_bind(provider);
    }
    if let Some(trunk) = &trunk {
        sql.push(" AND trunk_name = ").push_bind(trunk);
    }
    if let Some(from) = query.from {
        sql.push(" AND setup_at >= ").push_bind(from);
    }
    if let Some(to) = query.to {
        sql.push(" AND setup_at < ").push_bind(to);
    }
    if let (Some(at), Some(id)) = (cursor_at, cursor_id) {
        sql.push(" AND (setup_at, id) < (").push_bind(at).push(", ").push_bind(id).push(")");
    }
    sql.push(" ORDER BY setup_at DESC, id DESC LIMIT ").push_bind(limit + 1);
    let rows = sql.build().fetch_all(&state.pool).await?;
    let mut items = rows.iter().map(cdr).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|last| encode_cursor(last.setup_at, &last.id.to_string()))
    } else {
        None
    };
    Ok(Json(CdrPage { items, next_cursor }))
}

// ---------------------------------------------------------------------------------------------
// SMS

/// Send an SMS.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct SendSms {
    /// One of this deployment's numbers (its trunk sends the message).
    #[schema(example = "+15551234567")]
    pub from_number: String,
    /// Destination (E.164); an outbound RoutingRule in the from-number's namespace must match it.
    #[schema(example = "+19876543210")]
    pub to_number: String,
    /// Text, 1 to 1600 characters.
    pub message: String,
}

/// A message, either direction.
#[derive(Serialize, ToSchema, Debug)]
pub struct Message {
    pub message_id: Uuid,
    pub direction: String,
    pub trunk: Option<String>,
    pub from_number: String,
    pub to_number: String,
    pub message: String,
    /// queued, sending, sent, delivered, failed or received.
    pub status: String,
    pub sip_code: Option<i32>,
    pub error: Option<String>,
    pub cost: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn message(row: &PgRow) -> Result<Message, sqlx::Error> {
    Ok(Message {
        message_id: row.try_get("id")?,
        direction: row.try_get("direction")?,
        trunk: row.try_get("trunk_name")?,
        from_number: row.try_get("from_number")?,
        to_number: row.try_get("to_number")?,
        message: row.try_get("body")?,
        status: row.try_get("status")?,
        sip_code: row.try_get("sip_code")?,
        error: row.try_get("error")?,
        cost: row.try_get("cost")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

const MESSAGE_COLUMNS: &str = "id, direction, trunk_name, from_number, to_number, body, status, sip_code, error, cost::text AS cost, created_at, updated_at";

/// Queue an SMS (SIP MESSAGE through the from-number's trunk, sent by a SIP node).
#[utoipa::path(post, path = "/api/sms/send", tag = "sms", request_body = SendSms,
    responses(
        (status = 202, description = "Queued", body = Message),
        (status = 403, description = "The token lacks the `sms` scope, or no outbound RoutingRule matches `to_number` (`destination_not_allowed`)", body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 429, description = "Over the rate limit of the token's subject or the from-number; see `Retry-After`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed"))),
    ),
    security(("bearer" = [])))]
pub async fn send_sms(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
    ApiJson(body): ApiJson<SendSms>,
) -> Result<(StatusCode, Json<Message>), ApiError> {
    e164("from_number", &body.from_number)?;
    e164("to_number", &body.to_number)?;
    if body.message.is_empty() || body.message.chars().count() > 1600 {
        return Err(ApiError::invalid("message", "message must be 1 to 1600 characters"));
    }
    rate_limit(&state.limits.sms, &claims, &body.from_number)?;
    let (namespace, trunk) = outbound_allowed(&state, &body.from_number, &body.to_number).await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO messages (id, direction, namespace, trunk_name, from_number, to_number, body, status)
         VALUES ($1, 'outbound', $2, $3, $4, $5, $6, 'queued') RETURNING {MESSAGE_COLUMNS}"
    )))
    .bind(Uuid::new_v4())
    .bind(&namespace)
    .bind(&trunk)
    .bind(&body.from_number)
    .bind(&body.to_number)
    .bind(&body.message)
    .fetch_one(&state.pool)
    .await?;
    let message = message(&row)?;
    let _ = sqlx::query("SELECT pg_notify('switchboard_messages', $1)")
        .bind(message.message_id.to_string())
        .execute(&state.pool)
        .await;
    tracing::info!(message_id = %message.message_id, trunk = %trunk, "SMS queued");
    Ok((StatusCode::ACCEPTED, Json(message)))
}

/// Filters and paging of the message history.
#[derive(Deserialize, IntoParams, Debug)]
#[serde(deny_unknown_fields)]
pub struct SmsQuery {
    /// inbound or outbound.
    pub direction: Option<String>,
    /// Messages from or to this number.
    pub number: Option<String>,
    pub status: Option<String>,
    /// Created at or after (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Created before (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// A page of messages, newest first.
#[derive(Serialize, ToSchema, Debug)]
pub struct MessagePage {
    pub items: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Message history, newest first, with keyset pagination on (created_at, id).
#[utoipa::path(get, path = "/api/sms/history", tag = "sms", params(SmsQuery),
    responses((status = 200, body = MessagePage), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn sms_history(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SmsQuery>,
) -> Result<Json<MessagePage>, ApiError> {
    let limit = limit(query.limit)?;
    let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let (cursor_at, cursor_id) = match cursor {
        Some((at, id)) => (Some(at), Some(Uuid::parse_str(&id).map_err(|_| decode_cursor("!").unwrap_err())?)),
        None => (None, None),
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages
          WHERE ($1::text IS NULL OR direction = $1)
            AND ($2::text IS NULL OR from_number = $2 OR to_number = $2)
            AND ($3::text IS NULL OR status = $3)
            AND ($4::timestamptz IS NULL OR created_at >= $4)
            AND ($5::timestamptz IS NULL OR created_at < $5)
            AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7))
          ORDER BY created_at DESC, id DESC LIMIT $8"
    )))
    .bind(&query.direction)
    .bind(&query.number)
    .bind(&query.status)
    .bind(query.from)
    .bind(query.to)
    .bind(cursor_at)
    .bind(cursor_id)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let mut items = rows.iter().map(message).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|last| encode_cursor(last.created_at, &last.message_id.to_string()))
    } else {
        None
    };
    Ok(Json(MessagePage { items, next_cursor }))
}
