//! SIP transports: UDP and TCP sockets, stream framing, per-source flood limits, and the
//! advertised address that goes into Via and Contact when the node sits behind NAT.
//!
//! Everything that arrives is parsed here (on the socket's task, so parsing runs in parallel
//! with the transaction layer) and handed on as [`Received`]; what cannot be parsed is answered
//! with `400` when enough of it is readable, dropped otherwise, and counted either way. TLS
//! is the third [`Protocol`]: its handshakes and certificates live in [`super::tls`], and its
//! connections, once established, go through the same stream framing and tasks as TCP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::guard::{Guard, Slot, SourceClass, UnknownSources};
use super::message::{self, Frame, Incoming, ParseError};
use super::tls::{TlsError, TlsLayer};
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
    Tls,
}

impl Protocol {
    /// Reliable transports carry no retransmissions (RFC 3261 17.1.1.2).
    pub fn is_reliable(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Tls)
    }

    /// The token used in Via headers and `transport=` URI parameters.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "UDP",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
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
    /// A request's To tag as the parse read it (`None` for responses), so that the endpoint
    /// need not parse the To header again to find the dialog.
    pub to_tag: Option<String>,
    pub peer: Peer,
    /// What the configuration says about the source (see [`super::guard`]).
    pub source: SourceClass,
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no {0:?} socket for {1}")]
    NoSocket(Protocol, SocketAddr),
    #[error("sending to {addr} failed: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("connection to {0} is congested")]
    Congested(SocketAddr),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Listen and advertised addresses.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Addresses to listen on (UDP and TCP on each).
    pub listen: Vec<SocketAddr>,
    /// Host (and port) to put in Via/Contact instead of the listen address, for NAT.
    pub advertised_host: Option<String>,
    pub advertised_port: Option<u16>,
    /// SIP over TLS: listener, certificates and outbound trust (`None`: no TLS at all).
    pub tls: Option<Arc<TlsLayer>>,
}

