//! Command implementations of the `switchboard` CLI that belong to the operator: CRD generation,
//! status, validation of a folder.

use std::path::PathBuf;

use anyhow::Context;
use sqlx::Row;

use crate::crd::{all_crds, render_crd};
use crate::source::folder::FolderSource;
use crate::validate;

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
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Nodes whose last heartbeat is older than this many seconds count as gone.
    #[arg(long, default_value_t = 30)]
    pub node_timeout_seconds: i64,
}

/// Arguments of `switchboard validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Folder of manifests.
    #[arg(default_value = "examples")]
    pub dir: PathBuf,
}

/// Writes (or prints) the generated CRDs.
pub fn crds(args: CrdsArgs) -> anyhow::Result<()> {
    for (file, crd) in all_crds() {
        let yaml = render_crd(&crd);
        if args.stdout {
            print!("---\n{yaml}");
        } else {
            std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
            let path = args.out.join(file);
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Checks a folder as local mode would read it, without a database: every problem, with file
/// and field. Fails when there is any.
pub fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let state = FolderSource::new(&args.dir).read()?;
    let mut problems: Vec<String> = state.problems.iter().map(|p| p.message.clone()).collect();
    problems.extend(state.broken.iter().map(|b| b.message.clone()));
    let mut warnings = Vec::new();
    for resource in &state.resources {
        if let Err(invalid) = validate::validate(&resource.key, &resource.spec) {
            problems.push(format!("{}: {invalid}", resource.origin));
        }
        warnings.extend(validate::warnings(&resource.spec).into_iter().map(|w| format!("{}: {w}", resource.origin)));
    }
    println!(
        "{}: {} resources, {} secrets",
        args.dir.display(),
        state.resources.len() + state.broken.len(),
        state.secrets.len()
    );
    for warning in &warnings {
        println!("  ! {warning}");
    }
    if problems.is_empty() {
        println!("all valid");
        return Ok(());
    }
    for problem in &problems {
        println!("  ✗ {problem}");
    }
    anyhow::bail!("{} problem(s) found", problems.len())
}

/// Prints every resource with its Ready condition, and every node with the generation it
/// applied.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let pool = switchboard_model::db::connect(&args.database_url, 2).await?;
    let generation = switchboard_model::db::current_generation(&pool).await?;
    println!("config generation {generation}\n");

    let nodes = sqlx::query(
        "SELECT node_id, applied_generation,
                stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1) AND draining_at IS NULL AS live,
                draining_at IS NOT NULL AND stopped_at IS NULL AS draining,
                EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 AS age
           FROM nodes ORDER BY node_id",
    )
    .bind(args.node_timeout_seconds as f64)
    .fetch_all(&pool)
    .await?;
    let live: Vec<i64> =
        nodes.iter().filter(|n| n.get::<bool, _>("live")).map(|n| n.get::<i64, _>("applied_generation")).collect();
    println!("{:<28} {:<6} {:>8} {:>14}", "NODE", "LIVE", "APPLIED", "HEARTBEAT");
    for node in &nodes {
        let live = match (node.get::<bool, _>("live"), node.get::<bool, _>("draining")) {
            (true, _) => "yes",
            (false, true) => "drain",
            (false, false) => "no",
        };
        println!(
            "{:<28} {:<6} {:>8} {:>13.0}s",
            node.get::<String, _>("node_id"),
            live,
            node.get::<i64, _>("applied_generation"),
            node.get::<f64, _>("age")
        );
    }
    if nodes.is_empty() {
        println!("(no nodes have reported)");
    }
    println!();

    let resources = sqlx::query(
        "SELECT kind, namespace, name, ready, reason, message, config_generation, origin
           FROM resource_status ORDER BY kind DESC, namespace, name",
    )
    .fetch_all(&pool)
    .await?;
    println!("{:<12} {:<32} {:<6} {:<22} {:<8} MESSAGE", "KIND", "NAME", "READY", "REASON", "SYNCED");
    for row in &resources {
        let config_generation: Option<i64> = row.get("config_generation");
        let synced = match config_generation {
            Some(g) => format!("{}/{}", live.iter().filter(|applied| **applied >= g).count(), live.len()),
            None => "-".to_string(),
        };
        println!(
            "{:<12} {:<32} {:<6} {:<22} {:<8} {}",
            row.get::<String, _>("kind"),
            format!("{}/{}", row.get::<String, _>("namespace"), row.get::<String, _>("name")),
            if row.get::<bool, _>("ready") { "True" } else { "False" },
            row.get::<String, _>("reason"),
            synced,
            row.get::<String, _>("message"),
        );
    }
    if resources.is_empty() {
        println!("(no resources)");
    }
    Ok(())
}
