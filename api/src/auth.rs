//! Bearer-token authentication: HS256 JWTs with expiry, issuer, lifetime and scopes checked. The
//! secret comes from a file (in Kubernetes: a mounted Secret) or `SWITCHBOARD_JWT_SECRET`;
//! `switchboard token` mints tokens with the same secret. Tokens are never logged.
//!
//! Scopes (the `scope` claim, space-separated as in OAuth 2.0): `read` (every GET), `trunks`
//! (trunk writes), `calls` (`/api/calls/initiate`), `sms` (`/api/sms/send`), `admin` (all of
//! them). Each route needs one ([`required_scope`]); a token without it gets 403. A token whose
//! lifetime (`exp - iat`) exceeds `--jwt-max-ttl-seconds` is refused, so that a leaked token
//! cannot be one that never expires.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The issuer Switchboard writes into its tokens and requires.
pub(crate) const DEFAULT_ISSUER: &str = "switchboard";
/// Shortest accepted secret: HS256 keys below 256 bits are guessable.
pub(crate) const MIN_SECRET_BYTES: usize = 32;

/// Where the signing secret comes from (shared by `operator`, `local` and `token`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JwtArgs {
    /// File holding the JWT signing secret (HS256, at least 32 bytes; surrounding whitespace is
    /// ignored). In Kubernetes, mount a Secret and point here.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The secret itself; filled from `SWITCHBOARD_JWT_SECRET` when unset (never a flag, so
    /// that it cannot show in `ps`).
    #[arg(skip)]
    pub jwt_secret: Option<String>,
    /// Issuer (`iss`) written into and required of tokens.
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER", default_value = DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// Longest token lifetime (`exp - iat`, seconds) minted or accepted.
    #[arg(long, env = "SWITCHBOARD_JWT_MAX_TTL_SECONDS", default_value_t = DEFAULT_MAX_TTL_SECONDS)]
    pub jwt_max_ttl_seconds: u64,
}

/// Default of `--jwt-max-ttl-seconds`: one day.
pub(crate) const DEFAULT_MAX_TTL_SECONDS: u64 = 86_400;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Scope {
    /// Every GET: trunks, calls, CDRs, messages.
    Read,
    /// Create, change, activate and delete trunks.
    Trunks,
    /// Place calls (`POST /api/calls/initiate`) and transfer them
    /// (`POST /api/calls/{call_id}/transfer`).
    Calls,
    /// Send messages (`POST /api/sms/send`).
    Sms,
    /// Everything.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [Scope::Read, Scope::Trunks, Scope::Calls, Scope::Sms, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Trunks => "trunks",
            Scope::Calls => "calls",
            Scope::Sms => "sms",
            Scope::Admin => "admin",
        }
    }

    fn parse(value: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == value)
    }
}

/// The scope a request needs, from its method and path (the middleware runs only for requests
/// that matched a route): GETs `read`, trunk writes `trunks`, placing calls `calls`, sending
/// messages `sms`; anything else under `/api` (a route added later) `admin`, so that a new
/// route is closed until someone decides who may use it.
pub(crate) fn required_scope(method: &axum::http::Method, route: &str) -> Scope {
    use axum::http::Method;
    match (method, route) {
        (&Method::GET | &Method::HEAD, _) => Scope::Read,
        (_, "/api/calls/initiate") => Scope::Calls,
        (&Method::POST, r)
            if r.starts_with("/api/calls/")
                && ["/transfer", "/transfer/complete", "/transfer/cancel", "/transfer/dtmf"]
                    .iter()
                    .any(|end| r.ends_with(end)) =>
        {
            Scope::Calls
        }
        (_, "/api/sms/send") => Scope::Sms,
        (&Method::POST | &Method::PUT | &Method::DELETE, r) if r.starts_with("/api/trunks") => Scope::Trunks,
        _ => Scope::Admin,
    }
}

/// Errors loading the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the JWT secret file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error(
        "the JWT secret is {0} bytes; use at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 48 > jwt-secret`)"
    )]
    TooShort(usize),
    #[error("no JWT secret: pass --jwt-secret-file or set SWITCHBOARD_JWT_SECRET")]
    Missing,
}

impl JwtArgs {
    /// The secret, if one is configured.
    pub fn secret(&self) -> Result<Option<Vec<u8>>, SecretError> {
        let from_env = std::env::var("SWITCHBOARD_JWT_SECRET").ok().filter(|s| !s.trim().is_empty());
        let secret = match (&self.jwt_secret_file, self.jwt_secret.as_ref().or(from_env.as_ref())) {
            (Some(path), _) => Some(read_secret_file(path)?),
            (None, Some(secret)) => Some(secret.trim().as_bytes().to_vec()),
            (None, None) => None,
        };
        match secret {
            Some(secret) if secret.len() < MIN_SECRET_BYTES => Err(SecretError::TooShort(secret.len())),
            other => Ok(other),
        }
    }

