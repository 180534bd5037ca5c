//! Calls placed through the REST API: the API queues a row in `call_requests`; every node
//! listens for them, exactly one claims each (`FOR UPDATE SKIP LOCKED`), places the call through
//! the from-number's trunks with failover, reports `initiated`, `ringing`, `answered` and
//! `completed`/`failed` to the request's webhook, and writes the request's state. Like an
//! inbound call, the call has an `active_calls` row while it is placed and up, and one CDR per
//! attempt (a failed-over attempt gets its own).
//!
//! Media (`media.rs`): the offer carries the node's address and a port pair from its range;
//! a request with an agent WebSocket URL (or a routing rule whose destination is one) bridges
//! the answered callee to the agent. Without an agent the callee hears silence.
//!
//! Session timers (RFC 4028): the INVITE offers the node's interval like every leg the node
//! places (a `422` is retried by the invite client), and the answered callee's leg runs its
//! timer on the connected machine: the node refreshes when the callee does not (a re-INVITE
//! with the node's current SDP), answers the callee's refreshes, and ends an expired session.

//!
//! The modules: `attempts` (trunks, gateways, the outbound INVITE, failover), `record` (how an
//! attempt ended, its CDR), `connected` (the answered call on the connected machine),
//! `media` (offer, answer and the agent bridge).

mod attempts;
mod connected;
mod media;
mod record;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use switchboard_model::egress::EgressPolicy;
use uuid::Uuid;

use self::attempts::{CallTarget, Placing, dial};
use self::record::{Ended, write_cdr};
use super::context::NodeContext;
use super::routing;
use crate::drain::Drain;
use crate::metrics::CallStatus;
use crate::store::{StoreEvent, cdr_cost};
use crate::webhook::{CallHooks, Signer};

/// Channel the API notifies on when it queues a call.
pub const CHANNEL: &str = "switchboard_call_requests";
/// Longest an API call may last before the node hangs up.
const MAX_DURATION: Duration = Duration::from_secs(4 * 3600);
/// How long the callee may ring.
const RING_TIMEOUT: Duration = Duration::from_secs(60);

/// A claimed request.
#[derive(Debug, Clone, sqlx::FromRow)]
struct CallRequest {
    id: Uuid,
    from_number: String,
    to_number: String,
    webhook_url: Option<String>,
    /// `{"type": "websocket", "url": ...}` when the API named an agent.
    destination: Option<serde_json::Value>,
    /// A routing rule whose destination the answered call takes.
    routing_rule_ref: Option<String>,
}

/// The agent an answered API call is bridged to.
struct AgentUrl {
    url: String,
    /// The API client chose it (checked against the egress policy), rather than a RoutingRule
    /// the deployment's own configuration holds.
    from_client: bool,
}

impl CallRequest {
    /// The agent the answered call is bridged to: the request's own WebSocket destination, else
    /// the named routing rule's (in the from-number's namespace).
    fn agent_url(&self, snapshot: &crate::config::Snapshot, namespace: Option<&str>) -> Option<AgentUrl> {
        if let Some(destination) = &self.destination
            && destination["type"] == "websocket"
        {
            return destination["url"].as_str().map(|url| AgentUrl { url: url.to_string(), from_client: true });
        }
        let rule = snapshot.rule(namespace?, self.routing_rule_ref.as_deref()?)?;
        let destination = rule.destination.as_ref()?;
        (destination.kind == switchboard_model::DestinationType::Websocket)
            .then(|| destination.url.clone())
            .flatten()
            .map(|url| AgentUrl { url, from_client: false })
    }
}

/// A status callback body.
#[derive(Debug, Serialize)]
struct StatusEvent<'a> {
    call_id: String,
    request_id: String,
    status: &'a str,
    from_number: &'a str,
    to_number: &'a str,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sip_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Claims and places queued calls until the node stops.
/// `egress` decides which webhook and agent targets the API's clients may name; `client` is a
/// [`crate::webhook::guarded_client`] of it.
pub async fn run(
    ctx: Arc<NodeContext>,
    pool: PgPool,
    wakeup: Arc<tokio::sync::Notify>,
    signer: Signer,
    egress: Arc<EgressPolicy>,
    client: reqwest::Client,
) {
    let (queue, node_id) = (&pool, &ctx.node_id);
    let start = |request: CallRequest| {
        let hooks = CallHooks::start_guarded(client.clone(), signer.clone(), request.webhook_url.clone(), &egress);
        let span = tracing::info_span!("api_call", request = %request.id);
        let call = place(Arc::clone(&ctx), pool.clone(), request, hooks, Arc::clone(&egress));
        tokio::spawn(tracing::Instrument::instrument(call, span));
    };
    let drain = &ctx.drain;
    super::queue::serve(wakeup, "call requests", move || claim(queue, node_id, drain), start).await;
}

