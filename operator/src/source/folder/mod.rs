//! The manifest-folder source of local mode: every `*.yaml`/`*.yml` file under a directory,
//! read the way `kubectl apply -f DIR -R` would (multi-document files, `kind: Secret` with
//! `stringData` or base64 `data`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;

use super::{
    BrokenResource, DesiredResource, DesiredState, DesiredStateSource, Kind, ResourceKey, SecretData, SourceError,
    SourceProblem,
};
use crate::crd::API_VERSION;
use crate::validate;

/// How long after its last change a file's metadata is trusted to reveal the next change.
/// File times come from a coarse clock (a few milliseconds), so two same-size writes within
/// one tick can leave the metadata unchanged; a file changed this recently is re-read and its
/// content compared instead (git's "racily clean" rule).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What changes whenever a file is written or replaced: device, inode (an atomic rename makes a
/// new one), length, modification and change times (`ctime` cannot be set back by `touch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.size(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// The later of the two file times.
    fn changed_at(&self) -> SystemTime {
        let (secs, nanos) = self.mtime.max(self.ctime);
        if secs >= 0 { UNIX_EPOCH + Duration::new(secs as u64, nanos.clamp(0, 999_999_999) as u32) } else { UNIX_EPOCH }
    }
}

struct CacheEntry<T> {
    stamp: FileStamp,
    hash: u64,
    /// When the content was last read and found to match `hash`.
    verified_at: SystemTime,
    value: Arc<T>,
}

/// Parsed files by path, so that a read of an unchanged file costs one `stat` and no parsing.
///
/// A file whose stamp ([`FileStamp`]) is unchanged and older than [`RACY_WINDOW`] at the time
/// it was last read is taken as is; otherwise it is read and its content hash compared, and only
/// a changed content is parsed again. The folder stays the source of truth: a hand edit shows up
/// in the next read.
pub struct FileCache<T> {
    entries: Mutex<HashMap<PathBuf, CacheEntry<T>>>,
}

impl<T> Default for FileCache<T> {
    fn default() -> Self {
        Self { entries: Mutex::default() }
    }
}

impl<T> FileCache<T> {
    /// The parsed form of `path`, parsed with `parse(text)` only when its content changed.
    pub fn get(&self, path: &Path, parse: impl FnOnce(&str) -> T) -> std::io::Result<Arc<T>> {
        let stamp = FileStamp::of(&std::fs::metadata(path)?);
        if let Some(entry) = self.lock().get(path)
            && entry.stamp == stamp
            && stamp.changed_at() + RACY_WINDOW < entry.verified_at
        {
            return Ok(entry.value.clone());
        }
        let verified_at = SystemTime::now();
        let text = std::fs::read_to_string(path)?;
        // The stamp was taken before the read: a write in between leaves a stale stamp, which
        // only makes the next lookup read the file again.
        let hash = content_hash(&text);
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(path)
            && entry.hash == hash
        {
            entry.stamp = stamp;
            entry.verified_at = verified_at;
            return Ok(entry.value.clone());
        }
        drop(entries);
        let value = Arc::new(parse(&text));
        self.lock().insert(path.to_path_buf(), CacheEntry { stamp, hash, verified_at, value: value.clone() });
        Ok(value)
    }

    /// Forgets one file (after a write through the API, so the next read parses the new content
    /// even within the racy window).
    pub fn invalidate(&self, path: &Path) {
        self.lock().remove(path);
    }

    /// Drops the entries of files no longer in `files` (sorted).
    pub fn retain(&self, files: &[PathBuf]) {
        self.lock().retain(|path, _| files.binary_search(path).is_ok());
    }

    /// Number of cached files.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, CacheEntry<T>>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads the YAML manifests of a folder (recursively): Trunk, PhoneNumber, RoutingRule and Secret.
///
/// Parsed files are cached ([`FileCache`]), so that after one edit only that file is parsed
/// again, and an unchanged file costs a `stat`: the rest of a pass is merging and the reconcile
/// core's diff.
#[derive(Clone)]
pub struct FolderSource {
    dir: PathBuf,
    cache: Arc<FileCache<DesiredState>>,
}

impl FolderSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), cache: Arc::default() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the folder synchronously (the work is CPU and local disk only).
    pub fn read(&self) -> Result<DesiredState, SourceError> {
        let mut files = Vec::new();
        collect_manifests(&self.dir, &mut files)
            .map_err(|source| SourceError::Folder { path: self.dir.display().to_string(), source })?;
        files.sort();
        Ok(self.read_files(&files))
    }

    /// Reads the given manifest files (sorted, under [`Self::dir`]), e.g. a listing the caller
    /// already made.
    pub fn read_files(&self, files: &[PathBuf]) -> DesiredState {
        let mut parsed = Vec::with_capacity(files.len());
        for file in files {
            let origin = file.strip_prefix(&self.dir).unwrap_or(file).display().to_string();
            let state = self
                .cache
                .get(file, |text| {
                    let mut reader = StateBuilder::default();
                    reader.read_file(&origin, text);
                    reader.finish()
                })
                .unwrap_or_else(|error| {
                    let mut reader = StateBuilder::default();
                    reader.unreadable(&origin, format!("cannot read {origin}: {error}"));
                    Arc::new(reader.finish())
                });
            parsed.push((origin, state));
        }
        self.cache.retain(files);
        merge(&parsed)
    }

    /// Forgets the parsed form of one file (see [`FileCache::invalidate`]).
    pub fn invalidate(&self, path: &Path) {
        self.cache.invalidate(path);
    }
}

