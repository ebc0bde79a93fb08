//! A node: a follower applying the log to a node-local state and publishing
//! it into the node's own [`Publisher`].

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use tokio::sync::{watch, RwLock};
use tokio::task::JoinHandle;

use super::checkpoint::{self, Checkpoint};
use super::error::{NatsError, NodeSubscribeError, StartError};
use super::state::NodeState;
use super::subject::parse_subject;
use super::Log;
use crate::codec::PayloadCodec;
use crate::event::{Event, Subject, Topic};
use crate::publisher::{
    Publisher, PublisherBuilder, SnapshotRequest, SnapshotSink, SubscribeRequest, Subscription,
};

/// Default bound on a read-your-index wait: 3 seconds, as the Kubernetes
/// API server's watch cache waits for a resource version it has not seen.
pub const DEFAULT_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(3);

/// Default checkpoint cadence: at the latest every 1,000 applied messages
/// (and whenever the follower has caught up with the stream).
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1_000;

/// Default lifetime of one pull request of the follower's consumer: 5 s.
/// Its idle heartbeat is half that, and the consumer is recreated after two
/// missed heartbeats, so a node notices within seconds that the server
/// holding its consumer died (async-nats' own default, 30 s, takes about a
/// minute).
pub const DEFAULT_CONSUMER_EXPIRY: Duration = Duration::from_secs(5);

/// First back-off after a consumer error: 50 ms, doubling to 5 s.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Builds a [`Node`]: the topics it serves, where it keeps its checkpoint,
/// how long a read-your-index waits, the publisher's options.
///
/// | option | default |
/// |---|---|
/// | [`topic`](Self::topic) / [`wildcard_topic`](Self::wildcard_topic) | none (a node serves the topics it is given) |
/// | [`checkpoint`](Self::checkpoint) | none: the node rebuilds its state from the log each time it starts |
/// | [`checkpoint_every`](Self::checkpoint_every) | [`DEFAULT_CHECKPOINT_EVERY`] messages, and whenever caught up |
/// | [`catch_up_timeout`](Self::catch_up_timeout) | [`DEFAULT_CATCH_UP_TIMEOUT`] (3 s) |
/// | [`consumer_expiry`](Self::consumer_expiry) | [`DEFAULT_CONSUMER_EXPIRY`] (5 s) |
/// | [`snapshot_cache_ttl`](Self::snapshot_cache_ttl), [`lag_limit`](Self::lag_limit) | as [`PublisherBuilder`] |
///
/// # Examples
///
/// ```no_run
/// # #![allow(dead_code)]
/// use std::time::Duration;
/// use snapstream::cluster::{JsonCodec, Log, LogConfig, Node, NodeState};
/// use snapstream::event::{Event, Subject, Topic};
///
/// #[derive(Default)]
/// struct Nothing;
/// impl NodeState<String> for Nothing {
///     fn apply(&mut self, _: &Event<String>) {}
///     fn snapshot(&self, _: &Topic, _: &Subject) -> Vec<Event<String>> { Vec::new() }
///     fn reset(&mut self) {}
/// }
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("127.0.0.1:4222").await?;
/// let log = Log::open(client, &LogConfig::new("STATE", "state")).await?;
/// let mut builder = Node::builder(&log, Nothing, JsonCodec);
/// builder
///     .wildcard_topic("services")
///     .checkpoint("/var/lib/app/node.checkpoint")
///     .catch_up_timeout(Duration::from_secs(1));
/// let node = builder.start().await?;
/// # drop(node); Ok(()) }
/// ```
pub struct NodeBuilder<P, S> {
    log: Log,
    state: S,
    codec: Arc<dyn PayloadCodec<P>>,
    topics: Vec<(Topic, bool)>,
    checkpoint: Option<PathBuf>,
    checkpoint_every: u64,
    catch_up_timeout: Duration,
    consumer_expiry: Duration,
    publisher: PublisherBuilder<P>,
}

impl<P, S> std::fmt::Debug for NodeBuilder<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("stream", &self.log.stream)
            .field("topics", &self.topics)
            .field("checkpoint", &self.checkpoint)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("catch_up_timeout", &self.catch_up_timeout)
            .finish_non_exhaustive()
    }
}

