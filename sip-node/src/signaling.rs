//! Starting the node's signaling: transports, the transaction endpoint, the call router, the
//! registration supervisor, the buffered store and the HTTP endpoint, wired together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use switchboard_model::egress::EgressPolicy;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::SnapshotHandle;
use crate::drain::Drain;
use crate::metrics::NodeMetrics;
use crate::sip::admission::Admission;
use crate::sip::call;
use crate::sip::context::{MediaContext, NodeContext};
use crate::sip::digest::{self, Challenger};
use crate::sip::endpoint::Endpoint;
use crate::sip::guard::{Guard, GuardArgs};
use crate::sip::limits::Limits;
use crate::sip::resolve::Resolver;
use crate::sip::transaction::TimerConfig;
use crate::sip::transport::{TransportConfig, TransportLayer};
use crate::sip::{originate, registration, sms};
use crate::store::{Store, StoreEvent};
use crate::webhook::Signer;

/// How many parsed messages may wait for the endpoint before the transports apply
/// backpressure (UDP then drops in the kernel, which is what overload should look like).
const RECEIVE_QUEUE: usize = 8192;
/// How long a stopping node may spend un-registering and flushing its store.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// SIP and HTTP settings of a node.
#[derive(clap::Args, Debug, Clone)]
pub struct SipArgs {
    /// Address(es) to listen on for SIP over UDP and TCP (repeat for IPv4 and IPv6).
    #[arg(long = "sip-listen", env = "SWITCHBOARD_SIP_LISTEN", value_delimiter = ',', default_value = "0.0.0.0:5060")]
    pub sip_listen: Vec<SocketAddr>,

    /// Host or IP to advertise in Via and Contact (the public address when behind NAT).
    #[arg(long, env = "SWITCHBOARD_ADVERTISED_HOST")]
    pub advertised_host: Option<String>,

    /// Port to advertise in Via and Contact (defaults to the listen port).
    #[arg(long, env = "SWITCHBOARD_ADVERTISED_PORT")]
    pub advertised_port: Option<u16>,

    /// Address of the node's HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "SWITCHBOARD_HTTP_LISTEN", default_value = "0.0.0.0:9090")]
    pub http_listen: SocketAddr,

    /// SIP timer T1 in milliseconds (RFC 3261: 500).
    #[arg(long, env = "SWITCHBOARD_SIP_T1_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub sip_t1_ms: u64,

    /// Messages per second accepted from one source IP; the rest is dropped and counted.
    #[arg(long, env = "SWITCHBOARD_SIP_PER_SOURCE_RATE", default_value_t = 20_000)]
    pub per_source_rate: u32,

    /// RTP port range for anchored media (`MIN-MAX`; RTP even, RTCP odd).
    #[arg(long, env = "SWITCHBOARD_RTP_PORTS", default_value = "10000-20000")]
    pub rtp_ports: String,

    /// Threads that relay anchored SIP-to-SIP media (level-triggered epoll each; 0: one per
    /// core). Bridged calls run on the signaling runtime with their WebSocket.
    #[arg(long, env = "SWITCHBOARD_MEDIA_THREADS", default_value_t = 0)]
    pub media_threads: usize,

    /// Forward steady RTP streams in the kernel (an eBPF tc program on the media interface;
    /// needs CAP_BPF and CAP_NET_ADMIN): `auto` uses it when it loads, `on` refuses to start
    /// without it, `off` relays every packet in user space.
    #[arg(long, env = "SWITCHBOARD_KERNEL_FORWARDING", value_enum, default_value_t = crate::media::kernel::KernelMode::Auto)]
    pub kernel_forwarding: crate::media::kernel::KernelMode,

    /// Seconds without RTP after which an anchored call ends.
    #[arg(long, env = "SWITCHBOARD_MEDIA_TIMEOUT_SECONDS", default_value_t = 30)]
    pub media_timeout_seconds: u64,

