//! The three controllers (Trunk, PhoneNumber, RoutingRule) and the reconcile of one object:
//! finalizer, a pass of the reconcile core that covers the object, its status and events.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::nodes::NodeFacts;
use super::passes::{Passes, Triggers};
use super::source::{Epoch, Fingerprint, KubeStores, is_deleting, key_of};
use super::status::{self, Inputs, StatusDoc};
use crate::crd::{PhoneNumber, RoutingRule, Trunk, TrunkSpec};
use crate::reconcile::Reconciler;
use crate::source::{Kind, ResourceKey};

/// The finalizer that holds an object until its rows are gone from Postgres.
pub const FINALIZER: &str = "switchboard.dev/cleanup";
/// The field manager and event reporter of the operator.
pub const MANAGER: &str = "switchboard-operator";

/// How often an object is reconciled without any trigger (level-triggered safety net).
const RESYNC: Duration = Duration::from_secs(300);
/// When a pass that may not cover this object is running, check back after this long.
const PASS_RUNNING: Duration = Duration::from_millis(300);
/// Attempts of a status write that meets 409 Conflict (each re-reads the object).
const CONFLICT_ATTEMPTS: usize = 5;

/// Errors of one object's reconcile; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("database unavailable: {0}")]
    Database(String),
    #[error("status write kept conflicting after {CONFLICT_ATTEMPTS} attempts")]
    Conflict,
    #[error("not the leader")]
    NotLeader,
}

impl Error {
    /// The label of `switchboard_operator_reconcile_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubeApi",
            Self::Database(_) => status::reason::DATABASE_UNAVAILABLE,
            Self::Conflict => "Conflict",
            Self::NotLeader => "NotLeader",
        }
    }
}

/// A Switchboard resource type the controllers handle.
pub trait Managed:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Fingerprint
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    const KIND: Kind;
    /// The trunk spec, for trunks (their status has more to say).
    fn trunk_spec(&self) -> Option<&TrunkSpec> {
        None
    }
}

impl Managed for Trunk {
    const KIND: Kind = Kind::Trunk;
    fn trunk_spec(&self) -> Option<&TrunkSpec> {
        Some(&self.spec)
    }
}
impl Managed for PhoneNumber {
    const KIND: Kind = Kind::PhoneNumber;
}
impl Managed for RoutingRule {
    const KIND: Kind = Kind::RoutingRule;
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub passes: Arc<Passes>,
    pub facts: watch::Receiver<Option<Arc<NodeFacts>>>,
    /// Who posts the events. A recorder per reconcile: kube's `Recorder` keeps a cache of every
    /// event it posted and scans it on each post, which grows quadratic with 10,000 objects; the
    /// operator only posts on a change, so the cache's series aggregation buys nothing here.
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub leader: Arc<AtomicBool>,
}

/// Reconciles one object (the function the controllers run).
pub async fn reconcile<K: Managed>(object: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(object, &ctx).await;
    ctx.metrics.observe_reconcile(K::KIND.as_str(), started.elapsed(), result.as_ref().err().map(Error::reason));
    result
}

/// Retry policy: the database gets a few seconds, the API server a little longer.
pub fn error_policy<K: Managed>(object: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    let key = key_of(K::KIND, object.as_ref());
    match error {
        Error::NotLeader => Action::await_change(),
        Error::Database(_) => Action::requeue(Duration::from_secs(5)),
        _ => {
            tracing::warn!(resource = %key, %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(10))
        }
    }
}

