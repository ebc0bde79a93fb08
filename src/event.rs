//! Events, topics, subjects and the framing messages a subscription yields.
//!
//! # Events
//!
//! An [`Event`] carries a [`Topic`], a [`Subject`] (the key inside the topic),
//! the index of the change that produced it and an immutable payload. An
//! event is a thin handle to one shared allocation holding the payload: every
//! subscriber reading the event shares it, nothing is copied per subscriber.
//!
//! # Batches
//!
//! Events of one key at one index travel together as an [`EventBatch`]; a
//! subscriber receives them as one item. Cloning a batch is one reference
//! count increment; a batch of one event holds the event itself.
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

/// An event's topic and subject, in one allocation that a publisher shares
/// between every event of a key it retains (see `Event::share_names`).
#[derive(PartialEq)]
pub(crate) struct Names {
    topic: Topic,
    subject: Subject,
}

impl Names {
    /// The names of (topic, subject), in a new allocation.
    pub(crate) fn new(topic: Topic, subject: Subject) -> Arc<Self> {
        Arc::new(Self { topic, subject })
    }
}

/// What the events cloned from one [`Event::new`] share: the names and the
/// payload, in one allocation (a `triomphe::Arc`: one count, no weak count).
struct Shared<P> {
    names: Arc<Names>,
    payload: P,
}

/// One change: topic, subject, index and an immutable shared payload.
///
/// An event is a thin handle: its index, and a pointer to one shared
/// allocation that holds the payload (inline) and a pointer to the topic and
/// subject. Cloning an event is one reference count increment, never a copy
/// of the payload; every subscriber reading an event shares that allocation.
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
    index: u64,
    shared: triomphe::Arc<Shared<P>>,
}

impl<P> Event<P> {
    /// Creates an event; the payload is moved into the event's shared
    /// allocation.
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
        Self {
            index,
            shared: triomphe::Arc::new(Shared {
                names: Names::new(topic.into(), subject.into()),
                payload,
            }),
        }
    }

    /// The same change at another index: same topic, subject and (shared,
    /// not copied) payload. One reference count increment.
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::event::Event::new("t", "k", 1, vec![1u8, 2]);
    /// let later = e.with_index(5);
    /// assert_eq!(later.index(), 5);
    /// assert!(later.shares_payload(&e));
    /// ```
    pub fn with_index(&self, index: u64) -> Self {
        Self {
            index,
            shared: self.shared.clone(),
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
        &self.shared.names.topic
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
        &self.shared.names.subject
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
        &self.shared.payload
    }

    /// A handle to the shared payload, to keep it beyond the event without
    /// copying it (one reference count increment; it also keeps the event's
    /// topic and subject alive).
    ///
    /// # Examples
    ///
    /// ```
    /// let e = snapstream::event::Event::new("t", "k", 1, 5);
    /// let p = e.shared_payload();
    /// drop(e);
    /// assert_eq!(*p, 5);
    /// ```
    pub fn shared_payload(&self) -> SharedPayload<P> {
        SharedPayload(self.shared.clone())
    }

    /// Whether both events share one payload allocation (one is a clone of
    /// the other, or made from it by [`Event::with_index`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::Event;
    /// let e = Event::new("t", "k", 1, 0u8);
    /// assert!(e.shares_payload(&e.clone()));
    /// assert!(!e.shares_payload(&Event::new("t", "k", 1, 0u8)));
    /// ```
    pub fn shares_payload(&self, other: &Event<P>) -> bool {
        triomphe::Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Points the event at `key`'s names when they are equal to its own, or
    /// else its topic at `topic` when equal, so that a retained event shares
    /// the publisher's names instead of holding its own allocation of each.
    /// Does nothing to an event that is not this handle's alone (a clone is
    /// alive elsewhere): the names are immutable once shared.
    pub(crate) fn share_names(&mut self, topic: &Topic, key: Option<&Arc<Names>>) {
        let Some(shared) = triomphe::Arc::get_mut(&mut self.shared) else {
            return;
        };
        if let Some(key) = key {
            if Arc::ptr_eq(&shared.names, key) {
                return;
            }
            if *shared.names == **key {
                shared.names = key.clone();
                return;
            }
        }
        if let Some(names) = Arc::get_mut(&mut shared.names) {
            if !Arc::ptr_eq(&names.topic.0, &topic.0) && names.topic == *topic {
                names.topic = topic.clone();
            }
        }
    }
}

// An event is a handle: moving it never moves the payload, so it is `Unpin`
// whatever `P` is (as with `std::sync::Arc`; `triomphe::Arc` only derives it).
impl<P> Unpin for Event<P> {}

impl<P> Clone for Event<P> {
    fn clone(&self) -> Self {
        Self {
            index: self.index,
            shared: self.shared.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for Event<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("topic", self.topic())
            .field("subject", self.subject())
            .field("index", &self.index)
            .field("payload", self.payload())
            .finish()
    }
}

impl<P: PartialEq> PartialEq for Event<P> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
            && (self.shares_payload(other)
                || (self.topic() == other.topic()
                    && self.subject() == other.subject()
                    && self.payload() == other.payload()))
    }
}

