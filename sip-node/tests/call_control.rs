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

/// RFC 3262 on both legs: a caller that requires `100rel` is served (not refused with 420):
/// the callee's 180 reaches it with `Require: 100rel` and an RSeq of the node's, a PRACK with a
/// wrong RAck gets 481 and the right one 200; the callee's own reliable 180 is PRACKed by the
/// node (the callee's scenario checks `Supported: 100rel` and the RAck).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn reliable_provisional_responses_are_sent_and_pracked_on_both_legs(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sf", &scenario("uas_reliable_180.xml")], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_100rel.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(
        uac.wait().await.success(),
        "the 100rel caller did not get a reliable 180, 481 and 200 to its PRACKs, and the answer"
    );
    assert!(uas.wait().await.success(), "the callee's reliable 180 was not PRACKed");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0].sip_code, Some(200));
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("caller"));
    node.stop().await;
}

/// RFC 4028 section 9: a Session-Expires below the node's Min-SE (the RFC's floor, 90 s) gets
/// 422 with the node's Min-SE, so the caller can retry with a larger one.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn too_short_a_session_interval_gets_422_with_the_nodes_min_se(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uac = uac(&["-sf", &scenario("uac_expect_422.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "a 60 s Session-Expires must get 422 with Min-SE 90");
    node.stop().await;
}

/// RFC 4028 on both legs, for over five minutes (more than three 90 s session intervals): the
/// caller refreshes its own leg every 40 s with UPDATE, seven times (the node answers those
/// refreshes on the caller's leg with Session-Expires naming the caller as refresher, and does
/// not pass them on); the callee has no session timers, so the node refreshes the callee's leg
/// itself at half the 90 s interval, six times, with re-INVITEs carrying its current SDP. The
/// call ends with the caller's BYE at about 310 s.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_call_outlives_its_session_interval_with_the_node_refreshing_the_callee(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start_tuned(
        &pool,
        vec![trunk("carrier", vec![])],
        vec![number_to(sip_destination(callee))],
        vec![],
        |args| {
            args.session.session_expires = 90;
            // sipp sends no RTP: the media timeout must not end the call first.
            args.media_timeout_seconds = 600;
        },
    )
    .await;
    let limit = std::time::Duration::from_secs(360);
    let uas = long_uas(&scenario("uas_refreshed_by_node.xml"), callee, limit);
    let uac = long_uac(&scenario("uac_session_timer_refresh.xml"), node.addr, limit);
    assert!(
        uac.wait().await.success(),
        "the refreshing caller's call failed (a refresh unanswered, or the call ended early)"
    );
    assert!(uas.wait().await.success(), "the callee did not get exactly six refreshes from the node before the BYE");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!((cdrs[0].sip_code, cdrs[0].hangup_by.as_deref()), (Some(200), Some("caller")), "{cdrs:?}");
    node.stop().await;
}

/// A caller that asked to refresh and never does: the node ends the call before the interval
/// is over (90 - min(32, 30) = 60 s) with BYE on both legs, and the CDR says why.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_session_nobody_refreshes_is_ended_by_the_node_with_a_cdr_reason(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start_tuned(
        &pool,
        vec![trunk("carrier", vec![])],
        vec![number_to(sip_destination(callee))],
        vec![],
        |args| {
            // sipp sends no RTP: the media timeout must not end the call first.
            args.media_timeout_seconds = 600;
        },
    )
    .await;
    let limit = std::time::Duration::from_secs(90);
    let uas = long_uas(&scenario("uas_answer_until_bye.xml"), callee, limit);
    let uac = long_uac(&scenario("uac_session_timer_no_refresh.xml"), node.addr, limit);
    assert!(uac.wait().await.success(), "the caller got no BYE from the node when its session expired");
    assert!(uas.wait().await.success(), "the callee got no BYE from the node");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!((cdrs[0].sip_code, cdrs[0].hangup_by.as_deref()), (Some(408), Some("system")), "{cdrs:?}");
    let reason = cdrs[0].reason.as_deref().unwrap_or_default();
    assert!(reason.contains("session timer expired on the caller's leg"), "{reason}");
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

