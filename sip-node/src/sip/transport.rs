//! SIP transports: UDP and TCP sockets, stream framing, per-source flood limits, and the
//! advertised address that goes into Via and Contact when the node sits behind NAT.
//!
//! Everything that arrives is parsed here (on the socket's task, so parsing runs in parallel
//! with the transaction layer) and handed on as [`Received`]; what cannot be parsed is answered
//! with `400` when enough of it is readable, dropped otherwise, and counted either way. TLS
//! slots in as a third [`Protocol`] whose connections use the same stream framing as TCP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::message::{self, Frame, Incoming, ParseError};
use crate::metrics::NodeMetrics;

/// How many bytes a TCP connection may queue for writing before it is considered stuck.
const TCP_WRITE_QUEUE: usize = 256;
/// Idle TCP connections are closed after this long without traffic.
const TCP_IDLE: Duration = Duration::from_secs(300);

/// The transport protocol of a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    /// Reliable transports carry no retransmissions (RFC 3261 17.1.1.2).
    pub fn is_reliable(self) -> bool {
        matches!(self, Protocol::Tcp)
    }

    /// The token used in Via headers and `transport=` URI parameters.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "UDP",
            Protocol::Tcp => "TCP",
        }
    }
}

/// The far end of a hop: where a request came from or where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub protocol: Protocol,
    pub addr: SocketAddr,
}

/// A parsed message with where it came from.
#[derive(Debug)]
pub struct Received {
    pub message: Incoming,
    pub peer: Peer,
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no {0:?} socket for {1}")]
    NoSocket(Protocol, SocketAddr),
    #[error("sending to {addr} failed: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("TCP connection to {0} is congested")]
    Congested(SocketAddr),
}

/// Listen and advertised addresses.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Addresses to listen on (UDP and TCP on each).
    pub listen: Vec<SocketAddr>,
    /// Host (and port) to put in Via/Contact instead of the listen address, for NAT.
    pub advertised_host: Option<String>,
    pub advertised_port: Option<u16>,
    /// Messages per second accepted from one source IP before the rest is dropped.
    pub per_source_rate: u32,
}

struct SourceBucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source IP: a flood from one source is dropped before it costs parsing.
struct FloodGuard {
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, SourceBucket>>,
}

