//! SIP signaling: message helpers around rsip, transports, RFC 3261 transactions, digest
//! authentication, dialogs and the B2BUA call logic.

pub mod admission;
pub mod call;
pub mod context;
pub mod control;
pub mod dialog;
pub mod digest;
pub mod endpoint;
pub mod guard;
pub mod invite_client;
pub mod limits;
pub mod message;
pub mod originate;
pub mod queue;
pub mod reaped;
pub mod registration;
pub mod resolve;
pub mod routing;
pub mod sms;
pub mod tls;
pub mod transaction;
pub mod transport;

/// Methods the node accepts, for Allow headers.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, MESSAGE";
