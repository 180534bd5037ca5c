//! Postgres for local mode: the one named by DATABASE_URL, or a private throwaway cluster.
//!
//! The private cluster lives in a fresh temporary directory (`data/`, the server log
//! `postgres.log` and the Unix socket), listens on a free loopback port only, trusts local
//! connections and is removed again when local mode exits. `initdb` and `postgres` refuse to run
//! as root, so when this process is root they run as the `postgres` system user (created if
//! missing). When no server binaries are installed and this process is root on a machine with
//! `apt-get`, the `postgresql` package is installed first.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Group, Uid, User};
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

use crate::process;

/// The database local mode creates in a private cluster (also spelled out in `create_database`).
pub const DATABASE_NAME: &str = "switchboard";
/// The Debian package that carries the server binaries.
const PACKAGE: &str = "postgresql";
/// The system user the server runs as when this process is root.
const SERVER_USER: &str = "postgres";
/// How long a fresh cluster may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping cluster may take to shut down before it is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Postgres' fast shutdown: it ends sessions instead of waiting for them, as SIGTERM's smart
/// shutdown would (a lingering client would turn every stop into a SIGKILL).
const SHUTDOWN_SIGNAL: Signal = Signal::SIGINT;
/// Attempts at starting the server (a free port can be taken by someone else in between).
const START_ATTEMPTS: u32 = 3;

