//! AI bridge latency and memory: N calls, each a bridge session ([`bridge::connect`] +
//! `spawn`: one task owning the caller's RTP leg and the WebSocket) to a WebSocket agent, with a
//! caller sending one 20 ms RTP frame every 20 ms and the agent sending one frame every 40 ms.
//!
//! Two OS processes, so that the load generator cannot take the node's CPU:
//! - the **node** process (the bench as started) runs the bridge sessions on a tokio runtime
//!   with one worker, pinned to CPU 0: the figures are those of one core;
//! - the **load** process (the same binary re-executed with `BRIDGE_BENCH_ROLE=load`) runs the
//!   callers (one UDP socket per call) and the agent (a tokio-tungstenite server on a loopback
//!   TCP port) on a current-thread runtime pinned to CPU 1.
//!
//! They talk over loopback only, and over the load process's stdin/stdout for control: the
//! load side reports the agent's port and, per step, its callers' ports; the node side sets up
//! the calls (each bridge connects to the agent and sends RTP to its caller's port) and
//! reports the calls' RTP ports; the load side starts its callers; the node side says when to
//! measure and when to stop, and the load side answers with the latencies. The load process
//! exits when its stdin closes (and the kernel kills it if the node process dies), and the
//! node process kills it if it does not exit within a few seconds of the end.
//!
//! Every latency is computed in the load process, from a send time carried in the first 8 bytes
//! of the audio (nanoseconds of `CLOCK_MONOTONIC`, which both processes share):
//! - **caller → agent**: from an RTP packet leaving the caller's socket to the agent having
//!   read its `media` message (so: UDP loopback, the bridge's receive, JSON + base64, the
//!   WebSocket write, TCP loopback, and the agent's read and parse) — an upper bound of "RTP
//!   arrival to WebSocket frame leaving";
//! - **agent → caller**: from the agent writing a `media` message to the caller reading the RTP
//!   packet. The agent sends a frame every 40 ms so that the bridge's playback queue is always
//!   empty and idle when it arrives: the deliberate 20 ms pacing never applies, what is left is
//!   the bridge's own delay (plus both loopbacks and the agent's write).
//!
//! Both include the load process's own scheduling delays. So the bench also prints the
//! **node-measured** figures, which are exactly the issue's definition: the bridge's own
//! `switchboard_bridge_latency_seconds` histograms (see `bridge::latency`), read at the start
//! and end of the measured seconds: from the kernel's receive timestamp of the caller's
//! datagram to the WebSocket write, and from the kernel's receive timestamp of the agent's
//! message (or its pacing slot) to the RTP send. Percentiles are interpolated within the
//! histogram's buckets (fine up to 5 ms); "over 5 ms" is exact. Per step, over the measured seconds,
//! in % of one core: the CPU used by each process (`/proc/<pid>/stat`, clock ticks), and the
//! softirq time of each core (`/proc/stat`). On loopback the kernel does the receiving side's
//! UDP/TCP work in the sender's context, mostly in softirqs, which tick-based accounting charges
//! to the process they interrupted: so each process's figure includes delivering what it sends
//! to the other (on a real network the node would instead pay for receiving its own traffic,
//! which costs about the same). A load process near 100 % makes the latencies upper bounds.
//!
//! Each process also runs a probe that sleeps 1 ms again and again: how late it wakes (p99,
//! max) tells which side stalled when the latencies spike. tokio's timer has a 1 ms
//! granularity, so up to about 2 ms late is the floor, not a stall.
//!
//! Also printed: the frames seen against those expected, the frames the node dropped (the
//! caller leg's and the bridge's counters), and the **memory per call**: the node process's RSS growth from before
//! the first step's calls were set up to the end of this step's measurement, divided by N (the
//! load side is not in it). The baseline is taken once because the allocator keeps what an
//! earlier step freed: growth from the start of each step would under-state a later step.
//! Steps are meant in increasing order; the per-call figure includes the node's fixed costs
//! (runtime, TLS setup), which matter only at small N.
//!
//! `cargo bench -p switchboard-node --bench bridge_latency`; environment: `BRIDGE_BENCH_SECS`
//! (seconds measured per step, default 5), `BRIDGE_BENCH_STEPS` (comma-separated call counts,
//! default 100,500,1000).

