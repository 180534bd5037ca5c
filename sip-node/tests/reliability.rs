//! No call and no record lost, against real processes: the `switchboard-node` binary, raw SIP
//! user agents and sipp on loopback, and Postgres — the shared server, or a private cluster the
//! test stops and starts itself (`src/postgres.rs`).
//!
//! - At the drain limit the node ends the calls still up itself: BYE on both legs, CANCEL to a
//!   callee still ringing and 503 to its caller, each CDR with reason `node shutdown`.
//! - A node killed during a database outage loses no CDR: they are in its spool, replayed at the
//!   next start; a call in progress at the kill gets a CDR with reason `node lost`.
//! - A node restarted during a database outage serves the configuration it saved on disk
//!   (stale, says `/readyz`) and takes calls.
//! - Two calls with one SIP Call-ID get two CDRs.

mod common;

#[allow(dead_code, clippy::all)]
#[path = "../../src/process.rs"]
mod process;

#[allow(dead_code, clippy::all)]
#[path = "../../src/postgres.rs"]
mod postgres;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::process::NodeProcess;
use common::ua::*;
use common::{number_to, sip_destination, trunk};
use sqlx::PgPool;
use switchboard_model::config::{bump_generation, notify_generation};
use switchboard_model::{NumberConfig, TrunkConfig};

/// A second number, whose callee the tests let ring.
const RINGING_DID: &str = "+15550002222";
const LIMIT: Duration = Duration::from_secs(30);

/// Stores `trunks` and `numbers` as one new generation and notifies; returns it.
async fn publish(pool: &PgPool, trunks: &[TrunkConfig], numbers: &[NumberConfig]) -> i64 {
    let mut tx = pool.begin().await.expect("begin");
    let generation = bump_generation(&mut tx).await.expect("bump");
    for trunk in trunks {
        trunk.upsert(&mut tx, "hash", generation).await.expect("trunk");
    }
    for number in numbers {
        number.upsert(&mut tx, "hash", generation).await.expect("number");
    }
    notify_generation(&mut tx, generation).await.expect("notify");
    tx.commit().await.expect("commit");
    generation
}

fn ringing_number(callee_port: u16) -> NumberConfig {
    NumberConfig { name: "ringing".into(), number: RINGING_DID.into(), ..number_to(sip_destination(callee_port)) }
}

/// The URL of the test's own database on the shared server.
fn url_of(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for sqlx tests");
    let base = base.split('?').next().unwrap_or(&base);
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    let database = pool.connect_options().get_database().expect("test database name").to_owned();
    format!("{server}/{database}")
}

/// An INVITE to `number` through the node.
fn invite_to(node: SocketAddr, from: SocketAddr, number: &str, call_id: &str, sdp: &str) -> String {
    invite_to_did(node, from, call_id, sdp).replace(common::DID, number)
}

/// A call from `caller` through the node to `callee`, answered and acknowledged; returns the
/// node's To tag towards the caller.
async fn answered_call(node: SocketAddr, caller: &Ua, callee: &Ua, call_id: &str) -> String {
    caller.send(&invite_to_did(node, caller.sip_addr(), call_id, &sdp(caller.rtp_port(), "0", "sendrecv")), node).await;
    let (invite, from) = callee.request("INVITE").await;
    callee
        .send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&sdp(callee.rtp_port(), "0", "sendrecv"))), from)
        .await;
    let _ = callee.request("ACK").await;
    let ok = caller.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let tag = to_tag(&ok);
    caller.send(&caller_in_dialog("ACK", node, caller.sip_addr(), call_id, &tag, 1), node).await;
    tag
}

/// The caller hangs up an answered call; the callee confirms.
async fn hang_up(node: SocketAddr, caller: &Ua, callee: &Ua, call_id: &str, tag: &str) {
    caller.send(&caller_in_dialog("BYE", node, caller.sip_addr(), call_id, tag, 2), node).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    let ok = caller.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
}

#[derive(Debug, sqlx::FromRow)]
struct Cdr {
    call_uuid: uuid::Uuid,
    call_id: String,
    sip_code: Option<i32>,
    reason: Option<String>,
    hangup_by: Option<String>,
    answer_at: Option<DateTime<Utc>>,
    end_at: DateTime<Utc>,
}

async fn cdrs(pool: &PgPool) -> Vec<Cdr> {
    sqlx::query_as(
        "SELECT call_uuid, call_id, sip_code, reason, hangup_by, answer_at, end_at FROM cdrs ORDER BY setup_at, attempt",
    )
    .fetch_all(pool)
    .await
    .expect("cdrs")
}

