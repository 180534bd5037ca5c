//! `GET /api/trunks/stats/summary`: today's calls, ASR, ACD, minutes and cost per trunk, from the
//! CDRs and the active calls.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::ApiError;

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
