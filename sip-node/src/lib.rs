//! The Switchboard SIP node: a back-to-back user agent (B2BUA) that carries the calls of the
//! trunks, numbers and routing rules the operator stored in Postgres, anchors their media,
//! bridges calls to AI agents over WebSocket, places calls the REST API queued, and writes what
//! it did (active calls, CDRs, registrations) back to Postgres.
//!
//! # Map of the node
//!
//! ## Layers
//!
//! Each layer uses only the layers below it; nothing below the wiring imports `sip::call`.
//!
//! | Layer | Modules | Job |
//! |---|---|---|
//! | wiring | `signaling`, this file | start the tasks, build the node-wide `sip::context::NodeContext` |
//! | call logic | `sip::call` (inbound B2BUA calls), `sip::originate` (API-placed calls), `sip::transfer` (API transfers of agent calls), `sip::sms`, `sip::registration`, `sip::reaped` | one task per call, message or trunk |
//! | connected calls | `sip::connected` | the answered call as a sans-IO machine, and its async driver |
//! | call helpers | `sip::invite_client`, `sip::dialog`, `sip::digest`, `sip::routing`, `sip::limits`, `sip::admission`, `sip::resolve`, `sip::guard`, `sip::control` | one outbound INVITE, dialogs, authentication, routing, limits, DNS, flood guard, sans-IO call-control pieces (session timers, PRACK, INFO DTMF, REFER) |
//! | transactions | `sip::endpoint` (the task), `sip::transaction` (sans-IO RFC 3261 transactions, 2xx retransmission) | match messages to transactions and dialogs, retransmit, time out |
//! | transport | `sip::transport`, `sip::tls`, `sip::message` | UDP, TCP and TLS sockets, framing, parsing |
//! | media | `media` (SDP, RTP/RTCP, SRTP, the relay and its engine threads, port pairs), `bridge` (AI agents over WebSocket) | RTP |
//! | state | `config` (snapshot and watcher), `database` (connecting at start), `store` (buffered writes), `node_state`, `metrics`, `drain`, `http`, `webhook` | configuration in, records out |
//!
//! `sip::context` holds what every task shares (endpoint, snapshot, limits, store, metrics,
//! resolver, digest challenger, media ports, drain); registration and messages get narrow views
//! of it (`RegistrationContext`, `SmsContext`).
//!
//! ## Tasks and threads
//!
//! On the Tokio runtime:
//! - **transport**: one receive task per UDP socket, one accept task per TCP or TLS listener,
//!   a read and a write task per stream connection (`sip::transport`, handshakes in
//!   `sip::tls`). Messages are parsed there.
//! - **endpoint**: one task (`sip::endpoint`) owns every transaction and the table that routes
//!   in-dialog requests to their call.
//! - **call router**: one task (`sip::call::route_requests`) takes out-of-dialog requests:
//!   OPTIONS is answered, MESSAGE goes to a task of `sip::sms`, and each INVITE gets a **call
//!   task** of its own (`sip::call`), which lives until the call ended and its CDR is recorded.
//! - **queues**: `sip::originate::run` claims API call requests and starts a task per call;
//!   `sip::transfer::queue::run` claims the API's transfer requests and hands each to its call;
//!   `sip::sms::run` claims outbound messages; `sip::reaped` sends the final webhooks of
//!   requests the operator reaped.
//! - **registration**: a supervisor and, per trunk, a REGISTER loop and an OPTIONS keepalive
//!   loop (`sip::registration`).
//! - **bridge**: per call to an AI agent, one task owns the caller's RTP leg and the WebSocket
//!   (`bridge`).
//! - **state**: the store's writer (and spool) task, the configuration watcher and its LISTEN
//!   task, the node-state heartbeat, the flood guard's configuration follower, the HTTP server,
//!   and one ordered delivery task per call's webhooks.
//!
//! OS threads: the media engine's `media-N` threads (`media::engine`, level-triggered epoll)
//! drive every two-leg RTP relay, away from the runtime's signaling and database bursts. The
//! engine is created once by the wiring and passed to the calls in `MediaContext::engine`.
//!
//! ## Channels
//!
//! - transport → endpoint: parsed messages (`sip::transport::Received`, bounded, 8192).
//! - anyone → endpoint: `Endpoint` commands (send a request, respond, send statelessly, route a
//!   dialog), unbounded: callers never wait on the endpoint.
//! - endpoint → call router: new out-of-dialog requests (`NewRequest`, bounded, 4096).
//! - endpoint → a call: one `TuEvent` channel per leg (responses, in-dialog requests,
//!   transaction timeouts, CANCEL). A leg's channel is registered for its dialog
//!   (`Endpoint::register_dialog`) and used as the user of the requests the call sends.
//! - relay → call: `media::relay::RelayEvent` (media timeout, DTMF, latching); call → relay:
//!   `RelayHandle` commands (new leg media after a re-INVITE, stop), to the engine thread
//!   through a channel and an eventfd.
//! - call → store: `store::Store::record` appends to an in-memory queue and never blocks; the
//!   writer task drains it into Postgres.
//! - configuration → everyone: `config::SnapshotHandle` (an atomically swapped snapshot, plus a
//!   generation watch); `drain::Drain` tells every task the node is draining or ending.
//!
//! ## Sockets
//!
//! - SIP (UDP, TCP and TLS): `sip::transport::TransportLayer`, shared by its receive tasks (which
//!   answer what they cannot parse with 400) and the endpoint task, which sends everything else.
//! - RTP and RTCP: a port pair per leg, taken from `media::ports::PortAllocator` by the call
//!   (`sip::call::media::Anchor`, `sip::originate::media`), then owned by the relay (an engine
//!   thread) or by the bridge task; the pair goes back when its owner drops it.
//! - WebSocket to an AI agent: the bridge task.
//! - HTTP (`/metrics`, `/healthz`, `/readyz`): the HTTP task. Postgres: the node's pool and the
//!   LISTEN connections of the watcher and the queues.
//!
//! ## Where a call's state lives
//!
//! - Transactions: in the endpoint task (`sip::transaction` machines keyed by branch).
//! - The call: in its call task, the `Call` of `sip::call` (the caller's INVITE, the facts for
//!   its CDRs, attempts and their timing, the trunk permits it holds). Once answered, the
//!   `sip::connected::Connected` machine holds both dialogs (CSeq, route set), the requests
//!   forwarded between the legs, the 2xx retransmitter and the hangup in progress.
//! - Media negotiation: `sip::call::media::Anchor` (one SDP session per leg) in the call task;
//!   packet state (latching, SSRC rewriting, transcoding, timeouts) in the relay.
//! - What outlives the call: its `active_calls` row and its CDRs, written by the store.
//!
//! ## Following one inbound call
//!
//! - **Admitted** in `sip::call::admission` (`admit`): source, number, trunk, digest
//!   (`sip::digest::Challenger`), the trunk's limits (`sip::limits`, across nodes
//!   `sip::admission`) and routing (`sip::routing`); refusals are answered there too. Before
//!   that, `sip::call::route_requests` refuses INVITEs while the node drains and caps call
//!   setups per non-carrier source.
//! - **Fails over** in `sip::call::attempts` (`Call::run`): every gateway address of every
//!   trunk in order, one `sip::invite_client::InviteClient` per attempt (its
//!   `failover_timeout` bounds a silent gateway), the next target on a failover code, a trunk at
//!   its limit skipped. API-placed calls fail over in `sip::originate::attempts` (`dial`).
//! - **Media set up** in `sip::call::media` (`Anchor::new` answers the caller's offer from the
//!   node's port pairs when the call starts; the callee's answer starts the relay,
//!   `media::engine::MediaEngine::spawn_relay`); calls to AI agents in `sip::call::agent`
//!   (`bridge_to_agent`), API-placed calls in `sip::originate::media`.
//! - **Connected** in `sip::call::connected`, which hands the legs to the `sip::connected`
//!   machine until a BYE, a media timeout, the 2xx never being ACKed, or the node stopping.
//! - **CDR written** in `sip::call::record`: `CallFacts::write_cdr` for each failed-over
//!   attempt at once, `Call::finish` for the last attempt and the end of the active row, through
//!   `store::Store::record`; API-placed calls in `sip::originate::record`.
//!
//! # Configuration
//!
//! This layer gives the node its configuration: it loads an immutable [`config::Snapshot`] of
//! the trunks, numbers, routing rules and credentials the operator stored in Postgres, follows
//! every change (`LISTEN` plus a periodic check), swaps the snapshot atomically, and reports the
//! generation it applied and a heartbeat in the `nodes` table. When Postgres goes away the node
//! keeps serving its last snapshot and catches up when the database is back.
//!
//! The node never migrates the schema: the operator (or local mode) owns it.
//!
//! What must outlive the process lives in the node's state directory (`--state-dir`): the
//! store's spool of call and CDR events ([`store::spool`]) and the last applied configuration
//! ([`config::disk`]), from which a node starts when Postgres does not answer.