/// CDRs once there are `expected` of them (bounded wait; fewer if they never come).
async fn wait_for_cdrs(pool: &PgPool, expected: usize) -> Vec<Cdr> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let count: Option<i64> = sqlx::query_scalar("SELECT count(*) FROM cdrs").fetch_one(pool).await.ok();
        if count.is_some_and(|count| count as usize >= expected) || Instant::now() > deadline {
            return cdrs(pool).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The drain limit: a call answered and a call ringing outlive a 2 s drain. The node hangs up
/// both legs of the first (BYE with a `Reason`), CANCELs the second towards its callee and
/// refuses it to its caller with 503, writes both CDRs with reason `node shutdown`, and exits 0.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn calls_alive_at_the_drain_limit_are_ended_by_the_node(pool: PgPool) {
    let (answering, ringing) = (Ua::new().await, Ua::new().await);
    let numbers = [number_to(sip_destination(answering.sip_addr().port())), ringing_number(ringing.sip_addr().port())];
    let generation = publish(&pool, &[trunk("carrier", vec![])], &numbers).await;
    let state = tempfile::tempdir().expect("state dir");
    let node = NodeProcess::start(
        &url_of(&pool),
        "drain-limit",
        state.path(),
        &["--drain-seconds", "2", "--rtp-ports", "45000-45999"],
    );
    node.wait_for_log(&format!("applied config generation {generation}")).await;
    let (sip, _) = node.listening().await;

    let caller = Ua::new().await;
    let _tag = answered_call(sip, &caller, &answering, "limit-answered").await;
    let ringing_caller = Ua::new().await;
    let offer = sdp(ringing_caller.rtp_port(), "0", "sendrecv");
    ringing_caller.send(&invite_to(sip, ringing_caller.sip_addr(), RINGING_DID, "limit-ringing", &offer), sip).await;
    let (invite, invite_from) = ringing.request("INVITE").await;
    ringing.send(&reply(&invite, "180 Ringing", ringing.sip_addr(), None), invite_from).await;
    loop {
        let (text, _) = ringing_caller.recv().await;
        if text.starts_with("SIP/2.0 180") {
            break;
        }
    }

    let signalled = Instant::now();
    node.signal("TERM");
    node.wait_for_log("draining").await;

    // The answered call: BYE to the callee and to the caller, saying why.
    let (bye, from) = answering.request("BYE").await;
    assert!(signalled.elapsed() >= Duration::from_millis(1900), "the BYE came before the drain time was over");
    assert!(header(&bye, "Reason").is_some_and(|r| r.contains("node shutdown")), "{bye}");
    answering.send(&reply(&bye, "200 OK", answering.sip_addr(), None), from).await;
    let (bye, from) = caller.request("BYE").await;
    assert!(header(&bye, "Reason").is_some_and(|r| r.contains("node shutdown")), "{bye}");
    caller.send(&reply(&bye, "200 OK", caller.sip_addr(), None), from).await;

    // The ringing call: CANCEL to the callee, 503 to the caller.
    let (cancel, from) = ringing.request("CANCEL").await;
    ringing.send(&reply(&cancel, "200 OK", ringing.sip_addr(), None), from).await;
    ringing.send(&reply(&invite, "487 Request Terminated", ringing.sip_addr(), None), invite_from).await;
    let refused = ringing_caller.final_response().await;
    assert!(refused.starts_with("SIP/2.0 503"), "{refused}");

    let (status, log) = node.exited().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("every call ended"), "{log}");
    let cdrs = cdrs(&pool).await;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}\n{log}");
    for cdr in &cdrs {
        assert_eq!(cdr.reason.as_deref(), Some("node shutdown"), "{cdr:?}");
        assert_eq!(cdr.hangup_by.as_deref(), Some("system"), "{cdr:?}");
    }
    let answered: Vec<_> = cdrs.iter().filter(|c| c.answer_at.is_some()).map(|c| c.call_id.as_str()).collect();
    assert_eq!(answered, ["limit-answered"], "{cdrs:?}");
    assert_eq!(cdrs.iter().find(|c| c.call_id == "limit-ringing").and_then(|c| c.sip_code), Some(503));
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM active_calls").fetch_one(&pool).await.unwrap();
    assert_eq!(active, 0);
}

/// A second SIGTERM while draining ends the calls at once, the same way as the drain limit.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_second_sigterm_ends_the_calls_at_once(pool: PgPool) {
    let callee = Ua::new().await;
    let generation =
        publish(&pool, &[trunk("carrier", vec![])], &[number_to(sip_destination(callee.sip_addr().port()))]).await;
    let state = tempfile::tempdir().expect("state dir");
    let flags = ["--drain-seconds", "600", "--rtp-ports", "48000-48999"];
    let node = NodeProcess::start(&url_of(&pool), "second-signal", state.path(), &flags);
    node.wait_for_log(&format!("applied config generation {generation}")).await;
    let (sip, _) = node.listening().await;
    let caller = Ua::new().await;
    answered_call(sip, &caller, &callee, "second-signal").await;

    node.signal("TERM");
    node.wait_for_log("draining").await;
    node.signal("TERM");
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    let (bye, from) = caller.request("BYE").await;
    assert!(header(&bye, "Reason").is_some_and(|r| r.contains("node shutdown")), "{bye}");
    caller.send(&reply(&bye, "200 OK", caller.sip_addr(), None), from).await;
    let (status, log) = node.exited().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");
    let cdrs = cdrs(&pool).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0].reason.as_deref(), Some("node shutdown"), "{cdrs:?}");
}

