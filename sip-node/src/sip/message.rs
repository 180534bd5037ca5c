//! SIP messages on the wire: parsing with rsip after the checks rsip leaves out, stream framing,
//! serialization with binary-safe bodies, and typed accessors the upper layers share.
//!
//! rsip parses the grammar; this module adds what a network-facing parser needs around it:
//! size limits, compact header names (`v:`, `i:`, `l:` ...) and folded lines (RFC 3261 7.3.1),
//! `Content-Length` enforcement (RFC 3261 18.3: a datagram body longer than declared is
//! truncated, shorter is an error), the mandatory headers of RFC 3261 8.1.1, and a way to
//! answer requests whose method rsip does not know with `501` instead of dropping them.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::LazyLock;

use regex::Regex;

use rsip::headers::{ContentLength, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response, SipMessage};

/// Largest message accepted on any transport. UDP cannot carry more than 65,507 bytes anyway,
/// and a SIP message larger than this is an attack or a bug, never a call.
pub const MAX_MESSAGE_SIZE: usize = 65_535;

/// Why bytes from the network are not a usable SIP message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("message has no header/body separator")]
    Incomplete,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("mandatory header {0} is missing or malformed")]
    MissingHeader(&'static str),
    #[error("Content-Length says {declared} bytes but {actual} arrived")]
    ShortBody { declared: usize, actual: usize },
    #[error("Content-Length is not a number")]
    BadContentLength,
}

/// A message read from the network.
#[derive(Debug)]
pub enum Incoming {
    /// A well-formed request or response.
    Message(SipMessage),
    /// A request with a method rsip does not know; carried as a request parsed with the
    /// placeholder method `OPTIONS` so that a `501` can be built from its headers (the CSeq
    /// header keeps the original method text).
    UnknownMethod { method: String, request: Request },
}

/// rsip 0.4 cannot parse bracketed IPv6 references (`sip:[2001:db8::1]:5060`): it splits host
/// and port at the first colon. Inside the node an IPv6 literal is therefore carried as a
/// reserved domain name (`2001-db8--1.ipv6.invalid`, RFC 6761 `.invalid`), written by
/// [`parse`] and [`v6_host`], read back by [`host_ip`], and turned back into brackets on the
/// wire by [`encode`].
const V6_SUFFIX: &str = ".ipv6.invalid";
static BRACKETED_V6: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[([0-9A-Fa-f:.]+)\]").expect("IPv6 reference pattern compiles"));
static V6_PLACEHOLDER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([0-9A-Fa-f_-]+)\.ipv6\.invalid").expect("IPv6 placeholder pattern compiles"));

/// The in-node host form of an IPv6 address (see [`V6_SUFFIX`]).
pub fn v6_host(ip: Ipv6Addr) -> String {
    format!("{}{V6_SUFFIX}", ip.to_string().replace(':', "-").replace('.', "_"))
}

/// The IP address a host string stands for: an IPv4/IPv6 literal (bracketed or not) or the
/// in-node IPv6 form. `None` for domain names.
pub fn host_ip(host: &str) -> Option<IpAddr> {
    if let Some(encoded) = host.strip_suffix(V6_SUFFIX) {
        return encoded.replace('-', ":").replace('_', ".").parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Compact header forms of RFC 3261 7.3.3 and the extensions in common use.
fn expand_compact(name: &str) -> Option<&'static str> {
    Some(match name {
        "v" | "V" => "Via",
        "f" | "F" => "From",
        "t" | "T" => "To",
        "i" | "I" => "Call-ID",
        "m" | "M" => "Contact",
        "l" | "L" => "Content-Length",
        "c" | "C" => "Content-Type",
        "e" | "E" => "Content-Encoding",
        "k" | "K" => "Supported",
        "s" | "S" => "Subject",
        "o" | "O" => "Event",
        "r" | "R" => "Refer-To",
        "x" | "X" => "Session-Expires",
        _ => return None,
    })
}

/// Index just past the blank line that ends the header section, if any.
fn header_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The header section rewritten into the form rsip parses: compact names expanded, folded lines
/// joined, and an unknown request method replaced by `OPTIONS` (returned as the second value).
fn normalize_head(head: &str) -> Result<(String, Option<String>), ParseError> {
    let mut out = String::with_capacity(head.len() + 64);
    let mut lines = head.split("\r\n");
    let start = lines.next().ok_or(ParseError::Incomplete)?;
    let mut unknown_method = None;
    if start.starts_with("SIP/") {
        out.push_str(start);
    } else {
        let (method, rest) = start.split_once(' ').ok_or_else(|| ParseError::Malformed("bad start line".into()))?;
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)) {
            return Err(ParseError::Malformed("bad method token".into()));
        }
        if method.parse::<Method>().is_err() || method.bytes().any(|b| b.is_ascii_lowercase()) {
            unknown_method = Some(method.to_string());
            out.push_str("OPTIONS ");
            out.push_str(rest);
        } else {
            out.push_str(start);
        }
    }
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // RFC 3261 7.3.1 line folding: a continuation belongs to the previous header.
            out.push(' ');
            out.push_str(line.trim_start());
            continue;
        }
        out.push_str("\r\n");
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ParseError::Malformed(format!("header line without colon: {}", truncate(line))))?;
        let name = name.trim_end();
        if name.is_empty() || name.contains(' ') {
            return Err(ParseError::Malformed("bad header name".into()));
        }
        out.push_str(expand_compact(name).unwrap_or(name));
        out.push_str(": ");
        out.push_str(value.trim_start());
    }
    out.push_str("\r\n\r\n");
    if out.contains('[') {
        out = BRACKETED_V6
            .replace_all(&out, |caps: &regex::Captures| match caps[1].parse::<Ipv6Addr>() {
                Ok(ip) => v6_host(ip),
                Err(_) => caps[0].to_string(),
            })
            .into_owned();
    }
    Ok((out, unknown_method))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The declared Content-Length of a header section, if present. Several Content-Length
