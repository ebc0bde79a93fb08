//! The in-memory [`BaseQueue`]: [`MemoryQueue`].
//!
//! # Storage
//!
//! Everything lives in one mutex-protected structure inside the process; it is
//! lost when the process exits. Use it for tests, for work that may be lost on
//! a restart, and as the reference implementation of the
//! [obligations](super::BaseQueue#obligations).
//!
//! # Leases and timers
//!
//! [`pop`](BaseQueue::pop) leases items for the queue's visibility timeout.
//! Expired leases and elapsed [`nack`](BaseQueue::nack) delays are applied
//! lazily, whenever the queue is touched; a waiting `pop` sleeps exactly until
//! the earliest of its deadline and the next timer, so nothing polls. Time is
//! read from [`tokio::time::Instant`], so tests can use the paused clock.
//!
//! # Per-key order
//!
//! An item with a key is handed out only when it is the oldest item of that
//! key the queue holds, in any state (ready, delayed or leased). This is
//! stricter than obligation 6: a later item of a key also waits while an
//! earlier one sits out a `nack` delay, so keyed items are handled in push
//! order even across retries.
//!
//! # Wake-ups
//!
//! A pop that finds nothing counts itself as waiting (under the state lock)
//! and waits on a [`Notify`]. Whatever makes items ready signals it once per
//! item, for at most as many pops as are waiting, so a push with no pop
//! waiting touches no shared signal; a pop that leaves ready items behind
//! passes the signal on. Pushes waiting for room (bounded queues only) wait
//! on a second `Notify` signalled when items leave.
//!
//! # Structures
//!
//! Items live in a hash map by id. Ready items and leases are kept in
//! `VecDeque`s in hand-out and expiry order (O(1) per item); an ack or nack
//! leaves a stale slot behind, skipped when reached and compacted away when
//! stale slots outnumber live ones. Only nack delays use an ordered map.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::base::{
    Backend, BaseQueue, Delivery, InvalidOption, ItemId, NewItem, PushError, QueueError, QueueLen,
    QueueOptions,
};
use crate::sync::Mutex;

/// A [`BaseQueue`] held in process memory.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::queue::{BaseQueue, MemoryQueue, NewItem, QueueOptions};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let q = MemoryQueue::new("jobs", QueueOptions::default()).unwrap();
/// q.push(NewItem::new(b"hello".to_vec()), Duration::from_secs(1)).await.unwrap();
/// let got = q.pop(10, Duration::from_secs(1)).await.unwrap();
/// assert_eq!(got[0].payload, b"hello");
/// q.ack(&[got[0].id]).await.unwrap();
/// assert_eq!(q.len().await.unwrap().total(), 0);
/// # });
/// ```
#[derive(Debug)]
pub struct MemoryQueue {
    name: String,
    opts: QueueOptions,
    state: Mutex<State>,
    /// Signalled once per item that becomes poppable, and on close.
    ready_signal: Notify,
    /// Signalled when items leave the queue, and on close.
    room_signal: Notify,
}

/// A fast hasher for item ids (sequential integers from our own counter, so
/// no flooding concern): one multiply, as FxHash does.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 =
                (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// Build hasher for maps keyed by item ids.
pub(super) type IdHash = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Ready since `seq` (its place in the FIFO of ready items).
    Ready { seq: u64 },
    /// Waiting out a nack delay.
    Delayed { until: Instant },
    /// Handed out (lease number `seq`); comes back at `until`.
    Leased { until: Instant, seq: u64 },
}

#[derive(Debug)]
struct Entry {
    payload: Vec<u8>,
    key: Option<String>,
    attempts: u32,
    phase: Phase,
}

type Entries = HashMap<u64, Entry, IdHash>;

/// Ready items that may be handed out now, oldest ready sequence first.
///
/// Nearly every item becomes ready with the newest sequence number (a push,
/// a nack, an expired lease), so it goes to the back of a `VecDeque`. Only a
/// keyed item released by the removal of the item before it can come back
/// with an older number; those wait in `late` and are merged in by `pop`.
/// Removing an item from the middle (an ack of a ready item) leaves its slot
/// behind as *stale*; a stale slot no longer matches its entry's phase and is
/// skipped, and the deque is compacted when stale slots outnumber live ones.
#[derive(Debug, Default)]
struct ReadyQueue {
    /// `(seq, id)` in increasing `seq`.
    fifo: VecDeque<(u64, u64)>,
    /// `seq -> id` for items that came back behind newer ones.
    late: BTreeMap<u64, u64>,
    /// Slots in `fifo` whose item left.
    stale: usize,
}

