//! The WebSocket session with one agent: connect, the `connected`/`start` preamble, and the
//! task that moves audio, DTMF and marks both ways until either side ends.
//!
//! - this module: the configuration, connecting (`connected`/`start`), and the handles;
//! - `session`: the task that drives the call's audio once connected;
//! - `playback`: the agent's audio waiting to be played, paced one frame per tick.

mod playback;
mod session;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::{Sink as _, SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use self::session::Session;
use super::latency::BridgeLatency;
use super::protocol::{
    AgentMessage, DTMF_TRACK_INBOUND, DtmfInfo, Inbound, MarkInfo, MediaFormat, OutboundMessage, PROTOCOL, StartInfo,
    StopInfo, TRACK_INBOUND, VERSION, media_prefix, write_media,
};
use super::stream::StampedTcp;
use super::tls::AgentTls;
use crate::media::g711::ULAW_SILENCE;
use crate::media::mailbox::{MailboxReceiver, MailboxSender, mailbox};
use crate::media::relay::{
    BridgedLeg, CallerInput, LegStop, RelayConfig, RelayError, RelayEvent, RelayHandle, RtpLegSetup, start_bridged,
};

/// One frame of 8 kHz μ-law: 20 ms.
pub const FRAME_BYTES: usize = 160;
/// The duration of one frame.
pub const FRAME_DURATION: Duration = Duration::from_millis(20);
/// A tick later than this behind its schedule resynchronises the pacing instead of bursting
/// the backlog to the caller.
const MAX_CATCH_UP: Duration = Duration::from_millis(60);
/// How long a clean close waits for the agent's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

type Socket = WebSocketStream<MaybeTlsStream<StampedTcp>>;

/// The call facts an agent receives in `start.customParameters`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallParameters {
    /// The caller's number (E.164).
    pub from: String,
    /// The dialled number.
    pub to: String,
    /// The trunk the call came in on.
    pub trunk: String,
    /// The DID (phone number resource) that routed the call.
    pub number: String,
}

/// How to reach the agent and what to tell it.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// `ws://` or `wss://` URL of the agent.
    pub url: String,
    /// How long connecting (TCP, TLS, upgrade, preamble) may take.
    pub connect_timeout: Duration,
    /// `accountSid` in `start` and `stop`.
    pub account_sid: String,
    /// `callSid`.
    pub call_sid: String,
    /// `streamSid`.
    pub stream_sid: String,
    /// `start.customParameters`.
    pub custom_parameters: BTreeMap<String, String>,
    /// Agent messages longer than this are counted and ignored (64 KiB by default).
    pub max_message_bytes: usize,
    /// The most agent audio buffered for playback; beyond it frames are dropped and counted.
    pub max_playback: Duration,
    /// Where to record the delay the bridge adds to each frame (`None`: not measured).
    pub latency: Option<BridgeLatency>,
    /// Whom `wss://` trusts (`None`: the bundled web PKI roots only).
    pub tls: Option<AgentTls>,
    /// For an agent an API client named: the host is resolved once, only addresses this
    /// policy allows are connected to (`None`: the deployment's own configuration named it).
    pub egress: Option<std::sync::Arc<switchboard_model::egress::EgressPolicy>>,
}

impl BridgeConfig {
    /// A configuration with generated ids, the call's parameters and the defaults (5 s
    /// connect timeout, 64 KiB messages, 120 s of playback buffer).
    pub fn new(url: impl Into<String>, parameters: &CallParameters) -> BridgeConfig {
        let custom_parameters = BTreeMap::from([
            ("from".to_string(), parameters.from.clone()),
            ("to".to_string(), parameters.to.clone()),
            ("trunk".to_string(), parameters.trunk.clone()),
            ("number".to_string(), parameters.number.clone()),
        ]);
        BridgeConfig {
            url: url.into(),
            connect_timeout: Duration::from_secs(5),
            account_sid: new_sid("AC"),
            call_sid: new_sid("CA"),
            stream_sid: new_sid("MZ"),
            custom_parameters,
            max_message_bytes: 64 * 1024,
            max_playback: Duration::from_secs(120),
            latency: None,
            tls: None,
            egress: None,
        }
    }
}