impl<P: Send + Sync + 'static, S: NodeState<P>> NodeBuilder<P, S> {
    /// Serves `topic` (no wildcard subscriptions).
    ///
    /// # Examples
    ///
    /// See [`NodeBuilder`].
    pub fn topic(&mut self, topic: impl Into<Topic>) -> &mut Self {
        self.topics.push((topic.into(), false));
        self
    }

    /// Serves `topic` with wildcard subscriptions (every key of the topic);
    /// [`NodeState::snapshot`] is then also asked for [`Subject::Wildcard`].
    ///
    /// # Examples
    ///
    /// See [`NodeBuilder`].
    pub fn wildcard_topic(&mut self, topic: impl Into<Topic>) -> &mut Self {
        self.topics.push((topic.into(), true));
        self
    }

    /// Keeps the last applied sequence in the file at `path`, so that a
    /// restart resumes from it instead of rebuilding. Only for a state that
    /// survives the restart (see [`NodeState::persist`]).
    ///
    /// # Examples
    ///
    /// See [`NodeBuilder`].
    pub fn checkpoint(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.checkpoint = Some(path.into());
        self
    }

    /// Writes the checkpoint at the latest every `messages` applied messages
    /// (`0` is treated as 1), and whenever the follower has caught up.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # fn f(b: &mut snapstream::cluster::NodeBuilder<String, Box<dyn snapstream::cluster::NodeState<String>>>) {
    /// b.checkpoint("/tmp/n.cp").checkpoint_every(100);
    /// # }
    /// ```
    pub fn checkpoint_every(&mut self, messages: u64) -> &mut Self {
        self.checkpoint_every = messages.max(1);
        self
    }

    /// Bounds how long [`Node::subscribe`] waits for the node to apply a
    /// requested index it has not reached yet.
    ///
    /// # Examples
    ///
    /// See [`NodeBuilder`].
    pub fn catch_up_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.catch_up_timeout = timeout;
        self
    }

    /// Sets how long one pull request of the follower's consumer lasts
    /// (at least 1 s): the consumer's idle heartbeat is half of it, and two
    /// missed heartbeats make it recreate the consumer on a live server.
    /// It is also the follower's watchdog: after an expiry with no message,
    /// the follower asks the stream for its last sequence, and when the
    /// stream is ahead it replaces the consumer itself (counted in
    /// [`NodeStats::consumer_restarts`]) rather than wait for the client's
    /// own recreation, whose back-off after a JetStream leader change
    /// reaches 10 s a try. Shorter notices a dead server sooner, at the
    /// cost of a pull request and a stream-info request per expiry while
    /// the log is idle.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # fn f(b: &mut snapstream::cluster::NodeBuilder<String, Box<dyn snapstream::cluster::NodeState<String>>>) {
    /// b.consumer_expiry(std::time::Duration::from_secs(2));
    /// # }
    /// ```
    pub fn consumer_expiry(&mut self, expiry: Duration) -> &mut Self {
        self.consumer_expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// See [`PublisherBuilder::snapshot_cache_ttl`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # fn f(b: &mut snapstream::cluster::NodeBuilder<String, Box<dyn snapstream::cluster::NodeState<String>>>) {
    /// b.snapshot_cache_ttl(std::time::Duration::ZERO);
    /// # }
    /// ```
    pub fn snapshot_cache_ttl(&mut self, ttl: Duration) -> &mut Self {
        self.publisher.snapshot_cache_ttl(ttl);
        self
    }

    /// See [`PublisherBuilder::lag_limit`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # fn f(b: &mut snapstream::cluster::NodeBuilder<String, Box<dyn snapstream::cluster::NodeState<String>>>) {
    /// b.lag_limit(Some(10_000));
    /// # }
    /// ```
    pub fn lag_limit(&mut self, limit: Option<u64>) -> &mut Self {
        self.publisher.lag_limit(limit);
        self
    }

    /// Starts the node: reads the checkpoint (if any), then follows the log
    /// on a spawned task — from the checkpoint, or after rebuilding the state
    /// from the whole log. Returns without waiting for the follower to catch
    /// up: subscribers asking for an index the node has not applied yet wait
    /// for it ([`Node::subscribe`]).
    ///
    /// A checkpoint of another stream, of an earlier stream of the same name
    /// (deleted and recreated), or ahead of the stream's last sequence is
    /// ignored with a warning, and the state rebuilt.
    ///
    /// # Errors
    ///
    /// [`StartError::Register`] for an empty or duplicate topic,
    /// [`StartError::Checkpoint`] when the checkpoint file exists but cannot
    /// be read, [`StartError::Nats`] when the stream cannot be looked up.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is spawned before the last await.
    ///
    /// # Examples
    ///
    /// See [`NodeBuilder`].
    pub async fn start(self) -> Result<Node<P, S>, StartError> {
        let NodeBuilder {
            log,
            state,
            codec,
            topics,
            checkpoint,
            checkpoint_every,
            catch_up_timeout,
            consumer_expiry,
            mut publisher,
        } = self;
        let (applied_tx, _) = watch::channel(0);
        let core = Arc::new(Core {
            state: RwLock::new(Locked { state, applied: 0 }),
            applied: applied_tx,
        });
        for (topic, wildcard) in &topics {
            let handler = snapshot_handler::<P, S>(core.clone());
            if *wildcard {
                publisher.register_with_wildcard(topic.clone(), handler)?;
            } else {
                publisher.register(topic.clone(), handler)?;
            }
        }
        let publisher = publisher.build();

        let stream = log
            .js
            .get_stream(&*log.stream)
            .await
            .map_err(|e| StartError::Nats(Box::new(e)))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| StartError::Nats(Box::new(e)))?;
        let created_ns = info.created.unix_timestamp_nanos();
        let mut mode = Mode::Rebuild { refresh: false };
        let mut applied = 0;
        if let Some(path) = &checkpoint {
            match checkpoint::read(path)? {
                None => {
                    tracing::info!(path = %path.display(), "no checkpoint: rebuilding from the log")
                }
                Some(cp) if cp.stream != *log.stream || cp.stream_created_ns != created_ns => {
                    tracing::warn!(path = %path.display(), stream = %cp.stream,
                        "checkpoint of another stream: rebuilding from the log");
                }
                Some(cp) if cp.applied > info.state.last_sequence => {
                    tracing::warn!(path = %path.display(), applied = cp.applied,
                        last = info.state.last_sequence,
                        "checkpoint ahead of the stream: rebuilding from the log");
                }
                Some(cp) => {
                    applied = cp.applied;
                    mode = Mode::Follow {
                        from: cp.applied + 1,
                    };
                }
            }
        }
        if applied > 0 {
            core.state.write().await.applied = applied;
            core.applied.send_replace(applied);
        }
        let stats = Arc::new(Counters::default());
        stats.applied.store(applied, Ordering::Relaxed);
        let (stop_tx, stop_rx) = watch::channel(false);
        let follower = Follower {
            core: core.clone(),
            publisher: publisher.clone(),
            codec,
            stream,
            stream_name: log.stream.to_string(),
            stream_created_ns: created_ns,
            compacted: super::is_compacted(&info.config),
            prefix: log.prefix.to_string(),
            topics: topics.iter().map(|(t, _)| t.clone()).collect(),
            checkpoint,
            checkpoint_every,
            consumer_expiry,
            stats: stats.clone(),
            stop: stop_rx,
            applied,
            checkpointed: applied,
            since_checkpoint: 0,
            live: None,
        };
        let task = tokio::spawn(follower.run(mode));
        Ok(Node {
            core,
            publisher,
            stats,
            stop: stop_tx,
            task: Some(task),
            catch_up_timeout,
        })
    }
}

