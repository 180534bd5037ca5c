//! A call bridged to an AI agent, connected: its machine runs until the call ends, and between
//! its events the call takes transfer requests (see the module doc of `sip::transfer`).
//!
//! "The caller" here is the party the agent talks to: the caller of an inbound call (leg A of
//! its machine) or the callee of a call placed through the API (leg B of its machine). Either
//! way, once transferred, that party is the caller of the transferred call (leg A of the new
//! machine, the human leg B), so the transfer's CDRs read the same for both.

use std::sync::Arc;

use chrono::Utc;
use rsip::headers::Header;
use switchboard_model::egress::EgressPolicy;
use switchboard_model::{TransferMode, TrunkConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::dial::{Answered, DialPlan, Dialed, dial, write_cdr};
use super::media::{LegFacts, LegSide, TransferMedia};
use super::refer::{ReferCall, Referred};
use super::ringing::Ringing;
use super::target::{self, Route, RouteError};
use super::warm::{Consult, Consulted};
use super::{Command, DEFAULT_TIMEOUT, Intent, Mode, TransferEvent, TransferRequest};
use crate::bridge::{BridgeEnd, BridgeHandle};
use crate::media::relay::{RelayConfig, RelayEvent, RelayHandle, RtpLegSetup};
use crate::media::srtp::SrtpPolicy;
use crate::sip::connected::{
    Action, AgentSession, Channels, Connected, Driven, Ender, Ending, Event, Io, Leg, LegChannels, LegSetup, MediaMode,
    Resume, Setup, drive, drive_until,
};
use crate::sip::context::NodeContext;
use crate::sip::endpoint::{TuEvent, TuSender};
use crate::sip::message::HangupReason;
use crate::sip::routing;
use crate::sip::transport::Peer;
use crate::store::HangupBy;
use crate::webhook::CallHooks;

/// The caller's side of the call, as a transfer needs it.
pub(crate) struct CallerFacts {
    pub(crate) call_uuid: Uuid,
    /// The caller's SIP Call-ID: the agent's `callSid`.
    pub(crate) call_sid: String,
    /// The caller's number (the target sees it unless the request names a `caller_id`).
    pub(crate) from: String,
    /// The trunk the call came in on: its namespace's outbound rules route the target, and it
    /// is the route when none matches.
    pub(crate) trunk: Option<Arc<TrunkConfig>>,
    /// The node's SDP answer to the caller.
    pub(crate) answer_sdp: Vec<u8>,
    /// The number the caller dialled (a REFER names it as the referrer).
    pub(crate) did: String,
    /// The CDR attempt number of the caller's leg to the agent (the transfer's attempts count
    /// on from the next one): 1 for an inbound call, the answered attempt's for an API call.
    pub(crate) attempt: u32,
    /// When the call must end at the latest (an API call's maximum duration), kept by the
    /// transferred call.
    pub(crate) deadline: Option<tokio::time::Instant>,
}

/// The caller's SIP leg: which leg of the agent call's machine it is, and its channels.
pub(crate) struct CallerLeg<'a> {
    /// [`Leg::A`] for an inbound caller, [`Leg::B`] for the callee of an API-placed call.
    pub(crate) leg: Leg,
    pub(crate) peer: Peer,
    pub(crate) tx: TuSender,
    pub(crate) rx: &'a mut mpsc::UnboundedReceiver<TuEvent>,
}

/// A machine's leg channels with `channels` in the caller's slot (`leg`) and nothing in the
/// other.
pub(super) fn caller_slots<'c>(
    leg: Leg,
    channels: LegChannels<'c>,
) -> (Option<LegChannels<'c>>, Option<LegChannels<'c>>) {
    match leg {
        Leg::A => (Some(channels), None),
        Leg::B => (None, Some(channels)),
    }
}

/// An answered call to an AI agent, as `sip::call::agent` hands it over.
pub(crate) struct AgentCall<'a, 'm> {
    pub(crate) ctx: &'a Arc<NodeContext>,
    pub(crate) machine: Connected<'m>,
    pub(crate) first: Vec<Action>,
    pub(crate) leg: CallerLeg<'a>,
    pub(crate) relay_events: mpsc::Receiver<RelayEvent>,
    pub(crate) agent: &'a mut BridgeHandle,
    /// The CDR text of the agent session's end.
    pub(crate) agent_reason: fn(&BridgeEnd) -> String,
    /// The caller's leg of the bridge (released to the target's relay on a transfer).
    pub(crate) relay: &'a RelayHandle,
    pub(crate) caller: CallerFacts,
}

