//! Admission of an inbound INVITE: source, number, trunk, digest authentication, limits and
//! routing, in the order a carrier expects the answers; and the refusals the caller gets when
//! the call cannot go on (before or after outbound attempts).

use std::sync::Arc;

use chrono::Utc;
use rsip::Request;
use rsip::headers::Header;
use switchboard_model::{AuthMethod, Credential, NumberConfig, TrunkConfig};

use super::record::{AttemptRecord, Ender, Outcome};
use super::{Call, NodeContext, PORTS_RETRY_AFTER};
use crate::config::Snapshot;
use crate::sip::digest::Verification;
use crate::sip::limits::CallPermit;
use crate::sip::message;
use crate::sip::routing::{self, Target};
use crate::sip::tls::peer_auth;
use crate::sip::transaction::response_to;
use crate::sip::transport::{Peer, Protocol};

/// Why the inbound leg was refused before any outbound attempt.
pub(super) struct Refuse {
    pub(super) code: u16,
    pub(super) reason: String,
    pub(super) extra: Vec<Header>,
}

impl Refuse {
    pub(super) fn new(code: u16, reason: impl Into<String>) -> Refuse {
        Refuse { code, reason: reason.into(), extra: vec![] }
    }
}
/// The provider of the trunk that owns `called`, for the metrics of refused calls.
/// Provider and trunk of the number `called` (for the metrics of a refused call), `unknown`
/// when nobody owns it.
pub(super) fn admitted_trunk(snapshot: &Snapshot, called: &str) -> (String, String) {
    snapshot
        .number(called)
        .and_then(|n| snapshot.trunk(&n.namespace, &n.trunk_ref))
        .map(|t| (t.provider.clone(), t.name.clone()))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

pub(super) type Admitted = (NumberConfig, Arc<TrunkConfig>, Target, CallPermit);

/// Source, number, trunk, authentication, limits and routing, in the order a carrier expects
/// the answers: 403 for strangers, 404 for numbers nobody owns, 407 for digest, 503 for limits.
pub(super) async fn admit(
    ctx: &NodeContext,
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
    let certificate_possible =
        peer.protocol == Protocol::Tls && snapshot.trunks().any(|t| t.inbound_enabled && t.requires_peer_certificate());
    if !known_source && !digest_possible && !open_trunk && !certificate_possible {
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
        // Inbound mutual TLS: the connection's client certificate, whatever the source address.
        AuthMethod::Certificate if trunk.requires_peer_certificate() => {
            let tls = ctx.endpoint.transport().tls().map(|t| &**t);
            peer_auth::admit(tls, snapshot, &trunk, peer, &ctx.metrics).map_err(|reason| Refuse::new(403, reason))?;
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

pub(super) fn check_digest(ctx: &NodeContext, invite: &Request, credential: Option<&Credential>) -> Result<(), Refuse> {
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

/// A `Reason` header (RFC 3326) carrying the node's explanation. Up to 400 characters: room for
/// a refused client certificate's names and SHA-256 fingerprint (95 characters) and what to fix.
pub(super) fn reason_header(code: u16, text: &str) -> Header {
    let text: String = text.chars().filter(|c| *c != '"' && !c.is_control()).take(400).collect();
    Header::Other("Reason".into(), format!("SIP;cause={code};text=\"{text}\""))
}

impl Call {
    pub(super) fn refuse_caller(&self, code: u16, reason: String, attempt: Option<AttemptRecord>) -> Outcome {
        self.respond_a(code, &reason, Some(&reason));
        let ender = if matches!(code, 486 | 600 | 603 | 480) { Ender::Callee } else { Ender::System };
        Outcome { code, reason, hangup_by: ender, attempt }
    }

    /// Refuses a call that found no free RTP port pair: 503 with `Retry-After` (not a timeout),
    /// counted in `switchboard_rtp_port_exhaustions_total`.
    pub(super) fn refuse_no_ports(&self, reason: String, attempt: Option<AttemptRecord>) -> Outcome {
        self.ctx.metrics.rtp_port_exhausted();
        tracing::warn!(%reason, "call refused: no free RTP port pair (see --rtp-ports)");
        let mut response = response_to(&self.invite, 503, Some("Service Unavailable"), Some(&self.a_tag));
        response.headers.push(Header::RetryAfter(PORTS_RETRY_AFTER.into()));
        response.headers.push(reason_header(503, &reason));
        self.ctx.endpoint.respond(&self.key, response);
        Outcome { code: 503, reason, hangup_by: Ender::System, attempt }
    }

    pub(super) fn respond_a(&self, code: u16, reason_phrase: &str, reason_text: Option<&str>) {
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
}
