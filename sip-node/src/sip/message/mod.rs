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
    parse_checked(bytes, stream).map(|(incoming, _)| incoming)
}

/// What [`check_mandatory`] parsed on the way, handed on so that no later layer parses it again:
/// rsip's typed Via and To parses cost about as much as the rest of the message. The transport
/// stamps requests through `top_via` (`received`, `rport`); the endpoint routes in-dialog
/// requests by `to_tag` (three To parses per call before, issue 22).
#[derive(Debug)]
pub struct Checked {
    /// The top Via, typed.
    pub top_via: rsip::typed::Via,
    /// The To tag, as [`to_tag`] would read it.
    pub to_tag: Option<String>,
}

/// [`parse`], also returning what the mandatory-header check parsed (see [`Checked`]).
pub fn parse_checked(bytes: &[u8], stream: bool) -> Result<(Incoming, Checked), ParseError> {
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
    let message = tokenize(&raw).map_err(|e| ParseError::Malformed(truncate(&e.to_string()).to_string()))?;
    let checked = check_mandatory(&message)?;
    let incoming = match (unknown_method, message) {
        (Some(method), SipMessage::Request(request)) => Incoming::UnknownMethod { method, request },
        (_, message) => Incoming::Message(message),
    };
    Ok((incoming, checked))
}

/// rsip's `SipMessage::try_from`, without its failed first try: it parses every message as a
/// response first, and for a request that try fails in the status line, where rsip formats the
/// whole message into its error text (1 % of the node's instructions per call, issue 22). A
/// message that does not start like a status line cannot be a response, so it goes straight to
/// the request parser; one that does is tried as a response and then, as rsip does, as a request.
fn tokenize(raw: &[u8]) -> Result<SipMessage, rsip::Error> {
    if raw.starts_with(b"SIP/")
        && let Ok(response) = Response::try_from(raw)
    {
        return Ok(SipMessage::Response(response));
    }
    Request::try_from(raw).map(SipMessage::Request)
}

/// RFC 3261 8.1.1: Via, From, To, Call-ID and CSeq must be present and parse; the upper layers
/// rely on it and never have to handle their absence. Returns what it parsed.
fn check_mandatory(message: &SipMessage) -> Result<Checked, ParseError> {
    let via = message.via_header().map_err(|_| ParseError::MissingHeader("Via"))?;
    let top_via = via.typed().map_err(|_| ParseError::MissingHeader("Via"))?;
    message
        .from_header()
        .map_err(|_| ParseError::MissingHeader("From"))?
        .typed()
        .map_err(|_| ParseError::MissingHeader("From"))?;
    let to = message
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
    Ok(Checked { top_via, to_tag: to.tag().map(|tag| tag.value().to_string()) })
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
    let (head, body) = encode::head_and_body(message);
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
/// `Other` as stored, trimmed for typed ones, as in their display form).
pub fn header_value<'a>(headers: &'a rsip::Headers, name: &str) -> Option<Cow<'a, str>> {
    headers.iter().find_map(|h| match h {
        Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(Cow::Borrowed(v.as_str())),
        Header::Other(..) => None,
        typed => {
            let (n, v) = name_and_value(typed);
            n.eq_ignore_ascii_case(name).then(|| Cow::Borrowed(v.trim()))
        }
    })
}

/// A header's name as rsip writes it, and its value, without formatting it (see [`encode`]).
pub fn name_and_value(header: &Header) -> (&str, &str) {
    encode::name_and_value(header)
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

mod encode;

#[cfg(test)]
mod tests;
