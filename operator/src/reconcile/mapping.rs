//! From a validated spec to the rows the nodes read: defaults filled in, decimals parsed,
//! references kept by name. Pure functions, so they are unit-tested without a database.

use ipnet::IpNet;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use switchboard_model::config::{Credential, GatewayConfig, NumberConfig, RuleConfig, TrunkConfig};

use crate::crd::{PhoneNumberSpec, RoutingRuleSpec, TrunkSpec};
use crate::source::SecretData;

/// Why a trunk's credentials could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialError {
    SecretNotFound { secret: String },
    KeyNotFound { secret: String, key: String },
    NotUtf8 { secret: String, key: String },
}

impl std::fmt::Display for CredentialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SecretNotFound { secret } => {
                write!(
                    f,
                    "Secret {secret} does not exist (in Kubernetes: or lacks the label the operator watches, {}); create it with the provider password under the referenced key",
                    crate::kubernetes::controller::DEFAULT_SECRET_SELECTOR
                )
            }
            Self::KeyNotFound { secret, key } => {
                write!(f, "Secret {secret} has no key {key:?}; add it, or point passwordSecretRef.key at the right key")
            }
            Self::NotUtf8 { secret, key } => write!(f, "Secret {secret} key {key:?} is not UTF-8 text"),
        }
    }
}

/// The stored form of a trunk. Assumes the spec passed validation (unparsable values fall back
/// to their defaults rather than panicking).
pub fn trunk_config(namespace: &str, name: &str, spec: &TrunkSpec) -> TrunkConfig {
    let rates = spec.rates.clone();
    let rate = |value: Option<&String>| value.and_then(|v| v.parse::<Decimal>().ok()).unwrap_or_default();
    let number_format = spec.number_format.clone().unwrap_or_default();
    let limits = spec.limits.clone().unwrap_or_default();
    TrunkConfig {
        namespace: namespace.to_string(),
        name: name.to_string(),
        provider: spec.provider.clone(),
        display_name: spec.display_name.clone(),
        suspended: spec.suspend,
        gateways: spec
            .gateways
            .iter()
            .map(|g| GatewayConfig {
                address: g.address.clone(),
                port: g.port,
                transport: g.transport,
                priority: g.priority,
                weight: g.weight,
                enabled: g.enabled,
            })
            .collect(),
        registrar_address: spec.registrar.as_ref().map(|r| r.address.clone()),
        registrar_port: spec.registrar.as_ref().and_then(|r| r.port),
        realm: spec.credentials.as_ref().and_then(|c| c.realm.clone()),
        auth_method: spec.auth_method,
        registration_enabled: spec.registration.as_ref().is_some_and(|r| r.enabled),
        registration_expires: spec.registration.as_ref().map_or(3600, |r| r.expires_seconds),
        inbound_enabled: spec.inbound.as_ref().is_none_or(|i| i.enabled),
        allowed_source_cidrs: spec
            .inbound
            .as_ref()
            .map(|i| i.allowed_source_cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()).collect())
            .unwrap_or_default(),
        outbound_enabled: spec.outbound.as_ref().is_none_or(|o| o.enabled),
        dial_prefix: number_format.dial_prefix,
        strip_digits: number_format.strip_digits,
        prepend_digits: number_format.prepend_digits,
        max_concurrent_calls: limits.max_concurrent_calls,
        calls_per_second: limits.calls_per_second,
        codecs: spec.codecs.clone(),
        dtmf_relay: spec.dtmf_relay,
        srtp: spec.media.as_ref().map(|m| m.srtp).unwrap_or_default(),
        transfer: spec.transfer,
        tls_peer_names: spec.tls.as_ref().map(|t| t.peer_names.clone()).unwrap_or_default(),
        // Upper case, as OpenSSL prints them: the node compares them as text.
        tls_peer_fingerprints: spec
            .tls
            .as_ref()
            .map(|t| t.peer_fingerprints.iter().map(|f| f.to_ascii_uppercase()).collect())
            .unwrap_or_default(),
        rtp_timeout_seconds: spec.rtp_timeout_seconds,
        options_interval_seconds: spec.options_interval_seconds,
        failover_timeout_seconds: spec.failover_timeout_seconds,
        backup_trunks: spec.backup_trunks.clone(),
        rate_outbound_per_minute: rate(rates.as_ref().map(|r| &r.per_minute_outbound)),
        rate_inbound_per_minute: rate(rates.as_ref().map(|r| &r.per_minute_inbound)),
        rate_per_message: rate(rates.as_ref().map(|r| &r.per_message)),
        currency: rates.map_or_else(|| "USD".to_string(), |r| r.currency),
    }
}

