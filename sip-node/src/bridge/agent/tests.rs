use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use switchboard_model::Codec;
use tokio::net::{TcpListener, UdpSocket};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::playback::Playback;
use super::*;
use crate::media::g711;
use crate::media::ports::{PortAllocator, PortRange};
use crate::media::relay::{LegId, LegMedia};
use crate::media::rtp::{RtpHeader, RtpPacket, TelephoneEvent};

type ServerSocket = WebSocketStream<TcpStream>;

/// A test agent: accepts one WebSocket on loopback.
async fn agent() -> (String, tokio::task::JoinHandle<ServerSocket>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let accept = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio_tungstenite::accept_async(stream).await.unwrap()
    });
    (url, accept)
}

async fn next_json(ws: &mut ServerSocket) -> serde_json::Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(3), ws.next()).await.expect("timed out");
        match message.expect("closed").expect("error") {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Close(_) => panic!("closed"),
            _ => continue,
        }
    }
}

async fn send_json(ws: &mut ServerSocket, value: serde_json::Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

struct Harness {
    handle: BridgeHandle,
    relay: RelayHandle,
    events: mpsc::Receiver<RelayEvent>,
    server: ServerSocket,
    /// The caller's RTP socket, and the node's port it sends to.
    caller: UdpSocket,
    node: SocketAddr,
    allocator: PortAllocator,
    stream_sid: String,
    sent: u16,
    latency: BridgeLatency,
}

impl Harness {
    /// Sends one RTP packet from the caller.
    async fn send_rtp(&mut self, payload_type: u8, payload: &[u8]) {
        self.sent += 1;
        let mut packet = vec![];
        let header =
            RtpHeader { marker: false, payload_type, sequence: self.sent, timestamp: 160 * self.sent as u32, ssrc: 7 };
        header.write(payload, &mut packet);
        self.caller.send_to(&packet, self.node).await.unwrap();
    }

    /// The next RTP packet the caller receives.
    async fn caller_packet(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let (len, from) =
            tokio::time::timeout(Duration::from_secs(2), self.caller.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(from, self.node, "symmetric RTP");
        buf.truncate(len);
        buf
    }

    /// The payload of the next agent frame the caller hears.
    async fn agent_frame(&self) -> Vec<u8> {
        RtpPacket::parse(&self.caller_packet().await).unwrap().payload.to_vec()
    }

    /// The agent frames the caller has received so far, without waiting.
    fn frames_waiting(&self) -> usize {
        let mut buf = vec![0u8; 2048];
        let mut n = 0;
        while self.caller.try_recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

async fn harness(port_base: u16) -> Harness {
    harness_with(port_base, Codec::Pcmu).await
}

async fn harness_with(port_base: u16, codec: Codec) -> Harness {
    let (url, accept) = agent().await;
    let params = CallParameters {
        from: "+15550001111".into(),
        to: "+15550002222".into(),
        trunk: "main".into(),
        number: "support-line".into(),
    };
    let mut config = BridgeConfig::new(url, &params);
    let latency = BridgeLatency::new();
    config.latency = Some(latency.clone());
    let connection = connect(config.clone()).await.unwrap();
    let mut server = accept.await.unwrap();
    let connected = next_json(&mut server).await;
    assert_eq!(connected, serde_json::json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
    let start = next_json(&mut server).await;
    assert_eq!(start["event"], "start");
    assert_eq!(start["sequenceNumber"], "1");
    assert_eq!(start["streamSid"], config.stream_sid.as_str());
    assert_eq!(start["start"]["callSid"], config.call_sid.as_str());
    assert_eq!(start["start"]["accountSid"], config.account_sid.as_str());
    assert_eq!(start["start"]["tracks"], serde_json::json!(["inbound"]));
    assert_eq!(
        start["start"]["mediaFormat"],
        serde_json::json!({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1})
    );
    assert_eq!(
        start["start"]["customParameters"],
        serde_json::json!({"from": "+15550001111", "to": "+15550002222", "trunk": "main", "number": "support-line"})
    );
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let allocator = PortAllocator::new(localhost, PortRange { min: port_base, max: port_base + 9 }).unwrap();
    let caller = UdpSocket::bind((localhost, 0)).await.unwrap();
    let ports = allocator.allocate().unwrap();
    let node = SocketAddr::new(localhost, ports.rtp_port());
    let mut media = LegMedia::new(codec, Some(caller.local_addr().unwrap()));
    media.telephone_event = Some(101);
    let stream_sid = connection.stream_sid().to_string();
    let (handle, relay, events) = connection.spawn(RtpLegSetup { ports, media }, RelayConfig::default()).unwrap();
    Harness { handle, relay, events, server, caller, node, allocator, stream_sid, sent: 0, latency }
}

fn media(bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"event": "media", "streamSid": "MZx", "media": {"payload": BASE64.encode(bytes)}})
}

#[tokio::test]
async fn caller_audio_and_dtmf_reach_the_agent_in_order() {
    let mut h = harness(42300).await;
    for i in 0..5u8 {
        h.send_rtp(0, &[i; FRAME_BYTES]).await;
        let message = next_json(&mut h.server).await;
        assert_eq!(message["event"], "media");
        assert_eq!(message["sequenceNumber"], (i as u64 + 2).to_string());
        assert_eq!(message["streamSid"], h.stream_sid.as_str());
        assert_eq!(message["media"]["track"], "inbound");
        assert_eq!(message["media"]["chunk"], (i as u64 + 1).to_string());
        assert!(message["media"]["timestamp"].as_str().unwrap().parse::<u64>().is_ok());
        let payload = BASE64.decode(message["media"]["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload, vec![i; FRAME_BYTES]);
    }
    // Each frame's delay was recorded (the key press below is not audio).
    assert_eq!(h.latency.caller_to_agent().summary().count, 5);
    let end = TelephoneEvent { event: 5, end: true, volume: 10, duration: 400 }.to_bytes();
    h.send_rtp(101, &end).await;
    let message = next_json(&mut h.server).await;
    assert_eq!(message["event"], "dtmf");
    assert_eq!(message["dtmf"], serde_json::json!({"track": "inbound_track", "digit": "5"}));
    assert_eq!(message["sequenceNumber"], "7");
    // Caller hangs up: stop, then a clean close.
    let hangup = tokio::spawn(h.handle.hangup());
    let stop = next_json(&mut h.server).await;
    assert_eq!(stop["event"], "stop");
    assert_eq!(stop["sequenceNumber"], "8");
    assert!(stop["stop"]["callSid"].as_str().unwrap().starts_with("CA"));
    let closing = tokio::time::timeout(Duration::from_secs(2), h.server.next()).await.unwrap();
    assert!(matches!(closing, Some(Ok(Message::Close(_)))));
    let (end, stats) = hangup.await.unwrap();
    assert_eq!(end, BridgeEnd::CallerHangup);
    assert_eq!(stats.caller_frames, 5);
    assert_eq!(stats.dtmf_sent, 1);
    // The session owned the caller's leg: its ports are back.
    assert_eq!(h.allocator.in_use(), 0);
    assert!(h.relay.is_finished());
    assert_eq!(h.relay.stats().a.packets_in, 6);
}

#[tokio::test]
async fn agent_audio_is_paced_and_marks_follow_their_audio() {
    let mut h = harness(42310).await;
    // 10 frames in one message plus a partial 80 bytes, then a mark.
    let mut audio: Vec<u8> = (0..10u8).flat_map(|i| vec![i; FRAME_BYTES]).collect();
    audio.extend_from_slice(&[0xAA; 80]);
    send_json(&mut h.server, media(&audio)).await;
    send_json(&mut h.server, serde_json::json!({"event": "mark", "streamSid": "MZx", "mark": {"name": "end"}})).await;
    let started = std::time::Instant::now();
    let mut arrivals = vec![];
    for i in 0..11u8 {
        let frame = h.agent_frame().await;
        arrivals.push(started.elapsed());
        assert_eq!(frame.len(), FRAME_BYTES);
        if i < 10 {
            assert_eq!(&frame[..], &vec![i; FRAME_BYTES][..]);
        } else {
            assert_eq!(&frame[..80], &[0xAA; 80][..]);
            assert_eq!(&frame[80..], &[ULAW_SILENCE; 80][..], "the tail is padded with silence");
        }
    }
    let elapsed = *arrivals.last().unwrap();
    assert!(elapsed >= Duration::from_millis(180), "11 frames took {elapsed:?}");
    // The mark comes back after the last frame has played.
    let mark = next_json(&mut h.server).await;
    assert_eq!(mark["event"], "mark");
    assert_eq!(mark["mark"]["name"], "end");
    assert!(started.elapsed() >= elapsed + Duration::from_millis(10), "the mark waited for its audio");
    let stats = h.handle.stats();
    assert_eq!(stats.frames_played, 11);
    assert_eq!(stats.marks, 1);
    // Each frame's delay was recorded from its turn in the pacing, not from the arrival of
    // the message that brought all eleven (the last waited 200 ms for its turn).
    let delay = h.latency.agent_to_caller().summary();
    assert_eq!(delay.count, 11);
    assert!(delay.p99 < 0.1, "the pacing was counted as delay: {delay:?}");
    // A mark with nothing queued comes back at once.
    tokio::time::sleep(Duration::from_millis(30)).await;
    send_json(&mut h.server, serde_json::json!({"event": "mark", "mark": {"name": "idle"}})).await;
    assert_eq!(next_json(&mut h.server).await["mark"]["name"], "idle");
}

#[tokio::test]
async fn clear_drops_the_queue_at_once() {
    let mut h = harness(42320).await;
    let audio = vec![0x11; FRAME_BYTES * 100]; // two seconds
    send_json(&mut h.server, media(&audio)).await;
    send_json(&mut h.server, serde_json::json!({"event": "mark", "mark": {"name": "after-speech"}})).await;
    for _ in 0..3 {
        h.agent_frame().await;
    }
    send_json(&mut h.server, serde_json::json!({"event": "clear", "streamSid": "MZx"})).await;
    // The pending mark is returned right away.
    let mark = next_json(&mut h.server).await;
    assert_eq!(mark["mark"]["name"], "after-speech");
    // At most a frame already on its way; then nothing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = h.frames_waiting();
    assert!(after <= 2, "{after} frames after clear");
    let stats = h.handle.stats();
    assert_eq!(stats.clears, 1);
    assert!(stats.frames_cleared >= 90, "{stats:?}");
    // New audio after clear plays again.
    send_json(&mut h.server, media(&[0x22; FRAME_BYTES])).await;
    let frame = h.agent_frame().await;
    assert_eq!(&frame[..], &[0x22; FRAME_BYTES][..]);
}

#[tokio::test]
async fn bad_agent_messages_are_counted_and_ignored() {
    let mut h = harness(42330).await;
    h.server.send(Message::text("{not json")).await.unwrap();
    send_json(&mut h.server, serde_json::json!({"event": "media", "media": {"payload": "%%%not base64"}})).await;
    send_json(&mut h.server, serde_json::json!({"event": "media"})).await;
    let big = "A".repeat(70 * 1024);
    send_json(&mut h.server, serde_json::json!({"event": "media", "media": {"payload": big}})).await;
    h.server.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    send_json(&mut h.server, serde_json::json!({"event": "dance"})).await;
    // Still alive: audio plays and marks come back.
    send_json(&mut h.server, media(&[0x33; FRAME_BYTES])).await;
    let frame = h.agent_frame().await;
    assert_eq!(&frame[..], &[0x33; FRAME_BYTES][..]);
    let stats = h.handle.stats();
    assert_eq!(stats.invalid_json, 2);
    assert_eq!(stats.invalid_payload, 1);
    assert_eq!(stats.oversized, 1);
    assert_eq!(stats.ignored, 2);
    assert_eq!(stats.agent_media, 1);
}

#[tokio::test]
async fn agent_disconnect_ends_the_session_with_its_reason() {
    let mut h = harness(42340).await;
    h.server.close(Some(CloseFrame { code: CloseCode::Normal, reason: "conversation over".into() })).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(2), h.handle.ended()).await.unwrap();
    assert_eq!(end, BridgeEnd::AgentClosed { code: Some(1000), reason: "conversation over".into() });
    assert!(end.reason().contains("conversation over"));
    // Asking again is immediate.
    assert_eq!(h.handle.ended().await, end);
    assert_eq!(h.allocator.in_use(), 0, "the caller's ports are released");
}

#[tokio::test]
async fn agent_dropping_the_tcp_connection_ends_the_session() {
    let mut h = harness(42350).await;
    drop(h.server);
    let end = tokio::time::timeout(Duration::from_secs(2), h.handle.ended()).await.unwrap();
    assert!(matches!(end, BridgeEnd::AgentClosed { .. } | BridgeEnd::AgentFailed(_)), "{end:?}");
}

#[tokio::test]
async fn pcma_caller_is_transcoded_both_ways_and_its_stream_is_continuous() {
    let mut h = harness_with(42360, Codec::Pcma).await;
    // Caller (A-law) → agent (μ-law).
    h.send_rtp(8, &[0xD5; FRAME_BYTES]).await;
    let message = next_json(&mut h.server).await;
    let payload = BASE64.decode(message["media"]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload, vec![g711::alaw_to_ulaw(0xD5); FRAME_BYTES]);
    let latched = tokio::time::timeout(Duration::from_secs(2), h.events.recv()).await.unwrap().unwrap();
    assert_eq!(latched, RelayEvent::Latched { leg: LegId::A, source: h.caller.local_addr().unwrap() });
    // Agent (μ-law) → caller (A-law), consecutive sequence numbers and timestamps.
    send_json(&mut h.server, media(&[0xFF; FRAME_BYTES * 3])).await;
    let mut last: Option<(u16, u32)> = None;
    for i in 0..3 {
        let packet = h.caller_packet().await;
        let p = RtpPacket::parse(&packet).unwrap();
        assert_eq!(p.payload_type, 8);
        assert_eq!(p.payload, &[g711::ulaw_to_alaw(0xFF); FRAME_BYTES]);
        if let Some((seq, ts)) = last {
            assert_eq!(p.sequence, seq.wrapping_add(1));
            assert_eq!(p.timestamp, ts.wrapping_add(160), "frame {i}");
        }
        last = Some((p.sequence, p.timestamp));
    }
    // DTMF: an event to the call and a `dtmf` message to the agent.
    let end = TelephoneEvent { event: 11, end: true, volume: 10, duration: 400 }.to_bytes();
    h.send_rtp(101, &end).await;
    assert_eq!(next_json(&mut h.server).await["dtmf"]["digit"], "#");
    let key = tokio::time::timeout(Duration::from_secs(2), h.events.recv()).await.unwrap().unwrap();
    assert!(matches!(key, RelayEvent::Dtmf { leg: LegId::A, digit } if digit.digit == Some('#')));
    // Garbage from the caller is counted, not forwarded.
    h.caller.send_to(b"junk", h.node).await.unwrap();
    h.send_rtp(0, &[0x44; FRAME_BYTES]).await; // not the negotiated payload type
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = h.relay.stats();
    assert_eq!(stats.a.dropped_invalid, 1);
    assert_eq!(stats.a.dropped_other, 1);
    assert_eq!(stats.a.packets_out, 3);
    assert_eq!(stats.b.packets_in, 3);
    assert_eq!(h.handle.stats().caller_frames, 1);
    assert!(matches!(h.relay.update_leg(LegId::B, LegMedia::new(Codec::Pcmu, None)), Err(RelayError::NoSuchLeg(_))));
}

#[tokio::test]
async fn an_agent_that_stops_reading_loses_caller_frames_instead_of_queueing_them() {
    let mut h = harness(42400).await;
    // The agent reads nothing from here on: the TCP buffers fill, then the bridge may hold
    // one message for the socket and must drop the frames after it.
    let mut sent = 0u32;
    while h.relay.stats().a.dropped_other == 0 {
        assert!(sent < 200_000, "no frame was ever dropped: the bridge is queueing");
        for _ in 0..200 {
            h.send_rtp(0, &[0x77; FRAME_BYTES]).await;
        }
        sent += 200;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let relay = h.relay.stats();
    let bridge = h.handle.stats();
    // Every caller frame the leg accepted was either written or dropped, none is waiting.
    assert_eq!(bridge.caller_frames + relay.a.dropped_other, relay.a.packets_in);
    // The agent reads again: it gets exactly the frames that were written, then new ones.
    let mut media = 0;
    while media < bridge.caller_frames {
        assert_eq!(next_json(&mut h.server).await["event"], "media");
        media += 1;
    }
    h.send_rtp(0, &[0x78; FRAME_BYTES]).await;
    let message = next_json(&mut h.server).await;
    let payload = BASE64.decode(message["media"]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload, vec![0x78; FRAME_BYTES], "nothing older was queued behind the socket");
}

#[tokio::test]
async fn hold_stops_agent_audio_to_the_caller() {
    let mut h = harness(42370).await;
    let mut held = LegMedia::new(Codec::Pcmu, Some(h.caller.local_addr().unwrap()));
    held.direction = crate::media::sdp::MediaDirection::RecvOnly;
    h.relay.update_leg(LegId::A, held).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    send_json(&mut h.server, media(&[0x55; FRAME_BYTES])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.frames_waiting(), 0);
    assert_eq!(h.relay.stats().b.dropped_other, 1);
    // The caller still reaches the agent.
    h.send_rtp(0, &[0x66; FRAME_BYTES]).await;
    assert_eq!(next_json(&mut h.server).await["event"], "media");
}

#[tokio::test]
async fn stopping_the_relay_releases_the_ports_and_ends_the_session() {
    let mut h = harness(42380).await;
    let stats = h.relay.stop().await;
    assert_eq!(stats.a.packets_in, 0);
    assert_eq!(h.allocator.in_use(), 0, "released before the stop returns");
    assert_eq!(next_json(&mut h.server).await["event"], "stop");
    let end = tokio::time::timeout(Duration::from_secs(3), h.handle.ended()).await.unwrap();
    assert_eq!(end, BridgeEnd::MediaEnded);
}

#[tokio::test]
async fn dropping_the_bridge_handle_releases_the_ports() {
    let h = harness(42390).await;
    drop(h.handle);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.allocator.in_use(), 0);
    assert!(h.relay.is_finished());
}

/// An agent URL with an IPv6 literal (`ws://[::1]:port/`) is reached, and the session's
/// preamble arrives. A host without an IPv6 loopback fails it (it used to pass without
/// having run).
#[tokio::test]
async fn an_agent_at_an_ipv6_literal_is_reached() {
    let listener =
        TcpListener::bind("[::1]:0").await.expect("this test needs the IPv6 loopback [::1] (enable IPv6 on lo)");
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    assert!(url.starts_with("ws://[::1]:"), "{url}");
    let accept = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio_tungstenite::accept_async(stream).await.unwrap()
    });
    let connection = connect(BridgeConfig::new(url, &CallParameters::default())).await.unwrap();
    let mut server = accept.await.unwrap();
    assert_eq!(next_json(&mut server).await["event"], "connected");
    assert_eq!(next_json(&mut server).await["event"], "start");
    drop(connection);
}

/// An agent an API client named passes the egress policy at connect time: a loopback agent
/// is refused without an allow-list (nothing connects), reached with one; `localhost`,
/// which resolves to loopback, is refused by name.
#[tokio::test]
async fn an_api_clients_agent_must_pass_the_egress_policy() {
    use switchboard_model::egress::EgressPolicy;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    for url in [format!("ws://127.0.0.1:{port}/agent"), format!("ws://localhost:{port}/agent")] {
        let mut config = BridgeConfig::new(url.clone(), &CallParameters::default());
        config.egress = Some(std::sync::Arc::new(EgressPolicy::default()));
        let error = connect(config).await.expect_err("refused");
        assert!(error.to_string().contains("SWITCHBOARD_EGRESS_ALLOW"), "{url}: {error}");
    }
    let nothing = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
    assert!(nothing.is_err(), "a refused agent was connected to");
    let accept = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio_tungstenite::accept_async(stream).await.unwrap()
    });
    let mut config = BridgeConfig::new(format!("ws://127.0.0.1:{port}/agent"), &CallParameters::default());
    config.egress = Some(std::sync::Arc::new(EgressPolicy::parse(&["127.0.0.1"]).unwrap()));
    let connection = connect(config).await.expect("an allow-listed agent is reached");
    let mut server = accept.await.unwrap();
    assert_eq!(next_json(&mut server).await["event"], "connected");
    drop(connection);
}

