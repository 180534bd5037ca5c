//! Hold audio for a caller waiting through a warm transfer's consultation (or while a blind
//! transfer's target rings, with `--transfer-ringback`; `ringback` without a file): the node's
//! `--transfer-hold-audio` file (raw 8 kHz μ-law) played in a loop to the caller's RTP address
//! from the caller's own port, one 20 ms packet per tick (A-law for an A-law caller). Without
//! a file the caller hears silence (nothing is sent). An SRTP caller gets the audio as SRTP,
//! with the node's key of its leg.

use std::sync::Arc;
use std::time::Duration;

use switchboard_model::Codec;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::media::g711;
use crate::media::relay::RtpLegSetup;
use crate::media::srtp::SrtpLeg;

/// One packet's worth of 8 kHz audio.
const FRAME: usize = 160;
const TICK: Duration = Duration::from_millis(20);

/// The caller's leg while on hold.
pub(super) enum Held {
    /// The hold audio plays; [`HoldPlayer::stop`] gives the leg back.
    Playing(HoldPlayer),
    /// Silence: the leg, untouched.
    Silent(RtpLegSetup),
}

impl Held {
    /// Puts the caller on hold: `audio` plays when there is some and somewhere to send it.
    pub(super) fn start(leg: RtpLegSetup, audio: Option<Arc<[u8]>>) -> Held {
        match audio {
            Some(audio) => HoldPlayer::start(leg, audio),
            None => Held::Silent(leg),
        }
    }

    /// Takes the caller off hold: its leg with its sockets (`None` if the player failed).
    pub(super) async fn end(self) -> Option<RtpLegSetup> {
        match self {
            Held::Playing(player) => player.stop().await,
            Held::Silent(leg) => Some(leg),
        }
    }
}

/// A running hold player; [`HoldPlayer::stop`] gives the caller's leg back.
pub(super) struct HoldPlayer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Option<RtpLegSetup>>,
}

impl HoldPlayer {
    /// Plays `audio` to the caller of `leg` until stopped; the leg stays silent, untouched,
    /// when there is nothing to play or nowhere to send it.
    fn start(mut leg: RtpLegSetup, audio: Arc<[u8]>) -> Held {
        let Some(to) = leg.media.remote_rtp.filter(|_| audio.len() >= FRAME) else { return Held::Silent(leg) };
        let Some((rtp, rtcp)) = leg.ports.take_sockets() else { return Held::Silent(leg) };
        let socket = match tokio::net::UdpSocket::from_std(rtp) {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "cannot play hold audio");
                // The std socket is gone with the error: the caller's leg has no RTP socket.
                drop(rtcp);
                return Held::Silent(leg);
            }
        };
        // An SRTP caller gets the audio encrypted with the node's key of its leg (in a stream of
        // its own SSRC); a context that cannot be made means silence, never plain RTP.
        let mut srtp = match leg.media.srtp.as_ref().map(|keys| SrtpLeg::new(&keys.local, &keys.remote)) {
            None => None,
            Some(Ok(context)) => Some(context),
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot play hold audio to an SRTP caller");
                if let Ok(rtp) = socket.into_std() {
                    leg.ports.restore_sockets(rtp, rtcp);
                }
                return Held::Silent(leg);
            }
        };
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let (pt, alaw) = (leg.media.payload_type, leg.media.codec == Codec::Pcma);
            let (mut seq, mut ts, ssrc) = (rand::random::<u16>(), rand::random::<u32>(), rand::random::<u32>());
            let mut offset = 0;
            let mut ticker = tokio::time::interval(TICK);
            let mut packet = Vec::with_capacity(12 + FRAME);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticker.tick() => {}
                }
                if offset + FRAME > audio.len() {
                    offset = 0;
                }
                packet.clear();
                packet.extend_from_slice(&[0x80, pt & 0x7f]);
                packet.extend_from_slice(&seq.to_be_bytes());
                packet.extend_from_slice(&ts.to_be_bytes());
                packet.extend_from_slice(&ssrc.to_be_bytes());
                packet.extend_from_slice(&audio[offset..offset + FRAME]);
                if alaw {
                    g711::ulaw_to_alaw_in_place(&mut packet[12..]);
                }
                // A full send buffer drops the packet, as the relay does.
                match srtp.as_mut() {
                    None => {
                        let _ = socket.try_send_to(&packet, to);
                    }
                    Some(srtp) => {
                        if let Some(protected) = srtp.protect_rtp(&packet) {
                            let _ = socket.try_send_to(&protected, to);
                        }
                    }
                }
                offset += FRAME;
                seq = seq.wrapping_add(1);
                ts = ts.wrapping_add(FRAME as u32);
            }
            let rtp = socket.into_std().ok()?;
            leg.ports.restore_sockets(rtp, rtcp);
            Some(leg)
        });
        Held::Playing(HoldPlayer { stop, task })
    }

    /// Stops the audio; the caller's leg with its sockets (`None` if the task failed).
    async fn stop(self) -> Option<RtpLegSetup> {
        let _ = self.stop.send(());
        self.task.await.ok().flatten()
    }
}

