//! `GET /api/calls/cdr`: the call detail records the nodes wrote, filtered and paged.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::PgRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::paging::{decode_cursor, encode_cursor, limit};
use crate::AppState;
use crate::error::{ApiError, ApiQuery, ErrorBody};

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
