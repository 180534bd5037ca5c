//! The inbound mutual-TLS matcher: pins, names against the trunk's CA or the public roots,
//! validity, transport and source, with the words of each refusal.

use std::net::SocketAddr;

use rustls::pki_types::{CertificateDer, UnixTime};
use switchboard_model::{AuthMethod, TrunkConfig, TrunkTls};

use super::*;
use crate::config::fixtures::trunk;
use crate::sip::tls::tests::pki::{self, Ca, Leaf};

fn certificate_trunk(names: &[&str], pins: &[&str]) -> TrunkConfig {
    let mut trunk = trunk("default", "carrier");
    trunk.auth_method = AuthMethod::Certificate;
    trunk.allowed_source_cidrs = vec![];
    trunk.tls_peer_names = names.iter().map(|n| n.to_string()).collect();
    trunk.tls_peer_fingerprints = pins.iter().map(|p| p.to_string()).collect();
    trunk
}

fn material(ca: &Ca) -> TrunkTls {
    TrunkTls {
        namespace: "default".into(),
        trunk_name: "carrier".into(),
        ca_pem: Some(ca.pem()),
        ca_secret_name: Some("carrier-ca".into()),
        ..TrunkTls::default()
    }
}

fn presented(leaf: &Leaf) -> PeerCertificate {
    PeerCertificate::new(vec![CertificateDer::from(leaf.der.clone())]).unwrap()
}

fn tls_peer() -> Peer {
    Peer { protocol: Protocol::Tls, addr: "198.51.100.20:40000".parse::<SocketAddr>().unwrap() }
}

fn judge(trunk: &TrunkConfig, material: Option<&TrunkTls>, cert: &PeerCertificate) -> Result<(), PeerRefusal> {
    check(trunk, tls_peer(), Some(cert), &Context { material, extra_ca: &[], now: UnixTime::now() })
}

/// A pinned fingerprint admits that certificate, self-signed and without any CA, whatever its
/// names; another certificate is refused with its own fingerprint in the words (what to pin).
#[test]
fn a_pinned_fingerprint_admits_exactly_that_certificate() {
    let pinned = presented(&pki::self_signed(&["anything.example"]));
    let lower = pinned.fingerprint.to_ascii_lowercase();
    let trunk = certificate_trunk(&[], &[&lower]);
    judge(&trunk, None, &pinned).expect("the pinned certificate (pins compare case-insensitively)");

    let other = presented(&pki::self_signed(&["anything.example"]));
    let refusal = judge(&trunk, None, &other).expect_err("another key, another fingerprint");
    assert_eq!(refusal.label(), "no_match");
    let text = refusal.to_string();
    assert!(text.contains(&other.fingerprint) && text.contains("DNS:anything.example"), "{text}");
    assert!(text.contains("trunk default/carrier"), "{text}");
}

/// Names: a certificate from the trunk's CA carrying a listed DNS name is admitted; one from
/// the CA with other names is refused as no match; one from another CA with the right name is
/// refused as untrusted, naming the trunk's CA Secret.
#[test]
fn names_need_the_trunks_ca_and_a_listed_name() {
    let ca = Ca::new("carrier CA");
    let trunk = certificate_trunk(&["SIP.Carrier.Example."], &[]);
    let material = material(&ca);
    judge(&trunk, Some(&material), &presented(&ca.leaf(&["sip.carrier.example"])))
        .expect("a DNS name, compared case-insensitively and without the root dot");

    let wrong_name = judge(&trunk, Some(&material), &presented(&ca.leaf(&["sip.other.example"]))).unwrap_err();
    assert_eq!(wrong_name.label(), "no_match", "{wrong_name}");

    let impostor = Ca::new("impostor CA").leaf(&["sip.carrier.example"]);
    let untrusted = judge(&trunk, Some(&material), &presented(&impostor)).unwrap_err();
    assert_eq!(untrusted.label(), "untrusted");
    assert!(
        untrusted.to_string().contains("does not chain to the trunk's CA (ca.crt of Secret carrier-ca)"),
        "{untrusted}"
    );
}

