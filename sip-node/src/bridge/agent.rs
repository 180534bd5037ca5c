//! The WebSocket session with one agent: connect, the `connected`/`start` preamble, and the
//! task that moves audio, DTMF and marks both ways until either side ends.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::protocol::{
    DTMF_TRACK_INBOUND, DtmfInfo, InboundMessage, MarkInfo, MediaChunk, MediaFormat, OutboundMessage, PROTOCOL,
    StartInfo, StopInfo, TRACK_INBOUND, VERSION,
};
use crate::media::g711::ULAW_SILENCE;
use crate::media::relay::BridgeMedia;

/// One frame of 8 kHz μ-law: 20 ms.
pub const FRAME_BYTES: usize = 160;
/// The duration of one frame.
pub const FRAME_DURATION: Duration = Duration::from_millis(20);
/// A tick later than this behind its schedule resynchronises the pacing instead of bursting
/// the backlog to the caller.
const MAX_CATCH_UP: Duration = Duration::from_millis(60);
/// How long a clean close waits for the agent's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

/// The relay's ends of the audio channels (see [`BridgeMedia`]).
#[derive(Debug)]
pub struct BridgeIo {
    /// Caller audio, μ-law, at most one frame waiting.
    pub caller_audio: mpsc::Receiver<Bytes>,
    /// Caller key presses.
    pub caller_dtmf: mpsc::Receiver<char>,
    /// Paced agent frames, μ-law, 160 bytes each.
    pub agent_audio: mpsc::Sender<Bytes>,
}

