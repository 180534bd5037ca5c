//! Digest authentication (RFC 2617/7616/8760 as used by SIP, RFC 3261 section 22).
//!
//! Client side: [`answer_challenge`] turns a 401/407 into the `Authorization` or
//! `Proxy-Authorization` header of the retried request. Server side: [`Challenger`] issues
//! nonces that carry their own issue time and an HMAC (any node holding the secret verifies
//! them), and verifies credentials, remembering the nonce counts it accepted so that a replayed
//! answer is challenged again.
//!
//! The challenge and credentials parsers are our own: they accept quoted strings with escapes
//! and commas, parameter names in any case, extra spaces and unknown parameters, and return an
//! error (never panic) on anything else. Passwords are only ever hashed: they are not kept,
//! logged, or put in errors.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hashlink::LruCache;

use hmac::{Hmac, Mac as _};
use md5::{Digest as _, Md5};
use rand::Rng as _;
use rsip::headers::UntypedHeader as _;
use rsip::{Header, Method, Request, Response, Uri};
use sha2::{Sha256, Sha512_256};

/// Why a challenge could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The response is not a 401 or 407.
    #[error("status {0} is not an authentication challenge")]
    NotAChallenge(u16),
    /// A 401 without WWW-Authenticate or a 407 without Proxy-Authenticate.
    #[error("the challenge carries no authenticate header")]
    NoChallenge,
    /// Only non-Digest schemes (Basic, ...) were offered.
    #[error("no Digest challenge offered")]
    NotDigest,
    /// The header does not follow the auth-param grammar.
    #[error("malformed digest header: {0}")]
    Malformed(&'static str),
    /// A parameter the computation needs is absent.
    #[error("digest challenge lacks the {0} parameter")]
    MissingParam(&'static str),
    /// An algorithm we do not implement (the name is truncated).
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The server offers only qop values we do not implement (auth-int).
    #[error("unsupported qop {0:?}")]
    UnsupportedQop(String),
    /// The username cannot be put in a header (control characters).
    #[error("username contains characters that cannot be sent")]
    InvalidCredentials,
}

/// Digest algorithms: MD5 (RFC 2617, the default), SHA-256 and SHA-512/256 (RFC 7616/8760),
/// each with its `-sess` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Md5,
    Md5Sess,
    Sha256,
    Sha256Sess,
    Sha512_256,
    Sha512_256Sess,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Algorithm> {
        const ALL: [(&str, Algorithm); 6] = [
            ("MD5", Algorithm::Md5),
            ("MD5-sess", Algorithm::Md5Sess),
            ("SHA-256", Algorithm::Sha256),
            ("SHA-256-sess", Algorithm::Sha256Sess),
            ("SHA-512-256", Algorithm::Sha512_256),
            ("SHA-512-256-sess", Algorithm::Sha512_256Sess),
        ];
        ALL.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.trim())).map(|(_, a)| *a)
    }

    fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Md5Sess => "MD5-sess",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha256Sess => "SHA-256-sess",
            Algorithm::Sha512_256 => "SHA-512-256",
            Algorithm::Sha512_256Sess => "SHA-512-256-sess",
        }
    }

    fn is_sess(self) -> bool {
        matches!(self, Algorithm::Md5Sess | Algorithm::Sha256Sess | Algorithm::Sha512_256Sess)
    }

    /// Lower-case hex digest of `data`.
    fn hash(self, data: &str) -> String {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => hex::encode(Md5::digest(data.as_bytes())),
            Algorithm::Sha256 | Algorithm::Sha256Sess => hex::encode(Sha256::digest(data.as_bytes())),
            Algorithm::Sha512_256 | Algorithm::Sha512_256Sess => hex::encode(Sha512_256::digest(data.as_bytes())),
        }
    }
}

/// The inputs of a digest response computation.
struct DigestInput<'a> {
    algorithm: Algorithm,
    username: &'a str,
    realm: &'a str,
    password: &'a str,
    method: &'a str,
    uri: &'a str,
    nonce: &'a str,
    /// `Some((nc, cnonce))` with qop=auth; `None` for RFC 2069 style.
    qop_auth: Option<(&'a str, &'a str)>,
    /// Needed by `-sess` algorithms even without qop.
    cnonce: &'a str,
}

