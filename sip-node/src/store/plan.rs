//! Folding a batch of events into the writes that have the same effect.
//!
//! Applying the events one by one, in order, and applying the plan give the same rows: each
//! call and each trunk gets exactly one net operation, so the statements of a batch can run
//! grouped by kind (one multi-row statement each) without an end overtaking its start.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{ActiveCall, CallState, CdrRecord, ReachabilityUpdate, RegistrationUpdate, StoreEvent};

/// The net effect of a batch on one call's `active_calls` row.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum CallOp {
    /// Insert or replace the row with this content.
    Upsert(ActiveCall),
    /// Mark the (earlier written) row answered; a no-op when there is no row.
    Answer(DateTime<Utc>),
    /// Remove the row.
    Delete,
}

/// The net effect of a batch (and of earlier batches still waiting for the node's row) on the
/// node's `registrations` row for one trunk: remove it first if `remove`, then upsert the
/// registration and reachability columns that are given.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TrunkOp {
    /// Sequence number of the oldest event folded in and not written yet.
    pub(super) first_seq: u64,
    pub(super) remove: bool,
    pub(super) registration: Option<RegistrationUpdate>,
    pub(super) reachability: Option<ReachabilityUpdate>,
}

/// `(namespace, trunk_name)`.
pub(super) type TrunkKey = (String, String);

/// What one transaction writes.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Plan {
    /// Delete every `active_calls` row of the node before the per-call operations.
    pub(super) clear_calls: bool,
    pub(super) calls: BTreeMap<Uuid, CallOp>,
    pub(super) cdrs: Vec<CdrRecord>,
    pub(super) trunks: BTreeMap<TrunkKey, TrunkOp>,
}

impl Plan {
    /// A plan that starts from the trunk operations still waiting from earlier batches.
    pub(super) fn with_trunks(trunks: BTreeMap<TrunkKey, TrunkOp>) -> Self {
        Self { trunks, ..Self::default() }
    }

    /// Folds `event` (sequence number `seq`) into the plan, after everything folded so far.
    pub(super) fn fold(&mut self, seq: u64, event: StoreEvent) {
        match event {
            StoreEvent::CallStarted(mut call) => {
                scrub_call(&mut call);
                self.calls.insert(call.call_uuid, CallOp::Upsert(call));
            }
            StoreEvent::CallAnswered { call_uuid, at } => match self.calls.get_mut(&call_uuid) {
                Some(CallOp::Upsert(call)) => {
                    call.answered_at = Some(at);
                    call.state = CallState::Answered;
                }
                Some(CallOp::Answer(previous)) => *previous = at,
                // An answer after the end changes nothing: the row is gone.
                Some(CallOp::Delete) => {}
                None => {
                    self.calls.insert(call_uuid, CallOp::Answer(at));
                }
            },
            StoreEvent::CallEnded { call_uuid } => {
                self.calls.insert(call_uuid, CallOp::Delete);
            }
            StoreEvent::ClearActiveCalls => {
                self.clear_calls = true;
                self.calls.clear();
            }
            StoreEvent::Cdr(mut cdr) => {
                scrub_cdr(&mut cdr);
                self.cdrs.push(cdr);
            }
            StoreEvent::Registration(mut update) => {
                scrub(&mut update.namespace);
                scrub(&mut update.trunk_name);
                scrub_opt(&mut update.registrar);
                scrub_opt(&mut update.last_error);
                let key = (update.namespace.clone(), update.trunk_name.clone());
                self.trunk(seq, key).registration = Some(update);
            }
            StoreEvent::Reachability(mut update) => {
                scrub(&mut update.namespace);
                scrub(&mut update.trunk_name);
                let key = (update.namespace.clone(), update.trunk_name.clone());
                self.trunk(seq, key).reachability = Some(update);
            }
            StoreEvent::TrunkRemoved { namespace, trunk_name } => {
                let op = self.trunk(seq, (scrubbed(namespace), scrubbed(trunk_name)));
                op.remove = true;
                op.registration = None;
                op.reachability = None;
            }
        }
    }

    fn trunk(&mut self, seq: u64, key: TrunkKey) -> &mut TrunkOp {
        self.trunks.entry(key).or_insert(TrunkOp {
            first_seq: seq,
            remove: false,
            registration: None,
            reachability: None,
        })
    }

