//! The attempts of an API call: the from-number's trunks and their gateways in order, one
//! outbound INVITE each, failover until one answers or a final answer ends the call.

use std::sync::Arc;

use chrono::Utc;
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response};
use sqlx::PgPool;
use switchboard_model::egress::EgressPolicy;
use switchboard_model::{Direction, TrunkConfig};
use uuid::Uuid;

use super::connected::{CalleeLeg, hold_until_hangup};
use super::record::{Ended, write_cdr};
use super::{CallRequest, RING_TIMEOUT, StatusEvent, media, set_state};
use crate::sip::ALLOW;
use crate::sip::context::NodeContext;
use crate::sip::control::session_leg::LegTimer;
use crate::sip::control::session_timer::UacOffer;
use crate::sip::invite_client::{InviteClient, InviteEvent, InviteSetup, failover_timeout};
use crate::sip::message;
use crate::sip::routing;
use crate::sip::transaction::new_tag;
use crate::sip::transport::Peer;
use crate::store::{ActiveCall, CallState, StoreEvent};
use crate::webhook::CallHooks;

/// Where the answered call's media goes.
pub(super) struct CallTarget<'m> {
    /// The agent to bridge to, with the egress policy its connection must pass when an API
    /// client chose it.
    pub(super) agent: Option<(&'m str, Option<Arc<EgressPolicy>>)>,
    /// The node's media end (`None`: no RTP ports; the offer has none).
    pub(super) media: &'m mut Option<media::ApiMedia>,
}

/// One claimed request being placed: what every step of placing it needs.
pub(super) struct Placing<'a> {
    pub(super) ctx: &'a Arc<NodeContext>,
    pub(super) pool: &'a PgPool,
    pub(super) request: &'a CallRequest,
    pub(super) hooks: &'a CallHooks,
    /// The request's status callback for a status.
    pub(super) event: &'a (dyn Fn(&'static str) -> StatusEvent<'a> + Sync),
    /// The node's id of the call: the key of its `active_calls` row and of its CDRs.
    pub(super) call_uuid: Uuid,
    /// The call's own Call-ID (its first attempt's): the `call_id` of its `active_calls` row,
    /// CDRs and webhooks, and what transfer requests name.
    pub(super) call_id: &'a str,
    /// When the node took the request (the `active_calls` row's start).
    pub(super) started_at: chrono::DateTime<Utc>,
}

impl Placing<'_> {
    /// Reports `status` (`ringing`, `answered`) to the webhook and in the request's row (with
    /// the call's own Call-ID, which its `active_calls` row and transfer requests use).
    async fn report(&self, status: &'static str) {
        self.hooks.send(&(self.event)(status));
        set_state(self.pool, self.request.id, status, self.call_id, None).await;
    }
}

/// Tries the trunks' gateways in order until one answers or a final answer ends the call.
pub(super) async fn dial(
    placing: &Placing<'_>,
    call_id: &str,
    mut target: CallTarget<'_>,
    trunks: Vec<Arc<TrunkConfig>>,
) -> Ended {
    let (ctx, request) = (placing.ctx, placing.request);
    let mut attempt = 0;
    let mut last = Ended::unanswered(503, "no gateway answered".into(), None);
    let mut rang = false;
    for trunk in trunks {
        let Ok(_permit) = ctx.limits.acquire(&trunk).await else {
            last.reason = format!("trunk {} is at its limit", trunk.name);
            continue;
        };
        let user = routing::format_for_trunk(&trunk, &request.to_number);
        for gateway in routing::gateway_order(&trunk) {
            let Some(protocol) = routing::signaling_protocol(gateway.transport) else {
                last.reason = format!("gateway {}: {}", gateway.address, routing::TLS_UNSUPPORTED);
                continue;
            };
            let Ok(addrs) = ctx.resolver.resolve(&gateway.address, gateway.port, protocol).await else { continue };
            let host = match gateway.port {
                Some(port) => format!("{}:{port}", gateway.address),
                None => gateway.address.clone(),
            };
            for addr in addrs {
                attempt += 1;
                let attempt_setup = Utc::now();
                // The call's row names the trunk of the attempt in progress.
                ctx.store.record(StoreEvent::CallStarted(ActiveCall {
                    call_uuid: placing.call_uuid,
                    call_id: call_id.to_string(),
                    namespace: Some(trunk.namespace.clone()),
                    trunk_name: Some(trunk.name.clone()),
                    provider: Some(trunk.provider.clone()),
                    direction: Direction::Outbound,
                    from_number: request.from_number.clone(),
                    to_number: request.to_number.clone(),
                    state: CallState::Setup,
                    started_at: placing.started_at,
                    answered_at: None,
                }));
                let peer = Peer { protocol, addr };
                let attempt_call_id = if attempt == 1 { call_id.to_string() } else { format!("{call_id}-{attempt}") };
                let gateway =
                    Gateway { call_id: &attempt_call_id, user: &user, host: &host, peer, trunk: &trunk, attempt };
                let outcome = one_attempt(placing, &mut target, &gateway, &mut rang).await;
                let mut ended = outcome;
                ended.trunk = Some(Arc::clone(&trunk));
                ended.gateway = Some(host.clone());
                ended.attempt = attempt;
                ended.setup_at = Some(attempt_setup);
                if ended.answer_at.is_some()
                    || !ended.failover
                    || routing::is_final_for_caller(&ctx.final_codes, ended.code)
                {
                    return ended;
                }
                tracing::info!(attempt, code = ended.code, reason = %ended.reason, "API call attempt failed; trying the next");
                write_cdr(ctx, request, (placing.call_uuid, call_id), &ended, placing.started_at, Utc::now());
                // The last failed attempt is the call's outcome; its CDR is written.
                last = Ended { cdr_written: true, ..ended };
            }
        }
    }
    last
}

