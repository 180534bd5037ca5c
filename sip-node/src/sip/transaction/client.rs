//! Client transactions (RFC 3261 17.1, with the RFC 6026 Accepted state for INVITE).

use std::time::Duration;

use rsip::headers::UntypedHeader as _;
use rsip::{Header, Headers, Method, Request, Response, SipMessage};

use super::{Action, TIMER_D_UNRELIABLE, Timer, TimerConfig, status};

/// States of a client INVITE transaction (RFC 3261 figure 5, RFC 6026 figure 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientInviteState {
    /// INVITE sent, nothing heard yet; Timers A (unreliable) and B run.
    Calling,
    /// A provisional response came; no timers (the TU runs its own ring timeout, Timer C).
    Proceeding,
    /// A non-2xx final came and was ACKed; Timer D absorbs its retransmissions.
    Completed,
    /// A 2xx came; Timer M keeps the transaction so that 2xx retransmissions reach the TU.
    Accepted,
    /// Over; the driver drops it.
    Terminated,
}

/// A client INVITE transaction. It retransmits the INVITE on unreliable transports, delivers
/// every provisional and the first final response to the TU, ACKs non-2xx finals itself
/// (RFC 3261 17.1.1.3), and leaves the ACK for a 2xx to the TU (a dialog-level request).
#[derive(Debug)]
pub struct ClientInvite {
    request: Request,
    reliable: bool,
    cfg: TimerConfig,
    state: ClientInviteState,
    /// Current Timer A interval.
    interval_a: Duration,
    /// The ACK sent for the non-2xx final, re-sent on each retransmission of that final.
    ack: Option<Request>,
    /// The TU sent a CANCEL for this INVITE: Timer B bounds the wait for the final again.
    cancel_sent: bool,
}

impl ClientInvite {
    /// Starts the transaction for `request` (an INVITE with its own top Via and fresh branch):
    /// sends it and arms Timer A (unreliable only) and Timer B.
    pub fn new(request: Request, reliable: bool, cfg: &TimerConfig) -> (Self, Vec<Action>) {
        let mut actions = vec![Action::Send(SipMessage::Request(request.clone()))];
        if !reliable {
            actions.push(Action::Schedule(Timer::A, cfg.t1));
        }
        actions.push(Action::Schedule(Timer::B, cfg.timeout()));
        let txn = ClientInvite {
            request,
            reliable,
            cfg: *cfg,
            state: ClientInviteState::Calling,
            interval_a: cfg.t1,
            ack: None,
            cancel_sent: false,
        };
        (txn, actions)
    }

    /// The current state.
    pub fn state(&self) -> ClientInviteState {
        self.state
    }