/// DTMF by SIP INFO from the caller: well-formed key presses (`application/dtmf-relay` and
/// `application/dtmf`) reach the callee as one `application/dtmf-relay` INFO each, answered
/// 200 end to end; garbage bodies are refused with 400 by the node and never reach the callee
/// (whose scenario fails on any INFO other than key 5 then key #).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn info_dtmf_is_checked_and_passed_to_the_callee(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sf", &scenario("uas_expects_info_dtmf.xml")], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_info_dtmf.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the caller's INFOs were not answered 200/400/400/200");
    assert!(uas.wait().await.success(), "the callee did not get key 5 then key # by INFO (and nothing else)");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!((cdrs[0].sip_code, cdrs[0].hangup_by.as_deref()), (Some(200), Some("caller")), "{cdrs:?}");
    node.stop().await;
}

/// RFC 3891: an INVITE with `Replaces` naming a dialog the node does not hold gets 481 (not a
/// new call to the callee).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_invite_replacing_an_unknown_dialog_gets_481(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uac = uac(&["-sf", &scenario("uac_replaces_unknown.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "an INVITE with Replaces of an unknown dialog must get 481");
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

/// DTMF by SIP INFO from the caller towards a callee that negotiated telephone-event: each
/// key press reaches the callee as RFC 4733 events in its RTP stream (payload type 101, the
/// key's event code, the end bit), not as INFO (the callee's scenario fails on any INFO);
/// garbage bodies are still refused with 400 and the call goes on to the caller's BYE.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn info_dtmf_reaches_a_telephone_event_callee_as_rfc4733(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_port = sink.local_addr().unwrap().port().to_string();
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let uas = uas(&["-sf", &scenario("uas_telephone_event.xml"), "-key", "rtp_sink", &sink_port], callee, 1);
    let uac = uac(&["-sf", &scenario("uac_info_dtmf.xml")], node.addr, "127.0.0.1", 1, &[]);
    // The callee's RTP: (payload type, event code, end bit) of every telephone-event packet.
    let mut events = vec![];
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) = tokio::time::timeout(std::time::Duration::from_secs(4), sink.recv_from(&mut buf)).await {
        let Ok(packet) = switchboard_node::media::rtp::RtpPacket::parse(&buf[..n]) else { continue };
        if packet.payload_type == 101 && packet.payload.len() >= 4 {
            events.push((packet.payload[0], packet.payload[1] & 0x80 != 0, packet.marker));
        }
    }
    assert!(uac.wait().await.success(), "the caller's INFOs were not answered 200/400/400/200");
    assert!(uas.wait().await.success(), "the callee got an INFO, or the call did not end with the caller's BYE");
    let keys: Vec<u8> = events.iter().filter(|(_, _, marker)| *marker).map(|(code, _, _)| *code).collect();
    assert_eq!(keys, [5, 11], "one event per key press (5, then #), each starting with the marker: {events:?}");
    for key in [5u8, 11] {
        let ends = events.iter().filter(|(code, end, _)| *code == key && *end).count();
        assert_eq!(ends, 3, "the end of key {key} is sent three times (RFC 4733 2.5.1.4): {events:?}");
    }
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!((cdrs[0].sip_code, cdrs[0].hangup_by.as_deref()), (Some(200), Some("caller")), "{cdrs:?}");
    node.stop().await;
}

/// The outbound rule of the REFER tests: numbers under +1555000 go out through trunk `pstn`.
fn refer_rule() -> switchboard_model::RuleConfig {
    switchboard_model::RuleConfig {
        namespace: "default".into(),
        name: "outbound".into(),
        direction: switchboard_model::Direction::Outbound,
        priority: 1,
        match_spec: switchboard_model::MatchSpec {
            destination_patterns: vec![r"^\+1555000".into()],
            ..Default::default()
        },
        destination: None,
        trunks: vec!["pstn".into()],
        trunk_selection: switchboard_model::TrunkSelection::Ordered,
        status_callback: None,
    }
}

