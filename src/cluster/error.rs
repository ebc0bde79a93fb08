//! Errors of the cluster's operations.

use std::path::PathBuf;
use std::time::Duration;

use super::subject::SubjectError;
use crate::codec::CodecError;
use crate::publisher::{RegisterError, SubscribeError};

/// An error of the NATS client, chained as the source.
pub type NatsError = async_nats::Error;

/// Opening the log (creating or looking up its stream) failed.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::{LogConfig, OpenError};
///
/// let err = LogConfig::new("bad name", "app").validate().unwrap_err();
/// assert!(matches!(err, OpenError::InvalidStreamName(_)));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The stream name is empty or contains whitespace, `.`, `*`, `>`, `/`
    /// or `\`.
    #[error("invalid stream name {0:?}")]
    InvalidStreamName(String),
    /// The subject prefix is not a literal NATS subject.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The stream exists but does not capture `<prefix>.>`.
    #[error("stream {stream} does not capture {wanted} (its subjects: {subjects:?})")]
    SubjectsMismatch {
        /// The stream.
        stream: String,
        /// The subject filter this log needs.
        wanted: String,
        /// The stream's subjects.
        subjects: Vec<String>,
    },
    /// JetStream refused or did not answer.
    #[error("jetstream")]
    Nats(#[source] NatsError),
}

/// Writing a change to the log failed. Whether the change reached the log is
/// told by the variant: only [`WriteError::Ack`] leaves it unknown.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::{SubjectError, WriteError};
///
/// let err = WriteError::Subject(SubjectError::Empty { what: "key" });
/// assert_eq!(err.to_string(), "empty key");
/// assert!(!err.may_be_in_log());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The topic or key cannot be written as a subject; nothing was sent.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The payload did not encode; nothing was sent.
    #[error("payload did not encode")]
    Encode(#[source] CodecError),
    /// The message could not be sent (e.g. larger than the server's maximum
    /// payload, or the connection is closed); it is not in the log.
    #[error("change not sent")]
    Send(#[source] NatsError),
    /// The message was sent and JetStream answered that it did not store it
    /// (no stream server listens on the subject right now, e.g. while a
    /// replicated stream has no leader; or a precondition failed): not in
    /// the log.
    #[error("change refused by jetstream")]
    Refused(#[source] NatsError),
    /// The message was sent but JetStream's acknowledgement did not arrive
    /// (timeout, connection lost) or was not understood: the change may or
    /// may not be in the log, and counts as not accepted.
    #[error("change not acknowledged")]
    Ack(#[source] NatsError),
}

impl WriteError {
    /// Whether the change may have reached the log despite the error (only
    /// when the acknowledgement is missing).
    ///
    /// # Examples
    ///
    /// See [`WriteError`].
    pub fn may_be_in_log(&self) -> bool {
        matches!(self, WriteError::Ack(_))
    }
}

/// A checkpoint file could not be read or written.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::CheckpointError;
///
/// let e = CheckpointError::Corrupt("/tmp/x".into(), "eof".into());
/// assert_eq!(e.to_string(), "corrupt checkpoint /tmp/x: eof");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading, writing, syncing or renaming failed.
    #[error("checkpoint {path}", path = .0.display())]
    Io(PathBuf, #[source] std::io::Error),
    /// The file is not a checkpoint this version understands.
    #[error("corrupt checkpoint {path}: {1}", path = .0.display())]
    Corrupt(PathBuf, String),
}

/// Starting a node failed.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::StartError;
/// use snapstream::publisher::RegisterError;
///
/// let e = StartError::Register(RegisterError::EmptyTopic);
/// assert_eq!(e.to_string(), "empty topic name");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A topic could not be registered on the node's publisher.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The checkpoint exists but cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The stream could not be looked up.
    #[error("jetstream")]
    Nats(#[source] NatsError),
}

/// A node could not serve a subscription.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::NodeSubscribeError;
/// use std::time::Duration;
///
/// let e = NodeSubscribeError::NotCaughtUp { requested: 9, applied: 4, waited: Duration::from_secs(3) };
/// assert_eq!(e.to_string(), "node has applied index 4, not yet 9 (waited 3s)");
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeSubscribeError {
    /// The request's index is newer than this node has applied, and the node
    /// did not catch up within the wait: try again, or another node. Never
    /// answered with older state.
    #[error("node has applied index {applied}, not yet {requested} (waited {waited:?})")]
    NotCaughtUp {
        /// The index the subscriber asked to resume from.
        requested: u64,
        /// The newest index this node had applied when the wait ended.
        applied: u64,
        /// How long the node waited.
        waited: Duration,
    },
    /// The node's follower stopped (the node shut down) before catching up.
    #[error("node stopped")]
    Stopped,
    /// The node's publisher refused the subscription.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
}
