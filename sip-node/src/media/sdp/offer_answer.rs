//! The offer/answer model (RFC 3264) as the node applies it to anchor a call's media: what the
//! node offers on a leg, how it answers an offer, and what it takes from an answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use switchboard_model::Codec;

use super::*;
use crate::media::srtp::sdes::{SrtpKeys, SrtpPolicy};

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
    /// SRTP on this leg (its trunk's `media.srtp`).
    pub srtp: SrtpPolicy,
}

impl MediaPolicy {
    /// A policy with the default ptime, sendrecv and plain RTP.
    pub fn new(codecs: Vec<Codec>, local: LocalEndpoint) -> MediaPolicy {
        MediaPolicy { codecs, local, direction: MediaDirection::SendRecv, ptime: DEFAULT_PTIME, srtp: SrtpPolicy::Off }
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
    /// The leg's SRTP keys; `None` for plain RTP.
    pub srtp: Option<SrtpKeys>,
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

    /// The session that produced `sent` (the node's last SDP on a leg), carried on by another
    /// owner: the same `o=` id, and a version that goes up from `sent`'s at the next change
    /// (a transferred call answering re-offers on a leg an earlier machine negotiated).
    pub fn resume(sent: &SessionDescription, address: IpAddr) -> SdpSession {
        let mut session = SdpSession::new(address);
        let Ok(session_id) = sent.origin.session_id.parse::<u64>() else { return session };
        session.username = sent.origin.username.clone();
        session.session_id = session_id;
        session.version = sent.origin.session_version;
        let mut unversioned = sent.clone();
        unversioned.origin.session_version = 0;
        session.last_body = Some(unversioned.to_string());
        session
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
    let (protocol, crypto) = crypto::offer(policy.srtp);
    attributes.extend(crypto);
    attributes.push(Attribute::value("ptime", policy.ptime.to_string()));
    attributes.push(Attribute::flag(policy.direction.as_str()));
    sdp.media.push(MediaDescription {
        media: "audio".into(),
        port: policy.local.rtp_port,
        port_count: None,
        protocol: protocol.into(),
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
    let index = crypto::audio_index_for(offer, policy.srtp).ok_or(SdpError::NoAudio)?;
    let offered = &offer.media[index];
    if offer.connection_of(offered).is_none() {
        return Err(SdpError::NoConnection);
    }
    let srtp = crypto::answer(policy.srtp, offered)?;
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
        if let Some(keys) = &srtp {
            attributes.push(Attribute::value("crypto", keys.local.value()));
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
        srtp,
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
    let srtp = crypto::from_answer(offered, answered)?;
    Ok(NegotiatedMedia {
        codec,
        payload_type,
        telephone_event,
        remote_ptime: answered.ptime(),
        remote_rtp,
        remote_rtcp,
        direction,
        media_index: index,
        srtp,
    })
}

/// The unspecified address of the family of `ip` (for hold offers in the RFC 2543 style, which
/// the node does not send but may need to compare with).
#[cfg_attr(not(test), allow(dead_code, reason = "kept for comparing RFC 2543 hold offers; tested"))]
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}
