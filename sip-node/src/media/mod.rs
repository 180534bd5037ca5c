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
//! - [`rx_time`]: kernel receive timestamps, from which the bridge measures the delay it adds.
//! - `sys`: every system call and `unsafe` operation of the media path and the bridge, behind
//!   safe functions (`recvmmsg`, `recvmsg` with timestamps, `setsockopt`, `clock_gettime`).
//!
//! Dependencies run one way: the call layer → [`engine`] → [`relay`] → [`kernel`], [`rtp`],
//! [`rtcp`], [`g711`], [`sdp`] → `sys`. The engine is passed to whoever starts relays (the
//! node's media context); nothing below it reaches for a process-wide one.
//!
//! Nothing here speaks SIP: the call layer feeds SDP bodies in and takes SDP bodies out.

pub mod engine;
pub mod g711;
pub mod kernel;
pub(crate) mod mailbox;
pub mod ports;
pub mod relay;
pub mod rtcp;
pub mod rtp;
pub(crate) mod rx_time;
pub mod sdp;
pub(crate) mod sys;
