//! Registration client and OPTIONS keepalive, one task per trunk that needs them.
//!
//! A supervisor follows the configuration snapshot: a trunk that asks for registration gets a
//! task that REGISTERs (answering digest challenges with the trunk's Secret), refreshes before
//! expiry, backs off on failure and un-REGISTERs when the trunk is removed or the node stops.
//! Every trunk with gateways and a keepalive interval gets OPTIONS pings for `Reachable`. Both
//! write their state through the store for the operator's conditions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response};
use switchboard_model::TrunkConfig;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::ALLOW;
use super::context::RegistrationContext;
use super::digest::answer_challenge;
use super::endpoint::Endpoint;
use super::endpoint::TuEvent;
use super::message;
use super::routing;
use super::transaction::{new_branch, new_tag};
use super::transport::{Peer, Protocol};
use crate::store::{ReachabilityUpdate, RegistrationState, RegistrationUpdate, StoreEvent};

/// Longest wait between failed registration attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long to wait for the un-REGISTER's answer on removal or shutdown.
const UNREGISTER_WAIT: Duration = Duration::from_secs(2);

/// Sends one non-INVITE request and waits for its final response; `None` on timeout.
pub async fn request_once(endpoint: &Endpoint, request: Request, peer: Peer) -> Option<Response> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    endpoint.send_request(request, peer, tx);
    while let Some(event) = rx.recv().await {
        match event {
            TuEvent::Response(r) if message::status(&r) >= 200 => return Some(r),
            TuEvent::Timeout => return None,
            _ => {}
        }
    }
    None
}

/// The registrar of a trunk: its own address, else its first gateway. `None` when there is none,
/// or when it would be reached over TLS, which the node does not speak (a REGISTER with a
/// digest must not go out in plaintext to a TLS port).
fn registrar(trunk: &TrunkConfig) -> Option<(String, Option<u16>, Protocol)> {
    let gateway = routing::gateway_order(trunk).into_iter().next();
    let protocol = match &gateway {
        Some(gw) => routing::signaling_protocol(gw.transport),
        None => Some(Protocol::Udp),
    };
    let Some(protocol) = protocol else {
        tracing::warn!(trunk = %trunk.name, "not registering: {}", routing::TLS_UNSUPPORTED);
        return None;
    };
    match (&trunk.registrar_address, gateway) {
        (Some(address), _) => Some((address.clone(), trunk.registrar_port, protocol)),
        (None, Some(gw)) => Some((gw.address.clone(), gw.port, protocol)),
        (None, None) => None,
    }
}

/// A trunk's `(namespace, name)`.
type TrunkKey = (String, String);
/// A registration task: the trunk config it runs with, its stop switch and its handle.
type RunningRegistration = (Arc<TrunkConfig>, watch::Sender<bool>, JoinHandle<()>);

/// Follows the snapshot and keeps one registration task and one keepalive task per trunk that
/// needs them. On shutdown (the `stop` channel turns true) or once the node drains, every
/// registration is removed.
pub async fn supervise(ctx: Arc<RegistrationContext>, mut stop: watch::Receiver<bool>) {
    let mut generations = ctx.snapshot.subscribe();
    let mut registrations: HashMap<TrunkKey, RunningRegistration> = HashMap::new();
    let mut keepalives: HashMap<(String, String), (Arc<TrunkConfig>, JoinHandle<()>)> = HashMap::new();
    loop {
        let snapshot = ctx.snapshot.current();
        let mut wanted = HashMap::new();
        let mut pinged = HashMap::new();
        for trunk in snapshot.trunks() {
            let key = (trunk.namespace.clone(), trunk.name.clone());
            if trunk.registration_enabled && !trunk.suspended {
                wanted.insert(key.clone(), Arc::clone(trunk));
            }
            if trunk.options_interval_seconds > 0 && !trunk.suspended && !trunk.gateways.is_empty() {
                pinged.insert(key, Arc::clone(trunk));
            }
        }
        // Registrations: stop removed or changed ones, start new ones.
        let keys: Vec<_> = registrations.keys().cloned().collect();
        for key in keys {
            let changed = wanted.get(&key).is_none_or(|t| **t != *registrations[&key].0);
            if changed {
                let (_, stop_tx, task) = registrations.remove(&key).expect("key listed");
                let _ = stop_tx.send(true);
                let _ = task.await;
                if !wanted.contains_key(&key) {
                    ctx.store.record(StoreEvent::TrunkRemoved { namespace: key.0.clone(), trunk_name: key.1.clone() });
                }
            }
        }
        for (key, trunk) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = registrations.entry(key) {
                let (stop_tx, stop_rx) = watch::channel(false);
                let task = tokio::spawn(register_loop(Arc::clone(&ctx), Arc::clone(&trunk), stop_rx));
                slot.insert((trunk, stop_tx, task));
            }
        }
        let keys: Vec<_> = keepalives.keys().cloned().collect();
        for key in keys {
            if pinged.get(&key).is_none_or(|t| **t != *keepalives[&key].0) {
                let (_, task) = keepalives.remove(&key).expect("key listed");
                task.abort();
            }
        }
        for (key, trunk) in pinged {
            if let std::collections::hash_map::Entry::Vacant(slot) = keepalives.entry(key) {
                let task = tokio::spawn(keepalive_loop(Arc::clone(&ctx), Arc::clone(&trunk)));
                slot.insert((trunk, task));
            }
        }
        tokio::select! {
            changed = generations.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
            () = ctx.drain.started() => break,
        }
    }
    for (_, task) in keepalives.into_values() {
        task.abort();
    }
    for (_, stop_tx, task) in registrations.into_values() {
        let _ = stop_tx.send(true);
        let _ = task.await;
    }
}