use std::io::{BufRead as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::{SinkExt as _, StreamExt as _};
use switchboard_model::Codec;
use switchboard_node::bridge::latency::LatencySummary;
use switchboard_node::bridge::{self, BridgeConfig, BridgeHandle, BridgeLatency, CallParameters};
use switchboard_node::media::ports::{PortAllocator, PortRange};
use switchboard_node::media::relay::{LegMedia, RelayConfig, RelayHandle, RtpLegSetup};
use switchboard_node::media::rtp::{RtpHeader, RtpPacket};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const FRAME: usize = 160;
const CALLER_INTERVAL: Duration = Duration::from_millis(20);
/// The callers send in this many 1 ms slots per [`CALLER_INTERVAL`] (call `i` in slot `i % 20`).
const CALLER_SLOTS: usize = 20;
const AGENT_INTERVAL: Duration = Duration::from_millis(40);
const WARM_UP: Duration = Duration::from_secs(1);
const NODE_CPU: usize = 0;
const LOAD_CPU: usize = 1;
/// Selects the load role of a re-executed bench.
const ROLE_ENV: &str = "BRIDGE_BENCH_ROLE";
/// The node process's pid, so that the load process can tell whether it has already gone.
const PARENT_ENV: &str = "BRIDGE_BENCH_PARENT";
/// The longest the node process waits for an answer of the load process.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the load process has to exit once its stdin is closed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Shared by both processes.

/// Nanoseconds of `CLOCK_MONOTONIC`: the same clock in both processes.
fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through the pointer, a live one on this stack
    // frame; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A frame whose first 8 bytes are the send time.
fn stamped_frame() -> [u8; FRAME] {
    let mut frame = [0xFFu8; FRAME];
    frame[..8].copy_from_slice(&now_ns().to_be_bytes());
    frame
}

fn stamp_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok()
        && let Err(error) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
    {
        eprintln!("cannot pin to CPU {cpu}: {error}");
    }
}

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("load") {
        load_main();
    } else {
        node_main();
    }
}

// ---------------------------------------------------------------------------------------------
// The node process.

