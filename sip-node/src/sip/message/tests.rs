//! Tests of the message helpers and of the hangup reasons.

use super::*;

const INVITE: &str = "INVITE sip:+15551234567@10.0.0.1 SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
t: <sip:+15551234567@10.0.0.1>\r\n\
f: \"Alice\" <sip:+15557654321@10.0.0.2>;tag=1928301774\r\n\
i: a84b4c76e66710\r\n\
CSeq: 314159 INVITE\r\n\
m: <sip:alice@10.0.0.2>\r\n\
Subject: a\r\n folded\r\n\
c: application/sdp\r\n\
l: 4\r\n\r\nv=0\r\nEXTRA";

fn message(bytes: &[u8], stream: bool) -> SipMessage {
    match parse(bytes, stream).unwrap() {
        Incoming::Message(m) => m,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn compact_headers_folding_and_datagram_truncation() {
    let SipMessage::Request(request) = message(INVITE.as_bytes(), false) else { panic!() };
    assert_eq!(request.method, Method::Invite);
    assert_eq!(call_id(&request), "a84b4c76e66710");
    assert_eq!(from_tag(&request).as_deref(), Some("1928301774"));
    assert_eq!(to_tag(&request), None);
    assert_eq!(to_user(&request).as_deref(), Some("+15551234567"));
    assert_eq!(cseq(&request), Some((314159, Method::Invite)));
    assert_eq!(request.body, b"v=0\r");
    assert_eq!(header_value(&request.headers, "subject").as_deref(), Some("a folded"));
}

/// The endpoint routes by the To tag the parse hands on instead of parsing To again: it must be
/// the tag `to_tag` reads, with a tag, without one, and with the tag among other parameters.
#[test]
fn the_checked_to_tag_is_the_one_to_tag_reads() {
    let tagged = INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "t: <sip:+15551234567@10.0.0.1>;x=1;tag=a6c85cf");
    let bare = INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "To: sip:+15551234567@10.0.0.1;tag=b7");
    for (text, want) in [(INVITE.to_string(), None), (tagged, Some("a6c85cf")), (bare, Some("b7"))] {
        let (incoming, checked) = parse_checked(text.as_bytes(), false).unwrap();
        let Incoming::Message(message) = incoming else { panic!("unexpected {incoming:?}") };
        assert_eq!(checked.to_tag.as_deref(), want, "{text}");
        assert_eq!(checked.to_tag, to_tag(&message), "{text}");
        assert_eq!(checked.top_via.branch().map(|b| b.to_string()), Some("z9hG4bK776asdhds".to_string()));
    }
}

#[test]
fn short_body_and_missing_length_on_streams_are_errors() {
    let short = INVITE.replace("l: 4", "l: 400");
    assert!(matches!(parse(short.as_bytes(), false), Err(ParseError::ShortBody { declared: 400, .. })));
    let none = INVITE.replace("l: 4\r\n", "");
    assert!(parse(none.as_bytes(), false).is_ok());
    assert_eq!(parse(none.as_bytes(), true).unwrap_err(), ParseError::MissingHeader("Content-Length"));
}

#[test]
fn missing_mandatory_headers_are_named() {
    let no_call_id = INVITE.replace("i: a84b4c76e66710\r\n", "");
    assert_eq!(parse(no_call_id.as_bytes(), false).unwrap_err(), ParseError::MissingHeader("Call-ID"));
    let no_via = INVITE.replace("v: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776asdhds\r\n", "");
    assert_eq!(parse(no_via.as_bytes(), false).unwrap_err(), ParseError::MissingHeader("Via"));
}

#[test]
fn required_extensions_the_node_lacks_are_listed_once_in_order() {
    let bytes = b"INVITE sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK1\r\n\
        From: <sip:b@127.0.0.1>;tag=1\r\nTo: <sip:a@127.0.0.1>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
        Require: 100rel, timer\r\nrequire: ,TIMER,\r\nRequire: foo\r\nSupported: replaces\r\nContent-Length: 0\r\n\r\n";
    let Ok(Incoming::Message(rsip::SipMessage::Request(request))) = parse(bytes, false) else { panic!("parses") };
    assert_eq!(unsupported_requirements(&request.headers), ["timer", "foo"], "100rel is served (RFC 3262)");
    let plain = b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK2\r\n\
        From: <sip:b@127.0.0.1>;tag=1\r\nTo: <sip:a@127.0.0.1>\r\nCall-ID: d\r\nCSeq: 1 OPTIONS\r\n\
        Proxy-Require: foo\r\nSupported: 100rel\r\nContent-Length: 0\r\n\r\n";
    let Ok(Incoming::Message(rsip::SipMessage::Request(request))) = parse(plain, false) else { panic!("parses") };
    assert!(unsupported_requirements(&request.headers).is_empty(), "Proxy-Require is for proxies");
}

