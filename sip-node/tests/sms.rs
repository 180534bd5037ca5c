//! SMS over SIP MESSAGE through the node: a message the API queued goes out through the
//! number's trunk to a sipp carrier answering 202; a MESSAGE from the carrier to a DID is stored
//! and delivered, signed, to the number's webhook.

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

fn did(webhook: Option<String>) -> NumberConfig {
    let mut number = number_to(Destination {
        kind: DestinationType::Reject,
        url: None,
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: Some(603),
    });
    number.message_webhook = webhook;
    number
}

async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_queued_message_goes_out_through_the_trunk(pool: PgPool) {
    let carrier_port = free_port("127.0.0.1");
    let mut carrier = trunk("carrier", vec![("127.0.0.1".into(), carrier_port)]);
    carrier.rate_per_message = rust_decimal::Decimal::new(4, 3);
    let node = Node::start(&pool, vec![carrier], vec![did(None)]).await;
    let uas = uas(&["-sf", &scenario("uas_message.xml")], carrier_port, 1);
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO messages (id, direction, namespace, trunk_name, from_number, to_number, body, status)
         VALUES ($1, 'outbound', 'default', 'carrier', $2, '+15559990000', 'Hello from the API', 'queued')",
    )
    .bind(id)
    .bind(DID)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_messages', $1)").bind(id.to_string()).execute(&pool).await.unwrap();
    assert!(uas.wait().await.success(), "the carrier did not get the MESSAGE with its text");
    let (status, code, cost): (String, Option<i32>, rust_decimal::Decimal) =
        wait_for("the message to be sent", async || {
            let row: (String, Option<i32>, rust_decimal::Decimal) =
                sqlx::query_as("SELECT status, sip_code, cost FROM messages WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (row.0 != "queued" && row.0 != "sending").then_some(row)
        })
        .await;
    assert_eq!((status.as_str(), code), ("sent", Some(202)));
    assert_eq!(cost, rust_decimal::Decimal::new(4, 3));
    node.stop().await;
}

type Seen = Arc<Mutex<Vec<(serde_json::Value, String)>>>;

async fn receive(State(seen): State<Seen>, headers: HeaderMap, body: String) -> &'static str {
    let signature =
        headers.get("x-switchboard-signature").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    seen.lock().unwrap().push((serde_json::from_str(&body).unwrap(), signature));
    "ok"
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_inbound_message_is_stored_and_delivered_to_the_webhook(pool: PgPool) {
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/sms", listener.local_addr().unwrap());
    let app = Router::new().route("/sms", post(receive)).with_state(Arc::clone(&seen));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![did(Some(hook))]).await;
    let uac = uac(&["-sf", &scenario("uac_message.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the carrier's MESSAGE was not accepted");
    let (event, signature) = wait_for("the webhook", async || seen.lock().unwrap().first().cloned()).await;
    // sipp ends the body with CRLF; the node passes the text on exactly as it came.
    assert_eq!(event["body"].as_str().map(str::trim_end), Some("Reply STOP to stop"));
    assert_eq!(event["to_number"], DID);
    assert_eq!(event["from_number"], "+15557654321");
    assert!(signature.starts_with("t="), "{signature}");
    let stored: (String, String) =
        sqlx::query_as("SELECT status, body FROM messages WHERE direction = 'inbound'").fetch_one(&pool).await.unwrap();
    assert_eq!((stored.0.as_str(), stored.1.trim_end()), ("received", "Reply STOP to stop"));
    node.stop().await;
}
