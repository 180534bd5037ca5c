//! RFC 3262 reliable provisional responses (`100rel`, PRACK).
//!
//! Carriers that send `Require: 100rel` refuse a `420`, and early media (a 183 with SDP) is
//! only dependable when the 183 is reliable. A reliable 1xx carries `RSeq` (a counter the UAS
//! starts at a random value below 2**31 and increases by one per reliable 1xx) and is
//! retransmitted by the UAS core, T1 doubling without a cap, until a PRACK acknowledges it
//! with `RAck: <RSeq> <CSeq number> <method>`; after 64*T1 without one the UAS gives up on the
//! INVITE (section 3). The UAC acknowledges each reliable 1xx once, in RSeq order, and ignores
//! retransmissions and responses out of order (section 4).
//!
//! [`ReliableSender`] is the UAS side, [`ReliableReceiver`] the UAC side; both are fed time
//! values and messages and never touch a socket.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rsip::{Header, Method, Response};

use super::{has_option_tag, header_values};
use crate::sip::message;

/// The option tag of RFC 3262.
pub const OPTION_TAG: &str = "100rel";

/// How many reliable 1xx may wait behind an unacknowledged one; more are not worth keeping
/// (a call sends 180 and perhaps a 183), and the queue must not grow with a silent peer.
const MAX_QUEUED: usize = 4;

/// Why a `RAck`/`RSeq` value or a PRACK is unusable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReliableError {
    #[error("RSeq is malformed: {0}")]
    BadRSeq(String),
    #[error("RAck is malformed: {0}")]
    BadRAck(String),
    #[error("a reliable provisional response without RSeq")]
    MissingRSeq,
    #[error("PRACK without RAck")]
    MissingRAck,
    /// Answer the PRACK with 481 (section 3).
    #[error("PRACK matches no unacknowledged reliable provisional response")]
    NoMatch,
}

impl ReliableError {
    /// The status code to answer a PRACK that failed with this error.
    pub fn prack_status(&self) -> u16 {
        match self {
            ReliableError::NoMatch => 481,
            _ => 400,
        }
    }
}

/// What a request asks for about reliable provisional responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reliability {
    /// `Require: 100rel`: every provisional other than 100 must be reliable.
    Required,
    /// `Supported: 100rel`: reliable provisionals are allowed.
    Supported,
    /// Neither: provisionals are sent unreliably.
    Unsupported,
}

impl Reliability {
    /// Reads a request's `Require` and `Supported` headers.
    pub fn of(headers: &rsip::Headers) -> Reliability {
        if has_option_tag(headers, "Require", OPTION_TAG) {
            Reliability::Required
        } else if has_option_tag(headers, "Supported", OPTION_TAG) {
            Reliability::Supported
        } else {
            Reliability::Unsupported
        }
    }
}

/// Parses an `RSeq` value: 1*DIGIT in 1..=2**32-1 (section 7.1).
pub fn parse_rseq(value: &str) -> Result<u32, ReliableError> {
    let text = value.trim();
    match text.parse::<u32>() {
        Ok(n) if n > 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(ReliableError::BadRSeq(text.chars().take(40).collect())),
    }
}

/// An `RAck` value: `response-num CSeq-num Method` (section 7.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RAck {
    pub rseq: u32,
    pub cseq: u32,
    pub method: Method,
}

