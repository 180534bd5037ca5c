//! The trunk JSON's TLS and SRTP fields: the Trunk's `spec.tls` (the client certificate and CA
//! Secrets, the peers admitted over inbound mutual TLS) as the `tls` object, and its
//! `spec.media.srtp` as `srtp`. Kept apart from [`crate::trunk_model`] so that each stays small.
//!
//! The Secrets are named, never written, by the API: a certificate and its key belong in a
//! `kubernetes.io/tls` Secret that cert-manager (or the operator of the cluster) maintains, with
//! the label `switchboard.dev/credentials=true` so that the operator may read it.

use serde::{Deserialize, Serialize};
use switchboard_model::SrtpMode;
use utoipa::ToSchema;

use crate::error::ApiError;
use switchboard_operator::crd::{MediaSpec, SecretRef, TrunkSpec, TrunkTlsSpec};

/// A trunk's TLS settings (the Trunk's `spec.tls`). On PUT only the given members change; an
/// empty string removes a Secret reference, an empty list a peer list.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiTrunkTls {
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) whose certificate the nodes present
    /// on this trunk's TLS connections; needed by `auth_method: certificate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "carrier-client")]
    pub client_cert_secret: Option<String>,
    /// A Secret with key `ca.crt`: the CA the provider's certificates chain to (its gateways',
    /// and an inbound caller's for `peer_names`), instead of the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
    /// Inbound mutual TLS (`auth_method: certificate`): names the provider's client certificate
    /// must carry (DNS or `sip:` URI subject alternative names, or the subject CN without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(["sip.carrier.example"]))]
    pub peer_names: Option<Vec<String>>,
    /// Inbound mutual TLS: SHA-256 fingerprints (colon hex) of provider certificates admitted as
    /// they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_fingerprints: Option<Vec<String>>,
}

/// Applies the `tls` object and `srtp` onto `spec` (before `auth_method` is checked, so that a
/// body giving both the client certificate and `auth_method: certificate` is accepted).
pub fn apply(spec: &mut TrunkSpec, tls: Option<&ApiTrunkTls>, srtp: Option<&str>) -> Result<(), ApiError> {
    if let Some(given) = tls {
        let current = spec.tls.get_or_insert_with(TrunkTlsSpec::default);
        let secret = |name: &str| Some(SecretRef { name: name.to_string() }).filter(|_| !name.is_empty());
        if let Some(name) = &given.client_cert_secret {
            current.client_cert_secret_ref = secret(name);
        }
        if let Some(name) = &given.ca_secret {
            current.ca_secret_ref = secret(name);
        }
        if let Some(names) = &given.peer_names {
            current.peer_names = names.clone();
        }
        if let Some(pins) = &given.peer_fingerprints {
            current.peer_fingerprints = pins.clone();
        }
        if *current == TrunkTlsSpec::default() {
            spec.tls = None;
        }
    }
    if let Some(mode) = srtp {
        let mode =
            mode.to_ascii_lowercase().parse::<SrtpMode>().map_err(|message| ApiError::invalid("srtp", message))?;
        spec.media = (mode != SrtpMode::Disabled || spec.media.is_some()).then_some(MediaSpec { srtp: mode });
    }
    Ok(())
}

/// The `tls` object of a stored trunk (`None` without `spec.tls`).
pub fn response(spec: &TrunkSpec) -> Option<ApiTrunkTls> {
    let tls = spec.tls.as_ref()?;
    let list = |items: &Vec<String>| Some(items.clone()).filter(|l| !l.is_empty());
    Some(ApiTrunkTls {
        client_cert_secret: tls.client_cert_secret_ref.as_ref().map(|r| r.name.clone()),
        ca_secret: tls.ca_secret_ref.as_ref().map(|r| r.name.clone()),
        peer_names: list(&tls.peer_names),
        peer_fingerprints: list(&tls.peer_fingerprints),
    })
}

/// The API field of a `spec.tls` or `spec.media` validation path (`None`: not one of these).
pub fn api_field(rest: &str) -> Option<String> {
    let mapped = match rest {
        "tls" => "tls".to_string(),
        "tls.clientCertSecretRef" | "tls.clientCertSecretRef.name" => "tls.client_cert_secret".to_string(),
        "tls.caSecretRef" | "tls.caSecretRef.name" => "tls.ca_secret".to_string(),
        "media" | "media.srtp" => "srtp".to_string(),
        other => {
            if let Some(index) = other.strip_prefix("tls.peerNames") {
                format!("tls.peer_names{index}")
            } else if let Some(index) = other.strip_prefix("tls.peerFingerprints") {
                format!("tls.peer_fingerprints{index}")
            } else {
                return None;
            }
        }
    };
    Some(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object and `srtp` reach the spec, merge on PUT, clear with empty values, and come
    /// back as they were given.
    #[test]
    fn tls_and_srtp_map_onto_the_spec_and_back() {
        let mut spec = crate::trunk_model::default_spec();
        let given = ApiTrunkTls {
            client_cert_secret: Some("carrier-client".into()),
            peer_names: Some(vec!["sip.carrier.example".into()]),
            ..ApiTrunkTls::default()
        };
        apply(&mut spec, Some(&given), Some("Required")).unwrap();
        let tls = spec.tls.as_ref().unwrap();
        assert_eq!(tls.client_cert_secret_ref.as_ref().unwrap().name, "carrier-client");
        assert_eq!(spec.media.as_ref().unwrap().srtp, SrtpMode::Required);
        assert_eq!(response(&spec), Some(given));

        let more = ApiTrunkTls { ca_secret: Some("carrier-ca".into()), ..ApiTrunkTls::default() };
        apply(&mut spec, Some(&more), None).unwrap();
        let back = response(&spec).unwrap();
        assert_eq!(
            (back.ca_secret.as_deref(), back.client_cert_secret.as_deref()),
            (Some("carrier-ca"), Some("carrier-client"))
        );

        let clear = ApiTrunkTls {
            client_cert_secret: Some(String::new()),
            ca_secret: Some(String::new()),
            peer_names: Some(vec![]),
            peer_fingerprints: Some(vec![]),
        };
        apply(&mut spec, Some(&clear), Some("disabled")).unwrap();
        assert_eq!(spec.tls, None, "nothing left: no spec.tls");
        assert_eq!(spec.media.as_ref().map(|m| m.srtp), Some(SrtpMode::Disabled));

        let wrong = apply(&mut spec, None, Some("off")).unwrap_err();
        assert!(format!("{wrong:?}").contains("srtp"), "{wrong:?}");
    }

    #[test]
    fn validation_paths_map_to_api_fields() {
        assert_eq!(api_field("tls.clientCertSecretRef").as_deref(), Some("tls.client_cert_secret"));
        assert_eq!(api_field("tls.peerFingerprints[2]").as_deref(), Some("tls.peer_fingerprints[2]"));
        assert_eq!(api_field("media.srtp").as_deref(), Some("srtp"));
        assert_eq!(api_field("gateways[0]"), None);
    }
}
