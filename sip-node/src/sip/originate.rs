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

mod media;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response};
use serde::Serialize;
use sqlx::PgPool;
use switchboard_model::egress::EgressPolicy;
use switchboard_model::{Direction, TrunkConfig};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::ALLOW;
use super::context::NodeContext as CallContext;
use super::dialog::Dialog;
use super::endpoint::{TuEvent, TuSender};
use super::invite_client::{InviteClient, InviteEvent, InviteSetup, failover_timeout};
use super::message;
use super::routing;
use super::transaction::new_tag;
use super::transport::Peer;
use crate::drain::Drain;
use crate::metrics::CallStatus;
use crate::store::{ActiveCall, CallState, CdrRecord, HangupBy, StoreEvent, billable_seconds, cdr_cost};
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
    ctx: Arc<CallContext>,
    pool: PgPool,
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
    super::queue::serve(queue, CHANNEL, "call requests", move || claim(queue, node_id, drain), start).await;
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

/// How the outbound call ended.
struct Ended {
    code: u16,
    reason: String,
    trunk: Option<Arc<TrunkConfig>>,
    gateway: Option<String>,
    answer_at: Option<chrono::DateTime<Utc>>,
    ring_at: Option<chrono::DateTime<Utc>>,
    hangup_by: HangupBy,
    attempt: u32,
    /// When the attempt's INVITE went out (`None`: no attempt was made).
    setup_at: Option<chrono::DateTime<Utc>>,
    /// Whether the attempt's CDR is recorded already (a failed-over attempt's is, at once).
    cdr_written: bool,
    /// Whether the next gateway may be tried (a final answer of the caller's or a callee that
    /// rang out ends the request).
    failover: bool,
}

impl Ended {
    /// A call that ended without an answer, for a reason of the node's or the network's.
    fn unanswered(code: u16, reason: String, ring_at: Option<chrono::DateTime<Utc>>) -> Ended {
        Ended {
            code,
            reason,
            trunk: None,
            gateway: None,
            answer_at: None,
            ring_at,
            hangup_by: HangupBy::System,
            attempt: 1,
            setup_at: None,
            cdr_written: false,
            failover: true,
        }
    }
}

async fn place(ctx: Arc<CallContext>, pool: PgPool, request: CallRequest, hooks: CallHooks, egress: Arc<EgressPolicy>) {
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

/// Records the CDR of one attempt (`call_setup` stands in for an attempt that never started);
/// returns its billable seconds, cost and currency.
fn write_cdr(
    ctx: &CallContext,
    request: &CallRequest,
    (call_uuid, call_id): (Uuid, &str),
    ended: &Ended,
    call_setup: chrono::DateTime<Utc>,
    end_at: chrono::DateTime<Utc>,
) -> (u32, rust_decimal::Decimal, String) {
    let billable = billable_seconds(ended.answer_at, end_at);
    let rate = ended.trunk.as_ref().map(|t| t.rate_outbound_per_minute).unwrap_or_default();
    let cost = cdr_cost(rate, billable);
    let currency = ended.trunk.as_ref().map(|t| t.currency.clone()).unwrap_or_else(|| "USD".into());
    ctx.store.record(StoreEvent::Cdr(CdrRecord {
        call_uuid,
        call_id: call_id.to_string(),
        attempt: ended.attempt,
        namespace: ended.trunk.as_ref().map(|t| t.namespace.clone()),
        trunk_name: ended.trunk.as_ref().map(|t| t.name.clone()),
        provider: ended.trunk.as_ref().map(|t| t.provider.clone()),
        gateway: ended.gateway.clone(),
        direction: Direction::Outbound,
        from_number: request.from_number.clone(),
        to_number: request.to_number.clone(),
        setup_at: ended.setup_at.unwrap_or(call_setup),
        ring_at: ended.ring_at,
        answer_at: ended.answer_at,
        end_at,
        sip_code: Some(ended.code),
        reason: Some(ended.reason.clone()),
        hangup_by: Some(ended.hangup_by),
        billable_seconds: billable,
        cost,
        currency: currency.clone(),
    }));
    (billable, cost, currency)
}

/// Where the answered call's media goes.
struct CallTarget<'m> {
    /// The agent to bridge to, with the egress policy its connection must pass when an API
    /// client chose it.
    agent: Option<(&'m str, Option<Arc<EgressPolicy>>)>,
    /// The node's media end (`None`: no RTP ports; the offer has none).
    media: &'m mut Option<media::ApiMedia>,
}

/// One claimed request being placed: what every step of placing it needs.
struct Placing<'a> {
    ctx: &'a Arc<CallContext>,
    pool: &'a PgPool,
    request: &'a CallRequest,
    hooks: &'a CallHooks,
    /// The request's status callback for a status.
    event: &'a (dyn Fn(&'static str) -> StatusEvent<'a> + Sync),
    /// The node's id of the call: the key of its `active_calls` row and of its CDRs.
    call_uuid: Uuid,
    /// When the node took the request (the `active_calls` row's start).
    started_at: chrono::DateTime<Utc>,
}

