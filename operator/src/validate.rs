//! The one validation path: the same checks run for every source (manifest folder, Kubernetes,
//! REST API), so an invalid spec gets the same message everywhere. Each problem names the field
//! path, what is wrong and what to write instead.
//!
//! The CRD schema (patterns, ranges, CEL rules) catches most of these at `kubectl apply` time;
//! this module repeats them in Rust, and adds what a schema cannot say (regular expressions that
//! must compile, duplicate entries, a trunk listed as its own backup).

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::LazyLock;

use ipnet::IpNet;
use regex::Regex;
use serde::de::DeserializeOwned;
use switchboard_model::config::{Destination, MatchSpec};
use switchboard_model::{AuthMethod, Codec, DestinationType, Direction, SrtpMode, TransferMode, Transport};

use crate::crd::{DECIMAL_PATTERN, E164_PATTERN, NAME_PATTERN, PhoneNumberSpec, RoutingRuleSpec, TrunkSpec};

mod tls;
use crate::source::{Kind, ResourceKey, Spec};
pub use tls::CERTIFICATE_WITHOUT_PEERS;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path in kubectl's notation, e.g. `spec.gateways[0].port`.
    pub path: String,
    /// What is wrong.
    pub problem: String,
    /// What to write instead.
    pub fix: String,
    /// The value is well-formed but names something Switchboard does not implement yet (TLS):
    /// refused with reason `Unsupported` rather than `InvalidSpec`, so that nobody believes it
    /// is in force.
    pub unsupported: bool,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, " ({})", self.fix)?;
        }
        Ok(())
    }
}

/// A resource whose spec cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec {
    pub key: ResourceKey,
    pub errors: Vec<FieldError>,
}

impl InvalidSpec {
    /// Every problem is an unsupported value (the spec is otherwise valid).
    pub fn only_unsupported(&self) -> bool {
        !self.errors.is_empty() && self.errors.iter().all(|e| e.unsupported)
    }
}

impl std::fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is invalid: ", self.key)?;
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// What a TLS gateway on the plain SIP port gets told: providers listen for TLS on 5061.
pub const TLS_ON_5060: &str = "transport TLS on port 5060, the port of plain SIP: providers listen for TLS on 5061 (omit the port to use 5061 or the provider's SRV records)";

/// Things that are valid but probably not meant, one line each with the field path: shown by
/// `switchboard validate`, never a reason to refuse the resource.
pub fn warnings(spec: &Spec) -> Vec<String> {
    let Spec::Trunk(spec) = spec else { return Vec::new() };
    let mut out = Vec::new();
    for (i, gateway) in spec.gateways.iter().enumerate() {
        if gateway.transport == Transport::Tls && gateway.port == Some(5060) {
            out.push(format!("spec.gateways[{i}].port: {TLS_ON_5060}"));
        }
    }
    let srtp = spec.media.as_ref().map(|m| m.srtp).unwrap_or_default();
    if srtp != SrtpMode::Disabled && spec.gateways.iter().any(|g| g.transport != Transport::Tls) {
        out.push(format!("spec.media.srtp: {SRTP_WITHOUT_TLS}"));
    }
    if spec.transfer == TransferMode::Refer && spec.inbound.as_ref().is_some_and(|i| !i.enabled) {
        out.push(format!("spec.transfer: {REFER_WITHOUT_INBOUND}"));
    }
    let names_peers = spec.tls.as_ref().is_some_and(|t| !t.peer_names.is_empty() || !t.peer_fingerprints.is_empty());
    if spec.auth_method == AuthMethod::Certificate && spec.inbound.as_ref().is_none_or(|i| i.enabled) && !names_peers {
        out.push(format!("spec.tls: {CERTIFICATE_WITHOUT_PEERS}"));
    }
    out
}

/// What a `transfer: refer` trunk that takes no calls gets told: a REFER goes to the provider
/// that delivered the call, so the setting only matters for inbound calls.
pub const REFER_WITHOUT_INBOUND: &str =
    "refer is used on calls that came in on this trunk, and inbound is disabled: the setting has no effect";

/// What an SRTP trunk with a gateway on plain SIP gets told: SDES keys are only as secret as
/// the signaling that carries them (RFC 4568 §8.1).
pub const SRTP_WITHOUT_TLS: &str = "SRTP with SDES keys sends its keys in the SDP, readable on a gateway that is not TLS: set every gateways[].transport to TLS";

