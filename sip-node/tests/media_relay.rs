//! Anchored media between two SIP legs: a caller and a callee on loopback (raw SIP over UDP,
//! real RTP streams) talk through the node. Each side sees only the node's address in SDP; RTP
//! from each side reaches the other (transcoded when the caller speaks PCMA and the callee
//! PCMU); hold and resume by re-INVITE change what flows; a call whose RTP stops ends with a
//! media timeout in its CDR.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::ua::*;
use common::*;
use sqlx::PgPool;
use switchboard_node::media::g711;

/// A request from the caller's side of the dialog.
fn caller_request(
    method: &str,
    cseq: u32,
    node: SocketAddr,
    ua: SocketAddr,
    to_tag: Option<&str>,
    sdp: Option<&str>,
) -> String {
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    let (ct, body) = match sdp {
        Some(sdp) => ("Content-Type: application/sdp\r\n", sdp),
        None => ("", ""),
    };
    format!(
        "{method} sip:{DID}@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {ua};branch=z9hG4bK{method}{cseq}x{to_tag_len}\r\n\
         From: <sip:+15557654321@{ua}>;tag=caller\r\nTo: <sip:{DID}@{node}>{to_tag}\r\nCall-ID: media-call@test\r\n\
         CSeq: {cseq} {method}\r\nContact: <sip:caller@{ua}>\r\nSupported: 100rel, timer, replaces\r\nMax-Forwards: 70\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len(),
        to_tag_len = to_tag.len(),
    )
}

