//! The B2BUA: every call is one task holding an inbound leg (the caller's dialog, where we are
//! the UAS) and an outbound leg (our dialog towards the callee, where we are the UAC), each
//! with its own Call-ID, tags and CSeq. The task decides routing and limits, tries targets with
//! failover, passes provisional responses, answers, re-INVITEs, UPDATEs, INFOs and BYEs across,
//! handles CANCEL, and writes the call's active row and one CDR per attempt.
//!
//! Media is anchored when the node has RTP ports (`media.rs`): each leg negotiates with the
//! node's own SDP and RTP flows through the relay; calls to AI agents are in `agent.rs`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response};
use switchboard_model::{AuthMethod, Credential, Direction, NumberConfig, TrunkConfig};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::dialog::{Dialog, content_type};
use super::digest::{Challenger, Verification};
use super::endpoint::{Endpoint, NewRequest, TuEvent};
use super::guard::SourceClass;
use super::invite_client::{InviteClient, InviteEvent, InviteSetup, failover_timeout};
use super::limits::{CallPermit, Limits};
use super::message::{self, HangupReason};
use super::resolve::Resolver;
use super::routing::{self, Target};
use super::transaction::{TimerConfig, TransactionKey, new_tag, response_to};
use super::transport::{Peer, Protocol};
use crate::config::{Snapshot, SnapshotHandle};
use crate::metrics::{ActiveCallGuard, CallStatus, NodeMetrics};
use crate::store::{ActiveCall, CallState, CdrRecord, HangupBy, Store, StoreEvent, billable_seconds, cdr_cost};

mod agent;
pub(super) mod media;

use crate::media::relay::RelayEvent;
use media::Anchor;

/// Methods the node accepts, for Allow headers.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, MESSAGE";
/// How long the node waits for the far side to confirm a BYE before it forgets the call.
const BYE_WAIT: Duration = Duration::from_secs(4);
/// How long an outbound leg may ring before the node gives up with 480 (the transaction layer
/// has no timer once a provisional response arrived).
const RING_TIMEOUT: Duration = Duration::from_secs(120);

/// `Retry-After` (seconds) of the 503 a draining node answers new requests with.
const DRAIN_RETRY_AFTER: &str = "30";
/// `Retry-After` (seconds) of the 503 for a call that found no free RTP port pair: calls end
/// all the time, so a pair is likely free again soon; meanwhile the carrier tries another node.
const PORTS_RETRY_AFTER: &str = "5";

/// What every call needs from the node.
pub struct CallContext {
    pub endpoint: Endpoint,
    pub snapshot: SnapshotHandle,
    pub limits: Limits,
    pub store: Store,
    pub metrics: NodeMetrics,
    pub resolver: Resolver,
    pub challenger: Challenger,
    /// Who may talk to the node and how much each source may hold.
    pub guard: Arc<super::guard::Guard>,
    pub node_id: String,
    pub timers: TimerConfig,
    /// For what is not buffered: inbound messages must be stored before they are accepted.
    pub pool: sqlx::PgPool,
    /// Client and key of the signed webhooks (message webhooks, call status callbacks).
    pub webhooks: (reqwest::Client, crate::webhook::Signer),
    /// Media anchoring for calls bridged to AI agents; `None` when RTP ports are unavailable.
    pub media: Option<MediaContext>,
    /// Final responses that end an outbound attempt without failover.
    pub final_codes: Vec<u16>,
    /// Whether the node is stopping: new calls are refused, calls in progress go on.
    pub drain: crate::drain::Drain,
}

/// What the node needs to anchor a call's media.
#[derive(Clone)]
pub struct MediaContext {
    pub ports: crate::media::ports::PortAllocator,
    /// The address put into SDP (the advertised, reachable address).
    pub address: std::net::IpAddr,
    /// No RTP for this long ends the call.
    pub timeout: Duration,
    /// How long the agent may take to accept the WebSocket.
    pub agent_connect_timeout: Duration,
    /// When calls to AI agents are answered.
    pub agent_answer: crate::bridge::answer::AnswerPolicy,
    /// Where bridge sessions record the delay they add (the node's metric).
    pub bridge_latency: crate::bridge::BridgeLatency,
    /// Whom `wss://` agent connections trust.
    pub agent_tls: crate::bridge::AgentTls,
}

/// Answers out-of-dialog requests: INVITEs become calls, OPTIONS is answered, the rest is
/// refused with the right code. Runs until the endpoint stops.
pub async fn route_requests(ctx: Arc<CallContext>, mut requests: mpsc::Receiver<NewRequest>) {
    while let Some(NewRequest { request, key, peer, source }) = requests.recv().await {
        match request.method {
            Method::Invite | Method::Options if ctx.drain.is_draining() => {
                // A stopping node takes no new call; the carrier tries its next destination.
                let mut response = response_to(&request, 503, Some("Service Unavailable"), None);
                response.headers.push(Header::RetryAfter(DRAIN_RETRY_AFTER.into()));
                response.headers.push(reason_header(503, "node draining"));
                ctx.endpoint.respond(&key, response);
            }
            Method::Invite => {
                // One task per INVITE: sources other than carriers share a bounded number, so
                // a flood of INVITEs cannot grow tasks (and their memory) without end.
                let slot = match source {
                    SourceClass::Carrier => None,
                    _ => match ctx.guard.call_setups.try_acquire(peer.addr.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            ctx.metrics.message_dropped("call_setup_limit");
                            let mut response = response_to(&request, 503, Some("Service Unavailable"), None);
                            response.headers.push(Header::RetryAfter("5".into()));
                            ctx.endpoint.respond(&key, response);
                            continue;
                        }
                    },
                };
                let ctx = Arc::clone(&ctx);
                let span = tracing::info_span!("call", call_id = %message::call_id(&request), from = %peer.addr);
                // Boxed: the call's future is large (every state of a B2BUA call), and a future
                // spawned by value is copied several times on its way into the task (issue 22's
                // profile: ~22,000 instructions of memcpy per call); a box moves as a pointer.
                let call = Box::pin(inbound_call(ctx, request, key, peer));
                tokio::spawn(
                    async move {
                        let _slot = slot;
                        call.await;
                    }
                    .instrument(span),
                );
            }
            Method::Message => {
                let ctx = Arc::clone(&ctx);
                let pool = ctx.pool.clone();
                let hooks = ctx.webhooks.clone();
                tokio::spawn(super::sms::receive(ctx, pool, hooks, NewRequest { request, key, peer, source }));
            }
            Method::Options => {
                let mut response = response_to(&request, 200, Some("OK"), Some(&new_tag()));
                response.headers.push(Header::Allow(ALLOW.into()));
                response.headers.push(Header::Accept("application/sdp".into()));
                ctx.endpoint.respond(&key, response);
            }
            Method::Bye | Method::Update | Method::Info | Method::PRack => {
                ctx.endpoint.respond(&key, response_to(&request, 481, Some("Call/Transaction Does Not Exist"), None));
            }
            _ => {
                let mut response = response_to(&request, 405, Some("Method Not Allowed"), None);
                response.headers.push(Header::Allow(ALLOW.into()));
                ctx.endpoint.respond(&key, response);
            }
        }
    }
}

