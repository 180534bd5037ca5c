//! RTCP translation across an anchored call.
//!
//! The relay rewrites RTP (SSRC, sequence numbers, timestamps: [`super::rtp::StreamRewriter`])
//! so that each leg sees one stream from the node. RTCP passed across unchanged would then talk
//! about SSRCs and numbers the receiving peer never saw: its sender reports would not match the
//! stream they describe, and its receiver reports would describe a stream the other peer does
//! not know it sent. This rewrites a compound packet in place, as rtpengine does:
//!
//! - the sender's own SSRC (SR, RR, SDES chunks, BYE, feedback) becomes the SSRC the receiving
//!   peer knows that stream by, and an SR's RTP timestamp moves by the stream's timestamp
//!   offset;
//! - a report block (or feedback) about the stream the node sends to the sender becomes one
//!   about the receiving peer's own stream: its SSRC, and its extended highest sequence number
//!   moved back by the sequence offset.
//!
//! The packet must have passed [`super::rtp::parse_rtcp`] (lengths consistent); anything this
//! does not know is left as it is.

use super::rtp::{RTCP_BYE, RTCP_RR, RTCP_SR};

const RTCP_SDES: u8 = 202;
const RTCP_RTPFB: u8 = 205;
const RTCP_PSFB: u8 = 206;

/// What translating one leg's RTCP for the other leg needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcpTranslation {
    /// The SSRC the receiving peer sees the sender's stream as (the node's output SSRC).
    pub sender_ssrc: u32,
    /// The sender's input SSRC and the timestamp offset its stream is relayed with, when a
    /// segment of it is running.
    pub sender_timestamps: Option<(u32, u32)>,
    /// The stream the node sends to the sender: (the node's SSRC for it, the SSRC the
    /// receiving peer sent it with, the sequence offset it is relayed with).
    pub reported: Option<(u32, u32, u16)>,
}

fn be32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn put32(buf: &mut [u8], at: usize, value: u32) {
    if let Some(slot) = buf.get_mut(at..at + 4) {
        slot.copy_from_slice(&value.to_be_bytes());
    }
}

