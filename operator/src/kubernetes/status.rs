//! The status the operator writes on each object: `Ready` from the reconcile pass, `Synced` from
//! the nodes' applied generations, and for trunks `Registered` and `Reachable` from the nodes'
//! registration and OPTIONS results, with call counts.
//!
//! A status is computed from the previous one (unchanged conditions keep their
//! `lastTransitionTime`), so computing it twice from the same facts gives the same value, and the
//! operator writes only when that value differs from what the object has.

use chrono::{SecondsFormat, Utc};
use serde::Serialize;

use super::nodes::{NodeFacts, TrunkFacts};
use crate::crd::{Condition, ConditionStatus, NodeCounts, TrunkSpec};
use crate::reconcile::ResourceStatus;

/// Condition types.
pub const READY: &str = "Ready";
pub(crate) const SYNCED: &str = "Synced";
pub const REGISTERED: &str = "Registered";
pub(crate) const REACHABLE: &str = "Reachable";
/// kstatus' condition for a resource that cannot progress without a change by its author.
pub(crate) const STALLED: &str = "Stalled";

/// Reasons this module adds to the reconcile core's.
pub mod reason {
    pub const DATABASE_UNAVAILABLE: &str = "DatabaseUnavailable";
    pub const APPLIED: &str = "Applied";
    pub const PENDING: &str = "Pending";
    pub const NO_LIVE_NODES: &str = "NoLiveNodes";
    pub const NOT_STORED: &str = "NotStored";
    pub const NODE_STATUS_UNKNOWN: &str = "NodeStatusUnknown";
    pub const REGISTERED: &str = "Registered";
    pub const REGISTRATION_DISABLED: &str = "RegistrationDisabled";
    pub const REGISTRATION_FAILED: &str = "RegistrationFailed";
    pub const REGISTERING: &str = "Registering";
    pub const REACHABLE: &str = "Reachable";
    pub const UNREACHABLE: &str = "Unreachable";
    pub const NOT_PROBED: &str = "NotProbed";
    pub const OPTIONS_DISABLED: &str = "OptionsDisabled";
}

/// The union of the three kinds' status shapes is the Trunk's (the others leave its trunk
/// fields empty), so one piece of code compares and writes all of them.
pub(crate) type StatusDoc = crate::crd::TrunkStatus;

impl StatusDoc {
    /// The status of a serialised object (`.status`), empty when it has none or it does not parse.
    pub fn of<K: Serialize>(object: &K) -> Self {
        serde_json::to_value(object)
            .ok()
            .and_then(|mut v| v.get_mut("status").map(serde_json::Value::take))
            .filter(|s| !s.is_null())
            .and_then(|s| serde_json::from_value(s).ok())
            .unwrap_or_default()
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// What the status is computed from.
pub struct Inputs<'a> {
    /// `metadata.generation` of the object.
    pub generation: Option<i64>,
    /// The object's status from the last pass; `None` with `database_error` set when the pass failed.
    pub reconciled: Option<&'a ResourceStatus>,
    pub database_error: Option<&'a str>,
    /// Node facts; `None` until they could be read once.
    pub facts: Option<&'a NodeFacts>,
    /// The trunk's spec, for trunks.
    pub trunk: Option<(&'a str, &'a str, &'a TrunkSpec)>,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

struct Builder<'a> {
    previous: &'a StatusDoc,
    generation: Option<i64>,
    conditions: Vec<Condition>,
}

impl Builder<'_> {
    fn set(&mut self, type_: &str, status: ConditionStatus, reason: &str, message: String) {
        let last_transition_time = self
            .previous
            .condition(type_)
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(now);
        self.conditions.push(Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            last_transition_time,
            observed_generation: self.generation,
        });
    }

    fn keep(&mut self, type_: &str) {
        if let Some(previous) = self.previous.condition(type_) {
            self.conditions.push(previous.clone());
        }
    }
}

/// The `Reachable=False` message: the nodes' own reason when they have one (over TLS, why the
/// handshake was refused), else what to check.
fn unreachable_message(trunk: &TrunkFacts) -> String {
    match &trunk.unreachable_reason {
        Some(reason) => format!(
            "no answer to OPTIONS from {} node(s): {reason}; check spec.gateways and the trunk's TLS trust",
            trunk.unreachable
        ),
        None => format!(
            "no answer to OPTIONS from {} node(s); check spec.gateways and that the provider allows the nodes' addresses",
            trunk.unreachable
        ),
    }
}

