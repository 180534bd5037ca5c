//! Plain-value tests of the machine's transfers: a REFER received (`refer.rs`) and an INVITE
//! with `Replaces` for one of its dialogs (`replaces.rs`).

use rsip::{Method, Request};

use super::*;
use crate::media::sdp::SdpError;
use crate::sip::control::header_values;
use crate::sip::transaction::test_support::{header, request};
use crate::sip::transport::{Peer, Protocol};

fn peer(port: u16) -> Peer {
    Peer { protocol: Protocol::Udp, addr: format!("192.0.2.{}:{port}", port % 200).parse().unwrap() }
}

fn leg(call_id: &str, tag: &str, port: u16) -> LegSetup {
    let peer = peer(port);
    LegSetup {
        dialog: Dialog {
            call_id: call_id.into(),
            local_tag: tag.into(),
            local: format!("<sip:node@198.51.100.1>;tag={tag}"),
            remote: format!("<sip:far@{}>;tag=far-{tag}", peer.addr),
            remote_target: rsip::Uri::try_from(format!("sip:far@{}", peer.addr).as_str()).unwrap(),
            route_set: vec![],
            local_cseq: 1,
            peer,
            contact: format!("<sip:dialog-{tag}@198.51.100.1:5060>"),
        },
        sent_by: ("198.51.100.1".into(), 5060),
        contact: format!("<sip:198.51.100.1:5060;leg={tag}>"),
        session: None,
    }
}

