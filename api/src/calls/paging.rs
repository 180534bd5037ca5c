//! Keyset pagination of the CDR list and the message history: an opaque cursor over
//! (timestamp, id) of the last item, and the page size.

use axum::http::StatusCode;
use base64::Engine;
use chrono::{DateTime, Utc};

use crate::error::ApiError;

/// The cursor of the page after the item at `at` with `id` (base64url of `micros|id`).
pub(super) fn encode_cursor(at: DateTime<Utc>, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}|{id}", at.timestamp_micros()))
}

/// The (timestamp, id) a cursor names; 400 `invalid_query` for one this API did not return.
pub(super) fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, String), ApiError> {
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

/// The page size: 100 by default, 1 to 1000.
pub(super) fn limit(value: Option<i64>) -> Result<i64, ApiError> {
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