/// An event's payload kept on its own: dereferences to the payload, which it
/// shares with the event it came from (see [`Event::shared_payload`]).
/// Cloning is one reference count increment.
///
/// # Examples
///
/// ```
/// use snapstream::event::{Event, SharedPayload};
///
/// let e = Event::new("t", "k", 1, String::from("v"));
/// let p: SharedPayload<String> = e.shared_payload();
/// assert_eq!(p.as_str(), "v");
/// assert!(SharedPayload::ptr_eq(&p, &e.shared_payload()));
/// ```
pub struct SharedPayload<P>(triomphe::Arc<Shared<P>>);

impl<P> SharedPayload<P> {
    /// Whether both handles point at the same payload allocation.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, SharedPayload};
    /// let a = Event::new("t", "k", 1, 3).shared_payload();
    /// let b = Event::new("t", "k", 1, 3).shared_payload();
    /// assert!(SharedPayload::ptr_eq(&a, &a.clone()));
    /// assert!(!SharedPayload::ptr_eq(&a, &b));
    /// assert_eq!(a, b); // equal payloads
    /// ```
    pub fn ptr_eq(this: &Self, other: &Self) -> bool {
        triomphe::Arc::ptr_eq(&this.0, &other.0)
    }
}

impl<P> Deref for SharedPayload<P> {
    type Target = P;

    fn deref(&self) -> &P {
        &self.0.payload
    }
}

impl<P> AsRef<P> for SharedPayload<P> {
    fn as_ref(&self) -> &P {
        &self.0.payload
    }
}

// A handle, like `Event`: `Unpin` whatever `P` is.
impl<P> Unpin for SharedPayload<P> {}

impl<P> Clone for SharedPayload<P> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<P: fmt::Debug> fmt::Debug for SharedPayload<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0.payload, f)
    }
}

impl<P: PartialEq> PartialEq for SharedPayload<P> {
    fn eq(&self, other: &Self) -> bool {
        Self::ptr_eq(self, other) || self.0.payload == other.0.payload
    }
}

/// Events delivered together: one key's events at one index (or one chunk a
/// snapshot handler appended). Shared by every reader; cloning is one
/// reference count increment. Dereferences to `[Event<P>]`.
///
/// A batch of one event holds the event itself (no allocation of its own);
/// a larger batch is one shared slice.
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
pub struct EventBatch<P>(Batch<P>);

enum Batch<P> {
    One(Event<P>),
    Many(Arc<[Event<P>]>),
}

impl<P> EventBatch<P> {
    /// Wraps events in a shared batch.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = snapstream::event::EventBatch::new(vec![snapstream::event::Event::new("t", "k", 1, ())]);
    /// assert_eq!(b.len(), 1);
    /// ```
    pub fn new(mut events: Vec<Event<P>>) -> Self {
        if events.len() == 1 {
            if let Some(event) = events.pop() {
                return Self(Batch::One(event));
            }
        }
        Self(Batch::Many(events.into()))
    }

