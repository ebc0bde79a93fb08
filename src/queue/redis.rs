//! The Redis base queue: one queue shared by any number of processes.
//!
//! [`RedisQueue`] implements [`BaseQueue`] on a Redis server (6.2 or newer:
//! the scripts use `LPOP` with a count and `ZMSCORE`; a single node, or a
//! replicated primary). It is how a [`WorkQueue`](crate::queue)
//! scales past one machine: every process that connects with the same URL and
//! queue name takes part in the same queue.
//!
//! Enabled by the cargo feature **`redis`**.
//!
//! # Examples
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use snapstream::queue::redis::RedisQueue;
//! use snapstream::queue::{BaseQueue, NewItem, QueueOptions};
//!
//! let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
//! let name = format!("doc-module-{}", std::process::id());
//! let Ok(queue) = RedisQueue::connect(&url, name, QueueOptions::default()).await else {
//!     return Ok(()); // no Redis server here: nothing to show
//! };
//! queue.push(NewItem::new("hello"), Duration::from_secs(1)).await?;
//! let batch = queue.pop(64, Duration::from_secs(1)).await?;
//! assert_eq!(batch[0].payload, b"hello");
//! queue.ack(&[batch[0].id]).await?; // handled: delete it
//! queue.delete().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Atomicity
//!
//! Every operation is one Lua script run by the server, so no step is a
//! client-side check-then-act: the capacity check and the insert, the unique
//! check and the insert, the hand-out and the lease, the ack and the release of
//! the dedup entry and ordering key each happen as one step, whatever the number
//! of processes. Item ids come from `INCR` and are never reused while the queue
//! exists. Deadlines use the server's clock (`TIME`), so clients' clocks need not
//! agree.
//!
//! # Leases and redelivery
//!
//! A pop moves each item into a sorted set scored by its lease deadline (now +
//! the queue's visibility timeout). [`ack`](BaseQueue::ack) deletes the item
//! together with its dedup entry; [`nack`](BaseQueue::nack) raises its attempt
//! count and puts it into a sorted set of delayed items scored by its due time.
//! The pop script first promotes due delayed items and re-queues expired leases
//! (attempts + 1), so an item held by a process that crashed comes back after
//! the visibility timeout. A pop whose future is dropped after the server
//! leased items hands them straight back (front of the queue, attempts
//! unchanged) from a background task; only if the whole process dies do they
//! wait for the visibility timeout.
//!
//! # Waiting without polling
//!
//! A pop that finds nothing ready sets a short-lived `popwait` flag (in the same
//! script) and sleeps; a push that sees the flag clears it and `PUBLISH`es one
//! wake-up on the queue's channel. Each `RedisQueue` holds one subscriber
//! connection that turns wake-ups into a local [`Notify`], so any number of
//! waiting pops cost one connection and no traffic while nothing happens. The
//! sleep is capped by the earliest delayed item or lease deadline (the pop
//! script returns it), so back-offs and expired leases are served on time
//! without a busy loop. Pushes waiting for room work the same way with a
//! `pushwait` flag set by a push that found the queue full and cleared by an ack.
//!
//! Pub/sub was chosen over a blocking `BLPOP` on a token list because a token
//! taken by a pop that is then cancelled is lost to the other waiters, and every
//! blocked pop would need its own connection. Keyspace notifications would need
//! `CONFIG SET` rights many hosted servers do not grant. Should the subscriber
//! connection drop, it reconnects in the background and then wakes every local
//! waiter to look again, so no wake-up is missed for good. Waits are also
//! re-armed at least once a minute.
//!
//! # Per-key order
//!
//! An item whose ordering key is held by an earlier item (leased, delayed after
//! a nack, or re-queued after an expired lease) is parked in a per-key list when
//! a pop meets it; when the holder is acked the first parked item goes to the
//! front of the queue and takes over the key.
//!
//! # Closing
//!
//! [`close`](BaseQueue::close) is local to this `RedisQueue` value: other
//! processes and other values keep using the queue. After it, pushes fail with
//! [`PushError::Closed`], waiting pops wake up and pops return
//! [`QueueError::Closed`] once nothing is ready. `ack`, `nack`, `len`, `has`
//! and `remove_all` keep working so that in-flight work can be finished.
//!
//! # Failures
//!
//! Connections come back by themselves after the server restarts: calls made
//! while it is unreachable fail with `Backend` errors (the [`redis::RedisError`]
//! chained as the source) within about the connect timeout of 1 s, never
//! panic, never hang; the same value works again once the server is back. With
//! `appendfsync always` on the server, a push that returned `Ok` survives a
//! `kill -9` of the server. A push that failed with `Backend` may or may not be
//! stored.
//!
//! # Item size
//!
//! A push of an item above [`QueueOptions::max_item_bytes`] (1 MiB by
//! default) fails with [`PushError::TooLarge`] before anything is sent. The
//! server has limits of its own (`proto-max-bulk-len`, 512 MB by default, at
//! least 1 MB): a command with a larger argument is refused with a protocol
//! error and the server drops the connection, failing every command in flight
//! on it. So concurrent pushes are batched only up to 1 MiB per item, which
//! no server refuses; a larger item (when `max_item_bytes` allows one) is sent
//! alone, one at a time, on a connection of its own that is opened on first
//! use and replaced after a failure. A push the server refuses thus fails
//! with [`PushError::Backend`] and takes no other push with it.
//!
//! # Keys
//!
//! A queue named `name` owns the keys `snapstream:{name}:*` (the hash tag keeps
//! them in one cluster slot) and the channel `snapstream:{name}:wake`.
//! Per-key parking lists are named in the scripts rather than passed in, so
//! Redis Cluster is not supported.

