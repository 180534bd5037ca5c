//! The Kubernetes store of `switchboard operator`: server-side apply with field manager
//! [`FIELD_MANAGER`] in the API's namespace, password Secrets labelled as the API's own.

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use super::{FIELD_MANAGER, StoredTrunk, TrunkStore, TrunkWrite, gitops_conflict, gitops_owner, trunk_manifest};
use crate::error::ApiError;
use crate::trunk_model::TRUNK_ID_ANNOTATION;
use switchboard_operator::crd::Trunk;
use switchboard_operator::kubernetes::controller::CREDENTIALS_LABEL;

/// Writes through the Kubernetes API with server-side apply.
pub struct KubernetesStore {
    client: Client,
}

impl KubernetesStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn stored(trunk: Trunk) -> StoredTrunk {
        let metadata = &trunk.metadata;
        let labels = metadata.labels.clone().unwrap_or_default();
        let annotations = metadata.annotations.clone().unwrap_or_default();
        let name = metadata.name.clone().unwrap_or_default();
        StoredTrunk {
            namespace: metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            trunk_id: annotations.get(TRUNK_ID_ANNOTATION).cloned().unwrap_or_else(|| name.clone()),
            name,
            gitops_owner: gitops_owner(&labels, &annotations).or_else(|| field_manager_owner(metadata)),
            spec: trunk.spec,
        }
    }
}

/// The GitOps tool among an object's field managers: Argo CD's server-side apply writes as
/// `argocd-controller`, Flux's as `kustomize-controller` or `helm-controller`, even when the
/// object carries none of their labels.
pub(crate) fn field_manager_owner(metadata: &ObjectMeta) -> Option<String> {
    metadata.managed_fields.iter().flatten().find_map(|entry| {
        let manager = entry.manager.as_deref()?;
        let tool = match manager {
            m if m.starts_with("argocd") => "Argo CD",
            "kustomize-controller" => "Flux Kustomization",
            "helm-controller" => "Flux HelmRelease",
            _ => return None,
        };
        Some(format!("{tool} (field manager {manager})"))
    })
}

/// The label the REST API puts on the password Secrets it creates; it writes no other Secret.
pub(crate) const SECRET_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", FIELD_MANAGER);

/// The 409 for a password Secret the API did not create.
pub(crate) fn foreign_secret_conflict(namespace: &str, name: &str) -> ApiError {
    ApiError::conflict(
        "secret_not_created_by_api",
        format!(
            "Secret {namespace}/{name} exists and was not created by this API (it lacks the label {}={}); the API does not overwrite it: change the password in that Secret, or name another Secret",
            SECRET_LABEL.0, SECRET_LABEL.1
        ),
    )
}

fn kube_error(context: &str, error: kube::Error) -> ApiError {
    match &error {
        kube::Error::Api(status) if status.code == 409 => {
            ApiError::conflict("conflict", format!("{context}: {}", status.message))
        }
        kube::Error::Api(status) if status.code == 422 || status.code == 400 => ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "rejected_by_kubernetes",
            format!("{context}: {}", status.message),
        ),
        kube::Error::Api(status) if status.code == 403 => ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            format!("{context}: the operator's service account may not do this: {}", status.message),
        ),
        _ => ApiError::unavailable(context, error),
    }
}

#[async_trait]
impl TrunkStore for KubernetesStore {
    fn describe(&self) -> String {
        "kubernetes".into()
    }

    async fn list(&self, namespace: &str) -> Result<Vec<StoredTrunk>, ApiError> {
        let api: Api<Trunk> = Api::namespaced(self.client.clone(), namespace);
        let list = api.list(&ListParams::default()).await.map_err(|e| kube_error("cannot list Trunks", e))?;
        Ok(list.items.into_iter().map(Self::stored).collect())
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<StoredTrunk>, ApiError> {
        let api: Api<Trunk> = Api::namespaced(self.client.clone(), namespace);
        let trunk = api.get_opt(name).await.map_err(|e| kube_error("cannot read the Trunk", e))?;
        Ok(trunk.map(Self::stored))
    }

    async fn put(&self, write: TrunkWrite) -> Result<(), ApiError> {
        if let Some(existing) = self.get(&write.namespace, &write.name).await?
            && let Some(owner) = existing.gitops_owner
        {
            return Err(gitops_conflict(&write.namespace, &write.name, &owner));
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if let (Some(password), Some(credentials)) = (&write.password, &write.spec.credentials) {
            let secrets: Api<k8s_openapi::api::core::v1::Secret> =
                Api::namespaced(self.client.clone(), &write.namespace);
            let secret_name = &credentials.password_secret_ref.name;
            if let Some(existing) =
                secrets.get_opt(secret_name).await.map_err(|e| kube_error("cannot read the password Secret", e))?
                && existing.metadata.labels.as_ref().and_then(|l| l.get(SECRET_LABEL.0)).map(String::as_str)
                    != Some(SECRET_LABEL.1)
            {
                return Err(foreign_secret_conflict(&write.namespace, secret_name));
            }
            let secret = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": credentials.password_secret_ref.name,
                    "namespace": write.namespace,
                    "labels": {SECRET_LABEL.0: SECRET_LABEL.1, (CREDENTIALS_LABEL.0): CREDENTIALS_LABEL.1},
                },
                "type": "Opaque",
                "stringData": {credentials.password_secret_ref.key.clone(): password},
            });
            secrets
                .patch(&credentials.password_secret_ref.name, &params, &Patch::Apply(&secret))
                .await
                .map_err(|e| kube_error("cannot write the password Secret", e))?;
        }
        let api: Api<Trunk> = Api::namespaced(self.client.clone(), &write.namespace);
        let body = trunk_manifest(&write);
        api.patch(&write.name, &params, &Patch::Apply(&body))
            .await
            .map_err(|e| kube_error("cannot apply the Trunk", e))?;
        Ok(())
    }

    async fn delete(&self, namespace: &str, name: &str) -> Result<bool, ApiError> {
        let Some(existing) = self.get(namespace, name).await? else { return Ok(false) };
        if let Some(owner) = existing.gitops_owner {
            return Err(gitops_conflict(namespace, name, &owner));
        }
        let api: Api<Trunk> = Api::namespaced(self.client.clone(), namespace);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(error) => Err(kube_error("cannot delete the Trunk", error)),
        }
    }
}
