//! Where Switchboard may connect on behalf of an API client: the `webhook_url` and
//! `agent_websocket_url` of `/api/calls/initiate` are chosen by whoever holds a token, and the
//! node then POSTs or opens a WebSocket from inside the deployment's network. Without a check
//! that is a server-side request forgery: `http://169.254.169.254/` (cloud metadata), loopback
//! services, the cluster's own API server or database.
//!
//! The rule: a target must be a public unicast address, unless the operator lists it in the
//! allow-list (`--egress-allow` / `SWITCHBOARD_EGRESS_ALLOW`: CIDRs, IP addresses, host names,
//! or `.suffix` for every name under a domain). Names that only mean something inside a cluster
//! or a host (`localhost`, single-label names that the resolver's search list completes,
//! `*.svc`, `*.cluster.local`, `*.internal`, `*.local`) are refused the same way.
//!
//! The API checks what it can without resolving ([`EgressPolicy::check_url`]); the node
//! resolves once, keeps only allowed addresses ([`EgressPolicy::allowed_addrs`]) and connects
//! to one of those, so a name that resolves to a private address at connect time (DNS
//! rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("{0:?} is not a URL with a host")]
    NoHost(String),
    #[error(
        "{host} is {what}; Switchboard does not connect there on behalf of API clients (list it in SWITCHBOARD_EGRESS_ALLOW to allow it)"
    )]
    Forbidden { host: String, what: &'static str },
    #[error(
        "{host} resolves only to addresses Switchboard does not connect to on behalf of API clients ({addrs}); list them in SWITCHBOARD_EGRESS_ALLOW to allow them"
    )]
    ResolvesInternal { host: String, addrs: String },
    #[error("{0:?} in the egress allow-list is neither a CIDR, an IP address nor a host name")]
    BadEntry(String),
}

/// The allow-list, and the checks against it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    nets: Vec<IpNet>,
    /// Lower-case host names; an entry starting with `.` matches every name under it.
    hosts: Vec<String>,
}

impl EgressPolicy {
    /// Parses allow-list entries: `10.0.0.0/8`, `127.0.0.1`, `::1`, `agent.example.internal`,
    /// `.svc.cluster.local`. Empty entries are ignored.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<EgressPolicy, EgressError> {
        let mut policy = EgressPolicy::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            if let Ok(net) = entry.parse::<IpNet>() {
                policy.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(ip));
            } else if is_host_name(entry.trim_start_matches('.')) {
                policy.hosts.push(entry.to_ascii_lowercase());
            } else {
                return Err(EgressError::BadEntry(entry.to_string()));
            }
        }
        Ok(policy)
    }

    /// Whether the allow-list is empty (only public targets are allowed).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.hosts.is_empty()
    }

    /// An address is allowed when it is public unicast or inside a listed network.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip)) || internal_kind(ip).is_none()
    }

    fn host_listed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.iter().any(|entry| match entry.strip_prefix('.') {
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => *entry == host,
        })
    }

    /// Checks a host as written in a URL (without resolving it): an IP literal must be allowed,
    /// a name must not be one that only resolves inside a host or cluster.
    pub fn check_host(&self, host: &str) -> Result<(), EgressError> {
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return match internal_kind(canonical(ip)) {
                Some(what) if !self.allows_ip(ip) => Err(EgressError::Forbidden { host: host.into(), what }),
                _ => Ok(()),
            };
        }
        if self.host_listed(bare) {
            return Ok(());
        }
        match internal_name(bare) {
            Some(what) => Err(EgressError::Forbidden { host: host.into(), what }),
            None => Ok(()),
        }
    }

    /// Checks a URL's host (see [`EgressPolicy::check_host`]); returns the host.
    pub fn check_url(&self, url: &str) -> Result<String, EgressError> {
        let parsed = url::Url::parse(url).map_err(|_| EgressError::NoHost(url.into()))?;
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) => name.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(EgressError::NoHost(url.into())),
        };
        self.check_host(&host)?;
        Ok(host)
    }

    /// The resolved addresses of `host` that may be connected to: all of them when the name is
    /// listed, else those that are allowed. An error when none is left.
    pub fn allowed_addrs(&self, host: &str, resolved: &[SocketAddr]) -> Result<Vec<SocketAddr>, EgressError> {
        self.check_host(host)?;
        if self.host_listed(host) {
            return Ok(resolved.to_vec());
        }
        let allowed: Vec<SocketAddr> = resolved.iter().copied().filter(|a| self.allows_ip(a.ip())).collect();
        if allowed.is_empty() {
            let addrs = resolved.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
            return Err(EgressError::ResolvesInternal { host: host.into(), addrs });
        }
        Ok(allowed)
    }

    /// Whether the allow-list itself names `host`: a listed name (or a name under a listed
    /// `.suffix`), or an IP literal inside a listed network. Being public is not enough here:
    /// this is the check for destinations that cost money or reach people (SIP URIs an API
    /// client asks the nodes to call), which the operator must list explicitly.
    pub fn lists(&self, host: &str) -> bool {
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.nets.iter().any(|net| net.contains(&canonical(ip))),
            Err(_) => self.host_listed(bare),
        }
    }

    /// Resolves `host:port` once and returns the allowed addresses (see
    /// [`EgressPolicy::allowed_addrs`]); connect to one of these, never to the name again.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        self.check_host(host)?;
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|error| ResolveError::Lookup { host: host.into(), error: error.to_string() })?
            .collect();
        Ok(self.allowed_addrs(host, &resolved)?)
    }
}

