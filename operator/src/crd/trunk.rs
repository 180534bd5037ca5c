//! The `Trunk` resource: one connection to a wholesale SIP provider.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use switchboard_model::{AuthMethod, Codec, SrtpMode, TransferMode, Transport};

use super::status::{Condition, NodeCounts};

/// A connection to a wholesale SIP provider (Skyetel, DIDForSale, ...): where to send calls,
/// how to authenticate, registration, limits, failover and rates.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "switchboard.dev",
    version = "v1alpha1",
    kind = "Trunk",
    namespaced,
    status = "TrunkStatus",
    shortname = "trunk",
    category = "switchboard",
    derive = "PartialEq",
    cel,
    doc = "A connection to a wholesale SIP provider: gateways, authentication, registration, limits, failover and rates.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Registered",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Registered\")].status"
    ),
    printcolumn(name = "Active", type_ = "integer", json_path = ".status.activeCalls"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("self.authMethod != 'digest' || has(self.credentials)")
        .message("authMethod digest needs credentials: set spec.credentials.username and spec.credentials.passwordSecretRef")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.registration) || !self.registration.enabled || has(self.credentials)")
        .message("registration needs credentials: set spec.credentials or registration.enabled: false")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.authMethod != 'ip' || (has(self.inbound) && ((has(self.inbound.enabled) && !self.inbound.enabled) || (has(self.inbound.allowedSourceCidrs) && size(self.inbound.allowedSourceCidrs) > 0)))")
        .message("authMethod ip with inbound calls needs spec.inbound.allowedSourceCidrs: list the provider's signaling networks")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.codecs) || self.codecs.exists(c, c == 'PCMU' || c == 'PCMA')")
        .message("codecs must include an audio codec: add PCMU or PCMA"),
    validation = Rule::new("!has(self.authMethod) || self.authMethod != 'certificate' || (has(self.tls) && has(self.tls.clientCertSecretRef))")
        .message("authMethod certificate needs a client certificate: set spec.tls.clientCertSecretRef to a kubernetes.io/tls Secret (tls.crt, tls.key)")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.authMethod) || self.authMethod != 'certificate' || self.gateways.all(g, has(g.transport) && g.transport == 'TLS')")
        .message("authMethod certificate needs TLS gateways: set transport: TLS on every gateway (a client certificate is only sent over TLS)"),
    validation = Rule::new("(has(self.authMethod) && self.authMethod == 'certificate') || !has(self.tls) || ((!has(self.tls.peerNames) || size(self.tls.peerNames) == 0) && (!has(self.tls.peerFingerprints) || size(self.tls.peerFingerprints) == 0))")
        .message("tls.peerNames and tls.peerFingerprints admit inbound calls by the caller's client certificate: set authMethod: certificate, or remove them")
)]
#[serde(rename_all = "camelCase")]
pub struct TrunkSpec {
    /// Provider name used in CDRs and metrics, e.g. `skyetel`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$"))]
    pub provider: String,

    /// Human-readable name (the API's `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,

    /// Provider signaling addresses. Failover goes by ascending priority, spread by weight.
    #[schemars(length(min = 1, max = 16))]
    pub gateways: Vec<Gateway>,

    /// Registrar, when it differs from the first gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registrar: Option<Registrar>,

    /// Digest credentials: username and realm here, the password only in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,

    /// How the provider and Switchboard authenticate each other: `ip`, `digest`, `none` or
    /// `certificate` (mutual TLS: the nodes present `tls.clientCertSecretRef` on the trunk's
    /// TLS gateways, which must all use `transport: TLS`; with `tls.peerNames` or
    /// `tls.peerFingerprints`, inbound calls need the provider's client certificate too).
    #[serde(default = "default_auth_method")]
    pub auth_method: AuthMethod,

    /// The trunk's own TLS material, from Secrets of its namespace that carry the label
    /// `switchboard.dev/credentials=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TrunkTlsSpec>,

    /// REGISTER to the provider (only providers that deliver calls to a registered contact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<RegistrationSpec>,

    /// Calls from the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundSpec>,

    /// Calls to the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundSpec>,

    /// How dialled numbers are rewritten before they are sent to the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number_format: Option<NumberFormat>,

    /// Codecs offered, in order of preference.
    #[serde(default = "default_codecs")]
    #[schemars(length(min = 1, max = 8))]
    pub codecs: Vec<Codec>,

    /// Relay DTMF as RFC 4733 telephone-events.
    #[serde(default = "default_true")]
    pub dtmf_relay: bool,

    /// Media protection on this trunk's call legs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaSpec>,