static E164: LazyLock<Regex> = LazyLock::new(|| Regex::new(E164_PATTERN).expect("E.164 pattern compiles"));
static NAME: LazyLock<Regex> = LazyLock::new(|| Regex::new(NAME_PATTERN).expect("name pattern compiles"));
static DECIMAL: LazyLock<Regex> = LazyLock::new(|| Regex::new(DECIMAL_PATTERN).expect("decimal pattern compiles"));
static PROVIDER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$").expect("provider pattern compiles"));
static HOST: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?$")
        .expect("host pattern compiles")
});
static DIGITS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[0-9*#+]{1,16}$").expect("digits pattern compiles"));
static CURRENCY: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Z]{3}$").expect("currency pattern compiles"));

/// Collects field errors under a path prefix.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), problem: problem.into(), fix: fix.into(), unsupported: false });
    }

    fn name_ref(&mut self, path: &str, value: &str, what: &str) {
        if value.len() > 253 || !NAME.is_match(value) {
            self.push(
                path,
                format!("{value:?} is not a valid {what} name"),
                "write a lower-case name of letters, digits, '-' and '.', as in metadata.name",
            );
        }
    }

    fn e164(&mut self, path: &str, value: &str) {
        if !E164.is_match(value) {
            self.push(
                path,
                format!("{value:?} is not an E.164 number"),
                "write + then the country code and number, digits only, e.g. +15551234567",
            );
        }
    }

    fn range(&mut self, path: &str, value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.push(path, format!("{value} is out of range"), format!("write a value from {min} to {max}"));
        }
    }

    fn host(&mut self, path: &str, value: &str) {
        if value.parse::<IpAddr>().is_err() && (value.len() > 253 || !HOST.is_match(value)) {
            self.push(
                path,
                format!("{value:?} is neither an IP address nor a host name"),
                "write a host name such as sip.example.com or an IP address (IPv6 without brackets)",
            );
        }
    }

    fn http_url(&mut self, path: &str, value: &str) {
        if !(value.starts_with("http://") || value.starts_with("https://")) || value.contains(char::is_whitespace) {
            self.push(path, format!("{value:?} is not an HTTP URL"), "write an http:// or https:// URL");
        }
    }

    fn finish(self, key: &ResourceKey) -> Result<(), InvalidSpec> {
        if self.0.is_empty() { Ok(()) } else { Err(InvalidSpec { key: key.clone(), errors: self.0 }) }
    }
}

/// Turns a manifest's `spec` into the typed spec of `kind`, reporting type errors and unknown
/// fields with their paths. Every source that receives untyped input (YAML files, REST bodies)
/// goes through here.
pub fn parse_spec(key: &ResourceKey, spec: serde_json::Value) -> Result<Spec, InvalidSpec> {
    match key.kind {
        Kind::Trunk => parse_typed::<TrunkSpec>(key, spec).map(Spec::Trunk),
        Kind::PhoneNumber => parse_typed::<PhoneNumberSpec>(key, spec).map(Spec::PhoneNumber),
        Kind::RoutingRule => parse_typed::<RoutingRuleSpec>(key, spec).map(Spec::RoutingRule),
    }
}

fn parse_typed<T: DeserializeOwned>(key: &ResourceKey, spec: serde_json::Value) -> Result<T, InvalidSpec> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path| unknown.push(format!("spec{}", kubectl_path(&path)));
    let result: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(spec, &mut record));
    let mut problems = Problems::default();
    match result {
        Ok(value) => {
            for path in unknown {
                problems.push(
                    path,
                    "unknown field",
                    format!(
                        "remove it or check its spelling against `kubectl explain {}.spec`",
                        key.kind.as_str().to_lowercase()
                    ),
                );
            }
            problems.finish(key).map(|()| value)
        }
        Err(error) => {
            let path = error.path().to_string();
            let path = if path == "." { "spec".to_string() } else { format!("spec.{path}") };
            problems.push(path, error.inner().to_string(), "see the resource's schema in crds/ or examples/");
            Err(InvalidSpec { key: key.clone(), errors: problems.0 })
        }
    }
}

/// Renders a serde_ignored path as kubectl does: `.gateways[0].prot`.
fn kubectl_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", kubectl_path(parent)),
        Path::Map { parent, key } => format!("{}.{key}", kubectl_path(parent)),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            kubectl_path(parent)
        }
    }
}

/// Checks a typed spec. The reconcile core calls this for every resource of every source.
pub fn validate(key: &ResourceKey, spec: &Spec) -> Result<(), InvalidSpec> {
    let mut problems = Problems::default();
    match spec {
        Spec::Trunk(spec) => trunk(&mut problems, &key.name, spec),
        Spec::PhoneNumber(spec) => phone_number(&mut problems, spec),
        Spec::RoutingRule(spec) => routing_rule(&mut problems, spec),
    }
    problems.finish(key)
}