pub mod bridge;
pub mod config;
mod database;
pub mod drain;
pub mod http;
pub mod media;
pub mod metrics;
mod node_state;
mod retry;
pub mod signaling;
pub mod sip;
pub mod store;
pub mod webhook;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::config::{SnapshotHandle, Watcher};
#[cfg(test)]
use crate::database::{SchemaState, schema_state, wait_for_schema};
use crate::database::{redact_url, wait_for_database};
use crate::drain::Drain;
use crate::node_state::NodeIdentity;
use crate::retry::DbHealth;

/// Connections of the node's query pool: one for config reloads, one for node-state writes,
/// and headroom. The `LISTEN` connection has a pool of its own.
pub(crate) const POOL_SIZE: u32 = 4;
/// How long the calls the node ends at the drain limit may take to hang up (a BYE's answer is
/// awaited for 4 s at most) and record their CDRs.
const END_CALLS_LIMIT: Duration = Duration::from_secs(6);
/// How long the node may spend recording that it stopped.
const STOP_WRITE_LIMIT: Duration = Duration::from_secs(2);
/// Longest interval accepted for the heartbeat and the config poll (one day): beyond that a
/// timer would be meaningless, and huge values would overflow the timer arithmetic.
const MAX_INTERVAL_MS: u64 = 86_400_000;

