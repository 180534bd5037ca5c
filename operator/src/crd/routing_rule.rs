//! The `RoutingRule` resource: where inbound calls go and which trunks outbound calls take.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use switchboard_model::config::{Destination, MatchSpec};
use switchboard_model::{Direction, TrunkSelection};

use super::status::{Condition, NodeCounts};

/// A routing decision: for inbound calls, the destination (AI agent WebSocket, SIP URI, another
/// number, reject); for outbound calls, the trunks to use with failover.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "switchboard.dev",
    version = "v1alpha1",
    kind = "RoutingRule",
    namespaced,
    status = "RoutingRuleStatus",
    shortname = "rr",
    category = "switchboard",
    derive = "PartialEq",
    cel,
    doc = "Where inbound calls go (AI agent, SIP URI, number, reject) and which trunks outbound calls take.",
    printcolumn(name = "Direction", type_ = "string", json_path = ".spec.direction"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("self.direction != 'inbound' || has(self.destination)")
        .message("an inbound rule needs a destination"),
    validation = Rule::new("self.direction != 'outbound' || (has(self.trunks) && size(self.trunks) > 0)")
        .message("an outbound rule needs trunks: list at least one Trunk name"),
    validation = Rule::new("self.direction != 'outbound' || !has(self.destination)")
        .message("an outbound rule has no destination: the dialled number is the destination; remove destination")
)]
#[serde(rename_all = "camelCase")]
pub struct RoutingRuleSpec {
    pub direction: Direction,

    /// Lower is evaluated first.
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 10000))]
    pub priority: i32,

    /// What the rule applies to; empty matches everything.
    #[serde(default, rename = "match")]
    pub match_spec: MatchSpec,

    /// Inbound: where the call goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self.type != 'websocket' || (has(self.url) && self.url.matches('^wss?://'))").message("a websocket destination needs url: ws://... or wss://..."),
        validation = Rule::new("self.type != 'sip' || (has(self.uri) && self.uri.matches('^sips?:'))").message("a sip destination needs uri: sip:user@host"),
        validation = Rule::new("self.type != 'number' || has(self.number)").message("a number destination needs number in E.164 form")
    )]
    pub destination: Option<Destination>,

    /// Outbound: trunks (same namespace), tried in order with failover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub trunks: Vec<String>,

    /// Outbound: `ordered` (as listed) or `cheapest` (lowest outbound rate first).
    #[serde(default = "default_selection")]
    pub trunk_selection: TrunkSelection,

    /// URL that receives call status callbacks for calls matched by this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub status_callback: Option<String>,
}

/// What the operator observed about a rule.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingRuleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
}

fn default_priority() -> i32 {
    100
}
fn default_selection() -> TrunkSelection {
    TrunkSelection::Ordered
}
