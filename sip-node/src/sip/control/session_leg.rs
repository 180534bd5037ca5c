//! One dialog's session timer as the call's connected phase runs it (RFC 4028 section 10):
//! the schedule ([`SessionTimer`]), the refreshes the node sends and their outcome, and the
//! refreshes the peer sends. Sans-IO: it builds requests and headers from a [`Dialog`] and
//! reads responses, and its timers are actions for the driver.
//!
//! A B2BUA runs one timer per leg, independently: a refresh without SDP (an UPDATE, as RFC 4028
//! recommends, or a re-INVITE without an offer) is answered by the node on its own leg and not
//! passed to the other, whose leg has its own refresher (often the node). An in-dialog offer
//! travels to the other leg as before (even an unchanged one: the other side may answer it
//! differently), and counts as a refresh on both legs.

use rsip::{Header, Method, Request, Response};

use super::session_timer::{
    Negotiated, RefreshFailure, SessionTimer, SessionTimerAction, SessionTimerKind, TimerPolicy, TimerRequest,
    TimerResponse, UacOffer, UasDecision, negotiate_uas, too_small_headers,
};
use crate::sip::dialog::Dialog;
use crate::sip::message;
use crate::sip::transaction::response_to;

/// A leg's negotiated timer and the largest Min-SE seen on it (its refreshes carry it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegTimer {
    pub negotiated: Negotiated,
    pub min_se: u32,
}

impl LegTimer {
    /// The timer of a leg the node called, after the callee's 2xx to the node's INVITE that
    /// carried `offer` (after any 422, whose Min-SE the leg's refreshes keep carrying).
    /// Malformed timer headers in the 2xx are read as none: the node then refreshes the leg
    /// itself, which is always safe. Shared by every outbound leg (B2BUA callees, REFER
    /// targets, calls placed through the API).
    pub fn after_answer(offer: &UacOffer, answer: &rsip::Headers) -> LegTimer {
        let response = TimerResponse::from_headers(answer).unwrap_or_default();
        LegTimer { negotiated: offer.negotiate(&response), min_se: offer.min_se }
    }
}

/// What a response on the leg meant for its session timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The node's refresh succeeded (a 2xx to a re-INVITE still needs its ACK).
    Refreshed(Vec<SessionTimerAction>),
    /// The node's refresh failed.
    Failed(RefreshFailure),
}

/// The session timer of one leg.
#[derive(Debug, Clone)]
pub struct LegSession {
    timer: SessionTimer,
    /// The CSeq and method of the node's refresh in flight.
    refresh: Option<(u32, Method)>,
}

impl LegSession {
    /// Starts the leg's schedule.
    pub fn start(leg: LegTimer) -> (LegSession, Vec<SessionTimerAction>) {
        let (timer, actions) = SessionTimer::new(leg.negotiated, leg.min_se);
        (LegSession { timer, refresh: None }, actions)
    }

    /// The schedule.
    pub fn timer(&self) -> &SessionTimer {
        &self.timer
    }

    /// A timer of the leg fired.
    pub fn on_timer(&mut self, kind: SessionTimerKind) -> Vec<SessionTimerAction> {
        self.timer.on_timer(kind)
    }

    /// The node's refresh on this leg: a re-INVITE with `sdp` (the node's current SDP on the
    /// leg, so that nothing changes) or, without SDP to send, an UPDATE without a body (RFC
    /// 4028 section 7.4 allows either); with the timer headers of [`UacOffer::refresh`].
    pub fn refresh_request(&mut self, dialog: &mut Dialog, via: Header, sdp: Option<Vec<u8>>) -> Request {
        self.request_with_offer(dialog, via, sdp, self.timer.refresh_offer())
    }

    /// Like [`LegSession::refresh_request`] with the offer a 422 asked for.
    pub fn retry_request(
        &mut self,
        dialog: &mut Dialog,
        via: Header,
        sdp: Option<Vec<u8>>,
        offer: UacOffer,
    ) -> Request {
        self.request_with_offer(dialog, via, sdp, offer)
    }