/// How the call ended, and the caller's dialog to unregister (Call-ID, local tag).
pub(crate) struct AgentCallEnd {
    pub(crate) ending: Ending,
    pub(crate) dialog: Option<(String, String)>,
}

/// Runs the connected call until it ends, carrying out the transfers asked for meanwhile.
pub(crate) async fn run_agent_call(call: AgentCall<'_, '_>) -> AgentCallEnd {
    let AgentCall { ctx, mut machine, first, leg, relay_events, agent, agent_reason, relay, caller } = call;
    let CallerLeg { leg: caller_leg, peer: a_peer, tx: a_tx, rx: a_rx } = leg;
    let io = Io { endpoint: &ctx.endpoint, metrics: &ctx.metrics, drain: &ctx.drain };
    let dialog = machine.dialog(caller_leg).map(|d| (d.call_id.clone(), d.local_tag.clone()));
    let end = |ending| AgentCallEnd { ending, dialog: dialog.clone() };
    let mut registration = ctx.transfers.register(&caller.call_sid);
    let mut resume = Resume { actions: first, relay_events: Some(relay_events) };
    // The caller's leg to the agent has its CDR attempt; transfer attempts count on from there.
    let mut next_attempt = caller.attempt + 1;
    // The caller's leg's relay handle after a warm transfer was called off (the bridge then
    // holds a new leg for the caller; `relay` is the first one's).
    let mut caller_relay: Option<RelayHandle> = None;
    loop {
        macro_rules! channels {
            ($events:expr) => {{
                let (a, b) = caller_slots(caller_leg, LegChannels { peer: a_peer, tx: a_tx.clone(), rx: &mut *a_rx });
                Channels {
                    a,
                    b,
                    relay_events: $events,
                    agent: Some(AgentSession { handle: &mut *agent, reason: agent_reason }),
                    referrals: None,
                }
            }};
        }
        let (command, resumed) =
            match drive_until(&mut machine, resume.actions, &io, channels!(resume.relay_events), registration.next())
                .await
            {
                Driven::Ended(ending) => return end(ending),
                Driven::Interrupted(Some(command), resumed) => (command, resumed),
                // The registry holds the sender while the call is registered: not reached.
                Driven::Interrupted(None, resumed) => {
                    return end(drive(&mut machine, resumed.actions, &io, channels!(resumed.relay_events)).await);
                }
            };
        resume = resumed;
        let Command { id, action, reply, hooks, egress } = command;
        let request = match action {
            Intent::Transfer(request) => request,
            Intent::Complete | Intent::Cancel | Intent::Dtmf(_) => {
                let _ = reply.send(Err("no warm transfer is in progress on this call".into()));
                continue;
            }
        };
        if request.mode == Mode::Refer {
            // A SIP URI is referred to only where the node would dial it itself (no open relay).
            let uri_refused = target::is_uri(&request.to)
                .then(|| plan_route(ctx, &caller, &request, &egress).err().map(|e| e.to_string()))
                .flatten();
            if let Some(why) = uri_refused.or_else(|| refer_allowed(ctx, &caller).err()) {
                let _ = reply.send(Err(why));
                continue;
            }
            let _ = reply.send(Ok(()));
            let report = Reporter { hooks: &hooks, call_sid: &caller.call_sid, id, request: &request };
            let limit = request.timeout_seconds.map_or(DEFAULT_TIMEOUT, |s| std::time::Duration::from_secs(s.into()))
                + super::refer::EXTRA_WAIT;
            let referral = ReferCall {
                io: &io,
                machine: &mut machine,
                leg: CallerLeg { leg: caller_leg, peer: a_peer, tx: a_tx.clone(), rx: &mut *a_rx },
                agent: &mut *agent,
                agent_reason,
                resume,
                to: &request.to,
                limit,
                referred_by: &caller.did,
            };
            match referral.run(&report).await {
                Referred::Ended(ending) => {
                    report.send("transfer_failed", Some(ending.code), Some(format!("call ended: {}", ending.reason)));
                    return end(ending);
                }
                Referred::Transferred(resumed, status) => {
                    report.send("transfer_answered", Some(status), None);
                    report.send("transfer_completed", Some(status), None);
                    let ending = drive(&mut machine, resumed.actions, &io, channels!(resumed.relay_events)).await;
                    return end(ending);
                }
                Referred::Failed(resumed, code, reason) => {
                    tracing::info!(transfer = %id, code, %reason, "REFER transfer failed; the caller stays with the agent");
                    agent.notify(
                        "transfer_failed",
                        serde_json::json!({"transfer": {"id": id.to_string(), "to": request.to, "sipCode": code, "reason": reason}}),
                    );
                    report.send("transfer_failed", Some(code), Some(reason));
                    resume = resumed;
                    continue;
                }
            }
        }
        let route = match plan_route(ctx, &caller, &request, &egress) {
            Ok(route) => route,
            Err(why) => {
                let _ = reply.send(Err(why.to_string()));
                continue;
            }
        };
        let _ = reply.send(Ok(()));
        let report = Reporter { hooks: &hooks, call_sid: &caller.call_sid, id, request: &request };
        report.send("transfer_started", None, None);
        tracing::info!(transfer = %id, to = %request.to, "transfer started");
        let plan = DialPlan {
            route,
            to: request.to.clone(),
            from: request.caller_id.clone().unwrap_or_else(|| caller.from.clone()),
            call_uuid: caller.call_uuid,
            call_id: caller.call_sid.clone(),
            first_attempt: next_attempt,
            ring_limit: request.timeout_seconds.map_or(DEFAULT_TIMEOUT, |s| std::time::Duration::from_secs(s.into())),
            headers: summary_header(&request),
        };
        // With `--transfer-ringback`, a blind transfer's caller hears ringback while it rings.
        let mut ringing = None;
        if request.mode == Mode::Blind && ctx.media.as_ref().is_some_and(|m| m.transfer_ringback) {
            match Ringing::start(ctx, agent).await {
                Ok(started) => ringing = Some(started),
                Err(why) => tracing::warn!(transfer = %id, %why, "no ringback: the caller stays with the agent"),
            }
        }
        let cancel = CancellationToken::new();
        let mut task = tokio::spawn(dial(Arc::clone(ctx), plan.clone(), cancel.clone()));
        let dialed = async {
            (&mut task).await.unwrap_or_else(|error| Dialed::Failed {
                code: 500,
                reason: format!("transfer task failed: {error}"),
                attempts: 0,
            })
        };
        match drive_until(&mut machine, resume.actions, &io, channels!(resume.relay_events), dialed).await {
            Driven::Ended(ending) => {
                // The caller (or the node) ended the call while the target was being dialled.
                cancel.cancel();
                if let Ok(Dialed::Answered(mut target)) = task.await {
                    hang_up_target(ctx, &plan, &mut target, "caller hung up during the transfer");
                }
                report.send("transfer_failed", Some(ending.code), Some(format!("call ended: {}", ending.reason)));
                return end(ending);
            }
            Driven::Interrupted(Dialed::Failed { code, reason, attempts }, mut resumed) => {
                next_attempt += attempts;
                if let Some(ringing) = ringing.take()
                    && let Some((relay, events)) = ringing.back(agent).await
                {
                    caller_relay = Some(relay);
                    resumed.relay_events = Some(events);
                }
                tracing::info!(transfer = %id, code, %reason, "transfer failed; the caller stays with the agent");
                agent.notify(
                    "transfer_failed",
                    serde_json::json!({"transfer": {"id": id.to_string(), "to": request.to, "sipCode": code, "reason": reason}}),
                );
                report.send("transfer_failed", Some(code), Some(reason));
                resume = resumed;
            }
            Driven::Interrupted(Dialed::Answered(mut target), resumed) => {
                report.send("transfer_answered", Some(200), None);
                let transfer = Transfer { ctx, io: &io, plan: &plan, report: &report };
                let caller_media = if request.mode == Mode::Warm {
                    let consult = Consult {
                        transfer: &transfer,
                        machine: &mut machine,
                        leg: caller_leg,
                        a: LegChannels { peer: a_peer, tx: a_tx.clone(), rx: &mut *a_rx },
                        agent: &mut *agent,
                        agent_reason,
                        registration: &mut registration,
                        resume: resumed,
                        id,
                    };
                    match consult.run(&mut target).await {
                        Consulted::Ended(ending) => return end(ending),
                        Consulted::Lost(mut resumed, ending) => {
                            resumed.actions.extend(machine.on_event(Event::AgentEnded { reason: ending.reason }));
                            let channels = channels!(resumed.relay_events);
                            return end(drive(&mut machine, resumed.actions, &io, channels).await);
                        }
                        Consulted::Complete(caller_media) => Some(caller_media),
                        Consulted::Back(resumed, relay) => {
                            next_attempt = target.attempt.number + 1;
                            resume = resumed;
                            if relay.is_some() {
                                caller_relay = relay;
                            }
                            continue;
                        }
                    }
                } else if let Some(ringing) = ringing.take() {
                    ringing.answered().await
                } else {
                    caller_relay.as_ref().unwrap_or(relay).release().await
                };
                let legs = TransferredLegs {
                    leg: caller_leg,
                    a_peer,
                    a_tx,
                    a_rx,
                    caller_sdp: caller.answer_sdp,
                    caller_trunk: caller.trunk.clone(),
                    deadline: caller.deadline,
                };
                let ending = bridge(&transfer, machine, caller_media, legs, *target).await;
                return end(match caller_leg {
                    Leg::A => ending,
                    Leg::B => as_placed_call(ending),
                });
            }
        }
    }
}

