//! `switchboard bench`: reconcile and propagation figures, measured on a generated folder.
//!
//! It builds a folder (by default 10,000 PhoneNumbers, 50 Trunks, 100 RoutingRules), times the
//! first full reconcile into an empty database, then runs the real local stack (`switchboard
//! local` as a child process, with its SIP node) on that folder and times, for each of N edits,
//! the path a user sees: a file is written → the watcher reconciles → the node applies the new
//! generation (read from `nodes.applied_generation`). Finally it reads the node's RSS.
//! Figures are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use sqlx::PgPool;
use switchboard_operator::reconcile::Reconciler;
use switchboard_operator::source::folder::FolderSource;
use tokio::process::Command;

use crate::postgres::Postgres;
use crate::process::stop_child;

/// Arguments of `switchboard bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// PhoneNumbers in the generated folder.
    #[arg(long, default_value_t = 10_000)]
    pub numbers: usize,
    /// Trunks in the generated folder.
    #[arg(long, default_value_t = 50)]
    pub trunks: usize,
    /// RoutingRules in the generated folder (half inbound, half outbound).
    #[arg(long, default_value_t = 100)]
    pub rules: usize,
    /// Edits whose propagation is timed.
    #[arg(long, default_value_t = 100)]
    pub edits: usize,
    /// Postgres server to use (a fresh database is created in it and dropped afterwards);
    /// without it a private cluster is started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Through a real Kubernetes API server (the cluster of KUBECONFIG, e.g. `eval
    /// "$(scripts/cluster up)"`): apply the resources, run the operator and a node, time Ready
    /// and edits (see bench_kubernetes.rs).
    #[arg(long)]
    pub kubernetes: bool,
}

/// Numbers per generated file: an edit touches one file of this size.
const NUMBERS_PER_FILE: usize = 100;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.trunks == 0 || args.rules < 2 || args.numbers == 0 {
        bail!("the bench needs at least 1 trunk, 2 rules and 1 number");
    }
    let server = Postgres::ensure(args.database_url.clone()).await?;
    let result = bench(&args, server.url()).await;
    server.stop().await;
    result
}

async fn bench(args: &BenchArgs, server_url: &str) -> anyhow::Result<()> {
    let database = format!("switchboard_bench_{}", std::process::id());
    let admin = switchboard_model::db::connect(server_url, 1).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&admin).await?;
    let url = with_database(server_url, &database)?;
    let result =
        if args.kubernetes { crate::bench_kubernetes::measure(args, &url).await } else { measure(args, &url).await };
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")))
        .execute(&admin)
        .await;
    result
}

pub(crate) fn with_database(server_url: &str, database: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(server_url).context("parsing the database URL")?;
    url.set_path(&format!("/{database}"));
    Ok(url.to_string())
}

