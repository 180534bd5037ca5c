//! Child-process helpers shared by local mode's Postgres and SIP node: tie a child's life to
//! this process and stop a child by its PID with a bounded wait.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Asks the kernel to send `signal` to the child when the spawning thread dies, so that a
/// killed `switchboard local` leaves no servers behind. Spawn only from threads that live as long
/// as the child (the main thread or a runtime worker, not a `spawn_blocking` thread).
pub fn die_with_parent(command: &mut Command, signal: Signal) {
    // SAFETY: the closure only makes the async-signal-safe prctl(2) system call. It runs after
    // std's uid switch, which would otherwise clear the setting again.
    unsafe {
        command.pre_exec(move || nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from));
    }
}

/// Sends `signal` to the child (by its PID), waits up to `timeout` for it to exit, then kills
/// it with SIGKILL. Returns `false` when it had to be killed.
pub async fn stop_child(child: &mut Child, signal: Signal, timeout: Duration) -> bool {
    let Some(pid) = child.id() else { return true }; // already reaped
    if matches!(child.try_wait(), Ok(Some(_))) {
        return true;
    }
    let _ = kill(Pid::from_raw(pid as i32), signal);
    if tokio::time::timeout(timeout, child.wait()).await.is_ok() {
        return true;
    }
    let _ = child.kill().await;
    false
}

/// The blocking variant of [`stop_child`], for `Drop` implementations.
pub fn stop_child_blocking(child: &mut Child, signal: Signal, timeout: Duration) {
    let Some(pid) = child.id() else { return };
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = kill(Pid::from_raw(pid as i32), signal);
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.start_kill();
}

/// Exponential backoff: `initial`, doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, next: initial }
    }

    /// The delay to wait now; the following one is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Starts over at the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn stop_child_ends_a_process_that_ignores_the_signal() {
        let mut child =
            Command::new("sh").args(["-c", "trap '' TERM; exec sleep 30"]).kill_on_drop(true).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let graceful = stop_child(&mut child, Signal::SIGTERM, Duration::from_millis(300)).await;
        assert!(!graceful);
        assert!(child.try_wait().unwrap().is_some());
    }
}
