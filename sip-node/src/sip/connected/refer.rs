//! A REFER received in an anchored SIP-to-SIP call (RFC 3515, issue 24 item 2): the node
//! itself is the transferee. The leg that sent the REFER (the referrer) is to be replaced by a
//! new leg to the `Refer-To` target, which the node places through its normal outbound routing;
//! the other leg (the party being transferred) stays and is bridged to the new leg.
//!
//! ```text
//!  referrer leg X        machine                          driver / call
//!  REFER ───────────▶ offer from X's port ── PlaceLeg ──▶ routing allows the target?
//!  ◀── 202 ────────── ◀────────────── Referral(Accepted) ─┤ (else Refused: 403, no relay)
//!  ◀── NOTIFY 100 ───                                     │ INVITE, failover, a CDR each
//!  ◀── NOTIFY 180 ─── ◀────────────── Referral(Ringing) ──┤ (the first 18x of the new leg)
//!  ◀── NOTIFY 200 ─── ◀── Referral(Answered: new leg) ────┘ (or Failed: NOTIFY 4xx-6xx,
//!  ◀── BYE ────────── relay leg X now the new party;          the call goes on)
//!                     ReplaceLeg: the driver swaps X's channels
//! ```
//!
//! The referrer may hang up once it has its 202 (blind transfer): its BYE then ends only its
//! leg, and the transferred party waits for the new leg; if that fails, the call ends. One
//! referral at a time (another REFER meanwhile gets 491). A referrer that asks for no
//! subscription (`Refer-Sub: false`, RFC 4488) gets `Refer-Sub: false` in the 202 and no
//! NOTIFY at all: it learns the outcome from the BYE (or from the call going on). The
//! `Replaces` of an attended
//! transfer's `Refer-To` goes into the new INVITE (RFC 3891), so the target (possibly this
//! node again) replaces the dialog it names.

use std::fmt;

use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request};

use super::{Action, Connected, Ender, Ending, Leg, LegSetup, LegState, MediaMode, via};
use crate::sip::control::refer::{ReferTo, SIPFRAG_CONTENT_TYPE, SipFrag, notify_headers};
use crate::sip::endpoint::TuEvent;
use crate::sip::endpoint::TuSender;
use crate::sip::message::{self, HangupReason};
use crate::sip::transaction::{TransactionKey, response_to};

/// What the machine asks the call to do for a REFER: check the target against the outbound
/// routing and place the new leg with `offer` (the node's SDP from leg `from`'s port).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlaceLeg {
    /// The referrer's leg, which the new leg replaces.
    pub(crate) from: Leg,
    pub(crate) target: ReferTo,
    pub(crate) offer: Vec<u8>,
}

/// How placing the referred leg goes, as the call reports it.
pub(crate) enum ReferralUpdate {
    /// The target is allowed: the REFER gets 202 and the placing began.
    Accepted,
    /// The target is not allowed (or not reachable at all): the REFER gets `code`.
    Refused { code: u16, reason: String },
    /// The new leg rings (its first provisional response from 180 on): the referrer hears
    /// of it in a NOTIFY (RFC 3515 2.4.5 lets the transferee report any progress).
    Ringing { code: u16 },
    /// The new leg answered.
    Answered(Box<NewLeg>),
    /// Every attempt failed: the referrer is told `code`.
    Failed { code: u16, reason: String },
}

/// The answered referred leg.
pub(crate) struct NewLeg {
    pub(crate) setup: LegSetup,
    /// The body of its 2xx: the answer to [`PlaceLeg::offer`].
    pub(crate) answer: Vec<u8>,
    /// Its channels, for the driver (taken before the machine sees the update).
    pub(crate) channel: Option<(TuSender, tokio::sync::mpsc::UnboundedReceiver<TuEvent>)>,
}

