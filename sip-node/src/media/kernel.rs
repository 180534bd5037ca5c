//! Kernel forwarding: the media engine's fast path for steady RTP.
//!
//! Why: relaying a packet in user space costs a `recvfrom` and a `sendto` (3–6 µs of a core on
//! the benchmark VMs, ~95 % of it in the kernel), which caps a core at ~1,000–1,750 relayed
//! calls. rtpengine answers the same problem with a kernel module; this is the eBPF version of
//! it: a tc classifier (`bpf/relay.bpf.c`) on the ingress of the media interface rewrites a
//! steady stream's packets (payload type, sequence number, timestamp, SSRC, addresses) exactly
//! as the user-space relay would and redirects them out, so that they never reach a socket.
//!
//! User space keeps all of the logic: a relay direction is *installed* here only while it is
//! steady (peer latched, one input stream, directions that allow it, PCMU/PCMA on both legs:
//! the program transcodes between them with g711.rs's tables;
//! see [`super::relay`]), and the program passes anything it does not recognise (DTMF events,
//! RTCP, another source or SSRC, a sequence jump, garbage) on to the node's socket unchanged,
//! where user space handles it and re-installs the entry. The program keeps the entry's
//! sequence state and counters up to date; user space reads them back before it handles a
//! packet of an installed direction, for the media timeout and at the end of the call.
//!
//! Needs CAP_BPF and CAP_NET_ADMIN (root in the benchmark and the tests) and a kernel with tcx
//! (6.6; its attachment ends with the process, so a crashed node leaves nothing forwarding);
//! without them the node relays in user space (`--kernel-forwarding auto`, the
//! default) or refuses to start (`on`). Only IPv4 is offloaded; a node whose media sockets are
//! bound to `0.0.0.0` has the program on every interface with an IPv4 address, and answers
//! from the address a packet came to.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};

/// The program, built by build.rs (empty when clang was missing).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

/// Whether the node uses kernel forwarding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelMode {
    /// User space only.
    #[default]
    Off,
    /// Kernel forwarding when the program loads and attaches; user space otherwise.
    Auto,
    /// Kernel forwarding or no start.
    On,
}

/// Why kernel forwarding is not available.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The node was built without clang.
    #[error("kernel forwarding is not built into this binary (clang was missing at build time)")]
    NotBuilt,
    /// Loading or verifying the program failed (no CAP_BPF, an old kernel...).
    #[error("cannot load the kernel forwarding program: {0}")]
    Load(String),
    /// Attaching to an interface failed.
    #[error("cannot attach kernel forwarding to {interface}: {reason}")]
    Attach { interface: String, reason: String },
    /// A map operation failed.
    #[error("kernel forwarding map: {0}")]
    Map(String),
}

/// The node socket a packet is addressed to. Mirrors `struct forward_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForwardKey {
    addr: u32,
    port: u16,
    pad: u16,
}

// SAFETY: `Pod` lets aya copy the key to and from the kernel's map as raw bytes. That holds for
// a repr(C) struct of plain integers with no padding (4 + 2 + 2 bytes, checked by a test): every
// byte is initialised and every bit pattern is a valid value.
unsafe impl aya::Pod for ForwardKey {}

impl ForwardKey {
    /// The key of a node socket, if it can be offloaded (IPv4; a socket bound to 0.0.0.0 is
    /// keyed by its port alone).
    pub fn of(socket: SocketAddr) -> Option<ForwardKey> {
        let v4 = match socket {
            SocketAddr::V4(v4) => v4,
            // `::` takes IPv4 too, but its IPv4 traffic is not worth a second key shape.
            SocketAddr::V6(_) => return None,
        };
        Some(ForwardKey { addr: be_addr(*v4.ip()), port: v4.port().to_be(), pad: 0 })
    }
}

/// One installed direction. Mirrors `struct forward_entry`: addresses, ports and SSRCs in
/// network order, the rest in host order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardEntry {
    peer_addr: u32,
    peer_port: u16,
    in_pt: u8,
    out_pt: u8,
    in_ssrc: u32,
    out_ssrc: u32,
    ts_offset: u32,
    seq_offset: u16,
    /// Highest input sequence number forwarded (the program keeps it up to date).
    pub highest_seq: u16,
    from_addr: u32,
    to_addr: u32,
    from_port: u16,
    to_port: u16,
    /// Output timestamp of the highest packet.
    pub last_out_ts: u32,
    /// [`FORWARD_LOCAL`] when the other leg's peer is on this host.
    flags: u32,
    /// The interface this leg's peer sends in by: the other direction's way out (the program
    /// learns it).
    pub in_ifindex: u32,
    /// CLOCK_MONOTONIC nanoseconds of the last packet the program forwarded.
    pub last_ns: u64,
    /// Packets and RTP bytes forwarded by the program.
    pub packets: u64,
    pub bytes: u64,
    /// Sequence gaps and late packets the program saw.
    pub lost: u64,
    pub late: u64,
}

