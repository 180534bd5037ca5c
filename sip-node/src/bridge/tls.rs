//! Whom the node trusts when it opens a `wss://` connection to an agent: the bundled web PKI
//! roots (agents on the public internet), plus the CA certificates of a PEM file the operator
//! names with `--agent-ca-file` (agents inside a cluster or a company network, whose
//! certificates a private CA signed). Built once at start-up and shared by every call, so that
//! a bad file stops the node with a clear error instead of failing each call.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// Why the agents' TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AgentTlsError {
    /// The CA file could not be read or is not PEM.
    #[error("cannot read CA certificates from {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The file holds no `CERTIFICATE` block (a key, say, or an empty file).
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// A certificate in the file is not one a trust anchor can be made of.
    #[error("certificate {index} in {path} is not a usable CA certificate: {reason}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Which certificate, counting from 1.
        index: usize,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration (no usable protocol version with the ring provider).
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

/// The TLS client configuration of `wss://` agent connections (cheap to clone).
#[derive(Clone)]
pub struct AgentTls {
    config: Arc<rustls::ClientConfig>,
    /// Trust anchors added from the operator's file.
    extra_roots: usize,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls").field("extra_roots", &self.extra_roots).finish_non_exhaustive()
    }
}

impl AgentTls {
    /// The bundled web PKI roots only (built once per process).
    pub fn web_pki() -> Result<AgentTls, AgentTlsError> {
        static WEB_PKI: OnceLock<Result<AgentTls, String>> = OnceLock::new();
        WEB_PKI
            .get_or_init(|| AgentTls::build(web_pki_roots(), 0).map_err(|e| e.to_string()))
            .clone()
            .map_err(AgentTlsError::Config)
    }

    /// The web PKI roots and every certificate in the PEM file at `path`.
    pub fn with_ca_file(path: &Path) -> Result<AgentTls, AgentTlsError> {
        let read_error = |reason: String| AgentTlsError::Read { path: path.to_path_buf(), reason };
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|e| read_error(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read_error(e.to_string()))?;
        if certificates.is_empty() {
            return Err(AgentTlsError::NoCertificate(path.to_path_buf()));
        }
        let count = certificates.len();
        let mut roots = web_pki_roots();
        for (i, certificate) in certificates.into_iter().enumerate() {
            roots.add(certificate).map_err(|e| AgentTlsError::BadCertificate {
                path: path.to_path_buf(),
                index: i + 1,
                reason: e.to_string(),
            })?;
        }
        AgentTls::build(roots, count)
    }

    /// `--agent-ca-file` when given, the web PKI roots otherwise.
    pub fn load(ca_file: Option<&Path>) -> Result<AgentTls, AgentTlsError> {
        match ca_file {
            Some(path) => AgentTls::with_ca_file(path),
            None => AgentTls::web_pki(),
        }
    }

    /// How many trust anchors came from the operator's file.
    pub fn extra_roots(&self) -> usize {
        self.extra_roots
    }

    /// The rustls configuration to connect with.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }

    fn build(roots: rustls::RootCertStore, extra_roots: usize) -> Result<AgentTls, AgentTlsError> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| AgentTlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(AgentTls { config: Arc::new(config), extra_roots })
    }
}

fn web_pki_roots() -> rustls::RootCertStore {
    rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agent-tls").join(name)
    }

    #[test]
    fn a_ca_file_adds_its_certificates_to_the_web_pki_roots() {
        let tls = AgentTls::with_ca_file(&fixture("ca.pem")).unwrap();
        assert_eq!(tls.extra_roots(), 1);
        assert_eq!(AgentTls::load(None).unwrap().extra_roots(), 0);
        assert_eq!(AgentTls::load(Some(&fixture("ca.pem"))).unwrap().extra_roots(), 1);
    }

    #[test]
    fn a_bad_ca_file_is_a_clear_error() {
        let missing = AgentTls::with_ca_file(&fixture("no-such.pem")).unwrap_err();
        assert!(matches!(missing, AgentTlsError::Read { .. }), "{missing}");
        assert!(missing.to_string().contains("no-such.pem"), "{missing}");
        // A key is PEM but not a certificate.
        let key = AgentTls::with_ca_file(&fixture("server.key")).unwrap_err();
        assert!(matches!(key, AgentTlsError::NoCertificate(_)), "{key}");
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let bad = AgentTls::with_ca_file(&garbage).unwrap_err();
        assert!(matches!(bad, AgentTlsError::BadCertificate { index: 1, .. }), "{bad}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(AgentTls::with_ca_file(&empty).unwrap_err(), AgentTlsError::NoCertificate(_)));
    }
}
