//! Process-wide `tracing` setup shared by every Switchboard binary.

use tracing_subscriber::{EnvFilter, fmt};

/// Log output format, chosen by `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default: what an operator reads in a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: write \"text\" or \"json\"")),
        }
    }
}

/// Installs the global subscriber. The filter comes from `RUST_LOG`, defaulting to
/// `info,sqlx=warn`; colours only when stderr is a terminal.
/// Calling it twice is harmless (the second call is ignored), which keeps tests simple.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    // sqlx logs every failed ping at info during an outage; the node reports outages itself.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The body of every Switchboard binary's `main`: installs logging, runs `command` on a
/// multi-threaded runtime and turns its result into an exit code, printing the error chain.
pub fn run_main<F, E>(format: LogFormat, command: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    init(format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Dropping a runtime waits for every blocking task without limit (a getaddrinfo or file
    // write stuck in the kernel would keep a finished process alive): the command has done
    // its orderly shutdown by now, so give the stragglers a bounded moment.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}
