//! A scanner flood against a node while a carrier places calls through it (issue 19 item 4).
//!
//! - The **node** is the `switchboard-node` binary, a process of its own, on a fresh database
//!   (created in the server of `DATABASE_URL`, dropped at the end) holding one trunk that
//!   allows 127.0.0.1 and one number routed to a sipp UAS.
//! - The **carrier** is sipp's built-in `uac` at 127.0.0.1: `FLOOD_BENCH_CPS` calls/s (default
//!   100) of 1 s each, for the whole run; sipp's `uas` answers them.
//! - The **scanner** (a thread of this process) sends SIPVicious-style probes (OPTIONS, REGISTER
//!   and INVITE with `User-Agent: friendly-scanner`) from `FLOOD_BENCH_SOURCES` loopback
//!   addresses 127.20.x.y (default 1,000) at `FLOOD_BENCH_RATE` messages/s (default 20,000)
//!   for `FLOOD_BENCH_SECS` seconds (default 15), after 5 s of calls alone.
//!
//! Printed: the carrier's successful and failed calls, the node's CPU (% of one core) and RSS
//! before and during the flood, the probes sent and the messages the scanner sources received
//! (the goal is none), and the node's own drop counters. Nothing is asserted: the tests in
//! `tests/flood_guard.rs` check the behaviour; this prints figures.
//!
//! `cargo bench -p switchboard-node --bench flood` (needs `DATABASE_URL` and sipp).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Connection as _, PgConnection};
use switchboard_model::config::{bump_generation, notify_generation};

const WARMUP: Duration = Duration::from_secs(5);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> u16 {
    // UDP and TCP: the node binds both on the SIP port.
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// User + system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_second
}

