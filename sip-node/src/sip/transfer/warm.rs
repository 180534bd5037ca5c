//! A warm transfer's consultation: the human answered, the agent briefs them.
//!
//! The human's RTP leg takes the caller's place in the agent's bridge (the agent hears the
//! human and speaks to them; it is told with a `transfer_answered` event); the caller's leg is
//! kept aside with its port, on hold (the node sends nothing: silence). The caller's dialog is
//! still served by its machine meanwhile, and the human's dialog here (a BYE ends the
//! consultation). The agent then decides through the API: `complete` (the human's leg leaves
//! the bridge, the agent gets `stop`, caller and human are joined) or `cancel` (the human is
//! hung up); either way, a human who hangs up first sends the caller back to the agent, which
//! gets `transfer_failed`.

use std::collections::VecDeque;

use rsip::Method;

use super::agent::{Reporter, Transfer, caller_slots, hang_up_target};
use super::dial::{Answered, write_cdr};
use super::hold::Held;
use super::{Command, Intent, Registration};
use crate::bridge::{BridgeEnd, BridgeHandle};
use crate::media::relay::{RelayConfig, RelayHandle, RtpLegSetup};
use crate::sip::connected::{AgentSession, Channels, Connected, Driven, Ending, Leg, LegChannels, Resume, drive_until};
use crate::sip::control::dtmf_info::{self, InfoDtmf};
use crate::sip::endpoint::{Endpoint, TuEvent};
use crate::sip::transaction::response_to;
use crate::store::HangupBy;

/// What the consultation needs.
pub(super) struct Consult<'a, 'b, 'm> {
    pub(super) transfer: &'a Transfer<'a>,
    pub(super) machine: &'a mut Connected<'m>,
    /// Which leg of the machine the caller is.
    pub(super) leg: Leg,
    /// The caller's leg (its machine keeps serving it).
    pub(super) a: LegChannels<'b>,
    pub(super) agent: &'b mut BridgeHandle,
    pub(super) agent_reason: fn(&BridgeEnd) -> String,
    pub(super) registration: &'a mut Registration,
    pub(super) resume: Resume,
    pub(super) id: uuid::Uuid,
}

/// How the consultation ended.
pub(super) enum Consulted {
    /// The call ended meanwhile (the human has been hung up).
    Ended(Ending),
    /// The agent completed: the caller's leg, to be joined with the human's (now in the
    /// target's `media`).
    Complete(RtpLegSetup),
    /// The caller's media is gone: end the call (drive on with these actions after the
    /// machine's hangup) with this ending.
    Lost(Resume, Ending),
    /// Called off: the caller is back with the agent; drive its machine on with this. The
    /// caller's leg now has this relay handle (keep it: dropping it ends the bridge).
    Back(Resume, Option<RelayHandle>),
}

/// What ended the wait for the agent's decision.
enum Decision {
    Complete,
    Cancel,
    HumanLeft,
}

impl Consult<'_, '_, '_> {
    pub(super) async fn run(self, target: &mut Answered) -> Consulted {
        let Consult { transfer, machine, leg, a, agent, agent_reason, registration, resume, id } = self;
        let Transfer { ctx, io, plan, report } = *transfer;
        let config = relay_config(transfer);
        let swapped = match target.media.take() {
            Some(human) => agent.swap_leg(human, config).await.map_err(|e| e.to_string()),
            None => Err("internal: the human's media is gone".into()),
        };
        let (human_relay, caller) = match swapped {
            Ok((relay, _events, Some(caller))) => (relay, caller),
            Ok((_, _, None)) => return called_off(transfer, target, agent, resume, "the caller's media is gone"),
            Err(error) => return called_off(transfer, target, agent, resume, &error),
        };
        // The caller on hold: the node's hold audio, else silence.
        let held = Held::start(caller, ctx.media.as_ref().and_then(|m| m.hold_audio.clone()));
        agent.notify("transfer_answered", serde_json::json!({"transfer": {"id": id.to_string(), "to": plan.to}}));
        tracing::info!(transfer = %id, "warm transfer: the agent is briefing the human; the caller is on hold");
        let agent_session = AgentSession { handle: &mut *agent, reason: agent_reason };
        let (a, b) = caller_slots(leg, a);
        let channels =
            Channels { a, b, relay_events: resume.relay_events, agent: Some(agent_session), referrals: None };
        let decided =
            drive_until(machine, resume.actions, io, channels, decision(io.endpoint, registration, target)).await;
        let caller = held.end().await;
        let (decision, resumed) = match decided {
            Driven::Ended(ending) => {
                hang_up_target(ctx, plan, target, &format!("call ended during the consultation: {}", ending.reason));
                report.send("transfer_failed", Some(ending.code), Some(format!("call ended: {}", ending.reason)));
                return Consulted::Ended(ending);
            }
            Driven::Interrupted(decision, resumed) => (decision, resumed),
        };
        let Some(caller) = caller else {
            let why = "internal: the caller's media was lost on hold";
            hang_up_target(ctx, plan, target, why);
            tell_agent(agent, report, id, plan.to.as_str(), why);
            let ending = Ending { code: 500, reason: why.into(), by: crate::sip::connected::Ender::System };
            return Consulted::Lost(resumed, ending);
        };
        match decision {
            Decision::Complete => {
                // The human's leg leaves the bridge; the bridge session then sends `stop` and
                // closes the agent's socket.
                target.media = human_relay.release().await;
                let stale = caller.ports.discard_queued();
                tracing::debug!(stale, "dropped what the caller sent while on hold");
                Consulted::Complete(caller)
            }
            Decision::Cancel | Decision::HumanLeft => {
                let why = match decision {
                    Decision::Cancel => "the agent cancelled the transfer",
                    _ => "the human hung up before the transfer completed",
                };
                if matches!(decision, Decision::Cancel) {
                    hang_up_target(ctx, plan, target, why);
                } else {
                    io.endpoint.unregister_dialog(&target.dialog.call_id, &target.dialog.local_tag);
                    write_cdr(ctx, plan, &target.attempt, 200, why, Some(HangupBy::Callee));
                }
                // The caller's leg goes back into the bridge (the human's comes out and is
                // dropped: its ports go back), without what it sent while on hold.
                caller.ports.discard_queued();
                let back = agent.swap_leg(caller, config).await;
                drop(human_relay);
                let (caller_relay, resume) = match back {
                    Ok((relay, events, _human)) => {
                        (Some(relay), Resume { actions: resumed.actions, relay_events: Some(events) })
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the caller's leg could not go back to the agent");
                        (None, resumed)
                    }
                };
                tell_agent(agent, report, id, plan.to.as_str(), why);
                Consulted::Back(resume, caller_relay)
            }
        }
    }
}

