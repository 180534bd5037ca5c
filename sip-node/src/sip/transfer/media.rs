//! The media of a transferred call as its connected machine sees it: the caller's leg and the
//! target's, joined by a two-leg relay the transfer started. Re-offers are refused with 488
//! (the call stays up, RFC 3261 14.2): re-negotiating a transferred call's legs is not built
//! yet. A re-INVITE without an offer gets the SDP the node last sent on that leg.

use crate::media::sdp::{SdpError, SessionDescription};
use crate::sip::connected::{AnchoredMedia, Leg};

pub(super) struct TransferMedia {
    /// The node's answer to the caller (its port is the one the caller still sends to).
    pub(super) caller_sdp: Vec<u8>,
    /// The node's offer to the target.
    pub(super) target_sdp: Vec<u8>,
}

impl AnchoredMedia for TransferMedia {
    fn awaits_caller_answer(&self) -> bool {
        false
    }

    fn caller_acked(&mut self, _body: &[u8]) -> Result<(), SdpError> {
        Ok(())
    }

    fn last_sent(&self, leg: Leg) -> Option<Vec<u8>> {
        Some(match leg {
            Leg::A => self.caller_sdp.clone(),
            Leg::B => self.target_sdp.clone(),
        })
    }

    fn reoffer(&mut self, _from: Leg, _body: &[u8]) -> Result<(SessionDescription, Vec<u8>), SdpError> {
        Err(SdpError::NoAudio)
    }

    fn reanswer(&mut self, _from: Leg, _offer: &SessionDescription, _body: &[u8]) -> Result<Vec<u8>, SdpError> {
        Err(SdpError::NoAudio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re_offers_are_refused_with_488_and_offerless_reinvites_get_the_last_sdp() {
        let mut media = TransferMedia { caller_sdp: b"a".to_vec(), target_sdp: b"b".to_vec() };
        assert_eq!(media.reoffer(Leg::A, b"v=0").err().map(|e| e.sip_status()), Some(488));
        assert_eq!((media.last_sent(Leg::A), media.last_sent(Leg::B)), (Some(b"a".to_vec()), Some(b"b".to_vec())));
    }
}
