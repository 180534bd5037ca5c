//! `POST /api/calls/{call_id}/transfer`: hands a call in progress to a human. The request is
//! checked here (body, the call, the toll-fraud guard), written into `call_commands` for the
//! node that holds the call (its `active_calls` row), and the node is woken with NOTIFY; the
//! node's answer (accepted, or rejected with the reason) comes back in the row, which this
//! handler waits for. What the node then does is in the SIP node's `sip::transfer`.

use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use switchboard_model::sip_uri::SipUri;
use utoipa::ToSchema;
use uuid::Uuid;

use super::checks::{e164, outbound_allowed, rate_limit, sip_uri_allowed, url};
use crate::AppState;
use crate::auth::Claims;
use crate::error::{ApiError, ApiJson, ErrorBody};

/// How long the API waits for the node to take or refuse the request.
const NODE_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// The longest a target may ring.
const MAX_TIMEOUT_SECONDS: u32 = 300;
/// The longest summary (it travels in a SIP header).
const MAX_SUMMARY_CHARS: usize = 1024;

/// How the call is handed over.
#[derive(Deserialize, Serialize, ToSchema, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    /// The node dials `to` (outbound routing, failover); when it answers the caller is
    /// bridged to it and the agent's stream ends (`stop`). If it fails, the caller stays with
    /// the agent, which gets a `transfer_failed` event.
    Blind,
    /// The caller is put on hold while the node dials `to`; when the human answers, the
    /// agent's stream carries the human's audio (the agent briefs them; it gets a
    /// `transfer_answered` event), then `POST .../transfer/complete` bridges caller and human
    /// and ends the agent's stream, or `POST .../transfer/cancel` hangs the human up.
    Warm,
    /// A REFER on the caller's leg asks the caller's carrier to call `to` itself; the node
    /// follows the carrier's NOTIFYs, and on the final 2xx hangs up its leg and ends the
    /// agent's stream. A refused or failed referral leaves the caller with the agent
    /// (`transfer_failed`).
    Refer,
}

/// Transfer a call in progress.
#[derive(Deserialize, Serialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct TransferCall {
    /// The target: an E.164 number, which an outbound RoutingRule of the call's namespace must
    /// match, or a SIP URI (`sip:` / `sips:`, no `?headers`), whose host must be a gateway of
    /// a Trunk of the call's namespace (the call then goes through that trunk; a dial-string
    /// user must also match an outbound RoutingRule) or named by the egress allow-list
    /// (`SWITCHBOARD_EGRESS_ALLOW`; dialled directly). Otherwise 403 `destination_not_allowed`.
    #[schema(example = "+15552223333")]
    pub to: String,
    pub mode: TransferMode,
    /// For the human (sent as `X-Transfer-Summary`); at most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "Caller wants a refund for order 1234")]
    pub summary: Option<String>,
    /// How long the target may ring (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 5, maximum = 300, example = 30)]
    pub timeout_seconds: Option<u32>,
    /// The number the target sees (E.164); the caller's number by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_id: Option<String>,
    /// Where `transfer_started`, `transfer_answered`, `transfer_failed` and
    /// `transfer_completed` are POSTed (signed like the call status callbacks); the same target
    /// rule as `webhook_url` of `/api/calls/initiate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// A transfer the node holding the call has started.
#[derive(Serialize, ToSchema, Debug)]
pub struct TransferResponse {
    /// Id of the transfer (`transfer_id` in its webhooks and `transfer.id` in the agent's events).
    pub transfer_id: Uuid,
    /// The call's `callSid` (its SIP Call-ID).
    pub call_id: String,
    /// `accepted`: the node is dialling the target.
    pub status: String,
    pub mode: TransferMode,
    pub to: String,
}

