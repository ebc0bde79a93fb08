//! [`WorkQueue<T>`](crate::queue::WorkQueue): typed items, batching workers,
//! retries and dead letters over any [`BaseQueue`]. The semantics are documented
//! on the type.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use super::base::{
    Backend, BackendError, BaseQueue, Delivery, InvalidOption, ItemId, NewItem, PushError,
    QueueError, QueueLen, QueueOptions,
};
use super::memory::IdHash;
use crate::histogram::{AtomicHistogram, Histogram};

/// How a [`WorkQueue`] batches, scales and retries.
///
/// | field | default |
/// |---|---|
/// | `batch_len` | [`DEFAULT_BATCH_LEN`](Self::DEFAULT_BATCH_LEN) (20) |
/// | `batch_delay` | [`DEFAULT_BATCH_DELAY`](Self::DEFAULT_BATCH_DELAY) (10 ms) |
/// | `max_workers` | [`DEFAULT_MAX_WORKERS`](Self::DEFAULT_MAX_WORKERS) (4) |
/// | `idle_timeout` | [`DEFAULT_IDLE_TIMEOUT`](Self::DEFAULT_IDLE_TIMEOUT) (1 s) |
/// | `push_timeout` | [`DEFAULT_PUSH_TIMEOUT`](Self::DEFAULT_PUSH_TIMEOUT) (5 s) |
/// | `max_attempts` | [`DEFAULT_MAX_ATTEMPTS`](Self::DEFAULT_MAX_ATTEMPTS) (5) |
/// | `backoff_base` | [`DEFAULT_BACKOFF_BASE`](Self::DEFAULT_BACKOFF_BASE) (1 s) |
/// | `backoff_max` | [`DEFAULT_BACKOFF_MAX`](Self::DEFAULT_BACKOFF_MAX) (5 min) |
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::queue::WorkQueueOptions;
///
/// let opts = WorkQueueOptions::default().batch_len(64).max_workers(8).max_attempts(3);
/// assert_eq!(opts.batch_len, 64);
/// assert_eq!(opts.backoff_base, Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkQueueOptions {
    /// Most items handed to the handler at once (at least 1).
    pub batch_len: usize,
    /// How long to wait for a partial batch to fill.
    pub batch_delay: Duration,
    /// Most workers running at once (`0` pauses processing).
    pub max_workers: usize,
    /// How long a worker waits for a batch before it retires.
    pub idle_timeout: Duration,
    /// How long [`WorkQueue::push`] waits for room in a full base queue.
    pub push_timeout: Duration,
    /// How many failed attempts move an item to the dead-letter queue (at least 1).
    pub max_attempts: u32,
    /// The back-off after the first failure; doubled per further failure.
    pub backoff_base: Duration,
    /// The longest back-off.
    pub backoff_max: Duration,
}

impl WorkQueueOptions {
    /// Default [`batch_len`](Self::batch_len).
    pub const DEFAULT_BATCH_LEN: usize = 20;
    /// Default [`batch_delay`](Self::batch_delay).
    pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(10);
    /// Default [`max_workers`](Self::max_workers).
    pub const DEFAULT_MAX_WORKERS: usize = 4;
    /// Default [`idle_timeout`](Self::idle_timeout).
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default [`push_timeout`](Self::push_timeout).
    pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default [`max_attempts`](Self::max_attempts).
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    /// Default [`backoff_base`](Self::backoff_base).
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
    /// Default [`backoff_max`](Self::backoff_max).
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);

    /// Sets [`batch_len`](Self::batch_len).
    pub fn batch_len(mut self, n: usize) -> Self {
        self.batch_len = n;
        self
    }
    /// Sets [`batch_delay`](Self::batch_delay).
    pub fn batch_delay(mut self, d: Duration) -> Self {
        self.batch_delay = d;
        self
    }
    /// Sets [`max_workers`](Self::max_workers).
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n;
        self
    }
    /// Sets [`idle_timeout`](Self::idle_timeout).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }
    /// Sets [`push_timeout`](Self::push_timeout).
    pub fn push_timeout(mut self, d: Duration) -> Self {
        self.push_timeout = d;
        self
    }
    /// Sets [`max_attempts`](Self::max_attempts).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }
    /// Sets [`backoff_base`](Self::backoff_base) and
    /// [`backoff_max`](Self::backoff_max).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`InvalidOption`] naming the first bad field: `batch_len` or
    /// `max_attempts` of 0, or `backoff_max` below `backoff_base`.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::WorkQueueOptions;
    ///
    /// let err = WorkQueueOptions::default().batch_len(0).validate().unwrap_err();
    /// assert_eq!(err.field, "batch_len");
    /// ```
    pub fn validate(&self) -> Result<(), InvalidOption> {
        let bad = |field: &'static str, reason: &'static str| Err(InvalidOption { field, reason });
        if self.batch_len == 0 {
            return bad("batch_len", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1");
        }
        if self.backoff_max < self.backoff_base {
            return bad("backoff_max", "must not be below backoff_base");
        }
        Ok(())
    }

    /// The back-off after a failure of an item handed out `attempts` times before.
    fn backoff_for(&self, attempts: u32) -> Duration {
        let factor = 1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }
}

impl Default for WorkQueueOptions {
    fn default() -> Self {
        Self {
            batch_len: Self::DEFAULT_BATCH_LEN,
            batch_delay: Self::DEFAULT_BATCH_DELAY,
            max_workers: Self::DEFAULT_MAX_WORKERS,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            push_timeout: Self::DEFAULT_PUSH_TIMEOUT,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            backoff_base: Self::DEFAULT_BACKOFF_BASE,
            backoff_max: Self::DEFAULT_BACKOFF_MAX,
        }
    }
}

/// Why [`WorkQueue::push`] failed. Every variant hands the item back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkPushError<T> {
    /// The base queue stayed full for the whole push timeout.
    #[error("queue is full")]
    Full(T),
    /// A unique base queue already holds this item.
    #[error("item is already queued")]
    AlreadyQueued(T),
    /// The work queue was shut down or its base queue closed.
    #[error("queue is closed")]
    Closed(T),
    /// The item's JSON encoding is larger than the base queue's
    /// [`max_item_bytes`](crate::queue::QueueOptions::max_item_bytes); nothing
    /// was stored.
    #[error("item of {size} bytes is over the queue's max_item_bytes of {limit}")]
    TooLarge {
        /// The item.
        item: T,
        /// The size of its encoding and key, in bytes.
        size: usize,
        /// The base queue's `max_item_bytes`.
        limit: usize,
    },
    /// The item could not be encoded as JSON.
    #[error("item could not be encoded")]
    Encode {
        /// The item.
        item: T,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
    },
    /// The base queue's backend failed; the item may or may not be stored.
    #[error("queue backend failed")]
    Backend {
        /// The item.
        item: T,
        /// What the backend reported.
        #[source]
        source: BackendError,
    },
}

impl<T> WorkPushError<T> {
    /// The item that could not be pushed.
    pub fn into_item(self) -> T {
        match self {
            WorkPushError::Full(item)
            | WorkPushError::AlreadyQueued(item)
            | WorkPushError::Closed(item)
            | WorkPushError::TooLarge { item, .. }
            | WorkPushError::Encode { item, .. }
            | WorkPushError::Backend { item, .. } => item,
        }
    }

