//! SMS over SIP MESSAGE (RFC 3428), both ways.
//!
//! Out: the API queues a row in `messages`; one node claims it (`FOR UPDATE SKIP LOCKED`), sends
//! a MESSAGE through the row's trunk (answering a digest challenge with the trunk's Secret) and
//! records `sent` or `failed` with the final response, and the trunk's per-message cost.
//! In: a MESSAGE from a trunk's address to one of our numbers is stored as `received` and
//! delivered to the number's message webhook (signed, retried).

use std::sync::Arc;

use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::context::SmsContext;
use super::digest::answer_challenge;
use super::endpoint::NewRequest;
use super::message;
use super::registration::request_once;
use super::routing;
use super::transaction::{new_tag, response_to};
use super::transport::Peer;
use crate::webhook::{CallHooks, Signer};

/// Channel the API notifies on when it queues a message.
pub const CHANNEL: &str = "switchboard_messages";
/// Longest accepted message body (bytes); carriers cap SMS far below this.
const MAX_BODY: usize = 8 * 1024;

#[derive(Debug, sqlx::FromRow)]
struct Outgoing {
    id: Uuid,
    namespace: Option<String>,
    trunk_name: Option<String>,
    from_number: String,
    to_number: String,
    body: String,
}

/// What the message webhook receives for an inbound SMS.
#[derive(Debug, Serialize)]
struct InboundEvent<'a> {
    message_id: String,
    direction: &'static str,
    from_number: &'a str,
    to_number: &'a str,
    body: &'a str,
    trunk: &'a str,
    received_at: String,
}

/// Claims and sends queued outbound messages until the node stops.
pub async fn run(ctx: Arc<SmsContext>, pool: PgPool, wakeup: Arc<tokio::sync::Notify>) {
    let (queue, node_id) = (&pool, &ctx.node_id);
    let claim = move || {
        sqlx::query_as::<_, Outgoing>(
            "UPDATE messages SET status = 'sending', claimed_by = $1, updated_at = now()
             WHERE id = (SELECT id FROM messages WHERE status = 'queued' AND direction = 'outbound'
                         ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1)
             RETURNING id, namespace, trunk_name, from_number, to_number, body",
        )
        .bind(node_id)
        .fetch_optional(queue)
    };
    let start = |outgoing: Outgoing| {
        tokio::spawn(send(Arc::clone(&ctx), pool.clone(), outgoing));
    };
    super::queue::serve(wakeup, "messages", claim, start).await;
}

async fn send(ctx: Arc<SmsContext>, pool: PgPool, outgoing: Outgoing) {
    let (status, code, error, cost) = match deliver(&ctx, &outgoing).await {
        Ok((code, cost)) => ("sent", Some(i32::from(code)), None, cost),
        Err((code, error)) => ("failed", code.map(i32::from), Some(error), Decimal::ZERO),
    };
    tracing::info!(message = %outgoing.id, status, code, "outbound message");
    let result = sqlx::query(
        "UPDATE messages SET status = $2, sip_code = $3, error = $4, cost = $5, updated_at = now() WHERE id = $1",
    )
    .bind(outgoing.id)
    .bind(status)
    .bind(code)
    .bind(error)
    .bind(cost)
    .execute(&pool)
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "cannot record the message's status");
    }
}