/// One node of a cluster: a follower applies the log, in stream order, to the
/// node-local state and publishes every change into the node's
/// [`Publisher`] with its stream sequence as the index; the publisher's
/// snapshot handlers read that state.
///
/// Dropping the node aborts the follower at once, like a crash: no final
/// checkpoint (the next start resumes from the last one written). Use
/// [`shutdown`](Self::shutdown) to stop it cleanly.
///
/// See the [module documentation](super) for the semantics.
///
/// # Examples
///
/// See [`NodeBuilder`].
pub struct Node<P, S> {
    core: Arc<Core<S>>,
    publisher: Publisher<P>,
    stats: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    catch_up_timeout: Duration,
}

impl<P, S> std::fmt::Debug for Node<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("applied", &*self.core.applied.borrow())
            .finish_non_exhaustive()
    }
}

impl<P, S> Drop for Node<P, S> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<P: Send + Sync + 'static, S: NodeState<P>> Node<P, S> {
    /// A builder for a node following `log`, applying it to `state`, decoding
    /// payloads with `codec`.
    ///
    /// # Examples
    ///
    /// See [`NodeBuilder`].
    pub fn builder(log: &Log, state: S, codec: impl PayloadCodec<P>) -> NodeBuilder<P, S> {
        NodeBuilder {
            log: log.clone(),
            state,
            codec: Arc::new(codec),
            topics: Vec::new(),
            checkpoint: None,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            catch_up_timeout: DEFAULT_CATCH_UP_TIMEOUT,
            consumer_expiry: DEFAULT_CONSUMER_EXPIRY,
            publisher: Publisher::builder(),
        }
    }

    /// The node's publisher (to subscribe directly, or to serve over the
    /// network). A subscription made on it directly does not wait for a
    /// requested index; [`subscribe`](Self::subscribe) does.
    ///
    /// # Examples
    ///
    /// See [`Node::subscribe`].
    pub fn publisher(&self) -> &Publisher<P> {
        &self.publisher
    }

    /// A receiver of the applied sequence (read-your-index waits on it).
    #[cfg(feature = "net")]
    pub(super) fn applied_watch(&self) -> watch::Receiver<u64> {
        self.core.applied.subscribe()
    }

    /// The bound of a read-your-index wait.
    #[cfg(feature = "net")]
    pub(super) fn catch_up_timeout_value(&self) -> Duration {
        self.catch_up_timeout
    }

    /// The newest stream sequence this node has applied and published.
    ///
    /// # Examples
    ///
    /// See [`Node::subscribe`].
    pub fn applied(&self) -> u64 {
        *self.core.applied.borrow()
    }

    /// Waits until this node has applied `index`, at most `timeout`; returns
    /// the applied index then.
    ///
    /// # Errors
    ///
    /// [`NodeSubscribeError::NotCaughtUp`] past the timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// # Examples
    ///
    /// See [`Node::subscribe`].
    pub async fn wait_for_index(
        &self,
        index: u64,
        timeout: Duration,
    ) -> Result<u64, NodeSubscribeError> {
        let mut rx = self.core.applied.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(|&a| a >= index).await.map(|a| *a)
        })
        .await;
        match waited {
            Ok(Ok(applied)) => Ok(applied),
            Ok(Err(_)) => Err(NodeSubscribeError::Stopped),
            Err(_) => Err(NodeSubscribeError::NotCaughtUp {
                requested: index,
                applied: *rx.borrow(),
                waited: timeout,
            }),
        }
    }

    /// Subscribes with read-your-index: when the request resumes from an
    /// index this node has not applied yet, waits (at most the builder's
    /// [`catch_up_timeout`](NodeBuilder::catch_up_timeout)) until it has, then
    /// subscribes on the node's publisher. Never serves older state than the
    /// requested index.
    ///
    /// # Errors
    ///
    /// [`NodeSubscribeError::NotCaughtUp`] when the node did not catch up in
    /// time, [`NodeSubscribeError::Subscribe`] when the publisher refused.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is subscribed before the wait ends.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// use snapstream::event::Subject;
    /// use snapstream::publisher::SubscribeRequest;
    /// # use snapstream::cluster::{Node, NodeState};
    ///
    /// # async fn f<S: NodeState<String>>(node: Node<String, S>) {
    /// // A client that saw index 42 on another node resumes here.
    /// let request = SubscribeRequest::new("services", Subject::key("web")).index(42);
    /// let sub = node.subscribe(request).await.unwrap();
    /// assert!(node.applied() >= 42);
    /// # drop(sub); }
    /// ```
    pub async fn subscribe(
        &self,
        request: SubscribeRequest,
    ) -> Result<Subscription<P>, NodeSubscribeError> {
        self.subscribe_within(request, self.catch_up_timeout).await
    }

    /// As [`subscribe`](Self::subscribe), with its own bound on the wait.
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Self::subscribe).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// use std::time::Duration;
    /// use snapstream::cluster::NodeSubscribeError;
    /// use snapstream::event::Subject;
    /// use snapstream::publisher::SubscribeRequest;
    /// # use snapstream::cluster::{Node, NodeState};
    ///
    /// # async fn f<S: NodeState<String>>(node: Node<String, S>) {
    /// let request = SubscribeRequest::new("services", Subject::key("web")).index(u64::MAX);
    /// let err = node.subscribe_within(request, Duration::from_millis(10)).await.unwrap_err();
    /// assert!(matches!(err, NodeSubscribeError::NotCaughtUp { .. }));
    /// # }
    /// ```
    pub async fn subscribe_within(
        &self,
        request: SubscribeRequest,
        wait: Duration,
    ) -> Result<Subscription<P>, NodeSubscribeError> {
        let index = request.requested_index();
        if self.applied() < index {
            self.wait_for_index(index, wait).await?;
        }
        Ok(self.publisher.subscribe(request)?)
    }

    /// Reads the node-local state with the sequence it reflects (waits while
    /// a rebuild holds it).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # use snapstream::cluster::{Node, NodeState};
    /// # async fn f<S: NodeState<String>>(node: Node<String, S>) {
    /// let (applied, keys) = node
    ///     .read(|state, applied| (applied, state.snapshot(&"services".into(), &snapstream::event::Subject::Wildcard).len()))
    ///     .await;
    /// # let _ = (applied, keys); }
    /// ```
    pub async fn read<R>(&self, f: impl FnOnce(&S, u64) -> R) -> R {
        let locked = self.core.state.read().await;
        f(&locked.state, locked.applied)
    }

    /// The follower's counters.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # use snapstream::cluster::{Node, NodeState};
    /// # fn f<S: NodeState<String>>(node: Node<String, S>) {
    /// let stats = node.stats();
    /// assert_eq!(stats.quarantined, 0);
    /// # }
    /// ```
    pub fn stats(&self) -> NodeStats {
        self.stats.snapshot()
    }

    /// Stops the follower cleanly (it writes a last checkpoint, if it has
    /// one and is not in the middle of a rebuild) and shuts the publisher
    /// down: every subscription ends with
    /// [`SubscriptionError::ShuttingDown`](crate::publisher::SubscriptionError::ShuttingDown).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a dropped call aborts the follower, as dropping the
    /// node does.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # use snapstream::cluster::{Node, NodeState};
    /// # async fn f<S: NodeState<String>>(node: Node<String, S>) {
    /// node.shutdown().await;
    /// # }
    /// ```
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "follower task failed");
            }
        }
        self.publisher.shutdown();
    }
}

