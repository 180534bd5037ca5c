//! A transfer by REFER (RFC 3515): the node asks the caller's carrier to call the target
//! itself. The REFER goes on the caller's dialog (`Refer-To: <sip:TARGET@CARRIER>`, the host
//! of the caller's contact); the carrier's NOTIFYs (`message/sipfrag`) are answered and
//! followed to the final status. A 2xx there means the carrier connected the caller to the
//! target: the node hangs up its leg (BYE, RFC 5589 section 6.1) and the agent gets `stop`; the
//! call's CDR says so. A refused REFER or a failed referral leaves the caller with the agent,
//! which gets `transfer_failed`.
//!
//! The caller's machine keeps serving the dialog meanwhile: the events of the caller's channel
//! pass through here first, and only the REFER's responses and its NOTIFYs stay here.

use std::time::Duration;

use rsip::Method;
use rsip::headers::Header;
use tokio::sync::mpsc;

use super::agent::{CallerLeg, Reporter, caller_slots};
use crate::bridge::{BridgeEnd, BridgeHandle};
use crate::sip::connected::{
    AgentSession, Channels, Connected, Driven, Ending, Event, Io, LegChannels, Resume, drive_until,
};
use crate::sip::control::refer::{ReferProgress, ReferTo};
use crate::sip::endpoint::TuEvent;
use crate::sip::message;
use crate::sip::transaction::response_to;

/// How long the carrier may take to report the referral's final status after the REFER.
pub(super) const EXTRA_WAIT: Duration = Duration::from_secs(10);

/// What a REFER transfer needs.
pub(super) struct ReferCall<'a, 'm> {
    pub(super) io: &'a Io<'a>,
    pub(super) machine: &'a mut Connected<'m>,
    /// The caller's leg: the REFER goes on its dialog.
    pub(super) leg: CallerLeg<'a>,
    pub(super) agent: &'a mut BridgeHandle,
    pub(super) agent_reason: fn(&BridgeEnd) -> String,
    pub(super) resume: Resume,
    /// The target (E.164 or a SIP URI) and how long the referral may take in all.
    pub(super) to: &'a str,
    pub(super) limit: Duration,
    /// The number the REFER names as referrer (the DID).
    pub(super) referred_by: &'a str,
}

/// How the referral ended.
pub(super) enum Referred {
    /// The call ended (the carrier connected the caller and hung up, or the caller left).
    Ended(Ending),
    /// The carrier connected the caller to the target: drive on with these actions (the BYE on
    /// the caller's leg) to end the call.
    Transferred(Resume, u16),
    /// Refused or failed: the caller stays with the agent.
    Failed(Resume, u16, String),
}

/// What the carrier said about the referral.
enum Outcome {
    Done(u16),
    Failed(u16, String),
}

