//! What the node does with bad or hostile input from the network: a `400` where a response is
//! possible, a drop otherwise, `501`/`405`/`481` for what it does not do, a flood limit per
//! source, a counter for each — and it keeps answering afterwards.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn request(method: &str, cseq_method: &str, extra: &str, body: &str, length: Option<usize>) -> String {
    let length = length.unwrap_or(body.len());
    format!(
        "{method} sip:+15550001111@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK{}\r\n\
         From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:+15550001111@127.0.0.1>{extra}\r\nCall-ID: {}\r\nCSeq: 1 {cseq_method}\r\n\
         Max-Forwards: 70\r\nContent-Length: {length}\r\n\r\n{body}",
        rand_token(),
        rand_token()
    )
}

fn rand_token() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

/// Sends one datagram and returns the status line of the answer, if one comes within 1 s.
async fn exchange(socket: &UdpSocket, node: SocketAddr, bytes: &[u8]) -> Option<String> {
    let answer = exchange_message(socket, node, bytes).await?;
    Some(answer.lines().next().unwrap_or_default().to_string())
}

/// Sends one datagram and returns the whole final answer, if one comes within 1 s.
async fn exchange_message(socket: &UdpSocket, node: SocketAddr, bytes: &[u8]) -> Option<String> {
    socket.send_to(bytes, node).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
            Ok(Ok((len, _))) => {
                let text = String::from_utf8_lossy(&buf[..len]).to_string();
                // A 100 Trying may precede the final answer.
                if !text.starts_with("SIP/2.0 100") {
                    return Some(text);
                }
            }
            _ => return None,
        }
    }
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn bad_datagrams_get_400_or_silence_and_the_node_keeps_answering(pool: PgPool) {
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![]).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // Garbage, binary, truncated: nothing to answer, dropped.
    for junk in [
        &b"\x00\x01\x02\xff\xfe"[..],
        b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP",
        b"hello\r\n\r\n",
        &[0xffu8; 3000][..],
    ] {
        assert_eq!(exchange(&socket, node.addr, junk).await, None);
    }
    // Content-Length longer than the body: answerable, so 400.
    let short = request("OPTIONS", "OPTIONS", "", "abc", Some(400));
    assert_eq!(exchange(&socket, node.addr, short.as_bytes()).await.as_deref(), Some("SIP/2.0 400 Bad Request"));
    // Missing mandatory header with the rest present: 400 when the five are there is not
    // possible, so it is dropped.
    let no_call_id = request("OPTIONS", "OPTIONS", "", "", None).replace("Call-ID", "X-Call-ID");
    assert_eq!(exchange(&socket, node.addr, no_call_id.as_bytes()).await, None);
    // Unknown method: 501. Known but not served here: 405. In-dialog for nothing: 481.
    let unknown = request("FROBNICATE", "FROBNICATE", "", "", None);
    assert_eq!(exchange(&socket, node.addr, unknown.as_bytes()).await.as_deref(), Some("SIP/2.0 501 Not Implemented"));
    let register = request("REGISTER", "REGISTER", "", "", None);
    assert_eq!(
        exchange(&socket, node.addr, register.as_bytes()).await.as_deref(),
        Some("SIP/2.0 405 Method Not Allowed")
    );
    let bye = request("BYE", "BYE", ";tag=nothing", "", None);
    assert_eq!(
        exchange(&socket, node.addr, bye.as_bytes()).await.as_deref(),
        Some("SIP/2.0 481 Call/Transaction Does Not Exist")
    );
    // Oversized (but a valid datagram): a 60 kB header is refused, not a crash.
    let huge = request("OPTIONS", "OPTIONS", &format!("\r\nX-Pad: {}", "a".repeat(66_000)), "", None);
    let _ = socket.send_to(&huge.as_bytes()[..65_000], node.addr).await;
    // Still alive and answering.
    let options = request("OPTIONS", "OPTIONS", "", "", None);
    assert_eq!(exchange(&socket, node.addr, options.as_bytes()).await.as_deref(), Some("SIP/2.0 200 OK"));

    let metrics = http_get(node.http, "/metrics").await;
    let parse_errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("switchboard_sip_parse_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(parse_errors >= 3.0, "parse errors must be counted:\n{metrics}");
    node.stop().await;
}

