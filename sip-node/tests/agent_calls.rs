//! Calls to a DID whose destination is an AI agent over WebSocket: a caller on loopback (raw
//! SIP over UDP plus a real RTP stream) reaches a test agent speaking the Twilio Media Streams
//! protocol (tokio-tungstenite). Covered: the caller's audio reaches the agent complete and in
//! order, the agent's audio comes back paced at 20 ms, `clear` cuts it, marks come back after
//! their audio, DTMF arrives once per key press, PCMA callers are transcoded, bad RTP and a
//! misbehaving agent do not break the call, an agent that leaves or never answers ends the call
//! with a reason in the CDR, `--agent-answer first-audio` rings until the agent speaks, and no
//! call leaves an RTP port, an active-call row or a missing CDR behind.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::agent::*;
use common::*;
use serde_json::json;
use sqlx::PgPool;
use switchboard_model::{Codec, Destination, DestinationType};
use switchboard_node::bridge::answer::AgentAnswer;
use switchboard_node::media::g711;
use switchboard_node::media::rtp::{RtpPacket, TelephoneEvent};
use tokio::net::{TcpListener, UdpSocket};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

// The test agent, the webhook receiver and the REST API are in `common/agent.rs`.

fn websocket(url: &str) -> Destination {
    Destination {
        kind: DestinationType::Websocket,
        url: Some(url.to_string()),
        uri: None,
        number: None,
        trunk_ref: None,
        reject_code: None,
    }
}

fn carrier() -> switchboard_model::TrunkConfig {
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent];
    carrier
}

/// A carrier that takes REFER for transfers (`transfer: refer` on its Trunk).
fn referring_carrier() -> switchboard_model::TrunkConfig {
    let mut carrier = carrier();
    carrier.transfer = switchboard_model::TransferMode::Refer;
    carrier
}

// --- the caller ---

/// A raw SIP + RTP caller.
struct Caller {
    sip: UdpSocket,
    rtp: UdpSocket,
    node: SocketAddr,
    call_id: String,
    to_tag: String,
    node_rtp: Option<SocketAddr>,
    seq: u16,
    ts: u32,
    cseq: u32,
    /// The caller's audio payload type: 0 (PCMU) or 8 (PCMA).
    payload_type: u8,
}

impl Caller {
    async fn new(node: SocketAddr, call_id: &str, payload_type: u8) -> Caller {
        Caller {
            sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            node,
            call_id: call_id.into(),
            to_tag: String::new(),
            node_rtp: None,
            seq: 1000,
            ts: 0,
            cseq: 1,
            payload_type,
        }
    }

    fn sip_addr(&self) -> SocketAddr {
        self.sip.local_addr().unwrap()
    }

    async fn send_sip(&self, text: &str) {
        self.sip.send_to(text.as_bytes(), self.node).await.unwrap();
    }

    /// The caller's SDP (its offer, or its answer in the ACK of a delayed offer).
    fn sdp(&self) -> String {
        let (pt, name) = if self.payload_type == 8 { (8, "PCMA") } else { (0, "PCMU") };
        format!(
            "v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP {pt} 101\r\n\
             a=rtpmap:{pt} {name}/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n",
            self.rtp.local_addr().unwrap().port()
        )
    }

    async fn invite(&self) {
        self.send_invite(&self.sdp()).await;
    }

    /// An INVITE with `sdp` as its body (empty: a delayed offer).
    async fn send_invite(&self, sdp: &str) {
        let (node, sip) = (self.node, self.sip_addr());
        let content_type = if sdp.is_empty() { "" } else { "Content-Type: application/sdp\r\n" };
        let invite = format!(
            "INVITE sip:{DID}@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {sip};branch=z9hG4bK-{}-inv\r\nFrom: <sip:+15557654321@{sip}>;tag=caller\r\n\
             To: <sip:{DID}@{node}>\r\nCall-ID: {}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{sip}>\r\nMax-Forwards: 70\r\n\
             {content_type}Content-Length: {}\r\n\r\n{sdp}",
            self.call_id,
            self.call_id,
            sdp.len()
        );
        self.send_sip(&invite).await;
    }

    /// The next SIP message (request or response), within `WAIT`.
    async fn next_sip(&self) -> String {
        let mut buf = vec![0u8; 8192];
        let (n, _) = tokio::time::timeout(WAIT, self.sip.recv_from(&mut buf)).await.expect("no SIP message").unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    }

    /// Reads until a final response to the INVITE; returns it and the provisional codes seen.
    async fn final_response(&self) -> (String, Vec<u16>) {
        let mut provisional = vec![];
        loop {
            let text = self.next_sip().await;
            let code: u16 = text.get(8..11).and_then(|c| c.parse().ok()).unwrap_or(0);
            if (100..200).contains(&code) {
                provisional.push(code);
            } else if code >= 200 {
                return (text, provisional);
            }
        }
    }

