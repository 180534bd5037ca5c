//! Transfers in SIP: RFC 3515 REFER (`Refer-To`, the implicit subscription and its NOTIFYs
//! with RFC 3420 `message/sipfrag` bodies) and RFC 3891 `Replaces` (attended transfer: the new
//! INVITE names the dialog it replaces).
//!
//! Everything here parses values from the network or builds values for it; which target a
//! referral may reach (an outbound RoutingRule, no open relay) and which dialogs the node
//! holds are the call's business.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use rsip::Header;

use super::header_values;

/// The option tag of RFC 3891 in `Supported`/`Require`.
pub const REPLACES_TAG: &str = "replaces";

/// Longest header value parsed here; longer ones are refused rather than scanned.
const MAX_VALUE: usize = 2048;

/// Why a REFER, a `Replaces` or a sipfrag is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferError {
    #[error("REFER without Refer-To")]
    MissingReferTo,
    #[error("REFER with {0} Refer-To headers (exactly one is allowed)")]
    SeveralReferTo(usize),
    #[error("Refer-To is malformed: {0}")]
    BadReferTo(String),
    #[error("Refer-To scheme {0:?} is not sip, sips or tel")]
    UnsupportedScheme(String),
    #[error("Replaces is malformed: {0}")]
    BadReplaces(String),
    #[error("more than one Replaces")]
    SeveralReplaces,
    #[error("sipfrag body is malformed: {0}")]
    BadSipFrag(String),
    #[error("value of {0} bytes is too long")]
    TooLong(usize),
}

impl ReferError {
    /// The status code to answer the REFER/INVITE/NOTIFY with (RFC 3515 2.4.1: 400 for a
    /// REFER without exactly one Refer-To; RFC 3891 3: 400 for several Replaces; 416 for a
    /// URI scheme the node cannot reach).
    pub fn status(&self) -> u16 {
        match self {
            ReferError::UnsupportedScheme(_) => 416,
            _ => 400,
        }
    }
}

fn clip(text: &str) -> String {
    text.chars().take(60).collect()
}

/// A `Replaces` value: `callid;to-tag=...;from-tag=...[;early-only]` (RFC 3891 section 6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaces {
    pub call_id: String,
    /// The tag of the UA that receives the INVITE with Replaces (its local tag).
    pub to_tag: String,
    /// The tag of the other end of that dialog (the receiver's remote tag).
    pub from_tag: String,
    /// Replace only a dialog that is still early.
    pub early_only: bool,
}

/// The state of the dialog a `Replaces` names, as the node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplacedDialog {
    /// The node has no such dialog.
    Unknown,
    /// An early dialog of an INVITE the node sent (it may be replaced).
    EarlyOutgoing,
    /// An early dialog of an INVITE the node received (RFC 3891: 481, only the caller's side
    /// of an early dialog may be replaced).
    EarlyIncoming,
    /// A confirmed dialog.
    Confirmed,
    /// A dialog that has ended.
    Terminated,
}

impl Replaces {
    /// Parses a header value (or the decoded `Replaces` of a Refer-To URI).
    pub fn parse(value: &str) -> Result<Replaces, ReferError> {
        if value.len() > MAX_VALUE {
            return Err(ReferError::TooLong(value.len()));
        }
        let bad = || ReferError::BadReplaces(clip(value));
        let mut parts = value.split(';');
        let call_id = parts.next().unwrap_or_default().trim();
        if call_id.is_empty() || call_id.contains(char::is_whitespace) {
            return Err(bad());
        }
        let (mut to_tag, mut from_tag, mut early_only) = (None, None, false);
        for param in parts {
            let (name, val) = param.split_once('=').map_or((param, None), |(n, v)| (n, Some(v.trim())));
            match name.trim().to_ascii_lowercase().as_str() {
                "to-tag" => to_tag = val.filter(|v| !v.is_empty()),
                "from-tag" => from_tag = val.filter(|v| !v.is_empty()),
                "early-only" => early_only = true,
                _ => {}
            }
        }
        Ok(Replaces {
            call_id: call_id.to_string(),
            to_tag: to_tag.ok_or_else(bad)?.to_string(),
            from_tag: from_tag.ok_or_else(bad)?.to_string(),
            early_only,
        })
    }

    /// The `Replaces` of a request, if any; more than one is an error (RFC 3891 section 3).
    pub fn of(headers: &rsip::Headers) -> Result<Option<Replaces>, ReferError> {
        let values = header_values(headers, "Replaces");
        match values.as_slice() {
            [] => Ok(None),
            [one] => Replaces::parse(one).map(Some),
            _ => Err(ReferError::SeveralReplaces),
        }
    }