/// Why the inbound leg was refused before any outbound attempt.
struct Refuse {
    code: u16,
    reason: String,
    extra: Vec<Header>,
}

impl Refuse {
    fn new(code: u16, reason: impl Into<String>) -> Refuse {
        Refuse { code, reason: reason.into(), extra: vec![] }
    }
}

/// A place one outbound INVITE goes to.
#[derive(Clone)]
struct AttemptTarget {
    uri: rsip::Uri,
    to_user: String,
    peer: Peer,
    trunk: Option<Arc<TrunkConfig>>,
    gateway: String,
}

/// How one outbound attempt ended.
enum AttemptEnd {
    /// Answered: the outbound dialog and the 2xx.
    Answered(Box<(Dialog, Response)>),
    /// A final non-2xx or a timeout (`code` 408); `failover` says whether to try the next target.
    Failed { code: u16, reason: String, failover: bool },
    /// The caller cancelled.
    Cancelled,
}

/// Timing and parties of one attempt, for its CDR.
struct AttemptRecord {
    number: u32,
    trunk: Option<Arc<TrunkConfig>>,
    gateway: Option<String>,
    setup_at: DateTime<Utc>,
    ring_at: Option<DateTime<Utc>>,
    answer_at: Option<DateTime<Utc>>,
}

/// The shared facts of a call.
struct CallFacts {
    /// The node's own id of the call (keys its active row and CDRs).
    call_uuid: uuid::Uuid,
    /// The caller's SIP Call-ID.
    call_id: String,
    from: String,
    to: String,
    inbound_trunk: Option<Arc<TrunkConfig>>,
}

async fn inbound_call(ctx: Arc<CallContext>, invite: Request, key: TransactionKey, peer: Peer) {
    let snapshot = ctx.snapshot.current();
    let (a_tx, mut a_rx) = mpsc::unbounded_channel();
    ctx.endpoint.attach(&key, a_tx.clone());
    let a_tag = new_tag();
    let setup_at = Utc::now();
    let from = message::from_user(&invite).unwrap_or_default();
    let caller = message::normalize_number(&from).unwrap_or(from.clone());
    let dialled = invite.uri.user().map(str::to_string).or_else(|| message::to_user(&invite)).unwrap_or_default();
    let called = message::normalize_number(&dialled).unwrap_or(dialled.clone());
    let facts = CallFacts {
        call_uuid: uuid::Uuid::new_v4(),
        call_id: message::call_id(&invite),
        from: caller.clone(),
        to: called.clone(),
        inbound_trunk: None,
    };

    let admitted = admit(&ctx, &snapshot, &invite, peer, &called, &caller).await;
    let (_number, trunk, target, permit) = match admitted {
        Ok(admitted) => admitted,
        Err(refuse) => {
            tracing::info!(code = refuse.code, reason = %refuse.reason, "inbound call refused");
            let mut response = response_to(&invite, refuse.code, None, Some(&a_tag));
            response.headers.extend(refuse.extra);
            if refuse.code >= 400 && refuse.code != 401 && refuse.code != 407 {
                response.headers.push(reason_header(refuse.code, &refuse.reason));
            }
            ctx.endpoint.respond(&key, response);
            if refuse.code != 401 && refuse.code != 407 {
                let (provider, trunk) = admitted_trunk(&snapshot, &called);
                ctx.metrics.call_ended(&provider, &trunk, CallStatus::from_final_code(refuse.code), None);
            }
            return;
        }
    };
    let _permit: CallPermit = permit;
    let facts = CallFacts { inbound_trunk: Some(Arc::clone(&trunk)), ..facts };
    ctx.store.record(StoreEvent::CallStarted(ActiveCall {
        call_uuid: facts.call_uuid,
        call_id: facts.call_id.clone(),
        namespace: Some(trunk.namespace.clone()),
        trunk_name: Some(trunk.name.clone()),
        provider: Some(trunk.provider.clone()),
        direction: Direction::Inbound,
        from_number: caller.clone(),
        to_number: called.clone(),
        state: CallState::Setup,
        started_at: setup_at,
        answered_at: None,
    }));
    let _active: ActiveCallGuard = ctx.metrics.call_active(Some(&trunk.name));

    let mut call = Call {
        ctx: Arc::clone(&ctx),
        snapshot,
        invite,
        key,
        a_peer: peer,
        a_tag,
        a_tx,
        facts,
        attempts: 0,
        ring_at: None,
        answer_at: None,
        b_rx: None,
        b_tx: None,
        anchor: None,
    };
    let outcome = call.run(target, &mut a_rx).await;
    call.finish(outcome, setup_at);
}