fn trunk(p: &mut Problems, name: &str, spec: &TrunkSpec) {
    if spec.provider.len() > 63 || !PROVIDER.is_match(&spec.provider) {
        p.push(
            "spec.provider",
            format!("{:?} is not a valid provider name", spec.provider),
            "write a short lower-case name such as skyetel or didforsale",
        );
    }
    if spec.display_name.as_ref().is_some_and(|n| n.len() > 253) {
        p.push("spec.displayName", "longer than 253 characters", "shorten it");
    }
    if spec.gateways.is_empty() {
        p.push("spec.gateways", "no gateway", "list at least one gateway: {address: sip.provider.com}");
    }
    if spec.gateways.len() > 16 {
        p.push("spec.gateways", "more than 16 gateways", "list at most 16");
    }
    let mut seen = HashSet::new();
    for (i, gateway) in spec.gateways.iter().enumerate() {
        let path = format!("spec.gateways[{i}]");
        p.host(&format!("{path}.address"), &gateway.address);
        if let Some(port) = gateway.port {
            p.range(&format!("{path}.port"), port.into(), 1, 65535);
        }
        if !seen.insert((gateway.address.to_lowercase(), gateway.port, gateway.transport)) {
            p.push(path, format!("{} is listed twice", gateway.address), "remove the duplicate gateway");
        }
    }
    if let Some(registrar) = &spec.registrar {
        p.host("spec.registrar.address", &registrar.address);
        if let Some(port) = registrar.port {
            p.range("spec.registrar.port", port.into(), 1, 65535);
        }
    }
    if let Some(credentials) = &spec.credentials {
        if credentials.username.is_empty() || credentials.username.len() > 255 {
            p.push(
                "spec.credentials.username",
                "empty or longer than 255 characters",
                "write the provider's SIP username",
            );
        }
        p.name_ref("spec.credentials.passwordSecretRef.name", &credentials.password_secret_ref.name, "Secret");
        if credentials.password_secret_ref.key.is_empty() {
            p.push(
                "spec.credentials.passwordSecretRef.key",
                "empty",
                "write the Secret key that holds the password, e.g. password",
            );
        }
    }
    let tls = spec.tls.as_ref();
    let client_cert = tls.and_then(|t| t.client_cert_secret_ref.as_ref());
    if let Some(reference) = client_cert {
        p.name_ref("spec.tls.clientCertSecretRef.name", &reference.name, "Secret");
    }
    if let Some(reference) = tls.and_then(|t| t.ca_secret_ref.as_ref()) {
        p.name_ref("spec.tls.caSecretRef.name", &reference.name, "Secret");
    }
    if let Some(tls) = tls {
        tls::peers(p, spec.auth_method, tls);
    }
    if spec.auth_method == AuthMethod::Certificate {
        // Mutual TLS: the nodes present the trunk's client certificate, which only TLS carries.
        if client_cert.is_none() {
            p.push(
                "spec.tls.clientCertSecretRef",
                "authMethod certificate needs a client certificate",
                "set spec.tls.clientCertSecretRef to a kubernetes.io/tls Secret (tls.crt, tls.key), e.g. one cert-manager issues",
            );
        }
        for (i, gateway) in spec.gateways.iter().enumerate() {
            if gateway.transport != Transport::Tls {
                p.push(
                    format!("spec.gateways[{i}].transport"),
                    format!(
                        "{} with authMethod certificate: the client certificate is sent over TLS only",
                        gateway.transport
                    ),
                    "set transport: TLS on every gateway of a certificate-auth trunk",
                );
            }
        }
    }
    let registering = spec.registration.as_ref().is_some_and(|r| r.enabled);
    if spec.auth_method == AuthMethod::Digest && spec.credentials.is_none() {
        p.push(
            "spec.credentials",
            "authMethod digest needs credentials",
            "set spec.credentials.username and spec.credentials.passwordSecretRef",
        );
    }
    if registering && spec.credentials.is_none() {
        p.push(
            "spec.credentials",
            "registration needs credentials",
            "set spec.credentials or registration.enabled: false",
        );
    }
    if let Some(registration) = &spec.registration {
        p.range("spec.registration.expiresSeconds", registration.expires_seconds.into(), 60, 86400);
    }
    let inbound_enabled = spec.inbound.as_ref().is_none_or(|i| i.enabled);
    let cidrs = spec.inbound.as_ref().map(|i| i.allowed_source_cidrs.as_slice()).unwrap_or_default();
    for (i, cidr) in cidrs.iter().enumerate() {
        if cidr.parse::<IpNet>().is_err() {
            p.push(
                format!("spec.inbound.allowedSourceCidrs[{i}]"),
                format!("{cidr:?} is not a CIDR"),
                "write a network such as 203.0.113.0/24 or 2001:db8::/32 (a single host is /32 or /128)",
            );
        }
    }
    if cidrs.len() > 64 {
        p.push("spec.inbound.allowedSourceCidrs", "more than 64 networks", "list at most 64");
    }
    if spec.auth_method == AuthMethod::Ip && inbound_enabled && cidrs.is_empty() {
        p.push(
            "spec.inbound.allowedSourceCidrs",
            "authMethod ip with inbound calls needs the provider's networks",
            "list the provider's signaling networks, e.g. [52.41.52.34/32]",
        );
    }
    if let Some(format) = &spec.number_format {
        for (field, value) in [("dialPrefix", &format.dial_prefix), ("prependDigits", &format.prepend_digits)] {
            if let Some(value) = value
                && !DIGITS.is_match(value)
            {
                p.push(
                    format!("spec.numberFormat.{field}"),
                    format!("{value:?} is not a digit string"),
                    "write 1 to 16 of 0-9 * # +",
                );
            }
        }
        p.range("spec.numberFormat.stripDigits", format.strip_digits.into(), 0, 15);
    }
    if spec.codecs.is_empty() || spec.codecs.len() > 8 {
        p.push("spec.codecs", "must list 1 to 8 codecs", "write e.g. [PCMU, PCMA, telephone-event]");
    } else if !spec.codecs.iter().any(|c| matches!(c, Codec::Pcmu | Codec::Pcma)) {
        p.push("spec.codecs", "no audio codec", "add PCMU or PCMA");
    }
    let mut codecs = HashSet::new();
    for (i, codec) in spec.codecs.iter().enumerate() {
        if !codecs.insert(codec) {
            p.push(format!("spec.codecs[{i}]"), format!("{codec} is listed twice"), "remove the duplicate");
        }
    }
    p.range("spec.rtpTimeoutSeconds", spec.rtp_timeout_seconds.into(), 5, 3600);
    p.range("spec.optionsIntervalSeconds", spec.options_interval_seconds.into(), 0, 3600);
    p.range("spec.failoverTimeoutSeconds", spec.failover_timeout_seconds.into(), 1, 120);
    if let Some(limits) = &spec.limits {
        if let Some(max) = limits.max_concurrent_calls {
            p.range("spec.limits.maxConcurrentCalls", max.into(), 1, 1_000_000);
        }
        if let Some(cps) = limits.calls_per_second {
            p.range("spec.limits.callsPerSecond", cps.into(), 1, 10_000);
        }
    }
    if spec.backup_trunks.len() > 8 {
        p.push("spec.backupTrunks", "more than 8 backup trunks", "list at most 8");
    }
    let mut backups = HashSet::new();
    for (i, backup) in spec.backup_trunks.iter().enumerate() {
        let path = format!("spec.backupTrunks[{i}]");
        p.name_ref(&path, backup, "Trunk");
        if backup == name {
            p.push(&path, "a trunk cannot be its own backup", "list other Trunks, or remove the entry");
        } else if !backups.insert(backup) {
            p.push(&path, format!("{backup} is listed twice"), "remove the duplicate");
        }
    }
    if let Some(rates) = &spec.rates {
        for (field, value) in [
            ("perMinuteOutbound", &rates.per_minute_outbound),
            ("perMinuteInbound", &rates.per_minute_inbound),
            ("perMessage", &rates.per_message),
        ] {
            if !DECIMAL.is_match(value) {
                p.push(
                    format!("spec.rates.{field}"),
                    format!("{value:?} is not a decimal amount"),
                    "write a quoted decimal with up to 6 places, e.g. \"0.0025\"",
                );
            }
        }
        if !CURRENCY.is_match(&rates.currency) {
            p.push("spec.rates.currency", format!("{:?} is not an ISO 4217 code", rates.currency), "write e.g. USD");
        }
    }
}

