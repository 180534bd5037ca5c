//! The immutable configuration snapshot and the handle through which the node swaps it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use switchboard_model::{Credential, Direction, NumberConfig, RuleConfig, TrunkConfig, TrunkTls};
use tokio::sync::watch;

use super::LoadError;

/// Values keyed by `(namespace, name)`, stored as two levels so that a lookup borrows both
/// strings instead of building an owned key on every call.
type ByName<T> = HashMap<String, HashMap<String, T>>;

/// Everything the per-call path needs to know about the desired configuration, as of one
/// configuration generation. Never modified after it is built: a new generation is a new
/// snapshot, so a call that took an `Arc<Snapshot>` sees one consistent configuration from its
/// first INVITE to its BYE however often the configuration changes meanwhile.
///
/// References between resources (a number's trunk, a rule's trunks) are kept as names and may
/// dangle, as in the database: the operator stores a resource whose reference is missing with
/// `Ready=False`, and the call path decides what a dangling reference means for a call.
pub struct Snapshot {
    generation: i64,
    loaded_at: DateTime<Utc>,
    trunks: ByName<Arc<TrunkConfig>>,
    numbers: HashMap<String, NumberConfig>,
    rules: Vec<Arc<RuleConfig>>,
    inbound: Vec<Arc<RuleConfig>>,
    outbound: Vec<Arc<RuleConfig>>,
    rules_by_name: ByName<Arc<RuleConfig>>,
    credentials: ByName<Credential>,
    /// Trunks' own TLS material (client certificate, CA), set by [`Snapshot::with_trunk_tls`].
    trunk_tls: ByName<Arc<TrunkTls>>,
}

impl Snapshot {
    /// The generation of a node that has not loaded any configuration yet. Stored generations
    /// start at 0, so any loaded snapshot is newer than the placeholder.
    pub const UNLOADED: i64 = -1;

    /// Builds a snapshot from rows. Rules are put in evaluation order (priority, then name,
    /// then namespace) whatever order they come in. Fails, without panicking, when two rows
    /// claim the same key, which the database's keys rule out but a hand-built list may not.
    pub fn from_parts(
        generation: i64,
        trunks: Vec<TrunkConfig>,
        numbers: Vec<NumberConfig>,
        rules: Vec<RuleConfig>,
        credentials: Vec<Credential>,
    ) -> Result<Self, LoadError> {
        let duplicate =
            |what: &str, key: String| LoadError::Invalid { generation, problem: format!("{what} {key} appears twice") };

        let mut trunk_map: ByName<Arc<TrunkConfig>> = HashMap::new();
        for trunk in trunks {
            let key = format!("{}/{}", trunk.namespace, trunk.name);
            if !insert_by_name(&mut trunk_map, trunk.namespace.clone(), trunk.name.clone(), Arc::new(trunk)) {
                return Err(duplicate("trunk", key));
            }
        }

        let mut number_map = HashMap::with_capacity(numbers.len());
        for number in numbers {
            match number_map.entry(number.number.clone()) {
                Entry::Occupied(entry) => {
                    let held: &NumberConfig = entry.get();
                    return Err(LoadError::Invalid {
                        generation,
                        problem: format!(
                            "number {} is claimed by both {}/{} and {}/{}",
                            number.number, held.namespace, held.name, number.namespace, number.name
                        ),
                    });
                }
                Entry::Vacant(entry) => {
                    entry.insert(number);
                }
            }
        }

        let mut rules: Vec<Arc<RuleConfig>> = rules.into_iter().map(Arc::new).collect();
        rules.sort_by(|a, b| (a.priority, &a.name, &a.namespace).cmp(&(b.priority, &b.name, &b.namespace)));
        let mut rules_by_name: ByName<Arc<RuleConfig>> = HashMap::new();
        for rule in &rules {
            if !insert_by_name(&mut rules_by_name, rule.namespace.clone(), rule.name.clone(), Arc::clone(rule)) {
                return Err(duplicate("routing rule", format!("{}/{}", rule.namespace, rule.name)));
            }
        }
        let (inbound, outbound): (Vec<_>, Vec<_>) =
            rules.iter().cloned().partition(|rule| rule.direction == Direction::Inbound);

        let mut credential_map: ByName<Credential> = HashMap::new();
        for credential in credentials {
            let key = format!("{}/{}", credential.namespace, credential.trunk_name);
            let (namespace, trunk) = (credential.namespace.clone(), credential.trunk_name.clone());
            if !insert_by_name(&mut credential_map, namespace, trunk, credential) {
                return Err(duplicate("credential of trunk", key));
            }
        }

        Ok(Self {
            generation,
            loaded_at: Utc::now(),
            trunks: trunk_map,
            numbers: number_map,
            rules,
            inbound,
            outbound,
            rules_by_name,
            credentials: credential_map,
            trunk_tls: HashMap::new(),
        })
    }

