//! The connected phase of a call as a sans-IO machine: what the node does once a call is
//! answered, until it ends. Inputs are [`Event`]s (an in-dialog request or response on a leg,
//! a transaction timeout, an expired timer, the node draining, the media going silent, the
//! agent leaving); outputs are [`Action`]s (respond, send a request, send statelessly, arm or
//! disarm a timer, end). No sockets, no clock: timers are asked for with [`Action::Schedule`]
//! and come back as [`Event::Timer`], like the transactions in `sip/transaction/`.
//!
//! One machine serves every kind of call:
//! - the B2BUA (`sip/call/`): leg A is the caller's dialog (the node is its UAS), leg B the
//!   callee's (the node is its UAC); in-dialog requests pass from one leg to the other, with
//!   the node re-offering when it anchors the media;
//! - a call to an AI agent (`sip/call/agent.rs`): only leg A; offers are answered here;
//! - an API-placed call (`sip/originate/`): only leg B; offers are answered here when an
//!   agent is bridged, refused with 488 otherwise, and the call has a maximum duration.
//!
//! The 2xx to the caller is retransmitted until the ACK comes by the one
//! [`Uas2xxRetransmitter`]; a callee that retransmits its 2xx (our ACK was lost) is ACKed
//! again. The async driver that feeds the machine from channels and timers is `driver.rs`.
//!
//! Extending it (session timers, PRACK, REFER): a feature adds [`Event`] variants for its
//! inputs and [`Timer`] variants for its timers, and handles them in `on_connected` (an
//! exhaustive match, so the compiler points at every place to decide); its outputs are the
//! existing [`Action`]s (a new kind of output gets a variant, which the driver's exhaustive
//! match then asks to carry out). Its state goes in a field of [`Connected`], its own sans-IO
//! piece (see `sip/control/`) in a module beside it.

mod control;
mod driver;
mod dtmf;
mod events;
mod forward;
mod media;
mod refer;
#[cfg(test)]
mod refer_tests;
mod replaces;
#[cfg(test)]
mod tests;

use std::time::Duration;

use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response, SipMessage};

pub(crate) use driver::{AgentSession, Channels, Driven, Io, LegChannels, Referrals, Resume, drive, drive_until};
pub(crate) use events::{Action, Ender, Ending, Event, Leg, Timer};
pub(crate) use media::{AnchoredMedia, LocalAnswerer, LocalMedia, Refreshable};
pub(crate) use refer::{NewLeg, PlaceLeg, ReferralUpdate};
pub(crate) use replaces::Replacing;

use super::control::session_leg::{LegSession, LegTimer};
// The tests name the session timers through `use super::*`, as before the events moved out.
#[cfg(test)]
use super::control::session_timer::SessionTimerKind;
use super::control::session_timer::TimerPolicy;
use super::dialog::Dialog;
use super::message::{self, HangupReason};
use super::transaction::uas2xx::{Uas2xxAction, Uas2xxRetransmitter, Uas2xxTimer};
use super::transaction::{TimerConfig, TransactionKey, new_branch, response_to};
use crate::media::sdp::SessionDescription;

/// How long the node waits for the far side to confirm a BYE before it forgets the call.
pub(crate) const BYE_WAIT: Duration = Duration::from_secs(4);