/// A Twilio-style id: a two-letter prefix and 32 hex digits.
pub fn new_sid(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Not a ws:// or wss:// URL.
    #[error("the agent URL {0:?} is not a ws:// or wss:// URL")]
    InvalidUrl(String),
    /// The agent did not accept the WebSocket (and the preamble) in time.
    #[error("the agent did not connect within {0:?}")]
    ConnectTimeout(Duration),
    /// Connecting failed (refused, TLS, HTTP status, ...).
    #[error("cannot connect to the agent: {0}")]
    Connect(String),
    /// TLS could not be set up locally.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

/// How a bridge session ended: what the call writes into its CDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeEnd {
    /// The caller hung up; `stop` was sent and the socket closed.
    CallerHangup,
    /// The agent closed the WebSocket.
    AgentClosed {
        /// The close code, if the agent sent one.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// The connection failed (reset, protocol error, a message beyond the hard limit).
    AgentFailed(String),
    /// The relay side went away (the call's media ended).
    MediaEnded,
}

impl BridgeEnd {
    /// A short text for the CDR and the BYE's Reason header.
    pub fn reason(&self) -> String {
        match self {
            BridgeEnd::CallerHangup => "caller hung up".into(),
            BridgeEnd::AgentClosed { code, reason } => match code {
                Some(code) => format!("agent closed the WebSocket ({code} {reason})"),
                None => "agent closed the WebSocket".into(),
            },
            BridgeEnd::AgentFailed(error) => format!("agent connection failed: {error}"),
            BridgeEnd::MediaEnded => "media ended".into(),
        }
    }
}

/// Counters of one bridge session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Caller frames sent as `media`.
    pub caller_frames: u64,
    /// DTMF keys sent.
    pub dtmf_sent: u64,
    /// Agent `media` messages accepted.
    pub agent_media: u64,
    /// Agent frames handed to the relay (played).
    pub frames_played: u64,
    /// Agent frames dropped: playback buffer full, or the caller's leg already stopped.
    pub frames_dropped: u64,
    /// Marks echoed.
    pub marks: u64,
    /// `clear` messages.
    pub clears: u64,
    /// Frames discarded by `clear`.
    pub frames_cleared: u64,
    /// Messages that were not JSON of a known shape.
    pub invalid_json: u64,
    /// `media` whose payload was not base64.
    pub invalid_payload: u64,
    /// Messages larger than the limit.
    pub oversized: u64,
    /// Binary frames and unknown events.
    pub ignored: u64,
}

#[derive(Default)]
struct Counters {
    caller_frames: AtomicU64,
    dtmf_sent: AtomicU64,
    agent_media: AtomicU64,
    frames_played: AtomicU64,
    frames_dropped: AtomicU64,
    marks: AtomicU64,
    clears: AtomicU64,
    frames_cleared: AtomicU64,
    invalid_json: AtomicU64,
    invalid_payload: AtomicU64,
    oversized: AtomicU64,
    ignored: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> BridgeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BridgeStats {
            caller_frames: get(&self.caller_frames),
            dtmf_sent: get(&self.dtmf_sent),
            agent_media: get(&self.agent_media),
            frames_played: get(&self.frames_played),
            frames_dropped: get(&self.frames_dropped),
            marks: get(&self.marks),
            clears: get(&self.clears),
            frames_cleared: get(&self.frames_cleared),
            invalid_json: get(&self.invalid_json),
            invalid_payload: get(&self.invalid_payload),
            oversized: get(&self.oversized),
            ignored: get(&self.ignored),
        }
    }
}

/// An open session whose `connected` and `start` have been sent.
pub struct AgentConnection {
    socket: Socket,
    config: BridgeConfig,
    started: Instant,
    sequence: u64,
}

impl std::fmt::Debug for AgentConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConnection").field("stream_sid", &self.config.stream_sid).finish()
    }
}

