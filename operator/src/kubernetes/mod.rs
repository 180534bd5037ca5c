//! Operator mode: Kubernetes as the desired-state source of the same reconcile core local mode
//! uses. Three kube-runtime controllers (Trunk, PhoneNumber, RoutingRule, the trunk one watching
//! Secrets too) trigger level-triggered passes over the whole desired state (see [`passes`]);
//! each object gets a finalizer, a truthful status ([`status`]) and events. One replica works at a
//! time ([`leader`]); metrics and health are served over HTTP ([`metrics`]).

pub mod controller;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod passes;
pub mod source;
pub mod status;
