//! The B2BUA: every call is one task holding an inbound leg (the caller's dialog, where we are
//! the UAS) and an outbound leg (our dialog towards the callee, where we are the UAC), each
//! with its own Call-ID, tags and CSeq. The task decides routing and limits, tries targets with
//! failover, passes provisional responses, answers, re-INVITEs, UPDATEs, INFOs and BYEs across,
//! handles CANCEL, and writes the call's active row and one CDR per attempt.
//!
//! Media is anchored when the node has RTP ports (`media.rs`): each leg negotiates with the
//! node's own SDP and RTP flows through the relay; calls to AI agents are in `agent.rs`.
//!
//! The call's modules, in the order a call goes through them: `admission` (is the INVITE let
//! in?), `attempts` (targets, outbound INVITEs, failover), `connected` (the answered call, run by the
//! sans-IO machine of `sip::connected`),
//! `record` (CDRs, active row, metrics when it ends).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rsip::Method;
use rsip::Request;
use rsip::headers::Header;
use switchboard_model::{Direction, TrunkConfig};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::ALLOW;
use super::context::{MediaContext, NodeContext};
use super::control::reliable::{Reliability, ReliableSender, random_initial_rseq};
use super::endpoint::{NewRequest, TuEvent};
use super::guard::SourceClass;
use super::limits::CallPermit;
use super::message;
use super::transaction::{TransactionKey, new_tag, response_to};
use super::transport::Peer;
use crate::config::Snapshot;
use crate::metrics::{ActiveCallGuard, CallStatus};
use crate::store::{ActiveCall, CallState, StoreEvent};

mod admission;
mod agent;
mod attempts;
mod connected;
pub(super) mod media;
mod record;
mod referral;
mod replaces;
mod session;

use super::connected::Leg;
use admission::{admit, admitted_trunk, reason_header};
use media::Anchor;

/// How long an outbound leg may ring before the node gives up with 480 (the transaction layer
/// has no timer once a provisional response arrived).
const RING_TIMEOUT: Duration = Duration::from_secs(120);

/// `Retry-After` (seconds) of the 503 a draining node answers new requests with.
const DRAIN_RETRY_AFTER: &str = "30";
/// `Retry-After` (seconds) of the 503 for a call that found no free RTP port pair: calls end
/// all the time, so a pair is likely free again soon; meanwhile the carrier tries another node.
const PORTS_RETRY_AFTER: &str = "5";

/// Answers out-of-dialog requests: INVITEs become calls, OPTIONS is answered, the rest is
/// refused with the right code. Runs until the endpoint stops.
pub async fn route_requests(ctx: Arc<NodeContext>, mut requests: mpsc::Receiver<NewRequest>) {
    while let Some(NewRequest { request, key, peer, source }) = requests.recv().await {
        match request.method {
            Method::Invite | Method::Options if ctx.drain.is_draining() => {
                // A stopping node takes no new call; the carrier tries its next destination.
                let mut response = response_to(&request, 503, Some("Service Unavailable"), None);
                response.headers.push(Header::RetryAfter(DRAIN_RETRY_AFTER.into()));
                response.headers.push(reason_header(503, "node draining"));
                ctx.endpoint.respond(&key, response);
            }
            Method::Invite => {
                // One task per INVITE: sources other than carriers share a bounded number, so
                // a flood of INVITEs cannot grow tasks (and their memory) without end.
                let slot = match source {
                    SourceClass::Carrier => None,
                    _ => match ctx.guard.call_setups.try_acquire(peer.addr.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            ctx.metrics.message_dropped("call_setup_limit");
                            let mut response = response_to(&request, 503, Some("Service Unavailable"), None);
                            response.headers.push(Header::RetryAfter("5".into()));
                            ctx.endpoint.respond(&key, response);
                            continue;
                        }
                    },
                };
                let ctx = Arc::clone(&ctx);
                let span = tracing::info_span!("call", call_id = %message::call_id(&request), from = %peer.addr);
                // Boxed: the call's future is large (every state of a B2BUA call), and a future
                // spawned by value is copied several times on its way into the task (issue 22's
                // profile: ~22,000 instructions of memcpy per call); a box moves as a pointer.
                let call = Box::pin(inbound_call(ctx, request, key, peer));
                tokio::spawn(
                    async move {
                        let _slot = slot;
                        call.await;
                    }
                    .instrument(span),
                );
            }
            Method::Message => {
                let ctx = Arc::clone(&ctx);
                let pool = ctx.pool.clone();
                let hooks = ctx.webhooks.clone();
                tokio::spawn(super::sms::receive(
                    Arc::new(ctx.sms()),
                    pool,
                    hooks,
                    NewRequest { request, key, peer, source },
                ));
            }
            Method::Options => {
                let mut response = response_to(&request, 200, Some("OK"), Some(&new_tag()));
                response.headers.push(Header::Allow(ALLOW.into()));
                response.headers.push(Header::Accept("application/sdp".into()));
                ctx.endpoint.respond(&key, response);
            }
            Method::Bye | Method::Update | Method::Info | Method::PRack => {
                ctx.endpoint.respond(&key, response_to(&request, 481, Some("Call/Transaction Does Not Exist"), None));
            }
            _ => {
                let mut response = response_to(&request, 405, Some("Method Not Allowed"), None);
                response.headers.push(Header::Allow(ALLOW.into()));
                ctx.endpoint.respond(&key, response);
            }
        }
    }
}

