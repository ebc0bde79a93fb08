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
    /// The bytes the item counts against
    /// [`QueueOptions::max_item_bytes`]: its payload and its key together.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::NewItem;
    ///
    /// assert_eq!(NewItem::with_key("abc", "k1").size(), 5);
    /// ```
    pub fn size(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, String::len)
    }

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
/// | `max_item_bytes` | [`QueueOptions::DEFAULT_MAX_ITEM_BYTES`] (1 MiB) |
///
/// Every backend checks the options with [`validate`](Self::validate) when
/// the queue is opened and refuses to open with a value that cannot work.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::queue::QueueOptions;
///
/// let opts = QueueOptions::default().capacity(10_000).max_item_bytes(64 * 1024);
/// assert!(opts.validate().is_ok());
/// let err = QueueOptions::default().visibility_timeout(Duration::ZERO).validate().unwrap_err();
/// assert_eq!(err.field, "visibility_timeout");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Most items held at once (ready + delayed + leased); `None` = unbounded.
    /// At least 1.
    pub capacity: Option<u64>,
    /// Reject a payload the queue already holds.
    pub unique: bool,
    /// How long a popped item stays leased before it is handed out again.
    /// At least 1 ms.
    pub visibility_timeout: Duration,
    /// The largest item a push accepts: its payload and key together, in
    /// bytes. At least 1.
    ///
    /// A larger item fails its push at once with [`PushError::TooLarge`],
    /// before the backend sees it. Every backend keeps a whole item in memory
    /// at least once while it passes through, so this bounds what one push
    /// can cost the process (and, for Redis, the server and the connection
    /// other pushes share).
    pub max_item_bytes: usize,
}

impl QueueOptions {
    /// The default lease length.
    pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default [`max_item_bytes`](Self::max_item_bytes): 1 MiB.
    pub const DEFAULT_MAX_ITEM_BYTES: usize = 1024 * 1024;
    /// The shortest [`visibility_timeout`](Self::visibility_timeout) accepted.
    pub const MIN_VISIBILITY_TIMEOUT: Duration = Duration::from_millis(1);

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

    /// Sets [`max_item_bytes`](Self::max_item_bytes).
    pub fn max_item_bytes(mut self, bytes: usize) -> Self {
        self.max_item_bytes = bytes;
        self
    }

    /// Checks the values; every backend calls this when it opens a queue.
    ///
    /// # Errors
    /// [`InvalidOption`] naming the first bad field: a `capacity` of 0
    /// (every push would wait out its timeout and fail), a
    /// `visibility_timeout` under [1 ms](Self::MIN_VISIBILITY_TIMEOUT) (an
    /// item would be handed out again while it is being handled), or a
    /// `max_item_bytes` of 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::QueueOptions;
    ///
    /// let err = QueueOptions::default().capacity(0).validate().unwrap_err();
    /// assert_eq!((err.field, err.reason), ("capacity", "must be at least 1"));
    /// ```
    pub fn validate(&self) -> Result<(), InvalidOption> {
        let bad = |field: &'static str, reason: &'static str| Err(InvalidOption { field, reason });
        if self.capacity == Some(0) {
            return bad("capacity", "must be at least 1");
        }
        if self.visibility_timeout < Self::MIN_VISIBILITY_TIMEOUT {
            return bad("visibility_timeout", "must be at least 1 ms");
        }
        if self.max_item_bytes == 0 {
            return bad("max_item_bytes", "must be at least 1");
        }
        Ok(())
    }

    /// Fails with [`PushError::TooLarge`] when `item` is above
    /// [`max_item_bytes`](Self::max_item_bytes); backends call this first
    /// thing in `push`.
    pub(crate) fn check_size(&self, item: NewItem) -> Result<NewItem, PushError> {
        let size = item.size();
        if size > self.max_item_bytes {
            return Err(PushError::TooLarge {
                item,
                size,
                limit: self.max_item_bytes,
            });
        }
        Ok(item)
    }
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            capacity: None,
            unique: false,
            visibility_timeout: Self::DEFAULT_VISIBILITY_TIMEOUT,
            max_item_bytes: Self::DEFAULT_MAX_ITEM_BYTES,
        }
    }
}

