//! The seed API's trunk JSON and its mapping onto the `Trunk` resource.
//!
//! A request is a set of fields applied onto a spec: POST applies them onto the defaults, PUT
//! onto the stored spec (so PUT merges, as the seed's examples expect). `trunk_id` maps to the
//! resource name with `_` written as `-` (Kubernetes names allow no underscores); the id as
//! given is kept in the annotation [`TRUNK_ID_ANNOTATION`].

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use switchboard_model::{AuthMethod, Codec, TransferMode, Transport};
use utoipa::ToSchema;

use crate::error::ApiError;
pub use crate::trunk_security::ApiTrunkTls;
use switchboard_operator::crd::{
    Credentials, Gateway, InboundSpec, Limits, NumberFormat, OutboundSpec, Registrar, RegistrationSpec, SecretKeyRef,
    TrunkSpec,
};
use switchboard_operator::validate::FieldError;

/// Annotation holding the API's `trunk_id` when it differs from the resource name.
pub(crate) const TRUNK_ID_ANNOTATION: &str = "switchboard.dev/trunk-id";
/// The Secret key the API writes the password under.
pub(crate) const PASSWORD_KEY: &str = "password";

/// The resource name of a trunk id: lower case, `_` as `-`.
pub fn name_of(trunk_id: &str) -> String {
    trunk_id.trim().to_ascii_lowercase().replace('_', "-")
}

/// The Secret the API writes a trunk's password to.
pub(crate) fn secret_name_of(name: &str) -> String {
    format!("{name}-credentials")
}

/// One provider address (the seed's `proxy_address` is the first).
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiGateway {
    /// Host name or IP address.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// UDP, TCP or TLS (default UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Lower is tried first (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    /// Share of calls within one priority (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// The writable trunk fields. On POST `trunk_id`, `provider` and `proxy_address` (or
/// `gateways`) are required; on PUT every field is optional and only the given ones change.
#[derive(Deserialize, ToSchema, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrunkFields {
    /// Identifier used in the URLs; letters, digits, `-` and `_` (stored as the resource name
    /// with `_` written as `-`).
    #[schema(example = "skyetel_main")]
    pub trunk_id: Option<String>,
    /// Human-readable name.
    pub name: Option<String>,
    /// Provider name used in CDRs and metrics, e.g. `skyetel`.
    pub provider: Option<String>,
    /// The provider's SIP proxy (the first gateway).
    pub proxy_address: Option<String>,
    pub proxy_port: Option<u16>,
    /// Digest username (the password goes to a Secret and is never returned).
    pub username: Option<String>,
    /// Digest password: written to a Secret, never returned by any GET.
    #[schema(format = Password, write_only)]
    pub password: Option<String>,
    pub realm: Option<String>,
    pub supports_outbound: Option<bool>,
    pub supports_inbound: Option<bool>,
    /// UDP, TCP or TLS, for the first gateway.
    pub transport: Option<String>,
    /// Codecs in order of preference: PCMU, PCMA, telephone-event.
    pub preferred_codecs: Option<Vec<String>>,
    pub max_concurrent_calls: Option<u32>,
    pub calls_per_second_limit: Option<u32>,
    /// Source networks the provider signals from (CIDRs; a bare IP means that one host).
    pub allowed_ips: Option<Vec<String>>,
    /// `ip`, `digest`, `none` (default: `digest` with a username, else `ip`) or `certificate`
    /// (mutual TLS: needs `tls.client_cert_secret` and TLS gateways; `tls.peer_names` or
    /// `tls.peer_fingerprints` make inbound calls need the provider's client certificate).
    pub auth_method: Option<String>,
    /// TLS settings: the client certificate and CA Secrets, the peers of inbound mutual TLS.
    pub tls: Option<ApiTrunkTls>,
    /// SRTP on the trunk's call legs: `required`, `optional` or `disabled` (the default).
    pub srtp: Option<String>,
    /// Trunks tried when this one fails or is at its limits (their `trunk_id`s).
    pub backup_trunks: Option<Vec<String>>,
    pub registrar_address: Option<String>,
    pub registrar_port: Option<u16>,
    pub supports_registration: Option<bool>,
    pub dial_prefix: Option<String>,
    pub strip_digits: Option<u32>,
    pub prepend_digits: Option<String>,
    pub enable_dtmf_relay: Option<bool>,
    /// `refer` when the provider takes REFER for call transfers (the `refer` mode of
    /// `POST /api/calls/{id}/transfer`), `none` otherwise (the default): the Trunk's `transfer`.
    pub transfer: Option<String>,
    /// Seconds without RTP before a call is ended.
    pub rtp_timeout: Option<u32>,
    /// OPTIONS keepalive interval in seconds (0: off).
    pub heartbeat_interval: Option<u32>,
    /// Registration lifetime in seconds.
    pub registration_expire: Option<u32>,
    /// Seconds an outbound attempt may go unanswered before failover.
    pub failover_timeout: Option<u32>,
    /// Every provider address, replacing `proxy_address`/`proxy_port`/`transport`.
    pub gateways: Option<Vec<ApiGateway>>,
}

