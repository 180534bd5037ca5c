//! The Switchboard SIP node.

/// Arguments of a SIP node.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let _ = args;
    todo!()
}
