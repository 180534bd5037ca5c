//! RTP relay capacity on one core: N relayed G.711 calls, each sending 50 packets/s in each
//! direction through the node's relay on loopback, with N raised until loss exceeds 0.1 % or
//! the added jitter (p99 of the transit delay minus its minimum) exceeds 1 ms. Prints the
//! largest N that passed, the memory per relayed call and what one packet costs the kernel.
//!
//! The relays run on a media engine ([`MediaEngine`]) of one thread pinned to CPU 0, as in the
//! node; its CPU time is the scheduler's account of that thread (`/proc/self/task/*/schedstat`). The load generator is one thread pinned to CPU 1,
//! so that it cannot take the relay's core: it needs two sockets only (each relay leg latches to
//! the first source, so one socket feeds every A leg and another every B leg), sends each 200 µs
//! slot's packets with one `sendmmsg` per socket, then sleeps until the next slot and takes what
//! arrived with `recvmmsg` (it never waits on its sockets, so the relay's sends do not wake it). Transit time is
//! the kernel's receive timestamp (`SO_TIMESTAMPNS`) of the relayed packet minus the send time
//! carried in its payload, so the generator's own scheduling delays on receive do not count as
//! the relay's jitter.
//!
//! Before the steps, two baselines: the memory per relayed call (VmRSS delta over N calls with
//! traffic flowing, divided by N) and the kernel's cost of the syscalls every relayed packet
//! needs (`recvfrom` + `sendto` on loopback, measured on the relay's core without tokio): the
//! relay's ns per packet can be compared with that floor.
//!
//! A lateness probe on the relay's core (a thread sleeping 1 ms again and again) and the
//! generator's slowest slot of sends are printed with each step: when they show stalls of
//! milliseconds, the core or the VM stalled, whatever the relay did.
//!
//! The figures are for this machine as it is: other processes on the two cores (the `other`
//! column: CPU used by everything but this process, in % of one core) delay the relay and show
//! up as jitter, and so do stalls that no counter here explains (the machine is a VM): a
//! failing step is repeated once, and both outcomes are printed.
//!
//! `cargo bench -p switchboard-node --bench rtp_relay`; environment: `RTP_BENCH_SECS` (seconds
//! measured per step, default 3), `RTP_BENCH_STEPS` (comma-separated call counts),
//! `RTP_BENCH_MEM_CALLS` (calls of the memory measurement, default 2000), `RTP_BENCH_TRANSCODE=1`
//! (leg B negotiates A-law, so every packet is transcoded μ-law ↔ A-law; the generator's
//! bookkeeping in the payload is written in codes that survive it), `RTP_BENCH_KERNEL`
//! (`auto`, `on`, `off`).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use switchboard_model::Codec;
use switchboard_node::media::engine::{EngineConfig, MediaEngine};
use switchboard_node::media::kernel::{KernelForwarder, KernelMode};
use switchboard_node::media::ports::{PortAllocator, PortRange};
use switchboard_node::media::relay::{LegMedia, RelayConfig, RelayHandle, RtpLegSetup};
use switchboard_node::media::rtp::{RTP_HEADER_LEN, RtpHeader, RtpPacket};

const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// Slots per packet interval: each call sends in its own slot, as real calls have random phases.
const SLOTS: u32 = 100;
const WARM_UP: Duration = Duration::from_millis(500);
/// How long the generator keeps receiving after its last send.
const DRAIN: Duration = Duration::from_millis(300);
const MAX_LOSS: f64 = 0.001;
const MAX_JITTER_US: u64 = 1000;
const RELAY_CPU: usize = 0;
const GENERATOR_CPU: usize = 1;
/// Payload: call number (4 bytes), measured flag (1), send time in ns of CLOCK_REALTIME (8),
/// each byte written as two payload bytes by a [`MetaCode`], then filler up to a G.711 20 ms
/// frame.
const PAYLOAD_LEN: usize = 160;
/// Where the fields sit in the payload (two payload bytes per byte).
const META_CALL: usize = 0;
const META_MEASURED: usize = 8;
const META_STAMP: usize = 10;
const META_END: usize = 26;
const _: () = assert!(META_END <= PAYLOAD_LEN);

/// How the generator writes its bookkeeping into G.711 payloads so that it survives the
/// relay's transcoding: each half byte becomes one of 16 codes whose transcoded images are
/// distinct, so the receiving side can read it back (without transcoding: 16 plain codes).
#[derive(Clone)]
struct MetaCode {
    /// Per sending side: the code of each half byte.
    encode: [[u8; 16]; 2],
    /// Per receiving socket: half byte of each code as it arrives (0xFF: not a code).
    decode: [[u8; 256]; 2],
}