/// The load process: killed and reaped when dropped, also on a panic of the node process.
struct LoadProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl LoadProcess {
    fn start() -> LoadProcess {
        let exe = std::env::current_exe().expect("the bench's own path");
        let mut child = Command::new(exe)
            .env(ROLE_ENV, "load")
            .env(PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the load process");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("the load process's stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LoadProcess { child, stdin, lines }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the load process's stdin");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).expect("write to the load process");
    }

    /// The next line of the load process, which must start with `word`; returns the rest.
    async fn expect(&mut self, word: &str) -> String {
        let line = match tokio::time::timeout(REPLY_TIMEOUT, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the load process exited while the node waited for {word:?}"),
            Err(_) => panic!("the load process did not send {word:?} within {REPLY_TIMEOUT:?}"),
        };
        match line.strip_prefix(word) {
            Some(rest) => rest.trim().to_string(),
            None => panic!("expected {word:?} from the load process, got {line:?}"),
        }
    }
}

impl Drop for LoadProcess {
    fn drop(&mut self) {
        // Its stdin closing tells it to exit; a bounded wait, then SIGKILL.
        self.stdin = None;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("the load process did not exit within {EXIT_TIMEOUT:?}: killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Clock ticks of CPU (user + system) used by a process so far.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (in parentheses, which may hold spaces): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

/// Clock ticks one CPU spent in softirqs so far.
fn cpu_softirq_ticks(cpu: usize) -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let prefix = format!("cpu{cpu} ");
    let Some(line) = stat.lines().find_map(|l| l.strip_prefix(prefix.as_str())) else { return 0 };
    // user nice system idle iowait irq softirq steal
    line.split_whitespace().nth(6).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[derive(Clone, Copy)]
struct CpuSnapshot {
    node: u64,
    load: u64,
    node_softirq: u64,
    load_softirq: u64,
    at: Instant,
}

/// CPU use over a step, in % of one core.
struct CpuUse {
    node: f64,
    load: f64,
    node_softirq: f64,
    load_softirq: f64,
}

impl CpuSnapshot {
    fn take(load_pid: u32) -> CpuSnapshot {
        CpuSnapshot {
            node: process_ticks(std::process::id()),
            load: process_ticks(load_pid),
            node_softirq: cpu_softirq_ticks(NODE_CPU),
            load_softirq: cpu_softirq_ticks(LOAD_CPU),
            at: Instant::now(),
        }
    }

    fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let pct = |after: u64, before: u64| after.saturating_sub(before) as f64 / ticks_per_second() / secs * 100.0;
        CpuUse {
            node: pct(self.node, before.node),
            load: pct(self.load, before.load),
            node_softirq: pct(self.node_softirq, before.node_softirq),
            load_softirq: pct(self.load_softirq, before.load_softirq),
        }
    }
}

struct Call {
    relay: RelayHandle,
    bridge: BridgeHandle,
}

async fn set_up(
    allocator: &PortAllocator,
    url: &str,
    caller: SocketAddr,
    latency: &BridgeLatency,
) -> Result<(Call, u16), String> {
    let ports = allocator.allocate().map_err(|e| e.to_string())?;
    let port = ports.rtp_port();
    let media = LegMedia::new(Codec::Pcmu, Some(caller));
    let config = RelayConfig { media_timeout: Duration::from_secs(3600) };
    let mut bridge_config = BridgeConfig::new(url, &CallParameters::default());
    bridge_config.latency = Some(latency.clone());
    let connection = bridge::connect(bridge_config).await.map_err(|e| e.to_string())?;
    let (bridge, relay, _events) = connection.spawn(RtpLegSetup { ports, media }, config).map_err(|e| e.to_string())?;
    Ok((Call { relay, bridge }, port))
}

async fn node_step(
    calls: usize,
    url: &str,
    measure_for: Duration,
    rss_before: u64,
    probe: &Samples,
    load: &mut LoadProcess,
    latency: &BridgeLatency,
) -> StepOutcome {
    let allocator =
        PortAllocator::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PortRange { min: 40000, max: 49999 }).expect("port range");
    load.send(&format!("callers {calls}"));
    let callers: Vec<SocketAddr> = load
        .expect("callers")
        .await
        .split_whitespace()
        .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p.parse().expect("a caller port")))
        .collect();
    let mut running = Vec::with_capacity(calls);
    let mut relay_ports = Vec::with_capacity(calls);
    for caller in &callers {
        match set_up(&allocator, url, *caller, latency).await {
            Ok((call, port)) => {
                running.push(call);
                relay_ports.push(port.to_string());
            }
            Err(error) => {
                eprintln!("call {} failed to start: {error}", running.len());
                break;
            }
        }
    }
    load.send(&format!("relays {}", relay_ports.join(" ")));
    load.expect("running").await;
    tokio::time::sleep(WARM_UP).await;
    let cpu_before = CpuSnapshot::take(load.pid());
    let node_before = (latency.caller_to_agent(), latency.agent_to_caller());
    load.send("measure");
    probe.lateness.lock().unwrap().clear();
    probe.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(measure_for).await;
    probe.measuring.store(false, Ordering::Relaxed);
    load.send("stop");
    let cpu_after = CpuSnapshot::take(load.pid());
    let node_measured = (
        latency.caller_to_agent().since(&node_before.0).summary(),
        latency.agent_to_caller().since(&node_before.1).summary(),
    );
    let rss_after = rss_bytes();
    let result = load.expect("result").await;
    let mut dropped = 0;
    let mut played = 0;
    for call in &running {
        let relay = call.relay.stats();
        let bridge = call.bridge.stats();
        dropped += relay.a.dropped_other + bridge.frames_dropped;
        played += bridge.frames_played;
    }
    let bridged = running.len();
    futures::future::join_all(running.into_iter().map(|call| async move {
        let _ = call.bridge.hangup().await;
        call.relay.stop().await;
    }))
    .await;
    load.send("hung-up");
    load.expect("closed").await;

