//! The WebSocket session with one agent: connect, the `connected`/`start` preamble, and the
//! task that moves audio, DTMF and marks both ways until either side ends.

use std::collections::{BTreeMap, VecDeque};
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
    BridgedLeg, CallerInput, RelayConfig, RelayError, RelayEvent, RelayHandle, RtpLegSetup, start_bridged,
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
        let max_bytes =
            (self.config.max_playback.as_millis() / FRAME_DURATION.as_millis()).max(1) as usize * FRAME_BYTES;
        let plain = matches!(self.socket.get_ref(), MaybeTlsStream::Plain(_));
        let out = Out {
            prefix: media_prefix(&self.config.stream_sid),
            chunk: 0,
            unflushed: false,
            failed: None,
            plain,
            latency: self.config.latency.clone(),
            unflushed_since: None,
        };
        let session = Session {
            conn: self,
            leg: Some(leg),
            counters: Arc::clone(&counters),
            playback: Playback::new(max_bytes),
            out,
            last_played: None,
            first_audio: Some(first_audio_tx),
        };
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

/// Agent audio waiting to be played and the marks between it. The audio is one byte buffer:
/// base64 is decoded straight onto its end and frames are sent to the caller from it in
/// place. Marks are positions in the stream of audio bytes, echoed once the audio before them
/// has played.
struct Playback {
    audio: Vec<u8>,
    /// Where the unplayed audio starts in `audio`.
    head: usize,
    /// Bytes taken off the front (played or cleared) since the session started.
    consumed: u64,
    /// Marks and the value of `consumed` they wait for.
    marks: VecDeque<(u64, String)>,
    /// When the agent's audio arrived: the value of `consumed` at the end of each message's
    /// audio, and the message's arrival. A frame's arrival is that of the message completing it.
    arrivals: VecDeque<(u64, std::time::Instant)>,
    /// The most audio held; beyond it audio is dropped and counted.
    max_bytes: usize,
}

/// A playback buffer that grew this large (a burst of agent speech) is given back once empty.
const PLAYBACK_KEEP: usize = 16 * 1024;

impl Playback {
    fn new(max_bytes: usize) -> Playback {
        Playback {
            audio: Vec::new(),
            head: 0,
            consumed: 0,
            marks: VecDeque::new(),
            arrivals: VecDeque::new(),
            max_bytes,
        }
    }

    fn queued(&self) -> usize {
        self.audio.len() - self.head
    }

    /// Nothing to play and no mark to echo.
    fn is_idle(&self) -> bool {
        self.queued() == 0 && self.marks.is_empty()
    }

    /// Decodes base64 audio that arrived at `arrived` onto the end. `Ok`: the bytes decoded
    /// and the frames dropped for want of room; `Err`: not base64, nothing added.
    fn push_base64(
        &mut self,
        payload: &str,
        arrived: std::time::Instant,
    ) -> Result<(usize, u64), base64::DecodeSliceError> {
        // Amortised: the played part is moved out only once it is half the buffer.
        if self.head > 0 && self.head >= self.audio.len() / 2 {
            self.audio.drain(..self.head);
            self.head = 0;
        }
        let start = self.audio.len();
        self.audio.resize(start + base64::decoded_len_estimate(payload.len()), 0);
        match BASE64.decode_slice(payload.as_bytes(), &mut self.audio[start..]) {
            Ok(n) => {
                self.audio.truncate(start + n);
                let excess = self.queued().saturating_sub(self.max_bytes);
                self.audio.truncate(self.audio.len() - excess);
                if n > excess {
                    self.arrivals.push_back((self.consumed + self.queued() as u64, arrived));
                }
                Ok((n, excess.div_ceil(FRAME_BYTES) as u64))
            }
            Err(error) => {
                self.audio.truncate(start);
                Err(error)
            }
        }
    }

    /// A mark after the audio queued so far; an incomplete last frame is padded with silence
    /// so that the mark falls between frames.
    fn mark(&mut self, name: String) {
        let partial = self.queued() % FRAME_BYTES;
        if partial != 0 {
            self.audio.resize(self.audio.len() + FRAME_BYTES - partial, ULAW_SILENCE);
        }
        self.marks.push_back((self.consumed + self.queued() as u64, name));
    }

    /// The next mark whose audio has all been played.
    fn due_mark(&mut self) -> Option<String> {
        if self.marks.front().is_some_and(|(at, _)| *at <= self.consumed) {
            return self.marks.pop_front().map(|(_, name)| name);
        }
        None
    }

    /// The next frame to play and when the audio completing it arrived; the agent's audio
    /// ending mid-frame is padded with silence rather than held.
    fn next_frame(&mut self) -> Option<(&[u8], Option<std::time::Instant>)> {
        let queued = self.queued();
        if queued == 0 {
            return None;
        }
        let end = self.consumed + FRAME_BYTES as u64;
        // The message whose audio reaches the frame's end, or the last one (a padded tail).
        while self.arrivals.len() > 1 && self.arrivals.front().is_some_and(|(until, _)| *until < end) {
            self.arrivals.pop_front();
        }
        let arrived = self.arrivals.front().map(|(_, at)| *at);
        if queued < FRAME_BYTES {
            self.audio.resize(self.head + FRAME_BYTES, ULAW_SILENCE);
        }
        let start = self.head;
        self.head += FRAME_BYTES;
        self.consumed += FRAME_BYTES as u64;
        if self.head == self.audio.len() && self.audio.capacity() > PLAYBACK_KEEP {
            // The frame is copied out before the buffer goes: keep it in the tail of a new one.
            let frame = self.audio[start..].to_vec();
            self.audio = frame;
            self.head = FRAME_BYTES;
            return Some((&self.audio[..FRAME_BYTES], arrived));
        }
        Some((&self.audio[start..start + FRAME_BYTES], arrived))
    }

