//! When a call to an AI agent is answered, and the node flags that choose it.
//!
//! Answering as soon as the agent's WebSocket is up is the simple default, but the caller then
//! hears silence (and the call is billed) while the agent warms up its speech pipeline. With
//! [`AgentAnswer::FirstAudio`] the caller hears ringing (180, then 183 with the node's SDP so
//! that the first words are not clipped) until the agent's first audio, and the 200 OK goes out
//! with that audio; [`AgentArgs::agent_answer_timeout_ms`] bounds the wait.

use std::path::PathBuf;
use std::time::Duration;

use super::tls::{AgentTls, AgentTlsError};

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

    /// A PEM file of CA certificates to trust for `wss://` agents besides the bundled web PKI
    /// roots: for agents whose certificates a private CA signed. Read at start-up; a file
    /// that cannot be read or holds no certificate stops the node.
    #[arg(long, env = "SWITCHBOARD_AGENT_CA_FILE", value_name = "PEM_FILE")]
    pub agent_ca_file: Option<PathBuf>,

    /// What a caller on hold hears while the agent briefs a human (warm transfer): a raw
    /// 8 kHz μ-law file played in a loop (`sox hold.wav -t ul -r 8000 -c 1 hold.ul`); silence
    /// without one. Read at start-up; a file that cannot be read stops the node.
    #[arg(long, env = "SWITCHBOARD_TRANSFER_HOLD_AUDIO", value_name = "ULAW_FILE")]
    pub transfer_hold_audio: Option<PathBuf>,

    /// While a blind transfer's target rings, the caller hears the `--transfer-hold-audio`
    /// file, or a ringback tone (440+480 Hz, 2 s on, 4 s off) without one; the agent no longer
    /// hears the caller, and gets the caller back if the transfer fails. Off (the default),
    /// the caller stays with the agent until the target answers: the agent can say "please
    /// hold" or keep talking, and a failed transfer needs no hand-back.
    #[arg(long, env = "SWITCHBOARD_TRANSFER_RINGBACK")]
    pub transfer_ringback: bool,
}

impl Default for AgentArgs {
    fn default() -> Self {
        AgentArgs {
            agent_answer: AgentAnswer::Connected,
            agent_answer_timeout_ms: 5000,
            agent_connect_timeout_ms: 5000,
            agent_ca_file: None,
            transfer_hold_audio: None,
            transfer_ringback: false,
        }
    }
}

impl AgentArgs {
    /// Whom `wss://` agent connections trust, per `--agent-ca-file`.
    pub fn tls(&self) -> Result<AgentTls, AgentTlsError> {
        AgentTls::load(self.agent_ca_file.as_deref())
    }

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
        let cli = Cli::try_parse_from(["x", "--agent-ca-file", "/etc/agents/ca.pem"]).unwrap();
        assert_eq!(cli.agent.agent_ca_file.as_deref(), Some(std::path::Path::new("/etc/agents/ca.pem")));
        assert!(cli.agent.tls().is_err(), "a CA file that is not there is an error, not ignored");
        assert_eq!(AgentArgs::default().tls().unwrap().extra_roots(), 0);
    }
}