fn incoming(method: &str, cseq: u32, extra: &str, body: &str) -> Request {
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

fn on(leg: Leg, request: Request) -> Event {
    let key = (request.method != Method::Ack).then(|| TransactionKey::for_server_request(&request).unwrap());
    Event::Request { leg, request, key }
}

fn refer(cseq: u32, to: &str) -> Request {
    incoming("REFER", cseq, &format!("Refer-To: {to}\r\nReferred-By: <sip:far@192.0.2.9>\r\n"), "")
}

fn b2bua(media: MediaMode<'_>) -> (Connected<'_>, Vec<Action>) {
    let invite = incoming("INVITE", 1, "", "");
    let answer = Answer {
        key: TransactionKey::for_server_request(&invite).unwrap(),
        response: response_to(&invite, 200, Some("OK"), Some("atag")),
        reliable: true,
    };
    Connected::new(Setup {
        a: Some((leg("a-call", "atag", 5061), answer)),
        b: Some(leg("b-call", "btag", 5062)),
        media,
        timers: TimerConfig::default(),
        wait_for_bye: true,
        max_duration: None,
        session_policy: Default::default(),
    })
}

fn statuses(actions: &[Action]) -> Vec<u16> {
    actions
        .iter()
        .filter_map(|a| if let Action::Respond { response, .. } = a { Some(message::status(response)) } else { None })
        .collect()
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

fn placed(actions: &[Action]) -> Option<PlaceLeg> {
    actions.iter().find_map(|a| if let Action::PlaceLeg(p) = a { Some((**p).clone()) } else { None })
}

/// Anchored media that records the transfers asked of it.
#[derive(Default)]
struct Anchor {
    offered: Vec<Leg>,
    answered: Vec<(Leg, Vec<u8>)>,
}

impl AnchoredMedia for Anchor {
    fn awaits_caller_answer(&self) -> bool {
        false
    }
    fn caller_acked(&mut self, _body: &[u8]) -> Result<(), SdpError> {
        Ok(())
    }
    fn last_sent(&self, _leg: Leg) -> Option<Vec<u8>> {
        None
    }
    fn reoffer(&mut self, _from: Leg, _body: &[u8]) -> Result<(SessionDescription, Vec<u8>), SdpError> {
        Err(SdpError::NoAudio)
    }
    fn reanswer(&mut self, _from: Leg, _offer: &SessionDescription, _body: &[u8]) -> Result<Vec<u8>, SdpError> {
        Err(SdpError::NoAudio)
    }
    fn offer_new_leg(&mut self, leg: Leg) -> Vec<u8> {
        self.offered.push(leg);
        b"offer for the new party".to_vec()
    }
    fn new_leg_answered(&mut self, leg: Leg, body: &[u8]) -> Result<(), SdpError> {
        self.answered.push((leg, body.to_vec()));
        Ok(())
    }
    fn answer_new_leg(&mut self, leg: Leg, body: &[u8]) -> Result<Vec<u8>, SdpError> {
        self.answered.push((leg, body.to_vec()));
        if body.is_empty() { Err(SdpError::NoAudio) } else { Ok(b"answer to the new dialog".to_vec()) }
    }
}

#[test]
fn a_refer_places_the_new_leg_notifies_and_the_new_leg_replaces_the_referrer() {
    let mut anchor = Anchor::default();
    {
        let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor));
        // The callee refers the caller to a number: nothing is answered until the call says
        // whether a rule allows the target.
        let actions = call.on_event(on(Leg::B, refer(7, "<sip:+15550003333@carrier.example>")));
        let place = placed(&actions).expect("the call is asked to place the leg");
        assert_eq!((place.from, place.target.user.as_deref()), (Leg::B, Some("+15550003333")));
        assert_eq!(place.offer, b"offer for the new party");
        assert!(statuses(&actions).is_empty() && sent(&actions, Leg::A).is_empty(), "{actions:?}");

        let actions = call.on_event(Event::Referral(ReferralUpdate::Accepted));
        assert_eq!(statuses(&actions), [202]);
        let notify = &sent(&actions, Leg::B)[0];
        assert_eq!(notify.method, Method::Notify);
        assert_eq!(notify.body, b"SIP/2.0 100 Trying\r\n");
        assert_eq!(header_values(&notify.headers, "Event")[0], "refer;id=7");
        assert!(header_values(&notify.headers, "Subscription-State")[0].starts_with("active"));
        assert_eq!(header(notify, "Content-Type"), vec!["message/sipfrag;version=2.0"]);
        assert_eq!(header(notify, "Call-ID"), vec!["b-call"], "in the referrer's dialog");

        let new_leg = NewLeg { setup: leg("c-call", "ctag", 5063), answer: b"their answer".to_vec(), channel: None };
        let actions = call.on_event(Event::Referral(ReferralUpdate::Answered(Box::new(new_leg))));
        let to_referrer = sent(&actions, Leg::B);
        assert_eq!(to_referrer.iter().map(|r| r.method).collect::<Vec<_>>(), [Method::Notify, Method::Bye]);
        assert_eq!(to_referrer[0].body, b"SIP/2.0 200 OK\r\n");
        assert!(header_values(&to_referrer[0].headers, "Subscription-State")[0].starts_with("terminated"));
        assert_eq!(header(&to_referrer[1], "Call-ID"), vec!["b-call"], "the referrer's dialog ends");
        assert!(actions.contains(&Action::ReplaceLeg {
            leg: Leg::B,
            old_call_id: "b-call".into(),
            old_local_tag: "btag".into()
        }));
        assert!(sent(&actions, Leg::A).is_empty(), "the transferred caller notices nothing");
        assert_eq!(call.dialog(Leg::B).map(|d| d.call_id.as_str()), Some("c-call"));

        // The new party hangs up like any callee: the caller gets the BYE.
        let actions = call.on_event(on(Leg::B, incoming("BYE", 2, "", "")));
        assert_eq!(statuses(&actions), [200]);
        assert_eq!(sent(&actions, Leg::A)[0].method, Method::Bye);
    }
    assert_eq!(anchor.offered, [Leg::B]);
    assert_eq!(anchor.answered, [(Leg::B, b"their answer".to_vec())]);
}

#[test]
fn the_referrer_hears_once_that_the_new_leg_rings() {
    let mut anchor = Anchor::default();
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor));
    call.on_event(on(Leg::B, refer(7, "<tel:+15550003333>")));
    call.on_event(Event::Referral(ReferralUpdate::Accepted));
    let actions = call.on_event(Event::Referral(ReferralUpdate::Ringing { code: 180 }));
    let notify = &sent(&actions, Leg::B)[0];
    assert_eq!(notify.body, b"SIP/2.0 180 Ringing\r\n");
    assert_eq!(header_values(&notify.headers, "Event")[0], "refer;id=7");
    assert!(header_values(&notify.headers, "Subscription-State")[0].starts_with("active"), "not final yet");
    // Another 18x (a failover's attempt, a 183 after the 180): nothing more.
    assert!(call.on_event(Event::Referral(ReferralUpdate::Ringing { code: 183 })).is_empty());
    let new_leg = NewLeg { setup: leg("c-call", "ctag", 5063), answer: b"their answer".to_vec(), channel: None };
    let actions = call.on_event(Event::Referral(ReferralUpdate::Answered(Box::new(new_leg))));
    assert_eq!(sent(&actions, Leg::B)[0].body, b"SIP/2.0 200 OK\r\n");
}

