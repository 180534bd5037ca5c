//! The store's local spool: call and CDR events on disk until Postgres has them.
//!
//! The memory queue alone loses everything a node killed (or restarted) during a database
//! outage had not written. So every call event ([`StoreEvent::CallStarted`],
//! [`StoreEvent::CallAnswered`], [`StoreEvent::CallEnded`], [`StoreEvent::Cdr`]) is also
//! appended to `spool.log` in the spool directory, one JSON object a line with the time it was
//! recorded. Registration state is not spooled: a restarted node registers afresh.
//!
//! - **Batches**: [`Store::record`](super::Store::record) only copies the event into a buffer
//!   (no system call on the signaling path); the spool task appends the buffer and `fdatasync`s
//!   it every [`SYNC_INTERVAL`], so a crash loses at most that much.
//! - **Bound**: at most `max_bytes` on disk; beyond it new events stay in memory only (counted in
//!   `switchboard_store_spool_overflow_total`, logged once). `switchboard_store_spool_bytes` and
//!   `switchboard_store_spool_limit_bytes` let an alert fire before that.
//! - **Compaction**: once Postgres has every spooled event, the log is rewritten (temporary file,
//!   `fsync`, `rename`) to hold only the calls still in progress, so that a crash later still
//!   knows them.
//! - **Replay** at start ([`Spool::open`]): the old log is read (a torn last line is skipped),
//!   each call that started and never ended gets a CDR with reason `node lost`, ended at the
//!   time of the last line the spool holds (the spool writes a mark every [`MARK_INTERVAL`]
//!   while calls are up), and the whole is moved to `spool.replay` and queued before anything
//!   new. Writes are idempotent (CDRs keyed by `(call_uuid, attempt)`, calls by `call_uuid`),
//!   so replaying events Postgres already has changes nothing. `spool.replay` is removed once
//!   Postgres has it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ActiveCall, CallState, CdrRecord, HangupBy, Shared, StoreEvent, billable_seconds, cdr_cost};

/// How often buffered events are appended and synced.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// How often the spool notes that the node is alive while calls are up: a lost call's end is
/// known to within this.
pub const MARK_INTERVAL: Duration = Duration::from_secs(2);
/// The log is compacted once Postgres has everything in it and it is larger than
/// [`compact_above`] of the spool's bound.
///
/// Compacting rewrites every call still in progress (JSON, fsync, rename) on the node's cores:
/// at 2,000 calls/s a 1 MiB threshold compacted twice a second, and sipp saw the setup p99
/// rise from 28 ms to 64 ms with it (scripts/bench-sip, one pinned core). A larger log costs
/// only disk, bounded by the spool's own bound, and a longer replay after a crash.
fn compact_above(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(1 << 20, 64 << 20)
}
/// The CDR reason of a call that was in progress when the node died.
pub const NODE_LOST: &str = "node lost";

const LOG: &str = "spool.log";
const REPLAY: &str = "spool.replay";

/// Prices a call the node lost, from the configuration it starts with: the per-minute rate and
/// its currency.
pub type RateOf = Arc<dyn Fn(&ActiveCall) -> Option<(Decimal, String)> + Send + Sync>;

/// Where the spool lives and how large it may grow.
#[derive(Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// Prices the CDRs of lost calls; `None` prices them at 0.
    pub rate_of: Option<RateOf>,
}

impl std::fmt::Debug for SpoolOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolOptions").field("dir", &self.dir).field("max_bytes", &self.max_bytes).finish()
    }
}

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io { action, path, source }
}

/// One line of the spool: an event, or (without one) a mark that the node was alive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Line {
    pub(super) at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) event: Option<StoreEvent>,
}

/// Whether `event` goes to the spool.
pub(super) fn spoolable(event: &StoreEvent) -> bool {
    matches!(
        event,
        StoreEvent::CallStarted(_)
            | StoreEvent::CallAnswered { .. }
            | StoreEvent::CallEnded { .. }
            | StoreEvent::Cdr(_)
    )
}

