//! API-placed calls keep the same books as inbound calls (issue 20, item 5): an
//! `active_calls` row while the call is placed and up, and one CDR per attempt — here a first
//! gateway that answers 503 and a second that answers, through the real node and Postgres.

mod common;

use std::time::{Duration, Instant};

use common::ua::*;
use common::*;
use sqlx::PgPool;
use switchboard_model::{Destination, DestinationType, NumberConfig};

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

#[derive(Debug, sqlx::FromRow, PartialEq)]
struct Row {
    direction: String,
    trunk_name: Option<String>,
    state: String,
}

async fn active(pool: &PgPool) -> Vec<Row> {
    sqlx::query_as("SELECT direction, trunk_name, state FROM active_calls").fetch_all(pool).await.unwrap()
}

async fn wait_for_rows(pool: &PgPool, what: &str, check: impl Fn(&[Row]) -> bool) -> Vec<Row> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = active(pool).await;
        if check(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "{what}: {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_has_an_active_row_and_a_cdr_per_attempt(pool: PgPool) {
    let busy = Ua::new().await;
    let callee = Ua::new().await;
    let outbound = trunk(
        "outbound",
        vec![("127.0.0.1".into(), busy.sip_addr().port()), ("127.0.0.1".into(), callee.sip_addr().port())],
    );
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

    // The first gateway refuses: the node fails over to the second.
    let (first, from) = busy.request("INVITE").await;
    busy.send(&reply(&first, "503 Service Unavailable", busy.sip_addr(), None), from).await;
    let (invite, from) = callee.request("INVITE").await;
    // While it rings, the call has its row, on the trunk.
    let rows = wait_for_rows(&pool, "the placed call's row", |rows| rows.len() == 1).await;
    assert_eq!((rows[0].direction.as_str(), rows[0].trunk_name.as_deref()), ("outbound", Some("outbound")));

    let answer = sdp(callee.rtp_port(), "0", "sendrecv");
    callee.send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    let _ = callee.request("ACK").await;
    wait_for_rows(&pool, "the answered row", |rows| rows.len() == 1 && rows[0].state == "answered").await;

    // The callee hangs up.
    let node_from = header(&invite, "From").unwrap();
    let to = header(&invite, "To").unwrap();
    let call_id = header(&invite, "Call-ID").unwrap();
    let (node_addr, callee_addr) = (node.addr, callee.sip_addr());
    let bye = format!(
        "BYE sip:{DID}@{node_addr} SIP/2.0\r\nVia: SIP/2.0/UDP {callee_addr};branch=z9hG4bK-callee-bye\r\n\
         From: {to};tag=callee\r\nTo: {node_from}\r\nCall-ID: {call_id}\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    );
    callee.send(&bye, node.addr).await;
    let ok = callee.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");

    wait_for_rows(&pool, "the row removed at the end", |rows| rows.is_empty()).await;
    let cdrs = cdrs(&pool, 2).await;
    let attempts: Vec<(i32, Option<i32>, bool)> =
        cdrs.iter().map(|c| (c.attempt, c.sip_code, c.answer_at.is_some())).collect();
    assert_eq!(attempts, [(1, Some(503), false), (2, Some(200), true)], "{cdrs:?}");
    node.stop().await;
}
