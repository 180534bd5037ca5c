//! A raw SIP user agent over UDP with one RTP socket, for tests that need to see exactly what
//! the node sends (SDP addresses, RTP payloads) and to send exactly what a peer would.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;

/// A raw SIP user agent with one RTP socket.
pub struct Ua {
    pub sip: UdpSocket,
    pub rtp: UdpSocket,
}

impl Ua {
    pub async fn new() -> Ua {
        Ua { sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(), rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap() }
    }

    pub fn sip_addr(&self) -> SocketAddr {
        self.sip.local_addr().unwrap()
    }

    pub fn rtp_port(&self) -> u16 {
        self.rtp.local_addr().unwrap().port()
    }

    pub async fn send(&self, text: &str, to: SocketAddr) {
        self.sip.send_to(text.as_bytes(), to).await.unwrap();
    }

    /// The next SIP message (bounded wait).
    pub async fn recv(&self) -> (String, SocketAddr) {
        let mut buf = vec![0u8; 8192];
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), self.sip.recv_from(&mut buf))
            .await
            .expect("no SIP message within 10 s")
            .unwrap();
        (String::from_utf8_lossy(&buf[..n]).to_string(), from)
    }

    /// Reads until a request with `method` arrives (answering nothing else).
    pub async fn request(&self, method: &str) -> (String, SocketAddr) {
        loop {
            let (text, from) = self.recv().await;
            if text.starts_with(&format!("{method} ")) {
                return (text, from);
            }
        }
    }

    /// Reads until a final response arrives.
    pub async fn final_response(&self) -> String {
        loop {
            let (text, _) = self.recv().await;
            if text.starts_with("SIP/2.0 ") && !text.starts_with("SIP/2.0 1") {
                return text;
            }
        }
    }

    /// Sends one RTP packet to `to`.
    pub async fn rtp_send(&self, to: SocketAddr, pt: u8, seq: u16, payload: &[u8]) {
        let mut packet = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0xAB, 0xCD, 0xEF, 0x01];
        packet[2..4].copy_from_slice(&seq.to_be_bytes());
        packet[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        packet.extend_from_slice(payload);
        self.rtp.send_to(&packet, to).await.unwrap();
    }

    /// Every RTP packet that arrives within `window`: (payload type, payload).
    pub async fn rtp_collect(&self, window: Duration) -> Vec<(u8, Vec<u8>)> {
        self.rtp_collect_raw(window).await.into_iter().map(|p| (p[1] & 0x7f, p[12..].to_vec())).collect()
    }

    /// Every datagram of at least an RTP header's length that arrives within `window`, whole.
    pub async fn rtp_collect_raw(&self, window: Duration) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut buf = [0u8; 2048];
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, self.rtp.recv_from(&mut buf)).await {
            if n >= 12 {
                out.push(buf[..n].to_vec());
            }
        }
        out
    }
}

pub fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

pub fn body(text: &str) -> &str {
    text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

/// The RTP address in an SDP body.
pub fn sdp_rtp(text: &str) -> SocketAddr {
    let sdp = body(text);
    let ip = sdp.lines().find_map(|l| l.strip_prefix("c=IN IP4 ")).expect("c= line").trim();
    let port = sdp
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().next())
        .expect("m= line");
    format!("{ip}:{port}").parse().unwrap()
}

pub fn sdp(port: u16, formats: &str, direction: &str) -> String {
    let mut out = format!(
        "v=0\r\no=ua 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP {formats}\r\n"
    );
    for pt in formats.split_whitespace() {
        match pt {
            "0" => out.push_str("a=rtpmap:0 PCMU/8000\r\n"),
            "8" => out.push_str("a=rtpmap:8 PCMA/8000\r\n"),
            "101" => out.push_str("a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n"),
            _ => {}
        }
    }
    out.push_str(&format!("a=ptime:20\r\na={direction}\r\n"));
    out
}

/// A response to `request` (copies Via, From, To, Call-ID, CSeq; tags the To).
pub fn reply(request: &str, status: &str, contact: SocketAddr, sdp: Option<&str>) -> String {
    let mut out = format!("SIP/2.0 {status}\r\n");
    for line in request.lines() {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("via:")
            || lower.starts_with("from:")
            || lower.starts_with("call-id:")
            || lower.starts_with("cseq:")
        {
            out.push_str(line);
            out.push_str("\r\n");
        } else if lower.starts_with("to:") {
            out.push_str(line);
            if !lower.contains("tag=") {
                out.push_str(";tag=callee");
            }
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!("Contact: <sip:callee@{contact}>\r\n"));
    match sdp {
        Some(sdp) => {
            out.push_str(&format!("Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len()))
        }
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out
}

/// An INVITE from a caller at `from` to [`super::DID`] through the node at `node`, offering `sdp`.
pub fn invite_to_did(node: SocketAddr, from: SocketAddr, call_id: &str, sdp: &str) -> String {
    let did = super::DID;
    format!(
        "INVITE sip:{did}@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-{call_id}-inv\r\n\
         From: <sip:+15557654321@{from}>;tag=caller\r\nTo: <sip:{did}@{node}>\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:caller@{from}>\r\nMax-Forwards: 70\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

/// A request inside the dialog [`invite_to_did`] started, once the node answered with `to_tag`
/// (ACK takes the INVITE's CSeq number).
pub fn caller_in_dialog(
    method: &str,
    node: SocketAddr,
    from: SocketAddr,
    call_id: &str,
    to_tag: &str,
    cseq: u32,
) -> String {
    let did = super::DID;
    format!(
        "{method} sip:{did}@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-{call_id}-{method}{cseq}\r\n\
         From: <sip:+15557654321@{from}>;tag=caller\r\nTo: <sip:{did}@{node}>;tag={to_tag}\r\nCall-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The tag the far side put into a response's To header.
pub fn to_tag(response: &str) -> String {
    header(response, "To").and_then(|to| to.split("tag=").nth(1)).unwrap_or_default().trim().to_string()
}
