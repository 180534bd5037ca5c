//! Outbound attempts: the places a call may go (each gateway address of each trunk, or a SIP
//! URI's addresses), the outbound INVITE, provisional responses passed to the caller, and
//! failover from one target to the next until one answers or a final answer ends the call.

use std::sync::Arc;

use chrono::Utc;
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response};
use switchboard_model::TrunkConfig;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::media::Anchor;
use super::record::{AttemptRecord, Ender, Outcome};
use super::session;
use super::{ALLOW, Call, RING_TIMEOUT};
use crate::sip::context::NodeContext;
use crate::sip::control::reliable::{self, ReliableAction, ReliableSender};
use crate::sip::control::session_timer::{self, UacOffer};
use crate::sip::dialog::{Dialog, content_type};
use crate::sip::endpoint::TuEvent;
use crate::sip::invite_client::{InviteClient, InviteEvent, InviteSetup, failover_timeout};
use crate::sip::limits::CallPermit;
use crate::sip::message::{self, HangupReason};
use crate::sip::routing::{self, Target};
use crate::sip::transaction::{TransactionKey, new_tag, response_to};
use crate::sip::transport::{Peer, Protocol};

/// A place one outbound INVITE goes to.
#[derive(Clone)]
pub(super) struct AttemptTarget {
    pub(super) uri: rsip::Uri,
    pub(super) to_user: String,
    pub(super) peer: Peer,
    pub(super) trunk: Option<Arc<TrunkConfig>>,
    pub(super) gateway: String,
}

/// How one outbound attempt ended.
pub(super) enum AttemptEnd {
    /// Answered: the outbound dialog and the 2xx.
    Answered(Box<(Dialog, Response)>),
    /// A final non-2xx or a timeout (`code` 408); `failover` says whether to try the next target.
    Failed { code: u16, reason: String, failover: bool },
    /// The caller cancelled.
    Cancelled,
}

impl Call {
    pub(super) async fn run(&mut self, target: Target, a_rx: &mut mpsc::UnboundedReceiver<TuEvent>) -> Outcome {
        if let Target::WebSocket(url) = target {
            return self.bridge_to_agent(url, a_rx).await;
        }
        if let Some(media) = &self.ctx.media {
            match Anchor::new(media, &self.invite.body, self.facts.inbound_trunk.as_deref()) {
                Ok(anchor) => {
                    let (caller_port, callee_port) = anchor.ports();
                    tracing::debug!(caller_port, callee_port, "media anchored");
                    self.anchor = Some(anchor);
                }
                Err(error) if error.ports_exhausted() => return self.refuse_no_ports(error.to_string(), None),
                Err(error) => return self.refuse_caller(error.sip_status(), error.to_string(), None),
            }
        }
        let targets = self.targets(target).await;
        if targets.is_empty() {
            return self.refuse_caller(503, "no reachable target for this call".into(), None);
        }
        let mut last = (503u16, "all targets failed".to_string());
        // The outbound trunk's slot is taken when its first attempt starts and held until the
        // call moves to another trunk or ends; a trunk at its limit is skipped (failover).
        let mut slot: Option<(Arc<TrunkConfig>, CallPermit)> = None;
        for target in targets {
            if let Some(trunk) = &target.trunk
                && slot.as_ref().is_none_or(|(held, _)| !Arc::ptr_eq(held, trunk))
            {
                slot = None;
                match self.ctx.limits.acquire(trunk).await {
                    Ok(permit) => slot = Some((Arc::clone(trunk), permit)),
                    Err(limit) => {
                        tracing::info!(trunk = %trunk.name, reason = %limit.reason(), "skipping trunk at its limit");
                        last = (503, limit.reason());
                        continue;
                    }
                }
            }
            self.attempts += 1;
            let mut record = AttemptRecord {
                number: self.attempts,
                trunk: target.trunk.clone(),
                gateway: Some(target.gateway.clone()),
                setup_at: Utc::now(),
                ring_at: None,
                answer_at: None,
            };
            // Per call (as the call's end and media counts): debug, since a line per call at
            // info cost a few per cent of the node's instructions per call (issue 22); the CDR
            // keeps every attempt.
            tracing::debug!(attempt = self.attempts, gateway = %target.gateway, trunk = target.trunk.as_ref().map(|t| t.name.as_str()), "outbound attempt");
            match self.attempt(&target, &mut record, a_rx).await {
                AttemptEnd::Answered(answered) => {
                    let (mut b_dialog, answer) = *answered;
                    record.answer_at = Some(Utc::now());
                    if let Err(error) = self.anchor_answer(&answer) {
                        // The callee answered with media the node cannot use: hang it up and
                        // try the next target.
                        let reason = format!("callee's SDP: {error}");
                        tracing::info!(attempt = self.attempts, %reason, "answered attempt unusable");
                        if let Some(b_tx) = self.b_tx.take() {
                            self.send_bye(&mut b_dialog, &b_tx, &[HangupReason::incompatible(&reason).header()]);
                        }
                        self.b_rx = None;
                        self.ctx.endpoint.unregister_dialog(&b_dialog.call_id, &b_dialog.local_tag);
                        self.write_cdr(&record, Utc::now(), 488, &reason, Ender::System);
                        last = (488, reason);
                        continue;
                    }
                    return self.connected(b_dialog, answer, record, a_rx).await;
                }
                AttemptEnd::Cancelled if self.ctx.drain.is_ending() => {
                    // The node stops: the carrier may retry the call elsewhere.
                    return self.refuse_caller(503, crate::drain::NODE_SHUTDOWN.into(), Some(record));
                }
                AttemptEnd::Cancelled => {
                    self.respond_a(487, "Request Terminated", None);
                    return Outcome {
                        code: 487,
                        reason: "caller cancelled".into(),
                        hangup_by: Ender::Caller,
                        attempt: Some(record),
                    };
                }
                AttemptEnd::Failed { code, reason, failover } => {
                    tracing::info!(attempt = self.attempts, code, %reason, failover, "attempt failed");
                    if !failover {
                        return self.refuse_caller(code, reason, Some(record));
                    }
                    self.write_cdr(&record, Utc::now(), code, &reason, Ender::System);
                    last = (code, reason);
                }
            }
        }
        let code = match last.0 {
            408 => 408,
            code if (500..600).contains(&code) => 503,
            code => code,
        };
        self.refuse_caller(code, last.1, None)
    }
    /// Every place to try, in order (see [`targets`]).
    async fn targets(&self, target: Target) -> Vec<AttemptTarget> {
        targets(&self.ctx, target).await
    }