/// A blind transfer by the callee (RFC 3515): its REFER to +15550003333, a number an outbound
/// RoutingRule sends through trunk `pstn`, gets 202; the node places the new leg itself
/// through that trunk (a sipp callee as its gateway), tells the referrer with NOTIFYs
/// (`SIP/2.0 100` while active, `SIP/2.0 200` terminated, `Event: refer`), ends the referrer's
/// leg with BYE, and the caller, still in its call, is now bridged to the target: its BYE
/// reaches the target. The CDRs show the callee's leg ending at the transfer and the target's
/// leg ending with the caller's BYE.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_blind_refer_from_the_callee_transfers_the_caller_to_the_target(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let target = free_port("127.0.0.1");
    let node = Node::start_routed(
        &pool,
        vec![trunk("carrier", vec![]), trunk("pstn", vec![("127.0.0.1".into(), target)])],
        vec![number_to(sip_destination(callee))],
        vec![refer_rule()],
        |args| args.media_timeout_seconds = 600,
    )
    .await;
    let target_uas = uas(&["-sn", "uas"], target, 1);
    let referrer = uas(&["-sf", &scenario("uas_refers_caller.xml")], callee, 1);
    let caller = uac(&["-sn", "uac", "-d", "3000"], node.addr, "127.0.0.1", 1, &[]);
    assert!(
        referrer.wait().await.success(),
        "the referrer did not get 202, NOTIFY 100, 180 and 200, and the node's BYE"
    );
    assert!(caller.wait().await.success(), "the caller's call did not survive the transfer until its BYE");
    assert!(target_uas.wait().await.success(), "the target was not called, or did not get the caller's BYE");
    let cdrs = cdrs(&pool, 2).await;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert_eq!(
        (cdrs[0].attempt, cdrs[0].sip_code, cdrs[0].reason.as_deref(), cdrs[0].hangup_by.as_deref()),
        (1, Some(200), Some("transferred by REFER"), Some("callee")),
        "{cdrs:?}"
    );
    assert_eq!(
        (cdrs[1].attempt, cdrs[1].trunk_name.as_deref(), cdrs[1].hangup_by.as_deref()),
        (2, Some("pstn"), Some("caller")),
        "{cdrs:?}"
    );
    assert!(cdrs[1].answer_at.is_some(), "{cdrs:?}");
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

/// RFC 4488: a REFER with `Refer-Sub: false` gets `Refer-Sub: false` in its 202 and no
/// NOTIFY (the sipp scenario fails on any), the transfer goes ahead as with a subscription: the
/// referrer's leg ends with BYE and the caller is bridged to the target.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_refer_without_a_subscription_transfers_without_notifies(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let target = free_port("127.0.0.1");
    let node = Node::start_routed(
        &pool,
        vec![trunk("carrier", vec![]), trunk("pstn", vec![("127.0.0.1".into(), target)])],
        vec![number_to(sip_destination(callee))],
        vec![refer_rule()],
        |args| args.media_timeout_seconds = 600,
    )
    .await;
    let target_uas = uas(&["-sn", "uas"], target, 1);
    let referrer = uas(&["-sf", &scenario("uas_refers_without_subscription.xml")], callee, 1);
    let caller = uac(&["-sn", "uac", "-d", "3000"], node.addr, "127.0.0.1", 1, &[]);
    assert!(referrer.wait().await.success(), "the referrer did not get 202 with Refer-Sub: false and then only BYE");
    assert!(caller.wait().await.success(), "the caller's call did not survive the transfer until its BYE");
    assert!(target_uas.wait().await.success(), "the target was not called, or did not get the caller's BYE");
    let cdrs = cdrs(&pool, 2).await;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert_eq!(
        (cdrs[0].reason.as_deref(), cdrs[1].trunk_name.as_deref()),
        (Some("transferred by REFER"), Some("pstn"))
    );
    node.stop().await;
}