    fn from_push(err: PushError, item: T) -> Self {
        match err {
            PushError::Full(_) => WorkPushError::Full(item),
            PushError::AlreadyQueued(_) => WorkPushError::AlreadyQueued(item),
            PushError::Closed(_) => WorkPushError::Closed(item),
            PushError::TooLarge { size, limit, .. } => {
                WorkPushError::TooLarge { item, size, limit }
            }
            PushError::Backend { source, .. } => WorkPushError::Backend { item, source },
            // A future variant: report it through the backend variant.
            #[allow(unreachable_patterns)]
            other => WorkPushError::Backend {
                item,
                source: Box::new(other),
            },
        }
    }
}

/// Why a [`WorkQueue`] operation other than push failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkError {
    /// The deadline passed first.
    #[error("timed out with {pending} items pending")]
    Timeout {
        /// Items still not handled.
        pending: usize,
    },
    /// The work queue was shut down.
    #[error("work queue is shut down")]
    Shutdown,
    /// A base queue failed.
    #[error("base queue failed")]
    Queue(#[source] QueueError),
    /// A dead letter could not be put back.
    #[error("could not requeue a dead letter")]
    Requeue(#[source] PushError),
}

/// One item handed to the handler: the decoded value and its delivery facts.
///
/// Return it from the handler to say it was not handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<T> {
    value: T,
    id: ItemId,
    attempts: u32,
    key: Option<String>,
}

impl<T> Item<T> {
    /// The decoded value.
    pub fn value(&self) -> &T {
        &self.value
    }
    /// The decoded value, taken out (the item can then not be returned).
    pub fn into_value(self) -> T {
        self.value
    }
    /// How many times the item was handed out before (0 on first delivery).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
    /// The ordering key it was pushed with.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
    /// Its id in the base queue.
    pub fn id(&self) -> ItemId {
        self.id
    }
}

impl<T> std::ops::Deref for Item<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// Why an item is in the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadReason {
    /// The handler returned it (or panicked) `max_attempts` times.
    Failed,
    /// Its payload did not decode.
    Undecodable,
}

/// An item in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id in the dead-letter queue.
    pub id: ItemId,
    /// The original payload (JSON of the item, or whatever was pushed).
    pub payload: Vec<u8>,
    /// The original ordering key.
    pub key: Option<String>,
    /// How many times it had been handed out.
    pub attempts: u32,
    /// Why it is here.
    pub reason: DeadReason,
    /// The last error (decode error, or a note on the failures).
    pub error: String,
}

/// What the dead-letter queue stores: JSON of this record.
#[derive(Serialize, Deserialize)]
struct DeadRecord {
    payload: Vec<u8>,
    key: Option<String>,
    attempts: u32,
    reason: DeadReason,
    error: String,
}

/// The longest error note a dead-letter record keeps, in bytes (a decode
/// error can quote the payload; the payload itself is kept whole).
const MAX_ERROR_NOTE: usize = 1024;

/// `note` cut to at most [`MAX_ERROR_NOTE`] bytes, on a character boundary.
fn clip_note(mut note: String) -> String {
    if note.len() > MAX_ERROR_NOTE {
        let mut end = MAX_ERROR_NOTE - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

impl QueueOptions {
    /// Options for the dead-letter queue of a base queue with these options:
    /// the same visibility timeout, unbounded, not unique, and a
    /// `max_item_bytes` that fits the dead-letter record of any item the base
    /// queue accepts.
    ///
    /// A dead-letter record is JSON holding the original payload as an array
    /// of numbers (up to 4 bytes per byte), the key (JSON-escaped, up to 6
    /// bytes per byte) and an error note of at most 1 KiB; so the limit is
    /// 6 × `max_item_bytes` + 16 KiB. The [`Manager`](crate::queue::Manager)
    /// opens its dead-letter queues with these options.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::QueueOptions;
    ///
    /// let base = QueueOptions::default().capacity(10).unique(true).max_item_bytes(1000);
    /// let dead = base.for_dead_letters();
    /// assert_eq!((dead.capacity, dead.unique), (None, false));
    /// assert_eq!(dead.max_item_bytes, 6 * 1000 + 16 * 1024);
    /// ```
    pub fn for_dead_letters(&self) -> QueueOptions {
        QueueOptions::default()
            .visibility_timeout(self.visibility_timeout)
            .max_item_bytes(
                self.max_item_bytes
                    .saturating_mul(6)
                    .saturating_add(16 * 1024),
            )
    }
}

type HandlerFn<T> = Arc<dyn Fn(Vec<Item<T>>) -> BoxFuture<'static, Vec<Item<T>>> + Send + Sync>;

/// `serde_json::to_vec(value)`, in an allocation of the encoding's size.
///
/// `to_vec` starts from a 128-byte buffer, and the base queue keeps that
/// buffer for as long as it holds the item: for small items most of it is
/// unused, and a backlog of them takes several times the memory (and cache)
/// it needs. The JSON is written into a per-thread scratch buffer instead and
/// copied out at its exact length. Same bytes either way.
fn encode<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// A scratch buffer grown past this by a large item is not kept.
    const KEEP: usize = 4096;
    SCRATCH.with(|scratch| {
        // A `Serialize` impl that itself pushes finds the buffer in use.
        let Ok(mut buf) = scratch.try_borrow_mut() else {
            return serde_json::to_vec(value);
        };
        buf.clear();
        let out = serde_json::to_writer(&mut *buf, value).map(|()| buf.to_vec());
        if buf.capacity() > KEEP {
            *buf = Vec::new();
        }
        out
    })
}

/// Stop levels sent on the `stop` watch.
const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const HARD_STOP: u8 = 2;

/// How often [`WorkQueue::drain`] looks at the base queue when no worker of
/// its own finished a batch (the queue may be consumed elsewhere).
const DRAIN_RECHECK: Duration = Duration::from_millis(100);
/// How long the dispatcher backs off after a backend error.
const BACKEND_RETRY: Duration = Duration::from_millis(200);
/// The timeout of one dispatcher pop (it loops).
const POP_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Pool {
    workers: usize,
    active: usize,
    max: usize,
}

#[derive(Default)]
struct Pending {
    /// Items pushed through this work queue and not yet handled.
    ids: HashSet<ItemId, IdHash>,
    /// Every push whose generation (taken from `Inner::push_gen` as it
    /// starts) is below this has ended.
    low: u64,
    /// Which pushes from generation `low` on have ended: `ended[gen - low]`.
    ended: VecDeque<bool>,
    /// Ids resolved while pushes were in flight (they may be those pushes'
    /// items, handled before the push registered them), each tagged with
    /// the generation counter at that moment: only pushes of an older
    /// generation can need it.
    early: HashMap<ItemId, u64, IdHash>,
    early_order: VecDeque<(u64, ItemId)>,
    next_waiter: u64,
    waiters: Vec<(u64, HashSet<ItemId, IdHash>, oneshot::Sender<()>)>,
}

struct Inner<T> {
    name: String,
    base: Arc<dyn BaseQueue>,
    dead: Arc<dyn BaseQueue>,
    opts: WorkQueueOptions,
    handler: HandlerFn<T>,
    pool: Mutex<Pool>,
    /// Signalled when a worker goes idle or retires, or the max changes.
    changed: Notify,
    closed: AtomicBool,
    stop: watch::Sender<u8>,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    /// Items this work queue stored in the base queue (pushes and requeues).
    pushed: AtomicU64,
    /// Items acknowledged as handled.
    acked: AtomicU64,
    /// How long the base queue took to store a push.
    push_latency: AtomicHistogram,
    /// The generation of the next push to start. An atomic, so that a push
    /// locks `pending` once (when it ends), not also when it starts.
    push_gen: AtomicU64,
    pending: Mutex<Pending>,
    dispatcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Calls of [`WorkQueue::drain`] waiting; only while this is non-zero do
    /// workers signal `settled`, so the hot path costs one atomic load.
    drainers: AtomicUsize,
    /// Signalled when a worker finished a batch (acks, nacks and dead
    /// letters done), on `remove_all` and on shutdown.
    settled: Notify,
}

/// Waits until the stop level reaches `level` (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<u8>, level: u8) {
    let _ = stop.wait_for(|s| *s >= level).await;
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops the dispatcher when the last user handle goes.
struct DropGuard(watch::Sender<u8>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.send_if_modified(|s| {
            if *s == RUNNING {
                *s = STOPPING;
                true
            } else {
                false
            }
        });
    }
}

