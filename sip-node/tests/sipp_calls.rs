//! Calls through the node's B2BUA between real SIP peers: `sipp` (Debian's sip-tester) as the
//! carrier's caller and as the callee, on loopback. The node runs in-process on a fresh
//! database; its configuration snapshot is built from plain values.
//!
//! Every sipp run is bounded (`-timeout`) and every wait here has a deadline, so a broken
//! node fails these tests instead of hanging them.

mod common;

use common::*;
use rust_decimal::Decimal;
use sqlx::PgPool;
use switchboard_model::{Destination, DestinationType};

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_call_reaches_the_callee_and_the_caller_hangs_up(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sn", "uas"], callee, 1);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "caller's call failed");
    assert!(uas.wait().await.success(), "callee's call failed");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0].sip_code, Some(200));
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("caller"));
    assert!(cdrs[0].answer_at.is_some());
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_callee_hangs_up(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sf", &scenario("uas_hangs_up.xml")], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_callee_hangs_up.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uas.wait().await.success(), "callee's call failed");
    assert!(uac.wait().await.success(), "caller's call failed");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("callee"), "{cdrs:?}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn cancel_before_answer_reaches_the_callee(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sf", &scenario("uas_cancel.xml")], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_cancel.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "caller did not get 200/487 for its CANCEL");
    assert!(uas.wait().await.success(), "callee did not see the CANCEL");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs[0].sip_code, Some(487), "{cdrs:?}");
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("caller"));
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_busy_callee_is_busy_for_the_caller(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sf", &scenario("uas_busy.xml")], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_expect_486.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "caller did not get 486");
    assert!(uas.wait().await.success());
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs[0].sip_code, Some(486), "{cdrs:?}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn strangers_get_403_and_unknown_numbers_404(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let mut other = number_to(sip_destination(callee));
    other.number = "+15550002222".into();
    // By default a stranger gets no answer at all (tests/flood_guard.rs); with
    // `--unknown-sources reject` it gets one 403.
    let node = Node::start_tuned(&pool, vec![trunk("carrier", vec![])], vec![other], vec![], |args| {
        args.guard.unknown_sources = switchboard_node::sip::guard::UnknownSources::Reject;
    })
    .await;
    let stranger = uac(&["-sf", &scenario("uac_expect_403.xml")], node.addr, "127.0.0.2", 1, &[]);
    assert!(stranger.wait().await.success(), "a source outside the trunk's CIDRs must get 403");
    let unknown = uac(&["-sf", &scenario("uac_expect_404.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(unknown.wait().await.success(), "a number nobody owns must get 404");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_trunk_at_its_concurrent_limit_answers_503(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let mut carrier = trunk("carrier", vec![]);
    carrier.max_concurrent_calls = Some(0);
    let node = Node::start(&pool, vec![carrier], vec![number_to(sip_destination(callee))]).await;
    let uac = uac(&["-sf", &scenario("uac_expect_503.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "a trunk at its limit must answer 503");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn outbound_fails_over_from_a_503_gateway_to_the_next(pool: PgPool) {
    let broken = free_port("127.0.0.1");
    let callee = free_port("127.0.0.1");
    let inbound = trunk("carrier", vec![]);
    let outbound = trunk("outbound", vec![("127.0.0.1".into(), broken), ("127.0.0.1".into(), callee)]);
    let destination = Destination {
        kind: DestinationType::Number,
        url: None,
        uri: None,
        number: Some("+15559990000".into()),
        trunk_ref: Some("outbound".into()),
        reject_code: None,
    };
    let node = Node::start(&pool, vec![inbound, outbound], vec![number_to(destination)]).await;
    let failing = uas(&["-sf", &scenario("uas_503.xml")], broken, 1);
    let uas = uas(&["-sn", "uas"], callee, 1);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the call must survive the first gateway's 503");
    assert!(failing.wait().await.success());
    assert!(uas.wait().await.success());
    let cdrs = cdrs(&pool, 2).await;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert_eq!((cdrs[0].attempt, cdrs[0].sip_code), (1, Some(503)), "{cdrs:?}");
    assert_eq!((cdrs[1].attempt, cdrs[1].sip_code), (2, Some(200)), "{cdrs:?}");
    assert_eq!(cdrs[1].trunk_name.as_deref(), Some("outbound"));
    assert_eq!(cdrs[1].gateway.as_deref(), Some(format!("127.0.0.1:{callee}").as_str()));
    assert!(cdrs[1].cost >= Decimal::ZERO);
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn calls_complete_under_udp_loss(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    // sipp drops 5 % of what it would send, on both sides; retransmissions must recover. The
    // callee's scenario answers a retransmitted INVITE (its 180 and 200 both lost) with the 200
    // again; sipp's built-in uas would abort that call as an unexpected message.
    let uas = uas(&["-sf", &scenario("uas_lossy.xml"), "-lost", "5"], callee, 10);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 10, &["-lost", "5", "-r", "5", "-d", "200"]);
    let uac_status = uac.wait().await;
    let _ = uas.wait().await;
    assert!(uac_status.success(), "calls failed under 5 % loss");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_hold_re_invite_passes_across_with_its_sdp(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sf", &scenario("uas_reinvite.xml")], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_reinvite.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "caller: re-INVITE not answered with the callee's recvonly SDP");
    assert!(uas.wait().await.success(), "callee: re-INVITE with sendonly SDP did not arrive");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("caller"), "{cdrs:?}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_outbound_trunk_at_its_limit_moves_the_call_to_its_backup(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let mut full = trunk("outbound", vec![("127.0.0.1".into(), free_port("127.0.0.1"))]);
    full.max_concurrent_calls = Some(0);
    full.backup_trunks = vec!["backup".into()];
    let backup = trunk("backup", vec![("127.0.0.1".into(), callee)]);
    let destination = Destination {
        kind: DestinationType::Number,
        url: None,
        uri: None,
        number: Some("+15559990000".into()),
        trunk_ref: Some("outbound".into()),
        reject_code: None,
    };
    let node = Node::start(&pool, vec![trunk("carrier", vec![]), full, backup], vec![number_to(destination)]).await;
    let uas = uas(&["-sn", "uas"], callee, 1);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the call must move to the backup trunk");
    assert!(uas.wait().await.success());
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.trunk_name.clone()).as_deref(), Some("backup"), "{cdrs:?}");
    node.stop().await;
}