fn content_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Joins the files' states in path order. A resource or Secret defined in two files keeps the
/// first definition; the second is reported.
fn merge(files: &[(String, Arc<DesiredState>)]) -> DesiredState {
    let mut state = DesiredState::default();
    let mut seen: HashMap<&ResourceKey, &str> = HashMap::new();
    let mut secrets_seen: HashMap<&(String, String), &str> = HashMap::new();
    let duplicate = |origin: &str, what: String, first: &str| SourceProblem {
        origin: origin.to_string(),
        message: format!("{origin}: {what} is also defined in {first}; this copy is ignored, remove one of them"),
    };
    for (origin, file) in files {
        for resource in &file.resources {
            match seen.get(&resource.key) {
                Some(first) => state.problems.push(duplicate(origin, resource.key.to_string(), first)),
                None => {
                    seen.insert(&resource.key, origin);
                    state.resources.push(resource.clone());
                }
            }
        }
        for broken in &file.broken {
            match seen.get(&broken.key) {
                Some(first) => state.problems.push(duplicate(origin, broken.key.to_string(), first)),
                None => {
                    seen.insert(&broken.key, origin);
                    state.broken.push(broken.clone());
                }
            }
        }
        for (id, data) in &file.secrets {
            match secrets_seen.get(id) {
                Some(first) => state.problems.push(duplicate(origin, format!("Secret {}/{}", id.0, id.1), first)),
                None => {
                    secrets_seen.insert(id, origin);
                    state.secrets.insert(id.clone(), data.clone());
                }
            }
        }
        state.problems.extend(file.problems.iter().cloned());
        state.unreadable_origins.extend(file.unreadable_origins.iter().cloned());
    }
    state
}

#[async_trait]
impl DesiredStateSource for FolderSource {
    fn describe(&self) -> String {
        format!("folder {}", self.dir.display())
    }

    async fn desired_state(&self) -> Result<DesiredState, SourceError> {
        let source = self.clone();
        tokio::task::spawn_blocking(move || source.read()).await.unwrap_or_else(|join| {
            Err(SourceError::Folder { path: String::new(), source: std::io::Error::other(join) })
        })
    }
}

/// Whether a path names a manifest file (hidden files such as editor swap files are skipped).
pub fn is_manifest(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
    yaml && !hidden
}

/// Every manifest file under `dir`, recursively, skipping hidden files and folders.
pub fn collect_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let hidden = entry.file_name().to_str().is_some_and(|n| n.starts_with('.'));
        if entry.file_type()?.is_dir() {
            if !hidden {
                collect_manifests(&path, out)?;
            }
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The envelope every manifest shares.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Option<serde_json::Value>,
    #[serde(default)]
    data: Option<BTreeMap<String, String>>,
    #[serde(default)]
    string_data: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    generation: Option<i64>,
}

/// Accumulates the desired state while files are read.
#[derive(Default)]
struct StateBuilder {
    state: DesiredState,
    /// Where each key was first defined, to report duplicates.
    seen: BTreeMap<ResourceKey, String>,
    secrets_seen: BTreeMap<(String, String), String>,
}

impl StateBuilder {
    fn problem(&mut self, origin: String, message: String) {
        self.state.problems.push(SourceProblem { origin, message });
    }

    fn unreadable(&mut self, origin: &str, message: String) {
        self.state.unreadable_origins.push(origin.to_string());
        self.problem(origin.to_string(), message);
    }

    fn read_file(&mut self, origin: &str, text: &str) {
        // Parse every document first: a syntax error anywhere makes the whole file unreadable, so
        // that none of its resources is deleted because of a typo.
        let mut documents = Vec::new();
        for document in serde_yaml::Deserializer::from_str(text) {
            match serde_yaml::Value::deserialize(document) {
                Ok(value) => documents.push(value),
                Err(error) => {
                    let at = error
                        .location()
                        .map(|l| format!("{origin}:{}:{}", l.line(), l.column()))
                        .unwrap_or_else(|| origin.to_string());
                    self.unreadable(
                        origin,
                        format!("{at}: YAML syntax error: {error}; none of this file's resources were changed"),
                    );
                    return;
                }
            }
        }
        let several = documents.len() > 1;
        for (index, document) in documents.into_iter().enumerate() {
            let place = if several { format!("{origin} (document {})", index + 1) } else { origin.to_string() };
            self.read_document(origin, &place, document);
        }
    }

