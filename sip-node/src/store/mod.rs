//! Buffered writes of what the node does (calls, CDRs, registrations) to Postgres.
//!
//! Signaling code calls [`Store::record`], which only appends to an in-memory queue: it never
//! blocks, awaits or fails, whatever the state of the database. A writer task drains the queue
//! in batches (one transaction of at most [`StoreOptions::batch_size`] events, multi-row
//! `UNNEST` statements), in order: a batch is committed before the next is taken, and within a
//! batch the events of one call (or one trunk) are folded into their net effect, so an end
//! never overtakes its start. While Postgres is down or slow the batch is retried with backoff
//! and everything else stays queued; the outage is logged once, not per event. Every write is
//! idempotent (upserts, deletes, CDRs `ON CONFLICT (call_uuid, attempt) DO NOTHING`), so a batch
//! retried after a commit whose reply was lost is not written twice.
//!
//! Policies:
//! - **Bound**: at most [`StoreOptions::max_pending`] events (default 1,000,000, some hundreds
//!   of MB at worst) wait in memory; beyond that [`Store::record`] drops the *new* event, counts
//!   it in `switchboard_store_dropped_total` and logs once per overflow.
//! - **Bad rows**: a row Postgres refuses as data (SQLSTATE class 22 or 23, e.g. a numeric
//!   overflow) would block the queue forever; when a batch fails that way it is written one
//!   operation at a time and only the refused operations are dropped (counted and logged).
//!   Every other error (connection, timeout, missing table) is retried: nothing is dropped
//!   because the database is away or not migrated yet.
//! - **Registrations** need the node's row in `nodes` (foreign key); until the node-state task
//!   has written it, registration and reachability updates wait in memory (coalesced per trunk,
//!   last wins) and are retried every second.
//! - **Spool**: with a spool directory ([`Store::open`]), call and CDR events are also appended
//!   to a local file, synced in batches, and replayed at the next start (see [`spool`]), so a
//!   node killed during a database outage loses nothing that reached the disk.
//! - **Shutdown**: [`StoreTask::shutdown`] writes what is queued within a deadline; what is
//!   left after it is logged as lost (or as kept in the spool).

mod billing;
mod plan;
pub mod spool;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use switchboard_model::Direction;

pub use self::billing::{COST_SCALE, billable_seconds, cdr_cost};
use crate::metrics::NodeMetrics;

/// A call in progress, as stored in `active_calls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveCall {
    /// The node's own id of the call (the row's key): unique whatever Call-ID the caller chose.
    pub call_uuid: Uuid,
    /// The SIP Call-ID of the call's first leg.
    pub call_id: String,
    pub namespace: Option<String>,
    pub trunk_name: Option<String>,
    pub provider: Option<String>,
    pub direction: Direction,
    pub from_number: String,
    pub to_number: String,
    pub state: CallState,
    pub started_at: DateTime<Utc>,
    pub answered_at: Option<DateTime<Utc>>,
}

/// Progress of a call in progress (`active_calls.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CallState {
    /// INVITE received or sent, no ringing yet.
    Setup,
    /// A provisional response (180/183) came back.
    Ringing,
    /// The call was answered (200 OK).
    Answered,
}

impl CallState {
    /// The spelling stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::Ringing => "ringing",
            Self::Answered => "answered",
        }
    }
}

/// Who ended a call (`cdrs.hangup_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HangupBy {
    Caller,
    Callee,
    /// The node itself: a timeout, a limit, a failure, shutdown.
    System,
}

impl HangupBy {
    /// The spelling stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Callee => "callee",
            Self::System => "system",
        }
    }
}

/// One call attempt, as stored in `cdrs` (a call that fails over has several attempts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CdrRecord {
    /// The node's id of the call; `(call_uuid, attempt)` is the CDR's key.
    pub call_uuid: Uuid,
    /// The SIP Call-ID of the call's first leg.
    pub call_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub namespace: Option<String>,
    pub trunk_name: Option<String>,
    pub provider: Option<String>,
    /// The gateway the attempt went to (`host:port`).
    pub gateway: Option<String>,
    pub direction: Direction,
    pub from_number: String,
    pub to_number: String,
    pub setup_at: DateTime<Utc>,
    pub ring_at: Option<DateTime<Utc>>,
    pub answer_at: Option<DateTime<Utc>>,
    pub end_at: DateTime<Utc>,
    /// Final SIP status code, if one was received or sent.
    pub sip_code: Option<u16>,
    pub reason: Option<String>,
    pub hangup_by: Option<HangupBy>,
    /// See [`billable_seconds`].
    pub billable_seconds: u32,
    /// See [`cdr_cost`].
    pub cost: Decimal,
    /// ISO 4217 code of `cost`.
    pub currency: String,
}

