//! Inbound mutual TLS: whether a request on a certificate-auth trunk comes from the peer the
//! trunk names (`tls.peerNames`, `tls.peerFingerprints`).
//!
//! What a telecom engineer expects, and what this does:
//! - **Over TLS, with a certificate.** A request over UDP or TCP, or over a TLS connection whose
//!   client presented no certificate, is refused: the certificate is the trunk's credential.
//! - **Pinned fingerprints** (`peerFingerprints`): the SHA-256 of the presented leaf equals one
//!   of them. No CA is needed (a self-signed certificate is fine), as with an SSH host key;
//!   the holder proved its key in the handshake ([`super::verifier`]).
//! - **Names** (`peerNames`): the chain the client sent verifies against the trunk's CA
//!   (`tls.caSecretRef`), or without one against the web PKI roots and `--sip-tls-ca-file`
//!   (as Microsoft Teams Direct Routing identifies SBCs by public certificates); its extended
//!   key usage may be clientAuth or serverAuth (a SIP peer's one certificate serves both
//!   directions, RFC 5922, and public CAs issue serverAuth-only certificates now). Then a name
//!   must match exactly, case-insensitively: a DNS subject alternative name, a `sip:`/`sips:`
//!   URI one (its host, or the URI as written), or the subject CN only when the certificate has
//!   neither (RFC 5922 §7.1). Wildcards in the certificate are not expanded (RFC 5922 §7.2).
//! - **Validity dates** are checked for both: an expired pinned certificate is refused too,
//!   with the date, rather than silently trusted forever.
//! - **Source address**: when the trunk lists `inbound.allowedSourceCidrs`, the request must
//!   also come from there; without them the certificate alone admits (a carrier's TLS edge
//!   often has many addresses).
//!
//! A refusal is a `403` whose `Reason` says what was presented (names and fingerprint), so the
//! provider's engineer can see which certificate their side sent; it is counted in
//! `switchboard_sip_tls_peer_refused_total{trunk,reason}`.

use std::net::IpAddr;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use switchboard_model::{TrunkConfig, TrunkTls};

use super::peer::PeerCertificate;
use crate::sip::routing;
use crate::sip::transport::{Peer, Protocol};

/// Why a request on a certificate-auth trunk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("trunk {trunk} admits callers by client certificate over TLS, and this request came over {transport}")]
    NotTls { trunk: String, transport: &'static str },
    #[error("trunk {trunk} admits callers by client certificate, and none was presented on this TLS connection")]
    NoCertificate { trunk: String },
    #[error("source {from} is not in trunk {trunk}'s inbound.allowedSourceCidrs")]
    Source { trunk: String, from: IpAddr },
    #[error("client certificate [{presented}] {when}")]
    NotValidNow { presented: String, when: String },
    #[error("client certificate [{presented}] not trusted for trunk {trunk}: {why}")]
    Untrusted { trunk: String, presented: String, why: String },
    #[error("client certificate [{presented}] matches no tls.peerNames or tls.peerFingerprints of trunk {trunk}")]
    NoMatch { trunk: String, presented: String },
    #[error("the TLS material of trunk {trunk} is unusable: {problem}")]
    Material { trunk: String, problem: String },
}

impl PeerRefusal {
    /// The `reason` label of the refusal metric.
    pub fn label(&self) -> &'static str {
        match self {
            PeerRefusal::NotTls { .. } => "not_tls",
            PeerRefusal::NoCertificate { .. } => "no_certificate",
            PeerRefusal::Source { .. } => "source",
            PeerRefusal::NotValidNow { .. } => "expired",
            PeerRefusal::Untrusted { .. } => "untrusted",
            PeerRefusal::NoMatch { .. } => "no_match",
            PeerRefusal::Material { .. } => "material",
        }
    }
}

/// What the check needs besides the trunk and the certificate.
pub struct Context<'a> {
    /// The trunk's TLS material (its CA, `ca.crt` of `tls.caSecretRef`).
    pub material: Option<&'a TrunkTls>,
    /// The node's `--sip-tls-ca-file` CAs, trusted with the web PKI for trunks without a CA.
    pub extra_ca: &'a [CertificateDer<'static>],
    pub now: UnixTime,
}