    fn request_with_offer(
        &mut self,
        dialog: &mut Dialog,
        via: Header,
        sdp: Option<Vec<u8>>,
        offer: UacOffer,
    ) -> Request {
        let method = if sdp.is_some() { Method::Invite } else { Method::Update };
        let body = sdp.map(|sdp| ("application/sdp", sdp));
        let mut request = dialog.request(method, via, None, body);
        request.headers.extend(offer.request_headers());
        self.refresh = Some((dialog.local_cseq, method));
        request
    }

    /// Whether `response` answers the node's refresh in flight.
    pub fn is_refresh_response(&self, response: &Response) -> bool {
        self.refresh.is_some_and(|(cseq, method)| message::cseq(response) == Some((cseq, method)))
    }

    /// A final response to the node's refresh (see [`LegSession::is_refresh_response`]).
    pub fn on_refresh_response(&mut self, response: &Response) -> Option<RefreshOutcome> {
        if !self.is_refresh_response(response) {
            return None;
        }
        let status = message::status(response);
        if status < 200 {
            return None;
        }
        self.refresh = None;
        if (200..300).contains(&status) {
            let offer = self.timer.refresh_offer();
            let negotiated = offer.negotiate(&TimerResponse::from_headers(&response.headers).unwrap_or_default());
            return Some(RefreshOutcome::Refreshed(self.timer.on_refreshed(negotiated)));
        }
        Some(RefreshOutcome::Failed(self.timer.on_refresh_failed(status, &response.headers)))
    }

    /// The node's refresh got no final response (Timer B/F): as a 408.
    pub fn on_refresh_timeout(&mut self) -> Option<RefreshFailure> {
        self.refresh.take().map(|_| RefreshFailure::Bye)
    }

    /// Whether an INVITE/UPDATE from the peer only refreshes the session: it carries no SDP.
    pub fn is_plain_refresh(&self, request: &Request) -> bool {
        matches!(request.method, Method::Invite | Method::Update) && request.body.is_empty()
    }

    /// The peer's INVITE/UPDATE is a session refresh the node answers 2xx: the timer headers
    /// for that 2xx and the rescheduled timers; or the response refusing it (422 below the
    /// node's Min-SE, 400 for malformed timer headers).
    pub fn answer_refresh(
        &mut self,
        request: &Request,
        policy: &TimerPolicy,
    ) -> Result<(Vec<Header>, Vec<SessionTimerAction>), Response> {
        let asked = TimerRequest::from_headers(&request.headers)
            .map_err(|error| response_to(request, 400, Some(&error.to_string()), None))?;
        match negotiate_uas(&asked, policy) {
            UasDecision::Accept(negotiated) => {
                let mut headers = vec![Header::Supported(super::session_timer::OPTION_TAG.into())];
                headers.extend(negotiated.uas_response_headers());
                Ok((headers, self.timer.on_refreshed(negotiated)))
            }
            UasDecision::TooSmall { min_se } => {
                let mut refusal = response_to(
                    request,
                    super::session_timer::TOO_SMALL,
                    Some(super::session_timer::TOO_SMALL_REASON),
                    None,
                );
                refusal.headers.extend(too_small_headers(min_se));
                Err(refusal)
            }
        }
    }

    /// The timer headers for an INVITE/UPDATE the node sends on this leg on behalf of the
    /// other leg (an offer that changes media): the leg's current refresh offer.
    pub fn forwarded_request_headers(&self) -> Vec<Header> {
        self.timer.refresh_offer().request_headers()
    }