    /// The snapshot with the trunks' TLS material (one entry per trunk; a later duplicate
    /// replaces an earlier one, which the table's key rules out).
    pub fn with_trunk_tls(mut self, rows: Vec<TrunkTls>) -> Self {
        for row in rows {
            let (namespace, trunk) = (row.namespace.clone(), row.trunk_name.clone());
            self.trunk_tls.entry(namespace).or_default().insert(trunk, Arc::new(row));
        }
        self
    }

    /// The TLS material of a trunk, if it has any.
    pub fn trunk_tls(&self, namespace: &str, trunk_name: &str) -> Option<&Arc<TrunkTls>> {
        self.trunk_tls.get(namespace)?.get(trunk_name)
    }

    /// Every trunk's TLS material.
    pub fn all_trunk_tls(&self) -> impl Iterator<Item = &Arc<TrunkTls>> {
        self.trunk_tls.values().flat_map(HashMap::values)
    }

    /// The configuration generation this snapshot reflects ([`Snapshot::UNLOADED`] before the
    /// first load).
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// When the snapshot was built: what the node reports as the time it applied the generation.
    pub fn loaded_at(&self) -> DateTime<Utc> {
        self.loaded_at
    }

    /// The number resource for an E.164 number (`+15551234567`): the first lookup of an
    /// inbound call.
    pub fn number(&self, e164: &str) -> Option<&NumberConfig> {
        self.numbers.get(e164)
    }

    /// A trunk by namespace and name. Shared (`Arc`) so that a call can keep just its trunk.
    pub fn trunk(&self, namespace: &str, name: &str) -> Option<&Arc<TrunkConfig>> {
        self.trunks.get(namespace)?.get(name)
    }

    /// A routing rule by namespace and name (a number's `routingRuleRef`).
    pub fn rule(&self, namespace: &str, name: &str) -> Option<&Arc<RuleConfig>> {
        self.rules_by_name.get(namespace)?.get(name)
    }

    /// The digest credential of a trunk, if its Secret was resolved.
    pub fn credential(&self, namespace: &str, trunk_name: &str) -> Option<&Credential> {
        self.credentials.get(namespace)?.get(trunk_name)
    }

    /// Every trunk, in no particular order.
    pub fn trunks(&self) -> impl Iterator<Item = &Arc<TrunkConfig>> {
        self.trunks.values().flat_map(HashMap::values)
    }

    /// Every number resource, in no particular order.
    pub fn numbers(&self) -> impl Iterator<Item = &NumberConfig> {
        self.numbers.values()
    }

    /// Every rule in evaluation order: ascending priority, then name, then namespace.
    pub fn rules(&self) -> &[Arc<RuleConfig>] {
        &self.rules
    }

    /// The inbound rules, in evaluation order.
    pub fn inbound_rules(&self) -> &[Arc<RuleConfig>] {
        &self.inbound
    }

    /// The outbound rules, in evaluation order.
    pub fn outbound_rules(&self) -> &[Arc<RuleConfig>] {
        &self.outbound
    }

    /// Number of trunks.
    pub fn trunk_count(&self) -> usize {
        self.trunks.values().map(HashMap::len).sum()
    }

    /// Number of phone numbers.
    pub fn number_count(&self) -> usize {
        self.numbers.len()
    }

    /// Every credential (for saving the snapshot to disk).
    pub fn credentials(&self) -> impl Iterator<Item = &Credential> {
        self.credentials.values().flat_map(HashMap::values)
    }

    /// Number of credentials.
    pub fn credential_count(&self) -> usize {
        self.credentials.values().map(HashMap::len).sum()
    }
}

