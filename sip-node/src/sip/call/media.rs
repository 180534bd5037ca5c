//! Media anchoring of SIP-to-SIP calls: the node answers the caller's offer and offers to the
//! callee with its own address and a port pair per leg, so that RTP flows through the relay
//! (latching for callers behind NAT, one SSRC per direction across failover and re-INVITEs,
//! G.711 transcoding when the legs differ, RFC 4733 DTMF, media timeout).
//!
//! The two legs negotiate separately. What ties them together is the direction: what the node
//! does on one leg mirrors what the far end declared on the other (a caller putting the call on
//! hold with `sendonly` makes the node offer `sendonly` to the callee). The codec of the
//! caller's leg is fixed by the first answer sent to the caller; the callee's leg may differ
//! (another gateway after failover) and the relay transcodes.
//!
//! Calls whose INVITE carries no SDP (delayed offer) are anchored too: the node offers to the
//! callee as usual; once the callee answered, the node's 2xx to the caller carries the node's
//! own offer (the callee's codec first) and the caller's ACK the answer, which starts the relay
//! (RFC 3261 13.2.1, RFC 3264). Early media cannot reach such a caller: an offer may not go in
//! an unreliable provisional response, and the node does not do PRACK.

use std::net::IpAddr;
use std::sync::Arc;

use switchboard_model::{Codec, TrunkConfig};
use tokio::sync::mpsc;

use super::{Leg, MediaContext};
use crate::media::engine::MediaEngine;
use crate::media::ports::PortPair;
use crate::media::relay::{DtmfPress, LegId, RelayConfig, RelayEvent, RelayHandle, RelayStats, RtpLegSetup};
use crate::media::sdp::{
    LocalEndpoint, MediaDirection, MediaPolicy, NegotiatedMedia, SdpError, SdpSession, SessionDescription,
    answer_offer, create_offer, declared_direction, process_answer,
};
use crate::media::srtp::SrtpPolicy;
use crate::sip::control::dtmf_info::InfoDtmf;
use crate::sip::routing::codecs_of;

