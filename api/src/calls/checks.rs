//! The checks every request that makes the nodes dial or send runs first: E.164 numbers, URLs the
//! egress policy allows, the rate limits, and the toll-fraud guard (a from-number of this
//! deployment and an outbound RoutingRule that covers the destination).

use sqlx::Row;

use crate::AppState;
use crate::auth::Claims;
use crate::error::ApiError;
use crate::limits::RouteLimits;
use switchboard_model::GatewayConfig;
use switchboard_model::sip_uri::SipUri;
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
    let (namespace, trunk) = number_of(state, from).await?;
    if !rule_matches(state, &namespace, to).await? {
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

/// The namespace and trunk of one of this deployment's PhoneNumbers (422 on `from_number`
/// for any other number).
async fn number_of(state: &AppState, from: &str) -> Result<(String, String), ApiError> {
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
    Ok((number.try_get("namespace")?, number.try_get("trunk_ref")?))
}

/// Whether an outbound RoutingRule of `namespace` matches the number `to`.
async fn rule_matches(state: &AppState, namespace: &str, to: &str) -> Result<bool, ApiError> {
    let rules: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT match_spec FROM routing_rules WHERE namespace = $1 AND direction = 'outbound' ORDER BY priority, name",
    )
    .bind(namespace)
    .fetch_all(&state.pool)
    .await?;
    Ok(rules.iter().any(|spec| {
        let patterns = spec.get("destinationPatterns").and_then(|p| p.as_array());
        match patterns {
            None => true,
            Some(patterns) if patterns.is_empty() => true,
            Some(patterns) => {
                patterns.iter().filter_map(|p| p.as_str()).any(|p| regex::Regex::new(p).is_ok_and(|re| re.is_match(to)))
            }
        }
    }))
}

/// No open relay for a SIP URI destination (`to` of a transfer): the call's number must be one
/// of this deployment's, and the URI's host a gateway of a Trunk of its namespace (a
/// dial-string user then also needs an outbound RoutingRule, as the number would) or a host
/// the egress allow-list names itself (a public address is not enough: a call reaches a
/// person and may cost money). Refused with 403 `destination_not_allowed` saying how to allow
/// it. The node holding the call checks the same again.
pub(super) async fn sip_uri_allowed(state: &AppState, from: &str, to: &str) -> Result<(), ApiError> {
    let uri = SipUri::parse(to).map_err(|error| ApiError::invalid("to", format!("{to:?}: {error}")))?;
    let (namespace, _) = number_of(state, from).await?;
    let trunks: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT gateways FROM trunks WHERE namespace = $1 AND NOT suspended AND outbound_enabled")
            .bind(&namespace)
            .fetch_all(&state.pool)
            .await?;
    let host = uri.host.trim_end_matches('.');
    let at_gateway = trunks.into_iter().any(|gateways| {
        serde_json::from_value::<Vec<GatewayConfig>>(gateways).is_ok_and(|gateways| {
            gateways.iter().any(|g| {
                g.enabled
                    && g.address
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(host)
            })
        })
    });
    let refused = |message: String| Err(ApiError::forbidden("destination_not_allowed", message).with_field("to"));
    if at_gateway {
        if let Some(number) = uri.number()
            && !rule_matches(state, &namespace, &number).await?
        {
            return refused(format!(
                "{to} dials {number} at a trunk's gateway, and no outbound RoutingRule in namespace {namespace} \
                 matches it; add one whose destinationPatterns cover it"
            ));
        }
        return Ok(());
    }
    if state.egress.lists(&uri.host) {
        return Ok(());
    }
    refused(format!(
        "{} is neither a gateway of a Trunk in namespace {namespace} nor on the egress allow-list; add it to a Trunk's \
         gateways (calls then go through that trunk) or to SWITCHBOARD_EGRESS_ALLOW (--egress-allow, on the API and \
         the SIP nodes) to dial it directly",
        uri.host
    ))
}
