//! RTP relay capacity on one core: N relayed G.711 calls, each sending 50 packets/s in each
//! direction through the node's relay on loopback, with N raised until loss exceeds 0.1 % or
//! the added jitter (p99 of the transit delay minus its minimum) exceeds 1 ms. Prints the
//! largest N that passed.
//!
//! The relay runs on a current-thread tokio runtime on its own OS thread pinned to one core
//! (its CPU use is printed per step); the load
//! generator (one pacing sender thread, two receiver threads, blocking sockets) runs beside it,
//! so on a two-core machine the generator shares the second core and its own scheduling noise
//! is part of the measured jitter: the figure is a lower bound of the relay's capacity.
//!
//! `cargo bench -p switchboard-node --bench rtp_relay`; environment: `RTP_BENCH_SECS` (seconds
//! measured per step, default 3), `RTP_BENCH_STEPS` (comma-separated call counts).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use switchboard_model::Codec;
use switchboard_node::media::ports::{PortAllocator, PortRange};
use switchboard_node::media::relay::{LegMedia, RelayConfig, RelayHandle, RtpLegSetup, spawn_relay};
use switchboard_node::media::rtp::{RtpHeader, RtpPacket};

const PACKET_INTERVAL: Duration = Duration::from_millis(20);
const WARM_UP: Duration = Duration::from_millis(500);
const MAX_LOSS: f64 = 0.001;
const MAX_JITTER_US: u64 = 1000;
/// The relay thread's core. The generator's threads are left to the scheduler: pinned together
/// on the other core of a two-core machine they delay each other more than the relay does.
const RELAY_CPU: usize = 0;

struct StepResult {
    calls: usize,
    sent: u64,
    received: u64,
    p50_us: u64,
    p99_us: u64,
    min_us: u64,
    relay_dropped: u64,
    relay_cpu: f64,
}

impl StepResult {
    fn loss(&self) -> f64 {
        if self.sent == 0 { 1.0 } else { 1.0 - self.received as f64 / self.sent as f64 }
    }

    fn jitter_us(&self) -> u64 {
        self.p99_us.saturating_sub(self.min_us)
    }

    fn passed(&self) -> bool {
        self.loss() <= MAX_LOSS && self.jitter_us() <= MAX_JITTER_US
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Pins the calling thread to one CPU (best effort: the figure is still printed if it fails).
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// CPU time (user + system, in clock ticks of 10 ms) used so far by one thread of this process.
fn thread_cpu_ticks(tid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else { return 0 };
    let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return 0 };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12) // utime, stime (fields 14 and 15 of the whole line)
}

fn receiver(socket: UdpSocket, base: Instant, done: Arc<AtomicBool>) -> Vec<u64> {
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 2048];
    let mut delays = Vec::with_capacity(1 << 20);
    while !done.load(Ordering::Relaxed) {
        let Ok((len, _)) = socket.recv_from(&mut buf) else { continue };
        let now = base.elapsed().as_nanos() as u64;
        let Ok(packet) = RtpPacket::parse(&buf[..len]) else { continue };
        let payload = packet.payload;
        if payload.len() < 13 || payload[4] != 1 {
            continue; // warm-up packet
        }
        let sent = u64::from_be_bytes(payload[5..13].try_into().unwrap());
        delays.push(now.saturating_sub(sent) / 1000);
    }
    delays
}

