//! Metrics read from their owner at every scrape: the code that owns the value (the port
//! allocator, the media engine, the spool, the flood guard) keeps no second count in step.

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts};

use super::NodeMetrics;

/// A metric refreshed from its source when the registry is gathered: the code that owns the
/// value (the port allocator, the media engine) keeps no second count in step.
struct Sampled<M> {
    metric: M,
    refresh: Box<dyn Fn(&M) + Send + Sync>,
}

impl<M: prometheus::core::Collector> prometheus::core::Collector for Sampled<M> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.metric.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        (self.refresh)(&self.metric);
        self.metric.collect()
    }
}

impl NodeMetrics {
    /// Exposes `switchboard_rtp_ports_in_use`, read from `in_use` at every scrape, so that a
    /// port a call failed to give back shows as a gauge that does not return to its idle value
    /// (the allocator is the only place that knows; sampling it avoids keeping a second count
    /// in step on every path that allocates or frees). Once per node; later calls are ignored.
    pub fn track_rtp_ports(&self, in_use: impl Fn() -> usize + Send + Sync + 'static) {
        self.sampled_gauge("switchboard_rtp_ports_in_use", "RTP and RTCP ports held by calls on this node.", in_use);
    }

    /// Sets `switchboard_rtp_ports_capacity`: the ports (RTP and RTCP) of the node's range.
    pub fn rtp_ports_capacity(&self, ports: usize) {
        self.rtp_ports_capacity.set(i64::try_from(ports).unwrap_or(i64::MAX));
    }

    /// Counts a call refused because no RTP port pair was free.
    pub fn rtp_port_exhausted(&self) {
        self.rtp_port_exhaustions.inc();
    }

    /// Adds the SRTP/SRTCP packets a call's relay refused (its legs' `srtp_rejected`).
    pub fn srtp_rejected(&self, stats: &crate::media::relay::RelayStats) {
        self.srtp_rejected.inc_by(stats.a.srtp_rejected + stats.b.srtp_rejected);
    }

    /// Samples, at each scrape, the number of two-leg RTP relays on the node's media threads.
    /// Registered once; later calls are ignored.
    pub fn track_media_relays(&self, relays: impl Fn() -> usize + Send + Sync + 'static) {
        self.sampled_gauge(
            "switchboard_media_relays",
            "SIP-to-SIP calls whose RTP the node's media threads relay now (bridged calls not included).",
            relays,
        );
    }

    /// Samples the relay directions forwarded in the kernel when the metrics are rendered.
    pub fn track_kernel_forwards(&self, forwards: impl Fn() -> usize + Send + Sync + 'static) {
        self.sampled_gauge(
            "switchboard_media_kernel_forwards",
            "Relay directions (one per leg that sends) whose RTP the kernel forwards now without user space.",
            forwards,
        );
    }

    /// Samples the packets the kernel forwarded when the metrics are rendered.
    pub fn track_kernel_packets(&self, packets: impl Fn() -> u64 + Send + Sync + 'static) {
        let counter = IntCounter::new(
            "switchboard_media_kernel_packets_total",
            "RTP packets forwarded in the kernel without user space (counted when the relay takes the kernel's counters back, at the latest when the call ends).",
        )
        .expect("valid metric");
        // The source only rises; the counter catches up with it.
        self.register_sampled(counter, move |counter| {
            let (now, shown) = (packets(), counter.get());
            if now > shown {
                counter.inc_by(now - shown);
            }
        });
    }

    /// Samples whether the node serves a configuration from its disk that Postgres has not
    /// confirmed (1) or not (0).
    pub fn track_config_stale(&self, stale: impl Fn() -> bool + Send + Sync + 'static) {
        self.sampled_gauge(
            "switchboard_config_stale",
            "1 while the node serves the configuration it saved on disk because Postgres did not answer at start.",
            move || usize::from(stale()),
        );
    }

    /// Samples the store's local spool when the metrics are rendered: its size on disk, its
    /// bound (alert when `bytes / limit_bytes` nears 1: then new events are kept in memory
    /// only), and the events that found it full.
    pub fn track_store_spool(
        &self,
        bytes: impl Fn() -> u64 + Send + Sync + 'static,
        limit: u64,
        overflow: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.sampled_gauge(
            "switchboard_store_spool_bytes",
            "Bytes of call and CDR events in the store's local spool (written to disk until Postgres has them).",
            move || usize::try_from(bytes()).unwrap_or(usize::MAX),
        );
        self.sampled_gauge(
            "switchboard_store_spool_limit_bytes",
            "The spool's bound (--spool-max-bytes); beyond it new events are kept in memory only.",
            move || usize::try_from(limit).unwrap_or(usize::MAX),
        );
        let counter = IntCounter::new(
            "switchboard_store_spool_overflow_total",
            "Call and CDR events not spooled to disk because the spool was full (kept in memory only).",
        )
        .expect("valid metric");
        self.register_sampled(counter, move |counter| {
            let (now, shown) = (overflow(), counter.get());
            if now > shown {
                counter.inc_by(now - shown);
            }
        });
    }

    /// Samples the flood guard at each scrape: `switchboard_sip_guard_sources` (sources whose
    /// message rate is tracked, bounded by `--tracked-sources`) and
    /// `switchboard_sip_guard_held{what}` (server transactions, call setups and TCP connections
    /// that sources other than carriers hold now). Registered once; later calls are ignored.
    pub fn track_flood_guard(
        &self,
        sources: impl Fn() -> usize + Send + Sync + 'static,
        held: impl Fn() -> [(&'static str, usize); 3] + Send + Sync + 'static,
    ) {
        self.sampled_gauge("switchboard_sip_guard_sources", "Sources whose SIP message rate the node tracks.", sources);
        let gauge = IntGaugeVec::new(
            Opts::new(
                "switchboard_sip_guard_held",
                "What sources other than carriers hold now: server transactions, call setups, TCP connections.",
            ),
            &["what"],
        )
        .expect("valid metric");
        self.register_sampled(gauge, move |gauge| {
            for (what, count) in held() {
                gauge.with_label_values(&[what]).set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        });
    }

    fn sampled_gauge(&self, name: &str, help: &str, sample: impl Fn() -> usize + Send + Sync + 'static) {
        let gauge = IntGauge::new(name, help).expect("valid metric");
        self.register_sampled(gauge, move |gauge| gauge.set(i64::try_from(sample()).unwrap_or(i64::MAX)));
    }

    /// Registers a sampled metric once per node; later calls are ignored.
    fn register_sampled<M: prometheus::core::Collector + 'static>(
        &self,
        metric: M,
        refresh: impl Fn(&M) + Send + Sync + 'static,
    ) {
        let name = metric.desc().first().map(|d| d.fq_name.clone()).unwrap_or_default();
        if let Err(error) = self.registry.register(Box::new(Sampled { metric, refresh: Box::new(refresh) })) {
            tracing::debug!(%error, name, "sampled metric already registered");
        }
    }
}