/// Claims the oldest queued request, unless the node is draining (another node takes it).
async fn claim(pool: &PgPool, node_id: &str, drain: &Drain) -> Result<Option<CallRequest>, sqlx::Error> {
    if drain.is_draining() {
        return Ok(None);
    }
    sqlx::query_as(
        "UPDATE call_requests SET state = 'claimed', claimed_by = $1, claimed_at = now(), updated_at = now()
         WHERE id = (SELECT id FROM call_requests WHERE state = 'queued' AND expires_at > now() ORDER BY created_at
                     FOR UPDATE SKIP LOCKED LIMIT 1)
           -- a node whose row says it drains claims nothing (another process of the same node id
           -- may be the one draining)
           AND NOT EXISTS (SELECT 1 FROM nodes WHERE node_id = $1 AND draining_at IS NOT NULL)
         RETURNING id, from_number, to_number, webhook_url, destination, routing_rule_ref",
    )
    .bind(node_id)
    .fetch_optional(pool)
    .await
}

async fn set_state(pool: &PgPool, id: Uuid, state: &str, call_id: &str, error: Option<&str>) {
    let result =
        sqlx::query("UPDATE call_requests SET state = $2, call_id = $3, error = $4, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(state)
            .bind(call_id)
            .bind(error)
            .execute(pool)
            .await;
    if let Err(error) = result {
        tracing::warn!(%error, "cannot record the call request's state");
    }
}

async fn place(ctx: Arc<NodeContext>, pool: PgPool, request: CallRequest, hooks: CallHooks, egress: Arc<EgressPolicy>) {
    let _active = ctx.metrics.call_active(None);
    let call_uuid = Uuid::new_v4();
    let call_id = format!("{}@switchboard", call_uuid.simple());
    let setup_at = Utc::now();
    let event = |status: &'static str| StatusEvent {
        call_id: call_id.clone(),
        request_id: request.id.to_string(),
        status,
        from_number: &request.from_number,
        to_number: &request.to_number,
        timestamp: Utc::now().to_rfc3339(),
        duration_seconds: None,
        cost: None,
        currency: None,
        sip_code: None,
        reason: None,
    };
    hooks.send(&event("initiated"));
    let snapshot = ctx.snapshot.current();
    let trunks = match snapshot.number(&request.from_number) {
        Some(number) => {
            let mut trunks = routing::outbound_trunks(&snapshot, &number.namespace, &request.to_number, None);
            if trunks.is_empty() {
                trunks =
                    routing::outbound_trunks(&snapshot, &number.namespace, &request.to_number, Some(&number.trunk_ref));
            }
            trunks
        }
        None => vec![],
    };
    let namespace = snapshot.number(&request.from_number).map(|n| n.namespace.clone());
    let agent = request.agent_url(&snapshot, namespace.as_deref());
    let mut media = match ctx.media.as_ref().map(media::ApiMedia::new) {
        Some(Ok(media)) => Some(media),
        Some(Err(error)) => {
            tracing::warn!(%error, "no RTP ports for the API call; its offer has no media port");
            None
        }
        None => None,
    };
    let refused = agent.as_ref().filter(|a| a.from_client).and_then(|a| egress.check_url(&a.url).err());
    let ended = if let Some(error) = refused {
        // Nobody is called for an agent the node will not connect to.
        Ended::unanswered(403, format!("agent_websocket_url refused: {error}"), None)
    } else if agent.is_some() && media.is_none() {
        Ended::unanswered(503, "no RTP ports on this node for the agent bridge".into(), None)
    } else if trunks.is_empty() {
        let reason = format!("no outbound trunk for {} from {}", request.to_number, request.from_number);
        Ended::unanswered(404, reason, None)
    } else {
        let target = CallTarget {
            agent: agent.as_ref().map(|a| (a.url.as_str(), a.from_client.then(|| Arc::clone(&egress)))),
            media: &mut media,
        };
        let placing = Placing {
            ctx: &ctx,
            pool: &pool,
            request: &request,
            hooks: &hooks,
            event: &event,
            call_uuid,
            call_id: &call_id,
            started_at: setup_at,
        };
        dial(&placing, &call_id, target, trunks).await
    };
    let end_at = Utc::now();
    let (billable, cost, currency) = if ended.cdr_written {
        // A failed-over attempt: never answered, nothing billed.
        let currency = ended.trunk.as_ref().map(|t| t.currency.clone()).unwrap_or_else(|| "USD".into());
        (0, cdr_cost(rust_decimal::Decimal::ZERO, 0), currency)
    } else {
        write_cdr(&ctx, &request, (call_uuid, &call_id), &ended, setup_at, end_at)
    };
    ctx.store.record(StoreEvent::CallEnded { call_uuid });
    let answered = ended.answer_at.is_some();
    let provider = ended.trunk.as_ref().map(|t| t.provider.as_str()).unwrap_or("unknown");
    let trunk = ended.trunk.as_ref().map(|t| t.name.as_str()).unwrap_or("unknown");
    let status = if answered { CallStatus::Answered } else { CallStatus::from_final_code(ended.code) };
    let talk_time = ended.answer_at.map(|a| (end_at - a).to_std().unwrap_or_default());
    ctx.metrics.call_ended(provider, trunk, status, talk_time);
    let (state, hook) = if answered { ("completed", "completed") } else { ("failed", "failed") };
    set_state(&pool, request.id, state, &call_id, (!answered).then_some(ended.reason.as_str())).await;
    let mut last = event(hook);
    last.duration_seconds = Some(billable);
    last.cost = Some(cost.to_string());
    last.currency = Some(currency);
    last.sip_code = Some(ended.code);
    last.reason = Some(ended.reason);
    hooks.send(&last);
    tracing::info!(code = ended.code, answered, "API call ended");
}
