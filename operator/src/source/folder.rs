//! The manifest-folder source of local mode: every `*.yaml`/`*.yml` file under a directory,
//! read the way `kubectl apply -f DIR -R` would (multi-document files, `kind: Secret` with
//! `stringData` or base64 `data`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;

use super::{
    BrokenResource, DesiredResource, DesiredState, DesiredStateSource, Kind, ResourceKey, SecretData, SourceError,
    SourceProblem,
};
use crate::crd::API_VERSION;
use crate::validate;

/// Parsed files by path, with the hash of the content they were parsed from.
type ParseCache = HashMap<PathBuf, (u64, Arc<DesiredState>)>;

/// Reads the YAML manifests of a folder (recursively): Trunk, PhoneNumber, RoutingRule and Secret.
///
/// Parsed files are cached by content, so that after one edit only that file is parsed again:
/// the rest of a pass is merging and the reconcile core's diff.
#[derive(Clone)]
pub struct FolderSource {
    dir: PathBuf,
    cache: Arc<Mutex<ParseCache>>,
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
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut parsed = Vec::with_capacity(files.len());
        for file in &files {
            let origin = file.strip_prefix(&self.dir).unwrap_or(file).display().to_string();
            let state = match std::fs::read_to_string(file) {
                Ok(text) => {
                    let hash = content_hash(&text);
                    match cache.get(file) {
                        Some((cached, state)) if *cached == hash => state.clone(),
                        _ => {
                            let mut reader = StateBuilder::default();
                            reader.read_file(&origin, &text);
                            let state = Arc::new(reader.finish());
                            cache.insert(file.clone(), (hash, state.clone()));
                            state
                        }
                    }
                }
                Err(error) => {
                    let mut reader = StateBuilder::default();
                    reader.unreadable(&origin, format!("cannot read {origin}: {error}"));
                    Arc::new(reader.finish())
                }
            };
            parsed.push((origin, state));
        }
        cache.retain(|path, _| files.binary_search(path).is_ok());
        Ok(merge(&parsed))
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
mod tests {
    use super::*;

    fn read(files: &[(&str, &str)]) -> DesiredState {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        FolderSource::new(dir.path()).read().unwrap()
    }

    const TRUNK: &str = "apiVersion: switchboard.dev/v1alpha1
kind: Trunk
metadata: {name: skyetel}
spec:
  provider: skyetel
  gateways: [{address: sip.skyetel.com}]
  inbound: {allowedSourceCidrs: [52.41.52.34/32]}
";

    #[test]
    fn reads_multi_document_files_and_secrets() {
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {password: s3cret}\ndata: {other: aGk=}\n";
        let state = read(&[("a/trunk.yaml", &format!("{TRUNK}---\n{secret}")), ("notes.txt", "ignored")]);
        assert_eq!(state.resources.len(), 1);
        assert_eq!(state.resources[0].key.namespace, "default");
        assert_eq!(state.resources[0].origin, "a/trunk.yaml");
        let data = &state.secrets[&("default".to_string(), "creds".to_string())];
        assert_eq!(data["password"], b"s3cret");
        assert_eq!(data["other"], b"hi");
        assert!(state.problems.is_empty(), "{:?}", state.problems);
    }

    #[test]
    fn syntax_errors_name_file_and_line_and_keep_the_file() {
        let state = read(&[("bad.yaml", "kind: Trunk\nmetadata: {name: x\n  spec: [\n"), ("good.yaml", TRUNK)]);
        assert_eq!(state.resources.len(), 1);
        assert_eq!(state.unreadable_origins, vec!["bad.yaml"]);
        assert!(state.problems[0].message.starts_with("bad.yaml:"), "{}", state.problems[0].message);
    }

    #[test]
    fn unknown_kinds_and_fields_are_reported() {
        let state = read(&[
            ("kind.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"),
            ("field.yaml", &TRUNK.replace("provider: skyetel", "provider: skyetel\n  proivder: typo")),
        ]);
        assert!(state.problems.iter().any(|p| p.message.contains("unknown kind \"ConfigMap\"")));
        assert_eq!(state.broken.len(), 1);
        assert!(state.broken[0].message.contains("spec.proivder: unknown field"), "{}", state.broken[0].message);
    }

    #[test]
    fn duplicates_keep_the_first_definition() {
        let state = read(&[("a.yaml", TRUNK), ("b.yaml", TRUNK)]);
        assert_eq!(state.resources.len(), 1);
        assert_eq!(state.resources[0].origin, "a.yaml");
        assert!(state.problems[0].message.contains("also defined in a.yaml"));
    }

    #[test]
    fn cached_reads_follow_edits_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), TRUNK).unwrap();
        std::fs::write(dir.path().join("b.yaml"), TRUNK.replace("name: skyetel", "name: other")).unwrap();
        let source = FolderSource::new(dir.path());
        assert_eq!(source.read().unwrap().resources.len(), 2);
        std::fs::write(dir.path().join("b.yaml"), TRUNK.replace("name: skyetel", "name: renamed")).unwrap();
        let names: Vec<String> = source.read().unwrap().resources.into_iter().map(|r| r.key.name).collect();
        assert_eq!(names, vec!["skyetel", "renamed"]);
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(source.read().unwrap().resources.len(), 1);
        assert_eq!(source.cache.lock().unwrap().len(), 1, "removed files leave the cache");
    }

    #[test]
    fn missing_folder_is_an_error() {
        assert!(FolderSource::new("/nonexistent/switchboard").read().is_err());
    }
}
