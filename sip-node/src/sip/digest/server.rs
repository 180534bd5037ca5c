//! The server side: issuing nonces and verifying credentials, with replay protection.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hashlink::LruCache;
use hmac::{Hmac, Mac as _};
use rand::Rng as _;
use rsip::headers::UntypedHeader as _;
use rsip::{Header, Request, Uri};
use sha2::{Digest as _, Sha256};

use super::{Algorithm, DigestError, DigestInput, compute_response, parse_digest, quote};

/// Result of [`Challenger::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Credentials are right and the nonce is ours and fresh.
    Ok,
    /// Credentials are right but the nonce is expired (or not one of ours, e.g. issued before
    /// a restart with another secret): re-challenge with `stale=true` so that the client
    /// retries without asking its user ([`Challenger::challenge_stale`]).
    Stale,
    /// No Digest credentials for our realm (RFC 3261 22.3): challenge.
    Missing,
    /// Right credentials whose nonce count was already used with this nonce (a captured
    /// request sent again, RFC 7616 3.4.5): challenge again with a fresh nonce, never admit.
    Replayed,
    /// Credentials for our realm that are wrong (user, password, uri, malformed...): refuse
    /// with 403. The reason is static text, safe to log; it never holds a secret.
    Invalid(&'static str),
}

/// Accepted clock difference between nodes for nonces stamped "in the future".
pub(super) const CLOCK_SKEW_SECS: u64 = 5;

pub(super) type HmacSha256 = Hmac<Sha256>;

/// Default nonce lifetime: a client answers a challenge at once, so a minute is plenty, and it
/// bounds how long a captured answer can be tried against a node that has not seen it.
pub const DEFAULT_NONCE_TTL: Duration = Duration::from_secs(60);

/// How many nonces' counts a node remembers. Entries are made only for credentials that were
/// right, so a stranger cannot fill the cache; at one nonce per call this is far more than
/// the calls a node sets up within [`DEFAULT_NONCE_TTL`].
pub(super) const NONCE_CACHE: usize = 65_536;

/// The nonce of a challenge: issue time (16 hex digits, Unix seconds), 16 random hex digits
/// (so that two challenges of the same second differ and their counts are not confused), and
/// the hex HMAC-SHA256 of both and the realm.
pub(super) const NONCE_LEN: usize = 16 + 16 + 64;

/// Issues and verifies digest challenges. The nonce carries its own issue time and an HMAC
/// under `secret`, so any node holding the secret verifies it without shared state; nodes
/// sharing the secret (`--nonce-secret`) accept each other's nonces.
///
/// Replay: every nonce count accepted is remembered per nonce (a bounded LRU, shared by the
/// clones of one challenger), and an answer whose `nc` is not above the last one accepted for
/// its nonce is [`Verification::Replayed`]. Without `qop` (RFC 2069) a nonce is good once. When
/// the cache has to forget a nonce that could still be fresh, every nonce issued up to then
/// becomes stale, so a forgotten count never lets a replay in. The counts are per node: within
/// the nonce lifetime a captured answer may still be accepted once by another node sharing
/// the secret, which is why the lifetime is short.
#[derive(Clone)]
pub struct Challenger {
    secret: [u8; 32],
    realm: String,
    nonce_ttl: Duration,
    counts: Arc<Mutex<NonceCounts>>,
}

/// Nonce counts seen, by nonce, least recently used first.
pub(super) struct NonceCounts {
    pub(super) seen: LruCache<String, u32>,
    /// Nonces issued at or before this time (Unix seconds) may have been forgotten.
    pub(super) forgotten_up_to: Option<u64>,
}

impl NonceCounts {
    pub(super) fn new() -> NonceCounts {
        NonceCounts { seen: LruCache::new(NONCE_CACHE), forgotten_up_to: None }
    }

