//! Several nodes fed from one NATS JetStream log (feature `jetstream`).
//!
//! ```text
//!  LogWriter ──put──► JetStream stream (R1 or R3) ──► follower, node A ──► NodeState A ─► Publisher A ──► subscribers
//!   (ack = index)                                 └──► follower, node B ──► NodeState B ─► Publisher B ──► subscribers
//! ```
//!
//! One process holds one [`Publisher`](crate::publisher::Publisher). To serve
//! more subscribers than one machine can, run several nodes, each with its own
//! publisher, all fed from one replicated log. We do not write consensus: the
//! log is a NATS JetStream stream — clustered, replicated, durable — which
//! plays the part Raft plays for Consul's servers and etcd for Kubernetes'
//! API servers.
//!
//! # One index space
//!
//! A [`LogWriter`] puts each change of the state store into the stream and
//! counts it as accepted only once JetStream acknowledges it (for a stream
//! replicated three times: once two servers stored it). The acknowledgement's
//! *stream sequence* is the change's index — on every node, for every topic.
//! A subscriber that saw index 42 on node A may resume from 42 on node B.
//!
//! # Subjects
//!
//! A change of `key` in `topic` is stored under the subject
//! `<prefix>.<topic>.<key>`, topic and key each escaped into one subject
//! token (letters, digits, `-` and `_` stay; every other byte becomes `%XX`;
//! see [`escape_token`]). Empty topics or keys, and subjects over
//! [`MAX_SUBJECT_LEN`], are refused with a [`SubjectError`]. The payload is
//! the change encoded by a [`PayloadCodec`] ([`JsonCodec`] for serde types).
//!
//! # Nodes
//!
//! A [`Node`] runs a follower: an ordered JetStream consumer delivering the
//! stream in sequence. Each change is applied to the node-local
//! [`NodeState`], then published into the node's publisher with its sequence
//! as the index. The node's snapshot handlers read the node-local state under
//! its lock and report the applied sequence as the snapshot's index, so a
//! snapshot and the live events that follow it agree exactly. One stream
//! sequence across all topics is naturally increasing per topic, which is
//! what the publisher requires. (The publisher reports an empty snapshot at
//! index 0 as index 1, which would hide the change at sequence 1: on a log
//! that has no change yet, a fresh subscription's snapshot therefore waits
//! for the first one.)
//!
//! # Checkpoints, restarts, rebuilds
//!
//! With a [checkpoint](NodeBuilder::checkpoint), the follower records its
//! last applied sequence in a file (replaced atomically: write, sync, rename)
//! after [`NodeState::persist`], whenever it has caught up with the stream
//! and at the latest every [`DEFAULT_CHECKPOINT_EVERY`] messages. A restarted
//! node resumes right after it. Without a usable checkpoint — none, one of
//! another stream or of an earlier stream of the same name, one ahead of the
//! stream — the node *rebuilds*: it empties its state and replays the whole
//! log, and only then follows — with the consumer it replayed the log with,
//! so a node holds one consumer of the stream. Snapshots wait during a
//! rebuild.
//!
//! # Bad input
//!
//! - A message whose subject or payload does not decode is **quarantined**:
//!   an error is logged with its sequence, [`NodeStats::quarantined`] counts
//!   it, the follower moves past it (applies and publishes nothing for it)
//!   and goes on.
//! - A **sequence gap** — the next message is not the applied sequence plus
//!   one, e.g. messages deleted from the stream, or aged out by the stream's
//!   limits while the node was down — means this node missed changes it
//!   cannot know. The follower logs an error, counts it in
//!   [`NodeStats::gaps`], rebuilds the state from the log as it now stands,
//!   and force-closes the publisher's subscriptions (their views missed the
//!   same changes): re-subscribing gives them a snapshot of the rebuilt
//!   state. The stream must therefore keep every message (the default of
//!   [`LogConfig`]) — unless it is compacted (below), where holes are expected.
//!
//! # Compacted logs
//!
//! A log opened with [`LogConfig::compacted`] keeps only the newest message
//! of each key (any per-subject limit counts: the follower reads the
//! stream's setting when the node starts). Rebuilding a node's state then
//! replays one change per key, a tombstone for each deleted one, however
//! long the log's history: as cheap as a snapshot, for the node that starts
//! without a checkpoint and for the one resuming from an old one alike.
//! Holes in the sequence are expected — a change superseded by a newer one
//! of its key before this node read it — so the follower passes over them
//! (counted in [`NodeStats::compacted`]) instead of rebuilding. A node that
//! resumes after a hole has every key's newest change, which is all a state
//! of keys needs; what it gives up is gap detection: a change deleted from
//! the stream by hand (or aged out by another limit) looks like a compacted
//! one. Deletes must therefore be written as tombstones, never made by
//! purging a key's subject.
//!
//! # Read-your-index, beside Kubernetes' "not older than"
//!
//! A client that saw index `i` on one node and resumes on another must never
//! be served older state as if it were newer. [`Node::subscribe`] therefore
//! waits, when the requested index is newer than the node has applied, until
//! the node has applied it — at most [`catch_up_timeout`](NodeBuilder::catch_up_timeout)
//! ([`DEFAULT_CATCH_UP_TIMEOUT`], 3 s) — and then subscribes; past the bound
//! it fails with [`NodeSubscribeError::NotCaughtUp`], and the client tries
//! again or elsewhere.
//!
//! The read half is Kubernetes' `resourceVersionMatch=NotOlderThan` (a get
//! or list with `resourceVersion=X`): the answer is at least as new as `X`,
//! possibly newer. The API server waits for its watch cache to reach `X`
//! (up to 3 s) and otherwise answers "Too large resource version" (504, with
//! a retry hint); `NotCaughtUp` is that answer. The resume half is a watch
//! from `X`: after the wait the publisher continues right after `i` when it
//! still holds the live events since `i`; where Kubernetes would answer
//! `410 Gone` and the client relists, the subscriber gets
//! `NewSnapshotToFollow` and a snapshot at the node's applied index (≥ `i`).
//!
//! # Over the network, failing over between nodes
//!
//! With the `net` feature too, `Node::server` serves the node's publisher
//! over gRPC with read-your-index installed (`NodeCatchUp`): a resume from
//! an index the node has not applied waits, bounded, and past the bound
//! ends with `UNAVAILABLE`. A `net::Client` given
//! every node's address moves, when its node goes away, to the next one and
//! resumes there by index: every node publishes the same events with the
//! same indexes, so when that node's publisher still holds the index (the
//! key's newest, or one in its cached snapshot chain) the subscriber
//! continues with the next live event — no new snapshot — and otherwise
//! gets `NewSnapshotToFollow` and a snapshot at an index at least as new.
//!
//! # Examples
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use snapstream::cluster::{JsonCodec, Log, LogConfig, Node, NodeState};
//! use snapstream::event::{Event, Subject, Topic};
//! use snapstream::publisher::SubscribeRequest;
//!
//! #[derive(Default)]
//! struct Kv(BTreeMap<String, Event<String>>);
//!
//! impl NodeState<String> for Kv {
//!     fn apply(&mut self, e: &Event<String>) {
//!         self.0.insert(e.subject().as_key().unwrap_or_default().to_string(), e.clone());
//!     }
//!     fn snapshot(&self, _topic: &Topic, subject: &Subject) -> Vec<Event<String>> {
//!         match subject.as_key() {
//!             Some(k) => self.0.get(k).cloned().into_iter().collect(),
//!             None => self.0.values().cloned().collect(),
//!         }
//!     }
//!     fn reset(&mut self) {
//!         self.0.clear();
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("127.0.0.1:4222").await?;
//! let log = Log::open(client, &LogConfig::new("SERVICES", "services-log").replicas(3)).await?;
//!
//! let mut builder = Node::builder(&log, Kv::default(), JsonCodec);
//! builder.wildcard_topic("services");
//! let node = builder.start().await?;
//!
//! let writer = log.writer::<String, _>(JsonCodec);
//! let index = writer.put("services", "web", &"up".to_string()).await?;
//!
//! // Read-your-write on any node: wait for the writer's index.
//! let mut sub = node
//!     .subscribe(SubscribeRequest::new("services", Subject::key("web")).index(index))
//!     .await?;
//! let first = sub.next().await?; // a snapshot at an index >= `index`
//! # let _ = first; Ok(()) }
//! ```