/// Whether a request from `peer`, whose connection presented `cert`, may use `trunk` (one that
/// [`TrunkConfig::requires_peer_certificate`]). See the module documentation for the rules.
pub fn check(
    trunk: &TrunkConfig,
    peer: Peer,
    cert: Option<&PeerCertificate>,
    context: &Context<'_>,
) -> Result<(), PeerRefusal> {
    let name = || format!("{}/{}", trunk.namespace, trunk.name);
    if peer.protocol != Protocol::Tls {
        return Err(PeerRefusal::NotTls { trunk: name(), transport: peer.protocol.as_str() });
    }
    if !trunk.allowed_source_cidrs.is_empty() && !routing::trunk_accepts_source(trunk, peer.addr.ip()) {
        return Err(PeerRefusal::Source { trunk: name(), from: peer.addr.ip() });
    }
    let Some(cert) = cert else { return Err(PeerRefusal::NoCertificate { trunk: name() }) };
    let presented = || cert.describe();
    if let Some(when) = outside_validity(cert, context.now) {
        return Err(PeerRefusal::NotValidNow { presented: presented(), when });
    }
    if trunk.tls_peer_fingerprints.iter().any(|pin| pin.eq_ignore_ascii_case(&cert.fingerprint)) {
        return Ok(());
    }
    if trunk.tls_peer_names.is_empty() {
        return Err(PeerRefusal::NoMatch { trunk: name(), presented: presented() });
    }
    let ca = trusted_roots(context).map_err(|problem| PeerRefusal::Material { trunk: name(), problem })?;
    if let Err(error) = verify_chain(&cert.chain, &ca.anchors, context.now) {
        let why = explain(&error, &ca.origin);
        return Err(PeerRefusal::Untrusted { trunk: name(), presented: presented(), why });
    }
    if names_match(cert, &trunk.tls_peer_names) {
        Ok(())
    } else {
        Err(PeerRefusal::NoMatch { trunk: name(), presented: presented() })
    }
}

/// [`check`] for a request that arrived at this node: what the connection presented, the
/// trunk's CA from `snapshot`, the node's CAs; a refusal is counted and logged, and its text is
/// what the caller's `403` says.
pub(crate) fn admit(
    tls: Option<&super::TlsLayer>,
    snapshot: &crate::config::Snapshot,
    trunk: &TrunkConfig,
    peer: Peer,
    metrics: &crate::metrics::NodeMetrics,
) -> Result<(), String> {
    let cert = tls.and_then(|t| t.peer_certificate(peer.addr));
    let context = Context {
        material: snapshot.trunk_tls(&trunk.namespace, &trunk.name).map(|m| &**m),
        extra_ca: tls.map(|t| t.client().extra_ca()).unwrap_or(&[]),
        now: UnixTime::now(),
    };
    check(trunk, peer, cert.as_deref(), &context).map_err(|refusal| {
        metrics.tls_peer_refused(&trunk.name, refusal.label());
        tracing::debug!(peer = %peer.addr, trunk = %trunk.name, %refusal, "request refused: client certificate");
        refusal.to_string()
    })
}

/// Why `cert` is not valid at `now`, if it is not.
fn outside_validity(cert: &PeerCertificate, now: UnixTime) -> Option<String> {
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let date = |secs: i64| {
        chrono::DateTime::from_timestamp(secs, 0).map_or_else(|| secs.to_string(), |d| d.format("%Y-%m-%d").to_string())
    };
    match (cert.not_before, cert.not_after) {
        (_, Some(after)) if now > after => Some(format!("expired on {}", date(after))),
        (Some(before), _) if now < before => Some(format!("is not valid before {}", date(before))),
        _ => None,
    }
}

/// Trust anchors for a trunk, and where they come from (for the refusal's words).
struct Roots {
    anchors: Vec<TrustAnchor<'static>>,
    origin: Origin,
}

enum Origin {
    /// `ca.crt` of the named Secret.
    TrunkCa(String),
    /// The web PKI roots and `--sip-tls-ca-file`.
    Public,
}

