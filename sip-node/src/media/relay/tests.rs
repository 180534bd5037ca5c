use std::net::{IpAddr, Ipv4Addr};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::*;
use crate::media::engine::{EngineConfig, MediaEngine};
use crate::media::g711;
use crate::media::ports::{PortAllocator, PortRange};
use crate::media::rtp::{RtpHeader, RtpPacket, TelephoneEvent};

/// The engine the tests' relays run on: one per test process, as the node's.
fn engine() -> &'static MediaEngine {
    static ENGINE: std::sync::OnceLock<MediaEngine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| MediaEngine::start(&EngineConfig::default()).expect("media engine"))
}

fn spawn_relay(
    a: RtpLegSetup,
    b: RtpLegSetup,
    config: RelayConfig,
) -> Result<(RelayHandle, mpsc::Receiver<RelayEvent>), RelayError> {
    engine().spawn_relay(a, b, config)
}

fn localhost() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn allocator(base: u16) -> PortAllocator {
    PortAllocator::new(localhost(), PortRange { min: base, max: base + 19 }).unwrap()
}

async fn peer() -> UdpSocket {
    UdpSocket::bind((localhost(), 0)).await.unwrap()
}

fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    RtpHeader { marker: false, payload_type: pt, sequence: seq, timestamp: ts, ssrc }.write(payload, &mut out);
    out
}

async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (len, from) =
        tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await.expect("timed out").unwrap();
    buf.truncate(len);
    (buf, from)
}

async fn nothing(socket: &UdpSocket) {
    let mut buf = vec![0u8; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(150), socket.recv_from(&mut buf)).await.is_err(),
        "a packet arrived that should not have"
    );
}

struct Setup {
    allocator: PortAllocator,
    handle: RelayHandle,
    events: mpsc::Receiver<RelayEvent>,
    a_port: u16,
    b_port: u16,
    caller: UdpSocket,
    callee: UdpSocket,
}

async fn two_legs(base: u16, a_codec: Codec, b_codec: Codec, config: RelayConfig) -> Setup {
    let allocator = allocator(base);
    let caller = peer().await;
    let callee = peer().await;
    let a_ports = allocator.allocate().unwrap();
    let b_ports = allocator.allocate().unwrap();
    let (a_port, b_port) = (a_ports.rtp_port(), b_ports.rtp_port());
    let mut a_media = LegMedia::new(a_codec, Some(caller.local_addr().unwrap()));
    a_media.telephone_event = Some(101);
    let mut b_media = LegMedia::new(b_codec, Some(callee.local_addr().unwrap()));
    b_media.telephone_event = Some(96);
    let (handle, events) = spawn_relay(
        RtpLegSetup { ports: a_ports, media: a_media },
        RtpLegSetup { ports: b_ports, media: b_media },
        config,
    )
    .unwrap();
    Setup { allocator, handle, events, a_port, b_port, caller, callee }
}

#[tokio::test]
async fn packets_flow_both_ways_in_order_and_ports_are_released() {
    let mut s = two_legs(42000, Codec::Pcmu, Codec::Pcmu, RelayConfig::default()).await;
    let to_a = SocketAddr::new(localhost(), s.a_port);
    let to_b = SocketAddr::new(localhost(), s.b_port);
    let mut last_seq = None;
    for i in 0..20u16 {
        s.caller.send_to(&rtp(0, 1000 + i, 160 * i as u32, 11, &[i as u8; 160]), to_a).await.unwrap();
        let (packet, from) = recv(&s.callee).await;
        assert_eq!(from, to_b, "symmetric: the callee hears from the port it sends to");
        let p = RtpPacket::parse(&packet).unwrap();
        assert_eq!(p.payload, &[i as u8; 160]);
        assert_eq!(p.payload_type, 0);
        if let Some(last) = last_seq {
            assert_eq!(p.sequence, u16::wrapping_add(last, 1));
        }
        last_seq = Some(p.sequence);
        s.callee.send_to(&rtp(0, 5000 + i, 160 * i as u32, 22, &[!(i as u8); 160]), to_b).await.unwrap();
        let (packet, _) = recv(&s.caller).await;
        assert_eq!(RtpPacket::parse(&packet).unwrap().payload, &[!(i as u8); 160]);
    }
    // The relay counts a packet once its send returned, which can be just after the packet
    // reached the test's socket: wait (bounded) for the last count.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut stats = s.handle.stats();
    while stats.a.packets_out < 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        stats = s.handle.stats();
    }
    assert_eq!(stats.a.packets_in, 20);
    assert_eq!(stats.b.packets_out, 20);
    assert_eq!(stats.b.packets_in, 20);
    assert_eq!(stats.a.packets_out, 20);
    assert_eq!(s.allocator.in_use(), 2);
    let latched = s.events.recv().await.unwrap();
    assert_eq!(latched, RelayEvent::Latched { leg: LegId::A, source: s.caller.local_addr().unwrap() });
    let stats = s.handle.stop().await;
    assert_eq!(stats.a.packets_in, 20);
    assert_eq!(s.allocator.in_use(), 0);
}