/// A carrier that reuses a Call-ID (or two that pick the same one) gets a CDR for each call:
/// the node keys calls by an id of its own.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn two_calls_with_one_call_id_get_two_cdrs(pool: PgPool) {
    let callee = Ua::new().await;
    let node = common::Node::start(
        &pool,
        vec![trunk("carrier", vec![])],
        vec![number_to(sip_destination(callee.sip_addr().port()))],
    )
    .await;
    for _ in 0..2 {
        let caller = Ua::new().await;
        let tag = answered_call(node.addr, &caller, &callee, "reused-call-id").await;
        hang_up(node.addr, &caller, &callee, "reused-call-id", &tag).await;
    }
    let cdrs = wait_for_cdrs(&pool, 2).await;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert!(cdrs.iter().all(|c| c.call_id == "reused-call-id" && c.sip_code == Some(200)), "{cdrs:?}");
    assert_ne!(cdrs[0].call_uuid, cdrs[1].call_uuid);
    node.stop().await;
}

/// A private Postgres the test stops and starts.
async fn private_cluster() -> postgres::PrivateCluster {
    let cluster = tokio::time::timeout(Duration::from_secs(120), postgres::PrivateCluster::start())
        .await
        .expect("the private cluster starts within 120 s")
        .unwrap_or_else(|error| panic!("the private cluster starts: {error}"));
    let pool = switchboard_model::db::connect(cluster.url(), 2).await.expect("connect");
    switchboard_model::db::migrate(&pool).await.expect("migrate");
    pool.close().await;
    cluster
}

async fn resume(cluster: &mut postgres::PrivateCluster) -> PgPool {
    cluster.resume().await.unwrap_or_else(|error| panic!("Postgres starts again: {error}"));
    switchboard_model::db::connect(cluster.url(), 2).await.expect("connect after the restart")
}

/// Postgres stopped, 200 calls through the node, the node SIGKILLed with one more call up,
/// started again, Postgres started: 200 CDRs, and the call that was up when the node died has
/// one with reason `node lost`, ended at the last event the spool holds.
#[tokio::test]
async fn cdrs_survive_a_node_killed_during_a_database_outage() {
    let mut cluster = private_cluster().await;
    let pool = switchboard_model::db::connect(cluster.url(), 2).await.expect("connect");
    let held_callee = Ua::new().await;
    let sipp_callee = common::free_port("127.0.0.1");
    let numbers = [number_to(sip_destination(sipp_callee)), ringing_number(held_callee.sip_addr().port())];
    let generation = publish(&pool, &[trunk("carrier", vec![])], &numbers).await;
    pool.close().await;
    let state = tempfile::tempdir().expect("state dir");
    let flags = ["--rtp-ports", "46000-46999", "--database-start-timeout-seconds", "1"];
    let node = NodeProcess::start(cluster.url(), "spool-node", state.path(), &flags);
    node.wait_for_log(&format!("applied config generation {generation}")).await;
    let (sip, http) = node.listening().await;

    cluster.pause().await;
    // A call that is up when the node dies.
    let held_caller = Ua::new().await;
    let offer = sdp(held_caller.rtp_port(), "0", "sendrecv");
    held_caller.send(&invite_to(sip, held_caller.sip_addr(), RINGING_DID, "held-call", &offer), sip).await;
    let (invite, from) = held_callee.request("INVITE").await;
    let answer = sdp(held_callee.rtp_port(), "0", "sendrecv");
    held_callee.send(&reply(&invite, "200 OK", held_callee.sip_addr(), Some(&answer)), from).await;
    let ok = held_caller.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let answered_at = Utc::now();
    held_caller.send(&caller_in_dialog("ACK", sip, held_caller.sip_addr(), "held-call", &to_tag(&ok), 1), sip).await;

    // 200 calls while Postgres is down.
    let uas = common::uas(&["-sn", "uas"], sipp_callee, 200);
    let uac = common::uac(&["-sn", "uac"], sip, "127.0.0.1", 200, &["-r", "50"]);
    assert!(uac.wait().await.success(), "sipp's calls failed; node log:\n{}", node.dump());
    assert!(uas.wait().await.success(), "sipp's callee failed");
    node.wait_for_log("cannot write calls and CDRs to Postgres").await;
    // Twice the spool's sync interval: what is recorded is on disk.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = common::http_get(http, "/metrics").await;
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let (spooled, limit) = (gauge("switchboard_store_spool_bytes"), gauge("switchboard_store_spool_limit_bytes"));
    println!(
        "spool after 201 calls during the outage: {spooled} bytes ({:.0} bytes a call), limit {limit}",
        spooled / 201.0
    );
    assert!(spooled > 0.0 && limit == (1u64 << 30) as f64, "spool {spooled} of {limit}");
    let killed_at = Utc::now();
    let log = node.kill().await;

    // Started again, still without Postgres: it serves its saved configuration meanwhile.
    let node = NodeProcess::start(cluster.url(), "spool-node", state.path(), &flags);
    node.wait_for_log("replaying").await;
    node.wait_for_log("saved on disk").await;
    let pool = resume(&mut cluster).await;
    let rows = wait_for_cdrs(&pool, 201).await;
    let answered = rows.iter().filter(|c| c.sip_code == Some(200) && c.answer_at.is_some()).count();
    assert_eq!((rows.len(), answered), (201, 200), "{:?}\nfirst run:\n{log}\nsecond run:\n{}", rows.len(), node.dump());
    let lost: Vec<_> = rows.iter().filter(|c| c.reason.as_deref() == Some("node lost")).collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    let lost = lost[0];
    assert_eq!((lost.call_id.as_str(), lost.hangup_by.as_deref()), ("held-call", Some("system")));
    assert!(lost.answer_at.is_some_and(|at| at <= answered_at), "{lost:?}");
    // Ended at the spool's last event: after the last sipp call, before the kill.
    assert!(
        lost.end_at <= killed_at && lost.end_at > killed_at - chrono::TimeDelta::seconds(3),
        "{lost:?} {killed_at}"
    );
    // Replaying is idempotent: nothing more arrives, no call is left active.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cdrs(&pool).await.len(), 201);
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM active_calls").fetch_one(&pool).await.unwrap();
    assert_eq!(active, 0);
    node.signal("TERM");
    let (status, log) = node.exited().await;
    assert!(status.success(), "{log}");
    pool.close().await;
    cluster.stop().await;
}