    /// Takes the 200 OK's tag and media address, and ACKs it.
    async fn accept(&mut self, ok: &str) {
        assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
        self.to_tag = header(ok, "To").and_then(|l| l.split("tag=").nth(1)).unwrap().trim().to_string();
        let port: u16 = ok
            .lines()
            .find(|l| l.starts_with("m=audio"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        assert!(ok.contains("c=IN IP4 127.0.0.1"), "the node anchors media on its own address: {ok}");
        self.node_rtp = Some(format!("127.0.0.1:{port}").parse().unwrap());
        let ack = self.in_dialog("ACK", 1);
        self.send_sip(&ack).await;
    }

    /// Like [`Caller::accept`] for a delayed offer: the 200 OK holds the node's offer and the
    /// ACK carries the caller's answer.
    async fn accept_offer(&mut self, ok: &str) {
        assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
        assert!(ok.contains("c=IN IP4 127.0.0.1") && ok.contains("m=audio"), "the node offers in its 200 OK: {ok}");
        self.to_tag = header(ok, "To").and_then(|l| l.split("tag=").nth(1)).unwrap().trim().to_string();
        let port: u16 = ok
            .lines()
            .find(|l| l.starts_with("m=audio"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        self.node_rtp = Some(format!("127.0.0.1:{port}").parse().unwrap());
        let answer = self.sdp();
        let ack = self.in_dialog("ACK", 1).replace(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{answer}", answer.len()),
        );
        self.send_sip(&ack).await;
    }

    fn in_dialog(&self, method: &str, cseq: u32) -> String {
        let (node, sip) = (self.node, self.sip_addr());
        format!(
            "{method} sip:{node} SIP/2.0\r\nVia: SIP/2.0/UDP {sip};branch=z9hG4bK-{}-{method}{cseq}\r\nFrom: <sip:+15557654321@{sip}>;tag=caller\r\n\
             To: <sip:{DID}@{node}>;tag={}\r\nCall-ID: {}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            self.call_id, self.to_tag, self.call_id
        )
    }

    /// Calls and ACKs the answer.
    async fn call(&mut self) {
        self.invite().await;
        let (ok, _) = self.final_response().await;
        self.accept(&ok).await;
    }

    async fn hang_up(&mut self) {
        self.cseq += 1;
        let bye = self.in_dialog("BYE", self.cseq);
        self.send_sip(&bye).await;
        loop {
            let text = self.next_sip().await;
            if text.starts_with("SIP/2.0 ") && text.contains(" BYE\r\n") {
                assert!(text.starts_with("SIP/2.0 200"), "{text}");
                return;
            }
        }
    }

    /// Waits for the node's BYE and answers it; returns it.
    async fn expect_bye(&self) -> String {
        loop {
            let text = self.next_sip().await;
            if text.starts_with("BYE ") {
                let mut ok = String::from("SIP/2.0 200 OK\r\n");
                for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
                    for line in text.lines().filter(|l| l.split(':').next() == Some(name)) {
                        ok.push_str(line);
                        ok.push_str("\r\n");
                    }
                }
                ok.push_str("Content-Length: 0\r\n\r\n");
                self.send_sip(&ok).await;
                return text;
            }
        }
    }

    fn packet(&mut self, payload_type: u8, marker: bool, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x80, payload_type | if marker { 0x80 } else { 0 }];
        packet.extend_from_slice(&self.seq.to_be_bytes());
        packet.extend_from_slice(&self.ts.to_be_bytes());
        packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        packet.extend_from_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        packet
    }

    /// One 20 ms audio frame in the caller's codec.
    async fn send_audio(&mut self, payload: &[u8]) {
        let packet = self.packet(self.payload_type, false, payload);
        self.ts = self.ts.wrapping_add(160);
        self.rtp.send_to(&packet, self.node_rtp.unwrap()).await.unwrap();
    }

    /// A key press as RFC 4733 sends it: three updates 20 ms apart, then the end packet and
    /// its two retransmissions, all with the event's start timestamp.
    async fn press(&mut self, event: u8) {
        for (i, end) in [false, false, false, true, true, true].into_iter().enumerate() {
            let duration = 160 * (i.min(3) as u16 + 1);
            let payload = TelephoneEvent { event, end, volume: 10, duration }.to_bytes();
            let packet = self.packet(101, i == 0, &payload);
            self.rtp.send_to(&packet, self.node_rtp.unwrap()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(if end { 5 } else { 20 })).await;
        }
        self.ts = self.ts.wrapping_add(160 * 5);
    }

    /// The next RTP packet from the node, with its arrival time.
    async fn hear(&self, within: Duration) -> Option<(Instant, u8, Vec<u8>)> {
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(within, self.rtp.recv_from(&mut buf)).await.ok()?.unwrap();
        assert_eq!(Some(from), self.node_rtp, "RTP comes from the port in the node's SDP");
        let packet = RtpPacket::parse(&buf[..n]).expect("the node sends valid RTP");
        Some((Instant::now(), packet.payload_type, packet.payload.to_vec()))
    }
}

fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find(|l| l.split(':').next().is_some_and(|n| n.eq_ignore_ascii_case(name)))
}

// --- checks every call ends with ---

async fn rtp_ports_in_use(node: &Node) -> f64 {
    metric(node, "switchboard_rtp_ports_in_use").await.expect("the node exports switchboard_rtp_ports_in_use")
}

/// The caller hangs up: the agent gets `stop`, the call leaves nothing behind (200 in its CDR),
/// and the node stops.
async fn hang_up_cleanly(caller: &mut Caller, agent: &mut Agent, pool: &PgPool, node: Node) {
    caller.hang_up().await;
    agent.expect("stop").await;
    assert_clean_end(pool, &node, 200).await;
    node.stop().await;
}

/// The call left nothing behind: its RTP ports are back, its active-call row is gone and its
/// CDR is written; returns the CDR's reason.
async fn assert_clean_end(pool: &PgPool, node: &Node, expected_code: i32) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let ports = rtp_ports_in_use(node).await;
        let active = active_calls(pool).await;
        let cdr: Option<(Option<i32>, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT sip_code, reason, hangup_by FROM cdrs ORDER BY end_at DESC LIMIT 1")
                .fetch_optional(pool)
                .await
                .unwrap();
        if ports == 0.0
            && active == 0
            && let Some((code, reason, _)) = &cdr
        {
            assert_eq!(*code, Some(expected_code), "{reason:?}");
            return reason.clone().unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "stuck call: ports {ports}, active_calls {active}, cdr {cdr:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tone(frequency: f64, samples: usize) -> Vec<i16> {
    (0..samples).map(|i| ((i as f64 * frequency * std::f64::consts::TAU / 8000.0).sin() * 8000.0) as i16).collect()
}

/// Two decoded signals are the same speech: each sample within G.711's quantisation (a
/// transcoded sample passes through both laws).
fn assert_close(sent: &[i16], got: &[i16]) {
    assert_eq!(sent.len(), got.len());
    for (i, (s, g)) in sent.iter().zip(got).enumerate() {
        let tolerance = i32::from(s.unsigned_abs()) / 8 + 40;
        assert!((i32::from(*s) - i32::from(*g)).abs() <= tolerance, "sample {i}: sent {s}, got {g}");
    }
}

// --- the tests ---

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_caller_talks_to_an_ai_agent_over_websocket(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let mut caller = Caller::new(node.addr, "agent-call-1", 0).await;
    caller.call().await;

    let (_, connected) = agent.expect("connected").await;
    assert_eq!(connected, json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
    let (_, start) = agent.expect("start").await;
    let stream_sid = start["streamSid"].as_str().unwrap().to_string();
    assert_eq!(start["start"]["customParameters"]["to"], DID, "{start}");
    assert_eq!(start["start"]["customParameters"]["from"], "+15557654321", "{start}");
    assert_eq!(start["start"]["customParameters"]["trunk"], "carrier", "{start}");
    assert_eq!(start["start"]["mediaFormat"], json!({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}));

    // 1. The caller's audio: 50 frames 20 ms apart, each frame's bytes carrying its number.
    for i in 0..50u8 {
        caller.send_audio(&[i; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut frames = vec![];
    while frames.len() < 50 {
        frames.push(agent.expect("media").await.1);
    }
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!(payload_of(frame), vec![i as u8; 160], "frame {i} complete and in order");
        assert_eq!(frame["media"]["chunk"], (i + 1).to_string());
        assert_eq!(frame["media"]["track"], "inbound");
        assert_eq!(frame["streamSid"], stream_sid.as_str());
    }
    let sequence: Vec<u64> = frames.iter().map(|f| f["sequenceNumber"].as_str().unwrap().parse().unwrap()).collect();
    assert!(sequence.windows(2).all(|w| w[1] == w[0] + 1), "{sequence:?}");

    // 2. The agent's audio: 25 distinct frames in one message, then a mark; the caller hears
    //    them in order, paced at 20 ms, and the mark comes back after the last one.
    let speech: Vec<u8> = (0..25u8).flat_map(|i| [0x80 | i; 160]).collect();
    agent.send_audio(&speech);
    agent.send_mark("greeting");
    let mut heard = vec![];
    while heard.len() < 25 {
        let (at, pt, payload) =
            caller.hear(Duration::from_secs(2)).await.expect("the agent's audio reaches the caller");
        assert_eq!(pt, 0);
        heard.push((at, payload));
    }
    for (i, (_, payload)) in heard.iter().enumerate() {
        assert_eq!(payload, &vec![0x80 | i as u8; 160], "agent frame {i}");
    }
    let gaps: Vec<f64> = heard.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1000.0).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!((17.0..=23.0).contains(&mean), "mean inter-arrival {mean:.2} ms: {gaps:?}");
    let (mark_at, mark) = agent.expect("mark").await;
    assert_eq!(mark["mark"]["name"], "greeting");
    assert!(mark_at >= heard.last().unwrap().0, "the mark came back before its audio had played");

    // 3. Barge-in: two seconds of audio and a mark, cleared after a few frames.
    agent.send_audio(&[0x33; 160 * 100]);
    agent.send_mark("long-answer");
    for _ in 0..5 {
        caller.hear(Duration::from_secs(2)).await.expect("the long answer starts");
    }
    agent.send(json!({"event": "clear", "streamSid": stream_sid}));
    let cleared_at = Instant::now();
    let (_, mark) = agent.expect("mark").await;
    assert_eq!(mark["mark"]["name"], "long-answer", "the cleared audio's mark is returned at once");
    let mut after = 0;
    while caller.hear(Duration::from_millis(300)).await.is_some() {
        after += 1;
        assert!(cleared_at.elapsed() < Duration::from_secs(1), "audio keeps coming after clear");
    }
    assert!(after <= 2, "{after} frames played after clear (at most the ones already on their way)");

    // 4. DTMF: three key presses, each with its end retransmissions, give three events.
    for event in [1u8, 5, 11] {
        caller.press(event).await;
    }
    let mut digits = vec![];
    for _ in 0..3 {
        let (_, dtmf) = agent.expect("dtmf").await;
        assert_eq!(dtmf["dtmf"]["track"], "inbound_track");
        digits.push(dtmf["dtmf"]["digit"].as_str().unwrap().to_string());
    }
    assert_eq!(digits, ["1", "5", "#"]);

    // 5. The caller hangs up: `stop` is the last message and the socket closes.
    caller.hang_up().await;
    agent.expect("stop").await;
    let (_, closed) = agent.expect("closed").await;
    assert_eq!(closed["event"], "closed");
    agent.drain();
    assert_eq!(agent.logged("dtmf").len(), 3, "one dtmf per key press");
    let stop_index = agent.log.iter().position(|(_, v)| v["event"] == "stop").unwrap();
    assert!(agent.log[stop_index + 1..].iter().all(|(_, v)| v["event"] == "closed"), "stop comes last");

    let reason = assert_clean_end(&pool, &node, 200).await;
    assert_eq!(reason, "caller hung up");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.hangup_by.clone()).as_deref(), Some("caller"), "{cdrs:?}");
    assert!(cdrs.last().is_some_and(|c| c.answer_at.is_some()));
    // The node measured the delay it added to the frames of the call, both ways.
    for direction in ["caller_to_agent", "agent_to_caller"] {
        let name = format!("switchboard_bridge_latency_seconds_count{{direction=\"{direction}\"}}");
        let frames = metric(&node, &name).await.unwrap_or_default();
        assert!(frames >= 10.0, "{name}: {frames}");
    }
    node.stop().await;
}

/// An A-law caller and a μ-law agent: a tone from the caller arrives at the agent as μ-law
/// with the same samples, and a tone from the agent is heard as A-law (payload type 8).
async fn alaw_tones_both_ways(caller: &mut Caller, agent: &mut Agent) {
    // Caller → agent: an A-law tone arrives as μ-law with the same samples.
    let sent = tone(440.0, 160 * 5);
    for chunk in sent.chunks(160) {
        let mut alaw = vec![];
        g711::encode_alaw_samples(chunk, &mut alaw);
        caller.send_audio(&alaw).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = vec![];
    for _ in 0..5 {
        g711::decode_ulaw(&payload_of(&agent.expect("media").await.1), &mut got);
    }
    assert_close(&sent, &got);

    // Agent → caller: a μ-law tone is heard as A-law (payload type 8) with the same samples.
    let spoken = tone(300.0, 160 * 5);
    let mut ulaw = vec![];
    g711::encode_ulaw_samples(&spoken, &mut ulaw);
    agent.send_audio(&ulaw);
    let mut heard = vec![];
    for _ in 0..5 {
        let (_, pt, payload) = caller.hear(Duration::from_secs(2)).await.expect("agent audio");
        assert_eq!(pt, 8);
        g711::decode_alaw(&payload, &mut heard);
    }
    assert_close(&spoken, &heard);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_delayed_offer_caller_answers_in_its_ack_and_talks_to_the_agent(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    // The caller answers the node's offer with PCMA (offered second): the relay transcodes.
    let mut caller = Caller::new(node.addr, "agent-call-delayed", 8).await;
    caller.send_invite("").await;
    let (ok, _) = caller.final_response().await;
    assert!(ok.contains("a=rtpmap:0 PCMU/8000") && ok.contains("a=rtpmap:8 PCMA/8000"), "the trunk's codecs: {ok}");
    caller.accept_offer(&ok).await;
    agent.expect("start").await;
    // The answer's codec applies once the node has read the ACK; RTP racing ahead of it in
    // another codec than the node's first is dropped (counted), like any unexpected payload.
    tokio::time::sleep(Duration::from_millis(50)).await;

    alaw_tones_both_ways(&mut caller, &mut agent).await;
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

/// A caller without session timers (no `Supported: timer`, no UPDATE in an `Allow`) on a call
/// to an AI agent: the node is the refresher (RFC 4028) and keeps the caller's leg alive with a
/// re-INVITE carrying the SDP of its 200 at half the 90 s interval; an UPDATE refresh would be
/// refused by such a caller and the call lost at expiry. Takes about 46 s (90 s is the smallest
/// interval the node's --session-expires takes).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_node_refreshes_an_agent_callers_session_with_a_reinvite_carrying_its_sdp(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start_tuned(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))], vec![], |args| {
        args.session.session_expires = 90;
        // The caller sends no RTP while it waits: the media timeout must not end the call first.
        args.media_timeout_seconds = 600;
    })
    .await;
    let mut caller = Caller::new(node.addr, "agent-call-refreshed", 0).await;
    caller.invite().await;
    let (ok, _) = caller.final_response().await;
    caller.accept(&ok).await;
    agent.expect("start").await;
    let media_line = |text: &str| text.lines().find(|l| l.starts_with("m=audio")).map(str::to_string);

    let deadline = Instant::now() + Duration::from_secs(70);
    let mut buf = vec![0u8; 8192];
    let refresh = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Ok((n, _))) = tokio::time::timeout(left, caller.sip.recv_from(&mut buf)).await else {
            panic!("no session refresh from the node within 70 s");
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(!text.starts_with("UPDATE "), "a caller that allows no UPDATE was refreshed with one: {text}");
        assert!(!text.starts_with("BYE "), "the node ended the call instead of refreshing it: {text}");
        if text.starts_with("INVITE ") {
            break text;
        }
    };
    assert_eq!(media_line(&refresh), media_line(&ok), "the refresh carries the SDP of the node's 200: {refresh}");
    let mut answer = String::from("SIP/2.0 200 OK\r\n");
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        for line in refresh.lines().filter(|l| l.split(':').next() == Some(name)) {
            answer.push_str(line);
            answer.push_str("\r\n");
        }
    }
    let sdp = caller.sdp();
    answer.push_str(&format!(
        "Contact: <sip:caller@{}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        caller.sip_addr(),
        sdp.len()
    ));
    caller.send_sip(&answer).await;
    // The call goes on after the refresh: the caller still reaches the agent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    caller.send_audio(&[0xff; 160]).await;
    agent.expect("media").await;
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_caller_at_30_ms_ptime_reaches_the_agent_in_20_ms_frames(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let mut caller = Caller::new(node.addr, "agent-call-ptime30", 0).await;
    caller.call().await;
    agent.expect("start").await;

    // Four 30 ms packets (240 bytes each) are six 20 ms frames for the agent, bytes in order.
    let sent: Vec<u8> = (0..4 * 240).map(|i| (i % 251) as u8).collect();
    for packet in sent.chunks(240) {
        caller.send_audio(packet).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut got = vec![];
    for _ in 0..6 {
        let payload = payload_of(&agent.expect("media").await.1);
        assert_eq!(payload.len(), 160, "the agent gets 20 ms frames");
        got.extend(payload);
    }
    assert_eq!(got, sent);

    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_pcma_caller_is_transcoded_to_and_from_mulaw(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let mut caller = Caller::new(node.addr, "agent-call-pcma", 8).await;
    caller.invite().await;
    let (ok, _) = caller.final_response().await;
    assert!(ok.contains("a=rtpmap:8 PCMA/8000"), "the node answers with the caller's codec: {ok}");
    caller.accept(&ok).await;
    agent.expect("start").await;

    alaw_tones_both_ways(&mut caller, &mut agent).await;
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn bad_rtp_and_a_misbehaving_agent_do_not_break_the_call(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let mut caller = Caller::new(node.addr, "agent-call-bad", 0).await;
    caller.call().await;
    agent.expect("start").await;
    let node_rtp = caller.node_rtp.unwrap();

    // The caller latches with a first frame; then garbage, truncated RTP (a header announcing
    // CSRCs it does not carry, a bare 5-byte header), RTCP-looking junk on the RTP port, and a
    // stranger's valid RTP — none of it may reach the agent.
    caller.send_audio(&[1; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), [1; 160]);
    for junk in [&b"hello"[..], &[0x8F, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0x80, 0, 0], &[0x40; 40], &[]] {
        caller.rtp.send_to(junk, node_rtp).await.unwrap();
    }
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut forged = vec![0x80, 0, 0x30, 0x39, 0, 0, 0, 0, 0xDE, 0xAD, 0xBE, 0xEF];
    forged.extend_from_slice(&[0xEE; 160]);
    stranger.send_to(&forged, node_rtp).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    caller.send_audio(&[2; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), [2; 160], "only the caller's next frame arrives");
    agent.drain();
    assert_eq!(agent.logged("media").len(), 2, "nothing from the junk or the stranger reached the agent");

    // The agent sends what it should not: invalid JSON, a non-base64 payload, a media without
    // payload, a binary frame, an unknown event, a 100 KiB message. All are ignored.
    agent.out.send(Message::text("{not json")).unwrap();
    agent.out.send(Message::text("")).unwrap();
    agent.send(json!({"event": "media", "media": {"payload": "%%% not base64 %%%"}}));
    agent.send(json!({"event": "media"}));
    agent.out.send(Message::binary(vec![0u8; 320])).unwrap();
    agent.send(json!({"event": "dance", "media": {"payload": BASE64.encode([0x44; 160])}}));
    agent.send_audio(&vec![0x45; 100 * 1024]);
    // Then good audio still plays.
    agent.send_audio(&[0x46; 160]);
    let (_, _, payload) = caller.hear(Duration::from_secs(2)).await.expect("the call survives bad agent messages");
    assert_eq!(payload, [0x46; 160], "only the valid frame is played");
    assert!(caller.hear(Duration::from_millis(200)).await.is_none(), "nothing else is played");

    // A frame beyond the hard limit breaks the connection: the node hangs up with BYE and the
    // CDR says why.
    agent.send_audio(&vec![0x47; 2 << 20]);
    caller.expect_bye().await;
    let reason = assert_clean_end(&pool, &node, 200).await;
    assert!(reason.starts_with("agent ended the call"), "{reason}");
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs.last().and_then(|c| c.hangup_by.clone()).as_deref(), Some("system"), "{cdrs:?}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_agent_that_closes_the_socket_ends_the_call_with_bye(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let mut caller = Caller::new(node.addr, "agent-call-close", 0).await;
    caller.call().await;
    agent.expect("start").await;
    agent
        .out
        .send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "conversation over".into() })))
        .unwrap();
    let bye = caller.expect_bye().await;
    assert!(bye.contains(&format!("Call-ID: {}", caller.call_id)), "{bye}");
    let reason = assert_clean_end(&pool, &node, 200).await;
    assert!(reason.contains("conversation over"), "{reason}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_agent_that_never_accepts_the_websocket_times_out_with_503(pool: PgPool) {
    // TCP is accepted, the upgrade never answered.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let node = Node::start_tuned(&pool, vec![carrier()], vec![number_to(websocket(&url))], vec![], |args| {
        args.agent.agent_connect_timeout_ms = 400;
    })
    .await;
    let caller = Caller::new(node.addr, "agent-call-silent", 0).await;
    let started = Instant::now();
    caller.invite().await;
    let (response, _) = caller.final_response().await;
    assert!(response.starts_with("SIP/2.0 503"), "{response}");
    assert!(started.elapsed() >= Duration::from_millis(350), "answered before the timeout");
    let reason = header(&response, "Reason").expect("a Reason header says why");
    assert!(reason.contains("did not connect"), "{reason}");
    let cdr_reason = assert_clean_end(&pool, &node, 503).await;
    assert!(cdr_reason.contains("did not connect"), "{cdr_reason}");
    hold.abort();
    node.stop().await;
}