mod checkpoint;
mod error;
mod node;
#[cfg(feature = "net")]
mod serve;
mod state;
mod subject;
mod writer;

use std::sync::Arc;

use async_nats::jetstream;

pub use crate::codec::{BinaryCodec, CodecError, JsonCodec, PayloadCodec, WireFormat};
pub use error::{
    CheckpointError, NatsError, NodeSubscribeError, OpenError, StartError, WriteError,
};
pub use node::{
    Node, NodeBuilder, NodeStats, DEFAULT_CATCH_UP_TIMEOUT, DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CONSUMER_EXPIRY,
};
#[cfg(feature = "net")]
pub use serve::NodeCatchUp;
pub use state::NodeState;
pub use subject::{escape_token, subject_for, unescape_token, SubjectError, MAX_SUBJECT_LEN};
pub use writer::LogWriter;

/// Default number of servers a new stream is replicated on: 1 (use 3 on a
/// three-server JetStream cluster).
pub const DEFAULT_REPLICAS: usize = 1;

/// Where the log lives: the JetStream stream's name, the subject prefix its
/// changes are written under, and — for a stream [`Log::open`] creates — how
/// many servers replicate it.
///
/// | option | default |
/// |---|---|
/// | [`replicas`](Self::replicas) | [`DEFAULT_REPLICAS`] (1) |
/// | [`compacted`](Self::compacted) | `false`: every message kept |
///
/// A stream created here keeps every message on file storage (no age, count,
/// size or per-subject limit), as gap detection expects — or, compacted, the
/// newest message of each key (see [`compacted`](Self::compacted)).
///
/// # Examples
///
/// ```
/// use snapstream::cluster::LogConfig;
///
/// let config = LogConfig::new("STATE", "app.state").replicas(3);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct LogConfig {
    stream: String,
    prefix: String,
    replicas: usize,
    compacted: bool,
}

