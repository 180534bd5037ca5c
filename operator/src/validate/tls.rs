//! `spec.tls` of a Trunk beyond its Secret references: the peers of inbound mutual TLS
//! (`tls.peerNames`, `tls.peerFingerprints`), checked here and in the CRD's schema and CEL.

use std::sync::LazyLock;

use regex::Regex;
use switchboard_model::AuthMethod;

use super::Problems;
use crate::crd::TrunkTlsSpec;

/// What a certificate-auth trunk that takes calls but names no peer certificate gets told: its
/// inbound calls are admitted by source address, as before inbound mutual TLS existed.
pub const CERTIFICATE_WITHOUT_PEERS: &str = "inbound calls on this certificate-auth trunk are admitted by source address only (inbound.allowedSourceCidrs, gateway addresses): list the provider's certificate in tls.peerNames or tls.peerFingerprints to require it";

/// A SHA-256 fingerprint as OpenSSL prints it: 32 hex byte pairs separated by colons.
static FINGERPRINT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$").expect("fingerprint pattern compiles"));

/// `tls.peerNames` and `tls.peerFingerprints`: well-formed, and only on a certificate-auth
/// trunk (elsewhere nothing would check them, and someone would believe they are in force).
pub(super) fn peers(p: &mut Problems, auth_method: AuthMethod, tls: &TrunkTlsSpec) {
    for (field, len) in [("peerNames", tls.peer_names.len()), ("peerFingerprints", tls.peer_fingerprints.len())] {
        if len > 16 {
            p.push(format!("spec.tls.{field}"), format!("{len} entries"), "list at most 16");
        }
    }
    for (i, name) in tls.peer_names.iter().enumerate() {
        if name.is_empty() || name.len() > 253 || name.contains(|c: char| c.is_whitespace() || c == ',') {
            p.push(
                format!("spec.tls.peerNames[{i}]"),
                format!("{name:?} is not a certificate name"),
                "write the DNS name (sip.carrier.example) or SIP URI (sip:carrier.example) the provider's certificate carries",
            );
        }
    }
    for (i, pin) in tls.peer_fingerprints.iter().enumerate() {
        if !FINGERPRINT.is_match(pin) {
            p.push(
                format!("spec.tls.peerFingerprints[{i}]"),
                format!("{pin:?} is not a SHA-256 fingerprint"),
                "write 32 hex byte pairs separated by colons, as `openssl x509 -noout -fingerprint -sha256 -in cert.pem` prints them",
            );
        }
    }
    let names_peers = !tls.peer_names.is_empty() || !tls.peer_fingerprints.is_empty();
    if names_peers && auth_method != AuthMethod::Certificate {
        let field = if tls.peer_names.is_empty() { "spec.tls.peerFingerprints" } else { "spec.tls.peerNames" };
        p.push(
            field,
            format!("authMethod is {auth_method}: the caller's client certificate is only checked with authMethod certificate"),
            "set authMethod: certificate, or remove tls.peerNames and tls.peerFingerprints",
        );
    }
}