async fn reconcile_inner<K: Managed>(object: Arc<K>, ctx: &Context) -> Result<Action, Error> {
    if !ctx.leader.load(Ordering::SeqCst) {
        return Err(Error::NotLeader);
    }
    let key = key_of(K::KIND, object.as_ref());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &key.namespace);
    // What the stores look like now; the pass this reconcile relies on must have seen it.
    let needed = ctx.passes.epoch();
    let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);

    if is_deleting(object.as_ref()) {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        let Some(outcome) = ctx.passes.ensure_or_defer(needed).await else {
            return Ok(Action::requeue(PASS_RUNNING));
        };
        return match &outcome.result {
            Ok(pass) if !pass.statuses.contains_key(&key) => {
                // The pass that left it out has committed: its rows are gone.
                remove_finalizer(&api, object.as_ref(), ctx).await?;
                ctx.metrics.forget(&key);
                tracing::info!(resource = %key, generation = pass.generation, "rows removed; finalizer released");
                Ok(Action::await_change())
            }
            // The store has not caught up with the deletion yet.
            Ok(_) => Ok(Action::requeue(Duration::from_secs(1))),
            Err(error) => {
                write_status(&api, object, ctx, &key, None, Some(error)).await?;
                Err(Error::Database(error.clone()))
            }
        };
    }

    let object = if has_finalizer { object } else { Arc::new(add_finalizer(&api, object.as_ref(), ctx).await?) };
    let Some(outcome) = ctx.passes.ensure_or_defer(needed).await else {
        return Ok(Action::requeue(PASS_RUNNING));
    };
    match &outcome.result {
        Ok(pass) => match pass.statuses.get(&key) {
            Some(reconciled) => {
                write_status(&api, object, ctx, &key, Some(reconciled), None).await?;
                Ok(Action::requeue(RESYNC))
            }
            // Not in the stores the pass read (created a moment ago): the next pass has it.
            None => Ok(Action::requeue(Duration::from_millis(500))),
        },
        Err(error) => {
            write_status(&api, object, ctx, &key, None, Some(error)).await?;
            Err(Error::Database(error.clone()))
        }
    }
}

/// Adds the finalizer with a JSON patch that fails if the list changed meanwhile.
async fn add_finalizer<K: Managed>(api: &Api<K>, object: &K, ctx: &Context) -> Result<K, Error> {
    let patch = match &object.meta().finalizers {
        None => serde_json::json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ]),
        Some(finalizers) => serde_json::json!([
            { "op": "test", "path": "/metadata/finalizers", "value": finalizers },
            { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER },
        ]),
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("a valid JSON patch");
    ctx.metrics.api_write("finalizer");
    Ok(api.patch(&object.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch)).await?)
}

/// Removes the finalizer (and only it), failing if the list changed meanwhile.
async fn remove_finalizer<K: Managed>(api: &Api<K>, object: &K, ctx: &Context) -> Result<(), Error> {
    let Some(index) = object.finalizers().iter().position(|f| f == FINALIZER) else { return Ok(()) };
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": path, "value": FINALIZER },
        { "op": "remove", "path": path },
    ]))
    .expect("a valid JSON patch");
    ctx.metrics.api_write("finalizer");
    match api.patch(&object.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch)).await {
        Ok(_) => Ok(()),
        // Already gone: nothing holds it any more.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Writes the object's status if it differs from what the object has, and an event for each
/// condition that changed. A 409 (the object changed meanwhile) re-reads it and tries again.
async fn write_status<K: Managed>(
    api: &Api<K>,
    mut object: Arc<K>,
    ctx: &Context,
    key: &ResourceKey,
    reconciled: Option<&crate::reconcile::ResourceStatus>,
    database_error: Option<&String>,
) -> Result<(), Error> {
    let facts = ctx.facts.borrow().clone();
    for _ in 0..CONFLICT_ATTEMPTS {
        let previous = StatusDoc::of(object.as_ref());
        let trunk = object.trunk_spec().map(|spec| (key.namespace.as_str(), key.name.as_str(), spec));
        let next = status::desired(
            &previous,
            &Inputs {
                generation: object.meta().generation,
                reconciled,
                database_error: database_error.map(String::as_str),
                facts: facts.as_deref(),
                trunk,
            },
        );
        ctx.metrics.set_conditions(key, &next.conditions);
        if next == previous {
            return Ok(());
        }
        let patch = status::merge_patch(object.meta().resource_version.as_deref(), &previous, &next);
        ctx.metrics.api_write("status");
        match api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                publish_events(object.as_ref(), ctx, &previous, &next).await;
                return Ok(());
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(resource = %key, "status write conflicted; re-reading the object");
                object = Arc::new(api.get_status(&key.name).await?);
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::Conflict)
}

/// One event per changed condition; a failure to post is logged, never fatal.
async fn publish_events<K: Managed>(object: &K, ctx: &Context, previous: &StatusDoc, next: &StatusDoc) {
    let reference = object.object_ref(&());
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    for condition in status::changed_conditions(previous, next) {
        let type_ = match condition.status {
            crate::crd::ConditionStatus::False => EventType::Warning,
            _ => EventType::Normal,
        };
        let mut note = format!("{}={}: {}", condition.type_, condition.status.as_str(), condition.message);
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            type_,
            reason: condition.reason.clone(),
            note: Some(note),
            action: format!("Update{}", condition.type_),
            secondary: None,
        };
        ctx.metrics.api_write("event");
        if let Err(error) = recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason = %condition.reason, "cannot post event");
        }
    }
}

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchScope {
    /// One namespace, or all.
    pub namespace: Option<String>,
}

