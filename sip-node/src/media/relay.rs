//! The per-call RTP relay: the sockets of both legs of an anchored call (or of the caller's leg
//! and the AI bridge), moving each packet across as soon as it arrives. Two-leg relays are
//! driven by the media engine's threads ([`super::engine`]: level-triggered epoll, one
//! `recvfrom` per readable socket); the caller's leg of a bridged call by the bridge session's
//! task.
//!
//! What it does with a packet:
//! - **Validation**: RTP that does not parse ([`RtpPacket::parse`]) is dropped and counted.
//! - **Symmetric RTP and latching**: until a leg is latched, the relay sends to the address of the
//!   leg's SDP; the first valid packet latches the leg to its source (callers behind NAT send
//!   from another address than their SDP says) and the relay sends there from then on. A packet
//!   from the SDP address re-latches a leg that latched elsewhere (the expected address always
//!   wins); any other source is dropped and counted. [`LatchMode::ExpectedOnly`] refuses every
//!   source but the SDP address.
//! - **Rewriting**: what a leg receives is one stream with one SSRC and continuous sequence
//!   numbers and timestamps ([`StreamRewriter`]), across re-INVITEs and source changes.
//! - **Transcoding** between PCMU and PCMA when the legs' codecs differ.
//! - **DTMF**: RFC 4733 events are relayed with the payload type of the other leg (when it
//!   negotiated telephone-event) and reported once per key press ([`RelayEvent::Dtmf`]).
//! - **RTCP** on the odd ports is validated and passed to the other leg, its SSRCs, SR timestamp
//!   and report blocks translated to the streams as the node relays them ([`super::rtcp`]).
//! - **Media timeout**: no RTP from a leg that should be sending for the configured time gives
//!   [`RelayEvent::MediaTimeout`] (legs on hold are not expected to send).
//! - **Direction**: nothing is sent to a leg whose negotiated direction says the node does not
//!   send there, nothing received from a leg the node does not receive from is relayed.
//!
//! In bridged mode the other side is the AI bridge, and there is no relay task: the bridge
//! session's task drives the caller's leg itself (`BridgedLeg`, started by
//! [`crate::bridge::AgentConnection::spawn`]), so that a caller frame goes from the UDP socket
//! to the WebSocket within one wakeup, as μ-law (a frame the WebSocket cannot take at once is
//! dropped and counted: no queue grows behind a slow agent), and the agent's paced μ-law frames
//! become RTP towards the caller the same way.
//!
//! The bridged leg receives with `recvmmsg` (tokio's readiness is edge-triggered), and a socket
//! that returned fewer datagrams than asked for is known to be drained: no second receive just
//! to be told `EAGAIN`.
//!
//! Whoever drives a relay (the engine thread, or the bridge session's task) owns its
//! [`PortPair`]s: when the relay ends (stop, a handle dropped) the ports go back.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use switchboard_model::Codec;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::engine::{EngineRelay, MediaEngine};
use super::g711;
use super::kernel::{ForwardEntry, ForwardKey, ForwardRule, KernelForwarder, Transcode, instant_of, ipv4_of};
use super::mailbox::{MailboxReceiver, MailboxSender, mailbox};
use super::ports::PortPair;
use super::rtcp::RtcpTranslation;
use super::rtp::{
    DtmfDetector, DtmfDigit, RtpHeader, RtpPacket, SequenceStats, SteadySegment, StreamRewriter, TelephoneEvent,
};
use super::rx_time;
use super::sdp::{MediaDirection, NegotiatedMedia};

/// The default media timeout.
pub const DEFAULT_MEDIA_TIMEOUT: Duration = Duration::from_secs(30);
/// Receive buffer per datagram: larger than any RTP packet on an Ethernet path.
pub(super) const DATAGRAM_MAX: usize = 4096;
/// Packets read from one socket per wakeup before giving the others a turn.
const BATCH: usize = 32;
/// Capacity of the event channel (events are rare: key presses, timeouts).
const EVENT_CAPACITY: usize = 64;

/// Which leg of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegId {
    /// The inbound leg (the caller).
    A,
    /// The outbound leg (the callee), or the AI bridge in bridged mode.
    B,
}

impl LegId {
    fn index(self) -> usize {
        match self {
            LegId::A => 0,
            LegId::B => 1,
        }
    }
}

/// How a leg may latch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatchMode {
    /// The first valid packet latches (symmetric RTP for callers behind NAT); the SDP address
    /// re-latches when it shows up.
    #[default]
    Any,
    /// Only packets from the SDP address are accepted (a trunk with fixed media addresses).
    ExpectedOnly,
}

/// What the relay needs to know about a leg, from offer/answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegMedia {
    /// Where the leg's SDP says to send RTP (`None`: wait for its first packet).
    pub remote_rtp: Option<SocketAddr>,
    /// Where to send RTCP (`None`: RTP address + 1, or the latched RTCP source).
    pub remote_rtcp: Option<SocketAddr>,
    /// The audio codec on this leg (PCMU or PCMA).
    pub codec: Codec,
    /// Its payload type on this leg.
    pub payload_type: u8,
    /// The telephone-event payload type on this leg, if negotiated.
    pub telephone_event: Option<u8>,
    /// What the node does on this leg.
    pub direction: MediaDirection,
    /// How the leg latches.
    pub latch: LatchMode,
}

impl LegMedia {
    /// A sendrecv leg with the given codec and static payload type, latching to any source.
    pub fn new(codec: Codec, remote_rtp: Option<SocketAddr>) -> LegMedia {
        let payload_type = if codec == Codec::Pcma { 8 } else { 0 };
        LegMedia {
            remote_rtp,
            remote_rtcp: None,
            codec,
            payload_type,
            telephone_event: None,
            direction: MediaDirection::SendRecv,
            latch: LatchMode::Any,
        }
    }
}

impl From<&NegotiatedMedia> for LegMedia {
    fn from(n: &NegotiatedMedia) -> LegMedia {
        LegMedia {
            remote_rtp: n.remote_rtp,
            remote_rtcp: n.remote_rtcp,
            codec: n.codec,
            payload_type: n.payload_type,
            telephone_event: n.telephone_event,
            direction: n.direction,
            latch: LatchMode::Any,
        }
    }
}