    /// Whether the provider takes REFER (RFC 3515) for call transfers: `refer` lets the
    /// `refer` mode of `POST /api/calls/{id}/transfer` ask the provider to call the target
    /// itself (the node then leaves the call); `none` (the default) refuses that mode with 409.
    /// Blind and warm transfers, which the node carries out itself, work either way.
    #[serde(default, skip_serializing_if = "is_no_transfer")]
    pub transfer: TransferMode,

    /// End a call after this many seconds without RTP.
    #[serde(default = "default_rtp_timeout")]
    #[schemars(range(min = 5, max = 3600))]
    pub rtp_timeout_seconds: u32,

    /// Interval of OPTIONS keepalives to the gateways; 0 turns them off.
    #[serde(default = "default_options_interval")]
    #[schemars(range(max = 3600))]
    pub options_interval_seconds: u32,

    /// How long an outbound attempt may go unanswered (no provisional response) before the next
    /// gateway or trunk is tried.
    #[serde(default = "default_failover_timeout")]
    #[schemars(range(min = 1, max = 120))]
    pub failover_timeout_seconds: u32,

    /// Call and rate limits of the trunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,

    /// Trunks (same namespace) tried when this one fails or is at its limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))").message("backupTrunks must be Trunk names"))]
    pub backup_trunks: Vec<String>,

    /// Prices, used for CDR costs and stats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,

    /// Stop using the trunk without deleting it (the API's `activate` clears it).
    #[serde(default)]
    pub suspend: bool,
}

impl TrunkSpec {
    /// The Secrets (same namespace) the trunk reads: its password and its TLS material.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        let password = self.credentials.as_ref().map(|c| c.password_secret_ref.name.as_str());
        let tls = self.tls.as_ref();
        let client = tls.and_then(|t| t.client_cert_secret_ref.as_ref()).map(|r| r.name.as_str());
        let ca = tls.and_then(|t| t.ca_secret_ref.as_ref()).map(|r| r.name.as_str());
        password.into_iter().chain(client).chain(ca)
    }
}

/// One provider address.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    /// Host name or IP address (IPv6 without brackets).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9.:]*[A-Za-z0-9])?$"))]
    pub address: String,
    /// Port; defaults to 5060 (5061 for TLS). Omit it to resolve SRV records. A TLS gateway on
    /// 5060 is accepted, and `switchboard validate` warns about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// UDP, TCP or TLS (SIP over TLS, certificate checked against the web PKI roots or the
    /// nodes' `--sip-tls-ca-file`).
    #[serde(default = "default_transport")]
    pub transport: Transport,
    /// Lower is tried first.
    #[serde(default = "default_priority")]
    #[schemars(range(max = 65535))]
    pub priority: u16,
    /// Share of calls within the same priority.
    #[serde(default = "default_weight")]
    #[schemars(range(max = 65535))]
    pub weight: u16,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// The registrar, when it is not the first gateway.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Registrar {
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9.:]*[A-Za-z0-9])?$"))]
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
}

/// Digest credentials.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    #[schemars(length(min = 1, max = 255))]
    pub username: String,
    /// Digest realm; any realm the provider challenges with is accepted when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    /// The Secret (same namespace) and key that hold the password.
    pub password_secret_ref: SecretKeyRef,
}

/// A trunk's own TLS material and who may call in over mutual TLS.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrunkTlsSpec {
    /// A `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`; cert-manager writes these) whose
    /// certificate the nodes present on this trunk's outbound TLS connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
    /// A Secret with key `ca.crt`: the CA(s) the gateways' certificates must chain to, instead
    /// of the web PKI roots; also what an inbound peer's certificate must chain to for
    /// `peerNames`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretRef>,
    /// Inbound mutual TLS (`authMethod: certificate`): the provider's certificate must carry one
    /// of these names, as a DNS subject alternative name, a `sip:`/`sips:` URI one (its host or
    /// the whole URI), or the subject CN of a certificate with neither (RFC 5922; no wildcard
    /// matching), and chain to `caSecretRef` (the web PKI roots and the nodes'
    /// `--sip-tls-ca-file` without it). Without peerNames and peerFingerprints inbound calls are
    /// admitted by source address, as on an `ip` trunk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253), regex(pattern = r"^[^\s,]+$")))]
    pub peer_names: Vec<String>,
    /// Inbound mutual TLS: SHA-256 fingerprints (colon hex, as `openssl x509 -noout -fingerprint
    /// -sha256` prints them) of provider certificates admitted as they are, self-signed or not
    /// (pinning); their validity dates are still checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$")))]
    pub peer_fingerprints: Vec<String>,
}

