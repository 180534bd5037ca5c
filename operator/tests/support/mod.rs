//! A kube `Client` over a mocked API service (tower-test), the reflector stores filled by hand,
//! and the operator's reconcile context around them, in the style of kube-rs' controller-rs.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgPool;
use switchboard_operator::crd::{PhoneNumber, RoutingRule, Trunk};
use switchboard_operator::kubernetes::controller::{Context, MANAGER};
use switchboard_operator::kubernetes::metrics::Metrics;
use switchboard_operator::kubernetes::nodes::NodeFacts;
use switchboard_operator::kubernetes::passes::Passes;
use switchboard_operator::kubernetes::source::{Epoch, KubeStores};
use switchboard_operator::reconcile::Reconciler;
use tokio::sync::watch;

pub mod fake_api;

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The example manifests as typed objects.
#[derive(Default, Clone)]
pub struct Objects {
    pub trunks: Vec<Trunk>,
    pub numbers: Vec<PhoneNumber>,
    pub rules: Vec<RoutingRule>,
    pub secrets: Vec<Secret>,
}

/// Stamps an object the way the API server would have stored it.
pub fn stored<K: Resource>(mut object: K, created_seconds: i64) -> K {
    let meta = object.meta_mut();
    meta.namespace.get_or_insert_with(|| "default".into());
    meta.generation = Some(1);
    meta.resource_version = Some("100".into());
    meta.uid = Some(format!("uid-{}", meta.name.clone().unwrap_or_default()));
    meta.creation_timestamp = Some(Time(Timestamp::from_second(1_700_000_000 + created_seconds).unwrap()));
    object
}

impl Objects {
    pub fn examples() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut objects = Self::default();
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let mut n = 0;
        for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
            let text = std::fs::read_to_string(file).unwrap();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value = Value::deserialize(document).unwrap();
                n += 1;
                match value["kind"].as_str() {
                    Some("Trunk") => objects.trunks.push(stored(serde_json::from_value(value).unwrap(), n)),
                    Some("PhoneNumber") => objects.numbers.push(stored(serde_json::from_value(value).unwrap(), n)),
                    Some("RoutingRule") => objects.rules.push(stored(serde_json::from_value(value).unwrap(), n)),
                    Some("Secret") => objects.secrets.push(stored(serde_json::from_value(value).unwrap(), n)),
                    other => panic!("unexpected kind {other:?}"),
                }
            }
        }
        objects
    }

    pub fn trunk(&self, name: &str) -> Trunk {
        self.trunks.iter().find(|t| t.metadata.name.as_deref() == Some(name)).unwrap().clone()
    }

    pub fn number(&self, name: &str) -> PhoneNumber {
        self.numbers.iter().find(|t| t.metadata.name.as_deref() == Some(name)).unwrap().clone()
    }
}

use serde::Deserialize;

/// Writers of the stores (kept so that tests can change what the operator sees).
pub struct Writers {
    pub trunks: Writer<Trunk>,
    pub numbers: Writer<PhoneNumber>,
    pub rules: Writer<RoutingRule>,
    pub secrets: Writer<Secret>,
}

fn fill<K>(writer: &mut Writer<K>, objects: &[K])
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

/// The operator's reconcile context over a mocked API server and a real Postgres.
pub struct Harness {
    pub ctx: Arc<Context>,
    pub handle: Handle,
    pub writers: Writers,
    pub epoch: Arc<Epoch>,
    pub facts: watch::Sender<Option<Arc<NodeFacts>>>,
    pub metrics: Arc<Metrics>,
}

