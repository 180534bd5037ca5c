//! RFC 4028 session timers on calls placed through the REST API's queue (`call_requests`): the
//! node's INVITE to a sipp callee offers a timer, a 422 is retried at the callee's Min-SE, the
//! callee's refreshes are answered, the node refreshes a callee without timers, and a session
//! nobody refreshed is ended with BYE and a CDR reason.
//!
//! Why these durations: the interval is the flags' (and the RFC's) minimum, 90 s, so a refresh
//! is due every 45 s and an unrefreshed session expires after 90 - min(32, 30) = 60 s. The two
//! long calls run to about 100 s, past that 60 s deadline, so that only working refreshes keep
//! them up; the callee's refreshes and the expiry share one call so that, with the two test
//! threads of a two-CPU runner, the file takes about 100 s (the 422 test takes one second).

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use switchboard_model::{Destination, DestinationType, NumberConfig};

/// The number the API calls from: its trunk `outbound` reaches the sipp callee.
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

/// The node with a 90 s session interval, its outbound trunk pointing at `callee`.
async fn node(pool: &PgPool, callee: u16) -> Node {
    let outbound = trunk("outbound", vec![("127.0.0.1".into(), callee)]);
    Node::start_tuned(pool, vec![outbound], vec![from_number()], vec![], |args| {
        args.session.session_expires = 90;
    })
    .await
}

/// Queues an API call (no agent: the callee hears silence) and wakes the node.
async fn place_call(pool: &PgPool) {
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
}

/// The single CDR of the call, once written.
async fn the_cdr(pool: &PgPool) -> Cdr {
    let mut cdrs = cdrs(pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    cdrs.remove(0)
}

/// The callee names itself refresher, refreshes once with UPDATE at 40 s and then stops: the
/// node answers the refresh on the leg and sends nothing of its own (the scenario fails on any
/// request from the node but the BYE), and ends the call 60 s after that refresh, at about
/// 100 s, with a BYE naming the expired timer and a CDR reason. Without the refresh answered
/// the BYE would have come at 60 s.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_lives_on_the_callees_refresh_and_ends_when_they_stop(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = node(&pool, callee).await;
    let uas = long_uas(&scenario("uas_api_refreshes_then_stops.xml"), callee, Duration::from_secs(130));
    let started = Instant::now();
    place_call(&pool).await;
    assert!(uas.wait().await.success(), "the callee's refresh was not answered, or no BYE naming the expired timer");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(95), "the node hung up before the refreshed session expired: {waited:?}");
    let cdr = the_cdr(&pool).await;
    assert_eq!((cdr.sip_code, cdr.hangup_by.as_deref()), (Some(200), Some("system")), "{cdr:?}");
    let reason = cdr.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("session timer expired on the callee's leg"), "{reason}");
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

/// A callee without session timers: the node refreshes the leg itself at 45 s and 90 s with
/// re-INVITEs carrying its SDP (the scenario checks both), and the call lasts until the
/// callee's BYE at about 95 s.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_node_refreshes_an_api_callee_without_timers(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = node(&pool, callee).await;
    let uas = long_uas(&scenario("uas_api_refreshed_by_node.xml"), callee, Duration::from_secs(130));
    let started = Instant::now();
    place_call(&pool).await;
    assert!(uas.wait().await.success(), "the callee did not get the node's two refreshes before its BYE");
    assert!(started.elapsed() >= Duration::from_secs(90), "the call ended early: {:?}", started.elapsed());
    let cdr = the_cdr(&pool).await;
    assert_eq!((cdr.sip_code, cdr.hangup_by.as_deref()), (Some(200), Some("callee")), "{cdr:?}");
    node.stop().await;
}

/// A callee whose Min-SE is above the node's interval answers 422: the node sends the INVITE
/// again at the callee's 120 s (the scenario checks both headers), in the same attempt.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_answered_422_is_retried_at_the_callees_min_se(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = node(&pool, callee).await;
    let uas = uas(&["-sf", &scenario("uas_api_session_422.xml")], callee, 1);
    place_call(&pool).await;
    assert!(uas.wait().await.success(), "the node did not retry the 422 with Session-Expires and Min-SE 120");
    let cdr = the_cdr(&pool).await;
    assert_eq!((cdr.attempt, cdr.sip_code, cdr.hangup_by.as_deref()), (1, Some(200), Some("callee")), "{cdr:?}");
    assert!(cdr.answer_at.is_some(), "{cdr:?}");
    node.stop().await;
}