    /// Records `nc` for `nonce` (issued at `issued`) if it is above every count seen so far.
    pub(super) fn accept(&mut self, nonce: &str, issued: u64, nc: u32, now_unix: u64, ttl: u64) -> Verification {
        if let Some(last) = self.seen.get_mut(nonce) {
            if nc <= *last {
                return Verification::Replayed;
            }
            *last = nc;
            return Verification::Ok;
        }
        if self.forgotten_up_to.is_some_and(|t| issued <= t) {
            return Verification::Stale;
        }
        if self.seen.len() >= NONCE_CACHE
            && let Some((old, _)) = self.seen.remove_lru()
            && let Some(old_issued) = issued_at(&old)
            && now_unix.saturating_sub(old_issued) <= ttl
        {
            self.forgotten_up_to = Some(self.forgotten_up_to.map_or(old_issued, |t| t.max(old_issued)));
        }
        self.seen.insert(nonce.to_string(), nc);
        Verification::Ok
    }
}

/// The issue time written at the start of a nonce.
pub(super) fn issued_at(nonce: &str) -> Option<u64> {
    u64::from_str_radix(nonce.get(..16)?, 16).ok()
}

/// A 32-byte challenger key from configured secret text (any length): its SHA-256.
pub fn nonce_key(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl fmt::Debug for Challenger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Challenger")
            .field("secret", &"<redacted>")
            .field("realm", &self.realm)
            .field("nonce_ttl", &self.nonce_ttl)
            .finish()
    }
}

impl Challenger {
    /// A challenger for `realm` whose nonces live `nonce_ttl`.
    pub fn new(secret: [u8; 32], realm: String, nonce_ttl: Duration) -> Challenger {
        Challenger { secret, realm, nonce_ttl, counts: Arc::new(Mutex::new(NonceCounts::new())) }
    }

    /// The realm we challenge for.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// A fresh challenge: `WWW-Authenticate` for a UAS/registrar (401), `Proxy-Authenticate`
    /// when `proxy` (407, what a B2BUA answering an INVITE for a trunk uses).
    pub fn challenge(&self, now_unix: u64, proxy: bool) -> Header {
        self.challenge_header(now_unix, proxy, false)
    }

    /// Like [`Challenger::challenge`], with `stale=true` after [`Verification::Stale`].
    pub fn challenge_stale(&self, now_unix: u64, proxy: bool) -> Header {
        self.challenge_header(now_unix, proxy, true)
    }

    pub(super) fn challenge_header(&self, now_unix: u64, proxy: bool, stale: bool) -> Header {
        let realm = quote(&self.realm).unwrap_or_else(|| "\"\"".into());
        let mut value =
            format!("Digest realm={realm}, nonce=\"{}\", qop=\"auth\", algorithm=MD5", self.nonce(now_unix));
        if stale {
            value.push_str(", stale=true");
        }
        if proxy { Header::ProxyAuthenticate(value.into()) } else { Header::WwwAuthenticate(value.into()) }
    }

    pub(super) fn mac(&self, stamp_hex: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(stamp_hex.as_bytes());
        mac.update(b":");
        mac.update(self.realm.as_bytes());
        mac
    }

    pub(super) fn nonce(&self, now_unix: u64) -> String {
        let stamp = format!("{now_unix:016x}{:016x}", rand::rng().random::<u64>());
        let tag = hex::encode(self.mac(&stamp).finalize().into_bytes());
        format!("{stamp}{tag}")
    }

    /// The issue time of `nonce` when it was issued by us (any node with our secret) and is
    /// still fresh.
    pub(super) fn fresh_nonce(&self, nonce: &str, now_unix: u64) -> Option<u64> {
        if nonce.len() != NONCE_LEN || !nonce.is_ascii() {
            return None;
        }
        let (stamp, tag) = nonce.split_at(32);
        let (Some(issued), Ok(tag)) = (issued_at(stamp), hex::decode(tag)) else {
            return None;
        };
        self.mac(stamp).verify_slice(&tag).ok()?;
        let fresh = issued <= now_unix.saturating_add(CLOCK_SKEW_SECS)
            && now_unix.saturating_sub(issued) <= self.nonce_ttl.as_secs();
        fresh.then_some(issued)
    }

