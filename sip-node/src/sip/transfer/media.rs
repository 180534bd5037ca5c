//! The media of a transferred call as its connected machine sees it: the caller's leg and the
//! target's, joined by a two-leg relay the transfer started (relay leg A the caller's, B the
//! target's). A re-offer from either party (hold, resume, a new address or key) is handled
//! like the B2BUA's anchored media does: the node re-offers on the other leg from that leg's
//! own port (mirroring the direction, keeping its codec), and once that leg answered, answers
//! the originator from its own port; the relay follows both. Each leg's `o=` line goes on from
//! the SDP the node last sent on it, although an earlier machine negotiated it. A re-INVITE
//! without an offer gets the SDP the node last sent on that leg.

use std::net::IpAddr;

use switchboard_model::Codec;

use crate::media::relay::{LegId, LegMedia, RelayHandle};
use crate::media::sdp::{
    LocalEndpoint, MediaDirection, MediaPolicy, SdpError, SdpSession, SessionDescription, answer_offer, create_offer,
    declared_direction, process_answer,
};
use crate::media::srtp::SrtpPolicy;
use crate::sip::connected::{AnchoredMedia, Leg};

/// The node's side of one leg of a transferred call.
pub(super) struct LegSide {
    /// The node's last SDP on the leg.
    last_sent: Vec<u8>,
    session: SdpSession,
    /// The node's RTP port on the leg.
    port: u16,
    /// The codecs the leg may use (its trunk's).
    allowed: Vec<Codec>,
    srtp: SrtpPolicy,
    /// The codec in use, and whether telephone-event was negotiated.
    codec: Codec,
    events: bool,
    /// The node's re-offer on this leg, until it is answered.
    offer: Option<SessionDescription>,
}

/// What a [`LegSide`] starts from.
pub(super) struct LegFacts {
    /// The node's last SDP on the leg (its answer to the caller, its offer to the target).
    pub(super) last_sent: Vec<u8>,
    pub(super) port: u16,
    pub(super) allowed: Vec<Codec>,
    pub(super) srtp: SrtpPolicy,
    /// The leg's media as the relay had it.
    pub(super) media: LegMedia,
}

impl LegSide {
    pub(super) fn new(facts: LegFacts, address: IpAddr) -> LegSide {
        let session = SessionDescription::parse_bytes(&facts.last_sent)
            .map_or_else(|_| SdpSession::new(address), |sent| SdpSession::resume(&sent, address));
        LegSide {
            last_sent: facts.last_sent,
            session,
            port: facts.port,
            allowed: facts.allowed,
            srtp: facts.srtp,
            codec: facts.media.codec,
            events: facts.media.telephone_event.is_some(),
            offer: None,
        }
    }

    fn policy(&self, address: IpAddr, codecs: Vec<Codec>, direction: MediaDirection) -> MediaPolicy {
        let mut policy = MediaPolicy::new(codecs, LocalEndpoint { address, rtp_port: self.port });
        policy.direction = direction;
        policy.srtp = self.srtp;
        policy
    }

    /// The codecs to offer or answer with first: the one in use (and telephone-event if it was
    /// negotiated), then `also`, then everything the leg allows.
    fn preferences(&self, also: Option<Codec>) -> Vec<Vec<Codec>> {
        let mut tries = vec![];
        for codec in [Some(self.codec), also].into_iter().flatten() {
            if self.allowed.contains(&codec) || codec == self.codec {
                let mut codecs = vec![codec];
                if self.events {
                    codecs.push(Codec::TelephoneEvent);
                }
                tries.push(codecs);
            }
        }
        tries.push(self.allowed.clone());
        tries
    }