/// headers must agree: a framer that took the first and a parser that took the last (or a
/// proxy in front that did either) would split the stream differently, which is how requests
/// are smuggled. Compact `l:` counts as Content-Length.
fn declared_length(head: &str) -> Result<Option<usize>, ParseError> {
    let mut declared = None;
    for line in head.split("\r\n") {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if name.eq_ignore_ascii_case("Content-Length") || name.eq_ignore_ascii_case("l") {
                let value = value.trim();
                // Digits only: `usize::from_str` would also take a leading `+`.
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ParseError::BadContentLength);
                }
                let value: usize = value.parse().map_err(|_| ParseError::BadContentLength)?;
                if declared.is_some_and(|d| d != value) {
                    return Err(ParseError::BadContentLength);
                }
                declared = Some(value);
            }
        }
    }
    Ok(declared)
}

/// Parses one message. `stream` says whether it came framed from TCP (Content-Length is then
/// mandatory and exact) or as a UDP datagram (a missing Content-Length means "the rest").
pub fn parse(bytes: &[u8], stream: bool) -> Result<Incoming, ParseError> {
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(ParseError::TooLarge(bytes.len()));
    }
    let end = header_end(bytes).ok_or(ParseError::Incomplete)?;
    let head = std::str::from_utf8(&bytes[..end - 4])
        .map_err(|_| ParseError::Malformed("header section is not UTF-8".into()))?;
    let (head, unknown_method) = normalize_head(head)?;
    let body = &bytes[end..];
    let body = match declared_length(&head)? {
        Some(declared) if declared > body.len() => return Err(ParseError::ShortBody { declared, actual: body.len() }),
        Some(declared) => &body[..declared],
        None if stream => return Err(ParseError::MissingHeader("Content-Length")),
        None => body,
    };
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    let message = SipMessage::try_from(raw.as_slice())
        .map_err(|e| ParseError::Malformed(truncate(&e.to_string()).to_string()))?;
    check_mandatory(&message)?;
    match (unknown_method, message) {
        (Some(method), SipMessage::Request(request)) => Ok(Incoming::UnknownMethod { method, request }),
        (_, message) => Ok(Incoming::Message(message)),
    }
}

/// RFC 3261 8.1.1: Via, From, To, Call-ID and CSeq must be present and parse; the upper layers
/// rely on it and never have to handle their absence.
fn check_mandatory(message: &SipMessage) -> Result<(), ParseError> {
    let via = message.via_header().map_err(|_| ParseError::MissingHeader("Via"))?;
    via.typed().map_err(|_| ParseError::MissingHeader("Via"))?;
    message
        .from_header()
        .map_err(|_| ParseError::MissingHeader("From"))?
        .typed()
        .map_err(|_| ParseError::MissingHeader("From"))?;
    message
        .to_header()
        .map_err(|_| ParseError::MissingHeader("To"))?
        .typed()
        .map_err(|_| ParseError::MissingHeader("To"))?;
    if message.call_id_header().map_err(|_| ParseError::MissingHeader("Call-ID"))?.value().trim().is_empty() {
        return Err(ParseError::MissingHeader("Call-ID"));
    }
    // Only the number is checked here: the method may be one rsip does not know (answered 501).
    let cseq = message.cseq_header().map_err(|_| ParseError::MissingHeader("CSeq"))?;
    let number = cseq.value().split_whitespace().next().and_then(|n| n.parse::<u32>().ok());
    if number.is_none() || cseq.value().split_whitespace().count() != 2 {
        return Err(ParseError::MissingHeader("CSeq"));
    }
    Ok(())
}

