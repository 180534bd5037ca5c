//! The messages of the Twilio Media Streams WebSocket protocol
//! (<https://www.twilio.com/docs/voice/media-streams/websocket-messages>), as JSON text frames.
//!
//! Why Twilio's protocol: agents already written for it (Pipecat's Twilio serializer and
//! others) connect to the node unchanged. Field names and the quirks are Twilio's: numbers such
//! as `sequenceNumber`, `chunk` and `timestamp` travel as strings; `dtmf.track` is
//! `inbound_track` while `media.track` is `inbound`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `connected` message's protocol name.
pub const PROTOCOL: &str = "Call";
/// The `connected` message's version.
pub const VERSION: &str = "1.0.0";
/// The only audio encoding the protocol carries.
pub const ENCODING_MULAW: &str = "audio/x-mulaw";
/// The track name of the caller's audio in `start.tracks` and `media.track`.
pub const TRACK_INBOUND: &str = "inbound";
/// The track name used in `dtmf` messages.
pub const DTMF_TRACK_INBOUND: &str = "inbound_track";

/// A message from the node to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase", rename_all_fields = "camelCase")]
pub enum OutboundMessage {
    /// First message on the socket.
    Connected {
        /// Always [`PROTOCOL`].
        protocol: String,
        /// Always [`VERSION`].
        version: String,
    },
    /// The stream's metadata, once, right after `connected`.
    Start {
        /// "1": the first numbered message.
        sequence_number: String,
        /// The metadata.
        start: StartInfo,
        /// The stream id.
        stream_sid: String,
    },
    /// 20 ms of caller audio.
    Media {
        /// Message counter.
        sequence_number: String,
        /// The audio.
        media: MediaChunk,
        /// The stream id.
        stream_sid: String,
    },
    /// A key the caller pressed.
    Dtmf {
        /// The stream id.
        stream_sid: String,
        /// Message counter.
        sequence_number: String,
        /// The key.
        dtmf: DtmfInfo,
    },
    /// A mark the agent sent, echoed when the audio queued before it has played.
    Mark {
        /// Message counter.
        sequence_number: String,
        /// The stream id.
        stream_sid: String,
        /// The mark.
        mark: MarkInfo,
    },
    /// The last message: the call is over.
    Stop {
        /// Message counter.
        sequence_number: String,
        /// The stream id.
        stream_sid: String,
        /// Whose stream stopped.
        stop: StopInfo,
    },
}

/// `start.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartInfo {
    /// The account (the node uses one per namespace or deployment; agents only echo it).
    pub account_sid: String,
    /// The stream id (also at top level).
    pub stream_sid: String,
    /// The call id.
    pub call_sid: String,
    /// `["inbound"]`: the node streams the caller's audio.
    pub tracks: Vec<String>,
    /// `from`, `to`, `trunk`, `number`.
    pub custom_parameters: BTreeMap<String, String>,
    /// Always μ-law, 8000 Hz, mono.
    pub media_format: MediaFormat,
}

/// `start.mediaFormat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    /// [`ENCODING_MULAW`].
    pub encoding: String,
    /// 8000.
    pub sample_rate: u32,
    /// 1.
    pub channels: u32,
}

impl Default for MediaFormat {
    fn default() -> Self {
        MediaFormat { encoding: ENCODING_MULAW.into(), sample_rate: 8000, channels: 1 }
    }
}

/// `media.*` from the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaChunk {
    /// [`TRACK_INBOUND`].
    pub track: String,
    /// Chunk counter, from "1".
    pub chunk: String,
    /// Milliseconds since the stream started.
    pub timestamp: String,
    /// Base64 μ-law.
    pub payload: String,
}

/// `dtmf.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DtmfInfo {
    /// [`DTMF_TRACK_INBOUND`].
    pub track: String,
    /// `0`-`9`, `*`, `#`, `A`-`D`.
    pub digit: String,
}

/// `mark.*`, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkInfo {
    /// The agent's label.
    pub name: String,
}

