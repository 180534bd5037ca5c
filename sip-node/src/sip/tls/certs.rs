//! PEM certificates and keys from files, and the listener's certificate that follows its files:
//! cert-manager (or anyone) replaces `tls.crt`/`tls.key` in a mounted Secret, and the next
//! handshake uses the new pair while established connections carry on with the old one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why a certificate or key could not be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no usable private key: {reason}")]
    Key { path: String, reason: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: String, key: String },
}

/// Every certificate of a PEM file, in order.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| CertError::Read { path: shown.clone(), reason: e.to_string() })?;
    parse_certs(&bytes, &shown)
}

/// Every certificate of PEM text (`what` names it in errors).
pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(CertError::NoCertificate { path: what.into() });
    }
    Ok(certs)
}

/// The first private key of PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    // The parser's error names the PEM section, never its content.
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| CertError::Key { path: what.into(), reason: e.to_string() })
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_name: &str,
    key_name: &str,
) -> Result<CertifiedKey, CertError> {
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Key { path: key_name.into(), reason: e.to_string() })?;
    let certified = CertifiedKey::new(certs, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(_) => Err(CertError::Mismatch { cert: cert_name.into(), key: key_name.into() }),
    }
}

/// The listener's certificate, swapped atomically when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// Modification times and sizes of the files the current pair was read from.
    stamp: std::sync::Mutex<Stamp>,
}

type Stamp = (Option<(SystemTime, u64)>, Option<(SystemTime, u64)>);

impl ReloadingCert {
    /// Reads the pair; a node does not start with a certificate it cannot use.
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<ReloadingCert>, CertError> {
        let stamp = (stamp(&cert_path), stamp(&key_path));
        let pair = read_pair(&cert_path, &key_path)?;
        Ok(Arc::new(ReloadingCert {
            cert_path,
            key_path,
            current: ArcSwap::from_pointee(pair),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    /// Re-reads the files when their modification time or size changed. `Ok(true)` when a new
    /// pair is in use; on an error the previous pair stays (a half-written renewal must not
    /// take the listener down).
    pub fn reload_if_changed(&self) -> Result<bool, CertError> {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return Ok(false);
        }
        let pair = read_pair(&self.cert_path, &self.key_path)?;
        self.current.store(Arc::new(pair));
        *last = now;
        Ok(true)
    }

    /// The chain served now (its first certificate is the leaf).
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Checks the files every `interval` until `stop` says so; logs what changed, never keys.
    pub async fn watch(self: Arc<Self>, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(cert = %self.cert_path.display(), "SIP TLS certificate reloaded"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "SIP TLS certificate not reloaded; the previous one stays"),
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// As a client certificate: offered to every server that asks (the server decides whether it
/// trusts it).
impl rustls::client::ResolvesClientCert for ReloadingCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, CertError> {
    let certs = read_certs(cert_path)?;
    let key_name = key_path.display().to_string();
    let bytes =
        std::fs::read(key_path).map_err(|e| CertError::Read { path: key_name.clone(), reason: e.to_string() })?;
    let key = parse_key(&bytes, &key_name)?;
    certified_key(certs, key, &cert_path.display().to_string(), &key_name)
}

/// Modification time and size (following symlinks, as Kubernetes swaps a `..data` link).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