/// Resolves a trunk's credentials from the Secrets of its namespace. `Ok(None)`: the trunk has
/// no credentials.
pub fn trunk_credential(
    namespace: &str,
    name: &str,
    spec: &TrunkSpec,
    secret: impl Fn(&str) -> Option<SecretData>,
) -> Result<Option<Credential>, CredentialError> {
    let Some(credentials) = &spec.credentials else { return Ok(None) };
    let reference = &credentials.password_secret_ref;
    let secret_id = format!("{namespace}/{}", reference.name);
    let data = secret(&reference.name).ok_or_else(|| CredentialError::SecretNotFound { secret: secret_id.clone() })?;
    let bytes = data
        .get(&reference.key)
        .ok_or_else(|| CredentialError::KeyNotFound { secret: secret_id.clone(), key: reference.key.clone() })?;
    let password = String::from_utf8(bytes.clone())
        .map_err(|_| CredentialError::NotUtf8 { secret: secret_id, key: reference.key.clone() })?;
    Ok(Some(Credential {
        namespace: namespace.to_string(),
        trunk_name: name.to_string(),
        username: credentials.username.clone(),
        password,
        secret_name: reference.name.clone(),
    }))
}

/// The stored form of a phone number.
pub fn number_config(namespace: &str, name: &str, spec: &PhoneNumberSpec) -> NumberConfig {
    NumberConfig {
        namespace: namespace.to_string(),
        name: name.to_string(),
        number: spec.number.clone(),
        trunk_ref: spec.trunk_ref.clone(),
        routing_rule_ref: spec.routing_rule_ref.clone(),
        destination: spec.destination.clone(),
        message_webhook: spec.messaging.as_ref().map(|m| m.webhook_url.clone()),
        caller_id_allowed: spec.caller_id,
    }
}

/// The stored form of a routing rule.
pub fn rule_config(namespace: &str, name: &str, spec: &RoutingRuleSpec) -> RuleConfig {
    RuleConfig {
        namespace: namespace.to_string(),
        name: name.to_string(),
        direction: spec.direction,
        priority: spec.priority,
        match_spec: spec.match_spec.clone(),
        destination: spec.destination.clone(),
        trunks: spec.trunks.clone(),
        trunk_selection: spec.trunk_selection,
        status_callback: spec.status_callback.clone(),
    }
}

