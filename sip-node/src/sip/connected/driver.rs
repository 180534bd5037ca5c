//! The async driver of the [`Connected`] machine: turns the legs' channels, the relay's and
//! the agent's events, the node's drain and the machine's timers into [`Event`]s, and
//! carries out the [`Action`]s through the endpoint. All decisions are the machine's.

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Action, Connected, Ending, Event, Leg, PlaceLeg, ReferralUpdate, Replacing, Timer};
use crate::bridge::{BridgeEnd, BridgeHandle};
use crate::drain::Drain;
use crate::media::relay::RelayEvent;
use crate::metrics::NodeMetrics;
use crate::sip::endpoint::{Endpoint, TuEvent, TuSender};
use crate::sip::transport::Peer;

/// What the driver acts through.
pub(crate) struct Io<'a> {
    pub(crate) endpoint: &'a Endpoint,
    pub(crate) metrics: &'a NodeMetrics,
    pub(crate) drain: &'a Drain,
}

/// One SIP leg's channels: requests go out with `tx` as their user, events come on `rx`.
pub(crate) struct LegChannels<'a> {
    pub(crate) peer: Peer,
    pub(crate) tx: TuSender,
    pub(crate) rx: &'a mut mpsc::UnboundedReceiver<TuEvent>,
}

/// Where the machine's events come from.
pub(crate) struct Channels<'a> {
    pub(crate) a: Option<LegChannels<'a>>,
    pub(crate) b: Option<LegChannels<'a>>,
    /// The relay's events (anchored media hands its own over through the machine).
    pub(crate) relay_events: Option<mpsc::Receiver<RelayEvent>>,
    /// The AI agent's session, when the call is bridged to one.
    pub(crate) agent: Option<AgentSession<'a>>,
    /// Who places referred legs (REFER), when the call takes REFERs (`refer.rs`).
    pub(crate) referrals: Option<Referrals>,
}

/// The call's side of REFER: the machine's [`Action::PlaceLeg`]s go out on `jobs`, the
/// outcomes come back on `updates`.
pub(crate) struct Referrals {
    pub(crate) jobs: mpsc::UnboundedSender<PlaceLeg>,
    pub(crate) updates: mpsc::UnboundedReceiver<ReferralUpdate>,
}

/// The driver's own state for referred legs: a replaced leg's channel (owned here, unlike the
/// call's borrowed ones) and the answered leg until the machine takes it.
#[derive(Default)]
struct Swaps {
    a: Option<mpsc::UnboundedReceiver<TuEvent>>,
    b: Option<mpsc::UnboundedReceiver<TuEvent>>,
    /// The answered referred leg's dialog and channel, until [`Action::ReplaceLeg`].
    answered: Option<(crate::sip::dialog::Dialog, TuSender, mpsc::UnboundedReceiver<TuEvent>)>,
    /// Events for the machine from the driver itself (a REFER nobody can place).
    feedback: Vec<Event>,
}

/// A bridged call's agent session and how its end reads in the CDR.
pub(crate) struct AgentSession<'a> {
    pub(crate) handle: &'a mut BridgeHandle,
    pub(crate) reason: fn(&BridgeEnd) -> String,
}

/// Runs the machine from its first actions until it ends; returns how.
pub(crate) async fn drive(
    machine: &mut Connected<'_>,
    first: Vec<Action>,
    io: &Io<'_>,
    channels: Channels<'_>,
) -> Ending {
    match drive_until(machine, first, io, channels, std::future::pending::<()>()).await {
        Driven::Ended(ending) => ending,
        Driven::Interrupted((), _) => unreachable!("a pending future never resolves"),
    }
}

/// How [`drive_until`] returned.
pub(crate) enum Driven<T> {
    /// The machine ended.
    Ended(Ending),
    /// `until` resolved first: its output, and what driving the same machine on needs.
    Interrupted(T, Resume),
}

/// What [`drive_until`] hands back when interrupted.
pub(crate) struct Resume {
    /// Re-arm the machine's timers: pass them as `first` to drive the same machine on.
    pub(crate) actions: Vec<Action>,
    /// The relay's events (they were in the channels).
    pub(crate) relay_events: Option<mpsc::Receiver<RelayEvent>>,
}