/// An option value a queue cannot run with: which field, and why.
///
/// The one shape every queue constructor reports bad options in:
/// [`QueueOptions::validate`] (and so every base queue backend, directly or as
/// [`QueueError::InvalidOption`]) and
/// [`WorkQueueOptions::validate`](crate::queue::WorkQueueOptions::validate).
///
/// # Examples
///
/// ```
/// use snapstream::queue::{InvalidOption, QueueOptions};
///
/// let err: InvalidOption = QueueOptions::default().max_item_bytes(0).validate().unwrap_err();
/// assert_eq!(err.to_string(), "invalid max_item_bytes: must be at least 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidOption {
    /// The field's name.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
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
    /// The item is larger than the queue's
    /// [`max_item_bytes`](QueueOptions::max_item_bytes); it was refused before
    /// the backend saw it (nothing is stored, no other push is affected).
    #[error("item of {size} bytes is over the queue's max_item_bytes of {limit}")]
    TooLarge {
        /// The item that was being pushed.
        item: NewItem,
        /// Its [size](NewItem::size).
        size: usize,
        /// The queue's `max_item_bytes`.
        limit: usize,
    },
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
            | PushError::TooLarge { item, .. }
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
    /// The queue cannot be opened with these [`QueueOptions`].
    #[error(transparent)]
    InvalidOption(#[from] InvalidOption),
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
/// 9. **Options and limits**: the constructor refuses options that do not
///    [validate](QueueOptions::validate) with an [`InvalidOption`]; a push of
///    an item above [`max_item_bytes`](QueueOptions::max_item_bytes) fails at
///    once with [`PushError::TooLarge`] (before any capacity wait, store or
///    round trip), and a push that fails fails alone: it never fails other
///    pushes sent at the same time.
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
    /// [`PushError::TooLarge`] at once for an item above the queue's
    /// [`max_item_bytes`](QueueOptions::max_item_bytes),
    /// [`PushError::Full`] after the timeout, [`PushError::AlreadyQueued`] for a
    /// duplicate on a unique queue, [`PushError::Closed`], or
    /// [`PushError::Backend`]; every variant hands the item back.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes either stored the item or did
    /// not; it never stores it twice.
    fn push(&self, item: NewItem, timeout: Duration) -> BoxFuture<'_, Result<ItemId, PushError>>;

    /// Stores `items` at the back of the queue, in order, and reports what
    /// became of each one: `result[i]` is the outcome of `items[i]`.
    ///
    /// Each item is checked as [`push`](BaseQueue::push) checks it and
    /// stored or refused **on its own**: an item above
    /// [`max_item_bytes`](QueueOptions::max_item_bytes) gets
    /// [`PushError::TooLarge`] and the other items are stored; on a unique
    /// queue an item whose payload is already queued, or appears earlier in
    /// the same batch, gets [`PushError::AlreadyQueued`]. The stored items
    /// keep their order among themselves. `timeout` bounds the wait for
    /// room of each item that has to wait.
    ///
    /// A durable backend stores the items it can in as few commits (disk)
    /// or round trips (Redis) as it can, so a batch costs about what one
    /// push costs. An `Ok` means the item is stored durably, as for `push`;
    /// when the backend fails, every item of the failed commit gets
    /// [`PushError::Backend`] and none of them is reported stored.
    ///
    /// The provided implementation pushes the items one after another.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use snapstream::queue::{BaseQueue, MemoryQueue, NewItem, PushError, QueueOptions};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let q = MemoryQueue::new("q", QueueOptions::default().unique(true).max_item_bytes(8)).unwrap();
    /// let items = vec![NewItem::new("a"), NewItem::new("far too long"), NewItem::new("a")];
    /// let out = q.push_batch(items, Duration::from_secs(1)).await;
    /// assert!(out[0].is_ok());
    /// assert!(matches!(out[1], Err(PushError::TooLarge { .. })));
    /// assert!(matches!(out[2], Err(PushError::AlreadyQueued(_))));
    /// assert_eq!(q.len().await.unwrap().total(), 1);
    /// # });
    /// ```
    ///
    /// # Cancel safety
    /// Dropping the future leaves each item stored once or not at all; which
    /// ones were stored is then not reported.
    fn push_batch(
        &self,
        items: Vec<NewItem>,
        timeout: Duration,
    ) -> BoxFuture<'_, Vec<Result<ItemId, PushError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(self.push(item, timeout).await);
            }
            out
        })
    }

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
