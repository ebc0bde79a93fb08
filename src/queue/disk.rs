//! The embedded, crash-safe base queue: many named queues in one [redb] file.
//!
//! # Overview
//!
//! A [`DiskStore`] owns one database file and one *committer* thread. Every
//! [`DiskQueue`] taken from it (any number, by name) implements
//! [`BaseQueue`] and sends its writes to that thread, which applies whatever
//! has accumulated in **one** durable redb transaction (`Durability::Immediate`:
//! the commit returns after `fsync`). redb is blocking, so it never runs on the
//! async runtime: the committer is a dedicated OS thread and the futures only
//! wait on a oneshot reply.
//!
//! # Durability
//!
//! * A [`push`](BaseQueue::push) resolves `Ok` only after the commit holding
//!   the item is durable. If the process is killed after that, the item is in
//!   the file.
//! * An [`ack`](BaseQueue::ack), [`nack`](BaseQueue::nack) and
//!   [`remove_all`](BaseQueue::remove_all) resolve after their commit too.
//! * A [`pop`](BaseQueue::pop) returns at once; the lease (state, deadline and
//!   the raised attempt count) is written by the next group commit without the
//!   caller waiting; a group of nothing but lease writes commits without
//!   `fsync` (`Durability::None`), so they reach the disk with the next durable
//!   commit. Losing that write in a crash is harmless: on open every
//!   leased item is made ready again anyway (with its attempt count raised if
//!   the lease reached the disk).
//!
//! So a crash (or `kill -9`) loses no acknowledged push: an item is deleted only
//! by an ack, and anything popped but not acked is ready again when the file is
//! opened next. Items may be handed out more than once (at-least-once).
//!
//! # Group commit
//!
//! Pushes from many tasks (and the lease, ack and nack writes of every queue in
//! the store) queue up on a channel while the committer is busy with the
//! previous `fsync`; the committer then takes everything waiting (up to
//! 16 384 operations) into the next transaction. Under load one `fsync`
//! therefore covers hundreds of pushes; a lone push costs one commit.
//! [`push_batch`](BaseQueue::push_batch) hands all its items to the committer
//! at once, so a batch costs one commit too. Producers that push in a loop,
//! each awaiting its push, come back as soon as their commit answers them;
//! the group after a commit waits for them (until it holds as many pushes as
//! that commit answered plus those queued during it, at most half the
//! commit's duration and 500 µs), so four such producers share each `fsync`
//! by four rather than by two. A wait that runs out skips the next waits
//! (1, 2, 4, … up to 64), so pushes that never come back (one per request)
//! seldom pay it. A commit that fails fails every
//! operation in it: each push of the group gets [`PushError::Backend`] with
//! its item, and none of them is made ready.
//!
//! # Memory
//!
//! The queue keeps an index of its items **including their payloads** in
//! memory, so pops never read the disk; the file is for durability, not for
//! spilling. Memory use is proportional to what the queue holds. The unique
//! variant's dedup set is part of that index and is rebuilt from the stored
//! items on open (the items are the one source of truth on disk).
//!
//! # Ordering
//!
//! Ready items are handed out by a sequence number: a push's sequence is its id,
//! an item that becomes ready again (after a nack's delay or an expired lease)
//! takes the next sequence and goes to the back. Keyed items: only the oldest
//! stored item of a key is ever ready; the next one becomes ready when it is
//! acked.
//!
//! # Locking
//!
//! redb locks the file: a second process (or a second [`DiskStore`] in this
//! process) opening it fails at once with [`DiskError::AlreadyOpen`].
//!
//! # Damaged files
//!
//! Every [`open`](DiskStore::open) verifies the checksum of every page (redb's
//! integrity check), so a file damaged outside the store (bytes overwritten,
//! a bad sector) is refused with [`DiskError::Corrupt`], carrying the path and
//! what redb said, instead of failing later in a commit. Should redb still
//! panic, the panic is caught: the operations get [`Damage::Panic`] and the
//! store stops writing to the file.
//!
//! [`DiskStore::repair`] then keeps every intact item: redb's own repair
//! first; if redb refuses the file, a rebuild from every page whose checksum
//! verifies. Records that do not decode or were read from a damaged page go
//! to the queue's quarantine ([`DiskStore::quarantined`]); what lay under a
//! destroyed page is counted as lost in the [`RepairReport`]. The damaged
//! original is kept beside the file.
//!
//! One limit comes with redb's one-fsync commits: after a crash, damage to a
//! page that only the last commit wrote looks like that commit was torn by
//! the crash, and redb rolls back to the commit before without an error. That
//! commit's pushes are gone and its acked items are delivered again.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use snapstream::queue::disk::DiskStore;
//! use snapstream::queue::{BaseQueue, NewItem, QueueOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = DiskStore::open(dir.path().join("queues.redb"))?;
//! let queue = store.queue("mail", QueueOptions::default())?;
//!
//! queue.push(NewItem::new("hello"), Duration::from_secs(1)).await?;
//! let batch = queue.pop(16, Duration::from_secs(1)).await?;
//! assert_eq!(batch[0].payload, b"hello");
//! queue.ack(&[batch[0].id]).await?;
//! assert_eq!(queue.len().await?.total(), 0);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::base::{
    Backend, BaseQueue, Delivery, ItemId, NewItem, PushError, QueueError, QueueLen, QueueOptions,
};

/// Most operations the committer folds into one transaction.
const MAX_BATCH: usize = 16 * 1024;
/// The longest a group waits for the pushes the previous commit answered
/// (see `Regroup`).
const MAX_REGROUP_WAIT: Duration = Duration::from_micros(500);
/// Most waits skipped after waits that ran out (see `Regroup`).
const MAX_REGROUP_SKIP: u32 = 64;

mod salvage;

/// `queue name -> next id`, shared by every queue of a store.
const META_NAME: &str = "snapstream.queue.meta";
const META: TableDefinition<'static, &str, u64> = TableDefinition::new(META_NAME);
const ITEMS_PREFIX: &str = "snapstream.queue.items/";
const QUARANTINE_PREFIX: &str = "snapstream.queue.quarantine/";

fn items_table_name(queue: &str) -> String {
    format!("{ITEMS_PREFIX}{queue}")
}

/// `n -> original id (u64 LE, u64::MAX if unknown) | record bytes`: what a
/// repair took out of a queue.
fn quarantine_table_name(queue: &str) -> String {
    format!("{QUARANTINE_PREFIX}{queue}")
}

/// Why the disk store or one of its queues failed.
///
/// Cloneable because one failed group commit is reported to every operation
/// it carried.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// Another process (or another store in this one) has the file open.
    #[error("database file is already open elsewhere: {}", path.display())]
    AlreadyOpen {
        /// The file that was being opened.
        path: PathBuf,
    },
    /// The database file could not be opened.
    #[error("cannot open database file: {}", path.display())]
    Open {
        /// The file that was being opened.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: Arc<redb::DatabaseError>,
    },
    /// A read, write or commit failed.
    #[error("database operation failed")]
    Storage(#[source] Arc<redb::Error>),
    /// The database file is damaged: redb found a bad page or checksum, redb
    /// panicked on it, or a stored record does not decode.
    ///
    /// [`DiskStore::repair`] recovers every intact item of such a file.
    #[error("database file is corrupt: {}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is damaged: what redb said, or which record.
        #[source]
        damage: Damage,
    },
    /// The queue is already open in this store with different options.
    #[error("queue {name:?} is already open with other options")]
    OptionsMismatch {
        /// The queue's name.
        name: String,
    },
    /// A queue name must not be empty.
    #[error("queue name is empty")]
    EmptyName,
    /// The committer thread could not be started.
    #[error("cannot start the committer thread")]
    Thread(#[source] Arc<std::io::Error>),
    /// The committer thread is gone (it panicked); nothing more can be written.
    #[error("disk store has stopped")]
    Stopped,
}

/// What is damaged in a [corrupt](DiskError::Corrupt) database file.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Damage {
    /// redb reported the file's structure damaged (a page, a checksum, a
    /// commit slot); its message.
    #[error(transparent)]
    Redb(Arc<redb::Error>),
    /// redb panicked while reading or writing the file, which it does on some
    /// damaged pages instead of returning an error. The store stops writing to
    /// the file: every later operation gets this error too.
    #[error("redb panicked: {message}")]
    Panic {
        /// The panic's message.
        message: String,
    },
    /// A stored record of a queue does not decode.
    #[error("stored item {id} of queue {queue:?} does not decode")]
    Record {
        /// The queue holding the record.
        queue: String,
        /// The record's item id.
        id: u64,
    },
    /// [`DiskStore::repair`] could read nothing from the file (its header or
    /// both commit slots are destroyed).
    #[error("nothing in the file is readable: {reason}")]
    Unreadable {
        /// What is destroyed.
        reason: String,
    },
}

impl From<redb::Error> for DiskError {
    fn from(e: redb::Error) -> Self {
        DiskError::Storage(Arc::new(e))
    }
}

fn storage(e: impl Into<redb::Error>) -> DiskError {
    DiskError::from(e.into())
}

/// Reports redb's "corrupted" errors as [`DiskError::Corrupt`] of `path`.
fn classify(path: &Path, e: DiskError) -> DiskError {
    match e {
        DiskError::Storage(source) if matches!(*source, redb::Error::Corrupted(_)) => {
            DiskError::Corrupt {
                path: path.to_path_buf(),
                damage: Damage::Redb(source),
            }
        }
        e => e,
    }
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// Runs `f`, turning a panic (redb panics on some damaged pages) into
/// [`Damage::Panic`]. `Err` is the panic; `Ok` holds what `f` returned.
fn catch_redb_panic<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T, DiskError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = panic_message(payload.as_ref());
        tracing::error!(path = %path.display(), %message, "snapstream disk queue: redb panicked");
        DiskError::Corrupt {
            path: path.to_path_buf(),
            damage: Damage::Panic { message },
        }
    })
}

// ---------------------------------------------------------------------------
// Record encoding
// ---------------------------------------------------------------------------

const STATE_READY: u8 = 0;
const STATE_DELAYED: u8 = 1;
const STATE_LEASED: u8 = 2;
const NO_KEY: u32 = u32::MAX;
const HEADER_LEN: usize = 1 + 4 + 8 + 8;