    /// Answers `offer` on this leg from its own port (a failed try does not bump `o=`).
    fn answer(
        &mut self,
        address: IpAddr,
        offer: &SessionDescription,
        also: Option<Codec>,
        direction: MediaDirection,
    ) -> Result<(SessionDescription, LegMedia), SdpError> {
        let mut last = SdpError::NoAudio;
        for codecs in self.preferences(also) {
            let policy = self.policy(address, codecs, direction);
            let mut session = self.session.clone();
            match answer_offer(offer, &policy, &mut session) {
                Ok((answer, negotiated)) => {
                    self.session = session;
                    self.used(&answer, LegMedia::from(&negotiated));
                    return Ok((answer, LegMedia::from(&negotiated)));
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    fn used(&mut self, sent: &SessionDescription, media: LegMedia) {
        self.last_sent = sent.to_string().into_bytes();
        self.codec = media.codec;
        self.events = media.telephone_event.is_some();
    }
}

/// The transferred call's media: both legs and the relay joining them.
pub(super) struct TransferMedia<'r> {
    pub(super) caller: LegSide,
    pub(super) target: LegSide,
    pub(super) address: IpAddr,
    pub(super) relay: &'r RelayHandle,
}

impl TransferMedia<'_> {
    fn side(&mut self, leg: Leg) -> &mut LegSide {
        match leg {
            Leg::A => &mut self.caller,
            Leg::B => &mut self.target,
        }
    }
}

fn relay_leg(leg: Leg) -> LegId {
    match leg {
        Leg::A => LegId::A,
        Leg::B => LegId::B,
    }
}

/// The audio section's declared direction (sendrecv without one).
fn declared(sdp: &SessionDescription) -> MediaDirection {
    sdp.audio_index().map(|i| declared_direction(sdp, &sdp.media[i])).unwrap_or_default()
}

impl AnchoredMedia for TransferMedia<'_> {
    fn awaits_caller_answer(&self) -> bool {
        false
    }

    fn caller_acked(&mut self, _body: &[u8]) -> Result<(), SdpError> {
        Ok(())
    }

    fn last_sent(&self, leg: Leg) -> Option<Vec<u8>> {
        Some(match leg {
            Leg::A => self.caller.last_sent.clone(),
            Leg::B => self.target.last_sent.clone(),
        })
    }

    fn reoffer(&mut self, from: Leg, body: &[u8]) -> Result<(SessionDescription, Vec<u8>), SdpError> {
        let offer = SessionDescription::parse_bytes(body)?;
        offer.audio_index().ok_or(SdpError::NoAudio)?;
        let address = self.address;
        let other = self.side(from.other());
        let codecs = other.preferences(None).remove(0);
        let policy = other.policy(address, codecs, declared(&offer));
        let ours = create_offer(&policy, &mut other.session);
        let bytes = ours.to_string().into_bytes();
        other.last_sent = bytes.clone();
        other.offer = Some(ours);
        Ok((offer, bytes))
    }

    fn reanswer(&mut self, from: Leg, offer: &SessionDescription, body: &[u8]) -> Result<Vec<u8>, SdpError> {
        let answer = SessionDescription::parse_bytes(body)?;
        let address = self.address;
        let other = self.side(from.other());
        let ours = other.offer.take().ok_or(SdpError::NoAudio)?;
        let other_media = LegMedia::from(&process_answer(&ours, &answer)?);
        other.codec = other_media.codec;
        other.events = other_media.telephone_event.is_some();
        let also = Some(other_media.codec);
        let (sdp, media) = self.side(from).answer(address, offer, also, declared(&answer))?;
        let _ = self.relay.update_leg(relay_leg(from.other()), other_media);
        let _ = self.relay.update_leg(relay_leg(from), media);
        Ok(sdp.to_string().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    /// A leg whose earlier answer (from port 10000) settled on PCMA with telephone-event.
    fn side() -> (LegSide, SessionDescription) {
        let mut earlier = SdpSession::new(ADDRESS);
        let policy = MediaPolicy::new(
            vec![Codec::Pcma, Codec::TelephoneEvent],
            LocalEndpoint { address: ADDRESS, rtp_port: 10000 },
        );
        let sent = create_offer(&policy, &mut earlier);
        let mut media = LegMedia::new(Codec::Pcma, None);
        media.telephone_event = Some(101);
        let facts = LegFacts {
            last_sent: sent.to_string().into_bytes(),
            port: 10000,
            allowed: vec![Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent],
            srtp: SrtpPolicy::Off,
            media,
        };
        (LegSide::new(facts, ADDRESS), sent)
    }

    fn offer(direction: &str) -> SessionDescription {
        SessionDescription::parse(&format!(
            "v=0\r\no=peer 5 5 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\n\
             m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na={direction}\r\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_hold_is_answered_from_the_legs_port_with_its_codec_and_its_o_line_going_on() {
        let (mut side, sent) = side();
        let (answer, media) =
            side.answer(ADDRESS, &offer("sendonly"), Some(Codec::Pcmu), MediaDirection::RecvOnly).unwrap();
        let text = answer.to_string();
        assert!(text.contains("m=audio 10000 RTP/AVP 8 101\r\n"), "the leg's own port and codec: {text}");
        assert!(text.contains("a=recvonly\r\n"), "{text}");
        assert_eq!(answer.origin.session_id, sent.origin.session_id, "the same session as the earlier SDP");
        assert_eq!(answer.origin.session_version, sent.origin.session_version + 1);
        assert_eq!((media.codec, media.remote_rtp), (Codec::Pcma, Some("192.0.2.9:4000".parse().unwrap())));
        assert_eq!(side.last_sent, answer.to_string().into_bytes(), "what an offerless re-INVITE gets next");
    }

    #[test]
    fn an_offer_without_the_codec_in_use_is_answered_with_another_the_leg_allows() {
        let (mut side, _) = side();
        let pcmu_only = SessionDescription::parse(
            "v=0\r\no=peer 5 5 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
        )
        .unwrap();
        let (_, media) = side.answer(ADDRESS, &pcmu_only, None, MediaDirection::SendRecv).unwrap();
        assert_eq!(media.codec, Codec::Pcmu);
        let g729 = SessionDescription::parse(
            "v=0\r\no=peer 5 5 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 18\r\n",
        )
        .unwrap();
        assert_eq!(
            side.answer(ADDRESS, &g729, None, MediaDirection::SendRecv).err().map(|e| e.sip_status()),
            Some(488)
        );
    }
}
