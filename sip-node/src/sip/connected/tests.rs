//! Plain-value tests of the connected machine: events in, actions out, no sockets, no clock.

use std::time::Duration;

use rsip::{Method, Request, Response, SipMessage};

use super::*;
use crate::media::sdp::SdpError;
use crate::sip::transaction::test_support::{header, request};
use crate::sip::transport::{Peer, Protocol};

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

fn peer(port: u16, protocol: Protocol) -> Peer {
    Peer { protocol, addr: format!("192.0.2.{}:{port}", port % 200).parse().unwrap() }
}

fn dialog(call_id: &str, local_tag: &str, cseq: u32, peer: Peer) -> Dialog {
    Dialog {
        call_id: call_id.into(),
        local_tag: local_tag.into(),
        local: format!("<sip:node@198.51.100.1>;tag={local_tag}"),
        remote: format!("<sip:far@{}>;tag=far-{local_tag}", peer.addr),
        remote_target: rsip::Uri::try_from(format!("sip:far@{}", peer.addr).as_str()).unwrap(),
        route_set: vec![],
        local_cseq: cseq,
        peer,
        contact: format!("<sip:dialog-{local_tag}@198.51.100.1:5060>"),
    }
}

fn leg(call_id: &str, tag: &str, cseq: u32, peer: Peer) -> LegSetup {
    LegSetup {
        dialog: dialog(call_id, tag, cseq, peer),
        sent_by: ("198.51.100.1".into(), 5060),
        contact: format!("<sip:198.51.100.1:5060;leg={tag}>"),
        session: None,
    }
}

/// An in-dialog request arriving on a leg (its Call-ID and tags do not matter to the machine).
fn incoming(method: &str, cseq: u32, body: &str, extra: &str) -> Request {
    let ct = if body.is_empty() { String::new() } else { "Content-Type: application/sdp\r\n".to_string() };
    request(&format!(
        "{method} sip:node@198.51.100.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK{method}{cseq};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:far@192.0.2.9>;tag=far\r\n\
To: <sip:node@198.51.100.1>;tag=node\r\n\
Call-ID: in-dialog@192.0.2.9\r\n\
CSeq: {cseq} {method}\r\n{ct}{extra}\
Content-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

fn key(request: &Request) -> TransactionKey {
    TransactionKey::for_server_request(request).expect("key")
}

fn request_event(leg: Leg, request: Request) -> Event {
    let key = (request.method != Method::Ack).then(|| key(&request));
    Event::Request { leg, request, key }
}

/// The final response `code` to a request the machine sent, with `body` as SDP.
fn answer_to(request: &Request, code: u16, body: &str) -> Response {
    let mut response = response_to(request, code, None, Some("far"));
    if !body.is_empty() {
        message::set_body(&mut response.headers, &mut response.body, body.as_bytes().to_vec(), Some("application/sdp"));
    }
    response
}

fn ok_to_caller() -> Response {
    let invite = incoming("INVITE", 1, "", "");
    response_to(&invite, 200, Some("OK"), Some("atag"))
}

fn answer(reliable: bool) -> Answer {
    let invite = incoming("INVITE", 1, "", "");
    Answer { key: key(&invite), response: ok_to_caller(), reliable }
}

fn b2bua(media: MediaMode<'_>, reliable: bool) -> (Connected<'_>, Vec<Action>) {
    Connected::new(Setup {
        a: Some((leg("a-call", "atag", 1, peer(5061, Protocol::Udp)), answer(reliable))),
        b: Some(leg("b-call", "btag", 1, peer(5062, Protocol::Udp))),
        media,
        timers: TimerConfig::default(),
        wait_for_bye: true,
        max_duration: None,
        session_policy: Default::default(),
    })
}

fn sent(actions: &[Action], on: Leg) -> Vec<Request> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { leg, request } if *leg == on => Some(request.clone()),
            _ => None,
        })
        .collect()
}

fn responses(actions: &[Action]) -> Vec<Response> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Respond { response, .. } => Some(response.clone()),
            _ => None,
        })
        .collect()
}

