//! RFC 3261 transactions as sans-IO state machines.
//!
//! Every transaction here is a plain value: it is fed messages ([`ClientInvite::on_response`],
//! [`ServerInvite::on_request`], [`ServerInvite::respond`], ...) and timer expiries
//! (`on_timer`), and answers with a list of [`Action`]s that its driver carries out in order:
//! put a message on the wire, hand one to the transaction user (TU), (re)arm or cancel a timer,
//! report a timeout, drop the transaction. Nothing in this module reads a clock, owns a socket
//! or spawns a task, which is what lets the unit tests below walk through every state and timer
//! with plain values, and lets the driver (the endpoint task) own all the I/O.
//!
//! Contract with the driver:
//! - actions are carried out in the order given;
//! - `Schedule(t, d)` replaces an armed timer `t` of the same transaction;
//! - a timer that fires in a state where it no longer means anything is ignored (returns no
//!   actions), so the driver need not be exact about cancellation races;
//! - after `Terminated` the transaction must be dropped with all its timers; every method then
//!   returns no actions;
//! - when a timer's RFC value is zero (Timer D/I/J/K on reliable transports) the transaction
//!   goes to Terminated at once instead of scheduling a zero timer.
//!
//! Both INVITE state machines implement the RFC 6026 "Accepted" state: a client keeps its
//! transaction for 64*T1 after the first 2xx so that 2xx retransmissions (and 2xx from other
//! forks) are still delivered to the TU, which re-sends its ACK; a server keeps its transaction
//! for 64*T1 after sending a 2xx so that INVITE retransmissions are absorbed instead of
//! starting a new call, and ACKs that match it are delivered to the TU.

mod client;
mod key;
mod server;
pub mod uas2xx;

use std::time::Duration;

use rand::Rng as _;
use rand::distr::Alphanumeric;
use rsip::headers::{ContentLength, UntypedHeader as _};
use rsip::{Header, Headers, Request, Response, SipMessage, StatusCode};

pub use client::{ClientInvite, ClientInviteState, ClientNonInvite, ClientNonInviteState};
pub use key::TransactionKey;
pub use server::{ServerInvite, ServerInviteState, ServerNonInvite, ServerNonInviteState};
pub use uas2xx::{Uas2xxAction, Uas2xxRetransmitter, Uas2xxTimer, ack_for_2xx};

/// The RFC 3261 magic cookie that starts every branch of an RFC 3261 compliant element
/// (section 8.1.1.7); only such branches are unique enough to key transactions on.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// How long a server INVITE transaction waits for the TU's first response before it sends a
/// `100 Trying` by itself (RFC 3261 17.2.1 asks for one within 200 ms unless the TU answers
/// sooner), which stops the caller's INVITE retransmissions.
pub const TRYING_DELAY: Duration = Duration::from_millis(200);

/// Timer D on unreliable transports: "at least 32 seconds" (RFC 3261 17.1.1.2), long enough
/// to absorb every retransmission of a final response the server may still send.
pub const TIMER_D_UNRELIABLE: Duration = Duration::from_secs(32);

/// The base values of the RFC 3261 timers (section 17 and table 4); every other timer is
/// derived from them, so tests can shrink them and operators can tune them for slow links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// Round-trip time estimate: first retransmission interval and unit of timeouts (500 ms).
    pub t1: Duration,
    /// Cap of the retransmission interval for non-INVITE requests and INVITE responses (4 s).
    pub t2: Duration,
    /// Maximum time a message stays in the network (5 s): how long to absorb retransmissions.
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig { t1: Duration::from_millis(500), t2: Duration::from_secs(4), t4: Duration::from_secs(5) }
    }
}

impl TimerConfig {
    /// 64*T1: transaction timeout (Timers B, F, H, J, L, M), 32 s by default.
    pub fn timeout(&self) -> Duration {
        self.t1 * 64
    }

