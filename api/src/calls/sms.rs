//! `/api/sms`: messages queued in Postgres (`messages`) for a SIP node to send as SIP MESSAGE,
//! and the history of both directions.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::PgRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::checks::{e164, outbound_allowed, rate_limit};
use super::paging::{decode_cursor, encode_cursor, limit};
use crate::AppState;
use crate::auth::Claims;
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorBody};

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