/// Errors of bringing up (or finding) Postgres, each saying what to do about it. Messages carry
/// their cause inline (no `source()` chain), so that `{:#}` prints every cause exactly once.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found (looked in `pg_config --bindir`, \
         /usr/lib/postgresql/*/bin and PATH). Install the `{PACKAGE}` package (Debian/Ubuntu: \
         `sudo apt-get install -y {PACKAGE}`), or set DATABASE_URL (or --database-url) to an \
         existing database"
    )]
    NotInstalled,
    #[error(
        "installing PostgreSQL failed (`{command}` {outcome}); install the `{PACKAGE}` package \
         by hand, or set DATABASE_URL (or --database-url) to an existing database"
    )]
    Install { command: String, outcome: String },
    #[error(
        "cannot prepare the `{SERVER_USER}` system user that runs a private cluster as root: \
         {message}; create it (`useradd --system --user-group {SERVER_USER}`) or run as a \
         non-root user"
    )]
    ServerUser { message: String },
    #[error("cannot {action}: {error}")]
    Io { action: String, error: std::io::Error },
    #[error(
        "initdb failed ({status}) for {dir}:\n{output}\nCheck that the directory is writable by \
         the server user, or set DATABASE_URL to an existing database"
    )]
    Initdb { status: ExitStatus, dir: PathBuf, output: String },
    #[error(
        "the private Postgres server exited during startup ({status}); its log ({log}) ends \
         with:\n{log_tail}"
    )]
    Exited { status: ExitStatus, log: PathBuf, log_tail: String },
    #[error(
        "the private Postgres server did not accept connections within {timeout:?}; its log \
         ({log}) ends with:\n{log_tail}"
    )]
    StartupTimeout { timeout: Duration, log: PathBuf, log_tail: String },
    #[error("cannot create database `{DATABASE_NAME}` in the private cluster: {0}")]
    CreateDatabase(sqlx::Error),
}

impl PostgresError {
    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let action = action.into();
        move |error| Self::Io { action, error }
    }
}

/// The Postgres local mode uses: an external database or a private cluster it owns.
pub enum Postgres {
    /// A database named by DATABASE_URL / `--database-url`; never started or stopped here.
    External { url: String },
    /// A throwaway cluster started for this process.
    Private(Box<PrivateCluster>),
}

impl Postgres {
    /// Uses `database_url` when given, otherwise starts a private cluster.
    pub async fn ensure(database_url: Option<String>) -> Result<Self, PostgresError> {
        match database_url.filter(|url| !url.trim().is_empty()) {
            Some(url) => Ok(Self::External { url }),
            None => Ok(Self::Private(Box::new(PrivateCluster::start().await?))),
        }
    }

    /// The connection URL (may contain a password: redact before printing).
    pub fn url(&self) -> &str {
        match self {
            Self::External { url } => url,
            Self::Private(cluster) => cluster.url(),
        }
    }

    /// Where the database comes from, for the summary (no URL, so no password).
    pub fn describe(&self) -> String {
        match self {
            Self::External { .. } => "external (DATABASE_URL / --database-url)".to_string(),
            Self::Private(cluster) => cluster.describe(),
        }
    }

    /// Stops the private cluster, if there is one.
    pub async fn stop(self) {
        if let Self::Private(cluster) = self {
            cluster.stop().await;
        }
    }
}

/// A private Postgres cluster: a child `postgres` process on a loopback port, its data in a
/// temporary directory. Stopped by [`PrivateCluster::stop`], or (blocking) when dropped.
pub struct PrivateCluster {
    /// The running server; `None` before the launch and once stopped.
    server: Option<Server>,
    port: u16,
    url: String,
    log: PathBuf,
    /// Removed (recursively) when the cluster is dropped, after the server stopped.
    dir: tempfile::TempDir,
}

/// The `postgres` child process.
struct Server {
    child: Child,
    pid: u32,
}

impl PrivateCluster {
    /// Initialises a fresh cluster in a temporary directory, starts it, waits until it accepts
    /// connections and creates the `switchboard` database.
    pub async fn start() -> Result<Self, PostgresError> {
        let bindir = ensure_server_binaries().await?;
        let owner = ServerOwner::for_current_user()?;
        let dir = create_cluster_dir(&owner)?;
        init_cluster(&bindir, dir.path(), &owner).await?;
        let log = dir.path().join("postgres.log");
        let mut cluster = Self { server: None, port: 0, url: String::new(), log, dir };
        for attempt in 1..=START_ATTEMPTS {
            cluster.launch(&bindir, &owner)?;
            match cluster.wait_until_ready().await {
                Ok(()) => break,
                // The port was taken between choosing and binding it: try another one.
                Err(error) if is_port_clash(&error) && attempt < START_ATTEMPTS => {
                    tracing::debug!(port = cluster.port, "port taken; starting Postgres on another one");
                }
                Err(error) => {
                    cluster.stop_server().await;
                    return Err(error);
                }
            }
        }
        if let Err(error) = cluster.create_database().await {
            cluster.stop_server().await;
            return Err(error);
        }
        Ok(cluster)
    }

    /// The connection URL of the `switchboard` database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process id (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(|server| server.pid)
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The directory holding the data, the log and the socket (removed on stop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// One line for the summary.
    pub fn describe(&self) -> String {
        format!(
            "private cluster (pid {}, data {}, log {}; removed on exit)",
            self.pid().unwrap_or_default(),
            self.dir().join("data").display(),
            self.log_path().display()
        )
    }

    /// Stops the server (fast shutdown, a bounded wait, then SIGKILL) and removes the directory.
    pub async fn stop(mut self) {
        self.stop_server().await;
        // Dropping `self` removes the directory.
    }

    /// Stops the server but keeps its data (for tests that stage a database outage); see
    /// [`Self::resume`].
    #[allow(dead_code, reason = "used by the tests that include this file (sip-node/tests/reliability.rs)")]
    pub async fn pause(&mut self) {
        self.stop_server().await;
    }

    /// Starts a paused server again on the same port and waits until it accepts connections.
    #[allow(dead_code, reason = "used by the tests that include this file (sip-node/tests/reliability.rs)")]
    pub async fn resume(&mut self) -> Result<(), PostgresError> {
        let bindir = ensure_server_binaries().await?;
        let owner = ServerOwner::for_current_user()?;
        self.launch_on(&bindir, &owner, self.port)?;
        self.wait_until_ready().await
    }

    async fn stop_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            tracing::debug!(pid = server.pid, "stopping the private Postgres");
            if !process::stop_child(&mut server.child, SHUTDOWN_SIGNAL, SHUTDOWN_TIMEOUT).await {
                tracing::warn!(pid = server.pid, "Postgres did not stop within {SHUTDOWN_TIMEOUT:?}; killed it");
            }
        }
    }

    /// Starts `postgres` on a free loopback port, its output going to the log file.
    fn launch(&mut self, bindir: &Path, owner: &ServerOwner) -> Result<(), PostgresError> {
        let port = free_loopback_port()?;
        self.launch_on(bindir, owner, port)
    }

    /// Starts `postgres` on `port`, its output going to the log file.
    fn launch_on(&mut self, bindir: &Path, owner: &ServerOwner, port: u16) -> Result<(), PostgresError> {
        let log = File::create(&self.log).map_err(PostgresError::io(format!("create {}", self.log.display())))?;
        let log_err = log.try_clone().map_err(PostgresError::io("duplicate the log file handle"))?;
        let dir = self.dir.path();
        let mut command = Command::new(bindir.join("postgres"));
        command
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-k")
            .arg(dir)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            // A throwaway cluster: durability is not worth the fsyncs.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: a Ctrl-C in the terminal reaches local mode only, which then
            // stops the node before the database instead of both at once.
            .process_group(0)
            // Safety net should a future holding the cluster be dropped without Drop running.
            .kill_on_drop(true);
        owner.apply(&mut command);
        process::die_with_parent(&mut command, SHUTDOWN_SIGNAL);
        let child = command.spawn().map_err(PostgresError::io("start the postgres server"))?;
        let pid = child.id().unwrap_or_default();
        tracing::debug!(pid, port, dir = %dir.display(), "started private Postgres");
        self.server = Some(Server { child, pid });
        self.port = port;
        self.url = format!("postgres://{SERVER_USER}@127.0.0.1:{port}/{DATABASE_NAME}");
        Ok(())
    }

    /// Waits (bounded) until the server accepts connections.
    async fn wait_until_ready(&mut self) -> Result<(), PostgresError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let url = self.admin_url();
        loop {
            let exited = self.server.as_mut().and_then(|server| server.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.server = None;
                return Err(PostgresError::Exited { status, log: self.log.clone(), log_tail: self.log_tail() });
            }
            if let Ok(conn) = PgConnection::connect(&url).await {
                let _ = conn.close().await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                let (log, log_tail) = (self.log.clone(), self.log_tail());
                return Err(PostgresError::StartupTimeout { timeout: STARTUP_TIMEOUT, log, log_tail });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn create_database(&self) -> Result<(), PostgresError> {
        let mut conn = PgConnection::connect(&self.admin_url()).await.map_err(PostgresError::CreateDatabase)?;
        sqlx::query("CREATE DATABASE switchboard").execute(&mut conn).await.map_err(PostgresError::CreateDatabase)?;
        let _ = conn.close().await;
        Ok(())
    }

    /// The URL of the maintenance database `postgres`.
    fn admin_url(&self) -> String {
        format!("postgres://{SERVER_USER}@127.0.0.1:{}/postgres", self.port)
    }

    fn log_tail(&self) -> String {
        read_tail(&self.log, 20)
    }
}

impl Drop for PrivateCluster {
    /// Last resort when [`PrivateCluster::stop`] was not awaited (an error path, a panic, a
    /// cancelled startup): stops the server with blocking waits before the directory goes.
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            process::stop_child_blocking(&mut server.child, SHUTDOWN_SIGNAL, SHUTDOWN_TIMEOUT);
        }
    }
}

/// True when a server that exited during startup could not bind its port.
fn is_port_clash(error: &PostgresError) -> bool {
    matches!(error, PostgresError::Exited { log_tail, .. } if log_tail.contains("could not bind")
        || log_tail.contains("Address already in use"))
}

/// Who owns and runs the cluster: this process, or the `postgres` system user when root.
struct ServerOwner {
    /// `Some` when the server must run as another user.
    switch_to: Option<(Uid, Gid)>,
}

impl ServerOwner {
    fn for_current_user() -> Result<Self, PostgresError> {
        if !Uid::effective().is_root() {
            return Ok(Self { switch_to: None });
        }
        let user = server_user()?;
        Ok(Self { switch_to: Some((user.uid, user.gid)) })
    }

    fn chown(&self, path: &Path) -> Result<(), PostgresError> {
        if let Some((uid, gid)) = self.switch_to {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|errno| PostgresError::Io {
                action: format!("give {} to the {SERVER_USER} user", path.display()),
                error: errno.into(),
            })?;
        }
        Ok(())
    }

    fn apply(&self, command: &mut Command) {
        if let Some((uid, gid)) = self.switch_to {
            // std drops supplementary groups, then sets the gid and the uid, before exec.
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
    }
}

/// The `postgres` system user, created (`useradd --system`) when missing.
fn server_user() -> Result<User, PostgresError> {
    let lookup =
        || User::from_name(SERVER_USER).map_err(|errno| PostgresError::ServerUser { message: errno.to_string() });
    if let Some(user) = lookup()? {
        return Ok(user);
    }
    eprintln!("switchboard: creating the `{SERVER_USER}` system user to run a private Postgres");
    let group_exists = Group::from_name(SERVER_USER).ok().flatten().is_some();
    let mut command = std::process::Command::new("useradd");
    command.args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]);
    if group_exists {
        command.args(["--gid", SERVER_USER]);
    } else {
        command.arg("--user-group");
    }
    let output = command
        .arg(SERVER_USER)
        .output()
        .map_err(|error| PostgresError::ServerUser { message: format!("cannot run useradd: {error}") })?;
    if !output.status.success() {
        let message = format!("useradd failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
        return Err(PostgresError::ServerUser { message });
    }
    lookup()?.ok_or_else(|| PostgresError::ServerUser { message: "useradd succeeded but the user is missing".into() })
}

/// A fresh temporary directory for the cluster, owned by the server user.
fn create_cluster_dir(owner: &ServerOwner) -> Result<tempfile::TempDir, PostgresError> {
    let dir = tempfile::Builder::new()
        .prefix("switchboard-postgres-")
        .tempdir()
        .map_err(PostgresError::io("create a temporary directory for the private Postgres"))?;
    owner.chown(dir.path())?;
    Ok(dir)
}

/// Runs `initdb` (trust authentication, superuser `postgres`) into `<dir>/data`.
async fn init_cluster(bindir: &Path, dir: &Path, owner: &ServerOwner) -> Result<(), PostgresError> {
    let data = dir.join("data");
    let mut command = Command::new(bindir.join("initdb"));
    command
        .arg("-D")
        .arg(&data)
        .args(["--username", SERVER_USER, "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    owner.apply(&mut command);
    let output = command.output().await.map_err(PostgresError::io("run initdb"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(PostgresError::Initdb { status: output.status, dir: data, output: text.trim().to_string() })
}

/// The server binaries' directory, installing the `postgresql` package when they are missing
/// and this process may (root, `apt-get` present).
pub async fn ensure_server_binaries() -> Result<PathBuf, PostgresError> {
    if let Some(bindir) = find_server_binaries() {
        return Ok(bindir);
    }
    if !Uid::effective().is_root() || which("apt-get").is_none() {
        return Err(PostgresError::NotInstalled);
    }
    install_postgresql().await?;
    find_server_binaries().ok_or(PostgresError::NotInstalled)
}

/// Looks for a directory holding both `initdb` and `postgres`: `pg_config --bindir`, then the
/// highest version under /usr/lib/postgresql, then PATH.
pub fn find_server_binaries() -> Option<PathBuf> {
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    from_pg_config.into_iter().chain(debian_bindirs()).chain(path_bindirs()).find(|dir| has_server_binaries(dir))
}

fn has_server_binaries(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// `/usr/lib/postgresql/<version>/bin`, highest version first.
fn debian_bindirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = name.split('.').map(str::parse).collect::<Result<Vec<u64>, _>>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// The directories of `initdb` on PATH, with symlinks resolved (Debian links only some
/// binaries into /usr/bin).
fn path_bindirs() -> Vec<PathBuf> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    std::env::split_paths(&path)
        .map(|dir| dir.join("initdb"))
        .filter(|initdb| initdb.is_file())
        .filter_map(|initdb| std::fs::canonicalize(initdb).ok())
        .filter_map(|initdb| initdb.parent().map(Path::to_path_buf))
        .collect()
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

/// `apt-get update` and `apt-get install postgresql`, showing the user what happens.
async fn install_postgresql() -> Result<(), PostgresError> {
    eprintln!("switchboard: PostgreSQL server binaries not found; installing the `{PACKAGE}` package");
    run_apt(&["update"]).await?;
    run_apt(&["install", "-y", "--no-install-recommends", PACKAGE]).await
}

async fn run_apt(args: &[&str]) -> Result<(), PostgresError> {
    let command_line = format!("DEBIAN_FRONTEND=noninteractive apt-get {}", args.join(" "));
    eprintln!("switchboard: running `{command_line}`");
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .await
        .map_err(|error| PostgresError::Install { command: command_line.clone(), outcome: error.to_string() })?;
    if status.success() {
        Ok(())
    } else {
        Err(PostgresError::Install { command: command_line, outcome: format!("failed: {status}") })
    }
}

/// A loopback TCP port that was free a moment ago.
fn free_loopback_port() -> Result<u16, PostgresError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(PostgresError::io("find a free loopback port"))?;
    let port = listener.local_addr().map_err(PostgresError::io("find a free loopback port"))?.port();
    Ok(port)
}

/// The last `lines` lines of a file (empty when unreadable).
fn read_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log");
        std::fs::write(&file, "a\nb\nc\n").unwrap();
        assert_eq!(read_tail(&file, 2), "b\nc");
        assert_eq!(read_tail(&file, 10), "a\nb\nc");
        assert_eq!(read_tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn port_clash_is_recognised_from_the_log() {
        let clash = PostgresError::Exited {
            status: std::process::ExitStatus::default(),
            log: PathBuf::from("log"),
            log_tail: "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use".into(),
        };
        assert!(is_port_clash(&clash));
    }

    #[test]
    fn external_url_is_used_as_given() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let postgres = runtime.block_on(Postgres::ensure(Some("postgres://u:p@h/db".into()))).unwrap();
        assert_eq!(postgres.url(), "postgres://u:p@h/db");
        assert!(!postgres.describe().contains("u:p"));
    }
}
