//! Server transactions (RFC 3261 17.2, with the RFC 6026 Accepted state for INVITE).

use std::time::Duration;

use rsip::{Method, Request, Response, SipMessage};

use super::{Action, TRYING_DELAY, Timer, TimerConfig, response_to, status};

/// States of a server INVITE transaction (RFC 3261 figure 7, RFC 6026 figure 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerInviteState {
    /// Request handed to the TU; provisional responses may be sent.
    Proceeding,
    /// A non-2xx final was sent; Timers G (unreliable) and H wait for the ACK.
    Completed,
    /// The ACK came; Timer I absorbs its retransmissions.
    Confirmed,
    /// A 2xx was sent; Timer L absorbs INVITE retransmissions (the TU or
    /// [`super::Uas2xxRetransmitter`] retransmits the 2xx itself).
    Accepted,
    /// Over; the driver drops it.
    Terminated,
}

/// A server INVITE transaction: delivers the INVITE to the TU once, sends `100 Trying` if the
/// TU is silent for 200 ms, answers INVITE retransmissions with the last response, retransmits
/// a non-2xx final until the ACK comes, and absorbs that ACK.
#[derive(Debug)]
pub struct ServerInvite {
    request: Request,
    reliable: bool,
    cfg: TimerConfig,
    state: ServerInviteState,
    /// The last response sent (provisional in Proceeding, final after).
    last: Option<Response>,
    /// Current Timer G interval.
    interval_g: Duration,
}

impl ServerInvite {
    /// Creates the transaction for a new INVITE: delivers it to the TU and arms the Trying
    /// timer.
    pub fn new(request: Request, reliable: bool, cfg: &TimerConfig) -> (Self, Vec<Action>) {
        let actions =
            vec![Action::Deliver(SipMessage::Request(request.clone())), Action::Schedule(Timer::Trying, TRYING_DELAY)];
        let txn = ServerInvite {
            request,
            reliable,
            cfg: *cfg,
            state: ServerInviteState::Proceeding,
            last: None,
            interval_g: cfg.t1,
        };
        (txn, actions)
    }

    /// The current state.
    pub fn state(&self) -> ServerInviteState {
        self.state
    }

    /// The INVITE this transaction serves.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Feeds a request whose key matched: an INVITE retransmission or an ACK.
    pub fn on_request(&mut self, request: Request) -> Vec<Action> {
        use ServerInviteState::*;
        match (self.state, request.method) {
            // 17.2.1: a retransmitted INVITE gets the most recent response again (none yet in
            // Proceeding: the Trying timer will answer it).
            (Proceeding | Completed, Method::Invite) => self.resend_last(),
            (Completed, Method::Ack) => {
                let mut actions = Vec::new();
                if !self.reliable {
                    actions.push(Action::CancelTimer(Timer::G));
                }
                actions.push(Action::CancelTimer(Timer::H));
                if self.reliable {
                    self.state = Terminated;
                    actions.push(Action::Terminated);
                } else {
                    self.state = Confirmed;
                    actions.push(Action::Schedule(Timer::I, self.cfg.t4));
                }
                actions
            }
            // RFC 6026 8.7: an ACK matching the transaction in Accepted (the peer reused the
            // INVITE's branch) goes to the TU, which is waiting for it.
            (Accepted, Method::Ack) => vec![Action::Deliver(SipMessage::Request(request))],
            // Confirmed absorbs ACK and INVITE retransmissions; Accepted absorbs INVITEs; an ACK
            // before any final is meaningless; anything else cannot match an INVITE key.
            _ => Vec::new(),
        }
    }

    /// Sends a response from the TU. Provisionals are sent and remembered; a 2xx moves to
    /// Accepted (and may be sent again in Accepted, for the TU's own 2xx retransmissions); a
    /// non-2xx final moves to Completed. Anything the state does not allow (a late provisional
    /// after a final, a second final) is dropped.
    pub fn respond(&mut self, response: Response) -> Vec<Action> {
        use ServerInviteState::*;
        match (self.state, status(&response)) {
            (Proceeding, 100..=199) => {
                self.last = Some(response.clone());
                vec![Action::CancelTimer(Timer::Trying), Action::Send(SipMessage::Response(response))]
            }
            (Proceeding, 200..=299) => {
                self.state = Accepted;
                self.last = Some(response.clone());
                vec![
                    Action::CancelTimer(Timer::Trying),
                    Action::Send(SipMessage::Response(response)),
                    Action::Schedule(Timer::L, self.cfg.timeout()),
                ]
            }
            (Proceeding, 300..=699) => {
                self.state = Completed;
                self.last = Some(response.clone());
                let mut actions =
                    vec![Action::CancelTimer(Timer::Trying), Action::Send(SipMessage::Response(response))];
                if !self.reliable {
                    actions.push(Action::Schedule(Timer::G, self.interval_g));
                }
                actions.push(Action::Schedule(Timer::H, self.cfg.timeout()));
                actions
            }
            (Accepted, 200..=299) => vec![Action::Send(SipMessage::Response(response))],
            _ => Vec::new(),
        }
    }

