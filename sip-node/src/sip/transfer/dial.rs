//! The outbound leg of a transfer: the trunks' gateways in order (or a SIP URI's host, through
//! the trunk whose gateway it is or directly: `target`), one INVITE each (the node's own port
//! pair in the offer), failover until one answers, a final answer or the ring time ends it. Every failed attempt gets its CDR at once, under the transferred call's id; the
//! answered attempt's CDR is written when the call ends (`agent`).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request};
use switchboard_model::{Direction, TrunkConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::media::ports::PortPair;
use crate::media::relay::{LegMedia, RtpLegSetup};
use crate::media::sdp::{LocalEndpoint, MediaPolicy, SdpSession, SessionDescription, create_offer, process_answer};
use crate::sip::ALLOW;
use crate::sip::context::NodeContext;
use crate::sip::dialog::Dialog;
use crate::sip::endpoint::{TuEvent, TuSender};
use crate::sip::invite_client::{InviteClient, InviteEvent, InviteSetup, failover_timeout};
use crate::sip::limits::CallPermit;
use crate::sip::message;
use crate::sip::routing;
use crate::sip::transaction::new_tag;
use crate::sip::transport::Peer;
use crate::store::{CdrRecord, HangupBy, StoreEvent};

use super::target::{Route, UriRoute};

/// What the outbound leg is for.
#[derive(Clone)]
pub(super) struct DialPlan {
    pub(super) route: Route,
    /// The target (E.164, or a SIP URI).
    pub(super) to: String,
    /// The number the target sees.
    pub(super) from: String,
    /// The transferred call: its id and SIP Call-ID key the attempts' CDRs.
    pub(super) call_uuid: Uuid,
    pub(super) call_id: String,
    /// The first CDR attempt number the transfer may use.
    pub(super) first_attempt: u32,
    /// How long the target may ring.
    pub(super) ring_limit: Duration,
    /// Extra headers of the INVITE (`X-Transfer-Summary`).
    pub(super) headers: Vec<Header>,
}

/// One attempt's facts for its CDR.
#[derive(Debug, Clone)]
pub(super) struct Attempt {
    pub(super) number: u32,
    /// `None`: a SIP URI dialled directly (no trunk, nothing billed).
    pub(super) trunk: Option<Arc<TrunkConfig>>,
    pub(super) gateway: String,
    pub(super) setup_at: DateTime<Utc>,
    pub(super) ring_at: Option<DateTime<Utc>>,
    pub(super) answer_at: Option<DateTime<Utc>>,
}

/// The answered target.
pub(super) struct Answered {
    pub(super) dialog: Dialog,
    pub(super) tx: TuSender,
    pub(super) rx: mpsc::UnboundedReceiver<TuEvent>,
    /// The node's port pair towards the target and what was negotiated on it (taken by the
    /// relay that joins the caller).
    pub(super) media: Option<RtpLegSetup>,
    /// The node's offer (what a re-INVITE without an offer gets back).
    pub(super) offer: Vec<u8>,
    pub(super) attempt: Attempt,
    /// The trunk's call slot, held while the leg lasts.
    pub(super) permit: Option<CallPermit>,
}

/// How dialling ended.
pub(super) enum Dialed {
    Answered(Box<Answered>),
    /// Every attempt failed (their CDRs are written); the last one's code and reason.
    Failed {
        code: u16,
        reason: String,
        attempts: u32,
    },
}

/// Tries the plan's route until the target answers; `cancel` stops it (a ringing attempt is
/// CANCELled, 487).
pub(super) async fn dial(ctx: Arc<NodeContext>, plan: DialPlan, cancel: CancellationToken) -> Dialed {
    let Some(media) = ctx.media.as_ref() else {
        return Dialed::Failed { code: 503, reason: "no media anchoring on this node".into(), attempts: 0 };
    };
    let pair = match media.ports.allocate() {
        Ok(pair) => Some(pair),
        Err(error) => return Dialed::Failed { code: 503, reason: format!("no RTP port free: {error}"), attempts: 0 },
    };
    let mut dialing = Dialing {
        ctx: &ctx,
        plan: &plan,
        cancel: &cancel,
        pair,
        number: plan.first_attempt,
        last: (503, "no trunk can reach the target".to_string()),
    };
    let done = match &plan.route {
        Route::Number(trunks) => dialing.number_route(trunks).await,
        Route::Uri(route) => dialing.uri_route(route).await,
    };
    done.unwrap_or_else(|| {
        let (code, reason) = dialing.last;
        Dialed::Failed { code, reason, attempts: dialing.number - plan.first_attempt }
    })
}

/// The attempts so far.
struct Dialing<'a> {
    ctx: &'a Arc<NodeContext>,
    plan: &'a DialPlan,
    cancel: &'a CancellationToken,
    /// The node's port pair, between attempts.
    pair: Option<PortPair>,
    /// The next attempt's number.
    number: u32,
    /// The last failure.
    last: (u16, String),
}