impl TrunkFields {
    /// The password, if one is given (kept out of every `Debug` of the spec).
    pub fn take_password(&mut self) -> Option<String> {
        self.password.take()
    }
}

/// A trunk as the API returns it. Never carries the password.
#[derive(Serialize, ToSchema, Debug, Clone, PartialEq)]
pub(crate) struct TrunkResponse {
    pub trunk_id: String,
    pub name: Option<String>,
    pub provider: String,
    pub proxy_address: Option<String>,
    pub proxy_port: Option<u16>,
    pub transport: Option<String>,
    pub username: Option<String>,
    /// Whether a password Secret is referenced (the password itself is never returned).
    pub has_password: bool,
    pub realm: Option<String>,
    pub supports_outbound: bool,
    pub supports_inbound: bool,
    pub preferred_codecs: Vec<String>,
    pub max_concurrent_calls: Option<u32>,
    pub calls_per_second_limit: Option<u32>,
    pub allowed_ips: Vec<String>,
    pub auth_method: String,
    /// The trunk's TLS settings, when it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTrunkTls>,
    /// `required`, `optional` or `disabled` (the Trunk's `media.srtp`).
    pub srtp: String,
    pub backup_trunks: Vec<String>,
    pub registrar_address: Option<String>,
    pub registrar_port: Option<u16>,
    pub supports_registration: bool,
    pub dial_prefix: Option<String>,
    pub strip_digits: u32,
    pub prepend_digits: Option<String>,
    pub enable_dtmf_relay: bool,
    /// `refer` or `none` (the Trunk's `transfer`).
    pub transfer: String,
    pub rtp_timeout: u32,
    pub heartbeat_interval: u32,
    pub registration_expire: u32,
    pub failover_timeout: u32,
    pub gateways: Vec<ApiGateway>,
    /// `active`, `suspended`, `pending` (not reconciled yet) or `error` (see `/status`).
    pub status: String,
    /// Calls in progress on the trunk.
    pub current_calls: i64,
    /// Call attempts since midnight UTC.
    pub total_calls_today: i64,
    pub successful_calls_today: i64,
    pub failed_calls_today: i64,
    /// Resource namespace and name behind the trunk.
    pub namespace: String,
    pub resource_name: String,
    /// Who manages the resource when it is not this API (e.g. Argo CD): writes are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

/// Call counters of one trunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub current: i64,
    pub total: i64,
    pub successful: i64,
    pub failed: i64,
}

/// The defaults a POST starts from, before its fields are applied.
pub fn default_spec() -> TrunkSpec {
    serde_json::from_value(serde_json::json!({"provider": "", "gateways": []})).expect("the empty spec parses")
}

fn parse_enum<T: std::str::FromStr<Err = String>>(field: &str, value: &str) -> Result<T, ApiError> {
    value.parse::<T>().map_err(|message| ApiError::invalid(field, message))
}

fn transport(field: &str, value: &str) -> Result<Transport, ApiError> {
    parse_enum(field, &value.to_ascii_uppercase())
}