/// An ACK or BYE from the callee's side of the dialog (the node's outbound leg).
fn callee_request(method: &str, invite: &str, ua: SocketAddr, node: SocketAddr, cseq: u32) -> String {
    // The callee's From is the INVITE's To (with our tag), its To the INVITE's From.
    let from = header(invite, "From").unwrap();
    let to = header(invite, "To").unwrap();
    let call_id = header(invite, "Call-ID").unwrap();
    format!(
        "{method} sip:{node} SIP/2.0\r\nVia: SIP/2.0/UDP {ua};branch=z9hG4bKcallee{method}{cseq}\r\nFrom: {to};tag=callee\r\n\
         To: {from}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Sets up a call: the caller offers `caller_formats`, the callee answers `callee_formats`.
/// Returns (caller's 200, callee's INVITE) after the caller's ACK.
async fn establish(
    node: &Node,
    caller: &Ua,
    callee: &Ua,
    caller_formats: &str,
    callee_formats: &str,
) -> (String, String) {
    let offer = sdp(caller.rtp_port(), caller_formats, "sendrecv");
    caller.send(&caller_request("INVITE", 1, node.addr, caller.sip_addr(), None, Some(&offer)), node.addr).await;
    let (invite, from) = callee.request("INVITE").await;
    let answer = sdp(callee.rtp_port(), callee_formats, "sendrecv");
    callee.send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    let _ack = callee.request("ACK").await;
    let ok = caller.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let to_tag = header(&ok, "To").and_then(|t| t.split("tag=").nth(1)).unwrap().to_string();
    caller.send(&caller_request("ACK", 1, node.addr, caller.sip_addr(), Some(&to_tag), None), node.addr).await;
    (ok, invite)
}

fn to_tag(ok: &str) -> String {
    header(ok, "To").and_then(|t| t.split("tag=").nth(1)).unwrap().to_string()
}

/// A node routing the DID to `callee`, with its own RTP range (the tests of this file run in
/// parallel and check that their ports are free again after each call).
async fn start(pool: &PgPool, carrier: switchboard_model::TrunkConfig, callee: &Ua, ports: &str, timeout: u64) -> Node {
    let destination = number_to(sip_destination(callee.sip_addr().port()));
    Node::start_tuned(pool, vec![carrier], vec![destination], vec![], |args| {
        args.rtp_ports = ports.into();
        args.media_timeout_seconds = timeout;
    })
    .await
}

/// Every RTP and RTCP port the node used for the call is free again (bounded wait: the relay
/// closes its sockets as the call ends).
async fn ports_released(rtp: &[SocketAddr]) {
    for addr in rtp {
        for port in [addr.port(), addr.port() + 1] {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while std::net::UdpSocket::bind(("127.0.0.1", port)).is_err() {
                assert!(tokio::time::Instant::now() < deadline, "port {port} still held after the call ended");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sends `count` frames from `ua` to `to` 20 ms apart, each frame's bytes = its index + `base`.
async fn talk(ua: &Ua, to: SocketAddr, pt: u8, count: u16, base: u8) {
    for i in 0..count {
        ua.rtp_send(to, pt, 100 + i, &[base.wrapping_add(i as u8); 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn rtp_flows_through_the_node_both_ways_with_transcoding(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![switchboard_model::Codec::Pcma, switchboard_model::Codec::Pcmu];
    let node = start(&pool, carrier, &callee, "41000-41099", 30).await;

    // The caller speaks PCMA only; the callee answers PCMU only.
    let (ok, invite) = establish(&node, &caller, &callee, "8", "0").await;
    let node_for_caller = sdp_rtp(&ok);
    let node_for_callee = sdp_rtp(&invite);
    assert_eq!(node_for_caller.ip().to_string(), "127.0.0.1");
    assert_ne!(node_for_caller.port(), caller.rtp_port(), "the caller must see the node's port: {ok}");
    assert_ne!(node_for_callee.port(), caller.rtp_port(), "the callee must see the node's port: {invite}");
    assert_ne!(node_for_caller, node_for_callee, "one port pair per leg");
    assert!(body(&ok).contains("PCMA/8000"), "the caller's answer keeps its codec: {ok}");
    assert!(body(&invite).contains("PCMA/8000"), "the node offers the caller's codec first: {invite}");
    let supported = header(&invite, "Supported").unwrap_or_default();
    assert!(
        supported.contains("replaces") && supported.contains("100rel") && supported.contains("timer"),
        "extensions the node handles are offered to the callee (100rel: the node PRACKs; timer: it refreshes): {supported:?}"
    );

    // Audio from the caller (A-law) reaches the callee as μ-law, and back.
    let level = g711::linear_to_alaw(4000);
    let from_caller = tokio::join!(
        async {
            for i in 0..10u16 {
                caller.rtp_send(node_for_caller, 8, 1 + i, &[level; 160]).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
        callee.rtp_collect(Duration::from_millis(700))
    )
    .1;
    assert!(from_caller.len() >= 9, "caller audio must reach the callee: {} packets", from_caller.len());
    for (pt, payload) in &from_caller {
        assert_eq!(*pt, 0, "the callee receives its own codec");
        let sample = g711::ulaw_to_linear(payload[0]);
        assert!((sample - 4000).abs() < 300, "transcoded sample {sample} should be near 4000");
    }
    let ulaw = g711::linear_to_ulaw(-2500);
    let from_callee = tokio::join!(
        async {
            for i in 0..10u16 {
                callee.rtp_send(node_for_callee, 0, 500 + i, &[ulaw; 160]).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
        caller.rtp_collect(Duration::from_millis(700))
    )
    .1;
    assert!(from_callee.len() >= 9, "callee audio must reach the caller: {} packets", from_callee.len());
    for (pt, payload) in &from_callee {
        assert_eq!(*pt, 8);
        let sample = g711::alaw_to_linear(payload[0]);
        assert!((sample + 2500).abs() < 300, "transcoded sample {sample} should be near -2500");
    }

    let tag = to_tag(&ok);
    caller.send(&caller_request("BYE", 2, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    assert_eq!(header(&bye, "Reason"), Some("Q.850;cause=16;text=\"caller hung up\""), "{bye}");
    assert!(caller.final_response().await.starts_with("SIP/2.0 200"));
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("caller"), "{cdrs:?}");
    ports_released(&[node_for_caller, node_for_callee]).await;
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn hold_and_resume_by_re_invite_stop_and_restart_the_held_direction(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let node = start(&pool, trunk("carrier", vec![]), &callee, "41100-41199", 30).await;
    let (ok, invite) = establish(&node, &caller, &callee, "0", "0").await;
    let (node_for_caller, node_for_callee) = (sdp_rtp(&ok), sdp_rtp(&invite));
    let tag = to_tag(&ok);
    // The relay runs on the media threads, and the node's metrics count it (tests in parallel
    // share the process's media engine: at least this one).
    let relays = metric(&node, "switchboard_media_relays").await.expect("the node exports switchboard_media_relays");
    assert!(relays >= 1.0, "switchboard_media_relays {relays}");

    // Both directions flow.
    let heard = tokio::join!(talk(&callee, node_for_callee, 0, 5, 0), caller.rtp_collect(Duration::from_millis(400))).1;
    assert!(heard.len() >= 4, "before hold: {} packets", heard.len());

    // The caller holds: sendonly. The callee is offered sendonly by the node and answers recvonly.
    let hold = sdp(caller.rtp_port(), "0", "sendonly");
    caller.send(&caller_request("INVITE", 2, node.addr, caller.sip_addr(), Some(&tag), Some(&hold)), node.addr).await;
    let (reinvite, from) = callee.request("INVITE").await;
    assert!(body(&reinvite).contains("a=sendonly"), "the hold reaches the callee: {reinvite}");
    assert_eq!(sdp_rtp(&reinvite), node_for_callee, "the node keeps its port on re-INVITE");
    let held = sdp(callee.rtp_port(), "0", "recvonly");
    callee.send(&reply(&reinvite, "200 OK", callee.sip_addr(), Some(&held)), from).await;
    let _ = callee.request("ACK").await;
    let ok2 = caller.final_response().await;
    assert!(ok2.starts_with("SIP/2.0 200") && body(&ok2).contains("a=recvonly"), "{ok2}");
    caller.send(&caller_request("ACK", 2, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;

    // On hold the callee's audio does not reach the caller; the caller's (music) reaches the callee.
    let (_, heard_on_hold, (), music) = tokio::join!(
        talk(&callee, node_for_callee, 0, 5, 10),
        caller.rtp_collect(Duration::from_millis(400)),
        talk(&caller, node_for_caller, 0, 5, 50),
        callee.rtp_collect(Duration::from_millis(400)),
    );
    assert!(heard_on_hold.is_empty(), "held: the caller must not hear the callee ({} packets)", heard_on_hold.len());
    assert!(music.len() >= 4, "held: the caller's music must reach the callee ({} packets)", music.len());

    // Resume.
    let resume = sdp(caller.rtp_port(), "0", "sendrecv");
    caller.send(&caller_request("INVITE", 3, node.addr, caller.sip_addr(), Some(&tag), Some(&resume)), node.addr).await;
    let (reinvite, from) = callee.request("INVITE").await;
    assert!(body(&reinvite).contains("a=sendrecv"), "{reinvite}");
    let back = sdp(callee.rtp_port(), "0", "sendrecv");
    callee.send(&reply(&reinvite, "200 OK", callee.sip_addr(), Some(&back)), from).await;
    let ok3 = caller.final_response().await;
    assert!(ok3.starts_with("SIP/2.0 200") && body(&ok3).contains("a=sendrecv"), "{ok3}");
    caller.send(&caller_request("ACK", 3, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;
    let heard =
        tokio::join!(talk(&callee, node_for_callee, 0, 5, 20), caller.rtp_collect(Duration::from_millis(400))).1;
    assert!(heard.len() >= 4, "after resume: {} packets", heard.len());

    // The callee hangs up.
    callee.send(&callee_request("BYE", &invite, callee.sip_addr(), node.addr, 2), node.addr).await;
    let (bye, from) = caller.request("BYE").await;
    caller.send(&reply(&bye, "200 OK", caller.sip_addr(), None), from).await;
    assert!(callee.final_response().await.starts_with("SIP/2.0 200"));
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("callee"), "{cdrs:?}");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_call_whose_rtp_stops_ends_with_a_media_timeout(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let node = start(&pool, trunk("carrier", vec![]), &callee, "41200-41299", 1).await;
    let (ok, invite) = establish(&node, &caller, &callee, "0", "0").await;
    let (node_for_caller, node_for_callee) = (sdp_rtp(&ok), sdp_rtp(&invite));
    talk(&caller, node_for_caller, 0, 3, 0).await;
    talk(&callee, node_for_callee, 0, 3, 0).await;
    // Then silence: both legs get a BYE from the node, saying why (RFC 3326).
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    let reason = header(&bye, "Reason").unwrap_or_default();
    assert!(reason.starts_with("Q.850;cause=102;text=\"media timeout"), "{bye}");
    let (bye, from) = caller.request("BYE").await;
    caller.send(&reply(&bye, "200 OK", caller.sip_addr(), None), from).await;
    assert_eq!(header(&bye, "Reason"), Some(reason), "{bye}");
    let cdrs = cdrs(&pool, 1).await;
    let reason = cdrs[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("media timeout"), "CDR reason: {reason}");
    assert_eq!(cdrs[0].hangup_by.as_deref(), Some("system"));
    ports_released(&[node_for_caller, node_for_callee]).await;
    node.stop().await;
}

/// A network namespace joined to the host by a veth pair (10.77.0.1 host side, 10.77.0.2 in
/// the namespace), removed when dropped. Peers in it reach the node through a real network
/// device, so the kernel fast path has to send their packets out of an interface (the neighbour
/// path) instead of looping them back. Needs root and `ip`.
struct PeerNetwork {
    name: String,
    host_if: String,
    peer_if: String,
}

impl PeerNetwork {
    const HOST: &str = "10.77.0.1";
    const PEER: &str = "10.77.0.2";

    fn create() -> PeerNetwork {
        // A run killed before its cleanup leaves its namespace (and the host address on its veth):
        // remove those of test processes that are gone.
        for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("sbtest").and_then(|p| p.parse::<u32>().ok())
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::process::Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
        let id = std::process::id();
        let network =
            PeerNetwork { name: format!("sbtest{id}"), host_if: format!("sbh{id}"), peer_if: format!("sbp{id}") };
        let (name, host_if, peer_if) = (&network.name, &network.host_if, &network.peer_if);
        for command in [
            format!("netns add {name}"),
            format!("link add {host_if} type veth peer name {peer_if}"),
            format!("link set {peer_if} netns {name}"),
            format!("addr add {}/24 dev {host_if}", Self::HOST),
            format!("link set {host_if} up"),
            format!("-n {name} addr add {}/24 dev {peer_if}", Self::PEER),
            format!("-n {name} link set {peer_if} up"),
        ] {
            let status = std::process::Command::new("ip").args(command.split_whitespace()).status().unwrap();
            assert!(status.success(), "ip {command}");
        }
        network
    }

    /// Runs `make` on a thread that joined the namespace (sockets it creates stay in it).
    fn inside<T: Send + 'static>(&self, make: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(path).unwrap();
            nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            make()
        })
        .join()
        .unwrap()
    }

    /// A UDP socket bound in the namespace.
    fn socket(&self) -> tokio::net::UdpSocket {
        let socket = self.inside(|| {
            let socket = std::net::UdpSocket::bind((Self::PEER, 0)).unwrap();
            socket.set_nonblocking(true).unwrap();
            socket
        });
        tokio::net::UdpSocket::from_std(socket).unwrap()
    }

    /// A packet socket on the namespace's end of the pair, for frames built by hand: they
    /// arrive at the host with no checksum offload (`CHECKSUM_NONE`), so whoever receives
    /// what the node forwards verifies the UDP checksum in software.
    fn raw_sender(&self) -> RawSender {
        let peer_if = std::ffi::CString::new(self.peer_if.clone()).unwrap();
        let fd = self.inside(move || {
            // SAFETY: all-zero is a valid `sockaddr_ll` (a plain C struct of integers);
            // if_nametoindex reads the NUL-terminated `peer_if`, alive for the call; bind reads
            // `size_of::<sockaddr_ll>()` bytes of `address`, alive on this frame; and the
            // descriptor handed to `OwnedFd` was just opened (checked non-negative) and is owned
            // by nothing else, so it is closed exactly once.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(fd >= 0, "AF_PACKET socket");
                let mut address: libc::sockaddr_ll = std::mem::zeroed();
                address.sll_family = libc::AF_PACKET as u16;
                address.sll_ifindex = libc::if_nametoindex(peer_if.as_ptr()) as i32;
                let bound = libc::bind(
                    fd,
                    &address as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(bound, 0, "bind to the veth end");
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
            }
        });
        let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", self.host_if)).unwrap();
        let host_mac: Vec<u8> = mac.trim().split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        RawSender { fd, host_mac }
    }
}

/// Sends hand-built Ethernet/IPv4/UDP frames with correct checksums (see
/// [`PeerNetwork::raw_sender`]).
struct RawSender {
    fd: std::os::fd::OwnedFd,
    host_mac: Vec<u8>,
}

/// The Internet checksum (RFC 1071) of `parts` taken as one byte string.
fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

impl RawSender {
    fn send_udp(&self, from: std::net::SocketAddrV4, to: std::net::SocketAddrV4, payload: &[u8]) {
        use std::os::fd::AsRawFd;
        let udp_len = (8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        ip.extend_from_slice(&from.ip().octets());
        ip.extend_from_slice(&to.ip().octets());
        let ip_sum = internet_checksum(&[&ip]);
        ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let mut udp = Vec::new();
        udp.extend_from_slice(&from.port().to_be_bytes());
        udp.extend_from_slice(&to.port().to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let pseudo = [&from.ip().octets()[..], &to.ip().octets()[..], &[0, 17], &udp_len.to_be_bytes()[..]].concat();
        let udp_sum = match internet_checksum(&[&pseudo, &udp]) {
            0 => 0xFFFF,
            sum => sum,
        };
        udp[6..8].copy_from_slice(&udp_sum.to_be_bytes());
        let frame = [&self.host_mac[..], &[0x02, 0, 0, 0, 0, 1], &[0x08, 0x00], &ip, &udp].concat();
        // SAFETY: send reads `frame.len()` bytes of `frame`, alive for the call; `self.fd` is an
        // `OwnedFd`, open for as long as `self` is.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(sent, frame.len() as isize, "raw frame sent");
    }
}

impl PeerNetwork {
    fn peer(port: u16) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(Self::PEER.parse().unwrap(), port)
    }
}

impl Drop for PeerNetwork {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Both peers' RTP behind a real network device: after latching, both directions are
/// forwarded in the kernel out of that device (not through the loopback), transcoded
/// (PCMA caller, PCMU callee), whole and in order.
///
/// Needs root (a network namespace, a veth pair) and kernel forwarding: `scripts/test` runs it
/// (`-- --ignored`) when it turns kernel forwarding on, and fails under `CI` when it cannot.
/// Run by hand without kernel forwarding, it fails rather than pass without having looked.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
#[ignore = "needs root and kernel RTP forwarding (SWITCHBOARD_TEST_KERNEL_FORWARDING=on); scripts/test runs it then"]
async fn kernel_forwarding_sends_out_of_a_network_device(pool: PgPool) {
    assert!(
        kernel_expected(),
        "this test checks the kernel path: run it as root with SWITCHBOARD_TEST_KERNEL_FORWARDING=on (scripts/test does)"
    );
    let network = PeerNetwork::create();
    // SIP stays on the loopback; RTP goes between the namespace and the node's 10.77.0.1.
    let caller = Ua { sip: tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(), rtp: network.socket() };
    let callee = Ua { sip: tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(), rtp: network.socket() };
    let destination = number_to(sip_destination(callee.sip_addr().port()));
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![switchboard_model::Codec::Pcma, switchboard_model::Codec::Pcmu];
    let node = Node::start_tuned(&pool, vec![carrier], vec![destination], vec![], |args| {
        args.rtp_ports = "42000-42099".into();
        args.sip_listen = vec!["0.0.0.0:0".parse().unwrap()];
        args.advertised_host = Some(PeerNetwork::HOST.into());
    })
    .await;
    // The caller speaks PCMA, the callee PCMU: the kernel transcodes too.
    let (ok, invite) = establish(&node, &caller, &callee, "8", "0").await;
    let (node_for_caller, node_for_callee) = (sdp_rtp(&ok), sdp_rtp(&invite));
    assert_eq!(node_for_caller.ip().to_string(), PeerNetwork::HOST);
    // The SDP of both says 127.0.0.1 (the test's `sdp`), their packets come from the
    // namespace: the node latches to where they really are, then forwards in the kernel.
    for _ in 0..3 {
        callee.rtp_send(node_for_callee, 0, 1, &[0; 160]).await;
        caller.rtp_send(node_for_caller, 8, 1, &[0; 160]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = tokio::join!(caller.rtp_collect(Duration::from_millis(50)), callee.rtp_collect(Duration::from_millis(50)));
    let before = metric(&node, "switchboard_media_kernel_packets_total").await.unwrap_or(0.0);

    let (_, _, heard_by_callee, heard_by_caller) = tokio::join!(
        talk(&caller, node_for_caller, 8, 50, 0),
        talk(&callee, node_for_callee, 0, 50, 100),
        callee.rtp_collect(Duration::from_millis(1500)),
        caller.rtp_collect(Duration::from_millis(1500)),
    );
    let expected = |base: u8, i: usize, to_pcma: bool| {
        let sent = base.wrapping_add(i as u8);
        if to_pcma { g711::ulaw_to_alaw(sent) } else { g711::alaw_to_ulaw(sent) }
    };
    for (heard, base, pt, who) in [(&heard_by_callee, 0u8, 0u8, "callee"), (&heard_by_caller, 100, 8, "caller")] {
        assert_eq!(heard.len(), 50, "the {who} hears every packet");
        for (i, (got_pt, payload)) in heard.iter().enumerate() {
            let byte = expected(base, i, pt == 8);
            assert_eq!((*got_pt, payload[0], payload[159]), (pt, byte, byte), "the {who}'s packet {i}, transcoded");
        }
    }
    // Frames with no checksum offload (as from a NIC that does not verify): the callee's stack
    // checks the UDP checksum the kernel path updated, and drops the packet if it is wrong.
    let raw = network.raw_sender();
    let caller_port = caller.rtp.local_addr().unwrap().port();
    let to = std::net::SocketAddrV4::new(PeerNetwork::HOST.parse().unwrap(), node_for_caller.port());
    let heard = tokio::join!(
        async {
            for i in 0..20u16 {
                let mut rtp = vec![0x80, 8, 0, 0, 0, 0, 0, 0, 0xAB, 0xCD, 0xEF, 0x01];
                rtp[2..4].copy_from_slice(&(200 + i).to_be_bytes());
                rtp[4..8].copy_from_slice(&(u32::from(200 + i) * 160).to_be_bytes());
                rtp.extend_from_slice(&[0x33u8.wrapping_add(i as u8); 160]);
                raw.send_udp(PeerNetwork::peer(caller_port), to, &rtp);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
        callee.rtp_collect(Duration::from_millis(600)),
    )
    .1;
    assert_eq!(heard.len(), 20, "every hand-built frame passes the callee's checksum check");
    assert!(
        heard.iter().enumerate().all(|(i, (_, p))| p.iter().all(|&b| b == expected(0x33, i, false))),
        "in order, transcoded"
    );
    let tag = to_tag(&ok);
    caller.send(&caller_request("BYE", 2, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    assert!(caller.final_response().await.starts_with("SIP/2.0 200"));
    // The relay takes the kernel's counters back when the call ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut forwarded = 0.0;
    while tokio::time::Instant::now() < deadline {
        forwarded = metric(&node, "switchboard_media_kernel_packets_total").await.unwrap_or(0.0) - before;
        if forwarded >= 115.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(forwarded >= 115.0, "the kernel forwarded the talk, not user space: {forwarded} of 120 packets");
    node.stop().await;
    drop(network);
}

/// RTP that only the kernel forwards still counts as media: no false media timeout while both
/// sides talk for longer than the timeout, and the timeout once they stop.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn media_forwarded_in_the_kernel_keeps_the_call_up(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let node = start(&pool, trunk("carrier", vec![]), &callee, "41900-41999", 1).await;
    let (ok, invite) = establish(&node, &caller, &callee, "0", "0").await;
    let (node_for_caller, node_for_callee) = (sdp_rtp(&ok), sdp_rtp(&invite));
    // 2.4 s of audio both ways with a 1 s media timeout.
    tokio::join!(talk(&caller, node_for_caller, 0, 120, 0), talk(&callee, node_for_callee, 0, 120, 0));
    let mut buf = [0u8; 2048];
    for ua in [&caller, &callee] {
        let early = tokio::time::timeout(Duration::from_millis(1), ua.sip.recv_from(&mut buf)).await;
        assert!(
            early.is_err(),
            "no BYE while RTP flows: {:?}",
            early.map(|r| r.map(|(n, _)| String::from_utf8_lossy(&buf[..n]).to_string()))
        );
    }
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    assert!(header(&bye, "Reason").unwrap_or_default().contains("cause=102"), "{bye}");
    let (bye, from) = caller.request("BYE").await;
    caller.send(&reply(&bye, "200 OK", caller.sip_addr(), None), from).await;
    ports_released(&[node_for_caller, node_for_callee]).await;
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_offer_without_a_codec_of_the_trunk_is_488_before_any_outbound_attempt(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    // The trunk allows PCMU only; the caller offers PCMA only.
    let node = start(&pool, trunk("carrier", vec![]), &callee, "41300-41399", 30).await;
    let offer = sdp(caller.rtp_port(), "8", "sendrecv");
    caller.send(&caller_request("INVITE", 1, node.addr, caller.sip_addr(), None, Some(&offer)), node.addr).await;
    let answer = caller.final_response().await;
    assert!(answer.starts_with("SIP/2.0 488"), "{answer}");
    let mut buf = [0u8; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), callee.sip.recv_from(&mut buf)).await.is_err(),
        "the callee must not be called"
    );
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn dtmf_events_cross_with_each_legs_payload_type(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![switchboard_model::Codec::Pcmu, switchboard_model::Codec::TelephoneEvent];
    let node = start(&pool, carrier, &callee, "41400-41499", 30).await;
    let (ok, invite) = establish(&node, &caller, &callee, "0 101", "0 101").await;
    assert!(body(&ok).contains("telephone-event/8000") && body(&invite).contains("telephone-event/8000"));
    // Key 5: three updates, then the end bit three times (RFC 4733 section 2.5.1.4).
    let node_for_caller = sdp_rtp(&ok);
    for (i, (end, duration)) in
        [(false, 160u16), (false, 320), (false, 480), (true, 640), (true, 640), (true, 640)].into_iter().enumerate()
    {
        let payload = [5u8, if end { 0x80 | 10 } else { 10 }, (duration >> 8) as u8, duration as u8];
        caller.rtp_send(node_for_caller, 101, 300 + i as u16, &payload).await;
    }
    let events = callee.rtp_collect(Duration::from_millis(500)).await;
    assert!(events.len() >= 4, "the key press must reach the callee: {events:?}");
    assert!(events.iter().all(|(pt, payload)| *pt == 101 && payload[0] == 5), "{events:?}");
    assert!(events.iter().any(|(_, payload)| payload[1] & 0x80 != 0), "the end of the event must cross");
    let tag = to_tag(&ok);
    caller.send(&caller_request("BYE", 2, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    node.stop().await;
}

/// Whether these tests must see kernel forwarding.
fn kernel_expected() -> bool {
    kernel_mode() == switchboard_node::media::kernel::KernelMode::On
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn steady_rtp_crosses_as_one_continuous_stream_through_the_kernel_fast_path(pool: PgPool) {
    steady_stream(pool, "41700-41799", false).await;
}

/// The same with the node on 0.0.0.0 (as in a pod): media sockets bound to the wildcard are
/// keyed by port in the kernel, and answer from the address the packet came to.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn steady_rtp_through_a_node_bound_to_every_address(pool: PgPool) {
    steady_stream(pool, "41800-41899", true).await;
}

async fn steady_stream(pool: PgPool, ports: &str, wildcard: bool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![switchboard_model::Codec::Pcmu, switchboard_model::Codec::TelephoneEvent];
    let destination = number_to(sip_destination(callee.sip_addr().port()));
    let node = Node::start_tuned(&pool, vec![carrier], vec![destination], vec![], |args| {
        args.rtp_ports = ports.into();
        if wildcard {
            args.sip_listen = vec!["0.0.0.0:0".parse().unwrap()];
            args.advertised_host = Some("127.0.0.1".into());
        }
    })
    .await;
    let (ok, invite) = establish(&node, &caller, &callee, "0 101", "0 101").await;
    let (node_for_caller, node_for_callee) = (sdp_rtp(&ok), sdp_rtp(&invite));

    // 60 caller frames; frame 30 is a key press (user space handles telephone-events), the
    // rest audio that the kernel forwards once the stream is steady (after its first packet).
    let mut kernel_forwards_seen = 0.0f64;
    let sent = 60u16;
    let received = tokio::join!(
        async {
            for i in 0..sent {
                let seq = 65_500u16.wrapping_add(i); // wraps on the way
                if i == 30 {
                    caller.rtp_send(node_for_caller, 101, seq, &[1, 0x80 | 10, 0, 160]).await;
                } else {
                    caller.rtp_send(node_for_caller, 0, seq, &[i as u8; 160]).await;
                }
                if i == 20 {
                    let forwards = metric(&node, "switchboard_media_kernel_forwards").await;
                    kernel_forwards_seen = forwards.expect("the node exports switchboard_media_kernel_forwards");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
        callee.rtp_collect_raw(Duration::from_millis(1200))
    )
    .1;
    if kernel_expected() {
        assert!(kernel_forwards_seen >= 1.0, "the steady direction must be in the kernel: {kernel_forwards_seen}");
    } else {
        println!(
            "kernel forwarding not required here (SWITCHBOARD_TEST_KERNEL_FORWARDING != on): checked the stream only"
        );
    }
    let marks: Vec<(u16, u8, u8)> = received.iter().map(|p| (u16::from_be_bytes([p[2], p[3]]), p[1], p[12])).collect();
    assert_eq!(received.len(), sent as usize, "every packet crosses: {marks:?}");
    let first_seq = u16::from_be_bytes([received[0][2], received[0][3]]);
    let first_ts = u32::from_be_bytes(received[0][4..8].try_into().unwrap());
    let ssrc = &received[0][8..12];
    for (i, packet) in received.iter().enumerate() {
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        assert_eq!(seq, first_seq.wrapping_add(i as u16), "packet {i}: sequence numbers stay continuous");
        let ts = u32::from_be_bytes(packet[4..8].try_into().unwrap());
        // The caller's timestamps are its sequence number × 160 (they fall back at the wrap):
        // the node keeps whatever spacing they have.
        let sent_ts = |i: u16| u32::from(65_500u16.wrapping_add(i)) * 160;
        assert_eq!(
            ts,
            first_ts.wrapping_add(sent_ts(i as u16).wrapping_sub(sent_ts(0))),
            "packet {i}: timestamps keep their spacing"
        );
        assert_eq!(&packet[8..12], ssrc, "packet {i}: one SSRC");
        assert_ne!(&packet[8..12], &[0xAB, 0xCD, 0xEF, 0x01], "the node's own SSRC, not the caller's");
        if i == 30 {
            assert_eq!(packet[1] & 0x7f, 101, "the key press crosses as a telephone-event");
            assert_eq!(packet[12], 1);
        } else {
            assert_eq!(packet[1] & 0x7f, 0, "packet {i}");
            assert_eq!(&packet[12..], &[i as u8; 160][..], "packet {i}: the payload is untouched");
        }
    }
    // The other direction too (and it goes back through user space after the re-INVITE below).
    let heard =
        tokio::join!(talk(&callee, node_for_callee, 0, 10, 7), caller.rtp_collect(Duration::from_millis(400))).1;
    assert_eq!(heard.len(), 10, "callee audio reaches the caller");
    assert!(heard.iter().enumerate().all(|(i, (pt, p))| *pt == 0 && p[0] == 7 + i as u8), "{heard:?}");

    // A re-INVITE moving the callee's media: the kernel must follow (nothing to the old port).
    let moved = Ua::new().await;
    let tag = to_tag(&ok);
    let reoffer = sdp(caller.rtp_port(), "0 101", "sendrecv");
    caller
        .send(&caller_request("INVITE", 2, node.addr, caller.sip_addr(), Some(&tag), Some(&reoffer)), node.addr)
        .await;
    let (reinvite, from) = callee.request("INVITE").await;
    let answer = sdp(moved.rtp_port(), "0 101", "sendrecv");
    callee.send(&reply(&reinvite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    let _ = callee.request("ACK").await;
    assert!(caller.final_response().await.starts_with("SIP/2.0 200"));
    caller.send(&caller_request("ACK", 2, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;
    let (_, at_moved, at_old) = tokio::join!(
        talk(&caller, node_for_caller, 0, 10, 90),
        moved.rtp_collect(Duration::from_millis(400)),
        callee.rtp_collect(Duration::from_millis(400)),
    );
    assert_eq!(at_moved.len(), 10, "after the re-INVITE the audio goes to the new address");
    assert!(at_old.is_empty(), "nothing to the old address: {} packets", at_old.len());

    caller.send(&caller_request("BYE", 3, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    assert!(caller.final_response().await.starts_with("SIP/2.0 200"));
    ports_released(&[node_for_caller, node_for_callee]).await;
    // The ports are free, and the kernel forgot them: audio to them now reaches nobody.
    let strayed =
        tokio::join!(talk(&caller, node_for_caller, 0, 3, 0), moved.rtp_collect(Duration::from_millis(200))).1;
    assert!(strayed.is_empty(), "a call's kernel forward must end with the call");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_failed_call_after_early_media_frees_its_ports(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let node = start(&pool, trunk("carrier", vec![]), &callee, "41500-41599", 30).await;
    let offer = sdp(caller.rtp_port(), "0", "sendrecv");
    caller.send(&caller_request("INVITE", 1, node.addr, caller.sip_addr(), None, Some(&offer)), node.addr).await;
    let (invite, from) = callee.request("INVITE").await;
    let node_for_callee = sdp_rtp(&invite);
    // Ringback as early media, then busy.
    let early = sdp(callee.rtp_port(), "0", "sendrecv");
    callee.send(&reply(&invite, "183 Session Progress", callee.sip_addr(), Some(&early)), from).await;
    let (progress, _) = caller.recv().await;
    let progress = if progress.starts_with("SIP/2.0 100") { caller.recv().await.0 } else { progress };
    assert!(progress.starts_with("SIP/2.0 183"), "{progress}");
    let node_for_caller = sdp_rtp(&progress);
    let ringback =
        tokio::join!(talk(&callee, node_for_callee, 0, 5, 0), caller.rtp_collect(Duration::from_millis(400))).1;
    assert!(ringback.len() >= 4, "early media must reach the caller: {} packets", ringback.len());
    callee.send(&reply(&invite, "486 Busy Here", callee.sip_addr(), None), from).await;
    let busy = caller.final_response().await;
    assert!(busy.starts_with("SIP/2.0 486"), "{busy}");
    ports_released(&[node_for_caller, node_for_callee]).await;
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_delayed_offer_is_anchored_with_the_answer_in_the_ack(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let mut carrier = trunk("carrier", vec![]);
    carrier.codecs = vec![switchboard_model::Codec::Pcmu, switchboard_model::Codec::Pcma];
    let node = start(&pool, carrier, &callee, "41600-41699", 30).await;

    // INVITE without SDP: the node still offers its own address to the callee.
    caller.send(&caller_request("INVITE", 1, node.addr, caller.sip_addr(), None, None), node.addr).await;
    let (invite, from) = callee.request("INVITE").await;
    let node_for_callee = sdp_rtp(&invite);
    assert_eq!(node_for_callee.ip(), node.addr.ip(), "{invite}");
    let answer = sdp(callee.rtp_port(), "8", "sendrecv");
    callee.send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    let _ = callee.request("ACK").await;

    // The caller's 200 OK carries the node's offer, the callee's codec (PCMA) first.
    let ok = caller.final_response().await;
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
    let offer = body(&ok);
    let node_for_caller = sdp_rtp(&ok);
    assert_ne!(node_for_caller, node_for_callee, "one port pair per leg");
    assert!(offer.contains("m=audio") && offer.contains(" RTP/AVP 8"), "the callee's codec first: {offer}");
    // The caller answers PCMU in its ACK: the relay transcodes.
    let ack_answer = sdp(caller.rtp_port(), "0", "sendrecv");
    let tag = to_tag(&ok);
    caller
        .send(&caller_request("ACK", 1, node.addr, caller.sip_addr(), Some(&tag), Some(&ack_answer)), node.addr)
        .await;

    let ulaw = g711::linear_to_ulaw(3000);
    let heard = tokio::join!(
        async {
            for i in 0..10u16 {
                caller.rtp_send(node_for_caller, 0, 10 + i, &[ulaw; 160]).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
        callee.rtp_collect(Duration::from_millis(600))
    )
    .1;
    assert!(heard.len() >= 9, "caller audio must reach the callee: {} packets", heard.len());
    for (pt, payload) in &heard {
        assert_eq!(*pt, 8, "PCMA towards the callee");
        let sample = g711::alaw_to_linear(payload[0]);
        assert!((sample - 3000).abs() < 300, "transcoded sample {sample}");
    }
    let back =
        tokio::join!(talk(&callee, node_for_callee, 8, 5, 0xD5), caller.rtp_collect(Duration::from_millis(400))).1;
    assert!(back.len() >= 4, "callee audio must reach the caller: {} packets", back.len());
    assert!(back.iter().all(|(pt, _)| *pt == 0), "PCMU towards the caller");

    caller.send(&caller_request("BYE", 2, node.addr, caller.sip_addr(), Some(&tag), None), node.addr).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    assert!(caller.final_response().await.starts_with("SIP/2.0 200"));
    ports_released(&[node_for_caller, node_for_callee]).await;
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_delayed_offer_whose_ack_has_no_answer_ends_with_488(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let node = start(&pool, trunk("carrier", vec![]), &callee, "41700-41799", 30).await;
    caller.send(&caller_request("INVITE", 1, node.addr, caller.sip_addr(), None, None), node.addr).await;
    let (invite, from) = callee.request("INVITE").await;
    let node_for_callee = sdp_rtp(&invite);
    let answer = sdp(callee.rtp_port(), "0", "sendrecv");
    callee.send(&reply(&invite, "200 OK", callee.sip_addr(), Some(&answer)), from).await;
    let _ = callee.request("ACK").await;
    let ok = caller.final_response().await;
    let node_for_caller = sdp_rtp(&ok);
    // An ACK without the answer the 2xx's offer asked for (RFC 3261 13.2.2.4 violated).
    caller.send(&caller_request("ACK", 1, node.addr, caller.sip_addr(), Some(&to_tag(&ok)), None), node.addr).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    let (bye, from) = caller.request("BYE").await;
    caller.send(&reply(&bye, "200 OK", caller.sip_addr(), None), from).await;
    let cdrs = cdrs(&pool, 1).await;
    assert_eq!(cdrs[0].sip_code, Some(488), "{cdrs:?}");
    assert!(cdrs[0].reason.as_deref().unwrap_or("").contains("ACK"), "{cdrs:?}");
    ports_released(&[node_for_caller, node_for_callee]).await;
    node.stop().await;
}

/// Capacity: a SIP-to-SIP call takes two port pairs (four ports), so a range of four ports holds
/// one anchored call. The next call finds no free pair and gets 503 with Retry-After at once (not
/// a timeout), counted in `switchboard_rtp_port_exhaustions_total`; once the first call ended,
/// a call goes through again.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_call_without_a_free_port_pair_gets_503_with_retry_after(pool: PgPool) {
    let caller = Ua::new().await;
    let callee = Ua::new().await;
    let node = start(&pool, trunk("carrier", vec![]), &callee, "40700-40703", 30).await;
    assert_eq!(metric(&node, "switchboard_rtp_ports_capacity").await, Some(4.0));
    assert_eq!(metric(&node, "switchboard_rtp_port_exhaustions_total").await, Some(0.0));
    let (ok, _invite) = establish(&node, &caller, &callee, "0", "0").await;
    assert_eq!(metric(&node, "switchboard_rtp_ports_in_use").await, Some(4.0));

    // A second caller, another dialog.
    let second = Ua::new().await;
    let offer = sdp(second.rtp_port(), "0", "sendrecv");
    let invite = caller_request("INVITE", 1, node.addr, second.sip_addr(), None, Some(&offer))
        .replace("media-call@test", "media-call-2@test")
        .replace(";tag=caller", ";tag=caller2")
        .replace("branch=z9hG4bKINVITE", "branch=z9hG4bKsecond");
    second.send(&invite, node.addr).await;
    let refused = second.final_response().await;
    assert!(refused.starts_with("SIP/2.0 503"), "{refused}");
    assert_eq!(header(&refused, "Retry-After"), Some("5"), "{refused}");
    let mut buf = [0u8; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), callee.sip.recv_from(&mut buf)).await.is_err(),
        "the callee must not be called for the refused call"
    );
    assert_eq!(metric(&node, "switchboard_rtp_port_exhaustions_total").await, Some(1.0));

    // The first call ends; its ports serve the next call.
    caller.send(&caller_request("BYE", 2, node.addr, caller.sip_addr(), Some(&to_tag(&ok)), None), node.addr).await;
    let (bye, from) = callee.request("BYE").await;
    callee.send(&reply(&bye, "200 OK", callee.sip_addr(), None), from).await;
    let bye_ok = caller.final_response().await;
    assert!(bye_ok.starts_with("SIP/2.0 200"), "{bye_ok}");
    let node_rtp: Vec<SocketAddr> = (0..2).map(|i| SocketAddr::from(([127, 0, 0, 1], 40700 + 2 * i))).collect();
    ports_released(&node_rtp).await;
    let third = caller_request("INVITE", 1, node.addr, second.sip_addr(), None, Some(&offer))
        .replace("media-call@test", "media-call-3@test")
        .replace(";tag=caller", ";tag=caller3")
        .replace("branch=z9hG4bKINVITE", "branch=z9hG4bKthird");
    second.send(&third, node.addr).await;
    // The callee is called (request() fails after 10 s without an INVITE).
    let _ = callee.request("INVITE").await;
    node.stop().await;
}