/// Where one attempt goes: a gateway address of a trunk, and the attempt's Call-ID.
struct Gateway<'a> {
    call_id: &'a str,
    /// The user part of the Request-URI (the number formatted for the trunk).
    user: &'a str,
    /// The gateway as written in the Request-URI (`host[:port]`).
    host: &'a str,
    peer: Peer,
    trunk: &'a Arc<TrunkConfig>,
    /// The attempt's number (its CDR's).
    attempt: u32,
}

/// One INVITE to one gateway address, and the call if it is answered.
async fn one_attempt(
    placing: &Placing<'_>,
    target: &mut CallTarget<'_>,
    gateway: &Gateway<'_>,
    rang: &mut bool,
) -> Ended {
    let (ctx, request) = (placing.ctx, placing.request);
    let Gateway { user, host, peer, trunk, .. } = *gateway;
    let failed = Ended::unanswered;
    let tag = new_tag();
    let offer = target.media.as_mut().map(|media| media.offer(trunk));
    // The callee's leg gets a session timer like every leg the node places (RFC 4028): the
    // node keeps it alive itself when the callee does not refresh, and a refresh answered 481
    // or never tells it the callee is gone.
    let timer = UacOffer::new(&ctx.session_timers);
    let Some(invite) = build_invite(ctx, &request.from_number, gateway, &tag, offer.as_deref(), &timer) else {
        return failed(400, format!("cannot build a request URI for {user}@{host}"), None);
    };
    // What the node's session refreshes carry: its offer, unchanged.
    let sdp = invite.body.clone();
    let setup = InviteSetup {
        peer,
        tag,
        credential: ctx.snapshot.current().credential(&trunk.namespace, &trunk.name).cloned(),
        no_response: failover_timeout(Some(trunk)),
        ring_limit: RING_TIMEOUT,
        gateway: host.to_string(),
        contact_user: request.from_number.clone(),
        session: Some(timer),
    };
    let mut client = InviteClient::send(ctx, invite, setup);
    let mut ring_at = None;
    let (dialog, response) = loop {
        match client.next(None).await {
            InviteEvent::Provisional(response) => {
                if message::status(&response) >= 180 && ring_at.is_none() {
                    ring_at = Some(Utc::now());
                    if !*rang {
                        *rang = true;
                        placing.report("ringing").await;
                    }
                }
            }
            InviteEvent::Answered(answered) => break *answered,
            InviteEvent::Failed { code, reason, failover } => {
                let mut ended = failed(code, reason, ring_at);
                ended.failover = failover;
                return ended;
            }
            // Without a caller channel and a wake time neither comes.
            InviteEvent::CallerPrack { .. } | InviteEvent::Wake => {}
            InviteEvent::Cancelled => {
                let mut ended = failed(487, crate::drain::NODE_SHUTDOWN.into(), ring_at);
                ended.failover = false;
                return ended;
            }
        }
    };
    // The offer as the callee last saw it (a 422 raises it) and the callee's 2xx decide who
    // refreshes.
    let session = client.session_offer().map(|offer| LegTimer::after_answer(offer, &response.headers));
    let (tx, rx) = client.into_channel();
    let result = match rx {
        Some(mut rx) => {
            let leg = CalleeLeg { dialog: &dialog, tx: &tx, rx: &mut rx, session, sdp };
            answered(placing, target, gateway, leg, &response, ring_at).await
        }
        None => failed(500, "the endpoint stopped".into(), ring_at),
    };
    ctx.endpoint.unregister_dialog(&dialog.call_id, &dialog.local_tag);
    result
}

