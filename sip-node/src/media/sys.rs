//! Everything the media code asks of the operating system directly: every libc call and every
//! other `unsafe` operation of `media/` and `bridge/`, each behind a safe function whose
//! `// SAFETY:` note says why it holds. The rest of the media code is safe Rust, so whoever
//! checks the FFI has this one file to read.
//!
//! - `recvmmsg` for the caller's leg of a bridged call: up to [`RECV_BATCH`] datagrams per
//!   syscall, each with its source address and the kernel's receive timestamp ([`recv_batch`]);
//! - `recvmsg` for the agent's TCP stream, with the receive timestamp ([`recv_stamped`]);
//! - `setsockopt(SO_TIMESTAMPNS)`, which asks for those stamps ([`set_timestamps`]), and the
//!   control-message walk that reads them back;
//! - `clock_gettime` of the wall clock (the clock of the stamps) and of the monotonic clock
//!   (the clock of the eBPF program's `bpf_ktime_get_ns`);
//! - registering a socket with tokio's reactor by hand, which tokio marks `unsafe` because the
//!   reactor keys its state by descriptor number ([`register_udp_readable`], [`register_tcp`]).
//!
//! Linux only, as the rest of the media path (epoll, eBPF).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Receive buffer per datagram: larger than any RTP packet on an Ethernet path.
pub(crate) const DATAGRAM_MAX: usize = 4096;

/// Datagrams one `recvmmsg` asks for.
pub(crate) const RECV_BATCH: usize = 8;

/// `SO_TIMESTAMPNS` (the "old" value, whose control message carries a native `timespec`), as
/// asm-generic defines it for x86, ARM and RISC-V; the `libc` crate leaves it out on Linux.
const SO_TIMESTAMPNS: libc::c_int = 35;

/// Room for one `SCM_TIMESTAMPNS` control message (plus slack for alignment).
const CONTROL_SPACE: usize = 64;

/// A control buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct ControlBuffer([u8; CONTROL_SPACE]);

impl ControlBuffer {
    const fn new() -> ControlBuffer {
        ControlBuffer([0; CONTROL_SPACE])
    }
}

/// A kernel receive timestamp: `CLOCK_REALTIME` when the datagram or segment reached the host.
pub(crate) type Stamp = libc::timespec;

/// Registers a UDP socket with tokio's reactor for reads only (a `tokio::net::UdpSocket`
/// registers for writability too, and Linux then reports every datagram sent as an event).
/// Must run inside a tokio runtime.
pub(crate) fn register_udp_readable(socket: UdpSocket) -> io::Result<AsyncFd<UdpSocket>> {
    // SAFETY: tokio requires the descriptor to stay open and name the same socket for as long
    // as it is registered. The `AsyncFd` takes the socket by value and owns it, so nothing else
    // can close it; it is closed only when the `AsyncFd` drops (after deregistering).
    // `std::net::UdpSocket::as_raw_fd` always returns the descriptor it was built with, and no
    // code of the node swaps the socket through `AsyncFd::get_mut`.
    Ok(unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?)
}

/// Registers a TCP stream with tokio's reactor for reads and writes. Must run inside a tokio
/// runtime.
pub(crate) fn register_tcp(stream: TcpStream) -> io::Result<AsyncFd<TcpStream>> {
    // SAFETY: as in `register_udp_readable`: the `AsyncFd` owns the stream, whose descriptor
    // therefore stays open and the same until the `AsyncFd` drops; nothing swaps it.
    Ok(unsafe { AsyncFd::register(stream) }?)
}

/// Asks the kernel to stamp what the socket `fd` receives (`SO_TIMESTAMPNS`).
pub(crate) fn set_timestamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `optlen` bytes at `optval`: a live `c_int` on this stack frame,
    // and `optlen` is its size. An invalid `fd` only makes the call fail (EBADF/ENOTSOCK).
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The receive timestamp among a received message's control messages, if any.
///
/// # Safety
/// `header` must be a `msghdr` filled in by a successful `recvmsg`/`recvmmsg`, whose
/// `msg_control` still points at the live buffer of `msg_controllen` bytes given to that call.
unsafe fn timestamp(header: &libc::msghdr) -> Option<Stamp> {
    if header.msg_control.is_null() || header.msg_controllen == 0 {
        return None;
    }
    // SAFETY: the caller vouches that the control buffer is live and as long as
    // `msg_controllen` says, and the kernel wrote well-formed control messages into it.
    // CMSG_FIRSTHDR and CMSG_NXTHDR return either null or a header that lies within those
    // `msg_controllen` bytes, so each `&*cmsg` reads initialised memory inside the buffer. The
    // data is read only when `cmsg_len` covers a whole `timespec`, and unaligned (the buffer
    // is aligned for `cmsghdr`, not necessarily for what follows it).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_SOCKET
                && c.cmsg_type == SO_TIMESTAMPNS
                && c.cmsg_len as usize >= libc::CMSG_LEN(std::mem::size_of::<libc::timespec>() as u32) as usize
            {
                return Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>()));
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    None
}