/// How in-dialog offers (re-INVITE, UPDATE with SDP) are handled.
pub(crate) enum MediaMode<'m> {
    /// SDP passes between the legs unchanged (B2BUA without RTP ports).
    PassThrough,
    /// The node anchors both legs: an offer is re-offered by the node on the other leg.
    Anchored(&'m mut dyn AnchoredMedia),
    /// The node is the far end of the only SIP leg and answers offers itself.
    AnswerHere(&'m mut dyn LocalMedia),
    /// Nothing to negotiate with: offers are refused with 488, the call stays up (RFC 3261
    /// 14.2). `sent` is the node's SDP on the leg (an API call's offer), which the node's
    /// session refreshes carry; `None`: the node refreshes with UPDATE without a body.
    RefuseOffers { sent: Option<Vec<u8>> },
}

/// One SIP leg of the call as the machine sees it.
pub(crate) struct LegSetup {
    pub(crate) dialog: Dialog,
    /// The node's sent-by host and port towards the leg's peer (for Via headers).
    pub(crate) sent_by: (String, u16),
    /// The node's Contact towards the leg's peer without a user (for relayed 2xx).
    pub(crate) contact: String,
    /// The leg's session timer as its setup negotiated it (RFC 4028); `None`: no timer.
    pub(crate) session: Option<LegTimer>,
}

/// Everything the machine starts with.
pub(crate) struct Setup<'m> {
    /// The caller's leg, with the 2xx already decided (the machine sends it first).
    pub(crate) a: Option<(LegSetup, Answer)>,
    /// The callee's leg.
    pub(crate) b: Option<LegSetup>,
    pub(crate) media: MediaMode<'m>,
    pub(crate) timers: TimerConfig,
    /// Wait (bounded by [`BYE_WAIT`]) for the final response to our BYE before ending.
    pub(crate) wait_for_bye: bool,
    /// End the call after this long.
    pub(crate) max_duration: Option<Duration>,
    /// The node's session-timer policy, for the peers' refreshes.
    pub(crate) session_policy: TimerPolicy,
}

/// The 2xx that answers the caller's INVITE.
pub(crate) struct Answer {
    pub(crate) key: TransactionKey,
    pub(crate) response: Response,
    /// Whether the caller's transport is reliable (nothing retransmitted then).
    pub(crate) reliable: bool,
}

/// An in-dialog request forwarded from one leg to the other, waiting for its final response.
#[derive(Debug)]
struct Pending {
    from: Leg,
    key: TransactionKey,
    request: Request,
    cseq: u32,
    /// The originator's offer when the node re-offered on the other leg (anchored media).
    offer: Option<SessionDescription>,
}

/// A leg and the BYE the machine awaits the answer to on it.
struct LegState {
    setup: LegSetup,
    /// The CSeq of our BYE while we wait for its final response.
    bye_wait: Option<u32>,
    /// The leg's session timer (RFC 4028).
    session: Option<LegSession>,
}

/// The connected call. See the module doc.
pub(crate) struct Connected<'m> {
    a: Option<LegState>,
    b: Option<LegState>,
    media: MediaMode<'m>,
    uas2xx: Option<Uas2xxRetransmitter>,
    /// The CSeq of the INVITE that set up leg B (a 2xx with it is a retransmission).
    b_invite_cseq: Option<u32>,
    pending: Vec<Pending>,
    wait_for_bye: bool,
    /// Set once the call is ending: the machine only waits for BYE answers.
    closing: Option<Ending>,
    ended: bool,
    session_policy: TimerPolicy,
    /// A REFER being carried out (`refer.rs`).
    referral: Option<refer::Referral>,
    /// The transaction timers (for the 2xx of a dialog that replaces the caller's).
    timers: TimerConfig,
    /// The node's re-INVITE taking a leg off hold after the other leg was replaced (leg, CSeq).
    resuming: Option<(Leg, u32)>,
}

impl<'m> Connected<'m> {
    /// Starts the connected phase: answers the caller (when there is one) and arms the timers.
    pub(crate) fn new(setup: Setup<'m>) -> (Connected<'m>, Vec<Action>) {
        let mut actions = Vec::new();
        let mut uas2xx = None;
        let a = setup.a.map(|(leg, answer)| {
            actions.push(Action::Respond { key: answer.key, response: answer.response.clone() });
            let (retransmitter, timers) = Uas2xxRetransmitter::new(answer.response, answer.reliable, &setup.timers);
            uas2xx = Some(retransmitter);
            actions.extend(timers.into_iter().filter_map(|a| uas2xx_action(Leg::A, a)));
            LegState::new(Leg::A, leg, &mut actions)
        });
        let b = setup.b.map(|leg| LegState::new(Leg::B, leg, &mut actions));
        if let Some(limit) = setup.max_duration {
            actions.push(Action::Schedule(Timer::MaxDuration, limit));
        }
        let machine = Connected {
            b_invite_cseq: b.as_ref().map(|b| b.setup.dialog.local_cseq),
            a,
            b,
            media: setup.media,
            uas2xx,
            pending: Vec::new(),
            wait_for_bye: setup.wait_for_bye,
            closing: None,
            ended: false,
            session_policy: setup.session_policy,
            referral: None,
            timers: setup.timers,
            resuming: None,
        };
        (machine, actions)
    }