/// State of the node's registration towards a trunk (`registrations.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RegistrationState {
    Registering,
    Registered,
    Failed,
    Unregistered,
}

impl RegistrationState {
    /// The spelling stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registering => "registering",
            Self::Registered => "registered",
            Self::Failed => "failed",
            Self::Unregistered => "unregistered",
        }
    }
}

/// The registration columns of the node's `registrations` row for a trunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationUpdate {
    pub namespace: String,
    pub trunk_name: String,
    pub state: RegistrationState,
    /// The registrar the REGISTER went to.
    pub registrar: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
}

/// The OPTIONS keepalive columns of the node's `registrations` row for a trunk. A trunk that
/// does not register gets a row in state `unregistered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReachabilityUpdate {
    pub namespace: String,
    pub trunk_name: String,
    pub reachable: bool,
    pub checked_at: DateTime<Utc>,
    /// Round trip of the last answered OPTIONS.
    pub rtt_ms: Option<u32>,
    /// Why the gateway counts as unreachable, when the node knows more than "no answer" (a
    /// refused TLS handshake). Never key material.
    #[serde(default)]
    pub unreachable_reason: Option<String>,
}

/// Something to write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StoreEvent {
    /// Inserts the call into `active_calls`, or replaces its row (to record a new state).
    CallStarted(ActiveCall),
    /// Marks the call answered.
    CallAnswered { call_uuid: Uuid, at: DateTime<Utc> },
    /// Removes the call from `active_calls`.
    CallEnded { call_uuid: Uuid },
    /// Removes every `active_calls` row of this node: at start-up, a restarted node has no
    /// calls left.
    ClearActiveCalls,
    /// Inserts a CDR; a second CDR for the same `(call_uuid, attempt)` is ignored.
    Cdr(CdrRecord),
    /// Upserts the registration columns of the trunk's row.
    Registration(RegistrationUpdate),
    /// Upserts the reachability columns of the trunk's row.
    Reachability(ReachabilityUpdate),
    /// Removes the node's row for the trunk.
    TrunkRemoved { namespace: String, trunk_name: String },
}

/// Tuning of the store; [`Default`] suits production.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most events written in one transaction.
    pub batch_size: usize,
    /// Most events kept in memory; see the module documentation.
    pub max_pending: usize,
    /// Bound on one transaction (the pool's acquire timeout usually answers first).
    pub write_timeout: Duration,
    /// First retry delay after a failed write; doubles up to `max_retry_delay`.
    pub min_retry_delay: Duration,
    pub max_retry_delay: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_pending: 1_000_000,
            write_timeout: Duration::from_secs(15),
            min_retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(5),
        }
    }
}

/// Handle to record events; cheap to clone.
#[derive(Clone)]
pub struct Store {
    sink: Sink,
}

/// Where a [`Store`]'s events go.
#[derive(Clone)]
enum Sink {
    /// Queued for the writer task (and the spool) that writes them to Postgres.
    Writer(Arc<Shared>),
    /// Sent to a channel: unit tests check what call logic records without Postgres
    /// (`Store::recording`).
    #[cfg(test)]
    Channel(tokio::sync::mpsc::UnboundedSender<StoreEvent>),
}

/// State shared by the handles and the writer.
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer when something is queued.
    wake: Notify,
    /// Sequence number of the last event written (or given up on); `flush` waits on it.
    written: watch::Sender<u64>,
    /// Set by [`StoreTask::shutdown`]: drain and stop.
    stopping: AtomicBool,
    metrics: Option<NodeMetrics>,
    max_pending: usize,
    /// The spool's counters, when events are spooled.
    spool: Option<Arc<spool::SpoolShared>>,
    /// Tells the spool task to sync once more and stop.
    spool_stop: AtomicBool,
}

struct Queue {
    events: VecDeque<(u64, StoreEvent)>,
    /// Sequence number of the last event queued.
    recorded: u64,
    /// Whether events are being dropped because the queue is full (logged once per episode).
    overflowing: bool,
    /// Events for the spool task to append, with their sequence numbers.
    spool_buffer: Vec<(u64, spool::Line)>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Events recorded but not written yet.
    fn pending(&self, recorded: u64) -> u64 {
        recorded.saturating_sub(*self.written.borrow())
    }

    fn report_pending(&self, recorded: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.set_store_pending(self.pending(recorded));
        }
    }
}

