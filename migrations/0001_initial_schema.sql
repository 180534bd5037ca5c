-- Switchboard's database schema: the one definition of what the operator writes (desired
-- configuration, resource status) and what SIP nodes read and write back (heartbeats,
-- registrations, calls, CDRs, messages, call requests).
--
-- Conventions:
--   * resources are keyed by (namespace, name) as in Kubernetes; references between resources
--     are stored by name, never as foreign keys, because a reference may dangle until the other
--     resource appears (the resource is then stored with Ready=False).
--   * money is NUMERIC, never a float.
--   * config_generation is bumped once per reconciled change, in the same transaction as the
--     rows it covers; every config row records the generation that last changed it.

-- The monotonically increasing configuration generation (a single row).
CREATE TABLE config_state (
    singleton   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    generation  BIGINT NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO config_state (singleton, generation) VALUES (TRUE, 0);

-- Trunks: a connection to a wholesale provider.
CREATE TABLE trunks (
    namespace                 TEXT NOT NULL,
    name                      TEXT NOT NULL,
    provider                  TEXT NOT NULL,
    display_name              TEXT,
    suspended                 BOOLEAN NOT NULL DEFAULT FALSE,
    -- [{address, port, transport, priority, weight, enabled}], ordered as in the spec
    gateways                  JSONB NOT NULL,
    registrar_address         TEXT,
    registrar_port            INTEGER,
    realm                     TEXT,
    auth_method               TEXT NOT NULL CHECK (auth_method IN ('none', 'digest', 'ip', 'certificate')),
    registration_enabled      BOOLEAN NOT NULL,
    registration_expires      INTEGER NOT NULL,
    inbound_enabled           BOOLEAN NOT NULL,
    allowed_source_cidrs      CIDR[] NOT NULL DEFAULT '{}',
    outbound_enabled          BOOLEAN NOT NULL,
    dial_prefix               TEXT,
    strip_digits              INTEGER NOT NULL DEFAULT 0,
    prepend_digits            TEXT,
    max_concurrent_calls      INTEGER,
    calls_per_second          INTEGER,
    codecs                    TEXT[] NOT NULL,
    dtmf_relay                BOOLEAN NOT NULL,
    rtp_timeout_seconds       INTEGER NOT NULL,
    options_interval_seconds  INTEGER NOT NULL,
    failover_timeout_seconds  INTEGER NOT NULL,
    backup_trunks             TEXT[] NOT NULL DEFAULT '{}',
    rate_outbound_per_minute  NUMERIC(12, 6) NOT NULL DEFAULT 0,
    rate_inbound_per_minute   NUMERIC(12, 6) NOT NULL DEFAULT 0,
    rate_per_message          NUMERIC(12, 6) NOT NULL DEFAULT 0,
    currency                  TEXT NOT NULL DEFAULT 'USD',
    spec_hash                 TEXT NOT NULL,
    config_generation         BIGINT NOT NULL,
    updated_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

-- Credentials resolved from the trunk's Secret. Kept apart from trunks so that the secret
-- material is in one table with its own access rules; never returned by any API.
CREATE TABLE credentials (
    namespace          TEXT NOT NULL,
    trunk_name         TEXT NOT NULL,
    username           TEXT NOT NULL,
    password           TEXT NOT NULL,
    secret_name        TEXT NOT NULL,
    config_generation  BIGINT NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, trunk_name)
);

-- Phone numbers (DIDs). A number is unique across all namespaces: the carrier delivers it to
-- exactly one place.
CREATE TABLE phone_numbers (
    namespace           TEXT NOT NULL,
    name                TEXT NOT NULL,
    number              TEXT NOT NULL CHECK (number ~ '^\+[1-9][0-9]{1,14}$'),
    trunk_ref           TEXT NOT NULL,
    routing_rule_ref    TEXT,
    -- inline destination when no rule is referenced: {"type": "websocket"|"sip"|"number"|"reject", ...}
    destination         JSONB,
    message_webhook     TEXT,
    caller_id_allowed   BOOLEAN NOT NULL DEFAULT TRUE,
    spec_hash           TEXT NOT NULL,
    config_generation   BIGINT NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);
-- number -> resource, the first lookup of every inbound call
CREATE UNIQUE INDEX phone_numbers_number_key ON phone_numbers (number);
CREATE INDEX phone_numbers_trunk_ref_idx ON phone_numbers (namespace, trunk_ref);
CREATE INDEX phone_numbers_rule_ref_idx ON phone_numbers (namespace, routing_rule_ref);

-- Routing rules: where inbound calls go, and which trunks outbound calls take.
CREATE TABLE routing_rules (
    namespace           TEXT NOT NULL,
    name                TEXT NOT NULL,
    direction           TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    priority            INTEGER NOT NULL DEFAULT 100,
    -- {"numbers": [...], "callerPatterns": [...], "destinationPatterns": [...]}
    match_spec          JSONB NOT NULL,
    destination         JSONB,
    trunks              TEXT[] NOT NULL DEFAULT '{}',
    trunk_selection     TEXT NOT NULL DEFAULT 'ordered' CHECK (trunk_selection IN ('ordered', 'cheapest')),
    status_callback     TEXT,
    spec_hash           TEXT NOT NULL,
    config_generation   BIGINT NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);
CREATE INDEX routing_rules_direction_priority_idx ON routing_rules (direction, priority);

-- What the reconciler observed for each resource: the status conditions the operator (or the
-- local `status` command) reports. Kept for invalid resources too, whose rows above keep their
-- last good configuration.
CREATE TABLE resource_status (
    kind                 TEXT NOT NULL CHECK (kind IN ('Trunk', 'PhoneNumber', 'RoutingRule')),
    namespace            TEXT NOT NULL,
    name                 TEXT NOT NULL,
    observed_generation  BIGINT,
    ready                BOOLEAN NOT NULL,
    reason               TEXT NOT NULL,
    message              TEXT NOT NULL,
    -- the Kubernetes-shaped condition list
    conditions           JSONB NOT NULL DEFAULT '[]',
    -- where the desired state came from (a file path, "kubernetes", "api")
    origin               TEXT,
    -- the config generation that holds the resource's current rows (NULL: none stored)
    config_generation    BIGINT,
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, namespace, name)
);

