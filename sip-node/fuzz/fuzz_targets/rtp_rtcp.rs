//! Fuzzes what arrives on the media ports: RTP (header, CSRCs, extension, padding, RFC 4733
//! events) and compound RTCP, which the relay validates and then rewrites in place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_node_fuzz::rtcp::RtcpTranslation;
use switchboard_node_fuzz::rtp::{RtpPacket, TelephoneEvent, looks_like_rtcp, parse_rtcp};

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = RtpPacket::parse(data) {
        assert!(packet.header_len <= data.len());
        assert!(packet.payload.len() <= data.len());
        let _ = packet.csrcs().count();
        let _ = TelephoneEvent::parse(packet.payload).map(|event| event.digit());
    }
    let _ = looks_like_rtcp(data);
    if parse_rtcp(data).is_ok() {
        let mut rewritten = data.to_vec();
        for translation in [
            RtcpTranslation { sender_ssrc: 1, sender_timestamps: None, reported: None },
            RtcpTranslation { sender_ssrc: 2, sender_timestamps: Some((3, 4)), reported: Some((5, 6, 7)) },
        ] {
            translation.apply(&mut rewritten);
            assert_eq!(rewritten.len(), data.len());
        }
    }
});