/// Sends a transfer's status webhooks.
pub(super) struct Reporter<'a> {
    hooks: &'a CallHooks,
    call_sid: &'a str,
    pub(super) id: Uuid,
    request: &'a TransferRequest,
}

impl Reporter<'_> {
    pub(super) fn send(&self, status: &'static str, sip_code: Option<u16>, reason: Option<String>) {
        self.hooks.send(&TransferEvent {
            status,
            call_id: self.call_sid,
            transfer_id: self.id.to_string(),
            mode: self.request.mode,
            to: &self.request.to,
            timestamp: Utc::now().to_rfc3339(),
            sip_code,
            reason,
        });
    }
}

/// How a transfer to `request.to` is reached (`target`): a number through the outbound
/// routing of the call's namespace, a SIP URI at a trunk's gateway or on the egress allow-list.
fn plan_route(
    ctx: &NodeContext,
    caller: &CallerFacts,
    request: &TransferRequest,
    egress: &EgressPolicy,
) -> Result<Route, RouteError> {
    if ctx.media.is_none() {
        return Err(RouteError::NoMedia);
    }
    let trunk = caller.trunk.as_ref().ok_or(RouteError::NoTrunk)?;
    target::route(&ctx.snapshot.current(), trunk, &request.to, egress)
}

/// Whether the call's trunk lets a transfer go to its provider as a REFER (`transfer: refer`
/// on the Trunk). The trunk as configured now is asked (an edit applies to calls in progress),
/// the one the call came in on if it was removed since.
fn refer_allowed(ctx: &NodeContext, caller: &CallerFacts) -> Result<(), String> {
    let Some(trunk) = caller.trunk.as_ref() else {
        return Err("the call came in on no trunk: there is no carrier to send a REFER to".into());
    };
    let snapshot = ctx.snapshot.current();
    let mode = snapshot.trunk(&trunk.namespace, &trunk.name).map_or(trunk.transfer, |now| now.transfer);
    match mode {
        TransferMode::Refer => Ok(()),
        TransferMode::None => Err(format!(
            "trunk {}/{} does not take REFER (its spec.transfer is none): set `transfer: refer` on the Trunk, \
             or use mode blind or warm",
            trunk.namespace, trunk.name
        )),
    }
}

