//! The folder store of `switchboard local`: trunks written as manifest files into the watched
//! folder, which stays the source of truth (the local runner's watcher reconciles the change).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{StoredTrunk, TrunkStore, TrunkWrite, gitops_conflict, gitops_owner, trunk_manifest};
use crate::error::ApiError;
use crate::trunk_model::TRUNK_ID_ANNOTATION;
use switchboard_operator::kubernetes::controller::CREDENTIALS_LABEL;
use switchboard_operator::source::folder::{FileCache, FolderSource, collect_manifests};
use switchboard_operator::source::{Kind, Spec};

// ---------------------------------------------------------------------------------------------
// Folder

/// Writes manifest files into the watched folder, atomically (temp file + rename). A trunk
/// defined in an existing file is rewritten in that file (its document only; other documents
/// and their comments stay as they are); a new trunk gets `api/trunk-NAME.yaml`. The password
/// Secret goes into the trunk's file unless the folder already defines it elsewhere.
///
/// Reads cost a `stat` per file: the validated resources come from a [`FolderSource`] and the
/// documents (for annotations, labels and the write path) from a [`FileCache`], both of which
/// parse a file again only when its content changed. A hand edit shows up in the next GET.
#[derive(Clone)]
pub struct FolderStore {
    dir: PathBuf,
    source: FolderSource,
    documents: Arc<FileCache<Vec<Document>>>,
}

/// A manifest file with its documents.
type ScannedFile = (PathBuf, Arc<Vec<Document>>);
/// Manifest files with their documents, in path order.
type Scanned = Vec<ScannedFile>;

/// One YAML document of a file, with the identity of what it defines.
#[derive(Debug, Clone)]
struct Document {
    text: String,
    kind: Option<String>,
    namespace: String,
    name: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

impl Document {
    fn is(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.kind.as_deref() == Some(kind) && self.namespace == namespace && self.name.as_deref() == Some(name)
    }
}

fn split_documents(text: &str) -> Vec<Document> {
    let mut chunks = vec![String::new()];
    for line in text.lines() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            chunks.push(String::new());
        } else {
            let chunk = chunks.last_mut().expect("one chunk");
            chunk.push_str(line);
            chunk.push('\n');
        }
    }
    chunks.into_iter().filter(|c| !c.trim().is_empty()).map(describe_document).collect()
}

fn describe_document(text: String) -> Document {
    let value: Value = serde_yaml::from_str(&text).unwrap_or(Value::Null);
    let strings = |field: &str| -> BTreeMap<String, String> {
        value["metadata"][field]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect())
            .unwrap_or_default()
    };
    Document {
        kind: value["kind"].as_str().map(String::from),
        namespace: value["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
        name: value["metadata"]["name"].as_str().map(String::from),
        labels: strings("labels"),
        annotations: strings("annotations"),
        text,
    }
}

fn join_documents(documents: &[Document]) -> String {
    documents.iter().map(|d| d.text.trim_end().to_string() + "\n").collect::<Vec<_>>().join("---\n")
}

/// The leading comment lines of a document (kept when the document is replaced).
fn leading_comments(text: &str) -> String {
    text.lines().take_while(|l| l.starts_with('#') || l.trim().is_empty()).map(|l| format!("{l}\n")).collect()
}

fn to_yaml(value: &Value) -> Result<String, ApiError> {
    serde_yaml::to_string(value).map_err(|e| ApiError::internal("cannot render the manifest", e))
}