/// The node's sockets. Cheap to share (`Arc`); sends never wait for the network except when a
/// TCP connection must first be opened.
pub struct TransportLayer {
    udp: Vec<(SocketAddr, Arc<UdpSocket>)>,
    tcp_local: Vec<SocketAddr>,
    /// Open stream connections (TCP and TLS), keyed by protocol and far address, so that
    /// requests and responses to a peer reuse the connection it opened or the node opened.
    connections: Mutex<HashMap<Peer, mpsc::Sender<Vec<u8>>>>,
    tls: Option<Arc<TlsLayer>>,
    tls_local: Vec<SocketAddr>,
    sink: mpsc::Sender<Received>,
    guard: Arc<Guard>,
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
        guard: Arc<Guard>,
        metrics: NodeMetrics,
    ) -> std::io::Result<Arc<Self>> {
        let mut udp = Vec::new();
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let (socket, listener) = bind_pair(*addr).await?;
            udp.push((socket.local_addr()?, Arc::new(socket)));
            listeners.push(listener);
        }
        let mut tls_listeners = Vec::new();
        if let Some(tls) = &config.tls {
            for addr in tls.listen_addrs(&config.listen) {
                tls_listeners.push(TcpListener::bind(addr).await?);
            }
        }
        let layer = Arc::new(TransportLayer {
            tls: config.tls.clone(),
            tls_local: tls_listeners.iter().filter_map(|l| l.local_addr().ok()).collect(),
            tcp_local: listeners.iter().filter_map(|l| l.local_addr().ok()).collect(),
            udp,
            connections: Mutex::new(HashMap::new()),
            sink,
            guard,
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
        for listener in tls_listeners {
            tokio::spawn(super::tls::accept_loop(Arc::clone(&layer), listener));
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

    /// [`Self::sent_by`] for a hop: over TLS the port is the TLS listener's (or the advertised
    /// TLS port), since that is where the peer must open connections back to the node.
    pub fn sent_by_peer(&self, to: Peer) -> (String, u16) {
        let (host, port) = self.sent_by(to.addr);
        match (to.protocol, &self.tls) {
            (Protocol::Tls, Some(tls)) => {
                let local = self.tls_local.iter().find(|a| a.is_ipv4() == to.addr.is_ipv4()).or(self.tls_local.first());
                (host, tls.advertised_port().or(local.map(|a| a.port())).unwrap_or(port))
            }
            _ => (host, port),
        }
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
            Protocol::Tcp | Protocol::Tls => {
                let existing = self.connections.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).cloned();
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
                        let _ = stream.set_nodelay(true);
                        if peer.protocol == Protocol::Tls {
                            let tls = self.tls.as_ref().ok_or(TransportError::NoSocket(Protocol::Tls, peer.addr))?;
                            let stream = tls.connect(stream, peer.addr).await?;
                            self.adopt(stream, peer, None)
                        } else {
                            let (read, write) = stream.into_split();
                            self.adopt_halves(read, write, peer, None)
                        }
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

    /// Registers an established stream (a TLS session after its handshake) like a TCP
    /// connection; `slot` is what an accepted connection holds of its source's budget.
    pub(crate) fn adopt<S>(self: &Arc<Self>, stream: S, peer: Peer, slot: Option<Slot>) -> mpsc::Sender<Vec<u8>>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        self.adopt_halves(read, write, peer, slot)
    }

    /// Registers a connection and starts its reader and writer tasks.
    fn adopt_halves<R, W>(self: &Arc<Self>, read: R, write: W, peer: Peer, slot: Option<Slot>) -> mpsc::Sender<Vec<u8>>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(TCP_WRITE_QUEUE);
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, tx.clone());
        tokio::spawn(tcp_write(write, rx));
        let entry = ConnectionEntry { layer: Arc::clone(self), peer, sender: tx.downgrade(), _slot: slot };
        tokio::spawn(tcp_read(entry, read));
        tx
    }

    /// Local TCP listen addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_local
    }

    /// Local TLS listen addresses (empty without TLS).
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_local
    }

    /// The TLS layer, when the node speaks TLS.
    pub fn tls(&self) -> Option<&Arc<TlsLayer>> {
        self.tls.as_ref()
    }

    /// Whether the message loop should stop (the node is shutting down).
    pub(crate) fn is_closed(&self) -> bool {
        self.sink.is_closed()
    }

    pub(crate) fn guard(&self) -> &Guard {
        &self.guard
    }

    pub(crate) fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }

    /// Parses one message and hands it on; answers unparseable requests with 400 when it can.
    /// Out-of-dialog requests from sources no trunk allows stop here, before the receive queue
    /// the carriers' messages share: dropped, or answered `403` once (`--unknown-sources`).
    async fn deliver(self: &Arc<Self>, bytes: &[u8], peer: Peer) {
        if !self.guard.allow_message(peer.addr.ip()) {
            self.metrics.message_dropped("flood");
            return;
        }
        let presented = self.tls.as_ref().is_some_and(|tls| tls.presented(peer));
        let source = self.guard.classify_presenting(peer.addr.ip(), presented);
        // A scan is dropped before it costs a parse: a request without a To tag cannot belong
        // to anything the node has, and only `reject` needs the parsed request.
        if source == SourceClass::Unknown
            && self.guard.unknown_sources() == UnknownSources::Drop
            && message::plainly_out_of_dialog(bytes)
        {
            self.metrics.message_dropped("unknown_source");
            return;
        }
        match message::parse_checked(bytes, peer.protocol.is_reliable()) {
            Ok((mut incoming, message::Checked { top_via, to_tag })) => {
                if source == SourceClass::Unknown && !in_dialog(&incoming, to_tag.is_some()) {
                    self.metrics.message_dropped("unknown_source");
                    if self.guard.unknown_sources() == UnknownSources::Reject {
                        self.reject(&incoming, peer).await;
                    }
                    return;
                }
                if let Incoming::Message(rsip::SipMessage::Request(request)) = &mut incoming {
                    stamp_parsed(request, top_via, peer.addr);
                }
                let to_tag =
                    if matches!(incoming, Incoming::Message(rsip::SipMessage::Request(_))) { to_tag } else { None };
                if self.sink.send(Received { message: incoming, to_tag, peer, source }).await.is_err() {
                    self.metrics.message_dropped("shutdown");
                }
            }
            Err(ParseError::Incomplete) if bytes.iter().all(|b| b.is_ascii_whitespace()) => {
                // CRLF keepalive on UDP (RFC 5626 uses it on streams; some devices send it anyway).
            }
            Err(error) => {
                self.metrics.parse_error(peer.protocol.as_str());
                tracing::debug!(peer = %peer.addr, %error, "unparseable SIP message");
                if source != SourceClass::Unknown
                    && let Some(response) = message::bad_request(bytes, &error)
                {
                    let _ = self.send(peer, response).await;
                }
            }
        }
    }

    /// `403` to a request from an unknown source, outside any transaction (so never
    /// retransmitted); nothing to an ACK or a response.
    async fn reject(self: &Arc<Self>, incoming: &Incoming, peer: Peer) {
        let request = match incoming {
            Incoming::Message(rsip::SipMessage::Request(request)) => request,
            Incoming::UnknownMethod { request, .. } => request,
            Incoming::Message(rsip::SipMessage::Response(_)) => return,
        };
        if request.method == rsip::Method::Ack {
            return;
        }
        let response = super::transaction::response_to(request, 403, Some("Forbidden"), None);
        self.metrics.message_sent("4xx");
        let _ = self.send(peer, message::encode(&rsip::SipMessage::Response(response))).await;
    }
}