    /// The header value.
    pub fn header_value(&self) -> String {
        let mut value = format!("{};to-tag={};from-tag={}", self.call_id, self.to_tag, self.from_tag);
        if self.early_only {
            value.push_str(";early-only");
        }
        value
    }

    /// Whether it names the dialog `call_id` whose local tag (the receiver's) is `local_tag`
    /// and remote tag `remote_tag`.
    pub fn names(&self, call_id: &str, local_tag: &str, remote_tag: &str) -> bool {
        self.call_id == call_id && self.to_tag == local_tag && self.from_tag == remote_tag
    }

    /// RFC 3891 section 3: may an INVITE with this `Replaces` replace `dialog`? `Err` is the
    /// status to refuse it with: 481 for an unknown dialog or an incoming early one, 486 when
    /// `early-only` meets a confirmed dialog, 603 for an ended one.
    pub fn check(&self, dialog: ReplacedDialog) -> Result<(), u16> {
        match dialog {
            ReplacedDialog::Unknown | ReplacedDialog::EarlyIncoming => Err(481),
            ReplacedDialog::Confirmed if self.early_only => Err(486),
            ReplacedDialog::Terminated => Err(603),
            ReplacedDialog::EarlyOutgoing | ReplacedDialog::Confirmed => Ok(()),
        }
    }
}

/// What may stay literal in a URI header value: RFC 3261 `hnv-unreserved` and `unreserved`;
/// `;`, `=`, `@`, `%` and the rest are escaped (RFC 3891 section 3 shows the Replaces of a
/// Refer-To escaped this way).
const URI_HEADER_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(b',');

/// A `Refer-To` value: the target of a referral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferTo {
    /// `sip`, `sips` or `tel` (lower case).
    pub scheme: String,
    /// The user part (the number of a `tel` URI).
    pub user: Option<String>,
    /// The host (empty for `tel`).
    pub host: String,
    /// The URI without its `?headers` (parameters kept): the Request-URI of the new INVITE.
    pub uri: String,
    /// An attended transfer: the dialog the new INVITE replaces.
    pub replaces: Option<Replaces>,
    /// The other URI headers, decoded (RFC 3515 2.1: they go into the new INVITE).
    pub headers: Vec<(String, String)>,
}

impl ReferTo {
    /// Parses a header value: `name-addr` (with or without display name) or a bare URI.
    pub fn parse(value: &str) -> Result<ReferTo, ReferError> {
        if value.len() > MAX_VALUE {
            return Err(ReferError::TooLong(value.len()));
        }
        let bad = || ReferError::BadReferTo(clip(value));
        let value = value.trim();
        let uri_text = match (value.find('<'), value.rfind('>')) {
            (Some(open), Some(close)) if open < close => &value[open + 1..close],
            (None, None) => value.split(';').next().unwrap_or_default(),
            _ => return Err(bad()),
        };
        let uri_text = uri_text.trim();
        let (scheme, rest) = uri_text.split_once(':').ok_or_else(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        if !matches!(scheme.as_str(), "sip" | "sips" | "tel") {
            return Err(ReferError::UnsupportedScheme(clip(&scheme)));
        }
        let (before_headers, header_text) = rest.split_once('?').map_or((rest, None), |(u, h)| (u, Some(h)));
        if before_headers.is_empty() || before_headers.contains(char::is_whitespace) {
            return Err(bad());
        }
        let (user, host) = if scheme == "tel" {
            (Some(before_headers.split(';').next().unwrap_or_default().to_string()), String::new())
        } else {
            let (user, hostport) =
                before_headers.rsplit_once('@').map_or((None, before_headers), |(u, h)| (Some(u), h));
            let host = hostport.split(';').next().unwrap_or_default();
            let host = match host.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or_default(),
                None => host.split(':').next().unwrap_or_default(),
            };
            if host.is_empty() {
                return Err(bad());
            }
            let user = user.map(|u| u.split(':').next().unwrap_or_default()).filter(|u| !u.is_empty());
            (user.map(|u| percent_decode_str(u).decode_utf8_lossy().into_owned()), host.to_ascii_lowercase())
        };
        let mut replaces = None;
        let mut headers = Vec::new();
        for pair in header_text.into_iter().flat_map(|h| h.split('&')).filter(|p| !p.is_empty()) {
            let (name, encoded) = pair.split_once('=').ok_or_else(bad)?;
            let decoded = percent_decode_str(encoded).decode_utf8().map_err(|_| bad())?;
            if name.eq_ignore_ascii_case("Replaces") {
                if replaces.is_some() {
                    return Err(ReferError::SeveralReplaces);
                }
                replaces = Some(Replaces::parse(&decoded)?);
            } else {
                headers.push((name.to_string(), decoded.into_owned()));
            }
        }
        Ok(ReferTo { uri: format!("{scheme}:{before_headers}"), scheme, user, host, replaces, headers })
    }

