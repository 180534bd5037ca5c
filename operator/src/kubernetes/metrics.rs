//! Operator metrics: one registry rendered in the Prometheus text format (served on `/metrics`
//! by `switchboard operator`, which owns the HTTP server).

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::crd::{Condition, ConditionStatus};
use crate::source::{Kind, ResourceKey};

/// Every reason of `switchboard_operator_reconcile_errors_total` (see `controller::Error::reason`).
pub(crate) const RECONCILE_ERROR_REASONS: [&str; 4] = ["KubeApi", "DatabaseUnavailable", "Conflict", "NotLeader"];
/// What `switchboard_operator_api_writes_total{what}` counts.
const API_WRITES: [&str; 3] = ["finalizer", "status", "event"];

/// Every metric of the operator, in its own registry.
pub struct Metrics {
    pub registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    passes: IntCounterVec,
    pass_duration: Histogram,
    api_writes: IntCounterVec,
    condition: IntGaugeVec,
    pub leader: IntGauge,
    /// Name, help and type of every family, so that `/metrics` declares a family before its
    /// first series exists (a resource's conditions, before any resource is reconciled).
    declared: Vec<(String, String, &'static str)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("switchboard_operator_reconcile_total", "Reconciles of one object, by kind"),
            &["kind"],
        )
        .expect("metric");
        let errors = IntCounterVec::new(
            Opts::new("switchboard_operator_reconcile_errors_total", "Reconciles that failed, by kind and reason"),
            &["kind", "reason"],
        )
        .expect("metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("switchboard_operator_reconcile_duration_seconds", "Duration of one object's reconcile")
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            &["kind"],
        )
        .expect("metric");
        let passes = IntCounterVec::new(
            Opts::new("switchboard_operator_passes_total", "Reconcile passes over the complete desired state"),
            &["result"],
        )
        .expect("metric");
        let pass_duration = Histogram::with_opts(
            HistogramOpts::new("switchboard_operator_pass_duration_seconds", "Duration of one reconcile pass")
                .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("metric");
        let api_writes = IntCounterVec::new(
            Opts::new("switchboard_operator_api_writes_total", "Writes to the Kubernetes API, by what was written"),
            &["what"],
        )
        .expect("metric");
        let condition = IntGaugeVec::new(
            Opts::new(
                "switchboard_resource_condition",
                "1 for the current status of each condition of each resource, 0 for the other statuses",
            ),
            &["kind", "namespace", "name", "condition", "status"],
        )
        .expect("metric");
        let leader = IntGauge::new("switchboard_operator_leader", "1 while this replica holds the leader lease")
            .expect("metric");
        // Series whose labels are known up front exist from the start at 0, so that `rate()` and
        // `increase()` in alert rules see the first error too.
        for kind in [Kind::Trunk, Kind::PhoneNumber, Kind::RoutingRule] {
            reconciles.with_label_values(&[kind.as_str()]);
            duration.with_label_values(&[kind.as_str()]);
            for reason in RECONCILE_ERROR_REASONS {
                errors.with_label_values(&[kind.as_str(), reason]);
            }
        }
        for result in ["ok", "error"] {
            passes.with_label_values(&[result]);
        }
        for what in API_WRITES {
            api_writes.with_label_values(&[what]);
        }
        let mut declared = Vec::new();
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(passes.clone()),
            Box::new(pass_duration.clone()),
            Box::new(api_writes.clone()),
            Box::new(condition.clone()),
            Box::new(leader.clone()),
        ] {
            for family in collector.collect() {
                let kind = match family.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => "counter",
                    prometheus::proto::MetricType::GAUGE => "gauge",
                    prometheus::proto::MetricType::HISTOGRAM => "histogram",
                    prometheus::proto::MetricType::SUMMARY => "summary",
                    prometheus::proto::MetricType::UNTYPED => "untyped",
                };
                declared.push((family.name().to_string(), family.help().to_string(), kind));
            }
            registry.register(collector).expect("metric names are unique");
        }
        Self { registry, reconciles, errors, duration, passes, pass_duration, api_writes, condition, leader, declared }
    }

    pub fn observe_reconcile(&self, kind: &str, elapsed: Duration, error: Option<&str>) {
        self.reconciles.with_label_values(&[kind]).inc();
        self.duration.with_label_values(&[kind]).observe(elapsed.as_secs_f64());
        if let Some(reason) = error {
            self.errors.with_label_values(&[kind, reason]).inc();
        }
    }

    pub fn observe_pass(&self, elapsed: Duration, ok: bool) {
        self.passes.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
        self.pass_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one write to the API server (`finalizer`, `status`, `event`).
    pub fn api_write(&self, what: &str) {
        self.api_writes.with_label_values(&[what]).inc();
    }

    /// Writes to the API server so far, all kinds together.
    pub fn api_writes_total(&self) -> u64 {
        API_WRITES.iter().map(|w| self.api_writes.with_label_values(&[w]).get()).sum()
    }

    /// Sets the condition gauges of one resource.
    pub fn set_conditions(&self, key: &ResourceKey, conditions: &[Condition]) {
        for condition in conditions {
            for status in [ConditionStatus::True, ConditionStatus::False, ConditionStatus::Unknown] {
                self.condition
                    .with_label_values(&[
                        key.kind.as_str(),
                        &key.namespace,
                        &key.name,
                        &condition.type_,
                        status.as_str(),
                    ])
                    .set(i64::from(condition.status == status));
            }
        }
    }

    /// Drops the gauges of a resource that is gone.
    pub fn forget(&self, key: &ResourceKey) {
        for condition in ["Ready", "Synced", "Registered", "Reachable"] {
            for status in ["True", "False", "Unknown"] {
                let _ = self.condition.remove_label_values(&[
                    key.kind.as_str(),
                    &key.namespace,
                    &key.name,
                    condition,
                    status,
                ]);
            }
        }
    }

    /// The registry in the Prometheus text format; a family with no series yet is declared
    /// by its `# HELP` and `# TYPE` lines alone (valid in the format, ignored by Prometheus).
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&families, &mut buffer).expect("text encoding");
        let mut text = String::from_utf8(buffer).expect("the text format is UTF-8");
        for (name, help, kind) in &self.declared {
            if !families.iter().any(|family| family.name() == name) {
                let help = help.replace('\\', "\\\\").replace('\n', "\\n");
                text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_fresh_operator_declares_every_family_and_starts_known_series_at_zero() {
        let metrics = Metrics::new();
        let text = metrics.render();
        for name in [
            "switchboard_operator_reconcile_total",
            "switchboard_operator_reconcile_errors_total",
            "switchboard_operator_reconcile_duration_seconds",
            "switchboard_operator_passes_total",
            "switchboard_operator_pass_duration_seconds",
            "switchboard_operator_api_writes_total",
            "switchboard_resource_condition",
            "switchboard_operator_leader",
        ] {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name} declared once in\n{text}");
        }
        assert!(text.contains("# TYPE switchboard_resource_condition gauge\n"), "{text}");
        assert_eq!(value(&text, r#"switchboard_operator_reconcile_total{kind="PhoneNumber"}"#), Some(0.0));
        assert_eq!(
            value(&text, r#"switchboard_operator_reconcile_errors_total{kind="Trunk",reason="DatabaseUnavailable"}"#),
            Some(0.0)
        );
        assert_eq!(value(&text, r#"switchboard_operator_passes_total{result="error"}"#), Some(0.0));

        // Once a resource has conditions, the family is rendered with its series, declared once.
        let key = ResourceKey { kind: Kind::Trunk, namespace: "telephony".into(), name: "main".into() };
        let ready = Condition {
            type_: "Ready".into(),
            status: ConditionStatus::False,
            reason: "InvalidSpec".into(),
            message: String::new(),
            last_transition_time: String::new(),
            observed_generation: None,
        };
        metrics.set_conditions(&key, &[ready]);
        metrics.observe_reconcile("Trunk", Duration::from_millis(3), Some("Conflict"));
        let text = metrics.render();
        assert_eq!(text.matches("# TYPE switchboard_resource_condition gauge").count(), 1, "{text}");
        let series = r#"switchboard_resource_condition{condition="Ready",kind="Trunk",name="main",namespace="telephony",status="False"}"#;
        assert_eq!(value(&text, series), Some(1.0), "{text}");
        assert_eq!(
            value(&text, r#"switchboard_operator_reconcile_errors_total{kind="Trunk",reason="Conflict"}"#),
            Some(1.0)
        );
    }
}
