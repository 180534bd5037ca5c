//! The private throwaway Postgres of `switchboard local`, for real: initdb (as the `postgres`
//! user when run as root), a server on a free loopback port, the `switchboard` database with the
//! migrations applied, and a clean stop that leaves neither a process nor a directory behind.
//!
//! Needs the PostgreSQL server binaries (`scripts/test` and `.ci/run` make sure of them); it
//! ignores DATABASE_URL on purpose.

// The root package is a binary: its modules are compiled into this test directly.
#[allow(dead_code)]
#[path = "../src/process.rs"]
mod process;

#[allow(dead_code)]
#[path = "../src/postgres.rs"]
mod postgres;

use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;
use postgres::{Postgres, PrivateCluster};

/// Generous: the first run may install nothing but still initdb on a slow disk.
const START_TIMEOUT: Duration = Duration::from_secs(120);

async fn start() -> PrivateCluster {
    tokio::time::timeout(START_TIMEOUT, PrivateCluster::start())
        .await
        .expect("the private cluster starts within the timeout")
        .unwrap_or_else(|error| panic!("the private cluster starts: {error}"))
}

fn is_running(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test]
async fn private_cluster_serves_the_switchboard_database_and_stops_cleanly() {
    let cluster = start().await;
    let url = cluster.url().to_string();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:") && url.ends_with("/switchboard"), "{url}");
    let (dir, pid) = (cluster.dir().to_path_buf(), cluster.pid().expect("running"));
    assert!(cluster.log_path().starts_with(&dir));

    let pool = switchboard_model::db::connect(&url, 2).await.expect("connects");
    switchboard_model::db::migrate(&pool).await.expect("migrations apply");
    let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&pool).await.unwrap();
    assert_eq!(database, "switchboard");
    pool.close().await;

    Postgres::Private(Box::new(cluster)).stop().await;
    assert!(!is_running(pid), "postgres (pid {pid}) still runs after stop");
    assert!(!dir.exists(), "{} still exists after stop", dir.display());
    assert!(switchboard_model::db::connect(&url, 1).await.is_err(), "the server still accepts connections");
}

#[tokio::test]
async fn dropping_a_cluster_stops_it_too() {
    let cluster = start().await;
    let (dir, pid) = (cluster.dir().to_path_buf(), cluster.pid().expect("running"));
    // Hold a connection open: the fast shutdown must not wait for it.
    let pool = switchboard_model::db::connect(cluster.url(), 1).await.expect("connects");
    let _conn = pool.acquire().await.unwrap();
    drop(cluster);
    assert!(!is_running(pid), "postgres (pid {pid}) still runs after drop");
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}
