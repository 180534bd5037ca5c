//! The listener's client-certificate policy: ask every TLS client for a certificate, never
//! require one, and judge it per trunk at admission.
//!
//! **Why the handshake does not check the chain.** Which CA a caller's certificate must chain
//! to, and which names it must carry, belong to the trunk the request is for (its
//! `tls.caSecretRef`, `tls.peerNames`, `tls.peerFingerprints`), and the trunk is known only from
//! the request (the called number), not at the handshake. A listener that verified against the
//! union of the trunks' CAs would also cut off a digest trunk's client that happens to present a
//! certificate from another CA. So the handshake only proves that the client holds the key of the
//! certificate it presents (rustls checks the handshake signature against it); the admission of
//! each request then verifies the chain and the names against that request's trunk
//! ([`super::peer_auth`]), and a request on a certificate trunk without a usable certificate gets
//! `403` saying what was presented.
//!
//! **Why always ask.** Peers are added to a trunk while connections are open, and a carrier's
//! proxy keeps one connection for hours: a listener that asked only once some trunk wanted
//! certificates would leave that connection without one, and its calls refused until it
//! reconnected. A client without a certificate answers the request with an empty Certificate
//! message (RFC 8446 §4.4.2, RFC 5246 §7.4.6) and carries on, so asking costs nothing.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Asks every client for a certificate, never requires one, and accepts any certificate whose
/// key signed the handshake.
#[derive(Debug)]
pub struct AskClientCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl AskClientCertificate {
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> AskClientCertificate {
        AskClientCertificate { provider }
    }
}

impl ClientCertVerifier for AskClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: a client then presents the certificate it has (RFC 8446 §4.2.4), and the
    /// trunks' CAs are not advertised to whoever connects.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    /// Any certificate: its chain and names are judged per trunk at admission (module doc).
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