// SAFETY: as for `ForwardKey`: repr(C) integers laid out without implicit padding (the test
// checks the size, 88 bytes, that the program's `struct forward_entry` has), so every byte is
// initialised and any bit pattern the program writes is a valid value.
unsafe impl aya::Pod for ForwardEntry {}

/// What user space decides for an installed direction: who may send, and how packets are
/// rewritten. The rest of [`ForwardEntry`] is state the program keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardRule {
    /// The latched peer of the receiving leg.
    pub peer: SocketAddrV4,
    pub in_pt: u8,
    pub out_pt: u8,
    pub in_ssrc: u32,
    pub out_ssrc: u32,
    pub seq_offset: u16,
    pub ts_offset: u32,
    /// The other leg's node socket and its peer.
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    /// The other leg's peer is on this host (loopback, or the node's own address): the
    /// program sends through the loopback device rather than out of the interface.
    pub local: bool,
    /// G.711 transcoding of the payload, when the legs' codecs differ.
    pub transcode: Option<Transcode>,
}

/// Which way the program transcodes a payload (its tables are g711.rs's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transcode {
    /// PCMU in, PCMA out.
    UlawToAlaw,
    /// PCMA in, PCMU out.
    AlawToUlaw,
}

impl ForwardRule {
    /// The entry for this rule, starting from user space's sequence state.
    pub fn entry(&self, highest_seq: u16, last_out_ts: u32) -> ForwardEntry {
        ForwardEntry {
            peer_addr: be_addr(*self.peer.ip()),
            peer_port: self.peer.port().to_be(),
            in_pt: self.in_pt,
            out_pt: self.out_pt,
            in_ssrc: self.in_ssrc.to_be(),
            out_ssrc: self.out_ssrc.to_be(),
            ts_offset: self.ts_offset,
            seq_offset: self.seq_offset,
            highest_seq,
            from_addr: be_addr(*self.from.ip()),
            to_addr: be_addr(*self.to.ip()),
            from_port: self.from.port().to_be(),
            to_port: self.to.port().to_be(),
            last_out_ts,
            flags: (if self.local { FORWARD_LOCAL } else { 0 })
                | match self.transcode {
                    None => 0,
                    Some(Transcode::UlawToAlaw) => FORWARD_ULAW_TO_ALAW,
                    Some(Transcode::AlawToUlaw) => FORWARD_ALAW_TO_ULAW,
                },
            last_ns: monotonic_ns(),
            ..ForwardEntry::default()
        }
    }
}

/// Map update flags (linux/bpf.h): create only, replace only.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// `flags` bits (as in the program): the peer is local; the payload is transcoded.
const FORWARD_LOCAL: u32 = 1;
const FORWARD_ULAW_TO_ALAW: u32 = 2;
const FORWARD_ALAW_TO_ULAW: u32 = 4;

fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The IPv4 form of an address (v4-mapped v6 included).
pub fn ipv4_of(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, v6.port())),
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    super::sys::monotonic_ns()
}

/// The instant `ns` (CLOCK_MONOTONIC) stands for, as an `Instant` (which uses the same clock).
pub fn instant_of(ns: u64) -> Instant {
    let ago = monotonic_ns().saturating_sub(ns);
    Instant::now().checked_sub(Duration::from_nanos(ago)).unwrap_or_else(Instant::now)
}

/// The loaded program, attached to the interfaces the node's media sockets use, and its map.
pub struct KernelForwarder {
    ebpf: Mutex<Ebpf>,
    map: Mutex<BpfHashMap<MapData, ForwardKey, ForwardEntry>>,
    /// Node addresses: attached (true) or impossible to attach (false).
    interfaces: Mutex<HashMap<IpAddr, bool>>,
    /// Interfaces the program is attached to.
    attached: Mutex<Vec<String>>,
    /// Packets the program forwarded, as far as relays have taken its counters back.
    forwarded: std::sync::atomic::AtomicU64,
    /// This host's IPv4 addresses, as of the last attach.
    local: Mutex<Vec<Ipv4Addr>>,
    installed: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for KernelForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelForwarder").field("installed", &self.installed()).finish()
    }
}

