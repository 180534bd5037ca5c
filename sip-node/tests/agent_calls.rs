//! A call to a DID whose destination is an AI agent over WebSocket: a caller on loopback (raw
//! SIP over UDP plus a real RTP stream) reaches a test agent speaking the Twilio Media Streams
//! protocol; the caller's audio arrives at the agent in order, the agent's audio comes back to
//! the caller's RTP port, its mark is echoed, and hanging up sends `stop`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use futures::{SinkExt as _, StreamExt as _};
use sqlx::PgPool;
use switchboard_model::{Codec, Destination, DestinationType};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// The test agent: records every JSON message; after `start` it sends 10 frames of 0x55 and a
/// mark.
async fn agent(listener: tokio::net::TcpListener, seen: mpsc::UnboundedSender<serde_json::Value>) {
    let (stream, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else { continue };
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let start = value["event"] == "start";
        let stream_sid = value["streamSid"].clone();
        let _ = seen.send(value);
        if start {
            let payload = base64::engine::general_purpose::STANDARD.encode([0x55u8; 1600]);
            let media = serde_json::json!({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}});
            ws.send(Message::Text(media.to_string().into())).await.unwrap();
            let mark = serde_json::json!({"event": "mark", "streamSid": stream_sid, "mark": {"name": "m1"}});
            ws.send(Message::Text(mark.to_string().into())).await.unwrap();
        }
    }
}

