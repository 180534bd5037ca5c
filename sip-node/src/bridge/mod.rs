//! The AI bridge: a call whose route is a WebSocket destination is connected to an AI agent
//! speaking the Twilio Media Streams protocol ([`protocol`]), so that agents written for Twilio
//! work unchanged.
//!
//! The call layer:
//! 1. allocates a port pair, answers the caller's SDP (PCMU/PCMA; the relay transcodes to
//!    μ-law), and starts a bridged relay ([`crate::media::relay::spawn_bridged`]);
//! 2. [`connect`]s to the agent (a timeout bounds it), which sends `connected` and `start`;
//! 3. answers the call (200 OK) once connected, or on the agent's first audio
//!    ([`answer::AgentAnswer`]), and [`AgentConnection::spawn`]s the bridge task
//!    with the relay's channels;
//! 4. ends the call with BYE when [`BridgeHandle::ended`] resolves (the agent went away), or
//!    calls [`BridgeHandle::hangup`] when the caller hangs up (`stop`, then a clean close).
//!
//! Timing: caller audio is forwarded as it arrives (the relay holds at most one frame), agent
//! audio is played from a buffer paced at one 20 ms frame per tick; `clear` empties that buffer
//! at once. That buffer (the agent's playback queue) is the only one that may grow.

mod agent;
pub mod answer;
pub mod protocol;

pub use agent::{
    AgentConnection, BridgeConfig, BridgeEnd, BridgeError, BridgeHandle, BridgeIo, BridgeStats, CallParameters,
    FRAME_BYTES, FRAME_DURATION, connect, new_sid,
};