fn ending(actions: &[Action]) -> Option<Ending> {
    actions.iter().find_map(|a| if let Action::End(e) = a { Some(e.clone()) } else { None })
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Delivers an ACK for the caller's 2xx.
fn ack() -> Request {
    incoming("ACK", 1, "", "")
}

#[test]
fn answers_the_caller_and_retransmits_the_2xx_until_the_ack() {
    let (mut call, first) = b2bua(MediaMode::PassThrough, false);
    assert!(matches!(&first[0], Action::Respond { response, .. } if message::status(response) == 200));
    assert_eq!(
        first[1..],
        [
            Action::Schedule(Timer::Uas2xx(Uas2xxTimer::Retransmit), ms(500)),
            Action::Schedule(Timer::Uas2xx(Uas2xxTimer::GiveUp), ms(32_000)),
        ]
    );
    let actions = call.on_event(Event::Timer(Timer::Uas2xx(Uas2xxTimer::Retransmit)));
    assert_eq!(
        actions,
        vec![
            Action::Retransmit { leg: Leg::A, response: ok_to_caller() },
            Action::Schedule(Timer::Uas2xx(Uas2xxTimer::Retransmit), ms(1000)),
        ]
    );
    let actions = call.on_event(request_event(Leg::A, ack()));
    assert_eq!(
        actions,
        vec![
            Action::CancelTimer(Timer::Uas2xx(Uas2xxTimer::Retransmit)),
            Action::CancelTimer(Timer::Uas2xx(Uas2xxTimer::GiveUp)),
        ]
    );
    // A late timer does nothing once the ACK came.
    assert!(call.on_event(Event::Timer(Timer::Uas2xx(Uas2xxTimer::Retransmit))).is_empty());
    assert!(call.on_event(Event::Timer(Timer::Uas2xx(Uas2xxTimer::GiveUp))).is_empty());
}

#[test]
fn gives_up_without_an_ack_and_hangs_up_both_legs() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, false);
    let actions = call.on_event(Event::Timer(Timer::Uas2xx(Uas2xxTimer::GiveUp)));
    let (to_b, to_a) = (sent(&actions, Leg::B), sent(&actions, Leg::A));
    assert_eq!((to_a.len(), to_b.len()), (1, 1));
    for bye in to_a.iter().chain(&to_b) {
        assert_eq!(bye.method, Method::Bye);
        assert!(header(bye, "Reason")[0].contains("caller never acknowledged the answer"), "{bye}");
    }
    assert_eq!(
        ending(&actions),
        Some(Ending { code: 408, reason: "caller never acknowledged the answer".into(), by: Ender::System })
    );
    // Ended: nothing more happens.
    assert!(call.on_event(request_event(Leg::A, incoming("BYE", 2, "", ""))).is_empty());
}

#[test]
fn reliable_caller_gets_no_retransmissions_but_the_ack_wait_runs() {
    let (mut call, first) = b2bua(MediaMode::PassThrough, true);
    assert_eq!(first[1..], [Action::Schedule(Timer::Uas2xx(Uas2xxTimer::GiveUp), ms(32_000))]);
    assert!(call.on_event(Event::Timer(Timer::Uas2xx(Uas2xxTimer::Retransmit))).is_empty());
    assert_eq!(
        call.on_event(request_event(Leg::A, ack())),
        vec![Action::CancelTimer(Timer::Uas2xx(Uas2xxTimer::GiveUp))]
    );
}

#[test]
fn caller_bye_is_answered_relayed_and_waited_for() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    call.on_event(request_event(Leg::A, ack()));
    let bye = incoming("BYE", 2, "", "Reason: Q.850;cause=16;text=\"bye from A\"\r\n");
    let actions = call.on_event(request_event(Leg::A, bye));
    assert_eq!(message::status(&responses(&actions)[0]), 200);
    let relayed = sent(&actions, Leg::B);
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].method, Method::Bye);
    assert_eq!(message::cseq(&relayed[0]), Some((2, Method::Bye)));
    assert_eq!(header(&relayed[0], "Reason"), vec!["Q.850;cause=16;text=\"bye from A\""], "the caller's Reason passes");
    assert!(actions.contains(&Action::Schedule(Timer::ByeWait, BYE_WAIT)));
    assert_eq!(ending(&actions), None, "waits for the callee's answer to the BYE");
    // A request crossing the BYE is answered, not relayed.
    let info = incoming("INFO", 3, "", "");
    let actions = call.on_event(request_event(Leg::B, info));
    assert_eq!(message::status(&responses(&actions)[0]), 481);
    assert!(sent(&actions, Leg::A).is_empty());
    // The callee answers our BYE.
    let actions = call.on_event(Event::Response { leg: Leg::B, response: answer_to(&relayed[0], 200, "") });
    assert_eq!(
        actions,
        vec![
            Action::CancelTimer(Timer::ByeWait),
            Action::End(Ending { code: 200, reason: "caller hung up".into(), by: Ender::Caller })
        ]
    );
}

#[test]
fn callee_bye_hangs_up_the_caller_and_the_wait_is_bounded() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    let actions = call.on_event(request_event(Leg::B, incoming("BYE", 5, "", "")));
    assert_eq!(message::status(&responses(&actions)[0]), 200);
    let to_a = sent(&actions, Leg::A);
    assert_eq!(to_a[0].method, Method::Bye);
    assert!(header(&to_a[0], "Reason")[0].contains("callee hung up"));
    // Also stops waiting for the caller's ACK.
    assert!(actions.contains(&Action::CancelTimer(Timer::Uas2xx(Uas2xxTimer::GiveUp))));
    // A crossing BYE from the caller gets 200.
    let actions = call.on_event(request_event(Leg::A, incoming("BYE", 2, "", "")));
    assert_eq!(message::status(&responses(&actions)[0]), 200);
    // No answer to our BYE: the wait runs out.
    let actions = call.on_event(Event::Timer(Timer::ByeWait));
    assert_eq!(ending(&actions), Some(Ending { code: 200, reason: "callee hung up".into(), by: Ender::Callee }));
}

