//! The resuming client: [`Client`] (one HTTP/2 connection per server
//! address, shared by every subscription) and [`RemoteSubscriber`] (a
//! [`Stream`] of the same [`Message`]s a local subscription yields).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, Stream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use self::mux::{MuxConn, MuxFrames, MuxSub, SharedItem};
use super::error::{ClientError, RemoteError};
use super::proto;
use crate::codec::PayloadCodec;
use crate::event::{Event, EventBatch, Message, Subject, Topic};
use crate::publisher::LagPolicy;
use crate::sync::Mutex;

mod mux;

/// Default first reconnect delay: 50 ms (doubled per failed attempt, with
/// jitter: each delay is drawn between half and all of it).
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// Default longest reconnect delay: 5 s.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Default connect timeout: 5 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default largest message the client accepts: 4 MiB (gRPC's usual limit;
/// above the server's default [`DEFAULT_MAX_MESSAGE_SIZE`](super::DEFAULT_MAX_MESSAGE_SIZE)).
pub const DEFAULT_CLIENT_MAX_MESSAGE_SIZE: usize = 4 << 20;

/// Default messages a remote subscriber buffers ahead of its reader: 64.
/// Beyond it the subscriber stops reading the connection and HTTP/2 flow
/// control holds the server back.
pub const DEFAULT_SUBSCRIBER_BUFFER: usize = 64;

/// Default HTTP/2 stream window the client announces: 256 KiB. A server
/// holds at most about this much for one stream of a client that is slow to
/// read (plus the one message it is writing), instead of hyper's 2 MiB.
pub const DEFAULT_STREAM_WINDOW: u32 = 256 << 10;

/// Default HTTP/2 connection window the client announces: 1 MiB. Whatever
/// the number of streams on it, a server holds at most about this much for
/// one connection of a client that is slow to read (plus one message per
/// stream being written), instead of hyper's 5 MiB.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 1 << 20;

