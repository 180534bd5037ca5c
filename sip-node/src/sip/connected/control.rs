//! Call control in the connected machine (issue 24): each leg's RFC 4028 session timer (the
//! node's refreshes and their outcome, the peers' refreshes, expiry), and DTMF by SIP INFO
//! checked before it is passed on. The rules are in `sip/control/`; this is the glue to the
//! machine's legs, timers and actions.

use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response, SipMessage};

use super::{Action, Connected, Leg, LegSetup, LegState, MediaMode, Timer, via};
use crate::sip::control::dtmf_info;
use crate::sip::control::session_leg::{LegSession, RefreshOutcome};
use crate::sip::control::session_timer::{RefreshFailure, SessionTimerAction, SessionTimerKind, UacOffer};
use crate::sip::message::{self, HangupReason};
use crate::sip::transaction::{TransactionKey, response_to};

impl LegState {
    /// A leg of the machine, its session timer started (its timers go into `out`).
    pub(super) fn new(leg: Leg, setup: LegSetup, out: &mut Vec<Action>) -> LegState {
        let session = setup.session.map(|timer| {
            let (session, actions) = LegSession::start(timer);
            out.extend(actions.into_iter().filter_map(|a| timer_action(leg, a)));
            session
        });
        LegState { setup, bye_wait: None, session }
    }
}

/// The machine's action for a session timer's schedule action (the others are handled by the
/// caller).
pub(super) fn timer_action(leg: Leg, action: SessionTimerAction) -> Option<Action> {
    match action {
        SessionTimerAction::Schedule(kind, after) => Some(Action::Schedule(Timer::Session(leg, kind), after)),
        SessionTimerAction::Cancel(kind) => Some(Action::CancelTimer(Timer::Session(leg, kind))),
        SessionTimerAction::SendRefresh | SessionTimerAction::Expired => None,
    }
}

fn leg_name(leg: Leg) -> &'static str {
    match leg {
        Leg::A => "caller's",
        Leg::B => "callee's",
    }
}

