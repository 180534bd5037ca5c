//! Transfers of calls placed through the REST API (`POST /api/calls/initiate` with an agent):
//! the answered callee talks to the WebSocket test agent, then `POST
//! /api/calls/{id}/transfer` hands the callee to a human, the way an inbound caller is handed
//! over (`agent_calls.rs`). The callee is sipp (echoing RTP, or answering a REFER) or a raw
//! SIP/RTP peer; the human is a raw SIP/RTP peer; the real REST API runs on the test database.
//! The audio is checked on each leg at each stage, and the CDRs and webhooks at the end.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::agent::*;
use common::ua::{self, Ua};
use common::*;
use serde_json::{Value, json};
use sqlx::PgPool;
use switchboard_model::{Codec, Destination, DestinationType, Direction, MatchSpec, RuleConfig, TrunkSelection};

/// The number the API calls (routed through the `carrier` trunk, the DID's own).
const CALLEE: &str = "+15559990000";
/// The human the agent hands the callee to (routed through the `humans` trunk).
const HUMAN: &str = "+15552223333";

/// The node: the DID's trunk `carrier` reaches the callee at `callee`, an outbound rule sends
/// `+1555222…` through the trunk `humans`, whose gateway is the human.
async fn node(pool: &PgPool, callee: u16, human: SocketAddr, refer: bool) -> Node {
    let mut carrier = trunk("carrier", vec![("127.0.0.1".into(), callee)]);
    carrier.codecs = vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent];
    if refer {
        carrier.transfer = switchboard_model::TransferMode::Refer;
    }
    let mut humans = trunk("humans", vec![("127.0.0.1".into(), human.port())]);
    humans.codecs = vec![Codec::Pcmu, Codec::TelephoneEvent];
    let rule = RuleConfig {
        namespace: "default".into(),
        name: "to-humans".into(),
        direction: Direction::Outbound,
        priority: 1,
        match_spec: MatchSpec { destination_patterns: vec![r"^\+1555222".into()], ..Default::default() },
        destination: None,
        trunks: vec!["humans".into()],
        trunk_selection: TrunkSelection::Ordered,
        status_callback: None,
    };
    let did = number_to(Destination {
        kind: DestinationType::Reject,
        url: None,
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: Some(603),
    });
    Node::start_routed(pool, vec![carrier, humans], vec![did], vec![rule], |_| {}).await
}

/// `POST /api/calls/initiate` from the DID to [`CALLEE`] with the agent; returns the request id.
async fn initiate(api: &RestApi, agent: &Agent, webhook_url: &str) -> String {
    let body = json!({"from_number": DID, "to_number": CALLEE, "agent_websocket_url": agent.url,
                      "webhook_url": webhook_url});
    let (status, queued) = api.post("/api/calls/initiate", Some(body)).await;
    assert!((200..300).contains(&status), "{status} {queued}");
    queued["call_id"].as_str().expect("the request's id").to_string()
}

/// Waits for the agent's `start`; returns its `callSid`.
async fn started(agent: &mut Agent) -> String {
    let (_, start) = agent.expect("start").await;
    assert_eq!(start["start"]["customParameters"]["to"], CALLEE, "{start}");
    start["start"]["callSid"].as_str().expect("callSid").to_string()
}

/// A test frame's id: every byte of it (a frame whose bytes differ is reported as 0).
fn frame_id(payload: &[u8]) -> u8 {
    match payload.first() {
        Some(first) if payload.len() == 160 && payload.iter().all(|b| b == first) => *first,
        _ => 0,
    }
}

/// The human answers the transfer's INVITE (180, then 200 with its SDP) and takes the ACK;
/// returns the INVITE and the node's RTP address for the human's leg.
async fn human_answers(human: &Ua) -> (String, SocketAddr) {
    let (invite, from) = human.request("INVITE").await;
    human.send(&ua::reply(&invite, "180 Ringing", human.sip_addr(), None), from).await;
    let answer = ua::sdp(human.rtp_port(), "0 101", "sendrecv");
    human.send(&ua::reply(&invite, "200 OK", human.sip_addr(), Some(&answer)), from).await;
    human.request("ACK").await;
    let node_rtp = ua::sdp_rtp(&invite);
    (invite, node_rtp)
}

