//! What the connected machine asks of the call's media: negotiation only (offers, answers),
//! synchronously. Moving RTP is the relay's business; an implementation may tell the relay
//! about a new negotiation (a channel send), but the machine never waits on media.

use tokio::sync::mpsc;

use super::Leg;
use crate::media::relay::{DtmfPress, LegId, RelayEvent, RelayHandle};
use crate::media::sdp::{MediaPolicy, SdpError, SdpSession, SessionDescription, answer_offer, process_answer};
use crate::sip::control::dtmf_info::InfoDtmf;

/// Media anchored on both legs of a B2BUA call (`sip/call/media.rs` `Anchor`).
pub(crate) trait AnchoredMedia: Send {
    /// Whether the node offered to the caller in its 2xx (delayed offer) and awaits the answer
    /// in the ACK.
    fn awaits_caller_answer(&self) -> bool;
    /// The caller's ACK carries `body`, its answer to the node's offer.
    fn caller_acked(&mut self, body: &[u8]) -> Result<(), SdpError>;
    /// The last SDP the node sent on `leg` (for a re-INVITE without an offer).
    fn last_sent(&self, leg: Leg) -> Option<Vec<u8>>;
    /// An offer arrived on `from`: the offer as parsed and the node's offer for the other leg.
    fn reoffer(&mut self, from: Leg, body: &[u8]) -> Result<(SessionDescription, Vec<u8>), SdpError>;
    /// The other leg answered the node's re-offer with `body`: the node's answer to `offer`.
    fn reanswer(&mut self, from: Leg, offer: &SessionDescription, body: &[u8]) -> Result<Vec<u8>, SdpError>;
    /// The relay's events, once a relay runs (taken once).
    fn take_events(&mut self) -> Option<mpsc::Receiver<RelayEvent>> {
        None
    }
    /// Plays a key press (from SIP INFO on the other leg) into `to` as RFC 4733 events;
    /// `false` when `to` negotiated no telephone-event (the key then goes by INFO).
    fn send_dtmf(&mut self, _to: Leg, _dtmf: &InfoDtmf) -> bool {
        false
    }
    /// The node's offer to a new party that is to take `leg`'s place (a REFER): from the
    /// leg's own port, so that the relay only has to follow the new far end.
    fn offer_new_leg(&mut self, _leg: Leg) -> Vec<u8> {
        Vec::new()
    }
    /// The new party answered [`AnchoredMedia::offer_new_leg`] with `body`: `leg` of the relay
    /// now goes to it.
    fn new_leg_answered(&mut self, _leg: Leg, _body: &[u8]) -> Result<(), SdpError> {
        Err(SdpError::NoAudio)
    }
    /// A new dialog offers `body` to take `leg`'s place (INVITE with `Replaces`): the node's
    /// answer from the leg's own port; the relay's leg follows the new far end.
    fn answer_new_leg(&mut self, _leg: Leg, _body: &[u8]) -> Result<Vec<u8>, SdpError> {
        Err(SdpError::NoAudio)
    }
    /// After the other leg was replaced: the node's sendrecv offer for `leg` when its media is
    /// not sendrecv (the party that left had put it on hold), else `None`.
    fn resume_offer(&mut self, _leg: Leg) -> Option<Vec<u8>> {
        None
    }
    /// `leg` answered [`AnchoredMedia::resume_offer`] with `body`.
    fn resume_answered(&mut self, _leg: Leg, _body: &[u8]) -> Result<(), SdpError> {
        Ok(())
    }
}

/// Media the node terminates itself on the call's only SIP leg (an AI agent's bridge).
pub(crate) trait LocalMedia: Send {
    /// The ACK of a 2xx that carried the node's offer (delayed offer) brings the answer;
    /// without an outstanding offer there is nothing to do.
    fn ack_answer(&mut self, body: &[u8]) -> Result<(), SdpError>;
    /// An offer in the dialog (hold, resume): the node's answer, or the SIP status refusing it.
    fn answer(&mut self, offer: &[u8]) -> Result<Vec<u8>, u16>;
    /// Passes a key press (from SIP INFO) to the agent as its `dtmf` message; `false` when
    /// there is no agent to tell.
    fn send_dtmf_to_agent(&mut self, _dtmf: &InfoDtmf) -> bool {
        false
    }
    /// The node's SDP last sent on the leg, for session refreshes by re-INVITE (and answers to
    /// re-INVITEs without an offer); `None` refreshes with UPDATE without a body. Bridged legs
    /// wrap their media in [`Refreshable`], which keeps it.
    fn last_sent(&self) -> Option<Vec<u8>> {
        None
    }
}

