//! Tests of digest authentication: both sides, parsers, nonces and replays.

use rand::{Rng, SeedableRng, rngs::StdRng};

use std::time::Duration;

use rsip::headers::UntypedHeader as _;
use rsip::{Header, Method, Request, Response, Uri};

use super::client::*;
use super::server::*;
use super::*;

const NOW: u64 = 1_700_000_000;

fn challenge_response(code: u16, headers: Vec<Header>) -> Response {
    Response { status_code: code.into(), version: rsip::Version::V2, headers: headers.into(), body: Vec::new() }
}

fn www(value: &str) -> Header {
    Header::WwwAuthenticate(value.into())
}

fn uri(text: &str) -> Uri {
    Uri::try_from(text).unwrap()
}

fn value(header: &Header) -> String {
    match header {
        Header::Authorization(v) => v.value().to_string(),
        Header::ProxyAuthorization(v) => v.value().to_string(),
        Header::WwwAuthenticate(v) => v.value().to_string(),
        Header::ProxyAuthenticate(v) => v.value().to_string(),
        other => panic!("unexpected header {other:?}"),
    }
}

fn invite_with(uri_text: &str, auth: Option<Header>) -> Request {
    let mut headers: Vec<Header> = vec![
        Header::Via("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1".into()),
        Header::From("<sip:alice@a.example.com>;tag=1".into()),
        Header::To("<sip:bob@b.example.com>".into()),
        Header::CallId("d1".into()),
        Header::CSeq("2 INVITE".into()),
    ];
    headers.extend(auth);
    Request {
        method: Method::Invite,
        uri: uri(uri_text),
        version: rsip::Version::V2,
        headers: headers.into(),
        body: vec![],
    }
}

fn challenger() -> Challenger {
    Challenger::new([7; 32], "switchboard".into(), Duration::from_secs(300))
}

#[test]
fn rfc2617_example_vector() {
    let response = compute_response(&DigestInput {
        algorithm: Algorithm::Md5,
        username: "Mufasa",
        realm: "testrealm@host.com",
        password: "Circle Of Life",
        method: "GET",
        uri: "/dir/index.html",
        nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        qop_auth: Some(("00000001", "0a4f113b")),
        cnonce: "0a4f113b",
    });
    assert_eq!(response, "6629fae49393a05397450978507c4ef1");
}