/// `stop.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopInfo {
    /// As in `start`.
    pub account_sid: String,
    /// As in `start`.
    pub call_sid: String,
}

/// A message from the agent, parsed in place: the audio payload borrows from the WebSocket
/// frame (no copy before the base64 decoding, which writes straight into the playback
/// buffer), and the shape is a plain struct rather than an internally tagged enum, which serde
/// would first buffer into a tree of owned values. `streamSid` and unknown fields are ignored
/// (one socket carries one stream); unknown events are ignored by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentMessage<'a> {
    /// `media`, `mark`, `clear`, or an event the node ignores.
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    /// `media.*` of a `media` event.
    #[serde(borrow, default)]
    pub media: Option<InboundMedia<'a>>,
    /// `mark.*` of a `mark` event.
    #[serde(default)]
    pub mark: Option<MarkInfo>,
}

/// `media.*` from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InboundMedia<'a> {
    /// Base64 μ-law, 8 kHz (borrowed unless the JSON escaped a character in it).
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

/// What an agent message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Audio to play to the caller (base64).
    Media(Cow<'a, str>),
    /// Echo this label back when the audio sent before it has played.
    Mark(String),
    /// Drop all buffered audio now (barge-in).
    Clear,
    /// Any other event.
    Other,
}

/// Why an agent message was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// Not JSON, or not of the shape its event needs.
    #[error("invalid message: {0}")]
    Invalid(String),
}

