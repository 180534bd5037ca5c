//! The Switchboard operator: resource types, the one validation path, the reconcile core that
//! writes desired state into Postgres, and the desired-state sources that feed it.
//!
//! What it owns:
//! - [`crd`]: the `Trunk`, `PhoneNumber` and `RoutingRule` resource types (the CRDs are generated
//!   from them) and their status;
//! - [`validate`]: the one path every spec goes through, whatever its source (files, Kubernetes,
//!   REST bodies);
//! - [`reconcile`]: desired state in, rows out, in one transaction per pass (`reconcile::plan`
//!   decides, purely; `Reconciler` writes);
//! - [`source`]: where desired state comes from (a manifest folder; [`kubernetes::source`]);
//! - [`kubernetes`]: the kube-runtime controllers, leader election, statuses and metrics of
//!   `switchboard operator`;
//! - [`reaper`]: ending the rows of nodes that died; [`commands`]: `crds`, `status`, `validate`.
//!
//! What it must not depend on: the REST API (`switchboard-api` depends on this crate, not the
//! other way round), any HTTP server framework (axum, utoipa, Swagger UI) or JWT, and the SIP
//! node. The process around the controllers (signals, the HTTP server of `/metrics`, the REST
//! API) is wired in the binary (`src/operator.rs`); the database schema is `switchboard-model`'s.

pub mod commands;
pub mod crd;
pub mod kubernetes;
pub mod reaper;
pub mod reconcile;
pub mod source;
pub mod validate;
