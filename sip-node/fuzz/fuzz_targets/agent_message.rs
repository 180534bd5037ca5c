//! Fuzzes the AI agent's WebSocket text frames (Twilio Media Streams messages) as the bridge
//! reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_node_fuzz::protocol::AgentMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = AgentMessage::parse(text);
    }
});