/// The fixed-size, rewritable front of a stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    state: u8,
    /// Deliveries so far (what the next delivery reports).
    attempts: u32,
    /// Ready order.
    seq: u64,
    /// Unix milliseconds: when a delayed item is due, or a lease ends.
    due_ms: u64,
}

/// `header | key_len u32 (NO_KEY = none) | key | payload`, little endian.
fn encode(header: Header, key: Option<&str>, payload: &[u8]) -> Vec<u8> {
    let key_len = key.map_or(0, str::len);
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + key_len + payload.len());
    out.resize(HEADER_LEN, 0);
    write_header(&mut out, header);
    match key {
        Some(k) => {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
        }
        None => out.extend_from_slice(&NO_KEY.to_le_bytes()),
    }
    out.extend_from_slice(payload);
    out
}

fn write_header(out: &mut [u8], h: Header) {
    out[0] = h.state;
    out[1..5].copy_from_slice(&h.attempts.to_le_bytes());
    out[5..13].copy_from_slice(&h.seq.to_le_bytes());
    out[13..21].copy_from_slice(&h.due_ms.to_le_bytes());
}

/// A decoded record, borrowing the payload.
struct Decoded<'a> {
    header: Header,
    key: Option<String>,
    payload: &'a [u8],
}

fn decode(bytes: &[u8]) -> Option<Decoded<'_>> {
    if bytes.len() < HEADER_LEN + 4 {
        return None;
    }
    let header = Header {
        state: bytes[0],
        attempts: u32::from_le_bytes(bytes[1..5].try_into().ok()?),
        seq: u64::from_le_bytes(bytes[5..13].try_into().ok()?),
        due_ms: u64::from_le_bytes(bytes[13..21].try_into().ok()?),
    };
    if header.state > STATE_LEASED {
        return None;
    }
    let key_len = u32::from_le_bytes(bytes[21..25].try_into().ok()?);
    let rest = &bytes[25..];
    let (key, payload) = if key_len == NO_KEY {
        (None, rest)
    } else {
        let n = key_len as usize;
        if rest.len() < n {
            return None;
        }
        let key = std::str::from_utf8(&rest[..n]).ok()?.to_owned();
        (Some(key), &rest[n..])
    };
    Some(Decoded {
        header,
        key,
        payload,
    })
}

/// `now + d`, or about a century from now when that overflows.
fn instant_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unix_ms_after(delay: Duration) -> u64 {
    unix_ms_now().saturating_add(delay.as_millis().min(u64::MAX as u128) as u64)
}

// ---------------------------------------------------------------------------
// Committer thread
// ---------------------------------------------------------------------------

type Reply = oneshot::Sender<Result<(), DiskError>>;

enum Op {
    /// Store a new item; on success the committer makes it ready in memory.
    Push {
        q: Arc<Shared>,
        id: u64,
        record: Vec<u8>,
        reply: Reply,
    },
    /// Rewrite the headers of stored items (lease, nack, becoming ready).
    Patch {
        q: Arc<Shared>,
        patches: Vec<(u64, Header)>,
        reply: Option<Reply>,
    },
    /// Delete items (ack).
    Delete {
        q: Arc<Shared>,
        ids: Vec<u64>,
        reply: Reply,
    },
    /// Delete every item with an id below `below` (remove_all).
    Clear {
        q: Arc<Shared>,
        below: u64,
        reply: Reply,
    },
    /// Read a queue's items, making leased ones ready again.
    Load {
        name: String,
        reply: std_mpsc::Sender<Result<Loaded, DiskError>>,
    },
    /// Read a queue's quarantine table.
    Quarantine {
        name: String,
        reply: std_mpsc::Sender<Result<Vec<Quarantined>, DiskError>>,
    },
    Shutdown,
}

impl Op {
    fn is_push(&self) -> bool {
        matches!(self, Op::Push { .. })
    }

    /// Whether a caller waits for this operation's commit (so it must be
    /// durable): everything but a lease write.
    fn awaited(&self) -> bool {
        !matches!(self, Op::Patch { reply: None, .. })
    }

    fn queue_name(&self) -> Option<&str> {
        match self {
            Op::Push { q, .. }
            | Op::Patch { q, .. }
            | Op::Delete { q, .. }
            | Op::Clear { q, .. } => Some(&q.name),
            Op::Load { .. } | Op::Quarantine { .. } | Op::Shutdown => None,
        }
    }
}

struct Loaded {
    next_id: u64,
    records: Vec<(u64, Vec<u8>)>,
}

/// The committer thread's database and what it has learnt about it.
struct Committer {
    db: Option<Database>,
    path: PathBuf,
    /// Set when redb panicked: the database is not touched again and every
    /// later operation gets this error.
    failed: Option<DiskError>,
}

impl Committer {
    /// Runs `f` on the database unless an earlier panic stopped it; reports
    /// redb's corruption errors and panics as [`DiskError::Corrupt`].
    fn run<T>(
        &mut self,
        f: impl FnOnce(&Database) -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let Some(db) = &self.db else {
            return Err(DiskError::Stopped);
        };
        match catch_redb_panic(&self.path, || f(db)) {
            Ok(result) => result.map_err(|e| classify(&self.path, e)),
            Err(panicked) => {
                self.failed = Some(panicked.clone());
                // The handle may be inconsistent now; closing it may panic too.
                if let Some(db) = self.db.take() {
                    let _ = catch_redb_panic(&self.path, || drop(db));
                }
                Err(panicked)
            }
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            let _ = catch_redb_panic(&self.path, || drop(db));
        }
    }
}

fn committer(db: Database, path: PathBuf, rx: std_mpsc::Receiver<Op>) {
    let mut c = Committer {
        db: Some(db),
        path,
        failed: None,
    };
    let mut batch: Vec<Op> = Vec::new();
    let mut regroup = Regroup::default();
    loop {
        if batch.is_empty() {
            let Ok(first) = rx.recv() else { return };
            batch.push(first);
        }
        drain(&rx, &mut batch);
        regroup.wait(&rx, &mut batch);
        let mut group = Vec::new();
        let mut stop = false;
        for op in std::mem::take(&mut batch) {
            match op {
                Op::Shutdown => {
                    commit_group(&mut c, std::mem::take(&mut group));
                    stop = true;
                    break;
                }
                Op::Load { name, reply } => {
                    commit_group(&mut c, std::mem::take(&mut group));
                    let path = c.path.clone();
                    let _ = reply.send(c.run(|db| load(db, &path, &name)));
                }
                Op::Quarantine { name, reply } => {
                    commit_group(&mut c, std::mem::take(&mut group));
                    let _ = reply.send(c.run(|db| read_quarantine(db, &name)));
                }
                op => group.push(op),
            }
        }
        if stop {
            return;
        }
        if group.is_empty() {
            continue;
        }
        let durable = group.iter().any(Op::awaited);
        let answered = group.iter().filter(|op| op.is_push()).count();
        let started = std::time::Instant::now();
        let result = c.run(|db| apply(db, &group, durable));
        let took = started.elapsed();
        // What arrived during the commit goes into the next group; so, for a
        // moment, do the pushes answered now (see `Regroup`).
        drain(&rx, &mut batch);
        if durable && answered > 0 && result.is_ok() {
            regroup.arm(&batch, answered, took);
        }
        complete_group(group, result);
    }
}

