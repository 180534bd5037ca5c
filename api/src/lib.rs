//! The REST API compatibility layer: the seed guide's `/api/trunks`, `/api/calls` and
//! `/api/sms` endpoints over the resources and the database, with JWT auth, OpenAPI at
//! `/openapi.json` and an interactive page at `/docs` (assets embedded in the binary).
//!
//! Trunk writes go through a [`store::TrunkStore`]: the manifest folder in local mode, server-side
//! apply in Kubernetes. Calls and messages are queued in Postgres for the SIP nodes.
//!
//! What it owns: the routes ([`router`]) and their handlers ([`trunks`], [`calls`]), the OpenAPI
//! document ([`ApiDoc`]), tokens ([`auth`]), rate limits ([`limits`]), the error shape
//! ([`error`]), the mapping between the seed's trunk fields and the `Trunk` spec
//! ([`trunk_model`]) and where trunk writes go ([`store`]).
//!
//! What it must not depend on: the SIP node (calls and messages reach nodes only through
//! Postgres queues and `NOTIFY`), and the binary. It uses the operator crate for the resource
//! types, the validation path and the folder source, so that a trunk written here is checked
//! exactly as the reconcile checks it; the operator crate must never depend on this one.
//! `switchboard local` (folder store) and `switchboard operator` (Kubernetes store) start it.

pub mod auth;
pub(crate) mod calls;
pub(crate) mod error;
pub mod limits;
pub mod store;
pub mod trunk_model;
pub mod trunk_security;
pub(crate) mod trunks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

use auth::JwtVerifier;
use store::TrunkStore;
use switchboard_model::egress::EgressPolicy;

/// The request id header, taken from the request or generated.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Address of the API (`switchboard operator` and `switchboard local`).
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Address of the REST API (/api/..., /docs, /openapi.json, /healthz, /metrics). Default:
    /// 127.0.0.1:8080 in local mode; 0.0.0.0:8081 for the operator, whose metrics use 8080.
    #[arg(long, env = "SWITCHBOARD_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Namespace the API's trunks live in.
    #[arg(long, env = "SWITCHBOARD_API_NAMESPACE", default_value = "default")]
    pub api_namespace: String,
    #[command(flatten)]
    pub jwt: auth::JwtArgs,
    /// Targets that `webhook_url` and `agent_websocket_url` may name although they are not
    /// public (comma-separated CIDRs, IP addresses, host names, `.suffix`): by default loopback,
    /// link-local, private and cluster-internal targets are refused. Also the only hosts,
    /// besides Trunk gateways, that a transfer's SIP URI `to` may dial (public or not). The SIP
    /// nodes take the same list (`SWITCHBOARD_EGRESS_ALLOW`).
    #[arg(long, env = "SWITCHBOARD_EGRESS_ALLOW", value_delimiter = ',')]
    pub egress_allow: Vec<String>,
    #[command(flatten)]
    pub limits: limits::LimitArgs,
}

impl ApiArgs {
    /// The egress allow-list, or an error naming the bad entry.
    pub fn egress(&self) -> anyhow::Result<EgressPolicy> {
        Ok(EgressPolicy::parse(&self.egress_allow)?)
    }
}

/// The list's trunk status and counters with the time they were read.
pub(crate) type ObservedAt = (Instant, Arc<trunks::Observed>);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub store: Arc<dyn TrunkStore>,
    pub namespace: String,
    /// Serializes trunk read-merge-write sequences, so that concurrent PUTs do not lose fields.
    pub write_lock: Arc<tokio::sync::Mutex<()>>,
    pub metrics: Arc<ApiMetrics>,
    /// The list's trunk status and counters, reused for a second (see `trunks::observed_all`).
    pub(crate) observed: Arc<tokio::sync::Mutex<Option<ObservedAt>>>,
    /// Which webhook and agent targets API clients may name.
    pub egress: Arc<EgressPolicy>,
    /// Rate limits of placing calls and sending messages.
    pub limits: Arc<limits::ApiLimits>,
}

impl AppState {
    pub fn new(pool: PgPool, store: Arc<dyn TrunkStore>, namespace: impl Into<String>) -> Self {
        Self {
            pool,
            store,
            namespace: namespace.into(),
            write_lock: Arc::default(),
            metrics: Arc::new(ApiMetrics::new()),
            observed: Arc::default(),
            egress: Arc::default(),
            limits: Arc::default(),
        }
    }

    /// The same state with an egress allow-list (default: public targets only).
    pub fn with_egress(mut self, egress: EgressPolicy) -> Self {
        self.egress = Arc::new(egress);
        self
    }

    /// The same state with other rate limits.
    pub fn with_limits(mut self, limits: &limits::LimitArgs) -> Self {
        self.limits = Arc::new(limits::ApiLimits::new(limits));
        self
    }
}

/// Request counters of the API.
pub struct ApiMetrics {
    registry: Registry,
    requests: IntCounterVec,
}

impl ApiMetrics {
    fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("switchboard_api_requests_total", "REST API requests by method and status code"),
            &["method", "status"],
        )
        .expect("metric");
        registry.register(Box::new(requests.clone())).expect("register");
        Self { registry, requests }
    }

    fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding");
        String::from_utf8(buffer).unwrap_or_default()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchboard API", description = "Trunks, calls and SMS over Switchboard's resources. Authenticate with `Authorization: Bearer <JWT>` (mint one with `switchboard token --subject NAME --scope read,calls`). Scopes: `read` for every GET, `trunks` for trunk writes, `calls` for `/api/calls/initiate` and `/api/calls/{call_id}/transfer`, `sms` for `/api/sms/send`, `admin` for all; a token without the route's scope gets 403 `insufficient_scope`."),
    paths(
        trunks::create, trunks::list, trunks::get, trunks::update, trunks::delete, trunks::activate,
        trunks::status::status, trunks::status::status_all, trunks::stats::stats_summary,
        calls::initiate, calls::get_call, calls::active, calls::cdr::cdrs, calls::sms::send_sms, calls::sms::sms_history,
        calls::transfer::transfer, calls::transfer::complete, calls::transfer::cancel, calls::transfer::dtmf,
        healthz,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth),
    tags((name = "trunks"), (name = "calls"), (name = "sms"), (name = "health"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "ok", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render())
}

