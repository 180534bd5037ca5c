//! Placing the leg a REFER asks for (issue 24 item 2; the connected machine's side is
//! `sip/connected/refer.rs`). One task per B2BUA call with anchored media takes the machine's
//! [`PlaceLeg`] jobs:
//!
//! - **No open relay**: the `Refer-To` target's number must be allowed by an outbound
//!   RoutingRule of the call's namespace (the same rule an outbound call to it would use);
//!   otherwise the REFER is refused with 403. The URI's host is never dialled: the number goes
//!   through the rule's trunks, like any outbound call.
//! - **Normal outbound routing**: every gateway of every trunk in order, trunk limits (a trunk
//!   at its limit is skipped), failover on the failover codes, a CDR for each failed attempt;
//!   the answered leg's permit is held until the call ends.
//! - Its first ringing (180 or 183) goes back to the machine as [`ReferralUpdate::Ringing`]
//!   (a NOTIFY `SIP/2.0 180 Ringing` to the referrer); the new leg's dialog, answer and
//!   channel as [`ReferralUpdate::Answered`]; its CDR is written when the call ends
//!   ([`ReferralLog`]).
//!
//! The task ends with the call (its channels close); a leg still ringing then is cancelled.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request};
use switchboard_model::TrunkConfig;
use tokio::sync::mpsc;

use super::attempts::{AttemptTarget, targets};
use super::record::{AttemptEnding, AttemptRecord, Ender};
use super::{ALLOW, CallFacts, RING_TIMEOUT, session};
use crate::config::Snapshot;
use crate::sip::connected::{Leg, LegSetup, NewLeg, PlaceLeg, ReferralUpdate, Referrals};
use crate::sip::context::NodeContext;
use crate::sip::control::refer::{ReferTo, Replaces};
use crate::sip::control::session_timer::UacOffer;
use crate::sip::invite_client::{InviteClient, InviteEvent, InviteSetup, failover_timeout};
use crate::sip::limits::CallPermit;
use crate::sip::message;
use crate::sip::routing::{self, Target};
use crate::sip::transaction::new_tag;
use crate::sip::transport::{Peer, Protocol};

/// What the call needs to know afterwards about the legs its referrals placed.
#[derive(Default)]
pub(super) struct ReferralLog {
    /// The attempt number of the next outbound INVITE (CDRs are numbered per call).
    next_attempt: u32,
    /// The answered referred legs, in order.
    pub(super) transfers: Vec<Transfer>,
    /// The answered legs' trunk permits, held until the call ends.
    permits: Vec<CallPermit>,
}

/// One answered referred leg.
pub(super) struct Transfer {
    /// The leg it replaced.
    pub(super) leg: Leg,
    pub(super) record: AttemptRecord,
    /// When it answered (the end of the replaced leg).
    pub(super) at: DateTime<Utc>,
}

/// What the referral task works with.
pub(super) struct ReferralContext {
    pub(super) ctx: Arc<NodeContext>,
    pub(super) snapshot: Arc<Snapshot>,
    pub(super) facts: CallFacts,
    /// The attempts the call made before (the referred legs' CDRs count on from there).
    pub(super) attempts: u32,
}

/// Starts the call's referral task: the machine's channels and the shared log.
pub(super) fn start(context: ReferralContext) -> (Referrals, Arc<Mutex<ReferralLog>>) {
    let (jobs_tx, jobs) = mpsc::unbounded_channel();
    let (updates, updates_rx) = mpsc::unbounded_channel();
    let log = Arc::new(Mutex::new(ReferralLog { next_attempt: context.attempts + 1, ..ReferralLog::default() }));
    tokio::spawn(run(context, jobs, updates, Arc::clone(&log)));
    (Referrals { jobs: jobs_tx, updates: updates_rx }, log)
}