#[tokio::test]
async fn pcma_caller_to_pcmu_callee_is_transcoded() {
    let s = two_legs(42020, Codec::Pcma, Codec::Pcmu, RelayConfig::default()).await;
    let to_a = SocketAddr::new(localhost(), s.a_port);
    let samples: Vec<i16> = (0..160).map(|i| ((i as f64 * 0.3).sin() * 9000.0) as i16).collect();
    let mut alaw = vec![];
    g711::encode_alaw_samples(&samples, &mut alaw);
    s.caller.send_to(&rtp(8, 1, 0, 1, &alaw), to_a).await.unwrap();
    let (packet, _) = recv(&s.callee).await;
    let p = RtpPacket::parse(&packet).unwrap();
    assert_eq!(p.payload_type, 0);
    let mut decoded = vec![];
    g711::decode_ulaw(p.payload, &mut decoded);
    for (sent, got) in samples.iter().zip(&decoded) {
        assert!((*sent as i32 - *got as i32).abs() <= (sent.abs() as i32) / 10 + 20, "{sent} vs {got}");
    }
    // And back: μ-law from the callee reaches the caller as A-law.
    let mut ulaw = vec![];
    g711::encode_ulaw_samples(&samples, &mut ulaw);
    s.callee.send_to(&rtp(0, 1, 0, 2, &ulaw), SocketAddr::new(localhost(), s.b_port)).await.unwrap();
    let (packet, _) = recv(&s.caller).await;
    let p = RtpPacket::parse(&packet).unwrap();
    assert_eq!(p.payload_type, 8);
    let mut decoded = vec![];
    g711::decode_alaw(p.payload, &mut decoded);
    for (sent, got) in samples.iter().zip(&decoded) {
        assert!((*sent as i32 - *got as i32).abs() <= (sent.abs() as i32) / 10 + 20, "{sent} vs {got}");
    }
}

/// The next `Latched` event of leg A (leg B latches too when the callee sends).
async fn next_latch_of_a(events: &mut mpsc::Receiver<RelayEvent>) -> SocketAddr {
    loop {
        match tokio::time::timeout(Duration::from_secs(2), events.recv()).await.unwrap().unwrap() {
            RelayEvent::Latched { leg: LegId::A, source } => return source,
            _ => continue,
        }
    }
}

#[tokio::test]
async fn latching_drops_strangers_and_garbage() {
    let mut s = two_legs(42040, Codec::Pcmu, Codec::Pcmu, RelayConfig::default()).await;
    let to_a = SocketAddr::new(localhost(), s.a_port);
    // The caller is behind NAT: it sends from another address than its SDP says.
    let natted = peer().await;
    natted.send_to(&rtp(0, 1, 0, 1, &[1; 160]), to_a).await.unwrap();
    recv(&s.callee).await;
    assert_eq!(next_latch_of_a(&mut s.events).await, natted.local_addr().unwrap());
    // The callee's audio goes to the latched address, not to the SDP one.
    s.callee.send_to(&rtp(0, 1, 0, 2, &[2; 160]), SocketAddr::new(localhost(), s.b_port)).await.unwrap();
    recv(&natted).await;
    // A third party after latching: dropped and counted.
    let stranger = peer().await;
    stranger.send_to(&rtp(0, 2, 160, 1, &[3; 160]), to_a).await.unwrap();
    nothing(&s.callee).await;
    // Garbage and truncated RTP: dropped and counted.
    natted.send_to(b"hello", to_a).await.unwrap();
    natted.send_to(&[0x8F, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0], to_a).await.unwrap();
    natted.send_to(&[0x40; 40], to_a).await.unwrap();
    // An unknown payload type (comfort noise) is counted, not relayed.
    natted.send_to(&rtp(13, 3, 320, 1, &[0; 1]), to_a).await.unwrap();
    nothing(&s.callee).await;
    let stats = s.handle.stats();
    assert_eq!(stats.a.dropped_source, 1);
    assert_eq!(stats.a.dropped_invalid, 3);
    assert_eq!(stats.a.dropped_other, 1);
    // The SDP address still wins when it shows up.
    s.caller.send_to(&rtp(0, 4, 480, 1, &[4; 160]), to_a).await.unwrap();
    recv(&s.callee).await;
    assert_eq!(next_latch_of_a(&mut s.events).await, s.caller.local_addr().unwrap());
}