/// Runs the machine like [`drive`] until it ends or `until` resolves, whichever comes first:
/// the call keeps serving its legs while something else (a transfer's outbound attempt, a
/// command) runs beside it.
pub(crate) async fn drive_until<T>(
    machine: &mut Connected<'_>,
    first: Vec<Action>,
    io: &Io<'_>,
    mut channels: Channels<'_>,
    until: impl std::future::Future<Output = T>,
) -> Driven<T> {
    let mut timers: HashMap<Timer, Instant> = HashMap::new();
    let mut swaps = Swaps::default();
    let mut ending = execute(first, io, &mut channels, &mut timers, &mut swaps);
    let mut drained = false;
    tokio::pin!(until);
    while ending.is_none() {
        if let Some(event) = swaps.feedback.pop() {
            ending = execute(machine.on_event(event), io, &mut channels, &mut timers, &mut swaps);
            continue;
        }
        if channels.relay_events.is_none() {
            channels.relay_events = machine.take_relay_events();
        }
        let next = timers.iter().min_by_key(|(_, at)| **at).map(|(timer, at)| (*timer, *at));
        let event = tokio::select! {
            () = sleep_until(next.map(|(_, at)| at)) => {
                let Some((timer, _)) = next else { continue };
                timers.remove(&timer);
                Event::Timer(timer)
            }
            () = io.drain.ending(), if !drained => {
                drained = true;
                Event::Draining
            }
            event = recv_leg(channels.a.as_mut(), swaps.a.as_mut()) => match leg_event(io, Leg::A, event, &mut channels.a) {
                Some(event) => event,
                None => continue,
            },
            event = recv_leg(channels.b.as_mut(), swaps.b.as_mut()) => match leg_event(io, Leg::B, event, &mut channels.b) {
                Some(event) => event,
                None => continue,
            },
            update = recv_referral(channels.referrals.as_mut()) => match update {
                Some(ReferralUpdate::Answered(mut leg)) => {
                    if let Some((tx, rx)) = leg.channel.take() {
                        swaps.answered = Some((leg.setup.dialog.clone(), tx, rx));
                    }
                    Event::Referral(ReferralUpdate::Answered(leg))
                }
                Some(update) => Event::Referral(update),
                None => {
                    channels.referrals = None;
                    continue;
                }
            },
            event = recv_relay(channels.relay_events.as_mut()) => match event {
                Some(RelayEvent::MediaTimeout { silent_for }) => Event::MediaTimeout { silent_for },
                Some(RelayEvent::Dtmf { leg, digit }) => {
                    tracing::debug!(?leg, ?digit, "DTMF relayed");
                    continue;
                }
                Some(RelayEvent::Latched { leg, source }) => {
                    tracing::debug!(?leg, %source, "RTP latched");
                    continue;
                }
                None => {
                    // The relay is gone (a bridge notices its closed channels and ends).
                    channels.relay_events = None;
                    continue;
                }
            },
            reason = agent_ended(channels.agent.as_mut()) => {
                channels.agent = None;
                Event::AgentEnded { reason }
            }
            output = &mut until => {
                let now = Instant::now();
                let actions = timers
                    .into_iter()
                    .map(|(timer, at)| Action::Schedule(timer, at.saturating_duration_since(now)))
                    .collect();
                return Driven::Interrupted(output, Resume { actions, relay_events: channels.relay_events });
            }
        };
        ending = execute(machine.on_event(event), io, &mut channels, &mut timers, &mut swaps);
        if let Some((mut dialog, tx, _rx)) = swaps.answered.take() {
            // The machine did not take the referred leg (the call ended meanwhile): hang it up.
            let bye = dialog.bye(io.endpoint.via_for(dialog.peer), &[]);
            io.endpoint.send_request(bye, dialog.peer, tx);
            io.endpoint.unregister_dialog(&dialog.call_id, &dialog.local_tag);
        }
    }
    Driven::Ended(ending.unwrap_or_else(|| Ending {
        code: 500,
        reason: "internal: call ended".into(),
        by: super::Ender::System,
    }))
}