    /// A 2xx to an INVITE/UPDATE the node forwarded on this leg: the session is refreshed.
    pub fn forwarded_answered(&mut self, response: &Response) -> Vec<SessionTimerAction> {
        let offer = self.timer.refresh_offer();
        let negotiated = offer.negotiate(&TimerResponse::from_headers(&response.headers).unwrap_or_default());
        self.timer.on_refreshed(negotiated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::control::header_values;
    use crate::sip::control::session_timer::Refresher;
    use crate::sip::transport::{Peer, Protocol};
    use SessionTimerAction::{Schedule, SendRefresh};
    use SessionTimerKind::{Expiry, Refresh};
    use std::time::Duration;

    const SDP: &[u8] =
        b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

    fn dialog() -> Dialog {
        Dialog {
            call_id: "c1".into(),
            local_tag: "n1".into(),
            local: "<sip:node@127.0.0.1>;tag=n1".into(),
            remote: "<sip:peer@127.0.0.1>;tag=p1".into(),
            remote_target: rsip::Uri::try_from("sip:peer@127.0.0.1:5070").unwrap(),
            route_set: vec![],
            local_cseq: 1,
            peer: Peer { protocol: Protocol::Udp, addr: "127.0.0.1:5070".parse().unwrap() },
            contact: "<sip:node@127.0.0.1:5060>".into(),
        }
    }

    fn via() -> Header {
        Header::Via("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKtest".into())
    }

    fn ours(interval: u32) -> LegTimer {
        LegTimer { negotiated: Negotiated { interval, refresher: Refresher::Uac, we_refresh: true }, min_se: 90 }
    }

    fn response(request: &Request, code: u16, headers: &[(&str, &str)]) -> Response {
        let mut response = response_to(request, code, None, None);
        for (n, v) in headers {
            response.headers.push(Header::Other((*n).into(), (*v).into()));
        }
        response
    }

    #[test]
    fn the_node_refreshes_with_its_sdp_and_restarts_on_the_2xx() {
        let (mut leg, actions) = LegSession::start(ours(90));
        assert_eq!(
            actions,
            vec![Schedule(Expiry, Duration::from_secs(60)), Schedule(Refresh, Duration::from_secs(45))]
        );
        assert_eq!(leg.on_timer(Refresh), vec![SendRefresh]);
        let mut d = dialog();
        let refresh = leg.refresh_request(&mut d, via(), Some(b"v=0 ours".to_vec()));
        assert_eq!(refresh.method, Method::Invite);
        assert_eq!(message::cseq(&refresh), Some((2, Method::Invite)));
        assert_eq!(refresh.body, b"v=0 ours");
        assert_eq!(header_values(&refresh.headers, "Session-Expires")[0], "90;refresher=uac");
        assert_eq!(header_values(&refresh.headers, "Min-SE")[0], "90");
        // A provisional response changes nothing; another transaction's response is not ours.
        assert_eq!(leg.on_refresh_response(&response(&refresh, 100, &[])), None);
        let mut other = response(&refresh, 200, &[]);
        other.headers.retain(|h| !matches!(h, Header::CSeq(_)));
        other.headers.push(Header::CSeq("9 INVITE".into()));
        assert_eq!(leg.on_refresh_response(&other), None);
        // A callee without timers answers without Session-Expires: the node keeps refreshing.
        let outcome = leg.on_refresh_response(&response(&refresh, 200, &[])).unwrap();
        assert_eq!(
            outcome,
            RefreshOutcome::Refreshed(vec![
                Schedule(Expiry, Duration::from_secs(60)),
                Schedule(Refresh, Duration::from_secs(45))
            ])
        );
        // Without SDP to send, the refresh is an UPDATE without a body.
        let update = leg.refresh_request(&mut d, via(), None);
        assert_eq!((update.method, update.body.len()), (Method::Update, 0));
        assert_eq!(message::cseq(&update), Some((3, Method::Update)));
    }

    #[test]
    fn a_refresh_answered_481_or_never_ends_the_leg_and_422_is_retried() {
        let (mut leg, _) = LegSession::start(ours(90));
        let mut d = dialog();
        let refresh = leg.refresh_request(&mut d, via(), Some(SDP.to_vec()));
        assert_eq!(
            leg.on_refresh_response(&response(&refresh, 481, &[])),
            Some(RefreshOutcome::Failed(RefreshFailure::Bye))
        );
        let refresh = leg.refresh_request(&mut d, via(), Some(SDP.to_vec()));
        let Some(RefreshOutcome::Failed(RefreshFailure::RetryNow(offer))) =
            leg.on_refresh_response(&response(&refresh, 422, &[("Min-SE", "300")]))
        else {
            panic!("422 must be retried")
        };
        let retry = leg.retry_request(&mut d, via(), Some(SDP.to_vec()), offer);
        assert_eq!(header_values(&retry.headers, "Session-Expires")[0], "300;refresher=uac");
        assert!(leg.is_refresh_response(&response(&retry, 200, &[])));
        assert_eq!(leg.on_refresh_timeout(), Some(RefreshFailure::Bye));
        assert_eq!(leg.on_refresh_timeout(), None, "nothing in flight any more");
    }

    #[test]
    fn the_peers_refresh_without_sdp_is_answered_on_its_leg() {
        let peer = LegTimer {
            negotiated: Negotiated { interval: 90, refresher: Refresher::Uac, we_refresh: false },
            min_se: 90,
        };
        let (mut leg, _) = LegSession::start(peer);
        let mut d = dialog();
        let mut reinvite = d.request(Method::Update, via(), None, None);
        reinvite.headers.push(Header::Supported("timer".into()));
        reinvite.headers.push(Header::Other("Session-Expires".into(), "90;refresher=uac".into()));
        assert!(leg.is_plain_refresh(&reinvite));
        let (headers, actions) = leg.answer_refresh(&reinvite, &TimerPolicy::default()).unwrap();
        let headers: rsip::Headers = headers.into();
        assert_eq!(header_values(&headers, "Session-Expires")[0], "90;refresher=uac");
        assert_eq!(header_values(&headers, "Require")[0], "timer");
        assert_eq!(actions[0], Schedule(Expiry, Duration::from_secs(60)));
        // An offer (even an unchanged one) is for the other leg too, not a plain refresh.
        let mut offer = reinvite.clone();
        offer.body = SDP.to_vec();
        assert!(!leg.is_plain_refresh(&offer));
        offer.method = Method::Invite;
        assert!(!leg.is_plain_refresh(&offer));
        offer.body.clear();
        assert!(leg.is_plain_refresh(&offer), "a re-INVITE without an offer");
        // Too short an interval: 422 with the node's Min-SE.
        let mut short = reinvite.clone();
        short.headers.retain(|h| !matches!(h, Header::Other(n, _) if n == "Session-Expires"));
        short.headers.push(Header::Other("Session-Expires".into(), "60".into()));
        let refusal = leg.answer_refresh(&short, &TimerPolicy::default()).unwrap_err();
        assert_eq!(message::status(&refusal), 422);
        assert_eq!(header_values(&refusal.headers, "Min-SE")[0], "90");
    }

    #[test]
    fn a_forwarded_offer_refreshes_the_leg_it_went_to() {
        let (mut leg, _) = LegSession::start(ours(600));
        let headers: rsip::Headers = leg.forwarded_request_headers().into();
        assert_eq!(header_values(&headers, "Session-Expires")[0], "600;refresher=uac");
        let mut d = dialog();
        let forwarded = d.request(Method::Invite, via(), None, None);
        let actions = leg.forwarded_answered(&response(&forwarded, 200, &[("Session-Expires", "600;refresher=uas")]));
        assert_eq!(actions, vec![Schedule(Expiry, Duration::from_secs(568)), SessionTimerAction::Cancel(Refresh)]);
        assert!(!leg.timer().negotiated().we_refresh, "the peer took the refresher role");
    }
}