async fn run(
    context: ReferralContext,
    mut jobs: mpsc::UnboundedReceiver<PlaceLeg>,
    updates: mpsc::UnboundedSender<ReferralUpdate>,
    log: Arc<Mutex<ReferralLog>>,
) {
    while let Some(job) = jobs.recv().await {
        let targets = match local_replaces(&context.ctx, &job.target).await {
            Some(target) => vec![target],
            None => {
                let namespace = context.facts.inbound_trunk.as_ref().map_or("default", |t| t.namespace.as_str());
                let (number, trunks) = match allowed_target(&context.snapshot, namespace, &job.target) {
                    Ok(routed) => routed,
                    Err(reason) => {
                        let _ = updates.send(ReferralUpdate::Refused { code: 403, reason });
                        continue;
                    }
                };
                targets(&context.ctx, Target::Number { number, trunks }).await
            }
        };
        if targets.is_empty() {
            let reason = "no reachable gateway for the referred number".to_string();
            let _ = updates.send(ReferralUpdate::Refused { code: 503, reason });
            continue;
        }
        if updates.send(ReferralUpdate::Accepted).is_err() {
            return;
        }
        let update = place(&context, &job, targets, &updates, &log).await;
        if updates.send(update).is_err() {
            return;
        }
    }
}

/// An attended transfer between two calls of this node: the `Replaces` names a dialog the
/// node holds, so the new leg is an INVITE to the node itself (a hairpin over its own UDP
/// socket), which the inbound side hands to the call holding that dialog without admission
/// ([`is_own`]). No routing check: the target is on this node already.
async fn local_replaces(ctx: &NodeContext, target: &ReferTo) -> Option<AttemptTarget> {
    let replaces = target.replaces.as_ref()?;
    if !ctx.endpoint.has_dialog(&replaces.call_id, &replaces.to_tag).await {
        return None;
    }
    let own = own_address(ctx);
    let user = target.user.clone().unwrap_or_else(|| "transfer".into());
    let uri = rsip::Uri::try_from(format!("sip:{user}@{own}").as_str()).ok()?;
    tracing::info!(call_id = %replaces.call_id, "attended transfer to a dialog of this node: hairpin");
    Some(AttemptTarget {
        uri,
        to_user: user,
        peer: Peer { protocol: Protocol::Udp, addr: own },
        trunk: None,
        gateway: own.to_string(),
    })
}

/// The node's own UDP address (loopback for a wildcard listener).
fn own_address(ctx: &NodeContext) -> SocketAddr {
    let local = ctx.endpoint.transport().local_addr();
    match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), local.port()),
        _ => local,
    }
}

/// Whether a request came from the node itself (a hairpin INVITE of [`local_replaces`]).
pub(super) fn is_own(ctx: &NodeContext, peer: Peer) -> bool {
    peer.protocol == Protocol::Udp && peer.addr == own_address(ctx)
}

/// The E.164 number of a REFER target and the trunks an outbound RoutingRule sends it to, or
/// why the node does not place it (the REFER gets 403).
fn allowed_target(
    snapshot: &Snapshot,
    namespace: &str,
    target: &ReferTo,
) -> Result<(String, Vec<Arc<TrunkConfig>>), String> {
    let user = target.user.as_deref().ok_or_else(|| format!("Refer-To {} names no number", target.uri))?;
    let number = message::normalize_number(user).ok_or_else(|| format!("Refer-To user {user:?} is not a number"))?;
    let trunks = routing::outbound_trunks(snapshot, namespace, &number, None);
    if trunks.is_empty() {
        return Err(format!("no outbound RoutingRule allows {number}"));
    }
    Ok((number, trunks))
}