impl KernelForwarder {
    /// Loads and verifies the program; it is attached to an interface when the first relay
    /// on an address of that interface is offloaded ([`KernelForwarder::ready_for`]).
    pub fn load() -> Result<KernelForwarder, KernelError> {
        if PROGRAM.is_empty() {
            return Err(KernelError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| KernelError::Load(e.to_string()))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut("relay")
            .ok_or_else(|| KernelError::Load("no program named relay".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| KernelError::Load(e.to_string()))?;
        program.load().map_err(|e| KernelError::Load(e.to_string()))?;
        let map = ebpf.take_map("forwards").ok_or_else(|| KernelError::Load("no map named forwards".into()))?;
        let map = BpfHashMap::try_from(map).map_err(|e| KernelError::Load(e.to_string()))?;
        Ok(KernelForwarder {
            ebpf: Mutex::new(ebpf),
            map: Mutex::new(map),
            interfaces: Mutex::new(HashMap::new()),
            attached: Mutex::new(Vec::new()),
            forwarded: std::sync::atomic::AtomicU64::new(0),
            local: Mutex::new(Vec::new()),
            installed: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Whether packets to the node address `ip` pass the program: attaches it to the
    /// interface holding `ip` the first time, or to every interface with an IPv4 address for
    /// `0.0.0.0` (a failure is logged once and remembered).
    pub fn ready_for(&self, ip: IpAddr) -> bool {
        let mut interfaces = self.interfaces.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&ready) = interfaces.get(&ip) {
            return ready;
        }
        let ready = match self.attach_for(ip) {
            Ok(interface) => {
                tracing::info!(%ip, interface, "kernel RTP forwarding attached");
                true
            }
            Err(error) => {
                tracing::warn!(%ip, %error, "kernel RTP forwarding unavailable for this address; relaying in user space");
                false
            }
        };
        interfaces.insert(ip, ready);
        ready
    }

    fn attach_for(&self, ip: IpAddr) -> Result<String, KernelError> {
        let interfaces = interfaces_of(ip);
        if interfaces.is_empty() {
            return Err(KernelError::Attach {
                interface: ip.to_string(),
                reason: "no interface has this address".into(),
            });
        }
        let mut attached = Vec::new();
        for interface in interfaces {
            match self.attach(&interface) {
                Ok(()) => attached.push(interface),
                // Some interfaces of a wildcard may refuse (no tc on them); the others still work.
                Err(error) if ip.is_unspecified() => {
                    tracing::warn!(%error, "kernel RTP forwarding skips this interface")
                }
                Err(error) => return Err(error),
            }
        }
        if attached.is_empty() {
            return Err(KernelError::Attach {
                interface: ip.to_string(),
                reason: "no interface took the program".into(),
            });
        }
        Ok(attached.join(","))
    }

    /// Attaches the program to one interface's ingress (once per interface).
    fn attach(&self, interface: &str) -> Result<(), KernelError> {
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        if attached.iter().any(|i| i == interface) {
            return Ok(());
        }
        let interface = interface.to_string();
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let program: &mut SchedClassifier = ebpf
            .program_mut("relay")
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| KernelError::Load("program relay missing".into()))?;
        // tcx only (Linux 6.6): its link belongs to this process and goes with it, however the
        // process ends. A netlink (clsact) filter would outlive a crashed node and keep
        // forwarding its calls' ports to their old peers.
        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
        program.attach_with_options(&interface, TcAttachType::Ingress, options).map_err(|e| KernelError::Attach {
            interface: interface.clone(),
            reason: format!("{e} (needs tcx, Linux 6.6)"),
        })?;
        attached.push(interface);
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = local_ipv4s();
        Ok(())
    }

    /// Whether `ip` is an address of this host (loopback included): a peer there is reached
    /// through the loopback device.
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        ip.is_loopback() || self.local.lock().unwrap_or_else(|p| p.into_inner()).contains(&ip)
    }

    /// Installs (or replaces) the entry for a node socket.
    pub fn install(&self, key: ForwardKey, entry: ForwardEntry) -> Result<(), KernelError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // One syscall in the usual case (the relay removes a direction before it installs it
        // again); an entry that is there after all is replaced without being counted twice.
        if map.insert(key, entry, BPF_NOEXIST).is_ok() {
            self.installed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        map.insert(key, entry, BPF_EXIST).map_err(|e| KernelError::Map(e.to_string()))
    }

    /// The entry for a node socket as the program left it.
    pub fn read(&self, key: &ForwardKey) -> Option<ForwardEntry> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(key, 0).ok()
    }

    /// Removes the entry for a node socket, returning its last state.
    pub fn remove(&self, key: &ForwardKey) -> Option<ForwardEntry> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let last = map.get(key, 0).ok();
        if map.remove(key).is_ok() {
            self.installed.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        last
    }

    /// The program's run time and runs so far, when the kernel accounts them
    /// ([`KernelForwarder::enable_run_stats`]).
    pub fn run_stats(&self) -> Option<(Duration, u64)> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let info = ebpf.program("relay")?.info().ok()?;
        Some((info.run_time(), info.run_count()))
    }

