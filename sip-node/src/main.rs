//! `switchboard-node`: the SIP node binary of the container image (the same code as
//! `switchboard node`).

use std::process::ExitCode;

use clap::Parser;
use switchboard_model::logging::{self, LogFormat};

/// Switchboard SIP node: loads the trunks, numbers, routing rules and credentials that the
/// operator stores in Postgres into an in-memory snapshot, follows every change live (LISTEN
/// plus a periodic check), and reports its heartbeat and applied config generation in the
/// `nodes` table. Keeps serving its last snapshot while Postgres is unreachable.
#[derive(Parser, Debug)]
#[command(name = "switchboard-node", version, long_about = None)]
struct Cli {
    /// Log format: `text` (human-readable) or `json` (one object per line).
    #[arg(long, default_value = "text", env = "SWITCHBOARD_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(flatten)]
    node: switchboard_node::NodeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::run_main(cli.log_format, switchboard_node::run(cli.node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn log_format_and_node_args_parse() {
        let cli = Cli::try_parse_from([
            "switchboard-node",
            "--log-format",
            "json",
            "--database-url",
            "postgres://u@h/db",
            "--node-id",
            "node-a",
        ])
        .expect("valid arguments");
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.node.node_id.as_deref(), Some("node-a"));
        assert!(Cli::try_parse_from(["switchboard-node", "--log-format", "xml", "--database-url", "x"]).is_err());
    }
}
