//! The delay the bridge adds, measured by the node on every frame, both ways, and exported as
//! `switchboard_bridge_latency_seconds{direction}`:
//!
//! - `caller_to_agent`: from the caller's RTP datagram reaching the host (the kernel's receive
//!   timestamp) to its `media` message having been written to the agent's TCP socket (or TLS
//!   records of it flushed);
//! - `agent_to_caller`: from the agent's `media` message reaching the host (the kernel's stamp
//!   of the last TCP segment read with it) or, when it waited behind earlier audio, from its
//!   turn in the 20 ms pacing, to its RTP packet having been sent to the caller. The deliberate
//!   pacing is not in it; a pacing tick that fires late is.
//!
//! Both start at the kernel, so time a frame waits in a socket buffer while the node is busy
//! counts. The fine buckets below 5 ms are for the `bridge_latency` benchmark, which reads its
//! percentiles from the same histograms.

use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, HistogramVec};

/// Bucket bounds, seconds: fine up to the 5 ms the bridge is meant to stay under.
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.001_5, 0.002, 0.003, 0.004, 0.005, 0.007_5, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The two histograms of the delay the bridge adds. Cloning shares them.
#[derive(Clone)]
pub struct BridgeLatency {
    family: HistogramVec,
    caller_to_agent: Histogram,
    agent_to_caller: Histogram,
}

impl std::fmt::Debug for BridgeLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeLatency")
            .field("caller_to_agent", &self.caller_to_agent.get_sample_count())
            .field("agent_to_caller", &self.agent_to_caller.get_sample_count())
            .finish()
    }
}

impl Default for BridgeLatency {
    fn default() -> Self {
        Self::new()
    }
}

/// A distribution read back from a histogram: percentiles are interpolated inside the bucket
/// they fall in, so they are as exact as the buckets are fine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    /// Seconds.
    pub p50: f64,
    /// Seconds.
    pub p99: f64,
    /// Frames slower than 5 ms, as a fraction of all.
    pub over_5ms: f64,
}

impl BridgeLatency {
    /// Histograms not yet in any registry (see [`BridgeLatency::collector`]).
    pub fn new() -> BridgeLatency {
        let family = HistogramVec::new(
            HistogramOpts::new(
                "switchboard_bridge_latency_seconds",
                "Delay the AI bridge adds to a frame: caller RTP arrival to WebSocket write (caller_to_agent), \
                 agent message arrival or pacing turn to RTP send (agent_to_caller).",
            )
            .buckets(BUCKETS.to_vec()),
            &["direction"],
        )
        .expect("valid metric");
        let caller_to_agent = family.with_label_values(&["caller_to_agent"]);
        let agent_to_caller = family.with_label_values(&["agent_to_caller"]);
        BridgeLatency { family, caller_to_agent, agent_to_caller }
    }

    /// The collector to register (once) with a registry.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.family.clone())
    }

    /// A caller frame that arrived at `received` has just been written to the agent.
    pub(crate) fn caller_frame_sent(&self, received: Instant) {
        self.caller_to_agent.observe(received.elapsed().as_secs_f64());
    }

    /// An agent frame whose turn came at `ready` has just been sent to the caller.
    pub(crate) fn agent_frame_sent(&self, ready: Instant) {
        self.agent_to_caller.observe(ready.elapsed().as_secs_f64());
    }

    /// What the caller → agent histogram holds.
    pub fn caller_to_agent(&self) -> Distribution {
        Distribution::of(&self.caller_to_agent)
    }

    /// What the agent → caller histogram holds.
    pub fn agent_to_caller(&self) -> Distribution {
        Distribution::of(&self.agent_to_caller)
    }
}

/// The counts of one histogram at one moment; two of them give the distribution in between.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    /// Upper bound (seconds) and samples at or below it.
    buckets: Vec<(f64, u64)>,
    count: u64,
}

