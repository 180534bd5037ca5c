//! The flood guard: who may talk to the node, and how much each source may hold.
//!
//! Every source address is put in one of three classes ([`SourceClass`]) from the
//! configuration: **carriers** (a trunk's `allowedSourceCidrs` or a gateway address), sources
//! that are **admissible** because some inbound trunk authenticates by digest or not at all
//! (anyone may try), and **unknown** sources. Unknown sources get no answer to an
//! out-of-dialog request (INVITE, OPTIONS, REGISTER, ... : a silent drop before any
//! transaction or task exists, like a scanner defence should; `--unknown-sources reject`
//! answers `403` once, without retransmission, instead). They may still take part in a dialog
//! the node set up (a callee at a SIP URI sending BYE).
//!
//! What a source may hold is capped, per source and for all non-carriers together: messages
//! per second (a token bucket), server transactions, calls being set up (one task each) and
//! TCP connections. Carriers are never counted against the shared caps, so another source's
//! flood cannot push a carrier's calls out; their own rate is limited per source like anyone's.
//! Sources are keyed by IPv4 address or IPv6 /64 (one host's whole subnet is one source), and
//! the per-source tables are bounded: the token buckets are a least-recently-seen cache
//! (O(1) per message, the oldest forgotten first), the counters hold only sources with
//! something in progress.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use hashlink::LruCache;
use ipnet::IpNet;
use switchboard_model::AuthMethod;

use crate::config::{Snapshot, SnapshotHandle};

/// What the node does with an out-of-dialog request from a source no trunk allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownSources {
    /// No answer at all: a scanner learns nothing and no forged source is answered.
    Drop,
    /// One `403 Forbidden`, sent without a transaction (never retransmitted).
    Reject,
}

/// Flood guard and digest settings of a node.
#[derive(clap::Args, Debug, Clone)]
pub struct GuardArgs {
    /// Out-of-dialog requests from sources no trunk allows (by `allowedSourceCidrs`, a gateway
    /// address, or a digest/open inbound trunk): `drop` answers nothing, `reject` a single 403.
    #[arg(long, env = "SWITCHBOARD_UNKNOWN_SOURCES", value_enum, default_value_t = UnknownSources::Drop)]
    pub unknown_sources: UnknownSources,

    /// Server transactions that sources other than carriers may hold together.
    #[arg(long, env = "SWITCHBOARD_MAX_SERVER_TRANSACTIONS", default_value_t = 20_000)]
    pub max_server_transactions: usize,

    /// Server transactions one source (IPv4 address or IPv6 /64) other than a carrier may hold.
    #[arg(long, env = "SWITCHBOARD_MAX_SERVER_TRANSACTIONS_PER_SOURCE", default_value_t = 200)]
    pub max_server_transactions_per_source: usize,

    /// Inbound calls being set up (a task each) from sources other than carriers, together.
    #[arg(long, env = "SWITCHBOARD_MAX_CALL_SETUPS", default_value_t = 2_000)]
    pub max_call_setups: usize,

    /// Inbound calls in progress from one source other than a carrier.
    #[arg(long, env = "SWITCHBOARD_MAX_CALL_SETUPS_PER_SOURCE", default_value_t = 50)]
    pub max_call_setups_per_source: usize,

    /// Accepted TCP connections from sources other than carriers, together.
    #[arg(long, env = "SWITCHBOARD_MAX_TCP_CONNECTIONS", default_value_t = 1_024)]
    pub max_tcp_connections: usize,

    /// Accepted TCP connections from one source other than a carrier.
    #[arg(long, env = "SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_SOURCE", default_value_t = 16)]
    pub max_tcp_connections_per_source: usize,

    /// Sources whose message rate is tracked (least recently seen forgotten first).
    #[arg(long, env = "SWITCHBOARD_TRACKED_SOURCES", default_value_t = 65_536)]
    pub tracked_sources: usize,

    /// Secret of the digest nonces, the same on every node behind one address so that a
    /// challenge issued by one node is accepted by another. Without it (or the file) each node
    /// has its own random secret.
    #[arg(long, env = "SWITCHBOARD_NONCE_SECRET", hide_env_values = true)]
    pub nonce_secret: Option<String>,