impl Store {
    /// Starts the writer task for the node `node_id` with the default [`StoreOptions`].
    /// Must be called inside a Tokio runtime.
    pub fn spawn(pool: PgPool, node_id: String, metrics: Option<NodeMetrics>) -> (Store, StoreTask) {
        Self::spawn_with(pool, node_id, metrics, StoreOptions::default())
    }

    /// Starts the writer task with explicit options (no spool).
    pub fn spawn_with(
        pool: PgPool,
        node_id: String,
        metrics: Option<NodeMetrics>,
        options: StoreOptions,
    ) -> (Store, StoreTask) {
        Self::start(pool, node_id, metrics, options, None)
    }

    /// Starts the writer task and, with `spool`, the spool task after replaying what a previous
    /// run left in it (queued before anything recorded later). Fails only when the spool
    /// directory cannot be used.
    pub fn open(
        pool: PgPool,
        node_id: String,
        metrics: Option<NodeMetrics>,
        options: StoreOptions,
        spool: Option<&spool::SpoolOptions>,
    ) -> Result<(Store, StoreTask, spool::Replayed), spool::SpoolError> {
        let Some(spool_options) = spool else {
            // The series exist without a spool too (at 0, limit 0), so that dashboards and
            // alert rules find them on every node.
            if let Some(metrics) = &metrics {
                metrics.track_store_spool(|| 0, 0, || 0);
            }
            let (store, task) = Self::start(pool, node_id, metrics, options, None);
            return Ok((store, task, spool::Replayed::default()));
        };
        let (spool, replayed) = spool::Spool::open(spool_options)?;
        if let Some(metrics) = &metrics {
            let (bytes, overflow) = (Arc::clone(&spool.shared), Arc::clone(&spool.shared));
            metrics.track_store_spool(
                move || bytes.bytes.load(Ordering::Relaxed),
                spool_options.max_bytes,
                move || overflow.overflow.load(Ordering::Relaxed),
            );
        }
        if !replayed.events.is_empty() || replayed.torn > 0 {
            tracing::info!(
                events = replayed.events.len(),
                lost_calls = replayed.lost,
                torn_lines = replayed.torn,
                "replaying {} call and CDR events from the spool in {} ({} calls were in progress when the node \
                 stopped: CDR reason `{}`)",
                replayed.events.len(),
                spool_options.dir.display(),
                replayed.lost,
                spool::NODE_LOST
            );
        }
        let (store, mut task) = Self::start(pool, node_id, metrics, options, Some(Arc::clone(&spool.shared)));
        for event in replayed.events.iter().cloned() {
            store.queue(event, false);
        }
        let replayed_up_to = task.shared.lock().recorded;
        task.spool = Some(tokio::spawn(spool::run(Arc::clone(&task.shared), spool, replayed_up_to)));
        Ok((store, task, replayed))
    }

