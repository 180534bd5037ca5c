//! The checks every request that makes the nodes dial or send runs first: E.164 numbers, URLs the
//! egress policy allows, the rate limits, and the toll-fraud guard (a from-number of this
//! deployment and an outbound RoutingRule that covers the destination).

use sqlx::Row;

use crate::AppState;
use crate::auth::Claims;
use crate::error::ApiError;
use crate::limits::RouteLimits;
use switchboard_operator::crd::E164_PATTERN;

pub(super) fn e164(field: &str, value: &str) -> Result<(), ApiError> {
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
pub(super) fn url(state: &AppState, field: &str, value: &str, schemes: &[&str]) -> Result<(), ApiError> {
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
pub(super) fn rate_limit(limits: &RouteLimits, claims: &Claims, from_number: &str) -> Result<(), ApiError> {
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
pub(super) async fn outbound_allowed(state: &AppState, from: &str, to: &str) -> Result<(String, String), ApiError> {
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
