//! A trunk's `spec.tls` resolved from the Secrets of its namespace into the row the nodes read
//! (`trunk_tls`): the client certificate and key (`tls.clientCertSecretRef`, keys `tls.crt` and
//! `tls.key` as in a `kubernetes.io/tls` Secret) and the CA (`tls.caSecretRef`, key `ca.crt`).

use sha2::{Digest, Sha256};
use switchboard_model::TrunkTls;

use crate::crd::TrunkSpec;
use crate::source::SecretData;

/// Why a trunk's TLS material could not be resolved. Never carries Secret data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsMaterialError {
    #[error(
        "Secret {secret} ({field}) does not exist (in Kubernetes: or lacks the label the operator watches, {}); create it",
        crate::kubernetes::controller::DEFAULT_SECRET_SELECTOR
    )]
    SecretNotFound { secret: String, field: &'static str },
    #[error("Secret {secret} ({field}) has no key {key:?}; {hint}")]
    KeyNotFound { secret: String, field: &'static str, key: &'static str, hint: &'static str },
    #[error("Secret {secret} key {key:?} is not PEM text")]
    NotPem { secret: String, key: &'static str },
}

const CLIENT_FIELD: &str = "spec.tls.clientCertSecretRef";
const CA_FIELD: &str = "spec.tls.caSecretRef";
const CLIENT_HINT: &str =
    "a client certificate Secret holds tls.crt and tls.key (type kubernetes.io/tls, as cert-manager writes it)";
const CA_HINT: &str = "a CA Secret holds the CA certificate(s) in PEM under ca.crt";

/// What a pass does with a trunk's `trunk_tls` row.
pub(crate) enum TlsRow {
    /// The trunk has no `spec.tls` references: remove any row.
    Absent,
    /// A referenced Secret is missing or unusable: the last stored material stays in use.
    KeepLast,
    Write(TrunkTls),
}

impl TlsRow {
    pub(crate) fn row(&self) -> Option<&TrunkTls> {
        match self {
            TlsRow::Write(row) => Some(row),
            _ => None,
        }
    }
}

/// Resolves a trunk's TLS material. `Ok(None)`: the trunk has no `spec.tls` references.
pub(crate) fn trunk_tls(
    namespace: &str,
    name: &str,
    spec: &TrunkSpec,
    secret: impl Fn(&str) -> Option<SecretData>,
) -> Result<Option<TrunkTls>, TlsMaterialError> {
    let Some(tls) = &spec.tls else { return Ok(None) };
    if tls.client_cert_secret_ref.is_none() && tls.ca_secret_ref.is_none() {
        return Ok(None);
    }
    let read = |secret_name: &str, field: &'static str, keys: &[&'static str], hint: &'static str| {
        let id = format!("{namespace}/{secret_name}");
        let data = secret(secret_name).ok_or_else(|| TlsMaterialError::SecretNotFound { secret: id.clone(), field })?;
        keys.iter()
            .map(|&key| {
                let bytes = data.get(key).ok_or_else(|| TlsMaterialError::KeyNotFound {
                    secret: id.clone(),
                    field,
                    key,
                    hint,
                })?;
                let text = String::from_utf8(bytes.clone())
                    .ok()
                    .filter(|t| t.contains("-----BEGIN "))
                    .ok_or_else(|| TlsMaterialError::NotPem { secret: id.clone(), key })?;
                Ok(text)
            })
            .collect::<Result<Vec<String>, TlsMaterialError>>()
    };
    let mut row = TrunkTls { namespace: namespace.to_string(), trunk_name: name.to_string(), ..TrunkTls::default() };
    if let Some(reference) = &tls.client_cert_secret_ref {
        let mut pair = read(&reference.name, CLIENT_FIELD, &["tls.crt", "tls.key"], CLIENT_HINT)?.into_iter();
        row.client_cert_pem = pair.next();
        row.client_key_pem = pair.next();
        row.client_secret_name = Some(reference.name.clone());
    }
    if let Some(reference) = &tls.ca_secret_ref {
        row.ca_pem = read(&reference.name, CA_FIELD, &["ca.crt"], CA_HINT)?.into_iter().next();
        row.ca_secret_name = Some(reference.name.clone());
    }
    Ok(Some(row))
}

