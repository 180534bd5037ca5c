//! SRTP with SDES keys through the node, each leg under its own trunk's `media.srtp`: a caller
//! on loopback offering `RTP/SAVP` with `a=crypto` (a test peer that encrypts with the same
//! SRTP implementation as the node, webrtc-srtp) talks to a plain-RTP callee, to an SRTP callee
//! behind an SRTP-required trunk, and to an AI agent over WebSocket. Checked: the audio each
//! side hears is what the other sent (decrypted on the plain leg, encrypted on the SRTP leg),
//! RTCP crosses as SRTCP, a caller encrypting with another key than it offered is heard by
//! nobody and counted in `switchboard_srtp_rejected_packets_total`, and a plain offer to an
//! SRTP-required trunk gets 488.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::ua::*;
use common::*;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use sqlx::PgPool;
use switchboard_model::{Destination, DestinationType, SrtpMode};
use switchboard_node::media::srtp::{CryptoAttr, SrtpLeg, Suite};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const FRAMES: u16 = 10;

/// An audio section with `profile`, PCMU, an `a=rtcp` port and the given `a=crypto` lines.
fn media_sdp(rtp: u16, rtcp: u16, profile: &str, crypto: &[&CryptoAttr]) -> String {
    let mut out = format!(
        "v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {rtp} {profile} 0\r\n\
         a=rtpmap:0 PCMU/8000\r\na=rtcp:{rtcp}\r\n"
    );
    for c in crypto {
        out.push_str(&format!("a=crypto:{}\r\n", c.value()));
    }
    out.push_str("a=ptime:20\r\na=sendrecv\r\n");
    out
}

/// The `a=crypto` lines of a message's SDP.
fn crypto_of(message: &str) -> Vec<CryptoAttr> {
    body(message)
        .lines()
        .filter_map(|l| l.strip_prefix("a=crypto:"))
        .map(|v| CryptoAttr::parse(v.trim()).unwrap())
        .collect()
}

/// The protocol of the message's audio section.
fn profile_of(message: &str) -> String {
    body(message)
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string()
}

/// A plain RTP packet (PCMU, SSRC `ssrc`) whose 160 payload bytes are all `fill`.
fn rtp(seq: u16, ssrc: u32, fill: u8) -> Vec<u8> {
    let mut packet = vec![0x80, 0];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    packet.extend_from_slice(&ssrc.to_be_bytes());
    packet.extend(std::iter::repeat_n(fill, 160));
    packet
}

/// An RTCP sender report of `ssrc` (28 bytes).
fn sender_report(ssrc: u32) -> Vec<u8> {
    let mut packet = vec![0x80, 200, 0, 6];
    packet.extend_from_slice(&ssrc.to_be_bytes());
    packet.extend_from_slice(&[0u8; 20]);
    packet
}

fn fill(i: u16) -> u8 {
    0x20 + (i as u8) * 3
}