impl Placing<'_> {
    /// Reports `status` (`ringing`, `answered`) to the webhook and in the request's row.
    async fn report(&self, status: &'static str, call_id: &str) {
        self.hooks.send(&(self.event)(status));
        set_state(self.pool, self.request.id, status, call_id, None).await;
    }
}

/// Tries the trunks' gateways in order until one answers or a final answer ends the call.
async fn dial(
    placing: &Placing<'_>,
    call_id: &str,
    mut target: CallTarget<'_>,
    trunks: Vec<Arc<TrunkConfig>>,
) -> Ended {
    let (ctx, request) = (placing.ctx, placing.request);
    let mut attempt = 0;
    let mut last = Ended::unanswered(503, "no gateway answered".into(), None);
    let mut rang = false;
    for trunk in trunks {
        let Ok(_permit) = ctx.limits.acquire(&trunk).await else {
            last.reason = format!("trunk {} is at its limit", trunk.name);
            continue;
        };
        let user = routing::format_for_trunk(&trunk, &request.to_number);
        for gateway in routing::gateway_order(&trunk) {
            let Some(protocol) = routing::signaling_protocol(gateway.transport) else {
                last.reason = format!("gateway {}: {}", gateway.address, routing::TLS_UNSUPPORTED);
                continue;
            };
            let Ok(addrs) = ctx.resolver.resolve(&gateway.address, gateway.port, protocol).await else { continue };
            let host = match gateway.port {
                Some(port) => format!("{}:{port}", gateway.address),
                None => gateway.address.clone(),
            };
            for addr in addrs {
                attempt += 1;
                let attempt_setup = Utc::now();
                // The call's row names the trunk of the attempt in progress.
                ctx.store.record(StoreEvent::CallStarted(ActiveCall {
                    call_uuid: placing.call_uuid,
                    call_id: call_id.to_string(),
                    namespace: Some(trunk.namespace.clone()),
                    trunk_name: Some(trunk.name.clone()),
                    provider: Some(trunk.provider.clone()),
                    direction: Direction::Outbound,
                    from_number: request.from_number.clone(),
                    to_number: request.to_number.clone(),
                    state: CallState::Setup,
                    started_at: placing.started_at,
                    answered_at: None,
                }));
                let peer = Peer { protocol, addr };
                let attempt_call_id = if attempt == 1 { call_id.to_string() } else { format!("{call_id}-{attempt}") };
                let outcome =
                    one_attempt(placing, &mut target, &attempt_call_id, &user, &host, peer, &trunk, &mut rang).await;
                let mut ended = outcome;
                ended.trunk = Some(Arc::clone(&trunk));
                ended.gateway = Some(host.clone());
                ended.attempt = attempt;
                ended.setup_at = Some(attempt_setup);
                if ended.answer_at.is_some()
                    || !ended.failover
                    || routing::is_final_for_caller(&ctx.final_codes, ended.code)
                {
                    return ended;
                }
                tracing::info!(attempt, code = ended.code, reason = %ended.reason, "API call attempt failed; trying the next");
                write_cdr(ctx, request, (placing.call_uuid, call_id), &ended, placing.started_at, Utc::now());
                // The last failed attempt is the call's outcome; its CDR is written.
                last = Ended { cdr_written: true, ..ended };
            }
        }
    }
    last
}