/// `X-Transfer-Summary` with the request's summary (control characters dropped: it goes into
/// a header line).
fn summary_header(request: &TransferRequest) -> Vec<Header> {
    let Some(summary) = request.summary.as_deref() else { return vec![] };
    let clean: String = summary.chars().filter(|c| !c.is_control()).take(1024).collect();
    if clean.trim().is_empty() {
        return vec![];
    }
    vec![Header::Other("X-Transfer-Summary".into(), clean.trim().to_string())]
}

/// Hangs up an answered target the call no longer wants, and records its attempt.
pub(super) fn hang_up_target(ctx: &NodeContext, plan: &DialPlan, target: &mut Answered, why: &str) {
    let dialog = &mut target.dialog;
    let bye = dialog.bye(ctx.endpoint.via_for(dialog.peer), &[HangupReason::normal(why).header()]);
    ctx.endpoint.send_request(bye, dialog.peer, target.tx.clone());
    ctx.endpoint.unregister_dialog(&dialog.call_id, &dialog.local_tag);
    write_cdr(ctx, plan, &target.attempt, 200, why, Some(HangupBy::System));
}

/// The caller's leg, handed from the agent's machine to the transferred call's.
pub(super) struct TransferredLegs<'a> {
    /// Which leg of the agent call's machine the caller was.
    leg: Leg,
    a_peer: Peer,
    a_tx: TuSender,
    a_rx: &'a mut mpsc::UnboundedReceiver<TuEvent>,
    caller_sdp: Vec<u8>,
    /// The trunk of the caller's leg (its codecs and SRTP for re-offers).
    caller_trunk: Option<Arc<TrunkConfig>>,
    deadline: Option<tokio::time::Instant>,
}

