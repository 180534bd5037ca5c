//! The node's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
//!
//! - `GET /metrics`: the Prometheus text exposition of [`NodeMetrics`].
//! - `GET /healthz`: `200 ok` while the process serves HTTP (liveness).
//! - `GET /readyz`: `200 ready` when the `ready` check says so, else `503 not ready`
//!   (readiness: e.g. a configuration snapshot is loaded and the SIP transports are up), each
//!   followed by `: ` and the check's detail when it gives one (the node: which configuration
//!   generation it serves, and whether that is a stale copy from its disk).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::{CONTENT_TYPE, NodeMetrics};

/// What `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Appended to the body after `: `.
    pub detail: Option<String>,
}

impl From<bool> for Readiness {
    fn from(ready: bool) -> Self {
        Readiness { ready, detail: None }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: NodeMetrics,
    ready: Arc<dyn Fn() -> Readiness + Send + Sync>,
}

/// The routes, without a listener (for embedding or tests).
pub fn router<R, T>(metrics: NodeMetrics, ready: R) -> Router
where
    R: Fn() -> T + Send + Sync + 'static,
    T: Into<Readiness>,
{
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, ready: Arc::new(move || ready().into()) })
}

/// Serves the endpoint on `listener` until `shutdown` resolves, then finishes the requests in
/// progress and returns. `ready` is called for each `/readyz` request; to follow a
/// `tokio::sync::watch::Receiver<bool>`, pass `move || *receiver.borrow()`.
pub async fn serve<R, T, S>(
    listener: tokio::net::TcpListener,
    metrics: NodeMetrics,
    ready: R,
    shutdown: S,
) -> std::io::Result<()>
where
    R: Fn() -> T + Send + Sync + 'static,
    T: Into<Readiness>,
    S: Future<Output = ()> + Send + 'static,
{
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving /metrics, /healthz and /readyz on http://{address}");
    }
    axum::serve(listener, router(metrics, ready)).with_graceful_shutdown(shutdown).await
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], state.metrics.render())
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let Readiness { ready, detail } = (state.ready)();
    let (status, word) = if ready { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") };
    match detail {
        Some(detail) => (status, format!("{word}: {detail}")),
        None => (status, word.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    struct Reply {
        status: u16,
        headers: String,
        body: String,
    }

    /// One HTTP/1.1 request over a fresh connection (`Connection: close`: read to the end).
    async fn request(address: std::net::SocketAddr, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write request");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("reply in time")
            .expect("read reply");
        let raw = String::from_utf8(raw).expect("UTF-8 reply");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        let status = status_line.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("status code");
        Reply { status, headers: headers.to_ascii_lowercase(), body: body.to_owned() }
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness_then_shuts_down() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let metrics = NodeMetrics::new();
        metrics.retransmission();
        let ready = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let flag = ready.clone();
        let server = tokio::spawn(serve(listener, metrics.clone(), move || flag.load(Ordering::SeqCst), async {
            let _ = stopped.await;
        }));

        let reply = request(address, "GET", "/healthz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));

        let reply = request(address, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (503, "not ready"));
        ready.store(true, Ordering::SeqCst);
        let reply = request(address, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ready"));

        let reply = request(address, "GET", "/metrics").await;
        assert_eq!(reply.status, 200);
        assert!(reply.headers.contains("content-type: text/plain; version=0.0.4"), "{}", reply.headers);
        assert!(reply.body.contains("switchboard_sip_retransmissions_total 1"), "{}", reply.body);
        assert!(reply.body.contains("# TYPE switchboard_active_calls gauge"), "{}", reply.body);

        assert_eq!(request(address, "GET", "/nowhere").await.status, 404);
        assert_eq!(request(address, "POST", "/healthz").await.status, 405);

        stop.send(()).expect("server running");
        let result = tokio::time::timeout(Duration::from_secs(10), server).await.expect("stops in time");
        result.expect("server task").expect("serve returns Ok");
        assert!(TcpStream::connect(address).await.is_err(), "still listening after shutdown");
    }
}
