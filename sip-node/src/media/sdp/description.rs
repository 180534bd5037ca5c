//! The SDP text format (RFC 4566): a session description and its media sections, parsed
//! leniently and written back without losing what the node does not interpret.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};

use switchboard_model::Codec;

use super::{MAX_MEDIA_SECTIONS, MAX_SDP_LEN, MediaDirection, SdpError};

/// The address family of a connection address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrType {
    /// `IP4`.
    Ip4,
    /// `IP6`.
    Ip6,
}

impl AddrType {
    fn as_str(self) -> &'static str {
        match self {
            AddrType::Ip4 => "IP4",
            AddrType::Ip6 => "IP6",
        }
    }
}

/// A `c=` line (network type `IN` only): where a stream's media goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// IP4 or IP6.
    pub addr_type: AddrType,
    /// The address as written: usually an IP literal, in principle a host name, possibly with a
    /// multicast `/ttl` suffix.
    pub address: String,
}

impl Connection {
    /// A connection line for an IP address (the node's advertised address).
    pub fn from_ip(ip: IpAddr) -> Connection {
        let addr_type = if ip.is_ipv4() { AddrType::Ip4 } else { AddrType::Ip6 };
        Connection { addr_type, address: ip.to_string() }
    }

    /// The address as an IP, when it is a literal (the node does not resolve names in SDP).
    pub fn ip(&self) -> Option<IpAddr> {
        let literal = self.address.split('/').next().unwrap_or_default();
        literal.parse().ok()
    }

    /// Whether this is the RFC 2543 hold address (`0.0.0.0` or `::`): "do not send to me".
    pub fn is_hold(&self) -> bool {
        self.ip().is_some_and(|ip| ip.is_unspecified())
    }

    fn parse(value: &str, line: usize) -> Result<Connection, SdpError> {
        let mut fields = value.split_ascii_whitespace();
        let (Some(net), Some(addr_type), Some(address)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(syntax(line, "c= needs <nettype> <addrtype> <address>"));
        };
        if !net.eq_ignore_ascii_case("IN") {
            return Err(syntax(line, format!("network type {net:?} is not IN")));
        }
        let addr_type = parse_addr_type(addr_type, line)?;
        Ok(Connection { addr_type, address: address.to_string() })
    }
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IN {} {}", self.addr_type.as_str(), self.address)
    }
}

fn parse_addr_type(value: &str, line: usize) -> Result<AddrType, SdpError> {
    if value.eq_ignore_ascii_case("IP4") {
        Ok(AddrType::Ip4)
    } else if value.eq_ignore_ascii_case("IP6") {
        Ok(AddrType::Ip6)
    } else {
        Err(syntax(line, format!("address type {value:?} is not IP4 or IP6")))
    }
}

/// The `o=` line: identifies the session and, through its version, each new offer or answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The user name (`-` when none).
    pub username: String,
    /// The session id (kept as text: some equipment sends ids wider than 64 bits).
    pub session_id: String,
    /// The version, incremented by the sender whenever its SDP changes (RFC 3264 §8).
    pub session_version: u64,
    /// The originator's address.
    pub connection: Connection,
}

/// One `a=` line: `name` or `name:value`.
#[derive(Clone, PartialEq, Eq)]
pub struct Attribute {
    /// The attribute name, as written.
    pub name: String,
    /// The value after the first `:`, if any.
    pub value: Option<String>,
}

impl Attribute {
    /// A property attribute (`a=name`).
    pub fn flag(name: &str) -> Attribute {
        Attribute { name: name.to_string(), value: None }
    }

    /// A value attribute (`a=name:value`).
    pub fn value(name: &str, value: impl Into<String>) -> Attribute {
        Attribute { name: name.to_string(), value: Some(value.into()) }
    }

    fn parse(text: &str) -> Attribute {
        match text.split_once(':') {
            Some((name, value)) => Attribute { name: name.to_string(), value: Some(value.to_string()) },
            None => Attribute { name: text.to_string(), value: None },
        }
    }
}

