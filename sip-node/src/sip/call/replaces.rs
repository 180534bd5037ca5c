//! An INVITE with `Replaces` (RFC 3891, attended transfer) names a dialog it is to replace:
//! one the node does not hold gets `481`, a malformed or repeated header `400`. One the node
//! holds is handed to the call that holds it (through the dialog's channel, as if it were a
//! request of that dialog): that call's connected machine answers it and replaces the leg
//! (`sip/connected/replaces.rs`). The INVITE's own call task ends there: it is no new call.

use super::admission::Refuse;
use crate::sip::control::refer::Replaces;
use crate::sip::endpoint::{Endpoint, TuEvent, TuSender};
use crate::sip::transaction::TransactionKey;
use crate::sip::transport::Peer;

/// Checks the INVITE's `Replaces`, if any: `Some` is the user of the dialog it names.
pub(super) async fn check(endpoint: &Endpoint, headers: &rsip::Headers) -> Result<Option<TuSender>, Refuse> {
    let replaces = Replaces::of(headers).map_err(|error| Refuse::new(error.status(), format!("Replaces: {error}")))?;
    let Some(replaces) = replaces else { return Ok(None) };
    match endpoint.dialog_user(&replaces.call_id, &replaces.to_tag).await {
        Some(holder) => Ok(Some(holder)),
        None => Err(Refuse::new(481, "Replaces names no dialog of this node")),
    }
}

/// Hands the INVITE to the call holding the dialog it replaces; `false` when that call has
/// just ended (the caller then answers 481).
pub(super) fn hand_over(holder: &TuSender, invite: rsip::Request, key: TransactionKey, peer: Peer) -> bool {
    tracing::info!("INVITE with Replaces handed to the call holding the dialog");
    holder.send(TuEvent::Request { request: invite, key: Some(key), peer }).is_ok()
}