/// Postgres stopped, the node restarted: it serves the configuration it saved (`/readyz`: ready,
/// stale, which generation) and a call goes through; once Postgres is back the snapshot is
/// confirmed and the call's CDR written.
#[tokio::test]
async fn a_node_starts_from_its_saved_configuration_without_postgres() {
    let mut cluster = private_cluster().await;
    let pool = switchboard_model::db::connect(cluster.url(), 2).await.expect("connect");
    let callee = Ua::new().await;
    let generation =
        publish(&pool, &[trunk("carrier", vec![])], &[number_to(sip_destination(callee.sip_addr().port()))]).await;
    pool.close().await;
    let state = tempfile::tempdir().expect("state dir");
    let flags = ["--rtp-ports", "47000-47999", "--database-start-timeout-seconds", "1"];
    let node = NodeProcess::start(cluster.url(), "disk-node", state.path(), &flags);
    node.wait_for_log(&format!("applied config generation {generation}")).await;
    let saved = state.path().join("disk-node").join("config-snapshot.json");
    let deadline = Instant::now() + LIMIT;
    while !saved.exists() {
        assert!(Instant::now() < deadline, "{} never written", saved.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.signal("TERM");
    let (status, log) = node.exited().await;
    assert!(status.success(), "{log}");

    cluster.pause().await;
    let node = NodeProcess::start(cluster.url(), "disk-node", state.path(), &flags);
    let (sip, http) = node.listening().await;
    let ready = common::http_get(http, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains(&format!("config generation {generation} (stale")), "{ready}");
    assert!(common::http_get(http, "/metrics").await.contains("switchboard_config_stale 1"));

    let caller = Ua::new().await;
    let tag = answered_call(sip, &caller, &callee, "from-disk").await;
    hang_up(sip, &caller, &callee, "from-disk", &tag).await;

    let pool = resume(&mut cluster).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let ready = common::http_get(http, "/readyz").await;
        if ready.contains(&format!("config generation {generation}")) && !ready.contains("stale") {
            assert!(common::http_get(http, "/metrics").await.contains("switchboard_config_stale 0"));
            break;
        }
        assert!(Instant::now() < deadline, "still stale after Postgres came back: {ready}\n{}", node.dump());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = wait_for_cdrs(&pool, 1).await;
    assert_eq!(rows.iter().map(|c| c.call_id.as_str()).collect::<Vec<_>>(), ["from-disk"]);
    node.signal("TERM");
    let (status, log) = node.exited().await;
    assert!(status.success(), "{log}");
    pool.close().await;
    cluster.stop().await;
}
