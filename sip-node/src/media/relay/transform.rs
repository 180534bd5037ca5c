//! A per-leg packet transform: what a leg does to the bytes on the wire beyond the relay's own
//! rewriting. A plain RTP leg has none. SRTP (RFC 3711) is the one this hook is for: a leg that
//! negotiated it unprotects every datagram it receives before the relay looks at it, and
//! protects every packet the relay sends to it after the relay rewrote the header (numbers and
//! SSRC change across the relay, so the protection cannot be passed through).
//!
//! Where it runs: the two-leg relay (`two_leg`: RTP and RTCP, both ways) and the caller's leg of
//! a bridged call (`bridged`: what the caller sends, and the agent's frames towards the caller).
//! Only user space runs transforms: a direction with a transform on either leg is never
//! offloaded to the kernel (`offload`), which forwards plain RTP only.
//!
//! A leg's transform is its `RtpLeg::transform`: an SRTP leg's media (its `LegMedia::srtp`
//! keys) gives it [`SrtpLeg`] ([`for_media`]), a plain leg none.

use super::leg::RtpLeg;
use super::{Counters, LegMedia, bump};
use crate::media::srtp::SrtpLeg;
use crate::media::sys::DATAGRAM_MAX;

/// Room a transform may add to a packet it protects (SRTP adds a 4-byte MKI at most and a
/// 10-byte authentication tag; SRTCP a 4-byte index and the tag).
pub(crate) const TRANSFORM_HEADROOM: usize = 32;

/// The receive buffer a two-leg relay is handed: a whole datagram, and room for the transform
/// of the leg it is relayed to.
pub(crate) const RECEIVE_BUFFER: usize = DATAGRAM_MAX + TRANSFORM_HEADROOM;

/// What a leg does to its packets on the wire (see the module doc).
pub(crate) trait PacketTransform: Send {
    /// A datagram received from the leg (RTCP when `rtcp`), turned into the plain packet in
    /// place. Returns the plain packet's length (at most `packet.len()`), or `None` to drop it
    /// (counted as invalid: it failed authentication, say).
    fn inbound(&mut self, packet: &mut [u8], rtcp: bool) -> Option<usize>;

    /// A plain packet about to be sent to the leg, `buf[..len]`, protected in place; `buf` has
    /// at least [`TRANSFORM_HEADROOM`] bytes beyond `len`. Returns the length to send (at most
    /// `buf.len()`), or `None` to drop the packet (counted as not relayed).
    fn outbound(&mut self, buf: &mut [u8], len: usize, rtcp: bool) -> Option<usize>;
}

/// The transform of a leg with this media: SRTP when it has keys. Keys that webrtc-srtp
/// refuses (it never does for the two suites parsed) leave the leg without media rather than
/// plain: logged, and every packet dropped.
pub(super) fn for_media(media: &LegMedia) -> Option<Box<dyn PacketTransform>> {
    let keys = media.srtp.as_ref()?;
    match SrtpLeg::new(&keys.local, &keys.remote) {
        Ok(leg) => Some(Box::new(leg)),
        Err(error) => {
            tracing::error!(%error, "cannot set up the leg's SRTP; its packets are dropped");
            Some(Box::new(DropAll))
        }
    }
}

/// A leg whose protection could not be set up: nothing in, nothing out.
struct DropAll;

impl PacketTransform for DropAll {
    fn inbound(&mut self, _packet: &mut [u8], _rtcp: bool) -> Option<usize> {
        None
    }

    fn outbound(&mut self, _buf: &mut [u8], _len: usize, _rtcp: bool) -> Option<usize> {
        None
    }
}

impl PacketTransform for SrtpLeg {
    fn inbound(&mut self, packet: &mut [u8], rtcp: bool) -> Option<usize> {
        let plain = if rtcp { self.unprotect_rtcp(packet) } else { self.unprotect_rtp(packet) }?;
        let out = packet.get_mut(..plain.len())?;
        out.copy_from_slice(&plain);
        Some(plain.len())
    }

    fn outbound(&mut self, buf: &mut [u8], len: usize, rtcp: bool) -> Option<usize> {
        let plain = buf.get(..len)?;
        let protected = if rtcp { self.protect_rtcp(plain) } else { self.protect_rtp(plain) }?;
        let out = buf.get_mut(..protected.len())?;
        out.copy_from_slice(&protected);
        Some(protected.len())
    }
}

impl<S> RtpLeg<S> {
    /// A datagram received from this leg, through its transform. `None`: dropped and counted
    /// (as invalid, and as an SRTP rejection).
    pub(super) fn inbound(&mut self, packet: &mut [u8], rtcp: bool, counters: &Counters) -> Option<usize> {
        let Some(transform) = &mut self.transform else { return Some(packet.len()) };
        match transform.inbound(packet, rtcp) {
            Some(len) if len <= packet.len() => Some(len),
            _ => {
                bump(&counters.dropped_invalid, 1);
                bump(&counters.srtp_rejected, 1);
                None
            }
        }
    }

    /// A packet `buf[..len]` to be sent to this leg, through its transform; the length to send.
    /// `None`: the transform refused it (the caller counts it).
    pub(super) fn outbound(&mut self, buf: &mut [u8], len: usize, rtcp: bool) -> Option<usize> {
        let Some(transform) = &mut self.transform else { return Some(len) };
        transform.outbound(buf, len, rtcp).filter(|&sent| sent <= buf.len())
    }
}