fn trusted_roots(context: &Context<'_>) -> Result<Roots, String> {
    let owned = |certs: &[CertificateDer<'static>]| -> Result<Vec<TrustAnchor<'static>>, String> {
        certs
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()).map_err(|e| format!("{e:?}")))
            .collect()
    };
    match context.material.and_then(|m| m.ca_pem.as_deref().map(|pem| (pem, m.ca_secret_name.as_deref()))) {
        Some((pem, secret)) => {
            let secret = secret.unwrap_or("?").to_string();
            let what = format!("ca.crt of Secret {secret}");
            let certs = super::certs::parse_certs(pem.as_bytes(), &what).map_err(|e| e.to_string())?;
            let anchors = owned(&certs).map_err(|e| format!("{what}: {e}"))?;
            Ok(Roots { anchors, origin: Origin::TrunkCa(secret) })
        }
        None => {
            let mut anchors = webpki_roots::TLS_SERVER_ROOTS.to_vec();
            anchors.extend(owned(context.extra_ca).map_err(|e| format!("--sip-tls-ca-file: {e}"))?);
            Ok(Roots { anchors, origin: Origin::Public })
        }
    }
}

/// Verifies `chain` (leaf first, then the intermediates the client sent) to `anchors` for
/// client authentication, or server authentication (see the module documentation).
fn verify_chain(
    chain: &[CertificateDer<'static>],
    anchors: &[TrustAnchor<'_>],
    now: UnixTime,
) -> Result<(), webpki::Error> {
    let Some((leaf, intermediates)) = chain.split_first() else { return Err(webpki::Error::BadDer) };
    let leaf = webpki::EndEntityCert::try_from(leaf)?;
    let algorithms = super::provider().signature_verification_algorithms.all;
    let verify = |usage| leaf.verify_for_usage(algorithms, anchors, intermediates, now, usage, None, None).map(|_| ());
    match verify(webpki::KeyUsage::client_auth()) {
        Err(webpki::Error::RequiredEkuNotFoundContext(_)) => verify(webpki::KeyUsage::server_auth()),
        other => other,
    }
}

/// A chain error in words that say what to fix.
fn explain(error: &webpki::Error, origin: &Origin) -> String {
    match (error, origin) {
        (webpki::Error::UnknownIssuer, Origin::TrunkCa(secret)) => {
            format!("it does not chain to the trunk's CA (ca.crt of Secret {secret})")
        }
        (webpki::Error::UnknownIssuer, Origin::Public) => {
            "it does not chain to a public CA or --sip-tls-ca-file: give the trunk the provider's CA \
             (tls.caSecretRef) or pin the certificate in tls.peerFingerprints"
                .into()
        }
        (webpki::Error::CertExpired { .. }, _) => "a certificate of its chain has expired".into(),
        (webpki::Error::RequiredEkuNotFoundContext(_), _) => {
            "its extended key usage allows neither client nor server authentication".into()
        }
        (other, _) => format!("{other:?}"),
    }
}

/// Whether one of the certificate's names is one of `wanted` (module documentation).
pub fn names_match(cert: &PeerCertificate, wanted: &[String]) -> bool {
    let has_sans = !(cert.dns_names.is_empty() && cert.uris.is_empty());
    wanted.iter().any(|want| {
        let want = want.trim_end_matches('.');
        cert.dns_names.iter().any(|dns| dns.trim_end_matches('.').eq_ignore_ascii_case(want))
            || cert.uris.iter().any(|uri| uri_matches(uri, want))
            || (!has_sans && cert.common_names.iter().any(|cn| cn.eq_ignore_ascii_case(want)))
    })
}

/// A URI subject alternative name matches the URI as written, or, for `sip:`/`sips:`, its host.
fn uri_matches(uri: &str, want: &str) -> bool {
    if uri.eq_ignore_ascii_case(want) {
        return true;
    }
    let lower = uri.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("sips:").or_else(|| lower.strip_prefix("sip:")) else { return false };
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    let host_port = host_port.split([';', '?']).next().unwrap_or(host_port);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host_port.split(':').next().unwrap_or(host_port),
    };
    host.eq_ignore_ascii_case(want)
}

#[cfg(test)]
#[path = "peer_auth_tests.rs"]
mod tests;