fn cidr(value: &str) -> String {
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => format!("{value}/32"),
        Ok(IpAddr::V6(_)) => format!("{value}/128"),
        Err(_) => value.to_string(),
    }
}

/// Applies the given fields onto `spec`. `name` is the trunk's resource name (for the Secret
/// reference). Type-level problems (an unknown transport) are 422s here; the rest is left to
/// [`switchboard_operator::validate`].
pub fn apply_fields(
    spec: &mut TrunkSpec,
    name: &str,
    fields: &TrunkFields,
    has_password: bool,
    creating: bool,
) -> Result<(), ApiError> {
    if let Some(provider) = &fields.provider {
        spec.provider = provider.clone();
    }
    if let Some(display) = &fields.name {
        spec.display_name = Some(display.clone());
    }
    if let Some(gateways) = &fields.gateways {
        if fields.proxy_address.is_some() {
            return Err(ApiError::invalid("gateways", "give either gateways or proxy_address, not both"));
        }
        spec.gateways = gateways
            .iter()
            .enumerate()
            .map(|(i, g)| {
                Ok(Gateway {
                    address: g.address.clone(),
                    port: g.port,
                    transport: match &g.transport {
                        Some(t) => transport(&format!("gateways[{i}].transport"), t)?,
                        None => Transport::Udp,
                    },
                    priority: g.priority.unwrap_or(10),
                    weight: g.weight.unwrap_or(100),
                    enabled: g.enabled.unwrap_or(true),
                })
            })
            .collect::<Result<_, ApiError>>()?;
    }
    if fields.proxy_address.is_some() || fields.proxy_port.is_some() || fields.transport.is_some() {
        if spec.gateways.is_empty() {
            let Some(address) = &fields.proxy_address else {
                return Err(ApiError::invalid("proxy_address", "the trunk has no proxy; give proxy_address"));
            };
            spec.gateways.push(Gateway {
                address: address.clone(),
                port: None,
                transport: Transport::Udp,
                priority: 10,
                weight: 100,
                enabled: true,
            });
        }
        let first = &mut spec.gateways[0];
        if let Some(address) = &fields.proxy_address {
            first.address = address.clone();
        }
        if let Some(port) = fields.proxy_port {
            first.port = Some(port);
        }
        if let Some(value) = &fields.transport {
            first.transport = transport("transport", value)?;
        }
    }
    if fields.username.is_some() || fields.realm.is_some() || has_password {
        let credentials = spec.credentials.get_or_insert_with(|| Credentials {
            username: String::new(),
            realm: None,
            password_secret_ref: SecretKeyRef { name: secret_name_of(name), key: PASSWORD_KEY.into() },
        });
        if let Some(username) = &fields.username {
            credentials.username = username.clone();
        }
        if let Some(realm) = &fields.realm {
            credentials.realm = Some(realm.clone()).filter(|r| !r.is_empty());
        }
        if has_password {
            credentials.password_secret_ref = SecretKeyRef { name: secret_name_of(name), key: PASSWORD_KEY.into() };
        }
        if credentials.username.is_empty() {
            return Err(ApiError::invalid("username", "credentials need a username; give username"));
        }
    }
    if let Some(enabled) = fields.supports_outbound {
        spec.outbound = Some(OutboundSpec { enabled });
    }
    if let Some(enabled) = fields.supports_inbound {
        spec.inbound.get_or_insert_with(|| InboundSpec { enabled, allowed_source_cidrs: vec![] }).enabled = enabled;
    }
    if let Some(ips) = &fields.allowed_ips {
        spec.inbound
            .get_or_insert_with(|| InboundSpec { enabled: true, allowed_source_cidrs: vec![] })
            .allowed_source_cidrs = ips.iter().map(|ip| cidr(ip)).collect();
    }
    if let Some(codecs) = &fields.preferred_codecs {
        spec.codecs = codecs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let canonical = if c.eq_ignore_ascii_case("telephone-event") {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                };
                parse_enum::<Codec>(&format!("preferred_codecs[{i}]"), &canonical)
            })
            .collect::<Result<_, _>>()?;
    }
    if fields.max_concurrent_calls.is_some() || fields.calls_per_second_limit.is_some() {
        let limits = spec.limits.get_or_insert_with(Limits::default);
        if let Some(max) = fields.max_concurrent_calls {
            limits.max_concurrent_calls = Some(max);
        }
        if let Some(cps) = fields.calls_per_second_limit {
            limits.calls_per_second = Some(cps);
        }
    }
    crate::trunk_security::apply(spec, fields.tls.as_ref(), fields.srtp.as_deref())?;
    match &fields.auth_method {
        Some(method) => spec.auth_method = parse_enum::<AuthMethod>("auth_method", &method.to_ascii_lowercase())?,
        None if creating && spec.credentials.is_some() => {
            // A new trunk with credentials and no auth_method authenticates with digest.
            spec.auth_method = AuthMethod::Digest;
        }
        None => {}
    }
    if let Some(backups) = &fields.backup_trunks {
        spec.backup_trunks = backups.iter().map(|id| name_of(id)).collect();
    }
    if fields.registrar_address.is_some() || fields.registrar_port.is_some() {
        let fallback = spec.gateways.first().map(|g| g.address.clone()).unwrap_or_default();
        let registrar = spec.registrar.get_or_insert(Registrar { address: fallback, port: None });
        if let Some(address) = &fields.registrar_address {
            registrar.address = address.clone();
        }
        if let Some(port) = fields.registrar_port {
            registrar.port = Some(port);
        }
    }
    if fields.supports_registration.is_some() || fields.registration_expire.is_some() {
        let registration = spec.registration.get_or_insert(RegistrationSpec { enabled: false, expires_seconds: 3600 });
        if let Some(enabled) = fields.supports_registration {
            registration.enabled = enabled;
        }
        if let Some(expires) = fields.registration_expire {
            registration.expires_seconds = expires;
        }
    }
    if fields.dial_prefix.is_some() || fields.strip_digits.is_some() || fields.prepend_digits.is_some() {
        let format = spec.number_format.get_or_insert_with(NumberFormat::default);
        if let Some(prefix) = &fields.dial_prefix {
            format.dial_prefix = Some(prefix.clone()).filter(|p| !p.is_empty());
        }
        if let Some(strip) = fields.strip_digits {
            format.strip_digits = strip;
        }
        if let Some(prepend) = &fields.prepend_digits {
            format.prepend_digits = Some(prepend.clone()).filter(|p| !p.is_empty());
        }
    }
    if let Some(dtmf) = fields.enable_dtmf_relay {
        spec.dtmf_relay = dtmf;
    }
    if let Some(transfer) = &fields.transfer {
        spec.transfer = parse_enum::<TransferMode>("transfer", &transfer.to_ascii_lowercase())?;
    }
    if let Some(timeout) = fields.rtp_timeout {
        spec.rtp_timeout_seconds = timeout;
    }
    if let Some(interval) = fields.heartbeat_interval {
        spec.options_interval_seconds = interval;
    }
    if let Some(timeout) = fields.failover_timeout {
        spec.failover_timeout_seconds = timeout;
    }
    Ok(())
}