/// The follower's counters, as [`Node::stats`] reads them.
///
/// # Examples
///
/// ```
/// let s = snapstream::cluster::NodeStats::default();
/// assert_eq!((s.applied, s.rebuilds, s.last_quarantined), (0, 0, None));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// The newest stream sequence applied.
    pub applied: u64,
    /// Changes published into the node's publisher.
    pub published: u64,
    /// Messages that did not decode (subject or payload) and were set aside,
    /// each with a logged error.
    pub quarantined: u64,
    /// The stream sequence of the newest quarantined message.
    pub last_quarantined: Option<u64>,
    /// Messages of topics this node does not serve (not applied).
    pub skipped: u64,
    /// Sequence gaps detected (each triggers a rebuild; never on a
    /// [compacted](super::LogConfig::compacted) log).
    pub gaps: u64,
    /// Sequences passed over while following a compacted log: changes
    /// superseded by a newer one of their key before this node read them.
    pub compacted: u64,
    /// Rebuilds of the state from the whole log (at start without a usable
    /// checkpoint, and after each gap).
    pub rebuilds: u64,
    /// Times the consumer failed and was recreated.
    pub consumer_restarts: u64,
    /// Changes the publisher refused (a bug or a recreated stream; logged).
    pub publish_errors: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Checkpoints that failed (persist or write; logged).
    pub checkpoint_errors: u64,
}