    /// Builds the outbound INVITE for `target`.
    fn outbound_invite(
        &self,
        target: &AttemptTarget,
        call_id: &str,
        tag: &str,
        cseq: u32,
        offer: Option<&[u8]>,
    ) -> Request {
        let endpoint = &self.ctx.endpoint;
        let (host, port) = endpoint.transport().sent_by(target.peer.addr);
        let caller = self.caller_id(target);
        let uri_host = target.uri.host_with_port.to_string();
        let mut headers: Vec<Header> = vec![
            endpoint.via_for(target.peer),
            Header::MaxForwards(headers::MaxForwards::from(message::max_forwards(&self.invite).saturating_sub(1))),
            Header::From(headers::From::new(format!("<sip:{caller}@{host}:{port}>;tag={tag}"))),
            Header::To(headers::To::new(format!("<sip:{}@{uri_host}>", target.to_user))),
            Header::CallId(headers::CallId::new(call_id.to_string())),
            Header::CSeq(headers::CSeq::new(format!("{cseq} INVITE"))),
            Header::Contact(headers::Contact::new(endpoint.contact_for(target.peer, &caller))),
            Header::Allow(ALLOW.into()),
            Header::UserAgent("switchboard".into()),
        ];
        // The node PRACKs the callee's reliable provisional responses itself (RFC 3262) and
        // runs the leg's session timer itself (RFC 4028), so it offers both whatever the
        // caller said; of the caller's other extensions, those the node passes end to end.
        let timer = UacOffer::new(&self.ctx.session_timers);
        let mut supported = vec![reliable::OPTION_TAG.to_string(), session_timer::OPTION_TAG.to_string()];
        if let Some(value) = message::header_value(&self.invite.headers, "Supported") {
            supported.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|option| {
                        !option.is_empty() && !matches!(option.to_ascii_lowercase().as_str(), "100rel" | "timer")
                    })
                    .map(str::to_string),
            );
        }
        headers.push(Header::Supported(supported.join(", ").into()));
        // Session-Expires and Min-SE (its Supported: timer is in the list above).
        headers.extend(timer.request_headers().into_iter().filter(|h| !matches!(h, Header::Supported(_))));
        let mut request = Request {
            method: Method::Invite,
            uri: target.uri.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: vec![],
        };
        match offer {
            Some(offer) => {
                message::set_body(&mut request.headers, &mut request.body, offer.to_vec(), Some("application/sdp"))
            }
            None => {
                let ct = content_type(&self.invite.headers);
                message::set_body(
                    &mut request.headers,
                    &mut request.body,
                    self.invite.body.clone(),
                    if self.invite.body.is_empty() { None } else { ct.as_deref() },
                );
            }
        }
        request
    }

    /// The caller ID presented on the outbound leg: the caller's number as it came in.
    fn caller_id(&self, _target: &AttemptTarget) -> String {
        if self.facts.from.is_empty() { "anonymous".into() } else { self.facts.from.clone() }
    }

    async fn attempt(
        &mut self,
        target: &AttemptTarget,
        record: &mut AttemptRecord,
        a_rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    ) -> AttemptEnd {
        let call_id = format!("{}-b{}", uuid::Uuid::new_v4().simple(), self.attempts);
        let tag = new_tag();
        let offer = self.anchor.as_mut().map(|anchor| anchor.offer_for(target.trunk.as_deref()));
        let invite = self.outbound_invite(target, &call_id, &tag, 1, offer.as_deref());
        let setup = InviteSetup {
            peer: target.peer,
            tag,
            credential: target.trunk.as_ref().and_then(|t| self.snapshot.credential(&t.namespace, &t.name)).cloned(),
            no_response: failover_timeout(target.trunk.as_deref()),
            ring_limit: RING_TIMEOUT,
            gateway: target.gateway.clone(),
            contact_user: self.caller_id(target),
            session: Some(UacOffer::new(&self.ctx.session_timers)),
        };
        let ctx = Arc::clone(&self.ctx);
        let mut client = InviteClient::send(&ctx, invite, setup);
        loop {
            let wake_at = self.reliable.as_ref().and_then(ReliableSender::poll_timeout).map(Instant::from_std);
            match client.next_until(Some(&mut *a_rx), wake_at).await {
                InviteEvent::CallerPrack { request, key } => self.caller_prack(&request, &key),
                InviteEvent::Wake => {
                    if self.reliable_timeout() {
                        // 64*T1 without the caller's PRACK (RFC 3262 section 3): the INVITE
                        // fails; the ringing callee is cancelled.
                        client.cancel();
                        return AttemptEnd::Failed {
                            code: 504,
                            reason: "the caller never acknowledged the reliable provisional response".into(),
                            failover: false,
                        };
                    }
                }
                InviteEvent::Provisional(response) => {
                    if record.ring_at.is_none() {
                        record.ring_at = Some(Utc::now());
                        self.ring_at.get_or_insert(Utc::now());
                    }
                    self.relay_provisional(&response);
                }
                InviteEvent::Answered(answered) => {
                    // The dialog's channel stays registered: in-dialog requests from the
                    // callee keep arriving on b_rx after this function returns.
                    self.session_b =
                        client.session_offer().map(|offer| session::callee_timer(offer, &answered.1.headers));
                    let (b_tx, b_rx) = client.into_channel();
                    self.b_tx = Some(b_tx);
                    self.b_rx = b_rx;
                    return AttemptEnd::Answered(answered);
                }
                InviteEvent::Failed { code, reason, failover } => return AttemptEnd::Failed { code, reason, failover },
                InviteEvent::Cancelled => return AttemptEnd::Cancelled,
            }
        }
    }

    /// Passes a provisional response to the caller; with anchored media its early SDP becomes
    /// the node's answer to the caller and the relay starts (ringback from the carrier).
    fn relay_provisional(&mut self, response: &Response) {
        let code = message::status(response);
        let mut relayed = response_to(&self.invite, code, None, Some(&self.a_tag));
        relayed.headers.push(Header::Contact(headers::Contact::new(self.ctx.endpoint.contact_for(self.a_peer, ""))));
        if let Some(anchor) = self.anchor.as_mut() {
            if !response.body.is_empty() {
                match anchor.callee_answered(&response.body) {
                    Ok(()) => {
                        if let Some(body) = anchor.caller_answer() {
                            message::set_body(&mut relayed.headers, &mut relayed.body, body, Some("application/sdp"));
                        }
                    }
                    Err(error) => tracing::info!(%error, "early media SDP unusable; provisional passed without it"),
                }
            }
        } else if !response.body.is_empty() {
            let ct = content_type(&response.headers);
            message::set_body(&mut relayed.headers, &mut relayed.body, response.body.clone(), ct.as_deref());
        }
        let Some(reliable) = self.reliable.as_mut() else {
            self.ctx.endpoint.respond(&self.key, relayed);
            return;
        };
        if !self.early_dialog {
            // The caller's PRACKs come in its early dialog.
            self.ctx.endpoint.register_dialog(&self.facts.call_id, &self.a_tag, self.a_tx.clone());
            self.early_dialog = true;
        }
        for action in reliable.send(relayed, std::time::Instant::now()) {
            self.reliable_action(action);
        }
    }

    /// A PRACK from the caller: 200 when its RAck names the outstanding reliable provisional
    /// response (the next queued one then goes out), 481 otherwise (RFC 3262 section 3).
    fn caller_prack(&mut self, prack: &Request, key: &TransactionKey) {
        let Some(reliable) = self.reliable.as_mut() else {
            self.ctx.endpoint.respond(key, response_to(prack, 481, None, None));
            return;
        };
        match reliable.on_prack(&prack.headers, std::time::Instant::now()) {
            Ok(actions) => {
                self.ctx.endpoint.respond(key, response_to(prack, 200, Some("OK"), None));
                for action in actions {
                    self.reliable_action(action);
                }
            }
            Err(error) => {
                tracing::info!(%error, "caller's PRACK refused");
                self.ctx.endpoint.respond(key, response_to(prack, error.prack_status(), None, None));
            }
        }
    }

    /// The reliable provisional retransmission timer fired; `true` when the node gave up.
    fn reliable_timeout(&mut self) -> bool {
        let Some(reliable) = self.reliable.as_mut() else { return false };
        let mut gave_up = false;
        for action in reliable.handle_timeout(std::time::Instant::now()) {
            gave_up |= action == ReliableAction::GiveUp;
            self.reliable_action(action);
        }
        gave_up
    }

    fn reliable_action(&self, action: ReliableAction) {
        match action {
            ReliableAction::Send(response) => self.ctx.endpoint.respond(&self.key, response),
            ReliableAction::GiveUp => tracing::info!("no PRACK from the caller within 64*T1"),
        }
    }

    /// Applies the callee's answer to the anchored media (its 2xx SDP, else the early SDP).
    fn anchor_answer(&mut self, answer: &Response) -> Result<(), crate::media::sdp::SdpError> {
        let Some(anchor) = self.anchor.as_mut() else { return Ok(()) };
        if !answer.body.is_empty() {
            anchor.callee_answered(&answer.body)
        } else if anchor.caller_final_body().is_some() {
            Ok(())
        } else {
            Err(crate::media::sdp::SdpError::NoAudio)
        }
    }

    /// Sends BYE on a leg with the `Reason` header(s) saying why (RFC 3326).
    pub(super) fn send_bye(&self, dialog: &mut Dialog, tx: &mpsc::UnboundedSender<TuEvent>, reason: &[Header]) {
        let bye = dialog.bye(self.ctx.endpoint.via_for(dialog.peer), reason);
        self.ctx.endpoint.send_request(bye, dialog.peer, tx.clone());
    }
}

