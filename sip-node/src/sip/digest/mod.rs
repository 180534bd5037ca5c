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
//!
//! The modules: this one holds the shared parts (algorithms, the parameter parser), `client`
//! answers challenges, `server` issues and verifies them.

mod client;
mod server;
#[cfg(test)]
mod tests;

use md5::{Digest as _, Md5};
use sha2::{Sha256, Sha512_256};

pub use client::answer_challenge;
pub use server::{Challenger, DEFAULT_NONCE_TTL, Verification, nonce_key};

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
pub(super) enum Algorithm {
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
pub(super) struct DigestInput<'a> {
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
pub(super) fn compute_response(input: &DigestInput<'_>) -> String {
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
pub(super) struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Parses `Digest name=value, name="quoted, value", ...`. Returns `NotDigest` for other
/// schemes. Parsing stops at a token not followed by `=` (the start of another challenge in
/// the same header value).
pub(super) fn parse_digest(value: &str) -> Result<Params, DigestError> {
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
pub(super) fn quote(value: &str) -> Option<String> {
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