#[derive(Default)]
struct Counters {
    applied: AtomicU64,
    published: AtomicU64,
    quarantined: AtomicU64,
    last_quarantined: AtomicU64,
    skipped: AtomicU64,
    gaps: AtomicU64,
    compacted: AtomicU64,
    rebuilds: AtomicU64,
    consumer_restarts: AtomicU64,
    publish_errors: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> NodeStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            applied: l(&self.applied),
            published: l(&self.published),
            quarantined: l(&self.quarantined),
            last_quarantined: Some(l(&self.last_quarantined)).filter(|&s| s > 0),
            skipped: l(&self.skipped),
            gaps: l(&self.gaps),
            compacted: l(&self.compacted),
            rebuilds: l(&self.rebuilds),
            consumer_restarts: l(&self.consumer_restarts),
            publish_errors: l(&self.publish_errors),
            checkpoints: l(&self.checkpoints),
            checkpoint_errors: l(&self.checkpoint_errors),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The state and the sequence it reflects, under one lock.
struct Locked<S> {
    state: S,
    applied: u64,
}

/// What the follower and the snapshot handlers share (not the publisher:
/// the handlers live inside it).
struct Core<S> {
    state: RwLock<Locked<S>>,
    /// The newest sequence applied *and published*; read-your-index waits on it.
    applied: watch::Sender<u64>,
}

fn snapshot_handler<P: Send + Sync + 'static, S: NodeState<P>>(
    core: Arc<Core<S>>,
) -> impl Fn(
    SnapshotRequest,
    SnapshotSink<P>,
) -> futures::future::BoxFuture<'static, Result<u64, crate::publisher::BoxError>>
       + Send
       + Sync
       + 'static {
    move |request: SnapshotRequest, mut sink: SnapshotSink<P>| {
        let core = core.clone();
        Box::pin(async move {
            // Stream sequences start at 1 and the publisher reports an empty
            // snapshot at index 0 as index 1, which would swallow the change
            // at sequence 1: wait for the first change instead.
            let mut rx = core.applied.subscribe();
            rx.wait_for(|&a| a >= 1).await.map_err(|_| "node stopped")?;
            drop(rx);
            let locked = core.state.read().await;
            let events = locked.state.snapshot(request.topic(), request.subject());
            let index = locked.applied;
            drop(locked);
            sink.append(events)?;
            Ok(index)
        })
    }
}