impl fmt::Debug for Attribute {
    /// The value of an `a=crypto` line is an SRTP master key: left out, so that an SDP in a
    /// log line or a test failure does not hand out a call's keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = match &self.value {
            Some(_) if self.name.eq_ignore_ascii_case("crypto") => Some("<redacted>"),
            other => other.as_deref(),
        };
        f.debug_struct("Attribute").field("name", &self.name).field("value", &value).finish()
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{}:{}", self.name, value),
            None => f.write_str(&self.name),
        }
    }
}

/// An `a=rtpmap` entry: what a payload type means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpMap {
    /// The payload type number.
    pub payload_type: u8,
    /// The encoding name (`PCMU`, `telephone-event`, ...).
    pub encoding: String,
    /// The RTP clock rate in Hz.
    pub clock_rate: u32,
    /// The channel count, when given.
    pub channels: Option<u16>,
}

impl RtpMap {
    fn parse(value: &str) -> Option<RtpMap> {
        let (pt, rest) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
        let payload_type: u8 = pt.parse().ok().filter(|pt| *pt <= 127)?;
        let mut parts = rest.trim().split('/');
        let encoding = parts.next()?.to_string();
        let clock_rate = parts.next()?.trim().parse().ok()?;
        let channels = parts.next().and_then(|c| c.trim().parse().ok());
        Some(RtpMap { payload_type, encoding, clock_rate, channels })
    }

    /// The codec this entry names, if the node knows it (8 kHz only).
    pub fn codec(&self) -> Option<Codec> {
        if self.clock_rate != 8000 {
            return None;
        }
        codec_by_name(&self.encoding)
    }
}

fn codec_by_name(name: &str) -> Option<Codec> {
    if name.eq_ignore_ascii_case("PCMU") {
        Some(Codec::Pcmu)
    } else if name.eq_ignore_ascii_case("PCMA") {
        Some(Codec::Pcma)
    } else if name.eq_ignore_ascii_case("telephone-event") {
        Some(Codec::TelephoneEvent)
    } else {
        None
    }
}

/// The static payload type of an audio codec (RFC 3551), `None` for dynamic ones.
pub fn static_payload_type(codec: Codec) -> Option<u8> {
    match codec {
        Codec::Pcmu => Some(0),
        Codec::Pcma => Some(8),
        Codec::TelephoneEvent => None,
    }
}

/// One `m=` section and the lines under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// `audio`, `video`, `image`, ...
    pub media: String,
    /// The transport port; 0 means the stream is rejected or disabled.
    pub port: u16,
    /// The `/<count>` after the port, if any.
    pub port_count: Option<u16>,
    /// `RTP/AVP`, `RTP/SAVP`, `udptl`, ...
    pub protocol: String,
    /// The formats (payload type numbers for RTP), in preference order.
    pub formats: Vec<String>,
    /// Media-level `c=`, overriding the session level.
    pub connection: Option<Connection>,
    /// `b=` lines, raw.
    pub bandwidth: Vec<String>,
    /// `a=` lines, in order.
    pub attributes: Vec<Attribute>,
}

impl MediaDescription {
    /// Whether this is an audio stream over RTP that the relay can carry: plain RTP, or SRTP
    /// (`RTP/SAVP`, which the leg's SRTP policy then accepts or refuses).
    pub fn is_rtp_audio(&self) -> bool {
        self.media.eq_ignore_ascii_case("audio")
            && ["RTP/AVP", "RTP/AVPF", "RTP/SAVP"].iter().any(|p| self.protocol.eq_ignore_ascii_case(p))
    }