mod scripts;

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{Script, ScriptInvocation, Value};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::scripts::{KEY_NAMES, SCRIPTS};
use super::base::{
    Backend, BackendError, BaseQueue, Delivery, ItemId, NewItem, PushError, QueueError, QueueLen,
    QueueOptions,
};

/// The longest a pop or push sleeps before looking again on its own.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How much longer a wait flag lives on the server than the wait it announces.
const FLAG_MARGIN_MS: u64 = 1_000;
/// How many parked (blocked by their key) items one pop may step over.
const PARK_BUDGET: usize = 1_000;
/// Most items one pop hands out, and most ids one ack script takes.
const MAX_POP_BATCH: usize = 1_000;
/// Most push script calls of one handle in flight at once (pipelined on its
/// connection, so they still run in the order they were sent). A second one
/// starts only when [`MAX_PUSH_BATCH`] pushes wait: with a few producers,
/// one call at a time carries all their pushes (4 producers: 4 items per
/// call rather than 1, a third less CPU per item in the client and the
/// server).
const MAX_FLUSHERS: usize = 4;
/// How many times a flusher yields, after answering a call, for the pushes
/// it answered to come back (a producer pushing in a loop pushes again at
/// once) before it sends the next call; without it the first push back goes
/// alone. Stops as soon as they are back.
const REGATHER_YIELDS: usize = 4;
/// Most pushes sent in one script call.
const MAX_PUSH_BATCH: usize = 256;
/// Items larger than this (payload and key) are sent alone, one at a time,
/// on a connection of their own. It is the smallest `proto-max-bulk-len` a
/// Redis server accepts, so no smaller item can be refused for its size;
/// one that is (the server replies with an error and drops the connection)
/// takes no other push with it.
const SOLO_BYTES: usize = 1024 * 1024;
/// Connect timeout of the command and subscriber connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reply timeout of a command.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscriber reconnect back-off bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Why the Redis queue refused to start or could not read a reply.
///
/// Returned as the source of [`QueueError::Backend`] /
/// [`PushError::Backend`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisQueueError {
    /// The queue name is empty.
    #[error("queue name is empty")]
    EmptyName,
    /// [`QueueOptions::visibility_timeout`] is shorter than 1 ms.
    ///
    /// No longer returned: like every backend, [`RedisQueue::connect`]
    /// reports options that do not [validate](QueueOptions::validate) as
    /// [`QueueError::InvalidOption`]. Kept so that code naming it compiles.
    #[error("visibility timeout is shorter than 1 ms")]
    VisibilityTimeout,
    /// The server answered something the queue's scripts never return.
    #[error("unexpected reply from redis to {0}")]
    UnexpectedReply(&'static str),
    /// The task sending a batch of pushes stopped before sending this one
    /// (its runtime shut down); the item was not stored.
    #[error("push batch abandoned before it was sent")]
    Abandoned,
}

/// A [`BaseQueue`] stored on a Redis server and shared by every process that
/// opens the same queue name there. See the [module docs](self).
///
/// Not `Clone`: share it with an `Arc`. [`close`](BaseQueue::close) affects
/// this value only.
pub struct RedisQueue {
    shared: Arc<Shared>,
    listener: JoinHandle<()>,
}

