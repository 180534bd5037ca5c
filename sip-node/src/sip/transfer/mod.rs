//! Transfers of calls bridged to an AI agent, asked for through the REST API
//! (`POST /api/calls/{call_id}/transfer`, `call_id` being the `callSid` the agent got in
//! `start`).
//!
//! How a request reaches the call: the API writes a row into `call_commands` for the node that
//! holds the call (its `active_calls` row names it) and NOTIFYs `switchboard_call_commands`;
//! the node's [`queue`] task claims its rows and hands each to the call through the node-wide
//! [`Transfers`] registry (call-sid → the call task's channel). The call answers at once
//! (accepted, or refused with a reason), which the task writes back into the row for the API
//! to return.
//!
//! What the call does (`agent`): while its connected machine keeps serving the caller's leg
//! (`sip::connected::drive_until`), the [`dial`] task places the outbound leg through the
//! normal outbound routing (the trunks of the first outbound RoutingRule of the call's
//! namespace matching the target, else the call's own trunk; failover, trunk limits, one CDR
//! per attempt under the call's id). When the target answers, the caller's RTP leg is taken
//! back from the agent's bridge with its port (the caller's SDP stays true), the agent gets
//! `stop` and its socket closes, and a two-leg relay joins the caller and the target; the call
//! goes on in a new connected machine with both legs. When every attempt fails, the caller
//! stays with the agent, which gets a `transfer_failed` event. With `--transfer-ringback` the
//! caller hears ringback (or the hold audio) instead of the agent while the target rings
//! (`ringing`).
//!
//! A warm transfer (`warm`) dials the same way; when the human answers, the agent briefs them
//! before the caller is joined (`complete`) or the human is hung up (`cancel`), both asked
//! for through the API as further commands of the call.
//!
//! Status webhooks (`transfer_started`, `transfer_answered`, `transfer_failed`,
//! `transfer_completed`) go to the request's `webhook_url`, signed like the call status
//! callbacks.

mod agent;
mod dial;
pub mod hold;
mod media;
pub mod queue;
mod refer;
mod ringing;
mod target;
mod warm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub(crate) use agent::{AgentCall, AgentCallEnd, CallerFacts, CallerLeg, run_agent_call};

/// The NOTIFY channel the API wakes nodes on.
pub const CHANNEL: &str = "switchboard_call_commands";
/// How long a target may ring when the request names no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How the call is handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The node dials the target and bridges the caller to it when it answers.
    Blind,
    /// The agent briefs the target before the caller is bridged.
    Warm,
    /// A REFER to the caller's carrier.
    Refer,
}

/// A transfer request as the API stored it (`call_commands.body`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TransferRequest {
    /// The target: an E.164 number, or a SIP URI (`target`: at a trunk's gateway or on the
    /// egress allow-list).
    pub to: String,
    pub mode: Mode,
    /// For the target (warm transfers: `X-Transfer-Summary`).
    #[serde(default)]
    pub summary: Option<String>,
    /// How long the target may ring.
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
    /// The number the target sees (E.164); the caller's number by default.
    #[serde(default)]
    pub caller_id: Option<String>,
    /// Where the transfer's status webhooks go.
    #[serde(default)]
    pub webhook_url: Option<String>,
}

/// What the API asks of a call.
#[derive(Debug, Clone)]
pub(crate) enum Intent {
    /// Start a transfer.
    Transfer(TransferRequest),
    /// Bridge the caller to the human the agent is briefing (a warm transfer's last step).
    Complete,
    /// Call off the warm transfer in progress: the human is hung up, the caller is back with
    /// the agent.
    Cancel,
    /// Send these keys to the human's leg of a warm transfer (to pass an IVR).
    Dtmf(String),
}

/// The most keys one request may send.
pub const MAX_DIGITS: usize = 32;

/// Whether `digits` are DTMF keys (`0`-`9`, `*`, `#`, `A`-`D`), at least one and at most
/// [`MAX_DIGITS`].
pub fn valid_digits(digits: &str) -> bool {
    (1..=MAX_DIGITS).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D'))
}

impl Intent {
    /// The action a `call_commands` body asks for: `{"action": "complete" | "cancel"}`,
    /// `{"action": "dtmf", "digits": "12#"}`, else a transfer request.
    pub(crate) fn from_body(body: serde_json::Value) -> Result<Intent, serde_json::Error> {
        use serde::de::Error as _;
        match body.get("action").and_then(|a| a.as_str()) {
            Some("complete") => Ok(Intent::Complete),
            Some("cancel") => Ok(Intent::Cancel),
            Some("dtmf") => match body.get("digits").and_then(|d| d.as_str()) {
                Some(digits) if valid_digits(digits) => Ok(Intent::Dtmf(digits.to_string())),
                _ => Err(serde_json::Error::custom("digits must be 1-32 of 0-9 * # A-D")),
            },
            _ => serde_json::from_value(body).map(Intent::Transfer),
        }
    }
}

