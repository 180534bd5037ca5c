//! Call-control extensions above the dialog layer, as sans-IO pieces the call drives.
//!
//! Each module here is a plain value or a pure function, like [`super::transaction`]: it is fed
//! headers, bodies and time values (`std::time::Instant`s the driver reads from its clock) and
//! answers with values or actions; none reads a clock, owns a socket or spawns a task, so every
//! RFC rule is a unit test with plain values.
//!
//! - [`session_timer`]: RFC 4028 session timers: `Session-Expires`/`Min-SE` negotiation for
//!   both roles, `422`, and the refresh/expiry schedule of a dialog.
//! - [`reliable`]: RFC 3262 reliable provisional responses: `RSeq`/`RAck`, the retransmission
//!   of a reliable 1xx until its PRACK, PRACK matching (`481` for a wrong `RAck`).
//! - [`session_leg`]: one dialog's session timer in the connected phase: the node's
//!   refreshes and their outcome, the peer's refreshes answered on their own leg.
//! - [`dtmf_info`]: DTMF carried in SIP INFO bodies (`application/dtmf-relay`,
//!   `application/dtmf`) and its mapping to RFC 4733 telephone events.
//! - [`refer`]: RFC 3515 REFER (`Refer-To`), RFC 3891 `Replaces`, and the RFC 3420
//!   `message/sipfrag` bodies of the NOTIFYs that report a referral's progress.

pub mod dtmf_info;
pub mod refer;
pub mod reliable;
pub mod session_leg;
pub mod session_timer;

use std::borrow::Cow;

use rsip::Header;

/// Every value of the headers named `name` (case-insensitive; typed rsip headers by the name
/// and trimmed value of their display form, without formatting them), in order. Unlike [`super::message::header_value`], which returns the first,
/// this sees option tags spread over several `Supported`/`Require` headers.
pub fn header_values<'a>(headers: &'a rsip::Headers, name: &str) -> Vec<Cow<'a, str>> {
    headers
        .iter()
        .filter_map(|h| match h {
            Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(Cow::Borrowed(v.as_str())),
            Header::Other(..) => None,
            typed => {
                let (n, v) = super::message::name_and_value(typed);
                n.eq_ignore_ascii_case(name).then(|| Cow::Borrowed(v.trim()))
            }
        })
        .collect()
}

/// Whether option tag `tag` is listed in any header named `name` (`Supported`, `Require`).
pub fn has_option_tag(headers: &rsip::Headers, name: &str, tag: &str) -> bool {
    header_values(headers, name)
        .iter()
        .any(|value| value.split(',').map(str::trim).any(|t| t.eq_ignore_ascii_case(tag)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_tags_are_found_in_any_of_several_headers() {
        let headers: rsip::Headers = vec![
            Header::Supported("replaces".into()),
            Header::Other("supported".into(), "path, TIMER".into()),
            Header::Require("100rel".into()),
        ]
        .into();
        assert!(has_option_tag(&headers, "Supported", "timer"));
        assert!(has_option_tag(&headers, "Supported", "replaces"));
        assert!(!has_option_tag(&headers, "Supported", "100rel"));
        assert!(has_option_tag(&headers, "Require", "100rel"));
        assert!(!has_option_tag(&headers, "Require", "100"));
    }
}