/// Carries out actions; returns the ending when one of them is [`Action::End`].
fn execute(
    actions: Vec<Action>,
    io: &Io<'_>,
    channels: &mut Channels<'_>,
    timers: &mut HashMap<Timer, Instant>,
    swaps: &mut Swaps,
) -> Option<Ending> {
    let mut ending = None;
    for action in actions {
        match action {
            Action::Respond { key, response } => io.endpoint.respond(&key, response),
            Action::Send { leg: l, request } => {
                if let Some(channels) = leg_of(channels, l) {
                    io.endpoint.send_request(request, channels.peer, channels.tx.clone());
                }
            }
            Action::SendStateless { leg: l, message } => {
                if let Some(channels) = leg_of(channels, l) {
                    io.endpoint.send_stateless(message, channels.peer);
                }
            }
            Action::Retransmit { leg: l, response } => {
                if let Some(channels) = leg_of(channels, l) {
                    io.endpoint.send_stateless(rsip::SipMessage::Response(response), channels.peer);
                    io.metrics.retransmission();
                }
            }
            Action::Schedule(timer, after) => {
                timers.insert(timer, Instant::now() + after);
            }
            Action::CancelTimer(timer) => {
                timers.remove(&timer);
            }
            Action::PlaceLeg(place) => {
                let sent = channels.referrals.as_ref().is_some_and(|r| r.jobs.send(*place).is_ok());
                if !sent {
                    let reason = "this call cannot place referred legs".into();
                    swaps.feedback.push(Event::Referral(ReferralUpdate::Refused { code: 501, reason }));
                }
            }
            Action::ReplaceLeg { leg: l, old_call_id, old_local_tag } => {
                io.endpoint.unregister_dialog(&old_call_id, &old_local_tag);
                let (slot, owned) = match l {
                    Leg::A => (channels.a.as_mut(), &mut swaps.a),
                    Leg::B => (channels.b.as_mut(), &mut swaps.b),
                };
                if let (Some(slot), Some((dialog, tx, rx))) = (slot, swaps.answered.take()) {
                    slot.peer = dialog.peer;
                    slot.tx = tx;
                    *owned = Some(rx);
                }
            }
            Action::Rebind { leg: l, peer, register, unregister } => {
                io.endpoint.unregister_dialog(&unregister.0, &unregister.1);
                let slot = match l {
                    Leg::A => channels.a.as_mut(),
                    Leg::B => channels.b.as_mut(),
                };
                if let Some(slot) = slot {
                    io.endpoint.register_dialog(&register.0, &register.1, slot.tx.clone());
                    slot.peer = peer;
                }
            }
            Action::End(end) => ending = Some(end),
        }
    }
    ending
}

fn leg_of<'c, 'a>(channels: &'c Channels<'a>, leg: Leg) -> Option<&'c LegChannels<'a>> {
    match leg {
        Leg::A => channels.a.as_ref(),
        Leg::B => channels.b.as_ref(),
    }
}

/// The machine's event for a leg's channel event (`None`: nothing for the machine). A closed
/// channel is forgotten (`slot` emptied), so that it is not polled again.
fn leg_event(io: &Io<'_>, leg: Leg, event: Option<TuEvent>, slot: &mut Option<LegChannels<'_>>) -> Option<Event> {
    if event.is_none() {
        *slot = None;
    }
    match event {
        // An INVITE of another dialog, handed over because its Replaces names this leg's.
        Some(TuEvent::Request { request, key: Some(key), peer })
            if request.method == rsip::Method::Invite
                && crate::sip::message::header_value(&request.headers, "Replaces").is_some() =>
        {
            let sent_by = io.endpoint.transport().sent_by(peer.addr);
            let contact = io.endpoint.contact_for(peer, "");
            Some(Event::Replacing(Box::new(Replacing { leg, request, key, peer, sent_by, contact })))
        }
        Some(TuEvent::Request { request, key, .. }) => Some(Event::Request { leg, request, key }),
        Some(TuEvent::Response(response)) => Some(Event::Response { leg, response }),
        Some(TuEvent::Timeout) => Some(Event::TransactionTimeout { leg }),
        Some(TuEvent::Cancelled) => None,
        None => Some(Event::ChannelClosed { leg }),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next event of a leg (from the channel of the leg that replaced it, if one did); never
/// resolves without the leg.
async fn recv_leg(
    leg: Option<&mut LegChannels<'_>>,
    replaced: Option<&mut mpsc::UnboundedReceiver<TuEvent>>,
) -> Option<TuEvent> {
    match (leg, replaced) {
        (Some(_), Some(rx)) => rx.recv().await,
        (Some(leg), None) => leg.rx.recv().await,
        (None, _) => std::future::pending().await,
    }
}

/// The next referral update; never resolves without a referral channel.
async fn recv_referral(referrals: Option<&mut Referrals>) -> Option<ReferralUpdate> {
    match referrals {
        Some(referrals) => referrals.updates.recv().await,
        None => std::future::pending().await,
    }
}

/// The next relay event; never resolves without a relay.
async fn recv_relay(events: Option<&mut mpsc::Receiver<RelayEvent>>) -> Option<RelayEvent> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

/// The agent session's end as CDR text; never resolves without an agent.
async fn agent_ended(agent: Option<&mut AgentSession<'_>>) -> String {
    match agent {
        Some(agent) => (agent.reason)(&agent.handle.ended().await),
        None => std::future::pending().await,
    }
}