impl Default for Snapshot {
    /// The empty placeholder a node serves before its first load: no numbers, so every inbound
    /// call is refused rather than routed on a guess.
    fn default() -> Self {
        Self {
            generation: Self::UNLOADED,
            loaded_at: Utc::now(),
            trunks: HashMap::new(),
            numbers: HashMap::new(),
            rules: Vec::new(),
            inbound: Vec::new(),
            outbound: Vec::new(),
            rules_by_name: HashMap::new(),
            credentials: HashMap::new(),
            trunk_tls: HashMap::new(),
        }
    }
}

impl std::fmt::Debug for Snapshot {
    /// A summary: the full contents (thousands of numbers) do not belong in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("loaded_at", &self.loaded_at)
            .field("trunks", &self.trunk_count())
            .field("numbers", &self.numbers.len())
            .field("rules", &self.rules.len())
            .field("credentials", &self.credential_count())
            .finish()
    }
}

/// Inserts unless the key is taken; returns whether it inserted.
fn insert_by_name<T>(map: &mut ByName<T>, namespace: String, name: String, value: T) -> bool {
    match map.entry(namespace).or_default().entry(name) {
        Entry::Occupied(_) => false,
        Entry::Vacant(entry) => {
            entry.insert(value);
            true
        }
    }
}

/// The node's current snapshot, shared by every task. Readers take an `Arc<Snapshot>` without
/// locking (`arc_swap`), so the per-call path never waits for a reload; the watcher replaces the
/// snapshot in one atomic store. Cloning the handle is cheap and shares the same snapshot.
#[derive(Clone)]
pub struct SnapshotHandle {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Snapshot>,
    /// The applied generation; also serialises swaps (see [`SnapshotHandle::swap_if_newer`]).
    applied: watch::Sender<i64>,
    /// Whether the current snapshot came from the node's disk and Postgres has not confirmed
    /// it since (see [`SnapshotHandle::serve_saved`]).
    stale: std::sync::atomic::AtomicBool,
}

impl SnapshotHandle {
    /// A handle serving `initial` (usually [`Snapshot::default`], the unloaded placeholder).
    pub fn new(initial: Snapshot) -> Self {
        let (applied, _) = watch::channel(initial.generation);
        Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(initial),
                applied,
                stale: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The snapshot to use from now on. Keep the returned `Arc` for the whole call: a swap
    /// does not affect snapshots already taken.
    pub fn current(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// The generation of the current snapshot.
    pub fn generation(&self) -> i64 {
        *self.inner.applied.borrow()
    }

    /// A receiver that wakes on every swap and holds the applied generation: how other tasks
    /// (the node-state writer, later the registration client) learn about a new configuration
    /// without polling.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.inner.applied.subscribe()
    }

    /// Makes `next` the current snapshot if its generation is newer than the current one, and
    /// returns the snapshot it replaced; returns `None` (and drops `next`) otherwise, so that a
    /// slow reload can never roll the node back to an older generation. The comparison and the
    /// store happen under the watch channel's lock, so concurrent callers cannot interleave.
    pub fn swap_if_newer(&self, next: Snapshot) -> Option<Arc<Snapshot>> {
        let mut previous = None;
        let next = Arc::new(next);
        self.inner.applied.send_if_modified(|applied| {
            if next.generation > *applied {
                previous = Some(self.inner.current.swap(Arc::clone(&next)));
                *applied = next.generation;
                self.inner.stale.store(false, std::sync::atomic::Ordering::SeqCst);
                true
            } else {
                false
            }
        });
        previous
    }
}

impl SnapshotHandle {
    /// Serves `saved`, a snapshot read from the node's disk because Postgres did not answer at
    /// start, marked stale until Postgres confirms its generation ([`Self::confirm`]) or a
    /// newer one is loaded. Ignored when a snapshot is already loaded.
    pub fn serve_saved(&self, saved: Snapshot) -> bool {
        let saved = Arc::new(saved);
        self.inner.applied.send_if_modified(|applied| {
            if *applied != Snapshot::UNLOADED || saved.generation <= *applied {
                return false;
            }
            self.inner.current.store(Arc::clone(&saved));
            self.inner.stale.store(true, std::sync::atomic::Ordering::SeqCst);
            *applied = saved.generation;
            true
        })
    }

