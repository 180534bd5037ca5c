//! Reconcile passes for the Kubernetes source: one pass at a time over the complete desired
//! state, shared by every object that asked for it.
//!
//! Each object's reconcile asks for "a pass that has seen the stores at least as new as when I
//! looked" ([`Passes::ensure`]). Passes are serialised; while one runs, the others queue, and when
//! they get their turn the pass that just finished usually covers them. So a burst of 10,000
//! changes costs a handful of passes, and a resync with no change costs none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use kube::runtime::reflector::ObjectRef;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::source::{Epoch, KubeStores};
use crate::crd::{PhoneNumber, RoutingRule, Trunk};
use crate::reconcile::{Reconciler, ResourceStatus};
use crate::source::{Kind, ResourceKey};

/// How long a failed pass answers for: callers in that window get its error instead of queueing
/// another attempt against a database that is down.
const FAILURE_REUSE: Duration = Duration::from_secs(2);

/// The result of a successful pass.
#[derive(Debug, Default)]
pub struct PassResult {
    pub generation: i64,
    pub statuses: HashMap<ResourceKey, ResourceStatus>,
}

/// One finished pass.
#[derive(Debug)]
pub struct PassOutcome {
    /// The epoch of the stores the pass read.
    pub epoch: u64,
    pub finished: Instant,
    /// The error is a message: `DatabaseUnavailable` shows it on the resources.
    pub result: Result<Arc<PassResult>, String>,
}

/// Senders that make the controllers reconcile particular objects.
#[derive(Clone)]
pub struct Triggers {
    pub trunks: UnboundedSender<ObjectRef<Trunk>>,
    pub numbers: UnboundedSender<ObjectRef<PhoneNumber>>,
    pub rules: UnboundedSender<ObjectRef<RoutingRule>>,
}

/// The receiving ends of [`Triggers`], one per controller.
pub struct TriggerStreams {
    pub trunks: UnboundedReceiver<ObjectRef<Trunk>>,
    pub numbers: UnboundedReceiver<ObjectRef<PhoneNumber>>,
    pub rules: UnboundedReceiver<ObjectRef<RoutingRule>>,
}

impl Triggers {
    pub fn new() -> (Self, TriggerStreams) {
        let (trunks, trunks_rx) = unbounded();
        let (numbers, numbers_rx) = unbounded();
        let (rules, rules_rx) = unbounded();
        (Self { trunks, numbers, rules }, TriggerStreams { trunks: trunks_rx, numbers: numbers_rx, rules: rules_rx })
    }

    /// Asks for one object's reconcile (ignored when its controller is gone).
    pub fn send(&self, key: &ResourceKey) {
        let sent = match key.kind {
            Kind::Trunk => self.trunks.unbounded_send(ObjectRef::new(&key.name).within(&key.namespace)).is_ok(),
            Kind::PhoneNumber => self.numbers.unbounded_send(ObjectRef::new(&key.name).within(&key.namespace)).is_ok(),
            Kind::RoutingRule => self.rules.unbounded_send(ObjectRef::new(&key.name).within(&key.namespace)).is_ok(),
        };
        if !sent {
            tracing::debug!(resource = %key, "controller gone; trigger dropped");
        }
    }
}

/// Runs passes for the Kubernetes source.
pub struct Passes {
    stores: KubeStores,
    reconciler: Reconciler,
    epoch: Arc<Epoch>,
    lock: tokio::sync::Mutex<()>,
    last: RwLock<Option<Arc<PassOutcome>>>,
    last_ok: RwLock<Option<Arc<PassResult>>>,
    triggers: Option<Triggers>,
    metrics: Arc<Metrics>,
    leader: Arc<AtomicBool>,
    /// A successful pass older than this is not reused: a periodic resync re-checks the database.
    max_age: Duration,
}

impl Passes {
    pub fn new(
        stores: KubeStores,
        reconciler: Reconciler,
        epoch: Arc<Epoch>,
        triggers: Option<Triggers>,
        metrics: Arc<Metrics>,
        leader: Arc<AtomicBool>,
    ) -> Self {
        Self {
            stores,
            reconciler,
            epoch,
            lock: tokio::sync::Mutex::new(()),
            last: RwLock::new(None),
            last_ok: RwLock::new(None),
            triggers,
            metrics,
            leader,
            max_age: Duration::from_secs(60),
        }
    }

    pub fn stores(&self) -> &KubeStores {
        &self.stores
    }

    /// The epoch of the stores now: pass it to [`Passes::ensure`].
    pub fn epoch(&self) -> u64 {
        self.epoch.current()
    }

