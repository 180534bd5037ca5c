//! Fuzzes SDP as the node meets it: a caller's offer (parsed, answered under a trunk's codec
//! policy and each SRTP policy, re-serialized) and a callee's answer to the node's own offer.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use switchboard_model::Codec;
use switchboard_node_fuzz::sdes::SrtpPolicy;
use switchboard_node_fuzz::sdp::{
    LocalEndpoint, MediaPolicy, SdpSession, SessionDescription, answer_offer, create_offer, process_answer,
};

fuzz_target!(|data: &[u8]| {
    let Ok(sdp) = SessionDescription::parse_bytes(data) else { return };
    // What the node writes from what it read must read back.
    let text = sdp.to_sdp_string();
    SessionDescription::parse(&text).expect("a serialized SDP parses again");
    let local = LocalEndpoint { address: IpAddr::V4(Ipv4Addr::LOCALHOST), rtp_port: 30_000 };
    // Under each SRTP policy of a trunk's `media.srtp` (the `a=crypto` paths).
    for srtp in [SrtpPolicy::Off, SrtpPolicy::Optional, SrtpPolicy::Required] {
        let mut policy = MediaPolicy::new(vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent], local);
        policy.srtp = srtp;
        let mut session = SdpSession::new(local.address);
        if let Ok((answer, _)) = answer_offer(&sdp, &policy, &mut session) {
            SessionDescription::parse(&answer.to_sdp_string()).expect("the node's answer parses");
        }
        let offer = create_offer(&policy, &mut session);
        let _ = process_answer(&offer, &sdp);
    }
});