#[test]
fn reinvite_passes_through_and_its_2xx_is_acked_and_relayed() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    let reinvite = incoming("INVITE", 2, SDP, "");
    let actions = call.on_event(request_event(Leg::A, reinvite.clone()));
    let forwarded = sent(&actions, Leg::B);
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].method, Method::Invite);
    assert_eq!(forwarded[0].body, SDP.as_bytes(), "SDP passes unchanged without anchoring");
    assert_eq!(message::cseq(&forwarded[0]), Some((2, Method::Invite)), "the B leg's own CSeq");
    assert_eq!(forwarded[0].call_id_header().unwrap().value(), "b-call");
    // A provisional changes nothing; the 2xx is ACKed on B and relayed to A.
    assert!(call.on_event(Event::Response { leg: Leg::B, response: answer_to(&forwarded[0], 180, "") }).is_empty());
    let actions = call.on_event(Event::Response { leg: Leg::B, response: answer_to(&forwarded[0], 200, SDP) });
    let Some(Action::SendStateless { leg: Leg::B, message: SipMessage::Request(ack) }) = actions.first() else {
        panic!("{actions:?}")
    };
    assert_eq!((ack.method, message::cseq(ack)), (Method::Ack, Some((2, Method::Ack))));
    let relayed = responses(&actions);
    assert_eq!(message::status(&relayed[0]), 200);
    assert_eq!(message::cseq(&relayed[0]), Some((2, Method::Invite)), "answers the caller's own re-INVITE");
    assert_eq!(relayed[0].body, SDP.as_bytes());
    assert_eq!(
        header(&relayed[0], "Contact"),
        vec!["<sip:198.51.100.1:5060;leg=atag>"],
        "the node's contact towards A"
    );
    assert!(matches!(&actions[1], Action::Respond { key: k, .. } if *k == key(&reinvite)));
}

#[test]
fn update_from_the_callee_is_relayed_to_the_caller() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    let update = incoming("UPDATE", 7, SDP, "");
    let actions = call.on_event(request_event(Leg::B, update));
    let forwarded = sent(&actions, Leg::A);
    assert_eq!(forwarded[0].method, Method::Update);
    assert_eq!(message::cseq(&forwarded[0]), Some((2, Method::Update)));
    // A non-2xx final answer is relayed as is, without an ACK (not an INVITE).
    let actions = call.on_event(Event::Response { leg: Leg::A, response: answer_to(&forwarded[0], 491, "") });
    assert_eq!(actions.len(), 1);
    assert_eq!(message::status(&responses(&actions)[0]), 491);
}

#[test]
fn a_forwarded_request_that_times_out_is_answered_408() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    call.on_event(request_event(Leg::A, incoming("INFO", 2, "", "")));
    // A timeout on the originator's own leg does not answer it.
    assert!(call.on_event(Event::TransactionTimeout { leg: Leg::A }).is_empty());
    let actions = call.on_event(Event::TransactionTimeout { leg: Leg::B });
    assert_eq!(message::status(&responses(&actions)[0]), 408);
    assert!(call.on_event(Event::TransactionTimeout { leg: Leg::B }).is_empty(), "answered once");
}

#[test]
fn the_callees_retransmitted_2xx_is_acked_again() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    let invite = incoming("INVITE", 1, "", "");
    let actions = call.on_event(Event::Response { leg: Leg::B, response: answer_to(&invite, 200, "") });
    let [Action::SendStateless { leg: Leg::B, message: SipMessage::Request(ack) }] = actions.as_slice() else {
        panic!("{actions:?}")
    };
    assert_eq!(message::cseq(ack), Some((1, Method::Ack)));
    assert_eq!(ack.call_id_header().unwrap().value(), "b-call");
    // Not from the caller's leg.
    assert!(call.on_event(Event::Response { leg: Leg::A, response: answer_to(&invite, 200, "") }).is_empty());
}

