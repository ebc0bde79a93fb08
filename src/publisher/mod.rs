//! The publisher: topics, per-key live buffers, snapshots spliced onto live
//! events, the snapshot cache, bounded lag.
//!
//! # Overview
//!
//! A state store publishes every change as [`Event`]s. Clients
//! [`subscribe`](Publisher::subscribe) to a (topic, subject) and receive a
//! [`Subscription`]: a consistent snapshot of that key, then every later
//! change, nothing lost and nothing twice, resumable by index.
//!
//! # Topics and handlers
//!
//! Each topic has one [`SnapshotHandler`], registered on the
//! [`PublisherBuilder`] before the publisher runs (registration is frozen by
//! the type: a built [`Publisher`] has no `register`). A topic may declare
//! wildcard support; a [`Subject::Wildcard`] subscription then receives every
//! key of the topic.
//!
//! # Routing
//!
//! [`publish`](Publisher::publish) appends each event to the live buffer of
//! its (topic, subject), and to the topic's wildcard buffer. Consecutive
//! events of one key at one index become one node and reach a subscriber as
//! one [`EventBatch`]. Buffers exist only while someone subscribes to the
//! key: events for unwatched keys are dropped (a later subscriber catches up
//! through a snapshot). Publishing never waits for a subscriber.
//!
//! # Subscribing: the three cases
//!
//! | requested index | what the subscription yields |
//! |---|---|
//! | 0 | snapshot, `EndOfSnapshot(i)`, live events with index > i |
//! | the key's newest published index, any index still held in the cached chain, or an index after which the key provably did not change (see below) | live events after it, no framing |
//! | anything else | `NewSnapshotToFollow`, snapshot, `EndOfSnapshot(i)`, live events |
//!
//! The snapshot is built in its own buffer while live events keep arriving;
//! the live position is captured *before* the handler runs, and the finished
//! snapshot is spliced onto it. Live events at or below the snapshot's index
//! (already reflected in it) are dropped by the subscription.
//!
//! # Resuming a key nobody watched
//!
//! A key's buffer goes away with its last subscriber, so after a quiet
//! spell nobody watched, the publisher cannot replay the key's events. It
//! can still tell that there were none: each topic remembers which key
//! changed at which index for its latest
//! [`resume_window`](PublisherBuilder::resume_window) changes, with a
//! horizon below which it forgot. A resume at index `i` at or above the
//! horizon, for a key with no remembered change above `i`, continues live
//! with no snapshot; a key that did change, or an `i` below the horizon (or
//! above the topic's newest index), gets `NewSnapshotToFollow` and a
//! snapshot. [`Publisher::quiet_index`] applies the same rule to say how far
//! a quiet subscriber is complete: the network server's progress marks
//! carry it, so an idle client's resume point keeps up with the topic.
//!
//! # Snapshot cache
//!
//! The start of a snapshot chain (snapshot, `EndOfSnapshot`, every live event
//! since) is cached per key for the TTL ([`DEFAULT_SNAPSHOT_CACHE_TTL`]; zero
//! disables reuse of finished snapshots). A subscriber within the TTL — or
//! while a build for the key is running — reads that chain without calling
//! the handler: concurrent subscribers share one build. Failed snapshots are
//! not cached; `NewSnapshotToFollow` is never part of the chain. Expiry checks
//! identity, so an old timer never evicts a newer snapshot. The entry goes
//! away with the last subscriber of the key.
//!
//! # Bounded lag
//!
//! A stalled subscriber keeps every event after its position alive. With a
//! lag limit ([`DEFAULT_LAG_LIMIT`] batches), the publisher checks a key's
//! subscribers each time the key's buffer grew by half the limit (amortized
//! O(subscribers / limit) per publish) and detaches every subscriber further
//! behind than the limit: on its next poll it yields
//! [`SubscriptionError::Lagged`] or, if it asked for
//! [`LagPolicy::Resnapshot`], `NewSnapshotToFollow` and a fresh snapshot.
//! Never a silent gap. A cached chain longer than the limit is evicted the
//! same way. Memory per key is thus bounded by about 1.5 × the limit.
//!
//! # Locks
//!
//! Each topic has its own mutex, held for routing and subscribe bookkeeping
//! only — never while a snapshot handler runs (handlers run on spawned
//! tasks), so a slow snapshot on one topic never delays another topic, nor
//! publishing on its own topic.
//!
//! # Examples
//!
//! ```
//! use snapstream::event::{Event, Message, Subject};
//! use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut builder = Publisher::<&'static str>::builder();
//! builder
//!     .register("services", |req: SnapshotRequest, mut sink: SnapshotSink<&'static str>| async move {
//!         sink.append(vec![Event::new("services", req.subject().clone(), 1, "v1")])?;
//!         Ok(1)
//!     })
//!     .unwrap();
//! let publisher = builder.build();
//!
//! let mut sub = publisher
//!     .subscribe(SubscribeRequest::new("services", Subject::key("web")))
//!     .unwrap();
//! let first = sub.next().await.unwrap();
//! assert_eq!(*first.events().unwrap()[0].payload(), "v1");
//! assert_eq!(sub.next().await.unwrap(), Message::EndOfSnapshot { index: 1 });
//!
//! publisher.publish(vec![Event::new("services", "web", 2, "v2")]).unwrap();
//! let live = sub.next().await.unwrap();
//! assert_eq!(*live.events().unwrap()[0].payload(), "v2");
//! # }
//! ```

mod chain;
mod error;
mod recent;
mod snapshot;
mod stats;
mod subscription;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use error::{
    BoxError, HandlerPanicked, PublishError, PublishErrorKind, RegisterError, SinkError,
    SnapshotError, SubscribeError, UnknownTopicError,
};
pub use snapshot::{SnapshotHandler, SnapshotRequest, SnapshotSink};
pub use stats::{KeyStats, PublisherStats, TopicStats};

use subscription::Detached;
pub use subscription::{LagPolicy, SubscribeRequest, Subscription, SubscriptionError};

