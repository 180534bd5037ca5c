//! Kernel receive timestamps (`SO_TIMESTAMPNS`): when a datagram or TCP segment reached the
//! host, as opposed to when the node got round to reading it. The bridge measures its added
//! delay from them, so that time a frame spent queued in a socket buffer while the node was
//! busy counts, as it does for the caller.
//!
//! The kernel stamps with `CLOCK_REALTIME`; [`Clocks`] converts to the monotonic [`Instant`]
//! the rest of the node uses, from one reading of both clocks per receive call.
//!
//! The system calls themselves (`setsockopt`, `recvmsg`/`recvmmsg` and the control messages that
//! carry the stamps, `clock_gettime`) are in [`super::sys`].

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::sys::{self, Stamp, set_timestamps};

/// Asks the kernel to stamp what this socket receives.
///
/// The kernel stamps packets on arrival only while some socket on the host asks for stamps,
/// and it turns that on lazily (a deferred switch) when the first one asks: until then, and
/// again after the last such socket closed, a packet is stamped when it is read, which would
/// hide the time it waited. So the first call also opens one socket that asks for as long as
/// the process runs, and the first packets of a call after a quiet spell are stamped too. The
/// price: from then on the host reads the clock once per received packet (tens of ns, also on
/// the kernel forwarding path).
pub(crate) fn enable(fd: RawFd) -> std::io::Result<()> {
    static KEEPER: std::sync::OnceLock<Option<std::net::UdpSocket>> = std::sync::OnceLock::new();
    KEEPER.get_or_init(|| {
        use std::os::fd::AsRawFd as _;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
        set_timestamps(socket.as_raw_fd()).ok()?;
        Some(socket)
    });
    set_timestamps(fd)
}

/// One reading of the wall clock and the monotonic clock, to turn kernel timestamps of the
/// same moment into [`Instant`]s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clocks {
    realtime_ns: i128,
    now: Instant,
}

impl Clocks {
    pub(crate) fn read() -> Clocks {
        Clocks { realtime_ns: nanos(&sys::realtime_now()), now: Instant::now() }
    }

    /// The instant of a kernel timestamp. A stamp from the future (the wall clock was stepped
    /// back in between) counts as now; one from before the monotonic clock's start as that.
    pub(crate) fn instant(&self, stamp: &Stamp) -> Instant {
        let ago = (self.realtime_ns - nanos(stamp)).clamp(0, u64::MAX as i128) as u64;
        self.now.checked_sub(Duration::from_nanos(ago)).unwrap_or(self.now)
    }
}

fn nanos(ts: &Stamp) -> i128 {
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    /// A datagram received with `recvmsg` carries a stamp from when it arrived, not from when
    /// it was read. The kernel switches stamping on arrival on a moment after the first socket
    /// asks for it, so a few tries are allowed for that.
    #[test]
    fn datagrams_are_stamped_when_they_arrive() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable(receiver.as_raw_fd()).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ages = vec![];
        for _ in 0..20 {
            let sent = Instant::now();
            sender.send_to(b"hello", receiver.local_addr().unwrap()).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            let (n, stamp) = receive(&receiver);
            assert_eq!(n, 5);
            let arrived = Clocks::read().instant(&stamp.expect("a receive timestamp"));
            assert!(arrived >= sent.checked_sub(Duration::from_millis(5)).unwrap(), "stamped before it was sent");
            ages.push(arrived.elapsed());
            if arrived.elapsed() >= Duration::from_millis(25) {
                return;
            }
        }
        panic!("every datagram was stamped when read, not when it arrived: {ages:?}");
    }

    fn receive(socket: &std::net::UdpSocket) -> (usize, Option<Stamp>) {
        let mut data = [0u8; 16];
        sys::recv_stamped(socket.as_raw_fd(), &mut data).unwrap()
    }

    #[test]
    fn a_stamp_from_the_future_counts_as_now() {
        let clocks = Clocks::read();
        let future = Stamp { tv_sec: (clocks.realtime_ns / 1_000_000_000) as i64 + 10, tv_nsec: 0 };
        assert_eq!(clocks.instant(&future), clocks.now);
        let past = Stamp { tv_sec: (clocks.realtime_ns / 1_000_000_000) as i64 - 1, tv_nsec: 0 };
        assert!(clocks.instant(&past) < clocks.now);
    }
}