/// RFC 2617 3.2.2 / RFC 7616 3.4.1 response (qop=auth or none).
fn compute_response(input: &DigestInput<'_>) -> String {
    let alg = input.algorithm;
    let mut ha1 = alg.hash(&format!("{}:{}:{}", input.username, input.realm, input.password));
    if alg.is_sess() {
        ha1 = alg.hash(&format!("{ha1}:{}:{}", input.nonce, input.cnonce));
    }
    let ha2 = alg.hash(&format!("{}:{}", input.method, input.uri));
    match input.qop_auth {
        Some((nc, cnonce)) => alg.hash(&format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", input.nonce)),
        None => alg.hash(&format!("{ha1}:{}:{ha2}", input.nonce)),
    }
}

/// Parsed auth-params of a Digest challenge or credentials header, names lower-cased, values
/// unquoted; the first occurrence of a name wins.
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Parses `Digest name=value, name="quoted, value", ...`. Returns `NotDigest` for other
/// schemes. Parsing stops at a token not followed by `=` (the start of another challenge in
/// the same header value).
fn parse_digest(value: &str) -> Result<Params, DigestError> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Err(DigestError::NotDigest);
    }
    let mut params = Params::default();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=' && *c != ',') {
            name.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            // Another scheme's challenge begins, or junk: keep what we have.
            break;
        }
        if name.is_empty() {
            return Err(DigestError::Malformed("parameter without a name"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(DigestError::Malformed("unterminated quoted string")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(DigestError::Malformed("unterminated quoted string")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != ',') {
                value.push(c);
            }
        }
        if value.chars().any(char::is_control) {
            return Err(DigestError::Malformed("control character in a parameter"));
        }
        let name = name.to_ascii_lowercase();
        if params.get(&name).is_none() {
            params.0.push((name, value));
        }
    }
    Ok(params)
}

/// A quoted-string (RFC 3261 25.1) holding `value`; `None` if it has control characters.
fn quote(value: &str) -> Option<String> {
    if value.chars().any(char::is_control) {
        return None;
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Some(out)
}

/// A challenge we can answer.
struct Challenge {
    realm: String,
    nonce: String,
    opaque: Option<String>,
    algorithm: Algorithm,
    qop_auth: bool,
}

impl Challenge {
    fn from_params(params: &Params) -> Result<Challenge, DigestError> {
        let realm = params.get("realm").ok_or(DigestError::MissingParam("realm"))?.to_string();
        let nonce = params.get("nonce").ok_or(DigestError::MissingParam("nonce"))?.to_string();
        let algorithm = match params.get("algorithm") {
            None => Algorithm::Md5,
            Some(name) => Algorithm::parse(name)
                .ok_or_else(|| DigestError::UnsupportedAlgorithm(name.chars().take(32).collect()))?,
        };
        let qop_auth = match params.get("qop") {
            None => false,
            Some(list) => {
                if !list.split(',').any(|q| q.trim().eq_ignore_ascii_case("auth")) {
                    return Err(DigestError::UnsupportedQop(list.chars().take(32).collect()));
                }
                true
            }
        };
        Ok(Challenge { realm, nonce, opaque: params.get("opaque").map(str::to_string), algorithm, qop_auth })
    }
}

/// Answers a 401 (with `Authorization`) or 407 (with `Proxy-Authorization`) for a retry of a
/// request with `method` and Request-URI `uri`.
///
/// The first WWW-/Proxy-Authenticate Digest challenge we can answer is used (RFC 8760 2.4:
/// topmost supported algorithm first). Supported: MD5 (default), MD5-sess, SHA-256,
/// SHA-512-256 and their -sess forms; qop=auth (random cnonce, `nc` as 8 hex digits) or no qop
/// (RFC 2069); opaque is echoed. `nc` counts the uses of the same nonce, starting at 1.
pub fn answer_challenge(
    challenge: &Response,
    method: &Method,
    uri: &Uri,
    username: &str,
    password: &str,
    nc: u32,
) -> Result<Header, DigestError> {
    let cnonce = hex::encode(rand::rng().random::<[u8; 8]>());
    answer_with_cnonce(challenge, method, uri, username, password, nc, &cnonce)
}

fn answer_with_cnonce(
    challenge: &Response,
    method: &Method,
    uri: &Uri,
    username: &str,
    password: &str,
    nc: u32,
    cnonce: &str,
) -> Result<Header, DigestError> {
    let code = challenge.status_code.code();
    let proxy = match code {
        401 => false,
        407 => true,
        _ => return Err(DigestError::NotAChallenge(code)),
    };
    let name = if proxy { "Proxy-Authenticate" } else { "WWW-Authenticate" };
    let values = challenge.headers.iter().filter_map(|h| match h {
        Header::WwwAuthenticate(v) if !proxy => Some(v.value()),
        Header::ProxyAuthenticate(v) if proxy => Some(v.value()),
        Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(v.as_str()),
        _ => None,
    });
    let mut first_error = None;
    let mut chosen = None;
    for value in values {
        match parse_digest(value).and_then(|params| Challenge::from_params(&params)) {
            Ok(c) => {
                chosen = Some(c);
                break;
            }
            Err(e) => {
                // A Digest problem says more than "not Digest" from another header.
                if first_error.is_none() || first_error == Some(DigestError::NotDigest) {
                    first_error = Some(e);
                }
            }
        }
    }
    let challenge = match chosen {
        Some(c) => c,
        None => return Err(first_error.unwrap_or(DigestError::NoChallenge)),
    };

    let uri = uri.to_string();
    let nc = format!("{nc:08x}");
    let method = method.to_string();
    let response = compute_response(&DigestInput {
        algorithm: challenge.algorithm,
        username,
        realm: &challenge.realm,
        password,
        method: &method,
        uri: &uri,
        nonce: &challenge.nonce,
        qop_auth: challenge.qop_auth.then_some((nc.as_str(), cnonce)),
        cnonce,
    });
    let q = |v: &str| quote(v).ok_or(DigestError::Malformed("control character in a parameter"));
    let mut value = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, response=\"{response}\", algorithm={}",
        quote(username).ok_or(DigestError::InvalidCredentials)?,
        q(&challenge.realm)?,
        q(&challenge.nonce)?,
        q(&uri)?,
        challenge.algorithm.name(),
    );
    if challenge.qop_auth || challenge.algorithm.is_sess() {
        value.push_str(&format!(", cnonce={}", q(cnonce)?));
    }
    if challenge.qop_auth {
        value.push_str(&format!(", qop=auth, nc={nc}"));
    }
    if let Some(opaque) = &challenge.opaque {
        value.push_str(&format!(", opaque={}", q(opaque)?));
    }
    Ok(if proxy { Header::ProxyAuthorization(value.into()) } else { Header::Authorization(value.into()) })
}

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
const CLOCK_SKEW_SECS: u64 = 5;

type HmacSha256 = Hmac<Sha256>;

/// Default nonce lifetime: a client answers a challenge at once, so a minute is plenty, and it
/// bounds how long a captured answer can be tried against a node that has not seen it.
pub const DEFAULT_NONCE_TTL: Duration = Duration::from_secs(60);

/// How many nonces' counts a node remembers. Entries are made only for credentials that were
/// right, so a stranger cannot fill the cache; at one nonce per call this is far more than
/// the calls a node sets up within [`DEFAULT_NONCE_TTL`].
const NONCE_CACHE: usize = 65_536;

/// The nonce of a challenge: issue time (16 hex digits, Unix seconds), 16 random hex digits
/// (so that two challenges of the same second differ and their counts are not confused), and
/// the hex HMAC-SHA256 of both and the realm.
const NONCE_LEN: usize = 16 + 16 + 64;

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
struct NonceCounts {
    seen: LruCache<String, u32>,
    /// Nonces issued at or before this time (Unix seconds) may have been forgotten.
    forgotten_up_to: Option<u64>,
}

impl NonceCounts {
    fn new() -> NonceCounts {
        NonceCounts { seen: LruCache::new(NONCE_CACHE), forgotten_up_to: None }
    }

    /// Records `nc` for `nonce` (issued at `issued`) if it is above every count seen so far.
    fn accept(&mut self, nonce: &str, issued: u64, nc: u32, now_unix: u64, ttl: u64) -> Verification {
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
fn issued_at(nonce: &str) -> Option<u64> {
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

    fn challenge_header(&self, now_unix: u64, proxy: bool, stale: bool) -> Header {
        let realm = quote(&self.realm).unwrap_or_else(|| "\"\"".into());
        let mut value =
            format!("Digest realm={realm}, nonce=\"{}\", qop=\"auth\", algorithm=MD5", self.nonce(now_unix));
        if stale {
            value.push_str(", stale=true");
        }
        if proxy { Header::ProxyAuthenticate(value.into()) } else { Header::WwwAuthenticate(value.into()) }
    }

    fn mac(&self, stamp_hex: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(stamp_hex.as_bytes());
        mac.update(b":");
        mac.update(self.realm.as_bytes());
        mac
    }

    fn nonce(&self, now_unix: u64) -> String {
        let stamp = format!("{now_unix:016x}{:016x}", rand::rng().random::<u64>());
        let tag = hex::encode(self.mac(&stamp).finalize().into_bytes());
        format!("{stamp}{tag}")
    }

    /// The issue time of `nonce` when it was issued by us (any node with our secret) and is
    /// still fresh.
    fn fresh_nonce(&self, nonce: &str, now_unix: u64) -> Option<u64> {
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
    fn nonce_is_fresh(&self, nonce: &str, now_unix: u64) -> bool {
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn challenge_response(code: u16, headers: Vec<Header>) -> Response {
        Response { status_code: code.into(), version: rsip::Version::V2, headers: headers.into(), body: Vec::new() }
    }

    fn www(value: &str) -> Header {
        Header::WwwAuthenticate(value.into())
    }

    fn uri(text: &str) -> Uri {
        Uri::try_from(text).unwrap()
    }

    fn value(header: &Header) -> String {
        match header {
            Header::Authorization(v) => v.value().to_string(),
            Header::ProxyAuthorization(v) => v.value().to_string(),
            Header::WwwAuthenticate(v) => v.value().to_string(),
            Header::ProxyAuthenticate(v) => v.value().to_string(),
            other => panic!("unexpected header {other:?}"),
        }
    }

    fn invite_with(uri_text: &str, auth: Option<Header>) -> Request {
        let mut headers: Vec<Header> = vec![
            Header::Via("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1".into()),
            Header::From("<sip:alice@a.example.com>;tag=1".into()),
            Header::To("<sip:bob@b.example.com>".into()),
            Header::CallId("d1".into()),
            Header::CSeq("2 INVITE".into()),
        ];
        headers.extend(auth);
        Request {
            method: Method::Invite,
            uri: uri(uri_text),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: vec![],
        }
    }

    fn challenger() -> Challenger {
        Challenger::new([7; 32], "switchboard".into(), Duration::from_secs(300))
    }

    #[test]
    fn rfc2617_example_vector() {
        let response = compute_response(&DigestInput {
            algorithm: Algorithm::Md5,
            username: "Mufasa",
            realm: "testrealm@host.com",
            password: "Circle Of Life",
            method: "GET",
            uri: "/dir/index.html",
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            qop_auth: Some(("00000001", "0a4f113b")),
            cnonce: "0a4f113b",
        });
        assert_eq!(response, "6629fae49393a05397450978507c4ef1");
    }

    #[test]
    fn rfc7616_example_vectors_md5_and_sha256() {
        let input = |algorithm| DigestInput {
            algorithm,
            username: "Mufasa",
            realm: "http-auth@example.org",
            password: "Circle of Life",
            method: "GET",
            uri: "/dir/index.html",
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            qop_auth: Some(("00000001", "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")),
            cnonce: "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        };
        assert_eq!(compute_response(&input(Algorithm::Md5)), "8ca523f5e9506fed4657c9700eebdbec");
        assert_eq!(
            compute_response(&input(Algorithm::Sha256)),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn answer_with_qop_auth_quotes_and_echoes_opaque() {
        let resp = challenge_response(
            401,
            vec![www(
                r#"Digest realm="sip, \"carrier\"", qop="auth,auth-int", NONCE="abc,def", opaque="op=1", algorithm=md5"#,
            )],
        );
        let header =
            answer_with_cnonce(&resp, &Method::Register, &uri("sip:registrar.example.com"), "alice", "pw", 1, "c0ffee")
                .unwrap();
        assert!(matches!(header, Header::Authorization(_)));
        let text = value(&header);
        let expected = compute_response(&DigestInput {
            algorithm: Algorithm::Md5,
            username: "alice",
            realm: "sip, \"carrier\"",
            password: "pw",
            method: "REGISTER",
            uri: "sip:registrar.example.com",
            nonce: "abc,def",
            qop_auth: Some(("00000001", "c0ffee")),
            cnonce: "c0ffee",
        });
        assert_eq!(
            text,
            format!(
                r#"Digest username="alice", realm="sip, \"carrier\"", nonce="abc,def", uri="sip:registrar.example.com", response="{expected}", algorithm=MD5, cnonce="c0ffee", qop=auth, nc=00000001, opaque="op=1""#
            )
        );
        // Our own parser reads back what we wrote.
        let params = parse_digest(&text).unwrap();
        assert_eq!(params.get("realm"), Some("sip, \"carrier\""));
        assert_eq!(params.get("nc"), Some("00000001"));
        assert!(!text.contains("pw"));
    }

    #[test]
    fn answer_without_qop_is_rfc2069_style() {
        let resp = challenge_response(401, vec![www(r#"Digest realm="r", nonce="n""#)]);
        let header = answer_challenge(&resp, &Method::Invite, &uri("sip:bob@b.example.com"), "u", "p", 1).unwrap();
        let text = value(&header);
        let ha1 = hex::encode(Md5::digest(b"u:r:p"));
        let ha2 = hex::encode(Md5::digest(b"INVITE:sip:bob@b.example.com"));
        let expected = hex::encode(Md5::digest(format!("{ha1}:n:{ha2}").as_bytes()));
        assert!(text.contains(&format!("response=\"{expected}\"")), "{text}");
        assert!(!text.contains("qop") && !text.contains("cnonce") && !text.contains("nc="), "{text}");
    }

    #[test]
    fn proxy_challenge_yields_proxy_authorization_and_nc_is_hex() {
        let resp = challenge_response(
            407,
            vec![Header::ProxyAuthenticate(r#"Digest realm="r", nonce="n", qop="auth""#.into())],
        );
        let header = answer_challenge(&resp, &Method::Invite, &uri("sip:1555@gw.example.com"), "u", "p", 26).unwrap();
        assert!(matches!(header, Header::ProxyAuthorization(_)));
        let text = value(&header);
        assert!(text.contains("nc=0000001a"), "{text}");
        let cnonce = parse_digest(&text).unwrap().get("cnonce").unwrap().to_string();
        assert_eq!(cnonce.len(), 16);
        // A 407 with only WWW-Authenticate has no usable challenge.
        let wrong = challenge_response(407, vec![www(r#"Digest realm="r", nonce="n""#)]);
        assert_eq!(
            answer_challenge(&wrong, &Method::Invite, &uri("sip:a@b"), "u", "p", 1),
            Err(DigestError::NoChallenge)
        );
    }

    #[test]
    fn sha256_and_sess_algorithms() {
        let resp = challenge_response(
            401,
            vec![
                www(r#"Digest realm="r", nonce="n", algorithm=SHA-256, qop="auth""#),
                www(r#"Digest realm="r", nonce="n", algorithm=MD5, qop="auth""#),
            ],
        );
        let text = value(&answer_with_cnonce(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1, "cc").unwrap());
        assert!(text.contains("algorithm=SHA-256"), "topmost supported challenge wins: {text}");
        let response = parse_digest(&text).unwrap().get("response").unwrap().to_string();
        assert_eq!(response.len(), 64);
        let resp = challenge_response(401, vec![www(r#"Digest realm="r", nonce="n", algorithm=MD5-sess"#)]);
        let text = value(&answer_with_cnonce(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1, "cc").unwrap());
        let ha1 = hex::encode(Md5::digest(format!("{}:n:cc", hex::encode(Md5::digest(b"u:r:p"))).as_bytes()));
        let ha2 = hex::encode(Md5::digest(b"INVITE:sip:a@b"));
        let expected = hex::encode(Md5::digest(format!("{ha1}:n:{ha2}").as_bytes()));
        assert!(text.contains(&expected) && text.contains("cnonce=\"cc\"") && text.contains("algorithm=MD5-sess"));
        // An unsupported algorithm first, a supported one after: the supported one is used.
        let resp = challenge_response(
            401,
            vec![www(r#"Digest realm="r", nonce="n", algorithm=AKAv1-MD5"#), www(r#"Digest realm="r", nonce="n""#)],
        );
        assert!(answer_challenge(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1).is_ok());
    }

    #[test]
    fn challenge_errors() {
        let call = |resp: &Response| answer_challenge(resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1);
        assert_eq!(call(&challenge_response(200, vec![])), Err(DigestError::NotAChallenge(200)));
        assert_eq!(call(&challenge_response(401, vec![])), Err(DigestError::NoChallenge));
        assert_eq!(call(&challenge_response(401, vec![www("Basic realm=\"x\"")])), Err(DigestError::NotDigest));
        assert_eq!(
            call(&challenge_response(401, vec![www("Digest nonce=\"n\"")])),
            Err(DigestError::MissingParam("realm"))
        );
        assert_eq!(
            call(&challenge_response(401, vec![www("Digest realm=\"r\"")])),
            Err(DigestError::MissingParam("nonce"))
        );
        assert_eq!(
            call(&challenge_response(401, vec![www("Digest realm=r, nonce=n, algorithm=AKAv1-MD5")])),
            Err(DigestError::UnsupportedAlgorithm("AKAv1-MD5".into()))
        );
        assert_eq!(
            call(&challenge_response(401, vec![www("Digest realm=r, nonce=n, qop=\"auth-int\"")])),
            Err(DigestError::UnsupportedQop("auth-int".into()))
        );
        assert!(matches!(
            call(&challenge_response(401, vec![www("Digest realm=\"r, nonce=n")])),
            Err(DigestError::Malformed(_))
        ));
        // Basic first, a bad Digest second: the Digest error is reported.
        assert_eq!(
            call(&challenge_response(401, vec![www("Basic realm=x"), www("Digest realm=r")])),
            Err(DigestError::MissingParam("nonce"))
        );
        let ok = challenge_response(401, vec![www("Digest realm=r, nonce=n")]);
        assert_eq!(
            answer_challenge(&ok, &Method::Invite, &uri("sip:a@b"), "bad\r\nname", "p", 1),
            Err(DigestError::InvalidCredentials)
        );
    }

    #[test]
    fn parser_tolerates_odd_but_legal_forms() {
        let p = parse_digest("digest   REALM = \"r\" ,nonce=n,,  qop=\"auth\" , stale=FALSE, x=\"\"").unwrap();
        assert_eq!(p.get("realm"), Some("r"));
        assert_eq!(p.get("nonce"), Some("n"));
        assert_eq!(p.get("qop"), Some("auth"));
        assert_eq!(p.get("stale"), Some("FALSE"));
        assert_eq!(p.get("x"), Some(""));
        // A second challenge in the same value stops the first one's params.
        let p = parse_digest("Digest realm=a, nonce=b, Digest realm=c").unwrap();
        assert_eq!(p.get("realm"), Some("a"));
        assert_eq!(parse_digest("Digest").unwrap().0.len(), 0);
        assert_eq!(parse_digest("Digest realm=a, realm=b").unwrap().get("realm"), Some("a"));
    }

    #[test]
    fn garbage_never_panics() {
        let samples = [
            "",
            " ",
            "Digest",
            "Digest =",
            "Digest ===",
            "Digest a=\"",
            "Digest a=\"\\",
            "Digest a=\"\\\"",
            "Digest ,,,,",
            "Digest a=b=c",
            "Digest \u{0}=\u{1}",
            "Digest ünï=\"cödé\", realm=\"ä\", nonce=\"ö\"",
            "Digest realm=\"r\nx\", nonce=n",
            "Digest realm=\"r\", nonce=\"n\", algorithm=\"\"",
            "Digest realm=\"r\", nonce=\"n\", qop=",
        ];
        for sample in samples {
            let resp = challenge_response(401, vec![www(sample)]);
            let _ = answer_challenge(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1);
            let request = invite_with("sip:a@b", Some(Header::Authorization(sample.into())));
            let _ = challenger().verify(&request, "u", "p", NOW);
        }
        let mut rng = StdRng::seed_from_u64(2617);
        let alphabet: Vec<char> = "Digest realm nonce=\"\\,; \t=qop auth MD5-sess é\u{0}".chars().collect();
        for _ in 0..5000 {
            let len = rng.random_range(0..60);
            let sample: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            let _ = parse_digest(&sample);
            let resp = challenge_response(407, vec![Header::ProxyAuthenticate(sample.clone().into())]);
            let _ = answer_challenge(&resp, &Method::Invite, &uri("sip:a@b"), "u", "p", 1);
            let request = invite_with("sip:a@b", Some(Header::ProxyAuthorization(sample.into())));
            let _ = challenger().verify(&request, "u", "p", NOW);
        }
    }

    #[test]
    fn challenger_headers() {
        let c = challenger();
        let header = c.challenge(NOW, true);
        assert!(matches!(header, Header::ProxyAuthenticate(_)));
        let text = value(&header);
        let params = parse_digest(&text).unwrap();
        assert_eq!(params.get("realm"), Some("switchboard"));
        assert_eq!(params.get("qop"), Some("auth"));
        assert_eq!(params.get("algorithm"), Some("MD5"));
        assert_eq!(params.get("stale"), None);
        let nonce = params.get("nonce").unwrap();
        assert_eq!(nonce.len(), NONCE_LEN);
        assert_ne!(params.get("nonce"), parse_digest(&value(&c.challenge(NOW, true))).unwrap().get("nonce"));
        assert!(nonce.starts_with(&format!("{NOW:016x}")));
        assert!(c.nonce_is_fresh(nonce, NOW));
        assert!(matches!(c.challenge(NOW, false), Header::WwwAuthenticate(_)));
        assert!(value(&c.challenge_stale(NOW, false)).ends_with(", stale=true"));
        assert!(!format!("{c:?}").contains("7, 7"), "secret is redacted");
    }

    /// A client answer to the challenger's own challenge, for `method`/`uri`.
    fn answered(c: &Challenger, issued: u64, uri_text: &str, user: &str, password: &str) -> Request {
        let resp = challenge_response(407, vec![c.challenge(issued, true)]);
        let header = answer_challenge(&resp, &Method::Invite, &uri(uri_text), user, password, 1).unwrap();
        invite_with(uri_text, Some(header))
    }

    #[test]
    fn client_answer_is_verified() {
        let c = challenger();
        let request = answered(&c, NOW, "sip:+15551234567@switchboard.example.com;user=phone", "trunk1", "s3cret");
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 10), Verification::Ok);
        // Also through WWW-Authenticate / Authorization.
        let resp = challenge_response(401, vec![c.challenge(NOW, false)]);
        let header = answer_challenge(&resp, &Method::Invite, &uri("sip:b@x"), "trunk1", "s3cret", 1).unwrap();
        assert_eq!(c.verify(&invite_with("sip:b@x", Some(header)), "trunk1", "s3cret", NOW), Verification::Ok);
    }

    #[test]
    fn wrong_password_user_or_uri_is_invalid() {
        let c = challenger();
        let request = answered(&c, NOW, "sip:b@x", "trunk1", "wrong");
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW), Verification::Invalid("wrong response"));
        let request = answered(&c, NOW, "sip:b@x", "trunk1", "s3cret");
        assert_eq!(c.verify(&request, "trunk2", "s3cret", NOW), Verification::Invalid("unknown user"));
        let mut moved = request.clone();
        moved.uri = uri("sip:c@x");
        assert_eq!(
            c.verify(&moved, "trunk1", "s3cret", NOW),
            Verification::Invalid("uri does not match the Request-URI")
        );
        // A tampered response of the right length is still wrong.
        let text = value(request.headers.iter().last().unwrap());
        let at = text.find("response=\"").unwrap() + "response=\"".len();
        let flipped = if &text[at..at + 1] == "0" { "1" } else { "0" };
        let tampered = format!("{}{flipped}{}", &text[..at], &text[at + 1..]);
        let request = invite_with("sip:b@x", Some(Header::ProxyAuthorization(tampered.into())));
        assert!(matches!(c.verify(&request, "trunk1", "s3cret", NOW), Verification::Invalid(_)));
    }

    #[test]
    fn expired_or_foreign_nonce_is_stale_when_the_password_is_right() {
        let c = challenger();
        let request = answered(&c, NOW, "sip:b@x", "trunk1", "s3cret");
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 300), Verification::Ok);
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 301), Verification::Stale);
        // Issued "in the future" beyond the skew allowance.
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW - 60), Verification::Stale);
        // Another secret (restart without a shared secret): stale, not forbidden.
        let other = Challenger::new([9; 32], "switchboard".into(), Duration::from_secs(300));
        assert_eq!(other.verify(&request, "trunk1", "s3cret", NOW), Verification::Stale);
        // But an expired nonce with a wrong password is refused.
        let request = answered(&c, NOW, "sip:b@x", "trunk1", "bad");
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 1000), Verification::Invalid("wrong response"));
    }

    #[test]
    fn verify_without_qop_and_with_uppercase_hex() {
        let c = challenger();
        let nonce = c.nonce(NOW);
        let response = compute_response(&DigestInput {
            algorithm: Algorithm::Md5,
            username: "u",
            realm: "switchboard",
            password: "p",
            method: "INVITE",
            uri: "sip:b@x",
            nonce: &nonce,
            qop_auth: None,
            cnonce: "",
        });
        let header = format!(
            "Digest username=\"u\", realm=\"switchboard\", nonce=\"{nonce}\", uri=\"sip:b@x\", response=\"{}\"",
            response.to_uppercase()
        );
        let request = invite_with("sip:b@x", Some(Header::Authorization(header.into())));
        assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Ok);
    }

    #[test]
    fn missing_and_malformed_credentials() {
        let c = challenger();
        assert_eq!(c.verify(&invite_with("sip:b@x", None), "u", "p", NOW), Verification::Missing);
        let other_realm = Header::ProxyAuthorization(
            "Digest username=\"u\", realm=\"carrier\", nonce=\"n\", uri=\"sip:b@x\", response=\"00\"".into(),
        );
        assert_eq!(c.verify(&invite_with("sip:b@x", Some(other_realm)), "u", "p", NOW), Verification::Missing);
        let basic = Header::Authorization("Basic dTpw".into());
        assert_eq!(c.verify(&invite_with("sip:b@x", Some(basic)), "u", "p", NOW), Verification::Missing);
        let broken = Header::Authorization("Digest username=\"u".into());
        assert_eq!(
            c.verify(&invite_with("sip:b@x", Some(broken)), "u", "p", NOW),
            Verification::Invalid("malformed credentials")
        );
        let incomplete = Header::Authorization("Digest username=\"u\", realm=\"switchboard\"".into());
        assert_eq!(
            c.verify(&invite_with("sip:b@x", Some(incomplete)), "u", "p", NOW),
            Verification::Invalid("incomplete credentials")
        );
        let int = Header::Authorization(
            format!(
                "Digest username=\"u\", realm=\"switchboard\", nonce=\"{}\", uri=\"sip:b@x\", response=\"00\", qop=auth-int, nc=00000001, cnonce=\"c\"",
                c.nonce(NOW)
            )
            .into(),
        );
        assert_eq!(
            c.verify(&invite_with("sip:b@x", Some(int)), "u", "p", NOW),
            Verification::Invalid("unsupported qop")
        );
    }

    /// Issue 19 item 5: a captured answer sent again is challenged, not admitted.
    #[test]
    fn the_same_answer_twice_is_a_replay() {
        let c = challenger();
        let request = answered(&c, NOW, "sip:b@x", "trunk1", "s3cret");
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 1), Verification::Ok);
        assert_eq!(c.verify(&request, "trunk1", "s3cret", NOW + 2), Verification::Replayed);
        // Clones (the node's tasks) share the counts.
        assert_eq!(c.clone().verify(&request, "trunk1", "s3cret", NOW + 2), Verification::Replayed);
        // Without qop a nonce is good once.
        let nonce = c.nonce(NOW);
        let response = compute_response(&DigestInput {
            algorithm: Algorithm::Md5,
            username: "u",
            realm: "switchboard",
            password: "p",
            method: "INVITE",
            uri: "sip:b@x",
            nonce: &nonce,
            qop_auth: None,
            cnonce: "",
        });
        let header = format!(
            "Digest username=\"u\", realm=\"switchboard\", nonce=\"{nonce}\", uri=\"sip:b@x\", response=\"{response}\""
        );
        let request = invite_with("sip:b@x", Some(Header::Authorization(header.into())));
        assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Ok);
        assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Replayed);
    }

    #[test]
    fn increasing_nonce_counts_are_accepted_and_going_back_is_a_replay() {
        let c = challenger();
        let resp = challenge_response(407, vec![c.challenge(NOW, true)]);
        let with_nc = |nc| {
            let header = answer_challenge(&resp, &Method::Invite, &uri("sip:b@x"), "u", "p", nc).unwrap();
            invite_with("sip:b@x", Some(header))
        };
        assert_eq!(c.verify(&with_nc(1), "u", "p", NOW), Verification::Ok);
        assert_eq!(c.verify(&with_nc(2), "u", "p", NOW), Verification::Ok);
        assert_eq!(c.verify(&with_nc(5), "u", "p", NOW), Verification::Ok);
        assert_eq!(c.verify(&with_nc(3), "u", "p", NOW), Verification::Replayed);
        assert_eq!(c.verify(&with_nc(5), "u", "p", NOW), Verification::Replayed);
        assert_eq!(c.verify(&with_nc(6), "u", "p", NOW), Verification::Ok);
        // Another nonce has its own count.
        let request = answered(&c, NOW, "sip:b@x", "u", "p");
        assert_eq!(c.verify(&request, "u", "p", NOW), Verification::Ok);
        // A count of zero or past 8 hex digits is not a count.
        let zero = value(with_nc(7).headers.iter().last().unwrap()).replace("nc=00000007", "nc=00000000");
        let request = invite_with("sip:b@x", Some(Header::ProxyAuthorization(zero.into())));
        assert!(matches!(c.verify(&request, "u", "p", NOW), Verification::Invalid(_)));
    }

    #[test]
    fn nodes_sharing_a_secret_accept_each_others_nonces() {
        let ttl = DEFAULT_NONCE_TTL;
        let a = Challenger::new(nonce_key(b"shared secret"), "switchboard".into(), ttl);
        let b = Challenger::new(nonce_key(b"shared secret"), "switchboard".into(), ttl);
        let other = Challenger::new(nonce_key(b"another secret"), "switchboard".into(), ttl);
        let request = answered(&a, NOW, "sip:b@x", "u", "p");
        assert_eq!(b.verify(&request, "u", "p", NOW + 1), Verification::Ok);
        assert_eq!(other.verify(&request, "u", "p", NOW + 1), Verification::Stale);
        assert_eq!(a.verify(&request, "u", "p", NOW + ttl.as_secs() + 1), Verification::Stale);
    }

    #[test]
    fn a_full_cache_forgets_counts_only_by_making_their_nonces_stale() {
        let mut counts = NonceCounts::new();
        let nonce = |issued: u64, i: usize| format!("{issued:016x}{i:016x}");
        assert_eq!(counts.accept(&nonce(NOW, 0), NOW, 1, NOW, 60), Verification::Ok);
        for i in 1..NONCE_CACHE {
            assert_eq!(counts.accept(&nonce(NOW + 1, i), NOW + 1, 1, NOW + 1, 60), Verification::Ok);
        }
        assert_eq!(counts.seen.len(), NONCE_CACHE);
        // One more pushes out the least recently used (the first), which was still fresh.
        assert_eq!(counts.accept(&nonce(NOW + 2, 0), NOW + 2, 1, NOW + 2, 60), Verification::Ok);
        assert_eq!(counts.seen.len(), NONCE_CACHE);
        assert_eq!(counts.accept(&nonce(NOW, 0), NOW, 1, NOW + 2, 60), Verification::Stale);
        // Newer nonces are unaffected.
        assert_eq!(counts.accept(&nonce(NOW + 2, 0), NOW + 2, 1, NOW + 2, 60), Verification::Replayed);
        assert_eq!(counts.accept(&nonce(NOW + 3, 9), NOW + 3, 1, NOW + 3, 60), Verification::Ok);
    }

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
