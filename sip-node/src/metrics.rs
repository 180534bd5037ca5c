//! Prometheus metrics of the node.
//!
//! [`NodeMetrics`] owns its own [`prometheus::Registry`] (no global state, so tests and several
//! nodes in one process do not mix) and is cheap to clone. Callers say what happened
//! (`call_ended`, `retransmission`, ...) rather than touching metric fields. Label values that
//! come from the network (SIP methods) are reduced to a fixed set so that hostile input cannot
//! create unbounded series.

use std::time::Duration;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive as _;
use switchboard_model::TrunkConfig;

/// The content type of [`NodeMetrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of `sip_call_duration_seconds`, in seconds: up to an hour.
const DURATION_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0];

/// SIP methods counted by name; any other method is counted as `other`.
const METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "PRACK",
    "UPDATE",
    "INFO",
    "REFER",
    "MESSAGE",
    "SUBSCRIBE",
    "NOTIFY",
    "PUBLISH",
];
/// Response classes counted by name.
const CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx", "6xx"];
/// Transports counted by name in parse errors.
const TRANSPORTS: &[&str] = &["UDP", "TCP", "TLS", "WS", "WSS"];

/// How a call (or call attempt) ended, for `sip_calls_total{status}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallStatus {
    Answered,
    /// Network, server or timeout failure (5xx, 408 from the node, no response).
    Failed,
    /// 486 Busy Here, 600 Busy Everywhere.
    Busy,
    /// 480 Temporarily Unavailable, 408 Request Timeout from the callee side, ringing timeout.
    NoAnswer,
    /// Canceled by the caller before answer (487).
    Canceled,
    /// Refused: 403, 404, 603 and the other 4xx/6xx.
    Rejected,
}

impl CallStatus {
    pub const ALL: [CallStatus; 6] =
        [Self::Answered, Self::Failed, Self::Busy, Self::NoAnswer, Self::Canceled, Self::Rejected];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Failed => "failed",
            Self::Busy => "busy",
            Self::NoAnswer => "no_answer",
            Self::Canceled => "canceled",
            Self::Rejected => "rejected",
        }
    }

    /// The status of an attempt that ended with the final SIP response `code`.
    pub fn from_final_code(code: u16) -> Self {
        match code {
            200..=299 => Self::Answered,
            486 | 600 => Self::Busy,
            408 | 480 => Self::NoAnswer,
            487 => Self::Canceled,
            400..=499 | 600..=699 => Self::Rejected,
            _ => Self::Failed,
        }
    }
}

/// The node's metrics. Cheap to clone: every clone updates the same series.
#[derive(Clone)]
pub struct NodeMetrics {
    registry: Registry,
    registration_status: IntGaugeVec,
    calls: IntCounterVec,
    call_duration: HistogramVec,
    cost_per_minute: prometheus::GaugeVec,
    active_calls: IntGauge,
    trunk_active_calls: IntGaugeVec,
    trunk_admitted: IntCounterVec,
    trunk_max_concurrent: IntGaugeVec,
    trunk_cps_limit: IntGaugeVec,
    draining: IntGauge,
    drain_started: IntGauge,
    drain_limit: IntGauge,
    transactions: IntGauge,
    server_transactions: IntCounter,
    retransmissions: IntCounter,
    parse_errors: IntCounterVec,
    messages: IntCounterVec,
    dropped: IntCounterVec,
    store_pending: IntGauge,
    store_dropped: IntCounter,
    config_generation: IntGauge,
    rtp_ports_capacity: IntGauge,
    rtp_port_exhaustions: IntCounter,
    bridge_latency: crate::bridge::BridgeLatency,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

/// A metric refreshed from its source when the registry is gathered: the code that owns the
/// value (the port allocator, the media engine) keeps no second count in step.
struct Sampled<M> {
    metric: M,
    refresh: Box<dyn Fn(&M) + Send + Sync>,
}

impl<M: prometheus::core::Collector> prometheus::core::Collector for Sampled<M> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.metric.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        (self.refresh)(&self.metric);
        self.metric.collect()
    }
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry.register(Box::new(metric.clone())).expect("metric names are unique and valid");
    metric
}

