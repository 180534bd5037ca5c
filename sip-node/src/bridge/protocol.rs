//! The messages of the Twilio Media Streams WebSocket protocol
//! (<https://www.twilio.com/docs/voice/media-streams/websocket-messages>), as JSON text frames.
//!
//! Why Twilio's protocol: agents already written for it (Pipecat's Twilio serializer and
//! others) connect to the node unchanged. Field names and the quirks are Twilio's: numbers such
//! as `sequenceNumber`, `chunk` and `timestamp` travel as strings; `dtmf.track` is
//! `inbound_track` while `media.track` is `inbound`.

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

/// A message from the agent. Unknown events parse as [`InboundMessage::Other`] and are
/// ignored; `streamSid` is accepted but not checked (one socket carries one stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase", rename_all_fields = "camelCase")]
pub enum InboundMessage {
    /// Audio to play to the caller.
    Media {
        /// The stream id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream_sid: Option<String>,
        /// The audio.
        media: InboundMedia,
    },
    /// Echo this label back when the audio sent before it has played.
    Mark {
        /// The stream id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream_sid: Option<String>,
        /// The label.
        mark: MarkInfo,
    },
    /// Drop all buffered audio now (barge-in).
    Clear {
        /// The stream id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream_sid: Option<String>,
    },
    /// Any other event.
    #[serde(other)]
    Other,
}

/// `media.*` from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMedia {
    /// Base64 μ-law, 8 kHz.
    pub payload: String,
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
        let media = OutboundMessage::Media {
            sequence_number: "3".into(),
            stream_sid: "MZ1".into(),
            media: MediaChunk {
                track: "inbound".into(),
                chunk: "1".into(),
                timestamp: "5".into(),
                payload: "AA==".into(),
            },
        };
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
        let media: InboundMessage =
            serde_json::from_str(r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AAEC"}}"#).unwrap();
        assert_eq!(
            media,
            InboundMessage::Media { stream_sid: Some("MZ1".into()), media: InboundMedia { payload: "AAEC".into() } }
        );
        let mark: InboundMessage = serde_json::from_str(r#"{"event":"mark","mark":{"name":"x"}}"#).unwrap();
        assert_eq!(mark, InboundMessage::Mark { stream_sid: None, mark: MarkInfo { name: "x".into() } });
        let clear: InboundMessage = serde_json::from_str(r#"{"event":"clear","streamSid":"MZ1"}"#).unwrap();
        assert_eq!(clear, InboundMessage::Clear { stream_sid: Some("MZ1".into()) });
        let other: InboundMessage = serde_json::from_str(r#"{"event":"somethingNew","x":1}"#).unwrap();
        assert_eq!(other, InboundMessage::Other);
        for bad in [r#"{"event":"media"}"#, r#"{"media":{"payload":""}}"#, "[]", "nope", r#"{"event":"mark"}"#] {
            assert!(serde_json::from_str::<InboundMessage>(bad).is_err(), "{bad}");
        }
    }
}
