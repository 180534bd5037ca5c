//! The node's modules that read network input, compiled on their own for the fuzz targets.
//!
//! Each is the node's source file itself (`#[path]`), not a copy: they depend on nothing else
//! of the node, so the fuzz build needs only their small dependencies, not Postgres, DNS, HTTP
//! or the BPF program, and builds in a fraction of the time.
#![allow(dead_code, clippy::all)]

#[path = "../../src/sip/message/mod.rs"]
pub mod message;

#[path = "../../src/sip/digest/mod.rs"]
pub mod digest;

#[path = "../../src/media/sdp/mod.rs"]
pub mod sdp;

/// What `sdp` uses of the node's `media` besides itself: the SDES attributes and negotiation.
pub mod media {
    pub mod srtp {
        #[path = "../../../../src/media/srtp/sdes.rs"]
        pub mod sdes;
    }
}

#[path = "../../src/media/rtp/mod.rs"]
pub mod rtp;

// Uses `super::rtp`, which is the module above.
#[path = "../../src/media/rtcp.rs"]
pub mod rtcp;

#[path = "../../src/bridge/protocol.rs"]
pub mod protocol;