    /// The last successful pass, if any.
    pub fn last_ok(&self) -> Option<Arc<PassResult>> {
        self.last_ok.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn covering(&self, needed: u64) -> Option<Arc<PassOutcome>> {
        let last = self.last.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        if last.epoch < needed {
            return None;
        }
        let fresh = match &last.result {
            Ok(_) => last.finished.elapsed() < self.max_age,
            Err(_) => last.finished.elapsed() < FAILURE_REUSE,
        };
        fresh.then_some(last)
    }

    /// A pass that read the stores at epoch `needed` or later: the last one if it does, else a
    /// new one (after the one running now, if any).
    pub async fn ensure(&self, needed: u64) -> Arc<PassOutcome> {
        if let Some(outcome) = self.covering(needed) {
            return outcome;
        }
        let turn = self.lock.lock().await;
        if let Some(outcome) = self.covering(needed) {
            return outcome;
        }
        self.run_locked(needed, turn).await
    }

    /// Like [`Passes::ensure`], but when another pass is running, returns `None` at once instead
    /// of queueing behind it: the caller requeues itself shortly (and is also triggered when that
    /// pass changes its status). Reconciles then never sit waiting for a long pass, which keeps
    /// the controllers' queues short when thousands of objects arrive at once.
    pub async fn ensure_or_defer(&self, needed: u64) -> Option<Arc<PassOutcome>> {
        if let Some(outcome) = self.covering(needed) {
            return Some(outcome);
        }
        let turn = self.lock.try_lock().ok()?;
        if let Some(outcome) = self.covering(needed) {
            return Some(outcome);
        }
        Some(self.run_locked(needed, turn).await)
    }

    async fn run_locked(&self, needed: u64, _turn: tokio::sync::MutexGuard<'_, ()>) -> Arc<PassOutcome> {
        if self.stores.wait_until_ready().await.is_err() {
            return self.finish(needed, Err("the operator is shutting down".into()));
        }
        if !self.leader.load(Ordering::SeqCst) {
            return self.finish(needed, Err("this replica is not the leader; it does not write".into()));
        }
        // The epoch is read before the stores: a change that lands while they are read moves it
        // past this pass, so whoever saw that change gets another pass.
        let epoch = self.epoch.current();
        let state = self.stores.desired_state();
        let started = Instant::now();
        let result = self.reconciler.reconcile_all(&state).await;
        self.metrics.observe_pass(started.elapsed(), result.is_ok());
        match result {
            Ok(report) => {
                if !report.changed.is_empty() || !report.deleted.is_empty() {
                    tracing::info!(
                        generation = report.generation,
                        changed = report.changed.len(),
                        deleted = report.deleted.len(),
                        "reconciled the cluster's resources into config generation {}",
                        report.generation
                    );
                }
                let statuses: HashMap<ResourceKey, ResourceStatus> =
                    report.statuses.into_iter().map(|s| (s.key.clone(), s)).collect();
                let result = Arc::new(PassResult { generation: report.generation, statuses });
                self.trigger_changed(&result);
                *self.last_ok.write().unwrap_or_else(|p| p.into_inner()) = Some(result.clone());
                self.finish(epoch, Ok(result))
            }
            Err(error) => {
                tracing::warn!(%error, "reconcile pass failed");
                self.finish(epoch, Err(error.to_string()))
            }
        }
    }

    fn finish(&self, epoch: u64, result: Result<Arc<PassResult>, String>) -> Arc<PassOutcome> {
        let outcome = Arc::new(PassOutcome { epoch, finished: Instant::now(), result });
        *self.last.write().unwrap_or_else(|p| p.into_inner()) = Some(outcome.clone());
        outcome
    }

    /// Reconciles the objects whose stored status moved in this pass (a new Trunk makes its
    /// numbers ready; a deleted rule makes them fail).
    fn trigger_changed(&self, result: &PassResult) {
        let Some(triggers) = &self.triggers else { return };
        let previous = self.last_ok();
        for (key, status) in &result.statuses {
            if previous.as_ref().and_then(|p| p.statuses.get(key)) != Some(status) {
                triggers.send(key);
            }
        }
    }

    /// Runs a pass whenever the desired state changed (debounced), and at least every
    /// `resync`; retries failed passes with backoff. Returns when `shutdown` is cancelled.
    pub async fn drive(self: Arc<Self>, resync: Duration, shutdown: CancellationToken) {
        let mut changes = self.epoch.subscribe();
        tokio::select! {
            _ = self.stores.wait_until_ready() => {}
            _ = shutdown.cancelled() => return,
        }
        let mut backoff = Duration::from_millis(500);
        loop {
            // Let a burst of watch events settle into one pass.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.cancelled() => return,
            }
            changes.mark_unchanged();
            let outcome = self.ensure(self.epoch.current()).await;
            let wait = if outcome.result.is_ok() {
                backoff = Duration::from_millis(500);
                resync
            } else {
                backoff = (backoff * 2).min(Duration::from_secs(30));
                backoff
            };
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