/// Takes whatever is waiting on `rx`, up to [`MAX_BATCH`] operations in `batch`.
fn drain(rx: &std_mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Waits, after a durable commit, for the pushes it answered to come back
/// before the next commit starts.
///
/// Producers that push in a loop, each awaiting its push, push again as soon
/// as their commit answers them; but the committer is faster: without a wait
/// the first push back starts the next commit alone and the others wait for
/// the one after it, so four producers share commits by two, not by four
/// (measured: 2.6 items per `fsync` rather than 3.9). So the group after a
/// durable commit waits until it holds as many pushes as were queued during
/// that commit plus as many as it answered, at most half the commit's
/// duration and at most [`MAX_REGROUP_WAIT`]. The wait ends the moment they
/// are all back, so a lone producer never waits (it is the one awaited).
///
/// Pushes from tasks that do not push again (one push per request) would
/// make every group wait its whole bound for nothing; so a wait that runs
/// out skips the next wait, two after a second one in a row, and so on up to
/// [`MAX_REGROUP_SKIP`]: such a load pays the bound once per that many
/// commits.
#[derive(Default)]
struct Regroup {
    /// Pushes the next group waits for, and until when.
    armed: Option<(usize, std::time::Instant)>,
    /// Waits still to skip, and how many the next run-out skips.
    skip: u32,
    next_skip: u32,
}

impl Regroup {
    fn arm(&mut self, batch: &[Op], answered: usize, took: Duration) {
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        let queued = batch.iter().filter(|op| op.is_push()).count();
        let wait = (took / 2).min(MAX_REGROUP_WAIT);
        self.armed = Some((queued + answered, std::time::Instant::now() + wait));
    }

    fn wait(&mut self, rx: &std_mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
        let Some((target, until)) = self.armed.take() else {
            return;
        };
        let mut pushes = batch.iter().filter(|op| op.is_push()).count();
        while pushes < target && batch.len() < MAX_BATCH {
            if batch.iter().any(|op| matches!(op, Op::Shutdown)) {
                return;
            }
            let now = std::time::Instant::now();
            let got = match until.checked_duration_since(now) {
                Some(left) if !left.is_zero() => rx.recv_timeout(left),
                _ => Err(std_mpsc::RecvTimeoutError::Timeout),
            };
            match got {
                Ok(op) => {
                    batch.push(op);
                    drain(rx, batch);
                    pushes = batch.iter().filter(|op| op.is_push()).count();
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    self.next_skip = (self.next_skip * 2).clamp(1, MAX_REGROUP_SKIP);
                    self.skip = self.next_skip;
                    return;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        self.next_skip = 0;
    }
}

/// Applies `ops` in one transaction (durable unless told otherwise), then
/// completes them.
fn commit_group(c: &mut Committer, ops: Vec<Op>) {
    if ops.is_empty() {
        return;
    }
    let durable = ops.iter().any(Op::awaited);
    let result = c.run(|db| apply(db, &ops, durable));
    complete_group(ops, result);
}

/// Completes the operations of one group commit with its `result`.
fn complete_group(ops: Vec<Op>, result: Result<(), DiskError>) {
    if let Err(e) = &result {
        tracing::warn!(error = %e, ops = ops.len(), "snapstream disk queue: group commit failed");
    }
    // Make the committed pushes ready first, one lock and one wake-up per
    // queue; then complete every operation.
    let mut i = 0;
    while i < ops.len() {
        let Op::Push { q, .. } = &ops[i] else {
            i += 1;
            continue;
        };
        let mut j = i;
        let mut run = Vec::new();
        while let Some(Op::Push {
            q: q2, id, record, ..
        }) = ops.get(j)
        {
            if !Arc::ptr_eq(q, q2) {
                break;
            }
            run.push((*id, record.as_slice()));
            j += 1;
        }
        q.pushes_committed(&run, result.is_ok());
        i = j;
    }
    for op in ops {
        let outcome = result.clone();
        match op {
            Op::Push { reply, .. } => {
                let _ = reply.send(outcome);
            }
            Op::Patch { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
            Op::Delete { reply, .. } | Op::Clear { reply, .. } => {
                let _ = reply.send(outcome);
            }
            Op::Load { .. } | Op::Quarantine { .. } | Op::Shutdown => {}
        }
    }
}

/// Writes `ops` in one transaction. `durable`: the commit returns after
/// `fsync` (`Durability::Immediate`); otherwise (a group of lease writes
/// nobody waits for) it is `Durability::None`: visible at once, on disk with
/// the next durable commit, and lost harmlessly in a crash before it.
fn apply(db: &Database, ops: &[Op], durable: bool) -> Result<(), DiskError> {
    // Group by queue, keeping each queue's order, so each table opens once.
    let mut by_queue: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        if let Some(name) = op.queue_name() {
            by_queue.entry(name).or_default().push(op);
        }
    }
    let mut txn = db.begin_write().map_err(storage)?;
    if !durable {
        // Refused (never in this single-process mode): the commit stays
        // durable, which is never wrong.
        let _ = txn.set_durability(redb::Durability::None);
    }
    {
        let mut meta = txn.open_table(META).map_err(storage)?;
        for (name, ops) in by_queue {
            let table_name = items_table_name(name);
            let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
            let mut items = txn.open_table(def).map_err(storage)?;
            let mut max_id = None;
            for op in ops {
                match op {
                    Op::Push { id, record, .. } => {
                        items.insert(*id, record.as_slice()).map_err(storage)?;
                        max_id = Some(*id);
                    }
                    Op::Patch { patches, .. } => {
                        for (id, header) in patches {
                            let current =
                                items.get(*id).map_err(storage)?.map(|v| v.value().to_vec());
                            if let Some(mut record) = current {
                                if record.len() >= HEADER_LEN {
                                    write_header(&mut record, *header);
                                    items.insert(*id, record.as_slice()).map_err(storage)?;
                                }
                            }
                        }
                    }
                    Op::Delete { ids, .. } => {
                        for id in ids {
                            items.remove(*id).map_err(storage)?;
                        }
                    }
                    Op::Clear { below, .. } => {
                        items.retain_in(..*below, |_, _| false).map_err(storage)?;
                    }
                    Op::Load { .. } | Op::Quarantine { .. } | Op::Shutdown => {}
                }
            }
            if let Some(max_id) = max_id {
                let stored = meta.get(name).map_err(storage)?.map_or(0, |v| v.value());
                if max_id + 1 > stored {
                    meta.insert(name, max_id + 1).map_err(storage)?;
                }
            }
        }
    }
    txn.commit().map_err(storage)?;
    Ok(())
}

fn record_damage(path: &Path, queue: &str, id: u64) -> DiskError {
    DiskError::Corrupt {
        path: path.to_path_buf(),
        damage: Damage::Record {
            queue: queue.to_owned(),
            id,
        },
    }
}

fn load(db: &Database, path: &Path, name: &str) -> Result<Loaded, DiskError> {
    let txn = db.begin_write().map_err(storage)?;
    let mut records = Vec::new();
    let next_id;
    {
        let meta = txn.open_table(META).map_err(storage)?;
        next_id = meta.get(name).map_err(storage)?.map_or(1, |v| v.value());
        let table_name = items_table_name(name);
        let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
        let mut items = txn.open_table(def).map_err(storage)?;
        let mut released = Vec::new();
        for entry in items.iter().map_err(storage)? {
            let (id, value) = entry.map_err(storage)?;
            let id = id.value();
            let mut record = value.value().to_vec();
            let Some(decoded) = decode(&record) else {
                return Err(record_damage(path, name, id));
            };
            if decoded.header.state == STATE_LEASED {
                // Leased by a process that is gone: ready again, at its old place.
                let header = Header {
                    state: STATE_READY,
                    due_ms: 0,
                    ..decoded.header
                };
                write_header(&mut record, header);
                released.push((id, record.clone()));
            }
            records.push((id, record));
        }
        for (id, record) in released {
            items.insert(id, record.as_slice()).map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)?;
    Ok(Loaded { next_id, records })
}

// ---------------------------------------------------------------------------
// Repair
// ---------------------------------------------------------------------------

/// What [`DiskStore::repair`] did to a file.
///
/// Every item the file held before the damage is accounted for: it is in its
/// queue again (`kept`), in the queue's quarantine (`quarantined`, see
/// [`DiskStore::quarantined`]), or counted as destroyed (`lost`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// Where the damaged original was moved when the file had to be rebuilt
    /// (it is kept, never deleted); `None` when redb's own check passed and
    /// the file was repaired in place.
    pub damaged_original: Option<PathBuf>,
    /// The latest commit's root page was destroyed, so the file was rebuilt
    /// from the commit before it: the last commit's pushes are missing (not
    /// counted in `lost`) and items it acked are back (delivered again, as
    /// after a crash).
    pub from_previous_commit: bool,
    /// Tables whose definition could not be read at all, so even their
    /// queue's name is unknown; `None` when that count was damaged too.
    pub unreadable_tables: Option<u64>,
    /// One entry per queue found, by name.
    pub queues: Vec<QueueRepair>,
}

impl RepairReport {
    /// Whether nothing was quarantined or lost (the file may still have been
    /// rebuilt, for damage outside the queues' items).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::disk::DiskStore;
    ///
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("q.redb");
    /// drop(DiskStore::open(&path)?);
    /// let report = DiskStore::repair(&path)?;
    /// assert!(report.is_lossless());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_lossless(&self) -> bool {
        !self.from_previous_commit
            && self.unreadable_tables == Some(0)
            && self
                .queues
                .iter()
                .all(|q| q.quarantined == 0 && q.lost == Some(0))
    }
}

/// What [`DiskStore::repair`] found in one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueRepair {
    /// The queue's name.
    pub name: String,
    /// Items that are intact and in the queue again.
    pub kept: u64,
    /// Records moved to the queue's quarantine by this repair: they do not
    /// decode, or were read from a damaged page (their bytes are kept as
    /// found; [`DiskStore::quarantined`] lists them).
    pub quarantined: u64,
    /// Items destroyed by the damage: how many the file recorded for the
    /// queue minus how many were found. `None` when that record itself is
    /// destroyed (then any number may be lost).
    pub lost: Option<u64>,
}

/// A record [`DiskStore::repair`] took out of a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Quarantined {
    /// The item's id, when its key was readable.
    pub id: Option<ItemId>,
    /// The stored record as it was found (snapstream's encoding: a 21-byte
    /// header, the key, then the payload).
    pub record: Vec<u8>,
}

fn quarantine_value(id: Option<u64>, record: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + record.len());
    v.extend_from_slice(&id.unwrap_or(u64::MAX).to_le_bytes());
    v.extend_from_slice(record);
    v
}

fn read_quarantine(db: &Database, name: &str) -> Result<Vec<Quarantined>, DiskError> {
    let txn = db.begin_read().map_err(storage)?;
    let table_name = quarantine_table_name(name);
    let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
    let table = match txn.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(storage(e)),
    };
    let mut out = Vec::new();
    for entry in table.iter().map_err(storage)? {
        let (_, value) = entry.map_err(storage)?;
        let v = value.value();
        let id = v
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .filter(|&id| id != u64::MAX)
            .map(ItemId);
        out.push(Quarantined {
            id,
            record: v.get(8..).unwrap_or_default().to_vec(),
        });
    }
    Ok(out)
}

/// A record on its way to quarantine: its id when readable, its bytes.
type Suspect = (Option<u64>, Vec<u8>);

/// Appends `records` to the quarantine table of `queue` in `txn`.
fn quarantine(
    txn: &redb::WriteTransaction,
    queue: &str,
    records: &[Suspect],
) -> Result<(), DiskError> {
    if records.is_empty() {
        return Ok(());
    }
    let table_name = quarantine_table_name(queue);
    let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
    let mut table = txn.open_table(def).map_err(storage)?;
    let first = table
        .last()
        .map_err(storage)?
        .map_or(0, |(k, _)| k.value() + 1);
    for (n, (id, record)) in (first..).zip(records) {
        table
            .insert(n, quarantine_value(*id, record).as_slice())
            .map_err(storage)?;
    }
    Ok(())
}

/// The file opens: moves every record that does not decode to quarantine.
fn repair_in_place(db: &Database) -> Result<RepairReport, DiskError> {
    let txn = db.begin_write().map_err(storage)?;
    let mut queues = Vec::new();
    let names: Vec<String> = txn
        .list_tables()
        .map_err(storage)?
        .filter_map(|t| t.name().strip_prefix(ITEMS_PREFIX).map(str::to_owned))
        .collect();
    for name in names {
        let table_name = items_table_name(&name);
        let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
        let mut items = txn.open_table(def).map_err(storage)?;
        let mut bad = Vec::new();
        let mut kept = 0;
        for entry in items.iter().map_err(storage)? {
            let (id, value) = entry.map_err(storage)?;
            if decode(value.value()).is_some() {
                kept += 1;
            } else {
                bad.push((Some(id.value()), value.value().to_vec()));
            }
        }
        for (id, _) in &bad {
            items
                .remove(id.expect("read with its key"))
                .map_err(storage)?;
        }
        drop(items);
        quarantine(&txn, &name, &bad)?;
        queues.push(QueueRepair {
            name,
            kept,
            quarantined: bad.len() as u64,
            lost: Some(0),
        });
    }
    txn.commit().map_err(storage)?;
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(RepairReport {
        damaged_original: None,
        from_previous_commit: false,
        unreadable_tables: Some(0),
        queues,
    })
}