/// Adds the TLS material to a trunk's change hash, so that a renewed certificate (same spec,
/// new Secret data) is written and the nodes pick it up.
pub(crate) fn fingerprint_with_tls(hash: String, tls: Option<&TrunkTls>) -> String {
    let Some(tls) = tls else { return hash };
    let mut hasher = Sha256::new();
    hasher.update(hash.as_bytes());
    for part in [&tls.client_cert_pem, &tls.client_key_pem, &tls.ca_pem, &tls.client_secret_name, &tls.ca_secret_name] {
        hasher.update(b"\0tls\0");
        hasher.update(part.as_deref().unwrap_or("").as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Kind, ResourceKey, Spec};
    use crate::validate::parse_spec;

    fn spec(tls: serde_json::Value) -> TrunkSpec {
        let key = ResourceKey { kind: Kind::Trunk, namespace: "default".into(), name: "t".into() };
        let value = serde_json::json!({
            "provider": "p",
            "authMethod": "certificate",
            "gateways": [{"address": "sip.example.com", "transport": "TLS"}],
            "tls": tls,
        });
        match parse_spec(&key, value).unwrap() {
            Spec::Trunk(spec) => spec,
            other => panic!("not a trunk: {other:?}"),
        }
    }

    fn secrets(name: &str) -> Option<SecretData> {
        let pem = |what: &str| format!("-----BEGIN {what}-----\n{name}\n-----END {what}-----\n").into_bytes();
        match name {
            "client" => Some([("tls.crt".into(), pem("CERTIFICATE")), ("tls.key".into(), pem("PRIVATE KEY"))].into()),
            "ca" => Some([("ca.crt".into(), pem("CERTIFICATE"))].into()),
            "opaque" => Some([("password".into(), b"x".to_vec())].into()),
            _ => None,
        }
    }

    #[test]
    fn the_client_certificate_and_ca_come_from_their_secrets() {
        let spec = spec(serde_json::json!({"clientCertSecretRef": {"name": "client"}, "caSecretRef": {"name": "ca"}}));
        let row = trunk_tls("default", "t", &spec, secrets).unwrap().unwrap();
        assert!(row.client_cert_pem.unwrap().contains("BEGIN CERTIFICATE"));
        assert!(row.client_key_pem.unwrap().contains("BEGIN PRIVATE KEY"));
        assert!(row.ca_pem.unwrap().contains("ca"));
        assert_eq!((row.client_secret_name.as_deref(), row.ca_secret_name.as_deref()), (Some("client"), Some("ca")));
    }

    #[test]
    fn a_missing_secret_or_key_says_which_and_what_it_must_hold() {
        let missing = spec(serde_json::json!({"clientCertSecretRef": {"name": "nope"}}));
        let error = trunk_tls("default", "t", &missing, secrets).unwrap_err().to_string();
        assert!(error.contains("default/nope") && error.contains("clientCertSecretRef"), "{error}");
        let wrong = spec(serde_json::json!({"caSecretRef": {"name": "opaque"}}));
        let error = trunk_tls("default", "t", &wrong, secrets).unwrap_err().to_string();
        assert!(error.contains("no key \"ca.crt\"") && error.contains("PEM"), "{error}");
        let none = spec(serde_json::json!({}));
        assert_eq!(trunk_tls("default", "t", &none, secrets).unwrap(), None);
    }

    #[test]
    fn a_renewed_certificate_changes_the_hash() {
        let spec = spec(serde_json::json!({"clientCertSecretRef": {"name": "client"}}));
        let mut row = trunk_tls("default", "t", &spec, secrets).unwrap().unwrap();
        let before = fingerprint_with_tls("h".into(), Some(&row));
        row.client_cert_pem = Some("-----BEGIN CERTIFICATE-----\nrenewed".into());
        assert_ne!(before, fingerprint_with_tls("h".into(), Some(&row)));
        assert_eq!(fingerprint_with_tls("h".into(), None), "h");
    }
}