use crate::buffer::{EventBuffer, ReadError};
use crate::event::{Event, EventBatch, Names, Subject, Topic};
use crate::histogram::{AtomicHistogram, Histogram};
use crate::sync::Mutex;
use chain::{Buf, Cur, Item};
use recent::Recent;
use subscription::{Registry, SubShared, SubStart};

/// Default snapshot cache TTL: 10 seconds (as Consul's).
pub const DEFAULT_SNAPSHOT_CACHE_TTL: Duration = Duration::from_secs(10);

/// Default lag limit: 100,000 batches behind the key's newest event.
pub const DEFAULT_LAG_LIMIT: u64 = 100_000;

/// Default resume window: each topic remembers which key changed at which
/// index for its last 16,384 changes (at most about 1.2 MiB per topic once
/// that many changes were published: 384 KiB of changes, plus up to about
/// 50 bytes per distinct key among them), so a key nobody watched can be
/// resumed without a snapshot. See [`PublisherBuilder::resume_window`].
pub const DEFAULT_RESUME_WINDOW: usize = 16_384;

/// Builds a [`Publisher`]: register one snapshot handler per topic, set the
/// options, then [`build`](Self::build).
///
/// | option | default |
/// |---|---|
/// | [`snapshot_cache_ttl`](Self::snapshot_cache_ttl) | [`DEFAULT_SNAPSHOT_CACHE_TTL`] (10 s; zero disables) |
/// | [`lag_limit`](Self::lag_limit) | [`DEFAULT_LAG_LIMIT`] (100,000 batches; `None` = unbounded) |
/// | [`resume_window`](Self::resume_window) | [`DEFAULT_RESUME_WINDOW`] (16,384 changes per topic; 0 disables) |
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
///
/// let mut b = Publisher::<u64>::builder();
/// b.snapshot_cache_ttl(Duration::from_secs(1)).lag_limit(Some(1_000));
/// b.register_with_wildcard("nodes", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async { Ok(1) })
///     .unwrap();
/// let publisher = b.build();
/// # drop(publisher);
/// ```
pub struct PublisherBuilder<P> {
    topics: Vec<(Topic, Arc<dyn SnapshotHandler<P>>, bool)>,
    ttl: Duration,
    lag_limit: Option<u64>,
    resume_window: usize,
}

impl<P: Send + Sync + 'static> PublisherBuilder<P> {
    /// Registers the snapshot handler of `topic` (no wildcard support).
    ///
    /// # Errors
    ///
    /// [`RegisterError::EmptyTopic`] or [`RegisterError::DuplicateTopic`].
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::publisher::{Publisher, RegisterError, SnapshotRequest, SnapshotSink};
    /// let h = |_r: SnapshotRequest, _s: SnapshotSink<u8>| async { Ok(1) };
    /// let mut b = Publisher::<u8>::builder();
    /// b.register("t", h).unwrap();
    /// assert!(matches!(b.register("t", h), Err(RegisterError::DuplicateTopic(_))));
    /// ```
    pub fn register(
        &mut self,
        topic: impl Into<Topic>,
        handler: impl SnapshotHandler<P>,
    ) -> Result<&mut Self, RegisterError> {
        self.add(topic.into(), Arc::new(handler), false)
    }

    /// Registers the snapshot handler of `topic` with wildcard support: a
    /// [`Subject::Wildcard`] subscription receives every key of the topic
    /// (the handler is then called with the wildcard subject).
    ///
    /// # Errors
    ///
    /// As [`register`](Self::register).
    ///
    /// # Examples
    ///
    /// See [`PublisherBuilder`].
    pub fn register_with_wildcard(
        &mut self,
        topic: impl Into<Topic>,
        handler: impl SnapshotHandler<P>,
    ) -> Result<&mut Self, RegisterError> {
        self.add(topic.into(), Arc::new(handler), true)
    }

    fn add(
        &mut self,
        topic: Topic,
        handler: Arc<dyn SnapshotHandler<P>>,
        wildcard: bool,
    ) -> Result<&mut Self, RegisterError> {
        if topic.is_empty() {
            return Err(RegisterError::EmptyTopic);
        }
        if self.topics.iter().any(|(t, _, _)| *t == topic) {
            return Err(RegisterError::DuplicateTopic(topic));
        }
        self.topics.push((topic, handler, wildcard));
        Ok(self)
    }

    /// Sets how long a finished snapshot chain stays reusable. Zero disables
    /// reuse (concurrent subscribers still share a running build).
    ///
    /// # Examples
    ///
    /// See [`PublisherBuilder`].
    pub fn snapshot_cache_ttl(&mut self, ttl: Duration) -> &mut Self {
        self.ttl = ttl;
        self
    }

    /// Sets the lag limit in batches (`None` = unbounded memory for stalled
    /// subscribers; `Some(0)` is treated as 1).
    ///
    /// # Examples
    ///
    /// See [`PublisherBuilder`].
    pub fn lag_limit(&mut self, limit: Option<u64>) -> &mut Self {
        self.lag_limit = limit.map(|l| l.max(1));
        self
    }

    /// Sets how many of a topic's latest changes (key and index) it
    /// remembers. A subscriber resuming at index `i` a key whose buffer is
    /// gone (nobody watched it) continues live, with no snapshot, when the
    /// key provably did not change after `i`: `i` is within the window and
    /// the key's last remembered change is at or below `i`. Otherwise it
    /// gets `NewSnapshotToFollow` and a snapshot, as before. Memory, per
    /// topic: 24 bytes per remembered change, plus about 50 bytes per
    /// distinct key among them (the key strings are shared with the events);
    /// one hash-map insert per published event. 0 disables
    /// it (a resume of an unwatched key then needs a snapshot unless `i` is
    /// the topic's newest index).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, Subject};
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut b = Publisher::<u64>::builder();
    /// b.resume_window(1_000);
    /// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async { Ok(0) }).unwrap();
    /// let publisher = b.build();
    /// publisher.publish(vec![Event::new("t", "a", 1, 10)]).unwrap();
    /// publisher.publish(vec![Event::new("t", "b", 2, 20)]).unwrap();
    ///
    /// // Nobody watches "a"; it did not change after 1: live, no snapshot.
    /// let mut sub = publisher.subscribe(SubscribeRequest::new("t", Subject::key("a")).index(1)).unwrap();
    /// publisher.publish(vec![Event::new("t", "a", 3, 11)]).unwrap();
    /// let first = sub.next().await.unwrap();
    /// assert_eq!(first.events().unwrap()[0].index(), 3);
    /// # }
    /// ```
    pub fn resume_window(&mut self, changes: usize) -> &mut Self {
        self.resume_window = changes;
        self
    }

    /// Freezes the registration and starts the publisher.
    ///
    /// # Examples
    ///
    /// See [`PublisherBuilder`].
    pub fn build(&mut self) -> Publisher<P> {
        let topics: Vec<TopicEntry<P>> = std::mem::take(&mut self.topics)
            .into_iter()
            .map(|(topic, handler, wildcard)| TopicEntry {
                topic,
                handler,
                wildcard,
                state: Mutex::new(TopicState {
                    keys: HashMap::new(),
                    last_index: None,
                    recent: Recent::new(self.resume_window),
                }),
                counters: TopicCounters::default(),
            })
            .collect();
        let by_name = topics
            .iter()
            .enumerate()
            .map(|(i, t)| (t.topic.clone(), i))
            .collect();
        let inner = Arc::new(Inner {
            topics,
            by_name,
            ttl: self.ttl,
            lag_limit: self.lag_limit,
            shutdown: AtomicBool::new(false),
            tokens: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        });
        Publisher {
            guard: Arc::new(ShutdownOnDrop(inner.clone())),
            inner,
        }
    }
}

