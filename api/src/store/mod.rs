//! Where API writes go: the manifest folder (local mode; the folder stays the source of truth
//! and the local runner's watcher reconciles the change) or the Kubernetes API (server-side
//! apply with field manager [`FIELD_MANAGER`]). Reads come from the same place, so a GET after
//! a write sees it at once.
//!
//! [`folder`] holds the folder store, [`kubernetes`] the server-side apply store; this module the
//! trait they share and what both need to know about ownership by a GitOps tool.

mod folder;
mod kubernetes;

pub use folder::FolderStore;
pub use kubernetes::KubernetesStore;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::trunk_model::TRUNK_ID_ANNOTATION;
use switchboard_operator::crd::{API_VERSION, TrunkSpec};

/// The field manager of every API write in Kubernetes.
pub(crate) const FIELD_MANAGER: &str = "switchboard-api";

/// A trunk as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTrunk {
    pub namespace: String,
    pub name: String,
    /// The API's id (annotation), else the name.
    pub trunk_id: String,
    pub spec: TrunkSpec,
    /// A GitOps tool that owns the resource, e.g. `Argo CD (argocd.argoproj.io/tracking-id=...)`.
    pub gitops_owner: Option<String>,
}

/// One write: the whole spec (already merged and validated) and, when given, a new password.
pub struct TrunkWrite {
    pub namespace: String,
    pub name: String,
    pub trunk_id: String,
    pub spec: TrunkSpec,
    pub password: Option<String>,
}

impl std::fmt::Debug for TrunkWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrunkWrite")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Read and write access to Trunk resources (and their password Secrets).
#[async_trait]
pub trait TrunkStore: Send + Sync {
    /// `folder DIR` or `kubernetes`, for messages.
    fn describe(&self) -> String;
    async fn list(&self, namespace: &str) -> Result<Vec<StoredTrunk>, ApiError>;
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<StoredTrunk>, ApiError>;
    /// Creates or replaces the trunk (and its Secret when a password is given).
    async fn put(&self, write: TrunkWrite) -> Result<(), ApiError>;
    /// Removes the trunk; false when it did not exist.
    async fn delete(&self, namespace: &str, name: &str) -> Result<bool, ApiError>;
}

/// The GitOps tool that manages an object, judged from its labels and annotations.
pub(crate) fn gitops_owner(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Option<String> {
    if let Some(id) = annotations.get("argocd.argoproj.io/tracking-id") {
        return Some(format!("Argo CD (annotation argocd.argoproj.io/tracking-id={id})"));
    }
    if let Some(app) = labels.get("argocd.argoproj.io/instance") {
        return Some(format!("Argo CD (label argocd.argoproj.io/instance={app})"));
    }
    if let Some(manager) = labels.get("app.kubernetes.io/managed-by")
        && matches!(manager.to_ascii_lowercase().as_str(), "argocd" | "argo-cd" | "flux" | "fluxcd")
    {
        let tool = if manager.to_ascii_lowercase().starts_with("argo") { "Argo CD" } else { "Flux" };
        return Some(format!("{tool} (label app.kubernetes.io/managed-by={manager})"));
    }
    for (label, what) in [
        ("kustomize.toolkit.fluxcd.io/name", "Flux Kustomization"),
        ("helm.toolkit.fluxcd.io/name", "Flux HelmRelease"),
    ] {
        if let Some(name) = labels.get(label).or_else(|| annotations.get(label)) {
            let namespace_key = label.replace("/name", "/namespace");
            let namespace = labels.get(&namespace_key).or_else(|| annotations.get(&namespace_key));
            let full = namespace.map(|ns| format!("{ns}/{name}")).unwrap_or_else(|| name.clone());
            return Some(format!("{what} {full} (label {label})"));
        }
    }
    None
}

/// The 409 for a GitOps-owned resource.
pub(crate) fn gitops_conflict(namespace: &str, name: &str, owner: &str) -> ApiError {
    ApiError::conflict(
        "managed_by_gitops",
        format!(
            "Trunk {namespace}/{name} is managed by {owner}: a change made here would be reverted from Git; change it in its Git repository instead"
        ),
    )
}

/// The Trunk manifest of a write (the server-side apply body, and the folder's document).
pub(crate) fn trunk_manifest(write: &TrunkWrite) -> Value {
    let mut metadata = json!({"name": write.name, "namespace": write.namespace});
    if write.trunk_id != write.name {
        metadata["annotations"] = json!({ TRUNK_ID_ANNOTATION: write.trunk_id });
    }
    json!({"apiVersion": API_VERSION, "kind": "Trunk", "metadata": metadata, "spec": write.spec})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_recognised() {
        let labels = BTreeMap::from([("kustomize.toolkit.fluxcd.io/name".to_string(), "apps".to_string())]);
        assert!(gitops_owner(&labels, &BTreeMap::new()).unwrap().starts_with("Flux Kustomization apps"));
        let annotations = BTreeMap::from([("argocd.argoproj.io/tracking-id".to_string(), "app:x".to_string())]);
        assert!(gitops_owner(&BTreeMap::new(), &annotations).unwrap().starts_with("Argo CD"));
        assert_eq!(gitops_owner(&BTreeMap::new(), &BTreeMap::new()), None);
    }
}
