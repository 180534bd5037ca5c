//! The node as a TLS client: which name a gateway's certificate must carry (the gateway's host
//! name from the configuration, sent as SNI; its IP address when configured by address), which
//! roots it must chain to (the web PKI, `--sip-tls-ca-file`, or the trunk's own CA), and the
//! last handshake failure per address, so that `Reachable=False` can say why.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};

use super::TlsError;

/// How to reach one TLS target: the name to verify (the configuration of a trunk with its own
/// CA or client certificate is looked up by this name when connecting).
#[derive(Clone)]
pub struct TlsTarget {
    pub server_name: String,
}

/// The outbound side of TLS.
pub struct ClientTrust {
    default: Arc<ClientConfig>,
    client_cert: Option<Arc<super::ReloadingCert>>,
    /// The node's extra CAs (`--sip-tls-ca-file`), for trunks without a CA of their own.
    extra: Vec<CertificateDer<'static>>,
    /// The configuration the per-trunk settings come from (set once the node has one).
    snapshot: std::sync::OnceLock<crate::config::SnapshotHandle>,
    /// Configurations of trunks with their own CA or client certificate, by gateway host, as of
    /// one snapshot generation.
    by_host: arc_swap::ArcSwap<super::trunks::HostConfigs>,
    targets: Mutex<HashMap<SocketAddr, TlsTarget>>,
    failures: Mutex<HashMap<SocketAddr, String>>,
}

/// At most this many addresses are remembered (names and failures); gateways are few.
const MAX_REMEMBERED: usize = 4096;

impl ClientTrust {
    /// Trusts the web PKI roots (bundled, so the node needs no CA bundle in its image) and
    /// `extra` CAs.
    /// `client_cert` is presented to servers that ask for a client certificate.
    pub fn new(
        extra: Vec<CertificateDer<'static>>,
        client_cert: Option<Arc<super::ReloadingCert>>,
    ) -> Result<ClientTrust, TlsError> {
        let resolver = client_cert.clone().map(|c| c as Arc<dyn rustls::client::ResolvesClientCert>);
        Ok(ClientTrust {
            default: Arc::new(client_config(&extra, true, resolver)?),
            client_cert,
            extra,
            snapshot: std::sync::OnceLock::new(),
            by_host: arc_swap::ArcSwap::from_pointee(super::trunks::HostConfigs::default()),
            targets: Mutex::default(),
            failures: Mutex::default(),
        })
    }

    /// The node's extra CAs (`--sip-tls-ca-file`).
    pub fn extra_ca(&self) -> &[CertificateDer<'static>] {
        &self.extra
    }

    /// The node's client certificate, if it has one.
    pub fn client_cert(&self) -> Option<&Arc<super::ReloadingCert>> {
        self.client_cert.as_ref()
    }

    /// Takes the per-trunk TLS settings (`spec.tls`) from `snapshot` from now on: each
    /// connection uses the configuration of the snapshot current when it is opened.
    pub fn follow(&self, snapshot: crate::config::SnapshotHandle) {
        let _ = self.snapshot.set(snapshot);
    }

    /// The configuration for gateway `host`: its trunk's when the trunk has TLS settings.
    fn host_config(&self, host: &str) -> Option<super::trunks::HostConfig> {
        let snapshot = self.snapshot.get()?;
        let mut configs = self.by_host.load_full();
        if configs.generation != Some(snapshot.generation()) {
            let current = snapshot.current();
            let resolver = self.client_cert.clone().map(|c| c as Arc<dyn rustls::client::ResolvesClientCert>);
            let defaults = super::trunks::Defaults { extra_ca: &self.extra, client_cert: resolver };
            configs = Arc::new(super::trunks::host_configs(&current, &defaults));
            self.by_host.store(Arc::clone(&configs));
        }
        configs.by_host.get(host).cloned()
    }

    /// Records that `addr` is the TLS gateway `host` (called when a TLS target resolves).
    pub fn remember(&self, addr: SocketAddr, host: &str) {
        let target = TlsTarget { server_name: host.to_string() };
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if targets.len() >= MAX_REMEMBERED && !targets.contains_key(&addr) {
            targets.clear();
        }
        targets.insert(addr, target);
    }

    /// The name and configuration for a connection to `addr`.
    pub(super) fn target(&self, addr: SocketAddr) -> Result<(ServerName<'static>, Arc<ClientConfig>), TlsError> {
        let target = self.targets.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).cloned();
        let name = target.map_or_else(|| addr.ip().to_string(), |t| t.server_name);
        let config = match self.host_config(&name) {
            Some(Ok(config)) => config,
            Some(Err(problem)) => return Err(TlsError::TrunkMaterial(problem)),
            None => Arc::clone(&self.default),
        };
        let name =
            ServerName::try_from(name.trim_matches(['[', ']']).to_string()).map_err(|_| TlsError::ServerName(name))?;
        Ok((name, config))
    }

    /// Remembers the outcome of the last handshake with `addr` (`None`: it succeeded).
    pub(super) fn record(&self, addr: SocketAddr, failure: Option<String>) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failure {
            Some(reason) => {
                if failures.len() >= MAX_REMEMBERED {
                    failures.clear();
                }
                failures.insert(addr, reason);
            }
            None => {
                failures.remove(&addr);
            }
        }
    }

    /// Why the last TLS handshake with `addr` failed, if it did.
    pub fn last_failure(&self, addr: SocketAddr) -> Option<String> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).cloned()
    }
}

/// A client configuration trusting `extra` CAs (and the web PKI roots when `web_pki`), with a
/// client certificate when given (mutual TLS).
pub fn client_config(
    extra: &[CertificateDer<'static>],
    web_pki: bool,
    client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    if web_pki {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for cert in extra {
        roots.add(cert.clone())?;
    }
    let builder = ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    })
}

/// A handshake error in words an operator can act on (it ends up in `Reachable=False`).
pub(super) fn explain(error: &std::io::Error) -> String {
    let rustls_error = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the server's certificate is not trusted (unknown issuer): give the trunk the provider's CA \
             (tls.caSecretRef) or use a certificate from a public CA"
                .into()
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            "the server's certificate does not name this gateway: the gateway address must match the \
             certificate's subject alternative names"
                .into()
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::Expired))
        | Some(rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            "the server's certificate has expired".into()
        }
        Some(rustls::Error::InvalidCertificate(other)) => format!("the server's certificate is refused: {other:?}"),
        Some(rustls::Error::AlertReceived(alert)) => format!("the server refused the handshake ({alert:?})"),
        Some(other) => other.to_string(),
        None => error.to_string(),
    }
}