/// No open relay: a REFER to a number no outbound RoutingRule allows gets 403, nothing is
/// dialled, and the call goes on until the caller hangs up.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_refer_to_a_target_no_rule_allows_gets_403(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let target = free_port("127.0.0.1");
    let node = Node::start_routed(
        &pool,
        vec![trunk("carrier", vec![]), trunk("pstn", vec![("127.0.0.1".into(), target)])],
        vec![number_to(sip_destination(callee))],
        vec![refer_rule()],
        |args| args.media_timeout_seconds = 600,
    )
    .await;
    let referrer = uas(&["-sf", &scenario("uas_refer_forbidden.xml")], callee, 1);
    let caller = uac(&["-sn", "uac", "-d", "2000"], node.addr, "127.0.0.1", 1, &[]);
    assert!(referrer.wait().await.success(), "the REFER to +19009999999 did not get 403, or the call did not go on");
    assert!(caller.wait().await.success(), "the caller's call did not go on to its BYE");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "nothing else was dialled: {cdrs:?}");
    assert_eq!((cdrs[0].sip_code, cdrs[0].hangup_by.as_deref()), (Some(200), Some("caller")), "{cdrs:?}");
    node.stop().await;
}

/// RFC 3891 for a dialog the node holds (attended transfer's last step): a call from A to B is
/// up; C's INVITE with `Replaces` naming the node's dialog with A is answered 200 from the same
/// RTP port A had, A's dialog gets BYE, B's leg is untouched and now bridged to C (C's RTP
/// reaches B), and C's BYE ends the call with B. One call, one CDR.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_invite_with_replaces_takes_over_the_held_dialog(pool: PgPool) {
    use common::ua::*;
    let (a, b, c) = (Ua::new().await, Ua::new().await, Ua::new().await);
    let node =
        Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(b.sip_addr().port()))]).await;
    // A calls B through the node.
    a.send(&invite_to_did(node.addr, a.sip_addr(), "held-call", &sdp(a.rtp_port(), "0", "sendrecv")), node.addr).await;
    let (invite, from) = b.request("INVITE").await;
    b.send(&reply(&invite, "200 OK", b.sip_addr(), Some(&sdp(b.rtp_port(), "0", "sendrecv"))), from).await;
    let a_ok = a.final_response().await;
    assert!(a_ok.starts_with("SIP/2.0 200"), "{a_ok}");
    let node_tag = to_tag(&a_ok);
    a.send(&caller_in_dialog("ACK", node.addr, a.sip_addr(), "held-call", &node_tag, 1), node.addr).await;
    b.request("ACK").await;

    // C replaces A's dialog (the Replaces tags from the node's view: to-tag is the node's).
    let replacing = invite_to_did(node.addr, c.sip_addr(), "replacing-call", &sdp(c.rtp_port(), "0", "sendrecv"))
        .replacen(
            "Max-Forwards: 70\r\n",
            &format!("Max-Forwards: 70\r\nReplaces: held-call;to-tag={node_tag};from-tag=caller\r\n"),
            1,
        );
    c.send(&replacing, node.addr).await;
    let c_ok = c.final_response().await;
    assert!(c_ok.starts_with("SIP/2.0 200"), "the INVITE with Replaces must be answered 200: {c_ok}");
    assert_eq!(sdp_rtp(&c_ok), sdp_rtp(&a_ok), "C gets the RTP port the replaced dialog had");
    let c_tag = to_tag(&c_ok);
    c.send(&caller_in_dialog("ACK", node.addr, c.sip_addr(), "replacing-call", &c_tag, 1), node.addr).await;
    let (bye, from) = a.request("BYE").await;
    assert!(bye.contains("Call-ID: held-call"), "{bye}");
    a.send(&reply(&bye, "200 OK", a.sip_addr(), None), from).await;

    // C and B talk: C's audio reaches B through the same relay.
    let node_rtp = sdp_rtp(&c_ok);
    for seq in 0..10u16 {
        c.rtp_send(node_rtp, 0, seq, &[0x5c; 160]).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let heard = b.rtp_collect(std::time::Duration::from_millis(500)).await;
    assert!(heard.iter().filter(|(pt, payload)| *pt == 0 && payload == &vec![0x5c; 160]).count() >= 5, "{heard:?}");

    // C hangs up: B gets the BYE, and the call ends.
    c.send(&caller_in_dialog("BYE", node.addr, c.sip_addr(), "replacing-call", &c_tag, 2), node.addr).await;
    let (bye, from) = b.request("BYE").await;
    b.send(&reply(&bye, "200 OK", b.sip_addr(), None), from).await;
    let c_bye = c.final_response().await;
    assert!(c_bye.starts_with("SIP/2.0 200"), "{c_bye}");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!((cdrs[0].sip_code, cdrs[0].hangup_by.as_deref()), (Some(200), Some("caller")), "{cdrs:?}");
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

/// A REFER from the caller's side (the caller transfers the callee, RFC 3515), with raw UAs
/// to see the media: A calls B, A's REFER to +15550003333 gets 202 and NOTIFY 100; the node
/// calls the target T through trunk `pstn`, NOTIFYs 200 and sends A a BYE; then B and T hear
/// each other through the node's relay (each one's RTP reaches the other), and T's BYE ends
/// the call with B.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_refer_from_the_caller_bridges_the_callee_to_the_target_with_media(pool: PgPool) {
    caller_refers_the_callee(pool, false).await;
}

