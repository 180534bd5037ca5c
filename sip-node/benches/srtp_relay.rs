//! What SRTP costs the relay: packets relayed per second of the media thread's CPU, in user
//! space, for plain RTP → plain RTP, SRTP → plain RTP (the carrier leg decrypted) and SRTP →
//! SRTP (decrypted and encrypted again), printed side by side with the calls per core they
//! make at 50 packets/s per direction (an SRTP-to-plain call costs about one SRTP → SRTP
//! packet per pair of packets: one decrypted on the way in, one encrypted on the way out).
//!
//! The relays run on a media engine of one thread pinned to CPU 0 with kernel forwarding off
//! (an SRTP leg is never forwarded in the kernel; plain RTP is, and `rtp_relay` measures that).
//! The generator on CPU 1 sends the packets of every call round robin into leg A, encrypted
//! beforehand with the caller's key (so its own cost is a `sendto`); leg B's far end is a socket
//! nobody reads. The figure is the media thread's CPU time (the scheduler's account,
//! `/proc/self/task/*/schedstat`) divided by the packets the relays sent on leg B: what one
//! relayed packet costs, receive, authenticate and decrypt, rewrite, encrypt, send.
//!
//! `cargo bench -p switchboard-node --bench srtp_relay`; `SRTP_BENCH_PACKETS` (per call,
//! default 3000), `SRTP_BENCH_CALLS` (default 50).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use switchboard_model::Codec;
use switchboard_node::media::engine::{EngineConfig, MediaEngine};
use switchboard_node::media::kernel::KernelMode;
use switchboard_node::media::ports::{PortAllocator, PortRange};
use switchboard_node::media::relay::{LegMedia, RelayConfig, RtpLegSetup};
use switchboard_node::media::srtp::{CryptoAttr, SrtpKeys, SrtpLeg, Suite};

const RELAY_CPU: usize = 0;
const GENERATOR_CPU: usize = 1;

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// The id of this process's thread with the given name.
fn thread_named(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        (comm.trim() == name).then(|| task.file_name().to_str()?.parse().ok())?
    })
}

/// CPU time of a thread of this process in ns.
fn thread_cpu_ns(tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut packet = vec![0x80, 0];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    packet.extend_from_slice(&ssrc.to_be_bytes());
    packet.extend(std::iter::repeat_n(0x55u8, 160));
    packet
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    SrtpToPlain,
    SrtpToSrtp,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "RTP → RTP",
            Mode::SrtpToPlain => "SRTP → RTP",
            Mode::SrtpToSrtp => "SRTP → SRTP",
        }
    }
}

/// Both ends' keys of one SRTP leg: the peer's leg (to encrypt what it sends) and the node's.
fn srtp_leg() -> (SrtpLeg, SrtpKeys) {
    let peer = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    let node = CryptoAttr::generate(1, Suite::AesCm128HmacSha1_80);
    (SrtpLeg::new(&peer, &node).unwrap(), SrtpKeys { local: node, remote: peer })
}

struct Figure {
    relayed: u64,
    cpu_ns: u64,
    wall: Duration,
}

fn run(engine: &MediaEngine, tid: u32, mode: Mode, calls: usize, packets: u16) -> Figure {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let allocator = PortAllocator::new(localhost, PortRange { min: 40000, max: 49999 }).unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut targets = vec![];
    let mut streams: Vec<Vec<Vec<u8>>> = vec![];
    let handles: Vec<_> = runtime.block_on(async {
        (0..calls)
            .map(|call| {
                let a = allocator.allocate().expect("ports");
                let b = allocator.allocate().expect("ports");
                targets.push(SocketAddr::new(localhost, a.rtp_port()));
                let mut a_media = LegMedia::new(Codec::Pcmu, Some(sender.local_addr().unwrap()));
                let mut b_media = LegMedia::new(Codec::Pcmu, Some(sink.local_addr().unwrap()));
                let ssrc = 0x1000 + call as u32;
                let stream = if mode == Mode::Plain {
                    (1..=packets).map(|seq| rtp(seq, ssrc)).collect()
                } else {
                    let (mut peer, keys) = srtp_leg();
                    a_media.srtp = Some(keys);
                    (1..=packets).map(|seq| peer.protect_rtp(&rtp(seq, ssrc)).unwrap().to_vec()).collect()
                };
                if mode == Mode::SrtpToSrtp {
                    b_media.srtp = Some(srtp_leg().1);
                }
                streams.push(stream);
                let a = RtpLegSetup { ports: a, media: a_media };
                let b = RtpLegSetup { ports: b, media: b_media };
                let (handle, events) =
                    engine.spawn_relay(a, b, RelayConfig { media_timeout: Duration::from_secs(3600) }).expect("relay");
                drop(events);
                handle
            })
            .collect()
    });
    let cpu_before = thread_cpu_ns(tid);
    let started = Instant::now();
    for k in 0..packets as usize {
        for (call, stream) in streams.iter().enumerate() {
            let _ = sender.send_to(&stream[k], targets[call]);
        }
        // A round of one packet per call, then a breath: the relay keeps up within its socket
        // buffers rather than the kernel dropping what it cannot take.
        if k % 8 == 7 {
            thread::sleep(Duration::from_micros(200));
        }
    }
    thread::sleep(Duration::from_millis(200));
    let wall = started.elapsed();
    let cpu_ns = thread_cpu_ns(tid) - cpu_before;
    let relayed = handles.iter().map(|h| h.stats().b.packets_out).sum();
    let rejected: u64 = handles.iter().map(|h| h.stats().a.srtp_rejected).sum();
    assert_eq!(rejected, 0, "every packet authenticates");
    runtime.block_on(async {
        for handle in handles {
            handle.stop().await;
        }
    });
    Figure { relayed, cpu_ns, wall }
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let packets = if benchmarking { env("SRTP_BENCH_PACKETS", 3000) } else { 50 }.min(60000) as u16;
    let calls = if benchmarking { env("SRTP_BENCH_CALLS", 50) } else { 2 };
    let engine = MediaEngine::start(&EngineConfig { threads: 1, cpus: vec![RELAY_CPU], kernel: KernelMode::Off })
        .expect("engine");
    let tid = (0..100)
        .find_map(|_| {
            let tid = thread_named("media-0");
            if tid.is_none() {
                thread::sleep(Duration::from_millis(10));
            }
            tid
        })
        .expect("the media thread");
    pin_to(GENERATOR_CPU);
    println!(
        "srtp_relay: {calls} calls × {packets} packets (G.711, 172-byte RTP; SRTP AES_CM_128_HMAC_SHA1_80, webrtc-srtp), \
         one media thread on CPU {RELAY_CPU}, kernel forwarding off"
    );
    let mut plain_ns = None;
    for mode in [Mode::Plain, Mode::SrtpToPlain, Mode::SrtpToSrtp] {
        let f = run(&engine, tid, mode, calls, packets);
        let ns = f.cpu_ns as f64 / f.relayed.max(1) as f64;
        let per_core = 1e9 / ns;
        let versus = plain_ns.map(|p: f64| format!(", {:.2}× plain", ns / p)).unwrap_or_default();
        println!(
            "  {:<12} relayed {:>7} of {:>7} in {:>5} ms: {:>6.0} ns of media-thread CPU per packet = {:>8.0} packets/s per core \
             ≈ {:>5.0} calls at 100 such packets/s{versus}",
            mode.name(),
            f.relayed,
            calls * packets as usize,
            f.wall.as_millis(),
            ns,
            per_core,
            per_core / 100.0,
        );
        plain_ns.get_or_insert(ns);
    }
}
