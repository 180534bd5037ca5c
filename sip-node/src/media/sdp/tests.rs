use std::net::{IpAddr, Ipv6Addr};

use switchboard_model::Codec;

#[test]
fn what_the_node_writes_back_parses_again_with_control_characters_in_a_field() {
    // The sdp fuzz target's input: a vertical tab among form feeds in the c= address.
    let body = b"v=0\r\no=user1 53655765 2353687637 IN IP4 127&0.0.1\r\ns=-\r\nc=IN IP4 \x0c\x0c\x0b\x0c\x08\0ecv\nm=audio 2000 RTP/AVP 0 8 1073a";
    let sdp = SessionDescription::parse_bytes(body).unwrap();
    let again = SessionDescription::parse(&sdp.to_sdp_string()).expect("the written SDP parses");
    assert_eq!(again.to_sdp_string(), sdp.to_sdp_string());
}
use super::*;

const CARRIER_OFFER: &str = "v=0\r\n\
o=- 1234567 1234567 IN IP4 203.0.113.10\r\n\
s=SIP Media Capabilities\r\n\
c=IN IP4 203.0.113.10\r\n\
t=0 0\r\n\
m=audio 18000 RTP/AVP 8 0 18 101\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:18 G729/8000\r\n\
a=fmtp:18 annexb=no\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=ptime:20\r\n\
a=maxptime:150\r\n\
a=sendrecv\r\n\
a=X-nat:0\r\n\
a=silenceSupp:off - - - -\r\n";

fn local() -> LocalEndpoint {
    LocalEndpoint { address: "198.51.100.7".parse().unwrap(), rtp_port: 10000 }
}

fn policy(codecs: &[Codec]) -> MediaPolicy {
    MediaPolicy::new(codecs.to_vec(), local())
}

fn session() -> SdpSession {
    SdpSession::new(local().address)
}

#[test]
fn parses_a_carrier_offer() {
    let sdp = SessionDescription::parse(CARRIER_OFFER).unwrap();
    assert_eq!(sdp.origin.session_version, 1234567);
    assert_eq!(sdp.connection.as_ref().unwrap().ip(), Some("203.0.113.10".parse().unwrap()));
    let m = &sdp.media[0];
    assert_eq!(m.port, 18000);
    assert_eq!(m.payload_types().collect::<Vec<_>>(), vec![8, 0, 18, 101]);
    assert_eq!(m.codec_of(8), Some(Codec::Pcma));
    assert_eq!(m.codec_of(18), None);
    assert_eq!(m.codec_of(101), Some(Codec::TelephoneEvent));
    assert_eq!(m.fmtp(101), Some("0-15"));
    assert_eq!(m.ptime(), Some(20));
    assert_eq!(m.maxptime(), Some(150));
    assert_eq!(m.direction(), Some(MediaDirection::SendRecv));
    assert_eq!(m.attribute("silenceSupp").unwrap().value.as_deref(), Some("off - - - -"));
}

#[test]
fn round_trip_keeps_every_line() {
    let sdp = SessionDescription::parse(CARRIER_OFFER).unwrap();
    let text = sdp.to_string();
    assert_eq!(text, CARRIER_OFFER);
    assert_eq!(SessionDescription::parse(&text).unwrap(), sdp);
}

