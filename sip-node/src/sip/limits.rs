//! Per-trunk call limits on this node: concurrent calls and calls per second.
//!
//! A permit is taken when a call starts on a trunk and released when the [`CallPermit`] is
//! dropped, on every path a call can end by. With an [`Admission`] (a node with Postgres) the
//! limits hold across nodes: [`Limits::acquire`] asks the database (see `admission.rs`), and
//! decides locally against `limit / live nodes` only while the database does not answer.
//! Without one ([`Limits::default`]) they hold per node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchboard_model::TrunkConfig;

use super::admission::{Admission, Verdict, local_share};

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    Concurrent(u32),
    CallsPerSecond(u32),
}

impl LimitExceeded {
    /// The text for the SIP Reason header and the CDR.
    pub fn reason(&self) -> String {
        match self {
            LimitExceeded::Concurrent(n) => format!("trunk concurrent call limit of {n} reached"),
            LimitExceeded::CallsPerSecond(n) => format!("trunk CPS limit of {n} calls per second exceeded"),
        }
    }
}

#[derive(Default)]
struct Usage {
    active: u32,
    tokens: f64,
    refilled: Option<Instant>,
}

type Usages = Arc<Mutex<HashMap<(String, String), Usage>>>;

/// Usage of every trunk on this node.
#[derive(Clone, Default)]
pub struct Limits {
    usage: Usages,
    /// Trunk-wide admission through Postgres (`None`: per-node limits).
    admission: Option<Admission>,
    /// Counts admitted calls per trunk (`switchboard_trunk_calls_admitted_total`), when set.
    metrics: Option<crate::metrics::NodeMetrics>,
}

/// Holds one concurrent-call slot of a trunk until dropped.
pub struct CallPermit {
    usage: Usages,
    key: (String, String),
    /// Set when the call counts in Postgres too.
    admission: Option<Admission>,
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        release(&self.usage, &self.key);
        if let Some(admission) = &self.admission {
            admission.release(&self.key);
        }
    }
}

fn release(usage: &Usages, key: &(String, String)) {
    let mut usage = usage.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(u) = usage.get_mut(key) {
        u.active = u.active.saturating_sub(1);
    }
}

impl Limits {
    /// Limits that hold across nodes through `admission`.
    pub fn shared(admission: Admission) -> Self {
        Limits { usage: Usages::default(), admission: Some(admission), metrics: None }
    }

    /// The same limits, counting every admitted call in `metrics`.
    pub fn counted(self, metrics: crate::metrics::NodeMetrics) -> Self {
        Limits { metrics: Some(metrics), ..self }
    }

    /// Counts a call the limits let through.
    fn admitted(&self, trunk: &TrunkConfig) {
        if let Some(metrics) = &self.metrics {
            metrics.trunk_call_admitted(&trunk.name);
        }
    }

    /// Takes a slot on `trunk` if its concurrent-call and CPS limits allow one more call now,
    /// on this node alone.
    pub fn try_acquire(&self, trunk: &TrunkConfig) -> Result<CallPermit, LimitExceeded> {
        let permit = self.try_acquire_at(trunk, trunk.max_concurrent_calls, trunk.calls_per_second, Instant::now())?;
        self.admitted(trunk);
        Ok(permit)
    }

    /// Takes a slot on `trunk` if its limits allow one more call now across every node (see
    /// the module documentation); a trunk without limits never waits for the database.
    pub async fn acquire(&self, trunk: &TrunkConfig) -> Result<CallPermit, LimitExceeded> {
        let (max, cps) = (trunk.max_concurrent_calls, trunk.calls_per_second);
        let Some(admission) = self.admission.as_ref().filter(|_| max.is_some() || cps.is_some()) else {
            return self.try_acquire(trunk);
        };
        // Counted here first, so that the node's own count (which a resync writes) never
        // misses a call Postgres admitted.
        let key = (trunk.namespace.clone(), trunk.name.clone());
        let mut reserved = self.try_acquire_at(trunk, None, None, Instant::now())?;
        match admission.admit(&key, max, cps).await {
            Verdict::Admitted => {
                reserved.admission = Some(admission.clone());
                self.admitted(trunk);
                Ok(reserved)
            }
            Verdict::Concurrent => Err(LimitExceeded::Concurrent(max.unwrap_or_default())),
            Verdict::Rate => Err(LimitExceeded::CallsPerSecond(cps.unwrap_or_default())),
            Verdict::Unreachable => {
                drop(reserved);
                let live = admission.live_nodes();
                let share = |limit: Option<u32>| limit.map(|l| local_share(l, live));
                let mut permit = self.try_acquire_at(trunk, share(max), share(cps), Instant::now())?;
                // The resync counts it in Postgres; its end is subtracted like any other.
                permit.admission = Some(admission.clone());
                self.admitted(trunk);
                Ok(permit)
            }
        }
    }

