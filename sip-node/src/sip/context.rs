//! What every task of the node's signalling shares: the endpoint, configuration, limits,
//! store, metrics, resolver, digest challenger, media ports and drain state. It lives apart
//! from the call so that the modules the call builds on (INVITE client, registration, SMS,
//! API-placed calls) need not import the call: dependencies run one way.

use std::sync::Arc;
use std::time::Duration;

use super::digest::Challenger;
use super::endpoint::Endpoint;
use super::limits::Limits;
use super::resolve::Resolver;
use super::transaction::TimerConfig;
use crate::config::SnapshotHandle;
use crate::metrics::NodeMetrics;
use crate::store::Store;

/// What every call, registration, message and API-placed call needs from the node.
pub struct NodeContext {
    pub endpoint: Endpoint,
    pub snapshot: SnapshotHandle,
    pub limits: Limits,
    pub store: Store,
    pub metrics: NodeMetrics,
    pub resolver: Resolver,
    pub challenger: Challenger,
    /// Who may talk to the node and how much each source may hold.
    pub guard: Arc<super::guard::Guard>,
    pub node_id: String,
    pub timers: TimerConfig,
    /// For what is not buffered: inbound messages must be stored before they are accepted.
    pub pool: sqlx::PgPool,
    /// Client and key of the signed webhooks (message webhooks, call status callbacks).
    pub webhooks: (reqwest::Client, crate::webhook::Signer),
    /// Media anchoring for calls bridged to AI agents; `None` when RTP ports are unavailable.
    pub media: Option<MediaContext>,
    /// Final responses that end an outbound attempt without failover.
    pub final_codes: Vec<u16>,
    /// Whether the node is stopping: new calls are refused, calls in progress go on.
    pub drain: crate::drain::Drain,
    /// RFC 4028 session timers: the interval the node asks for and the smallest it accepts.
    pub session_timers: super::control::session_timer::TimerPolicy,
    /// The calls that take transfer requests from the API (`sip::transfer`).
    pub transfers: super::transfer::Transfers,
}

/// What the node needs to anchor a call's media.
#[derive(Clone)]
pub struct MediaContext {
    /// The media threads that relay anchored calls.
    pub engine: Arc<crate::media::engine::MediaEngine>,
    pub ports: crate::media::ports::PortAllocator,
    /// The address put into SDP (the advertised, reachable address).
    pub address: std::net::IpAddr,
    /// No RTP for this long ends the call.
    pub timeout: Duration,
    /// How long the agent may take to accept the WebSocket.
    pub agent_connect_timeout: Duration,
    /// When calls to AI agents are answered.
    pub agent_answer: crate::bridge::answer::AnswerPolicy,
    /// Where bridge sessions record the delay they add (the node's metric).
    pub bridge_latency: crate::bridge::BridgeLatency,
    /// Whom `wss://` agent connections trust.
    pub agent_tls: crate::bridge::AgentTls,
    /// What a caller on hold hears during a warm transfer (8 kHz μ-law); `None`: silence.
    pub hold_audio: Option<Arc<[u8]>>,
    /// Whether the caller of a blind transfer hears ringback (or the hold audio) while the
    /// target rings, instead of the agent.
    pub transfer_ringback: bool,
}

/// What trunk registration and gateway keepalives need: a narrow view of [`NodeContext`].
#[derive(Clone)]
pub struct RegistrationContext {
    pub endpoint: Endpoint,
    pub snapshot: SnapshotHandle,
    pub store: Store,
    pub metrics: NodeMetrics,
    pub resolver: Resolver,
    pub drain: crate::drain::Drain,
}

/// What sending and receiving messages (SMS) needs: a narrow view of [`NodeContext`].
#[derive(Clone)]
pub struct SmsContext {
    pub endpoint: Endpoint,
    pub snapshot: SnapshotHandle,
    pub resolver: Resolver,
    pub node_id: String,
    /// Counts MESSAGEs refused on a certificate-auth trunk (inbound mutual TLS).
    pub metrics: NodeMetrics,
}

impl NodeContext {
    /// The registration's view.
    pub fn registration(&self) -> RegistrationContext {
        RegistrationContext {
            endpoint: self.endpoint.clone(),
            snapshot: self.snapshot.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            resolver: self.resolver.clone(),
            drain: self.drain.clone(),
        }
    }

    /// The messages' view.
    pub fn sms(&self) -> SmsContext {
        SmsContext {
            endpoint: self.endpoint.clone(),
            snapshot: self.snapshot.clone(),
            resolver: self.resolver.clone(),
            node_id: self.node_id.clone(),
            metrics: self.metrics.clone(),
        }
    }
}