/// One leg to start the relay with: its port pair (sockets still inside) and its media.
#[derive(Debug)]
pub struct RtpLegSetup {
    /// The allocated pair; the relay takes its sockets and keeps it until it ends.
    pub ports: PortPair,
    /// The negotiated media.
    pub media: LegMedia,
}

/// Relay settings.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// No RTP for this long from every leg that should send → [`RelayEvent::MediaTimeout`].
    pub media_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig { media_timeout: DEFAULT_MEDIA_TIMEOUT }
    }
}

/// What the relay reports to the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// A leg latched (or re-latched) to a source address.
    Latched {
        /// The leg.
        leg: LegId,
        /// The source it now sends to.
        source: SocketAddr,
    },
    /// A key press (RFC 4733) from a leg.
    Dtmf {
        /// The leg it came from.
        leg: LegId,
        /// The event.
        digit: DtmfDigit,
    },
    /// No RTP for the configured time: the call should end (CDR reason: media timeout).
    MediaTimeout {
        /// How long nothing arrived.
        silent_for: Duration,
    },
}

/// Why the relay could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A port pair whose sockets were already taken.
    #[error("the port pair of leg {0:?} has no sockets left")]
    NoSockets(LegId),
    /// Registering the sockets with tokio failed.
    #[error("cannot register the RTP sockets: {0}")]
    Io(#[from] std::io::Error),
    /// Called outside a tokio runtime.
    #[error("the relay must be started inside a tokio runtime")]
    NoRuntime,
    /// The relay task has ended.
    #[error("the relay has stopped")]
    Stopped,
    /// The media engine's threads could not be started.
    #[error("the media engine is not running: {0}")]
    Engine(String),
    /// An update for a leg the relay does not have (leg B in bridged mode).
    #[error("the relay has no RTP leg {0:?}")]
    NoSuchLeg(LegId),
}

/// Counters of one leg, as seen by the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegStats {
    /// Valid RTP packets received from the leg and accepted.
    pub packets_in: u64,
    /// Their bytes (whole datagrams).
    pub bytes_in: u64,
    /// RTP packets sent to the leg.
    pub packets_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
    /// Packets from a source other than the latched one.
    pub dropped_source: u64,
    /// Datagrams that are not valid RTP/RTCP.
    pub dropped_invalid: u64,
    /// Valid packets not relayed: unknown payload type, direction, no destination, a full
    /// bridge slot or socket buffer.
    pub dropped_other: u64,
    /// Packets missing by sequence number.
    pub lost: u64,
    /// Packets that arrived out of order.
    pub late: u64,
    /// RTCP packets received from the leg.
    pub rtcp_in: u64,
    /// RTCP packets sent to the leg.
    pub rtcp_out: u64,
    /// Key presses reported.
    pub dtmf: u64,
}

/// Counters of both legs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// The caller's leg.
    pub a: LegStats,
    /// The callee's leg (or the bridge side: `packets_in` are agent frames).
    pub b: LegStats,
}

#[derive(Default)]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    dropped_source: AtomicU64,
    dropped_invalid: AtomicU64,
    dropped_other: AtomicU64,
    lost: AtomicU64,
    late: AtomicU64,
    rtcp_in: AtomicU64,
    rtcp_out: AtomicU64,
    dtmf: AtomicU64,
}

/// Adds to a counter. Only the relay task writes its counters (the handle reads them), so a plain
/// load and store does: an atomic read-modify-write would be a locked instruction per counter and
/// packet for nothing. Readers still see whole values.
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> LegStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LegStats {
            packets_in: get(&self.packets_in),
            bytes_in: get(&self.bytes_in),
            packets_out: get(&self.packets_out),
            bytes_out: get(&self.bytes_out),
            dropped_source: get(&self.dropped_source),
            dropped_invalid: get(&self.dropped_invalid),
            dropped_other: get(&self.dropped_other),
            lost: get(&self.lost),
            late: get(&self.late),
            rtcp_in: get(&self.rtcp_in),
            rtcp_out: get(&self.rtcp_out),
            dtmf: get(&self.dtmf),
        }
    }
}

pub(super) enum Control {
    /// Boxed: the channel allocates room for 32 messages per relay up front, and re-INVITEs are
    /// rare; a boxed update keeps that block at 16 bytes a message instead of 80.
    Update(LegId, Box<LegMedia>),
    Stop(oneshot::Sender<()>),
}

/// The call's hold on a running relay. Dropping it stops the relay (and frees its ports), so a
/// call task that ends on any path cannot leave a relay behind.
pub struct RelayHandle {
    driver: Driver,
    counters: Arc<[Counters; 2]>,
}

/// What drives the relay.
enum Driver {
    /// The bridge session's task (bridged mode): it reads the mailbox as it polls the leg.
    Mailbox(MailboxSender<Control>),
    /// A media engine thread (two-leg relays).
    Engine(Option<EngineRelay>),
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").field("bridged", &self.is_bridged()).finish()
    }
}

impl RelayHandle {
    /// Applies a re-INVITE's outcome to a leg: new far-end address (the leg re-latches), codec,
    /// payload types, direction.
    pub fn update_leg(&self, leg: LegId, media: LegMedia) -> Result<(), RelayError> {
        if self.is_bridged() && leg == LegId::B {
            return Err(RelayError::NoSuchLeg(leg));
        }
        let update = Control::Update(leg, Box::new(media));
        match &self.driver {
            Driver::Mailbox(control) => control.send(update).map_err(|_| RelayError::Stopped),
            Driver::Engine(Some(relay)) => relay.control(update),
            Driver::Engine(None) => Err(RelayError::Stopped),
        }
    }

    /// A bridged call's leg: the bridge session drives it, and it has no leg B.
    fn is_bridged(&self) -> bool {
        matches!(self.driver, Driver::Mailbox(_))
    }

    /// The counters now.
    pub fn stats(&self) -> RelayStats {
        RelayStats { a: self.counters[0].snapshot(), b: self.counters[1].snapshot() }
    }

    /// Whether the relay has ended (in bridged mode: the bridge session that drives the leg).
    pub fn is_finished(&self) -> bool {
        match &self.driver {
            Driver::Mailbox(control) => control.is_closed(),
            Driver::Engine(relay) => relay.as_ref().is_none_or(EngineRelay::is_finished),
        }
    }