/// Resident set size of a process, in MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn probe(method: &str, from: SocketAddr, n: u64) -> String {
    format!(
        "{method} sip:100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-{n}\r\n\
         From: \"sipvicious\" <sip:100@1.1.1.1>;tag=3361{n}\r\nTo: \"sipvicious\" <sip:100@1.1.1.1>\r\n\
         Call-ID: {n}-scan\r\nCSeq: 1 {method}\r\nContact: <sip:100@{from}>\r\nMax-Forwards: 70\r\n\
         User-Agent: friendly-scanner\r\nAccept: application/sdp\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The scanner thread: paced probes from every source, and a count of what comes back.
fn scan(node: SocketAddr, sources: usize, rate: u64, duration: Duration, sent: &AtomicU64, answered: &AtomicU64) {
    let sockets: Vec<UdpSocket> = (0..sources)
        .filter_map(|i| {
            let ip = Ipv4Addr::new(127, 20, (i / 250) as u8, (i % 250) as u8 + 1);
            let socket = UdpSocket::bind((ip, 0)).ok()?;
            socket.set_nonblocking(true).ok()?;
            Some(socket)
        })
        .collect();
    let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
    let start = Instant::now();
    let mut n: u64 = 0;
    let mut buf = [0u8; 2048];
    let mut last_drain = start;
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while n < due {
            let i = (n as usize) % sockets.len();
            let method = ["OPTIONS", "REGISTER", "INVITE"][(n / sockets.len() as u64 % 3) as usize];
            if sockets[i].send_to(probe(method, addrs[i], n).as_bytes(), node).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
        if last_drain.elapsed() > Duration::from_millis(100) {
            for socket in &sockets {
                while socket.recv_from(&mut buf).is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            last_drain = Instant::now();
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    // Late answers (retransmissions) too.
    std::thread::sleep(Duration::from_secs(2));
    for socket in &sockets {
        while socket.recv_from(&mut buf).is_ok() {
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn metrics(http: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(http).await else { return String::new() };
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await;
    let mut text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text)).await;
    text
}

fn metric_lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// sipp's cumulative successful and failed calls, from the last line of its `-trace_stat` file.
fn sipp_calls(stat_file: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(stat_file).ok()?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split(';').collect();
    let last: Vec<&str> = lines.next_back()?.split(';').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).and_then(|i| last.get(i)?.parse().ok());
    Some((column("SuccessfulCall(C)")?, column("FailedCall(C)")?))
}

fn main() {
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        eprintln!("flood bench: set DATABASE_URL (a Postgres server where the user may create databases)");
        return;
    };
    if Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        eprintln!("flood bench: sipp (Debian package sip-tester) is needed");
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(run(admin_url));
}

async fn run(admin_url: String) {
    let secs: u64 = env_or("FLOOD_BENCH_SECS", 15);
    let rate: u64 = env_or("FLOOD_BENCH_RATE", 20_000);
    let sources: usize = env_or("FLOOD_BENCH_SOURCES", 1_000);
    let cps: u64 = env_or("FLOOD_BENCH_CPS", 100);

    // A database of its own.
    let database = format!("switchboard_flood_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await.expect("connect to DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await
        .expect("create the bench database");
    let base = admin_url.split('?').next().unwrap_or(&admin_url);
    let url = format!("{}/{database}", base.rsplit_once('/').map_or(base, |(server, _)| server));
    let callee = free_port();
    {
        let mut conn = PgConnection::connect(&url).await.expect("connect to the bench database");
        switchboard_model::db::MIGRATOR.run(&mut conn).await.expect("migrate");
        let mut tx = conn.begin().await.expect("begin");
        let generation = bump_generation(&mut tx).await.expect("bump");
        common::trunk("carrier", vec![]).upsert(&mut tx, "hash", generation).await.expect("trunk");
        common::number_to(common::sip_destination(callee)).upsert(&mut tx, "hash", generation).await.expect("number");
        notify_generation(&mut tx, generation).await.expect("notify");
        tx.commit().await.expect("commit");
    }

    let sip: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    // The node's own state directory: no spool of an earlier run is replayed into this database.
    let state = tempfile::tempdir().expect("state directory");
    let node = Killed(
        Command::new(env!("CARGO_BIN_EXE_switchboard-node"))
            .args(["--database-url", &url, "--node-id", "flood-bench"])
            .arg("--state-dir")
            .arg(state.path())
            .env("SWITCHBOARD_WEBHOOK_SECRET", "flood-bench-webhook-secret")
            .args(["--sip-listen", &sip.to_string(), "--http-listen", &http.to_string()])
            .args(["--rtp-ports", "40000-49999", "--kernel-forwarding", "off"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start switchboard-node"),
    );
    let pid = node.0.id();
    let ready = Instant::now();
    while !metrics(http).await.contains("switchboard_config_generation 1") {
        assert!(ready.elapsed() < Duration::from_secs(30), "the node did not apply the configuration");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dir = tempfile::tempdir().expect("scratch directory");
    let _uas = Killed(
        Command::new("sipp")
            .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &callee.to_string(), "-nostdin"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the sipp UAS"),
    );
    let stat_file = dir.path().join("uac.csv");
    let total_calls = cps * (WARMUP.as_secs() + secs);
    let mut uac = Killed(
        Command::new("sipp")
            .args(["-sn", "uac", &sip.to_string(), "-s", common::DID, "-i", "127.0.0.1", "-nostdin"])
            .args(["-r", &cps.to_string(), "-m", &total_calls.to_string(), "-d", "1000", "-l", "100000"])
            .args(["-trace_stat", "-fd", "1", "-stf"])
            .arg(&stat_file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sipp UAC"),
    );

    // Calls alone: the node's CPU and RSS before the flood (the last 3 s of the warm-up).
    tokio::time::sleep(WARMUP - Duration::from_secs(3)).await;
    let (cpu_a, at_a) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = (cpu_seconds(pid) - cpu_a) / at_a.elapsed().as_secs_f64() * 100.0;
    let rss_before = rss_mb(pid);
    let calls_before = sipp_calls(&stat_file);

    // The flood, with the calls going on.
    let sent = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (sent, answered, done) = (Arc::clone(&sent), Arc::clone(&answered), Arc::clone(&done));
        std::thread::spawn(move || {
            scan(sip, sources, rate, Duration::from_secs(secs), &sent, &answered);
            done.store(true, Ordering::Relaxed);
        })
    };
    let (cpu_b, at_b) = (cpu_seconds(pid), Instant::now());
    let mut rss_peak = rss_before;
    while at_b.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_peak = rss_peak.max(rss_mb(pid));
    }
    let cpu_during = (cpu_seconds(pid) - cpu_b) / at_b.elapsed().as_secs_f64() * 100.0;
    let rss_during = rss_mb(pid);
    while !done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = scanner.join();

    // The carrier's calls end by themselves (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    while uac.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut uac_err = String::new();
    if let Some(mut stderr) = uac.0.stderr.take()
        && uac.0.try_wait().ok().flatten().is_some()
    {
        let _ = stderr.read_to_string(&mut uac_err);
    }
    let calls = sipp_calls(&stat_file);
    let text = metrics(http).await;

    println!(
        "flood: {} probes from {sources} sources at {rate}/s for {secs} s, carrier {cps} calls/s",
        sent.load(Ordering::Relaxed)
    );
    match (calls_before, calls) {
        (Some((ok_before, failed_before)), Some((ok, failed))) => println!(
            "carrier calls: {ok} successful, {failed} failed (of {total_calls}); before the flood {ok_before} and {failed_before}, during and after it {} and {}",
            ok - ok_before,
            failed - failed_before
        ),
        (_, Some((ok, failed))) => println!("carrier calls: {ok} successful, {failed} failed (of {total_calls})"),
        _ => println!("carrier calls: sipp left no statistics {}", uac_err.trim()),
    }
    println!("node CPU: {cpu_before:.1} % of a core before the flood, {cpu_during:.1} % during");
    println!(
        "node RSS: {rss_before:.1} MB before, {rss_during:.1} MB at the end of the flood (peak {rss_peak:.1} MB, +{:.1} MB)",
        rss_peak - rss_before
    );
    println!("messages received by the scanner sources: {}", answered.load(Ordering::Relaxed));
    for line in metric_lines(&text, "switchboard_sip_dropped_total")
        .into_iter()
        .chain(metric_lines(&text, "switchboard_sip_guard_"))
        .chain(metric_lines(&text, "switchboard_sip_server_transactions_total"))
    {
        println!("node: {line}");
    }

    drop(uac);
    drop(node);
    // Let the node's connections go before the database does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")))
        .execute(&mut admin)
        .await;
}
