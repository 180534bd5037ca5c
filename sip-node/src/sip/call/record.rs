//! The record of a call: how each attempt and the whole call ended, its CDRs (one per
//! attempt), the end of its active row and its metrics.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use switchboard_model::{Direction, TrunkConfig};

use super::Call;
use crate::metrics::CallStatus;
use crate::store::{CdrRecord, HangupBy, StoreEvent, billable_seconds, cdr_cost};

/// Timing and parties of one attempt, for its CDR.
pub(super) struct AttemptRecord {
    pub(super) number: u32,
    pub(super) trunk: Option<Arc<TrunkConfig>>,
    pub(super) gateway: Option<String>,
    pub(super) setup_at: DateTime<Utc>,
    pub(super) ring_at: Option<DateTime<Utc>>,
    pub(super) answer_at: Option<DateTime<Utc>>,
}

/// Which side ended a call.
#[derive(Clone, Copy)]
pub(super) enum Ender {
    Caller,
    Callee,
    System,
}

/// How the whole call ended, for the CDR of the last attempt and the metrics.
pub(super) struct Outcome {
    pub(super) code: u16,
    pub(super) reason: String,
    pub(super) hangup_by: Ender,
    pub(super) attempt: Option<AttemptRecord>,
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
        let trunk = record.trunk.as_ref().or(self.facts.inbound_trunk.as_ref());
        let outbound = record.trunk.is_some();
        let billable = billable_seconds(record.answer_at, end_at);
        let rate = match (trunk, outbound) {
            (Some(t), true) => t.rate_outbound_per_minute,
            (Some(t), false) => t.rate_inbound_per_minute,
            (None, _) => rust_decimal::Decimal::ZERO,
        };
        self.ctx.store.record(StoreEvent::Cdr(CdrRecord {
            call_uuid: self.facts.call_uuid,
            call_id: self.facts.call_id.clone(),
            attempt: record.number,
            namespace: trunk.map(|t| t.namespace.clone()),
            trunk_name: trunk.map(|t| t.name.clone()),
            provider: trunk.map(|t| t.provider.clone()),
            gateway: record.gateway.clone(),
            direction: if outbound { Direction::Outbound } else { Direction::Inbound },
            from_number: self.facts.from.clone(),
            to_number: self.facts.to.clone(),
            setup_at: record.setup_at,
            ring_at: record.ring_at,
            answer_at: record.answer_at,
            end_at,
            sip_code: Some(code),
            reason: Some(reason.to_string()),
            hangup_by: Some(match ender {
                Ender::Caller => HangupBy::Caller,
                Ender::Callee => HangupBy::Callee,
                Ender::System => HangupBy::System,
            }),
            billable_seconds: billable,
            cost: cdr_cost(rate, billable),
            currency: trunk.map(|t| t.currency.clone()).unwrap_or_else(|| "USD".into()),
        }));
    }

    pub(super) fn finish(&self, outcome: Outcome, setup_at: DateTime<Utc>) {
        let end_at = Utc::now();
        let record = outcome.attempt.unwrap_or(AttemptRecord {
            number: self.attempts.max(1),
            trunk: None,
            gateway: None,
            setup_at,
            ring_at: self.ring_at,
            answer_at: self.answer_at,
        });
        self.write_cdr(&record, end_at, outcome.code, &outcome.reason, outcome.hangup_by);
        self.ctx.store.record(StoreEvent::CallEnded { call_uuid: self.facts.call_uuid });
        let inbound = self.facts.inbound_trunk.as_ref();
        let provider = inbound.map(|t| t.provider.as_str()).unwrap_or("unknown");
        let trunk = inbound.map(|t| t.name.as_str()).unwrap_or("unknown");
        let talk_time = record.answer_at.map(|a| (end_at - a).to_std().unwrap_or_default());
        let status =
            if record.answer_at.is_some() { CallStatus::Answered } else { CallStatus::from_final_code(outcome.code) };
        self.ctx.metrics.call_ended(provider, trunk, status, talk_time);
        tracing::info!(code = outcome.code, reason = %outcome.reason, attempts = self.attempts, "call ended");
    }
}
