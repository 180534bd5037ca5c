//! Calls whose destination is an AI agent over WebSocket: the node answers the caller itself,
//! anchors the caller's RTP and bridges it to the agent (Twilio Media Streams).

use chrono::Utc;
use rsip::headers::{self, Header};
use rsip::prelude::*;
use switchboard_model::Codec;
use tokio::sync::mpsc;

use super::record::{AttemptRecord, Ender, Outcome};
use super::{ALLOW, Call};
use crate::bridge::BridgeEnd;
use crate::bridge::answer::AgentAnswer;
use crate::sip::connected::{Answer, Connected, Leg, LegSetup, LocalAnswerer, MediaMode, Refreshable, Setup};
use crate::sip::dialog::Dialog;
use crate::sip::endpoint::TuEvent;
use crate::sip::message;
use crate::sip::transaction::response_to;
use crate::sip::transfer::{AgentCall, AgentCallEnd, CallerFacts, CallerLeg, run_agent_call};
use crate::store::StoreEvent;

impl Call {
    /// A call to an AI agent: answer the caller's SDP with the node's own RTP port, connect the
    /// WebSocket (Twilio Media Streams), answer the caller once the agent is there (or, with
    /// `--agent-answer first-audio`, ring until it first speaks), then relay audio both ways
    /// until either side ends the call or the media goes silent. Every exit path gives the RTP
    /// ports back (the relay owns them) and says in the outcome why the call ended.
    pub(super) async fn bridge_to_agent(
        &mut self,
        url: String,
        a_rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    ) -> Outcome {
        use crate::bridge::{self, BridgeConfig, CallParameters};
        use crate::media::relay::{LegMedia, RelayConfig, RtpLegSetup};
        use crate::media::sdp::{
            LocalEndpoint, MediaPolicy, SdpSession, SessionDescription, TELEPHONE_EVENT_PT, answer_offer, create_offer,
        };

        let setup_at = Utc::now();
        let mut ring_at = None;
        let record = |ring_at, answer_at| AttemptRecord {
            number: 1,
            trunk: None,
            gateway: Some(url.clone()),
            setup_at,
            ring_at,
            answer_at,
        };
        let Some(media) = self.ctx.media.clone() else {
            return self.refuse_caller(503, "no media anchoring on this node".into(), Some(record(None, None)));
        };
        // A delayed offer (no SDP in the INVITE): the node offers in its 200 OK and the caller
        // answers in the ACK.
        let offer = match (!self.invite.body.is_empty()).then(|| SessionDescription::parse_bytes(&self.invite.body)) {
            None => None,
            Some(Ok(offer)) => Some(offer),
            Some(Err(error)) => {
                return self.refuse_caller(
                    error.sip_status(),
                    format!("caller's SDP: {error}"),
                    Some(record(None, None)),
                );
            }
        };
        let pair = match media.ports.allocate() {
            Ok(pair) => pair,
            Err(error @ crate::media::ports::PortError::Exhausted { .. }) => {
                return self.refuse_no_ports(format!("no RTP port free: {error}"), Some(record(None, None)));
            }
            Err(error) => {
                return self.refuse_caller(503, format!("no RTP port free: {error}"), Some(record(None, None)));
            }
        };
        let trunk = self.facts.inbound_trunk.clone();
        let codecs = trunk.as_ref().map(|t| t.codecs.clone()).unwrap_or_default();
        let mut policy = MediaPolicy::new(codecs, LocalEndpoint { address: media.address, rtp_port: pair.rtp_port() });
        // The caller's leg is SRTP as its trunk says; the agent's side is the WebSocket.
        policy.srtp = trunk.as_ref().map_or(crate::media::srtp::SrtpPolicy::Off, |t| t.srtp.into());
        let mut session = SdpSession::new(media.address);
        let (answer, leg_media, awaiting_answer) = match &offer {
            Some(offer) => match answer_offer(offer, &policy, &mut session) {
                Ok((answer, negotiated)) => (answer, LegMedia::from(&negotiated), None),
                Err(error) => {
                    return self.refuse_caller(error.sip_status(), error.to_string(), Some(record(None, None)));
                }
            },
            None => {
                let ours = create_offer(&policy, &mut session);
                // Until the ACK: the first codec offered, no far end yet (the relay latches).
                let codec = policy.codecs.iter().copied().find(|c| *c != Codec::TelephoneEvent).unwrap_or(Codec::Pcmu);
                let mut media = LegMedia::new(codec, None);
                media.telephone_event = policy.codecs.contains(&Codec::TelephoneEvent).then_some(TELEPHONE_EVENT_PT);
                (ours.clone(), media, Some(ours))
            }
        };
        let parameters = CallParameters {
            from: self.facts.from.clone(),
            to: self.facts.to.clone(),
            trunk: trunk.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
            number: self.facts.to.clone(),
        };
        let answering = media.agent_answer;
        let mut config = BridgeConfig::new(url.clone(), &parameters);
        config.connect_timeout = media.agent_connect_timeout;
        config.latency = Some(media.bridge_latency.clone());
        config.tls = Some(media.agent_tls.clone());
        config.call_sid = self.facts.call_id.clone();
        // The caller may give up while the agent is being reached.
        let connection = tokio::select! {
            connected = bridge::connect(config) => connected,
            () = wait_for_cancel(a_rx) => {
                self.respond_a(487, "Request Terminated", None);
                return Outcome { code: 487, reason: "caller cancelled".into(), hangup_by: Ender::Caller, attempt: Some(record(None, None)) };
            }
        };
        let connection = match connection {
            Ok(connection) => connection,
            Err(error) => {
                return self.refuse_caller(503, format!("AI agent unreachable: {error}"), Some(record(None, None)));
            }
        };
        let (mut agent, relay, relay_events) = match connection
            .spawn(RtpLegSetup { ports: pair, media: leg_media }, RelayConfig { media_timeout: media.timeout })
        {
            Ok(started) => started,
            Err(error) => {
                return self.refuse_caller(503, format!("cannot start media: {error}"), Some(record(None, None)));
            }
        };

        // Answer the caller with the node's SDP.
        let contact = self.ctx.endpoint.contact_for(self.a_peer, "");
        let Some(a) = Dialog::as_uas(&self.invite, &self.a_tag, self.a_peer, contact.clone()) else {
            let _ = agent.hangup().await;
            return self.refuse_caller(500, "internal: inbound dialog unusable".into(), Some(record(None, None)));
        };
        let mut ok = response_to(&self.invite, 200, Some("OK"), Some(&self.a_tag));
        ok.headers.push(Header::Contact(headers::Contact::new(contact.clone())));
        ok.headers.push(Header::Allow(ALLOW.into()));
        let answer_sdp = answer.to_string().into_bytes();
        message::set_body(&mut ok.headers, &mut ok.body, answer_sdp.clone(), Some("application/sdp"));
        ok.headers.extend(super::session::answer_headers(&self.session_a));

        if answering.mode == AgentAnswer::FirstAudio {
            // Ring until the agent speaks (bounded): the 200 OK then goes out with its first
            // frame. The caller may send media from its offer on (RFC 3264 5.1), so nothing
            // is lost to the race between that frame and the 200 OK.
            // A caller that requires reliable provisional responses gets no 180 (this path takes
            // no PRACK; provisional responses are optional, an unreliable one is not allowed).
            if self.reliable.is_none() {
                let mut ringing = response_to(&self.invite, 180, Some("Ringing"), Some(&self.a_tag));
                ringing.headers.push(Header::Contact(headers::Contact::new(contact)));
                self.ctx.endpoint.respond(&self.key, ringing);
            }
            ring_at = Some(Utc::now());
            let deadline = tokio::time::sleep(answering.timeout);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    spoke = agent.first_audio() => {
                        if spoke {
                            break;
                        }
                        // The session ended before any audio (the agent closed or failed).
                        let end = agent.ended().await;
                        let reason = format!("AI agent left before answering: {}", end_reason(&end));
                        return self.refuse_caller(503, reason, Some(record(ring_at, None)));
                    }
                    () = &mut deadline => {
                        tracing::info!(waited = ?answering.timeout, "the agent sent no audio; answering anyway");
                        break;
                    }
                    event = a_rx.recv() => match event {
                        Some(TuEvent::Cancelled) | None => {
                            let _ = agent.hangup().await;
                            self.respond_a(487, "Request Terminated", None);
                            return Outcome { code: 487, reason: "caller cancelled".into(), hangup_by: Ender::Caller, attempt: Some(record(ring_at, None)) };
                        }
                        Some(_) => {}
                    },
                }
            }
        }

        self.ctx.endpoint.register_dialog(&a.call_id, &a.local_tag, self.a_tx.clone());
        let answered_at = Utc::now();
        self.answer_at = Some(answered_at);
        self.ctx.store.record(StoreEvent::CallAnswered { call_uuid: self.facts.call_uuid, at: answered_at });

        // Connected: the machine answers the caller, retransmits the 2xx until the ACK and
        // answers hold and resume here (the relay's leg follows).
        let endpoint = &self.ctx.endpoint;
        let a_leg = LegSetup {
            sent_by: endpoint.transport().sent_by(self.a_peer.addr),
            contact: endpoint.contact_for(self.a_peer, ""),
            dialog: a,
            session: Some(self.session_a),
        };
        let answer = Answer { key: self.key.clone(), response: ok, reliable: self.a_peer.protocol.is_reliable() };
        let answerer = LocalAnswerer { policy, session: &mut session, awaiting: awaiting_answer, relay: &relay };
        // The node's session refreshes toward the caller re-INVITE with the SDP it last sent
        // (RFC 4028 section 7.4): a caller need not allow UPDATE, and one that does not would
        // refuse an UPDATE refresh and lose the call at expiry.
        let mut answerer = Refreshable { inner: answerer, sent: answer_sdp.clone() };
        let setup = Setup {
            a: Some((a_leg, answer)),
            b: None,
            media: MediaMode::AnswerHere(&mut answerer),
            timers: self.ctx.timers,
            wait_for_bye: true,
            max_duration: None,
            session_policy: self.ctx.session_timers,
        };
        let (machine, first) = Connected::new(setup);
        // Connected: the transfer module runs the machine and carries out the API's transfer
        // requests meanwhile (the caller may leave the agent for a human).
        let call = AgentCall {
            ctx: &self.ctx,
            machine,
            first,
            leg: CallerLeg { leg: Leg::A, peer: self.a_peer, tx: self.a_tx.clone(), rx: a_rx },
            relay_events,
            agent: &mut agent,
            agent_reason: end_reason,
            relay: &relay,
            caller: CallerFacts {
                call_uuid: self.facts.call_uuid,
                call_sid: self.facts.call_id.clone(),
                from: self.facts.from.clone(),
                trunk: trunk.clone(),
                answer_sdp,
                did: self.facts.to.clone(),
                attempt: 1,
                deadline: None,
            },
        };
        // `agent.hangup()` below sends the agent its `stop` whatever ended the call.
        let AgentCallEnd { ending, dialog } = run_agent_call(call).await;
        let (end, bridge) = agent.hangup().await;
        let stats = relay.stop().await;
        self.ctx.metrics.srtp_rejected(&stats);
        tracing::info!(
            packets_in = stats.a.packets_in,
            packets_out = stats.a.packets_out,
            dropped_invalid = stats.a.dropped_invalid,
            dropped_source = stats.a.dropped_source,
            srtp_rejected = stats.a.srtp_rejected,
            ?bridge,
            end = %end.reason(),
            "agent call media"
        );
        if let Some((call_id, tag)) = dialog {
            self.ctx.endpoint.unregister_dialog(&call_id, &tag);
        }
        let attempt = Some(record(ring_at, Some(answered_at)));
        Outcome { code: ending.code, reason: ending.reason, hangup_by: ending.by, attempt }
    }
}

/// The CDR reason of a call the bridge ended.
fn end_reason(end: &BridgeEnd) -> String {
    match end {
        BridgeEnd::MediaEnded => "media relay stopped".into(),
        BridgeEnd::CallerHangup => "caller hung up".into(),
        other => format!("agent ended the call: {}", other.reason()),
    }
}

/// Resolves when the caller cancels (other events before the answer are ignored).
async fn wait_for_cancel(a_rx: &mut mpsc::UnboundedReceiver<TuEvent>) {
    loop {
        match a_rx.recv().await {
            Some(TuEvent::Cancelled) | None => return,
            _ => {}
        }
    }
}
