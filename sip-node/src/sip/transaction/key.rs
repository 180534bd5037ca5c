//! Transaction matching (RFC 3261 17.1.3 and 17.2.3).

use std::fmt;

use rsip::headers::UntypedHeader as _;
use rsip::{Header, Method, Request, Response};

use super::MAGIC_COOKIE;

/// Identifies a transaction so that the driver can find it again in a map.
///
/// Server keys (17.2.3) are the top Via's branch, its sent-by (host lowercased, port made
/// explicit: 5061 for TLS, 5060 otherwise) and the method, where ACK counts as INVITE so that
/// the ACK for a non-2xx final response finds its INVITE transaction. Client keys (17.1.3) are
/// the branch and the method only (the CSeq method for responses): the top Via of a response
/// is the one we wrote, so its sent-by adds nothing.
///
/// Only RFC 3261 branches (starting with `z9hG4bK`) give a key; for RFC 2543 peers the
/// constructors return `None` and the caller answers `400` (we do not implement the 17.2.3
/// fallback matching on Request-URI, tags, Call-ID, CSeq and Via: no carrier we know of needs it).
///
/// rsip's `Method` has no `Hash`, so the method is held as its upper-case text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransactionKey {
    branch: String,
    /// Empty for client keys.
    sent_by: String,
    method: String,
}

impl TransactionKey {
    /// The key of the server transaction an incoming request belongs to (or creates). ACK maps
    /// to the INVITE transaction (it only matches there when it acknowledges a non-2xx: an ACK
    /// for a 2xx carries a new branch); CANCEL has a key of its own, see
    /// [`TransactionKey::cancel_target`].
    pub fn for_server_request(request: &Request) -> Option<TransactionKey> {
        let via = TopVia::of(request.headers.iter())?;
        let method = match request.method {
            Method::Ack => Method::Invite,
            method => method,
        };
        Some(TransactionKey { branch: via.branch?, sent_by: via.sent_by, method: method.to_string() })
    }

    /// The INVITE server transaction a CANCEL cancels (same branch and sent-by, RFC 3261 9.2),
    /// `None` if `request` is not a CANCEL or has no RFC 3261 branch.
    pub fn cancel_target(request: &Request) -> Option<TransactionKey> {
        if request.method != Method::Cancel {
            return None;
        }
        let via = TopVia::of(request.headers.iter())?;
        Some(TransactionKey { branch: via.branch?, sent_by: via.sent_by, method: Method::Invite.to_string() })
    }

    /// The key of a client transaction for a request we send (its top Via must carry a fresh
    /// branch from [`super::new_branch`]). An ACK we send for a non-2xx is part of the INVITE
    /// transaction and never starts one; a CANCEL has its own, with the INVITE's branch.
    pub fn for_client_request(request: &Request) -> Option<TransactionKey> {
        let via = TopVia::of(request.headers.iter())?;
        Some(TransactionKey { branch: via.branch?, sent_by: String::new(), method: request.method.to_string() })
    }

    /// The key of the client transaction a response belongs to: top Via branch + CSeq method.
    pub fn for_client_response(response: &Response) -> Option<TransactionKey> {
        let via = TopVia::of(response.headers.iter())?;
        let method = response.headers.iter().find_map(|h| match h {
            Header::CSeq(cseq) => cseq.value().split_whitespace().nth(1).map(str::to_ascii_uppercase),
            _ => None,
        })?;
        Some(TransactionKey { branch: via.branch?, sent_by: String::new(), method })
    }

    /// The Via branch of this transaction.
    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// The method of the request that created the transaction (INVITE for ACK).
    pub fn method(&self) -> &str {
        &self.method
    }
}

impl fmt::Display for TransactionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sent_by.is_empty() {
            write!(f, "{} {}", self.method, self.branch)
        } else {
            write!(f, "{} {} {}", self.method, self.branch, self.sent_by)
        }
    }
}

/// The parts of the topmost Via value that matching needs, parsed by hand so that Via forms
/// rsip's typed parser rejects (IPv6 references, odd spacing, unknown params) still match.
struct TopVia {
    sent_by: String,
    /// `None` when absent or not an RFC 3261 branch.
    branch: Option<String>,
}