#[test]
fn a_referrer_that_wants_no_subscription_gets_refer_sub_false_and_no_notify() {
    let mut anchor = Anchor::default();
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor));
    let no_sub = |cseq| {
        incoming("REFER", cseq, "Refer-To: <tel:+15550003333>\r\nRefer-Sub: False\r\nSupported: norefersub\r\n", "")
    };
    assert!(placed(&call.on_event(on(Leg::B, no_sub(7)))).is_some());
    let actions = call.on_event(Event::Referral(ReferralUpdate::Accepted));
    let accepted =
        actions.iter().find_map(|a| if let Action::Respond { response, .. } = a { Some(response) } else { None });
    let accepted = accepted.expect("the REFER is answered");
    assert_eq!(message::status(accepted), 202);
    assert_eq!(header_values(&accepted.headers, "Refer-Sub"), ["false"]);
    assert!(sent(&actions, Leg::B).is_empty(), "no NOTIFY 100: {actions:?}");
    assert!(call.on_event(Event::Referral(ReferralUpdate::Ringing { code: 180 })).is_empty(), "no NOTIFY 180");
    // A failure is not NOTIFYed either; the call goes on and the next REFER may subscribe.
    let actions = call.on_event(Event::Referral(ReferralUpdate::Failed { code: 486, reason: "Busy Here".into() }));
    assert!(sent(&actions, Leg::B).is_empty(), "{actions:?}");
    assert!(placed(&call.on_event(on(Leg::B, no_sub(8)))).is_some());
    call.on_event(Event::Referral(ReferralUpdate::Accepted));
    // Answered: the referrer only gets the BYE that ends its leg.
    let new_leg = NewLeg { setup: leg("c-call", "ctag", 5063), answer: b"their answer".to_vec(), channel: None };
    let actions = call.on_event(Event::Referral(ReferralUpdate::Answered(Box::new(new_leg))));
    let to_referrer: Vec<Method> = sent(&actions, Leg::B).iter().map(|r| r.method).collect();
    assert_eq!(to_referrer, [Method::Bye], "{actions:?}");
    // A REFER with `Refer-Sub: true` (or none) subscribes as before.
    let mut other = Anchor::default();
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut other));
    call.on_event(on(Leg::A, incoming("REFER", 3, "Refer-To: <tel:+15550003333>\r\nRefer-Sub: true\r\n", "")));
    let actions = call.on_event(Event::Referral(ReferralUpdate::Accepted));
    assert_eq!(sent(&actions, Leg::A)[0].body, b"SIP/2.0 100 Trying\r\n");
}

#[test]
fn a_refused_or_malformed_refer_leaves_the_call_as_it_was() {
    let mut anchor = Anchor::default();
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor));
    call.on_event(on(Leg::A, refer(3, "<sip:+19009999999@h>")));
    let actions = call.on_event(Event::Referral(ReferralUpdate::Refused { code: 403, reason: "no rule".into() }));
    assert_eq!(statuses(&actions), [403]);
    assert!(sent(&actions, Leg::A).is_empty(), "no NOTIFY for a refused REFER");
    // Without exactly one usable Refer-To: 400, 416 for a scheme the node cannot reach.
    let actions = call.on_event(on(Leg::A, incoming("REFER", 4, "", "")));
    assert_eq!(statuses(&actions), [400]);
    let actions = call.on_event(on(Leg::A, refer(5, "<http://example.com/>")));
    assert_eq!(statuses(&actions), [416]);
    // One transfer at a time.
    assert!(placed(&call.on_event(on(Leg::A, refer(6, "<tel:+15550003333>")))).is_some());
    assert_eq!(statuses(&call.on_event(on(Leg::B, refer(2, "<tel:+15550004444>")))), [491]);
}

