//! Call control between real SIP peers (issue 24): delayed offer, session timers, reliable
//! provisional responses, INFO DTMF and transfers, with `sipp` as the carrier's caller and as
//! the callee on loopback and the node in-process on a fresh database.
//!
//! Every sipp run is bounded (`-timeout`) and every wait has a deadline.

mod common;

use common::*;
use sqlx::PgPool;

/// An INVITE without SDP (Genesys and some carriers send them): the node's 200 carries its
/// offer, the caller's ACK the answer, and the call is anchored and billed like any other.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_invite_without_sdp_gets_the_nodes_offer_and_answers_in_the_ack(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sn", "uas"], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_delayed_offer.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the delayed-offer caller did not get an offer in the 200 or its BYE failed");
    assert!(uas.wait().await.success(), "the callee's call failed");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0].sip_code, Some(200));
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("caller"));
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}
