//! SDES key exchange (RFC 4568): `a=crypto:<tag> <suite> inline:<key||salt>[|<lifetime>][|<MKI>:<len>]`.
//!
//! Parsing is strict about what the node can honour and lenient about the rest: a line with an
//! unknown suite, several keys, an MKI, or session parameters is not usable (the next line is
//! tried), never a panic. Keys come from the OS's random source and are never logged (`Debug`
//! leaves them out).
//!
//! This file depends on nothing else of the node (the fuzz crate compiles it on its own, for
//! the SDP target).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A trunk's `media.srtp`: whether its legs must, may or must not use SRTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrtpPolicy {
    /// Only `RTP/SAVP` with a usable `a=crypto`; a plain offer is refused (488).
    Required,
    /// SRTP when the peer offers it, plain RTP otherwise.
    Optional,
    /// Plain RTP only; an `RTP/SAVP`-only offer is refused (488).
    Off,
}

/// The keys of one SRTP leg, as offer/answer agreed on them: the node's (`local`, what it
/// encrypts with) and the peer's (`remote`). `Debug` shows tags and suites only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrtpKeys {
    pub local: CryptoAttr,
    pub remote: CryptoAttr,
}

/// Master key and salt lengths of the AES-CM-128 suites (RFC 3711 §8.2).
const KEY_LEN: usize = 16;
const SALT_LEN: usize = 14;

/// The SDES crypto suites the node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    AesCm128HmacSha1_80,
    AesCm128HmacSha1_32,
}

impl Suite {
    pub fn as_str(self) -> &'static str {
        match self {
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    fn parse(text: &str) -> Option<Suite> {
        match text {
            "AES_CM_128_HMAC_SHA1_80" => Some(Suite::AesCm128HmacSha1_80),
            "AES_CM_128_HMAC_SHA1_32" => Some(Suite::AesCm128HmacSha1_32),
            _ => None,
        }
    }
}

/// Why an `a=crypto` value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("a=crypto is not `<tag> <suite> inline:<key>`")]
    Malformed,
    #[error("a=crypto tag is not a number of at most 9 digits")]
    Tag,
    #[error("crypto suite {0:?} is not supported (AES_CM_128_HMAC_SHA1_80 or _32)")]
    Suite(String),
    #[error("a=crypto key is not one inline: base64 key of 30 bytes")]
    Key,
    #[error("a=crypto with an MKI or several keys is not supported")]
    Mki,
    #[error("a=crypto session parameters ({0}) are not supported")]
    SessionParams(String),
}

/// One `a=crypto` attribute (its value, after `a=crypto:`).
#[derive(Clone, PartialEq, Eq)]
pub struct CryptoAttr {
    tag: u32,
    suite: Suite,
    key_salt: [u8; KEY_LEN + SALT_LEN],
}

impl std::fmt::Debug for CryptoAttr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoAttr").field("tag", &self.tag).field("suite", &self.suite).finish_non_exhaustive()
    }
}

impl CryptoAttr {
    /// Parses the value of an `a=crypto` attribute.
    pub fn parse(value: &str) -> Result<CryptoAttr, CryptoError> {
        let mut fields = value.split_ascii_whitespace();
        let (Some(tag), Some(suite), Some(key_params)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(CryptoError::Malformed);
        };
        if tag.is_empty() || tag.len() > 9 || !tag.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CryptoError::Tag);
        }
        let tag: u32 = tag.parse().map_err(|_| CryptoError::Tag)?;
        let suite = Suite::parse(suite).ok_or_else(|| CryptoError::Suite(suite.chars().take(64).collect()))?;
        let session: Vec<&str> = fields.collect();
        if !session.is_empty() {
            return Err(CryptoError::SessionParams(session.join(" ").chars().take(64).collect()));
        }
        if key_params.contains(';') {
            return Err(CryptoError::Mki);
        }
        let inline = key_params.strip_prefix("inline:").ok_or(CryptoError::Malformed)?;
        let mut parts = inline.split('|');
        let key = parts.next().ok_or(CryptoError::Key)?;
        for part in parts {
            // A lifetime (`2^31` or decimal) is fine; an MKI (`1:4`) is not.
            if part.contains(':') {
                return Err(CryptoError::Mki);
            }
        }
        let bytes = STANDARD.decode(key).map_err(|_| CryptoError::Key)?;
        let key_salt: [u8; KEY_LEN + SALT_LEN] = bytes.try_into().map_err(|_| CryptoError::Key)?;
        Ok(CryptoAttr { tag, suite, key_salt })
    }

    /// A fresh key for `suite` under `tag` (the answer reuses the offer's tag, RFC 4568 §5.1.2).
    pub fn generate(tag: u32, suite: Suite) -> CryptoAttr {
        CryptoAttr { tag, suite, key_salt: rand::random() }
    }

    /// The attribute value, to write after `a=crypto:`.
    pub fn value(&self) -> String {
        format!("{} {} inline:{}", self.tag, self.suite.as_str(), STANDARD.encode(self.key_salt))
    }

    pub fn tag(&self) -> u32 {
        self.tag
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    pub(super) fn key(&self) -> &[u8] {
        &self.key_salt[..KEY_LEN]
    }

    pub(super) fn salt(&self) -> &[u8] {
        &self.key_salt[KEY_LEN..]
    }
}

/// What one leg's media will be, decided from the peer's offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegMedia {
    /// Plain RTP (`RTP/AVP`).
    Plain,
    /// SRTP: the peer's key (`remote`) and the node's answer (`local`, same tag and suite).
    Srtp { remote: CryptoAttr, local: CryptoAttr },
}

/// Why an offer cannot be answered under the trunk's policy (the call gets `488`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the trunk requires SRTP (media.srtp: required) and the offer is plain RTP")]
    SrtpRequired,
    #[error("the offer is SRTP only and the trunk has media.srtp: off")]
    SrtpOff,
    #[error("no usable a=crypto in the SRTP offer: {0}")]
    NoUsableCrypto(String),
}

/// Answers one offered audio stream: `profile` is its m= line's proto (`RTP/AVP`, `RTP/SAVP`),
/// `crypto` the values of its `a=crypto` lines in the offer's order of preference. The first
/// usable line wins.
pub fn negotiate(policy: SrtpPolicy, profile: &str, crypto: &[&str]) -> Result<LegMedia, Refused> {
    let secure = profile.eq_ignore_ascii_case("RTP/SAVP");
    match (policy, secure) {
        (SrtpPolicy::Off, true) => Err(Refused::SrtpOff),
        (SrtpPolicy::Off, false) | (SrtpPolicy::Optional, false) => Ok(LegMedia::Plain),
        (SrtpPolicy::Required, false) => Err(Refused::SrtpRequired),
        (SrtpPolicy::Required | SrtpPolicy::Optional, true) => {
            let mut last = CryptoError::Malformed;
            for value in crypto {
                match CryptoAttr::parse(value) {
                    Ok(remote) => {
                        let local = CryptoAttr::generate(remote.tag, remote.suite);
                        return Ok(LegMedia::Srtp { remote, local });
                    }
                    Err(error) => last = error,
                }
            }
            Err(Refused::NoUsableCrypto(last.to_string()))
        }
    }
}