/// Writes `text` to `path` atomically: a hidden temp file beside it (ignored by the watcher's
/// manifest filter), fsync, rename. Files holding secrets are created 0600.
fn write_atomically(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("manifest");
    let temp = dir.join(format!(".{file_name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn io_error(context: &str, error: std::io::Error) -> ApiError {
    ApiError::internal(context, error)
}

impl FolderStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self { source: FolderSource::new(&dir), dir, documents: Arc::default() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a new trunk is written to.
    pub fn api_file(&self, name: &str) -> PathBuf {
        self.dir.join("api").join(format!("trunk-{name}.yaml"))
    }

    /// Every manifest file, in path order.
    fn files(&self) -> Result<Vec<PathBuf>, ApiError> {
        let mut files = Vec::new();
        collect_manifests(&self.dir, &mut files).map_err(|e| io_error("cannot read the manifest folder", e))?;
        files.sort();
        Ok(files)
    }

    /// The documents of `files` (parsed only when a file's content changed).
    fn documents(&self, files: Vec<PathBuf>) -> Result<Scanned, ApiError> {
        let documents = files
            .iter()
            .map(|path| {
                let docs =
                    self.documents.get(path, split_documents).map_err(|e| io_error("cannot read a manifest", e))?;
                Ok((path.clone(), docs))
            })
            .collect::<Result<Scanned, ApiError>>()?;
        self.documents.retain(&files);
        Ok(documents)
    }

    /// Every manifest file with its documents, in path order.
    fn scan(&self) -> Result<Scanned, ApiError> {
        self.documents(self.files()?)
    }

    /// Forgets what was parsed from a file the API just wrote or removed.
    fn written(&self, path: &Path) {
        self.documents.invalidate(path);
        self.source.invalidate(path);
    }

    fn locate<'a>(
        files: &'a [ScannedFile],
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<(&'a PathBuf, &'a Document)> {
        files.iter().find_map(|(path, docs)| docs.iter().find(|d| d.is(kind, namespace, name)).map(|d| (path, d)))
    }

    fn read_blocking(&self, namespace: &str) -> Result<Vec<StoredTrunk>, ApiError> {
        let files = self.files()?;
        let state = self.source.read_files(&files);
        let files = self.documents(files)?;
        let mut trunks = Vec::new();
        for resource in state.resources {
            let (Kind::Trunk, Spec::Trunk(spec)) = (resource.key.kind, resource.spec) else { continue };
            if resource.key.namespace != namespace {
                continue;
            }
            let document = Self::locate(&files, "Trunk", namespace, &resource.key.name).map(|(_, d)| d);
            let annotations = document.map(|d| d.annotations.clone()).unwrap_or_default();
            let labels = document.map(|d| d.labels.clone()).unwrap_or_default();
            trunks.push(StoredTrunk {
                namespace: resource.key.namespace,
                trunk_id: annotations.get(TRUNK_ID_ANNOTATION).cloned().unwrap_or_else(|| resource.key.name.clone()),
                name: resource.key.name,
                gitops_owner: gitops_owner(&labels, &annotations),
                spec,
            });
        }
        Ok(trunks)
    }

    fn put_blocking(&self, write: &TrunkWrite) -> Result<(), ApiError> {
        let files = self.scan()?;
        let trunk_file = Self::locate(&files, "Trunk", &write.namespace, &write.name)
            .map(|(path, _)| path.clone())
            .unwrap_or_else(|| self.api_file(&write.name));
        let trunk_doc = to_yaml(&trunk_manifest(write))?;
        // The Secret: in its existing file, else beside the trunk.
        let secret = match (&write.password, &write.spec.credentials) {
            (Some(password), Some(credentials)) => {
                let name = &credentials.password_secret_ref.name;
                let manifest = json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": name,
                        "namespace": write.namespace,
                        // So that the folder, applied to a cluster, is watched by the operator.
                        "labels": {(CREDENTIALS_LABEL.0): CREDENTIALS_LABEL.1},
                    },
                    "type": "Opaque",
                    "stringData": {credentials.password_secret_ref.key.clone(): password},
                });
                let file = Self::locate(&files, "Secret", &write.namespace, name)
                    .map(|(path, _)| path.clone())
                    .unwrap_or_else(|| trunk_file.clone());
                Some((file, name.clone(), to_yaml(&manifest)?))
            }
            _ => None,
        };
        let documents_of = |path: &Path| -> Vec<Document> {
            files.iter().find(|(p, _)| p == path).map(|(_, d)| d.to_vec()).unwrap_or_default()
        };
        let upsert = |documents: &mut Vec<Document>, kind: &str, name: &str, text: &str| {
            let position = documents.iter().position(|d| d.is(kind, &write.namespace, name));
            match position {
                Some(index) => {
                    let comments = leading_comments(&documents[index].text);
                    documents[index] = describe_document(format!("{comments}{text}"));
                }
                None => documents.push(describe_document(text.to_string())),
            }
        };
        if let Some((secret_file, secret_name, secret_doc)) = &secret
            && *secret_file != trunk_file
        {
            let mut documents = documents_of(secret_file);
            upsert(&mut documents, "Secret", secret_name, secret_doc);
            write_atomically(secret_file, &join_documents(&documents), true)
                .map_err(|e| io_error("cannot write the Secret manifest", e))?;
            self.written(secret_file);
        }
        let mut documents = documents_of(&trunk_file);
        upsert(&mut documents, "Trunk", &write.name, &trunk_doc);
        let mut holds_secret = documents.iter().any(|d| d.kind.as_deref() == Some("Secret"));
        if let Some((secret_file, secret_name, secret_doc)) = &secret
            && *secret_file == trunk_file
        {
            upsert(&mut documents, "Secret", secret_name, secret_doc);
            holds_secret = true;
        }
        let result = write_atomically(&trunk_file, &join_documents(&documents), holds_secret)
            .map_err(|e| io_error("cannot write the Trunk manifest", e));
        self.written(&trunk_file);
        result
    }

    fn delete_blocking(&self, namespace: &str, name: &str) -> Result<bool, ApiError> {
        let files = self.scan()?;
        let Some((path, document)) = Self::locate(&files, "Trunk", namespace, name) else { return Ok(false) };
        if let Some(owner) = gitops_owner(&document.labels, &document.annotations) {
            return Err(gitops_conflict(namespace, name, &owner));
        }
        let value: Value = serde_yaml::from_str(&document.text).unwrap_or(Value::Null);
        let secret = value["spec"]["credentials"]["passwordSecretRef"]["name"].as_str().map(String::from);
        let documents: Vec<Document> = files
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, docs)| docs.to_vec())
            .unwrap_or_default()
            .into_iter()
            .filter(|d| !d.is("Trunk", namespace, name))
            // Its password Secret goes too when it lives in the same file.
            .filter(|d| secret.as_deref().is_none_or(|secret| !d.is("Secret", namespace, secret)))
            .collect();
        let only_comments = documents.iter().all(|d| d.kind.is_none());
        if only_comments {
            std::fs::remove_file(path).map_err(|e| io_error("cannot remove the manifest", e))?;
        } else {
            let secret = documents.iter().any(|d| d.kind.as_deref() == Some("Secret"));
            write_atomically(path, &join_documents(&documents), secret)
                .map_err(|e| io_error("cannot write the manifest", e))?;
        }
        self.written(path);
        Ok(true)
    }
}