/// A typed, batching work queue over a [`BaseQueue`]. Cheap to clone.
///
///
/// # Encoding
///
/// Items are stored in the base queue as **JSON** (`serde_json::to_vec` of the
/// item). Any process that pushes the same JSON to the base queue feeds the
/// work queue; a payload that does not decode as `T` is
/// [quarantined](#quarantine), never dropped.
///
/// # Workers and batches
///
/// Batches hold up to [`batch_len`](WorkQueueOptions::batch_len) items; when
/// fewer are ready, the popper waits up to
/// [`batch_delay`](WorkQueueOptions::batch_delay) for the batch to fill.
///
/// Workers pull: each worker pops its next batch straight from the base
/// queue when it is done with the last one, so a busy queue costs no
/// hand-off per batch. While fewer than [`max_workers`](Self::max_workers)
/// run, a starter task pops a batch and starts a new worker with it, so the
/// pool grows with the backlog. A worker that gets no batch for
/// [`idle_timeout`](WorkQueueOptions::idle_timeout) retires. The maximum can
/// be changed at run time with [`set_max_workers`](Self::set_max_workers)
/// (`0` pauses processing).
///
/// # Handling, retries and dead letters
///
/// The handler gets a batch of [`Item`]s and returns the items it could not
/// handle. The others are acknowledged (deleted from the base queue). Each
/// unhandled item is [`nack`](BaseQueue::nack)ed with an exponential back-off
/// (`backoff_base * 2^attempts`, capped at `backoff_max`); the delay is kept
/// by the base queue, so no worker sleeps. When an item has failed
/// [`max_attempts`](WorkQueueOptions::max_attempts) times it is moved to the
/// dead-letter queue, where [`dead_letters`](Self::dead_letters) lists it
/// and [`requeue_dead_letters`](Self::requeue_dead_letters) puts it back.
///
/// A dead-letter record is larger than the item it holds: open the
/// dead-letter queue with [`QueueOptions::for_dead_letters`] of the base
/// queue's options (the [`Manager`](crate::queue::Manager) does), so that
/// every item the base queue accepts fits. A dead letter that the dead-letter
/// queue refuses stays in the base queue and is retried with back-off (an
/// error is logged): it is never dropped.
///
/// A handler that **panics** has handled none of its batch: every item counts
/// as unhandled.
///
/// # Quarantine
///
/// An item whose payload does not decode is moved to the dead-letter queue at
/// once, with the decode error recorded ([`DeadReason::Undecodable`]).
///
/// # Delivery guarantee
///
/// At least once: an item leaves the base queue only when the handler has
/// handled it (or it was moved to the dead-letter queue). If the process dies,
/// leased items come back after the base queue's visibility timeout (at once
/// on a durable backend that is reopened).
///
/// # Shutdown
///
/// [`shutdown`](Self::shutdown) stops intake, lets running handlers
/// finish until the deadline, then cancels the rest and returns their items to
/// the base queue at once. Everything not acknowledged stays in the base
/// queue, so a new `WorkQueue` over the same base queue gets it. Dropping the
/// last handle stops the dispatcher the same way, without the deadline.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use snapstream::queue::{Item, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let opts = QueueOptions::default().capacity(10_000);
/// let base = Arc::new(MemoryQueue::new("mail", opts.clone()).unwrap());
/// let dead = Arc::new(MemoryQueue::new("mail.dead", opts.for_dead_letters()).unwrap());
/// let q = WorkQueue::new(base, dead, WorkQueueOptions::default(), |batch: Vec<Item<String>>| async move {
///     for item in &batch {
///         let _address: &String = item.value();
///     }
///     Vec::new() // everything handled
/// })
/// .unwrap();
/// q.push("ann@example.com".to_string()).await.unwrap();
/// q.flush(Duration::from_secs(5)).await.unwrap();
/// q.shutdown(Duration::from_secs(5)).await;
/// # });
/// ```
pub struct WorkQueue<T> {
    inner: Arc<Inner<T>>,
    _guard: Arc<DropGuard>,
}

impl<T> Clone for WorkQueue<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _guard: self._guard.clone(),
        }
    }
}

impl<T> fmt::Debug for WorkQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("name", &self.inner.name)
            .field("backend", &self.inner.base.backend())
            .field("workers", &self.workers())
            .field("active", &self.active_workers())
            .finish_non_exhaustive()
    }
}

