//! An INVITE with `Replaces` (RFC 3891) for a dialog of this call: the call layer hands it to
//! the call holding the dialog it names (`sip/call/replaces.rs`), and here the new dialog takes
//! that leg's place. The node answers the new INVITE's offer from the leg's own port (the relay
//! follows the new far end), ends the replaced dialog with BYE, and from then on the leg is the
//! new dialog: the other leg stays as it was and does not notice.
//!
//! The new dialog's 2xx is retransmitted until its ACK when it replaces the caller's leg (the
//! machine's one 2xx retransmitter is the caller's); a replaced callee's leg gets it once.

use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Request, Response};

use super::{Action, Connected, Leg, LegSetup, LegState, MediaMode, uas2xx_action};
use crate::sip::control::refer::Replaces;
use crate::sip::dialog::Dialog;
use crate::sip::message::{self, HangupReason};
use crate::sip::transaction::uas2xx::Uas2xxRetransmitter;
use crate::sip::transaction::{TransactionKey, new_tag, response_to};
use crate::sip::transport::Peer;

/// An INVITE with `Replaces` that arrived on a leg's channel (its dialog is the one named),
/// with what the driver knows about where it came from.
#[derive(Debug)]
pub(crate) struct Replacing {
    pub(crate) leg: Leg,
    pub(crate) request: Request,
    pub(crate) key: TransactionKey,
    pub(crate) peer: Peer,
    /// The node's sent-by towards the new peer, and its Contact there.
    pub(crate) sent_by: (String, u16),
    pub(crate) contact: String,
}

impl Connected<'_> {
    /// Replaces the named leg by the INVITE's dialog, or refuses the INVITE: 481 when it names
    /// another dialog, 486 for `early-only` (the dialog is confirmed), 501 when the media is
    /// not anchored (the other leg would need a new offer), the SDP's status when its offer is
    /// unusable.
    pub(super) fn on_replacing(&mut self, replacing: Replacing, out: &mut Vec<Action>) {
        let Replacing { leg, request, key, peer, sent_by, contact } = replacing;
        let refuse = |code: u16, out: &mut Vec<Action>| {
            out.push(Action::Respond { key: key.clone(), response: response_to(&request, code, None, None) });
        };
        let Some(state) = self.leg(leg) else { return refuse(481, out) };
        let names_leg = match Replaces::of(&request.headers) {
            Ok(Some(replaces)) => {
                let dialog = &state.setup.dialog;
                if replaces.call_id != dialog.call_id || replaces.to_tag != dialog.local_tag {
                    Err(481)
                } else if let Err(code) = replaces.check(crate::sip::control::refer::ReplacedDialog::Confirmed) {
                    Err(code)
                } else {
                    Ok(())
                }
            }
            Ok(None) => Err(481),
            Err(error) => Err(error.status()),
        };
        if let Err(code) = names_leg {
            return refuse(code, out);
        }
        let answer = match &mut self.media {
            MediaMode::Anchored(anchor) => anchor.answer_new_leg(leg, &request.body),
            _ => return refuse(501, out),
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                tracing::info!(%error, ?leg, "INVITE with Replaces: unusable offer");
                return refuse(error.sip_status(), out);
            }
        };
        let tag = new_tag();
        let Some(dialog) = Dialog::as_uas(&request, &tag, peer, contact.clone()) else {
            return refuse(400, out);
        };
        let mut ok = response_to(&request, 200, Some("OK"), Some(&tag));
        ok.headers.push(Header::Contact(headers::Contact::new(contact.clone())));
        ok.headers.push(Header::Allow(crate::sip::ALLOW.into()));
        message::set_body(&mut ok.headers, &mut ok.body, answer, Some("application/sdp"));
        tracing::info!(?leg, call_id = %dialog.call_id, "INVITE with Replaces: the new dialog replaces the leg");
        // The replaced dialog ends; then the leg is the new one.
        self.bye(leg, &[HangupReason::normal("replaced").header()], false, out);
        let old = self.leg(leg).map(|l| (l.setup.dialog.call_id.clone(), l.setup.dialog.local_tag.clone()));
        let register = (dialog.call_id.clone(), dialog.local_tag.clone());
        let new_state = LegState::new(leg, LegSetup { dialog, sent_by, contact, session: None }, out);
        out.push(Action::Respond { key, response: ok.clone() });
        match leg {
            Leg::A => {
                self.stop_2xx(out);
                self.answer_retransmitted(ok, peer.protocol.is_reliable(), out);
                self.a = Some(new_state);
            }
            Leg::B => {
                self.b_invite_cseq = None;
                self.b = Some(new_state);
            }
        }
        if let Some(unregister) = old {
            out.push(Action::Rebind { leg, peer, register, unregister });
        }
    }

    /// Retransmits the 2xx of the caller's leg until its ACK (RFC 3261 13.3.1.4).
    fn answer_retransmitted(&mut self, ok: Response, reliable: bool, out: &mut Vec<Action>) {
        let (retransmitter, timers) = Uas2xxRetransmitter::new(ok, reliable, &self.timers);
        out.extend(timers.into_iter().filter_map(|a| uas2xx_action(Leg::A, a)));
        self.uas2xx = Some(retransmitter);
    }
}