impl WatchScope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }

    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("namespace {ns}"),
            None => "all namespaces".into(),
        }
    }
}

/// The label a Secret must carry for the operator to watch it (the default of
/// `--secret-selector`): the operator caches only the Secrets it selects, not every Secret in
/// the cluster. The REST API puts it on the password Secrets it writes.
pub const DEFAULT_SECRET_SELECTOR: &str = "switchboard.dev/credentials=true";
/// The label of [`DEFAULT_SECRET_SELECTOR`] as key and value.
pub const CREDENTIALS_LABEL: (&str, &str) = ("switchboard.dev/credentials", "true");

/// Settings of [`run_controllers`].
pub struct ControllerSettings {
    pub scope: WatchScope,
    /// Label selector of the Secrets watched for trunk passwords; empty: every Secret (but
    /// service-account tokens and Helm releases).
    pub secret_selector: String,
    pub node_poll: Duration,
    pub node_timeout: Duration,
    pub pass_resync: Duration,
}

/// Runs the controllers until `shutdown`: watchers and stores for the three kinds and Secrets,
/// the pass driver, the node-status poll and the three controllers.
pub async fn run_controllers(
    client: Client,
    reconciler: Reconciler,
    metrics: Arc<Metrics>,
    leader: Arc<AtomicBool>,
    settings: ControllerSettings,
    shutdown: CancellationToken,
) {
    let epoch = Arc::new(Epoch::default());
    let (trunks_reader, trunks_writer) = reflector::store::<Trunk>();
    let (numbers_reader, numbers_writer) = reflector::store::<PhoneNumber>();
    let (rules_reader, rules_writer) = reflector::store::<RoutingRule>();
    let (secrets_reader, secrets_writer) = reflector::store::<Secret>();
    let stores = KubeStores {
        trunks: trunks_reader.clone(),
        numbers: numbers_reader.clone(),
        rules: rules_reader.clone(),
        secrets: secrets_reader,
    };
    let (triggers, streams) = Triggers::new();
    let passes = Arc::new(Passes::new(
        stores.clone(),
        reconciler.clone(),
        epoch.clone(),
        Some(triggers.clone()),
        metrics.clone(),
        leader.clone(),
    ));
    let (facts_tx, facts_rx) = watch::channel(None);
    let ctx = Arc::new(Context {
        client: client.clone(),
        passes: passes.clone(),
        facts: facts_rx,
        reporter: MANAGER.into(),
        metrics: metrics.clone(),
        leader,
    });

    let config = watcher::Config::default();
    // Service-account tokens and Helm releases are never trunk passwords, and are the bulk of
    // a cluster's Secrets.
    let mut secret_config =
        watcher::Config::default().fields("type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1");
    // Only labelled Secrets: the operator's memory holds no other Secret's data (a cluster's
    // TLS keys, other apps' database passwords).
    if !settings.secret_selector.trim().is_empty() {
        secret_config = secret_config.labels(settings.secret_selector.trim());
    }

    macro_rules! stream {
        ($api:expr, $config:expr, $writer:expr) => {{
            let epoch = epoch.clone();
            watcher($api, $config)
                .default_backoff()
                .modify(|o| o.managed_fields_mut().clear())
                .reflect($writer)
                .inspect(move |event| {
                    if let Ok(event) = event {
                        epoch.observe(event);
                    }
                })
                .touched_objects()
        }};
    }
    let trunk_stream = stream!(settings.scope.api::<Trunk>(&client), config.clone(), trunks_writer);
    let number_stream = stream!(settings.scope.api::<PhoneNumber>(&client), config.clone(), numbers_writer);
    let rule_stream = stream!(settings.scope.api::<RoutingRule>(&client), config.clone(), rules_writer);
    let secret_stream = stream!(settings.scope.api::<Secret>(&client), secret_config, secrets_writer);

    let secret_stores = stores.clone();
    let (trunks_ready, numbers_ready, rules_ready) =
        (trunks_reader.clone(), numbers_reader.clone(), rules_reader.clone());
    let trunks = Controller::for_stream(trunk_stream, trunks_reader)
        .watches_stream(secret_stream, move |secret: Secret| secret_stores.trunks_using(&secret))
        .reconcile_on(streams.trunks)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile::<Trunk>, error_policy::<Trunk>, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let numbers = Controller::for_stream(number_stream, numbers_reader)
        .reconcile_on(streams.numbers)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile::<PhoneNumber>, error_policy::<PhoneNumber>, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let rules = Controller::for_stream(rule_stream, rules_reader)
        .reconcile_on(streams.rules)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile::<RoutingRule>, error_policy::<RoutingRule>, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let driver = passes.clone().drive(settings.pass_resync, shutdown.clone());
    let poller = poll_nodes(
        reconciler.pool().clone(),
        stores,
        triggers,
        facts_tx,
        settings.node_poll,
        settings.node_timeout,
        shutdown.clone(),
    );
    let trunks = until_stopped(trunks, trunks_ready, &shutdown);
    let numbers = until_stopped(numbers, numbers_ready, &shutdown);
    let rules = until_stopped(rules, rules_ready, &shutdown);
    tracing::info!(scope = %settings.scope.describe(), "controllers started");
    tokio::join!(trunks, numbers, rules, driver, poller);
    tracing::info!("controllers stopped");
}