    /// A call whose caller's leg `a` was answered by an earlier machine (handed over with
    /// [`Connected::into_leg`]) and goes on with the new far leg in `setup.b`: a transferred
    /// call. `setup.a` is ignored; nothing is answered.
    pub(crate) fn transferred(a: LegSetup, setup: Setup<'m>) -> (Connected<'m>, Vec<Action>) {
        let (mut machine, mut actions) = Connected::new(Setup { a: None, ..setup });
        machine.a = Some(LegState::new(Leg::A, a, &mut actions));
        (machine, actions)
    }

    /// A request of the node's own on a leg's dialog (the dialog's next CSeq, a fresh Via),
    /// for the caller to complete and send: a REFER the node originates. `None` without the
    /// leg. Its responses come back on the leg's channel, where the machine ignores them.
    pub(crate) fn new_request(&mut self, leg: Leg, method: Method, body: Option<(&str, Vec<u8>)>) -> Option<Request> {
        let state = self.leg_mut(leg)?;
        let via = via(&state.setup);
        Some(state.setup.dialog.request(method, via, None, body))
    }

    /// A leg's dialog (to unregister it when the call is over).
    pub(crate) fn dialog(&self, leg: Leg) -> Option<&Dialog> {
        self.leg(leg).map(|l| &l.setup.dialog)
    }

    /// Hands a leg over to another machine (a transferred call goes on with a new far leg):
    /// its dialog as it stands (CSeq, route set) and its setup. Nothing is sent.
    pub(crate) fn into_leg(self, leg: Leg) -> Option<LegSetup> {
        let state = match leg {
            Leg::A => self.a,
            Leg::B => self.b,
        };
        state.map(|state| state.setup)
    }

    /// The relay's event channel when anchored media started one since the last call.
    pub(crate) fn take_relay_events(&mut self) -> Option<tokio::sync::mpsc::Receiver<crate::media::relay::RelayEvent>> {
        match &mut self.media {
            MediaMode::Anchored(anchor) => anchor.take_events(),
            _ => None,
        }
    }