#[tokio::test]
async fn expected_only_refuses_other_sources() {
    let allocator = allocator(42060);
    let caller = peer().await;
    let callee = peer().await;
    let a_ports = allocator.allocate().unwrap();
    let to_a = SocketAddr::new(localhost(), a_ports.rtp_port());
    let mut a_media = LegMedia::new(Codec::Pcmu, Some(caller.local_addr().unwrap()));
    a_media.latch = LatchMode::ExpectedOnly;
    let b_media = LegMedia::new(Codec::Pcmu, Some(callee.local_addr().unwrap()));
    let (handle, _events) = spawn_relay(
        RtpLegSetup { ports: a_ports, media: a_media },
        RtpLegSetup { ports: allocator.allocate().unwrap(), media: b_media },
        RelayConfig::default(),
    )
    .unwrap();
    let stranger = peer().await;
    stranger.send_to(&rtp(0, 1, 0, 1, &[1; 160]), to_a).await.unwrap();
    nothing(&callee).await;
    caller.send_to(&rtp(0, 2, 160, 1, &[1; 160]), to_a).await.unwrap();
    recv(&callee).await;
    assert_eq!(handle.stats().a.dropped_source, 1);
}

#[tokio::test]
async fn dtmf_is_relayed_and_reported_once() {
    let mut s = two_legs(42080, Codec::Pcmu, Codec::Pcmu, RelayConfig::default()).await;
    let to_a = SocketAddr::new(localhost(), s.a_port);
    let event = |end: bool, duration: u16| TelephoneEvent { event: 7, end, volume: 10, duration }.to_bytes();
    let packets = [event(false, 160), event(false, 320), event(true, 480), event(true, 480), event(true, 480)];
    for (i, payload) in packets.iter().enumerate() {
        s.caller.send_to(&rtp(101, 10 + i as u16, 8000, 1, payload), to_a).await.unwrap();
        let (packet, _) = recv(&s.callee).await;
        let p = RtpPacket::parse(&packet).unwrap();
        assert_eq!(p.payload_type, 96, "the callee's telephone-event payload type");
        assert_eq!(p.payload, payload);
    }
    let mut digits = vec![];
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(100), s.events.recv()).await {
        if let RelayEvent::Dtmf { leg, digit } = event {
            assert_eq!(leg, LegId::A);
            digits.push(digit.digit);
        }
    }
    assert_eq!(digits, vec![Some('7')]);
    assert_eq!(s.handle.stats().a.dtmf, 1);
}