    /// Drops all queued audio; returns the whole frames dropped. Its marks become due.
    fn clear(&mut self) -> u64 {
        let queued = self.queued();
        self.consumed += queued as u64;
        self.arrivals.clear();
        self.audio.clear();
        self.head = 0;
        if self.audio.capacity() > PLAYBACK_KEEP {
            self.audio = Vec::new();
        }
        (queued / FRAME_BYTES) as u64
    }
}

/// The WebSocket writing state used while the caller's leg is polled.
struct Out {
    /// [`media_prefix`] of the stream.
    prefix: String,
    chunk: u64,
    /// A message is waiting in the WebSocket for the TCP socket to take it.
    unflushed: bool,
    /// A write failed: the session ends with it.
    failed: Option<String>,
    /// The WebSocket runs over plain TCP (not TLS).
    plain: bool,
    /// Where the delay added to caller frames is recorded.
    latency: Option<BridgeLatency>,
    /// When the caller frame still waiting for the TCP socket arrived.
    unflushed_since: Option<std::time::Instant>,
}

struct Session {
    conn: AgentConnection,
    /// The caller's RTP leg; `None` once the relay handle stopped it.
    leg: Option<BridgedLeg>,
    counters: Arc<Counters>,
    playback: Playback,
    out: Out,
    last_played: Option<Instant>,
    /// Fired at the first audio accepted from the agent.
    first_audio: Option<oneshot::Sender<()>>,
}

enum Wake {
    Agent(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    /// The relay handle stopped the caller's leg (with the acknowledgement to send) or was dropped.
    MediaStopped(Option<oneshot::Sender<()>>),
    Control(Option<Control>),
    Tick(Instant),
    WriteFailed(String),
}

impl Session {
    async fn run(mut self, mut control: MailboxReceiver<Control>) -> BridgeEnd {
        // Pacing: Burst keeps the frame clock locked to wall time, so small scheduling delays
        // are caught up (the caller's jitter buffer absorbs a frame or two early) instead of
        // accumulating as added latency the way Delay would; a tick more than MAX_CATCH_UP late
        // resets the clock instead of bursting seconds of audio. The interval is only polled
        // while audio is queued and restarts one frame after the last one played.
        let mut ticker = tokio::time::interval(FRAME_DURATION);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut playing = false;
        loop {
            let wake = std::future::poll_fn(|cx| self.poll_wake(cx, &mut control, &mut ticker, playing)).await;
            let result = match wake {
                Wake::Agent(None) => return BridgeEnd::AgentClosed { code: None, reason: "connection closed".into() },
                Wake::Agent(Some(Err(error))) => return BridgeEnd::AgentFailed(error.to_string()),
                Wake::Agent(Some(Ok(message))) => match self.on_agent_message(message) {
                    Ok(()) => self.flush_marks_if_idle().await,
                    Err(end) => return end,
                },
                Wake::MediaStopped(done) => {
                    // The ports go back before the stop is acknowledged.
                    self.leg = None;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    self.stop_and_close().await;
                    return BridgeEnd::MediaEnded;
                }
                Wake::Control(Some(Control::Hangup(done))) => {
                    self.stop_and_close().await;
                    let _ = done.send(());
                    return BridgeEnd::CallerHangup;
                }
                Wake::Control(None) => {
                    self.stop_and_close().await;
                    return BridgeEnd::CallerHangup;
                }
                Wake::WriteFailed(error) => return BridgeEnd::AgentFailed(error),
                Wake::Tick(scheduled) => {
                    if Instant::now().saturating_duration_since(scheduled) > MAX_CATCH_UP {
                        ticker.reset();
                    }
                    self.play_tick(Some(scheduled)).await
                }
            };
            if let Err(error) = result {
                return BridgeEnd::AgentFailed(error);
            }
            let mut has_work = !self.playback.is_idle();
            if has_work && !playing {
                // Start one frame after the last frame played, or now. "Now" plays at once
                // rather than at the next timer tick: tokio's timer rounds deadlines up to the
                // next millisecond, which would add up to 1 ms to every idle → speaking start.
                let now = Instant::now();
                match self.last_played.map(|t| t + FRAME_DURATION).filter(|due| *due > now) {
                    Some(due) => ticker.reset_at(due),
                    None => {
                        if let Err(error) = self.play_tick(None).await {
                            return BridgeEnd::AgentFailed(error);
                        }
                        has_work = !self.playback.is_idle();
                        // Only when there is more: resetting a timer costs, and an agent
                        // streaming in real time mostly sends one frame at a time.
                        if has_work {
                            ticker.reset_at(now + FRAME_DURATION);
                        }
                    }
                }
            }
            playing = has_work;
        }
    }

    /// Waits for the next thing to do. The caller's leg is served inside the poll: its frames
    /// and key presses are written to the WebSocket as they are read, in the same wakeup.
    fn poll_wake(
        &mut self,
        cx: &mut Context<'_>,
        control: &mut MailboxReceiver<Control>,
        ticker: &mut tokio::time::Interval,
        playing: bool,
    ) -> Poll<Wake> {
        if let Poll::Ready(c) = control.poll_recv(cx) {
            return Poll::Ready(Wake::Control(c));
        }
        let Session { conn, leg, counters, out, .. } = self;
        if let Some(leg) = leg {
            let polled = leg.poll(cx, &mut |cx, input| forward(conn, counters, out, cx, input));
            if let Some(error) = out.failed.take() {
                return Poll::Ready(Wake::WriteFailed(error));
            }
            if let Poll::Ready(done) = polled {
                return Poll::Ready(Wake::MediaStopped(done));
            }
        }
        if out.unflushed {
            match Pin::new(&mut conn.socket).poll_flush(cx) {
                Poll::Ready(Ok(())) => out.flushed(),
                Poll::Ready(Err(error)) => return Poll::Ready(Wake::WriteFailed(error.to_string())),
                Poll::Pending => {}
            }
        }
        if playing && let Poll::Ready(scheduled) = ticker.poll_tick(cx) {
            return Poll::Ready(Wake::Tick(scheduled));
        }
        if let Poll::Ready(message) = conn.socket.poll_next_unpin(cx) {
            return Poll::Ready(Wake::Agent(message));
        }
        Poll::Pending
    }

