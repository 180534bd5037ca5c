//! SDP (RFC 4566) for audio calls, and the offer/answer model (RFC 3264) the node uses to anchor
//! media: every SDP that leaves the node carries the node's own address and an RTP port from
//! its range, so that RTP flows through the relay.
//!
//! Why a parser of our own rather than a crate: the maintained crates are built for WebRTC.
//! `sdp` (webrtc-rs) parses with a strict line-order state machine and refuses transport tokens
//! outside its list, and `webrtc-sdp` (Mozilla, MPL-2.0) validates for JSEP; carrier equipment
//! sends plain RTP/AVP SDP that is occasionally out of order or carries vendor attributes
//! (`a=X-nat`, `a=silenceSupp`, `a=maxptime`). The node needs a dozen lines of the format; this
//! parser keeps every line it does not interpret (attributes, bandwidth, timing) so that a
//! parse/serialise round trip loses nothing, bounds the size of what it reads, and never panics
//! on input from the network.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use switchboard_model::Codec;

/// Largest SDP body accepted: far beyond any audio offer, small enough to bound the work a
/// hostile peer can cause.
pub const MAX_SDP_LEN: usize = 64 * 1024;
/// Most media sections accepted in one body.
pub const MAX_MEDIA_SECTIONS: usize = 32;
/// The dynamic payload type the node offers for `telephone-event` (the common choice).
pub const TELEPHONE_EVENT_PT: u8 = 101;
/// The packet time the node sends and asks for, in milliseconds (one 160-byte G.711 frame).
pub const DEFAULT_PTIME: u32 = 20;

/// Why an SDP body could not be used. [`SdpError::sip_status`] says which SIP response fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// The body is not UTF-8 text.
    #[error("the SDP body is not UTF-8 text")]
    NotUtf8,
    /// The body is larger than [`MAX_SDP_LEN`].
    #[error("the SDP body has {0} bytes, more than the {MAX_SDP_LEN} accepted")]
    TooLarge(usize),
    /// More media sections than [`MAX_MEDIA_SECTIONS`].
    #[error("the SDP body has more than {MAX_MEDIA_SECTIONS} media sections")]
    TooManyMedia,
    /// A line that does not follow the grammar.
    #[error("SDP line {line}: {reason}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A mandatory line is missing.
    #[error("the SDP body has no {0}= line")]
    Missing(char),
    /// No audio stream that the node can relay (plain RTP/AVP with a non-zero port).
    #[error("the SDP offers no usable audio stream (RTP/AVP)")]
    NoAudio,
    /// Audio is offered, but none of its codecs is allowed on this trunk.
    #[error("no common codec: the SDP offers {offered}, the trunk allows {allowed}")]
    NoCommonCodec {
        /// The offered formats, as written in the SDP.
        offered: String,
        /// The codecs the trunk allows.
        allowed: String,
    },
    /// The audio stream has no connection address (no c= line at either level).
    #[error("the audio stream has no connection address")]
    NoConnection,
    /// The answer does not match the offer (RFC 3264 §6: same media sections in the same order).
    #[error("the answer does not match the offer: {0}")]
    AnswerMismatch(String),
    /// The answerer rejected the audio stream (port 0).
    #[error("the answer rejected the audio stream")]
    AudioRejected,
}

impl SdpError {
    /// The SIP status code to answer an offer that failed this way: 488 Not Acceptable Here
    /// when the SDP is well formed but the media cannot be agreed on, 400 when the body itself
    /// is broken.
    pub fn sip_status(&self) -> u16 {
        match self {
            SdpError::NoAudio
            | SdpError::NoCommonCodec { .. }
            | SdpError::NoConnection
            | SdpError::AnswerMismatch(_)
            | SdpError::AudioRejected => 488,
            _ => 400,
        }
    }
}

/// Whether a side sends and/or receives media on a stream (RFC 3264 §5.1, §8.4). Holding a call
/// is a re-INVITE that changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MediaDirection {
    /// Both ways (the default when no attribute is present).
    #[default]
    SendRecv,
    /// The side only sends (it puts the other side on hold).
    SendOnly,
    /// The side only receives.
    RecvOnly,
    /// Neither way.
    Inactive,
}