/// What bridging the answered target needs besides the legs.
pub(super) struct Transfer<'a> {
    pub(super) ctx: &'a NodeContext,
    pub(super) io: &'a Io<'a>,
    pub(super) plan: &'a DialPlan,
    pub(super) report: &'a Reporter<'a>,
}

/// The target answered (blind) or the agent completed (warm): `caller_media` is the caller's
/// RTP leg, taken from the agent's bridge (the agent got `stop` and the socket closed); a
/// two-leg relay joins caller and target, and a new machine runs the call with both legs
/// until it ends.
async fn bridge(
    transfer: &Transfer<'_>,
    machine: Connected<'_>,
    caller_media: Option<RtpLegSetup>,
    legs: TransferredLegs<'_>,
    mut target: Answered,
) -> Ending {
    let Transfer { ctx, io, plan, report } = *transfer;
    let Some(mut a) = machine.into_leg(legs.leg) else {
        hang_up_target(ctx, plan, &mut target, "internal: the caller's leg is gone");
        return Ending { code: 500, reason: "internal: the caller's leg is gone".into(), by: Ender::System };
    };
    let media = ctx.media.as_ref();
    let target_media = target.media.take();
    // What the transferred call's re-offers start from, taken before the relay owns the legs.
    let trunk_of =
        |trunk: Option<&TrunkConfig>| (routing::codecs_of(trunk), trunk.map_or(SrtpPolicy::Off, |t| t.srtp.into()));
    let sides = caller_media.as_ref().zip(target_media.as_ref()).map(|(caller, target_leg)| {
        let (caller_codecs, caller_srtp) = trunk_of(legs.caller_trunk.as_deref());
        let (target_codecs, target_srtp) = trunk_of(target.attempt.trunk.as_deref());
        let caller = LegFacts {
            last_sent: legs.caller_sdp.clone(),
            port: caller.ports.rtp_port(),
            allowed: caller_codecs,
            srtp: caller_srtp,
            media: caller.media.clone(),
        };
        let target = LegFacts {
            last_sent: target.offer.clone(),
            port: target_leg.ports.rtp_port(),
            allowed: target_codecs,
            srtp: target_srtp,
            media: target_leg.media.clone(),
        };
        (caller, target)
    });
    let started = match (caller_media, target_media, media, sides) {
        (Some(caller_media), Some(target_media), Some(media), Some(sides)) => media
            .engine
            .spawn_relay(caller_media, target_media, RelayConfig { media_timeout: media.timeout })
            .map(|(relay, events)| (relay, events, sides, media.address))
            .map_err(|e| e.to_string()),
        _ => Err("the caller's media ended".into()),
    };
    let (transferred_relay, events, (caller_side, target_side), address) = match started {
        Ok(started) => started,
        Err(error) => {
            let why = format!("cannot join the caller and the target: {error}");
            tracing::warn!(%why);
            let bye = a.dialog.bye(io.endpoint.via_for(a.dialog.peer), &[HangupReason::normal(&why).header()]);
            io.endpoint.send_request(bye, legs.a_peer, legs.a_tx.clone());
            hang_up_target(ctx, plan, &mut target, &why);
            report.send("transfer_failed", Some(500), Some(why.clone()));
            return Ending { code: 500, reason: why, by: Ender::System };
        }
    };
    let mut media = TransferMedia {
        caller: LegSide::new(caller_side, address),
        target: LegSide::new(target_side, address),
        address,
        relay: &transferred_relay,
    };
    let b_peer = target.dialog.peer;
    let b = LegSetup {
        sent_by: io.endpoint.transport().sent_by(b_peer.addr),
        contact: io.endpoint.contact_for(b_peer, ""),
        dialog: target.dialog.clone(),
        session: None,
    };
    let setup = Setup {
        a: None,
        b: Some(b),
        media: MediaMode::Anchored(&mut media),
        timers: ctx.timers,
        wait_for_bye: true,
        max_duration: legs.deadline.map(|at| at.saturating_duration_since(tokio::time::Instant::now())),
        session_policy: ctx.session_timers,
    };
    let (mut transferred, first) = Connected::transferred(a, setup);
    report.send("transfer_completed", None, None);
    tracing::info!(to = %plan.to, "transfer completed: the caller is bridged to the target");
    let channels = Channels {
        a: Some(LegChannels { peer: legs.a_peer, tx: legs.a_tx, rx: legs.a_rx }),
        b: Some(LegChannels { peer: b_peer, tx: target.tx.clone(), rx: &mut target.rx }),
        relay_events: Some(events),
        agent: None,
        referrals: None,
    };
    let ending = drive(&mut transferred, first, io, channels).await;
    drop(transferred);
    let stats = transferred_relay.stop().await;
    tracing::info!(
        caller_packets_in = stats.a.packets_in,
        target_packets_in = stats.b.packets_in,
        code = ending.code,
        reason = %ending.reason,
        "transferred call ended"
    );
    io.endpoint.unregister_dialog(&target.dialog.call_id, &target.dialog.local_tag);
    let hangup_by = match ending.by {
        Ender::Caller => HangupBy::Caller,
        Ender::Callee => HangupBy::Callee,
        Ender::System => HangupBy::System,
    };
    write_cdr(ctx, plan, &target.attempt, ending.code, &ending.reason, Some(hangup_by));
    ending
}