    fn on_agent_message(&mut self, message: Message) -> Result<(), BridgeEnd> {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let (code, reason) = match frame {
                    Some(frame) => (Some(u16::from(frame.code)), frame.reason.to_string()),
                    None => (None, String::new()),
                };
                return Err(BridgeEnd::AgentClosed { code, reason });
            }
            Message::Binary(_) => {
                bump(&self.counters.ignored, 1);
                return Ok(());
            }
            _ => return Ok(()), // ping/pong: tungstenite answers pings itself
        };
        if text.len() > self.conn.config.max_message_bytes {
            bump(&self.counters.oversized, 1);
            return Ok(());
        }
        let Ok(message) = AgentMessage::parse(text.as_str()) else {
            bump(&self.counters.invalid_json, 1);
            return Ok(());
        };
        match message {
            Inbound::Media(payload) => match self
                .playback
                .push_base64(&payload, self.conn.last_received().unwrap_or_else(std::time::Instant::now))
            {
                Ok((decoded, dropped)) => {
                    bump(&self.counters.agent_media, 1);
                    bump(&self.counters.frames_dropped, dropped);
                    if decoded > 0
                        && let Some(first) = self.first_audio.take()
                    {
                        let _ = first.send(());
                    }
                }
                Err(_) => bump(&self.counters.invalid_payload, 1),
            },
            Inbound::Mark(name) => self.playback.mark(name),
            Inbound::Clear => {
                bump(&self.counters.clears, 1);
                // Marks of the dropped audio are echoed at once, as Twilio does.
                bump(&self.counters.frames_cleared, self.playback.clear());
                self.last_played = None;
            }
            Inbound::Other => bump(&self.counters.ignored, 1),
        }
        Ok(())
    }

    /// Marks whose audio has played, arriving after the last frame finished playing, are
    /// echoed without waiting for a tick.
    async fn flush_marks_if_idle(&mut self) -> Result<(), String> {
        if self.last_played.is_none_or(|t| t.elapsed() >= FRAME_DURATION) {
            self.echo_due_marks().await?;
        }
        Ok(())
    }

    async fn echo_due_marks(&mut self) -> Result<(), String> {
        while let Some(name) = self.playback.due_mark() {
            let message = OutboundMessage::Mark {
                sequence_number: self.conn.next_sequence(),
                stream_sid: self.conn.config.stream_sid.clone(),
                mark: MarkInfo { name },
            };
            self.conn.send(&message).await?;
            bump(&self.counters.marks, 1);
        }
        Ok(())
    }

    /// One tick (`due`: when the pacing said it was the next frame's turn; `None`: playing
    /// at once after silence): marks whose audio has played are echoed, then the next frame is
    /// played.
    async fn play_tick(&mut self, due: Option<Instant>) -> Result<(), String> {
        self.echo_due_marks().await?;
        if let Some((frame, arrived)) = self.playback.next_frame() {
            self.last_played = Some(Instant::now());
            match self.leg.as_mut() {
                Some(leg) => {
                    if leg.play(frame)
                        && let Some(latency) = &self.out.latency
                    {
                        // The frame's turn: its arrival, or its pacing slot if it waited for one.
                        let ready = arrived.max(due.map(Instant::into_std)).unwrap_or_else(std::time::Instant::now);
                        latency.agent_frame_sent(ready);
                    }
                    bump(&self.counters.frames_played, 1);
                }
                None => bump(&self.counters.frames_dropped, 1),
            }
        }
        Ok(())
    }

    /// `stop`, then a close handshake bounded by [`CLOSE_WAIT`].
    async fn stop_and_close(&mut self) {
        let stop = OutboundMessage::Stop {
            sequence_number: self.conn.next_sequence(),
            stream_sid: self.conn.config.stream_sid.clone(),
            stop: StopInfo {
                account_sid: self.conn.config.account_sid.clone(),
                call_sid: self.conn.config.call_sid.clone(),
            },
        };
        let socket = &mut self.conn.socket;
        let close = async {
            let text = serde_json::to_string(&stop).unwrap_or_default();
            if socket.send(Message::text(text)).await.is_err() {
                return;
            }
            if socket.close(None).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = socket.next().await {}
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
    }
}

