//! The stored configuration model of Switchboard.
//!
//! The operator (or local mode) is the only writer of desired configuration; SIP nodes are
//! readers. Both sides use the types and SQL in this crate so that the column lists exist in one
//! place only. The database schema itself is defined by the migrations in `migrations/`.

pub mod config;
pub mod db;
mod decode;
pub mod egress;
pub mod logging;
pub mod tables;
pub mod types;

pub use config::{Credential, Destination, GatewayConfig, MatchSpec, NumberConfig, RuleConfig, TrunkConfig};
pub use types::{AuthMethod, Codec, DestinationType, Direction, Transport, TrunkSelection};