/// One `recvmsg(MSG_DONTWAIT)` into `buf`: the bytes read and the kernel's stamp, if any.
pub(crate) fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<Stamp>)> {
    let mut control = ControlBuffer::new();
    let mut iov = [io::IoSliceMut::new(buf)];
    // SAFETY: `msghdr` is a plain C struct of integers and pointers, for which all-zero is a
    // valid value (null pointers, zero lengths).
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSliceMut` is ABI-compatible with `iovec` on Unix (std guarantees it).
    header.msg_iov = iov.as_mut_ptr().cast();
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = CONTROL_SPACE as _;
    // SAFETY: the header points at `iov` (one entry describing `buf`, which we borrow mutably
    // for the whole call) and at `control` (CONTROL_SPACE bytes), all alive until this
    // function returns; the kernel writes at most the lengths given. An invalid `fd` only
    // makes the call fail.
    let n = unsafe { libc::recvmsg(fd, &mut header, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `header` was filled in by the successful recvmsg above and its control pointer
    // still points at `control`, which is alive.
    Ok((n as usize, unsafe { timestamp(&header) }))
}

/// Receive buffers for [`recv_batch`]: one datagram each, with what the kernel said about it.
pub(crate) struct Datagrams {
    /// The datagrams; `data[i][..len[i]]` is the i-th.
    pub(crate) data: [[u8; DATAGRAM_MAX]; RECV_BATCH],
    pub(crate) len: [usize; RECV_BATCH],
    /// Where each came from (`None`: an address family the node does not speak).
    pub(crate) source: [Option<SocketAddr>; RECV_BATCH],
    /// When each reached the host (on a socket with [`set_timestamps`]), or `None`.
    pub(crate) stamp: [Option<Stamp>; RECV_BATCH],
    control: [ControlBuffer; RECV_BATCH],
}

impl Datagrams {
    pub(crate) const fn new() -> Datagrams {
        Datagrams {
            data: [[0; DATAGRAM_MAX]; RECV_BATCH],
            len: [0; RECV_BATCH],
            source: [None; RECV_BATCH],
            stamp: [None; RECV_BATCH],
            control: [ControlBuffer::new(); RECV_BATCH],
        }
    }
}

/// One `recvmmsg(MSG_DONTWAIT)` of up to [`RECV_BATCH`] datagrams into `into`; returns how many
/// came.
pub(crate) fn recv_batch(socket: &UdpSocket, into: &mut Datagrams) -> io::Result<usize> {
    // SAFETY: these are plain C structs of integers and pointers, for which all-zero is a valid
    // value (null pointers, zero lengths).
    let mut names: [libc::sockaddr_storage; RECV_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovecs: [libc::iovec; RECV_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut headers: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..RECV_BATCH {
        iovecs[i] = libc::iovec { iov_base: into.data[i].as_mut_ptr().cast(), iov_len: DATAGRAM_MAX };
        headers[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        headers[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        headers[i].msg_hdr.msg_iov = &mut iovecs[i];
        headers[i].msg_hdr.msg_iovlen = 1;
        headers[i].msg_hdr.msg_control = into.control[i].0.as_mut_ptr().cast();
        headers[i].msg_hdr.msg_controllen = CONTROL_SPACE as _;
    }
    // SAFETY: `headers` holds RECV_BATCH entries (the count passed), each pointing at a name
    // buffer of the size in `msg_namelen`, one iovec over a DATAGRAM_MAX-byte buffer of `into`,
    // and a CONTROL_SPACE-byte control buffer of `into`; all are borrowed (mutably) until this
    // function returns and the kernel writes within the sizes given. The timeout is null
    // (none). The socket is borrowed, so its descriptor is open for the call.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            RECV_BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        into.len[i] = (headers[i].msg_len as usize).min(DATAGRAM_MAX);
        into.source[i] = socket_addr(&names[i]);
        // SAFETY: the i-th header (i < n) was filled in by the successful recvmmsg above, and
        // its control pointer still points at `into.control[i]`, which is alive.
        into.stamp[i] = unsafe { timestamp(&headers[i].msg_hdr) };
    }
    Ok(n)
}

/// The address in a `sockaddr_storage` the kernel filled in, if IPv4 or IPv6.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel set the family to AF_INET, so the storage holds a
            // `sockaddr_in`; `sockaddr_storage` is larger than it and at least as aligned, and
            // every bit pattern of its integer fields is valid.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above: AF_INET6 means a `sockaddr_in6`, which `sockaddr_storage` is
            // large and aligned enough for.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

/// `CLOCK_REALTIME` now (the clock of the kernel's receive timestamps).
pub(crate) fn realtime_now() -> Stamp {
    clock(libc::CLOCK_REALTIME)
}

/// `CLOCK_MONOTONIC` now in nanoseconds (the clock of `bpf_ktime_get_ns` and of `Instant`).
pub(crate) fn monotonic_ns() -> u64 {
    let now = clock(libc::CLOCK_MONOTONIC);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn clock(id: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one `timespec` through the pointer, which points at a live
    // one on this stack frame. Both clock ids it is called with exist on every Linux, so it
    // cannot fail (and if it did, `ts` would stay zero: no undefined behaviour).
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_of_both_families_are_read_back() {
        let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        v4.send_to(b"one", receiver.local_addr().unwrap()).unwrap();
        v4.send_to(b"two", receiver.local_addr().unwrap()).unwrap();
        let mut batch = Box::new(Datagrams::new());
        let n = recv_batch(&receiver, &mut batch).unwrap();
        assert_eq!(n, 2, "both queued datagrams in one call");
        assert_eq!(&batch.data[0][..batch.len[0]], b"one");
        assert_eq!(&batch.data[1][..batch.len[1]], b"two");
        assert_eq!(batch.source[0], Some(v4.local_addr().unwrap()));
        assert_eq!(
            recv_batch(&receiver, &mut batch).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "MSG_DONTWAIT: an empty socket does not block"
        );
        if let (Ok(v6), Ok(receiver)) = (UdpSocket::bind("[::1]:0"), UdpSocket::bind("[::1]:0")) {
            v6.send_to(b"six", receiver.local_addr().unwrap()).unwrap();
            assert_eq!(recv_batch(&receiver, &mut batch).unwrap(), 1);
            assert_eq!(batch.source[0], Some(v6.local_addr().unwrap()));
        }
    }
}