impl<'a> AgentMessage<'a> {
    /// Parses an agent text frame.
    pub fn parse(text: &'a str) -> Result<Inbound<'a>, InboundError> {
        let message: AgentMessage<'a> = serde_json::from_str(text).map_err(|e| InboundError::Invalid(e.to_string()))?;
        let missing = |field: &str| InboundError::Invalid(format!("{} without {field}", message.event));
        match message.event.as_ref() {
            "media" => match message.media {
                Some(media) => Ok(Inbound::Media(media.payload)),
                None => Err(missing("media")),
            },
            "mark" => match message.mark {
                Some(mark) => Ok(Inbound::Mark(mark.name)),
                None => Err(missing("mark")),
            },
            "clear" => Ok(Inbound::Clear),
            _ => Ok(Inbound::Other),
        }
    }
}

/// Writes the text of a caller `media` message into `out` without an intermediate value:
/// `prefix` is [`media_prefix`] of the stream, the numbers are written as Twilio's strings and
/// the audio is base64-encoded in place.
pub fn write_media(out: &mut String, prefix: &str, sequence: u64, chunk: u64, timestamp_ms: u64, audio: &[u8]) {
    use base64::Engine as _;
    out.clear();
    out.reserve(prefix.len() + 96 + audio.len().div_ceil(3) * 4);
    out.push_str(prefix);
    push_decimal(out, sequence);
    out.push_str(r#"","media":{"track":"inbound","chunk":""#);
    push_decimal(out, chunk);
    out.push_str(r#"","timestamp":""#);
    push_decimal(out, timestamp_ms);
    out.push_str(r#"","payload":""#);
    base64::engine::general_purpose::STANDARD.encode_string(audio, out);
    out.push_str(r#""}}"#);
}

/// The constant start of a stream's caller `media` messages, up to the sequence number's
/// digits. The stream id is the node's own (letters and digits), so it needs no escaping; it
/// is escaped anyway through serde for safety.
pub fn media_prefix(stream_sid: &str) -> String {
    let sid = serde_json::to_string(stream_sid).unwrap_or_else(|_| "\"\"".into());
    format!(r#"{{"event":"media","streamSid":{sid},"sequenceNumber":""#)
}

fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn outbound_shapes_match_twilio() {
        let connected = OutboundMessage::Connected { protocol: PROTOCOL.into(), version: VERSION.into() };
        assert_eq!(
            serde_json::to_value(&connected).unwrap(),
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        );
        let start = OutboundMessage::Start {
            sequence_number: "1".into(),
            stream_sid: "MZ1".into(),
            start: StartInfo {
                account_sid: "AC1".into(),
                stream_sid: "MZ1".into(),
                call_sid: "CA1".into(),
                tracks: vec![TRACK_INBOUND.into()],
                custom_parameters: BTreeMap::from([("from".to_string(), "+15550001".to_string())]),
                media_format: MediaFormat::default(),
            },
        };
        assert_eq!(
            serde_json::to_value(&start).unwrap(),
            json!({
                "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                "start": {
                    "accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
                    "customParameters": {"from": "+15550001"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
                }
            })
        );
        let media = media_3_of_mz1();
        assert_eq!(
            serde_json::to_value(&media).unwrap(),
            json!({"event": "media", "sequenceNumber": "3", "streamSid": "MZ1",
                   "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": "AA=="}})
        );
        let dtmf = OutboundMessage::Dtmf {
            stream_sid: "MZ1".into(),
            sequence_number: "4".into(),
            dtmf: DtmfInfo { track: DTMF_TRACK_INBOUND.into(), digit: "7".into() },
        };
        assert_eq!(
            serde_json::to_value(&dtmf).unwrap(),
            json!({"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "4",
                   "dtmf": {"track": "inbound_track", "digit": "7"}})
        );
        let stop = OutboundMessage::Stop {
            sequence_number: "5".into(),
            stream_sid: "MZ1".into(),
            stop: StopInfo { account_sid: "AC1".into(), call_sid: "CA1".into() },
        };
        assert_eq!(
            serde_json::to_value(&stop).unwrap(),
            json!({"event": "stop", "sequenceNumber": "5", "streamSid": "MZ1",
                   "stop": {"accountSid": "AC1", "callSid": "CA1"}})
        );
    }

    #[test]
    fn inbound_messages_parse() {
        let text = r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AAEC"}}"#;
        let media = AgentMessage::parse(text).unwrap();
        assert_eq!(media, Inbound::Media("AAEC".into()));
        assert!(matches!(media, Inbound::Media(Cow::Borrowed(_))), "the payload is not copied");
        // An escaped '/' (some encoders write "\/") still parses.
        let escaped = AgentMessage::parse(r#"{"event":"media","media":{"payload":"ab\/c"}}"#).unwrap();
        assert_eq!(escaped, Inbound::Media("ab/c".into()));
        let mark = AgentMessage::parse(r#"{"event":"mark","mark":{"name":"x"}}"#).unwrap();
        assert_eq!(mark, Inbound::Mark("x".into()));
        let clear = AgentMessage::parse(r#"{"event":"clear","streamSid":"MZ1"}"#).unwrap();
        assert_eq!(clear, Inbound::Clear);
        let other = AgentMessage::parse(r#"{"event":"somethingNew","x":1}"#).unwrap();
        assert_eq!(other, Inbound::Other);
        for bad in [r#"{"event":"media"}"#, r#"{"media":{"payload":""}}"#, "[]", "nope", r#"{"event":"mark"}"#, ""] {
            assert!(AgentMessage::parse(bad).is_err(), "{bad}");
        }
    }

    /// A `media` message: sequence 3 of stream MZ1, chunk 1 at 5 ms, one μ-law byte 0.
    fn media_3_of_mz1() -> OutboundMessage {
        OutboundMessage::Media {
            sequence_number: "3".into(),
            stream_sid: "MZ1".into(),
            media: MediaChunk {
                track: "inbound".into(),
                chunk: "1".into(),
                timestamp: "5".into(),
                payload: "AA==".into(),
            },
        }
    }

    #[test]
    fn media_text_matches_the_serde_shape() {
        let mut out = String::new();
        write_media(&mut out, &media_prefix("MZ1"), 3, 1, 5, &[0]);
        let expected = media_3_of_mz1();
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed, serde_json::to_value(&expected).unwrap());
        write_media(&mut out, &media_prefix("MZ2"), u64::MAX, 0, 1234567890, &[0xFF; 160]);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["sequenceNumber"], u64::MAX.to_string());
        assert_eq!(parsed["media"]["chunk"], "0");
        assert_eq!(parsed["media"]["timestamp"], "1234567890");
    }
}
