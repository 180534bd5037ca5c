//! The last applied configuration snapshot on the node's disk, so that a node can start (and
//! take calls) while Postgres is away.
//!
//! Every generation the node applies is written to `config-snapshot.json` in its state
//! directory: a temporary file, `fsync`, `rename`, the directory synced, so a crash leaves the
//! old file or the new one, never half of one. The file holds the trunks' digest credentials,
//! so it is created `0600`. At start, when Postgres does not answer within
//! `--database-start-timeout-seconds`, the node serves this snapshot
//! ([`SnapshotHandle::serve_saved`]), marked stale on `/readyz` until Postgres confirms its
//! generation or a newer one is loaded.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchboard_model::{Credential, NumberConfig, RuleConfig, TrunkConfig, TrunkTls};

use super::{Snapshot, SnapshotHandle};

const FILE: &str = "config-snapshot.json";
/// The file's format; a file of another version is ignored (with a warning), not misread.
const FORMAT: u32 = 1;

/// Why the saved snapshot cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the saved configuration {} is unusable: {problem}", path.display())]
    Unusable { path: PathBuf, problem: String },
}

/// The file's contents.
#[derive(Serialize, Deserialize)]
struct Saved {
    format: u32,
    generation: i64,
    saved_at: DateTime<Utc>,
    trunks: Vec<TrunkConfig>,
    numbers: Vec<NumberConfig>,
    rules: Vec<RuleConfig>,
    credentials: Vec<Credential>,
    /// Trunks' TLS material; absent in files saved before it existed.
    #[serde(default)]
    trunk_tls: Vec<TrunkTls>,
}

/// A saved snapshot read back.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub saved_at: DateTime<Utc>,
}

/// The saved snapshot of one node.
#[derive(Debug, Clone)]
pub struct DiskSnapshot {
    dir: PathBuf,
}

impl DiskSnapshot {
    /// The snapshot file in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Writes `snapshot` atomically, readable by the owner only.
    pub fn save(&self, snapshot: &Snapshot) -> Result<(), DiskError> {
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| DiskError::Io { action, path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let saved = Saved {
            format: FORMAT,
            generation: snapshot.generation(),
            saved_at: Utc::now(),
            trunks: snapshot.trunks().map(|t| t.as_ref().clone()).collect(),
            numbers: snapshot.numbers().cloned().collect(),
            rules: snapshot.rules().iter().map(|r| r.as_ref().clone()).collect(),
            credentials: snapshot.credentials().cloned().collect(),
            trunk_tls: snapshot.all_trunk_tls().map(|t| t.as_ref().clone()).collect(),
        };
        let bytes = serde_json::to_vec(&saved)
            .map_err(|error| DiskError::Unusable { path: self.path(), problem: error.to_string() })?;
        let (path, tmp) = (self.path(), self.dir.join(format!("{FILE}.tmp")));
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&bytes).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
        fs::File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(io("sync", &self.dir))
    }

    /// Reads the saved snapshot; `Ok(None)` when there is none.
    pub fn load(&self) -> Result<Option<Loaded>, DiskError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(DiskError::Io { action: "read", path, source }),
        };
        let unusable = |problem: String| DiskError::Unusable { path: path.clone(), problem };
        let saved: Saved = serde_json::from_slice(&bytes).map_err(|error| unusable(error.to_string()))?;
        if saved.format != FORMAT {
            return Err(unusable(format!("format {} (this node reads format {FORMAT})", saved.format)));
        }
        let snapshot =
            Snapshot::from_parts(saved.generation, saved.trunks, saved.numbers, saved.rules, saved.credentials)
                .map_err(|error| unusable(error.to_string()))?
                .with_trunk_tls(saved.trunk_tls);
        Ok(Some(Loaded { snapshot, saved_at: saved.saved_at }))
    }
}

