//! Tests of the node's wiring: arguments, start-up against a missing or unmigrated database.

use std::time::Duration;

use clap::Parser;

use super::*;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
}

fn parse(args: &[&str]) -> Result<NodeArgs, clap::Error> {
    let mut argv = vec!["switchboard-node", "--database-url", "postgres://u@h/db"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).map(|cli| cli.node)
}

fn args(database_url: &str) -> NodeArgs {
    NodeArgs {
        database_url: database_url.into(),
        node_id: Some("test-node".into()),
        heartbeat_interval_ms: 5000,
        config_poll_interval_ms: 5000,
        drain_seconds: 20,
        state_dir: Some(std::env::temp_dir().join(format!("switchboard-node-tests-{}", std::process::id()))),
        spool_dir: None,
        spool_max_bytes: 1 << 20,
        database_start_timeout_seconds: 5,
        sip: crate::signaling::SipArgs {
            sip_listen: vec!["127.0.0.1:0".parse().unwrap()],
            advertised_host: None,
            advertised_port: None,
            http_listen: "127.0.0.1:0".parse().unwrap(),
            sip_t1_ms: 500,
            per_source_rate: 20_000,
            webhook_secret: Some("test-webhook-secret".into()),
            egress_allow: vec![],
            rtp_ports: "30000-39999".into(),
            media_threads: 0,
            kernel_forwarding: crate::media::kernel::KernelMode::Auto,
            media_timeout_seconds: 30,
            final_codes: crate::sip::routing::DEFAULT_FINAL_CODES.to_vec(),
            agent: crate::bridge::answer::AgentArgs::default(),
            spool: None,
            guard: crate::sip::guard::GuardArgs::default(),
            tls: crate::sip::tls::TlsArgs::default(),
            session: Default::default(),
        },
    }
}

#[test]
fn arguments_have_sensible_defaults() {
    let args = parse(&[]).expect("defaults");
    assert_eq!((args.heartbeat_interval_ms, args.config_poll_interval_ms), (5000, 5000));
    let args = parse(&["--node-id", "pod-1", "--heartbeat-interval-ms", "250", "--config-poll-interval-ms", "100"])
        .expect("explicit values");
    assert_eq!(args.node_id.as_deref(), Some("pod-1"));
    assert_eq!((args.heartbeat_interval_ms, args.config_poll_interval_ms), (250, 100));
}

#[test]
fn intervals_out_of_range_are_refused_by_the_parser() {
    for bad in ["0", "-5", "86400001", "18446744073709551615", "soon"] {
        assert!(parse(&["--heartbeat-interval-ms", bad]).is_err(), "heartbeat {bad}");
        assert!(parse(&["--config-poll-interval-ms", bad]).is_err(), "poll {bad}");
    }
}

#[test]
fn passwords_never_reach_the_log() {
    assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
    assert_eq!(redact_url("postgres://u:secret@h:notaport/db?x=1"), "postgres://u:***@h:notaport/db?x=1");
    assert_eq!(redact_url("postgres://u:p@ss@h:x/db"), "postgres://u:***@h:x/db");
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact_url("not a url"), "not a url");
    assert_eq!(redact_url(""), "");
}

#[tokio::test]
async fn an_unusable_url_is_an_error_not_a_retry_loop() {
    for url in ["mysql://nowhere/db", "not a url", "postgres://u:secret@h:notaport/db"] {
        let result = tokio::time::timeout(Duration::from_secs(10), run(args(url))).await;
        let error = result.expect("returns promptly").expect_err("not a usable Postgres URL");
        assert!(error.to_string().contains("is not usable"), "{url}: {error:#}");
        assert!(!error.to_string().contains("secret"), "{url}: {error:#}");
    }

    let result =
        tokio::time::timeout(Duration::from_secs(10), run(NodeArgs { node_id: Some("  ".into()), ..args("x") })).await;
    let error = result.expect("returns promptly").expect_err("blank node id");
    assert!(error.to_string().contains("--node-id"), "{error:#}");
}

#[tokio::test]
async fn an_unreachable_database_is_waited_for() {
    // Nothing listens on port 1: the node must keep retrying rather than exit.
    let result =
        tokio::time::timeout(Duration::from_secs(2), run(args("postgres://postgres:secret@127.0.0.1:1/postgres")))
            .await;
    assert!(result.is_err(), "run returned {result:?} while the database was unreachable");
}

#[sqlx::test(migrations = false)]
async fn an_unmigrated_schema_is_reported_and_waited_for(pool: PgPool) {
    assert_eq!(schema_state(&pool).await, SchemaState::NotMigrated);
    let waiting = tokio::time::timeout(Duration::from_millis(500), wait_for_schema(&pool)).await;
    assert!(waiting.is_err(), "wait_for_schema returned before the schema existed");

    switchboard_model::db::migrate(&pool).await.expect("migrate");
    tokio::time::timeout(Duration::from_secs(10), wait_for_schema(&pool)).await.expect("schema is ready");
    assert_eq!(schema_state(&pool).await, SchemaState::Ready);
}

#[test]
fn state_flags_have_defaults_and_bounds() {
    let args = parse(&[]).expect("defaults");
    assert_eq!((args.state_dir, args.spool_dir), (None, None));
    assert_eq!((args.spool_max_bytes, args.database_start_timeout_seconds), (1 << 30, 5));
    assert!(parse(&["--spool-max-bytes", "100"]).is_err(), "a spool smaller than a page");
    assert!(parse(&["--database-start-timeout-seconds", "0"]).is_err());
    let args = parse(&["--state-dir", "/data/sb", "--spool-dir", "off"]).expect("explicit");
    assert_eq!(args.state_dir.as_deref(), Some(std::path::Path::new("/data/sb")));
}

#[test]
fn the_state_directory_is_the_nodes_own_and_an_explicit_unusable_one_is_an_error() {
    let base = tempfile::tempdir().expect("tempdir");
    let dir = super::state_dir(Some(base.path()), "../escape/..").expect("created").expect("a directory");
    assert_eq!(dir.parent(), Some(base.path()), "{}", dir.display());
    assert!(dir.is_dir());
    let file = tempfile::NamedTempFile::new().expect("file");
    let error = super::state_dir(Some(file.path()), "node-a").expect_err("a file is not a directory");
    assert!(error.to_string().contains("--state-dir"), "{error}");
}
