//! The answered API call on the connected machine (`sip/connected/`).

use tokio::sync::mpsc;

use super::MAX_DURATION;
use crate::sip::connected::{AgentSession, Channels, Connected, Io, LegChannels, LegSetup, MediaMode, Setup, drive};
use crate::sip::context::NodeContext;
use crate::sip::dialog::Dialog;
use crate::sip::endpoint::TuEvent;
use crate::store::HangupBy;

/// Keeps the answered call up until the callee hangs up or the maximum duration passes.
/// Without anchored media a new offer cannot be answered: 488 keeps the call up (RFC 3261
/// 14.2). Everything else in the dialog is acknowledged.
pub(super) async fn hold_until_hangup(ctx: &NodeContext, leg: CalleeLeg<'_>) -> (HangupBy, String) {
    run_connected(ctx, leg, MediaMode::RefuseOffers, None, None).await
}

/// The answered callee's leg.
pub(super) struct CalleeLeg<'a> {
    pub(super) dialog: &'a Dialog,
    pub(super) tx: &'a mpsc::UnboundedSender<TuEvent>,
    pub(super) rx: &'a mut mpsc::UnboundedReceiver<TuEvent>,
}

/// Runs the connected machine (`sip/connected/`) on the callee's leg until the call ends:
/// the callee hangs up, the maximum duration passes, the node stops, or (bridged) the agent
/// leaves or the media goes silent. Returns who ended it and why (for the CDR).
pub(super) async fn run_connected(
    ctx: &NodeContext,
    leg: CalleeLeg<'_>,
    media: MediaMode<'_>,
    relay_events: Option<mpsc::Receiver<crate::media::relay::RelayEvent>>,
    agent: Option<AgentSession<'_>>,
) -> (HangupBy, String) {
    let peer = leg.dialog.peer;
    let b = LegSetup {
        sent_by: ctx.endpoint.transport().sent_by(peer.addr),
        contact: ctx.endpoint.contact_for(peer, ""),
        dialog: leg.dialog.clone(),
        // API-placed calls offer no session timer yet.
        session: None,
    };
    let setup = Setup {
        a: None,
        b: Some(b),
        media,
        timers: ctx.timers,
        wait_for_bye: false,
        max_duration: Some(MAX_DURATION),
        session_policy: ctx.session_timers,
    };
    let (mut machine, first) = Connected::new(setup);
    let io = Io { endpoint: &ctx.endpoint, metrics: &ctx.metrics, drain: &ctx.drain };
    let channels = Channels {
        a: None,
        b: Some(LegChannels { peer, tx: leg.tx.clone(), rx: leg.rx }),
        relay_events,
        agent,
        referrals: None,
    };
    let ending = drive(&mut machine, first, &io, channels).await;
    (HangupBy::from(ending.by), ending.reason)
}