    /// Final responses from a callee that end the call without trying the next gateway or
    /// trunk (comma-separated); every other failure fails over.
    #[arg(
        long,
        env = "SWITCHBOARD_FINAL_CODES",
        value_delimiter = ',',
        default_value = "404,480,484,486,487,600,603,604,606"
    )]
    pub final_codes: Vec<u16>,

    /// Key that signs the status callbacks of API-placed calls and the messaging webhooks
    /// (HMAC-SHA256); the same on every node so that receivers can verify any of them. Required:
    /// every node places API calls and delivers messages.
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Targets that API-supplied webhook and agent URLs may reach although they are not public
    /// (comma-separated CIDRs, IP addresses, host names, `.suffix`); by default the node refuses
    /// loopback, link-local, private and cluster-internal targets for them. Give the REST API
    /// the same list.
    #[arg(long, env = "SWITCHBOARD_EGRESS_ALLOW", value_delimiter = ',')]
    pub egress_allow: Vec<String>,

    /// Calls routed to AI agents: when to answer, connect timeout.
    #[command(flatten)]
    pub agent: crate::bridge::answer::AgentArgs,

    /// The store's local spool (set by the node from `--spool-dir`); `None` keeps call and CDR
    /// events in memory only until Postgres has them.
    #[arg(skip)]
    pub spool: Option<crate::store::spool::SpoolOptions>,

    /// Flood guard (unknown sources, per-source caps) and digest nonces.
    #[command(flatten)]
    pub guard: crate::sip::guard::GuardArgs,

    /// SIP over TLS: listener certificate, outbound trust.
    #[command(flatten)]
    pub tls: crate::sip::tls::TlsArgs,

    /// RFC 4028 session timers on both legs of a call.
    #[command(flatten)]
    pub session: crate::sip::control::session_timer::SessionTimerArgs,
}

/// Shortest accepted webhook secret.
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 16;

impl SipArgs {
    /// The webhook signer. No secret is an error: with a key of its own, each node would sign
    /// with something no receiver can verify.
    pub fn signer(&self) -> anyhow::Result<Signer> {
        match self.webhook_secret.as_deref().map(str::trim) {
            Some(secret) if secret.len() >= MIN_WEBHOOK_SECRET_BYTES => Ok(Signer::new(secret.as_bytes())),
            Some(secret) if !secret.is_empty() => anyhow::bail!(
                "SWITCHBOARD_WEBHOOK_SECRET is {} bytes; use at least {MIN_WEBHOOK_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`)",
                secret.len()
            ),
            _ => anyhow::bail!(
                "no webhook secret: set SWITCHBOARD_WEBHOOK_SECRET (or --webhook-secret) to the key your webhook \
                 receivers verify X-Switchboard-Signature with, the same on every node; this node places API calls \
                 and delivers messaging webhooks, and their signatures must be verifiable"
            ),
        }
    }

    /// The egress allow-list for API-supplied URLs.
    pub fn egress(&self) -> anyhow::Result<EgressPolicy> {
        Ok(EgressPolicy::parse(&self.egress_allow)?)
    }
}

/// Where a started node listens (the ports may have been chosen by the OS).
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub sip: SocketAddr,
    /// The TLS listener, when the node has a certificate.
    pub sip_tls: Option<SocketAddr>,
    pub http: SocketAddr,
}

/// Where a node's tasks go and the signals that end them: the node's process (or a test
/// harness) owns the task sets and joins them at shutdown.
pub struct NodeTasks<'a> {
    /// Tasks aborted when the node stops.
    pub tasks: &'a mut JoinSet<()>,
    /// Tasks that must finish cleanly on shutdown (un-REGISTER, store flush); they end once
    /// `stop` turns true.
    pub graceful: &'a mut JoinSet<()>,
    /// Turns true when the node stops.
    pub stop: watch::Receiver<bool>,
    /// Once it begins, new calls are refused and registrations removed while calls in
    /// progress go on.
    pub drain: Drain,
}