/// Arguments of a SIP node.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Identity of this node in the `nodes` table. Must be stable across restarts so that a
    /// restarted node replaces its own row; defaults to the hostname (the pod name in
    /// Kubernetes).
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: Option<String>,

    /// How often the node records that it is alive, in milliseconds.
    #[arg(
        long,
        env = "SWITCHBOARD_HEARTBEAT_INTERVAL_MS",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..=MAX_INTERVAL_MS)
    )]
    pub heartbeat_interval_ms: u64,

    /// How often the node compares the stored config generation with the one it applied, in
    /// milliseconds: catches changes whose notification was missed.
    #[arg(
        long,
        env = "SWITCHBOARD_CONFIG_POLL_INTERVAL_MS",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..=MAX_INTERVAL_MS)
    )]
    pub config_poll_interval_ms: u64,

    /// On SIGTERM, how long calls in progress may go on while the node takes no new ones
    /// (503 to INVITE and OPTIONS, not ready, un-REGISTERed), in seconds; the node stops as
    /// soon as the last call ends. At the limit, or at once on a second signal, it ends the
    /// calls still up itself (BYE on both legs, CANCEL while ringing, CDR reason `node
    /// shutdown`). 0 ends them at once. Keep the pod's `terminationGracePeriodSeconds` above it
    /// plus 12 s.
    #[arg(long, env = "SWITCHBOARD_DRAIN_SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub drain_seconds: u64,

    /// Directory for what a node keeps across restarts (the store's spool, the last applied
    /// configuration), used as `<state-dir>/<node-id>/` [default: /var/lib/switchboard; when
    /// that cannot be created the node runs without both]. In a pod: an `emptyDir` keeps it
    /// across container restarts, a volume across pods.
    #[arg(long, env = "SWITCHBOARD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where call and CDR events are spooled until Postgres has them [default:
    /// `<state-dir>/<node-id>/spool`]; `off` keeps them in memory only.
    #[arg(long, env = "SWITCHBOARD_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Most bytes the spool may hold; beyond it new events are kept in memory only (alert on
    /// `switchboard_store_spool_bytes / switchboard_store_spool_limit_bytes`).
    #[arg(
        long,
        env = "SWITCHBOARD_SPOOL_MAX_BYTES",
        default_value_t = 1 << 30,
        value_parser = clap::value_parser!(u64).range(4096..)
    )]
    pub spool_max_bytes: u64,

    /// How long the node waits for Postgres at start before it serves the configuration it
    /// saved on disk (if it has one; /readyz then says it is stale), in seconds.
    #[arg(
        long,
        env = "SWITCHBOARD_DATABASE_START_TIMEOUT_SECONDS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub database_start_timeout_seconds: u64,

    /// SIP and HTTP settings.
    #[command(flatten)]
    pub sip: signaling::SipArgs,
}