/// Like the test above with the usual phone behaviour: the caller puts the callee on hold
/// (re-INVITE `sendonly`, which the node mirrors to B) before its REFER; once the target
/// answered, the node takes B off hold with a re-INVITE offering `sendrecv`, so that B and
/// the target hear each other both ways.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_callee_held_by_the_referrer_is_taken_off_hold_after_the_transfer(pool: PgPool) {
    caller_refers_the_callee(pool, true).await;
}

async fn caller_refers_the_callee(pool: PgPool, hold_first: bool) {
    use common::ua::*;
    let (a, b, t) = (Ua::new().await, Ua::new().await, Ua::new().await);
    let node = Node::start_routed(
        &pool,
        vec![trunk("carrier", vec![]), trunk("pstn", vec![("127.0.0.1".into(), t.sip_addr().port())])],
        vec![number_to(sip_destination(b.sip_addr().port()))],
        vec![refer_rule()],
        |_| {},
    )
    .await;
    a.send(&invite_to_did(node.addr, a.sip_addr(), "refer-call", &sdp(a.rtp_port(), "0", "sendrecv")), node.addr).await;
    let (b_invite, from) = b.request("INVITE").await;
    b.send(&reply(&b_invite, "200 OK", b.sip_addr(), Some(&sdp(b.rtp_port(), "0", "sendrecv"))), from).await;
    let a_ok = a.final_response().await;
    let node_tag = to_tag(&a_ok);
    a.send(&caller_in_dialog("ACK", node.addr, a.sip_addr(), "refer-call", &node_tag, 1), node.addr).await;
    b.request("ACK").await;
    let mut cseq = 2;
    if hold_first {
        let hold = sdp(a.rtp_port(), "0", "sendonly");
        let reinvite = caller_in_dialog("INVITE", node.addr, a.sip_addr(), "refer-call", &node_tag, cseq).replacen(
            "Content-Length: 0\r\n\r\n",
            &format!(
                "Contact: <sip:caller@{}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{hold}",
                a.sip_addr(),
                hold.len()
            ),
            1,
        );
        a.send(&reinvite, node.addr).await;
        let (held, from) = b.request("INVITE").await;
        assert!(body(&held).contains("a=sendonly"), "the node mirrors the hold: {held}");
        b.send(&reply(&held, "200 OK", b.sip_addr(), Some(&sdp(b.rtp_port(), "0", "recvonly"))), from).await;
        b.request("ACK").await;
        assert!(a.final_response().await.starts_with("SIP/2.0 200"));
        a.send(&caller_in_dialog("ACK", node.addr, a.sip_addr(), "refer-call", &node_tag, cseq), node.addr).await;
        cseq += 1;
    }

    let refer = caller_in_dialog("REFER", node.addr, a.sip_addr(), "refer-call", &node_tag, cseq).replacen(
        "Max-Forwards: 70\r\n",
        &format!(
            "Max-Forwards: 70\r\nContact: <sip:caller@{}>\r\nRefer-To: <sip:+15550003333@example.invalid>\r\n",
            a.sip_addr()
        ),
        1,
    );
    a.send(&refer, node.addr).await;
    let (accepted, _) = a.recv().await;
    assert!(accepted.starts_with("SIP/2.0 202"), "{accepted}");
    let (trying, from) = a.request("NOTIFY").await;
    assert!(body(&trying).starts_with("SIP/2.0 100"), "{trying}");
    assert!(header(&trying, "Event").is_some_and(|e| e.starts_with("refer")), "{trying}");
    a.send(&reply(&trying, "200 OK", a.sip_addr(), None), from).await;

    // The node calls the target through the rule's trunk, from the caller's RTP port.
    let (t_invite, from) = t.request("INVITE").await;
    assert!(t_invite.starts_with("INVITE sip:+15550003333@127.0.0.1"), "{t_invite}");
    assert_eq!(sdp_rtp(&t_invite), sdp_rtp(&a_ok), "the new leg takes the caller's RTP port");
    t.send(&reply(&t_invite, "200 OK", t.sip_addr(), Some(&sdp(t.rtp_port(), "0", "sendrecv"))), from).await;
    t.request("ACK").await;
    let (done, from) = a.request("NOTIFY").await;
    assert!(body(&done).starts_with("SIP/2.0 200"), "{done}");
    assert!(header(&done, "Subscription-State").is_some_and(|s| s.starts_with("terminated")), "{done}");
    a.send(&reply(&done, "200 OK", a.sip_addr(), None), from).await;
    let (bye, from) = a.request("BYE").await;
    a.send(&reply(&bye, "200 OK", a.sip_addr(), None), from).await;
    if hold_first {
        let (resume, from) = b.request("INVITE").await;
        assert!(body(&resume).contains("a=sendrecv"), "the node takes B off hold: {resume}");
        b.send(&reply(&resume, "200 OK", b.sip_addr(), Some(&sdp(b.rtp_port(), "0", "sendrecv"))), from).await;
        b.request("ACK").await;
    }

    // B and T hear each other.
    let (to_b_side, to_t_side) = (sdp_rtp(&b_invite), sdp_rtp(&t_invite));
    for seq in 0..10u16 {
        t.rtp_send(to_t_side, 0, seq, &[0x11; 160]).await;
        b.rtp_send(to_b_side, 0, seq, &[0x22; 160]).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let window = std::time::Duration::from_millis(300);
    let (b_heard, t_heard) = tokio::join!(b.rtp_collect(window), t.rtp_collect(window));
    assert!(b_heard.iter().filter(|(_, p)| p == &vec![0x11; 160]).count() >= 5, "B hears T: {b_heard:?}");
    assert!(t_heard.iter().filter(|(_, p)| p == &vec![0x22; 160]).count() >= 5, "T hears B: {t_heard:?}");

    // T hangs up: B gets the BYE.
    let t_to = header(&t_invite, "To").unwrap();
    let t_from = header(&t_invite, "From").unwrap();
    let t_contact = header(&t_invite, "Contact").unwrap();
    let t_bye = format!(
        "BYE {} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bK-t-bye\r\nFrom: {t_to};tag=callee\r\nTo: {t_from}\r\n\
         Call-ID: {}\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        t_contact.trim_start_matches('<').split('>').next().unwrap(),
        t.sip_addr(),
        header(&t_invite, "Call-ID").unwrap()
    );
    t.send(&t_bye, node.addr).await;
    let (bye, from) = b.request("BYE").await;
    b.send(&reply(&bye, "200 OK", b.sip_addr(), None), from).await;
    assert!(t.final_response().await.starts_with("SIP/2.0 200"));
    let cdrs = cdrs(&pool, 2).await;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert_eq!((cdrs[1].attempt, cdrs[1].trunk_name.as_deref()), (2, Some("pstn")), "{cdrs:?}");
    assert_eq!(active_calls(&pool).await, 0);
    node.stop().await;
}

/// The blind REFER with Kamailio in the path: the callee sits behind a record-routing proxy,
/// so its REFER reaches the node through Kamailio and the node's NOTIFYs and BYE must follow
/// the dialog's route set back through it (the proxy's log shows each one routed).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_refer_through_kamailio_gets_its_notifies_along_the_route_set(pool: PgPool) {
    let (kport, callee, target) = (free_port("127.0.0.1"), free_port("127.0.0.1"), free_port("127.0.0.1"));
    let kamailio = common::kamailio::Kamailio::start("proxy.cfg", kport, &[("@UAS@", format!("127.0.0.1:{callee}"))]);
    let node = Node::start_routed(
        &pool,
        vec![trunk("carrier", vec![]), trunk("pstn", vec![("127.0.0.1".into(), target)])],
        vec![number_to(sip_destination(kport))],
        vec![refer_rule()],
        |args| args.media_timeout_seconds = 600,
    )
    .await;
    let target_uas = uas(&["-sn", "uas"], target, 1);
    let referrer = uas(&["-sf", &scenario("uas_refers_caller.xml")], callee, 1);
    let caller = uac(&["-sn", "uac", "-d", "3000"], node.addr, "127.0.0.1", 1, &[]);
    assert!(referrer.wait().await.success(), "the referrer behind Kamailio did not get 202, both NOTIFYs and the BYE");
    assert!(caller.wait().await.success(), "the caller's call did not survive the transfer");
    assert!(target_uas.wait().await.success(), "the target was not called or did not get the caller's BYE");
    let log = kamailio.log();
    for method in ["REFER", "NOTIFY", "BYE"] {
        assert!(log.contains(&format!("in-dialog {method} routed")), "no {method} through Kamailio:\n{log}");
    }
    node.stop().await;
}

