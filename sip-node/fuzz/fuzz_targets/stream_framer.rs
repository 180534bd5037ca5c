//! Fuzzes TCP framing as the connection reader drives it: the input arrives in pieces (the
//! first byte says how large), the framer must never claim more bytes than it has or than a
//! message may hold, and the incremental framer (which remembers how far it searched) must
//! split the stream exactly as the stateless one does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_node_fuzz::message::{self, Frame, MAX_MESSAGE_SIZE, StreamFramer};

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else { return };
    let piece = usize::from(piece).max(1);
    let mut framer = StreamFramer::default();
    let mut buf: Vec<u8> = Vec::new();
    let pieces = stream.len().div_ceil(piece);
    for (i, chunk) in stream.chunks(piece).enumerate() {
        let last = i + 1 == pieces;
        buf.extend_from_slice(chunk);
        loop {
            let incremental = framer.next(&buf);
            // Rescanning the whole buffer on every piece would make each input quadratic: the
            // stateless framer checks every decision and the state the input ends in.
            if incremental != Ok(Frame::Partial) || last {
                assert_eq!(incremental, message::frame(&buf), "incremental and stateless framing differ");
            }
            match incremental {
                Ok(Frame::Partial) => break,
                Ok(Frame::Keepalive(n)) => {
                    assert!(n > 0 && n <= buf.len());
                    buf.drain(..n);
                }
                Ok(Frame::Complete(n)) => {
                    assert!(n > 0 && n <= buf.len() && n <= MAX_MESSAGE_SIZE);
                    let _ = message::parse(&buf[..n], true);
                    buf.drain(..n);
                }
                Err(_) => return,
            }
        }
        assert!(buf.len() <= MAX_MESSAGE_SIZE + piece, "a partial message grew past the limit");
    }
});
