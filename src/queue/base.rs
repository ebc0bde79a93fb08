//! The [`BaseQueue`] contract every backend implements.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;

/// The error type a backend chains as the source of its failures.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Which storage a base queue uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// In process memory; lost when the process exits.
    Memory,
    /// An embedded, crash-safe database file on local disk.
    Disk,
    /// A Redis server shared by any number of processes.
    Redis,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Memory => "memory",
            Backend::Disk => "disk",
            Backend::Redis => "redis",
        })
    }
}

/// An item to push: opaque bytes and an optional ordering key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NewItem {
    /// The encoded item. May be empty.
    pub payload: Vec<u8>,
    /// Items sharing a key are handed out one at a time, in push order.
    pub key: Option<String>,
}

impl NewItem {
    /// An item with no ordering key.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: payload.into(),
            key: None,
        }
    }

    /// An item ordered after every earlier item with the same `key`.
    pub fn with_key(payload: impl Into<Vec<u8>>, key: impl Into<String>) -> Self {
        Self {
            payload: payload.into(),
            key: Some(key.into()),
        }
    }
}

/// Identifies one stored item; unique within its queue for the queue's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ItemId(pub u64);

/// A leased item handed out by [`BaseQueue::pop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The id to [`ack`](BaseQueue::ack) or [`nack`](BaseQueue::nack) it with.
    pub id: ItemId,
    /// The bytes that were pushed.
    pub payload: Vec<u8>,
    /// The ordering key it was pushed with.
    pub key: Option<String>,
    /// How many times it was handed out before this one (0 on first delivery).
    pub attempts: u32,
}

/// How many items a queue holds, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLen {
    /// Ready to be popped now.
    pub ready: u64,
    /// Waiting for a back-off to pass before becoming ready.
    pub delayed: u64,
    /// Handed out and not yet acknowledged.
    pub leased: u64,
}

impl QueueLen {
    /// Every item the queue holds.
    pub fn total(&self) -> u64 {
        self.ready + self.delayed + self.leased
    }
}

/// How a base queue behaves; every backend is opened with one of these.
///
/// | field | default |
/// |---|---|
/// | `capacity` | `None` (unbounded) |
/// | `unique` | `false` |
/// | `visibility_timeout` | [`QueueOptions::DEFAULT_VISIBILITY_TIMEOUT`] (30 s) |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Most items held at once (ready + delayed + leased); `None` = unbounded.
    pub capacity: Option<u64>,
    /// Reject a payload the queue already holds.
    pub unique: bool,
    /// How long a popped item stays leased before it is handed out again.
    pub visibility_timeout: Duration,
}

impl QueueOptions {
    /// The default lease length.
    pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

    /// Sets [`capacity`](Self::capacity).
    pub fn capacity(mut self, capacity: u64) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Sets [`unique`](Self::unique).
    pub fn unique(mut self, unique: bool) -> Self {
        self.unique = unique;
        self
    }

    /// Sets [`visibility_timeout`](Self::visibility_timeout).
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            capacity: None,
            unique: false,
            visibility_timeout: Self::DEFAULT_VISIBILITY_TIMEOUT,
        }
    }
}

/// Why a push failed. Every variant hands the item back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The queue stayed at capacity for the whole push timeout.
    #[error("queue is full")]
    Full(NewItem),
    /// A unique queue already holds this payload.
    #[error("item is already queued")]
    AlreadyQueued(NewItem),
    /// The queue was closed.
    #[error("queue is closed")]
    Closed(NewItem),
    /// The backend failed; the item may or may not be stored.
    #[error("queue backend failed")]
    Backend {
        /// The item that was being pushed.
        item: NewItem,
        /// What the backend reported.
        #[source]
        source: BackendError,
    },
}

impl PushError {
    /// The item that could not be pushed.
    pub fn into_item(self) -> NewItem {
        match self {
            PushError::Full(item)
            | PushError::AlreadyQueued(item)
            | PushError::Closed(item)
            | PushError::Backend { item, .. } => item,
        }
    }
}

/// Why a queue operation other than push failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue was closed.
    #[error("queue is closed")]
    Closed,
    /// The backend failed.
    #[error("queue backend failed")]
    Backend(#[source] BackendError),
}