    /// The payload types listed in the m= line, in order (formats that are not numbers in
    /// 0..=127 are skipped).
    pub fn payload_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.formats.iter().filter_map(|f| f.parse::<u8>().ok()).filter(|pt| *pt <= 127)
    }

    /// The first attribute with this name (case-insensitive).
    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name.eq_ignore_ascii_case(name))
    }

    /// The rtpmap of a payload type, if the SDP has one.
    pub fn rtpmap(&self, payload_type: u8) -> Option<RtpMap> {
        self.attributes
            .iter()
            .filter(|a| a.name.eq_ignore_ascii_case("rtpmap"))
            .filter_map(|a| a.value.as_deref().and_then(RtpMap::parse))
            .find(|m| m.payload_type == payload_type)
    }

    /// The fmtp parameters of a payload type.
    pub fn fmtp(&self, payload_type: u8) -> Option<&str> {
        self.attributes.iter().filter(|a| a.name.eq_ignore_ascii_case("fmtp")).find_map(|a| {
            let value = a.value.as_deref()?.trim();
            let (pt, params) = value.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((value, ""));
            (pt.parse::<u8>().ok() == Some(payload_type)).then_some(params.trim())
        })
    }

    /// What a payload type carries: the rtpmap when present, else the static assignment
    /// (0 = PCMU, 8 = PCMA), which carriers often leave without an rtpmap.
    pub fn codec_of(&self, payload_type: u8) -> Option<Codec> {
        match self.rtpmap(payload_type) {
            Some(map) => map.codec(),
            None => match payload_type {
                0 => Some(Codec::Pcmu),
                8 => Some(Codec::Pcma),
                _ => None,
            },
        }
    }

    /// `a=ptime`, in milliseconds.
    pub fn ptime(&self) -> Option<u32> {
        self.attribute("ptime").and_then(|a| a.value.as_deref()).and_then(|v| v.trim().parse().ok())
    }

    /// `a=maxptime`, in milliseconds.
    #[cfg_attr(not(test), allow(dead_code, reason = "parsed for the tests; the node does not use it yet"))]
    pub fn maxptime(&self) -> Option<u32> {
        self.attribute("maxptime").and_then(|a| a.value.as_deref()).and_then(|v| v.trim().parse().ok())
    }

    /// The direction attribute of this section, if any.
    pub fn direction(&self) -> Option<MediaDirection> {
        self.attributes.iter().filter(|a| a.value.is_none()).find_map(|a| MediaDirection::from_attribute(&a.name))
    }

    /// `a=rtcp` (RFC 3605): the RTCP port and, optionally, address, when not RTP port + 1.
    pub fn rtcp(&self) -> Option<(u16, Option<Connection>)> {
        let value = self.attribute("rtcp")?.value.as_deref()?.trim();
        let (port, rest) = value.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((value, ""));
        let port = port.parse().ok()?;
        let connection = if rest.trim().is_empty() { None } else { Connection::parse(rest, 0).ok() };
        Some((port, connection))
    }

    fn write(&self, out: &mut String) {
        let _ = write!(out, "m={} {}", self.media, self.port);
        if let Some(count) = self.port_count {
            let _ = write!(out, "/{count}");
        }
        let _ = write!(out, " {}", self.protocol);
        for format in &self.formats {
            let _ = write!(out, " {format}");
        }
        out.push_str("\r\n");
        if let Some(c) = &self.connection {
            let _ = write!(out, "c={c}\r\n");
        }
        for b in &self.bandwidth {
            let _ = write!(out, "b={b}\r\n");
        }
        for a in &self.attributes {
            let _ = write!(out, "a={a}\r\n");
        }
    }
}

/// A whole SDP body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// `o=`.
    pub origin: Origin,
    /// `s=` (a single space or `-` when the sender has nothing to say).
    pub session_name: String,
    /// Session-level `i=`, `u=`, `e=`, `p=` lines, raw, in order.
    pub info: Vec<(char, String)>,
    /// Session-level `c=`.
    pub connection: Option<Connection>,
    /// Session-level `b=` lines, raw.
    pub bandwidth: Vec<String>,
    /// `t=` (and `r=`, `z=`, `k=`) lines, raw, in order; `t=0 0` is written when empty.
    pub timing: Vec<(char, String)>,
    /// Session-level `a=` lines.
    pub attributes: Vec<Attribute>,
    /// The media sections, in order.
    pub media: Vec<MediaDescription>,
}