/// One INVITE to one gateway address, and the call if it is answered.
#[allow(clippy::too_many_arguments)]
async fn one_attempt(
    placing: &Placing<'_>,
    target: &mut CallTarget<'_>,
    call_id: &str,
    user: &str,
    host: &str,
    peer: Peer,
    trunk: &Arc<TrunkConfig>,
    rang: &mut bool,
) -> Ended {
    let (ctx, request) = (placing.ctx, placing.request);
    let failed = Ended::unanswered;
    let tag = new_tag();
    let offer = target.media.as_mut().map(|media| media.offer(trunk));
    let Some(invite) = build_invite(ctx, request, call_id, &tag, user, host, peer, 1, offer.as_deref()) else {
        return failed(400, format!("cannot build a request URI for {user}@{host}"), None);
    };
    let setup = InviteSetup {
        peer,
        tag,
        credential: ctx.snapshot.current().credential(&trunk.namespace, &trunk.name).cloned(),
        no_response: failover_timeout(Some(trunk)),
        ring_limit: RING_TIMEOUT,
        gateway: host.to_string(),
        contact_user: request.from_number.clone(),
    };
    let mut client = InviteClient::send(ctx, invite, setup);
    let mut ring_at = None;
    let (mut dialog, response) = loop {
        match client.next(None).await {
            InviteEvent::Provisional(response) => {
                if message::status(&response) >= 180 && ring_at.is_none() {
                    ring_at = Some(Utc::now());
                    if !*rang {
                        *rang = true;
                        placing.report("ringing", call_id).await;
                    }
                }
            }
            InviteEvent::Answered(answered) => break *answered,
            InviteEvent::Failed { code, reason, failover } => {
                let mut ended = failed(code, reason, ring_at);
                ended.failover = failover;
                return ended;
            }
            InviteEvent::Cancelled => {
                let mut ended = failed(487, crate::drain::NODE_SHUTDOWN.into(), ring_at);
                ended.failover = false;
                return ended;
            }
        }
    };
    let (tx, rx) = client.into_channel();
    let result = match rx {
        Some(mut rx) => answered(placing, target, call_id, trunk, &mut dialog, &response, &tx, &mut rx, ring_at).await,
        None => failed(500, "the endpoint stopped".into(), ring_at),
    };
    ctx.endpoint.unregister_dialog(&dialog.call_id, &dialog.local_tag);
    result
}

/// The answered call: its media negotiated (a callee SDP the agent cannot use is hung up with
/// 488), `answered` reported, then bridged to the agent or held until either side hangs up.
#[allow(clippy::too_many_arguments)]
async fn answered(
    placing: &Placing<'_>,
    target: &mut CallTarget<'_>,
    call_id: &str,
    trunk: &Arc<TrunkConfig>,
    dialog: &mut Dialog,
    response: &Response,
    tx: &TuSender,
    rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    ring_at: Option<chrono::DateTime<Utc>>,
) -> Ended {
    let (ctx, request) = (placing.ctx, placing.request);
    let cseq = dialog.local_cseq;
    let negotiated = match target.media.as_ref().map(|media| media.answered(&response.body)) {
        Some(Ok(negotiated)) => Some(negotiated),
        Some(Err(error)) if target.agent.is_some() => {
            let why = format!("callee's SDP: {error}");
            let bye =
                dialog.bye(ctx.endpoint.via_for(dialog.peer), &[message::HangupReason::incompatible(&why).header()]);
            ctx.endpoint.send_request(bye, dialog.peer, tx.clone());
            return Ended::unanswered(488, why, ring_at);
        }
        _ => None,
    };
    let answer_at = Utc::now();
    ctx.store.record(StoreEvent::CallAnswered { call_uuid: placing.call_uuid, at: answer_at });
    placing.report("answered", call_id).await;
    let agent = target.agent.clone().zip(negotiated).zip(target.media.take());
    let (hangup_by, reason) = match agent {
        Some((((url, egress), negotiated), media)) => {
            let agent = media::AgentTarget {
                url: url.to_string(),
                egress,
                parameters: crate::bridge::CallParameters {
                    from: request.from_number.clone(),
                    to: request.to_number.clone(),
                    trunk: trunk.name.clone(),
                    number: request.from_number.clone(),
                },
                call_sid: call_id.to_string(),
            };
            media::bridge_to_agent(ctx, dialog, tx, rx, cseq, media, negotiated, agent, MAX_DURATION).await
        }
        None => hold_until_hangup(ctx, dialog, tx, rx, cseq).await,
    };
    Ended { answer_at: Some(answer_at), hangup_by, ..Ended::unanswered(200, reason, ring_at) }
}

