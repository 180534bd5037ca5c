//! The `switchboard-node` binary as a child process whose stderr is collected line by line,
//! with bounded waits, for the tests that signal, kill and restart a node.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest wait for anything a node process does.
pub const LIMIT: Duration = Duration::from_secs(30);

/// A running node process.
pub struct NodeProcess {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl NodeProcess {
    /// Starts the node on loopback (ports chosen by the OS) with its state in `state_dir` and
    /// `extra` flags after the usual ones.
    pub fn start(database_url: &str, node_id: &str, state_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard-node"))
            .args(["--database-url", database_url, "--node-id", node_id])
            .args(["--heartbeat-interval-ms", "200", "--config-poll-interval-ms", "200"])
            .args(["--sip-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            // Nodes refuse to start without one (webhook signatures must be verifiable).
            .env("SWITCHBOARD_WEBHOOK_SECRET", "process-test-webhook-secret")
            .env_remove("SWITCHBOARD_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchboard-node");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        Self { child, log }
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().expect("log lock").iter().any(|line| line.contains(needle))
    }

    pub fn dump(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !self.logged(needle) {
            assert!(tokio::time::Instant::now() < deadline, "no log line containing {needle:?}; log:\n{}", self.dump());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address a `key=ADDR` field of the first log line containing `message` names.
    pub fn logged_addr(&self, message: &str, key: &str) -> SocketAddr {
        let log = self.log.lock().expect("log lock");
        let line = log.iter().find(|line| line.contains(message)).unwrap_or_else(|| panic!("no {message:?} line"));
        let field =
            line.split_whitespace().find_map(|word| word.strip_prefix(&format!("{key}="))).expect("address field");
        field.parse().unwrap_or_else(|_| panic!("not an address: {field:?} in {line:?}"))
    }

    /// The SIP and HTTP addresses, once the node listens.
    pub async fn listening(&self) -> (SocketAddr, SocketAddr) {
        self.wait_for_log("metrics and health on HTTP").await;
        (self.logged_addr("SIP listening", "sip"), self.logged_addr("metrics and health on HTTP", "http"))
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([&format!("-{signal}"), &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -{signal} {pid} failed");
    }

    /// Waits (bounded) for the node to exit by itself; the exit status and the whole log.
    pub async fn exited(mut self) -> (ExitStatus, String) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the node") {
                // Let the stderr reader take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return (status, self.dump());
            }
            assert!(tokio::time::Instant::now() < deadline, "the node kept running; log:\n{}", self.dump());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub async fn kill(self) -> String {
        self.signal("KILL");
        self.exited().await.1
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Never leave a node running behind a failed assertion.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