#[test]
fn accepts_lf_only_and_static_types_without_rtpmap() {
    let text = "v=0\no=- 1 1 IN IP4 10.0.0.1\ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0 8\nc=IN IP4 10.0.0.2\n\n";
    let sdp = SessionDescription::parse(text).unwrap();
    let m = &sdp.media[0];
    assert_eq!(m.codec_of(0), Some(Codec::Pcmu));
    assert_eq!(m.codec_of(8), Some(Codec::Pcma));
    assert_eq!(sdp.connection_of(m).unwrap().address, "10.0.0.2");
    assert_eq!(sdp.direction_of(m), MediaDirection::SendRecv);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let cases = [
        "",
        "o=- 1 1 IN IP4 1.2.3.4\r\n",
        "v=1\r\n",
        "v=0\r\nv=0\r\n",
        "v=0\r\no=- 1 1 IN IP4\r\n",
        "v=0\r\no=- 1 x IN IP4 1.2.3.4\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 99999 RTP/AVP 0\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 1/x RTP/AVP 0\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=ATM NSAP x\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IPX 1.2.3.4\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nhello\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n=x\r\n",
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\né=x\r\n",
        "v=0\r\ns=x\r\n",
    ];
    for case in cases {
        assert!(SessionDescription::parse(case).is_err(), "{case:?} should fail");
    }
    assert_eq!(SessionDescription::parse_bytes(&[0xff, 0xfe]), Err(SdpError::NotUtf8));
    assert!(matches!(SessionDescription::parse_bytes(&vec![b'a'; MAX_SDP_LEN + 1]), Err(SdpError::TooLarge(_))));
    let many = format!("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n{}", "m=audio 0 RTP/AVP 0\r\n".repeat(40));
    assert_eq!(SessionDescription::parse(&many), Err(SdpError::TooManyMedia));
    // Odd but harmless lines are tolerated: unknown types, garbage attribute values.
    let odd = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nx=whatever\r\nm=audio 5 RTP/AVP 0 abc 300\r\n\
               a=rtpmap:zz\r\na=rtpmap:0\r\na=ptime:abc\r\na=rtcp:\r\na=fmtp\r\n";
    let sdp = SessionDescription::parse(odd).unwrap();
    let m = &sdp.media[0];
    assert_eq!(m.payload_types().collect::<Vec<_>>(), vec![0]);
    assert_eq!(m.ptime(), None);
    assert_eq!(m.rtcp(), None);
    assert_eq!(m.fmtp(0), None);
    assert_eq!(m.codec_of(0), Some(Codec::Pcmu));
}

#[test]
fn every_prefix_of_a_valid_body_is_handled() {
    for end in 0..CARRIER_OFFER.len() {
        let _ = SessionDescription::parse(&CARRIER_OFFER[..end]);
    }
}

#[test]
fn answer_picks_the_offerers_first_allowed_codec() {
    let offer = SessionDescription::parse(CARRIER_OFFER).unwrap();
    let mut s = session();
    let (answer, negotiated) =
        answer_offer(&offer, &policy(&[Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent]), &mut s).unwrap();
    assert_eq!(negotiated.codec, Codec::Pcma);
    assert_eq!(negotiated.payload_type, 8);
    assert_eq!(negotiated.telephone_event, Some(101));
    assert_eq!(negotiated.remote_rtp, Some("203.0.113.10:18000".parse().unwrap()));
    assert_eq!(negotiated.remote_rtcp, Some("203.0.113.10:18001".parse().unwrap()));
    assert_eq!(negotiated.direction, MediaDirection::SendRecv);
    assert_eq!(negotiated.remote_ptime, Some(20));
    let text = answer.to_string();
    assert!(text.contains("c=IN IP4 198.51.100.7\r\n"), "{text}");
    assert!(text.contains("m=audio 10000 RTP/AVP 8 101\r\n"), "{text}");
    assert!(text.contains("a=rtpmap:8 PCMA/8000\r\n"), "{text}");
    assert!(text.contains("a=rtpmap:101 telephone-event/8000\r\n"), "{text}");
    assert!(text.contains("a=fmtp:101 0-15\r\n"), "{text}");
    assert!(text.contains("a=ptime:20\r\na=sendrecv\r\n"), "{text}");
    // The answer parses, and reading it as an answer to the offer agrees.
    let reparsed = SessionDescription::parse(&text).unwrap();
    assert_eq!(reparsed, answer);
}

