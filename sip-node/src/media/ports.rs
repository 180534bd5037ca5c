//! RTP port allocation: each leg of an anchored call gets a pair of UDP ports from the
//! configured range, RTP on the even port and RTCP on the next, odd one (RFC 3550 §11).
//!
//! Why a guard: a call can end on many paths (answer, failure, timeout, cancel, a panic in its
//! task); [`PortPair`] gives the pair back when it is dropped, so no path can leak a port. The
//! allocator walks the range round-robin, so a pair freed a moment ago is the last to be reused
//! (late packets of the old call do not land in a new one), and skips ports that some other
//! process holds (the bind fails) instead of failing the call.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

/// The default first port of the range.
pub const DEFAULT_MIN_PORT: u16 = 10000;
/// The default last port of the range.
pub const DEFAULT_MAX_PORT: u16 = 20000;

/// Why no port pair could be had.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The range holds no even/odd pair (or is reversed).
    #[error("the RTP port range {min}-{max} holds no even/odd port pair")]
    EmptyRange {
        /// First port.
        min: u16,
        /// Last port.
        max: u16,
    },
    /// Every pair is in use by calls or by other processes.
    #[error("no free RTP port pair in {min}-{max} ({in_use} pairs held by calls)")]
    Exhausted {
        /// First port.
        min: u16,
        /// Last port.
        max: u16,
        /// Pairs held by this allocator.
        in_use: usize,
    },
    /// Binding failed for a reason that trying other ports cannot fix (the address is not
    /// local, permission denied).
    #[error("cannot bind RTP sockets on {address}: {source}")]
    Bind {
        /// The address.
        address: IpAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The inclusive range of ports RTP and RTCP may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The first port (rounded up to even for RTP).
    pub min: u16,
    /// The last port (an RTCP port may be this one, never beyond).
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange { min: DEFAULT_MIN_PORT, max: DEFAULT_MAX_PORT }
    }
}

impl PortRange {
    /// The even RTP ports of the range whose RTCP port is also in it.
    fn rtp_ports(&self) -> Option<(u16, u16)> {
        let first = self.min.checked_add(self.min % 2)?;
        let last_rtcp = if self.max % 2 == 1 { self.max } else { self.max.checked_sub(1)? };
        let last = last_rtcp.checked_sub(1)?;
        (first >= 2 && first <= last).then_some((first, last))
    }

    /// How many pairs the range holds.
    pub fn pairs(&self) -> usize {
        self.rtp_ports().map_or(0, |(first, last)| ((last - first) / 2 + 1) as usize)
    }
}

struct State {
    in_use: HashSet<u16>,
    /// The RTP port the next search starts at.
    next: u16,
}

struct Inner {
    address: IpAddr,
    range: PortRange,
    first: u16,
    last: u16,
    state: Mutex<State>,
}

/// Hands out RTP/RTCP port pairs from one range on one local address. Cheap to clone (shared).
#[derive(Clone)]
pub struct PortAllocator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PortAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortAllocator")
            .field("address", &self.inner.address)
            .field("range", &self.inner.range)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl PortAllocator {
    /// An allocator binding on `address` (the node's media address, or `0.0.0.0`/`::` for all)
    /// over `range`.
    pub fn new(address: IpAddr, range: PortRange) -> Result<PortAllocator, PortError> {
        let (first, last) = range.rtp_ports().ok_or(PortError::EmptyRange { min: range.min, max: range.max })?;
        Ok(PortAllocator {
            inner: Arc::new(Inner {
                address,
                range,
                first,
                last,
                state: Mutex::new(State { in_use: HashSet::new(), next: first }),
            }),
        })
    }

    /// An allocator over the default range on all IPv4 addresses.
    pub fn with_defaults() -> Result<PortAllocator, PortError> {
        PortAllocator::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PortRange::default())
    }

    /// The local address sockets are bound to.
    pub fn address(&self) -> IpAddr {
        self.inner.address
    }

    /// The range.
    pub fn range(&self) -> PortRange {
        self.inner.range
    }

    /// How many pairs are held now (for metrics and leak tests).
    pub fn in_use(&self) -> usize {
        self.lock().in_use.len()
    }

    /// How many pairs the range holds.
    pub fn capacity(&self) -> usize {
        self.inner.range.pairs()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the set is still valid.
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves a pair and binds both sockets (non-blocking, ready for tokio). Ports that fail to
    /// bind because something else holds them are skipped; an exhausted range is an error.
    pub fn allocate(&self) -> Result<PortPair, PortError> {
        let inner = &self.inner;
        let pairs = self.capacity();
        let mut state = self.lock();
        let mut port = state.next;
        for _ in 0..pairs {
            let candidate = port;
            port = if candidate >= inner.last { inner.first } else { candidate + 2 };
            if state.in_use.contains(&candidate) {
                continue;
            }
            match bind_pair(inner.address, candidate) {
                Ok((rtp, rtcp)) => {
                    state.in_use.insert(candidate);
                    state.next = port;
                    return Ok(PortPair {
                        rtp_port: candidate,
                        sockets: Some((rtp, rtcp)),
                        allocator: Arc::clone(&self.inner),
                    });
                }
                Err(error) if skippable(&error) => continue,
                Err(source) => return Err(PortError::Bind { address: inner.address, source }),
            }
        }
        Err(PortError::Exhausted { min: inner.range.min, max: inner.range.max, in_use: state.in_use.len() })
    }
}