/// Starts signaling, handing its tasks to `lifecycle`.
pub async fn start(
    args: &SipArgs,
    pool: PgPool,
    node_id: &str,
    snapshot: SnapshotHandle,
    lifecycle: NodeTasks<'_>,
) -> anyhow::Result<Listening> {
    let NodeTasks { tasks, graceful, stop, drain } = lifecycle;
    let metrics = NodeMetrics::new();
    drain.track_calls(metrics.active_calls_gauge());
    drain.track_metrics(metrics.clone());
    let spool = args.spool.clone().map(|mut spool| {
        spool.rate_of = Some(rate_of(snapshot.clone()));
        spool
    });
    let (store, store_task, _) = Store::open(
        pool.clone(),
        node_id.to_string(),
        Some(metrics.clone()),
        crate::store::StoreOptions::default(),
        spool.as_ref(),
    )
    .context("--spool-dir")?;
    // Rows of calls a crashed run of this node left behind are not calls any more.
    store.record(StoreEvent::ClearActiveCalls);
    tasks.spawn(follow_config(snapshot.clone(), metrics.clone()));
    metrics.track_config_stale({
        let snapshot = snapshot.clone();
        move || snapshot.is_stale()
    });
    let t1 = Duration::from_millis(args.sip_t1_ms);
    let timers = TimerConfig { t1, t2: (t1 * 8).max(Duration::from_secs(4)), t4: Duration::from_secs(5) };
    let challenger = challenger(&args.guard)?;
    let guard = Guard::new(&args.guard, args.per_source_rate, &snapshot.current());
    tasks.spawn(Arc::clone(&guard).follow(snapshot.clone()));
    {
        let (sources, held) = (Arc::clone(&guard), Arc::clone(&guard));
        metrics.track_flood_guard(
            move || sources.tracked_sources(),
            move || {
                [
                    ("server_transactions", held.transactions.total()),
                    ("call_setups", held.call_setups.total()),
                    ("tcp_connections", held.tcp_connections.total()),
                ]
            },
        );
    }
    let (received_tx, received_rx) = mpsc::channel(RECEIVE_QUEUE);
    let tls = crate::sip::tls::TlsLayer::from_args(&args.tls, &args.sip_listen).context("SIP over TLS")?;
    tls.follow(snapshot.clone());
    for cert in tls.watched_certs() {
        let interval = Duration::from_millis(args.tls.reload_ms.max(100));
        tasks.spawn(cert.watch(interval, stop.clone()));
    }
    let transport = TransportLayer::bind(
        &TransportConfig {
            listen: args.sip_listen.clone(),
            advertised_host: args.advertised_host.clone(),
            advertised_port: args.advertised_port,
            tls: Some(Arc::clone(&tls)),
        },
        received_tx,
        Arc::clone(&guard),
        metrics.clone(),
    )
    .await
    .with_context(|| format!("cannot listen for SIP on {:?}", args.sip_listen))?;
    tracing::info!(sip = %transport.local_addr(), "SIP listening on UDP and TCP");
    if let Some(addr) = transport.tls_addrs().first() {
        tracing::info!(sip_tls = %addr, "SIP listening on TLS");
    }
    let (endpoint, new_requests) =
        Endpoint::start(Arc::clone(&transport), received_rx, timers, Arc::clone(&guard), metrics.clone());

    let signer = args.signer()?;
    let egress = Arc::new(args.egress()?);
    let webhook_client = reqwest::Client::builder().build().unwrap_or_default();
    let media = media_context(args, transport.local_addr(), &metrics)?;
    if let Some(media) = &media {
        let ports = media.ports.clone();
        metrics.track_rtp_ports(move || ports.in_use() * 2);
        metrics.rtp_ports_capacity(media.ports.capacity() * 2);
        let engine = Arc::clone(&media.engine);
        metrics.track_media_relays(move || engine.relays());
        let engine = Arc::clone(&media.engine);
        metrics.track_kernel_forwards(move || engine.kernel_forwards());
        let engine = Arc::clone(&media.engine);
        metrics.track_kernel_packets(move || engine.kernel_packets());
    }
    let limits = shared_limits(&pool, node_id, tasks).counted(metrics.clone());
    let ctx = Arc::new(NodeContext {
        endpoint,
        snapshot: snapshot.clone(),
        limits,
        store,
        metrics: metrics.clone(),
        resolver: Resolver::from_system().with_tls(Arc::clone(&tls)),
        challenger,
        guard,
        node_id: node_id.to_string(),
        timers,
        pool: pool.clone(),
        webhooks: (webhook_client, signer.clone()),
        media,
        final_codes: args.final_codes.clone(),
        drain: drain.clone(),
        session_timers: args.session.policy(),
        transfers: crate::sip::transfer::Transfers::default(),
    });
    tasks.spawn(call::route_requests(Arc::clone(&ctx), new_requests));
    // One LISTEN connection wakes every queue (sip/queue.rs); it lives as long as the tasks.
    let wakeups = crate::sip::queue::Wakeups::new(&[
        crate::sip::reaped::CHANNEL,
        crate::sip::transfer::CHANNEL,
        originate::CHANNEL,
        sms::CHANNEL,
    ]);
    tasks.spawn(wakeups.clone().relay(pool.clone()));
    tasks.spawn(crate::sip::reaped::run(
        pool.clone(),
        wakeups.of(crate::sip::reaped::CHANNEL),
        signer.clone(),
        ctx.drain.clone(),
    ));
    let api_webhooks = crate::webhook::guarded_client(Arc::clone(&egress))
        .context("cannot set up the HTTP client of the API calls' webhooks")?;
    let transfer_webhooks = crate::sip::transfer::queue::Webhooks {
        client: api_webhooks.clone(),
        signer: signer.clone(),
        egress: Arc::clone(&egress),
    };
    tasks.spawn(crate::sip::transfer::queue::run(
        ctx.transfers.clone(),
        pool.clone(),
        wakeups.of(crate::sip::transfer::CHANNEL),
        node_id.to_string(),
        ctx.drain.clone(),
        transfer_webhooks,
    ));
    tasks.spawn(originate::run(
        Arc::clone(&ctx),
        pool.clone(),
        wakeups.of(originate::CHANNEL),
        signer,
        egress,
        api_webhooks,
    ));
    tasks.spawn(sms::run(Arc::new(ctx.sms()), pool.clone(), wakeups.of(sms::CHANNEL)));
    // Draining or stopping: un-REGISTER (its state goes through the store); on stop, then
    // flush the store.
    let registrations = tokio::spawn(registration::supervise(Arc::new(ctx.registration()), stop.clone()));
    {
        let mut stop = stop.clone();
        graceful.spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            let _ = tokio::time::timeout(STOP_GRACE / 2, registrations).await;
            store_task.shutdown(STOP_GRACE / 2).await;
        });
    }

    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", args.http_listen))?;
    let http = listener.local_addr()?;
    tracing::info!(%http, "metrics and health on HTTP");
    let mut http_stop = stop.clone();
    let ready = {
        let snapshot = snapshot.clone();
        move || crate::http::Readiness {
            ready: snapshot.generation() >= 0 && !drain.is_draining(),
            detail: Some(served_generation(&snapshot, drain.is_draining())),
        }
    };
    tasks.spawn(async move {
        let shutdown = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        if let Err(error) = crate::http::serve(listener, metrics, ready, shutdown).await {
            tracing::error!(%error, "HTTP endpoint failed");
        }
    });
    Ok(Listening { sip: transport.local_addr(), sip_tls: transport.tls_addrs().first().copied(), http })
}