impl<P> std::fmt::Debug for PublisherBuilder<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherBuilder")
            .field(
                "topics",
                &self.topics.iter().map(|t| &t.0).collect::<Vec<_>>(),
            )
            .field("ttl", &self.ttl)
            .field("lag_limit", &self.lag_limit)
            .finish()
    }
}

/// Routes published events to per-key buffers and serves subscriptions.
/// Cheap to clone (all clones share one publisher); dropping the last clone
/// shuts it down.
///
/// See the [module documentation](self) for the semantics.
///
/// # Examples
///
/// See the [module documentation](self).
pub struct Publisher<P> {
    inner: Arc<Inner<P>>,
    guard: Arc<ShutdownOnDrop<P>>,
}

impl<P> Clone for Publisher<P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            guard: self.guard.clone(),
        }
    }
}

impl<P> std::fmt::Debug for Publisher<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topics", &self.inner.topics.len())
            .field("shut_down", &self.inner.shutdown.load(Ordering::Relaxed))
            .finish()
    }
}

struct ShutdownOnDrop<P>(Arc<Inner<P>>);

impl<P> Drop for ShutdownOnDrop<P> {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl<P: Send + Sync + 'static> Publisher<P> {
    /// A builder with the defaults of [`PublisherBuilder`].
    ///
    /// # Examples
    ///
    /// See [`PublisherBuilder`].
    pub fn builder() -> PublisherBuilder<P> {
        PublisherBuilder {
            topics: Vec::new(),
            ttl: DEFAULT_SNAPSHOT_CACHE_TTL,
            lag_limit: Some(DEFAULT_LAG_LIMIT),
            resume_window: DEFAULT_RESUME_WINDOW,
        }
    }

    /// Publishes a batch of events: each goes to its (topic, subject) buffer
    /// and to the topic's wildcard buffer, if someone subscribes there.
    /// Consecutive events of one key with the same index are delivered as one
    /// batch. Never waits for a subscriber.
    ///
    /// # Index order
    ///
    /// A topic's indexes increase: within one call they never decrease (events
    /// sharing an index form one change, delivered as one batch), and the
    /// first index of a topic in a call is above every index published for
    /// that topic before — whether or not anyone watched the key. This is what
    /// makes a resume by index exact: a subscriber resuming at `i` and one
    /// that has been live all along see the same events after `i`.
    ///
    /// # Errors
    ///
    /// The whole batch is refused, nothing routed, nothing recorded, and the
    /// events handed back in [`PublishError`] when an event names an unknown
    /// topic or the wildcard subject, when an index breaks the order above
    /// ([`PublishErrorKind::IndexNotIncreasing`]), or when the publisher was
    /// shut down.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, Subject};
    /// use snapstream::publisher::{Publisher, PublishErrorKind, SnapshotRequest, SnapshotSink};
    ///
    /// let mut b = Publisher::<u8>::builder();
    /// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u8>| async { Ok(1) }).unwrap();
    /// let publisher = b.build();
    /// publisher.publish(vec![Event::new("t", "k", 1, 0)]).unwrap();
    /// let err = publisher.publish(vec![Event::new("t", Subject::Wildcard, 2, 0)]).unwrap_err();
    /// assert_eq!(err.kind(), &PublishErrorKind::WildcardSubject);
    ///
    /// // Two events of one change share an index; the next change goes above it.
    /// publisher.publish(vec![Event::new("t", "a", 2, 0), Event::new("t", "b", 2, 0)]).unwrap();
    /// let err = publisher.publish(vec![Event::new("t", "k", 2, 9)]).unwrap_err();
    /// assert!(matches!(err.kind(), PublishErrorKind::IndexNotIncreasing { index: 2, last: 2, .. }));
    /// assert_eq!(*err.into_events()[0].payload(), 9);
    /// ```
    pub fn publish(&self, events: Vec<Event<P>>) -> Result<(), PublishError<P>> {
        self.inner.publish(events)
    }