impl<T> WorkQueue<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    /// Starts a work queue over `base`, moving dead letters to `dead`.
    ///
    /// The queue's name is `base`'s name. `handler` gets each batch and
    /// returns the items it could not handle.
    ///
    /// # Errors
    /// [`InvalidOption`] when `opts` does not [validate](WorkQueueOptions::validate).
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the dispatcher task).
    ///
    /// # Examples
    /// See [`WorkQueue`].
    pub fn new<F, Fut>(
        base: Arc<dyn BaseQueue>,
        dead: Arc<dyn BaseQueue>,
        opts: WorkQueueOptions,
        handler: F,
    ) -> Result<Self, InvalidOption>
    where
        F: Fn(Vec<Item<T>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Item<T>>> + Send + 'static,
    {
        opts.validate()?;
        let handler: HandlerFn<T> = Arc::new(move |batch| Box::pin(handler(batch)));
        let (stop, _) = watch::channel(RUNNING);
        let inner = Arc::new(Inner {
            name: base.name().to_owned(),
            base,
            dead,
            pool: Mutex::new(Pool {
                max: opts.max_workers,
                ..Pool::default()
            }),
            opts,
            handler,
            changed: Notify::new(),
            closed: AtomicBool::new(false),
            stop: stop.clone(),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            push_latency: AtomicHistogram::durations(),
            push_gen: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            dispatcher: Mutex::new(None),
            drainers: AtomicUsize::new(0),
            settled: Notify::new(),
        });
        let task = tokio::spawn(inner.clone().dispatch());
        *lock(&inner.dispatcher) = Some(task);
        Ok(WorkQueue {
            inner,
            _guard: Arc::new(DropGuard(stop)),
        })
    }

    /// Pushes `value` with no key, waiting up to the
    /// [`push_timeout`](WorkQueueOptions::push_timeout) for room.
    ///
    /// # Errors
    /// See [`WorkPushError`]; every variant hands the value back.
    ///
    /// # Cancel safety
    /// Dropping the future either stored the item or did not; it is never
    /// stored twice. A [`flush`](Self::flush) may then not wait for it.
    ///
    /// # Examples
    /// See [`WorkQueue`].
    pub async fn push(&self, value: T) -> Result<ItemId, WorkPushError<T>> {
        self.push_with(value, None, self.inner.opts.push_timeout)
            .await
    }

    /// Pushes `value` with an optional ordering `key`, waiting up to
    /// `timeout` for room. Items with one key are handled one at a time, in
    /// push order.
    ///
    /// # Errors
    /// See [`WorkPushError`]; every variant hands the value back.
    ///
    /// # Cancel safety
    /// As [`push`](Self::push).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use snapstream::queue::{MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let base = Arc::new(MemoryQueue::new("q", QueueOptions::default()).unwrap());
    /// # let dead = Arc::new(MemoryQueue::new("q.dead", QueueOptions::default()).unwrap());
    /// let q = WorkQueue::new(base, dead, WorkQueueOptions::default(), |_b: Vec<_>| async { Vec::new() })
    ///     .unwrap();
    /// q.push_with(1u32, Some("user-7".into()), Duration::from_secs(1)).await.unwrap();
    /// # q.shutdown(Duration::from_secs(1)).await;
    /// # });
    /// ```
    pub async fn push_with(
        &self,
        value: T,
        key: Option<String>,
        timeout: Duration,
    ) -> Result<ItemId, WorkPushError<T>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(WorkPushError::Closed(value));
        }
        let payload = match encode(&value) {
            Ok(p) => p,
            Err(source) => {
                return Err(WorkPushError::Encode {
                    item: value,
                    source,
                })
            }
        };
        match self.inner.push_raw(NewItem { payload, key }, timeout).await {
            Ok(id) => Ok(id),
            Err(e) => Err(WorkPushError::from_push(e, value)),
        }
    }

    /// Pushes `values` with no key, in order, as one
    /// [`BaseQueue::push_batch`]: on disk the items share one commit, on
    /// Redis one script call per 256 items. `result[i]` says what became of
    /// `values[i]`.
    ///
    /// Each value is checked and stored **on its own**, as by
    /// [`push`](Self::push): a value whose encoding is above the base
    /// queue's [`max_item_bytes`](crate::queue::QueueOptions::max_item_bytes)
    /// gets [`WorkPushError::TooLarge`] (it is not stored) and the others are
    /// stored; on a unique base queue a value already queued, or equal to an
    /// earlier value of the batch, gets [`WorkPushError::AlreadyQueued`].
    /// An `Ok` is as durable as an `Ok` from `push`; when the backend fails
    /// a commit, every value of that commit gets [`WorkPushError::Backend`].
    /// Each value that has to wait for room waits up to the
    /// [`push_timeout`](WorkQueueOptions::push_timeout).
    ///
    /// # Cancel safety
    /// Dropping the future leaves each value stored once or not at all;
    /// which ones were stored is then not reported, and a
    /// [`flush`](Self::flush) may not wait for them.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use snapstream::queue::{Item, MemoryQueue, QueueOptions, WorkPushError, WorkQueue, WorkQueueOptions};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let opts = QueueOptions::default().unique(true).max_item_bytes(16);
    /// let base = Arc::new(MemoryQueue::new("q", opts.clone()).unwrap());
    /// let dead = Arc::new(MemoryQueue::new("q.dead", opts.for_dead_letters()).unwrap());
    /// let q = WorkQueue::new(base, dead, WorkQueueOptions::default(), |_b: Vec<Item<String>>| async {
    ///     Vec::new()
    /// })
    /// .unwrap();
    /// let values = vec!["a".to_string(), "x".repeat(100), "a".to_string(), "b".to_string()];
    /// let out = q.push_batch(values).await;
    /// assert!(out[0].is_ok() && out[3].is_ok());
    /// assert!(matches!(out[1], Err(WorkPushError::TooLarge { .. })));
    /// assert!(matches!(out[2], Err(WorkPushError::AlreadyQueued(_))));
    /// q.flush(Duration::from_secs(5)).await.unwrap(); // waits for "a" and "b"
    /// # q.shutdown(Duration::from_secs(1)).await;
    /// # });
    /// ```
    pub async fn push_batch(&self, values: Vec<T>) -> Vec<Result<ItemId, WorkPushError<T>>> {
        let closed = self.inner.closed.load(Ordering::Acquire);
        let mut out: Vec<Option<Result<ItemId, WorkPushError<T>>>> = Vec::new();
        let mut kept = Vec::new();
        let mut items = Vec::new();
        for value in values {
            if closed {
                out.push(Some(Err(WorkPushError::Closed(value))));
                continue;
            }
            match encode(&value) {
                Ok(payload) => {
                    out.push(None);
                    kept.push((out.len() - 1, value));
                    items.push(NewItem { payload, key: None });
                }
                Err(source) => out.push(Some(Err(WorkPushError::Encode {
                    item: value,
                    source,
                }))),
            }
        }
        if !items.is_empty() {
            let results = self
                .inner
                .push_raw_batch(items, self.inner.opts.push_timeout)
                .await;
            let mut results = results.into_iter();
            for (i, value) in kept {
                out[i] = Some(match results.next() {
                    Some(result) => result.map_err(|e| WorkPushError::from_push(e, value)),
                    // A base queue that broke its contract: report, never drop.
                    None => Err(WorkPushError::Backend {
                        item: value,
                        source: "the base queue's push_batch returned no result for this item"
                            .into(),
                    }),
                });
            }
        }
        out.into_iter()
            .map(|r| r.expect("every value answered"))
            .collect()
    }

    /// Whether the base queue holds `value` (in any state), comparing the
    /// JSON encoding. On a simple (non-unique) base queue this may scan.
    ///
    /// # Errors
    /// [`WorkError::Queue`] from the base queue; an item that cannot be
    /// encoded is reported as not held.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use snapstream::queue::{Item, MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let base = Arc::new(MemoryQueue::new("q", QueueOptions::default().unique(true)).unwrap());
    /// # let dead = Arc::new(MemoryQueue::new("q.dead", QueueOptions::default()).unwrap());
    /// let q = WorkQueue::new(base, dead, WorkQueueOptions::default().max_workers(0), |_b: Vec<Item<u32>>| async {
    ///     Vec::new()
    /// })
    /// .unwrap();
    /// q.push(7).await.unwrap();
    /// assert!(q.has(&7).await.unwrap());
    /// assert!(q.push(7).await.is_err()); // unique base queue: handed back
    /// # q.shutdown(Duration::from_secs(1)).await;
    /// # });
    /// ```
    pub async fn has(&self, value: &T) -> Result<bool, WorkError> {
        let Ok(payload) = encode(value) else {
            return Ok(false);
        };
        self.inner
            .base
            .has(&payload)
            .await
            .map_err(WorkError::Queue)
    }
}