#[test]
fn media_timeout_and_draining_end_the_call_with_a_bye_on_each_leg() {
    for (event, code, reason) in [
        (Event::MediaTimeout { silent_for: Duration::from_secs(30) }, 408, "media timeout: no RTP for 30 s"),
        (Event::Draining, 200, crate::drain::NODE_SHUTDOWN),
        (Event::AgentEnded { reason: "agent left".into() }, 200, "agent left"),
    ] {
        let (mut call, _) = b2bua(MediaMode::PassThrough, true);
        let actions = call.on_event(event);
        let (to_a, to_b) = (sent(&actions, Leg::A), sent(&actions, Leg::B));
        assert_eq!((to_a.len(), to_b.len()), (1, 1), "{reason}");
        assert!(header(&to_a[0], "Reason")[0].contains(reason), "{:?}", header(&to_a[0], "Reason"));
        assert_eq!(ending(&actions), None, "waits for the caller's answer to the BYE");
        // The callee's answer does not end the wait (its BYE is not waited for); the caller's does.
        assert!(
            ending(&call.on_event(Event::Response { leg: Leg::B, response: answer_to(&to_b[0], 200, "") })).is_none()
        );
        assert!(call.on_event(Event::Draining).is_empty(), "a second drain changes nothing");
        let actions = call.on_event(Event::Response { leg: Leg::A, response: answer_to(&to_a[0], 200, "") });
        assert_eq!(ending(&actions), Some(Ending { code, reason: reason.into(), by: Ender::System }));
    }
}

#[test]
fn a_closed_channel_ends_the_call() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    let actions = call.on_event(Event::ChannelClosed { leg: Leg::B });
    assert_eq!(
        ending(&actions),
        Some(Ending { code: 500, reason: "internal: channel closed".into(), by: Ender::System })
    );
}

/// Anchored media that records what the machine asked.
#[derive(Default)]
struct FakeAnchor {
    awaits_answer: bool,
    acked: Vec<Vec<u8>>,
    reoffers: Vec<Leg>,
    reanswers: Vec<(Leg, Vec<u8>)>,
    refuse: bool,
}

impl AnchoredMedia for FakeAnchor {
    fn awaits_caller_answer(&self) -> bool {
        self.awaits_answer
    }
    fn caller_acked(&mut self, body: &[u8]) -> Result<(), SdpError> {
        self.awaits_answer = false;
        self.acked.push(body.to_vec());
        if body.is_empty() { Err(SdpError::NoAudio) } else { Ok(()) }
    }
    fn last_sent(&self, leg: Leg) -> Option<Vec<u8>> {
        Some(format!("last sent on {leg:?}").into_bytes())
    }
    fn reoffer(&mut self, from: Leg, body: &[u8]) -> Result<(SessionDescription, Vec<u8>), SdpError> {
        if self.refuse {
            return Err(SdpError::NoAudio);
        }
        self.reoffers.push(from);
        Ok((SessionDescription::parse_bytes(body)?, b"node offer".to_vec()))
    }
    fn reanswer(&mut self, from: Leg, _offer: &SessionDescription, body: &[u8]) -> Result<Vec<u8>, SdpError> {
        self.reanswers.push((from, body.to_vec()));
        if body.is_empty() { Err(SdpError::NoAudio) } else { Ok(b"node answer".to_vec()) }
    }
}

#[test]
fn hold_with_anchored_media_is_reoffered_by_the_node() {
    let mut anchor = FakeAnchor::default();
    {
        let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor), true);
        let hold = SDP.replace("sendrecv", "sendonly");
        let actions = call.on_event(request_event(Leg::A, incoming("INVITE", 2, &hold, "")));
        let forwarded = sent(&actions, Leg::B);
        assert_eq!(forwarded[0].body, b"node offer", "the node's own offer, not the caller's");
        let actions = call.on_event(Event::Response { leg: Leg::B, response: answer_to(&forwarded[0], 200, SDP) });
        let relayed = responses(&actions);
        assert_eq!(relayed[0].body, b"node answer");
        assert_eq!(message::status(&relayed[0]), 200);
        // The other leg's unusable answer becomes 488 for the originator.
        let actions = call.on_event(request_event(Leg::B, incoming("UPDATE", 4, SDP, "")));
        let forwarded = sent(&actions, Leg::A);
        let actions = call.on_event(Event::Response { leg: Leg::A, response: answer_to(&forwarded[0], 200, "") });
        assert_eq!(message::status(&responses(&actions)[0]), 488);
        assert!(responses(&actions)[0].body.is_empty());
        // A re-INVITE without an offer is answered here with what the node last sent.
        let actions = call.on_event(request_event(Leg::B, incoming("INVITE", 5, "", "")));
        assert!(sent(&actions, Leg::A).is_empty());
        let ok = &responses(&actions)[0];
        assert_eq!((message::status(ok), ok.body.as_slice()), (200, b"last sent on B".as_slice()));
        assert_eq!(header(ok, "Contact"), vec!["<sip:dialog-btag@198.51.100.1:5060>"]);
    }
    assert_eq!(anchor.reoffers, vec![Leg::A, Leg::B]);
    assert_eq!(anchor.reanswers, vec![(Leg::A, SDP.as_bytes().to_vec()), (Leg::B, vec![])]);
}

