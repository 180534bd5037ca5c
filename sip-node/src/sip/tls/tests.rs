//! The TLS transport against rustls peers in the same process, on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::*;
use crate::config::Snapshot;
use crate::metrics::NodeMetrics;
use crate::sip::guard::{Guard, GuardArgs};
use crate::sip::transport::{Peer, Protocol, Received, TransportConfig, TransportLayer};

#[path = "../../../tests/common/pki.rs"]
pub(super) mod pki;
use pki::{Ca, Leaf};

const OPTIONS: &str = "OPTIONS sip:node@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKtls1;rport\r\n\
From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:node@127.0.0.1>\r\nCall-ID: tls-test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";

/// A node transport on loopback whose snapshot allows 127.0.0.1 (so its messages get through
/// the flood guard), with TLS from `args`.
async fn node(args: TlsArgs) -> (Arc<TransportLayer>, Arc<TlsLayer>, mpsc::Receiver<Received>, NodeMetrics) {
    let trunk = switchboard_model::TrunkConfig::loopback("carrier", vec![]);
    let snapshot = Snapshot::from_parts(1, vec![trunk], vec![], vec![], vec![]).unwrap();
    let guard = Guard::new(&GuardArgs::default(), 20_000, &snapshot);
    let metrics = NodeMetrics::new();
    let listen: Vec<SocketAddr> = vec!["127.0.0.1:0".parse().unwrap()];
    let args = TlsArgs { listen: listen.clone(), ..args };
    let tls = TlsLayer::from_args(&args, &listen).unwrap();
    let (tx, rx) = mpsc::channel(16);
    let config = TransportConfig { listen, advertised_host: None, advertised_port: None, tls: Some(Arc::clone(&tls)) };
    let layer = TransportLayer::bind(&config, tx, guard, metrics.clone()).await.unwrap();
    (layer, tls, rx, metrics)
}

/// TLS arguments serving `leaf` from files in `dir`.
fn serving(dir: &std::path::Path, leaf: &Leaf) -> TlsArgs {
    let (cert, key) = leaf.write(dir, "server");
    TlsArgs { cert: Some(cert), key: Some(key), handshake_timeout_ms: 500, ..TlsArgs::default() }
}

fn client_config(ca: &Ca) -> Arc<rustls::ClientConfig> {
    Arc::new(super::client::client_config(&[CertificateDer::from(ca.der())], false, None).unwrap())
}

async fn tls_client(addr: SocketAddr, ca: &Ca) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(ca));
    connector.connect(ServerName::try_from("127.0.0.1").unwrap(), stream).await
}

/// Reads until `needle` shows up (bounded).
async fn read_until<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in {}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

async fn next_message(rx: &mut mpsc::Receiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a message in time").expect("open")
}

#[tokio::test]
async fn a_request_over_tls_arrives_as_tls_and_the_answer_takes_the_same_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (layer, _tls, mut rx, _) = node(serving(dir.path(), &ca.leaf(&["127.0.0.1"]))).await;
    let addr = layer.tls_addrs()[0];
    let mut client = tls_client(addr, &ca).await.expect("handshake with the node");
    client.write_all(OPTIONS.as_bytes()).await.unwrap();
    let received = next_message(&mut rx).await;
    assert_eq!(received.peer.protocol, Protocol::Tls);
    layer.send(received.peer, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()).await.unwrap();
    read_until(&mut client, "200 OK").await;
    // Via and Contact towards a TLS peer name the TLS listener's port.
    assert_eq!(layer.sent_by_peer(received.peer).1, addr.port());
}

#[tokio::test]
async fn stalled_and_garbage_handshakes_are_closed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (layer, _tls, mut rx, metrics) = node(serving(dir.path(), &ca.leaf(&["127.0.0.1"]))).await;
    let addr = layer.tls_addrs()[0];
    // Plaintext SIP on the TLS port.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(OPTIONS.as_bytes()).await.unwrap();
    // A client that connects and says nothing: closed once the handshake timeout (500 ms) ends.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    for stream in [&mut garbage, &mut stalled] {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a TLS alert
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the node keeps a connection that never completes a handshake");
    }
    let text = metrics.render();
    assert!(text.contains("tls_handshake\""), "{text}");
    assert!(text.contains("tls_handshake_timeout"), "{text}");
    // Nothing reached the transaction layer, and the listener still serves real clients.
    assert!(rx.try_recv().is_err());
    let mut client = tls_client(addr, &ca).await.expect("handshake after the bad ones");
    client.write_all(OPTIONS.as_bytes()).await.unwrap();
    assert_eq!(next_message(&mut rx).await.peer.protocol, Protocol::Tls);
}

/// A client that stops in the middle of its ClientHello is closed at the handshake timeout,
/// counted, and leaves no task behind (the handshake's task ends with it).
#[tokio::test]
async fn a_client_stalling_mid_handshake_is_closed_and_leaves_no_task() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (layer, _tls, mut rx, metrics) = node(serving(dir.path(), &ca.leaf(&["127.0.0.1"]))).await;
    let addr = layer.tls_addrs()[0];
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let before = tasks();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    // A handshake record announcing a 512-byte ClientHello, and only its first six bytes.
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a half-sent ClientHello keeps its connection past the timeout");
    assert!(metrics.render().contains("tls_handshake_timeout"), "{}", metrics.render());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tasks() > before {
        assert!(std::time::Instant::now() < deadline, "{} tasks left after the stalled handshake", tasks() - before);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rx.try_recv().is_err(), "nothing reached the transaction layer");
}

