//! Kubernetes as a desired-state source: the reflector stores of the three kinds and of Secrets,
//! turned into the same [`DesiredState`] the folder source produces, for the same reconcile core.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::sync::watch;

use crate::crd::{PhoneNumber, RoutingRule, Trunk};
use crate::source::{
    DesiredResource, DesiredState, DesiredStateSource, Kind, ResourceKey, SecretData, SourceError, Spec,
};

/// `origin` of every resource that comes from the API server (shown in messages).
pub(crate) const ORIGIN: &str = "kubernetes";

/// The operator's in-memory view of the cluster.
#[derive(Clone)]
pub struct KubeStores {
    pub trunks: Store<Trunk>,
    pub numbers: Store<PhoneNumber>,
    pub rules: Store<RoutingRule>,
    pub secrets: Store<Secret>,
}

/// The identity of a Switchboard object.
pub fn key_of<K: Resource>(kind: Kind, object: &K) -> ResourceKey {
    let meta = object.meta();
    ResourceKey {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Whether an object is being deleted (it is then left out of the desired state, so the next
/// pass removes its rows before its finalizer goes).
pub(crate) fn is_deleting<K: Resource>(object: &K) -> bool {
    object.meta().deletion_timestamp.is_some()
}

/// Oldest first, then by namespace and name: the order in which two new claims on one number are
/// decided (the older resource wins, whatever order the API server lists them in).
fn by_creation<K: Resource>(objects: &mut [Arc<K>]) {
    objects.sort_by(|a, b| {
        let (a, b) = (a.meta(), b.meta());
        (a.creation_timestamp.as_ref().map(|t| t.0), &a.namespace, &a.name).cmp(&(
            b.creation_timestamp.as_ref().map(|t| t.0),
            &b.namespace,
            &b.name,
        ))
    });
}

fn live<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<Arc<K>> {
    let mut objects = store.state_filter(|o| !is_deleting(o));
    by_creation(&mut objects);
    objects
}

impl KubeStores {
    /// Waits until every store has completed its first list: a pass over a partial view would
    /// delete the rows of everything not yet listed.
    pub async fn wait_until_ready(&self) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.trunks.wait_until_ready().await?;
        self.numbers.wait_until_ready().await?;
        self.rules.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        Ok(())
    }

    /// The complete desired state: every object that is not being deleted, and the Secrets that
    /// trunks reference (no other Secret's data leaves the store).
    pub fn desired_state(&self) -> DesiredState {
        let mut state = DesiredState::default();
        for trunk in live(&self.trunks) {
            let key = key_of(Kind::Trunk, trunk.as_ref());
            for secret_name in trunk.spec.secret_names() {
                let reference = ObjectRef::<Secret>::new(secret_name).within(&key.namespace);
                if let Some(secret) = self.secrets.get(&reference) {
                    state.secrets.insert((key.namespace.clone(), secret_name.to_string()), secret_data(&secret));
                }
            }
            state.resources.push(DesiredResource {
                generation: trunk.meta().generation,
                origin: ORIGIN.into(),
                spec: Spec::Trunk(trunk.spec.clone()),
                key,
            });
        }
        for rule in live(&self.rules) {
            state.resources.push(DesiredResource {
                key: key_of(Kind::RoutingRule, rule.as_ref()),
                generation: rule.meta().generation,
                origin: ORIGIN.into(),
                spec: Spec::RoutingRule(rule.spec.clone()),
            });
        }
        for number in live(&self.numbers) {
            state.resources.push(DesiredResource {
                key: key_of(Kind::PhoneNumber, number.as_ref()),
                generation: number.meta().generation,
                origin: ORIGIN.into(),
                spec: Spec::PhoneNumber(number.spec.clone()),
            });
        }
        state
    }

    /// The trunks that reference a Secret (to re-reconcile them when it changes).
    pub fn trunks_using(&self, secret: &Secret) -> Vec<ObjectRef<Trunk>> {
        let namespace = secret.metadata.namespace.as_deref().unwrap_or_default();
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        self.trunks
            .state()
            .iter()
            .filter(|t| t.metadata.namespace.as_deref() == Some(namespace))
            .filter(|t| t.spec.secret_names().any(|s| s == name))
            .map(|t| ObjectRef::from_obj(t.as_ref()))
            .collect()
    }

    /// Every object of every kind, for a resync after the nodes' state changed.
    pub fn all_keys(&self) -> Vec<ResourceKey> {
        let mut keys: Vec<ResourceKey> = Vec::new();
        keys.extend(self.trunks.state().iter().map(|o| key_of(Kind::Trunk, o.as_ref())));
        keys.extend(self.numbers.state().iter().map(|o| key_of(Kind::PhoneNumber, o.as_ref())));
        keys.extend(self.rules.state().iter().map(|o| key_of(Kind::RoutingRule, o.as_ref())));
        keys
    }
}

/// A Secret's data as bytes (`stringData` is folded into `data` by the API server).
fn secret_data(secret: &Secret) -> SecretData {
    let mut data: SecretData = BTreeMap::new();
    for (key, value) in secret.data.iter().flatten() {
        data.insert(key.clone(), value.0.clone());
    }
    for (key, value) in secret.string_data.iter().flatten() {
        data.insert(key.clone(), value.clone().into_bytes());
    }
    data
}

/// A [`DesiredStateSource`] over the stores, for code that wants the trait.
pub struct KubeSource {
    pub stores: KubeStores,
    pub scope: String,
}

#[async_trait]
impl DesiredStateSource for KubeSource {
    fn describe(&self) -> String {
        format!("kubernetes ({})", self.scope)
    }

    async fn desired_state(&self) -> Result<DesiredState, SourceError> {
        Ok(self.stores.desired_state())
    }
}

/// Counts changes of the desired state as the watchers see them. A pass records the epoch it
/// read the stores at; a reconcile that saw epoch `e` needs a pass at `e` or later. Status-only
/// updates (our own status patches, finalizer edits) do not move the epoch, so they never cause
/// a pass.
pub struct Epoch {
    tx: watch::Sender<u64>,
    seen: Mutex<HashMap<(&'static str, String, String), String>>,
}

impl Default for Epoch {
    fn default() -> Self {
        Self { tx: watch::Sender::new(0), seen: Mutex::default() }
    }
}

/// What of an object matters to the desired state: the spec (through `metadata.generation`) and
/// whether it is being deleted. Secrets have no generation; their resourceVersion stands in.
pub trait Fingerprint: Resource {
    const TAG: &'static str;
    fn fingerprint(&self) -> String {
        let meta = self.meta();
        format!("{:?}/{}", meta.generation, meta.deletion_timestamp.is_some())
    }
}

impl Fingerprint for Trunk {
    const TAG: &'static str = "Trunk";
}
impl Fingerprint for PhoneNumber {
    const TAG: &'static str = "PhoneNumber";
}
impl Fingerprint for RoutingRule {
    const TAG: &'static str = "RoutingRule";
}
impl Fingerprint for Secret {
    const TAG: &'static str = "Secret";
    fn fingerprint(&self) -> String {
        self.metadata.resource_version.clone().unwrap_or_default()
    }
}

impl Epoch {
    /// The current epoch.
    pub fn current(&self) -> u64 {
        *self.tx.borrow()
    }

    /// A receiver that wakes on every bump.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Moves the epoch forward.
    pub fn bump(&self) {
        self.tx.send_modify(|e| *e += 1);
    }

    /// Looks at one watcher event and bumps the epoch when it changes the desired state.
    pub fn observe<K: Fingerprint>(&self, event: &watcher::Event<K>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let id =
            |o: &K| (K::TAG, o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default());
        let changed = match event {
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                let fingerprint = object.fingerprint();
                seen.insert(id(object), fingerprint.clone()).as_ref() != Some(&fingerprint)
            }
            watcher::Event::Delete(object) => {
                seen.remove(&id(object));
                true
            }
            watcher::Event::Init => false,
            // A relist may have missed deletions: always a new epoch.
            watcher::Event::InitDone => true,
        };
        drop(seen);
        if changed {
            self.bump();
        }
    }
}