fn phone_number(p: &mut Problems, spec: &PhoneNumberSpec) {
    p.e164("spec.number", &spec.number);
    p.name_ref("spec.trunkRef", &spec.trunk_ref, "Trunk");
    if let Some(rule) = &spec.routing_rule_ref {
        p.name_ref("spec.routingRuleRef", rule, "RoutingRule");
    }
    if spec.routing_rule_ref.is_some() && spec.destination.is_some() {
        p.push("spec.destination", "both routingRuleRef and destination are set", "keep one of them");
    }
    if let Some(destination) = &spec.destination {
        self::destination(p, "spec.destination", destination);
    }
    if let Some(messaging) = &spec.messaging {
        p.http_url("spec.messaging.webhookUrl", &messaging.webhook_url);
    }
}

fn routing_rule(p: &mut Problems, spec: &RoutingRuleSpec) {
    p.range("spec.priority", spec.priority.max(-1) as u64, 0, 10000);
    if spec.priority < 0 {
        p.push("spec.priority", "negative", "write a value from 0 to 10000");
    }
    match_spec(p, &spec.match_spec);
    match spec.direction {
        Direction::Inbound => match &spec.destination {
            Some(destination) => self::destination(p, "spec.destination", destination),
            None => p.push(
                "spec.destination",
                "an inbound rule needs a destination",
                "set destination: {type: websocket, url: wss://agent.example.com/stream}",
            ),
        },
        Direction::Outbound => {
            if spec.trunks.is_empty() {
                p.push("spec.trunks", "an outbound rule needs trunks", "list at least one Trunk name");
            }
            if spec.destination.is_some() {
                p.push(
                    "spec.destination",
                    "an outbound rule has no destination: the dialled number is the destination",
                    "remove destination",
                );
            }
        }
    }
    if spec.trunks.len() > 16 {
        p.push("spec.trunks", "more than 16 trunks", "list at most 16");
    }
    let mut trunks = HashSet::new();
    for (i, trunk) in spec.trunks.iter().enumerate() {
        p.name_ref(&format!("spec.trunks[{i}]"), trunk, "Trunk");
        if !trunks.insert(trunk) {
            p.push(format!("spec.trunks[{i}]"), format!("{trunk} is listed twice"), "remove the duplicate");
        }
    }
    if let Some(url) = &spec.status_callback {
        p.http_url("spec.statusCallback", url);
    }
}