/// A request on its way to a call, with where its acceptance goes.
pub(crate) struct Command {
    pub(crate) id: uuid::Uuid,
    pub(crate) action: Intent,
    /// `Ok`: the call started the transfer; `Err`: why it cannot.
    pub(crate) reply: oneshot::Sender<Result<(), String>>,
    /// The request's status webhooks.
    pub(crate) hooks: crate::webhook::CallHooks,
    /// The egress allow-list: a SIP URI target not at a trunk's gateway must be on it.
    pub(crate) egress: Arc<switchboard_model::egress::EgressPolicy>,
}

/// The calls that take transfer requests, by the call-sid their agent knows.
#[derive(Clone, Default)]
pub struct Transfers {
    calls: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Command>>>>,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfers").finish_non_exhaustive()
    }
}

impl Transfers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Command>>> {
        // A poisoned lock only means a panic elsewhere while holding it; the map is still valid.
        self.calls.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes requests for `call_sid` until the registration drops.
    pub(crate) fn register(&self, call_sid: &str) -> Registration {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(call_sid.to_string(), tx);
        Registration { transfers: self.clone(), call_sid: call_sid.to_string(), rx }
    }

    /// Hands `command` to its call; `false` when no call of this node has the sid.
    pub(crate) fn deliver(&self, call_sid: &str, command: Command) -> bool {
        let sender = self.lock().get(call_sid).cloned();
        sender.is_some_and(|sender| sender.send(command).is_ok())
    }
}

/// A call's place in [`Transfers`]; removed on drop.
pub(crate) struct Registration {
    transfers: Transfers,
    call_sid: String,
    rx: mpsc::UnboundedReceiver<Command>,
}

impl Registration {
    /// The next request (never `None` while registered: the registry holds the sender).
    pub(crate) async fn next(&mut self) -> Option<Command> {
        self.rx.recv().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.transfers.lock().remove(&self.call_sid);
    }
}

/// A transfer status webhook.
#[derive(Debug, Serialize)]
pub(crate) struct TransferEvent<'a> {
    /// `transfer_started`, `transfer_answered`, `transfer_failed`, `transfer_completed`.
    pub(crate) status: &'static str,
    /// The call's `callSid`.
    pub(crate) call_id: &'a str,
    pub(crate) transfer_id: String,
    pub(crate) mode: Mode,
    pub(crate) to: &'a str,
    pub(crate) timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sip_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> (Command, oneshot::Receiver<Result<(), String>>) {
        let (reply, rx) = oneshot::channel();
        let request = TransferRequest {
            to: "+15550002222".into(),
            mode: Mode::Blind,
            summary: None,
            timeout_seconds: None,
            caller_id: None,
            webhook_url: None,
        };
        let hooks = crate::webhook::CallHooks::start(reqwest::Client::new(), crate::webhook::Signer::new("test"), None);
        let egress = Arc::default();
        (Command { id: uuid::Uuid::new_v4(), action: Intent::Transfer(request), reply, hooks, egress }, rx)
    }

    #[tokio::test]
    async fn requests_reach_the_registered_call_only_while_it_is_registered() {
        let transfers = Transfers::default();
        assert!(!transfers.deliver("CA1", command().0), "no call yet");
        let mut call = transfers.register("CA1");
        assert!(!transfers.deliver("CA2", command().0), "another sid");
        assert!(transfers.deliver("CA1", command().0), "delivered");
        let delivered = call.next().await.map(|c| c.action);
        assert!(matches!(delivered, Some(Intent::Transfer(r)) if r.to == "+15550002222"));
        drop(call);
        assert!(!transfers.deliver("CA1", command().0), "unregistered on drop");
    }

    #[test]
    fn the_stored_body_parses_and_refuses_unknown_modes() {
        let body = serde_json::json!({"to": "+15550002222", "mode": "warm", "summary": "billing question"});
        let request: TransferRequest = serde_json::from_value(body).expect("parses");
        assert_eq!((request.mode, request.summary.as_deref()), (Mode::Warm, Some("billing question")));
        assert!(serde_json::from_value::<TransferRequest>(serde_json::json!({"to": "+1", "mode": "cold"})).is_err());
        assert!(matches!(Intent::from_body(serde_json::json!({"action": "complete"})), Ok(Intent::Complete)));
        assert!(matches!(Intent::from_body(serde_json::json!({"action": "cancel"})), Ok(Intent::Cancel)));
        assert!(Intent::from_body(serde_json::json!({"action": "explode"})).is_err());
        assert!(matches!(
            Intent::from_body(serde_json::json!({"action": "dtmf", "digits": "12#*"})),
            Ok(Intent::Dtmf(d)) if d == "12#*"
        ));
        for bad in ["", "12x", "1 2", &"1".repeat(33)] {
            assert!(Intent::from_body(serde_json::json!({"action": "dtmf", "digits": bad})).is_err(), "{bad:?}");
        }
    }
}