/// A Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// A key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Registration with the provider.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Requested registration lifetime; refreshed before it ends.
    #[serde(default = "default_registration_expires")]
    #[schemars(range(min = 60, max = 86400))]
    pub expires_seconds: u32,
}

/// Calls from the provider.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboundSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Source networks the provider signals from, e.g. `52.41.52.34/32`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 3, max = 49)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("allowedSourceCidrs must be CIDRs such as 203.0.113.0/24 or 2001:db8::/32"))]
    pub allowed_source_cidrs: Vec<String>,
}

/// Media protection of a trunk's legs.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaSpec {
    /// SRTP with SDES keys (RFC 4568 `a=crypto`, AES_CM_128_HMAC_SHA1_80 or _32): `required`
    /// (plain RTP offers from the provider get 488; offers to it are `RTP/SAVP`), `optional`
    /// (SRTP when the provider does it; offers to it are `RTP/AVP` with `a=crypto`) or
    /// `disabled` (the default). Each leg of a call negotiates on its own: an SRTP provider leg bridges
    /// to a plain-RTP callee or to an AI agent. SRTP legs are relayed in user space, never by
    /// the kernel fast path. SDES keys travel in the SDP: use TLS gateways with it.
    #[serde(default)]
    pub srtp: SrtpMode,
}

/// Calls to the provider.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboundSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// Number rewriting towards the provider: strip, then prepend, then the dial prefix.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NumberFormat {
    /// Prefix the provider expects before every number (e.g. a tech prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9*#+]{1,16}$"))]
    pub dial_prefix: Option<String>,
    /// Leading characters removed from the dialled number.
    #[serde(default)]
    #[schemars(range(max = 15))]
    pub strip_digits: u32,
    /// Digits added in front of the number after stripping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9*#+]{1,16}$"))]
    pub prepend_digits: Option<String>,
}

/// Limits the provider enforces; Switchboard enforces them first.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_concurrent_calls: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub calls_per_second: Option<u32>,
}

/// Prices as decimal strings (never floats), e.g. `"0.0025"`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rates {
    #[serde(default = "default_zero")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(\.[0-9]{1,6})?$"))]
    pub per_minute_outbound: String,
    #[serde(default = "default_zero")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(\.[0-9]{1,6})?$"))]
    pub per_minute_inbound: String,
    #[serde(default = "default_zero")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(\.[0-9]{1,6})?$"))]
    pub per_message: String,
    /// ISO 4217 code.
    #[serde(default = "default_currency")]
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
}

/// What the operator and the nodes observed about a trunk.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrunkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Nodes that applied the configuration holding the last change, of all live nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
    /// Nodes registered with the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_nodes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_calls: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_last_hour: Option<u32>,
}

fn default_true() -> bool {
    true
}
fn default_auth_method() -> AuthMethod {
    AuthMethod::Ip
}
fn default_codecs() -> Vec<Codec> {
    vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent]
}
fn default_rtp_timeout() -> u32 {
    60
}
fn default_options_interval() -> u32 {
    30
}
fn default_failover_timeout() -> u32 {
    5
}
fn default_transport() -> Transport {
    Transport::Udp
}
fn default_priority() -> u16 {
    10
}
fn default_weight() -> u16 {
    100
}
fn default_password_key() -> String {
    "password".into()
}
fn default_registration_expires() -> u32 {
    3600
}
fn default_zero() -> String {
    "0".into()
}
fn default_currency() -> String {
    "USD".into()
}

/// Leaves the default `transfer` out of a serialized spec (its hash stays what it was before
/// the field existed).
fn is_no_transfer(mode: &TransferMode) -> bool {
    *mode == TransferMode::None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator watches (and re-reconciles a trunk on) every Secret the trunk reads: the
    /// password's and the TLS material's.
    #[test]
    fn secret_names_lists_the_password_and_tls_secrets() {
        let spec: TrunkSpec = serde_json::from_value(serde_json::json!({
            "provider": "p",
            "authMethod": "certificate",
            "gateways": [{"address": "sip.example.com", "transport": "TLS"}],
            "credentials": {"username": "u", "passwordSecretRef": {"name": "pw"}},
            "tls": {"clientCertSecretRef": {"name": "client"}, "caSecretRef": {"name": "ca"}},
        }))
        .unwrap();
        assert_eq!(spec.secret_names().collect::<Vec<_>>(), ["pw", "client", "ca"]);
        let plain: TrunkSpec =
            serde_json::from_value(serde_json::json!({"provider": "p", "gateways": [{"address": "a.example"}]}))
                .unwrap();
        assert_eq!(plain.secret_names().count(), 0);
    }
}
