//! When a call to an AI agent is answered, and the node flags that choose it.
//!
//! Answering as soon as the agent's WebSocket is up is the simple default, but the caller then
//! hears silence (and the call is billed) while the agent warms up its speech pipeline. With
//! [`AgentAnswer::FirstAudio`] the caller hears ringing (180, then 183 with the node's SDP so
//! that the first words are not clipped) until the agent's first audio, and the 200 OK goes out
//! with that audio; [`AgentArgs::agent_answer_timeout_ms`] bounds the wait.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// When the node answers a call routed to an AI agent.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentAnswer {
    /// 200 OK as soon as the WebSocket is up and `connected`/`start` were sent.
    #[default]
    Connected,
    /// 180/183 first; 200 OK when the agent's first `media` arrives (or at the timeout).
    FirstAudio,
}

/// The node flags of the AI bridge.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct AgentArgs {
    /// When to answer calls routed to an AI agent: when its WebSocket is connected, or when
    /// it first sends audio (the caller hears ringing until then).
    #[arg(long, env = "SWITCHBOARD_AGENT_ANSWER", value_enum, default_value_t = AgentAnswer::Connected)]
    pub agent_answer: AgentAnswer,

    /// With `--agent-answer first-audio`: how long to wait for the agent's first audio before
    /// answering anyway (an agent that listens first still gets its call).
    #[arg(long, env = "SWITCHBOARD_AGENT_ANSWER_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=120_000))]
    pub agent_answer_timeout_ms: u64,

    /// How long the agent may take to accept the WebSocket (TCP, TLS, upgrade); past it the
    /// caller gets 503 and the CDR says the agent did not connect.
    #[arg(long, env = "SWITCHBOARD_AGENT_CONNECT_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub agent_connect_timeout_ms: u64,
}

impl Default for AgentArgs {
    fn default() -> Self {
        AgentArgs {
            agent_answer: AgentAnswer::Connected,
            agent_answer_timeout_ms: 5000,
            agent_connect_timeout_ms: 5000,
        }
    }
}

impl AgentArgs {
    /// The answer policy these flags describe.
    pub fn answer_policy(&self) -> AnswerPolicy {
        AnswerPolicy { mode: self.agent_answer, timeout: Duration::from_millis(self.agent_answer_timeout_ms) }
    }
}

/// When to answer, and how long to wait for the agent's first audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerPolicy {
    /// The mode.
    pub mode: AgentAnswer,
    /// The bound of [`AgentAnswer::FirstAudio`].
    pub timeout: Duration,
}

impl Default for AnswerPolicy {
    fn default() -> Self {
        AgentArgs::default().answer_policy()
    }
}

/// The policies of the nodes running in this process, by SIP listening address.
///
/// Interim: the call path reads its settings from `sip::call::MediaContext`, which this
/// module cannot extend; until that struct carries an `AnswerPolicy` the node registers its
/// policy here at start-up and the call looks it up by the address it listens on (tests run
/// several nodes in one process, so a single global value would not do).
fn registry() -> &'static Mutex<HashMap<SocketAddr, AnswerPolicy>> {
    static POLICIES: OnceLock<Mutex<HashMap<SocketAddr, AnswerPolicy>>> = OnceLock::new();
    POLICIES.get_or_init(Default::default)
}

/// Records the answer policy of the node listening for SIP on `sip`.
pub fn register_node_policy(sip: SocketAddr, policy: AnswerPolicy) {
    registry().lock().unwrap_or_else(|e| e.into_inner()).insert(sip, policy);
}

/// The answer policy of the node listening on `sip` (the default if it registered none).
pub fn node_policy(sip: SocketAddr) -> AnswerPolicy {
    registry().lock().unwrap_or_else(|e| e.into_inner()).get(&sip).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.agent, AgentArgs::default());
        assert_eq!(cli.agent.answer_policy().mode, AgentAnswer::Connected);
        let cli =
            Cli::try_parse_from(["x", "--agent-answer", "first-audio", "--agent-answer-timeout-ms", "250"]).unwrap();
        assert_eq!(
            cli.agent.answer_policy(),
            AnswerPolicy { mode: AgentAnswer::FirstAudio, timeout: Duration::from_millis(250) }
        );
        assert!(Cli::try_parse_from(["x", "--agent-answer", "whenever"]).is_err());
        assert!(Cli::try_parse_from(["x", "--agent-connect-timeout-ms", "0"]).is_err());
    }

    #[test]
    fn policies_are_per_node() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let first = AnswerPolicy { mode: AgentAnswer::FirstAudio, timeout: Duration::from_millis(10) };
        register_node_policy(a, first);
        assert_eq!(node_policy(a), first);
        assert_eq!(node_policy(b), AnswerPolicy::default());
    }
}
