//! Media of calls placed through the API: the node offers its own address and a port pair from
//! its range (the trunk's codecs), and when the request names an AI agent the answered callee
//! is bridged to it exactly as an inbound caller would be (Twilio Media Streams; the callee's
//! leg is the relay's caller leg). Without an agent the port pair only keeps the offer honest
//! until the call ends.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_model::TrunkConfig;

use super::super::connected::{Leg, LocalAnswerer, LocalMedia, MediaMode};
use super::super::context::MediaContext;
use super::super::control::dtmf_info::InfoDtmf;
use super::super::dialog::Dialog;
use super::super::message::HangupReason;
use super::super::transfer::{AgentCall, AgentCallEnd, CallerFacts, CallerLeg, run_agent_call};
use super::connected::{CalleeLeg, callee_machine};
use super::{MAX_DURATION, NodeContext};
use crate::bridge::{self, BridgeConfig, BridgeEnd, CallParameters};
use crate::media::ports::{PortError, PortPair};
use crate::media::relay::{RelayConfig, RtpLegSetup};
use crate::media::sdp::{
    LocalEndpoint, MediaPolicy, NegotiatedMedia, SdpError, SdpSession, SessionDescription, create_offer, process_answer,
};
use crate::store::HangupBy;

/// The node's media end of one API call.
pub(super) struct ApiMedia {
    pair: Option<PortPair>,
    port: u16,
    address: IpAddr,
    session: SdpSession,
    offer: Option<SessionDescription>,
    codecs: Vec<switchboard_model::Codec>,
    /// SRTP towards the callee: the trunk's `media.srtp`.
    srtp: crate::media::srtp::SrtpPolicy,
    timeout: Duration,
    connect_timeout: Duration,
    latency: crate::bridge::BridgeLatency,
    tls: crate::bridge::AgentTls,
}

impl ApiMedia {
    /// Allocates the call's port pair.
    pub(super) fn new(media: &MediaContext) -> Result<ApiMedia, PortError> {
        let pair = media.ports.allocate()?;
        Ok(ApiMedia {
            port: pair.rtp_port(),
            pair: Some(pair),
            address: media.address,
            session: SdpSession::new(media.address),
            offer: None,
            codecs: vec![],
            srtp: crate::media::srtp::SrtpPolicy::Off,
            timeout: media.timeout,
            connect_timeout: media.agent_connect_timeout,
            latency: media.bridge_latency.clone(),
            tls: media.agent_tls.clone(),
        })
    }

    fn policy(&self) -> MediaPolicy {
        let mut policy =
            MediaPolicy::new(self.codecs.clone(), LocalEndpoint { address: self.address, rtp_port: self.port });
        policy.srtp = self.srtp;
        policy
    }

    /// The offer for an attempt through `trunk` (its codecs, the node's address and port).
    pub(super) fn offer(&mut self, trunk: &TrunkConfig) -> Vec<u8> {
        self.codecs = super::super::routing::codecs_of(Some(trunk));
        self.srtp = trunk.srtp.into();
        let offer = create_offer(&self.policy(), &mut self.session);
        let body = offer.to_string().into_bytes();
        self.offer = Some(offer);
        body
    }

    /// Reads the callee's answer to the current offer.
    pub(super) fn answered(&self, body: &[u8]) -> Result<NegotiatedMedia, SdpError> {
        let offer = self.offer.as_ref().ok_or(SdpError::NoAudio)?;
        process_answer(offer, &SessionDescription::parse_bytes(body)?)
    }
}

/// What the bridge needs besides the dialog.
pub(super) struct AgentTarget {
    pub url: String,
    /// The policy the connection must pass (an agent an API client named), else `None`.
    pub egress: Option<std::sync::Arc<switchboard_model::egress::EgressPolicy>>,
    pub parameters: CallParameters,
    pub call_sid: String,
    /// The callee as a transfer sees it (the party handed to a human); its `answer_sdp` is
    /// filled in here.
    pub transferable: CallerFacts,
}