#[tokio::test]
async fn rtcp_is_passed_across_in_the_other_legs_terms() {
    let s = two_legs(42100, Codec::Pcmu, Codec::Pcmu, RelayConfig::default()).await;
    let caller_rtcp = UdpSocket::bind((localhost(), 0)).await.unwrap();
    let callee_rtcp_addr = SocketAddr::new(localhost(), s.callee.local_addr().unwrap().port() + 1);
    let callee_rtcp = match UdpSocket::bind(callee_rtcp_addr).await {
        Ok(socket) => socket,
        Err(_) => return, // the neighbouring port is taken on this host; nothing to test
    };
    // The caller's stream (SSRC 77) reaches the callee as the node's stream...
    s.caller.send_to(&rtp(0, 1, 160, 77, &[0; 160]), SocketAddr::new(localhost(), s.a_port)).await.unwrap();
    let node_ssrc = RtpPacket::parse(&recv(&s.callee).await.0).unwrap().ssrc;
    assert_ne!(node_ssrc, 77);
    // ...so the caller's RTCP about it speaks of the node's SSRC too.
    let rr = crate::media::rtp::empty_receiver_report(77);
    caller_rtcp.send_to(&rr, SocketAddr::new(localhost(), s.a_port + 1)).await.unwrap();
    let (packet, from) = recv(&callee_rtcp).await;
    assert_eq!(packet, crate::media::rtp::empty_receiver_report(node_ssrc), "RTCP in the callee's terms");
    assert_eq!(from.port(), s.b_port + 1);
    caller_rtcp.send_to(b"junk", SocketAddr::new(localhost(), s.a_port + 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = s.handle.stats();
    assert_eq!(stats.a.rtcp_in, 1);
    assert_eq!(stats.b.rtcp_out, 1);
    assert_eq!(stats.a.dropped_invalid, 1);
}

#[tokio::test]
async fn media_timeout_fires_once_and_hold_suspends_it() {
    let config = RelayConfig { media_timeout: Duration::from_millis(200) };
    let mut s = two_legs(42120, Codec::Pcmu, Codec::Pcmu, config).await;
    let started = std::time::Instant::now();
    let event = tokio::time::timeout(Duration::from_secs(2), s.events.recv()).await.unwrap().unwrap();
    assert!(matches!(event, RelayEvent::MediaTimeout { silent_for } if silent_for >= Duration::from_millis(200)));
    assert!(started.elapsed() >= Duration::from_millis(190));
    assert!(tokio::time::timeout(Duration::from_millis(400), s.events.recv()).await.is_err(), "reported once");
    // Both legs on hold (inactive): no timeout.
    let mut held_a = LegMedia::new(Codec::Pcmu, Some(s.caller.local_addr().unwrap()));
    held_a.direction = MediaDirection::Inactive;
    let mut held_b = LegMedia::new(Codec::Pcmu, Some(s.callee.local_addr().unwrap()));
    held_b.direction = MediaDirection::Inactive;
    s.handle.update_leg(LegId::A, held_a).unwrap();
    s.handle.update_leg(LegId::B, held_b).unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), s.events.recv()).await.is_err());
    // Resume: the timer runs again from the resume.
    s.handle.update_leg(LegId::A, LegMedia::new(Codec::Pcmu, Some(s.caller.local_addr().unwrap()))).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(2), s.events.recv()).await.unwrap().unwrap();
    assert!(matches!(event, RelayEvent::MediaTimeout { .. }));
}

#[tokio::test]
async fn reinvite_moves_the_far_end_and_keeps_the_stream_continuous() {
    let mut s = two_legs(42140, Codec::Pcmu, Codec::Pcmu, RelayConfig::default()).await;
    let to_a = SocketAddr::new(localhost(), s.a_port);
    let to_b = SocketAddr::new(localhost(), s.b_port);
    s.caller.send_to(&rtp(0, 100, 0, 1, &[0; 160]), to_a).await.unwrap();
    let first = RtpPacket::parse(&recv(&s.callee).await.0).unwrap().sequence;
    s.callee.send_to(&rtp(0, 1, 0, 2, &[0; 160]), to_b).await.unwrap();
    recv(&s.caller).await;
    // Re-INVITE: the callee's media moves to a new server and codec, with a new SSRC.
    let moved = peer().await;
    s.handle.update_leg(LegId::B, LegMedia::new(Codec::Pcma, Some(moved.local_addr().unwrap()))).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.caller.send_to(&rtp(0, 101, 160, 1, &[0xFF; 160]), to_a).await.unwrap();
    let (packet, _) = recv(&moved).await;
    let p = RtpPacket::parse(&packet).unwrap();
    assert_eq!(p.payload_type, 8);
    assert_eq!(p.payload, &[g711::ulaw_to_alaw(0xFF); 160]);
    assert_eq!(p.sequence, first.wrapping_add(1));
    nothing(&s.callee).await;
    // The new server's stream reaches the caller continuing the old one.
    moved.send_to(&rtp(8, 9000, 77, 3, &[0xD5; 160]), to_b).await.unwrap();
    let (packet, _) = recv(&s.caller).await;
    let p = RtpPacket::parse(&packet).unwrap();
    assert_eq!(p.payload_type, 0);
    assert!(p.marker);
    // Hold: the node stops sending to A once A is recvonly-from-us.
    let mut held = LegMedia::new(Codec::Pcmu, Some(s.caller.local_addr().unwrap()));
    held.direction = MediaDirection::RecvOnly;
    s.handle.update_leg(LegId::A, held).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    moved.send_to(&rtp(8, 9001, 237, 3, &[0xD5; 160]), to_b).await.unwrap();
    nothing(&s.caller).await;
    while let Ok(event) = s.events.try_recv() {
        assert!(!matches!(event, RelayEvent::MediaTimeout { .. }));
    }
}

