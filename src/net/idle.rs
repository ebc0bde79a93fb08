//! Closing HTTP/2 connections that carry no stream for a while.
//!
//! hyper's HTTP/2 server has keepalive pings but no idle timeout: a client
//! that opened a connection and ended (or never opened) every stream holds
//! its socket, its buffers and its connection task forever. Every accepted
//! socket is wrapped in an [`IdleIo`] that shares a [`ConnActivity`] with the
//! streams opened on it (the handler finds it in the request's extensions,
//! as the connection's `ConnectInfo`). While the connection's stream count
//! is zero a timer runs; when it fires, the next read fails and hyper drops
//! the connection. Keepalive pings and their acknowledgements do not count
//! as activity: only open subscribe streams do.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What one connection's streams and its socket share.
#[derive(Debug, Default)]
pub(crate) struct ConnActivity {
    /// Subscribe streams open on the connection.
    streams: AtomicUsize,
    /// The connection task, woken when the last stream ends so that it arms
    /// its idle timer.
    waker: AtomicWaker,
}

impl ConnActivity {
    /// Counts a stream open until the guard drops.
    pub(crate) fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }
}

/// One open stream of a connection; dropping it ends the count.
#[derive(Debug)]
pub(crate) struct StreamGuard(Arc<ConnActivity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waker.wake();
        }
    }
}

/// The connection information of an accepted socket: its addresses and
/// its activity. Found in a request's extensions (inside tonic's
/// `TlsConnectInfo` when the server uses TLS).
#[derive(Debug, Clone)]
pub(crate) struct IdleInfo {
    pub(crate) tcp: TcpConnectInfo,
    pub(crate) activity: Arc<ConnActivity>,
}

/// An accepted socket that fails its next read once the connection has had
/// no stream for `timeout`.
pub(crate) struct IdleIo {
    io: TcpStream,
    info: IdleInfo,
    /// `None`: never closed for idleness.
    timeout: Option<Duration>,
    sleep: Pin<Box<Sleep>>,
    /// Whether `sleep` is set for the current stream-less period.
    armed: bool,
    /// The server's count of connections closed for idleness.
    closed: Arc<AtomicU64>,
}

impl IdleIo {
    pub(crate) fn new(io: TcpStream, timeout: Option<Duration>, closed: Arc<AtomicU64>) -> Self {
        let tcp = io.connect_info();
        IdleIo {
            io,
            info: IdleInfo {
                tcp,
                activity: Arc::default(),
            },
            timeout,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
            closed,
        }
    }

    /// `Ready` once the connection has been without a stream for `timeout`.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(timeout) = self.timeout else {
            return Poll::Pending;
        };
        let activity = &self.info.activity;
        activity.waker.register(cx.waker());
        if activity.streams.load(Ordering::Acquire) > 0 {
            self.armed = false;
            return Poll::Pending;
        }
        if !self.armed {
            self.armed = true;
            self.sleep.as_mut().reset(Instant::now() + timeout);
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl Connected for IdleIo {
    type ConnectInfo = IdleInfo;

    fn connect_info(&self) -> IdleInfo {
        self.info.clone()
    }
}

impl AsyncRead for IdleIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Bytes already sent by the client are read first: a request that
        // arrived as the timer fired is served, not cut off.
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => return ready,
        }
        match this.poll_idle(cx) {
            Poll::Ready(()) => {
                this.closed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    peer = ?this.info.tcp.remote_addr(),
                    timeout_ms = this.timeout.map_or(0, |t| t.as_millis() as u64),
                    "closing a connection idle with no stream"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle with no stream",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The activity of the connection a request came on, if it came through
/// [`IdleIo`] (not when the service is mounted on a server of the user's).
/// tonic puts the socket's own connection information on the request with
/// or without TLS.
pub(crate) fn activity_of<T>(request: &tonic::Request<T>) -> Option<Arc<ConnActivity>> {
    request
        .extensions()
        .get::<IdleInfo>()
        .map(|info| info.activity.clone())
}