/// The provider of the trunk that owns `called`, for the metrics of refused calls.
/// Provider and trunk of the number `called` (for the metrics of a refused call), `unknown`
/// when nobody owns it.
fn admitted_trunk(snapshot: &Snapshot, called: &str) -> (String, String) {
    snapshot
        .number(called)
        .and_then(|n| snapshot.trunk(&n.namespace, &n.trunk_ref))
        .map(|t| (t.provider.clone(), t.name.clone()))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

type Admitted = (NumberConfig, Arc<TrunkConfig>, Target, CallPermit);

/// Source, number, trunk, authentication, limits and routing, in the order a carrier expects
/// the answers: 403 for strangers, 404 for numbers nobody owns, 407 for digest, 503 for limits.
async fn admit(
    ctx: &CallContext,
    snapshot: &Snapshot,
    invite: &Request,
    peer: Peer,
    called: &str,
    caller: &str,
) -> Result<Admitted, Refuse> {
    if message::max_forwards(invite) == 0 {
        return Err(Refuse::new(483, "Too Many Hops"));
    }
    let source = peer.addr.ip();
    let known_source = snapshot.trunks().any(|t| t.inbound_enabled && routing::trunk_accepts_source(t, source));
    let digest_possible = snapshot.trunks().any(|t| t.inbound_enabled && t.auth_method == AuthMethod::Digest);
    let open_trunk = snapshot.trunks().any(|t| t.inbound_enabled && t.auth_method == AuthMethod::None);
    if !known_source && !digest_possible && !open_trunk {
        return Err(Refuse::new(403, format!("source {source} is not allowed by any trunk")));
    }
    let number = snapshot
        .number(called)
        .cloned()
        .ok_or_else(|| Refuse::new(404, format!("number {called} is not configured")))?;
    let trunk = snapshot
        .trunk(&number.namespace, &number.trunk_ref)
        .cloned()
        .ok_or_else(|| Refuse::new(404, format!("trunk {} of number {called} is missing", number.trunk_ref)))?;
    if !trunk.inbound_enabled || trunk.suspended {
        return Err(Refuse::new(403, format!("trunk {} does not accept inbound calls", trunk.name)));
    }
    let accepted_by_ip = routing::trunk_accepts_source(&trunk, source);
    match trunk.auth_method {
        AuthMethod::None => {}
        AuthMethod::Digest if !accepted_by_ip => {
            let credential = snapshot.credential(&trunk.namespace, &trunk.name);
            check_digest(ctx, invite, credential)?;
        }
        _ if !accepted_by_ip => {
            return Err(Refuse::new(403, format!("source {source} is not allowed by trunk {}", trunk.name)));
        }
        _ => {}
    }
    let permit = ctx.limits.acquire(&trunk).await.map_err(|limit| {
        let mut refuse = Refuse::new(503, limit.reason());
        refuse.extra.push(Header::RetryAfter("5".into()));
        refuse
    })?;
    let target = routing::inbound_target(snapshot, &number, caller).map_err(|r| Refuse::new(r.code, r.reason))?;
    let target = match target {
        Target::Reject(code) => return Err(Refuse::new(code, format!("routing rejects calls to {called}"))),
        Target::WebSocket(_) if ctx.media.is_none() => {
            return Err(Refuse::new(503, "AI WebSocket destinations need RTP ports, and this node has none"));
        }
        other => other,
    };
    Ok((number, trunk, target, permit))
}

fn check_digest(ctx: &CallContext, invite: &Request, credential: Option<&Credential>) -> Result<(), Refuse> {
    let Some(credential) = credential else {
        return Err(Refuse::new(403, "trunk uses digest but its Secret is missing"));
    };
    let now = Utc::now().timestamp().max(0) as u64;
    match ctx.challenger.verify(invite, &credential.username, &credential.password, now) {
        Verification::Ok => Ok(()),
        Verification::Stale => {
            let mut refuse = Refuse::new(407, "stale nonce");
            refuse.extra.push(ctx.challenger.challenge_stale(now, true));
            Err(refuse)
        }
        Verification::Replayed => {
            // The same answer again (a captured request resent): a fresh challenge, no call.
            let mut refuse = Refuse::new(407, "digest answer replayed");
            refuse.extra.push(ctx.challenger.challenge(now, true));
            Err(refuse)
        }
        Verification::Missing => {
            let mut refuse = Refuse::new(407, "Proxy Authentication Required");
            refuse.extra.push(ctx.challenger.challenge(now, true));
            Err(refuse)
        }
        Verification::Invalid(why) => Err(Refuse::new(403, format!("digest authentication failed: {why}"))),
    }
}

/// A `Reason` header (RFC 3326) carrying the node's explanation.
fn reason_header(code: u16, text: &str) -> Header {
    let text: String = text.chars().filter(|c| *c != '"' && !c.is_control()).take(200).collect();
    Header::Other("Reason".into(), format!("SIP;cause={code};text=\"{text}\""))
}

/// Which side ended a call.
#[derive(Clone, Copy)]
enum Ender {
    Caller,
    Callee,
    System,
}

/// How the whole call ended, for the CDR of the last attempt and the metrics.
struct Outcome {
    code: u16,
    reason: String,
    hangup_by: Ender,
    attempt: Option<AttemptRecord>,
}

struct Call {
    ctx: Arc<CallContext>,
    snapshot: Arc<Snapshot>,
    invite: Request,
    key: TransactionKey,
    a_peer: Peer,
    a_tag: String,
    a_tx: mpsc::UnboundedSender<TuEvent>,
    facts: CallFacts,
    attempts: u32,
    ring_at: Option<DateTime<Utc>>,
    answer_at: Option<DateTime<Utc>>,
    /// The answered outbound leg's event channel (kept registered for in-dialog requests).
    b_rx: Option<mpsc::UnboundedReceiver<TuEvent>>,
    b_tx: Option<mpsc::UnboundedSender<TuEvent>>,
    /// The call's anchored media (`None`: SDP passes through).
    anchor: Option<Anchor>,
}

/// Which leg a message belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Leg {
    A,
    B,
}

/// An in-dialog request forwarded from one leg to the other, waiting for its final response.
struct Pending {
    from: Leg,
    key: TransactionKey,
    request: Request,
    cseq: u32,
    /// The originator's offer when the node re-offered on the other leg (anchored media).
    offer: Option<crate::media::sdp::SessionDescription>,
}