    /// Feeds one event; returns what to do.
    pub(crate) fn on_event(&mut self, event: Event) -> Vec<Action> {
        if self.ended {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.closing.is_some() {
            self.on_closing(event, &mut out);
        } else {
            self.on_connected(event, &mut out);
        }
        out
    }

    fn on_connected(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Request { leg, request, key } => self.on_request(leg, request, key, out),
            Event::Response { leg, response } => self.on_response(leg, response, out),
            Event::TransactionTimeout { leg } => {
                if self.refresh_timed_out(leg, out) {
                    return;
                }
                self.fail_pending(leg, out)
            }
            Event::Timer(Timer::Session(leg, kind)) => self.on_session_timer(leg, kind, out),
            Event::Timer(Timer::Uas2xx(timer)) => {
                let actions = self.uas2xx.as_mut().map(|r| r.on_timer(timer)).unwrap_or_default();
                for action in actions {
                    if action == Uas2xxAction::SendBye {
                        tracing::warn!("no ACK for the 200 OK from the caller; ending the call");
                        let why = "caller never acknowledged the answer";
                        let reason = [HangupReason::timer(why).header()];
                        self.bye(Leg::B, &reason, false, out);
                        self.bye(Leg::A, &reason, false, out);
                        self.end(Ending { code: 408, reason: why.into(), by: Ender::System }, out);
                        return;
                    }
                    out.extend(uas2xx_action(Leg::A, action));
                }
            }
            Event::Timer(Timer::ByeWait) => {}
            Event::Timer(Timer::MaxDuration) => {
                let why = "maximum call duration reached";
                self.system_hangup(HangupReason::normal(why), 200, why.into(), out);
            }
            Event::Draining => {
                let why = crate::drain::NODE_SHUTDOWN;
                self.system_hangup(HangupReason::normal(why), 200, why.into(), out);
            }
            Event::MediaTimeout { silent_for } => {
                tracing::info!(silent_for = ?silent_for, "media timeout");
                let why = format!("media timeout: no RTP for {} s", silent_for.as_secs());
                self.system_hangup(HangupReason::timer(&why), 408, why, out);
            }
            Event::AgentEnded { reason } => {
                self.system_hangup(HangupReason::normal(&reason), 200, reason.clone(), out);
            }
            Event::Referral(update) => self.on_referral(update, out),
            Event::Replacing(replacing) => self.on_replacing(*replacing, out),
            Event::ChannelClosed { .. } => {
                self.end(Ending { code: 500, reason: "internal: channel closed".into(), by: Ender::System }, out);
            }
        }
    }