impl ReferCall<'_, '_> {
    pub(super) async fn run(self, report: &Reporter<'_>) -> Referred {
        let ReferCall { io, machine, leg, agent, agent_reason, resume, to, limit, referred_by } = self;
        let CallerLeg { leg, peer: a_peer, tx: a_tx, rx: a_rx } = leg;
        let Some(host) = machine.dialog(leg).map(|d| d.remote_target.host().to_string()) else {
            return Referred::Failed(resume, 500, "the caller's leg is gone".into());
        };
        // A number goes to the carrier that sent the call; a SIP URI (checked like one the node
        // would dial) as it is.
        let refer_to = if super::target::is_uri(to) { to.to_string() } else { format!("sip:{to}@{host};user=phone") };
        let target = match ReferTo::blind(&refer_to) {
            Ok(target) => target,
            Err(error) => return Referred::Failed(resume, 400, format!("cannot refer to {to}: {error}")),
        };
        let Some(mut refer) = machine.new_request(leg, Method::Refer, None) else {
            return Referred::Failed(resume, 500, "the caller's leg is gone".into());
        };
        let contact = io.endpoint.contact_for(a_peer, referred_by);
        refer.headers.push(target.header());
        refer.headers.push(Header::Other("Referred-By".into(), contact.clone()));
        refer.headers.push(Header::Contact(contact.into()));
        let Some((refer_cseq, _)) = message::cseq(&refer) else {
            return Referred::Failed(resume, 500, "internal: REFER without CSeq".into());
        };
        io.endpoint.send_request(refer, a_peer, a_tx.clone());
        report.send("transfer_started", None, None);
        // The machine reads the caller's events from here on, as this loop passes them.
        let (pass_tx, mut pass_rx) = mpsc::unbounded_channel();
        let follow = follow(io, a_rx, &pass_tx, refer_cseq, limit);
        let (a, b) = caller_slots(leg, LegChannels { peer: a_peer, tx: a_tx.clone(), rx: &mut pass_rx });
        let channels = Channels {
            a,
            b,
            relay_events: resume.relay_events,
            agent: Some(AgentSession { handle: &mut *agent, reason: agent_reason }),
            referrals: None,
        };
        let (outcome, mut resumed) = match drive_until(machine, resume.actions, io, channels, follow).await {
            Driven::Ended(ending) => return Referred::Ended(ending),
            Driven::Interrupted(outcome, resumed) => (outcome, resumed),
        };
        // Events passed but not yet read by the machine go back into the caller's channel.
        while let Ok(event) = pass_rx.try_recv() {
            let _ = a_tx.send(event);
        }
        match outcome {
            Outcome::Done(status) => {
                let reason = format!("transferred by REFER to {to} ({status})");
                resumed.actions.extend(machine.on_event(Event::AgentEnded { reason }));
                Referred::Transferred(resumed, status)
            }
            Outcome::Failed(status, why) => Referred::Failed(resumed, status, why),
        }
    }
}

/// Reads the caller's events: the REFER's final response and the NOTIFYs of its subscription
/// are handled here (each NOTIFY answered 200), everything else goes to the machine.
async fn follow(
    io: &Io<'_>,
    a_rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    pass: &mpsc::UnboundedSender<TuEvent>,
    refer_cseq: u32,
    limit: Duration,
) -> Outcome {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let mut accepted = false;
    loop {
        let event = tokio::select! {
            event = a_rx.recv() => event,
            () = &mut deadline => return Outcome::Failed(408, "no final NOTIFY for the REFER in time".into()),
        };
        let Some(event) = event else {
            // The endpoint stopped: the machine hears of it through its own closed channel.
            std::future::pending::<()>().await;
            unreachable!("pending never resolves");
        };
        match event {
            TuEvent::Response(response) if message::cseq(&response) == Some((refer_cseq, Method::Refer)) => {
                let status = message::status(&response);
                if status >= 300 {
                    return Outcome::Failed(status, format!("the carrier refused the REFER ({status})"));
                }
                accepted |= status >= 200;
            }
            TuEvent::Timeout if !accepted => {
                return Outcome::Failed(408, "no answer to the REFER".into());
            }
            TuEvent::Request { request, key: Some(key), peer } if request.method == Method::Notify => {
                match ReferProgress::of(&request.headers, &request.body) {
                    Ok(progress) => {
                        io.endpoint.respond(&key, response_to(&request, 200, Some("OK"), None));
                        tracing::info!(status = progress.frag.status, "REFER progress");
                        if progress.terminated {
                            let status = progress.frag.status;
                            return if (200..300).contains(&status) {
                                Outcome::Done(status)
                            } else {
                                Outcome::Failed(
                                    status,
                                    format!("the referral failed: {status} {}", progress.frag.reason),
                                )
                            };
                        }
                    }
                    // Not our subscription's: the machine answers it as any in-dialog request.
                    Err(_) => {
                        let _ = pass.send(TuEvent::Request { request, key: Some(key), peer });
                    }
                }
            }
            other => {
                let _ = pass.send(other);
            }
        }
    }
}