/// Default HTTP/2 keepalive ping interval of the client: 30 s.
pub const DEFAULT_CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Default time a client ping may go unanswered: 20 s (then the connection
/// is closed and every subscription on it reconnects).
pub const DEFAULT_CLIENT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What to subscribe to remotely: the same request as a local
/// subscription's — topic, subject, the index already seen (0 = none), an
/// optional token (sent to the server's authorizer) and the lag policy
/// asked of the server.
///
/// # Examples
///
/// ```
/// use snapstream::event::Subject;
/// use snapstream::net::RemoteRequest;
///
/// let req = RemoteRequest::new("services", Subject::key("web")).index(42).token("acl-1");
/// assert_eq!(req.requested_index(), 42);
/// assert_eq!(req.topic().as_str(), "services");
/// ```
pub type RemoteRequest = crate::publisher::SubscribeRequest;

/// The wire form of `request`, resuming from `index`.
fn wire(request: &RemoteRequest, index: u64) -> proto::SubscribeRequest {
    use proto::subscribe_request::Subject as S;
    proto::SubscribeRequest {
        topic: request.topic.to_string(),
        subject: Some(match &request.subject {
            Subject::Key(k) => S::Key(k.to_string()),
            Subject::Wildcard => S::Wildcard(true),
        }),
        index,
        token: request.token.as_deref().unwrap_or("").to_string(),
        resnapshot_on_lag: request.on_lag == LagPolicy::Resnapshot,
    }
}

/// Builds a [`Client`].
///
/// | option | default |
/// |---|---|
/// | [`backoff`](Self::backoff) | [`DEFAULT_BACKOFF_MIN`] (50 ms) to [`DEFAULT_BACKOFF_MAX`] (5 s), doubling, jittered |
/// | [`connect_timeout`](Self::connect_timeout) | [`DEFAULT_CONNECT_TIMEOUT`] (5 s) |
/// | [`max_message_size`](Self::max_message_size) | [`DEFAULT_CLIENT_MAX_MESSAGE_SIZE`] (4 MiB) |
/// | [`buffer`](Self::buffer) | [`DEFAULT_SUBSCRIBER_BUFFER`] (64 messages per subscriber) |
/// | [`keepalive`](Self::keepalive) | [`DEFAULT_CLIENT_KEEPALIVE_INTERVAL`] (30 s), [`DEFAULT_CLIENT_KEEPALIVE_TIMEOUT`] (20 s) |
/// | [`windows`](Self::windows) | [`DEFAULT_STREAM_WINDOW`] (256 KiB), [`DEFAULT_CONNECTION_WINDOW`] (1 MiB) |
/// | [`multiplex`](Self::multiplex) | `true`: one stream per address carries every subscription (`false`: a `Subscribe` call each) |
///
/// # Multiplexing
///
/// By default every subscription of a client to one address travels over
/// one `Multiplex` call (as etcd's watches share one `Watch` stream): one
/// change delivered to a hundred subscriptions is one message on one
/// HTTP/2 stream, not a hundred streams' frames and flushes, which is most
/// of a server's CPU for many mostly idle subscribers; and the server runs
/// each event through the payload codec once for all of them. Each
/// subscription still ends, reconnects and resumes on its own, and takes
/// at most its credit of responses (the stream window ÷ 4 KiB, 64 by
/// default) ahead of its reader, so one slow reader holds up nobody else.
/// The one stream gets the connection's window. A request larger than the
/// server takes (it says its limit when the call starts) ends only its own
/// subscription, with `OUT_OF_RANGE`. Against a server without `Multiplex`
/// the client falls back to one `Subscribe` call per subscription.
///
/// A change that is the next response of several subscriptions of the call
/// (subscribers of one key or topic that keep up) comes once, as one item
/// listing them all, and is decoded once: each of them gets the same
/// decoded batch. The client asks for these shared items when it starts the
/// call; a server that does not know them sends one item per subscription.
///
/// Measured (the README's network and cluster benches): with many
/// subscribers of a topic per client it delivers more than one
/// `Subscribe` stream per subscription does, and in a 5,000-subscriber
/// snapshot storm it takes a fifth of the server's steady CPU and under
/// half its memory, but fills the snapshots more slowly (one stream per
/// connection carries them all). [`multiplex(false)`](Self::multiplex)
/// gives each subscription a `Subscribe` call of its own.
///
/// # What a server holds for this client
///
/// The HTTP/2 windows announced here bound what the server sends before
/// this client reads it, so they bound the server's memory for this client
/// when it reads slowly: about the connection window per connection (all
/// its subscriptions share one connection to each server) and the stream
/// window per subscription, plus the one message of at most the server's
/// [`max_message_size`](super::ServerBuilder::max_message_size) each
/// stream is writing. The server encodes a stream's next message only when
/// the stream may send. Larger windows help a single subscription over a
/// long, fast path; many subscriptions on one connection need none.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::net::{BinaryCodec, Client};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let client = Client::builder(["http://127.0.0.1:7001", "http://127.0.0.1:7002"])
///     .backoff(Duration::from_millis(10), Duration::from_secs(1))
///     .build_with::<u64, _>(BinaryCodec)
///     .unwrap();
/// assert_eq!(client.addresses().len(), 2);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    addresses: Vec<String>,
    backoff_min: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
    max_message_size: usize,
    buffer: usize,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    stream_window: u32,
    connection_window: u32,
    multiplex: bool,
    #[cfg(feature = "net-tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClientBuilder {
    /// Connects over TLS (rustls) with tonic's `ClientTlsConfig` (feature
    /// `net-tls`); give `https://` addresses.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::Client;
    /// use tonic::transport::{Certificate, ClientTlsConfig};
    ///
    /// # #[allow(dead_code)]
    /// # fn f(ca_pem: Vec<u8>) {
    /// let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    /// let builder = Client::builder(["https://localhost:7000"]).tls(tls);
    /// # drop(builder);
    /// # }
    /// ```
    #[cfg(feature = "net-tls")]
    pub fn tls(mut self, config: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Sets the reconnect back-off: the first delay and the longest.
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Sets the connect timeout.
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the largest message accepted from the server.
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets how many messages each subscriber buffers ahead of its reader.
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn buffer(mut self, messages: usize) -> Self {
        self.buffer = messages.max(1);
        self
    }

    /// Sets the HTTP/2 keepalive ping interval and timeout.
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }

    /// Sets the HTTP/2 stream and connection windows the client announces
    /// (each at least 64 KiB, and the connection window at least the stream
    /// window). They bound what a server buffers for this client: see
    /// [What a server holds for this client](Self#what-a-server-holds-for-this-client).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::Client;
    ///
    /// // One subscription over a long fat pipe: larger windows.
    /// let builder = Client::builder(["http://127.0.0.1:7001"]).windows(2 << 20, 4 << 20);
    /// # drop(builder);
    /// ```
    pub fn windows(mut self, stream: u32, connection: u32) -> Self {
        self.stream_window = stream.max(64 << 10);
        self.connection_window = connection.max(self.stream_window);
        self
    }

    /// Whether the subscriptions to one address share one `Multiplex`
    /// call (default `true`; see [Multiplexing](Self#multiplexing)) or each
    /// make a `Subscribe` call of their own.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::net::Client;
    ///
    /// // One HTTP/2 stream per subscription.
    /// let builder = Client::builder(["http://127.0.0.1:7001"]).multiplex(false);
    /// # drop(builder);
    /// ```
    pub fn multiplex(mut self, on: bool) -> Self {
        self.multiplex = on;
        self
    }

    /// Builds a client for payloads `P` decoded with [`BinaryCodec`](super::BinaryCodec).
    ///
    /// # Errors
    ///
    /// [`ClientError::NoAddress`] or [`ClientError::BadAddress`].
    ///
    /// # Examples
    ///
    /// See [`ClientError`].
    pub fn build<P>(self) -> Result<Client<P, super::BinaryCodec>, ClientError>
    where
        P: Send + Sync + 'static,
        super::BinaryCodec: PayloadCodec<P>,
    {
        self.build_with(super::BinaryCodec)
    }

    /// Builds a client for payloads `P` decoded with `codec`. Connects
    /// lazily: the first subscription opens the connection.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoAddress`], [`ClientError::BadAddress`] or
    /// [`ClientError::Tls`].
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn build_with<P, C>(self, codec: C) -> Result<Client<P, C>, ClientError>
    where
        P: Send + Sync + 'static,
        C: PayloadCodec<P>,
    {
        if self.addresses.is_empty() {
            return Err(ClientError::NoAddress);
        }
        let mut channels = Vec::with_capacity(self.addresses.len());
        for address in &self.addresses {
            let endpoint = Endpoint::from_shared(address.clone())
                .map_err(|source| ClientError::BadAddress {
                    address: address.clone(),
                    source,
                })?
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(self.keepalive_interval)
                .keep_alive_timeout(self.keepalive_timeout)
                .keep_alive_while_idle(true)
                // One `Multiplex` stream carries every subscription of the
                // connection: it gets the connection's window. Each
                // subscription's credit (from the stream window) still
                // bounds what it alone may take of it.
                .initial_stream_window_size(if self.multiplex {
                    self.connection_window
                } else {
                    self.stream_window
                })
                .initial_connection_window_size(self.connection_window);
            #[cfg(feature = "net-tls")]
            let endpoint = match &self.tls {
                Some(tls) => {
                    endpoint
                        .tls_config(tls.clone())
                        .map_err(|source| ClientError::Tls {
                            address: address.clone(),
                            source,
                        })?
                }
                None => endpoint,
            };
            channels.push(endpoint.connect_lazy());
        }
        let n = channels.len();
        Ok(Client {
            inner: Arc::new(ClientInner {
                addresses: self.addresses,
                channels,
                multiplex: self.multiplex,
                muxes: (0..n).map(|_| Mutex::new(None)).collect(),
                no_mux: (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect(),
                credit: (self.stream_window / (4 << 10)).max(4),
                codec,
                preferred: AtomicUsize::new(0),
                backoff_min: self.backoff_min,
                backoff_max: self.backoff_max,
                max_message_size: self.max_message_size,
                buffer: self.buffer,
            }),
            _payload: PhantomData,
        })
    }
}

struct ClientInner<C> {
    addresses: Vec<String>,
    channels: Vec<Channel>,
    multiplex: bool,
    /// The multiplexed call to each address, once started.
    muxes: Vec<Mutex<Option<Arc<MuxConn>>>>,
    /// The address's server does not know `Multiplex`.
    no_mux: Vec<Arc<AtomicBool>>,
    /// Responses each multiplexed subscription takes ahead of its reader.
    credit: u32,
    codec: C,
    /// The address subscriptions try first; moves on when one fails there.
    preferred: AtomicUsize,
    backoff_min: Duration,
    backoff_max: Duration,
    max_message_size: usize,
    buffer: usize,
}

/// A client of one or more snapstream servers (replicas of one store):
/// one lazily opened HTTP/2 connection per address, shared by every
/// subscription made through it. Cheap to clone.
///
/// # Examples
///
/// ```
/// use futures::StreamExt;
/// use snapstream::event::{Event, Message, Subject};
/// use snapstream::net::{BinaryCodec, Client, RemoteRequest, Server};
/// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
///
/// # #[tokio::main] async fn main() {
/// let mut b = Publisher::<u64>::builder();
/// b.register("t", |r: SnapshotRequest, mut s: SnapshotSink<u64>| async move {
///     s.append(vec![Event::new("t", r.subject().clone(), 1, 10)])?;
///     Ok(1)
/// })
/// .unwrap();
/// let publisher = b.build();
/// let server = Server::builder(publisher.clone(), BinaryCodec)
///     .bind("127.0.0.1:0".parse().unwrap())
///     .await
///     .unwrap();
///
/// let client = Client::builder([format!("http://{}", server.local_addr())]).build::<u64>().unwrap();
/// let mut sub = client.subscribe(RemoteRequest::new("t", Subject::key("k")));
/// let first = sub.next().await.unwrap().unwrap();
/// assert_eq!(*first.events().unwrap()[0].payload(), 10);
/// assert_eq!(sub.next().await.unwrap(), Ok(Message::EndOfSnapshot { index: 1 }));
/// assert_eq!(sub.last_index(), Some(1));
/// # server.shutdown().await.unwrap();
/// # }
/// ```
pub struct Client<P, C> {
    inner: Arc<ClientInner<C>>,
    _payload: PhantomData<fn() -> P>,
}

impl<P, C> Clone for Client<P, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _payload: PhantomData,
        }
    }
}