/// Bridges the answered callee to the agent until one of them ends the call, the media goes
/// silent or the maximum duration passes; returns who ended it and why (for the CDR). The
/// call takes transfer requests meanwhile, like an inbound call to an agent: the callee is
/// then the party handed to the human (`sip::transfer`).
pub(super) async fn bridge_to_agent(
    ctx: &Arc<NodeContext>,
    leg: CalleeLeg<'_>,
    mut media: ApiMedia,
    negotiated: NegotiatedMedia,
    agent: AgentTarget,
) -> (HangupBy, String) {
    // Sends BYE with the Reason (RFC 3326) and returns the text for the CDR.
    let bye = |dialog: &Dialog, reason: HangupReason| {
        let mut dialog = dialog.clone();
        let request = dialog.bye(ctx.endpoint.via_for(dialog.peer), &[reason.header()]);
        ctx.endpoint.send_request(request, dialog.peer, leg.tx.clone());
        reason.text
    };
    let mut config = BridgeConfig::new(agent.url.clone(), &agent.parameters);
    config.egress = agent.egress.clone();
    config.connect_timeout = media.connect_timeout;
    config.latency = Some(media.latency.clone());
    config.tls = Some(media.tls.clone());
    config.call_sid = agent.call_sid;
    let connection = match bridge::connect(config).await {
        Ok(connection) => connection,
        Err(error) => {
            return (HangupBy::System, bye(leg.dialog, HangupReason::normal(format!("AI agent unreachable: {error}"))));
        }
    };
    let Some(pair) = media.pair.take() else {
        return (HangupBy::System, bye(leg.dialog, HangupReason::normal("internal: the call's RTP ports are gone")));
    };
    let (mut handle, relay, events) = match connection
        .spawn(RtpLegSetup { ports: pair, media: (&negotiated).into() }, RelayConfig { media_timeout: media.timeout })
    {
        Ok(started) => started,
        Err(error) => {
            return (HangupBy::System, bye(leg.dialog, HangupReason::normal(format!("cannot start media: {error}"))));
        }
    };
    let mut caller = agent.transferable;
    caller.answer_sdp = media.offer.as_ref().map(|o| o.to_string().into_bytes()).unwrap_or_default();
    caller.deadline = Some(tokio::time::Instant::now() + MAX_DURATION);
    // Hold and resume from the callee are answered here; the relay follows.
    let policy = media.policy();
    let answerer = LocalAnswerer { policy, session: &mut media.session, awaiting: None, relay: &relay };
    let mut answerer = Refreshable { inner: answerer, sent: leg.sdp.clone() };
    let agent_end: fn(&BridgeEnd) -> String = |end| format!("agent ended the call: {}", end.reason());
    let (machine, first) = callee_machine(ctx, leg.dialog, leg.session, MediaMode::AnswerHere(&mut answerer));
    let call = AgentCall {
        ctx,
        machine,
        first,
        leg: CallerLeg { leg: Leg::B, peer: leg.dialog.peer, tx: leg.tx.clone(), rx: leg.rx },
        relay_events: events,
        agent: &mut handle,
        agent_reason: agent_end,
        relay: &relay,
        caller,
    };
    let AgentCallEnd { ending, .. } = run_agent_call(call).await;
    drop(answerer);
    // `hangup()` sends the agent its `stop` whatever ended the call.
    let (_, stats) = handle.hangup().await;
    let relay_stats = relay.stop().await;
    ctx.metrics.srtp_rejected(&relay_stats);
    tracing::info!(
        callee_frames = stats.caller_frames,
        callee_packets_in = relay_stats.a.packets_in,
        callee_packets_out = relay_stats.a.packets_out,
        "API call bridged to the agent ended"
    );
    (HangupBy::from(ending.by), ending.reason)
}

/// The callee's media as the connected machine sees it: the agent bridge's [`LocalAnswerer`]
/// and the node's SDP last sent to the callee (its offer, then each answer), which the node's
/// session refreshes carry: a re-INVITE that changes nothing (RFC 4028 section 7.4), because
/// a callee need not allow UPDATE. The offer's version is left as it is: the same SDP again is
/// no change (RFC 3264 section 8).
struct Refreshable<L> {
    inner: L,
    sent: Vec<u8>,
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
