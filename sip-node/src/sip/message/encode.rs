//! Serializing a message into one presized buffer.
//!
//! rsip's `Display` for `Headers` formats every header into a `String` of its own, collects
//! them into a vector and joins it: about a fifth of the node's instructions per call went to
//! `core::fmt` there (issue 22's callgrind profile). Every rsip header is a name and a string
//! value, so the header section is copied here with `push_str` instead; only the start line
//! (method, URI, status) still goes through `Display`. The bytes are the same as rsip's
//! (`header_lines_match_rsip_display` checks every header kind).

use std::fmt::Write;

use rsip::headers::untyped::UntypedHeader;
use rsip::{Header, SipMessage};

/// The header's name as rsip writes it, and its value.
pub(super) fn name_and_value(header: &Header) -> (&str, &str) {
    macro_rules! named {
        ($($variant:ident => $name:literal),* $(,)?) => {
            match header {
                Header::Other(name, value) => (name.as_str(), value.as_str()),
                $(Header::$variant(inner) => ($name, inner.value()),)*
            }
        };
    }
    named! {
        Accept => "Accept",
        AcceptEncoding => "Accept-Encoding",
        AcceptLanguage => "Accept-Language",
        AlertInfo => "Alert-Info",
        Allow => "Allow",
        AuthenticationInfo => "Authentication-Info",
        Authorization => "Authorization",
        CSeq => "CSeq",
        CallId => "Call-ID",
        CallInfo => "Call-Info",
        Contact => "Contact",
        ContentDisposition => "Content-Disposition",
        ContentEncoding => "Content-Encoding",
        ContentLanguage => "Content-Language",
        ContentLength => "Content-Length",
        ContentType => "Content-Type",
        Date => "Date",
        ErrorInfo => "Error-Info",
        Event => "Event",
        Expires => "Expires",
        From => "From",
        InReplyTo => "In-Reply-To",
        MaxForwards => "Max-Forwards",
        MimeVersion => "Mime-Version",
        MinExpires => "Min-Expires",
        Organization => "Organization",
        Priority => "Priority",
        ProxyAuthenticate => "Proxy-Authenticate",
        ProxyAuthorization => "Proxy-Authorization",
        ProxyRequire => "Proxy-Require",
        RecordRoute => "Record-Route",
        ReplyTo => "Reply-To",
        Require => "Require",
        RetryAfter => "Retry-After",
        Route => "Route",
        Server => "Server",
        Subject => "Subject",
        SubscriptionState => "Subscription-State",
        Supported => "Supported",
        Timestamp => "Timestamp",
        To => "To",
        Unsupported => "Unsupported",
        UserAgent => "User-Agent",
        Via => "Via",
        Warning => "Warning",
        WwwAuthenticate => "WWW-Authenticate",
    }
}

/// The start line and header section (with the blank line that ends it), as rsip's `Display`
/// writes them, and the body.
pub(super) fn head_and_body(message: &SipMessage) -> (String, &[u8]) {
    let (headers, body) = match message {
        SipMessage::Request(r) => (&r.headers, r.body.as_slice()),
        SipMessage::Response(r) => (&r.headers, r.body.as_slice()),
    };
    // Room for the body too: `encode` appends it to this buffer.
    let size = 64 + body.len() + headers.iter().map(|h| name_and_value(h).1.len() + 24).sum::<usize>();
    let mut head = String::with_capacity(size);
    // Writing into a String cannot fail.
    let _ = match message {
        SipMessage::Request(r) => write!(head, "{} {} {}\r\n", r.method, r.uri, r.version),
        SipMessage::Response(r) => write!(head, "{} {}\r\n", r.version, r.status_code),
    };
    for header in headers.iter() {
        let (name, value) = name_and_value(header);
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    (head, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every header kind rsip parses, as its parser builds it from a header line (rsip has a
    /// `SubscriptionState` variant it never parses into: that one is added by hand).
    const LINES: &[&str] = &[
        "Accept: application/sdp",
        "Accept-Encoding: gzip",
        "Accept-Language: en",
        "Alert-Info: <http://x/y>",
        "Allow: INVITE, ACK",
        "Authentication-Info: nextnonce=\"x\"",
        "Authorization: Digest username=\"a\"",
        "CSeq: 1 INVITE",
        "Call-ID: abc@host",
        "Call-Info: <http://x>",
        "Contact: <sip:a@b>",
        "Content-Disposition: session",
        "Content-Encoding: gzip",
        "Content-Language: en",
        "Content-Length: 0",
        "Content-Type: application/sdp",
        "Date: Sat, 13 Nov 2010 23:29:00 GMT",
        "Error-Info: <sip:x>",
        "Event: refer",
        "Expires: 60",
        "From: <sip:a@b>;tag=1",
        "In-Reply-To: x@y",
        "Max-Forwards: 70",
        "Mime-Version: 1.0",
        "Min-Expires: 60",
        "Organization: x",
        "Priority: urgent",
        "Proxy-Authenticate: Digest realm=\"x\"",
        "Proxy-Authorization: Digest username=\"a\"",
        "Proxy-Require: foo",
        "Record-Route: <sip:p;lr>",
        "Reply-To: <sip:a@b>",
        "Require: 100rel",
        "Retry-After: 5",
        "Route: <sip:p;lr>",
        "Server: x",
        "Subject: hi",
        "Supported: timer",
        "Timestamp: 1",
        "To: <sip:n@c>",
        "Unsupported: foo",
        "User-Agent: x",
        "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx",
        "Warning: 399 x \"y\"",
        "WWW-Authenticate: Digest realm=\"x\"",
        "X-Custom: 1",
    ];

    #[test]
    fn header_lines_match_rsip_display() {
        let text = format!("OPTIONS sip:n@127.0.0.1 SIP/2.0\r\n{}\r\n\r\n", LINES.join("\r\n"));
        let SipMessage::Request(mut request) = SipMessage::try_from(text.as_str()).unwrap() else { panic!() };
        // 45 typed kinds and one Other, none of them parsed as Other by mistake.
        assert_eq!(request.headers.iter().filter(|h| matches!(h, Header::Other(..))).count(), 1);
        assert_eq!(request.headers.iter().count(), LINES.len());
        request.headers.push(Header::SubscriptionState("active;expires=60".into()));
        for header in request.headers.iter() {
            let (name, value) = name_and_value(header);
            assert_eq!(format!("{name}: {value}"), header.to_string());
        }
        let message = SipMessage::Request(request.clone());
        let (head, body) = head_and_body(&message);
        assert!(body.is_empty());
        assert_eq!(head, format!("{} {} {}\r\n{}\r\n", request.method, request.uri, request.version, request.headers));
    }

    #[test]
    fn response_head_matches_rsip_display() {
        let text = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nContent-Length: 0\r\n\r\n";
        let message = SipMessage::try_from(text).unwrap();
        let SipMessage::Response(response) = &message else { panic!() };
        let (head, _) = head_and_body(&message);
        assert_eq!(head, format!("{} {}\r\n{}\r\n", response.version, response.status_code, response.headers));
        assert_eq!(head, text);
    }
}