#[test]
fn answer_without_telephone_event_when_not_allowed() {
    let offer = SessionDescription::parse(CARRIER_OFFER).unwrap();
    let (answer, negotiated) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut session()).unwrap();
    assert_eq!(negotiated.codec, Codec::Pcmu);
    assert_eq!(negotiated.payload_type, 0);
    assert_eq!(negotiated.telephone_event, None);
    assert!(answer.to_string().contains("m=audio 10000 RTP/AVP 0\r\n"));
}

#[test]
fn no_common_codec_is_488() {
    let offer = SessionDescription::parse(&CARRIER_OFFER.replace("8 0 18 101", "18 101")).unwrap();
    let err =
        answer_offer(&offer, &policy(&[Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent]), &mut session()).unwrap_err();
    assert!(matches!(err, SdpError::NoCommonCodec { .. }), "{err}");
    assert_eq!(err.sip_status(), 488);
    let video_only = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=video 5000 RTP/AVP 96\r\n";
    let err = answer_offer(&SessionDescription::parse(video_only).unwrap(), &policy(&[Codec::Pcmu]), &mut session())
        .unwrap_err();
    assert_eq!(err, SdpError::NoAudio);
    assert_eq!(err.sip_status(), 488);
    let srtp = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/SAVP 0\r\n";
    let err =
        answer_offer(&SessionDescription::parse(srtp).unwrap(), &policy(&[Codec::Pcmu]), &mut session()).unwrap_err();
    assert_eq!(err.sip_status(), 488);
    let no_c = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 0\r\n";
    let err =
        answer_offer(&SessionDescription::parse(no_c).unwrap(), &policy(&[Codec::Pcmu]), &mut session()).unwrap_err();
    assert_eq!(err, SdpError::NoConnection);
    assert_eq!(SdpError::NotUtf8.sip_status(), 400);
}

#[test]
fn other_sections_are_rejected_in_order() {
    let text = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n\
                m=video 5002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n\
                m=audio 5000 RTP/AVP 0\r\n\
                m=audio 5004 RTP/AVP 0\r\n";
    let offer = SessionDescription::parse(text).unwrap();
    let (answer, negotiated) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut session()).unwrap();
    assert_eq!(negotiated.media_index, 1);
    assert_eq!(answer.media.len(), 3);
    assert_eq!(answer.media[0].port, 0);
    assert_eq!(answer.media[0].formats, vec!["96"]);
    assert_eq!(answer.media[1].port, 10000);
    assert_eq!(answer.media[2].port, 0);
}

#[test]
fn hold_and_resume_directions() {
    let cases = [
        ("a=sendrecv", MediaDirection::SendRecv),
        ("a=sendonly", MediaDirection::RecvOnly),
        ("a=recvonly", MediaDirection::SendOnly),
        ("a=inactive", MediaDirection::Inactive),
    ];
    let mut s = session();
    let mut versions = vec![];
    for (attribute, expected) in cases {
        let offer = SessionDescription::parse(&CARRIER_OFFER.replace("a=sendrecv", attribute)).unwrap();
        let (answer, negotiated) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut s).unwrap();
        assert_eq!(negotiated.direction, expected, "{attribute}");
        assert_eq!(answer.media[0].direction(), Some(expected));
        versions.push(answer.origin.session_version);
    }
    // Each changed answer has a higher version; the session id stays.
    assert!(versions.windows(2).all(|w| w[1] == w[0] + 1), "{versions:?}");
    // An unchanged answer keeps its version.
    let offer = SessionDescription::parse(&CARRIER_OFFER.replace("a=sendrecv", "a=inactive")).unwrap();
    let (answer, _) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut s).unwrap();
    assert_eq!(answer.origin.session_version, *versions.last().unwrap());

    // Session-level direction applies when the section has none.
    let text = CARRIER_OFFER.replace("a=sendrecv\r\n", "").replace("t=0 0\r\n", "t=0 0\r\na=sendonly\r\n");
    let (_, negotiated) =
        answer_offer(&SessionDescription::parse(&text).unwrap(), &policy(&[Codec::Pcmu]), &mut s).unwrap();
    assert_eq!(negotiated.direction, MediaDirection::RecvOnly);

    // RFC 2543 hold: c=0.0.0.0 means do not send to me.
    let text = CARRIER_OFFER.replace("c=IN IP4 203.0.113.10", "c=IN IP4 0.0.0.0");
    let (answer, negotiated) =
        answer_offer(&SessionDescription::parse(&text).unwrap(), &policy(&[Codec::Pcmu]), &mut s).unwrap();
    assert_eq!(negotiated.remote_rtp, None);
    assert_eq!(negotiated.direction, MediaDirection::RecvOnly);
    assert_eq!(answer.media[0].direction(), Some(MediaDirection::RecvOnly));

    // The node holding its side limits the answer.
    let mut held = policy(&[Codec::Pcmu]);
    held.direction = MediaDirection::SendOnly;
    let offer = SessionDescription::parse(CARRIER_OFFER).unwrap();
    let (_, negotiated) = answer_offer(&offer, &held, &mut s).unwrap();
    assert_eq!(negotiated.direction, MediaDirection::SendOnly);
}

