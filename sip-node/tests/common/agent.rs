//! The WebSocket test agent (Twilio Media Streams), a status-webhook receiver and the REST API
//! on the test database, shared by the agent and transfer tests.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::DID;

pub const WAIT: Duration = Duration::from_secs(10);

/// A scriptable agent: every JSON message it receives is logged with its arrival time; what
/// the test sends on `out` goes to the node. A closed socket logs `{"event": "closed"}`.
pub struct Agent {
    pub url: String,
    pub seen: mpsc::UnboundedReceiver<(Instant, Value)>,
    pub out: mpsc::UnboundedSender<Message>,
    pub log: Vec<(Instant, Value)>,
}

impl Agent {
    pub async fn start() -> Agent {
        Agent::listen(None).await
    }

    /// An agent at a `wss://` URL whose certificate the test CA signed (`tests/fixtures/agent-tls`).
    pub async fn start_tls() -> Agent {
        Agent::listen(Some(test_tls_acceptor())).await
    }

    pub async fn listen(tls: Option<tokio_rustls::TlsAcceptor>) -> Agent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let url = format!("{scheme}://{}/agent", listener.local_addr().unwrap());
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (out, out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            match tls {
                None => serve_agent(tokio_tungstenite::accept_async(stream).await.unwrap(), &seen_tx, out_rx).await,
                // A handshake the node gives up (it does not trust the certificate) ends the agent.
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                        serve_agent(ws, &seen_tx, out_rx).await
                    }
                    Err(error) => {
                        let _ =
                            seen_tx.send((Instant::now(), json!({"event": "tls-failed", "error": error.to_string()})));
                    }
                },
            }
            let _ = seen_tx.send((Instant::now(), json!({"event": "closed"})));
        });
        Agent { url, seen, out, log: vec![] }
    }

    pub fn send(&self, value: Value) {
        self.out.send(Message::text(value.to_string())).unwrap();
    }

    pub fn send_audio(&self, audio: &[u8]) {
        self.send(json!({"event": "media", "streamSid": "MZtest", "media": {"payload": BASE64.encode(audio)}}));
    }

    pub fn send_mark(&self, name: &str) {
        self.send(json!({"event": "mark", "streamSid": "MZtest", "mark": {"name": name}}));
    }

    /// The next message of kind `event` (others are logged and skipped), with its arrival.
    pub async fn expect(&mut self, event: &str) -> (Instant, Value) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.seen.recv()).await;
            let (at, value) = next.unwrap_or_else(|_| panic!("no {event} within {WAIT:?}")).expect("agent task ended");
            self.log.push((at, value.clone()));
            if value["event"] == event {
                return (at, value);
            }
            assert_ne!(value["event"], "closed", "the socket closed while waiting for {event}");
        }
    }

    /// Messages that arrived so far without waiting.
    pub fn drain(&mut self) {
        while let Ok(entry) = self.seen.try_recv() {
            self.log.push(entry);
        }
    }

    pub fn logged(&self, event: &str) -> Vec<&Value> {
        self.log.iter().map(|(_, v)| v).filter(|v| v["event"] == event).collect()
    }
}

/// Logs what the node sends and sends what the test queues, until either side closes.
pub async fn serve_agent<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    seen: &mpsc::UnboundedSender<(Instant, Value)>,
    mut out: mpsc::UnboundedReceiver<Message>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).expect("the node sends JSON");
                    let _ = seen.send((Instant::now(), value));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            message = out.recv() => match message {
                Some(message) => {
                    if ws.send(message).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
}

pub fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agent-tls").join(name)
}

/// The test agent's TLS server: a certificate for 127.0.0.1 and localhost, signed by the test CA.
pub fn test_tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls_fixture("server.pem")).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.key")).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// Status webhooks received, in order.
pub type Hooks = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

/// A webhook receiver on loopback; returns its URL and what it received.
pub async fn webhook_receiver() -> (String, Hooks) {
    use axum::extract::State;
    let seen: Hooks = Default::default();
    async fn receive(State(seen): State<Hooks>, body: String) -> &'static str {
        seen.lock().unwrap().push(serde_json::from_str(&body).unwrap());
        "ok"
    }
    let app = axum::Router::new().route("/hooks", axum::routing::post(receive)).with_state(seen.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// The statuses received so far, once `expected` of them arrived (bounded wait).
pub async fn statuses(hooks: &Hooks, expected: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen: Vec<String> =
            hooks.lock().unwrap().iter().map(|v| v["status"].as_str().unwrap_or_default().to_string()).collect();
        if seen.len() >= expected || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The REST API over the test database on loopback, with a token that may transfer calls
/// (the folder store is unused: no trunk is written). The DID and an outbound RoutingRule
/// covering +1555 numbers are written into the tables the API's toll-fraud guard reads.
pub struct RestApi {
    pub base: String,
    pub token: String,
    pub _dir: tempfile::TempDir,
}

impl RestApi {
    pub async fn start(pool: &PgPool) -> RestApi {
        use switchboard_api::auth::{JwtVerifier, Scope};
        sqlx::query(
            "INSERT INTO phone_numbers (namespace, name, number, trunk_ref, spec_hash, config_generation)
             VALUES ('default', 'did', $1, 'carrier', 'test', 1)",
        )
        .bind(DID)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO routing_rules (namespace, name, direction, match_spec, trunks, spec_hash, config_generation)
             VALUES ('default', 'to-humans', 'outbound', '{\"destinationPatterns\": [\"^\\\\+1555\"]}', '{carrier}', 'test', 1)",
        )
        .execute(pool)
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let verifier = std::sync::Arc::new(JwtVerifier::new(b"transfer-test-secret-transfer-test!!", "switchboard"));
        let token = verifier.mint_scoped("agent", 300, &[Scope::Calls]).unwrap();
        let store = std::sync::Arc::new(switchboard_api::store::FolderStore::new(dir.path()));
        let egress = switchboard_model::egress::EgressPolicy::parse(&["127.0.0.0/8".to_string()]).unwrap();
        let state = switchboard_api::AppState::new(pool.clone(), store, "default").with_egress(egress);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = switchboard_api::router(state, verifier);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        RestApi { base, token, _dir: dir }
    }

    /// `POST /api/calls/{call_sid}/transfer` as an agent makes it: the status and the body.
    pub async fn transfer(&self, call_sid: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/api/calls/{call_sid}/transfer"), Some(body)).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = reqwest::Client::new().post(format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.timeout(Duration::from_secs(15)).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }
}

/// Waits until the node has written the call's active row (its store is buffered).
pub async fn wait_for_active_row(pool: &PgPool, call_sid: &str) {
    let deadline = Instant::now() + WAIT;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM active_calls WHERE call_id = $1 AND state = 'answered'")
        .bind(call_sid)
        .fetch_one(pool)
        .await
        .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "the call has no answered active row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn payload_of(media: &Value) -> Vec<u8> {
    BASE64.decode(media["media"]["payload"].as_str().unwrap()).unwrap()
}
