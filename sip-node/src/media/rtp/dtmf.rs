//! RFC 4733 telephone events (DTMF): the payload format, and the detector that reports each key
//! press once although its end packet is sent three times.

use super::{RtpError, be16};

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
