-- Commands for calls in progress, from the REST API to the node that holds the call (today:
-- transfers, `POST /api/calls/{call_id}/transfer`).
--
-- The API writes a row for the node its `active_calls` row names and NOTIFYs
-- `switchboard_call_commands`; that node claims the row, hands it to the call and writes the
-- call's answer back (`accepted`, or `rejected` with the reason in `error`), which the API
-- waits for. A transfer's outbound legs are recorded as further CDR attempts of the
-- transferred call (same `call_uuid`, direction outbound, reason starting with `transfer:`).

CREATE TABLE call_commands (
    id          UUID PRIMARY KEY,
    -- The call's SIP Call-ID: the agent's `callSid`.
    call_id     TEXT NOT NULL,
    call_uuid   UUID NOT NULL,
    node_id     TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('transfer')),
    body        JSONB NOT NULL,
    state       TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'claimed', 'accepted', 'rejected')),
    error       TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX call_commands_node_state_idx ON call_commands (node_id, state, created_at);
