//! RTP and RTCP (RFC 3550) as the relay needs them: header parsing with validation (every
//! packet comes from the network, so every length is checked), in-place header rewriting, the
//! [`StreamRewriter`] that keeps the stream a leg receives continuous when the other side
//! changes (a re-INVITE towards a new media server, an SSRC change, a sequence restart), loss and
//! reordering statistics, and RFC 4733 telephone events (DTMF) with de-duplication of the
//! retransmitted end packets.

mod dtmf;
mod stream;

pub use self::dtmf::*;
pub use self::stream::*;

/// Length of the fixed RTP header.
pub const RTP_HEADER_LEN: usize = 12;
/// RTCP packet type: sender report.
pub const RTCP_SR: u8 = 200;
/// RTCP packet type: receiver report.
pub const RTCP_RR: u8 = 201;
/// RTCP packet type: BYE.
pub const RTCP_BYE: u8 = 203;
/// RFC 3550 appendix A.1: a forward jump larger than this is a restart, not loss.
pub const MAX_DROPOUT: u16 = 3000;
/// RFC 3550 appendix A.1: a packet at most this far behind is late, not a restart.
pub const MAX_MISORDER: u16 = 100;

/// Why a packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    /// Shorter than the header it claims.
    #[error("{0} bytes is shorter than an RTP header")]
    TooShort(usize),
    /// Not version 2.
    #[error("RTP/RTCP version {0}, expected 2")]
    Version(u8),
    /// The CSRC list runs past the end of the packet.
    #[error("the CSRC list runs past the end of the packet")]
    TruncatedCsrc,
    /// The header extension runs past the end of the packet.
    #[error("the header extension runs past the end of the packet")]
    TruncatedExtension,
    /// The padding count is zero or larger than what follows the header.
    #[error("padding of {padding} bytes does not fit the {available} bytes after the header")]
    BadPadding {
        /// The padding count (last byte).
        padding: u8,
        /// Bytes after the header.
        available: usize,
    },
    /// An RTCP packet whose length field runs past the end of the datagram.
    #[error("an RTCP length field runs past the end of the datagram")]
    RtcpLength,
    /// An RTCP compound packet that does not start with a report, or a packet type outside RTCP.
    #[error("RTCP packet type {0} is not valid here")]
    RtcpType(u8),
    /// Padding on an RTCP packet that is not the last of its compound.
    #[error("RTCP padding on a packet that is not the last one")]
    RtcpPadding,
    /// A telephone-event payload shorter than 4 bytes.
    #[error("a telephone-event payload of {0} bytes, expected 4")]
    ShortEvent(usize),
}

/// A parsed RTP packet borrowing the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The marker bit (start of a talkspurt for audio).
    pub marker: bool,
    /// The payload type (7 bits).
    pub payload_type: u8,
    /// The sequence number.
    pub sequence: u16,
    /// The media timestamp.
    pub timestamp: u32,
    /// The synchronisation source.
    pub ssrc: u32,
    /// How many CSRCs follow the fixed header.
    pub csrc_count: u8,
    /// The header extension: profile-defined id and data.
    pub extension: Option<(u16, &'a [u8])>,
    /// Padding bytes at the end (0 when the P bit is clear).
    pub padding: u8,
    /// Length of the whole header (fixed part, CSRCs, extension).
    pub header_len: usize,
    /// The payload, without header and padding.
    pub payload: &'a [u8],
    raw: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> RtpPacket<'a> {
    /// Parses and validates a datagram (RFC 3550 §5.1, appendix A.1 checks that need no
    /// state): version 2, CSRC list, extension and padding within the packet.
    pub fn parse(buf: &'a [u8]) -> Result<RtpPacket<'a>, RtpError> {
        if buf.len() < RTP_HEADER_LEN {
            return Err(RtpError::TooShort(buf.len()));
        }
        let version = buf[0] >> 6;
        if version != 2 {
            return Err(RtpError::Version(version));
        }
        let has_padding = buf[0] & 0x20 != 0;
        let has_extension = buf[0] & 0x10 != 0;
        let csrc_count = buf[0] & 0x0F;
        let mut header_len = RTP_HEADER_LEN + 4 * csrc_count as usize;
        if buf.len() < header_len {
            return Err(RtpError::TruncatedCsrc);
        }
        let extension = if has_extension {
            if buf.len() < header_len + 4 {
                return Err(RtpError::TruncatedExtension);
            }
            let profile = be16(buf, header_len);
            let words = be16(buf, header_len + 2) as usize;
            let start = header_len + 4;
            let end = start + 4 * words;
            if buf.len() < end {
                return Err(RtpError::TruncatedExtension);
            }
            header_len = end;
            Some((profile, &buf[start..end]))
        } else {
            None
        };
        let available = buf.len() - header_len;
        let padding = if has_padding {
            let padding = buf[buf.len() - 1];
            if padding == 0 || padding as usize > available {
                return Err(RtpError::BadPadding { padding, available });
            }
            padding
        } else {
            0
        };
        Ok(RtpPacket {
            marker: buf[1] & 0x80 != 0,
            payload_type: buf[1] & 0x7F,
            sequence: be16(buf, 2),
            timestamp: be32(buf, 4),
            ssrc: be32(buf, 8),
            csrc_count,
            extension,
            padding,
            header_len,
            payload: &buf[header_len..buf.len() - padding as usize],
            raw: buf,
        })
    }

    /// The contributing sources.
    pub fn csrcs(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.csrc_count as usize).map(|i| be32(self.raw, RTP_HEADER_LEN + 4 * i))
    }
}