/// Saves every generation the node applies from Postgres (not the saved one it may start
/// with). Runs until the handle is gone; a failed write is logged and retried with the next
/// generation.
pub async fn keep_saved(handle: SnapshotHandle, disk: DiskSnapshot) {
    let mut generations = handle.subscribe();
    let mut saved = None;
    loop {
        let current = handle.current();
        if !handle.is_stale() && current.generation() != Snapshot::UNLOADED && saved != Some(current.generation()) {
            let generation = current.generation();
            let disk = disk.clone();
            match tokio::task::spawn_blocking(move || disk.save(&current)).await {
                Ok(Ok(())) => {
                    tracing::debug!(generation, "saved config generation {generation} to disk");
                    saved = Some(generation);
                }
                Ok(Err(error)) => tracing::warn!(%error, "cannot save config generation {generation} to disk: {error}"),
                Err(_) => tracing::warn!("saving config generation {generation} to disk failed"),
            }
        }
        if generations.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{credential, number, rule, trunk};
    use switchboard_model::Direction;

    fn snapshot(generation: i64) -> Snapshot {
        Snapshot::from_parts(
            generation,
            vec![trunk("default", "main")],
            vec![number("default", "support", "+15550001111", "main")],
            vec![rule("default", "to-agent", Direction::Inbound, 50)],
            vec![credential("default", "main")],
        )
        .expect("snapshot")
    }

    #[test]
    fn a_saved_snapshot_reads_back_the_same_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = DiskSnapshot::new(dir.path().join("node-a"));
        assert!(disk.load().expect("no file yet").is_none());
        disk.save(&snapshot(7)).expect("save");
        let loaded = disk.load().expect("load").expect("saved").snapshot;
        assert_eq!(loaded.generation(), 7);
        assert_eq!(loaded.trunk("default", "main").map(|t| t.as_ref()), Some(&trunk("default", "main")));
        assert_eq!(loaded.number("+15550001111").map(|n| n.name.as_str()), Some("support"));
        assert_eq!(loaded.rule("default", "to-agent").map(|r| r.priority), Some(50));
        assert_eq!(loaded.credential("default", "main"), Some(&credential("default", "main")));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(disk.path()).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the file holds passwords");
        }
        // A newer generation replaces it; no temporary file stays behind.
        disk.save(&snapshot(8)).expect("save again");
        assert_eq!(disk.load().expect("load").expect("saved").snapshot.generation(), 8);
        assert_eq!(fs::read_dir(dir.path().join("node-a")).expect("dir").count(), 1);
    }

    /// A node that starts from its disk while Postgres is down keeps its trunks' TLS material
    /// (client certificates), so a certificate-auth trunk still connects.
    #[test]
    fn the_trunks_tls_material_is_saved_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = DiskSnapshot::new(dir.path());
        let tls = switchboard_model::TrunkTls {
            namespace: "default".into(),
            trunk_name: "main".into(),
            client_cert_pem: Some("cert".into()),
            client_key_pem: Some("key".into()),
            ..Default::default()
        };
        disk.save(&snapshot(9).with_trunk_tls(vec![tls.clone()])).expect("save");
        let loaded = disk.load().expect("load").expect("saved").snapshot;
        assert_eq!(loaded.trunk_tls("default", "main").map(|t| t.as_ref()), Some(&tls));
        // A file saved before the field existed still loads, without material.
        let old = fs::read_to_string(disk.path()).expect("read").replace(",\"trunk_tls\":", ",\"ignored\":");
        fs::write(disk.path(), old).expect("write");
        let loaded = disk.load().expect("an older file loads").expect("saved").snapshot;
        assert!(loaded.trunk_tls("default", "main").is_none());
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = DiskSnapshot::new(dir.path());
        fs::write(disk.path(), b"{\"format\":1,\"generation\":3,\"trunks\":[").expect("write");
        let error = disk.load().expect_err("truncated").to_string();
        assert!(error.contains("config-snapshot.json") && error.contains("unusable"), "{error}");
    }

    #[tokio::test]
    async fn a_saved_snapshot_is_stale_until_postgres_confirms_it() {
        let handle = SnapshotHandle::default();
        assert!(handle.serve_saved(snapshot(5)));
        assert_eq!((handle.generation(), handle.is_stale()), (5, true));
        assert!(!handle.serve_saved(snapshot(6)), "only an unloaded node starts from disk");
        assert!(!handle.confirm(4));
        assert!(handle.is_stale());
        assert!(handle.confirm(5));
        assert!(!handle.is_stale());

        let newer = SnapshotHandle::default();
        newer.serve_saved(snapshot(5));
        assert!(newer.swap_if_newer(snapshot(6)).is_some());
        assert!(!newer.is_stale());
    }
}
