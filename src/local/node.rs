//! The SIP node of local mode: a child process of this executable (`switchboard node`), in its
//! own process group, restarted with backoff when it exits, stopped in order on shutdown.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use switchboard_model::logging::LogFormat;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{LocalArgs, LocalError, RETRY_MAX, WebhookSecret};
use crate::postgres::Postgres;
use crate::process::{self, Backoff};

/// A node that ran this long before exiting restarts after the shortest delay again.
const NODE_STABLE_RUN: Duration = Duration::from_secs(60);
/// How long a node may take to stop after SIGTERM before it is killed.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start the SIP node: this executable, `node --node-id ID` with DATABASE_URL set.
#[derive(Debug, Clone)]
pub(super) struct NodeCommand {
    exe: PathBuf,
    database_url: String,
    node_id: String,
    log_format: LogFormat,
    /// The node's `--state-dir` (spool, saved configuration): private to this local run and
    /// removed with it, so that a later run on a fresh database never replays this run's
    /// spool. `None` when `SWITCHBOARD_STATE_DIR` names one, which the node then inherits.
    state_dir: Option<std::sync::Arc<tempfile::TempDir>>,
    /// Passed in the environment (not argv, where `ps` shows it).
    webhook_secret: String,
    /// The API's egress allow-list, which the node applies to the same URLs.
    egress_allow: String,
}

pub(super) fn node_command(
    args: &LocalArgs,
    postgres: &Postgres,
    log_format: LogFormat,
    webhook_secret: &WebhookSecret,
) -> Result<NodeCommand, LocalError> {
    Ok(NodeCommand {
        exe: std::env::current_exe().map_err(LocalError::CurrentExe)?,
        database_url: postgres.url().to_string(),
        node_id: args.node_id.clone(),
        log_format,
        state_dir: match std::env::var_os("SWITCHBOARD_STATE_DIR") {
            Some(_) => None,
            None => Some(std::sync::Arc::new(
                tempfile::Builder::new().prefix("switchboard-local-node-").tempdir().map_err(LocalError::StateDir)?,
            )),
        },
        webhook_secret: webhook_secret.value.clone(),
        egress_allow: args.api.egress_allow.join(","),
    })
}

impl NodeCommand {
    /// Starts the node with inherited stdout/stderr, in its own process group (so that a
    /// terminal Ctrl-C reaches local mode only, which then stops the node in order).
    fn spawn(&self) -> Result<Child, LocalError> {
        let log_format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let mut command = Command::new(&self.exe);
        command
            .args(["--log-format", log_format, "node", "--node-id", &self.node_id])
            // Ctrl-C on a workstation stops now; draining calls is for rolling updates.
            .args(["--drain-seconds", "0"])
            // Through the environment, not argv: the URL may carry a password, and argv is
            // visible to every user in `ps`.
            .env("DATABASE_URL", &self.database_url)
            .env("SWITCHBOARD_WEBHOOK_SECRET", &self.webhook_secret)
            .env("SWITCHBOARD_EGRESS_ALLOW", &self.egress_allow)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.state_dir {
            command.arg("--state-dir").arg(dir.path());
        }
        process::die_with_parent(&mut command, Signal::SIGTERM);
        command.spawn().map_err(|error| LocalError::SpawnNode { exe: self.exe.clone(), error })
    }
}

/// The SIP node child process and the task that restarts it when it exits.
pub(super) struct NodeSupervisor {
    pub(super) first_pid: u32,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl NodeSupervisor {
    /// Starts the node and supervises it in a background task.
    pub(super) fn start(command: NodeCommand) -> Result<Self, LocalError> {
        let child = command.spawn()?;
        let first_pid = child.id().unwrap_or_default();
        tracing::info!(node_id = %command.node_id, pid = first_pid, "started SIP node");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(supervise(command, child, stopped));
        Ok(Self { first_pid, stop, task })
    }

    /// Stops the node (SIGTERM, bounded wait, SIGKILL) and the supervision.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Waits for the node to exit and restarts it with backoff, until `stop` fires.
async fn supervise(command: NodeCommand, mut child: Child, mut stop: oneshot::Receiver<()>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), RETRY_MAX);
    loop {
        let started = Instant::now();
        let Some(exit) = wait_or_stop(&mut child, &mut stop).await else {
            return;
        };
        if started.elapsed() >= NODE_STABLE_RUN {
            backoff.reset();
        }
        let reason = format!("exited unexpectedly ({exit})");
        let Some(next) = restart(&command, reason, &mut backoff, &mut stop).await else {
            return;
        };
        child = next;
    }
}

/// Waits for the node to exit (`Some(exit status)`), or for `stop`: then stops it and returns
/// `None`.
async fn wait_or_stop(child: &mut Child, stop: &mut oneshot::Receiver<()>) -> Option<String> {
    tokio::select! {
        status = child.wait() => Some(match status {
            Ok(status) => status.to_string(),
            Err(error) => error.to_string(),
        }),
        _ = stop => {
            let pid = child.id();
            if !process::stop_child(child, Signal::SIGTERM, NODE_STOP_TIMEOUT).await {
                tracing::warn!(?pid, "SIP node did not stop within {NODE_STOP_TIMEOUT:?}; killed it");
            }
            None
        }
    }
}

/// Sleeps with backoff and starts the node again until it starts; `None` when `stop` fires.
async fn restart(
    command: &NodeCommand,
    mut reason: String,
    backoff: &mut Backoff,
    stop: &mut oneshot::Receiver<()>,
) -> Option<Child> {
    loop {
        let delay = backoff.next_delay();
        tracing::warn!(node_id = %command.node_id, "SIP node {reason}; restarting it in {delay:?}");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = &mut *stop => return None,
        }
        match command.spawn() {
            Ok(child) => {
                tracing::info!(node_id = %command.node_id, pid = child.id(), "restarted SIP node");
                return Some(child);
            }
            Err(error) => reason = format!("could not be started: {error}"),
        }
    }
}