async fn measure(args: &BenchArgs, url: &str) -> anyhow::Result<()> {
    let folder = tempfile::tempdir()?;
    let files = generate(folder.path(), args)?;
    println!(
        "folder: {} trunks, {} rules, {} numbers in {} files",
        args.trunks,
        args.rules,
        args.numbers,
        files.len() + 2
    );

    let pool = switchboard_model::db::connect(url, 4).await?;
    switchboard_model::db::migrate(&pool).await?;
    let started = Instant::now();
    let state = FolderSource::new(folder.path()).read()?;
    let read = started.elapsed();
    let report = Reconciler::new(pool.clone()).reconcile_all(&state).await?;
    let total = started.elapsed();
    println!(
        "first full reconcile: {:.3} s (read+parse {:.3} s, write {:.3} s; {} resources, generation {})",
        total.as_secs_f64(),
        read.as_secs_f64(),
        (total - read).as_secs_f64(),
        report.changed.len(),
        report.generation
    );
    if !report.not_ready.is_empty() {
        bail!(
            "the generated folder has {} resources that are not ready: {:?}",
            report.not_ready.len(),
            report.not_ready.first()
        );
    }

    let log = folder.path().join("..").join(format!("switchboard-bench-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log)?;
    let mut local = Command::new(std::env::current_exe()?)
        .args(["local", "--database-url", url, "--node-id", "bench-node"])
        .arg(folder.path())
        .env("SWITCHBOARD_SIP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_HTTP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_API_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .context("starting `switchboard local`")?;
    let outcome = timed_edits(args, &pool, &files, report.generation, local.id()).await;
    stop_child(&mut local, Signal::SIGTERM, Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(&log);
    outcome
}

async fn timed_edits(
    args: &BenchArgs,
    pool: &PgPool,
    files: &[PathBuf],
    generation: i64,
    local_pid: Option<u32>,
) -> anyhow::Result<()> {
    wait_applied(pool, generation, Duration::from_secs(120))
        .await
        .context("the node did not apply the initial configuration")?;
    let mut latencies = Vec::with_capacity(args.edits);
    let mut current = generation;
    for edit in 0..args.edits {
        let file = &files[edit % files.len()];
        let text = std::fs::read_to_string(file)?;
        // Flip the caller-ID flag of the file's first number: a one-resource change.
        let edited = if text.contains("callerId: true") {
            text.replacen("callerId: true", "callerId: false", 1)
        } else {
            text.replacen("callerId: false", "callerId: true", 1)
        };
        let started = Instant::now();
        std::fs::write(file, edited)?;
        current += 1;
        wait_applied(pool, current, Duration::from_secs(30))
            .await
            .with_context(|| format!("edit {} was not applied by the node", edit + 1))?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!(
        "edit → node applied ({} edits, includes the watcher's debounce): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pick(0.50).as_secs_f64() * 1000.0,
        pick(0.99).as_secs_f64() * 1000.0,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
    match local_pid.and_then(node_rss) {
        Some((rss, peak)) => {
            println!("node RSS with this snapshot: {:.1} MB (peak {:.1} MB)", rss as f64 / 1024.0, peak as f64 / 1024.0)
        }
        None => println!("node RSS: could not be read from /proc"),
    }
    Ok(())
}

/// Waits until every live node applied `generation` (bounded).
pub(crate) async fn wait_applied(pool: &PgPool, generation: i64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT min(applied_generation) FROM nodes WHERE stopped_at IS NULL")
                .fetch_one(pool)
                .await?;
        if applied.is_some_and(|a| a >= generation) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("generation {generation} not applied after {timeout:?} (applied: {applied:?})");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// VmRSS and VmHWM (KiB) of the node: the child of `switchboard local` running `node`.
fn node_rss(local_pid: u32) -> Option<(u64, u64)> {
    let children = std::fs::read_to_string(format!("/proc/{local_pid}/task/{local_pid}/children")).ok()?;
    let threads = std::fs::read_dir(format!("/proc/{local_pid}/task")).ok()?;
    let mut pids: Vec<String> = children.split_whitespace().map(String::from).collect();
    for thread in threads.flatten() {
        let path = thread.path().join("children");
        if let Ok(more) = std::fs::read_to_string(path) {
            pids.extend(more.split_whitespace().map(String::from));
        }
    }
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !cmdline.split(|b| *b == 0).any(|arg| arg == b"node") {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        return Some((field("VmRSS:")?, field("VmHWM:")?));
    }
    None
}

/// Writes the benchmark folder and returns the number files (the ones edits touch).
pub(crate) fn generate(dir: &Path, args: &BenchArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut trunks = String::new();
    for t in 0..args.trunks {
        trunks.push_str(&format!(
            "---\napiVersion: switchboard.dev/v1alpha1\nkind: Trunk\nmetadata: {{name: trunk-{t}}}\nspec:\n  provider: provider-{p}\n  gateways:\n    - {{address: gw{t}.provider-{p}.example.com, priority: 10}}\n    - {{address: gw{t}b.provider-{p}.example.com, priority: 20}}\n  inbound: {{allowedSourceCidrs: [192.0.2.{t8}/32]}}\n  limits: {{maxConcurrentCalls: 500, callsPerSecond: 10}}\n  rates: {{perMinuteOutbound: \"0.00{r}\", perMinuteInbound: \"0.001\"}}\n",
            p = t % 5,
            t8 = t % 250,
            r = 10 + t % 40,
        ));
    }
    std::fs::write(dir.join("trunks.yaml"), trunks)?;
    let inbound = args.rules / 2;
    let mut rules = String::new();
    for r in 0..args.rules {
        if r < inbound {
            rules.push_str(&format!(
                "---\napiVersion: switchboard.dev/v1alpha1\nkind: RoutingRule\nmetadata: {{name: inbound-{r}}}\nspec:\n  direction: inbound\n  priority: {r}\n  destination: {{type: websocket, url: \"ws://127.0.0.1:8765/agent/{r}\"}}\n"
            ));
        } else {
            rules.push_str(&format!(
                "---\napiVersion: switchboard.dev/v1alpha1\nkind: RoutingRule\nmetadata: {{name: outbound-{r}}}\nspec:\n  direction: outbound\n  priority: {r}\n  match: {{destinationPatterns: ['^\\+1{area}[0-9]{{7}}$']}}\n  trunks: [trunk-{a}, trunk-{b}]\n",
                area = 200 + r,
                a = r % args.trunks,
                b = (r + 1) % args.trunks,
            ));
        }
    }
    std::fs::write(dir.join("rules.yaml"), rules)?;
    let mut files = Vec::new();
    for chunk in 0..args.numbers.div_ceil(NUMBERS_PER_FILE) {
        let mut text = String::new();
        for n in chunk * NUMBERS_PER_FILE..((chunk + 1) * NUMBERS_PER_FILE).min(args.numbers) {
            text.push_str(&format!(
                "---\napiVersion: switchboard.dev/v1alpha1\nkind: PhoneNumber\nmetadata: {{name: did-{n}}}\nspec:\n  number: \"+1555{n:07}\"\n  trunkRef: trunk-{t}\n  routingRuleRef: inbound-{r}\n  callerId: true\n",
                t = n % args.trunks,
                r = n % inbound.max(1),
            ));
        }
        let path = dir.join(format!("numbers-{chunk:04}.yaml"));
        std::fs::write(&path, text)?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_folder_is_valid_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let args = BenchArgs { numbers: 250, trunks: 7, rules: 10, edits: 1, database_url: None, kubernetes: false };
        let files = generate(dir.path(), &args).unwrap();
        assert_eq!(files.len(), 3);
        let state = FolderSource::new(dir.path()).read().unwrap();
        assert!(state.problems.is_empty() && state.broken.is_empty(), "{:?} {:?}", state.problems, state.broken);
        assert_eq!(state.resources.len(), 250 + 7 + 10);
        for resource in &state.resources {
            switchboard_operator::validate::validate(&resource.key, &resource.spec).unwrap();
        }
    }
}