/// A `400 Bad Request` for bytes that did not parse, built from their raw header lines when
/// they are a request carrying the five headers a response needs (RFC 3261 8.2.6); `None` when
/// no response is possible (garbage, responses), in which case the message is dropped.
pub fn bad_request(bytes: &[u8], error: &ParseError) -> Option<Vec<u8>> {
    let end = header_end(bytes).unwrap_or(bytes.len().min(MAX_MESSAGE_SIZE));
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let start = lines.next()?;
    if start.starts_with("SIP/") || !start.ends_with("SIP/2.0") {
        return None;
    }
    let mut wanted: Vec<&str> = Vec::new();
    let mut seen = [false; 5];
    for line in lines {
        let Some((name, _)) = line.split_once(':') else { continue };
        let name = expand_compact(name.trim()).unwrap_or(name.trim());
        let slot = ["Via", "From", "To", "Call-ID", "CSeq"].iter().position(|h| h.eq_ignore_ascii_case(name));
        if let Some(slot) = slot {
            seen[slot] = true;
            wanted.push(line);
        }
    }
    if !seen.iter().all(|s| *s) {
        return None;
    }
    let reason: String = error.to_string().chars().filter(|c| !c.is_control()).take(120).collect();
    let mut out = String::from("SIP/2.0 400 Bad Request\r\n");
    for line in wanted {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!("Warning: 399 switchboard \"{}\"\r\nContent-Length: 0\r\n\r\n", reason.replace('"', "'")));
    Some(out.into_bytes())
}

/// Whether `bytes` are certainly not part of a dialog or transaction the node has, judged
/// without parsing: not a response, and no To header (`To`/`t`, folded or not) with a `tag`
/// parameter in the header section. Garbage counts as out of dialog. Used to drop scans from
/// unknown sources cheaply; anything this says `false` for is parsed and checked properly.
pub fn plainly_out_of_dialog(bytes: &[u8]) -> bool {
    if bytes.starts_with(b"SIP/") {
        return false;
    }
    let head = &bytes[..header_end(bytes).unwrap_or(bytes.len())];
    let mut in_to = false;
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            // A folded continuation belongs to the header before it.
        } else {
            in_to = line.iter().position(|b| *b == b':').is_some_and(|colon| {
                let name = line[..colon].trim_ascii();
                name.eq_ignore_ascii_case(b"To") || name.eq_ignore_ascii_case(b"t")
            });
        }
        if in_to && line.windows(4).any(|w| w.eq_ignore_ascii_case(b"tag=")) {
            return false;
        }
    }
    true
}

/// Result of looking for one message at the start of a stream buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet.
    Partial,
    /// Leading CRLFs (RFC 5626 keepalives) to discard.
    Keepalive(usize),
    /// A complete message occupies this many bytes.
    Complete(usize),
}

/// Finds the first message in a TCP receive buffer by its Content-Length (RFC 3261 18.3).
/// Stateless form of [`StreamFramer::next`] (it rescans the buffer from the start).
pub fn frame(buf: &[u8]) -> Result<Frame, ParseError> {
    StreamFramer::default().next(buf)
}

/// Frames messages on one stream. It remembers how far it has already searched the buffer for
/// the blank line, so a peer that trickles a large header one byte at a time costs linear
/// time, not a rescan of up to [`MAX_MESSAGE_SIZE`] bytes per read.
#[derive(Debug, Default)]
pub struct StreamFramer {
    /// No `\r\n\r\n` starts before this offset of the current message.
    searched: usize,
    /// The current message's size, once its header section has been read (so that a body
    /// arriving in pieces does not re-read the header each time).
    total: Option<usize>,
}

