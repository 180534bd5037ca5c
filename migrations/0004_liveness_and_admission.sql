-- Node liveness, draining, expiring call requests and trunk limits held across nodes.
--
-- * A node writes its heartbeat interval, so that "not seen for N heartbeats" means the same
--   thing whatever interval a node runs with, and says when it began to drain.
-- * `live_nodes` is the one definition of a live node that reads join on (the API's active
--   calls and trunk counters): not stopped, heard from within 3 of its own heartbeats.
-- * Queued call requests expire: a request nobody claims in time is failed by the reaper
--   instead of being dialled hours later.
-- * `trunk_admissions` / `trunk_rate` and `switchboard_admit` hold maxConcurrentCalls and
--   callsPerSecond across every node that serves a trunk.

ALTER TABLE nodes
    ADD COLUMN heartbeat_interval_ms INTEGER NOT NULL DEFAULT 5000 CHECK (heartbeat_interval_ms > 0),
    -- set while the node drains (SIGTERM): it keeps its calls, takes no new ones
    ADD COLUMN draining_at TIMESTAMPTZ;

CREATE VIEW live_nodes AS
    SELECT node_id, heartbeat_at, draining_at, applied_generation, applied_at
      FROM nodes
     WHERE stopped_at IS NULL
       AND heartbeat_at > now() - 3 * heartbeat_interval_ms * interval '1 millisecond';

ALTER TABLE call_requests
    ADD COLUMN expires_at TIMESTAMPTZ NOT NULL DEFAULT now() + interval '60 seconds',
    -- the reaper failed the request (node lost, expired): a live node owes its webhook `failed`
    ADD COLUMN final_webhook_pending BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX call_requests_final_webhook_idx ON call_requests (updated_at) WHERE final_webhook_pending;
CREATE INDEX call_requests_claimed_idx ON call_requests (claimed_by) WHERE state IN ('claimed', 'ringing', 'answered');
CREATE INDEX messages_sending_idx ON messages (claimed_by) WHERE status = 'sending';

-- Calls each node holds on each trunk, as admitted by `switchboard_admit`. Per node, so that
-- the reaper can give back the calls of a node that died.
CREATE TABLE trunk_admissions (
    namespace   TEXT NOT NULL,
    trunk_name  TEXT NOT NULL,
    node_id     TEXT NOT NULL,
    active      INTEGER NOT NULL DEFAULT 0 CHECK (active >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, trunk_name, node_id)
);
CREATE INDEX trunk_admissions_node_idx ON trunk_admissions (node_id);

-- Calls admitted on each trunk in the current second (the database's clock), all nodes.
CREATE TABLE trunk_rate (
    namespace   TEXT NOT NULL,
    trunk_name  TEXT NOT NULL,
    second      BIGINT NOT NULL,
    admitted    INTEGER NOT NULL,
    PRIMARY KEY (namespace, trunk_name)
);

-- Admits one call on a trunk for a node, or says which limit refuses it: 'ok', 'concurrent' or
-- 'rate'. One statement for the caller (one round trip); calls of one trunk are serialised by
-- a transaction-level advisory lock, and each statement below takes a fresh snapshot (the
-- function is VOLATILE), so the count sees every admission committed before the lock was
-- granted. Calls of nodes that are not live do not count: the reaper removes them.
CREATE FUNCTION switchboard_admit(p_namespace TEXT, p_trunk TEXT, p_node TEXT, p_max INTEGER, p_cps INTEGER)
RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held INTEGER;
    now_second BIGINT := floor(extract(epoch FROM clock_timestamp()))::BIGINT;
    this_second INTEGER;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('switchboard_admit/' || p_namespace || '/' || p_trunk, 0));
    IF p_max IS NOT NULL THEN
        SELECT coalesce(sum(a.active), 0) INTO held
          FROM trunk_admissions a
         WHERE a.namespace = p_namespace AND a.trunk_name = p_trunk
           AND (a.node_id = p_node OR a.node_id IN (SELECT node_id FROM live_nodes));
        IF held >= p_max THEN
            RETURN 'concurrent';
        END IF;
    END IF;
    IF p_cps IS NOT NULL THEN
        SELECT CASE WHEN r.second = now_second THEN r.admitted ELSE 0 END INTO this_second
          FROM trunk_rate r WHERE r.namespace = p_namespace AND r.trunk_name = p_trunk;
        IF coalesce(this_second, 0) >= p_cps THEN
            RETURN 'rate';
        END IF;
        INSERT INTO trunk_rate (namespace, trunk_name, second, admitted)
             VALUES (p_namespace, p_trunk, now_second, 1)
        ON CONFLICT (namespace, trunk_name) DO UPDATE
              SET admitted = CASE WHEN trunk_rate.second = now_second THEN trunk_rate.admitted + 1 ELSE 1 END,
                  second = now_second;
    END IF;
    INSERT INTO trunk_admissions (namespace, trunk_name, node_id, active, updated_at)
         VALUES (p_namespace, p_trunk, p_node, 1, now())
    ON CONFLICT (namespace, trunk_name, node_id) DO UPDATE
          SET active = trunk_admissions.active + 1, updated_at = now();
    RETURN 'ok';
END;
$$;