impl Call {
    async fn run(&mut self, target: Target, a_rx: &mut mpsc::UnboundedReceiver<TuEvent>) -> Outcome {
        if let Target::WebSocket(url) = target {
            return self.bridge_to_agent(url, a_rx).await;
        }
        if let Some(media) = &self.ctx.media {
            match Anchor::new(media, &self.invite.body, self.facts.inbound_trunk.as_deref()) {
                Ok(anchor) => {
                    let (caller_port, callee_port) = anchor.ports();
                    tracing::debug!(caller_port, callee_port, "media anchored");
                    self.anchor = Some(anchor);
                }
                Err(error) if error.ports_exhausted() => return self.refuse_no_ports(error.to_string(), None),
                Err(error) => return self.refuse_caller(error.sip_status(), error.to_string(), None),
            }
        }
        let targets = self.targets(target).await;
        if targets.is_empty() {
            return self.refuse_caller(503, "no reachable target for this call".into(), None);
        }
        let mut last = (503u16, "all targets failed".to_string());
        // The outbound trunk's slot is taken when its first attempt starts and held until the
        // call moves to another trunk or ends; a trunk at its limit is skipped (failover).
        let mut slot: Option<(Arc<TrunkConfig>, CallPermit)> = None;
        for target in targets {
            if let Some(trunk) = &target.trunk
                && slot.as_ref().is_none_or(|(held, _)| !Arc::ptr_eq(held, trunk))
            {
                slot = None;
                match self.ctx.limits.acquire(trunk).await {
                    Ok(permit) => slot = Some((Arc::clone(trunk), permit)),
                    Err(limit) => {
                        tracing::info!(trunk = %trunk.name, reason = %limit.reason(), "skipping trunk at its limit");
                        last = (503, limit.reason());
                        continue;
                    }
                }
            }
            self.attempts += 1;
            let mut record = AttemptRecord {
                number: self.attempts,
                trunk: target.trunk.clone(),
                gateway: Some(target.gateway.clone()),
                setup_at: Utc::now(),
                ring_at: None,
                answer_at: None,
            };
            tracing::info!(attempt = self.attempts, gateway = %target.gateway, trunk = target.trunk.as_ref().map(|t| t.name.as_str()), "outbound attempt");
            match self.attempt(&target, &mut record, a_rx).await {
                AttemptEnd::Answered(answered) => {
                    let (mut b_dialog, answer) = *answered;
                    record.answer_at = Some(Utc::now());
                    if let Err(error) = self.anchor_answer(&answer) {
                        // The callee answered with media the node cannot use: hang it up and
                        // try the next target.
                        let reason = format!("callee's SDP: {error}");
                        tracing::info!(attempt = self.attempts, %reason, "answered attempt unusable");
                        if let Some(b_tx) = self.b_tx.take() {
                            self.send_bye(&mut b_dialog, &b_tx, &[HangupReason::incompatible(&reason).header()]);
                        }
                        self.b_rx = None;
                        self.ctx.endpoint.unregister_dialog(&b_dialog.call_id, &b_dialog.local_tag);
                        self.write_cdr(&record, Utc::now(), 488, &reason, Ender::System);
                        last = (488, reason);
                        continue;
                    }
                    return self.connected(b_dialog, answer, record, a_rx).await;
                }
                AttemptEnd::Cancelled if self.ctx.drain.is_ending() => {
                    // The node stops: the carrier may retry the call elsewhere.
                    return self.refuse_caller(503, crate::drain::NODE_SHUTDOWN.into(), Some(record));
                }
                AttemptEnd::Cancelled => {
                    self.respond_a(487, "Request Terminated", None);
                    return Outcome {
                        code: 487,
                        reason: "caller cancelled".into(),
                        hangup_by: Ender::Caller,
                        attempt: Some(record),
                    };
                }
                AttemptEnd::Failed { code, reason, failover } => {
                    tracing::info!(attempt = self.attempts, code, %reason, failover, "attempt failed");
                    if !failover {
                        return self.refuse_caller(code, reason, Some(record));
                    }
                    self.write_cdr(&record, Utc::now(), code, &reason, Ender::System);
                    last = (code, reason);
                }
            }
        }
        let code = match last.0 {
            408 => 408,
            code if (500..600).contains(&code) => 503,
            code => code,
        };
        self.refuse_caller(code, last.1, None)
    }

    fn refuse_caller(&self, code: u16, reason: String, attempt: Option<AttemptRecord>) -> Outcome {
        self.respond_a(code, &reason, Some(&reason));
        let ender = if matches!(code, 486 | 600 | 603 | 480) { Ender::Callee } else { Ender::System };
        Outcome { code, reason, hangup_by: ender, attempt }
    }

    /// Refuses a call that found no free RTP port pair: 503 with `Retry-After` (not a timeout),
    /// counted in `switchboard_rtp_port_exhaustions_total`.
    fn refuse_no_ports(&self, reason: String, attempt: Option<AttemptRecord>) -> Outcome {
        self.ctx.metrics.rtp_port_exhausted();
        tracing::warn!(%reason, "call refused: no free RTP port pair (see --rtp-ports)");
        let mut response = response_to(&self.invite, 503, Some("Service Unavailable"), Some(&self.a_tag));
        response.headers.push(Header::RetryAfter(PORTS_RETRY_AFTER.into()));
        response.headers.push(reason_header(503, &reason));
        self.ctx.endpoint.respond(&self.key, response);
        Outcome { code: 503, reason, hangup_by: Ender::System, attempt }
    }

    fn respond_a(&self, code: u16, reason_phrase: &str, reason_text: Option<&str>) {
        let phrase = if (100..700).contains(&code) && !reason_phrase.is_empty() && reason_phrase.len() < 60 {
            Some(reason_phrase)
        } else {
            None
        };
        let mut response = response_to(&self.invite, code, phrase, Some(&self.a_tag));
        if let Some(text) = reason_text {
            response.headers.push(reason_header(code, text));
        }
        self.ctx.endpoint.respond(&self.key, response);
    }

    /// Every place to try, in order: each gateway address of each trunk, or the SIP URI's
    /// addresses.
    async fn targets(&self, target: Target) -> Vec<AttemptTarget> {
        let mut out = Vec::new();
        match target {
            Target::SipUri(uri) => {
                let Ok(uri) = rsip::Uri::try_from(uri.as_str()) else { return out };
                let protocol = match (&uri.scheme, uri.transport()) {
                    (Some(rsip::Scheme::Sips), _) | (_, Some(rsip::Transport::Tls)) => Some(Protocol::Tls),
                    (_, Some(rsip::Transport::Tcp)) => Some(Protocol::Tcp),
                    (_, None | Some(rsip::Transport::Udp)) => Some(Protocol::Udp),
                    (_, Some(_)) => None,
                };
                let Some(protocol) = protocol else {
                    tracing::warn!(%uri, "{}", routing::TLS_UNSUPPORTED);
                    return out;
                };
                let host = uri.host().to_string();
                let port = uri.port().map(|p| *p.value());
                if let Ok(addrs) = self.ctx.resolver.resolve(&host, port, protocol).await {
                    let to_user = uri.user().unwrap_or_default().to_string();
                    for addr in addrs {
                        out.push(AttemptTarget {
                            uri: uri.clone(),
                            to_user: to_user.clone(),
                            peer: Peer { protocol, addr },
                            trunk: None,
                            gateway: addr.to_string(),
                        });
                    }
                }
            }
            Target::Number { number, trunks } => {
                for trunk in trunks {
                    let user = routing::format_for_trunk(&trunk, &number);
                    for gateway in routing::gateway_order(&trunk) {
                        let Some(protocol) = routing::signaling_protocol(gateway.transport) else {
                            tracing::warn!(gateway = %gateway.address, "{}", routing::TLS_UNSUPPORTED);
                            continue;
                        };
                        let Ok(addrs) = self.ctx.resolver.resolve(&gateway.address, gateway.port, protocol).await
                        else {
                            tracing::warn!(gateway = %gateway.address, "gateway does not resolve");
                            continue;
                        };
                        let host = match gateway.port {
                            Some(port) => format!("{}:{port}", gateway.address),
                            None => gateway.address.clone(),
                        };
                        let Ok(uri) = rsip::Uri::try_from(format!("sip:{user}@{host}").as_str()) else { continue };
                        for addr in addrs {
                            out.push(AttemptTarget {
                                uri: uri.clone(),
                                to_user: user.clone(),
                                peer: Peer { protocol, addr },
                                trunk: Some(Arc::clone(&trunk)),
                                gateway: host.clone(),
                            });
                        }
                    }
                }
            }
            Target::WebSocket(_) | Target::Reject(_) => {}
        }
        out
    }