    /// Number of operations (each call, CDR, trunk, and the clearing count one).
    pub(super) fn len(&self) -> usize {
        usize::from(self.clear_calls) + self.calls.len() + self.cdrs.len() + self.trunks.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the plan writes registration columns (which need the node's row).
    pub(super) fn upserts_trunks(&self) -> bool {
        self.trunks.values().any(|op| op.registration.is_some() || op.reachability.is_some())
    }

    /// One plan per operation, in an order that keeps the effect: the clearing first.
    pub(super) fn split(self) -> Vec<Plan> {
        let mut plans = Vec::with_capacity(self.len());
        if self.clear_calls {
            plans.push(Plan { clear_calls: true, ..Plan::default() });
        }
        for (call_uuid, op) in self.calls {
            plans.push(Plan { calls: BTreeMap::from([(call_uuid, op)]), ..Plan::default() });
        }
        for cdr in self.cdrs {
            plans.push(Plan { cdrs: vec![cdr], ..Plan::default() });
        }
        for (key, op) in self.trunks {
            plans.push(Plan { trunks: BTreeMap::from([(key, op)]), ..Plan::default() });
        }
        plans
    }

    /// The trunk operations left to do once the removals are done but the node's row was
    /// missing for the upserts.
    pub(super) fn into_waiting_trunks(self) -> BTreeMap<TrunkKey, TrunkOp> {
        self.trunks
            .into_iter()
            .filter(|(_, op)| op.registration.is_some() || op.reachability.is_some())
            .map(|(key, op)| (key, TrunkOp { remove: false, ..op }))
            .collect()
    }

    /// A short description of the plan's operations, for logs.
    pub(super) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.clear_calls {
            parts.push("clearing the node's active calls".to_owned());
        }
        for (call_uuid, op) in &self.calls {
            let what = match op {
                CallOp::Upsert(_) => "start",
                CallOp::Answer(_) => "answer",
                CallOp::Delete => "end",
            };
            parts.push(format!("{what} of call {call_uuid}"));
        }
        for cdr in &self.cdrs {
            parts.push(format!("CDR of call {} ({}) attempt {}", cdr.call_uuid, cdr.call_id, cdr.attempt));
        }
        for (namespace, trunk) in self.trunks.keys() {
            parts.push(format!("registration of trunk {namespace}/{trunk}"));
        }
        parts.join(", ")
    }
}

/// Postgres refuses NUL characters in text; they can only come from hostile SIP input.
fn scrub(text: &mut String) {
    if text.contains('\0') {
        *text = text.replace('\0', "\u{fffd}");
    }
}

fn scrubbed(mut text: String) -> String {
    scrub(&mut text);
    text
}

fn scrub_opt(text: &mut Option<String>) {
    if let Some(text) = text {
        scrub(text);
    }
}

fn scrub_call(call: &mut ActiveCall) {
    scrub(&mut call.call_id);
    scrub_opt(&mut call.namespace);
    scrub_opt(&mut call.trunk_name);
    scrub_opt(&mut call.provider);
    scrub(&mut call.from_number);
    scrub(&mut call.to_number);
}

fn scrub_cdr(cdr: &mut CdrRecord) {
    scrub(&mut cdr.call_id);
    scrub_opt(&mut cdr.namespace);
    scrub_opt(&mut cdr.trunk_name);
    scrub_opt(&mut cdr.provider);
    scrub_opt(&mut cdr.gateway);
    scrub(&mut cdr.from_number);
    scrub(&mut cdr.to_number);
    scrub_opt(&mut cdr.reason);
    scrub(&mut cdr.currency);
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{Direction, RegistrationState};
    use super::*;

    /// A stable call id for a test call's name.
    pub(in crate::store) fn key(name: &str) -> Uuid {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut hasher);
        Uuid::from_u64_pair(hasher.finish(), name.len() as u64)
    }

    pub(in crate::store) fn call(call_id: &str) -> ActiveCall {
        ActiveCall {
            call_uuid: key(call_id),
            call_id: call_id.into(),
            namespace: Some("default".into()),
            trunk_name: Some("carrier".into()),
            provider: Some("acme".into()),
            direction: Direction::Inbound,
            from_number: "+15550001".into(),
            to_number: "+15550002".into(),
            state: CallState::Setup,
            started_at: Utc::now(),
            answered_at: None,
        }
    }

    pub(in crate::store) fn registration(trunk: &str, state: RegistrationState) -> RegistrationUpdate {
        RegistrationUpdate {
            namespace: "default".into(),
            trunk_name: trunk.into(),
            state,
            registrar: Some("sip.example.net:5060".into()),
            expires_at: None,
            last_error: None,
            last_attempt_at: Some(Utc::now()),
        }
    }