/// Connects to the agent and sends `connected` and `start`, all within the configured timeout.
pub async fn connect(config: BridgeConfig) -> Result<AgentConnection, BridgeError> {
    let lower = config.url.to_ascii_lowercase();
    if !(lower.starts_with("ws://") || lower.starts_with("wss://")) {
        return Err(BridgeError::InvalidUrl(config.url.clone()));
    }
    let tls = match &config.tls {
        Some(tls) => tls.clone(),
        None => AgentTls::web_pki().map_err(|e| BridgeError::Tls(e.to_string()))?,
    };
    let connector = Connector::Rustls(tls.client_config());
    let hard_limit = (config.max_message_bytes.saturating_mul(16)).max(1 << 20);
    let ws_config = WebSocketConfig::default()
        // tungstenite zero-fills the whole read buffer on every read; agent messages are a few KiB.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 << 20)
        .max_message_size(Some(hard_limit))
        .max_frame_size(Some(hard_limit));
    let timeout = config.connect_timeout;
    let attempt = async {
        let request = config.url.as_str().into_client_request().map_err(|e| BridgeError::Connect(e.to_string()))?;
        let tcp = connect_tcp(request.uri(), config.egress.as_deref()).await.map_err(BridgeError::Connect)?;
        let tcp = StampedTcp::new(tcp).map_err(|e| BridgeError::Connect(e.to_string()))?;
        let (socket, _response) =
            tokio_tungstenite::client_async_tls_with_config(request, tcp, Some(ws_config), Some(connector))
                .await
                .map_err(|e| BridgeError::Connect(e.to_string()))?;
        let mut connection = AgentConnection { socket, config: config.clone(), started: Instant::now(), sequence: 0 };
        connection
            .send(&OutboundMessage::Connected { protocol: PROTOCOL.into(), version: VERSION.into() })
            .await
            .map_err(BridgeError::Connect)?;
        let start = OutboundMessage::Start {
            sequence_number: connection.next_sequence(),
            stream_sid: config.stream_sid.clone(),
            start: StartInfo {
                account_sid: config.account_sid.clone(),
                stream_sid: config.stream_sid.clone(),
                call_sid: config.call_sid.clone(),
                tracks: vec![TRACK_INBOUND.into()],
                custom_parameters: config.custom_parameters.clone(),
                media_format: MediaFormat::default(),
            },
        };
        connection.send(&start).await.map_err(BridgeError::Connect)?;
        connection.started = Instant::now();
        Ok(connection)
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| BridgeError::ConnectTimeout(timeout))?
}

/// The TCP connection to the agent's host (Nagle off: every frame goes out at once).
async fn connect_tcp(
    uri: &tokio_tungstenite::tungstenite::http::Uri,
    egress: Option<&switchboard_model::egress::EgressPolicy>,
) -> Result<TcpStream, String> {
    let host = uri.host().ok_or("the agent URL has no host")?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let secure = uri.scheme_str().is_some_and(|s| s.eq_ignore_ascii_case("wss"));
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = match egress {
        None => TcpStream::connect((host, port)).await.map_err(|e| format!("{host}:{port}: {e}"))?,
        Some(policy) => {
            // Resolved once; only the checked addresses are connected to, never the name again.
            let addrs = policy.resolve(host, port).await.map_err(|e| e.to_string())?;
            TcpStream::connect(addrs.as_slice()).await.map_err(|e| format!("{host}:{port}: {e}"))?
        }
    };
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(tcp)
}

impl AgentConnection {
    /// When the newest data read from the agent reached the host (the kernel's stamp).
    fn last_received(&self) -> Option<std::time::Instant> {
        match self.socket.get_ref() {
            MaybeTlsStream::Plain(tcp) => tcp.last_received(),
            MaybeTlsStream::Rustls(tls) => tls.get_ref().0.last_received(),
            _ => None,
        }
    }

    fn next_sequence(&mut self) -> String {
        self.sequence += 1;
        self.sequence.to_string()
    }

    async fn send(&mut self, message: &OutboundMessage) -> Result<(), String> {
        let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
        self.socket.send(Message::text(text)).await.map_err(|e| e.to_string())
    }

    /// The stream id sent in `start`.
    pub fn stream_sid(&self) -> &str {
        &self.config.stream_sid
    }

    /// Starts the bridged call: one task that owns both the caller's RTP leg (with everything
    /// the relay does for a leg: latching, rewriting, transcoding, DTMF, RTCP, media timeout)
    /// and the WebSocket. One task rather than a relay task and a session task joined by
    /// channels: each frame then costs one wakeup and no hand-over, in either direction.
    ///
    /// Returns the session's handle (dropping it ends the session), the caller leg's relay
    /// handle (re-INVITE updates, counters; stopping or dropping it ends the session as
    /// [`BridgeEnd::MediaEnded`]) and the leg's events. Must run inside a tokio runtime.
    pub fn spawn(
        self,
        caller: RtpLegSetup,
        config: RelayConfig,
    ) -> Result<(BridgeHandle, RelayHandle, mpsc::Receiver<RelayEvent>), RelayError> {
        let (leg, relay, events) = start_bridged(caller, config)?;
        let counters = Arc::new(Counters::default());
        let (control_tx, control_rx) = mailbox();
        let (first_audio_tx, first_audio_rx) = oneshot::channel();
        let session = Session::new(self, leg, Arc::clone(&counters), first_audio_tx);
        let task = tokio::spawn(session.run(control_rx));
        let handle = BridgeHandle {
            control: control_tx,
            counters,
            task: Some(task),
            end: None,
            first_audio: FirstAudio::Waiting(first_audio_rx),
        };
        Ok((handle, relay, events))
    }
}

