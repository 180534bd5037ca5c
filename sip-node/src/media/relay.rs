//! The per-call RTP relay: one tokio task owning the sockets of both legs of an anchored call
//! (or of the caller's leg and the AI bridge), moving each packet across as soon as it arrives.
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
//! - **RTCP** on the odd ports is validated and passed to the other leg unchanged.
//! - **Media timeout**: no RTP from a leg that should be sending for the configured time gives
//!   [`RelayEvent::MediaTimeout`] (legs on hold are not expected to send).
//! - **Direction**: nothing is sent to a leg whose negotiated direction says the node does not
//!   send there, nothing received from a leg the node does not receive from is relayed.
//!
//! In bridged mode ([`spawn_bridged`]) the other side is the AI bridge: caller audio leaves as
//! μ-law frames on a channel of capacity one (a frame the bridge has not taken when the next
//! arrives is dropped and counted: no queue grows behind a slow agent), and the agent's paced
//! μ-law frames become RTP towards the caller.
//!
//! The task owns the [`PortPair`]s: when it ends (stop, the handle dropped) the ports go back.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use switchboard_model::Codec;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::engine::{EngineRelay, MediaEngine};
use super::g711;
use super::ports::PortPair;
use super::rtp::{DtmfDetector, DtmfDigit, RtpHeader, RtpPacket, SequenceStats, StreamRewriter, TelephoneEvent};
use super::sdp::{MediaDirection, NegotiatedMedia};

/// The default media timeout.
pub const DEFAULT_MEDIA_TIMEOUT: Duration = Duration::from_secs(30);
/// Receive buffer per datagram: larger than any RTP packet on an Ethernet path.
const DATAGRAM_MAX: usize = 4096;
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
    bridged: bool,
}

/// What runs the relay.
enum Driver {
    /// A tokio task (bridged relays).
    Task { control: mpsc::UnboundedSender<Control>, task: Option<JoinHandle<()>> },
    /// A media engine thread (two-leg relays).
    Engine(Option<EngineRelay>),
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").field("bridged", &self.bridged).finish()
    }
}

impl RelayHandle {
    /// Applies a re-INVITE's outcome to a leg: new far-end address (the leg re-latches), codec,
    /// payload types, direction.
    pub fn update_leg(&self, leg: LegId, media: LegMedia) -> Result<(), RelayError> {
        if self.bridged && leg == LegId::B {
            return Err(RelayError::NoSuchLeg(leg));
        }
        let update = Control::Update(leg, Box::new(media));
        match &self.driver {
            Driver::Task { control, .. } => control.send(update).map_err(|_| RelayError::Stopped),
            Driver::Engine(Some(relay)) => relay.control(update),
            Driver::Engine(None) => Err(RelayError::Stopped),
        }
    }

    /// The counters now.
    pub fn stats(&self) -> RelayStats {
        RelayStats { a: self.counters[0].snapshot(), b: self.counters[1].snapshot() }
    }

    /// Whether the relay has ended.
    pub fn is_finished(&self) -> bool {
        match &self.driver {
            Driver::Task { task, .. } => task.as_ref().is_none_or(|t| t.is_finished()),
            Driver::Engine(relay) => relay.as_ref().is_none_or(EngineRelay::is_finished),
        }
    }

