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
    /// re-INVITEs without an offer); `None` (calls to AI agents from a caller) refreshes with
    /// UPDATE without a body.
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
