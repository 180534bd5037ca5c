//! The media engine: a few OS threads, each with its own level-triggered epoll set, that drive
//! every two-leg RTP relay of the node.
//!
//! Why not a tokio task per relay: a relayed call is 100 small packets a second and nothing else,
//! and per packet a task costs more than the kernel does: the reactor's edge-triggered readiness
//! must be drained until `EAGAIN` (a second `recvfrom` per packet), the task is woken and
//! scheduled, and its poll re-checks every source it waits on. Measured on the 2-core VM of
//! the benchmark, a relayed packet cost 7.1 µs of CPU that way against 3.0 µs here (`recvfrom` +
//! `sendto`, plus an `epoll_wait` shared by every socket that became readable at the same time).
//! Level-triggered epoll needs no draining read: each readable socket gets one `recvfrom` per
//! wait, which also serves many calls fairly when one of them is flooded. And the media no longer
//! share a runtime with signaling and database writes, whose bursts would show as jitter.
//!
//! A relay is added to the worker with the fewest relays and stays there
//! ([`MediaEngine::spawn_relay`]). The call talks to it through its [`RelayHandle`], which holds
//! an `EngineRelay` (updates from re-INVITEs, stop); commands travel on a channel and an
//! eventfd wakes the worker. The relay's counters and events are the same as those of a task
//! relay ([`super::relay`]). Media timeouts are checked by a sweep every [`SWEEP`], against a
//! deadline per relay.
//!
//! Bridged relays (a caller and the AI bridge) stay tokio tasks: their other side is a
//! WebSocket session that lives on the runtime.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::kernel::{ForwardEntry, ForwardKey, KernelError, KernelForwarder, KernelMode};
use super::relay::{
    Control, EngineHold, LegId, RECEIVE_BUFFER, Relay, RelayConfig, RelayError, RelayEvent, RelayHandle, RtpLegSetup,
};

/// How often media timeouts are checked.
pub const SWEEP: Duration = Duration::from_millis(50);
/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 512;
/// The epoll token of a worker's eventfd.
const WAKE_TOKEN: u64 = u64::MAX;

/// How many media threads, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineConfig {
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
    /// CPUs to pin the workers to, in turn (empty: not pinned).
    pub cpus: Vec<usize>,
    /// Whether steady streams are forwarded in the kernel ([`super::kernel`]).
    pub kernel: KernelMode,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// epoll, eventfd or the thread could not be created.
    #[error("cannot start the media engine: {0}")]
    Io(#[from] io::Error),
    /// Kernel forwarding was required and is not available.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// What a worker is told.
enum Command {
    Add {
        id: u64,
        relay: Box<Relay>,
        done: Arc<AtomicBool>,
    },
    Control(u64, Control),
    /// The call took the relay's directions out of the kernel (before an update): their last
    /// state, for the relay to fold in.
    KernelReleased(u64, [Option<ForwardEntry>; 2]),
    Remove(u64),
    Shutdown,
}

/// A worker as the rest of the process sees it.
struct WorkerLink {
    commands: Mutex<Vec<Command>>,
    wake: EventFd,
    relays: AtomicUsize,
}

impl WorkerLink {
    /// Queues `command` and wakes the worker, unless a wake is already pending: the worker
    /// takes the whole queue after each wake, so only a push into an empty queue needs one.
    /// At 2,000 calls/s an eventfd write per command (each a context switch to the media thread
    /// when it shares the signaling core) was 3-4 % of the node's CPU.
    fn send(&self, command: Command) {
        let was_empty = {
            let mut commands = self.commands.lock().unwrap_or_else(|p| p.into_inner());
            let was_empty = commands.is_empty();
            commands.push(command);
            was_empty
        };
        if was_empty {
            // A full eventfd counter (2^64 - 2 wakes pending) cannot happen; a failed write
            // only delays the command to the next sweep.
            let _ = self.wake.write(1);
        }
    }
}

/// The media threads. Dropping it stops them (and every relay still on them).
pub struct MediaEngine {
    workers: Vec<Arc<WorkerLink>>,
    kernel: Option<Arc<KernelForwarder>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for MediaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaEngine").field("threads", &self.workers.len()).finish()
    }
}