/// Sends `FRAMES` packets made by `make(i)` from `socket` to `to`, 20 ms apart.
async fn stream(socket: &UdpSocket, to: SocketAddr, mut make: impl FnMut(u16) -> Vec<u8>) {
    for i in 0..FRAMES {
        socket.send_to(&make(i), to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every datagram arriving on `socket` within `window`.
async fn collect(socket: &UdpSocket, window: Duration) -> Vec<Vec<u8>> {
    let mut out = vec![];
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
        out.push(buf[..n].to_vec());
    }
    out
}

fn rtcp_port(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + 1)
}

/// The metric once it reached `expected` (bounded wait: it is counted as the call's relay ends).
async fn rejected_reaches(node: &Node, expected: f64) -> f64 {
    let name = "switchboard_srtp_rejected_packets_total";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric(node, name).await.unwrap_or(-1.0);
        if value >= expected || tokio::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A caller with an RTCP socket of its own (announced with `a=rtcp`).
struct Peer {
    ua: Ua,
    rtcp: UdpSocket,
}

impl Peer {
    async fn new() -> Peer {
        Peer { ua: Ua::new().await, rtcp: UdpSocket::bind("127.0.0.1:0").await.unwrap() }
    }

    fn sdp(&self, profile: &str, crypto: &[&CryptoAttr]) -> String {
        media_sdp(self.ua.rtp_port(), self.rtcp.local_addr().unwrap().port(), profile, crypto)
    }
}

/// Sets up a call from `caller` offering `offer`, answered by `callee` with `answer(invite)`.
/// Returns the node's 200 to the caller and the callee's INVITE; the caller has ACKed.
async fn establish(
    node: &Node,
    caller: &Peer,
    callee: &Peer,
    call_id: &str,
    offer: &str,
    answer: impl FnOnce(&str) -> String,
) -> (String, String) {
    caller.ua.send(&invite_to_did(node.addr, caller.ua.sip_addr(), call_id, offer), node.addr).await;
    let (invite, from) = callee.ua.request("INVITE").await;
    let sdp = answer(&invite);
    callee.ua.send(&reply(&invite, "200 OK", callee.ua.sip_addr(), Some(&sdp)), from).await;
    let _ack = callee.ua.request("ACK").await;
    let ok = caller.ua.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    caller
        .ua
        .send(&caller_in_dialog("ACK", node.addr, caller.ua.sip_addr(), call_id, &to_tag(&ok), 1), node.addr)
        .await;
    (ok, invite)
}

/// The caller hangs up; the callee confirms.
async fn hang_up(node: &Node, caller: &Peer, callee: &Peer, call_id: &str, ok: &str) {
    caller.ua.send(&caller_in_dialog("BYE", node.addr, caller.ua.sip_addr(), call_id, &to_tag(ok), 2), node.addr).await;
    let (bye, from) = callee.ua.request("BYE").await;
    callee.ua.send(&reply(&bye, "200 OK", callee.ua.sip_addr(), None), from).await;
    assert!(caller.ua.final_response().await.starts_with("SIP/2.0 200"));
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_srtp_caller_and_a_plain_callee_hear_each_other_with_rtcp_as_srtcp(pool: PgPool) {
    let caller = Peer::new().await;
    let callee = Peer::new().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.srtp = SrtpMode::Required;
    let node = Node::start(&pool, vec![carrier], vec![number_to(sip_destination(callee.ua.sip_addr().port()))]).await;

    let key = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    let offer = caller.sdp("RTP/SAVP", &[&key]);
    let (ok, invite) = establish(&node, &caller, &callee, "srtp-plain", &offer, |_| callee.sdp("RTP/AVP", &[])).await;
    // Each leg on its own terms: SRTP with the node's own key to the caller, plain to the callee.
    assert_eq!((profile_of(&invite), crypto_of(&invite).len()), ("RTP/AVP".to_string(), 0), "{invite}");
    assert_eq!(profile_of(&ok), "RTP/SAVP", "{ok}");
    let answered = crypto_of(&ok);
    assert_eq!(answered.len(), 1, "{ok}");
    assert_eq!((answered[0].tag(), answered[0].suite()), (1, Suite::AesCm128HmacSha1_80));
    assert_ne!(answered[0], key, "the node encrypts with a key of its own");
    let mut srtp = SrtpLeg::new(&key, &answered[0]).unwrap();
    let node_for_caller = sdp_rtp(&ok);
    let node_for_callee = sdp_rtp(&invite);

    // Caller → callee: encrypted on the wire in, plain and identical audio out.
    let sent: Vec<Vec<u8>> =
        (0..FRAMES).map(|i| srtp.protect_rtp(&rtp(100 + i, 0x1111, fill(i))).unwrap().to_vec()).collect();
    assert!(
        sent.iter().all(|p| p.len() == 12 + 160 + 10 && p[12..172] != [p[12]; 160]),
        "the caller's audio is encrypted"
    );
    let heard = tokio::join!(
        stream(&caller.ua.rtp, node_for_caller, |i| sent[i as usize].clone()),
        callee.ua.rtp_collect_raw(Duration::from_millis(700))
    )
    .1;
    let payloads: Vec<Vec<u8>> = heard.iter().map(|p| p[12..].to_vec()).collect();
    let expected: Vec<Vec<u8>> = (0..FRAMES).map(|i| vec![fill(i); 160]).collect();
    assert_eq!(payloads, expected, "the callee hears the caller's audio decrypted, complete and in order");
    assert!(heard.iter().all(|p| p[1] & 0x7f == 0));

    // Callee → caller: plain in, SRTP out under the node's key.
    let back = tokio::join!(
        stream(&callee.ua.rtp, node_for_callee, |i| rtp(500 + i, 0x2222, fill(i + 40))),
        collect(&caller.ua.rtp, Duration::from_millis(700))
    )
    .1;
    assert_eq!(back.len(), FRAMES as usize, "every callee frame reaches the caller");
    for (i, packet) in back.iter().enumerate() {
        assert_eq!(packet.len(), 12 + 160 + 10, "SRTP with an 80-bit tag");
        assert_ne!(packet[12..172], [fill(i as u16 + 40); 160], "encrypted towards the caller");
        let plain = srtp.unprotect_rtp(packet).expect("authenticates under the node's key");
        assert_eq!(plain[12..], [fill(i as u16 + 40); 160]);
    }

    // RTCP: the caller's SRTCP reaches the callee as RTCP, the callee's RTCP the caller as SRTCP.
    let srtcp = srtp.protect_rtcp(&sender_report(0x1111)).unwrap();
    caller.rtcp.send_to(&srtcp, rtcp_port(node_for_caller)).await.unwrap();
    let reports = collect(&callee.rtcp, Duration::from_millis(500)).await;
    assert_eq!(reports.len(), 1, "the caller's SRTCP is relayed");
    assert_eq!((reports[0].len(), reports[0][1]), (28, 200), "as a plain sender report");
    callee.rtcp.send_to(&sender_report(0x2222), rtcp_port(node_for_callee)).await.unwrap();
    let reports = collect(&caller.rtcp, Duration::from_millis(500)).await;
    assert_eq!(reports.len(), 1, "the callee's RTCP is relayed");
    let plain = srtp.unprotect_rtcp(&reports[0]).expect("SRTCP under the node's key");
    assert_eq!((plain.len(), plain[1]), (28, 200));

    hang_up(&node, &caller, &callee, "srtp-plain", &ok).await;
    assert_eq!(rejected_reaches(&node, 0.0).await, 0.0, "nothing was refused");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_wrong_key_gives_no_audio_and_is_counted_and_a_plain_offer_gets_488(pool: PgPool) {
    let caller = Peer::new().await;
    let callee = Peer::new().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.srtp = SrtpMode::Required;
    let node = Node::start(&pool, vec![carrier], vec![number_to(sip_destination(callee.ua.sip_addr().port()))]).await;

    // media.srtp: required refuses plain RTP before any outbound attempt (another caller: the
    // node repeats its 488 until an ACK, which this one does not send).
    let plain_caller = Peer::new().await;
    let plain = plain_caller.sdp("RTP/AVP", &[]);
    plain_caller.ua.send(&invite_to_did(node.addr, plain_caller.ua.sip_addr(), "srtp-488", &plain), node.addr).await;
    let refused = plain_caller.ua.final_response().await;
    assert!(refused.starts_with("SIP/2.0 488"), "{refused}");

    let offered = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_32);
    let offer = caller.sdp("RTP/SAVP", &[&offered]);
    let (ok, invite) = establish(&node, &caller, &callee, "srtp-wrong", &offer, |_| callee.sdp("RTP/AVP", &[])).await;
    let answered = crypto_of(&ok);
    assert_eq!(answered[0].suite(), Suite::AesCm128HmacSha1_32);
    // The caller encrypts with a key it never offered (a stale or corrupted a=crypto).
    let other = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_32);
    let mut wrong = SrtpLeg::new(&other, &answered[0]).unwrap();
    let heard = tokio::join!(
        stream(&caller.ua.rtp, sdp_rtp(&ok), |i| wrong.protect_rtp(&rtp(1 + i, 0x3333, fill(i))).unwrap().to_vec()),
        callee.ua.rtp_collect_raw(Duration::from_millis(600))
    )
    .1;
    assert!(heard.is_empty(), "nothing that fails authentication is relayed: {} packets", heard.len());
    let _ = invite;
    hang_up(&node, &caller, &callee, "srtp-wrong", &ok).await;
    assert_eq!(rejected_reaches(&node, f64::from(FRAMES)).await, f64::from(FRAMES), "every refused packet counted");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_callee_behind_an_srtp_required_trunk_gets_an_savp_offer_and_talks_to_a_plain_caller(pool: PgPool) {
    let caller = Peer::new().await;
    let callee = Peer::new().await;
    let inbound = trunk("carrier", vec![]);
    let mut secure = trunk("secure", vec![("127.0.0.1".into(), callee.ua.sip_addr().port())]);
    secure.srtp = SrtpMode::Required;
    let destination = Destination {
        kind: DestinationType::Number,
        url: None,
        uri: None,
        number: Some("+15559990000".into()),
        trunk_ref: Some("secure".into()),
        reject_code: None,
    };
    let node = Node::start(&pool, vec![inbound, secure], vec![number_to(destination)]).await;

    let callee_key = CryptoAttr::generate(2, Suite::AesCm128HmacSha1_32);
    let mut offered = vec![];
    let (ok, invite) = establish(&node, &caller, &callee, "srtp-out", &caller.sdp("RTP/AVP", &[]), |invite| {
        offered = crypto_of(invite);
        callee.sdp("RTP/SAVP", &[&callee_key])
    })
    .await;
    assert_eq!(profile_of(&invite), "RTP/SAVP", "{invite}");
    assert_eq!(
        offered.iter().map(|c| (c.tag(), c.suite())).collect::<Vec<_>>(),
        [(1, Suite::AesCm128HmacSha1_80), (2, Suite::AesCm128HmacSha1_32)],
        "{invite}"
    );
    assert_eq!((profile_of(&ok), crypto_of(&ok).len()), ("RTP/AVP".to_string(), 0), "the caller's leg stays plain");
    // The callee took tag 2: the node encrypts with its tag-2 key.
    let mut srtp = SrtpLeg::new(&callee_key, &offered[1]).unwrap();

    let heard = tokio::join!(
        stream(&caller.ua.rtp, sdp_rtp(&ok), |i| rtp(1 + i, 0x4444, fill(i))),
        collect(&callee.ua.rtp, Duration::from_millis(700))
    )
    .1;
    assert_eq!(heard.len(), FRAMES as usize);
    for (i, packet) in heard.iter().enumerate() {
        assert_eq!(packet.len(), 12 + 160 + 4, "SRTP with a 32-bit tag");
        assert_eq!(srtp.unprotect_rtp(packet).expect("the node's tag-2 key")[12..], [fill(i as u16); 160]);
    }
    let back = tokio::join!(
        stream(&callee.ua.rtp, sdp_rtp(&invite), |i| srtp
            .protect_rtp(&rtp(900 + i, 0x5555, fill(i + 9)))
            .unwrap()
            .to_vec()),
        caller.ua.rtp_collect_raw(Duration::from_millis(700))
    )
    .1;
    let payloads: Vec<Vec<u8>> = back.iter().map(|p| p[12..].to_vec()).collect();
    assert_eq!(payloads, (0..FRAMES).map(|i| vec![fill(i + 9); 160]).collect::<Vec<_>>(), "decrypted for the caller");
    hang_up(&node, &caller, &callee, "srtp-out", &ok).await;
    node.stop().await;
}

/// A re-INVITE from the caller of [`invite_to_did`]'s dialog, offering `sdp`.
fn caller_reinvite(node: SocketAddr, from: SocketAddr, call_id: &str, to_tag: &str, cseq: u32, sdp: &str) -> String {
    let did = DID;
    format!(
        "INVITE sip:{did}@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-{call_id}-re{cseq}\r\n\
         From: <sip:+15557654321@{from}>;tag=caller\r\nTo: <sip:{did}@{node}>;tag={to_tag}\r\nCall-ID: {call_id}\r\n\
         CSeq: {cseq} INVITE\r\nContact: <sip:caller@{from}>\r\nMax-Forwards: 70\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

/// A re-INVITE with a new key (RFC 4568 §7.1.4: rekeying is a new offer) moves the caller's leg
/// to a new SRTP context both ways; the plain callee hears no difference.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_re_invite_with_a_new_key_rekeys_the_callers_leg(pool: PgPool) {
    let caller = Peer::new().await;
    let callee = Peer::new().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.srtp = SrtpMode::Required;
    let node = Node::start(&pool, vec![carrier], vec![number_to(sip_destination(callee.ua.sip_addr().port()))]).await;
    let first = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    let (ok, invite) = establish(&node, &caller, &callee, "srtp-rekey", &caller.sdp("RTP/SAVP", &[&first]), |_| {
        callee.sdp("RTP/AVP", &[])
    })
    .await;
    let tag = to_tag(&ok);
    let mut old = SrtpLeg::new(&first, &crypto_of(&ok)[0]).unwrap();
    let heard = tokio::join!(
        stream(&caller.ua.rtp, sdp_rtp(&ok), |i| old.protect_rtp(&rtp(1 + i, 0x7777, fill(i))).unwrap().to_vec()),
        callee.ua.rtp_collect_raw(Duration::from_millis(600))
    )
    .1;
    assert_eq!(heard.len(), FRAMES as usize, "before the rekey");

    let second = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    let reoffer = caller.sdp("RTP/SAVP", &[&second]);
    caller.ua.send(&caller_reinvite(node.addr, caller.ua.sip_addr(), "srtp-rekey", &tag, 2, &reoffer), node.addr).await;
    let (reinvite, from) = callee.ua.request("INVITE").await;
    assert_eq!(crypto_of(&reinvite).len(), 0, "the callee's leg stays plain: {reinvite}");
    callee.ua.send(&reply(&reinvite, "200 OK", callee.ua.sip_addr(), Some(&callee.sdp("RTP/AVP", &[]))), from).await;
    let _ = callee.ua.request("ACK").await;
    let ok2 = caller.ua.final_response().await;
    assert!(ok2.starts_with("SIP/2.0 200"), "{ok2}");
    caller.ua.send(&caller_in_dialog("ACK", node.addr, caller.ua.sip_addr(), "srtp-rekey", &tag, 2), node.addr).await;
    let answered = crypto_of(&ok2);
    assert_eq!(answered.len(), 1, "{ok2}");
    let mut new = SrtpLeg::new(&second, &answered[0]).unwrap();

    // The new key is heard; the callee's audio comes back under the node's new key.
    let heard = tokio::join!(
        stream(&caller.ua.rtp, sdp_rtp(&ok2), |i| new.protect_rtp(&rtp(1 + i, 0x8888, fill(i + 20))).unwrap().to_vec()),
        callee.ua.rtp_collect_raw(Duration::from_millis(600))
    )
    .1;
    let payloads: Vec<Vec<u8>> = heard.iter().map(|p| p[12..].to_vec()).collect();
    assert_eq!(payloads, (0..FRAMES).map(|i| vec![fill(i + 20); 160]).collect::<Vec<_>>(), "after the rekey");
    let back = tokio::join!(
        stream(&callee.ua.rtp, sdp_rtp(&invite), |i| rtp(300 + i, 0x9999, fill(i + 30))),
        collect(&caller.ua.rtp, Duration::from_millis(600))
    )
    .1;
    assert_eq!(back.len(), FRAMES as usize);
    assert!(back.iter().all(|p| new.unprotect_rtp(p).is_some()), "encrypted with the node's new key");
    // The old key no longer gets through.
    let stale = old.protect_rtp(&rtp(50, 0x7777, 1)).unwrap();
    caller.ua.rtp.send_to(&stale, sdp_rtp(&ok2)).await.unwrap();
    assert!(callee.ua.rtp_collect_raw(Duration::from_millis(300)).await.is_empty(), "the old key is refused");

    caller.ua.send(&caller_in_dialog("BYE", node.addr, caller.ua.sip_addr(), "srtp-rekey", &tag, 3), node.addr).await;
    let (bye, from) = callee.ua.request("BYE").await;
    callee.ua.send(&reply(&bye, "200 OK", callee.ua.sip_addr(), None), from).await;
    assert!(caller.ua.final_response().await.starts_with("SIP/2.0 200"));
    assert_eq!(rejected_reaches(&node, 1.0).await, 1.0, "the stale packet is counted");
    node.stop().await;
}

/// A minimal Twilio Media Streams agent: every `media` payload it gets goes to `heard`; every
/// payload the test puts on `say` goes to the node as a `media` event.
async fn agent() -> (String, mpsc::UnboundedReceiver<Vec<u8>>, mpsc::UnboundedSender<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let (heard_tx, heard) = mpsc::unbounded_channel();
    let (say, mut say_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        loop {
            tokio::select! {
                message = ws.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let value: Value = serde_json::from_str(&text).unwrap();
                        if value["event"] == "media" {
                            let payload = BASE64.decode(value["media"]["payload"].as_str().unwrap()).unwrap();
                            let _ = heard_tx.send(payload);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                audio = say_rx.recv() => {
                    let Some(audio) = audio else { break };
                    let event = json!({"event": "media", "streamSid": "MZtest", "media": {"payload": BASE64.encode(audio)}});
                    if ws.send(Message::text(event.to_string())).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    (url, heard, say)
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_srtp_caller_is_heard_by_the_ai_agent_and_hears_it(pool: PgPool) {
    let caller = Peer::new().await;
    let (url, mut heard, say) = agent().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.srtp = SrtpMode::Required;
    let websocket = Destination {
        kind: DestinationType::Websocket,
        url: Some(url),
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: None,
    };
    let node = Node::start(&pool, vec![carrier], vec![number_to(websocket)]).await;
    let key = CryptoAttr::generate(5, Suite::AesCm128HmacSha1_80);
    let offer = caller.sdp("RTP/SAVP", &[&key]);
    caller.ua.send(&invite_to_did(node.addr, caller.ua.sip_addr(), "srtp-agent", &offer), node.addr).await;
    let ok = caller.ua.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    caller
        .ua
        .send(&caller_in_dialog("ACK", node.addr, caller.ua.sip_addr(), "srtp-agent", &to_tag(&ok), 1), node.addr)
        .await;
    assert_eq!(profile_of(&ok), "RTP/SAVP", "{ok}");
    let answered = crypto_of(&ok);
    assert_eq!((answered.len(), answered[0].tag()), (1, 5), "{ok}");
    let mut srtp = SrtpLeg::new(&key, &answered[0]).unwrap();

    stream(&caller.ua.rtp, sdp_rtp(&ok), |i| srtp.protect_rtp(&rtp(10 + i, 0x6666, fill(i))).unwrap().to_vec()).await;
    let mut frames = vec![];
    while frames.len() < FRAMES as usize {
        match tokio::time::timeout(Duration::from_secs(3), heard.recv()).await {
            Ok(Some(frame)) => frames.push(frame),
            _ => break,
        }
    }
    assert_eq!(
        frames,
        (0..FRAMES).map(|i| vec![fill(i); 160]).collect::<Vec<_>>(),
        "the agent hears the caller in clear"
    );

    for i in 0..3u16 {
        say.send(vec![fill(i + 60); 160]).unwrap();
    }
    let back = collect(&caller.ua.rtp, Duration::from_millis(800)).await;
    let decrypted: Vec<Vec<u8>> =
        back.iter().map(|p| srtp.unprotect_rtp(p).expect("SRTP under the node's key")[12..].to_vec()).collect();
    assert_eq!(decrypted, (0..3u16).map(|i| vec![fill(i + 60); 160]).collect::<Vec<_>>(), "the caller hears the agent");

    caller
        .ua
        .send(&caller_in_dialog("BYE", node.addr, caller.ua.sip_addr(), "srtp-agent", &to_tag(&ok), 2), node.addr)
        .await;
    assert!(caller.ua.final_response().await.starts_with("SIP/2.0 200"));
    node.stop().await;
}

/// An SRTP caller waiting on a blind transfer with `--transfer-ringback` hears the ringback as
/// SRTP under the node's key of its leg (before, the tone went out as plain RTP, which an SRTP
/// phone drops: the caller heard nothing); when the target answers, the caller hears it,
/// still as SRTP.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_srtp_caller_hears_the_transfer_ringback_encrypted(pool: PgPool) {
    use common::agent::{Agent, RestApi, wait_for_active_row};
    let caller = Peer::new().await;
    let human = Ua::new().await;
    let mut agent = Agent::start().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.srtp = SrtpMode::Required;
    // The human is reached through a plain trunk (an outbound rule), so its audio is in clear.
    let humans = trunk("humans", vec![("127.0.0.1".into(), human.sip_addr().port())]);
    let rule = switchboard_model::RuleConfig {
        namespace: "default".into(),
        name: "to-humans".into(),
        direction: switchboard_model::Direction::Outbound,
        priority: 1,
        match_spec: switchboard_model::MatchSpec {
            destination_patterns: vec![r"^\+1555222".into()],
            ..Default::default()
        },
        destination: None,
        trunks: vec!["humans".into()],
        trunk_selection: switchboard_model::TrunkSelection::Ordered,
        status_callback: None,
    };
    let websocket = Destination {
        kind: DestinationType::Websocket,
        url: Some(agent.url.clone()),
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: None,
    };
    let numbers = vec![number_to(websocket)];
    let tune = |args: &mut switchboard_node::signaling::SipArgs| args.agent.transfer_ringback = true;
    let node = Node::start_routed(&pool, vec![carrier, humans], numbers, vec![rule], tune).await;
    let api = RestApi::start(&pool).await;
    let key = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    let offer = caller.sdp("RTP/SAVP", &[&key]);
    caller.ua.send(&invite_to_did(node.addr, caller.ua.sip_addr(), "srtp-ringback", &offer), node.addr).await;
    let ok = caller.ua.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    caller
        .ua
        .send(&caller_in_dialog("ACK", node.addr, caller.ua.sip_addr(), "srtp-ringback", &to_tag(&ok), 1), node.addr)
        .await;
    let mut srtp = SrtpLeg::new(&key, &crypto_of(&ok)[0]).unwrap();
    agent.expect("start").await;
    wait_for_active_row(&pool, "srtp-ringback").await;

    assert_eq!(api.transfer("srtp-ringback", json!({"to": "+15552223333", "mode": "blind"})).await.0, 202);
    let (invite, from) = human.request("INVITE").await;
    human.send(&reply(&invite, "180 Ringing", human.sip_addr(), None), from).await;
    let rang = collect(&caller.ua.rtp, Duration::from_millis(500)).await;
    assert!(rang.len() >= 10, "the caller hears ringback: {} packets", rang.len());
    for packet in &rang {
        let plain = srtp.unprotect_rtp(packet).expect("SRTP under the node's key, not plain RTP");
        let levels: std::collections::HashSet<u8> = plain[12..].iter().copied().collect();
        assert!(plain.len() == 172 && levels.len() > 8, "a 20 ms frame of a tone, not silence");
    }

    let answer = sdp(human.rtp_port(), "0", "sendrecv");
    human.send(&reply(&invite, "200 OK", human.sip_addr(), Some(&answer)), from).await;
    human.request("ACK").await;
    agent.expect("stop").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    collect(&caller.ua.rtp, Duration::from_millis(50)).await;
    stream(&human.rtp, sdp_rtp(&invite), |i| rtp(300 + i, 0x7777, fill(i))).await;
    let heard = collect(&caller.ua.rtp, Duration::from_millis(500)).await;
    let decrypted: Vec<Vec<u8>> =
        heard.iter().map(|p| srtp.unprotect_rtp(p).expect("SRTP under the node's key")[12..].to_vec()).collect();
    assert_eq!(decrypted, (0..FRAMES).map(|i| vec![fill(i); 160]).collect::<Vec<_>>(), "the caller hears the human");
    caller
        .ua
        .send(&caller_in_dialog("BYE", node.addr, caller.ua.sip_addr(), "srtp-ringback", &to_tag(&ok), 2), node.addr)
        .await;
    let (bye, from) = human.request("BYE").await;
    human.send(&reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    node.stop().await;
}

/// A transfer's target behind an SRTP-required trunk is offered `RTP/SAVP` with the node's key
/// (as any outbound leg through that trunk) and the relay joins it to a plain caller: each
/// hears the other, encrypted on the target's leg only.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_transfer_target_behind_an_srtp_trunk_is_called_with_srtp(pool: PgPool) {
    use common::agent::{Agent, RestApi, wait_for_active_row};
    let (caller, human) = (Peer::new().await, Peer::new().await);
    let mut agent = Agent::start().await;
    let mut humans = trunk("humans", vec![("127.0.0.1".into(), human.ua.sip_addr().port())]);
    humans.srtp = SrtpMode::Required;
    let rule = switchboard_model::RuleConfig {
        namespace: "default".into(),
        name: "to-humans".into(),
        direction: switchboard_model::Direction::Outbound,
        priority: 1,
        match_spec: switchboard_model::MatchSpec {
            destination_patterns: vec![r"^\+1555222".into()],
            ..Default::default()
        },
        destination: None,
        trunks: vec!["humans".into()],
        trunk_selection: switchboard_model::TrunkSelection::Ordered,
        status_callback: None,
    };
    let websocket = Destination {
        kind: DestinationType::Websocket,
        url: Some(agent.url.clone()),
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: None,
    };
    let trunks = vec![trunk("carrier", vec![]), humans];
    let node = Node::start_routed(&pool, trunks, vec![number_to(websocket)], vec![rule], |_| {}).await;
    let api = RestApi::start(&pool).await;
    let offer = caller.sdp("RTP/AVP", &[]);
    caller.ua.send(&invite_to_did(node.addr, caller.ua.sip_addr(), "srtp-target", &offer), node.addr).await;
    let ok = caller.ua.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    caller
        .ua
        .send(&caller_in_dialog("ACK", node.addr, caller.ua.sip_addr(), "srtp-target", &to_tag(&ok), 1), node.addr)
        .await;
    agent.expect("start").await;
    wait_for_active_row(&pool, "srtp-target").await;

    assert_eq!(api.transfer("srtp-target", json!({"to": "+15552223333", "mode": "blind"})).await.0, 202);
    let (invite, from) = human.ua.request("INVITE").await;
    assert_eq!(profile_of(&invite), "RTP/SAVP", "{invite}");
    let offered = crypto_of(&invite);
    assert!(!offered.is_empty(), "the node's key: {invite}");
    let key = CryptoAttr::generate(offered[0].tag(), offered[0].suite());
    let answer = human.sdp("RTP/SAVP", &[&key]);
    human.ua.send(&reply(&invite, "200 OK", human.ua.sip_addr(), Some(&answer)), from).await;
    human.ua.request("ACK").await;
    agent.expect("stop").await;
    let mut srtp = SrtpLeg::new(&key, &offered[0]).unwrap();

    stream(&caller.ua.rtp, sdp_rtp(&ok), |i| rtp(10 + i, 0x1111, fill(i))).await;
    let heard = collect(&human.ua.rtp, Duration::from_millis(500)).await;
    let decrypted: Vec<Vec<u8>> =
        heard.iter().map(|p| srtp.unprotect_rtp(p).expect("SRTP under the node's key")[12..].to_vec()).collect();
    assert_eq!(decrypted, (0..FRAMES).map(|i| vec![fill(i); 160]).collect::<Vec<_>>(), "the human hears the caller");
    stream(&human.ua.rtp, sdp_rtp(&invite), |i| srtp.protect_rtp(&rtp(40 + i, 0x2222, fill(i + 20))).unwrap().to_vec())
        .await;
    let heard: Vec<Vec<u8>> =
        collect(&caller.ua.rtp, Duration::from_millis(500)).await.iter().map(|p| p[12..].to_vec()).collect();
    assert_eq!(heard, (0..FRAMES).map(|i| vec![fill(i + 20); 160]).collect::<Vec<_>>(), "the caller hears the human");
    caller
        .ua
        .send(&caller_in_dialog("BYE", node.addr, caller.ua.sip_addr(), "srtp-target", &to_tag(&ok), 2), node.addr)
        .await;
    let (bye, from) = human.ua.request("BYE").await;
    human.ua.send(&reply(&bye, "200 OK", human.ua.sip_addr(), None), from).await;
    node.stop().await;
}
