//! The node's side of `call_commands`: claims the rows the API wrote for this node, hands each
//! to its call and writes the call's answer back (`accepted`, or `rejected` with the reason),
//! which the API is waiting for.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{Command, Intent, Transfers};
use crate::drain::Drain;
use crate::webhook::{CallHooks, Signer};
use switchboard_model::egress::EgressPolicy;

/// How long a call may take to say whether it takes a request (it answers at once unless it
/// is busy with another transfer).
const REPLY_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: Uuid,
    call_id: String,
    body: serde_json::Value,
}

/// Where the transfers' status webhooks go out: a [`crate::webhook::guarded_client`] of the
/// egress policy API-supplied URLs must pass, and the signer.
pub struct Webhooks {
    pub client: reqwest::Client,
    pub signer: Signer,
    pub egress: Arc<EgressPolicy>,
}

/// Claims and delivers this node's call commands until the node stops.
pub async fn run(
    transfers: Transfers,
    pool: PgPool,
    wakeup: Arc<tokio::sync::Notify>,
    node_id: String,
    drain: Drain,
    webhooks: Webhooks,
) {
    let transfers = Arc::new(transfers);
    let (queue, node_id, drain) = (&pool, &node_id, &drain);
    let start = |row: Row| {
        let (transfers, pool) = (Arc::clone(&transfers), pool.clone());
        let webhooks = (webhooks.client.clone(), webhooks.signer.clone(), Arc::clone(&webhooks.egress));
        tokio::spawn(async move {
            let (state, error) = match deliver(&transfers, row.id, &row.call_id, row.body, webhooks).await {
                Ok(()) => ("accepted", None),
                Err(error) => ("rejected", Some(error)),
            };
            tracing::info!(command = %row.id, call = %row.call_id, state, ?error, "transfer request answered");
            let result =
                sqlx::query("UPDATE call_commands SET state = $2, error = $3, updated_at = now() WHERE id = $1")
                    .bind(row.id)
                    .bind(state)
                    .bind(error)
                    .execute(&pool)
                    .await;
            if let Err(error) = result {
                tracing::warn!(%error, "cannot record the answer to a transfer request");
            }
        });
    };
    crate::sip::queue::serve(wakeup, "call commands", move || claim(queue, node_id, drain), start).await;
}

async fn claim(pool: &PgPool, node_id: &str, drain: &Drain) -> Result<Option<Row>, sqlx::Error> {
    if drain.is_ending() {
        return Ok(None);
    }
    sqlx::query_as(
        "UPDATE call_commands SET state = 'claimed', updated_at = now()
          WHERE id = (SELECT id FROM call_commands WHERE node_id = $1 AND state = 'queued' ORDER BY created_at
                      FOR UPDATE SKIP LOCKED LIMIT 1)
          RETURNING id, call_id, body",
    )
    .bind(node_id)
    .fetch_optional(pool)
    .await
}

/// Hands the request to its call and waits for the call's answer.
async fn deliver(
    transfers: &Transfers,
    id: Uuid,
    call_sid: &str,
    body: serde_json::Value,
    (client, signer, egress): (reqwest::Client, Signer, Arc<EgressPolicy>),
) -> Result<(), String> {
    let action = Intent::from_body(body).map_err(|e| format!("unreadable request: {e}"))?;
    let webhook = match &action {
        Intent::Transfer(request) => request.webhook_url.clone(),
        Intent::Complete | Intent::Cancel | Intent::Dtmf(_) => None,
    };
    let hooks = CallHooks::start_guarded(client, signer, webhook, &egress);
    let (reply, answer) = oneshot::channel();
    if !transfers.deliver(call_sid, Command { id, action, reply, hooks, egress }) {
        return Err("the call is not connected to an AI agent on this node".into());
    }
    match tokio::time::timeout(REPLY_WAIT, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err("the call ended".into()),
        Err(_) => Err("the call is busy (a transfer is in progress)".into()),
    }
}