/// The North American ringback tone (ANSI T1.401: 440 Hz + 480 Hz, 2 s on, 4 s off) as one
/// 6 s cadence of 8 kHz μ-law, for a caller waiting on a blind transfer when the node has no
/// hold-audio file. Generated once.
pub(super) fn ringback() -> Arc<[u8]> {
    static TONE: std::sync::LazyLock<Arc<[u8]>> = std::sync::LazyLock::new(|| {
        const RATE: f64 = 8000.0;
        // Each tone at about -19 dBm0 (the sum stays well below full scale).
        const AMPLITUDE: f64 = 3000.0;
        let (on, period) = (2 * 8000, 6 * 8000);
        (0..period)
            .map(|n| {
                if n >= on {
                    return g711::linear_to_ulaw(0);
                }
                let t = f64::from(n) / RATE;
                let tau = std::f64::consts::TAU;
                let sample = AMPLITUDE * ((tau * 440.0 * t).sin() + (tau * 480.0 * t).sin());
                g711::linear_to_ulaw(sample.round() as i16)
            })
            .collect::<Vec<u8>>()
            .into()
    });
    Arc::clone(&TONE)
}

/// Reads a hold-audio file: raw 8 kHz μ-law, at least one 20 ms frame.
pub fn load(path: &std::path::Path) -> Result<Arc<[u8]>, String> {
    let audio = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if audio.len() < FRAME {
        return Err(format!("{} holds less than 20 ms of 8 kHz μ-law audio", path.display()));
    }
    Ok(audio.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ringback cadence: 2 s of 440+480 Hz, then 4 s of μ-law silence.
    #[test]
    fn the_ringback_tone_is_440_plus_480_hz_two_seconds_on_four_off() {
        let tone = ringback();
        assert_eq!(tone.len(), 6 * 8000);
        assert!(tone[16_000..].iter().all(|&code| code == g711::linear_to_ulaw(0)), "4 s of silence");
        let samples: Vec<f64> = tone[..16_000].iter().map(|&c| f64::from(g711::ulaw_to_linear(c))).collect();
        // The power at a frequency over the 2 s (a single DFT bin: 0.5 Hz resolution).
        let power = |hz: f64| {
            let (mut re, mut im) = (0.0, 0.0);
            for (n, x) in samples.iter().enumerate() {
                let phase = std::f64::consts::TAU * hz * n as f64 / 8000.0;
                re += x * phase.cos();
                im += x * phase.sin();
            }
            re * re + im * im
        };
        let (p440, p480, p400, p1000) = (power(440.0), power(480.0), power(400.0), power(1000.0));
        assert!(p440 > 100.0 * p400 && p480 > 100.0 * p1000, "{p440} {p480} {p400} {p1000}");
        assert!((p440 / p480 - 1.0).abs() < 0.1, "equal levels: {p440} {p480}");
    }
}
