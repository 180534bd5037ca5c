//! The connected phase of a B2BUA call: the caller is answered, in-dialog requests pass
//! across (re-INVITE, UPDATE, INFO, hold and resume re-offered by the node when media is
//! anchored), until either side hangs up, the media goes silent or the node stops.

use chrono::Utc;
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response};
use tokio::sync::mpsc;

use super::media::Anchor;
use super::record::{AttemptRecord, Ender, Outcome};
use super::{ALLOW, BYE_WAIT, Call, Leg};
use crate::media::relay::RelayEvent;
use crate::sip::dialog::{Dialog, content_type};
use crate::sip::endpoint::TuEvent;
use crate::sip::message::{self, HangupReason};
use crate::sip::transaction::{TransactionKey, response_to};
use crate::store::StoreEvent;

/// An in-dialog request forwarded from one leg to the other, waiting for its final response.
struct Pending {
    from: Leg,
    key: TransactionKey,
    request: Request,
    cseq: u32,
    /// The originator's offer when the node re-offered on the other leg (anchored media).
    offer: Option<crate::media::sdp::SessionDescription>,
}

impl Call {
    /// The established phase: answer the caller, then pass in-dialog requests across until
    /// either side hangs up.
    pub(super) async fn connected(
        &mut self,
        mut b: Dialog,
        answer: Response,
        mut record: AttemptRecord,
        a_rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    ) -> Outcome {
        let (Some(mut b_rx), Some(b_tx)) = (self.b_rx.take(), self.b_tx.take()) else {
            return Outcome {
                code: 500,
                reason: "internal: outbound leg lost".into(),
                hangup_by: Ender::System,
                attempt: Some(record),
            };
        };
        let contact = self.ctx.endpoint.contact_for(self.a_peer, "");
        let Some(mut a) = Dialog::as_uas(&self.invite, &self.a_tag, self.a_peer, contact.clone()) else {
            return Outcome {
                code: 500,
                reason: "internal: inbound dialog unusable".into(),
                hangup_by: Ender::System,
                attempt: Some(record),
            };
        };
        self.ctx.endpoint.register_dialog(&a.call_id, &a.local_tag, self.a_tx.clone());
        let original_b_cseq = b.local_cseq;

        let mut ok = response_to(&self.invite, 200, Some("OK"), Some(&self.a_tag));
        ok.headers.push(Header::Contact(headers::Contact::new(contact)));
        ok.headers.push(Header::Allow(ALLOW.into()));
        match self.anchor.as_ref().and_then(Anchor::caller_final_body) {
            Some(sdp) => message::set_body(&mut ok.headers, &mut ok.body, sdp, Some("application/sdp")),
            None => {
                let ct = content_type(&answer.headers);
                message::set_body(
                    &mut ok.headers,
                    &mut ok.body,
                    answer.body.clone(),
                    if answer.body.is_empty() { None } else { ct.as_deref() },
                );
            }
        }
        let mut relay_events = self.anchor.as_mut().and_then(Anchor::take_events);
        self.ctx.endpoint.respond(&self.key, ok.clone());
        let answered_at = record.answer_at.unwrap_or_else(Utc::now);
        self.answer_at = Some(answered_at);
        self.ctx.store.record(StoreEvent::CallAnswered { call_uuid: self.facts.call_uuid, at: answered_at });

        // RFC 3261 13.3.1.4: the 2xx is retransmitted until the ACK comes (UDP only).
        let reliable = self.a_peer.protocol.is_reliable();
        let mut acked = reliable;
        let mut interval = self.ctx.timers.t1;
        let give_up = tokio::time::Instant::now() + self.ctx.timers.t1 * 64;
        let retransmit = tokio::time::sleep(interval);
        tokio::pin!(retransmit);
        let mut pending: Vec<Pending> = Vec::new();

        let (code, reason, ender) = loop {
            tokio::select! {
                () = &mut retransmit, if !acked => {
                    if tokio::time::Instant::now() >= give_up {
                        tracing::warn!("no ACK for the 200 OK from the caller; ending the call");
                        let why = "caller never acknowledged the answer";
                        let reason = [HangupReason::timer(why).header()];
                        self.send_bye(&mut b, &b_tx, &reason);
                        self.send_bye(&mut a, &self.a_tx.clone(), &reason);
                        break (408, why.to_string(), Ender::System);
                    }
                    self.ctx.endpoint.send_stateless(rsip::SipMessage::Response(ok.clone()), self.a_peer);
                    self.ctx.metrics.retransmission();
                    interval = (interval * 2).min(self.ctx.timers.t2);
                    retransmit.as_mut().reset(tokio::time::Instant::now() + interval);
                }
                () = self.ctx.drain.ending() => {
                    let reason = [HangupReason::normal(crate::drain::NODE_SHUTDOWN).header()];
                    self.send_bye(&mut b, &b_tx, &reason);
                    let a_tx = self.a_tx.clone();
                    self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                    break (200, crate::drain::NODE_SHUTDOWN.to_string(), Ender::System);
                }
                event = next_relay_event(&mut relay_events) => match event {
                    RelayEvent::MediaTimeout { silent_for } => {
                        tracing::info!(silent_for = ?silent_for, "media timeout");
                        let why = format!("media timeout: no RTP for {} s", silent_for.as_secs());
                        let reason = [HangupReason::timer(&why).header()];
                        self.send_bye(&mut b, &b_tx, &reason);
                        let a_tx = self.a_tx.clone();
                        self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                        break (408, why, Ender::System);
                    }
                    RelayEvent::Dtmf { leg, digit } => tracing::debug!(?leg, ?digit, "DTMF relayed"),
                    RelayEvent::Latched { leg, source } => tracing::debug!(?leg, %source, "RTP latched"),
                },
                event = a_rx.recv() => {
                    let Some(event) = event else { break (500, "internal: channel closed".into(), Ender::System) };
                    match event {
                        TuEvent::Request { request, key, .. } => match (request.method, key) {
                            (Method::Ack, _) => {
                                acked = true;
                                if let Some(anchor) = self.anchor.as_mut().filter(|a| a.awaits_caller_answer()) {
                                    // Delayed offer: the ACK carries the caller's answer.
                                    if let Err(error) = anchor.caller_acked(&request.body) {
                                        tracing::info!(%error, "the caller's ACK has no usable answer to the node's offer");
                                        let why = format!("caller's answer in ACK: {error}");
                                        let reason = [HangupReason::incompatible(&why).header()];
                                        self.send_bye(&mut b, &b_tx, &reason);
                                        let a_tx = self.a_tx.clone();
                                        self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                                        break (488, why, Ender::System);
                                    }
                                    relay_events = anchor.take_events();
                                }
                            }
                            (Method::Bye, Some(key)) => {
                                self.ctx.endpoint.respond(&key, response_to(&request, 200, Some("OK"), None));
                                let reason = relayed_reason(&request, "caller hung up");
                                self.bye_and_wait(&mut b, &b_tx, &mut b_rx, &reason).await;
                                break (200, "caller hung up".into(), Ender::Caller);
                            }
                            (_, Some(key)) => {
                                acked = true;
                                let from_contact = a.contact.clone();
                                self.forward(Leg::A, request, key, &from_contact, &mut b, &b_tx, &mut pending);
                            }
                            (_, None) => {}
                        },
                        TuEvent::Response(response) => self.relay_final(Leg::A, response, &mut a, &mut pending),
                        TuEvent::Timeout => self.fail_pending(Leg::A, &mut pending),
                        TuEvent::Cancelled => {}
                    }
                }
                event = b_rx.recv() => {
                    let Some(event) = event else { break (500, "internal: channel closed".into(), Ender::System) };
                    match event {
                        TuEvent::Request { request, key, .. } => match (request.method, key) {
                            (Method::Ack, _) => {}
                            (Method::Bye, Some(key)) => {
                                self.ctx.endpoint.respond(&key, response_to(&request, 200, Some("OK"), None));
                                let a_tx = self.a_tx.clone();
                                let reason = relayed_reason(&request, "callee hung up");
                                self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                                break (200, "callee hung up".into(), Ender::Callee);
                            }
                            (_, Some(key)) => {
                                let from_contact = b.contact.clone();
                                let a_tx = self.a_tx.clone();
                                self.forward(Leg::B, request, key, &from_contact, &mut a, &a_tx, &mut pending);
                            }
                            (_, None) => {}
                        },
                        TuEvent::Response(response) => {
                            let is_original_2xx = matches!(message::cseq(&response), Some((n, Method::Invite)) if n == original_b_cseq)
                                && (200..300).contains(&message::status(&response));
                            if is_original_2xx {
                                // Our ACK was lost: the callee retransmits its 2xx.
                                let ack = b.request(Method::Ack, self.ctx.endpoint.via_for(b.peer), Some(original_b_cseq), None);
                                self.ctx.endpoint.send_stateless(rsip::SipMessage::Request(ack), b.peer);
                            } else {
                                self.relay_final(Leg::B, response, &mut b, &mut pending);
                            }
                        }
                        TuEvent::Timeout => self.fail_pending(Leg::B, &mut pending),
                        TuEvent::Cancelled => {}
                    }
                }
            }
        };
        self.ctx.endpoint.unregister_dialog(&a.call_id, &a.local_tag);
        self.ctx.endpoint.unregister_dialog(&b.call_id, &b.local_tag);
        if let Some(anchor) = self.anchor.take()
            && let Some(stats) = anchor.stop().await
        {
            tracing::info!(
                caller_in = stats.a.packets_in,
                caller_out = stats.a.packets_out,
                callee_in = stats.b.packets_in,
                callee_out = stats.b.packets_out,
                "call media"
            );
        }
        record.answer_at = Some(answered_at);
        Outcome { code, reason, hangup_by: ender, attempt: Some(record) }
    }