#[test]
fn rfc7616_example_vectors_md5_and_sha256() {
    let input = |algorithm| DigestInput {
        algorithm,
        username: "Mufasa",
        realm: "http-auth@example.org",
        password: "Circle of Life",
        method: "GET",
        uri: "/dir/index.html",
        nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        qop_auth: Some(("00000001", "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")),
        cnonce: "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    };
    assert_eq!(compute_response(&input(Algorithm::Md5)), "8ca523f5e9506fed4657c9700eebdbec");
    assert_eq!(
        compute_response(&input(Algorithm::Sha256)),
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    );
}

#[test]
fn answer_with_qop_auth_quotes_and_echoes_opaque() {
    let resp = challenge_response(
        401,
        vec![www(
            r#"Digest realm="sip, \"carrier\"", qop="auth,auth-int", NONCE="abc,def", opaque="op=1", algorithm=md5"#,
        )],
    );
    let header =
        answer_with_cnonce(&resp, &Method::Register, &uri("sip:registrar.example.com"), "alice", "pw", 1, "c0ffee")
            .unwrap();
    assert!(matches!(header, Header::Authorization(_)));
    let text = value(&header);
    let expected = compute_response(&DigestInput {
        algorithm: Algorithm::Md5,
        username: "alice",
        realm: "sip, \"carrier\"",
        password: "pw",
        method: "REGISTER",
        uri: "sip:registrar.example.com",
        nonce: "abc,def",
        qop_auth: Some(("00000001", "c0ffee")),
        cnonce: "c0ffee",
    });
    assert_eq!(
        text,
        format!(
            r#"Digest username="alice", realm="sip, \"carrier\"", nonce="abc,def", uri="sip:registrar.example.com", response="{expected}", algorithm=MD5, cnonce="c0ffee", qop=auth, nc=00000001, opaque="op=1""#
        )
    );
    // Our own parser reads back what we wrote.
    let params = parse_digest(&text).unwrap();
    assert_eq!(params.get("realm"), Some("sip, \"carrier\""));
    assert_eq!(params.get("nc"), Some("00000001"));
    assert!(!text.contains("pw"));
}

#[test]
fn answer_without_qop_is_rfc2069_style() {
    let resp = challenge_response(401, vec![www(r#"Digest realm="r", nonce="n""#)]);
    let header = answer_challenge(&resp, &Method::Invite, &uri("sip:bob@b.example.com"), "u", "p", 1).unwrap();
    let text = value(&header);
    let ha1 = hex::encode(Md5::digest(b"u:r:p"));
    let ha2 = hex::encode(Md5::digest(b"INVITE:sip:bob@b.example.com"));
    let expected = hex::encode(Md5::digest(format!("{ha1}:n:{ha2}").as_bytes()));
    assert!(text.contains(&format!("response=\"{expected}\"")), "{text}");
    assert!(!text.contains("qop") && !text.contains("cnonce") && !text.contains("nc="), "{text}");
}

#[test]
fn proxy_challenge_yields_proxy_authorization_and_nc_is_hex() {
    let resp =
        challenge_response(407, vec![Header::ProxyAuthenticate(r#"Digest realm="r", nonce="n", qop="auth""#.into())]);
    let header = answer_challenge(&resp, &Method::Invite, &uri("sip:1555@gw.example.com"), "u", "p", 26).unwrap();
    assert!(matches!(header, Header::ProxyAuthorization(_)));
    let text = value(&header);
    assert!(text.contains("nc=0000001a"), "{text}");
    let cnonce = parse_digest(&text).unwrap().get("cnonce").unwrap().to_string();
    assert_eq!(cnonce.len(), 16);
    // A 407 with only WWW-Authenticate has no usable challenge.
    let wrong = challenge_response(407, vec![www(r#"Digest realm="r", nonce="n""#)]);
    assert_eq!(answer_challenge(&wrong, &Method::Invite, &uri("sip:a@b"), "u", "p", 1), Err(DigestError::NoChallenge));
}

#[test]
fn sha256_and_sess_algorithms() {
    let resp = challenge_response(
        401,
        vec![
            www(r#"Digest realm="r", nonce="n", algorithm=SHA-256, qop="auth""#),
            www(r#"Digest realm="r", nonce="n", algorithm=MD5, qop="auth""#),
        ],
    );
    let text = value(&answer_with_cnonce(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1, "cc").unwrap());
    assert!(text.contains("algorithm=SHA-256"), "topmost supported challenge wins: {text}");
    let response = parse_digest(&text).unwrap().get("response").unwrap().to_string();
    assert_eq!(response.len(), 64);
    let resp = challenge_response(401, vec![www(r#"Digest realm="r", nonce="n", algorithm=MD5-sess"#)]);
    let text = value(&answer_with_cnonce(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1, "cc").unwrap());
    let ha1 = hex::encode(Md5::digest(format!("{}:n:cc", hex::encode(Md5::digest(b"u:r:p"))).as_bytes()));
    let ha2 = hex::encode(Md5::digest(b"INVITE:sip:a@b"));
    let expected = hex::encode(Md5::digest(format!("{ha1}:n:{ha2}").as_bytes()));
    assert!(text.contains(&expected) && text.contains("cnonce=\"cc\"") && text.contains("algorithm=MD5-sess"));
    // An unsupported algorithm first, a supported one after: the supported one is used.
    let resp = challenge_response(
        401,
        vec![www(r#"Digest realm="r", nonce="n", algorithm=AKAv1-MD5"#), www(r#"Digest realm="r", nonce="n""#)],
    );
    assert!(answer_challenge(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1).is_ok());
}

#[test]
fn challenge_errors() {
    let call = |resp: &Response| answer_challenge(resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1);
    assert_eq!(call(&challenge_response(200, vec![])), Err(DigestError::NotAChallenge(200)));
    assert_eq!(call(&challenge_response(401, vec![])), Err(DigestError::NoChallenge));
    assert_eq!(call(&challenge_response(401, vec![www("Basic realm=\"x\"")])), Err(DigestError::NotDigest));
    assert_eq!(
        call(&challenge_response(401, vec![www("Digest nonce=\"n\"")])),
        Err(DigestError::MissingParam("realm"))
    );
    assert_eq!(
        call(&challenge_response(401, vec![www("Digest realm=\"r\"")])),
        Err(DigestError::MissingParam("nonce"))
    );
    assert_eq!(
        call(&challenge_response(401, vec![www("Digest realm=r, nonce=n, algorithm=AKAv1-MD5")])),
        Err(DigestError::UnsupportedAlgorithm("AKAv1-MD5".into()))
    );
    assert_eq!(
        call(&challenge_response(401, vec![www("Digest realm=r, nonce=n, qop=\"auth-int\"")])),
        Err(DigestError::UnsupportedQop("auth-int".into()))
    );
    assert!(matches!(
        call(&challenge_response(401, vec![www("Digest realm=\"r, nonce=n")])),
        Err(DigestError::Malformed(_))
    ));
    // Basic first, a bad Digest second: the Digest error is reported.
    assert_eq!(
        call(&challenge_response(401, vec![www("Basic realm=x"), www("Digest realm=r")])),
        Err(DigestError::MissingParam("nonce"))
    );
    let ok = challenge_response(401, vec![www("Digest realm=r, nonce=n")]);
    assert_eq!(
        answer_challenge(&ok, &Method::Invite, &uri("sip:a@b"), "bad\r\nname", "p", 1),
        Err(DigestError::InvalidCredentials)
    );
}

#[test]
fn parser_tolerates_odd_but_legal_forms() {
    let p = parse_digest("digest   REALM = \"r\" ,nonce=n,,  qop=\"auth\" , stale=FALSE, x=\"\"").unwrap();
    assert_eq!(p.get("realm"), Some("r"));
    assert_eq!(p.get("nonce"), Some("n"));
    assert_eq!(p.get("qop"), Some("auth"));
    assert_eq!(p.get("stale"), Some("FALSE"));
    assert_eq!(p.get("x"), Some(""));
    // A second challenge in the same value stops the first one's params.
    let p = parse_digest("Digest realm=a, nonce=b, Digest realm=c").unwrap();
    assert_eq!(p.get("realm"), Some("a"));
    assert_eq!(parse_digest("Digest").unwrap().0.len(), 0);
    assert_eq!(parse_digest("Digest realm=a, realm=b").unwrap().get("realm"), Some("a"));
}

#[test]
fn garbage_never_panics() {
    let samples = [
        "",
        " ",
        "Digest",
        "Digest =",
        "Digest ===",
        "Digest a=\"",
        "Digest a=\"\\",
        "Digest a=\"\\\"",
        "Digest ,,,,",
        "Digest a=b=c",
        "Digest \u{0}=\u{1}",
        "Digest ünï=\"cödé\", realm=\"ä\", nonce=\"ö\"",
        "Digest realm=\"r\nx\", nonce=n",
        "Digest realm=\"r\", nonce=\"n\", algorithm=\"\"",
        "Digest realm=\"r\", nonce=\"n\", qop=",
    ];
    for sample in samples {
        let resp = challenge_response(401, vec![www(sample)]);
        let _ = answer_challenge(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1);
        let request = invite_with("sip:a@b", Some(Header::Authorization(sample.into())));
        let _ = challenger().verify(&request, "u", "p", NOW);
    }
    let mut rng = StdRng::seed_from_u64(2617);
    let alphabet: Vec<char> = "Digest realm nonce=\"\\,; \t=qop auth MD5-sess é\u{0}".chars().collect();
    for _ in 0..5000 {
        let len = rng.random_range(0..60);
        let sample: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
        let _ = parse_digest(&sample);
        let resp = challenge_response(407, vec![Header::ProxyAuthenticate(sample.clone().into())]);
        let _ = answer_challenge(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1);
        let request = invite_with("sip:a@b", Some(Header::ProxyAuthorization(sample.into())));
        let _ = challenger().verify(&request, "u", "p", NOW);
    }
}

#[test]
fn challenger_headers() {
    let c = challenger();
    let header = c.challenge(NOW, true);
    assert!(matches!(header, Header::ProxyAuthenticate(_)));
    let text = value(&header);
    let params = parse_digest(&text).unwrap();
    assert_eq!(params.get("realm"), Some("switchboard"));
    assert_eq!(params.get("qop"), Some("auth"));
    assert_eq!(params.get("algorithm"), Some("MD5"));
    assert_eq!(params.get("stale"), None);
    let nonce = params.get("nonce").unwrap();
    assert_eq!(nonce.len(), NONCE_LEN);
    assert_ne!(params.get("nonce"), parse_digest(&value(&c.challenge(NOW, true))).unwrap().get("nonce"));
    assert!(nonce.starts_with(&format!("{NOW:016x}")));
    assert!(c.nonce_is_fresh(nonce, NOW));
    assert!(matches!(c.challenge(NOW, false), Header::WwwAuthenticate(_)));
    assert!(value(&c.challenge_stale(NOW, false)).ends_with(", stale=true"));
    assert!(!format!("{c:?}").contains("7, 7"), "secret is redacted");
}

/// A client answer to the challenger's own challenge, for `method`/`uri`.
fn answered(c: &Challenger, issued: u64, uri_text: &str, user: &str, password: &str) -> Request {
    let resp = challenge_response(407, vec![c.challenge(issued, true)]);
    let header = answer_challenge(&resp, &Method::Invite, &uri(uri_text), user, password, 1).unwrap();
    invite_with(uri_text, Some(header))
}

#[test]
fn client_answer_is_verified() {
    let c = challenger();
    let request = answered(&c, NOW, "sip:+15551234567@switchboard.example.com;user=phone", "trunk1", "s3cret");
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 10), Verification::Ok);
    // Also through WWW-Authenticate / Authorization.
    let resp = challenge_response(401, vec![c.challenge(NOW, false)]);
    let header = answer_challenge(&resp, &Method::Invite, &uri("sip:b@x"), "trunk1", "s3cret", 1).unwrap();
    assert_eq!(c.verify(&invite_with("sip:b@x", Some(header)), "trunk1", "s3cret", NOW), Verification::Ok);
}

#[test]
fn wrong_password_user_or_uri_is_invalid() {
    let c = challenger();
    let request = answered(&c, NOW, "sip:b@x", "trunk1", "wrong");
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW), Verification::Invalid("wrong response"));
    let request = answered(&c, NOW, "sip:b@x", "trunk1", "s3cret");
    assert_eq!(c.verify(&request, "trunk2", "s3cret", NOW), Verification::Invalid("unknown user"));
    let mut moved = request.clone();
    moved.uri = uri("sip:c@x");
    assert_eq!(c.verify(&moved, "trunk1", "s3cret", NOW), Verification::Invalid("uri does not match the Request-URI"));
    // A tampered response of the right length is still wrong.
    let text = value(request.headers.iter().last().unwrap());
    let at = text.find("response=\"").unwrap() + "response=\"".len();
    let flipped = if &text[at..at + 1] == "0" { "1" } else { "0" };
    let tampered = format!("{}{flipped}{}", &text[..at], &text[at + 1..]);
    let request = invite_with("sip:b@x", Some(Header::ProxyAuthorization(tampered.into())));
    assert!(matches!(c.verify(&request, "trunk1", "s3cret", NOW), Verification::Invalid(_)));
}

#[test]
fn expired_or_foreign_nonce_is_stale_when_the_password_is_right() {
    let c = challenger();
    let request = answered(&c, NOW, "sip:b@x", "trunk1", "s3cret");
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 300), Verification::Ok);
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 301), Verification::Stale);
    // Issued "in the future" beyond the skew allowance.
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW - 60), Verification::Stale);
    // Another secret (restart without a shared secret): stale, not forbidden.
    let other = Challenger::new([9; 32], "switchboard".into(), Duration::from_secs(300));
    assert_eq!(other.verify(&request, "trunk1", "s3cret", NOW), Verification::Stale);
    // But an expired nonce with a wrong password is refused.
    let request = answered(&c, NOW, "sip:b@x", "trunk1", "bad");
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 1000), Verification::Invalid("wrong response"));
}

#[test]
fn verify_without_qop_and_with_uppercase_hex() {
    let c = challenger();
    let nonce = c.nonce(NOW);
    let response = compute_response(&DigestInput {
        algorithm: Algorithm::Md5,
        username: "u",
        realm: "switchboard",
        password: "p",
        method: "INVITE",
        uri: "sip:b@x",
        nonce: &nonce,
        qop_auth: None,
        cnonce: "",
    });
    let header = format!(
        "Digest username=\"u\", realm=\"switchboard\", nonce=\"{nonce}\", uri=\"sip:b@x\", response=\"{}\"",
        response.to_uppercase()
    );
    let request = invite_with("sip:b@x", Some(Header::Authorization(header.into())));
    assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Ok);
}

#[test]
fn missing_and_malformed_credentials() {
    let c = challenger();
    assert_eq!(c.verify(&invite_with("sip:b@x", None), "u", "p", NOW), Verification::Missing);
    let other_realm = Header::ProxyAuthorization(
        "Digest username=\"u\", realm=\"carrier\", nonce=\"n\", uri=\"sip:b@x\", response=\"00\"".into(),
    );
    assert_eq!(c.verify(&invite_with("sip:b@x", Some(other_realm)), "u", "p", NOW), Verification::Missing);
    let basic = Header::Authorization("Basic dTpw".into());
    assert_eq!(c.verify(&invite_with("sip:b@x", Some(basic)), "u", "p", NOW), Verification::Missing);
    let broken = Header::Authorization("Digest username=\"u".into());
    assert_eq!(
        c.verify(&invite_with("sip:b@x", Some(broken)), "u", "p", NOW),
        Verification::Invalid("malformed credentials")
    );
    let incomplete = Header::Authorization("Digest username=\"u\", realm=\"switchboard\"".into());
    assert_eq!(
        c.verify(&invite_with("sip:b@x", Some(incomplete)), "u", "p", NOW),
        Verification::Invalid("incomplete credentials")
    );
    let int = Header::Authorization(
        format!(
            "Digest username=\"u\", realm=\"switchboard\", nonce=\"{}\", uri=\"sip:b@x\", response=\"00\", qop=auth-int, nc=00000001, cnonce=\"c\"",
            c.nonce(NOW)
        )
        .into(),
    );
    assert_eq!(c.verify(&invite_with("sip:b@x", Some(int)), "u", "p", NOW), Verification::Invalid("unsupported qop"));
}

/// Issue 19 item 5: a captured answer sent again is challenged, not admitted.
#[test]
fn the_same_answer_twice_is_a_replay() {
    let c = challenger();
    let request = answered(&c, NOW, "sip:b@x", "trunk1", "s3cret");
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 1), Verification::Ok);
    assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 2), Verification::Replayed);
    // Clones (the node's tasks) share the counts.
    assert_eq!(c.clone().verify(&request, "trunk1", "s3cret", NOW + 2), Verification::Replayed);
    // Without qop a nonce is good once.
    let nonce = c.nonce(NOW);
    let response = compute_response(&DigestInput {
        algorithm: Algorithm::Md5,
        username: "u",
        realm: "switchboard",
        password: "p",
        method: "INVITE",
        uri: "sip:b@x",
        nonce: &nonce,
        qop_auth: None,
        cnonce: "",
    });
    let header = format!(
        "Digest username=\"u\", realm=\"switchboard\", nonce=\"{nonce}\", uri=\"sip:b@x\", response=\"{response}\""
    );
    let request = invite_with("sip:b@x", Some(Header::Authorization(header.into())));
    assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Ok);
    assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Replayed);
}