    /// Stops the relay and waits until its sockets are closed and its ports released; returns
    /// the final counters.
    pub async fn stop(mut self) -> RelayStats {
        match &mut self.driver {
            Driver::Mailbox(control) => {
                let (tx, rx) = oneshot::channel();
                if control.send(Control::Stop(tx)).is_ok() {
                    let _ = rx.await;
                }
            }
            Driver::Engine(relay) => {
                if let Some(relay) = relay.take() {
                    relay.stop().await;
                }
            }
        }
        self.stats()
    }
}

/// A leg's socket, registered with tokio for reads only. A `tokio::net::UdpSocket` registers
/// for writability too, and Linux then reports every datagram sent as a writability event (the
/// kernel frees the sent buffer, the socket is writable again, epoll is told): one wasted event
/// per relayed packet for the reactor to take and dispatch. Sends here never wait: a full send
/// buffer drops the packet (and counts it), as before.
type LegSocket = AsyncFd<std::net::UdpSocket>;

fn register(socket: std::net::UdpSocket) -> std::io::Result<LegSocket> {
    // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same for as
    // long as it is registered.
    Ok(unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?)
}

/// One RTP leg: its sockets (`S`: tokio-registered for a bridged call's leg, plain for a
/// two-leg relay on a media engine thread), its negotiated media and what the relay tracks.
pub(super) struct RtpLeg<S = LegSocket> {
    id: LegId,
    rtp: S,
    rtcp: S,
    _ports: PortPair,
    media: LegMedia,
    latched: Option<SocketAddr>,
    rtcp_latched: Option<SocketAddr>,
    /// Rewrites what the relay sends to this leg.
    rewriter: StreamRewriter,
    /// Sequence statistics of what this leg sends.
    sequence: SequenceStats,
    dtmf: DtmfDetector,
    last_rx: Instant,
    /// The RTP socket's own address (the kernel fast path's key and source).
    local_rtp: Option<SocketAddr>,
}

impl<S> RtpLeg<S> {
    /// Takes the sockets out of the setup's port pair, wrapped by `wrap` (tokio registration or
    /// none).
    fn new(
        id: LegId,
        mut setup: RtpLegSetup,
        now: Instant,
        wrap: impl Fn(std::net::UdpSocket) -> std::io::Result<S>,
    ) -> Result<RtpLeg<S>, RelayError> {
        let (rtp, rtcp) = setup.ports.take_sockets().ok_or(RelayError::NoSockets(id))?;
        let local_rtp = rtp.local_addr().ok();
        Ok(RtpLeg {
            id,
            rtp: wrap(rtp)?,
            rtcp: wrap(rtcp)?,
            _ports: setup.ports,
            media: setup.media,
            latched: None,
            rtcp_latched: None,
            rewriter: StreamRewriter::new(rand::random(), 8000),
            sequence: SequenceStats::default(),
            dtmf: DtmfDetector::new(),
            last_rx: now,
            local_rtp,
        })
    }

    /// Where RTP for this leg goes now.
    fn destination(&self) -> Option<SocketAddr> {
        self.latched.or(self.media.remote_rtp)
    }

    fn rtcp_destination(&self) -> Option<SocketAddr> {
        self.rtcp_latched
            .or(self.media.remote_rtcp)
            .or_else(|| self.destination().map(|a| SocketAddr::new(a.ip(), a.port().wrapping_add(1))))
    }

    /// Whether a packet from `source` is accepted, latching if it should. Returns the new
    /// latched address when the latch changed.
    fn accept(&mut self, source: SocketAddr) -> Result<Option<SocketAddr>, ()> {
        if self.latched == Some(source) {
            return Ok(None);
        }
        let expected = self.media.remote_rtp == Some(source);
        let may_latch = match self.media.latch {
            LatchMode::Any => self.latched.is_none() || expected,
            LatchMode::ExpectedOnly => expected,
        };
        if may_latch {
            self.latched = Some(source);
            Ok(Some(source))
        } else {
            Err(())
        }
    }

    fn accept_rtcp(&mut self, source: SocketAddr) -> bool {
        if self.rtcp_latched == Some(source) {
            return true;
        }
        let expected_rtcp = self.media.remote_rtcp == Some(source);
        let from_latched_host = self.latched.is_some_and(|a| a.ip() == source.ip());
        let ok = match self.media.latch {
            LatchMode::Any => self.rtcp_latched.is_none() || expected_rtcp || from_latched_host,
            LatchMode::ExpectedOnly => expected_rtcp || self.media.remote_rtp.is_some_and(|a| a.ip() == source.ip()),
        };
        if ok {
            self.rtcp_latched = Some(source);
        }
        ok
    }
}

/// What [`RtpLeg::receive`] made of an RTP packet it accepted.
struct Received {
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
    marker: bool,
    /// Where the payload is in the packet.
    payload: Range<usize>,
    /// The leg's audio payload type (else telephone-event).
    is_audio: bool,
    /// The codec of the leg it came from.
    codec: Codec,
    /// To be passed on: the node receives from this leg and it is audio or telephone-event.
    /// (Otherwise it was counted as `dropped_other`.)
    forward: bool,
    /// The key of a key press this packet completed.
    key: Option<char>,
    now: Instant,
}

