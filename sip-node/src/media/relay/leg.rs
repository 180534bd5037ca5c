//! One RTP leg of a relay: its two sockets, its negotiated media, latching, and the receive-side
//! work on every packet from it (validation, sequence statistics, DTMF detection, counters and
//! events), the same whether a media engine thread or a bridge session drives it.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use switchboard_model::Codec;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::transform::{self, PacketTransform};
use super::{Counters, LatchMode, LegId, LegMedia, RelayError, RelayEvent, RtpLegSetup, bump};
use crate::media::ports::PortPair;
use crate::media::rtp::{
    DtmfDetector, RtpPacket, SequenceClass, SequenceStats, StreamRewriter, TelephoneEvent, parse_rtcp,
};

/// A leg's socket, registered with tokio for reads only. A `tokio::net::UdpSocket` registers
/// for writability too, and Linux then reports every datagram sent as a writability event (the
/// kernel frees the sent buffer, the socket is writable again, epoll is told): one wasted event
/// per relayed packet for the reactor to take and dispatch. Sends here never wait: a full send
/// buffer drops the packet (and counts it), as before.
pub(super) type LegSocket = AsyncFd<std::net::UdpSocket>;

/// One RTP leg: its sockets (`S`: tokio-registered for a bridged call's leg, plain for a
/// two-leg relay on a media engine thread), its negotiated media and what the relay tracks.
pub(super) struct RtpLeg<S = LegSocket> {
    pub(super) id: LegId,
    pub(super) rtp: S,
    pub(super) rtcp: S,
    _ports: PortPair,
    pub(super) media: LegMedia,
    pub(super) latched: Option<SocketAddr>,
    rtcp_latched: Option<SocketAddr>,
    /// Rewrites what the relay sends to this leg.
    pub(super) rewriter: StreamRewriter,
    /// Sequence statistics of what this leg sends.
    pub(super) sequence: SequenceStats,
    dtmf: DtmfDetector,
    pub(super) last_rx: Instant,
    /// The RTP socket's own address (the kernel fast path's key and source).
    pub(super) local_rtp: Option<SocketAddr>,
    /// What the leg does to its packets on the wire (`None`: plain RTP).
    pub(super) transform: Option<Box<dyn PacketTransform>>,
}

impl RtpLeg<LegSocket> {
    /// Gives the leg's sockets back in its port pair, with its current media, for another
    /// relay to take over (the reservation never lapses, so the port stays the caller's).
    pub(super) fn into_setup(self) -> RtpLegSetup {
        let RtpLeg { rtp, rtcp, _ports: mut ports, mut media, latched, .. } = self;
        ports.restore_sockets(rtp.into_inner(), rtcp.into_inner());
        // Where the caller really sends from (behind NAT it is not the SDP address).
        if latched.is_some() {
            media.remote_rtp = latched;
        }
        RtpLegSetup { ports, media }
    }
}

impl<S> RtpLeg<S> {
    /// Takes the sockets out of the setup's port pair, wrapped by `wrap` (tokio registration or
    /// none).
    pub(super) fn new(
        id: LegId,
        mut setup: RtpLegSetup,
        now: Instant,
        wrap: impl Fn(std::net::UdpSocket) -> std::io::Result<S>,
    ) -> Result<RtpLeg<S>, RelayError> {
        let (rtp, rtcp) = setup.ports.take_sockets().ok_or(RelayError::NoSockets(id))?;
        let local_rtp = rtp.local_addr().ok();
        let transform = transform::for_media(&setup.media);
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
            transform,
        })
    }

    /// Where RTP for this leg goes now.
    pub(super) fn destination(&self) -> Option<SocketAddr> {
        self.latched.or(self.media.remote_rtp)
    }

    pub(super) fn rtcp_destination(&self) -> Option<SocketAddr> {
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
pub(super) struct Received {
    pub(super) sequence: u16,
    pub(super) timestamp: u32,
    pub(super) ssrc: u32,
    pub(super) marker: bool,
    /// Where the payload is in the packet.
    pub(super) payload: Range<usize>,
    /// The leg's audio payload type (else telephone-event).
    pub(super) is_audio: bool,
    /// The codec of the leg it came from.
    pub(super) codec: Codec,
    /// To be passed on: the node receives from this leg and it is audio or telephone-event.
    /// (Otherwise it was counted as `dropped_other`.)
    pub(super) forward: bool,
    /// The key of a key press this packet completed.
    pub(super) key: Option<char>,
    pub(super) now: Instant,
}

impl<S> RtpLeg<S> {
    /// The receiving half of the relay's work on an RTP packet from this leg, the same for
    /// both modes: validation, latching, sequence statistics, DTMF detection, counters and
    /// events. `None`: dropped (invalid or from a refused source) and counted.
    pub(super) fn receive(
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
            SequenceClass::Gap(n) => bump(&counters.lost, n as u64),
            SequenceClass::Late => bump(&counters.late, 1),
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
    pub(super) fn receive_rtcp(&mut self, packet: &[u8], source: SocketAddr, counters: &Counters) -> bool {
        if parse_rtcp(packet).is_err() {
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
    pub(super) fn apply(&mut self, media: LegMedia) -> bool {
        let moved = self.media.remote_rtp != media.remote_rtp;
        if moved {
            self.latched = None;
            self.rtcp_latched = None;
        }
        // A leg resuming from hold is expected to send again from now.
        if !self.media.direction.receives() && media.direction.receives() {
            self.last_rx = Instant::now();
        }
        // New keys (a re-INVITE may rekey, or turn SRTP on or off): a new context; the same
        // keys keep the running one (its rollover counters and replay windows).
        if self.media.srtp != media.srtp {
            self.transform = transform::for_media(&media);
        }
        self.media = media;
        moved
    }
}

/// The deadline of the next media timeout check over `legs`; reports the timeout once per
/// silence (`reported` remembers it until media or an update comes).
pub(super) fn check_timeout<S>(
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
