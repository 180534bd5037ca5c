//! The bridge session's task: one loop that polls the caller's RTP leg, the agent's WebSocket,
//! the playback clock and the call's hangup, and moves audio, DTMF and marks both ways.

use super::playback::Playback;
use super::*;

/// The WebSocket writing state used while the caller's leg is polled.
pub(super) struct Out {
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

pub(super) struct Session {
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
    /// The relay handle stopped the caller's leg (with the acknowledgement to send), asked for
    /// it back (a transfer), or was dropped.
    MediaStopped(LegStop),
    Control(Option<Control>),
    Tick(Instant),
    WriteFailed(String),
}

impl Session {
    /// The session of a connected agent and the caller's leg; `first_audio` fires at the
    /// agent's first audio.
    pub(super) fn new(
        conn: AgentConnection,
        leg: BridgedLeg,
        counters: Arc<Counters>,
        first_audio: oneshot::Sender<()>,
    ) -> Session {
        let max_bytes =
            (conn.config.max_playback.as_millis() / FRAME_DURATION.as_millis()).max(1) as usize * FRAME_BYTES;
        let plain = matches!(conn.socket.get_ref(), MaybeTlsStream::Plain(_));
        let out = Out {
            prefix: media_prefix(&conn.config.stream_sid),
            chunk: 0,
            unflushed: false,
            failed: None,
            plain,
            latency: conn.config.latency.clone(),
            unflushed_since: None,
        };
        Session {
            conn,
            leg: Some(leg),
            counters,
            playback: Playback::new(max_bytes),
            out,
            last_played: None,
            first_audio: Some(first_audio),
        }
    }

    pub(super) async fn run(mut self, mut control: MailboxReceiver<Control>) -> BridgeEnd {
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
                Wake::MediaStopped(stop) => {
                    // The ports go back (or over to the next relay) before the stop is
                    // acknowledged.
                    let leg = self.leg.take();
                    match stop {
                        LegStop::Stop(Some(done)) => {
                            drop(leg);
                            let _ = done.send(());
                        }
                        LegStop::Stop(None) => {}
                        LegStop::Release(to) => {
                            if let Some(leg) = leg {
                                let _ = to.send(leg.into_setup());
                            }
                        }
                    }
                    self.stop_and_close().await;
                    return BridgeEnd::MediaEnded;
                }
                Wake::Control(Some(Control::Hangup(done))) => {
                    self.stop_and_close().await;
                    let _ = done.send(());
                    return BridgeEnd::CallerHangup;
                }
                Wake::Control(Some(Control::Swap(leg, reply))) => {
                    let previous = self.leg.replace(*leg).map(BridgedLeg::into_setup);
                    self.playback.clear();
                    let _ = reply.send(previous);
                    Ok(())
                }
                Wake::Control(Some(Control::Event(mut event))) => {
                    event.insert("sequenceNumber".into(), self.conn.next_sequence().into());
                    event.insert("streamSid".into(), self.conn.config.stream_sid.clone().into());
                    let text = serde_json::Value::Object(event).to_string();
                    self.conn.socket.send(Message::text(text)).await.map_err(|e| e.to_string())
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
