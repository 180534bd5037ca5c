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
use base64::Engine as _;
use common::ua::*;
use common::*;
use futures::{SinkExt as _, StreamExt as _};
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

/// A test agent: records every event; after `start` it says 10 frames of 0x55 and, once it has
/// heard 10 frames from the callee, closes the WebSocket (the agent ends the call).
async fn agent(listener: tokio::net::TcpListener, seen: tokio::sync::mpsc::UnboundedSender<serde_json::Value>) {
    use tokio_tungstenite::tungstenite::Message;
    let (stream, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    let mut heard = 0;
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else { continue };
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let _ = seen.send(value.clone());
        match value["event"].as_str() {
            Some("start") => {
                let payload = base64::engine::general_purpose::STANDARD.encode([0x55u8; 1600]);
                let media = serde_json::json!({"event": "media", "streamSid": value["streamSid"], "media": {"payload": payload}});
                ws.send(Message::Text(media.to_string().into())).await.unwrap();
            }
            Some("media") => {
                heard += 1;
                if heard == 10 {
                    let _ = ws.close(None).await;
                }
            }
            _ => {}
        }
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_with_an_agent_bridges_the_answered_callee_to_it(pool: PgPool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(agent(listener, seen_tx));

    let callee = Ua::new().await;
    let outbound = trunk("outbound", vec![("127.0.0.1".into(), callee.sip_addr().port())]);
    let node = Node::start(&pool, vec![outbound], vec![from_number()]).await;
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO call_requests (id, from_number, to_number, destination, state) VALUES ($1, $2, '+15559990000', $3, 'queued')",
    )
    .bind(id)
    .bind(DID)
    .bind(serde_json::json!({"type": "websocket", "url": url}))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_call_requests', $1)").bind(id.to_string()).execute(&pool).await.unwrap();

    // The callee answers the node's offer (the node's own address and port).
    let (invite, from) = callee.request("INVITE").await;
    let node_rtp = sdp_rtp(&invite);
    assert!(node_rtp.port() != 9 && node_rtp.port() != callee.rtp_port(), "{invite}");
    let answer = sdp(callee.rtp_port(), "0", "sendrecv");
    callee.send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    let _ack = callee.request("ACK").await;

    // The agent's voice reaches the callee; the callee's reaches the agent.
    let (heard, ()) = tokio::join!(callee.rtp_collect(Duration::from_millis(800)), async {
        for i in 0..12u16 {
            callee.rtp_send(node_rtp, 0, 10 + i, &[i as u8; 160]).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(heard.len() >= 5, "the agent's audio must reach the callee: {} packets", heard.len());
    assert!(heard.iter().all(|(pt, payload)| *pt == 0 && payload.iter().all(|b| *b == 0x55)));

    // The agent hangs up: the callee gets a BYE.
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;

    let mut events = vec![];
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), seen.recv()).await {
        events.push(event);
    }
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(&kinds[..2], ["connected", "start"], "{kinds:?}");
    let start = &events[1]["start"];
    assert_eq!(start["customParameters"]["to"], "+15559990000", "{start}");
    assert_eq!(start["customParameters"]["trunk"], "outbound", "{start}");
    let frames = events.iter().filter(|e| e["event"] == "media").count();
    assert!(frames >= 10, "the callee's audio must reach the agent: {frames} frames");
    let cdrs = cdrs(&pool, 1).await;
    let reason = cdrs[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("agent ended the call"), "CDR reason: {reason}");
    assert!(cdrs[0].answer_at.is_some());
    node.stop().await;
}

/// Queues an API call from [`DID`] to +15559990000 with no webhook and no agent.
async fn queue_call(pool: &PgPool) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO call_requests (id, from_number, to_number, state) VALUES ($1, $2, '+15559990000', 'queued')",
    )
    .bind(id)
    .bind(DID)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_call_requests', $1)").bind(id.to_string()).execute(pool).await.unwrap();
    id
}

