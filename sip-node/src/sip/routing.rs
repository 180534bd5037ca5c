//! Routing decisions as pure functions of the configuration snapshot: which trunk a request
//! comes from, where a dialled number goes, which trunks and gateways an outbound call tries in
//! which order, and how a number is written for a given carrier.
//!
//! Nothing here touches the network, so every decision is unit-tested with plain values.

use std::net::IpAddr;
use std::sync::Arc;

use rand::Rng as _;
use regex::Regex;
use switchboard_model::{
    DestinationType, GatewayConfig, NumberConfig, RuleConfig, Transport, TrunkConfig, TrunkSelection,
};

use super::transport::Protocol;
use crate::config::Snapshot;

/// Why a target is skipped: a transport the node does not speak.
pub const TLS_UNSUPPORTED: &str = "unsupported transport; the target is skipped";

/// The socket protocol of a gateway's transport. Every transport maps to itself: a TLS gateway
/// is reached over TLS (sip/tls/), never sent plaintext on its TLS port (as `Tcp => Tcp,
/// _ => Udp` once did). `Option` stays for transports the model may add before the node
/// speaks them.
pub fn signaling_protocol(transport: Transport) -> Option<Protocol> {
    match transport {
        Transport::Udp => Some(Protocol::Udp),
        Transport::Tcp => Some(Protocol::Tcp),
        Transport::Tls => Some(Protocol::Tls),
    }
}

/// Where an inbound call goes once its number is known.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Straight to a SIP URI.
    SipUri(String),
    /// To a number through these trunks, in failover order.
    Number { number: String, trunks: Vec<Arc<TrunkConfig>> },
    /// An AI agent over WebSocket.
    WebSocket(String),
    /// Refuse with this status code.
    Reject(u16),
}

/// Why a call cannot be routed; carries the status code and a reason for the Reason header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

impl Refusal {
    fn new(code: u16, reason: impl Into<String>) -> Refusal {
        Refusal { code, reason: reason.into() }
    }
}

/// Trunks a request from `source` may come from: its IP is in the trunk's allowed CIDRs, or it
/// is one of the trunk's gateway addresses written as a literal IP.
pub fn source_trunks(snapshot: &Snapshot, source: IpAddr) -> Vec<Arc<TrunkConfig>> {
    snapshot.trunks().filter(|trunk| trunk_accepts_source(trunk, source)).cloned().collect()
}

