//! The record of a call: how each attempt and the whole call ended, its CDRs (one per
//! attempt), the end of its active row and its metrics.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use switchboard_model::{Direction, TrunkConfig};

use super::{Call, CallFacts};
use crate::metrics::CallStatus;
use crate::store::{CdrRecord, HangupBy, Store, StoreEvent, billable_seconds, cdr_cost};

/// Timing and parties of one attempt, for its CDR.
pub(super) struct AttemptRecord {
    pub(super) number: u32,
    pub(super) trunk: Option<Arc<TrunkConfig>>,
    pub(super) gateway: Option<String>,
    pub(super) setup_at: DateTime<Utc>,
    pub(super) ring_at: Option<DateTime<Utc>>,
    pub(super) answer_at: Option<DateTime<Utc>>,
}

pub(super) use crate::sip::connected::Ender;

/// How the whole call ended, for the CDR of the last attempt and the metrics.
pub(super) struct Outcome {
    pub(super) code: u16,
    pub(super) reason: String,
    pub(super) hangup_by: Ender,
    pub(super) attempt: Option<AttemptRecord>,
}

/// How one attempt ended, for its CDR.
pub(super) struct AttemptEnding<'a> {
    pub(super) end_at: DateTime<Utc>,
    pub(super) code: u16,
    pub(super) reason: &'a str,
    pub(super) ender: Ender,
}

impl CallFacts {
    /// Records the CDR of one attempt: the outbound trunk's (else the inbound trunk's) rate,
    /// billable seconds from the answer.
    pub(super) fn write_cdr(&self, store: &Store, record: &AttemptRecord, ending: AttemptEnding<'_>) {
        let trunk = record.trunk.as_ref().or(self.inbound_trunk.as_ref());
        let outbound = record.trunk.is_some();
        let billable = billable_seconds(record.answer_at, ending.end_at);
        let rate = match (trunk, outbound) {
            (Some(t), true) => t.rate_outbound_per_minute,
            (Some(t), false) => t.rate_inbound_per_minute,
            (None, _) => rust_decimal::Decimal::ZERO,
        };
        store.record(StoreEvent::Cdr(CdrRecord {
            call_uuid: self.call_uuid,
            call_id: self.call_id.clone(),
            attempt: record.number,
            namespace: trunk.map(|t| t.namespace.clone()),
            trunk_name: trunk.map(|t| t.name.clone()),
            provider: trunk.map(|t| t.provider.clone()),
            gateway: record.gateway.clone(),
            direction: if outbound { Direction::Outbound } else { Direction::Inbound },
            from_number: self.from.clone(),
            to_number: self.to.clone(),
            setup_at: record.setup_at,
            ring_at: record.ring_at,
            answer_at: record.answer_at,
            end_at: ending.end_at,
            sip_code: Some(ending.code),
            reason: Some(ending.reason.to_string()),
            hangup_by: Some(HangupBy::from(ending.ender)),
            billable_seconds: billable,
            cost: cdr_cost(rate, billable),
            currency: trunk.map(|t| t.currency.clone()).unwrap_or_else(|| "USD".into()),
        }));
    }

    /// Records the end of the call: the CDR of its last attempt (`fallback` when the outcome
    /// names none: the call ended before or between attempts) and the end of its active row.
    /// Returns the attempt the CDR was written for.
    pub(super) fn write_end(
        &self,
        store: &Store,
        outcome: Outcome,
        fallback: AttemptRecord,
        end_at: DateTime<Utc>,
    ) -> AttemptRecord {
        let record = outcome.attempt.unwrap_or(fallback);
        let ending = AttemptEnding { end_at, code: outcome.code, reason: &outcome.reason, ender: outcome.hangup_by };
        self.write_cdr(store, &record, ending);
        store.record(StoreEvent::CallEnded { call_uuid: self.call_uuid });
        record
    }
}

impl Call {
    pub(super) fn write_cdr(
        &self,
        record: &AttemptRecord,
        end_at: DateTime<Utc>,
        code: u16,
        reason: &str,
        ender: Ender,
    ) {
        self.facts.write_cdr(&self.ctx.store, record, AttemptEnding { end_at, code, reason, ender });
    }