impl FloodGuard {
    fn allow(&self, ip: IpAddr) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(10));
        }
        let bucket = buckets.entry(ip).or_insert(SourceBucket { tokens: self.rate, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The node's sockets. Cheap to share (`Arc`); sends never wait for the network except when a
/// TCP connection must first be opened.
pub struct TransportLayer {
    udp: Vec<(SocketAddr, Arc<UdpSocket>)>,
    tcp_local: Vec<SocketAddr>,
    connections: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    sink: mpsc::Sender<Received>,
    flood: FloodGuard,
    metrics: NodeMetrics,
    advertised_host: Option<String>,
    advertised_port: Option<u16>,
}

impl TransportLayer {
    /// Binds UDP and TCP on every listen address and starts their receive tasks, which hand
    /// parsed messages to `sink`.
    pub async fn bind(
        config: &TransportConfig,
        sink: mpsc::Sender<Received>,
        metrics: NodeMetrics,
    ) -> std::io::Result<Arc<Self>> {
        let mut udp = Vec::new();
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let (socket, listener) = bind_pair(*addr).await?;
            udp.push((socket.local_addr()?, Arc::new(socket)));
            listeners.push(listener);
        }
        let layer = Arc::new(TransportLayer {
            tcp_local: listeners.iter().filter_map(|l| l.local_addr().ok()).collect(),
            udp,
            connections: Mutex::new(HashMap::new()),
            sink,
            flood: FloodGuard { rate: f64::from(config.per_source_rate), buckets: Mutex::new(HashMap::new()) },
            metrics,
            advertised_host: config.advertised_host.clone(),
            advertised_port: config.advertised_port,
        });
        for (_, socket) in &layer.udp {
            tokio::spawn(udp_receive(Arc::clone(&layer), Arc::clone(socket)));
        }
        for listener in listeners {
            tokio::spawn(tcp_accept(Arc::clone(&layer), listener));
        }
        Ok(layer)
    }

    /// The first local UDP address (the one tests and logs mention).
    pub fn local_addr(&self) -> SocketAddr {
        self.udp[0].0
    }

    /// The host:port to put in Via and Contact for a hop towards `to`: the advertised address
    /// when configured, otherwise the listen address of the matching IP family.
    pub fn sent_by(&self, to: SocketAddr) -> (String, u16) {
        let local = self
            .udp
            .iter()
            .map(|(addr, _)| *addr)
            .find(|addr| addr.is_ipv4() == to.is_ipv4())
            .unwrap_or_else(|| self.local_addr());
        let host = match &self.advertised_host {
            Some(host) => host.clone(),
            None => {
                let ip = if local.ip().is_unspecified() { loopback_or_unspecified(to, local) } else { local.ip() };
                match ip {
                    IpAddr::V6(v6) => message::v6_host(v6),
                    IpAddr::V4(v4) => v4.to_string(),
                }
            }
        };
        (host, self.advertised_port.unwrap_or(local.port()))
    }

    /// Sends bytes to a peer: UDP from the socket of the peer's family, TCP over the existing
    /// connection or a new one.
    pub async fn send(self: &Arc<Self>, peer: Peer, bytes: Vec<u8>) -> Result<(), TransportError> {
        match peer.protocol {
            Protocol::Udp => {
                let socket = self
                    .udp
                    .iter()
                    .find(|(addr, _)| addr.is_ipv4() == peer.addr.is_ipv4())
                    .map(|(_, s)| s)
                    .ok_or(TransportError::NoSocket(Protocol::Udp, peer.addr))?;
                match socket.try_send_to(&bytes, peer.addr) {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket
                        .send_to(&bytes, peer.addr)
                        .await
                        .map(|_| ())
                        .map_err(|source| TransportError::Io { addr: peer.addr, source }),
                    Err(source) => Err(TransportError::Io { addr: peer.addr, source }),
                }
            }
            Protocol::Tcp => {
                let existing = self.connections.lock().unwrap_or_else(|p| p.into_inner()).get(&peer.addr).cloned();
                let sender = match existing {
                    Some(sender) if !sender.is_closed() => sender,
                    _ => {
                        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(peer.addr))
                            .await
                            .map_err(|_| TransportError::Io {
                                addr: peer.addr,
                                source: std::io::ErrorKind::TimedOut.into(),
                            })?
                            .map_err(|source| TransportError::Io { addr: peer.addr, source })?;
                        self.adopt(stream, peer.addr)
                    }
                };
                sender.try_send(bytes).map_err(|_| TransportError::Congested(peer.addr))
            }
        }
    }

    /// Sends a datagram without waiting: the endpoint's task must never block on the network.
    /// A full socket buffer is reported as an error (the transaction layer retransmits).
    pub fn try_send_udp(&self, addr: SocketAddr, bytes: &[u8]) -> Result<(), TransportError> {
        let socket = self
            .udp
            .iter()
            .find(|(local, _)| local.is_ipv4() == addr.is_ipv4())
            .map(|(_, s)| s)
            .ok_or(TransportError::NoSocket(Protocol::Udp, addr))?;
        socket.try_send_to(bytes, addr).map(|_| ()).map_err(|source| TransportError::Io { addr, source })
    }

    /// Registers a TCP connection and starts its reader and writer tasks.
    fn adopt(self: &Arc<Self>, stream: TcpStream, addr: SocketAddr) -> mpsc::Sender<Vec<u8>> {
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::channel(TCP_WRITE_QUEUE);
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, tx.clone());
        let (read, write) = stream.into_split();
        tokio::spawn(tcp_write(write, rx));
        tokio::spawn(tcp_read(Arc::clone(self), read, addr));
        tx
    }

    /// Local TCP listen addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_local
    }

    /// Parses one message and hands it on; answers unparseable requests with 400 when it can.
    async fn deliver(self: &Arc<Self>, bytes: &[u8], peer: Peer) {
        if !self.flood.allow(peer.addr.ip()) {
            self.metrics.message_dropped("flood");
            return;
        }
        match message::parse(bytes, peer.protocol.is_reliable()) {
            Ok(mut incoming) => {
                if let Incoming::Message(rsip::SipMessage::Request(request)) = &mut incoming {
                    stamp_received(request, peer.addr);
                }
                if self.sink.send(Received { message: incoming, peer }).await.is_err() {
                    self.metrics.message_dropped("shutdown");
                }
            }
            Err(ParseError::Incomplete) if bytes.iter().all(|b| b.is_ascii_whitespace()) => {
                // CRLF keepalive on UDP (RFC 5626 uses it on streams; some devices send it anyway).
            }
            Err(error) => {
                self.metrics.parse_error(peer.protocol.as_str());
                tracing::debug!(peer = %peer.addr, %error, "unparseable SIP message");
                if let Some(response) = message::bad_request(bytes, &error) {
                    let _ = self.send(peer, response).await;
                }
            }
        }
    }
}