    /// Builds the outbound INVITE for `target`.
    fn outbound_invite(
        &self,
        target: &AttemptTarget,
        call_id: &str,
        tag: &str,
        cseq: u32,
        offer: Option<&[u8]>,
    ) -> Request {
        let endpoint = &self.ctx.endpoint;
        let (host, port) = endpoint.transport().sent_by(target.peer.addr);
        let caller = self.caller_id(target);
        let uri_host = target.uri.host_with_port.to_string();
        let mut headers: Vec<Header> = vec![
            endpoint.via_for(target.peer),
            Header::MaxForwards(headers::MaxForwards::from(message::max_forwards(&self.invite).saturating_sub(1))),
            Header::From(headers::From::new(format!("<sip:{caller}@{host}:{port}>;tag={tag}"))),
            Header::To(headers::To::new(format!("<sip:{}@{uri_host}>", target.to_user))),
            Header::CallId(headers::CallId::new(call_id.to_string())),
            Header::CSeq(headers::CSeq::new(format!("{cseq} INVITE"))),
            Header::Contact(headers::Contact::new(endpoint.contact_for(target.peer, &caller))),
            Header::Allow(ALLOW.into()),
            Header::UserAgent("switchboard".into()),
        ];
        if let Some(value) = message::header_value(&self.invite.headers, "Supported") {
            // Only extensions the node itself handles end to end: it does not send PRACK
            // (100rel) nor refresh sessions (timer), so the callee must not rely on them.
            let kept: Vec<&str> = value
                .split(',')
                .map(str::trim)
                .filter(|option| {
                    !option.is_empty() && !matches!(option.to_ascii_lowercase().as_str(), "100rel" | "timer")
                })
                .collect();
            if !kept.is_empty() {
                headers.push(Header::Supported(kept.join(", ").into()));
            }
        }
        let mut request = Request {
            method: Method::Invite,
            uri: target.uri.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: vec![],
        };
        match offer {
            Some(offer) => {
                message::set_body(&mut request.headers, &mut request.body, offer.to_vec(), Some("application/sdp"))
            }
            None => {
                let ct = content_type(&self.invite.headers);
                message::set_body(
                    &mut request.headers,
                    &mut request.body,
                    self.invite.body.clone(),
                    if self.invite.body.is_empty() { None } else { ct.as_deref() },
                );
            }
        }
        request
    }

    /// The caller ID presented on the outbound leg: the caller's number as it came in.
    fn caller_id(&self, _target: &AttemptTarget) -> String {
        if self.facts.from.is_empty() { "anonymous".into() } else { self.facts.from.clone() }
    }

    async fn attempt(
        &mut self,
        target: &AttemptTarget,
        record: &mut AttemptRecord,
        a_rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    ) -> AttemptEnd {
        let call_id = format!("{}-b{}", uuid::Uuid::new_v4().simple(), self.attempts);
        let tag = new_tag();
        let offer = self.anchor.as_mut().map(|anchor| anchor.offer_for(target.trunk.as_deref()));
        let invite = self.outbound_invite(target, &call_id, &tag, 1, offer.as_deref());
        let setup = InviteSetup {
            peer: target.peer,
            tag,
            credential: target.trunk.as_ref().and_then(|t| self.snapshot.credential(&t.namespace, &t.name)).cloned(),
            no_response: failover_timeout(target.trunk.as_deref()),
            ring_limit: RING_TIMEOUT,
            gateway: target.gateway.clone(),
            contact_user: self.caller_id(target),
        };
        let ctx = Arc::clone(&self.ctx);
        let mut client = InviteClient::send(&ctx, invite, setup);
        loop {
            match client.next(Some(&mut *a_rx)).await {
                InviteEvent::Provisional(response) => {
                    if record.ring_at.is_none() {
                        record.ring_at = Some(Utc::now());
                        self.ring_at.get_or_insert(Utc::now());
                    }
                    self.relay_provisional(&response);
                }
                InviteEvent::Answered(answered) => {
                    // The dialog's channel stays registered: in-dialog requests from the
                    // callee keep arriving on b_rx after this function returns.
                    let (b_tx, b_rx) = client.into_channel();
                    self.b_tx = Some(b_tx);
                    self.b_rx = b_rx;
                    return AttemptEnd::Answered(answered);
                }
                InviteEvent::Failed { code, reason, failover } => return AttemptEnd::Failed { code, reason, failover },
                InviteEvent::Cancelled => return AttemptEnd::Cancelled,
            }
        }
    }

    /// Passes a provisional response to the caller; with anchored media its early SDP becomes
    /// the node's answer to the caller and the relay starts (ringback from the carrier).
    fn relay_provisional(&mut self, response: &Response) {
        let code = message::status(response);
        let mut relayed = response_to(&self.invite, code, None, Some(&self.a_tag));
        relayed.headers.push(Header::Contact(headers::Contact::new(self.ctx.endpoint.contact_for(self.a_peer, ""))));
        if let Some(anchor) = self.anchor.as_mut() {
            if !response.body.is_empty() {
                match anchor.callee_answered(&response.body) {
                    Ok(()) => {
                        if let Some(body) = anchor.caller_answer() {
                            message::set_body(&mut relayed.headers, &mut relayed.body, body, Some("application/sdp"));
                        }
                    }
                    Err(error) => tracing::info!(%error, "early media SDP unusable; provisional passed without it"),
                }
            }
        } else if !response.body.is_empty() {
            let ct = content_type(&response.headers);
            message::set_body(&mut relayed.headers, &mut relayed.body, response.body.clone(), ct.as_deref());
        }
        self.ctx.endpoint.respond(&self.key, relayed);
    }

