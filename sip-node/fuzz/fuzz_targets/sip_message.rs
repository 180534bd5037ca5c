//! Fuzzes the path every network byte takes: stream framing, parsing (with compact headers,
//! folding, Content-Length checks), the 400 builder for what does not parse, and, for what
//! parses, serialization with the body passed through unchanged (the SDP pass-through).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_node_fuzz::message::{self, Incoming};

fuzz_target!(|data: &[u8]| {
    let _ = message::frame(data);
    for stream in [false, true] {
        match message::parse(data, stream) {
            Ok(Incoming::Message(parsed)) => {
                let body = parsed.body().clone();
                let bytes = message::encode(&parsed);
                // What we parsed and re-encode must parse again with the same body.
                if let Ok(Incoming::Message(again)) = message::parse(&bytes, false) {
                    assert_eq!(again.body(), &body);
                }
            }
            Ok(Incoming::UnknownMethod { .. }) => {}
            Err(error) => {
                let _ = message::bad_request(data, &error);
            }
        }
    }
});