impl MetaCode {
    /// `transcode`: side 0's leg is μ-law and side 1's A-law, so what side 0 sends arrives at
    /// socket 1 as A-law and the other way round.
    fn new(transcode: bool) -> MetaCode {
        let mut code = MetaCode { encode: [[0; 16]; 2], decode: [[0xFF; 256]; 2] };
        for side in 0..2 {
            let image = |c: u8| match (transcode, side) {
                (false, _) => c,
                (true, 0) => switchboard_node::media::g711::ulaw_to_alaw(c),
                (true, _) => switchboard_node::media::g711::alaw_to_ulaw(c),
            };
            let receiving = 1 - side;
            let mut n = 0;
            for c in 0..=255u8 {
                if n < 16 && code.decode[receiving][image(c) as usize] == 0xFF {
                    code.encode[side][n] = c;
                    code.decode[receiving][image(c) as usize] = n as u8;
                    n += 1;
                }
            }
            assert_eq!(n, 16, "16 codes with distinct images");
        }
        code
    }

    fn put(&self, side: usize, payload: &mut [u8], at: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            payload[at + 2 * i] = self.encode[side][(b >> 4) as usize];
            payload[at + 2 * i + 1] = self.encode[side][(b & 15) as usize];
        }
    }

    /// Reads `N` bytes at `at` of a payload received on socket `receiving`.
    fn get<const N: usize>(&self, receiving: usize, payload: &[u8], at: usize) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = self.decode[receiving][*payload.get(at + 2 * i)? as usize];
            let lo = self.decode[receiving][*payload.get(at + 2 * i + 1)? as usize];
            if hi > 15 || lo > 15 {
                return None;
            }
            *o = hi << 4 | lo;
        }
        Some(out)
    }
}
const PACKET_LEN: usize = RTP_HEADER_LEN + PAYLOAD_LEN;
/// Datagrams per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// Transit histogram: 1 µs buckets up to 100 ms (the last bucket holds everything later).
const HISTOGRAM_US: usize = 100_000;

// ---------------------------------------------------------------------------------------------
// System figures.

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through the pointer, a live one on this stack
    // frame; a bad clock id only makes it fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The id of this process's thread with the given name.
fn thread_named(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        (comm.trim() == name).then(|| task.file_name().to_str()?.parse().ok())?
    })
}