#[tokio::test]
async fn an_agent_that_never_answers_times_out() {
    // A listener that accepts TCP but never completes the WebSocket upgrade.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let mut config = BridgeConfig::new(url, &CallParameters::default());
    config.connect_timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let err = connect(config).await.unwrap_err();
    assert!(matches!(err, BridgeError::ConnectTimeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(listener);
    // Nobody listening at all: an error, quickly.
    let config = BridgeConfig::new("ws://127.0.0.1:1/", &CallParameters::default());
    assert!(matches!(connect(config).await, Err(BridgeError::Connect(_))));
    let config = BridgeConfig::new("http://example.com/", &CallParameters::default());
    assert!(matches!(connect(config).await, Err(BridgeError::InvalidUrl(_))));
}

#[test]
fn playback_pads_tails_places_marks_and_bounds_its_buffer() {
    let b64 = |bytes: &[u8]| BASE64.encode(bytes);
    let mut p = Playback::new(3 * FRAME_BYTES);
    let now = std::time::Instant::now();
    assert_eq!(p.push_base64(&b64(&[1; 200]), now), Ok((200, 0)));
    // A mark pads the 40-byte tail to a whole frame; it is due once both frames played.
    p.mark("a".into());
    assert_eq!(p.queued(), 2 * FRAME_BYTES);
    assert_eq!(p.due_mark(), None);
    assert_eq!(p.next_frame().unwrap().0, &[1; FRAME_BYTES][..]);
    assert_eq!(p.due_mark(), None);
    let second = p.next_frame().unwrap().0;
    assert_eq!(&second[..40], &[1; 40][..]);
    assert_eq!(&second[40..], &[ULAW_SILENCE; 120][..]);
    assert_eq!(p.due_mark().as_deref(), Some("a"));
    assert!(p.is_idle());
    // Beyond the bound, audio is dropped and counted in frames.
    assert_eq!(p.push_base64(&b64(&[2; 4 * FRAME_BYTES + 10]), now), Ok((4 * FRAME_BYTES + 10, 2)));
    assert_eq!(p.queued(), 3 * FRAME_BYTES);
    // Not base64: nothing is added.
    assert!(p.push_base64("%%%", now).is_err());
    assert_eq!(p.queued(), 3 * FRAME_BYTES);
    // A tail with nothing after it plays padded; clear drops the rest and frees its marks.
    p.next_frame().unwrap();
    p.mark("b".into());
    assert_eq!(p.clear(), 2);
    assert_eq!(p.due_mark().as_deref(), Some("b"));
    assert!(p.is_idle() && p.next_frame().is_none());
    assert_eq!(p.push_base64(&b64(&[3; 10]), now), Ok((10, 0)));
    let tail = p.next_frame().unwrap().0;
    assert_eq!(&tail[..10], &[3; 10][..]);
    assert_eq!(&tail[10..], &[ULAW_SILENCE; 150][..]);
}

/// A frame's arrival is that of the message completing it; a padded tail takes the last
/// message's; clear forgets them.
#[test]
fn playback_frames_carry_the_arrival_of_the_audio_completing_them() {
    let b64 = |bytes: &[u8]| BASE64.encode(bytes);
    let t0 = std::time::Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut p = Playback::new(100 * FRAME_BYTES);
    // 1.5 frames, then 1.5 frames: frame 1 is complete with the first message, frame 2
    // needs the second, frame 3 is the second's tail.
    p.push_base64(&b64(&[1; 240]), at(0)).unwrap();
    p.push_base64(&b64(&[2; 240]), at(7)).unwrap();
    assert_eq!(p.next_frame().unwrap().1, Some(at(0)));
    assert_eq!(p.next_frame().unwrap().1, Some(at(7)));
    assert_eq!(p.next_frame().unwrap().1, Some(at(7)));
    assert!(p.next_frame().is_none());
    // A mark's padding plays with the arrival of the audio before it.
    p.push_base64(&b64(&[3; 10]), at(20)).unwrap();
    p.mark("m".into());
    assert_eq!(p.next_frame().unwrap().1, Some(at(20)));
    p.push_base64(&b64(&[4; 480]), at(30)).unwrap();
    p.clear();
    p.push_base64(&b64(&[5; 160]), at(40)).unwrap();
    assert_eq!(p.next_frame().unwrap().1, Some(at(40)));
}

#[test]
fn sids_are_twilio_shaped() {
    assert!(new_sid("MZ").len() == 34 && new_sid("CA").starts_with("CA"));
}