    /// The INVITE this transaction sends (the TU needs it to build a CANCEL or a 2xx ACK).
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Tells the transaction that the TU sent a CANCEL for it. Without a provisional response
    /// no timer bounds the wait for a final one; after a CANCEL, RFC 3261 9.1 gives up on the
    /// INVITE 64*T1 later, so Timer B is armed again (in Calling it still runs) and its expiry
    /// ends the transaction with `Timeout` if neither 487 nor any other final came.
    pub fn cancel_sent(&mut self) -> Vec<Action> {
        match self.state {
            ClientInviteState::Calling | ClientInviteState::Proceeding if !self.cancel_sent => {
                self.cancel_sent = true;
                if self.state == ClientInviteState::Proceeding {
                    vec![Action::Schedule(Timer::B, self.cfg.timeout())]
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// Feeds a response whose key matched this transaction.
    pub fn on_response(&mut self, response: Response) -> Vec<Action> {
        use ClientInviteState::*;
        let code = status(&response);
        match (self.state, code) {
            (Calling | Proceeding, 100..=199) => {
                let mut actions = Vec::new();
                if self.state == Calling {
                    // RFC 3261 17.1.1.2: a provisional stops retransmissions, and Timer B only
                    // bounds the Calling state (unless a CANCEL is pending, see `cancel_sent`).
                    if !self.reliable {
                        actions.push(Action::CancelTimer(Timer::A));
                    }
                    if !self.cancel_sent {
                        actions.push(Action::CancelTimer(Timer::B));
                    }
                    self.state = Proceeding;
                }
                actions.push(Action::Deliver(SipMessage::Response(response)));
                actions
            }
            (Calling | Proceeding, 200..=299) => {
                let mut actions = self.stop_calling_timers();
                self.state = Accepted;
                actions.push(Action::Deliver(SipMessage::Response(response)));
                actions.push(Action::Schedule(Timer::M, self.cfg.timeout()));
                actions
            }
            (Calling | Proceeding, 300..=699) => {
                let ack = build_ack(&self.request, &response);
                let mut actions = self.stop_calling_timers();
                actions.push(Action::Deliver(SipMessage::Response(response)));
                actions.push(Action::Send(SipMessage::Request(ack.clone())));
                self.ack = Some(ack);
                if self.reliable {
                    self.state = Terminated;
                    actions.push(Action::Terminated);
                } else {
                    self.state = Completed;
                    actions.push(Action::Schedule(Timer::D, TIMER_D_UNRELIABLE));
                }
                actions
            }
            // Retransmission of the non-2xx final: ACK again, do not bother the TU.
            (Completed, 300..=699) => match &self.ack {
                Some(ack) => vec![Action::Send(SipMessage::Request(ack.clone()))],
                None => Vec::new(),
            },
            // RFC 6026: every 2xx (retransmissions, other forks) goes to the TU, which ACKs it.
            (Accepted, 200..=299) => vec![Action::Deliver(SipMessage::Response(response))],
            // Late provisionals (reordered over UDP), a 2xx after a non-2xx, a non-2xx after a
            // 2xx, anything after Terminated or with a nonsense code: absorbed.
            _ => Vec::new(),
        }
    }

    /// Feeds an expired timer.
    pub fn on_timer(&mut self, timer: Timer) -> Vec<Action> {
        use ClientInviteState::*;
        match (self.state, timer) {
            (Calling, Timer::A) if !self.reliable => {
                // RFC 3261 17.1.1.2: Timer A doubles each time and, unlike Timer E, is not capped
                // at T2; Timer B ends the retransmissions (7 sends with default timers).
                self.interval_a *= 2;
                vec![
                    Action::Send(SipMessage::Request(self.request.clone())),
                    Action::Schedule(Timer::A, self.interval_a),
                ]
            }
            (Calling, Timer::B) | (Proceeding, Timer::B) if self.state == Calling || self.cancel_sent => {
                let was_calling = self.state == Calling;
                self.state = Terminated;
                let mut actions = Vec::new();
                if was_calling && !self.reliable {
                    actions.push(Action::CancelTimer(Timer::A));
                }
                actions.extend([Action::Timeout, Action::Terminated]);
                actions
            }
            (Completed, Timer::D) | (Accepted, Timer::M) => {
                self.state = Terminated;
                vec![Action::Terminated]
            }
            _ => Vec::new(),
        }
    }

    /// Disarms what runs before a final: A and B in Calling, B in Proceeding after a CANCEL.
    fn stop_calling_timers(&self) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state == ClientInviteState::Calling && !self.reliable {
            actions.push(Action::CancelTimer(Timer::A));
        }
        if self.state == ClientInviteState::Calling || self.cancel_sent {
            actions.push(Action::CancelTimer(Timer::B));
        }
        actions
    }
}

/// The ACK for a non-2xx final response (RFC 3261 17.1.1.3): the INVITE's Request-URI,
/// Call-ID, From, top Via only and Route headers; the response's To (with its tag); the
/// INVITE's CSeq number with method ACK; Max-Forwards 70 and no body.
fn build_ack(invite: &Request, response: &Response) -> Request {
    let mut headers = Headers::default();
    if let Some(via) = invite.headers.iter().find_map(|h| if let Header::Via(v) = h { Some(v) } else { None }) {
        // Only the top Via value, even when several share the header line.
        let top = via.value().split(',').next().unwrap_or_default().trim().to_string();
        headers.push(Header::Via(top.into()));
    }
    headers.push(Header::MaxForwards(70.into()));
    for header in invite.headers.iter() {
        match header {
            Header::Route(_) | Header::From(_) | Header::CallId(_) => headers.push(header.clone()),
            _ => {}
        }
    }
    let to = response.headers.iter().find(|h| matches!(h, Header::To(_)));
    let to = to.or_else(|| invite.headers.iter().find(|h| matches!(h, Header::To(_))));
    if let Some(to) = to {
        headers.push(to.clone());
    }
    let seq = invite.headers.iter().find_map(|h| match h {
        Header::CSeq(cseq) => cseq.value().split_whitespace().next().map(str::to_string),
        _ => None,
    });
    headers.push(Header::CSeq(format!("{} ACK", seq.unwrap_or_else(|| "1".into())).into()));
    headers.push(Header::ContentLength(Default::default()));
    Request { method: Method::Ack, uri: invite.uri.clone(), version: rsip::Version::V2, headers, body: Vec::new() }
}

/// States of a client non-INVITE transaction (RFC 3261 figure 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientNonInviteState {
    /// Request sent; Timers E (unreliable) and F run.
    Trying,
    /// A provisional came; retransmissions continue every T2.
    Proceeding,
    /// A final came; Timer K absorbs its retransmissions.
    Completed,
    /// Over; the driver drops it.
    Terminated,
}

/// A client non-INVITE transaction (REGISTER, BYE, OPTIONS, CANCEL, ...).
#[derive(Debug)]
pub struct ClientNonInvite {
    request: Request,
    reliable: bool,
    cfg: TimerConfig,
    state: ClientNonInviteState,
    /// Current Timer E interval.
    interval_e: Duration,
}

impl ClientNonInvite {
    /// Starts the transaction: sends `request` and arms Timer E (unreliable only) and Timer F.
    pub fn new(request: Request, reliable: bool, cfg: &TimerConfig) -> (Self, Vec<Action>) {
        let mut actions = vec![Action::Send(SipMessage::Request(request.clone()))];
        if !reliable {
            actions.push(Action::Schedule(Timer::E, cfg.t1));
        }
        actions.push(Action::Schedule(Timer::F, cfg.timeout()));
        let txn =
            ClientNonInvite { request, reliable, cfg: *cfg, state: ClientNonInviteState::Trying, interval_e: cfg.t1 };
        (txn, actions)
    }

    /// The current state.
    pub fn state(&self) -> ClientNonInviteState {
        self.state
    }

    /// The request this transaction sends.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Feeds a response whose key matched this transaction.
    pub fn on_response(&mut self, response: Response) -> Vec<Action> {
        use ClientNonInviteState::*;
        match (self.state, status(&response)) {
            (Trying | Proceeding, 100..=199) => {
                self.state = Proceeding;
                vec![Action::Deliver(SipMessage::Response(response))]
            }
            (Trying | Proceeding, 200..=699) => {
                let mut actions = Vec::new();
                if !self.reliable {
                    actions.push(Action::CancelTimer(Timer::E));
                }
                actions.push(Action::CancelTimer(Timer::F));
                actions.push(Action::Deliver(SipMessage::Response(response)));
                if self.reliable {
                    self.state = Terminated;
                    actions.push(Action::Terminated);
                } else {
                    self.state = Completed;
                    actions.push(Action::Schedule(Timer::K, self.cfg.t4));
                }
                actions
            }
            // Retransmitted finals in Completed, late provisionals, nonsense codes: absorbed.
            _ => Vec::new(),
        }
    }

    /// Feeds an expired timer.
    pub fn on_timer(&mut self, timer: Timer) -> Vec<Action> {
        use ClientNonInviteState::*;
        match (self.state, timer) {
            (Trying | Proceeding, Timer::E) if !self.reliable => {
                // 17.1.2.2: doubling up to T2 in Trying, T2 flat once a provisional came.
                self.interval_e =
                    if self.state == Proceeding { self.cfg.t2 } else { self.cfg.next_capped(self.interval_e) };
                vec![
                    Action::Send(SipMessage::Request(self.request.clone())),
                    Action::Schedule(Timer::E, self.interval_e),
                ]
            }
            (Trying | Proceeding, Timer::F) => {
                self.state = Terminated;
                let mut actions = Vec::new();
                if !self.reliable {
                    actions.push(Action::CancelTimer(Timer::E));
                }
                actions.extend([Action::Timeout, Action::Terminated]);
                actions
            }
            (Completed, Timer::K) => {
                self.state = Terminated;
                vec![Action::Terminated]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn cfg() -> TimerConfig {
        TimerConfig::default()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn invite_udp() -> ClientInvite {
        ClientInvite::new(invite(), false, &cfg()).0
    }

    #[test]
    fn invite_start_unreliable_and_reliable() {
        let (txn, actions) = ClientInvite::new(invite(), false, &cfg());
        assert_eq!(txn.state(), ClientInviteState::Calling);
        assert_eq!(
            actions,
            vec![
                Action::Send(SipMessage::Request(invite())),
                Action::Schedule(Timer::A, ms(500)),
                Action::Schedule(Timer::B, Duration::from_secs(32)),
            ]
        );
        let (_, actions) = ClientInvite::new(invite(), true, &cfg());
        assert_eq!(
            actions,
            vec![Action::Send(SipMessage::Request(invite())), Action::Schedule(Timer::B, Duration::from_secs(32))]
        );
    }

    #[test]
    fn timer_a_doubles_without_t2_cap_until_b() {
        let mut txn = invite_udp();
        let mut intervals = Vec::new();
        for _ in 0..6 {
            let actions = txn.on_timer(Timer::A);
            assert_eq!(sent(&actions), vec![&SipMessage::Request(invite())]);
            match actions.last() {
                Some(Action::Schedule(Timer::A, d)) => intervals.push(d.as_millis()),
                other => panic!("unexpected {other:?}"),
            }
        }
        // 0.5 s initial, then 1, 2, 4, 8, 16, 32 s: RFC 3261 17.1.1.2 (T2 does not cap A).
        assert_eq!(intervals, vec![1000, 2000, 4000, 8000, 16000, 32000]);
        let actions = txn.on_timer(Timer::B);
        assert_eq!(actions, vec![Action::CancelTimer(Timer::A), Action::Timeout, Action::Terminated]);
        assert_eq!(txn.state(), ClientInviteState::Terminated);
        assert!(txn.on_timer(Timer::A).is_empty());
        assert!(txn.on_response(response(&invite(), 200)).is_empty());
    }

    #[test]
    fn timer_a_is_ignored_on_reliable_transports() {
        let (mut txn, _) = ClientInvite::new(invite(), true, &cfg());
        assert!(txn.on_timer(Timer::A).is_empty());
        assert_eq!(txn.on_timer(Timer::B), vec![Action::Timeout, Action::Terminated]);
    }

    #[test]
    fn provisional_moves_to_proceeding_and_stops_a_and_b() {
        let mut txn = invite_udp();
        let ringing = response(&invite(), 180);
        let actions = txn.on_response(ringing.clone());
        assert_eq!(
            actions,
            vec![
                Action::CancelTimer(Timer::A),
                Action::CancelTimer(Timer::B),
                Action::Deliver(SipMessage::Response(ringing.clone()))
            ]
        );
        assert_eq!(txn.state(), ClientInviteState::Proceeding);
        // More provisionals are delivered, stale timers ignored.
        assert_eq!(txn.on_response(ringing.clone()), vec![Action::Deliver(SipMessage::Response(ringing))]);
        assert!(txn.on_timer(Timer::A).is_empty());
        assert!(txn.on_timer(Timer::B).is_empty());
        assert_eq!(txn.state(), ClientInviteState::Proceeding);
    }

    #[test]
    fn two_hundred_goes_to_accepted_and_delivers_retransmissions() {
        let mut txn = invite_udp();
        txn.on_response(response(&invite(), 180));
        let ok = response(&invite(), 200);
        let actions = txn.on_response(ok.clone());
        assert_eq!(
            actions,
            vec![
                Action::Deliver(SipMessage::Response(ok.clone())),
                Action::Schedule(Timer::M, Duration::from_secs(32))
            ]
        );
        assert_eq!(txn.state(), ClientInviteState::Accepted);
        assert!(sent(&actions).is_empty(), "the TU ACKs a 2xx, not the transaction");
        // 2xx retransmission: delivered again so that the TU re-ACKs.
        assert_eq!(txn.on_response(ok.clone()), vec![Action::Deliver(SipMessage::Response(ok))]);
        // A late 180 after the 200 (Kamailio over UDP) and a stray non-2xx are absorbed.
        assert!(txn.on_response(response(&invite(), 180)).is_empty());
        assert!(txn.on_response(response(&invite(), 486)).is_empty());
        assert_eq!(txn.on_timer(Timer::M), vec![Action::Terminated]);
        assert_eq!(txn.state(), ClientInviteState::Terminated);
    }

    #[test]
    fn two_hundred_in_calling_cancels_timers() {
        let mut txn = invite_udp();
        let actions = txn.on_response(response(&invite(), 200));
        assert_eq!(&actions[..2], &[Action::CancelTimer(Timer::A), Action::CancelTimer(Timer::B)]);
        let (mut txn, _) = ClientInvite::new(invite(), true, &cfg());
        let actions = txn.on_response(response(&invite(), 200));
        assert_eq!(actions[0], Action::CancelTimer(Timer::B));
        assert_eq!(txn.state(), ClientInviteState::Accepted);
    }

    #[test]
    fn non_2xx_is_acked_and_retransmissions_re_acked_until_d() {
        let mut txn = invite_udp();
        let busy = response(&invite(), 486);
        let actions = txn.on_response(busy.clone());
        assert_eq!(txn.state(), ClientInviteState::Completed);
        assert_eq!(&actions[..2], &[Action::CancelTimer(Timer::A), Action::CancelTimer(Timer::B)]);
        assert_eq!(actions[2], Action::Deliver(SipMessage::Response(busy.clone())));
        let ack = match &actions[3] {
            Action::Send(SipMessage::Request(ack)) => ack.clone(),
            other => panic!("expected ACK, got {other:?}"),
        };
        assert_eq!(actions[4], Action::Schedule(Timer::D, Duration::from_secs(32)));
        assert_eq!(actions.len(), 5);
        // Retransmitted final: the same ACK again, nothing for the TU.
        assert_eq!(txn.on_response(busy.clone()), vec![Action::Send(SipMessage::Request(ack))]);
        // Late provisional and a 2xx in Completed are absorbed.
        assert!(txn.on_response(response(&invite(), 183)).is_empty());
        assert!(txn.on_response(response(&invite(), 200)).is_empty());
        assert!(txn.on_timer(Timer::A).is_empty());
        assert_eq!(txn.on_timer(Timer::D), vec![Action::Terminated]);
        assert_eq!(txn.state(), ClientInviteState::Terminated);
        assert!(txn.on_response(busy).is_empty());
    }

    #[test]
    fn non_2xx_on_reliable_terminates_at_once() {
        let (mut txn, _) = ClientInvite::new(invite(), true, &cfg());
        txn.on_response(response(&invite(), 100));
        let actions = txn.on_response(response(&invite(), 503));
        assert_eq!(txn.state(), ClientInviteState::Terminated);
        assert_eq!(actions.len(), 3, "{actions:?}");
        assert!(matches!(&actions[0], Action::Deliver(_)));
        assert!(matches!(&actions[1], Action::Send(SipMessage::Request(r)) if r.method == Method::Ack));
        assert_eq!(actions[2], Action::Terminated);
    }

    #[test]
    fn ack_for_non_2xx_has_the_rfc_content() {
        let invite = request(
            "INVITE sip:bob@biloxi.example.com;user=phone SIP/2.0\r\n\
Via: SIP/2.0/UDP me.example.com:5060;branch=z9hG4bKtop1, SIP/2.0/UDP other;branch=z9hG4bKx\r\n\
Via: SIP/2.0/UDP second.example.com;branch=z9hG4bKsecond\r\n\
Max-Forwards: 12\r\n\
Route: <sip:p1.example.com;lr>\r\n\
Route: <sip:p2.example.com;lr>\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: call-1@me\r\n\
CSeq: 77 INVITE\r\n\
Contact: <sip:alice@me.example.com>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n",
        );
        let mut txn = ClientInvite::new(invite.clone(), false, &cfg()).0;
        let mut reply = response_to_with_tag(&invite, 404, "srvtag");
        reply.headers.push(Header::Contact("<sip:elsewhere@example.net>".into()));
        let actions = txn.on_response(reply);
        let ack = sent(&actions)[0].clone();
        let SipMessage::Request(ack) = ack else { panic!("ACK is a request") };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, invite.uri);
        assert_eq!(header(&ack, "Via"), vec!["SIP/2.0/UDP me.example.com:5060;branch=z9hG4bKtop1"]);
        assert_eq!(header(&ack, "Route"), vec!["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]);
        assert_eq!(header(&ack, "From"), vec!["Alice <sip:alice@atlanta.example.com>;tag=1928301774"]);
        assert_eq!(header(&ack, "To"), vec!["Bob <sip:bob@biloxi.example.com>;tag=srvtag"]);
        assert_eq!(header(&ack, "Call-ID"), vec!["call-1@me"]);
        assert_eq!(header(&ack, "CSeq"), vec!["77 ACK"]);
        assert_eq!(header(&ack, "Max-Forwards"), vec!["70"]);
        assert_eq!(header(&ack, "Content-Length"), vec!["0"]);
        assert!(header(&ack, "Contact").is_empty() && header(&ack, "Content-Type").is_empty());
        assert!(ack.body.is_empty());
        let text = ack.to_string();
        assert!(Request::try_from(text.as_bytes()).is_ok(), "{text}");
    }

    fn response_to_with_tag(req: &Request, code: u16, tag: &str) -> Response {
        super::super::response_to(req, code, None, Some(tag))
    }

    #[test]
    fn final_after_timeout_or_in_terminated_is_absorbed() {
        let mut txn = invite_udp();
        txn.on_timer(Timer::B);
        assert!(txn.on_response(response(&invite(), 180)).is_empty());
        assert!(txn.on_response(response(&invite(), 486)).is_empty());
        assert!(txn.on_timer(Timer::D).is_empty());
    }

    #[test]
    fn cancel_sent_bounds_proceeding_with_timer_b() {
        let mut txn = invite_udp();
        txn.on_response(response(&invite(), 180));
        assert!(txn.on_timer(Timer::B).is_empty(), "B means nothing in Proceeding without a CANCEL");
        assert_eq!(txn.cancel_sent(), vec![Action::Schedule(Timer::B, Duration::from_secs(32))]);
        assert!(txn.cancel_sent().is_empty(), "only once");
        assert_eq!(txn.on_timer(Timer::B), vec![Action::Timeout, Action::Terminated]);
        assert_eq!(txn.state(), ClientInviteState::Terminated);
        // The 487 normally comes first and completes the transaction as any non-2xx.
        let mut txn = invite_udp();
        txn.on_response(response(&invite(), 183));
        txn.cancel_sent();
        let actions = txn.on_response(response(&invite(), 487));
        assert_eq!(txn.state(), ClientInviteState::Completed);
        assert_eq!(actions[0], Action::CancelTimer(Timer::B));
        assert!(matches!(&actions[1], Action::Deliver(_)), "{actions:?}");
        assert!(txn.on_timer(Timer::B).is_empty());
        // Cancelled in Calling (B still runs): a provisional then keeps B armed.
        let mut txn = invite_udp();
        assert!(txn.cancel_sent().is_empty());
        let actions = txn.on_response(response(&invite(), 180));
        assert!(!actions.contains(&Action::CancelTimer(Timer::B)), "{actions:?}");
        assert_eq!(txn.on_timer(Timer::B).last(), Some(&Action::Terminated));
        // After a final, nothing to do.
        let mut txn = invite_udp();
        txn.on_response(response(&invite(), 200));
        assert!(txn.cancel_sent().is_empty());
    }

    #[test]
    fn odd_codes_are_absorbed() {
        let mut txn = invite_udp();
        let mut odd = response(&invite(), 180);
        odd.status_code = rsip::StatusCode::Other(799, "Odd".into());
        assert!(txn.on_response(odd).is_empty());
        assert_eq!(txn.state(), ClientInviteState::Calling);
    }

    fn options_udp() -> (ClientNonInvite, Vec<Action>) {
        ClientNonInvite::new(non_invite("OPTIONS"), false, &cfg())
    }

    #[test]
    fn non_invite_start() {
        let (txn, actions) = options_udp();
        assert_eq!(txn.state(), ClientNonInviteState::Trying);
        assert_eq!(
            actions,
            vec![
                Action::Send(SipMessage::Request(non_invite("OPTIONS"))),
                Action::Schedule(Timer::E, ms(500)),
                Action::Schedule(Timer::F, Duration::from_secs(32)),
            ]
        );
        let (_, actions) = ClientNonInvite::new(non_invite("OPTIONS"), true, &cfg());
        assert_eq!(actions.len(), 2);
        assert_eq!(actions[1], Action::Schedule(Timer::F, Duration::from_secs(32)));
    }

    #[test]
    fn timer_e_doubles_and_caps_at_t2_then_f_times_out() {
        let (mut txn, _) = options_udp();
        let mut intervals = Vec::new();
        for _ in 0..6 {
            let actions = txn.on_timer(Timer::E);
            assert_eq!(sent(&actions).len(), 1);
            let Some(Action::Schedule(Timer::E, d)) = actions.last() else { panic!("{actions:?}") };
            intervals.push(d.as_millis());
        }
        assert_eq!(intervals, vec![1000, 2000, 4000, 4000, 4000, 4000]);
        assert_eq!(txn.on_timer(Timer::F), vec![Action::CancelTimer(Timer::E), Action::Timeout, Action::Terminated]);
        assert_eq!(txn.state(), ClientNonInviteState::Terminated);
        assert!(txn.on_timer(Timer::E).is_empty());
    }

    #[test]
    fn timer_e_is_t2_in_proceeding() {
        let (mut txn, _) = options_udp();
        let trying = response(&non_invite("OPTIONS"), 100);
        assert_eq!(txn.on_response(trying.clone()), vec![Action::Deliver(SipMessage::Response(trying))]);
        assert_eq!(txn.state(), ClientNonInviteState::Proceeding);
        let actions = txn.on_timer(Timer::E);
        assert_eq!(actions.last(), Some(&Action::Schedule(Timer::E, Duration::from_secs(4))));
        assert_eq!(txn.on_timer(Timer::F), vec![Action::CancelTimer(Timer::E), Action::Timeout, Action::Terminated]);
    }

    #[test]
    fn non_invite_final_goes_to_completed_then_k() {
        let (mut txn, _) = options_udp();
        let ok = response(&non_invite("OPTIONS"), 200);
        let actions = txn.on_response(ok.clone());
        assert_eq!(
            actions,
            vec![
                Action::CancelTimer(Timer::E),
                Action::CancelTimer(Timer::F),
                Action::Deliver(SipMessage::Response(ok.clone())),
                Action::Schedule(Timer::K, Duration::from_secs(5)),
            ]
        );
        assert_eq!(txn.state(), ClientNonInviteState::Completed);
        assert!(txn.on_response(ok).is_empty(), "retransmitted final absorbed");
        assert!(txn.on_response(response(&non_invite("OPTIONS"), 180)).is_empty(), "late provisional absorbed");
        assert!(txn.on_timer(Timer::E).is_empty());
        assert!(txn.on_timer(Timer::F).is_empty());
        assert_eq!(txn.on_timer(Timer::K), vec![Action::Terminated]);
        assert_eq!(txn.state(), ClientNonInviteState::Terminated);
    }

    #[test]
    fn non_invite_reliable_final_terminates_at_once() {
        let (mut txn, _) = ClientNonInvite::new(non_invite("BYE"), true, &cfg());
        assert!(txn.on_timer(Timer::E).is_empty());
        let ok = response(&non_invite("BYE"), 481);
        assert_eq!(
            txn.on_response(ok.clone()),
            vec![Action::CancelTimer(Timer::F), Action::Deliver(SipMessage::Response(ok)), Action::Terminated]
        );
        assert_eq!(txn.state(), ClientNonInviteState::Terminated);
    }

    #[test]
    fn custom_timer_config_is_used() {
        let cfg = TimerConfig { t1: ms(100), t2: ms(300), t4: ms(700) };
        let (mut txn, actions) = ClientNonInvite::new(non_invite("OPTIONS"), false, &cfg);
        assert_eq!(actions[1..], [Action::Schedule(Timer::E, ms(100)), Action::Schedule(Timer::F, ms(6400))]);
        assert_eq!(txn.on_timer(Timer::E).last(), Some(&Action::Schedule(Timer::E, ms(200))));
        assert_eq!(txn.on_timer(Timer::E).last(), Some(&Action::Schedule(Timer::E, ms(300))));
        let actions = txn.on_response(response(&non_invite("OPTIONS"), 200));
        assert_eq!(actions.last(), Some(&Action::Schedule(Timer::K, ms(700))));
    }
}