impl MediaDirection {
    /// The attribute name.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaDirection::SendRecv => "sendrecv",
            MediaDirection::SendOnly => "sendonly",
            MediaDirection::RecvOnly => "recvonly",
            MediaDirection::Inactive => "inactive",
        }
    }

    /// Parses an attribute name; `None` for any other attribute.
    pub fn from_attribute(name: &str) -> Option<MediaDirection> {
        match name.to_ascii_lowercase().as_str() {
            "sendrecv" => Some(MediaDirection::SendRecv),
            "sendonly" => Some(MediaDirection::SendOnly),
            "recvonly" => Some(MediaDirection::RecvOnly),
            "inactive" => Some(MediaDirection::Inactive),
            _ => None,
        }
    }

    /// Built from the two capabilities.
    pub fn from_flags(sends: bool, receives: bool) -> MediaDirection {
        match (sends, receives) {
            (true, true) => MediaDirection::SendRecv,
            (true, false) => MediaDirection::SendOnly,
            (false, true) => MediaDirection::RecvOnly,
            (false, false) => MediaDirection::Inactive,
        }
    }

    /// Whether this side sends media.
    pub fn sends(self) -> bool {
        matches!(self, MediaDirection::SendRecv | MediaDirection::SendOnly)
    }

    /// Whether this side receives media.
    pub fn receives(self) -> bool {
        matches!(self, MediaDirection::SendRecv | MediaDirection::RecvOnly)
    }

    /// The same stream seen from the other side: what one side sends the other receives. The
    /// answer to a `sendonly` offer is `recvonly`, to `inactive` is `inactive` (RFC 3264 §6.1).
    pub fn reverse(self) -> MediaDirection {
        MediaDirection::from_flags(self.receives(), self.sends())
    }

    /// What both allow: used when the node itself wants less than the peer offers (a hold
    /// relayed from the other leg).
    pub fn intersect(self, other: MediaDirection) -> MediaDirection {
        MediaDirection::from_flags(self.sends() && other.sends(), self.receives() && other.receives())
    }
}

impl fmt::Display for MediaDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Whether this is an audio stream over plain RTP that the relay can carry.
    pub fn is_rtp_audio(&self) -> bool {
        self.media.eq_ignore_ascii_case("audio")
            && (self.protocol.eq_ignore_ascii_case("RTP/AVP") || self.protocol.eq_ignore_ascii_case("RTP/AVPF"))
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

    /// Replaces (or adds) the direction attribute.
    pub fn set_direction(&mut self, direction: MediaDirection) {
        self.attributes.retain(|a| a.value.is_some() || MediaDirection::from_attribute(&a.name).is_none());
        self.attributes.push(Attribute::flag(direction.as_str()));
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

/// The node's end of one leg's media: its advertised address and the RTP port of the pair
/// allocated for the leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The address peers send RTP to (the node's advertised, possibly public, address).
    pub address: IpAddr,
    /// The even RTP port; RTCP is on the next port.
    pub rtp_port: u16,
}

/// What the node is willing to do on one leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPolicy {
    /// The codecs allowed on the trunk, in the trunk's order of preference (`telephone-event`
    /// enables RFC 4733 DTMF).
    pub codecs: Vec<Codec>,
    /// The node's address and port for this leg.
    pub local: LocalEndpoint,
    /// What the node wants on this leg: sendrecv normally, sendonly/inactive to hold it.
    pub direction: MediaDirection,
    /// The packet time the node asks for and sends, in milliseconds.
    pub ptime: u32,
}

impl MediaPolicy {
    /// A policy with the default ptime and sendrecv.
    pub fn new(codecs: Vec<Codec>, local: LocalEndpoint) -> MediaPolicy {
        MediaPolicy { codecs, local, direction: MediaDirection::SendRecv, ptime: DEFAULT_PTIME }
    }
}

/// What offer/answer agreed on for one leg: everything the relay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedMedia {
    /// The audio codec (PCMU or PCMA).
    pub codec: Codec,
    /// Its payload type on this leg.
    pub payload_type: u8,
    /// The payload type of `telephone-event` on this leg, when both sides agreed on it.
    pub telephone_event: Option<u8>,
    /// The ptime the peer asked for, if it did.
    pub remote_ptime: Option<u32>,
    /// Where to send RTP; `None` when the peer gave no usable address (hold by `0.0.0.0`, port
    /// 0, or a host name).
    pub remote_rtp: Option<SocketAddr>,
    /// Where to send RTCP (a=rtcp, else RTP port + 1).
    pub remote_rtcp: Option<SocketAddr>,
    /// What the node does on this leg: whether it sends and/or receives.
    pub direction: MediaDirection,
    /// The index of the audio section in the SDP (the same in offer and answer).
    pub media_index: usize,
}

/// Keeps a leg's `o=` line stable across the dialog: the same session id, and a version that
/// increases only when the body changes (RFC 3264 §8: an unchanged re-offer keeps its version).
#[derive(Debug, Clone)]
pub struct SdpSession {
    username: String,
    session_id: u64,
    version: u64,
    address: IpAddr,
    last_body: Option<String>,
}

