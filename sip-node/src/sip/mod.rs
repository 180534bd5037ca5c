//! SIP signaling: message helpers around rsip, transports, RFC 3261 transactions, digest
//! authentication, dialogs and the B2BUA call logic.

pub mod admission;
pub(crate) mod call;
pub(crate) mod connected;
pub(crate) mod context;
pub mod control;
pub mod dialog;
pub mod digest;
pub mod endpoint;
pub mod guard;
pub(crate) mod invite_client;
pub mod limits;
pub mod message;
pub(crate) mod originate;
pub mod queue;
pub mod reaped;
pub(crate) mod registration;
pub mod resolve;
pub mod routing;
pub(crate) mod sms;
pub mod tls;
pub mod transaction;
pub mod transfer;
pub mod transport;

/// Methods the node accepts, for Allow headers.
pub(crate) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, MESSAGE, REFER";
