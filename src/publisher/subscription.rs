//! The subscription's side of a key: its read state, the [`Stream`], and the
//! [`Registry`] interface through which it reaches the publisher. The
//! user-facing documentation is on the [`crate::subscription`] module.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures::stream::{FusedStream, Stream};
use tokio::runtime::Handle;

use super::chain::{Cur, Item};
use super::error::SnapshotError;
use crate::buffer::ReadError;
use crate::event::{Message, Subject, Topic};
use crate::sync::Mutex;

/// What a subscription asks of the publisher that owns its key: the whole
/// interface between the two. The publisher holds each subscription's
/// [`SubShared`] (to close or detach it); the subscription holds the
/// publisher only through this trait.
pub(crate) trait Registry<P>: Send + Sync {
    /// Adds `events` delivered to a subscriber of topic `topic` (see
    /// [`FLUSH_BATCHES`]).
    fn delivered(&self, topic: usize, events: u64);

    /// Releases `sub`'s reference to its key, once: the last one frees the
    /// key's buffer and cache entry.
    fn release(&self, sub: &Arc<SubShared<P>>);

    /// Re-attaches a lag-detached subscriber to a (cached or new) snapshot,
    /// or closes it when it was released meanwhile.
    fn resnapshot(self: Arc<Self>, sub: &SubShared<P>);
}

/// A subscription adds its delivered events into the topic's counter after
/// at most this many batches (and whenever its poll returns `Pending`, it
/// closes or drops): one relaxed atomic add per wake-up or per this many
/// batches, never per event.
pub(crate) const FLUSH_BATCHES: u32 = 64;

/// What a lagging subscriber gets when it falls further behind than the
/// publisher's lag limit.
///
/// # Examples
///
/// ```
/// use snapstream::event::Subject;
/// use snapstream::publisher::{LagPolicy, SubscribeRequest};
///
/// let req = SubscribeRequest::new("t", Subject::key("k")).on_lag(LagPolicy::Resnapshot);
/// assert_eq!(req.lag_policy(), LagPolicy::Resnapshot);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LagPolicy {
    /// End with [`SubscriptionError::Lagged`] (the default).
    #[default]
    Error,
    /// Yield [`Message::NewSnapshotToFollow`], then a fresh snapshot and
    /// `EndOfSnapshot`, and carry on live.
    Resnapshot,
}

/// A subscription request: topic, subject, the index the subscriber already
/// has (0 = none), an optional token and the lag policy.
///
/// # Examples
///
/// ```
/// use snapstream::event::Subject;
/// use snapstream::publisher::SubscribeRequest;
///
/// let req = SubscribeRequest::new("services", Subject::key("web")).index(42).token("acl-1");
/// assert_eq!(req.requested_index(), 42);
/// ```
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub(crate) topic: Topic,
    pub(crate) subject: Subject,
    pub(crate) index: u64,
    pub(crate) token: Option<Arc<str>>,
    pub(crate) on_lag: LagPolicy,
}

impl SubscribeRequest {
    /// A fresh subscription (index 0) to `subject` of `topic`.
    ///
    /// # Examples
    ///
    /// See [`SubscribeRequest`].
    pub fn new(topic: impl Into<Topic>, subject: impl Into<Subject>) -> Self {
        Self {
            topic: topic.into(),
            subject: subject.into(),
            index: 0,
            token: None,
            on_lag: LagPolicy::Error,
        }
    }

    /// Resume from `index`: the newest index the subscriber has seen.
    ///
    /// # Examples
    ///
    /// See [`SubscribeRequest`].
    pub fn index(mut self, index: u64) -> Self {
        self.index = index;
        self
    }