/// CPU time of a thread of this process in ns (the scheduler's own account, /proc schedstat).
fn thread_cpu_ns(tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (clock ticks) used by everything but this process: busy time of all CPUs from
/// /proc/stat minus this process's utime + stime.
fn other_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy: u64 = stat
        .lines()
        .next()
        .map(|cpu| {
            cpu.split_whitespace()
                .skip(1)
                .enumerate()
                .filter(|(i, _)| *i != 3 && *i != 4) // idle, iowait
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<u64> = own
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
        .unwrap_or_default();
    let own = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    busy.saturating_sub(own)
}

/// Busy and softirq clock ticks of one CPU so far (/proc/stat `cpuN` line).
fn cpu_ticks(cpu: usize) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let name = format!("cpu{cpu}");
    stat.lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .map(|line| {
            let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            let busy = fields.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
            (busy, fields.get(6).copied().unwrap_or(0))
        })
        .unwrap_or((0, 0))
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn sockaddr_of(addr: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only") };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn setsockopt_int(socket: &UdpSocket, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt reads `optlen` bytes at `optval`, a live c_int of that size on this
    // stack frame; the socket is borrowed, so its descriptor is open.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// An iovec describing no buffer (filled in before use).
const EMPTY_IOVEC: libc::iovec = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };

/// An `mmsghdr` with no buffers, name or control data (filled in before use).
fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: `mmsghdr` is a plain C struct of integers and raw pointers, for which all-zero
    // is a valid value (null pointers, zero lengths and flags).
    unsafe { zeroed() }
}

/// One generator socket's batch of datagrams for `sendmmsg` (headers point into `packets`).
struct SendBatch {
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
}

impl SendBatch {
    fn new(capacity: usize) -> SendBatch {
        SendBatch { headers: (0..capacity).map(|_| zeroed_mmsghdr()).collect(), iovecs: vec![EMPTY_IOVEC; capacity] }
    }

    /// Sends `packets[i]` to `targets[i]` for every i in `calls`, stamping each with the time
    /// (written with `meta`'s codes for `side`).
    fn send(
        &mut self,
        socket: &UdpSocket,
        packets: &mut [[u8; PACKET_LEN]],
        targets: &[libc::sockaddr_in],
        calls: std::ops::Range<usize>,
        meta: &MetaCode,
        side: usize,
    ) -> usize {
        let count = calls.len();
        let stamp = clock_ns(libc::CLOCK_REALTIME).to_be_bytes();
        for (i, call) in calls.enumerate() {
            let packet = &mut packets[call];
            meta.put(side, &mut packet[RTP_HEADER_LEN..], META_STAMP, &stamp);
            self.iovecs[i] = libc::iovec { iov_base: packet.as_mut_ptr() as *mut libc::c_void, iov_len: PACKET_LEN };
            let header = &mut self.headers[i].msg_hdr;
            header.msg_name = &targets[call] as *const libc::sockaddr_in as *mut libc::c_void;
            header.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            header.msg_iov = &mut self.iovecs[i];
            header.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: headers[sent..count] were filled in above: each points at one iovec of
            // `self.iovecs` over a PACKET_LEN-byte packet of `packets` and at a `sockaddr_in` of
            // `targets`, all borrowed for this call; the count passed is the number of headers
            // from `sent` on. sendmmsg only reads them.
            let n = unsafe {
                libc::sendmmsg(socket.as_raw_fd(), self.headers[sent..].as_mut_ptr(), (count - sent) as libc::c_uint, 0)
            };
            if n <= 0 {
                break; // counted as lost
            }
            sent += n as usize;
        }
        sent
    }
}

/// The receive side: buffers for one `recvmmsg`, and what was measured.
struct Receiver {
    buffers: Vec<[u8; 2048]>,
    controls: Vec<[u8; 64]>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    histogram: Vec<u32>,
    received: u64,
    min_ns: u64,
    /// The slowest slot's `sendmmsg` calls in the measured window.
    slowest_send: Duration,
    /// Slots whose sends took longer than the jitter limit.
    stalled_sends: u64,
    meta: MetaCode,
}

impl Receiver {
    fn new(meta: MetaCode) -> Receiver {
        let mut r = Receiver {
            meta,
            buffers: vec![[0; 2048]; RECV_BATCH],
            controls: vec![[0; 64]; RECV_BATCH],
            iovecs: vec![EMPTY_IOVEC; RECV_BATCH],
            headers: (0..RECV_BATCH).map(|_| zeroed_mmsghdr()).collect(),
            histogram: vec![0; HISTOGRAM_US + 1],
            received: 0,
            min_ns: u64::MAX,
            slowest_send: Duration::ZERO,
            stalled_sends: 0,
        };
        for i in 0..RECV_BATCH {
            r.iovecs[i] = libc::iovec { iov_base: r.buffers[i].as_mut_ptr() as *mut libc::c_void, iov_len: 2048 };
        }
        r
    }

    fn reset(&mut self) {
        self.histogram.iter_mut().for_each(|b| *b = 0);
        self.received = 0;
        self.min_ns = u64::MAX;
        self.slowest_send = Duration::ZERO;
        self.stalled_sends = 0;
    }

    /// Receives everything queued on `socket` (the generator's socket `side`; non-blocking).
    fn drain(&mut self, socket: &UdpSocket, side: usize) {
        loop {
            let n = self.receive(socket, RECV_BATCH);
            for i in 0..n {
                self.record(i, side);
            }
            if n < RECV_BATCH {
                return;
            }
        }
    }

    /// One non-blocking `recvmmsg` of up to `batch` datagrams; returns how many arrived.
    fn receive(&mut self, socket: &UdpSocket, batch: usize) -> usize {
        for i in 0..batch {
            let header = &mut self.headers[i].msg_hdr;
            header.msg_name = std::ptr::null_mut();
            header.msg_namelen = 0;
            header.msg_iov = &mut self.iovecs[i];
            header.msg_iovlen = 1;
            header.msg_control = self.controls[i].as_mut_ptr() as *mut libc::c_void;
            header.msg_controllen = 64;
        }
        // SAFETY: headers[..batch] point at this receiver's own iovecs (each over a 2048-byte
        // buffer of `buffers`) and 64-byte control buffers, which `&mut self` keeps alive and
        // unaliased for the call; the kernel writes within the lengths given.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                batch as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        n.max(0) as usize
    }

    fn record(&mut self, i: usize, side: usize) {
        let len = self.headers[i].msg_len as usize;
        let Ok(packet) = RtpPacket::parse(&self.buffers[i][..len]) else { return };
        let payload = packet.payload;
        if self.meta.get::<1>(side, payload, META_MEASURED) != Some([1]) {
            return; // a warm-up packet (or one the relay garbled: counted as lost)
        }
        let Some(stamp) = self.meta.get::<8>(side, payload, META_STAMP) else { return };
        let sent = u64::from_be_bytes(stamp);
        let Some(arrived) = kernel_timestamp(&self.headers[i].msg_hdr) else { return };
        let transit = arrived.saturating_sub(sent);
        self.received += 1;
        self.min_ns = self.min_ns.min(transit);
        self.histogram[((transit / 1000) as usize).min(HISTOGRAM_US)] += 1;
    }

    fn percentile_us(&self, p: f64) -> u64 {
        let rank = ((self.received as f64 - 1.0) * p).round().max(0.0) as u64;
        let mut seen = 0u64;
        for (us, &count) in self.histogram.iter().enumerate() {
            seen += count as u64;
            if seen > rank {
                return us as u64;
            }
        }
        HISTOGRAM_US as u64
    }
}

/// The SO_TIMESTAMPNS receive time (ns of CLOCK_REALTIME) of a received message.
fn kernel_timestamp(header: &libc::msghdr) -> Option<u64> {
    // SAFETY: `header` comes from a successful recvmmsg whose control buffer (this receiver's,
    // still alive) the kernel filled with well-formed control messages; CMSG_FIRSTHDR and
    // CMSG_NXTHDR return null or a header within `msg_controllen`, and the timespec is read
    // unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    None
}

/// The generator's two sockets and everything it needs for `calls` calls, allocated up front.
struct Generator {
    sockets: [UdpSocket; 2],
    /// Per side and call: the packet (header and payload rewritten in place).
    packets: [Vec<[u8; PACKET_LEN]>; 2],
    /// Per side and call: the relay port it sends to.
    targets: [Vec<libc::sockaddr_in>; 2],
    batches: [SendBatch; 2],
    receiver: Receiver,
    meta: MetaCode,
}

impl Generator {
    /// `transcode`: side 1's leg is A-law (payload type 8), side 0's μ-law.
    fn new(calls: usize, transcode: bool) -> Generator {
        let meta = MetaCode::new(transcode);
        let socket = || {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
            setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
            setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
            s
        };
        let per_slot = calls.div_ceil(SLOTS as usize) + 1;
        let packets = |side: u32| {
            (0..calls)
                .map(|call| {
                    let mut packet = [0xFFu8; PACKET_LEN];
                    let header = RtpHeader {
                        marker: false,
                        payload_type: if transcode && side == 1 { 8 } else { 0 },
                        sequence: 0,
                        timestamp: 0,
                        ssrc: (call as u32) << 1 | side,
                    };
                    header.rewrite(&mut packet).unwrap();
                    packet[0] = 0x80;
                    meta.put(side as usize, &mut packet[RTP_HEADER_LEN..], META_CALL, &(call as u32).to_be_bytes());
                    meta.put(side as usize, &mut packet[RTP_HEADER_LEN..], META_MEASURED, &[0]);
                    packet
                })
                .collect()
        };
        Generator {
            sockets: [socket(), socket()],
            packets: [packets(0), packets(1)],
            targets: [Vec::with_capacity(calls), Vec::with_capacity(calls)],
            batches: [SendBatch::new(per_slot), SendBatch::new(per_slot)],
            receiver: Receiver::new(meta.clone()),
            meta,
        }
    }

    fn addresses(&self) -> [SocketAddr; 2] {
        [self.sockets[0].local_addr().unwrap(), self.sockets[1].local_addr().unwrap()]
    }

    /// Advances every packet of the calls in `range` to its next sequence number and timestamp.
    fn next_packets(&mut self, range: std::ops::Range<usize>, measured: bool) {
        for (side, packets) in self.packets.iter_mut().enumerate() {
            for packet in &mut packets[range.clone()] {
                let sequence = u16::from_be_bytes([packet[2], packet[3]]).wrapping_add(1);
                packet[2..4].copy_from_slice(&sequence.to_be_bytes());
                packet[4..8].copy_from_slice(&(sequence as u32 * 160).to_be_bytes());
                self.meta.put(side, &mut packet[RTP_HEADER_LEN..], META_MEASURED, &[measured as u8]);
            }
        }
    }

    /// Runs the traffic: warm-up, then `measure`; calls `on_measure_start`/`on_measure_end` at
    /// the edges of the measured window. Returns the packets sent in the measured window.
    fn run(&mut self, measure: Duration, mut on_edge: impl FnMut(bool)) -> u64 {
        let calls = self.targets[0].len();
        self.receiver.reset();
        let slot_len = PACKET_INTERVAL / SLOTS;
        let total_slots = ((WARM_UP + measure).as_nanos() / slot_len.as_nanos()) as u64;
        let warm_up_slots = (WARM_UP.as_nanos() / slot_len.as_nanos()) as u64;
        let base = Instant::now();
        let mut slot = 0u64;
        let mut sent = 0u64;
        let mut end: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if end.is_none() {
                let due = base + slot_len * slot as u32;
                if now >= due {
                    if slot == warm_up_slots {
                        on_edge(true);
                    }
                    if slot == total_slots {
                        on_edge(false);
                        end = Some(now + DRAIN);
                        continue;
                    }
                    let in_period = (slot % SLOTS as u64) as usize;
                    let range = calls * in_period / SLOTS as usize..calls * (in_period + 1) / SLOTS as usize;
                    let measured = slot >= warm_up_slots;
                    self.next_packets(range.clone(), measured);
                    let started = Instant::now();
                    for side in 0..2 {
                        let n = self.batches[side].send(
                            &self.sockets[side],
                            &mut self.packets[side],
                            &self.targets[side],
                            range.clone(),
                            &self.meta,
                            side,
                        );
                        if measured {
                            sent += n as u64;
                        }
                    }
                    if measured {
                        // A send slower than the jitter limit: the generator stalled (its core or
                        // the VM), and its packets' transit times include that.
                        let took = started.elapsed();
                        self.receiver.slowest_send = self.receiver.slowest_send.max(took);
                        if took > Duration::from_micros(MAX_JITTER_US) {
                            self.receiver.stalled_sends += 1;
                        }
                    }
                    slot += 1;
                    continue;
                }
            }
            let wake_at = match end {
                Some(end) if now >= end => break,
                Some(end) => end,
                None => base + slot_len * slot as u32,
            };
            // Sleep rather than wait on the sockets: a receiver blocked on them would make every
            // relayed packet's send wake it, a cost that real far ends do not put on the relay.
            // The kernel timestamps keep the transit times exact however late this drains.
            thread::sleep(wake_at.saturating_duration_since(now));
            for (side, socket) in self.sockets.iter().enumerate() {
                self.receiver.drain(socket, side);
            }
        }
        sent
    }
}