    /// A batch of one event (no allocation).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::{Event, EventBatch};
    /// let b = EventBatch::one(Event::new("t", "k", 4, 'x'));
    /// assert_eq!(b.len(), 1);
    /// assert_eq!(b.index(), 4);
    /// ```
    pub fn one(event: Event<P>) -> Self {
        Self(Batch::One(event))
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
        match &self.0 {
            Batch::One(e) => e.index(),
            Batch::Many(events) => events.iter().map(Event::index).max().unwrap_or(0),
        }
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
        match &self.0 {
            Batch::One(e) => std::slice::from_ref(e),
            Batch::Many(events) => events,
        }
    }
}

impl<P> From<Event<P>> for EventBatch<P> {
    fn from(event: Event<P>) -> Self {
        Self::one(event)
    }
}

impl<P> Deref for EventBatch<P> {
    type Target = [Event<P>];

    fn deref(&self) -> &[Event<P>] {
        self.events()
    }
}

impl<P> Clone for EventBatch<P> {
    fn clone(&self) -> Self {
        Self(match &self.0 {
            Batch::One(e) => Batch::One(e.clone()),
            Batch::Many(events) => Batch::Many(events.clone()),
        })
    }
}

impl<P: fmt::Debug> fmt::Debug for EventBatch<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.events()).finish()
    }
}

impl<P: PartialEq> PartialEq for EventBatch<P> {
    fn eq(&self, other: &Self) -> bool {
        self.events() == other.events()
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
        assert!(e.shares_payload(&c));
        let b = EventBatch::new(vec![e]);
        let b2 = b.clone();
        assert!(b[0].shares_payload(&b2[0]));
        let many = EventBatch::new(vec![c.clone(), c.with_index(2)]);
        assert!(many.clone()[1].shares_payload(&c));
        assert_eq!(many.index(), 2);
    }

    #[test]
    fn thin_event_and_inline_batch_of_one() {
        // What a retained u64 event costs (benches/memory.rs): a 16-byte
        // handle, a 24-byte shared allocation (count, names, payload: a
        // 32-byte glibc chunk) and a 24-byte batch, with no allocation for
        // a batch of one.
        assert_eq!(std::mem::size_of::<Event<u64>>(), 16);
        assert_eq!(std::mem::size_of::<EventBatch<u64>>(), 24);
        assert_eq!(std::mem::size_of::<Shared<u64>>() + 8, 24);
        let b = EventBatch::new(vec![Event::new("t", "k", 1, 5u64)]);
        assert!(matches!(b.0, Batch::One(_)));
        assert!(EventBatch::<u64>::new(Vec::new()).is_empty());
    }

    #[test]
    fn share_names_only_when_equal_and_unshared() {
        let topic = Topic::new("t");
        let key = Names::new(topic.clone(), Subject::key("k"));
        let mut e = Event::new("t", "k", 1, ());
        e.share_names(&topic, Some(&key));
        assert!(Arc::ptr_eq(&e.shared.names, &key));
        // Another key's names: only the topic is shared.
        let mut other = Event::new("t", "j", 1, ());
        other.share_names(&topic, Some(&key));
        assert!(!Arc::ptr_eq(&other.shared.names, &key));
        assert!(Arc::ptr_eq(&other.topic().0, &topic.0));
        assert_eq!(other.subject(), &Subject::key("j"));
        // A clone alive elsewhere: left alone.
        let mut shared = Event::new("t", "k", 1, ());
        let _clone = shared.clone();
        shared.share_names(&topic, Some(&key));
        assert!(!Arc::ptr_eq(&shared.shared.names, &key));
        assert_eq!(shared, Event::new("t", "k", 1, ()));
    }

    #[test]
    fn subject_display() {
        assert_eq!(Subject::Wildcard.to_string(), "*");
        assert_eq!(Subject::key("a").to_string(), "a");
        assert_eq!(format!("{:?}", Topic::new("x")), "\"x\"");
    }
}