impl RtcpTranslation {
    /// Rewrites a (validated) compound RTCP packet in place.
    pub fn apply(&self, buf: &mut [u8]) {
        let Some(original_sender) = be32(buf, 4) else { return };
        let mut at = 0;
        while at + 4 <= buf.len() {
            let count = usize::from(buf[at] & 0x1F);
            let packet_type = buf[at + 1];
            let size = (usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]])) + 1) * 4;
            let end = (at + size).min(buf.len());
            let packet = &mut buf[at..end];
            match packet_type {
                RTCP_SR => {
                    self.sender(packet, original_sender, 4);
                    if let Some((input, offset)) = self.sender_timestamps
                        && input == original_sender
                        && let Some(ts) = be32(packet, 16)
                    {
                        put32(packet, 16, ts.wrapping_add(offset));
                    }
                    self.blocks(packet, 28, count);
                }
                RTCP_RR => {
                    self.sender(packet, original_sender, 4);
                    self.blocks(packet, 8, count);
                }
                RTCP_SDES => self.sdes(packet, original_sender, count),
                RTCP_BYE => {
                    for i in 0..count {
                        self.sender(packet, original_sender, 4 + 4 * i);
                    }
                }
                RTCP_RTPFB | RTCP_PSFB => {
                    self.sender(packet, original_sender, 4);
                    if let Some((node, peer, _)) = self.reported
                        && be32(packet, 8) == Some(node)
                    {
                        put32(packet, 8, peer);
                    }
                }
                _ => {}
            }
            at += size;
        }
    }

    /// The sender's SSRC at `at`, if it is the sender's.
    fn sender(&self, packet: &mut [u8], original: u32, at: usize) {
        if be32(packet, at) == Some(original) {
            put32(packet, at, self.sender_ssrc);
        }
    }

    /// Report blocks (24 bytes each from `first`) about the stream the node sends the sender.
    fn blocks(&self, packet: &mut [u8], first: usize, count: usize) {
        let Some((node, peer, seq_offset)) = self.reported else { return };
        for i in 0..count {
            let block = first + 24 * i;
            if be32(packet, block) != Some(node) {
                continue;
            }
            put32(packet, block, peer);
            if let Some(highest) = be32(packet, block + 8) {
                let sequence = (highest as u16).wrapping_sub(seq_offset);
                put32(packet, block + 8, (highest & 0xFFFF_0000) | u32::from(sequence));
            }
        }
    }

    /// SDES chunks: an SSRC, then items up to a null item, padded to 32 bits.
    fn sdes(&self, packet: &mut [u8], original: u32, count: usize) {
        let mut at = 4;
        for _ in 0..count {
            if at + 4 > packet.len() {
                return;
            }
            self.sender(packet, original, at);
            at += 4;
            loop {
                match packet.get(at) {
                    None => return,
                    Some(0) => {
                        at = (at + 4) & !3;
                        break;
                    }
                    Some(_) => at += 2 + usize::from(packet.get(at + 1).copied().unwrap_or(0)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::parse_rtcp;

    /// SR from SSRC 0x1111 with one report block about SSRC 0x5555 (highest 0x0002_0010),
    /// an SDES CNAME chunk and a BYE.
    fn compound() -> Vec<u8> {
        let mut out = vec![
            0x81, 200, 0, 12, // SR, one block, 13 words
            0, 0, 0x11, 0x11, // sender
            0, 0, 0, 1, 0, 0, 0, 2, // NTP
            0, 0, 0x10, 0x00, // RTP timestamp 4096
            0, 0, 0, 50, 0, 0, 0x1F, 0x40, // packets, octets
            0, 0, 0x55, 0x55, // block: SSRC
            0, 0, 0, 3, // lost
            0, 2, 0, 0x10, // extended highest sequence
            0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0, 9, // jitter, LSR, DLSR
        ];
        out.extend_from_slice(&[0x81, 202, 0, 3, 0, 0, 0x11, 0x11, 1, 3, b'a', b'b', b'c', 0, 0, 0]);
        out.extend_from_slice(&[0x81, 203, 0, 1, 0, 0, 0x11, 0x11]);
        out
    }

    #[test]
    fn a_compound_packet_speaks_of_the_streams_the_receiver_knows() {
        let mut packet = compound();
        assert!(parse_rtcp(&packet).is_ok());
        let translation = RtcpTranslation {
            sender_ssrc: 0xAAAA,
            sender_timestamps: Some((0x1111, 1000)),
            reported: Some((0x5555, 0x7777, 0x10)),
        };
        translation.apply(&mut packet);
        let headers = parse_rtcp(&packet).unwrap();
        assert_eq!(headers.iter().map(|h| h.ssrc).collect::<Vec<_>>(), vec![Some(0xAAAA); 3], "sender SSRC everywhere");
        assert_eq!(be32(&packet, 16), Some(4096 + 1000), "SR timestamp moved by the offset");
        assert_eq!(be32(&packet, 28), Some(0x7777), "the block is about the receiver's own stream");
        assert_eq!(be32(&packet, 36), Some(0x0002_0000), "highest sequence moved back by the offset");
        assert_eq!(&packet[28 + 4..28 + 8], &[0, 0, 0, 3], "the rest of the block is untouched");
        assert_eq!(&packet[60..64], &[1, 3, b'a', b'b'], "SDES items untouched");
    }

    #[test]
    fn blocks_about_other_streams_and_unknown_senders_stay() {
        let mut packet = compound();
        let translation = RtcpTranslation {
            sender_ssrc: 0xAAAA,
            sender_timestamps: Some((0x9999, 1000)),
            reported: Some((0x1234, 1, 1)),
        };
        translation.apply(&mut packet);
        assert_eq!(be32(&packet, 16), Some(4096), "a timestamp offset of another stream does not apply");
        assert_eq!(be32(&packet, 28), Some(0x5555));
        assert_eq!(be32(&packet, 36), Some(0x0002_0010));
    }

    #[test]
    fn truncated_input_does_not_panic() {
        let full = compound();
        let translation =
            RtcpTranslation { sender_ssrc: 1, sender_timestamps: Some((0x1111, 1)), reported: Some((0x5555, 2, 3)) };
        for len in 0..full.len() {
            let mut packet = full[..len].to_vec();
            translation.apply(&mut packet);
        }
        // A chunk count larger than the packet holds.
        let mut sdes = vec![0x9F, 202, 0, 1, 0, 0, 0, 1];
        translation.apply(&mut sdes);
    }
}
