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
//!
//! The modules:
//! - `leg`: one RTP leg (its two sockets, latching, receive-side checks and counters, the
//!   media timeout), the same for both modes;
//! - `transform`: what a leg does to the bytes on the wire beyond the relay's own rewriting
//!   (nothing for plain RTP; the hook for SRTP), user space only;
//! - `two_leg`: the relay between two legs that a media engine thread drives;
//! - `offload`: handing a steady direction of a two-leg relay to the kernel fast path
//!   ([`super::kernel`]) and folding its counters back;
//! - `bridged`: the caller's leg of a bridged call, driven by the bridge session's task;
//! - `dtmf`: key presses the node puts into a leg itself (RFC 4733 events it generates).
//!
//! Dependencies run one way: the media engine ([`super::engine`]) drives `two_leg` relays and
//! hands their handles an `EngineHold`; this module does not know the engine. The system calls
//! are in `media::sys`.

mod bridged;
mod dtmf;
mod leg;
mod offload;
mod transform;
mod two_leg;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchboard_model::Codec;
use tokio::sync::oneshot;

pub(crate) use self::bridged::{BridgedLeg, CallerInput, LegStop, start_bridged};
pub(crate) use self::dtmf::DtmfPress;
pub(crate) use self::transform::RECEIVE_BUFFER;
pub(crate) use self::two_leg::Relay;
use super::mailbox::MailboxSender;
use super::ports::PortPair;
use super::rtp::DtmfDigit;
use super::sdp::{MediaDirection, NegotiatedMedia};
use super::srtp::SrtpKeys;

/// The default media timeout.
pub const DEFAULT_MEDIA_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// The leg's SRTP keys (`None`: plain RTP). An SRTP leg is relayed in user space.
    pub srtp: Option<SrtpKeys>,
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
            srtp: None,
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
            srtp: n.srtp.clone(),
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
    /// Datagrams that are not valid RTP/RTCP (including those counted in `srtp_rejected`).
    pub dropped_invalid: u64,
    /// SRTP/SRTCP packets from the leg that did not authenticate or were replays (a wrong
    /// key, tampering), dropped.
    pub srtp_rejected: u64,
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

/// The counters of one leg, shared by the relay (which writes them) and its handle (which reads
/// them).
#[derive(Default)]
pub(crate) struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    dropped_source: AtomicU64,
    dropped_invalid: AtomicU64,
    srtp_rejected: AtomicU64,
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

fn new_counters() -> Arc<[Counters; 2]> {
    Arc::new([Counters::default(), Counters::default()])
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
            srtp_rejected: get(&self.srtp_rejected),
            dropped_other: get(&self.dropped_other),
            lost: get(&self.lost),
            late: get(&self.late),
            rtcp_in: get(&self.rtcp_in),
            rtcp_out: get(&self.rtcp_out),
            dtmf: get(&self.dtmf),
        }
    }
}

/// What a relay's handle tells whoever drives the relay.
pub(crate) enum Control {
    /// Boxed: the channel allocates room for 32 messages per relay up front, and re-INVITEs are
    /// rare; a boxed update keeps that block at 16 bytes a message instead of 80.
    Update(LegId, Box<LegMedia>),
    /// A key press for a leg (`dtmf`): RFC 4733 events on an RTP leg, a `dtmf` message for
    /// the agent in bridged mode (leg B).
    Dtmf(LegId, Box<DtmfPress>),
    Stop(oneshot::Sender<()>),
    /// Stop, handing the leg's port pair (sockets inside) and media back (bridged legs only;
    /// a two-leg relay drops the sender).
    Release(oneshot::Sender<RtpLegSetup>),
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
    Engine(Option<Box<dyn EngineHold>>),
}

/// A media engine's hold on a two-leg relay it drives, as the relay's handle uses it. The engine
/// implements it ([`super::engine`]), so that this module need not know the engine. Dropping
/// the hold removes the relay from the engine (its ports go back).
pub(crate) trait EngineHold: Send + Sync {
    /// Passes an update or a stop on to the relay; fails once the relay has been removed.
    fn control(&self, control: Control) -> Result<(), RelayError>;
    /// Whether the relay has been removed.
    fn is_finished(&self) -> bool;
    /// Removes the relay; resolves once its sockets are closed.
    fn stop(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").field("bridged", &self.is_bridged()).finish()
    }
}

impl RelayHandle {
    /// The handle of a two-leg relay that a media engine drives through `hold`.
    pub(crate) fn on_engine(hold: Box<dyn EngineHold>, counters: Arc<[Counters; 2]>) -> RelayHandle {
        RelayHandle { driver: Driver::Engine(Some(hold)), counters }
    }

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

    /// Plays a key press into `to` (DTMF that came by SIP INFO): RFC 4733 events on a two-leg
    /// relay's leg (the call checks first that the leg negotiated telephone-event, see
    /// `dtmf`), a `dtmf` message to the agent for leg B of a bridged call.
    pub(crate) fn send_dtmf(&self, to: LegId, press: DtmfPress) -> Result<(), RelayError> {
        let dtmf = Control::Dtmf(to, Box::new(press));
        match &self.driver {
            Driver::Mailbox(control) => control.send(dtmf).map_err(|_| RelayError::Stopped),
            Driver::Engine(Some(relay)) => relay.control(dtmf),
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
            Driver::Engine(relay) => relay.as_ref().is_none_or(|relay| relay.is_finished()),
        }
    }

    /// Stops a bridged leg and takes its port pair back with its sockets open and its current
    /// media, for another relay (a call transferred off its agent keeps the caller's port).
    /// `None` for a two-leg relay, or when the leg had already stopped. The handle stays
    /// (stopping it afterwards returns at once).
    pub async fn release(&self) -> Option<RtpLegSetup> {
        let Driver::Mailbox(control) = &self.driver else { return None };
        let (tx, rx) = oneshot::channel();
        control.send(Control::Release(tx)).ok()?;
        rx.await.ok()
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

#[cfg(test)]
mod tests;