    /// While ending: answers BYEs crossing ours, waits for the answers to ours.
    fn on_closing(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Request { request, key: Some(key), .. } => {
                // A crossing BYE (both hung up at once) or anything else: answer it.
                let code = if request.method == Method::Bye { 200 } else { 481 };
                out.push(Action::Respond { key, response: response_to(&request, code, None, None) });
            }
            Event::Response { leg, response } => {
                let ours = self.leg(leg).and_then(|l| l.bye_wait);
                if ours.is_some()
                    && message::cseq(&response) == ours.map(|n| (n, Method::Bye))
                    && message::status(&response) >= 200
                {
                    self.bye_answered(leg, out);
                }
            }
            Event::TransactionTimeout { leg } | Event::ChannelClosed { leg } => self.bye_answered(leg, out),
            Event::Replacing(replacing) => {
                // The call is ending: nothing left to replace.
                let response = response_to(&replacing.request, 481, None, None);
                out.push(Action::Respond { key: replacing.key, response });
            }
            Event::Timer(Timer::ByeWait) => {
                for leg in [Leg::A, Leg::B] {
                    if let Some(state) = self.leg_mut(leg) {
                        state.bye_wait = None;
                    }
                }
                self.finish_closing(out);
            }
            _ => {}
        }
    }

    fn bye_answered(&mut self, leg: Leg, out: &mut Vec<Action>) {
        if let Some(state) = self.leg_mut(leg) {
            state.bye_wait = None;
        }
        self.finish_closing(out);
    }

    fn finish_closing(&mut self, out: &mut Vec<Action>) {
        let waiting = [Leg::A, Leg::B].iter().any(|l| self.leg(*l).is_some_and(|s| s.bye_wait.is_some()));
        if !waiting && let Some(ending) = self.closing.take() {
            out.push(Action::CancelTimer(Timer::ByeWait));
            self.end(ending, out);
        }
    }

    fn on_request(&mut self, leg: Leg, request: Request, key: Option<TransactionKey>, out: &mut Vec<Action>) {
        if request.method == Method::Ack {
            if leg == Leg::A {
                self.caller_acked(&request, out);
            }
            return;
        }
        let Some(key) = key else { return };
        if leg == Leg::A {
            // Any request in the dialog shows the caller has the 2xx.
            self.stop_2xx(out);
        }
        if request.method == Method::Bye && self.referrer_hangs_up(leg, &request, &key, out) {
            return;
        }
        if request.method == Method::Bye {
            out.push(Action::Respond { key, response: response_to(&request, 200, Some("OK"), None) });
            let (text, by) = match leg {
                Leg::A => ("caller hung up", Ender::Caller),
                Leg::B => ("callee hung up", Ender::Callee),
            };
            let other = leg.other();
            if self.leg(other).is_some() {
                let reason = relayed_reason(&request, text);
                let wait = self.wait_for_bye;
                self.bye(other, &reason, wait, out);
            }
            self.close(Ending { code: 200, reason: text.into(), by }, out);
            return;
        }
        if self.answer_plain_refresh(leg, &request, &key, out)
            || self.info_dtmf(leg, &request, &key, out)
            || self.on_refer(leg, &request, &key, out)
        {
            return;
        }
        if self.leg(leg.other()).is_some() {
            self.forward(leg, request, key, out);
            return;
        }
        let is_offer = matches!(request.method, Method::Invite | Method::Update) && !request.body.is_empty();
        let response = match &mut self.media {
            MediaMode::AnswerHere(media) if is_offer => match media.answer(&request.body) {
                Ok(answer) => {
                    // Hold and resume: answered on the same session, the relay follows.
                    let mut response = response_to(&request, 200, Some("OK"), None);
                    let contact = self.leg(leg).map(|l| l.setup.dialog.contact.clone()).unwrap_or_default();
                    response.headers.push(Header::Contact(headers::Contact::new(contact)));
                    message::set_body(&mut response.headers, &mut response.body, answer, Some("application/sdp"));
                    response
                }
                Err(code) => response_to(&request, code, None, None),
            },
            MediaMode::RefuseOffers { .. } if is_offer => response_to(&request, 488, None, None),
            _ => response_to(&request, 200, Some("OK"), None),
        };
        out.push(Action::Respond { key, response });
    }

    /// The caller's ACK: stops the 2xx retransmissions; with a delayed offer it carries the
    /// caller's answer to the node's offer.
    fn caller_acked(&mut self, ack: &Request, out: &mut Vec<Action>) {
        if let Some(retransmitter) = self.uas2xx.as_mut() {
            let actions = retransmitter.on_ack(ack);
            out.extend(actions.into_iter().filter_map(|a| uas2xx_action(Leg::A, a)));
            if retransmitter.is_done() {
                self.uas2xx = None;
            }
        }
        let result = match &mut self.media {
            MediaMode::Anchored(anchor) if anchor.awaits_caller_answer() => anchor.caller_acked(&ack.body),
            MediaMode::AnswerHere(media) => media.ack_answer(&ack.body),
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::info!(%error, "the caller's ACK has no usable answer to the node's offer");
            let why = format!("caller's answer in ACK: {error}");
            self.system_hangup(HangupReason::incompatible(&why), 488, why, out);
        }
    }

    /// Stops the 2xx retransmissions without an ACK (another request showed the 2xx arrived).
    fn stop_2xx(&mut self, out: &mut Vec<Action>) {
        if let Some(retransmitter) = self.uas2xx.take()
            && !retransmitter.is_done()
        {
            out.push(Action::CancelTimer(Timer::Uas2xx(Uas2xxTimer::Retransmit)));
            out.push(Action::CancelTimer(Timer::Uas2xx(Uas2xxTimer::GiveUp)));
        }
    }

    fn on_response(&mut self, leg: Leg, response: Response, out: &mut Vec<Action>) {
        let is_original_2xx = leg == Leg::B
            && self.b_invite_cseq.is_some_and(|n| message::cseq(&response) == Some((n, Method::Invite)))
            && (200..300).contains(&message::status(&response));
        if is_original_2xx {
            // Our ACK was lost: the callee retransmits its 2xx.
            if let (Some(cseq), Some(b)) = (self.b_invite_cseq, self.b.as_mut()) {
                let via = via(&b.setup);
                let ack = b.setup.dialog.request(Method::Ack, via, Some(cseq), None);
                out.push(Action::SendStateless { leg: Leg::B, message: SipMessage::Request(ack) });
            }
            return;
        }
        if self.refresh_answered(leg, &response, out) || self.resume_answered(leg, &response, out) {
            return;
        }
        self.relay_final(leg, response, out);
    }

    /// The node ends the call: BYE on the callee's leg (not awaited), then on the caller's
    /// (awaited when configured); with one leg, BYE on it.
    fn system_hangup(&mut self, reason: HangupReason, code: u16, why: String, out: &mut Vec<Action>) {
        let header = [reason.header()];
        let wait = self.wait_for_bye;
        if self.a.is_some() {
            self.bye(Leg::B, &header, false, out);
            self.bye(Leg::A, &header, wait, out);
        } else {
            self.bye(Leg::B, &header, wait, out);
        }
        self.close(Ending { code, reason: why, by: Ender::System }, out);
    }

    /// Sends BYE on a leg (if there is one) with the `Reason` header(s) saying why (RFC 3326).
    fn bye(&mut self, leg: Leg, reason: &[Header], wait: bool, out: &mut Vec<Action>) {
        let Some(state) = self.leg_mut(leg) else { return };
        let via = via(&state.setup);
        let bye = state.setup.dialog.bye(via, reason);
        if wait {
            state.bye_wait = Some(state.setup.dialog.local_cseq);
        }
        out.push(Action::Send { leg, request: bye });
    }

    /// Ends the call once the awaited BYEs are answered (at once when none is awaited).
    fn close(&mut self, ending: Ending, out: &mut Vec<Action>) {
        self.stop_2xx(out);
        if self.a.as_ref().is_some_and(|s| s.bye_wait.is_some())
            || self.b.as_ref().is_some_and(|s| s.bye_wait.is_some())
        {
            out.push(Action::Schedule(Timer::ByeWait, BYE_WAIT));
            self.closing = Some(ending);
        } else {
            self.end(ending, out);
        }
    }

    /// The call is over: nothing more is retransmitted, and the requests still forwarded get
    /// no answer from here (their transactions time out with the legs).
    fn end(&mut self, ending: Ending, out: &mut Vec<Action>) {
        self.stop_2xx(out);
        self.pending.clear();
        self.ended = true;
        out.push(Action::End(ending));
    }

    fn leg(&self, leg: Leg) -> Option<&LegState> {
        match leg {
            Leg::A => self.a.as_ref(),
            Leg::B => self.b.as_ref(),
        }
    }

    fn leg_mut(&mut self, leg: Leg) -> Option<&mut LegState> {
        match leg {
            Leg::A => self.a.as_mut(),
            Leg::B => self.b.as_mut(),
        }
    }
}