/// The shared facts of a call.
#[derive(Clone)]
struct CallFacts {
    /// The node's own id of the call (keys its active row and CDRs).
    call_uuid: uuid::Uuid,
    /// The caller's SIP Call-ID.
    call_id: String,
    from: String,
    to: String,
    inbound_trunk: Option<Arc<TrunkConfig>>,
}

async fn inbound_call(ctx: Arc<NodeContext>, invite: Request, key: TransactionKey, peer: Peer) {
    let snapshot = ctx.snapshot.current();
    let (a_tx, mut a_rx) = mpsc::unbounded_channel();
    ctx.endpoint.attach(&key, a_tx.clone());
    let a_tag = new_tag();
    let setup_at = Utc::now();
    let from = message::from_user(&invite).unwrap_or_default();
    let caller = message::normalize_number(&from).unwrap_or(from.clone());
    let dialled = invite.uri.user().map(str::to_string).or_else(|| message::to_user(&invite)).unwrap_or_default();
    let called = message::normalize_number(&dialled).unwrap_or(dialled.clone());
    let facts = CallFacts {
        call_uuid: uuid::Uuid::new_v4(),
        call_id: message::call_id(&invite),
        from: caller.clone(),
        to: called.clone(),
        inbound_trunk: None,
    };

    let admitted = admit(&ctx, &snapshot, &invite, peer, &called, &caller)
        .await
        .and_then(|admitted| Ok((admitted, session::caller_timer(&invite.headers, &ctx.session_timers)?)));
    let admitted = match admitted {
        Ok(admitted) => match replaces::check(&ctx.endpoint, &invite.headers).await {
            Ok(None) => Ok(admitted),
            Ok(Some(holder)) => {
                let gone = response_to(&invite, 481, None, Some(&a_tag));
                if !replaces::hand_over(&holder, invite, key.clone(), peer) {
                    ctx.endpoint.respond(&key, gone);
                }
                return;
            }
            Err(refuse) => Err(refuse),
        },
        Err(refuse) => Err(refuse),
    };
    let ((_number, trunk, target, permit), session_a) = match admitted {
        Ok(admitted) => admitted,
        Err(refuse) => {
            tracing::info!(code = refuse.code, reason = %refuse.reason, "inbound call refused");
            let mut response = response_to(&invite, refuse.code, None, Some(&a_tag));
            response.headers.extend(refuse.extra);
            if refuse.code >= 400 && refuse.code != 401 && refuse.code != 407 {
                response.headers.push(reason_header(refuse.code, &refuse.reason));
            }
            ctx.endpoint.respond(&key, response);
            if refuse.code != 401 && refuse.code != 407 {
                let (provider, trunk) = admitted_trunk(&snapshot, &called);
                ctx.metrics.call_ended(&provider, &trunk, CallStatus::from_final_code(refuse.code), None);
            }
            return;
        }
    };
    let _permit: CallPermit = permit;
    let facts = CallFacts { inbound_trunk: Some(Arc::clone(&trunk)), ..facts };
    ctx.store.record(StoreEvent::CallStarted(ActiveCall {
        call_uuid: facts.call_uuid,
        call_id: facts.call_id.clone(),
        namespace: Some(trunk.namespace.clone()),
        trunk_name: Some(trunk.name.clone()),
        provider: Some(trunk.provider.clone()),
        direction: Direction::Inbound,
        from_number: caller.clone(),
        to_number: called.clone(),
        state: CallState::Setup,
        started_at: setup_at,
        answered_at: None,
    }));
    let _active: ActiveCallGuard = ctx.metrics.call_active(Some(&trunk.name));

    let mut call = Call {
        ctx: Arc::clone(&ctx),
        snapshot,
        invite,
        key,
        a_peer: peer,
        a_tag,
        a_tx,
        facts,
        attempts: 0,
        ring_at: None,
        answer_at: None,
        b_rx: None,
        b_tx: None,
        anchor: None,
        reliable: None,
        early_dialog: false,
        session_a,
        session_b: None,
    };
    if Reliability::of(&call.invite.headers) == Reliability::Required {
        let cseq = message::cseq(&call.invite).map(|(n, _)| n).unwrap_or(1);
        call.reliable = Some(ReliableSender::new(cseq, random_initial_rseq(), ctx.timers.t1));
    }
    let outcome = call.run(target, &mut a_rx).await;
    call.finish(outcome, setup_at);
}

struct Call {
    ctx: Arc<NodeContext>,
    snapshot: Arc<Snapshot>,
    invite: Request,
    key: TransactionKey,
    a_peer: Peer,
    a_tag: String,
    a_tx: mpsc::UnboundedSender<TuEvent>,
    facts: CallFacts,
    attempts: u32,
    ring_at: Option<DateTime<Utc>>,
    answer_at: Option<DateTime<Utc>>,
    /// The answered outbound leg's event channel (kept registered for in-dialog requests).
    b_rx: Option<mpsc::UnboundedReceiver<TuEvent>>,
    b_tx: Option<mpsc::UnboundedSender<TuEvent>>,
    /// The call's anchored media (`None`: SDP passes through).
    anchor: Option<Anchor>,
    /// The caller requires reliable provisional responses (RFC 3262): they are numbered,
    /// retransmitted until PRACKed, and the caller's PRACKs are matched here.
    reliable: Option<ReliableSender>,
    /// The caller's early dialog is registered with the endpoint (for its PRACKs).
    early_dialog: bool,
    /// The session timer of the caller's leg, as the node's 2xx sets it (RFC 4028).
    session_a: session::LegTimer,
    /// The session timer of the answered callee's leg.
    session_b: Option<session::LegTimer>,
}