impl Dialing<'_> {
    /// A number: each trunk's gateways in order, each resolved address once.
    async fn number_route(&mut self, trunks: &[Arc<TrunkConfig>]) -> Option<Dialed> {
        let ctx = self.ctx;
        for trunk in trunks {
            let mut permit = match ctx.limits.acquire(trunk).await {
                Ok(permit) => Some(permit),
                Err(error) => {
                    self.last = (503, format!("trunk {} is at its limit ({error:?})", trunk.name));
                    continue;
                }
            };
            let user = routing::format_for_trunk(trunk, &self.plan.to);
            for gateway in routing::gateway_order(trunk) {
                let Some(protocol) = routing::signaling_protocol(gateway.transport) else { continue };
                let Ok(addrs) = ctx.resolver.resolve(&gateway.address, gateway.port, protocol).await else { continue };
                let host = match gateway.port {
                    Some(port) => format!("{}:{port}", gateway.address),
                    None => gateway.address.clone(),
                };
                let Ok(uri) = rsip::Uri::try_from(format!("sip:{user}@{host}").as_str()) else {
                    self.last = (400, format!("cannot build a request URI for {user}@{host}"));
                    continue;
                };
                for addr in addrs {
                    let target = Target { uri: &uri, host: &host, peer: Peer { protocol, addr } };
                    if let Some(done) = self.attempt(Some(trunk), &target, &mut permit).await {
                        return Some(done);
                    }
                }
            }
        }
        None
    }

    /// A SIP URI: its host's addresses, through the trunk whose gateway it is (its limits and
    /// credentials) or directly.
    async fn uri_route(&mut self, route: &UriRoute) -> Option<Dialed> {
        let ctx = self.ctx;
        let mut permit = None;
        if let Some(trunk) = &route.trunk {
            match ctx.limits.acquire(trunk).await {
                Ok(slot) => permit = Some(slot),
                Err(error) => {
                    self.last = (503, format!("trunk {} is at its limit ({error:?})", trunk.name));
                    return None;
                }
            }
        }
        let addrs = match ctx.resolver.resolve(&route.host, route.port, route.protocol).await {
            Ok(addrs) => addrs,
            Err(error) => {
                self.last = (503, format!("cannot resolve {}: {error}", route.host));
                return None;
            }
        };
        let host = route.uri.host_with_port.to_string();
        for addr in addrs {
            let target = Target { uri: &route.uri, host: &host, peer: Peer { protocol: route.protocol, addr } };
            if let Some(done) = self.attempt(route.trunk.as_ref(), &target, &mut permit).await {
                return Some(done);
            }
        }
        None
    }

    /// One attempt; `Some` when dialling is over (answered, cancelled, or a final answer).
    async fn attempt(
        &mut self,
        trunk: Option<&Arc<TrunkConfig>>,
        target: &Target<'_>,
        permit: &mut Option<CallPermit>,
    ) -> Option<Dialed> {
        let ports = self.pair.take()?;
        let (ctx, plan) = (self.ctx, self.plan);
        let attempt = Attempt {
            number: self.number,
            trunk: trunk.cloned(),
            gateway: target.host.to_string(),
            setup_at: Utc::now(),
            ring_at: None,
            answer_at: None,
        };
        self.number += 1;
        match one_attempt(ctx, plan, target, attempt, ports, self.cancel).await {
            Outcome::Answered(mut answered) => {
                answered.permit = permit.take();
                Some(Dialed::Answered(answered))
            }
            Outcome::Failed { attempt, ports, code, reason, failover } => {
                write_cdr(ctx, plan, &attempt, code, &reason, None);
                self.pair = Some(ports);
                self.last = (code, reason);
                let stop =
                    self.cancel.is_cancelled() || !failover || routing::is_final_for_caller(&ctx.final_codes, code);
                stop.then(|| Dialed::Failed {
                    code,
                    reason: self.last.1.clone(),
                    attempts: self.number - plan.first_attempt,
                })
            }
        }
    }
}

