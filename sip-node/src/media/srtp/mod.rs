//! SRTP with SDES keys (RFC 3711, RFC 4568): the `a=crypto` attributes of an SDP offer or
//! answer ([`sdes`]), and one leg's protection ([`SrtpLeg`]): decrypting what the leg's peer
//! sends, encrypting what the node sends it, RTP and RTCP (SRTCP) alike.
//!
//! The cryptography is `webrtc-srtp` (the webrtc-rs project's SRTP, pure Rust on the RustCrypto
//! AES-CTR, HMAC-SHA1 and AES-GCM implementations). Chosen over libsrtp2 through a binding
//! crate because it builds from crates.io alone (no Debian `libsrtp2-dev`, no bindgen, no C in
//! the node beside the eBPF program), it is kept as part of a maintained WebRTC stack, and it
//! does both suites SDES carriers offer (`AES_CM_128_HMAC_SHA1_80` and `_32`) with replay
//! protection per SSRC. libsrtp2 is faster per packet; the relay's figure decides whether that
//! matters.
//!
//! Where it is used: each leg negotiates on its own under its trunk's `media.srtp`
//! (`media::sdp`'s offers and answers carry the `a=crypto` lines, [`sdes::negotiate`] decides),
//! and the relay runs an SRTP leg through [`SrtpLeg`] as the leg's packet transform
//! (`media::relay::transform`). An SRTP leg is relayed in user space: the kernel forwarder only
//! copies plain RTP.

pub mod sdes;

#[cfg(test)]
mod tests;

use bytes::Bytes;
use webrtc_srtp::context::Context;
use webrtc_srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use webrtc_srtp::protection_profile::ProtectionProfile;

pub use sdes::{CryptoAttr, SrtpKeys, SrtpPolicy, Suite};

/// Packets of reordering the replay check tolerates (RFC 3711 §3.3.2's minimum).
const REPLAY_WINDOW: usize = 64;

impl From<switchboard_model::SrtpMode> for SrtpPolicy {
    fn from(mode: switchboard_model::SrtpMode) -> SrtpPolicy {
        match mode {
            switchboard_model::SrtpMode::Required => SrtpPolicy::Required,
            switchboard_model::SrtpMode::Optional => SrtpPolicy::Optional,
            switchboard_model::SrtpMode::Disabled => SrtpPolicy::Off,
        }
    }
}

/// Why SRTP could not be set up. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    #[error("SRTP context: {0}")]
    Context(String),
}

/// One leg's SRTP state: keys the peer encrypts with (inbound) and the node's (outbound).
pub struct SrtpLeg {
    inbound: Context,
    outbound: Context,
    /// Packets from the peer that failed authentication or replay checks (dropped).
    pub rejected: u64,
}

impl std::fmt::Debug for SrtpLeg {
    /// Counters only; never the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpLeg").field("rejected", &self.rejected).finish_non_exhaustive()
    }
}

impl SrtpLeg {
    /// A leg where the peer sends with `remote`'s key and the node with `local`'s (the two
    /// `a=crypto` lines of one offer/answer, same suite).
    pub fn new(local: &CryptoAttr, remote: &CryptoAttr) -> Result<SrtpLeg, SrtpError> {
        // Replay protection on what arrives (webrtc-srtp has none unless asked), RFC 3711's
        // default window of 64 packets.
        let inbound = Context::new(
            remote.key(),
            remote.salt(),
            profile(remote.suite()),
            Some(srtp_replay_protection(REPLAY_WINDOW)),
            Some(srtcp_replay_protection(REPLAY_WINDOW)),
        )
        .map_err(|e| SrtpError::Context(e.to_string()))?;
        let outbound = Context::new(local.key(), local.salt(), profile(local.suite()), None, None)
            .map_err(|e| SrtpError::Context(e.to_string()))?;
        Ok(SrtpLeg { inbound, outbound, rejected: 0 })
    }

    /// The plain RTP packet of an SRTP packet from the peer; `None` (counted) when it does not
    /// authenticate (wrong key, tampering) or is a replay.
    pub fn unprotect_rtp(&mut self, packet: &[u8]) -> Option<Bytes> {
        let plain = self.inbound.decrypt_rtp(packet).ok();
        self.count(plain)
    }

    /// The plain RTCP packet of an SRTCP packet from the peer; `None` (counted) as for RTP.
    pub fn unprotect_rtcp(&mut self, packet: &[u8]) -> Option<Bytes> {
        let plain = self.inbound.decrypt_rtcp(packet).ok();
        self.count(plain)
    }

    /// An RTP packet for the peer, encrypted and authenticated; `None` when it is not RTP.
    pub fn protect_rtp(&mut self, packet: &[u8]) -> Option<Bytes> {
        self.outbound.encrypt_rtp(packet).ok()
    }

    /// An RTCP packet for the peer as SRTCP; `None` when it is not RTCP.
    pub fn protect_rtcp(&mut self, packet: &[u8]) -> Option<Bytes> {
        self.outbound.encrypt_rtcp(packet).ok()
    }

    fn count(&mut self, plain: Option<Bytes>) -> Option<Bytes> {
        if plain.is_none() {
            self.rejected += 1;
        }
        plain
    }
}

fn profile(suite: Suite) -> ProtectionProfile {
    match suite {
        Suite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        Suite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
    }
}