/// A free name next to `path` with `suffix` appended.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    let first = path.with_file_name(&name);
    if !first.exists() {
        return first;
    }
    (1u32..)
        .map(|n| {
            let mut numbered = name.clone();
            numbered.push(format!(".{n}"));
            path.with_file_name(numbered)
        })
        .find(|p| !p.exists())
        .expect("some number is free")
}

/// redb refuses the file: reads what verifies into a new file, which then
/// takes the damaged file's place (the original is moved aside, not deleted).
fn rebuild(path: &Path) -> Result<RepairReport, DiskError> {
    let unreadable = |reason: String| DiskError::Corrupt {
        path: path.to_path_buf(),
        damage: Damage::Unreadable { reason },
    };
    let io = |e: std::io::Error| DiskError::Open {
        path: path.to_path_buf(),
        source: Arc::new(redb::DatabaseError::Storage(redb::StorageError::Io(e))),
    };
    let found = salvage::read(path).map_err(unreadable)?;

    let mut next_ids: BTreeMap<String, u64> = BTreeMap::new();
    let mut queues: BTreeMap<String, QueueRepair> = BTreeMap::new();
    let mut kept_items: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    let mut quarantined: BTreeMap<String, Vec<Suspect>> = BTreeMap::new();
    // Quarantine tables of earlier repairs are carried over first, so their
    // entries keep coming first.
    let mut earlier: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for table in found.tables {
        if table.name == META_NAME {
            for e in table.entries.iter().filter(|e| e.trusted) {
                if let (Ok(name), Ok(next)) = (
                    String::from_utf8(e.key.clone()),
                    <[u8; 8]>::try_from(e.value.as_slice()),
                ) {
                    next_ids.insert(name, u64::from_le_bytes(next));
                }
            }
        } else if let Some(name) = table.name.strip_prefix(QUARANTINE_PREFIX) {
            let values = table.entries.into_iter().map(|e| e.value).collect();
            earlier.insert(name.to_owned(), values);
        } else if let Some(name) = table.name.strip_prefix(ITEMS_PREFIX) {
            let found = table.entries.len() as u64;
            let (mut kept, mut bad) = (Vec::new(), Vec::new());
            for e in table.entries {
                let id = <[u8; 8]>::try_from(e.key.as_slice())
                    .ok()
                    .map(u64::from_le_bytes);
                match id {
                    Some(id) if e.trusted && decode(&e.value).is_some() => kept.push((id, e.value)),
                    _ => bad.push((id, e.value)),
                }
            }
            queues.insert(
                name.to_owned(),
                QueueRepair {
                    name: name.to_owned(),
                    kept: kept.len() as u64,
                    quarantined: bad.len() as u64,
                    lost: table.expected.map(|n| n.saturating_sub(found)),
                },
            );
            kept_items.insert(name.to_owned(), kept);
            quarantined.insert(name.to_owned(), bad);
        }
    }
    // A queue known only from its next id lost its whole items table.
    for name in next_ids.keys() {
        queues.entry(name.clone()).or_insert_with(|| QueueRepair {
            name: name.clone(),
            kept: 0,
            quarantined: 0,
            lost: None,
        });
    }

    let rebuilt = sibling(path, ".rebuilding");
    let db = Database::create(&rebuilt).map_err(|e| map_open_error(&rebuilt, e))?;
    let mut write = || -> Result<(), DiskError> {
        let txn = db.begin_write().map_err(storage)?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            for name in queues.keys() {
                let items = kept_items.remove(name).unwrap_or_default();
                let bad = quarantined.remove(name).unwrap_or_default();
                // Ids read from damaged pages may be garbage: only kept ones count.
                let max_id = items.iter().map(|(id, _)| *id).max();
                let next = next_ids
                    .get(name)
                    .copied()
                    .unwrap_or(1)
                    .max(max_id.map_or(1, |m| m.saturating_add(1)));
                meta.insert(name.as_str(), next).map_err(storage)?;
                let table_name = items_table_name(name);
                let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
                let mut table = txn.open_table(def).map_err(storage)?;
                for (id, record) in &items {
                    table.insert(*id, record.as_slice()).map_err(storage)?;
                }
                drop(table);
                if let Some(values) = earlier.remove(name) {
                    let table_name = quarantine_table_name(name);
                    let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
                    let mut table = txn.open_table(def).map_err(storage)?;
                    for (n, value) in values.iter().enumerate() {
                        table.insert(n as u64, value.as_slice()).map_err(storage)?;
                    }
                }
                quarantine(&txn, name, &bad)?;
            }
            // Quarantines of queues whose items table is gone.
            for (name, values) in std::mem::take(&mut earlier) {
                let table_name = quarantine_table_name(&name);
                let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
                let mut table = txn.open_table(def).map_err(storage)?;
                for (n, value) in values.iter().enumerate() {
                    table.insert(n as u64, value.as_slice()).map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)?;
        Ok(())
    };
    if let Err(e) = write() {
        drop(db);
        let _ = std::fs::remove_file(&rebuilt);
        return Err(e);
    }
    drop(db);
    let damaged = sibling(path, ".damaged");
    std::fs::rename(path, &damaged).map_err(io)?;
    std::fs::rename(&rebuilt, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the renames durable where the platform allows it.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(RepairReport {
        damaged_original: Some(damaged),
        from_previous_commit: found.from_previous_commit,
        unreadable_tables: found.tables_missing,
        queues: queues.into_values().collect(),
    })
}

// ---------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------

struct StoreInner {
    path: PathBuf,
    tx: std_mpsc::Sender<Op>,
    thread: Mutex<Option<JoinHandle<()>>>,
    queues: Mutex<HashMap<String, Weak<Shared>>>,
}

impl StoreInner {
    fn send(&self, op: Op) -> Result<(), DiskError> {
        self.tx.send(op).map_err(|_| DiskError::Stopped)
    }
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        // Everything sent before is committed first; the file lock goes with
        // the database when the thread ends.
        let _ = self.tx.send(Op::Shutdown);
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open database file holding any number of named [`DiskQueue`]s.
///
/// Cheap to clone; the file is closed (after every pending write is committed)
/// when the last clone and the last queue taken from it are dropped. That last
/// drop waits for the committer thread to finish its current commit.
///
/// # Examples
///
/// ```
/// use snapstream::queue::disk::DiskStore;
/// use snapstream::queue::{BaseQueue, QueueOptions};
///
/// let dir = tempfile::tempdir()?;
/// let store = DiskStore::open(dir.path().join("q.redb"))?;
/// let mail = store.queue("mail", QueueOptions::default())?;
/// let index = store.queue("index", QueueOptions::default().unique(true))?;
/// assert!(index.is_unique() && !mail.is_unique());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<StoreInner>,
}

impl fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl DiskStore {
    /// Opens (or creates) the database file at `path` and starts its
    /// committer thread.
    ///
    /// Every open verifies the whole file (redb's integrity check: the
    /// checksum of every page of every table) so that a damaged file is
    /// refused here, with a typed error, instead of failing (or making redb
    /// panic) in the middle of a later commit. After a crash the check also
    /// rolls back a commit that was not completely written. This is a blocking
    /// call that reads the whole file; call it from `spawn_blocking` when that
    /// matters.
    ///
    /// # Errors
    /// [`DiskError::AlreadyOpen`] when another process or store holds the
    /// file (returned at once, without waiting); [`DiskError::Corrupt`] when
    /// the file is damaged, with the path and what redb said: run
    /// [`DiskStore::repair`] on it, then open it again;
    /// [`DiskError::Thread`] when the committer thread cannot be started;
    /// [`DiskError::Open`] for any other failure (including a file that is
    /// not a redb database at all).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::disk::{DiskError, DiskStore};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("q.redb");
    /// let store = DiskStore::open(&path)?;
    /// assert!(matches!(DiskStore::open(&path), Err(DiskError::AlreadyOpen { .. })));
    /// drop(store);
    /// DiskStore::open(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<DiskStore, DiskError> {
        let path = path.as_ref().to_path_buf();
        let db = open_database(&path, |b| b.create(&path))?;
        Self::start(db, path)
    }

    /// Repairs a damaged file (one [`open`](Self::open) reports
    /// [`DiskError::Corrupt`]) so that it opens again, keeping every intact
    /// item.
    ///
    /// 1. redb's repair: the file is opened with redb's integrity check,
    ///    which rolls back a commit a crash left half-written. If the file
    ///    passes, it is repaired in place: every record that does not decode
    ///    is moved from its queue to the queue's quarantine.
    /// 2. If redb refuses the file (a page is damaged: redb can only roll
    ///    back, and a damaged page is shared by every commit), the file is
    ///    rebuilt: its B-trees are read page by page, following redb's
    ///    documented file format, and a page is trusted only when its
    ///    XXH3-128 checksum (stored in its parent) matches. Every record of a
    ///    trusted page that decodes is kept; records of a damaged page whose
    ///    parent is intact, and records that do not decode, go to quarantine;
    ///    what lay under a destroyed page is counted as lost. The new file
    ///    takes the old one's place; the damaged original is moved aside (to
    ///    `<file>.damaged`), never deleted.
    ///
    /// The report says, per queue, how many items were kept, quarantined and
    /// lost. Quarantined records can be read with
    /// [`quarantined`](Self::quarantined). Leased items become ready again,
    /// as on every open. The file must not be in use; this is a blocking call
    /// that reads the whole file.
    ///
    /// # Errors
    /// [`DiskError::AlreadyOpen`] when a store has the file open;
    /// [`DiskError::Corrupt`] with [`Damage::Unreadable`] when nothing can be
    /// read (the file header or both commit slots are destroyed);
    /// [`DiskError::Open`] when the file is missing, is not a redb file, or
    /// cannot be read or replaced; [`DiskError::Storage`] when writing the
    /// repaired file fails.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::disk::{DiskError, DiskStore};
    ///
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("q.redb");
    /// # drop(DiskStore::open(&path)?);
    /// let store = match DiskStore::open(&path) {
    ///     Err(DiskError::Corrupt { .. }) => {
    ///         let report = DiskStore::repair(&path)?;
    ///         for q in &report.queues {
    ///             eprintln!("{}: {} kept, {} quarantined, {:?} lost", q.name, q.kept, q.quarantined, q.lost);
    ///         }
    ///         DiskStore::open(&path)?
    ///     }
    ///     other => other?,
    /// };
    /// # drop(store);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn repair(path: impl AsRef<Path>) -> Result<RepairReport, DiskError> {
        let path = path.as_ref();
        match open_database(path, |b| b.open(path)) {
            Ok(db) => {
                let report = catch_redb_panic(path, || repair_in_place(&db))
                    .and_then(|r| r.map_err(|e| classify(path, e)));
                let _ = catch_redb_panic(path, || drop(db));
                match report {
                    // Damage redb's check did not cover (it verifies pages,
                    // not their contents): rebuild from what verifies.
                    Err(DiskError::Corrupt {
                        damage: Damage::Redb(_) | Damage::Panic { .. },
                        ..
                    }) => rebuild(path),
                    report => report,
                }
            }
            Err(DiskError::Corrupt { .. }) => rebuild(path),
            Err(e) => Err(e),
        }
    }

    /// The records [`repair`](Self::repair) moved out of the queue `name`,
    /// oldest repair first. They stay until the file is deleted; nothing
    /// reads them but this.
    ///
    /// # Errors
    /// [`DiskError::Stopped`] when the committer is gone, or the error that
    /// stopped it; [`DiskError::Storage`] / [`DiskError::Corrupt`] when the
    /// read fails.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let store = snapstream::queue::disk::DiskStore::open(dir.path().join("q.redb"))?;
    /// assert!(store.quarantined("jobs")?.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn quarantined(&self, name: &str) -> Result<Vec<Quarantined>, DiskError> {
        let (tx, rx) = std_mpsc::channel();
        self.inner.send(Op::Quarantine {
            name: name.to_owned(),
            reply: tx,
        })?;
        rx.recv().map_err(|_| DiskError::Stopped)?
    }

    /// Opens a store on any redb storage backend (tests inject I/O faults).
    #[cfg(test)]
    pub(crate) fn open_with_backend(
        backend: impl redb::StorageBackend,
        path: PathBuf,
    ) -> Result<DiskStore, DiskError> {
        let db = open_database(&path, |b| b.create_with_backend(backend))?;
        Self::start(db, path)
    }

    fn start(db: Database, path: PathBuf) -> Result<DiskStore, DiskError> {
        let (tx, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("snapstream-disk-commit".into())
            .spawn({
                let path = path.clone();
                move || committer(db, path, rx)
            })
            .map_err(|e| DiskError::Thread(Arc::new(e)))?;
        Ok(DiskStore {
            inner: Arc::new(StoreInner {
                path,
                tx,
                thread: Mutex::new(Some(thread)),
                queues: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The database file.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("q.redb");
    /// let store = snapstream::queue::disk::DiskStore::open(&path)?;
    /// assert_eq!(store.path(), path);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The queue called `name` in this file, created if it does not exist.
    ///
    /// Opening a queue for the first time in this process reads all its items
    /// into memory and makes every leased item ready again (a previous process
    /// died holding them): a blocking call. Asking again for a queue that is
    /// still open returns a handle to the same queue.
    ///
    /// # Errors
    /// [`QueueError::InvalidOption`] when `opts` do not
    /// [validate](QueueOptions::validate) (checked first, nothing is read);
    /// [`QueueError::Backend`] with a [`DiskError`] source: the name is empty,
    /// the queue is open with other options, a record is corrupt, the store
    /// has stopped, or redb failed.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::disk::DiskStore;
    /// use snapstream::queue::{BaseQueue, QueueOptions};
    ///
    /// # let dir = tempfile::tempdir()?;
    /// let store = DiskStore::open(dir.path().join("q.redb"))?;
    /// let queue = store.queue("jobs", QueueOptions::default().capacity(1000))?;
    /// assert_eq!(queue.name(), "jobs");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn queue(&self, name: &str, opts: QueueOptions) -> Result<DiskQueue, QueueError> {
        opts.validate()?;
        let backend = |e: DiskError| QueueError::Backend(Box::new(e));
        if name.is_empty() {
            return Err(backend(DiskError::EmptyName));
        }
        let mut queues = lock(&self.inner.queues);
        if let Some(shared) = queues.get(name).and_then(Weak::upgrade) {
            if shared.opts != opts {
                return Err(backend(DiskError::OptionsMismatch {
                    name: name.to_owned(),
                }));
            }
            return Ok(DiskQueue {
                store: Arc::clone(&self.inner),
                shared,
            });
        }
        let (tx, rx) = std_mpsc::channel();
        self.inner
            .send(Op::Load {
                name: name.to_owned(),
                reply: tx,
            })
            .map_err(backend)?;
        let loaded = rx
            .recv()
            .map_err(|_| backend(DiskError::Stopped))?
            .map_err(backend)?;
        let state = State::from_loaded(&self.inner.path, name, &opts, loaded).map_err(backend)?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            opts,
            state: Mutex::new(state),
            ready: Notify::new(),
            room: Notify::new(),
        });
        queues.retain(|_, q| q.strong_count() > 0);
        queues.insert(name.to_owned(), Arc::downgrade(&shared));
        Ok(DiskQueue {
            store: Arc::clone(&self.inner),
            shared,
        })
    }
}

/// Opens the file with redb's integrity check, reporting damage (an error or
/// a panic of redb's) as [`DiskError::Corrupt`].
fn open_database(
    path: &Path,
    open: impl FnOnce(&redb::Builder) -> Result<Database, redb::DatabaseError>,
) -> Result<Database, DiskError> {
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    catch_redb_panic(path, || open(&builder))?.map_err(|e| map_open_error(path, e))
}

fn map_open_error(path: &Path, e: redb::DatabaseError) -> DiskError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => DiskError::AlreadyOpen {
            path: path.to_path_buf(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => DiskError::Corrupt {
            path: path.to_path_buf(),
            damage: Damage::Redb(Arc::new(e.into())),
        },
        e => DiskError::Open {
            path: path.to_path_buf(),
            source: Arc::new(e),
        },
    }
}

// ---------------------------------------------------------------------------
// In-memory index of one queue
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemState {
    Ready,
    /// Keyed, behind an older item of the same key.
    Waiting,
    Delayed(Instant),
    Leased(Instant),
}

#[derive(Debug)]
struct Item {
    payload: Vec<u8>,
    key: Option<String>,
    attempts: u32,
    seq: u64,
    state: ItemState,
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    next_id: u64,
    items: HashMap<u64, Item>,
    /// seq -> id of every ready item.
    ready: BTreeMap<u64, u64>,
    waiting: u64,
    delayed: BTreeSet<(Instant, u64)>,
    leased: BTreeSet<(Instant, u64)>,
    /// key -> ids of every stored item with that key.
    keys: HashMap<String, BTreeSet<u64>>,
    /// Pushes sent to the committer and not yet completed.
    pending: BTreeSet<u64>,
    /// payload -> id, unique queues only (includes pending pushes).
    dedup: HashMap<Vec<u8>, u64>,
}

impl State {
    fn from_loaded(
        path: &Path,
        name: &str,
        opts: &QueueOptions,
        loaded: Loaded,
    ) -> Result<State, DiskError> {
        let mut st = State {
            next_id: loaded.next_id.max(1),
            ..State::default()
        };
        let now = Instant::now();
        let now_ms = unix_ms_now();
        for (id, record) in loaded.records {
            let Some(d) = decode(&record) else {
                return Err(record_damage(path, name, id));
            };
            st.next_id = st.next_id.max(id + 1).max(d.header.seq + 1);
            if opts.unique {
                st.dedup.entry(d.payload.to_vec()).or_insert(id);
            }
            let state = match d.header.state {
                STATE_DELAYED => {
                    let wait = Duration::from_millis(d.header.due_ms.saturating_sub(now_ms));
                    let due = instant_after(now, wait);
                    ItemState::Delayed(due)
                }
                _ => ItemState::Ready,
            };
            if let Some(key) = &d.key {
                st.keys.entry(key.clone()).or_default().insert(id);
            }
            st.items.insert(
                id,
                Item {
                    payload: d.payload.to_vec(),
                    key: d.key,
                    attempts: d.header.attempts,
                    seq: d.header.seq,
                    state,
                },
            );
        }
        // Only the oldest item of a key may be ready or delayed.
        let heads: HashMap<u64, ()> = st
            .keys
            .values()
            .filter_map(|ids| ids.first().map(|&id| (id, ())))
            .collect();
        for (&id, item) in st.items.iter_mut() {
            if item.key.is_some() && !heads.contains_key(&id) {
                item.state = ItemState::Waiting;
            }
            match item.state {
                ItemState::Ready => {
                    st.ready.insert(item.seq, id);
                }
                ItemState::Waiting => st.waiting += 1,
                ItemState::Delayed(due) => {
                    st.delayed.insert((due, id));
                }
                ItemState::Leased(_) => {}
            }
        }
        Ok(st)
    }

    fn total(&self) -> u64 {
        (self.items.len() + self.pending.len()) as u64
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_id;
        self.next_id += 1;
        seq
    }

    fn next_due(&self) -> Option<Instant> {
        let a = self.delayed.first().map(|&(t, _)| t);
        let b = self.leased.first().map(|&(t, _)| t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Makes `id` ready at the back; returns the header to store.
    fn make_ready(&mut self, id: u64) -> Option<Header> {
        let seq = self.next_seq();
        let item = self.items.get_mut(&id)?;
        item.state = ItemState::Ready;
        item.seq = seq;
        self.ready.insert(seq, id);
        Some(Header {
            state: STATE_READY,
            attempts: item.attempts,
            seq,
            due_ms: 0,
        })
    }

    /// Moves due delayed items and expired leases to ready. Returns the
    /// headers to store.
    fn promote_due(&mut self, now: Instant) -> Vec<(u64, Header)> {
        let mut patches = Vec::new();
        while let Some(&(due, id)) = self.delayed.first() {
            if due > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(h) = self.make_ready(id) {
                patches.push((id, h));
            }
        }
        while let Some(&(due, id)) = self.leased.first() {
            if due > now {
                break;
            }
            self.leased.pop_first();
            if let Some(h) = self.make_ready(id) {
                patches.push((id, h));
            }
        }
        patches
    }

    /// Deletes a stored item from the index; makes the next of its key ready.
    /// Returns whether the item was there.
    fn forget(&mut self, id: u64) -> bool {
        let Some(item) = self.items.remove(&id) else {
            return false;
        };
        match item.state {
            ItemState::Ready => {
                self.ready.remove(&item.seq);
            }
            ItemState::Waiting => self.waiting -= 1,
            ItemState::Delayed(t) => {
                self.delayed.remove(&(t, id));
            }
            ItemState::Leased(t) => {
                self.leased.remove(&(t, id));
            }
        }
        if self.dedup.get(&item.payload) == Some(&id) {
            self.dedup.remove(&item.payload);
        }
        if let Some(key) = &item.key {
            if let Some(ids) = self.keys.get_mut(key) {
                ids.remove(&id);
                match ids.first().copied() {
                    None => {
                        self.keys.remove(key);
                    }
                    Some(next) => {
                        if let Some(n) = self.items.get_mut(&next) {
                            if n.state == ItemState::Waiting {
                                // Back to its push position: it is older than
                                // anything pushed since.
                                n.state = ItemState::Ready;
                                self.waiting -= 1;
                                self.ready.insert(n.seq, next);
                            }
                        }
                    }
                }
            }
        }
        true
    }
}

struct Shared {
    name: String,
    opts: QueueOptions,
    state: Mutex<State>,
    /// Items became ready (or the queue closed, or a timer moved earlier).
    ready: Notify,
    /// Room appeared (or the queue closed).
    room: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Called by the committer once the commit holding these pushes (all of
    /// this queue, in id order) finished.
    fn pushes_committed(&self, pushes: &[(u64, &[u8])], ok: bool) {
        let mut st = self.state();
        for &(id, record) in pushes {
            st.pending.remove(&id);
            match (ok, decode(record)) {
                (true, Some(d)) => {
                    let mut state = ItemState::Ready;
                    if let Some(key) = &d.key {
                        let ids = st.keys.entry(key.clone()).or_default();
                        ids.insert(id);
                        if ids.len() > 1 {
                            state = ItemState::Waiting;
                        }
                    }
                    match state {
                        ItemState::Ready => {
                            st.ready.insert(d.header.seq, id);
                        }
                        _ => st.waiting += 1,
                    }
                    st.items.insert(
                        id,
                        Item {
                            payload: d.payload.to_vec(),
                            key: d.key,
                            attempts: 0,
                            seq: d.header.seq,
                            state,
                        },
                    );
                }
                (_, d) => {
                    if let Some(d) = d {
                        if st.dedup.get(d.payload) == Some(&id) {
                            st.dedup.remove(d.payload);
                        }
                    }
                }
            }
        }
        drop(st);
        if ok {
            self.ready.notify_waiters();
        } else {
            self.room.notify_waiters();
        }
    }
}

/// A named queue in a [`DiskStore`]; implements [`BaseQueue`].
///
/// Cheap to clone (two `Arc`s); clones share the queue. See the
/// [module docs](self) for durability, group commit and ordering.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use snapstream::queue::disk::DiskStore;
/// use snapstream::queue::{BaseQueue, NewItem, PushError, QueueOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = DiskStore::open(dir.path().join("q.redb"))?;
/// let queue: Arc<dyn BaseQueue> =
///     Arc::new(store.queue("unique", QueueOptions::default().unique(true))?);
/// queue.push(NewItem::new("a"), Duration::ZERO).await?;
/// let again = queue.push(NewItem::new("a"), Duration::ZERO).await;
/// assert!(matches!(again, Err(PushError::AlreadyQueued(_))));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DiskQueue {
    store: Arc<StoreInner>,
    shared: Arc<Shared>,
}

impl fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskQueue")
            .field("name", &self.shared.name)
            .field("path", &self.store.path)
            .field("options", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

/// What [`DiskQueue::enqueue`] did with an item.
enum Enqueued {
    Sent(Sent),
    Refused(PushError),
    Full(NewItem),
}

/// A push handed to the committer, waiting for its commit.
struct Sent {
    id: u64,
    rx: oneshot::Receiver<Result<(), DiskError>>,
    item: NewItem,
}

impl Sent {
    /// Waits for the commit holding the item.
    async fn committed(self) -> Result<ItemId, PushError> {
        match self.rx.await {
            Ok(Ok(())) => Ok(ItemId(self.id)),
            Ok(Err(source)) => Err(PushError::Backend {
                item: self.item,
                source: Box::new(source),
            }),
            Err(_) => Err(PushError::Backend {
                item: self.item,
                source: Box::new(DiskError::Stopped),
            }),
        }
    }
}

impl DiskQueue {
    /// The options the queue was opened with.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::queue::{disk::DiskStore, QueueOptions};
    /// # let dir = tempfile::tempdir()?;
    /// # let store = DiskStore::open(dir.path().join("q.redb"))?;
    /// let queue = store.queue("q", QueueOptions::default().capacity(8))?;
    /// assert_eq!(queue.options().capacity, Some(8));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn options(&self) -> &QueueOptions {
        &self.shared.opts
    }

    /// Sends header rewrites without waiting for their commit.
    fn persist(&self, patches: Vec<(u64, Header)>) {
        if !patches.is_empty() {
            // A stopped store is reported by the next awaited operation.
            let _ = self.store.send(Op::Patch {
                q: Arc::clone(&self.shared),
                patches,
                reply: None,
            });
        }
    }

    /// Under the state lock: refuses `item` (closed, duplicate), hands it to
    /// the committer, or hands it back when the queue is full.
    fn enqueue(&self, st: &mut State, item: NewItem) -> Enqueued {
        if st.closed {
            return Enqueued::Refused(PushError::Closed(item));
        }
        if self.shared.opts.unique && st.dedup.contains_key(&item.payload) {
            return Enqueued::Refused(PushError::AlreadyQueued(item));
        }
        if self
            .shared
            .opts
            .capacity
            .is_some_and(|cap| st.total() >= cap)
        {
            return Enqueued::Full(item);
        }
        let id = st.next_seq();
        let header = Header {
            state: STATE_READY,
            attempts: 0,
            seq: id,
            due_ms: 0,
        };
        let record = encode(header, item.key.as_deref(), &item.payload);
        let (tx, rx) = oneshot::channel();
        let op = Op::Push {
            q: Arc::clone(&self.shared),
            id,
            record,
            reply: tx,
        };
        // Sent under the lock: the committer completes pushes in id order,
        // which keeps FIFO and `Clear`'s id bound exact.
        if let Err(source) = self.store.send(op) {
            return Enqueued::Refused(PushError::Backend {
                item,
                source: Box::new(source),
            });
        }
        st.pending.insert(id);
        if self.shared.opts.unique {
            st.dedup.insert(item.payload.clone(), id);
        }
        Enqueued::Sent(Sent { id, rx, item })
    }

    async fn push_inner(&self, item: NewItem, timeout: Duration) -> Result<ItemId, PushError> {
        let mut item = self.shared.opts.check_size(item)?;
        let deadline = Instant::now().checked_add(timeout);
        let sent = loop {
            let mut room = pin!(self.shared.room.notified());
            {
                let mut st = self.shared.state();
                match self.enqueue(&mut st, item) {
                    Enqueued::Sent(sent) => break sent,
                    Enqueued::Refused(e) => return Err(e),
                    Enqueued::Full(back) => item = back,
                }
                room.as_mut().enable();
            }
            let woke = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, room).await.is_ok(),
                None => {
                    room.await;
                    true
                }
            };
            if !woke {
                return Err(PushError::Full(item));
            }
        };
        sent.committed().await
    }

    /// [`BaseQueue::push_batch`]: every item that fits now is handed to the
    /// committer under one lock (so they share a commit and keep their
    /// order); from the first item that finds the queue full on, the rest
    /// are pushed one after another, each waiting for room.
    async fn push_batch_inner(
        &self,
        items: Vec<NewItem>,
        timeout: Duration,
    ) -> Vec<Result<ItemId, PushError>> {
        let mut out: Vec<Option<Result<ItemId, PushError>>> =
            std::iter::repeat_with(|| None).take(items.len()).collect();
        let mut sent = Vec::new();
        let mut wait = Vec::new();
        {
            let mut st = self.shared.state();
            for (i, item) in items.into_iter().enumerate() {
                if !wait.is_empty() {
                    wait.push((i, item));
                    continue;
                }
                let item = match self.shared.opts.check_size(item) {
                    Ok(item) => item,
                    Err(e) => {
                        out[i] = Some(Err(e));
                        continue;
                    }
                };
                match self.enqueue(&mut st, item) {
                    Enqueued::Sent(s) => sent.push((i, s)),
                    Enqueued::Refused(e) => out[i] = Some(Err(e)),
                    Enqueued::Full(item) => wait.push((i, item)),
                }
            }
        }
        for (i, s) in sent {
            out[i] = Some(s.committed().await);
        }
        for (i, item) in wait {
            out[i] = Some(self.push_inner(item, timeout).await);
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    async fn pop_inner(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let mut notified = pin!(self.shared.ready.notified());
            let wake_at;
            {
                let mut st = self.shared.state();
                let now = Instant::now();
                let mut patches = st.promote_due(now);
                if !st.ready.is_empty() && max > 0 {
                    let lease_until = instant_after(now, self.shared.opts.visibility_timeout);
                    let lease_ms = unix_ms_after(self.shared.opts.visibility_timeout);
                    let mut out = Vec::with_capacity(max.min(st.ready.len()));
                    while out.len() < max {
                        let Some((_, id)) = st.ready.pop_first() else {
                            break;
                        };
                        let Some(item) = st.items.get_mut(&id) else {
                            continue;
                        };
                        item.state = ItemState::Leased(lease_until);
                        out.push(Delivery {
                            id: ItemId(id),
                            payload: item.payload.clone(),
                            key: item.key.clone(),
                            attempts: item.attempts,
                        });
                        item.attempts = item.attempts.saturating_add(1);
                        patches.push((
                            id,
                            Header {
                                state: STATE_LEASED,
                                attempts: item.attempts,
                                seq: item.seq,
                                due_ms: lease_ms,
                            },
                        ));
                        st.leased.insert((lease_until, id));
                    }
                    self.persist(patches);
                    return Ok(out);
                }
                self.persist(patches);
                if st.closed {
                    return Err(QueueError::Closed);
                }
                if deadline.is_some_and(|d| now >= d) || max == 0 {
                    return Ok(Vec::new());
                }
                notified.as_mut().enable();
                wake_at = match (deadline, st.next_due()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn ack_inner(&self, ids: &[ItemId]) -> Result<(), QueueError> {
        let rx = {
            let mut st = self.shared.state();
            let mut gone = Vec::new();
            for &ItemId(id) in ids {
                let leased = st
                    .items
                    .get(&id)
                    .is_some_and(|i| matches!(i.state, ItemState::Leased(_)));
                if leased && st.forget(id) {
                    gone.push(id);
                }
            }
            if gone.is_empty() {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            self.store
                .send(Op::Delete {
                    q: Arc::clone(&self.shared),
                    ids: gone,
                    reply: tx,
                })
                .map_err(|e| QueueError::Backend(Box::new(e)))?;
            rx
        };
        self.shared.ready.notify_waiters();
        self.shared.room.notify_waiters();
        await_reply(rx).await
    }

    async fn nack_inner(&self, ids: &[ItemId], delay: Duration) -> Result<(), QueueError> {
        let rx = {
            let mut st = self.shared.state();
            let now = Instant::now();
            let due = instant_after(now, delay);
            let due_ms = unix_ms_after(delay);
            let mut patches = Vec::new();
            for &ItemId(id) in ids {
                let Some(item) = st.items.get(&id) else {
                    continue;
                };
                let ItemState::Leased(until) = item.state else {
                    continue;
                };
                st.leased.remove(&(until, id));
                if delay.is_zero() {
                    if let Some(h) = st.make_ready(id) {
                        patches.push((id, h));
                    }
                } else {
                    let item = st.items.get_mut(&id).expect("checked above");
                    item.state = ItemState::Delayed(due);
                    let header = Header {
                        state: STATE_DELAYED,
                        attempts: item.attempts,
                        seq: item.seq,
                        due_ms,
                    };
                    st.delayed.insert((due, id));
                    patches.push((id, header));
                }
            }
            if patches.is_empty() {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            self.store
                .send(Op::Patch {
                    q: Arc::clone(&self.shared),
                    patches,
                    reply: Some(tx),
                })
                .map_err(|e| QueueError::Backend(Box::new(e)))?;
            rx
        };
        // Ready items, or an earlier timer for the waiting pops.
        self.shared.ready.notify_waiters();
        await_reply(rx).await
    }

    async fn remove_all_inner(&self) -> Result<u64, QueueError> {
        let (n, rx) = {
            let mut st = self.shared.state();
            let n = st.items.len() as u64;
            // Everything completed has a smaller id than every pending push.
            let below = st.pending.first().copied().unwrap_or(st.next_id);
            st.items.clear();
            st.ready.clear();
            st.waiting = 0;
            st.delayed.clear();
            st.leased.clear();
            st.keys.clear();
            let State { dedup, pending, .. } = &mut *st;
            dedup.retain(|_, id| pending.contains(id));
            let (tx, rx) = oneshot::channel();
            self.store
                .send(Op::Clear {
                    q: Arc::clone(&self.shared),
                    below,
                    reply: tx,
                })
                .map_err(|e| QueueError::Backend(Box::new(e)))?;
            (n, rx)
        };
        self.shared.room.notify_waiters();
        await_reply(rx).await?;
        Ok(n)
    }
}

async fn await_reply(rx: oneshot::Receiver<Result<(), DiskError>>) -> Result<(), QueueError> {
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(QueueError::Backend(Box::new(e))),
        Err(_) => Err(QueueError::Backend(Box::new(DiskError::Stopped))),
    }
}

impl BaseQueue for DiskQueue {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn backend(&self) -> Backend {
        Backend::Disk
    }

    fn is_unique(&self) -> bool {
        self.shared.opts.unique
    }

    /// Stores `item`; resolves after the group commit holding it is durable.
    ///
    /// # Cancel safety
    /// Once the item was handed to the committer, dropping the future does not
    /// stop the write: the item is stored (and becomes ready) or the commit
    /// failed. It is never stored twice.
    fn push(&self, item: NewItem, timeout: Duration) -> BoxFuture<'_, Result<ItemId, PushError>> {
        Box::pin(self.push_inner(item, timeout))
    }

    /// All the items that fit share one commit (one `fsync`), with whatever
    /// else was waiting for the committer.
    ///
    /// # Cancel safety
    /// As [`push`](BaseQueue::push), for each item.
    fn push_batch(
        &self,
        items: Vec<NewItem>,
        timeout: Duration,
    ) -> BoxFuture<'_, Vec<Result<ItemId, PushError>>> {
        Box::pin(self.push_batch_inner(items, timeout))
    }

    fn pop(
        &self,
        max: usize,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, QueueError>> {
        Box::pin(self.pop_inner(max, timeout))
    }

    fn ack<'a>(&'a self, ids: &'a [ItemId]) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.ack_inner(ids))
    }

    fn nack<'a>(
        &'a self,
        ids: &'a [ItemId],
        delay: Duration,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.nack_inner(ids, delay))
    }

    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>> {
        Box::pin(async move {
            let mut st = self.shared.state();
            let patches = st.promote_due(Instant::now());
            self.persist(patches);
            Ok(QueueLen {
                ready: st.ready.len() as u64 + st.waiting,
                delayed: st.delayed.len() as u64,
                leased: st.leased.len() as u64,
            })
        })
    }

    fn has<'a>(&'a self, payload: &'a [u8]) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let st = self.shared.state();
            Ok(if self.shared.opts.unique {
                st.dedup.contains_key(payload)
            } else {
                st.items.values().any(|i| i.payload == payload)
            })
        })
    }

    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(self.remove_all_inner())
    }

    fn close(&self) {
        self.shared.state().closed = true;
        self.shared.ready.notify_waiters();
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::BackendError as BErr;

    #[test]
    fn regroup_waits_that_run_out_skip_more_and_more_waits() {
        let (_tx, rx) = std_mpsc::channel::<Op>();
        let mut g = Regroup::default();
        let mut batch = Vec::new();
        let mut skips = Vec::new();
        for _ in 0..4 {
            // A commit of no duration: the wait runs out at once.
            g.arm(&batch, 1, Duration::ZERO);
            assert!(g.armed.is_some(), "armed after the skips ran out");
            g.wait(&rx, &mut batch);
            assert!(g.armed.is_none());
            let mut n = 0;
            loop {
                g.arm(&batch, 1, Duration::ZERO);
                if g.armed.is_some() {
                    break;
                }
                n += 1;
            }
            g.armed = None;
            skips.push(n);
        }
        assert_eq!(skips, [1, 2, 4, 8]);
        // A wait that gets what it waits for (here: nothing) resets the back-off.
        g.arm(&batch, 0, Duration::from_secs(1));
        g.wait(&rx, &mut batch);
        assert_eq!(g.next_skip, 0);
        g.arm(&batch, 1, Duration::ZERO);
        g.wait(&rx, &mut batch);
        assert_eq!(g.skip, 1, "a run-out after a success skips one wait again");
    }

    #[test]
    fn regroup_wait_is_half_the_commit_and_bounded() {
        let batch = Vec::new();
        let mut g = Regroup::default();
        let before = std::time::Instant::now();
        g.arm(&batch, 3, Duration::from_millis(10));
        let (target, until) = g.armed.unwrap();
        assert_eq!(target, 3);
        assert!(until <= std::time::Instant::now() + MAX_REGROUP_WAIT);
        assert!(until >= before + MAX_REGROUP_WAIT.min(Duration::from_millis(5)));
    }

    #[test]
    fn only_lease_writes_are_not_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path().join("q.redb")).unwrap();
        let q = store.queue("q", QueueOptions::default()).unwrap();
        let lease = Op::Patch {
            q: Arc::clone(&q.shared),
            patches: Vec::new(),
            reply: None,
        };
        let (tx, _rx) = oneshot::channel();
        let nack = Op::Patch {
            q: Arc::clone(&q.shared),
            patches: Vec::new(),
            reply: Some(tx),
        };
        assert!(!lease.awaited());
        assert!(nack.awaited());
        assert!(!lease.is_push());
    }
    use std::io;
    use std::ops::Bound;
    use std::sync::atomic::{AtomicBool, Ordering};

    const T: Duration = Duration::from_secs(10);

    fn store(dir: &tempfile::TempDir) -> DiskStore {
        DiskStore::open(dir.path().join("q.redb")).unwrap()
    }

    #[test]
    fn record_round_trips() {
        let h = Header {
            state: STATE_DELAYED,
            attempts: 7,
            seq: 42,
            due_ms: 99,
        };
        for (key, payload) in [(None, &b""[..]), (Some("k"), b"payload"), (Some(""), b"\0")] {
            let bytes = encode(h, key, payload);
            let d = decode(&bytes).unwrap();
            assert_eq!((d.header, d.key.as_deref(), d.payload), (h, key, payload));
        }
        assert!(decode(&[0; 3]).is_none());
        let mut bad = encode(h, Some("key"), b"");
        bad.truncate(HEADER_LEN + 5);
        assert!(decode(&bad).is_none(), "key longer than the record");
    }

    #[test]
    fn handles_are_send_sync_and_futures_send() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let q = s.queue("q", QueueOptions::default()).unwrap();
        send_sync(&s);
        send_sync(&q);
        send(&q.push(NewItem::new("x"), T));
        send(&q.pop(1, T));
        send(&q.ack(&[]));
        send(&q.remove_all());
    }

    #[tokio::test]
    async fn items_survive_reopen_and_leases_come_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(&dir);
            let q = s.queue("q", QueueOptions::default().unique(true)).unwrap();
            for p in ["a", "b", "c", "d"] {
                q.push(NewItem::new(p), T).await.unwrap();
            }
            q.push(NewItem::with_key("k1", "k"), T).await.unwrap();
            q.push(NewItem::with_key("k2", "k"), T).await.unwrap();
            let got = q.pop(2, T).await.unwrap();
            assert_eq!(got[0].payload, b"a");
            q.ack(&[got[0].id]).await.unwrap();
            // "b" stays leased when the store goes away (as in a crash).
            let delayed = q.pop(1, T).await.unwrap();
            assert_eq!(delayed[0].payload, b"c");
            q.nack(&[delayed[0].id], Duration::from_secs(3600))
                .await
                .unwrap();
        }
        let s = store(&dir);
        let q = s.queue("q", QueueOptions::default().unique(true)).unwrap();
        assert_eq!(
            q.len().await.unwrap(),
            QueueLen {
                ready: 4,
                delayed: 1,
                leased: 0
            }
        );
        // The dedup set is rebuilt from the stored items.
        assert!(q.has(b"c").await.unwrap());
        assert!(matches!(
            q.push(NewItem::new("b"), T).await,
            Err(PushError::AlreadyQueued(_))
        ));
        let got = q.pop(10, T).await.unwrap();
        let payloads: Vec<_> = got.iter().map(|d| d.payload.as_slice()).collect();
        assert_eq!(payloads, [&b"b"[..], b"d", b"k1"], "k2 waits behind k1");
        assert_eq!(got[0].attempts, 1, "the lost lease raised the count");
        assert_eq!(got[1].attempts, 0);
        // Ids keep growing across opens.
        let id = q.push(NewItem::new("e"), T).await.unwrap();
        assert!(got.iter().all(|d| d.id < id));
    }

    #[tokio::test]
    async fn remove_all_does_not_lose_a_concurrent_push() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let q = s.queue("q", QueueOptions::default()).unwrap();
        q.push(NewItem::new("old"), T).await.unwrap();
        let (a, b) = tokio::join!(q.push(NewItem::new("new"), T), q.remove_all());
        a.unwrap();
        b.unwrap();
        let q_len = q.len().await.unwrap().total();
        drop(q);
        drop(s);
        let s = store(&dir);
        let q = s.queue("q", QueueOptions::default()).unwrap();
        assert_eq!(
            q.len().await.unwrap().total(),
            q_len,
            "memory and disk agree"
        );
        assert!(!q.has(b"old").await.unwrap());
    }

    #[tokio::test]
    async fn huge_durations_do_not_overflow() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(&dir);
            let opts = QueueOptions::default().visibility_timeout(Duration::MAX);
            let q = s.queue("q", opts).unwrap();
            q.push(NewItem::new("a"), Duration::MAX).await.unwrap();
            q.push(NewItem::new("b"), Duration::MAX).await.unwrap();
            let got = q.pop(2, Duration::MAX).await.unwrap();
            q.nack(&[got[0].id], Duration::MAX).await.unwrap();
            assert_eq!(
                q.len().await.unwrap(),
                QueueLen {
                    ready: 0,
                    delayed: 1,
                    leased: 1
                }
            );
        }
        let s = store(&dir);
        let q = s.queue("q", QueueOptions::default()).unwrap();
        assert_eq!(q.len().await.unwrap().delayed, 1, "still far in the future");
        assert_eq!(q.len().await.unwrap().ready, 1);
    }

    #[test]
    fn options_mismatch_and_empty_name_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let _q = s.queue("q", QueueOptions::default()).unwrap();
        let err = s
            .queue("q", QueueOptions::default().unique(true))
            .unwrap_err();
        let QueueError::Backend(source) = err else {
            panic!("expected a backend error")
        };
        assert!(matches!(
            source.downcast_ref::<DiskError>(),
            Some(DiskError::OptionsMismatch { .. })
        ));
        assert!(s.queue("", QueueOptions::default()).is_err());
        // Same options: the same queue.
        assert!(s.queue("q", QueueOptions::default()).is_ok());
    }

    /// A file backend whose writes and syncs fail (or panic, with `panic`
    /// set) while `fail` is set.
    #[derive(Debug)]
    struct FaultyBackend {
        inner: redb::backends::FileBackend,
        fail: Arc<AtomicBool>,
        panic: bool,
    }

    impl FaultyBackend {
        fn check(&self) -> io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                assert!(!self.panic, "injected panic");
                Err(io::Error::other("injected I/O fault"))
            } else {
                Ok(())
            }
        }
    }

    fn faulty_store(path: &Path, fail: &Arc<AtomicBool>, panic: bool) -> DiskStore {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        let backend = FaultyBackend {
            inner: redb::backends::FileBackend::new(file).unwrap(),
            fail: Arc::clone(fail),
            panic,
        };
        DiskStore::open_with_backend(backend, path.to_path_buf()).unwrap()
    }

    impl redb::StorageBackend for FaultyBackend {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> io::Result<()> {
            self.inner.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BErr> {
            self.inner.try_lock_range(start, end)
        }
        fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BErr> {
            self.inner.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BErr> {
            self.inner.lock_range(start, end)
        }
        fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BErr> {
            self.inner.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BErr> {
            self.inner.unlock_range(start, end)
        }
        fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BErr> {
            self.inner.query_lock_range(start, end)
        }
    }

    #[tokio::test]
    async fn io_fault_fails_the_push_hands_it_back_and_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let fail = Arc::new(AtomicBool::new(false));
        {
            let s = faulty_store(&path, &fail, false);
            let q = s.queue("q", QueueOptions::default().unique(true)).unwrap();
            for i in 0..10u8 {
                q.push(NewItem::new([i]), T).await.unwrap();
            }
            fail.store(true, Ordering::SeqCst);
            match q.push(NewItem::new("lost?"), T).await {
                Err(PushError::Backend { item, source }) => {
                    assert_eq!(item.payload, b"lost?", "the item is handed back");
                    assert!(source.downcast_ref::<DiskError>().is_some());
                }
                other => panic!("expected a backend error, got {other:?}"),
            }
            // The failed push left no dedup entry behind.
            assert!(!q.has(b"lost?").await.unwrap());
            assert_eq!(q.len().await.unwrap().total(), 10);
            fail.store(false, Ordering::SeqCst);
        }
        // Reopened on a healthy file: every acknowledged push is there.
        let s = DiskStore::open(&path).unwrap();
        let q = s.queue("q", QueueOptions::default().unique(true)).unwrap();
        let got = q.pop(100, T).await.unwrap();
        let payloads: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
        assert_eq!(payloads, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
    }

    /// Many pushes waiting on one failing commit (single pushes from many
    /// futures and a `push_batch`): every one fails with a typed error and
    /// hands its item back; nothing acknowledged before is lost.
    #[tokio::test]
    async fn failed_group_commit_fails_every_push_of_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let fail = Arc::new(AtomicBool::new(false));
        {
            let s = faulty_store(&path, &fail, false);
            let q = s.queue("q", QueueOptions::default().unique(true)).unwrap();
            let before =
                futures::future::join_all((0..64u8).map(|i| q.push(NewItem::new([0, i]), T))).await;
            assert!(before.iter().all(Result::is_ok));
            fail.store(true, Ordering::SeqCst);
            let singles =
                futures::future::join_all((0..64u8).map(|i| q.push(NewItem::new([1, i]), T)));
            let batch = q.push_batch((0..16u8).map(|i| NewItem::new([2, i])).collect(), T);
            let (singles, batch) = tokio::join!(singles, batch);
            assert_eq!(singles.len() + batch.len(), 80);
            for (i, r) in singles.into_iter().chain(batch).enumerate() {
                match r {
                    Err(PushError::Backend { item, source }) => {
                        let group = if i < 64 { 1 } else { 2 };
                        assert_eq!(item.payload, [group, (i % 64) as u8], "handed back");
                        assert!(source.downcast_ref::<DiskError>().is_some());
                    }
                    other => panic!("push {i}: expected a backend error, got {other:?}"),
                }
            }
            assert_eq!(q.len().await.unwrap().total(), 64);
            assert!(!q.has(&[1, 0]).await.unwrap(), "no dedup entry left behind");
            fail.store(false, Ordering::SeqCst);
        }
        let s = DiskStore::open(&path).unwrap();
        let q = s.queue("q", QueueOptions::default().unique(true)).unwrap();
        let got = q.pop(1_000, T).await.unwrap();
        let payloads: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
        assert_eq!(payloads, (0..64u8).map(|i| vec![0, i]).collect::<Vec<_>>());
    }

    /// Regression: a panic inside redb killed the committer thread, and every
    /// later operation only said "disk store has stopped".
    #[tokio::test]
    async fn redb_panic_in_the_committer_is_a_typed_error_not_a_dead_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let fail = Arc::new(AtomicBool::new(false));
        let s = faulty_store(&path, &fail, true);
        let q = s.queue("q", QueueOptions::default()).unwrap();
        q.push(NewItem::new("kept"), T).await.unwrap();
        fail.store(true, Ordering::SeqCst);
        let panicked = |e: &DiskError| {
            matches!(
                e,
                DiskError::Corrupt { path: p, damage: Damage::Panic { message } }
                    if p == &path && message.contains("injected panic")
            )
        };
        match q.push(NewItem::new("x"), T).await {
            Err(PushError::Backend { item, source }) => {
                assert_eq!(item.payload, b"x", "the item is handed back");
                let e = source.downcast_ref::<DiskError>().unwrap();
                assert!(panicked(e), "got {e:?}");
            }
            other => panic!("expected a backend error, got {other:?}"),
        }
        // The thread is alive and keeps reporting the cause, even once the
        // backend behaves again (the handle is not trusted after a panic).
        fail.store(false, Ordering::SeqCst);
        let got = q.pop(1, T).await.unwrap();
        let QueueError::Backend(source) = q.ack(&[got[0].id]).await.unwrap_err() else {
            panic!("expected a backend error")
        };
        assert!(panicked(source.downcast_ref::<DiskError>().unwrap()));
        let QueueError::Backend(source) = s.queue("other", QueueOptions::default()).unwrap_err()
        else {
            panic!("expected a backend error")
        };
        assert!(panicked(source.downcast_ref::<DiskError>().unwrap()));
        drop(q);
        drop(s);
        // What was committed before the panic is in the file.
        let s = DiskStore::open(&path).unwrap();
        let q = s.queue("q", QueueOptions::default()).unwrap();
        let got = q.pop(10, T).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"kept");
    }
}
