//! The answered API call on the connected machine (`sip/connected/`).

use tokio::sync::mpsc;

use super::MAX_DURATION;
use crate::sip::connected::{Action, Channels, Connected, Io, LegChannels, LegSetup, MediaMode, Setup, drive};
use crate::sip::context::NodeContext;
use crate::sip::control::session_leg::LegTimer;
use crate::sip::dialog::Dialog;
use crate::sip::endpoint::TuEvent;
use crate::store::HangupBy;

/// Keeps the answered call up until the callee hangs up or the maximum duration passes.
/// Without anchored media a new offer cannot be answered: 488 keeps the call up (RFC 3261
/// 14.2). Everything else in the dialog is acknowledged. The node's session refreshes carry
/// its offer unchanged. Returns who ended it and why (for the CDR). (A call bridged to an
/// agent runs in `sip::transfer`, which takes transfers too.)
pub(super) async fn hold_until_hangup(ctx: &NodeContext, leg: CalleeLeg<'_>) -> (HangupBy, String) {
    let peer = leg.dialog.peer;
    let media = MediaMode::RefuseOffers { sent: Some(leg.sdp.clone()) };
    let (mut machine, first) = callee_machine(ctx, leg.dialog, leg.session, media);
    let io = Io { endpoint: &ctx.endpoint, metrics: &ctx.metrics, drain: &ctx.drain };
    let channels = Channels {
        a: None,
        b: Some(LegChannels { peer, tx: leg.tx.clone(), rx: leg.rx }),
        relay_events: None,
        agent: None,
        referrals: None,
    };
    let ending = drive(&mut machine, first, &io, channels).await;
    (HangupBy::from(ending.by), ending.reason)
}

/// The answered callee's leg.
pub(super) struct CalleeLeg<'a> {
    pub(super) dialog: &'a Dialog,
    pub(super) tx: &'a mpsc::UnboundedSender<TuEvent>,
    pub(super) rx: &'a mut mpsc::UnboundedReceiver<TuEvent>,
    /// The leg's session timer as the INVITE and the callee's 2xx negotiated it (RFC 4028).
    pub(super) session: Option<LegTimer>,
    /// The node's SDP on the leg: the offer of the INVITE the callee answered.
    pub(super) sdp: Vec<u8>,
}

/// The connected machine of an answered API call: only the callee's leg (B), with its
/// session timer, and the call's maximum duration.
pub(super) fn callee_machine<'m>(
    ctx: &NodeContext,
    dialog: &Dialog,
    session: Option<LegTimer>,
    media: MediaMode<'m>,
) -> (Connected<'m>, Vec<Action>) {
    let peer = dialog.peer;
    let b = LegSetup {
        sent_by: ctx.endpoint.transport().sent_by(peer.addr),
        contact: ctx.endpoint.contact_for(peer, ""),
        dialog: dialog.clone(),
        session,
    };
    Connected::new(Setup {
        a: None,
        b: Some(b),
        media,
        timers: ctx.timers,
        wait_for_bye: false,
        max_duration: Some(MAX_DURATION),
        session_policy: ctx.session_timers,
    })
}
