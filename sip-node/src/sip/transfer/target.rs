//! Where a transfer goes: an E.164 number through the outbound routing (the trunks of the
//! first outbound RoutingRule of the call's namespace that matches it, else the call's own
//! trunk), or a SIP URI (`"to": "sip:..."`).
//!
//! No open relay for URIs: the node dials one only when its host is a gateway of a Trunk of
//! the call's namespace (the call then goes through that trunk: its credentials, transport,
//! limits, rates and CDR; a dial-string user must still be allowed by an outbound rule, as a
//! number would be) or when the egress allow-list (`--egress-allow`) names the host itself (a
//! listed name, or an IP literal in a listed network; dialled directly). Being a public
//! address is not enough, unlike for webhooks: a call reaches a person and may cost money. The API checks the
//! same before it queues the request; the node checks again because it is the one dialling.

use std::sync::Arc;

use switchboard_model::TrunkConfig;
use switchboard_model::egress::EgressPolicy;
use switchboard_model::sip_uri::{SipUri, SipUriError};

use crate::config::Snapshot;
use crate::sip::routing;
use crate::sip::transport::Protocol;

/// How the target is reached.
#[derive(Debug, Clone)]
pub(super) enum Route {
    /// A number, through these trunks in failover order.
    Number(Vec<Arc<TrunkConfig>>),
    /// A SIP URI.
    Uri(UriRoute),
}

/// A SIP URI target the node may dial.
#[derive(Debug, Clone)]
pub(super) struct UriRoute {
    /// The Request-URI (as the client wrote it).
    pub(super) uri: rsip::Uri,
    /// The host to resolve (lower-case, IPv6 without brackets) and the port, if the URI names
    /// one (else the gateway's, else the transport's default).
    pub(super) host: String,
    pub(super) port: Option<u16>,
    pub(super) protocol: Protocol,
    /// The trunk whose gateway the host is; `None`: dialled directly (the egress allow-list
    /// names the host).
    pub(super) trunk: Option<Arc<TrunkConfig>>,
}

/// Why the node does not dial a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum RouteError {
    #[error("this node anchors no media")]
    NoMedia,
    #[error("the call came in on no trunk: there is no route for a transfer")]
    NoTrunk,
    #[error("no trunk of namespace {namespace} can reach {to}")]
    NoRoute { namespace: String, to: String },
    #[error("{to}: {error}")]
    BadUri { to: String, error: SipUriError },
    #[error(
        "{to}: {host} is neither a gateway of a Trunk in namespace {namespace} nor on the egress allow-list; add it to a \
         Trunk's gateways (calls then go through that trunk) or to --egress-allow (SWITCHBOARD_EGRESS_ALLOW) to dial it directly"
    )]
    HostNotAllowed { to: String, host: String, namespace: String },
    #[error(
        "{to}: no outbound RoutingRule of namespace {namespace} allows {number} (a number at a trunk's gateway is checked like any number)"
    )]
    NumberNotAllowed { to: String, number: String, namespace: String },
    #[error("{to}: the node does not speak transport {transport}")]
    Transport { to: String, transport: String },
}

/// Whether `to` is a SIP URI rather than a number.
pub(super) fn is_uri(to: &str) -> bool {
    let lower = to.get(..5).map(str::to_ascii_lowercase).unwrap_or_default();
    lower.starts_with("sip:") || lower == "sips:"
}

