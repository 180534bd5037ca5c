//! The UAC side of one outbound INVITE attempt, shared by calls the node bridges (`call/`)
//! and calls placed through the API (`originate/`): send the INVITE, follow its responses,
//! answer one digest challenge, CANCEL (only once a provisional response arrived, RFC 3261
//! 9.1), ACK a 2xx towards the dialog's route set or remote target, and the two timers a
//! transaction layer does not have (no response at all; ringing too long).
//!
//! Only the INVITE's construction and what a provisional response means to the call (relay it
//! to a caller, report `ringing` to a webhook) stay with the callers.

use std::time::Duration;

use rsip::headers::Header;
use rsip::{Method, Request, Response};
use switchboard_model::{Credential, TrunkConfig};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::context::NodeContext;
use super::control::reliable::{Provisional, ReliableReceiver};
use super::control::session_timer::{self, UacOffer};
use super::dialog::Dialog;
use super::digest::answer_challenge;
use super::endpoint::{TuEvent, TuSender};
use super::message::{self, HangupReason};
use super::transaction::{TransactionKey, cancel_for, response_to};
use super::transport::{Peer, Protocol};

/// The timers and the retry material of one attempt.
pub struct InviteSetup {
    /// Where the INVITE goes.
    pub peer: Peer,
    /// Our From tag (the dialog is registered under it).
    pub tag: String,
    /// The trunk's digest credential, for one 401/407 challenge.
    pub credential: Option<Credential>,
    /// No response at all within this long: 408 and failover (the trunk's failover timeout).
    pub no_response: Duration,
    /// Ringing longer than this: CANCEL and 480 without failover.
    pub ring_limit: Duration,
    /// Names the far end in reasons ("486 Busy Here from gw.example:5060").
    pub gateway: String,
    /// The Contact user of our side of the dialog.
    pub contact_user: String,
    /// The session timer the INVITE offers (RFC 4028): its headers are in the INVITE; a 422
    /// raises it and the INVITE is sent again, once per larger Min-SE.
    pub session: Option<UacOffer>,
}

/// What an attempt came to.
pub enum InviteEvent {
    /// A provisional response other than 100 (ringing, early media).
    Provisional(Response),
    /// Answered: the confirmed dialog (ACK sent) and the 2xx. The dialog stays registered
    /// with the endpoint; [`InviteClient::into_channel`] hands over the channel its in-dialog
    /// requests arrive on, and the holder unregisters it when the call ends.
    Answered(Box<(Dialog, Response)>),
    /// A final non-2xx, a timeout or an unusable answer; `failover` says whether the next
    /// target may be tried.
    Failed { code: u16, reason: String, failover: bool },
    /// Cancelled through [`InviteClient::next`]'s caller channel; a 2xx that crossed the CANCEL
    /// was ACKed and hung up.
    Cancelled,
    /// A PRACK from the caller (RFC 3262) for a reliable provisional response the caller's
    /// side sent; the attempt goes on. Only with a caller channel.
    CallerPrack { request: Request, key: TransactionKey },
    /// The `wake_at` of [`InviteClient::next_until`] passed; the attempt goes on.
    Wake,
}

/// One outbound INVITE in flight.
pub struct InviteClient<'c> {
    ctx: &'c NodeContext,
    setup: InviteSetup,
    invite: Request,
    cseq: u32,
    call_id: String,
    tx: TuSender,
    rx: Option<mpsc::UnboundedReceiver<TuEvent>>,
    provisional: bool,
    cancel_pending: bool,
    authenticated: bool,
    no_response_at: Instant,
    ring_limit_at: Instant,
    /// The reliable provisional responses received (RFC 3262), to PRACK each once.
    reliable: ReliableReceiver,
    /// The CSeq of the last PRACK sent (the confirmed dialog's requests count on from it).
    prack_cseq: u32,
}