impl SdpSession {
    /// A new session for one leg, with a random id.
    pub fn new(address: IpAddr) -> SdpSession {
        let session_id = rand::random::<u32>() as u64 + 1;
        SdpSession { username: "switchboard".into(), session_id, version: session_id, address, last_body: None }
    }

    /// The version the next changed body will get.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Sets the origin of `sdp`, bumping the version if the body differs from the last one.
    pub fn stamp(&mut self, sdp: &mut SessionDescription) {
        sdp.origin = Origin {
            username: self.username.clone(),
            session_id: self.session_id.to_string(),
            session_version: 0,
            connection: Connection::from_ip(self.address),
        };
        let body = sdp.to_string();
        if let Some(last) = &self.last_body
            && *last != body
        {
            self.version += 1;
        }
        self.last_body = Some(body);
        sdp.origin.session_version = self.version;
    }
}

fn base_description(local: &LocalEndpoint) -> SessionDescription {
    SessionDescription {
        origin: Origin {
            username: "switchboard".into(),
            session_id: "0".into(),
            session_version: 0,
            connection: Connection::from_ip(local.address),
        },
        session_name: "switchboard".into(),
        info: vec![],
        connection: Some(Connection::from_ip(local.address)),
        bandwidth: vec![],
        timing: vec![('t', "0 0".into())],
        attributes: vec![],
        media: vec![],
    }
}

fn rtpmap_attribute(payload_type: u8, codec: Codec) -> Attribute {
    Attribute::value("rtpmap", format!("{payload_type} {}/8000", codec.as_str()))
}

fn socket(ip: Option<IpAddr>, port: u16) -> Option<SocketAddr> {
    let ip = ip.filter(|ip| !ip.is_unspecified())?;
    (port != 0).then(|| SocketAddr::new(ip, port))
}

fn remote_addresses(sdp: &SessionDescription, media: &MediaDescription) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let ip = sdp.connection_of(media).and_then(Connection::ip);
    let rtp = socket(ip, media.port);
    let rtcp = match media.rtcp() {
        Some((port, connection)) => socket(connection.and_then(|c| c.ip()).or(ip), port),
        None => socket(ip, media.port.saturating_add(1)),
    };
    (rtp, rtcp.filter(|_| rtp.is_some()))
}

/// The direction a peer declares, adjusted for the RFC 2543 hold address: `c=0.0.0.0` means
/// "do not send to me", whatever the attribute says. A B2BUA mirrors it onto the other leg.
pub fn declared_direction(sdp: &SessionDescription, media: &MediaDescription) -> MediaDirection {
    let declared = sdp.direction_of(media);
    if sdp.connection_of(media).is_some_and(Connection::is_hold) {
        MediaDirection::from_flags(declared.sends(), false)
    } else {
        declared
    }
}

/// Builds an offer for an outbound leg: one audio section with the policy's codecs in order
/// (static payload types for PCMU/PCMA, [`TELEPHONE_EVENT_PT`] for telephone-event), the
/// node's address and port, ptime and direction.
pub fn create_offer(policy: &MediaPolicy, session: &mut SdpSession) -> SessionDescription {
    let mut sdp = base_description(&policy.local);
    let mut formats = vec![];
    let mut attributes = vec![];
    for codec in dedup(&policy.codecs) {
        if let Some(pt) = static_payload_type(codec) {
            formats.push(pt.to_string());
            attributes.push(rtpmap_attribute(pt, codec));
        }
    }
    if formats.is_empty() {
        // A trunk without audio codecs is refused by the config; offer PCMU rather than nothing.
        formats.push("0".into());
        attributes.push(rtpmap_attribute(0, Codec::Pcmu));
    }
    if policy.codecs.contains(&Codec::TelephoneEvent) {
        formats.push(TELEPHONE_EVENT_PT.to_string());
        attributes.push(rtpmap_attribute(TELEPHONE_EVENT_PT, Codec::TelephoneEvent));
        attributes.push(Attribute::value("fmtp", format!("{TELEPHONE_EVENT_PT} 0-16")));
    }
    attributes.push(Attribute::value("ptime", policy.ptime.to_string()));
    attributes.push(Attribute::flag(policy.direction.as_str()));
    sdp.media.push(MediaDescription {
        media: "audio".into(),
        port: policy.local.rtp_port,
        port_count: None,
        protocol: "RTP/AVP".into(),
        formats,
        connection: None,
        bandwidth: vec![],
        attributes,
    });
    session.stamp(&mut sdp);
    sdp
}

