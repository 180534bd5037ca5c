//! The Switchboard operator: resource types, the one validation path, the reconcile core that
//! writes desired state into Postgres, and the desired-state sources that feed it.

pub mod commands;
pub mod crd;
pub mod kubernetes;
pub mod reaper;
pub mod reconcile;
pub mod source;
pub mod validate;
