//! AI bridge latency and memory: N calls, each a bridged relay ([`spawn_bridged`]) plus a
//! bridge session ([`bridge::connect`] + `spawn`) to an in-process WebSocket agent, with a
//! caller sending one 20 ms RTP frame every 20 ms and the agent sending one frame every 40 ms.
//!
//! Printed per step (default 100 and 1,000 calls):
//! - **caller → agent**: from an RTP packet leaving the caller's socket to the agent having
//!   read its `media` message (so: UDP loopback, relay, the one-frame slot, JSON + base64, the
//!   WebSocket write, TCP loopback, and the agent's read and parse) — an upper bound of "RTP
//!   arrival to WebSocket frame leaving";
//! - **agent → caller**: from the agent writing a `media` message to the caller reading the RTP
//!   packet. The agent sends a frame every 40 ms so that the bridge's playback queue is always
//!   empty and idle when it arrives: the deliberate 20 ms pacing never applies, what is left is
//!   the bridge's own delay (plus both loopbacks and the agent's write);
//! - **memory per call**: the process's RSS growth from before the calls were set up to after
//!   they ran, divided by N. It includes the in-process agent's side of each WebSocket and the
//!   caller's socket, so it over-states the node's share.
//!
//! Caller, agent and node share one tokio runtime (two workers) in one process, so on a small
//! machine the load generator competes with the bridge for CPU: the figures are upper bounds.
//! The send times travel inside the payloads (8 bytes of nanoseconds since the bench started).
//!
//! `cargo bench -p switchboard-node --bench bridge_latency`; environment: `BRIDGE_BENCH_SECS`
//! (seconds measured per step, default 5), `BRIDGE_BENCH_STEPS` (comma-separated call counts).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::{SinkExt as _, StreamExt as _};
use switchboard_model::Codec;
use switchboard_node::bridge::{self, BridgeConfig, BridgeHandle, CallParameters};
use switchboard_node::media::ports::{PortAllocator, PortRange};
use switchboard_node::media::relay::{LegMedia, RelayConfig, RelayHandle, RtpLegSetup, spawn_bridged};
use switchboard_node::media::rtp::{RtpHeader, RtpPacket};
use tokio::net::{TcpListener, UdpSocket};
use tokio_tungstenite::tungstenite::Message;

const FRAME: usize = 160;
const CALLER_INTERVAL: Duration = Duration::from_millis(20);
const AGENT_INTERVAL: Duration = Duration::from_millis(40);
const WARM_UP: Duration = Duration::from_secs(1);

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// A frame whose first 8 bytes are the send time.
fn stamped_frame() -> Vec<u8> {
    let mut frame = vec![0xFFu8; FRAME];
    frame[..8].copy_from_slice(&now_ns().to_be_bytes());
    frame
}

fn stamp_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Latency samples in microseconds, recorded only while `measuring` is on.
#[derive(Default)]
struct Samples {
    caller_to_agent: Mutex<Vec<u32>>,
    agent_to_caller: Mutex<Vec<u32>>,
}

fn record(into: &Mutex<Vec<u32>>, sent_ns: u64, measuring: &AtomicBool) {
    if measuring.load(Ordering::Relaxed) {
        let us = now_ns().saturating_sub(sent_ns) / 1000;
        into.lock().unwrap().push(us.min(u64::from(u32::MAX)) as u32);
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index.min(sorted.len() - 1)]) / 1000.0
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The in-process agent: accepts every connection; per connection, records the latency of
/// each caller frame and sends a stamped frame every [`AGENT_INTERVAL`].
async fn agent_server(listener: TcpListener, samples: Arc<Samples>, measuring: Arc<AtomicBool>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let samples = Arc::clone(&samples);
        let measuring = Arc::clone(&measuring);
        tokio::spawn(async move {
            // tungstenite zero-fills its whole read buffer (128 KiB by default) on every read: with
            // the default the in-process agent alone would cost more CPU than the node's bridge.
            let config =
                tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
            let (mut tx, mut rx) = ws.split();
            let writer = tokio::spawn(async move {
                // Spread the calls' agent frames over the interval.
                tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % 40_000)).await;
                let mut ticker = tokio::time::interval(AGENT_INTERVAL);
                loop {
                    ticker.tick().await;
                    let payload = BASE64.encode(stamped_frame());
                    let text = format!(r#"{{"event":"media","streamSid":"MZ","media":{{"payload":"{payload}"}}}}"#);
                    if tx.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
            });
            while let Some(Ok(message)) = rx.next().await {
                let Message::Text(text) = message else { continue };
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                if value["event"] != "media" {
                    continue;
                }
                let payload = value["media"]["payload"].as_str().and_then(|p| BASE64.decode(p).ok());
                if let Some(sent) = payload.as_deref().and_then(stamp_of) {
                    record(&samples.caller_to_agent, sent, &measuring);
                }
            }
            writer.abort();
        });
    }
}

