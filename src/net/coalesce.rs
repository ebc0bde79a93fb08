//! Write coalescing for the server's connections: one socket write per
//! burst of small responses instead of one per response.
//!
//! hyper runs each HTTP/2 stream as its own task and the connection as
//! another. When one change wakes many streams of a connection, each stream
//! hands its frame to h2, which wakes the connection task; tokio runs a task
//! woken that way next (its LIFO slot), so the connection task flushes after
//! every stream: one `writev`, one TCP segment and one wake of the peer per
//! frame (5,000 a second in the snapshot storm's steady state). [`Coalesce`]
//! keeps small writes (less than [`COALESCE_BELOW`] in all) and, at h2's
//! flush, waits until the runtime has run the other ready tasks (the
//! deferral of [`tokio::task::yield_now`]: until the worker's queue is empty
//! or its periodic driver poll, never a timer), then sends them at once.
//! Larger writes go to the socket as they come.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Writes are kept only while less than this is kept in all: small frames
/// (live changes, progress marks) are coalesced; a write that would reach
/// it first sends what is kept, then goes straight to the socket, as
/// without coalescing (a bulk transfer such as a snapshot is not held back,
/// and a connection keeps less than this unsent).
pub(crate) const COALESCE_BELOW: usize = 4 << 10;

/// An IO whose writes are kept until a flush, and whose flush first lets the
/// runtime run its other ready tasks (so that they can add theirs).
pub(crate) struct Coalesce<T> {
    inner: T,
    /// Bytes written to `self` and not yet to `inner`, from `pos` on.
    buf: Vec<u8>,
    pos: usize,
    /// The deferral a pending flush waits for.
    gate: Option<Arc<Gate>>,
    /// Off: every write goes straight to `inner`.
    on: bool,
}

/// Opens once the runtime wakes the deferred waker it was handed.
struct Gate {
    open: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<T> Coalesce<T> {
    pub(crate) fn new(inner: T, on: bool) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            gate: None,
            on,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes everything kept to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.buf.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Ready once the runtime has run the tasks that were ready when the
    /// flush began (at once outside a runtime).
    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let gate = self.gate.get_or_insert_with(|| {
            let gate = Arc::new(Gate {
                open: AtomicBool::new(false),
                task: AtomicWaker::new(),
            });
            gate.task.register(cx.waker());
            let waker = Waker::from(gate.clone());
            // The first poll hands `waker` to the scheduler's deferred list
            // (or wakes it at once outside a runtime) and is `Pending`.
            let mut yielded = std::pin::pin!(tokio::task::yield_now());
            let _ = yielded.as_mut().poll(&mut Context::from_waker(&waker));
            gate
        });
        gate.task.register(cx.waker());
        if gate.open.load(Ordering::Acquire) {
            self.gate = None;
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if !me.on || me.buffered() + data.len() >= COALESCE_BELOW {
            ready!(me.poll_drain(cx))?;
            return Pin::new(&mut me.inner).poll_write(cx, data);
        }
        me.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !me.on || me.buffered() + len >= COALESCE_BELOW {
            ready!(me.poll_drain(cx))?;
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            me.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.buffered() > 0 {
            ready!(me.poll_gate(cx));
            ready!(me.poll_drain(cx))?;
        }
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Coalesce<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct Counting {
        writes: usize,
        data: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.data.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_before_a_flush_reach_the_socket_as_one() {
        let mut io = Coalesce::new(Counting::default(), true);
        // 100 small frames, less than COALESCE_BELOW in all.
        for i in 0..100u8 {
            io.write_all(&[i; 10]).await.unwrap();
        }
        const { assert!(1000 < COALESCE_BELOW) };
        assert_eq!(io.inner.writes, 0, "nothing written before the flush");
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, 1);
        let want: Vec<u8> = (0..100u8).flat_map(|i| [i; 10]).collect();
        assert_eq!(io.inner.data, want);
        // Nothing kept: a second flush writes nothing.
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_large_write_goes_straight_through_in_order() {
        let mut io = Coalesce::new(Counting::default(), true);
        io.write_all(b"head").await.unwrap();
        let big = vec![7u8; COALESCE_BELOW + 1];
        io.write_all(&big).await.unwrap();
        // The kept bytes went first, then the large write itself.
        assert_eq!(io.inner.writes, 2);
        io.flush().await.unwrap();
        assert_eq!(&io.inner.data[..4], b"head");
        assert_eq!(io.inner.data.len(), 4 + big.len());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_flush_waits_for_the_other_ready_tasks() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut io = Coalesce::new(a, true);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let o = order.clone();
        let other = tokio::spawn(async move { o.lock().unwrap().push("other task") });
        io.write_all(b"x").await.unwrap();
        io.flush().await.unwrap();
        order.lock().unwrap().push("flushed");
        other.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["other task", "flushed"]);
        let mut got = [0u8; 1];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_bulk_flush_does_not_wait_for_other_tasks() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut io = Coalesce::new(a, true);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let o = order.clone();
        let other = tokio::spawn(async move { o.lock().unwrap().push("other task") });
        io.write_all(&vec![1u8; COALESCE_BELOW]).await.unwrap();
        io.flush().await.unwrap();
        order.lock().unwrap().push("flushed");
        other.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["flushed", "other task"]);
        let mut got = vec![0u8; COALESCE_BELOW];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&x| x == 1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn off_every_write_goes_through() {
        let mut io = Coalesce::new(Counting::default(), false);
        io.write_all(b"a").await.unwrap();
        io.write_all(b"b").await.unwrap();
        assert_eq!(io.inner.writes, 2);
        assert_eq!(io.inner.data, b"ab");
    }

    #[test]
    fn outside_a_runtime_a_flush_does_not_wait() {
        let mut io = Coalesce::new(Counting::default(), true);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"abc"),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.inner.data, b"abc");
    }
}
