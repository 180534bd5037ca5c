//! `switchboard local`: the whole stack on one machine from a folder of manifests.
//!
//! Brings up Postgres (DATABASE_URL or a private throwaway cluster), applies the migrations,
//! reconciles the folder into the database, starts one SIP node as a child process and prints
//! what runs where. Then it follows the folder: every change to a `*.yaml`/`*.yml` file re-runs
//! the full reconcile, which commits a new configuration generation that the node picks up. A
//! node that exits is restarted with backoff. Ctrl-C or SIGTERM stops the node, then the
//! private Postgres, and exits 0.

mod node;
mod watch;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::PgPool;
use switchboard_model::db::{self, DbError};
use switchboard_model::logging::LogFormat;
use switchboard_operator::reconcile::{ReconcileReport, Reconciler};
use switchboard_operator::source::folder::FolderSource;
use switchboard_operator::source::{DesiredState, DesiredStateSource, ResourceKey, SourceError};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::postgres::{Postgres, PostgresError};
use crate::process::Backoff;
use node::{NodeSupervisor, node_command};
use watch::{follow_changes, watch_folder};

/// Connections of local mode's own pool.
const POOL_SIZE: u32 = 5;
/// Attempts at the first connection before local mode gives up.
const CONNECT_ATTEMPTS: u32 = 3;
/// Reconcile retries back off from this delay ...
const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// ... up to this one.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Arguments of `switchboard local`.
#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// Folder of manifests to reconcile and watch (recursively).
    #[arg(default_value = "examples")]
    pub dir: PathBuf,
    /// Postgres connection URL. Without it a private throwaway cluster is started (and removed
    /// again on exit).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Id of the SIP node local mode starts.
    #[arg(long, default_value = "local-1")]
    pub node_id: String,
    /// Start no SIP node: only the database and the folder reconcile.
    #[arg(long)]
    pub no_node: bool,
    #[command(flatten)]
    pub api: switchboard_api::ApiArgs,
    #[command(flatten)]
    pub reaper: switchboard_operator::reaper::ReaperArgs,
}

/// Errors of local mode, each saying what to do about it. Messages carry their cause inline
/// (no `source()` chain), so that `{:#}` prints every cause exactly once.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "manifest folder {0} does not exist or is not a directory: pass the folder of your \
         Trunk/PhoneNumber/RoutingRule manifests, e.g. `switchboard local examples/`"
    )]
    FolderMissing(PathBuf),
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    #[error("{0}; check DATABASE_URL / --database-url, or unset it to run a private throwaway Postgres")]
    Connect(DbError),
    #[error("{0}")]
    Migrate(DbError),
    #[error("{0}")]
    Source(SourceError),
    #[error("cannot watch {path} for changes: {error}")]
    Watch { path: PathBuf, error: notify::Error },
    #[error("cannot find this program's executable to start the SIP node: {0}")]
    CurrentExe(std::io::Error),
    #[error("cannot create the SIP node's state directory: {0}")]
    StateDir(std::io::Error),
    #[error("cannot start the SIP node ({exe}): {error}")]
    SpawnNode { exe: PathBuf, error: std::io::Error },
    #[error("REST API: {0}")]
    Api(String),
    #[error("cannot install the Ctrl-C/SIGTERM handler: {0}")]
    Signal(std::io::Error),
}

/// Runs local mode until Ctrl-C or SIGTERM. `log_format` is passed on to the SIP node.
pub async fn run(args: LocalArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::install()?;
    if !args.dir.is_dir() {
        return Err(LocalError::FolderMissing(args.dir).into());
    }
    let postgres = tokio::select! {
        postgres = Postgres::ensure(args.database_url.clone()) => postgres?,
        () = shutdown.requested() => return Ok(()),
    };
    let result = serve(&args, log_format, &postgres, &mut shutdown).await;
    postgres.stop().await;
    tracing::info!("local stack stopped");
    Ok(result?)
}