    fn write_cdr(&self, record: &AttemptRecord, end_at: DateTime<Utc>, code: u16, reason: &str, ender: Ender) {
        let trunk = record.trunk.as_ref().or(self.facts.inbound_trunk.as_ref());
        let outbound = record.trunk.is_some();
        let billable = billable_seconds(record.answer_at, end_at);
        let rate = match (trunk, outbound) {
            (Some(t), true) => t.rate_outbound_per_minute,
            (Some(t), false) => t.rate_inbound_per_minute,
            (None, _) => rust_decimal::Decimal::ZERO,
        };
        self.ctx.store.record(StoreEvent::Cdr(CdrRecord {
            call_uuid: self.facts.call_uuid,
            call_id: self.facts.call_id.clone(),
            attempt: record.number,
            namespace: trunk.map(|t| t.namespace.clone()),
            trunk_name: trunk.map(|t| t.name.clone()),
            provider: trunk.map(|t| t.provider.clone()),
            gateway: record.gateway.clone(),
            direction: if outbound { Direction::Outbound } else { Direction::Inbound },
            from_number: self.facts.from.clone(),
            to_number: self.facts.to.clone(),
            setup_at: record.setup_at,
            ring_at: record.ring_at,
            answer_at: record.answer_at,
            end_at,
            sip_code: Some(code),
            reason: Some(reason.to_string()),
            hangup_by: Some(match ender {
                Ender::Caller => HangupBy::Caller,
                Ender::Callee => HangupBy::Callee,
                Ender::System => HangupBy::System,
            }),
            billable_seconds: billable,
            cost: cdr_cost(rate, billable),
            currency: trunk.map(|t| t.currency.clone()).unwrap_or_else(|| "USD".into()),
        }));
    }

    fn finish(&self, outcome: Outcome, setup_at: DateTime<Utc>) {
        let end_at = Utc::now();
        let record = outcome.attempt.unwrap_or(AttemptRecord {
            number: self.attempts.max(1),
            trunk: None,
            gateway: None,
            setup_at,
            ring_at: self.ring_at,
            answer_at: self.answer_at,
        });
        self.write_cdr(&record, end_at, outcome.code, &outcome.reason, outcome.hangup_by);
        self.ctx.store.record(StoreEvent::CallEnded { call_uuid: self.facts.call_uuid });
        let inbound = self.facts.inbound_trunk.as_ref();
        let provider = inbound.map(|t| t.provider.as_str()).unwrap_or("unknown");
        let trunk = inbound.map(|t| t.name.as_str()).unwrap_or("unknown");
        let talk_time = record.answer_at.map(|a| (end_at - a).to_std().unwrap_or_default());
        let status =
            if record.answer_at.is_some() { CallStatus::Answered } else { CallStatus::from_final_code(outcome.code) };
        self.ctx.metrics.call_ended(provider, trunk, status, talk_time);
        tracing::info!(code = outcome.code, reason = %outcome.reason, attempts = self.attempts, "call ended");
    }
}

