//! SDES negotiation and SRTP/SRTCP round trips between a caller's leg and the node's leg, both
//! through webrtc-srtp, plus what the node does with a wrong key, a replay and bad attributes.

use super::sdes::{CryptoError, LegMedia, Refused, negotiate};
use super::*;

fn rtp(seq: u16, payload: u8) -> Vec<u8> {
    let mut packet = vec![0x80, 0x00];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    packet.extend(std::iter::repeat_n(payload, 160));
    packet
}

/// An RTCP sender report (28 bytes, length field 6).
fn rtcp_sr() -> Vec<u8> {
    let mut packet = vec![0x80, 200, 0x00, 0x06];
    packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    packet.extend_from_slice(&[0u8; 20]);
    packet
}

/// The caller's offer and the node's answer, and both ends' legs.
fn call(suite: Suite) -> (SrtpLeg, SrtpLeg) {
    let offer = CryptoAttr::generate(1, suite);
    let LegMedia::Srtp { remote, local } = negotiate(SrtpPolicy::Required, "RTP/SAVP", &[&offer.value()]).unwrap()
    else {
        panic!("SRTP offered and required")
    };
    assert_eq!(remote, offer, "the node reads the caller's key back exactly");
    assert_eq!((local.tag(), local.suite()), (1, suite), "the answer keeps the tag and suite");
    assert_ne!(local, remote, "the node's key is its own");
    let caller = SrtpLeg::new(&offer, &local).unwrap();
    let node = SrtpLeg::new(&local, &remote).unwrap();
    (caller, node)
}

#[test]
fn audio_and_rtcp_cross_in_both_directions_for_both_suites() {
    for (suite, tag_len) in [(Suite::AesCm128HmacSha1_80, 10), (Suite::AesCm128HmacSha1_32, 4)] {
        let (mut caller, mut node) = call(suite);
        for seq in 1..=50u16 {
            let plain = rtp(seq, seq as u8);
            let sent = caller.protect_rtp(&plain).unwrap();
            assert_eq!(sent.len(), plain.len() + tag_len, "{suite:?}");
            assert_ne!(&sent[12..172], &plain[12..], "the payload is encrypted");
            assert_eq!(node.unprotect_rtp(&sent).as_deref(), Some(plain.as_slice()), "{suite:?} seq {seq}");
            let back = node.protect_rtp(&plain).unwrap();
            assert_eq!(caller.unprotect_rtp(&back).as_deref(), Some(plain.as_slice()));
        }
        let report = rtcp_sr();
        let srtcp = node.protect_rtcp(&report).unwrap();
        assert!(srtcp.len() > report.len(), "SRTCP carries its index and tag");
        assert_eq!(caller.unprotect_rtcp(&srtcp).as_deref(), Some(report.as_slice()));
        assert_eq!((caller.rejected, node.rejected), (0, 0));
    }
}

#[test]
fn a_wrong_key_gives_no_audio_and_is_counted_and_so_is_a_replay() {
    let (mut caller, _) = call(Suite::AesCm128HmacSha1_80);
    // The node believes another key for the caller (a corrupted or stale a=crypto).
    let (_, mut confused) = call(Suite::AesCm128HmacSha1_80);
    for seq in 1..=10u16 {
        let sent = caller.protect_rtp(&rtp(seq, 7)).unwrap();
        assert_eq!(confused.unprotect_rtp(&sent), None);
    }
    assert_eq!(confused.rejected, 10);

    let (mut caller, mut node) = call(Suite::AesCm128HmacSha1_80);
    let sent = caller.protect_rtp(&rtp(1, 7)).unwrap();
    assert!(node.unprotect_rtp(&sent).is_some());
    assert_eq!(node.unprotect_rtp(&sent), None, "a replayed packet is dropped");
    let mut tampered = caller.protect_rtp(&rtp(2, 7)).unwrap().to_vec();
    tampered[20] ^= 1;
    assert_eq!(node.unprotect_rtp(&tampered), None, "a tampered packet is dropped");
    assert_eq!(node.unprotect_rtp(b"\x80\x00garbage"), None);
    assert_eq!(node.rejected, 3);
}