/// RFC 5922: a `sip:` URI subject alternative name matches by its host or as written; the CN
/// counts only for a certificate without SANs; wildcards are not expanded.
#[test]
fn sip_uris_common_names_and_wildcards_follow_rfc_5922() {
    let ca = Ca::new("carrier CA");
    let material = material(&ca);
    let uri = presented(&ca.leaf_with_uri(&[], "sip:edge.carrier.example"));
    judge(&certificate_trunk(&["edge.carrier.example"], &[]), Some(&material), &uri).expect("the URI's host");
    judge(&certificate_trunk(&["sip:edge.carrier.example"], &[]), Some(&material), &uri).expect("the URI as written");

    let cn_only = presented(&ca.leaf_cn("trunk.carrier.example", &[]));
    judge(&certificate_trunk(&["trunk.carrier.example"], &[]), Some(&material), &cn_only).expect("CN without SANs");
    let cn_and_san = presented(&ca.leaf_cn("trunk.carrier.example", &["other.carrier.example"]));
    let ignored = judge(&certificate_trunk(&["trunk.carrier.example"], &[]), Some(&material), &cn_and_san);
    assert_eq!(ignored.unwrap_err().label(), "no_match", "the CN is not looked at beside SANs");

    let wildcard = presented(&ca.leaf(&["*.carrier.example"]));
    let refused = judge(&certificate_trunk(&["sip.carrier.example"], &[]), Some(&material), &wildcard);
    assert_eq!(refused.unwrap_err().label(), "no_match", "no wildcard expansion");
}

/// A certificate issued for servers only (serverAuth, as public CAs issue now) is accepted as a
/// SIP peer's client certificate.
#[test]
fn a_server_only_certificate_is_accepted() {
    let ca = Ca::new("carrier CA");
    let leaf = presented(&ca.server_only_leaf(&["sip.carrier.example"]));
    judge(&certificate_trunk(&["sip.carrier.example"], &[]), Some(&material(&ca)), &leaf).expect("serverAuth only");
}

/// Without a CA of its own the trunk trusts the public roots and the node's `--sip-tls-ca-file`.
#[test]
fn without_a_trunk_ca_the_public_roots_and_the_node_cas_are_trusted() {
    let ca = Ca::new("private CA");
    let leaf = presented(&ca.leaf(&["sip.carrier.example"]));
    let trunk = certificate_trunk(&["sip.carrier.example"], &[]);
    let refusal = judge(&trunk, None, &leaf).unwrap_err();
    assert!(refusal.to_string().contains("public CA or --sip-tls-ca-file"), "{refusal}");
    let extra = [CertificateDer::from(ca.der())];
    let context = Context { material: None, extra_ca: &extra, now: UnixTime::now() };
    check(&trunk, tls_peer(), Some(&leaf), &context).expect("the node's CA file");
}

/// An expired certificate is refused with its date, pinned or not.
#[test]
fn an_expired_certificate_is_refused_even_when_pinned() {
    let ca = Ca::new("carrier CA");
    let expired = presented(&ca.expired_leaf(&["sip.carrier.example"]));
    let trunk = certificate_trunk(&["sip.carrier.example"], &[&expired.fingerprint]);
    let refusal = judge(&trunk, Some(&material(&ca)), &expired).unwrap_err();
    assert_eq!(refusal.label(), "expired");
    assert!(refusal.to_string().contains("expired on 2001-01-01"), "{refusal}");
}

/// Not over TLS, no certificate, a source outside the trunk's CIDRs, a CA that does not parse:
/// each refused with words that say which.
#[test]
fn transport_certificate_source_and_material_problems_are_named() {
    let ca = Ca::new("carrier CA");
    let leaf = presented(&ca.leaf(&["sip.carrier.example"]));
    let mut trunk = certificate_trunk(&["sip.carrier.example"], &[]);
    let context = Context { material: None, extra_ca: &[], now: UnixTime::now() };
    let udp = Peer { protocol: Protocol::Udp, ..tls_peer() };
    let refusal = check(&trunk, udp, Some(&leaf), &context).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        "trunk default/carrier admits callers by client certificate over TLS, and this request came over UDP"
    );
    let refusal = check(&trunk, tls_peer(), None, &context).unwrap_err();
    assert_eq!(refusal.label(), "no_certificate");

    trunk.allowed_source_cidrs = vec!["192.0.2.0/24".parse().unwrap()];
    let refusal = check(&trunk, tls_peer(), Some(&leaf), &context).unwrap_err();
    assert!(refusal.to_string().contains("source 198.51.100.20 is not in"), "{refusal}");
    trunk.allowed_source_cidrs = vec!["198.51.100.0/24".parse().unwrap()];
    let broken = TrunkTls { ca_pem: Some("not PEM".into()), ..material(&ca) };
    let refusal = judge(&trunk, Some(&broken), &leaf).unwrap_err();
    assert_eq!(refusal.label(), "material");
    assert!(refusal.to_string().contains("carrier-ca"), "{refusal}");
}