impl<P, C> fmt::Debug for Client<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addresses", &self.inner.addresses)
            .finish_non_exhaustive()
    }
}

impl Client<(), super::BinaryCodec> {
    /// A builder for a client of the servers at `addresses` (URIs such as
    /// `http://10.0.0.1:7000`), tried in order and in turn on failure.
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn builder<I, S>(addresses: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            addresses: addresses.into_iter().map(Into::into).collect(),
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_message_size: DEFAULT_CLIENT_MAX_MESSAGE_SIZE,
            buffer: DEFAULT_SUBSCRIBER_BUFFER,
            keepalive_interval: DEFAULT_CLIENT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_CLIENT_KEEPALIVE_TIMEOUT,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            multiplex: true,
            #[cfg(feature = "net-tls")]
            tls: None,
        }
    }
}

impl<P, C> Client<P, C>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    /// The server addresses, in the order given.
    ///
    /// # Examples
    ///
    /// See [`ClientBuilder`].
    pub fn addresses(&self) -> &[String] {
        &self.inner.addresses
    }

    /// Subscribes remotely. Returns at once; the subscriber connects (and
    /// reconnects, resuming from the last index it saw) on a spawned task.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// See [`Client`].
    pub fn subscribe(&self, request: RemoteRequest) -> RemoteSubscriber<P> {
        let (tx, rx) = mpsc::channel(self.inner.buffer);
        let stats = Arc::new(SubscriberStats::default());
        let task = tokio::spawn(run(self.inner.clone(), request.clone(), tx, stats.clone()));
        RemoteSubscriber {
            rx,
            task: task.abort_handle(),
            stats,
            tracker: Tracker::new(request.index),
            terminated: false,
        }
    }
}