/// Whether a message may belong to something the node started: a response (to one of its
/// requests), or a request with a To tag (in a dialog). The endpoint decides whether it does.
fn in_dialog(incoming: &Incoming, has_to_tag: bool) -> bool {
    match incoming {
        Incoming::Message(rsip::SipMessage::Response(_)) => true,
        Incoming::Message(rsip::SipMessage::Request(_)) => has_to_tag,
        Incoming::UnknownMethod { .. } => false,
    }
}

/// UDP and TCP on the same port, as SIP expects. With port 0 the OS picks the UDP port, which
/// may already be taken for TCP: then another port is tried (a bounded number of times).
async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let attempts = if addr.port() == 0 { 32 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let socket = UdpSocket::bind(addr).await?;
        widen_receive_buffer(&socket);
        match TcpListener::bind(socket.local_addr()?).await {
            Ok(listener) => return Ok((socket, listener)),
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => last_error = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

/// What the SIP UDP socket asks the kernel to buffer for it: 4 MiB (8 MiB once the kernel
/// doubles it for its bookkeeping) holds about 3,500 datagrams on loopback, a quarter to a
/// third of a second of the messages of 1,500–2,500 calls/s. Enough to ride out a pause of the
/// receive task; not so much that a node falling behind for good queues more than T1 (500 ms)
/// of stale requests that the peers retransmit anyway.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Asks for a receive buffer of [`UDP_RECEIVE_BUFFER`] bytes on the SIP UDP socket. The
/// kernel's default (`net.core.rmem_default`, 208 KiB) holds about a hundred datagrams; one
/// receive task drains the socket, and a pause of a few milliseconds at 1,500 calls/s (a
/// scheduler time slice on a busy core) overflowed it: the kernel dropped callers' INVITEs
/// and callees' answers, which came back only as retransmissions after 500 ms or as 408s
/// (issue 22's "408 bursts"). `SO_RCVBUFFORCE` passes `net.core.rmem_max` when the node may
/// (`CAP_NET_ADMIN`); otherwise `SO_RCVBUF` gets as much as `rmem_max` allows.
fn widen_receive_buffer(socket: &UdpSocket) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &UDP_RECEIVE_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &UDP_RECEIVE_BUFFER);
    }
    if let Ok(size) = getsockopt(socket, sockopt::RcvBuf) {
        tracing::debug!(bytes = size, "SIP UDP receive buffer");
    }
}

/// The address to advertise when listening on an unspecified address: loopback for loopback
/// peers; otherwise the unspecified address, which callers should avoid by configuring an
/// advertised host.
fn loopback_or_unspecified(to: SocketAddr, local: SocketAddr) -> IpAddr {
    if to.ip().is_loopback() { to.ip() } else { local.ip() }
}

/// RFC 3261 18.2.1 and RFC 3581: records the source address in the top Via as `received`, and
/// fills in an empty `rport`, so that responses find their way back through NAT. `typed` is the
/// request's top Via as [`message::parse_checked`] parsed it, so that a request's Via is
/// parsed once on its way in, not twice.
fn stamp_parsed(request: &mut rsip::Request, mut typed: rsip::typed::Via, source: SocketAddr) {
    use rsip::common::uri::param::{OtherParam, OtherParamValue};
    use rsip::prelude::*;
    let Ok(via) = request.via_header_mut() else { return };
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
                // Carriers are never refused a connection because of others; everyone else
                // holds a share of the connection budget (closing at once when there is none).
                let slot = match layer.guard.classify(addr.ip()) {
                    SourceClass::Carrier => None,
                    _ => match layer.guard.tcp_connections.try_acquire(addr.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            layer.metrics.message_dropped("tcp_limit");
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let (read, write) = stream.into_split();
                layer.adopt_halves(read, write, Peer { protocol: Protocol::Tcp, addr }, slot);
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

async fn tcp_write<W: AsyncWrite + Unpin>(mut write: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if write.write_all(&bytes).await.is_err() {
            return;
        }
        // TLS buffers records until flushed; for a plain socket this is a no-op.
        if write.flush().await.is_err() {
            return;
        }
    }
    // Close the stream (a TLS close_notify) once the connection leaves the table.
    let _ = write.shutdown().await;
}

async fn tcp_read<R: AsyncRead + Unpin>(entry: ConnectionEntry, mut read: R) {
    // Whatever ends this task (even a panic), `entry` drops: the connection leaves the table,
    // so its writer stops and the socket closes.
    let (layer, peer) = (&entry.layer, entry.peer);
    let addr = peer.addr;
    let mut buf = BytesMut::with_capacity(8192);
    let mut framer = message::StreamFramer::default();
    'conn: loop {
        match tokio::time::timeout(TCP_IDLE, read.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Err(error)) => {
                // A TLS 1.3 server refuses a client certificate after the handshake: the alert
                // arrives here, and is why the peer will not answer.
                if let (Protocol::Tls, Some(tls)) = (peer.protocol, &layer.tls) {
                    tls.session_failed(addr, &error);
                }
                break;
            }
            Ok(Ok(_)) => {}
        }
        loop {
            match framer.next(&buf) {
                Ok(Frame::Partial) => break,
                Ok(Frame::Keepalive(n)) => buf.advance(n),
                Ok(Frame::Complete(n)) => {
                    let bytes = buf.split_to(n);
                    layer.deliver(&bytes, peer).await;
                }
                Err(error) => {
                    // A stream whose framing is lost cannot be resynchronised: close it.
                    layer.metrics.parse_error(peer.protocol.as_str());
                    tracing::debug!(peer = %addr, %error, "closing stream connection with unframeable data");
                    if let Some(response) = message::bad_request(&buf, &error) {
                        let _ = layer.send(peer, response).await;
                    }
                    break 'conn;
                }
            }
        }
    }
}