/// Places the API call to a raw callee, which answers it; returns its INVITE, the node's RTP
/// address on its leg and the agent's `callSid`.
async fn raw_callee_answers(
    api: &RestApi,
    agent: &mut Agent,
    callee: &Ua,
    webhook_url: &str,
) -> (String, SocketAddr, String) {
    initiate(api, agent, webhook_url).await;
    let (invite, from) = callee.request("INVITE").await;
    let answer = ua::sdp(callee.rtp_port(), "0 101", "sendrecv");
    callee.send(&ua::reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    callee.request("ACK").await;
    let call_sid = started(agent).await;
    let node_rtp = ua::sdp_rtp(&invite);
    (invite, node_rtp, call_sid)
}

/// A request from the answering side of `invite` (the peer replied with [`ua::reply`]'s tag),
/// with `sdp` as its body if any.
async fn request_as_callee(peer: &Ua, invite: &str, node: SocketAddr, method: &str, cseq: u32, sdp: Option<&str>) {
    let (from, to) = (ua::header(invite, "From").unwrap(), ua::header(invite, "To").unwrap());
    let call_id = ua::header(invite, "Call-ID").unwrap();
    let sip = peer.sip_addr();
    let body = match sdp {
        Some(sdp) => format!("Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len()),
        None => "Content-Length: 0\r\n\r\n".to_string(),
    };
    let request = format!(
        "{method} sip:switchboard@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {sip};branch=z9hG4bK-{}-{method}{cseq}\r\n\
         From: {to};tag=callee\r\nTo: {from}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\
         Contact: <sip:callee@{sip}>\r\nMax-Forwards: 70\r\n{body}",
        sip.port()
    );
    peer.send(&request, node).await;
}

/// A BYE from the answering side of `invite`, answered 200.
async fn hang_up_as_callee(peer: &Ua, invite: &str, node: SocketAddr) {
    request_as_callee(peer, invite, node, "BYE", 90, None).await;
    let ok = peer.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
}

/// The transfer webhooks received (the call's own status webhooks left out), once `expected`
/// of them arrived (bounded wait).
async fn transfer_hooks(hooks: &Hooks, expected: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen: Vec<Value> = hooks.lock().unwrap().iter().filter(|h| h["transfer_id"].is_string()).cloned().collect();
        if seen.len() >= expected || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status_of(hooks: &[Value]) -> Vec<&str> {
    hooks.iter().filter_map(|h| h["status"].as_str()).collect()
}

/// The call's CDRs, by attempt: (attempt, to_number, answered, hangup_by, reason).
type Leg = (i32, String, bool, Option<String>, Option<String>);

/// Waits until the call has `expected` CDRs and no active row; returns the CDRs.
async fn call_cdrs(pool: &PgPool, call_sid: &str, expected: usize) -> Vec<Leg> {
    let deadline = Instant::now() + WAIT;
    loop {
        let legs: Vec<Leg> = sqlx::query_as(
            "SELECT attempt, to_number, answer_at IS NOT NULL, hangup_by, reason FROM cdrs WHERE call_id = $1
              ORDER BY attempt",
        )
        .bind(call_sid)
        .fetch_all(pool)
        .await
        .unwrap();
        if legs.len() >= expected && active_calls(pool).await == 0 {
            return legs;
        }
        assert!(Instant::now() < deadline, "CDRs of {call_sid}: {legs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Blind: sipp answers the API call and echoes RTP. The agent hears its own voice back (the
/// callee's leg is up both ways); the transfer, asked for with the id `/api/calls/initiate`
/// returned, dials the human through the rule's trunk with the callee's number; when the
/// human answers, the agent gets `stop` and the human hears its own voice back through the
/// callee's echo (the callee ↔ human bridge works both ways). The human hangs up: sipp gets
/// the BYE and the call's CDRs say who did what.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_is_handed_blind_to_a_human(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = Ua::new().await;
    let (callee_port, media_port) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let node = node(&pool, callee_port, human.sip_addr(), false).await;
    let args: Vec<String> = [
        "-sf",
        &scenario("uas_answer_until_bye.xml"),
        "-i",
        "127.0.0.1",
        "-p",
        &callee_port.to_string(),
        "-m",
        "1",
        "-mi",
        "127.0.0.1",
        "-mp",
        &media_port.to_string(),
        "-rtp_echo",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let callee = Sipp::start("api-transfer-callee", &args);
    let (webhook_url, hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let request_id = initiate(&api, &agent, &webhook_url).await;
    let call_sid = started(&mut agent).await;

    // Before: the agent talks to the callee, whose echo it hears.
    agent.send_audio(&[0x55; 160 * 5]);
    let deadline = Instant::now() + WAIT;
    while frame_id(&payload_of(&agent.expect("media").await.1)) != 0x55 {
        assert!(Instant::now() < deadline, "the agent never heard the callee's echo of its voice");
    }

    // The transfer, named by the request's id.
    wait_for_active_row(&pool, &call_sid).await;
    let body = json!({"to": HUMAN, "mode": "blind", "summary": "callback about order 77", "webhook_url": webhook_url});
    let (status, accepted) = api.transfer(&request_id, body).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["call_id"].as_str(), Some(call_sid.as_str()), "{accepted}");
    let (invite, node_b_rtp) = human_answers(&human).await;
    assert!(invite.starts_with(&format!("INVITE sip:{HUMAN}@127.0.0.1")), "{invite}");
    assert!(ua::header(&invite, "From").is_some_and(|f| f.contains(CALLEE)), "the human sees the callee: {invite}");
    assert_eq!(ua::header(&invite, "X-Transfer-Summary"), Some("callback about order 77"), "{invite}");
    agent.expect("stop").await;
    agent.expect("closed").await;

    // After: the human talks to the callee and hears it (its echo), in order.
    let said: Vec<u8> = (0..10u8).map(|i| 0xA0 | i).collect();
    for (i, id) in said.iter().enumerate() {
        human.rtp_send(node_b_rtp, 0, 300 + i as u16, &[*id; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard: Vec<u8> = human
        .rtp_collect(Duration::from_millis(800))
        .await
        .into_iter()
        .map(|(_, payload)| frame_id(&payload))
        .filter(|id| id & 0xF0 == 0xA0)
        .collect();
    assert_eq!(heard, said, "the human's voice went to the callee and came back, all of it, in order");

    hang_up_as_callee(&human, &invite, node.addr).await;
    assert!(callee.wait().await.success(), "the callee got the BYE when the human hung up");
    let legs = call_cdrs(&pool, &call_sid, 2).await;
    assert_eq!(legs.len(), 2, "{legs:?}");
    let (callee_leg, human_leg) = (&legs[0], &legs[1]);
    assert_eq!((callee_leg.0, callee_leg.1.as_str(), callee_leg.2), (1, CALLEE, true), "{legs:?}");
    assert_eq!(callee_leg.4.as_deref(), Some("transfer target hung up"), "{legs:?}");
    assert_eq!((human_leg.0, human_leg.1.as_str(), human_leg.2), (2, HUMAN, true), "{legs:?}");
    assert_eq!(human_leg.3.as_deref(), Some("callee"), "the human hung up its own leg: {legs:?}");
    assert!(human_leg.4.as_deref().is_some_and(|r| r.starts_with("transfer: callee hung up")), "{legs:?}");
    let transfer = transfer_hooks(&hooks, 3).await;
    assert_eq!(status_of(&transfer), ["transfer_started", "transfer_answered", "transfer_completed"], "{transfer:?}");
    assert_eq!(transfer[0]["call_id"].as_str(), Some(call_sid.as_str()), "{transfer:?}");
    node.stop().await;
}

/// Warm, with a raw callee: the agent briefs the human while the callee on hold hears
/// nothing; the agent completes with the `callSid` it got, and callee and human hear each
/// other. The callee hangs up last.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_is_handed_warm_to_a_human_after_the_briefing(pool: PgPool) {
    let mut agent = Agent::start().await;
    let (callee, human) = (Ua::new().await, Ua::new().await);
    let node = node(&pool, callee.sip_addr().port(), human.sip_addr(), false).await;
    let (webhook_url, hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let (invite, node_a_rtp, call_sid) = raw_callee_answers(&api, &mut agent, &callee, &webhook_url).await;
    callee.rtp_send(node_a_rtp, 0, 1, &[0x21; 160]).await;
    assert_eq!(frame_id(&payload_of(&agent.expect("media").await.1)), 0x21, "the agent hears the callee");

    wait_for_active_row(&pool, &call_sid).await;
    let body = json!({"to": HUMAN, "mode": "warm", "summary": "billing", "webhook_url": webhook_url});
    assert_eq!(api.transfer(&call_sid, body).await.0, 202);
    let (_, node_b_rtp) = human_answers(&human).await;
    agent.expect("transfer_answered").await;

    // The briefing: agent and human hear each other; the callee on hold hears none of it.
    let briefing: Vec<u8> = (0..10u8).flat_map(|i| [0x60 | i; 160]).collect();
    agent.send_audio(&briefing);
    for i in 0..10u8 {
        human.rtp_send(node_b_rtp, 0, 700 + u16::from(i), &[0xB0 | i; 160]).await;
        callee.rtp_send(node_a_rtp, 0, 10 + u16::from(i), &[0x31; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (heard_by_human, heard_by_callee) =
        tokio::join!(human.rtp_collect(Duration::from_millis(600)), callee.rtp_collect(Duration::from_millis(600)));
    let ids: Vec<u8> = heard_by_human.iter().map(|(_, p)| frame_id(p)).collect();
    assert_eq!(ids, (0..10u8).map(|i| 0x60 | i).collect::<Vec<_>>(), "the human heard the whole briefing");
    assert!(heard_by_callee.is_empty(), "the callee on hold hears nothing: {} packets", heard_by_callee.len());
    let mut agent_heard = vec![];
    while agent_heard.len() < 10 {
        agent_heard.push(frame_id(&payload_of(&agent.expect("media").await.1)));
    }
    assert_eq!(agent_heard, (0..10u8).map(|i| 0xB0 | i).collect::<Vec<_>>(), "the agent hears the human only");

    let (status, done) = api.post(&format!("/api/calls/{call_sid}/transfer/complete"), None).await;
    assert_eq!((status, done["status"].as_str()), (200, Some("completed")), "{done}");
    agent.expect("stop").await;
    agent.expect("closed").await;
    for i in 0..10u8 {
        callee.rtp_send(node_a_rtp, 0, 100 + u16::from(i), &[0x40 | i; 160]).await;
        human.rtp_send(node_b_rtp, 0, 800 + u16::from(i), &[0xA0 | i; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (heard_by_human, heard_by_callee) =
        tokio::join!(human.rtp_collect(Duration::from_millis(600)), callee.rtp_collect(Duration::from_millis(600)));
    let ids: Vec<u8> = heard_by_human.iter().map(|(_, p)| frame_id(p)).collect();
    assert_eq!(ids, (0..10u8).map(|i| 0x40 | i).collect::<Vec<_>>(), "the human hears the callee");
    let ids: Vec<u8> = heard_by_callee.iter().map(|(_, p)| frame_id(p)).collect();
    assert_eq!(ids, (0..10u8).map(|i| 0xA0 | i).collect::<Vec<_>>(), "the callee hears the human");

    // The callee hangs up: the human gets the BYE.
    hang_up_as_callee(&callee, &invite, node.addr).await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    let legs = call_cdrs(&pool, &call_sid, 2).await;
    assert_eq!(legs[0].3.as_deref(), Some("callee"), "the callee hung up its call: {legs:?}");
    assert_eq!(legs[0].4.as_deref(), Some("callee hung up"), "{legs:?}");
    assert_eq!((legs[1].0, legs[1].1.as_str()), (2, HUMAN), "{legs:?}");
    assert!(legs[1].4.as_deref().is_some_and(|r| r.starts_with("transfer: caller hung up")), "{legs:?}");
    let transfer = transfer_hooks(&hooks, 3).await;
    assert_eq!(status_of(&transfer), ["transfer_started", "transfer_answered", "transfer_completed"], "{transfer:?}");
    node.stop().await;
}

/// `refer`: on a trunk that takes REFER, the node asks the callee's carrier (sipp) to call the
/// human itself; sipp answers 202, NOTIFYs 100 then 200, and the node hangs up its leg and
/// ends the agent's stream.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_api_call_is_handed_over_by_refer_to_the_callees_carrier(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = Ua::new().await;
    let callee_port = free_port("127.0.0.1");
    let node = node(&pool, callee_port, human.sip_addr(), true).await;
    let callee = uas(&["-sf", &scenario("uas_takes_refer.xml")], callee_port, 1);
    let (webhook_url, hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    initiate(&api, &agent, &webhook_url).await;
    let call_sid = started(&mut agent).await;
    wait_for_active_row(&pool, &call_sid).await;
    let body = json!({"to": HUMAN, "mode": "refer", "webhook_url": webhook_url});
    assert_eq!(api.transfer(&call_sid, body).await.0, 202);
    agent.expect("stop").await;
    assert!(callee.wait().await.success(), "sipp saw the REFER naming the human, then the BYE");
    let legs = call_cdrs(&pool, &call_sid, 1).await;
    assert!(legs[0].4.as_deref().is_some_and(|r| r.contains(&format!("transferred by REFER to {HUMAN}"))), "{legs:?}");
    let transfer = transfer_hooks(&hooks, 3).await;
    assert_eq!(status_of(&transfer), ["transfer_started", "transfer_answered", "transfer_completed"], "{transfer:?}");
    node.stop().await;
}

/// A SIP URI target whose host the egress allow-list names (the tests' nodes and API list
/// 127.0.0.0/8) and that is no trunk's gateway (the human listens on 127.0.0.2) is dialled
/// directly: the INVITE goes to the URI as written, callee and human hear each other, and the
/// transfer's CDR names no trunk (nothing billed) and the URI as its destination.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_sip_uri_the_allow_list_names_is_dialled_directly(pool: PgPool) {
    let mut agent = Agent::start().await;
    let callee = Ua::new().await;
    // SIP on 127.0.0.2 (no trunk has that gateway); RTP on 127.0.0.1 as `ua::sdp` says.
    let human = Ua {
        sip: tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap(),
        rtp: tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let node = node(&pool, callee.sip_addr().port(), "127.0.0.1:9".parse().unwrap(), false).await;
    let (webhook_url, _hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let (invite, node_a_rtp, call_sid) = raw_callee_answers(&api, &mut agent, &callee, &webhook_url).await;
    wait_for_active_row(&pool, &call_sid).await;
    let to = format!("sip:desk@{}", human.sip_addr());
    let (status, accepted) = api.transfer(&call_sid, json!({"to": to, "mode": "blind"})).await;
    assert_eq!(status, 202, "{accepted}");
    let (human_invite, node_b_rtp) = human_answers(&human).await;
    assert!(human_invite.starts_with(&format!("INVITE {to} SIP/2.0")), "{human_invite}");
    assert!(ua::header(&human_invite, "To").is_some_and(|t| t.contains(&to)), "{human_invite}");
    agent.expect("stop").await;
    for i in 0..10u8 {
        callee.rtp_send(node_a_rtp, 0, 100 + u16::from(i), &[0x40 | i; 160]).await;
        human.rtp_send(node_b_rtp, 0, 800 + u16::from(i), &[0xA0 | i; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (heard_by_human, heard_by_callee) =
        tokio::join!(human.rtp_collect(Duration::from_millis(600)), callee.rtp_collect(Duration::from_millis(600)));
    let ids: Vec<u8> = heard_by_human.iter().map(|(_, p)| frame_id(p)).collect();
    assert_eq!(ids, (0..10u8).map(|i| 0x40 | i).collect::<Vec<_>>(), "the human hears the callee");
    let ids: Vec<u8> = heard_by_callee.iter().map(|(_, p)| frame_id(p)).collect();
    assert_eq!(ids, (0..10u8).map(|i| 0xA0 | i).collect::<Vec<_>>(), "the callee hears the human");
    hang_up_as_callee(&callee, &invite, node.addr).await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    call_cdrs(&pool, &call_sid, 2).await;
    let (to_number, trunk): (String, Option<String>) =
        sqlx::query_as("SELECT to_number, trunk_name FROM cdrs WHERE call_id = $1 AND attempt = 2")
            .bind(&call_sid)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((to_number.as_str(), trunk), (to.as_str(), None));
    node.stop().await;
}

/// A SIP URI at a trunk's gateway goes through that trunk (the one whose gateway has the
/// URI's port too: here `humans`, not the DID's `carrier` on the same host), and its CDR says
/// so. Hosts nobody allowed are refused by the API (403, saying how to allow them) and, should
/// a request reach the node another way, by the node (the command is rejected with its reason).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn sip_uris_go_through_their_gateways_trunk_and_nowhere_else(pool: PgPool) {
    let mut agent = Agent::start().await;
    let (callee, human) = (Ua::new().await, Ua::new().await);
    let node = node(&pool, callee.sip_addr().port(), human.sip_addr(), false).await;
    let (webhook_url, _hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let (invite, _, call_sid) = raw_callee_answers(&api, &mut agent, &callee, &webhook_url).await;
    wait_for_active_row(&pool, &call_sid).await;

    let (status, refused) = api.transfer(&call_sid, json!({"to": "sip:desk@198.51.100.7", "mode": "blind"})).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("destination_not_allowed")), "{refused}");
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("SWITCHBOARD_EGRESS_ALLOW")), "{refused}");
    // The node's own check, for a command written without the API.
    let command = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO call_commands (id, call_id, call_uuid, node_id, kind, body)
         SELECT $1, call_id, call_uuid, node_id, 'transfer', $2 FROM active_calls WHERE call_id = $3",
    )
    .bind(command)
    .bind(json!({"to": "sip:desk@198.51.100.7", "mode": "blind"}))
    .bind(&call_sid)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('switchboard_call_commands', $1)")
        .bind(command.to_string())
        .execute(&pool)
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let error = loop {
        let (state, error): (String, Option<String>) =
            sqlx::query_as("SELECT state, error FROM call_commands WHERE id = $1")
                .bind(command)
                .fetch_one(&pool)
                .await
                .unwrap();
        if state == "rejected" {
            break error.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "the node did not answer the command: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(error.contains("--egress-allow") && error.contains("198.51.100.7"), "{error}");

    let to = format!("sip:desk@{}", human.sip_addr());
    assert_eq!(api.transfer(&call_sid, json!({"to": to, "mode": "blind"})).await.0, 202);
    let (human_invite, _) = human_answers(&human).await;
    assert!(human_invite.starts_with(&format!("INVITE {to} SIP/2.0")), "{human_invite}");
    agent.expect("stop").await;
    hang_up_as_callee(&callee, &invite, node.addr).await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    call_cdrs(&pool, &call_sid, 2).await;
    let trunk: Option<String> = sqlx::query_scalar("SELECT trunk_name FROM cdrs WHERE call_id = $1 AND attempt = 2")
        .bind(&call_sid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(trunk.as_deref(), Some("humans"));
    node.stop().await;
}

/// After a transfer, the callee's re-INVITE with an offer (hold, then resume) is no longer
/// refused with 488: the node re-offers to the human from the human leg's port with the same
/// direction, answers the callee from the callee leg's port with the direction the human
/// declared, and after the resume both hear each other again.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_transferred_callee_holds_and_resumes_the_human_through_the_node(pool: PgPool) {
    let mut agent = Agent::start().await;
    let (callee, human) = (Ua::new().await, Ua::new().await);
    let node = node(&pool, callee.sip_addr().port(), human.sip_addr(), false).await;
    let (webhook_url, _hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let (invite, node_a_rtp, call_sid) = raw_callee_answers(&api, &mut agent, &callee, &webhook_url).await;
    wait_for_active_row(&pool, &call_sid).await;
    assert_eq!(api.transfer(&call_sid, json!({"to": HUMAN, "mode": "blind"})).await.0, 202);
    let (_, node_b_rtp) = human_answers(&human).await;
    agent.expect("stop").await;

    for (cseq, callee_says, human_says) in [(10, "sendonly", "recvonly"), (11, "sendrecv", "sendrecv")] {
        let offer = ua::sdp(callee.rtp_port(), "0 101", callee_says);
        request_as_callee(&callee, &invite, node.addr, "INVITE", cseq, Some(&offer)).await;
        let (reinvite, from) = human.request("INVITE").await;
        assert_eq!(ua::sdp_rtp(&reinvite), node_b_rtp, "re-offered from the human leg's port: {reinvite}");
        assert!(ua::body(&reinvite).contains(&format!("a={callee_says}")), "{reinvite}");
        let answer = ua::sdp(human.rtp_port(), "0 101", human_says);
        human.send(&ua::reply(&reinvite, "200 OK", human.sip_addr(), Some(&answer)), from).await;
        human.request("ACK").await;
        let ok = callee.final_response().await;
        assert!(ok.starts_with("SIP/2.0 200"), "no more 488: {ok}");
        assert_eq!(ua::sdp_rtp(&ok), node_a_rtp, "answered from the callee leg's port: {ok}");
        assert!(ua::body(&ok).contains(&format!("a={human_says}")), "{ok}");
        request_as_callee(&callee, &invite, node.addr, "ACK", cseq, None).await;
    }

    for i in 0..10u8 {
        callee.rtp_send(node_a_rtp, 0, 100 + u16::from(i), &[0x40 | i; 160]).await;
        human.rtp_send(node_b_rtp, 0, 800 + u16::from(i), &[0xA0 | i; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (heard_by_human, heard_by_callee) =
        tokio::join!(human.rtp_collect(Duration::from_millis(600)), callee.rtp_collect(Duration::from_millis(600)));
    let ids: Vec<u8> = heard_by_human.iter().map(|(_, p)| frame_id(p)).collect();
    assert_eq!(ids, (0..10u8).map(|i| 0x40 | i).collect::<Vec<_>>(), "the human hears the callee after the resume");
    let ids: Vec<u8> = heard_by_callee.iter().map(|(_, p)| frame_id(p)).collect();
    assert_eq!(ids, (0..10u8).map(|i| 0xA0 | i).collect::<Vec<_>>(), "the callee hears the human after the resume");
    hang_up_as_callee(&callee, &invite, node.addr).await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    call_cdrs(&pool, &call_sid, 2).await;
    node.stop().await;
}

/// An API call answered on its second attempt (the first gateway answers 503): the agent's
/// `callSid` is that attempt's Call-ID (`ID-2`), which the transfer request may name; the
/// transfer's attempt counts on from the answered one (3), under the call's own id.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_failed_over_api_call_is_transferred_by_its_agents_call_sid(pool: PgPool) {
    let mut agent = Agent::start().await;
    let (busy, callee, human) = (Ua::new().await, Ua::new().await, Ua::new().await);
    let mut carrier = trunk(
        "carrier",
        vec![("127.0.0.1".into(), busy.sip_addr().port()), ("127.0.0.1".into(), callee.sip_addr().port())],
    );
    carrier.codecs = vec![Codec::Pcmu, Codec::TelephoneEvent];
    let mut humans = trunk("humans", vec![("127.0.0.1".into(), human.sip_addr().port())]);
    humans.codecs = vec![Codec::Pcmu];
    let rule = RuleConfig {
        namespace: "default".into(),
        name: "to-humans".into(),
        direction: Direction::Outbound,
        priority: 1,
        match_spec: MatchSpec { destination_patterns: vec![r"^\+1555222".into()], ..Default::default() },
        destination: None,
        trunks: vec!["humans".into()],
        trunk_selection: TrunkSelection::Ordered,
        status_callback: None,
    };
    let did = number_to(Destination {
        kind: DestinationType::Reject,
        url: None,
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: Some(603),
    });
    let node = Node::start_routed(&pool, vec![carrier, humans], vec![did], vec![rule], |_| {}).await;
    let (webhook_url, _hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    initiate(&api, &agent, &webhook_url).await;
    let (first, from) = busy.request("INVITE").await;
    busy.send(&ua::reply(&first, "503 Service Unavailable", busy.sip_addr(), None), from).await;
    let (invite, from) = callee.request("INVITE").await;
    let answer = ua::sdp(callee.rtp_port(), "0 101", "sendrecv");
    callee.send(&ua::reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    callee.request("ACK").await;
    let call_sid = started(&mut agent).await;
    let call_id = ua::header(&first, "Call-ID").unwrap().to_string();
    assert_eq!(call_sid, format!("{call_id}-2"), "the agent knows the answered attempt's Call-ID");
    wait_for_active_row(&pool, &call_id).await;

    let (status, accepted) = api.transfer(&call_sid, json!({"to": HUMAN, "mode": "blind"})).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["call_id"].as_str(), Some(call_id.as_str()), "the call's own id: {accepted}");
    human_answers(&human).await;
    agent.expect("stop").await;
    hang_up_as_callee(&callee, &invite, node.addr).await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    let legs = call_cdrs(&pool, &call_id, 3).await;
    let attempts: Vec<(i32, &str, bool)> = legs.iter().map(|l| (l.0, l.1.as_str(), l.2)).collect();
    assert_eq!(attempts, [(1, CALLEE, false), (2, CALLEE, true), (3, HUMAN, true)], "{legs:?}");
    node.stop().await;
}