/// RFC 3261 8.2.2.3: a request that requires an extension the node does not implement
/// (session timers, unknown ones, ...) is refused with `420` naming them, not served as if
/// understood; the caller can retry without them. (`100rel` is served since issue 24:
/// tests/call_control.rs.)
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn requests_requiring_unknown_extensions_get_420_naming_them(pool: PgPool) {
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![]).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let invite = request("INVITE", "INVITE", "", sdp, None)
        .replace("Max-Forwards", "Require: 100rel, x-foo\r\nContent-Type: application/sdp\r\nMax-Forwards");
    let answer = exchange_message(&socket, node.addr, invite.as_bytes()).await.expect("the INVITE is answered");
    assert!(answer.starts_with("SIP/2.0 420 Bad Extension\r\n"), "{answer}");
    assert!(answer.contains("\r\nUnsupported: x-foo\r\n"), "only what the node lacks is named: {answer}");
    let options =
        request("OPTIONS", "OPTIONS", "", "", None).replace("Max-Forwards", "Require: timer, x-foo\r\nMax-Forwards");
    let answer = exchange_message(&socket, node.addr, options.as_bytes()).await.expect("the OPTIONS is answered");
    assert!(answer.starts_with("SIP/2.0 420 Bad Extension\r\n"), "{answer}");
    assert!(answer.contains("\r\nUnsupported: timer, x-foo\r\n"), "{answer}");
    // Supported (not Require) and Proxy-Require change nothing.
    let options = request("OPTIONS", "OPTIONS", "", "", None)
        .replace("Max-Forwards", "Supported: 100rel, timer\r\nProxy-Require: x-foo\r\nMax-Forwards");
    assert_eq!(exchange(&socket, node.addr, options.as_bytes()).await.as_deref(), Some("SIP/2.0 200 OK"));
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn tcp_messages_are_framed_by_content_length(pool: PgPool) {
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![]).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    // Two requests in one write, the second split across writes: both answered, in order.
    let first = request("OPTIONS", "OPTIONS", "", "", None).replace("UDP", "TCP");
    let second = request("FROBNICATE", "FROBNICATE", "", "", None).replace("UDP", "TCP");
    let (head, tail) = second.split_at(40);
    stream.write_all(format!("\r\n\r\n{first}{head}").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(tail.as_bytes()).await.unwrap();
    let mut received = String::new();
    let mut buf = [0u8; 8192];
    while received.matches("SIP/2.0 ").count() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed early: {received}");
        received.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let ok = received.find("SIP/2.0 200 OK").expect("OPTIONS answered");
    let not_implemented = received.find("SIP/2.0 501").expect("unknown method answered");
    assert!(ok < not_implemented);
    // A message without Content-Length cannot be framed on a stream: the connection closes.
    stream.write_all(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKx\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an unframeable stream must be closed");
    node.stop().await;
}

/// Issue 19 item 2: `Content-Length: 18446744073709551615` over TCP. Before the fix a debug
/// build panicked in the connection's reader (the connection then stayed open, never read
/// again) and a release build wrapped `end + length`, framed the stream in the wrong place and
/// answered the request smuggled behind the body (`abcOPTIONS` → 501). Now the connection gets
/// a 400 and is closed, nothing behind the header is parsed, and the node goes on serving.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_content_length_of_u64_max_closes_the_tcp_connection_without_smuggling(pool: PgPool) {
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![]).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let hostile = request("OPTIONS", "OPTIONS", "", "", None)
        .replace("UDP", "TCP")
        .replace("Content-Length: 0", "Content-Length: 18446744073709551615");
    assert!(hostile.contains("\r\nContent-Length: 18446744073709551615\r\n\r\n"), "{hostile}");
    let smuggled = request("OPTIONS", "OPTIONS", "", "", None).replace("UDP", "TCP");
    let unknown = request("FROBNICATE", "FROBNICATE", "", "", None).replace("UDP", "TCP");
    stream.write_all(format!("{hostile}abc{smuggled}{unknown}").as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut received)).await;
    let received = String::from_utf8_lossy(&received).to_string();
    assert!(matches!(read, Ok(Ok(_))), "the connection must be closed: {read:?}, got {received:?}");
    assert!(!received.contains("SIP/2.0 200"), "a smuggled request was answered: {received}");
    assert!(!received.contains("SIP/2.0 501"), "the stream was framed in the wrong place: {received}");
    assert!(received.is_empty() || received.starts_with("SIP/2.0 400 Bad Request\r\n"), "{received}");
    // The node still serves, over TCP and UDP.
    let mut again = TcpStream::connect(node.addr).await.unwrap();
    again.write_all(smuggled.replace("z9hG4bK", "z9hG4bKagain").as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), again.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("SIP/2.0 200 OK"));
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let options = request("OPTIONS", "OPTIONS", "", "", None);
    assert_eq!(exchange(&socket, node.addr, options.as_bytes()).await.as_deref(), Some("SIP/2.0 200 OK"));
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_flood_from_one_source_is_dropped_and_counted(pool: PgPool) {
    // The carrier's network is all of 127/8, so that the second source below is a carrier too.
    let mut carrier = trunk("carrier", vec![]);
    carrier.allowed_source_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    let node = Node::start_tuned(&pool, vec![carrier], vec![], vec![], |args| args.per_source_rate = 50).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..500 {
        let options = request("OPTIONS", "OPTIONS", "", "", None);
        socket.send_to(options.as_bytes(), node.addr).await.unwrap();
    }
    let mut answers = 0;
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await {
        answers += 1;
    }
    assert!((40..200).contains(&answers), "{answers} of 500 answered at 50/s");
    let metrics = http_get(node.http, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("switchboard_sip_dropped_total{reason=\"flood\"}")),
        "flood drops must be counted:\n{metrics}"
    );
    // Another source is not affected.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let options = request("OPTIONS", "OPTIONS", "", "", None);
    assert_eq!(exchange(&other, node.addr, options.as_bytes()).await.as_deref(), Some("SIP/2.0 200 OK"));
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_node_answers_over_ipv6(pool: PgPool) {
    let mut carrier = trunk("carrier", vec![]);
    carrier.allowed_source_cidrs.push("::1/128".parse().unwrap());
    let node = Node::start_tuned(&pool, vec![carrier], vec![], vec![], |args| {
        args.sip_listen = vec!["[::1]:0".parse().unwrap()];
    })
    .await;
    assert!(node.addr.is_ipv6());
    let socket = UdpSocket::bind("[::1]:0").await.unwrap();
    let options = request("OPTIONS", "OPTIONS", "", "", None).replace("127.0.0.1:9", "[::1]:9");
    socket.send_to(options.as_bytes(), node.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buf[..len]).to_string();
    assert!(answer.starts_with("SIP/2.0 200 OK"), "{answer}");
    // The response goes back to where the request came from, and says so (RFC 3581).
    assert!(
        answer.contains(&format!("rport={}", socket.local_addr().unwrap().port())) || !answer.contains("rport"),
        "{answer}"
    );
    node.stop().await;
}