/// Everything after Postgres is up: connect, migrate, reconcile, node, summary, follow changes.
async fn serve(
    args: &LocalArgs,
    log_format: LogFormat,
    postgres: &Postgres,
    shutdown: &mut Shutdown,
) -> Result<(), LocalError> {
    let pool = tokio::select! {
        pool = connect(postgres.url()) => pool?,
        () = shutdown.requested() => return Ok(()),
    };
    db::migrate(&pool).await.map_err(LocalError::Migrate)?;
    let result = serve_with_pool(args, log_format, postgres, &pool, shutdown).await;
    pool.close().await;
    result
}

async fn serve_with_pool(
    args: &LocalArgs,
    log_format: LogFormat,
    postgres: &Postgres,
    pool: &PgPool,
    shutdown: &mut Shutdown,
) -> Result<(), LocalError> {
    let source = FolderSource::new(&args.dir);
    let reconciler = Reconciler::new(pool.clone());
    // Watch before the first read so that no change slips in between.
    let (_watcher, mut changes) = watch_folder(&args.dir)?;
    let Some(first) = reconcile_with_retry(&source, &reconciler, shutdown).await? else {
        return Ok(());
    };
    // Secrets of this run live in a private directory (random name, 0700) that goes with it.
    let secrets = private_dir().map_err(|e| LocalError::Api(format!("cannot create a private directory: {e}")))?;
    let webhook_secret = webhook_secret();
    let api = start_api(args, pool, secrets.path()).await?;
    // Ends the rows of nodes that died and expires queued call requests (operator/src/reaper/).
    let reaper = tokio::spawn(switchboard_operator::reaper::run(pool.clone(), args.reaper.clone(), api.stop.clone()));
    let node = if args.no_node {
        None
    } else {
        Some(NodeSupervisor::start(node_command(args, postgres, log_format, &webhook_secret)?)?)
    };
    let summary = Summary {
        database_url: postgres.url(),
        database_origin: postgres.describe(),
        folder: &args.dir,
        generation: first.report.generation,
        node: node.as_ref().map(|node| (args.node_id.as_str(), node.first_pid)),
        not_ready: &first.report.not_ready,
        problems: first.problems,
    };
    println!("{}", summary.render());
    println!("{}", api.summary);
    if webhook_secret.generated {
        println!(
            "  webhooks: signed with a key generated for this run: SWITCHBOARD_WEBHOOK_SECRET={} (set it yourself to keep one)",
            webhook_secret.value
        );
    }
    follow_changes(&source, &reconciler, &mut changes, shutdown).await;
    api.stop.cancel();
    let _ = api.task.await;
    let _ = reaper.await;
    if let Some(node) = node {
        node.stop().await;
    }
    drop(secrets);
    Ok(())
}

/// A new private directory for this run's secrets: a random name under the temporary
/// directory, mode 0700, removed when the returned value is dropped. (It used to be the
/// predictable `/tmp/switchboard-local-PID`, which another local user could create first or
/// fill with a symlink that local mode, often run as root, would then write through.)
fn private_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new().prefix("switchboard-local-").permissions(std::fs::Permissions::from_mode(0o700)).tempdir()
}

/// The key the node signs webhooks with: `SWITCHBOARD_WEBHOOK_SECRET` when set, else one
/// generated for this run (printed, so that a receiver can verify the signatures).
struct WebhookSecret {
    value: String,
    generated: bool,
}

fn webhook_secret() -> WebhookSecret {
    match std::env::var("SWITCHBOARD_WEBHOOK_SECRET") {
        Ok(value) if !value.trim().is_empty() => WebhookSecret { value, generated: false },
        _ => WebhookSecret {
            value: switchboard_api::rand_bytes().iter().map(|b| format!("{b:02x}")).collect(),
            generated: true,
        },
    }
}

/// The REST API of local mode: writes go into the folder, which the watcher reconciles.
struct LocalApi {
    task: JoinHandle<anyhow::Result<()>>,
    stop: tokio_util::sync::CancellationToken,
    summary: String,
}