/// Why a call cannot be anchored: the SIP answer to give the caller.
#[derive(Debug, thiserror::Error)]
pub(super) enum AnchorError {
    /// The caller's SDP is unusable (400) or has nothing in common with the trunk (488).
    #[error("caller's SDP: {0}")]
    Offer(#[from] SdpError),
    /// No RTP port pair is free.
    #[error("no RTP port free: {0}")]
    Ports(#[from] crate::media::ports::PortError),
}

impl AnchorError {
    /// The SIP status for the caller.
    pub(super) fn sip_status(&self) -> u16 {
        match self {
            AnchorError::Offer(error) => error.sip_status(),
            AnchorError::Ports(_) => 503,
        }
    }

    /// Whether every port pair was taken: a 503 that is worth retrying soon (with Retry-After),
    /// counted in `switchboard_rtp_port_exhaustions_total`.
    pub(super) fn ports_exhausted(&self) -> bool {
        matches!(self, AnchorError::Ports(crate::media::ports::PortError::Exhausted { .. }))
    }
}

/// The node's side of one leg.
struct LegState {
    /// The pair until the relay takes its sockets.
    pair: Option<PortPair>,
    port: u16,
    session: SdpSession,
    /// The codecs allowed on this leg (the trunk's list).
    allowed: Vec<Codec>,
    /// What offer/answer last agreed on.
    negotiated: Option<NegotiatedMedia>,
    /// The last SDP the node sent on this leg (offer or answer).
    last_sent: Option<SessionDescription>,
    /// The node's outstanding offer on this leg (initial INVITE or re-offer).
    offer: Option<SessionDescription>,
    /// SRTP on this leg: the `media.srtp` of the leg's own trunk (plain without one).
    srtp: SrtpPolicy,
}

/// The SRTP policy of a leg through `trunk` (plain RTP for a leg without a trunk: a SIP URI
/// destination, a caller from no trunk).
fn srtp_of(trunk: Option<&TrunkConfig>) -> SrtpPolicy {
    trunk.map_or(SrtpPolicy::Off, |t| t.srtp.into())
}

impl LegState {
    fn new(pair: PortPair, address: IpAddr, allowed: Vec<Codec>, srtp: SrtpPolicy) -> LegState {
        LegState {
            srtp,
            port: pair.rtp_port(),
            pair: Some(pair),
            session: SdpSession::new(address),
            allowed,
            negotiated: None,
            last_sent: None,
            offer: None,
        }
    }

    fn policy(&self, address: IpAddr, codecs: Vec<Codec>, direction: MediaDirection) -> MediaPolicy {
        let mut policy = MediaPolicy::new(codecs, LocalEndpoint { address, rtp_port: self.port });
        policy.direction = direction;
        policy.srtp = self.srtp;
        policy
    }

    /// Answers an offer on this leg, preferring the codec the leg already uses (no codec change
    /// mid-call unless the peer insists), then `preferred`, then the leg's allowed list.
    fn answer(
        &mut self,
        address: IpAddr,
        offer: &SessionDescription,
        preferred: Option<Codec>,
        direction: MediaDirection,
    ) -> Result<(SessionDescription, NegotiatedMedia), SdpError> {
        let events = self.allowed.contains(&Codec::TelephoneEvent);
        let mut tries: Vec<Vec<Codec>> = vec![];
        for codec in [self.negotiated.as_ref().map(|n| n.codec), preferred].into_iter().flatten() {
            if self.allowed.contains(&codec) {
                let mut codecs = vec![codec];
                if events {
                    codecs.push(Codec::TelephoneEvent);
                }
                tries.push(codecs);
            }
        }
        tries.push(self.allowed.clone());
        let mut last = None;
        for codecs in tries {
            let policy = self.policy(address, codecs, direction);
            // A failed try must not bump the o= version: answer on a copy of the session.
            let mut session = self.session.clone();
            match answer_offer(offer, &policy, &mut session) {
                Ok((answer, negotiated)) => {
                    self.session = session;
                    self.negotiated = Some(negotiated.clone());
                    self.last_sent = Some(answer.clone());
                    return Ok((answer, negotiated));
                }
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or(SdpError::NoAudio))
    }
}

/// The audio section's declared direction of an SDP (sendrecv when it has no audio).
fn declared(sdp: &SessionDescription) -> MediaDirection {
    sdp.audio_index().map(|i| declared_direction(sdp, &sdp.media[i])).unwrap_or_default()
}

/// The codecs of the audio section, in the offerer's order.
fn offered_codecs(sdp: &SessionDescription) -> Vec<Codec> {
    let Some(index) = sdp.audio_index() else { return vec![] };
    let media = &sdp.media[index];
    media.payload_types().filter_map(|pt| media.codec_of(pt)).collect()
}

/// The anchored media of one call.
pub(super) struct Anchor {
    /// The media threads the relay runs on.
    engine: Arc<MediaEngine>,
    address: IpAddr,
    config: RelayConfig,
    /// The caller's offer; `None` for a delayed-offer INVITE (the node offers in its 2xx).
    caller_offer: Option<SessionDescription>,
    a: LegState,
    b: LegState,
    relay: Option<RelayHandle>,
    events: Option<mpsc::Receiver<RelayEvent>>,
    /// The node's offer to a party that is to replace a leg (REFER), with the SDP session it
    /// was made in; the leg keeps its own until that party answers.
    referred: Option<(Leg, SdpSession, SessionDescription)>,
}

impl Anchor {
    /// Anchors a call whose INVITE carried `body` (empty: a delayed offer). Refuses offers
    /// without a codec the inbound trunk allows before any outbound attempt is made.
    pub(super) fn new(media: &MediaContext, body: &[u8], inbound: Option<&TrunkConfig>) -> Result<Anchor, AnchorError> {
        let inbound_codecs = codecs_of(inbound);
        let inbound_srtp = srtp_of(inbound);
        let caller_offer = if body.is_empty() {
            None
        } else {
            let offer = SessionDescription::parse_bytes(body)?;
            // A dry run: is there anything to agree on with the caller at all?
            let mut probe =
                MediaPolicy::new(inbound_codecs.clone(), LocalEndpoint { address: media.address, rtp_port: 9 });
            probe.srtp = inbound_srtp;
            answer_offer(&offer, &probe, &mut SdpSession::new(media.address))?;
            Some(offer)
        };
        let a_pair = media.ports.allocate()?;
        let b_pair = media.ports.allocate()?;
        Ok(Anchor {
            engine: Arc::clone(&media.engine),
            address: media.address,
            config: RelayConfig { media_timeout: media.timeout },
            caller_offer,
            a: LegState::new(a_pair, media.address, inbound_codecs, inbound_srtp),
            b: LegState::new(b_pair, media.address, vec![], SrtpPolicy::Off),
            relay: None,
            events: None,
            referred: None,
        })
    }

    /// The offer for an outbound attempt through `trunk`: the trunk's codecs, with the caller's
    /// preferred codec first when the trunk has it (no transcoding when both sides can agree),
    /// and the caller's direction.
    pub(super) fn offer_for(&mut self, trunk: Option<&TrunkConfig>) -> Vec<u8> {
        let mut codecs = codecs_of(trunk);
        let caller_first = self.a.negotiated.as_ref().map(|n| n.codec).or_else(|| {
            let offer = self.caller_offer.as_ref()?;
            offered_codecs(offer).into_iter().find(|c| self.a.allowed.contains(c))
        });
        if let Some(first) = caller_first
            && let Some(at) = codecs.iter().position(|c| *c == first)
        {
            let codec = codecs.remove(at);
            codecs.insert(0, codec);
        }
        self.b.allowed = codecs.clone();
        self.b.srtp = srtp_of(trunk);
        let direction = self.caller_offer.as_ref().map(declared).unwrap_or_default();
        let policy = self.b.policy(self.address, codecs, direction);
        let offer = create_offer(&policy, &mut self.b.session);
        let body = offer.to_string().into_bytes();
        self.b.last_sent = Some(offer.clone());
        self.b.offer = Some(offer);
        body
    }

    /// The callee answered the current offer (in a provisional response with early media, or
    /// in the 2xx): the outbound leg is set, the caller's answer made if it was not yet (or, for
    /// a delayed offer, the node's offer to the caller), and the relay started or moved.
    pub(super) fn callee_answered(&mut self, body: &[u8]) -> Result<(), SdpError> {
        let answer = SessionDescription::parse_bytes(body)?;
        let offer = self.b.offer.as_ref().ok_or(SdpError::NoAudio)?;
        let b_media = process_answer(offer, &answer)?;
        if self.a.negotiated.is_none() {
            match self.caller_offer.clone() {
                Some(caller_offer) => {
                    self.a.answer(self.address, &caller_offer, Some(b_media.codec), declared(&answer))?;
                }
                None if self.a.offer.is_none() => self.offer_to_caller(b_media.codec, declared(&answer)),
                None => {}
            }
        }
        self.b.negotiated = Some(b_media.clone());
        self.apply()
    }

    /// The node's offer to a delayed-offer caller: the inbound trunk's codecs with the callee's
    /// first, so that no transcoding is needed when the caller can take it.
    fn offer_to_caller(&mut self, callee_codec: Codec, direction: MediaDirection) {
        let mut codecs = self.a.allowed.clone();
        if let Some(at) = codecs.iter().position(|c| *c == callee_codec) {
            let codec = codecs.remove(at);
            codecs.insert(0, codec);
        }
        let policy = self.a.policy(self.address, codecs, direction);
        let offer = create_offer(&policy, &mut self.a.session);
        self.a.last_sent = Some(offer.clone());
        self.a.offer = Some(offer);
    }

    /// Whether the caller still owes the answer to the node's offer (delayed offer, not ACKed).
    pub(super) fn awaits_caller_answer(&self) -> bool {
        self.caller_offer.is_none() && self.a.negotiated.is_none() && self.a.offer.is_some()
    }

    /// The caller's ACK to a delayed-offer call: its body is the answer to the node's offer in
    /// the 2xx; the caller's leg is set and the relay starts.
    pub(super) fn caller_acked(&mut self, body: &[u8]) -> Result<(), SdpError> {
        let offer = self.a.offer.as_ref().ok_or(SdpError::NoAudio)?;
        if body.is_empty() {
            return Err(SdpError::NoAudio);
        }
        let answer = SessionDescription::parse_bytes(body)?;
        let a_media = process_answer(offer, &answer)?;
        self.a.negotiated = Some(a_media);
        self.apply()
    }

    /// Starts the relay, or updates both legs of the running one.
    fn apply(&mut self) -> Result<(), SdpError> {
        let (Some(a_media), Some(b_media)) = (self.a.negotiated.clone(), self.b.negotiated.clone()) else {
            return Ok(());
        };
        match &self.relay {
            Some(relay) => {
                let _ = relay.update_leg(LegId::A, (&a_media).into());
                let _ = relay.update_leg(LegId::B, (&b_media).into());
            }
            None => {
                let (Some(a_pair), Some(b_pair)) = (self.a.pair.take(), self.b.pair.take()) else {
                    return Ok(());
                };
                match self.engine.spawn_relay(
                    RtpLegSetup { ports: a_pair, media: (&a_media).into() },
                    RtpLegSetup { ports: b_pair, media: (&b_media).into() },
                    self.config,
                ) {
                    Ok((relay, events)) => {
                        self.relay = Some(relay);
                        self.events = Some(events);
                    }
                    Err(error) => tracing::error!(%error, "cannot start the RTP relay; the call has no media"),
                }
            }
        }
        Ok(())
    }

    /// The body of the node's answer to the caller, once there is one.
    pub(super) fn caller_answer(&self) -> Option<Vec<u8>> {
        self.a.last_sent.as_ref().filter(|_| self.a.negotiated.is_some()).map(|sdp| sdp.to_string().into_bytes())
    }

    /// The body of the node's 2xx to the caller: its answer, or for a delayed offer its offer.
    pub(super) fn caller_final_body(&self) -> Option<Vec<u8>> {
        self.caller_answer().or_else(|| self.a.offer.as_ref().map(|sdp| sdp.to_string().into_bytes()))
    }

    /// The last SDP the node sent on `leg`, for a re-INVITE without an offer (the node offers
    /// what it has; RFC 3261 14.2).
    pub(super) fn last_sent(&self, leg: Leg) -> Option<Vec<u8>> {
        self.leg(leg).last_sent.as_ref().map(|sdp| sdp.to_string().into_bytes())
    }

    /// The relay's event stream, taken once by the connected call.
    pub(super) fn take_events(&mut self) -> Option<mpsc::Receiver<RelayEvent>> {
        let mut events = self.events.take()?;
        // Silence while ringing is no media timeout of the answered call.
        while events.try_recv().is_ok() {}
        Some(events)
    }

    fn leg(&self, leg: Leg) -> &LegState {
        if leg == Leg::A { &self.a } else { &self.b }
    }

    fn leg_mut(&mut self, leg: Leg) -> &mut LegState {
        if leg == Leg::A { &mut self.a } else { &mut self.b }
    }

    /// A re-INVITE or UPDATE with an offer arrived on `from`: returns the offer as parsed (kept
    /// until the other side answers) and the node's offer for the other leg, mirroring the
    /// direction and keeping the other leg's codec.
    pub(super) fn reoffer(&mut self, from: Leg, body: &[u8]) -> Result<(SessionDescription, Vec<u8>), SdpError> {
        let offer = SessionDescription::parse_bytes(body)?;
        offer.audio_index().ok_or(SdpError::NoAudio)?;
        let address = self.address;
        let other = self.leg_mut(other_leg(from));
        let mut codecs = match &other.negotiated {
            Some(n) => vec![n.codec],
            None => other.allowed.clone(),
        };
        if other.negotiated.as_ref().is_some_and(|n| n.telephone_event.is_some()) {
            codecs.push(Codec::TelephoneEvent);
        }
        let policy = other.policy(address, codecs, declared(&offer));
        let ours = create_offer(&policy, &mut other.session);
        let bytes = ours.to_string().into_bytes();
        other.last_sent = Some(ours.clone());
        other.offer = Some(ours);
        Ok((offer, bytes))
    }

    /// The other leg accepted the node's re-offer with `answer_body`: both legs are updated and
    /// the node's answer to the originator's `offer` returned.
    pub(super) fn reanswer(
        &mut self,
        from: Leg,
        offer: &SessionDescription,
        answer_body: &[u8],
    ) -> Result<Vec<u8>, SdpError> {
        let answer = SessionDescription::parse_bytes(answer_body)?;
        let ours = self.leg(other_leg(from)).offer.clone().ok_or(SdpError::NoAudio)?;
        let other_media = process_answer(&ours, &answer)?;
        let address = self.address;
        let preferred = Some(other_media.codec);
        self.leg_mut(other_leg(from)).negotiated = Some(other_media);
        let (sdp, _) = self.leg_mut(from).answer(address, offer, preferred, declared(&answer))?;
        self.apply()?;
        Ok(sdp.to_string().into_bytes())
    }

    /// The caller's leg port and the callee's, for logs and tests.
    pub(super) fn ports(&self) -> (u16, u16) {
        (self.a.port, self.b.port)
    }

    /// Stops the relay (ports go back to the allocator) and returns its counters.
    pub(super) async fn stop(self) -> Option<RelayStats> {
        match self.relay {
            Some(relay) => Some(relay.stop().await),
            None => None,
        }
    }
}

fn other_leg(leg: Leg) -> Leg {
    if leg == Leg::A { Leg::B } else { Leg::A }
}

impl crate::sip::connected::AnchoredMedia for Anchor {
    fn awaits_caller_answer(&self) -> bool {
        Anchor::awaits_caller_answer(self)
    }

    fn caller_acked(&mut self, body: &[u8]) -> Result<(), SdpError> {
        Anchor::caller_acked(self, body)
    }

    fn last_sent(&self, leg: Leg) -> Option<Vec<u8>> {
        Anchor::last_sent(self, leg)
    }

    fn reoffer(&mut self, from: Leg, body: &[u8]) -> Result<(SessionDescription, Vec<u8>), SdpError> {
        Anchor::reoffer(self, from, body)
    }

    fn reanswer(&mut self, from: Leg, offer: &SessionDescription, body: &[u8]) -> Result<Vec<u8>, SdpError> {
        Anchor::reanswer(self, from, offer, body)
    }

    fn take_events(&mut self) -> Option<mpsc::Receiver<RelayEvent>> {
        Anchor::take_events(self)
    }

    fn offer_new_leg(&mut self, leg: Leg) -> Vec<u8> {
        // A new dialog gets a new SDP session (its own o= line); every codec the node relays,
        // whatever the trunk the call places it on (the relay transcodes).
        let mut session = SdpSession::new(self.address);
        let policy = self.leg(leg).policy(self.address, codecs_of(None), MediaDirection::default());
        let offer = create_offer(&policy, &mut session);
        let body = offer.to_string().into_bytes();
        self.referred = Some((leg, session, offer));
        body
    }

    fn new_leg_answered(&mut self, leg: Leg, body: &[u8]) -> Result<(), SdpError> {
        let (offered_on, session, offer) = self.referred.take().ok_or(SdpError::NoAudio)?;
        if offered_on != leg {
            return Err(SdpError::NoAudio);
        }
        let answer = SessionDescription::parse_bytes(body)?;
        let negotiated = process_answer(&offer, &answer)?;
        let state = self.leg_mut(leg);
        state.session = session;
        state.allowed = codecs_of(None);
        state.negotiated = Some(negotiated);
        state.last_sent = Some(offer);
        state.offer = None;
        self.apply()
    }

    fn answer_new_leg(&mut self, leg: Leg, body: &[u8]) -> Result<Vec<u8>, SdpError> {
        let offer = SessionDescription::parse_bytes(body)?;
        let address = self.address;
        let preferred = self.leg(other_leg(leg)).negotiated.as_ref().map(|n| n.codec);
        let state = self.leg_mut(leg);
        // A new dialog gets a new SDP session; the leg keeps its old one if the offer fails.
        let old = std::mem::replace(&mut state.session, SdpSession::new(address));
        match state.answer(address, &offer, preferred, MediaDirection::default()) {
            Ok((answer, _)) => {
                state.offer = None;
                self.apply()?;
                Ok(answer.to_string().into_bytes())
            }
            Err(error) => {
                state.session = old;
                Err(error)
            }
        }
    }

    fn send_dtmf(&mut self, to: Leg, dtmf: &InfoDtmf) -> bool {
        // RFC 4733 only where the leg agreed to telephone-event; else the caller sends INFO.
        let (Some(relay), true) =
            (&self.relay, self.leg(to).negotiated.as_ref().is_some_and(|n| n.telephone_event.is_some()))
        else {
            return false;
        };
        let id = if to == Leg::A { LegId::A } else { LegId::B };
        let press = DtmfPress { key: dtmf.key, events: dtmf.telephone_events(8000, 50) };
        relay.send_dtmf(id, press).is_ok()
    }
}