/// Transfer a call to a human: the `call_id` is the `callSid` the agent got in the Media
/// Streams `start` message (the call's SIP Call-ID), or the id `/api/calls/initiate` returned.
#[utoipa::path(post, path = "/api/calls/{call_id}/transfer", tag = "calls", request_body = TransferCall,
    params(("call_id" = String, Path, description = "The agent's `callSid`, or an id from /api/calls/initiate")),
    responses(
        (status = 202, description = "The node holding the call started the transfer", body = TransferResponse),
        (status = 403, description = "The token lacks the `calls` scope, or `to` is not allowed (`destination_not_allowed`): no outbound RoutingRule matches the number, or a SIP URI's host is neither a Trunk's gateway nor on the egress allow-list", body = ErrorBody),
        (status = 404, description = "No call in progress has this id", body = ErrorBody),
        (status = 409, description = "The call cannot be transferred now (`not_transferable`): not answered yet, not bridged to an AI agent, a transfer already in progress, a mode the node does not carry out, or `refer` on a trunk without `transfer: refer`", body = ErrorBody),
        (status = 422, description = "Invalid body", body = ErrorBody),
        (status = 429, description = "Over the rate limit", body = ErrorBody),
        (status = 503, description = "The node holding the call did not answer in time", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn transfer(
    State(state): State<AppState>,
    Extension(claims): Extension<Claims>,
    Path(call_id): Path<String>,
    ApiJson(body): ApiJson<TransferCall>,
) -> Result<(StatusCode, Json<TransferResponse>), ApiError> {
    check_body(&state, &body)?;
    let call = find_call(&state, &call_id).await?;
    if call.state != "answered" {
        return Err(ApiError::conflict(
            "not_transferable",
            format!("call {} is {}; only answered calls can be transferred", call.call_id, call.state),
        ));
    }
    // The toll-fraud guard of placing calls: the call's own number must be one of this
    // deployment's, and an outbound rule of its namespace must cover the target.
    let own_number = if call.direction == "inbound" { &call.to_number } else { &call.from_number };
    if is_sip_uri(&body.to) {
        sip_uri_allowed(&state, own_number, &body.to).await?;
    } else {
        outbound_allowed(&state, own_number, &body.to).await.map_err(|error| match error.detail.field.as_deref() {
            Some("to_number") => error.with_field("to"),
            _ => error,
        })?;
    }
    rate_limit(&state.limits.calls, &claims, own_number)?;
    let command = serde_json::to_value(&body).map_err(|e| ApiError::internal("cannot store the request", e))?;
    let id = queue(&state, &call, &command).await?;
    match node_answer(&state, id).await? {
        NodeAnswer::Accepted => Ok((
            StatusCode::ACCEPTED,
            Json(TransferResponse {
                transfer_id: id,
                call_id: call.call_id,
                status: "accepted".into(),
                mode: body.mode,
                to: body.to,
            }),
        )),
        NodeAnswer::Rejected(reason) => Err(ApiError::conflict("not_transferable", reason)),
    }
}

/// What became of a warm transfer's last step.
#[derive(Serialize, ToSchema, Debug)]
pub struct TransferStepResponse {
    /// The call's `callSid`.
    pub call_id: String,
    /// `completed` (caller and human are being bridged; the agent's stream ends),
    /// `cancelled` (the human is hung up; the caller stays with the agent) or `sent` (DTMF).
    pub status: String,
}

/// Complete a warm transfer: the caller is bridged to the human the agent has been briefing,
/// and the agent's stream ends (`stop`, then the socket closes).
#[utoipa::path(post, path = "/api/calls/{call_id}/transfer/complete", tag = "calls",
    params(("call_id" = String, Path, description = "The agent's `callSid`, or an id from /api/calls/initiate")),
    responses(
        (status = 200, description = "The node is bridging caller and human", body = TransferStepResponse),
        (status = 404, description = "No call in progress has this id", body = ErrorBody),
        (status = 409, description = "No warm transfer is waiting for completion on this call (`not_transferable`)", body = ErrorBody),
        (status = 503, description = "The node holding the call did not answer in time", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn complete(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
) -> Result<Json<TransferStepResponse>, ApiError> {
    step(&state, &call_id, serde_json::json!({"action": "complete"}), "completed").await
}

/// Cancel a warm transfer: the human is hung up and the caller stays with the agent, which
/// gets a `transfer_failed` event.
#[utoipa::path(post, path = "/api/calls/{call_id}/transfer/cancel", tag = "calls",
    params(("call_id" = String, Path, description = "The agent's `callSid`, or an id from /api/calls/initiate")),
    responses(
        (status = 200, description = "The human is hung up; the caller is back with the agent", body = TransferStepResponse),
        (status = 404, description = "No call in progress has this id", body = ErrorBody),
        (status = 409, description = "No warm transfer is in its consultation on this call (`not_transferable`)", body = ErrorBody),
        (status = 503, description = "The node holding the call did not answer in time", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
) -> Result<Json<TransferStepResponse>, ApiError> {
    step(&state, &call_id, serde_json::json!({"action": "cancel"}), "cancelled").await
}

/// Keys for the human's leg of a warm transfer.
#[derive(Deserialize, Serialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct TransferDigits {
    /// 1 to 32 of `0`-`9`, `*`, `#`, `A`-`D`.
    #[schema(example = "1234#")]
    pub digits: String,
}

/// Send DTMF to the human's leg of a warm transfer (to pass the human's IVR): one SIP INFO
/// (`application/dtmf-relay`) per key, in order, each after the previous one was answered.
#[utoipa::path(post, path = "/api/calls/{call_id}/transfer/dtmf", tag = "calls", request_body = TransferDigits,
    params(("call_id" = String, Path, description = "The agent's `callSid`, or an id from /api/calls/initiate")),
    responses(
        (status = 200, description = "The keys are on their way to the human's leg", body = TransferStepResponse),
        (status = 404, description = "No call in progress has this id", body = ErrorBody),
        (status = 409, description = "No warm transfer is in its consultation on this call (`not_transferable`)", body = ErrorBody),
        (status = 422, description = "Not DTMF keys", body = ErrorBody),
        (status = 503, description = "The node holding the call did not answer in time", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn dtmf(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
    ApiJson(body): ApiJson<TransferDigits>,
) -> Result<Json<TransferStepResponse>, ApiError> {
    let digits = &body.digits;
    let keys = digits.chars().all(|c| c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D'));
    if !keys || !(1..=32).contains(&digits.len()) {
        return Err(ApiError::invalid("digits", format!("{digits:?} is not 1 to 32 of 0-9 * # A-D")));
    }
    step(&state, &call_id, serde_json::json!({"action": "dtmf", "digits": digits}), "sent").await
}

async fn step(
    state: &AppState,
    call_id: &str,
    command: serde_json::Value,
    done: &str,
) -> Result<Json<TransferStepResponse>, ApiError> {
    let call = find_call(state, call_id).await?;
    let id = queue(state, &call, &command).await?;
    match node_answer(state, id).await? {
        NodeAnswer::Accepted => Ok(Json(TransferStepResponse { call_id: call.call_id, status: done.into() })),
        NodeAnswer::Rejected(reason) => Err(ApiError::conflict("not_transferable", reason)),
    }
}

/// Queues a command for the node holding `call` and wakes it.
async fn queue(state: &AppState, call: &ActiveCall, body: &serde_json::Value) -> Result<Uuid, ApiError> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO call_commands (id, call_id, call_uuid, node_id, kind, body) VALUES ($1, $2, $3, $4, 'transfer', $5)",
    )
    .bind(id)
    .bind(&call.call_id)
    .bind(call.call_uuid)
    .bind(&call.node_id)
    .bind(body)
    .execute(&state.pool)
    .await?;
    let _ = sqlx::query("SELECT pg_notify('switchboard_call_commands', $1)")
        .bind(id.to_string())
        .execute(&state.pool)
        .await;
    tracing::info!(command = %id, call = %call.call_id, node = %call.node_id, "transfer command queued");
    Ok(id)
}

/// Whether the target is a SIP URI (else it must be E.164).
fn is_sip_uri(to: &str) -> bool {
    let scheme = to.split_once(':').map(|(scheme, _)| scheme.to_ascii_lowercase());
    matches!(scheme.as_deref(), Some("sip" | "sips"))
}

fn check_body(state: &AppState, body: &TransferCall) -> Result<(), ApiError> {
    if is_sip_uri(&body.to) {
        SipUri::parse(&body.to).map_err(|error| ApiError::invalid("to", format!("{:?}: {error}", body.to)))?;
    } else {
        e164("to", &body.to)?;
    }
    if let Some(caller_id) = &body.caller_id {
        e164("caller_id", caller_id)?;
    }
    if let Some(timeout) = body.timeout_seconds
        && !(5..=MAX_TIMEOUT_SECONDS).contains(&timeout)
    {
        return Err(ApiError::invalid(
            "timeout_seconds",
            format!("{timeout} is not between 5 and {MAX_TIMEOUT_SECONDS} seconds"),
        ));
    }
    if let Some(summary) = &body.summary
        && summary.chars().count() > MAX_SUMMARY_CHARS
    {
        return Err(ApiError::invalid("summary", format!("longer than {MAX_SUMMARY_CHARS} characters")));
    }
    if let Some(webhook) = &body.webhook_url {
        url(state, "webhook_url", webhook, &["http", "https"])?;
    }
    Ok(())
}

/// A call in progress, as its `active_calls` row says.
struct ActiveCall {
    call_uuid: Uuid,
    call_id: String,
    node_id: String,
    direction: String,
    from_number: String,
    to_number: String,
    state: String,
}

/// The call in progress on a live node whose SIP Call-ID is `id`, else the one an API request
/// with id `id` placed; 404 when neither is in progress.
async fn find_call(state: &AppState, id: &str) -> Result<ActiveCall, ApiError> {
    let mut call_id = id.to_string();
    if let Ok(request) = Uuid::parse_str(id) {
        let placed: Option<Option<String>> = sqlx::query_scalar("SELECT call_id FROM call_requests WHERE id = $1")
            .bind(request)
            .fetch_optional(&state.pool)
            .await?;
        if let Some(Some(sip_call_id)) = placed {
            call_id = sip_call_id;
        }
    }
    let lookup = |call_id: String| async move {
        sqlx::query(
            "SELECT call_uuid, call_id, node_id, direction, from_number, to_number, state FROM active_calls
              WHERE call_id = $1 AND node_id IN (SELECT node_id FROM live_nodes)
              ORDER BY started_at DESC LIMIT 1",
        )
        .bind(call_id)
        .fetch_optional(&state.pool)
        .await
    };
    let mut row = lookup(call_id.clone()).await?;
    if row.is_none()
        && let Some(placed) = placed_call_id(&call_id)
    {
        row = lookup(placed.to_string()).await?;
    }
    let row = row.ok_or_else(|| ApiError::not_found(format!("no call in progress has the id {id:?}")))?;
    Ok(ActiveCall {
        call_uuid: row.try_get("call_uuid")?,
        call_id: row.try_get("call_id")?,
        node_id: row.try_get("node_id")?,
        direction: row.try_get("direction")?,
        from_number: row.try_get("from_number")?,
        to_number: row.try_get("to_number")?,
        state: row.try_get("state")?,
    })
}

/// The call's own Call-ID for the `callSid` of an API-placed call's later attempt: the node
/// gives attempt N (after failovers) the Call-ID `ID-N`, while the call (its `active_calls`
/// row) keeps the first one, `ID`.
fn placed_call_id(call_sid: &str) -> Option<&str> {
    let (call_id, attempt) = call_sid.rsplit_once('-')?;
    let numbered = !attempt.is_empty() && attempt.bytes().all(|b| b.is_ascii_digit());
    (numbered && call_id.ends_with("@switchboard")).then_some(call_id)
}

enum NodeAnswer {
    Accepted,
    Rejected(String),
}

/// Waits (bounded) for the node's answer in the command's row. A request no node took in time
/// is withdrawn (a node taking it later would transfer a call the client gave up on).
async fn node_answer(state: &AppState, id: Uuid) -> Result<NodeAnswer, ApiError> {
    let deadline = tokio::time::Instant::now() + NODE_ANSWER_WAIT;
    // A claimed request is answered within the node's own bound (3 s); a node that died after
    // claiming it gets this much more.
    let hard_deadline = deadline + NODE_ANSWER_WAIT;
    loop {
        let (row_state, error): (String, Option<String>) =
            sqlx::query_as("SELECT state, error FROM call_commands WHERE id = $1")
                .bind(id)
                .fetch_one(&state.pool)
                .await?;
        match row_state.as_str() {
            "accepted" => return Ok(NodeAnswer::Accepted),
            "rejected" => return Ok(NodeAnswer::Rejected(error.unwrap_or_else(|| "refused by the node".into()))),
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            let withdrawn = sqlx::query(
                "UPDATE call_commands SET state = 'rejected', error = 'no answer from the node', updated_at = now()
                  WHERE id = $1 AND state = 'queued'",
            )
            .bind(id)
            .execute(&state.pool)
            .await?;
            if withdrawn.rows_affected() == 1 {
                return Err(ApiError::unavailable(
                    "the node holding the call did not answer",
                    format!("transfer {id} not claimed within {NODE_ANSWER_WAIT:?}"),
                ));
            }
            // Claimed meanwhile: its answer comes within the node's own bound.
            if tokio::time::Instant::now() >= hard_deadline {
                return Err(ApiError::unavailable(
                    "the node holding the call did not answer",
                    format!("transfer {id} claimed but not answered within {:?}", NODE_ANSWER_WAIT * 2),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::placed_call_id;

    #[test]
    fn a_later_attempts_call_sid_names_the_api_call() {
        assert_eq!(placed_call_id("0af3@switchboard-2"), Some("0af3@switchboard"));
        assert_eq!(placed_call_id("0af3@switchboard-12"), Some("0af3@switchboard"));
        for not in ["0af3@switchboard", "abc-2", "0af3@switchboard-", "0af3@switchboard-x2", "caller-call-id"] {
            assert_eq!(placed_call_id(not), None, "{not}");
        }
    }
}