/// A FIFO of opaque items with leases: the storage under a
/// [`WorkQueue`](crate::queue).
///
/// # Obligations
///
/// An implementation must guarantee all of the following; the conformance suite
/// in `tests/queue_conformance.rs` checks each one against every backend.
///
/// 1. **FIFO among ready items**: items become ready in push order (an item
///    returned by [`nack`](BaseQueue::nack) becomes ready again after its delay,
///    behind what is ready by then).
/// 2. **At-least-once**: [`pop`](BaseQueue::pop) *leases* an item, it does not
///    delete it. The item is deleted by [`ack`](BaseQueue::ack) only. An item
///    leased for longer than the queue's visibility timeout, or leased by a
///    process that died, becomes ready again with its attempt count raised.
///    A durable backend makes every leased item ready again when it is opened.
/// 3. **No busy polling**: `pop` with no ready item waits for a push (or a
///    delayed item becoming ready), the timeout, or [`close`](BaseQueue::close).
/// 4. **Bounded**: with a capacity, `push` waits for room for at most its
///    timeout and then fails with [`PushError::Full`], handing the item back.
///    Capacity counts ready, delayed and leased items.
/// 5. **Unique variant**: a push whose payload is already in the queue (ready,
///    delayed or leased) fails with [`PushError::AlreadyQueued`]; the check and
///    the insert are one atomic step (32 racing pushes of one payload: exactly
///    one succeeds). The dedup entry goes when the item is acked or removed.
/// 6. **Per-key order**: an item with a [`key`](NewItem::key) is never handed
///    out while an earlier item with the same key is leased or ready before it.
/// 7. **Closed**: after `close`, pushes fail with [`PushError::Closed`] and
///    pops return [`QueueError::Closed`] once nothing is ready; waiting calls
///    wake up. Items already stored stay stored.
/// 8. **Cancel safety**: dropping any returned future loses no item: a pop
///    cancelled before it returns leaves nothing leased.
///
/// The methods return boxed futures so that queues of different backends can
/// be held as `Arc<dyn BaseQueue>`.
#[allow(clippy::len_without_is_empty)] // `len` is async and returns a breakdown
pub trait BaseQueue: Send + Sync + fmt::Debug + 'static {
    /// The queue's name (unique within its backend's namespace).
    fn name(&self) -> &str;

    /// The storage this queue uses.
    fn backend(&self) -> Backend;

    /// Whether duplicate payloads are rejected.
    fn is_unique(&self) -> bool;

    /// Stores `item` at the back of the queue.
    ///
    /// Waits for room for at most `timeout` when the queue is at capacity.
    ///
    /// # Errors
    /// [`PushError::Full`] after the timeout, [`PushError::AlreadyQueued`] for a
    /// duplicate on a unique queue, [`PushError::Closed`], or
    /// [`PushError::Backend`]; every variant hands the item back.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes either stored the item or did
    /// not; it never stores it twice.
    fn push(&self, item: NewItem, timeout: Duration) -> BoxFuture<'_, Result<ItemId, PushError>>;

    /// Leases up to `max` ready items, oldest first, waiting up to `timeout`
    /// for the first one. Returns an empty vector on timeout.
    ///
    /// # Errors
    /// [`QueueError::Closed`] once closed and nothing is ready;
    /// [`QueueError::Backend`].
    ///
    /// # Cancel safety
    /// Dropping the future leaves nothing leased.
    fn pop(
        &self,
        max: usize,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, QueueError>>;

    /// Deletes leased items: they were handled. Unknown ids are ignored
    /// (a lease that expired and was handed out again may be acked twice).
    fn ack<'a>(&'a self, ids: &'a [ItemId]) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Returns leased items to the queue: ready again after `delay`, with
    /// their attempt count raised by one.
    fn nack<'a>(
        &'a self,
        ids: &'a [ItemId],
        delay: Duration,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// How many items the queue holds.
    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>>;

    /// Whether the queue holds `payload` (any state). Works on every variant;
    /// on a simple queue it may scan.
    fn has<'a>(&'a self, payload: &'a [u8]) -> BoxFuture<'a, Result<bool, QueueError>>;

    /// Deletes every item (ready, delayed and leased) and the dedup set;
    /// returns how many were deleted.
    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>>;

    /// Stops the queue: pushes fail, waiting pops return. Idempotent.
    fn close(&self);
}
