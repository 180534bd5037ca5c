//! Per-trunk call limits on this node: concurrent calls and calls per second.
//!
//! A permit is taken when a call starts on a trunk and released when the [`CallPermit`] is
//! dropped, on every path a call can end by. Limits are per node: with N nodes behind one
//! trunk the effective limit is up to N times the configured one (see the closing note of the
//! SIP core issue for the next step).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchboard_model::TrunkConfig;

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

/// Usage of every trunk on this node.
#[derive(Clone, Default)]
pub struct Limits {
    usage: Arc<Mutex<HashMap<(String, String), Usage>>>,
    /// Counts admitted calls per trunk (`switchboard_trunk_calls_admitted_total`), when set.
    metrics: Option<crate::metrics::NodeMetrics>,
}

/// Holds one concurrent-call slot of a trunk until dropped.
pub struct CallPermit {
    usage: Arc<Mutex<HashMap<(String, String), Usage>>>,
    key: (String, String),
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = usage.get_mut(&self.key) {
            u.active = u.active.saturating_sub(1);
        }
    }
}

impl Limits {
    /// Limits that count every admitted call in `metrics`.
    pub fn counted(metrics: crate::metrics::NodeMetrics) -> Self {
        Limits { usage: Arc::default(), metrics: Some(metrics) }
    }

    /// Takes a slot on `trunk` if its concurrent-call and CPS limits allow one more call now.
    pub fn try_acquire(&self, trunk: &TrunkConfig) -> Result<CallPermit, LimitExceeded> {
        self.try_acquire_at(trunk, Instant::now())
    }

    fn try_acquire_at(&self, trunk: &TrunkConfig, now: Instant) -> Result<CallPermit, LimitExceeded> {
        let key = (trunk.namespace.clone(), trunk.name.clone());
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let usage = all.entry(key.clone()).or_default();
        if let Some(max) = trunk.max_concurrent_calls
            && usage.active >= max
        {
            return Err(LimitExceeded::Concurrent(max));
        }
        if let Some(cps) = trunk.calls_per_second {
            let rate = f64::from(cps);
            let elapsed = usage.refilled.map(|at| now.duration_since(at).as_secs_f64()).unwrap_or(1.0);
            usage.tokens = (usage.tokens + elapsed * rate).min(rate);
            usage.refilled = Some(now);
            if usage.tokens < 1.0 {
                return Err(LimitExceeded::CallsPerSecond(cps));
            }
            usage.tokens -= 1.0;
        }
        usage.active += 1;
        if let Some(metrics) = &self.metrics {
            metrics.trunk_call_admitted(&trunk.name);
        }
        Ok(CallPermit { usage: Arc::clone(&self.usage), key })
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

    #[test]
    fn admitted_calls_are_counted_and_refused_ones_not() {
        let mut trunk = crate::sip::routing::tests::trunk("a");
        trunk.max_concurrent_calls = Some(1);
        let metrics = crate::metrics::NodeMetrics::new();
        let limits = Limits::counted(metrics.clone());
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
        permits.push(limits.try_acquire_at(&trunk, t0).unwrap());
        permits.push(limits.try_acquire_at(&trunk, t0).unwrap());
        assert_eq!(limits.try_acquire_at(&trunk, t0).err(), Some(LimitExceeded::CallsPerSecond(2)));
        permits.push(limits.try_acquire_at(&trunk, t0 + Duration::from_millis(500)).unwrap());
        assert!(LimitExceeded::CallsPerSecond(2).reason().contains("CPS"));
    }
}