    fn start(
        pool: PgPool,
        node_id: String,
        metrics: Option<NodeMetrics>,
        options: StoreOptions,
        spool: Option<Arc<spool::SpoolShared>>,
    ) -> (Store, StoreTask) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                recorded: 0,
                overflowing: false,
                spool_buffer: Vec::new(),
            }),
            wake: Notify::new(),
            written: watch::Sender::new(0),
            stopping: AtomicBool::new(false),
            metrics,
            max_pending: options.max_pending.max(1),
            spool,
            spool_stop: AtomicBool::new(false),
        });
        let writer = writer::Writer::new(pool, node_id, shared.clone(), options);
        let handle = tokio::spawn(writer.run());
        (Store { sink: Sink::Writer(shared.clone()) }, StoreTask { shared, handle, spool: None })
    }

    /// A store that writes nothing and sends every recorded event to the returned channel, for
    /// unit tests of what call logic records.
    #[cfg(test)]
    pub(crate) fn recording() -> (Store, tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Store { sink: Sink::Channel(tx) }, rx)
    }

    /// Queues `event` for writing (and for the spool, when there is one). Never blocks (a short
    /// uncontended mutex, no system call), never fails; drops the event only when
    /// [`StoreOptions::max_pending`] events are already waiting.
    pub fn record(&self, event: StoreEvent) {
        self.queue(event, true);
    }

    fn queue(&self, event: StoreEvent, spool: bool) {
        let shared = match &self.sink {
            Sink::Writer(shared) => &**shared,
            #[cfg(test)]
            Sink::Channel(tx) => {
                let _ = tx.send(event);
                return;
            }
        };
        let spooled = match &shared.spool {
            Some(counters) if spool && spool::spoolable(&event) => {
                if counters.bytes.load(Ordering::Relaxed) < counters.max_bytes {
                    if counters.full.swap(false, Ordering::Relaxed) {
                        tracing::info!("the store's spool has room again; spooling events");
                    }
                    Some(spool::Line { at: Utc::now(), event: Some(event.clone()) })
                } else {
                    counters.overflow.fetch_add(1, Ordering::Relaxed);
                    if !counters.full.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            max_bytes = counters.max_bytes,
                            "the store's spool is full ({} bytes); new call and CDR events are kept in memory only \
                             until Postgres catches up",
                            counters.max_bytes
                        );
                    }
                    None
                }
            }
            _ => None,
        };
        let mut queue = shared.lock();
        if queue.events.len() >= shared.max_pending {
            if !queue.overflowing {
                queue.overflowing = true;
                tracing::error!(
                    max_pending = shared.max_pending,
                    "the store holds {} unwritten events (is Postgres down?); dropping new events until it \
                     catches up",
                    shared.max_pending
                );
            }
            drop(queue);
            if let Some(metrics) = &shared.metrics {
                metrics.store_dropped(1);
            }
            return;
        }
        if queue.overflowing && queue.events.len() < shared.max_pending / 2 {
            queue.overflowing = false;
            tracing::info!("the store has room again; recording events");
        }
        queue.recorded += 1;
        let seq = queue.recorded;
        queue.events.push_back((seq, event));
        if let Some(line) = spooled {
            // Bounded like the queue, should the spool task stall on a slow disk.
            if queue.spool_buffer.len() < shared.max_pending {
                queue.spool_buffer.push((seq, line));
            } else if let Some(counters) = &shared.spool {
                counters.overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
        let recorded = queue.recorded;
        drop(queue);
        shared.report_pending(recorded);
        shared.wake.notify_one();
    }

    /// Waits until every event recorded before the call is written (or refused by the
    /// database as invalid), for at most `limit`. Returns whether it was.
    pub async fn flush(&self, limit: Duration) -> bool {
        let Some(shared) = self.shared() else { return true };
        let target = shared.lock().recorded;
        let mut written = shared.written.subscribe();
        tokio::time::timeout(limit, written.wait_for(|written| *written >= target)).await.is_ok_and(|r| r.is_ok())
    }

    /// Events recorded and not written yet.
    pub fn pending(&self) -> u64 {
        let Some(shared) = self.shared() else { return 0 };
        let recorded = shared.lock().recorded;
        shared.pending(recorded)
    }

    /// The writer's shared state (`None` for a recording store: nothing is pending).
    fn shared(&self) -> Option<&Shared> {
        match &self.sink {
            Sink::Writer(shared) => Some(shared),
            #[cfg(test)]
            Sink::Channel(_) => None,
        }
    }
}

/// The writer task. Dropping it leaves the writer running (detached); call
/// [`StoreTask::shutdown`] to write what is queued and stop.
pub struct StoreTask {
    shared: Arc<Shared>,
    handle: JoinHandle<()>,
    /// The spool task, when events are spooled.
    spool: Option<JoinHandle<()>>,
}

impl StoreTask {
    /// Writes everything recorded so far (and anything recorded meanwhile), then stops the
    /// writer; gives up after `deadline`, logging how many events were not written. Returns
    /// whether everything was written.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let finished = tokio::time::timeout(deadline, &mut self.handle).await.is_ok();
        if !finished {
            self.handle.abort();
        }
        // The spool syncs what was recorded until now, then stops.
        self.shared.spool_stop.store(true, Ordering::SeqCst);
        if let Some(spool) = self.spool.take()
            && tokio::time::timeout(SPOOL_STOP_LIMIT, spool).await.is_err()
        {
            tracing::warn!("the store's spool did not finish its last sync within {SPOOL_STOP_LIMIT:?}");
        }
        let recorded = self.shared.lock().recorded;
        let lost = self.shared.pending(recorded);
        let kept = if self.shared.spool.is_some() { "kept in the spool for the next start" } else { "lost" };
        match (finished, lost) {
            (_, 0) => {}
            (true, lost) => tracing::warn!(lost, "the store stopped with {lost} events not written ({kept})"),
            (false, lost) => tracing::warn!(
                lost,
                "the store could not write {lost} events to Postgres within {deadline:?}; they are {kept}"
            ),
        }
        lost == 0
    }
}

/// How long a stopping store waits for the spool's last sync.
const SPOOL_STOP_LIMIT: Duration = Duration::from_secs(1);