/// Registration state of one trunk.
struct Registrar {
    ctx: Arc<RegistrationContext>,
    trunk: Arc<TrunkConfig>,
    call_id: String,
    tag: String,
    cseq: u32,
    host: String,
    port: Option<u16>,
    protocol: Protocol,
}

impl Registrar {
    fn registrar_text(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.clone(),
        }
    }

    fn build(&mut self, peer: Peer, expires: u32, authorization: Option<Header>) -> Option<Request> {
        let credential = self.ctx.snapshot.current().credential(&self.trunk.namespace, &self.trunk.name).cloned();
        let user = credential.as_ref().map(|c| c.username.clone()).unwrap_or_else(|| "switchboard".into());
        let domain = self.trunk.realm.clone().unwrap_or_else(|| self.host.clone());
        self.cseq += 1;
        let uri = rsip::Uri::try_from(format!("sip:{}", self.registrar_text()).as_str()).ok()?;
        let (host, port) = self.ctx.endpoint.transport().sent_by_peer(peer);
        let transport = match peer.protocol {
            Protocol::Udp => "",
            Protocol::Tcp => ";transport=tcp",
            Protocol::Tls => ";transport=tls",
        };
        let mut headers: Vec<Header> = vec![
            Header::Via(
                format!("SIP/2.0/{} {host}:{port};branch={};rport", peer.protocol.as_str(), new_branch()).into(),
            ),
            Header::MaxForwards(headers::MaxForwards::from(70u32)),
            Header::From(headers::From::new(format!("<sip:{user}@{domain}>;tag={}", self.tag))),
            Header::To(headers::To::new(format!("<sip:{user}@{domain}>"))),
            Header::CallId(headers::CallId::new(self.call_id.clone())),
            Header::CSeq(headers::CSeq::new(format!("{} REGISTER", self.cseq))),
            Header::Contact(headers::Contact::new(format!("<sip:{user}@{host}:{port}{transport}>"))),
            Header::Expires(headers::Expires::from(expires)),
            Header::Allow(ALLOW.into()),
            Header::UserAgent("switchboard".into()),
            Header::ContentLength(headers::ContentLength::from(0u32)),
        ];
        if let Some(authorization) = authorization {
            headers.push(authorization);
        }
        Some(Request {
            method: Method::Register,
            uri,
            version: rsip::Version::V2,
            headers: headers.into(),
            body: vec![],
        })
    }

    /// One REGISTER exchange including one digest round. `Ok(expires)` when the registrar
    /// accepted; `Err(reason)` otherwise.
    async fn register(&mut self, expires: u32) -> Result<u32, String> {
        let addrs = self.ctx.resolver.resolve(&self.host, self.port, self.protocol).await.map_err(|e| e.to_string())?;
        let peer = Peer { protocol: self.protocol, addr: addrs[0] };
        let request = self.build(peer, expires, None).ok_or("registrar address is not a valid SIP URI")?;
        let mut response = request_once(&self.ctx.endpoint, request.clone(), peer)
            .await
            .ok_or_else(|| no_answer(&self.ctx, peer, "registrar"))?;
        let mut code = message::status(&response);
        let mut asked_expires = expires;
        if code == 423 {
            // Interval Too Brief: use the registrar's minimum.
            asked_expires = message::header_value(&response.headers, "Min-Expires")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(expires.max(60));
            let retry = self.build(peer, asked_expires, None).ok_or("bad registrar URI")?;
            response = request_once(&self.ctx.endpoint, retry, peer)
                .await
                .ok_or_else(|| no_answer(&self.ctx, peer, "registrar"))?;
            code = message::status(&response);
        }
        if code == 401 || code == 407 {
            let credential = self.ctx.snapshot.current().credential(&self.trunk.namespace, &self.trunk.name).cloned();
            let credential = credential
                .ok_or_else(|| format!("{code} challenge but the trunk has no credentials (Secret missing?)"))?;
            let header = answer_challenge(
                &response,
                &Method::Register,
                &request.uri,
                &credential.username,
                &credential.password,
                1,
            )
            .map_err(|e| format!("cannot answer the challenge: {e}"))?;
            let retry = self.build(peer, asked_expires, Some(header)).ok_or("bad registrar URI")?;
            response = request_once(&self.ctx.endpoint, retry, peer)
                .await
                .ok_or_else(|| no_answer(&self.ctx, peer, "registrar"))?;
            code = message::status(&response);
        }
        if (200..300).contains(&code) {
            let granted = granted_expires(&response).unwrap_or(asked_expires);
            return Ok(granted);
        }
        Err(match code {
            401 | 407 | 403 => format!("{} (credentials rejected)", response.status_code),
            _ => response.status_code.to_string(),
        })
    }

    fn report(&self, state: RegistrationState, expires: Option<u32>, error: Option<String>) {
        let now = Utc::now();
        let up = state == RegistrationState::Registered;
        self.ctx.metrics.registration_changed(&self.trunk.provider, &self.trunk.name, up);
        self.ctx.store.record(StoreEvent::Registration(RegistrationUpdate {
            namespace: self.trunk.namespace.clone(),
            trunk_name: self.trunk.name.clone(),
            state,
            registrar: Some(self.registrar_text()),
            expires_at: expires.map(|s| now + chrono::Duration::seconds(i64::from(s))),
            last_error: error,
            last_attempt_at: Some(now),
        }));
    }
}

