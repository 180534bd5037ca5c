//! Digest replay (issue 19 item 5) against running nodes: an INVITE with a right
//! Proxy-Authorization is admitted once; the same credentials sent again (from anywhere, with
//! a new branch and Call-ID, as someone who captured them would) are challenged again. Nodes
//! with the same `--nonce-secret` accept each other's nonces; a node with another secret asks
//! the caller to retry (`stale=true`).

mod common;

use std::net::SocketAddr;

use common::ua::*;
use common::*;
use sqlx::PgPool;
use switchboard_model::{AuthMethod, Credential, NumberConfig, TrunkConfig};
use switchboard_node::sip::digest::answer_challenge;

const USER: &str = "trunkuser";
const PASSWORD: &str = "s3cret";
const SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

/// A trunk that authenticates callers by digest only: every source may try.
fn digest_trunk() -> TrunkConfig {
    let mut trunk = trunk("carrier", vec![]);
    trunk.auth_method = AuthMethod::Digest;
    trunk.allowed_source_cidrs = vec![];
    trunk
}

fn credential() -> Credential {
    Credential {
        namespace: "default".into(),
        trunk_name: "carrier".into(),
        username: USER.into(),
        password: PASSWORD.into(),
        secret_name: "carrier-credentials".into(),
    }
}

/// A node whose number rings `callee`, with `secret` as its nonce secret.
async fn node(pool: &PgPool, callee: &Ua, secret: &str) -> Node {
    let number: NumberConfig = number_to(sip_destination(callee.sip_addr().port()));
    let secret = secret.to_string();
    Node::start_tuned(pool, vec![digest_trunk()], vec![number], vec![credential()], move |args| {
        args.guard.nonce_secret = Some(secret);
    })
    .await
}

/// The INVITE's `Proxy-Authenticate` challenge from `node` (the 407 is ACKed).
async fn challenge(node: SocketAddr, call_id: &str) -> rsip::Response {
    let caller = Ua::new().await;
    let invite = invite_to_did(node, caller.sip_addr(), call_id, SDP);
    caller.send(&invite, node).await;
    let answer = caller.final_response().await;
    assert!(answer.starts_with("SIP/2.0 407 "), "{answer}");
    let ack = format!(
        "ACK sip:{DID}@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {0};branch=z9hG4bK-{call_id}-inv\r\n\
         From: <sip:+15557654321@{0}>;tag=caller\r\nTo: {1}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\n\
         Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        caller.sip_addr(),
        header(&answer, "To").expect("407 has a To")
    );
    caller.send(&ack, node).await;
    match rsip::SipMessage::try_from(answer.as_str()).expect("the 407 parses") {
        rsip::SipMessage::Response(response) => response,
        other => panic!("not a response: {other}"),
    }
}

/// The INVITE a caller at `from` sends to `node` with credentials answering `challenge`
/// (CSeq 2, its own branch and Call-ID).
fn answered(node: SocketAddr, from: SocketAddr, call_id: &str, challenge: &rsip::Response) -> String {
    let uri = rsip::Uri::try_from(format!("sip:{DID}@{node}").as_str()).unwrap();
    let credentials = answer_challenge(challenge, &rsip::Method::Invite, &uri, USER, PASSWORD, 1).expect("answerable");
    invite_to_did(node, from, call_id, SDP)
        .replace("CSeq: 1 INVITE", "CSeq: 2 INVITE")
        .replace("Max-Forwards: 70\r\n", &format!("Max-Forwards: 70\r\n{credentials}\r\n"))
}

/// Whether `node` takes an INVITE answering `challenge` from a fresh caller: `Ok` when the
/// callee is rung (the call then stays unanswered), the caller's final answer otherwise.
async fn admitted(node: SocketAddr, challenge: &rsip::Response, callee: &Ua, call_id: &str) -> Result<(), String> {
    let caller = Ua::new().await;
    caller.send(&answered(node, caller.sip_addr(), call_id, challenge), node).await;
    tokio::select! {
        (request, _) = callee.request("INVITE") => {
            assert!(request.starts_with("INVITE "), "{request}");
            Ok(())
        }
        answer = caller.final_response() => Err(answer),
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_same_proxy_authorization_twice_is_challenged_again(pool: PgPool) {
    let callee = Ua::new().await;
    let node = node(&pool, &callee, "one secret for every node").await;
    let challenge = challenge(node.addr, "first").await;
    let caller = Ua::new().await;
    let invite = answered(node.addr, caller.sip_addr(), "admitted", &challenge);
    caller.send(&invite, node.addr).await;
    let (rung, _) = callee.request("INVITE").await;
    assert!(rung.starts_with("INVITE "), "{rung}");

    // The captured request again, from another source, as a new transaction and call.
    let attacker = Ua::new().await;
    let replay = invite
        .replace("z9hG4bK-admitted-inv", "z9hG4bK-replayed")
        .replace("Call-ID: admitted", "Call-ID: replayed")
        .replace(&caller.sip_addr().to_string(), &attacker.sip_addr().to_string());
    attacker.send(&replay, node.addr).await;
    let answer = attacker.final_response().await;
    assert!(answer.starts_with("SIP/2.0 407 "), "a replayed answer must be challenged again: {answer}");
    assert!(header(&answer, "Proxy-Authenticate").is_some_and(|v| !v.contains("stale")), "{answer}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn nodes_sharing_the_nonce_secret_accept_each_others_challenges(pool: PgPool) {
    let (callee_a, callee_b, callee_c) = (Ua::new().await, Ua::new().await, Ua::new().await);
    let a = node(&pool, &callee_a, "shared").await;
    let b = node(&pool, &callee_b, "shared").await;
    let c = node(&pool, &callee_c, "another").await;
    // Challenged by A, answered to B: B rings its callee.
    let from_a = challenge(a.addr, "to-a").await;
    assert_eq!(admitted(b.addr, &from_a, &callee_b, "to-b").await, Ok(()));
    // Answered to C, whose secret differs: challenged again, with stale=true so that the caller
    // retries at once.
    let from_a = challenge(a.addr, "to-a-again").await;
    let answer = admitted(c.addr, &from_a, &callee_c, "to-c").await.expect_err("C must not accept A's nonce");
    assert!(answer.starts_with("SIP/2.0 407 "), "{answer}");
    assert!(header(&answer, "Proxy-Authenticate").is_some_and(|v| v.contains("stale=true")), "{answer}");
    for node in [a, b, c] {
        node.stop().await;
    }
}