    /// Stops the relay and waits until its sockets are closed and its ports released; returns
    /// the final counters.
    pub async fn stop(mut self) -> RelayStats {
        match &mut self.driver {
            Driver::Task { control, task } => {
                let (tx, rx) = oneshot::channel();
                if control.send(Control::Stop(tx)).is_ok() {
                    let _ = rx.await;
                }
                if let Some(task) = task.take() {
                    let _ = task.await;
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

impl Drop for RelayHandle {
    fn drop(&mut self) {
        // An engine relay removes itself when its EngineRelay drops.
        if let Driver::Task { task: Some(task), .. } = &mut self.driver {
            task.abort();
        }
    }
}

/// The bridge's ends of a bridged relay's channels.
#[derive(Debug)]
pub struct BridgeMedia {
    /// Caller audio as μ-law payloads (one RTP packet each, 160 bytes at 20 ms ptime), at most
    /// one waiting.
    pub caller_audio: mpsc::Receiver<Bytes>,
    /// Caller key presses.
    pub caller_dtmf: mpsc::Receiver<char>,
    /// Agent audio as μ-law frames, already paced: each becomes one RTP packet at once (at most
    /// one frame waits; a frame the relay has not taken when the next is due is dropped and counted).
    pub agent_audio: mpsc::Sender<Bytes>,
}

/// A leg's socket, registered with tokio for reads only. A `tokio::net::UdpSocket` registers
/// for writability too, and Linux then reports every datagram sent as a writability event (the
/// kernel frees the sent buffer, the socket is writable again, epoll is told): one wasted event
/// per relayed packet for the reactor to take and dispatch. Sends here never wait: a full send
/// buffer drops the packet (and counts it), as before.
type LegSocket = AsyncFd<std::net::UdpSocket>;

/// A leg's socket as the relay logic sees it: tokio-registered for bridged relays, a plain
/// socket for two-leg relays, which the media engine's threads drive ([`super::engine`]).
pub(super) trait LegIo {
    /// The socket to send on and receive from (non-blocking).
    fn udp(&self) -> &std::net::UdpSocket;
}

impl LegIo for LegSocket {
    fn udp(&self) -> &std::net::UdpSocket {
        self.get_ref()
    }
}

impl LegIo for std::net::UdpSocket {
    fn udp(&self) -> &std::net::UdpSocket {
        self
    }
}

fn register(socket: std::net::UdpSocket) -> std::io::Result<LegSocket> {
    // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same for as
    // long as it is registered.
    Ok(unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?)
}

pub(super) struct RtpLeg<S = LegSocket> {
    id: LegId,
    pub(super) rtp: S,
    pub(super) rtcp: S,
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
}

impl<S: LegIo> RtpLeg<S> {
    /// Takes the sockets out of the setup's port pair, wrapped by `wrap` (tokio registration
    /// or none).
    pub(super) fn new(
        id: LegId,
        mut setup: RtpLegSetup,
        now: Instant,
        wrap: impl Fn(std::net::UdpSocket) -> std::io::Result<S>,
    ) -> Result<RtpLeg<S>, RelayError> {
        let (rtp, rtcp) = setup.ports.take_sockets().ok_or(RelayError::NoSockets(id))?;
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

pub(super) enum Other<S = LegSocket> {
    Rtp(Box<RtpLeg<S>>),
    Bridge { to_bridge: mpsc::Sender<Bytes>, dtmf_to_bridge: mpsc::Sender<char> },
}

pub(super) struct Relay<S = LegSocket> {
    pub(super) a: RtpLeg<S>,
    pub(super) b: Other<S>,
    counters: Arc<[Counters; 2]>,
    events: mpsc::Sender<RelayEvent>,
    config: RelayConfig,
    timeout_reported: bool,
    /// The agent frame being sent (bridged mode only; empty until the first frame).
    out: Vec<u8>,
}

thread_local! {
    /// The datagram being relayed. Shared by every relay on the thread rather than owned by each:
    /// a relay uses it only between a receive and the matching send, with no await between, and
    /// a buffer per relay would be most of a call's memory.
    static SCRATCH: RefCell<[u8; DATAGRAM_MAX]> = const { RefCell::new([0; DATAGRAM_MAX]) };
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
    let counters: Arc<[Counters; 2]> = Arc::new([Counters::default(), Counters::default()]);
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let relay = Relay {
        a,
        b: Other::Rtp(Box::new(b)),
        counters: Arc::clone(&counters),
        events: events_tx,
        config,
        timeout_reported: false,
        out: Vec::new(),
    };
    let relay = engine.add(relay)?;
    Ok((RelayHandle { driver: Driver::Engine(Some(relay)), counters, bridged: false }, events_rx))
}

/// Starts a relay between the caller's RTP leg and the AI bridge. Must run inside a tokio
/// runtime.
pub fn spawn_bridged(
    a: RtpLegSetup,
    config: RelayConfig,
) -> Result<(RelayHandle, mpsc::Receiver<RelayEvent>, BridgeMedia), RelayError> {
    tokio::runtime::Handle::try_current().map_err(|_| RelayError::NoRuntime)?;
    let a = RtpLeg::new(LegId::A, a, Instant::now(), register)?;
    let (to_bridge, caller_audio) = mpsc::channel(1);
    let (dtmf_to_bridge, caller_dtmf) = mpsc::channel(32);
    // One paced frame in flight: the bridge adds no buffering beyond a frame in either direction.
    let (agent_audio, from_bridge) = mpsc::channel(1);
    let (handle, events) = start(a, Other::Bridge { to_bridge, dtmf_to_bridge }, Some(from_bridge), config, true);
    Ok((handle, events, BridgeMedia { caller_audio, caller_dtmf, agent_audio }))
}

fn start(
    a: RtpLeg,
    b: Other,
    from_bridge: Option<mpsc::Receiver<Bytes>>,
    config: RelayConfig,
    bridged: bool,
) -> (RelayHandle, mpsc::Receiver<RelayEvent>) {
    let counters: Arc<[Counters; 2]> = Arc::new([Counters::default(), Counters::default()]);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let relay = Relay {
        a,
        b,
        counters: Arc::clone(&counters),
        events: events_tx,
        config,
        timeout_reported: false,
        out: Vec::new(),
    };
    let task = tokio::spawn(relay.run(control_rx, from_bridge));
    (RelayHandle { driver: Driver::Task { control: control_tx, task: Some(task) }, counters, bridged }, events_rx)
}

/// What woke the relay.
enum Wake {
    Rtp(LegId),
    Rtcp(LegId),
    Agent(Option<Bytes>),
    Control(Option<Control>),
    Timer,
}

/// Waits for the next thing to do. Sockets are polled with `poll_read_ready`, which keeps one
/// waker per socket instead of queueing a waiter per call as `readable()` does: on the hot path
/// (one packet per wakeup) that is most of the relay's overhead besides the syscalls. The
/// starting socket rotates so that a busy socket cannot starve the others.
fn poll_wake(
    cx: &mut Context<'_>,
    a: &RtpLeg,
    b: &Other,
    control: &mut mpsc::UnboundedReceiver<Control>,
    from_bridge: &mut Option<mpsc::Receiver<Bytes>>,
    timer: Pin<&mut tokio::time::Sleep>,
    rotation: usize,
) -> Poll<Wake> {
    if let Poll::Ready(c) = control.poll_recv(cx) {
        return Poll::Ready(Wake::Control(c));
    }
    // (socket, is RTCP, leg)
    let sockets: [(&LegSocket, bool, LegId); 4] = match b {
        Other::Rtp(b) => {
            [(&a.rtp, false, LegId::A), (&b.rtp, false, LegId::B), (&a.rtcp, true, LegId::A), (&b.rtcp, true, LegId::B)]
        }
        Other::Bridge { .. } => {
            [(&a.rtp, false, LegId::A), (&a.rtcp, true, LegId::A), (&a.rtp, false, LegId::A), (&a.rtcp, true, LegId::A)]
        }
    };
    for i in 0..4 {
        let (socket, rtcp, leg) = sockets[(rotation + i) % 4];
        // An error counts as ready: the read that follows sees it and moves on.
        // The readiness guard is dropped unused: the readiness stays until a read would block.
        if socket.poll_read_ready(cx).is_ready() {
            return Poll::Ready(if rtcp { Wake::Rtcp(leg) } else { Wake::Rtp(leg) });
        }
    }
    if let Some(rx) = from_bridge
        && let Poll::Ready(frame) = rx.poll_recv(cx)
    {
        return Poll::Ready(Wake::Agent(frame));
    }
    if timer.poll(cx).is_ready() {
        return Poll::Ready(Wake::Timer);
    }
    Poll::Pending
}

fn leg_of<'a, S>(a: &'a mut RtpLeg<S>, b: &'a mut Other<S>, leg: LegId) -> Option<&'a mut RtpLeg<S>> {
    match (leg, b) {
        (LegId::A, _) => Some(a),
        (LegId::B, Other::Rtp(b)) => Some(b),
        (LegId::B, Other::Bridge { .. }) => None,
    }
}

impl Relay {
    async fn run(
        mut self,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut from_bridge: Option<mpsc::Receiver<Bytes>>,
    ) {
        let timer = tokio::time::sleep(self.config.media_timeout);
        tokio::pin!(timer);
        let mut rotation = 0usize;
        loop {
            rotation = rotation.wrapping_add(1);
            let wake = std::future::poll_fn(|cx| {
                poll_wake(cx, &self.a, &self.b, &mut control, &mut from_bridge, timer.as_mut(), rotation)
            })
            .await;
            match wake {
                Wake::Control(None) => return,
                Wake::Control(Some(Control::Stop(done))) => {
                    drop(self);
                    let _ = done.send(());
                    return;
                }
                Wake::Control(Some(Control::Update(leg, media))) => self.update(leg, *media),
                Wake::Rtp(leg) => self.drain_rtp(leg),
                Wake::Rtcp(leg) => self.drain_rtcp(leg),
                Wake::Agent(Some(frame)) => self.agent_frame(&frame),
                Wake::Agent(None) => from_bridge = None,
                Wake::Timer => {
                    let next = self.check_timeout();
                    timer.as_mut().reset(next);
                }
            }
        }
    }

    /// Relays what is queued on a leg's RTP socket, up to [`BATCH`] datagrams. Stops at
    /// `WouldBlock` (tokio then waits for the next readiness) or at any other error (the
    /// readiness stays, the next wakeup reads on).
    fn drain_rtp(&mut self, leg: LegId) {
        SCRATCH.with_borrow_mut(|buf| {
            for _ in 0..BATCH {
                let Some(this) = leg_of(&mut self.a, &mut self.b, leg) else { return };
                match this.rtp.try_io(Interest::READABLE, |s| s.recv_from(&mut buf[..])) {
                    Ok((len, source)) => self.on_rtp(leg, &mut buf[..len], source),
                    Err(_) => return,
                }
            }
        })
    }

    /// The same for the RTCP socket.
    fn drain_rtcp(&mut self, leg: LegId) {
        SCRATCH.with_borrow_mut(|buf| {
            for _ in 0..BATCH {
                let Some(this) = leg_of(&mut self.a, &mut self.b, leg) else { return };
                match this.rtcp.try_io(Interest::READABLE, |s| s.recv_from(&mut buf[..])) {
                    Ok((len, source)) => self.on_rtcp(leg, &buf[..len], source),
                    Err(_) => return,
                }
            }
        })
    }
}

impl Relay<std::net::UdpSocket> {
    /// The four sockets, for the media engine's epoll set.
    pub(super) fn sockets(&self) -> impl Iterator<Item = (LegId, bool, &std::net::UdpSocket)> {
        let b = match &self.b {
            Other::Rtp(b) => Some(&**b),
            Other::Bridge { .. } => None,
        };
        [Some(&self.a), b].into_iter().flatten().flat_map(|leg| [(leg.id, false, &leg.rtp), (leg.id, true, &leg.rtcp)])
    }

    /// The configured media timeout.
    pub(super) fn media_timeout(&self) -> Duration {
        self.config.media_timeout
    }

    /// Takes one datagram from a socket the engine found readable and relays it. One read per
    /// readiness: the engine's epoll is level-triggered, so anything left is reported again,
    /// and no read is spent finding the queue empty.
    pub(super) fn receive_one(&mut self, leg: LegId, rtcp: bool, buf: &mut [u8]) {
        let Some(this) = leg_of(&mut self.a, &mut self.b, leg) else { return };
        let socket = if rtcp { &this.rtcp } else { &this.rtp };
        // Errors (WouldBlock after a spurious wakeup, a pending ICMP error) are consumed by the
        // read; the next readiness tries again.
        let Ok((len, source)) = socket.recv_from(buf) else { return };
        if rtcp {
            self.on_rtcp(leg, &buf[..len], source);
        } else {
            self.on_rtp(leg, &mut buf[..len], source);
        }
    }
}

impl<S: LegIo> Relay<S> {
    pub(super) fn update(&mut self, leg: LegId, media: LegMedia) {
        let (this, other) = match (leg, &mut self.b) {
            (LegId::A, Other::Rtp(b)) => (&mut self.a, Some(&mut **b)),
            (LegId::A, Other::Bridge { .. }) => (&mut self.a, None),
            (LegId::B, Other::Rtp(b)) => (&mut **b, Some(&mut self.a)),
            (LegId::B, Other::Bridge { .. }) => return,
        };
        if this.media.remote_rtp != media.remote_rtp {
            this.latched = None;
            this.rtcp_latched = None;
            // The stream behind this leg changes: what the other leg receives starts a new
            // segment even if the SSRC stays.
            if let Some(other) = other {
                other.rewriter.reset();
            }
        }
        // A leg resuming from hold is expected to send again from now.
        if !this.media.direction.receives() && media.direction.receives() {
            this.last_rx = Instant::now();
        }
        this.media = media;
        self.timeout_reported = false;
    }

    /// The deadline of the next timeout check; reports the timeout once per silence.
    pub(super) fn check_timeout(&mut self) -> Instant {
        let now = Instant::now();
        let timeout = self.config.media_timeout;
        let b = match &self.b {
            Other::Rtp(b) => Some(&**b),
            Other::Bridge { .. } => None,
        };
        let last = [Some(&self.a), b]
            .into_iter()
            .flatten()
            .filter(|leg| leg.media.direction.receives())
            .map(|leg| leg.last_rx)
            .max();
        let Some(last) = last else {
            // Everybody is on hold: nothing is expected.
            return now + timeout;
        };
        let silent_for = now.saturating_duration_since(last);
        if silent_for >= timeout {
            if !self.timeout_reported {
                self.timeout_reported = true;
                let _ = self.events.try_send(RelayEvent::MediaTimeout { silent_for });
            }
            return now + timeout;
        }
        last + timeout
    }

    fn leg_mut(&mut self, leg: LegId) -> Option<&mut RtpLeg<S>> {
        leg_of(&mut self.a, &mut self.b, leg)
    }

    pub(super) fn on_rtcp(&mut self, leg: LegId, packet: &[u8], source: SocketAddr) {
        let counters = &self.counters[leg.index()];
        if super::rtp::parse_rtcp(packet).is_err() {
            bump(&counters.dropped_invalid, 1);
            return;
        }
        let Some(this) = self.leg_mut(leg) else { return };
        if !this.accept_rtcp(source) {
            bump(&self.counters[leg.index()].dropped_source, 1);
            return;
        }
        bump(&self.counters[leg.index()].rtcp_in, 1);
        let (a, b) = (&mut self.a, &mut self.b);
        let target = match (leg, b) {
            (LegId::A, Other::Rtp(b)) => &**b,
            (LegId::B, Other::Rtp(_)) => &*a,
            (_, Other::Bridge { .. }) => return, // RTCP ends at the node in bridged mode
        };
        if let Some(dest) = target.rtcp_destination()
            && target.rtcp.udp().send_to(packet, dest).is_ok()
        {
            bump(&self.counters[target.id.index()].rtcp_out, 1);
        }
    }

    pub(super) fn on_rtp(&mut self, leg: LegId, packet: &mut [u8], source: SocketAddr) {
        let index = leg.index();
        let len = packet.len();
        let (sequence, timestamp, ssrc, marker, payload_type, payload_start, payload_end) =
            match RtpPacket::parse(packet) {
                Ok(p) => (
                    p.sequence,
                    p.timestamp,
                    p.ssrc,
                    p.marker,
                    p.payload_type,
                    p.header_len,
                    p.header_len + p.payload.len(),
                ),
                Err(_) => {
                    bump(&self.counters[index].dropped_invalid, 1);
                    return;
                }
            };
        let Some(this) = self.leg_mut(leg) else { return };
        let latched = match this.accept(source) {
            Ok(latched) => latched,
            Err(()) => {
                bump(&self.counters[index].dropped_source, 1);
                return;
            }
        };
        let now = Instant::now();
        this.last_rx = now;
        let receives = this.media.direction.receives();
        let this_codec = this.media.codec;
        let is_audio = payload_type == this.media.payload_type;
        let is_event = this.media.telephone_event == Some(payload_type);
        let class = this.sequence.record(ssrc, sequence);
        let mut digit = None;
        if is_event && let Ok(event) = TelephoneEvent::parse(&packet[payload_start..payload_end]) {
            let Some(this) = self.leg_mut(leg) else { return };
            digit = this.dtmf.push(timestamp, &event);
        }
        let counters = &self.counters[index];
        bump(&counters.packets_in, 1);
        bump(&counters.bytes_in, len as u64);
        match class {
            super::rtp::SequenceClass::Gap(n) => bump(&counters.lost, n as u64),
            super::rtp::SequenceClass::Late => bump(&counters.late, 1),
            _ => {}
        }
        if let Some(source) = latched {
            let _ = self.events.try_send(RelayEvent::Latched { leg, source });
        }
        if let Some(digit) = digit {
            bump(&counters.dtmf, 1);
            let _ = self.events.try_send(RelayEvent::Dtmf { leg, digit });
            if let (Other::Bridge { dtmf_to_bridge, .. }, Some(key)) = (&self.b, digit.digit) {
                let _ = dtmf_to_bridge.try_send(key);
            }
        }
        if !receives || !(is_audio || is_event) {
            bump(&counters.dropped_other, 1);
            return;
        }
        let (a, b) = (&mut self.a, &mut self.b);
        match (leg, b) {
            (LegId::A, Other::Bridge { to_bridge, .. }) => {
                if !is_audio {
                    return;
                }
                let payload = &mut packet[payload_start..payload_end];
                if this_codec == Codec::Pcma {
                    g711::alaw_to_ulaw_in_place(payload);
                }
                if to_bridge.try_send(Bytes::copy_from_slice(payload)).is_err() {
                    bump(&self.counters[0].dropped_other, 1);
                }
            }
            (_, Other::Bridge { .. }) => {}
            (leg, Other::Rtp(b)) => {
                let target: &mut RtpLeg<S> = if leg == LegId::A { b } else { a };
                let dropped = &self.counters[index].dropped_other;
                let Some(dest) = target.destination().filter(|_| target.media.direction.sends()) else {
                    bump(dropped, 1);
                    return;
                };
                let out_type = if is_audio {
                    target.media.payload_type
                } else if let Some(pt) = target.media.telephone_event {
                    pt
                } else {
                    bump(dropped, 1);
                    return;
                };
                if is_audio && target.media.codec != this_codec {
                    let payload = &mut packet[payload_start..payload_end];
                    match target.media.codec {
                        Codec::Pcma => g711::ulaw_to_alaw_in_place(payload),
                        _ => g711::alaw_to_ulaw_in_place(payload),
                    }
                }
                let out = target.rewriter.rewrite(ssrc, sequence, timestamp, marker, now.into_std());
                let header = RtpHeader {
                    marker: out.marker,
                    payload_type: out_type,
                    sequence: out.sequence,
                    timestamp: out.timestamp,
                    ssrc: out.ssrc,
                };
                let _ = header.rewrite(packet);
                let out_counters = &self.counters[target.id.index()];
                match target.rtp.udp().send_to(packet, dest) {
                    Ok(_) => {
                        bump(&out_counters.packets_out, 1);
                        bump(&out_counters.bytes_out, len as u64);
                    }
                    Err(_) => bump(dropped, 1),
                }
            }
        }
    }

    /// One paced agent frame (μ-law) to the caller.
    fn agent_frame(&mut self, frame: &[u8]) {
        bump(&self.counters[1].packets_in, 1);
        bump(&self.counters[1].bytes_in, frame.len() as u64);
        let a = &mut self.a;
        let Some(dest) = a.destination().filter(|_| a.media.direction.sends() && !frame.is_empty()) else {
            bump(&self.counters[1].dropped_other, 1);
            return;
        };
        let now = Instant::now();
        let out = a.rewriter.next_own(frame.len() as u32, now.into_std());
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
        match a.rtp.udp().send_to(&self.out, dest) {
            Ok(_) => {
                bump(&self.counters[0].packets_out, 1);
                bump(&self.counters[0].bytes_out, self.out.len() as u64);
            }
            Err(_) => bump(&self.counters[1].dropped_other, 1),
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
    async fn rtcp_is_passed_through() {
        let s = two_legs(42100, Codec::Pcmu, Codec::Pcmu, RelayConfig::default()).await;
        let caller_rtcp = UdpSocket::bind((localhost(), 0)).await.unwrap();
        let callee_rtcp_addr = SocketAddr::new(localhost(), s.callee.local_addr().unwrap().port() + 1);
        let callee_rtcp = match UdpSocket::bind(callee_rtcp_addr).await {
            Ok(socket) => socket,
            Err(_) => return, // the neighbouring port is taken on this host; nothing to test
        };
        let rr = crate::media::rtp::empty_receiver_report(77);
        caller_rtcp.send_to(&rr, SocketAddr::new(localhost(), s.a_port + 1)).await.unwrap();
        let (packet, from) = recv(&callee_rtcp).await;
        assert_eq!(packet, rr);
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

    #[tokio::test]
    async fn bridged_relay_carries_caller_audio_and_agent_frames() {
        let allocator = allocator(42160);
        let caller = peer().await;
        let ports = allocator.allocate().unwrap();
        let to_a = SocketAddr::new(localhost(), ports.rtp_port());
        let mut media = LegMedia::new(Codec::Pcma, Some(caller.local_addr().unwrap()));
        media.telephone_event = Some(101);
        let (handle, _events, mut bridge) =
            spawn_bridged(RtpLegSetup { ports, media }, RelayConfig::default()).unwrap();
        // Caller (A-law) → bridge (μ-law).
        caller.send_to(&rtp(8, 1, 0, 1, &[0xD5; 160]), to_a).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(2), bridge.caller_audio.recv()).await.unwrap().unwrap();
        assert_eq!(&frame[..], &[g711::alaw_to_ulaw(0xD5); 160]);
        // DTMF → bridge.
        let end = TelephoneEvent { event: 11, end: true, volume: 10, duration: 400 }.to_bytes();
        caller.send_to(&rtp(101, 2, 160, 1, &end), to_a).await.unwrap();
        let key = tokio::time::timeout(Duration::from_secs(2), bridge.caller_dtmf.recv()).await.unwrap();
        assert_eq!(key, Some('#'));
        // Agent frames (μ-law) → caller (A-law), consecutive sequence numbers and timestamps.
        let mut last: Option<(u16, u32)> = None;
        for i in 0..3u8 {
            bridge.agent_audio.send(Bytes::from(vec![0xFF; 160])).await.unwrap();
            let (packet, from) = recv(&caller).await;
            assert_eq!(from, to_a);
            let p = RtpPacket::parse(&packet).unwrap();
            assert_eq!(p.payload_type, 8);
            assert_eq!(p.payload, &[g711::ulaw_to_alaw(0xFF); 160]);
            if let Some((seq, ts)) = last {
                assert_eq!(p.sequence, seq.wrapping_add(1));
                assert_eq!(p.timestamp, ts.wrapping_add(160), "frame {i}");
            }
            last = Some((p.sequence, p.timestamp));
        }
        // The bridge slot holds one frame: a slow bridge loses frames, it does not queue them.
        for i in 0..5u16 {
            caller.send_to(&rtp(8, 10 + i, 160 * (10 + i) as u32, 1, &[0xD5; 160]), to_a).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(bridge.caller_audio.try_recv().is_ok());
        assert!(bridge.caller_audio.try_recv().is_err());
        assert!(handle.stats().a.dropped_other >= 4);
        assert!(matches!(handle.update_leg(LegId::B, LegMedia::new(Codec::Pcmu, None)), Err(RelayError::NoSuchLeg(_))));
        drop(handle);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(allocator.in_use(), 0, "dropping the handle releases the ports");
    }

    #[test]
    fn outside_a_runtime_is_an_error() {
        let allocator = allocator(42180);
        let a = RtpLegSetup { ports: allocator.allocate().unwrap(), media: LegMedia::new(Codec::Pcmu, None) };
        assert!(matches!(spawn_bridged(a, RelayConfig::default()), Err(RelayError::NoRuntime)));
        assert_eq!(allocator.in_use(), 0);
    }
}