#[test]
fn unknown_methods_keep_their_headers_for_a_501() {
    let text = INVITE.replace("INVITE sip:", "FROBNICATE sip:").replace("314159 INVITE", "314159 FROBNICATE");
    match parse(text.as_bytes(), false).unwrap() {
        Incoming::UnknownMethod { method, request } => {
            assert_eq!(method, "FROBNICATE");
            assert_eq!(call_id(&request), "a84b4c76e66710");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_never_panics() {
    let inputs: [&[u8]; 8] = [
        b"",
        b"\r\n\r\n",
        b"\xff\xfe\x00\x01\r\n\r\n",
        b"INVITE\r\n\r\n",
        b"SIP/2.0 abc\r\n\r\n",
        b"INVITE sip:a SIP/2.0\r\nVia\r\n\r\n",
        b"INVITE sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n",
        b"SIP/2.0 200 OK\r\nl: 99999999999999999999\r\n\r\n",
    ];
    for input in inputs {
        assert!(parse(input, false).is_err(), "{input:?}");
    }
    let big = vec![b'a'; MAX_MESSAGE_SIZE + 1];
    assert_eq!(parse(&big, false).unwrap_err(), ParseError::TooLarge(MAX_MESSAGE_SIZE + 1));
}

#[test]
fn bad_requests_get_a_400_when_answerable() {
    let broken = INVITE.replace("CSeq: 314159 INVITE", "CSeq: nonsense INVITE");
    let error = parse(broken.as_bytes(), false).unwrap_err();
    let answer = String::from_utf8(bad_request(broken.as_bytes(), &error).unwrap()).unwrap();
    assert!(answer.starts_with("SIP/2.0 400 Bad Request\r\n"), "{answer}");
    assert!(answer.contains("i: a84b4c76e66710"));
    assert!(bad_request(b"\x01\x02garbage", &error).is_none());
}

#[test]
fn framing_by_content_length() {
    let one = INVITE.replace("EXTRA", "").replace("l: 4", "l: 5");
    let mut buf = b"\r\n\r\n".to_vec();
    buf.extend_from_slice(one.as_bytes());
    assert_eq!(frame(&buf).unwrap(), Frame::Keepalive(4));
    let buf = &buf[4..];
    assert_eq!(frame(&buf[..20]).unwrap(), Frame::Partial);
    assert_eq!(frame(&buf[..buf.len() - 1]).unwrap(), Frame::Partial);
    assert_eq!(frame(buf).unwrap(), Frame::Complete(buf.len()));
}

/// Issue 19 item 2: a Content-Length of `u64::MAX` overflowed `end + length` (a panic in a
/// debug build, a wrapped total that framed the next request from the middle of the stream
/// in a release build). It is now too large, like any length past the limit.
#[test]
fn huge_content_lengths_are_too_large_not_an_overflow() {
    let head = "OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: 18446744073709551615\r\n\r\n";
    let buf = format!("{head}abcOPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: 0\r\n\r\n");
    assert!(matches!(frame(buf.as_bytes()), Err(ParseError::TooLarge(_))));
    for length in ["65535", "9223372036854775807", "18446744073709551614"] {
        let text = head.replace("18446744073709551615", length);
        assert!(matches!(frame(text.as_bytes()), Err(ParseError::TooLarge(_))), "{length}");
    }
    // One past usize: not a number at all.
    let text = head.replace("18446744073709551615", "18446744073709551616");
    assert_eq!(frame(text.as_bytes()), Err(ParseError::BadContentLength));
    // The datagram parser refuses it too (declared longer than what arrived).
    assert!(parse(buf.as_bytes(), false).is_err());
}

#[test]
fn content_lengths_that_disagree_or_are_not_digits_are_refused() {
    let two = "OPTIONS sip:a SIP/2.0\r\nContent-Length: 0\r\nl: 30\r\n\r\n";
    assert_eq!(frame(two.as_bytes()), Err(ParseError::BadContentLength));
    let same = "OPTIONS sip:a SIP/2.0\r\nContent-Length: 3\r\nl: 3\r\n\r\nabc";
    assert_eq!(frame(same.as_bytes()), Ok(Frame::Complete(same.len())));
    for bad in ["+3", "-1", "0x3", "3 3", ""] {
        let text = format!("OPTIONS sip:a SIP/2.0\r\nContent-Length: {bad}\r\n\r\nabc");
        assert_eq!(frame(text.as_bytes()), Err(ParseError::BadContentLength), "{bad:?}");
    }
    let dup = INVITE.replace("l: 4\r\n", "l: 4\r\nContent-Length: 5\r\n");
    assert_eq!(parse(dup.as_bytes(), false).unwrap_err(), ParseError::BadContentLength);
}

#[test]
fn a_trickled_header_is_framed_once_it_is_complete_and_limits_hold() {
    let one = INVITE.replace("EXTRA", "").replace("l: 4", "l: 5");
    let mut framer = StreamFramer::default();
    for end in 1..one.len() {
        assert_eq!(framer.next(&one.as_bytes()[..end]), Ok(Frame::Partial), "{end}");
    }
    assert_eq!(framer.next(one.as_bytes()), Ok(Frame::Complete(one.len())));
    // Two messages, the second's body trickled after its header: framed the same way.
    let two = format!("{one}{one}");
    let mut framer = StreamFramer::default();
    assert_eq!(framer.next(two.as_bytes()), Ok(Frame::Complete(one.len())));
    let second = &two.as_bytes()[one.len()..];
    for end in 1..second.len() {
        assert_eq!(framer.next(&second[..end]), Ok(Frame::Partial), "{end}");
    }
    assert_eq!(framer.next(second), Ok(Frame::Complete(one.len())));
    // A header section that never ends is refused past the limit, however it arrives.
    let mut framer = StreamFramer::default();
    let mut endless = b"OPTIONS sip:a SIP/2.0\r\nX-Pad: ".to_vec();
    let mut result = Ok(Frame::Partial);
    while result == Ok(Frame::Partial) {
        endless.extend_from_slice(&[b'a'; 1000]);
        result = framer.next(&endless);
    }
    assert!(matches!(result, Err(ParseError::TooLarge(n)) if n > MAX_MESSAGE_SIZE));
    // A head that fits with a body that would not.
    let big = "OPTIONS sip:a SIP/2.0\r\nContent-Length: 65500\r\n\r\n";
    assert!(matches!(frame(big.as_bytes()), Err(ParseError::TooLarge(_))));
}

#[test]
fn out_of_dialog_requests_are_told_without_parsing() {
    let request = INVITE.replace("EXTRA", "");
    assert!(plainly_out_of_dialog(request.as_bytes()));
    assert!(plainly_out_of_dialog(b"\x00\x01garbage"));
    assert!(plainly_out_of_dialog(b"OPTIONS sip:a SIP/2.0\r\nFrom: <sip:b>;tag=1\r\nTo: <sip:a>\r\n\r\n"));
    for in_dialog in [
        INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "t: <sip:+15551234567@10.0.0.1>;tag=abc"),
        INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "To: <sip:x@y>;TAG=abc"),
        INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "to : <sip:x@y>\r\n ;tag=folded"),
        "SIP/2.0 200 OK\r\n\r\n".to_string(),
    ] {
        assert!(!plainly_out_of_dialog(in_dialog.as_bytes()), "{in_dialog}");
        // Whatever the quick check lets through is decided on the parsed message.
    }
    // It never says "out of dialog" for what parses with a To tag.
    let tagged = INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "t: <sip:+15551234567@10.0.0.1>;tag=abc");
    let Incoming::Message(SipMessage::Request(request)) = parse(tagged.as_bytes(), false).unwrap() else { panic!() };
    assert!(to_tag(&request).is_some());
}