impl<T> WorkQueue<T> {
    /// The queue's name (its base queue's name).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The base queue's storage.
    pub fn backend(&self) -> Backend {
        self.inner.base.backend()
    }

    /// The base queue.
    pub fn base(&self) -> &Arc<dyn BaseQueue> {
        &self.inner.base
    }

    /// The dead-letter queue.
    pub fn dead_letter_queue(&self) -> &Arc<dyn BaseQueue> {
        &self.inner.dead
    }

    /// Workers running now (busy or idle).
    pub fn workers(&self) -> usize {
        lock(&self.inner.pool).workers
    }

    /// Workers running a handler now.
    pub fn active_workers(&self) -> usize {
        lock(&self.inner.pool).active
    }

    /// The most workers allowed.
    pub fn max_workers(&self) -> usize {
        lock(&self.inner.pool).max
    }

    /// Changes the most workers allowed. Raising it starts workers as soon
    /// as there is work. Lowering it never lets more than the new maximum
    /// start a batch: workers above it retire when their current batch is
    /// done, or when their wait for the next one ends (a batch they popped is
    /// handed back at once). `0` pauses processing.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use snapstream::queue::{MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let base = Arc::new(MemoryQueue::new("q", QueueOptions::default()).unwrap());
    /// # let dead = Arc::new(MemoryQueue::new("q.dead", QueueOptions::default()).unwrap());
    /// let q = WorkQueue::new(base, dead, WorkQueueOptions::default(), |_b: Vec<_>| async { Vec::<_>::new() })
    ///     .unwrap();
    /// # let _: &WorkQueue<u8> = &q;
    /// q.set_max_workers(16);
    /// assert_eq!(q.max_workers(), 16);
    /// # });
    /// ```
    pub fn set_max_workers(&self, max: usize) {
        lock(&self.inner.pool).max = max;
        self.inner.changed.notify_waiters();
    }

