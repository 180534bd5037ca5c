//! `switchboard local`: the whole stack on one machine from a folder of manifests.

/// Arguments of `switchboard local`.
#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// Folder of manifests to reconcile and watch.
    #[arg(default_value = "examples")]
    pub dir: std::path::PathBuf,
}

pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let _ = args;
    todo!()
}