/// A stable fingerprint of what a resource stores, to skip writes when nothing changed. The
/// credential's password is part of it (so a new password is written) but only as a digest.
pub fn fingerprint<T: serde::Serialize>(config: &T, credential: Option<&Credential>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(config).expect("config rows serialize"));
    if let Some(credential) = credential {
        hasher.update(b"\0credential\0");
        hasher.update(credential.username.as_bytes());
        hasher.update(b"\0");
        hasher.update(credential.password.as_bytes());
        hasher.update(b"\0");
        hasher.update(credential.secret_name.as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Kind, ResourceKey, Spec};
    use crate::validate::parse_spec;

    fn trunk(spec: serde_json::Value) -> TrunkSpec {
        let key = ResourceKey { kind: Kind::Trunk, namespace: "default".into(), name: "t".into() };
        match parse_spec(&key, spec).unwrap() {
            Spec::Trunk(spec) => spec,
            other => panic!("not a trunk: {other:?}"),
        }
    }

    #[test]
    fn trunk_defaults_and_rates_are_exact() {
        let spec = trunk(serde_json::json!({
            "provider": "skyetel",
            "gateways": [{"address": "sip.skyetel.com"}],
            "inbound": {"allowedSourceCidrs": ["52.41.52.34/32"]},
            "rates": {"perMinuteOutbound": "0.0025"}
        }));
        let config = trunk_config("default", "t", &spec);
        assert_eq!(config.rate_outbound_per_minute.to_string(), "0.0025");
        assert_eq!(config.rate_per_message, Decimal::ZERO);
        assert!(config.inbound_enabled && config.outbound_enabled && !config.registration_enabled);
        assert_eq!(config.gateways[0].port, None);
        assert_eq!(config.allowed_source_cidrs[0].to_string(), "52.41.52.34/32");
    }

    /// `media.srtp` reaches the stored trunk (what the nodes negotiate by), plain by default.
    #[test]
    fn media_srtp_is_stored_and_defaults_to_disabled() {
        let mut json = serde_json::json!({
            "provider": "skyetel",
            "gateways": [{"address": "sip.skyetel.com", "transport": "TLS"}],
            "inbound": {"allowedSourceCidrs": ["52.41.52.34/32"]}
        });
        assert_eq!(trunk_config("default", "t", &trunk(json.clone())).srtp, switchboard_model::SrtpMode::Disabled);
        json["media"] = serde_json::json!({"srtp": "required"});
        let required = trunk_config("default", "t", &trunk(json.clone()));
        assert_eq!(required.srtp, switchboard_model::SrtpMode::Required);
        json["media"] = serde_json::json!({});
        assert_eq!(trunk_config("default", "t", &trunk(json)).srtp, switchboard_model::SrtpMode::Disabled);
    }

    /// `transfer` reaches the stored trunk (what the node checks a REFER transfer against),
    /// `none` when absent.
    #[test]
    fn transfer_is_stored_and_defaults_to_none() {
        let mut json = serde_json::json!({"provider": "skyetel", "gateways": [{"address": "sip.skyetel.com"}]});
        assert_eq!(trunk_config("default", "t", &trunk(json.clone())).transfer, switchboard_model::TransferMode::None);
        json["transfer"] = serde_json::json!("refer");
        assert_eq!(trunk_config("default", "t", &trunk(json)).transfer, switchboard_model::TransferMode::Refer);
    }

    /// `tls.peerNames` and `tls.peerFingerprints` reach the stored trunk (fingerprints in upper
    /// case), empty when absent.
    #[test]
    fn tls_peers_are_stored() {
        let mut json = serde_json::json!({"provider": "carrier", "gateways": [{"address": "sip.carrier.example"}]});
        let plain = trunk_config("default", "t", &trunk(json.clone()));
        assert!(plain.tls_peer_names.is_empty() && plain.tls_peer_fingerprints.is_empty());
        let pin = "ab:".repeat(31) + "cd";
        json["tls"] = serde_json::json!({"peerNames": ["sip.carrier.example"], "peerFingerprints": [pin]});
        let stored = trunk_config("default", "t", &trunk(json));
        assert_eq!(stored.tls_peer_names, ["sip.carrier.example"]);
        assert_eq!(stored.tls_peer_fingerprints, ["AB:".repeat(31) + "CD"]);
    }

    #[test]
    fn credentials_resolve_or_say_what_is_missing() {
        let spec = trunk(serde_json::json!({
            "provider": "skyetel", "authMethod": "digest",
            "gateways": [{"address": "sip.skyetel.com"}],
            "credentials": {"username": "u", "passwordSecretRef": {"name": "creds"}}
        }));
        let none = trunk_credential("default", "t", &spec, |_| None);
        assert_eq!(none, Err(CredentialError::SecretNotFound { secret: "default/creds".into() }));
        let wrong_key = trunk_credential("default", "t", &spec, |_| Some(SecretData::new()));
        assert!(matches!(wrong_key, Err(CredentialError::KeyNotFound { .. })));
        let found = trunk_credential("default", "t", &spec, |name| {
            assert_eq!(name, "creds");
            Some([("password".to_string(), b"pw".to_vec())].into())
        });
        assert_eq!(found.unwrap().unwrap().password, "pw");
    }

    #[test]
    fn fingerprint_follows_password_changes() {
        let spec = trunk(serde_json::json!({"provider": "p", "gateways": [{"address": "a.b"}], "authMethod": "none"}));
        let config = trunk_config("default", "t", &spec);
        let credential = |password: &str| Credential {
            namespace: "default".into(),
            trunk_name: "t".into(),
            username: "u".into(),
            password: password.into(),
            secret_name: "s".into(),
        };
        assert_eq!(fingerprint(&config, None), fingerprint(&config, None));
        assert_ne!(fingerprint(&config, Some(&credential("a"))), fingerprint(&config, Some(&credential("b"))));
    }
}