fn skippable(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied)
}

fn bind_pair(address: IpAddr, rtp_port: u16) -> io::Result<(UdpSocket, UdpSocket)> {
    let rtp = UdpSocket::bind(SocketAddr::new(address, rtp_port))?;
    let rtcp = UdpSocket::bind(SocketAddr::new(address, rtp_port + 1))?;
    rtp.set_nonblocking(true)?;
    rtcp.set_nonblocking(true)?;
    Ok((rtp, rtcp))
}

/// A reserved RTP/RTCP port pair with its bound sockets. Dropping it releases the reservation
/// (after the sockets, if still held here, are closed).
pub struct PortPair {
    rtp_port: u16,
    sockets: Option<(UdpSocket, UdpSocket)>,
    allocator: Arc<Inner>,
}

impl std::fmt::Debug for PortPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortPair").field("rtp_port", &self.rtp_port).finish()
    }
}

impl PortPair {
    /// The even RTP port (what goes into the SDP m= line).
    pub fn rtp_port(&self) -> u16 {
        self.rtp_port
    }

    /// The odd RTCP port.
    pub fn rtcp_port(&self) -> u16 {
        self.rtp_port + 1
    }

    /// The local address the sockets are bound to.
    pub fn address(&self) -> IpAddr {
        self.allocator.address
    }

    /// Takes the bound (non-blocking) RTP and RTCP sockets, once; the reservation stays until
    /// the pair is dropped, so keep the pair alive as long as the sockets.
    pub fn take_sockets(&mut self) -> Option<(UdpSocket, UdpSocket)> {
        self.sockets.take()
    }

    /// Reads and drops the datagrams queued on the sockets (still here): what a caller on hold
    /// sent while nothing read its port must not reach whoever it is joined with next.
    /// Returns how many were dropped.
    pub(crate) fn discard_queued(&self) -> usize {
        let Some((rtp, rtcp)) = &self.sockets else { return 0 };
        let mut buf = [0u8; 2048];
        let mut dropped = 0;
        for socket in [rtp, rtcp] {
            // Non-blocking sockets: stops at WouldBlock (or any error); bounded in case a
            // flood keeps the queue full.
            while dropped < 100_000 && socket.recv_from(&mut buf).is_ok() {
                dropped += 1;
            }
        }
        dropped
    }

    /// Puts the sockets taken by [`PortPair::take_sockets`] back, so that another relay can
    /// take them over (a transferred call keeps the port the caller's SDP names).
    pub(crate) fn restore_sockets(&mut self, rtp: UdpSocket, rtcp: UdpSocket) {
        self.sockets = Some((rtp, rtcp));
    }
}

