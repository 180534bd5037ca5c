//! What an API client can make the node connect to: webhook and agent URLs it names are
//! refused when they point at loopback, link-local, private or cluster-internal targets that
//! the egress allow-list does not list; redirects are not followed; and a trunk whose gateway
//! says TLS is never dialled in plaintext.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use common::*;
use sqlx::PgPool;
use switchboard_model::{Destination, DestinationType, NumberConfig, Transport};

/// Requests each path of the test's HTTP server received.
type Hits = Arc<Mutex<Vec<String>>>;

/// `/hook` records and answers 200; `/redirect` records and answers 307 to `/elsewhere`, which
/// records too.
async fn http_server(hits: Hits) -> std::net::SocketAddr {
    async fn hook(State(hits): State<Hits>) -> &'static str {
        hits.lock().unwrap().push("/hook".into());
        "ok"
    }
    async fn redirect(State(hits): State<Hits>) -> impl IntoResponse {
        hits.lock().unwrap().push("/redirect".into());
        (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, "/elsewhere")])
    }
    async fn elsewhere(State(hits): State<Hits>) -> &'static str {
        hits.lock().unwrap().push("/elsewhere".into());
        "ok"
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/redirect", post(redirect))
        .route("/elsewhere", post(elsewhere))
        .with_state(hits);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// [`DID`] on trunk `outbound`.
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

/// Queues an API call from [`DID`] with the given webhook and agent.
async fn queue(pool: &PgPool, webhook: Option<&str>, agent: Option<&str>) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    let destination = agent.map(|url| serde_json::json!({"type": "websocket", "url": url}));
    sqlx::query(
        "INSERT INTO call_requests (id, from_number, to_number, webhook_url, destination, state)
         VALUES ($1, $2, '+15559990000', $3, $4, 'queued')",
    )
    .bind(id)
    .bind(DID)
    .bind(webhook)
    .bind(destination)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_call_requests', $1)").bind(id.to_string()).execute(pool).await.unwrap();
    id
}

/// The request's final state and error (bounded wait).
async fn ended(pool: &PgPool, id: uuid::Uuid) -> (String, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row: (String, Option<String>) = sqlx::query_as("SELECT state, error FROM call_requests WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
        if row.0 == "completed" || row.0 == "failed" {
            return row;
        }
        assert!(Instant::now() < deadline, "the call request did not end: {row:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until `hits` holds `path`.
async fn hit(hits: &Hits, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hits.lock().unwrap().iter().any(|h| h == path) {
        assert!(Instant::now() < deadline, "{path} was never requested: {:?}", hits.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Without an allow-list, a loopback webhook gets no event and a loopback agent no connection,
/// and the call is not placed; the same webhook with the allow-list gets its events.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn loopback_targets_need_the_allow_list(pool: PgPool) {
    let hits: Hits = Arc::default();
    let http = http_server(Arc::clone(&hits)).await;
    let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("ws://{}/agent", agent.local_addr().unwrap());
    // No trunk: an allowed call ends at once ("no outbound trunk"), after `initiated`.
    let node = Node::start_tuned(&pool, vec![], vec![from_number()], vec![], |args| args.egress_allow.clear()).await;

    let hook = format!("http://{http}/hook");
    let id = queue(&pool, Some(&hook), None).await;
    let (state, _) = ended(&pool, id).await;
    assert_eq!(state, "failed");
    let id = queue(&pool, None, Some(&agent_url)).await;
    let (state, error) = ended(&pool, id).await;
    assert_eq!(state, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("agent_websocket_url refused") && error.contains("loopback"), "{error}");
    // Deliveries run on their own tasks: give them time to (not) arrive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(hits.lock().unwrap().is_empty(), "a refused webhook was called: {:?}", hits.lock().unwrap());
    let accepted = tokio::time::timeout(Duration::from_millis(100), agent.accept()).await;
    assert!(accepted.is_err(), "a refused agent was connected to");
    node.stop().await;

    // The same webhook, allow-listed, is called.
    sqlx::query("DELETE FROM nodes").execute(&pool).await.unwrap();
    let node = Node::start_tuned(&pool, vec![], vec![from_number()], vec![], |args| {
        args.egress_allow = vec!["127.0.0.1".into()];
    })
    .await;
    let id = queue(&pool, Some(&hook), None).await;
    ended(&pool, id).await;
    hit(&hits, "/hook").await;
    node.stop().await;
}

/// A webhook that answers with a redirect is not followed there.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn webhook_redirects_are_not_followed(pool: PgPool) {
    let hits: Hits = Arc::default();
    let http = http_server(Arc::clone(&hits)).await;
    let node = Node::start(&pool, vec![], vec![from_number()]).await;
    let id = queue(&pool, Some(&format!("http://{http}/redirect")), None).await;
    ended(&pool, id).await;
    hit(&hits, "/redirect").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !hits.lock().unwrap().iter().any(|h| h == "/elsewhere"),
        "the redirect was followed: {:?}",
        hits.lock().unwrap()
    );
    node.stop().await;
}

/// A gateway whose transport is TLS is dialled over TLS only: its port sees a TLS handshake
/// (a ClientHello record) on TCP, never a plaintext datagram or plaintext SIP, and the request
/// fails when the gateway does not complete the handshake.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_tls_gateway_is_never_dialled_in_plaintext(pool: PgPool) {
    use tokio::io::AsyncReadExt;
    let gateway = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = gateway.local_addr().unwrap().port();
    let stream_gateway = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let mut outbound = trunk("outbound", vec![("127.0.0.1".into(), port)]);
    outbound.gateways[0].transport = Transport::Tls;
    let node = Node::start(&pool, vec![outbound], vec![from_number()]).await;
    let id = queue(&pool, None, None).await;
    let (mut stream, _) =
        tokio::time::timeout(Duration::from_secs(10), stream_gateway.accept()).await.expect("a connection").unwrap();
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first[0], 0x16, "a TLS handshake record, not plaintext SIP");
    drop(stream);
    let (state, _error) = ended(&pool, id).await;
    assert_eq!(state, "failed");
    let mut buffer = [0u8; 2048];
    let received = tokio::time::timeout(Duration::from_millis(500), gateway.recv_from(&mut buffer)).await;
    assert!(
        received.is_err(),
        "the TLS gateway got a plaintext datagram: {:?}",
        received.map(|r| r.map(|(n, _)| String::from_utf8_lossy(&buffer[..n]).to_string()))
    );
    node.stop().await;
}