    /// The `Refer-To` of a REFER: exactly one (RFC 3515 section 2.4.1).
    pub fn of(headers: &rsip::Headers) -> Result<ReferTo, ReferError> {
        let values = header_values(headers, "Refer-To");
        match values.as_slice() {
            [] => Err(ReferError::MissingReferTo),
            [one] => ReferTo::parse(one),
            many => Err(ReferError::SeveralReferTo(many.len())),
        }
    }

    /// A target without `Replaces` or other headers (a blind transfer to `uri`).
    pub fn blind(uri: &str) -> Result<ReferTo, ReferError> {
        let target = ReferTo::parse(uri)?;
        Ok(ReferTo { replaces: None, headers: Vec::new(), ..target })
    }

    /// The header value, in angle brackets, with `Replaces` and the other headers escaped.
    pub fn header_value(&self) -> String {
        let mut pairs: Vec<(Cow<str>, String)> = Vec::new();
        if let Some(replaces) = &self.replaces {
            pairs.push((Cow::Borrowed("Replaces"), replaces.header_value()));
        }
        pairs.extend(self.headers.iter().map(|(n, v)| (Cow::Borrowed(n.as_str()), v.clone())));
        let mut value = format!("<{}", self.uri);
        for (i, (name, raw)) in pairs.iter().enumerate() {
            value.push(if i == 0 { '?' } else { '&' });
            value.push_str(name);
            value.push('=');
            value.extend(utf8_percent_encode(raw, URI_HEADER_VALUE));
        }
        value.push('>');
        value
    }

    /// The `Refer-To` header.
    pub fn header(&self) -> Header {
        Header::Other("Refer-To".into(), self.header_value())
    }
}

/// The status line of a `message/sipfrag` body (RFC 3420), which is all a REFER's NOTIFY
/// needs to say (RFC 3515 2.4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipFrag {
    pub status: u16,
    pub reason: String,
}

/// The content type of a REFER's NOTIFY body.
pub const SIPFRAG_CONTENT_TYPE: &str = "message/sipfrag;version=2.0";

impl SipFrag {
    /// The fragment for a status code, with its usual reason phrase.
    pub fn new(status: u16, reason: &str) -> SipFrag {
        SipFrag { status, reason: reason.replace(['\r', '\n'], " ") }
    }

    /// Parses a body: its first line must be a SIP status line; header lines after it are
    /// allowed and ignored.
    pub fn parse(body: &[u8]) -> Result<SipFrag, ReferError> {
        if body.len() > MAX_VALUE {
            return Err(ReferError::TooLong(body.len()));
        }
        let text = std::str::from_utf8(body).map_err(|_| ReferError::BadSipFrag("not text".into()))?;
        let line = text.lines().next().unwrap_or_default().trim();
        let bad = || ReferError::BadSipFrag(clip(line));
        let rest = line.strip_prefix("SIP/2.0 ").ok_or_else(bad)?;
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let status = code.parse::<u16>().ok().filter(|c| code.len() == 3 && (100..=699).contains(c)).ok_or_else(bad)?;
        Ok(SipFrag { status, reason: reason.trim().to_string() })
    }

    /// The body.
    pub fn body(&self) -> String {
        format!("SIP/2.0 {} {}\r\n", self.status, self.reason)
    }

    /// Whether this is the last NOTIFY of the subscription (a final response).
    pub fn is_final(&self) -> bool {
        self.status >= 200
    }
}

/// The headers of the NOTIFY that reports `frag` for the REFER with CSeq number `refer_cseq`
/// (RFC 3515 2.4.4-2.4.7): `Event: refer;id=<cseq>` (the id tells apart several REFERs in a
/// dialog), `Subscription-State` active while in progress and terminated at the final status,
/// and the sipfrag content type. The body is [`SipFrag::body`].
pub fn notify_headers(refer_cseq: u32, frag: &SipFrag) -> Vec<Header> {
    let state =
        if frag.is_final() { "terminated;reason=noresource".to_string() } else { "active;expires=60".to_string() };
    vec![
        Header::Event(format!("refer;id={refer_cseq}").into()),
        Header::SubscriptionState(state.into()),
        Header::ContentType(SIPFRAG_CONTENT_TYPE.into()),
    ]
}