/// Computes the status an object should have.
pub fn desired(previous: &StatusDoc, inputs: &Inputs<'_>) -> StatusDoc {
    let mut b = Builder { previous, generation: inputs.generation, conditions: Vec::new() };
    let mut doc = StatusDoc { observed_generation: inputs.generation, ..StatusDoc::default() };

    if let Some(error) = inputs.database_error {
        b.set(
            READY,
            ConditionStatus::False,
            reason::DATABASE_UNAVAILABLE,
            format!(
                "the operator cannot write to Postgres ({error}); the last stored configuration stays in force and the change is retried; check the database and the operator's DATABASE_URL"
            ),
        );
        // What the nodes do is unknown while the database is away: the rest stays as it was.
        for type_ in [SYNCED, REGISTERED, REACHABLE] {
            b.keep(type_);
        }
        doc.conditions = b.conditions;
        doc.nodes = previous.nodes.clone();
        doc.registered_nodes = previous.registered_nodes;
        doc.active_calls = previous.active_calls;
        doc.calls_last_hour = previous.calls_last_hour;
        return doc;
    }

    let Some(reconciled) = inputs.reconciled else { return previous.clone() };
    let ready = if reconciled.ready { ConditionStatus::True } else { ConditionStatus::False };
    b.set(READY, ready, &reconciled.reason, reconciled.message.clone());
    // Flux's health checks (kstatus) call a resource `Failed` only through the abnormal-true
    // condition `Stalled`: without it, a spec the operator refuses stays `InProgress` there, and
    // Flux waits out its whole timeout for a change that cannot come.
    if !reconciled.ready && reconciled.reason == crate::reconcile::status::reason::INVALID_SPEC {
        b.set(STALLED, ConditionStatus::True, &reconciled.reason, reconciled.message.clone());
    }

    match (inputs.facts, reconciled.config_generation) {
        (None, _) => b.set(
            SYNCED,
            ConditionStatus::Unknown,
            reason::NODE_STATUS_UNKNOWN,
            "the SIP nodes' heartbeats have not been read yet".into(),
        ),
        (Some(_), None) => b.set(
            SYNCED,
            ConditionStatus::False,
            reason::NOT_STORED,
            "no configuration of this resource is stored yet, so no node can apply it (see Ready)".into(),
        ),
        (Some(facts), Some(generation)) => {
            let (applied, total) = facts.applied(generation);
            doc.nodes = Some(NodeCounts { applied, total });
            if total == 0 {
                b.set(
                    SYNCED,
                    ConditionStatus::Unknown,
                    reason::NO_LIVE_NODES,
                    format!(
                        "config generation {generation} is stored, but no SIP node is live to apply it; start a node"
                    ),
                );
            } else if applied == total {
                b.set(
                    SYNCED,
                    ConditionStatus::True,
                    reason::APPLIED,
                    format!("config generation {generation} applied by {applied} of {total} live nodes"),
                );
            } else {
                b.set(
                    SYNCED,
                    ConditionStatus::False,
                    reason::PENDING,
                    format!(
                        "config generation {generation} applied by {applied} of {total} live nodes; the others have not picked it up yet (see their logs if this lasts)"
                    ),
                );
            }
        }
    }

    if let Some((namespace, name, spec)) = inputs.trunk {
        trunk_conditions(&mut b, &mut doc, inputs.facts, namespace, name, spec);
    }
    doc.conditions = b.conditions;
    doc
}

fn trunk_conditions(
    b: &mut Builder<'_>,
    doc: &mut StatusDoc,
    facts: Option<&NodeFacts>,
    namespace: &str,
    name: &str,
    spec: &TrunkSpec,
) {
    let Some(facts) = facts else {
        for type_ in [REGISTERED, REACHABLE] {
            b.set(
                type_,
                ConditionStatus::Unknown,
                reason::NODE_STATUS_UNKNOWN,
                "the SIP nodes' reports have not been read yet".into(),
            );
        }
        return;
    };
    let (_, live) = facts.applied(0);
    let trunk = facts.trunk(namespace, name);
    doc.active_calls = Some(trunk.active_calls);
    doc.calls_last_hour = Some(trunk.calls_last_hour);

    let registers = spec.registration.as_ref().is_some_and(|r| r.enabled);
    if !registers {
        b.set(
            REGISTERED,
            ConditionStatus::True,
            reason::REGISTRATION_DISABLED,
            "the trunk does not register (spec.registration.enabled is false); the provider sends calls to the nodes' addresses".into(),
        );
    } else {
        doc.registered_nodes = Some(trunk.registered);
        if live == 0 {
            b.set(
                REGISTERED,
                ConditionStatus::Unknown,
                reason::NO_LIVE_NODES,
                "no SIP node is live to register".into(),
            );
        } else if trunk.registered == live {
            b.set(
                REGISTERED,
                ConditionStatus::True,
                reason::REGISTERED,
                format!("registered with the provider on {live} of {live} live nodes"),
            );
        } else if trunk.failed > 0 {
            let error = trunk.last_error.as_deref().unwrap_or("no reason recorded");
            b.set(
                REGISTERED,
                ConditionStatus::False,
                reason::REGISTRATION_FAILED,
                format!(
                    "registered on {} of {live} live nodes; last failure: {error}; check spec.credentials, the password Secret and the registrar address",
                    trunk.registered
                ),
            );
        } else {
            b.set(
                REGISTERED,
                ConditionStatus::False,
                reason::REGISTERING,
                format!("registered on {} of {live} live nodes; registration in progress", trunk.registered),
            );
        }
    }

    if spec.options_interval_seconds == 0 {
        b.set(
            REACHABLE,
            ConditionStatus::Unknown,
            reason::OPTIONS_DISABLED,
            "OPTIONS keepalives are off (spec.optionsIntervalSeconds is 0)".into(),
        );
    } else if trunk.reachable > 0 {
        b.set(
            REACHABLE,
            ConditionStatus::True,
            reason::REACHABLE,
            format!("the provider answered OPTIONS from {} of {live} live nodes", trunk.reachable),
        );
    } else if trunk.unreachable > 0 {
        b.set(REACHABLE, ConditionStatus::False, reason::UNREACHABLE, unreachable_message(&trunk));
    } else {
        b.set(
            REACHABLE,
            ConditionStatus::Unknown,
            reason::NOT_PROBED,
            "no node has reported an OPTIONS result yet".into(),
        );
    }
}

