//! The flood guard from outside (issue 19 item 4): scanners from sources no trunk allows get
//! no answer and cost no transaction, `--unknown-sources reject` answers them once, sources that
//! may try (an open or digest trunk) are capped per source and in all, the per-source table
//! stays bounded, and a carrier's calls go through while others flood.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sqlx::PgPool;
use switchboard_model::AuthMethod;
use switchboard_node::sip::guard::UnknownSources;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

/// A scanner's probe, as SIPVicious sends them (`User-Agent: friendly-scanner`).
fn probe(method: &str, from: SocketAddr, n: usize, to_tag: bool) -> String {
    let tag = if to_tag { ";tag=scanned" } else { "" };
    format!(
        "{method} sip:100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-scan-{n}-{method}\r\n\
         From: \"sipvicious\" <sip:100@1.1.1.1>;tag=scan{n}\r\nTo: \"sipvicious\" <sip:100@1.1.1.1>{tag}\r\n\
         Call-ID: scan-{n}-{method}-{from}\r\nCSeq: 1 {method}\r\nContact: <sip:100@{from}>\r\nMax-Forwards: 70\r\n\
         User-Agent: friendly-scanner\r\nAccept: application/sdp\r\nContent-Length: 0\r\n\r\n"
    )
}

fn options(from: SocketAddr, n: usize) -> String {
    format!(
        "OPTIONS sip:{DID}@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-opt-{n}\r\n\
         From: <sip:ping@{from}>;tag=o{n}\r\nTo: <sip:{DID}@127.0.0.1>\r\nCall-ID: opt-{n}-{from}\r\nCSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

fn invite(from: SocketAddr, n: usize) -> String {
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    format!(
        "INVITE sip:{DID}@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-inv-{n}\r\n\
         From: <sip:+15557654321@{from}>;tag=i{n}\r\nTo: <sip:{DID}@127.0.0.1>\r\nCall-ID: inv-{n}-{from}\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:caller@{from}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

/// Everything that arrives on `socket` within `window`.
async fn collect(socket: &UdpSocket, window: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    got
}

async fn counter(node: &Node, name: &str) -> f64 {
    metric(node, name).await.unwrap_or(0.0)
}

const STARTED: &str = "switchboard_sip_server_transactions_total";

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_scan_from_unknown_sources_gets_no_answer_and_no_transaction(pool: PgPool) {
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![]).await;
    let mut scanners = Vec::new();
    for i in 2..22 {
        scanners.push(UdpSocket::bind(format!("127.0.0.{i}:0")).await.unwrap());
    }
    let mut sent = 0;
    for (n, scanner) in scanners.iter().enumerate() {
        let from = scanner.local_addr().unwrap();
        for method in ["OPTIONS", "INVITE", "REGISTER", "FROBNICATE"] {
            scanner.send_to(probe(method, from, n, false).as_bytes(), node.addr).await.unwrap();
            sent += 1;
        }
        // In-dialog probes for dialogs the node does not have, and bytes that do not parse.
        scanner.send_to(probe("BYE", from, n, true).as_bytes(), node.addr).await.unwrap();
        scanner.send_to(b"INVITE sip:100@x SIP/2.0\r\nVia: broken\r\n\r\n", node.addr).await.unwrap();
        sent += 1;
    }
    for scanner in &scanners {
        let answers = collect(scanner, Duration::from_millis(300)).await;
        assert!(answers.is_empty(), "a scanner got an answer: {answers:?}");
    }
    // The wait above covers T1 (500 ms): a transaction would have retransmitted by now.
    assert!(collect(&scanners[0], Duration::from_millis(700)).await.is_empty());
    assert_eq!(counter(&node, STARTED).await, 0.0, "scanner messages must not create transactions");
    let dropped = counter(&node, "switchboard_sip_dropped_total{reason=\"unknown_source\"}").await;
    assert!(dropped >= f64::from(sent), "{dropped} drops counted for {sent} probes");
    // A carrier is still answered.
    let carrier = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    carrier.send_to(options(carrier.local_addr().unwrap(), 1).as_bytes(), node.addr).await.unwrap();
    let answers = collect(&carrier, Duration::from_millis(500)).await;
    assert!(answers.iter().any(|a| a.starts_with("SIP/2.0 200 OK")), "{answers:?}");
    assert_eq!(counter(&node, STARTED).await, 1.0);
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn unknown_sources_reject_answers_403_once_without_a_transaction(pool: PgPool) {
    let node = Node::start_tuned(&pool, vec![trunk("carrier", vec![])], vec![], vec![], |args| {
        args.guard.unknown_sources = UnknownSources::Reject;
    })
    .await;
    let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let from = stranger.local_addr().unwrap();
    stranger.send_to(invite(from, 1).as_bytes(), node.addr).await.unwrap();
    stranger.send_to(options(from, 2).as_bytes(), node.addr).await.unwrap();
    // Long enough for Timer G (T1 = 500 ms) to have retransmitted a 403 twice.
    let answers = collect(&stranger, Duration::from_millis(1800)).await;
    let statuses: Vec<&str> = answers.iter().map(|a| a.lines().next().unwrap_or_default()).collect();
    assert_eq!(statuses, ["SIP/2.0 403 Forbidden", "SIP/2.0 403 Forbidden"], "{answers:?}");
    assert_eq!(counter(&node, STARTED).await, 0.0);
    node.stop().await;
}

/// A node with an open trunk (no authentication, calls from anywhere): every source may try,
/// so the caps are what holds a flood.
fn open_trunk() -> switchboard_model::TrunkConfig {
    let mut open = trunk("open", vec![]);
    open.auth_method = AuthMethod::None;
    open.allowed_source_cidrs = vec![];
    open
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn transactions_of_one_source_are_capped_and_carriers_are_not(pool: PgPool) {
    let node = Node::start_tuned(&pool, vec![trunk("carrier", vec![]), open_trunk()], vec![], vec![], |args| {
        args.guard.max_server_transactions_per_source = 5;
    })
    .await;
    let flooder = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let from = flooder.local_addr().unwrap();
    for n in 0..30 {
        flooder.send_to(options(from, n).as_bytes(), node.addr).await.unwrap();
    }
    // Each answered OPTIONS holds its transaction for Timer J (32 s over UDP): 5 answers.
    let answers = collect(&flooder, Duration::from_millis(800)).await;
    assert_eq!(answers.len(), 5, "{answers:?}");
    let limited = counter(&node, "switchboard_sip_dropped_total{reason=\"transaction_limit\"}").await;
    assert_eq!(limited, 25.0);
    // The carrier is not capped, nor is another source.
    let carrier = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = UdpSocket::bind("127.0.0.4:0").await.unwrap();
    for n in 0..30 {
        carrier.send_to(options(carrier.local_addr().unwrap(), n).as_bytes(), node.addr).await.unwrap();
    }
    other.send_to(options(other.local_addr().unwrap(), 0).as_bytes(), node.addr).await.unwrap();
    assert_eq!(collect(&carrier, Duration::from_millis(800)).await.len(), 30);
    assert_eq!(collect(&other, Duration::from_millis(100)).await.len(), 1);
    let held = counter(&node, "switchboard_sip_guard_held{what=\"server_transactions\"}").await;
    assert_eq!(held, 6.0, "the carrier's transactions are not counted against the others");
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn call_setups_and_tcp_connections_of_one_source_are_capped(pool: PgPool) {
    // Calls to a callee that never answers: each holds its task until the caller gives up.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut number = number_to(sip_destination(silent.local_addr().unwrap().port()));
    number.trunk_ref = "open".into();
    let node = Node::start_tuned(&pool, vec![trunk("carrier", vec![]), open_trunk()], vec![number], vec![], |args| {
        args.guard.max_call_setups_per_source = 2;
        args.guard.max_tcp_connections_per_source = 3;
    })
    .await;
    let caller = UdpSocket::bind("127.0.0.5:0").await.unwrap();
    let from = caller.local_addr().unwrap();
    for n in 0..5 {
        caller.send_to(invite(from, n).as_bytes(), node.addr).await.unwrap();
    }
    let answers = collect(&caller, Duration::from_millis(400)).await;
    let refused = answers.iter().filter(|a| a.starts_with("SIP/2.0 503")).count();
    assert_eq!(refused, 3, "{answers:?}");
    assert_eq!(counter(&node, "switchboard_sip_dropped_total{reason=\"call_setup_limit\"}").await, 3.0);
    assert_eq!(counter(&node, "switchboard_sip_guard_held{what=\"call_setups\"}").await, 2.0);

    // TCP: the fourth connection from one source is closed at once; a carrier's is not.
    let mut held = Vec::new();
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.6:0".parse().unwrap()).unwrap();
        held.push(socket.connect(node.addr).await.unwrap());
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.6:0".parse().unwrap()).unwrap();
    let mut fourth = socket.connect(node.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), fourth.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the fourth connection must be closed: {closed:?}");
    let mut carrier = Vec::new();
    for _ in 0..5 {
        carrier.push(TcpStream::connect(node.addr).await.unwrap());
    }
    let open = tokio::time::timeout(Duration::from_millis(300), carrier[4].read(&mut buf)).await;
    assert!(open.is_err(), "a carrier's connection stays open: {open:?}");
    assert_eq!(counter(&node, "switchboard_sip_guard_held{what=\"tcp_connections\"}").await, 3.0);
    drop(held);
    node.stop().await;
}

#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn the_per_source_rate_table_stays_bounded(pool: PgPool) {
    let node = Node::start_tuned(&pool, vec![trunk("carrier", vec![])], vec![], vec![], |args| {
        args.guard.tracked_sources = 100;
    })
    .await;
    let mut sent = 0;
    for b in 1..4u8 {
        for c in 1..200u8 {
            let scanner = std::net::UdpSocket::bind((std::net::Ipv4Addr::new(127, 9, b, c), 0)).unwrap();
            scanner.send_to(probe("OPTIONS", scanner.local_addr().unwrap(), 0, false).as_bytes(), node.addr).unwrap();
            sent += 1;
            // The node runs on this test's thread: let it read before its socket buffer fills.
            if sent % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    let dropped = "switchboard_sip_dropped_total{reason=\"unknown_source\"}";
    for _ in 0..50 {
        if counter(&node, dropped).await >= f64::from(sent) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counter(&node, dropped).await, f64::from(sent));
    let tracked = counter(&node, "switchboard_sip_guard_sources").await;
    assert!((1.0..=100.0).contains(&tracked), "{tracked} sources tracked, at most 100 allowed");
    node.stop().await;
}

/// A carrier's call goes through while unknown sources flood the node with scanner traffic.
#[sqlx::test(migrator = "switchboard_model::db::MIGRATOR")]
async fn a_carriers_call_succeeds_during_a_flood(pool: PgPool) {
    let callee = free_port("127.0.0.1");
    let node = Node::start(&pool, vec![trunk("carrier", vec![])], vec![number_to(sip_destination(callee))]).await;
    let target = node.addr;
    let flood = tokio::spawn(async move {
        let mut scanners = Vec::new();
        for i in 0..50u8 {
            scanners.push(UdpSocket::bind((std::net::Ipv4Addr::new(127, 10, 0, i + 1), 0)).await.unwrap());
        }
        let mut sent = 0u32;
        // Bounded: 20,000 probes as fast as they go, in bursts.
        for n in 0..400 {
            for scanner in &scanners {
                let method = ["OPTIONS", "INVITE", "REGISTER"][n % 3];
                let _ =
                    scanner.send_to(probe(method, scanner.local_addr().unwrap(), n, false).as_bytes(), target).await;
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        let mut answers = 0;
        for scanner in &scanners {
            answers += collect(scanner, Duration::from_millis(20)).await.len();
        }
        (sent, answers)
    });
    let uas = uas(&["-sn", "uas"], callee, 1);
    let uac = uac(&["-sn", "uac"], node.addr, "127.0.0.1", 1, &[]);
    assert!(uac.wait().await.success(), "the carrier's call failed during the flood");
    assert!(uas.wait().await.success(), "the callee's side failed during the flood");
    let (sent, answers) = flood.await.unwrap();
    assert_eq!(answers, 0, "the scanners got answers");
    let dropped = counter(&node, "switchboard_sip_dropped_total{reason=\"unknown_source\"}").await
        + counter(&node, "switchboard_sip_dropped_total{reason=\"flood\"}").await;
    assert!(dropped > 0.0 && dropped <= f64::from(sent), "{dropped} of {sent}");
    node.stop().await;
}