#[test]
fn direction_algebra() {
    use MediaDirection::*;
    for d in [SendRecv, SendOnly, RecvOnly, Inactive] {
        assert_eq!(d.reverse().reverse(), d);
        assert_eq!(d.intersect(SendRecv), d);
        assert_eq!(d.intersect(Inactive), Inactive);
        assert_eq!(MediaDirection::from_attribute(d.as_str()), Some(d));
    }
    assert_eq!(SendOnly.reverse(), RecvOnly);
    assert_eq!(Inactive.reverse(), Inactive);
    assert_eq!(SendOnly.intersect(RecvOnly), Inactive);
}

#[test]
fn offer_and_answer_for_an_outbound_leg() {
    let mut s = session();
    let mut p = policy(&[Codec::Pcma, Codec::Pcmu, Codec::TelephoneEvent]);
    p.local.rtp_port = 10002;
    let offer = create_offer(&p, &mut s);
    let text = offer.to_string();
    assert!(text.starts_with("v=0\r\no=switchboard "), "{text}");
    assert!(text.contains("m=audio 10002 RTP/AVP 8 0 101\r\n"), "{text}");
    assert!(text.contains("a=fmtp:101 0-16\r\n"), "{text}");
    assert!(text.contains("a=sendrecv\r\n"), "{text}");
    let reparsed = SessionDescription::parse(&text).unwrap();
    assert_eq!(reparsed, offer);

    // The callee answers PCMU and telephone-event on its own payload type, and puts us on hold.
    let answer_text = "v=0\r\no=callee 9 9 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\n\
                       m=audio 30000 RTP/AVP 0 96\r\na=rtpmap:96 telephone-event/8000\r\na=rtcp:30011\r\n\
                       a=sendonly\r\n";
    let answer = SessionDescription::parse(answer_text).unwrap();
    let negotiated = process_answer(&offer, &answer).unwrap();
    assert_eq!(negotiated.codec, Codec::Pcmu);
    assert_eq!(negotiated.payload_type, 0);
    assert_eq!(negotiated.telephone_event, Some(96));
    assert_eq!(negotiated.remote_rtp, Some("192.0.2.5:30000".parse().unwrap()));
    assert_eq!(negotiated.remote_rtcp, Some("192.0.2.5:30011".parse().unwrap()));
    assert_eq!(negotiated.direction, MediaDirection::RecvOnly);

    // Rejections.
    let rejected = SessionDescription::parse(&answer_text.replace("30000", "0")).unwrap();
    assert_eq!(process_answer(&offer, &rejected), Err(SdpError::AudioRejected));
    let wrong = SessionDescription::parse(&answer_text.replace("RTP/AVP 0 96", "RTP/AVP 18")).unwrap();
    assert!(matches!(process_answer(&offer, &wrong), Err(SdpError::NoCommonCodec { .. })));
    let extra = format!("{answer_text}m=video 0 RTP/AVP 96\r\n");
    assert!(matches!(
        process_answer(&offer, &SessionDescription::parse(&extra).unwrap()),
        Err(SdpError::AnswerMismatch(_))
    ));

    // A hold offer from the node.
    p.direction = MediaDirection::SendOnly;
    let hold = create_offer(&p, &mut s);
    assert!(hold.origin.session_version > offer.origin.session_version);
    assert_eq!(hold.media[0].direction(), Some(MediaDirection::SendOnly));
    let held_answer = SessionDescription::parse(&answer_text.replace("a=sendonly", "a=recvonly")).unwrap();
    assert_eq!(process_answer(&hold, &held_answer).unwrap().direction, MediaDirection::SendOnly);
}

