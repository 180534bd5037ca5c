//! What the client of an inbound TLS connection presented: its certificate chain, read once at
//! the handshake (fingerprint, names, validity), and the table that lets the admission of a
//! request find it by the connection's address.
//!
//! The table is keyed by the far address of the connection, which is what a request carries
//! ([`super::super::transport::Peer`]): an inbound TLS connection has its own ephemeral port, so
//! the address names one connection. The entry lives as long as the connection's stream: the
//! stream is wrapped in [`Registered`], whose end (reader and writer both gone) removes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client certificate chain as presented (leaf first), with what admission compares.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    /// SHA-256 of the leaf, upper-case colon hex (as `openssl x509 -fingerprint -sha256`).
    pub fingerprint: String,
    /// The subject's common names.
    pub common_names: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// URI subject alternative names (`sip:carrier.example`).
    pub uris: Vec<String>,
    /// Validity, in Unix seconds (`None` when the leaf does not parse as X.509).
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
}

impl PeerCertificate {
    /// Reads the leaf of `chain`. A leaf that does not parse keeps its fingerprint (pinning
    /// works on bytes) and has no names, so that only a pin can admit it.
    pub fn new(chain: Vec<CertificateDer<'static>>) -> Option<PeerCertificate> {
        let leaf = chain.first()?;
        let fingerprint = colon_hex(&Sha256::digest(leaf.as_ref()));
        let mut peer = PeerCertificate {
            fingerprint,
            common_names: Vec::new(),
            dns_names: Vec::new(),
            uris: Vec::new(),
            not_before: None,
            not_after: None,
            chain: Vec::new(),
        };
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
            peer.common_names =
                cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string).collect();
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                for name in &san.value.general_names {
                    match name {
                        x509_parser::extensions::GeneralName::DNSName(dns) => peer.dns_names.push(dns.to_string()),
                        x509_parser::extensions::GeneralName::URI(uri) => peer.uris.push(uri.to_string()),
                        _ => {}
                    }
                }
            }
            peer.not_before = Some(cert.validity().not_before.timestamp());
            peer.not_after = Some(cert.validity().not_after.timestamp());
        }
        peer.chain = chain;
        Some(peer)
    }

    /// What was presented, for a refusal's reason and the log: the names admission looks at
    /// (the SANs, or the CN of a certificate without any; at most three) and the fingerprint.
    pub fn describe(&self) -> String {
        let sans =
            self.dns_names.iter().map(|d| format!("DNS:{d}")).chain(self.uris.iter().map(|u| format!("URI:{u}")));
        let mut names: Vec<String> = sans.take(3).collect();
        if names.is_empty() {
            names.extend(self.common_names.first().map(|cn| format!("CN={cn}")));
        }
        names.push(format!("SHA-256 {}", self.fingerprint));
        names.join(", ")
    }
}

/// `AB:CD:...` of `bytes`.
pub fn colon_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The certificates presented on open inbound TLS connections, by far address.
#[derive(Debug, Default)]
pub struct PeerTable {
    entries: Mutex<HashMap<SocketAddr, (u64, Arc<PeerCertificate>)>>,
    next: AtomicU64,
}

impl PeerTable {
    /// Records what the connection from `addr` presented until the returned guard drops.
    pub fn register(self: &Arc<Self>, addr: SocketAddr, cert: PeerCertificate) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, (id, Arc::new(cert)));
        Registration { table: Arc::clone(self), addr, id }
    }

    /// What the open connection from `addr` presented, if anything.
    pub fn get(&self, addr: SocketAddr) -> Option<Arc<PeerCertificate>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).map(|(_, cert)| Arc::clone(cert))
    }

    /// Connections with a presented certificate (tests check that none is left behind).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's entry in the [`PeerTable`]; removes it when dropped, unless a newer
/// connection from the same address has taken the place.
#[derive(Debug)]
pub struct Registration {
    table: Arc<PeerTable>,
    addr: SocketAddr,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self.table.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.get(&self.addr).is_some_and(|(id, _)| *id == self.id) {
            entries.remove(&self.addr);
        }
    }
}

/// A stream that keeps its connection's [`Registration`] as long as it lives (the transport
/// splits it into a reader and a writer; the entry goes when both have ended).
pub struct Registered<S> {
    inner: S,
    _registration: Option<Registration>,
}

impl<S> Registered<S> {
    pub fn new(inner: S, registration: Option<Registration>) -> Registered<S> {
        Registered { inner, _registration: registration }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Registered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Registered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::tls::tests::pki::Ca;

    /// The leaf's names, validity and fingerprint are read once; the description says what was
    /// presented without the chain's bytes.
    #[test]
    fn a_presented_certificate_is_read_once() {
        let ca = Ca::new("carrier CA");
        let leaf = ca.leaf(&["sip.carrier.example", "edge.carrier.example"]);
        let peer = PeerCertificate::new(vec![CertificateDer::from(leaf.der.clone())]).unwrap();
        assert_eq!(peer.common_names, ["sip.carrier.example"]);
        assert_eq!(peer.dns_names, ["sip.carrier.example", "edge.carrier.example"]);
        assert_eq!(peer.fingerprint, colon_hex(&Sha256::digest(&leaf.der)));
        assert_eq!(peer.fingerprint.len(), 32 * 3 - 1);
        assert!(peer.not_before.unwrap() < peer.not_after.unwrap());
        let described = peer.describe();
        assert!(described.starts_with("DNS:sip.carrier.example, DNS:edge.carrier.example, SHA-256 "), "{described}");
        assert!(described.ends_with(&peer.fingerprint), "{described}");
        assert!(PeerCertificate::new(vec![]).is_none());
        let garbage = PeerCertificate::new(vec![CertificateDer::from(b"not x509".to_vec())]).unwrap();
        assert!(garbage.dns_names.is_empty() && garbage.not_after.is_none());
    }

    /// An entry lives as long as its registration; an older connection's end leaves a newer
    /// connection from the same address alone.
    #[test]
    fn entries_follow_their_connections() {
        let ca = Ca::new("carrier CA");
        let cert = PeerCertificate::new(vec![CertificateDer::from(ca.leaf(&["a.example"]).der)]).unwrap();
        let table = Arc::new(PeerTable::default());
        let addr: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let old = table.register(addr, cert.clone());
        let new = table.register(addr, cert);
        drop(old);
        assert!(table.get(addr).is_some(), "the newer connection's entry stays");
        drop(new);
        assert!(table.get(addr).is_none() && table.is_empty());
    }
}