/// Whether `source` is an address of `trunk` by its allowlist or gateways.
pub fn trunk_accepts_source(trunk: &TrunkConfig, source: IpAddr) -> bool {
    let source = canonical(source);
    trunk.allowed_source_cidrs.iter().any(|net| net.contains(&source))
        || trunk
            .gateways
            .iter()
            .any(|g| g.address.trim_matches(['[', ']']).parse::<IpAddr>().ok().map(canonical) == Some(source))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Where a call to `number` from `caller` goes: the number's own destination, else its routing
/// rule's, else the first inbound rule (by priority) that lists the number or matches the caller.
pub fn inbound_target(snapshot: &Snapshot, number: &NumberConfig, caller: &str) -> Result<Target, Refusal> {
    let destination = if let Some(destination) = &number.destination {
        destination.clone()
    } else if let Some(rule_name) = &number.routing_rule_ref {
        let rule = snapshot.rule(&number.namespace, rule_name).ok_or_else(|| {
            Refusal::new(503, format!("routing rule {rule_name} of number {} is missing", number.number))
        })?;
        rule.destination
            .clone()
            .ok_or_else(|| Refusal::new(503, format!("routing rule {rule_name} has no destination")))?
    } else {
        let rule = snapshot
            .inbound_rules()
            .iter()
            .find(|rule| rule.namespace == number.namespace && inbound_rule_matches(rule, &number.number, caller))
            .ok_or_else(|| Refusal::new(404, format!("no routing for {}", number.number)))?;
        rule.destination
            .clone()
            .ok_or_else(|| Refusal::new(503, format!("routing rule {} has no destination", rule.name)))?
    };
    match destination.kind {
        DestinationType::Websocket => Ok(Target::WebSocket(destination.url.unwrap_or_default())),
        DestinationType::Sip => {
            destination.uri.map(Target::SipUri).ok_or_else(|| Refusal::new(503, "SIP destination without uri"))
        }
        DestinationType::Reject => Ok(Target::Reject(destination.reject_code.unwrap_or(603))),
        DestinationType::Number => {
            let to = destination.number.ok_or_else(|| Refusal::new(503, "number destination without number"))?;
            let trunks = outbound_trunks(snapshot, &number.namespace, &to, destination.trunk_ref.as_deref());
            if trunks.is_empty() {
                return Err(Refusal::new(503, format!("no outbound trunk for {to}")));
            }
            Ok(Target::Number { number: to, trunks })
        }
    }
}

fn inbound_rule_matches(rule: &RuleConfig, number: &str, caller: &str) -> bool {
    let spec = &rule.match_spec;
    (spec.numbers.is_empty() || spec.numbers.iter().any(|n| n == number))
        && (spec.caller_patterns.is_empty() || spec.caller_patterns.iter().any(|p| pattern_matches(p, caller)))
}

fn pattern_matches(pattern: &str, value: &str) -> bool {
    Regex::new(pattern).map(|re| re.is_match(value)).unwrap_or(false)
}

/// Trunks for an outbound call to `to`, in the order they are tried: the preferred trunk (when
/// given) or the trunks of the first outbound rule whose destination patterns match (ordered,
/// or cheapest first), each followed by its backup trunks; suspended trunks and trunks with
/// outbound disabled are left out, and no trunk appears twice.
pub fn outbound_trunks(
    snapshot: &Snapshot,
    namespace: &str,
    to: &str,
    preferred: Option<&str>,
) -> Vec<Arc<TrunkConfig>> {
    let mut names: Vec<String> = Vec::new();
    if let Some(preferred) = preferred {
        names.push(preferred.to_string());
    } else if let Some(rule) = snapshot.outbound_rules().iter().find(|rule| {
        rule.namespace == namespace
            && (rule.match_spec.destination_patterns.is_empty()
                || rule.match_spec.destination_patterns.iter().any(|p| pattern_matches(p, to)))
    }) {
        let mut trunks: Vec<&String> = rule.trunks.iter().collect();
        if rule.trunk_selection == TrunkSelection::Cheapest {
            trunks.sort_by_key(|name| {
                snapshot
                    .trunk(namespace, name)
                    .map(|t| t.rate_outbound_per_minute)
                    .unwrap_or(rust_decimal::Decimal::MAX)
            });
        }
        names.extend(trunks.into_iter().cloned());
    }
    let mut out: Vec<Arc<TrunkConfig>> = Vec::new();
    let mut queue: std::collections::VecDeque<String> = names.into();
    while let Some(name) = queue.pop_front() {
        if out.iter().any(|t| t.name == name) {
            continue;
        }
        let Some(trunk) = snapshot.trunk(namespace, &name) else { continue };
        if trunk.suspended || !trunk.outbound_enabled {
            continue;
        }
        // Backups come right after the trunk they back up.
        for (i, backup) in trunk.backup_trunks.iter().enumerate() {
            queue.insert(i, backup.clone());
        }
        out.push(Arc::clone(trunk));
    }
    out
}

/// A trunk's enabled gateways in the order to try them: ascending priority, and within one
/// priority a weighted random order (RFC 2782 style, so traffic spreads by weight).
pub fn gateway_order(trunk: &TrunkConfig) -> Vec<GatewayConfig> {
    let mut enabled: Vec<GatewayConfig> = trunk.gateways.iter().filter(|g| g.enabled).cloned().collect();
    enabled.sort_by_key(|g| g.priority);
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(enabled.len());
    while !enabled.is_empty() {
        let priority = enabled[0].priority;
        let end = enabled.iter().position(|g| g.priority != priority).unwrap_or(enabled.len());
        let mut group: Vec<GatewayConfig> = enabled.drain(..end).collect();
        while !group.is_empty() {
            let total: u32 = group.iter().map(|g| u32::from(g.weight).max(1)).sum();
            let mut pick = rng.random_range(0..total);
            let index = group
                .iter()
                .position(|g| {
                    let w = u32::from(g.weight).max(1);
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            out.push(group.remove(index));
        }
    }
    out
}

/// The number as the carrier wants it dialled: strip leading digits (after the `+`), then add
/// the prepend digits and the dial prefix.
pub fn format_for_trunk(trunk: &TrunkConfig, e164: &str) -> String {
    let digits = e164.trim_start_matches('+');
    let keep_plus = e164.starts_with('+')
        && trunk.strip_digits == 0
        && trunk.prepend_digits.is_none()
        && trunk.dial_prefix.is_none();
    let stripped: String = digits.chars().skip(trunk.strip_digits as usize).collect();
    let mut out = String::new();
    if keep_plus {
        out.push('+');
    }
    if let Some(prefix) = &trunk.dial_prefix {
        out.push_str(prefix);
    }
    if let Some(prepend) = &trunk.prepend_digits {
        out.push_str(prepend);
    }
    out.push_str(&stripped);
    out
}

/// The final responses that, by default, end a call attempt for good: the called party's own
/// answers (not found, unavailable, busy, declined). Every other failure (5xx, 408, timeouts,
/// other 4xx such as a carrier's 403) moves on to the next gateway or trunk.
pub const DEFAULT_FINAL_CODES: [u16; 9] = [404, 480, 484, 486, 487, 600, 603, 604, 606];

/// Whether a final response ends the call attempt for good rather than failing over, given the
/// configured list of final codes.
pub fn is_final_for_caller(final_codes: &[u16], code: u16) -> bool {
    final_codes.contains(&code)
}

/// A trunk's codec list, or every codec the node relays when there is no trunk.
pub(crate) fn codecs_of(trunk: Option<&TrunkConfig>) -> Vec<switchboard_model::Codec> {
    match trunk {
        Some(trunk) if !trunk.codecs.is_empty() => trunk.codecs.clone(),
        _ => vec![
            switchboard_model::Codec::Pcmu,
            switchboard_model::Codec::Pcma,
            switchboard_model::Codec::TelephoneEvent,
        ],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Snapshot;
    use rust_decimal::Decimal;
    use switchboard_model::{AuthMethod, Codec, Destination, Direction, MatchSpec, Transport};

    pub(crate) fn trunk(name: &str) -> TrunkConfig {
        TrunkConfig {
            namespace: "ns".into(),
            name: name.into(),
            provider: "skyetel".into(),
            display_name: None,
            suspended: false,
            gateways: vec![GatewayConfig {
                address: "192.0.2.10".into(),
                port: Some(5060),
                transport: Transport::Udp,
                priority: 1,
                weight: 1,
                enabled: true,
            }],
            registrar_address: None,
            registrar_port: None,
            realm: None,
            auth_method: AuthMethod::Ip,
            registration_enabled: false,
            registration_expires: 3600,
            inbound_enabled: true,
            allowed_source_cidrs: vec!["198.51.100.0/24".parse().unwrap()],
            outbound_enabled: true,
            dial_prefix: None,
            strip_digits: 0,
            prepend_digits: None,
            max_concurrent_calls: None,
            calls_per_second: None,
            codecs: vec![Codec::Pcmu],
            dtmf_relay: true,
            srtp: switchboard_model::SrtpMode::Disabled,
            transfer: switchboard_model::TransferMode::None,
            tls_peer_names: vec![],
            tls_peer_fingerprints: vec![],
            rtp_timeout_seconds: 60,
            options_interval_seconds: 30,
            failover_timeout_seconds: 5,
            backup_trunks: vec![],
            rate_outbound_per_minute: Decimal::new(1, 2),
            rate_inbound_per_minute: Decimal::new(5, 3),
            rate_per_message: Decimal::ZERO,
            currency: "USD".into(),
        }
    }

    fn number(destination: Option<Destination>) -> NumberConfig {
        NumberConfig {
            namespace: "ns".into(),
            name: "n1".into(),
            number: "+15550001111".into(),
            trunk_ref: "a".into(),
            routing_rule_ref: None,
            destination,
            message_webhook: None,
            caller_id_allowed: true,
        }
    }

    fn outbound_rule(trunks: &[&str], selection: TrunkSelection) -> RuleConfig {
        RuleConfig {
            namespace: "ns".into(),
            name: "out".into(),
            direction: Direction::Outbound,
            priority: 1,
            match_spec: MatchSpec {
                numbers: vec![],
                caller_patterns: vec![],
                destination_patterns: vec![r"^\+1".into()],
            },
            destination: None,
            trunks: trunks.iter().map(|s| s.to_string()).collect(),
            trunk_selection: selection,
            status_callback: None,
        }
    }

    fn snapshot(trunks: Vec<TrunkConfig>, rules: Vec<RuleConfig>) -> Snapshot {
        Snapshot::from_parts(1, trunks, vec![], rules, vec![]).unwrap()
    }

    #[test]
    fn sources_match_cidrs_and_gateway_literals() {
        let snap = snapshot(vec![trunk("a")], vec![]);
        assert_eq!(source_trunks(&snap, "198.51.100.7".parse().unwrap()).len(), 1);
        assert_eq!(source_trunks(&snap, "192.0.2.10".parse().unwrap()).len(), 1);
        assert_eq!(source_trunks(&snap, "::ffff:192.0.2.10".parse().unwrap()).len(), 1);
        assert!(source_trunks(&snap, "203.0.113.1".parse().unwrap()).is_empty());
    }

    /// A TLS gateway is reached over TLS, never over plaintext UDP (the old
    /// `Tcp => Tcp, _ => Udp`).
    #[test]
    fn tls_gateways_are_reached_over_tls_never_plaintext() {
        use super::super::transport::Protocol;
        assert_eq!(signaling_protocol(Transport::Udp), Some(Protocol::Udp));
        assert_eq!(signaling_protocol(Transport::Tcp), Some(Protocol::Tcp));
        assert_eq!(signaling_protocol(Transport::Tls), Some(Protocol::Tls));
    }

    #[test]
    fn outbound_order_follows_rule_backups_and_cost() {
        let mut a = trunk("a");
        a.backup_trunks = vec!["c".into()];
        a.rate_outbound_per_minute = Decimal::new(3, 2);
        let b = trunk("b");
        let c = trunk("c");
        let mut d = trunk("d");
        d.suspended = true;
        let snap = snapshot(vec![a, b, c, d], vec![outbound_rule(&["a", "b", "d"], TrunkSelection::Ordered)]);
        let names = |v: Vec<Arc<TrunkConfig>>| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(outbound_trunks(&snap, "ns", "+15551112222", None)), ["a", "c", "b"]);
        assert!(outbound_trunks(&snap, "ns", "+445551112222", None).is_empty());
        assert_eq!(names(outbound_trunks(&snap, "ns", "+1", Some("b"))), ["b"]);

        let mut a = trunk("a");
        a.rate_outbound_per_minute = Decimal::new(3, 2);
        let snap = snapshot(vec![a, trunk("b")], vec![outbound_rule(&["a", "b"], TrunkSelection::Cheapest)]);
        assert_eq!(names(outbound_trunks(&snap, "ns", "+15551112222", None)), ["b", "a"]);
    }

    #[test]
    fn inbound_targets() {
        let snap = snapshot(vec![trunk("a")], vec![outbound_rule(&["a"], TrunkSelection::Ordered)]);
        let sip = Destination {
            kind: DestinationType::Sip,
            url: None,
            uri: Some("sip:agent@127.0.0.1:5090".into()),
            number: None,
            trunk_ref: None,
            reject_code: None,
        };
        assert_eq!(
            inbound_target(&snap, &number(Some(sip)), "+1").unwrap(),
            Target::SipUri("sip:agent@127.0.0.1:5090".into())
        );
        let forward = Destination {
            kind: DestinationType::Number,
            url: None,
            uri: None,
            number: Some("+15559990000".into()),
            trunk_ref: None,
            reject_code: None,
        };
        match inbound_target(&snap, &number(Some(forward)), "+1").unwrap() {
            Target::Number { number, trunks } => {
                assert_eq!(number, "+15559990000");
                assert_eq!(trunks.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(inbound_target(&snap, &number(None), "+1").unwrap_err().code, 404);
    }

    #[test]
    fn gateways_by_priority_then_weight() {
        let mut t = trunk("a");
        let gw = |address: &str, priority, weight, enabled| GatewayConfig {
            address: address.into(),
            port: None,
            transport: Transport::Udp,
            priority,
            weight,
            enabled,
        };
        t.gateways = vec![gw("c", 2, 1, true), gw("a", 1, 10, true), gw("x", 0, 1, false), gw("b", 1, 10, true)];
        let order: Vec<String> = gateway_order(&t).into_iter().map(|g| g.address).collect();
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], "c");
        let mut first_a = 0;
        for _ in 0..400 {
            if gateway_order(&t)[0].address == "a" {
                first_a += 1;
            }
        }
        assert!((120..280).contains(&first_a), "{first_a}");
    }

    #[test]
    fn numbers_are_formatted_per_trunk() {
        let mut t = trunk("a");
        assert_eq!(format_for_trunk(&t, "+15551234567"), "+15551234567");
        t.strip_digits = 1;
        assert_eq!(format_for_trunk(&t, "+15551234567"), "5551234567");
        t.dial_prefix = Some("9".into());
        t.prepend_digits = Some("1".into());
        assert_eq!(format_for_trunk(&t, "+15551234567"), "915551234567");
    }

    #[test]
    fn final_codes() {
        for code in [404, 486, 600, 603, 480] {
            assert!(is_final_for_caller(&DEFAULT_FINAL_CODES, code), "{code}");
        }
        for code in [408, 500, 503, 502, 401, 407] {
            assert!(!is_final_for_caller(&DEFAULT_FINAL_CODES, code), "{code}");
        }
        // Configurable: a deployment may treat 503 as final and 486 as worth a retry.
        assert!(is_final_for_caller(&[503], 503));
        assert!(!is_final_for_caller(&[503], 486));
        for code in [403, 400] {
            assert!(!is_final_for_caller(&DEFAULT_FINAL_CODES, code), "{code}");
        }
    }
}