    /// How many times items were returned for a retry by this work queue.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// How many items this work queue moved to the dead-letter queue.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.dead_lettered.load(Ordering::Relaxed)
    }

    /// How many items the base queue holds.
    ///
    /// # Errors
    /// [`QueueError`] from the base queue.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn len(&self) -> Result<QueueLen, QueueError> {
        self.inner.base.len().await
    }

    /// Whether the base queue holds nothing.
    ///
    /// # Errors
    /// [`QueueError`] from the base queue.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.len().await?.total() == 0)
    }

    /// How many items the dead-letter queue holds.
    ///
    /// # Errors
    /// [`QueueError`] from the dead-letter queue.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        Ok(self.inner.dead.len().await?.total())
    }

    /// Waits until every item pushed through this work queue before the call
    /// was handled (or moved to the dead-letter queue), for at most `timeout`.
    ///
    /// Items other processes (or other handles over the same base queue)
    /// pushed are not waited for; [`drain`](Self::drain) waits until the
    /// base queue itself holds nothing to do.
    ///
    /// # Errors
    /// [`WorkError::Timeout`] with the count still pending;
    /// [`WorkError::Shutdown`] after [`shutdown`](Self::shutdown).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the waiting.
    ///
    /// # Examples
    /// See [`WorkQueue`].
    pub async fn flush(&self, timeout: Duration) -> Result<(), WorkError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(WorkError::Shutdown);
        }
        let (me, rx) = {
            let mut p = lock(&self.inner.pending);
            if p.ids.is_empty() {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            let snapshot = p.ids.clone();
            let me = p.next_waiter;
            p.next_waiter += 1;
            p.waiters.push((me, snapshot, tx));
            (me, rx)
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WorkError::Shutdown),
            Err(_) => {
                let mut p = lock(&self.inner.pending);
                let pending = match p.waiters.iter().position(|w| w.0 == me) {
                    Some(pos) => p.waiters.swap_remove(pos).1.len(),
                    // Completed at the deadline.
                    None => return Ok(()),
                };
                Err(WorkError::Timeout { pending })
            }
        }
    }

    /// Waits until the base queue holds nothing **ready or leased**, whoever
    /// pushed it, for at most `timeout`: Gitea's "flush", the one operators
    /// and tests use to wait for a queue to run dry.
    ///
    /// Unlike [`flush`](Self::flush) it counts every item in the base queue,
    /// also those other processes pushed. Items waiting out a retry back-off
    /// (`delayed` in [`len`](Self::len)) are not waited for: they may be
    /// minutes away. The workers handling the items may be this queue's or
    /// any other consumer's; the base queue is looked at again whenever a
    /// worker of this queue finished a batch, and at least every 100 ms.
    ///
    /// # Errors
    /// [`WorkError::Timeout`] with the ready and leased items left at the last
    /// look; [`WorkError::Shutdown`] after [`shutdown`](Self::shutdown);
    /// [`WorkError::Queue`] when the base queue fails.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the waiting.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use snapstream::queue::{BaseQueue, Item, MemoryQueue, NewItem, QueueOptions, WorkQueue, WorkQueueOptions};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let base = Arc::new(MemoryQueue::new("jobs", QueueOptions::default()).unwrap());
    /// let dead = Arc::new(MemoryQueue::new("jobs.dead", QueueOptions::default()).unwrap());
    /// // Pushed by someone else, straight into the base queue:
    /// base.push(NewItem::new(b"7".to_vec()), Duration::ZERO).await.unwrap();
    /// let q = WorkQueue::new(base, dead, WorkQueueOptions::default(), |_b: Vec<Item<u32>>| async {
    ///     Vec::new()
    /// })
    /// .unwrap();
    /// q.flush(Duration::from_secs(5)).await.unwrap(); // nothing of its own to wait for
    /// q.drain(Duration::from_secs(5)).await.unwrap(); // waits for the item above
    /// assert!(q.is_empty().await.unwrap());
    /// # q.shutdown(Duration::from_secs(1)).await;
    /// # });
    /// ```
    pub async fn drain(&self, timeout: Duration) -> Result<(), WorkError> {
        /// Counts this call in `drainers` while it runs.
        struct Draining<'a>(&'a AtomicUsize);
        impl Drop for Draining<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let inner = &self.inner;
        let deadline = Instant::now().checked_add(timeout);
        inner.drainers.fetch_add(1, Ordering::SeqCst);
        let _draining = Draining(&inner.drainers);
        loop {
            // Enabled before the look, so a batch finished during it is seen.
            let settled = inner.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if inner.closed.load(Ordering::Acquire) {
                return Err(WorkError::Shutdown);
            }
            let len = inner.base.len().await.map_err(WorkError::Queue)?;
            let busy = len.ready.saturating_add(len.leased);
            if busy == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(WorkError::Timeout {
                    pending: usize::try_from(busy).unwrap_or(usize::MAX),
                });
            }
            let mut wake = now + DRAIN_RECHECK;
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            tokio::select! {
                _ = settled => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Deletes every item of the base queue (ready, delayed and leased);
    /// returns how many. Batches being handled are not stopped; their acks
    /// are then ignored.
    ///
    /// # Errors
    /// [`QueueError`] from the base queue.
    ///
    /// # Cancel safety
    /// Dropping it either removed the items or did not.
    pub async fn remove_all(&self) -> Result<u64, QueueError> {
        let n = self.inner.base.remove_all().await?;
        let mut p = lock(&self.inner.pending);
        p.ids.clear();
        for (_, _, tx) in p.waiters.drain(..) {
            let _ = tx.send(());
        }
        drop(p);
        self.inner.settle();
        Ok(n)
    }

    /// Lists the dead-letter queue, oldest first.
    ///
    /// Listing leases every dead letter for a moment and returns it.
    ///
    /// # Errors
    /// [`WorkError::Queue`] from the dead-letter queue.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped midway, the dead letters come back after the
    /// dead-letter queue's visibility timeout.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, WorkError> {
        let got = self.take_dead().await?;
        let ids: Vec<ItemId> = got.iter().map(|d| d.id).collect();
        self.inner
            .dead
            .nack(&ids, Duration::ZERO)
            .await
            .map_err(WorkError::Queue)?;
        Ok(got.into_iter().map(to_dead_letter).collect())
    }

    /// Moves the dead letters for which `select` returns true back to the
    /// base queue, with a fresh attempt count; returns how many.
    ///
    /// # Errors
    /// [`WorkError::Queue`] from either queue; [`WorkError::Requeue`] when a
    /// push to the base queue failed (that dead letter and the rest stay).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped midway, the remaining dead letters come back
    /// after the dead-letter queue's visibility timeout.
    pub async fn requeue_dead_letters(
        &self,
        mut select: impl FnMut(&DeadLetter) -> bool,
    ) -> Result<u64, WorkError> {
        let got = self.take_dead().await?;
        let mut keep = Vec::new();
        let mut moved = 0;
        let mut failure = None;
        for d in got {
            let dl = to_dead_letter(d.clone());
            if failure.is_some() || !select(&dl) {
                keep.push(d.id);
                continue;
            }
            let item = NewItem {
                payload: dl.payload,
                key: dl.key,
            };
            match self
                .inner
                .push_raw(item, self.inner.opts.push_timeout)
                .await
            {
                Ok(_) | Err(PushError::AlreadyQueued(_)) => {
                    self.inner
                        .dead
                        .ack(&[d.id])
                        .await
                        .map_err(WorkError::Queue)?;
                    moved += 1;
                }
                Err(e) => {
                    keep.push(d.id);
                    failure = Some(e);
                }
            }
        }
        self.inner
            .dead
            .nack(&keep, Duration::ZERO)
            .await
            .map_err(WorkError::Queue)?;
        match failure {
            Some(e) => Err(WorkError::Requeue(e)),
            None => Ok(moved),
        }
    }

    async fn take_dead(&self) -> Result<Vec<Delivery>, WorkError> {
        let mut all = Vec::new();
        loop {
            let got = self
                .inner
                .dead
                .pop(1024, Duration::ZERO)
                .await
                .map_err(WorkError::Queue)?;
            if got.is_empty() {
                return Ok(all);
            }
            all.extend(got);
        }
    }

    /// Stops intake, lets running handlers finish until `timeout`, then
    /// cancels the rest and returns their items to the base queue at once.
    ///
    /// Everything not acknowledged stays in the base queue (which is not
    /// closed), so a new `WorkQueue` over it gets every unhandled item.
    /// Later pushes fail with [`WorkPushError::Closed`].
    ///
    /// # Cancel safety
    /// Dropping it leaves the queue stopping: intake stays off and running
    /// handlers finish in their own time.
    ///
    /// # Examples
    /// See [`WorkQueue`].
    pub async fn shutdown(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        // Waiting drains end with `Shutdown`.
        inner.settled.notify_waiters();
        inner.stop.send_if_modified(|s| {
            let was = *s;
            *s = (*s).max(STOPPING);
            was != *s
        });
        let dispatcher = lock(&inner.dispatcher).take();
        if let Some(task) = dispatcher {
            let _ = task.await;
        }
        if !inner.wait_workers_gone(Some(deadline)).await {
            inner.stop.send_replace(HARD_STOP);
            inner.wait_workers_gone(None).await;
        }
        let mut p = lock(&inner.pending);
        // Pending flushes end with `Shutdown`.
        p.waiters.clear();
    }

    /// How many items this work queue stored in the base queue (pushes and
    /// requeued dead letters).
    pub fn pushed(&self) -> u64 {
        self.inner.pushed.load(Ordering::Relaxed)
    }

    /// How many items this work queue acknowledged as handled.
    pub fn acked(&self) -> u64 {
        self.inner.acked.load(Ordering::Relaxed)
    }

    /// How long the base queue took to store each item this work queue
    /// stored (the ones [`pushed`](Self::pushed) counts, including the
    /// wait for room), in seconds. Refused pushes are not in it.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use snapstream::queue::{MemoryQueue, QueueOptions, WorkQueue, WorkQueueOptions};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let base = Arc::new(MemoryQueue::new("q", QueueOptions::default()).unwrap());
    /// # let dead = Arc::new(MemoryQueue::new("q.dead", QueueOptions::default()).unwrap());
    /// let q = WorkQueue::new(base, dead, WorkQueueOptions::default(), |_b: Vec<_>| async { Vec::new() })
    ///     .unwrap();
    /// q.push(1u32).await.unwrap();
    /// assert_eq!(q.push_latency().count, 1);
    /// # q.shutdown(Duration::from_secs(1)).await;
    /// # });
    /// ```
    pub fn push_latency(&self) -> Histogram {
        self.inner.push_latency.snapshot()
    }
}

fn to_dead_letter(d: Delivery) -> DeadLetter {
    match serde_json::from_slice::<DeadRecord>(&d.payload) {
        Ok(r) => DeadLetter {
            id: d.id,
            payload: r.payload,
            key: r.key,
            attempts: r.attempts,
            reason: r.reason,
            error: r.error,
        },
        Err(e) => DeadLetter {
            id: d.id,
            payload: d.payload,
            key: d.key,
            attempts: d.attempts,
            reason: DeadReason::Undecodable,
            error: format!("unreadable dead-letter record: {e}"),
        },
    }
}

impl<T> Inner<T> {
    async fn push_raw(&self, item: NewItem, timeout: Duration) -> Result<ItemId, PushError> {
        // The generation is taken before the base push, so whoever handles
        // the item sees this push in flight (the item reaches it through the
        // base queue).
        let gen = self.push_gen.fetch_add(1, Ordering::SeqCst);
        let mut guard = Pushing::new(&self.pending, gen);
        let started = std::time::Instant::now();
        let id = self.base.push(item, timeout).await?;
        self.push_latency.record_duration(started.elapsed());
        self.pushed.fetch_add(1, Ordering::Relaxed);
        guard.one = Some(id);
        Ok(id)
    }

