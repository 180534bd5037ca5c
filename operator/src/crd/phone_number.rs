//! The `PhoneNumber` resource: a DID bought from a provider, and what happens to its calls and
//! messages.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use switchboard_model::config::Destination;

use super::status::{Condition, NodeCounts};

/// A phone number (DID) delivered by a trunk, and where its calls and messages go.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "switchboard.dev",
    version = "v1alpha1",
    kind = "PhoneNumber",
    namespaced,
    status = "PhoneNumberStatus",
    shortname = "did",
    shortname = "number",
    category = "switchboard",
    derive = "PartialEq",
    cel,
    doc = "A phone number (DID) delivered by a trunk, and where its calls and messages go.",
    printcolumn(name = "Number", type_ = "string", json_path = ".spec.number"),
    printcolumn(name = "Trunk", type_ = "string", json_path = ".spec.trunkRef"),
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
    validation = Rule::new("!(has(self.routingRuleRef) && has(self.destination))")
        .message("set either routingRuleRef or destination, not both")
)]
#[serde(rename_all = "camelCase")]
pub struct PhoneNumberSpec {
    /// The number in E.164 form, e.g. `+15551234567`.
    #[schemars(regex(pattern = r"^\+[1-9][0-9]{1,14}$"))]
    pub number: String,

    /// The Trunk (same namespace) that delivers this number and carries its outbound calls.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub trunk_ref: String,

    /// The inbound RoutingRule (same namespace) that decides where calls to this number go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub routing_rule_ref: Option<String>,

    /// Where calls go when no rule is referenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self.type != 'websocket' || (has(self.url) && self.url.matches('^wss?://'))").message("a websocket destination needs url: ws://... or wss://..."),
        validation = Rule::new("self.type != 'sip' || (has(self.uri) && self.uri.matches('^sips?:'))").message("a sip destination needs uri: sip:user@host"),
        validation = Rule::new("self.type != 'number' || has(self.number)").message("a number destination needs number in E.164 form")
    )]
    pub destination: Option<Destination>,

    /// Inbound SIP MESSAGEs to this number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging: Option<Messaging>,

    /// Whether outbound calls may present this number as caller ID.
    #[serde(default = "default_true")]
    pub caller_id: bool,
}

/// Delivery of inbound messages.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Messaging {
    /// URL that receives each inbound message as a signed JSON POST.
    #[schemars(regex(pattern = r"^https?://"))]
    pub webhook_url: String,
}

/// What the operator observed about a number.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhoneNumberStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
}

fn default_true() -> bool {
    true
}
