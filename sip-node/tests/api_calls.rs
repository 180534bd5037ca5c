//! Calls placed through the REST API's queue (`call_requests`): the node claims the request,
//! calls a sipp callee through the from-number's trunk, and POSTs signed status callbacks
//! (initiated, ringing, answered, completed) in order to a webhook receiver in the test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::*;
use sqlx::PgPool;
use switchboard_model::{Destination, DestinationType, NumberConfig};

type Seen = Arc<Mutex<Vec<(serde_json::Value, String)>>>;

async fn receive(State(seen): State<Seen>, headers: HeaderMap, body: String) -> &'static str {
    let signature =
        headers.get("x-switchboard-signature").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    seen.lock().unwrap().push((serde_json::from_str(&body).unwrap(), format!("{signature}|{body}")));
    "ok"
}

fn from_number() -> NumberConfig {
    let mut number = number_to(Destination {
        kind: DestinationType::Reject,
        url: None,
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: Some(603),
    });
    number.trunk_ref = "outbound".into();
    number
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_reaches_the_callee_and_reports_each_status_in_order(pool: PgPool) {
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new().route("/hook", post(receive)).with_state(Arc::clone(&seen));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let callee = free_port("127.0.0.1");
    let outbound = trunk("outbound", vec![("127.0.0.1".into(), callee)]);
    let node = Node::start(&pool, vec![outbound], vec![from_number()]).await;
    let uas = uas(&["-sf", &scenario("uas_hangs_up.xml")], callee, 1);

    let id = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO call_requests (id, from_number, to_number, webhook_url, state) VALUES ($1, $2, '+15559990000', $3, 'queued')")
        .bind(id)
        .bind(DID)
        .bind(&hook)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_call_requests', $1)").bind(id.to_string()).execute(&pool).await.unwrap();

    assert!(uas.wait().await.success(), "the callee did not get the API call");
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = seen.lock().unwrap().clone();
    let statuses: Vec<String> =
        events.iter().map(|(e, _)| e["status"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(statuses, ["initiated", "ringing", "answered", "completed"], "{events:?}");
    let completed = &events[3].0;
    assert!(completed["duration_seconds"].as_u64().is_some(), "{completed}");
    assert!(completed["cost"].as_str().is_some(), "{completed}");
    // Every callback is signed with the node's webhook secret.
    for (_, signed) in &events {
        let (signature, body) = signed.split_once('|').unwrap();
        let t: i64 = signature.trim_start_matches("t=").split(',').next().unwrap().parse().unwrap();
        assert_eq!(signature, switchboard_node::webhook::Signer::new("test-webhook-secret").sign(t, body.as_bytes()));
    }
    let (state, claimed_by): (String, Option<String>) =
        sqlx::query_as("SELECT state, claimed_by FROM call_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), claimed_by.as_deref()), ("completed", Some("sipp-node")));
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.trunk_name.clone()).as_deref(), Some("outbound"), "{cdrs:?}");
    node.stop().await;
}