    /// [`push_raw`](Self::push_raw) for many items: one
    /// [`BaseQueue::push_batch`], one generation for [`WorkQueue::flush`].
    async fn push_raw_batch(
        &self,
        items: Vec<NewItem>,
        timeout: Duration,
    ) -> Vec<Result<ItemId, PushError>> {
        let gen = self.push_gen.fetch_add(1, Ordering::SeqCst);
        let mut guard = Pushing::new(&self.pending, gen);
        let started = std::time::Instant::now();
        let out = self.base.push_batch(items, timeout).await;
        let took = started.elapsed();
        guard.many = out
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        for _ in &guard.many {
            self.push_latency.record_duration(took);
        }
        self.pushed
            .fetch_add(guard.many.len() as u64, Ordering::Relaxed);
        out
    }
}

/// Registers the pushed ids of one push (or one batch) when it ends, also
/// when it is cancelled.
struct Pushing<'a> {
    pending: &'a Mutex<Pending>,
    gen: u64,
    one: Option<ItemId>,
    many: Vec<ItemId>,
}

impl<'a> Pushing<'a> {
    fn new(pending: &'a Mutex<Pending>, gen: u64) -> Self {
        Pushing {
            pending,
            gen,
            one: None,
            many: Vec::new(),
        }
    }
}

impl Drop for Pushing<'_> {
    fn drop(&mut self) {
        let mut p = lock(self.pending);
        let at = usize::try_from(self.gen - p.low).expect("in-flight pushes fit in memory");
        if p.ended.len() <= at {
            p.ended.resize(at + 1, false);
        }
        p.ended[at] = true;
        while p.ended.front() == Some(&true) {
            p.ended.pop_front();
            p.low += 1;
        }
        for &id in self.one.iter().chain(&self.many) {
            if p.early.remove(&id).is_none() {
                p.ids.insert(id);
            }
        }
        // Forget early ids no push still in flight can need.
        let oldest = p.low;
        while let Some(&(tag, id)) = p.early_order.front() {
            if tag > oldest {
                break;
            }
            p.early_order.pop_front();
            if p.early.get(&id) == Some(&tag) {
                p.early.remove(&id);
            }
        }
    }
}

impl<T> Inner<T> {
    /// Wakes the [`WorkQueue::drain`] calls waiting, if any, to look again.
    fn settle(&self) {
        if self.drainers.load(Ordering::SeqCst) > 0 {
            self.settled.notify_waiters();
        }
    }

    /// Marks items handled (or dead-lettered) for [`WorkQueue::flush`].
    fn resolve(&self, ids: &[ItemId]) {
        let mut p = lock(&self.pending);
        // Read under the lock: pushes below `low` have ended, so any push
        // in `low..tag` is in flight.
        let tag = self.push_gen.load(Ordering::SeqCst);
        let inflight = p.low < tag;
        if p.ids.is_empty() && !inflight {
            return;
        }
        for id in ids {
            if !p.ids.remove(id) && inflight {
                p.early.insert(*id, tag);
                p.early_order.push_back((tag, *id));
            }
        }
        if !p.waiters.is_empty() {
            let mut i = 0;
            while i < p.waiters.len() {
                let set = &mut p.waiters[i].1;
                for id in ids {
                    set.remove(id);
                }
                if set.is_empty() {
                    let (_, _, tx) = p.waiters.swap_remove(i);
                    let _ = tx.send(());
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Waits until no worker runs; with a deadline, returns false when it passed.
    async fn wait_workers_gone(&self, deadline: Option<Instant>) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if lock(&self.pool).workers == 0 {
                return true;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, changed).await.is_err() {
                        return lock(&self.pool).workers == 0;
                    }
                }
                None => changed.await,
            }
        }
    }
}