impl Connected<'_> {
    /// The node's current SDP on `leg`, when it knows it: it anchors the media, or it is the
    /// far end of an API call's only leg (whose refreshes then go by re-INVITE: a callee need
    /// not allow UPDATE).
    fn sdp_on(&self, leg: Leg) -> Option<Vec<u8>> {
        match &self.media {
            MediaMode::Anchored(anchor) => anchor.last_sent(leg),
            MediaMode::AnswerHere(local) => local.last_sent(),
            MediaMode::RefuseOffers { sent } => sent.clone(),
            MediaMode::PassThrough => None,
        }
    }

    /// A leg's session timer fired: refresh, or end the call when the session expired.
    pub(super) fn on_session_timer(&mut self, leg: Leg, kind: SessionTimerKind, out: &mut Vec<Action>) {
        let Some(session) = self.leg_mut(leg).and_then(|l| l.session.as_mut()) else { return };
        for action in session.on_timer(kind) {
            match action {
                SessionTimerAction::SendRefresh => self.send_refresh(leg, None, out),
                SessionTimerAction::Expired => {
                    tracing::info!(?leg, "session timer expired");
                    let why = format!("session timer expired on the {} leg (RFC 4028)", leg_name(leg));
                    self.system_hangup(HangupReason::timer(&why), 408, why, out);
                    return;
                }
                other => out.extend(timer_action(leg, other)),
            }
        }
    }

    /// Sends the node's session refresh on `leg`: a re-INVITE with the node's current SDP
    /// there (an UPDATE without a body when it has none), with the offer a 422 asked for when
    /// retrying.
    fn send_refresh(&mut self, leg: Leg, retry: Option<UacOffer>, out: &mut Vec<Action>) {
        let sdp = self.sdp_on(leg);
        let Some(state) = self.leg_mut(leg) else { return };
        let via = via(&state.setup);
        let Some(session) = state.session.as_mut() else { return };
        let request = match retry {
            Some(offer) => session.retry_request(&mut state.setup.dialog, via, sdp, offer),
            None => session.refresh_request(&mut state.setup.dialog, via, sdp),
        };
        out.push(Action::Send { leg, request });
    }

    /// A response on `leg`; `true` when it answered the node's refresh there (a 2xx to a
    /// re-INVITE is ACKed here).
    pub(super) fn refresh_answered(&mut self, leg: Leg, response: &Response, out: &mut Vec<Action>) -> bool {
        let Some(state) = self.leg_mut(leg) else { return false };
        if !state.session.as_ref().is_some_and(|s| s.is_refresh_response(response)) {
            return false;
        }
        let status = message::status(response);
        if let Some((number, Method::Invite)) = message::cseq(response)
            && (200..300).contains(&status)
        {
            let via = via(&state.setup);
            let ack = state.setup.dialog.request(Method::Ack, via, Some(number), None);
            out.push(Action::SendStateless { leg, message: SipMessage::Request(ack) });
        }
        match state.session.as_mut().and_then(|s| s.on_refresh_response(response)) {
            None | Some(RefreshOutcome::Failed(RefreshFailure::WaitForExpiry)) => {}
            Some(RefreshOutcome::Refreshed(actions)) => {
                out.extend(actions.into_iter().filter_map(|a| timer_action(leg, a)))
            }
            Some(RefreshOutcome::Failed(RefreshFailure::Bye)) => {
                let why = format!("session refresh on the {} leg answered {status} (RFC 4028)", leg_name(leg));
                self.system_hangup(HangupReason::timer(&why), 408, why, out);
            }
            Some(RefreshOutcome::Failed(RefreshFailure::RetryNow(offer))) => self.send_refresh(leg, Some(offer), out),
        }
        true
    }

    /// A request sent on `leg` got no final response; `true` when it was the node's refresh,
    /// which ends the call (RFC 3261 12.2.1.2).
    pub(super) fn refresh_timed_out(&mut self, leg: Leg, out: &mut Vec<Action>) -> bool {
        let failure = self.leg_mut(leg).and_then(|l| l.session.as_mut()).and_then(LegSession::on_refresh_timeout);
        if failure.is_none() {
            return false;
        }
        let why = format!("session refresh on the {} leg got no answer (RFC 4028)", leg_name(leg));
        self.system_hangup(HangupReason::timer(&why), 408, why, out);
        true
    }

    /// A peer's INVITE/UPDATE without SDP only refreshes its leg's session: the node answers it
    /// on that leg (a re-INVITE with its current SDP there) instead of passing it across.
    /// `false` when it is not one, or a re-INVITE the node has no SDP to answer with.
    pub(super) fn answer_plain_refresh(
        &mut self,
        leg: Leg,
        request: &Request,
        key: &TransactionKey,
        out: &mut Vec<Action>,
    ) -> bool {
        let policy = self.session_policy;
        let sdp = self.sdp_on(leg);
        let Some(state) = self.leg_mut(leg) else { return false };
        let Some(session) = state.session.as_mut() else { return false };
        if !session.is_plain_refresh(request) || (request.method == Method::Invite && sdp.is_none()) {
            return false;
        }
        let response = match session.answer_refresh(request, &policy) {
            Ok((timer_headers, actions)) => {
                out.extend(actions.into_iter().filter_map(|a| timer_action(leg, a)));
                let mut response = response_to(request, 200, Some("OK"), None);
                response.headers.push(Header::Contact(headers::Contact::new(state.setup.dialog.contact.clone())));
                response.headers.extend(timer_headers);
                if let (Method::Invite, Some(sdp)) = (request.method, sdp) {
                    message::set_body(&mut response.headers, &mut response.body, sdp, Some("application/sdp"));
                }
                response
            }
            Err(refusal) => refusal,
        };
        out.push(Action::Respond { key: key.clone(), response });
        true
    }

    /// A forwarded INVITE/UPDATE got a 2xx on `leg`: both legs' sessions are refreshed, and the
    /// 2xx relayed to `from` says its timer.
    pub(super) fn offer_answered(
        &mut self,
        leg: Leg,
        response: &Response,
        from: Leg,
        request: &Request,
        relayed: &mut Response,
        out: &mut Vec<Action>,
    ) {
        if let Some(session) = self.leg_mut(leg).and_then(|l| l.session.as_mut()) {
            let actions = session.forwarded_answered(response);
            out.extend(actions.into_iter().filter_map(|a| timer_action(leg, a)));
        }
        let policy = self.session_policy;
        if let Some(session) = self.leg_mut(from).and_then(|l| l.session.as_mut())
            && let Ok((timer_headers, actions)) = session.answer_refresh(request, &policy)
        {
            relayed.headers.extend(timer_headers);
            out.extend(actions.into_iter().filter_map(|a| timer_action(from, a)));
        }
    }

    /// A key press by SIP INFO from `from`: the body to pass on (one well-formed
    /// application/dtmf-relay body), or the refusal of a garbage body (the sender's error, not
    /// the other side's: it is not passed on).
    pub(super) fn dtmf_info(
        &self,
        from: Leg,
        request: &Request,
        content_type: &str,
    ) -> Result<(String, Vec<u8>), Response> {
        match dtmf_info::parse(content_type, &request.body) {
            Ok(dtmf) => {
                tracing::debug!(leg = ?from, key = %dtmf.key, duration_ms = dtmf.duration_ms, "DTMF by INFO");
                Ok((dtmf_info::RELAY_CONTENT_TYPE.into(), dtmf_info::relay_body(&dtmf).into_bytes()))
            }
            Err(error) => {
                tracing::info!(%error, leg = ?from, "INFO with an unusable DTMF body refused");
                let mut refusal = response_to(request, error.status(), None, None);
                refusal.headers.push(Header::Other("Warning".into(), format!("399 switchboard \"{error}\"")));
                Err(refusal)
            }
        }
    }
}