#[derive(Default)]
struct SubscriberStats {
    reconnects: AtomicU64,
    progress_marks: AtomicU64,
}

/// What the subscriber's task sends to its reader.
enum Item<P> {
    Message(Message<P>),
    Progress(u64),
    Failed(RemoteError),
}

/// Follows the messages yielded so far: the index a resume starts from.
#[derive(Debug, Clone, Copy)]
struct Tracker {
    last_index: Option<u64>,
    in_snapshot: bool,
    /// Snapshot events were yielded since the last reset point (start or
    /// `NewSnapshotToFollow`) without an `EndOfSnapshot`.
    dirty: bool,
}

impl Tracker {
    fn new(index: u64) -> Self {
        Self {
            last_index: (index > 0).then_some(index),
            in_snapshot: index == 0,
            dirty: false,
        }
    }

    fn observe<P>(&mut self, message: &Message<P>) {
        match message {
            Message::NewSnapshotToFollow => {
                self.last_index = None;
                self.in_snapshot = true;
                self.dirty = false;
            }
            Message::EndOfSnapshot { index } => {
                self.last_index = Some(*index);
                self.in_snapshot = false;
                self.dirty = false;
            }
            Message::Events(_) if self.in_snapshot => self.dirty = true,
            Message::Events(batch) => self.last_index = Some(batch.index()),
        }
    }

