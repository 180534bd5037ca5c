//! RTP and RTCP (RFC 3550) as the relay needs them: header parsing with validation (every
//! packet comes from the network, so every length is checked), in-place header rewriting, the
//! [`StreamRewriter`] that keeps the stream a leg receives continuous when the other side
//! changes (a re-INVITE towards a new media server, an SSRC change, a sequence restart), loss and
//! reordering statistics, and RFC 4733 telephone events (DTMF) with de-duplication of the
//! retransmitted end packets.

use std::time::Instant;

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

/// The outcome of [`StreamRewriter::rewrite`]: the header fields to put on the relayed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Output sequence number.
    pub sequence: u16,
    /// Output timestamp.
    pub timestamp: u32,
    /// Output SSRC (constant for the life of the rewriter).
    pub ssrc: u32,
    /// Marker bit: the input's, or set on the first packet after a source change so that the
    /// receiver resynchronises its jitter buffer.
    pub marker: bool,
    /// Whether this packet started a new input segment.
    pub restarted: bool,
}

/// A rewriter's current segment, for whoever rewrites its packets elsewhere
/// ([`StreamRewriter::steady_segment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteadySegment {
    /// The input SSRC of the segment.
    pub in_ssrc: u32,
    /// Added to the input sequence number.
    pub seq_offset: u16,
    /// Added to the input timestamp.
    pub ts_offset: u32,
    /// The highest input sequence number so far.
    pub highest_in_seq: u16,
    /// The output timestamp of that packet.
    pub last_ts: u32,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    in_ssrc: u32,
    highest_in_seq: u16,
    seq_offset: u16,
    ts_offset: u32,
}

/// Rewrites the sequence numbers, timestamps and SSRC of a relayed stream so that what a leg
/// receives is one continuous stream from one SSRC, even when the source behind the relay
/// changes (re-INVITE to another media server, SSRC change, sequence restart) or the node
/// interleaves its own packets.
///
/// Within a segment (one input SSRC, sequence moving forward by less than [`MAX_DROPOUT`]) the
/// offsets stay fixed, so loss and reordering show through unchanged. A new segment continues
/// at the next output sequence number and at an output timestamp advanced by the wall-clock
/// time since the last packet, with the marker bit set.
#[derive(Debug, Clone)]
pub struct StreamRewriter {
    out_ssrc: u32,
    clock_rate: u32,
    segment: Option<Segment>,
    next_seq: u16,
    last_ts: u32,
    last_at: Option<Instant>,
    force_restart: bool,
}

impl StreamRewriter {
    /// A rewriter that emits `out_ssrc` at `clock_rate` Hz (8000 for G.711).
    pub fn new(out_ssrc: u32, clock_rate: u32) -> StreamRewriter {
        StreamRewriter {
            out_ssrc,
            clock_rate,
            segment: None,
            next_seq: rand::random(),
            last_ts: rand::random(),
            last_at: None,
            force_restart: false,
        }
    }

    /// The output SSRC.
    pub fn ssrc(&self) -> u32 {
        self.out_ssrc
    }

    /// Makes the next packet start a new segment even with the same SSRC (after a re-INVITE,
    /// when the source may have restarted its numbering).
    pub fn reset(&mut self) {
        self.force_restart = true;
    }

    fn advance(&mut self, now: Instant, min_samples: u32) -> u32 {
        let elapsed = self.last_at.map_or(0, |at| now.saturating_duration_since(at).as_micros() as u64);
        let samples = (elapsed * self.clock_rate as u64 / 1_000_000).min(u32::MAX as u64 / 2) as u32;
        self.last_ts.wrapping_add(samples.max(min_samples))
    }

    /// Maps one input packet to its output header fields.
    pub fn rewrite(&mut self, ssrc: u32, sequence: u16, timestamp: u32, marker: bool, now: Instant) -> Rewritten {
        let continuing = match self.segment {
            Some(segment) if !self.force_restart && segment.in_ssrc == ssrc => {
                let ahead = sequence.wrapping_sub(segment.highest_in_seq);
                !(MAX_DROPOUT..=u16::MAX - MAX_MISORDER).contains(&ahead)
            }
            _ => false,
        };
        if continuing && let Some(segment) = &mut self.segment {
            let ahead = sequence.wrapping_sub(segment.highest_in_seq);
            let out_seq = sequence.wrapping_add(segment.seq_offset);
            let out_ts = timestamp.wrapping_add(segment.ts_offset);
            if ahead != 0 && ahead < MAX_DROPOUT {
                segment.highest_in_seq = sequence;
                self.next_seq = out_seq.wrapping_add(1);
                self.last_ts = out_ts;
                self.last_at = Some(now);
            }
            return Rewritten { sequence: out_seq, timestamp: out_ts, ssrc: self.out_ssrc, marker, restarted: false };
        }
        // A new segment: continue the output where it stopped.
        let out_seq = self.next_seq;
        let out_ts = if self.last_at.is_some() { self.advance(now, 1) } else { self.last_ts };
        self.segment = Some(Segment {
            in_ssrc: ssrc,
            highest_in_seq: sequence,
            seq_offset: out_seq.wrapping_sub(sequence),
            ts_offset: out_ts.wrapping_sub(timestamp),
        });
        self.force_restart = false;
        self.next_seq = out_seq.wrapping_add(1);
        self.last_ts = out_ts;
        self.last_at = Some(now);
        Rewritten { sequence: out_seq, timestamp: out_ts, ssrc: self.out_ssrc, marker: true, restarted: true }
    }

