//! The agent's TCP connection, read with `recvmsg` so that each read brings the kernel's
//! receive timestamp along: the bridge measures an agent frame's delay from when it reached
//! the host, not from when the node got to it.

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::media::rx_time::{self, Clocks};
use crate::media::sys;

/// A TCP stream that remembers when the data of its last read arrived. Registered with tokio
/// directly (`AsyncFd`), so that, as tokio's own `TcpStream` does, a read that did not fill the
/// buffer clears the readiness: the next read waits for epoll instead of paying for a
/// `recvmsg` that only says `EAGAIN` (one per agent message otherwise).
#[derive(Debug)]
pub(crate) struct StampedTcp {
    inner: AsyncFd<std::net::TcpStream>,
    /// When the last segment taken by the last read reached the host (`None` until a read
    /// came with a stamp).
    last_received: Option<Instant>,
}

impl StampedTcp {
    /// Wraps a connected stream and asks the kernel for receive timestamps (without them the
    /// stream works as usual, with no stamps).
    pub(crate) fn new(stream: TcpStream) -> std::io::Result<StampedTcp> {
        if let Err(error) = rx_time::enable(stream.as_raw_fd()) {
            tracing::debug!(%error, "no receive timestamps on the agent connection");
        }
        // Still non-blocking: tokio's stream is, and into_std keeps the mode.
        let stream = stream.into_std()?;
        let inner = sys::register_tcp(stream)?;
        Ok(StampedTcp { inner, last_received: None })
    }

    /// When the newest data read so far reached the host. A message just parsed ended in
    /// that read (or an earlier one), so this is its arrival or a little after it.
    pub(crate) fn last_received(&self) -> Option<Instant> {
        self.last_received
    }
}

impl AsyncRead for StampedTcp {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            let mut guard = ready!(this.inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            // try_io clears the readiness when the read would block, so the next poll waits.
            match guard.try_io(|s| sys::recv_stamped(s.as_raw_fd(), unfilled)) {
                Ok(Ok((n, stamp))) => {
                    if n > 0 && n < wanted {
                        guard.clear_ready();
                    }
                    if let Some(stamp) = stamp {
                        this.last_received = Some(Clocks::read().instant(&stamp));
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for StampedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.inner.poll_write_ready(cx))?;
            match guard.try_io(|s| s.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.inner.poll_write_ready(cx))?;
            match guard.try_io(|s| s.get_ref().write_vectored(bufs)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.inner.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Data read later than it arrived carries the stamp of its arrival; each read updates it.
    #[tokio::test]
    async fn reads_carry_the_arrival_time_of_their_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut stream = StampedTcp::new(client).unwrap();
        assert_eq!(stream.last_received(), None);

        // The kernel switches stamping on arrival on a moment after the first socket asks for
        // it: a few tries are allowed for that.
        let mut buf = [0u8; 16];
        let mut previous = None;
        let mut ages = vec![];
        for _ in 0..20 {
            server.write_all(b"data").await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            let n = stream.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"data");
            let stamp = stream.last_received().expect("a stamp");
            assert!(previous.is_none_or(|p| stamp > p), "each read brings its own stamp");
            previous = Some(stamp);
            ages.push(stamp.elapsed());
            if stamp.elapsed() >= Duration::from_millis(25) {
                break;
            }
        }
        assert!(ages.last().is_some_and(|age| *age >= Duration::from_millis(25)), "stamped when read: {ages:?}");

        stream.write_all(b"back").await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
        drop(server);
        assert_eq!(stream.read(&mut buf).await.unwrap(), 0, "end of stream");
    }
}