/// The progress a NOTIFY reports for a REFER the node sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferProgress {
    /// The status of the new INVITE as the transferee reports it.
    pub frag: SipFrag,
    /// The subscription ended: this is the last NOTIFY.
    pub terminated: bool,
}

impl ReferProgress {
    /// Reads a NOTIFY received for the node's REFER. Its `Event` must be `refer`.
    pub fn of(headers: &rsip::Headers, body: &[u8]) -> Result<ReferProgress, ReferError> {
        let event = header_values(headers, "Event").first().map(|v| v.to_ascii_lowercase()).unwrap_or_default();
        if event.split(';').next().map(str::trim) != Some("refer") {
            return Err(ReferError::BadSipFrag(format!("Event {:?} is not refer", clip(&event))));
        }
        let frag = SipFrag::parse(body)?;
        let terminated = header_values(headers, "Subscription-State")
            .first()
            .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("terminated"));
        Ok(ReferProgress { terminated: terminated || frag.is_final(), frag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> rsip::Headers {
        list.iter().map(|(n, v)| Header::Other((*n).into(), (*v).into())).collect::<Vec<_>>().into()
    }

    #[test]
    fn a_blind_refer_to_parses_in_every_form() {
        for value in [
            "<sip:+15551230000@carrier.example;user=phone>",
            "\"Desk\" <sip:+15551230000@Carrier.example:5061;user=phone>",
            "sip:+15551230000@carrier.example;user=phone",
        ] {
            let target = ReferTo::parse(value).unwrap();
            assert_eq!(target.scheme, "sip", "{value}");
            assert_eq!(target.user.as_deref(), Some("+15551230000"), "{value}");
            assert_eq!(target.host, "carrier.example", "{value}");
            assert_eq!(target.replaces, None);
        }
        let tel = ReferTo::parse("<tel:+15551230000>").unwrap();
        assert_eq!((tel.scheme.as_str(), tel.user.as_deref(), tel.host.as_str()), ("tel", Some("+15551230000"), ""));
        let v6 = ReferTo::parse("<sip:bob@[2001:db8::1]:5060>").unwrap();
        assert_eq!(v6.host, "2001:db8::1");
    }

    #[test]
    fn an_attended_refer_to_carries_an_escaped_replaces() {
        // The example of RFC 3891 section 3 (the Replaces inside the Refer-To URI).
        let value =
            "<sips:bob@atlanta.example.com?Replaces=12345%40192.168.118.3%3Bto-tag%3D12345%3Bfrom-tag%3D5FFE-3994>";
        let target = ReferTo::parse(value).unwrap();
        assert_eq!(target.uri, "sips:bob@atlanta.example.com");
        let replaces = target.replaces.clone().unwrap();
        assert_eq!(
            replaces,
            Replaces {
                call_id: "12345@192.168.118.3".into(),
                to_tag: "12345".into(),
                from_tag: "5FFE-3994".into(),
                early_only: false
            }
        );
        assert_eq!(target.header_value(), value, "prints back the way the RFC writes it");
        assert_eq!(ReferTo::parse(&target.header_value()).unwrap(), target);
        let with_other =
            ReferTo::parse("<sip:carol@h?Subject=hi%20there&Replaces=a%3Bto-tag%3D1%3Bfrom-tag%3D2>").unwrap();
        assert_eq!(with_other.headers, vec![("Subject".to_string(), "hi there".to_string())]);
        assert_eq!(with_other.replaces.unwrap().call_id, "a");
        assert_eq!(ReferTo::blind("sip:carol@h?Subject=x").unwrap().header_value(), "<sip:carol@h>");
    }

    #[test]
    fn bad_refer_to_values_are_typed_errors() {
        assert_eq!(ReferTo::of(&headers(&[])), Err(ReferError::MissingReferTo));
        assert_eq!(
            ReferTo::of(&headers(&[("Refer-To", "<sip:a@h>"), ("Refer-To", "<sip:b@h>")])),
            Err(ReferError::SeveralReferTo(2))
        );
        assert_eq!(ReferTo::parse("<http://evil.example/>"), Err(ReferError::UnsupportedScheme("http".into())));
        assert_eq!(ReferTo::parse("<http://x>").unwrap_err().status(), 416);
        for bad in [
            "",
            "<sip:a@h",
            "sip",
            "<sip:>",
            "<sip:@>",
            "<sip:a@h?Replaces>",
            "<sip:a@h?Replaces=x>",
            "<sip:a@h?Replaces=%FF%FE>",
        ] {
            let err = ReferTo::parse(bad).unwrap_err();
            assert_eq!(err.status(), 400, "{bad:?}: {err}");
        }
        assert_eq!(
            ReferTo::parse("<sip:a@h?Replaces=a%3Bto-tag%3D1%3Bfrom-tag%3D2&Replaces=b%3Bto-tag%3D1%3Bfrom-tag%3D2>"),
            Err(ReferError::SeveralReplaces)
        );
        assert!(matches!(ReferTo::parse(&format!("<sip:{}@h>", "a".repeat(3000))), Err(ReferError::TooLong(_))));
    }

    #[test]
    fn replaces_parses_and_checks_the_dialog_it_names() {
        let r = Replaces::parse("98732@sip.example.com ; from-tag=r33th4x0r;to-tag=ff87ff;early-only").unwrap();
        assert_eq!(r.header_value(), "98732@sip.example.com;to-tag=ff87ff;from-tag=r33th4x0r;early-only");
        assert!(r.names("98732@sip.example.com", "ff87ff", "r33th4x0r"));
        assert!(!r.names("98732@sip.example.com", "r33th4x0r", "ff87ff"), "tags are from the receiver's view");
        assert_eq!(r.check(ReplacedDialog::Unknown), Err(481));
        assert_eq!(r.check(ReplacedDialog::EarlyIncoming), Err(481));
        assert_eq!(r.check(ReplacedDialog::Confirmed), Err(486), "early-only");
        assert_eq!(r.check(ReplacedDialog::Terminated), Err(603));
        assert_eq!(r.check(ReplacedDialog::EarlyOutgoing), Ok(()));
        let confirmed = Replaces { early_only: false, ..r };
        assert_eq!(confirmed.check(ReplacedDialog::Confirmed), Ok(()));
        for bad in ["", "abc", "abc;to-tag=1", "abc;from-tag=2", "abc;to-tag=;from-tag=2", "a b;to-tag=1;from-tag=2"] {
            assert!(matches!(Replaces::parse(bad), Err(ReferError::BadReplaces(_))), "{bad:?}");
        }
        assert_eq!(Replaces::of(&headers(&[])), Ok(None));
        assert_eq!(
            Replaces::of(&headers(&[("Replaces", "a;to-tag=1;from-tag=2"), ("Replaces", "b;to-tag=1;from-tag=2")])),
            Err(ReferError::SeveralReplaces)
        );
    }

    #[test]
    fn notify_bodies_round_trip_and_say_when_the_subscription_ends() {
        let trying = SipFrag::new(100, "Trying");
        assert_eq!(trying.body(), "SIP/2.0 100 Trying\r\n");
        let sent = notify_headers(3, &trying);
        let sent: rsip::Headers = sent.into();
        assert_eq!(header_values(&sent, "Event")[0], "refer;id=3");
        assert_eq!(header_values(&sent, "Subscription-State")[0], "active;expires=60");
        let progress = ReferProgress::of(&sent, trying.body().as_bytes()).unwrap();
        assert_eq!(progress, ReferProgress { frag: trying, terminated: false });

        let ok = SipFrag::new(200, "OK");
        let sent: rsip::Headers = notify_headers(3, &ok).into();
        assert_eq!(header_values(&sent, "Subscription-State")[0], "terminated;reason=noresource");
        assert!(ReferProgress::of(&sent, ok.body().as_bytes()).unwrap().terminated);

        // A fragment with headers after the status line, and a reason phrase with spaces.
        let frag = SipFrag::parse(b"SIP/2.0 486 Busy Here\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!((frag.status, frag.reason.as_str()), (486, "Busy Here"));
        for bad in [&b""[..], b"hello", b"SIP/2.0 99 Odd", b"SIP/2.0 1000 X", b"SIP/1.0 200 OK", b"\xff\xfe"] {
            assert!(matches!(SipFrag::parse(bad), Err(ReferError::BadSipFrag(_))), "{bad:?}");
        }
        assert!(ReferProgress::of(&headers(&[("Event", "presence")]), b"SIP/2.0 200 OK").is_err());
        let terminated = headers(&[("Event", "refer"), ("Subscription-State", "terminated;reason=timeout")]);
        assert!(ReferProgress::of(&terminated, b"SIP/2.0 180 Ringing").unwrap().terminated);
    }
}
