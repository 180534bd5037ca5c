//! The REST API's Kubernetes write path against a mocked API server: the server-side apply
//! bodies (field manager `switchboard-api`), and 409 for a GitOps-owned Trunk.

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use switchboard_api::store::{KubernetesStore, TrunkStore, TrunkWrite};
use switchboard_api::trunk_model::{TrunkFields, apply_fields, default_spec};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

async fn next(
    handle: &mut Handle,
) -> (Method, String, Option<String>, Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (request, send) = handle.next_request().await.expect("a request");
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let content_type = parts.headers.get("content-type").map(|v| v.to_str().unwrap().to_string());
    let uri = parts.uri.to_string();
    (parts.method, uri, content_type, value, send)
}

fn respond(status: u16, body: &Value) -> Response<Body> {
    Response::builder().status(status).body(Body::from(Bytes::from(serde_json::to_vec(body).unwrap()))).unwrap()
}

fn not_found() -> Response<Body> {
    respond(
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
    )
}

fn write() -> TrunkWrite {
    let fields: TrunkFields = serde_json::from_value(json!({
        "trunk_id": "skyetel_main", "provider": "skyetel", "proxy_address": "sip.skyetel.com",
        "username": "u", "realm": "sip.skyetel.com"
    }))
    .unwrap();
    let mut spec = default_spec();
    apply_fields(&mut spec, "skyetel-main", &fields, true, true).unwrap();
    TrunkWrite {
        namespace: "default".into(),
        name: "skyetel-main".into(),
        trunk_id: "skyetel_main".into(),
        spec,
        password: Some("s3cret-password".into()),
    }
}

