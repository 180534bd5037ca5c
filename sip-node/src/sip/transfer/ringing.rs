//! The caller while a blind transfer's target rings, with `--transfer-ringback`: the caller's
//! RTP leg leaves the agent's bridge (a silent placeholder leg, with no address to send to,
//! takes its place, so that the agent's session stays up) and hears the node's hold audio, or
//! a ringback tone without one, from its own port. When the target answers, the placeholder
//! leaves the bridge (the agent gets `stop`) and the caller's leg goes to the transferred
//! call; when the transfer fails, the caller's leg goes back into the bridge.
//!
//! Without the flag the caller stays with the agent while the target rings (see the flag's
//! doc for why that is the default).

use switchboard_model::Codec;
use tokio::sync::mpsc;

use super::hold::{self, Held};
use crate::bridge::BridgeHandle;
use crate::media::relay::{LegMedia, RelayConfig, RelayEvent, RelayHandle, RtpLegSetup};
use crate::sip::context::NodeContext;

/// A caller hearing ringback; its leg is inside the player until [`Ringing::answered`] or
/// [`Ringing::back`]. Dropped (the call ended), the player stops and the placeholder's relay
/// ends, which ends the agent's bridge.
pub(super) struct Ringing {
    held: Held,
    /// The placeholder leg's relay in the agent's bridge (dropping it ends the bridge).
    placeholder: RelayHandle,
    config: RelayConfig,
}

impl Ringing {
    /// Takes the caller's leg out of the agent's bridge and starts the ringback. `Err`: the
    /// caller stays with the agent (no media, no free port, the bridge is gone), with why.
    pub(super) async fn start(ctx: &NodeContext, agent: &BridgeHandle) -> Result<Ringing, String> {
        let media = ctx.media.as_ref().ok_or("this node anchors no media")?;
        let ports = media.ports.allocate().map_err(|e| format!("no RTP port for the placeholder: {e}"))?;
        let placeholder = RtpLegSetup { ports, media: LegMedia::new(Codec::Pcmu, None) };
        let config = RelayConfig { media_timeout: media.timeout };
        let (placeholder, _events, caller) = agent.swap_leg(placeholder, config).await.map_err(|e| e.to_string())?;
        let Some(caller) = caller else {
            return Err("the caller's media is gone".into());
        };
        let audio = media.hold_audio.clone().unwrap_or_else(hold::ringback);
        Ok(Ringing { held: Held::start(caller, Some(audio)), placeholder, config })
    }

    /// The target answered: the ringback stops, the placeholder leaves the agent's bridge (the
    /// bridge session sends `stop` and closes the agent's socket); the caller's leg, without
    /// what it sent while it rang, for the transferred call (`None`: its media was lost).
    pub(super) async fn answered(self) -> Option<RtpLegSetup> {
        let caller = self.held.end().await;
        drop(self.placeholder.release().await);
        if let Some(caller) = &caller {
            let stale = caller.ports.discard_queued();
            tracing::debug!(stale, "dropped what the caller sent while the target rang");
        }
        caller
    }

    /// The transfer failed: the ringback stops and the caller's leg goes back into the agent's
    /// bridge; its new relay handle (keep it: dropping it ends the bridge) and events. `None`:
    /// the leg could not go back (the call then ends on its lost media).
    pub(super) async fn back(self, agent: &BridgeHandle) -> Option<(RelayHandle, mpsc::Receiver<RelayEvent>)> {
        let caller = self.held.end().await?;
        caller.ports.discard_queued();
        let back = agent.swap_leg(caller, self.config).await;
        drop(self.placeholder);
        match back {
            Ok((relay, events, _placeholder)) => Some((relay, events)),
            Err(error) => {
                tracing::warn!(%error, "the caller's leg could not go back to the agent");
                None
            }
        }
    }
}
