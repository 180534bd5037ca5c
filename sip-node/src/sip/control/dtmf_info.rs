//! DTMF carried in SIP INFO requests, and its mapping to RFC 4733 telephone events.
//!
//! Some carriers and PBXs (Cisco, Genesys, older Asterisk setups) send key presses as INFO
//! requests instead of RTP events. Two body formats are in use, neither standardised by an
//! RFC: `application/dtmf-relay` (Cisco's, lines `Signal=5` and `Duration=160` in
//! milliseconds) and `application/dtmf` (the bare key). Both come from the network: a body
//! that is not one of them is a typed [`DtmfInfoError`] (the driver answers 415 or 400), never
//! a guess.

use crate::media::rtp::TelephoneEvent;

/// The key press duration assumed when the body gives none (the common default of PBXs).
pub const DEFAULT_DURATION_MS: u32 = 250;

/// Longest key press accepted: an RFC 4733 event's duration field is 16 bits of timestamp
/// units (8.19 s at 8 kHz); anything longer is not a key press.
pub const MAX_DURATION_MS: u32 = 8_000;

/// Bodies larger than this are not DTMF (a dtmf-relay body is two short lines).
const MAX_BODY: usize = 256;

/// The content type of Cisco's DTMF INFO body, the one the node sends.
pub const RELAY_CONTENT_TYPE: &str = "application/dtmf-relay";

/// Whether an INFO with this content type carries DTMF (parameters ignored).
pub fn is_dtmf_content_type(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case(RELAY_CONTENT_TYPE) || media_type.eq_ignore_ascii_case("application/dtmf")
}

/// Why an INFO body is not a DTMF key press.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DtmfInfoError {
    /// Not a DTMF content type: answer 415 Unsupported Media Type.
    #[error("content type {0:?} is not application/dtmf-relay or application/dtmf")]
    UnsupportedContentType(String),
    #[error("INFO body of {0} bytes is too large for DTMF")]
    TooLarge(usize),
    #[error("INFO body is not text")]
    NotText,
    #[error("dtmf-relay body has no Signal")]
    MissingSignal,
    #[error("{0:?} is not a DTMF key")]
    BadSignal(String),
    #[error("{0:?} is not a duration in milliseconds up to {MAX_DURATION_MS}")]
    BadDuration(String),
}

impl DtmfInfoError {
    /// The status code to answer the INFO with.
    pub fn status(&self) -> u16 {
        match self {
            DtmfInfoError::UnsupportedContentType(_) => 415,
            _ => 400,
        }
    }
}

/// One key press from an INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoDtmf {
    /// `0`-`9`, `*`, `#`, `A`-`D`.
    pub key: char,
    /// How long the key was held.
    pub duration_ms: u32,
}

impl InfoDtmf {
    /// The RFC 4733 event code of the key (0-9, 10 `*`, 11 `#`, 12-15 A-D).
    pub fn event_code(&self) -> u8 {
        match self.key {
            '0'..='9' => self.key as u8 - b'0',
            '*' => 10,
            '#' => 11,
            // Only A-D are ever stored (see `key_of`).
            other => other as u8 - b'A' + 12,
        }
    }

    /// The telephone-event payloads that play this key on a leg with clock rate `clock_rate`
    /// (RFC 4733 section 2.5): one every `packet_ms` with the duration so far (all with the
    /// same RTP timestamp, the first with the marker bit), then the end packet three times
    /// (section 2.5.1.4: the end is retransmitted because it is what reports the duration).
    pub fn telephone_events(&self, clock_rate: u32, packet_ms: u32) -> Vec<TelephoneEvent> {
        let per_ms = clock_rate / 1000;
        let total = (self.duration_ms * per_ms).min(u32::from(u16::MAX)) as u16;
        let step = (packet_ms.max(1) * per_ms).max(1) as u16;
        let event = |duration: u16, end: bool| TelephoneEvent {
            event: self.event_code(),
            end,
            // -10 dBm0, the level most gateways send.
            volume: 10,
            duration,
        };
        let mut events = Vec::new();
        let mut so_far = step.min(total);
        while so_far < total {
            events.push(event(so_far, false));
            so_far = so_far.saturating_add(step);
        }
        events.extend([event(total, true); 3]);
        events
    }
}

