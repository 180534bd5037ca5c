//! What admitting a call through Postgres costs (`sip/admission.rs`): the trunk-wide limits
//! take one `SELECT switchboard_admit(...)` per call on the call's path and one background
//! `UPDATE` when it ends. Printed, never asserted:
//!
//! - a `SELECT 1` round trip, the floor of any database call;
//! - one node admitting calls one after another (latency per call: mean, p50, p99);
//! - 8 callers admitting concurrently on the same trunk (the advisory lock serialises them):
//!   admissions per second and the latency each caller sees;
//! - the release (`UPDATE ... active - 1`), which the worker does off the call's path.
//!
//! Run with `cargo bench -p switchboard-node --bench admission`. Needs `DATABASE_URL` (a server where it may create and drop a database); without it the
//! bench says so and exits 0.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use switchboard_node::sip::admission::{Admission, TrunkKey, Verdict};

const CALLERS: usize = 8;

/// Calls per measured step: `cargo bench` passes `--bench`; `cargo test --benches` does not,
/// and then a few calls keep the test run quick.
fn sizes() -> (usize, usize) {
    if std::env::args().any(|a| a == "--bench") { (2000, 500) } else { (20, 5) }
}

fn figures(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len().max(1);
    let mean = samples.iter().sum::<Duration>() / n as u32;
    let at = |q: f64| samples[((n as f64 * q) as usize).min(n - 1)];
    println!(
        "{name:<44} n={n:<6} mean {:>7.1} µs  p50 {:>7.1} µs  p99 {:>7.1} µs",
        mean.as_secs_f64() * 1e6,
        at(0.50).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Ok(server) = std::env::var("DATABASE_URL") else {
        println!("admission bench: set DATABASE_URL to a Postgres server to run it");
        return Ok(());
    };
    let database = format!("switchboard_bench_admission_{}", std::process::id());
    let admin = PgPool::connect(&server).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&admin).await?;
    let url = url_with_database(&server, &database);
    let result = bench(&url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")))
        .execute(&admin)
        .await?;
    result
}

fn url_with_database(server: &str, database: &str) -> String {
    let base = server.split('?').next().unwrap_or(server);
    let root = base.rsplit_once('/').map_or(base, |(root, _)| root);
    format!("{root}/{database}")
}

async fn bench(url: &str) -> anyhow::Result<()> {
    let (sequential, per_caller) = sizes();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(CALLERS as u32 + 2).connect(url).await?;
    switchboard_model::db::MIGRATOR.run(&pool).await?;
    sqlx::query("INSERT INTO nodes (node_id, hostname, version) VALUES ('bench', 'bench', 'bench')")
        .execute(&pool)
        .await?;
    // Warm the connections and the plan cache.
    let admission = Admission::new(pool.clone(), "bench");
    let key: TrunkKey = ("default".into(), "carrier".into());
    for _ in 0..50 {
        admission.admit(&key, Some(1_000_000), None).await;
        sqlx::query("SELECT 1").execute(&pool).await?;
    }

    let mut floor = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let started = Instant::now();
        sqlx::query("SELECT 1").execute(&pool).await?;
        floor.push(started.elapsed());
    }
    figures("SELECT 1 (round-trip floor)", floor);

    for (name, max, cps) in [
        ("admit, maxConcurrentCalls only", Some(1_000_000), None),
        ("admit, maxConcurrentCalls + callsPerSecond", Some(1_000_000), Some(1_000_000)),
    ] {
        let mut samples = Vec::with_capacity(sequential);
        for _ in 0..sequential {
            let started = Instant::now();
            let verdict = admission.admit(&key, max, cps).await;
            samples.push(started.elapsed());
            anyhow::ensure!(verdict == Verdict::Admitted, "admission refused: {verdict:?}");
        }
        figures(name, samples);
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let admission = admission.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_caller);
            for _ in 0..per_caller {
                let started = Instant::now();
                admission.admit(&key, Some(1_000_000), None).await;
                samples.push(started.elapsed());
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await?);
    }
    let elapsed = started.elapsed();
    figures(&format!("admit, {CALLERS} concurrent callers, one trunk"), samples);
    println!(
        "{:<44} {:.0} admissions/s",
        format!("  throughput ({CALLERS} callers)"),
        (CALLERS * per_caller) as f64 / elapsed.as_secs_f64()
    );

    let mut releases = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let started = Instant::now();
        sqlx::query(
            "UPDATE trunk_admissions SET active = greatest(active - 1, 0), updated_at = now()
              WHERE namespace = $1 AND trunk_name = $2 AND node_id = 'bench'",
        )
        .bind(&key.0)
        .bind(&key.1)
        .execute(&pool)
        .await?;
        releases.push(started.elapsed());
    }
    figures("release (background worker, off the call path)", releases);
    pool.close().await;
    Ok(())
}