    // result: p50 p99 max count (µs) of caller -> agent, agent -> caller, the load's lateness
    let r: Vec<u64> = result.split_whitespace().map(|v| v.parse().expect("a result figure")).collect();
    assert_eq!(r.len(), 12, "the load process's result: {result:?}");
    let node_late = summary(&mut std::mem::take(&mut *probe.lateness.lock().unwrap()));
    let ms = |us: u64| us as f64 / 1000.0;
    let secs = measure_for.as_secs_f64();
    let cpu = cpu_after.since(&cpu_before);
    println!("{bridged} bridged calls ({secs:.0} s measured):");
    println!(
        "  caller -> agent: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} frames, expected ~{})",
        ms(r[0]),
        ms(r[1]),
        ms(r[2]),
        r[3],
        (bridged as f64 * secs * 50.0) as u64
    );
    println!(
        "  agent -> caller: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} frames, expected ~{})",
        ms(r[4]),
        ms(r[5]),
        ms(r[6]),
        r[7],
        (bridged as f64 * secs * 25.0) as u64
    );
    let node_line = |direction: &str, s: &LatencySummary| {
        println!(
            "  node-measured {direction}: p50 {:.3} ms, p99 {:.3} ms, over 5 ms {:.3} % ({} frames)",
            s.p50 * 1000.0,
            s.p99 * 1000.0,
            s.over_5ms * 100.0,
            s.count
        )
    };
    node_line("caller -> agent", &node_measured.0);
    node_line("agent -> caller", &node_measured.1);
    println!(
        "  CPU: node process {:.0} % (softirqs on core {NODE_CPU}: {:.0} %), load process {:.0} % (softirqs on core \
         {LOAD_CPU}: {:.0} %)",
        cpu.node, cpu.node_softirq, cpu.load, cpu.load_softirq
    );
    println!(
        "  1 ms sleeps woke late by: node p99 {:.3} ms, max {:.3} ms; load p99 {:.3} ms, max {:.3} ms",
        ms(node_late[1]),
        ms(node_late[2]),
        ms(r[9]),
        ms(r[10])
    );
    println!("  frames dropped by the node {dropped}, agent frames played {played}");
    println!(
        "  memory: {:.1} KiB per call (node RSS {:.1} -> {:.1} MiB)",
        rss_after.saturating_sub(rss_before) as f64 / 1024.0 / bridged.max(1) as f64,
        rss_before as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64,
    );
    assert_eq!(allocator.in_use(), 0, "every call gave its ports back");
    StepOutcome {
        calls: bridged,
        p99: [node_measured.0.p99, node_measured.1.p99],
        counted: node_measured.0.count > 0 && node_measured.1.count > 0,
        dropped,
    }
}

/// What a step measured, for the closing verdict.
struct StepOutcome {
    /// Calls bridged (fewer than asked if some could not be set up).
    calls: usize,
    /// Node-measured p99 in seconds: caller → agent, agent → caller.
    p99: [f64; 2],
    /// Both directions recorded frames.
    counted: bool,
    /// Frames the node dropped.
    dropped: u64,
}

impl StepOutcome {
    /// The issue's bridge target: p99 under 5 ms in both directions, and nothing dropped to get there.
    fn meets_target(&self) -> bool {
        self.counted && self.dropped == 0 && self.p99.iter().all(|p99| *p99 < 0.005)
    }
}