/// Sends one MESSAGE; `Ok((final code, cost))` on 2xx.
async fn deliver(ctx: &SmsContext, outgoing: &Outgoing) -> Result<(u16, Decimal), (Option<u16>, String)> {
    let snapshot = ctx.snapshot.current();
    let namespace = outgoing.namespace.clone().unwrap_or_else(|| "default".into());
    let trunk_name = outgoing.trunk_name.clone().ok_or((None, "message has no trunk".to_string()))?;
    let trunk = snapshot
        .trunk(&namespace, &trunk_name)
        .cloned()
        .ok_or((None, format!("trunk {trunk_name} is not configured")))?;
    let gateway =
        routing::gateway_order(&trunk).into_iter().next().ok_or((None, "trunk has no enabled gateway".to_string()))?;
    let protocol = super::routing::signaling_protocol(gateway.transport)
        .ok_or((None, super::routing::TLS_UNSUPPORTED.to_string()))?;
    let addrs =
        ctx.resolver.resolve(&gateway.address, gateway.port, protocol).await.map_err(|e| (None, e.to_string()))?;
    let peer = Peer { protocol, addr: addrs[0] };
    let host = match gateway.port {
        Some(port) => format!("{}:{port}", gateway.address),
        None => gateway.address.clone(),
    };
    let user = routing::format_for_trunk(&trunk, &outgoing.to_number);
    let call_id = format!("{}@switchboard", Uuid::new_v4().simple());
    let tag = new_tag();
    let build = |cseq: u32, authorization: Option<Header>| -> Option<Request> {
        let (our_host, our_port) = ctx.endpoint.transport().sent_by(peer.addr);
        let mut headers: Vec<Header> = vec![
            ctx.endpoint.via_for(peer),
            Header::MaxForwards(headers::MaxForwards::from(70u32)),
            Header::From(headers::From::new(format!("<sip:{}@{our_host}:{our_port}>;tag={tag}", outgoing.from_number))),
            Header::To(headers::To::new(format!("<sip:{user}@{host}>"))),
            Header::CallId(headers::CallId::new(call_id.clone())),
            Header::CSeq(headers::CSeq::new(format!("{cseq} MESSAGE"))),
            Header::UserAgent("switchboard".into()),
        ];
        headers.extend(authorization);
        let uri = rsip::Uri::try_from(format!("sip:{user}@{host}").as_str()).ok()?;
        let mut request =
            Request { method: Method::Message, uri, version: rsip::Version::V2, headers: headers.into(), body: vec![] };
        message::set_body(
            &mut request.headers,
            &mut request.body,
            outgoing.body.as_bytes().to_vec(),
            Some("text/plain"),
        );
        Some(request)
    };
    let request = build(1, None).ok_or((None, "invalid destination URI".to_string()))?;
    let mut response = request_once(&ctx.endpoint, request.clone(), peer)
        .await
        .ok_or((Some(408), "no answer from the trunk".to_string()))?;
    let mut code = message::status(&response);
    if code == 401 || code == 407 {
        let credential = snapshot
            .credential(&trunk.namespace, &trunk.name)
            .cloned()
            .ok_or((Some(code), "challenged but the trunk has no credentials".to_string()))?;
        let header =
            answer_challenge(&response, &Method::Message, &request.uri, &credential.username, &credential.password, 1)
                .map_err(|e| (Some(code), format!("cannot answer the challenge: {e}")))?;
        let retry = build(2, Some(header)).ok_or((None, "invalid destination URI".to_string()))?;
        response = request_once(&ctx.endpoint, retry, peer)
            .await
            .ok_or((Some(408), "no answer from the trunk".to_string()))?;
        code = message::status(&response);
    }
    if (200..300).contains(&code) {
        Ok((code, trunk.rate_per_message))
    } else {
        Err((Some(code), response.status_code.to_string()))
    }
}

/// Answers an inbound MESSAGE: 403 for sources no trunk allows, 404 for numbers nobody owns,
/// 413 for oversized bodies, else 200 once stored; then delivers it to the number's webhook.
pub async fn receive(ctx: Arc<SmsContext>, pool: PgPool, hooks: (reqwest::Client, Signer), new: NewRequest) {
    let NewRequest { request, key, peer, .. } = new;
    let snapshot = ctx.snapshot.current();
    let respond = |code: u16, reason: &str| {
        ctx.endpoint.respond(&key, response_to(&request, code, Some(reason), Some(&new_tag())))
    };
    let source = peer.addr.ip();
    let dialled = request.uri.user().map(str::to_string).or_else(|| message::to_user(&request)).unwrap_or_default();
    let to = message::normalize_number(&dialled).unwrap_or(dialled);
    let from_user = message::from_user(&request).unwrap_or_default();
    let from = message::normalize_number(&from_user).unwrap_or(from_user);
    let Some(number) = snapshot.number(&to).cloned() else {
        if !snapshot.trunks().any(|t| routing::trunk_accepts_source(t, source)) {
            return respond(403, "Forbidden");
        }
        return respond(404, "Not Found");
    };
    let Some(trunk) = snapshot.trunk(&number.namespace, &number.trunk_ref).cloned() else {
        return respond(404, "Not Found");
    };
    if trunk.requires_peer_certificate() {
        // Inbound mutual TLS, as for calls: the connection's client certificate admits.
        let tls = ctx.endpoint.transport().tls().map(|t| &**t);
        if let Err(reason) = super::tls::peer_auth::admit(tls, &snapshot, &trunk, peer, &ctx.metrics) {
            tracing::debug!(%reason, "inbound MESSAGE refused");
            return respond(403, "Forbidden");
        }
    } else if !routing::trunk_accepts_source(&trunk, source) {
        return respond(403, "Forbidden");
    }
    if request.body.len() > MAX_BODY {
        return respond(413, "Request Entity Too Large");
    }
    let body = String::from_utf8_lossy(&request.body).replace('\0', "");
    let id = Uuid::new_v4();
    let stored = sqlx::query(
        "INSERT INTO messages (id, direction, namespace, trunk_name, from_number, to_number, body, status, cost)
         VALUES ($1, 'inbound', $2, $3, $4, $5, $6, 'received', $7)",
    )
    .bind(id)
    .bind(&trunk.namespace)
    .bind(&trunk.name)
    .bind(&from)
    .bind(&to)
    .bind(&body)
    .bind(trunk.rate_per_message)
    .execute(&pool)
    .await;
    if let Err(error) = stored {
        // Not stored means not accepted: the carrier retries later.
        tracing::warn!(%error, "cannot store an inbound message");
        return respond(500, "Server Internal Error");
    }
    respond(200, "OK");
    let (client, signer) = hooks;
    let hooks = CallHooks::start(client, signer, number.message_webhook.clone());
    hooks.send(&InboundEvent {
        message_id: id.to_string(),
        direction: "inbound",
        from_number: &from,
        to_number: &to,
        body: &body,
        trunk: &trunk.name,
        received_at: chrono::Utc::now().to_rfc3339(),
    });
}