impl Call {
    /// The established phase: answer the caller, then pass in-dialog requests across until
    /// either side hangs up.
    async fn connected(
        &mut self,
        mut b: Dialog,
        answer: Response,
        mut record: AttemptRecord,
        a_rx: &mut mpsc::UnboundedReceiver<TuEvent>,
    ) -> Outcome {
        let (Some(mut b_rx), Some(b_tx)) = (self.b_rx.take(), self.b_tx.take()) else {
            return Outcome {
                code: 500,
                reason: "internal: outbound leg lost".into(),
                hangup_by: Ender::System,
                attempt: Some(record),
            };
        };
        let contact = self.ctx.endpoint.contact_for(self.a_peer, "");
        let Some(mut a) = Dialog::as_uas(&self.invite, &self.a_tag, self.a_peer, contact.clone()) else {
            return Outcome {
                code: 500,
                reason: "internal: inbound dialog unusable".into(),
                hangup_by: Ender::System,
                attempt: Some(record),
            };
        };
        self.ctx.endpoint.register_dialog(&a.call_id, &a.local_tag, self.a_tx.clone());
        let original_b_cseq = b.local_cseq;

        let mut ok = response_to(&self.invite, 200, Some("OK"), Some(&self.a_tag));
        ok.headers.push(Header::Contact(headers::Contact::new(contact)));
        ok.headers.push(Header::Allow(ALLOW.into()));
        match self.anchor.as_ref().and_then(Anchor::caller_final_body) {
            Some(sdp) => message::set_body(&mut ok.headers, &mut ok.body, sdp, Some("application/sdp")),
            None => {
                let ct = content_type(&answer.headers);
                message::set_body(
                    &mut ok.headers,
                    &mut ok.body,
                    answer.body.clone(),
                    if answer.body.is_empty() { None } else { ct.as_deref() },
                );
            }
        }
        let mut relay_events = self.anchor.as_mut().and_then(Anchor::take_events);
        self.ctx.endpoint.respond(&self.key, ok.clone());
        let answered_at = record.answer_at.unwrap_or_else(Utc::now);
        self.answer_at = Some(answered_at);
        self.ctx.store.record(StoreEvent::CallAnswered { call_uuid: self.facts.call_uuid, at: answered_at });

        // RFC 3261 13.3.1.4: the 2xx is retransmitted until the ACK comes (UDP only).
        let reliable = self.a_peer.protocol.is_reliable();
        let mut acked = reliable;
        let mut interval = self.ctx.timers.t1;
        let give_up = tokio::time::Instant::now() + self.ctx.timers.t1 * 64;
        let retransmit = tokio::time::sleep(interval);
        tokio::pin!(retransmit);
        let mut pending: Vec<Pending> = Vec::new();

        let (code, reason, ender) = loop {
            tokio::select! {
                () = &mut retransmit, if !acked => {
                    if tokio::time::Instant::now() >= give_up {
                        tracing::warn!("no ACK for the 200 OK from the caller; ending the call");
                        let why = "caller never acknowledged the answer";
                        let reason = [HangupReason::timer(why).header()];
                        self.send_bye(&mut b, &b_tx, &reason);
                        self.send_bye(&mut a, &self.a_tx.clone(), &reason);
                        break (408, why.to_string(), Ender::System);
                    }
                    self.ctx.endpoint.send_stateless(rsip::SipMessage::Response(ok.clone()), self.a_peer);
                    self.ctx.metrics.retransmission();
                    interval = (interval * 2).min(self.ctx.timers.t2);
                    retransmit.as_mut().reset(tokio::time::Instant::now() + interval);
                }
                () = self.ctx.drain.ending() => {
                    let reason = [HangupReason::normal(crate::drain::NODE_SHUTDOWN).header()];
                    self.send_bye(&mut b, &b_tx, &reason);
                    let a_tx = self.a_tx.clone();
                    self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                    break (200, crate::drain::NODE_SHUTDOWN.to_string(), Ender::System);
                }
                event = next_relay_event(&mut relay_events) => match event {
                    RelayEvent::MediaTimeout { silent_for } => {
                        tracing::info!(silent_for = ?silent_for, "media timeout");
                        let why = format!("media timeout: no RTP for {} s", silent_for.as_secs());
                        let reason = [HangupReason::timer(&why).header()];
                        self.send_bye(&mut b, &b_tx, &reason);
                        let a_tx = self.a_tx.clone();
                        self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                        break (408, why, Ender::System);
                    }
                    RelayEvent::Dtmf { leg, digit } => tracing::debug!(?leg, ?digit, "DTMF relayed"),
                    RelayEvent::Latched { leg, source } => tracing::debug!(?leg, %source, "RTP latched"),
                },
                event = a_rx.recv() => {
                    let Some(event) = event else { break (500, "internal: channel closed".into(), Ender::System) };
                    match event {
                        TuEvent::Request { request, key, .. } => match (request.method, key) {
                            (Method::Ack, _) => {
                                acked = true;
                                if let Some(anchor) = self.anchor.as_mut().filter(|a| a.awaits_caller_answer()) {
                                    // Delayed offer: the ACK carries the caller's answer.
                                    if let Err(error) = anchor.caller_acked(&request.body) {
                                        tracing::info!(%error, "the caller's ACK has no usable answer to the node's offer");
                                        let why = format!("caller's answer in ACK: {error}");
                                        let reason = [HangupReason::incompatible(&why).header()];
                                        self.send_bye(&mut b, &b_tx, &reason);
                                        let a_tx = self.a_tx.clone();
                                        self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                                        break (488, why, Ender::System);
                                    }
                                    relay_events = anchor.take_events();
                                }
                            }
                            (Method::Bye, Some(key)) => {
                                self.ctx.endpoint.respond(&key, response_to(&request, 200, Some("OK"), None));
                                let reason = relayed_reason(&request, "caller hung up");
                                self.bye_and_wait(&mut b, &b_tx, &mut b_rx, &reason).await;
                                break (200, "caller hung up".into(), Ender::Caller);
                            }
                            (_, Some(key)) => {
                                acked = true;
                                let from_contact = a.contact.clone();
                                self.forward(Leg::A, request, key, &from_contact, &mut b, &b_tx, &mut pending);
                            }
                            (_, None) => {}
                        },
                        TuEvent::Response(response) => self.relay_final(Leg::A, response, &mut a, &mut pending),
                        TuEvent::Timeout => self.fail_pending(Leg::A, &mut pending),
                        TuEvent::Cancelled => {}
                    }
                }
                event = b_rx.recv() => {
                    let Some(event) = event else { break (500, "internal: channel closed".into(), Ender::System) };
                    match event {
                        TuEvent::Request { request, key, .. } => match (request.method, key) {
                            (Method::Ack, _) => {}
                            (Method::Bye, Some(key)) => {
                                self.ctx.endpoint.respond(&key, response_to(&request, 200, Some("OK"), None));
                                let a_tx = self.a_tx.clone();
                                let reason = relayed_reason(&request, "callee hung up");
                                self.bye_and_wait(&mut a, &a_tx, a_rx, &reason).await;
                                break (200, "callee hung up".into(), Ender::Callee);
                            }
                            (_, Some(key)) => {
                                let from_contact = b.contact.clone();
                                let a_tx = self.a_tx.clone();
                                self.forward(Leg::B, request, key, &from_contact, &mut a, &a_tx, &mut pending);
                            }
                            (_, None) => {}
                        },
                        TuEvent::Response(response) => {
                            let is_original_2xx = matches!(message::cseq(&response), Some((n, Method::Invite)) if n == original_b_cseq)
                                && (200..300).contains(&message::status(&response));
                            if is_original_2xx {
                                // Our ACK was lost: the callee retransmits its 2xx.
                                let ack = b.request(Method::Ack, self.ctx.endpoint.via_for(b.peer), Some(original_b_cseq), None);
                                self.ctx.endpoint.send_stateless(rsip::SipMessage::Request(ack), b.peer);
                            } else {
                                self.relay_final(Leg::B, response, &mut b, &mut pending);
                            }
                        }
                        TuEvent::Timeout => self.fail_pending(Leg::B, &mut pending),
                        TuEvent::Cancelled => {}
                    }
                }
            }
        };
        self.ctx.endpoint.unregister_dialog(&a.call_id, &a.local_tag);
        self.ctx.endpoint.unregister_dialog(&b.call_id, &b.local_tag);
        if let Some(anchor) = self.anchor.take()
            && let Some(stats) = anchor.stop().await
        {
            tracing::info!(
                caller_in = stats.a.packets_in,
                caller_out = stats.a.packets_out,
                callee_in = stats.b.packets_in,
                callee_out = stats.b.packets_out,
                "call media"
            );
        }
        record.answer_at = Some(answered_at);
        Outcome { code, reason, hangup_by: ender, attempt: Some(record) }
    }

