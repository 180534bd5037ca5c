//! Finding a SIP server (RFC 3263, without NAPTR): an IP literal is used as it is; a host with
//! an explicit port is looked up as A/AAAA; a host without a port is looked up as SRV
//! (`_sip._udp` / `_sip._tcp`), targets ordered by priority and spread by weight, then A/AAAA;
//! when there is no SRV record, A/AAAA on port 5060 (5061 and `_sips._tcp` for TLS). A TLS
//! target's addresses are remembered with the host name they came from, which is the name its
//! certificate must carry (RFC 5922 §4).
//!
//! SRV queries go through hickory-resolver with the system configuration; A/AAAA through the
//! system resolver (so `/etc/hosts` works as operators expect).

use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use rand::Rng as _;

use super::transport::Protocol;

/// The default SIP port (RFC 3261 19.1.2).
pub const SIP_PORT: u16 = 5060;

/// Why a target has no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{host} has no address: {reason}")]
    NoAddress { host: String, reason: String },
}

/// DNS for SIP targets. Cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    dns: Option<TokioResolver>,
    tls: Option<std::sync::Arc<super::tls::TlsLayer>>,
}

impl Resolver {
    /// A resolver from the system configuration; without one (no `/etc/resolv.conf`), SRV
    /// lookups are skipped and only A/AAAA through the system resolver remain.
    pub fn from_system() -> Resolver {
        let dns = match TokioResolver::builder_tokio() {
            Ok(builder) => Some(builder.build()),
            Err(error) => {
                tracing::warn!(%error, "no DNS configuration; SRV lookups disabled");
                None
            }
        };
        Resolver { dns, tls: None }
    }

    /// Remembers the names of resolved TLS targets in `tls` (for SNI and verification).
    pub fn with_tls(mut self, tls: std::sync::Arc<super::tls::TlsLayer>) -> Resolver {
        self.tls = Some(tls);
        self
    }

    /// Addresses to try for `host[:port]` in order.
    pub async fn resolve(
        &self,
        host: &str,
        port: Option<u16>,
        protocol: Protocol,
    ) -> Result<Vec<SocketAddr>, ResolveError> {
        let addrs = self.addresses(host, port, protocol).await?;
        if protocol == Protocol::Tls
            && let Some(tls) = &self.tls
        {
            for addr in &addrs {
                tls.client().remember(*addr, host.trim_matches(['[', ']']));
            }
        }
        Ok(addrs)
    }

    async fn addresses(
        &self,
        host: &str,
        port: Option<u16>,
        protocol: Protocol,
    ) -> Result<Vec<SocketAddr>, ResolveError> {
        let default_port = if protocol == Protocol::Tls { super::tls::SIPS_PORT } else { SIP_PORT };
        if let Some(ip) = super::message::host_ip(host) {
            return Ok(vec![SocketAddr::new(ip, port.unwrap_or(default_port))]);
        }
        let bare = host;
        if let Some(port) = port {
            return lookup_host(bare, port).await;
        }
        if let Some(dns) = &self.dns {
            let service = match protocol {
                Protocol::Udp => "_sip._udp",
                Protocol::Tcp => "_sip._tcp",
                Protocol::Tls => "_sips._tcp",
            };
            if let Ok(srv) = dns.srv_lookup(format!("{service}.{bare}.")).await {
                let mut records: Vec<(u16, u16, String, u16)> = srv
                    .iter()
                    .map(|r| {
                        (r.priority(), r.weight(), r.target().to_utf8().trim_end_matches('.').to_string(), r.port())
                    })
                    .collect();
                order_srv(&mut records);
                let mut out = Vec::new();
                for (_, _, target, port) in records {
                    if let Ok(addrs) = lookup_host(&target, port).await {
                        out.extend(addrs);
                    }
                }
                if !out.is_empty() {
                    return Ok(out);
                }
            }
        }
        lookup_host(bare, default_port).await
    }
}

async fn lookup_host(host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ResolveError::NoAddress { host: host.to_string(), reason: e.to_string() })?
        .collect();
    if addrs.is_empty() {
        return Err(ResolveError::NoAddress { host: host.to_string(), reason: "no A/AAAA records".into() });
    }
    Ok(addrs)
}

/// RFC 2782 ordering: ascending priority; within a priority, a weighted random order.
fn order_srv(records: &mut Vec<(u16, u16, String, u16)>) {
    records.sort_by_key(|r| r.0);
    let mut ordered = Vec::with_capacity(records.len());
    let mut rng = rand::rng();
    while !records.is_empty() {
        let priority = records[0].0;
        let mut group: Vec<_> = Vec::new();
        while !records.is_empty() && records[0].0 == priority {
            group.push(records.remove(0));
        }
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.1) + 1).sum();
            let mut pick = rng.random_range(0..total);
            let index = group
                .iter()
                .position(|r| {
                    let w = u32::from(r.1) + 1;
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            ordered.push(group.remove(index));
        }
    }
    *records = ordered;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_and_hosts_resolve_without_dns() {
        let resolver = Resolver { dns: None, tls: None };
        let v4 = resolver.resolve("192.0.2.1", None, Protocol::Udp).await.unwrap();
        assert_eq!(v4, vec!["192.0.2.1:5060".parse().unwrap()]);
        let v6 = resolver.resolve("[::1]", Some(5080), Protocol::Udp).await.unwrap();
        assert_eq!(v6, vec!["[::1]:5080".parse().unwrap()]);
        let local = resolver.resolve("localhost", Some(5070), Protocol::Tcp).await.unwrap();
        assert!(local.iter().all(|a| a.port() == 5070 && a.ip().is_loopback()));
        let tls = resolver.resolve("192.0.2.1", None, Protocol::Tls).await.unwrap();
        assert_eq!(tls, vec!["192.0.2.1:5061".parse().unwrap()], "TLS defaults to port 5061");
    }

    #[test]
    fn srv_order_respects_priority() {
        let mut records = vec![(20, 0, "c".to_string(), 1), (10, 50, "a".to_string(), 1), (10, 50, "b".to_string(), 1)];
        order_srv(&mut records);
        assert_eq!(records[2].2, "c");
    }
}