impl RAck {
    /// Parses a header value.
    pub fn parse(value: &str) -> Result<RAck, ReliableError> {
        let bad = || ReliableError::BadRAck(value.chars().take(40).collect());
        let mut parts = value.split_whitespace();
        let (Some(rseq), Some(cseq), Some(method), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let rseq = parse_rseq(rseq).map_err(|_| bad())?;
        let cseq = rseq_like(cseq).ok_or_else(bad)?;
        let method = method.parse::<Method>().map_err(|_| bad())?;
        Ok(RAck { rseq, cseq, method })
    }

    /// Reads the `RAck` of a PRACK.
    pub fn of(headers: &rsip::Headers) -> Result<RAck, ReliableError> {
        RAck::parse(header_values(headers, "RAck").first().ok_or(ReliableError::MissingRAck)?)
    }

    /// The header value.
    pub fn header_value(&self) -> String {
        format!("{} {} {}", self.rseq, self.cseq, self.method)
    }

    /// The `RAck` header of the PRACK the UAC sends.
    pub fn header(&self) -> Header {
        Header::Other("RAck".into(), self.header_value())
    }
}

/// A CSeq number (digits only, 32 bits).
fn rseq_like(text: &str) -> Option<u32> {
    text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten()
}

/// What a [`ReliableSender`] asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReliableAction {
    /// Put this reliable provisional response on the wire (through the INVITE's server
    /// transaction), for the first time or again.
    Send(Response),
    /// 64*T1 without a PRACK: reject the INVITE with a 5xx (section 3); nothing more is sent.
    GiveUp,
}

#[derive(Debug, Clone)]
struct Pending {
    response: Response,
    rseq: u32,
    interval: Duration,
    next_at: Instant,
    give_up_at: Instant,
}

/// The UAS side: numbers reliable 1xx, retransmits the unacknowledged one, matches PRACKs.
///
/// One reliable 1xx is outstanding at a time (section 3: a second one waits for the PRACK of
/// the first); later ones queue and go out as the PRACKs arrive.
#[derive(Debug, Clone)]
pub struct ReliableSender {
    next_rseq: u32,
    invite_cseq: u32,
    t1: Duration,
    pending: Option<Pending>,
    queue: VecDeque<Response>,
    /// An acknowledged or outstanding reliable 1xx carried SDP: a 2xx must then wait for its
    /// PRACK (section 3).
    sdp_sent: bool,
    gave_up: bool,
}

impl ReliableSender {
    /// A sender for the INVITE with CSeq number `invite_cseq`. `initial_rseq` is random in
    /// 1..2**31 (use [`random_initial_rseq`]); `t1` is RFC 3261's T1.
    pub fn new(invite_cseq: u32, initial_rseq: u32, t1: Duration) -> ReliableSender {
        ReliableSender {
            next_rseq: initial_rseq.max(1),
            invite_cseq,
            t1,
            pending: None,
            queue: VecDeque::new(),
            sdp_sent: false,
            gave_up: false,
        }
    }

    /// Sends `response` (a 101-199 to the INVITE) reliably: adds `Require: 100rel` and `RSeq`,
    /// and returns it to be sent now, or queues it behind the outstanding one.
    pub fn send(&mut self, response: Response, now: Instant) -> Vec<ReliableAction> {
        if self.gave_up {
            return Vec::new();
        }
        if self.pending.is_some() {
            if self.queue.len() < MAX_QUEUED {
                self.queue.push_back(response);
            }
            return Vec::new();
        }
        self.start(response, now)
    }

    fn start(&mut self, mut response: Response, now: Instant) -> Vec<ReliableAction> {
        let rseq = self.next_rseq;
        self.next_rseq = self.next_rseq.wrapping_add(1).max(1);
        response.headers.retain(|h| !matches!(h, Header::Other(n, _) if n.eq_ignore_ascii_case("RSeq")));
        if !has_option_tag(&response.headers, "Require", OPTION_TAG) {
            response.headers.push(Header::Require(OPTION_TAG.into()));
        }
        response.headers.push(Header::Other("RSeq".into(), rseq.to_string()));
        self.sdp_sent |= !response.body.is_empty();
        self.pending = Some(Pending {
            response: response.clone(),
            rseq,
            interval: self.t1,
            next_at: now + self.t1,
            give_up_at: now + self.t1 * 64,
        });
        vec![ReliableAction::Send(response)]
    }