impl Drop for PortPair {
    fn drop(&mut self) {
        self.sockets = None;
        let mut state = self.allocator.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.in_use.remove(&self.rtp_port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn localhost() -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }

    /// A small range, away from the default one, chosen per test so parallel tests do not meet.
    fn range(base: u16, pairs: u16) -> PortRange {
        PortRange { min: base, max: base + pairs * 2 - 1 }
    }

    #[test]
    fn range_arithmetic() {
        assert_eq!(PortRange::default().pairs(), 5000);
        assert_eq!(PortRange { min: 10001, max: 10004 }.pairs(), 1); // 10002/10003
        assert_eq!(PortRange { min: 10000, max: 10001 }.pairs(), 1);
        assert_eq!(PortRange { min: 10000, max: 10000 }.pairs(), 0);
        assert_eq!(PortRange { min: 20000, max: 10000 }.pairs(), 0);
        assert_eq!(PortRange { min: 65534, max: 65535 }.pairs(), 1);
        assert_eq!(PortRange { min: 65535, max: 65535 }.pairs(), 0);
        assert_eq!(PortRange { min: 0, max: 1 }.pairs(), 0);
        assert!(matches!(
            PortAllocator::new(localhost(), PortRange { min: 5, max: 5 }),
            Err(PortError::EmptyRange { .. })
        ));
    }

    #[test]
    fn pairs_are_even_odd_and_released_on_drop() {
        let allocator = PortAllocator::new(localhost(), range(41000, 4)).unwrap();
        let mut a = allocator.allocate().unwrap();
        let b = allocator.allocate().unwrap();
        assert_eq!(a.rtp_port() % 2, 0);
        assert_eq!(a.rtcp_port(), a.rtp_port() + 1);
        assert_ne!(a.rtp_port(), b.rtp_port());
        let (rtp, rtcp) = a.take_sockets().unwrap();
        assert_eq!(rtp.local_addr().unwrap().port(), a.rtp_port());
        assert_eq!(rtcp.local_addr().unwrap().port(), a.rtcp_port());
        assert!(a.take_sockets().is_none());
        assert_eq!(allocator.in_use(), 2);
        drop(rtp);
        drop(rtcp);
        drop(a);
        drop(b);
        assert_eq!(allocator.in_use(), 0);
    }

    #[test]
    fn exhaustion_is_an_error_and_recovers() {
        let allocator = PortAllocator::new(localhost(), range(41100, 2)).unwrap();
        let a = allocator.allocate().unwrap();
        let b = allocator.allocate().unwrap();
        let err = allocator.allocate().unwrap_err();
        assert!(matches!(err, PortError::Exhausted { in_use: 2, .. }), "{err}");
        drop(a);
        let c = allocator.allocate().unwrap();
        assert_ne!(c.rtp_port(), b.rtp_port());
    }

    #[test]
    fn skips_ports_held_by_others() {
        let base = 41200;
        let squatter = UdpSocket::bind((localhost(), base + 1)).unwrap(); // the first RTCP port
        let allocator = PortAllocator::new(localhost(), range(base, 3)).unwrap();
        let pair = allocator.allocate().unwrap();
        assert_eq!(pair.rtp_port(), base + 2);
        drop(squatter);
    }

    #[test]
    fn round_robin_does_not_reuse_a_pair_just_freed() {
        let allocator = PortAllocator::new(localhost(), range(41300, 3)).unwrap();
        let first = allocator.allocate().unwrap().rtp_port(); // dropped at once
        let second = allocator.allocate().unwrap().rtp_port();
        assert_ne!(first, second);
        let third = allocator.allocate().unwrap().rtp_port();
        let fourth = allocator.allocate().unwrap().rtp_port(); // wraps
        assert_ne!(third, second);
        assert_eq!(fourth, first);
    }

    #[test]
    fn ipv6_when_available() {
        let Ok(allocator) = PortAllocator::new("::1".parse().unwrap(), range(41400, 2)) else { return };
        match allocator.allocate() {
            Ok(pair) => assert!(pair.address().is_ipv6()),
            // Hosts without IPv6 on loopback: the error names the address, and nothing leaks.
            Err(PortError::Bind { .. }) | Err(PortError::Exhausted { .. }) => assert_eq!(allocator.in_use(), 0),
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn a_foreign_address_is_a_bind_error() {
        let allocator = PortAllocator::new("192.0.2.200".parse().unwrap(), range(41500, 2)).unwrap();
        assert!(matches!(allocator.allocate(), Err(PortError::Bind { .. })));
        assert_eq!(allocator.in_use(), 0);
    }
}
