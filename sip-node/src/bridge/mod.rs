//! The AI bridge: a call whose route is a WebSocket destination is connected to an AI agent
//! speaking the Twilio Media Streams protocol ([`protocol`]), so that agents written for Twilio
//! work unchanged.
//!
//! The call layer:
//! 1. allocates a port pair and answers the caller's SDP (PCMU/PCMA; the bridge transcodes to
//!    μ-law);
//! 2. [`connect`]s to the agent (a timeout bounds it), which sends `connected` and `start`;
//! 3. [`AgentConnection::spawn`]s the bridge task, which owns both the caller's RTP leg and
//!    the WebSocket, and answers the call (200 OK) at once, or on the agent's first audio
//!    ([`answer::AgentAnswer`]);
//! 4. ends the call with BYE when [`BridgeHandle::ended`] resolves (the agent went away), or
//!    calls [`BridgeHandle::hangup`] when the caller hangs up (`stop`, then a clean close).
//!
//! Timing: caller audio is forwarded as it arrives (at most one frame waits for the WebSocket), agent
//! audio is played from a buffer paced at one 20 ms frame per tick; `clear` empties that buffer
//! at once. That buffer (the agent's playback queue) is the only one that may grow. The delay
//! the bridge adds is measured on every frame, from the kernel's receive timestamps
//! ([`latency`]).

mod agent;
pub mod answer;
pub mod latency;
pub(crate) mod protocol;
mod stream;
pub mod tls;

pub use agent::{
    AgentConnection, BridgeConfig, BridgeEnd, BridgeError, BridgeHandle, BridgeStats, CallParameters, FRAME_BYTES,
    FRAME_DURATION, connect, new_sid,
};
pub use latency::BridgeLatency;
pub use tls::{AgentTls, AgentTlsError};