#[test]
fn an_offer_the_node_cannot_reoffer_is_refused() {
    let mut anchor = FakeAnchor { refuse: true, ..FakeAnchor::default() };
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor), true);
    let actions = call.on_event(request_event(Leg::A, incoming("UPDATE", 2, SDP, "")));
    assert!(sent(&actions, Leg::B).is_empty());
    assert_eq!(message::status(&responses(&actions)[0]), SdpError::NoAudio.sip_status());
}

#[test]
fn delayed_offer_the_ack_carries_the_callers_answer() {
    let mut anchor = FakeAnchor { awaits_answer: true, ..FakeAnchor::default() };
    {
        let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor), false);
        let mut ack = ack();
        message::set_body(&mut ack.headers, &mut ack.body, SDP.as_bytes().to_vec(), Some("application/sdp"));
        let actions = call.on_event(request_event(Leg::A, ack));
        assert_eq!(ending(&actions), None);
    }
    assert_eq!(anchor.acked, vec![SDP.as_bytes().to_vec()]);
    // An ACK without a usable answer ends the call with 488.
    let mut anchor = FakeAnchor { awaits_answer: true, ..FakeAnchor::default() };
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor), false);
    let actions = call.on_event(request_event(Leg::A, ack()));
    assert_eq!(sent(&actions, Leg::B).len(), 1);
    let to_a = sent(&actions, Leg::A);
    assert!(header(&to_a[0], "Reason")[0].contains("caller's answer in ACK"));
    let actions = call.on_event(Event::Timer(Timer::ByeWait));
    assert_eq!(ending(&actions).map(|e| e.code), Some(488));
}

/// Media answered by the node itself (an agent's bridge).
#[derive(Default)]
struct FakeLocal {
    offers: Vec<Vec<u8>>,
    acks: Vec<Vec<u8>>,
}

impl LocalMedia for FakeLocal {
    fn ack_answer(&mut self, body: &[u8]) -> Result<(), SdpError> {
        self.acks.push(body.to_vec());
        if body == b"bad" { Err(SdpError::NoAudio) } else { Ok(()) }
    }
    fn answer(&mut self, offer: &[u8]) -> Result<Vec<u8>, u16> {
        self.offers.push(offer.to_vec());
        if offer == SDP.as_bytes() { Ok(b"local answer".to_vec()) } else { Err(488) }
    }
}

fn agent_call(media: MediaMode<'_>) -> (Connected<'_>, Vec<Action>) {
    Connected::new(Setup {
        a: Some((leg("a-call", "atag", 1, peer(5061, Protocol::Udp)), answer(false))),
        b: None,
        media,
        timers: TimerConfig::default(),
        wait_for_bye: true,
        max_duration: None,
        session_policy: Default::default(),
    })
}

#[test]
fn agent_call_answers_hold_itself_and_ends_on_caller_bye() {
    let mut local = FakeLocal::default();
    {
        let (mut call, _) = agent_call(MediaMode::AnswerHere(&mut local));
        call.on_event(request_event(Leg::A, ack()));
        let actions = call.on_event(request_event(Leg::A, incoming("INVITE", 2, SDP, "")));
        let ok = &responses(&actions)[0];
        assert_eq!((message::status(ok), ok.body.as_slice()), (200, b"local answer".as_slice()));
        assert_eq!(header(ok, "Contact"), vec!["<sip:dialog-atag@198.51.100.1:5060>"]);
        let actions = call.on_event(request_event(Leg::A, incoming("UPDATE", 3, "v=0\r\n", "")));
        assert_eq!(message::status(&responses(&actions)[0]), 488);
        let actions = call.on_event(request_event(Leg::A, incoming("INFO", 4, "", "")));
        assert_eq!(message::status(&responses(&actions)[0]), 200);
        let actions = call.on_event(request_event(Leg::A, incoming("BYE", 5, "", "")));
        assert_eq!(message::status(&responses(&actions)[0]), 200);
        assert!(sent(&actions, Leg::A).is_empty(), "no BYE back to who hung up");
        assert_eq!(ending(&actions), Some(Ending { code: 200, reason: "caller hung up".into(), by: Ender::Caller }));
    }
    assert_eq!(local.acks, vec![Vec::<u8>::new()]);
    assert_eq!(local.offers.len(), 2);
}

