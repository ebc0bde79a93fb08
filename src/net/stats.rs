//! The subscribe server's figures: streams open, opened and ended by
//! reason, and what was sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Figures of a subscribe server, from [`Server::stats`](super::Server::stats),
/// [`SubscribeService::stats`](super::SubscribeService::stats) or a
/// [`ServerStatsHandle`](super::ServerStatsHandle). The counters count
/// since the service was built.
///
/// # Examples
///
/// ```
/// use snapstream::net::{BinaryCodec, Server};
/// use snapstream::publisher::Publisher;
///
/// let service = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).service();
/// let stats = service.stats();
/// assert_eq!(stats.open_streams, 0);
/// assert_eq!(stats.streams_opened, 0);
/// assert_eq!(stats.streams_ended.total(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ServerStats {
    /// Subscribe streams open now.
    pub open_streams: usize,
    /// Subscribe streams opened (accepted and subscribed; refused calls are
    /// not counted).
    pub streams_opened: u64,
    /// Opened streams that ended, by reason.
    pub streams_ended: StreamsEnded,
    /// `Multiplex` calls accepted (each carries any number of the streams
    /// counted above: see [`ClientBuilder::multiplex`](super::ClientBuilder::multiplex)).
    pub multiplexed_calls: u64,
    /// Response messages sent (each packs one or more frames); on a
    /// `Multiplex` call, each subscription's item counts as one.
    pub messages_sent: u64,
    /// Bytes of the response messages sent, protobuf-encoded (before gRPC
    /// framing, compression and HTTP/2).
    pub bytes_sent: u64,
    /// Progress marks sent to quiet streams.
    pub progress_marks_sent: u64,
    /// Connections closed after carrying no stream for the
    /// [idle timeout](super::ServerBuilder::idle_timeout).
    pub connections_closed_idle: u64,
}

/// Streams ended, by reason. See [`ServerStats`].
///
/// # Examples
///
/// ```
/// let ended = snapstream::net::StreamsEnded::default();
/// assert_eq!(ended.total(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StreamsEnded {
    /// The client went away (cancelled the call, closed the connection or
    /// stopped answering keepalives) before the server ended the stream.
    pub client_gone: u64,
    /// Ended with `ABORTED`: the subscription was force-closed.
    pub force_closed: u64,
    /// Ended with `UNAVAILABLE`: the server or the publisher shut down.
    pub shutdown: u64,
    /// Ended with `RESOURCE_EXHAUSTED`: the subscriber lagged.
    pub lagged: u64,
    /// Ended with another status: a failed snapshot or payload codec.
    pub error: u64,
}

impl StreamsEnded {
    /// Streams ended for any reason.
    ///
    /// # Examples
    ///
    /// See [`StreamsEnded`].
    pub fn total(&self) -> u64 {
        self.client_gone + self.force_closed + self.shutdown + self.lagged + self.error
    }
}

/// Why a stream ended (an index into [`Counters::ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    ClientGone = 0,
    ForceClosed = 1,
    Shutdown = 2,
    Lagged = 3,
    Error = 4,
}

/// The counters behind [`ServerStats`]: relaxed atomics, touched once per
/// stream opened or ended and once per response message — never per event.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    opened: AtomicU64,
    mux: AtomicU64,
    ended: [AtomicU64; 5],
    messages: AtomicU64,
    bytes: AtomicU64,
    progress: AtomicU64,
    /// Shared with every connection's idle timer.
    idle_closed: Arc<AtomicU64>,
}

impl Counters {
    /// The counter of connections closed for idleness.
    pub(crate) fn idle_closed(&self) -> Arc<AtomicU64> {
        self.idle_closed.clone()
    }

    pub(crate) fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn multiplexed(&self) {
        self.mux.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, reason: EndReason) {
        self.ended[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, bytes: usize) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn progress(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read(&self, open_streams: usize) -> ServerStats {
        let e = |r: EndReason| self.ended[r as usize].load(Ordering::Relaxed);
        ServerStats {
            open_streams,
            streams_opened: self.opened.load(Ordering::Relaxed),
            streams_ended: StreamsEnded {
                client_gone: e(EndReason::ClientGone),
                force_closed: e(EndReason::ForceClosed),
                shutdown: e(EndReason::Shutdown),
                lagged: e(EndReason::Lagged),
                error: e(EndReason::Error),
            },
            multiplexed_calls: self.mux.load(Ordering::Relaxed),
            messages_sent: self.messages.load(Ordering::Relaxed),
            bytes_sent: self.bytes.load(Ordering::Relaxed),
            progress_marks_sent: self.progress.load(Ordering::Relaxed),
            connections_closed_idle: self.idle_closed.load(Ordering::Relaxed),
        }
    }
}
