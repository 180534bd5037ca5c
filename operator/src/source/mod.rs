//! Desired-state sources: where the reconcile core learns what should exist.
//!
//! A source yields the complete desired state (level-triggered): every resource it knows, the
//! Secrets they reference, and the problems it found. The folder source reads YAML manifests; the
//! Kubernetes source (operator mode) plugs in behind the same trait.

pub mod folder;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::crd::{PhoneNumberSpec, RoutingRuleSpec, TrunkSpec};

/// The kind of a Switchboard resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Trunk,
    PhoneNumber,
    RoutingRule,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trunk => "Trunk",
            Self::PhoneNumber => "PhoneNumber",
            Self::RoutingRule => "RoutingRule",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a resource: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The spec of one resource.
// Unboxed on purpose: specs are read far more often than moved, and a folder of 10,000
// resources costs a few megabytes either way.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Trunk(TrunkSpec),
    PhoneNumber(PhoneNumberSpec),
    RoutingRule(RoutingRuleSpec),
}

/// One resource as the source sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredResource {
    pub key: ResourceKey,
    /// `metadata.generation` (Kubernetes) or 1 for a manifest file; reported as `observedGeneration`.
    pub generation: Option<i64>,
    /// Where it came from, for messages: `examples/trunks.yaml#2`, `kubernetes`, `api`.
    pub origin: String,
    pub spec: Spec,
}

/// A Secret's data, decoded to bytes, keyed by key.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// A resource the source knows about but could not read (syntax error, invalid spec). Its rows keep
/// their last good configuration; its status says what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokenResource {
    pub key: ResourceKey,
    pub generation: Option<i64>,
    pub origin: String,
    pub message: String,
}

/// A problem that cannot be pinned to one resource (a file that does not parse at all).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceProblem {
    pub origin: String,
    pub message: String,
}

/// The complete desired state of a source.
#[derive(Debug, Clone, Default)]
pub struct DesiredState {
    pub resources: Vec<DesiredResource>,
    /// Secrets by (namespace, name).
    pub secrets: BTreeMap<(String, String), SecretData>,
    pub broken: Vec<BrokenResource>,
    pub problems: Vec<SourceProblem>,
    /// Files (or other units) that failed as a whole: resources from them must not be deleted,
    /// because the source cannot tell whether they are still wanted.
    pub unreadable_origins: Vec<String>,
}

/// Errors of a source as a whole (the folder is missing, the API server is unreachable).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read manifest folder {path}: {source}")]
    Folder {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the reconcile core gets the desired state from.
#[async_trait]
pub trait DesiredStateSource: Send + Sync {
    /// A short description for logs, e.g. `folder examples/`.
    fn describe(&self) -> String;
    /// Reads the complete desired state now.
    async fn desired_state(&self) -> Result<DesiredState, SourceError>;
}
