//! The stored configuration model of Switchboard.
//!
//! The operator (or local mode) is the only writer of desired configuration; SIP nodes are
//! readers. Both sides use the types and SQL in this crate so that the column lists exist in one
//! place only. The database schema itself is defined by the migrations in `migrations/`.
//!
//! What it owns: the configuration rows ([`config`]: one type per table with its SQL, both
//! directions), the tables as a whole and the configuration generation ([`tables`]), the pool,
//! migrations and `NOTIFY` channel ([`db`]), the egress policy API and nodes share ([`egress`])
//! and their one reading of destination SIP URIs ([`sip_uri`]),
//! the small enums of the schema ([`types`]) and the logging setup of every binary ([`logging`]).
//!
//! What it must not depend on: every other crate of the workspace depends on this one, so it
//! depends on none of them (no operator, node or API types), and on no Kubernetes client or
//! HTTP framework.

pub mod config;
pub mod db;
mod decode;
pub mod egress;
pub mod logging;
pub mod sip_uri;
pub mod tables;
pub mod trunk_tls;
pub mod types;

pub use config::{Credential, Destination, GatewayConfig, MatchSpec, NumberConfig, RuleConfig, TrunkConfig};
pub use trunk_tls::TrunkTls;
pub use types::{AuthMethod, Codec, DestinationType, Direction, SrtpMode, TransferMode, Transport, TrunkSelection};