/// UDP and TCP on the same port, as SIP expects. With port 0 the OS picks the UDP port, which
/// may already be taken for TCP: then another port is tried (a bounded number of times).
async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let attempts = if addr.port() == 0 { 32 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let socket = UdpSocket::bind(addr).await?;
        match TcpListener::bind(socket.local_addr()?).await {
            Ok(listener) => return Ok((socket, listener)),
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => last_error = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

/// The address to advertise when listening on an unspecified address: loopback for loopback
/// peers; otherwise the unspecified address, which callers should avoid by configuring an
/// advertised host.
fn loopback_or_unspecified(to: SocketAddr, local: SocketAddr) -> IpAddr {
    if to.ip().is_loopback() { to.ip() } else { local.ip() }
}

/// RFC 3261 18.2.1 and RFC 3581: records the source address in the top Via as `received`, and
/// fills in an empty `rport`, so that responses find their way back through NAT.
fn stamp_received(request: &mut rsip::Request, source: SocketAddr) {
    use rsip::common::uri::param::{OtherParam, OtherParamValue};
    use rsip::prelude::*;
    let Ok(via) = request.via_header_mut() else { return };
    let Ok(mut typed) = via.typed() else { return };
    let sent_by_ip = match &typed.uri.host_with_port.host {
        rsip::Host::IpAddr(ip) => Some(*ip),
        rsip::Host::Domain(domain) => message::host_ip(&domain.to_string()),
    };
    let mut changed = false;
    if sent_by_ip != Some(source.ip()) && typed.received().ok().flatten().is_none() {
        typed.params.push(rsip::Param::Received(rsip::param::Received::new(source.ip().to_string())));
        changed = true;
    }
    for param in &mut typed.params {
        if let rsip::Param::Other(name, value) = param
            && name.value().eq_ignore_ascii_case("rport")
            && value.is_none()
        {
            *value = Some(OtherParamValue::new(source.port().to_string()));
            let _ = OtherParam::new("rport");
            changed = true;
        }
    }
    if changed {
        *via = typed.into();
    }
}

async fn udp_receive(layer: Arc<TransportLayer>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, addr)) => {
                let peer = Peer { protocol: Protocol::Udp, addr };
                layer.deliver(&buf[..len], peer).await;
            }
            Err(error) => {
                // ICMP port unreachable surfaces here on some systems; never stop listening.
                tracing::trace!(%error, "UDP receive error");
            }
        }
        if layer.sink.is_closed() {
            return;
        }
    }
}

async fn tcp_accept(layer: Arc<TransportLayer>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                layer.adopt(stream, addr);
            }
            Err(error) => {
                tracing::warn!(%error, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if layer.sink.is_closed() {
            return;
        }
    }
}

async fn tcp_write(mut write: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if write.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

async fn tcp_read(layer: Arc<TransportLayer>, mut read: tokio::net::tcp::OwnedReadHalf, addr: SocketAddr) {
    let peer = Peer { protocol: Protocol::Tcp, addr };
    let mut buf = BytesMut::with_capacity(8192);
    'conn: loop {
        match tokio::time::timeout(TCP_IDLE, read.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
        loop {
            match message::frame(&buf) {
                Ok(Frame::Partial) => break,
                Ok(Frame::Keepalive(n)) => buf.advance(n),
                Ok(Frame::Complete(n)) => {
                    let bytes = buf.split_to(n);
                    layer.deliver(&bytes, peer).await;
                }
                Err(error) => {
                    // A stream whose framing is lost cannot be resynchronised: close it.
                    layer.metrics.parse_error("TCP");
                    tracing::debug!(peer = %addr, %error, "closing TCP connection with unframeable data");
                    if let Some(response) = message::bad_request(&buf, &error) {
                        let _ = layer.send(peer, response).await;
                    }
                    break 'conn;
                }
            }
        }
    }
    layer.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_guard_limits_one_source_only() {
        let guard = FloodGuard { rate: 10.0, buckets: Mutex::new(HashMap::new()) };
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let allowed = (0..100).filter(|_| guard.allow(a)).count();
        assert!((10..=11).contains(&allowed), "{allowed}");
        assert!(guard.allow(b));
    }

    #[test]
    fn received_and_rport_are_stamped() {
        let text = "OPTIONS sip:n@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKx;rport\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:n@c>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
        let Incoming::Message(rsip::SipMessage::Request(mut request)) = message::parse(text.as_bytes(), false).unwrap()
        else {
            panic!()
        };
        stamp_received(&mut request, "192.0.2.7:40000".parse().unwrap());
        let via = message::header_value(&request.headers, "Via").unwrap().to_string();
        assert!(via.contains("received=192.0.2.7"), "{via}");
        assert!(via.contains("rport=40000"), "{via}");
    }
}