/// An attended transfer between two calls of the node (RFC 3891 inside RFC 3515): A called B
/// (call 1), B called C (call 2), then B REFERs call 1 to C with a `Replaces` naming its call-2
/// dialog. The node sends itself the INVITE with `Replaces` (a hairpin), call 2 takes it in
/// B's place, B gets 202, NOTIFY 100/200 and a BYE on each of its dialogs, and A and C hear
/// each other; A's BYE reaches C.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_attended_refer_with_replaces_joins_the_two_calls_on_the_node(pool: PgPool) {
    use common::ua::*;
    const DID2: &str = "+15550002222";
    let (a, b, c) = (Ua::new().await, Ua::new().await, Ua::new().await);
    let second = switchboard_model::NumberConfig {
        name: "did2".into(),
        number: DID2.into(),
        ..number_to(sip_destination(c.sip_addr().port()))
    };
    let node = Node::start(
        &pool,
        vec![trunk("carrier", vec![])],
        vec![number_to(sip_destination(b.sip_addr().port())), second],
    )
    .await;
    // Call 1: A to B.
    a.send(&invite_to_did(node.addr, a.sip_addr(), "att-1", &sdp(a.rtp_port(), "0", "sendrecv")), node.addr).await;
    let (call1, from) = b.request("INVITE").await;
    b.send(&reply(&call1, "200 OK", b.sip_addr(), Some(&sdp(b.rtp_port(), "0", "sendrecv"))), from).await;
    let a_ok = a.final_response().await;
    let a_tag = to_tag(&a_ok);
    a.send(&caller_in_dialog("ACK", node.addr, a.sip_addr(), "att-1", &a_tag, 1), node.addr).await;
    b.request("ACK").await;
    // Call 2: B to C.
    let to_did2 = |text: String| text.replace(DID, DID2);
    b.send(&to_did2(invite_to_did(node.addr, b.sip_addr(), "att-2", &sdp(b.rtp_port(), "0", "sendrecv"))), node.addr)
        .await;
    let (call2, from) = c.request("INVITE").await;
    c.send(&reply(&call2, "200 OK", c.sip_addr(), Some(&sdp(c.rtp_port(), "0", "sendrecv"))), from).await;
    let b_ok = b.final_response().await;
    let b_tag = to_tag(&b_ok);
    b.send(&to_did2(caller_in_dialog("ACK", node.addr, b.sip_addr(), "att-2", &b_tag, 1)), node.addr).await;
    c.request("ACK").await;

    // B transfers A to C: REFER in call 1 (B is its callee) with Replaces of call 2.
    let contact = header(&call1, "Contact").unwrap().trim_start_matches('<').split('>').next().unwrap().to_string();
    let refer = format!(
        "REFER {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bK-b-refer\r\nFrom: {};tag=callee\r\nTo: {}\r\n\
         Call-ID: {}\r\nCSeq: 1 REFER\r\nContact: <sip:callee@{}>\r\nMax-Forwards: 70\r\n\
         Refer-To: <sip:{DID2}@{}?Replaces=att-2%3Bto-tag%3D{b_tag}%3Bfrom-tag%3Dcaller>\r\nContent-Length: 0\r\n\r\n",
        b.sip_addr(),
        header(&call1, "To").unwrap(),
        header(&call1, "From").unwrap(),
        header(&call1, "Call-ID").unwrap(),
        b.sip_addr(),
        node.addr,
    );
    b.send(&refer, node.addr).await;
    let (mut accepted, mut notified, mut byes) = (false, vec![], vec![]);
    while !(accepted && notified.len() == 2 && byes.len() == 2) {
        let (text, from) = b.recv().await;
        if text.starts_with("SIP/2.0 202") {
            accepted = true;
        } else if text.starts_with("NOTIFY ") {
            notified.push(body(&text).lines().next().unwrap_or_default().to_string());
            b.send(&reply(&text, "200 OK", b.sip_addr(), None), from).await;
        } else if text.starts_with("BYE ") {
            byes.push(header(&text, "Call-ID").unwrap_or_default().to_string());
            b.send(&reply(&text, "200 OK", b.sip_addr(), None), from).await;
        } else if !text.starts_with("SIP/2.0 ") {
            panic!("B got an unexpected request: {text}");
        }
    }
    assert_eq!(notified, ["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]);
    byes.sort();
    let mut expected = vec!["att-2".to_string(), header(&call1, "Call-ID").unwrap().to_string()];
    expected.sort();
    assert_eq!(byes, expected, "B's two dialogs end");

    // A and C hear each other.
    let (to_a_side, to_c_side) = (sdp_rtp(&a_ok), sdp_rtp(&call2));
    for seq in 0..10u16 {
        a.rtp_send(to_a_side, 0, seq, &[0x33; 160]).await;
        c.rtp_send(to_c_side, 0, seq, &[0x44; 160]).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let window = std::time::Duration::from_millis(300);
    let (a_heard, c_heard) = tokio::join!(a.rtp_collect(window), c.rtp_collect(window));
    assert!(c_heard.iter().filter(|(_, p)| p == &vec![0x33; 160]).count() >= 5, "C hears A: {c_heard:?}");
    assert!(a_heard.iter().filter(|(_, p)| p == &vec![0x44; 160]).count() >= 5, "A hears C: {a_heard:?}");

    // A hangs up: C gets the BYE; both calls end.
    a.send(&caller_in_dialog("BYE", node.addr, a.sip_addr(), "att-1", &a_tag, 2), node.addr).await;
    let (bye, from) = c.request("BYE").await;
    c.send(&reply(&bye, "200 OK", c.sip_addr(), None), from).await;
    assert!(a.final_response().await.starts_with("SIP/2.0 200"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while active_calls(&pool).await > 0 {
        assert!(std::time::Instant::now() < deadline, "calls left active");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    node.stop().await;
}
