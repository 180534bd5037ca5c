//! The client side: answering a 401/407 challenge with credentials.

use rand::Rng as _;
use rsip::headers::UntypedHeader as _;
use rsip::{Header, Method, Response, Uri};

use super::{Algorithm, DigestError, DigestInput, Params, compute_response, parse_digest, quote};

/// A challenge we can answer.
pub(super) struct Challenge {
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

pub(super) fn answer_with_cnonce(
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