/// Runs one controller until it stops after `shutdown`. kube-runtime's applier holds its
/// runner until the controller's store has seen its first list, and its graceful shutdown ends
/// the watch that would fill that store: a shutdown during the first list (SIGTERM right after
/// winning the lease, an API server slow to answer) would wait forever. No reconcile can have
/// started before the store was ready, so such a controller is dropped at once, losing nothing;
/// once ready, in-flight reconciles finish as usual.
async fn until_stopped<K>(
    controller: impl std::future::Future<Output = ()>,
    store: reflector::Store<K>,
    shutdown: &CancellationToken,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::pin!(controller);
    tokio::select! {
        () = &mut controller => return,
        () = shutdown.cancelled() => {}
    }
    let ready = futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|ready| ready.is_ok());
    if ready {
        controller.await;
    } else {
        tracing::debug!("controller stopped before its first list; dropped");
    }
}

/// Polls the node-written tables; when what they say changed, every object is reconciled (each
/// writes only if its own status moved).
pub(crate) async fn poll_nodes(
    pool: sqlx::PgPool,
    stores: KubeStores,
    triggers: Triggers,
    facts_tx: watch::Sender<Option<Arc<NodeFacts>>>,
    interval: Duration,
    node_timeout: Duration,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = stores.wait_until_ready() => {}
        _ = shutdown.cancelled() => return,
    }
    loop {
        match NodeFacts::load(&pool, node_timeout).await {
            Ok(facts) => {
                let changed = facts_tx.borrow().as_deref() != Some(&facts);
                if changed {
                    facts_tx.send_replace(Some(Arc::new(facts)));
                    for key in stores.all_keys() {
                        triggers.send(&key);
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the nodes' status from Postgres; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