fn run_step(
    runtime: &tokio::runtime::Handle,
    relay_tid: &str,
    allocator: &PortAllocator,
    calls: usize,
    secs: u64,
) -> StepResult {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let gen_a = UdpSocket::bind((localhost, 0)).unwrap();
    let gen_b = UdpSocket::bind((localhost, 0)).unwrap();
    let (addr_a, addr_b) = (gen_a.local_addr().unwrap(), gen_b.local_addr().unwrap());

    // Start the relays inside the relay runtime.
    let mut targets = Vec::with_capacity(calls);
    let mut pairs = Vec::with_capacity(calls);
    for _ in 0..calls {
        let a = allocator.allocate().expect("ports");
        let b = allocator.allocate().expect("ports");
        targets.push((SocketAddr::new(localhost, a.rtp_port()), SocketAddr::new(localhost, b.rtp_port())));
        pairs.push((a, b));
    }
    let handles: Vec<RelayHandle> = runtime.block_on(async {
        pairs
            .into_iter()
            .map(|(a, b)| {
                let a = RtpLegSetup { ports: a, media: LegMedia::new(Codec::Pcmu, Some(addr_a)) };
                let b = RtpLegSetup { ports: b, media: LegMedia::new(Codec::Pcmu, Some(addr_b)) };
                let config = RelayConfig { media_timeout: Duration::from_secs(3600) };
                let (handle, events) = spawn_relay(a, b, config).expect("relay");
                drop(events);
                handle
            })
            .collect()
    });

    let base = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let rx_a = {
        let (socket, done) = (gen_a.try_clone().unwrap(), done.clone());
        thread::spawn(move || receiver(socket, base, done))
    };
    let rx_b = {
        let (socket, done) = (gen_b.try_clone().unwrap(), done.clone());
        thread::spawn(move || receiver(socket, base, done))
    };

    // The sender: each call has its own phase within the 20 ms period, as real calls do.
    let sent = Arc::new(AtomicU64::new(0));
    let cpu_before = thread_cpu_ticks(relay_tid);
    let sender = {
        let sent = sent.clone();
        thread::spawn(move || {
            let total = WARM_UP + Duration::from_secs(secs);
            let mut seq = vec![0u16; calls];
            let mut packet = Vec::with_capacity(200);
            let mut payload = [0xFFu8; 160];
            let slots = 100u32; // 200 µs slots
            let slot_len = PACKET_INTERVAL / slots;
            let mut period = 0u32;
            loop {
                let period_start = base + PACKET_INTERVAL * period;
                if period_start.duration_since(base) >= total {
                    break;
                }
                let measured = period_start.duration_since(base) >= WARM_UP;
                for slot in 0..slots {
                    let at = period_start + slot_len * slot;
                    let now = Instant::now();
                    if at > now {
                        thread::sleep(at - now);
                    }
                    let first = calls * slot as usize / slots as usize;
                    let last = calls * (slot as usize + 1) / slots as usize;
                    for call in first..last {
                        seq[call] = seq[call].wrapping_add(1);
                        payload[..4].copy_from_slice(&(call as u32).to_be_bytes());
                        payload[4] = measured as u8;
                        for (socket, target) in [(&gen_a, targets[call].0), (&gen_b, targets[call].1)] {
                            let stamp = base.elapsed().as_nanos() as u64;
                            payload[5..13].copy_from_slice(&stamp.to_be_bytes());
                            packet.clear();
                            RtpHeader {
                                marker: false,
                                payload_type: 0,
                                sequence: seq[call],
                                timestamp: seq[call] as u32 * 160,
                                ssrc: call as u32,
                            }
                            .write(&payload, &mut packet);
                            if socket.send_to(&packet, target).is_ok() && measured {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                period += 1;
            }
        })
    };
    sender.join().unwrap();
    let relay_cpu = (thread_cpu_ticks(relay_tid) - cpu_before) as f64 / 100.0 / (WARM_UP.as_secs_f64() + secs as f64);
    thread::sleep(Duration::from_millis(300)); // let the last packets arrive
    done.store(true, Ordering::Relaxed);
    let mut delays = rx_a.join().unwrap();
    delays.extend(rx_b.join().unwrap());
    delays.sort_unstable();

    let relay_dropped: u64 = handles
        .iter()
        .map(|h| {
            let s = h.stats();
            s.a.dropped_other + s.b.dropped_other + s.a.dropped_source + s.b.dropped_source
        })
        .sum();
    runtime.block_on(async {
        for handle in handles {
            handle.stop().await;
        }
    });
    assert_eq!(allocator.in_use(), 0, "every port released");
    StepResult {
        calls,
        sent: sent.load(Ordering::Relaxed),
        received: delays.len() as u64,
        p50_us: percentile(&delays, 0.50),
        p99_us: percentile(&delays, 0.99),
        min_us: delays.first().copied().unwrap_or(0),
        relay_dropped,
        relay_cpu,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either: run
    // a single tiny step when not benchmarking so that test runs stay quick.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("RTP_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let steps: Vec<usize> = match std::env::var("RTP_BENCH_STEPS") {
        Ok(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) if benchmarking => vec![250, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000],
        Err(_) => vec![10],
    };
    let secs = if benchmarking { secs } else { 1 };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let handle = runtime.handle().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let relay_thread = thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            pin_to(RELAY_CPU);
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let _ = tid_tx.send(tid);
            let _ = runtime.block_on(stop_rx);
        })
        .unwrap();
    let relay_tid = tid_rx.recv().unwrap_or_default();

    let allocator = PortAllocator::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PortRange { min: 20000, max: 60999 }).unwrap();
    println!("rtp_relay: G.711 20 ms, 50 pps per direction per call, relay on one current-thread runtime");
    println!(
        "{:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>9} {:>8}",
        "calls", "sent", "received", "loss%", "p50us", "p99us", "jitter_us", "relay_cpu", "result"
    );
    let mut best = 0;
    for calls in steps {
        let result = run_step(&handle, &relay_tid, &allocator, calls, secs);
        println!(
            "{:>6} {:>10} {:>10} {:>8.3} {:>8} {:>8} {:>10} {:>8.0}% {:>8}{}",
            result.calls,
            result.sent,
            result.received,
            result.loss() * 100.0,
            result.p50_us,
            result.p99_us,
            result.jitter_us(),
            result.relay_cpu * 100.0,
            if result.passed() { "ok" } else { "FAIL" },
            if result.relay_dropped > 0 { format!(" (relay dropped {})", result.relay_dropped) } else { String::new() },
        );
        if !result.passed() {
            break;
        }
        best = calls;
    }
    println!("maximum concurrent relayed calls on one core within 0.1 % loss and 1 ms jitter p99: {best}");
    let _ = stop_tx.send(());
    let _ = relay_thread.join();
}