#[test]
fn agent_call_ends_when_the_agent_leaves_or_the_ack_answer_is_unusable() {
    let mut local = FakeLocal::default();
    let (mut call, _) = agent_call(MediaMode::AnswerHere(&mut local));
    let actions = call.on_event(Event::AgentEnded { reason: "agent ended the call: stop".into() });
    let bye = sent(&actions, Leg::A);
    assert!(header(&bye[0], "Reason")[0].contains("agent ended the call: stop"));
    let actions = call.on_event(Event::Response { leg: Leg::A, response: answer_to(&bye[0], 200, "") });
    assert_eq!(ending(&actions).map(|e| (e.code, e.by)), Some((200, Ender::System)));

    let mut local = FakeLocal::default();
    let (mut call, _) = agent_call(MediaMode::AnswerHere(&mut local));
    let mut ack = ack();
    message::set_body(&mut ack.headers, &mut ack.body, b"bad".to_vec(), Some("application/sdp"));
    let actions = call.on_event(request_event(Leg::A, ack));
    assert_eq!(sent(&actions, Leg::A)[0].method, Method::Bye);
    let actions = call.on_event(Event::TransactionTimeout { leg: Leg::A });
    assert_eq!(ending(&actions).map(|e| e.code), Some(488));
}

fn api_call(media: MediaMode<'_>) -> (Connected<'_>, Vec<Action>) {
    Connected::new(Setup {
        a: None,
        b: Some(leg("b-call", "btag", 1, peer(5062, Protocol::Udp))),
        media,
        timers: TimerConfig::default(),
        wait_for_bye: false,
        max_duration: Some(Duration::from_secs(60)),
        session_policy: Default::default(),
    })
}

#[test]
fn api_call_refuses_offers_without_media_and_ends_at_its_maximum_duration() {
    let (mut call, first) = api_call(MediaMode::RefuseOffers { sent: None });
    assert_eq!(first, vec![Action::Schedule(Timer::MaxDuration, Duration::from_secs(60))]);
    let actions = call.on_event(request_event(Leg::B, incoming("INVITE", 2, SDP, "")));
    assert_eq!(message::status(&responses(&actions)[0]), 488);
    let actions = call.on_event(request_event(Leg::B, incoming("INVITE", 3, "", "")));
    assert_eq!(message::status(&responses(&actions)[0]), 200);
    let actions = call.on_event(Event::Timer(Timer::MaxDuration));
    let bye = sent(&actions, Leg::B);
    assert!(header(&bye[0], "Reason")[0].contains("maximum call duration reached"));
    assert_eq!(
        ending(&actions),
        Some(Ending { code: 200, reason: "maximum call duration reached".into(), by: Ender::System }),
        "API calls do not wait for the BYE's answer"
    );
}

#[test]
fn api_call_ends_on_callee_bye_and_media_timeout() {
    let (mut call, _) = api_call(MediaMode::RefuseOffers { sent: None });
    let actions = call.on_event(request_event(Leg::B, incoming("BYE", 2, "", "")));
    assert!(sent(&actions, Leg::B).is_empty());
    assert_eq!(ending(&actions), Some(Ending { code: 200, reason: "callee hung up".into(), by: Ender::Callee }));

    let mut local = FakeLocal::default();
    let (mut call, _) = api_call(MediaMode::AnswerHere(&mut local));
    let actions = call.on_event(Event::MediaTimeout { silent_for: Duration::from_secs(5) });
    assert_eq!(sent(&actions, Leg::B).len(), 1);
    assert_eq!(ending(&actions).map(|e| e.reason), Some("media timeout: no RTP for 5 s".into()));
}

// Session timers (RFC 4028, `control.rs`): the caller refreshes its own leg (the node does not),
// the node refreshes the callee's leg, both with a 90 s interval.
fn timed_b2bua(media: MediaMode<'_>) -> (Connected<'_>, Vec<Action>) {
    use crate::sip::control::session_timer::{Negotiated, Refresher};
    let timer = |we_refresh| LegTimer {
        negotiated: Negotiated { interval: 90, refresher: Refresher::Uac, we_refresh },
        min_se: 90,
    };
    let mut a = leg("a-call", "atag", 1, peer(5061, Protocol::Udp));
    a.session = Some(timer(false));
    let mut b = leg("b-call", "btag", 1, peer(5062, Protocol::Udp));
    b.session = Some(timer(true));
    Connected::new(Setup {
        a: Some((a, answer(true))),
        b: Some(b),
        media,
        timers: TimerConfig::default(),
        wait_for_bye: true,
        max_duration: None,
        session_policy: Default::default(),
    })
}