#[test]
fn outside_a_runtime_is_an_error() {
    let allocator = allocator(42180);
    let a = RtpLegSetup { ports: allocator.allocate().unwrap(), media: LegMedia::new(Codec::Pcmu, None) };
    assert!(matches!(start_bridged(a, RelayConfig::default()), Err(RelayError::NoRuntime)));
    assert_eq!(allocator.in_use(), 0);
}

/// A transform that stands for SRTP: what goes out to the leg is XORed and carries a one-byte
/// tag; what comes in must carry it (else it is dropped) and is XORed back.
struct Scramble;

impl super::transform::PacketTransform for Scramble {
    fn inbound(&mut self, packet: &mut [u8], _rtcp: bool) -> Option<usize> {
        let (tag, body) = packet.split_last_mut()?;
        if *tag != 0xA5 {
            return None;
        }
        body.iter_mut().for_each(|b| *b ^= 0x5A);
        Some(body.len())
    }

    fn outbound(&mut self, buf: &mut [u8], len: usize, _rtcp: bool) -> Option<usize> {
        buf[..len].iter_mut().for_each(|b| *b ^= 0x5A);
        buf[len] = 0xA5;
        Some(len + 1)
    }
}

fn scrambled(packet: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = packet.iter().map(|b| b ^ 0x5A).collect();
    out.push(0xA5);
    out
}

#[tokio::test]
async fn a_legs_transform_sees_every_packet_both_ways() {
    let allocator = allocator(42160);
    let caller = peer().await;
    let callee = peer().await;
    let (a_ports, b_ports) = (allocator.allocate().unwrap(), allocator.allocate().unwrap());
    let (to_a, to_b) =
        (SocketAddr::new(localhost(), a_ports.rtp_port()), SocketAddr::new(localhost(), b_ports.rtp_port()));
    let (mut relay, _events) = Relay::new(
        RtpLegSetup { ports: a_ports, media: LegMedia::new(Codec::Pcmu, Some(caller.local_addr().unwrap())) },
        RtpLegSetup { ports: b_ports, media: LegMedia::new(Codec::Pcmu, Some(callee.local_addr().unwrap())) },
        RelayConfig::default(),
    )
    .unwrap();
    relay.b.transform = Some(Box::new(Scramble));
    let counters = relay.counters();
    let handle = RelayHandle::on_engine(Box::new(engine().add(relay).unwrap()), counters);
    // Plain from the caller, protected towards the callee.
    caller.send_to(&rtp(0, 1, 0, 1, &[7; 160]), to_a).await.unwrap();
    let (packet, _) = recv(&callee).await;
    assert_eq!(packet.len(), 12 + 160 + 1, "the tag was added");
    let plain: Vec<u8> = packet[..packet.len() - 1].iter().map(|b| b ^ 0x5A).collect();
    let p = RtpPacket::parse(&plain).unwrap();
    assert_eq!(p.payload, &[7; 160]);
    // Protected from the callee, plain towards the caller; a packet that fails the check is
    // dropped and counted.
    callee.send_to(&scrambled(&rtp(0, 1, 0, 2, &[9; 160])), to_b).await.unwrap();
    let (packet, _) = recv(&caller).await;
    assert_eq!(RtpPacket::parse(&packet).unwrap().payload, &[9; 160]);
    callee.send_to(&rtp(0, 2, 160, 2, &[9; 160]), to_b).await.unwrap();
    nothing(&caller).await;
    let stats = handle.stats();
    assert_eq!(stats.b.dropped_invalid, 1);
    assert_eq!(stats.b.bytes_out, 12 + 160 + 1);
}