/// Where one attempt goes.
struct Target<'a> {
    /// The Request-URI (and the To).
    uri: &'a rsip::Uri,
    /// The gateway as the CDR names it (`host[:port]`).
    host: &'a str,
    peer: Peer,
}

enum Outcome {
    Answered(Box<Answered>),
    Failed { attempt: Attempt, ports: PortPair, code: u16, reason: String, failover: bool },
}

async fn one_attempt(
    ctx: &NodeContext,
    plan: &DialPlan,
    target: &Target<'_>,
    mut attempt: Attempt,
    ports: PortPair,
    cancel: &CancellationToken,
) -> Outcome {
    let failed =
        |attempt, ports, code, reason: String, failover| Outcome::Failed { attempt, ports, code, reason, failover };
    let Some(media) = ctx.media.as_ref() else {
        return failed(attempt, ports, 503, "no media anchoring on this node".into(), false);
    };
    let trunk = attempt.trunk.clone();
    let mut policy = MediaPolicy::new(
        routing::codecs_of(trunk.as_deref()),
        LocalEndpoint { address: media.address, rtp_port: ports.rtp_port() },
    );
    // The target's leg is SRTP as its trunk's `media.srtp` says, like any outbound leg.
    policy.srtp = trunk.as_ref().map_or(crate::media::srtp::SrtpPolicy::Off, |t| t.srtp.into());
    let mut session = SdpSession::new(media.address);
    let offer = create_offer(&policy, &mut session);
    let offer_bytes = offer.to_string().into_bytes();
    let tag = new_tag();
    let call_id = format!("{}@switchboard", Uuid::new_v4().simple());
    let invite = build_invite(ctx, plan, target, &call_id, &tag, &offer_bytes);
    let credential = trunk.as_ref().and_then(|t| ctx.snapshot.current().credential(&t.namespace, &t.name).cloned());
    let setup = InviteSetup {
        peer: target.peer,
        tag,
        credential,
        no_response: failover_timeout(trunk.as_deref()),
        ring_limit: plan.ring_limit,
        gateway: target.host.to_string(),
        contact_user: plan.from.clone(),
        session: None,
    };
    let mut client = InviteClient::send(ctx, invite, setup);
    let (dialog, response) = loop {
        let event = tokio::select! {
            event = client.next(None) => event,
            () = cancel.cancelled() => {
                // CANCEL needs a provisional response first (RFC 3261 9.1); before one, the
                // attempt is abandoned and a late 2xx is hung up by the endpoint's dialog-less
                // handling.
                client.cancel();
                return failed(attempt, ports, 487, "transfer cancelled".into(), false);
            }
        };
        match event {
            InviteEvent::Provisional(response) => {
                if message::status(&response) >= 180 && attempt.ring_at.is_none() {
                    attempt.ring_at = Some(Utc::now());
                }
            }
            InviteEvent::Answered(answered) => break *answered,
            InviteEvent::Failed { code, reason, failover } => return failed(attempt, ports, code, reason, failover),
            InviteEvent::Cancelled => return failed(attempt, ports, 487, crate::drain::NODE_SHUTDOWN.into(), false),
            InviteEvent::CallerPrack { .. } | InviteEvent::Wake => {}
        }
    };
    attempt.answer_at = Some(Utc::now());
    let (tx, rx) = client.into_channel();
    let negotiated = SessionDescription::parse_bytes(&response.body).and_then(|answer| process_answer(&offer, &answer));
    let (Some(rx), Ok(negotiated)) = (rx, negotiated) else {
        // Answered with nothing the node can relay: hang the target up.
        let why = "the target's answer has no usable media";
        let mut dialog = dialog;
        let bye = dialog.bye(ctx.endpoint.via_for(dialog.peer), &[message::HangupReason::incompatible(why).header()]);
        ctx.endpoint.send_request(bye, dialog.peer, tx);
        ctx.endpoint.unregister_dialog(&dialog.call_id, &dialog.local_tag);
        return failed(attempt, ports, 488, why.into(), false);
    };
    let media = RtpLegSetup { ports, media: LegMedia::from(&negotiated) };
    // `dial` moves in the trunk permit it holds.
    Outcome::Answered(Box::new(Answered {
        dialog,
        tx,
        rx,
        media: Some(media),
        offer: offer_bytes,
        attempt,
        permit: None,
    }))
}