impl LogConfig {
    /// A log in stream `stream`, under subjects `<prefix>.>`.
    ///
    /// # Examples
    ///
    /// See [`LogConfig`].
    pub fn new(stream: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            prefix: prefix.into(),
            replicas: DEFAULT_REPLICAS,
            compacted: false,
        }
    }

    /// How many servers replicate a stream that [`Log::open`] creates (`0`
    /// is treated as 1). An existing stream keeps its own setting.
    ///
    /// # Examples
    ///
    /// See [`LogConfig`].
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Whether a stream that [`Log::open`] creates is *compacted*: it keeps
    /// only the newest message of each key (JetStream's
    /// `max_messages_per_subject = 1`), so the log holds one message per key
    /// whatever the number of changes, and a node rebuilding its state from
    /// it applies one change per key — a rebuild costs what a snapshot does.
    /// An existing stream keeps its own setting; [`Log::is_compacted`] tells
    /// which one the log has.
    ///
    /// What it costs: the stream sequence has holes by design (each change
    /// superseded by a newer one of its key), so a node can no longer tell a
    /// change it missed from one compacted away — a follower of a compacted
    /// log detects no sequence gaps (see the [module docs](self#compacted-logs)).
    ///
    /// **Deletes are tombstones**: write a change whose payload says the key
    /// is gone (e.g. `None` of an `Option<V>` payload) and let the state
    /// remove the key when it applies it. The tombstone stays as the key's
    /// one message, so a node that was down or rebuilds learns of the delete.
    /// Never delete a key by purging its subject: a node that was down then
    /// keeps the key forever.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::cluster::LogConfig;
    ///
    /// let config = LogConfig::new("STATE", "app.state").compacted(true);
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn compacted(mut self, compacted: bool) -> Self {
        self.compacted = compacted;
        self
    }

    /// Checks the stream name and the prefix without contacting NATS.
    ///
    /// # Errors
    ///
    /// [`OpenError::InvalidStreamName`] or [`OpenError::Subject`]
    /// ([`SubjectError::InvalidPrefix`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::cluster::{LogConfig, OpenError};
    /// assert!(matches!(LogConfig::new("S", "a.*").validate(), Err(OpenError::Subject(_))));
    /// ```
    pub fn validate(&self) -> Result<(), OpenError> {
        let bad = |c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\');
        if self.stream.is_empty() || self.stream.contains(bad) {
            return Err(OpenError::InvalidStreamName(self.stream.clone()));
        }
        if !subject::valid_prefix(&self.prefix) {
            return Err(SubjectError::InvalidPrefix(self.prefix.clone()).into());
        }
        Ok(())
    }
}