/// The spool's counters, shared with [`Store::record`](super::Store::record) and the metrics.
#[derive(Default)]
pub(super) struct SpoolShared {
    /// Bytes on disk (both files).
    pub(super) bytes: AtomicU64,
    pub(super) max_bytes: u64,
    /// Events not spooled because the spool was full.
    pub(super) overflow: AtomicU64,
    /// Whether the overflow has been logged (once per episode).
    pub(super) full: AtomicBool,
}

/// What a replay recovered.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Replayed {
    /// Events to queue before anything new (the lost calls' CDRs and ends included).
    pub events: Vec<StoreEvent>,
    /// Calls that were in progress when the node died.
    pub lost: usize,
    /// Lines that could not be read (a write torn by the crash).
    pub torn: usize,
}

/// Calls a sequence of events left in progress, with what their `node lost` CDR needs.
#[derive(Debug, Default)]
struct OpenCalls {
    calls: HashMap<Uuid, OpenCall>,
    /// Order of first appearance, so that recovered CDRs come out in a stable order.
    order: Vec<Uuid>,
}

#[derive(Debug)]
struct OpenCall {
    call: ActiveCall,
    /// The highest attempt that already has a CDR.
    attempts: u32,
    /// Every spooled event of the call, for compaction.
    events: Vec<Line>,
}

impl OpenCalls {
    fn track(&mut self, line: &Line) {
        let Some(event) = &line.event else { return };
        match event {
            StoreEvent::CallStarted(call) => {
                let entry = self.calls.entry(call.call_uuid).or_insert_with(|| OpenCall {
                    call: call.clone(),
                    attempts: 0,
                    events: Vec::new(),
                });
                if entry.events.is_empty() {
                    self.order.push(call.call_uuid);
                }
                entry.call = call.clone();
                entry.events.push(line.clone());
            }
            StoreEvent::CallAnswered { call_uuid, at } => {
                if let Some(open) = self.calls.get_mut(call_uuid) {
                    open.call.answered_at = Some(*at);
                    open.call.state = CallState::Answered;
                    open.events.push(line.clone());
                }
            }
            StoreEvent::Cdr(cdr) => {
                if let Some(open) = self.calls.get_mut(&cdr.call_uuid) {
                    open.attempts = open.attempts.max(cdr.attempt);
                    open.events.push(line.clone());
                }
            }
            StoreEvent::CallEnded { call_uuid } => {
                self.calls.remove(call_uuid);
            }
            _ => {}
        }
    }

    /// The calls still open, in the order they started.
    fn open(&self) -> impl Iterator<Item = &OpenCall> {
        self.order.iter().filter_map(|id| self.calls.get(id))
    }

    fn forget_ended(&mut self) {
        let calls = &self.calls;
        self.order.retain(|id| calls.contains_key(id));
    }
}

/// The events to replay from the lines of a spool: all of them, then for each call that never
/// ended a `node lost` CDR (at the time of the last line) and its end.
pub(super) fn recover(lines: Vec<Line>, rate_of: Option<&RateOf>) -> (Vec<Line>, usize) {
    let mut open = OpenCalls::default();
    let mut last_at = None::<DateTime<Utc>>;
    for line in &lines {
        last_at = Some(last_at.map_or(line.at, |last| last.max(line.at)));
        open.track(line);
    }
    let mut out: Vec<Line> = lines.into_iter().filter(|line| line.event.is_some()).collect();
    let mut lost = 0;
    for call in open.open() {
        let end_at = last_at.unwrap_or_else(Utc::now);
        out.push(Line { at: end_at, event: Some(StoreEvent::Cdr(lost_cdr(call, end_at, rate_of))) });
        out.push(Line { at: end_at, event: Some(StoreEvent::CallEnded { call_uuid: call.call.call_uuid }) });
        lost += 1;
    }
    (out, lost)
}