/// Writes a caller frame or key press to the WebSocket, from inside the leg's poll; returns
/// whether it was taken. A frame is taken only if the previous message has left: one waiting
/// for the TCP socket is all the bridge holds, a later frame is dropped (and counted by the
/// leg) rather than queued behind a slow agent. A key press is always queued: it is rare and
/// must not be lost.
fn forward(
    conn: &mut AgentConnection,
    counters: &Counters,
    out: &mut Out,
    cx: &mut Context<'_>,
    input: CallerInput<'_>,
) -> bool {
    if out.failed.is_some() {
        return false;
    }
    let sent = match input {
        CallerInput::Audio(frame, at) => match Pin::new(&mut conn.socket).poll_ready(cx) {
            Poll::Pending => return false,
            Poll::Ready(Err(error)) => Err(error),
            Poll::Ready(Ok(())) => {
                conn.sequence += 1;
                out.chunk += 1;
                let elapsed = conn.started.elapsed().as_millis() as u64;
                let mut text = String::new();
                write_media(&mut text, &out.prefix, conn.sequence, out.chunk, elapsed, frame);
                // Its delay is recorded once the message has left (below, or at a later flush).
                out.unflushed_since = at;
                Pin::new(&mut conn.socket).start_send(Message::text(text)).map(|()| &counters.caller_frames)
            }
        },
        CallerInput::Key(key) => {
            let message = OutboundMessage::Dtmf {
                stream_sid: conn.config.stream_sid.clone(),
                sequence_number: conn.next_sequence(),
                dtmf: DtmfInfo { track: DTMF_TRACK_INBOUND.into(), digit: key.to_string() },
            };
            let text = serde_json::to_string(&message).unwrap_or_default();
            Pin::new(&mut conn.socket).start_send(Message::text(text)).map(|()| &counters.dtmf_sent)
        }
    };
    match sent {
        Ok(counter) => bump(counter, 1),
        Err(error) => {
            out.failed = Some(error.to_string());
            return false;
        }
    }
    // Plain TCP: the WebSocket wrote the message out in start_send (its write buffer size is
    // 0), so poll_ready is `Ready` without registering a waker unless the socket did not take
    // it all, and then flushes (registering the waker for when the socket drains). poll_flush
    // would register a waker for every frame. TLS may keep records back after a write that
    // was accepted: those need the flush.
    let socket = Pin::new(&mut conn.socket);
    let flushed = if out.plain { socket.poll_ready(cx) } else { socket.poll_flush(cx) };
    match flushed {
        Poll::Ready(Ok(())) => out.flushed(),
        Poll::Ready(Err(error)) => out.failed = Some(error.to_string()),
        Poll::Pending => out.unflushed = true,
    }
    true
}

impl Out {
    /// The last message has left for the TCP socket: its frame's delay is recorded.
    fn flushed(&mut self) {
        self.unflushed = false;
        if let (Some(latency), Some(received)) = (&self.latency, self.unflushed_since.take()) {
            latency.caller_frame_sent(received);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use switchboard_model::Codec;
    use tokio::net::{TcpListener, UdpSocket};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    use super::*;
    use crate::media::g711;
    use crate::media::ports::{PortAllocator, PortRange};
    use crate::media::relay::{LegId, LegMedia};
    use crate::media::rtp::{RtpHeader, RtpPacket, TelephoneEvent};

    type ServerSocket = WebSocketStream<TcpStream>;

    /// A test agent: accepts one WebSocket on loopback.
    async fn agent() -> (String, tokio::task::JoinHandle<ServerSocket>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/agent", listener.local_addr().unwrap());
        let accept = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio_tungstenite::accept_async(stream).await.unwrap()
        });
        (url, accept)
    }