#[test]
fn a_referrer_that_leaves_after_202_is_let_go_and_a_failed_transfer_then_ends_the_call() {
    let mut anchor = Anchor::default();
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor));
    call.on_event(on(Leg::A, refer(2, "<tel:+15550003333>")));
    call.on_event(Event::Referral(ReferralUpdate::Accepted));
    // The caller (the referrer) hangs up: only its leg ends, the callee waits.
    let actions = call.on_event(on(Leg::A, incoming("BYE", 3, "", "")));
    assert_eq!(statuses(&actions), [200]);
    assert!(sent(&actions, Leg::B).is_empty() && !actions.iter().any(|a| matches!(a, Action::End(_))));
    // The target is busy: nobody is left for the callee, who gets the BYE.
    let actions = call.on_event(Event::Referral(ReferralUpdate::Failed { code: 486, reason: "Busy Here".into() }));
    assert!(sent(&actions, Leg::A).is_empty(), "no NOTIFY to a referrer that left");
    assert_eq!(sent(&actions, Leg::B)[0].method, Method::Bye);
    let actions = call.on_event(Event::Timer(Timer::ByeWait));
    let end = actions.iter().find_map(|a| if let Action::End(e) = a { Some(e.clone()) } else { None });
    assert_eq!(end.map(|e| (e.code, e.by)), Some((486, Ender::System)));
}

#[test]
fn a_failed_transfer_is_reported_to_a_referrer_that_stayed() {
    let mut anchor = Anchor::default();
    let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor));
    call.on_event(on(Leg::B, refer(9, "<tel:+15550003333>")));
    call.on_event(Event::Referral(ReferralUpdate::Accepted));
    let actions = call.on_event(Event::Referral(ReferralUpdate::Failed { code: 486, reason: "Busy Here".into() }));
    let notify = &sent(&actions, Leg::B)[0];
    assert_eq!(notify.body, b"SIP/2.0 486 Busy Here\r\n");
    assert!(header_values(&notify.headers, "Subscription-State")[0].starts_with("terminated"));
    assert!(!actions.iter().any(|a| matches!(a, Action::End(_) | Action::ReplaceLeg { .. })));
    // The call goes on, and a new REFER may follow.
    assert!(placed(&call.on_event(on(Leg::B, refer(10, "<tel:+15550003333>")))).is_some());
}

#[test]
fn an_invite_with_replaces_takes_the_named_legs_place() {
    let mut anchor = Anchor::default();
    {
        let (mut call, _) = b2bua(MediaMode::Anchored(&mut anchor));
        let replacing = |replaces: &str| {
            let request = request(&format!(
                "INVITE sip:node@198.51.100.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKrepl{}\r\n\
Max-Forwards: 70\r\n\
From: <sip:carol@192.0.2.50>;tag=carol\r\n\
To: <sip:node@198.51.100.1>\r\n\
Call-ID: new-call\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:carol@192.0.2.50>\r\n\
Replaces: {replaces}\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 5\r\n\r\nhello",
                replaces.len()
            ));
            let key = TransactionKey::for_server_request(&request).unwrap();
            Event::Replacing(Box::new(Replacing {
                leg: Leg::A,
                request,
                key,
                peer: peer(5050),
                sent_by: ("198.51.100.1".into(), 5060),
                contact: "<sip:198.51.100.1:5060>".into(),
            }))
        };
        // Another dialog's tags, or early-only for a confirmed dialog: refused.
        assert_eq!(statuses(&call.on_event(replacing("a-call;to-tag=other;from-tag=far-atag"))), [481]);
        assert_eq!(statuses(&call.on_event(replacing("a-call;to-tag=atag;from-tag=far-atag;early-only"))), [486]);

        let actions = call.on_event(replacing("a-call;to-tag=atag;from-tag=far-atag"));
        assert_eq!(statuses(&actions), [200]);
        let bye = &sent(&actions, Leg::A)[0];
        assert_eq!(
            (bye.method, header(bye, "Call-ID")),
            (Method::Bye, vec!["a-call".to_string()]),
            "the replaced dialog ends"
        );
        let rebind = actions.iter().find_map(|a| match a {
            Action::Rebind { leg, peer, register, unregister } => {
                Some((*leg, *peer, register.clone(), unregister.clone()))
            }
            _ => None,
        });
        let (leg, new_peer, register, unregister) = rebind.expect("the driver rebinds the leg");
        assert_eq!((leg, new_peer, unregister), (Leg::A, peer(5050), ("a-call".to_string(), "atag".to_string())));
        assert_eq!(register.0, "new-call");
        assert_eq!(call.dialog(Leg::A).map(|d| d.local_tag.clone()), Some(register.1));
        assert!(sent(&actions, Leg::B).is_empty(), "the other leg is untouched");
    }
    assert_eq!(anchor.answered, [(Leg::A, b"hello".to_vec())]);
}
