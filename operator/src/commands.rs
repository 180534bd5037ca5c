//! Command implementations of the `switchboard` CLI that belong to the operator: CRD generation,
//! status, validation of a folder.

use std::path::PathBuf;

/// Arguments of `switchboard crds`.
#[derive(clap::Args, Debug)]
pub struct CrdsArgs {
    /// Directory the CRD files are written to.
    #[arg(long, default_value = "crds")]
    pub out: PathBuf,
    /// Print to standard output instead of writing files.
    #[arg(long)]
    pub stdout: bool,
}

/// Arguments of `switchboard status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

/// Arguments of `switchboard validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Folder of manifests.
    #[arg(default_value = "examples")]
    pub dir: PathBuf,
}

pub fn crds(args: CrdsArgs) -> anyhow::Result<()> {
    let _ = args;
    todo!()
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let _ = args;
    todo!()
}

pub fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let _ = args;
    todo!()
}