impl StreamFramer {
    /// Looks for one message at the start of `buf`. After `Keepalive(n)` or `Complete(n)` the
    /// caller removes those `n` bytes before the next call; after `Partial` it appends more.
    /// Every size is checked before any arithmetic: a declared length of `usize::MAX` is
    /// `TooLarge`, never an overflow that would frame the stream in the wrong place.
    pub fn next(&mut self, buf: &[u8]) -> Result<Frame, ParseError> {
        if let Some(total) = self.total {
            return Ok(if buf.len() >= total {
                *self = StreamFramer::default();
                Frame::Complete(total)
            } else {
                Frame::Partial
            });
        }
        let blank = buf.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
        if blank > 0 {
            self.searched = 0;
            return Ok(Frame::Keepalive(blank));
        }
        let from = self.searched.min(buf.len());
        let Some(end) = header_end(&buf[from..]).map(|e| e + from) else {
            // The blank line may straddle the end of what has arrived: keep its last 3 bytes.
            self.searched = buf.len().saturating_sub(3);
            return if buf.len() > MAX_MESSAGE_SIZE {
                Err(ParseError::TooLarge(buf.len()))
            } else {
                Ok(Frame::Partial)
            };
        };
        if end > MAX_MESSAGE_SIZE {
            return Err(ParseError::TooLarge(end));
        }
        let head = String::from_utf8_lossy(&buf[..end]);
        let length = declared_length(&head)?.ok_or(ParseError::MissingHeader("Content-Length"))?;
        let total = match end.checked_add(length) {
            Some(total) if total <= MAX_MESSAGE_SIZE => total,
            _ => return Err(ParseError::TooLarge(end.saturating_add(length))),
        };
        if buf.len() >= total {
            *self = StreamFramer::default();
            Ok(Frame::Complete(total))
        } else {
            self.total = Some(total);
            Ok(Frame::Partial)
        }
    }
}

/// Serializes a message. Unlike rsip's `Display`, the body is copied byte for byte.
pub fn encode(message: &SipMessage) -> Vec<u8> {
    let (head, body) = match message {
        SipMessage::Request(r) => (format!("{} {} {}\r\n{}\r\n", r.method, r.uri, r.version, r.headers), &r.body),
        SipMessage::Response(r) => (format!("{} {}\r\n{}\r\n", r.version, r.status_code, r.headers), &r.body),
    };
    let head = if head.contains(V6_SUFFIX) {
        V6_PLACEHOLDER
            .replace_all(&head, |caps: &regex::Captures| match host_ip(&caps[0]) {
                Some(ip) => format!("[{ip}]"),
                None => caps[0].to_string(),
            })
            .into_owned()
    } else {
        head
    };
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Replaces the body and sets Content-Length (and Content-Type when given) to match.
pub fn set_body(headers: &mut rsip::Headers, body_slot: &mut Vec<u8>, body: Vec<u8>, content_type: Option<&str>) {
    headers.retain(|h| !matches!(h, Header::ContentLength(_) | Header::ContentType(_)));
    if let Some(content_type) = content_type {
        headers.push(Header::ContentType(content_type.into()));
    }
    headers.push(Header::ContentLength(ContentLength::from(body.len() as u32)));
    *body_slot = body;
}

/// The value of the first header with this name (case-insensitive; for headers rsip keeps as
/// `Other`, and for typed ones through their display form).
pub fn header_value<'a>(headers: &'a rsip::Headers, name: &str) -> Option<Cow<'a, str>> {
    headers.iter().find_map(|h| match h {
        Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(Cow::Borrowed(v.as_str())),
        Header::Other(..) => None,
        other => {
            let text = other.to_string();
            let (n, v) = text.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| Cow::Owned(v.trim().to_string()))
        }
    })
}

/// SIP extensions (option tags, RFC 3261 19.2) this node implements as a UAS: reliable
/// provisional responses (`100rel`, RFC 3262, `sip/control/reliable.rs`). It refreshes no
/// sessions yet (`timer`, RFC 4028), so a request that requires that is refused with 420.
pub const SUPPORTED_EXTENSIONS: &[&str] = &["100rel"];

/// The option tags in the request's `Require` headers that this node does not implement, in
/// the order given (RFC 3261 8.2.2.3: such a request is refused with `420 Bad Extension`
/// listing them in `Unsupported`, rather than served as if they were understood).
pub fn unsupported_requirements(headers: &rsip::Headers) -> Vec<String> {
    let mut unsupported: Vec<String> = Vec::new();
    for header in headers.iter() {
        let text = match header {
            Header::Require(value) => value.value().to_string(),
            Header::Other(name, value) if name.eq_ignore_ascii_case("Require") => value.clone(),
            _ => continue,
        };
        for tag in text.split(',').map(str::trim).filter(|tag| !tag.is_empty()) {
            let known = SUPPORTED_EXTENSIONS.iter().any(|s| s.eq_ignore_ascii_case(tag));
            if !known && !unsupported.iter().any(|u| u.eq_ignore_ascii_case(tag)) {
                unsupported.push(tag.to_string());
            }
        }
    }
    unsupported
}

/// Call-ID of a message that passed [`parse`] (empty for hand-built messages without one).
pub fn call_id(message: &impl HeadersExt) -> String {
    message.call_id_header().map(|h| h.value().to_string()).unwrap_or_default()
}