    /// Whether the node serves a snapshot from its disk that Postgres has not confirmed yet.
    pub fn is_stale(&self) -> bool {
        self.inner.stale.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Postgres says `generation` is current: a saved snapshot of that generation is no longer
    /// stale. Returns whether that changed anything.
    pub fn confirm(&self, generation: i64) -> bool {
        let applied = self.inner.applied.borrow();
        if generation == *applied && self.is_stale() {
            self.inner.stale.store(false, std::sync::atomic::Ordering::SeqCst);
            return true;
        }
        false
    }
}

impl Default for SnapshotHandle {
    fn default() -> Self {
        Self::new(Snapshot::default())
    }
}

impl std::fmt::Debug for SnapshotHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SnapshotHandle").field(&self.current()).finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use switchboard_model::config::MatchSpec;
    use switchboard_model::{AuthMethod, Codec, GatewayConfig, Transport, TrunkSelection};

    pub(crate) fn trunk(namespace: &str, name: &str) -> TrunkConfig {
        TrunkConfig {
            namespace: namespace.into(),
            name: name.into(),
            provider: "skyetel".into(),
            display_name: None,
            suspended: false,
            gateways: vec![GatewayConfig {
                address: "sip.example.net".into(),
                port: Some(5060),
                transport: Transport::Udp,
                priority: 10,
                weight: 100,
                enabled: true,
            }],
            registrar_address: None,
            registrar_port: None,
            realm: None,
            auth_method: AuthMethod::Digest,
            registration_enabled: false,
            registration_expires: 3600,
            inbound_enabled: true,
            allowed_source_cidrs: vec!["203.0.113.0/24".parse().expect("valid CIDR")],
            outbound_enabled: true,
            dial_prefix: None,
            strip_digits: 0,
            prepend_digits: None,
            max_concurrent_calls: Some(10),
            calls_per_second: None,
            codecs: vec![Codec::Pcmu, Codec::Pcma],
            dtmf_relay: true,
            srtp: switchboard_model::SrtpMode::Disabled,
            transfer: switchboard_model::TransferMode::None,
            tls_peer_names: vec![],
            tls_peer_fingerprints: vec![],
            rtp_timeout_seconds: 30,
            options_interval_seconds: 30,
            failover_timeout_seconds: 5,
            backup_trunks: vec![],
            rate_outbound_per_minute: Decimal::new(9, 3),
            rate_inbound_per_minute: Decimal::ZERO,
            rate_per_message: Decimal::ZERO,
            currency: "USD".into(),
        }
    }

    pub(crate) fn number(namespace: &str, name: &str, e164: &str, trunk: &str) -> NumberConfig {
        NumberConfig {
            namespace: namespace.into(),
            name: name.into(),
            number: e164.into(),
            trunk_ref: trunk.into(),
            routing_rule_ref: Some("to-agent".into()),
            destination: None,
            message_webhook: None,
            caller_id_allowed: true,
        }
    }

    pub(crate) fn rule(namespace: &str, name: &str, direction: Direction, priority: i32) -> RuleConfig {
        RuleConfig {
            namespace: namespace.into(),
            name: name.into(),
            direction,
            priority,
            match_spec: MatchSpec::default(),
            destination: None,
            trunks: vec!["main".into()],
            trunk_selection: TrunkSelection::Ordered,
            status_callback: None,
        }
    }

    pub(crate) fn credential(namespace: &str, trunk: &str) -> Credential {
        Credential {
            namespace: namespace.into(),
            trunk_name: trunk.into(),
            username: "user".into(),
            password: "s3cret".into(),
            secret_name: format!("{trunk}-credentials"),
        }
    }

    fn sample(generation: i64) -> Snapshot {
        Snapshot::from_parts(
            generation,
            vec![trunk("default", "main"), trunk("other", "main")],
            vec![number("default", "support", "+15550001111", "main")],
            vec![
                rule("default", "zeta", Direction::Outbound, 10),
                rule("default", "beta", Direction::Inbound, 20),
                rule("default", "alpha", Direction::Inbound, 20),
                rule("a", "alpha", Direction::Outbound, 20),
                rule("default", "first", Direction::Inbound, 1),
            ],
            vec![credential("default", "main")],
        )
        .expect("valid snapshot")
    }

    fn names(rules: &[Arc<RuleConfig>]) -> Vec<String> {
        rules.iter().map(|r| format!("{}/{}", r.namespace, r.name)).collect()
    }