fn syntax(line: usize, reason: impl Into<String>) -> SdpError {
    SdpError::Syntax { line, reason: reason.into() }
}

impl SessionDescription {
    /// Parses a body as received in a SIP message.
    pub fn parse_bytes(body: &[u8]) -> Result<SessionDescription, SdpError> {
        if body.len() > MAX_SDP_LEN {
            return Err(SdpError::TooLarge(body.len()));
        }
        let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
        SessionDescription::parse(text)
    }

    /// Parses SDP text. Lines end with CRLF or LF; blank lines are skipped; unknown line types
    /// are ignored (RFC 4566 §5); attributes the node does not interpret are kept.
    pub fn parse(text: &str) -> Result<SessionDescription, SdpError> {
        if text.len() > MAX_SDP_LEN {
            return Err(SdpError::TooLarge(text.len()));
        }
        let mut origin = None;
        let mut session_name = None;
        let mut saw_version = false;
        let mut sdp = SessionDescription {
            origin: Origin {
                username: "-".into(),
                session_id: "0".into(),
                session_version: 0,
                connection: Connection::from_ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            },
            session_name: String::new(),
            info: vec![],
            connection: None,
            bandwidth: vec![],
            timing: vec![],
            attributes: vec![],
            media: vec![],
        };
        for (index, raw) in text.split('\n').enumerate() {
            let number = index + 1;
            // Only SP and HTAB are trimmed: the fields split on ASCII whitespace, and a wider
            // (Unicode) trim took a trailing vertical tab that the split had kept in a field, so
            // that what the node wrote back did not parse again (found by the sdp fuzz target).
            // Only SP and HTAB are trimmed: the fields split on ASCII whitespace, and a wider
            // (Unicode) trim took a trailing vertical tab that the split had kept in a field, so
            // that what the node wrote back did not parse again (found by the sdp fuzz target).
            let line = raw.strip_suffix('\r').unwrap_or(raw).trim_end_matches([' ', '\t']);
            if line.is_empty() {
                continue;
            }
            let bytes = line.as_bytes();
            if bytes.len() < 2 || bytes[1] != b'=' || !bytes[0].is_ascii_alphabetic() {
                return Err(syntax(number, "not a <type>=<value> line"));
            }
            let kind = bytes[0].to_ascii_lowercase() as char;
            let value = &line[2..];
            if !saw_version {
                if kind != 'v' {
                    return Err(SdpError::Missing('v'));
                }
                if value.trim() != "0" {
                    return Err(syntax(number, format!("unsupported version {value:?}")));
                }
                saw_version = true;
                continue;
            }
            if kind == 'm' {
                if sdp.media.len() >= MAX_MEDIA_SECTIONS {
                    return Err(SdpError::TooManyMedia);
                }
                sdp.media.push(parse_media_line(value, number)?);
                continue;
            }
            if let Some(media) = sdp.media.last_mut() {
                match kind {
                    'c' => media.connection = Some(Connection::parse(value, number)?),
                    'b' => media.bandwidth.push(value.to_string()),
                    'a' => media.attributes.push(Attribute::parse(value)),
                    _ => {} // i=, k= and unknown types at media level are not needed
                }
                continue;
            }
            match kind {
                'o' => origin = Some(parse_origin(value, number)?),
                's' => session_name = Some(value.to_string()),
                'i' | 'u' | 'e' | 'p' => sdp.info.push((kind, value.to_string())),
                'c' => sdp.connection = Some(Connection::parse(value, number)?),
                'b' => sdp.bandwidth.push(value.to_string()),
                't' | 'r' | 'z' | 'k' => sdp.timing.push((kind, value.to_string())),
                'a' => sdp.attributes.push(Attribute::parse(value)),
                'v' => return Err(syntax(number, "a second v= line")),
                _ => {}
            }
        }
        if !saw_version {
            return Err(SdpError::Missing('v'));
        }
        sdp.origin = origin.ok_or(SdpError::Missing('o'))?;
        sdp.session_name = session_name.unwrap_or_else(|| "-".into());
        Ok(sdp)
    }