/// Every place to try, in order: each gateway address of each trunk, or the SIP URI's
/// addresses.
pub(super) async fn targets(ctx: &NodeContext, target: Target) -> Vec<AttemptTarget> {
    let mut out = Vec::new();
    match target {
        Target::SipUri(uri) => {
            let Ok(uri) = rsip::Uri::try_from(uri.as_str()) else { return out };
            let protocol = match (&uri.scheme, uri.transport()) {
                (Some(rsip::Scheme::Sips), _) | (_, Some(rsip::Transport::Tls)) => Some(Protocol::Tls),
                (_, Some(rsip::Transport::Tcp)) => Some(Protocol::Tcp),
                (_, None | Some(rsip::Transport::Udp)) => Some(Protocol::Udp),
                (_, Some(_)) => None,
            };
            let Some(protocol) = protocol else {
                tracing::warn!(%uri, "{}", routing::TLS_UNSUPPORTED);
                return out;
            };
            let host = uri.host().to_string();
            let port = uri.port().map(|p| *p.value());
            if let Ok(addrs) = ctx.resolver.resolve(&host, port, protocol).await {
                let to_user = uri.user().unwrap_or_default().to_string();
                for addr in addrs {
                    out.push(AttemptTarget {
                        uri: uri.clone(),
                        to_user: to_user.clone(),
                        peer: Peer { protocol, addr },
                        trunk: None,
                        gateway: addr.to_string(),
                    });
                }
            }
        }
        Target::Number { number, trunks } => {
            for trunk in trunks {
                let user = routing::format_for_trunk(&trunk, &number);
                for gateway in routing::gateway_order(&trunk) {
                    let Some(protocol) = routing::signaling_protocol(gateway.transport) else {
                        tracing::warn!(gateway = %gateway.address, "{}", routing::TLS_UNSUPPORTED);
                        continue;
                    };
                    let Ok(addrs) = ctx.resolver.resolve(&gateway.address, gateway.port, protocol).await else {
                        tracing::warn!(gateway = %gateway.address, "gateway does not resolve");
                        continue;
                    };
                    let host = match gateway.port {
                        Some(port) => format!("{}:{port}", gateway.address),
                        None => gateway.address.clone(),
                    };
                    let Ok(uri) = rsip::Uri::try_from(format!("sip:{user}@{host}").as_str()) else { continue };
                    for addr in addrs {
                        out.push(AttemptTarget {
                            uri: uri.clone(),
                            to_user: user.clone(),
                            peer: Peer { protocol, addr },
                            trunk: Some(Arc::clone(&trunk)),
                            gateway: host.clone(),
                        });
                    }
                }
            }
        }
        Target::WebSocket(_) | Target::Reject(_) => {}
    }
    out
}