impl<'c> InviteClient<'c> {
    /// Registers the dialog and sends `invite` (CSeq 1 .. n, with a fresh Via) to `setup.peer`.
    pub fn send(ctx: &'c NodeContext, invite: Request, setup: InviteSetup) -> InviteClient<'c> {
        let call_id = message::call_id(&invite);
        let cseq = message::cseq(&invite).map(|(n, _)| n).unwrap_or(1);
        let (tx, rx) = mpsc::unbounded_channel();
        ctx.endpoint.register_dialog(&call_id, &setup.tag, tx.clone());
        ctx.endpoint.send_request(invite.clone(), setup.peer, tx.clone());
        InviteClient {
            ctx,
            no_response_at: Instant::now() + setup.no_response,
            ring_limit_at: Instant::now() + setup.ring_limit,
            setup,
            invite,
            cseq,
            call_id,
            tx,
            rx: Some(rx),
            provisional: false,
            cancel_pending: false,
            authenticated: false,
            reliable: ReliableReceiver::default(),
            prack_cseq: 0,
        }
    }

    /// Waits for what the attempt comes to next. `caller` is the inbound leg's channel when
    /// there is one: its CANCEL cancels this attempt, its other requests are refused with 491
    /// until the call is answered. Call again after [`InviteEvent::Provisional`]; the other
    /// events end the attempt.
    pub async fn next(&mut self, caller: Option<&mut mpsc::UnboundedReceiver<TuEvent>>) -> InviteEvent {
        self.next_until(caller, None).await
    }

    /// Like [`InviteClient::next`], and also returns [`InviteEvent::Wake`] at `wake_at` (the
    /// caller's side has timers of its own: reliable provisional retransmissions) and hands
    /// the caller's PRACKs over as [`InviteEvent::CallerPrack`] instead of refusing them.
    pub async fn next_until(
        &mut self,
        mut caller: Option<&mut mpsc::UnboundedReceiver<TuEvent>>,
        wake_at: Option<Instant>,
    ) -> InviteEvent {
        let Some(mut rx) = self.rx.take() else {
            return InviteEvent::Failed { code: 500, reason: "attempt already ended".into(), failover: false };
        };
        let event = loop {
            let caller_event = async {
                match caller.as_deref_mut() {
                    Some(caller) => caller.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = rx.recv() => match event {
                    Some(TuEvent::Response(response)) => {
                        if let Some(event) = self.on_response(response).await {
                            break event;
                        }
                    }
                    Some(TuEvent::Timeout) => break failed(408, format!("no answer from {}", self.setup.gateway), true),
                    Some(TuEvent::Request { request, key: Some(key), .. }) => {
                        // An in-dialog request before the 2xx (early dialog): refuse politely.
                        self.ctx.endpoint.respond(&key, response_to(&request, 491, None, None));
                    }
                    Some(TuEvent::Request { key: None, .. } | TuEvent::Cancelled) => {}
                    None => break failed(500, "the endpoint stopped".into(), false),
                },
                event = caller_event => match event {
                    Some(TuEvent::Cancelled) => {
                        if self.provisional {
                            self.send_cancel();
                            break InviteEvent::Cancelled;
                        }
                        // No CANCEL before a provisional response: it is sent when one comes,
                        // or the no-response timer ends the attempt.
                        self.cancel_pending = true;
                    }
                    Some(TuEvent::Request { request, key: Some(key), .. }) if request.method == Method::PRack => {
                        break InviteEvent::CallerPrack { request, key };
                    }
                    Some(TuEvent::Request { request, key: Some(key), .. }) => {
                        self.ctx.endpoint.respond(&key, response_to(&request, 491, None, None));
                    }
                    _ => {}
                },
                () = sleep_until(wake_at.unwrap_or(self.ring_limit_at)), if wake_at.is_some() => break InviteEvent::Wake,
                () = self.ctx.drain.ending() => {
                    // The node stops: CANCEL a ringing callee (never before a provisional
                    // response, RFC 3261 9.1). The caller tells it apart by `drain.is_ending()`.
                    if self.provisional {
                        self.send_cancel();
                    }
                    break InviteEvent::Cancelled;
                }
                () = sleep_until(self.ring_limit_at) => {
                    self.send_cancel();
                    break failed(480, format!("no answer within {}s", self.setup.ring_limit.as_secs()), false);
                }
                () = sleep_until(self.no_response_at), if !self.provisional => {
                    if self.cancel_pending {
                        break InviteEvent::Cancelled;
                    }
                    let reason = format!("no response from {} within {}s", self.setup.gateway, self.setup.no_response.as_secs());
                    break failed(408, reason, true);
                }
            }
        };
        match &event {
            InviteEvent::Provisional(_)
            | InviteEvent::Answered(_)
            | InviteEvent::CallerPrack { .. }
            | InviteEvent::Wake => self.rx = Some(rx),
            InviteEvent::Failed { .. } | InviteEvent::Cancelled => {
                self.ctx.endpoint.unregister_dialog(&self.call_id, &self.setup.tag)
            }
        }
        event
    }

    /// After [`InviteEvent::Answered`]: the sender the dialog's requests use and the channel
    /// its in-dialog requests and responses arrive on.
    pub fn into_channel(self) -> (TuSender, Option<mpsc::UnboundedReceiver<TuEvent>>) {
        (self.tx, self.rx)
    }

    /// Handles a response; `None` when the attempt goes on without telling the caller.
    async fn on_response(&mut self, response: Response) -> Option<InviteEvent> {
        if !matches!(message::cseq(&response), Some((n, Method::Invite)) if n == self.cseq) {
            return None;
        }
        let code = message::status(&response);
        match code {
            100 => {
                self.provisional = true;
                None
            }
            101..=199 => {
                self.provisional = true;
                if self.cancel_pending {
                    self.send_cancel();
                    return Some(InviteEvent::Cancelled);
                }
                match self.reliable.on_provisional(&response) {
                    Ok(Provisional::Unreliable) => {}
                    Ok(Provisional::Prack(rack)) => self.send_prack(&response, rack.header()).await,
                    // A retransmission (already PRACKed) or out of order: RFC 3262 section 4.
                    Ok(Provisional::Discard) => return None,
                    Err(error) => {
                        tracing::info!(%error, gateway = %self.setup.gateway, "unusable reliable provisional response ignored");
                        return None;
                    }
                }
                Some(InviteEvent::Provisional(response))
            }
            200..=299 => Some(self.on_answer(response).await),
            401 | 407 if !self.authenticated => self.on_challenge(code, &response),
            session_timer::TOO_SMALL if self.setup.session.is_some() => self.on_too_small(&response),
            _ => {
                let reason = format!("{} from {}", response.status_code, self.setup.gateway);
                let failover = !super::routing::is_final_for_caller(&self.ctx.final_codes, code);
                Some(failed(code, reason, failover))
            }
        }
    }

    /// ACKs the 2xx and hands the dialog over, or hangs it up when the caller cancelled meanwhile.
    async fn on_answer(&mut self, response: Response) -> InviteEvent {
        let endpoint = &self.ctx.endpoint;
        let contact = endpoint.contact_for(self.setup.peer, &self.setup.contact_user);
        let Some(mut dialog) = Dialog::as_uac(&self.invite, &self.setup.tag, &response, self.setup.peer, contact)
        else {
            return failed(502, format!("unusable 2xx from {}", self.setup.gateway), true);
        };
        dialog.peer = in_dialog_peer(self.ctx, &dialog, self.setup.peer).await;
        // PRACKs were requests of this dialog: its next requests count on from them.
        dialog.local_cseq = dialog.local_cseq.max(self.prack_cseq);
        let ack = dialog.request(Method::Ack, endpoint.via_for(dialog.peer), Some(self.cseq), None);
        endpoint.send_stateless(rsip::SipMessage::Request(ack), dialog.peer);
        if self.cancel_pending {
            let reason = [HangupReason::normal("caller cancelled before the answer").header()];
            let bye = dialog.bye(endpoint.via_for(dialog.peer), &reason);
            endpoint.send_request(bye, dialog.peer, self.tx.clone());
            return InviteEvent::Cancelled;
        }
        InviteEvent::Answered(Box::new((dialog, response)))
    }

    /// Answers a 401/407 once with the trunk's credential: the same INVITE with the next CSeq,
    /// a fresh Via and the Authorization header.
    fn on_challenge(&mut self, code: u16, challenge: &Response) -> Option<InviteEvent> {
        let Some(credential) = &self.setup.credential else {
            let reason = "callee asks for authentication but the trunk has no credentials".into();
            return Some(failed(code, reason, true));
        };
        let header = match answer_challenge(
            challenge,
            &Method::Invite,
            &self.invite.uri,
            &credential.username,
            &credential.password,
            1,
        ) {
            Ok(header) => header,
            Err(error) => return Some(failed(code, format!("cannot answer the challenge: {error}"), true)),
        };
        self.authenticated = true;
        self.invite.headers.push(header);
        self.resend();
        None
    }

    /// A 422: the callee wants a longer session interval. The INVITE goes again with its
    /// Min-SE (RFC 4028 section 7.4), unless that would not raise it (then the 422 is final).
    fn on_too_small(&mut self, response: &Response) -> Option<InviteEvent> {
        let offer = self.setup.session.as_mut()?;
        if let Err(error) = offer.on_too_small(&response.headers) {
            return Some(failed(422, format!("422 from {}: {error}", self.setup.gateway), true));
        }
        let timer_headers = offer.request_headers();
        let is_timer_header = |h: &Header| match h {
            Header::Other(name, _) => {
                name.eq_ignore_ascii_case("Session-Expires") || name.eq_ignore_ascii_case("Min-SE")
            }
            _ => false,
        };
        self.invite.headers.retain(|h| !is_timer_header(h));
        self.invite.headers.extend(timer_headers.into_iter().filter(is_timer_header).collect::<Vec<_>>());
        self.resend();
        None
    }

    /// Sends the INVITE again with the next CSeq and a fresh Via (after a challenge or a 422).
    fn resend(&mut self) {
        self.cseq += 1;
        let cseq = self.cseq;
        let via = self.ctx.endpoint.via_for(self.setup.peer);
        let mut headers: Vec<Header> = Vec::with_capacity(self.invite.headers.iter().count());
        let mut via_replaced = false;
        for header in self.invite.headers.iter() {
            match header {
                Header::Via(_) if !via_replaced => {
                    headers.push(via.clone());
                    via_replaced = true;
                }
                Header::CSeq(_) => headers.push(Header::CSeq(format!("{cseq} INVITE").into())),
                other => headers.push(other.clone()),
            }
        }
        self.invite.headers = headers.into();
        self.ctx.endpoint.send_request(self.invite.clone(), self.setup.peer, self.tx.clone());
    }

    /// The session timer offer as the callee last saw it (after any 422).
    pub fn session_offer(&self) -> Option<&UacOffer> {
        self.setup.session.as_ref()
    }

    /// Acknowledges a reliable provisional response with a PRACK in its early dialog (RFC 3262
    /// section 7.2: CSeq above the INVITE's, RAck naming the response).
    async fn send_prack(&mut self, response: &Response, rack: Header) {
        let endpoint = &self.ctx.endpoint;
        let contact = endpoint.contact_for(self.setup.peer, &self.setup.contact_user);
        let Some(mut early) = Dialog::as_uac(&self.invite, &self.setup.tag, response, self.setup.peer, contact) else {
            return;
        };
        early.peer = in_dialog_peer(self.ctx, &early, self.setup.peer).await;
        early.local_cseq = early.local_cseq.max(self.prack_cseq);
        let mut prack = early.request(Method::PRack, endpoint.via_for(early.peer), None, None);
        prack.headers.push(rack);
        self.prack_cseq = early.local_cseq;
        endpoint.send_request(prack, early.peer, self.tx.clone());
    }

    /// CANCELs the attempt (after a provisional response, RFC 3261 9.1).
    pub fn cancel(&self) {
        self.send_cancel();
    }

    fn send_cancel(&self) {
        self.ctx.endpoint.send_request(cancel_for(&self.invite), self.setup.peer, self.tx.clone());
    }
}

fn failed(code: u16, reason: String, failover: bool) -> InviteEvent {
    InviteEvent::Failed { code, reason, failover }
}

/// Where in-dialog requests of an outbound leg go: the first route, else the Contact when it
/// is an address, else the hop the INVITE went to. The transport is the URI's own (`sips:` or
/// `;transport=`) when it names one, e.g. a callee's `;transport=UDP` Contact behind a TLS
/// trunk; otherwise the INVITE's.
async fn in_dialog_peer(ctx: &NodeContext, dialog: &Dialog, fallback: Peer) -> Peer {
    let uri = match dialog.route_set.first() {
        Some(route) => rsip::Uri::try_from(route.trim_start_matches('<').split('>').next().unwrap_or(route)).ok(),
        None => Some(dialog.remote_target.clone()),
    };
    let Some(uri) = uri else { return fallback };
    let protocol = uri_protocol(&uri).unwrap_or(fallback.protocol);
    let host = uri.host().to_string();
    let port = uri.port().map(|p| *p.value());
    match ctx.resolver.resolve(&host, port, protocol).await {
        Ok(addrs) => addrs.first().map(|addr| Peer { protocol, addr: *addr }).unwrap_or(fallback),
        Err(_) => fallback,
    }
}

/// The transport a URI asks for, if it says: `sips:` means TLS (RFC 3261 §26.2), else its
/// `transport` parameter.
fn uri_protocol(uri: &rsip::Uri) -> Option<Protocol> {
    if uri.scheme == Some(rsip::Scheme::Sips) {
        return Some(Protocol::Tls);
    }
    match uri.transport()? {
        rsip::Transport::Udp => Some(Protocol::Udp),
        rsip::Transport::Tcp => Some(Protocol::Tcp),
        rsip::Transport::Tls => Some(Protocol::Tls),
        _ => None,
    }
}

/// How long an attempt through `trunk` may go without any response before the next target is
/// tried: the trunk's `failoverTimeoutSeconds` (1–300 s), 5 s without a trunk.
pub fn failover_timeout(trunk: Option<&TrunkConfig>) -> Duration {
    Duration::from_secs(u64::from(trunk.map(|t| t.failover_timeout_seconds).unwrap_or(5)).clamp(1, 300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_names_its_transport_or_leaves_it_open() {
        let protocol = |text: &str| uri_protocol(&rsip::Uri::try_from(text).unwrap());
        assert_eq!(protocol("sip:127.0.0.1:5070;transport=UDP"), Some(Protocol::Udp));
        assert_eq!(protocol("sip:127.0.0.1:5070;transport=tcp"), Some(Protocol::Tcp));
        assert_eq!(protocol("sip:127.0.0.1:5071;transport=tls;lr"), Some(Protocol::Tls));
        assert_eq!(protocol("sips:carrier.example"), Some(Protocol::Tls));
        assert_eq!(protocol("sip:127.0.0.1:5070;lr"), None);
    }

    #[test]
    fn the_failover_timeout_is_the_trunks_within_bounds() {
        let mut trunk = crate::sip::routing::tests::trunk("t");
        trunk.failover_timeout_seconds = 2;
        assert_eq!(failover_timeout(Some(&trunk)), Duration::from_secs(2));
        trunk.failover_timeout_seconds = 0;
        assert_eq!(failover_timeout(Some(&trunk)), Duration::from_secs(1));
        trunk.failover_timeout_seconds = 10_000;
        assert_eq!(failover_timeout(Some(&trunk)), Duration::from_secs(300));
        assert_eq!(failover_timeout(None), Duration::from_secs(5));
    }
}
