//! Fuzzes digest header parsing on both sides: a 401/407 challenge from a provider (answered
//! with credentials) and credentials from a caller (verified by the node's challenger).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rsip::{Header, Method, Request, Response, Uri};
use switchboard_node_fuzz::digest::{Challenger, answer_challenge};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let uri = Uri::try_from("sip:+15550001111@127.0.0.1").expect("fixed URI parses");
    for (code, header) in [
        (407, Header::ProxyAuthenticate(text.into())),
        (401, Header::WwwAuthenticate(text.into())),
        (401, Header::Other("WWW-Authenticate".into(), text.into())),
    ] {
        let challenge =
            Response { status_code: code.into(), version: rsip::Version::V2, headers: vec![header].into(), body: vec![] };
        let _ = answer_challenge(&challenge, &Method::Invite, &uri, "user", "password", 1);
    }
    let challenger = Challenger::new([7; 32], "switchboard".into(), Duration::from_secs(60));
    for header in [Header::ProxyAuthorization(text.into()), Header::Authorization(text.into())] {
        let request = Request {
            method: Method::Invite,
            uri: uri.clone(),
            version: rsip::Version::V2,
            headers: vec![header].into(),
            body: vec![],
        };
        let _ = challenger.verify(&request, "user", "password", 1_700_000_000);
    }
});