    /// The topic's newest index, when `subject` provably did not change
    /// after `since` (its key buffer saw every change since, or the topic's
    /// [resume window](PublisherBuilder::resume_window) covers `since`): a
    /// subscriber complete up to `since` is then complete up to the returned
    /// index, and may resume there without a snapshot. `None` when that
    /// cannot be shown (or `since` is 0, above the topic's newest index, or
    /// the topic unknown). The network server sends it as a progress mark on
    /// a quiet stream, so an idle client's resume point moves forward.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, Subject, Topic};
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
    ///
    /// let mut b = Publisher::<u64>::builder();
    /// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u64>| async { Ok(0) }).unwrap();
    /// let publisher = b.build();
    /// publisher.publish(vec![Event::new("t", "a", 1, 10)]).unwrap();
    /// publisher.publish(vec![Event::new("t", "b", 2, 20)]).unwrap();
    /// let t = Topic::from("t");
    /// // "a" did not change after 1: complete up to 2.
    /// assert_eq!(publisher.quiet_index(&t, &Subject::key("a"), 1), Some(2));
    /// // "b" changed at 2.
    /// assert_eq!(publisher.quiet_index(&t, &Subject::key("b"), 1), None);
    /// ```
    pub fn quiet_index(&self, topic: &Topic, subject: &Subject, since: u64) -> Option<u64> {
        self.inner.quiet_index(topic, subject, since)
    }

    /// Subscribes to (topic, subject) from the request's index; see the
    /// [module documentation](self) for the three cases. Returns at once: a
    /// snapshot, if needed, is built on a spawned task (or shared with a
    /// build already running for the key, or read from the cache).
    ///
    /// # Errors
    ///
    /// [`SubscribeError::UnknownTopic`], [`SubscribeError::WildcardUnsupported`],
    /// [`SubscribeError::ShutDown`], or [`SubscribeError::NoRuntime`] when
    /// called outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// See the [module documentation](self).
    pub fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription<P>, SubscribeError> {
        self.inner.subscribe(request)
    }

    /// Force-closes every subscription made with `token` (e.g. its
    /// permissions changed); they end with [`SubscriptionError::ForceClosed`].
    /// Returns how many were closed.
    ///
    /// # Examples
    ///
    /// ```
    /// let publisher = snapstream::publisher::Publisher::<u8>::builder().build();
    /// assert_eq!(publisher.force_close_token("nobody"), 0);
    /// ```
    pub fn force_close_token(&self, token: &str) -> usize {
        let subs = self.inner.tokens.lock().remove(token).unwrap_or_default();
        let mut closed = 0;
        for sub in subs.into_values() {
            if sub.close(SubscriptionError::ForceClosed) {
                closed += 1;
            }
            self.inner.release(&sub);
        }
        tracing::debug!(token, closed, "force-closed token");
        closed
    }

    /// Evicts every cached snapshot of `topic` and force-closes all its
    /// subscriptions (they end with [`SubscriptionError::ForceClosed`] and
    /// re-subscribe to get a fresh snapshot). Returns how many were closed.
    ///
    /// # Errors
    ///
    /// [`UnknownTopicError`] when no handler is registered for `topic`.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
    /// let mut b = Publisher::<u8>::builder();
    /// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u8>| async { Ok(1) }).unwrap();
    /// assert_eq!(b.build().refresh_topic("t"), Ok(0));
    /// ```
    pub fn refresh_topic(&self, topic: impl Into<Topic>) -> Result<usize, UnknownTopicError> {
        let topic = topic.into();
        let Some(&t) = self.inner.by_name.get(&topic) else {
            return Err(UnknownTopicError(topic));
        };
        let subs = self.inner.clear_topic(t, SubscriptionError::ForceClosed);
        let closed = subs.len();
        self.inner.forget_tokens(&subs);
        tracing::debug!(%topic, closed, "refreshed topic");
        Ok(closed)
    }

    /// Shuts the publisher down: every subscription ends with
    /// [`SubscriptionError::ShuttingDown`], running snapshot builds are
    /// cancelled, buffers and caches freed; later publishes and subscribes
    /// fail. Idempotent.
    ///
    /// # Examples
    ///
    /// ```
    /// let publisher = snapstream::publisher::Publisher::<u8>::builder().build();
    /// publisher.shutdown();
    /// assert!(publisher.is_shut_down());
    /// ```
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    ///
    /// # Examples
    ///
    /// See [`shutdown`](Self::shutdown).
    pub fn is_shut_down(&self) -> bool {
        self.inner.shutdown.load(Ordering::Acquire)
    }

    /// A snapshot of the publisher's figures: per topic and key, subscriber
    /// count, largest lag, retained buffer length; cache hits and misses.
    ///
    /// # Examples
    ///
    /// ```
    /// let publisher = snapstream::publisher::Publisher::<u8>::builder().build();
    /// let stats = publisher.stats();
    /// assert_eq!(stats.cache_hits, 0);
    /// assert_eq!(stats.subscribers(), 0);
    /// ```
    pub fn stats(&self) -> PublisherStats {
        self.inner.stats()
    }

    /// Events per publish call to `topic` (a call's events of that topic,
    /// for a call over several topics); `None` for an unknown topic.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::Event;
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
    ///
    /// let mut b = Publisher::<u8>::builder();
    /// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u8>| async { Ok(1) }).unwrap();
    /// let publisher = b.build();
    /// publisher.publish(vec![Event::new("t", "k", 1, 7)]).unwrap();
    /// let h = publisher.batch_sizes("t").unwrap();
    /// assert_eq!((h.count, h.sum), (1, 1.0));
    /// assert!(publisher.batch_sizes("nope").is_none());
    /// ```
    pub fn batch_sizes(&self, topic: &str) -> Option<Histogram> {
        let t = self
            .inner
            .topics
            .iter()
            .position(|e| e.topic.as_str() == topic)?;
        Some(self.inner.topics[t].counters.batch_sizes.snapshot())
    }

    /// How long the snapshot builds of `topic` took (the handler's run, to
    /// its end or failure), in seconds; `None` for an unknown topic.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
    ///
    /// let mut b = Publisher::<u8>::builder();
    /// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u8>| async { Ok(1) }).unwrap();
    /// let publisher = b.build();
    /// assert_eq!(publisher.snapshot_build_times("t").unwrap().count, 0);
    /// ```
    pub fn snapshot_build_times(&self, topic: &str) -> Option<Histogram> {
        let t = self
            .inner
            .topics
            .iter()
            .position(|e| e.topic.as_str() == topic)?;
        Some(self.inner.topics[t].counters.build_times.snapshot())
    }
}

/// Subscriptions by token, for [`Publisher::force_close_token`].
type TokenIndex<P> = HashMap<Arc<str>, HashMap<u64, Arc<SubShared<P>>>>;