#[tokio::test]
async fn writes_are_server_side_applies_by_switchboard_api() {
    let (client, mut handle) = client();
    let store = KubernetesStore::new(client);
    let task = tokio::spawn(async move { store.put(write()).await });

    let (method, uri, _, _, send) = next(&mut handle).await;
    assert_eq!(
        (method, uri.as_str()),
        (Method::GET, "/apis/switchboard.dev/v1alpha1/namespaces/default/trunks/skyetel-main")
    );
    send.send_response(not_found());

    // The password Secret is read first: the API writes only a Secret it created itself.
    let (method, uri, _, _, send) = next(&mut handle).await;
    assert_eq!((method, uri.as_str()), (Method::GET, "/api/v1/namespaces/default/secrets/skyetel-main-credentials"));
    send.send_response(not_found());

    let (method, uri, content_type, secret, send) = next(&mut handle).await;
    assert_eq!(method, Method::PATCH);
    assert!(uri.starts_with("/api/v1/namespaces/default/secrets/skyetel-main-credentials?"), "{uri}");
    assert!(uri.contains("fieldManager=switchboard-api") && uri.contains("force=true"), "{uri}");
    assert_eq!(content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["stringData"]["password"], "s3cret-password");
    assert_eq!(secret["metadata"]["labels"]["app.kubernetes.io/managed-by"], "switchboard-api");
    send.send_response(respond(200, &secret));

    let (method, uri, content_type, trunk, send) = next(&mut handle).await;
    assert_eq!(method, Method::PATCH);
    assert!(uri.starts_with("/apis/switchboard.dev/v1alpha1/namespaces/default/trunks/skyetel-main?"), "{uri}");
    assert!(uri.contains("fieldManager=switchboard-api") && uri.contains("force=true"), "{uri}");
    assert_eq!(content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(trunk["apiVersion"], "switchboard.dev/v1alpha1");
    assert_eq!(trunk["kind"], "Trunk");
    assert_eq!(trunk["metadata"]["annotations"]["switchboard.dev/trunk-id"], "skyetel_main");
    assert_eq!(trunk["spec"]["credentials"]["passwordSecretRef"]["name"], "skyetel-main-credentials");
    assert!(!trunk.to_string().contains("s3cret-password"), "no password in the Trunk");
    let mut stored = trunk.clone();
    stored["metadata"]["resourceVersion"] = json!("1");
    send.send_response(respond(200, &stored));
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn gitops_owned_trunks_are_refused_with_409() {
    for (labels, annotations, owner) in [
        (
            json!({}),
            json!({"argocd.argoproj.io/tracking-id": "telephony:switchboard.dev/Trunk:default/skyetel-main"}),
            "Argo CD",
        ),
        (
            json!({"kustomize.toolkit.fluxcd.io/name": "apps", "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}),
            json!({}),
            "Flux Kustomization flux-system/apps",
        ),
        (json!({"app.kubernetes.io/managed-by": "argocd"}), json!({}), "Argo CD"),
        (json!({"helm.toolkit.fluxcd.io/name": "switchboard"}), json!({}), "Flux HelmRelease"),
    ] {
        let (client, mut handle) = client();
        let store = KubernetesStore::new(client);
        let task = tokio::spawn(async move { store.put(write()).await });
        let (method, _, _, _, send) = next(&mut handle).await;
        assert_eq!(method, Method::GET);
        let existing = json!({
            "apiVersion": "switchboard.dev/v1alpha1", "kind": "Trunk",
            "metadata": {"name": "skyetel-main", "namespace": "default", "labels": labels, "annotations": annotations},
            "spec": {"provider": "skyetel", "gateways": [{"address": "sip.skyetel.com"}]}
        });
        send.send_response(respond(200, &existing));
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(error.status, http::StatusCode::CONFLICT);
        assert_eq!(error.detail.code, "managed_by_gitops");
        assert!(error.detail.message.contains(owner), "{}", error.detail.message);
        // Nothing was written.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), handle.next_request()).await;
        assert!(pending.is_err() || pending.unwrap().is_none(), "a write after the 409");
    }
}

#[tokio::test]
async fn a_secret_the_api_did_not_create_is_not_overwritten() {
    let (client, mut handle) = client();
    let store = KubernetesStore::new(client);
    let task = tokio::spawn(async move { store.put(write()).await });
    let (_, _, _, _, send) = next(&mut handle).await;
    send.send_response(not_found());
    let (method, uri, _, _, send) = next(&mut handle).await;
    assert_eq!((method, uri.as_str()), (Method::GET, "/api/v1/namespaces/default/secrets/skyetel-main-credentials"));
    send.send_response(respond(
        200,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "skyetel-main-credentials", "namespace": "default"}, "data": {"password": "b3RoZXI="}}),
    ));
    let error = task.await.unwrap().unwrap_err();
    assert_eq!(error.status, http::StatusCode::CONFLICT);
    assert_eq!(error.detail.code, "secret_not_created_by_api");
    let pending = tokio::time::timeout(std::time::Duration::from_millis(50), handle.next_request()).await;
    assert!(pending.is_err() || pending.unwrap().is_none(), "a write after the 409");
}

#[tokio::test]
async fn a_trunk_applied_by_a_gitops_field_manager_is_refused_with_409() {
    for (manager, owner) in [
        ("argocd-controller", "Argo CD"),
        ("kustomize-controller", "Flux Kustomization"),
        ("helm-controller", "Flux HelmRelease"),
    ] {
        let (client, mut handle) = client();
        let store = KubernetesStore::new(client);
        let task = tokio::spawn(async move { store.put(write()).await });
        let (_, _, _, _, send) = next(&mut handle).await;
        let existing = json!({
            "apiVersion": "switchboard.dev/v1alpha1", "kind": "Trunk",
            "metadata": {"name": "skyetel-main", "namespace": "default",
                "managedFields": [{"manager": manager, "operation": "Apply", "apiVersion": "switchboard.dev/v1alpha1"}]},
            "spec": {"provider": "skyetel", "gateways": [{"address": "sip.skyetel.com"}]}
        });
        send.send_response(respond(200, &existing));
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(error.status, http::StatusCode::CONFLICT, "{manager}");
        assert!(error.detail.message.contains(owner), "{}", error.detail.message);
    }
}