    /// The current segment, when packets of it can be rewritten by someone else with fixed
    /// offsets (the kernel fast path): `None` before the first packet, after the node's own
    /// packets and while a restart is pending.
    pub fn steady_segment(&self) -> Option<SteadySegment> {
        let segment = self.segment.filter(|_| !self.force_restart)?;
        Some(SteadySegment {
            in_ssrc: segment.in_ssrc,
            seq_offset: segment.seq_offset,
            ts_offset: segment.ts_offset,
            highest_in_seq: segment.highest_in_seq,
            last_ts: self.last_ts,
        })
    }

    /// Catches up with packets of the current segment rewritten elsewhere (the kernel fast
    /// path) up to input sequence `highest_in_seq`, whose output timestamp was `last_ts`, at
    /// `at`: the next segment then continues after them.
    pub fn forwarded_elsewhere(&mut self, highest_in_seq: u16, last_ts: u32, at: Instant) {
        let Some(segment) = &mut self.segment else { return };
        let ahead = highest_in_seq.wrapping_sub(segment.highest_in_seq);
        if ahead == 0 || ahead >= MAX_DROPOUT {
            return;
        }
        segment.highest_in_seq = highest_in_seq;
        self.next_seq = highest_in_seq.wrapping_add(segment.seq_offset).wrapping_add(1);
        self.last_ts = last_ts;
        self.last_at = Some(at);
    }

    /// Header fields for a packet the node generates itself (`samples` long), continuing the
    /// same output stream: the next sequence number and a timestamp that follows real time
    /// across pauses. The relayed segment, if any, ends: the next relayed packet starts anew.
    pub fn next_own(&mut self, samples: u32, now: Instant) -> Rewritten {
        let gap = self.last_at.is_none_or(|at| {
            now.saturating_duration_since(at).as_micros() as u64 * self.clock_rate as u64
                > 2 * samples.max(1) as u64 * 1_000_000
        });
        let out_ts = match self.last_at {
            None => self.last_ts,
            Some(_) if gap => self.advance(now, samples),
            Some(_) => self.last_ts.wrapping_add(samples),
        };
        let out_seq = self.next_seq;
        self.segment = None;
        self.next_seq = out_seq.wrapping_add(1);
        self.last_ts = out_ts;
        self.last_at = Some(now);
        Rewritten { sequence: out_seq, timestamp: out_ts, ssrc: self.out_ssrc, marker: gap, restarted: false }
    }
}

/// How one received packet relates to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceClass {
    /// The first packet, or the next expected one.
    InOrder,
    /// Ahead of the expected one: this many packets are missing (so far).
    Gap(u16),
    /// Behind the highest seen (reordered, or a duplicate).
    Late,
    /// A jump too large to be loss: the source restarted (counted as neither).
    Restart,
}

/// Loss and reordering counters for one received stream (RFC 3550 appendix A.1, simplified).
#[derive(Debug, Clone, Default)]
pub struct SequenceStats {
    highest: Option<(u32, u16)>,
    /// Packets seen.
    pub received: u64,
    /// Packets missing (gaps, minus late packets that filled them).
    pub lost: u64,
    /// Packets that arrived behind a later one.
    pub late: u64,
    /// Restarts seen.
    pub restarts: u64,
}

impl SequenceStats {
    /// Counts packets of the current stream that were received elsewhere (the kernel fast
    /// path) up to `highest`, so that the next one seen here is not taken for a gap.
    pub fn received_elsewhere(&mut self, highest: u16, packets: u64, lost: u64, late: u64) {
        if let Some((ssrc, current)) = self.highest {
            let ahead = highest.wrapping_sub(current);
            if ahead != 0 && ahead < MAX_DROPOUT {
                self.highest = Some((ssrc, highest));
            }
        }
        self.received += packets;
        self.lost += lost;
        self.late += late;
    }