    /// Feeds an expired timer.
    pub fn on_timer(&mut self, timer: Timer) -> Vec<Action> {
        use ServerInviteState::*;
        match (self.state, timer) {
            (Proceeding, Timer::Trying) if self.last.is_none() => {
                let trying = response_to(&self.request, 100, None, None);
                self.last = Some(trying.clone());
                vec![Action::Send(SipMessage::Response(trying))]
            }
            (Completed, Timer::G) if !self.reliable => {
                self.interval_g = self.cfg.next_capped(self.interval_g);
                let mut actions = self.resend_last();
                actions.push(Action::Schedule(Timer::G, self.interval_g));
                actions
            }
            (Completed, Timer::H) => {
                self.state = Terminated;
                let mut actions = Vec::new();
                if !self.reliable {
                    actions.push(Action::CancelTimer(Timer::G));
                }
                actions.extend([Action::Timeout, Action::Terminated]);
                actions
            }
            (Confirmed, Timer::I) | (Accepted, Timer::L) => {
                self.state = Terminated;
                vec![Action::Terminated]
            }
            _ => Vec::new(),
        }
    }

    fn resend_last(&self) -> Vec<Action> {
        self.last.iter().map(|r| Action::Send(SipMessage::Response(r.clone()))).collect()
    }
}

/// States of a server non-INVITE transaction (RFC 3261 figure 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerNonInviteState {
    /// Request handed to the TU, nothing sent yet; retransmissions are absorbed.
    Trying,
    /// A provisional was sent; retransmissions get it again.
    Proceeding,
    /// A final was sent; Timer J answers retransmissions with it.
    Completed,
    /// Over; the driver drops it.
    Terminated,
}

/// A server non-INVITE transaction.
#[derive(Debug)]
pub struct ServerNonInvite {
    request: Request,
    reliable: bool,
    cfg: TimerConfig,
    state: ServerNonInviteState,
    last: Option<Response>,
}

impl ServerNonInvite {
    /// Creates the transaction for a new request and delivers it to the TU. No timer runs
    /// until the TU answers (RFC 3261 has none in Trying/Proceeding).
    pub fn new(request: Request, reliable: bool, cfg: &TimerConfig) -> (Self, Vec<Action>) {
        let actions = vec![Action::Deliver(SipMessage::Request(request.clone()))];
        let txn = ServerNonInvite { request, reliable, cfg: *cfg, state: ServerNonInviteState::Trying, last: None };
        (txn, actions)
    }

    /// The current state.
    pub fn state(&self) -> ServerNonInviteState {
        self.state
    }

