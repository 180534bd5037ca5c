//! SIP over TLS (RFC 3261 §26, RFC 5630) with rustls: the listener's certificate (reloaded from
//! files when they change, for cert-manager's renewals), the handshakes with their timeout, and
//! the trust used towards TLS gateways (the web PKI roots plus configured CAs).
//!
//! Once a handshake is done the session is an ordinary stream connection of the
//! [`TransportLayer`]: the same framer, reader and writer tasks, and connection table as TCP
//! (keyed by protocol, so a TLS and a TCP connection to one address never mix). Nothing here
//! links OpenSSL: rustls with the ring provider, as the node's other TLS clients use.

mod accept;
mod certs;
mod client;
mod peer;
pub mod peer_auth;
mod trunks;
mod verifier;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use accept::accept_loop;
pub use certs::{CertError, ReloadingCert};
pub use client::{ClientTrust, TlsTarget};
pub use peer::{PeerCertificate, PeerTable};

#[cfg(test)]
mod tests;

/// The TLS port of RFC 3261 §19.1.2.
pub const SIPS_PORT: u16 = 5061;

/// Command-line settings of SIP over TLS.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain of the SIP TLS listener (e.g. `tls.crt` of a mounted Secret); the
    /// listener runs only with a certificate and key. Re-read when the file changes.
    #[arg(long = "sip-tls-cert", env = "SWITCHBOARD_SIP_TLS_CERT")]
    pub cert: Option<PathBuf>,

    /// PEM private key of the listener's certificate (`tls.key`). Never logged.
    #[arg(long = "sip-tls-key", env = "SWITCHBOARD_SIP_TLS_KEY")]
    pub key: Option<PathBuf>,

    /// Addresses of the TLS listener (default: each `--sip-listen` address on port 5061).
    #[arg(long = "sip-tls-listen", env = "SWITCHBOARD_SIP_TLS_LISTEN", value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,

    /// TLS port to advertise in Via and Contact (defaults to the TLS listen port).
    // Its own id: clap names an argument by its field, and the node's UDP/TCP
    // `advertised_port` already holds that name in the flattened command.
    #[arg(
        id = "sip_tls_advertised_port",
        long = "sip-tls-advertised-port",
        env = "SWITCHBOARD_SIP_TLS_ADVERTISED_PORT"
    )]
    pub advertised_port: Option<u16>,

    /// PEM file of CA certificates trusted for TLS gateways besides the web PKI roots (a
    /// trunk's own CA, `tls.caSecretRef`, is trusted for that trunk's gateways only).
    #[arg(long = "sip-tls-ca-file", env = "SWITCHBOARD_SIP_TLS_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// PEM client certificate chain the node presents to TLS gateways that ask for one (mutual
    /// TLS, e.g. a carrier that admits trunks by certificate). Re-read when the file changes.
    #[arg(long = "sip-tls-client-cert", env = "SWITCHBOARD_SIP_TLS_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of the client certificate. Never logged.
    #[arg(long = "sip-tls-client-key", env = "SWITCHBOARD_SIP_TLS_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,

    /// Longest a TLS handshake may take, inbound or outbound, before the connection is closed.
    #[arg(
        long = "sip-tls-handshake-timeout-ms",
        env = "SWITCHBOARD_SIP_TLS_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub handshake_timeout_ms: u64,

    /// How often the certificate files are checked for changes, in milliseconds.
    #[arg(long = "sip-tls-reload-ms", env = "SWITCHBOARD_SIP_TLS_RELOAD_MS", default_value_t = 2_000)]
    pub reload_ms: u64,
}

impl Default for TlsArgs {
    fn default() -> TlsArgs {
        TlsArgs {
            cert: None,
            key: None,
            listen: Vec::new(),
            advertised_port: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            handshake_timeout_ms: 5_000,
            reload_ms: 2_000,
        }
    }
}

