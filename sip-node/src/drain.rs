//! Draining: a node told to stop (SIGTERM from Kubernetes during a rolling update) keeps the
//! calls it has until they end and takes no new ones, so that stopping a node never cuts a
//! call it accepted — within the drain time the operator of the node allows.
//!
//! While draining the node answers new INVITEs with `503` and `Retry-After` (carriers then
//! try their next destination), reports itself not ready on `/readyz`, un-REGISTERs from its
//! providers, stops claiming calls queued through the API, and keeps everything a call in
//! progress needs (in-dialog requests, media, the CDR writer) running.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;

/// The CDR reason (and SIP `Reason` text) of a call the node ended at the drain limit.
pub const NODE_SHUTDOWN: &str = "node shutdown";

/// How often [`Drain::wait_idle`] looks at the number of calls in progress.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// The node's draining switch, shared by everything that must act on it.
#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    /// Turns true, once, when draining begins.
    draining: watch::Sender<bool>,
    /// Turns true, once, when the calls still in progress must end now.
    ending: watch::Sender<bool>,
    /// Calls in progress on the node (the `switchboard_active_calls` gauge), once signaling
    /// started.
    calls: OnceLock<IntGauge>,
    /// Where draining shows (`switchboard_node_draining` and its start time), once signaling
    /// started.
    metrics: OnceLock<crate::metrics::NodeMetrics>,
    /// The node's `--drain-seconds`, shown in the metrics.
    limit: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::with_limit(Duration::ZERO)
    }
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain").field("draining", &self.is_draining()).field("calls", &self.calls()).finish()
    }
}

impl Drain {
    /// A switch for a node whose calls may go on for `limit` once draining begins (the limit
    /// is enforced by the caller; it is kept here to be shown in the metrics).
    pub fn with_limit(limit: Duration) -> Self {
        Drain {
            inner: Arc::new(Inner {
                draining: watch::channel(false).0,
                ending: watch::channel(false).0,
                calls: OnceLock::new(),
                metrics: OnceLock::new(),
                limit,
            }),
        }
    }

    /// Starts draining (idempotent).
    pub fn begin(&self) {
        let began = self.inner.draining.send_if_modified(|draining| !std::mem::replace(draining, true));
        if began && let Some(metrics) = self.inner.metrics.get() {
            metrics.drain_started();
        }
    }

    /// Shows draining in `metrics` (signaling sets it once).
    pub fn track_metrics(&self, metrics: crate::metrics::NodeMetrics) {
        metrics.drain_limit(self.inner.limit);
        let _ = self.inner.metrics.set(metrics);
    }

    /// Whether new calls are refused.
    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Resolves once draining has begun (at once if it already has).
    pub async fn started(&self) {
        let mut started = self.inner.draining.subscribe();
        let _ = started.wait_for(|s| *s).await;
    }

    /// Tells every call in progress to end now (idempotent; implies draining).
    pub fn end_calls(&self) {
        self.begin();
        self.inner.ending.send_if_modified(|ending| !std::mem::replace(ending, true));
    }

    /// Whether calls in progress are being ended by the node.
    pub fn is_ending(&self) -> bool {
        *self.inner.ending.borrow()
    }

    /// Resolves once the calls must end (at once if they already must). Call loops select on
    /// it: a call that sees it hangs up both legs and records reason `node shutdown`.
    pub async fn ending(&self) {
        let mut ending = self.inner.ending.subscribe();
        let _ = ending.wait_for(|s| *s).await;
    }

    /// Counts calls in progress with `gauge` (signaling sets it once).
    pub fn track_calls(&self, gauge: IntGauge) {
        let _ = self.inner.calls.set(gauge);
    }

    /// Calls in progress (0 before signaling started).
    pub fn calls(&self) -> i64 {
        self.inner.calls.get().map_or(0, IntGauge::get)
    }

    /// Resolves when no call is in progress.
    pub async fn wait_idle(&self) {
        while self.calls() > 0 {
            tokio::time::sleep(IDLE_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn draining_starts_once_and_waits_for_the_last_call() {
        let drain = Drain::default();
        assert!(!drain.is_draining());
        assert_eq!(drain.calls(), 0);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.started().await }
        });
        drain.begin();
        drain.begin();
        assert!(drain.is_draining());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("started resolves").unwrap();
        // `started` after the fact resolves at once.
        tokio::time::timeout(Duration::from_secs(1), drain.started()).await.expect("already started");

        let gauge = IntGauge::new("calls", "calls").unwrap();
        gauge.set(2);
        drain.track_calls(gauge.clone());
        assert_eq!(drain.calls(), 2);
        let idle = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait_idle().await }
        });
        tokio::time::sleep(IDLE_POLL * 3).await;
        assert!(!idle.is_finished(), "two calls are still up");
        gauge.set(0);
        tokio::time::timeout(Duration::from_secs(5), idle).await.expect("idle once the calls ended").unwrap();
    }

    #[tokio::test]
    async fn ending_the_calls_wakes_every_waiter_and_implies_draining() {
        let drain = Drain::default();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let drain = drain.clone();
                tokio::spawn(async move { drain.ending().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "nothing ends before end_calls");
        drain.end_calls();
        assert!(drain.is_ending() && drain.is_draining());
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        }
        tokio::time::timeout(Duration::from_secs(1), drain.ending()).await.expect("already ending");
    }

    #[test]
    fn draining_shows_in_the_metrics_once() {
        let drain = Drain::with_limit(Duration::from_secs(45));
        let metrics = crate::metrics::NodeMetrics::new();
        drain.track_metrics(metrics.clone());
        let value = |name: &str| {
            metrics.render().lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        };
        assert_eq!(value("switchboard_node_drain_limit_seconds"), Some(45.0));
        assert_eq!(value("switchboard_node_draining"), Some(0.0));
        drain.begin();
        assert_eq!(value("switchboard_node_draining"), Some(1.0));
        let started = value("switchboard_node_drain_started_timestamp_seconds").unwrap();
        assert!(started > 1.7e9, "{started}");
    }
}