    #[test]
    fn lookups_find_what_was_loaded() {
        let snapshot = sample(7);
        assert_eq!(snapshot.generation(), 7);
        assert_eq!(snapshot.number("+15550001111").map(|n| n.name.as_str()), Some("support"));
        assert!(snapshot.number("+15550002222").is_none());
        assert!(snapshot.number("").is_none());
        assert_eq!(snapshot.trunk("other", "main").map(|t| t.namespace.as_str()), Some("other"));
        assert!(snapshot.trunk("missing", "main").is_none());
        assert!(snapshot.trunk("default", "missing").is_none());
        assert_eq!(snapshot.rule("a", "alpha").map(|r| r.direction), Some(Direction::Outbound));
        assert_eq!(snapshot.credential("default", "main").map(|c| c.username.as_str()), Some("user"));
        assert!(snapshot.credential("other", "main").is_none());
        assert_eq!((snapshot.trunk_count(), snapshot.number_count(), snapshot.credential_count()), (2, 1, 1));
        assert_eq!(snapshot.trunks().count(), 2);
        assert_eq!(snapshot.numbers().count(), 1);
    }

    #[test]
    fn rules_are_in_evaluation_order_and_split_by_direction() {
        let snapshot = sample(1);
        assert_eq!(
            names(snapshot.rules()),
            ["default/first", "default/zeta", "a/alpha", "default/alpha", "default/beta"]
        );
        assert_eq!(names(snapshot.inbound_rules()), ["default/first", "default/alpha", "default/beta"]);
        assert_eq!(names(snapshot.outbound_rules()), ["default/zeta", "a/alpha"]);
    }

    #[test]
    fn duplicate_keys_are_an_error_not_a_panic() {
        let err = Snapshot::from_parts(3, vec![trunk("d", "t"), trunk("d", "t")], vec![], vec![], vec![])
            .expect_err("duplicate trunk");
        assert_eq!(err.to_string(), "configuration generation 3 is invalid: trunk d/t appears twice");

        let err = Snapshot::from_parts(
            3,
            vec![],
            vec![number("a", "one", "+15550001111", "t"), number("b", "two", "+15550001111", "t")],
            vec![],
            vec![],
        )
        .expect_err("duplicate number");
        assert!(err.to_string().contains("number +15550001111 is claimed by both a/one and b/two"), "{err}");

        let err = Snapshot::from_parts(
            3,
            vec![],
            vec![],
            vec![rule("d", "r", Direction::Inbound, 1), rule("d", "r", Direction::Outbound, 2)],
            vec![],
        )
        .expect_err("duplicate rule");
        assert!(err.to_string().contains("routing rule d/r appears twice"), "{err}");

        let err = Snapshot::from_parts(3, vec![], vec![], vec![], vec![credential("d", "t"), credential("d", "t")])
            .expect_err("duplicate credential");
        assert!(err.to_string().contains("credential of trunk d/t appears twice"), "{err}");
    }

    #[test]
    fn debug_output_is_a_summary_without_secrets() {
        let text = format!("{:?}", SnapshotHandle::new(sample(2)));
        assert!(text.contains("generation: 2") && text.contains("numbers: 1"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn handle_swaps_only_to_newer_generations() {
        let handle = SnapshotHandle::default();
        assert_eq!(handle.generation(), Snapshot::UNLOADED);
        let mut changes = handle.subscribe();

        // Generation 0 (an empty database) is newer than "nothing loaded".
        let replaced = handle.swap_if_newer(Snapshot::from_parts(0, vec![], vec![], vec![], vec![]).unwrap());
        assert_eq!(replaced.map(|s| s.generation()), Some(Snapshot::UNLOADED));
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), 0);

        let in_call = handle.current();
        assert!(handle.swap_if_newer(sample(5)).is_some());
        assert_eq!(handle.generation(), 5);
        assert_eq!(handle.current().generation(), 5);
        // A call that took the snapshot before the swap keeps it.
        assert_eq!(in_call.generation(), 0);
        assert_eq!(in_call.number_count(), 0);

        // Same or older generations never replace the current snapshot.
        assert!(handle.swap_if_newer(sample(5)).is_none());
        assert!(handle.swap_if_newer(sample(4)).is_none());
        assert_eq!(handle.current().generation(), 5);
        assert_eq!(*changes.borrow_and_update(), 5);
        assert!(!changes.has_changed().unwrap());

        // Clones share the snapshot.
        let clone = handle.clone();
        assert!(clone.swap_if_newer(sample(6)).is_some());
        assert_eq!(handle.generation(), 6);
    }
}