/// What the follower does next.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Empty the state and replay the whole log; `refresh` force-closes the
    /// publisher's subscriptions afterwards (they missed changes).
    Rebuild { refresh: bool },
    /// Apply and publish from this sequence on.
    Follow { from: u64 },
}

enum Next {
    Mode(Mode),
    Stop,
}

struct Follower<P, S> {
    core: Arc<Core<S>>,
    publisher: Publisher<P>,
    codec: Arc<dyn PayloadCodec<P>>,
    stream: jetstream::stream::Stream,
    stream_name: String,
    stream_created_ns: i128,
    /// The stream keeps a limited number of messages per key: holes in the
    /// sequence are compaction, not gaps.
    compacted: bool,
    prefix: String,
    topics: HashSet<Topic>,
    checkpoint: Option<PathBuf>,
    checkpoint_every: u64,
    consumer_expiry: Duration,
    stats: Arc<Counters>,
    stop: watch::Receiver<bool>,
    /// The newest sequence applied (the follower's copy of `Locked::applied`).
    applied: u64,
    /// The sequence of the last checkpoint written.
    checkpointed: u64,
    since_checkpoint: u64,
    /// The rebuild's consumer, handed on to [`follow`](Self::follow).
    live: Option<jetstream::consumer::pull::Ordered>,
}