    /// Turns on the kernel's accounting of BPF program run time for as long as the returned
    /// descriptor is open (benchmarks: it costs two clock reads per run).
    pub fn enable_run_stats() -> Option<std::os::fd::OwnedFd> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()
    }

    /// Counts packets the program forwarded for a relay (when the relay takes them back).
    pub fn count_forwarded(&self, packets: u64) {
        self.forwarded.fetch_add(packets, std::sync::atomic::Ordering::Relaxed);
    }

    /// Packets the program forwarded, as far as relays have taken its counters back (at the
    /// latest when their calls end).
    pub fn forwarded_packets(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Directions forwarded in the kernel now.
    pub fn installed(&self) -> usize {
        self.installed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The interfaces to attach to for node address `ip`: the one holding it (`lo` for loopback
/// addresses), or every interface with an IPv4 address for `0.0.0.0`.
fn interfaces_of(ip: IpAddr) -> Vec<String> {
    if ip.is_loopback() {
        return vec!["lo".into()];
    }
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut found: Vec<String> = addresses
        .filter(|ifa| {
            let Some(address) = &ifa.address else { return false };
            match ip {
                IpAddr::V4(v4) if v4.is_unspecified() => address.as_sockaddr_in().is_some(),
                IpAddr::V4(v4) => address.as_sockaddr_in().is_some_and(|a| a.ip() == v4),
                IpAddr::V6(v6) => address.as_sockaddr_in6().is_some_and(|a| a.ip() == v6),
            }
        })
        .map(|ifa| ifa.interface_name)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// This host's IPv4 addresses.
fn local_ipv4s() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|addresses| addresses.filter_map(|ifa| Some(ifa.address?.as_sockaddr_in()?.ip())).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_layout_matches_the_program() {
        // struct forward_entry in bpf/relay.bpf.c: 48 bytes of fields, then five u64.
        assert_eq!(std::mem::size_of::<ForwardEntry>(), 88);
        assert_eq!(std::mem::offset_of!(ForwardEntry, last_ns), 48);
        assert_eq!(std::mem::size_of::<ForwardKey>(), 8);
    }

    #[test]
    fn only_ipv4_sockets_have_keys() {
        assert!(ForwardKey::of("127.0.0.1:10000".parse().unwrap()).is_some());
        let wildcard = ForwardKey::of("0.0.0.0:10000".parse().unwrap()).unwrap();
        assert_eq!(wildcard.addr, 0, "a wildcard socket is keyed by its port");
        assert!(ForwardKey::of("[::1]:10000".parse().unwrap()).is_none());
        let key = ForwardKey::of("127.0.0.1:10000".parse().unwrap()).unwrap();
        assert_eq!(key.addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), 10000u16.to_be_bytes());
    }

    #[test]
    fn the_programs_transcoding_tables_are_g711s() {
        let source = include_str!("../../bpf/relay.bpf.c");
        for (name, convert) in [
            ("ulaw_to_alaw", crate::media::g711::ulaw_to_alaw as fn(u8) -> u8),
            ("alaw_to_ulaw", crate::media::g711::alaw_to_ulaw),
        ] {
            let opening = format!("{name}[256] = {{");
            let start = source.find(&opening).expect("table in the program") + opening.len();
            let end = start + source[start..].find('}').unwrap();
            let table: Vec<u8> = source[start..end].split(',').filter_map(|v| v.trim().parse().ok()).collect();
            let expected: Vec<u8> = (0..=255u8).map(convert).collect();
            assert_eq!(table, expected, "{name}");
        }
    }

    #[test]
    fn monotonic_time_converts_to_instants() {
        let then = instant_of(monotonic_ns() - 1_000_000_000);
        let ago = Instant::now() - then;
        assert!(ago >= Duration::from_millis(999) && ago < Duration::from_millis(1100), "{ago:?}");
    }
}
