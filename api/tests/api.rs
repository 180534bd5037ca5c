//! The REST API over a temp manifest folder and a real Postgres (a fresh database per test):
//! trunk CRUD into files, the error shape, auth, calls and CDR pagination.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use switchboard_api::auth::JwtVerifier;
use switchboard_api::store::FolderStore;
use switchboard_api::{AppState, router};
use tower::ServiceExt;

const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
const PASSWORD: &str = "your_skyetel_password";

struct Api {
    app: Router,
    token: String,
    dir: tempfile::TempDir,
}

fn api(pool: PgPool) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let verifier = Arc::new(JwtVerifier::new(SECRET, "switchboard"));
    let token = verifier.mint("test", 300);
    let state = AppState::new(pool, Arc::new(FolderStore::new(dir.path())), "default");
    Api { app: router(state, verifier), token, dir }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Value, http::HeaderMap) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(body.map(|b| Body::from(b.to_string())).unwrap_or_default()).unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value, headers)
    }

    async fn send(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string());
        let (status, value, _) = self.call(method, uri, body.as_deref(), Some(&self.token.clone())).await;
        (status, value)
    }
}

fn skyetel() -> Value {
    json!({
        "trunk_id": "skyetel_main", "name": "Skyetel Main Trunk", "provider": "skyetel",
        "proxy_address": "sip.skyetel.com", "proxy_port": 5060, "username": "your_skyetel_username",
        "password": PASSWORD, "realm": "sip.skyetel.com", "supports_outbound": true, "supports_inbound": true,
        "transport": "UDP", "preferred_codecs": ["PCMU", "PCMA"], "max_concurrent_calls": 100, "calls_per_second_limit": 10
    })
}

fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in walk(dir) {
        out.push(entry.strip_prefix(dir).unwrap().display().to_string());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

fn assert_error_shape(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn trunk_crud_writes_the_folder(pool: PgPool) {
    let api = api(pool);
    let (status, created) = api.send(Method::POST, "/api/trunks", Some(skyetel())).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["trunk_id"], "skyetel_main");
    assert_eq!(created["auth_method"], "digest");
    assert_eq!(files(api.dir.path()), vec!["api/trunk-skyetel-main.yaml"]);
    let text = std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap();
    assert!(text.contains("kind: Secret") && text.contains(PASSWORD), "the Secret manifest holds the password");
    assert!(text.contains("switchboard.dev/trunk-id: skyetel_main"), "{text}");
    // The folder source reads it back as a valid Trunk plus its Secret.
    let state = switchboard_operator::source::folder::FolderSource::new(api.dir.path()).read().unwrap();
    assert_eq!(state.resources.len(), 1, "{:?}", state.broken);
    assert_eq!(state.secrets.len(), 1);

    let (status, again) = api.send(Method::POST, "/api/trunks/", Some(skyetel())).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error_shape(&again, "already_exists");

    for uri in ["/api/trunks", "/api/trunks/skyetel_main", "/api/trunks/skyetel-main"] {
        let (status, body) = api.send(Method::GET, uri, None).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert!(!body.to_string().contains(PASSWORD), "GET {uri} returned the password");
        assert!(body.to_string().contains("skyetel_main"));
    }

    // PUT merges: the seed's security update keeps every other field.
    let update = json!({"allowed_ips": ["203.0.113.0/24"], "transport": "TCP", "auth_method": "digest"});
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(update)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["transport"], "TCP");
    assert_eq!(body["allowed_ips"], json!(["203.0.113.0/24"]));
    assert_eq!(body["max_concurrent_calls"], 100);
    assert_eq!(body["username"], "your_skyetel_username");
    assert_eq!(body["name"], "Skyetel Main Trunk");
    let text = std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap();
    assert!(text.contains(PASSWORD), "a PUT without a password keeps the Secret");

    // `transfer: refer` (the provider takes REFER) reaches the Trunk; an unknown mode is a 422.
    assert_eq!(body["transfer"], "none", "the default");
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(json!({"transfer": "refer"}))).await;
    assert_eq!((status, &body["transfer"]), (StatusCode::OK, &json!("refer")), "{body}");
    let text = std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap();
    assert!(text.contains("transfer: refer"), "{text}");
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(json!({"transfer": "blind"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("transfer"), "{body}");

    // 422 with the API field, nothing written.
    let before = std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap();
    let (status, body) = api
        .send(Method::PUT, "/api/trunks/skyetel_main", Some(json!({"allowed_ips": ["provider.ip.range.0/24"]})))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_error_shape(&body, "invalid_field");
    assert_eq!(body["error"]["field"], "allowed_ips[0]");
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(json!({"rtp_timeout": 1}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "rtp_timeout");
    assert_eq!(std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap(), before);
    // Certificate authentication (mutual TLS) needs the client certificate's Secret
    // (`tls.client_cert_secret`) and TLS gateways: each missing piece is a 422 naming the API
    // field, nothing written. (The accepted case is further down.)
    for (update, field, needle) in [
        (json!({"auth_method": "certificate"}), "tls.client_cert_secret", "needs a client certificate"),
        (
            json!({"auth_method": "certificate", "tls": {"client_cert_secret": "skyetel-client"}}),
            "transport",
            "sent over TLS only",
        ),
        (json!({"tls": {"peer_names": ["sip.skyetel.com"]}}), "tls.peer_names", "authMethod certificate"),
        (json!({"srtp": "off"}), "srtp", "required"),
    ] {
        let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(update.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{update}: {body}");
        assert_error_shape(&body, "invalid_field");
        assert_eq!(body["error"]["field"], field, "{update}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(needle), "{update}: {body}");
    }
    assert_eq!(std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap(), before);
    let mut bad = skyetel();
    bad["trunk_id"] = json!("other");
    bad["proxy_address"] = json!("not a host");
    let (status, body) = api.send(Method::POST, "/api/trunks", Some(bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "proxy_address");
    assert_eq!(files(api.dir.path()), vec!["api/trunk-skyetel-main.yaml"]);

    // TLS is accepted (the node speaks SIP over TLS), in either spelling, and stored as TLS.
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(json!({"transport": "tls"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["transport"], "TLS", "{body}");
    assert!(
        std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap().contains("transport: TLS")
    );
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(json!({"transport": "UDP"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A certificate-auth trunk over TLS with SRTP: the `tls` object and `srtp` reach the
    // manifest and come back; a malformed fingerprint is a 422 naming its index.
    let pin = "AB:".repeat(31) + "CD";
    let mutual_tls = json!({
        "auth_method": "certificate", "transport": "TLS", "srtp": "required",
        "tls": {"client_cert_secret": "skyetel-client", "ca_secret": "skyetel-ca",
                "peer_names": ["sip.skyetel.com"], "peer_fingerprints": [pin]}
    });
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(mutual_tls.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["auth_method"], "certificate");
    assert_eq!(body["srtp"], "required");
    assert_eq!(body["tls"], mutual_tls["tls"], "{body}");
    let text = std::fs::read_to_string(api.dir.path().join("api/trunk-skyetel-main.yaml")).unwrap();
    for needle in
        ["clientCertSecretRef", "skyetel-client", "caSecretRef", "peerNames", "peerFingerprints", "srtp: required"]
    {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    let (_, got) = api.send(Method::GET, "/api/trunks/skyetel_main", None).await;
    assert_eq!(got["tls"], mutual_tls["tls"], "{got}");
    let bad_pin = json!({"tls": {"peer_fingerprints": [pin, "AB:CD"]}});
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(bad_pin)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "tls.peer_fingerprints[1]", "{body}");
    let back = json!({"auth_method": "digest", "transport": "UDP", "srtp": "disabled",
        "tls": {"client_cert_secret": "", "ca_secret": "", "peer_names": [], "peer_fingerprints": []}});
    let (status, body) = api.send(Method::PUT, "/api/trunks/skyetel_main", Some(back)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("tls").is_none(), "no TLS settings left: {body}");

    // Unknown ids.
    for (method, uri) in [
        (Method::GET, "/api/trunks/nope"),
        (Method::PUT, "/api/trunks/nope"),
        (Method::DELETE, "/api/trunks/nope"),
        (Method::POST, "/api/trunks/nope/activate"),
        (Method::GET, "/api/trunks/nope/status"),
    ] {
        let body = (method == Method::PUT).then(|| json!({"name": "x"}));
        let (status, body) = api.send(method.clone(), uri, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}");
        assert_error_shape(&body, "not_found");
    }

    // Activate clears suspend; status answers; stats summary lists the trunk.
    let path = api.dir.path().join("api/trunk-skyetel-main.yaml");
    std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("suspend: false", "suspend: true")).unwrap();
    let (_, body) = api.send(Method::GET, "/api/trunks/skyetel_main", None).await;
    assert_eq!(body["status"], "suspended");
    let (status, body) = api.send(Method::POST, "/api/trunks/skyetel_main/activate", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!std::fs::read_to_string(&path).unwrap().contains("suspend: true"));
    let (status, body) = api.send(Method::GET, "/api/trunks/skyetel_main/status", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "pending");
    let (status, body) = api.send(Method::GET, "/api/trunks/status", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 1);
    let (status, body) = api.send(Method::GET, "/api/trunks/stats/summary", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["trunks"][0]["trunk_id"], "skyetel_main");
    assert_eq!(body["total"]["calls"], 0);

    let (status, _) = api.send(Method::DELETE, "/api/trunks/skyetel_main", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(files(api.dir.path()).is_empty(), "{:?}", files(api.dir.path()));
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_hand_written_trunk_is_edited_in_its_own_file(pool: PgPool) {
    let api = api(pool);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, api.dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/trunks/didforsale_example",
            Some(json!({"max_concurrent_calls": 1000, "calls_per_second_limit": 50})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = std::fs::read_to_string(api.dir.path().join("trunk-didforsale.yaml")).unwrap();
    assert!(text.starts_with("# DIDForSale"), "the leading comment stays: {text}");
    assert!(text.contains("maxConcurrentCalls: 1000") && text.contains("kind: Secret"), "{text}");
    let state = switchboard_operator::source::folder::FolderSource::new(api.dir.path()).read().unwrap();
    assert!(state.broken.is_empty() && state.problems.is_empty(), "{:?} {:?}", state.broken, state.problems);
    assert!(!files(api.dir.path()).iter().any(|f| f.starts_with("api/")));
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn hand_edits_show_in_the_next_get(pool: PgPool) {
    // Reads are cached per file; the folder stays the source of truth.
    let api = api(pool);
    assert_eq!(api.send(Method::POST, "/api/trunks", Some(skyetel())).await.0, StatusCode::CREATED);
    let path = api.dir.path().join("api/trunk-skyetel-main.yaml");
    for (before, after) in
        [("maxConcurrentCalls: 100", "maxConcurrentCalls: 200"), ("maxConcurrentCalls: 200", "maxConcurrentCalls: 300")]
    {
        let (_, body) = api.send(Method::GET, "/api/trunks", None).await;
        assert_eq!(body[0]["max_concurrent_calls"], before.rsplit(' ').next().unwrap().parse::<u64>().unwrap());
        // Same length, in place, right after the read: the content check catches it.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(before), "{text}");
        std::fs::write(&path, text.replace(before, after)).unwrap();
        let (_, body) = api.send(Method::GET, "/api/trunks/skyetel_main", None).await;
        assert_eq!(body["max_concurrent_calls"], after.rsplit(' ').next().unwrap().parse::<u64>().unwrap(), "{body}");
    }
    // A hand-written file appears, a removed one disappears.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/trunk-skyetel.yaml");
    std::fs::copy(examples, api.dir.path().join("trunk-skyetel.yaml")).unwrap();
    let (_, body) = api.send(Method::GET, "/api/trunks", None).await;
    let ids: Vec<&str> = body.as_array().unwrap().iter().map(|t| t["trunk_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["skyetel-example", "skyetel_main"]);
    std::fs::remove_file(&path).unwrap();
    let (_, body) = api.send(Method::GET, "/api/trunks", None).await;
    assert_eq!(body.as_array().unwrap().len(), 1, "{body}");
    assert_eq!(api.send(Method::GET, "/api/trunks/skyetel_main", None).await.0, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn concurrent_puts_leave_a_valid_file(pool: PgPool) {
    let api = Arc::new(api(pool));
    assert_eq!(api.send(Method::POST, "/api/trunks", Some(skyetel())).await.0, StatusCode::CREATED);
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let body = if i % 2 == 0 {
                json!({"max_concurrent_calls": 100 + i})
            } else {
                json!({"calls_per_second_limit": i})
            };
            api.send(Method::PUT, "/api/trunks/skyetel_main", Some(body)).await.0
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let state = switchboard_operator::source::folder::FolderSource::new(api.dir.path()).read().unwrap();
    assert_eq!(state.resources.len(), 1, "{:?}", state.broken);
    assert_eq!(files(api.dir.path()), vec!["api/trunk-skyetel-main.yaml"], "no temp files left");
    let (_, body) = api.send(Method::GET, "/api/trunks/skyetel_main", None).await;
    let max = body["max_concurrent_calls"].as_u64().unwrap();
    let cps = body["calls_per_second_limit"].as_u64().unwrap();
    assert!(
        max >= 100 && max % 2 == 0 && cps % 2 == 1,
        "both kinds of PUT merged, none lost the other's field: {body}"
    );
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn auth_and_error_shapes(pool: PgPool) {
    let api = api(pool);
    let expired = {
        let claims = json!({"sub": "x", "iss": "switchboard", "iat": 1, "exp": 1000});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET))
            .unwrap()
    };
    let wrong_issuer = JwtVerifier::new(SECRET, "someone").mint("x", 300);
    for token in [None, Some("garbage"), Some(expired.as_str()), Some(wrong_issuer.as_str())] {
        let (status, body, headers) = api.call(Method::GET, "/api/trunks", None, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_error_shape(&body, "unauthorized");
        assert!(headers.contains_key("x-request-id"));
    }
    let (_, body, _) = api.call(Method::GET, "/api/trunks", None, Some(&expired)).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"));

    for open in ["/healthz", "/metrics", "/openapi.json", "/docs/"] {
        let (status, _, _) = api.call(Method::GET, open, None, None).await;
        assert_eq!(status, StatusCode::OK, "{open}");
    }
    let (_, openapi, _) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert!(openapi["paths"]["/api/trunks/{trunk_id}"].is_object());
    assert!(openapi["components"]["schemas"]["TrunkFields"].is_object());
    // The trunk JSON's TLS and SRTP fields are documented, in and out.
    let schemas = &openapi["components"]["schemas"];
    for schema in ["TrunkFields", "TrunkResponse"] {
        assert!(schemas[schema]["properties"]["tls"].is_object(), "{schema}: {}", schemas[schema]);
        assert!(schemas[schema]["properties"]["srtp"].is_object(), "{schema}: {}", schemas[schema]);
    }
    for field in ["client_cert_secret", "ca_secret", "peer_names", "peer_fingerprints"] {
        assert!(schemas["ApiTrunkTls"]["properties"][field].is_object(), "{field}: {}", schemas["ApiTrunkTls"]);
    }

    let (status, body, headers) = api.call(Method::GET, "/nowhere", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body, "not_found");
    assert!(headers.contains_key("x-request-id"));

    let token = api.token.clone();
    let cases = [
        ("{\"trunk_id\": ", StatusCode::BAD_REQUEST, "malformed_json", None),
        ("{\"trunk_id\": \"a\", \"colour\": 1}", StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("colour")),
        (
            "{\"trunk_id\": \"a\", \"proxy_port\": \"x\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("proxy_port"),
        ),
        (
            "{\"trunk_id\": \"a\", \"gateways\": [{\"adress\": \"x\"}]}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("gateways[0].adress"),
        ),
    ];
    for (body, expected, code, field) in cases {
        let (status, value, _) = api.call(Method::POST, "/api/trunks", Some(body), Some(&token)).await;
        assert_eq!(status, expected, "{body}: {value}");
        assert_error_shape(&value, code);
        assert_eq!(value["error"]["field"].as_str(), field, "{value}");
    }
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/trunks")
        .header("authorization", format!("Bearer {token}"))
        .header("x-request-id", "abc-123")
        .body(Body::from("{}"))
        .unwrap();
    let response = api.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let (status, body, _) = api.call(Method::PATCH, "/api/trunks", Some("{}"), Some(&token)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error_shape(&body, "method_not_allowed");
    let (status, body, _) = api.call(Method::GET, "/api/calls/cdr?limit=abc", None, Some(&token)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "limit");
}

/// The examples' numbers and rules in the database: +15551234567 (main-line), and the
/// outbound rule for US numbers (`^\+1[2-9][0-9]{9}$`).
async fn reconcile_examples(pool: &PgPool) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let state = switchboard_operator::source::folder::FolderSource::new(&examples).read().unwrap();
    switchboard_operator::reconcile::Reconciler::new(pool.clone()).reconcile_all(&state).await.unwrap();
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn initiate_queues_a_call_request(pool: PgPool) {
    reconcile_examples(&pool).await;
    let api = api(pool.clone());
    let body = json!({"from_number": "+15551234567", "to_number": "+19876543210", "webhook_url": "https://yourdomain.com/call-webhook"});
    let (status, created) = api.send(Method::POST, "/api/calls/initiate", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id: uuid::Uuid = created["call_id"].as_str().unwrap().parse().unwrap();
    let (state, webhook): (String, Option<String>) =
        sqlx::query_as("SELECT state, webhook_url FROM call_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "queued");
    assert_eq!(webhook.as_deref(), Some("https://yourdomain.com/call-webhook"));
    let (status, body) = api.send(Method::GET, &format!("/api/calls/{id}"), None).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("queued")));

    let bad = json!({"from_number": "5551234567", "to_number": "+19876543210"});
    let (status, body) = api.send(Method::POST, "/api/calls/initiate", Some(bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "from_number");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM call_requests").fetch_one(&pool).await.unwrap();
    assert_eq!(count, 1, "nothing written for a bad request");

    let (status, body) = api.send(Method::GET, "/api/calls/active", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));

    // Two calls whose carrier used one Call-ID are two calls, each with the node's own id.
    sqlx::query("INSERT INTO nodes (node_id, hostname, version, heartbeat_at) VALUES ('n1', 'h', 'v', now())")
        .execute(&pool)
        .await
        .unwrap();
    for uuid in ["6f9619ff-8b86-d011-b42d-00c04fc964ff", "7f9619ff-8b86-d011-b42d-00c04fc964ff"] {
        sqlx::query(
            "INSERT INTO active_calls (call_uuid, call_id, node_id, direction, from_number, to_number, state)
             VALUES ($1::uuid, 'reused@carrier', 'n1', 'inbound', '+15551234567', '+19876543210', 'answered')",
        )
        .bind(uuid)
        .execute(&pool)
        .await
        .unwrap();
    }
    let (status, body) = api.send(Method::GET, "/api/calls/active", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut ids: Vec<&str> = body.as_array().unwrap().iter().map(|c| c["call_uuid"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["6f9619ff-8b86-d011-b42d-00c04fc964ff", "7f9619ff-8b86-d011-b42d-00c04fc964ff"]);
    assert!(body.as_array().unwrap().iter().all(|c| c["call_id"] == "reused@carrier"), "{body}");
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn cdr_pages_follow_the_cursor(pool: PgPool) {
    sqlx::query(
        "INSERT INTO cdrs (call_id, node_id, namespace, trunk_name, provider, direction, from_number, to_number, setup_at, end_at, answer_at, billable_seconds, cost)
         SELECT 'call-' || i, 'n1', 'default', CASE WHEN i % 2 = 0 THEN 'skyetel-main' ELSE 'didforsale-main' END,
                CASE WHEN i % 2 = 0 THEN 'skyetel' ELSE 'didforsale' END, 'outbound', '+15551234567', '+19876543210',
                now() - (i / 3) * interval '1 minute', now(), now(), 60, 0.0045
           FROM generate_series(1, 250) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let api = api(pool);
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    let mut last: Option<(String, i64)> = None;
    loop {
        let uri = match &cursor {
            Some(c) => format!("/api/calls/cdr?provider=skyetel&limit=40&cursor={c}"),
            None => "/api/calls/cdr?provider=skyetel&limit=40".to_string(),
        };
        let (status, body) = api.send(Method::GET, &uri, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        pages += 1;
        for item in body["items"].as_array().unwrap() {
            assert_eq!(item["provider"], "skyetel");
            let key = (item["setup_at"].as_str().unwrap().to_string(), item["id"].as_i64().unwrap());
            if let Some(previous) = &last {
                assert!(key.0 < previous.0 || (key.0 == previous.0 && key.1 < previous.1), "newest first, strictly");
            }
            assert!(seen.insert(key.1), "no row twice");
            last = Some(key);
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 125);
    assert_eq!(pages, 4);
    let (_, body) = api.send(Method::GET, "/api/calls/cdr?trunk=didforsale_main&limit=1000", None).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 125);
    let (status, body) = api.send(Method::GET, "/api/calls/cdr?cursor=bogus", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["field"], "cursor");
    let (_, body) = api.send(Method::GET, "/api/trunks/stats/summary", None).await;
    assert_eq!(body["total"]["calls"], 0, "no trunks in the folder: per-trunk rows only for known trunks");
}

/// Each route needs its scope: a read-only token reads but places no call and writes no trunk,
/// a calls token places calls but sends no SMS; `admin` may do everything.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn tokens_carry_scopes_and_a_bounded_lifetime(pool: PgPool) {
    use switchboard_api::auth::Scope;
    reconcile_examples(&pool).await;
    let api = api(pool);
    let verifier = JwtVerifier::new(SECRET, "switchboard");
    let token = |scopes: &[Scope]| verifier.mint_scoped("scoped", 300, scopes).unwrap();
    let call = r#"{"from_number": "+15551234567", "to_number": "+19876543210"}"#;
    let sms = r#"{"from_number": "+15551234567", "to_number": "+19876543210", "message": "hi"}"#;
    let read = token(&[Scope::Read]);
    assert_eq!(api.call(Method::GET, "/api/trunks", None, Some(&read)).await.0, StatusCode::OK);
    assert_eq!(api.call(Method::GET, "/api/calls/cdr", None, Some(&read)).await.0, StatusCode::OK);
    for (method, uri, body) in [
        (Method::POST, "/api/calls/initiate", Some(call)),
        (Method::POST, "/api/sms/send", Some(sms)),
        (Method::POST, "/api/trunks", Some("{}")),
        (Method::DELETE, "/api/trunks/skyetel_main", None),
    ] {
        let (status, body, _) = api.call(method.clone(), uri, body, Some(&read)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri}: {body}");
        assert_error_shape(&body, "insufficient_scope");
    }
    let calls = token(&[Scope::Calls]);
    assert_eq!(api.call(Method::POST, "/api/calls/initiate", Some(call), Some(&calls)).await.0, StatusCode::ACCEPTED);
    assert_eq!(api.call(Method::POST, "/api/sms/send", Some(sms), Some(&calls)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.call(Method::GET, "/api/trunks", None, Some(&calls)).await.0, StatusCode::FORBIDDEN);
    let admin = token(&[Scope::Admin]);
    assert_eq!(api.call(Method::POST, "/api/sms/send", Some(sms), Some(&admin)).await.0, StatusCode::ACCEPTED);
    // A token without any scope claim (as minted before scopes existed) may do nothing.
    let bare = {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = json!({"sub": "old", "iss": "switchboard", "iat": now, "exp": now + 300});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET))
            .unwrap()
    };
    assert_eq!(api.call(Method::GET, "/api/trunks", None, Some(&bare)).await.0, StatusCode::FORBIDDEN);
    // A year-long token signed with the right secret is refused: the lifetime has a maximum.
    let long =
        JwtVerifier::new(SECRET, "switchboard").with_max_ttl(u64::MAX).mint_scoped("x", 31_536_000, &[Scope::Admin]);
    let (status, body, _) = api.call(Method::GET, "/api/trunks", None, Some(&long.unwrap())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("lifetime"), "{body}");
}

/// Webhook and agent URLs that point inside the deployment are refused unless allow-listed.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn webhook_and_agent_urls_must_be_public_unless_allow_listed(pool: PgPool) {
    reconcile_examples(&pool).await;
    let api = api(pool.clone());
    let initiate = |field: &str, url: &str| {
        let mut body = json!({"from_number": "+15551234567", "to_number": "+19876543210"});
        body[field] = json!(url);
        body
    };
    for (field, url) in [
        ("webhook_url", "http://169.254.169.254/latest/meta-data/iam/"),
        ("webhook_url", "http://127.0.0.1:8080/api/trunks"),
        ("webhook_url", "http://localhost/hook"),
        ("webhook_url", "http://10.0.0.7/hook"),
        ("webhook_url", "http://[::1]/hook"),
        ("webhook_url", "http://kubernetes.default.svc/api"),
        ("webhook_url", "http://postgres:5432/"),
        ("agent_websocket_url", "ws://192.168.1.20/agent"),
        ("agent_websocket_url", "ws://agent.ai.svc.cluster.local/stream"),
    ] {
        let (status, body) = api.send(Method::POST, "/api/calls/initiate", Some(initiate(field, url))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        assert_eq!(body["error"]["field"], field, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("SWITCHBOARD_EGRESS_ALLOW"), "{body}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM call_requests").fetch_one(&pool).await.unwrap();
    assert_eq!(count, 0, "nothing queued for a refused target");
    let (status, body) = api
        .send(Method::POST, "/api/calls/initiate", Some(initiate("agent_websocket_url", "wss://agent.example.com/s")))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // With the allow-list, the listed internal targets are accepted.
    let dir = tempfile::tempdir().unwrap();
    let verifier = Arc::new(JwtVerifier::new(SECRET, "switchboard"));
    let egress = switchboard_model::egress::EgressPolicy::parse(&["127.0.0.1", ".ai.svc.cluster.local"]).unwrap();
    let state = AppState::new(pool, Arc::new(FolderStore::new(dir.path())), "default").with_egress(egress);
    let allowed = Api { app: router(state, verifier.clone()), token: verifier.mint("t", 300), dir };
    for (field, url) in [
        ("webhook_url", "http://127.0.0.1:8080/hook"),
        ("agent_websocket_url", "ws://agent.ai.svc.cluster.local/stream"),
    ] {
        let (status, body) = allowed.send(Method::POST, "/api/calls/initiate", Some(initiate(field, url))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{url}: {body}");
    }
    let (status, _) =
        allowed.send(Method::POST, "/api/calls/initiate", Some(initiate("webhook_url", "http://127.0.0.2/hook"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "only the listed address");
}

/// The toll-fraud guard: calls and messages go only to destinations an outbound RoutingRule
/// covers, and only from the deployment's own numbers.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn destinations_no_outbound_rule_covers_are_refused(pool: PgPool) {
    reconcile_examples(&pool).await;
    let api = api(pool.clone());
    for (uri, extra) in [("/api/calls/initiate", json!({})), ("/api/sms/send", json!({"message": "hi"}))] {
        for to in ["+882345678901", "+19005550100x", "+4930123456"] {
            let mut body = json!({"from_number": "+15551234567", "to_number": to});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let (status, body) = api.send(Method::POST, uri, Some(body)).await;
            if to.ends_with('x') {
                assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri} {to}: {body}");
                continue;
            }
            assert_eq!(status, StatusCode::FORBIDDEN, "{uri} {to}: {body}");
            assert_error_shape(&body, "destination_not_allowed");
            assert_eq!(body["error"]["field"], "to_number");
        }
        let mut body = json!({"from_number": "+15550009999", "to_number": "+19876543210"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, body) = api.send(Method::POST, uri, Some(body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: a number not ours: {body}");
        assert_eq!(body["error"]["field"], "from_number");
    }
    let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM call_requests").fetch_one(&pool).await.unwrap();
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap();
    assert_eq!((calls, messages), (0, 0));
}

/// Placing calls and sending messages are rate-limited per token subject and per from-number:
/// 429 with Retry-After once the burst is used up.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn calls_and_messages_are_rate_limited(pool: PgPool) {
    use switchboard_api::limits::LimitArgs;
    reconcile_examples(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let verifier = Arc::new(JwtVerifier::new(SECRET, "switchboard"));
    let limits = LimitArgs { api_rate_per_subject: 6.0, api_rate_per_number: 3.0, api_rate_burst: 2 };
    let state = AppState::new(pool, Arc::new(FolderStore::new(dir.path())), "default").with_limits(&limits);
    let app = router(state, verifier.clone());
    let api =
        |subject: &str| Api { app: app.clone(), token: verifier.mint(subject, 300), dir: tempfile::tempdir().unwrap() };
    let (alice, bob) = (api("alice"), api("bob"));
    let call = |from: &str| json!({"from_number": from, "to_number": "+19876543210"});
    for _ in 0..2 {
        assert_eq!(
            alice.send(Method::POST, "/api/calls/initiate", Some(call("+15551234567"))).await.0,
            StatusCode::ACCEPTED
        );
    }
    // The from-number's burst is used up: another subject is refused for it too.
    let body = serde_json::to_string(&call("+15551234567")).unwrap();
    let (status, value, headers) = bob.call(Method::POST, "/api/calls/initiate", Some(&body), Some(&bob.token)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{value}");
    assert_error_shape(&value, "rate_limited");
    assert!(value["error"]["message"].as_str().unwrap().contains("from-number"), "{value}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    // Bob, from another number, is within both limits; Alice's own budget is used up.
    assert_eq!(bob.send(Method::POST, "/api/calls/initiate", Some(call("+15557654321"))).await.0, StatusCode::ACCEPTED);
    let (status, value) = alice.send(Method::POST, "/api/calls/initiate", Some(call("+15557654321"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{value}");
    assert!(value["error"]["message"].as_str().unwrap().contains("subject"), "{value}");
    // Messages have a budget of their own.
    let sms = json!({"from_number": "+15557654321", "to_number": "+19876543210", "message": "hi"});
    assert_eq!(alice.send(Method::POST, "/api/sms/send", Some(sms)).await.0, StatusCode::ACCEPTED);
}

/// Queued requests expire (`expires_in_seconds`, default 60; out of range is a 422), and
/// `/api/calls/active` lists only the calls of live nodes: a node not heard from for three of
/// its heartbeats is left out until the reaper ends its calls.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn requests_expire_and_active_calls_come_from_live_nodes(pool: PgPool) {
    reconcile_examples(&pool).await;
    let api = api(pool.clone());
    let seconds = |body: &Value| {
        let at = |field: &str| chrono::DateTime::parse_from_rfc3339(body[field].as_str().unwrap()).unwrap();
        (at("expires_at") - at("created_at")).num_seconds()
    };
    let call = json!({"from_number": "+15551234567", "to_number": "+19876543210"});
    let (status, created) = api.send(Method::POST, "/api/calls/initiate", Some(call.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(seconds(&created), 60, "{created}");
    let mut short = call.clone();
    short["expires_in_seconds"] = json!(5);
    let (status, created) = api.send(Method::POST, "/api/calls/initiate", Some(short)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(seconds(&created), 5, "{created}");
    let (_, fetched) =
        api.send(Method::GET, &format!("/api/calls/{}", created["call_id"].as_str().unwrap()), None).await;
    assert_eq!(fetched["expires_at"], created["expires_at"]);
    let mut bad = call;
    bad["expires_in_seconds"] = json!(0);
    let (status, body) = api.send(Method::POST, "/api/calls/initiate", Some(bad)).await;
    assert_eq!((status, &body["error"]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("expires_in_seconds")));

    sqlx::raw_sql(
        "INSERT INTO nodes (node_id, hostname, version, heartbeat_at, heartbeat_interval_ms)
         VALUES ('live', 'h', 'v', now(), 5000), ('dead', 'h', 'v', now() - interval '1 minute', 5000);
         INSERT INTO active_calls (call_id, node_id, namespace, trunk_name, direction, from_number, to_number, state)
         VALUES ('on-live', 'live', 'default', 'skyetel-main', 'inbound', '+1', '+2', 'answered'),
                ('on-dead', 'dead', 'default', 'skyetel-main', 'inbound', '+1', '+2', 'answered')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (status, body) = api.send(Method::GET, "/api/calls/active", None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = body.as_array().unwrap().iter().map(|c| c["call_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["on-live"]);
    // The trunk counters too.
    let (status, body) = api.send(Method::POST, "/api/trunks", Some(skyetel())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, body) = api.send(Method::GET, "/api/trunks/stats/summary", None).await;
    assert_eq!((&body["trunks"][0]["active_calls"], &body["total"]["active_calls"]), (&json!(1), &json!(1)), "{body}");
}

/// `POST /api/calls/{call_id}/transfer`: the body, the call and the toll-fraud guard are
/// checked before anything is queued; a request is queued for the node in the call's active
/// row, and when that node does not take it in time it is withdrawn (503). The node's side
/// (accepting, dialling, bridging) is tested against a real node in the SIP node's
/// `agent_calls` tests.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn transfer_requests_are_checked_and_queued_for_the_calls_node(pool: PgPool) {
    reconcile_examples(&pool).await;
    let api = api(pool.clone());
    sqlx::query("INSERT INTO nodes (node_id, hostname, version, heartbeat_at) VALUES ('n1', 'h', 'v', now())")
        .execute(&pool)
        .await
        .unwrap();
    for (call_id, state) in [("CA-answered", "answered"), ("CA-ringing", "ringing")] {
        sqlx::query(
            "INSERT INTO active_calls (call_uuid, call_id, node_id, direction, from_number, to_number, state)
             VALUES (gen_random_uuid(), $1, 'n1', 'inbound', '+15557654321', '+15551234567', $2)",
        )
        .bind(call_id)
        .bind(state)
        .execute(&pool)
        .await
        .unwrap();
    }
    let transfer = |body: Value| (Method::POST, "/api/calls/CA-answered/transfer", Some(body));

    // 422: a bad body, naming the field.
    for (body, field) in [
        (json!({"to": "12345", "mode": "blind"}), Some("to")),
        (json!({"to": "sip:human@example.com?Route=%3Csip:evil%3E", "mode": "blind"}), Some("to")),
        (json!({"to": "sip:human@exa mple.com", "mode": "blind"}), Some("to")),
        (json!({"to": "+19876543210", "mode": "blind", "timeout_seconds": 1}), Some("timeout_seconds")),
        (json!({"to": "+19876543210", "mode": "blind", "caller_id": "anonymous"}), Some("caller_id")),
        (json!({"to": "+19876543210", "mode": "blind", "summary": "x".repeat(1025)}), Some("summary")),
        (json!({"to": "+19876543210", "mode": "blind", "webhook_url": "http://10.0.0.1/hook"}), Some("webhook_url")),
        (json!({"to": "+19876543210", "mode": "cold"}), None),
        (json!({"to": "+19876543210", "mode": "blind", "extra": 1}), None),
    ] {
        let (method, uri, body) = transfer(body.clone());
        let (status, answer) = api.send(method, uri, body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body:?}: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"], field, "{answer}");
        }
    }
    // 404: no such call; 409: not answered yet; 403: a target no outbound rule covers.
    let good = json!({"to": "+19876543210", "mode": "blind"});
    let (status, body) = api.send(Method::POST, "/api/calls/CA-nowhere/transfer", Some(good.clone())).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = api.send(Method::POST, "/api/calls/CA-ringing/transfer", Some(good.clone())).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_error_shape(&body, "not_transferable");
    let (method, uri, body) = transfer(json!({"to": "+882345678901", "mode": "blind"}));
    let (status, body) = api.send(method, uri, body).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["field"].as_str()),
        (Some("destination_not_allowed"), Some("to"))
    );
    // SIP URIs: no open relay. A host that is no trunk's gateway and not on the egress
    // allow-list is refused, saying how to allow it; a number at a trunk's gateway must pass
    // the outbound rules like any number.
    for (to, says) in [
        ("sip:human@pbx.example.com", "SWITCHBOARD_EGRESS_ALLOW"),
        ("sip:human@203.0.113.7:5080", "Trunk's gateways"),
        ("sip:+882345678901@sip.skyetel.com", "no outbound RoutingRule"),
    ] {
        let (method, uri, body) = transfer(json!({"to": to, "mode": "blind"}));
        let (status, body) = api.send(method, uri, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{to}: {body}");
        assert_eq!(body["error"]["code"], "destination_not_allowed", "{body}");
        assert_eq!(body["error"]["field"], "to", "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains(says)), "{to}: {body}");
    }
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM call_commands").fetch_one(&pool).await.unwrap();
    assert_eq!(queued, 0, "nothing queued for a refused request");

    // A good request is queued for the call's node; no node takes it here: 503, withdrawn.
    let (method, uri, body) = transfer(json!({"to": "+19876543210", "mode": "blind", "summary": "refund"}));
    let (status, answer) = api.send(method, uri, body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let (node, state, stored): (String, String, Value) =
        sqlx::query_as("SELECT node_id, state, body FROM call_commands").fetch_one(&pool).await.unwrap();
    assert_eq!((node.as_str(), state.as_str()), ("n1", "rejected"));
    assert_eq!(stored["summary"], "refund", "{stored}");
    // A URI at a trunk's gateway (host case aside), whose number a rule allows, is queued too.
    let to = "sips:+19876543210@SIP2.skyetel.com:5061";
    let (method, uri, body) = transfer(json!({"to": to, "mode": "blind"}));
    let (status, answer) = api.send(method, uri, body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{to}: {answer}");
    let targets: Vec<Value> = sqlx::query_scalar("SELECT body -> 'to' FROM call_commands ORDER BY created_at")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(targets[1..], [json!(to)]);

    // Completing or cancelling needs a call in progress too.
    let (status, body) = api.send(Method::POST, "/api/calls/CA-nowhere/transfer/complete", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    for digits in ["", "12x", "1; DROP"] {
        let (status, body) =
            api.send(Method::POST, "/api/calls/CA-answered/transfer/dtmf", Some(json!({"digits": digits}))).await;
        assert_eq!(
            (status, body["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("digits")),
            "{body}"
        );
    }

    // The transfer route needs the `calls` scope.
    let verifier = JwtVerifier::new(SECRET, "switchboard");
    let read_only = verifier.mint_scoped("reader", 300, &[switchboard_api::auth::Scope::Read]).unwrap();
    let body = good.to_string();
    let (status, _, _) = api.call(Method::POST, "/api/calls/CA-answered/transfer", Some(&body), Some(&read_only)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The transfer route is in the OpenAPI document with its error responses.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_transfer_route_is_documented(pool: PgPool) {
    let api = api(pool);
    let (status, doc, _) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let route = &doc["paths"]["/api/calls/{call_id}/transfer"]["post"];
    for code in ["202", "403", "404", "409", "422", "503"] {
        assert!(route["responses"][code].is_object(), "{code} missing: {route}");
    }
    for step in ["complete", "cancel", "dtmf"] {
        let route = &doc["paths"][format!("/api/calls/{{call_id}}/transfer/{step}")]["post"];
        for code in ["200", "404", "409", "503"] {
            assert!(route["responses"][code].is_object(), "{step} {code} missing: {route}");
        }
    }
    let schema = &doc["components"]["schemas"]["TransferCall"];
    assert_eq!(schema["properties"]["mode"]["$ref"], "#/components/schemas/TransferMode", "{schema}");
}