/// The CDR of a call the node lost: ended by the system at `end_at`, billed from its answer.
fn lost_cdr(open: &OpenCall, end_at: DateTime<Utc>, rate_of: Option<&RateOf>) -> CdrRecord {
    let call = &open.call;
    let end_at = end_at.max(call.answered_at.unwrap_or(call.started_at)).max(call.started_at);
    let billable = billable_seconds(call.answered_at, end_at);
    let (rate, currency) = rate_of.and_then(|rate_of| rate_of(call)).unwrap_or((Decimal::ZERO, "USD".into()));
    CdrRecord {
        call_uuid: call.call_uuid,
        call_id: call.call_id.clone(),
        attempt: open.attempts + 1,
        namespace: call.namespace.clone(),
        trunk_name: call.trunk_name.clone(),
        provider: call.provider.clone(),
        gateway: None,
        direction: call.direction,
        from_number: call.from_number.clone(),
        to_number: call.to_number.clone(),
        setup_at: call.started_at,
        ring_at: None,
        answer_at: call.answered_at,
        end_at,
        sip_code: None,
        reason: Some(NODE_LOST.into()),
        hangup_by: Some(HangupBy::System),
        billable_seconds: billable,
        cost: cdr_cost(rate, billable),
        currency,
    }
}

/// Reads the lines of a spool file; unreadable lines (a torn write) are counted and skipped.
fn read_lines(path: &Path) -> Result<(Vec<Line>, usize), SpoolError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(error) => return Err(io("open", path)(error)),
    };
    let mut lines = Vec::new();
    let mut torn = 0;
    for text in BufReader::new(file).split(b'\n') {
        let text = text.map_err(io("read", path))?;
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Line>(&text) {
            Ok(line) => lines.push(line),
            Err(_) => torn += 1,
        }
    }
    Ok((lines, torn))
}

fn encode(lines: &[Line]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(lines.len() * 400);
    for line in lines {
        // Serializing these plain structs cannot fail.
        if serde_json::to_writer(&mut bytes, line).is_ok() {
            bytes.push(b'\n');
        }
    }
    bytes
}

/// Writes `bytes` to `path` atomically: a temporary file, synced, renamed, the directory synced.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
    file.write_all(bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename into", path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync the directory", dir))
}

/// The open spool: the append-only log and, after a replay, the file being replayed.
pub struct Spool {
    dir: PathBuf,
    log: File,
    log_bytes: u64,
    /// `spool.replay` and its size, until Postgres has its events.
    replay: Option<u64>,
    open: OpenCalls,
    pub(super) shared: Arc<SpoolShared>,
}

impl Spool {
    /// Opens the spool in `options.dir` (created if missing) and recovers what a previous run
    /// left: see the module documentation.
    pub fn open(options: &SpoolOptions) -> Result<(Spool, Replayed), SpoolError> {
        let dir = &options.dir;
        fs::create_dir_all(dir).map_err(io("create the spool directory", dir))?;
        let (log_path, replay_path) = (dir.join(LOG), dir.join(REPLAY));
        // A replay that did not finish comes first: it is older than the log.
        let (mut lines, mut torn) = read_lines(&replay_path)?;
        let (newer, newer_torn) = read_lines(&log_path)?;
        lines.extend(newer);
        torn += newer_torn;
        let (lines, lost) = recover(lines, options.rate_of.as_ref());
        let replay = if lines.is_empty() {
            let _ = fs::remove_file(&replay_path);
            None
        } else {
            let bytes = encode(&lines);
            write_atomically(dir, &replay_path, &bytes)?;
            Some(bytes.len() as u64)
        };
        let log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&log_path)
            .map_err(io("open the spool log", &log_path))?;
        sync_dir(dir)?;
        let shared = Arc::new(SpoolShared { max_bytes: options.max_bytes, ..SpoolShared::default() });
        shared.bytes.store(replay.unwrap_or(0), Ordering::Relaxed);
        let events = lines.into_iter().filter_map(|line| line.event).collect();
        let spool = Spool { dir: dir.clone(), log, log_bytes: 0, replay, open: OpenCalls::default(), shared };
        Ok((spool, Replayed { events, lost, torn }))
    }

    fn report(&self) {
        self.shared.bytes.store(self.log_bytes + self.replay.unwrap_or(0), Ordering::Relaxed);
    }

    /// One tick of the spool task: release the replay file, compact (both only when the task
    /// found Postgres caught up), then append `lines` and sync.
    fn write(&mut self, lines: &[Line], release: bool, compact: bool) -> Result<(), SpoolError> {
        if release {
            self.release_replay()?;
        }
        if compact {
            self.compact()?;
        }
        for line in lines {
            self.open.track(line);
        }
        if lines.is_empty() { Ok(()) } else { self.append(&encode(lines)) }
    }

    /// Appends `bytes` and syncs them.
    fn append(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        let path = self.dir.join(LOG);
        self.log.write_all(bytes).map_err(io("append to", &path))?;
        self.log.sync_data().map_err(io("sync", &path))?;
        self.log_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Rewrites the log with only the calls still in progress.
    fn compact(&mut self) -> Result<(), SpoolError> {
        self.open.forget_ended();
        let mut lines: Vec<Line> = self.open.open().flat_map(|call| call.events.iter().cloned()).collect();
        if !lines.is_empty() {
            lines.push(Line { at: Utc::now(), event: None });
        }
        let bytes = encode(&lines);
        let path = self.dir.join(LOG);
        write_atomically(&self.dir, &path, &bytes)?;
        self.log = OpenOptions::new().append(true).open(&path).map_err(io("reopen", &path))?;
        self.log_bytes = bytes.len() as u64;
        Ok(())
    }

    /// Removes `spool.replay` once Postgres has its events.
    fn release_replay(&mut self) -> Result<(), SpoolError> {
        let path = self.dir.join(REPLAY);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io("remove", &path)(error)),
        }
        self.replay = None;
        sync_dir(&self.dir)
    }
}

