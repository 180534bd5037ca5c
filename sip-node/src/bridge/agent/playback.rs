//! The agent's playback queue: its audio, decoded onto one buffer, and the marks between it.

use std::collections::VecDeque;

use super::*;

/// Agent audio waiting to be played and the marks between it. The audio is one byte buffer:
/// base64 is decoded straight onto its end and frames are sent to the caller from it in
/// place. Marks are positions in the stream of audio bytes, echoed once the audio before them
/// has played.
pub(super) struct Playback {
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
    pub(super) fn new(max_bytes: usize) -> Playback {
        Playback {
            audio: Vec::new(),
            head: 0,
            consumed: 0,
            marks: VecDeque::new(),
            arrivals: VecDeque::new(),
            max_bytes,
        }
    }

    pub(super) fn queued(&self) -> usize {
        self.audio.len() - self.head
    }

    /// Nothing to play and no mark to echo.
    pub(super) fn is_idle(&self) -> bool {
        self.queued() == 0 && self.marks.is_empty()
    }

    /// Decodes base64 audio that arrived at `arrived` onto the end. `Ok`: the bytes decoded
    /// and the frames dropped for want of room; `Err`: not base64, nothing added.
    pub(super) fn push_base64(
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
    pub(super) fn mark(&mut self, name: String) {
        let partial = self.queued() % FRAME_BYTES;
        if partial != 0 {
            self.audio.resize(self.audio.len() + FRAME_BYTES - partial, ULAW_SILENCE);
        }
        self.marks.push_back((self.consumed + self.queued() as u64, name));
    }

    /// The next mark whose audio has all been played.
    pub(super) fn due_mark(&mut self) -> Option<String> {
        if self.marks.front().is_some_and(|(at, _)| *at <= self.consumed) {
            return self.marks.pop_front().map(|(_, name)| name);
        }
        None
    }

    /// The next frame to play and when the audio completing it arrived; the agent's audio
    /// ending mid-frame is padded with silence rather than held.
    pub(super) fn next_frame(&mut self) -> Option<(&[u8], Option<std::time::Instant>)> {
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
    pub(super) fn clear(&mut self) -> u64 {
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