/// Whether a stream keeps a limited number of messages per subject: its
/// sequence then has holes by design.
fn is_compacted(config: &jetstream::stream::Config) -> bool {
    config.max_messages_per_subject > 0
}

/// An open log: the stream, its subject prefix, and the JetStream context to
/// reach it. Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # #![allow(dead_code)]
/// use snapstream::cluster::{Log, LogConfig};
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("127.0.0.1:4222").await?;
/// let log = Log::open(client, &LogConfig::new("STATE", "state")).await?;
/// assert_eq!(log.subject("users", "a.b")?, "state.users.a%2Eb");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Log {
    js: jetstream::Context,
    stream: Arc<str>,
    prefix: Arc<str>,
    compacted: bool,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .field("compacted", &self.compacted)
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens the log: looks up its stream, or creates it (subjects
    /// `<prefix>.>`, file storage, every message kept or — compacted — the
    /// newest of each key, the configured replicas).
    ///
    /// # Errors
    ///
    /// As [`LogConfig::validate`]; [`OpenError::SubjectsMismatch`] when the
    /// stream exists without capturing `<prefix>.>`; [`OpenError::Nats`] when
    /// JetStream refuses or does not answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (a stream created before the cancel stays).
    ///
    /// # Examples
    ///
    /// See [`Log`].
    pub async fn open(client: async_nats::Client, config: &LogConfig) -> Result<Self, OpenError> {
        config.validate()?;
        let js = jetstream::new(client);
        let wanted = format!("{}.>", config.prefix);
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: config.stream.clone(),
                subjects: vec![wanted.clone()],
                num_replicas: config.replicas,
                storage: jetstream::stream::StorageType::File,
                max_messages_per_subject: if config.compacted { 1 } else { 0 },
                ..Default::default()
            })
            .await
            .map_err(|e| OpenError::Nats(Box::new(e)))?;
        let compacted = is_compacted(&stream.cached_info().config);
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.contains(&wanted) {
            return Err(OpenError::SubjectsMismatch {
                stream: config.stream.clone(),
                wanted,
                subjects: subjects.clone(),
            });
        }
        Ok(Self {
            js,
            stream: config.stream.as_str().into(),
            prefix: config.prefix.as_str().into(),
            compacted,
        })
    }

    /// Whether the stream keeps a limited number of messages per key (a
    /// [compacted](LogConfig::compacted) log), as it was when the log was
    /// opened. A node reads the setting again when it starts.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// use snapstream::cluster::{Log, LogConfig};
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("127.0.0.1:4222").await?;
    /// let log = Log::open(client, &LogConfig::new("STATE", "state").compacted(true)).await?;
    /// assert!(log.is_compacted());
    /// # Ok(()) }
    /// ```
    pub fn is_compacted(&self) -> bool {
        self.compacted
    }

    /// The stream's name.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # fn f(log: &snapstream::cluster::Log) { assert!(!log.stream_name().is_empty()); }
    /// ```
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The subject prefix.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # fn f(log: &snapstream::cluster::Log) { assert!(!log.prefix().is_empty()); }
    /// ```
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subject a change of `key` in `topic` is written to.
    ///
    /// # Errors
    ///
    /// As [`subject_for`].
    ///
    /// # Examples
    ///
    /// See [`Log`].
    pub fn subject(&self, topic: &str, key: &str) -> Result<String, SubjectError> {
        subject_for(&self.prefix, topic, key)
    }

    /// The JetStream context the log uses (to inspect or administer the
    /// stream).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # async fn f(log: &snapstream::cluster::Log) {
    /// let stream = log.jetstream().get_stream(log.stream_name()).await.unwrap();
    /// # drop(stream); }
    /// ```
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// A writer of changes with payloads `P` encoded by `codec`.
    ///
    /// # Examples
    ///
    /// See [`LogWriter`].
    pub fn writer<P, C: PayloadCodec<P>>(&self, codec: C) -> LogWriter<P, C> {
        LogWriter::new(self, codec)
    }
}
