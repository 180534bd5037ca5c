use std::time::{Duration, Instant};

use super::*;

fn packet(seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    RtpHeader { marker: false, payload_type: 0, sequence: seq, timestamp: ts, ssrc }.write(payload, &mut out);
    out
}

#[test]
fn header_round_trip() {
    let header = RtpHeader { marker: true, payload_type: 8, sequence: 0xBEEF, timestamp: 0xDEADBEEF, ssrc: 7 };
    let mut buf = vec![];
    header.write(&[1, 2, 3], &mut buf);
    assert_eq!(buf.len(), 15);
    let p = RtpPacket::parse(&buf).unwrap();
    assert!(p.marker);
    assert_eq!((p.payload_type, p.sequence, p.timestamp, p.ssrc), (8, 0xBEEF, 0xDEADBEEF, 7));
    assert_eq!(p.payload, &[1, 2, 3]);
    assert_eq!(p.header_len, 12);
    let rewritten = RtpHeader { marker: false, payload_type: 0, sequence: 1, timestamp: 2, ssrc: 3 };
    rewritten.rewrite(&mut buf).unwrap();
    let p = RtpPacket::parse(&buf).unwrap();
    assert_eq!((p.marker, p.payload_type, p.sequence, p.timestamp, p.ssrc), (false, 0, 1, 2, 3));
    assert_eq!(p.payload, &[1, 2, 3]);
    assert_eq!(rewritten.rewrite(&mut [0u8; 5]), Err(RtpError::TooShort(5)));
}