    fn read_document(&mut self, origin: &str, place: &str, document: serde_yaml::Value) {
        if document.is_null() {
            return;
        }
        let json = match serde_json::to_value(&document) {
            Ok(json) => json,
            Err(error) => return self.problem(origin.into(), format!("{place}: cannot be read as JSON: {error}")),
        };
        let manifest: Manifest = match serde_json::from_value(json) {
            Ok(manifest) => manifest,
            Err(error) => return self.problem(origin.into(), format!("{place}: not a Kubernetes manifest: {error}")),
        };
        let Some(kind) = manifest.kind.clone() else {
            return self.problem(
                origin.into(),
                format!("{place}: no kind; write kind: Trunk, PhoneNumber, RoutingRule or Secret"),
            );
        };
        let namespace = manifest.metadata.namespace.clone().unwrap_or_else(|| "default".to_string());
        let Some(name) = manifest.metadata.name.clone() else {
            return self.problem(origin.into(), format!("{place}: {kind} has no metadata.name; add one"));
        };
        match kind.as_str() {
            "Secret" => self.read_secret(origin, place, namespace, name, manifest),
            "Trunk" | "PhoneNumber" | "RoutingRule" => {
                let kind = match kind.as_str() {
                    "Trunk" => Kind::Trunk,
                    "PhoneNumber" => Kind::PhoneNumber,
                    _ => Kind::RoutingRule,
                };
                self.read_resource(origin, place, ResourceKey { kind, namespace, name }, manifest)
            }
            other => self.problem(
                origin.into(),
                format!(
                    "{place}: unknown kind {other:?}; Switchboard reads Trunk, PhoneNumber and RoutingRule ({API_VERSION}) and Secret (v1)"
                ),
            ),
        }
    }

    fn read_secret(&mut self, origin: &str, place: &str, namespace: String, name: String, manifest: Manifest) {
        if manifest.api_version.as_deref() != Some("v1") {
            return self.problem(origin.into(), format!("{place}: Secret {namespace}/{name} needs apiVersion: v1"));
        }
        let mut data = SecretData::new();
        for (key, value) in manifest.data.unwrap_or_default() {
            match base64::engine::general_purpose::STANDARD.decode(value.trim()) {
                Ok(bytes) => {
                    data.insert(key, bytes);
                }
                Err(error) => {
                    return self.problem(
                        origin.into(),
                        format!("{place}: Secret {namespace}/{name} data.{key} is not base64 ({error}); use stringData for plain text"),
                    );
                }
            }
        }
        for (key, value) in manifest.string_data.unwrap_or_default() {
            data.insert(key, value.into_bytes());
        }
        let id = (namespace, name);
        if let Some(first) = self.secrets_seen.get(&id) {
            let message = format!("{place}: Secret {}/{} is also defined in {first}; this copy is ignored", id.0, id.1);
            return self.problem(origin.into(), message);
        }
        self.secrets_seen.insert(id.clone(), place.to_string());
        self.state.secrets.insert(id, data);
    }

    fn read_resource(&mut self, origin: &str, place: &str, key: ResourceKey, manifest: Manifest) {
        if let Some(first) = self.seen.get(&key) {
            let message =
                format!("{place}: {key} is also defined in {first}; this copy is ignored, remove one of them");
            return self.problem(origin.into(), message);
        }
        self.seen.insert(key.clone(), place.to_string());
        let generation = manifest.metadata.generation;
        let broken =
            |message: String| BrokenResource { key: key.clone(), generation, origin: origin.to_string(), message };
        if manifest.api_version.as_deref() != Some(API_VERSION) {
            let found = manifest.api_version.as_deref().unwrap_or("nothing");
            let message = format!("{place}: apiVersion is {found}; write apiVersion: {API_VERSION}");
            return self.state.broken.push(broken(message));
        }
        let unknown: Vec<&String> = manifest.rest.keys().filter(|k| k.as_str() != "status").collect();
        if !unknown.is_empty() {
            let fields = unknown.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
            let message = format!(
                "{place}: unknown top-level field(s) {fields}; a {} has apiVersion, kind, metadata and spec",
                key.kind
            );
            return self.state.broken.push(broken(message));
        }
        let Some(spec) = manifest.spec else {
            return self.state.broken.push(broken(format!("{place}: {key} has no spec")));
        };
        match validate::parse_spec(&key, spec) {
            Ok(spec) => {
                self.state.resources.push(DesiredResource { key, generation, origin: origin.to_string(), spec })
            }
            Err(invalid) => self.state.broken.push(broken(format!("{place}: {invalid}"))),
        }
    }

    fn finish(self) -> DesiredState {
        self.state
    }
}

#[cfg(test)]
mod tests;