fn hv(headers: &rsip::Headers, name: &str) -> Option<String> {
    crate::sip::control::header_values(headers, name).first().map(|v| v.to_string())
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn session_timers_are_armed_per_leg_and_the_node_refreshes_the_callee() {
    let (mut call, first) = timed_b2bua(MediaMode::PassThrough);
    for armed in [
        Action::Schedule(Timer::Session(Leg::A, SessionTimerKind::Expiry), secs(60)),
        Action::CancelTimer(Timer::Session(Leg::A, SessionTimerKind::Refresh)),
        Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Expiry), secs(60)),
        Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Refresh), secs(45)),
    ] {
        assert!(first.contains(&armed), "{armed:?} in {first:?}");
    }
    // Half the interval: a refresh on the callee's leg (UPDATE: no anchored SDP to send).
    let actions = call.on_event(Event::Timer(Timer::Session(Leg::B, SessionTimerKind::Refresh)));
    let refresh = sent(&actions, Leg::B);
    assert_eq!(refresh.len(), 1, "{actions:?}");
    assert_eq!(refresh[0].method, Method::Update);
    assert_eq!(hv(&refresh[0].headers, "Session-Expires").as_deref(), Some("90;refresher=uac"));
    assert!(sent(&actions, Leg::A).is_empty(), "the caller's leg is not bothered");
    // Its 2xx (a callee without timers: no Session-Expires) restarts the callee's schedule.
    let actions = call.on_event(Event::Response { leg: Leg::B, response: answer_to(&refresh[0], 200, "") });
    assert!(actions.contains(&Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Expiry), secs(60))));
    assert!(actions.contains(&Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Refresh), secs(45))));
    assert!(responses(&actions).is_empty(), "the refresh's answer is not relayed to the caller");
}

#[test]
fn the_callers_refresh_without_sdp_is_answered_on_its_leg() {
    let (mut call, _) = timed_b2bua(MediaMode::PassThrough);
    let update = incoming("UPDATE", 2, "", "Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n");
    let actions = call.on_event(request_event(Leg::A, update));
    assert!(sent(&actions, Leg::B).is_empty(), "not passed to the callee: {actions:?}");
    let ok = &responses(&actions)[0];
    assert_eq!(message::status(ok), 200);
    assert_eq!(hv(&ok.headers, "Session-Expires").as_deref(), Some("90;refresher=uac"));
    assert!(actions.contains(&Action::Schedule(Timer::Session(Leg::A, SessionTimerKind::Expiry), secs(60))));
    // Too short an interval: 422 with the node's Min-SE.
    let short = incoming("UPDATE", 3, "", "Supported: timer\r\nSession-Expires: 30\r\n");
    let actions = call.on_event(request_event(Leg::A, short));
    assert_eq!(message::status(&responses(&actions)[0]), 422);
    assert_eq!(hv(&responses(&actions)[0].headers, "Min-SE").as_deref(), Some("90"));
}

#[test]
fn an_expired_session_or_a_refresh_answered_481_ends_the_call() {
    let (mut call, _) = timed_b2bua(MediaMode::PassThrough);
    let actions = call.on_event(Event::Timer(Timer::Session(Leg::A, SessionTimerKind::Expiry)));
    assert_eq!(sent(&actions, Leg::B)[0].method, Method::Bye);
    assert_eq!(sent(&actions, Leg::A)[0].method, Method::Bye);
    call.on_event(Event::Timer(Timer::ByeWait));
    let (mut call, _) = timed_b2bua(MediaMode::PassThrough);
    let refresh = sent(&call.on_event(Event::Timer(Timer::Session(Leg::B, SessionTimerKind::Refresh))), Leg::B);
    let actions = call.on_event(Event::Response { leg: Leg::B, response: answer_to(&refresh[0], 481, "") });
    assert_eq!(sent(&actions, Leg::A)[0].method, Method::Bye, "{actions:?}");
    let actions = call.on_event(Event::Timer(Timer::ByeWait));
    let end = ending(&actions).expect("ended");
    assert_eq!(end.code, 408);
    assert!(end.reason.contains("session refresh on the callee's leg answered 481"), "{}", end.reason);
}

#[test]
fn a_garbage_info_dtmf_body_is_refused_and_a_good_one_passed_on_normalised() {
    let (mut call, _) = b2bua(MediaMode::PassThrough, true);
    let mut info = incoming("INFO", 2, "", "");
    message::set_body(&mut info.headers, &mut info.body, b"Signal=Z".to_vec(), Some("application/dtmf-relay"));
    let actions = call.on_event(request_event(Leg::A, info));
    assert!(sent(&actions, Leg::B).is_empty());
    assert_eq!(message::status(&responses(&actions)[0]), 400);
    let mut info = incoming("INFO", 3, "", "");
    message::set_body(&mut info.headers, &mut info.body, b"#".to_vec(), Some("application/dtmf"));
    let actions = call.on_event(request_event(Leg::A, info));
    let forwarded = &sent(&actions, Leg::B)[0];
    assert_eq!(forwarded.body, b"Signal=#\r\nDuration=250\r\n");
    assert_eq!(hv(&forwarded.headers, "Content-Type").as_deref(), Some("application/dtmf-relay"));
}