/// How the call placed through the API reads an ending of its transferred call: there its
/// callee (the party the agent talked to) is the caller and the human the callee; in the API
/// call's own CDR the callee is the callee and the other side (now the human) the caller.
fn as_placed_call(ending: Ending) -> Ending {
    let (by, reason) = match (ending.by, ending.reason.as_str()) {
        (Ender::Caller, "caller hung up") => (Ender::Callee, "callee hung up".to_string()),
        (Ender::Callee, "callee hung up") => (Ender::Caller, "transfer target hung up".to_string()),
        (Ender::Caller, _) => (Ender::Callee, ending.reason),
        (Ender::Callee, _) => (Ender::Caller, ending.reason),
        (Ender::System, _) => (Ender::System, ending.reason),
    };
    Ending { code: ending.code, reason, by }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_call_reads_its_transferred_ending_with_its_callee_as_the_callee() {
        let ending = |by, reason: &str| Ending { code: 200, reason: reason.into(), by };
        assert_eq!(as_placed_call(ending(Ender::Caller, "caller hung up")), ending(Ender::Callee, "callee hung up"));
        assert_eq!(
            as_placed_call(ending(Ender::Callee, "callee hung up")),
            ending(Ender::Caller, "transfer target hung up")
        );
        let timeout = ending(Ender::System, "media timeout: no RTP for 30 s");
        assert_eq!(as_placed_call(timeout.clone()), timeout);
    }

    fn request(summary: Option<&str>) -> TransferRequest {
        TransferRequest {
            to: "+15552223333".into(),
            mode: Mode::Blind,
            summary: summary.map(String::from),
            timeout_seconds: None,
            caller_id: None,
            webhook_url: None,
        }
    }

    #[test]
    fn the_summary_header_carries_no_line_breaks_and_is_bounded() {
        let header = |summary| summary_header(&request(summary)).into_iter().map(|h| h.to_string()).collect::<Vec<_>>();
        assert_eq!(header(Some("refund\r\nX-Evil: 1")), ["X-Transfer-Summary: refundX-Evil: 1"]);
        assert!(header(None).is_empty());
        assert!(header(Some(" \r\n\t")).is_empty(), "nothing but control characters and spaces: no header");
        let long = "a".repeat(5000);
        assert_eq!(header(Some(&long))[0].len(), "X-Transfer-Summary: ".len() + 1024);
    }
}
