//! Key presses the node itself puts into a leg (DTMF that arrived by SIP INFO on the other leg,
//! issue 24): RFC 4733 telephone-event packets generated here, in the leg's own payload type
//! and output stream (the leg's [`crate::media::rtp::StreamRewriter`] numbers them, so they
//! continue the sequence and SSRC the leg already receives), or, in bridged mode, a key for
//! the agent's `dtmf` message.
//!
//! The packets of one key press go out together: every one carries the duration so far and
//! the end packet is sent three times (RFC 4733 2.5.1.4), so receivers, which go by those
//! fields, read the whole key press; pacing them over the key's duration would need a timer
//! per relay on the media thread for a rare event.

use std::time::Instant;

use super::two_leg::Relay;
use super::{LegId, bump};
use crate::media::rtp::{RtpHeader, TelephoneEvent};

/// One key press to put into a leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DtmfPress {
    /// The key (`0`-`9`, `*`, `#`, `A`-`D`): what a bridged call's agent is told.
    pub(crate) key: char,
    /// The telephone-event payloads that play it, in order (updates, then the end three
    /// times), all at the event's one RTP timestamp.
    pub(crate) events: Vec<TelephoneEvent>,
}

/// The RTP packets of a key press on a stream: the first one with the marker bit and the
/// next output sequence number and a timestamp following real time ([`StreamRewriter::next_own`]),
/// the others numbered on with the same timestamp (RFC 4733 2.5.1.2).
///
/// [`StreamRewriter::next_own`]: crate::media::rtp::StreamRewriter::next_own
pub(super) fn event_packets(
    rewriter: &mut crate::media::rtp::StreamRewriter,
    payload_type: u8,
    events: &[TelephoneEvent],
    now: Instant,
) -> Vec<Vec<u8>> {
    let mut packets = Vec::with_capacity(events.len());
    let mut timestamp = None;
    for event in events {
        // Each packet takes the next sequence number; only the first sets the timestamp.
        let out = rewriter.next_own(0, now);
        let first = timestamp.is_none();
        let header = RtpHeader {
            marker: first,
            payload_type,
            sequence: out.sequence,
            timestamp: *timestamp.get_or_insert(out.timestamp),
            ssrc: out.ssrc,
        };
        let mut packet = Vec::with_capacity(16);
        header.write(&event.to_bytes(), &mut packet);
        packets.push(packet);
    }
    packets
}

impl Relay {
    /// Plays a key press into leg `to` as RFC 4733 events. Returns whether they were sent: not
    /// when the leg negotiated no telephone-event, the node does not send there, or it has no
    /// destination yet (the call then sends the key another way, or not at all).
    pub(crate) fn inject_dtmf(&mut self, to: LegId, press: &DtmfPress) -> bool {
        // The kernel forwards the other leg's packets into `to` with fixed offsets: the
        // node's own packets would collide with them, so that direction comes back to user
        // space (and is offloaded again once steady).
        self.kernel_uninstall(other(to));
        let target = match to {
            LegId::A => &mut self.a,
            LegId::B => &mut self.b,
        };
        let (Some(payload_type), Some(dest)) =
            (target.media.telephone_event, target.destination().filter(|_| target.media.direction.sends()))
        else {
            return false;
        };
        let packets = event_packets(&mut target.rewriter, payload_type, &press.events, Instant::now());
        let counters = &self.counters[to.index()];
        let mut buf = vec![0u8; super::RECEIVE_BUFFER];
        for packet in packets {
            buf[..packet.len()].copy_from_slice(&packet);
            let Some(len) = target.outbound(&mut buf, packet.len(), false) else { continue };
            if target.rtp.send_to(&buf[..len], dest).is_ok() {
                bump(&counters.packets_out, 1);
                bump(&counters.bytes_out, len as u64);
            }
        }
        true
    }
}

fn other(leg: LegId) -> LegId {
    match leg {
        LegId::A => LegId::B,
        LegId::B => LegId::A,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::{RtpPacket, StreamRewriter};

    #[test]
    fn a_key_press_is_one_event_with_one_timestamp_and_consecutive_sequence_numbers() {
        let mut rewriter = StreamRewriter::new(0xABCD, 8000);
        let now = Instant::now();
        // Some relayed audio first: the event continues its numbering.
        let audio = rewriter.rewrite(1, 100, 1000, false, now);
        let event = |duration, end| TelephoneEvent { event: 5, end, volume: 10, duration };
        let events = [event(400, false), event(800, false), event(1000, true), event(1000, true)];
        let packets = event_packets(&mut rewriter, 101, &events, now + std::time::Duration::from_millis(20));
        assert_eq!(packets.len(), 4);
        let parsed: Vec<RtpPacket> = packets.iter().map(|p| RtpPacket::parse(p).unwrap()).collect();
        for (i, p) in parsed.iter().enumerate() {
            assert_eq!(p.payload_type, 101);
            assert_eq!(p.ssrc, 0xABCD, "the stream the leg already receives");
            assert_eq!(p.sequence, audio.sequence.wrapping_add(1 + i as u16));
            assert_eq!(p.timestamp, parsed[0].timestamp, "one event, one timestamp");
            assert_eq!(p.marker, i == 0);
            assert_eq!(TelephoneEvent::parse(p.payload).unwrap(), events[i]);
        }
        assert!(parsed[0].timestamp.wrapping_sub(audio.timestamp) >= 160, "follows real time");
        // Relayed audio after the key press starts a new segment after it.
        let next = rewriter.rewrite(1, 101, 1160, false, now + std::time::Duration::from_millis(40));
        assert_eq!(next.sequence, parsed[3].sequence.wrapping_add(1));
    }
}