/// Whether a datagram looks like RTCP rather than RTP (RFC 5761 §4: payload type byte in
/// 192..=223), for peers that multiplex both on one port.
pub fn looks_like_rtcp(buf: &[u8]) -> bool {
    buf.len() >= 2 && (192..=223).contains(&buf[1])
}

/// The fixed header fields the node writes: for packets it generates (the AI bridge's audio)
/// and for headers it rewrites while relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtpHeader {
    /// The marker bit.
    pub marker: bool,
    /// The payload type.
    pub payload_type: u8,
    /// The sequence number.
    pub sequence: u16,
    /// The timestamp.
    pub timestamp: u32,
    /// The SSRC.
    pub ssrc: u32,
}

impl RtpHeader {
    /// Appends a packet (this header, no CSRC, no extension, then `payload`) to `out`.
    pub fn write(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.reserve(RTP_HEADER_LEN + payload.len());
        out.push(0x80);
        out.push(((self.marker as u8) << 7) | (self.payload_type & 0x7F));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// Overwrites marker, payload type, sequence, timestamp and SSRC of a packet in place,
    /// keeping its CSRCs, extension, payload and padding.
    pub fn rewrite(&self, packet: &mut [u8]) -> Result<(), RtpError> {
        if packet.len() < RTP_HEADER_LEN {
            return Err(RtpError::TooShort(packet.len()));
        }
        packet[1] = ((self.marker as u8) << 7) | (self.payload_type & 0x7F);
        packet[2..4].copy_from_slice(&self.sequence.to_be_bytes());
        packet[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        packet[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        Ok(())
    }
}

/// The common header of one RTCP packet in a compound datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcpHeader {
    /// The padding bit.
    pub padding: bool,
    /// Report count / subtype (5 bits).
    pub count: u8,
    /// The packet type (200 SR, 201 RR, 202 SDES, 203 BYE, 204 APP, 205-207 feedback and XR).
    pub packet_type: u8,
    /// Length in 32-bit words minus one, as on the wire.
    pub length: u16,
    /// The sender's SSRC (the first word after the header), when present.
    pub ssrc: Option<u32>,
}

impl RtcpHeader {
    /// Appends the 4-byte common header and, if set, the SSRC.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(0x80 | ((self.padding as u8) << 5) | (self.count & 0x1F));
        out.push(self.packet_type);
        out.extend_from_slice(&self.length.to_be_bytes());
        if let Some(ssrc) = self.ssrc {
            out.extend_from_slice(&ssrc.to_be_bytes());
        }
    }
}

/// Validates an RTCP compound datagram (RFC 3550 appendix A.2): version 2 everywhere, the
/// first packet a report (SR/RR, or a feedback/XR packet as reduced-size RTCP allows), padding
/// only on the last, lengths adding up to the datagram. Returns each packet's header.
pub fn parse_rtcp(buf: &[u8]) -> Result<Vec<RtcpHeader>, RtpError> {
    if buf.len() < 4 {
        return Err(RtpError::TooShort(buf.len()));
    }
    let mut headers = Vec::with_capacity(2);
    let mut at = 0;
    while at < buf.len() {
        if buf.len() - at < 4 {
            return Err(RtpError::RtcpLength);
        }
        let version = buf[at] >> 6;
        if version != 2 {
            return Err(RtpError::Version(version));
        }
        let packet_type = buf[at + 1];
        let report = matches!(packet_type, RTCP_SR | RTCP_RR | 205..=207);
        if !(192..=223).contains(&packet_type) || (at == 0 && !report) {
            return Err(RtpError::RtcpType(packet_type));
        }
        let length = be16(buf, at + 2);
        let size = (length as usize + 1) * 4;
        if buf.len() - at < size {
            return Err(RtpError::RtcpLength);
        }
        let padding = buf[at] & 0x20 != 0;
        if padding && at + size != buf.len() {
            return Err(RtpError::RtcpPadding);
        }
        let ssrc = (size >= 8).then(|| be32(buf, at + 4));
        headers.push(RtcpHeader { padding, count: buf[at] & 0x1F, packet_type, length, ssrc });
        at += size;
    }
    Ok(headers)
}

/// A minimal receiver report with no report blocks (8 bytes): what the node can send to a
/// peer that insists on RTCP when the other leg has none to pass.
pub fn empty_receiver_report(ssrc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    RtcpHeader { padding: false, count: 0, packet_type: RTCP_RR, length: 1, ssrc: Some(ssrc) }.write(&mut out);
    out
}

#[cfg(test)]
mod tests;