/// The expiry the registrar granted: our Contact's `expires` parameter, else the Expires header.
fn granted_expires(response: &Response) -> Option<u32> {
    let from_contact =
        response.contact_header().ok().and_then(|c| c.expires().ok().flatten()).and_then(|e| e.seconds().ok());
    from_contact.or_else(|| message::header_value(&response.headers, "Expires").and_then(|v| v.trim().parse().ok()))
}

async fn register_loop(ctx: Arc<RegistrationContext>, trunk: Arc<TrunkConfig>, mut stop: watch::Receiver<bool>) {
    let Some((host, port, protocol)) = registrar(&trunk) else {
        tracing::warn!(trunk = %trunk.name, "registration enabled but the trunk has no registrar or gateway");
        return;
    };
    let mut registrar = Registrar {
        ctx,
        call_id: format!("{}@switchboard", uuid::Uuid::new_v4().simple()),
        tag: new_tag(),
        cseq: 0,
        host,
        port,
        protocol,
        trunk,
    };
    let mut failures = 0u32;
    let mut registered;
    loop {
        registrar.report(RegistrationState::Registering, None, None);
        let wait = match registrar.register(registrar.trunk.registration_expires.max(1)).await {
            Ok(expires) => {
                failures = 0;
                registered = true;
                tracing::info!(trunk = %registrar.trunk.name, expires, "registered");
                registrar.report(RegistrationState::Registered, Some(expires), None);
                // Refresh at 80 % of the granted time (never more often than every second).
                Duration::from_secs_f64(f64::from(expires) * 0.8).max(Duration::from_secs(1))
            }
            Err(reason) => {
                failures += 1;
                registered = false;
                tracing::warn!(trunk = %registrar.trunk.name, %reason, "registration failed");
                registrar.report(RegistrationState::Failed, None, Some(reason));
                backoff(failures)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
    if registered {
        let _ = tokio::time::timeout(UNREGISTER_WAIT, registrar.register(0)).await;
        registrar.report(RegistrationState::Unregistered, None, None);
        tracing::info!(trunk = %registrar.trunk.name, "unregistered");
    }
}

/// Why `who` did not answer: over TLS, the last failed handshake with it says more than a
/// timeout (an untrusted or expired certificate, a refused client certificate).
fn no_answer(ctx: &RegistrationContext, peer: Peer, who: &str) -> String {
    match tls_failure(ctx, peer) {
        Some(failure) => format!("{who} did not answer: {failure}"),
        None => format!("{who} did not answer (timeout)"),
    }
}

/// The last failed TLS handshake with `peer`, if it is a TLS peer and the last one failed.
fn tls_failure(ctx: &RegistrationContext, peer: Peer) -> Option<String> {
    match (peer.protocol, ctx.endpoint.transport().tls()) {
        (Protocol::Tls, Some(tls)) => tls.client().last_failure(peer.addr),
        _ => None,
    }
}

/// 2, 4, 8 ... seconds up to five minutes, with up to 20 % jitter.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(9)).min(MAX_BACKOFF);
    let jitter = rand::random::<f64>() * 0.2;
    base.mul_f64(1.0 + jitter).min(MAX_BACKOFF)
}

/// Pings the trunk's first gateway with OPTIONS every interval and reports reachability.
async fn keepalive_loop(ctx: Arc<RegistrationContext>, trunk: Arc<TrunkConfig>) {
    let interval = Duration::from_secs(u64::from(trunk.options_interval_seconds).max(1));
    let call_id = format!("{}@switchboard", uuid::Uuid::new_v4().simple());
    let mut cseq = 0u32;
    loop {
        let Some(gateway) = routing::gateway_order(&trunk).into_iter().next() else { return };
        let Some(protocol) = routing::signaling_protocol(gateway.transport) else {
            tracing::warn!(trunk = %trunk.name, "no OPTIONS keepalive: {}", routing::TLS_UNSUPPORTED);
            return;
        };
        let mut unreachable_reason = None;
        let reachable = match ctx.resolver.resolve(&gateway.address, gateway.port, protocol).await {
            Ok(addrs) => {
                let peer = Peer { protocol, addr: addrs[0] };
                cseq += 1;
                let (host, port) = ctx.endpoint.transport().sent_by_peer(peer);
                let target = match gateway.port {
                    Some(p) => format!("{}:{p}", gateway.address),
                    None => gateway.address.clone(),
                };
                let headers: Vec<Header> = vec![
                    Header::Via(
                        format!("SIP/2.0/{} {host}:{port};branch={};rport", protocol.as_str(), new_branch()).into(),
                    ),
                    Header::MaxForwards(headers::MaxForwards::from(70u32)),
                    Header::From(headers::From::new(format!("<sip:switchboard@{host}:{port}>;tag={}", new_tag()))),
                    Header::To(headers::To::new(format!("<sip:{target}>"))),
                    Header::CallId(headers::CallId::new(call_id.clone())),
                    Header::CSeq(headers::CSeq::new(format!("{cseq} OPTIONS"))),
                    Header::ContentLength(headers::ContentLength::from(0u32)),
                ];
                match rsip::Uri::try_from(format!("sip:{target}").as_str()) {
                    Ok(uri) => {
                        let request = Request {
                            method: Method::Options,
                            uri,
                            version: rsip::Version::V2,
                            headers: headers.into(),
                            body: vec![],
                        };
                        let sent = Instant::now();
                        // Any final response, even 404 or 405, proves the peer is there.
                        let answered = request_once(&ctx.endpoint, request, peer).await.map(|_| sent.elapsed());
                        if answered.is_none() {
                            unreachable_reason = tls_failure(&ctx, peer);
                        }
                        answered
                    }
                    Err(_) => None,
                }
            }
            Err(error) => {
                unreachable_reason = Some(error.to_string());
                None
            }
        };
        ctx.store.record(StoreEvent::Reachability(ReachabilityUpdate {
            namespace: trunk.namespace.clone(),
            trunk_name: trunk.name.clone(),
            reachable: reachable.is_some(),
            checked_at: Utc::now(),
            rtt_ms: reachable.map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32),
            unreachable_reason,
        }));
        tokio::time::sleep(interval).await;
    }
}