#[test]
fn rfc4568_lines_parse_and_unusable_ones_say_why() {
    let example = "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20";
    let parsed = CryptoAttr::parse(example).unwrap();
    assert_eq!((parsed.tag(), parsed.suite()), (1, Suite::AesCm128HmacSha1_80));
    assert_eq!(CryptoAttr::parse(&parsed.value()).unwrap(), parsed, "value() parses back");
    assert!(!format!("{parsed:?}").contains("PS1uQ"), "Debug never shows the key");
    for (line, error) in [
        ("1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32", CryptoError::Mki),
        (
            "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR;inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR",
            CryptoError::Mki,
        ),
        (
            "1 F8_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR",
            CryptoError::Suite("F8_128_HMAC_SHA1_80".into()),
        ),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ=", CryptoError::Key),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:!!!", CryptoError::Key),
        ("x AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR", CryptoError::Tag),
        ("1 AES_CM_128_HMAC_SHA1_80", CryptoError::Malformed),
        ("", CryptoError::Malformed),
        ("1 AES_CM_128_HMAC_SHA1_80 PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR", CryptoError::Malformed),
        (
            "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR UNENCRYPTED_SRTP",
            CryptoError::SessionParams("UNENCRYPTED_SRTP".into()),
        ),
    ] {
        assert_eq!(CryptoAttr::parse(line), Err(error), "{line:?}");
    }
}

#[test]
fn each_leg_negotiates_under_its_trunks_policy() {
    let good = CryptoAttr::generate(2, Suite::AesCm128HmacSha1_32).value();
    let mki = "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32";
    assert_eq!(negotiate(SrtpPolicy::Optional, "RTP/AVP", &[]), Ok(LegMedia::Plain));
    assert_eq!(negotiate(SrtpPolicy::Off, "RTP/AVP", &[]), Ok(LegMedia::Plain));
    assert_eq!(negotiate(SrtpPolicy::Required, "RTP/AVP", &[]), Err(Refused::SrtpRequired));
    assert_eq!(negotiate(SrtpPolicy::Off, "RTP/SAVP", &[&good]), Err(Refused::SrtpOff));
    // The first usable line wins: an MKI line the node cannot honour is skipped.
    let Ok(LegMedia::Srtp { remote, .. }) = negotiate(SrtpPolicy::Optional, "RTP/SAVP", &[mki, &good]) else {
        panic!("the second line is usable")
    };
    assert_eq!((remote.tag(), remote.suite()), (2, Suite::AesCm128HmacSha1_32));
    let Err(Refused::NoUsableCrypto(why)) = negotiate(SrtpPolicy::Required, "RTP/SAVP", &[mki]) else {
        panic!("nothing usable")
    };
    assert!(why.contains("MKI"), "{why}");
}

/// The figure: what an SRTP leg costs per packet in user space (one 20 ms PCMU packet
/// unprotected from the caller and protected again for the callee, as a relay between two SRTP
/// legs would), and the calls per core that makes at 50 packets/s each way. Printed, not asserted.
#[test]
#[ignore = "a figure, not a check: cargo test -p switchboard-node --release --lib media::srtp::tests::srtp_packets_per_second -- --ignored --nocapture"]
fn srtp_packets_per_second() {
    let (mut caller, mut node) = call(Suite::AesCm128HmacSha1_80);
    let (mut node_out, mut callee) = call(Suite::AesCm128HmacSha1_80);
    let packets = 50_000u32;
    let sent: Vec<_> = (0..packets).map(|i| caller.protect_rtp(&rtp(i as u16, 1)).unwrap()).collect();
    let started = std::time::Instant::now();
    for packet in &sent {
        let plain = node.unprotect_rtp(packet).unwrap();
        std::hint::black_box(node_out.protect_rtp(&plain).unwrap());
    }
    let elapsed = started.elapsed();
    let per_second = f64::from(packets) / elapsed.as_secs_f64();
    let _ = &mut callee;
    println!(
        "SRTP relay work (unprotect + protect, AES_CM_128_HMAC_SHA1_80, 172-byte RTP): {per_second:.0} packets/s on one core \
         = {:.0} SRTP-to-SRTP calls per core at 100 packets/s per call (both directions)",
        per_second / 100.0
    );
}
