//! An INVITE with `Replaces` (RFC 3891, attended transfer) names a dialog it is to replace:
//! one the node does not hold gets `481`, a malformed or repeated header `400`. Replacing a
//! dialog the node does hold is not implemented yet: such an INVITE is served as a new call.

use super::admission::Refuse;
use crate::sip::control::refer::Replaces;
use crate::sip::endpoint::Endpoint;

/// Checks the INVITE's `Replaces`, if any.
pub(super) async fn check(endpoint: &Endpoint, headers: &rsip::Headers) -> Result<(), Refuse> {
    let replaces = Replaces::of(headers).map_err(|error| Refuse::new(error.status(), format!("Replaces: {error}")))?;
    let Some(replaces) = replaces else { return Ok(()) };
    if !endpoint.has_dialog(&replaces.call_id, &replaces.to_tag).await {
        return Err(Refuse::new(481, "Replaces names no dialog of this node"));
    }
    tracing::info!(call_id = %replaces.call_id, "INVITE with Replaces for a dialog the node holds: served as a new call");
    Ok(())
}
