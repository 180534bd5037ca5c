//! `switchboard`: the command-line entry point of Switchboard.
//!
//! One binary carries the roles a user starts by hand: the local stack (`local`), a SIP node
//! (`node`, the same code as the `switchboard-node` image binary), the CRD generator (`crds`),
//! `status`, and the benchmarks (`bench`, `bench-api`).
//!
//! What it owns: the command line and the wiring of the crates into processes. `local` starts
//! Postgres, the reconcile of a folder, the REST API and a node child process (`src/local/`);
//! `operator` starts the Kubernetes controllers, their metrics and health server, and the REST
//! API (`src/operator.rs`). Logic that a process only composes belongs to the crates:
//! `switchboard-model` (stored rows), `switchboard-operator` (resources, validation, reconcile,
//! controllers), `switchboard-api` (REST API), `switchboard-node` (SIP node). Nothing in the
//! workspace depends on this crate.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard_model::logging::{self, LogFormat};

mod bench;
mod bench_api;
mod bench_kubernetes;
mod local;
mod operator;
mod postgres;
mod process;

/// Switchboard: declarative, GitOps-configured telephony. Trunk, PhoneNumber and RoutingRule
/// resources (from Kubernetes or a folder of YAML manifests) are reconciled into Postgres, and SIP
/// nodes pick every change up live.
#[derive(Parser, Debug)]
#[command(name = "switchboard", version, about, long_about = None)]
struct Cli {
    /// Log format: `text` (human-readable) or `json` (one object per line).
    #[arg(long, global = true, default_value = "text", env = "SWITCHBOARD_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole stack locally on a folder of manifests: Postgres (DATABASE_URL or a private
    /// throwaway cluster), migrations, the folder reconciled into the database and watched for
    /// changes, and one SIP node.
    Local(local::LocalArgs),
    /// Run a SIP node: load the configuration snapshot from Postgres and follow its changes.
    Node(Box<switchboard_node::NodeArgs>),
    /// Write the CustomResourceDefinitions generated from the Rust types (to `crds/` by default).
    Crds(switchboard_operator::commands::CrdsArgs),
    /// Show each resource with its conditions and the generation each live node applied.
    Status(switchboard_operator::commands::StatusArgs),
    /// Check a folder of manifests without touching a database: every problem, with file and field.
    Validate(switchboard_operator::commands::ValidateArgs),
    /// Run the operator against a Kubernetes cluster: watch Trunk, PhoneNumber and RoutingRule
    /// resources (and the Secrets they use), reconcile them into Postgres, write their status.
    Operator(operator::OperatorArgs),
    /// Mint a REST API token (HS256 JWT) with the API's secret and print it.
    Token(switchboard_api::auth::TokenArgs),
    /// Measure reconcile and propagation figures on a generated folder (10,000 numbers by default).
    Bench(bench::BenchArgs),
    /// Measure REST API figures on the local stack: GET /api/trunks and /api/calls/cdr
    /// throughput and latency (100 trunks, 1,000,000 CDRs by default) and initiate → INVITE.
    BenchApi(bench_api::BenchApiArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    logging::run_main(log_format, async move {
        match cli.command {
            Command::Local(args) => local::run(args, log_format).await,
            Command::Node(args) => switchboard_node::run(*args).await,
            Command::Crds(args) => switchboard_operator::commands::crds(args),
            Command::Status(args) => switchboard_operator::commands::status(args).await,
            Command::Validate(args) => switchboard_operator::commands::validate(args),
            Command::Bench(args) => bench::run(args).await,
            Command::BenchApi(args) => bench_api::run(args).await,
            Command::Token(args) => switchboard_api::auth::token_command(args),
            Command::Operator(args) => operator::run(args).await,
        }
    })
}