pub(crate) struct Inner<P> {
    pub(crate) topics: Vec<TopicEntry<P>>,
    by_name: HashMap<Topic, usize>,
    ttl: Duration,
    pub(crate) lag_limit: Option<u64>,
    shutdown: AtomicBool,
    tokens: Mutex<TokenIndex<P>>,
    next_id: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

pub(crate) struct TopicEntry<P> {
    pub(crate) topic: Topic,
    pub(crate) handler: Arc<dyn SnapshotHandler<P>>,
    wildcard: bool,
    state: Mutex<TopicState<P>>,
    pub(crate) counters: TopicCounters,
}

/// A topic's counters of rare events and its histograms: relaxed atomics,
/// touched once per publish call, lag check or snapshot build — never per
/// delivery. `delivered` is the exception that proves it: each subscription
/// counts its deliveries in a plain field and adds them in here when it
/// catches up (its poll returns `Pending`), every
/// [`subscription::FLUSH_BATCHES`] batches, and when it closes or drops.
pub(crate) struct TopicCounters {
    /// Events delivered to the topic's subscribers (snapshot and live).
    delivered: AtomicU64,
    /// Subscribers closed with `Lagged`.
    lagged: AtomicU64,
    /// Subscribers detached for lag to re-snapshot.
    resnapshotted: AtomicU64,
    /// Events per publish call (the topic's part of it).
    batch_sizes: AtomicHistogram,
    /// Snapshot handler run time, start to end (or failure).
    pub(crate) build_times: AtomicHistogram,
}

impl Default for TopicCounters {
    fn default() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            resnapshotted: AtomicU64::new(0),
            batch_sizes: AtomicHistogram::sizes(),
            build_times: AtomicHistogram::durations(),
        }
    }
}

struct TopicState<P> {
    keys: HashMap<Subject, KeyState<P>>,
    /// The newest index published to the topic (whether or not anyone
    /// watched its key): the next `publish` must go above it.
    last_index: Option<u64>,
    /// Which key changed at which index, for the latest changes.
    recent: Recent,
}

impl<P> TopicState<P> {
    /// Whether `subject` provably did not change after `index`, up to the
    /// topic's newest index (the key's buffer, if any, is checked apart).
    fn recent_unchanged_since(&self, subject: &Subject, index: u64) -> bool {
        if self.last_index.is_none_or(|t| index > t) {
            return false;
        }
        match subject {
            Subject::Key(k) => self.recent.unchanged_since(k, index),
            Subject::Wildcard => self.last_index == Some(index),
        }
    }
}

/// The live buffer of one (topic, subject), alive while someone subscribes.
struct KeyState<P> {
    /// The (topic, subject) names, shared by every event of the key retained
    /// in `live` (see `Event::share_names`); never equal to an event's names
    /// for the wildcard.
    names: Arc<Names>,
    live: Buf<P>,
    /// Index of the newest batch appended to `live`.
    last_index: Option<u64>,
    /// The topic's newest index when this buffer was made: every change of
    /// the key after it was appended to `live` (`None`: nothing had been
    /// published, and what changed before the publisher is unknown).
    since: Option<u64>,
    subs: HashMap<u64, Arc<SubShared<P>>>,
    cache: Option<CacheEntry<P>>,
    /// `live.seq()` at which the next lag check runs.
    next_check: u64,
}

impl<P> KeyState<P> {
    /// Whether the key provably did not change after `index`, up to the
    /// topic's newest index `topic_last`: the buffer saw every change of the
    /// key since before `index`, and none above it.
    fn unchanged_since(&self, index: u64, topic_last: Option<u64>) -> bool {
        index > 0
            && topic_last.is_some_and(|t| index <= t)
            && self.since.is_some_and(|s| s <= index)
            && self.last_index.is_none_or(|j| j <= index)
    }

    fn new(topic: Topic, subject: Subject, since: Option<u64>) -> Self {
        Self {
            names: Names::new(topic, subject),
            live: EventBuffer::new(),
            last_index: None,
            since,
            subs: HashMap::new(),
            cache: None,
            next_check: 0,
        }
    }
}

/// A snapshot chain (running build, or finished and within its TTL).
struct CacheEntry<P> {
    id: u64,
    /// The snapshot buffer's head, captured before the handler ran.
    start: Cur<P>,
    /// `live.seq()` when the live position was captured.
    base_seq: u64,
    /// `Some` once the snapshot finished.
    eos_index: Option<u64>,
    expires_at: Option<Instant>,
    task: AbortHandle,
}

impl<P> CacheEntry<P> {
    fn usable(&self, now: Instant) -> bool {
        !matches!(self.expires_at, Some(t) if now >= t)
    }

    fn evict(self) {
        self.task.abort();
    }
}

fn evict_key<P>(ks: KeyState<P>) {
    if let Some(c) = ks.cache {
        c.evict();
    }
}

impl<P> Inner<P> {
    fn forget_tokens(&self, subs: &[Arc<SubShared<P>>]) {
        if subs.iter().all(|s| s.token.is_none()) {
            return;
        }
        let mut tokens = self.tokens.lock();
        for sub in subs {
            if let Some(token) = &sub.token {
                if let Some(m) = tokens.get_mut(token) {
                    m.remove(&sub.id);
                    if m.is_empty() {
                        tokens.remove(token);
                    }
                }
            }
        }
    }

    /// Closes every subscription of topic `t` with `reason` and frees its
    /// buffers and caches. Returns the subscriptions.
    fn clear_topic(&self, t: usize, reason: SubscriptionError) -> Vec<Arc<SubShared<P>>> {
        let keys = std::mem::take(&mut self.topics[t].state.lock().keys);
        let mut subs = Vec::new();
        for (_, ks) in keys {
            for sub in ks.subs.values() {
                sub.close(reason.clone());
            }
            subs.extend(ks.subs.values().cloned());
            evict_key(ks);
        }
        subs
    }

    fn shutdown(&self) {
        if self.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        for t in 0..self.topics.len() {
            self.clear_topic(t, SubscriptionError::ShuttingDown);
        }
        self.tokens.lock().clear();
        tracing::debug!("publisher shut down");
    }
}

