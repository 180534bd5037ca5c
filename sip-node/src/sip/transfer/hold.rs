//! Hold audio for a caller waiting through a warm transfer's consultation: the node's
//! `--transfer-hold-audio` file (raw 8 kHz μ-law) played in a loop to the caller's RTP address
//! from the caller's own port, one 20 ms packet per tick (A-law for an A-law caller). Without
//! a file the caller hears silence (nothing is sent).

use std::sync::Arc;
use std::time::Duration;

use switchboard_model::Codec;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::media::g711;
use crate::media::relay::RtpLegSetup;

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
                let _ = socket.try_send_to(&packet, to);
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

/// Reads a hold-audio file: raw 8 kHz μ-law, at least one 20 ms frame.
pub fn load(path: &std::path::Path) -> Result<Arc<[u8]>, String> {
    let audio = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if audio.len() < FRAME {
        return Err(format!("{} holds less than 20 ms of 8 kHz μ-law audio", path.display()));
    }
    Ok(audio.into())
}
