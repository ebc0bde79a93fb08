//! The gRPC subscribe service over a [`Publisher`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tonic::{Request, Status};

use super::catch_up::{CatchUp, NoWait};
use super::coalesce::Coalesce;
use super::error::{ServeError, LAG_LIMIT_METADATA};
use super::idle::{self, ConnActivity, IdleIo, StreamGuard};
use super::proto;
use super::stats::{Counters, EndReason, ServerStats};
use crate::codec::PayloadCodec;
use crate::event::{Event, EventBatch, Message, Subject, Topic};
use crate::publisher::{
    LagPolicy, Publisher, SubscribeError, SubscribeRequest, Subscription, SubscriptionError,
};
use crate::sync::Mutex;
use wire::{EncodedEvent, Response};

mod mux;
mod wire;

/// Default most concurrent streams on one HTTP/2 connection: 4,096 (a
/// client multiplexes all its subscriptions over one connection).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 4_096;

/// Default most concurrent subscribe streams on the whole server: 65,536.
/// A stream beyond it ends at once with `RESOURCE_EXHAUSTED`.
pub const DEFAULT_MAX_STREAMS: usize = 65_536;

/// Default largest response message: 1 MiB. Frames are packed into
/// messages up to this size and a larger batch is split across messages.
/// Keep it at or below the clients'
/// [`max_message_size`](super::ClientBuilder::max_message_size).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Default size a response message is filled to: 4 KiB. Events go into
/// one message until it would pass this size (an event larger than it, up
/// to [`DEFAULT_MAX_MESSAGE_SIZE`], goes alone), and a stream's next message
/// is encoded only once HTTP/2 lets the stream send: so a stream holds about
/// one such message on the server while its client reads slowly, however
/// large its snapshot. See [`ServerBuilder::message_fill`].
pub const DEFAULT_MESSAGE_FILL: usize = 4 << 10;

/// Default largest request message: 16 KiB (topic, key and token). A larger
/// request is rejected with `OUT_OF_RANGE` before it is decoded.
pub const DEFAULT_MAX_REQUEST_SIZE: usize = 16 << 10;

/// Default HTTP/2 keepalive ping interval: 30 s.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Default HTTP/2 keepalive timeout: 20 s. A connection whose peer does not
/// answer a ping within it is closed (and its streams with it): an idle,
/// dead peer holds nothing for longer than interval + timeout.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Default idle timeout of a connection: 5 minutes. A connection that has
/// carried no subscribe stream for that long is closed (a client reconnects
/// when it next subscribes); keepalive pings do not count as activity.
/// See [`ServerBuilder::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Default progress-mark interval: 10 s. A stream quiet for that long gets a
/// progress mark with its current index.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Decides whether a token may subscribe to (topic, subject). Called once
/// per `Subscribe` call, before the publisher is asked; a refusal ends the
/// call with `PERMISSION_DENIED`. To revoke a token afterwards, call
/// [`Publisher::force_close_token`]: its remote streams end with `ABORTED`.
///
/// Any `Fn(Option<&str>, &Topic, &Subject) -> bool` is an authorizer.
///
/// # Examples
///
/// ```
/// use snapstream::event::{Subject, Topic};
/// use snapstream::net::Authorizer;
///
/// let only_acl = |token: Option<&str>, _topic: &Topic, _subject: &Subject| token == Some("acl");
/// assert!(only_acl.authorize(Some("acl"), &Topic::new("t"), &Subject::key("k")));
/// assert!(!only_acl.authorize(None, &Topic::new("t"), &Subject::key("k")));
/// ```
pub trait Authorizer: Send + Sync + 'static {
    /// Whether `token` may subscribe to `subject` of `topic`.
    fn authorize(&self, token: Option<&str>, topic: &Topic, subject: &Subject) -> bool;
}

impl<F> Authorizer for F
where
    F: Fn(Option<&str>, &Topic, &Subject) -> bool + Send + Sync + 'static,
{
    fn authorize(&self, token: Option<&str>, topic: &Topic, subject: &Subject) -> bool {
        self(token, topic, subject)
    }
}

/// The default [`Authorizer`]: allows everything.
///
/// # Examples
///
/// ```
/// use snapstream::event::{Subject, Topic};
/// use snapstream::net::{AllowAll, Authorizer};
/// assert!(AllowAll.authorize(None, &Topic::new("t"), &Subject::Wildcard));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _token: Option<&str>, _topic: &Topic, _subject: &Subject) -> bool {
        true
    }
}