    fn progress(&mut self, index: u64) {
        if !self.in_snapshot && self.last_index.is_some_and(|i| index > i) {
            self.last_index = Some(index);
        }
    }
}

/// A remote subscription: a [`Stream`] of the same [`Message`]s a local
/// [`Subscription`](crate::publisher::Subscription) yields — snapshot,
/// `EndOfSnapshot`, live batches, `NewSnapshotToFollow` — across
/// disconnects.
///
/// # Reconnecting
///
/// When the connection breaks or the server shuts down (`UNAVAILABLE`), the
/// subscriber waits a jittered, doubling back-off and subscribes again at
/// the next address, from the last index it received: the server resumes
/// there or sends `NewSnapshotToFollow` and a fresh snapshot. A snapshot cut
/// short is restarted behind a `NewSnapshotToFollow` the subscriber adds
/// itself. Nothing is yielded twice, nothing skipped. Progress marks from
/// the server move the resume point without yielding anything.
///
/// # Ending
///
/// The stream yields one [`RemoteError`] and ends when retrying cannot help:
/// force-closed (drop the view, resubscribe from 0), lagged, unknown topic,
/// invalid request, permission denied, snapshot failure, decode failure.
/// Dropping it ends the remote stream.
///
/// # Examples
///
/// See [`Client`].
#[must_use = "streams do nothing unless polled"]
pub struct RemoteSubscriber<P> {
    rx: mpsc::Receiver<Item<P>>,
    task: AbortHandle,
    stats: Arc<SubscriberStats>,
    tracker: Tracker,
    terminated: bool,
}

impl<P> fmt::Debug for RemoteSubscriber<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSubscriber")
            .field("last_index", &self.tracker.last_index)
            .field("terminated", &self.terminated)
            .finish_non_exhaustive()
    }
}

impl<P> RemoteSubscriber<P> {
    /// The index the messages yielded so far make a complete view up to
    /// (as [`Subscription::last_index`](crate::publisher::Subscription::last_index)),
    /// moved on by progress marks.
    ///
    /// # Examples
    ///
    /// See [`Client`].
    pub fn last_index(&self) -> Option<u64> {
        self.tracker.last_index
    }

    /// How many times the subscriber reconnected.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::net::{Client, RemoteRequest};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let client = Client::builder(["http://127.0.0.1:1"]).build::<u64>().unwrap();
    /// let sub = client.subscribe(RemoteRequest::new("t", Subject::key("k")));
    /// assert_eq!(sub.reconnects(), 0);
    /// # }
    /// ```
    pub fn reconnects(&self) -> u64 {
        self.stats.reconnects.load(Ordering::Relaxed)
    }

    /// How many progress marks the subscriber received.
    ///
    /// # Examples
    ///
    /// See [`reconnects`](Self::reconnects).
    pub fn progress_marks(&self) -> u64 {
        self.stats.progress_marks.load(Ordering::Relaxed)
    }

