//! Operator mode: Kubernetes as the desired-state source of the same reconcile core local mode
//! uses. Three kube-runtime controllers (Trunk, PhoneNumber, RoutingRule, the trunk one watching
//! Secrets too) trigger level-triggered passes over the whole desired state (see [`passes`]);
//! each object gets a finalizer, a truthful status ([`status`]) and events. One replica works at a
//! time ([`leader`]); [`metrics`] holds the operator's Prometheus registry. The process around
//! them (signals, the HTTP server of `/metrics` and the health endpoints, the REST API) is
//! `switchboard operator` in the binary's `src/operator.rs`.

pub mod controller;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod passes;
pub mod source;
pub mod status;