    /// The session-level direction attribute, if any.
    pub fn direction(&self) -> Option<MediaDirection> {
        self.attributes.iter().filter(|a| a.value.is_none()).find_map(|a| MediaDirection::from_attribute(&a.name))
    }

    /// The connection of a media section: its own, else the session's.
    pub fn connection_of<'a>(&'a self, media: &'a MediaDescription) -> Option<&'a Connection> {
        media.connection.as_ref().or(self.connection.as_ref())
    }

    /// The direction a media section declares: its own attribute, else the session's, else
    /// sendrecv (RFC 3264 §5.1).
    pub fn direction_of(&self, media: &MediaDescription) -> MediaDirection {
        media.direction().or(self.direction()).unwrap_or_default()
    }

    /// The index of the first active (non-zero port) RTP audio section.
    pub fn audio_index(&self) -> Option<usize> {
        self.media.iter().position(|m| m.port != 0 && m.is_rtp_audio())
    }

    /// The body as sent in a SIP message (CRLF line endings).
    #[cfg_attr(not(test), allow(dead_code, reason = "the tests and the sdp fuzz target; the node writes with Display"))]
    pub fn to_sdp_string(&self) -> String {
        self.to_string()
    }
}

fn parse_origin(value: &str, line: usize) -> Result<Origin, SdpError> {
    let fields: Vec<&str> = value.split_ascii_whitespace().collect();
    if fields.len() != 6 {
        return Err(syntax(line, "o= needs 6 fields"));
    }
    let session_version = fields[2].parse().map_err(|_| syntax(line, "o= version is not a number"))?;
    if !fields[3].eq_ignore_ascii_case("IN") {
        return Err(syntax(line, "o= network type is not IN"));
    }
    let addr_type = parse_addr_type(fields[4], line)?;
    Ok(Origin {
        username: fields[0].to_string(),
        session_id: fields[1].to_string(),
        session_version,
        connection: Connection { addr_type, address: fields[5].to_string() },
    })
}

fn parse_media_line(value: &str, line: usize) -> Result<MediaDescription, SdpError> {
    let mut fields = value.split_ascii_whitespace();
    let (Some(media), Some(port), Some(protocol)) = (fields.next(), fields.next(), fields.next()) else {
        return Err(syntax(line, "m= needs <media> <port> <proto> <fmt>..."));
    };
    let (port, port_count) = match port.split_once('/') {
        Some((port, count)) => (port, Some(count.parse().map_err(|_| syntax(line, "bad port count in m="))?)),
        None => (port, None),
    };
    let port = port.parse().map_err(|_| syntax(line, format!("bad port {port:?} in m=")))?;
    Ok(MediaDescription {
        media: media.to_string(),
        port,
        port_count,
        protocol: protocol.to_string(),
        formats: fields.map(str::to_string).collect(),
        connection: None,
        bandwidth: vec![],
        attributes: vec![],
    })
}

impl fmt::Display for SessionDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(512);
        let o = &self.origin;
        let _ = write!(
            out,
            "v=0\r\no={} {} {} {}\r\ns={}\r\n",
            o.username,
            o.session_id,
            o.session_version,
            o.connection,
            if self.session_name.is_empty() { "-" } else { &self.session_name }
        );
        for (kind, value) in &self.info {
            let _ = write!(out, "{kind}={value}\r\n");
        }
        if let Some(c) = &self.connection {
            let _ = write!(out, "c={c}\r\n");
        }
        for b in &self.bandwidth {
            let _ = write!(out, "b={b}\r\n");
        }
        if self.timing.iter().all(|(kind, _)| *kind != 't') {
            out.push_str("t=0 0\r\n");
        }
        for (kind, value) in &self.timing {
            let _ = write!(out, "{kind}={value}\r\n");
        }
        for a in &self.attributes {
            let _ = write!(out, "a={a}\r\n");
        }
        for m in &self.media {
            m.write(&mut out);
        }
        f.write_str(&out)
    }
}