/// The key a text names: one of `0-9 * # A-D` (case-insensitive), or an RFC 4733 event code
/// 0-15 written as a number (some gateways send `Signal=11` for `#`).
fn key_of(text: &str) -> Option<char> {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_digit() || c == '*' || c == '#' => Some(c),
        (Some(c), None) if ('A'..='D').contains(&c.to_ascii_uppercase()) => Some(c.to_ascii_uppercase()),
        _ => match text.parse::<u8>().ok()? {
            10 => Some('*'),
            11 => Some('#'),
            code @ 12..=15 => Some((b'A' + code - 12) as char),
            _ => None,
        },
    }
}

/// Parses the body of an INFO with content type `content_type` (parameters ignored).
pub fn parse(content_type: &str, body: &[u8]) -> Result<InfoDtmf, DtmfInfoError> {
    let media_type = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let relay = match media_type.as_str() {
        "application/dtmf-relay" => true,
        "application/dtmf" => false,
        _ => return Err(DtmfInfoError::UnsupportedContentType(content_type.chars().take(60).collect())),
    };
    if body.len() > MAX_BODY {
        return Err(DtmfInfoError::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|_| DtmfInfoError::NotText)?;
    if !relay {
        let key = text.trim();
        // Some senders put the dtmf-relay form under application/dtmf: accept it too.
        if key.contains('=') {
            return parse_relay(text);
        }
        return key_of(key)
            .map(|key| InfoDtmf { key, duration_ms: DEFAULT_DURATION_MS })
            .ok_or_else(|| DtmfInfoError::BadSignal(key.chars().take(20).collect()));
    }
    parse_relay(text)
}

/// `Signal=<key>` and optional `Duration=<ms>` lines (CRLF or LF, spaces around `=` allowed,
/// names case-insensitive, other lines ignored).
fn parse_relay(text: &str) -> Result<InfoDtmf, DtmfInfoError> {
    let mut key = None;
    let mut duration_ms = DEFAULT_DURATION_MS;
    for line in text.lines() {
        let Some((name, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "signal" => {
                key = Some(key_of(value).ok_or_else(|| DtmfInfoError::BadSignal(value.chars().take(20).collect()))?)
            }
            "duration" => {
                duration_ms = value
                    .parse::<u32>()
                    .ok()
                    .filter(|d| (1..=MAX_DURATION_MS).contains(d) && value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| DtmfInfoError::BadDuration(value.chars().take(20).collect()))?
            }
            _ => {}
        }
    }
    Ok(InfoDtmf { key: key.ok_or(DtmfInfoError::MissingSignal)?, duration_ms })
}

/// The `application/dtmf-relay` body of a key press, for sending INFO to a leg that has no
/// telephone-event.
pub fn relay_body(dtmf: &InfoDtmf) -> String {
    format!("Signal={}\r\nDuration={}\r\n", dtmf.key, dtmf.duration_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtmf_relay_bodies_parse() {
        let d = parse("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n").unwrap();
        assert_eq!(d, InfoDtmf { key: '5', duration_ms: 160 });
        let d = parse("Application/DTMF-Relay; charset=x", b"signal = #\nduration= 100").unwrap();
        assert_eq!(d, InfoDtmf { key: '#', duration_ms: 100 });
        assert_eq!(parse("application/dtmf-relay", b"Signal=*").unwrap(), InfoDtmf { key: '*', duration_ms: 250 });
        assert_eq!(parse("application/dtmf-relay", b"Signal=11\r\n").unwrap().key, '#', "an event code");
        assert_eq!(parse("application/dtmf-relay", b"Signal=d\r\n").unwrap().key, 'D');
    }

    #[test]
    fn bare_dtmf_bodies_parse() {
        assert_eq!(parse("application/dtmf", b"7\r\n").unwrap(), InfoDtmf { key: '7', duration_ms: 250 });
        assert_eq!(parse("application/dtmf", b"Signal=9\r\nDuration=80").unwrap().key, '9');
    }

    #[test]
    fn garbage_bodies_are_typed_errors() {
        let cases: &[(&str, &[u8], DtmfInfoError)] = &[
            ("text/plain", b"5", DtmfInfoError::UnsupportedContentType("text/plain".into())),
            ("application/dtmf-relay", b"Duration=100", DtmfInfoError::MissingSignal),
            ("application/dtmf-relay", b"", DtmfInfoError::MissingSignal),
            ("application/dtmf-relay", b"Signal=E", DtmfInfoError::BadSignal("E".into())),
            ("application/dtmf-relay", b"Signal=16", DtmfInfoError::BadSignal("16".into())),
            ("application/dtmf-relay", b"Signal=55", DtmfInfoError::BadSignal("55".into())),
            ("application/dtmf-relay", b"Signal=5\nDuration=-1", DtmfInfoError::BadDuration("-1".into())),
            ("application/dtmf-relay", b"Signal=5\nDuration=0", DtmfInfoError::BadDuration("0".into())),
            ("application/dtmf-relay", b"Signal=5\nDuration=99999", DtmfInfoError::BadDuration("99999".into())),
            ("application/dtmf-relay", b"Signal=5\nDuration=+5", DtmfInfoError::BadDuration("+5".into())),
            ("application/dtmf-relay", b"Signal=\xff", DtmfInfoError::NotText),
            ("application/dtmf", b"hello", DtmfInfoError::BadSignal("hello".into())),
            ("application/dtmf", b"", DtmfInfoError::BadSignal("".into())),
        ];
        for (content_type, body, expected) in cases {
            assert_eq!(parse(content_type, body).as_ref(), Err(expected), "{content_type} {body:?}");
        }
        assert_eq!(parse("application/dtmf", &[b'1'; 300]), Err(DtmfInfoError::TooLarge(300)));
        assert_eq!(parse("text/plain", b"").unwrap_err().status(), 415);
        assert_eq!(parse("application/dtmf", b"x").unwrap_err().status(), 400);
    }

    #[test]
    fn dtmf_content_types_are_recognised() {
        assert!(is_dtmf_content_type("application/dtmf-relay"));
        assert!(is_dtmf_content_type("Application/DTMF; x=y"));
        assert!(!is_dtmf_content_type("application/sdp"));
        assert!(!is_dtmf_content_type("application/dtmf-relayed"));
    }

    #[test]
    fn keys_map_to_rfc4733_event_codes() {
        let codes: Vec<u8> =
            "0123456789*#ABCD".chars().map(|key| InfoDtmf { key, duration_ms: 100 }.event_code()).collect();
        assert_eq!(codes, (0..16).collect::<Vec<u8>>());
        for code in 0..16u8 {
            let key = crate::media::rtp::event_digit(code).unwrap();
            assert_eq!(InfoDtmf { key, duration_ms: 1 }.event_code(), code, "agrees with the RTP detector");
        }
    }

    #[test]
    fn a_key_press_becomes_growing_events_then_three_ends() {
        let events = InfoDtmf { key: '#', duration_ms: 100 }.telephone_events(8000, 20);
        let durations: Vec<(u16, bool)> = events.iter().map(|e| (e.duration, e.end)).collect();
        assert_eq!(
            durations,
            vec![(160, false), (320, false), (480, false), (640, false), (800, true), (800, true), (800, true)]
        );
        assert!(events.iter().all(|e| e.event == 11 && e.volume == 10));
        // The RTP side reads back what was written.
        let back = TelephoneEvent::parse(&events[6].to_bytes()).unwrap();
        assert_eq!((back.digit(), back.duration, back.end), (Some('#'), 800, true));
        // The longest press still fits the 16-bit duration; a very short one is just the ends.
        let long = InfoDtmf { key: '1', duration_ms: MAX_DURATION_MS }.telephone_events(8000, 20);
        assert_eq!(long.last().unwrap().duration, 64_000);
        let short = InfoDtmf { key: '1', duration_ms: 10 }.telephone_events(8000, 20);
        assert_eq!(short.len(), 3);
        assert!(short.iter().all(|e| e.end && e.duration == 80));
        assert_eq!(relay_body(&InfoDtmf { key: '#', duration_ms: 100 }), "Signal=#\r\nDuration=100\r\n");
        assert_eq!(
            parse("application/dtmf-relay", relay_body(&InfoDtmf { key: 'A', duration_ms: 90 }).as_bytes())
                .unwrap()
                .key,
            'A'
        );
    }
}