/// The caller of one call: sends a stamped RTP frame every 20 ms and records the latency of
/// what it hears.
async fn caller(socket: UdpSocket, node: SocketAddr, samples: Arc<Samples>, measuring: Arc<AtomicBool>) {
    let socket = Arc::new(socket);
    let receiver = {
        let socket = Arc::clone(&socket);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok(n) = socket.recv(&mut buf).await {
                if let Ok(packet) = RtpPacket::parse(&buf[..n])
                    && let Some(sent) = stamp_of(packet.payload)
                {
                    record(&samples.agent_to_caller, sent, &measuring);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % 20_000)).await;
    let mut ticker = tokio::time::interval(CALLER_INTERVAL);
    let ssrc = rand::random();
    let mut out = Vec::with_capacity(200);
    for i in 0u32.. {
        ticker.tick().await;
        out.clear();
        let header = RtpHeader { marker: false, payload_type: 0, sequence: i as u16, timestamp: i * 160, ssrc };
        header.write(&stamped_frame(), &mut out);
        if socket.send_to(&out, node).await.is_err() {
            break;
        }
    }
    receiver.abort();
}

struct Call {
    relay: RelayHandle,
    bridge: BridgeHandle,
    caller: tokio::task::JoinHandle<()>,
}

async fn set_up(
    allocator: &PortAllocator,
    url: &str,
    samples: &Arc<Samples>,
    measuring: &Arc<AtomicBool>,
) -> Result<Call, String> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.map_err(|e| e.to_string())?;
    let ports = allocator.allocate().map_err(|e| e.to_string())?;
    let node = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.rtp_port());
    let media = LegMedia::new(Codec::Pcmu, Some(socket.local_addr().map_err(|e| e.to_string())?));
    let config = RelayConfig { media_timeout: Duration::from_secs(3600) };
    let (relay, _events, io) = spawn_bridged(RtpLegSetup { ports, media }, config).map_err(|e| e.to_string())?;
    let connection =
        bridge::connect(BridgeConfig::new(url, &CallParameters::default())).await.map_err(|e| e.to_string())?;
    let bridge = connection.spawn(io.into());
    let caller = tokio::spawn(caller(socket, node, Arc::clone(samples), Arc::clone(measuring)));
    Ok(Call { relay, bridge, caller })
}

async fn step(calls: usize, url: &str, measure_for: Duration, samples: &Arc<Samples>, measuring: &Arc<AtomicBool>) {
    let allocator =
        PortAllocator::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PortRange { min: 40000, max: 49999 }).expect("port range");
    samples.caller_to_agent.lock().unwrap().clear();
    samples.agent_to_caller.lock().unwrap().clear();
    let rss_before = rss_bytes();
    let mut running = Vec::with_capacity(calls);
    for _ in 0..calls {
        match set_up(&allocator, url, samples, measuring).await {
            Ok(call) => running.push(call),
            Err(error) => {
                eprintln!("call {} failed to start: {error}", running.len());
                break;
            }
        }
    }
    tokio::time::sleep(WARM_UP).await;
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(measure_for).await;
    measuring.store(false, Ordering::Relaxed);
    let rss_after = rss_bytes();
    let mut dropped = 0;
    let mut played = 0;
    for call in &running {
        let relay = call.relay.stats();
        let bridge = call.bridge.stats();
        dropped += relay.a.dropped_other + bridge.frames_dropped;
        played += bridge.frames_played;
    }
    let bridged = running.len();
    for call in running {
        call.caller.abort();
        let _ = call.bridge.hangup().await;
        call.relay.stop().await;
    }
    let mut up = std::mem::take(&mut *samples.caller_to_agent.lock().unwrap());
    let mut down = std::mem::take(&mut *samples.agent_to_caller.lock().unwrap());
    up.sort_unstable();
    down.sort_unstable();
    let secs = measure_for.as_secs_f64();
    println!("{bridged} bridged calls ({secs:.0} s measured):");
    println!(
        "  caller -> agent: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} frames, expected ~{})",
        percentile(&up, 0.5),
        percentile(&up, 0.99),
        percentile(&up, 1.0),
        up.len(),
        (bridged as f64 * secs * 50.0) as u64
    );
    println!(
        "  agent -> caller: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} frames, expected ~{})",
        percentile(&down, 0.5),
        percentile(&down, 0.99),
        percentile(&down, 1.0),
        down.len(),
        (bridged as f64 * secs * 25.0) as u64
    );
    println!(
        "  memory: {:.1} KiB per call (RSS {:.1} -> {:.1} MiB); frames dropped {dropped}, agent frames played {played}",
        rss_after.saturating_sub(rss_before) as f64 / 1024.0 / bridged.max(1) as f64,
        rss_before as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64,
    );
    assert_eq!(allocator.in_use(), 0, "every call gave its ports back");
}

fn main() {
    let secs = std::env::var("BRIDGE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5u64);
    let steps: Vec<usize> = std::env::var("BRIDGE_BENCH_STEPS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000]);
    base();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let url = format!("ws://{}/agent", listener.local_addr().unwrap());
        let samples = Arc::new(Samples::default());
        let measuring = Arc::new(AtomicBool::new(false));
        tokio::spawn(agent_server(listener, Arc::clone(&samples), Arc::clone(&measuring)));
        for calls in steps {
            step(calls, &url, Duration::from_secs(secs), &samples, &measuring).await;
        }
    });
}