/// A TLS client with a certificate for `name` from `ca`, trusting `ca` for the node.
fn client_with_certificate(ca: &Ca, name: &str) -> Arc<rustls::ClientConfig> {
    let leaf = ca.leaf(&[name]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(leaf.der.clone())],
            PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(config)
}

/// Inbound mutual TLS at the listener: every client is asked for a certificate; what one
/// presents is kept while its connection lives (for admission) and forgotten after, and a client
/// without a certificate still connects.
#[tokio::test]
async fn a_presented_client_certificate_is_kept_while_its_connection_lives() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (layer, tls, mut rx, _) = node(serving(dir.path(), &ca.leaf(&["127.0.0.1"]))).await;
    let addr = layer.tls_addrs()[0];
    let connect = move |config: Arc<rustls::ClientConfig>| async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut session = tokio_rustls::TlsConnector::from(config).connect(name, stream).await.unwrap();
        session.write_all(OPTIONS.as_bytes()).await.unwrap();
        session
    };

    let with_cert = connect(client_with_certificate(&ca, "caller.test")).await;
    let received = next_message(&mut rx).await;
    let presented = tls.peer_certificate(received.peer.addr).expect("the certificate is kept");
    assert_eq!(presented.dns_names, ["caller.test"]);
    assert!(tls.presented(received.peer));

    let _without = connect(client_config(&ca)).await;
    let received = next_message(&mut rx).await;
    assert!(tls.peer_certificate(received.peer.addr).is_none(), "a client without a certificate still connects");
    assert!(!tls.presented(received.peer));

    drop(with_cert);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !tls.peers().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the closed connection's certificate is still kept");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_connections_while_old_ones_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (first, second) = (ca.leaf(&["127.0.0.1"]), ca.leaf(&["127.0.0.1"]));
    let (layer, tls, mut rx, _) = node(serving(dir.path(), &first)).await;
    let addr = layer.tls_addrs()[0];
    let mut old = tls_client(addr, &ca).await.unwrap();
    assert_eq!(old.get_ref().1.peer_certificates().unwrap()[0].as_ref(), first.der.as_slice());
    let cert = tls.server_cert().unwrap();
    assert!(!cert.reload_if_changed().unwrap(), "nothing changed yet");
    // A broken renewal (a key that does not match) keeps the old pair.
    std::fs::write(dir.path().join("server.crt"), &second.cert_pem).unwrap();
    assert!(cert.reload_if_changed().is_err());
    second.write(dir.path(), "server");
    assert!(cert.reload_if_changed().unwrap());
    let new = tls_client(addr, &ca).await.unwrap();
    assert_eq!(new.get_ref().1.peer_certificates().unwrap()[0].as_ref(), second.der.as_slice());
    old.write_all(OPTIONS.as_bytes()).await.unwrap();
    assert_eq!(next_message(&mut rx).await.peer.protocol, Protocol::Tls, "the old connection still works");
}

/// A TLS server on loopback serving `leaf`; counts accepted connections and forwards what it reads.
async fn tls_server(leaf: &Leaf) -> (SocketAddr, mpsc::Receiver<String>, Arc<std::sync::atomic::AtomicUsize>) {
    let chain = vec![CertificateDer::from(leaf.der.clone())];
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel(16);
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(mut session) = acceptor.accept(stream).await else { return };
                let mut buf = [0u8; 4096];
                while let Ok(n) = session.read(&mut buf).await {
                    if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx, accepted)
}