/// The API field a validation error's spec path belongs to.
pub(crate) fn api_field(path: &str, fields: &TrunkFields) -> String {
    let rest = path.strip_prefix("spec.").unwrap_or(path);
    let gateway = |index: &str, sub: &str| -> String {
        if fields.gateways.is_none() && index == "0" {
            match sub {
                "address" => return "proxy_address".into(),
                "port" => return "proxy_port".into(),
                "transport" => return "transport".into(),
                _ => {}
            }
        }
        if sub.is_empty() { format!("gateways[{index}]") } else { format!("gateways[{index}].{sub}") }
    };
    if let Some(after) = rest.strip_prefix("gateways[") {
        let (index, sub) = after.split_once(']').unwrap_or((after, ""));
        return gateway(index, sub.trim_start_matches('.'));
    }
    if let Some(field) = crate::trunk_security::api_field(rest) {
        return field;
    }
    if let Some(index) = rest.strip_prefix("inbound.allowedSourceCidrs") {
        return format!("allowed_ips{index}");
    }
    if let Some(index) = rest.strip_prefix("backupTrunks") {
        return format!("backup_trunks{index}");
    }
    if let Some(index) = rest.strip_prefix("codecs") {
        return format!("preferred_codecs{index}");
    }
    let mapped = match rest {
        "provider" => "provider",
        "displayName" => "name",
        "credentials" | "credentials.username" => "username",
        "credentials.realm" => "realm",
        "credentials.passwordSecretRef.name" | "credentials.passwordSecretRef.key" => "password",
        "authMethod" => "auth_method",
        "registrar.address" => "registrar_address",
        "registrar.port" => "registrar_port",
        "registration.expiresSeconds" => "registration_expire",
        "registration.enabled" => "supports_registration",
        "inbound" | "inbound.enabled" => "supports_inbound",
        "outbound" | "outbound.enabled" => "supports_outbound",
        "numberFormat.dialPrefix" => "dial_prefix",
        "numberFormat.stripDigits" => "strip_digits",
        "numberFormat.prependDigits" => "prepend_digits",
        "dtmfRelay" => "enable_dtmf_relay",
        "rtpTimeoutSeconds" => "rtp_timeout",
        "optionsIntervalSeconds" => "heartbeat_interval",
        "failoverTimeoutSeconds" => "failover_timeout",
        "limits.maxConcurrentCalls" => "max_concurrent_calls",
        "limits.callsPerSecond" => "calls_per_second_limit",
        other => other,
    };
    mapped.to_string()
}

