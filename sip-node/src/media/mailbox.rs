//! A control channel for the per-call media tasks whose receiving end costs one atomic load
//! per poll while nothing was sent.
//!
//! Why: a media task polls its control channel on every wakeup, and a wakeup happens for every
//! packet (tens per call and second) while control messages (re-INVITE updates, stop, hangup)
//! come a few times per call. Polling a tokio mpsc receiver looks at the channel's list twice
//! and re-registers the waker each time, which at a thousand calls was several per cent of the
//! node's CPU. Here the sender counts what it sends in an atomic, and the receiver polls the
//! channel only when that count moved.
//!
//! Why it cannot miss a message: the channel keeps the receiver's waker registered until a
//! send (or the sender's drop) wakes it, and every send and the drop are preceded by a count.
//! The receiver polls the channel while the count differs from what it received, and once more
//! after each message it received, so after every wake that took the waker a poll either
//! receives the message or registers the waker again before the receiver stops looking.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::sync::mpsc;

/// A new mailbox.
pub(crate) fn mailbox<T>() -> (MailboxSender<T>, MailboxReceiver<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sent = Arc::new(AtomicU64::new(0));
    (MailboxSender { tx, sent: Arc::clone(&sent) }, MailboxReceiver { rx, sent, received: 0, registered: false })
}

/// The sending end (one per mailbox).
pub(crate) struct MailboxSender<T> {
    tx: mpsc::UnboundedSender<T>,
    sent: Arc<AtomicU64>,
}

impl<T> MailboxSender<T> {
    /// Sends a message; `Err` with it when the receiver is gone.
    pub(crate) fn send(&self, message: T) -> Result<(), T> {
        self.sent.fetch_add(1, Ordering::AcqRel);
        self.tx.send(message).map_err(|e| e.0)
    }

    /// Whether the receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<T> Drop for MailboxSender<T> {
    fn drop(&mut self) {
        // Counted like a message, so that the receiver looks and sees the channel closed.
        self.sent.fetch_add(1, Ordering::AcqRel);
    }
}

/// The receiving end.
pub(crate) struct MailboxReceiver<T> {
    rx: mpsc::UnboundedReceiver<T>,
    sent: Arc<AtomicU64>,
    received: u64,
    /// Whether the channel has the task's waker (from a first poll).
    registered: bool,
}

impl<T> MailboxReceiver<T> {
    /// As `mpsc::UnboundedReceiver::poll_recv`; `Ready(None)` once the sender is gone.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if self.registered && self.sent.load(Ordering::Acquire) == self.received {
            return Poll::Pending;
        }
        self.registered = true;
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(_)) = polled {
            self.received += 1;
            // The wake that brought it took the waker: the next poll registers it again.
            self.registered = false;
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn recv<T>(rx: &mut MailboxReceiver<T>) -> Option<T> {
        tokio::time::timeout(Duration::from_secs(2), std::future::poll_fn(|cx| rx.poll_recv(cx)))
            .await
            .expect("the mailbox woke its receiver")
    }

    #[tokio::test]
    async fn messages_and_the_close_wake_the_receiver() {
        let (tx, mut rx) = mailbox();
        let waiting = tokio::spawn(async move {
            let mut got = vec![];
            while let Some(v) = recv(&mut rx).await {
                got.push(v);
            }
            got
        });
        for i in 0..100 {
            tx.send(i).unwrap();
            if i % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        assert_eq!(waiting.await.unwrap(), (0..100).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_message_is_missed_across_threads() {
        for _ in 0..200 {
            let (tx, mut rx) = mailbox();
            let receiver = tokio::spawn(async move {
                let mut n = 0;
                while recv(&mut rx).await.is_some() {
                    n += 1;
                }
                n
            });
            let sender = tokio::spawn(async move {
                for i in 0..5 {
                    tx.send(i).unwrap();
                    tokio::task::yield_now().await;
                }
            });
            sender.await.unwrap();
            assert_eq!(receiver.await.unwrap(), 5);
        }
    }

    #[test]
    fn a_send_to_a_dropped_receiver_fails() {
        let (tx, rx) = mailbox::<u8>();
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(1), Err(1));
    }
}