    /// File holding the nonce secret (e.g. a mounted Kubernetes Secret); used when
    /// `--nonce-secret` is not given.
    #[arg(long, env = "SWITCHBOARD_NONCE_SECRET_FILE")]
    pub nonce_secret_file: Option<PathBuf>,

    /// Lifetime of a digest nonce in seconds.
    #[arg(long, env = "SWITCHBOARD_NONCE_TTL_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub nonce_ttl_seconds: u64,
}

impl Default for GuardArgs {
    /// The same values as the command line's defaults.
    fn default() -> Self {
        GuardArgs {
            unknown_sources: UnknownSources::Drop,
            max_server_transactions: 20_000,
            max_server_transactions_per_source: 200,
            max_call_setups: 2_000,
            max_call_setups_per_source: 50,
            max_tcp_connections: 1_024,
            max_tcp_connections_per_source: 16,
            tracked_sources: 65_536,
            nonce_secret: None,
            nonce_secret_file: None,
            nonce_ttl_seconds: 60,
        }
    }
}

/// Why the nonce secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NonceSecretError {
    #[error("cannot read the nonce secret file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the nonce secret is empty")]
    Empty,
}

impl GuardArgs {
    /// The configured nonce secret (`None`: none configured, each node has its own).
    pub fn nonce_secret(&self) -> Result<Option<Vec<u8>>, NonceSecretError> {
        let secret = match (&self.nonce_secret, &self.nonce_secret_file) {
            (Some(secret), _) => secret.as_bytes().to_vec(),
            (None, Some(path)) => {
                let mut bytes =
                    std::fs::read(path).map_err(|source| NonceSecretError::Read { path: path.clone(), source })?;
                // A trailing newline from `echo` or an editor is not part of the secret.
                while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                    bytes.pop();
                }
                bytes
            }
            (None, None) => return Ok(None),
        };
        if secret.is_empty() {
            return Err(NonceSecretError::Empty);
        }
        Ok(Some(secret))
    }
}

/// What the configuration says about a source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceClass {
    /// Allowed by a trunk's `allowedSourceCidrs` or a gateway address: never dropped because
    /// of other sources.
    Carrier,
    /// Not a carrier, but an inbound trunk authenticates by digest (or not at all), so the
    /// source may try; it counts against the shared caps.
    Admissible,
    /// No trunk allows it: no answer outside dialogs.
    Unknown,
}

/// The source classes of one configuration generation.
#[derive(Debug, Default)]
pub struct SourcePolicy {
    carriers: Vec<IpNet>,
    open: bool,
    /// An inbound certificate-auth trunk names its peers: a TLS client that presented a
    /// certificate may try (the call's admission checks the certificate against the trunk).
    mutual_tls: bool,
}

impl SourcePolicy {
    /// Carriers are every trunk's allowed networks and gateway addresses (a gateway of an
    /// outbound-only trunk still sends responses and BYEs); the policy is open when an
    /// inbound trunk takes digest or unauthenticated calls from anywhere.
    pub fn from_snapshot(snapshot: &Snapshot) -> SourcePolicy {
        let mut carriers = Vec::new();
        let (mut open, mut mutual_tls) = (false, false);
        for trunk in snapshot.trunks() {
            carriers.extend(trunk.allowed_source_cidrs.iter().copied());
            for gateway in &trunk.gateways {
                if let Ok(ip) = gateway.address.trim_matches(['[', ']']).parse::<IpAddr>() {
                    carriers.push(IpNet::from(canonical(ip)));
                }
            }
            if trunk.inbound_enabled && matches!(trunk.auth_method, AuthMethod::Digest | AuthMethod::None) {
                open = true;
            }
            mutual_tls |= trunk.inbound_enabled && trunk.requires_peer_certificate();
        }
        SourcePolicy { carriers, open, mutual_tls }
    }

    /// [`Self::classify`] for a message that came over a TLS connection whose client presented
    /// a certificate (`presented_certificate`): such a source may try when some trunk admits
    /// callers by certificate, wherever it connects from.
    pub fn classify_presenting(&self, ip: IpAddr, presented_certificate: bool) -> SourceClass {
        match self.classify(ip) {
            SourceClass::Unknown if presented_certificate && self.mutual_tls => SourceClass::Admissible,
            class => class,
        }
    }