    /// The token the subscription is made with (see
    /// [`Publisher::force_close_token`](crate::publisher::Publisher::force_close_token)).
    ///
    /// # Examples
    ///
    /// See [`SubscribeRequest`].
    pub fn token(mut self, token: impl Into<Arc<str>>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// What to do when the subscriber lags (default [`LagPolicy::Error`]).
    ///
    /// # Examples
    ///
    /// See [`LagPolicy`].
    pub fn on_lag(mut self, policy: LagPolicy) -> Self {
        self.on_lag = policy;
        self
    }

    /// The requested index.
    ///
    /// # Examples
    ///
    /// See [`SubscribeRequest`].
    pub fn requested_index(&self) -> u64 {
        self.index
    }

    /// The lag policy.
    ///
    /// # Examples
    ///
    /// See [`LagPolicy`].
    pub fn lag_policy(&self) -> LagPolicy {
        self.on_lag
    }

    /// The topic.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::publisher::SubscribeRequest;
    /// assert_eq!(SubscribeRequest::new("t", Subject::key("k")).topic().as_str(), "t");
    /// ```
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The subject.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::publisher::SubscribeRequest;
    /// assert_eq!(SubscribeRequest::new("t", Subject::key("k")).subject(), &Subject::key("k"));
    /// ```
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The token, if the request has one.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::publisher::SubscribeRequest;
    /// let req = SubscribeRequest::new("t", Subject::key("k")).token("acl-1");
    /// assert_eq!(req.token_str(), Some("acl-1"));
    /// ```
    pub fn token_str(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// Why a subscription ended. Cheap to clone; a closed subscription returns
/// the same error on every later read.
///
/// # Examples
///
/// ```
/// use snapstream::publisher::SubscriptionError;
/// assert_eq!(SubscriptionError::ForceClosed.to_string(), "subscription force-closed");
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// Closed by the publisher: permissions changed or the topic was
    /// refreshed. Re-subscribe.
    #[error("subscription force-closed")]
    ForceClosed,
    /// Closed by its owner.
    #[error("unsubscribed")]
    Unsubscribed,
    /// The publisher shut down.
    #[error("publisher shutting down")]
    ShuttingDown,
    /// The subscriber fell more than `limit` batches behind and was detached.
    #[error("subscriber lagged more than {limit} batches behind")]
    Lagged {
        /// The lag limit in force.
        limit: u64,
    },
    /// The snapshot handler failed.
    #[error("snapshot failed")]
    Snapshot(#[source] SnapshotError),
}

enum Step<P> {
    Ready(Poll<Result<Message<P>, SubscriptionError>>),
    Again,
    Resnapshot,
    Failed(SubscriptionError),
}

/// Where a new (or re-snapshotting) subscriber starts.
pub(crate) struct SubStart<P> {
    pub(crate) cursor: Cur<P>,
    /// Whether `cursor` is at a node of the live buffer (so `lag()` is
    /// measured against it).
    pub(crate) in_live: bool,
    /// Live `seq()` at the chain's splice point (lag while in the snapshot).
    pub(crate) base_seq: u64,
    /// Drop batches at or below this index (`None` while in a snapshot).
    pub(crate) filter_at: Option<u64>,
    /// Yield `NewSnapshotToFollow` first.
    pub(crate) new_snapshot: bool,
}

struct SubState<P> {
    cursor: Option<Cur<P>>,
    closed: Option<SubscriptionError>,
    /// Detached for lag, to re-snapshot on the next poll.
    resnapshot: bool,
    waker: Option<Waker>,
    in_live: bool,
    base_seq: u64,
    filter_at: Option<u64>,
    new_snapshot: bool,
}

/// What [`SubShared::detach_if_lagging`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detached {
    /// Not lagging (or already detached or closed).
    No,
    /// Detached; it re-snapshots on its next poll.
    Resnapshot,
    /// Closed with `Lagged`: release it.
    Closed,
}

/// The part of a subscription the publisher reaches (to close or detach it).
pub(crate) struct SubShared<P> {
    pub(crate) id: u64,
    pub(crate) topic: usize,
    pub(crate) subject: Subject,
    pub(crate) token: Option<Arc<str>>,
    pub(crate) runtime: Handle,
    policy: LagPolicy,
    state: Mutex<SubState<P>>,
}

impl<P> SubShared<P> {
    pub(crate) fn new(id: u64, topic: usize, req: &SubscribeRequest, runtime: Handle) -> Self {
        Self {
            id,
            topic,
            subject: req.subject.clone(),
            token: req.token.clone(),
            runtime,
            policy: req.on_lag,
            state: Mutex::new(SubState {
                cursor: None,
                closed: None,
                resnapshot: false,
                waker: None,
                in_live: false,
                base_seq: 0,
                filter_at: None,
                new_snapshot: false,
            }),
        }
    }

    /// Sets the start position (unless closed meanwhile).
    pub(crate) fn start(&self, start: SubStart<P>) {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return;
        }
        st.cursor = Some(start.cursor);
        st.in_live = start.in_live;
        st.base_seq = start.base_seq;
        st.filter_at = start.filter_at;
        st.new_snapshot = start.new_snapshot;
    }

    /// Re-attaches a lag-detached subscriber at a snapshot chain.
    pub(crate) fn restart(&self, cursor: Cur<P>, base_seq: u64) {
        let mut st = self.state.lock();
        if st.closed.is_some() || !st.resnapshot {
            return;
        }
        st.resnapshot = false;
        st.cursor = Some(cursor);
        st.in_live = false;
        st.base_seq = base_seq;
        st.filter_at = None;
        st.new_snapshot = true;
    }

    /// Closes with `reason` unless already closed (first wins). Frees the
    /// cursor and wakes the reader. Returns whether this call closed it.
    pub(crate) fn close(&self, reason: SubscriptionError) -> bool {
        let waker = {
            let mut st = self.state.lock();
            if st.closed.is_some() {
                return false;
            }
            st.closed = Some(reason);
            st.cursor = None;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Batches this subscriber has yet to read, `seq` being the live
    /// buffer's `seq()`.
    pub(crate) fn lag(&self, seq: u64) -> u64 {
        let st = self.state.lock();
        Self::lag_of(&st, seq)
    }

    fn lag_of(st: &SubState<P>, seq: u64) -> u64 {
        match &st.cursor {
            None => 0,
            Some(c) if st.in_live => c.lag(),
            Some(_) => seq.saturating_sub(st.base_seq),
        }
    }

    /// Detaches the cursor when more than `limit` behind. Returns whether
    /// it did, and whether the subscription is now closed (and must be
    /// released) or re-snapshots.
    pub(crate) fn detach_if_lagging(&self, seq: u64, limit: u64) -> Detached {
        let (waker, closed) = {
            let mut st = self.state.lock();
            if st.closed.is_some() || st.cursor.is_none() || Self::lag_of(&st, seq) <= limit {
                return Detached::No;
            }
            st.cursor = None;
            let closed = match self.policy {
                LagPolicy::Resnapshot => {
                    st.resnapshot = true;
                    Detached::Resnapshot
                }
                LagPolicy::Error => {
                    st.closed = Some(SubscriptionError::Lagged { limit });
                    Detached::Closed
                }
            };
            (st.waker.take(), closed)
        };
        if let Some(w) = waker {
            w.wake();
        }
        closed
    }
}

/// A subscription to one (topic, subject): a stream of
/// [`Message`]s — snapshot, framing, live events. See the [module
/// documentation](crate::subscription) for closing semantics.
///
/// # Examples
///
/// ```
/// use futures::StreamExt;
/// use snapstream::event::{Event, Message, Subject};
/// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut b = Publisher::<u32>::builder();
/// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u32>| async { Ok(0) }).unwrap();
/// let publisher = b.build();
/// let mut sub = publisher.subscribe(SubscribeRequest::new("t", Subject::key("k"))).unwrap();
/// // An empty snapshot at index 0 is reported as index 1.
/// assert_eq!(sub.next().await, Ok(Message::EndOfSnapshot { index: 1 }));
/// publisher.publish(vec![Event::new("t", "k", 2, 7)]).unwrap();
/// let msg = StreamExt::next(&mut sub).await.unwrap().unwrap();
/// assert_eq!(*msg.events().unwrap()[0].payload(), 7);
/// # }
/// ```
#[must_use = "streams do nothing unless polled"]
pub struct Subscription<P> {
    shared: Arc<SubShared<P>>,
    publisher: Arc<dyn Registry<P>>,
    terminated: bool,
    /// See [`last_index`](Self::last_index).
    last_index: Option<u64>,
    /// Between `NewSnapshotToFollow` (or a fresh start) and `EndOfSnapshot`.
    in_snapshot: bool,
    /// Events delivered and not yet added into the topic's counter.
    unflushed_events: u64,
    /// Batches behind `unflushed_events`.
    unflushed_batches: u32,
}

impl<P: Send + Sync + 'static> Subscription<P> {
    pub(crate) fn new(
        shared: Arc<SubShared<P>>,
        publisher: Arc<dyn Registry<P>>,
        index: u64,
    ) -> Self {
        Self {
            shared,
            publisher,
            terminated: false,
            // A resume from `index` starts with a view complete up to it; a
            // fresh subscription has none until its snapshot ends.
            last_index: (index > 0).then_some(index),
            in_snapshot: index == 0,
            unflushed_events: 0,
            unflushed_batches: 0,
        }
    }

    /// Adds the deliveries counted so far into the topic's counter.
    fn flush_deliveries(&mut self) {
        if self.unflushed_events > 0 {
            self.publisher
                .delivered(self.shared.topic, self.unflushed_events);
        }
        self.unflushed_events = 0;
        self.unflushed_batches = 0;
    }

    /// The index this subscription's messages so far make a complete view up
    /// to: the index to [resume](SubscribeRequest::index) from after a
    /// disconnect. `None` while no complete view was delivered yet (before the
    /// first `EndOfSnapshot`, or after `NewSnapshotToFollow` until the new
    /// snapshot ends). Snapshot events never move it; `EndOfSnapshot(i)` sets
    /// it to `i`, each live batch to its index.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, Subject};
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut b = Publisher::<u32>::builder();
    /// b.register("t", |r: SnapshotRequest, mut s: SnapshotSink<u32>| async move {
    ///     s.append(vec![Event::new("t", r.subject().clone(), 5, 0)])?;
    ///     Ok(5)
    /// })
    /// .unwrap();
    /// let publisher = b.build();
    /// let request = SubscribeRequest::new("t", Subject::key("k"));
    /// let mut sub = publisher.subscribe(request.clone()).unwrap();
    /// sub.next().await.unwrap(); // snapshot event
    /// assert_eq!(sub.last_index(), None);
    /// sub.next().await.unwrap(); // EndOfSnapshot(5)
    /// assert_eq!(sub.last_index(), Some(5));
    /// publisher.publish(vec![Event::new("t", "k", 6, 1)]).unwrap();
    /// sub.next().await.unwrap();
    /// assert_eq!(sub.last_index(), Some(6));
    ///
    /// // After a disconnect, resume where the view ended: no snapshot again.
    /// let resume_at = sub.last_index().unwrap();
    /// drop(sub);
    /// let resumed = publisher.subscribe(request.index(resume_at)).unwrap();
    /// assert_eq!(resumed.last_index(), Some(6));
    /// # }
    /// ```
    pub fn last_index(&self) -> Option<u64> {
        self.last_index
    }

    fn observe(&mut self, message: &Message<P>) {
        match message {
            Message::NewSnapshotToFollow => {
                self.last_index = None;
                self.in_snapshot = true;
            }
            Message::EndOfSnapshot { index } => {
                self.last_index = Some(*index);
                self.in_snapshot = false;
            }
            Message::Events(batch) => {
                if !self.in_snapshot {
                    self.last_index = Some(batch.index());
                }
                self.unflushed_events += batch.events().len() as u64;
                self.unflushed_batches += 1;
                if self.unflushed_batches >= FLUSH_BATCHES {
                    self.flush_deliveries();
                }
            }
        }
    }

    /// Waits for the next message.
    ///
    /// # Errors
    ///
    /// The [`SubscriptionError`] that closed the subscription; once closed,
    /// every call returns the same error.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future before it completes loses no message.
    ///
    /// # Examples
    ///
    /// See [`Subscription`].
    pub async fn next(&mut self) -> Result<Message<P>, SubscriptionError> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    /// Polls for the next message (the non-async form of
    /// [`next`](Self::next)).
    ///
    /// # Errors
    ///
    /// As [`next`](Self::next).
    ///
    /// # Cancel safety
    ///
    /// Nothing is consumed unless `Ready` is returned.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let mut b = Publisher::<u32>::builder();
    /// # b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u32>| async { Ok(1) }).unwrap();
    /// # let publisher = b.build();
    /// let mut sub = publisher.subscribe(SubscribeRequest::new("t", Subject::key("k"))).unwrap();
    /// let msg = std::future::poll_fn(|cx| sub.poll_message(cx)).await;
    /// assert!(msg.unwrap().is_framing());
    /// # }
    /// ```
    pub fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Message<P>, SubscriptionError>> {
        loop {
            match self.step(cx) {
                Step::Ready(r) => {
                    match &r {
                        Poll::Ready(Ok(message)) => self.observe(message),
                        // Caught up (about to sleep) or closed: the count is
                        // made exact while the reader has nothing to do.
                        Poll::Pending | Poll::Ready(Err(_)) => self.flush_deliveries(),
                    }
                    return r;
                }
                Step::Again => {}
                Step::Resnapshot => self.publisher.clone().resnapshot(&self.shared),
                Step::Failed(err) => {
                    self.flush_deliveries();
                    self.publisher.release(&self.shared);
                    return Poll::Ready(Err(err));
                }
            }
        }
    }

    /// One step of [`poll_message`](Self::poll_message), under the state lock.
    fn step(&mut self, cx: &mut Context<'_>) -> Step<P> {
        let mut guard = self.shared.state.lock();
        let st = &mut *guard;
        if let Some(e) = &st.closed {
            return Step::Ready(Poll::Ready(Err(e.clone())));
        }
        if st.new_snapshot {
            st.new_snapshot = false;
            return Step::Ready(Poll::Ready(Ok(Message::NewSnapshotToFollow)));
        }
        let Some(cursor) = st.cursor.as_mut() else {
            if st.resnapshot {
                return Step::Resnapshot;
            }
            // Not reachable: a detached, unclosed subscriber re-snapshots.
            st.closed = Some(SubscriptionError::Unsubscribed);
            return Step::Again;
        };
        match cursor.poll_next(cx) {
            Poll::Pending => {
                if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.waker = Some(cx.waker().clone());
                }
                Step::Ready(Poll::Pending)
            }
            Poll::Ready(Err(ReadError::Closed)) => {
                // The chain's writer went away without ending it (a build
                // cancelled under this reader): start over from a snapshot.
                st.cursor = None;
                st.resnapshot = true;
                Step::Again
            }
            Poll::Ready(Err(ReadError::Failed(e))) => {
                let err = SubscriptionError::Snapshot(e.clone());
                st.closed = Some(err.clone());
                st.cursor = None;
                Step::Failed(err)
            }
            Poll::Ready(Ok(items)) => {
                debug_assert_eq!(items.len(), 1, "one item per node");
                match items.first() {
                    Some(Item::EndOfSnapshot(index)) => {
                        let index = *index;
                        st.filter_at = Some(index);
                        Step::Ready(Poll::Ready(Ok(Message::EndOfSnapshot { index })))
                    }
                    Some(Item::Batch(batch)) => match st.filter_at {
                        None => Step::Ready(Poll::Ready(Ok(Message::Events(batch.clone())))),
                        Some(min) => {
                            st.in_live = true;
                            if batch.index() > min {
                                Step::Ready(Poll::Ready(Ok(Message::Events(batch.clone()))))
                            } else {
                                // Already reflected in the snapshot (or the
                                // resume index): drop it.
                                Step::Again
                            }
                        }
                    },
                    None => Step::Again,
                }
            }
        }
    }

    /// Closes the subscription with [`SubscriptionError::Unsubscribed`]
    /// (unless it is already closed) and releases its buffer reference.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest, SubscriptionError};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let mut b = Publisher::<u32>::builder();
    /// # b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u32>| async { Ok(1) }).unwrap();
    /// # let publisher = b.build();
    /// let mut sub = publisher.subscribe(SubscribeRequest::new("t", Subject::key("k"))).unwrap();
    /// sub.unsubscribe();
    /// assert_eq!(sub.next().await, Err(SubscriptionError::Unsubscribed));
    /// # }
    /// ```
    pub fn unsubscribe(&mut self) {
        self.shared.close(SubscriptionError::Unsubscribed);
        self.publisher.release(&self.shared);
    }

    /// The reason the subscription is closed, if it is.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest, SubscriptionError};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let mut b = Publisher::<u32>::builder();
    /// # b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u32>| async { Ok(1) }).unwrap();
    /// # let publisher = b.build();
    /// let sub = publisher.subscribe(SubscribeRequest::new("t", Subject::key("k"))).unwrap();
    /// assert_eq!(sub.close_reason(), None);
    /// publisher.shutdown();
    /// assert_eq!(sub.close_reason(), Some(SubscriptionError::ShuttingDown));
    /// # }
    /// ```
    pub fn close_reason(&self) -> Option<SubscriptionError> {
        self.shared.state.lock().closed.clone()
    }

    /// Live batches published to the key that this subscriber has yet to
    /// read (0 while it is still reading a snapshot; the publisher's lag
    /// check also counts the live batches queued behind a snapshot).
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::event::Subject;
    /// # use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink, SubscribeRequest};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let mut b = Publisher::<u32>::builder();
    /// # b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u32>| async { Ok(1) }).unwrap();
    /// # let publisher = b.build();
    /// let sub = publisher.subscribe(SubscribeRequest::new("t", Subject::key("k"))).unwrap();
    /// assert_eq!(sub.lag(), 0);
    /// # }
    /// ```
    pub fn lag(&self) -> u64 {
        let st = self.shared.state.lock();
        match &st.cursor {
            Some(c) if st.in_live => c.lag(),
            _ => 0,
        }
    }
}

impl<P: Send + Sync + 'static> Stream for Subscription<P> {
    type Item = Result<Message<P>, SubscriptionError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.terminated {
            return Poll::Ready(None);
        }
        match self.poll_message(cx) {
            Poll::Ready(Err(e)) => {
                self.terminated = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Ok(m)) => Poll::Ready(Some(Ok(m))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<P: Send + Sync + 'static> FusedStream for Subscription<P> {
    fn is_terminated(&self) -> bool {
        self.terminated
    }
}

impl<P> Drop for Subscription<P> {
    fn drop(&mut self) {
        if self.unflushed_events > 0 {
            self.publisher
                .delivered(self.shared.topic, self.unflushed_events);
        }
        self.shared.close(SubscriptionError::Unsubscribed);
        self.publisher.release(&self.shared);
    }
}

impl<P> fmt::Debug for Subscription<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.shared.id)
            .field("subject", &self.shared.subject)
            .field("closed", &self.shared.state.lock().closed)
            .finish()
    }
}