impl NodeMetrics {
    /// A fresh registry with every metric of the node.
    pub fn new() -> Self {
        let registry = Registry::new();
        let int_gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help).expect("valid metric"));
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let metrics = Self {
            registration_status: int_gauge_vec(
                "sip_trunk_registration_status",
                "Whether the node is registered with the trunk (1) or not (0).",
                &["provider", "trunk"],
            ),
            calls: counter_vec(
                "sip_calls_total",
                "Calls by provider, trunk and outcome (the inbound trunk of a call in, the trunk of an API call).",
                &["provider", "trunk", "status"],
            ),
            call_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new("sip_call_duration_seconds", "Talk time of answered calls.")
                        .buckets(DURATION_BUCKETS.to_vec()),
                    &["provider", "trunk"],
                )
                .expect("valid metric"),
            ),
            cost_per_minute: register(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new("sip_trunk_cost_per_minute", "Outbound rate per minute of the provider's trunks."),
                    &["provider"],
                )
                .expect("valid metric"),
            ),
            active_calls: int_gauge("switchboard_active_calls", "Calls in progress on this node."),
            trunk_active_calls: int_gauge_vec(
                "switchboard_trunk_active_calls",
                "Calls in progress on this node, by trunk.",
                &["trunk"],
            ),
            trunk_admitted: counter_vec(
                "switchboard_trunk_calls_admitted_total",
                "Calls the trunk's limits admitted on this node (what callsPerSecond limits), by trunk.",
                &["trunk"],
            ),
            trunk_max_concurrent: int_gauge_vec(
                "switchboard_trunk_max_concurrent_calls",
                "The trunk's maxConcurrentCalls (a per-node limit); no series for a trunk without one.",
                &["trunk"],
            ),
            trunk_cps_limit: int_gauge_vec(
                "switchboard_trunk_calls_per_second_limit",
                "The trunk's callsPerSecond (a per-node limit); no series for a trunk without one.",
                &["trunk"],
            ),
            draining: int_gauge("switchboard_node_draining", "1 while the node drains (after SIGTERM), else 0."),
            drain_started: int_gauge(
                "switchboard_node_drain_started_timestamp_seconds",
                "Unix time the node began draining; 0 while it does not drain.",
            ),
            drain_limit: int_gauge(
                "switchboard_node_drain_limit_seconds",
                "The node's --drain-seconds: how long calls may go on after SIGTERM.",
            ),
            transactions: int_gauge("switchboard_sip_transactions", "SIP transactions in progress."),
            server_transactions: register(
                &registry,
                IntCounter::new(
                    "switchboard_sip_server_transactions_total",
                    "SIP server transactions started (requests the node took on).",
                )
                .expect("valid metric"),
            ),
            retransmissions: register(
                &registry,
                IntCounter::new("switchboard_sip_retransmissions_total", "SIP messages retransmitted by the node.")
                    .expect("valid metric"),
            ),
            parse_errors: counter_vec(
                "switchboard_sip_parse_errors_total",
                "Received SIP messages that could not be parsed.",
                &["transport"],
            ),
            messages: counter_vec(
                "switchboard_sip_messages_total",
                "SIP messages by direction (in, out) and kind (method or response class).",
                &["direction", "kind"],
            ),
            dropped: counter_vec("switchboard_sip_dropped_total", "SIP messages dropped, by reason.", &["reason"]),
            store_pending: int_gauge("switchboard_store_pending", "Call and CDR writes waiting for Postgres."),
            store_dropped: register(
                &registry,
                IntCounter::new(
                    "switchboard_store_dropped_total",
                    "Call and CDR writes dropped (store full, or refused by Postgres as invalid).",
                )
                .expect("valid metric"),
            ),
            config_generation: int_gauge(
                "switchboard_config_generation",
                "Configuration generation the node serves (-1 before the first load).",
            ),
            rtp_ports_capacity: int_gauge(
                "switchboard_rtp_ports_capacity",
                "RTP and RTCP ports of the node's --rtp-ports range (0 without media anchoring); compare with switchboard_rtp_ports_in_use.",
            ),
            rtp_port_exhaustions: register(
                &registry,
                IntCounter::new(
                    "switchboard_rtp_port_exhaustions_total",
                    "Calls refused with 503 because no RTP port pair was free.",
                )
                .expect("valid metric"),
            ),
            bridge_latency: crate::bridge::BridgeLatency::new(),
            registry,
        };
        metrics.registry.register(metrics.bridge_latency.collector()).expect("metric names are unique and valid");
        metrics.config_generation.set(-1);
        metrics
    }

    /// `switchboard_bridge_latency_seconds`, for the AI bridge sessions to record into.
    pub fn bridge_latency(&self) -> crate::bridge::BridgeLatency {
        self.bridge_latency.clone()
    }

    /// The registry, to add metrics of other components.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Exposes `switchboard_rtp_ports_in_use`, read from `in_use` at every scrape, so that a
    /// port a call failed to give back shows as a gauge that does not return to its idle value
    /// (the allocator is the only place that knows; sampling it avoids keeping a second count
    /// in step on every path that allocates or frees). Once per node; later calls are ignored.
    pub fn track_rtp_ports(&self, in_use: impl Fn() -> usize + Send + Sync + 'static) {
        self.sampled_gauge("switchboard_rtp_ports_in_use", "RTP and RTCP ports held by calls on this node.", in_use);
    }

    /// Sets `switchboard_rtp_ports_capacity`: the ports (RTP and RTCP) of the node's range.
    pub fn rtp_ports_capacity(&self, ports: usize) {
        self.rtp_ports_capacity.set(i64::try_from(ports).unwrap_or(i64::MAX));
    }

    /// Counts a call refused because no RTP port pair was free.
    pub fn rtp_port_exhausted(&self) {
        self.rtp_port_exhaustions.inc();
    }

    /// Samples, at each scrape, the number of two-leg RTP relays on the node's media threads.
    /// Registered once; later calls are ignored.
    pub fn track_media_relays(&self, relays: impl Fn() -> usize + Send + Sync + 'static) {
        self.sampled_gauge(
            "switchboard_media_relays",
            "SIP-to-SIP calls whose RTP the node's media threads relay now (bridged calls not included).",
            relays,
        );
    }

    /// Samples the relay directions forwarded in the kernel when the metrics are rendered.
    pub fn track_kernel_forwards(&self, forwards: impl Fn() -> usize + Send + Sync + 'static) {
        self.sampled_gauge(
            "switchboard_media_kernel_forwards",
            "Relay directions (one per leg that sends) whose RTP the kernel forwards now without user space.",
            forwards,
        );
    }

    /// Samples the packets the kernel forwarded when the metrics are rendered.
    pub fn track_kernel_packets(&self, packets: impl Fn() -> u64 + Send + Sync + 'static) {
        let counter = IntCounter::new(
            "switchboard_media_kernel_packets_total",
            "RTP packets forwarded in the kernel without user space (counted when the relay takes the kernel's counters back, at the latest when the call ends).",
        )
        .expect("valid metric");
        // The source only rises; the counter catches up with it.
        self.register_sampled(counter, move |counter| {
            let (now, shown) = (packets(), counter.get());
            if now > shown {
                counter.inc_by(now - shown);
            }
        });
    }

    /// Samples whether the node serves a configuration from its disk that Postgres has not
    /// confirmed (1) or not (0).
    pub fn track_config_stale(&self, stale: impl Fn() -> bool + Send + Sync + 'static) {
        self.sampled_gauge(
            "switchboard_config_stale",
            "1 while the node serves the configuration it saved on disk because Postgres did not answer at start.",
            move || usize::from(stale()),
        );
    }

    /// Samples the store's local spool when the metrics are rendered: its size on disk, its
    /// bound (alert when `bytes / limit_bytes` nears 1: then new events are kept in memory
    /// only), and the events that found it full.
    pub fn track_store_spool(
        &self,
        bytes: impl Fn() -> u64 + Send + Sync + 'static,
        limit: u64,
        overflow: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.sampled_gauge(
            "switchboard_store_spool_bytes",
            "Bytes of call and CDR events in the store's local spool (written to disk until Postgres has them).",
            move || usize::try_from(bytes()).unwrap_or(usize::MAX),
        );
        self.sampled_gauge(
            "switchboard_store_spool_limit_bytes",
            "The spool's bound (--spool-max-bytes); beyond it new events are kept in memory only.",
            move || usize::try_from(limit).unwrap_or(usize::MAX),
        );
        let counter = IntCounter::new(
            "switchboard_store_spool_overflow_total",
            "Call and CDR events not spooled to disk because the spool was full (kept in memory only).",
        )
        .expect("valid metric");
        self.register_sampled(counter, move |counter| {
            let (now, shown) = (overflow(), counter.get());
            if now > shown {
                counter.inc_by(now - shown);
            }
        });
    }

    /// Samples the flood guard at each scrape: `switchboard_sip_guard_sources` (sources whose
    /// message rate is tracked, bounded by `--tracked-sources`) and
    /// `switchboard_sip_guard_held{what}` (server transactions, call setups and TCP connections
    /// that sources other than carriers hold now). Registered once; later calls are ignored.
    pub fn track_flood_guard(
        &self,
        sources: impl Fn() -> usize + Send + Sync + 'static,
        held: impl Fn() -> [(&'static str, usize); 3] + Send + Sync + 'static,
    ) {
        self.sampled_gauge("switchboard_sip_guard_sources", "Sources whose SIP message rate the node tracks.", sources);
        let gauge = IntGaugeVec::new(
            Opts::new(
                "switchboard_sip_guard_held",
                "What sources other than carriers hold now: server transactions, call setups, TCP connections.",
            ),
            &["what"],
        )
        .expect("valid metric");
        self.register_sampled(gauge, move |gauge| {
            for (what, count) in held() {
                gauge.with_label_values(&[what]).set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        });
    }

    fn sampled_gauge(&self, name: &str, help: &str, sample: impl Fn() -> usize + Send + Sync + 'static) {
        let gauge = IntGauge::new(name, help).expect("valid metric");
        self.register_sampled(gauge, move |gauge| gauge.set(i64::try_from(sample()).unwrap_or(i64::MAX)));
    }

    /// Registers a sampled metric once per node; later calls are ignored.
    fn register_sampled<M: prometheus::core::Collector + 'static>(
        &self,
        metric: M,
        refresh: impl Fn(&M) + Send + Sync + 'static,
    ) {
        let name = metric.desc().first().map(|d| d.fq_name.clone()).unwrap_or_default();
        if let Err(error) = self.registry.register(Box::new(Sampled { metric, refresh: Box::new(refresh) })) {
            tracing::debug!(%error, name, "sampled metric already registered");
        }
    }

    /// Every metric in the Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode the metrics: {error}");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    // --- trunks ---

    /// The node's registration with `trunk` (of `provider`) is up or down.
    pub fn registration_changed(&self, provider: &str, trunk: &str, registered: bool) {
        self.registration_status.with_label_values(&[provider, trunk]).set(i64::from(registered));
    }

    /// The outbound per-minute rate of `provider`'s trunks.
    pub fn trunk_rate(&self, provider: &str, rate_per_minute: Decimal) {
        self.cost_per_minute.with_label_values(&[provider]).set(rate_per_minute.to_f64().unwrap_or(f64::NAN));
    }

    /// `trunk` is in the configuration: its rate and limits are shown, and its call series
    /// exist from now on (at 0 until something happens), so that `rate()` and `increase()` in
    /// alert rules see the first failed call too. Series that already exist keep their values.
    pub fn trunk_configured(&self, trunk: &TrunkConfig) {
        let (provider, name) = (trunk.provider.as_str(), trunk.name.as_str());
        self.trunk_rate(provider, trunk.rate_outbound_per_minute);
        for status in CallStatus::ALL {
            self.calls.with_label_values(&[provider, name, status.as_str()]);
        }
        self.call_duration.with_label_values(&[provider, name]);
        self.trunk_active_calls.with_label_values(&[name]);
        self.trunk_admitted.with_label_values(&[name]);
        if trunk.registration_enabled {
            // 0 = not registered (yet); the registration task sets it.
            self.registration_status.with_label_values(&[provider, name]);
        } else {
            let _ = self.registration_status.remove_label_values(&[provider, name]);
        }
        let limit = |gauge: &IntGaugeVec, value: Option<u32>| match value {
            Some(value) => gauge.with_label_values(&[name]).set(i64::from(value)),
            None => {
                let _ = gauge.remove_label_values(&[name]);
            }
        };
        limit(&self.trunk_max_concurrent, trunk.max_concurrent_calls);
        limit(&self.trunk_cps_limit, trunk.calls_per_second);
    }

    /// `trunk` was removed from the configuration: its series go away.
    pub fn trunk_removed(&self, provider: &str, trunk: &str) {
        let _ = self.registration_status.remove_label_values(&[provider, trunk]);
        let _ = self.trunk_active_calls.remove_label_values(&[trunk]);
        let _ = self.trunk_admitted.remove_label_values(&[trunk]);
        let _ = self.trunk_max_concurrent.remove_label_values(&[trunk]);
        let _ = self.trunk_cps_limit.remove_label_values(&[trunk]);
        for status in CallStatus::ALL {
            let _ = self.calls.remove_label_values(&[provider, trunk, status.as_str()]);
        }
        let _ = self.call_duration.remove_label_values(&[provider, trunk]);
    }

    /// The trunk's limits admitted a call on it (counted for the CPS panel against its limit).
    pub fn trunk_call_admitted(&self, trunk: &str) {
        self.trunk_admitted.with_label_values(&[trunk]).inc();
    }

    /// `provider` no longer has any trunk: its rate series goes away.
    pub fn provider_removed(&self, provider: &str) {
        let _ = self.cost_per_minute.remove_label_values(&[provider]);
    }

    // --- calls ---

    /// A call started (on `trunk`, when it involves one). The call counts as active until the
    /// returned guard is dropped.
    pub fn call_active(&self, trunk: Option<&str>) -> ActiveCallGuard {
        self.active_calls.inc();
        let trunk = trunk.map(|trunk| {
            let gauge = self.trunk_active_calls.with_label_values(&[trunk]);
            gauge.inc();
            gauge
        });
        ActiveCallGuard { total: self.active_calls.clone(), trunk }
    }

    /// The gauge of calls in progress (inbound and API-placed), for a draining node to wait on.
    pub fn active_calls_gauge(&self) -> IntGauge {
        self.active_calls.clone()
    }

    /// A call through `trunk` of `provider` ended with `status` (`unknown` for either when no
    /// trunk took it); `talk_time` is given for answered calls and goes into
    /// `sip_call_duration_seconds`.
    pub fn call_ended(&self, provider: &str, trunk: &str, status: CallStatus, talk_time: Option<Duration>) {
        self.calls.with_label_values(&[provider, trunk, status.as_str()]).inc();
        if let Some(talk_time) = talk_time {
            self.call_duration.with_label_values(&[provider, trunk]).observe(talk_time.as_secs_f64());
        }
    }

    /// The duration histogram of `trunk` of `provider` (for tests and other components).
    pub fn call_duration(&self, provider: &str, trunk: &str) -> Histogram {
        self.call_duration.with_label_values(&[provider, trunk])
    }

    // --- draining ---

    /// The node's `--drain-seconds`, shown from the start.
    pub fn drain_limit(&self, limit: Duration) {
        self.drain_limit.set(i64::try_from(limit.as_secs()).unwrap_or(i64::MAX));
    }

    /// The node began draining now.
    pub fn drain_started(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.drain_started.set(i64::try_from(now.as_secs()).unwrap_or(i64::MAX));
        self.draining.set(1);
    }

    // --- SIP ---

    /// Number of SIP transactions in progress.
    pub fn set_transactions(&self, count: usize) {
        self.transactions.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A server transaction started.
    pub fn server_transaction_started(&self) {
        self.server_transactions.inc();
    }

    /// The node retransmitted a request or response.
    pub fn retransmission(&self) {
        self.retransmissions.inc();
    }

    /// A message received over `transport` could not be parsed.
    pub fn parse_error(&self, transport: &str) {
        self.parse_errors.with_label_values(&[known(transport, TRANSPORTS)]).inc();
    }

    /// A message was received; `kind` is the method (`INVITE`) or the response class (`2xx`).
    pub fn message_received(&self, kind: &str) {
        self.messages.with_label_values(&["in", message_kind(kind)]).inc();
    }

    /// A message was sent; `kind` as for [`NodeMetrics::message_received`].
    pub fn message_sent(&self, kind: &str) {
        self.messages.with_label_values(&["out", message_kind(kind)]).inc();
    }

    /// A message was dropped for `reason` (a short fixed word chosen by the caller, such as
    /// `flood` or `stray_response`; never text from the network).
    pub fn message_dropped(&self, reason: &str) {
        self.dropped.with_label_values(&[reason]).inc();
    }

    // --- store and config ---

    /// Events waiting in the store.
    pub fn set_store_pending(&self, pending: u64) {
        self.store_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// The store dropped `count` events.
    pub fn store_dropped(&self, count: u64) {
        self.store_dropped.inc_by(count);
    }

    /// The node now serves configuration generation `generation`.
    pub fn config_applied(&self, generation: i64) {
        self.config_generation.set(generation);
    }
}

/// Keeps a call counted in `switchboard_active_calls` until dropped.
#[derive(Debug)]
#[must_use = "the call stops counting as active when the guard is dropped"]
pub struct ActiveCallGuard {
    total: IntGauge,
    trunk: Option<IntGauge>,
}

impl Drop for ActiveCallGuard {
    fn drop(&mut self) {
        self.total.dec();
        if let Some(trunk) = &self.trunk {
            trunk.dec();
        }
    }
}

fn known<'a>(value: &'a str, allowed: &[&'static str]) -> &'a str {
    if allowed.contains(&value) { value } else { "other" }
}

fn message_kind(kind: &str) -> &str {
    if CLASSES.contains(&kind) { kind } else { known(kind, METHODS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn render_shows_every_recorded_series() {
        let metrics = NodeMetrics::new();
        metrics.registration_changed("acme", "acme-main", true);
        metrics.registration_changed("acme", "acme-backup", false);
        metrics.trunk_rate("acme", Decimal::new(12, 3));
        metrics.call_ended("acme", "acme-main", CallStatus::Answered, Some(Duration::from_secs(42)));
        metrics.call_ended("acme", "acme-main", CallStatus::from_final_code(486), None);
        let guard = metrics.call_active(Some("acme-main"));
        let other = metrics.clone().call_active(None);
        metrics.set_transactions(3);
        metrics.retransmission();
        metrics.parse_error("UDP");
        metrics.message_received("INVITE");
        metrics.message_sent("2xx");
        metrics.message_dropped("flood");
        metrics.set_store_pending(7);
        metrics.store_dropped(2);
        metrics.config_applied(5);
        metrics.rtp_ports_capacity(8);
        metrics.rtp_port_exhausted();

        let text = metrics.render();
        let expect = [
            (r#"sip_trunk_registration_status{provider="acme",trunk="acme-main"}"#, 1.0),
            (r#"sip_trunk_registration_status{provider="acme",trunk="acme-backup"}"#, 0.0),
            (r#"sip_trunk_cost_per_minute{provider="acme"}"#, 0.012),
            (r#"sip_calls_total{provider="acme",status="answered",trunk="acme-main"}"#, 1.0),
            (r#"sip_calls_total{provider="acme",status="busy",trunk="acme-main"}"#, 1.0),
            (r#"sip_call_duration_seconds_bucket{provider="acme",trunk="acme-main",le="30"}"#, 0.0),
            (r#"sip_call_duration_seconds_bucket{provider="acme",trunk="acme-main",le="60"}"#, 1.0),
            (r#"sip_call_duration_seconds_bucket{provider="acme",trunk="acme-main",le="3600"}"#, 1.0),
            (r#"sip_call_duration_seconds_sum{provider="acme",trunk="acme-main"}"#, 42.0),
            ("switchboard_active_calls", 2.0),
            (r#"switchboard_trunk_active_calls{trunk="acme-main"}"#, 1.0),
            ("switchboard_sip_transactions", 3.0),
            ("switchboard_sip_retransmissions_total", 1.0),
            (r#"switchboard_sip_parse_errors_total{transport="UDP"}"#, 1.0),
            (r#"switchboard_sip_messages_total{direction="in",kind="INVITE"}"#, 1.0),
            (r#"switchboard_sip_messages_total{direction="out",kind="2xx"}"#, 1.0),
            (r#"switchboard_sip_dropped_total{reason="flood"}"#, 1.0),
            ("switchboard_store_pending", 7.0),
            ("switchboard_store_dropped_total", 2.0),
            ("switchboard_config_generation", 5.0),
            ("switchboard_rtp_ports_capacity", 8.0),
            ("switchboard_rtp_port_exhaustions_total", 1.0),
        ];
        for (series, value) in expect {
            assert_eq!(line_value(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE sip_call_duration_seconds histogram"), "{text}");

        drop(guard);
        drop(other);
        let text = metrics.render();
        assert_eq!(line_value(&text, "switchboard_active_calls"), Some(0.0));
        assert_eq!(line_value(&text, r#"switchboard_trunk_active_calls{trunk="acme-main"}"#), Some(0.0));

        metrics.trunk_removed("acme", "acme-main");
        let text = metrics.render();
        assert!(!text.contains(r#"trunk="acme-main""#), "{text}");
    }

    fn trunk(name: &str, registration: bool, max: Option<u32>, cps: Option<u32>) -> TrunkConfig {
        let mut trunk = crate::sip::routing::tests::trunk(name);
        trunk.provider = "acme".into();
        trunk.registration_enabled = registration;
        trunk.max_concurrent_calls = max;
        trunk.calls_per_second = cps;
        trunk
    }

    #[test]
    fn a_configured_trunk_has_its_series_at_zero_and_its_limits() {
        let metrics = NodeMetrics::new();
        metrics.trunk_configured(&trunk("main", true, Some(50), Some(5)));
        metrics.trunk_configured(&trunk("spare", false, None, None));
        let text = metrics.render();
        for status in CallStatus::ALL {
            let series = format!(r#"sip_calls_total{{provider="acme",status="{}",trunk="main"}}"#, status.as_str());
            assert_eq!(line_value(&text, &series), Some(0.0), "{series} in\n{text}");
        }
        let expect = [
            (r#"sip_call_duration_seconds_count{provider="acme",trunk="main"}"#, Some(0.0)),
            (r#"switchboard_trunk_active_calls{trunk="main"}"#, Some(0.0)),
            (r#"switchboard_trunk_calls_admitted_total{trunk="main"}"#, Some(0.0)),
            (r#"sip_trunk_registration_status{provider="acme",trunk="main"}"#, Some(0.0)),
            (r#"switchboard_trunk_max_concurrent_calls{trunk="main"}"#, Some(50.0)),
            (r#"switchboard_trunk_calls_per_second_limit{trunk="main"}"#, Some(5.0)),
            (r#"sip_trunk_registration_status{provider="acme",trunk="spare"}"#, None),
            (r#"switchboard_trunk_max_concurrent_calls{trunk="spare"}"#, None),
        ];
        for (series, value) in expect {
            assert_eq!(line_value(&text, series), value, "{series} in\n{text}");
        }

        // A later config keeps what happened (a registration, calls) and follows new limits.
        metrics.registration_changed("acme", "main", true);
        metrics.call_ended("acme", "main", CallStatus::Failed, None);
        metrics.trunk_call_admitted("main");
        metrics.trunk_configured(&trunk("main", true, None, Some(7)));
        let text = metrics.render();
        assert_eq!(line_value(&text, r#"sip_trunk_registration_status{provider="acme",trunk="main"}"#), Some(1.0));
        assert_eq!(line_value(&text, r#"sip_calls_total{provider="acme",status="failed",trunk="main"}"#), Some(1.0));
        assert_eq!(line_value(&text, r#"switchboard_trunk_calls_admitted_total{trunk="main"}"#), Some(1.0));
        assert_eq!(line_value(&text, r#"switchboard_trunk_max_concurrent_calls{trunk="main"}"#), None);
        assert_eq!(line_value(&text, r#"switchboard_trunk_calls_per_second_limit{trunk="main"}"#), Some(7.0));

        metrics.trunk_removed("acme", "main");
        assert!(!metrics.render().contains(r#"trunk="main""#));
    }

    #[test]
    fn draining_shows_its_start_and_limit() {
        let metrics = NodeMetrics::new();
        metrics.drain_limit(Duration::from_secs(20));
        let text = metrics.render();
        assert_eq!(line_value(&text, "switchboard_node_draining"), Some(0.0));
        assert_eq!(line_value(&text, "switchboard_node_drain_started_timestamp_seconds"), Some(0.0));
        assert_eq!(line_value(&text, "switchboard_node_drain_limit_seconds"), Some(20.0));
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
        metrics.drain_started();
        let text = metrics.render();
        assert_eq!(line_value(&text, "switchboard_node_draining"), Some(1.0));
        let started = line_value(&text, "switchboard_node_drain_started_timestamp_seconds").unwrap();
        assert!(started >= before && started <= before + 5.0, "{started} vs {before}");
    }

    #[test]
    fn network_label_values_are_bounded() {
        let metrics = NodeMetrics::new();
        metrics.message_received("XYZZY");
        metrics.message_received("7xx");
        metrics.parse_error("carrier-pigeon");
        let text = metrics.render();
        assert_eq!(line_value(&text, r#"switchboard_sip_messages_total{direction="in",kind="other"}"#), Some(2.0));
        assert_eq!(line_value(&text, r#"switchboard_sip_parse_errors_total{transport="other"}"#), Some(1.0));
        assert!(!text.contains("XYZZY") && !text.contains("pigeon"), "{text}");
    }

    #[test]
    fn final_codes_map_to_statuses() {
        let cases = [
            (200, CallStatus::Answered),
            (486, CallStatus::Busy),
            (600, CallStatus::Busy),
            (480, CallStatus::NoAnswer),
            (408, CallStatus::NoAnswer),
            (487, CallStatus::Canceled),
            (404, CallStatus::Rejected),
            (603, CallStatus::Rejected),
            (503, CallStatus::Failed),
            (302, CallStatus::Failed),
        ];
        for (code, status) in cases {
            assert_eq!(CallStatus::from_final_code(code), status, "{code}");
        }
        assert_eq!(CallStatus::ALL.len(), 6);
    }

    #[test]
    fn metrics_of_two_nodes_do_not_mix() {
        let a = NodeMetrics::new();
        let b = NodeMetrics::new();
        a.retransmission();
        assert_eq!(line_value(&b.render(), "switchboard_sip_retransmissions_total"), Some(0.0));
    }

    #[test]
    fn rtp_port_gauge_is_sampled_at_each_scrape() {
        let metrics = NodeMetrics::new();
        assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_in_use"), None);
        // The capacity and the exhaustion counter are there from the start, at 0.
        assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_capacity"), Some(0.0));
        assert_eq!(line_value(&metrics.render(), "switchboard_rtp_port_exhaustions_total"), Some(0.0));
        let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(4));
        let sample = std::sync::Arc::clone(&held);
        metrics.track_rtp_ports(move || sample.load(std::sync::atomic::Ordering::Relaxed));
        metrics.track_rtp_ports(|| 99); // ignored
        assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_in_use"), Some(4.0));
        held.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_in_use"), Some(0.0));
    }
}
