//! Events, topics, subjects and the framing messages a subscription yields.
//!
//! # Events
//!
//! An [`Event`] carries a [`Topic`], a [`Subject`] (the key inside the topic),
//! the index of the change that produced it and an immutable payload. The
//! payload sits behind an [`Arc`]: every subscriber reading the event shares
//! the same allocation, nothing is cloned per subscriber.
//!
//! # Batches
//!
//! Events of one key at one index travel together as an [`EventBatch`]; a
//! subscriber receives them as one item. Cloning a batch is one reference
//! count increment.
//!
//! # Framing
//!
//! A [`Subscription`](crate::subscription::Subscription) yields [`Message`]s:
//! event batches, plus two framing messages,
//! [`Message::EndOfSnapshot`] and [`Message::NewSnapshotToFollow`]. Framing is
//! a variant of `Message`, not of `Event`, so it can never be published or
//! routed — the type system rules it out.
//!
//! # Subjects and the wildcard
//!
//! [`Subject::Wildcard`] names "every key of the topic". It is valid only in a
//! subscription request, and only on a topic registered with wildcard support;
//! an event with a wildcard subject is rejected by
//! [`Publisher::publish`](crate::publisher::Publisher::publish).

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// The name of a topic: a cheap-to-clone shared string.
///
/// # Examples
///
/// ```
/// use snapstream::event::Topic;
///
/// let t = Topic::new("services");
/// assert_eq!(t.as_str(), "services");
/// assert_eq!(t, Topic::from("services"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Creates a topic name. An empty name is accepted here and rejected when
    /// a handler is registered for it.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = snapstream::event::Topic::new("nodes");
    /// assert!(!t.is_empty());
    /// ```
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The topic name.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(snapstream::event::Topic::new("a").as_str(), "a");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name is empty (never true for a registered topic).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(snapstream::event::Topic::new("").is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Topic {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<Arc<str>> for Topic {
    fn from(s: Arc<str>) -> Self {
        Self(s)
    }
}

impl From<String> for Topic {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key of an event inside its topic, or the wildcard (every key).
///
/// # Examples
///
/// ```
/// use snapstream::event::Subject;
///
/// let s = Subject::key("web");
/// assert_eq!(s.as_key(), Some("web"));
/// assert!(Subject::Wildcard.is_wildcard());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// One key.
    Key(Arc<str>),
    /// Every key of the topic; only valid when subscribing to a topic
    /// registered with wildcard support.
    Wildcard,
}

impl Subject {
    /// A subject naming one key.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(!snapstream::event::Subject::key("k").is_wildcard());
    /// ```
    pub fn key(key: impl Into<Arc<str>>) -> Self {
        Subject::Key(key.into())
    }

    /// Whether this is [`Subject::Wildcard`].
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(snapstream::event::Subject::Wildcard.is_wildcard());
    /// ```
    pub fn is_wildcard(&self) -> bool {
        matches!(self, Subject::Wildcard)
    }

    /// The key, or `None` for the wildcard.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::Subject;
    /// assert_eq!(Subject::key("k").as_key(), Some("k"));
    /// assert_eq!(Subject::Wildcard.as_key(), None);
    /// ```
    pub fn as_key(&self) -> Option<&str> {
        match self {
            Subject::Key(k) => Some(k),
            Subject::Wildcard => None,
        }
    }
}

impl From<&str> for Subject {
    fn from(s: &str) -> Self {
        Subject::key(s)
    }
}

impl From<Arc<str>> for Subject {
    fn from(s: Arc<str>) -> Self {
        Subject::Key(s)
    }
}

impl From<String> for Subject {
    fn from(s: String) -> Self {
        Subject::key(s)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Key(k) => fmt::Debug::fmt(&**k, f),
            Subject::Wildcard => f.write_str("*"),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Key(k) => f.write_str(k),
            Subject::Wildcard => f.write_str("*"),
        }
    }
}

/// One change: topic, subject, index and an immutable shared payload.
///
/// Cloning an event clones three reference counts, never the payload.
///
/// The index orders a topic's changes: the events of one
/// [`Publisher::publish`](crate::publisher::Publisher::publish) call may share
/// an index (one change touching several keys, or several events of one key
/// delivered as one batch), and every later call for the topic must use a
/// higher one; the publisher refuses a backwards or repeated index with
/// [`PublishErrorKind::IndexNotIncreasing`](crate::publisher::PublishErrorKind::IndexNotIncreasing).
///
/// # Examples
///
/// ```
/// use snapstream::event::{Event, Subject};
///
/// let e = Event::new("services", Subject::key("web"), 7, "up");
/// assert_eq!(e.topic().as_str(), "services");
/// assert_eq!(e.index(), 7);
/// assert_eq!(*e.payload(), "up");
/// ```
pub struct Event<P> {
    topic: Topic,
    subject: Subject,
    index: u64,
    payload: Arc<P>,
}

impl<P> Event<P> {
    /// Creates an event. The payload is moved behind an [`Arc`].
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::event::Event::new("t", "k", 1, 42u32);
    /// assert_eq!(*e.payload(), 42);
    /// ```
    pub fn new(
        topic: impl Into<Topic>,
        subject: impl Into<Subject>,
        index: u64,
        payload: P,
    ) -> Self {
        Self::from_shared(topic, subject, index, Arc::new(payload))
    }

    /// Creates an event around an already shared payload.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// let p = Arc::new(vec![1u8, 2]);
    /// let e = snapstream::event::Event::from_shared("t", "k", 1, p.clone());
    /// assert!(Arc::ptr_eq(e.shared_payload(), &p));
    /// ```
    pub fn from_shared(
        topic: impl Into<Topic>,
        subject: impl Into<Subject>,
        index: u64,
        payload: Arc<P>,
    ) -> Self {
        Self {
            topic: topic.into(),
            subject: subject.into(),
            index,
            payload,
        }
    }

    /// The topic.
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::event::Event::new("t", "k", 1, ());
    /// assert_eq!(e.topic().as_str(), "t");
    /// ```
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The subject (key).
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::event::Event::new("t", "k", 1, ());
    /// assert_eq!(e.subject().as_key(), Some("k"));
    /// ```
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The index of the change that produced the event.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(snapstream::event::Event::new("t", "k", 9, ()).index(), 9);
    /// ```
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The payload.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(*snapstream::event::Event::new("t", "k", 1, 'x').payload(), 'x');
    /// ```
    pub fn payload(&self) -> &P {
        &self.payload
    }

    /// The shared payload (clone it to keep the payload beyond the event).
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::event::Event::new("t", "k", 1, 5);
    /// let p = e.shared_payload().clone();
    /// assert_eq!(*p, 5);
    /// ```
    pub fn shared_payload(&self) -> &Arc<P> {
        &self.payload
    }

    /// Points the event's topic (and subject, when given) at the given
    /// equal names, so that a retained event shares them instead of holding
    /// its own allocation of each.
    pub(crate) fn share_names(&mut self, topic: &Topic, subject: Option<&Subject>) {
        if !Arc::ptr_eq(&self.topic.0, &topic.0) && self.topic == *topic {
            self.topic = topic.clone();
        }
        if let Some(subject @ Subject::Key(name)) = subject {
            if let Subject::Key(own) = &self.subject {
                if !Arc::ptr_eq(own, name) && own == name {
                    self.subject = subject.clone();
                }
            }
        }
    }
}

impl<P> Clone for Event<P> {
    fn clone(&self) -> Self {
        Self {
            topic: self.topic.clone(),
            subject: self.subject.clone(),
            index: self.index,
            payload: self.payload.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for Event<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("topic", &self.topic)
            .field("subject", &self.subject)
            .field("index", &self.index)
            .field("payload", &self.payload)
            .finish()
    }
}

impl<P: PartialEq> PartialEq for Event<P> {
    fn eq(&self, other: &Self) -> bool {
        self.topic == other.topic
            && self.subject == other.subject
            && self.index == other.index
            && self.payload == other.payload
    }
}

/// Events delivered together: one key's events at one index (or one chunk a
/// snapshot handler appended). Shared by every reader; cloning is one
/// reference count increment. Dereferences to `[Event<P>]`.
///
/// # Examples
///
/// ```
/// use snapstream::event::{Event, EventBatch};
///
/// let b = EventBatch::new(vec![Event::new("t", "k", 3, 1), Event::new("t", "k", 3, 2)]);
/// assert_eq!(b.len(), 2);
/// assert_eq!(b.index(), 3);
/// ```
pub struct EventBatch<P>(Arc<[Event<P>]>);

impl<P> EventBatch<P> {
    /// Wraps events in a shared batch.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = snapstream::event::EventBatch::new(vec![snapstream::event::Event::new("t", "k", 1, ())]);
    /// assert_eq!(b.len(), 1);
    /// ```
    pub fn new(events: Vec<Event<P>>) -> Self {
        Self(events.into())
    }

    /// The highest index of the batch's events (0 for an empty batch). Every
    /// event of a published batch has the same index.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, EventBatch};
    /// let b = EventBatch::new(vec![Event::new("t", "a", 2, ()), Event::new("t", "b", 5, ())]);
    /// assert_eq!(b.index(), 5);
    /// ```
    pub fn index(&self) -> u64 {
        self.0.iter().map(Event::index).max().unwrap_or(0)
    }

    /// The events.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = snapstream::event::EventBatch::new(vec![snapstream::event::Event::new("t", "k", 1, 7)]);
    /// assert_eq!(*b.events()[0].payload(), 7);
    /// ```
    pub fn events(&self) -> &[Event<P>] {
        &self.0
    }
}

impl<P> Deref for EventBatch<P> {
    type Target = [Event<P>];

    fn deref(&self) -> &[Event<P>] {
        &self.0
    }
}

impl<P> Clone for EventBatch<P> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<P: fmt::Debug> fmt::Debug for EventBatch<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl<P: PartialEq> PartialEq for EventBatch<P> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

/// What a subscription yields: event batches and framing.
///
/// # Examples
///
/// ```
/// use snapstream::event::Message;
///
/// let m: Message<()> = Message::EndOfSnapshot { index: 4 };
/// assert!(m.is_framing());
/// assert!(m.events().is_none());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Message<P> {
    /// Events of the subscribed key (or of every key, for a wildcard).
    Events(EventBatch<P>),
    /// The snapshot is complete; it reflects the state at `index`. Events
    /// that follow have a higher index.
    EndOfSnapshot {
        /// The index the snapshot reflects (never 0).
        index: u64,
    },
    /// The subscriber's state is stale: drop it, a fresh snapshot follows
    /// (ending with [`Message::EndOfSnapshot`]).
    NewSnapshotToFollow,
}

impl<P> Message<P> {
    /// Whether this is a framing message rather than events.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(snapstream::event::Message::<()>::NewSnapshotToFollow.is_framing());
    /// ```
    pub fn is_framing(&self) -> bool {
        !matches!(self, Message::Events(_))
    }

    /// The event batch, if this is one.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, EventBatch, Message};
    /// let m = Message::Events(EventBatch::new(vec![Event::new("t", "k", 1, ())]));
    /// assert_eq!(m.events().map(|b| b.len()), Some(1));
    /// ```
    pub fn events(&self) -> Option<&EventBatch<P>> {
        match self {
            Message::Events(b) => Some(b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_shares_payload() {
        let e = Event::new("t", "k", 1, vec![0u8; 1024]);
        let c = e.clone();
        assert!(Arc::ptr_eq(e.shared_payload(), c.shared_payload()));
        let b = EventBatch::new(vec![e]);
        let b2 = b.clone();
        assert!(Arc::ptr_eq(b[0].shared_payload(), b2[0].shared_payload()));
    }

    #[test]
    fn subject_display() {
        assert_eq!(Subject::Wildcard.to_string(), "*");
        assert_eq!(Subject::key("a").to_string(), "a");
        assert_eq!(format!("{:?}", Topic::new("x")), "\"x\"");
    }
}