impl Harness {
    pub fn new(pool: PgPool, objects: &Objects) -> Self {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (trunks, mut trunks_writer) = reflector::store();
        let (numbers, mut numbers_writer) = reflector::store();
        let (rules, mut rules_writer) = reflector::store();
        let (secrets, mut secrets_writer) = reflector::store();
        fill(&mut trunks_writer, &objects.trunks);
        fill(&mut numbers_writer, &objects.numbers);
        fill(&mut rules_writer, &objects.rules);
        fill(&mut secrets_writer, &objects.secrets);
        let stores = KubeStores { trunks, numbers, rules, secrets };
        let epoch = Arc::new(Epoch::default());
        let metrics = Arc::new(Metrics::new());
        let leader = Arc::new(AtomicBool::new(true));
        let passes =
            Arc::new(Passes::new(stores, Reconciler::new(pool), epoch.clone(), None, metrics.clone(), leader.clone()));
        // One live node that has applied everything so far.
        let facts = NodeFacts { live_applied: vec![Some(i64::MAX)], ..NodeFacts::default() };
        let (facts_tx, facts_rx) = watch::channel(Some(Arc::new(facts)));
        let ctx = Arc::new(Context {
            client: client.clone(),
            passes,
            facts: facts_rx,
            reporter: MANAGER.into(),
            metrics: metrics.clone(),
            leader,
        });
        Self {
            ctx,
            handle,
            writers: Writers {
                trunks: trunks_writer,
                numbers: numbers_writer,
                rules: rules_writer,
                secrets: secrets_writer,
            },
            epoch,
            facts: facts_tx,
            metrics,
        }
    }

    /// The next request, which must come within five seconds.
    pub async fn next(&mut self) -> (Request<Body>, tower_test::mock::SendResponse<Response<Body>>) {
        tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
            .await
            .expect("the operator sent no request within 5 s")
            .expect("the client is gone")
    }

    /// Asserts that nothing is sent for a while.
    pub async fn expect_nothing(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }

    /// Expects a request with this method and path, returns its JSON body and the responder.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
    ) -> (Value, Option<String>, tower_test::mock::SendResponse<Response<Body>>) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), method, "method of {}", request.uri());
        assert_eq!(request.uri().path(), path, "path");
        let content_type = request.headers().get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string());
        let body = request.into_body().collect_bytes().await.unwrap();
        let json = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
        (json, content_type, send)
    }
}

/// A 200 response with a JSON body.
pub fn ok<T: Serialize>(body: &T) -> Response<Body> {
    Response::builder().status(StatusCode::OK).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
}

/// An API error response (`Status` object).
pub fn api_error(code: u16, reason: &str) -> Response<Body> {
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": format!("mock {reason}"), "reason": reason, "code": code,
    });
    Response::builder().status(code).body(Body::from(serde_json::to_vec(&status).unwrap())).unwrap()
}

/// `object` with its `.status` set to the patch's status (nulls removed).
pub fn with_status<K: Serialize + DeserializeOwned>(object: &K, patch: &Value) -> K {
    let mut value = serde_json::to_value(object).unwrap();
    let mut status = patch["status"].clone();
    if let Some(map) = status.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    value["status"] = status;
    let rv: u64 = value["metadata"]["resourceVersion"].as_str().unwrap_or("1").parse().unwrap_or(1);
    value["metadata"]["resourceVersion"] = Value::String((rv + 1).to_string());
    serde_json::from_value(value).unwrap()
}

/// `object` with the finalizer.
pub fn with_finalizer<K: Resource + Clone>(object: &K) -> K {
    let mut object = object.clone();
    object.meta_mut().finalizers = Some(vec![switchboard_operator::kubernetes::controller::FINALIZER.into()]);
    object
}

/// The condition of `type_` in a status patch.
pub fn condition<'a>(patch: &'a Value, type_: &str) -> &'a Value {
    patch["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {patch}"))
}

/// (status, reason) of a condition in a status patch.
pub fn cond(patch: &Value, type_: &str) -> (String, String) {
    let c = condition(patch, type_);
    (c["status"].as_str().unwrap().to_string(), c["reason"].as_str().unwrap().to_string())
}

/// A pool to a port where nothing listens: every pass fails like a database that went away.
pub fn dead_pool() -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/postgres")
        .unwrap()
}
