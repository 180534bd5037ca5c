//! Prometheus metrics of the node.
//!
//! [`NodeMetrics`] owns its own [`prometheus::Registry`] (no global state, so tests and several
//! nodes in one process do not mix) and is cheap to clone. Callers say what happened
//! (`call_ended`, `retransmission`, ...) rather than touching metric fields. Label values that
//! come from the network (SIP methods) are reduced to a fixed set so that hostile input cannot
//! create unbounded series.
//!
//! The modules: this one defines the metrics and registers them; `record` holds what callers
//! say happened (trunks, calls, transactions, messages, store, drain); `sampled` the metrics
//! read from their owner at every scrape (RTP ports, relays, spool, flood guard).

mod record;
mod sampled;
#[cfg(test)]
mod tests;

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
    srtp_rejected: IntCounter,
    tls_peer_refused: IntCounterVec,
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
            srtp_rejected: register(
                &registry,
                IntCounter::new(
                    "switchboard_srtp_rejected_packets_total",
                    "SRTP and SRTCP packets dropped because they did not authenticate or were replays (a wrong key, tampering); counted when the call's relay ends.",
                )
                .expect("valid metric"),
            ),
            tls_peer_refused: counter_vec(
                "switchboard_sip_tls_peer_refused_total",
                "Requests refused with 403 on a certificate-auth trunk because of the caller's TLS client certificate, by trunk and reason (not_tls, no_certificate, source, expired, untrusted, no_match, material).",
                &["trunk", "reason"],
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

    /// Every metric in the Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode the metrics: {error}");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

pub use record::ActiveCallGuard;