/// Builds a [`Server`] over a publisher.
///
/// | option | default |
/// |---|---|
/// | [`authorizer`](Self::authorizer) | [`AllowAll`] |
/// | [`catch_up`](Self::catch_up) | [`NoWait`] (the publisher is the source of its indexes) |
/// | [`max_streams_per_connection`](Self::max_streams_per_connection) | [`DEFAULT_MAX_STREAMS_PER_CONNECTION`] (4,096) |
/// | [`max_streams`](Self::max_streams) | [`DEFAULT_MAX_STREAMS`] (65,536) |
/// | [`max_message_size`](Self::max_message_size) | [`DEFAULT_MAX_MESSAGE_SIZE`] (1 MiB) |
/// | [`message_fill`](Self::message_fill) | [`DEFAULT_MESSAGE_FILL`] (4 KiB) |
/// | [`max_request_size`](Self::max_request_size) | [`DEFAULT_MAX_REQUEST_SIZE`] (16 KiB) |
/// | [`keepalive`](Self::keepalive) | [`DEFAULT_KEEPALIVE_INTERVAL`] (30 s), [`DEFAULT_KEEPALIVE_TIMEOUT`] (20 s) |
/// | [`idle_timeout`](Self::idle_timeout) | [`DEFAULT_IDLE_TIMEOUT`] (5 min with no stream; `None` disables) |
/// | [`progress_interval`](Self::progress_interval) | [`DEFAULT_PROGRESS_INTERVAL`] (10 s; `None` disables) |
/// | [`coalesce_writes`](Self::coalesce_writes) | `false` |
///
/// # What a stream holds on the server
///
/// A stream encodes its next message only when HTTP/2 flow control lets it
/// send, from the publisher's shared batches (a snapshot is built once per
/// key and shared by every stream of it). So a stream whose client reads
/// slowly holds about one message of [`message_fill`](Self::message_fill)
/// bytes (more only for a single larger event), and a connection holds at
/// most what its client's HTTP/2 windows let through unread (the client's
/// [`windows`](super::ClientBuilder::windows); the snapstream client
/// announces 256 KiB per stream and 1 MiB per connection by default). What
/// the publisher keeps for a stream that stops reading is bounded by its
/// lag policy. With [`coalesce_writes`](Self::coalesce_writes) a
/// connection also keeps small responses (under 4 KiB in all) until the
/// runtime has run its other ready tasks.
///
/// # Examples
///
/// ```
/// use snapstream::net::{BinaryCodec, Server};
/// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut b = Publisher::<u64>::builder();
/// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async { Ok(1) }).unwrap();
/// let server = Server::builder(b.build(), BinaryCodec)
///     .max_streams(1_000)
///     .bind("127.0.0.1:0".parse().unwrap())
///     .await
///     .unwrap();
/// assert_ne!(server.local_addr().port(), 0);
/// server.shutdown().await.unwrap();
/// # }
/// ```
pub struct ServerBuilder<P, C> {
    publisher: Publisher<P>,
    codec: C,
    authorizer: Arc<dyn Authorizer>,
    catch_up: Arc<dyn CatchUp>,
    max_streams_per_connection: u32,
    max_streams: usize,
    max_message_size: usize,
    message_fill: usize,
    max_request_size: usize,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    idle_timeout: Option<Duration>,
    progress_interval: Option<Duration>,
    coalesce_writes: bool,
    #[cfg(feature = "net-tls")]
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl<P, C> fmt::Debug for ServerBuilder<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field(
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            )
            .field("max_streams", &self.max_streams)
            .field("max_message_size", &self.max_message_size)
            .field("message_fill", &self.message_fill)
            .field("max_request_size", &self.max_request_size)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("progress_interval", &self.progress_interval)
            .field("coalesce_writes", &self.coalesce_writes)
            .finish_non_exhaustive()
    }
}

