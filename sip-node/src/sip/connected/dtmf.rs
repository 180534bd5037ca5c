//! DTMF by SIP INFO (issue 24 item 6) where the node can do better than pass the INFO on: a
//! key press for a leg that negotiated telephone-event is played into that leg's RTP as
//! RFC 4733 events (the relay generates them), and one on a call to an AI agent becomes the
//! agent's `dtmf` message. Everything else (the other leg has no telephone-event, the media
//! is not anchored) goes on as one well-formed `application/dtmf-relay` INFO (`forward`), and
//! a garbage body is refused here with 400/415 whatever the call.

use rsip::{Method, Request};

use super::{Action, Connected, Leg, MediaMode};
use crate::sip::control::dtmf_info;
use crate::sip::dialog::content_type;
use crate::sip::transaction::{TransactionKey, response_to};

impl Connected<'_> {
    /// An in-dialog request from `from`; `true` when it was a DTMF INFO handled here (answered
    /// 200 once the key went into the other leg's RTP or to the agent, or refused for its
    /// body). `false`: not a DTMF INFO, or one to pass on as INFO.
    pub(super) fn info_dtmf(
        &mut self,
        from: Leg,
        request: &Request,
        key: &TransactionKey,
        out: &mut Vec<Action>,
    ) -> bool {
        if request.method != Method::Info {
            return false;
        }
        let Some(ct) = content_type(&request.headers).filter(|ct| dtmf_info::is_dtmf_content_type(ct)) else {
            return false;
        };
        let dtmf = match dtmf_info::parse(&ct, &request.body) {
            Ok(dtmf) => dtmf,
            // The refusal (status and Warning) as for an INFO to pass on.
            Err(_) => match self.dtmf_info(from, request, &ct) {
                Err(refusal) => {
                    out.push(Action::Respond { key: key.clone(), response: refusal });
                    return true;
                }
                Ok(_) => return false,
            },
        };
        let to = from.other();
        let other_leg = self.leg(to).is_some();
        let delivered = match &mut self.media {
            MediaMode::Anchored(anchor) if other_leg => anchor.send_dtmf(to, &dtmf),
            MediaMode::AnswerHere(media) if !other_leg => media.send_dtmf_to_agent(&dtmf),
            _ => false,
        };
        if delivered {
            tracing::debug!(leg = ?from, key = %dtmf.key, "DTMF by INFO played into the other side");
            out.push(Action::Respond { key: key.clone(), response: response_to(request, 200, Some("OK"), None) });
        }
        delivered
    }
}