    /// The verifier, or [`SecretError::Missing`].
    pub fn verifier(&self) -> Result<Arc<JwtVerifier>, SecretError> {
        let secret = self.secret()?.ok_or(SecretError::Missing)?;
        Ok(Arc::new(JwtVerifier::new(&secret, &self.jwt_issuer).with_max_ttl(self.jwt_max_ttl_seconds)))
    }
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    let bytes = std::fs::read(path).map_err(|error| SecretError::Read { path: path.to_path_buf(), error })?;
    Ok(bytes.trim_ascii().to_vec())
}

/// The claims Switchboard writes and reads.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    /// Space-separated scopes; a token without the claim has none.
    #[serde(default)]
    pub scope: String,
}

impl Claims {
    /// Whether the token carries `scope` (or `admin`).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scope.split_ascii_whitespace().filter_map(Scope::parse).any(|s| s == scope || s == Scope::Admin)
    }
}

/// Checks and mints tokens.
pub struct JwtVerifier {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    max_ttl_seconds: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn new(secret: &[u8], issuer: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 30;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: issuer.to_string(),
            max_ttl_seconds: DEFAULT_MAX_TTL_SECONDS,
        }
    }

    /// The same verifier with another maximum token lifetime.
    pub fn with_max_ttl(mut self, seconds: u64) -> Self {
        self.max_ttl_seconds = seconds;
        self
    }

    /// A token for `subject` with every scope but `admin`, valid for `ttl_seconds`: for tests
    /// and benches. Panics when `ttl_seconds` is above the maximum; [`JwtVerifier::mint_scoped`]
    /// says so instead.
    pub fn mint(&self, subject: &str, ttl_seconds: u64) -> String {
        self.mint_scoped(subject, ttl_seconds, &[Scope::Read, Scope::Trunks, Scope::Calls, Scope::Sms])
            .expect("mint() callers stay within the maximum lifetime")
    }

    /// A token for `subject` with `scopes`, valid for `ttl_seconds` (at most the maximum).
    pub fn mint_scoped(&self, subject: &str, ttl_seconds: u64, scopes: &[Scope]) -> Result<String, String> {
        if ttl_seconds > self.max_ttl_seconds {
            return Err(format!(
                "a lifetime of {ttl_seconds} s is above the maximum of {} s (--jwt-max-ttl-seconds)",
                self.max_ttl_seconds
            ));
        }
        let now = now_seconds();
        let scope = scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ");
        let claims = Claims { sub: subject.into(), iss: self.issuer.clone(), iat: now, exp: now + ttl_seconds, scope };
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).expect("HS256 signing"))
    }

    /// The claims of a valid token, or a message saying why it is not.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let claims = self.verify_signature(token)?;
        if claims.iat > now_seconds() + self.validation.leeway {
            return Err("the token's iat is in the future".into());
        }
        if claims.exp.saturating_sub(claims.iat) > self.max_ttl_seconds {
            return Err(format!(
                "the token's lifetime (exp - iat) is above this server's maximum of {} s; mint a shorter-lived one",
                self.max_ttl_seconds
            ));
        }
        Ok(claims)
    }

    fn verify_signature(&self, token: &str) -> Result<Claims, String> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|data| data.claims).map_err(
            |error| match error.kind() {
                ErrorKind::ExpiredSignature => "the token has expired; mint a new one".to_string(),
                ErrorKind::InvalidIssuer => format!("the token's issuer is not {:?}", self.issuer),
                ErrorKind::InvalidSignature => "the token's signature does not match this server's secret".into(),
                ErrorKind::InvalidAlgorithm => "the token is not signed with HS256".into(),
                ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim:?} claim"),
                ErrorKind::ImmatureSignature => "the token is not valid yet".into(),
                _ => "the token is not a valid JWT".into(),
            },
        )
    }
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// Middleware: requires `Authorization: Bearer <valid token>`; puts the [`Claims`] into the
/// request extensions.
pub(crate) async fn require_token(
    State(verifier): State<Arc<JwtVerifier>>,
    mut request: Request,
    next: Next,
) -> Response {
    let header = request.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or_default());
    let token = match header {
        None => {
            return ApiError::unauthorized("missing Authorization header; send Authorization: Bearer <token>")
                .into_response();
        }
        Some(value) => match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                token.trim().to_string()
            }
            _ => {
                return ApiError::unauthorized("the Authorization header is not of the form: Bearer <token>")
                    .into_response();
            }
        },
    };
    let claims = match verifier.verify(&token) {
        Ok(claims) => claims,
        Err(message) => return ApiError::unauthorized(message).into_response(),
    };
    // A route layer: only requests that matched a route get here.
    let route = request.uri().path().to_string();
    let needed = required_scope(request.method(), &route);
    if !claims.allows(needed) {
        return ApiError::forbidden(
            "insufficient_scope",
            format!(
                "this token's scopes ({}) do not include {:?}, which {} {} needs; mint one with --scope {}",
                if claims.scope.is_empty() { "none" } else { claims.scope.as_str() },
                needed.as_str(),
                request.method(),
                route,
                needed.as_str()
            ),
        )
        .into_response();
    }
    tracing::debug!(subject = %claims.sub, "authenticated");
    request.extensions_mut().insert(claims);
    next.run(request).await
}