    /// The class of `ip`.
    pub fn classify(&self, ip: IpAddr) -> SourceClass {
        let ip = canonical(ip);
        if self.carriers.iter().any(|net| net.contains(&ip)) {
            SourceClass::Carrier
        } else if self.open {
            SourceClass::Admissible
        } else {
            SourceClass::Unknown
        }
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// One source for the limits: an IPv4 address or an IPv6 /64 (a host gets a whole /64, so
/// counting its addresses one by one would give it 2^64 budgets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(u32),
    V6Prefix(u64),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match canonical(ip) {
            IpAddr::V4(v4) => SourceKey::V4(v4.to_bits()),
            IpAddr::V6(v6) => SourceKey::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source in a least-recently-seen cache: a lookup, an insert and an
/// eviction are O(1) however many sources a scan uses.
struct RateTable {
    rate: f64,
    buckets: LruCache<SourceKey, Bucket>,
}

impl RateTable {
    fn allow(&mut self, key: SourceKey, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let rate = self.rate;
        // `insert` on a full cache drops the least recently used entry.
        let bucket = match self.buckets.get_mut(&key) {
            Some(bucket) => bucket,
            None => {
                self.buckets.insert(key, Bucket { tokens: rate, at: now });
                self.buckets.get_mut(&key).expect("just inserted")
            }
        };
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts of something held (transactions, call setups, connections) per source and in all,
/// for sources other than carriers. A [`Slot`] gives its unit back when dropped.
pub struct SlotCounter {
    total_cap: usize,
    per_source_cap: usize,
    counts: Mutex<(usize, HashMap<SourceKey, usize>)>,
}

impl SlotCounter {
    pub fn new(total_cap: usize, per_source_cap: usize) -> Arc<SlotCounter> {
        Arc::new(SlotCounter { total_cap, per_source_cap, counts: Mutex::new((0, HashMap::new())) })
    }

    /// A slot for `ip`, or `None` when the source or all non-carriers are at their cap.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = SourceKey::of(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_source) = &mut *counts;
        let held = per_source.get(&key).copied().unwrap_or(0);
        if *total >= self.total_cap || held >= self.per_source_cap {
            return None;
        }
        *total += 1;
        per_source.insert(key, held + 1);
        Some(Slot { counter: Arc::clone(self), key })
    }

    /// Units held by all sources.
    pub fn total(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Sources holding at least one unit.
    pub fn sources(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }
}

/// One unit held in a [`SlotCounter`], given back on drop.
pub struct Slot {
    counter: Arc<SlotCounter>,
    key: SourceKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counter.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_source) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(held) = per_source.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                per_source.remove(&self.key);
            }
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("key", &self.key).finish()
    }
}

/// The node's flood guard, shared by the transports, the endpoint and the call router.
pub struct Guard {
    policy: ArcSwap<SourcePolicy>,
    rates: Mutex<RateTable>,
    unknown: UnknownSources,
    /// Server transactions of non-carriers.
    pub transactions: Arc<SlotCounter>,
    /// Inbound calls being set up by non-carriers.
    pub call_setups: Arc<SlotCounter>,
    /// Accepted TCP connections of non-carriers.
    pub tcp_connections: Arc<SlotCounter>,
}

impl Guard {
    /// A guard for the configuration in `snapshot`, `per_source_rate` messages/s per source.
    pub fn new(args: &GuardArgs, per_source_rate: u32, snapshot: &Snapshot) -> Arc<Guard> {
        Arc::new(Guard {
            policy: ArcSwap::from_pointee(SourcePolicy::from_snapshot(snapshot)),
            rates: Mutex::new(RateTable {
                rate: f64::from(per_source_rate),
                buckets: LruCache::new(args.tracked_sources.max(1)),
            }),
            unknown: args.unknown_sources,
            transactions: SlotCounter::new(args.max_server_transactions, args.max_server_transactions_per_source),
            call_setups: SlotCounter::new(args.max_call_setups, args.max_call_setups_per_source),
            tcp_connections: SlotCounter::new(args.max_tcp_connections, args.max_tcp_connections_per_source),
        })
    }

    /// The class of a source under the current configuration.
    pub fn classify(&self, ip: IpAddr) -> SourceClass {
        self.policy.load().classify(ip)
    }

    /// The class of a message's source, knowing whether it came over a TLS connection whose
    /// client presented a certificate (see [`SourcePolicy::classify_presenting`]).
    pub fn classify_presenting(&self, ip: IpAddr, presented_certificate: bool) -> SourceClass {
        self.policy.load().classify_presenting(ip, presented_certificate)
    }

    /// Whether a message from `ip` is within its source's rate.
    pub fn allow_message(&self, ip: IpAddr) -> bool {
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        rates.allow(SourceKey::of(ip), Instant::now())
    }

    /// Sources whose rate is being tracked (bounded by `--tracked-sources`).
    pub fn tracked_sources(&self) -> usize {
        self.rates.lock().unwrap_or_else(|p| p.into_inner()).buckets.len()
    }

    /// What to do with out-of-dialog requests from unknown sources.
    pub fn unknown_sources(&self) -> UnknownSources {
        self.unknown
    }

    /// Follows the configuration: the classes change with every generation applied.
    pub async fn follow(self: Arc<Self>, snapshot: SnapshotHandle) {
        let mut generations = snapshot.subscribe();
        loop {
            self.policy.store(Arc::new(SourcePolicy::from_snapshot(&snapshot.current())));
            if generations.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_sources_are_counted_by_their_64() {
        assert_eq!(SourceKey::of(ip("2001:db8:1:2::1")), SourceKey::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(SourceKey::of(ip("2001:db8:1:2::1")), SourceKey::of(ip("2001:db8:1:3::1")));
        assert_eq!(SourceKey::of(ip("::ffff:192.0.2.1")), SourceKey::of(ip("192.0.2.1")));
        assert_ne!(SourceKey::of(ip("192.0.2.1")), SourceKey::of(ip("192.0.2.2")));
        // One /64 shares one budget.
        let counter = SlotCounter::new(100, 2);
        let a = counter.try_acquire(ip("2001:db8::1")).unwrap();
        let _b = counter.try_acquire(ip("2001:db8::2")).unwrap();
        assert!(counter.try_acquire(ip("2001:db8::3")).is_none());
        assert!(counter.try_acquire(ip("2001:db8:0:1::3")).is_some());
        drop(a);
        assert!(counter.try_acquire(ip("2001:db8::3")).is_some());
    }

    #[test]
    fn counters_cap_each_source_and_all_and_forget_idle_sources() {
        let counter = SlotCounter::new(3, 2);
        let slots: Vec<Slot> = ["10.0.0.1", "10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|a| counter.try_acquire(ip(a)).expect("within the caps"))
            .collect();
        assert!(counter.try_acquire(ip("10.0.0.3")).is_none(), "total cap");
        assert_eq!((counter.total(), counter.sources()), (3, 2));
        drop(slots);
        assert_eq!((counter.total(), counter.sources()), (0, 0));
    }

    #[test]
    fn the_rate_table_is_bounded_and_evicts_the_least_recently_seen() {
        let mut table = RateTable { rate: 2.0, buckets: LruCache::new(100) };
        let now = Instant::now();
        let busy = SourceKey::of(ip("192.0.2.1"));
        assert!(table.allow(busy, now));
        assert!(table.allow(busy, now));
        assert!(!table.allow(busy, now), "over its rate");
        for i in 0..10_000u32 {
            table.allow(SourceKey::V4(i), now);
            // The busy source keeps being seen, so it is never the one evicted.
            if i % 50 == 0 {
                assert!(!table.allow(busy, now), "still over its rate after {i} other sources");
            }
        }
        assert_eq!(table.buckets.len(), 100);
        assert!(table.allow(busy, now + Duration::from_secs(1)), "refilled");
    }

    #[test]
    fn carriers_admissible_and_unknown_sources() {
        let mut carrier = crate::sip::routing::tests::trunk("carrier");
        carrier.allowed_source_cidrs = vec!["192.0.2.0/24".parse().unwrap()];
        carrier.auth_method = AuthMethod::Ip;
        carrier.gateways[0].address = "198.51.100.7".into();
        let snapshot = Snapshot::from_parts(1, vec![carrier.clone()], vec![], vec![], vec![]).unwrap();
        let policy = SourcePolicy::from_snapshot(&snapshot);
        assert_eq!(policy.classify(ip("192.0.2.9")), SourceClass::Carrier);
        assert_eq!(policy.classify(ip("::ffff:192.0.2.9")), SourceClass::Carrier);
        assert_eq!(policy.classify(ip("198.51.100.7")), SourceClass::Carrier);
        assert_eq!(policy.classify(ip("203.0.113.1")), SourceClass::Unknown);
        let mut digest = crate::sip::routing::tests::trunk("digest");
        digest.allowed_source_cidrs = vec![];
        digest.gateways.clear();
        digest.auth_method = AuthMethod::Digest;
        let snapshot = Snapshot::from_parts(1, vec![carrier, digest], vec![], vec![], vec![]).unwrap();
        let policy = SourcePolicy::from_snapshot(&snapshot);
        assert_eq!(policy.classify(ip("192.0.2.9")), SourceClass::Carrier);
        assert_eq!(policy.classify(ip("203.0.113.1")), SourceClass::Admissible);
    }

    /// A TLS client that presented a certificate may try from anywhere when an inbound
    /// certificate-auth trunk names its peers; without a certificate, or without such a trunk,
    /// it is as unknown as any other source.
    #[test]
    fn a_presented_certificate_is_admissible_only_where_a_trunk_names_peers() {
        let mut mtls = crate::sip::routing::tests::trunk("mtls");
        mtls.allowed_source_cidrs = vec![];
        mtls.gateways[0].address = "198.51.100.7".into();
        mtls.auth_method = AuthMethod::Certificate;
        let stranger = ip("203.0.113.1");
        let policy =
            SourcePolicy::from_snapshot(&Snapshot::from_parts(1, vec![mtls.clone()], vec![], vec![], vec![]).unwrap());
        assert_eq!(policy.classify_presenting(stranger, true), SourceClass::Unknown, "the trunk names no peers");
        mtls.tls_peer_names = vec!["sip.carrier.example".into()];
        let policy =
            SourcePolicy::from_snapshot(&Snapshot::from_parts(1, vec![mtls.clone()], vec![], vec![], vec![]).unwrap());
        assert_eq!(policy.classify_presenting(stranger, true), SourceClass::Admissible);
        assert_eq!(policy.classify_presenting(stranger, false), SourceClass::Unknown, "no certificate");
        assert_eq!(policy.classify_presenting(ip("198.51.100.7"), false), SourceClass::Carrier);
        mtls.inbound_enabled = false;
        let policy = SourcePolicy::from_snapshot(&Snapshot::from_parts(1, vec![mtls], vec![], vec![], vec![]).unwrap());
        assert_eq!(policy.classify_presenting(stranger, true), SourceClass::Unknown, "no inbound calls");
    }

    #[test]
    fn the_nonce_secret_comes_from_the_flag_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-file\n").unwrap();
        let args = GuardArgs { nonce_secret_file: Some(path.clone()), ..GuardArgs::default() };
        assert_eq!(args.nonce_secret().unwrap(), Some(b"from-file".to_vec()));
        let args = GuardArgs { nonce_secret: Some("flag".into()), ..args };
        assert_eq!(args.nonce_secret().unwrap(), Some(b"flag".to_vec()));
        assert_eq!(GuardArgs::default().nonce_secret().unwrap(), None);
        std::fs::write(&path, "\n").unwrap();
        let args = GuardArgs { nonce_secret_file: Some(path), ..GuardArgs::default() };
        assert!(matches!(args.nonce_secret(), Err(NonceSecretError::Empty)));
        let args = GuardArgs { nonce_secret_file: Some(dir.path().join("missing")), ..GuardArgs::default() };
        assert!(matches!(args.nonce_secret(), Err(NonceSecretError::Read { .. })));
    }
}
