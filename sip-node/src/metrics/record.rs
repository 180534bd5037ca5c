//! What callers say happened: trunks, calls, drain, transactions, messages, the store.

use std::time::Duration;

use prometheus::{Histogram, IntGauge, IntGaugeVec};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive as _;
use switchboard_model::TrunkConfig;

use super::{CLASSES, CallStatus, METHODS, NodeMetrics, TRANSPORTS};

impl NodeMetrics {
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

    /// A request refused on a certificate-auth trunk because of its client certificate.
    pub fn tls_peer_refused(&self, trunk: &str, reason: &str) {
        self.tls_peer_refused.with_label_values(&[trunk, reason]).inc();
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