impl<T> Inner<T>
where
    T: DeserializeOwned + Send + 'static,
{
    /// Starts workers: while fewer than the maximum run, it pops a batch and
    /// starts a worker with it. Workers then pop their own batches.
    async fn dispatch(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            if !self.wait_for_room(&mut stop).await {
                break;
            }
            let Some(batch) = self.next_batch(&mut stop, POP_WAIT).await else {
                break;
            };
            if batch.is_empty() {
                continue;
            }
            // Room may have gone while we waited (max lowered): hand the
            // batch back rather than exceed the maximum.
            let started = {
                let mut pool = lock(&self.pool);
                if pool.workers < pool.max {
                    pool.workers += 1;
                    pool.active += 1;
                    true
                } else {
                    false
                }
            };
            if started {
                tokio::spawn(self.clone().worker(batch));
            } else {
                self.give_back(&batch).await;
            }
        }
    }

    /// Pops the next batch: waits up to `wait` for a first item, then up to
    /// `batch_delay` for the batch to fill. `None` when stopping or the base
    /// queue closed (anything popped is given back first).
    async fn next_batch(
        &self,
        stop: &mut watch::Receiver<u8>,
        wait: Duration,
    ) -> Option<Vec<Delivery>> {
        let mut pop = self.base.pop(self.opts.batch_len, wait);
        // A pop that finds items is ready at once: take them without
        // registering on the stop signal (a lock on its waiter list to
        // register and another to unregister, per batch).
        let first = match futures::poll!(&mut pop) {
            Poll::Ready(r) => r,
            Poll::Pending => tokio::select! {
                r = pop => r,
                _ = stopped(stop, STOPPING) => return None,
            },
        };
        let mut batch = match first {
            Ok(b) => b,
            Err(QueueError::Backend(e)) => {
                tracing::warn!(queue = %self.name, error = %e, "base queue pop failed");
                tokio::select! {
                    _ = tokio::time::sleep(BACKEND_RETRY) => return Some(Vec::new()),
                    _ = stopped(stop, STOPPING) => return None,
                }
            }
            Err(_) => return None,
        };
        if batch.is_empty() || batch.len() >= self.opts.batch_len || self.opts.batch_delay.is_zero()
        {
            return Some(batch);
        }
        // A partial batch: wait out the delay once, then take what arrived
        // (one wake-up per batch rather than one per item).
        tokio::select! {
            _ = tokio::time::sleep(self.opts.batch_delay) => {}
            _ = stopped(stop, STOPPING) => {
                self.give_back(&batch).await;
                return None;
            }
        }
        if let Ok(more) = self
            .base
            .pop(self.opts.batch_len - batch.len(), Duration::ZERO)
            .await
        {
            batch.extend(more);
        }
        Some(batch)
    }

    /// Returns a popped batch to the base queue at once.
    async fn give_back(&self, batch: &[Delivery]) {
        let ids: Vec<ItemId> = batch.iter().map(|d| d.id).collect();
        if let Err(e) = self.base.nack(&ids, Duration::ZERO).await {
            tracing::warn!(queue = %self.name, error = %e, "could not return a batch; it comes back after the visibility timeout");
        }
    }

    /// Waits until another worker may start. False when stopping.
    async fn wait_for_room(&self, stop: &mut watch::Receiver<u8>) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let level = *stop.borrow();
            if level != RUNNING {
                return false;
            }
            {
                let pool = lock(&self.pool);
                if pool.workers < pool.max {
                    return true;
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = stopped(stop, STOPPING) => return false,
            }
        }
    }

    /// Handles `batch`, then pops and handles more until idle for
    /// `idle_timeout`, above the maximum, or stopping.
    async fn worker(self: Arc<Self>, mut batch: Vec<Delivery>) {
        let mut stop = self.stop.subscribe();
        loop {
            let span = tracing::debug_span!("queue_batch", queue = %self.name, items = batch.len());
            self.process(batch, &mut stop).instrument(span).await;
            self.settle();
            let retire = {
                let mut pool = lock(&self.pool);
                pool.active -= 1;
                let level = *stop.borrow();
                if pool.workers > pool.max || level != RUNNING {
                    pool.workers -= 1;
                    true
                } else {
                    false
                }
            };
            if retire {
                self.changed.notify_waiters();
                return;
            }
            let next = self.next_batch(&mut stop, self.opts.idle_timeout).await;
            let keep = {
                let mut pool = lock(&self.pool);
                let keep = matches!(&next, Some(b) if !b.is_empty()) && pool.workers <= pool.max;
                if keep {
                    pool.active += 1;
                } else {
                    pool.workers -= 1;
                }
                keep
            };
            match next {
                Some(b) if keep => batch = b,
                other => {
                    if let Some(b) = other {
                        if !b.is_empty() {
                            // Above the maximum now: give the batch back.
                            self.give_back(&b).await;
                        }
                    }
                    self.changed.notify_waiters();
                    return;
                }
            }
        }
    }

    async fn process(&self, batch: Vec<Delivery>, stop: &mut watch::Receiver<u8>) {
        let mut items = Vec::with_capacity(batch.len());
        // The deliveries handed to the handler, in the order of `items`.
        let mut taken: Vec<Delivery> = Vec::with_capacity(batch.len());
        for d in batch {
            match serde_json::from_slice::<T>(&d.payload) {
                Ok(value) => {
                    items.push(Item {
                        value,
                        id: d.id,
                        attempts: d.attempts,
                        key: d.key.clone(),
                    });
                    taken.push(d);
                }
                Err(e) => {
                    self.dead_letter(&d, DeadReason::Undecodable, e.to_string())
                        .await
                }
            }
        }
        if items.is_empty() {
            return;
        }
        let handler = self.handler.clone();
        let run = AssertUnwindSafe(async move { handler(items).await }).catch_unwind();
        tokio::pin!(run);
        // A handler that finishes in its first poll needs no watch on the
        // stop signal (see `next_batch`).
        let outcome = match futures::poll!(&mut run) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => tokio::select! {
                r = run => Some(r),
                _ = stopped(stop, HARD_STOP) => None,
            },
        };
        let (handled, unhandled): (Vec<&Delivery>, Vec<&Delivery>) = match outcome {
            None => {
                let ids: Vec<ItemId> = taken.iter().map(|d| d.id).collect();
                if let Err(e) = self.base.nack(&ids, Duration::ZERO).await {
                    tracing::warn!(queue = %self.name, error = %e, "could not return a cancelled batch");
                }
                return;
            }
            Some(Err(_panic)) => {
                tracing::error!(queue = %self.name, items = taken.len(), "handler panicked; its batch counts as unhandled");
                (Vec::new(), taken.iter().collect())
            }
            // Everything handled: the common case needs no lookup.
            Some(Ok(returned)) if returned.is_empty() => (taken.iter().collect(), Vec::new()),
            Some(Ok(returned)) => {
                // Returned items that are not from this batch are ignored.
                let back: HashSet<ItemId, IdHash> = returned.iter().map(|i| i.id).collect();
                taken.iter().partition(|d| !back.contains(&d.id))
            }
        };
        if !handled.is_empty() {
            let ids: Vec<ItemId> = handled.iter().map(|d| d.id).collect();
            match self.base.ack(&ids).await {
                Ok(()) => {
                    self.acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
                    self.resolve(&ids)
                }
                Err(e) => {
                    tracing::warn!(queue = %self.name, error = %e, "ack failed; items will be handled again")
                }
            }
        }
        let mut retry: BTreeMap<Duration, Vec<ItemId>> = BTreeMap::new();
        for d in unhandled {
            let failures = d.attempts.saturating_add(1);
            if failures >= self.opts.max_attempts {
                let note = format!("not handled after {failures} attempts");
                self.dead_letter(d, DeadReason::Failed, note).await;
            } else {
                retry
                    .entry(self.opts.backoff_for(d.attempts))
                    .or_default()
                    .push(d.id);
            }
        }
        for (delay, ids) in retry {
            self.retries.fetch_add(ids.len() as u64, Ordering::Relaxed);
            if let Err(e) = self.base.nack(&ids, delay).await {
                tracing::warn!(queue = %self.name, error = %e, "nack failed; items come back after the visibility timeout");
            }
        }
    }

    /// Moves `d` to the dead-letter queue, then acks it. On failure it is
    /// nacked with a back-off instead: never dropped.
    async fn dead_letter(&self, d: &Delivery, reason: DeadReason, error: String) {
        let record = DeadRecord {
            payload: d.payload.clone(),
            key: d.key.clone(),
            attempts: d.attempts.saturating_add(1),
            reason,
            error: clip_note(error),
        };
        let payload = serde_json::to_vec(&record).expect("a dead record always encodes");
        match self
            .dead
            .push(NewItem::new(payload), self.opts.push_timeout)
            .await
        {
            Ok(_) | Err(PushError::AlreadyQueued(_)) => {
                self.dead_lettered.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.base.ack(&[d.id]).await {
                    tracing::warn!(queue = %self.name, error = %e, "ack of a dead letter failed");
                } else {
                    self.resolve(&[d.id]);
                }
            }
            Err(e) => {
                tracing::error!(queue = %self.name, error = %e, "dead-letter push failed; item retried");
                self.retries.fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .base
                    .nack(&[d.id], self.opts.backoff_for(d.attempts))
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::encode;
    use serde::{Serialize, Serializer};

    #[test]
    fn encode_writes_the_bytes_of_to_vec() {
        let values = [
            serde_json::json!(7u64),
            serde_json::json!({"a": [1, 2], "b": null}),
            // Larger than the scratch buffer that is kept.
            serde_json::json!("x".repeat(10_000)),
            serde_json::json!("after a large one"),
        ];
        for v in values {
            assert_eq!(encode(&v).unwrap(), serde_json::to_vec(&v).unwrap());
        }
    }

    #[test]
    fn encode_inside_serialize_falls_back_to_to_vec() {
        struct Nested;
        impl Serialize for Nested {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let inner = encode(&[1u8, 2, 3]).expect("encodes");
                s.serialize_bytes(&inner)
            }
        }
        assert_eq!(
            encode(&Nested).unwrap(),
            serde_json::to_vec(&Nested).unwrap()
        );
    }
}