#[test]
fn encode_round_trips_binary_bodies() {
    let SipMessage::Request(mut request) = message(INVITE.as_bytes(), false) else { panic!() };
    set_body(&mut request.headers, &mut request.body, vec![0, 159, 255, 10], Some("application/octet-stream"));
    let bytes = encode(&SipMessage::Request(request));
    let SipMessage::Request(back) = message(&bytes, true) else { panic!() };
    assert_eq!(back.body, vec![0, 159, 255, 10]);
}

#[test]
fn ipv6_references_survive_parse_and_encode() {
    let text = "OPTIONS sip:+15550001111@[2001:db8::1]:5070 SIP/2.0\r\nVia: SIP/2.0/UDP [::1]:9;branch=z9hG4bKx\r\n\
From: <sip:a@[::ffff:192.0.2.1]>;tag=1\r\nTo: <sip:b@[::1]>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    let Incoming::Message(SipMessage::Request(request)) = parse(text.as_bytes(), false).unwrap() else { panic!() };
    assert_eq!(host_ip(&request.uri.host().to_string()), Some("2001:db8::1".parse().unwrap()));
    assert_eq!(request.uri.port().map(|p| *p.value()), Some(5070));
    let wire = String::from_utf8(encode(&SipMessage::Request(request))).unwrap();
    assert!(wire.starts_with("OPTIONS sip:+15550001111@[2001:db8::1]:5070 SIP/2.0\r\n"), "{wire}");
    assert!(wire.contains("Via: SIP/2.0/UDP [::1]:9;branch=z9hG4bKx"), "{wire}");
    assert!(wire.contains("<sip:a@[::ffff:192.0.2.1]>"), "{wire}");
    assert_eq!(host_ip("192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
    assert_eq!(host_ip("[::1]"), Some("::1".parse().unwrap()));
    assert_eq!(host_ip("example.com"), None);
}

#[test]
fn numbers_normalize_to_e164() {
    assert_eq!(normalize_number("+15551234567").as_deref(), Some("+15551234567"));
    assert_eq!(normalize_number("5551234567").as_deref(), Some("+15551234567"));
    assert_eq!(normalize_number("15551234567;npdi").as_deref(), Some("+15551234567"));
    assert_eq!(normalize_number("alice"), None);
}

#[test]
fn reason_header_is_q850_with_a_safe_quoted_text() {
    let header = HangupReason::timer("media timeout: \"no\" RTP\r\nfor 30 s").header();
    assert_eq!(header.to_string(), "Reason: Q.850;cause=102;text=\"media timeout: no RTPfor 30 s\"");
    assert_eq!(HangupReason::normal("x").cause, 16);
    assert_eq!(HangupReason::incompatible("x").cause, 88);
}

#[test]
fn reason_headers_are_found_whatever_their_case() {
    let text = "BYE sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\n\
                From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: r\r\nCSeq: 2 BYE\r\n\
                REASON: Q.850;cause=16\r\nContent-Length: 0\r\n\r\n";
    let Ok(Incoming::Message(SipMessage::Request(request))) = parse(text.as_bytes(), false) else { panic!("parse") };
    let found = reason_headers(&request);
    assert_eq!(found.len(), 1);
    assert!(found[0].to_string().ends_with("Q.850;cause=16"), "{}", found[0]);
}

/// `tokenize` (requests straight to the request parser) gives what rsip's `SipMessage` parser
/// gives, for requests, responses and what is neither.
#[test]
fn tokenize_agrees_with_rsip() {
    let inputs: &[&str] = &[
        "INVITE sip:n@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n",
        "BYE sip:n@h SIP/2.0\r\nCall-ID: x\r\n\r\n",
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n",
        "SIP/2.0 180 Ringing\r\n\r\n",
        "SIP/2.0 nonsense\r\n\r\n",
        "SIP/x INVITE\r\n\r\n",
        "sip/2.0 200 OK\r\n\r\n",
        "garbage\r\n\r\n",
        "\r\n\r\n",
    ];
    for input in inputs {
        let ours = tokenize(input.as_bytes());
        let rsip = SipMessage::try_from(input.as_bytes());
        assert_eq!(ours.is_ok(), rsip.is_ok(), "{input:?}");
        if let (Ok(ours), Ok(rsip)) = (ours, rsip) {
            assert_eq!(ours, rsip, "{input:?}");
        }
    }
}