#[tokio::test]
async fn outbound_tls_trusts_only_known_roots_and_reuses_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let private_ca = Ca::new("provider CA");
    let (server, mut got, accepted) = tls_server(&private_ca.leaf(&["sip.provider.test"])).await;
    let peer = Peer { protocol: Protocol::Tls, addr: server };

    // Web PKI roots only: the provider's private CA is not trusted, and the reason says so.
    let (layer, tls, _rx, _) = node(TlsArgs::default()).await;
    tls.client().remember(server, "sip.provider.test");
    let error = layer.send(peer, OPTIONS.as_bytes().to_vec()).await.expect_err("an untrusted server is refused");
    assert!(error.to_string().contains("not trusted (unknown issuer)"), "{error}");
    assert!(tls.client().last_failure(server).unwrap().contains("tls.caSecretRef"));

    // With the CA: verified against the gateway's name (sent as SNI), one connection for both sends.
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, private_ca.pem()).unwrap();
    let (layer, tls, _rx, _) = node(TlsArgs { ca_file: Some(ca_file.clone()), ..TlsArgs::default() }).await;
    tls.client().remember(server, "sip.provider.test");
    let refused = accepted.load(std::sync::atomic::Ordering::SeqCst);
    layer.send(peer, OPTIONS.as_bytes().to_vec()).await.expect("a trusted server");
    layer.send(peer, OPTIONS.as_bytes().to_vec()).await.expect("a second request");
    let mut text = String::new();
    while text.matches("OPTIONS sip:").count() < 2 {
        text.push_str(&tokio::time::timeout(Duration::from_secs(5), got.recv()).await.unwrap().unwrap());
    }
    assert!(tls.client().last_failure(server).is_none());
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst) - refused, 1, "two requests, one connection");

    // The same server under a name its certificate does not carry.
    let (layer, tls, _rx, _) = node(TlsArgs { ca_file: Some(ca_file), ..TlsArgs::default() }).await;
    tls.client().remember(server, "other.provider.test");
    let error = layer.send(peer, OPTIONS.as_bytes().to_vec()).await.expect_err("a wrong name is refused");
    assert!(error.to_string().contains("does not name this gateway"), "{error}");
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("provider CA");
    let (server, _got, _) = tls_server(&ca.expired_leaf(&["127.0.0.1"])).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (layer, _tls, _rx, _) = node(TlsArgs { ca_file: Some(ca_file), ..TlsArgs::default() }).await;
    let error = layer
        .send(Peer { protocol: Protocol::Tls, addr: server }, OPTIONS.as_bytes().to_vec())
        .await
        .expect_err("expired");
    assert!(error.to_string().contains("expired"), "{error}");
}

#[test]
fn half_a_certificate_configuration_is_an_error() {
    let args = TlsArgs { cert: Some("/nonexistent.crt".into()), ..TlsArgs::default() };
    assert!(matches!(TlsLayer::from_args(&args, &[]), Err(TlsError::HalfConfigured(_))));
    let args = TlsArgs { client_key: Some("/nonexistent.key".into()), ..TlsArgs::default() };
    assert!(matches!(TlsLayer::from_args(&args, &[]), Err(TlsError::HalfConfigured(_))));
    let args =
        TlsArgs { cert: Some("/nonexistent.crt".into()), key: Some("/nonexistent.key".into()), ..TlsArgs::default() };
    let error = TlsLayer::from_args(&args, &[]).unwrap_err().to_string();
    assert!(error.contains("/nonexistent.crt"), "{error}");
}

/// The figure: full TLS handshakes per second the node's listener completes, one client after
/// another on loopback (ECDSA P-256 certificate from rcgen, TLS 1.3, ring), printed, not asserted.
#[tokio::test]
#[ignore = "a figure, not a check: cargo test -p switchboard-node --release --lib sip::tls::tests::handshakes_per_second -- --ignored --nocapture"]
async fn handshakes_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (layer, _tls, _rx, _) = node(serving(dir.path(), &ca.leaf(&["127.0.0.1"]))).await;
    let addr = layer.tls_addrs()[0];
    // Without a client certificate, and with one (inbound mutual TLS: the client signs, the node
    // verifies), in alternating batches so that other load on the machine weighs on both alike.
    let kinds = [
        ("without a client certificate", client_config(&ca)),
        ("mutual TLS", client_with_certificate(&ca, "caller.test")),
    ];
    let (rounds, batch) = (5, 100u32);
    let mut spent = [Duration::ZERO; 2];
    for _ in 0..rounds {
        for (i, (_, config)) in kinds.iter().enumerate() {
            let started = std::time::Instant::now();
            for _ in 0..batch {
                let stream = TcpStream::connect(addr).await.unwrap();
                let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
                let mut session = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), stream).await.unwrap();
                session.shutdown().await.ok();
            }
            spent[i] += started.elapsed();
        }
    }
    for ((what, _), elapsed) in kinds.iter().zip(spent) {
        let count = rounds * batch;
        println!(
            "{count} TLS handshakes {what} (client and node in one process) in {elapsed:?}: {:.0} handshakes/s",
            f64::from(count) / elapsed.as_secs_f64()
        );
    }
}

/// The TLS flags live beside the node's others without a clash of clap ids (the UDP/TCP
/// `--advertised-port` and the TLS one once shared a field name).
#[test]
fn the_tls_flags_parse_beside_the_nodes_other_flags() {
    use clap::{CommandFactory, Parser};
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sip: crate::signaling::SipArgs,
    }
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from([
        "node",
        "--advertised-port=5060",
        "--sip-tls-advertised-port=5062",
        "--sip-tls-cert=/tls/tls.crt",
        "--sip-tls-key=/tls/tls.key",
        "--sip-tls-client-cert=/tls/client.crt",
        "--sip-tls-client-key=/tls/client.key",
        "--sip-tls-ca-file=/tls/ca.pem",
        "--sip-tls-listen=0.0.0.0:5061",
    ])
    .unwrap();
    assert_eq!((cli.sip.advertised_port, cli.sip.tls.advertised_port), (Some(5060), Some(5062)));
    assert_eq!(cli.sip.tls.listen, vec!["0.0.0.0:5061".parse::<SocketAddr>().unwrap()]);
    assert!(cli.sip.tls.client_key.is_some() && cli.sip.tls.ca_file.is_some());
}
