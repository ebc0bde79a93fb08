//! The node-local state a follower applies the log to.

use crate::event::{Event, Subject, Topic};
use crate::publisher::BoxError;

/// The state a node builds from the log, and reads its snapshots from.
///
/// The follower calls [`apply`](Self::apply) with every change of the log in
/// stream-sequence order, under a write lock; the node's snapshot handlers
/// call [`snapshot`](Self::snapshot) under a read lock and report the
/// follower's applied sequence as the snapshot's index. Snapshot and live
/// events therefore agree exactly: a change is applied before it is
/// published, so a snapshot either contains it (and the live copy is dropped
/// as already seen) or is older than it (and the live copy follows).
///
/// # Obligations
///
/// - `apply` is deterministic: every node that applies the same log holds the
///   same state.
/// - `snapshot` returns the events that make up the current state of
///   `subject` in `topic` (every key of the topic for [`Subject::Wildcard`],
///   when the topic is served with wildcard support). Their indexes are for
///   the subscriber's information (e.g. the sequence that last changed each
///   key); the snapshot as a whole is at the applied sequence.
/// - `reset` empties the state: a rebuild then replays the whole log.
/// - With a checkpoint configured, [`persist`](Self::persist) makes the state
///   durable up to `index` *before* the checkpoint records it, and a restart
///   must hand the node the persisted state. A restart replays every change
///   after the checkpoint, so a state that persists itself more often than
///   that must accept changes it already holds again (a key-value state that
///   stores each key's newest value does).
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
/// use snapstream::cluster::NodeState;
/// use snapstream::event::{Event, Subject, Topic};
///
/// #[derive(Default)]
/// struct Kv(BTreeMap<(Topic, String), Event<String>>);
///
/// impl NodeState<String> for Kv {
///     fn apply(&mut self, event: &Event<String>) {
///         let key = event.subject().as_key().unwrap_or_default().to_string();
///         self.0.insert((event.topic().clone(), key), event.clone());
///     }
///     fn snapshot(&self, topic: &Topic, subject: &Subject) -> Vec<Event<String>> {
///         self.0
///             .iter()
///             .filter(|((t, k), _)| t == topic && (subject.is_wildcard() || subject.as_key() == Some(k)))
///             .map(|(_, e)| e.clone())
///             .collect()
///     }
///     fn reset(&mut self) {
///         self.0.clear();
///     }
/// }
///
/// let mut kv = Kv::default();
/// kv.apply(&Event::new("users", "alice", 3, "admin".to_string()));
/// assert_eq!(kv.snapshot(&"users".into(), &Subject::Wildcard).len(), 1);
/// ```
pub trait NodeState<P>: Send + Sync + 'static {
    /// Applies one change of the log; `event.index()` is its stream sequence.
    fn apply(&mut self, event: &Event<P>);

    /// The events that make up the current state of `subject` in `topic`.
    fn snapshot(&self, topic: &Topic, subject: &Subject) -> Vec<Event<P>>;

    /// Empties the state, before a rebuild replays the log.
    fn reset(&mut self);

    /// Makes the state durable up to `index`; called before each checkpoint
    /// write. The default does nothing: right for a state that lives in
    /// memory, on a node without a checkpoint (which rebuilds from the log
    /// when it starts).
    ///
    /// # Errors
    ///
    /// The state store's error: the checkpoint is then not written (the node
    /// logs it, counts it in [`NodeStats::checkpoint_errors`](super::NodeStats),
    /// and goes on following).
    fn persist(&mut self, index: u64) -> Result<(), BoxError> {
        let _ = index;
        Ok(())
    }
}

/// A boxed state (e.g. `Box<dyn NodeState<P>>`) is a state.
impl<P, S: NodeState<P> + ?Sized> NodeState<P> for Box<S> {
    fn apply(&mut self, event: &Event<P>) {
        (**self).apply(event)
    }

    fn snapshot(&self, topic: &Topic, subject: &Subject) -> Vec<Event<P>> {
        (**self).snapshot(topic, subject)
    }

    fn reset(&mut self) {
        (**self).reset()
    }

    fn persist(&mut self, index: u64) -> Result<(), BoxError> {
        (**self).persist(index)
    }
}