/// The default of `--state-dir`.
const DEFAULT_STATE_DIR: &str = "/var/lib/switchboard";
/// How long a node whose database answers waits for its first configuration before it starts
/// signaling (a spool replay prices lost calls from it).
const FIRST_LOAD_WAIT: Duration = Duration::from_secs(3);

/// Runs a SIP node until SIGTERM or SIGINT, then records that it stopped and returns `Ok`.
///
/// Waits (with backoff, logging why) while Postgres is unreachable or its schema is not
/// migrated yet; returns an error only for what waiting cannot fix, such as a malformed
/// database URL or an unknown hostname with no `--node-id`.
pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    // Settings that no amount of waiting fixes are checked before anything starts.
    args.sip.signer()?;
    args.sip.egress()?;
    let hostname = hostname::get().ok().map(|name| name.to_string_lossy().into_owned()).filter(|name| !name.is_empty());
    let node_id = match (args.node_id.as_deref().map(str::trim), &hostname) {
        (Some(""), _) => anyhow::bail!("--node-id must not be empty"),
        (Some(id), _) => id.to_owned(),
        (None, Some(hostname)) => hostname.clone(),
        (None, None) => {
            anyhow::bail!("cannot determine the hostname to use as the node id; pass --node-id")
        }
    };
    let hostname = hostname.unwrap_or_else(|| "unknown".into());
    let node = NodeIdentity { node_id, hostname, version: env!("CARGO_PKG_VERSION"), started_at: chrono::Utc::now() };
    tracing::info!(
        node_id = %node.node_id,
        version = node.version,
        database = %redact_url(&args.database_url),
        "starting SIP node {}",
        node.node_id
    );

    let handle = SnapshotHandle::default();
    let pool_slot = OnceLock::new();
    let mut tasks = JoinSet::new();
    let mut graceful = JoinSet::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = Drain::with_limit(Duration::from_secs(args.drain_seconds));
    let outcome = tokio::select! {
        result = start(
            &args,
            &node,
            &handle,
            &pool_slot,
            signaling::NodeTasks { tasks: &mut tasks, graceful: &mut graceful, stop: stop_rx, drain: drain.clone() },
        ) => result,
        signal = shutdown_signal() => signal.map(|name| tracing::info!("received {name}")),
    };
    if outcome.is_ok() {
        drain_calls(&drain, Duration::from_secs(args.drain_seconds)).await;
    }
    // Un-REGISTER and flush the store before the rest stops, within a grace period.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(signaling::STOP_GRACE + Duration::from_secs(1), async {
        while graceful.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period over; stopping anyway");
    }
    graceful.shutdown().await;
    tasks.shutdown().await;
    if let Some(pool) = pool_slot.get() {
        node_state::mark_stopped(pool, &node.node_id, STOP_WRITE_LIMIT).await;
    }
    outcome
}

/// Lets the calls in progress end, for at most `limit`, while the node takes no new ones; a
/// second signal cuts it short. Calls still up then are ended by the node itself
/// ([`end_calls`]), so that both legs hear a BYE and each call has its CDR.
async fn drain_calls(drain: &Drain, limit: Duration) {
    drain.begin();
    let calls = drain.calls();
    if calls == 0 {
        tracing::info!(calls, "stopping");
        return;
    }
    if limit.is_zero() {
        end_calls(drain).await;
        return;
    }
    tracing::info!(
        calls,
        "draining: new calls get 503, calls in progress go on for up to {}s (signal again to stop now)",
        limit.as_secs()
    );
    tokio::select! {
        () = drain.wait_idle() => {
            tracing::info!("drained: no call in progress; stopping");
            return;
        }
        () = tokio::time::sleep(limit) => {
            tracing::warn!(calls = drain.calls(), "drain time over; ending the calls in progress");
        }
        signal = shutdown_signal() => {
            let name = signal.unwrap_or("signal");
            tracing::warn!(calls = drain.calls(), "received {name} while draining; ending the calls in progress now");
        }
    }
    end_calls(drain).await;
}