/// The `/readyz` detail: the generation served, whether it is a stale copy from disk, draining.
fn served_generation(snapshot: &SnapshotHandle, draining: bool) -> String {
    let generation = snapshot.generation();
    let mut detail = if generation < 0 {
        "no configuration loaded yet".to_owned()
    } else if snapshot.is_stale() {
        format!(
            "config generation {generation} (stale: saved on this node's disk; Postgres did not answer at start and \
             has not confirmed it)"
        )
    } else {
        format!("config generation {generation}")
    };
    if draining {
        detail.push_str("; draining");
    }
    detail
}

/// The per-minute rate of a call's trunk in the current configuration, for the CDRs of calls
/// the node lost (replayed from the spool).
fn rate_of(snapshot: SnapshotHandle) -> crate::store::spool::RateOf {
    Arc::new(move |call| {
        let current = snapshot.current();
        let trunk = current.trunk(call.namespace.as_deref()?, call.trunk_name.as_deref()?)?;
        let rate = match call.direction {
            crate::store::Direction::Inbound => trunk.rate_inbound_per_minute,
            crate::store::Direction::Outbound => trunk.rate_outbound_per_minute,
        };
        Some((rate, trunk.currency.clone()))
    })
}

/// Trunk limits held across nodes (`sip/admission.rs`), with the worker that writes releases
/// and resyncs (it also adopts the rows an earlier run of this node id left).
fn shared_limits(pool: &PgPool, node_id: &str, tasks: &mut JoinSet<()>) -> Limits {
    let admission = Admission::new(pool.clone(), node_id);
    let limits = Limits::shared(admission.clone());
    let counter = limits.clone();
    tasks.spawn(admission.run(move |(namespace, trunk)| counter.active(namespace, trunk)));
    limits
}

/// The digest challenger: nonces signed with the configured secret (shared by the nodes behind
/// one address, so that any of them accepts the others' nonces), or a random one per node.
fn challenger(args: &GuardArgs) -> anyhow::Result<Challenger> {
    let ttl = Duration::from_secs(args.nonce_ttl_seconds);
    let key = match args.nonce_secret().context("--nonce-secret-file")? {
        Some(secret) => digest::nonce_key(&secret),
        None => {
            tracing::info!(
                "no SWITCHBOARD_NONCE_SECRET / --nonce-secret-file: digest nonces are per node, so behind one \
                 address a challenge answered to another node is challenged again"
            );
            rand::random()
        }
    };
    Ok(Challenger::new(key, "switchboard".into(), ttl))
}