/// The spool task: appends what [`Store::record`](super::Store::record) buffered, syncs it,
/// releases the replay file and compacts the log once Postgres has caught up. Ends when the
/// store stops (after a last sync).
pub(super) async fn run(shared: Arc<Shared>, mut spool: Spool, replayed_up_to: u64) {
    // The last event appended to the log.
    let mut spooled = replayed_up_to;
    let mut last_write = Instant::now();
    let mut failing = false;
    loop {
        let stopping = shared.spool_stop.load(Ordering::SeqCst);
        // Decided before this tick's events are taken: compaction keeps only the calls still
        // in progress, which is right only when Postgres has every event in the log so far.
        let written = *shared.written.borrow();
        let compact = written >= spooled
            && (spool.log_bytes > compact_above(spool.shared.max_bytes) || (stopping && spool.log_bytes > 0));
        let release = spool.replay.is_some() && written >= replayed_up_to;
        let batch = std::mem::take(&mut shared.lock().spool_buffer);
        let mut lines = Vec::with_capacity(batch.len());
        for (seq, line) in batch {
            spooled = seq;
            lines.push(line);
        }
        if lines.is_empty() && !spool.open.calls.is_empty() && last_write.elapsed() >= MARK_INTERVAL {
            lines.push(Line { at: Utc::now(), event: None });
        }
        if !lines.is_empty() || release || compact {
            let work = tokio::task::spawn_blocking(move || {
                let result = spool.write(&lines, release, compact);
                (spool, result)
            });
            let Ok((back, result)) = work.await else {
                tracing::error!("the spool's writing task failed; events are kept in memory only");
                return;
            };
            spool = back;
            last_write = Instant::now();
            match result {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("writing the store's spool again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::error!(%error, "cannot write the store's spool: {error}; events are kept in memory only");
                }
                Err(_) => {}
            }
            spool.report();
        }
        if stopping {
            return;
        }
        tokio::time::sleep(SYNC_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::tests::call;
    use super::*;
    use chrono::TimeDelta;

    fn size(path: &Path) -> u64 {
        fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    fn line(at: DateTime<Utc>, event: StoreEvent) -> Line {
        Line { at, event: Some(event) }
    }

    #[test]
    fn the_log_is_compacted_above_a_sixteenth_of_the_bound_within_1_to_64_mib() {
        assert_eq!(compact_above(1 << 20), 1 << 20, "a small bound still compacts at 1 MiB");
        assert_eq!(compact_above(805_306_368), 48 << 20, "the chart's 768 MiB");
        assert_eq!(compact_above(1 << 30), 64 << 20, "the default 1 GiB");
        assert_eq!(compact_above(1 << 40), 64 << 20, "never more than 64 MiB to replay");
    }

    #[test]
    fn a_call_that_never_ended_gets_a_node_lost_cdr_at_the_last_line() {
        let t0 = Utc::now();
        let (done, lost) = (call("done"), call("lost"));
        let mut cdr =
            lost_cdr(&OpenCall { call: done.clone(), attempts: 0, events: vec![] }, t0 + TimeDelta::seconds(3), None);
        cdr.reason = Some("caller hung up".into());
        let lines = vec![
            line(t0, StoreEvent::CallStarted(done.clone())),
            line(t0, StoreEvent::CallStarted(lost.clone())),
            line(
                t0 + TimeDelta::seconds(1),
                StoreEvent::CallAnswered { call_uuid: lost.call_uuid, at: t0 + TimeDelta::seconds(1) },
            ),
            line(t0 + TimeDelta::seconds(3), StoreEvent::Cdr(cdr)),
            line(t0 + TimeDelta::seconds(3), StoreEvent::CallEnded { call_uuid: done.call_uuid }),
            Line { at: t0 + TimeDelta::seconds(65), event: None },
        ];
        let rate: RateOf = Arc::new(|_| Some((Decimal::new(12, 3), "EUR".into())));
        let (out, count) = recover(lines, Some(&rate));
        assert_eq!(count, 1);
        // Every event, the mark dropped, then the lost call's CDR and end.
        assert_eq!(out.len(), 7);
        let Some(StoreEvent::Cdr(lost_cdr)) = &out[5].event else { panic!("{out:?}") };
        assert_eq!(lost_cdr.call_uuid, lost.call_uuid);
        assert_eq!(lost_cdr.reason.as_deref(), Some(NODE_LOST));
        assert_eq!(lost_cdr.end_at, t0 + TimeDelta::seconds(65));
        assert_eq!(lost_cdr.answer_at, Some(t0 + TimeDelta::seconds(1)));
        assert_eq!(lost_cdr.billable_seconds, 64);
        assert_eq!((lost_cdr.cost, lost_cdr.currency.as_str()), (cdr_cost(Decimal::new(12, 3), 64), "EUR"));
        assert_eq!(out[6].event, Some(StoreEvent::CallEnded { call_uuid: lost.call_uuid }));
    }

    #[test]
    fn the_lost_cdr_follows_the_attempts_already_billed() {
        let t0 = Utc::now();
        let lost = call("lost");
        let mut failed = lost_cdr(&OpenCall { call: lost.clone(), attempts: 0, events: vec![] }, t0, None);
        failed.reason = Some("503 from gw".into());
        let (out, _) =
            recover(vec![line(t0, StoreEvent::CallStarted(lost.clone())), line(t0, StoreEvent::Cdr(failed))], None);
        let Some(StoreEvent::Cdr(cdr)) = &out[2].event else { panic!("{out:?}") };
        assert_eq!((cdr.attempt, cdr.reason.as_deref()), (2, Some(NODE_LOST)));
    }

    #[test]
    fn open_replays_a_torn_log_and_a_second_open_finds_the_same_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SpoolOptions { dir: dir.path().join("spool"), max_bytes: 1 << 20, rate_of: None };
        fs::create_dir_all(&options.dir).unwrap();
        let t0 = Utc::now();
        let lost = call("lost");
        let mut bytes = encode(&[line(t0, StoreEvent::CallStarted(lost.clone()))]);
        bytes.extend_from_slice(b"{\"at\":\"2026-01-01T00:00:00Z\",\"event\":{\"Cdr\":{\"call_u");
        fs::write(options.dir.join(LOG), &bytes).unwrap();

        let (spool, replayed) = Spool::open(&options).expect("open");
        assert_eq!((replayed.lost, replayed.torn, replayed.events.len()), (1, 1, 3));
        assert!(spool.replay.is_some() && options.dir.join(REPLAY).exists());
        assert_eq!(size(&options.dir.join(LOG)), 0);
        drop(spool);

        // Killed again before Postgres came back: the same events, the lost call not lost twice.
        let (_spool, again) = Spool::open(&options).expect("reopen");
        assert_eq!((again.lost, again.torn), (0, 0));
        assert_eq!(again.events, replayed.events);
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_a_clear_error() {
        let file = tempfile::NamedTempFile::new().expect("file");
        let options = SpoolOptions { dir: file.path().join("spool"), max_bytes: 1, rate_of: None };
        let error = Spool::open(&options).err().expect("a file is not a directory").to_string();
        assert!(error.contains("cannot create the spool directory"), "{error}");
    }
}