enum Control {
    Hangup(oneshot::Sender<()>),
    /// A JSON event for the agent (a transfer's progress); `streamSid` and `sequenceNumber`
    /// are added by the session.
    Event(serde_json::Map<String, serde_json::Value>),
    /// Put another RTP leg where the caller's was (a warm transfer's consult leg, or the
    /// caller back); the previous leg's ports and media go to the sender.
    Swap(Box<BridgedLeg>, oneshot::Sender<Option<RtpLegSetup>>),
}

/// The call's hold on a running bridge session.
pub struct BridgeHandle {
    control: MailboxSender<Control>,
    counters: Arc<Counters>,
    task: Option<JoinHandle<BridgeEnd>>,
    end: Option<BridgeEnd>,
    first_audio: FirstAudio,
}

/// Whether the agent has sent audio yet, as the handle last saw it.
enum FirstAudio {
    Waiting(oneshot::Receiver<()>),
    Arrived,
    Never,
}

impl std::fmt::Debug for BridgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeHandle").field("end", &self.end).finish()
    }
}

impl BridgeHandle {
    /// The counters now.
    pub fn stats(&self) -> BridgeStats {
        self.counters.snapshot()
    }

    /// Resolves when the session ends by itself (the agent closed or failed, or the relay went
    /// away): the call then sends BYE with [`BridgeEnd::reason`]. Cancel-safe, so it can sit in
    /// a `select!` with the call's other events; after it resolved it resolves again at once.
    pub async fn ended(&mut self) -> BridgeEnd {
        if let Some(end) = &self.end {
            return end.clone();
        }
        let end = match self.task.as_mut() {
            Some(task) => match task.await {
                Ok(end) => end,
                Err(error) => BridgeEnd::AgentFailed(format!("bridge task failed: {error}")),
            },
            None => BridgeEnd::MediaEnded,
        };
        self.task = None;
        self.end = Some(end.clone());
        end
    }

    /// Resolves with `true` once the agent's first audio has been accepted for playback, or
    /// with `false` if the session ended before any: the call answers on it with
    /// `--agent-answer first-audio`. Cancel-safe; resolves again at once after it resolved.
    pub async fn first_audio(&mut self) -> bool {
        if let FirstAudio::Waiting(rx) = &mut self.first_audio {
            self.first_audio = if rx.await.is_ok() { FirstAudio::Arrived } else { FirstAudio::Never };
        }
        matches!(self.first_audio, FirstAudio::Arrived)
    }

    /// Sends the agent a JSON event of the node's own (`{"event": name, "streamSid": ..,
    /// "sequenceNumber": .., ...fields}`), e.g. `transfer_failed`; dropped when the session
    /// has ended.
    pub fn notify(&self, name: &str, fields: serde_json::Value) {
        let mut event = match fields {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        event.insert("event".into(), name.into());
        let _ = self.control.send(Control::Event(event));
    }

    /// Bridges the agent to another RTP leg from now on (a warm transfer: the human the agent
    /// briefs, then the caller again if the transfer is called off). Audio still queued for
    /// the previous leg is dropped. Returns the new leg's relay handle and events, and the
    /// previous leg's port pair (sockets inside) with its media.
    pub async fn swap_leg(
        &self,
        leg: RtpLegSetup,
        config: RelayConfig,
    ) -> Result<(RelayHandle, mpsc::Receiver<RelayEvent>, Option<RtpLegSetup>), RelayError> {
        let (bridged, relay, events) = start_bridged(leg, config)?;
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::Swap(Box::new(bridged), tx)).map_err(|_| RelayError::Stopped)?;
        let previous = rx.await.map_err(|_| RelayError::Stopped)?;
        Ok((relay, events, previous))
    }

    /// The caller hung up: sends `stop`, closes the socket cleanly (waiting up to a second for
    /// the agent's close), and returns how the session ended and its counters.
    pub async fn hangup(mut self) -> (BridgeEnd, BridgeStats) {
        let (tx, rx) = oneshot::channel();
        if self.end.is_none() && self.control.send(Control::Hangup(tx)).is_ok() {
            let _ = rx.await;
        }
        let end = self.ended().await;
        (end, self.stats())
    }
}

impl Drop for BridgeHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests;