    /// Passes an in-dialog request (re-INVITE, UPDATE, INFO, ...) from one leg to the other.
    /// With anchored media an offer is not passed but re-offered by the node on the other leg
    /// (mirroring its direction: hold and resume), and a re-INVITE without an offer is
    /// answered here with the node's current SDP.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        from: Leg,
        request: Request,
        key: TransactionKey,
        from_contact: &str,
        other: &mut Dialog,
        other_tx: &mpsc::UnboundedSender<TuEvent>,
        pending: &mut Vec<Pending>,
    ) {
        let ct = content_type(&request.headers);
        let mut body =
            (!request.body.is_empty()).then(|| (ct.clone().unwrap_or("application/sdp".into()), request.body.clone()));
        let mut offer = None;
        let is_sdp = ct.as_deref().is_none_or(|ct| ct.to_ascii_lowercase().starts_with("application/sdp"));
        if let Some(anchor) = self.anchor.as_mut()
            && matches!(request.method, Method::Invite | Method::Update)
        {
            if request.body.is_empty() && request.method == Method::Invite {
                let mut response = response_to(&request, 200, Some("OK"), None);
                response.headers.push(Header::Contact(headers::Contact::new(from_contact.to_string())));
                if let Some(sdp) = anchor.last_sent(from) {
                    message::set_body(&mut response.headers, &mut response.body, sdp, Some("application/sdp"));
                }
                self.ctx.endpoint.respond(&key, response);
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
                        self.ctx.endpoint.respond(&key, response_to(&request, error.sip_status(), None, None));
                        return;
                    }
                }
            }
        }
        let body = body.as_ref().map(|(ct, bytes)| (ct.as_str(), bytes.clone()));
        let forwarded = other.request(request.method, self.ctx.endpoint.via_for(other.peer), None, body);
        let cseq = other.local_cseq;
        self.ctx.endpoint.send_request(forwarded, other.peer, other_tx.clone());
        pending.push(Pending { from, key, request, cseq, offer });
    }

    /// Relays the final response to a forwarded request back to the leg it came from; `leg` is
    /// the leg the response arrived on. A 2xx to a forwarded re-INVITE is ACKed here.
    fn relay_final(&mut self, leg: Leg, response: Response, dialog: &mut Dialog, pending: &mut Vec<Pending>) {
        let Some((number, method)) = message::cseq(&response) else { return };
        let mut code = message::status(&response);
        let Some(index) = pending.iter().position(|p| p.from != leg && p.cseq == number && p.request.method == method)
        else {
            return;
        };
        if code < 200 {
            return;
        }
        let p = pending.remove(index);
        if method == Method::Invite && (200..300).contains(&code) {
            let ack = dialog.request(Method::Ack, self.ctx.endpoint.via_for(dialog.peer), Some(number), None);
            self.ctx.endpoint.send_stateless(rsip::SipMessage::Request(ack), dialog.peer);
        }
        let mut body = (!response.body.is_empty())
            .then(|| (content_type(&response.headers).unwrap_or("application/sdp".into()), response.body.clone()));
        if let (Some(offer), Some(anchor)) = (p.offer.as_ref(), self.anchor.as_mut()) {
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
            let peer = if p.from == Leg::A { self.a_peer } else { dialog.peer };
            relayed.headers.push(Header::Contact(headers::Contact::new(self.ctx.endpoint.contact_for(peer, ""))));
        }
        if let Some((ct, bytes)) = body {
            message::set_body(&mut relayed.headers, &mut relayed.body, bytes, Some(&ct));
        }
        self.ctx.endpoint.respond(&p.key, relayed);
    }

    /// A forwarded request timed out on `leg`: answer its originator with 408.
    fn fail_pending(&self, leg: Leg, pending: &mut Vec<Pending>) {
        pending.retain(|p| {
            if p.from != leg {
                self.ctx.endpoint.respond(&p.key, response_to(&p.request, 408, None, None));
                false
            } else {
                true
            }
        });
    }

    /// Sends BYE on a leg with the `Reason` header(s) saying why (RFC 3326).
    pub(super) fn send_bye(&self, dialog: &mut Dialog, tx: &mpsc::UnboundedSender<TuEvent>, reason: &[Header]) {
        let bye = dialog.bye(self.ctx.endpoint.via_for(dialog.peer), reason);
        self.ctx.endpoint.send_request(bye, dialog.peer, tx.clone());
    }

    /// Sends BYE on a leg and waits (bounded) for its final response.
    pub(super) async fn bye_and_wait(
        &self,
        dialog: &mut Dialog,
        tx: &mpsc::UnboundedSender<TuEvent>,
        rx: &mut mpsc::UnboundedReceiver<TuEvent>,
        reason: &[Header],
    ) {
        self.send_bye(dialog, tx, reason);
        let bye_cseq = dialog.local_cseq;
        let _ = tokio::time::timeout(BYE_WAIT, async {
            while let Some(event) = rx.recv().await {
                match event {
                    TuEvent::Response(r)
                        if message::cseq(&r) == Some((bye_cseq, Method::Bye)) && message::status(&r) >= 200 =>
                    {
                        return;
                    }
                    TuEvent::Timeout => return,
                    TuEvent::Request { request, key: Some(key), .. } => {
                        // A crossing BYE (both hung up at once) or anything else: answer it.
                        let code = if request.method == Method::Bye { 200 } else { 481 };
                        self.ctx.endpoint.respond(&key, response_to(&request, code, None, None));
                    }
                    _ => {}
                }
            }
        })
        .await;
    }
}
/// The next event of a call's relay; never resolves when there is none.
async fn next_relay_event(events: &mut Option<mpsc::Receiver<RelayEvent>>) -> RelayEvent {
    if let Some(rx) = events.as_mut()
        && let Some(event) = rx.recv().await
    {
        return event;
    }
    *events = None;
    std::future::pending().await
}

/// The Reason to put on the BYE relayed to the other leg: the hanging-up side's own, else
/// normal clearing with `text`.
fn relayed_reason(request: &Request, text: &str) -> Vec<Header> {
    let theirs = message::reason_headers(request);
    if theirs.is_empty() { vec![HangupReason::normal(text).header()] } else { theirs }
}
