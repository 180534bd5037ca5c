//! The local stack as a user runs it: `switchboard local DIR` (a child process with its SIP node)
//! on a copy of `examples/`, then files are edited, added, broken and deleted, and the node's
//! applied generation follows. Needs DATABASE_URL (a server where it may create a database);
//! `scripts/test` provides one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};

const NODE: &str = "e2e-local-node";
const WAIT: Duration = Duration::from_secs(60);

/// A fresh database for this test, dropped at the end.
struct Database {
    admin: PgPool,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Self {
        let server = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL must name a Postgres server for this test; run it through scripts/test");
        let admin = PgPool::connect(&server).await.expect("connect to DATABASE_URL");
        let name = format!("switchboard_local_stack_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
        let mut url = url::Url::parse(&server).unwrap();
        url.set_path(&format!("/{name}"));
        Self { admin, name, url: url.to_string() }
    }

    async fn drop_now(self) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&self.admin)
            .await;
    }
}

/// The `switchboard local` child; killed if the test fails half-way.
struct Stack {
    child: Child,
    log: PathBuf,
}

impl Stack {
    fn start(dir: &Path, url: &str, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["local", "--database-url", url, "--node-id", NODE])
            .arg(dir)
            .env("SWITCHBOARD_SIP_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_HTTP_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_API_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start switchboard local");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM by PID, then a bounded wait for the exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, stack: &Stack, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; local stack log:\n{}", stack.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn generation(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT generation FROM config_state").fetch_one(pool).await.unwrap_or(-1)
}

async fn node_applied(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT applied_generation FROM nodes WHERE node_id = $1 AND applied_at IS NOT NULL")
        .bind(NODE)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

/// Waits until the configuration moved past `after` and the node applied it; returns it.
async fn wait_applied_after(pool: &PgPool, stack: &Stack, after: i64) -> i64 {
    eventually("the node to apply a new generation", stack, || async {
        let current = generation(pool).await;
        (current > after && node_applied(pool).await == Some(current)).then_some(current)
    })
    .await
}

fn copy_examples(dir: &Path) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_stack_follows_the_folder() {
    let database = Database::create().await;
    let folder = tempfile::tempdir().unwrap();
    copy_examples(folder.path());
    let log = folder.path().with_extension("log");
    let mut stack = Stack::start(folder.path(), &database.url, log.clone());
    let pool =
        eventually("the database to be reachable", &stack, || async { PgPool::connect(&database.url).await.ok() })
            .await;

    // Start: the examples are reconciled and the node applies them.
    let first = wait_applied_after(&pool, &stack, 0).await;
    // The generated JWT secret is in a private directory with a random name (not the PID), and
    // the generated webhook key is printed: the node, which refuses to start without one, got it.
    let secret_file = eventually("the summary", &stack, || async {
        let log = stack.log();
        let (_, rest) = log.split_once("a secret generated for this run in ")?;
        Some(PathBuf::from(rest.split(';').next()?.trim()))
    })
    .await;
    let secret_dir = secret_file.parent().unwrap().to_path_buf();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&secret_dir), 0o700, "{}", secret_dir.display());
        assert_eq!(mode(&secret_file), 0o600);
        let name = secret_dir.file_name().unwrap().to_string_lossy().to_string();
        assert_ne!(name, format!("switchboard-local-{}", stack.child.id()), "a predictable name");
    }
    assert!(stack.log().contains("SWITCHBOARD_WEBHOOK_SECRET="), "{}", stack.log());
    let trunks: i64 = sqlx::query_scalar("SELECT count(*) FROM trunks").fetch_one(&pool).await.unwrap();
    assert_eq!(trunks, 2);

    // Edit: a changed limit reaches the database and the node.
    let trunk_file = folder.path().join("trunk-skyetel.yaml");
    let text = std::fs::read_to_string(&trunk_file).unwrap();
    std::fs::write(&trunk_file, text.replace("maxConcurrentCalls: 100", "maxConcurrentCalls: 300")).unwrap();
    let second = wait_applied_after(&pool, &stack, first).await;
    let limit: i32 = sqlx::query_scalar("SELECT max_concurrent_calls FROM trunks WHERE name = 'skyetel-example'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(limit, 300);

    // Add: a new number file.
    let extra = folder.path().join("extra-number.yaml");
    let number = "apiVersion: switchboard.dev/v1alpha1\nkind: PhoneNumber\nmetadata: {name: extra}\nspec: {number: \"+15559990000\", trunkRef: skyetel-example, routingRuleRef: inbound-ai-agent}\n";
    std::fs::write(&extra, number).unwrap();
    let third = wait_applied_after(&pool, &stack, second).await;

    // Break: an invalid value is refused with a clear status; the last good row stays.
    std::fs::write(&extra, number.replace("+15559990000", "5559990000")).unwrap();
    let message: String = eventually("the InvalidSpec status", &stack, || async {
        let row =
            sqlx::query("SELECT reason, message FROM resource_status WHERE kind = 'PhoneNumber' AND name = 'extra'")
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten()?;
        (row.get::<String, _>("reason") == "InvalidSpec").then(|| row.get("message"))
    })
    .await;
    assert!(message.contains("spec.number") && message.contains("extra-number.yaml"), "{message}");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM phone_numbers WHERE number = '+15559990000'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the last good config stays in force");
    assert_eq!(generation(&pool).await, third, "an invalid edit writes no rows");

    // Delete: the file's rows go, and the node applies that too.
    std::fs::remove_file(&extra).unwrap();
    wait_applied_after(&pool, &stack, third).await;
    let gone: i64 = sqlx::query_scalar("SELECT count(*) FROM phone_numbers WHERE number = '+15559990000'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(gone, 0);

    // `switchboard status` shows resources and the node's applied generation.
    let status = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["status", "--database-url", &database.url])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{shown}\n{}", String::from_utf8_lossy(&status.stderr));
    assert!(
        shown.contains(NODE) && shown.contains("default/skyetel-example") && shown.contains("Reconciled"),
        "{shown}"
    );

    // Stop: a clean exit, and the node says it stopped.
    let exit = stack.stop().expect("switchboard local exits after SIGTERM");
    assert!(exit.success(), "exit {exit:?}; log:\n{}", stack.log());
    assert!(!secret_dir.exists(), "the secrets directory is removed on exit");
    let stopped: bool = sqlx::query_scalar("SELECT stopped_at IS NOT NULL FROM nodes WHERE node_id = $1")
        .bind(NODE)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(stopped, "log:\n{}", stack.log());
    pool.close().await;
    let _ = std::fs::remove_file(log);
    database.drop_now().await;
}