    async fn next_json(ws: &mut ServerSocket) -> serde_json::Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(3), ws.next()).await.expect("timed out");
            match message.expect("closed").expect("error") {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Close(_) => panic!("closed"),
                _ => continue,
            }
        }
    }

    async fn send_json(ws: &mut ServerSocket, value: serde_json::Value) {
        ws.send(Message::text(value.to_string())).await.unwrap();
    }

    struct Harness {
        handle: BridgeHandle,
        relay: RelayHandle,
        events: mpsc::Receiver<RelayEvent>,
        server: ServerSocket,
        /// The caller's RTP socket, and the node's port it sends to.
        caller: UdpSocket,
        node: SocketAddr,
        allocator: PortAllocator,
        stream_sid: String,
        sent: u16,
        latency: BridgeLatency,
    }

    impl Harness {
        /// Sends one RTP packet from the caller.
        async fn send_rtp(&mut self, payload_type: u8, payload: &[u8]) {
            self.sent += 1;
            let mut packet = vec![];
            let header = RtpHeader {
                marker: false,
                payload_type,
                sequence: self.sent,
                timestamp: 160 * self.sent as u32,
                ssrc: 7,
            };
            header.write(payload, &mut packet);
            self.caller.send_to(&packet, self.node).await.unwrap();
        }

        /// The next RTP packet the caller receives.
        async fn caller_packet(&self) -> Vec<u8> {
            let mut buf = vec![0u8; 2048];
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(2), self.caller.recv_from(&mut buf)).await.unwrap().unwrap();
            assert_eq!(from, self.node, "symmetric RTP");
            buf.truncate(len);
            buf
        }

        /// The payload of the next agent frame the caller hears.
        async fn agent_frame(&self) -> Vec<u8> {
            RtpPacket::parse(&self.caller_packet().await).unwrap().payload.to_vec()
        }

        /// The agent frames the caller has received so far, without waiting.
        fn frames_waiting(&self) -> usize {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            while self.caller.try_recv_from(&mut buf).is_ok() {
                n += 1;
            }
            n
        }
    }

    async fn harness(port_base: u16) -> Harness {
        harness_with(port_base, Codec::Pcmu).await
    }

    async fn harness_with(port_base: u16, codec: Codec) -> Harness {
        let (url, accept) = agent().await;
        let params = CallParameters {
            from: "+15550001111".into(),
            to: "+15550002222".into(),
            trunk: "main".into(),
            number: "support-line".into(),
        };
        let mut config = BridgeConfig::new(url, &params);
        let latency = BridgeLatency::new();
        config.latency = Some(latency.clone());
        let connection = connect(config.clone()).await.unwrap();
        let mut server = accept.await.unwrap();
        let connected = next_json(&mut server).await;
        assert_eq!(connected, serde_json::json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
        let start = next_json(&mut server).await;
        assert_eq!(start["event"], "start");
        assert_eq!(start["sequenceNumber"], "1");
        assert_eq!(start["streamSid"], config.stream_sid.as_str());
        assert_eq!(start["start"]["callSid"], config.call_sid.as_str());
        assert_eq!(start["start"]["accountSid"], config.account_sid.as_str());
        assert_eq!(start["start"]["tracks"], serde_json::json!(["inbound"]));
        assert_eq!(
            start["start"]["mediaFormat"],
            serde_json::json!({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1})
        );
        assert_eq!(
            start["start"]["customParameters"],
            serde_json::json!({"from": "+15550001111", "to": "+15550002222", "trunk": "main", "number": "support-line"})
        );
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let allocator = PortAllocator::new(localhost, PortRange { min: port_base, max: port_base + 9 }).unwrap();
        let caller = UdpSocket::bind((localhost, 0)).await.unwrap();
        let ports = allocator.allocate().unwrap();
        let node = SocketAddr::new(localhost, ports.rtp_port());
        let mut media = LegMedia::new(codec, Some(caller.local_addr().unwrap()));
        media.telephone_event = Some(101);
        let stream_sid = connection.stream_sid().to_string();
        let (handle, relay, events) = connection.spawn(RtpLegSetup { ports, media }, RelayConfig::default()).unwrap();
        Harness { handle, relay, events, server, caller, node, allocator, stream_sid, sent: 0, latency }
    }

    fn media(bytes: &[u8]) -> serde_json::Value {
        serde_json::json!({"event": "media", "streamSid": "MZx", "media": {"payload": BASE64.encode(bytes)}})
    }

    #[tokio::test]
    async fn caller_audio_and_dtmf_reach_the_agent_in_order() {
        let mut h = harness(42300).await;
        for i in 0..5u8 {
            h.send_rtp(0, &[i; FRAME_BYTES]).await;
            let message = next_json(&mut h.server).await;
            assert_eq!(message["event"], "media");
            assert_eq!(message["sequenceNumber"], (i as u64 + 2).to_string());
            assert_eq!(message["streamSid"], h.stream_sid.as_str());
            assert_eq!(message["media"]["track"], "inbound");
            assert_eq!(message["media"]["chunk"], (i as u64 + 1).to_string());
            assert!(message["media"]["timestamp"].as_str().unwrap().parse::<u64>().is_ok());
            let payload = BASE64.decode(message["media"]["payload"].as_str().unwrap()).unwrap();
            assert_eq!(payload, vec![i; FRAME_BYTES]);
        }
        // Each frame's delay was recorded (the key press below is not audio).
        assert_eq!(h.latency.caller_to_agent().summary().count, 5);
        let end = TelephoneEvent { event: 5, end: true, volume: 10, duration: 400 }.to_bytes();
        h.send_rtp(101, &end).await;
        let message = next_json(&mut h.server).await;
        assert_eq!(message["event"], "dtmf");
        assert_eq!(message["dtmf"], serde_json::json!({"track": "inbound_track", "digit": "5"}));
        assert_eq!(message["sequenceNumber"], "7");
        // Caller hangs up: stop, then a clean close.
        let hangup = tokio::spawn(h.handle.hangup());
        let stop = next_json(&mut h.server).await;
        assert_eq!(stop["event"], "stop");
        assert_eq!(stop["sequenceNumber"], "8");
        assert!(stop["stop"]["callSid"].as_str().unwrap().starts_with("CA"));
        let closing = tokio::time::timeout(Duration::from_secs(2), h.server.next()).await.unwrap();
        assert!(matches!(closing, Some(Ok(Message::Close(_)))));
        let (end, stats) = hangup.await.unwrap();
        assert_eq!(end, BridgeEnd::CallerHangup);
        assert_eq!(stats.caller_frames, 5);
        assert_eq!(stats.dtmf_sent, 1);
        // The session owned the caller's leg: its ports are back.
        assert_eq!(h.allocator.in_use(), 0);
        assert!(h.relay.is_finished());
        assert_eq!(h.relay.stats().a.packets_in, 6);
    }

    #[tokio::test]
    async fn agent_audio_is_paced_and_marks_follow_their_audio() {
        let mut h = harness(42310).await;
        // 10 frames in one message plus a partial 80 bytes, then a mark.
        let mut audio: Vec<u8> = (0..10u8).flat_map(|i| vec![i; FRAME_BYTES]).collect();
        audio.extend_from_slice(&[0xAA; 80]);
        send_json(&mut h.server, media(&audio)).await;
        send_json(&mut h.server, serde_json::json!({"event": "mark", "streamSid": "MZx", "mark": {"name": "end"}}))
            .await;
        let started = std::time::Instant::now();
        let mut arrivals = vec![];
        for i in 0..11u8 {
            let frame = h.agent_frame().await;
            arrivals.push(started.elapsed());
            assert_eq!(frame.len(), FRAME_BYTES);
            if i < 10 {
                assert_eq!(&frame[..], &vec![i; FRAME_BYTES][..]);
            } else {
                assert_eq!(&frame[..80], &[0xAA; 80][..]);
                assert_eq!(&frame[80..], &[ULAW_SILENCE; 80][..], "the tail is padded with silence");
            }
        }
        let elapsed = *arrivals.last().unwrap();
        assert!(elapsed >= Duration::from_millis(180), "11 frames took {elapsed:?}");
        // The mark comes back after the last frame has played.
        let mark = next_json(&mut h.server).await;
        assert_eq!(mark["event"], "mark");
        assert_eq!(mark["mark"]["name"], "end");
        assert!(started.elapsed() >= elapsed + Duration::from_millis(10), "the mark waited for its audio");
        let stats = h.handle.stats();
        assert_eq!(stats.frames_played, 11);
        assert_eq!(stats.marks, 1);
        // Each frame's delay was recorded from its turn in the pacing, not from the arrival of
        // the message that brought all eleven (the last waited 200 ms for its turn).
        let delay = h.latency.agent_to_caller().summary();
        assert_eq!(delay.count, 11);
        assert!(delay.p99 < 0.1, "the pacing was counted as delay: {delay:?}");
        // A mark with nothing queued comes back at once.
        tokio::time::sleep(Duration::from_millis(30)).await;
        send_json(&mut h.server, serde_json::json!({"event": "mark", "mark": {"name": "idle"}})).await;
        assert_eq!(next_json(&mut h.server).await["mark"]["name"], "idle");
    }

    #[tokio::test]
    async fn clear_drops_the_queue_at_once() {
        let mut h = harness(42320).await;
        let audio = vec![0x11; FRAME_BYTES * 100]; // two seconds
        send_json(&mut h.server, media(&audio)).await;
        send_json(&mut h.server, serde_json::json!({"event": "mark", "mark": {"name": "after-speech"}})).await;
        for _ in 0..3 {
            h.agent_frame().await;
        }
        send_json(&mut h.server, serde_json::json!({"event": "clear", "streamSid": "MZx"})).await;
        // The pending mark is returned right away.
        let mark = next_json(&mut h.server).await;
        assert_eq!(mark["mark"]["name"], "after-speech");
        // At most a frame already on its way; then nothing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = h.frames_waiting();
        assert!(after <= 2, "{after} frames after clear");
        let stats = h.handle.stats();
        assert_eq!(stats.clears, 1);
        assert!(stats.frames_cleared >= 90, "{stats:?}");
        // New audio after clear plays again.
        send_json(&mut h.server, media(&[0x22; FRAME_BYTES])).await;
        let frame = h.agent_frame().await;
        assert_eq!(&frame[..], &[0x22; FRAME_BYTES][..]);
    }

    #[tokio::test]
    async fn bad_agent_messages_are_counted_and_ignored() {
        let mut h = harness(42330).await;
        h.server.send(Message::text("{not json")).await.unwrap();
        send_json(&mut h.server, serde_json::json!({"event": "media", "media": {"payload": "%%%not base64"}})).await;
        send_json(&mut h.server, serde_json::json!({"event": "media"})).await;
        let big = "A".repeat(70 * 1024);
        send_json(&mut h.server, serde_json::json!({"event": "media", "media": {"payload": big}})).await;
        h.server.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        send_json(&mut h.server, serde_json::json!({"event": "dance"})).await;
        // Still alive: audio plays and marks come back.
        send_json(&mut h.server, media(&[0x33; FRAME_BYTES])).await;
        let frame = h.agent_frame().await;
        assert_eq!(&frame[..], &[0x33; FRAME_BYTES][..]);
        let stats = h.handle.stats();
        assert_eq!(stats.invalid_json, 2);
        assert_eq!(stats.invalid_payload, 1);
        assert_eq!(stats.oversized, 1);
        assert_eq!(stats.ignored, 2);
        assert_eq!(stats.agent_media, 1);
    }

    #[tokio::test]
    async fn agent_disconnect_ends_the_session_with_its_reason() {
        let mut h = harness(42340).await;
        h.server.close(Some(CloseFrame { code: CloseCode::Normal, reason: "conversation over".into() })).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(2), h.handle.ended()).await.unwrap();
        assert_eq!(end, BridgeEnd::AgentClosed { code: Some(1000), reason: "conversation over".into() });
        assert!(end.reason().contains("conversation over"));
        // Asking again is immediate.
        assert_eq!(h.handle.ended().await, end);
        assert_eq!(h.allocator.in_use(), 0, "the caller's ports are released");
    }

    #[tokio::test]
    async fn agent_dropping_the_tcp_connection_ends_the_session() {
        let mut h = harness(42350).await;
        drop(h.server);
        let end = tokio::time::timeout(Duration::from_secs(2), h.handle.ended()).await.unwrap();
        assert!(matches!(end, BridgeEnd::AgentClosed { .. } | BridgeEnd::AgentFailed(_)), "{end:?}");
    }

    #[tokio::test]
    async fn pcma_caller_is_transcoded_both_ways_and_its_stream_is_continuous() {
        let mut h = harness_with(42360, Codec::Pcma).await;
        // Caller (A-law) → agent (μ-law).
        h.send_rtp(8, &[0xD5; FRAME_BYTES]).await;
        let message = next_json(&mut h.server).await;
        let payload = BASE64.decode(message["media"]["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload, vec![g711::alaw_to_ulaw(0xD5); FRAME_BYTES]);
        let latched = tokio::time::timeout(Duration::from_secs(2), h.events.recv()).await.unwrap().unwrap();
        assert_eq!(latched, RelayEvent::Latched { leg: LegId::A, source: h.caller.local_addr().unwrap() });
        // Agent (μ-law) → caller (A-law), consecutive sequence numbers and timestamps.
        send_json(&mut h.server, media(&[0xFF; FRAME_BYTES * 3])).await;
        let mut last: Option<(u16, u32)> = None;
        for i in 0..3 {
            let packet = h.caller_packet().await;
            let p = RtpPacket::parse(&packet).unwrap();
            assert_eq!(p.payload_type, 8);
            assert_eq!(p.payload, &[g711::ulaw_to_alaw(0xFF); FRAME_BYTES]);
            if let Some((seq, ts)) = last {
                assert_eq!(p.sequence, seq.wrapping_add(1));
                assert_eq!(p.timestamp, ts.wrapping_add(160), "frame {i}");
            }
            last = Some((p.sequence, p.timestamp));
        }
        // DTMF: an event to the call and a `dtmf` message to the agent.
        let end = TelephoneEvent { event: 11, end: true, volume: 10, duration: 400 }.to_bytes();
        h.send_rtp(101, &end).await;
        assert_eq!(next_json(&mut h.server).await["dtmf"]["digit"], "#");
        let key = tokio::time::timeout(Duration::from_secs(2), h.events.recv()).await.unwrap().unwrap();
        assert!(matches!(key, RelayEvent::Dtmf { leg: LegId::A, digit } if digit.digit == Some('#')));
        // Garbage from the caller is counted, not forwarded.
        h.caller.send_to(b"junk", h.node).await.unwrap();
        h.send_rtp(0, &[0x44; FRAME_BYTES]).await; // not the negotiated payload type
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = h.relay.stats();
        assert_eq!(stats.a.dropped_invalid, 1);
        assert_eq!(stats.a.dropped_other, 1);
        assert_eq!(stats.a.packets_out, 3);
        assert_eq!(stats.b.packets_in, 3);
        assert_eq!(h.handle.stats().caller_frames, 1);
        assert!(matches!(
            h.relay.update_leg(LegId::B, LegMedia::new(Codec::Pcmu, None)),
            Err(RelayError::NoSuchLeg(_))
        ));
    }

    #[tokio::test]
    async fn an_agent_that_stops_reading_loses_caller_frames_instead_of_queueing_them() {
        let mut h = harness(42400).await;
        // The agent reads nothing from here on: the TCP buffers fill, then the bridge may hold
        // one message for the socket and must drop the frames after it.
        let mut sent = 0u32;
        while h.relay.stats().a.dropped_other == 0 {
            assert!(sent < 200_000, "no frame was ever dropped: the bridge is queueing");
            for _ in 0..200 {
                h.send_rtp(0, &[0x77; FRAME_BYTES]).await;
            }
            sent += 200;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let relay = h.relay.stats();
        let bridge = h.handle.stats();
        // Every caller frame the leg accepted was either written or dropped, none is waiting.
        assert_eq!(bridge.caller_frames + relay.a.dropped_other, relay.a.packets_in);
        // The agent reads again: it gets exactly the frames that were written, then new ones.
        let mut media = 0;
        while media < bridge.caller_frames {
            assert_eq!(next_json(&mut h.server).await["event"], "media");
            media += 1;
        }
        h.send_rtp(0, &[0x78; FRAME_BYTES]).await;
        let message = next_json(&mut h.server).await;
        let payload = BASE64.decode(message["media"]["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload, vec![0x78; FRAME_BYTES], "nothing older was queued behind the socket");
    }

    #[tokio::test]
    async fn hold_stops_agent_audio_to_the_caller() {
        let mut h = harness(42370).await;
        let mut held = LegMedia::new(Codec::Pcmu, Some(h.caller.local_addr().unwrap()));
        held.direction = crate::media::sdp::MediaDirection::RecvOnly;
        h.relay.update_leg(LegId::A, held).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        send_json(&mut h.server, media(&[0x55; FRAME_BYTES])).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(h.frames_waiting(), 0);
        assert_eq!(h.relay.stats().b.dropped_other, 1);
        // The caller still reaches the agent.
        h.send_rtp(0, &[0x66; FRAME_BYTES]).await;
        assert_eq!(next_json(&mut h.server).await["event"], "media");
    }

    #[tokio::test]
    async fn stopping_the_relay_releases_the_ports_and_ends_the_session() {
        let mut h = harness(42380).await;
        let stats = h.relay.stop().await;
        assert_eq!(stats.a.packets_in, 0);
        assert_eq!(h.allocator.in_use(), 0, "released before the stop returns");
        assert_eq!(next_json(&mut h.server).await["event"], "stop");
        let end = tokio::time::timeout(Duration::from_secs(3), h.handle.ended()).await.unwrap();
        assert_eq!(end, BridgeEnd::MediaEnded);
    }

    #[tokio::test]
    async fn dropping_the_bridge_handle_releases_the_ports() {
        let h = harness(42390).await;
        drop(h.handle);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(h.allocator.in_use(), 0);
        assert!(h.relay.is_finished());
    }

    /// An agent URL with an IPv6 literal (`ws://[::1]:port/`) is reached, and the session's
    /// preamble arrives. A host without an IPv6 loopback fails it (it used to pass without
    /// having run).
    #[tokio::test]
    async fn an_agent_at_an_ipv6_literal_is_reached() {
        let listener =
            TcpListener::bind("[::1]:0").await.expect("this test needs the IPv6 loopback [::1] (enable IPv6 on lo)");
        let url = format!("ws://{}/agent", listener.local_addr().unwrap());
        assert!(url.starts_with("ws://[::1]:"), "{url}");
        let accept = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio_tungstenite::accept_async(stream).await.unwrap()
        });
        let connection = connect(BridgeConfig::new(url, &CallParameters::default())).await.unwrap();
        let mut server = accept.await.unwrap();
        assert_eq!(next_json(&mut server).await["event"], "connected");
        assert_eq!(next_json(&mut server).await["event"], "start");
        drop(connection);
    }

    /// An agent an API client named passes the egress policy at connect time: a loopback agent
    /// is refused without an allow-list (nothing connects), reached with one; `localhost`,
    /// which resolves to loopback, is refused by name.
    #[tokio::test]
    async fn an_api_clients_agent_must_pass_the_egress_policy() {
        use switchboard_model::egress::EgressPolicy;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for url in [format!("ws://127.0.0.1:{port}/agent"), format!("ws://localhost:{port}/agent")] {
            let mut config = BridgeConfig::new(url.clone(), &CallParameters::default());
            config.egress = Some(std::sync::Arc::new(EgressPolicy::default()));
            let error = connect(config).await.expect_err("refused");
            assert!(error.to_string().contains("SWITCHBOARD_EGRESS_ALLOW"), "{url}: {error}");
        }
        let nothing = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(nothing.is_err(), "a refused agent was connected to");
        let accept = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio_tungstenite::accept_async(stream).await.unwrap()
        });
        let mut config = BridgeConfig::new(format!("ws://127.0.0.1:{port}/agent"), &CallParameters::default());
        config.egress = Some(std::sync::Arc::new(EgressPolicy::parse(&["127.0.0.1"]).unwrap()));
        let connection = connect(config).await.expect("an allow-listed agent is reached");
        let mut server = accept.await.unwrap();
        assert_eq!(next_json(&mut server).await["event"], "connected");
        drop(connection);
    }

    #[tokio::test]
    async fn an_agent_that_never_answers_times_out() {
        // A listener that accepts TCP but never completes the WebSocket upgrade.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let mut config = BridgeConfig::new(url, &CallParameters::default());
        config.connect_timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = connect(config).await.unwrap_err();
        assert!(matches!(err, BridgeError::ConnectTimeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
        // Nobody listening at all: an error, quickly.
        let config = BridgeConfig::new("ws://127.0.0.1:1/", &CallParameters::default());
        assert!(matches!(connect(config).await, Err(BridgeError::Connect(_))));
        let config = BridgeConfig::new("http://example.com/", &CallParameters::default());
        assert!(matches!(connect(config).await, Err(BridgeError::InvalidUrl(_))));
    }

    #[test]
    fn playback_pads_tails_places_marks_and_bounds_its_buffer() {
        let b64 = |bytes: &[u8]| BASE64.encode(bytes);
        let mut p = Playback::new(3 * FRAME_BYTES);
        let now = std::time::Instant::now();
        assert_eq!(p.push_base64(&b64(&[1; 200]), now), Ok((200, 0)));
        // A mark pads the 40-byte tail to a whole frame; it is due once both frames played.
        p.mark("a".into());
        assert_eq!(p.queued(), 2 * FRAME_BYTES);
        assert_eq!(p.due_mark(), None);
        assert_eq!(p.next_frame().unwrap().0, &[1; FRAME_BYTES][..]);
        assert_eq!(p.due_mark(), None);
        let second = p.next_frame().unwrap().0;
        assert_eq!(&second[..40], &[1; 40][..]);
        assert_eq!(&second[40..], &[ULAW_SILENCE; 120][..]);
        assert_eq!(p.due_mark().as_deref(), Some("a"));
        assert!(p.is_idle());
        // Beyond the bound, audio is dropped and counted in frames.
        assert_eq!(p.push_base64(&b64(&[2; 4 * FRAME_BYTES + 10]), now), Ok((4 * FRAME_BYTES + 10, 2)));
        assert_eq!(p.queued(), 3 * FRAME_BYTES);
        // Not base64: nothing is added.
        assert!(p.push_base64("%%%", now).is_err());
        assert_eq!(p.queued(), 3 * FRAME_BYTES);
        // A tail with nothing after it plays padded; clear drops the rest and frees its marks.
        p.next_frame().unwrap();
        p.mark("b".into());
        assert_eq!(p.clear(), 2);
        assert_eq!(p.due_mark().as_deref(), Some("b"));
        assert!(p.is_idle() && p.next_frame().is_none());
        assert_eq!(p.push_base64(&b64(&[3; 10]), now), Ok((10, 0)));
        let tail = p.next_frame().unwrap().0;
        assert_eq!(&tail[..10], &[3; 10][..]);
        assert_eq!(&tail[10..], &[ULAW_SILENCE; 150][..]);
    }

    /// A frame's arrival is that of the message completing it; a padded tail takes the last
    /// message's; clear forgets them.
    #[test]
    fn playback_frames_carry_the_arrival_of_the_audio_completing_them() {
        let b64 = |bytes: &[u8]| BASE64.encode(bytes);
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = Playback::new(100 * FRAME_BYTES);
        // 1.5 frames, then 1.5 frames: frame 1 is complete with the first message, frame 2
        // needs the second, frame 3 is the second's tail.
        p.push_base64(&b64(&[1; 240]), at(0)).unwrap();
        p.push_base64(&b64(&[2; 240]), at(7)).unwrap();
        assert_eq!(p.next_frame().unwrap().1, Some(at(0)));
        assert_eq!(p.next_frame().unwrap().1, Some(at(7)));
        assert_eq!(p.next_frame().unwrap().1, Some(at(7)));
        assert!(p.next_frame().is_none());
        // A mark's padding plays with the arrival of the audio before it.
        p.push_base64(&b64(&[3; 10]), at(20)).unwrap();
        p.mark("m".into());
        assert_eq!(p.next_frame().unwrap().1, Some(at(20)));
        p.push_base64(&b64(&[4; 480]), at(30)).unwrap();
        p.clear();
        p.push_base64(&b64(&[5; 160]), at(40)).unwrap();
        assert_eq!(p.next_frame().unwrap().1, Some(at(40)));
    }

    #[test]
    fn sids_are_twilio_shaped() {
        assert!(new_sid("MZ").len() == 34 && new_sid("CA").starts_with("CA"));
    }
}
