//! The publisher's figures.

use crate::event::{Subject, Topic};

/// Figures of the whole publisher, from [`Publisher::stats`](super::Publisher::stats).
///
/// # Examples
///
/// ```
/// let stats = snapstream::publisher::Publisher::<u8>::builder().build().stats();
/// assert!(stats.topics.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherStats {
    /// One entry per registered topic, in registration order.
    pub topics: Vec<TopicStats>,
    /// Subscribers served from a cached or running snapshot (including
    /// resumes found in a cached chain) — no handler call.
    pub cache_hits: u64,
    /// Snapshot builds started (handler calls).
    pub cache_misses: u64,
}

impl PublisherStats {
    /// Total subscribers over all topics.
    ///
    /// # Examples
    ///
    /// See [`PublisherStats`].
    pub fn subscribers(&self) -> usize {
        self.topics.iter().map(|t| t.subscribers).sum()
    }

    /// The figures of one key, if it currently has a buffer.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::event::Subject;
    /// let stats = snapstream::publisher::Publisher::<u8>::builder().build().stats();
    /// assert!(stats.key("t", &Subject::key("k")).is_none());
    /// ```
    pub fn key(&self, topic: &str, subject: &Subject) -> Option<&KeyStats> {
        self.topics
            .iter()
            .find(|t| t.topic.as_str() == topic)?
            .keys
            .iter()
            .find(|k| &k.subject == subject)
    }
}

/// Figures of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// The topic.
    pub topic: Topic,
    /// Subscribers over all its keys.
    pub subscribers: usize,
    /// Keys that currently have a buffer (someone subscribes), sorted.
    pub keys: Vec<KeyStats>,
    /// Events delivered to its subscribers (snapshot and live events, one
    /// per subscriber that received it) since the publisher was built. Each
    /// subscription adds its count in when it has read all that was ready,
    /// every few dozen batches while it keeps reading, and when it closes:
    /// a subscriber that has caught up is counted exactly.
    pub delivered: u64,
    /// Subscribers closed with
    /// [`SubscriptionError::Lagged`](super::SubscriptionError::Lagged) since
    /// the publisher was built.
    pub lagged: u64,
    /// Subscribers detached for lag to re-snapshot
    /// ([`LagPolicy::Resnapshot`](super::LagPolicy::Resnapshot)) since the
    /// publisher was built.
    pub resnapshotted: u64,
}

/// Figures of one (topic, subject) buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyStats {
    /// The key (or the wildcard).
    pub subject: Subject,
    /// Subscribers holding the buffer.
    pub subscribers: usize,
    /// Batches the furthest-behind subscriber has yet to read (live part).
    pub max_lag: u64,
    /// Live batches kept in memory for the subscribers and the cached chain.
    pub retained: u64,
    /// Batches appended to the key's live buffer since it was created.
    pub published: u64,
    /// Whether a finished snapshot chain is cached.
    pub cached: bool,
    /// Whether a snapshot build is running.
    pub building: bool,
}