/// `wss://`: an agent whose certificate a private CA signed is reached when the node trusts
/// that CA (`--agent-ca-file`): the preamble, the caller's audio and the agent's audio all go
/// through TLS.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_wss_agent_behind_a_private_ca_is_reached_with_agent_ca_file(pool: PgPool) {
    let mut agent = Agent::start_tls().await;
    assert!(agent.url.starts_with("wss://127.0.0.1:"), "{}", agent.url);
    let node = Node::start_tuned(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))], vec![], |args| {
        args.agent.agent_ca_file = Some(tls_fixture("ca.pem"));
    })
    .await;
    let mut caller = Caller::new(node.addr, "agent-call-wss", 0).await;
    caller.call().await;
    agent.expect("connected").await;
    let (_, start) = agent.expect("start").await;
    assert_eq!(start["start"]["customParameters"]["to"], DID, "{start}");
    for i in 0..5u8 {
        caller.send_audio(&[i; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..5u8 {
        assert_eq!(payload_of(&agent.expect("media").await.1), vec![i; 160], "caller frame {i} over TLS");
    }
    agent.send_audio(&[0x42; 160]);
    let (_, _, heard) = caller.hear(Duration::from_secs(2)).await.expect("the agent's audio reaches the caller");
    assert_eq!(heard, vec![0x42; 160]);
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

/// The same agent without `--agent-ca-file`: its certificate is not trusted, so the node
/// refuses the connection (verified, not merely encrypted) and the caller gets a 503 whose
/// CDR names the certificate problem.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_wss_agent_with_an_untrusted_certificate_gets_the_caller_a_503(pool: PgPool) {
    let mut agent = Agent::start_tls().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let caller = Caller::new(node.addr, "agent-call-wss-untrusted", 0).await;
    caller.invite().await;
    let (response, _) = caller.final_response().await;
    assert!(response.starts_with("SIP/2.0 503"), "{response}");
    let (_, refused) = agent.expect("tls-failed").await;
    assert!(refused["error"].as_str().is_some(), "{refused}");
    let reason = assert_clean_end(&pool, &node, 503).await;
    assert!(reason.contains("AI agent unreachable") && reason.to_lowercase().contains("certificate"), "{reason}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_agent_that_is_not_there_gets_the_caller_a_503(pool: PgPool) {
    let closed = free_port("127.0.0.1");
    let url = format!("ws://127.0.0.1:{closed}/agent");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(websocket(&url))]).await;
    let uac = uac(&["-sf", &scenario("uac_expect_503.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "an unreachable agent must answer the caller 503");
    let reason = assert_clean_end(&pool, &node, 503).await;
    assert!(reason.contains("AI agent unreachable"), "{reason}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn first_audio_rings_until_the_agent_speaks(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start_tuned(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))], vec![], |args| {
        args.agent.agent_answer = AgentAnswer::FirstAudio;
        args.agent.agent_answer_timeout_ms = 5000;
    })
    .await;
    let mut caller = Caller::new(node.addr, "agent-call-first-audio", 0).await;
    caller.invite().await;
    agent.expect("start").await;
    // The agent takes its time; the caller hears ringing meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let spoke_at = Instant::now();
    agent.send_audio(&[0x21; 160 * 3]);
    let (ok, provisional) = caller.final_response().await;
    let answered_at = Instant::now();
    assert!(provisional.contains(&180), "ringing first: {provisional:?}");
    assert!(answered_at >= spoke_at, "the 200 OK waited for the agent's audio");
    caller.accept(&ok).await;
    let mut frames = 0;
    while let Some((_, _, payload)) = caller.hear(Duration::from_millis(300)).await {
        assert_eq!(payload, [0x21; 160]);
        frames += 1;
    }
    assert_eq!(frames, 3, "the first words are not lost to the answer");
    caller.hang_up().await;
    agent.expect("stop").await;
    assert_clean_end(&pool, &node, 200).await;
    let ring: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT ring_at FROM cdrs").fetch_one(&pool).await.unwrap();
    assert!(ring.is_some(), "the CDR records the ringing");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn first_audio_answers_a_silent_agent_at_the_timeout(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start_tuned(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))], vec![], |args| {
        args.agent.agent_answer = AgentAnswer::FirstAudio;
        args.agent.agent_answer_timeout_ms = 300;
    })
    .await;
    let mut caller = Caller::new(node.addr, "agent-call-first-silent", 0).await;
    let started = Instant::now();
    caller.invite().await;
    let (ok, provisional) = caller.final_response().await;
    assert!(provisional.contains(&180), "{provisional:?}");
    assert!(started.elapsed() >= Duration::from_millis(280), "answered before the timeout");
    caller.accept(&ok).await;
    agent.expect("start").await;
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn first_audio_agent_leaving_while_ringing_is_503(pool: PgPool) {
    // The agent leaves before it spoke: 503 to the caller, the reason in the CDR.
    let mut agent = Agent::start().await;
    let node = Node::start_tuned(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))], vec![], |args| {
        args.agent.agent_answer = AgentAnswer::FirstAudio;
    })
    .await;
    let caller = Caller::new(node.addr, "agent-call-leaves", 0).await;
    caller.invite().await;
    agent.expect("start").await;
    agent.out.send(Message::Close(Some(CloseFrame { code: CloseCode::Away, reason: "busy".into() }))).unwrap();
    let (response, _) = caller.final_response().await;
    assert!(response.starts_with("SIP/2.0 503"), "{response}");
    let reason = assert_clean_end(&pool, &node, 503).await;
    assert!(reason.contains("before answering") && reason.contains("busy"), "{reason}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn no_common_codec_is_488(pool: PgPool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![Codec::Pcma];
    let node = Node::start(&pool, vec![carrier], vec![number_to(websocket(&url))]).await;
    // The scenario offers PCMU only.
    let uac = uac(&["-sf", &scenario("uac_expect_488.xml")], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "an offer without a common codec must get 488");
    assert_clean_end(&pool, &node, 488).await;
    node.stop().await;
}