    fn try_acquire_at(
        &self,
        trunk: &TrunkConfig,
        max: Option<u32>,
        cps: Option<u32>,
        now: Instant,
    ) -> Result<CallPermit, LimitExceeded> {
        let key = (trunk.namespace.clone(), trunk.name.clone());
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let usage = all.entry(key.clone()).or_default();
        if let Some(max) = max
            && usage.active >= max
        {
            return Err(LimitExceeded::Concurrent(trunk.max_concurrent_calls.unwrap_or(max)));
        }
        if let Some(cps) = cps {
            let rate = f64::from(cps);
            let elapsed = usage.refilled.map(|at| now.duration_since(at).as_secs_f64()).unwrap_or(1.0);
            usage.tokens = (usage.tokens + elapsed * rate).min(rate);
            usage.refilled = Some(now);
            if usage.tokens < 1.0 {
                return Err(LimitExceeded::CallsPerSecond(trunk.calls_per_second.unwrap_or(cps)));
            }
            usage.tokens -= 1.0;
        }
        usage.active += 1;
        Ok(CallPermit { usage: Arc::clone(&self.usage), key, admission: None })
    }

    /// The trunk-wide admission, when limits hold across nodes.
    pub fn admission(&self) -> Option<&Admission> {
        self.admission.as_ref()
    }

    /// Calls in progress on a trunk on this node.
    pub fn active(&self, namespace: &str, trunk: &str) -> u32 {
        let all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&(namespace.to_string(), trunk.to_string())).map(|u| u.active).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn concurrent_slots_come_back_on_drop() {
        let mut trunk = crate::sip::routing::tests::trunk("a");
        trunk.max_concurrent_calls = Some(2);
        let limits = Limits::default();
        let one = limits.try_acquire(&trunk).unwrap();
        let _two = limits.try_acquire(&trunk).unwrap();
        assert_eq!(limits.try_acquire(&trunk).err(), Some(LimitExceeded::Concurrent(2)));
        drop(one);
        assert!(limits.try_acquire(&trunk).is_ok());
    }

    #[tokio::test]
    async fn without_the_database_a_node_takes_its_share_of_the_limit() {
        // Nothing listens on port 1: every admission falls back to limit / live nodes.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(100))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let admission = Admission::new(pool, "a");
        admission.assume_live_nodes(2);
        let limits = Limits::shared(admission);
        let mut trunk = crate::sip::routing::tests::trunk("a");
        trunk.max_concurrent_calls = Some(10);
        let mut permits = Vec::new();
        for _ in 0..5 {
            permits.push(limits.acquire(&trunk).await.expect("within this node's share"));
        }
        assert_eq!(limits.acquire(&trunk).await.err(), Some(LimitExceeded::Concurrent(10)));
        drop(permits.pop());
        assert!(limits.acquire(&trunk).await.is_ok());
    }

    #[test]
    fn admitted_calls_are_counted_and_refused_ones_not() {
        let mut trunk = crate::sip::routing::tests::trunk("a");
        trunk.max_concurrent_calls = Some(1);
        let metrics = crate::metrics::NodeMetrics::new();
        let limits = Limits::default().counted(metrics.clone());
        let _one = limits.try_acquire(&trunk).unwrap();
        assert!(limits.try_acquire(&trunk).is_err());
        let text = metrics.render();
        assert!(text.contains("switchboard_trunk_calls_admitted_total{trunk=\"a\"} 1\n"), "{text}");
    }

    #[test]
    fn cps_refills_over_time() {
        let mut trunk = crate::sip::routing::tests::trunk("a");
        trunk.calls_per_second = Some(2);
        let limits = Limits::default();
        let t0 = Instant::now();
        let mut permits = Vec::new();
        let at = |t| limits.try_acquire_at(&trunk, None, Some(2), t);
        permits.push(at(t0).unwrap());
        permits.push(at(t0).unwrap());
        assert_eq!(at(t0).err(), Some(LimitExceeded::CallsPerSecond(2)));
        permits.push(at(t0 + Duration::from_millis(500)).unwrap());
        assert!(LimitExceeded::CallsPerSecond(2).reason().contains("CPS"));
    }
}