impl From<BridgeMedia> for BridgeIo {
    fn from(m: BridgeMedia) -> BridgeIo {
        BridgeIo { caller_audio: m.caller_audio, caller_dtmf: m.caller_dtmf, agent_audio: m.agent_audio }
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
    /// Agent frames dropped: playback buffer full, or the relay slot busy.
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

/// The rustls client configuration: ring, the bundled webpki roots, no native trust store.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, BridgeError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map(|builder| Arc::new(builder.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(BridgeError::Tls)
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
    let connector = Connector::Rustls(tls_config()?);
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
        let (socket, _response) = tokio_tungstenite::connect_async_tls_with_config(
            config.url.as_str(),
            Some(ws_config),
            true,
            Some(connector),
        )
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

impl AgentConnection {
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

    /// Starts the session task. The call keeps the handle; dropping it ends the session.
    pub fn spawn(self, io: BridgeIo) -> BridgeHandle {
        let counters = Arc::new(Counters::default());
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (first_audio_tx, first_audio_rx) = oneshot::channel();
        let session = Session {
            conn: self,
            io,
            counters: Arc::clone(&counters),
            queue: VecDeque::new(),
            queued_frames: 0,
            partial: Vec::with_capacity(FRAME_BYTES),
            chunk: 0,
            last_played: None,
            first_audio: Some(first_audio_tx),
        };
        let task = tokio::spawn(session.run(control_rx));
        BridgeHandle {
            control: control_tx,
            counters,
            task: Some(task),
            end: None,
            first_audio: FirstAudio::Waiting(first_audio_rx),
        }
    }
}

enum Control {
    Hangup(oneshot::Sender<()>),
}

/// The call's hold on a running bridge session.
pub struct BridgeHandle {
    control: mpsc::UnboundedSender<Control>,
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

enum Queued {
    Frame(Bytes),
    Mark(String),
}

struct Session {
    conn: AgentConnection,
    io: BridgeIo,
    counters: Arc<Counters>,
    /// Agent audio waiting to be played, with marks in between.
    queue: VecDeque<Queued>,
    queued_frames: usize,
    /// The tail of the last agent payload that did not fill a frame.
    partial: Vec<u8>,
    chunk: u64,
    last_played: Option<Instant>,
    /// Fired at the first audio accepted from the agent.
    first_audio: Option<oneshot::Sender<()>>,
}

enum Wake {
    Agent(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Caller(Option<Bytes>),
    Dtmf(Option<char>),
    Control(Option<Control>),
    Tick(Instant),
}

impl Session {
    fn max_frames(&self) -> usize {
        (self.conn.config.max_playback.as_millis() / FRAME_DURATION.as_millis()).max(1) as usize
    }

    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) -> BridgeEnd {
        // Pacing: Burst keeps the frame clock locked to wall time, so small scheduling delays
        // are caught up (the caller's jitter buffer absorbs a frame or two early) instead of
        // accumulating as added latency the way Delay would; a tick more than MAX_CATCH_UP late
        // resets the clock instead of bursting seconds of audio. The interval is only polled
        // while audio is queued and restarts one frame after the last one played.
        let mut ticker = tokio::time::interval(FRAME_DURATION);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut playing = false;
        let mut dtmf_open = true;
        loop {
            let wake = tokio::select! {
                m = self.conn.socket.next() => Wake::Agent(m),
                f = self.io.caller_audio.recv() => Wake::Caller(f),
                d = self.io.caller_dtmf.recv(), if dtmf_open => Wake::Dtmf(d),
                c = control.recv() => Wake::Control(c),
                t = ticker.tick(), if playing => Wake::Tick(t),
            };
            let result = match wake {
                Wake::Agent(None) => return BridgeEnd::AgentClosed { code: None, reason: "connection closed".into() },
                Wake::Agent(Some(Err(error))) => return BridgeEnd::AgentFailed(error.to_string()),
                Wake::Agent(Some(Ok(message))) => match self.on_agent_message(message) {
                    Ok(()) => self.flush_marks_if_idle().await,
                    Err(end) => return end,
                },
                Wake::Caller(Some(frame)) => self.send_caller_frame(&frame).await,
                Wake::Caller(None) => {
                    self.stop_and_close().await;
                    return BridgeEnd::MediaEnded;
                }
                Wake::Dtmf(Some(key)) => self.send_dtmf(key).await,
                Wake::Dtmf(None) => {
                    dtmf_open = false;
                    Ok(())
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
                Wake::Tick(scheduled) => {
                    if Instant::now().saturating_duration_since(scheduled) > MAX_CATCH_UP {
                        ticker.reset();
                    }
                    self.play_tick().await
                }
            };
            if let Err(error) = result {
                return BridgeEnd::AgentFailed(error);
            }
            let mut has_work = !self.queue.is_empty() || !self.partial.is_empty();
            if has_work && !playing {
                // Start one frame after the last frame played, or now. "Now" plays at once
                // rather than at the next timer tick: tokio's timer rounds deadlines up to the
                // next millisecond, which would add up to 1 ms to every idle → speaking start.
                let now = Instant::now();
                match self.last_played.map(|t| t + FRAME_DURATION).filter(|due| *due > now) {
                    Some(due) => ticker.reset_at(due),
                    None => {
                        if let Err(error) = self.play_tick().await {
                            return BridgeEnd::AgentFailed(error);
                        }
                        ticker.reset_at(now + FRAME_DURATION);
                        has_work = !self.queue.is_empty() || !self.partial.is_empty();
                    }
                }
            }
            playing = has_work;
        }
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
        let message: InboundMessage = match serde_json::from_str(text.as_str()) {
            Ok(message) => message,
            Err(_) => {
                bump(&self.counters.invalid_json, 1);
                return Ok(());
            }
        };
        match message {
            InboundMessage::Media { media, .. } => match BASE64.decode(media.payload.as_bytes()) {
                Ok(audio) => {
                    bump(&self.counters.agent_media, 1);
                    self.enqueue_audio(&audio);
                    if !audio.is_empty()
                        && let Some(first) = self.first_audio.take()
                    {
                        let _ = first.send(());
                    }
                }
                Err(_) => bump(&self.counters.invalid_payload, 1),
            },
            InboundMessage::Mark { mark, .. } => {
                self.flush_partial();
                self.queue.push_back(Queued::Mark(mark.name));
            }
            InboundMessage::Clear { .. } => {
                bump(&self.counters.clears, 1);
                bump(&self.counters.frames_cleared, self.queued_frames as u64);
                self.partial.clear();
                self.queued_frames = 0;
                // Marks of the dropped audio are echoed at once, as Twilio does.
                let marks: Vec<Queued> = self.queue.drain(..).filter(|q| matches!(q, Queued::Mark(_))).collect();
                self.queue.extend(marks);
                self.last_played = None;
            }
            InboundMessage::Other => bump(&self.counters.ignored, 1),
        }
        Ok(())
    }

    fn enqueue_audio(&mut self, audio: &[u8]) {
        let max = self.max_frames();
        let mut rest = audio;
        if !self.partial.is_empty() {
            let take = (FRAME_BYTES - self.partial.len()).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() == FRAME_BYTES {
                let frame = Bytes::copy_from_slice(&self.partial);
                self.partial.clear();
                self.push_frame(frame, max);
            }
        }
        let mut chunks = rest.chunks_exact(FRAME_BYTES);
        for chunk in &mut chunks {
            self.push_frame(Bytes::copy_from_slice(chunk), max);
        }
        self.partial.extend_from_slice(chunks.remainder());
    }

    fn push_frame(&mut self, frame: Bytes, max: usize) {
        if self.queued_frames >= max {
            bump(&self.counters.frames_dropped, 1);
            return;
        }
        self.queued_frames += 1;
        self.queue.push_back(Queued::Frame(frame));
    }

    /// Pads the incomplete tail with silence into a frame of its own.
    fn flush_partial(&mut self) {
        if self.partial.is_empty() {
            return;
        }
        self.partial.resize(FRAME_BYTES, ULAW_SILENCE);
        let frame = Bytes::copy_from_slice(&self.partial);
        self.partial.clear();
        let max = self.max_frames();
        self.push_frame(frame, max);
    }

    /// Marks with no audio ahead of them, arriving after the last frame finished playing, are
    /// echoed without waiting for a tick.
    async fn flush_marks_if_idle(&mut self) -> Result<(), String> {
        let idle = self.last_played.is_none_or(|t| t.elapsed() >= FRAME_DURATION);
        if idle && self.partial.is_empty() {
            self.echo_leading_marks().await?;
        }
        Ok(())
    }

    async fn echo_leading_marks(&mut self) -> Result<(), String> {
        while let Some(Queued::Mark(_)) = self.queue.front() {
            let Some(Queued::Mark(name)) = self.queue.pop_front() else { break };
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

    /// One tick: marks whose audio has played are echoed, then the next frame is played.
    async fn play_tick(&mut self) -> Result<(), String> {
        self.echo_leading_marks().await?;
        if self.queue.is_empty() && !self.partial.is_empty() {
            // The agent's audio ended mid-frame: play the tail rather than hold it.
            self.flush_partial();
        }
        if let Some(Queued::Frame(frame)) = self.queue.front() {
            let frame = frame.clone();
            self.queue.pop_front();
            self.queued_frames = self.queued_frames.saturating_sub(1);
            self.last_played = Some(Instant::now());
            match self.io.agent_audio.try_send(frame) {
                Ok(()) => bump(&self.counters.frames_played, 1),
                Err(_) => bump(&self.counters.frames_dropped, 1),
            }
        }
        Ok(())
    }

    async fn send_caller_frame(&mut self, frame: &[u8]) -> Result<(), String> {
        self.chunk += 1;
        let message = OutboundMessage::Media {
            sequence_number: self.conn.next_sequence(),
            stream_sid: self.conn.config.stream_sid.clone(),
            media: MediaChunk {
                track: TRACK_INBOUND.into(),
                chunk: self.chunk.to_string(),
                timestamp: self.conn.started.elapsed().as_millis().to_string(),
                payload: BASE64.encode(frame),
            },
        };
        self.conn.send(&message).await?;
        bump(&self.counters.caller_frames, 1);
        Ok(())
    }

    async fn send_dtmf(&mut self, key: char) -> Result<(), String> {
        let message = OutboundMessage::Dtmf {
            stream_sid: self.conn.config.stream_sid.clone(),
            sequence_number: self.conn.next_sequence(),
            dtmf: DtmfInfo { track: DTMF_TRACK_INBOUND.into(), digit: key.to_string() },
        };
        self.conn.send(&message).await?;
        bump(&self.counters.dtmf_sent, 1);
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

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    use super::*;

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
        server: ServerSocket,
        caller_audio: mpsc::Sender<Bytes>,
        caller_dtmf: mpsc::Sender<char>,
        agent_audio: mpsc::Receiver<Bytes>,
        stream_sid: String,
    }

    async fn harness() -> Harness {
        let (url, accept) = agent().await;
        let params = CallParameters {
            from: "+15550001111".into(),
            to: "+15550002222".into(),
            trunk: "main".into(),
            number: "support-line".into(),
        };
        let config = BridgeConfig::new(url, &params);
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
        let (caller_audio, caller_rx) = mpsc::channel(1);
        let (caller_dtmf, dtmf_rx) = mpsc::channel(8);
        let (agent_tx, agent_audio) = mpsc::channel(64);
        let stream_sid = connection.stream_sid().to_string();
        let handle =
            connection.spawn(BridgeIo { caller_audio: caller_rx, caller_dtmf: dtmf_rx, agent_audio: agent_tx });
        Harness { handle, server, caller_audio, caller_dtmf, agent_audio, stream_sid }
    }

    fn media(bytes: &[u8]) -> serde_json::Value {
        serde_json::json!({"event": "media", "streamSid": "MZx", "media": {"payload": BASE64.encode(bytes)}})
    }

    #[tokio::test]
    async fn caller_audio_and_dtmf_reach_the_agent_in_order() {
        let mut h = harness().await;
        for i in 0..5u8 {
            h.caller_audio.send(Bytes::from(vec![i; FRAME_BYTES])).await.unwrap();
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
        h.caller_dtmf.send('5').await.unwrap();
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
    }

    #[tokio::test]
    async fn agent_audio_is_paced_and_marks_follow_their_audio() {
        let mut h = harness().await;
        // 10 frames in one message plus a partial 80 bytes, then a mark.
        let mut audio: Vec<u8> = (0..10u8).flat_map(|i| vec![i; FRAME_BYTES]).collect();
        audio.extend_from_slice(&[0xAA; 80]);
        send_json(&mut h.server, media(&audio)).await;
        send_json(&mut h.server, serde_json::json!({"event": "mark", "streamSid": "MZx", "mark": {"name": "end"}}))
            .await;
        let started = std::time::Instant::now();
        let mut arrivals = vec![];
        for i in 0..11u8 {
            let frame = tokio::time::timeout(Duration::from_secs(2), h.agent_audio.recv()).await.unwrap().unwrap();
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
        // A mark with nothing queued comes back at once.
        tokio::time::sleep(Duration::from_millis(30)).await;
        send_json(&mut h.server, serde_json::json!({"event": "mark", "mark": {"name": "idle"}})).await;
        assert_eq!(next_json(&mut h.server).await["mark"]["name"], "idle");
    }

    #[tokio::test]
    async fn clear_drops_the_queue_at_once() {
        let mut h = harness().await;
        let audio = vec![0x11; FRAME_BYTES * 100]; // two seconds
        send_json(&mut h.server, media(&audio)).await;
        send_json(&mut h.server, serde_json::json!({"event": "mark", "mark": {"name": "after-speech"}})).await;
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(2), h.agent_audio.recv()).await.unwrap().unwrap();
        }
        send_json(&mut h.server, serde_json::json!({"event": "clear", "streamSid": "MZx"})).await;
        // The pending mark is returned right away.
        let mark = next_json(&mut h.server).await;
        assert_eq!(mark["mark"]["name"], "after-speech");
        // At most a frame already on its way; then nothing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut after = 0;
        while h.agent_audio.try_recv().is_ok() {
            after += 1;
        }
        assert!(after <= 2, "{after} frames after clear");
        let stats = h.handle.stats();
        assert_eq!(stats.clears, 1);
        assert!(stats.frames_cleared >= 90, "{stats:?}");
        // New audio after clear plays again.
        send_json(&mut h.server, media(&[0x22; FRAME_BYTES])).await;
        let frame = tokio::time::timeout(Duration::from_secs(2), h.agent_audio.recv()).await.unwrap().unwrap();
        assert_eq!(&frame[..], &[0x22; FRAME_BYTES][..]);
    }

    #[tokio::test]
    async fn bad_agent_messages_are_counted_and_ignored() {
        let mut h = harness().await;
        h.server.send(Message::text("{not json")).await.unwrap();
        send_json(&mut h.server, serde_json::json!({"event": "media", "media": {"payload": "%%%not base64"}})).await;
        send_json(&mut h.server, serde_json::json!({"event": "media"})).await;
        let big = "A".repeat(70 * 1024);
        send_json(&mut h.server, serde_json::json!({"event": "media", "media": {"payload": big}})).await;
        h.server.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        send_json(&mut h.server, serde_json::json!({"event": "dance"})).await;
        // Still alive: audio plays and marks come back.
        send_json(&mut h.server, media(&[0x33; FRAME_BYTES])).await;
        let frame = tokio::time::timeout(Duration::from_secs(2), h.agent_audio.recv()).await.unwrap().unwrap();
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
        let mut h = harness().await;
        h.server.close(Some(CloseFrame { code: CloseCode::Normal, reason: "conversation over".into() })).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(2), h.handle.ended()).await.unwrap();
        assert_eq!(end, BridgeEnd::AgentClosed { code: Some(1000), reason: "conversation over".into() });
        assert!(end.reason().contains("conversation over"));
        // Asking again is immediate.
        assert_eq!(h.handle.ended().await, end);
        drop(h.caller_audio);
    }

    #[tokio::test]
    async fn agent_dropping_the_tcp_connection_ends_the_session() {
        let mut h = harness().await;
        drop(h.server);
        let end = tokio::time::timeout(Duration::from_secs(2), h.handle.ended()).await.unwrap();
        assert!(matches!(end, BridgeEnd::AgentClosed { .. } | BridgeEnd::AgentFailed(_)), "{end:?}");
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
    fn tls_config_builds_with_bundled_roots() {
        let config = tls_config().unwrap();
        assert!(config.alpn_protocols.is_empty());
        assert!(new_sid("MZ").len() == 34 && new_sid("CA").starts_with("CA"));
    }
}