    /// The request this transaction serves.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Feeds a retransmission of the request: absorbed in Trying, answered with the last
    /// response in Proceeding and Completed.
    pub fn on_request(&mut self, _request: Request) -> Vec<Action> {
        match self.state {
            ServerNonInviteState::Proceeding | ServerNonInviteState::Completed => {
                self.last.iter().map(|r| Action::Send(SipMessage::Response(r.clone()))).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Sends a response from the TU; anything after the final is dropped.
    pub fn respond(&mut self, response: Response) -> Vec<Action> {
        use ServerNonInviteState::*;
        match (self.state, status(&response)) {
            (Trying | Proceeding, 100..=199) => {
                self.state = Proceeding;
                self.last = Some(response.clone());
                vec![Action::Send(SipMessage::Response(response))]
            }
            (Trying | Proceeding, 200..=699) => {
                self.last = Some(response.clone());
                let mut actions = vec![Action::Send(SipMessage::Response(response))];
                if self.reliable {
                    self.state = Terminated;
                    actions.push(Action::Terminated);
                } else {
                    self.state = Completed;
                    actions.push(Action::Schedule(Timer::J, self.cfg.timeout()));
                }
                actions
            }
            _ => Vec::new(),
        }
    }

    /// Feeds an expired timer.
    pub fn on_timer(&mut self, timer: Timer) -> Vec<Action> {
        match (self.state, timer) {
            (ServerNonInviteState::Completed, Timer::J) => {
                self.state = ServerNonInviteState::Terminated;
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

    fn ack() -> Request {
        let mut ack = invite();
        ack.method = Method::Ack;
        ack
    }

    fn server_udp() -> ServerInvite {
        ServerInvite::new(invite(), false, &cfg()).0
    }

    #[test]
    fn new_invite_is_delivered_and_trying_armed() {
        let (txn, actions) = ServerInvite::new(invite(), false, &cfg());
        assert_eq!(txn.state(), ServerInviteState::Proceeding);
        assert_eq!(
            actions,
            vec![
                Action::Deliver(SipMessage::Request(invite())),
                Action::Schedule(Timer::Trying, Duration::from_millis(200))
            ]
        );
    }

    #[test]
    fn trying_is_sent_when_the_tu_is_silent_and_resent_on_retransmission() {
        let mut txn = server_udp();
        // A retransmission before anything was sent is absorbed.
        assert!(txn.on_request(invite()).is_empty());
        let actions = txn.on_timer(Timer::Trying);
        let [Action::Send(SipMessage::Response(trying))] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(trying.status_code.code(), 100);
        assert!(header(trying, "To")[0].ends_with("<sip:bob@biloxi.example.com>"), "100 carries no tag");
        assert_eq!(txn.on_request(invite()), actions);
        assert_eq!(txn.state(), ServerInviteState::Proceeding);
    }

    #[test]
    fn trying_timer_is_ignored_after_the_tu_answered() {
        let mut txn = server_udp();
        let ringing = response(&invite(), 180);
        assert_eq!(
            txn.respond(ringing.clone()),
            vec![Action::CancelTimer(Timer::Trying), Action::Send(SipMessage::Response(ringing.clone()))]
        );
        assert!(txn.on_timer(Timer::Trying).is_empty());
        assert_eq!(txn.on_request(invite()), vec![Action::Send(SipMessage::Response(ringing))]);
    }

    #[test]
    fn two_hundred_goes_to_accepted_absorbs_invites_and_ends_with_l() {
        let mut txn = server_udp();
        txn.respond(response(&invite(), 180));
        let ok = response(&invite(), 200);
        assert_eq!(
            txn.respond(ok.clone()),
            vec![
                Action::CancelTimer(Timer::Trying),
                Action::Send(SipMessage::Response(ok.clone())),
                Action::Schedule(Timer::L, Duration::from_secs(32)),
            ]
        );
        assert_eq!(txn.state(), ServerInviteState::Accepted);
        assert!(txn.on_request(invite()).is_empty(), "INVITE retransmission absorbed, no new call");
        assert_eq!(txn.respond(ok.clone()), vec![Action::Send(SipMessage::Response(ok))], "TU 2xx retransmission");
        assert!(txn.respond(response(&invite(), 180)).is_empty(), "late provisional absorbed");
        assert!(txn.respond(response(&invite(), 486)).is_empty());
        assert_eq!(txn.on_request(ack()), vec![Action::Deliver(SipMessage::Request(ack()))]);
        assert!(txn.on_timer(Timer::H).is_empty());
        assert_eq!(txn.on_timer(Timer::L), vec![Action::Terminated]);
        assert_eq!(txn.state(), ServerInviteState::Terminated);
        assert!(txn.on_request(invite()).is_empty());
    }

    #[test]
    fn non_2xx_retransmits_with_g_capped_until_ack_then_i() {
        let mut txn = server_udp();
        let busy = response(&invite(), 486);
        assert_eq!(
            txn.respond(busy.clone()),
            vec![
                Action::CancelTimer(Timer::Trying),
                Action::Send(SipMessage::Response(busy.clone())),
                Action::Schedule(Timer::G, Duration::from_millis(500)),
                Action::Schedule(Timer::H, Duration::from_secs(32)),
            ]
        );
        assert_eq!(txn.state(), ServerInviteState::Completed);
        let mut intervals = Vec::new();
        for _ in 0..5 {
            let actions = txn.on_timer(Timer::G);
            assert_eq!(actions[0], Action::Send(SipMessage::Response(busy.clone())));
            let Some(Action::Schedule(Timer::G, d)) = actions.last() else { panic!("{actions:?}") };
            intervals.push(d.as_millis());
        }
        assert_eq!(intervals, vec![1000, 2000, 4000, 4000, 4000]);
        // A retransmitted INVITE gets the final again; a late provisional from the TU is dropped.
        assert_eq!(txn.on_request(invite()), vec![Action::Send(SipMessage::Response(busy.clone()))]);
        assert!(txn.respond(response(&invite(), 180)).is_empty());
        assert!(txn.respond(response(&invite(), 200)).is_empty());
        // The ACK is absorbed (never delivered) and moves to Confirmed.
        assert_eq!(
            txn.on_request(ack()),
            vec![
                Action::CancelTimer(Timer::G),
                Action::CancelTimer(Timer::H),
                Action::Schedule(Timer::I, Duration::from_secs(5))
            ]
        );
        assert_eq!(txn.state(), ServerInviteState::Confirmed);
        assert!(txn.on_request(ack()).is_empty());
        assert!(txn.on_request(invite()).is_empty());
        assert!(txn.on_timer(Timer::G).is_empty());
        assert!(txn.on_timer(Timer::H).is_empty());
        assert_eq!(txn.on_timer(Timer::I), vec![Action::Terminated]);
        assert_eq!(txn.state(), ServerInviteState::Terminated);
    }

    #[test]
    fn timer_h_reports_missing_ack() {
        let mut txn = server_udp();
        txn.respond(response(&invite(), 603));
        assert_eq!(txn.on_timer(Timer::H), vec![Action::CancelTimer(Timer::G), Action::Timeout, Action::Terminated]);
        assert_eq!(txn.state(), ServerInviteState::Terminated);
        assert!(txn.on_request(ack()).is_empty());
    }

    #[test]
    fn reliable_server_invite_has_no_g_and_no_i() {
        let (mut txn, _) = ServerInvite::new(invite(), true, &cfg());
        let busy = response(&invite(), 404);
        assert_eq!(
            txn.respond(busy.clone()),
            vec![
                Action::CancelTimer(Timer::Trying),
                Action::Send(SipMessage::Response(busy)),
                Action::Schedule(Timer::H, Duration::from_secs(32)),
            ]
        );
        assert!(txn.on_timer(Timer::G).is_empty());
        assert_eq!(txn.on_request(ack()), vec![Action::CancelTimer(Timer::H), Action::Terminated]);
        assert_eq!(txn.state(), ServerInviteState::Terminated);
        let (mut txn, _) = ServerInvite::new(invite(), true, &cfg());
        txn.respond(response(&invite(), 500));
        assert_eq!(txn.on_timer(Timer::H), vec![Action::Timeout, Action::Terminated]);
    }

    #[test]
    fn ack_before_final_is_ignored() {
        let mut txn = server_udp();
        assert!(txn.on_request(ack()).is_empty());
        assert_eq!(txn.state(), ServerInviteState::Proceeding);
    }

    #[test]
    fn server_non_invite_lifecycle_unreliable() {
        let bye = non_invite("BYE");
        let (mut txn, actions) = ServerNonInvite::new(bye.clone(), false, &cfg());
        assert_eq!(actions, vec![Action::Deliver(SipMessage::Request(bye.clone()))]);
        assert_eq!(txn.state(), ServerNonInviteState::Trying);
        assert!(txn.on_request(bye.clone()).is_empty(), "absorbed in Trying");
        let trying = response(&bye, 100);
        assert_eq!(txn.respond(trying.clone()), vec![Action::Send(SipMessage::Response(trying.clone()))]);
        assert_eq!(txn.state(), ServerNonInviteState::Proceeding);
        assert_eq!(txn.on_request(bye.clone()), vec![Action::Send(SipMessage::Response(trying))]);
        let ok = response(&bye, 200);
        assert_eq!(
            txn.respond(ok.clone()),
            vec![Action::Send(SipMessage::Response(ok.clone())), Action::Schedule(Timer::J, Duration::from_secs(32))]
        );
        assert_eq!(txn.state(), ServerNonInviteState::Completed);
        assert_eq!(txn.on_request(bye.clone()), vec![Action::Send(SipMessage::Response(ok))]);
        assert!(txn.respond(response(&bye, 500)).is_empty(), "second final dropped");
        assert!(txn.respond(response(&bye, 100)).is_empty(), "late provisional dropped");
        assert!(txn.on_timer(Timer::K).is_empty());
        assert_eq!(txn.on_timer(Timer::J), vec![Action::Terminated]);
        assert_eq!(txn.state(), ServerNonInviteState::Terminated);
        assert!(txn.on_request(bye).is_empty());
    }

    #[test]
    fn server_non_invite_reliable_terminates_on_final() {
        let bye = non_invite("BYE");
        let (mut txn, _) = ServerNonInvite::new(bye.clone(), true, &cfg());
        let ok = response(&bye, 200);
        assert_eq!(txn.respond(ok.clone()), vec![Action::Send(SipMessage::Response(ok)), Action::Terminated]);
        assert_eq!(txn.state(), ServerNonInviteState::Terminated);
        assert!(txn.on_timer(Timer::J).is_empty());
    }
}
