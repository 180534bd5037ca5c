//! The listener's client-certificate policy: ask TLS clients for a certificate when a trunk
//! admits callers by certificate, never require one, and judge it per trunk at admission.
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
//! **Why only when a trunk wants it.** Without a certificate-auth trunk that names its peers,
//! the listener asks for no certificate at all, as before: nothing changes for nodes that do not
//! use inbound mutual TLS.

use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::SnapshotHandle;

/// Asks for (never requires) a client certificate while some inbound trunk admits callers by
/// certificate; accepts any certificate whose key signed the handshake.
pub struct AskClientCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
    snapshot: OnceLock<SnapshotHandle>,
    /// `(generation, wanted)` of the snapshot last looked at.
    wanted: Mutex<Option<(i64, bool)>>,
}

impl std::fmt::Debug for AskClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskClientCertificate").field("wanted", &self.wanted()).finish_non_exhaustive()
    }
}

impl AskClientCertificate {
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> AskClientCertificate {
        AskClientCertificate { provider, snapshot: OnceLock::new(), wanted: Mutex::new(None) }
    }

    /// Takes the trunks from `snapshot` from now on (before, no certificate is asked for).
    pub fn follow(&self, snapshot: SnapshotHandle) {
        let _ = self.snapshot.set(snapshot);
    }

    /// Whether an inbound trunk of the current configuration admits callers by certificate
    /// (looked at once per configuration generation).
    fn wanted(&self) -> bool {
        let Some(snapshot) = self.snapshot.get() else { return false };
        let generation = snapshot.generation();
        let mut cached = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        match *cached {
            Some((seen, wanted)) if seen == generation => wanted,
            _ => {
                let wanted = snapshot.current().trunks().any(|t| t.inbound_enabled && t.requires_peer_certificate());
                *cached = Some((generation, wanted));
                wanted
            }
        }
    }
}

impl ClientCertVerifier for AskClientCertificate {
    fn offer_client_auth(&self) -> bool {
        self.wanted()
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