/// At the drain limit the node ends a call to an agent itself: BYE to the caller (with a
/// `Reason`), `stop` to the agent, and the CDR says `node shutdown`.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_drain_limit_ends_an_agent_call_with_bye_and_stop(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let mut caller = Caller::new(node.addr, "agent-call-drain-limit", 0).await;
    caller.call().await;
    agent.expect("start").await;
    node.drain.end_calls();
    let bye = caller.expect_bye().await;
    assert!(bye.contains("node shutdown"), "{bye}");
    agent.expect("stop").await;
    let reason = assert_clean_end(&pool, &node, 200).await;
    assert_eq!(reason, "node shutdown");
    node.stop().await;
}

/// The caller's ACK is late: the node retransmits its 200 OK (RFC 3261 13.3.1.4) until the ACK
/// comes, counts every retransmission in `switchboard_sip_retransmissions_total` (like a
/// B2BUA call's), and the call goes on.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_late_ack_gets_the_answer_retransmitted_and_counted(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let before = metric(&node, "switchboard_sip_retransmissions_total").await.unwrap_or(0.0);
    let mut caller = Caller::new(node.addr, "agent-call-late-ack", 0).await;
    caller.invite().await;
    let (ok, _) = caller.final_response().await;
    agent.expect("start").await;
    // No ACK: the same 200 OK comes again.
    let again = loop {
        let text = caller.next_sip().await;
        if text.starts_with("SIP/2.0 200") {
            break text;
        }
    };
    assert_eq!(again, ok, "the retransmission is the 200 OK itself");
    let after = metric(&node, "switchboard_sip_retransmissions_total").await.unwrap_or(0.0);
    assert!(after > before, "the retransmission is counted: {before} -> {after}");
    caller.accept(&ok).await;
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