fn relay_config(transfer: &Transfer<'_>) -> RelayConfig {
    RelayConfig { media_timeout: transfer.ctx.media.as_ref().map(|m| m.timeout).unwrap_or_default() }
}

/// The consultation could not begin: the human is hung up, the caller stays with the agent.
fn called_off(
    transfer: &Transfer<'_>,
    target: &mut Answered,
    agent: &BridgeHandle,
    resume: Resume,
    why: &str,
) -> Consulted {
    hang_up_target(transfer.ctx, transfer.plan, target, why);
    let id = transfer.report.id;
    tell_agent(agent, transfer.report, id, transfer.plan.to.as_str(), why);
    Consulted::Back(resume, None)
}

/// `transfer_failed` to the agent and the webhook.
fn tell_agent(agent: &BridgeHandle, report: &Reporter<'_>, id: uuid::Uuid, to: &str, why: &str) {
    tracing::info!(transfer = %id, why, "warm transfer called off; the caller is back with the agent");
    agent.notify("transfer_failed", serde_json::json!({"transfer": {"id": id.to_string(), "to": to, "reason": why}}));
    report.send("transfer_failed", None, Some(why.to_string()));
}

/// Waits for the agent's decision (through the API) or the human hanging up; answers the
/// human's other in-dialog requests (an offer with 488: the consultation's media is fixed),
/// and sends the keys the agent asks for to the human's leg, one INFO
/// (`application/dtmf-relay`) per key, each after the previous one's final response.
async fn decision(endpoint: &Endpoint, registration: &mut Registration, target: &mut Answered) -> Decision {
    let mut keys: VecDeque<char> = VecDeque::new();
    // The CSeq of the INFO in flight.
    let mut in_flight: Option<u32> = None;
    loop {
        if in_flight.is_none()
            && let Some(key) = keys.pop_front()
        {
            let body = dtmf_info::relay_body(&InfoDtmf { key, duration_ms: dtmf_info::DEFAULT_DURATION_MS });
            let dialog = &mut target.dialog;
            let via = endpoint.via_for(dialog.peer);
            let info =
                dialog.request(Method::Info, via, None, Some((dtmf_info::RELAY_CONTENT_TYPE, body.into_bytes())));
            in_flight = Some(dialog.local_cseq);
            endpoint.send_request(info, dialog.peer, target.tx.clone());
        }
        tokio::select! {
            command = registration.next() => match command {
                Some(Command { action: Intent::Complete, reply, .. }) => {
                    let _ = reply.send(Ok(()));
                    return Decision::Complete;
                }
                Some(Command { action: Intent::Cancel, reply, .. }) => {
                    let _ = reply.send(Ok(()));
                    return Decision::Cancel;
                }
                Some(Command { action: Intent::Dtmf(digits), reply, .. }) => {
                    keys.extend(digits.chars());
                    let _ = reply.send(Ok(()));
                }
                Some(Command { action: Intent::Transfer(_), reply, .. }) => {
                    let _ = reply.send(Err("a warm transfer is in progress: complete or cancel it first".into()));
                }
                None => return Decision::Cancel,
            },
            event = target.rx.recv() => match event {
                Some(TuEvent::Request { request, key: Some(key), .. }) => {
                    let bye = request.method == Method::Bye;
                    let code = if request.method == Method::Invite && !request.body.is_empty() { 488 } else { 200 };
                    endpoint.respond(&key, response_to(&request, code, None, None));
                    if bye {
                        return Decision::HumanLeft;
                    }
                }
                Some(TuEvent::Response(response)) => {
                    let final_for_info = crate::sip::message::cseq(&response)
                        .is_some_and(|(n, method)| method == Method::Info && Some(n) == in_flight)
                        && crate::sip::message::status(&response) >= 200;
                    if final_for_info {
                        in_flight = None;
                    }
                }
                Some(TuEvent::Timeout) => in_flight = None,
                None => return Decision::HumanLeft,
                Some(_) => {}
            },
        }
    }
}