/// The route of a transfer to `to` from a call that came in on `trunk` (see the module doc).
pub(super) fn route(
    snapshot: &Snapshot,
    trunk: &TrunkConfig,
    to: &str,
    egress: &EgressPolicy,
) -> Result<Route, RouteError> {
    let namespace = trunk.namespace.as_str();
    if !is_uri(to) {
        let mut trunks = routing::outbound_trunks(snapshot, namespace, to, None);
        if trunks.is_empty() {
            trunks = routing::outbound_trunks(snapshot, namespace, to, Some(&trunk.name));
        }
        if trunks.is_empty() {
            return Err(RouteError::NoRoute { namespace: namespace.into(), to: to.into() });
        }
        return Ok(Route::Number(trunks));
    }
    let parsed = SipUri::parse(to).map_err(|error| RouteError::BadUri { to: to.into(), error })?;
    let uri = rsip::Uri::try_from(to)
        .map_err(|e| RouteError::BadUri { to: to.into(), error: SipUriError::BadHost(e.to_string()) })?;
    let gateway_of = gateway_trunk(snapshot, namespace, &parsed.host, parsed.port);
    let mut route =
        UriRoute { uri, host: parsed.host.clone(), port: parsed.port, protocol: Protocol::Udp, trunk: None };
    let gateway_transport = match gateway_of {
        Some((trunk, gateway)) => {
            if let Some(number) = parsed.number()
                && routing::outbound_trunks(snapshot, namespace, &number, None).is_empty()
            {
                return Err(RouteError::NumberNotAllowed { to: to.into(), number, namespace: namespace.into() });
            }
            route.port = parsed.port.or(gateway.port);
            route.trunk = Some(trunk);
            Some(gateway.transport)
        }
        // The list names the host itself (a listed name, or an IP literal in a listed network):
        // whatever the name resolves to is the operator's choice.
        None if egress.lists(&parsed.host) => None,
        None => return Err(not_allowed(to, &parsed, namespace)),
    };
    route.protocol = match (parsed.secure, parsed.transport.as_deref()) {
        (true, _) | (_, Some("tls")) => Protocol::Tls,
        (_, Some("tcp")) => Protocol::Tcp,
        (_, Some("udp")) => Protocol::Udp,
        (_, None) => gateway_transport.and_then(routing::signaling_protocol).unwrap_or(Protocol::Udp),
        (_, Some(other)) => return Err(RouteError::Transport { to: to.into(), transport: other.into() }),
    };
    Ok(Route::Uri(route))
}

fn not_allowed(to: &str, parsed: &SipUri, namespace: &str) -> RouteError {
    RouteError::HostNotAllowed { to: to.into(), host: parsed.host.clone(), namespace: namespace.into() }
}