/// CSeq number and method.
pub fn cseq(message: &impl HeadersExt) -> Option<(u32, Method)> {
    let cseq = message.cseq_header().ok()?;
    Some((cseq.seq().ok()?, cseq.method().ok()?))
}

/// The tag of the To header, if any.
pub fn to_tag(message: &impl HeadersExt) -> Option<String> {
    message.to_header().ok()?.tag().ok().flatten().map(|t| t.value().to_string())
}

/// The tag of the From header, if any.
pub fn from_tag(message: &impl HeadersExt) -> Option<String> {
    message.from_header().ok()?.tag().ok().flatten().map(|t| t.value().to_string())
}

/// The user part of the To URI (the dialled number of an INVITE from a carrier, which may put
/// it there rather than in the Request-URI).
pub fn to_user(message: &impl HeadersExt) -> Option<String> {
    message.to_header().ok()?.uri().ok()?.user().map(str::to_string)
}

/// The user part of the From URI (the caller's number).
pub fn from_user(message: &impl HeadersExt) -> Option<String> {
    message.from_header().ok()?.uri().ok()?.user().map(str::to_string)
}

/// Max-Forwards of a request; absent means the RFC 3261 default of 70.
pub fn max_forwards(request: &Request) -> u32 {
    request.max_forwards_header().ok().and_then(|h| h.num().ok()).unwrap_or(70)
}

/// The status code number of a response.
pub fn status(response: &Response) -> u16 {
    response.status_code.code()
}

