//! Bearer-token authentication: HS256 JWTs with expiry and issuer checked. The secret comes
//! from a file (in Kubernetes: a mounted Secret) or `SWITCHBOARD_JWT_SECRET`; `switchboard
//! token` mints tokens with the same secret. Tokens are never logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// The issuer Switchboard writes into its tokens and requires.
pub const DEFAULT_ISSUER: &str = "switchboard";
/// Shortest accepted secret: HS256 keys below 256 bits are guessable.
pub const MIN_SECRET_BYTES: usize = 32;

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
        Ok(Arc::new(JwtVerifier::new(&secret, &self.jwt_issuer)))
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
}

/// Checks and mints tokens.
pub struct JwtVerifier {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
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
        }
    }

    /// A token for `subject`, valid for `ttl_seconds`.
    pub fn mint(&self, subject: &str, ttl_seconds: u64) -> String {
        let now = now_seconds();
        let claims = Claims { sub: subject.into(), iss: self.issuer.clone(), iat: now, exp: now + ttl_seconds };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).expect("HS256 signing")
    }

    /// The claims of a valid token, or a message saying why it is not.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
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
pub async fn require_token(State(verifier): State<Arc<JwtVerifier>>, mut request: Request, next: Next) -> Response {
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
    match verifier.verify(&token) {
        Ok(claims) => {
            tracing::debug!(subject = %claims.sub, "authenticated");
            request.extensions_mut().insert(claims);
            next.run(request).await
        }
        Err(message) => ApiError::unauthorized(message).into_response(),
    }
}

/// Arguments of `switchboard token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Who the token is for (the `sub` claim).
    #[arg(long)]
    pub subject: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

/// `switchboard token`: prints a token on stdout (nothing else, so that it can be captured).
pub fn token_command(args: TokenArgs) -> anyhow::Result<()> {
    let verifier = args.jwt.verifier()?;
    println!("{}", verifier.mint(&args.subject, args.ttl));
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
    fn short_secrets_are_refused() {
        let args =
            JwtArgs { jwt_secret: Some("short".into()), jwt_issuer: DEFAULT_ISSUER.into(), ..Default::default() };
        assert!(matches!(args.secret(), Err(SecretError::TooShort(5))));
    }
}