impl ReadyQueue {
    fn len(&self) -> usize {
        self.fifo.len() + self.late.len() - self.stale
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn live(entries: &Entries, seq: u64, id: u64) -> bool {
        entries
            .get(&id)
            .is_some_and(|e| e.phase == Phase::Ready { seq })
    }

    fn push(&mut self, seq: u64, id: u64) {
        match self.fifo.back() {
            Some(&(last, _)) if last > seq => {
                self.late.insert(seq, id);
            }
            _ => self.fifo.push_back((seq, id)),
        }
    }

    /// Takes the oldest live item's id.
    fn pop(&mut self, entries: &Entries) -> Option<u64> {
        loop {
            let front = self.fifo.front().copied();
            let late = self.late.first_key_value().map(|(s, i)| (*s, *i));
            match (front, late) {
                (Some((f, _)), Some((l, id))) if l < f => {
                    self.late.pop_first();
                    return Some(id);
                }
                (Some((seq, id)), _) => {
                    self.fifo.pop_front();
                    if self.stale == 0 || Self::live(entries, seq, id) {
                        return Some(id);
                    }
                    self.stale -= 1;
                }
                (None, Some((_, id))) => {
                    self.late.pop_first();
                    return Some(id);
                }
                (None, None) => return None,
            }
        }
    }

    /// Forgets the item ready since `seq`; its entry must already have left
    /// `entries` (or changed phase).
    fn remove(&mut self, seq: u64, entries: &Entries) {
        if self.late.remove(&seq).is_some() {
            return;
        }
        self.stale += 1;
        if self.stale > 32 && self.stale * 2 > self.fifo.len() {
            self.fifo.retain(|&(seq, id)| Self::live(entries, seq, id));
            self.stale = 0;
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Leased items by lease expiry.
///
/// Every lease lasts the visibility timeout from a clock read under the state
/// lock, so expiries come in order and a `VecDeque` holds them. An ack or a
/// nack leaves the item's slot behind as *stale* (its entry is gone or has
/// another lease number); stale slots are dropped when they reach the front,
/// and the deque is compacted when they outnumber live ones.
#[derive(Debug, Default)]
struct LeaseQueue {
    /// `(until, lease number, id)` in non-decreasing `until`.
    fifo: VecDeque<(Instant, u64, u64)>,
    /// Slots whose lease ended early.
    stale: usize,
}

impl LeaseQueue {
    fn len(&self) -> usize {
        self.fifo.len() - self.stale
    }

    fn live(entries: &Entries, seq: u64, id: u64) -> bool {
        entries
            .get(&id)
            .is_some_and(|e| matches!(e.phase, Phase::Leased { seq: s, .. } if s == seq))
    }

    /// Adds a lease; returns its expiry (`until`, or the latest expiry held
    /// if the clock went backwards).
    fn push(&mut self, until: Instant, seq: u64, id: u64) -> Instant {
        let until = self.fifo.back().map_or(until, |b| b.0.max(until));
        self.fifo.push_back((until, seq, id));
        until
    }

    /// The earliest live lease, dropping stale slots before it.
    fn first(&mut self, entries: &Entries) -> Option<(Instant, u64)> {
        while let Some(&(until, seq, id)) = self.fifo.front() {
            if self.stale == 0 || Self::live(entries, seq, id) {
                return Some((until, id));
            }
            self.fifo.pop_front();
            self.stale -= 1;
        }
        None
    }

    /// Ends a lease early; the entry must already have left `entries` (or
    /// changed phase).
    fn remove(&mut self, entries: &Entries) {
        self.stale += 1;
        if self.stale > 32 && self.stale * 2 > self.fifo.len() {
            self.fifo
                .retain(|&(_, seq, id)| Self::live(entries, seq, id));
            self.stale = 0;
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Ready and lease sequence numbers (one counter: both are unique).
    next_seq: u64,
    closed: bool,
    /// Pops that found nothing and wait (or are about to) for `ready_signal`.
    /// Only while this is non-zero do calls that make items ready signal.
    waiting: usize,
    entries: Entries,
    /// Ready items that may be handed out now, by ready sequence.
    ready: ReadyQueue,
    /// Ready items held back by an earlier item of their key.
    blocked: u64,
    /// Timers: delayed items by due time.
    delayed: BTreeSet<(Instant, u64)>,
    /// Timers: leased items by lease expiry.
    leased: LeaseQueue,
    /// Every held item of a key, in push (id) order.
    keys: HashMap<String, VecDeque<u64>>,
    /// Payloads held by a unique queue.
    dedup: HashMap<Vec<u8>, u64>,
}

impl State {
    /// How many waiting pops to signal for `n` items that became poppable.
    fn wakes(&self, n: usize) -> usize {
        n.min(self.waiting)
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Moves `id` to ready with a fresh sequence number (behind everything
    /// ready by now). Returns whether it can be handed out at once.
    fn make_ready(&mut self, id: u64) -> bool {
        let seq = self.next_seq();
        let Some(entry) = self.entries.get_mut(&id) else {
            return false;
        };
        entry.phase = Phase::Ready { seq };
        // Whether it is the oldest held item of its key.
        let head = match &entry.key {
            None => true,
            Some(k) => self.keys.get(k).and_then(|q| q.front()) == Some(&id),
        };
        if head {
            self.ready.push(seq, id);
        } else {
            self.blocked += 1;
        }
        head
    }

    /// Stores a new item as ready. Returns whether it can be handed out at once.
    fn insert(&mut self, id: u64, item: NewItem) -> bool {
        let seq = self.next_seq();
        let head = match &item.key {
            None => true,
            Some(k) => {
                let q = self.keys.entry(k.clone()).or_default();
                q.push_back(id);
                q.len() == 1
            }
        };
        self.entries.insert(
            id,
            Entry {
                payload: item.payload,
                key: item.key,
                attempts: 0,
                phase: Phase::Ready { seq },
            },
        );
        if head {
            self.ready.push(seq, id);
        } else {
            self.blocked += 1;
        }
        head
    }

    /// Applies due timers. Returns how many items became poppable.
    fn promote(&mut self, now: Instant) -> usize {
        let mut woke = 0;
        while let Some(&(at, id)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            woke += usize::from(self.make_ready(id));
        }
        while let Some((at, id)) = self.leased.first(&self.entries) {
            if at > now {
                break;
            }
            self.leased.fifo.pop_front();
            if let Some(e) = self.entries.get_mut(&id) {
                e.attempts = e.attempts.saturating_add(1);
            }
            woke += usize::from(self.make_ready(id));
        }
        woke
    }

    /// The earliest pending timer.
    fn next_timer(&mut self) -> Option<Instant> {
        let d = self.delayed.first().map(|t| t.0);
        let l = self.leased.first(&self.entries).map(|t| t.0);
        match (d, l) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Deletes `id` in whatever phase it is. Returns whether an item of the
    /// same key became poppable.
    fn remove(&mut self, id: u64) -> Option<bool> {
        let entry = self.entries.remove(&id)?;
        match entry.phase {
            Phase::Ready { seq } => {
                // Poppable unless an earlier item of its key is held (the
                // key index still lists it here).
                let head = match &entry.key {
                    None => true,
                    Some(k) => self.keys.get(k).and_then(|q| q.front()) == Some(&id),
                };
                if head {
                    self.ready.remove(seq, &self.entries);
                } else {
                    self.blocked -= 1;
                }
            }
            Phase::Delayed { until } => {
                self.delayed.remove(&(until, id));
            }
            Phase::Leased { .. } => self.leased.remove(&self.entries),
        }
        if let Some(d) = self.dedup.get(&entry.payload) {
            if *d == id {
                self.dedup.remove(&entry.payload);
            }
        }
        let mut unblocked = false;
        if let Some(k) = entry.key {
            if let Some(q) = self.keys.get_mut(&k) {
                let was_head = q.front() == Some(&id);
                if let Some(pos) = q.iter().position(|x| *x == id) {
                    q.remove(pos);
                }
                let next = q.front().copied();
                if q.is_empty() {
                    self.keys.remove(&k);
                }
                if was_head {
                    if let Some(next) = next {
                        if let Some(Phase::Ready { seq }) = self.entries.get(&next).map(|e| e.phase)
                        {
                            self.blocked -= 1;
                            self.ready.push(seq, next);
                            unblocked = true;
                        }
                    }
                }
            }
        }
        Some(unblocked)
    }
}

impl MemoryQueue {
    /// Creates an empty queue.
    ///
    /// # Errors
    /// [`InvalidOption`] when `opts` does not
    /// [validate](QueueOptions::validate) (a capacity of 0, a visibility
    /// timeout under 1 ms, a `max_item_bytes` of 0).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::{BaseQueue, MemoryQueue, QueueOptions};
    ///
    /// let q = MemoryQueue::new("mail", QueueOptions::default().capacity(100).unique(true))?;
    /// assert_eq!(q.name(), "mail");
    /// assert!(q.is_unique());
    ///
    /// let err = MemoryQueue::new("mail", QueueOptions::default().capacity(0)).unwrap_err();
    /// assert_eq!(err.field, "capacity");
    /// # Ok::<(), snapstream::queue::InvalidOption>(())
    /// ```
    pub fn new(name: impl Into<String>, opts: QueueOptions) -> Result<MemoryQueue, InvalidOption> {
        opts.validate()?;
        Ok(MemoryQueue {
            name: name.into(),
            opts,
            state: Mutex::new(State::default()),
            ready_signal: Notify::new(),
            room_signal: Notify::new(),
        })
    }

    /// The options the queue was created with.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::queue::{MemoryQueue, QueueOptions};
    ///
    /// let q = MemoryQueue::new("q", QueueOptions::default().capacity(3)).unwrap();
    /// assert_eq!(q.options().capacity, Some(3));
    /// ```
    pub fn options(&self) -> &QueueOptions {
        &self.opts
    }

    fn signal_ready(&self, n: usize) {
        for _ in 0..n {
            self.ready_signal.notify_one();
        }
    }

    async fn push_inner(&self, item: NewItem, timeout: Duration) -> Result<ItemId, PushError> {
        let item = self.opts.check_size(item)?;
        // Read the clock only when the queue is full.
        let mut deadline: Option<Instant> = None;
        loop {
            // `notify_waiters` reaches a `Notified` from its creation on, so
            // creating it before the check is enough: no registration (and no
            // lock on the waiter list) unless the queue turns out full. Only
            // a bounded queue can be full.
            let room = self.opts.capacity.map(|_| self.room_signal.notified());
            tokio::pin!(room);
            {
                let mut st = self.state.lock();
                if st.closed {
                    return Err(PushError::Closed(item));
                }
                if self.opts.unique && st.dedup.contains_key(&item.payload) {
                    return Err(PushError::AlreadyQueued(item));
                }
                let full = self
                    .opts
                    .capacity
                    .is_some_and(|cap| st.entries.len() as u64 >= cap);
                if !full {
                    let id = st.next_id;
                    st.next_id += 1;
                    if self.opts.unique {
                        st.dedup.insert(item.payload.clone(), id);
                    }
                    let poppable = st.insert(id, item);
                    let wake = st.wakes(usize::from(poppable));
                    drop(st);
                    self.signal_ready(wake);
                    return Ok(ItemId(id));
                }
            }
            let now = Instant::now();
            let deadline = *deadline.get_or_insert(now + timeout);
            if now >= deadline {
                return Err(PushError::Full(item));
            }
            // On timeout the loop looks once more, then fails with `Full`.
            if let Some(room) = room.as_pin_mut() {
                let _ = tokio::time::timeout_at(deadline, room).await;
            }
        }
    }

    async fn pop_inner(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        /// Counts this pop in `State::waiting` while it waits; uncounts it
        /// when it looks again or is dropped.
        struct Waiting<'a>(&'a MemoryQueue, bool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if self.1 {
                    self.0.state.lock().waiting -= 1;
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut waiting = Waiting(self, false);
        loop {
            // Created before the look (so `close`'s `notify_waiters` reaches
            // it) but not registered: a pop that finds items never touches
            // the waiter list. A pop that finds nothing counts itself in
            // `waiting` under the lock; whoever makes an item ready after
            // that signals, leaving a permit (`notify_one`) if this pop is
            // not registered yet, so no wake-up is missed.
            let signal = self.ready_signal.notified();
            tokio::pin!(signal);
            let wake_at = {
                let mut st = self.state.lock();
                if waiting.1 {
                    st.waiting -= 1;
                    waiting.1 = false;
                }
                let now = Instant::now();
                let woke = st.promote(now);
                if !st.ready.is_empty() {
                    let until = now + self.opts.visibility_timeout;
                    let mut out = Vec::with_capacity(max.min(st.ready.len()));
                    while out.len() < max {
                        let st = &mut *st;
                        let Some(id) = st.ready.pop(&st.entries) else {
                            break;
                        };
                        let seq = st.next_seq();
                        let until = st.leased.push(until, seq, id);
                        let e = st.entries.get_mut(&id).expect("ready item is stored");
                        e.phase = Phase::Leased { until, seq };
                        out.push(Delivery {
                            id: ItemId(id),
                            payload: e.payload.clone(),
                            key: e.key.clone(),
                            attempts: e.attempts,
                        });
                    }
                    // Pass on what we did not take to other waiters (this
                    // pop used one of the items that became ready).
                    let left = st.ready.len().min(woke.saturating_sub(1).max(1));
                    let wake = st.wakes(left);
                    drop(st);
                    self.signal_ready(wake);
                    return Ok(out);
                }
                if woke > 0 {
                    let wake = st.wakes(woke);
                    drop(st);
                    self.signal_ready(wake);
                    continue;
                }
                if st.closed {
                    return Err(QueueError::Closed);
                }
                if now >= deadline {
                    return Ok(Vec::new());
                }
                st.waiting += 1;
                waiting.1 = true;
                st.next_timer().map_or(deadline, |t| t.min(deadline))
            };
            let _ = tokio::time::timeout_at(wake_at, signal).await;
        }
    }
}

impl BaseQueue for MemoryQueue {
    fn name(&self) -> &str {
        &self.name
    }

    fn backend(&self) -> Backend {
        Backend::Memory
    }

    fn is_unique(&self) -> bool {
        self.opts.unique
    }

    fn push(&self, item: NewItem, timeout: Duration) -> BoxFuture<'_, Result<ItemId, PushError>> {
        Box::pin(self.push_inner(item, timeout))
    }

    fn pop(
        &self,
        max: usize,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, QueueError>> {
        Box::pin(self.pop_inner(max, timeout))
    }

    fn ack<'a>(&'a self, ids: &'a [ItemId]) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut unblocked = 0;
            let mut removed = 0;
            let wake = {
                let mut st = self.state.lock();
                for id in ids {
                    // Only leased items can be acked; a stale ack of an item
                    // that was handed out again still deletes it (it was
                    // handled), an unknown id is ignored.
                    if let Some(u) = st.remove(id.0) {
                        removed += 1;
                        unblocked += usize::from(u);
                    }
                }
                st.wakes(unblocked)
            };
            self.signal_ready(wake);
            // Only a bounded queue has pushes waiting for room.
            if removed > 0 && self.opts.capacity.is_some() {
                self.room_signal.notify_waiters();
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
            let mut woke = 0;
            let wake = {
                let mut st = self.state.lock();
                let now = Instant::now();
                for id in ids {
                    let id = id.0;
                    let Some(e) = st.entries.get_mut(&id) else {
                        continue;
                    };
                    if !matches!(e.phase, Phase::Leased { .. }) {
                        continue;
                    }
                    e.attempts = e.attempts.saturating_add(1);
                    if delay.is_zero() {
                        woke += usize::from(st.make_ready(id));
                    } else {
                        let due = now + delay;
                        e.phase = Phase::Delayed { until: due };
                        st.delayed.insert((due, id));
                    }
                    // After the phase change: the slot is stale now.
                    let st = &mut *st;
                    st.leased.remove(&st.entries);
                }
                // Wake one waiter even for a delayed nack so that a waiting
                // pop shortens its sleep to the new timer.
                st.wakes(woke.max(1))
            };
            self.signal_ready(wake);
            Ok(())
        })
    }

    fn len(&self) -> BoxFuture<'_, Result<QueueLen, QueueError>> {
        Box::pin(async move {
            let (len, woke) = {
                let mut st = self.state.lock();
                let woke = st.promote(Instant::now());
                let len = QueueLen {
                    ready: st.ready.len() as u64 + st.blocked,
                    delayed: st.delayed.len() as u64,
                    leased: st.leased.len() as u64,
                };
                (len, st.wakes(woke))
            };
            self.signal_ready(woke);
            Ok(len)
        })
    }

    fn has<'a>(&'a self, payload: &'a [u8]) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let st = self.state.lock();
            if self.opts.unique {
                Ok(st.dedup.contains_key(payload))
            } else {
                Ok(st.entries.values().any(|e| e.payload == payload))
            }
        })
    }

    fn remove_all(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(async move {
            let n = {
                let mut st = self.state.lock();
                let n = st.entries.len() as u64;
                st.entries.clear();
                st.ready.clear();
                st.blocked = 0;
                st.delayed.clear();
                st.leased.clear();
                st.keys.clear();
                st.dedup.clear();
                n
            };
            self.room_signal.notify_waiters();
            Ok(n)
        })
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.ready_signal.notify_waiters();
        self.room_signal.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T: Duration = Duration::from_secs(1);

    fn item(s: &str) -> NewItem {
        NewItem::new(s.as_bytes().to_vec())
    }

    async fn pop_strs(q: &MemoryQueue, max: usize) -> Vec<String> {
        q.pop(max, Duration::ZERO)
            .await
            .unwrap()
            .into_iter()
            .map(|d| String::from_utf8(d.payload).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn fifo_and_ack() {
        let q = MemoryQueue::new("q", QueueOptions::default()).unwrap();
        for s in ["a", "b", "c"] {
            q.push(item(s), T).await.unwrap();
        }
        assert_eq!(pop_strs(&q, 2).await, ["a", "b"]);
        assert_eq!(pop_strs(&q, 2).await, ["c"]);
        let len = q.len().await.unwrap();
        assert_eq!((len.ready, len.leased), (0, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expires_and_attempts_rise() {
        let q = MemoryQueue::new(
            "q",
            QueueOptions::default().visibility_timeout(Duration::from_secs(10)),
        )
        .unwrap();
        q.push(item("x"), T).await.unwrap();
        let d = q.pop(1, T).await.unwrap();
        assert_eq!(d[0].attempts, 0);
        // The waiting pop sleeps until the lease expires, then gets it again.
        let d2 = q.pop(1, Duration::from_secs(60)).await.unwrap();
        assert_eq!(d2[0].id, d[0].id);
        assert_eq!(d2[0].attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn nack_delay_then_ready_behind_others() {
        let q = MemoryQueue::new("q", QueueOptions::default()).unwrap();
        q.push(item("a"), T).await.unwrap();
        let a = q.pop(1, T).await.unwrap();
        q.nack(&[a[0].id], Duration::from_secs(5)).await.unwrap();
        q.push(item("b"), T).await.unwrap();
        assert_eq!(q.len().await.unwrap().delayed, 1);
        assert_eq!(pop_strs(&q, 10).await, ["b"]);
        tokio::time::advance(Duration::from_secs(5)).await;
        let again = q.pop(10, Duration::ZERO).await.unwrap();
        assert_eq!(again[0].payload, b"a");
        assert_eq!(again[0].attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn full_after_timeout_and_waiting_push_gets_room() {
        let q = Arc::new(MemoryQueue::new("q", QueueOptions::default().capacity(1)).unwrap());
        q.push(item("a"), T).await.unwrap();
        match q.push(item("b"), T).await {
            Err(PushError::Full(it)) => assert_eq!(it, item("b")),
            other => panic!("{other:?}"),
        }
        let q2 = q.clone();
        let waiting =
            tokio::spawn(async move { q2.push(item("c"), Duration::from_secs(60)).await });
        let d = q.pop(1, T).await.unwrap();
        q.ack(&[d[0].id]).await.unwrap();
        waiting.await.unwrap().unwrap();
        assert_eq!(pop_strs(&q, 10).await, ["c"]);
    }

    #[tokio::test]
    async fn unique_rejects_until_acked() {
        let q = MemoryQueue::new("q", QueueOptions::default().unique(true)).unwrap();
        q.push(item("a"), T).await.unwrap();
        assert!(matches!(
            q.push(item("a"), T).await,
            Err(PushError::AlreadyQueued(_))
        ));
        assert!(q.has(b"a").await.unwrap());
        let d = q.pop(1, T).await.unwrap();
        assert!(matches!(
            q.push(item("a"), T).await,
            Err(PushError::AlreadyQueued(_))
        ));
        q.ack(&[d[0].id]).await.unwrap();
        assert!(!q.has(b"a").await.unwrap());
        q.push(item("a"), T).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unique_race_one_wins() {
        let q = Arc::new(MemoryQueue::new("q", QueueOptions::default().unique(true)).unwrap());
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.push(item("same"), T).await.is_ok() })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, 1);
    }

    #[tokio::test]
    async fn per_key_order() {
        let q = MemoryQueue::new("q", QueueOptions::default()).unwrap();
        q.push(NewItem::with_key(b"k1".to_vec(), "k"), T)
            .await
            .unwrap();
        q.push(NewItem::with_key(b"k2".to_vec(), "k"), T)
            .await
            .unwrap();
        q.push(item("free"), T).await.unwrap();
        let first = q.pop(10, Duration::ZERO).await.unwrap();
        let got: Vec<_> = first.iter().map(|d| d.payload.clone()).collect();
        assert_eq!(got, [b"k1".to_vec(), b"free".to_vec()]);
        assert_eq!(q.len().await.unwrap().ready, 1);
        assert!(q.pop(10, Duration::ZERO).await.unwrap().is_empty());
        // Nack k1 with a delay: k2 still waits behind it.
        q.nack(&[first[0].id], Duration::ZERO).await.unwrap();
        let again = q.pop(10, Duration::ZERO).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].payload, b"k1");
        q.ack(&[again[0].id]).await.unwrap();
        assert_eq!(pop_strs(&q, 10).await, ["k2"]);
    }

    #[tokio::test]
    async fn pop_waits_and_wakes_on_push() {
        let q = Arc::new(MemoryQueue::new("q", QueueOptions::default()).unwrap());
        let q2 = q.clone();
        let popper = tokio::spawn(async move { q2.pop(1, Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        q.push(item("x"), T).await.unwrap();
        let got = popper.await.unwrap().unwrap();
        assert_eq!(got[0].payload, b"x");
    }

    #[tokio::test(start_paused = true)]
    async fn pop_times_out_empty() {
        let q = MemoryQueue::new("q", QueueOptions::default()).unwrap();
        assert!(q.pop(1, Duration::from_secs(3)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn cancelled_pop_leases_nothing() {
        let q = MemoryQueue::new("q", QueueOptions::default()).unwrap();
        {
            let fut = q.pop(1, Duration::from_secs(3600));
            let _ = futures::poll!(fut);
        }
        q.push(item("x"), T).await.unwrap();
        assert_eq!(q.len().await.unwrap().ready, 1);
        assert_eq!(pop_strs(&q, 1).await, ["x"]);
    }

    #[tokio::test]
    async fn close_wakes_and_rejects() {
        let q = Arc::new(MemoryQueue::new("q", QueueOptions::default()).unwrap());
        q.push(item("a"), T).await.unwrap();
        let q2 = q.clone();
        let popped = q.pop(1, T).await.unwrap();
        let waiter = tokio::spawn(async move { q2.pop(1, Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        q.close();
        assert!(matches!(waiter.await.unwrap(), Err(QueueError::Closed)));
        assert!(matches!(
            q.push(item("b"), T).await,
            Err(PushError::Closed(_))
        ));
        // Items stay stored.
        assert_eq!(q.len().await.unwrap().leased, 1);
        q.nack(&[popped[0].id], Duration::ZERO).await.unwrap();
        // Still ready items are handed out after close.
        assert_eq!(pop_strs(&q, 1).await, ["a"]);
    }

    #[tokio::test]
    async fn remove_all_clears_dedup() {
        let q = MemoryQueue::new("q", QueueOptions::default().unique(true)).unwrap();
        q.push(item("a"), T).await.unwrap();
        q.push(NewItem::with_key(b"b".to_vec(), "k"), T)
            .await
            .unwrap();
        let _ = q.pop(1, T).await.unwrap();
        assert_eq!(q.remove_all().await.unwrap(), 2);
        assert_eq!(q.len().await.unwrap(), QueueLen::default());
        q.push(item("a"), T).await.unwrap();
        q.push(NewItem::with_key(b"c".to_vec(), "k"), T)
            .await
            .unwrap();
        assert_eq!(pop_strs(&q, 5).await, ["a", "c"]);
    }

    /// Acks out of order leave stale slots in the lease and ready queues;
    /// they must be skipped and compacted without changing what is handed out.
    #[tokio::test(start_paused = true)]
    async fn out_of_order_acks_keep_counts_and_order() {
        let q = MemoryQueue::new(
            "q",
            QueueOptions::default().visibility_timeout(Duration::from_secs(10)),
        )
        .unwrap();
        for i in 0..300u32 {
            q.push(NewItem::new(i.to_le_bytes().to_vec()), T)
                .await
                .unwrap();
        }
        let leased = q.pop(300, T).await.unwrap();
        // Ack the odd ones from the back: every lease slot but the even ones goes stale.
        let odd: Vec<ItemId> = leased.iter().rev().step_by(2).map(|d| d.id).collect();
        q.ack(&odd).await.unwrap();
        let len = q.len().await.unwrap();
        assert_eq!((len.ready, len.leased), (0, 150));
        // The even ones expire together and come back in push order.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(q.len().await.unwrap().ready, 150);
        // Ack ready items (a stale ack after the lease expired) out of order.
        let every_third: Vec<ItemId> = leased
            .iter()
            .rev()
            .skip(1)
            .step_by(2)
            .step_by(3)
            .map(|d| d.id)
            .collect();
        q.ack(&every_third).await.unwrap();
        let left = q.pop(300, Duration::ZERO).await.unwrap();
        let want: Vec<u32> = (0..300)
            .rev()
            .skip(1)
            .step_by(2)
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, v)| v)
            .rev()
            .collect();
        let got: Vec<u32> = left
            .iter()
            .map(|d| u32::from_le_bytes(d.payload.clone().try_into().unwrap()))
            .collect();
        assert_eq!(got, want);
        assert!(left.iter().all(|d| d.attempts == 1));
        let len = q.len().await.unwrap();
        assert_eq!((len.ready, len.leased), (0, 100));
        let ids: Vec<ItemId> = left.iter().map(|d| d.id).collect();
        q.ack(&ids).await.unwrap();
        assert_eq!(q.len().await.unwrap(), QueueLen::default());
    }

    #[tokio::test]
    async fn empty_payload_round_trips() {
        let q = MemoryQueue::new("q", QueueOptions::default()).unwrap();
        q.push(NewItem::new(Vec::new()), T).await.unwrap();
        let d = q.pop(1, T).await.unwrap();
        assert!(d[0].payload.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_producers_consumers_same_multiset() {
        const P: u32 = 8;
        const N: u32 = 2_000;
        let q = Arc::new(MemoryQueue::new("q", QueueOptions::default().capacity(256)).unwrap());
        let mut producers = Vec::new();
        for p in 0..P {
            let q = q.clone();
            producers.push(tokio::spawn(async move {
                for i in 0..N {
                    let v = (p * N + i).to_le_bytes().to_vec();
                    q.push(NewItem::new(v), Duration::from_secs(60))
                        .await
                        .unwrap();
                }
            }));
        }
        let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut consumers = Vec::new();
        for _ in 0..8 {
            let q = q.clone();
            let done = done.clone();
            consumers.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    match q.pop(16, Duration::from_secs(60)).await {
                        Ok(batch) => {
                            let ids: Vec<_> = batch.iter().map(|d| d.id).collect();
                            for d in batch {
                                seen.push(u32::from_le_bytes(d.payload.try_into().unwrap()));
                            }
                            q.ack(&ids).await.unwrap();
                            let n = ids.len() as u32;
                            // The consumer that takes the last item closes the queue.
                            if done.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n == P * N {
                                q.close();
                            }
                        }
                        Err(QueueError::Closed) => return seen,
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
        for p in producers {
            p.await.unwrap();
        }
        let mut all = Vec::new();
        for c in consumers {
            all.extend(c.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (0..P * N).collect::<Vec<_>>());
    }

    #[test]
    fn handle_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<MemoryQueue>();
    }
}

/// Model-based property test: the memory queue against a plain list.
#[cfg(test)]
mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push { key: Option<u8> },
        Pop { max: usize },
        Ack { pick: usize },
        Nack { pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => proptest::option::of(0u8..3).prop_map(|key| Op::Push { key }),
            2 => (1usize..4).prop_map(|max| Op::Pop { max }),
            1 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
            1 => any::<usize>().prop_map(|pick| Op::Nack { pick }),
        ]
    }

    struct ModelItem {
        id: ItemId,
        payload: Vec<u8>,
        key: Option<u8>,
        attempts: u32,
        /// `Some(seq)` when ready, `None` when leased.
        ready: Option<u64>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 1..60)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let q = MemoryQueue::new("model", QueueOptions::default()).unwrap();
                // Held items in push order.
                let mut model: Vec<ModelItem> = Vec::new();
                let mut seq = 0u64;
                let mut n = 0u32;
                for op in ops {
                    match op {
                        Op::Push { key } => {
                            n += 1;
                            let payload = n.to_le_bytes().to_vec();
                            let item = NewItem {
                                payload: payload.clone(),
                                key: key.map(|k| k.to_string()),
                            };
                            let id = q.push(item, Duration::ZERO).await.unwrap();
                            seq += 1;
                            model.push(ModelItem { id, payload, key, attempts: 0, ready: Some(seq) });
                        }
                        Op::Pop { max } => {
                            let got = q.pop(max, Duration::ZERO).await.unwrap();
                            // Eligible: ready and the oldest held item of its key.
                            let mut eligible: Vec<(u64, usize)> = model
                                .iter()
                                .enumerate()
                                .filter(|(i, m)| {
                                    m.ready.is_some()
                                        && !matches!(m.key, Some(k)
                                            if model[..*i].iter().any(|e| e.key == Some(k)))
                                })
                                .map(|(i, m)| (m.ready.unwrap(), i))
                                .collect();
                            eligible.sort_unstable();
                            eligible.truncate(max);
                            let want: Vec<(Vec<u8>, u32)> = eligible
                                .iter()
                                .map(|&(_, i)| (model[i].payload.clone(), model[i].attempts))
                                .collect();
                            let have: Vec<(Vec<u8>, u32)> =
                                got.iter().map(|d| (d.payload.clone(), d.attempts)).collect();
                            assert_eq!(have, want);
                            for (_, i) in eligible {
                                model[i].ready = None;
                            }
                        }
                        Op::Ack { pick } | Op::Nack { pick } => {
                            let leased: Vec<usize> = model
                                .iter()
                                .enumerate()
                                .filter(|(_, m)| m.ready.is_none())
                                .map(|(i, _)| i)
                                .collect();
                            if leased.is_empty() {
                                continue;
                            }
                            let i = leased[pick % leased.len()];
                            let id = model[i].id;
                            if matches!(op, Op::Ack { .. }) {
                                q.ack(&[id]).await.unwrap();
                                model.remove(i);
                            } else {
                                q.nack(&[id], Duration::ZERO).await.unwrap();
                                seq += 1;
                                model[i].ready = Some(seq);
                                model[i].attempts += 1;
                            }
                        }
                    }
                    let len = q.len().await.unwrap();
                    let leased = model.iter().filter(|m| m.ready.is_none()).count() as u64;
                    assert_eq!(len.leased, leased);
                    assert_eq!(len.total(), model.len() as u64);
                }
            });
        }
    }
}