/// Why TLS could not be set up or a TLS connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{0} go together: set both or neither")]
    HalfConfigured(&'static str),
    #[error("TLS to {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("{0}")]
    TrunkMaterial(String),
    #[error("rustls refused the configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Everything TLS of one node: the listener's certificate and the outbound trust.
pub struct TlsLayer {
    server: Option<Server>,
    client: ClientTrust,
    /// What the clients of open inbound connections presented, for admission.
    peers: Arc<PeerTable>,
    handshake_timeout: Duration,
    listen: Vec<SocketAddr>,
    advertised_port: Option<u16>,
}

impl std::fmt::Debug for TlsLayer {
    /// Addresses and whether a certificate is loaded; never key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsLayer")
            .field("listen", &self.listen)
            .field("server_certificate", &self.server.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

struct Server {
    acceptor: tokio_rustls::TlsAcceptor,
    cert: Arc<ReloadingCert>,
}

impl TlsLayer {
    /// Builds the TLS layer from the command line; `sip_listen` gives the default listen IPs.
    /// Without a certificate the node still speaks TLS outbound (to TLS gateways).
    pub fn from_args(args: &TlsArgs, sip_listen: &[SocketAddr]) -> Result<Arc<TlsLayer>, TlsError> {
        let extra_ca = match &args.ca_file {
            Some(path) => certs::read_certs(path)?,
            None => Vec::new(),
        };
        // Inbound mutual TLS: every client is asked for a certificate, none must present one.
        let verifier = Arc::new(verifier::AskClientCertificate::new(provider()));
        let server = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => {
                let cert = ReloadingCert::load(cert.clone(), key.clone())?;
                let config = rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .with_client_cert_verifier(
                        Arc::clone(&verifier) as Arc<dyn rustls::server::danger::ClientCertVerifier>
                    )
                    .with_cert_resolver(Arc::clone(&cert) as Arc<dyn rustls::server::ResolvesServerCert>);
                Some(Server { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert })
            }
            (None, None) => None,
            _ => return Err(TlsError::HalfConfigured("--sip-tls-cert and --sip-tls-key")),
        };
        let client_cert = match (&args.client_cert, &args.client_key) {
            (Some(cert), Some(key)) => Some(ReloadingCert::load(cert.clone(), key.clone())?),
            (None, None) => None,
            _ => return Err(TlsError::HalfConfigured("--sip-tls-client-cert and --sip-tls-client-key")),
        };
        let listen = if !args.listen.is_empty() {
            args.listen.clone()
        } else {
            sip_listen.iter().map(|a| SocketAddr::new(a.ip(), SIPS_PORT)).collect()
        };
        Ok(Arc::new(TlsLayer {
            server,
            client: ClientTrust::new(extra_ca, client_cert)?,
            peers: Arc::default(),
            handshake_timeout: Duration::from_millis(args.handshake_timeout_ms.max(1)),
            listen,
            advertised_port: args.advertised_port,
        }))
    }

    /// Where the listener binds: nothing without a certificate.
    pub fn listen_addrs(&self, _sip_listen: &[SocketAddr]) -> Vec<SocketAddr> {
        if self.server.is_some() { self.listen.clone() } else { Vec::new() }
    }

    pub fn advertised_port(&self) -> Option<u16> {
        self.advertised_port
    }

    /// The listener's certificate, to start its reload watcher.
    pub fn server_cert(&self) -> Option<&Arc<ReloadingCert>> {
        self.server.as_ref().map(|s| &s.cert)
    }

    /// Every certificate the node reads from files (listener and client), for the reload watcher.
    pub fn watched_certs(&self) -> Vec<Arc<ReloadingCert>> {
        self.server_cert().into_iter().chain(self.client.client_cert()).cloned().collect()
    }

    /// The outbound trust and the names of TLS targets.
    pub fn client(&self) -> &ClientTrust {
        &self.client
    }

    /// Takes the trunks' TLS settings from `snapshot` from now on (per-trunk client
    /// configurations towards their gateways).
    pub fn follow(&self, snapshot: crate::config::SnapshotHandle) {
        self.client.follow(snapshot);
    }

    /// What the client of the open inbound connection from `addr` presented, if anything.
    pub fn peer_certificate(&self, addr: SocketAddr) -> Option<Arc<PeerCertificate>> {
        self.peers.get(addr)
    }

    /// The presented certificates of open inbound connections.
    pub fn peers(&self) -> &PeerTable {
        &self.peers
    }

    /// Whether `peer` is an inbound TLS connection whose client presented a certificate.
    pub(crate) fn presented(&self, peer: crate::sip::transport::Peer) -> bool {
        peer.protocol == crate::sip::transport::Protocol::Tls && self.peers.get(peer.addr).is_some()
    }

    /// Opens a TLS session over a connected stream to `addr` (client side).
    pub(crate) async fn connect(
        &self,
        stream: tokio::net::TcpStream,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, TlsError> {
        let (name, config) = match self.client.target(addr) {
            Ok(target) => target,
            Err(error) => {
                self.client.record(addr, Some(error.to_string()));
                return Err(error);
            }
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let result = match tokio::time::timeout(self.handshake_timeout, connector.connect(name, stream)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(TlsError::Handshake { addr, reason: client::explain(&error) }),
            Err(_) => Err(TlsError::HandshakeTimeout(addr)),
        };
        self.client.record(addr, result.as_ref().err().map(ToString::to_string));
        result
    }
}

impl TlsLayer {
    /// Records why an established session to `addr` ended with a TLS error (an alert from the
    /// server), so that the next "did not answer" can say why.
    pub(crate) fn session_failed(&self, addr: SocketAddr, error: &std::io::Error) {
        if error.get_ref().is_some_and(|e| e.is::<rustls::Error>()) {
            self.client.record(addr, Some(TlsError::Handshake { addr, reason: client::explain(error) }.to_string()));
        }
    }
}

/// The crypto provider of every TLS session of the node (ring, as the node's other rustls users).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