impl<P: Send + Sync + 'static> Inner<P> {
    fn publish(&self, events: Vec<Event<P>>) -> Result<(), PublishError<P>> {
        let _span = tracing::trace_span!("publish", events = events.len()).entered();
        if self.shutdown.load(Ordering::Acquire) {
            return Err(PublishError::new(PublishErrorKind::ShutDown, events));
        }
        // Validate everything before routing anything: subjects, topics, and
        // that each topic's indexes never decrease within the call.
        let mut topic_of = Vec::with_capacity(events.len());
        // Per topic of the call: (topic, first index, last index).
        let mut spans: Vec<(usize, u64, u64)> = Vec::new();
        for e in &events {
            if e.subject().is_wildcard() {
                return Err(PublishError::new(PublishErrorKind::WildcardSubject, events));
            }
            let Some(&t) = self.by_name.get(e.topic()) else {
                let kind = PublishErrorKind::UnknownTopic(e.topic().clone());
                return Err(PublishError::new(kind, events));
            };
            match spans.iter_mut().find(|s| s.0 == t) {
                Some(span) if e.index() < span.2 => {
                    let kind = self.not_increasing(t, e.index(), span.2);
                    return Err(PublishError::new(kind, events));
                }
                Some(span) => span.2 = e.index(),
                None => spans.push((t, e.index(), e.index())),
            }
            topic_of.push(t);
        }
        // Lock every topic of the call (in topic order: no lock cycles) and
        // check that each continues above its last published index; only
        // then route, so a refused call changes nothing.
        spans.sort_unstable_by_key(|s| s.0);
        let mut states = Vec::with_capacity(spans.len());
        for &(t, first, _) in &spans {
            let state = self.topics[t].state.lock();
            if let Some(last) = state.last_index.filter(|&last| first <= last) {
                drop(state);
                drop(states);
                let kind = self.not_increasing(t, first, last);
                return Err(PublishError::new(kind, events));
            }
            states.push(state);
        }
        for (state, &(_, _, last)) in states.iter_mut().zip(&spans) {
            state.last_index = Some(last);
        }
        if let [_] = spans[..] {
            let recent = &mut states[0].recent;
            for e in &events {
                if let Subject::Key(k) = e.subject() {
                    recent.record(k, e.index());
                }
            }
        } else {
            for (e, &t) in events.iter().zip(&topic_of) {
                if let Subject::Key(k) = e.subject() {
                    let g = spans.partition_point(|s| s.0 < t);
                    states[g].recent.record(k, e.index());
                }
            }
        }
        if let [(t, _, _)] = spans[..] {
            // One topic (the common case): no grouping.
            self.topics[t]
                .counters
                .batch_sizes
                .record(events.len() as u64);
            self.route(t, &mut states[0], events);
            return Ok(());
        }
        // Group by topic, keeping each topic's events in their original order.
        let mut groups: Vec<Vec<Event<P>>> = spans.iter().map(|_| Vec::new()).collect();
        for (e, t) in events.into_iter().zip(topic_of) {
            let g = spans.partition_point(|s| s.0 < t);
            groups[g].push(e);
        }
        for ((state, evs), &(t, _, _)) in states.iter_mut().zip(groups).zip(&spans) {
            self.topics[t].counters.batch_sizes.record(evs.len() as u64);
            self.route(t, state, evs);
        }
        Ok(())
    }

    fn not_increasing(&self, t: usize, index: u64, last: u64) -> PublishErrorKind {
        PublishErrorKind::IndexNotIncreasing {
            topic: self.topics[t].topic.clone(),
            index,
            last,
        }
    }

    /// Appends `events` (all of topic `t`, in order) to the buffers of their
    /// keys and to the wildcard buffer. Called with the topic's lock held.
    ///
    /// Before an event is first appended (and so shared), it is pointed at
    /// the publisher's names: a retained event keeps the publisher's copies,
    /// not the caller's (`Event::new("t", ..)` allocates names per event).
    fn route(&self, t: usize, state: &mut TopicState<P>, mut events: Vec<Event<P>>) {
        if state.keys.is_empty() {
            return;
        }
        let topic = &self.topics[t].topic;
        let wildcard = self.topics[t].wildcard;
        if let [_] = events[..] {
            let mut e = events.pop().expect("one event");
            let index = e.index();
            if let Some(ks) = state.keys.get_mut(e.subject()) {
                e.share_names(topic, Some(&ks.names));
                if !wildcard {
                    self.append(t, ks, index, EventBatch::one(e));
                    return;
                }
                self.append(t, ks, index, EventBatch::one(e.clone()));
            } else {
                e.share_names(topic, None);
            }
            if wildcard {
                if let Some(ks) = state.keys.get_mut(&Subject::Wildcard) {
                    self.append(t, ks, index, EventBatch::one(e));
                }
            }
            return;
        }
        for e in &mut events {
            let key = state.keys.get(e.subject()).map(|ks| &ks.names);
            e.share_names(topic, key);
        }
        if wildcard {
            if let Some(ks) = state.keys.get_mut(&Subject::Wildcard) {
                let mut i = 0;
                while i < events.len() {
                    let index = events[i].index();
                    let run = events[i..]
                        .iter()
                        .take_while(|e| e.index() == index)
                        .count();
                    let batch = EventBatch::new(events[i..i + run].to_vec());
                    self.append(t, ks, index, batch);
                    i += run;
                }
            }
        }
        // Per key: consecutive events of one index form one batch.
        let mut per_key: HashMap<Subject, Vec<Event<P>>> = HashMap::new();
        for e in events {
            if state.keys.contains_key(e.subject()) {
                per_key.entry(e.subject().clone()).or_default().push(e);
            }
        }
        for (subject, evs) in per_key {
            let ks = state.keys.get_mut(&subject).expect("checked above");
            let mut evs = evs.into_iter().peekable();
            while let Some(first) = evs.next() {
                let index = first.index();
                let mut run = vec![first];
                while let Some(e) = evs.next_if(|e| e.index() == index) {
                    run.push(e);
                }
                self.append(t, ks, index, EventBatch::new(run));
            }
        }
    }

    fn append(&self, t: usize, ks: &mut KeyState<P>, index: u64, batch: EventBatch<P>) {
        ks.live.append_one(Item::Batch(batch));
        ks.last_index = Some(index);
        if let Some(limit) = self.lag_limit {
            let seq = ks.live.seq();
            if seq >= ks.next_check {
                ks.next_check = seq + (limit / 2).max(1);
                self.check_lag(t, ks, seq, limit);
            }
        }
    }

    /// Detaches every subscriber of `ks` more than `limit` batches behind and
    /// evicts a cached chain longer than that.
    fn check_lag(&self, t: usize, ks: &mut KeyState<P>, seq: u64, limit: u64) {
        let mut released = Vec::new();
        let mut resnapshotted = 0;
        for sub in ks.subs.values() {
            match sub.detach_if_lagging(seq, limit) {
                Detached::No => {}
                Detached::Resnapshot => resnapshotted += 1,
                Detached::Closed => released.push(sub.clone()),
            }
        }
        let counters = &self.topics[t].counters;
        if resnapshotted > 0 {
            counters
                .resnapshotted
                .fetch_add(resnapshotted, Ordering::Relaxed);
        }
        if !released.is_empty() {
            counters
                .lagged
                .fetch_add(released.len() as u64, Ordering::Relaxed);
        }
        for sub in &released {
            ks.subs.remove(&sub.id);
        }
        if !released.is_empty() {
            tracing::debug!(count = released.len(), limit, "subscribers lagged");
            self.forget_tokens(&released);
        }
        if ks
            .cache
            .as_ref()
            .is_some_and(|c| seq.saturating_sub(c.base_seq) > limit)
        {
            ks.cache.take().expect("checked").evict();
        }
    }

    fn subscribe(
        self: &Arc<Self>,
        req: SubscribeRequest,
    ) -> Result<Subscription<P>, SubscribeError> {
        let _span =
            tracing::debug_span!("subscribe", topic = %req.topic, subject = %req.subject).entered();
        if self.shutdown.load(Ordering::Acquire) {
            return Err(SubscribeError::ShutDown);
        }
        let Some(&t) = self.by_name.get(&req.topic) else {
            return Err(SubscribeError::UnknownTopic(req.topic));
        };
        if req.subject.is_wildcard() && !self.topics[t].wildcard {
            return Err(SubscribeError::WildcardUnsupported(req.topic));
        }
        let runtime = Handle::try_current().map_err(|_| SubscribeError::NoRuntime)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(SubShared::new(id, t, &req, runtime.clone()));
        // Register the token first, so a force-close racing this subscribe
        // cannot miss it.
        if let Some(token) = &req.token {
            self.tokens
                .lock()
                .entry(token.clone())
                .or_default()
                .insert(id, shared.clone());
        }
        {
            let mut state = self.topics[t].state.lock();
            if self.shutdown.load(Ordering::Acquire) {
                drop(state);
                self.forget_tokens(std::slice::from_ref(&shared));
                return Err(SubscribeError::ShutDown);
            }
            let topic_last = state.last_index;
            let recent_quiet =
                req.index > 0 && state.recent_unchanged_since(&req.subject, req.index);
            let ks = state.keys.entry(req.subject.clone()).or_insert_with(|| {
                let topic = self.topics[t].topic.clone();
                KeyState::new(topic, req.subject.clone(), topic_last)
            });
            ks.subs.insert(id, shared.clone());
            let quiet = recent_quiet || ks.unchanged_since(req.index, topic_last);
            let start = self.start_position(&runtime, t, ks, &req, quiet);
            shared.start(start);
        }
        tracing::debug!(topic = %req.topic, subject = %req.subject, index = req.index, id, "subscribed");
        Ok(Subscription::new(shared, self.clone(), req.index))
    }

    /// Where a new subscriber starts (called with the topic's lock held).
    fn start_position(
        self: &Arc<Self>,
        runtime: &Handle,
        t: usize,
        ks: &mut KeyState<P>,
        req: &SubscribeRequest,
        quiet: bool,
    ) -> SubStart<P> {
        if req.index > 0 {
            // The key's newest index, or provably nothing of the key after it.
            if ks.last_index == Some(req.index) || quiet {
                return SubStart {
                    cursor: ks.live.head(),
                    in_live: true,
                    base_seq: ks.live.seq(),
                    filter_at: Some(req.index),
                    new_snapshot: false,
                };
            }
            if let Some(start) = self.resume_in_cache(ks, req.index) {
                return start;
            }
        }
        let (cursor, base_seq) =
            self.snapshot_cursor(runtime, t, ks, &req.subject, req.index, req.token.clone());
        SubStart {
            cursor,
            in_live: false,
            base_seq,
            filter_at: None,
            new_snapshot: req.index > 0,
        }
    }

    /// Finds `index` in the cached chain (the `EndOfSnapshot` index or a live
    /// batch after it) and returns a start right after it.
    fn resume_in_cache(&self, ks: &KeyState<P>, index: u64) -> Option<SubStart<P>> {
        let c = ks.cache.as_ref()?;
        let eos = c.eos_index?;
        if index < eos || !c.usable(Instant::now()) {
            return None;
        }
        let mut cursor = c.start.clone();
        let mut after_eos = false;
        loop {
            let (found, in_live) = match cursor.try_next() {
                None | Some(Err(ReadError::Failed(_) | ReadError::Closed)) => return None,
                Some(Ok(items)) => match items.first() {
                    Some(Item::EndOfSnapshot(i)) => {
                        after_eos = true;
                        (*i == index, false)
                    }
                    Some(Item::Batch(b)) if after_eos => {
                        if b.index() > index {
                            return None;
                        }
                        (b.index() == index, true)
                    }
                    _ => (false, false),
                },
            };
            if found {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Some(SubStart {
                    cursor,
                    in_live,
                    base_seq: c.base_seq,
                    filter_at: Some(index),
                    new_snapshot: false,
                });
            }
        }
    }

    /// A cursor at the start of a snapshot chain for the key: the cached or
    /// running one, or a new build. Returns it with the chain's base seq.
    /// Called with the topic's lock held; the handler runs on its own task.
    fn snapshot_cursor(
        self: &Arc<Self>,
        runtime: &Handle,
        t: usize,
        ks: &mut KeyState<P>,
        subject: &Subject,
        index: u64,
        token: Option<Arc<str>>,
    ) -> (Cur<P>, u64) {
        let now = Instant::now();
        if let Some(c) = &ks.cache {
            if c.usable(now) {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                return (c.start.clone(), c.base_seq);
            }
        }
        if let Some(old) = ks.cache.take() {
            old.evict();
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        let live_pos = ks.live.head();
        let base_seq = ks.live.seq();
        let snap: Buf<P> = EventBuffer::new();
        let start = snap.head();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = SnapshotRequest {
            topic: self.topics[t].topic.clone(),
            subject: subject.clone(),
            index,
            token,
        };
        let task = runtime.spawn(snapshot::build(
            self.clone(),
            t,
            subject.clone(),
            id,
            snap,
            live_pos,
            request,
        ));
        ks.cache = Some(CacheEntry {
            id,
            start: start.clone(),
            base_seq,
            eos_index: None,
            expires_at: None,
            task: task.abort_handle(),
        });
        (start, base_seq)
    }

    /// The build `id` finished with `index`: mark its cache entry ready (or
    /// drop it when the TTL is zero). Returns whether the expiry timer should
    /// run.
    pub(crate) fn snapshot_built(&self, t: usize, subject: &Subject, id: u64, index: u64) -> bool {
        let mut state = self.topics[t].state.lock();
        let Some(ks) = state.keys.get_mut(subject) else {
            return false;
        };
        match &mut ks.cache {
            Some(c) if c.id == id => {
                if self.ttl.is_zero() {
                    ks.cache = None;
                    false
                } else {
                    c.eos_index = Some(index);
                    c.expires_at = Some(Instant::now() + self.ttl);
                    true
                }
            }
            _ => false,
        }
    }

    /// The TTL of build `id` passed: evict it, if it is still the key's entry.
    pub(crate) fn expire_snapshot(&self, t: usize, subject: &Subject, id: u64) {
        self.forget_snapshot(t, subject, id);
    }

    /// Removes cache entry `id` of the key, if it is still there.
    pub(crate) fn forget_snapshot(&self, t: usize, subject: &Subject, id: u64) {
        let mut state = self.topics[t].state.lock();
        if let Some(ks) = state.keys.get_mut(subject) {
            if ks.cache.as_ref().is_some_and(|c| c.id == id) {
                ks.cache = None;
            }
        }
    }

    fn quiet_index(&self, topic: &Topic, subject: &Subject, since: u64) -> Option<u64> {
        let &t = self.by_name.get(topic)?;
        let state = self.topics[t].state.lock();
        let last = state.last_index?;
        let quiet = since > 0
            && (state.recent_unchanged_since(subject, since)
                || state
                    .keys
                    .get(subject)
                    .is_some_and(|ks| ks.unchanged_since(since, Some(last))));
        quiet.then_some(last)
    }

    fn stats(&self) -> PublisherStats {
        let mut topics = Vec::with_capacity(self.topics.len());
        for entry in &self.topics {
            let state = entry.state.lock();
            let mut keys = Vec::with_capacity(state.keys.len());
            for (subject, ks) in &state.keys {
                let seq = ks.live.seq();
                let max_lag = ks.subs.values().map(|s| s.lag(seq)).max().unwrap_or(0);
                let cache_len = ks
                    .cache
                    .as_ref()
                    .map_or(0, |c| seq.saturating_sub(c.base_seq));
                keys.push(KeyStats {
                    subject: subject.clone(),
                    subscribers: ks.subs.len(),
                    max_lag,
                    retained: max_lag.max(cache_len),
                    published: seq,
                    cached: ks.cache.as_ref().is_some_and(|c| c.eos_index.is_some()),
                    building: ks.cache.as_ref().is_some_and(|c| c.eos_index.is_none()),
                });
            }
            keys.sort_by(|a, b| a.subject.cmp(&b.subject));
            topics.push(TopicStats {
                topic: entry.topic.clone(),
                subscribers: keys.iter().map(|k| k.subscribers).sum(),
                keys,
                delivered: entry.counters.delivered.load(Ordering::Relaxed),
                lagged: entry.counters.lagged.load(Ordering::Relaxed),
                resnapshotted: entry.counters.resnapshotted.load(Ordering::Relaxed),
            });
        }
        PublisherStats {
            topics,
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
        }
    }
}

