//! A small in-memory Kubernetes API server behind a kube `Client` (tower-test mock): list, watch
//! (streamed), JSON and merge patches with resourceVersion checks, the status subresource,
//! finalizers and deletion, events. Enough to run the operator's real controllers end to end
//! without a cluster, and to count every write they make.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;
type Key = (String, String, String);
type WatchSender = UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// Counters of what the operator did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Writes {
    pub status: u64,
    pub finalizer: u64,
    pub events: u64,
    pub conflicts: u64,
}

impl Writes {
    pub fn total(&self) -> u64 {
        self.status + self.finalizer + self.events
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    resource_version: u64,
    /// Plural, label selector, stream.
    watchers: Vec<(String, Selector, WatchSender)>,
    writes: Writes,
    events: Vec<Value>,
    /// Every list and watch request: plural and query.
    reads: Vec<(String, String)>,
}

/// An equality-based label selector (`k=v,k2=v2`, `k` for "has the label"); empty matches all.
#[derive(Debug, Clone, Default)]
struct Selector(Vec<(String, Option<String>)>);

impl Selector {
    fn from_query(query: &str) -> Selector {
        let value = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "labelSelector")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        Selector(
            value
                .split(',')
                .filter(|term| !term.trim().is_empty())
                .map(|term| match term.split_once('=') {
                    Some((k, v)) => (k.trim().to_string(), Some(v.trim_start_matches('=').trim().to_string())),
                    None => (term.trim().to_string(), None),
                })
                .collect(),
        )
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.0.iter().all(|(k, v)| match (labels.get(k).and_then(Value::as_str), v) {
            (Some(actual), Some(wanted)) => actual == wanted,
            (Some(_), None) => true,
            (None, _) => false,
        })
    }
}

/// The fake API server.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn plural_of(kind: &str) -> &'static str {
    match kind {
        "Trunk" => "trunks",
        "PhoneNumber" => "phonenumbers",
        "RoutingRule" => "routingrules",
        "Secret" => "secrets",
        other => panic!("fake API: unknown kind {other}"),
    }
}

fn full(status: StatusCode, body: &Value) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed_unsync())
        .unwrap()
}

fn status_error(code: u16, reason: &str, message: &str) -> Response<FakeBody> {
    full(
        StatusCode::from_u16(code).unwrap(),
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message}),
    )
}