async fn start_api(args: &LocalArgs, pool: &PgPool, secrets: &Path) -> Result<LocalApi, LocalError> {
    use switchboard_api as api;
    let (verifier, generated) =
        api::local_verifier(&args.api.jwt, secrets).map_err(|e| LocalError::Api(format!("{e:#}")))?;
    let egress = args.api.egress().map_err(|e| LocalError::Api(format!("{e:#}")))?;
    let address = args.api.api_listen.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
    let listener = api::bind(address).await.map_err(|e| LocalError::Api(format!("{e:#}")))?;
    let address = listener.local_addr().map_err(|e| LocalError::Api(e.to_string()))?;
    let store = std::sync::Arc::new(api::store::FolderStore::new(&args.dir));
    let state = api::AppState::new(pool.clone(), store, args.api.api_namespace.clone())
        .with_egress(egress)
        .with_limits(&args.api.limits);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(api::serve(listener, api::router(state, verifier), stop.clone()));
    let token_hint = match generated {
        Some(path) => format!(
            "a secret generated for this run in {}; token: switchboard token --subject me --jwt-secret-file {}",
            path.display(),
            path.display()
        ),
        None => "token: switchboard token --subject me (with the same secret settings)".to_string(),
    };
    let summary = format!("  REST API: http://{address}/api (docs: http://{address}/docs); {token_hint}");
    Ok(LocalApi { task, stop, summary })
}

/// Connects, retrying a few times with backoff (the database may still be starting).
async fn connect(url: &str) -> Result<PgPool, LocalError> {
    let mut backoff = Backoff::new(RETRY_INITIAL, Duration::from_secs(8));
    let mut attempt = 1;
    loop {
        match db::connect(url, POOL_SIZE).await {
            Ok(pool) => return Ok(pool),
            Err(error) if attempt < CONNECT_ATTEMPTS => {
                let delay = backoff.next_delay();
                tracing::warn!("{error}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(error) => return Err(LocalError::Connect(error)),
        }
    }
}

/// The outcome of one successful reconcile pass.
struct Pass {
    report: ReconcileReport,
    /// Invalid resources and unreadable files, each already logged as a warning.
    problems: usize,
}

/// Reads the folder and reconciles it, retrying failed passes (the database is down) with
/// exponential backoff. `None` when shutdown was requested while waiting.
async fn reconcile_with_retry(
    source: &FolderSource,
    reconciler: &Reconciler,
    shutdown: &mut Shutdown,
) -> Result<Option<Pass>, LocalError> {
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    loop {
        let state = source.desired_state().await.map_err(LocalError::Source)?;
        match reconciler.reconcile_all(&state).await {
            Ok(report) => {
                return Ok(Some(Pass { report, problems: log_problems(&state) }));
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!("{error}; retrying the reconcile in {delay:?}");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.requested() => return Ok(None),
                }
            }
        }
    }
}

/// Logs every invalid resource and unreadable file as a warning; returns how many there were.
fn log_problems(state: &DesiredState) -> usize {
    for problem in &state.problems {
        tracing::warn!("{}", with_origin(&problem.origin, &problem.message));
    }
    for broken in &state.broken {
        tracing::warn!(
            "{} is invalid ({}); its last good configuration stays in effect",
            broken.key,
            with_origin(&broken.origin, &broken.message)
        );
    }
    state.problems.len() + state.broken.len()
}

/// `origin: message`, unless the message already starts with its origin.
fn with_origin(origin: &str, message: &str) -> String {
    if message.starts_with(origin) { message.to_string() } else { format!("{origin}: {message}") }
}

/// Logs what a pass after a file change did.
fn log_report(report: &ReconcileReport) {
    if report.changed.is_empty() && report.deleted.is_empty() {
        tracing::info!("folder changed; configuration unchanged (generation {})", report.generation);
    } else {
        tracing::info!(
            "reconciled the folder into config generation {}: changed [{}], deleted [{}]",
            report.generation,
            join_keys(&report.changed),
            join_keys(&report.deleted)
        );
    }
    for (key, reason, message) in &report.not_ready {
        tracing::warn!("{key} not ready: {reason}: {message}");
    }
}

fn join_keys(keys: &[ResourceKey]) -> String {
    keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Ctrl-C (SIGINT) and SIGTERM, installed before anything starts so that neither kills the
/// process before it has stopped its children.
struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> Result<Self, LocalError> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).map_err(LocalError::Signal)?,
            terminate: signal(SignalKind::terminate()).map_err(LocalError::Signal)?,
        })
    }

    /// Completes when a shutdown signal arrives.
    async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        tracing::info!("shutting down the local stack");
    }
}