impl Distribution {
    fn of(histogram: &Histogram) -> Distribution {
        let families = histogram.collect();
        let Some(metric) = families.first().and_then(|f| f.get_metric().first()) else {
            return Distribution { buckets: vec![], count: 0 };
        };
        let h = metric.get_histogram();
        let buckets = h.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count())).collect();
        Distribution { buckets, count: h.get_sample_count() }
    }

    /// The samples recorded after `earlier` (a reading of the same histogram).
    pub fn since(&self, earlier: &Distribution) -> Distribution {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, (bound, n))| (*bound, n.saturating_sub(earlier.buckets.get(i).map_or(0, |(_, m)| *m))))
            .collect();
        Distribution { buckets, count: self.count.saturating_sub(earlier.count) }
    }

    /// Count, median, 99th percentile and the share over 5 ms.
    pub fn summary(&self) -> LatencySummary {
        let count = self.count;
        let under_5ms = self.buckets.iter().find(|(bound, _)| (*bound - 0.005).abs() < 1e-9).map_or(count, |(_, n)| *n);
        LatencySummary {
            count,
            p50: quantile(&self.buckets, count, 0.50),
            p99: quantile(&self.buckets, count, 0.99),
            over_5ms: if count == 0 { 0.0 } else { (count - under_5ms) as f64 / count as f64 },
        }
    }
}

/// The `q` quantile of cumulative `buckets` (upper bound, count at or below it) holding
/// `count` samples, interpolated linearly inside its bucket; past the last bound, that bound.
fn quantile(buckets: &[(f64, u64)], count: u64, q: f64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    let rank = q * count as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(upper, cumulative) in buckets {
        if cumulative as f64 >= rank {
            let inside = (cumulative - below) as f64;
            let fraction = if inside == 0.0 { 1.0 } else { (rank - below as f64) / inside };
            return lower + (upper - lower) * fraction;
        }
        (lower, below) = (upper, cumulative);
    }
    lower
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn percentiles_are_interpolated_within_their_bucket() {
        let latency = BridgeLatency::new();
        // 98 frames at ~0.15 ms (the 0.1–0.2 ms bucket), 2 at ~6 ms (the 5–7.5 ms bucket).
        for _ in 0..98 {
            latency.caller_to_agent.observe(0.000_15);
        }
        latency.caller_to_agent.observe(0.006);
        latency.caller_to_agent.observe(0.006);
        let s = latency.caller_to_agent().summary();
        assert_eq!(s.count, 100);
        assert!((0.000_1..=0.000_2).contains(&s.p50), "{s:?}");
        assert!((0.005..=0.007_5).contains(&s.p99), "{s:?}");
        assert!((s.over_5ms - 0.02).abs() < 1e-9, "{s:?}");
        assert_eq!(latency.agent_to_caller().summary().count, 0);
        assert_eq!(latency.agent_to_caller().summary().p99, 0.0);
    }

    #[test]
    fn a_distribution_since_an_earlier_reading_holds_only_the_samples_in_between() {
        let latency = BridgeLatency::new();
        for _ in 0..50 {
            latency.agent_to_caller.observe(0.02);
        }
        let before = latency.agent_to_caller();
        for _ in 0..10 {
            latency.agent_to_caller.observe(0.000_4);
        }
        let between = latency.agent_to_caller().since(&before).summary();
        assert_eq!(between.count, 10);
        assert!((0.000_3..=0.000_5).contains(&between.p99), "{between:?}");
        assert_eq!(between.over_5ms, 0.0);
    }

    #[test]
    fn a_frame_is_measured_from_its_arrival() {
        let latency = BridgeLatency::new();
        let received = Instant::now() - Duration::from_millis(3);
        latency.caller_frame_sent(received);
        latency.agent_frame_sent(Instant::now());
        let (caller, agent) = (latency.caller_to_agent().summary(), latency.agent_to_caller().summary());
        assert!((0.003..0.004).contains(&caller.p50), "{caller:?}");
        assert!(agent.p50 < 0.001, "{agent:?}");
    }

    #[test]
    fn the_collector_exports_both_directions() {
        let latency = BridgeLatency::new();
        let registry = prometheus::Registry::new();
        registry.register(latency.collector()).unwrap();
        latency.caller_frame_sent(Instant::now());
        latency.agent_frame_sent(Instant::now());
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        assert!(text.contains(r#"switchboard_bridge_latency_seconds_count{direction="caller_to_agent"} 1"#), "{text}");
        assert!(text.contains(r#"switchboard_bridge_latency_seconds_count{direction="agent_to_caller"} 1"#), "{text}");
    }
}