    /// The next retransmission interval after `current`, doubled and capped at T2 (Timers E
    /// and G, and 2xx retransmissions by the UAS core).
    pub fn next_capped(&self, current: Duration) -> Duration {
        (current * 2).min(self.t2)
    }
}

/// The timers of all four state machines; the driver keeps at most one instance of each per
/// transaction and hands the name back to `on_timer` when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Client INVITE retransmission (unreliable transports), starts at T1 and doubles.
    A,
    /// Client INVITE timeout in Calling, 64*T1.
    B,
    /// Client INVITE wait for final response retransmissions in Completed.
    D,
    /// Client non-INVITE retransmission (unreliable transports), doubles up to T2.
    E,
    /// Client non-INVITE timeout, 64*T1.
    F,
    /// Server INVITE final (non-2xx) response retransmission, doubles up to T2.
    G,
    /// Server INVITE wait for ACK, 64*T1.
    H,
    /// Server INVITE absorption of ACK retransmissions in Confirmed.
    I,
    /// Server non-INVITE absorption of request retransmissions in Completed.
    J,
    /// Client non-INVITE absorption of response retransmissions in Completed.
    K,
    /// Server INVITE lifetime in Accepted after a 2xx (RFC 6026), 64*T1.
    L,
    /// Client INVITE lifetime in Accepted after a 2xx (RFC 6026), 64*T1.
    M,
    /// Server INVITE: send `100 Trying` if the TU has not answered within [`TRYING_DELAY`].
    Trying,
}

impl Timer {
    /// Every timer, for drivers that must cancel all timers of a dropped transaction.
    pub const ALL: [Timer; 13] = [
        Timer::A,
        Timer::B,
        Timer::D,
        Timer::E,
        Timer::F,
        Timer::G,
        Timer::H,
        Timer::I,
        Timer::J,
        Timer::K,
        Timer::L,
        Timer::M,
        Timer::Trying,
    ];
}

/// What a transaction asks its driver to do; carried out in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put the message on the wire towards the transaction's peer (the driver knows where).
    Send(SipMessage),
    /// Hand the message to the transaction user: responses for client transactions; for
    /// server transactions the request that created it (once) and, in Accepted, a matching ACK.
    Deliver(SipMessage),
    /// Arm the timer for this long from now; arming an armed timer replaces it.
    Schedule(Timer, Duration),
    /// Disarm the timer (no-op when not armed).
    CancelTimer(Timer),
    /// Timer B/F (client) or H (server) expired: the client TU must act as on a 408; a server
    /// TU learns that the ACK for its non-2xx final response never came.
    Timeout,
    /// The transaction is over: the driver drops it and all its timers.
    Terminated,
}

/// A fresh Via branch: the magic cookie followed by 22 random alphanumerics (about 130 bits),
/// unique in space and time as RFC 3261 8.1.1.7 requires.
pub fn new_branch() -> String {
    format!("{MAGIC_COOKIE}{}", random_token(22))
}

/// A fresh From/To tag (RFC 3261 19.3 asks for at least 32 random bits; this has about 60).
pub fn new_tag() -> String {
    random_token(10)
}

/// A fresh Call-ID: random token `@host` (RFC 3261 8.1.1.4). `host` is our address or name.
pub fn new_call_id(host: &str) -> String {
    let host = host.trim();
    if host.is_empty() { random_token(24) } else { format!("{}@{host}", random_token(24)) }
}