fn match_spec(p: &mut Problems, spec: &MatchSpec) {
    for (i, number) in spec.numbers.iter().enumerate() {
        p.e164(&format!("spec.match.numbers[{i}]"), number);
    }
    for (field, patterns) in
        [("callerPatterns", &spec.caller_patterns), ("destinationPatterns", &spec.destination_patterns)]
    {
        for (i, pattern) in patterns.iter().enumerate() {
            if let Err(error) = Regex::new(pattern) {
                p.push(
                    format!("spec.match.{field}[{i}]"),
                    format!(
                        "{pattern:?} is not a regular expression: {}",
                        error.to_string().lines().last().unwrap_or("")
                    ),
                    "write a regular expression such as ^\\+1[2-9][0-9]{9}$",
                );
            }
        }
    }
}

fn destination(p: &mut Problems, path: &str, destination: &Destination) {
    let kind = destination.kind;
    let misplaced = |field: &str, used_by: DestinationType| FieldError {
        path: format!("{path}.{field}"),
        problem: format!("{field} is only used by {used_by} destinations"),
        fix: format!("remove it, or set type: {used_by}"),
        unsupported: false,
    };
    match (kind, &destination.url) {
        (DestinationType::Websocket, Some(url)) => {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) || url.contains(char::is_whitespace) {
                p.push(format!("{path}.url"), format!("{url:?} is not a WebSocket URL"), "write ws://... or wss://...");
            }
        }
        (DestinationType::Websocket, None) => p.push(
            format!("{path}.url"),
            "a websocket destination needs url",
            "write url: wss://agent.example.com/stream",
        ),
        (_, Some(_)) => p.0.push(misplaced("url", DestinationType::Websocket)),
        (_, None) => {}
    }
    match (kind, &destination.uri) {
        (DestinationType::Sip, Some(uri)) => {
            if !(uri.starts_with("sip:") || uri.starts_with("sips:")) || uri.contains(char::is_whitespace) {
                p.push(format!("{path}.uri"), format!("{uri:?} is not a SIP URI"), "write sip:user@host[:port]");
            }
        }
        (DestinationType::Sip, None) => {
            p.push(format!("{path}.uri"), "a sip destination needs uri", "write uri: sip:agent@10.0.0.5")
        }
        (_, Some(_)) => p.0.push(misplaced("uri", DestinationType::Sip)),
        (_, None) => {}
    }
    match (kind, &destination.number) {
        (DestinationType::Number, Some(number)) => p.e164(&format!("{path}.number"), number),
        (DestinationType::Number, None) => {
            p.push(format!("{path}.number"), "a number destination needs number", "write number: +15551234567")
        }
        (_, Some(_)) => p.0.push(misplaced("number", DestinationType::Number)),
        (_, None) => {}
    }
    if let Some(trunk) = &destination.trunk_ref {
        if kind == DestinationType::Number {
            p.name_ref(&format!("{path}.trunkRef"), trunk, "Trunk");
        } else {
            p.0.push(misplaced("trunkRef", DestinationType::Number));
        }
    }
    if let Some(code) = destination.reject_code {
        if kind == DestinationType::Reject {
            p.range(&format!("{path}.rejectCode"), code.into(), 400, 699);
        } else {
            p.0.push(misplaced("rejectCode", DestinationType::Reject));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(kind: Kind) -> ResourceKey {
        ResourceKey { kind, namespace: "default".into(), name: "skyetel".into() }
    }

    fn check(kind: Kind, spec: serde_json::Value) -> Result<(), InvalidSpec> {
        let key = key(kind);
        let spec = parse_spec(&key, spec)?;
        validate(&key, &spec)
    }

    fn paths(result: Result<(), InvalidSpec>) -> Vec<String> {
        result.expect_err("spec should be invalid").errors.into_iter().map(|e| e.path).collect()
    }

    fn trunk() -> serde_json::Value {
        json!({
            "provider": "skyetel",
            "gateways": [{"address": "sip.skyetel.com"}],
            "inbound": {"allowedSourceCidrs": ["52.41.52.34/32"]}
        })
    }

    /// The node speaks SIP over TLS, so `transport: TLS` is valid (a TLS gateway on 5060 only
    /// warns).
    #[test]
    fn tls_is_accepted_and_tls_on_5060_warns() {
        let mut tls = trunk();
        tls["gateways"] = json!([{"address": "sip.skyetel.com", "transport": "TLS"}]);
        check(Kind::Trunk, tls.clone()).expect("TLS is valid");
        let key = key(Kind::Trunk);
        assert!(warnings(&parse_spec(&key, tls.clone()).unwrap()).is_empty(), "TLS on its default port is fine");
        tls["gateways"][0]["port"] = json!(5060);
        check(Kind::Trunk, tls.clone()).expect("TLS on 5060 is valid");
        let warned = warnings(&parse_spec(&key, tls).unwrap());
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].starts_with("spec.gateways[0].port") && warned[0].contains("5061"), "{warned:?}");
    }

    /// Certificate authentication (mutual TLS) is valid with a client certificate Secret and
    /// TLS gateways only; each missing piece is named with what to write.
    #[test]
    fn certificate_auth_needs_a_client_certificate_and_tls_gateways() {
        let mut certificate = trunk();
        certificate["authMethod"] = json!("certificate");
        certificate["gateways"] = json!([{"address": "sip.skyetel.com", "transport": "TLS"}]);
        certificate["tls"] =
            json!({"clientCertSecretRef": {"name": "skyetel-client"}, "caSecretRef": {"name": "skyetel-ca"}});
        check(Kind::Trunk, certificate.clone()).expect("certificate auth with a client certificate over TLS");

        let mut no_cert = certificate.clone();
        no_cert["tls"] = json!({"caSecretRef": {"name": "skyetel-ca"}});
        let invalid = check(Kind::Trunk, no_cert).expect_err("a client certificate is required");
        assert!(!invalid.only_unsupported(), "malformed, not unsupported: {invalid}");
        assert_eq!(invalid.errors[0].path, "spec.tls.clientCertSecretRef");
        assert!(invalid.errors[0].fix.contains("kubernetes.io/tls"), "{invalid}");

        let mut udp = certificate.clone();
        udp["gateways"] = json!([{"address": "sip.skyetel.com", "transport": "TLS"}, {"address": "sip2.skyetel.com"}]);
        let invalid = check(Kind::Trunk, udp).expect_err("every gateway must be TLS");
        assert_eq!(invalid.errors[0].path, "spec.gateways[1].transport", "{invalid}");
        assert!(invalid.errors[0].fix.contains("transport: TLS"), "{invalid}");

        let mut bad_name = certificate;
        bad_name["tls"]["clientCertSecretRef"]["name"] = json!("Not A Name");
        let invalid = check(Kind::Trunk, bad_name).expect_err("a Secret name");
        assert_eq!(invalid.errors[0].path, "spec.tls.clientCertSecretRef.name", "{invalid}");
    }

    /// `tls.peerNames` and `tls.peerFingerprints` (inbound mutual TLS): well-formed entries on a
    /// certificate-auth trunk are valid; a malformed one, or either list on another trunk, is
    /// named with what to write; a certificate-auth trunk taking calls without them warns.
    #[test]
    fn tls_peers_are_checked_and_certificate_auth_without_them_warns() {
        let key = key(Kind::Trunk);
        let mut certificate = trunk();
        certificate["authMethod"] = json!("certificate");
        certificate["gateways"] = json!([{"address": "sip.skyetel.com", "transport": "TLS"}]);
        certificate["tls"] = json!({"clientCertSecretRef": {"name": "skyetel-client"}});
        let warned = warnings(&parse_spec(&key, certificate.clone()).unwrap());
        assert!(
            warned.len() == 1 && warned[0].starts_with("spec.tls:") && warned[0].contains("peerNames"),
            "{warned:?}"
        );

        let pin = "0A:".repeat(31) + "ff";
        certificate["tls"]["peerNames"] = json!(["sip.skyetel.com", "sip:edge.skyetel.com"]);
        certificate["tls"]["peerFingerprints"] = json!([pin]);
        check(Kind::Trunk, certificate.clone()).expect("names and a pin on a certificate-auth trunk");
        assert!(warnings(&parse_spec(&key, certificate.clone()).unwrap()).is_empty());

        let mut bad = certificate.clone();
        bad["tls"]["peerNames"] = json!(["sip.skyetel.com", "two names"]);
        bad["tls"]["peerFingerprints"] = json!(["AB:CD"]);
        let invalid = check(Kind::Trunk, bad).expect_err("malformed entries");
        let found: Vec<&str> = invalid.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(found, ["spec.tls.peerNames[1]", "spec.tls.peerFingerprints[0]"], "{invalid}");
        assert!(invalid.errors[1].fix.contains("openssl x509"), "{invalid}");

        let mut digest = trunk();
        digest["tls"] = json!({"peerFingerprints": [pin]});
        let invalid = check(Kind::Trunk, digest).expect_err("peers without certificate auth");
        assert_eq!(invalid.errors[0].path, "spec.tls.peerFingerprints", "{invalid}");
        assert!(invalid.errors[0].fix.contains("authMethod: certificate"), "{invalid}");
    }

    /// `media.srtp` takes the three modes; SRTP over a gateway that is not TLS is valid but
    /// warned about (the SDES keys travel in the clear), and a misspelt mode is refused with the
    /// accepted ones.
    /// `transfer` takes `refer` and `none` (the default) and nothing else; `refer` on a trunk
    /// without inbound calls warns.
    #[test]
    fn transfer_modes_are_checked_and_refer_without_inbound_warns() {
        let key = key(Kind::Trunk);
        let Spec::Trunk(parsed) = parse_spec(&key, trunk()).unwrap() else { panic!("a trunk") };
        assert_eq!(parsed.transfer, TransferMode::None, "the default");
        let mut spec = trunk();
        spec["transfer"] = json!("refer");
        check(Kind::Trunk, spec.clone()).expect("refer is valid");
        let Spec::Trunk(parsed) = parse_spec(&key, spec.clone()).unwrap() else { panic!("a trunk") };
        assert_eq!(parsed.transfer, TransferMode::Refer);
        assert!(warnings(&parse_spec(&key, spec.clone()).unwrap()).is_empty());
        spec["inbound"] = json!({"enabled": false});
        let warned = warnings(&parse_spec(&key, spec).unwrap());
        assert!(warned.len() == 1 && warned[0].starts_with("spec.transfer:"), "{warned:?}");
        let mut wrong = trunk();
        wrong["transfer"] = json!("blind");
        let text = check(Kind::Trunk, wrong).expect_err("an unknown mode is refused").to_string();
        assert!(text.contains("transfer") && text.contains("refer") && text.contains("none"), "{text}");
    }

    #[test]
    fn media_srtp_modes_are_accepted_and_srtp_without_tls_warns() {
        let key = key(Kind::Trunk);
        for mode in ["required", "optional", "disabled"] {
            let mut spec = trunk();
            spec["media"] = json!({"srtp": mode});
            check(Kind::Trunk, spec.clone()).unwrap_or_else(|e| panic!("{mode}: {e}"));
            let Spec::Trunk(parsed) = parse_spec(&key, spec.clone()).unwrap() else { panic!("a trunk") };
            assert_eq!(parsed.media.unwrap().srtp.as_str(), mode);
            let warned = warnings(&parse_spec(&key, spec.clone()).unwrap());
            if mode == "disabled" {
                assert!(warned.is_empty(), "{warned:?}");
            } else {
                assert_eq!(warned.len(), 1, "{mode}: {warned:?}");
                assert!(warned[0].starts_with("spec.media.srtp") && warned[0].contains("TLS"), "{warned:?}");
                spec["gateways"] = json!([{"address": "sip.skyetel.com", "transport": "TLS"}]);
                assert!(warnings(&parse_spec(&key, spec).unwrap()).is_empty(), "{mode} over TLS is fine");
            }
        }
        // `srtp: off` unquoted reaches the API server as the boolean false (YAML 1.1).
        let mut boolean = trunk();
        boolean["media"] = json!({"srtp": false});
        check(Kind::Trunk, boolean).expect_err("a boolean is refused");
        let mut wrong = trunk();
        wrong["media"] = json!({"srtp": "mandatory"});
        let invalid = check(Kind::Trunk, wrong).expect_err("an unknown mode is refused");
        let text = invalid.to_string();
        assert!(text.contains("spec.media.srtp") || text.contains("media"), "{text}");
        assert!(text.contains("required") && text.contains("optional") && text.contains("disabled"), "{text}");
    }

    #[test]
    fn minimal_trunk_is_valid_and_defaulted() {
        let key = key(Kind::Trunk);
        let Spec::Trunk(spec) = parse_spec(&key, trunk()).unwrap() else { panic!("not a trunk") };
        validate(&key, &Spec::Trunk(spec.clone())).unwrap();
        assert_eq!(spec.auth_method, AuthMethod::Ip);
        assert_eq!(spec.codecs, vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent]);
        assert_eq!(spec.gateways[0].priority, 10);
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        let mut spec = trunk();
        spec["gateways"][0]["prot"] = json!(5060);
        spec["colour"] = json!("blue");
        let mut found = paths(check(Kind::Trunk, spec));
        found.sort();
        assert_eq!(found, vec!["spec.colour", "spec.gateways[0].prot"]);
    }

    #[test]
    fn type_errors_name_the_field() {
        let mut spec = trunk();
        spec["gateways"][0]["port"] = json!(70000);
        let error = check(Kind::Trunk, spec).unwrap_err();
        assert_eq!(error.errors[0].path, "spec.gateways[0].port");
        assert!(error.to_string().starts_with("Trunk default/skyetel is invalid: spec.gateways[0].port"));
    }

    #[test]
    fn cross_field_rules_hold() {
        let mut spec = trunk();
        spec["authMethod"] = json!("digest");
        assert_eq!(paths(check(Kind::Trunk, spec)), vec!["spec.credentials"]);

        let mut spec = trunk();
        spec["inbound"] = json!({});
        assert_eq!(paths(check(Kind::Trunk, spec)), vec!["spec.inbound.allowedSourceCidrs"]);

        let mut spec = trunk();
        spec["inbound"] = json!({"enabled": false});
        check(Kind::Trunk, spec).unwrap();
    }

    #[test]
    fn bad_values_are_each_reported() {
        let mut spec = trunk();
        spec["inbound"]["allowedSourceCidrs"] = json!(["10.0.0.0/33", "52.41.52.34/32"]);
        spec["backupTrunks"] = json!(["skyetel"]);
        spec["rates"] = json!({"perMinuteOutbound": "0.1.2", "currency": "usd"});
        spec["codecs"] = json!(["telephone-event"]);
        spec["gateways"][0]["address"] = json!("not a host");
        let mut found = paths(check(Kind::Trunk, spec));
        found.sort();
        assert_eq!(
            found,
            vec![
                "spec.backupTrunks[0]",
                "spec.codecs",
                "spec.gateways[0].address",
                "spec.inbound.allowedSourceCidrs[0]",
                "spec.rates.currency",
                "spec.rates.perMinuteOutbound",
            ]
        );
    }

    #[test]
    fn numbers_must_be_e164() {
        let spec = json!({"number": "5551234567", "trunkRef": "skyetel"});
        assert_eq!(paths(check(Kind::PhoneNumber, spec)), vec!["spec.number"]);
        let spec = json!({"number": "+15551234567", "trunkRef": "skyetel",
            "destination": {"type": "websocket", "url": "https://agent"}});
        assert_eq!(paths(check(Kind::PhoneNumber, spec)), vec!["spec.destination.url"]);
    }

    #[test]
    fn rules_check_direction_specific_fields() {
        let spec = json!({"direction": "outbound", "match": {"destinationPatterns": ["^+1("]}});
        let mut found = paths(check(Kind::RoutingRule, spec));
        found.sort();
        assert_eq!(found, vec!["spec.match.destinationPatterns[0]", "spec.trunks"]);
        let spec = json!({"direction": "inbound", "destination": {"type": "sip", "uri": "sip:a@b", "url": "ws://x"}});
        assert_eq!(paths(check(Kind::RoutingRule, spec)), vec!["spec.destination.url"]);
        let spec = json!({"direction": "sideways"});
        assert_eq!(paths(check(Kind::RoutingRule, spec)), vec!["spec.direction"]);
    }
}