fn invite(node: SocketAddr, sip: SocketAddr, rtp: SocketAddr, branch: &str) -> String {
    let sdp = format!(
        "v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0 101\r\n\
         a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\na=sendrecv\r\n",
        rtp.port()
    );
    format!(
        "INVITE sip:{DID}@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {sip};branch={branch}\r\nFrom: <sip:+15557654321@{sip}>;tag=caller\r\n\
         To: <sip:{DID}@{node}>\r\nCall-ID: agent-call-1\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{sip}>\r\nMax-Forwards: 70\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

fn in_dialog(method: &str, cseq: u32, node: SocketAddr, sip: SocketAddr, to_tag: &str) -> String {
    format!(
        "{method} sip:{node} SIP/2.0\r\nVia: SIP/2.0/UDP {sip};branch=z9hG4bK{method}{cseq}\r\nFrom: <sip:+15557654321@{sip}>;tag=caller\r\n\
         To: <sip:{DID}@{node}>;tag={to_tag}\r\nCall-ID: agent-call-1\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Reads SIP responses until one with a final status; returns its text.
async fn final_response(socket: &UdpSocket) -> String {
    let mut buf = vec![0u8; 8192];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
            .await
            .expect("no response")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if !text.starts_with("SIP/2.0 1") {
            return text;
        }
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_caller_talks_to_an_ai_agent_over_websocket(pool: PgPool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(agent(listener, seen_tx));

    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent];
    let destination = Destination {
        kind: DestinationType::Websocket,
        url: Some(url),
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: None,
    };
    let node = Node::start(&pool, vec![carrier], vec![number_to(destination)]).await;

    let sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (sip_addr, rtp_addr) = (sip.local_addr().unwrap(), rtp.local_addr().unwrap());
    sip.send_to(invite(node.addr, sip_addr, rtp_addr, "z9hG4bKinvite1").as_bytes(), node.addr).await.unwrap();
    let ok = final_response(&sip).await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let to_tag =
        ok.lines().find(|l| l.starts_with("To:")).and_then(|l| l.split("tag=").nth(1)).unwrap().trim().to_string();
    let media_port: u16 = ok
        .lines()
        .find(|l| l.starts_with("m=audio"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(ok.contains("c=IN IP4 127.0.0.1"), "the node anchors media on its own address: {ok}");
    let mut ack = in_dialog("ACK", 1, node.addr, sip_addr, &to_tag);
    ack = ack.replace("z9hG4bKACK1", "z9hG4bKack2xx");
    sip.send_to(ack.as_bytes(), node.addr).await.unwrap();

    // 25 frames of caller audio, 20 ms apart; the payload's bytes carry the frame number.
    let node_rtp: SocketAddr = format!("127.0.0.1:{media_port}").parse().unwrap();
    let sender = tokio::spawn(async move {
        for i in 0u16..25 {
            let mut packet = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78];
            packet[2..4].copy_from_slice(&(1000 + i).to_be_bytes());
            packet[4..8].copy_from_slice(&(u32::from(i) * 160).to_be_bytes());
            packet.extend(std::iter::repeat_n(i as u8, 160));
            rtp.send_to(&packet, node_rtp).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Then collect what the agent says, as the caller hears it.
        let mut heard = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(3);
        while heard.len() < 10 && Instant::now() < deadline {
            if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(500), rtp.recv_from(&mut buf)).await {
                heard.push(buf[12..n].to_vec());
            }
        }
        heard
    });
    let heard = sender.await.unwrap();
    assert!(heard.len() >= 10, "the agent's audio must reach the caller: {} frames", heard.len());
    assert!(heard.iter().all(|frame| frame.len() == 160 && frame.iter().all(|b| *b == 0x55)));

    sip.send_to(in_dialog("BYE", 2, node.addr, sip_addr, &to_tag).as_bytes(), node.addr).await.unwrap();
    let bye_ok = final_response(&sip).await;
    assert!(bye_ok.starts_with("SIP/2.0 200"), "{bye_ok}");

    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !events.iter().any(|e: &serde_json::Value| e["event"] == "stop") && Instant::now() < deadline {
        if let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), seen.recv()).await {
            events.push(event);
        }
    }
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"connected"), "{kinds:?}");
    assert_eq!(kinds.get(1), Some(&"start"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"stop"), "{kinds:?}");
    let start = &events[1]["start"];
    assert_eq!(start["customParameters"]["to"], DID, "{start}");
    assert_eq!(start["mediaFormat"]["encoding"], "audio/x-mulaw");
    // The caller's frames arrive complete and in order.
    let frames: Vec<Vec<u8>> = events
        .iter()
        .filter(|e| e["event"] == "media")
        .map(|e| base64::engine::general_purpose::STANDARD.decode(e["media"]["payload"].as_str().unwrap()).unwrap())
        .collect();
    assert!(frames.len() >= 20, "{} caller frames reached the agent", frames.len());
    let firsts: Vec<u8> = frames.iter().map(|f| f[0]).collect();
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "caller audio out of order: {firsts:?}");
    assert!(frames.iter().all(|f| f.len() == 160 && f.iter().all(|b| *b == f[0])));
    assert!(kinds.contains(&"mark"), "the mark must come back after its audio: {kinds:?}");

    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.hangup_by.clone()).as_deref(), Some("caller"), "{cdrs:?}");
    assert!(cdrs.last().is_some_and(|c| c.answer_at.is_some()));
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_agent_that_is_not_there_gets_the_caller_a_503(pool: PgPool) {
    let closed = free_port("127.0.0.1");
    let url = format!("ws://127.0.0.1:{closed}/agent");
    let destination = Destination {
        kind: DestinationType::Websocket,
        url: Some(url),
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: None,
    };
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(destination)]).await;
    let uac = uac(&["-sf", &scenario("uac_expect_503.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "an unreachable agent must answer the caller 503");
    let cdrs = cdrs(&pool, 1).await;
    assert!(cdrs.last().and_then(|c| c.sip_code) == Some(503), "{cdrs:?}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn no_common_codec_is_488(pool: PgPool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![Codec::Pcma];
    let destination = Destination {
        kind: DestinationType::Websocket,
        url: Some(url),
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: None,
    };
    let node = Node::start(&pool, vec![carrier], vec![number_to(destination)]).await;
    // The scenario offers PCMU only.
    let uac = uac(&["-sf", &scenario("uac_expect_488.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "an offer without a common codec must get 488");
    node.stop().await;
}