    pub(in crate::store) fn reachability(trunk: &str, reachable: bool) -> ReachabilityUpdate {
        ReachabilityUpdate {
            namespace: "default".into(),
            trunk_name: trunk.into(),
            reachable,
            checked_at: Utc::now(),
            rtt_ms: reachable.then_some(12),
            unreachable_reason: None,
        }
    }

    fn plan(events: Vec<StoreEvent>) -> Plan {
        let mut plan = Plan::default();
        for (seq, event) in (1..).zip(events) {
            plan.fold(seq, event);
        }
        plan
    }

    #[test]
    fn a_call_folds_to_its_net_effect() {
        let at = Utc::now();
        let started =
            plan(vec![StoreEvent::CallStarted(call("a")), StoreEvent::CallAnswered { call_uuid: key("a"), at }]);
        let Some(CallOp::Upsert(row)) = started.calls.get(&key("a")) else { panic!("{started:?}") };
        assert_eq!((row.state, row.answered_at), (CallState::Answered, Some(at)));

        let ended = plan(vec![
            StoreEvent::CallStarted(call("a")),
            StoreEvent::CallAnswered { call_uuid: key("a"), at },
            StoreEvent::CallEnded { call_uuid: key("a") },
            StoreEvent::CallAnswered { call_uuid: key("a"), at },
        ]);
        assert_eq!(ended.calls.get(&key("a")), Some(&CallOp::Delete));
        assert_eq!(ended.len(), 1);

        let answered = plan(vec![StoreEvent::CallAnswered { call_uuid: key("b"), at }]);
        assert_eq!(answered.calls.get(&key("b")), Some(&CallOp::Answer(at)));

        // A new start after an end (a reused Call-ID) wins.
        let restarted = plan(vec![StoreEvent::CallEnded { call_uuid: key("a") }, StoreEvent::CallStarted(call("a"))]);
        assert!(matches!(restarted.calls.get(&key("a")), Some(CallOp::Upsert(_))));
    }

    #[test]
    fn clearing_supersedes_earlier_calls_only() {
        let cleared = plan(vec![
            StoreEvent::CallStarted(call("old")),
            StoreEvent::ClearActiveCalls,
            StoreEvent::CallStarted(call("new")),
        ]);
        assert!(cleared.clear_calls);
        assert_eq!(cleared.calls.keys().collect::<Vec<_>>(), [&key("new")]);
        let split = cleared.split();
        assert!(split[0].clear_calls && split[0].calls.is_empty());
        assert_eq!(split.len(), 2);
    }

    #[test]
    fn trunk_updates_coalesce_last_wins_and_removal_resets() {
        let folded = plan(vec![
            StoreEvent::Registration(registration("t", RegistrationState::Registering)),
            StoreEvent::Reachability(reachability("t", false)),
            StoreEvent::Registration(registration("t", RegistrationState::Registered)),
            StoreEvent::Reachability(reachability("t", true)),
        ]);
        let op = &folded.trunks[&("default".to_owned(), "t".to_owned())];
        assert_eq!(op.first_seq, 1);
        assert_eq!(op.registration.as_ref().map(|r| r.state), Some(RegistrationState::Registered));
        assert_eq!(op.reachability.as_ref().map(|r| r.reachable), Some(true));
        assert!(!op.remove);

        let removed = plan(vec![
            StoreEvent::Registration(registration("t", RegistrationState::Registered)),
            StoreEvent::TrunkRemoved { namespace: "default".into(), trunk_name: "t".into() },
            StoreEvent::Reachability(reachability("t", true)),
        ]);
        let op = &removed.trunks[&("default".to_owned(), "t".to_owned())];
        assert!(op.remove && op.registration.is_none() && op.reachability.is_some());
        let waiting = removed.into_waiting_trunks();
        assert!(waiting.values().all(|op| !op.remove && op.reachability.is_some()));

        let only_removed = plan(vec![StoreEvent::TrunkRemoved { namespace: "n".into(), trunk_name: "t".into() }]);
        assert!(!only_removed.upserts_trunks());
        assert!(only_removed.into_waiting_trunks().is_empty());
    }

    #[test]
    fn nul_characters_are_replaced() {
        let mut hostile = call("x\0y");
        hostile.from_number = "\0+1".into();
        let folded = plan(vec![StoreEvent::CallStarted(hostile)]);
        let Some(CallOp::Upsert(row)) = folded.calls.get(&key("x\0y")) else { panic!("{folded:?}") };
        assert_eq!((row.call_id.as_str(), row.from_number.as_str()), ("x\u{fffd}y", "\u{fffd}+1"));
    }
}
