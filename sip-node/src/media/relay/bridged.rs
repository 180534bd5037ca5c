//! The caller's leg of a bridged call (a call to an AI agent), driven by the bridge session's
//! task: see the parent module's doc.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use switchboard_model::Codec;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::leg::{LegSocket, RtpLeg, check_timeout};
use super::transform::TRANSFORM_HEADROOM;
use super::{
    BATCH, Control, Counters, Driver, EVENT_CAPACITY, LegId, RelayConfig, RelayError, RelayEvent, RelayHandle,
    RtpLegSetup, bump, new_counters,
};
use crate::media::g711;
use crate::media::mailbox::{MailboxReceiver, mailbox};
use crate::media::rtp::{RTP_HEADER_LEN, RtpHeader};
use crate::media::rx_time;
use crate::media::sys::{self, Datagrams, RECV_BATCH};

/// Receive buffers: shared by every bridged leg on the thread rather than owned by each. A leg
/// uses them only between a receive and the matching sends, with no await in between, and a
/// buffer per leg would be most of a call's memory.
struct Batch {
    datagrams: Datagrams,
    /// When each datagram reached the host (the kernel's stamp; the bridged leg's sockets ask
    /// for it), or `None` without one.
    received: [Option<std::time::Instant>; RECV_BATCH],
}

thread_local! {
    static SCRATCH: RefCell<Batch> = const {
        RefCell::new(Batch { datagrams: Datagrams::new(), received: [None; RECV_BATCH] })
    };
}

/// One `recvmmsg` of up to [`RECV_BATCH`] datagrams into `into`, their kernel stamps turned
/// into instants (one reading of the clocks per batch, and only when there are stamps).
fn recv_batch(socket: &std::net::UdpSocket, into: &mut Batch) -> std::io::Result<usize> {
    let n = sys::recv_batch(socket, &mut into.datagrams)?;
    let mut clocks = None;
    for i in 0..n {
        into.received[i] =
            into.datagrams.stamp[i].map(|stamp| clocks.get_or_insert_with(rx_time::Clocks::read).instant(&stamp));
    }
    Ok(n)
}

/// Receives what is queued on `socket`, up to [`RECV_BATCH`] datagrams, in one syscall.
/// `Pending` (the waker registered) when there is nothing. When fewer datagrams came than
/// asked for, the socket is drained: its readiness is cleared here, so that the next poll
/// waits for epoll instead of paying for a receive that would only say `EAGAIN`. That is
/// race-free: tokio clears a readiness only if no event arrived since the guard was taken,
/// and a datagram arriving later raises a new (edge-triggered) event.
fn poll_recv_batch(socket: &LegSocket, cx: &mut Context<'_>, into: &mut Batch) -> Poll<std::io::Result<usize>> {
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

/// Why a bridged leg's poll ended.
pub(crate) enum LegStop {
    /// The relay handle stopped the leg (with the acknowledgement to send once it is dropped)
    /// or was dropped (`None`).
    Stop(Option<oneshot::Sender<()>>),
    /// The relay handle takes the leg back ([`BridgedLeg::into_setup`] goes to the sender).
    Release(oneshot::Sender<RtpLegSetup>),
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
    let leg = RtpLeg::new(LegId::A, a, Instant::now(), sys::register_udp_readable)?;
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
    /// The leg's port pair with its sockets and current media, for another relay.
    pub(crate) fn into_setup(self) -> RtpLegSetup {
        self.leg.into_setup()
    }

    /// Does what the leg has to do now: re-INVITE updates, caller RTP (each frame and key
    /// press goes to `sink`, which returns whether it took the frame; a frame it did not take
    /// is counted as `dropped_other`), RTCP (which ends at the node), the media timeout.
    /// `Ready` when the relay handle asked to stop (with the acknowledgement to send once the
    /// leg is dropped), to release the leg, or was dropped.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        sink: &mut dyn FnMut(&mut Context<'_>, CallerInput<'_>) -> bool,
    ) -> Poll<LegStop> {
        while let Poll::Ready(control) = self.control.poll_recv(cx) {
            match control {
                None => return Poll::Ready(LegStop::Stop(None)),
                Some(Control::Stop(done)) => return Poll::Ready(LegStop::Stop(Some(done))),
                Some(Control::Release(to)) => return Poll::Ready(LegStop::Release(to)),
                Some(Control::Update(LegId::A, media)) => {
                    self.leg.apply(*media);
                    self.timeout_reported = false;
                }
                Some(Control::Update(LegId::B, _)) => {} // refused by the handle
                // Leg B is the agent: the key press becomes its `dtmf` message. (A key for
                // the caller's leg has no sender in bridged mode.)
                Some(Control::Dtmf(LegId::B, press)) => {
                    sink(cx, CallerInput::Key(press.key));
                }
                Some(Control::Dtmf(LegId::A, _)) => {}
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
        batch: &mut Batch,
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
                let Some(source) = batch.datagrams.source[i] else { continue };
                let packet = &mut batch.datagrams.data[i][..batch.datagrams.len[i]];
                let Some(len) = self.leg.inbound(packet, rtcp, &self.counters[0]) else { continue };
                let packet = &mut packet[..len];
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
            g711::ulaw_to_alaw_in_place(&mut self.out[RTP_HEADER_LEN..]);
        }
        if a.transform.is_some() {
            let len = self.out.len();
            self.out.resize(len + TRANSFORM_HEADROOM, 0);
            let Some(len) = a.outbound(&mut self.out, len, false) else {
                bump(&counters.dropped_other, 1);
                return false;
            };
            self.out.truncate(len);
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
