//! In-dialog requests passed from one leg to the other (re-INVITE, UPDATE, INFO, ...) and
//! their final responses relayed back: the B2BUA's part of the machine. With anchored media
//! an offer is re-offered by the node rather than passed on.

use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response, SipMessage};

use super::{Action, Connected, Leg, MediaMode, Pending, via};
use crate::sip::control::dtmf_info;
use crate::sip::dialog::content_type;
use crate::sip::message;
use crate::sip::transaction::{TransactionKey, response_to};

impl Connected<'_> {
    /// Passes an in-dialog request (re-INVITE, UPDATE, INFO, ...) from one leg to the other.
    /// With anchored media an offer is not passed but re-offered by the node on the other leg
    /// (mirroring its direction: hold and resume), and a re-INVITE without an offer is
    /// answered here with the node's current SDP.
    pub(super) fn forward(&mut self, from: Leg, request: Request, key: TransactionKey, out: &mut Vec<Action>) {
        let ct = content_type(&request.headers);
        let mut body =
            (!request.body.is_empty()).then(|| (ct.clone().unwrap_or("application/sdp".into()), request.body.clone()));
        let mut offer = None;
        let is_sdp = ct.as_deref().is_none_or(|ct| ct.to_ascii_lowercase().starts_with("application/sdp"));
        if request.method == Method::Info
            && let Some(ct) = ct.as_deref().filter(|ct| dtmf_info::is_dtmf_content_type(ct))
        {
            match self.dtmf_info(from, &request, ct) {
                Ok(normalized) => body = Some(normalized),
                Err(refusal) => {
                    out.push(Action::Respond { key, response: refusal });
                    return;
                }
            }
        }
        let from_contact = self.leg(from).map(|l| l.setup.dialog.contact.clone()).unwrap_or_default();
        if let MediaMode::Anchored(anchor) = &mut self.media
            && matches!(request.method, Method::Invite | Method::Update)
        {
            if request.body.is_empty() && request.method == Method::Invite {
                let mut response = response_to(&request, 200, Some("OK"), None);
                response.headers.push(Header::Contact(headers::Contact::new(from_contact)));
                if let Some(sdp) = anchor.last_sent(from) {
                    message::set_body(&mut response.headers, &mut response.body, sdp, Some("application/sdp"));
                }
                out.push(Action::Respond { key, response });
                return;
            }
            if !request.body.is_empty() && is_sdp {
                match anchor.reoffer(from, &request.body) {
                    Ok((parsed, ours)) => {
                        offer = Some(parsed);
                        body = Some(("application/sdp".into(), ours));
                    }
                    Err(error) => {
                        tracing::info!(%error, leg = ?from, "re-offer refused");
                        out.push(Action::Respond {
                            key,
                            response: response_to(&request, error.sip_status(), None, None),
                        });
                        return;
                    }
                }
            }
        }
        let to = from.other();
        let Some(other) = self.leg_mut(to) else { return };
        let via = via(&other.setup);
        let body = body.as_ref().map(|(ct, bytes)| (ct.as_str(), bytes.clone()));
        let mut forwarded = other.setup.dialog.request(request.method, via, None, body);
        if matches!(request.method, Method::Invite | Method::Update)
            && let Some(session) = other.session.as_ref()
        {
            // The other leg's session is refreshed by this request too (RFC 4028).
            forwarded.headers.extend(session.forwarded_request_headers());
        }
        let cseq = other.setup.dialog.local_cseq;
        out.push(Action::Send { leg: to, request: forwarded });
        self.pending.push(Pending { from, key, request, cseq, offer });
    }

    /// Relays the final response to a forwarded request back to the leg it came from; `leg` is
    /// the leg the response arrived on. A 2xx to a forwarded re-INVITE is ACKed here.
    pub(super) fn relay_final(&mut self, leg: Leg, response: Response, out: &mut Vec<Action>) {
        let Some((number, method)) = message::cseq(&response) else { return };
        let mut code = message::status(&response);
        let Some(index) =
            self.pending.iter().position(|p| p.from != leg && p.cseq == number && p.request.method == method)
        else {
            return;
        };
        if code < 200 {
            return;
        }
        let p = self.pending.remove(index);
        if method == Method::Invite
            && (200..300).contains(&code)
            && let Some(state) = self.leg_mut(leg)
        {
            let via = via(&state.setup);
            let ack = state.setup.dialog.request(Method::Ack, via, Some(number), None);
            out.push(Action::SendStateless { leg, message: SipMessage::Request(ack) });
        }
        let mut body = (!response.body.is_empty())
            .then(|| (content_type(&response.headers).unwrap_or("application/sdp".into()), response.body.clone()));
        if let (Some(offer), MediaMode::Anchored(anchor)) = (p.offer.as_ref(), &mut self.media) {
            body = None;
            if (200..300).contains(&code) {
                match anchor.reanswer(p.from, offer, &response.body) {
                    Ok(answer) => body = Some(("application/sdp".into(), answer)),
                    Err(error) => {
                        tracing::info!(%error, "the other leg's answer to a re-offer is unusable");
                        code = 488;
                    }
                }
            }
        }
        let mut relayed = response_to(&p.request, code, None, None);
        if matches!(method, Method::Invite | Method::Update) && (200..300).contains(&code) {
            let contact = self.leg(p.from).map(|l| l.setup.contact.clone()).unwrap_or_default();
            relayed.headers.push(Header::Contact(headers::Contact::new(contact)));
        }
        if let Some((ct, bytes)) = body {
            message::set_body(&mut relayed.headers, &mut relayed.body, bytes, Some(&ct));
        }
        if matches!(method, Method::Invite | Method::Update) && (200..300).contains(&code) {
            self.offer_answered(leg, &response, p.from, &p.request, &mut relayed, out);
        }
        out.push(Action::Respond { key: p.key, response: relayed });
    }

    /// A forwarded request timed out on `leg`: answer its originator with 408.
    pub(super) fn fail_pending(&mut self, leg: Leg, out: &mut Vec<Action>) {
        self.pending.retain(|p| {
            if p.from != leg {
                out.push(Action::Respond { key: p.key.clone(), response: response_to(&p.request, 408, None, None) });
                false
            } else {
                true
            }
        });
    }
}