impl<P, C> ServerBuilder<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    /// Sets the authorizer (default [`AllowAll`]).
    ///
    /// # Examples
    ///
    /// See [`Authorizer`].
    pub fn authorizer(mut self, authorizer: impl Authorizer) -> Self {
        self.authorizer = Arc::new(authorizer);
        self
    }

    /// Sets what a request resuming from a non-zero index waits for before
    /// it is subscribed (default [`NoWait`]): read-your-index for a server
    /// over one node of several fed from one log (see [`CatchUp`]). When
    /// the wait gives up, the call ends with `UNAVAILABLE` and the client
    /// tries again at its next address.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::{BinaryCodec, NoWait, Server};
    /// use snapstream::publisher::Publisher;
    ///
    /// let builder = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).catch_up(NoWait);
    /// # drop(builder);
    /// ```
    pub fn catch_up(mut self, catch_up: impl CatchUp) -> Self {
        self.catch_up = Arc::new(catch_up);
        self
    }

    /// Sets the most concurrent streams on one HTTP/2 connection (the
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` the server announces; a client
    /// waits for a free stream beyond it).
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn max_streams_per_connection(mut self, max: u32) -> Self {
        self.max_streams_per_connection = max.max(1);
        self
    }

    /// Sets the most concurrent subscribe streams on the server; one beyond
    /// ends with `RESOURCE_EXHAUSTED` (a client retries, maybe elsewhere).
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn max_streams(mut self, max: usize) -> Self {
        self.max_streams = max.max(1);
        self
    }

    /// Sets the largest response message (at least 1 KiB).
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes.max(1024);
        self
    }

    /// Sets the size a response message is filled to (at least 1 KiB, at
    /// most the [`max_message_size`](Self::max_message_size)). Smaller
    /// messages bound what each stream holds on the server while its client
    /// reads slowly (see
    /// [What a stream holds](Self#what-a-stream-holds-on-the-server)); larger
    /// ones cost fewer messages per event.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::{BinaryCodec, Server};
    /// use snapstream::publisher::Publisher;
    ///
    /// let builder = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec)
    ///     .message_fill(32 << 10);
    /// # drop(builder);
    /// ```
    pub fn message_fill(mut self, bytes: usize) -> Self {
        self.message_fill = bytes.max(1024);
        self
    }

    /// Sets the largest request message.
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn max_request_size(mut self, bytes: usize) -> Self {
        self.max_request_size = bytes.max(64);
        self
    }

    /// Sets the HTTP/2 keepalive ping interval and the time a ping may go
    /// unanswered before the connection is closed.
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }

    /// Sets how long a connection may carry no subscribe stream before the
    /// server closes it (`None`: never). Only open streams count as
    /// activity, not keepalive pings: a client that ended (or never opened)
    /// its subscriptions gives its socket back after this long, and
    /// reconnects when it subscribes again. Applies to servers started with
    /// [`bind`](Self::bind) or [`serve`](Self::serve), not to a
    /// [`service`](Self::service) mounted on a server of your own.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use snapstream::net::{BinaryCodec, Server};
    /// # use snapstream::publisher::Publisher;
    /// let publisher = Publisher::<u64>::builder().build();
    /// let builder = Server::builder(publisher, BinaryCodec)
    ///     .idle_timeout(Some(Duration::from_secs(60)));
    /// # drop(builder);
    /// ```
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout.filter(|d| !d.is_zero());
        self
    }

    /// Sets how long a stream may be quiet before it gets a progress mark
    /// (`None`: never).
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn progress_interval(mut self, interval: Option<Duration>) -> Self {
        self.progress_interval = interval.filter(|d| !d.is_zero());
        self
    }

    /// Whether each connection's small writes are coalesced (default
    /// `false`: a write at every HTTP/2 flush). On, responses under 4 KiB in
    /// all are kept until the runtime has run its other ready tasks (no
    /// timer), so that one change delivered to many streams of a connection
    /// is one socket write rather than one per stream: less server CPU for
    /// many mostly idle streams (the snapshot storm's steady state), but
    /// lower throughput and higher latency when the server is saturated
    /// (the flush waits behind every ready task).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::{BinaryCodec, Server};
    /// use snapstream::publisher::Publisher;
    ///
    /// let builder = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec)
    ///     .coalesce_writes(true);
    /// # drop(builder);
    /// ```
    pub fn coalesce_writes(mut self, on: bool) -> Self {
        self.coalesce_writes = on;
        self
    }

    /// Serves over TLS (rustls) with tonic's `ServerTlsConfig` (feature
    /// `net-tls`); clients then connect to `https://` addresses with
    /// [`ClientBuilder::tls`](super::ClientBuilder::tls).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::{BinaryCodec, Server};
    /// use snapstream::publisher::Publisher;
    /// use tonic::transport::{Identity, ServerTlsConfig};
    ///
    /// # #[allow(dead_code)]
    /// # fn f(cert_pem: Vec<u8>, key_pem: Vec<u8>) {
    /// let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    /// let builder = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).tls(tls);
    /// # drop(builder);
    /// # }
    /// ```
    #[cfg(feature = "net-tls")]
    pub fn tls(mut self, config: tonic::transport::ServerTlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// The service alone, to add to a tonic server of your own (then the
    /// per-connection and keepalive options are yours to set there, and
    /// [`SubscribeService::shutdown`] ends its streams).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::{BinaryCodec, Server};
    /// use snapstream::publisher::Publisher;
    ///
    /// let service = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).service();
    /// assert_eq!(service.active_streams(), 0);
    /// ```
    pub fn service(self) -> SubscribeService<P, C> {
        let (shutdown, _) = watch::channel(false);
        SubscribeService {
            inner: Arc::new(ServiceInner {
                publisher: self.publisher,
                codec: self.codec,
                authorizer: self.authorizer,
                catch_up: self.catch_up,
                permits: Arc::new(Semaphore::new(self.max_streams)),
                max_streams: self.max_streams,
                max_streams_per_connection: self.max_streams_per_connection as usize,
                max_message_size: self.max_message_size,
                message_fill: self.message_fill.min(self.max_message_size),
                max_request_size: self.max_request_size,
                progress_interval: self.progress_interval,
                shutdown,
                stops: Mutex::new(HashMap::new()),
                next_stream: AtomicU64::new(0),
                counters: Counters::default(),
            }),
        }
    }

    /// Binds `addr` and serves there.
    ///
    /// # Errors
    ///
    /// [`ServeError::Bind`] when the address cannot be bound.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: nothing is bound unless it returns.
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub async fn bind(self, addr: SocketAddr) -> Result<Server, ServeError> {
        let listener = TcpListener::bind(addr).await.map_err(ServeError::Bind)?;
        self.serve(listener)
    }

    /// Serves on `listener` (on a spawned task of the current runtime).
    ///
    /// # Errors
    ///
    /// [`ServeError::Bind`] when the listener's address cannot be read;
    /// [`ServeError::Transport`] when the TLS configuration is refused.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::net::{BinaryCodec, Server};
    /// # use snapstream::publisher::Publisher;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// let server = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec)
    ///     .serve(listener)
    ///     .unwrap();
    /// server.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn serve(self, listener: TcpListener) -> Result<Server, ServeError> {
        let local_addr = listener.local_addr().map_err(ServeError::Bind)?;
        let per_conn = self.max_streams_per_connection;
        let interval = self.keepalive_interval;
        let timeout = self.keepalive_timeout;
        let idle = self.idle_timeout;
        let coalesce = self.coalesce_writes;
        let server = tonic::transport::Server::builder();
        #[cfg(feature = "net-tls")]
        let server = match self.tls.clone() {
            Some(tls) => server.tls_config(tls).map_err(ServeError::Transport)?,
            None => server,
        };
        let service = self.service();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let grpc = service.grpc();
        // Each socket counts its streams for the idle timeout (see `idle`)
        // and, when asked, coalesces its writes (see `coalesce`).
        let closed = service.inner.counters.idle_closed();
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(move |conn| {
                conn.map(|io| Coalesce::new(IdleIo::new(io, idle, closed.clone()), coalesce))
            });
        let task = tokio::spawn(async move {
            server
                .max_concurrent_streams(per_conn)
                .http2_keepalive_interval(Some(interval))
                .http2_keepalive_timeout(Some(timeout))
                .add_service(grpc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        });
        tracing::debug!(%local_addr, "snapstream gRPC server listening");
        Ok(Server {
            local_addr,
            stop: stop_tx,
            streams: service.stopper(),
            task,
        })
    }
}