fn dedup(codecs: &[Codec]) -> Vec<Codec> {
    let mut out = Vec::with_capacity(codecs.len());
    for codec in codecs {
        if !out.contains(codec) {
            out.push(*codec);
        }
    }
    out
}

/// Answers a remote offer (an initial INVITE or a re-INVITE): picks the first audio codec of
/// the offer (the offerer's preference, RFC 3264 §6.1) that the policy allows, adds
/// telephone-event when both sides have it, answers the direction (sendonly → recvonly,
/// inactive → inactive, limited by the policy's own direction), and rejects (port 0) every
/// other section. Errors mean 488 (see [`SdpError::sip_status`]).
pub fn answer_offer(
    offer: &SessionDescription,
    policy: &MediaPolicy,
    session: &mut SdpSession,
) -> Result<(SessionDescription, NegotiatedMedia), SdpError> {
    let index = offer.audio_index().ok_or(SdpError::NoAudio)?;
    let offered = &offer.media[index];
    if offer.connection_of(offered).is_none() {
        return Err(SdpError::NoConnection);
    }
    let (payload_type, codec) = offered
        .payload_types()
        .find_map(|pt| {
            offered
                .codec_of(pt)
                .filter(|c| *c != Codec::TelephoneEvent && policy.codecs.contains(c))
                .map(|codec| (pt, codec))
        })
        .ok_or_else(|| SdpError::NoCommonCodec {
            offered: offered.formats.join(" "),
            allowed: policy.codecs.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", "),
        })?;
    let telephone_event = if policy.codecs.contains(&Codec::TelephoneEvent) {
        offered.payload_types().find(|pt| offered.codec_of(*pt) == Some(Codec::TelephoneEvent))
    } else {
        None
    };
    let direction = declared_direction(offer, offered).reverse().intersect(policy.direction);
    let (remote_rtp, remote_rtcp) = remote_addresses(offer, offered);

    let mut sdp = base_description(&policy.local);
    for (i, media) in offer.media.iter().enumerate() {
        if i != index {
            sdp.media.push(MediaDescription {
                media: media.media.clone(),
                port: 0,
                port_count: None,
                protocol: media.protocol.clone(),
                formats: if media.formats.is_empty() { vec!["0".into()] } else { media.formats.clone() },
                connection: None,
                bandwidth: vec![],
                attributes: vec![],
            });
            continue;
        }
        let mut formats = vec![payload_type.to_string()];
        let mut attributes = vec![rtpmap_attribute(payload_type, codec)];
        if let Some(pt) = telephone_event {
            formats.push(pt.to_string());
            attributes.push(rtpmap_attribute(pt, Codec::TelephoneEvent));
            let events = offered.fmtp(pt).filter(|f| !f.is_empty()).unwrap_or("0-16");
            attributes.push(Attribute::value("fmtp", format!("{pt} {events}")));
        }
        attributes.push(Attribute::value("ptime", policy.ptime.to_string()));
        attributes.push(Attribute::flag(direction.as_str()));
        sdp.media.push(MediaDescription {
            media: media.media.clone(),
            port: policy.local.rtp_port,
            port_count: None,
            protocol: media.protocol.clone(),
            formats,
            connection: None,
            bandwidth: vec![],
            attributes,
        });
    }
    session.stamp(&mut sdp);
    let negotiated = NegotiatedMedia {
        codec,
        payload_type,
        telephone_event,
        remote_ptime: offered.ptime(),
        remote_rtp,
        remote_rtcp,
        direction,
        media_index: index,
    };
    Ok((sdp, negotiated))
}

/// Reads the answer to an offer the node made ([`create_offer`]): the codec is the first one of
/// the answer that was offered, the direction what both sides allow, the addresses the
/// answerer's.
pub fn process_answer(offer: &SessionDescription, answer: &SessionDescription) -> Result<NegotiatedMedia, SdpError> {
    let index = offer.audio_index().ok_or(SdpError::NoAudio)?;
    if answer.media.len() != offer.media.len() {
        return Err(SdpError::AnswerMismatch(format!(
            "{} media sections answered, {} offered",
            answer.media.len(),
            offer.media.len()
        )));
    }
    let offered = &offer.media[index];
    let answered = &answer.media[index];
    if !answered.media.eq_ignore_ascii_case(&offered.media) {
        return Err(SdpError::AnswerMismatch(format!("section {index} is {} in the answer", answered.media)));
    }
    if answered.port == 0 {
        return Err(SdpError::AudioRejected);
    }
    if answer.connection_of(answered).is_none() {
        return Err(SdpError::NoConnection);
    }
    let offered_codecs: Vec<Codec> = offered.payload_types().filter_map(|pt| offered.codec_of(pt)).collect();
    let (payload_type, codec) = answered
        .payload_types()
        .find_map(|pt| {
            answered
                .codec_of(pt)
                .filter(|c| *c != Codec::TelephoneEvent && offered_codecs.contains(c))
                .map(|codec| (pt, codec))
        })
        .ok_or_else(|| SdpError::NoCommonCodec {
            offered: offered.formats.join(" "),
            allowed: answered.formats.join(" "),
        })?;
    let telephone_event = if offered_codecs.contains(&Codec::TelephoneEvent) {
        answered.payload_types().find(|pt| answered.codec_of(*pt) == Some(Codec::TelephoneEvent))
    } else {
        None
    };
    let ours = offer.direction_of(offered);
    let direction = declared_direction(answer, answered).reverse().intersect(ours);
    let (remote_rtp, remote_rtcp) = remote_addresses(answer, answered);
    Ok(NegotiatedMedia {
        codec,
        payload_type,
        telephone_event,
        remote_ptime: answered.ptime(),
        remote_rtp,
        remote_rtcp,
        direction,
        media_index: index,
    })
}

