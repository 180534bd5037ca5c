//! `switchboard bench`: reconcile and propagation figures.

/// Arguments of `switchboard bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = args;
    todo!()
}