struct Shared {
    name: String,
    options: QueueOptions,
    conn: ConnectionManager,
    /// How to open [`solo`](Self::solo).
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The connection for items above [`SOLO_BYTES`], opened on first use.
    /// Held for the whole of each such push, so they go one at a time.
    solo: tokio::sync::Mutex<Option<ConnectionManager>>,
    keys: Vec<String>,
    channel: String,
    park_prefix: String,
    /// Woken by a `r` message: something became ready (or timers changed).
    ready: Notify,
    /// Woken by a `s` message: room appeared.
    space: Notify,
    closed: AtomicBool,
    /// Pushes waiting to be sent together.
    pushes: Mutex<PushBatcher>,
}

impl fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("name", &self.shared.name)
            .field("options", &self.shared.options)
            .field("closed", &self.shared.closed.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl Drop for RedisQueue {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn backend(e: impl Into<BackendError>) -> QueueError {
    QueueError::Backend(e.into())
}

impl RedisQueue {
    /// Connects to the Redis server at `url` (`redis://[:password@]host:port[/db]`,
    /// `rediss://` is not enabled) and opens the queue `name` there, creating it
    /// on first use.
    ///
    /// Processes that open the same name on the same server share the queue;
    /// they should pass the same `options` (capacity and uniqueness are checked
    /// with the options of the handle that pushes).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use snapstream::queue::redis::RedisQueue;
    /// use snapstream::queue::{BaseQueue, QueueOptions};
    ///
    /// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    /// let name = format!("doc-connect-{}", std::process::id());
    /// let options = QueueOptions::default().capacity(10_000).unique(true);
    /// let Ok(queue) = RedisQueue::connect(&url, name, options).await else {
    ///     return Ok(()); // no Redis server here
    /// };
    /// assert!(queue.is_unique());
    /// queue.delete().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidOption`] when `options` do not
    /// [validate](QueueOptions::validate) (checked before connecting);
    /// [`QueueError::Backend`] when the name is empty (the source is
    /// [`RedisQueueError::EmptyName`]), the URL is invalid or the server cannot
    /// be reached within the connect timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops any half-made connection.
    pub async fn connect(
        url: &str,
        name: impl Into<String>,
        options: QueueOptions,
    ) -> Result<RedisQueue, QueueError> {
        let name = name.into();
        if name.is_empty() {
            return Err(backend(RedisQueueError::EmptyName));
        }
        options.validate()?;
        let client = redis::Client::open(url).map_err(backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(RECONNECT_MIN)
            .set_max_delay(RECONNECT_MAX);
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(backend)?;
        let prefix = format!("snapstream:{{{name}}}:");
        let keys = KEY_NAMES.iter().map(|k| format!("{prefix}{k}")).collect();
        let channel = format!("{prefix}wake");
        let park_prefix = format!("{prefix}park:");
        // Subscribe before the first pop can announce itself as waiting.
        let pubsub = subscribe(&client, &channel).await.map_err(backend)?;
        let shared = Arc::new(Shared {
            name,
            options,
            conn,
            client: client.clone(),
            config,
            solo: tokio::sync::Mutex::new(None),
            keys,
            channel,
            park_prefix,
            ready: Notify::new(),
            space: Notify::new(),
            closed: AtomicBool::new(false),
            pushes: Mutex::new(PushBatcher::default()),
        });
        let listener = tokio::spawn(listen(Arc::clone(&shared), client, pubsub));
        Ok(RedisQueue { shared, listener })
    }

    /// Deletes the queue from the server: every item, the dedup set and the id
    /// counter. Other handles of the queue see an empty queue whose ids start
    /// again from 1. Returns how many items were deleted.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use snapstream::queue::redis::RedisQueue;
    /// use snapstream::queue::{BaseQueue, NewItem, QueueOptions};
    ///
    /// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    /// let name = format!("doc-delete-{}", std::process::id());
    /// let Ok(queue) = RedisQueue::connect(&url, name, QueueOptions::default()).await else {
    ///     return Ok(());
    /// };
    /// queue.push(NewItem::new("x"), Duration::ZERO).await?;
    /// assert_eq!(queue.delete().await?, 1);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] when the server fails.
    ///
    /// # Cancel safety
    ///
    /// One atomic script: dropping the future either deleted the queue or not.
    pub async fn delete(&self) -> Result<u64, QueueError> {
        let mut inv = self.shared.invocation(&SCRIPTS.remove_all);
        inv.arg("1");
        self.shared.run_u64(&inv, "delete").await
    }

    async fn push_impl(&self, item: NewItem, timeout: Duration) -> Result<ItemId, PushError> {
        let shared = &self.shared;
        let mut item = shared.options.check_size(item)?;
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if shared.is_closed() {
                return Err(PushError::Closed(item));
            }
            let space = shared.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => MAX_WAIT,
            };
            let wait = remaining.min(MAX_WAIT);
            match push_once(shared, item, flag_ms(wait)).await {
                PushOutcome::Stored(id) => return Ok(id),
                PushOutcome::Duplicate(back) => return Err(PushError::AlreadyQueued(back)),
                PushOutcome::Failed(back, source) => {
                    return Err(PushError::Backend { item: back, source })
                }
                PushOutcome::Full(back) if wait.is_zero() => return Err(PushError::Full(back)),
                PushOutcome::Full(back) => {
                    item = back;
                    tokio::select! {
                        _ = &mut space => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// [`BaseQueue::push_batch`]: the items go in script calls of up to
    /// [`MAX_PUSH_BATCH`], one after another on the shared connection (so
    /// they keep their order); an item above [`SOLO_BYTES`] goes alone, as
    /// a push. From the first item the server finds no room for on, the rest
    /// are pushed one after another, each waiting for room.
    async fn push_batch_impl(
        &self,
        items: Vec<NewItem>,
        timeout: Duration,
    ) -> Vec<Result<ItemId, PushError>> {
        let shared = &self.shared;
        let mut out: Vec<Option<Result<ItemId, PushError>>> =
            std::iter::repeat_with(|| None).take(items.len()).collect();
        let mut todo = VecDeque::new();
        for (i, item) in items.into_iter().enumerate() {
            match shared.options.check_size(item) {
                Ok(item) => todo.push_back((i, item)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        while let Some((i, item)) = todo.pop_front() {
            if shared.is_closed() {
                out[i] = Some(Err(PushError::Closed(item)));
                continue;
            }
            if item.size() > SOLO_BYTES {
                out[i] = Some(self.push_impl(item, timeout).await);
                continue;
            }
            let mut chunk = vec![(i, item)];
            while chunk.len() < MAX_PUSH_BATCH
                && todo.front().is_some_and(|(_, it)| it.size() <= SOLO_BYTES)
            {
                chunk.extend(todo.pop_front());
            }
            let mut index = Vec::with_capacity(chunk.len());
            let mut batch = Vec::with_capacity(chunk.len());
            let mut replies = Vec::with_capacity(chunk.len());
            for (i, item) in chunk {
                let (tx, rx) = oneshot::channel();
                index.push(i);
                batch.push(PendingPush {
                    item: Some(item),
                    flag_ms: 0,
                    reply: Some(tx),
                });
                replies.push(rx);
            }
            let reply = push_call(shared, &batch)
                .invoke_async(&mut shared.conn.clone())
                .await;
            answer_pushes(&mut batch, reply);
            let mut full = Vec::new();
            for (i, mut rx) in index.into_iter().zip(replies) {
                let outcome = rx.try_recv().unwrap_or_else(|_| {
                    PushOutcome::Failed(
                        NewItem::new(Vec::new()),
                        Box::new(RedisQueueError::Abandoned),
                    )
                });
                out[i] = Some(match outcome {
                    PushOutcome::Stored(id) => Ok(id),
                    PushOutcome::Duplicate(back) => Err(PushError::AlreadyQueued(back)),
                    PushOutcome::Failed(back, source) => {
                        Err(PushError::Backend { item: back, source })
                    }
                    PushOutcome::Full(back) => {
                        full.push((i, back));
                        continue;
                    }
                });
            }
            if !full.is_empty() {
                // No room: this chunk's refused items and everything after
                // wait for room one at a time, in order.
                for (i, item) in full.into_iter().chain(todo.drain(..)) {
                    out[i] = Some(self.push_impl(item, timeout).await);
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    async fn pop_impl(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>, QueueError> {
        let shared = &self.shared;
        if max == 0 {
            return if shared.is_closed() {
                Err(QueueError::Closed)
            } else {
                Ok(Vec::new())
            };
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let ready = shared.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let closed = shared.is_closed();
            let now = Instant::now();
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(now),
                None => MAX_WAIT,
            };
            let wait = if closed {
                Duration::ZERO
            } else {
                remaining.min(MAX_WAIT)
            };
            let (next_due, items) = pop_once(shared, max, flag_ms(wait)).await?;
            if !items.is_empty() {
                return Ok(items);
            }
            if closed {
                return Err(QueueError::Closed);
            }
            if wait.is_zero() {
                return Ok(items);
            }
            let sleep = next_due.map_or(wait, |due| due.min(wait));
            if !sleep.is_zero() {
                tokio::select! {
                    _ = &mut ready => {}
                    _ = tokio::time::sleep(sleep) => {}
                }
            }
        }
    }
}

/// The lifetime of a wait flag for a wait of `wait` (0 = no flag).
fn flag_ms(wait: Duration) -> u64 {
    if wait.is_zero() {
        0
    } else {
        wait.as_millis() as u64 + FLAG_MARGIN_MS
    }
}

impl Shared {
    fn lock_pushes(&self) -> std::sync::MutexGuard<'_, PushBatcher> {
        self.pushes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A script call with the queue's keys and the two common arguments.
    fn invocation<'a>(&'a self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for key in &self.keys {
            inv.key(key.as_str());
        }
        inv.arg(self.channel.as_str())
            .arg(self.park_prefix.as_str());
        inv
    }

    async fn run_u64(
        &self,
        inv: &ScriptInvocation<'_>,
        what: &'static str,
    ) -> Result<u64, QueueError> {
        let n: i64 = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        u64::try_from(n).map_err(|_| backend(RedisQueueError::UnexpectedReply(what)))
    }

    async fn run_pop(
        &self,
        max: usize,
        flag_ms: u64,
    ) -> Result<(Option<Duration>, Vec<Delivery>), QueueError> {
        let mut inv = self.invocation(&SCRIPTS.pop);
        inv.arg(max.min(MAX_POP_BATCH))
            .arg(self.options.visibility_timeout.as_millis() as u64)
            .arg(flag_ms)
            .arg(PARK_BUDGET);
        let reply: Value = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        parse_pop(reply).map_err(backend)
    }

    /// Hands leased items of a dropped pop back to the front of the queue.
    async fn unpop(&self, ids: &[ItemId]) -> Result<u64, QueueError> {
        let mut inv = self.invocation(&SCRIPTS.unpop);
        for id in ids {
            inv.arg(id.0);
        }
        self.run_u64(&inv, "unpop").await
    }
}

/// What became of one push sent in a batch.
enum PushOutcome {
    Stored(ItemId),
    Full(NewItem),
    Duplicate(NewItem),
    Failed(NewItem, BackendError),
}

/// A push waiting for the batch flusher. Dropped unanswered (the flusher went
/// away), it still hands its item back.
struct PendingPush {
    item: Option<NewItem>,
    flag_ms: u64,
    reply: Option<oneshot::Sender<PushOutcome>>,
}

impl PendingPush {
    fn answer(&mut self, outcome: impl FnOnce(NewItem) -> PushOutcome) {
        if let (Some(item), Some(reply)) = (self.item.take(), self.reply.take()) {
            let _ = reply.send(outcome(item));
        }
    }
}

impl Drop for PendingPush {
    fn drop(&mut self) {
        self.answer(|item| PushOutcome::Failed(item, Box::new(RedisQueueError::Abandoned)));
    }
}

#[derive(Default)]
struct PushBatcher {
    pending: VecDeque<PendingPush>,
    /// Flusher tasks running; at most [`MAX_FLUSHERS`].
    flushers: usize,
}

/// Queues one push for the flushers, starting one if none runs (or, up to
/// [`MAX_FLUSHERS`], if a full call's worth waits). Concurrent pushes on one
/// handle thus share a script call (one round trip, one fsync with
/// `appendfsync always`) instead of taking one each.
///
/// An item above [`SOLO_BYTES`] is not batched: it is sent alone on the solo
/// connection, so that a server refusing it fails it and nothing else.
async fn push_once(shared: &Arc<Shared>, item: NewItem, flag_ms: u64) -> PushOutcome {
    let (tx, rx) = oneshot::channel();
    let solo = item.size() > SOLO_BYTES;
    let push = PendingPush {
        item: Some(item),
        flag_ms,
        reply: Some(tx),
    };
    if solo {
        tokio::spawn(push_solo(Arc::clone(shared), push));
    } else {
        let start = {
            let mut batcher = shared.lock_pushes();
            batcher.pending.push_back(push);
            // One call in flight gathers every push made meanwhile; another
            // is sent alongside only when a full call's worth is waiting.
            let start = batcher.flushers == 0
                || (batcher.flushers < MAX_FLUSHERS && batcher.pending.len() >= MAX_PUSH_BATCH);
            batcher.flushers += usize::from(start);
            start
        };
        if start {
            tokio::spawn(flush_pushes(Arc::clone(shared)));
        }
    }
    match rx.await {
        Ok(outcome) => outcome,
        // Unreachable: a PendingPush always answers, even when dropped.
        Err(_) => PushOutcome::Failed(
            NewItem::new(Vec::new()),
            Box::new(RedisQueueError::Abandoned),
        ),
    }
}

/// Unregisters a flusher task that is cancelled (the runtime shuts down); the
/// last one answers what is left with the items handed back.
struct FlushingGuard(Option<Arc<Shared>>);

impl Drop for FlushingGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            let mut batcher = shared.lock_pushes();
            batcher.flushers -= 1;
            if batcher.flushers == 0 {
                batcher.pending.clear();
            }
        }
    }
}

async fn flush_pushes(shared: Arc<Shared>) {
    let mut guard = FlushingGuard(Some(Arc::clone(&shared)));
    loop {
        let mut batch: Vec<PendingPush> = {
            let mut batcher = shared.lock_pushes();
            // A push whose caller went away before its batch was sent is not stored.
            batcher
                .pending
                .retain(|p| p.reply.as_ref().is_some_and(|r| !r.is_closed()));
            if batcher.pending.is_empty() {
                // Under the lock: a push queued from now on starts a new flusher.
                batcher.flushers -= 1;
                guard.0 = None;
                return;
            }
            let n = batcher.pending.len().min(MAX_PUSH_BATCH);
            batcher.pending.drain(..n).collect()
        };
        let reply = push_call(&shared, &batch)
            .invoke_async(&mut shared.conn.clone())
            .await;
        let answered = batch.len();
        answer_pushes(&mut batch, reply);
        drop(batch);
        // Let the tasks just answered push again before the next call, so
        // that they share it rather than trickle in one call each.
        for _ in 0..REGATHER_YIELDS {
            if shared.lock_pushes().pending.len() >= answered {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Sends one large push alone on the solo connection, after any earlier one
/// finished (the lock is held until the reply). Runs on a task of its own,
/// so a caller that goes away cannot cut the reply short and let the next
/// large push onto a connection the server may be about to drop.
async fn push_solo(shared: Arc<Shared>, push: PendingPush) {
    let mut solo = shared.solo.lock().await;
    // A push whose caller went away before it was sent is not stored.
    if push.reply.as_ref().is_none_or(|r| r.is_closed()) {
        return;
    }
    let mut conn = match &*solo {
        Some(conn) => conn.clone(),
        None => {
            let opened =
                ConnectionManager::new_with_config(shared.client.clone(), shared.config.clone())
                    .await;
            match opened {
                Ok(conn) => solo.insert(conn).clone(),
                Err(e) => {
                    let mut batch = [push];
                    answer_pushes(&mut batch, Err(e));
                    return;
                }
            }
        }
    };
    let mut batch = [push];
    let reply = push_call(&shared, &batch).invoke_async(&mut conn).await;
    if reply.is_err() {
        // The server may have dropped the connection (it does after refusing
        // a command for its size): the next large push starts on a new one
        // rather than fail on this one.
        *solo = None;
    }
    answer_pushes(&mut batch, reply);
}

/// The push script call for `batch`.
fn push_call<'a>(shared: &'a Shared, batch: &'a [PendingPush]) -> ScriptInvocation<'a> {
    let mut inv = shared.invocation(&SCRIPTS.push);
    inv.arg(
        shared
            .options
            .capacity
            .map_or(-1, |c| c.min(i64::MAX as u64) as i64),
    )
    .arg(if shared.options.unique { "1" } else { "0" });
    for p in batch {
        let item = p.item.as_ref().expect("unanswered");
        inv.arg(p.flag_ms).arg(&item.payload[..]);
        match &item.key {
            Some(key) => inv.arg("1").arg(key.as_str()),
            None => inv.arg("0").arg(""),
        };
    }
    inv
}

/// Answers every push of `batch` from the push script's reply.
fn answer_pushes(batch: &mut [PendingPush], reply: redis::RedisResult<Vec<i64>>) {
    match reply {
        Ok(codes) if codes.len() == batch.len() => {
            for (p, code) in batch.iter_mut().zip(codes) {
                p.answer(|item| match code {
                    id if id > 0 => PushOutcome::Stored(ItemId(id as u64)),
                    -1 => PushOutcome::Full(item),
                    -2 => PushOutcome::Duplicate(item),
                    _ => PushOutcome::Failed(
                        item,
                        Box::new(RedisQueueError::UnexpectedReply("push")),
                    ),
                });
            }
        }
        Ok(_) => {
            for p in batch {
                p.answer(|item| {
                    PushOutcome::Failed(item, Box::new(RedisQueueError::UnexpectedReply("push")))
                });
            }
        }
        Err(e) => {
            for p in batch {
                p.answer(|item| PushOutcome::Failed(item, Box::new(e.clone())));
            }
        }
    }
}

/// Runs one pop script on a task of its own, so that the items it leases are
/// handed back if the caller goes away before seeing them.
async fn pop_once(
    shared: &Arc<Shared>,
    max: usize,
    flag_ms: u64,
) -> Result<(Option<Duration>, Vec<Delivery>), QueueError> {
    let task = Arc::clone(shared);
    let mut guard = PopGuard {
        task: Some(tokio::spawn(
            async move { task.run_pop(max, flag_ms).await },
        )),
        shared: Arc::clone(shared),
    };
    let joined = match guard.task.as_mut() {
        Some(task) => task.await,
        None => unreachable!("the guard holds the task until it is joined"),
    };
    guard.task = None;
    joined.map_err(backend)?
}

type PopTask = JoinHandle<Result<(Option<Duration>, Vec<Delivery>), QueueError>>;

/// Owns a running pop script until its result is taken.
struct PopGuard {
    task: Option<PopTask>,
    shared: Arc<Shared>,
}

impl Drop for PopGuard {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to finish on: the lease runs out and the items come back.
            return;
        };
        runtime.spawn(async move {
            if let Ok(Ok((_, items))) = task.await {
                if !items.is_empty() {
                    let ids: Vec<ItemId> = items.iter().map(|d| d.id).collect();
                    if let Err(e) = shared.unpop(&ids).await {
                        tracing::warn!(queue = %shared.name, error = %e,
                            "could not hand back items of a dropped pop; they return after the visibility timeout");
                    }
                }
            }
        });
    }
}

fn parse_pop(reply: Value) -> Result<(Option<Duration>, Vec<Delivery>), RedisQueueError> {
    const BAD: RedisQueueError = RedisQueueError::UnexpectedReply("pop");
    let Value::Array(values) = reply else {
        return Err(BAD);
    };
    let mut it = values.into_iter();
    let next_due = match it.next() {
        Some(Value::Int(ms)) if ms < 0 => None,
        Some(Value::Int(ms)) => Some(Duration::from_millis(ms as u64)),
        _ => return Err(BAD),
    };
    let mut items = Vec::with_capacity(it.len() / 4);
    while let Some(id) = it.next() {
        let (Some(payload), Some(key), Some(attempts)) = (it.next(), it.next(), it.next()) else {
            return Err(BAD);
        };
        let id = match id {
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(BAD)?,
            _ => return Err(BAD),
        };
        let payload = match payload {
            Value::BulkString(b) => b,
            _ => return Err(BAD),
        };
        let key = match key {
            Value::Nil | Value::Boolean(false) => None,
            Value::BulkString(b) => Some(
                String::from_utf8(b)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
            _ => return Err(BAD),
        };
        let attempts = match attempts {
            Value::Int(n) => u32::try_from(n).unwrap_or(u32::MAX),
            _ => return Err(BAD),
        };
        items.push(Delivery {
            id: ItemId(id),
            payload,
            key,
            attempts,
        });
    }
    Ok((next_due, items))
}

async fn subscribe(client: &redis::Client, channel: &str) -> redis::RedisResult<PubSub> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "subscribe timed out",
        ))),
    }
}

/// Turns wake-up messages into local notifications; resubscribes after the
/// connection drops and then wakes every waiter to look again.
async fn listen(shared: Arc<Shared>, client: redis::Client, first: PubSub) {
    let mut pubsub = Some(first);
    let mut backoff = RECONNECT_MIN;
    loop {
        if let Some(mut ps) = pubsub.take() {
            backoff = RECONNECT_MIN;
            let mut messages = ps.on_message();
            while let Some(msg) = messages.next().await {
                if msg.get_payload_bytes() == b"s" {
                    shared.space.notify_waiters();
                } else {
                    shared.ready.notify_waiters();
                }
            }
            tracing::debug!(queue = %shared.name, "redis subscriber connection lost");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
        if let Ok(ps) = subscribe(&client, &shared.channel).await {
            tracing::debug!(queue = %shared.name, "redis subscriber reconnected");
            pubsub = Some(ps);
            // Wake-ups may have been missed while disconnected.
            shared.ready.notify_waiters();
            shared.space.notify_waiters();
        }
    }
}

impl BaseQueue for RedisQueue {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn backend(&self) -> Backend {
        Backend::Redis
    }

    fn is_unique(&self) -> bool {
        self.shared.options.unique
    }

    fn push(&self, item: NewItem, timeout: Duration) -> BoxFuture<'_, Result<ItemId, PushError>> {
        Box::pin(self.push_impl(item, timeout))
    }

    /// Up to 256 items per script call: one round trip (and, with
    /// `appendfsync always`, one fsync) per 256 items.
    ///
    /// # Cancel safety
    /// As [`push`](BaseQueue::push), for each item.
    fn push_batch(
        &self,
        items: Vec<NewItem>,
        timeout: Duration,
    ) -> BoxFuture<'_, Vec<Result<ItemId, PushError>>> {
        Box::pin(self.push_batch_impl(items, timeout))
    }

    fn pop(
        &self,
        max: usize,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, QueueError>> {
        Box::pin(self.pop_impl(max, timeout))
    }

    fn ack<'a>(&'a self, ids: &'a [ItemId]) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            for chunk in ids.chunks(MAX_POP_BATCH) {
                let mut inv = self.shared.invocation(&SCRIPTS.ack);
                for id in chunk {
                    inv.arg(id.0);
                }
                self.shared.run_u64(&inv, "ack").await?;
            }
            Ok(())
        })
    }

    fn nack<'a>(
        &'a self,
        ids: &'a [ItemId],
        delay: Duration,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut inv = self.shared.invocation(&SCRIPTS.nack);
            // Capped at ~100 years so the score stays an exact integer.
            inv.arg(delay.as_millis().min(3_155_760_000_000) as u64);
            for id in ids {
                inv.arg(id.0);
            }
            self.shared.run_u64(&inv, "nack").await.map(drop)
        })
    }

    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>> {
        Box::pin(async move {
            let inv = self.shared.invocation(&SCRIPTS.len);
            let (ready, delayed, leased): (i64, i64, i64) = inv
                .invoke_async(&mut self.shared.conn.clone())
                .await
                .map_err(backend)?;
            let n = |v: i64| u64::try_from(v).unwrap_or(0);
            Ok(QueueLen {
                ready: n(ready),
                delayed: n(delayed),
                leased: n(leased),
            })
        })
    }

    fn has<'a>(&'a self, payload: &'a [u8]) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let mut conn = shared.conn.clone();
            if shared.options.unique {
                return redis::cmd("HEXISTS")
                    .arg(&shared.keys[6])
                    .arg(payload)
                    .query_async(&mut conn)
                    .await
                    .map_err(backend);
            }
            // A simple queue keeps no payload index: scan the payloads.
            let mut cursor: u64 = 0;
            loop {
                let (next, entries): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                    .arg(&shared.keys[3])
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1_000)
                    .query_async(&mut conn)
                    .await
                    .map_err(backend)?;
                if entries
                    .chunks(2)
                    .any(|pair| pair.get(1).map(Vec::as_slice) == Some(payload))
                {
                    return Ok(true);
                }
                if next == 0 {
                    return Ok(false);
                }
                cursor = next;
            }
        })
    }

    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(async move {
            let mut inv = self.shared.invocation(&SCRIPTS.remove_all);
            inv.arg("0");
            self.shared.run_u64(&inv, "remove_all").await
        })
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.ready.notify_waiters();
        self.shared.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_pop_reads_items_and_due_time() {
        let reply = Value::Array(vec![
            Value::Int(250),
            Value::BulkString(b"7".to_vec()),
            Value::BulkString(b"payload".to_vec()),
            Value::Nil,
            Value::Int(0),
            Value::BulkString(b"8".to_vec()),
            Value::BulkString(Vec::new()),
            Value::BulkString(b"k".to_vec()),
            Value::Int(3),
        ]);
        let (due, items) = parse_pop(reply).unwrap();
        assert_eq!(due, Some(Duration::from_millis(250)));
        assert_eq!(
            items,
            vec![
                Delivery {
                    id: ItemId(7),
                    payload: b"payload".to_vec(),
                    key: None,
                    attempts: 0
                },
                Delivery {
                    id: ItemId(8),
                    payload: Vec::new(),
                    key: Some("k".into()),
                    attempts: 3
                },
            ]
        );
    }

    #[test]
    fn parse_pop_rejects_malformed_replies() {
        assert!(parse_pop(Value::Int(1)).is_err());
        assert!(parse_pop(Value::Array(vec![])).is_err());
        let truncated = Value::Array(vec![Value::Int(-1), Value::BulkString(b"1".to_vec())]);
        assert!(parse_pop(truncated).is_err());
        let bad_id = Value::Array(vec![
            Value::Int(-1),
            Value::BulkString(b"x".to_vec()),
            Value::BulkString(vec![]),
            Value::Nil,
            Value::Int(0),
        ]);
        assert!(parse_pop(bad_id).is_err());
        assert_eq!(
            parse_pop(Value::Array(vec![Value::Int(-1)])).unwrap().0,
            None
        );
    }

    #[test]
    fn flag_outlives_the_wait() {
        assert_eq!(flag_ms(Duration::ZERO), 0);
        assert!(flag_ms(Duration::from_millis(1)) > 1);
    }
}