/// A running gRPC subscribe server. See [`ServerBuilder`].
///
/// Dropping it leaves the server running (on its task) until its runtime
/// stops; call [`shutdown`](Self::shutdown) to stop it.
///
/// # Examples
///
/// See [`ServerBuilder`].
pub struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    streams: Arc<dyn Stopper>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("active_streams", &self.streams.active())
            .finish()
    }
}

impl Server {
    /// A builder over `publisher` with `codec` and the defaults of
    /// [`ServerBuilder`].
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn builder<P, C>(publisher: Publisher<P>, codec: C) -> ServerBuilder<P, C>
    where
        P: Send + Sync + 'static,
        C: PayloadCodec<P>,
    {
        ServerBuilder {
            publisher,
            codec,
            authorizer: Arc::new(AllowAll),
            catch_up: Arc::new(NoWait),
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_streams: DEFAULT_MAX_STREAMS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            message_fill: DEFAULT_MESSAGE_FILL,
            max_request_size: DEFAULT_MAX_REQUEST_SIZE,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            progress_interval: Some(DEFAULT_PROGRESS_INTERVAL),
            coalesce_writes: false,
            #[cfg(feature = "net-tls")]
            tls: None,
        }
    }

    /// The address the server listens on.
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Subscribe streams open now.
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub fn active_streams(&self) -> usize {
        self.streams.active()
    }