impl FakeApi {
    /// A client talking to this server; requests are served on a spawned task.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<FakeBody>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await.unwrap_or_default();
                send.send_response(api.serve(&parts.method, &parts.uri, &body));
            }
        });
        Client::new(service, "default")
    }

    pub fn writes(&self) -> Writes {
        self.state.lock().unwrap().writes
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// The queries of every list and watch of a kind.
    pub fn reads(&self, kind: &str) -> Vec<String> {
        let plural = plural_of(kind);
        self.state.lock().unwrap().reads.iter().filter(|(p, _)| p == plural).map(|(_, q)| q.clone()).collect()
    }

    /// How many objects of a kind satisfy `predicate` (without copying them).
    pub fn count(&self, kind: &str, predicate: impl Fn(&Value) -> bool) -> usize {
        let plural = plural_of(kind);
        self.state.lock().unwrap().objects.iter().filter(|(k, v)| k.0 == plural && predicate(v)).count()
    }

    /// Every stored object of a kind.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let plural = plural_of(kind);
        self.state.lock().unwrap().objects.iter().filter(|(k, _)| k.0 == plural).map(|(_, v)| v.clone()).collect()
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (plural_of(kind).to_string(), namespace.to_string(), name.to_string());
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// `kubectl apply` of one manifest (create, or replace the spec/data of an existing object).
    pub fn apply(&self, mut manifest: Value) {
        let mut state = self.state.lock().unwrap();
        let kind = manifest["kind"].as_str().unwrap().to_string();
        let namespace = manifest["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let name = manifest["metadata"]["name"].as_str().unwrap().to_string();
        let key = (plural_of(&kind).to_string(), namespace.clone(), name.clone());
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        if kind == "Secret"
            && let Some(data) = manifest.get_mut("stringData").map(Value::take)
        {
            use base64::Engine;
            let encoded: serde_json::Map<String, Value> = data
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap());
                    (k.clone(), Value::String(bytes))
                })
                .collect();
            manifest["data"] = Value::Object(encoded);
            manifest.as_object_mut().unwrap().remove("stringData");
        }
        let object = match state.objects.get(&key) {
            Some(existing) => {
                let mut object = existing.clone();
                if let Some(labels) = manifest["metadata"].get("labels") {
                    object["metadata"]["labels"] = labels.clone();
                }
                for field in ["spec", "data"] {
                    if let Some(value) = manifest.get(field) {
                        if object.get(field) != Some(value) {
                            let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
                            object["metadata"]["generation"] = json!(generation + 1);
                        }
                        object[field] = value.clone();
                    }
                }
                object["metadata"]["resourceVersion"] = json!(rv);
                object
            }
            None => {
                let mut object = manifest;
                let metadata = object["metadata"].as_object_mut().unwrap();
                metadata.insert("namespace".into(), json!(namespace));
                metadata.insert("uid".into(), json!(format!("uid-{kind}-{namespace}-{name}")));
                metadata.insert("resourceVersion".into(), json!(rv));
                metadata.insert("generation".into(), json!(1));
                metadata.insert(
                    "creationTimestamp".into(),
                    json!(
                        k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + state.resource_version as i64)
                            .unwrap()
                            .to_string()
                    ),
                );
                object
            }
        };
        state.objects.insert(key.clone(), object.clone());
        Self::notify(&mut state, &key.0, "MODIFIED", &object);
    }

    /// `kubectl delete`: with finalizers, sets deletionTimestamp; without, removes.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        let key = (plural_of(kind).to_string(), namespace.to_string(), name.to_string());
        let Some(mut object) = state.objects.get(&key).cloned() else { return };
        state.resource_version += 1;
        let finalizers = object["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if finalizers {
            object["metadata"]["deletionTimestamp"] = json!("2030-01-01T00:00:00Z");
            let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
            object["metadata"]["generation"] = json!(generation + 1);
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state.objects.insert(key.clone(), object.clone());
            Self::notify(&mut state, &key.0, "MODIFIED", &object);
        } else {
            state.objects.remove(&key);
            Self::notify(&mut state, &key.0, "DELETED", &object);
        }
    }

    /// Ends every watch with 410 Gone, as an expired watch does: the watchers list again.
    pub fn expire_watches(&self) {
        let mut state = self.state.lock().unwrap();
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired", "message": "too old resource version"}});
        for (_, _, watcher) in state.watchers.drain(..) {
            let _ = watcher.unbounded_send(Ok(Frame::data(Bytes::from(format!("{gone}\n")))));
        }
    }

    /// Sends the event to the watchers of `plural` whose selector matches; an object that no
    /// longer matches a watcher's selector is DELETED for it, as the API server does.
    fn notify(state: &mut State, plural: &str, type_: &str, object: &Value) {
        let line = |type_: &str| Bytes::from(format!("{}\n", json!({"type": type_, "object": object})));
        state.watchers.retain(|(p, selector, tx)| {
            if p != plural {
                return true;
            }
            let type_ = if selector.matches(object) { type_ } else { "DELETED" };
            tx.unbounded_send(Ok(Frame::data(line(type_)))).is_ok()
        });
    }

    fn serve(&self, method: &Method, uri: &http::Uri, body: &[u8]) -> Response<FakeBody> {
        let path = uri.path();
        let query = uri.query().unwrap_or("");
        let rest = path
            .strip_prefix("/apis/switchboard.dev/v1alpha1/")
            .or_else(|| path.strip_prefix("/apis/events.k8s.io/v1/"))
            .or_else(|| path.strip_prefix("/api/v1/"))
            .unwrap_or_else(|| panic!("fake API: unexpected path {path}"));
        let parts: Vec<&str> = rest.split('/').collect();
        let (namespace, plural, name, subresource) = match parts.as_slice() {
            [plural] => (None, *plural, None, None),
            ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
            ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
            _ => panic!("fake API: unexpected path {path}"),
        };
        let mut state = self.state.lock().unwrap();
        if plural == "events" {
            let event: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            state.writes.events += 1;
            state.events.push(event.clone());
            return full(if *method == Method::POST { StatusCode::CREATED } else { StatusCode::OK }, &event);
        }
        match (method.clone(), name) {
            (Method::GET, None) if query.contains("watch=true") || query.contains("watch=1") => {
                let (tx, rx) = unbounded();
                state.reads.push((plural.to_string(), query.to_string()));
                state.watchers.push((plural.to_string(), Selector::from_query(query), tx));
                Response::builder().status(200).body(StreamBody::new(rx).boxed_unsync()).unwrap()
            }
            (Method::GET, None) => {
                state.reads.push((plural.to_string(), query.to_string()));
                let selector = Selector::from_query(query);
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(k, _)| k.0 == plural && namespace.is_none_or(|ns| k.1 == ns))
                    .filter(|(_, v)| selector.matches(v))
                    .map(|(_, v)| v.clone())
                    .collect();
                full(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": state.resource_version.to_string()}, "items": items}),
                )
            }
            (Method::GET, Some(name)) => {
                let key = (plural.to_string(), namespace.unwrap().to_string(), name.to_string());
                match state.objects.get(&key) {
                    Some(object) => full(StatusCode::OK, object),
                    None => status_error(404, "NotFound", "not found"),
                }
            }
            (Method::PATCH, Some(name)) => {
                let key = (plural.to_string(), namespace.unwrap().to_string(), name.to_string());
                let Some(mut object) = state.objects.get(&key).cloned() else {
                    return status_error(404, "NotFound", "not found");
                };
                let patch: Value = serde_json::from_slice(body).unwrap();
                if subresource == Some("status") {
                    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                        && Some(rv) != object["metadata"]["resourceVersion"].as_str()
                    {
                        state.writes.conflicts += 1;
                        return status_error(409, "Conflict", "the object has been modified");
                    }
                    state.writes.status += 1;
                    let mut status = object.get("status").cloned().unwrap_or(json!({}));
                    json_patch::merge(&mut status, &patch["status"]);
                    object["status"] = status;
                } else {
                    state.writes.finalizer += 1;
                    let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
                    // Like the API server's JSON patch, a `test` for null passes on a missing field.
                    let metadata = object["metadata"].as_object_mut().unwrap();
                    metadata.entry("finalizers").or_insert(Value::Null);
                    if json_patch::patch(&mut object, &patch).is_err() {
                        return status_error(422, "Invalid", "JSON patch test failed");
                    }
                    if object["metadata"]["finalizers"].is_null() {
                        object["metadata"].as_object_mut().unwrap().remove("finalizers");
                    }
                }
                state.resource_version += 1;
                object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                let finalized = object["metadata"]["deletionTimestamp"].is_string()
                    && object["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
                if finalized {
                    state.objects.remove(&key);
                    Self::notify(&mut state, plural, "DELETED", &object);
                } else {
                    state.objects.insert(key, object.clone());
                    Self::notify(&mut state, plural, "MODIFIED", &object);
                }
                full(StatusCode::OK, &object)
            }
            _ => panic!("fake API: unexpected {method} {path}"),
        }
    }
}
