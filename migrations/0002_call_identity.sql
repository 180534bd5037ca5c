-- Calls are identified by an id the node generates (a UUID), not by the caller's SIP Call-ID.
--
-- A Call-ID is chosen by whoever sends the INVITE: a carrier that reuses one (or two carriers
-- that pick the same) made the second call's CDR vanish under `ON CONFLICT (call_id, attempt)
-- DO NOTHING`, an unbilled call. The SIP Call-ID stays as a column for searching and support.
--
-- Rows written before this migration get a UUID derived from their Call-ID (md5), so that the
-- attempts of one call keep sharing one id. Writers that do not know an id (older nodes during
-- a rolling update, tools) get a fresh one from the default.

ALTER TABLE cdrs ADD COLUMN call_uuid UUID;
UPDATE cdrs SET call_uuid = md5(call_id)::uuid;
ALTER TABLE cdrs
    ALTER COLUMN call_uuid SET NOT NULL,
    ALTER COLUMN call_uuid SET DEFAULT gen_random_uuid(),
    DROP CONSTRAINT cdrs_call_id_attempt_key,
    ADD CONSTRAINT cdrs_call_uuid_attempt_key UNIQUE (call_uuid, attempt);
CREATE INDEX cdrs_call_id_idx ON cdrs (call_id);

ALTER TABLE active_calls ADD COLUMN call_uuid UUID;
UPDATE active_calls SET call_uuid = md5(call_id)::uuid;
ALTER TABLE active_calls
    ALTER COLUMN call_uuid SET NOT NULL,
    ALTER COLUMN call_uuid SET DEFAULT gen_random_uuid(),
    DROP CONSTRAINT active_calls_pkey,
    ADD PRIMARY KEY (call_uuid);
CREATE INDEX active_calls_call_id_idx ON active_calls (call_id);
