//! Media: what the node needs to anchor a call's audio.
//!
//! - [`sdp`]: SDP (RFC 4566) parsing and serialisation, and the offer/answer rules (RFC 3264)
//!   that pick a codec, a direction and the addresses of both legs.
//! - [`ports`]: RTP/RTCP port pairs from the configured range, released when dropped.
//! - [`rtp`]: RTP/RTCP headers (RFC 3550), the stream rewriter that keeps a relayed stream
//!   monotonic across re-INVITEs, and RFC 4733 telephone events (DTMF).
//! - [`g711`]: μ-law and A-law companding and transcoding.
//! - [`rtcp`]: RTCP translated across a call to the SSRCs and numbers the relay rewrites RTP to.
//! - [`relay`]: the per-call RTP relay between two legs, and the caller's leg of an AI bridge
//!   (driven by the bridge's own task).
//! - [`engine`]: the media threads that drive two-leg relays (level-triggered epoll).
//! - [`kernel`]: the engine's fast path, an eBPF program that forwards steady RTP in the kernel.
//! - [`srtp`]: SRTP/SRTCP with SDES keys (`a=crypto`) for one leg: each leg negotiates it under
//!   its trunk's `media.srtp` (`sdp`), the relay runs it as the leg's packet transform.
//! - [`rx_time`]: kernel receive timestamps, from which the bridge measures the delay it adds.
//! - `sys`: every system call and `unsafe` operation of the media path and the bridge, behind
//!   safe functions (`recvmmsg`, `recvmsg` with timestamps, `setsockopt`, `clock_gettime`).
//!
//! Dependencies run one way: the call layer → [`engine`] → [`relay`] → [`kernel`], [`rtp`],
//! [`rtcp`], [`g711`], [`sdp`] → `sys`. The engine is passed to whoever starts relays (the
//! node's media context); nothing below it reaches for a process-wide one.
//!
//! Nothing here speaks SIP: the call layer feeds SDP bodies in and takes SDP bodies out.

// Public: what the node's arguments and media context name (engine, kernel, ports, relay);
// public with the `test-support` feature only: what the tests and benchmarks build packets
// with (g711, rtp); the rest is the crate's own.
pub mod engine;
#[cfg(feature = "test-support")]
pub mod g711;
#[cfg(not(feature = "test-support"))]
#[allow(
    dead_code,
    reason = "the codec functions the node does not call itself (linear encode and decode) are what the tests and benchmarks build audio with"
)]
pub(crate) mod g711;
pub mod kernel;
pub(crate) mod mailbox;
pub mod ports;
pub mod relay;
pub(crate) mod rtcp;
#[cfg(feature = "test-support")]
pub mod rtp;
#[cfg(not(feature = "test-support"))]
#[allow(
    dead_code,
    reason = "a few helpers (RTCP receiver reports, event payloads) only the tests and benchmarks build packets with"
)]
pub(crate) mod rtp;
pub(crate) mod rx_time;
pub(crate) mod sdp;
pub mod srtp;
pub(crate) mod sys;