#[test]
fn ipv6_connection() {
    let text = "v=0\r\no=- 1 1 IN IP6 2001:db8::1\r\ns=-\r\nc=IN IP6 2001:db8::2\r\nt=0 0\r\n\
                m=audio 7000 RTP/AVP 0\r\n";
    let offer = SessionDescription::parse(text).unwrap();
    let mut p = policy(&[Codec::Pcmu]);
    p.local.address = "2001:db8::7".parse().unwrap();
    let (answer, negotiated) = answer_offer(&offer, &p, &mut SdpSession::new(p.local.address)).unwrap();
    assert_eq!(negotiated.remote_rtp, Some("[2001:db8::2]:7000".parse().unwrap()));
    assert!(answer.to_string().contains("c=IN IP6 2001:db8::7\r\n"));
    assert_eq!(unspecified_like(p.local.address), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
}

// SRTP with SDES (`a=crypto`) under a leg's policy.

use crate::media::srtp::{CryptoAttr, SrtpPolicy, Suite};

fn srtp_policy(srtp: SrtpPolicy) -> MediaPolicy {
    let mut policy = policy(&[Codec::Pcmu]);
    policy.srtp = srtp;
    policy
}

/// An offer with one audio section per `(profile, crypto lines)`, ports 5000, 5002, ...
fn offer_with(sections: &[(&str, &[&CryptoAttr])]) -> SessionDescription {
    let mut text = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n".to_string();
    for (i, (profile, crypto)) in sections.iter().enumerate() {
        text += &format!("m=audio {} {profile} 0\r\na=rtpmap:0 PCMU/8000\r\n", 5000 + 2 * i);
        for c in *crypto {
            text += &format!("a=crypto:{}\r\n", c.value());
        }
    }
    SessionDescription::parse(&text).unwrap()
}

fn crypto_lines(media: &MediaDescription) -> Vec<CryptoAttr> {
    media
        .attributes
        .iter()
        .filter(|a| a.name == "crypto")
        .map(|a| CryptoAttr::parse(a.value.as_deref().unwrap()).unwrap())
        .collect()
}

#[test]
fn an_srtp_offer_is_answered_with_the_nodes_own_key_under_required_and_optional() {
    let theirs = CryptoAttr::generate(7, Suite::AesCm128HmacSha1_32);
    let offer = offer_with(&[("RTP/SAVP", &[&theirs])]);
    for srtp in [SrtpPolicy::Required, SrtpPolicy::Optional] {
        let (answer, negotiated) = answer_offer(&offer, &srtp_policy(srtp), &mut session()).unwrap();
        let audio = &answer.media[0];
        assert_eq!(audio.protocol, "RTP/SAVP", "{srtp:?}");
        let ours = crypto_lines(audio);
        assert_eq!(ours.len(), 1, "one a=crypto in the answer");
        assert_eq!((ours[0].tag(), ours[0].suite()), (7, Suite::AesCm128HmacSha1_32), "the offer's tag and suite");
        assert_ne!(ours[0], theirs, "the node answers with a key of its own");
        let keys = negotiated.srtp.clone().expect("the leg is SRTP");
        assert_eq!((keys.remote, keys.local), (theirs.clone(), ours[0].clone()));
        // The answer reads back, and its Debug form does not give the key away.
        let again = SessionDescription::parse(&answer.to_string()).unwrap();
        assert_eq!(crypto_lines(&again.media[0]), ours);
        let key = ours[0].value().rsplit(':').next().unwrap().to_string();
        assert!(!format!("{answer:?} {negotiated:?}").contains(&key), "no key in Debug output");
    }
}

#[test]
fn each_policy_refuses_what_it_cannot_do_with_488_and_says_why() {
    let key = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    let savp = offer_with(&[("RTP/SAVP", &[&key])]);
    let err = answer_offer(&savp, &srtp_policy(SrtpPolicy::Off), &mut session()).unwrap_err();
    assert_eq!(err.sip_status(), 488);
    assert!(err.to_string().contains("media.srtp"), "{err}");
    let plain = offer_with(&[("RTP/AVP", &[])]);
    let err = answer_offer(&plain, &srtp_policy(SrtpPolicy::Required), &mut session()).unwrap_err();
    assert_eq!(err.sip_status(), 488);
    assert!(err.to_string().contains("requires SRTP"), "{err}");
    // Plain stays plain where plain is allowed.
    for srtp in [SrtpPolicy::Off, SrtpPolicy::Optional] {
        let (answer, negotiated) = answer_offer(&plain, &srtp_policy(srtp), &mut session()).unwrap();
        assert_eq!((answer.media[0].protocol.as_str(), negotiated.srtp), ("RTP/AVP", None));
        assert!(crypto_lines(&answer.media[0]).is_empty());
    }
    // SRTP without a usable key: an unknown suite.
    let text = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
                m=audio 5000 RTP/SAVP 0\r\na=crypto:1 AEAD_AES_256_GCM inline:AAAA\r\n";
    let err =
        answer_offer(&SessionDescription::parse(text).unwrap(), &srtp_policy(SrtpPolicy::Required), &mut session())
            .unwrap_err();
    assert_eq!(err.sip_status(), 488);
    assert!(err.to_string().contains("no usable a=crypto"), "{err}");
}

#[test]
fn with_both_an_srtp_and_a_plain_section_each_policy_takes_its_own() {
    let key = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    let offer = offer_with(&[("RTP/SAVP", &[&key]), ("RTP/AVP", &[])]);
    let (answer, negotiated) = answer_offer(&offer, &srtp_policy(SrtpPolicy::Off), &mut session()).unwrap();
    assert_eq!((negotiated.media_index, negotiated.srtp.is_none()), (1, true));
    assert_eq!((answer.media[0].port, answer.media[1].port), (0, 10000), "the SRTP section is rejected");
    let (answer, negotiated) = answer_offer(&offer, &srtp_policy(SrtpPolicy::Required), &mut session()).unwrap();
    assert_eq!((negotiated.media_index, negotiated.srtp.is_some()), (0, true));
    assert_eq!((answer.media[0].port, answer.media[1].port), (10000, 0));
}

#[test]
fn a_best_effort_offer_rtp_avp_with_crypto_is_srtp_when_allowed() {
    let key = CryptoAttr::generate(3, Suite::AesCm128HmacSha1_80);
    let offer = offer_with(&[("RTP/AVP", &[&key])]);
    let (answer, negotiated) = answer_offer(&offer, &srtp_policy(SrtpPolicy::Optional), &mut session()).unwrap();
    assert_eq!(answer.media[0].protocol, "RTP/AVP", "answered in the offer's profile");
    assert_eq!(negotiated.srtp.unwrap().remote, key);
    let (answer, negotiated) = answer_offer(&offer, &srtp_policy(SrtpPolicy::Off), &mut session()).unwrap();
    assert!(negotiated.srtp.is_none() && crypto_lines(&answer.media[0]).is_empty(), "disabled: plain");
}

/// The callee's side: what the node offers under each policy, and what it makes of answers.
#[test]
fn the_nodes_offers_carry_keys_by_policy_and_the_answer_picks_one() {
    let offer = create_offer(&srtp_policy(SrtpPolicy::Required), &mut session());
    let audio = &offer.media[0];
    assert_eq!(audio.protocol, "RTP/SAVP");
    let ours = crypto_lines(audio);
    assert_eq!(
        ours.iter().map(|c| (c.tag(), c.suite())).collect::<Vec<_>>(),
        [(1, Suite::AesCm128HmacSha1_80), (2, Suite::AesCm128HmacSha1_32)]
    );
    // The callee takes tag 2 and answers with its key.
    let callee_key = CryptoAttr::generate(2, Suite::AesCm128HmacSha1_32);
    let answer = |profile: &str, crypto: &[&CryptoAttr]| {
        let mut sdp = offer_with(&[(profile, crypto)]);
        sdp.media[0].port = 6000;
        sdp
    };
    let negotiated = process_answer(&offer, &answer("RTP/SAVP", &[&callee_key])).unwrap();
    let keys = negotiated.srtp.unwrap();
    assert_eq!((keys.local, keys.remote), (ours[1].clone(), callee_key.clone()));
    // Required: an answer without a key is no SRTP, refused (488).
    let err = process_answer(&offer, &answer("RTP/SAVP", &[])).unwrap_err();
    assert_eq!(err.sip_status(), 488);
    // A tag the node never offered.
    let stranger = CryptoAttr::generate(9, Suite::AesCm128HmacSha1_80);
    assert!(process_answer(&offer, &answer("RTP/SAVP", &[&stranger])).unwrap_err().to_string().contains("tag 9"));

    // Optional: RTP/AVP with keys; a plain answer keeps the leg plain, a keyed one makes it SRTP.
    let offer = create_offer(&srtp_policy(SrtpPolicy::Optional), &mut session());
    assert_eq!((offer.media[0].protocol.as_str(), crypto_lines(&offer.media[0]).len()), ("RTP/AVP", 2));
    assert_eq!(process_answer(&offer, &answer("RTP/AVP", &[])).unwrap().srtp, None);
    let first = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    assert!(process_answer(&offer, &answer("RTP/AVP", &[&first])).unwrap().srtp.is_some());

    // Disabled: no keys offered, and an SRTP answer to a plain offer is refused.
    let offer = create_offer(&srtp_policy(SrtpPolicy::Off), &mut session());
    assert_eq!((offer.media[0].protocol.as_str(), crypto_lines(&offer.media[0]).len()), ("RTP/AVP", 0));
    assert_eq!(process_answer(&offer, &answer("RTP/SAVP", &[&first])).unwrap_err().sip_status(), 488);
}

#[test]
fn a_resumed_session_keeps_the_origin_and_bumps_the_version_only_on_change() {
    let p = policy(&[Codec::Pcmu]);
    let mut first = session();
    let sent = create_offer(&p, &mut first);
    let mut resumed = SdpSession::resume(&sent, local().address);
    let again = create_offer(&p, &mut resumed);
    assert_eq!(again.origin, sent.origin, "an unchanged SDP keeps id and version (RFC 3264 8)");
    let mut held = p.clone();
    held.direction = MediaDirection::SendOnly;
    let changed = create_offer(&held, &mut resumed);
    assert_eq!(changed.origin.session_id, sent.origin.session_id);
    assert_eq!(changed.origin.session_version, sent.origin.session_version + 1);
    // An origin the node did not write (a non-numeric id) starts a session of its own.
    let mut foreign = sent.clone();
    foreign.origin.session_id = "abc".into();
    let fresh = create_offer(&p, &mut SdpSession::resume(&foreign, local().address));
    assert_ne!(fresh.origin.session_id, "abc");
}