// ---------------------------------------------------------------------------------------------
// Steps.

/// A thread on the relay's core that sleeps 1 ms again and again and records how late it
/// wakes while a step is measured: lateness well above a millisecond means the core itself
/// (the VM's vCPU) did not run for that long, whatever the relay does.
struct LatenessProbe {
    measuring: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    late_us: std::sync::Mutex<Vec<u32>>,
}

impl LatenessProbe {
    fn start(cpu: usize) -> std::sync::Arc<LatenessProbe> {
        use std::sync::atomic::Ordering::Relaxed;
        let probe = std::sync::Arc::new(LatenessProbe {
            measuring: false.into(),
            stop: false.into(),
            late_us: std::sync::Mutex::new(Vec::new()),
        });
        let p = std::sync::Arc::clone(&probe);
        thread::spawn(move || {
            pin_to(cpu);
            while !p.stop.load(Relaxed) {
                let before = Instant::now();
                thread::sleep(Duration::from_millis(1));
                let late = before.elapsed().saturating_sub(Duration::from_millis(1));
                if p.measuring.load(Relaxed) {
                    p.late_us.lock().unwrap().push(late.as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
        });
        probe
    }

    /// Starts or ends a measured window; at the end, returns (p99, max) lateness in µs.
    fn measure(&self, on: bool) -> (u32, u32) {
        self.measuring.store(on, std::sync::atomic::Ordering::Relaxed);
        let mut samples = std::mem::take(&mut *self.late_us.lock().unwrap());
        if on || samples.is_empty() {
            return (0, 0);
        }
        samples.sort_unstable();
        (samples[(samples.len() - 1) * 99 / 100], samples[samples.len() - 1])
    }
}

struct Bench {
    probe: std::sync::Arc<LatenessProbe>,
    runtime: tokio::runtime::Runtime,
    engine: MediaEngine,
    /// The engine thread's id, for its CPU time.
    relay_tid: u32,
    allocator: PortAllocator,
    /// Leg B is A-law: every packet is transcoded (`RTP_BENCH_TRANSCODE=1`).
    transcode: bool,
}

struct Calls {
    handles: Vec<RelayHandle>,
}

impl Bench {
    /// Starts `calls` relays whose legs' far ends are the generator's two sockets.
    fn start_calls(&self, generator: &mut Generator, calls: usize) -> Calls {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let [addr_a, addr_b] = generator.addresses();
        let mut pairs = Vec::with_capacity(calls);
        for _ in 0..calls {
            let a = self.allocator.allocate().expect("ports");
            let b = self.allocator.allocate().expect("ports");
            generator.targets[0].push(sockaddr_of(SocketAddr::new(localhost, a.rtp_port())));
            generator.targets[1].push(sockaddr_of(SocketAddr::new(localhost, b.rtp_port())));
            pairs.push((a, b));
        }
        let handles = self.runtime.block_on(async {
            pairs
                .into_iter()
                .map(|(a, b)| {
                    let a = RtpLegSetup { ports: a, media: LegMedia::new(Codec::Pcmu, Some(addr_a)) };
                    let b_codec = if self.transcode { Codec::Pcma } else { Codec::Pcmu };
                    let b = RtpLegSetup { ports: b, media: LegMedia::new(b_codec, Some(addr_b)) };
                    let config = RelayConfig { media_timeout: Duration::from_secs(3600) };
                    let (handle, events) = self.engine.spawn_relay(a, b, config).expect("relay");
                    drop(events);
                    handle
                })
                .collect()
        });
        Calls { handles }
    }

    fn stop_calls(&self, calls: Calls) -> u64 {
        let dropped = calls
            .handles
            .iter()
            .map(|h| {
                let s = h.stats();
                s.a.dropped_other + s.b.dropped_other + s.a.dropped_source + s.b.dropped_source
            })
            .sum();
        self.runtime.block_on(async {
            for handle in calls.handles {
                handle.stop().await;
            }
        });
        assert_eq!(self.allocator.in_use(), 0, "every port released");
        dropped
    }

    fn step(&self, calls: usize, secs: u64) -> StepResult {
        let mut generator = Generator::new(calls, self.transcode);
        let running = self.start_calls(&mut generator, calls);
        let (mut cpu, mut wall, mut other) = ((0u64, 0u64), (Instant::now(), Instant::now()), (0u64, 0u64));
        let mut core = ((0u64, 0u64), (0u64, 0u64));
        let mut generator_cpu = (0u64, 0u64);
        let mut core_late = (0, 0);
        let mut kernel_forwards = 0;
        let run_stats = || self.engine.kernel().and_then(|k| k.run_stats()).unwrap_or_default();
        let mut bpf = (run_stats(), run_stats());
        let sent = generator.run(Duration::from_secs(secs), |start| {
            core_late = self.probe.measure(start);
            if start {
                kernel_forwards = self.engine.kernel_forwards();
                bpf.0 = run_stats();
                cpu.0 = thread_cpu_ns(self.relay_tid);
                wall.0 = Instant::now();
                other.0 = other_ticks();
                core.0 = cpu_ticks(RELAY_CPU);
                generator_cpu.0 = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
            } else {
                bpf.1 = run_stats();
                cpu.1 = thread_cpu_ns(self.relay_tid);
                wall.1 = Instant::now();
                other.1 = other_ticks();
                core.1 = cpu_ticks(RELAY_CPU);
                generator_cpu.1 = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
            }
        });
        let relay_dropped = self.stop_calls(running);
        let r = &generator.receiver;
        let wall_s = (wall.1 - wall.0).as_secs_f64();
        let relay_cpu_ns = cpu.1.saturating_sub(cpu.0);
        StepResult {
            calls,
            sent,
            received: r.received,
            p50_us: r.percentile_us(0.50),
            p99_us: r.percentile_us(0.99),
            min_us: if r.received == 0 { 0 } else { r.min_ns / 1000 },
            relay_dropped,
            slowest_send_us: r.slowest_send.as_micros() as u64,
            core_late_p99_us: core_late.0,
            core_late_max_us: core_late.1,
            stalled_sends: r.stalled_sends,
            relay_cpu: relay_cpu_ns as f64 / 1e9 / wall_s,
            ns_per_packet: relay_cpu_ns.checked_div(r.received).unwrap_or(0),
            kernel_forwards,
            bpf_ns_per_run: (bpf.1.0.saturating_sub(bpf.0.0).as_nanos() as u64)
                .checked_div(bpf.1.1.saturating_sub(bpf.0.1))
                .unwrap_or(0),
            core_ns_per_packet: ((core.1.0.saturating_sub(core.0.0) as f64 / ticks_per_sec() * 1e9) as u64)
                .checked_div(r.received)
                .unwrap_or(0),
            other_load: other.1.saturating_sub(other.0) as f64 / ticks_per_sec() / wall_s,
            generator_cpu: generator_cpu.1.saturating_sub(generator_cpu.0) as f64 / 1e9 / wall_s,
            core_busy: core.1.0.saturating_sub(core.0.0) as f64 / ticks_per_sec() / wall_s,
            core_softirq: core.1.1.saturating_sub(core.0.1) as f64 / ticks_per_sec() / wall_s,
        }
    }

    /// RSS growth per call with `calls` calls set up and their traffic flowing for a second.
    fn memory_per_call(&self, calls: usize) -> (f64, f64) {
        let mut generator = Generator::new(calls, self.transcode);
        // Free heap pages go back to the system first: the BPF loader parses the kernel's BTF
        // (megabytes, freed after the load), and relays set up in those resident pages would
        // not grow the RSS at all.
        // SAFETY: malloc_trim only releases free memory of glibc's heap.
        unsafe { libc::malloc_trim(0) };
        let before = vm_rss_kib();
        let running = self.start_calls(&mut generator, calls);
        let idle = vm_rss_kib();
        generator.run(Duration::from_secs(1), |_| {});
        let flowing = vm_rss_kib();
        self.stop_calls(running);
        let per_call = |after: u64| after.saturating_sub(before) as f64 * 1024.0 / calls as f64;
        (per_call(idle), per_call(flowing))
    }
}

struct StepResult {
    calls: usize,
    sent: u64,
    received: u64,
    p50_us: u64,
    p99_us: u64,
    min_us: u64,
    relay_dropped: u64,
    /// The generator's slowest slot of sends, and how many slots took longer than the jitter
    /// limit: a failing step with stalled sends failed (at least partly) on the generator's side.
    slowest_send_us: u64,
    stalled_sends: u64,
    /// How late a 1 ms sleep on the relay's core woke (p99, max).
    core_late_p99_us: u32,
    core_late_max_us: u32,
    relay_cpu: f64,
    ns_per_packet: u64,
    /// Relay directions the kernel forwarded in the measured window.
    kernel_forwards: usize,
    /// The kernel forwarding program's own time per run (it runs on every packet the
    /// loopback device receives: the relayed one and, again, its rewritten copy).
    bpf_ns_per_run: u64,
    /// The relay core's busy time (thread, softirq, everything) per relayed packet.
    core_ns_per_packet: u64,
    other_load: f64,
    /// The relay's core: all of its busy time, and the part spent in softirqs (the kernel's
    /// network processing, which the thread's own CPU time does not include).
    core_busy: f64,
    core_softirq: f64,
    /// The load generator's thread (on the other core): near 100 % it cannot keep up, and a
    /// failing step says more about the generator than about the relay.
    generator_cpu: f64,
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

// ---------------------------------------------------------------------------------------------
// The syscall floor: what the kernel charges per relayed packet, without tokio.

struct Floor {
    recv_ns: f64,
    send_ns: f64,
    empty_recv_ns: f64,
    recvmmsg_ns: f64,
}

/// On the relay's core, in thread CPU time (so that time the thread is preempted does not
/// count): 64 sockets like relay legs, each with one datagram queued, receive it, find out that
/// they are drained and send it on (the work the relay cannot avoid per packet); then the same
/// receive done by one `recvmmsg` that also reports the socket drained.
fn syscall_floor() -> Floor {
    const LEGS: usize = 64;
    const ROUNDS: usize = 1000;
    let bind = |nonblocking: bool| {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        s.set_nonblocking(nonblocking).unwrap();
        s
    };
    let (source, sink) = (bind(false), bind(true));
    let legs: Vec<UdpSocket> = (0..LEGS).map(|_| bind(true)).collect();
    let addresses: Vec<SocketAddr> = legs.iter().map(|l| l.local_addr().unwrap()).collect();
    let to_sink = sink.local_addr().unwrap();
    let packet = [0x80u8; PACKET_LEN];
    let mut buf = [0u8; 2048];
    let cpu = || clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
    let queue_one_each = || {
        for to in &addresses {
            source.send_to(&packet, to).unwrap();
        }
    };
    let (mut recv_ns, mut empty_ns, mut send_ns, mut mmsg_ns) = (0u64, 0u64, 0u64, 0u64);
    let mut batch = Receiver::new(MetaCode::new(false));
    for _ in 0..ROUNDS {
        queue_one_each();
        let t0 = cpu();
        for leg in &legs {
            leg.recv_from(&mut buf).unwrap();
        }
        let t1 = cpu();
        for leg in &legs {
            assert_eq!(leg.recv_from(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        }
        let t2 = cpu();
        for leg in &legs {
            leg.send_to(&buf[..PACKET_LEN], to_sink).unwrap();
        }
        let t3 = cpu();
        while sink.recv_from(&mut buf).is_ok() {}
        queue_one_each();
        let t4 = cpu();
        for leg in &legs {
            assert_eq!(batch.receive(leg, 4), 1);
        }
        let t5 = cpu();
        (recv_ns, empty_ns, send_ns, mmsg_ns) =
            (recv_ns + t1 - t0, empty_ns + t2 - t1, send_ns + t3 - t2, mmsg_ns + t5 - t4);
    }
    let per_packet = |ns: u64| ns as f64 / (LEGS * ROUNDS) as f64;
    Floor {
        recv_ns: per_packet(recv_ns),
        send_ns: per_packet(send_ns),
        empty_recv_ns: per_packet(empty_ns),
        recvmmsg_ns: per_packet(mmsg_ns),
    }
}

/// Receive packet steering of the loopback device to one CPU, undone when dropped. All of
/// the loopback's packets then queue on that CPU's backlog, whose default length (1,000
/// packets: 2.5 ms at the 400,000 packets/s of 2,000 calls) a stall of the core overflows; it is
/// raised to what a media server would be tuned to (`net.core.netdev_max_backlog`, as for a
/// NIC's receive ring) and put back afterwards.
struct ReceiveSteering {
    before: Vec<(&'static str, String)>,
}

const LO_RPS: &str = "/sys/class/net/lo/queues/rx-0/rps_cpus";
const MAX_BACKLOG: &str = "/proc/sys/net/core/netdev_max_backlog";
const BACKLOG: u32 = 16384;

impl ReceiveSteering {
    fn to(cpu: usize) -> ReceiveSteering {
        let mut before = Vec::new();
        for (path, value) in [(LO_RPS, format!("{:x}", 1u64 << cpu)), (MAX_BACKLOG, BACKLOG.to_string())] {
            if let Ok(old) = std::fs::read_to_string(path) {
                before.push((path, old));
            }
            if let Err(error) = std::fs::write(path, &value) {
                println!("(cannot write {value} to {path}: {error}; the figures are not per core)");
            }
        }
        println!("(for the run: loopback receive processing on CPU {cpu}, net.core.netdev_max_backlog = {BACKLOG})");
        ReceiveSteering { before }
    }
}

impl Drop for ReceiveSteering {
    fn drop(&mut self) {
        for (path, old) in &self.before {
            let _ = std::fs::write(path, old.trim());
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then run a single tiny
    // step so that test runs stay quick.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let env = |name: &str| std::env::var(name).ok();
    let secs: u64 = if benchmarking { env("RTP_BENCH_SECS").and_then(|s| s.parse().ok()).unwrap_or(3) } else { 1 };
    let steps: Vec<usize> = match env("RTP_BENCH_STEPS") {
        Some(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        None if benchmarking => vec![250, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000],
        None => vec![10],
    };
    let mem_calls: usize =
        env("RTP_BENCH_MEM_CALLS").and_then(|s| s.parse().ok()).unwrap_or(if benchmarking { 2000 } else { 10 });

    let floor = thread::spawn(move || {
        pin_to(RELAY_CPU);
        benchmarking.then(syscall_floor)
    })
    .join()
    .unwrap();
    let kernel = match env("RTP_BENCH_KERNEL").as_deref() {
        Some("off") => KernelMode::Off,
        Some("on") => KernelMode::On,
        _ => KernelMode::Auto,
    };
    let engine = MediaEngine::start(&EngineConfig { threads: 1, cpus: vec![RELAY_CPU], kernel }).expect("media engine");
    // With kernel forwarding the relaying happens in the network receive path (softirq), on
    // the core that processes the packet: receive packet steering puts all of the loopback
    // device's receive processing (forwarding, and the generator's own receives) on the
    // relay's core, so that the core's busy time is the relay's whole cost.
    let _run_stats = engine.kernel().is_some().then(KernelForwarder::enable_run_stats);
    let _steering = (engine.kernel().is_some() && env("RTP_BENCH_STEER").as_deref() != Some("0"))
        .then(|| ReceiveSteering::to(RELAY_CPU));
    // The thread names itself once it runs.
    let relay_tid = (0..100)
        .find_map(|_| {
            let tid = thread_named("media-0");
            if tid.is_none() {
                thread::sleep(Duration::from_millis(10));
            }
            tid
        })
        .expect("the media thread");
    pin_to(GENERATOR_CPU);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let allocator = PortAllocator::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PortRange { min: 20000, max: 60999 }).unwrap();
    let probe = LatenessProbe::start(RELAY_CPU);
    let transcode = env("RTP_BENCH_TRANSCODE").is_some_and(|v| v == "1");
    let bench = Bench { probe, runtime, engine, relay_tid, allocator, transcode };

    println!(
        "rtp_relay: G.711 20 ms, 50 pps per direction per call, relay on one media engine thread (CPU {RELAY_CPU}); \
         {}; kernel forwarding: {}",
        if bench.transcode { "leg A μ-law, leg B A-law: every packet transcoded" } else { "μ-law on both legs" },
        if bench.engine.kernel().is_some() {
            "on (loopback receive processing steered to the relay's core)"
        } else {
            "off (every packet through user space)"
        }
    );
    if let Some(floor) = &floor {
        println!(
            "syscall floor on the relay's core (thread CPU time): recvfrom {:.0} ns + sendto {:.0} ns = {:.0} ns per relayed packet \
             (a recvfrom that finds nothing: {:.0} ns; recvmmsg taking one datagram and finding the socket \
             drained: {:.0} ns)",
            floor.recv_ns,
            floor.send_ns,
            floor.recv_ns + floor.send_ns,
            floor.empty_recv_ns,
            floor.recvmmsg_ns,
        );
    }
    let (idle, flowing) = bench.memory_per_call(mem_calls);
    println!(
        "memory per relayed call (VmRSS delta / {mem_calls} calls): {:.0} bytes set up, {:.0} bytes with traffic \
         (kernel socket memory not included)",
        idle, flowing
    );
    println!(
        "{:>6} {:>9} {:>9} {:>7} {:>6} {:>6} {:>7} {:>6} {:>7} {:>5} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "calls",
        "sent",
        "received",
        "loss%",
        "p50us",
        "p99us",
        "jit_us",
        "relay",
        "ns/pkt",
        "kfwd",
        "bpf_ns",
        "core_ns",
        "core",
        "sirq",
        "gen",
        "other",
        "result"
    );
    let mut best = 0;
    let mut best_cpu = 0.0;
    let mut first: Option<(u64, u64, f64)> = None;
    for calls in steps {
        let mut result = bench.step(calls, secs);
        if !result.passed() {
            println!(
                "{:>6} failed (p99 {} µs, loss {:.3} %, {:.0}% other load); repeating once",
                calls,
                result.p99_us,
                result.loss() * 100.0,
                result.other_load * 100.0
            );
            result = bench.step(calls, secs);
        }
        println!(
            "{:>6} {:>9} {:>9} {:>7.3} {:>6} {:>6} {:>7} {:>5.0}% {:>7} {:>5} {:>6} {:>7} {:>5.0}% {:>5.0}% {:>5.0}% {:>5.0}% {:>6}{}",
            result.calls,
            result.sent,
            result.received,
            result.loss() * 100.0,
            result.p50_us,
            result.p99_us,
            result.jitter_us(),
            result.relay_cpu * 100.0,
            result.ns_per_packet,
            result.kernel_forwards,
            result.bpf_ns_per_run,
            result.core_ns_per_packet,
            result.core_busy * 100.0,
            result.core_softirq * 100.0,
            result.generator_cpu * 100.0,
            result.other_load * 100.0,
            if result.passed() { "ok" } else { "FAIL" },
            if result.relay_dropped > 0 { format!(" (relay dropped {})", result.relay_dropped) } else { String::new() }
                + &format!(
                    " (relay core: 1 ms sleeps woke late by p99 {} µs, max {} µs)",
                    result.core_late_p99_us, result.core_late_max_us
                )
                + &if result.stalled_sends > 0 {
                    format!(
                        " (generator: {} slots' sends took > 1 ms, slowest {} µs)",
                        result.stalled_sends, result.slowest_send_us
                    )
                } else {
                    String::new()
                },
        );
        first.get_or_insert((result.sent, result.received, result.loss()));
        if !result.passed() {
            break;
        }
        best = calls;
        best_cpu = result.core_busy;
    }
    println!(
        "maximum concurrent relayed calls on one core within 0.1 % loss and 1 ms jitter p99: {best} \
         (relay core {:.0}% busy)",
        best_cpu * 100.0
    );
    bench.probe.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if !benchmarking {
        // The test run (`cargo test --all-targets`) checks that the relay relays: packets went
        // out and came back through it with (almost) none lost. Its timing figures are not
        // judged here: a loaded test machine's jitter says nothing about the code.
        let (sent, received, loss) = first.expect("the test run has a step");
        assert!(sent > 0, "rtp_relay: the generator sent nothing");
        assert!(received > 0 && loss <= 0.01, "rtp_relay: {received} of {sent} packets came through the relay");
        println!("rtp_relay: test run passed ({received} of {sent} packets relayed)");
    }
}