/// The unspecified address of the family of `ip` (for hold offers in the RFC 2543 style, which
/// the node does not send but may need to compare with).
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn what_the_node_writes_back_parses_again_with_control_characters_in_a_field() {
        // The sdp fuzz target's input: a vertical tab among form feeds in the c= address.
        let body = b"v=0\r\no=user1 53655765 2353687637 IN IP4 127&0.0.1\r\ns=-\r\nc=IN IP4 \x0c\x0c\x0b\x0c\x08\0ecv\nm=audio 2000 RTP/AVP 0 8 1073a";
        let sdp = SessionDescription::parse_bytes(body).unwrap();
        let again = SessionDescription::parse(&sdp.to_sdp_string()).expect("the written SDP parses");
        assert_eq!(again.to_sdp_string(), sdp.to_sdp_string());
    }
    use super::*;

    const CARRIER_OFFER: &str = "v=0\r\n\
o=- 1234567 1234567 IN IP4 203.0.113.10\r\n\
s=SIP Media Capabilities\r\n\
c=IN IP4 203.0.113.10\r\n\
t=0 0\r\n\
m=audio 18000 RTP/AVP 8 0 18 101\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:18 G729/8000\r\n\
a=fmtp:18 annexb=no\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=ptime:20\r\n\
a=maxptime:150\r\n\
a=sendrecv\r\n\
a=X-nat:0\r\n\
a=silenceSupp:off - - - -\r\n";

    fn local() -> LocalEndpoint {
        LocalEndpoint { address: "198.51.100.7".parse().unwrap(), rtp_port: 10000 }
    }

    fn policy(codecs: &[Codec]) -> MediaPolicy {
        MediaPolicy::new(codecs.to_vec(), local())
    }

    fn session() -> SdpSession {
        SdpSession::new(local().address)
    }

    #[test]
    fn parses_a_carrier_offer() {
        let sdp = SessionDescription::parse(CARRIER_OFFER).unwrap();
        assert_eq!(sdp.origin.session_version, 1234567);
        assert_eq!(sdp.connection.as_ref().unwrap().ip(), Some("203.0.113.10".parse().unwrap()));
        let m = &sdp.media[0];
        assert_eq!(m.port, 18000);
        assert_eq!(m.payload_types().collect::<Vec<_>>(), vec![8, 0, 18, 101]);
        assert_eq!(m.codec_of(8), Some(Codec::Pcma));
        assert_eq!(m.codec_of(18), None);
        assert_eq!(m.codec_of(101), Some(Codec::TelephoneEvent));
        assert_eq!(m.fmtp(101), Some("0-15"));
        assert_eq!(m.ptime(), Some(20));
        assert_eq!(m.maxptime(), Some(150));
        assert_eq!(m.direction(), Some(MediaDirection::SendRecv));
        assert_eq!(m.attribute("silenceSupp").unwrap().value.as_deref(), Some("off - - - -"));
    }

    #[test]
    fn round_trip_keeps_every_line() {
        let sdp = SessionDescription::parse(CARRIER_OFFER).unwrap();
        let text = sdp.to_string();
        assert_eq!(text, CARRIER_OFFER);
        assert_eq!(SessionDescription::parse(&text).unwrap(), sdp);
    }

    #[test]
    fn accepts_lf_only_and_static_types_without_rtpmap() {
        let text = "v=0\no=- 1 1 IN IP4 10.0.0.1\ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0 8\nc=IN IP4 10.0.0.2\n\n";
        let sdp = SessionDescription::parse(text).unwrap();
        let m = &sdp.media[0];
        assert_eq!(m.codec_of(0), Some(Codec::Pcmu));
        assert_eq!(m.codec_of(8), Some(Codec::Pcma));
        assert_eq!(sdp.connection_of(m).unwrap().address, "10.0.0.2");
        assert_eq!(sdp.direction_of(m), MediaDirection::SendRecv);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let cases = [
            "",
            "o=- 1 1 IN IP4 1.2.3.4\r\n",
            "v=1\r\n",
            "v=0\r\nv=0\r\n",
            "v=0\r\no=- 1 1 IN IP4\r\n",
            "v=0\r\no=- 1 x IN IP4 1.2.3.4\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 99999 RTP/AVP 0\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 1/x RTP/AVP 0\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=ATM NSAP x\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IPX 1.2.3.4\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nhello\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n=x\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\né=x\r\n",
            "v=0\r\ns=x\r\n",
        ];
        for case in cases {
            assert!(SessionDescription::parse(case).is_err(), "{case:?} should fail");
        }
        assert_eq!(SessionDescription::parse_bytes(&[0xff, 0xfe]), Err(SdpError::NotUtf8));
        assert!(matches!(SessionDescription::parse_bytes(&vec![b'a'; MAX_SDP_LEN + 1]), Err(SdpError::TooLarge(_))));
        let many = format!("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n{}", "m=audio 0 RTP/AVP 0\r\n".repeat(40));
        assert_eq!(SessionDescription::parse(&many), Err(SdpError::TooManyMedia));
        // Odd but harmless lines are tolerated: unknown types, garbage attribute values.
        let odd = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nx=whatever\r\nm=audio 5 RTP/AVP 0 abc 300\r\n\
                   a=rtpmap:zz\r\na=rtpmap:0\r\na=ptime:abc\r\na=rtcp:\r\na=fmtp\r\n";
        let sdp = SessionDescription::parse(odd).unwrap();
        let m = &sdp.media[0];
        assert_eq!(m.payload_types().collect::<Vec<_>>(), vec![0]);
        assert_eq!(m.ptime(), None);
        assert_eq!(m.rtcp(), None);
        assert_eq!(m.fmtp(0), None);
        assert_eq!(m.codec_of(0), Some(Codec::Pcmu));
    }

    #[test]
    fn every_prefix_of_a_valid_body_is_handled() {
        for end in 0..CARRIER_OFFER.len() {
            let _ = SessionDescription::parse(&CARRIER_OFFER[..end]);
        }
    }

    #[test]
    fn answer_picks_the_offerers_first_allowed_codec() {
        let offer = SessionDescription::parse(CARRIER_OFFER).unwrap();
        let mut s = session();
        let (answer, negotiated) =
            answer_offer(&offer, &policy(&[Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent]), &mut s).unwrap();
        assert_eq!(negotiated.codec, Codec::Pcma);
        assert_eq!(negotiated.payload_type, 8);
        assert_eq!(negotiated.telephone_event, Some(101));
        assert_eq!(negotiated.remote_rtp, Some("203.0.113.10:18000".parse().unwrap()));
        assert_eq!(negotiated.remote_rtcp, Some("203.0.113.10:18001".parse().unwrap()));
        assert_eq!(negotiated.direction, MediaDirection::SendRecv);
        assert_eq!(negotiated.remote_ptime, Some(20));
        let text = answer.to_string();
        assert!(text.contains("c=IN IP4 198.51.100.7\r\n"), "{text}");
        assert!(text.contains("m=audio 10000 RTP/AVP 8 101\r\n"), "{text}");
        assert!(text.contains("a=rtpmap:8 PCMA/8000\r\n"), "{text}");
        assert!(text.contains("a=rtpmap:101 telephone-event/8000\r\n"), "{text}");
        assert!(text.contains("a=fmtp:101 0-15\r\n"), "{text}");
        assert!(text.contains("a=ptime:20\r\na=sendrecv\r\n"), "{text}");
        // The answer parses, and reading it as an answer to the offer agrees.
        let reparsed = SessionDescription::parse(&text).unwrap();
        assert_eq!(reparsed, answer);
    }

    #[test]
    fn answer_without_telephone_event_when_not_allowed() {
        let offer = SessionDescription::parse(CARRIER_OFFER).unwrap();
        let (answer, negotiated) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut session()).unwrap();
        assert_eq!(negotiated.codec, Codec::Pcmu);
        assert_eq!(negotiated.payload_type, 0);
        assert_eq!(negotiated.telephone_event, None);
        assert!(answer.to_string().contains("m=audio 10000 RTP/AVP 0\r\n"));
    }

    #[test]
    fn no_common_codec_is_488() {
        let offer = SessionDescription::parse(&CARRIER_OFFER.replace("8 0 18 101", "18 101")).unwrap();
        let err = answer_offer(&offer, &policy(&[Codec::Pcmu, Codec::Pcma, Codec::TelephoneEvent]), &mut session())
            .unwrap_err();
        assert!(matches!(err, SdpError::NoCommonCodec { .. }), "{err}");
        assert_eq!(err.sip_status(), 488);
        let video_only = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=video 5000 RTP/AVP 96\r\n";
        let err =
            answer_offer(&SessionDescription::parse(video_only).unwrap(), &policy(&[Codec::Pcmu]), &mut session())
                .unwrap_err();
        assert_eq!(err, SdpError::NoAudio);
        assert_eq!(err.sip_status(), 488);
        let srtp = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/SAVP 0\r\n";
        let err = answer_offer(&SessionDescription::parse(srtp).unwrap(), &policy(&[Codec::Pcmu]), &mut session())
            .unwrap_err();
        assert_eq!(err.sip_status(), 488);
        let no_c = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 0\r\n";
        let err = answer_offer(&SessionDescription::parse(no_c).unwrap(), &policy(&[Codec::Pcmu]), &mut session())
            .unwrap_err();
        assert_eq!(err, SdpError::NoConnection);
        assert_eq!(SdpError::NotUtf8.sip_status(), 400);
    }

    #[test]
    fn other_sections_are_rejected_in_order() {
        let text = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n\
                    m=video 5002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n\
                    m=audio 5000 RTP/AVP 0\r\n\
                    m=audio 5004 RTP/AVP 0\r\n";
        let offer = SessionDescription::parse(text).unwrap();
        let (answer, negotiated) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut session()).unwrap();
        assert_eq!(negotiated.media_index, 1);
        assert_eq!(answer.media.len(), 3);
        assert_eq!(answer.media[0].port, 0);
        assert_eq!(answer.media[0].formats, vec!["96"]);
        assert_eq!(answer.media[1].port, 10000);
        assert_eq!(answer.media[2].port, 0);
    }

    #[test]
    fn hold_and_resume_directions() {
        let cases = [
            ("a=sendrecv", MediaDirection::SendRecv),
            ("a=sendonly", MediaDirection::RecvOnly),
            ("a=recvonly", MediaDirection::SendOnly),
            ("a=inactive", MediaDirection::Inactive),
        ];
        let mut s = session();
        let mut versions = vec![];
        for (attribute, expected) in cases {
            let offer = SessionDescription::parse(&CARRIER_OFFER.replace("a=sendrecv", attribute)).unwrap();
            let (answer, negotiated) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut s).unwrap();
            assert_eq!(negotiated.direction, expected, "{attribute}");
            assert_eq!(answer.media[0].direction(), Some(expected));
            versions.push(answer.origin.session_version);
        }
        // Each changed answer has a higher version; the session id stays.
        assert!(versions.windows(2).all(|w| w[1] == w[0] + 1), "{versions:?}");
        // An unchanged answer keeps its version.
        let offer = SessionDescription::parse(&CARRIER_OFFER.replace("a=sendrecv", "a=inactive")).unwrap();
        let (answer, _) = answer_offer(&offer, &policy(&[Codec::Pcmu]), &mut s).unwrap();
        assert_eq!(answer.origin.session_version, *versions.last().unwrap());

        // Session-level direction applies when the section has none.
        let text = CARRIER_OFFER.replace("a=sendrecv\r\n", "").replace("t=0 0\r\n", "t=0 0\r\na=sendonly\r\n");
        let (_, negotiated) =
            answer_offer(&SessionDescription::parse(&text).unwrap(), &policy(&[Codec::Pcmu]), &mut s).unwrap();
        assert_eq!(negotiated.direction, MediaDirection::RecvOnly);

        // RFC 2543 hold: c=0.0.0.0 means do not send to me.
        let text = CARRIER_OFFER.replace("c=IN IP4 203.0.113.10", "c=IN IP4 0.0.0.0");
        let (answer, negotiated) =
            answer_offer(&SessionDescription::parse(&text).unwrap(), &policy(&[Codec::Pcmu]), &mut s).unwrap();
        assert_eq!(negotiated.remote_rtp, None);
        assert_eq!(negotiated.direction, MediaDirection::RecvOnly);
        assert_eq!(answer.media[0].direction(), Some(MediaDirection::RecvOnly));

        // The node holding its side limits the answer.
        let mut held = policy(&[Codec::Pcmu]);
        held.direction = MediaDirection::SendOnly;
        let offer = SessionDescription::parse(CARRIER_OFFER).unwrap();
        let (_, negotiated) = answer_offer(&offer, &held, &mut s).unwrap();
        assert_eq!(negotiated.direction, MediaDirection::SendOnly);
    }

    #[test]
    fn direction_algebra() {
        use MediaDirection::*;
        for d in [SendRecv, SendOnly, RecvOnly, Inactive] {
            assert_eq!(d.reverse().reverse(), d);
            assert_eq!(d.intersect(SendRecv), d);
            assert_eq!(d.intersect(Inactive), Inactive);
            assert_eq!(MediaDirection::from_attribute(d.as_str()), Some(d));
        }
        assert_eq!(SendOnly.reverse(), RecvOnly);
        assert_eq!(Inactive.reverse(), Inactive);
        assert_eq!(SendOnly.intersect(RecvOnly), Inactive);
    }

    #[test]
    fn offer_and_answer_for_an_outbound_leg() {
        let mut s = session();
        let mut p = policy(&[Codec::Pcma, Codec::Pcmu, Codec::TelephoneEvent]);
        p.local.rtp_port = 10002;
        let offer = create_offer(&p, &mut s);
        let text = offer.to_string();
        assert!(text.starts_with("v=0\r\no=switchboard "), "{text}");
        assert!(text.contains("m=audio 10002 RTP/AVP 8 0 101\r\n"), "{text}");
        assert!(text.contains("a=fmtp:101 0-16\r\n"), "{text}");
        assert!(text.contains("a=sendrecv\r\n"), "{text}");
        let reparsed = SessionDescription::parse(&text).unwrap();
        assert_eq!(reparsed, offer);

        // The callee answers PCMU and telephone-event on its own payload type, and puts us on hold.
        let answer_text = "v=0\r\no=callee 9 9 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\n\
                           m=audio 30000 RTP/AVP 0 96\r\na=rtpmap:96 telephone-event/8000\r\na=rtcp:30011\r\n\
                           a=sendonly\r\n";
        let answer = SessionDescription::parse(answer_text).unwrap();
        let negotiated = process_answer(&offer, &answer).unwrap();
        assert_eq!(negotiated.codec, Codec::Pcmu);
        assert_eq!(negotiated.payload_type, 0);
        assert_eq!(negotiated.telephone_event, Some(96));
        assert_eq!(negotiated.remote_rtp, Some("192.0.2.5:30000".parse().unwrap()));
        assert_eq!(negotiated.remote_rtcp, Some("192.0.2.5:30011".parse().unwrap()));
        assert_eq!(negotiated.direction, MediaDirection::RecvOnly);

        // Rejections.
        let rejected = SessionDescription::parse(&answer_text.replace("30000", "0")).unwrap();
        assert_eq!(process_answer(&offer, &rejected), Err(SdpError::AudioRejected));
        let wrong = SessionDescription::parse(&answer_text.replace("RTP/AVP 0 96", "RTP/AVP 18")).unwrap();
        assert!(matches!(process_answer(&offer, &wrong), Err(SdpError::NoCommonCodec { .. })));
        let extra = format!("{answer_text}m=video 0 RTP/AVP 96\r\n");
        assert!(matches!(
            process_answer(&offer, &SessionDescription::parse(&extra).unwrap()),
            Err(SdpError::AnswerMismatch(_))
        ));

        // A hold offer from the node.
        p.direction = MediaDirection::SendOnly;
        let hold = create_offer(&p, &mut s);
        assert!(hold.origin.session_version > offer.origin.session_version);
        assert_eq!(hold.media[0].direction(), Some(MediaDirection::SendOnly));
        let held_answer = SessionDescription::parse(&answer_text.replace("a=sendonly", "a=recvonly")).unwrap();
        assert_eq!(process_answer(&hold, &held_answer).unwrap().direction, MediaDirection::SendOnly);
    }

    #[test]
    fn ipv6_connection() {
        let text = "v=0\r\no=- 1 1 IN IP6 2001:db8::1\r\ns=-\r\nc=IN IP6 2001:db8::2\r\nt=0 0\r\n\
                    m=audio 7000 RTP/AVP 0\r\n";
        let offer = SessionDescription::parse(text).unwrap();
        let mut p = policy(&[Codec::Pcmu]);
        p.local.address = "2001:db8::7".parse().unwrap();
        let (answer, negotiated) = answer_offer(&offer, &p, &mut SdpSession::new(p.local.address)).unwrap();
        assert_eq!(negotiated.remote_rtp, Some("[2001:db8::2]:7000".parse().unwrap()));
        assert!(answer.to_string().contains("c=IN IP6 2001:db8::7\r\n"));
        assert_eq!(unspecified_like(p.local.address), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
}
