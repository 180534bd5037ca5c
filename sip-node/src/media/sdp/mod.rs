//! SDP (RFC 4566) for audio calls, and the offer/answer model (RFC 3264) the node uses to anchor
//! media: every SDP that leaves the node carries the node's own address and an RTP port from
//! its range, so that RTP flows through the relay.
//!
//! Why a parser of our own rather than a crate: the maintained crates are built for WebRTC.
//! `sdp` (webrtc-rs) parses with a strict line-order state machine and refuses transport tokens
//! outside its list, and `webrtc-sdp` (Mozilla, MPL-2.0) validates for JSEP; carrier equipment
//! sends plain RTP/AVP SDP that is occasionally out of order or carries vendor attributes
//! (`a=X-nat`, `a=silenceSupp`, `a=maxptime`). The node needs a dozen lines of the format; this
//! parser keeps every line it does not interpret (attributes, bandwidth, timing) so that a
//! parse/serialise round trip loses nothing, bounds the size of what it reads, and never panics
//! on input from the network.

mod crypto;
mod description;
mod offer_answer;

use std::fmt;

pub use self::description::*;
pub use self::offer_answer::*;

/// Largest SDP body accepted: far beyond any audio offer, small enough to bound the work a
/// hostile peer can cause.
pub const MAX_SDP_LEN: usize = 64 * 1024;
/// Most media sections accepted in one body.
pub const MAX_MEDIA_SECTIONS: usize = 32;
/// The dynamic payload type the node offers for `telephone-event` (the common choice).
pub const TELEPHONE_EVENT_PT: u8 = 101;
/// The packet time the node sends and asks for, in milliseconds (one 160-byte G.711 frame).
pub const DEFAULT_PTIME: u32 = 20;

/// Why an SDP body could not be used. [`SdpError::sip_status`] says which SIP response fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// The body is not UTF-8 text.
    #[error("the SDP body is not UTF-8 text")]
    NotUtf8,
    /// The body is larger than [`MAX_SDP_LEN`].
    #[error("the SDP body has {0} bytes, more than the {MAX_SDP_LEN} accepted")]
    TooLarge(usize),
    /// More media sections than [`MAX_MEDIA_SECTIONS`].
    #[error("the SDP body has more than {MAX_MEDIA_SECTIONS} media sections")]
    TooManyMedia,
    /// A line that does not follow the grammar.
    #[error("SDP line {line}: {reason}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A mandatory line is missing.
    #[error("the SDP body has no {0}= line")]
    Missing(char),
    /// No audio stream that the node can relay (plain RTP/AVP with a non-zero port).
    #[error("the SDP offers no usable audio stream (RTP/AVP)")]
    NoAudio,
    /// Audio is offered, but none of its codecs is allowed on this trunk.
    #[error("no common codec: the SDP offers {offered}, the trunk allows {allowed}")]
    NoCommonCodec {
        /// The offered formats, as written in the SDP.
        offered: String,
        /// The codecs the trunk allows.
        allowed: String,
    },
    /// The audio stream has no connection address (no c= line at either level).
    #[error("the audio stream has no connection address")]
    NoConnection,
    /// The answer does not match the offer (RFC 3264 §6: same media sections in the same order).
    #[error("the answer does not match the offer: {0}")]
    AnswerMismatch(String),
    /// The answerer rejected the audio stream (port 0).
    #[error("the answer rejected the audio stream")]
    AudioRejected,
    /// SRTP could not be agreed on under the leg's trunk policy (`media.srtp`), or an answer's
    /// `a=crypto` does not fit the offer. Never carries key material.
    #[error("SRTP: {0}")]
    Srtp(String),
}

impl SdpError {
    /// The SIP status code to answer an offer that failed this way: 488 Not Acceptable Here
    /// when the SDP is well formed but the media cannot be agreed on, 400 when the body itself
    /// is broken.
    pub fn sip_status(&self) -> u16 {
        match self {
            SdpError::NoAudio
            | SdpError::NoCommonCodec { .. }
            | SdpError::NoConnection
            | SdpError::AnswerMismatch(_)
            | SdpError::AudioRejected
            | SdpError::Srtp(_) => 488,
            _ => 400,
        }
    }
}

/// Whether a side sends and/or receives media on a stream (RFC 3264 §5.1, §8.4). Holding a call
/// is a re-INVITE that changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MediaDirection {
    /// Both ways (the default when no attribute is present).
    #[default]
    SendRecv,
    /// The side only sends (it puts the other side on hold).
    SendOnly,
    /// The side only receives.
    RecvOnly,
    /// Neither way.
    Inactive,
}

impl MediaDirection {
    /// The attribute name.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaDirection::SendRecv => "sendrecv",
            MediaDirection::SendOnly => "sendonly",
            MediaDirection::RecvOnly => "recvonly",
            MediaDirection::Inactive => "inactive",
        }
    }

    /// Parses an attribute name; `None` for any other attribute.
    pub fn from_attribute(name: &str) -> Option<MediaDirection> {
        match name.to_ascii_lowercase().as_str() {
            "sendrecv" => Some(MediaDirection::SendRecv),
            "sendonly" => Some(MediaDirection::SendOnly),
            "recvonly" => Some(MediaDirection::RecvOnly),
            "inactive" => Some(MediaDirection::Inactive),
            _ => None,
        }
    }

    /// Built from the two capabilities.
    pub fn from_flags(sends: bool, receives: bool) -> MediaDirection {
        match (sends, receives) {
            (true, true) => MediaDirection::SendRecv,
            (true, false) => MediaDirection::SendOnly,
            (false, true) => MediaDirection::RecvOnly,
            (false, false) => MediaDirection::Inactive,
        }
    }

    /// Whether this side sends media.
    pub fn sends(self) -> bool {
        matches!(self, MediaDirection::SendRecv | MediaDirection::SendOnly)
    }

    /// Whether this side receives media.
    pub fn receives(self) -> bool {
        matches!(self, MediaDirection::SendRecv | MediaDirection::RecvOnly)
    }

    /// The same stream seen from the other side: what one side sends the other receives. The
    /// answer to a `sendonly` offer is `recvonly`, to `inactive` is `inactive` (RFC 3264 §6.1).
    pub fn reverse(self) -> MediaDirection {
        MediaDirection::from_flags(self.receives(), self.sends())
    }

    /// What both allow: used when the node itself wants less than the peer offers (a hold
    /// relayed from the other leg).
    pub fn intersect(self, other: MediaDirection) -> MediaDirection {
        MediaDirection::from_flags(self.sends() && other.sends(), self.receives() && other.receives())
    }
}

impl fmt::Display for MediaDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests;