-- SIP nodes: heartbeats and the configuration generation each has applied.
CREATE TABLE nodes (
    node_id             TEXT PRIMARY KEY,
    hostname            TEXT NOT NULL,
    version             TEXT NOT NULL,
    sip_addresses       TEXT[] NOT NULL DEFAULT '{}',
    started_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    applied_generation  BIGINT NOT NULL DEFAULT 0,
    applied_at          TIMESTAMPTZ,
    stopped_at          TIMESTAMPTZ
);
CREATE INDEX nodes_heartbeat_idx ON nodes (heartbeat_at);

-- Registration state of each node towards each trunk that registers.
CREATE TABLE registrations (
    node_id            TEXT NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
    namespace          TEXT NOT NULL,
    trunk_name         TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('registering', 'registered', 'failed', 'unregistered')),
    registrar          TEXT,
    expires_at         TIMESTAMPTZ,
    last_error         TEXT,
    last_attempt_at    TIMESTAMPTZ,
    -- OPTIONS keepalive results towards the trunk's gateways
    reachable          BOOLEAN,
    last_options_at    TIMESTAMPTZ,
    options_rtt_ms     INTEGER,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, namespace, trunk_name)
);
CREATE INDEX registrations_trunk_idx ON registrations (namespace, trunk_name);

-- Calls in progress; a row exists from the first INVITE until the call ends.
CREATE TABLE active_calls (
    call_id          TEXT PRIMARY KEY,
    node_id          TEXT NOT NULL,
    namespace        TEXT,
    trunk_name       TEXT,
    provider         TEXT,
    direction        TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    from_number      TEXT NOT NULL,
    to_number        TEXT NOT NULL,
    state            TEXT NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    answered_at      TIMESTAMPTZ
);
CREATE INDEX active_calls_trunk_idx ON active_calls (namespace, trunk_name);
CREATE INDEX active_calls_node_idx ON active_calls (node_id);

-- One CDR per call attempt (a call that fails over has several).
CREATE TABLE cdrs (
    id                BIGSERIAL PRIMARY KEY,
    call_id           TEXT NOT NULL,
    attempt           INTEGER NOT NULL DEFAULT 1,
    node_id           TEXT NOT NULL,
    namespace         TEXT,
    trunk_name        TEXT,
    provider          TEXT,
    gateway           TEXT,
    direction         TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    from_number       TEXT NOT NULL,
    to_number         TEXT NOT NULL,
    setup_at          TIMESTAMPTZ NOT NULL,
    ring_at           TIMESTAMPTZ,
    answer_at         TIMESTAMPTZ,
    end_at            TIMESTAMPTZ NOT NULL,
    sip_code          INTEGER,
    reason            TEXT,
    hangup_by         TEXT CHECK (hangup_by IN ('caller', 'callee', 'system')),
    billable_seconds  INTEGER NOT NULL DEFAULT 0,
    cost              NUMERIC(14, 6) NOT NULL DEFAULT 0,
    currency          TEXT NOT NULL DEFAULT 'USD',
    UNIQUE (call_id, attempt)
);
CREATE INDEX cdrs_setup_at_idx ON cdrs (setup_at);
CREATE INDEX cdrs_trunk_setup_idx ON cdrs (namespace, trunk_name, setup_at);
CREATE INDEX cdrs_provider_setup_idx ON cdrs (provider, setup_at);

-- SMS over SIP MESSAGE, both directions.
CREATE TABLE messages (
    id                 UUID PRIMARY KEY,
    direction          TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    namespace          TEXT,
    trunk_name         TEXT,
    from_number        TEXT NOT NULL,
    to_number          TEXT NOT NULL,
    body               TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('queued', 'sending', 'sent', 'delivered', 'failed', 'received')),
    sip_code           INTEGER,
    error              TEXT,
    cost               NUMERIC(14, 6) NOT NULL DEFAULT 0,
    claimed_by         TEXT,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX messages_created_idx ON messages (created_at);
CREATE INDEX messages_queued_idx ON messages (created_at) WHERE status = 'queued';

-- Outbound call requests from the API, taken by exactly one node (SELECT ... FOR UPDATE SKIP LOCKED).
CREATE TABLE call_requests (
    id                 UUID PRIMARY KEY,
    from_number        TEXT NOT NULL,
    to_number          TEXT NOT NULL,
    webhook_url        TEXT,
    -- optional destination override for the answered call (e.g. an agent WebSocket URL)
    destination        JSONB,
    routing_rule_ref   TEXT,
    state              TEXT NOT NULL CHECK (state IN ('queued', 'claimed', 'ringing', 'answered', 'completed', 'failed')),
    claimed_by         TEXT,
    call_id            TEXT,
    error              TEXT,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_at         TIMESTAMPTZ,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX call_requests_queued_idx ON call_requests (created_at) WHERE state = 'queued';