/// What local mode runs where, printed once the stack is up. A new component (SIP listeners,
/// the REST API) is one more row in [`Summary::rows`].
struct Summary<'a> {
    /// Redacted when rendered.
    database_url: &'a str,
    database_origin: String,
    folder: &'a Path,
    generation: i64,
    /// Node id and PID.
    node: Option<(&'a str, u32)>,
    not_ready: &'a [(ResourceKey, String, String)],
    problems: usize,
}

impl Summary<'_> {
    fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = vec![
            ("database", db::redact_url(self.database_url)),
            ("postgres", self.database_origin.clone()),
            ("folder", format!("{} (watched: changes apply live)", self.folder.display())),
            ("generation", self.generation.to_string()),
        ];
        rows.push(match self.node {
            Some((id, pid)) => ("node", format!("{id} (pid {pid})")),
            None => ("node", "none (--no-node)".to_string()),
        });
        if self.problems > 0 {
            rows.push(("problems", format!("{} invalid resources or files (see the warnings above)", self.problems)));
        }
        rows.push(("not ready", self.not_ready.len().to_string()));
        rows
    }

    fn render(&self) -> String {
        let mut out = String::from("\nSwitchboard local stack is running\n");
        for (label, value) in self.rows() {
            let _ = writeln!(out, "  {label:<11} {value}");
        }
        for (key, reason, message) in self.not_ready {
            let _ = writeln!(out, "    {key}: {reason}: {message}");
        }
        out.push_str("Press Ctrl-C to stop.");
        out
    }
}

#[cfg(test)]
mod tests {
    use switchboard_operator::source::Kind;

    use super::*;

    #[test]
    fn summary_lists_components_and_not_ready_resources_without_passwords() {
        let key = ResourceKey { kind: Kind::PhoneNumber, namespace: "default".into(), name: "main".into() };
        let not_ready = vec![(key, "TrunkNotFound".to_string(), "trunk \"x\" does not exist".to_string())];
        let summary = Summary {
            database_url: "postgres://app:secret@db:5432/switchboard",
            database_origin: "external".into(),
            folder: Path::new("examples"),
            generation: 7,
            node: Some(("local-1", 4242)),
            not_ready: &not_ready,
            problems: 0,
        };
        let text = summary.render();
        assert!(!text.contains("secret"), "{text}");
        for expected in ["app:***@db", "examples", "generation  7", "local-1 (pid 4242)", "not ready   1"] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
        assert!(text.contains("PhoneNumber default/main: TrunkNotFound: trunk \"x\" does not exist"), "{text}");
    }

    /// The secrets directory is private and unpredictable, and goes away with local mode.
    #[test]
    fn the_secrets_directory_is_private_random_and_removed() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let a = private_dir().unwrap();
        let b = private_dir().unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("switchboard-local-"), "{name}");
        assert_ne!(name, format!("switchboard-local-{}", std::process::id()), "not the predictable PID path");
        let meta = std::fs::symlink_metadata(a.path()).unwrap();
        assert!(meta.is_dir() && !meta.file_type().is_symlink());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());

        let args = switchboard_api::auth::JwtArgs {
            jwt_issuer: "switchboard".into(),
            jwt_max_ttl_seconds: 3600,
            ..Default::default()
        };
        // With SWITCHBOARD_JWT_SECRET set the configured secret is used and no file is written.
        if std::env::var_os("SWITCHBOARD_JWT_SECRET").is_none() {
            let (_, path) = switchboard_api::local_verifier(&args, a.path()).unwrap();
            let path = path.expect("a generated secret file");
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::read_to_string(&path).unwrap().len(), 64);
            // A file that is already there (planted, or a symlink) is never written through.
            let error = switchboard_api::local_verifier(&args, a.path()).unwrap_err();
            assert!(error.to_string().contains("jwt-secret"), "{error}");
            std::os::unix::fs::symlink("/dev/null", b.path().join("jwt-secret")).unwrap();
            assert!(switchboard_api::local_verifier(&args, b.path()).is_err());
        }
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn origin_is_not_repeated() {
        assert_eq!(with_origin("a.yaml", "a.yaml: bad"), "a.yaml: bad");
        assert_eq!(with_origin("a.yaml", "bad"), "a.yaml: bad");
    }
}