/// A stream connection's place in [`TransportLayer::connections`], removed when its reader ends.
struct ConnectionEntry {
    layer: Arc<TransportLayer>,
    peer: Peer,
    /// This connection's writer queue. Weak: the table's sender is what keeps the writer open.
    sender: mpsc::WeakSender<Vec<u8>>,
    _slot: Option<Slot>,
}

impl Drop for ConnectionEntry {
    /// Removes the table's entry only when it is still this connection: a newer connection to
    /// the same peer (a reconnect after this one died) must outlive the old one's reader.
    fn drop(&mut self) {
        let mut table = self.layer.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mine = self.sender.upgrade();
        if table.get(&self.peer).zip(mine).is_some_and(|(current, mine)| current.same_channel(&mine)) {
            table.remove(&self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`stamp_parsed`] for a request whose top Via is not parsed yet.
    fn stamp_received(request: &mut rsip::Request, source: SocketAddr) {
        use rsip::prelude::*;
        let Ok(via) = request.via_header() else { return };
        let Ok(typed) = via.typed() else { return };
        stamp_parsed(request, typed, source);
    }

    /// The SIP UDP socket holds at least what `net.core.rmem_max` lets any socket ask for (up
    /// to [`UDP_RECEIVE_BUFFER`]), not the kernel's default that overflowed at 1,500 calls/s.
    #[tokio::test]
    async fn the_sip_udp_socket_gets_a_large_receive_buffer() {
        use nix::sys::socket::{getsockopt, sockopt};
        let (socket, _listener) = bind_pair("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
        let size = getsockopt(&socket, sockopt::RcvBuf).unwrap();
        // Linux doubles what it is asked for (bookkeeping overhead) and reports the double.
        assert!(size >= 2 * rmem_max.min(UDP_RECEIVE_BUFFER), "receive buffer {size} bytes, rmem_max {rmem_max}");
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

    /// A reconnect to a peer whose old connection is still being torn down: the old reader's
    /// end must not take the new connection out of the table (sends would then open a third).
    #[tokio::test]
    async fn an_old_connection_ending_leaves_a_newer_one_to_the_same_peer() {
        let snapshot = crate::config::Snapshot::from_parts(1, vec![], vec![], vec![], vec![]).unwrap();
        let guard = Guard::new(&crate::sip::guard::GuardArgs::default(), 1_000, &snapshot);
        let config = TransportConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            advertised_host: None,
            advertised_port: None,
            tls: None,
        };
        let (sink, _received) = mpsc::channel(4);
        let layer = TransportLayer::bind(&config, sink, guard, NodeMetrics::new()).await.unwrap();
        let peer = Peer { protocol: Protocol::Tcp, addr: "127.0.0.1:5999".parse().unwrap() };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let old_far = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (old_near, _) = listener.accept().await.unwrap();
        let _new_far = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (new_near, _) = listener.accept().await.unwrap();
        layer.adopt(old_near, peer, None);
        let new = layer.adopt(new_near, peer, None);
        // Each reader holds the layer: the count drops when the old one has ended.
        let with_both = Arc::strong_count(&layer);
        drop(old_far);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&layer) == with_both {
            assert!(std::time::Instant::now() < deadline, "the old connection's reader did not end");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let table = layer.connections.lock().unwrap();
        assert!(
            table.get(&peer).is_some_and(|current| current.same_channel(&new)),
            "the newer connection left the table"
        );
    }
}