    /// The server's figures: streams open, opened and ended by reason,
    /// messages, bytes and progress marks sent.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::net::{BinaryCodec, Server};
    /// # use snapstream::publisher::Publisher;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// let server = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec)
    ///     .serve(listener)
    ///     .unwrap();
    /// assert_eq!(server.stats().streams_opened, 0);
    /// server.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn stats(&self) -> ServerStats {
        self.streams.stats()
    }

    /// A handle that reads [`stats`](Self::stats) without borrowing the
    /// server (for a metrics collector); it keeps reading the last figures
    /// after the server shut down.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::net::{BinaryCodec, Server};
    /// # use snapstream::publisher::Publisher;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// let server = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec)
    ///     .serve(listener)
    ///     .unwrap();
    /// let stats = server.stats_handle();
    /// server.shutdown().await.unwrap();
    /// assert_eq!(stats.stats().open_streams, 0);
    /// # }
    /// ```
    pub fn stats_handle(&self) -> ServerStatsHandle {
        ServerStatsHandle {
            inner: self.streams.clone(),
        }
    }

    /// Graceful shutdown: every open stream ends with `UNAVAILABLE` (clients
    /// retry, maybe elsewhere), new calls are refused, then the server
    /// waits for its connections to close and returns.
    ///
    /// # Errors
    ///
    /// [`ServeError::Transport`] when the server had failed.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropping the future leaves the shutdown half done
    /// (streams ended, server task still finishing on its own).
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder`].
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.streams.stop();
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => r.map_err(ServeError::Transport),
            Err(e) => Err(ServeError::Task(e)),
        }
    }
}

/// Reads a subscribe server's [`ServerStats`]; from
/// [`Server::stats_handle`] or [`SubscribeService::stats_handle`].
///
/// # Examples
///
/// See [`Server::stats_handle`].
#[derive(Clone)]
pub struct ServerStatsHandle {
    inner: Arc<dyn Stopper>,
}

impl ServerStatsHandle {
    /// The figures now.
    ///
    /// # Examples
    ///
    /// See [`Server::stats_handle`].
    pub fn stats(&self) -> ServerStats {
        self.inner.stats()
    }
}

impl fmt::Debug for ServerStatsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServerStatsHandle")
            .field(&self.inner.stats())
            .finish()
    }
}

/// What [`Server`] needs of its service, without its type parameters.
trait Stopper: Send + Sync {
    fn stop(&self);
    fn active(&self) -> usize;
    fn stats(&self) -> ServerStats;
}

impl<P, C> Stopper for ServiceInner<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    fn stop(&self) {
        // The flag first: a stream registered after the loop below sees it.
        self.shutdown.send_replace(true);
        for stop in self.stops.lock().values() {
            stop.stop();
        }
    }

    fn active(&self) -> usize {
        self.max_streams - self.permits.available_permits()
    }

    fn stats(&self) -> ServerStats {
        self.counters.read(self.active())
    }
}

struct ServiceInner<P, C> {
    publisher: Publisher<P>,
    codec: C,
    authorizer: Arc<dyn Authorizer>,
    catch_up: Arc<dyn CatchUp>,
    permits: Arc<Semaphore>,
    max_streams: usize,
    /// Also the most subscriptions on one multiplexed stream.
    max_streams_per_connection: usize,
    max_message_size: usize,
    message_fill: usize,
    max_request_size: usize,
    progress_interval: Option<Duration>,
    shutdown: watch::Sender<bool>,
    /// The open streams' stop signals, by stream id.
    stops: Mutex<HashMap<u64, Arc<StreamStop>>>,
    next_stream: AtomicU64,
    counters: Counters,
}

/// Tells one stream the server is shutting down: a flag and the stream's
/// waker (so that an open stream costs no lock per poll).
#[derive(Default)]
struct StreamStop {
    stopped: AtomicBool,
    waker: AtomicWaker,
}

impl StreamStop {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// The subscribe service itself (a tonic service once [`grpc`](Self::grpc)
/// wraps it), for embedding in a tonic server of your own.
///
/// # Examples
///
/// See [`ServerBuilder::service`].
pub struct SubscribeService<P, C> {
    inner: Arc<ServiceInner<P, C>>,
}

impl<P, C> Clone for SubscribeService<P, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<P, C> fmt::Debug for SubscribeService<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeService")
            .field("max_streams", &self.inner.max_streams)
            .finish_non_exhaustive()
    }
}

impl<P, C> SubscribeService<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    /// The tonic service, with the request size limit applied.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::{BinaryCodec, Server};
    /// use snapstream::publisher::Publisher;
    ///
    /// let service = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).service();
    /// let _router = tonic::transport::Server::builder().add_service(service.grpc());
    /// ```
    pub fn grpc(&self) -> proto::subscriber_server::SubscriberServer<Self> {
        proto::subscriber_server::SubscriberServer::new(self.clone())
            .max_decoding_message_size(self.inner.max_request_size)
            .max_encoding_message_size(self.inner.max_message_size + 1024)
    }

    /// Ends every open stream with `UNAVAILABLE` and refuses new ones.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::net::{BinaryCodec, Server};
    /// # use snapstream::publisher::Publisher;
    /// let service = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).service();
    /// service.shutdown();
    /// ```
    pub fn shutdown(&self) {
        self.inner.stop();
    }

    /// Subscribe streams open now.
    ///
    /// # Examples
    ///
    /// See [`ServerBuilder::service`].
    pub fn active_streams(&self) -> usize {
        self.inner.active()
    }

    /// The service's figures (as [`Server::stats`]).
    ///
    /// # Examples
    ///
    /// See [`ServerStats`].
    pub fn stats(&self) -> ServerStats {
        self.inner.stats()
    }

    /// A handle that reads [`stats`](Self::stats) (as
    /// [`Server::stats_handle`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::net::{BinaryCodec, Server};
    /// # use snapstream::publisher::Publisher;
    /// let service = Server::builder(Publisher::<u64>::builder().build(), BinaryCodec).service();
    /// assert_eq!(service.stats_handle().stats().streams_opened, 0);
    /// ```
    pub fn stats_handle(&self) -> ServerStatsHandle {
        ServerStatsHandle {
            inner: self.stopper(),
        }
    }

    fn stopper(&self) -> Arc<dyn Stopper> {
        self.inner.clone()
    }

    /// Waits until the source has applied `index`: `UNAVAILABLE` when it
    /// gives up or the server shuts down meanwhile.
    async fn caught_up(&self, index: u64) -> Result<(), Status> {
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => Err(Status::unavailable("server shutting down")),
            r = self.inner.catch_up.wait_for(index) => r.map_err(|e| {
                tracing::debug!(error = %e, "resume refused: not caught up");
                Status::unavailable(e.to_string())
            }),
        }
    }

    /// Validates and authorizes a request, then subscribes.
    fn open(
        &self,
        token: Option<&str>,
        req: proto::SubscribeRequest,
        conn: Option<Arc<ConnActivity>>,
    ) -> Result<ServerStream<P, C>, Status> {
        let inner = &self.inner;
        if *inner.shutdown.borrow() {
            return Err(Status::unavailable("server shutting down"));
        }
        let (topic, subject) = parse_request(&req)?;
        if !inner.authorizer.authorize(token, &topic, &subject) {
            return Err(Status::permission_denied(format!(
                "token may not subscribe to {subject} of {topic}"
            )));
        }
        let permit = inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many streams on this server"))?;
        let mut request = SubscribeRequest::new(topic.clone(), subject.clone()).index(req.index);
        if let Some(token) = token {
            request = request.token(token);
        }
        if req.resnapshot_on_lag {
            request = request.on_lag(LagPolicy::Resnapshot);
        }
        let sub = inner
            .publisher
            .subscribe(request)
            .map_err(subscribe_status)?;
        inner.counters.opened();
        let id = inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(StreamStop::default());
        inner.stops.lock().insert(id, stop.clone());
        // A shutdown that began before the insert did not see this stream.
        if *inner.shutdown.borrow() {
            stop.stop();
        }
        Ok(ServerStream {
            sub,
            topic,
            subject,
            inner: inner.clone(),
            id,
            stop,
            progress: None,
            last_sent: tokio::time::Instant::now(),
            pending: VecDeque::new(),
            pending_err: None,
            ended: None,
            done: false,
            _permit: permit,
            _conn: conn.map(|c| c.stream_opened()),
            encoded: None,
        })
    }
}

/// Turns a wire request into (topic, subject), or `INVALID_ARGUMENT`.
fn parse_request(req: &proto::SubscribeRequest) -> Result<(Topic, Subject), Status> {
    use proto::subscribe_request::Subject as S;
    if req.topic.is_empty() {
        return Err(Status::invalid_argument("empty topic"));
    }
    let subject = match &req.subject {
        None => return Err(Status::invalid_argument("no subject: set key or wildcard")),
        Some(S::Key(k)) if k.is_empty() => return Err(Status::invalid_argument("empty key")),
        Some(S::Key(k)) => Subject::key(k.as_str()),
        Some(S::Wildcard(true)) => Subject::Wildcard,
        Some(S::Wildcard(false)) => {
            return Err(Status::invalid_argument("wildcard must be true when set"))
        }
    };
    Ok((Topic::new(req.topic.as_str()), subject))
}

