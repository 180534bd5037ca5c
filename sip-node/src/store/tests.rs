//! Postgres tests of the store: what arrives, in which order, and that an outage loses nothing.

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use chrono::{SubsecRound as _, TimeDelta};
use sqlx::postgres::PgPoolOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::plan::tests::{call, key, reachability, registration};
use super::*;

const LIMIT: Duration = Duration::from_secs(15);
const NODE: &str = "node-a";

fn options() -> StoreOptions {
    StoreOptions {
        min_retry_delay: Duration::from_millis(20),
        max_retry_delay: Duration::from_millis(200),
        write_timeout: Duration::from_secs(3),
        ..StoreOptions::default()
    }
}

async fn add_node(pool: &PgPool) {
    sqlx::query("INSERT INTO nodes (node_id, hostname, version) VALUES ($1, 'host', 'test')")
        .bind(NODE)
        .execute(pool)
        .await
        .expect("insert node");
}

fn cdr(call_id: &str, attempt: u32) -> CdrRecord {
    let setup_at = Utc::now().trunc_subsecs(6);
    let answer_at = setup_at + TimeDelta::seconds(2);
    let end_at = answer_at + TimeDelta::milliseconds(61_500);
    let billable = billable_seconds(Some(answer_at), end_at);
    CdrRecord {
        call_uuid: key(call_id),
        call_id: call_id.into(),
        attempt,
        namespace: Some("default".into()),
        trunk_name: Some("carrier".into()),
        provider: Some("acme".into()),
        gateway: Some("192.0.2.1:5060".into()),
        direction: Direction::Outbound,
        from_number: "+15550001".into(),
        to_number: "+15550002".into(),
        setup_at,
        ring_at: Some(setup_at + TimeDelta::seconds(1)),
        answer_at: Some(answer_at),
        end_at,
        sip_code: Some(200),
        reason: Some("Normal clearing".into()),
        hangup_by: Some(HangupBy::Callee),
        billable_seconds: billable,
        cost: cdr_cost(Decimal::from_str("0.012").expect("rate"), billable),
        currency: "USD".into(),
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

async fn active_ids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT call_id FROM active_calls ORDER BY call_id").fetch_all(pool).await.expect("active")
}

#[derive(Debug, sqlx::FromRow, PartialEq)]
struct StoredCdr {
    call_id: String,
    attempt: i32,
    node_id: String,
    direction: String,
    sip_code: Option<i32>,
    hangup_by: Option<String>,
    billable_seconds: i32,
    cost: Decimal,
    currency: String,
    answer_at: Option<DateTime<Utc>>,
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn calls_and_cdrs_are_written_in_order(pool: PgPool) {
    let metrics = NodeMetrics::new();
    let (store, task) = Store::spawn_with(pool.clone(), NODE.into(), Some(metrics.clone()), options());

    let answered_at = Utc::now().trunc_subsecs(6);
    store.record(StoreEvent::CallStarted(call("a")));
    store.record(StoreEvent::CallStarted(call("b")));
    store.record(StoreEvent::CallAnswered { call_uuid: key("a"), at: answered_at });
    assert!(store.flush(LIMIT).await, "flush");
    assert_eq!(active_ids(&pool).await, ["a", "b"]);
    let (state, at): (String, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT state, answered_at FROM active_calls WHERE call_id = 'a'")
            .fetch_one(&pool)
            .await
            .expect("call a");
    assert_eq!((state.as_str(), at), ("answered", Some(answered_at)));
    let (node, direction): (String, String) =
        sqlx::query_as("SELECT node_id, direction FROM active_calls WHERE call_id = 'b'")
            .fetch_one(&pool)
            .await
            .expect("call b");
    assert_eq!((node.as_str(), direction.as_str()), (NODE, "inbound"));

    // An answer in a later batch than the start updates the row.
    store.record(StoreEvent::CallAnswered { call_uuid: key("b"), at: answered_at });
    assert!(store.flush(LIMIT).await);
    assert_eq!(count(&pool, "SELECT count(*) FROM active_calls WHERE answered_at IS NOT NULL").await, 2);

    // The end and the CDR; a CDR recorded twice (a retried attempt) is stored once.
    let record = cdr("a", 1);
    store.record(StoreEvent::CallEnded { call_uuid: key("a") });
    store.record(StoreEvent::Cdr(record.clone()));
    store.record(StoreEvent::Cdr(record.clone()));
    store.record(StoreEvent::Cdr(cdr("a", 2)));
    assert!(store.flush(LIMIT).await);
    assert_eq!(active_ids(&pool).await, ["b"]);
    let stored: Vec<StoredCdr> =
        sqlx::query_as("SELECT * FROM cdrs ORDER BY attempt").fetch_all(&pool).await.expect("cdrs");
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[0],
        StoredCdr {
            call_id: "a".into(),
            attempt: 1,
            node_id: NODE.into(),
            direction: "outbound".into(),
            sip_code: Some(200),
            hangup_by: Some("callee".into()),
            billable_seconds: 62,
            cost: Decimal::from_str("0.012400").expect("cost"),
            currency: "USD".into(),
            answer_at: record.answer_at,
        }
    );
    store.record(StoreEvent::Cdr(record));
    assert!(store.flush(LIMIT).await);
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 2);

    // A restarted node clears its leftovers, not another node's calls.
    sqlx::query(
        "INSERT INTO active_calls (call_id, node_id, direction, from_number, to_number, state)
         VALUES ('other', 'node-b', 'inbound', '+1', '+2', 'setup')",
    )
    .execute(&pool)
    .await
    .expect("other node's call");
    store.record(StoreEvent::CallStarted(call("c")));
    store.record(StoreEvent::ClearActiveCalls);
    store.record(StoreEvent::CallStarted(call("d")));
    assert!(store.flush(LIMIT).await);
    assert_eq!(active_ids(&pool).await, ["d", "other"]);

    assert_eq!(store.pending(), 0);
    assert!(metrics.render().contains("switchboard_store_pending 0"));
    assert!(task.shutdown(LIMIT).await);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn small_batches_keep_each_call_in_order(pool: PgPool) {
    let options = StoreOptions { batch_size: 7, ..options() };
    let (store, task) = Store::spawn_with(pool.clone(), NODE.into(), None, options);
    let started = Instant::now();
    for i in 0..300 {
        let id = format!("call-{i:03}");
        store.record(StoreEvent::CallStarted(call(&id)));
        store.record(StoreEvent::CallAnswered { call_uuid: key(&id), at: Utc::now() });
        if i % 3 != 0 {
            store.record(StoreEvent::CallEnded { call_uuid: key(&id) });
            store.record(StoreEvent::Cdr(cdr(&id, 1)));
        }
    }
    assert!(started.elapsed() < Duration::from_secs(1), "recording took {:?}", started.elapsed());
    assert!(store.flush(LIMIT).await);
    assert_eq!(active_ids(&pool).await.len(), 100);
    assert_eq!(count(&pool, "SELECT count(*) FROM active_calls WHERE answered_at IS NULL").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 200);
    assert!(task.shutdown(LIMIT).await);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn registrations_wait_for_the_node_row_and_coalesce(pool: PgPool) {
    let (store, task) = Store::spawn_with(pool.clone(), NODE.into(), None, options());
    store.record(StoreEvent::Registration(registration("main", RegistrationState::Registering)));
    store.record(StoreEvent::Reachability(reachability("backup", false)));
    store.record(StoreEvent::Cdr(cdr("x", 1)));
    // The CDR is written; the registrations wait for the node-state task's row.
    assert!(!store.flush(Duration::from_millis(300)).await, "registrations cannot be written yet");
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM registrations").await, 0);

    let mut registered = registration("main", RegistrationState::Registered);
    registered.expires_at = Some(Utc::now().trunc_subsecs(6) + TimeDelta::seconds(3600));
    store.record(StoreEvent::Registration(registered.clone()));
    store.record(StoreEvent::Reachability(reachability("main", true)));
    add_node(&pool).await;
    assert!(store.flush(LIMIT).await);

    #[derive(Debug, sqlx::FromRow)]
    struct Row {
        trunk_name: String,
        state: String,
        registrar: Option<String>,
        expires_at: Option<DateTime<Utc>>,
        reachable: Option<bool>,
        options_rtt_ms: Option<i32>,
    }
    let rows: Vec<Row> =
        sqlx::query_as("SELECT * FROM registrations ORDER BY trunk_name").fetch_all(&pool).await.expect("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].trunk_name.as_str(), rows[0].state.as_str()), ("backup", "unregistered"));
    assert_eq!((rows[0].reachable, rows[0].options_rtt_ms), (Some(false), None));
    assert_eq!((rows[1].trunk_name.as_str(), rows[1].state.as_str()), ("main", "registered"));
    assert_eq!(rows[1].registrar, registered.registrar);
    assert_eq!(rows[1].expires_at, registered.expires_at);
    assert_eq!((rows[1].reachable, rows[1].options_rtt_ms), (Some(true), Some(12)));

    // A failure keeps the reachability columns; removal deletes the row.
    let mut failed = registration("main", RegistrationState::Failed);
    failed.last_error = Some("403 Forbidden".into());
    store.record(StoreEvent::Registration(failed));
    store.record(StoreEvent::TrunkRemoved { namespace: "default".into(), trunk_name: "backup".into() });
    assert!(store.flush(LIMIT).await);
    let (state, error, reachable): (String, Option<String>, Option<bool>) =
        sqlx::query_as("SELECT state, last_error, reachable FROM registrations WHERE trunk_name = 'main'")
            .fetch_one(&pool)
            .await
            .expect("main");
    assert_eq!((state.as_str(), error.as_deref(), reachable), ("failed", Some("403 Forbidden"), Some(true)));
    assert_eq!(count(&pool, "SELECT count(*) FROM registrations").await, 1);
    assert!(task.shutdown(LIMIT).await);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_row_postgres_refuses_is_dropped_alone(pool: PgPool) {
    let metrics = NodeMetrics::new();
    let (store, task) = Store::spawn_with(pool.clone(), NODE.into(), Some(metrics.clone()), options());
    let mut absurd = cdr("absurd", 1);
    absurd.cost = Decimal::from(1_000_000_000); // beyond NUMERIC(14, 6)
    store.record(StoreEvent::CallStarted(call("kept")));
    store.record(StoreEvent::Cdr(cdr("before", 1)));
    store.record(StoreEvent::Cdr(absurd));
    store.record(StoreEvent::Cdr(cdr("after", 1)));
    assert!(store.flush(LIMIT).await);
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT call_id FROM cdrs ORDER BY call_id").fetch_all(&pool).await.expect("cdrs");
    assert_eq!(ids, ["after", "before"]);
    assert_eq!(active_ids(&pool).await, ["kept"]);
    assert!(metrics.render().contains("switchboard_store_dropped_total 1"), "{}", metrics.render());

    // The store goes on writing afterwards.
    store.record(StoreEvent::CallEnded { call_uuid: key("kept") });
    assert!(store.flush(LIMIT).await);
    assert!(active_ids(&pool).await.is_empty());
    assert!(task.shutdown(LIMIT).await);
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn shutdown_writes_what_is_queued(pool: PgPool) {
    let (store, task) = Store::spawn_with(pool.clone(), NODE.into(), None, options());
    for i in 0..1200 {
        store.record(StoreEvent::Cdr(cdr(&format!("call-{i}"), 1)));
    }
    assert!(task.shutdown(LIMIT).await);
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 1200);
    assert_eq!(store.pending(), 0);
}

/// A TCP proxy to Postgres that the test turns off (refusing new connections and cutting the
/// open ones) and on again.
struct Proxy {
    address: SocketAddr,
    up: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let (up, _) = watch::channel(false);
        let state = up.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                let mut state = state.clone();
                if !*state.borrow_and_update() {
                    continue; // dropped: the connection is closed at once
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { address, up, task }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.task.abort();
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn an_outage_loses_nothing_and_duplicates_nothing(pool: PgPool) {
    add_node(&pool).await;
    let direct = pool.connect_options();
    let target = tokio::net::lookup_host((direct.get_host(), direct.get_port()))
        .await
        .expect("resolve Postgres")
        .next()
        .expect("an address");
    let proxy = Proxy::start(target).await;
    let proxied = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with((*direct).clone().host("127.0.0.1").port(proxy.address.port()));
    let metrics = NodeMetrics::new();
    let (store, task) = Store::spawn_with(proxied.clone(), NODE.into(), Some(metrics.clone()), options());

    // Postgres is unreachable: recording still returns at once and everything stays queued.
    let started = Instant::now();
    for i in 0..100 {
        let id = format!("call-{i:03}");
        store.record(StoreEvent::CallStarted(call(&id)));
        store.record(StoreEvent::CallAnswered { call_uuid: key(&id), at: Utc::now() });
        if i < 50 {
            store.record(StoreEvent::CallEnded { call_uuid: key(&id) });
            store.record(StoreEvent::Cdr(cdr(&id, 1)));
        }
    }
    store.record(StoreEvent::Registration(registration("main", RegistrationState::Registered)));
    assert!(started.elapsed() < Duration::from_secs(1), "recording took {:?}", started.elapsed());
    assert!(!store.flush(Duration::from_millis(700)).await, "nothing can be written through a closed proxy");
    assert_eq!(store.pending(), 301);
    assert!(metrics.render().contains("switchboard_store_pending 301"), "{}", metrics.render());
    assert_eq!(count(&pool, "SELECT count(*) FROM active_calls").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 0);

    proxy.set_up(true);
    assert!(store.flush(LIMIT).await, "written once Postgres is back");
    assert_eq!(active_ids(&pool).await.len(), 50);
    assert_eq!(count(&pool, "SELECT count(*) FROM active_calls WHERE answered_at IS NULL").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 50);
    assert_eq!(count(&pool, "SELECT count(*) FROM registrations WHERE state = 'registered'").await, 1);

    // A second outage cuts the pooled connections; the rest of the calls end meanwhile, and
    // the first 50 CDRs are recorded again (a retried attempt).
    proxy.set_up(false);
    for i in 0..100 {
        let id = format!("call-{i:03}");
        if i >= 50 {
            store.record(StoreEvent::CallEnded { call_uuid: key(&id) });
        }
        store.record(StoreEvent::Cdr(cdr(&id, 1)));
    }
    assert!(!store.flush(Duration::from_millis(500)).await);
    proxy.set_up(true);
    assert!(store.flush(LIMIT).await);
    assert!(active_ids(&pool).await.is_empty());
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 100);
    assert_eq!(count(&pool, "SELECT count(DISTINCT call_id) FROM cdrs").await, 100);
    assert!(metrics.render().contains("switchboard_store_dropped_total 0"));

    assert!(task.shutdown(LIMIT).await);
    proxied.close().await;
}

#[tokio::test]
async fn a_full_store_drops_new_events_and_counts_them() {
    // Nothing listens on port 1: every write fails and the queue fills up.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy("postgres://postgres@127.0.0.1:1/postgres")
        .expect("lazy pool");
    let metrics = NodeMetrics::new();
    let options = StoreOptions { max_pending: 3, batch_size: 1, ..options() };
    let (store, task) = Store::spawn_with(pool, NODE.into(), Some(metrics.clone()), options);
    // The writer holds at most one event in its batch; the queue holds three more.
    for i in 0..10 {
        store.record(StoreEvent::CallEnded { call_uuid: key(&format!("c{i}")) });
        tokio::task::yield_now().await;
    }
    let text = metrics.render();
    let dropped = text
        .lines()
        .find_map(|line| line.strip_prefix("switchboard_store_dropped_total "))
        .and_then(|value| value.parse::<u64>().ok())
        .expect("dropped counter");
    assert!((6..=7).contains(&dropped), "dropped {dropped}\n{text}");
    assert_eq!(store.pending(), 10 - dropped);
    assert!(!task.shutdown(Duration::from_millis(200)).await, "the events could not be written");
}

#[sqlx::test(migrations = false)]
async fn events_wait_for_the_schema(pool: PgPool) {
    // The operator has not migrated the database yet: the store keeps retrying, drops nothing.
    let metrics = NodeMetrics::new();
    let (store, task) = Store::spawn_with(pool.clone(), NODE.into(), Some(metrics.clone()), options());
    store.record(StoreEvent::CallStarted(call("early")));
    store.record(StoreEvent::Cdr(cdr("earlier", 1)));
    assert!(!store.flush(Duration::from_millis(500)).await, "no table to write to yet");
    assert_eq!(store.pending(), 2);

    switchboard_model::db::MIGRATOR.run(&pool).await.expect("migrate");
    assert!(store.flush(LIMIT).await);
    assert_eq!(active_ids(&pool).await, ["early"]);
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 1);
    assert!(metrics.render().contains("switchboard_store_dropped_total 0"));
    assert!(task.shutdown(LIMIT).await);
}

/// With a spool: what Postgres has is compacted away when the store stops, the call still in
/// progress stays; the next start replays it as lost (CDR `node lost`, then its end), and what
/// it replays is written once however often it is replayed.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_spool_keeps_only_calls_in_progress_and_replays_them_as_lost(pool: PgPool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = spool::SpoolOptions { dir: dir.path().join("spool"), max_bytes: 1 << 20, rate_of: None };
    let metrics = NodeMetrics::new();
    let (store, task, replayed) =
        Store::open(pool.clone(), NODE.into(), Some(metrics.clone()), options(), Some(&spool)).expect("open");
    assert_eq!(replayed, spool::Replayed::default());
    store.record(StoreEvent::CallStarted(call("done")));
    store.record(StoreEvent::CallStarted(call("up")));
    store.record(StoreEvent::CallAnswered { call_uuid: key("up"), at: Utc::now().trunc_subsecs(6) });
    store.record(StoreEvent::Cdr(cdr("done", 1)));
    store.record(StoreEvent::CallEnded { call_uuid: key("done") });
    assert!(store.flush(LIMIT).await);
    tokio::time::sleep(spool::SYNC_INTERVAL * 4).await;
    assert!(!metrics.render().contains("switchboard_store_spool_bytes 0\n"), "{}", metrics.render());
    assert!(task.shutdown(LIMIT).await);
    let log = std::fs::read_to_string(spool.dir.join("spool.log")).expect("spool.log");
    assert!(log.contains(&key("up").to_string()) && !log.contains(&key("done").to_string()), "{log}");

    for _ in 0..2 {
        let (store, task, replayed) =
            Store::open(pool.clone(), NODE.into(), None, options(), Some(&spool)).expect("reopen");
        assert!(store.flush(LIMIT).await);
        assert!(task.shutdown(LIMIT).await);
        assert!(replayed.lost <= 1, "{replayed:?}");
    }
    let reasons: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT call_id, reason FROM cdrs ORDER BY call_id").fetch_all(&pool).await.expect("cdrs");
    assert_eq!(
        reasons,
        [("done".to_owned(), Some("Normal clearing".to_owned())), ("up".to_owned(), Some(spool::NODE_LOST.to_owned()))]
    );
    assert!(active_ids(&pool).await.is_empty());
}

/// While Postgres keeps up, the spool is compacted as it goes: after some megabytes of call
/// events it holds little more than the calls still up.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_spool_stays_small_while_postgres_keeps_up(pool: PgPool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = spool::SpoolOptions { dir: dir.path().join("spool"), max_bytes: 64 << 20, rate_of: None };
    let (store, task, _) = Store::open(pool.clone(), NODE.into(), None, options(), Some(&spool)).expect("open");
    let log = spool.dir.join("spool.log");
    let mut largest = 0;
    for i in 0..3000 {
        let id = format!("steady-{i}");
        store.record(StoreEvent::CallStarted(call(&id)));
        store.record(StoreEvent::CallAnswered { call_uuid: key(&id), at: Utc::now() });
        store.record(StoreEvent::Cdr(cdr(&id, 1)));
        store.record(StoreEvent::CallEnded { call_uuid: key(&id) });
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            largest = largest.max(std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0));
        }
    }
    assert!(store.flush(LIMIT).await);
    tokio::time::sleep(spool::SYNC_INTERVAL * 4).await;
    let size = std::fs::metadata(&log).expect("spool.log").len();
    println!("spool while Postgres keeps up: largest {largest} bytes, now {size} bytes, after 3,000 calls");
    assert!(largest < 4 << 20, "the spool grew to {largest} bytes: it is not compacted while Postgres keeps up");
    assert_eq!(count(&pool, "SELECT count(*) FROM cdrs").await, 3000);
    assert!(task.shutdown(LIMIT).await);
}