/// Tries the targets in order until one answers; writes a CDR for each failed attempt.
async fn place(
    context: &ReferralContext,
    job: &PlaceLeg,
    targets: Vec<AttemptTarget>,
    updates: &mpsc::UnboundedSender<ReferralUpdate>,
    log: &Mutex<ReferralLog>,
) -> ReferralUpdate {
    let ctx = &context.ctx;
    let mut last = (503u16, "all targets of the referred number failed".to_string());
    let mut slot: Option<(Arc<TrunkConfig>, CallPermit)> = None;
    for target in targets {
        if let Some(trunk) = &target.trunk
            && slot.as_ref().is_none_or(|(held, _)| !Arc::ptr_eq(held, trunk))
        {
            slot = None;
            match ctx.limits.acquire(trunk).await {
                Ok(permit) => slot = Some((Arc::clone(trunk), permit)),
                Err(limit) => {
                    last = (503, limit.reason());
                    continue;
                }
            }
        }
        let number = {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.next_attempt += 1;
            log.next_attempt - 1
        };
        let mut record = AttemptRecord {
            number,
            trunk: target.trunk.clone(),
            gateway: Some(target.gateway.clone()),
            setup_at: Utc::now(),
            ring_at: None,
            answer_at: None,
        };
        tracing::info!(attempt = number, gateway = %target.gateway, "referred leg attempt");
        let tag = new_tag();
        let call_id = format!("{}-r{number}", uuid::Uuid::new_v4().simple());
        let caller = caller_id(&context.facts, job.from);
        let timer = UacOffer::new(&ctx.session_timers);
        let invite = InviteParts { target: &target, call_id: &call_id, tag: &tag, caller: &caller, timer: &timer }
            .build(ctx, &job.offer, job.target.replaces.as_ref());
        let setup = InviteSetup {
            peer: target.peer,
            tag,
            credential: target.trunk.as_ref().and_then(|t| context.snapshot.credential(&t.namespace, &t.name)).cloned(),
            no_response: failover_timeout(target.trunk.as_deref()),
            ring_limit: RING_TIMEOUT,
            gateway: target.gateway.clone(),
            contact_user: caller.clone(),
            session: Some(timer),
        };
        let mut client = InviteClient::send(ctx, invite, setup);
        let ended = loop {
            let event = tokio::select! {
                event = client.next(None) => Some(event),
                () = updates.closed() => None,
            };
            let Some(event) = event else {
                // The call ended while the referred party rang.
                client.cancel();
                return ReferralUpdate::Failed { code: 487, reason: "the call ended".into() };
            };
            match event {
                InviteEvent::Provisional(response) => {
                    record.ring_at.get_or_insert_with(Utc::now);
                    // The referrer hears that the target rings (the machine tells it once).
                    let code = message::status(&response);
                    if (180..200).contains(&code) {
                        let _ = updates.send(ReferralUpdate::Ringing { code });
                    }
                }
                InviteEvent::Answered(answered) => {
                    let (dialog, response) = *answered;
                    let session = client.session_offer().map(|offer| session::callee_timer(offer, &response.headers));
                    let (tx, rx) = client.into_channel();
                    let Some(rx) = rx else {
                        break (500, "the referred leg's channel is gone".to_string(), false);
                    };
                    let now = Utc::now();
                    record.answer_at = Some(now);
                    let peer = dialog.peer;
                    let setup = LegSetup {
                        sent_by: ctx.endpoint.transport().sent_by(peer.addr),
                        contact: ctx.endpoint.contact_for(peer, ""),
                        dialog,
                        session,
                    };
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.transfers.push(Transfer { leg: job.from, record, at: now });
                    if let Some((_, permit)) = slot.take() {
                        log.permits.push(permit);
                    }
                    return ReferralUpdate::Answered(Box::new(NewLeg {
                        setup,
                        answer: response.body,
                        channel: Some((tx, rx)),
                    }));
                }
                InviteEvent::Failed { code, reason, failover } => break (code, reason, failover),
                InviteEvent::Cancelled => break (487, "the node is stopping".to_string(), false),
                InviteEvent::CallerPrack { .. } | InviteEvent::Wake => {}
            }
        };
        let (code, reason, failover) = ended;
        tracing::info!(attempt = number, code, %reason, failover, "referred leg attempt failed");
        let ending = AttemptEnding { end_at: Utc::now(), code, reason: &reason, ender: Ender::System };
        context.facts.write_cdr(&ctx.store, &record, ending);
        last = (code, reason);
        if !failover {
            break;
        }
    }
    ReferralUpdate::Failed { code: last.0, reason: last.1 }
}