impl fmt::Debug for ReferralUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReferralUpdate::Accepted => f.write_str("Accepted"),
            ReferralUpdate::Refused { code, reason } => write!(f, "Refused({code} {reason})"),
            ReferralUpdate::Ringing { code } => write!(f, "Ringing({code})"),
            ReferralUpdate::Answered(leg) => write!(f, "Answered({})", leg.setup.dialog.call_id),
            ReferralUpdate::Failed { code, reason } => write!(f, "Failed({code} {reason})"),
        }
    }
}

/// The referral in progress.
#[derive(Debug)]
pub(super) struct Referral {
    from: Leg,
    /// The REFER's transaction until it is answered 202 or refused.
    key: Option<TransactionKey>,
    refer: Request,
    /// The REFER's CSeq number: the `id` of the NOTIFYs' `Event: refer`.
    cseq: u32,
    /// The referrer hung up (its leg is gone; no more NOTIFYs).
    referrer_left: bool,
    /// The referrer asked for no subscription (`Refer-Sub: false`, RFC 4488): no NOTIFYs.
    no_subscription: bool,
    /// The referrer was told the new leg rings (once per referral, whatever the failovers).
    ringing_told: bool,
}

impl Connected<'_> {
    /// A REFER from `from`; `true` when it is handled here (an anchored call with both legs),
    /// `false` to leave it to the old path (passed across as any in-dialog request).
    pub(super) fn on_refer(
        &mut self,
        from: Leg,
        request: &Request,
        key: &TransactionKey,
        out: &mut Vec<Action>,
    ) -> bool {
        if request.method != Method::Refer || self.a.is_none() || self.b.is_none() {
            return false;
        }
        let MediaMode::Anchored(anchor) = &mut self.media else { return false };
        let target = match ReferTo::of(&request.headers) {
            Ok(target) => target,
            Err(error) => {
                tracing::info!(%error, leg = ?from, "REFER refused");
                out.push(Action::Respond { key: key.clone(), response: refusal(request, error.status(), &error) });
                return true;
            }
        };
        if self.referral.is_some() {
            // One transfer at a time.
            out.push(Action::Respond { key: key.clone(), response: response_to(request, 491, None, None) });
            return true;
        }
        let offer = anchor.offer_new_leg(from);
        tracing::info!(leg = ?from, target = %target.uri, attended = target.replaces.is_some(), "REFER received");
        self.referral = Some(Referral {
            from,
            key: Some(key.clone()),
            refer: request.clone(),
            cseq: message::cseq(request).map(|(n, _)| n).unwrap_or(0),
            referrer_left: false,
            no_subscription: refer_sub_false(request),
            ringing_told: false,
        });
        out.push(Action::PlaceLeg(Box::new(PlaceLeg { from, target, offer })));
        true
    }

    /// A BYE from `leg`; `true` when it only ends the referrer's leg of a referral in progress
    /// (the transferred party waits for the new leg).
    pub(super) fn referrer_hangs_up(
        &mut self,
        leg: Leg,
        request: &Request,
        key: &TransactionKey,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(referral) = self.referral.as_mut().filter(|r| r.from == leg && r.key.is_none()) else {
            return false;
        };
        tracing::info!(?leg, "the referrer hung up; the transfer goes on");
        referral.referrer_left = true;
        out.push(Action::Respond { key: key.clone(), response: response_to(request, 200, Some("OK"), None) });
        true
    }

    /// How placing the referred leg goes.
    pub(super) fn on_referral(&mut self, update: ReferralUpdate, out: &mut Vec<Action>) {
        let Some(referral) = self.referral.as_mut() else {
            // The call ended its referral meanwhile; a leg answered now is hung up by the call.
            return;
        };
        match update {
            ReferralUpdate::Accepted => {
                if let Some(key) = referral.key.take() {
                    let mut response = response_to(&referral.refer, 202, Some("Accepted"), None);
                    if referral.no_subscription {
                        response.headers.push(Header::Other(REFER_SUB.into(), "false".into()));
                    }
                    out.push(Action::Respond { key, response });
                }
                let (from, cseq) = (referral.from, referral.cseq);
                self.notify(from, cseq, &SipFrag::new(100, "Trying"), out);
            }
            ReferralUpdate::Ringing { code } => {
                if std::mem::replace(&mut referral.ringing_told, true) {
                    return;
                }
                let (from, cseq) = (referral.from, referral.cseq);
                let reason = if code == 183 { "Session Progress" } else { "Ringing" };
                self.notify(from, cseq, &SipFrag::new(code, reason), out);
            }
            ReferralUpdate::Refused { code, reason } => {
                tracing::info!(code, %reason, "REFER target refused");
                if let Some(key) = referral.key.take() {
                    let mut response = response_to(&referral.refer, code, None, None);
                    response.headers.push(Header::Other("Warning".into(), format!("399 switchboard \"{reason}\"")));
                    out.push(Action::Respond { key, response });
                }
                self.referral = None;
            }
            ReferralUpdate::Failed { code, reason } => {
                tracing::info!(code, %reason, "referred leg failed");
                let Some(referral) = self.referral.take() else { return };
                if referral.referrer_left {
                    // Nobody is left to go back to: the transferred party is hung up.
                    let why = format!("transfer failed: {code} {reason}");
                    let other = referral.from.other();
                    self.bye(other, &[HangupReason::normal(&why).header()], self.wait_for_bye, out);
                    self.close(Ending { code, reason: why, by: Ender::System }, out);
                } else if !referral.no_subscription {
                    self.notify(referral.from, referral.cseq, &SipFrag::new(code, &reason), out);
                }
            }
            ReferralUpdate::Answered(new_leg) => self.referred_leg_answered(*new_leg, out),
        }
    }

    /// The new leg answered: it takes the referrer's place (media first, then signaling).
    fn referred_leg_answered(&mut self, new_leg: NewLeg, out: &mut Vec<Action>) {
        let Some(referral) = self.referral.take() else { return };
        let leg = referral.from;
        let media = match &mut self.media {
            MediaMode::Anchored(anchor) => anchor.new_leg_answered(leg, &new_leg.answer),
            _ => Ok(()),
        };
        if !referral.referrer_left {
            let frag = match &media {
                Ok(()) => SipFrag::new(200, "OK"),
                Err(_) => SipFrag::new(488, "Not Acceptable Here"),
            };
            if !referral.no_subscription {
                self.notify(leg, referral.cseq, &frag, out);
            }
            self.bye(leg, &[HangupReason::normal("transferred").header()], false, out);
        }
        let Some(old) = self.leg(leg).map(|l| (l.setup.dialog.call_id.clone(), l.setup.dialog.local_tag.clone()))
        else {
            return;
        };
        let invite_cseq = new_leg.setup.dialog.local_cseq;
        let state = LegState::new(leg, new_leg.setup, out);
        match leg {
            Leg::A => {
                self.stop_2xx(out);
                self.a = Some(state);
            }
            Leg::B => {
                self.b_invite_cseq = Some(invite_cseq);
                self.b = Some(state);
            }
        }
        out.push(Action::ReplaceLeg { leg, old_call_id: old.0, old_local_tag: old.1 });
        tracing::info!(?leg, "transfer completed: the referred leg replaced the referrer's");
        if let Err(error) = media {
            // The new party's SDP is unusable: the call cannot go on.
            let why = format!("referred party's SDP: {error}");
            self.system_hangup(HangupReason::incompatible(&why), 488, why, out);
            return;
        }
        self.resume(leg.other(), out);
    }

    /// The leg that stays after `leg.other()` was replaced: when the party that left had put
    /// it on hold, the node takes it off hold with a re-INVITE offering sendrecv.
    pub(super) fn resume(&mut self, leg: Leg, out: &mut Vec<Action>) {
        let MediaMode::Anchored(anchor) = &mut self.media else { return };
        let Some(offer) = anchor.resume_offer(leg) else { return };
        let Some(state) = self.leg_mut(leg) else { return };
        let via = via(&state.setup);
        let mut request = state.setup.dialog.request(Method::Invite, via, None, Some(("application/sdp", offer)));
        if let Some(session) = state.session.as_ref() {
            request.headers.extend(session.forwarded_request_headers());
        }
        tracing::info!(?leg, "taking the transferred party off hold");
        self.resuming = Some((leg, state.setup.dialog.local_cseq));
        out.push(Action::Send { leg, request });
    }

    /// A response on `leg`; `true` when it answers the node's re-INVITE of [`Self::resume`]
    /// (its 2xx is ACKed and its answer applied).
    pub(super) fn resume_answered(&mut self, leg: Leg, response: &rsip::Response, out: &mut Vec<Action>) -> bool {
        let Some((resumed, cseq)) = self.resuming else { return false };
        if resumed != leg || message::cseq(response) != Some((cseq, Method::Invite)) {
            return false;
        }
        let status = message::status(response);
        if status < 200 {
            return true;
        }
        self.resuming = None;
        if !(200..300).contains(&status) {
            tracing::info!(status, ?leg, "the transferred party did not take the node's resume offer");
            return true;
        }
        let Some(state) = self.leg_mut(leg) else { return true };
        let via = via(&state.setup);
        let ack = state.setup.dialog.request(Method::Ack, via, Some(cseq), None);
        out.push(Action::SendStateless { leg, message: rsip::SipMessage::Request(ack) });
        if let Some(session) = state.session.as_mut() {
            let actions = session.forwarded_answered(response);
            out.extend(actions.into_iter().filter_map(|a| super::control::timer_action(leg, a)));
        }
        if let MediaMode::Anchored(anchor) = &mut self.media
            && let Err(error) = anchor.resume_answered(leg, &response.body)
        {
            tracing::info!(%error, ?leg, "the transferred party's answer to the resume offer is unusable");
        }
        true
    }

    /// Sends a NOTIFY with `frag` for the referral on `leg` (RFC 3515 2.4.4), unless the
    /// referrer left or asked for no subscription (RFC 4488).
    fn notify(&mut self, leg: Leg, cseq: u32, frag: &SipFrag, out: &mut Vec<Action>) {
        if self.referral.as_ref().is_some_and(|r| r.no_subscription || r.referrer_left) {
            return;
        }
        let Some(state) = self.leg_mut(leg) else { return };
        let via = via(&state.setup);
        let body = frag.body().into_bytes();
        let mut request = state.setup.dialog.request(Method::Notify, via, None, Some((SIPFRAG_CONTENT_TYPE, body)));
        let event_headers: Vec<Header> =
            notify_headers(cseq, frag).into_iter().filter(|h| !matches!(h, Header::ContentType(_))).collect();
        request.headers.extend(event_headers);
        request.headers.push(Header::Contact(headers::Contact::new(state.setup.dialog.contact.clone())));
        out.push(Action::Send { leg, request });
    }
}

/// RFC 4488's header: `Refer-Sub: false` asks the REFER's recipient for no implicit
/// subscription (no NOTIFYs), and the 2xx repeats it when the recipient obliges.
const REFER_SUB: &str = "Refer-Sub";

/// Whether the REFER asks for no subscription (`Refer-Sub: false`, RFC 4488 section 4).
fn refer_sub_false(request: &Request) -> bool {
    message::header_value(&request.headers, REFER_SUB)
        .is_some_and(|value| value.split(';').next().is_some_and(|v| v.trim().eq_ignore_ascii_case("false")))
}

/// A refusal of `request` with `code` and a Warning saying why.
fn refusal(request: &Request, code: u16, why: &dyn fmt::Display) -> rsip::Response {
    let mut response = response_to(request, code, None, None);
    response.headers.push(Header::Other("Warning".into(), format!("399 switchboard \"{why}\"")));
    response
}