/// The 422 for a spec that fails validation: the first problem's API field, every problem in
/// the message.
pub(crate) fn validation_error(errors: &[FieldError], fields: &TrunkFields) -> ApiError {
    // The field named is the first malformed one; when every problem is a value Switchboard
    // does not implement (mutual TLS), the answer is a 400 `unsupported` rather than a 422.
    let only_unsupported = !errors.is_empty() && errors.iter().all(|e| e.unsupported);
    let first = errors
        .iter()
        .find(|e| only_unsupported || !e.unsupported)
        .map(|e| api_field(&e.path, fields))
        .unwrap_or_default();
    let message = errors
        .iter()
        .map(|e| {
            let field = api_field(&e.path, fields);
            let fix = if e.fix.is_empty() { String::new() } else { format!(" ({})", e.fix) };
            format!("{field}: {}{fix} [{}]", e.problem, e.path)
        })
        .collect::<Vec<_>>()
        .join("; ");
    if only_unsupported {
        return ApiError::bad_request("unsupported", message).with_field(first);
    }
    ApiError::invalid(first, message)
}

/// The response of a stored trunk.
pub(crate) fn response(
    trunk_id: &str,
    namespace: &str,
    name: &str,
    spec: &TrunkSpec,
    status: &str,
    counters: Counters,
    managed_by: Option<String>,
) -> TrunkResponse {
    let first = spec.gateways.first();
    TrunkResponse {
        trunk_id: trunk_id.to_string(),
        name: spec.display_name.clone(),
        provider: spec.provider.clone(),
        proxy_address: first.map(|g| g.address.clone()),
        proxy_port: first.map(|g| g.port.unwrap_or(g.transport.default_port())),
        transport: first.map(|g| g.transport.to_string()),
        username: spec.credentials.as_ref().map(|c| c.username.clone()),
        has_password: spec.credentials.is_some(),
        realm: spec.credentials.as_ref().and_then(|c| c.realm.clone()),
        supports_outbound: spec.outbound.as_ref().is_none_or(|o| o.enabled),
        supports_inbound: spec.inbound.as_ref().is_none_or(|i| i.enabled),
        preferred_codecs: spec.codecs.iter().map(ToString::to_string).collect(),
        max_concurrent_calls: spec.limits.as_ref().and_then(|l| l.max_concurrent_calls),
        calls_per_second_limit: spec.limits.as_ref().and_then(|l| l.calls_per_second),
        allowed_ips: spec.inbound.as_ref().map(|i| i.allowed_source_cidrs.clone()).unwrap_or_default(),
        auth_method: spec.auth_method.to_string(),
        tls: crate::trunk_security::response(spec),
        srtp: spec.media.as_ref().map(|m| m.srtp).unwrap_or_default().to_string(),
        backup_trunks: spec.backup_trunks.clone(),
        registrar_address: spec.registrar.as_ref().map(|r| r.address.clone()),
        registrar_port: spec.registrar.as_ref().and_then(|r| r.port),
        supports_registration: spec.registration.as_ref().is_some_and(|r| r.enabled),
        dial_prefix: spec.number_format.as_ref().and_then(|f| f.dial_prefix.clone()),
        strip_digits: spec.number_format.as_ref().map(|f| f.strip_digits).unwrap_or_default(),
        prepend_digits: spec.number_format.as_ref().and_then(|f| f.prepend_digits.clone()),
        enable_dtmf_relay: spec.dtmf_relay,
        transfer: spec.transfer.to_string(),
        rtp_timeout: spec.rtp_timeout_seconds,
        heartbeat_interval: spec.options_interval_seconds,
        registration_expire: spec.registration.as_ref().map(|r| r.expires_seconds).unwrap_or(3600),
        failover_timeout: spec.failover_timeout_seconds,
        gateways: spec
            .gateways
            .iter()
            .map(|g| ApiGateway {
                address: g.address.clone(),
                port: g.port,
                transport: Some(g.transport.to_string()),
                priority: Some(g.priority),
                weight: Some(g.weight),
                enabled: Some(g.enabled),
            })
            .collect(),
        status: status.to_string(),
        current_calls: counters.current,
        total_calls_today: counters.total,
        successful_calls_today: counters.successful,
        failed_calls_today: counters.failed,
        namespace: namespace.to_string(),
        resource_name: name.to_string(),
        managed_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_operator::source::{Kind, ResourceKey, Spec};

    fn seed_skyetel() -> TrunkFields {
        serde_json::from_value(serde_json::json!({
            "trunk_id": "skyetel_main", "name": "Skyetel Main Trunk", "provider": "skyetel",
            "proxy_address": "sip.skyetel.com", "proxy_port": 5060, "username": "u", "password": "p",
            "realm": "sip.skyetel.com", "supports_outbound": true, "supports_inbound": true, "transport": "UDP",
            "preferred_codecs": ["PCMU", "PCMA"], "max_concurrent_calls": 100, "calls_per_second_limit": 10
        }))
        .unwrap()
    }

    #[test]
    fn the_seed_body_maps_to_a_valid_digest_trunk() {
        let fields = seed_skyetel();
        let mut spec = default_spec();
        apply_fields(&mut spec, "skyetel-main", &fields, true, true).unwrap();
        let key = ResourceKey { kind: Kind::Trunk, namespace: "default".into(), name: "skyetel-main".into() };
        switchboard_operator::validate::validate(&key, &Spec::Trunk(spec.clone())).unwrap();
        assert_eq!(spec.auth_method, AuthMethod::Digest);
        assert_eq!(spec.credentials.as_ref().unwrap().password_secret_ref.name, "skyetel-main-credentials");
        assert_eq!(spec.gateways[0].port, Some(5060));
        assert_eq!(spec.limits.as_ref().unwrap().calls_per_second, Some(10));
        let response = response("skyetel_main", "default", "skyetel-main", &spec, "active", Counters::default(), None);
        let json = serde_json::to_string(&response).unwrap();
        assert!(!json.contains("\"password\""), "{json}");
    }

    #[test]
    fn validation_paths_map_to_api_fields() {
        let fields = TrunkFields::default();
        assert_eq!(api_field("spec.gateways[0].port", &fields), "proxy_port");
        assert_eq!(api_field("spec.inbound.allowedSourceCidrs[2]", &fields), "allowed_ips[2]");
        assert_eq!(api_field("spec.limits.callsPerSecond", &fields), "calls_per_second_limit");
        assert_eq!(name_of("Skyetel_Main"), "skyetel-main");
    }
}