#[test]
fn increasing_nonce_counts_are_accepted_and_going_back_is_a_replay() {
    let c = challenger();
    let resp = challenge_response(407, vec![c.challenge(NOW, true)]);
    let with_nc = |nc| {
        let header = answer_challenge(&resp, &Method::Invite, &uri("sip:b@x"), "u", "p", nc).unwrap();
        invite_with("sip:b@x", Some(header))
    };
    assert_eq!(c.verify(&with_nc(1), "u", "p", NOW), Verification::Ok);
    assert_eq!(c.verify(&with_nc(2), "u", "p", NOW), Verification::Ok);
    assert_eq!(c.verify(&with_nc(5), "u", "p", NOW), Verification::Ok);
    assert_eq!(c.verify(&with_nc(3), "u", "p", NOW), Verification::Replayed);
    assert_eq!(c.verify(&with_nc(5), "u", "p", NOW), Verification::Replayed);
    assert_eq!(c.verify(&with_nc(6), "u", "p", NOW), Verification::Ok);
    // Another nonce has its own count.
    let request = answered(&c, NOW, "sip:b@x", "u", "p");
    assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Ok);
    // A count of zero or past 8 hex digits is not a count.
    let zero = value(with_nc(7).headers.iter().last().unwrap()).replace("nc=00000007", "nc=00000000");
    let request = invite_with("sip:b@x", Some(Header::ProxyAuthorization(zero.into())));
    assert!(matches!(c.verify(&request, "u", "p", NOW), Verification::Invalid(_)));
}

