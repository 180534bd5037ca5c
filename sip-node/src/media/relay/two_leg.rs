//! The two-leg relay of an anchored call: what a media engine thread does with a datagram from
//! either leg (see the parent module's doc), in user space. Handing steady directions to the
//! kernel is `offload`'s part of the same struct.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_model::Codec;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::leg::{RtpLeg, check_timeout};
use super::offload::Offloaded;
use super::{
    Counters, EVENT_CAPACITY, LegId, LegMedia, RelayConfig, RelayError, RelayEvent, RtpLegSetup, bump, new_counters,
};
use crate::media::g711;
use crate::media::kernel::KernelForwarder;
use crate::media::rtcp::RtcpTranslation;
use crate::media::rtp::RtpHeader;
use crate::media::sys::DATAGRAM_MAX;

/// A two-leg relay: its state, driven by a media engine thread ([`crate::media::engine`]).
pub(crate) struct Relay {
    pub(super) a: RtpLeg<std::net::UdpSocket>,
    pub(super) b: RtpLeg<std::net::UdpSocket>,
    pub(super) counters: Arc<[Counters; 2]>,
    events: mpsc::Sender<RelayEvent>,
    config: RelayConfig,
    timeout_reported: bool,
    /// The kernel fast path, when the engine has one and this relay may use it.
    pub(super) kernel: Option<Arc<KernelForwarder>>,
    /// The directions installed in the kernel, by receiving leg.
    pub(super) offloaded: [Option<Offloaded>; 2],
}

impl Relay {
    /// A relay between two RTP legs, for a media engine to drive (the engine's `spawn_relay`),
    /// and the channel of its events. Takes the legs' sockets out of their port pairs.
    pub(crate) fn new(
        a: RtpLegSetup,
        b: RtpLegSetup,
        config: RelayConfig,
    ) -> Result<(Relay, mpsc::Receiver<RelayEvent>), RelayError> {
        let now = Instant::now();
        let plain = |socket: std::net::UdpSocket| Ok(socket);
        let a = RtpLeg::new(LegId::A, a, now, plain)?;
        let b = RtpLeg::new(LegId::B, b, now, plain)?;
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let relay = Relay {
            a,
            b,
            counters: new_counters(),
            events: events_tx,
            config,
            timeout_reported: false,
            kernel: None,
            offloaded: [None, None],
        };
        Ok((relay, events_rx))
    }

    /// The counters, for the relay's handle.
    pub(crate) fn counters(&self) -> Arc<[Counters; 2]> {
        Arc::clone(&self.counters)
    }

    /// The four sockets, for the media engine's epoll set.
    pub(crate) fn sockets(&self) -> impl Iterator<Item = (LegId, bool, &std::net::UdpSocket)> {
        [&self.a, &self.b].into_iter().flat_map(|leg| [(leg.id, false, &leg.rtp), (leg.id, true, &leg.rtcp)])
    }

    /// The configured media timeout.
    pub(crate) fn media_timeout(&self) -> Duration {
        self.config.media_timeout
    }

    /// Takes one datagram from a socket the engine found readable and relays it. One read per
    /// readiness: the engine's epoll is level-triggered, so anything left is reported again,
    /// and no read is spent finding the queue empty. `buf` is [`super::RECEIVE_BUFFER`] long: a
    /// datagram of up to [`DATAGRAM_MAX`] bytes, and room for the other leg's transform.
    pub(crate) fn receive_one(&mut self, leg: LegId, rtcp: bool, buf: &mut [u8]) {
        let (this, _, counters, _) = self.split(leg);
        let socket = if rtcp { &this.rtcp } else { &this.rtp };
        let read = DATAGRAM_MAX.min(buf.len());
        // Errors (WouldBlock after a spurious wakeup, a pending ICMP error) are consumed by the
        // read; the next readiness tries again.
        let Ok((len, source)) = socket.recv_from(&mut buf[..read]) else { return };
        let Some(len) = this.inbound(&mut buf[..len], rtcp, &counters[leg.index()]) else { return };
        if rtcp {
            self.on_rtcp(leg, buf, len, source);
        } else {
            self.on_rtp(leg, buf, len, source);
        }
    }

    /// The deadline of the next media timeout check; reports the timeout once per silence.
    pub(crate) fn check_timeout(&mut self) -> Instant {
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
    pub(crate) fn update(&mut self, leg: LegId, media: LegMedia) {
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

    /// Relays the RTCP packet `buf[..len]` from `leg`.
    fn on_rtcp(&mut self, leg: LegId, buf: &mut [u8], len: usize, source: SocketAddr) {
        let (this, target, counters, _) = self.split(leg);
        let packet = &mut buf[..len];
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
        let Some(dest) = target.rtcp_destination() else { return };
        let Some(len) = target.outbound(buf, len, true) else { return };
        if target.rtcp.send_to(&buf[..len], dest).is_ok() {
            bump(&counters[target.id.index()].rtcp_out, 1);
        }
    }

    /// Relays the RTP packet `buf[..len]` from `leg`.
    fn on_rtp(&mut self, leg: LegId, buf: &mut [u8], len: usize, source: SocketAddr) {
        // If the kernel forwarded this stream until now, continue where it stopped.
        self.kernel_sync(leg);
        let (this, target, counters, events) = self.split(leg);
        let packet = &mut buf[..len];
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
        let Some(len) = target.outbound(buf, len, false) else {
            bump(dropped, 1);
            return;
        };
        let out_counters = &counters[target.id.index()];
        let target_id = target.id;
        match target.rtp.send_to(&buf[..len], dest) {
            Ok(_) => {
                bump(&out_counters.packets_out, 1);
                bump(&out_counters.bytes_out, len as u64);
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
}
