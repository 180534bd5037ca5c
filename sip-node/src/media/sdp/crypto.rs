//! SDES (RFC 4568) in offer/answer: which audio section the node takes from an offer under a
//! leg's SRTP policy, the `a=crypto` lines of the node's offers and answers, and the keys a
//! leg's SRTP runs with once both sides have spoken.
//!
//! Offers the node makes, by policy:
//! - `required`: `RTP/SAVP` with two `a=crypto` lines (tag 1 `AES_CM_128_HMAC_SHA1_80`, tag 2
//!   `_32`): an answerer that cannot do SRTP rejects the stream and the attempt fails.
//! - `optional`: `RTP/AVP` with the same `a=crypto` lines, the best-effort SRTP that SIP phones
//!   and SBCs (Asterisk, FreeSWITCH, Cisco) send and accept: an answer with `a=crypto` turns
//!   the leg to SRTP, one without keeps it plain. (RFC 4568 ties `a=crypto` to `RTP/SAVP`; a
//!   second `RTP/SAVP` section as in RFC 5939's capability negotiation is not understood by
//!   most carriers.)
//! - `disabled`: plain `RTP/AVP`, no `a=crypto`.
//!
//! The node's own keys are in its offer: the answer's tag picks which line (and so which
//! suite) the leg uses, and the keys are read back from the offer the node sent.

use super::SdpError;
use super::description::{Attribute, MediaDescription, SessionDescription};
use crate::media::srtp::sdes::{CryptoAttr, LegMedia, SrtpKeys, SrtpPolicy, Suite, negotiate};

/// The suites the node offers, in its order of preference, with their tags.
const OFFERED: [(u32, Suite); 2] = [(1, Suite::AesCm128HmacSha1_80), (2, Suite::AesCm128HmacSha1_32)];

/// Whether a section is SRTP by its profile.
pub(super) fn is_savp(media: &MediaDescription) -> bool {
    media.protocol.eq_ignore_ascii_case("RTP/SAVP")
}

/// The values of a section's `a=crypto` lines, in order.
fn crypto_values(media: &MediaDescription) -> Vec<&str> {
    media
        .attributes
        .iter()
        .filter(|a| a.name.eq_ignore_ascii_case("crypto"))
        .filter_map(|a| a.value.as_deref())
        .collect()
}

/// The audio section of an offer the node answers under `policy`: with SRTP required the first
/// `RTP/SAVP` one, with SRTP disabled the first plain one, else (or when there is no such
/// section) the first audio section of any profile, which the answer then refuses or accepts.
pub(super) fn audio_index_for(offer: &SessionDescription, policy: SrtpPolicy) -> Option<usize> {
    let active = |m: &MediaDescription| m.port != 0 && m.is_rtp_audio();
    let preferred = match policy {
        SrtpPolicy::Required => offer.media.iter().position(|m| active(m) && is_savp(m)),
        SrtpPolicy::Off => offer.media.iter().position(|m| active(m) && !is_savp(m)),
        SrtpPolicy::Optional => None,
    };
    preferred.or_else(|| offer.audio_index())
}

/// What the node's answer to `offered` does about SRTP: the keys of the leg (`None`: plain RTP)
/// and the `a=crypto` line to put in the answer. A best-effort offer (`RTP/AVP` with
/// `a=crypto`) is taken as SRTP when the policy allows it.
pub(super) fn answer(policy: SrtpPolicy, offered: &MediaDescription) -> Result<Option<SrtpKeys>, SdpError> {
    let crypto = crypto_values(offered);
    let profile = if !is_savp(offered) && policy != SrtpPolicy::Off && !crypto.is_empty() {
        // Best effort SRTP: answer it as SRTP, or as plain when no line is usable.
        match negotiate(policy, "RTP/SAVP", &crypto) {
            Ok(LegMedia::Srtp { remote, local }) => return Ok(Some(SrtpKeys { local, remote })),
            _ if policy == SrtpPolicy::Optional => return Ok(None),
            _ => "RTP/SAVP",
        }
    } else {
        offered.protocol.as_str()
    };
    match negotiate(policy, profile, &crypto).map_err(|e| SdpError::Srtp(e.to_string()))? {
        LegMedia::Plain => Ok(None),
        LegMedia::Srtp { remote, local } => Ok(Some(SrtpKeys { local, remote })),
    }
}

/// The profile and `a=crypto` attributes of an offer under `policy` (fresh keys each time).
pub(super) fn offer(policy: SrtpPolicy) -> (&'static str, Vec<Attribute>) {
    let lines =
        || OFFERED.iter().map(|(tag, suite)| Attribute::value("crypto", CryptoAttr::generate(*tag, *suite).value()));
    match policy {
        SrtpPolicy::Required => ("RTP/SAVP", lines().collect()),
        SrtpPolicy::Optional => ("RTP/AVP", lines().collect()),
        SrtpPolicy::Off => ("RTP/AVP", vec![]),
    }
}

/// The keys of a leg from the node's offer and the peer's answer: the answer's `a=crypto` names
/// one of the offer's tags (same suite), whose key is the node's. `None`: plain RTP (an offer
/// without `a=crypto`, or a best-effort offer answered without it).
pub(super) fn from_answer(
    offered: &MediaDescription,
    answered: &MediaDescription,
) -> Result<Option<SrtpKeys>, SdpError> {
    let ours = crypto_values(offered);
    if ours.is_empty() {
        if !crypto_values(answered).is_empty() || is_savp(answered) {
            return Err(SdpError::Srtp("the answer is SRTP and the node offered plain RTP".into()));
        }
        return Ok(None);
    }
    let theirs = crypto_values(answered);
    let Some(value) = theirs.first() else {
        if is_savp(offered) {
            return Err(SdpError::Srtp("the node offered RTP/SAVP only and the answer has no a=crypto".into()));
        }
        return Ok(None);
    };
    if theirs.len() > 1 {
        return Err(SdpError::Srtp("the answer has more than one a=crypto".into()));
    }
    let remote = CryptoAttr::parse(value).map_err(|e| SdpError::Srtp(format!("answer: {e}")))?;
    let local = ours
        .iter()
        .filter_map(|v| CryptoAttr::parse(v).ok())
        .find(|l| l.tag() == remote.tag() && l.suite() == remote.suite())
        .ok_or_else(|| {
            SdpError::Srtp(format!(
                "the answer's a=crypto tag {} ({}) was not offered",
                remote.tag(),
                remote.suite().as_str()
            ))
        })?;
    Ok(Some(SrtpKeys { local, remote }))
}