#[test]
fn nodes_sharing_a_secret_accept_each_others_nonces() {
    let ttl = DEFAULT_NONCE_TTL;
    let a = Challenger::new(nonce_key(b"shared secret"), "switchboard".into(), ttl);
    let b = Challenger::new(nonce_key(b"shared secret"), "switchboard".into(), ttl);
    let other = Challenger::new(nonce_key(b"another secret"), "switchboard".into(), ttl);
    let request = answered(&a, NOW, "sip:b@x", "u", "p");
    assert_eq!(b.verify(&request, "u", "p", NOW + 1), Verification::Ok);
    assert_eq!(other.verify(&request, "u", "p", NOW + 1), Verification::Stale);
    assert_eq!(a.verify(&request, "u", "p", NOW + ttl.as_secs() + 1), Verification::Stale);
}

#[test]
fn a_full_cache_forgets_counts_only_by_making_their_nonces_stale() {
    let mut counts = NonceCounts::new();
    let nonce = |issued: u64, i: usize| format!("{issued:016x}{i:016x}");
    assert_eq!(counts.accept(&nonce(NOW, 0), NOW, 1, NOW, 60), Verification::Ok);
    for i in 1..NONCE_CACHE {
        assert_eq!(counts.accept(&nonce(NOW + 1, i), NOW + 1, 1, NOW + 1, 60), Verification::Ok);
    }
    assert_eq!(counts.seen.len(), NONCE_CACHE);
    // One more pushes out the least recently used (the first), which was still fresh.
    assert_eq!(counts.accept(&nonce(NOW + 2, 0), NOW + 2, 1, NOW + 2, 60), Verification::Ok);
    assert_eq!(counts.seen.len(), NONCE_CACHE);
    assert_eq!(counts.accept(&nonce(NOW, 0), NOW, 1, NOW + 2, 60), Verification::Stale);
    // Newer nonces are unaffected.
    assert_eq!(counts.accept(&nonce(NOW + 2, 0), NOW + 2, 1, NOW + 2, 60), Verification::Replayed);
    assert_eq!(counts.accept(&nonce(NOW + 3, 9), NOW + 3, 1, NOW + 3, 60), Verification::Ok);
}

#[test]
fn constant_time_eq_basics() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
}