/// The caller ID of a referred leg: the number of the party it is bridged to (the one that
/// stays), as the call knows it.
fn caller_id(facts: &CallFacts, replaced: Leg) -> String {
    let staying = if replaced == Leg::B { &facts.from } else { &facts.to };
    if staying.is_empty() { "anonymous".into() } else { staying.clone() }
}

/// The parts of a referred leg's INVITE.
struct InviteParts<'p> {
    target: &'p AttemptTarget,
    call_id: &'p str,
    tag: &'p str,
    caller: &'p str,
    timer: &'p UacOffer,
}

impl InviteParts<'_> {
    /// The INVITE: the node's offer, its session timer, and the `Replaces` of an attended
    /// transfer (RFC 3891) so that the target replaces the dialog it names.
    fn build(&self, ctx: &NodeContext, offer: &[u8], replaces: Option<&Replaces>) -> Request {
        let endpoint = &ctx.endpoint;
        let peer = self.target.peer;
        let (host, port) = endpoint.transport().sent_by(peer.addr);
        let uri_host = self.target.uri.host_with_port.to_string();
        let mut headers: Vec<Header> = vec![
            endpoint.via_for(peer),
            Header::MaxForwards(headers::MaxForwards::from(70u32)),
            Header::From(headers::From::new(format!("<sip:{}@{host}:{port}>;tag={}", self.caller, self.tag))),
            Header::To(headers::To::new(format!("<sip:{}@{uri_host}>", self.target.to_user))),
            Header::CallId(headers::CallId::new(self.call_id.to_string())),
            Header::CSeq(headers::CSeq::new("1 INVITE")),
            Header::Contact(headers::Contact::new(endpoint.contact_for(peer, self.caller))),
            Header::Allow(ALLOW.into()),
            Header::UserAgent("switchboard".into()),
        ];
        // Session-Expires, Min-SE and Supported: timer.
        headers.extend(self.timer.request_headers());
        if let Some(replaces) = replaces {
            headers.push(Header::Other("Replaces".into(), replaces.header_value()));
        }
        let mut request = Request {
            method: Method::Invite,
            uri: self.target.uri.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: vec![],
        };
        message::set_body(&mut request.headers, &mut request.body, offer.to_vec(), Some("application/sdp"));
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::routing::tests::trunk;
    use switchboard_model::{Direction, MatchSpec, RuleConfig, TrunkSelection};

    fn snapshot(patterns: &[&str]) -> Snapshot {
        let rule = RuleConfig {
            namespace: "ns".into(),
            name: "out".into(),
            direction: Direction::Outbound,
            priority: 1,
            match_spec: MatchSpec {
                destination_patterns: patterns.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            },
            destination: None,
            trunks: vec!["carrier".into()],
            trunk_selection: TrunkSelection::Ordered,
            status_callback: None,
        };
        Snapshot::from_parts(1, vec![trunk("carrier")], vec![], vec![rule], vec![]).unwrap()
    }

    #[test]
    fn only_numbers_an_outbound_rule_allows_are_referred_to() {
        let snapshot = snapshot(&[r"^\+1555"]);
        let allowed = ReferTo::parse("<sip:+15550003333@anywhere.example>").unwrap();
        let (number, trunks) = allowed_target(&snapshot, "ns", &allowed).unwrap();
        assert_eq!((number.as_str(), trunks[0].name.as_str()), ("+15550003333", "carrier"));
        let tel = ReferTo::parse("<tel:+15550004444>").unwrap();
        assert!(allowed_target(&snapshot, "ns", &tel).is_ok());
        for refused in ["<sip:+19009999999@h>", "<sip:h.example>", "<sip:alice@h.example>"] {
            let target = ReferTo::parse(refused).unwrap();
            assert!(allowed_target(&snapshot, "ns", &target).is_err(), "{refused}");
        }
        assert!(allowed_target(&snapshot, "other-namespace", &allowed).is_err(), "rules are per namespace");
    }
}