/// Ends every call in progress (BYE on both legs, CANCEL to callees still ringing, `stop` to
/// agents; CDR reason `node shutdown`) and waits, bounded, until their tasks have recorded it.
async fn end_calls(drain: &Drain) {
    let calls = drain.calls();
    tracing::info!(calls, "ending {calls} calls in progress: BYE on both legs, CDR reason `{}`", drain::NODE_SHUTDOWN);
    drain.end_calls();
    match tokio::time::timeout(END_CALLS_LIMIT, drain.wait_idle()).await {
        Ok(()) => tracing::info!("every call ended; stopping"),
        Err(_) => tracing::warn!(calls = drain.calls(), "stopping with calls still in progress after ending them"),
    }
}

/// Connects, starts the watcher and the node-state task, and returns only if one of them
/// fails unexpectedly (or the configuration is unusable).
async fn start(
    args: &NodeArgs,
    node: &NodeIdentity,
    handle: &SnapshotHandle,
    pool_slot: &OnceLock<PgPool>,
    lifecycle: signaling::NodeTasks<'_>,
) -> anyhow::Result<()> {
    let signaling::NodeTasks { tasks, graceful, stop, drain } = lifecycle;
    let state = state_dir(args.state_dir.as_deref(), &node.node_id)?;
    let disk = state.as_deref().map(config::disk::DiskSnapshot::new);
    let timeout = Duration::from_secs(args.database_start_timeout_seconds);
    let pool = wait_for_database(&args.database_url, timeout, handle, disk.as_ref()).await?;
    let pool = pool_slot.get_or_init(|| pool).clone();

    let health = DbHealth::default();
    let watcher = Watcher::new(
        pool.clone(),
        config::listener_pool(&pool),
        handle.clone(),
        health.clone(),
        Duration::from_millis(args.config_poll_interval_ms),
    );
    tasks.spawn(watcher.run());
    if let Some(disk) = disk {
        tasks.spawn(config::disk::keep_saved(handle.clone(), disk));
    }
    if !handle.is_stale() {
        let mut applied = handle.subscribe();
        let _ = tokio::time::timeout(FIRST_LOAD_WAIT, applied.wait_for(|g| *g >= 0)).await;
    }
    let mut sip = args.sip.clone();
    sip.spool = match (&args.spool_dir, &state) {
        (Some(dir), _) if dir.as_os_str() == "off" => None,
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(state)) => Some(state.join("spool")),
        (None, None) => None,
    }
    .map(|dir| store::spool::SpoolOptions { dir, max_bytes: args.spool_max_bytes, rate_of: None });
    if sip.spool.is_none() {
        tracing::warn!("no spool: calls and CDRs not yet in Postgres are lost if the node stops during an outage");
    }
    let liveness =
        node_state::Liveness { every: Duration::from_millis(args.heartbeat_interval_ms), drain: drain.clone() };
    signaling::start(
        &sip,
        pool.clone(),
        &node.node_id,
        handle.clone(),
        signaling::NodeTasks { tasks, graceful, stop, drain },
    )
    .await?;
    tasks.spawn(node_state::run(pool, node.clone(), handle.clone(), health, liveness));
    match tasks.join_next().await {
        Some(Err(error)) => Err(anyhow::anyhow!("a node task failed: {error}")),
        _ => Err(anyhow::anyhow!("a node task stopped unexpectedly")),
    }
}

/// The node's own state directory, `<base>/<node-id>` (created `0700`). A default base that
/// cannot be created turns the spool and the saved configuration off with a warning; an
/// explicit `--state-dir` that cannot be is an error.
fn state_dir(explicit: Option<&Path>, node_id: &str) -> anyhow::Result<Option<PathBuf>> {
    let base = explicit.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), Path::to_path_buf);
    // Node ids are host names; anything else must not leave the base directory.
    let mut name: String =
        node_id.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if name.chars().all(|c| c == '.') {
        name = name.replace('.', "_");
    }
    let dir = base.join(name);
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(&dir) {
        Ok(()) => Ok(Some(dir)),
        Err(error) if explicit.is_some() => {
            anyhow::bail!("--state-dir: cannot create {}: {error}", dir.display())
        }
        Err(error) => {
            tracing::warn!(
                "cannot create the state directory {}: {error}; running without a spool and without a saved \
                 configuration (set --state-dir)",
                dir.display()
            );
            Ok(None)
        }
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C) with the signal's name.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
    }
}

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