/// Keeps the configuration gauges (generation, per-provider rates, per-trunk limits and call
/// series) in step with the snapshot; a trunk that leaves it takes its series along.
async fn follow_config(snapshot: SnapshotHandle, metrics: NodeMetrics) {
    let mut generations = snapshot.subscribe();
    let mut shown: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    loop {
        let current = snapshot.current();
        metrics.config_applied(current.generation());
        let mut now = std::collections::HashSet::new();
        for trunk in current.trunks() {
            metrics.trunk_configured(trunk);
            now.insert((trunk.provider.clone(), trunk.name.clone()));
        }
        for (provider, trunk) in shown.difference(&now) {
            metrics.trunk_removed(provider, trunk);
        }
        shown = now;
        if generations.changed().await.is_err() {
            return;
        }
    }
}

/// The media settings: ports from `--rtp-ports` on the SIP listen address, and the address
/// put into SDP (the advertised host when it is an IP, else the listen address). `None`, with
/// a warning, when the range is unusable: calls to agents are then refused with 503.
fn media_context(args: &SipArgs, sip: SocketAddr, metrics: &NodeMetrics) -> anyhow::Result<Option<MediaContext>> {
    use crate::media::ports::{PortAllocator, PortRange};
    // Whatever else is wrong, a CA file that cannot be used stops the node here.
    let agent_tls = args.agent.tls().map_err(|error| anyhow::Error::new(error).context("--agent-ca-file"))?;
    if agent_tls.extra_roots() > 0 {
        tracing::info!(
            certificates = agent_tls.extra_roots(),
            "wss:// agents: trusting the CA file besides the web PKI roots"
        );
    }
    let range = args
        .rtp_ports
        .split_once('-')
        .and_then(|(a, b)| Some(PortRange { min: a.trim().parse().ok()?, max: b.trim().parse().ok()? }));
    let Some(range) = range else {
        tracing::warn!(ports = %args.rtp_ports, "--rtp-ports must be MIN-MAX; media anchoring is off");
        return Ok(None);
    };
    let address = args
        .advertised_host
        .as_deref()
        .and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
        .unwrap_or_else(|| if sip.ip().is_unspecified() { std::net::IpAddr::from([127, 0, 0, 1]) } else { sip.ip() });
    if sip.ip().is_unspecified() && args.advertised_host.is_none() {
        tracing::warn!("listening on {sip} without --advertised-host: SDP will say {address}; set it for real peers");
    }
    let bind = if sip.ip().is_unspecified() { sip.ip() } else { address };
    let hold_audio = match args.agent.transfer_hold_audio.as_deref() {
        Some(path) => Some(crate::sip::transfer::hold::load(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let engine = crate::media::engine::EngineConfig {
        threads: args.media_threads,
        cpus: Vec::new(),
        kernel: args.kernel_forwarding,
    };
    // Several nodes in one process (tests) share the first one's engine.
    let engine = match crate::media::engine::MediaEngine::shared(&engine) {
        Ok(engine) => engine,
        Err(error @ crate::media::engine::EngineError::Kernel(_)) => {
            return Err(anyhow::Error::new(error).context("--kernel-forwarding on"));
        }
        Err(error) => {
            tracing::warn!(%error, "media anchoring is off");
            return Ok(None);
        }
    };
    Ok(match PortAllocator::new(bind, range) {
        Ok(ports) => Some({
            open_files_for(ports.capacity() * 2);
            MediaContext {
                engine,
                ports,
                address,
                timeout: Duration::from_secs(args.media_timeout_seconds.max(1)),
                agent_connect_timeout: Duration::from_millis(args.agent.agent_connect_timeout_ms),
                agent_answer: args.agent.answer_policy(),
                bridge_latency: metrics.bridge_latency(),
                agent_tls,
                hold_audio,
                transfer_ringback: args.agent.transfer_ringback,
            }
        }),
        Err(error) => {
            tracing::warn!(%error, "no RTP ports; media anchoring is off");
            None
        }
    })
}

/// Every RTP/RTCP port of a call is an open socket: raises the soft open-file limit to the hard
/// one (as Go programs do), so that a range of 10,000 ports is not cut to a few hundred calls by
/// a soft limit of 1,024 (bind then fails with EMFILE and calls get 503), and warns when even
/// the hard limit is below the range plus room for SIP, Postgres and the API.
fn open_files_for(rtp_ports: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() { hard } else { soft };
    let needed = rtp_ports as u64 + 1024;
    if soft < needed {
        tracing::warn!(
            open_files = soft,
            rtp_ports,
            "the open-file limit is below the RTP range plus 1024: calls will be refused before the range is full; raise `ulimit -n` or narrow --rtp-ports"
        );
    }
}
