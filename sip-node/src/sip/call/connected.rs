//! The connected phase of a B2BUA call: the caller is answered and the two legs are handed to
//! the sans-IO [`Connected`] machine (`sip/connected/`), which passes in-dialog requests
//! across (re-INVITE, UPDATE, INFO; hold and resume re-offered by the node when media is
//! anchored), retransmits the 2xx until the ACK, and ends the call when either side hangs up,
//! the media goes silent or the node stops. This module only sets the machine up and cleans
//! up after it (dialogs, relay).

use chrono::Utc;
use rsip::Response;
use rsip::headers::{self, Header};
use rsip::prelude::*;
use tokio::sync::mpsc;

use super::media::Anchor;
use super::record::{AttemptRecord, Ender, Outcome};
use super::referral::{self, ReferralContext, ReferralLog};
use super::session;
use super::{ALLOW, Call};
use crate::sip::connected::{Answer, Channels, Connected, Io, Leg, LegChannels, LegSetup, MediaMode, Setup, drive};
use crate::sip::dialog::{Dialog, content_type};
use crate::sip::endpoint::TuEvent;
use crate::sip::message;
use crate::sip::transaction::response_to;
use crate::store::StoreEvent;

impl Call {
    /// The established phase: answer the caller, then run the connected machine until the
    /// call ends.
    pub(super) async fn connected(
        &mut self,
        b: Dialog,
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
        let endpoint = &self.ctx.endpoint;
        let contact = endpoint.contact_for(self.a_peer, "");
        let Some(a) = Dialog::as_uas(&self.invite, &self.a_tag, self.a_peer, contact.clone()) else {
            return Outcome {
                code: 500,
                reason: "internal: inbound dialog unusable".into(),
                hangup_by: Ender::System,
                attempt: Some(record),
            };
        };
        endpoint.register_dialog(&a.call_id, &a.local_tag, self.a_tx.clone());

        let mut ok = response_to(&self.invite, 200, Some("OK"), Some(&self.a_tag));
        ok.headers.push(Header::Contact(headers::Contact::new(contact.clone())));
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
        ok.headers.extend(session::answer_headers(&self.session_a));
        if let Some(reliable) = self.reliable.as_mut() {
            // The final response ends the reliable provisional retransmissions.
            reliable.on_final();
        }
        let mut anchor = self.anchor.take();
        let relay_events = anchor.as_mut().and_then(Anchor::take_events);
        let b_peer = b.peer;
        let a_leg = LegSetup {
            sent_by: endpoint.transport().sent_by(self.a_peer.addr),
            contact,
            dialog: a,
            session: Some(self.session_a),
        };
        let b_leg = LegSetup {
            sent_by: endpoint.transport().sent_by(b_peer.addr),
            contact: endpoint.contact_for(b_peer, ""),
            dialog: b,
            session: self.session_b,
        };
        let answer = Answer { key: self.key.clone(), response: ok, reliable: self.a_peer.protocol.is_reliable() };
        let anchored = anchor.is_some();
        let media = match anchor.as_mut() {
            Some(anchor) => MediaMode::Anchored(anchor),
            None => MediaMode::PassThrough,
        };
        let setup = Setup {
            a: Some((a_leg, answer)),
            b: Some(b_leg),
            media,
            timers: self.ctx.timers,
            wait_for_bye: true,
            max_duration: None,
            session_policy: self.ctx.session_timers,
        };
        let (mut machine, first) = Connected::new(setup);
        let answered_at = record.answer_at.unwrap_or_else(Utc::now);
        self.answer_at = Some(answered_at);
        self.ctx.store.record(StoreEvent::CallAnswered { call_uuid: self.facts.call_uuid, at: answered_at });

        let io = Io { endpoint: &self.ctx.endpoint, metrics: &self.ctx.metrics, drain: &self.ctx.drain };
        // REFERs are taken in anchored calls: the node places the referred leg (`referral.rs`).
        let (referrals, referral_log) = match anchored {
            true => {
                let (referrals, log) = referral::start(ReferralContext {
                    ctx: std::sync::Arc::clone(&self.ctx),
                    snapshot: std::sync::Arc::clone(&self.snapshot),
                    facts: self.facts.clone(),
                    attempts: self.attempts,
                });
                (Some(referrals), Some(log))
            }
            false => (None, None),
        };
        let channels = Channels {
            a: Some(LegChannels { peer: self.a_peer, tx: self.a_tx.clone(), rx: a_rx }),
            b: Some(LegChannels { peer: b_peer, tx: b_tx, rx: &mut b_rx }),
            relay_events,
            agent: None,
            referrals,
        };
        let ending = drive(&mut machine, first, &io, channels).await;
        for leg in [Leg::A, Leg::B] {
            if let Some(dialog) = machine.dialog(leg) {
                self.ctx.endpoint.unregister_dialog(&dialog.call_id, &dialog.local_tag);
            }
        }
        drop(machine);
        if let Some(anchor) = anchor
            && let Some(stats) = anchor.stop().await
        {
            self.ctx.metrics.srtp_rejected(&stats);
            tracing::debug!(
                caller_in = stats.a.packets_in,
                caller_out = stats.a.packets_out,
                callee_in = stats.b.packets_in,
                callee_out = stats.b.packets_out,
                srtp_rejected = stats.a.srtp_rejected + stats.b.srtp_rejected,
                "call media"
            );
        }
        record.answer_at = Some(answered_at);
        if let Some(log) = referral_log {
            record = self.record_transfers(record, &log, &ending);
        }
        Outcome { code: ending.code, reason: ending.reason, hangup_by: ending.by, attempt: Some(record) }
    }
}

impl Call {
    /// The CDRs of a call whose legs REFERs replaced: a callee's leg that was replaced ends at
    /// the transfer ("transferred by REFER"), and the leg that replaced it carries the call's
    /// end; a leg that replaced the caller's gets a CDR with the call's end too. Returns the
    /// record of the call's last callee leg.
    fn record_transfers(
        &self,
        mut record: AttemptRecord,
        log: &std::sync::Mutex<ReferralLog>,
        ending: &crate::sip::connected::Ending,
    ) -> AttemptRecord {
        let transfers = std::mem::take(&mut log.lock().unwrap_or_else(|p| p.into_inner()).transfers);
        let end_at = Utc::now();
        for transfer in transfers {
            match transfer.leg {
                Leg::B => {
                    self.write_cdr(&record, transfer.at, 200, "transferred by REFER", Ender::Callee);
                    record = transfer.record;
                }
                Leg::A => self.write_cdr(&transfer.record, end_at, ending.code, &ending.reason, ending.by),
            }
        }
        record
    }
}