/// [`LocalMedia`] of a bridged leg: one SDP session answered by the node, the relay's leg
/// following each negotiation.
pub(crate) struct LocalAnswerer<'s> {
    pub(crate) policy: MediaPolicy,
    pub(crate) session: &'s mut SdpSession,
    /// The node's offer in its 2xx, until the ACK answers it.
    pub(crate) awaiting: Option<SessionDescription>,
    /// The relay leg's new media (the bridged leg is the relay's leg A).
    pub(crate) relay: &'s RelayHandle,
}

impl LocalMedia for LocalAnswerer<'_> {
    fn ack_answer(&mut self, body: &[u8]) -> Result<(), SdpError> {
        let Some(ours) = self.awaiting.take() else { return Ok(()) };
        let negotiated = SessionDescription::parse_bytes(body).and_then(|answer| process_answer(&ours, &answer))?;
        let _ = self.relay.update_leg(LegId::A, (&negotiated).into());
        Ok(())
    }

    fn answer(&mut self, offer: &[u8]) -> Result<Vec<u8>, u16> {
        let (answer, negotiated) = SessionDescription::parse_bytes(offer)
            .and_then(|offer| answer_offer(&offer, &self.policy, self.session))
            .map_err(|e| e.sip_status())?;
        let _ = self.relay.update_leg(LegId::A, (&negotiated).into());
        Ok(answer.to_string().into_bytes())
    }

    fn send_dtmf_to_agent(&mut self, dtmf: &InfoDtmf) -> bool {
        // The bridged relay's leg B is the agent.
        let press = DtmfPress { key: dtmf.key, events: Vec::new() };
        self.relay.send_dtmf(LegId::B, press).is_ok()
    }
}

/// A bridged leg's media as the connected machine sees it: the agent bridge's [`LocalAnswerer`]
/// and the node's SDP last sent on the leg (its offer or its answer in the 2xx, then each answer), which the node's
/// session refreshes carry: a re-INVITE that changes nothing (RFC 4028 section 7.4), because
/// a peer need not allow UPDATE. The offer's version is left as it is: the same SDP again is
/// no change (RFC 3264 section 8).
pub(crate) struct Refreshable<L> {
    pub(crate) inner: L,
    pub(crate) sent: Vec<u8>,
}

impl<L: LocalMedia> LocalMedia for Refreshable<L> {
    fn ack_answer(&mut self, body: &[u8]) -> Result<(), SdpError> {
        self.inner.ack_answer(body)
    }

    fn answer(&mut self, offer: &[u8]) -> Result<Vec<u8>, u16> {
        let answer = self.inner.answer(offer)?;
        self.sent.clone_from(&answer);
        Ok(answer)
    }

    fn send_dtmf_to_agent(&mut self, dtmf: &InfoDtmf) -> bool {
        self.inner.send_dtmf_to_agent(dtmf)
    }

    fn last_sent(&self) -> Option<Vec<u8>> {
        Some(self.sent.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every offer with "answer N", counting; refuses "bad" with 488.
    #[derive(Default)]
    struct Counting(u32);

    impl LocalMedia for Counting {
        fn ack_answer(&mut self, _body: &[u8]) -> Result<(), SdpError> {
            Ok(())
        }
        fn answer(&mut self, offer: &[u8]) -> Result<Vec<u8>, u16> {
            if offer == b"bad" {
                return Err(488);
            }
            self.0 += 1;
            Ok(format!("answer {}", self.0).into_bytes())
        }
    }

    #[test]
    fn the_refreshed_sdp_is_the_offer_then_each_answer_given() {
        let mut media = Refreshable { inner: Counting::default(), sent: b"offer".to_vec() };
        assert_eq!(media.last_sent().as_deref(), Some(b"offer".as_slice()));
        assert_eq!(media.answer(b"hold"), Ok(b"answer 1".to_vec()));
        assert_eq!(media.last_sent().as_deref(), Some(b"answer 1".as_slice()));
        assert_eq!(media.answer(b"bad"), Err(488));
        assert_eq!(media.last_sent().as_deref(), Some(b"answer 1".as_slice()), "a refused offer changes nothing");
    }
}