fn subscribe_status(e: SubscribeError) -> Status {
    match e {
        SubscribeError::UnknownTopic(t) => Status::not_found(format!("unknown topic {t}")),
        SubscribeError::WildcardUnsupported(t) => {
            Status::invalid_argument(format!("topic {t} does not support wildcard subscriptions"))
        }
        SubscribeError::ShutDown => Status::unavailable("publisher shut down"),
        other => Status::internal(other.to_string()),
    }
}

/// The reason counted for a stream closed by `e`.
fn close_reason(e: &SubscriptionError) -> EndReason {
    match e {
        SubscriptionError::ForceClosed => EndReason::ForceClosed,
        SubscriptionError::ShuttingDown => EndReason::Shutdown,
        SubscriptionError::Lagged { .. } => EndReason::Lagged,
        _ => EndReason::Error,
    }
}

fn close_status(e: &SubscriptionError) -> Status {
    match e {
        SubscriptionError::ForceClosed => {
            Status::aborted("subscription force-closed: drop the view and resubscribe")
        }
        SubscriptionError::ShuttingDown => Status::unavailable("publisher shutting down"),
        SubscriptionError::Lagged { limit } => {
            let mut s = Status::resource_exhausted(e.to_string());
            if let Ok(v) = limit.to_string().parse() {
                s.metadata_mut().insert(LAG_LIMIT_METADATA, v);
            }
            s
        }
        SubscriptionError::Snapshot(err) => {
            Status::internal(format!("snapshot failed: {}", err.inner()))
        }
        other => Status::cancelled(other.to_string()),
    }
}

/// One remote subscriber's response stream: reads its [`Subscription`] and
/// encodes its next message only when HTTP/2 flow control lets the response
/// be sent, so a client that stops reading stops the server reading for it
/// (and the publisher's lag policy bounds what the key's buffer keeps for
/// it). Batches wait unencoded (they are shared with every other stream of
/// the key) and are encoded one message at a time.
struct ServerStream<P, C> {
    sub: Subscription<P>,
    /// What `sub` follows, for progress marks.
    topic: Topic,
    subject: Subject,
    inner: Arc<ServiceInner<P, C>>,
    /// This stream's key in `inner.stops`, and its stop signal.
    id: u64,
    stop: Arc<StreamStop>,
    /// The progress-mark timer, made at the first wait and kept: it is reset
    /// only when it fires (to `last_sent` + the interval, or, when that has
    /// passed, after sending a mark), never per message.
    progress: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the stream last sent a response.
    last_sent: tokio::time::Instant,
    /// What is still to send, in order.
    pending: VecDeque<Pending<P>>,
    /// The status to end with once `pending` is sent, and its reason.
    pending_err: Option<(Status, EndReason)>,
    /// Why the stream ended, once its status was returned (`None` at drop:
    /// the client went away).
    ended: Option<EndReason>,
    done: bool,
    _permit: OwnedSemaphorePermit,
    /// Counts the stream on its connection, for the idle timeout.
    _conn: Option<StreamGuard>,
    /// Events this stream shares the encoding of with others (the other
    /// subscriptions of a `Multiplex` call).
    encoded: Option<Arc<EncodeCache<P>>>,
}

/// The wire form of the events most recently encoded for a group of
/// streams, so that an event going to a hundred subscriptions of one
/// `Multiplex` call is run through the payload codec once, not a hundred
/// times. An entry holds its event (so the allocation it is recognised by
/// cannot be reused for another while the entry lives); the last
/// [`EncodeCache::ENTRIES`] events are kept.
pub(super) struct EncodeCache<P> {
    entries: Mutex<VecDeque<(Event<P>, EncodedEvent)>>,
}

impl<P> EncodeCache<P> {
    const ENTRIES: usize = 16;

    pub(super) fn new() -> Self {
        Self {
            entries: Mutex::new(VecDeque::with_capacity(Self::ENTRIES)),
        }
    }

    /// The encoding of `e` (the same event: the same shared allocation at
    /// the same index), or `encode`'s, remembered.
    fn get_or_encode(
        &self,
        e: &Event<P>,
        encode: impl FnOnce() -> Result<EncodedEvent, Status>,
    ) -> Result<EncodedEvent, Status> {
        let mut entries = self.entries.lock();
        if let Some((_, ev)) = entries
            .iter()
            .rev()
            .find(|(c, _)| c.index() == e.index() && c.shares_payload(e))
        {
            return Ok(ev.clone());
        }
        let ev = encode()?;
        if entries.len() == Self::ENTRIES {
            entries.pop_front();
        }
        entries.push_back((e.clone(), ev.clone()));
        Ok(ev)
    }
}

/// A part of a stream's output not yet sent.
enum Pending<P> {
    /// An encoded frame (its body).
    Frame(Bytes),
    /// A batch, from event `next` on, not encoded yet.
    Batch { batch: EventBatch<P>, next: usize },
}