impl<P: Send + Sync + 'static, S: NodeState<P>> Follower<P, S> {
    async fn run(mut self, mut mode: Mode) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let result = match mode {
                Mode::Rebuild { refresh } => self.rebuild(refresh).await,
                Mode::Follow { from } => self.follow(from).await,
            };
            match result {
                Ok(Next::Mode(next)) => {
                    mode = next;
                    backoff = MIN_BACKOFF;
                }
                Ok(Next::Stop) => {
                    if matches!(mode, Mode::Follow { .. }) {
                        self.checkpoint_now().await;
                    }
                    return;
                }
                Err(e) => {
                    Counters::bump(&self.stats.consumer_restarts);
                    tracing::warn!(error = %e, retry_in = ?backoff, "log consumer failed; recreating it");
                    if let Mode::Follow { .. } = mode {
                        mode = Mode::Follow {
                            from: self.applied + 1,
                        };
                    }
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = stop.wait_for(|&s| s) => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn ordered(&self, from: Option<u64>) -> OrderedConfig {
        OrderedConfig {
            deliver_policy: match from {
                Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
                None => DeliverPolicy::All,
            },
            max_expires: self.consumer_expiry,
            ..Default::default()
        }
    }

    /// The message after `after`, or `None` when the node is stopping.
    ///
    /// A watchdog as well: when nothing comes for `expiry` while
    /// the stream holds sequences past `after`, the consumer is stalled —
    /// after a JetStream leader change an ordered consumer may take tens of
    /// seconds to recreate itself (its own back-off reaches 10 s a try) —
    /// and the follower replaces it now (an error: the caller recreates the
    /// consumer from `after + 1`, counted in `consumer_restarts`). A stream
    /// that cannot be asked (no leader yet) is asked again at the next tick.
    async fn next_message(
        stream: &jetstream::stream::Stream,
        expiry: Duration,
        stop: &mut watch::Receiver<bool>,
        messages: &mut jetstream::consumer::pull::Ordered,
        after: u64,
    ) -> Option<Result<jetstream::Message, NatsError>> {
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|&s| s) => return None,
                m = messages.next() => return Some(match m {
                    Some(Ok(m)) => Ok(m),
                    Some(Err(e)) => Err(Box::new(e) as NatsError),
                    None => Err("log consumer ended".into()),
                }),
                () = tokio::time::sleep(expiry) => {}
            }
            match stream.get_info().await {
                Ok(info) if info.state.last_sequence > after => {
                    return Some(Err(format!(
                        "log consumer stalled: nothing after {after} for {:?} while the stream is at {}",
                        expiry, info.state.last_sequence
                    )
                    .into()));
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "stream info for the consumer watchdog"),
            }
        }
    }

    /// Empties the state and replays the log as it stands, holes and all;
    /// snapshots wait meanwhile (they need the state's read lock).
    async fn rebuild(&mut self, refresh: bool) -> Result<Next, NatsError> {
        let info = self.stream.get_info().await?;
        let target = info.state.last_sequence;
        let mut locked = self.core.state.write().await;
        // A crash from here until the rebuilt state is persisted must not
        // resume from the old checkpoint over a half-rebuilt state.
        if let Some(path) = &self.checkpoint {
            match std::fs::remove_file(path) {
                Ok(()) => self.checkpointed = 0,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.checkpointed = 0,
                Err(e) => return Err(Box::new(e)),
            }
        }
        locked.state.reset();
        let mut last = 0;
        if info.state.messages > 0 {
            let consumer = self.stream.create_consumer(self.ordered(None)).await?;
            let mut messages = consumer.messages().await?;
            let mut stop = self.stop.clone();
            loop {
                let next = Self::next_message(
                    &self.stream,
                    self.consumer_expiry,
                    &mut stop,
                    &mut messages,
                    last,
                );
                let Some(msg) = next.await else {
                    return Ok(Next::Stop);
                };
                let msg = msg?;
                let (seq, pending) = {
                    let info = msg.info()?;
                    (info.stream_sequence, info.pending)
                };
                if let Some(event) = self.decode(&msg, seq) {
                    locked.state.apply(&event);
                }
                last = seq;
                if pending == 0 || seq >= target {
                    break;
                }
            }
            // The replay's consumer goes on delivering what follows `last`:
            // the follower keeps it rather than deleting it and creating
            // another (a node holds one consumer, and each recreation costs
            // JetStream two API calls and leaves the node without one
            // meanwhile).
            self.live = Some(messages);
        }
        // Sequences up to `target` that were not delivered are not in the log.
        let applied = last.max(target).max(self.applied);
        locked.applied = applied;
        self.applied = applied;
        if refresh {
            // Subscribers' views missed the changes of the gap: they must
            // re-subscribe, and get a snapshot of the rebuilt state. Done
            // under the lock and before `applied` is announced, so that a
            // subscription made once the rebuilt state is readable (e.g.
            // after `wait_for_index`) is not closed with the stale ones.
            for topic in &self.topics {
                if let Err(e) = self.publisher.refresh_topic(topic.clone()) {
                    tracing::error!(error = %e, "refresh after rebuild");
                }
            }
        }
        drop(locked);
        Counters::bump(&self.stats.rebuilds);
        self.stats.applied.store(applied, Ordering::Relaxed);
        self.core.applied.send_replace(applied);
        tracing::info!(applied, target, "state rebuilt from the log");
        self.since_checkpoint = 0;
        self.checkpoint_now().await;
        Ok(Next::Mode(Mode::Follow { from: applied + 1 }))
    }

    /// Applies and publishes from `from` on, until a gap, an error or stop.
    async fn follow(&mut self, from: u64) -> Result<Next, NatsError> {
        let mut messages = match self.live.take() {
            // The rebuild's consumer, positioned right after the sequence the
            // rebuild applied (`from - 1`, or before a hole up to it).
            Some(messages) => messages,
            None => {
                self.stream
                    .create_consumer(self.ordered(Some(from)))
                    .await?
                    .messages()
                    .await?
            }
        };
        let mut stop = self.stop.clone();
        loop {
            let next = Self::next_message(
                &self.stream,
                self.consumer_expiry,
                &mut stop,
                &mut messages,
                self.applied,
            );
            let Some(msg) = next.await else {
                return Ok(Next::Stop);
            };
            let msg = msg?;
            let (seq, pending) = {
                let info = msg.info()?;
                (info.stream_sequence, info.pending)
            };
            let expected = self.applied + 1;
            if seq < expected {
                // An ordered consumer recreated before its first message
                // starts again from the stream's first message.
                tracing::debug!(seq, expected, "message already applied; skipped");
                continue;
            }
            if seq > expected && self.compacted {
                // Superseded by newer changes of their keys, which follow.
                self.stats
                    .compacted
                    .fetch_add(seq - expected, Ordering::Relaxed);
            } else if seq > expected {
                Counters::bump(&self.stats.gaps);
                tracing::error!(
                    expected,
                    got = seq,
                    "sequence gap in the log: changes are missing; rebuilding the state"
                );
                return Ok(Next::Mode(Mode::Rebuild { refresh: true }));
            }
            let event = self.decode(&msg, seq);
            {
                let mut locked = self.core.state.write().await;
                if let Some(event) = &event {
                    locked.state.apply(event);
                }
                locked.applied = seq;
            }
            self.applied = seq;
            if let Some(event) = event {
                match self.publisher.publish(vec![event]) {
                    Ok(()) => Counters::bump(&self.stats.published),
                    Err(e) => {
                        Counters::bump(&self.stats.publish_errors);
                        tracing::error!(seq, error = %e, "publisher refused a change");
                    }
                }
            }
            self.stats.applied.store(seq, Ordering::Relaxed);
            self.core.applied.send_replace(seq);
            self.since_checkpoint += 1;
            if pending == 0 || self.since_checkpoint >= self.checkpoint_every {
                self.checkpoint_now().await;
            }
        }
    }

    /// The event of a log message, or `None` (counted and logged) when it
    /// does not decode or names a topic this node does not serve.
    fn decode(&self, msg: &jetstream::Message, seq: u64) -> Option<Event<P>> {
        let (topic, key) = match parse_subject(&self.prefix, &msg.subject) {
            Ok(tk) => tk,
            Err(e) => {
                self.quarantine(seq, &e);
                return None;
            }
        };
        let topic = Topic::from(topic);
        if !self.topics.contains(&topic) {
            Counters::bump(&self.stats.skipped);
            tracing::debug!(seq, %topic, "change of a topic this node does not serve");
            return None;
        }
        match self.codec.decode(msg.payload.clone()) {
            Ok(payload) => Some(Event::new(topic, Subject::key(key), seq, payload)),
            Err(e) => {
                self.quarantine(seq, &e);
                None
            }
        }
    }

    fn quarantine(&self, seq: u64, error: &dyn std::error::Error) {
        Counters::bump(&self.stats.quarantined);
        self.stats.last_quarantined.store(seq, Ordering::Relaxed);
        let source = error.source().map(|s| s.to_string()).unwrap_or_default();
        tracing::error!(seq, stream = %self.stream_name, %error, %source,
            "log message does not decode: quarantined (not applied, not published)");
    }

    /// Persists the state and writes the checkpoint, if the node has one and
    /// it moved.
    async fn checkpoint_now(&mut self) {
        self.since_checkpoint = 0;
        let Some(path) = self.checkpoint.clone() else {
            return;
        };
        let applied = self.applied;
        if applied == self.checkpointed {
            return;
        }
        {
            let mut locked = self.core.state.write().await;
            if let Err(e) = locked.state.persist(applied) {
                Counters::bump(&self.stats.checkpoint_errors);
                tracing::error!(applied, error = %e, "state not persisted; checkpoint not written");
                return;
            }
        }
        let cp = Checkpoint {
            version: checkpoint::VERSION,
            stream: self.stream_name.clone(),
            stream_created_ns: self.stream_created_ns,
            applied,
        };
        match tokio::task::spawn_blocking(move || checkpoint::write(&path, &cp)).await {
            Ok(Ok(())) => {
                self.checkpointed = applied;
                Counters::bump(&self.stats.checkpoints);
            }
            Ok(Err(e)) => {
                Counters::bump(&self.stats.checkpoint_errors);
                tracing::error!(applied, error = %e, "checkpoint not written");
            }
            Err(e) => {
                Counters::bump(&self.stats.checkpoint_errors);
                tracing::error!(applied, error = %e, "checkpoint task failed");
            }
        }
    }
}
