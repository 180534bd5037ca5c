//! The reaper against a real Postgres: one pass at a time, ending the rows of lost nodes only.

use super::*;
use sqlx::Row;

async fn seed(pool: &PgPool) {
    for statement in [
            // "gone" last beat 20 s ago at 1 s intervals; "alive" beats now.
            "INSERT INTO nodes (node_id, hostname, version, heartbeat_at, heartbeat_interval_ms)
             VALUES ('gone', 'h', 'v', now() - interval '20 seconds', 1000), ('alive', 'h', 'v', now(), 1000)",
            "INSERT INTO trunks (namespace, name, provider, gateways, auth_method, registration_enabled,
                registration_expires, inbound_enabled, outbound_enabled, codecs, dtmf_relay, rtp_timeout_seconds,
                options_interval_seconds, failover_timeout_seconds, rate_inbound_per_minute, spec_hash, config_generation)
             VALUES ('ns', 't', 'p', '[]', 'none', false, 3600, true, true, '{PCMU}', true, 30, 30, 5, 0.6, 'h', 1)",
            // Answered 60 s before the node's last heartbeat: 60 billable seconds at 0.6/min.
            "INSERT INTO active_calls (call_uuid, call_id, node_id, namespace, trunk_name, provider, direction,
                from_number, to_number, state, started_at, answered_at)
             VALUES ('00000000-0000-0000-0000-0000000000c1', 'c1', 'gone', 'ns', 't', 'p', 'inbound', '+1', '+2',
                     'answered', now() - interval '81 seconds', now() - interval '80 seconds'),
                    ('00000000-0000-0000-0000-0000000000c2', 'c2', 'alive', 'ns', 't', 'p', 'inbound', '+1', '+2',
                     'setup', now(), NULL)",
            // c1 failed over once already; another call that reused its Call-ID does not count.
            "INSERT INTO cdrs (call_uuid, call_id, attempt, node_id, direction, from_number, to_number, setup_at, end_at)
             VALUES ('00000000-0000-0000-0000-0000000000c1', 'c1', 1, 'gone', 'inbound', '+1', '+2',
                     now() - interval '81 seconds', now() - interval '81 seconds'),
                    ('00000000-0000-0000-0000-0000000000f1', 'c1', 1, 'gone', 'inbound', '+1', '+2',
                     now() - interval '1 day', now() - interval '1 day'),
                    ('00000000-0000-0000-0000-0000000000f1', 'c1', 2, 'gone', 'inbound', '+1', '+2',
                     now() - interval '1 day', now() - interval '1 day')",
            "INSERT INTO call_requests (id, from_number, to_number, state, claimed_by, expires_at, webhook_url) VALUES
                ('00000000-0000-0000-0000-000000000001', '+1', '+2', 'answered', 'gone', now() + interval '1 minute', 'http://h/1'),
                ('00000000-0000-0000-0000-000000000002', '+1', '+2', 'ringing', 'alive', now() + interval '1 minute', 'http://h/2'),
                ('00000000-0000-0000-0000-000000000003', '+1', '+2', 'queued', NULL, now() - interval '1 second', NULL),
                ('00000000-0000-0000-0000-000000000004', '+1', '+2', 'queued', NULL, now() + interval '1 minute', NULL)",
            "INSERT INTO messages (id, direction, from_number, to_number, body, status, claimed_by) VALUES
                ('00000000-0000-0000-0000-00000000000a', 'outbound', '+1', '+2', 'x', 'sending', 'gone'),
                ('00000000-0000-0000-0000-00000000000b', 'outbound', '+1', '+2', 'x', 'sending', 'alive')",
            "INSERT INTO trunk_admissions (namespace, trunk_name, node_id, active) VALUES ('ns', 't', 'gone', 1), ('ns', 't', 'alive', 1)",
        ] {
            sqlx::query(statement).execute(pool).await.expect(statement);
        }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_pass_ends_the_rows_of_lost_nodes_only(pool: PgPool) {
    seed(&pool).await;
    let reaped = reap_once(&pool, 3).await.expect("pass").expect("lock");
    assert_eq!(reaped, Reaped { nodes: vec!["gone".into()], calls: 1, requests: 1, messages: 1, expired: 1 });
    let cdr = sqlx::query(
        "SELECT c.attempt, c.reason, c.hangup_by, c.billable_seconds, c.cost::text AS cost,
                    c.end_at = n.heartbeat_at AS at_last_beat
               FROM cdrs c JOIN nodes n USING (node_id)
              WHERE call_uuid = '00000000-0000-0000-0000-0000000000c1' AND attempt = 2",
    )
    .fetch_one(&pool)
    .await
    .expect("the node-lost CDR");
    assert_eq!(cdr.get::<i32, _>("attempt"), 2);
    assert_eq!(cdr.get::<String, _>("reason"), NODE_LOST);
    assert_eq!(cdr.get::<String, _>("hangup_by"), "system");
    assert_eq!(cdr.get::<i32, _>("billable_seconds"), 60);
    assert_eq!(cdr.get::<String, _>("cost"), "0.600000");
    assert!(cdr.get::<bool, _>("at_last_beat"));
    let calls: Vec<String> =
        sqlx::query_scalar("SELECT call_id FROM active_calls ORDER BY call_id").fetch_all(&pool).await.unwrap();
    assert_eq!(calls, ["c2"]);
    let states: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, error FROM call_requests ORDER BY id").fetch_all(&pool).await.unwrap();
    // Only the failed request with a webhook is owed its final event.
    let owed: Vec<bool> = sqlx::query_scalar("SELECT final_webhook_pending FROM call_requests ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(owed, [true, false, false, false]);
    assert_eq!(states[0], ("failed".into(), Some(NODE_LOST.into())));
    assert_eq!(states[1].0, "ringing");
    assert_eq!(states[2].0, "failed");
    assert!(states[2].1.as_deref().is_some_and(|e| e.starts_with("expired")));
    assert_eq!(states[3].0, "queued");
    let messages: Vec<String> =
        sqlx::query_scalar("SELECT status FROM messages ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(messages, ["failed", "sending"]);
    let admitted: Vec<String> =
        sqlx::query_scalar("SELECT node_id FROM trunk_admissions").fetch_all(&pool).await.unwrap();
    assert_eq!(admitted, ["alive"]);

    // A second pass finds nothing left to do.
    assert_eq!(reap_once(&pool, 3).await.unwrap(), Some(Reaped::default()));
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn one_reaper_at_a_time(pool: PgPool) {
    let mut holder = pool.begin().await.unwrap();
    let _: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert_eq!(reap_once(&pool, 3).await.unwrap(), None, "another pass holds the lock");
    holder.rollback().await.unwrap();
    assert_eq!(reap_once(&pool, 3).await.unwrap(), Some(Reaped::default()));
}