impl<P, C> ServerStream<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    /// Queues `message` at the back of `pending` (batches unencoded).
    fn push(&mut self, message: Message<P>) {
        use proto::frame::Kind;
        let frame = |kind| Pending::Frame(wire::frame(&proto::Frame { kind: Some(kind) }));
        let item = match message {
            Message::EndOfSnapshot { index } => frame(Kind::EndOfSnapshot(index)),
            Message::NewSnapshotToFollow => {
                frame(Kind::NewSnapshotToFollow(proto::NewSnapshotToFollow {}))
            }
            Message::Events(batch) if batch.is_empty() => frame(Kind::Events(proto::Batch {
                events: Vec::new(),
                partial: false,
            })),
            Message::Events(batch) => Pending::Batch { batch, next: 0 },
        };
        self.pending.push_back(item);
    }

    /// Whether `pending` holds a message's worth (a batch counts as one).
    fn full(&self) -> bool {
        let mut size = 0;
        for p in &self.pending {
            match p {
                Pending::Frame(f) => size += wire::field_len(f.len()),
                Pending::Batch { .. } => return true,
            }
        }
        size >= self.inner.message_fill
    }

    /// Encodes one event of a batch, with the bytes it takes in a batch.
    fn encode_event(&self, e: &Event<P>) -> Result<EncodedEvent, Status> {
        match &self.encoded {
            Some(cache) => cache.get_or_encode(e, || self.encode_new(e)),
            None => self.encode_new(e),
        }
    }

    /// Shares the encoding of events with the other streams of `cache`.
    pub(super) fn share_encoding(&mut self, cache: Arc<EncodeCache<P>>) {
        self.encoded = Some(cache);
    }

    fn encode_new(&self, e: &Event<P>) -> Result<EncodedEvent, Status> {
        let mut payload = Vec::new();
        self.inner
            .codec
            .encode(e.payload(), &mut payload)
            .map_err(|err| Status::internal(format!("payload codec failed: {err}")))?;
        let key = match e.subject() {
            Subject::Key(k) => k.to_string(),
            Subject::Wildcard => String::new(),
        };
        Ok(EncodedEvent::new(&proto::Event {
            key,
            index: e.index(),
            payload: payload.into(),
        }))
    }

    /// Moves frames from `pending` into one response of about
    /// `message_fill` bytes, encoding batch events as it goes. A batch
    /// split across responses is sent as `partial` fragments.
    fn take_response(&mut self) -> Result<Response, Status> {
        // Room for the headers of the frame, of its batch and (in a
        // `Multiplex` call) of the item around them: a response never
        // passes the max message size, even with a fill as large.
        let max = self.inner.max_message_size - 32;
        let fill = self.inner.message_fill.min(max);
        let mut response = Response::default();
        while let Some(front) = self.pending.front_mut() {
            match front {
                Pending::Frame(f) => {
                    if !response.is_empty() && response.len + wire::field_len(f.len()) > fill {
                        break;
                    }
                    match self.pending.pop_front() {
                        Some(Pending::Frame(f)) => response.push(f),
                        _ => unreachable!("front is a frame"),
                    }
                }
                Pending::Batch { .. } => {
                    if !response.is_empty() && response.len + 64 > fill {
                        break;
                    }
                    let Some(Pending::Batch { batch, mut next }) = self.pending.pop_front() else {
                        unreachable!("front is a batch")
                    };
                    let mut events = Vec::new();
                    let mut size = response.len;
                    while next < batch.len() {
                        let ev = self.encode_event(&batch[next])?;
                        let n = ev.entry_len();
                        if n > max {
                            return Err(Status::out_of_range(format!(
                                "an event of {n} bytes exceeds the max message size"
                            )));
                        }
                        if (!events.is_empty() || !response.is_empty()) && size + n > fill {
                            break;
                        }
                        size += n;
                        events.push(ev);
                        next += 1;
                    }
                    if events.is_empty() {
                        // Not one more event fits: the batch starts the next response.
                        self.pending.push_front(Pending::Batch { batch, next });
                        break;
                    }
                    let partial = next < batch.len();
                    response.push(wire::batch_frame(&events, partial));
                    if partial {
                        self.pending.push_front(Pending::Batch { batch, next });
                        break;
                    }
                }
            }
        }
        Ok(response)
    }

    fn fail(&mut self, status: Status, reason: EndReason) {
        if self.pending_err.is_none() {
            self.pending_err = Some((status, reason));
        }
    }

    /// Ends the stream with `status`, counted as `reason`.
    fn end(&mut self, status: Status, reason: EndReason) -> Option<Result<Response, Status>> {
        self.done = true;
        self.ended = Some(reason);
        Some(Err(status))
    }

    /// The next response (or the closing status): the stream's
    /// `poll_next`. Shutdown wins over messages, messages over a progress
    /// mark.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Response, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            if !self.pending.is_empty() {
                match self.take_response() {
                    Ok(r) if !r.is_empty() => {
                        self.inner.counters.sent(r.len);
                        self.last_sent = tokio::time::Instant::now();
                        return Poll::Ready(Some(Ok(r)));
                    }
                    Ok(_) => {}
                    Err(status) => {
                        // What follows the failed event is never sent.
                        self.pending.clear();
                        self.pending_err = Some((status, EndReason::Error));
                    }
                }
                continue;
            }
            if let Some((status, reason)) = self.pending_err.take() {
                return Poll::Ready(self.end(status, reason));
            }
            if self.stop.is_stopped() {
                return Poll::Ready(self.end(
                    Status::unavailable("server shutting down"),
                    EndReason::Shutdown,
                ));
            }
            match self.sub.poll_message(cx) {
                Poll::Ready(Ok(m)) => {
                    self.push(m);
                    // Take whatever else is ready now, up to one message's worth.
                    while self.pending_err.is_none() && !self.full() {
                        match self.sub.poll_message(cx) {
                            Poll::Pending => break,
                            Poll::Ready(Ok(m)) => self.push(m),
                            Poll::Ready(Err(e)) => self.fail(close_status(&e), close_reason(&e)),
                        }
                    }
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    self.fail(close_status(&e), close_reason(&e));
                    continue;
                }
                Poll::Pending => {}
            }
            if self.poll_quiet(cx) {
                continue;
            }
            self.stop.waker.register(cx.waker());
            if self.stop.is_stopped() {
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Polls the progress timer: true when a progress mark was queued (or
    /// the timer must be polled again).
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(interval) = self.inner.progress_interval else {
            return false;
        };
        let due = self.last_sent + interval;
        let timer = self
            .progress
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        let now = tokio::time::Instant::now();
        if now < due {
            // Something was sent since the timer was set: wait on from then.
            timer.as_mut().reset(due);
            return true;
        }
        timer.as_mut().reset(now + interval);
        // The topic's newest index when the subject provably did not change
        // since what the subscriber saw: its resume point moves on with the
        // topic.
        let seen = self.sub.last_index();
        let quiet = seen.and_then(|i| {
            self.inner
                .publisher
                .quiet_index(&self.topic, &self.subject, i)
        });
        if let Some(index) = quiet.max(seen) {
            let f = proto::Frame {
                kind: Some(proto::frame::Kind::Progress(index)),
            };
            self.pending.push_back(Pending::Frame(wire::frame(&f)));
            self.inner.counters.progress();
        } else {
            // Nothing to mark yet: the next mark is one interval on.
            self.last_sent = now;
        }
        true
    }
}

