//! Errors of the publisher's operations.

use std::fmt;
use std::sync::Arc;

use crate::event::{Event, Topic};

/// A boxed error, as returned by a snapshot handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Registering a snapshot handler failed.
///
/// # Examples
///
/// ```
/// use snapstream::publisher::{Publisher, RegisterError, SnapshotSink, SnapshotRequest};
///
/// let mut b = Publisher::<u32>::builder();
/// let err = b
///     .register("", |_req: SnapshotRequest, _sink: SnapshotSink<u32>| async { Ok(1) })
///     .unwrap_err();
/// assert!(matches!(err, RegisterError::EmptyTopic));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The topic name is empty.
    #[error("empty topic name")]
    EmptyTopic,
    /// A handler is already registered for the topic.
    #[error("topic {0} already registered")]
    DuplicateTopic(Topic),
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// An event names a topic with no registered handler.
    UnknownTopic(Topic),
    /// An event has the wildcard subject; only subscriptions may use it.
    WildcardSubject,
    /// The publisher was shut down.
    ShutDown,
    /// An event's index is not above the index already published for its
    /// topic (`last`): indexes of a topic must increase from one `publish`
    /// call to the next, and must not decrease within one call.
    IndexNotIncreasing {
        /// The event's topic.
        topic: Topic,
        /// The offending index.
        index: u64,
        /// The index it had to exceed (or, within one call, reach).
        last: u64,
    },
}

impl fmt::Display for PublishErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishErrorKind::UnknownTopic(t) => write!(f, "unknown topic {t}"),
            PublishErrorKind::WildcardSubject => f.write_str("cannot publish a wildcard subject"),
            PublishErrorKind::ShutDown => f.write_str("publisher shut down"),
            PublishErrorKind::IndexNotIncreasing { topic, index, last } => {
                write!(
                    f,
                    "index {index} of topic {topic} does not follow index {last}"
                )
            }
        }
    }
}

/// A publish was refused; nothing of the batch was routed, and the events are
/// handed back.
///
/// # Examples
///
/// ```
/// use snapstream::event::Event;
/// use snapstream::publisher::{Publisher, PublishErrorKind};
///
/// let publisher = Publisher::<u32>::builder().build();
/// let err = publisher.publish(vec![Event::new("nope", "k", 1, 5)]).unwrap_err();
/// assert!(matches!(err.kind(), PublishErrorKind::UnknownTopic(_)));
/// assert_eq!(*err.into_events()[0].payload(), 5);
/// ```
pub struct PublishError<P> {
    kind: PublishErrorKind,
    events: Vec<Event<P>>,
}

impl<P> PublishError<P> {
    pub(crate) fn new(kind: PublishErrorKind, events: Vec<Event<P>>) -> Self {
        Self { kind, events }
    }

    /// Why the publish was refused.
    ///
    /// # Examples
    ///
    /// See [`PublishError`].
    pub fn kind(&self) -> &PublishErrorKind {
        &self.kind
    }

    /// The events that were not published, in their original order.
    ///
    /// # Examples
    ///
    /// See [`PublishError`].
    pub fn into_events(self) -> Vec<Event<P>> {
        self.events
    }
}

impl<P> fmt::Debug for PublishError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("kind", &self.kind)
            .field("events", &self.events.len())
            .finish()
    }
}

impl<P> fmt::Display for PublishError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.kind, f)
    }
}

impl<P> std::error::Error for PublishError<P> {}

/// Subscribing failed.
///
/// # Examples
///
/// ```
/// use snapstream::event::Subject;
/// use snapstream::publisher::{Publisher, SubscribeError, SubscribeRequest};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let publisher = Publisher::<u32>::builder().build();
/// let err = publisher.subscribe(SubscribeRequest::new("nope", Subject::key("k"))).unwrap_err();
/// assert!(matches!(err, SubscribeError::UnknownTopic(_)));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// No handler is registered for the topic.
    #[error("unknown topic {0}")]
    UnknownTopic(Topic),
    /// A wildcard subscription on a topic registered without wildcard support.
    #[error("topic {0} does not support wildcard subscriptions")]
    WildcardUnsupported(Topic),
    /// The publisher was shut down.
    #[error("publisher shut down")]
    ShutDown,
    /// `subscribe` was called outside a tokio runtime (snapshots are built on
    /// spawned tasks).
    #[error("no tokio runtime to build snapshots on")]
    NoRuntime,
}

/// An operation named a topic with no registered handler.
///
/// # Examples
///
/// ```
/// use snapstream::publisher::Publisher;
///
/// let publisher = Publisher::<u32>::builder().build();
/// let err = publisher.refresh_topic("nope").unwrap_err();
/// assert_eq!(err.to_string(), "unknown topic nope");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown topic {0}")]
pub struct UnknownTopicError(pub Topic);

/// A snapshot handler failed (returned an error or panicked). Cheap to clone:
/// every subscriber of the failed snapshot receives the same error.
///
/// # Examples
///
/// ```
/// use snapstream::publisher::SnapshotError;
/// use std::error::Error;
///
/// let e = SnapshotError::new("disk on fire".into());
/// assert_eq!(e.to_string(), "snapshot failed");
/// assert_eq!(e.source().unwrap().to_string(), "disk on fire");
/// ```
#[derive(Clone, thiserror::Error)]
#[error("snapshot failed")]
pub struct SnapshotError(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>);

impl SnapshotError {
    /// Wraps the handler's error.
    ///
    /// # Examples
    ///
    /// See [`SnapshotError`].
    pub fn new(source: BoxError) -> Self {
        Self(Arc::from(source))
    }

    pub(crate) fn panicked() -> Self {
        Self::new(Box::new(HandlerPanicked))
    }

    /// The handler's error.
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::publisher::SnapshotError::new("x".into());
    /// assert_eq!(e.inner().to_string(), "x");
    /// ```
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SnapshotError").field(&self.0).finish()
    }
}

impl PartialEq for SnapshotError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The snapshot handler panicked (the source of a [`SnapshotError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("snapshot handler panicked")]
pub struct HandlerPanicked;

/// A snapshot sink refused events because the snapshot is already finished
/// (the handler kept the sink past its return). The events are handed back.
///
/// # Examples
///
/// ```
/// use snapstream::publisher::SinkError;
/// let e = SinkError::<u32>::closed(Vec::new());
/// assert_eq!(e.to_string(), "snapshot sink closed");
/// ```
pub struct SinkError<P> {
    events: Vec<Event<P>>,
}

impl<P> SinkError<P> {
    /// A sink-closed error handing back `events`.
    ///
    /// # Examples
    ///
    /// See [`SinkError`].
    pub fn closed(events: Vec<Event<P>>) -> Self {
        Self { events }
    }

    /// The events that were not appended.
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::publisher::SinkError::<u32>::closed(Vec::new());
    /// assert!(e.into_events().is_empty());
    /// ```
    pub fn into_events(self) -> Vec<Event<P>> {
        self.events
    }
}

impl<P> fmt::Debug for SinkError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkError")
            .field("events", &self.events.len())
            .finish()
    }
}

impl<P> fmt::Display for SinkError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("snapshot sink closed")
    }
}

impl<P> std::error::Error for SinkError<P> {}