// --- transfers (POST /api/calls/{call_id}/transfer, as the API queues them) ---

/// A CDR of a transferred call: attempt, direction, to_number, answered, reason.
type CdrLeg = (i32, String, Option<String>, bool, Option<String>);

/// The carrier trunk, its gateway being the human the agent transfers to.
fn carrier_to(human: SocketAddr) -> switchboard_model::TrunkConfig {
    let mut carrier = trunk("carrier", vec![("127.0.0.1".into(), human.port())]);
    carrier.codecs = vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent];
    carrier
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_blind_transfer_bridges_the_caller_to_the_human_and_ends_the_agent_stream(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let node = Node::start(&pool, vec![carrier_to(human.sip_addr())], vec![number_to(websocket(&agent.url))]).await;
    let (webhook_url, hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-blind", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    assert_eq!(call_sid, "transfer-blind", "the callSid is the caller's Call-ID");

    // Before: the caller talks to the agent.
    caller.send_audio(&[0x11; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x11; 160]);

    let body = json!({"to": "+15552223333", "mode": "blind", "summary": "wants a refund\r\nX-Evil: 1",
                      "timeout_seconds": 20, "webhook_url": webhook_url});
    wait_for_active_row(&pool, &call_sid).await;
    let (status, accepted) = api.transfer(&call_sid, body).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!((accepted["status"].as_str(), accepted["call_id"].as_str()), (Some("accepted"), Some("transfer-blind")));

    // The node dials the human through the carrier trunk, with the caller's number.
    let (invite, from) = human.request("INVITE").await;
    assert!(invite.starts_with("INVITE sip:+15552223333@127.0.0.1"), "{invite}");
    assert!(ua::header(&invite, "From").is_some_and(|f| f.contains("+15557654321")), "{invite}");
    assert_eq!(ua::header(&invite, "X-Transfer-Summary"), Some("wants a refundX-Evil: 1"), "{invite}");
    assert!(ua::header(&invite, "X-Evil").is_none(), "no header injection: {invite}");
    let node_b_rtp = ua::sdp_rtp(&invite);
    assert_ne!(Some(node_b_rtp), caller.node_rtp, "the target's leg has a port of its own");
    // While the human's phone rings the caller is still with the agent.
    human.send(&ua::reply(&invite, "180 Ringing", human.sip_addr(), None), from).await;
    caller.send_audio(&[0x12; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x12; 160]);
    let answer = ua::sdp(human.rtp_port(), "0 101", "sendrecv");
    human.send(&ua::reply(&invite, "200 OK", human.sip_addr(), Some(&answer)), from).await;
    human.request("ACK").await;

    // The agent's stream ends: `stop`, then the socket closes.
    agent.expect("stop").await;
    agent.expect("closed").await;

    // The caller and the human hear each other, through the port the caller always used.
    let caller_says: Vec<Vec<u8>> = (0..10u8).map(|i| vec![0x40 | i; 160]).collect();
    let human_says: Vec<Vec<u8>> = (0..10u8).map(|i| vec![0xA0 | i; 160]).collect();
    for (i, (c, h)) in caller_says.iter().zip(&human_says).enumerate() {
        caller.send_audio(c).await;
        human.rtp_send(node_b_rtp, 0, 500 + i as u16, h).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard_by_human: Vec<Vec<u8>> =
        human.rtp_collect(Duration::from_millis(600)).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(heard_by_human, caller_says, "the human hears the caller");
    let mut heard_by_caller = vec![];
    while let Some((_, pt, payload)) = caller.hear(Duration::from_millis(300)).await {
        assert_eq!(pt, 0);
        heard_by_caller.push(payload);
    }
    assert_eq!(heard_by_caller, human_says, "the caller hears the human");

    // The caller hangs up: the human gets the BYE; nothing is left behind.
    caller.hang_up().await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    assert_clean_end(&pool, &node, 200).await;
    let legs: Vec<CdrLeg> = sqlx::query_as(
        "SELECT attempt, direction, to_number, answer_at IS NOT NULL, reason FROM cdrs
          WHERE call_uuid = (SELECT call_uuid FROM cdrs WHERE call_id = $1 AND attempt = 1) ORDER BY attempt",
    )
    .bind(&call_sid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(legs.len(), 2, "the caller's leg and the transfer's leg share the call's id: {legs:?}");
    assert_eq!((legs[0].0, legs[0].1.as_str(), legs[0].3), (1, "inbound", true), "{legs:?}");
    assert_eq!((legs[1].0, legs[1].1.as_str(), legs[1].3), (2, "outbound", true), "{legs:?}");
    assert_eq!(legs[1].2.as_deref(), Some("+15552223333"), "{legs:?}");
    assert!(legs[1].4.as_deref().is_some_and(|r| r.starts_with("transfer: caller hung up")), "{legs:?}");
    assert_eq!(
        statuses(&hooks, 3).await,
        ["transfer_started", "transfer_answered", "transfer_completed"],
        "{:?}",
        hooks.lock().unwrap()
    );
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_failed_transfer_returns_the_caller_to_the_agent(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let node = Node::start(&pool, vec![carrier_to(human.sip_addr())], vec![number_to(websocket(&agent.url))]).await;
    let (webhook_url, hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-busy", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();

    // A step of a warm transfer that is not there is refused by the node: 409 with its reason.
    wait_for_active_row(&pool, &call_sid).await;
    let (status, refused) = api.post(&format!("/api/calls/{call_sid}/transfer/cancel"), None).await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("no warm transfer")), "{refused}");

    let body = json!({"to": "+15552223333", "mode": "blind", "webhook_url": webhook_url});
    assert_eq!(api.transfer(&call_sid, body).await.0, 202);
    let (invite, from) = human.request("INVITE").await;
    human.send(&ua::reply(&invite, "486 Busy Here", human.sip_addr(), None), from).await;
    human.request("ACK").await;

    // The agent hears why, and the caller is still with it, both ways.
    let (_, failed) = agent.expect("transfer_failed").await;
    assert_eq!(failed["transfer"]["sipCode"], 486, "{failed}");
    assert_eq!(failed["transfer"]["to"], "+15552223333", "{failed}");
    assert_eq!(failed["streamSid"], start["streamSid"], "{failed}");
    caller.send_audio(&[0x21; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x21; 160], "the agent hears the caller");
    agent.send_audio(&[0x99; 160]);
    let (_, _, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears the agent");
    assert_eq!(payload, vec![0x99; 160]);
    assert_eq!(statuses(&hooks, 2).await, ["transfer_started", "transfer_failed"]);
    assert_eq!(hooks.lock().unwrap()[1]["sip_code"], 486);

    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
    let attempts: Vec<(i32, Option<i32>)> =
        sqlx::query_as("SELECT attempt, sip_code FROM cdrs WHERE call_id = $1 ORDER BY attempt")
            .bind(&call_sid)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, [(1, Some(200)), (2, Some(486))], "the failed transfer attempt has its CDR");
}

/// A test frame's id: every byte of it (a frame whose bytes differ is reported as 0).
fn frame_id(payload: &[u8]) -> u8 {
    match payload.first() {
        Some(first) if payload.len() == 160 && payload.iter().all(|b| b == first) => *first,
        _ => 0,
    }
}

/// The human answers a transfer's INVITE (180, then 200 with its SDP) and takes the ACK;
/// returns the INVITE and the node's RTP address for the human's leg.
async fn human_answers(human: &ua::Ua) -> (String, SocketAddr) {
    let (invite, from) = human.request("INVITE").await;
    human.send(&ua::reply(&invite, "180 Ringing", human.sip_addr(), None), from).await;
    let answer = ua::sdp(human.rtp_port(), "0 101", "sendrecv");
    human.send(&ua::reply(&invite, "200 OK", human.sip_addr(), Some(&answer)), from).await;
    human.request("ACK").await;
    let node_rtp = ua::sdp_rtp(&invite);
    (invite, node_rtp)
}

/// A warm transfer starts like a blind one, then the agent briefs the human (the caller on
/// hold hears nothing of it); on the agent's completion, caller and human are bridged.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_warm_transfer_lets_the_agent_brief_the_human_then_bridges_the_caller(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let node = Node::start(&pool, vec![carrier_to(human.sip_addr())], vec![number_to(websocket(&agent.url))]).await;
    let (webhook_url, hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-warm", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    // Completing before anything was started is refused.
    let (status, refused) = api.post(&format!("/api/calls/{call_sid}/transfer/complete"), None).await;
    assert_eq!(status, 409, "{refused}");

    let body = json!({"to": "+15552223333", "mode": "warm", "summary": "billing question", "webhook_url": webhook_url});
    assert_eq!(api.transfer(&call_sid, body).await.0, 202);
    let (invite, node_b_rtp) = human_answers(&human).await;
    assert_eq!(ua::header(&invite, "X-Transfer-Summary"), Some("billing question"), "{invite}");
    let (_, answered) = agent.expect("transfer_answered").await;
    assert_eq!(answered["transfer"]["to"], "+15552223333", "{answered}");

    // The consultation: the agent and the human hear each other; the caller hears nothing and
    // is not heard.
    let briefing: Vec<u8> = (0..10u8).flat_map(|i| [0x60 | i; 160]).collect();
    agent.send_audio(&briefing);
    for i in 0..10u8 {
        human.rtp_send(node_b_rtp, 0, 700 + u16::from(i), &[0xB0 | i; 160]).await;
        caller.send_audio(&[0x31; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard_by_human: Vec<Vec<u8>> =
        human.rtp_collect(Duration::from_millis(600)).await.into_iter().map(|(_, p)| p).collect();
    let expected: Vec<Vec<u8>> = (0..10u8).map(|i| vec![0x60 | i; 160]).collect();
    assert_eq!(heard_by_human, expected, "the human heard the agent's briefing, all of it, in order");
    let mut agent_heard = vec![];
    while agent_heard.len() < 10 {
        agent_heard.push(payload_of(&agent.expect("media").await.1));
    }
    let expected: Vec<Vec<u8>> = (0..10u8).map(|i| vec![0xB0 | i; 160]).collect();
    assert_eq!(agent_heard, expected, "the agent hears the human, not the caller on hold");
    assert!(
        caller.hear(Duration::from_millis(300)).await.is_none(),
        "the caller on hold hears nothing of the briefing"
    );

    // The agent completes: its stream ends, caller and human hear each other.
    let (status, done) = api.post(&format!("/api/calls/{call_sid}/transfer/complete"), None).await;
    assert_eq!((status, done["status"].as_str()), (200, Some("completed")), "{done}");
    agent.expect("stop").await;
    agent.expect("closed").await;
    for i in 0..10u8 {
        caller.send_audio(&[0x40 | i; 160]).await;
        human.rtp_send(node_b_rtp, 0, 800 + u16::from(i), &[0xA0 | i; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard_by_human: Vec<u8> =
        human.rtp_collect(Duration::from_millis(600)).await.into_iter().map(|(_, p)| frame_id(&p)).collect();
    assert_eq!(
        heard_by_human,
        (0..10u8).map(|i| 0x40 | i).collect::<Vec<_>>(),
        "the human hears the caller, not the hold"
    );
    let mut heard_by_caller = vec![];
    while let Some((_, _, payload)) = caller.hear(Duration::from_millis(300)).await {
        heard_by_caller.push(frame_id(&payload));
    }
    assert_eq!(heard_by_caller, (0..10u8).map(|i| 0xA0 | i).collect::<Vec<_>>(), "the caller hears the human");

    caller.hang_up().await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    assert_clean_end(&pool, &node, 200).await;
    assert_eq!(statuses(&hooks, 3).await, ["transfer_started", "transfer_answered", "transfer_completed"]);
    node.stop().await;
}

/// The agent calls a warm transfer off: the human is hung up and the caller is back with the
/// agent, both ways.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_cancelled_warm_transfer_hangs_up_the_human_and_returns_the_caller(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let node = Node::start(&pool, vec![carrier_to(human.sip_addr())], vec![number_to(websocket(&agent.url))]).await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-cancel", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    assert_eq!(api.transfer(&call_sid, json!({"to": "+15552223333", "mode": "warm"})).await.0, 202);
    human_answers(&human).await;
    agent.expect("transfer_answered").await;

    let (status, done) = api.post(&format!("/api/calls/{call_sid}/transfer/cancel"), None).await;
    assert_eq!((status, done["status"].as_str()), (200, Some("cancelled")), "{done}");
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    let (_, failed) = agent.expect("transfer_failed").await;
    assert!(failed["transfer"]["reason"].as_str().is_some_and(|r| r.contains("cancelled")), "{failed}");

    caller.send_audio(&[0x21; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x21; 160], "the agent hears the caller again");
    agent.send_audio(&[0x99; 160]);
    let (_, _, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears the agent again");
    assert_eq!(payload, vec![0x99; 160]);
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

impl Caller {
    /// Answers a request from the node with `status` (Via, From, To, Call-ID, CSeq copied).
    async fn respond(&self, request: &str, status: &str) {
        let mut response = format!("SIP/2.0 {status}\r\n");
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            for line in request.lines().filter(|l| l.split(':').next() == Some(name)) {
                response.push_str(line);
                response.push_str("\r\n");
            }
        }
        response.push_str("Content-Length: 0\r\n\r\n");
        self.send_sip(&response).await;
    }

    /// The carrier's NOTIFY of a REFER's progress; waits for the node's 200.
    async fn notify_refer(&mut self, frag: &str, state: &str) {
        self.cseq += 1;
        let body = format!("{frag}\r\n");
        let notify = self.in_dialog("NOTIFY", self.cseq).replace(
            "Content-Length: 0\r\n\r\n",
            &format!(
                "Event: refer\r\nSubscription-State: {state}\r\nContent-Type: message/sipfrag;version=2.0\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        self.send_sip(&notify).await;
        loop {
            let text = self.next_sip().await;
            if text.starts_with("SIP/2.0 ") && text.contains(" NOTIFY\r\n") {
                assert!(text.starts_with("SIP/2.0 200"), "{text}");
                return;
            }
        }
    }

    /// Waits for the node's REFER; returns it.
    async fn expect_refer(&self) -> String {
        loop {
            let text = self.next_sip().await;
            if text.starts_with("REFER ") {
                return text;
            }
        }
    }
}

/// `mode: refer`: the node asks the caller's carrier (here the caller itself) to call the
/// target, follows the NOTIFYs to the final 200, then hangs up its leg and ends the agent's
/// stream; the call's CDR says it was transferred.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_refer_transfer_hands_the_caller_to_the_carrier(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![referring_carrier()], vec![number_to(websocket(&agent.url))]).await;
    let (webhook_url, hooks) = webhook_receiver().await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-refer", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    let body = json!({"to": "+15552223333", "mode": "refer", "webhook_url": webhook_url});
    assert_eq!(api.transfer(&call_sid, body).await.0, 202);

    let refer = caller.expect_refer().await;
    let refer_to = header(&refer, "Refer-To").unwrap_or_default();
    assert!(refer_to.contains("sip:+15552223333@127.0.0.1"), "{refer}");
    assert!(header(&refer, "Referred-By").is_some_and(|r| r.contains(DID)), "{refer}");
    caller.respond(&refer, "202 Accepted").await;
    caller.notify_refer("SIP/2.0 100 Trying", "active;expires=60").await;
    // Still with the agent while the carrier calls the target.
    caller.send_audio(&[0x51; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x51; 160]);
    caller.notify_refer("SIP/2.0 200 OK", "terminated;reason=noresource").await;

    // Transferred: the node hangs up its leg, the agent's stream ends.
    caller.expect_bye().await;
    agent.expect("stop").await;
    let reason = assert_clean_end(&pool, &node, 200).await;
    assert!(reason.contains("transferred by REFER to +15552223333"), "{reason}");
    assert_eq!(statuses(&hooks, 3).await, ["transfer_started", "transfer_answered", "transfer_completed"]);
    node.stop().await;
}

/// `mode: refer` on a call whose trunk does not take REFER (`transfer` is `none`, the
/// default) is refused with 409 naming the field; no REFER is sent and the caller stays with
/// the agent.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_refer_transfer_on_a_trunk_without_refer_is_refused(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-refer-off", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    let (status, refused) = api.transfer(&call_sid, json!({"to": "+15552223333", "mode": "refer"})).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "not_transferable", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("transfer: refer") && message.contains("default/carrier"), "{refused}");
    caller.send_audio(&[0x53; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x53; 160], "the agent still hears the caller");
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

/// A referral the carrier reports as failed leaves the caller with the agent.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_failed_refer_transfer_returns_the_caller_to_the_agent(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![referring_carrier()], vec![number_to(websocket(&agent.url))]).await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-refer-busy", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    assert_eq!(api.transfer(&call_sid, json!({"to": "+15552223333", "mode": "refer"})).await.0, 202);
    let refer = caller.expect_refer().await;
    caller.respond(&refer, "202 Accepted").await;
    caller.notify_refer("SIP/2.0 486 Busy Here", "terminated;reason=noresource").await;
    let (_, failed) = agent.expect("transfer_failed").await;
    assert_eq!(failed["transfer"]["sipCode"], 486, "{failed}");
    caller.send_audio(&[0x52; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x52; 160], "the agent hears the caller");
    agent.send_audio(&[0x98; 160]);
    let (_, _, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears the agent");
    assert_eq!(payload, vec![0x98; 160]);
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

/// With `--transfer-hold-audio`, the caller on hold during a warm transfer hears the file in a
/// loop (from the port it always used), and not the briefing; after a cancel the agent again.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_caller_on_hold_hears_the_hold_audio_during_a_warm_transfer(pool: PgPool) {
    let hold = tempfile::NamedTempFile::new().unwrap();
    let audio: Vec<u8> = [[0x2A; 160], [0x2B; 160]].concat();
    std::fs::write(hold.path(), &audio).unwrap();
    let path = hold.path().to_path_buf();
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let trunks = vec![carrier_to(human.sip_addr())];
    let numbers = vec![number_to(websocket(&agent.url))];
    let node =
        Node::start_tuned(&pool, trunks, numbers, vec![], |args| args.agent.transfer_hold_audio = Some(path)).await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-hold", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    assert_eq!(api.transfer(&call_sid, json!({"to": "+15552223333", "mode": "warm"})).await.0, 202);
    human_answers(&human).await;
    agent.expect("transfer_answered").await;
    agent.send_audio(&[0x66; 160 * 10]);

    let mut held = vec![];
    while held.len() < 10 {
        let (_, pt, payload) =
            caller.hear(Duration::from_secs(2)).await.expect("the caller on hold hears the hold audio");
        assert_eq!(pt, 0);
        held.push(frame_id(&payload));
    }
    assert!(held.iter().all(|id| *id == 0x2A || *id == 0x2B), "only the hold audio, not the briefing: {held:x?}");
    assert!(held.windows(2).all(|w| w[0] != w[1]), "the file's frames in turn: {held:x?}");

    let (status, _) = api.post(&format!("/api/calls/{call_sid}/transfer/cancel"), None).await;
    assert_eq!(status, 200);
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    agent.expect("transfer_failed").await;
    // The hold audio stops; what the agent says reaches the caller again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while caller.hear(Duration::from_millis(50)).await.is_some() {}
    agent.send_audio(&[0x97; 160]);
    let (_, _, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears the agent again");
    assert_eq!(frame_id(&payload), 0x97);
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

/// With `--transfer-ringback` and a hold-audio file, the caller of a blind transfer hears the
/// file (not the agent) while the target rings; when the target is busy, the caller is back
/// with the agent, both ways.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_blind_transfer_with_ringback_plays_the_hold_audio_while_ringing_and_returns_the_caller(pool: PgPool) {
    let hold = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(hold.path(), [[0x2A; 160], [0x2B; 160]].concat()).unwrap();
    let path = hold.path().to_path_buf();
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let trunks = vec![carrier_to(human.sip_addr())];
    let numbers = vec![number_to(websocket(&agent.url))];
    let node = Node::start_tuned(&pool, trunks, numbers, vec![], |args| {
        args.agent.transfer_hold_audio = Some(path);
        args.agent.transfer_ringback = true;
    })
    .await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-ringback", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    assert_eq!(api.transfer(&call_sid, json!({"to": "+15552223333", "mode": "blind"})).await.0, 202);
    let (invite, from) = human.request("INVITE").await;
    human.send(&ua::reply(&invite, "180 Ringing", human.sip_addr(), None), from).await;
    agent.send_audio(&[0x66; 160 * 10]);
    let mut heard = vec![];
    while heard.len() < 10 {
        let (_, pt, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears the hold audio");
        assert_eq!(pt, 0);
        heard.push(frame_id(&payload));
    }
    assert!(heard.iter().all(|id| *id == 0x2A || *id == 0x2B), "the hold audio, not the agent: {heard:x?}");
    assert!(heard.windows(2).all(|w| w[0] != w[1]), "the file's frames in turn: {heard:x?}");

    human.send(&ua::reply(&invite, "486 Busy Here", human.sip_addr(), None), from).await;
    human.request("ACK").await;
    let (_, failed) = agent.expect("transfer_failed").await;
    assert_eq!(failed["transfer"]["sipCode"], 486, "{failed}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    while caller.hear(Duration::from_millis(50)).await.is_some() {}
    caller.send_audio(&[0x23; 160]).await;
    assert_eq!(payload_of(&agent.expect("media").await.1), vec![0x23; 160], "the agent hears the caller again");
    agent.send_audio(&[0x96; 160]);
    let (_, _, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears the agent again");
    assert_eq!(frame_id(&payload), 0x96);
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
}

/// With `--transfer-ringback` and no hold-audio file, the caller of a blind transfer hears a
/// ringback tone (not silence, not the agent) while the target rings, then the target.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_blind_transfer_with_ringback_plays_a_tone_then_bridges_the_target(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let trunks = vec![carrier_to(human.sip_addr())];
    let numbers = vec![number_to(websocket(&agent.url))];
    let node = Node::start_tuned(&pool, trunks, numbers, vec![], |args| args.agent.transfer_ringback = true).await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-ringback-tone", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    assert_eq!(api.transfer(&call_sid, json!({"to": "+15552223333", "mode": "blind"})).await.0, 202);
    let (invite, from) = human.request("INVITE").await;
    human.send(&ua::reply(&invite, "180 Ringing", human.sip_addr(), None), from).await;
    agent.send_audio(&[0x66; 160 * 10]);
    for _ in 0..10 {
        let (_, pt, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears ringback");
        assert_eq!((pt, payload.len()), (0, 160));
        assert!(!payload.contains(&0x66), "not the agent: {payload:x?}");
        // μ-law silence is 0xFF (or 0x7F): a tone varies over a 20 ms frame.
        let levels: std::collections::HashSet<u8> = payload.iter().copied().collect();
        assert!(levels.len() > 8, "a tone, not silence: {payload:x?}");
    }
    let node_b_rtp = ua::sdp_rtp(&invite);
    let answer = ua::sdp(human.rtp_port(), "0 101", "sendrecv");
    human.send(&ua::reply(&invite, "200 OK", human.sip_addr(), Some(&answer)), from).await;
    human.request("ACK").await;
    agent.expect("stop").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    while caller.hear(Duration::from_millis(50)).await.is_some() {}
    human.rtp_send(node_b_rtp, 0, 700, &[0xA7; 160]).await;
    let (_, _, payload) = caller.hear(Duration::from_secs(2)).await.expect("the caller hears the target");
    assert_eq!(payload, vec![0xA7; 160]);
    caller.send_audio(&[0x47; 160]).await;
    let heard: Vec<Vec<u8>> = human.rtp_collect(Duration::from_millis(600)).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(heard, [vec![0x47; 160]], "the target hears the caller");
    caller.hang_up().await;
    let (bye, from) = human.request("BYE").await;
    human.send(&ua::reply(&bye, "200 OK", human.sip_addr(), None), from).await;
    assert_clean_end(&pool, &node, 200).await;
    node.stop().await;
}

/// A caller who hangs up while hearing ringback: the target's INVITE is cancelled, the agent
/// gets `stop`, and nothing is left behind (the caller's leg in the player and the placeholder
/// leg in the agent's bridge give their ports back).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_caller_hanging_up_during_ringback_leaves_nothing_behind(pool: PgPool) {
    let mut agent = Agent::start().await;
    let human = ua::Ua::new().await;
    let trunks = vec![carrier_to(human.sip_addr())];
    let numbers = vec![number_to(websocket(&agent.url))];
    let node = Node::start_tuned(&pool, trunks, numbers, vec![], |args| args.agent.transfer_ringback = true).await;
    let api = RestApi::start(&pool).await;
    let mut caller = Caller::new(node.addr, "transfer-ringback-bye", 0).await;
    caller.call().await;
    let (_, start) = agent.expect("start").await;
    let call_sid = start["start"]["callSid"].as_str().unwrap().to_string();
    wait_for_active_row(&pool, &call_sid).await;
    assert_eq!(api.transfer(&call_sid, json!({"to": "+15552223333", "mode": "blind"})).await.0, 202);
    let (invite, from) = human.request("INVITE").await;
    human.send(&ua::reply(&invite, "180 Ringing", human.sip_addr(), None), from).await;
    caller.hear(Duration::from_secs(2)).await.expect("the caller hears ringback");
    caller.hang_up().await;
    let (cancel, from) = human.request("CANCEL").await;
    human.send(&ua::reply(&cancel, "200 OK", human.sip_addr(), None), from).await;
    human.send(&ua::reply(&invite, "487 Request Terminated", human.sip_addr(), None), from).await;
    agent.expect("stop").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (ports, active) = (rtp_ports_in_use(&node).await, active_calls(&pool).await);
        if ports == 0.0 && active == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: ports {ports}, active_calls {active}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

/// DTMF by SIP INFO from the caller of an agent call (carriers that send key presses as INFO,
/// issue 24): `application/dtmf-relay` and `application/dtmf` bodies are answered 200 and
/// reach the agent as `dtmf` messages, like RFC 4733 key presses; a garbage body gets 400 with
/// no `dtmf` for the agent, and the call goes on (the agent still hears the caller).
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn info_dtmf_reaches_the_agent_as_dtmf_events(pool: PgPool) {
    let mut agent = Agent::start().await;
    let node = Node::start(&pool, vec![carrier()], vec![number_to(websocket(&agent.url))]).await;
    let mut caller = Caller::new(node.addr, "agent-call-info-dtmf", 0).await;
    caller.call().await;
    agent.expect("start").await;
    let mut codes = vec![];
    for (content_type, body) in [
        ("application/dtmf-relay", "Signal=7\r\nDuration=160\r\n"),
        ("application/dtmf-relay", "Signal=pizza\r\n"),
        ("application/dtmf", "*"),
    ] {
        caller.cseq += 1;
        let request = caller.in_dialog("INFO", caller.cseq).replace(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        );
        caller.send_sip(&request).await;
        let response = loop {
            let text = caller.next_sip().await;
            if text.starts_with("SIP/2.0 ") && text.contains(" INFO\r\n") {
                break text;
            }
        };
        codes.push(response.get(8..11).unwrap_or_default().to_string());
    }
    assert_eq!(codes, ["200", "400", "200"], "key, garbage, key");
    let mut digits = vec![];
    for _ in 0..2 {
        let (_, dtmf) = agent.expect("dtmf").await;
        assert_eq!(dtmf["dtmf"]["track"], "inbound_track");
        digits.push(dtmf["dtmf"]["digit"].as_str().unwrap().to_string());
    }
    assert_eq!(digits, ["7", "*"]);
    // The call survived the garbage: the caller's audio still reaches the agent.
    caller.send_audio(&[0x42; 160]).await;
    let (_, media) = agent.expect("media").await;
    assert_eq!(payload_of(&media), vec![0x42; 160]);
    hang_up_cleanly(&mut caller, &mut agent, &pool, node).await;
    assert_eq!(agent.logged("dtmf").len(), 2, "no dtmf for the garbage body");
}
