//! The TLS listener: accepts TCP connections under the flood guard's connection budget, then
//! completes each handshake on a task of its own within the handshake timeout. A client that
//! stalls or sends garbage costs one task for at most the timeout and is counted.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::sip::guard::SourceClass;
use crate::sip::transport::{Peer, Protocol, TransportLayer};

/// Accepts TLS connections until the node stops.
pub(crate) async fn accept_loop(layer: Arc<TransportLayer>, listener: TcpListener) {
    let Some(tls) = layer.tls().cloned() else { return };
    let Some(server) = &tls.server else { return };
    let acceptor = server.acceptor.clone();
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let slot = match layer.guard().classify(addr.ip()) {
                    SourceClass::Carrier => None,
                    _ => match layer.guard().tcp_connections.try_acquire(addr.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            layer.metrics().message_dropped("tcp_limit");
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let (layer, acceptor, timeout) = (Arc::clone(&layer), acceptor.clone(), tls.handshake_timeout);
                let tls = Arc::clone(&tls);
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(session)) => {
                            // What the client presented, kept for admission while the
                            // connection lives (see peer.rs).
                            let presented = session.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                            let registration = presented
                                .and_then(super::PeerCertificate::new)
                                .map(|cert| tls.peers.register(addr, cert));
                            let session = super::peer::Registered::new(session, registration);
                            layer.adopt(session, Peer { protocol: Protocol::Tls, addr }, slot);
                        }
                        Ok(Err(error)) => {
                            layer.metrics().message_dropped("tls_handshake");
                            tracing::debug!(peer = %addr, %error, "TLS handshake failed");
                        }
                        Err(_) => {
                            layer.metrics().message_dropped("tls_handshake_timeout");
                            tracing::debug!(peer = %addr, "TLS handshake timed out");
                        }
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "TLS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if layer.is_closed() {
            return;
        }
    }
}