    /// The next instant [`ReliableSender::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.next_at.min(p.give_up_at))
    }

    /// The timer fired at `now`: retransmit (T1, 2*T1, 4*T1, ... no cap, section 3) or give up.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<ReliableAction> {
        let Some(pending) = self.pending.as_mut() else { return Vec::new() };
        if now >= pending.give_up_at {
            self.pending = None;
            self.queue.clear();
            self.gave_up = true;
            return vec![ReliableAction::GiveUp];
        }
        if now < pending.next_at {
            return Vec::new();
        }
        pending.interval *= 2;
        pending.next_at = now + pending.interval;
        vec![ReliableAction::Send(pending.response.clone())]
    }

    /// A PRACK arrived. `Ok` means answer it 200 and send what is returned (the next queued
    /// reliable 1xx); `Err` carries the status to answer it with ([`ReliableError::prack_status`]:
    /// 481 when its RAck matches no outstanding response).
    pub fn on_prack(&mut self, headers: &rsip::Headers, now: Instant) -> Result<Vec<ReliableAction>, ReliableError> {
        let rack = RAck::of(headers)?;
        let matches = self
            .pending
            .as_ref()
            .is_some_and(|p| p.rseq == rack.rseq && rack.cseq == self.invite_cseq && rack.method == Method::Invite);
        if !matches {
            return Err(ReliableError::NoMatch);
        }
        self.pending = None;
        Ok(match self.queue.pop_front() {
            Some(next) => self.start(next, now),
            None => Vec::new(),
        })
    }

    /// Whether a reliable 1xx still waits for its PRACK.
    pub fn unacknowledged(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the final response may go out now: a non-2xx always (the INVITE is over); a
    /// 2xx not while a reliable 1xx with SDP is unacknowledged (section 3), since the PRACK
    /// may still carry the answer to that offer.
    pub fn may_send_final(&self, status: u16) -> bool {
        !(200..300).contains(&status) || !self.sdp_sent || self.pending.is_none()
    }

    /// The final response went out: no more retransmissions.
    pub fn on_final(&mut self) {
        self.pending = None;
        self.queue.clear();
    }
}

/// A random initial RSeq in 1..2**31 (section 3: "SHOULD be chosen uniformly between 1 and
/// 2**31 - 1", leaving room to count up without wrapping).
pub fn random_initial_rseq() -> u32 {
    rand::random_range(1..(1u32 << 31))
}

/// What the UAC does with a provisional response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisional {
    /// An unreliable 1xx: nothing to acknowledge.
    Unreliable,
    /// A new reliable 1xx: process it and send a PRACK with this `RAck`.
    Prack(RAck),
    /// A retransmission of one already acknowledged, or one out of order: discard it
    /// (section 4; the PRACK's own client transaction retransmits a lost PRACK).
    Discard,
}

/// The UAC side: the last in-order RSeq of each early dialog (each To tag: a forked INVITE may
/// get reliable 1xx from several UASs, each counting on its own).
#[derive(Debug, Clone, Default)]
pub struct ReliableReceiver {
    last: HashMap<String, u32>,
}