impl<P, C> Stream for ServerStream<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    type Item = Result<proto::EncodedSubscribeResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_step(cx)
            .map(|r| r.map(|r| r.map(Response::into_subscribe)))
    }
}

impl<P, C> Drop for ServerStream<P, C> {
    fn drop(&mut self) {
        self.inner.stops.lock().remove(&self.id);
        self.inner
            .counters
            .ended(self.ended.unwrap_or(EndReason::ClientGone));
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<proto::EncodedSubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<P, C> proto::subscriber_server::Subscriber for SubscribeService<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    type SubscribeStream = ResponseStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, Status> {
        let conn = idle::activity_of(&request);
        let req = request.into_inner();
        let token = (!req.token.is_empty()).then(|| req.token.clone());
        if req.index > 0 {
            self.caught_up(req.index).await?;
        }
        let stream = self.open(token.as_deref(), req, conn)?;
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    type MultiplexStream = MuxResponseStream;

    async fn multiplex(
        &self,
        request: Request<tonic::Streaming<proto::MuxRequest>>,
    ) -> Result<tonic::Response<Self::MultiplexStream>, Status> {
        if *self.inner.shutdown.borrow() {
            return Err(Status::unavailable("server shutting down"));
        }
        let conn = idle::activity_of(&request);
        let shared = request
            .metadata()
            .get(crate::net::error::MUX_SHARED_METADATA)
            .is_some_and(|v| v.as_bytes() == b"1");
        let stream = mux::MuxStream::new(self.clone(), request.into_inner(), conn, shared);
        let mut response = tonic::Response::new(Box::pin(stream) as Self::MultiplexStream);
        response.metadata_mut().insert(
            crate::net::error::MAX_REQUEST_METADATA,
            self.inner.max_request_size.into(),
        );
        Ok(response)
    }
}

type MuxResponseStream =
    Pin<Box<dyn Stream<Item = Result<proto::EncodedMuxResponse, Status>> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(i: u64) -> Result<EncodedEvent, Status> {
        Ok(EncodedEvent::new(&proto::Event {
            key: "k".into(),
            index: i,
            payload: bytes::Bytes::new(),
        }))
    }

    #[test]
    fn the_encode_cache_knows_an_event_by_its_allocation_and_index() {
        let cache = EncodeCache::new();
        let calls = std::cell::Cell::new(0);
        let get = |e: &Event<u64>| {
            cache
                .get_or_encode(e, || {
                    calls.set(calls.get() + 1);
                    encoded(e.index())
                })
                .unwrap()
                .event()
                .index
        };
        let e = Event::new("t", "k", 1, 7u64);
        assert_eq!(get(&e), 1);
        assert_eq!(get(&e.clone()), 1);
        assert_eq!(calls.get(), 1, "a clone is the same event");
        // Equal contents in another allocation, or the same payload at
        // another index, are other events.
        assert_eq!(get(&Event::new("t", "k", 1, 7u64)), 1);
        assert_eq!(get(&e.with_index(2)), 2);
        assert_eq!(calls.get(), 3);
        // The oldest entries go once ENTRIES newer ones came.
        for i in 10..10 + EncodeCache::<u64>::ENTRIES as u64 {
            get(&Event::new("t", "k", i, 0u64));
        }
        let before = calls.get();
        get(&e);
        assert_eq!(calls.get(), before + 1, "evicted");
    }

    #[test]
    fn a_failed_encoding_is_not_remembered() {
        let cache = EncodeCache::new();
        let e = Event::new("t", "k", 1, 7u64);
        assert!(cache
            .get_or_encode(&e, || Err(Status::internal("no")))
            .is_err());
        let ev = cache.get_or_encode(&e, || encoded(1)).unwrap();
        assert_eq!(ev.event().index, 1);
    }
}
