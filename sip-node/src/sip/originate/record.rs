//! How an API call's attempt ended, and its CDR.

use std::sync::Arc;

use chrono::Utc;
use switchboard_model::{Direction, TrunkConfig};
use uuid::Uuid;

use super::CallRequest;
use crate::sip::context::NodeContext;
use crate::store::{CdrRecord, HangupBy, StoreEvent, billable_seconds, cdr_cost};

/// How the outbound call ended.
pub(super) struct Ended {
    pub(super) code: u16,
    pub(super) reason: String,
    pub(super) trunk: Option<Arc<TrunkConfig>>,
    pub(super) gateway: Option<String>,
    pub(super) answer_at: Option<chrono::DateTime<Utc>>,
    pub(super) ring_at: Option<chrono::DateTime<Utc>>,
    pub(super) hangup_by: HangupBy,
    pub(super) attempt: u32,
    /// When the attempt's INVITE went out (`None`: no attempt was made).
    pub(super) setup_at: Option<chrono::DateTime<Utc>>,
    /// Whether the attempt's CDR is recorded already (a failed-over attempt's is, at once).
    pub(super) cdr_written: bool,
    /// Whether the next gateway may be tried (a final answer of the caller's or a callee that
    /// rang out ends the request).
    pub(super) failover: bool,
}

impl Ended {
    /// A call that ended without an answer, for a reason of the node's or the network's.
    pub(super) fn unanswered(code: u16, reason: String, ring_at: Option<chrono::DateTime<Utc>>) -> Ended {
        Ended {
            code,
            reason,
            trunk: None,
            gateway: None,
            answer_at: None,
            ring_at,
            hangup_by: HangupBy::System,
            attempt: 1,
            setup_at: None,
            cdr_written: false,
            failover: true,
        }
    }
}

/// Records the CDR of one attempt (`call_setup` stands in for an attempt that never started);
/// returns its billable seconds, cost and currency.
pub(super) fn write_cdr(
    ctx: &NodeContext,
    request: &CallRequest,
    (call_uuid, call_id): (Uuid, &str),
    ended: &Ended,
    call_setup: chrono::DateTime<Utc>,
    end_at: chrono::DateTime<Utc>,
) -> (u32, rust_decimal::Decimal, String) {
    let billable = billable_seconds(ended.answer_at, end_at);
    let rate = ended.trunk.as_ref().map(|t| t.rate_outbound_per_minute).unwrap_or_default();
    let cost = cdr_cost(rate, billable);
    let currency = ended.trunk.as_ref().map(|t| t.currency.clone()).unwrap_or_else(|| "USD".into());
    ctx.store.record(StoreEvent::Cdr(CdrRecord {
        call_uuid,
        call_id: call_id.to_string(),
        attempt: ended.attempt,
        namespace: ended.trunk.as_ref().map(|t| t.namespace.clone()),
        trunk_name: ended.trunk.as_ref().map(|t| t.name.clone()),
        provider: ended.trunk.as_ref().map(|t| t.provider.clone()),
        gateway: ended.gateway.clone(),
        direction: Direction::Outbound,
        from_number: request.from_number.clone(),
        to_number: request.to_number.clone(),
        setup_at: ended.setup_at.unwrap_or(call_setup),
        ring_at: ended.ring_at,
        answer_at: ended.answer_at,
        end_at,
        sip_code: Some(ended.code),
        reason: Some(ended.reason.clone()),
        hangup_by: Some(ended.hangup_by),
        billable_seconds: billable,
        cost,
        currency: currency.clone(),
    }));
    (billable, cost, currency)
}