fn node_main() {
    let secs = std::env::var("BRIDGE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5u64);
    let steps: Vec<usize> = std::env::var("BRIDGE_BENCH_STEPS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 500, 1000]);
    // Pinned before anything starts, so that every thread of this process inherits it; the load
    // process re-pins itself.
    pin_to(NODE_CPU);
    let mut load = LoadProcess::start();
    let runtime = if std::env::var("BRIDGE_BENCH_RUNTIME").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    };
    runtime.block_on(async {
        let agent = load.expect("agent").await;
        let url = format!("ws://{agent}/agent");
        let probe = Arc::new(Samples::default());
        tokio::spawn(lateness_probe(Arc::clone(&probe)));
        let latency = BridgeLatency::new();
        let rss_before = rss_bytes();
        let mut within_target = Vec::new();
        for calls in steps {
            let step = node_step(calls, &url, Duration::from_secs(secs), rss_before, &probe, &mut load, &latency).await;
            if step.meets_target() {
                within_target.push(step.calls);
            }
        }
        match within_target.iter().max() {
            Some(calls) => println!(
                "largest step within the target (node-measured p99 < 5 ms both ways, no frame dropped): {calls} calls \
                 (steps within it: {within_target:?})"
            ),
            None => println!("no step within the target (node-measured p99 < 5 ms both ways, no frame dropped)"),
        }
    });
    drop(runtime);
    drop(load);
}

// ---------------------------------------------------------------------------------------------
// The load process: callers and agent (and what both processes use to measure).

/// Latency samples in microseconds, recorded only while `measuring` is on.
#[derive(Default)]
struct Samples {
    measuring: AtomicBool,
    caller_to_agent: Mutex<Vec<u32>>,
    agent_to_caller: Mutex<Vec<u32>>,
    /// How late the runtime's 1 ms sleeps woke ([`lateness_probe`]).
    lateness: Mutex<Vec<u32>>,
}

impl Samples {
    fn record(&self, into: &Mutex<Vec<u32>>, sent_ns: u64) {
        if self.measuring.load(Ordering::Relaxed) {
            let us = now_ns().saturating_sub(sent_ns) / 1000;
            into.lock().unwrap().push(us.min(u64::from(u32::MAX)) as u32);
        }
    }
}

/// Sleeps 1 ms again and again and records how much later than that it woke: a stall of this
/// process (its core taken, the vCPU descheduled, a long poll) shows up here, so that a latency
/// spike can be put on one side or the other.
async fn lateness_probe(samples: Arc<Samples>) {
    loop {
        let start = now_ns();
        tokio::time::sleep(Duration::from_millis(1)).await;
        samples.record(&samples.lateness, start + 1_000_000);
    }
}

/// p50, p99, max in µs, and the count.
fn summary(samples: &mut [u32]) -> [u64; 4] {
    samples.sort_unstable();
    let at = |p: f64| {
        if samples.is_empty() {
            return 0;
        }
        let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
        u64::from(samples[index.min(samples.len() - 1)])
    };
    [at(0.5), at(0.99), at(1.0), samples.len() as u64]
}

/// The payload of the node's `media` message, found without parsing the whole JSON (the node
/// sends `"payload":"…"` last, in a `media` object).
fn media_payload(text: &str) -> Option<&str> {
    if !text.contains(r#""event":"media""#) {
        return None;
    }
    let start = text.find(r#""payload":""#)? + r#""payload":""#.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// One agent connection: records the latency of each caller frame and sends a stamped frame
/// every [`AGENT_INTERVAL`].
async fn agent_connection(stream: tokio::net::TcpStream, samples: Arc<Samples>) {
    let _ = stream.set_nodelay(true);
    // tungstenite zero-fills its whole read buffer (128 KiB by default) on every read: with the
    // default the agent would cost more CPU than the node's bridge.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
    // Spread the calls' agent frames over the interval.
    let first = tokio::time::Instant::now() + Duration::from_micros(rand::random::<u64>() % 40_000);
    let mut ticker = tokio::time::interval_at(first, AGENT_INTERVAL);
    loop {
        tokio::select! {
            message = ws.next() => {
                let Some(Ok(message)) = message else { return };
                let Message::Text(text) = message else { continue };
                let payload = media_payload(&text).and_then(|p| BASE64.decode(p).ok());
                if let Some(sent) = payload.as_deref().and_then(stamp_of) {
                    samples.record(&samples.caller_to_agent, sent);
                }
            }
            _ = ticker.tick() => {
                let payload = BASE64.encode(stamped_frame());
                let text = format!(r#"{{"event":"media","streamSid":"MZ","media":{{"payload":"{payload}"}}}}"#);
                if ws.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A caller's receiving side: records the latency of what it hears.
async fn caller_receiver(socket: Arc<UdpSocket>, samples: Arc<Samples>) {
    let mut buf = [0u8; 2048];
    while let Ok(n) = socket.recv(&mut buf).await {
        if let Ok(packet) = RtpPacket::parse(&buf[..n])
            && let Some(sent) = stamp_of(packet.payload)
        {
            samples.record(&samples.agent_to_caller, sent);
        }
    }
}

/// Every caller's sending side: every 1 ms, one slot's callers send a stamped frame each (so
/// each caller sends every 20 ms and the calls' phases are spread).
async fn callers_sender(callers: Vec<(Arc<UdpSocket>, SocketAddr)>) {
    let ssrcs: Vec<u32> = callers.iter().map(|_| rand::random()).collect();
    let mut ticker = tokio::time::interval(CALLER_INTERVAL / CALLER_SLOTS as u32);
    let mut out = Vec::with_capacity(200);
    for tick in 0u32.. {
        ticker.tick().await;
        let slot = tick as usize % CALLER_SLOTS;
        let round = tick / CALLER_SLOTS as u32;
        for (i, (socket, relay)) in callers.iter().enumerate().skip(slot).step_by(CALLER_SLOTS) {
            out.clear();
            let header = RtpHeader {
                marker: false,
                payload_type: 0,
                sequence: round as u16,
                timestamp: round.wrapping_mul(160),
                ssrc: ssrcs[i],
            };
            header.write(&stamped_frame(), &mut out);
            if let Err(error) = socket.try_send_to(&out, *relay) {
                eprintln!("caller {i}: send failed: {error}");
            }
        }
    }
}

fn reply(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // The node process gone: nothing left to do.
    if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
        std::process::exit(0);
    }
}

fn load_main() {
    // Die with the node process even if it could not close our stdin (it was SIGKILLed).
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no other effect.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let parent = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse::<u32>().ok());
    if parent.is_some_and(|p| std::os::unix::process::parent_id() != p) {
        return;
    }
    pin_to(LOAD_CPU);
    // Commands from the node process; its stdin closing (the node process ended) ends this one.
    let (tx, mut commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let samples = Arc::new(Samples::default());
        tokio::spawn(lateness_probe(Arc::clone(&samples)));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("the agent's port");
        reply(&format!("agent {}", listener.local_addr().unwrap()));
        let agent = {
            let samples = Arc::clone(&samples);
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => { connections.spawn(agent_connection(stream, Arc::clone(&samples))); }
                            Err(error) => eprintln!("agent: accept failed: {error}"),
                        },
                        Some(_) = connections.join_next() => {}
                    }
                }
            })
        };
        let mut sockets: Vec<Arc<UdpSocket>> = Vec::new();
        let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        while let Some(command) = commands.recv().await {
            let (word, rest) = command.split_once(' ').unwrap_or((&command, ""));
            match word {
                "callers" => {
                    let n: usize = rest.trim().parse().expect("a call count");
                    sockets.clear();
                    for _ in 0..n {
                        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("a caller socket");
                        sockets.push(Arc::new(socket));
                    }
                    let ports: Vec<String> =
                        sockets.iter().map(|s| s.local_addr().unwrap().port().to_string()).collect();
                    reply(&format!("callers {}", ports.join(" ")));
                }
                "relays" => {
                    let relays: Vec<SocketAddr> = rest
                        .split_whitespace()
                        .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p.parse().expect("a relay port")))
                        .collect();
                    // Calls that the node could not set up have no relay: their sockets stay silent.
                    sockets.truncate(relays.len());
                    for socket in &sockets {
                        tasks.push(tokio::spawn(caller_receiver(Arc::clone(socket), Arc::clone(&samples))));
                    }
                    let callers = sockets.iter().cloned().zip(relays).collect();
                    tasks.push(tokio::spawn(callers_sender(callers)));
                    reply("running");
                }
                "measure" => {
                    samples.caller_to_agent.lock().unwrap().clear();
                    samples.agent_to_caller.lock().unwrap().clear();
                    samples.lateness.lock().unwrap().clear();
                    samples.measuring.store(true, Ordering::Relaxed);
                }
                "stop" => {
                    samples.measuring.store(false, Ordering::Relaxed);
                    for task in tasks.drain(..) {
                        task.abort();
                    }
                    sockets.clear();
                    let up = summary(&mut std::mem::take(&mut *samples.caller_to_agent.lock().unwrap()));
                    let down = summary(&mut std::mem::take(&mut *samples.agent_to_caller.lock().unwrap()));
                    let late = summary(&mut std::mem::take(&mut *samples.lateness.lock().unwrap()));
                    let figures: Vec<String> = up.iter().chain(&down).chain(&late).map(u64::to_string).collect();
                    reply(&format!("result {}", figures.join(" ")));
                }
                "hung-up" => reply("closed"),
                other => panic!("unknown command {other:?}"),
            }
        }
        agent.abort();
    });
}