/// The machine's action for an action of the 2xx retransmitter (`SendBye` and `Done` are
/// handled by the caller).
fn uas2xx_action(leg: Leg, action: Uas2xxAction) -> Option<Action> {
    match action {
        Uas2xxAction::Send(response) => Some(Action::Retransmit { leg, response }),
        Uas2xxAction::Schedule(timer, after) => Some(Action::Schedule(Timer::Uas2xx(timer), after)),
        Uas2xxAction::CancelTimer(timer) => Some(Action::CancelTimer(Timer::Uas2xx(timer))),
        Uas2xxAction::SendBye | Uas2xxAction::Done => None,
    }
}

/// A Via header for a request on the leg, with a fresh branch and `rport` (RFC 3581).
fn via(leg: &LegSetup) -> Header {
    let (host, port) = &leg.sent_by;
    let protocol = leg.dialog.peer.protocol.as_str();
    Header::Via(format!("SIP/2.0/{protocol} {host}:{port};branch={};rport", new_branch()).into())
}

/// The Reason to put on the BYE relayed to the other leg: the hanging-up side's own, else
/// normal clearing with `text`.
fn relayed_reason(request: &Request, text: &str) -> Vec<Header> {
    let theirs = message::reason_headers(request);
    if theirs.is_empty() { vec![HangupReason::normal(text).header()] } else { theirs }
}