impl<P: Send + Sync + 'static> Registry<P> for Inner<P> {
    fn delivered(&self, topic: usize, events: u64) {
        self.topics[topic]
            .counters
            .delivered
            .fetch_add(events, Ordering::Relaxed);
    }

    fn release(&self, sub: &Arc<SubShared<P>>) {
        {
            let mut state = self.topics[sub.topic].state.lock();
            if let Some(ks) = state.keys.get_mut(&sub.subject) {
                if ks.subs.remove(&sub.id).is_some() && ks.subs.is_empty() {
                    let ks = state.keys.remove(&sub.subject).expect("present");
                    evict_key(ks);
                }
            }
        }
        self.forget_tokens(std::slice::from_ref(sub));
    }

    fn resnapshot(self: Arc<Self>, sub: &SubShared<P>) {
        let mut state = self.topics[sub.topic].state.lock();
        let Some(ks) = state
            .keys
            .get_mut(&sub.subject)
            .filter(|ks| ks.subs.contains_key(&sub.id))
        else {
            // Released: it was closed; make sure of it so the reader stops.
            drop(state);
            sub.close(if self.shutdown.load(Ordering::Acquire) {
                SubscriptionError::ShuttingDown
            } else {
                SubscriptionError::ForceClosed
            });
            return;
        };
        let (cursor, base_seq) = self.snapshot_cursor(
            &sub.runtime,
            sub.topic,
            ks,
            &sub.subject,
            0,
            sub.token.clone(),
        );
        sub.restart(cursor, base_seq);
    }
}