impl ReliableReceiver {
    /// Classifies a 1xx received for the node's INVITE.
    pub fn on_provisional(&mut self, response: &Response) -> Result<Provisional, ReliableError> {
        let status = message::status(response);
        if status == 100 || !(101..200).contains(&status) || !has_option_tag(&response.headers, "Require", OPTION_TAG) {
            return Ok(Provisional::Unreliable);
        }
        let rseq = parse_rseq(header_values(&response.headers, "RSeq").first().ok_or(ReliableError::MissingRSeq)?)?;
        let (cseq, method) = message::cseq(response).ok_or(ReliableError::BadRAck("no CSeq".into()))?;
        let tag = message::to_tag(response).unwrap_or_default();
        let in_order = match self.last.get(&tag) {
            None => true,
            Some(&last) => rseq == last.wrapping_add(1),
        };
        if !in_order {
            return Ok(Provisional::Discard);
        }
        self.last.insert(tag, rseq);
        Ok(Provisional::Prack(RAck { rseq, cseq, method }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{Incoming, parse};

    const T1: Duration = Duration::from_millis(500);

    fn invite() -> rsip::Request {
        let text = "INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
            From: <sip:a@127.0.0.1>;tag=a\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 7 INVITE\r\n\
            Max-Forwards: 70\r\nRequire: 100rel\r\nContent-Length: 0\r\n\r\n";
        match parse(text.as_bytes(), false).unwrap() {
            Incoming::Message(rsip::SipMessage::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn ringing(code: u16) -> Response {
        crate::sip::transaction::response_to(&invite(), code, None, Some("b"))
    }

    fn rack(value: &str) -> rsip::Headers {
        vec![Header::Other("RAck".into(), value.into())].into()
    }

    fn sent(actions: &[ReliableAction]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                ReliableAction::Send(r) => Some(parse_rseq(&header_values(&r.headers, "RSeq")[0]).unwrap()),
                ReliableAction::GiveUp => None,
            })
            .collect()
    }

    #[test]
    fn the_request_says_whether_provisionals_must_be_reliable() {
        assert_eq!(Reliability::of(&invite().headers), Reliability::Required);
        let supported: rsip::Headers = vec![Header::Supported("timer, 100rel".into())].into();
        assert_eq!(Reliability::of(&supported), Reliability::Supported);
        assert_eq!(Reliability::of(&rsip::Headers::default()), Reliability::Unsupported);
    }

    #[test]
    fn rack_parses_prints_and_refuses_garbage() {
        let r = RAck::parse("776656 1 INVITE").unwrap();
        assert_eq!(r, RAck { rseq: 776656, cseq: 1, method: Method::Invite });
        assert_eq!(RAck::parse(&r.header_value()).unwrap(), r);
        for bad in ["", "1 2", "0 1 INVITE", "x 1 INVITE", "1 -1 INVITE", "1 2 INVITE extra", "1 99999999999 INVITE"] {
            assert!(matches!(RAck::parse(bad), Err(ReliableError::BadRAck(_))), "{bad:?}");
        }
        assert_eq!(RAck::of(&rsip::Headers::default()), Err(ReliableError::MissingRAck));
        assert!(parse_rseq("+5").is_err());
        assert!(parse_rseq("4294967296").is_err());
        assert!((1..1 << 31).contains(&random_initial_rseq()));
    }

    #[test]
    fn a_reliable_1xx_is_numbered_and_retransmitted_until_its_prack() {
        let t0 = Instant::now();
        let mut uas = ReliableSender::new(7, 1000, T1);
        let actions = uas.send(ringing(180), t0);
        assert_eq!(sent(&actions), vec![1000]);
        let ReliableAction::Send(first) = &actions[0] else { panic!() };
        assert!(has_option_tag(&first.headers, "Require", OPTION_TAG));
        // Retransmissions at T1, then 2*T1, 4*T1 ... (no T2 cap in RFC 3262).
        assert_eq!(uas.poll_timeout(), Some(t0 + T1));
        assert!(uas.handle_timeout(t0 + T1 / 2).is_empty(), "not due yet");
        let mut at = t0;
        let mut intervals = Vec::new();
        for _ in 0..5 {
            let due = uas.poll_timeout().unwrap();
            intervals.push(due - at);
            at = due;
            assert_eq!(sent(&uas.handle_timeout(due)), vec![1000], "the same response again");
        }
        assert_eq!(intervals, vec![T1, T1 * 2, T1 * 4, T1 * 8, T1 * 16]);
        // The PRACK stops it.
        assert_eq!(uas.on_prack(&rack("1000 7 INVITE"), at), Ok(Vec::new()));
        assert!(!uas.unacknowledged());
        assert_eq!(uas.poll_timeout(), None);
    }

    #[test]
    fn a_prack_with_a_wrong_rack_gets_481_and_changes_nothing() {
        let t0 = Instant::now();
        let mut uas = ReliableSender::new(7, 1000, T1);
        uas.send(ringing(183), t0);
        for wrong in ["999 7 INVITE", "1001 7 INVITE", "1000 8 INVITE", "1000 7 BYE"] {
            let err = uas.on_prack(&rack(wrong), t0).unwrap_err();
            assert_eq!((err.clone(), err.prack_status()), (ReliableError::NoMatch, 481), "{wrong}");
        }
        assert_eq!(uas.on_prack(&rack("garbage"), t0).unwrap_err().prack_status(), 400);
        assert!(uas.unacknowledged(), "still waiting for the right PRACK");
        assert!(uas.on_prack(&rack("1000 7 INVITE"), t0).is_ok());
        assert_eq!(uas.on_prack(&rack("1000 7 INVITE"), t0), Err(ReliableError::NoMatch), "a second PRACK: 481");
    }

    #[test]
    fn a_second_reliable_1xx_waits_for_the_first_prack() {
        let t0 = Instant::now();
        let mut uas = ReliableSender::new(7, 1, T1);
        assert_eq!(sent(&uas.send(ringing(180), t0)), vec![1]);
        assert!(uas.send(ringing(183), t0).is_empty(), "queued behind RSeq 1");
        assert_eq!(sent(&uas.on_prack(&rack("1 7 INVITE"), t0).unwrap()), vec![2]);
        assert!(uas.on_prack(&rack("2 7 INVITE"), t0).unwrap().is_empty());
    }

    #[test]
    fn without_a_prack_the_uas_gives_up_after_64_t1() {
        let t0 = Instant::now();
        let mut uas = ReliableSender::new(7, 1, T1);
        uas.send(ringing(180), t0);
        let mut last = Vec::new();
        while let Some(at) = uas.poll_timeout() {
            last = uas.handle_timeout(at);
        }
        assert_eq!(last, vec![ReliableAction::GiveUp]);
        assert!(uas.send(ringing(180), t0 + T1 * 65).is_empty(), "nothing after giving up");
    }

    #[test]
    fn a_2xx_waits_for_the_prack_of_a_reliable_1xx_with_sdp() {
        let t0 = Instant::now();
        let mut uas = ReliableSender::new(7, 1, T1);
        let mut early = ringing(183);
        early.body = b"v=0\r\n".to_vec();
        uas.send(early, t0);
        assert!(!uas.may_send_final(200));
        assert!(uas.may_send_final(486), "a failure may always end the INVITE");
        uas.on_prack(&rack("1 7 INVITE"), t0).unwrap();
        assert!(uas.may_send_final(200));

        let mut plain = ReliableSender::new(7, 1, T1);
        plain.send(ringing(180), t0);
        assert!(plain.may_send_final(200), "a 180 without SDP does not hold the 2xx back");
        plain.on_final();
        assert!(plain.handle_timeout(t0 + T1).is_empty());
    }

    #[test]
    fn the_uac_pracks_each_reliable_1xx_once_and_in_order() {
        let mut uac = ReliableReceiver::default();
        let mut uas = ReliableSender::new(7, 41, T1);
        let t0 = Instant::now();
        let ReliableAction::Send(first) = uas.send(ringing(180), t0).remove(0) else { panic!() };
        assert_eq!(uac.on_provisional(&ringing(180)), Ok(Provisional::Unreliable));
        assert_eq!(
            uac.on_provisional(&first),
            Ok(Provisional::Prack(RAck { rseq: 41, cseq: 7, method: Method::Invite }))
        );
        assert_eq!(uac.on_provisional(&first), Ok(Provisional::Discard), "a retransmission");
        // The PRACK the UAC builds is the one the UAS expects.
        let Provisional::Prack(r) = ReliableReceiver::default().on_provisional(&first).unwrap() else { panic!() };
        let next = uas.on_prack(&vec![r.header()].into(), t0).unwrap();
        assert!(next.is_empty());
        let mut skipped = ringing(183);
        skipped.headers.push(Header::Require(OPTION_TAG.into()));
        skipped.headers.push(Header::Other("RSeq".into(), "43".into()));
        assert_eq!(uac.on_provisional(&skipped), Ok(Provisional::Discard), "out of order");
        let mut broken = ringing(183);
        broken.headers.push(Header::Require(OPTION_TAG.into()));
        assert_eq!(uac.on_provisional(&broken), Err(ReliableError::MissingRSeq));
    }
}