/// The process's engine, once one started ([`MediaEngine::shared`]).
static SHARED: Mutex<Option<Arc<MediaEngine>>> = Mutex::new(None);

impl MediaEngine {
    /// Starts the worker threads.
    pub fn start(config: &EngineConfig) -> Result<MediaEngine, EngineError> {
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let kernel = match config.kernel {
            KernelMode::Off => None,
            KernelMode::Auto => KernelForwarder::load()
                .inspect_err(|error| tracing::info!(%error, "kernel RTP forwarding off; relaying in user space"))
                .ok(),
            KernelMode::On => Some(KernelForwarder::load()?),
        }
        .map(Arc::new);
        let mut engine = MediaEngine { workers: Vec::new(), kernel, threads: Vec::new(), next_id: AtomicU64::new(1) };
        for index in 0..threads {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
            let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(io::Error::from)?;
            epoll.add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN)).map_err(io::Error::from)?;
            let link = Arc::new(WorkerLink { commands: Mutex::new(Vec::new()), wake, relays: AtomicUsize::new(0) });
            let cpu = (!config.cpus.is_empty()).then(|| config.cpus[index % config.cpus.len()]);
            let worker = Worker {
                link: Arc::clone(&link),
                epoll,
                slots: Vec::new(),
                free: Vec::new(),
                ids: HashMap::new(),
                kernel: engine.kernel.clone(),
            };
            let thread = std::thread::Builder::new().name(format!("media-{index}")).spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                worker.run();
            })?;
            engine.workers.push(link);
            engine.threads.push(thread);
        }
        Ok(engine)
    }

    /// The process's engine: the first caller starts it with its configuration, later callers
    /// get the same one. A node takes its engine from here at start and passes it to whatever
    /// starts relays; several nodes in one process (the tests) share the first one's engine,
    /// whose threads are sized to the cores and whose kernel program attaches once per
    /// interface. A start that failed is not remembered: the next caller tries again.
    pub fn shared(config: &EngineConfig) -> Result<Arc<MediaEngine>, EngineError> {
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(engine) = &*shared {
            return Ok(Arc::clone(engine));
        }
        let engine = Arc::new(MediaEngine::start(config)?);
        *shared = Some(Arc::clone(&engine));
        Ok(engine)
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Relay directions forwarded in the kernel now (0 without kernel forwarding).
    pub fn kernel_forwards(&self) -> usize {
        self.kernel.as_ref().map_or(0, |k| k.installed())
    }

    /// Packets the kernel forwarded for this engine's relays (taken back so far).
    pub fn kernel_packets(&self) -> u64 {
        self.kernel.as_ref().map_or(0, |k| k.forwarded_packets())
    }

    /// The kernel fast path, if loaded.
    pub fn kernel(&self) -> Option<&KernelForwarder> {
        self.kernel.as_deref()
    }

    /// Relays on the engine now (added and not yet removed), for the node's metrics.
    pub fn relays(&self) -> usize {
        self.workers.iter().map(|w| w.relays.load(Ordering::Relaxed)).sum()
    }

    /// Starts a relay between two RTP legs on this engine: it takes the legs' sockets (their
    /// ports go back when the relay ends) and reports on the channel returned.
    pub fn spawn_relay(
        &self,
        a: RtpLegSetup,
        b: RtpLegSetup,
        config: RelayConfig,
    ) -> Result<(RelayHandle, mpsc::Receiver<RelayEvent>), RelayError> {
        let (relay, events) = Relay::new(a, b, config)?;
        let counters = relay.counters();
        let hold = self.add(relay)?;
        Ok((RelayHandle::on_engine(Box::new(hold), counters), events))
    }

    /// Puts a relay on the least loaded worker.
    pub(crate) fn add(&self, relay: Relay) -> Result<EngineRelay, RelayError> {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.relays.load(Ordering::Relaxed))
            .ok_or_else(|| RelayError::Engine("the media engine has no threads".into()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let done = Arc::new(AtomicBool::new(false));
        let kernel = self.kernel.as_ref().map(|k| (Arc::clone(k), relay.kernel_keys()));
        worker.relays.fetch_add(1, Ordering::Relaxed);
        worker.send(Command::Add { id, relay: Box::new(relay), done: Arc::clone(&done) });
        Ok(EngineRelay { worker: Arc::clone(worker), id, done, stopped: false, kernel })
    }
}

impl Drop for MediaEngine {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.send(Command::Shutdown);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A call's hold on a relay in the engine. Dropping it removes the relay (its ports go back).
pub(crate) struct EngineRelay {
    worker: Arc<WorkerLink>,
    id: u64,
    done: Arc<AtomicBool>,
    stopped: bool,
    /// The kernel fast path and the relay's keys in it (by receiving leg).
    kernel: Option<(Arc<KernelForwarder>, [Option<ForwardKey>; 2])>,
}

impl EngineHold for EngineRelay {
    /// Passes an update on to the relay.
    fn control(&self, control: Control) -> Result<(), RelayError> {
        if self.done.load(Ordering::Acquire) {
            return Err(RelayError::Stopped);
        }
        if let (Control::Update(..), Some((kernel, keys))) = (&control, &self.kernel) {
            // The kernel stops forwarding now, not when the media thread gets to the update: a
            // packet sent after the call answered a hold must not cross.
            let released = keys.map(|key| key.and_then(|key| kernel.remove(&key)));
            if released.iter().any(Option::is_some) {
                self.worker.send(Command::KernelReleased(self.id, released));
            }
        }
        self.worker.send(Command::Control(self.id, control));
        Ok(())
    }

    /// Whether the relay has been removed.
    fn is_finished(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Removes the relay and waits until its sockets are closed.
    fn stop(mut self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.stopped = true;
        let (tx, rx) = oneshot::channel();
        self.worker.send(Command::Control(self.id, Control::Stop(tx)));
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Drop for EngineRelay {
    fn drop(&mut self) {
        if !self.stopped {
            self.worker.send(Command::Remove(self.id));
        }
    }
}

/// A relay on a worker, with its media-timeout deadline.
struct Slot {
    id: u64,
    relay: Box<Relay>,
    done: Arc<AtomicBool>,
    deadline: Instant,
}

/// One media thread.
struct Worker {
    link: Arc<WorkerLink>,
    epoll: Epoll,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    ids: HashMap<u64, usize>,
    kernel: Option<Arc<KernelForwarder>>,
}

/// Which socket of a relay an epoll token names: the slot in the upper bits, then
/// (leg B?, RTCP?) in the two lowest.
fn token(slot: usize, leg: LegId, rtcp: bool) -> u64 {
    ((slot as u64) << 2) | (u64::from(leg == LegId::B) << 1) | u64::from(rtcp)
}

impl Worker {
    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
        let mut buf = vec![0u8; RECEIVE_BUFFER];
        let mut next_sweep = Instant::now() + SWEEP;
        loop {
            // Commands are taken when the eventfd says there are some (below): a push into an
            // empty queue writes it, and one pushed before this thread first waits leaves it
            // readable. The eventfd is read before the queue is taken, so a push that found
            // the queue non-empty is always in a take that follows a read.
            let timeout = if self.ids.is_empty() {
                EpollTimeout::NONE
            } else {
                let left = next_sweep.saturating_duration_since(Instant::now());
                EpollTimeout::from(left.as_millis().min(1000) as u16)
            };
            let ready = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(error) => {
                    tracing::error!(%error, "epoll_wait failed; media thread retries");
                    std::thread::sleep(SWEEP);
                    0
                }
            };
            // Commands first: an update (hold, a new far end) pushed before a packet arrived
            // must apply to that packet even when both are reported by the same wait.
            if events[..ready].iter().any(|e| e.data() == WAKE_TOKEN) {
                let _ = self.link.wake.read();
                if !self.take_commands() {
                    return;
                }
            }
            for event in &events[..ready] {
                let data = event.data();
                if data == WAKE_TOKEN {
                    continue;
                }
                let slot = (data >> 2) as usize;
                let Some(Some(entry)) = self.slots.get_mut(slot) else { continue };
                let leg = if data & 2 == 0 { LegId::A } else { LegId::B };
                // A panic in one call's packet handling (a bug: nothing from the network should
                // cause one) ends that call's relay, not the thread and every call on it.
                let relay = &mut entry.relay;
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    relay.receive_one(leg, data & 1 == 1, &mut buf);
                }));
                if handled.is_err() {
                    let id = entry.id;
                    tracing::error!(relay = id, "RTP relay panicked; its call loses its media");
                    self.remove(id);
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                for entry in self.slots.iter_mut().flatten() {
                    if now >= entry.deadline {
                        entry.deadline = entry.relay.check_timeout();
                    }
                }
                next_sweep = now + SWEEP;
            }
        }
    }

    /// Applies queued commands; false on shutdown.
    fn take_commands(&mut self) -> bool {
        let commands = std::mem::take(&mut *self.link.commands.lock().unwrap_or_else(|p| p.into_inner()));
        for command in commands {
            match command {
                Command::Add { id, relay, done } => self.add(id, relay, done),
                Command::Control(id, Control::Update(leg, media)) => {
                    if let Some(entry) = self.ids.get(&id).and_then(|&s| self.slots[s].as_mut()) {
                        entry.relay.update(leg, *media);
                        entry.deadline = Instant::now();
                    }
                }
                Command::Control(id, Control::Dtmf(leg, press)) => {
                    if let Some(entry) = self.ids.get(&id).and_then(|&s| self.slots[s].as_mut()) {
                        entry.relay.inject_dtmf(leg, &press);
                    }
                }
                Command::Control(id, Control::Stop(reply)) => {
                    self.remove(id);
                    let _ = reply.send(());
                }
                // Only bridged legs hand their sockets back (the handle never sends it here).
                Command::Control(_, Control::Release(_)) => {}
                Command::KernelReleased(id, last) => {
                    if let Some(entry) = self.ids.get(&id).and_then(|&s| self.slots[s].as_mut()) {
                        entry.relay.kernel_released(last);
                    }
                }
                Command::Remove(id) => self.remove(id),
                Command::Shutdown => {
                    for id in self.ids.keys().copied().collect::<Vec<_>>() {
                        self.remove(id);
                    }
                    return false;
                }
            }
        }
        true
    }

    fn add(&mut self, id: u64, mut relay: Box<Relay>, done: Arc<AtomicBool>) {
        relay.use_kernel(self.kernel.clone());
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut registered = Ok(());
        for (leg, rtcp, socket) in relay.sockets() {
            if let Err(error) = self.epoll.add(socket, EpollEvent::new(EpollFlags::EPOLLIN, token(slot, leg, rtcp))) {
                registered = Err(error);
                break;
            }
        }
        if let Err(error) = registered {
            // The relay is dropped (its ports go back); the call sees it as finished.
            tracing::error!(%error, "cannot register RTP sockets with the media thread");
            for (_, _, socket) in relay.sockets() {
                let _ = self.epoll.delete(socket);
            }
            done.store(true, Ordering::Release);
            self.free.push(slot);
            self.link.relays.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let deadline = Instant::now() + relay.media_timeout();
        self.slots[slot] = Some(Slot { id, relay, done, deadline });
        self.ids.insert(id, slot);
    }

    fn remove(&mut self, id: u64) {
        let Some(slot) = self.ids.remove(&id) else { return };
        if let Some(entry) = self.slots[slot].take() {
            for (_, _, socket) in entry.relay.sockets() {
                let _ = self.epoll.delete(socket);
            }
            drop(entry.relay);
            entry.done.store(true, Ordering::Release);
        }
        self.free.push(slot);
        self.link.relays.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_slot_leg_and_socket() {
        assert_eq!(token(0, LegId::A, false), 0);
        assert_eq!(token(0, LegId::A, true), 1);
        assert_eq!(token(0, LegId::B, false), 2);
        assert_eq!(token(5, LegId::B, true), 23);
    }

    #[tokio::test]
    async fn relays_spread_over_workers_and_an_engine_dropped_releases_their_ports() {
        use std::net::{IpAddr, Ipv4Addr};

        use switchboard_model::Codec;

        use crate::media::ports::{PortAllocator, PortRange};
        use crate::media::relay::{LegMedia, RtpLegSetup};

        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let allocator = PortAllocator::new(localhost, PortRange { min: 42900, max: 42999 }).unwrap();
        let engine = MediaEngine::start(&EngineConfig { threads: 2, ..EngineConfig::default() }).unwrap();
        let far = std::net::UdpSocket::bind((localhost, 0)).unwrap();
        let far_addr = far.local_addr().unwrap();
        let mut handles = vec![];
        for _ in 0..4 {
            let leg = |ports| RtpLegSetup { ports, media: LegMedia::new(Codec::Pcmu, Some(far_addr)) };
            let (a, b) = (allocator.allocate().unwrap(), allocator.allocate().unwrap());
            handles.push(engine.spawn_relay(leg(a), leg(b), RelayConfig::default()).unwrap().0);
        }
        // Least loaded first: two relays on each worker.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while engine.workers.iter().any(|w| w.relays.load(Ordering::Relaxed) != 2) {
            assert!(std::time::Instant::now() < deadline, "relays not spread");
            std::thread::sleep(Duration::from_millis(10));
        }
        let stopped = handles.pop().unwrap();
        stopped.stop().await;
        assert_eq!(allocator.in_use(), 6, "a stopped relay's two pairs go back at once");
        assert!(handles.iter().all(|h| !h.is_finished()));
        assert_eq!(engine.relays(), 3);
        drop(engine);
        assert!(handles.iter().all(|h| h.is_finished()), "the engine's end ends its relays");
        assert_eq!(allocator.in_use(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn commands_sent_from_many_threads_at_once_all_reach_the_worker() {
        use std::net::{IpAddr, Ipv4Addr};

        use switchboard_model::Codec;

        use crate::media::ports::{PortAllocator, PortRange};
        use crate::media::relay::{LegMedia, RtpLegSetup};

        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let allocator = Arc::new(PortAllocator::new(localhost, PortRange { min: 43000, max: 43799 }).unwrap());
        let engine = Arc::new(MediaEngine::start(&EngineConfig { threads: 1, ..EngineConfig::default() }).unwrap());
        let far = std::net::UdpSocket::bind((localhost, 0)).unwrap().local_addr().unwrap();
        let mut tasks = vec![];
        for _ in 0..8 {
            let (engine, allocator) = (engine.clone(), allocator.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let leg = |ports| RtpLegSetup { ports, media: LegMedia::new(Codec::Pcmu, Some(far)) };
                    let (a, b) = (allocator.allocate().unwrap(), allocator.allocate().unwrap());
                    let handle = engine.spawn_relay(leg(a), leg(b), RelayConfig::default()).unwrap().0;
                    // Stopping waits for the worker to apply the removal: a lost wake hangs it.
                    if tokio::time::timeout(Duration::from_secs(5), handle.stop()).await.is_err() {
                        return false;
                    }
                }
                true
            }));
        }
        let mut applied = true;
        for task in tasks {
            applied &= task.await.unwrap();
        }
        if !applied {
            // Dropping the engine would wait for its worker, which a lost wake leaves asleep.
            std::mem::forget(engine);
            panic!("a relay's stop was not applied within 5 s: the worker missed a wake");
        }
        assert_eq!(engine.relays(), 0);
        assert_eq!(allocator.in_use(), 0, "every relay's ports went back");
    }

    #[test]
    fn an_engine_starts_and_stops() {
        let engine = MediaEngine::start(&EngineConfig { threads: 2, ..EngineConfig::default() }).unwrap();
        assert_eq!(engine.threads(), 2);
        drop(engine);
    }
}