    pub(super) fn finish(&self, outcome: Outcome, setup_at: DateTime<Utc>) {
        let end_at = Utc::now();
        let fallback = AttemptRecord {
            number: self.attempts.max(1),
            trunk: None,
            gateway: None,
            setup_at,
            ring_at: self.ring_at,
            answer_at: self.answer_at,
        };
        let (code, reason) = (outcome.code, outcome.reason.clone());
        let record = self.facts.write_end(&self.ctx.store, outcome, fallback, end_at);
        if self.early_dialog {
            // Registered for the caller's PRACKs before the answer (a no-op if the connected
            // phase already unregistered it).
            self.ctx.endpoint.unregister_dialog(&self.facts.call_id, &self.a_tag);
        }
        let inbound = self.facts.inbound_trunk.as_ref();
        let provider = inbound.map(|t| t.provider.as_str()).unwrap_or("unknown");
        let trunk = inbound.map(|t| t.name.as_str()).unwrap_or("unknown");
        let talk_time = record.answer_at.map(|a| (end_at - a).to_std().unwrap_or_default());
        let status = if record.answer_at.is_some() { CallStatus::Answered } else { CallStatus::from_final_code(code) };
        self.ctx.metrics.call_ended(provider, trunk, status, talk_time);
        tracing::debug!(code, %reason, attempts = self.attempts, "call ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::routing::tests::trunk;

    fn facts() -> CallFacts {
        CallFacts {
            call_uuid: uuid::Uuid::new_v4(),
            call_id: "caller-call-id".into(),
            from: "+15550001111".into(),
            to: "+15550002222".into(),
            inbound_trunk: Some(Arc::new(trunk("inbound"))),
        }
    }

    fn cdr(event: Option<StoreEvent>) -> CdrRecord {
        match event {
            Some(StoreEvent::Cdr(cdr)) => cdr,
            other => panic!("expected a CDR, got {other:?}"),
        }
    }

    /// A call that failed over once and was answered on its second attempt records two CDRs
    /// (the first outbound attempt's at once, the second's at the end) and ends its active row,
    /// without Postgres: the store records into a channel.
    #[test]
    fn a_failed_over_then_answered_call_records_a_cdr_per_attempt_and_its_end() {
        let (store, mut events) = Store::recording();
        let facts = facts();
        let setup_at = Utc::now() - chrono::Duration::seconds(100);
        let outbound = Arc::new(trunk("outbound"));
        let first = AttemptRecord {
            number: 1,
            trunk: Some(Arc::clone(&outbound)),
            gateway: Some("gw1.example.net:5060".into()),
            setup_at,
            ring_at: None,
            answer_at: None,
        };
        let ending = AttemptEnding { end_at: setup_at, code: 503, reason: "gateway down", ender: Ender::System };
        facts.write_cdr(&store, &first, ending);
        let failed = cdr(events.try_recv().ok());
        assert_eq!((failed.attempt, failed.sip_code, failed.reason.as_deref()), (1, Some(503), Some("gateway down")));
        assert_eq!((failed.direction, failed.hangup_by), (Direction::Outbound, Some(HangupBy::System)));
        assert_eq!((failed.billable_seconds, failed.trunk_name.as_deref()), (0, Some("outbound")));

        let answer_at = setup_at + chrono::Duration::seconds(10);
        let second = AttemptRecord { number: 2, answer_at: Some(answer_at), ring_at: Some(setup_at), ..first };
        let outcome =
            Outcome { code: 200, reason: "callee hung up".into(), hangup_by: Ender::Callee, attempt: Some(second) };
        let fallback =
            AttemptRecord { number: 9, trunk: None, gateway: None, setup_at, ring_at: None, answer_at: None };
        let end_at = answer_at + chrono::Duration::seconds(61);
        let written = facts.write_end(&store, outcome, fallback, end_at);
        assert_eq!(written.number, 2, "the outcome's attempt, not the fallback");
        let last = cdr(events.try_recv().ok());
        assert_eq!((last.attempt, last.hangup_by, last.billable_seconds), (2, Some(HangupBy::Callee), 61));
        assert_eq!(last.cost, cdr_cost(outbound.rate_outbound_per_minute, 61), "billed at the outbound rate");
        assert_eq!((last.call_uuid, last.call_id.as_str()), (facts.call_uuid, "caller-call-id"));
        assert!(matches!(events.try_recv(), Ok(StoreEvent::CallEnded { call_uuid }) if call_uuid == facts.call_uuid));
        assert!(events.try_recv().is_err(), "nothing else recorded");
    }

    /// A call refused before any attempt: the CDR is the inbound trunk's, at its inbound rate.
    #[test]
    fn a_call_without_an_attempt_gets_an_inbound_cdr() {
        let (store, mut events) = Store::recording();
        let facts = facts();
        let setup_at = Utc::now();
        let fallback =
            AttemptRecord { number: 1, trunk: None, gateway: None, setup_at, ring_at: None, answer_at: None };
        let outcome = Outcome { code: 487, reason: "caller cancelled".into(), hangup_by: Ender::Caller, attempt: None };
        facts.write_end(&store, outcome, fallback, setup_at);
        let record = cdr(events.try_recv().ok());
        assert_eq!((record.direction, record.trunk_name.as_deref()), (Direction::Inbound, Some("inbound")));
        assert_eq!((record.sip_code, record.hangup_by), (Some(487), Some(HangupBy::Caller)));
        assert!(matches!(events.try_recv(), Ok(StoreEvent::CallEnded { .. })));
    }
}