    /// Passes an in-dialog request (re-INVITE, UPDATE, INFO, ...) from one leg to the other.
    /// With anchored media an offer is not passed but re-offered by the node on the other leg
    /// (mirroring its direction: hold and resume), and a re-INVITE without an offer is
    /// answered here with the node's current SDP.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        from: Leg,
        request: Request,
        key: TransactionKey,
        from_contact: &str,
        other: &mut Dialog,
        other_tx: &mpsc::UnboundedSender<TuEvent>,
        pending: &mut Vec<Pending>,
    ) {
        let ct = content_type(&request.headers);
        let mut body =
            (!request.body.is_empty()).then(|| (ct.clone().unwrap_or("application/sdp".into()), request.body.clone()));
        let mut offer = None;
        let is_sdp = ct.as_deref().is_none_or(|ct| ct.to_ascii_lowercase().starts_with("application/sdp"));
        if let Some(anchor) = self.anchor.as_mut()
            && matches!(request.method, Method::Invite | Method::Update)
        {
            if request.body.is_empty() && request.method == Method::Invite {
                let mut response = response_to(&request, 200, Some("OK"), None);
                response.headers.push(Header::Contact(headers::Contact::new(from_contact.to_string())));
                if let Some(sdp) = anchor.last_sent(from) {
                    message::set_body(&mut response.headers, &mut response.body, sdp, Some("application/sdp"));
                }
                self.ctx.endpoint.respond(&key, response);
                return;
            }
            if !request.body.is_empty() && is_sdp {
                match anchor.reoffer(from, &request.body) {
                    Ok((parsed, ours)) => {
                        offer = Some(parsed);
                        body = Some(("application/sdp".into(), ours));
                    }
                    Err(error) => {
                        tracing::info!(%error, leg = ?from, "re-offer refused");
                        self.ctx.endpoint.respond(&key, response_to(&request, error.sip_status(), None, None));
                        return;
                    }
                }
            }
        }
        let body = body.as_ref().map(|(ct, bytes)| (ct.as_str(), bytes.clone()));
        let forwarded = other.request(request.method, self.ctx.endpoint.via_for(other.peer), None, body);
        let cseq = other.local_cseq;
        self.ctx.endpoint.send_request(forwarded, other.peer, other_tx.clone());
        pending.push(Pending { from, key, request, cseq, offer });
    }

    /// Applies the callee's answer to the anchored media (its 2xx SDP, else the early SDP).
    fn anchor_answer(&mut self, answer: &Response) -> Result<(), crate::media::sdp::SdpError> {
        let Some(anchor) = self.anchor.as_mut() else { return Ok(()) };
        if !answer.body.is_empty() {
            anchor.callee_answered(&answer.body)
        } else if anchor.caller_final_body().is_some() {
            Ok(())
        } else {
            Err(crate::media::sdp::SdpError::NoAudio)
        }
    }

    /// Relays the final response to a forwarded request back to the leg it came from; `leg` is
    /// the leg the response arrived on. A 2xx to a forwarded re-INVITE is ACKed here.
    fn relay_final(&mut self, leg: Leg, response: Response, dialog: &mut Dialog, pending: &mut Vec<Pending>) {
        let Some((number, method)) = message::cseq(&response) else { return };
        let mut code = message::status(&response);
        let Some(index) = pending.iter().position(|p| p.from != leg && p.cseq == number && p.request.method == method)
        else {
            return;
        };
        if code < 200 {
            return;
        }
        let p = pending.remove(index);
        if method == Method::Invite && (200..300).contains(&code) {
            let ack = dialog.request(Method::Ack, self.ctx.endpoint.via_for(dialog.peer), Some(number), None);
            self.ctx.endpoint.send_stateless(rsip::SipMessage::Request(ack), dialog.peer);
        }
        let mut body = (!response.body.is_empty())
            .then(|| (content_type(&response.headers).unwrap_or("application/sdp".into()), response.body.clone()));
        if let (Some(offer), Some(anchor)) = (p.offer.as_ref(), self.anchor.as_mut()) {
            body = None;
            if (200..300).contains(&code) {
                match anchor.reanswer(p.from, offer, &response.body) {
                    Ok(answer) => body = Some(("application/sdp".into(), answer)),
                    Err(error) => {
                        tracing::info!(%error, "the other leg's answer to a re-offer is unusable");
                        code = 488;
                    }
                }
            }
        }
        let mut relayed = response_to(&p.request, code, None, None);
        if matches!(method, Method::Invite | Method::Update) && (200..300).contains(&code) {
            let peer = if p.from == Leg::A { self.a_peer } else { dialog.peer };
            relayed.headers.push(Header::Contact(headers::Contact::new(self.ctx.endpoint.contact_for(peer, ""))));
        }
        if let Some((ct, bytes)) = body {
            message::set_body(&mut relayed.headers, &mut relayed.body, bytes, Some(&ct));
        }
        self.ctx.endpoint.respond(&p.key, relayed);
    }

    /// A forwarded request timed out on `leg`: answer its originator with 408.
    fn fail_pending(&self, leg: Leg, pending: &mut Vec<Pending>) {
        pending.retain(|p| {
            if p.from != leg {
                self.ctx.endpoint.respond(&p.key, response_to(&p.request, 408, None, None));
                false
            } else {
                true
            }
        });
    }

    /// Sends BYE on a leg with the `Reason` header(s) saying why (RFC 3326).
    fn send_bye(&self, dialog: &mut Dialog, tx: &mpsc::UnboundedSender<TuEvent>, reason: &[Header]) {
        let bye = dialog.bye(self.ctx.endpoint.via_for(dialog.peer), reason);
        self.ctx.endpoint.send_request(bye, dialog.peer, tx.clone());
    }

    /// Sends BYE on a leg and waits (bounded) for its final response.
    async fn bye_and_wait(
        &self,
        dialog: &mut Dialog,
        tx: &mpsc::UnboundedSender<TuEvent>,
        rx: &mut mpsc::UnboundedReceiver<TuEvent>,
        reason: &[Header],
    ) {
        self.send_bye(dialog, tx, reason);
        let bye_cseq = dialog.local_cseq;
        let _ = tokio::time::timeout(BYE_WAIT, async {
            while let Some(event) = rx.recv().await {
                match event {
                    TuEvent::Response(r)
                        if message::cseq(&r) == Some((bye_cseq, Method::Bye)) && message::status(&r) >= 200 =>
                    {
                        return;
                    }
                    TuEvent::Timeout => return,
                    TuEvent::Request { request, key: Some(key), .. } => {
                        // A crossing BYE (both hung up at once) or anything else: answer it.
                        let code = if request.method == Method::Bye { 200 } else { 481 };
                        self.ctx.endpoint.respond(&key, response_to(&request, code, None, None));
                    }
                    _ => {}
                }
            }
        })
        .await;
    }
}

/// The next event of a call's relay; never resolves when there is none.
async fn next_relay_event(events: &mut Option<mpsc::Receiver<RelayEvent>>) -> RelayEvent {
    if let Some(rx) = events.as_mut()
        && let Some(event) = rx.recv().await
    {
        return event;
    }
    *events = None;
    std::future::pending().await
}

/// The Reason to put on the BYE relayed to the other leg: the hanging-up side's own, else
/// normal clearing with `text`.
fn relayed_reason(request: &Request, text: &str) -> Vec<Header> {
    let theirs = message::reason_headers(request);
    if theirs.is_empty() { vec![HangupReason::normal(text).header()] } else { theirs }
}