/// The conditions whose status or reason changed from `previous` to `next` (each gets an event).
/// `Stalled` gets none: it repeats the `Ready` condition, whose event already says it.
pub(crate) fn changed_conditions<'a>(previous: &StatusDoc, next: &'a StatusDoc) -> Vec<&'a Condition> {
    next.conditions
        .iter()
        .filter(|c| c.type_ != STALLED)
        .filter(|c| previous.condition(&c.type_).is_none_or(|p| p.status != c.status || p.reason != c.reason))
        .collect()
}

/// The merge patch that turns `previous` into `next` on the status subresource: top-level fields
/// that disappear are set to null, and the resourceVersion makes a concurrent change a 409.
pub(crate) fn merge_patch(resource_version: Option<&str>, previous: &StatusDoc, next: &StatusDoc) -> serde_json::Value {
    let mut status = serde_json::to_value(next).expect("a status serialises");
    let old = serde_json::to_value(previous).expect("a status serialises");
    if let (Some(status), Some(old)) = (status.as_object_mut(), old.as_object()) {
        for key in old.keys() {
            if !status.contains_key(key) {
                status.insert(key.clone(), serde_json::Value::Null);
            }
        }
    }
    let mut patch = serde_json::json!({ "status": status });
    if let Some(rv) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Kind, ResourceKey};

    fn reconciled(ready: bool, reason: &str) -> ResourceStatus {
        ResourceStatus {
            key: ResourceKey { kind: Kind::PhoneNumber, namespace: "ns".into(), name: "n".into() },
            observed_generation: Some(2),
            ready,
            reason: reason.into(),
            message: "spec.number: not E.164".into(),
            origin: String::new(),
            config_generation: None,
        }
    }

    fn stalled(reconciled: &ResourceStatus) -> Option<Condition> {
        let inputs = Inputs {
            generation: Some(2),
            reconciled: Some(reconciled),
            database_error: None,
            facts: None,
            trunk: None,
        };
        desired(&StatusDoc::default(), &inputs).condition(STALLED).cloned()
    }

    /// An untrusted provider certificate reaches the trunk's condition in the node's words.
    #[test]
    fn the_nodes_reason_for_unreachable_is_in_the_message() {
        let tls = TrunkFacts {
            unreachable: 2,
            unreachable_reason: Some("the gateway did not answer: the server's certificate is not trusted".into()),
            ..TrunkFacts::default()
        };
        let message = unreachable_message(&tls);
        assert!(
            message.contains("from 2 node(s): the gateway did not answer: the server's certificate is not trusted")
        );
        let silent = TrunkFacts { unreachable: 1, ..TrunkFacts::default() };
        assert!(unreachable_message(&silent).contains("allows the nodes' addresses"));
    }

    #[test]
    fn an_invalid_spec_is_stalled_for_kstatus() {
        let condition = stalled(&reconciled(false, "InvalidSpec")).expect("Stalled for InvalidSpec");
        assert_eq!((condition.status, condition.reason.as_str()), (ConditionStatus::True, "InvalidSpec"));
        assert_eq!(condition.message, "spec.number: not E.164");
        assert_eq!(stalled(&reconciled(true, "Reconciled")), None);
        // A missing reference may resolve by itself (the trunk gets created): not stalled.
        assert_eq!(stalled(&reconciled(false, "TrunkNotFound")), None);
    }
}