/// The trunk of `namespace` (outbound, not suspended) one of whose enabled gateways is `host`:
/// the one whose gateway also has the URI's port when several do (trunks to one provider
/// often share its host), else the first by name.
fn gateway_trunk(
    snapshot: &Snapshot,
    namespace: &str,
    host: &str,
    port: Option<u16>,
) -> Option<(Arc<TrunkConfig>, switchboard_model::GatewayConfig)> {
    let host = host.trim_end_matches('.');
    let mut candidates: Vec<(Arc<TrunkConfig>, switchboard_model::GatewayConfig)> = snapshot
        .trunks()
        .filter(|t| t.namespace == namespace && !t.suspended && t.outbound_enabled)
        .flat_map(|trunk| {
            trunk
                .gateways
                .iter()
                .filter(|g| {
                    let address = g.address.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
                    g.enabled && address.eq_ignore_ascii_case(host)
                })
                .map(|g| (Arc::clone(trunk), g.clone()))
        })
        .collect();
    candidates.sort_by(|(a, ga), (b, gb)| {
        let exact = |g: &switchboard_model::GatewayConfig| port.is_some() && g.port == port;
        exact(gb).cmp(&exact(ga)).then_with(|| a.name.cmp(&b.name))
    });
    candidates.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_model::{Direction, MatchSpec, RuleConfig, Transport, TrunkSelection};

    fn snapshot() -> Snapshot {
        let mut carrier = TrunkConfig::loopback("carrier", [("gw.carrier.example".to_string(), 5060)]);
        carrier.gateways[0].transport = Transport::Tcp;
        let pbx = TrunkConfig::loopback("pbx", [("10.9.0.5".to_string(), 5070)]);
        let rule = RuleConfig {
            namespace: "default".into(),
            name: "out".into(),
            direction: Direction::Outbound,
            priority: 1,
            match_spec: MatchSpec { destination_patterns: vec![r"^\+1555".into()], ..Default::default() },
            destination: None,
            trunks: vec!["carrier".into()],
            trunk_selection: TrunkSelection::Ordered,
            status_callback: None,
        };
        Snapshot::from_parts(1, vec![carrier, pbx], vec![], vec![rule], vec![]).unwrap()
    }

    fn uri_route(to: &str, egress: &[&str]) -> Result<UriRoute, RouteError> {
        let snapshot = snapshot();
        let trunk = snapshot.trunk("default", "carrier").unwrap().clone();
        let egress = EgressPolicy::parse(egress).unwrap();
        match route(&snapshot, &trunk, to, &egress)? {
            Route::Uri(route) => Ok(route),
            Route::Number(_) => panic!("{to} is a URI"),
        }
    }

    #[test]
    fn a_uri_at_a_trunks_gateway_goes_through_that_trunk() {
        let route = uri_route("sip:support@10.9.0.5", &[]).unwrap();
        assert_eq!(route.trunk.as_ref().map(|t| t.name.as_str()), Some("pbx"));
        assert_eq!((route.host.as_str(), route.port, route.protocol), ("10.9.0.5", Some(5070), Protocol::Udp));
        let route = uri_route("sip:+15552223333@GW.carrier.example:5080", &[]).unwrap();
        assert_eq!(route.trunk.as_ref().map(|t| t.name.as_str()), Some("carrier"));
        assert_eq!(
            (route.port, route.protocol),
            (Some(5080), Protocol::Tcp),
            "the URI's port, the gateway's transport"
        );
        assert_eq!(uri_route("sips:desk@10.9.0.5", &[]).unwrap().protocol, Protocol::Tls);
    }

    #[test]
    fn trunks_sharing_a_host_are_told_apart_by_the_port() {
        let a = TrunkConfig::loopback("a", [("10.9.0.5".to_string(), 5060)]);
        let b = TrunkConfig::loopback("b", [("10.9.0.5".to_string(), 5070)]);
        let snapshot = Snapshot::from_parts(1, vec![b, a], vec![], vec![], vec![]).unwrap();
        let name = |port| gateway_trunk(&snapshot, "default", "10.9.0.5", port).map(|(t, _)| t.name.clone());
        assert_eq!(name(Some(5070)).as_deref(), Some("b"));
        assert_eq!(name(Some(5060)).as_deref(), Some("a"));
        assert_eq!(name(None).as_deref(), Some("a"), "no port: the first by name");
        assert_eq!(gateway_trunk(&snapshot, "other", "10.9.0.5", None).map(|(t, _)| t.name.clone()), None);
    }

    #[test]
    fn a_number_at_a_gateway_must_pass_the_outbound_rules() {
        let refused = uri_route("sip:+19005551234@gw.carrier.example", &[]).unwrap_err();
        assert!(
            matches!(&refused, RouteError::NumberNotAllowed { number, .. } if number == "+19005551234"),
            "{refused}"
        );
        assert!(uri_route("sip:+15552223333@gw.carrier.example", &[]).is_ok());
    }

    #[test]
    fn other_hosts_only_when_the_allow_list_names_them() {
        for to in ["sip:alice@pbx.example.com", "sip:alice@203.0.113.9", "sip:alice@127.0.0.1"] {
            let refused = uri_route(to, &[]).unwrap_err();
            let text = refused.to_string();
            assert!(matches!(refused, RouteError::HostNotAllowed { .. }), "{to}: {text}");
            assert!(text.contains("--egress-allow") && text.contains("Trunk's gateways"), "{text}");
        }
        let listed = uri_route("sip:alice@pbx.example.com", &["pbx.example.com"]).unwrap();
        assert!(listed.trunk.is_none(), "dialled directly");
        assert!(uri_route("sip:alice@127.0.0.1:5090", &["127.0.0.0/8"]).is_ok());
        assert!(uri_route("sip:alice@203.0.113.9", &["127.0.0.0/8"]).is_err(), "an IP the list does not name");
        assert!(uri_route("sip:alice@pbx.example.com", &["10.0.0.0/8"]).is_err(), "a name the list does not name");
        assert!(matches!(
            uri_route("sip:a@h.example;transport=sctp", &["h.example"]),
            Err(RouteError::Transport { .. })
        ));
        assert!(matches!(uri_route("sip:a@h.example?X=1", &["h.example"]), Err(RouteError::BadUri { .. })));
    }

    #[test]
    fn numbers_route_as_before() {
        let snapshot = snapshot();
        let trunk = snapshot.trunk("default", "pbx").unwrap().clone();
        let egress = EgressPolicy::default();
        let Ok(Route::Number(trunks)) = route(&snapshot, &trunk, "+15552223333", &egress) else { panic!() };
        assert_eq!(trunks[0].name, "carrier", "the rule's trunk");
        let Ok(Route::Number(trunks)) = route(&snapshot, &trunk, "+442071234567", &egress) else { panic!() };
        assert_eq!(trunks[0].name, "pbx", "no rule: the call's own trunk");
    }
}