/// The API path shares the inbound path's outbound attempt: the trunk's failover timeout moves
/// the call from a silent gateway to the next, a 407 is answered with the trunk's credential
/// (CSeq 2, a new branch), and the ACK and later requests go to the callee's Contact.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_fails_over_from_a_silent_gateway_answers_a_challenge_and_follows_the_contact(pool: PgPool) {
    let silent = Ua::new().await;
    let callee = Ua::new().await;
    let contact = Ua::new().await;
    let mut outbound = trunk(
        "outbound",
        vec![("127.0.0.1".into(), silent.sip_addr().port()), ("127.0.0.1".into(), callee.sip_addr().port())],
    );
    outbound.failover_timeout_seconds = 1;
    outbound.auth_method = switchboard_model::AuthMethod::Digest;
    let credential = switchboard_model::Credential {
        namespace: "default".into(),
        trunk_name: "outbound".into(),
        username: "acct".into(),
        password: "secret".into(),
        secret_name: "outbound-credentials".into(),
    };
    let node = Node::start_with(&pool, vec![outbound], vec![from_number()], vec![credential]).await;
    let id = queue_call(&pool).await;

    let (first, _) = silent.request("INVITE").await;
    let sent_first = Instant::now();
    let (invite, from) = callee.request("INVITE").await;
    let waited = sent_first.elapsed();
    // Bounds of behaviour, not speed: the trunk says 1 s; the old fixed 8 s would exceed it.
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "failover after {waited:?}");
    assert_ne!(header(&first, "Call-ID"), header(&invite, "Call-ID"), "each gateway gets its own attempt");

    let challenge = reply(&invite, "407 Proxy Authentication Required", callee.sip_addr(), None).replace(
        "Content-Length: 0",
        "Proxy-Authenticate: Digest realm=\"carrier\", nonce=\"abc123\", algorithm=MD5, qop=\"auth\"\r\nContent-Length: 0",
    );
    callee.send(&challenge, from).await;
    let (_ack_of_407, _) = callee.request("ACK").await;
    let (retry, from) = callee.request("INVITE").await;
    let authorization = header(&retry, "Proxy-Authorization").expect("the retried INVITE carries credentials");
    assert!(authorization.contains("username=\"acct\"") && authorization.contains("realm=\"carrier\""), "{retry}");
    assert_eq!(header(&retry, "CSeq"), Some("2 INVITE"), "{retry}");
    assert_ne!(header(&retry, "Via"), header(&invite, "Via"), "a new transaction has a new branch");
    assert_eq!(header(&retry, "Call-ID"), header(&invite, "Call-ID"));

    callee.send(&reply(&retry, "180 Ringing", callee.sip_addr(), None), from).await;
    let answer = sdp(callee.rtp_port(), "0", "sendrecv");
    let ok = reply(&retry, "200 OK", contact.sip_addr(), Some(&answer));
    callee.send(&ok, from).await;
    // RFC 3261 13.2.2.4: the ACK for a 2xx goes to the remote target (no route set here).
    let (ack, _) = contact.request("ACK").await;
    assert_eq!(header(&ack, "CSeq"), Some("2 ACK"), "{ack}");

    // The callee hangs up from its Contact address.
    let node_from = header(&retry, "From").unwrap();
    let to = header(&retry, "To").unwrap();
    let call_id = header(&retry, "Call-ID").unwrap();
    let contact_addr = contact.sip_addr();
    let bye = format!(
        "BYE sip:{DID}@{} SIP/2.0\r\nVia: SIP/2.0/UDP {contact_addr};branch=z9hG4bK-callee-bye\r\nFrom: {to};tag=callee\r\n\
         To: {node_from}\r\nCall-ID: {call_id}\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        node.addr
    );
    contact.send(&bye, node.addr).await;
    let ok = contact.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let (state,): (String,) =
            sqlx::query_as("SELECT state FROM call_requests WHERE id = $1").bind(id).fetch_one(&pool).await.unwrap();
        if state == "completed" || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state, "completed");
    // One CDR per attempt: the silent gateway's timeout, then the answered call.
    let cdrs = cdrs(&pool, 2).await;
    assert_eq!(cdrs.iter().map(|c| (c.attempt, c.sip_code)).collect::<Vec<_>>(), [(1, Some(408)), (2, Some(200))]);
    let cdr = cdrs.last().unwrap();
    assert!(cdr.answer_at.is_some(), "{cdr:?}");
    node.stop().await;
}

/// At the drain limit the node hangs up an answered API call itself: BYE to the callee with a
/// `Reason`, the request `completed`, the CDR's reason `node shutdown`.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_drain_limit_ends_an_api_call_with_bye(pool: PgPool) {
    let callee = Ua::new().await;
    let outbound = trunk("outbound", vec![("127.0.0.1".into(), callee.sip_addr().port())]);
    let node = Node::start(&pool, vec![outbound], vec![from_number()]).await;
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO call_requests (id, from_number, to_number, state) VALUES ($1, $2, '+15559990000', 'queued')",
    )
    .bind(id)
    .bind(DID)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_call_requests', $1)").bind(id.to_string()).execute(&pool).await.unwrap();

    let (invite, from) = callee.request("INVITE").await;
    let answer = sdp(callee.rtp_port(), "0", "sendrecv");
    callee.send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    let _ = callee.request("ACK").await;
    let state = || async {
        sqlx::query_scalar::<_, String>("SELECT state FROM call_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state().await != "answered" {
        assert!(Instant::now() < deadline, "the API call was never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    node.drain.end_calls();
    let (bye, from) = callee.request("BYE").await;
    assert!(header(&bye, "Reason").is_some_and(|r| r.contains("node shutdown")), "{bye}");
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0].reason.as_deref(), Some("node shutdown"), "{cdrs:?}");
    assert!(cdrs[0].answer_at.is_some(), "{cdrs:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while state().await != "completed" {
        assert!(Instant::now() < deadline, "the request never completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}