#[allow(clippy::too_many_arguments)]
fn build_invite(
    ctx: &CallContext,
    request: &CallRequest,
    call_id: &str,
    tag: &str,
    user: &str,
    host: &str,
    peer: Peer,
    cseq: u32,
    offer: Option<&[u8]>,
) -> Option<Request> {
    let (our_host, our_port) = ctx.endpoint.transport().sent_by(peer.addr);
    let uri = rsip::Uri::try_from(format!("sip:{user}@{host}").as_str()).ok()?;
    let headers: Vec<Header> = vec![
        ctx.endpoint.via_for(peer),
        Header::MaxForwards(headers::MaxForwards::from(70u32)),
        Header::From(headers::From::new(format!("<sip:{}@{our_host}:{our_port}>;tag={tag}", request.from_number))),
        Header::To(headers::To::new(format!("<sip:{user}@{host}>"))),
        Header::CallId(headers::CallId::new(call_id.to_string())),
        Header::CSeq(headers::CSeq::new(format!("{cseq} INVITE"))),
        Header::Contact(headers::Contact::new(ctx.endpoint.contact_for(peer, &request.from_number))),
        Header::Allow(ALLOW.into()),
        Header::UserAgent("switchboard".into()),
    ];
    let mut invite =
        Request { method: Method::Invite, uri, version: rsip::Version::V2, headers: headers.into(), body: vec![] };
    if let Some(offer) = offer {
        message::set_body(&mut invite.headers, &mut invite.body, offer.to_vec(), Some("application/sdp"));
        return Some(invite);
    }
    // No RTP ports: an offer that names no usable port (the callee hears silence).
    let ip = if our_host.ends_with(".invalid") { "IP6 ::" } else { "IP4" };
    let address = if ip == "IP4" { our_host.as_str() } else { "" };
    let sdp = format!(
        "v=0\r\no=switchboard 1 1 IN {ip} {address}\r\ns=switchboard\r\nc=IN {ip} {address}\r\nt=0 0\r\n\
         m=audio 9 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
         a=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
    );
    message::set_body(&mut invite.headers, &mut invite.body, sdp.into_bytes(), Some("application/sdp"));
    Some(invite)
}

/// Keeps the answered call up until the callee hangs up or the maximum duration passes.
async fn hold_until_hangup(
    ctx: &CallContext,
    dialog: &mut Dialog,
    tx: &mpsc::UnboundedSender<TuEvent>,
    rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    invite_cseq: u32,
) -> (HangupBy, String) {
    let limit = tokio::time::sleep(MAX_DURATION);
    tokio::pin!(limit);
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(TuEvent::Request { request, key: Some(key), .. }) => {
                    let bye = request.method == Method::Bye;
                    // Without anchored media a new offer cannot be answered; 488 keeps the call up
                    // (RFC 3261 14.2). Everything else in the dialog is acknowledged.
                    let offer = matches!(request.method, Method::Invite | Method::Update) && !request.body.is_empty();
                    let code = if offer { 488 } else { 200 };
                    ctx.endpoint.respond(&key, super::transaction::response_to(&request, code, None, None));
                    if bye {
                        return (HangupBy::Callee, "callee hung up".into());
                    }
                }
                Some(TuEvent::Response(response)) if message::cseq(&response) == Some((invite_cseq, Method::Invite)) => {
                    // The callee did not get our ACK and retransmits its 2xx.
                    let ack = dialog.request(Method::Ack, ctx.endpoint.via_for(dialog.peer), Some(invite_cseq), None);
                    ctx.endpoint.send_stateless(rsip::SipMessage::Request(ack), dialog.peer);
                }
                None => return (HangupBy::System, "internal: channel closed".into()),
                _ => {}
            },
            () = ctx.drain.ending() => {
                let why = crate::drain::NODE_SHUTDOWN;
                let bye = dialog.bye(ctx.endpoint.via_for(dialog.peer), &[message::HangupReason::normal(why).header()]);
                ctx.endpoint.send_request(bye, dialog.peer, tx.clone());
                return (HangupBy::System, why.into());
            }
            () = &mut limit => {
                let why = "maximum call duration reached";
                let bye = dialog.bye(ctx.endpoint.via_for(dialog.peer), &[message::HangupReason::normal(why).header()]);
                ctx.endpoint.send_request(bye, dialog.peer, tx.clone());
                return (HangupBy::System, why.into());
            }
        }
    }
}