#[async_trait]
impl TrunkStore for FolderStore {
    fn describe(&self) -> String {
        format!("folder {}", self.dir.display())
    }

    async fn list(&self, namespace: &str) -> Result<Vec<StoredTrunk>, ApiError> {
        let (this, namespace) = (self.clone(), namespace.to_string());
        blocking(move || this.read_blocking(&namespace)).await
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<StoredTrunk>, ApiError> {
        Ok(self.list(namespace).await?.into_iter().find(|t| t.name == name))
    }

    async fn put(&self, write: TrunkWrite) -> Result<(), ApiError> {
        let this = self.clone();
        blocking(move || this.put_blocking(&write)).await
    }

    async fn delete(&self, namespace: &str, name: &str) -> Result<bool, ApiError> {
        let (this, namespace, name) = (self.clone(), namespace.to_string(), name.to_string());
        blocking(move || this.delete_blocking(&namespace, &name)).await
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| Err(ApiError::internal("a file task failed", e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_and_keep_comments() {
        let text = "# head\nkind: Trunk\nmetadata: {name: a}\n---\n# second\nkind: Secret\nmetadata: {name: b, namespace: x}\n";
        let docs = split_documents(text);
        assert_eq!(docs.len(), 2);
        assert!(docs[1].is("Secret", "x", "b"));
        assert_eq!(leading_comments(&docs[1].text), "# second\n");
        assert_eq!(join_documents(&docs), text);
    }
}