fn random_token(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

/// Builds the CANCEL of a client INVITE as RFC 3261 9.1 says: the same Request-URI, Call-ID,
/// To, From and CSeq number, only the INVITE's top Via (so that it matches the INVITE's
/// transaction) and its Route headers; no body.
pub fn cancel_for(invite: &Request) -> Request {
    let mut headers = Headers::default();
    let mut via_copied = false;
    for header in invite.headers.iter() {
        match header {
            Header::Via(_) if !via_copied => {
                via_copied = true;
                headers.push(header.clone());
            }
            Header::From(_) | Header::To(_) | Header::CallId(_) | Header::Route(_) => headers.push(header.clone()),
            _ => {}
        }
    }
    let number = invite.headers.iter().find_map(|h| match h {
        Header::CSeq(cseq) => cseq.value().split_whitespace().next().and_then(|n| n.parse::<u32>().ok()),
        _ => None,
    });
    headers.push(Header::CSeq(rsip::headers::CSeq::new(format!("{} CANCEL", number.unwrap_or(1)))));
    headers.push(Header::MaxForwards(rsip::headers::MaxForwards::from(70u32)));
    headers.push(Header::ContentLength(ContentLength::default()));
    Request { method: rsip::Method::Cancel, uri: invite.uri.clone(), version: rsip::Version::V2, headers, body: vec![] }
}

/// Builds a response to `req` as RFC 3261 8.2.6 says: the Via headers in order, From, To
/// (with `to_tag` appended when given and the To has no tag yet), Call-ID and CSeq are copied,
/// `Content-Length: 0` is set. Also copied, because the RFC asks for them: Timestamp into a
/// `100` (8.2.6.1), and Record-Route into 101-299 responses to INVITE (12.1.1). Add Contact,
/// body and other headers after.
///
/// `reason` replaces rsip's default phrase (CR/LF are stripped); with a custom phrase the
/// status is held as `StatusCode::Other(code, phrase)`, so compare statuses with `.code()`.
/// Codes outside 100..=699 are clamped to 500 rather than producing an unparsable response.
pub fn response_to(req: &Request, code: u16, reason: Option<&str>, to_tag: Option<&str>) -> Response {
    let code = if (100..=699).contains(&code) { code } else { 500 };
    let status_code = match reason.map(|r| r.replace(['\r', '\n'], " ")) {
        Some(phrase) if !phrase.trim().is_empty() => StatusCode::Other(code, phrase.trim().to_string()),
        _ => StatusCode::from(code),
    };
    let mut headers = Headers::default();
    for header in req.headers.iter() {
        match header {
            Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => headers.push(header.clone()),
            Header::To(to) => {
                let value = match to_tag {
                    Some(tag) if !tag.is_empty() && header_param(to.value(), "tag").is_none() => {
                        format!("{};tag={tag}", to.value().trim_end())
                    }
                    _ => to.value().to_string(),
                };
                headers.push(Header::To(value.into()));
            }
            Header::Timestamp(_) if code == 100 => headers.push(header.clone()),
            Header::RecordRoute(_) if req.method == rsip::Method::Invite && (101..300).contains(&code) => {
                headers.push(header.clone())
            }
            _ => {}
        }
    }
    headers.push(Header::ContentLength(ContentLength::default()));
    Response { status_code, version: rsip::Version::V2, headers, body: Vec::new() }
}

/// The value of header parameter `name` (case-insensitive) of a name-addr header value such
/// as To/From/Contact: parameters after the `>` of a name-addr, or after the URI of a bare
/// addr-spec (where they belong to the header, RFC 3261 20.10). `Some("")` for a flag.
pub(crate) fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = match value.rfind('>') {
        Some(end) => &value[end + 1..],
        None => value.split_once(';').map(|(_, rest)| rest).unwrap_or(""),
    };
    params.split(';').find_map(|param| {
        let (n, v) = param.split_once('=').unwrap_or((param, ""));
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The status code number of a response.
fn status(response: &Response) -> u16 {
    response.status_code.code()
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Plain message builders shared by the transaction tests.
    use rsip::{Request, Response, SipMessage};

    use super::Action;

    pub const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bKnashds8;rport\r\n\
Max-Forwards: 70\r\n\
Route: <sip:p1.example.com;lr>\r\n\
Route: <sip:p2.example.com;lr>\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com>\r\n\
Content-Length: 0\r\n\r\n";

    pub fn request(text: &str) -> Request {
        Request::try_from(text.as_bytes()).expect("test request parses")
    }

    pub fn invite() -> Request {
        request(INVITE)
    }

    pub fn non_invite(method: &str) -> Request {
        request(&format!(
            "{method} sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bKnon1nv\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 231 {method}\r\n\
Content-Length: 0\r\n\r\n"
        ))
    }

    /// A response to `req` with `code`, a To tag for everything but 100.
    pub fn response(req: &Request, code: u16) -> Response {
        super::response_to(req, code, None, (code > 100).then_some("totag1"))
    }

    pub fn sent(actions: &[Action]) -> Vec<&SipMessage> {
        actions.iter().filter_map(|a| if let Action::Send(m) = a { Some(m) } else { None }).collect()
    }

    pub fn header(message: &impl rsip::message::HasHeaders, name: &str) -> Vec<String> {
        message
            .headers()
            .iter()
            .filter_map(|h| {
                let text = h.to_string();
                let (n, v) = text.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn cancel_matches_the_invite_as_rfc_3261_9_1_says() {
        let invite = invite();
        let cancel = cancel_for(&invite);
        assert_eq!(cancel.method, rsip::Method::Cancel);
        assert_eq!(cancel.uri, invite.uri);
        assert_eq!(header(&cancel, "Via"), header(&invite, "Via")[..1].to_vec(), "only the top Via");
        for name in ["From", "To", "Call-ID", "Route"] {
            assert_eq!(header(&cancel, name), header(&invite, name), "{name}");
        }
        assert_eq!(header(&cancel, "CSeq"), ["314159 CANCEL"]);
        assert!(header(&cancel, "Contact").is_empty() && cancel.body.is_empty());
    }

    #[test]
    fn timer_config_defaults_and_derived_values() {
        let cfg = TimerConfig::default();
        assert_eq!(cfg.t1, Duration::from_millis(500));
        assert_eq!(cfg.t2, Duration::from_secs(4));
        assert_eq!(cfg.t4, Duration::from_secs(5));
        assert_eq!(cfg.timeout(), Duration::from_secs(32));
        assert_eq!(cfg.next_capped(Duration::from_millis(500)), Duration::from_secs(1));
        assert_eq!(cfg.next_capped(Duration::from_secs(2)), Duration::from_secs(4));
        assert_eq!(cfg.next_capped(Duration::from_secs(4)), Duration::from_secs(4));
    }

    #[test]
    fn identifiers_are_fresh_and_well_formed() {
        let (a, b) = (new_branch(), new_branch());
        assert!(a.starts_with(MAGIC_COOKIE) && a.len() == MAGIC_COOKIE.len() + 22);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        let tag = new_tag();
        assert_eq!(tag.len(), 10);
        assert_ne!(tag, new_tag());
        let call_id = new_call_id("10.0.0.1");
        assert!(call_id.ends_with("@10.0.0.1"));
        assert_ne!(call_id, new_call_id("10.0.0.1"));
        assert!(!new_call_id("").contains('@'));
    }

    #[test]
    fn response_copies_the_rfc_headers() {
        let req = invite();
        let resp = response_to(&req, 486, Some("Busy Here"), Some("xyz"));
        assert_eq!(resp.status_code.code(), 486);
        let text = resp.to_string();
        assert!(text.starts_with("SIP/2.0 486 Busy Here\r\n"), "{text}");
        assert_eq!(header(&resp, "Via"), vec!["SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bKnashds8;rport"]);
        assert_eq!(header(&resp, "From"), vec!["Alice <sip:alice@atlanta.example.com>;tag=1928301774"]);
        assert_eq!(header(&resp, "To"), vec!["Bob <sip:bob@biloxi.example.com>;tag=xyz"]);
        assert_eq!(header(&resp, "Call-ID"), vec!["a84b4c76e66710@pc33.atlanta.example.com"]);
        assert_eq!(header(&resp, "CSeq"), vec!["314159 INVITE"]);
        assert_eq!(header(&resp, "Content-Length"), vec!["0"]);
        assert!(header(&resp, "Route").is_empty() && header(&resp, "Contact").is_empty());
        assert!(header(&resp, "Max-Forwards").is_empty());
        // What we build must parse back.
        let parsed = Response::try_from(text.as_bytes()).unwrap();
        assert_eq!(parsed.status_code.code(), 486);
    }

    #[test]
    fn response_keeps_an_existing_to_tag_and_all_vias() {
        let req = request(
            "BYE sip:alice@pc33.atlanta.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP p1.example.com;branch=z9hG4bK1\r\n\
Via: SIP/2.0/TCP p2.example.com;branch=z9hG4bK2, SIP/2.0/UDP ua.example.com;branch=z9hG4bK3\r\n\
To: <sip:alice@atlanta.example.com>;tag=abc\r\n\
From: <sip:bob@biloxi.example.com>;tag=def\r\n\
Call-ID: c1\r\n\
CSeq: 2 BYE\r\n\
Content-Length: 0\r\n\r\n",
        );
        let resp = response_to(&req, 200, None, Some("other"));
        assert_eq!(header(&resp, "To"), vec!["<sip:alice@atlanta.example.com>;tag=abc"]);
        assert_eq!(header(&resp, "Via").len(), 2);
        assert_eq!(
            header(&resp, "Via")[1],
            "SIP/2.0/TCP p2.example.com;branch=z9hG4bK2, SIP/2.0/UDP ua.example.com;branch=z9hG4bK3"
        );
    }

    #[test]
    fn response_default_reason_timestamp_record_route_and_bad_code() {
        let req = request(
            "INVITE sip:bob@b.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP a.example.com;branch=z9hG4bKx\r\n\
Record-Route: <sip:p1.example.com;lr>\r\n\
Timestamp: 54\r\n\
To: sip:bob@b.example.com\r\n\
From: <sip:alice@a.example.com>;tag=f\r\n\
Call-ID: c2\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n",
        );
        let trying = response_to(&req, 100, None, None);
        assert_eq!(trying.status_code, StatusCode::Trying);
        assert_eq!(header(&trying, "Timestamp"), vec!["54"]);
        assert!(header(&trying, "Record-Route").is_empty());
        assert_eq!(header(&trying, "To"), vec!["sip:bob@b.example.com"]);
        let ringing = response_to(&req, 180, None, Some("t1"));
        assert_eq!(header(&ringing, "Record-Route"), vec!["<sip:p1.example.com;lr>"]);
        assert_eq!(header(&ringing, "To"), vec!["sip:bob@b.example.com;tag=t1"]);
        assert!(header(&ringing, "Timestamp").is_empty());
        let busy = response_to(&req, 486, None, Some("t1"));
        assert!(header(&busy, "Record-Route").is_empty());
        assert_eq!(response_to(&req, 42, None, None).status_code.code(), 500);
        let odd = response_to(&req, 499, Some("Odd\r\nInjected: yes"), None);
        assert_eq!(odd.status_code, StatusCode::Other(499, "Odd  Injected: yes".into()));
        assert!(!odd.to_string().contains("\r\nInjected"));
    }

    #[test]
    fn header_param_reads_name_addr_and_addr_spec_forms() {
        assert_eq!(header_param("<sip:a@b;tag=uri>;tag=hdr", "tag"), Some("hdr"));
        assert_eq!(header_param("<sip:a@b;tag=uri>", "tag"), None);
        assert_eq!(header_param("sip:a@b;TAG=x;lr", "tag"), Some("x"));
        assert_eq!(header_param("sip:a@b;lr", "lr"), Some(""));
        assert_eq!(header_param("", "tag"), None);
    }
}