/// Normalizes a dialled string to E.164 when it is a plausible phone number: keeps a leading
/// `+` and digits, accepts a bare 10-digit NANP number or 11 digits starting with 1.
pub fn normalize_number(user: &str) -> Option<String> {
    let user = user.split(';').next().unwrap_or(user);
    let digits: String = user.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    if user.starts_with('+') {
        return Some(format!("+{digits}"));
    }
    match digits.len() {
        10 => Some(format!("+1{digits}")),
        11 if digits.starts_with('1') => Some(format!("+{digits}")),
        _ => Some(format!("+{digits}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:+15551234567@10.0.0.1 SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
t: <sip:+15551234567@10.0.0.1>\r\n\
f: \"Alice\" <sip:+15557654321@10.0.0.2>;tag=1928301774\r\n\
i: a84b4c76e66710\r\n\
CSeq: 314159 INVITE\r\n\
m: <sip:alice@10.0.0.2>\r\n\
Subject: a\r\n folded\r\n\
c: application/sdp\r\n\
l: 4\r\n\r\nv=0\r\nEXTRA";

    fn message(bytes: &[u8], stream: bool) -> SipMessage {
        match parse(bytes, stream).unwrap() {
            Incoming::Message(m) => m,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn compact_headers_folding_and_datagram_truncation() {
        let SipMessage::Request(request) = message(INVITE.as_bytes(), false) else { panic!() };
        assert_eq!(request.method, Method::Invite);
        assert_eq!(call_id(&request), "a84b4c76e66710");
        assert_eq!(from_tag(&request).as_deref(), Some("1928301774"));
        assert_eq!(to_tag(&request), None);
        assert_eq!(to_user(&request).as_deref(), Some("+15551234567"));
        assert_eq!(cseq(&request), Some((314159, Method::Invite)));
        assert_eq!(request.body, b"v=0\r");
        assert_eq!(header_value(&request.headers, "subject").as_deref(), Some("a folded"));
    }

    #[test]
    fn short_body_and_missing_length_on_streams_are_errors() {
        let short = INVITE.replace("l: 4", "l: 400");
        assert!(matches!(parse(short.as_bytes(), false), Err(ParseError::ShortBody { declared: 400, .. })));
        let none = INVITE.replace("l: 4\r\n", "");
        assert!(parse(none.as_bytes(), false).is_ok());
        assert_eq!(parse(none.as_bytes(), true).unwrap_err(), ParseError::MissingHeader("Content-Length"));
    }

    #[test]
    fn missing_mandatory_headers_are_named() {
        let no_call_id = INVITE.replace("i: a84b4c76e66710\r\n", "");
        assert_eq!(parse(no_call_id.as_bytes(), false).unwrap_err(), ParseError::MissingHeader("Call-ID"));
        let no_via = INVITE.replace("v: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776asdhds\r\n", "");
        assert_eq!(parse(no_via.as_bytes(), false).unwrap_err(), ParseError::MissingHeader("Via"));
    }

    #[test]
    fn required_extensions_the_node_lacks_are_listed_once_in_order() {
        let bytes = b"INVITE sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK1\r\n\
            From: <sip:b@127.0.0.1>;tag=1\r\nTo: <sip:a@127.0.0.1>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
            Require: 100rel, timer\r\nrequire: ,TIMER,\r\nRequire: foo\r\nSupported: replaces\r\nContent-Length: 0\r\n\r\n";
        let Ok(Incoming::Message(rsip::SipMessage::Request(request))) = parse(bytes, false) else { panic!("parses") };
        assert_eq!(unsupported_requirements(&request.headers), ["timer", "foo"], "100rel is served (RFC 3262)");
        let plain = b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK2\r\n\
            From: <sip:b@127.0.0.1>;tag=1\r\nTo: <sip:a@127.0.0.1>\r\nCall-ID: d\r\nCSeq: 1 OPTIONS\r\n\
            Proxy-Require: foo\r\nSupported: 100rel\r\nContent-Length: 0\r\n\r\n";
        let Ok(Incoming::Message(rsip::SipMessage::Request(request))) = parse(plain, false) else { panic!("parses") };
        assert!(unsupported_requirements(&request.headers).is_empty(), "Proxy-Require is for proxies");
    }

    #[test]
    fn unknown_methods_keep_their_headers_for_a_501() {
        let text = INVITE.replace("INVITE sip:", "FROBNICATE sip:").replace("314159 INVITE", "314159 FROBNICATE");
        match parse(text.as_bytes(), false).unwrap() {
            Incoming::UnknownMethod { method, request } => {
                assert_eq!(method, "FROBNICATE");
                assert_eq!(call_id(&request), "a84b4c76e66710");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_never_panics() {
        let inputs: [&[u8]; 8] = [
            b"",
            b"\r\n\r\n",
            b"\xff\xfe\x00\x01\r\n\r\n",
            b"INVITE\r\n\r\n",
            b"SIP/2.0 abc\r\n\r\n",
            b"INVITE sip:a SIP/2.0\r\nVia\r\n\r\n",
            b"INVITE sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n",
            b"SIP/2.0 200 OK\r\nl: 99999999999999999999\r\n\r\n",
        ];
        for input in inputs {
            assert!(parse(input, false).is_err(), "{input:?}");
        }
        let big = vec![b'a'; MAX_MESSAGE_SIZE + 1];
        assert_eq!(parse(&big, false).unwrap_err(), ParseError::TooLarge(MAX_MESSAGE_SIZE + 1));
    }

    #[test]
    fn bad_requests_get_a_400_when_answerable() {
        let broken = INVITE.replace("CSeq: 314159 INVITE", "CSeq: nonsense INVITE");
        let error = parse(broken.as_bytes(), false).unwrap_err();
        let answer = String::from_utf8(bad_request(broken.as_bytes(), &error).unwrap()).unwrap();
        assert!(answer.starts_with("SIP/2.0 400 Bad Request\r\n"), "{answer}");
        assert!(answer.contains("i: a84b4c76e66710"));
        assert!(bad_request(b"\x01\x02garbage", &error).is_none());
    }

    #[test]
    fn framing_by_content_length() {
        let one = INVITE.replace("EXTRA", "").replace("l: 4", "l: 5");
        let mut buf = b"\r\n\r\n".to_vec();
        buf.extend_from_slice(one.as_bytes());
        assert_eq!(frame(&buf).unwrap(), Frame::Keepalive(4));
        let buf = &buf[4..];
        assert_eq!(frame(&buf[..20]).unwrap(), Frame::Partial);
        assert_eq!(frame(&buf[..buf.len() - 1]).unwrap(), Frame::Partial);
        assert_eq!(frame(buf).unwrap(), Frame::Complete(buf.len()));
    }

    /// Issue 19 item 2: a Content-Length of `u64::MAX` overflowed `end + length` (a panic in a
    /// debug build, a wrapped total that framed the next request from the middle of the stream
    /// in a release build). It is now too large, like any length past the limit.
    #[test]
    fn huge_content_lengths_are_too_large_not_an_overflow() {
        let head = "OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: 18446744073709551615\r\n\r\n";
        let buf = format!("{head}abcOPTIONS sip:a@127.0.0.1 SIP/2.0\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(frame(buf.as_bytes()), Err(ParseError::TooLarge(_))));
        for length in ["65535", "9223372036854775807", "18446744073709551614"] {
            let text = head.replace("18446744073709551615", length);
            assert!(matches!(frame(text.as_bytes()), Err(ParseError::TooLarge(_))), "{length}");
        }
        // One past usize: not a number at all.
        let text = head.replace("18446744073709551615", "18446744073709551616");
        assert_eq!(frame(text.as_bytes()), Err(ParseError::BadContentLength));
        // The datagram parser refuses it too (declared longer than what arrived).
        assert!(parse(buf.as_bytes(), false).is_err());
    }

    #[test]
    fn content_lengths_that_disagree_or_are_not_digits_are_refused() {
        let two = "OPTIONS sip:a SIP/2.0\r\nContent-Length: 0\r\nl: 30\r\n\r\n";
        assert_eq!(frame(two.as_bytes()), Err(ParseError::BadContentLength));
        let same = "OPTIONS sip:a SIP/2.0\r\nContent-Length: 3\r\nl: 3\r\n\r\nabc";
        assert_eq!(frame(same.as_bytes()), Ok(Frame::Complete(same.len())));
        for bad in ["+3", "-1", "0x3", "3 3", ""] {
            let text = format!("OPTIONS sip:a SIP/2.0\r\nContent-Length: {bad}\r\n\r\nabc");
            assert_eq!(frame(text.as_bytes()), Err(ParseError::BadContentLength), "{bad:?}");
        }
        let dup = INVITE.replace("l: 4\r\n", "l: 4\r\nContent-Length: 5\r\n");
        assert_eq!(parse(dup.as_bytes(), false).unwrap_err(), ParseError::BadContentLength);
    }

    #[test]
    fn a_trickled_header_is_framed_once_it_is_complete_and_limits_hold() {
        let one = INVITE.replace("EXTRA", "").replace("l: 4", "l: 5");
        let mut framer = StreamFramer::default();
        for end in 1..one.len() {
            assert_eq!(framer.next(&one.as_bytes()[..end]), Ok(Frame::Partial), "{end}");
        }
        assert_eq!(framer.next(one.as_bytes()), Ok(Frame::Complete(one.len())));
        // Two messages, the second's body trickled after its header: framed the same way.
        let two = format!("{one}{one}");
        let mut framer = StreamFramer::default();
        assert_eq!(framer.next(two.as_bytes()), Ok(Frame::Complete(one.len())));
        let second = &two.as_bytes()[one.len()..];
        for end in 1..second.len() {
            assert_eq!(framer.next(&second[..end]), Ok(Frame::Partial), "{end}");
        }
        assert_eq!(framer.next(second), Ok(Frame::Complete(one.len())));
        // A header section that never ends is refused past the limit, however it arrives.
        let mut framer = StreamFramer::default();
        let mut endless = b"OPTIONS sip:a SIP/2.0\r\nX-Pad: ".to_vec();
        let mut result = Ok(Frame::Partial);
        while result == Ok(Frame::Partial) {
            endless.extend_from_slice(&[b'a'; 1000]);
            result = framer.next(&endless);
        }
        assert!(matches!(result, Err(ParseError::TooLarge(n)) if n > MAX_MESSAGE_SIZE));
        // A head that fits with a body that would not.
        let big = "OPTIONS sip:a SIP/2.0\r\nContent-Length: 65500\r\n\r\n";
        assert!(matches!(frame(big.as_bytes()), Err(ParseError::TooLarge(_))));
    }

    #[test]
    fn out_of_dialog_requests_are_told_without_parsing() {
        let request = INVITE.replace("EXTRA", "");
        assert!(plainly_out_of_dialog(request.as_bytes()));
        assert!(plainly_out_of_dialog(b"\x00\x01garbage"));
        assert!(plainly_out_of_dialog(b"OPTIONS sip:a SIP/2.0\r\nFrom: <sip:b>;tag=1\r\nTo: <sip:a>\r\n\r\n"));
        for in_dialog in [
            INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "t: <sip:+15551234567@10.0.0.1>;tag=abc"),
            INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "To: <sip:x@y>;TAG=abc"),
            INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "to : <sip:x@y>\r\n ;tag=folded"),
            "SIP/2.0 200 OK\r\n\r\n".to_string(),
        ] {
            assert!(!plainly_out_of_dialog(in_dialog.as_bytes()), "{in_dialog}");
            // Whatever the quick check lets through is decided on the parsed message.
        }
        // It never says "out of dialog" for what parses with a To tag.
        let tagged = INVITE.replace("t: <sip:+15551234567@10.0.0.1>", "t: <sip:+15551234567@10.0.0.1>;tag=abc");
        let Incoming::Message(SipMessage::Request(request)) = parse(tagged.as_bytes(), false).unwrap() else {
            panic!()
        };
        assert!(to_tag(&request).is_some());
    }

    #[test]
    fn encode_round_trips_binary_bodies() {
        let SipMessage::Request(mut request) = message(INVITE.as_bytes(), false) else { panic!() };
        set_body(&mut request.headers, &mut request.body, vec![0, 159, 255, 10], Some("application/octet-stream"));
        let bytes = encode(&SipMessage::Request(request));
        let SipMessage::Request(back) = message(&bytes, true) else { panic!() };
        assert_eq!(back.body, vec![0, 159, 255, 10]);
    }

    #[test]
    fn ipv6_references_survive_parse_and_encode() {
        let text = "OPTIONS sip:+15550001111@[2001:db8::1]:5070 SIP/2.0\r\nVia: SIP/2.0/UDP [::1]:9;branch=z9hG4bKx\r\n\
From: <sip:a@[::ffff:192.0.2.1]>;tag=1\r\nTo: <sip:b@[::1]>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
        let Incoming::Message(SipMessage::Request(request)) = parse(text.as_bytes(), false).unwrap() else { panic!() };
        assert_eq!(host_ip(&request.uri.host().to_string()), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(request.uri.port().map(|p| *p.value()), Some(5070));
        let wire = String::from_utf8(encode(&SipMessage::Request(request))).unwrap();
        assert!(wire.starts_with("OPTIONS sip:+15550001111@[2001:db8::1]:5070 SIP/2.0\r\n"), "{wire}");
        assert!(wire.contains("Via: SIP/2.0/UDP [::1]:9;branch=z9hG4bKx"), "{wire}");
        assert!(wire.contains("<sip:a@[::ffff:192.0.2.1]>"), "{wire}");
        assert_eq!(host_ip("192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(host_ip("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(host_ip("example.com"), None);
    }

    #[test]
    fn numbers_normalize_to_e164() {
        assert_eq!(normalize_number("+15551234567").as_deref(), Some("+15551234567"));
        assert_eq!(normalize_number("5551234567").as_deref(), Some("+15551234567"));
        assert_eq!(normalize_number("15551234567;npdi").as_deref(), Some("+15551234567"));
        assert_eq!(normalize_number("alice"), None);
    }
}

/// Why the node ends a dialog, as RFC 3326 carries it in the BYE it sends: a Q.850 cause and a
/// short text (the CDR's reason). Peers log it, and carriers' support can read it off a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HangupReason {
    /// Q.850 cause value.
    pub cause: u16,
    /// Human-readable text.
    pub text: String,
}

impl HangupReason {
    /// Normal call clearing (Q.850 16).
    pub fn normal(text: impl Into<String>) -> HangupReason {
        HangupReason { cause: 16, text: text.into() }
    }

    /// A timer ran out: no ACK, no media (Q.850 102, recovery on timer expiry).
    pub fn timer(text: impl Into<String>) -> HangupReason {
        HangupReason { cause: 102, text: text.into() }
    }

    /// The media cannot be agreed on (Q.850 88, incompatible destination; RFC 3398 maps 488 to it).
    pub fn incompatible(text: impl Into<String>) -> HangupReason {
        HangupReason { cause: 88, text: text.into() }
    }

    /// The `Reason` header: `Q.850;cause=N;text="..."`, the text stripped of what would break
    /// the quoted string and cut to 100 characters.
    pub fn header(&self) -> Header {
        let text: String =
            self.text.chars().filter(|c| !matches!(c, '"' | '\\') && !c.is_control()).take(100).collect();
        Header::Other("Reason".into(), format!("Q.850;cause={};text=\"{text}\"", self.cause))
    }
}

/// The `Reason` header(s) of a request, to pass on with the BYE relayed to the other leg.
pub fn reason_headers(request: &Request) -> Vec<Header> {
    request
        .headers
        .iter()
        .filter(|h| matches!(h, Header::Other(name, _) if name.eq_ignore_ascii_case("reason")))
        .cloned()
        .collect()
}

#[cfg(test)]
mod reason_tests {
    use super::*;

    #[test]
    fn reason_header_is_q850_with_a_safe_quoted_text() {
        let header = HangupReason::timer("media timeout: \"no\" RTP\r\nfor 30 s").header();
        assert_eq!(header.to_string(), "Reason: Q.850;cause=102;text=\"media timeout: no RTPfor 30 s\"");
        assert_eq!(HangupReason::normal("x").cause, 16);
        assert_eq!(HangupReason::incompatible("x").cause, 88);
    }

    #[test]
    fn reason_headers_are_found_whatever_their_case() {
        let text = "BYE sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\n\
                    From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: r\r\nCSeq: 2 BYE\r\n\
                    REASON: Q.850;cause=16\r\nContent-Length: 0\r\n\r\n";
        let Ok(Incoming::Message(SipMessage::Request(request))) = parse(text.as_bytes(), false) else {
            panic!("parse")
        };
        let found = reason_headers(&request);
        assert_eq!(found.len(), 1);
        assert!(found[0].to_string().ends_with("Q.850;cause=16"), "{}", found[0]);
    }
}