    #[cfg(test)]
    pub(super) fn nonce_is_fresh(&self, nonce: &str, now_unix: u64) -> bool {
        self.fresh_nonce(nonce, now_unix).is_some()
    }

    /// Checks the Digest credentials for our realm in `request` (Authorization or
    /// Proxy-Authorization) against `username`/`password`: user, uri (must be the
    /// Request-URI), algorithm, qop, response (compared in constant time), then the nonce.
    pub fn verify(&self, request: &Request, username: &str, password: &str, now_unix: u64) -> Verification {
        let credentials = request
            .headers
            .iter()
            .filter_map(|h| match h {
                Header::Authorization(v) => Some(v.value()),
                Header::ProxyAuthorization(v) => Some(v.value()),
                Header::Other(n, v)
                    if n.eq_ignore_ascii_case("Authorization") || n.eq_ignore_ascii_case("Proxy-Authorization") =>
                {
                    Some(v.as_str())
                }
                _ => None,
            })
            .map(parse_digest)
            .find(|params| match params {
                Ok(params) => params.get("realm") == Some(self.realm.as_str()),
                // Malformed Digest credentials cannot be told apart by realm: they are ours to refuse.
                Err(DigestError::NotDigest) => false,
                Err(_) => true,
            });
        let params = match credentials {
            None => return Verification::Missing,
            Some(Err(_)) => return Verification::Invalid("malformed credentials"),
            Some(Ok(params)) => params,
        };
        let (Some(user), Some(nonce), Some(uri), Some(response)) =
            (params.get("username"), params.get("nonce"), params.get("uri"), params.get("response"))
        else {
            return Verification::Invalid("incomplete credentials");
        };
        if user != username {
            return Verification::Invalid("unknown user");
        }
        let request_uri = request.uri.to_string();
        let same_uri = uri == request_uri || Uri::try_from(uri).is_ok_and(|u| u == request.uri);
        if !same_uri {
            return Verification::Invalid("uri does not match the Request-URI");
        }
        let algorithm = match params.get("algorithm") {
            None => Algorithm::Md5,
            Some(name) => match Algorithm::parse(name) {
                Some(a) => a,
                None => return Verification::Invalid("unsupported algorithm"),
            },
        };
        let cnonce = params.get("cnonce");
        let qop_auth = match params.get("qop") {
            None => None,
            Some(qop) if qop.eq_ignore_ascii_case("auth") => match (params.get("nc"), cnonce) {
                (Some(nc), Some(cnonce)) => Some((nc, cnonce)),
                _ => return Verification::Invalid("qop without nc or cnonce"),
            },
            Some(_) => return Verification::Invalid("unsupported qop"),
        };
        if algorithm.is_sess() && cnonce.is_none() {
            return Verification::Invalid("session algorithm without cnonce");
        }
        let method = request.method.to_string();
        let expected = compute_response(&DigestInput {
            algorithm,
            username,
            realm: &self.realm,
            password,
            method: &method,
            uri,
            nonce,
            qop_auth,
            cnonce: cnonce.unwrap_or_default(),
        });
        if !constant_time_eq(expected.as_bytes(), response.to_ascii_lowercase().as_bytes()) {
            return Verification::Invalid("wrong response");
        }
        let Some(issued) = self.fresh_nonce(nonce, now_unix) else {
            return Verification::Stale;
        };
        // Without qop there is no count: the nonce is good for one request.
        let nc = match qop_auth {
            Some((text, _)) => match u32::from_str_radix(text, 16) {
                Ok(nc) if nc > 0 && text.len() <= 8 => nc,
                _ => return Verification::Invalid("malformed nonce count"),
            },
            None => 1,
        };
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.accept(nonce, issued, nc, now_unix, self.nonce_ttl.as_secs())
    }
}

/// Byte comparison whose time depends only on the lengths.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