/// Request ids (taken or generated, echoed in the response), a span per request, one log line
/// per request with method, path, status and duration (never headers or bodies).
async fn request_context(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let header = HeaderValue::from_str(&id).expect("checked ASCII");
    request.headers_mut().insert(REQUEST_ID, header.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let span = tracing::info_span!("api", request_id = %id);
    let started = Instant::now();
    let mut response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    response.headers_mut().insert(REQUEST_ID, header);
    let status = response.status();
    state.metrics.requests.with_label_values(&[method.as_str(), status.as_str()]).inc();
    span.in_scope(|| {
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        if status.is_server_error() {
            tracing::warn!(%method, %path, status = status.as_u16(), elapsed_ms, "request failed");
        } else {
            tracing::info!(%method, %path, status = status.as_u16(), elapsed_ms, "request");
        }
    });
    response
}

/// The whole API.
pub fn router(state: AppState, verifier: Arc<JwtVerifier>) -> Router {
    let api = Router::new()
        .route("/api/trunks", post(trunks::create).get(trunks::list))
        .route("/api/trunks/", post(trunks::create).get(trunks::list))
        .route("/api/trunks/status", get(trunks::status::status_all))
        .route("/api/trunks/stats/summary", get(trunks::stats::stats_summary))
        .route("/api/trunks/{trunk_id}", get(trunks::get).put(trunks::update).delete(trunks::delete))
        .route("/api/trunks/{trunk_id}/activate", post(trunks::activate))
        .route("/api/trunks/{trunk_id}/status", get(trunks::status::status))
        .route("/api/calls/initiate", post(calls::initiate))
        .route("/api/calls/active", get(calls::active))
        .route("/api/calls/cdr", get(calls::cdr::cdrs))
        .route("/api/calls/{call_id}", get(calls::get_call))
        .route("/api/calls/{call_id}/transfer", post(calls::transfer::transfer))
        .route("/api/calls/{call_id}/transfer/complete", post(calls::transfer::complete))
        .route("/api/calls/{call_id}/transfer/cancel", post(calls::transfer::cancel))
        .route("/api/calls/{call_id}/transfer/dtmf", post(calls::transfer::dtmf))
        .route("/api/sms/send", post(calls::sms::send_sms))
        .route("/api/sms/history", get(calls::sms::sms_history))
        .route_layer(middleware::from_fn_with_state(verifier, auth::require_token));
    let open = Router::new().route("/healthz", get(healthz)).route("/metrics", get(metrics));
    let app: Router = api
        .merge(open)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state.clone());
    app.merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .layer(middleware::from_fn_with_state(state, request_context))
}

/// Binds the API's address (fails early when it is taken).
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {address} for the REST API: {error}; pass --api-listen"))
}

/// Serves the API until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!("REST API on http://{address} (docs: http://{address}/docs)");
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}

/// The verifier of local mode: the configured secret, else a random one written to
/// `dir/jwt-secret` (created new, 0600; `dir` is local mode's private 0700 directory), whose path
/// is returned for `switchboard token --jwt-secret-file PATH`. A file already there is an error,
/// never overwritten: nothing can have planted it in a fresh private directory, so one that
/// exists is a sign that the directory is not what it should be.
pub fn local_verifier(
    args: &auth::JwtArgs,
    dir: &std::path::Path,
) -> anyhow::Result<(Arc<JwtVerifier>, Option<std::path::PathBuf>)> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(secret) = args.secret()? {
        let verifier = JwtVerifier::new(&secret, &args.jwt_issuer).with_max_ttl(args.jwt_max_ttl_seconds);
        return Ok((Arc::new(verifier), None));
    }
    let path = dir.join("jwt-secret");
    let secret = hex::encode(rand_bytes());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    let verifier = JwtVerifier::new(secret.as_bytes(), &args.jwt_issuer).with_max_ttl(args.jwt_max_ttl_seconds);
    Ok((Arc::new(verifier), Some(path)))
}

/// 32 random bytes from the operating system's generator (through UUID v4, which draws from
/// getrandom; 122 random bits each).
pub fn rand_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(16) {
        chunk.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    bytes
}

/// Starts the API of `switchboard operator` (Kubernetes store) on a spawned task; `None` (with a
/// warning) when no JWT secret is configured.
pub async fn start_for_operator(
    args: &ApiArgs,
    pool: PgPool,
    client: kube::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let verifier = match args.jwt.verifier() {
        Ok(verifier) => verifier,
        Err(auth::SecretError::Missing) => {
            tracing::warn!("REST API off: no JWT secret (pass --jwt-secret-file or set SWITCHBOARD_JWT_SECRET)");
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    let address = args.api_listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8081)));
    let listener = bind(address).await?;
    let state = AppState::new(pool, Arc::new(store::KubernetesStore::new(client)), args.api_namespace.clone())
        .with_egress(args.egress()?)
        .with_limits(&args.limits);
    Ok(Some(tokio::spawn(serve(listener, router(state, verifier), shutdown))))
}