    /// Waits for the next message.
    ///
    /// # Errors
    ///
    /// The [`RemoteError`] that ended the subscription; after it, every
    /// call returns [`RemoteError::Unsubscribed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future loses no message.
    ///
    /// # Examples
    ///
    /// See [`Client`].
    pub async fn recv(&mut self) -> Result<Message<P>, RemoteError> {
        match std::future::poll_fn(|cx| self.poll_item(cx)).await {
            Some(r) => r,
            None => Err(RemoteError::Unsubscribed),
        }
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message<P>, RemoteError>>> {
        if self.terminated {
            return Poll::Ready(None);
        }
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.terminated = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Item::Progress(i))) => self.tracker.progress(i),
                Poll::Ready(Some(Item::Message(m))) => {
                    self.tracker.observe(&m);
                    return Poll::Ready(Some(Ok(m)));
                }
                Poll::Ready(Some(Item::Failed(e))) => {
                    self.terminated = true;
                    self.task.abort();
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl<P> Stream for RemoteSubscriber<P> {
    type Item = Result<Message<P>, RemoteError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}

impl<P> FusedStream for RemoteSubscriber<P> {
    fn is_terminated(&self) -> bool {
        self.terminated
    }
}

impl<P> Drop for RemoteSubscriber<P> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A jittered delay: between half and all of `min * 2^attempt`, at most `max`.
fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let full = min
        .checked_mul(1u32 << attempt.min(20))
        .unwrap_or(max)
        .min(max);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(attempt);
    let unit = (h.finish() % 1_000_001) as f64 / 1_000_000.0;
    full.mul_f64(0.5 + 0.5 * unit)
}

/// One wire frame, decoded (its payloads too), before a subscription's
/// [`Decoder`] joins it to what came before: a shared item's frames are
/// decoded into these once for all its subscriptions.
enum Decoded<P> {
    Events { batch: EventBatch<P>, partial: bool },
    EndOfSnapshot(u64),
    NewSnapshotToFollow,
    Progress(u64),
}

impl<P: Send + Sync + 'static> Decoded<P> {
    fn new<C: PayloadCodec<P>>(
        codec: &C,
        topic: &Topic,
        frame: proto::Frame,
    ) -> Result<Self, RemoteError> {
        use proto::frame::Kind;
        Ok(match frame.kind {
            None => return Err(RemoteError::Decode("empty frame".into())),
            Some(Kind::EndOfSnapshot(index)) => Self::EndOfSnapshot(index),
            Some(Kind::NewSnapshotToFollow(_)) => Self::NewSnapshotToFollow,
            Some(Kind::Progress(index)) => Self::Progress(index),
            Some(Kind::Events(batch)) => {
                let mut events = Vec::with_capacity(batch.events.len());
                for e in batch.events {
                    if e.key.is_empty() {
                        return Err(RemoteError::Decode("event without a key".into()));
                    }
                    let payload = codec
                        .decode(e.payload)
                        .map_err(|err| RemoteError::Decode(err.to_string()))?;
                    events.push(Event::new(topic.clone(), e.key, e.index, payload));
                }
                Self::Events {
                    batch: EventBatch::new(events),
                    partial: batch.partial,
                }
            }
        })
    }
}

/// A shared item as its subscriptions' [`Decoder`]s read it: its frames
/// decoded for `topic` (the subscriptions of another topic decode it
/// themselves), or why it could not be.
struct SharedFrames<P> {
    topic: Topic,
    frames: Result<Vec<Decoded<P>>, SharedError>,
}

#[derive(Clone)]
enum SharedError {
    /// The item itself did not decode, or is not a response.
    Wire(String),
    /// A frame did not.
    Frame(RemoteError),
}

impl<P: Send + Sync + 'static> SharedFrames<P> {
    fn new<C: PayloadCodec<P>>(codec: &C, topic: &Topic, bytes: &bytes::Bytes) -> Self {
        use prost::Message as _;
        let frames = match proto::MuxItem::decode(bytes.clone()) {
            Err(e) => Err(SharedError::Wire(e.to_string())),
            Ok(proto::MuxItem { end: Some(_), .. }) => Err(SharedError::Wire(
                "a shared item ends a subscription".into(),
            )),
            Ok(item) => item
                .frames
                .into_iter()
                .map(|f| Decoded::new(codec, topic, f))
                .collect::<Result<_, _>>()
                .map_err(SharedError::Frame),
        };
        Self {
            topic: topic.clone(),
            frames,
        }
    }
}

/// Turns wire frames into messages, joining split batches.
struct Decoder<P> {
    partial: Vec<Event<P>>,
}