/// The answered call: its media negotiated (a callee SDP the agent cannot use is hung up with
/// 488), `answered` reported, then bridged to the agent or held until either side hangs up.
async fn answered(
    placing: &Placing<'_>,
    target: &mut CallTarget<'_>,
    gateway: &Gateway<'_>,
    leg: CalleeLeg<'_>,
    response: &Response,
    ring_at: Option<chrono::DateTime<Utc>>,
) -> Ended {
    let (ctx, request) = (placing.ctx, placing.request);
    let (call_id, trunk) = (gateway.call_id, gateway.trunk);
    let negotiated = match target.media.as_ref().map(|media| media.answered(&response.body)) {
        Some(Ok(negotiated)) => Some(negotiated),
        Some(Err(error)) if target.agent.is_some() => {
            let why = format!("callee's SDP: {error}");
            let mut dialog = leg.dialog.clone();
            let bye =
                dialog.bye(ctx.endpoint.via_for(dialog.peer), &[message::HangupReason::incompatible(&why).header()]);
            ctx.endpoint.send_request(bye, dialog.peer, leg.tx.clone());
            return Ended::unanswered(488, why, ring_at);
        }
        _ => None,
    };
    let answer_at = Utc::now();
    ctx.store.record(StoreEvent::CallAnswered { call_uuid: placing.call_uuid, at: answer_at });
    placing.report("answered").await;
    let agent = target.agent.clone().zip(negotiated).zip(target.media.take());
    let (hangup_by, reason) = match agent {
        Some((((url, egress), negotiated), media)) => {
            let agent = media::AgentTarget {
                url: url.to_string(),
                egress,
                parameters: crate::bridge::CallParameters {
                    from: request.from_number.clone(),
                    to: request.to_number.clone(),
                    trunk: trunk.name.clone(),
                    number: request.from_number.clone(),
                },
                call_sid: call_id.to_string(),
                transferable: crate::sip::transfer::CallerFacts {
                    call_uuid: placing.call_uuid,
                    call_sid: placing.call_id.to_string(),
                    // The human a transfer reaches sees the party handed over, as for an
                    // inbound caller.
                    from: request.to_number.clone(),
                    trunk: Some(Arc::clone(trunk)),
                    answer_sdp: vec![],
                    did: request.from_number.clone(),
                    attempt: gateway.attempt,
                    deadline: None,
                },
            };
            media::bridge_to_agent(ctx, leg, media, negotiated, agent).await
        }
        None => hold_until_hangup(ctx, leg).await,
    };
    Ended { answer_at: Some(answer_at), hangup_by, ..Ended::unanswered(200, reason, ring_at) }
}

/// The INVITE of an attempt from `from_number` (CSeq 1), with the node's offer (or, without
/// RTP ports, an offer that names no usable port) and the session timer `timer` asks for
/// (`Supported: timer`, `Session-Expires`, `Min-SE`).
fn build_invite(
    ctx: &NodeContext,
    from_number: &str,
    gateway: &Gateway<'_>,
    tag: &str,
    offer: Option<&[u8]>,
    timer: &UacOffer,
) -> Option<Request> {
    let Gateway { call_id, user, host, peer, .. } = *gateway;
    let cseq = 1;
    let (our_host, our_port) = ctx.endpoint.transport().sent_by(peer.addr);
    let uri = rsip::Uri::try_from(format!("sip:{user}@{host}").as_str()).ok()?;
    let mut headers: Vec<Header> = vec![
        ctx.endpoint.via_for(peer),
        Header::MaxForwards(headers::MaxForwards::from(70u32)),
        Header::From(headers::From::new(format!("<sip:{}@{our_host}:{our_port}>;tag={tag}", from_number))),
        Header::To(headers::To::new(format!("<sip:{user}@{host}>"))),
        Header::CallId(headers::CallId::new(call_id.to_string())),
        Header::CSeq(headers::CSeq::new(format!("{cseq} INVITE"))),
        Header::Contact(headers::Contact::new(ctx.endpoint.contact_for(peer, from_number))),
        Header::Allow(ALLOW.into()),
        Header::UserAgent("switchboard".into()),
    ];
    headers.extend(timer.request_headers());
    let mut invite =
        Request { method: Method::Invite, uri, version: rsip::Version::V2, headers: headers.into(), body: vec![] };
    if let Some(offer) = offer {
        message::set_body(&mut invite.headers, &mut invite.body, offer.to_vec(), Some("application/sdp"));
        return Some(invite);
    }
    // No RTP ports: an offer that names no usable port (the callee hears silence).
    let ip = if our_host.ends_with(".invalid") { "IP6 ::" } else { "IP4" };
    let address = if ip == "IP4" { our_host.as_str() } else { "" };
    let sdp = format!(
        "v=0\r\no=switchboard 1 1 IN {ip} {address}\r\ns=switchboard\r\nc=IN {ip} {address}\r\nt=0 0\r\n\
         m=audio 9 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
         a=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
    );
    message::set_body(&mut invite.headers, &mut invite.body, sdp.into_bytes(), Some("application/sdp"));
    Some(invite)
}