/// Arguments of `switchboard token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Who the token is for (the `sub` claim).
    #[arg(long)]
    pub subject: String,
    /// Lifetime in seconds (at most --jwt-max-ttl-seconds).
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// What the token may do; repeat or comma-separate. `admin` is every scope.
    #[arg(long = "scope", value_enum, value_delimiter = ',', default_values_t = [Scope::Read, Scope::Trunks, Scope::Calls, Scope::Sms])]
    pub scopes: Vec<Scope>,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

/// `switchboard token`: prints a token on stdout (nothing else, so that it can be captured).
pub fn token_command(args: TokenArgs) -> anyhow::Result<()> {
    let verifier = args.jwt.verifier()?;
    let token = verifier.mint_scoped(&args.subject, args.ttl, &args.scopes).map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_verify_and_others_do_not() {
        let verifier = JwtVerifier::new(SECRET, "switchboard");
        let token = verifier.mint("ci", 60);
        assert_eq!(verifier.verify(&token).unwrap().sub, "ci");
        let other_issuer = JwtVerifier::new(SECRET, "someone-else").mint("ci", 60);
        assert!(verifier.verify(&other_issuer).unwrap_err().contains("issuer"));
        let other_secret = JwtVerifier::new(b"ffffffffffffffffffffffffffffffff", "switchboard").mint("ci", 60);
        assert!(verifier.verify(&other_secret).unwrap_err().contains("signature"));
        assert!(verifier.verify("not.a.jwt").is_err());
    }

    #[test]
    fn lifetimes_above_the_maximum_are_refused() {
        let verifier = JwtVerifier::new(SECRET, "switchboard").with_max_ttl(600);
        assert!(verifier.mint_scoped("ci", 601, &[Scope::Read]).is_err());
        // A token minted elsewhere with the same secret and a year's lifetime.
        let long = JwtVerifier::new(SECRET, "switchboard").with_max_ttl(u64::MAX).mint_scoped("ci", 31_536_000, &[]);
        let error = verifier.verify(&long.unwrap()).unwrap_err();
        assert!(error.contains("lifetime"), "{error}");
        assert!(verifier.verify(&verifier.mint_scoped("ci", 600, &[]).unwrap()).is_ok());
    }

    #[test]
    fn scopes_are_required_per_route() {
        use axum::http::Method;
        let claims = |scope: &str| Claims { sub: "x".into(), iss: "i".into(), iat: 0, exp: 0, scope: scope.into() };
        for (method, route, scope) in [
            (Method::GET, "/api/trunks", Scope::Read),
            (Method::GET, "/api/calls/cdr", Scope::Read),
            (Method::POST, "/api/trunks", Scope::Trunks),
            (Method::PUT, "/api/trunks/{trunk_id}", Scope::Trunks),
            (Method::DELETE, "/api/trunks/{trunk_id}", Scope::Trunks),
            (Method::POST, "/api/trunks/{trunk_id}/activate", Scope::Trunks),
            (Method::POST, "/api/calls/initiate", Scope::Calls),
            (Method::POST, "/api/calls/CA123@carrier/transfer", Scope::Calls),
            (Method::POST, "/api/calls/CA123@carrier/transfer/complete", Scope::Calls),
            (Method::POST, "/api/calls/CA123@carrier/transfer/cancel", Scope::Calls),
            (Method::POST, "/api/sms/send", Scope::Sms),
            (Method::POST, "/api/something/new", Scope::Admin),
        ] {
            assert_eq!(required_scope(&method, route), scope, "{method} {route}");
        }
        assert!(claims("read calls").allows(Scope::Calls));
        assert!(!claims("read calls").allows(Scope::Sms));
        assert!(claims("admin").allows(Scope::Trunks));
        assert!(!claims("").allows(Scope::Read));
        assert!(!claims("readcalls").allows(Scope::Read));
    }

    #[test]
    fn short_secrets_are_refused() {
        let args =
            JwtArgs { jwt_secret: Some("short".into()), jwt_issuer: DEFAULT_ISSUER.into(), ..Default::default() };
        assert!(matches!(args.secret(), Err(SecretError::TooShort(5))));
    }
}