impl<P: Send + Sync + 'static> Decoder<P> {
    /// The message `frame` completes, if any.
    fn take(&mut self, frame: &Decoded<P>) -> Option<Item<P>> {
        match frame {
            Decoded::EndOfSnapshot(index) => {
                Some(Item::Message(Message::EndOfSnapshot { index: *index }))
            }
            Decoded::NewSnapshotToFollow => Some(Item::Message(Message::NewSnapshotToFollow)),
            Decoded::Progress(index) => Some(Item::Progress(*index)),
            Decoded::Events { batch, partial } => {
                if !partial && self.partial.is_empty() {
                    return Some(Item::Message(Message::Events(batch.clone())));
                }
                self.partial.extend(batch.iter().cloned());
                if *partial {
                    None
                } else {
                    let events = std::mem::take(&mut self.partial);
                    Some(Item::Message(Message::Events(EventBatch::new(events))))
                }
            }
        }
    }
}

impl<C> ClientInner<C> {
    /// Subscribes at address `at`: on its multiplexed call (started or
    /// restarted here) or with a `Subscribe` call of its own.
    async fn call(&self, at: usize, request: proto::SubscribeRequest) -> Result<Call, Status> {
        if self.multiplex && !self.no_mux[at].load(Ordering::Relaxed) {
            let mut slot = self.muxes[at].lock();
            if let Some(sub) = slot
                .as_ref()
                .filter(|c| !c.is_dead())
                .and_then(|c| c.open(request.clone(), self.credit))
            {
                return Ok(Call::Mux(sub));
            }
            let no_mux = self.no_mux[at].clone();
            let conn = MuxConn::start(
                self.channels[at].clone(),
                self.max_message_size,
                move || no_mux.store(true, Ordering::Relaxed),
            );
            *slot = Some(conn.clone());
            return match conn.open(request, self.credit) {
                Some(sub) => Ok(Call::Mux(sub)),
                None => Err(Status::unavailable("multiplexed stream failed at once")),
            };
        }
        let mut grpc = proto::subscriber_client::SubscriberClient::new(self.channels[at].clone())
            .max_decoding_message_size(self.max_message_size);
        let response = grpc.subscribe(request).await?;
        Ok(Call::Single(response.into_inner()))
    }
}

/// One attempt's responses: a `Subscribe` call's, or one subscription's on
/// a multiplexed call.
enum Call {
    Single(tonic::Streaming<proto::SubscribeResponse>),
    Mux(MuxSub),
}

impl Call {
    /// The next response's frames; `Ok(None)` when the call ended cleanly.
    async fn next(&mut self) -> Result<Option<MuxFrames>, Status> {
        match self {
            Call::Single(stream) => Ok(stream.message().await?.map(|r| MuxFrames::Own(r.frames))),
            Call::Mux(sub) => sub.next().await.map(Some),
        }
    }

    /// Ends the call over a response that did not decode (see
    /// [`MuxSub::undecodable`]); only a multiplexed call has shared items.
    fn undecodable(&mut self, why: &str) -> Status {
        match self {
            Call::Single(_) => Status::internal(format!("a response did not decode: {why}")),
            Call::Mux(sub) => sub.undecodable(why),
        }
    }
}

/// The frames of a shared item for a subscription of `topic`: decoded once
/// for every subscription of that topic (the first to ask decodes), or here
/// for this one alone when the item was decoded for another topic.
fn shared_frames<'a, P, C>(
    item: &'a SharedItem,
    codec: &C,
    topic: &Topic,
    own: &'a mut Option<SharedFrames<P>>,
) -> &'a Result<Vec<Decoded<P>>, SharedError>
where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    match item.decoded(|bytes| SharedFrames::new(codec, topic, bytes)) {
        Some(shared) if shared.topic == *topic => &shared.frames,
        _ => {
            &own.insert(SharedFrames::new(codec, topic, item.bytes()))
                .frames
        }
    }
}