#[test]
fn csrc_extension_and_padding() {
    let mut buf = vec![0x80 | 0x20 | 0x10 | 2, 0x00, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
    buf.extend_from_slice(&[0, 0, 0, 10, 0, 0, 0, 11]); // two CSRCs
    buf.extend_from_slice(&[0xBE, 0xDE, 0, 1, 9, 9, 9, 9]); // one-word extension
    buf.extend_from_slice(&[0xAA, 0xBB]); // payload
    buf.extend_from_slice(&[0, 0, 3]); // padding 3
    let p = RtpPacket::parse(&buf).unwrap();
    assert_eq!(p.csrcs().collect::<Vec<_>>(), vec![10, 11]);
    assert_eq!(p.extension, Some((0xBEDE, &[9u8, 9, 9, 9][..])));
    assert_eq!(p.padding, 3);
    assert_eq!(p.payload, &[0xAA, 0xBB]);
    assert_eq!(p.header_len, 28);
}

#[test]
fn invalid_packets_are_errors() {
    assert_eq!(RtpPacket::parse(&[]), Err(RtpError::TooShort(0)));
    assert_eq!(RtpPacket::parse(&[0x80; 11]), Err(RtpError::TooShort(11)));
    let mut v1 = packet(1, 1, 1, &[0]);
    v1[0] = 0x40;
    assert_eq!(RtpPacket::parse(&v1), Err(RtpError::Version(1)));
    let mut csrc = packet(1, 1, 1, &[0, 0]);
    csrc[0] |= 0x0F;
    assert_eq!(RtpPacket::parse(&csrc), Err(RtpError::TruncatedCsrc));
    let mut ext = packet(1, 1, 1, &[0, 0]);
    ext[0] |= 0x10;
    assert_eq!(RtpPacket::parse(&ext), Err(RtpError::TruncatedExtension));
    let mut ext = packet(1, 1, 1, &[0xBE, 0xDE, 0, 9]);
    ext[0] |= 0x10;
    assert_eq!(RtpPacket::parse(&ext), Err(RtpError::TruncatedExtension));
    let mut pad = packet(1, 1, 1, &[1, 2, 9]);
    pad[0] |= 0x20;
    assert!(matches!(RtpPacket::parse(&pad), Err(RtpError::BadPadding { padding: 9, .. })));
    let mut pad0 = packet(1, 1, 1, &[1, 0]);
    pad0[0] |= 0x20;
    assert!(matches!(RtpPacket::parse(&pad0), Err(RtpError::BadPadding { padding: 0, .. })));
    // Every prefix and every single-byte corruption of a packet with all options parses or
    // fails cleanly.
    let mut full = vec![0x80 | 0x20 | 0x10 | 1, 0x00, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 10];
    full.extend_from_slice(&[0xBE, 0xDE, 0, 1, 9, 9, 9, 9, 0xAA, 0, 2]);
    for end in 0..full.len() {
        let _ = RtpPacket::parse(&full[..end]);
    }
    for i in 0..full.len() {
        for b in [0x00, 0xFF, 0x7F, 0x80] {
            let mut c = full.clone();
            c[i] = b;
            if let Ok(p) = RtpPacket::parse(&c) {
                assert!(p.header_len + p.payload.len() + p.padding as usize == c.len());
            }
        }
    }
}

#[test]
fn rtcp_compound() {
    // SR (header + 24 bytes sender info) followed by SDES, then a BYE.
    let mut buf = vec![];
    RtcpHeader { padding: false, count: 0, packet_type: RTCP_SR, length: 6, ssrc: Some(42) }.write(&mut buf);
    buf.extend_from_slice(&[0u8; 20]);
    RtcpHeader { padding: false, count: 1, packet_type: 202, length: 1, ssrc: Some(42) }.write(&mut buf);
    RtcpHeader { padding: false, count: 1, packet_type: RTCP_BYE, length: 1, ssrc: Some(42) }.write(&mut buf);
    let headers = parse_rtcp(&buf).unwrap();
    assert_eq!(headers.len(), 3);
    assert_eq!(headers[0].packet_type, RTCP_SR);
    assert_eq!(headers[0].ssrc, Some(42));
    assert_eq!(headers[2].packet_type, RTCP_BYE);
    assert!(looks_like_rtcp(&buf));
    assert!(!looks_like_rtcp(&packet(1, 1, 1, &[0])));
    let rr = empty_receiver_report(5);
    assert_eq!(rr.len(), 8);
    assert_eq!(parse_rtcp(&rr).unwrap()[0].packet_type, RTCP_RR);

    assert_eq!(parse_rtcp(&buf[..3]), Err(RtpError::TooShort(3)));
    assert_eq!(parse_rtcp(&buf[..buf.len() - 2]), Err(RtpError::RtcpLength));
    let mut bad = buf.clone();
    bad[0] = 0x40;
    assert_eq!(parse_rtcp(&bad), Err(RtpError::Version(1)));
    let mut bye_first = vec![];
    RtcpHeader { padding: false, count: 1, packet_type: RTCP_BYE, length: 1, ssrc: Some(1) }.write(&mut bye_first);
    assert_eq!(parse_rtcp(&bye_first), Err(RtpError::RtcpType(RTCP_BYE)));
    let mut padded = buf.clone();
    padded[0] |= 0x20;
    assert_eq!(parse_rtcp(&padded), Err(RtpError::RtcpPadding));
    assert_eq!(parse_rtcp(&packet(1, 1, 1, &[0; 8])), Err(RtpError::RtcpType(0)));
    for end in 0..buf.len() {
        let _ = parse_rtcp(&buf[..end]);
    }
}

#[test]
fn rewriter_keeps_output_continuous_across_source_changes() {
    let start = Instant::now();
    let mut r = StreamRewriter::new(0xABCD, 8000);
    let first = r.rewrite(1, 100, 1000, false, start);
    assert!(first.marker && first.restarted);
    assert_eq!(first.ssrc, 0xABCD);
    let mut last = first;
    for i in 1..10u16 {
        let out = r.rewrite(1, 100 + i, 1000 + 160 * i as u32, false, start + Duration::from_millis(20 * i as u64));
        assert_eq!(out.sequence, last.sequence.wrapping_add(1));
        assert_eq!(out.timestamp, last.timestamp.wrapping_add(160));
        assert!(!out.marker);
        last = out;
    }
    // A new SSRC with unrelated numbering 20 ms later: continues seamlessly.
    let at = start + Duration::from_millis(200);
    let out = r.rewrite(2, 5, 999_999, false, at);
    assert_eq!(out.sequence, last.sequence.wrapping_add(1));
    assert_eq!(out.timestamp, last.timestamp.wrapping_add(160));
    assert!(out.marker && out.restarted);
    let next = r.rewrite(2, 6, 999_999 + 160, false, at + Duration::from_millis(20));
    assert_eq!(next.sequence, out.sequence.wrapping_add(1));
    assert_eq!(next.timestamp, out.timestamp.wrapping_add(160));
    // Loss shows through; a late packet keeps its place.
    let gap = r.rewrite(2, 9, 999_999 + 640, false, at + Duration::from_millis(80));
    assert_eq!(gap.sequence, next.sequence.wrapping_add(3));
    let late = r.rewrite(2, 8, 999_999 + 480, false, at + Duration::from_millis(81));
    assert_eq!(late.sequence, gap.sequence.wrapping_sub(1));
    // Same SSRC restarting its sequence far away: a new segment, still continuous.
    let jump = r.rewrite(2, 40_000, 7, false, at + Duration::from_millis(100));
    assert_eq!(jump.sequence, gap.sequence.wrapping_add(1));
    assert!(jump.restarted);
    // reset() after a re-INVITE forces a new segment.
    r.reset();
    let after = r.rewrite(2, 40_001, 167, false, at + Duration::from_millis(120));
    assert!(after.restarted);
    assert_eq!(after.sequence, jump.sequence.wrapping_add(1));
    // Own packets continue the same stream; a pause advances the timestamp by real time.
    let own = r.next_own(160, at + Duration::from_millis(140));
    assert_eq!(own.sequence, after.sequence.wrapping_add(1));
    assert_eq!(own.timestamp, after.timestamp.wrapping_add(160));
    assert!(!own.marker);
    let paused = r.next_own(160, at + Duration::from_millis(1140));
    assert!(paused.marker);
    assert_eq!(paused.timestamp, own.timestamp.wrapping_add(8000));
}

#[test]
fn rewriter_continues_after_packets_rewritten_elsewhere() {
    let t0 = Instant::now();
    let mut r = StreamRewriter::new(7, 8000);
    let first = r.rewrite(1, 100, 1000, false, t0);
    let steady = r.steady_segment().unwrap();
    assert_eq!(steady.in_ssrc, 1);
    assert_eq!(steady.highest_in_seq, 100);
    // Packets 101..=150 went through the kernel with the same offsets.
    let last_ts = 1000u32.wrapping_add(50 * 160).wrapping_add(steady.ts_offset);
    r.forwarded_elsewhere(150, last_ts, t0 + Duration::from_secs(1));
    assert_eq!(r.steady_segment().unwrap().highest_in_seq, 150);
    // Back in user space: the same segment goes on with the same offsets...
    let next = r.rewrite(1, 151, 1000 + 51 * 160, false, t0 + Duration::from_millis(1020));
    assert_eq!(next.sequence, first.sequence.wrapping_add(51));
    assert_eq!(next.timestamp, first.timestamp.wrapping_add(51 * 160));
    // ...and a new source continues after what the kernel sent, not after packet 100.
    let moved = r.rewrite(2, 9, 5, false, t0 + Duration::from_millis(1040));
    assert_eq!(moved.sequence, first.sequence.wrapping_add(52));
    assert!(moved.marker);
    // A report from behind (stale) changes nothing.
    let before = r.steady_segment();
    r.forwarded_elsewhere(3, 0, t0);
    assert_eq!(r.steady_segment(), before);
}

#[test]
fn sequence_stats_take_packets_received_elsewhere() {
    let mut stats = SequenceStats::default();
    stats.record(1, 10);
    stats.received_elsewhere(60, 49, 1, 0);
    assert_eq!(stats.record(1, 61), SequenceClass::InOrder, "not a gap of 50");
    assert_eq!((stats.received, stats.lost), (51, 1));
}

#[test]
fn rewriter_wraps_sequence_numbers() {
    let now = Instant::now();
    let mut r = StreamRewriter::new(1, 8000);
    let a = r.rewrite(9, 65535, u32::MAX - 100, false, now);
    let b = r.rewrite(9, 0, u32::MAX.wrapping_add(60), false, now + Duration::from_millis(20));
    assert_eq!(b.sequence, a.sequence.wrapping_add(1));
    assert_eq!(b.timestamp, a.timestamp.wrapping_add(160));
    assert!(!b.restarted);
}

#[test]
fn sequence_statistics() {
    let mut s = SequenceStats::default();
    assert_eq!(s.record(1, 65534), SequenceClass::InOrder);
    assert_eq!(s.record(1, 65535), SequenceClass::InOrder);
    assert_eq!(s.record(1, 2), SequenceClass::Gap(2));
    assert_eq!(s.lost, 2);
    assert_eq!(s.record(1, 1), SequenceClass::Late);
    assert_eq!(s.lost, 1);
    assert_eq!(s.late, 1);
    assert_eq!(s.record(1, 2), SequenceClass::Late); // duplicate
    assert_eq!(s.record(1, 30_000), SequenceClass::Restart);
    assert_eq!(s.record(2, 5), SequenceClass::Restart);
    assert_eq!(s.record(2, 6), SequenceClass::InOrder);
    assert_eq!(s.received, 8);
    assert_eq!(s.restarts, 2);
}

#[test]
fn telephone_event_payload() {
    let ev = TelephoneEvent::parse(&[11, 0x80 | 10, 0x03, 0x20]).unwrap();
    assert_eq!(ev, TelephoneEvent { event: 11, end: true, volume: 10, duration: 800 });
    assert_eq!(ev.digit(), Some('#'));
    assert_eq!(ev.to_bytes(), [11, 0x8A, 0x03, 0x20]);
    assert_eq!(TelephoneEvent::parse(&[1, 2, 3]), Err(RtpError::ShortEvent(3)));
    let digits: String = (0..=15).filter_map(event_digit).collect();
    assert_eq!(digits, "0123456789*#ABCD");
    assert_eq!(event_digit(16), None);
}

#[test]
fn dtmf_detector_reports_each_press_once() {
    let mut d = DtmfDetector::new();
    let ev = |event, end, duration| TelephoneEvent { event, end, volume: 10, duration };
    assert_eq!(d.push(1000, &ev(5, false, 160)), None);
    assert_eq!(d.push(1000, &ev(5, false, 320)), None);
    let digit = d.push(1000, &ev(5, true, 800)).unwrap();
    assert_eq!((digit.digit, digit.duration, digit.timestamp), (Some('5'), 800, 1000));
    // The end is retransmitted twice more.
    assert_eq!(d.push(1000, &ev(5, true, 800)), None);
    assert_eq!(d.push(1000, &ev(5, true, 800)), None);
    // The same key again is a new event (new timestamp).
    assert_eq!(d.push(3000, &ev(5, false, 160)), None);
    assert_eq!(d.push(3000, &ev(5, true, 480)).unwrap().timestamp, 3000);
    // An event whose end packets are all lost is reported when the next one starts.
    assert_eq!(d.push(5000, &ev(1, false, 160)), None);
    let lost_end = d.push(7000, &ev(2, false, 160)).unwrap();
    assert_eq!((lost_end.digit, lost_end.timestamp), (Some('1'), 5000));
    assert_eq!(d.push(7000, &ev(2, true, 400)).unwrap().digit, Some('2'));
}
