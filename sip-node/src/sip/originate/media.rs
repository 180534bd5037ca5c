//! Media of calls placed through the API: the node offers its own address and a port pair from
//! its range (the trunk's codecs), and when the request names an AI agent the answered callee
//! is bridged to it exactly as an inbound caller would be (Twilio Media Streams; the callee's
//! leg is the relay's caller leg). Without an agent the port pair only keeps the offer honest
//! until the call ends.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_model::TrunkConfig;

use super::super::connected::{Leg, LocalAnswerer, MediaMode, Refreshable};
use super::super::context::MediaContext;
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