/// The subscriber's task: subscribe, forward, reconnect and resume.
async fn run<P, C>(
    client: Arc<ClientInner<C>>,
    request: RemoteRequest,
    tx: mpsc::Sender<Item<P>>,
    stats: Arc<SubscriberStats>,
) where
    P: Send + Sync + 'static,
    C: PayloadCodec<P>,
{
    let mut tracker = Tracker::new(request.index);
    let mut attempt: u32 = 0;
    let mut first = true;
    loop {
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let pause =
                tokio::time::sleep(backoff(client.backoff_min, client.backoff_max, attempt));
            tokio::select! {
                biased;
                () = tx.closed() => return,
                () = pause => {}
            }
            attempt = attempt.saturating_add(1);
        }
        first = false;
        let n = client.channels.len();
        let at = client.preferred.load(Ordering::Relaxed) % n;
        let index = tracker.last_index.unwrap_or(0);
        let call = tokio::select! {
            biased;
            () = tx.closed() => return,
            call = client.call(at, wire(&request, index)) => call,
        };
        let failed = match call {
            Err(status) => Some(status),
            Ok(mut call) => {
                let mut decoder = Decoder {
                    partial: Vec::new(),
                };
                // The messages a response completes, in order (kept for
                // the next response's).
                let mut items: Vec<Item<P>> = Vec::new();
                // A snapshot cut short restarts at index 0 with no framing
                // from the server: tell the reader to drop what it got.
                if tracker.last_index.is_none() && tracker.dirty {
                    let m = Message::NewSnapshotToFollow;
                    tracker.observe(&m);
                    if tx.send(Item::Message(m)).await.is_err() {
                        return;
                    }
                }
                loop {
                    // The reader may go away while nothing arrives (a quiet
                    // key): end then, so the server drops the subscription
                    // now rather than at the next message for it.
                    // The next response first: while responses come, the
                    // reader's close is seen by `send` and the close
                    // future is never polled (polling it registers a
                    // waiter on the channel each time).
                    let next = tokio::select! {
                        biased;
                        next = call.next() => next,
                        () = tx.closed() => return,
                    };
                    match next {
                        Ok(Some(MuxFrames::Own(frames))) => {
                            for frame in frames {
                                match Decoded::new(&client.codec, &request.topic, frame) {
                                    Ok(d) => items.extend(decoder.take(&d)),
                                    Err(e) => {
                                        items.push(Item::Failed(e));
                                        break;
                                    }
                                }
                            }
                        }
                        Ok(Some(MuxFrames::Shared(item))) => {
                            let mut own = None;
                            match shared_frames(&item, &client.codec, &request.topic, &mut own) {
                                Ok(frames) => {
                                    items.extend(frames.iter().filter_map(|d| decoder.take(d)))
                                }
                                Err(SharedError::Frame(e)) => items.push(Item::Failed(e.clone())),
                                Err(SharedError::Wire(why)) => break Some(call.undecodable(why)),
                            }
                        }
                        Ok(None) => break None,
                        Err(status) => break Some(status),
                    }
                    attempt = 0;
                    for item in items.drain(..) {
                        match &item {
                            Item::Message(m) => tracker.observe(m),
                            Item::Progress(i) => {
                                stats.progress_marks.fetch_add(1, Ordering::Relaxed);
                                tracker.progress(*i);
                            }
                            Item::Failed(_) => {
                                let _ = tx.send(item).await;
                                return;
                            }
                        }
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        if let Some(status) = &failed {
            if status.code() == tonic::Code::Unimplemented
                && client.multiplex
                && client.no_mux[at].load(Ordering::Relaxed)
            {
                // That server has no `Multiplex`: at once, with `Subscribe`.
                first = true;
                continue;
            }
            if let Err(e) = RemoteError::from_status(status) {
                let _ = tx.send(Item::Failed(e)).await;
                return;
            }
            tracing::debug!(address = %client.addresses[at], code = ?status.code(), "remote subscription broke; reconnecting");
        }
        // Move this and later subscriptions on to the next address.
        let _ = client.preferred.compare_exchange(
            at,
            (at + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempt in 0..40 {
            let d = backoff(min, max, attempt);
            let full = (min * (1u32 << attempt.min(20))).min(max);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
    }

    #[test]
    fn tracker_follows_framing() {
        let mut t = Tracker::new(0);
        let ev = |i| Message::Events(EventBatch::new(vec![Event::new("t", "k", i, ())]));
        t.observe(&ev(3));
        assert_eq!(t.last_index, None);
        assert!(t.dirty);
        t.observe(&Message::<()>::EndOfSnapshot { index: 3 });
        assert_eq!(t.last_index, Some(3));
        t.observe(&ev(4));
        assert_eq!(t.last_index, Some(4));
        t.progress(9);
        assert_eq!(t.last_index, Some(9));
        t.progress(2);
        assert_eq!(t.last_index, Some(9));
        t.observe(&Message::<()>::NewSnapshotToFollow);
        assert_eq!(t.last_index, None);
        t.progress(20);
        assert_eq!(t.last_index, None);
    }
}