impl TopVia {
    fn of<'a>(mut headers: impl Iterator<Item = &'a Header>) -> Option<TopVia> {
        let value = headers.find_map(|h| if let Header::Via(via) = h { Some(via.value()) } else { None })?;
        // Several Via values may share a header line; the first is the top one.
        let value = value.split(',').next()?.trim();
        let (protocol, rest) = value.split_once(|c: char| c.is_ascii_whitespace())?;
        let transport = protocol.rsplit('/').next()?.trim();
        let (sent_by, params) = rest.split_once(';').unwrap_or((rest, ""));
        let sent_by: String = sent_by.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        if sent_by.is_empty() {
            return None;
        }
        let has_port = match sent_by.rfind(']') {
            Some(end) => sent_by[end..].contains(':'),
            None => sent_by.contains(':'),
        };
        let mut sent_by = sent_by.to_ascii_lowercase();
        if !has_port {
            let port = if transport.eq_ignore_ascii_case("TLS") { 5061 } else { 5060 };
            sent_by = format!("{sent_by}:{port}");
        }
        let branch = params.split(';').find_map(|param| {
            let (name, value) = param.split_once('=')?;
            name.trim().eq_ignore_ascii_case("branch").then(|| value.trim().to_string())
        });
        let branch = branch.filter(|b| b.starts_with(MAGIC_COOKIE) && b.len() > MAGIC_COOKIE.len());
        Some(TopVia { sent_by, branch })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn with_via(method: &str, via: &str) -> Request {
        request(&format!(
            "{method} sip:bob@b.example.com SIP/2.0\r\n\
Via: {via}\r\n\
To: <sip:bob@b.example.com>\r\n\
From: <sip:alice@a.example.com>;tag=f\r\n\
Call-ID: k1\r\n\
CSeq: 1 {method}\r\n\
Content-Length: 0\r\n\r\n"
        ))
    }

    const VIA: &str = "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport";

    #[test]
    fn ack_matches_the_invite_server_transaction() {
        let invite = TransactionKey::for_server_request(&with_via("INVITE", VIA)).unwrap();
        let ack = TransactionKey::for_server_request(&with_via("ACK", VIA)).unwrap();
        assert_eq!(invite, ack);
        assert_eq!(ack.method(), "INVITE");
        assert_eq!(ack.branch(), "z9hG4bKabc");
    }

    #[test]
    fn cancel_has_its_own_key_and_targets_the_invite() {
        let invite = TransactionKey::for_server_request(&with_via("INVITE", VIA)).unwrap();
        let cancel = with_via("CANCEL", VIA);
        let cancel_key = TransactionKey::for_server_request(&cancel).unwrap();
        assert_ne!(cancel_key, invite);
        assert_eq!(cancel_key.method(), "CANCEL");
        assert_eq!(TransactionKey::cancel_target(&cancel), Some(invite));
        assert_eq!(TransactionKey::cancel_target(&with_via("INVITE", VIA)), None);
        // A CANCEL from another sent-by targets nothing of ours.
        let other = with_via("CANCEL", "SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bKabc");
        let invite = TransactionKey::for_server_request(&with_via("INVITE", VIA)).unwrap();
        assert_ne!(TransactionKey::cancel_target(&other), Some(invite));
    }

    #[test]
    fn different_sent_by_or_branch_or_method_do_not_match() {
        let base = TransactionKey::for_server_request(&with_via("INVITE", VIA)).unwrap();
        for via in [
            "SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKabc",
            "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKabc",
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabd",
        ] {
            assert_ne!(TransactionKey::for_server_request(&with_via("INVITE", via)).unwrap(), base, "{via}");
        }
        assert_ne!(TransactionKey::for_server_request(&with_via("BYE", VIA)).unwrap(), base);
    }

    #[test]
    fn sent_by_is_normalized() {
        let a =
            TransactionKey::for_server_request(&with_via("OPTIONS", "SIP/2.0/UDP Host.Example.COM;branch=z9hG4bK1"));
        let b = TransactionKey::for_server_request(&with_via(
            "OPTIONS",
            "SIP/2.0/UDP host.example.com:5060 ;branch=z9hG4bK1",
        ));
        assert_eq!(a, b);
        let tls = TransactionKey::for_server_request(&with_via("OPTIONS", "SIP/2.0/TLS h.example.com;branch=z9hG4bK1"));
        let tls_port =
            TransactionKey::for_server_request(&with_via("OPTIONS", "SIP/2.0/TLS h.example.com:5061;branch=z9hG4bK1"));
        assert_eq!(tls, tls_port);
        let v6 = TransactionKey::for_server_request(&with_via("OPTIONS", "SIP/2.0/UDP [2001:db8::1];branch=z9hG4bK1"));
        let v6_port =
            TransactionKey::for_server_request(&with_via("OPTIONS", "SIP/2.0/UDP [2001:DB8::1]:5060;branch=z9hG4bK1"));
        assert!(v6.is_some());
        assert_eq!(v6, v6_port);
    }

    #[test]
    fn rfc2543_branches_give_no_key() {
        assert!(TransactionKey::for_server_request(&with_via("INVITE", "SIP/2.0/UDP h;branch=1234")).is_none());
        assert!(TransactionKey::for_server_request(&with_via("INVITE", "SIP/2.0/UDP h")).is_none());
        assert!(TransactionKey::for_server_request(&with_via("INVITE", "SIP/2.0/UDP h;branch=z9hG4bK")).is_none());
        let mut no_via = with_via("INVITE", VIA);
        no_via.headers.retain(|h| !matches!(h, Header::Via(_)));
        assert!(TransactionKey::for_server_request(&no_via).is_none());
    }

    #[test]
    fn top_via_is_the_first_value() {
        let req = with_via("INVITE", "SIP/2.0/UDP p1;branch=z9hG4bKtop, SIP/2.0/UDP ua;branch=z9hG4bKlow");
        assert_eq!(TransactionKey::for_server_request(&req).unwrap().branch(), "z9hG4bKtop");
    }

    #[test]
    fn client_response_matches_client_request() {
        let invite = invite();
        let key = TransactionKey::for_client_request(&invite).unwrap();
        let resp = response(&invite, 180);
        assert_eq!(TransactionKey::for_client_response(&resp), Some(key.clone()));
        // The CSeq method tells a CANCEL's 200 from the INVITE's response on the same branch.
        let mut cancel_resp = resp.clone();
        cancel_resp.headers.retain(|h| !matches!(h, Header::CSeq(_)));
        cancel_resp.headers.push(Header::CSeq("314159 CANCEL".into()));
        let cancel_key = TransactionKey::for_client_response(&cancel_resp).unwrap();
        assert_ne!(cancel_key, key);
        assert_eq!(cancel_key.method(), "CANCEL");
        // Client and server keys of the same request differ (they live in separate maps).
        assert_ne!(TransactionKey::for_server_request(&invite), Some(key.clone()));
        assert_eq!(key.to_string(), "INVITE z9hG4bKnashds8");
    }
}