/// A failed [`EgressPolicy::resolve`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Refused(#[from] EgressError),
    #[error("cannot resolve {host}: {error}")]
    Lookup { host: String, error: String },
}

/// An IPv4 address carried in IPv6 (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) is
/// judged as the IPv4 address it reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// What kind of non-public address `ip` is; `None` for public unicast.
fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_link_local() {
        "a link-local address (cloud metadata lives there)"
    } else if ip.is_private() {
        "a private address"
    } else if a == 100 && (64..128).contains(&b) {
        "a carrier-grade NAT address"
    } else if ip.is_unspecified() || a == 0 {
        "an unspecified address"
    } else if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        "not a unicast address"
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        "an IETF protocol address"
    } else if a == 198 && (b == 18 || b == 19) {
        "a benchmarking address"
    } else {
        return None;
    })
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_unspecified() {
        "an unspecified address"
    } else if first & 0xffc0 == 0xfe80 {
        "a link-local address"
    } else if first & 0xfe00 == 0xfc00 {
        "a unique local (private) address"
    } else if first & 0xffc0 == 0xfec0 {
        "a site-local address"
    } else if ip.is_multicast() {
        "not a unicast address"
    } else {
        return None;
    })
}

/// Names that resolve only inside a host or a cluster.
fn internal_name(host: &str) -> Option<&'static str> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return Some("a loopback name");
    }
    if !host.contains('.') {
        return Some("a single-label name (the resolver completes it with the cluster's search domains)");
    }
    const SUFFIXES: &[&str] = &[".svc", ".cluster.local", ".internal", ".local", ".localdomain", ".home.arpa"];
    if SUFFIXES.iter().any(|s| host.ends_with(s)) {
        return Some("a cluster-internal or local name");
    }
    None
}

fn is_host_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &EgressPolicy, url: &str) -> bool {
        policy.check_url(url).is_err()
    }

    #[test]
    fn internal_targets_are_refused_by_default() {
        let policy = EgressPolicy::default();
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "http://10.0.0.5/hook",
            "http://172.16.3.4/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://localhost/hook",
            "ws://agent.localhost/",
            "http://kubernetes/",
            "http://postgres.default.svc/",
            "http://api.default.svc.cluster.local/",
            "http://metadata.google.internal/",
            "http://printer.local/",
            "http://2130706433/",
        ] {
            assert!(refused(&policy, url), "{url} must be refused");
        }
        for url in [
            "https://hooks.example.com/x",
            "http://203.0.114.9/",
            "wss://agent.example.com:8443/s",
            "http://[2001:4860::1]/",
        ] {
            assert!(!refused(&policy, url), "{url} must be allowed");
        }
    }

    #[test]
    fn the_allow_list_opens_networks_addresses_and_names() {
        let policy = EgressPolicy::parse(&["127.0.0.1", "10.1.0.0/16", "agent.default.svc", ".corp.internal"]).unwrap();
        assert!(!refused(&policy, "http://127.0.0.1:9/"));
        assert!(refused(&policy, "http://127.0.0.2:9/"), "only the listed address");
        assert!(!refused(&policy, "http://10.1.2.3/"));
        assert!(refused(&policy, "http://10.2.0.1/"));
        assert!(!refused(&policy, "ws://agent.default.svc/"));
        assert!(refused(&policy, "ws://other.default.svc/"));
        assert!(!refused(&policy, "ws://a.b.corp.internal/"));
        assert!(EgressPolicy::parse(&["not a host!"]).is_err());
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let policy = EgressPolicy::default();
        let mixed = [addr("10.0.0.1:80"), addr("203.0.114.9:80")];
        assert_eq!(policy.allowed_addrs("hooks.example.com", &mixed).unwrap(), vec![addr("203.0.114.9:80")]);
        let rebound = [addr("169.254.169.254:80")];
        let error = policy.allowed_addrs("hooks.example.com", &rebound).unwrap_err();
        assert!(error.to_string().contains("169.254.169.254"), "{error}");
        let listed = EgressPolicy::parse(&["hooks.example.com"]).unwrap();
        assert_eq!(listed.allowed_addrs("hooks.example.com", &rebound).unwrap(), rebound.to_vec());
    }

    #[test]
    fn only_what_the_list_names_is_listed_public_is_not_enough() {
        let policy = EgressPolicy::parse(&["10.1.0.0/16", "pbx.example.com", ".voice.example"]).unwrap();
        for listed in ["10.1.2.3", "pbx.example.com", "PBX.example.com.", "desk.voice.example"] {
            assert!(policy.lists(listed), "{listed}");
        }
        for not in ["8.8.8.8", "10.2.0.1", "example.com", "voice.example", "[2001:db8::1]"] {
            assert!(!policy.lists(not), "{not}");
        }
        assert!(!EgressPolicy::default().lists("pbx.example.com"));
    }
}