// Session timers on an API call's only leg (B): the node's refreshes carry its offer, the
// callee's refreshes are answered on the leg, an unrefreshed session ends the call.
fn timed_api_call(we_refresh: bool, sent: Option<&str>) -> (Connected<'static>, Vec<Action>) {
    use crate::sip::control::session_timer::{Negotiated, Refresher};
    let mut b = leg("b-call", "btag", 1, peer(5062, Protocol::Udp));
    let refresher = if we_refresh { Refresher::Uac } else { Refresher::Uas };
    b.session = Some(LegTimer { negotiated: Negotiated { interval: 90, refresher, we_refresh }, min_se: 90 });
    Connected::new(Setup {
        a: None,
        b: Some(b),
        media: MediaMode::RefuseOffers { sent: sent.map(|sdp| sdp.as_bytes().to_vec()) },
        timers: TimerConfig::default(),
        wait_for_bye: false,
        max_duration: Some(Duration::from_secs(4 * 3600)),
        session_policy: Default::default(),
    })
}

#[test]
fn an_api_call_refreshes_its_callee_with_a_reinvite_carrying_its_offer() {
    let (mut call, first) = timed_api_call(true, Some(SDP));
    assert!(first.contains(&Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Refresh), secs(45))));
    assert!(first.contains(&Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Expiry), secs(60))));
    let actions = call.on_event(Event::Timer(Timer::Session(Leg::B, SessionTimerKind::Refresh)));
    let refresh = sent(&actions, Leg::B);
    assert_eq!(refresh.len(), 1, "{actions:?}");
    assert_eq!((refresh[0].method, refresh[0].body.as_slice()), (Method::Invite, SDP.as_bytes()));
    assert_eq!(hv(&refresh[0].headers, "Session-Expires").as_deref(), Some("90;refresher=uac"));
    assert_eq!(hv(&refresh[0].headers, "Min-SE").as_deref(), Some("90"));
    // The callee's 2xx is ACKed by the node and restarts the schedule.
    let actions = call.on_event(Event::Response { leg: Leg::B, response: answer_to(&refresh[0], 200, SDP) });
    assert!(matches!(&actions[0], Action::SendStateless { leg: Leg::B, .. }), "{actions:?}");
    assert!(actions.contains(&Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Refresh), secs(45))));
    // A 422 to a later refresh is retried at once with the callee's Min-SE.
    let refresh = sent(&call.on_event(Event::Timer(Timer::Session(Leg::B, SessionTimerKind::Refresh))), Leg::B);
    let mut too_small = answer_to(&refresh[0], 422, "");
    too_small.headers.push(rsip::Header::Other("Min-SE".into(), "180".into()));
    let retry = sent(&call.on_event(Event::Response { leg: Leg::B, response: too_small }), Leg::B);
    assert_eq!(retry[0].body, SDP.as_bytes());
    assert_eq!(hv(&retry[0].headers, "Session-Expires").as_deref(), Some("180;refresher=uac"));
    // A callee that never answers a refresh: the call ends, the CDR reason says why.
    let actions = call.on_event(Event::TransactionTimeout { leg: Leg::B });
    assert_eq!(sent(&actions, Leg::B)[0].method, Method::Bye);
    let end = ending(&actions).expect("ended");
    assert!(end.reason.contains("session refresh on the callee's leg got no answer"), "{}", end.reason);
}

#[test]
fn an_api_calls_callee_refreshes_are_answered_and_its_silence_ends_the_call() {
    let (mut call, first) = timed_api_call(false, Some(SDP));
    assert!(first.contains(&Action::CancelTimer(Timer::Session(Leg::B, SessionTimerKind::Refresh))));
    let update = incoming("UPDATE", 2, "", "Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n");
    let actions = call.on_event(request_event(Leg::B, update));
    let ok = &responses(&actions)[0];
    assert_eq!(message::status(ok), 200);
    assert_eq!(hv(&ok.headers, "Session-Expires").as_deref(), Some("90;refresher=uac"));
    assert!(actions.contains(&Action::Schedule(Timer::Session(Leg::B, SessionTimerKind::Expiry), secs(60))));
    // A re-INVITE without an offer gets the node's SDP as the offer in the 200.
    let actions = call.on_event(request_event(Leg::B, incoming("INVITE", 3, "", "Supported: timer\r\n")));
    let ok = &responses(&actions)[0];
    assert_eq!((message::status(ok), ok.body.as_slice()), (200, SDP.as_bytes()));
    // An offer is still refused (no media to negotiate with), the call stays up.
    let actions = call.on_event(request_event(Leg::B, incoming("INVITE", 4, SDP, "")));
    assert_eq!(message::status(&responses(&actions)[0]), 488);
    let actions = call.on_event(Event::Timer(Timer::Session(Leg::B, SessionTimerKind::Expiry)));
    let bye = sent(&actions, Leg::B);
    assert!(header(&bye[0], "Reason")[0].contains("session timer expired"), "{:?}", header(&bye[0], "Reason"));
    let end = ending(&actions).expect("an API call does not wait for the BYE's answer");
    assert_eq!((end.code, end.by), (408, Ender::System));
    assert_eq!(end.reason, "session timer expired on the callee's leg (RFC 4028)");
}
