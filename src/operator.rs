//! `switchboard operator`: the process around the operator crate's Kubernetes controllers.
//! Signals, the metrics and health server, the database connection, the REST API
//! (`switchboard-api`, on every replica), the reaper, leader election, then the controllers.
//! It lives in the binary so that the operator crate does not depend on the API crate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use switchboard_operator::kubernetes::controller::{self, ControllerSettings, WatchScope};
use switchboard_operator::kubernetes::leader::{Ended, LeaderElection, LeaseTiming};
use switchboard_operator::kubernetes::metrics::Metrics;
use switchboard_operator::reaper;
use switchboard_operator::reconcile::Reconciler;

/// Arguments of `switchboard operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Postgres connection URL (the same database the SIP nodes read).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "SWITCHBOARD_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "SWITCHBOARD_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,
    /// Turn leader election off (only for a single replica, e.g. in development).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Namespace of the leader Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "switchboard-system")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "switchboard-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How often the nodes' heartbeats, registrations and calls are read from Postgres.
    #[arg(long, default_value_t = 5)]
    pub node_poll_seconds: u64,
    /// Nodes whose last heartbeat is older than this count as gone.
    #[arg(long, default_value_t = 30)]
    pub node_timeout_seconds: u64,
    /// Do not apply the database migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
    /// Label selector of the Secrets the operator watches for trunk passwords: it caches only
    /// these. Label your password Secrets with it; an empty value watches every Secret.
    #[arg(long, env = "SWITCHBOARD_SECRET_SELECTOR", default_value = controller::DEFAULT_SECRET_SELECTOR)]
    pub secret_selector: String,
    #[command(flatten)]
    pub api: switchboard_api::ApiArgs,
    #[command(flatten)]
    pub reaper: reaper::ReaperArgs,
}

/// Runs the operator until SIGTERM/SIGINT (exit 0) or a lost lease (an error: the pod restarts
/// and stands by).
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let server = tokio::spawn(serve_health(args.metrics_address, metrics.clone(), health.clone(), shutdown.clone()));

    let pool = connect(&args, &shutdown).await?;
    let Some(pool) = pool else { return Ok(()) };
    let client = Client::try_default()
        .await
        .context("cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)")?;
    health.ready.store(true, Ordering::SeqCst);
    // The REST API serves on every replica (writes go to the Kubernetes API, not to Postgres).
    let api = switchboard_api::start_for_operator(&args.api, pool.clone(), client.clone(), shutdown.clone()).await?;
    // Every replica reaps; an advisory lock lets one pass run at a time (operator/src/reaper/).
    tokio::spawn(reaper::run(pool.clone(), args.reaper.clone(), shutdown.clone()));

    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "switchboard".into());
        format!("{host}-{}", std::process::id())
    });
    let election = (!args.no_leader_election).then(|| {
        LeaderElection::new(
            Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
            &args.lease_name,
            identity,
            LeaseTiming::default(),
        )
    });
    let leader = match &election {
        Some(election) => {
            if !election.acquire(&shutdown).await {
                return Ok(());
            }
            election.is_leader.clone()
        }
        None => Arc::new(AtomicBool::new(true)),
    };
    metrics.leader.set(1);

    // Controllers stop on shutdown and on a lost lease.
    let stop = shutdown.child_token();
    let settings = ControllerSettings {
        scope: WatchScope { namespace: args.namespace.clone() },
        secret_selector: args.secret_selector.clone(),
        node_poll: Duration::from_secs(args.node_poll_seconds.max(1)),
        node_timeout: Duration::from_secs(args.node_timeout_seconds),
        pass_resync: Duration::from_secs(60),
    };
    let controllers = controller::run_controllers(
        client,
        Reconciler::new(pool),
        metrics.clone(),
        leader.clone(),
        settings,
        stop.clone(),
    );
    let controllers = stop_within(controllers, &stop, "the controllers");
    let ended = match &election {
        Some(election) => {
            let holder = async {
                let ended = election.hold(&shutdown).await;
                stop.cancel();
                ended
            };
            let (ended, _) = tokio::join!(holder, controllers);
            ended
        }
        None => {
            let _ = controllers.await;
            Ended::Shutdown
        }
    };
    metrics.leader.set(0);
    shutdown.cancel();
    let _ = stop_within(server, &shutdown, "the health server").await;
    if let Some(api) = api {
        let _ = stop_within(api, &shutdown, "the REST API").await;
    }
    match ended {
        Ended::Shutdown => {
            tracing::info!("operator stopped");
            Ok(())
        }
        Ended::Lost => anyhow::bail!("lost the leader lease; exiting so that this replica restarts as a standby"),
    }
}

/// How long one part of the process may take to stop once told to (in-flight reconciles, HTTP
/// connections kept open by clients). Kubernetes kills the pod 30 s after SIGTERM by default;
/// the parts stop in turn within that.
const STOP_GRACE: Duration = Duration::from_secs(8);

/// Runs `work` to its end, but no longer than [`STOP_GRACE`] after `stopped` is cancelled: a
/// part that does not stop (a reconcile waiting on an unresponsive API server, a client holding
/// a connection open) must not keep the replica from exiting. Says which part overran.
async fn stop_within<T>(
    work: impl std::future::Future<Output = T>,
    stopped: &CancellationToken,
    what: &str,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        output = &mut work => return Some(output),
        _ = stopped.cancelled() => {}
    }
    match tokio::time::timeout(STOP_GRACE, work).await {
        Ok(output) => Some(output),
        Err(_) => {
            tracing::warn!("{what} did not stop within {STOP_GRACE:?} of shutdown; exiting without them");
            None
        }
    }
}

/// Connects and migrates, retrying with backoff until it works or shutdown (`None`).
async fn connect(args: &OperatorArgs, shutdown: &CancellationToken) -> anyhow::Result<Option<sqlx::PgPool>> {
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            let pool = switchboard_model::db::connect(&args.database_url, 8).await?;
            if !args.no_migrate {
                switchboard_model::db::migrate(&pool).await?;
            }
            Ok::<_, switchboard_model::db::DbError>(pool)
        };
        match attempt.await {
            Ok(pool) => return Ok(Some(pool)),
            Err(error) => tracing::warn!(error = %format!("{error:#}"), "database not ready; retrying in {delay:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
    shutdown.cancel();
}

/// What `/readyz` reports.
#[derive(Default)]
struct Health {
    /// Started: connected to the database and the API server (leader or standby).
    ready: AtomicBool,
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The HTTP router: `/metrics`, `/healthz`, `/readyz`.
fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(|State(s): State<HttpState>| async move { s.metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<HttpState>| async move {
                if s.health.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .with_state(HttpState { metrics, health })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
async fn serve_health(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!("metrics and health on http://{}", listener.local_addr()?);
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