/// The INVITE of an attempt (CSeq 1) with the node's offer and the plan's extra headers.
fn build_invite(
    ctx: &NodeContext,
    plan: &DialPlan,
    target: &Target<'_>,
    call_id: &str,
    tag: &str,
    offer: &[u8],
) -> Request {
    let peer = target.peer;
    let (our_host, our_port) = ctx.endpoint.transport().sent_by(peer.addr);
    let uri = target.uri.clone();
    let mut headers: Vec<Header> = vec![
        ctx.endpoint.via_for(peer),
        Header::MaxForwards(headers::MaxForwards::from(70u32)),
        Header::From(headers::From::new(format!("<sip:{}@{our_host}:{our_port}>;tag={tag}", plan.from))),
        Header::To(headers::To::new(format!("<{}>", target.uri))),
        Header::CallId(headers::CallId::new(call_id.to_string())),
        Header::CSeq(headers::CSeq::new("1 INVITE")),
        Header::Contact(headers::Contact::new(ctx.endpoint.contact_for(peer, &plan.from))),
        Header::Allow(ALLOW.into()),
        Header::UserAgent("switchboard".into()),
    ];
    headers.extend(plan.headers.iter().cloned());
    let mut invite =
        Request { method: Method::Invite, uri, version: rsip::Version::V2, headers: headers.into(), body: vec![] };
    message::set_body(&mut invite.headers, &mut invite.body, offer.to_vec(), Some("application/sdp"));
    invite
}

/// The CDR of a transfer attempt: the transferred call's id, direction outbound, the target as
/// `to_number`. `end` is `None` for an attempt that was never answered.
pub(super) fn write_cdr(
    ctx: &NodeContext,
    plan: &DialPlan,
    attempt: &Attempt,
    code: u16,
    reason: &str,
    hangup_by: Option<HangupBy>,
) {
    let end_at = Utc::now();
    let billable = crate::store::billable_seconds(attempt.answer_at, end_at);
    let trunk = attempt.trunk.as_deref();
    let rate = trunk.map(|t| t.rate_outbound_per_minute).unwrap_or_default();
    ctx.store.record(StoreEvent::Cdr(CdrRecord {
        call_uuid: plan.call_uuid,
        call_id: plan.call_id.clone(),
        attempt: attempt.number,
        namespace: trunk.map(|t| t.namespace.clone()),
        trunk_name: trunk.map(|t| t.name.clone()),
        provider: trunk.map(|t| t.provider.clone()),
        gateway: Some(attempt.gateway.clone()),
        direction: Direction::Outbound,
        from_number: plan.from.clone(),
        to_number: plan.to.clone(),
        setup_at: attempt.setup_at,
        ring_at: attempt.ring_at,
        answer_at: attempt.answer_at,
        end_at,
        sip_code: Some(code),
        reason: Some(format!("transfer: {reason}")),
        hangup_by: Some(hangup_by.unwrap_or(HangupBy::System)),
        billable_seconds: billable,
        cost: crate::store::cdr_cost(rate, billable),
        currency: trunk.map_or_else(|| "USD".to_string(), |t| t.currency.clone()),
    }));
}