impl<S> RtpLeg<S> {
    /// The receiving half of the relay's work on an RTP packet from this leg, the same for
    /// both modes: validation, latching, sequence statistics, DTMF detection, counters and
    /// events. `None`: dropped (invalid or from a refused source) and counted.
    fn receive(
        &mut self,
        packet: &[u8],
        source: SocketAddr,
        counters: &Counters,
        events: &mpsc::Sender<RelayEvent>,
    ) -> Option<Received> {
        let Ok(p) = RtpPacket::parse(packet) else {
            bump(&counters.dropped_invalid, 1);
            return None;
        };
        let payload = p.header_len..p.header_len + p.payload.len();
        let (sequence, timestamp, ssrc, marker, payload_type) =
            (p.sequence, p.timestamp, p.ssrc, p.marker, p.payload_type);
        let latched = match self.accept(source) {
            Ok(latched) => latched,
            Err(()) => {
                bump(&counters.dropped_source, 1);
                return None;
            }
        };
        let now = Instant::now();
        self.last_rx = now;
        let is_audio = payload_type == self.media.payload_type;
        let is_event = self.media.telephone_event == Some(payload_type);
        let class = self.sequence.record(ssrc, sequence);
        let mut digit = None;
        if is_event && let Ok(event) = TelephoneEvent::parse(&packet[payload.clone()]) {
            digit = self.dtmf.push(timestamp, &event);
        }
        bump(&counters.packets_in, 1);
        bump(&counters.bytes_in, packet.len() as u64);
        match class {
            super::rtp::SequenceClass::Gap(n) => bump(&counters.lost, n as u64),
            super::rtp::SequenceClass::Late => bump(&counters.late, 1),
            _ => {}
        }
        if let Some(source) = latched {
            let _ = events.try_send(RelayEvent::Latched { leg: self.id, source });
        }
        let mut key = None;
        if let Some(digit) = digit {
            bump(&counters.dtmf, 1);
            key = digit.digit;
            let _ = events.try_send(RelayEvent::Dtmf { leg: self.id, digit });
        }
        let forward = self.media.direction.receives() && (is_audio || is_event);
        if !forward {
            bump(&counters.dropped_other, 1);
        }
        Some(Received {
            sequence,
            timestamp,
            ssrc,
            marker,
            payload,
            is_audio,
            codec: self.media.codec,
            forward,
            key,
            now,
        })
    }

    /// Validates and accepts (or refuses) an RTCP packet from this leg, counting it.
    fn receive_rtcp(&mut self, packet: &[u8], source: SocketAddr, counters: &Counters) -> bool {
        if super::rtp::parse_rtcp(packet).is_err() {
            bump(&counters.dropped_invalid, 1);
            return false;
        }
        if !self.accept_rtcp(source) {
            bump(&counters.dropped_source, 1);
            return false;
        }
        bump(&counters.rtcp_in, 1);
        true
    }

    /// Applies a re-INVITE's media. Returns whether the far end moved (whatever the other side
    /// receives from this leg then starts a new segment).
    fn apply(&mut self, media: LegMedia) -> bool {
        let moved = self.media.remote_rtp != media.remote_rtp;
        if moved {
            self.latched = None;
            self.rtcp_latched = None;
        }
        // A leg resuming from hold is expected to send again from now.
        if !self.media.direction.receives() && media.direction.receives() {
            self.last_rx = Instant::now();
        }
        self.media = media;
        moved
    }
}

/// The deadline of the next media timeout check over `legs`; reports the timeout once per
/// silence (`reported` remembers it until media or an update comes).
fn check_timeout<S>(
    legs: &[&RtpLeg<S>],
    timeout: Duration,
    reported: &mut bool,
    events: &mpsc::Sender<RelayEvent>,
) -> Instant {
    let now = Instant::now();
    let last = legs.iter().filter(|leg| leg.media.direction.receives()).map(|leg| leg.last_rx).max();
    let Some(last) = last else {
        // Everybody is on hold: nothing is expected.
        return now + timeout;
    };
    let silent_for = now.saturating_duration_since(last);
    if silent_for >= timeout {
        if !*reported {
            *reported = true;
            let _ = events.try_send(RelayEvent::MediaTimeout { silent_for });
        }
        return now + timeout;
    }
    last + timeout
}

/// Datagrams one `recvmmsg` asks for.
const RECV_BATCH: usize = 8;

/// Receive buffers: shared by every relay on the thread rather than owned by each. A relay
/// uses them only between a receive and the matching sends, with no await in between, and a
/// buffer per relay would be most of a call's memory.
struct Datagrams {
    data: [[u8; DATAGRAM_MAX]; RECV_BATCH],
    len: [usize; RECV_BATCH],
    source: [Option<SocketAddr>; RECV_BATCH],
    /// When each datagram reached the host (the kernel's stamp; the bridged leg's sockets ask
    /// for it), or `None` without one.
    received: [Option<std::time::Instant>; RECV_BATCH],
    control: [rx_time::ControlBuffer; RECV_BATCH],
}

thread_local! {
    static SCRATCH: RefCell<Datagrams> = const {
        RefCell::new(Datagrams {
            data: [[0; DATAGRAM_MAX]; RECV_BATCH],
            len: [0; RECV_BATCH],
            source: [None; RECV_BATCH],
            received: [None; RECV_BATCH],
            control: [rx_time::ControlBuffer::new(); RECV_BATCH],
        })
    };
}

fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, and it is large enough.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One `recvmmsg(MSG_DONTWAIT)` of up to [`RECV_BATCH`] datagrams into `into`.
fn recv_batch(socket: &std::net::UdpSocket, into: &mut Datagrams) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut names: [libc::sockaddr_storage; RECV_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovecs: [libc::iovec; RECV_BATCH] = unsafe { std::mem::zeroed() };
    let mut headers: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..RECV_BATCH {
        iovecs[i] = libc::iovec { iov_base: into.data[i].as_mut_ptr().cast(), iov_len: DATAGRAM_MAX };
        headers[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        headers[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        headers[i].msg_hdr.msg_iov = &mut iovecs[i];
        headers[i].msg_hdr.msg_iovlen = 1;
        headers[i].msg_hdr.msg_control = into.control[i].0.as_mut_ptr().cast();
        headers[i].msg_hdr.msg_controllen = rx_time::CONTROL_SPACE as _;
    }
    // SAFETY: every header points at a live buffer and name of the sizes given, for the call.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            RECV_BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    let mut clocks = None;
    for i in 0..n {
        into.len[i] = (headers[i].msg_len as usize).min(DATAGRAM_MAX);
        into.source[i] = socket_addr(&names[i]);
        // SAFETY: filled in by the recvmmsg above; its control buffer is `into.control[i]`.
        into.received[i] = unsafe { rx_time::timestamp(&headers[i].msg_hdr) }
            .map(|stamp| clocks.get_or_insert_with(rx_time::Clocks::read).instant(&stamp));
    }
    Ok(n)
}

/// Receives what is queued on `socket`, up to [`RECV_BATCH`] datagrams, in one syscall.
/// `Pending` (the waker registered) when there is nothing. When fewer datagrams came than
/// asked for, the socket is drained: its readiness is cleared here, so that the next poll
/// waits for epoll instead of paying for a receive that would only say `EAGAIN`. That is
/// race-free: tokio clears a readiness only if no event arrived since the guard was taken,
/// and a datagram arriving later raises a new (edge-triggered) event.
fn poll_recv_batch(socket: &LegSocket, cx: &mut Context<'_>, into: &mut Datagrams) -> Poll<std::io::Result<usize>> {
    loop {
        let mut guard = match socket.poll_read_ready(cx) {
            Poll::Ready(Ok(guard)) => guard,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => return Poll::Pending,
        };
        match guard.try_io(|s| recv_batch(s.get_ref(), into)) {
            Ok(Ok(n)) => {
                if n < RECV_BATCH {
                    guard.clear_ready();
                }
                return Poll::Ready(Ok(n));
            }
            Ok(Err(error)) => return Poll::Ready(Err(error)),
            // Would block: the readiness is cleared; poll again to register the waker.
            Err(_) => continue,
        }
    }
}

/// Batches taken from one socket per wakeup before giving the others a turn.
const BATCHES_PER_WAKE: usize = BATCH / RECV_BATCH;

/// A two-leg relay: its state, driven by a media engine thread ([`super::engine`]).
pub(super) struct Relay {
    a: RtpLeg<std::net::UdpSocket>,
    b: RtpLeg<std::net::UdpSocket>,
    counters: Arc<[Counters; 2]>,
    events: mpsc::Sender<RelayEvent>,
    config: RelayConfig,
    timeout_reported: bool,
    /// The kernel fast path, when the engine has one and this relay may use it.
    kernel: Option<Arc<KernelForwarder>>,
    /// The directions installed in the kernel, by receiving leg.
    offloaded: [Option<Offloaded>; 2],
}

/// A relay direction forwarded in the kernel: its key, the rule installed and the entry's
/// state as last folded into the relay's counters.
struct Offloaded {
    key: ForwardKey,
    rule: ForwardRule,
    seen: ForwardEntry,
}

fn new_counters() -> Arc<[Counters; 2]> {
    Arc::new([Counters::default(), Counters::default()])
}

/// Starts a relay between two RTP legs on the process's media engine ([`MediaEngine::global`]).
pub fn spawn_relay(
    a: RtpLegSetup,
    b: RtpLegSetup,
    config: RelayConfig,
) -> Result<(RelayHandle, mpsc::Receiver<RelayEvent>), RelayError> {
    spawn_relay_on(MediaEngine::global()?, a, b, config)
}

/// Starts a relay between two RTP legs on the given media engine.
pub fn spawn_relay_on(
    engine: &MediaEngine,
    a: RtpLegSetup,
    b: RtpLegSetup,
    config: RelayConfig,
) -> Result<(RelayHandle, mpsc::Receiver<RelayEvent>), RelayError> {
    let now = Instant::now();
    let plain = |socket: std::net::UdpSocket| Ok(socket);
    let a = RtpLeg::new(LegId::A, a, now, plain)?;
    let b = RtpLeg::new(LegId::B, b, now, plain)?;
    let counters = new_counters();
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let relay = Relay {
        a,
        b,
        counters: Arc::clone(&counters),
        events: events_tx,
        config,
        timeout_reported: false,
        kernel: None,
        offloaded: [None, None],
    };
    let relay = engine.add(relay)?;
    Ok((RelayHandle { driver: Driver::Engine(Some(relay)), counters }, events_rx))
}

impl Relay {
    /// The four sockets, for the media engine's epoll set.
    pub(super) fn sockets(&self) -> impl Iterator<Item = (LegId, bool, &std::net::UdpSocket)> {
        [&self.a, &self.b].into_iter().flat_map(|leg| [(leg.id, false, &leg.rtp), (leg.id, true, &leg.rtcp)])
    }

    /// The configured media timeout.
    pub(super) fn media_timeout(&self) -> Duration {
        self.config.media_timeout
    }

    /// Takes one datagram from a socket the engine found readable and relays it. One read per
    /// readiness: the engine's epoll is level-triggered, so anything left is reported again,
    /// and no read is spent finding the queue empty.
    pub(super) fn receive_one(&mut self, leg: LegId, rtcp: bool, buf: &mut [u8]) {
        let (this, _) = self.legs(leg);
        let socket = if rtcp { &this.rtcp } else { &this.rtp };
        // Errors (WouldBlock after a spurious wakeup, a pending ICMP error) are consumed by the
        // read; the next readiness tries again.
        let Ok((len, source)) = socket.recv_from(buf) else { return };
        if rtcp {
            self.on_rtcp(leg, &mut buf[..len], source);
        } else {
            self.on_rtp(leg, &mut buf[..len], source);
        }
    }

    /// The deadline of the next media timeout check; reports the timeout once per silence.
    pub(super) fn check_timeout(&mut self) -> Instant {
        // Packets the kernel forwarded count as media.
        self.kernel_sync(LegId::A);
        self.kernel_sync(LegId::B);
        check_timeout(&[&self.a, &self.b], self.config.media_timeout, &mut self.timeout_reported, &self.events)
    }

    fn legs(&mut self, leg: LegId) -> (&mut RtpLeg<std::net::UdpSocket>, &mut RtpLeg<std::net::UdpSocket>) {
        let (this, other, _, _) = self.split(leg);
        (this, other)
    }

    /// Applies a re-INVITE's outcome to a leg.
    pub(super) fn update(&mut self, leg: LegId, media: LegMedia) {
        // User space takes both directions back until each is steady again.
        self.kernel_uninstall(LegId::A);
        self.kernel_uninstall(LegId::B);
        let (this, other) = self.legs(leg);
        // The stream behind this leg changes: what the other leg receives starts a new
        // segment even if the SSRC stays.
        if this.apply(media) {
            other.rewriter.reset();
        }
        self.timeout_reported = false;
    }

    /// The leg a packet came from, the other one, the counters and the event channel, borrowed
    /// apart (no clone of the shared counters or of the channel per packet).
    fn split(
        &mut self,
        leg: LegId,
    ) -> (&mut RtpLeg<std::net::UdpSocket>, &mut RtpLeg<std::net::UdpSocket>, &[Counters; 2], &mpsc::Sender<RelayEvent>)
    {
        let Relay { a, b, counters, events, .. } = self;
        let (this, other) = match leg {
            LegId::A => (a, b),
            LegId::B => (b, a),
        };
        (this, other, &**counters, &*events)
    }

    fn on_rtcp(&mut self, leg: LegId, packet: &mut [u8], source: SocketAddr) {
        let (this, target, counters, _) = self.split(leg);
        if !this.receive_rtcp(packet, source, &counters[leg.index()]) {
            return;
        }
        // In the other peer's terms: the SSRCs and numbers of the streams as the node relays them.
        RtcpTranslation {
            sender_ssrc: target.rewriter.ssrc(),
            sender_timestamps: target.rewriter.steady_segment().map(|s| (s.in_ssrc, s.ts_offset)),
            reported: this.rewriter.steady_segment().map(|s| (this.rewriter.ssrc(), s.in_ssrc, s.seq_offset)),
        }
        .apply(packet);
        if let Some(dest) = target.rtcp_destination()
            && target.rtcp.send_to(packet, dest).is_ok()
        {
            bump(&counters[target.id.index()].rtcp_out, 1);
        }
    }

    fn on_rtp(&mut self, leg: LegId, packet: &mut [u8], source: SocketAddr) {
        // If the kernel forwarded this stream until now, continue where it stopped.
        self.kernel_sync(leg);
        let (this, target, counters, events) = self.split(leg);
        let Some(r) = this.receive(packet, source, &counters[leg.index()], events) else { return };
        if !r.forward {
            return;
        }
        let dropped = &counters[leg.index()].dropped_other;
        let Some(dest) = target.destination().filter(|_| target.media.direction.sends()) else {
            bump(dropped, 1);
            return;
        };
        let out_type = if r.is_audio {
            target.media.payload_type
        } else if let Some(pt) = target.media.telephone_event {
            pt
        } else {
            bump(dropped, 1);
            return;
        };
        if r.is_audio && target.media.codec != r.codec {
            let payload = &mut packet[r.payload.clone()];
            match target.media.codec {
                Codec::Pcma => g711::ulaw_to_alaw_in_place(payload),
                _ => g711::alaw_to_ulaw_in_place(payload),
            }
        }
        let out = target.rewriter.rewrite(r.ssrc, r.sequence, r.timestamp, r.marker, r.now.into_std());
        let header = RtpHeader {
            marker: out.marker,
            payload_type: out_type,
            sequence: out.sequence,
            timestamp: out.timestamp,
            ssrc: out.ssrc,
        };
        let _ = header.rewrite(packet);
        let out_counters = &counters[target.id.index()];
        let target_id = target.id;
        match target.rtp.send_to(packet, dest) {
            Ok(_) => {
                bump(&out_counters.packets_out, 1);
                bump(&out_counters.bytes_out, packet.len() as u64);
                if self.kernel.is_some() {
                    // This direction may have become steady; the other one changes when this
                    // leg latched anew (it sends here).
                    self.kernel_offload(leg);
                    self.kernel_offload(target_id);
                }
            }
            Err(_) => bump(dropped, 1),
        }
    }

    /// The relay's keys in the kernel fast path, by receiving leg.
    pub(super) fn kernel_keys(&self) -> [Option<ForwardKey>; 2] {
        [&self.a, &self.b].map(|leg| leg.local_rtp.and_then(ForwardKey::of))
    }

    /// The call removed this relay's kernel entries itself (an update is coming): folds in their
    /// last state and forgets them.
    pub(super) fn kernel_released(&mut self, last: [Option<ForwardEntry>; 2]) {
        for (leg, last) in [LegId::A, LegId::B].into_iter().zip(last) {
            if let Some(last) = last {
                self.kernel_fold(leg, last);
            }
            self.offloaded[leg.index()] = None;
        }
    }

    /// Gives the engine's kernel fast path to this relay.
    pub(super) fn use_kernel(&mut self, kernel: Option<Arc<KernelForwarder>>) {
        self.kernel = kernel;
    }

    /// What the kernel should do with RTP from `leg`, if the direction is steady: the peer
    /// latched, the node receives from it and sends to the other leg, both legs on PCMU or PCMA
    /// (transcoded in the kernel when they differ), one input stream with fixed offsets, IPv4.
    fn kernel_rule(&self, leg: LegId) -> Option<(ForwardKey, ForwardRule, SteadySegment)> {
        let (this, target) = match leg {
            LegId::A => (&self.a, &self.b),
            LegId::B => (&self.b, &self.a),
        };
        if !this.media.direction.receives() || !target.media.direction.sends() {
            return None;
        }
        let transcode = match (this.media.codec, target.media.codec) {
            (from, to) if from == to => None,
            (Codec::Pcmu, Codec::Pcma) => Some(Transcode::UlawToAlaw),
            (Codec::Pcma, Codec::Pcmu) => Some(Transcode::AlawToUlaw),
            _ => return None,
        };
        let segment = target.rewriter.steady_segment()?;
        let key = ForwardKey::of(this.local_rtp?)?;
        let rule = ForwardRule {
            peer: ipv4_of(this.latched?)?,
            in_pt: this.media.payload_type,
            out_pt: target.media.payload_type,
            in_ssrc: segment.in_ssrc,
            out_ssrc: target.rewriter.ssrc(),
            seq_offset: segment.seq_offset,
            ts_offset: segment.ts_offset,
            from: ipv4_of(target.local_rtp?)?,
            to: ipv4_of(target.destination()?)?,
            local: false,
            transcode,
        };
        let local = rule.to.ip() == rule.from.ip() || self.kernel.as_ref().is_some_and(|k| k.is_local(*rule.to.ip()));
        let rule = ForwardRule { local, ..rule };
        Some((key, rule, segment))
    }

    /// After user space relayed a packet from `leg`: installs the direction in the kernel when
    /// it is steady and not installed as it is, removes it when it is no longer steady.
    fn kernel_offload(&mut self, leg: LegId) {
        let Some(kernel) = self.kernel.clone() else { return };
        let wanted = self.kernel_rule(leg).map(|(_, rule, _)| rule);
        if wanted == self.offloaded[leg.index()].as_ref().map(|o| o.rule) {
            return;
        }
        // The state the kernel kept comes back first, so that the new entry starts from it.
        self.kernel_uninstall(leg);
        let Some((key, rule, segment)) = self.kernel_rule(leg) else { return };
        if !kernel.ready_for(IpAddr::V4(*rule.from.ip())) {
            // This address cannot be offloaded (the forwarder logged why, once).
            self.kernel_give_up();
            return;
        }
        let entry = rule.entry(segment.highest_in_seq, segment.last_ts);
        match kernel.install(key, entry) {
            Ok(()) => self.offloaded[leg.index()] = Some(Offloaded { key, rule, seen: entry }),
            Err(error) => {
                // A full map, most likely: this call stays in user space (one warning, not one
                // per packet).
                tracing::warn!(%error, "cannot install a kernel RTP forward; this call is relayed in user space");
                self.kernel_give_up();
            }
        }
    }

    /// Takes both directions back and relays this call in user space from now on.
    fn kernel_give_up(&mut self) {
        self.kernel_uninstall(LegId::A);
        self.kernel_uninstall(LegId::B);
        self.kernel = None;
    }

    /// Folds what the kernel forwarded from `leg` since the last look into the relay: counters,
    /// the time of the last packet (media timeout), the sequence state of both streams.
    fn kernel_sync(&mut self, leg: LegId) {
        let (Some(kernel), Some(installed)) = (&self.kernel, &self.offloaded[leg.index()]) else { return };
        if let Some(entry) = kernel.read(&installed.key) {
            self.kernel_fold(leg, entry);
        }
    }

    fn kernel_fold(&mut self, leg: LegId, entry: ForwardEntry) {
        let Relay { a, b, counters, offloaded, kernel, .. } = self;
        let Some(installed) = &mut offloaded[leg.index()] else { return };
        let (this, target) = match leg {
            LegId::A => (a, b),
            LegId::B => (b, a),
        };
        let seen = std::mem::replace(&mut installed.seen, entry);
        let packets = entry.packets.wrapping_sub(seen.packets);
        if packets == 0 {
            return;
        }
        if let Some(kernel) = kernel {
            kernel.count_forwarded(packets);
        }
        let bytes = entry.bytes.wrapping_sub(seen.bytes);
        let (lost, late) = (entry.lost.wrapping_sub(seen.lost), entry.late.wrapping_sub(seen.late));
        let (from, to) = (&counters[this.id.index()], &counters[target.id.index()]);
        bump(&from.packets_in, packets);
        bump(&from.bytes_in, bytes);
        bump(&from.lost, lost);
        bump(&from.late, late);
        bump(&to.packets_out, packets);
        bump(&to.bytes_out, bytes);
        let at = instant_of(entry.last_ns).into();
        this.last_rx = this.last_rx.max(at);
        this.sequence.received_elsewhere(entry.highest_seq, packets, lost, late);
        target.rewriter.forwarded_elsewhere(entry.highest_seq, entry.last_out_ts, at.into_std());
    }

    /// Takes a direction back from the kernel (its last counters folded in).
    fn kernel_uninstall(&mut self, leg: LegId) {
        let (Some(kernel), Some(installed)) = (&self.kernel, &self.offloaded[leg.index()]) else { return };
        if let Some(last) = kernel.remove(&installed.key) {
            self.kernel_fold(leg, last);
        }
        self.offloaded[leg.index()] = None;
    }
}

impl Drop for Relay {
    /// The kernel forgets the relay's directions before its ports go back (a port reused by
    /// another call must not be forwarded as this one's).
    fn drop(&mut self) {
        self.kernel_uninstall(LegId::A);
        self.kernel_uninstall(LegId::B);
    }
}

/// What the caller's leg of a bridged call hands to the bridge session.
pub(crate) enum CallerInput<'a> {
    /// One caller frame as μ-law (transcoded from A-law in place when the caller sends A-law),
    /// and when the datagram that completed it reached the host (the kernel's stamp).
    Audio(&'a mut [u8], Option<std::time::Instant>),
    /// A key press.
    Key(char),
}

/// The caller's leg of a bridged call: the same RTP handling as an anchored call's leg (see
/// the module doc), driven by the bridge session's own task rather than a task of its own, so
/// that a caller frame goes from the UDP socket to the WebSocket in one wakeup with no channel
/// in between, and an agent frame from the playback buffer to the caller's socket likewise.
///
/// Counters: leg A is the caller; leg B stands for the bridge (`packets_in` are agent frames,
/// `dropped_other` agent frames that could not be sent).
pub(crate) struct BridgedLeg {
    leg: RtpLeg,
    counters: Arc<[Counters; 2]>,
    events: mpsc::Sender<RelayEvent>,
    control: MailboxReceiver<Control>,
    media_timeout: Duration,
    timeout_reported: bool,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The timer has been polled since it was last reset (so it will wake the task).
    timer_armed: bool,
    /// The RTP packet of the agent frame being sent (empty until the first frame).
    out: Vec<u8>,
    /// Caller audio short of a whole agent frame (a caller whose ptime is not 20 ms): never
    /// more than one frame, so the bridge adds no delay beyond the frame it must fill.
    partial: Vec<u8>,
}

/// The agent's frame: 20 ms of 8 kHz μ-law, as Twilio Media Streams sends it. Caller audio
/// in packets of another size (ptime 10, 30, 40) is cut into frames of this size.
const AGENT_FRAME: usize = 160;

/// Sets up the caller's leg of a bridged call, for the bridge session to drive
/// ([`BridgedLeg::poll`]). Must run inside a tokio runtime. The handle works as for an
/// anchored relay: [`RelayHandle::update_leg`] for leg A, stats, and stop (or drop), which
/// releases the ports and ends the bridge session as "media ended".
pub(crate) fn start_bridged(
    a: RtpLegSetup,
    config: RelayConfig,
) -> Result<(BridgedLeg, RelayHandle, mpsc::Receiver<RelayEvent>), RelayError> {
    tokio::runtime::Handle::try_current().map_err(|_| RelayError::NoRuntime)?;
    let leg = RtpLeg::new(LegId::A, a, Instant::now(), register)?;
    // The bridge measures its delay from when caller RTP arrived; without the stamps (an old
    // kernel) it still works, unmeasured.
    {
        use std::os::fd::AsRawFd as _;
        if let Err(error) = rx_time::enable(leg.rtp.get_ref().as_raw_fd()) {
            tracing::debug!(%error, "no receive timestamps on the caller's RTP socket");
        }
    }
    let counters = new_counters();
    let (control_tx, control_rx) = mailbox();
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let bridged = BridgedLeg {
        leg,
        counters: Arc::clone(&counters),
        events: events_tx,
        control: control_rx,
        media_timeout: config.media_timeout,
        timeout_reported: false,
        timer: Box::pin(tokio::time::sleep(config.media_timeout)),
        timer_armed: false,
        out: Vec::new(),
        partial: Vec::new(),
    };
    Ok((bridged, RelayHandle { driver: Driver::Mailbox(control_tx), counters }, events_rx))
}

impl BridgedLeg {
    /// Does what the leg has to do now: re-INVITE updates, caller RTP (each frame and key
    /// press goes to `sink`, which returns whether it took the frame; a frame it did not take
    /// is counted as `dropped_other`), RTCP (which ends at the node), the media timeout.
    /// `Ready` when the relay handle asked to stop (with the acknowledgement to send once the
    /// leg is dropped) or was dropped (`None`).
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        sink: &mut dyn FnMut(&mut Context<'_>, CallerInput<'_>) -> bool,
    ) -> Poll<Option<oneshot::Sender<()>>> {
        while let Poll::Ready(control) = self.control.poll_recv(cx) {
            match control {
                None => return Poll::Ready(None),
                Some(Control::Stop(done)) => return Poll::Ready(Some(done)),
                Some(Control::Update(LegId::A, media)) => {
                    self.leg.apply(*media);
                    self.timeout_reported = false;
                }
                Some(Control::Update(LegId::B, _)) => {} // refused by the handle
            }
        }
        let mut more = false;
        SCRATCH.with_borrow_mut(|batch| {
            more |= self.drain(cx, batch, false, sink);
            more |= self.drain(cx, batch, true, sink);
        });
        if more {
            // A busy socket: let the other tasks run, then come back.
            cx.waker().wake_by_ref();
        }
        // The timer is polled only once due (and after a reset, to register it): it keeps the
        // task's waker between polls, and polling it on every packet was measurable.
        while !self.timer_armed || Instant::now() >= self.timer.deadline() {
            self.timer_armed = true;
            if self.timer.as_mut().poll(cx).is_pending() {
                break;
            }
            let next = check_timeout(&[&self.leg], self.media_timeout, &mut self.timeout_reported, &self.events);
            self.timer.as_mut().reset(next);
            self.timer_armed = false;
        }
        Poll::Pending
    }

    /// Reads up to [`BATCH`] datagrams from the RTP or RTCP socket; returns whether more may
    /// be waiting.
    fn drain(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut Datagrams,
        rtcp: bool,
        sink: &mut dyn FnMut(&mut Context<'_>, CallerInput<'_>) -> bool,
    ) -> bool {
        // One more poll than batches: after a short batch (readiness cleared) it only registers
        // the waker, without a syscall, so that the next datagram wakes the task.
        for _ in 0..=BATCHES_PER_WAKE {
            let socket = if rtcp { &self.leg.rtcp } else { &self.leg.rtp };
            let n = match poll_recv_batch(socket, cx, batch) {
                Poll::Ready(Ok(n)) => n,
                // An error (an ICMP error reported on a UDP socket, say) was consumed by the
                // receive: read on next time.
                Poll::Ready(Err(_)) => return true,
                Poll::Pending => return false,
            };
            for i in 0..n {
                let Some(source) = batch.source[i] else { continue };
                let packet = &mut batch.data[i][..batch.len[i]];
                if rtcp {
                    // RTCP ends at the node in bridged mode.
                    self.leg.receive_rtcp(packet, source, &self.counters[0]);
                } else {
                    self.on_rtp(cx, packet, source, batch.received[i], sink);
                }
            }
        }
        true
    }

    fn on_rtp(
        &mut self,
        cx: &mut Context<'_>,
        packet: &mut [u8],
        source: SocketAddr,
        received: Option<std::time::Instant>,
        sink: &mut dyn FnMut(&mut Context<'_>, CallerInput<'_>) -> bool,
    ) {
        let Some(r) = self.leg.receive(packet, source, &self.counters[0], &self.events) else { return };
        if let Some(key) = r.key {
            sink(cx, CallerInput::Key(key));
        }
        if !r.forward || !r.is_audio {
            return;
        }
        let payload = &mut packet[r.payload];
        if r.codec == Codec::Pcma {
            g711::alaw_to_ulaw_in_place(payload);
        }
        if self.partial.is_empty() && payload.len() == AGENT_FRAME {
            // The usual case (ptime 20): the packet is the frame.
            if !sink(cx, CallerInput::Audio(payload, received)) {
                bump(&self.counters[0].dropped_other, 1);
            }
            return;
        }
        let mut rest: &[u8] = payload;
        while !rest.is_empty() {
            let take = (AGENT_FRAME - self.partial.len()).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() == AGENT_FRAME {
                if !sink(cx, CallerInput::Audio(&mut self.partial, received)) {
                    bump(&self.counters[0].dropped_other, 1);
                }
                self.partial.clear();
            }
        }
    }

    /// Sends one paced agent frame (μ-law) to the caller; returns whether it went out.
    pub(crate) fn play(&mut self, frame: &[u8]) -> bool {
        let counters = &self.counters[1];
        bump(&counters.packets_in, 1);
        bump(&counters.bytes_in, frame.len() as u64);
        let a = &mut self.leg;
        let Some(dest) = a.destination().filter(|_| a.media.direction.sends() && !frame.is_empty()) else {
            bump(&counters.dropped_other, 1);
            return false;
        };
        let out = a.rewriter.next_own(frame.len() as u32, Instant::now().into_std());
        let header = RtpHeader {
            marker: out.marker,
            payload_type: a.media.payload_type,
            sequence: out.sequence,
            timestamp: out.timestamp,
            ssrc: out.ssrc,
        };
        self.out.clear();
        header.write(frame, &mut self.out);
        if a.media.codec == Codec::Pcma {
            g711::ulaw_to_alaw_in_place(&mut self.out[super::rtp::RTP_HEADER_LEN..]);
        }
        match a.rtp.get_ref().send_to(&self.out, dest) {
            Ok(_) => {
                bump(&self.counters[0].packets_out, 1);
                bump(&self.counters[0].bytes_out, self.out.len() as u64);
                true
            }
            Err(_) => {
                bump(&counters.dropped_other, 1);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::net::UdpSocket;

    use super::*;
    use crate::media::ports::{PortAllocator, PortRange};

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
        let stats = s.handle.stats();
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
}