    /// Records one packet of `ssrc`; a new SSRC starts the sequence over.
    pub fn record(&mut self, ssrc: u32, sequence: u16) -> SequenceClass {
        self.received += 1;
        let Some((last_ssrc, highest)) = self.highest else {
            self.highest = Some((ssrc, sequence));
            return SequenceClass::InOrder;
        };
        if last_ssrc != ssrc {
            self.highest = Some((ssrc, sequence));
            self.restarts += 1;
            return SequenceClass::Restart;
        }
        let ahead = sequence.wrapping_sub(highest);
        if ahead == 1 {
            self.highest = Some((ssrc, sequence));
            SequenceClass::InOrder
        } else if ahead != 0 && ahead < MAX_DROPOUT {
            self.highest = Some((ssrc, sequence));
            self.lost += (ahead - 1) as u64;
            SequenceClass::Gap(ahead - 1)
        } else if ahead == 0 || ahead > u16::MAX - MAX_MISORDER {
            self.late += 1;
            self.lost = self.lost.saturating_sub(1);
            SequenceClass::Late
        } else {
            self.highest = Some((ssrc, sequence));
            self.restarts += 1;
            SequenceClass::Restart
        }
    }
}

/// An RFC 4733 §2.3 telephone-event payload (the first 4 bytes; a packet may repeat blocks,
/// which carry the same event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// The event code (0-9, 10 `*`, 11 `#`, 12-15 A-D, 16 flash, ...).
    pub event: u8,
    /// The E bit: this is (a retransmission of) the end of the event.
    pub end: bool,
    /// The volume, 0 to -63 dBm0 (as 0..=63).
    pub volume: u8,
    /// The duration so far, in timestamp units.
    pub duration: u16,
}

impl TelephoneEvent {
    /// Parses a payload.
    pub fn parse(payload: &[u8]) -> Result<TelephoneEvent, RtpError> {
        if payload.len() < 4 {
            return Err(RtpError::ShortEvent(payload.len()));
        }
        Ok(TelephoneEvent {
            event: payload[0],
            end: payload[1] & 0x80 != 0,
            volume: payload[1] & 0x3F,
            duration: be16(payload, 2),
        })
    }

    /// The 4-byte payload.
    pub fn to_bytes(&self) -> [u8; 4] {
        let d = self.duration.to_be_bytes();
        [self.event, ((self.end as u8) << 7) | (self.volume & 0x3F), d[0], d[1]]
    }

    /// The DTMF key of the event, if it is one.
    pub fn digit(&self) -> Option<char> {
        event_digit(self.event)
    }
}

/// The DTMF key of an RFC 4733 event code: `0`-`9`, `*`, `#`, `A`-`D`.
pub fn event_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some((b'0' + event) as char),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some((b'A' + event - 12) as char),
        _ => None,
    }
}

/// A completed key press.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfDigit {
    /// The event code.
    pub event: u8,
    /// The key, when the event is a DTMF key.
    pub digit: Option<char>,
    /// The duration in timestamp units (divide by 8 for milliseconds at 8 kHz).
    pub duration: u16,
    /// The RTP timestamp that identifies the event.
    pub timestamp: u32,
}

/// Turns the packets of RFC 4733 events into one report per key press: reported on the first
/// end packet, the two retransmissions of the end (same timestamp) ignored; an event whose end
/// packets were all lost is reported when the next event starts.
#[derive(Debug, Clone, Default)]
pub struct DtmfDetector {
    current: Option<(u32, TelephoneEvent)>,
    reported: Option<u32>,
}

impl DtmfDetector {
    /// A detector with nothing seen.
    pub fn new() -> DtmfDetector {
        DtmfDetector::default()
    }

    /// Feeds one telephone-event packet (its RTP timestamp and payload).
    pub fn push(&mut self, timestamp: u32, event: &TelephoneEvent) -> Option<DtmfDigit> {
        if self.reported == Some(timestamp) {
            return None;
        }
        let previous = self.current.filter(|(ts, _)| *ts != timestamp);
        self.current = Some((timestamp, *event));
        if event.end {
            self.reported = Some(timestamp);
            self.current = None;
            return Some(DtmfDigit { event: event.event, digit: event.digit(), duration: event.duration, timestamp });
        }
        // A new event began while the previous one never ended: report the previous one now.
        previous.map(|(ts, ev)| {
            self.reported = Some(ts);
            DtmfDigit { event: ev.event, digit: ev.digit(), duration: ev.duration, timestamp: ts }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
}
