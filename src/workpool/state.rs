//! The dispatcher: an intake, per-key FIFO queues and a queue of ready keys.
//!
//! # Intake
//!
//! An add touches only the [`Intake`]: a vector behind its own small lock,
//! held for a push. Workers move its items into their keys' queues in bulk,
//! under the state lock, when they look for work ([`State::take`]), so
//! producers never wait on the workers' bookkeeping (hashing keys, the ready
//! queue, reports); an add takes the state lock only to wake a parked
//! worker. The bound on pending items is one atomic count (`used`) of the
//! items in the intake, in the queues and not yet started in workers'
//! batches: outside producers raise it under the intake lock after checking
//! it, so only adds from handlers (admitted above the bound) take it past
//! the capacity; workers lower it under the state lock, and producers
//! waiting for room register on the intake lock (see [`Room`]), so no
//! wake-up is lost. A worker that parks marks the intake (`parked`) while it
//! holds both locks and has just seen it empty, and every look re-marks it
//! while a worker is idle; the next add clears the mark and wakes a worker
//! unless one is on its way. So an add never waits in the intake while a
//! worker idles, even when the worker that looked runs a handler that waits
//! for that add.
//!
//! # Queues
//!
//! Everything past the intake runs under one mutex and is O(1) (amortised) per item:
//! a key sits in `ready` at most once, and only while it has queued items and
//! fewer than `per_key` of them in flight. A key's entry exists only while it
//! has queued or in-flight items.
//!
//! # Key entries
//!
//! A key's entry lives in a slab (`slots`), found by key through one hash
//! table (`index`, slot numbers hashed by their key; the slot keeps the
//! hash, so a remove neither hashes nor compares the key). Everything after the add (the ready
//! queue, a worker's runs, its report) names the slot, so an item costs two
//! hash operations at most: the lookup (or insert) when it is added, and the
//! remove when its key has nothing left. A freed slot keeps no key, only
//! its empty queue's buffer (up to a small size) for the next key, so an
//! idle key costs nothing and a new one no allocation; the slab is as long
//! as the most keys live at once (about the capacity), and it and the index
//! shrink again once mostly empty. The index hashes with
//! `foldhash` (seeded per table), several times faster than SipHash on short
//! keys: see the pool section of the README.

use std::collections::VecDeque;
use std::hash::Hash;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use super::wait::{WaitList, Wakeups};
use crate::sync::{Arc, AtomicBool, AtomicUsize, Ordering, PoolMutex as Mutex};

/// The largest per-key queue buffer (in items) a free slot keeps for reuse.
const SPARE_QUEUE_CAPACITY: usize = 16;

/// Tables at most this large are never shrunk.
const SHRINK_ABOVE: usize = 1024;

/// The most items a worker takes at once (per-key concurrency 1 only). The
/// worker runs them one after the other within a short time slice and hands
/// back what it did not start; see [`State::take`].
#[cfg(not(loom))]
pub(crate) const MAX_BATCH: usize = 64;
#[cfg(loom)]
pub(crate) const MAX_BATCH: usize = 2;

/// The most keys a worker takes at once.
#[cfg(not(loom))]
pub(crate) const MAX_KEYS: usize = 64;
#[cfg(loom)]
pub(crate) const MAX_KEYS: usize = 2;

/// Items a worker took: `(add order, item)`.
pub(crate) type Batch<T> = VecDeque<(u64, T)>;

/// A key entry's place in the slab (see [Key entries](self#key-entries)).
pub(crate) type Slot = usize;

/// One key's share of a batch: the next `len` items of the batch.
#[derive(Debug)]
pub(crate) struct Run<K> {
    pub(crate) key: K,
    /// The key's entry.
    pub(crate) slot: Slot,
    pub(crate) len: usize,
}

/// How the pool is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    /// Intake closed; pending items are still handled.
    Drain,
    /// Intake closed; pending items were handed back.
    Abort,
}

/// Why an item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Full,
    Stopped,
}

/// What a worker should do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Run the batch just taken.
    Job,
    Wait,
    Exit,
}

/// What a worker reports for one [`Run`] of its batch.
#[derive(Debug)]
pub(crate) struct Done<K> {
    pub(crate) key: K,
    /// The key's entry (from the [`Run`]).
    pub(crate) slot: Slot,
    /// Items whose handler returned.
    pub(crate) handled: u64,
    /// Items whose handler panicked.
    pub(crate) panicked: u64,
    /// Items not started, handed back (they follow the ones that ran).
    pub(crate) left: usize,
    /// How many of the run's items that ran no longer count as pending:
    /// the batch's first item (see [`State::take`]), and every item up to a
    /// handler that waited (see [`State::hand_back_rest`]).
    pub(crate) counted: usize,
}

/// Items added and not yet moved into their keys' queues (see
/// [Intake](self#intake)), with the add order and whether intake is closed.
#[derive(Debug)]
pub(crate) struct Intake<K, T> {
    /// `(add order, key's hash, key, item)`, in add order.
    items: Vec<(u64, u64, K, T)>,
    seq: u64,
    closing: Option<Closing>,
    /// A worker parked after it found the intake empty, and no add has woken
    /// one since: the next add must.
    parked: bool,
    /// Producers waiting for room (see [`Room`]).
    pub(crate) room: WaitList,
    /// `add` calls that found the pool full (counted once per call).
    pub(crate) add_waits: u64,
}

/// How producers wait for room without the state lock.
///
/// A producer that finds the pool full registers in the intake's `room`
/// list, sets `wanted`, and only then reads the count of pending items
/// again; a worker lowers the count and only then reads `wanted` (all
/// `SeqCst`). So either the producer sees the room and tries again, or the
/// worker sees the producer and wakes it, under the intake lock.
///
/// Workers wake waiting producers once an eighth of the capacity is free,
/// so a producer that is woken adds a run of items instead of one per
/// wake-up; and for any room at all when a worker stops making room (it
/// parks, exits, or its handler has to wait), so a producer never waits on
/// room that nobody will report (a handler waiting for that producer could
/// otherwise deadlock against it).
#[derive(Debug, Default)]
pub(crate) struct Room {
    pub(crate) wanted: AtomicBool,
}

impl Room {
    /// The free slots at which workers wake waiting producers, unless they
    /// stop making room.
    pub(crate) fn margin(capacity: usize) -> usize {
        (capacity / 8).max(1)
    }
}

impl<K, T> Intake<K, T> {
    pub(crate) fn new() -> Self {
        Self {
            items: Vec::new(),
            seq: 0,
            closing: None,
            parked: false,
            room: WaitList::default(),
            add_waits: 0,
        }
    }

    /// Admits an item, if intake is open and (unless `from_handler`, which
    /// is admitted above the bound and while draining, so a handler adding
    /// to its own pool never waits on itself) `used` is below `capacity`.
    /// `Ok(true)`: a worker parked with nothing to do, and the caller must
    /// wake one ([`State::wake_for_intake`]).
    pub(crate) fn push(
        &mut self,
        hash: u64,
        key: K,
        item: T,
        from_handler: bool,
        capacity: usize,
        used: &AtomicUsize,
    ) -> Result<bool, (Refused, K, T)> {
        match self.closing {
            None => {}
            Some(Closing::Drain) if from_handler => {}
            Some(_) => return Err((Refused::Stopped, key, item)),
        }
        // Only adds raise `used`, and only under this lock: checked here, it
        // stays below the capacity.
        if !from_handler && used.load(Ordering::Acquire) >= capacity {
            return Err((Refused::Full, key, item));
        }
        used.fetch_add(1, Ordering::AcqRel);
        self.items.push((self.seq, hash, key, item));
        self.seq += 1;
        Ok(std::mem::take(&mut self.parked))
    }

    /// Whether intake is closed (`push` refuses outside producers).
    pub(crate) fn is_closed(&self) -> bool {
        self.closing.is_some()
    }

    /// Wakes up to `free` producers waiting for room; clears `wanted` once
    /// none waits.
    pub(crate) fn wake_room(&mut self, free: usize, wanted: &AtomicBool, wakes: &mut Wakeups) {
        for _ in 0..free {
            match self.room.pop() {
                Some(w) => wakes.push(Some(w)),
                None => break,
            }
        }
        if self.room.is_empty() {
            wanted.store(false, Ordering::SeqCst);
        }
    }
}

/// `n` pending items were started or left the pool.
///
/// `SeqCst`, as is the producers' registration for room: a worker that
/// lowers the count and then finds no producer waiting, and a producer that
/// registers and then finds the count still at the capacity, cannot both
/// happen (see [`Room`]).
fn unpend(used: &AtomicUsize, n: usize) {
    if n > 0 {
        used.fetch_sub(n, Ordering::SeqCst);
    }
}

/// A slot of the slab: a key's entry, or free (`key` is `None`, `items`
/// empty, perhaps with a buffer kept for the next key).
#[derive(Debug)]
struct KeyQueue<K, T> {
    key: Option<K>,
    /// The key's hash (while `key` is set): the index removes by it without
    /// hashing or comparing the key again.
    hash: u64,
    items: VecDeque<(u64, T)>,
    in_flight: usize,
    in_ready: bool,
}

/// The hasher of the key index.
type IndexHasher = crate::FastHasher;

#[derive(Debug)]
pub(crate) struct State<K, T> {
    /// Key to slot, for the keys with an entry: a table of slot numbers,
    /// hashed by their key (the hash is kept in the slot).
    index: HashTable<Slot>,
    hasher: IndexHasher,
    /// The key entries and free slots (whose numbers are in `free`).
    slots: Vec<KeyQueue<K, T>>,
    /// Free slots, reused last-freed first.
    free: Vec<Slot>,
    /// [`maybe_shrink`](Self::maybe_shrink) runs again only below this many
    /// live keys.
    shrink_mark: usize,
    /// Ready keys, by slot.
    ready: VecDeque<Slot>,
    /// Items an abort took out of the pool, with their add order: the
    /// queued ones (taken by [`close`](State::close)) and those workers hand
    /// back afterwards. They stay here until [`State::take_returned`]
    /// collects them, so a `stop` given up on loses none.
    returned: Vec<(u64, K, T)>,
    /// Pending items: in the intake, in the queues, and the unstarted items
    /// of workers' batches (see [Intake](self#intake)).
    used: Arc<AtomicUsize>,
    /// The intake's other vector: a look swaps it in and moves the items out
    /// of the one it took.
    spare: Vec<(u64, u64, K, T)>,
    in_flight: usize,
    /// Workers holding items of their batch they have not started (a batch
    /// of more than one item, until the worker reports or hands the rest
    /// back because a handler waits).
    holding: usize,
    capacity: usize,
    per_key: usize,
    pub(crate) handled: u64,
    pub(crate) panicked: u64,
    /// Batches workers took.
    pub(crate) batches: u64,
    /// Times a worker found nothing to do and parked.
    pub(crate) worker_waits: u64,
    pub(crate) workers_target: usize,
    pub(crate) workers_live: usize,
    pub(crate) closing: Option<Closing>,
    /// Idle workers.
    idle: WaitList,
    /// Idle workers woken (popped from `idle`) that have not polled yet.
    woken: usize,
    /// Workers that found nothing to do and, instead of parking, yielded
    /// and will look again (see [`worker_spin`](Self::worker_spin)).
    spinning: usize,
    /// 1 while a worker's look drains the intake: it takes a ready key
    /// itself, so the first one it queues wakes nobody.
    looking: usize,
    /// `stop` callers waiting for the workers to exit.
    pub(crate) done: WaitList,
}

impl<K: Hash + Eq + Clone, T> State<K, T> {
    pub(crate) fn new(capacity: usize, per_key: usize, workers: usize) -> Self {
        Self {
            index: HashTable::new(),
            hasher: IndexHasher::default(),
            slots: Vec::new(),
            free: Vec::new(),
            shrink_mark: usize::MAX,
            ready: VecDeque::new(),
            returned: Vec::new(),
            used: Arc::new(AtomicUsize::new(0)),
            spare: Vec::new(),
            in_flight: 0,
            holding: 0,
            capacity,
            per_key,
            handled: 0,
            panicked: 0,
            batches: 0,
            worker_waits: 0,
            workers_target: workers,
            workers_live: 0,
            closing: None,
            idle: WaitList::default(),
            woken: 0,
            spinning: 0,
            looking: 0,
            done: WaitList::default(),
        }
    }

    pub(crate) fn pending(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The count of pending items adds raise (see [Intake](self#intake)).
    pub(crate) fn used(&self) -> Arc<AtomicUsize> {
        self.used.clone()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Items an abort took out that no `stop` has collected yet.
    pub(crate) fn aborted(&self) -> usize {
        self.returned.len()
    }

    /// Whether some worker holds items of its batch it has not started.
    pub(crate) fn holding(&self) -> bool {
        self.holding > 0
    }

    /// Live per-key entries (keys with queued or in-flight items).
    pub(crate) fn keys(&self) -> usize {
        self.index.len()
    }

    fn entry(&mut self, slot: Slot) -> &mut KeyQueue<K, T> {
        let entry = &mut self.slots[slot];
        debug_assert!(entry.key.is_some(), "a ready or in-flight key has an entry");
        entry
    }

    /// The hasher of the key index: adds hash their key with it before they
    /// take any lock.
    pub(crate) fn hasher(&self) -> IndexHasher {
        self.hasher.clone()
    }

    /// The slot of `key`'s entry (whose hash is `hash`), made if it has none.
    fn slot_of(&mut self, hash: u64, key: K) -> Slot {
        if self.index.len() * 4 > self.slots.len() {
            // Grown back: a later decline may shrink again.
            self.shrink_mark = usize::MAX;
        }
        let slots = &self.slots;
        match self.index.entry(
            hash,
            |&s| slots[s].key.as_ref() == Some(&key),
            |&s| slots[s].hash,
        ) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(v) => {
                let key = Some(key);
                let slot = match self.free.pop() {
                    Some(slot) => {
                        let entry = &mut self.slots[slot];
                        debug_assert!(entry.key.is_none() && entry.items.is_empty());
                        entry.key = key;
                        entry.hash = hash;
                        slot
                    }
                    None => {
                        self.slots.push(KeyQueue {
                            key,
                            hash,
                            items: VecDeque::new(),
                            in_flight: 0,
                            in_ready: false,
                        });
                        self.slots.len() - 1
                    }
                };
                *v.insert(slot).get()
            }
        }
    }

    /// Frees the entry of a key with nothing queued or in flight.
    fn free_slot(&mut self, slot: Slot) {
        let entry = &mut self.slots[slot];
        debug_assert!(entry.items.is_empty() && entry.in_flight == 0 && !entry.in_ready);
        let key = entry.key.take();
        debug_assert!(key.is_some(), "a live entry");
        if entry.items.capacity() > SPARE_QUEUE_CAPACITY {
            entry.items = VecDeque::new();
        }
        if let Ok(e) = self.index.find_entry(entry.hash, |&s| s == slot) {
            e.remove();
        }
        self.free.push(slot);
        drop(key);
    }

    /// Moves every item of the intake into its key's queue, in add order.
    pub(crate) fn drain(&mut self, intake: &Mutex<Intake<K, T>>, wakes: &mut Wakeups) {
        let mut items = std::mem::take(&mut self.spare);
        {
            let mut intake = intake.lock();
            std::mem::swap(&mut items, &mut intake.items);
            // While a worker is idle, the next add wakes one, whoever looks
            // now: the looker may run a handler that waits for that add.
            intake.parked = !self.idle.is_empty();
        }
        for (seq, hash, key, item) in items.drain(..) {
            self.queue(seq, hash, key, item, wakes);
        }
        if items.capacity() > 2 * self.capacity.max(SHRINK_ABOVE) {
            // Grown by a burst of adds from handlers (admitted above the bound).
            items = Vec::new();
        }
        self.spare = items;
    }

    /// Wakes an idle worker for what an add put in the intake, unless one
    /// is on its way already (woken, or spinning: each looks again).
    pub(crate) fn wake_for_intake(&mut self, wakes: &mut Wakeups) {
        if self.woken + self.spinning == 0 {
            if let Some(w) = self.idle.pop() {
                self.woken += 1;
                wakes.push(Some(w));
            }
        }
    }

    /// Queues an item taken from the intake.
    fn queue(&mut self, seq: u64, hash: u64, key: K, item: T, wakes: &mut Wakeups) {
        let per_key = self.per_key;
        let slot = self.slot_of(hash, key);
        let entry = self.entry(slot);
        entry.items.push_back((seq, item));
        if !entry.in_ready && entry.in_flight < per_key {
            entry.in_ready = true;
            self.ready.push_back(slot);
            self.wake_worker(wakes);
        }
    }

    /// Hands the next job to a worker, or tells it to wait or exit.
    ///
    /// A job is a batch: the next ready keys (one [`Run`] each, in `runs`)
    /// with their items in order (in `items`). With per-key concurrency 1
    /// and `many` a run holds up to all of the key's queued items and a
    /// batch up to [`MAX_KEYS`] keys, leaving one ready key for each worker
    /// already woken, all within [`MAX_BATCH`] items. Without `many` (the
    /// worker's last handler had to wait), or with a per-key concurrency
    /// above 1, a batch is a single item, so items of a key still start in
    /// order.
    ///
    /// Each run counts as one item in flight. The batch's first item stops
    /// counting as *pending* at once, the others once the worker reports them
    /// with [`finish`](Self::finish) (or, for a run whose handler waits,
    /// every item up to the waiting one, see
    /// [`hand_back_rest`](Self::hand_back_rest)). A batch of
    /// more than one item counts as *holding* until the worker reports it
    /// [`released`](Self::release).
    pub(crate) fn take(
        &mut self,
        runs: &mut Vec<Run<K>>,
        items: &mut Batch<T>,
        many: bool,
        intake: &Mutex<Intake<K, T>>,
        wakes: &mut Wakeups,
    ) -> Take {
        debug_assert!(runs.is_empty() && items.is_empty());
        // First, so a worker that exits wakes another for what it found;
        // this worker counts as on its way for what it drains.
        self.looking = 1;
        self.drain(intake, wakes);
        self.looking = 0;
        if self.workers_live > self.workers_target {
            return self.exit(wakes);
        }
        if self.ready.is_empty() {
            if self.closing.is_some() && self.pending() == 0 && self.in_flight == 0 {
                return self.exit(wakes);
            }
            return Take::Wait;
        }
        let per_key = self.per_key;
        let max_keys = if many && per_key == 1 {
            self.ready
                .len()
                .saturating_sub(self.woken)
                .clamp(1, MAX_KEYS)
        } else {
            1
        };
        while runs.len() < max_keys && items.len() < MAX_BATCH {
            let Some(slot) = self.ready.pop_front() else {
                break;
            };
            let entry = &mut self.slots[slot];
            let n = if per_key == 1 && many {
                entry.items.len().min(MAX_BATCH - items.len())
            } else {
                1
            };
            debug_assert!(n > 0, "a ready key has items");
            if n == entry.items.len() {
                items.append(&mut entry.items);
            } else {
                items.extend(entry.items.drain(..n));
            }
            entry.in_flight += 1;
            self.in_flight += 1;
            let key = entry.key.clone().expect("a ready key has an entry");
            if !entry.items.is_empty() && entry.in_flight < per_key {
                // Round robin: the key goes to the back behind the other keys.
                self.ready.push_back(slot);
                self.wake_worker(wakes);
            } else {
                entry.in_ready = false;
            }
            runs.push(Run { key, slot, len: n });
        }
        // The batch's first item leaves the pending count now: a worker
        // always starts it. The others leave it when the worker reports them
        // ([`finish`](Self::finish)), so items it hands back unstarted never
        // left, and pending items never exceed the capacity.
        unpend(&self.used, 1);
        if items.len() > 1 {
            self.holding += 1;
        }
        self.batches += 1;
        Take::Job
    }

    /// A worker that took a batch of more than one item holds none of it
    /// unstarted any more: it reported the batch, or handed back the rest
    /// because a handler has to wait. After an abort, the last one to do so
    /// wakes the `stop` callers waiting for every unstarted item.
    pub(crate) fn release(&mut self, wakes: &mut Wakeups) {
        debug_assert!(self.holding > 0, "released a batch not held");
        self.holding -= 1;
        if self.holding == 0 && self.closing == Some(Closing::Abort) {
            wakes.extend(self.done.take_all());
        }
    }

    /// A handler has to wait: the items of its run after it (`rest`, in
    /// order) go back to the front of its key's queue, or after an abort to
    /// the items handed back. The key stays in flight until the worker
    /// reports the run (with the items that ran, `left` 0), so no other
    /// worker starts them before the waiting one finishes.
    ///
    /// The run's items that started (those that ran, and the waiting one)
    /// and still count as pending, `started`, leave the count now, so a
    /// waiting handler holds no room; its run's report then counts them.
    pub(crate) fn hand_back_rest(&mut self, slot: Slot, rest: &mut Batch<T>, started: usize) {
        unpend(&self.used, started);
        if rest.is_empty() {
            return;
        }
        if self.closing == Some(Closing::Abort) {
            unpend(&self.used, rest.len());
            let key = self.slots[slot]
                .key
                .as_ref()
                .expect("an in-flight key has an entry");
            self.returned
                .extend(rest.drain(..).map(|(seq, item)| (seq, key.clone(), item)));
        } else {
            let entry = self.entry(slot);
            debug_assert!(entry.in_flight > 0 && !entry.in_ready);
            for x in rest.drain(..).rev() {
                entry.items.push_front(x);
            }
        }
    }

    /// Wakes an idle worker for a ready key, unless enough workers were
    /// woken already and have not run yet, or are spinning (each takes a
    /// ready key when it runs), so a fast producer does not wake a worker
    /// per item.
    fn wake_worker(&mut self, wakes: &mut Wakeups) {
        if self.ready.len() > self.woken + self.spinning + self.looking {
            if let Some(w) = self.idle.pop() {
                self.woken += 1;
                wakes.push(Some(w));
            }
        }
    }

    fn wake_all_workers(&mut self, wakes: &mut Wakeups) {
        for w in self.idle.take_all() {
            self.woken += 1;
            wakes.push(Some(w));
        }
    }

    /// A worker starts a poll: forget its old registration, and if it had
    /// been woken (or was spinning), it no longer counts as on its way.
    pub(crate) fn worker_polled(&mut self, waiter: &mut Option<u64>, spun: &mut bool) {
        if std::mem::take(spun) {
            self.spinning -= 1;
        }
        if let Some(id) = waiter.take() {
            if !self.idle.remove(id) {
                self.woken = self.woken.saturating_sub(1);
            }
        }
    }

    /// A worker that found nothing to do yields instead of parking, and
    /// is sure to look again ([`worker_polled`](Self::worker_polled) with
    /// `spun` set ends it). Meanwhile it counts as on its way, so adds do not
    /// wake a parked worker for what this one will take.
    pub(crate) fn worker_spin(&mut self, spun: &mut bool) {
        debug_assert!(!*spun);
        self.spinning += 1;
        *spun = true;
    }

    /// Parks a worker that found nothing to do, unless adds came since its
    /// look (then it returns `false` and the worker looks again). A parked
    /// worker marks the intake, so the next add wakes one.
    pub(crate) fn worker_park(
        &mut self,
        waiter: &mut Option<u64>,
        waker: &std::task::Waker,
        intake: &Mutex<Intake<K, T>>,
    ) -> bool {
        {
            let mut intake = intake.lock();
            if !intake.items.is_empty() {
                return false;
            }
            intake.parked = true;
        }
        // Under the state lock still: an add that saw the mark wakes a
        // worker under it too, so after this registration.
        self.worker_waits += 1;
        self.idle.register(waiter, waker);
        true
    }

    fn exit(&mut self, wakes: &mut Wakeups) -> Take {
        self.workers_live -= 1;
        if !self.ready.is_empty() {
            // This worker's wake-up may have been meant for a ready key.
            self.wake_worker(wakes);
        }
        if self.workers_live == 0 {
            if self.closing.is_some() {
                wakes.extend(self.done.take_all());
            }
            // Shrunk to nothing is refused by the API; closing is the only way here.
        } else if self.closing.is_some() && self.pending() == 0 && self.in_flight == 0 {
            self.wake_all_workers(wakes);
        }
        Take::Exit
    }

    /// Records what a worker did with its batch: for each run, in order,
    /// `handled + panicked` items ran and the next `left` items of `items`
    /// were not started. Those go back to the front of the key's queue (or,
    /// after an abort, to the items handed back); a key none of whose items
    /// ran gets its place at the front of the ready keys back.
    pub(crate) fn finish(
        &mut self,
        dones: &mut Vec<Done<K>>,
        items: &mut Batch<T>,
        wakes: &mut Wakeups,
    ) {
        let per_key = self.per_key;
        // Runs none of whose items ran come last (a worker runs its batch in
        // order and hands back the rest when it stops).
        let mut untouched = 0;
        // Pending items that started, or left after an abort: one count at
        // the end.
        let mut gone = 0;
        for Done {
            key,
            slot,
            handled,
            panicked,
            left,
            counted,
        } in dones.drain(..)
        {
            self.handled += handled;
            self.panicked += panicked;
            self.in_flight -= 1;
            let ran = (handled + panicked) as usize;
            debug_assert!(ran == 0 || untouched == 0, "untouched runs come last");
            debug_assert!(ran >= counted, "only items that ran are counted");
            gone += ran - counted;
            let entry = &mut self.slots[slot];
            debug_assert!(entry.key.is_some(), "an in-flight key has an entry");
            entry.in_flight -= 1;
            if left > 0 {
                if self.closing == Some(Closing::Abort) {
                    // `close` already emptied the queues: hand these back too.
                    gone += left;
                    self.returned.extend(
                        items
                            .drain(..left)
                            .map(|(seq, item)| (seq, key.clone(), item)),
                    );
                } else {
                    for x in items.drain(..left).rev() {
                        entry.items.push_front(x);
                    }
                }
            }
            if entry.items.is_empty() {
                if entry.in_flight == 0 {
                    self.free_slot(slot);
                    self.maybe_shrink();
                }
            } else if !entry.in_ready && entry.in_flight < per_key {
                entry.in_ready = true;
                self.ready.push_back(slot);
                if ran == 0 {
                    untouched += 1;
                }
                self.wake_worker(wakes);
            }
        }
        debug_assert!(items.is_empty(), "every item reported");
        unpend(&self.used, gone);
        // Keys handed back untouched go back to the front, in their order.
        self.ready.rotate_right(untouched);
        if self.closing.is_some() && self.pending() == 0 && self.in_flight == 0 {
            // Drained: every idle worker may exit now.
            self.wake_all_workers(wakes);
        }
    }

    /// Collects the items an abort took out, in add order.
    pub(crate) fn take_returned(&mut self) -> Vec<(u64, K, T)> {
        let mut out = std::mem::take(&mut self.returned);
        out.sort_unstable_by_key(|(seq, _, _)| *seq);
        out
    }

    /// Gives memory back once the tables are mostly empty: below 1/16 of
    /// the slab's slots live, free slots drop their buffers, the free slots
    /// at the end go, and the index and ready queue shrink to a quarter
    /// (the wide hysteresis keeps a steady churn of keys from reallocating
    /// over and over). Slots in use cannot move (workers and the ready queue
    /// name them), so a slab kept long by a live key at its end waits for
    /// that key; a pass runs again only once the live keys halved, or after
    /// they grew back above a quarter of the slots.
    fn maybe_shrink(&mut self) {
        let live = self.index.len();
        if self.slots.len() <= SHRINK_ABOVE
            || live * 16 >= self.slots.len()
            || live >= self.shrink_mark
        {
            return;
        }
        self.shrink_mark = live / 2;
        for &slot in &self.free {
            self.slots[slot].items = VecDeque::new();
        }
        while self.slots.last().is_some_and(|e| e.key.is_none()) {
            self.slots.pop();
        }
        let len = self.slots.len();
        self.free.retain(|slot| *slot < len);
        self.slots.shrink_to(len.max(SHRINK_ABOVE));
        self.free.shrink_to(self.free.len().max(SHRINK_ABOVE));
        let cap = self.index.capacity();
        if cap > SHRINK_ABOVE && live * 16 < cap {
            let slots = &self.slots;
            self.index.shrink_to(cap / 4, |&s| slots[s].hash);
        }
        let cap = self.ready.capacity();
        if cap > SHRINK_ABOVE && self.ready.len() * 16 < cap {
            self.ready.shrink_to(cap / 4);
        }
    }

    /// Closes intake. With `Abort`, takes every pending item out of the
    /// queues, to the items handed back; items workers took but had not
    /// started join them later (through [`finish`](Self::finish) and
    /// [`hand_back_rest`](Self::hand_back_rest)). Nothing leaves the pool
    /// before [`take_returned`](Self::take_returned).
    pub(crate) fn close(
        &mut self,
        how: Closing,
        intake: &Mutex<Intake<K, T>>,
        wakes: &mut Wakeups,
    ) {
        match (self.closing, how) {
            (Some(Closing::Abort), _) => {}
            (_, Closing::Drain) => {
                self.closing = Some(Closing::Drain);
                intake.lock().closing = Some(Closing::Drain);
            }
            (_, Closing::Abort) => {
                self.closing = Some(Closing::Abort);
                let before = self.returned.len();
                let taken = &mut self.returned;
                {
                    let mut intake = intake.lock();
                    intake.closing = Some(Closing::Abort);
                    taken.extend(
                        intake
                            .items
                            .drain(..)
                            .map(|(seq, _, key, item)| (seq, key, item)),
                    );
                }
                taken.reserve(self.used.load(Ordering::Acquire));
                let mut idle = Vec::new();
                for (slot, entry) in self.slots.iter_mut().enumerate() {
                    let Some(key) = &entry.key else { continue };
                    for (seq, item) in entry.items.drain(..) {
                        taken.push((seq, key.clone(), item));
                    }
                    entry.in_ready = false;
                    if entry.in_flight == 0 {
                        idle.push(slot);
                    }
                }
                for slot in idle {
                    self.free_slot(slot);
                }
                self.ready.clear();
                // Items in workers' batches stay pending until handed back.
                unpend(&self.used, self.returned.len() - before);
                self.maybe_shrink();
            }
        }
        if self.pending() == 0 && self.in_flight == 0 {
            self.wake_all_workers(wakes);
        }
        if self.workers_live == 0 || (how == Closing::Abort && self.holding == 0) {
            wakes.extend(self.done.take_all());
        }
    }

    /// Changes the number of workers; returns how many new ones to spawn.
    pub(crate) fn resize(&mut self, workers: usize, wakes: &mut Wakeups) -> usize {
        self.workers_target = workers;
        if self.closing.is_some() {
            return 0;
        }
        if workers > self.workers_live {
            let spawn = workers - self.workers_live;
            self.workers_live = workers;
            spawn
        } else {
            // Idle workers above the target wake up and exit.
            self.wake_all_workers(wakes);
            0
        }
    }
}

#[cfg(all(test, not(loom)))]
mod slab_tests {
    use std::hash::BuildHasher;

    use super::*;

    /// A waker that counts its wake-ups.
    fn counting_waker() -> (
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        std::task::Waker,
    ) {
        struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            n.clone(),
            std::task::Waker::from(std::sync::Arc::new(Count(n))),
        )
    }

    /// An add as the pool makes it: into the intake, then a wake-up if a
    /// worker parked with nothing to do.
    fn add(st: &mut State<u32, u32>, intake: &Mutex<Intake<u32, u32>>, key: u32, item: u32) {
        let used = st.used();
        let hash = st.hasher().hash_one(key);
        let wake = intake
            .lock()
            .push(hash, key, item, false, st.capacity(), &used)
            .unwrap();
        if wake {
            let mut wakes = Wakeups::default();
            st.wake_for_intake(&mut wakes);
            wakes.wake();
        }
    }

    /// A worker's look with handlers that complete: take a batch of many.
    fn look(
        st: &mut State<u32, u32>,
        intake: &Mutex<Intake<u32, u32>>,
        runs: &mut Vec<Run<u32>>,
        items: &mut Batch<u32>,
        wakes: &mut Wakeups,
    ) -> Take {
        st.take(runs, items, true, intake, wakes)
    }

    /// Reports every run of a batch as run to the end.
    fn report_all(st: &mut State<u32, u32>, runs: Vec<Run<u32>>, items: &mut Batch<u32>) {
        let mut dones: Vec<Done<u32>> = runs
            .into_iter()
            .enumerate()
            .map(|(i, Run { key, slot, len })| Done {
                key,
                slot,
                handled: len as u64,
                panicked: 0,
                left: 0,
                counted: usize::from(i == 0),
            })
            .collect();
        items.clear();
        st.finish(&mut dones, items, &mut Wakeups::default());
    }

    /// Two workers find nothing: one parks, the other spins. Then `keys`
    /// adds of as many keys, and the spinner looks again. Returns the parked
    /// worker's wake-ups and the runs the spinner took.
    fn a_spinner_looks_after_adds(keys: u32) -> (usize, usize) {
        let mut st: State<u32, u32> = State::new(100, 1, 2);
        let intake = Mutex::new(Intake::new());
        st.workers_live = 2;
        let (parked_wakes, parked) = counting_waker();
        let (mut parked_id, mut parked_spun) = (None, false);
        let (mut spinner_id, mut spun) = (None, false);
        let mut wakes = Wakeups::default();
        let (mut runs, mut items) = (Vec::new(), Batch::new());
        st.worker_polled(&mut parked_id, &mut parked_spun);
        assert_eq!(
            look(&mut st, &intake, &mut runs, &mut items, &mut wakes),
            Take::Wait
        );
        assert!(st.worker_park(&mut parked_id, &parked, &intake));
        st.worker_polled(&mut spinner_id, &mut spun);
        assert_eq!(
            look(&mut st, &intake, &mut runs, &mut items, &mut wakes),
            Take::Wait
        );
        st.worker_spin(&mut spun);
        // Adds: the spinning worker will look at the intake, so nobody is woken.
        for k in 0..keys {
            add(&mut st, &intake, k, k);
        }
        assert_eq!(parked_wakes.load(std::sync::atomic::Ordering::SeqCst), 0);
        st.worker_polled(&mut spinner_id, &mut spun);
        assert!(!spun);
        assert_eq!(st.spinning, 0);
        assert_eq!(
            look(&mut st, &intake, &mut runs, &mut items, &mut wakes),
            Take::Job
        );
        std::mem::take(&mut wakes).wake();
        (
            parked_wakes.load(std::sync::atomic::Ordering::SeqCst),
            runs.len(),
        )
    }

    #[test]
    fn a_spinning_worker_saves_waking_a_parked_one() {
        // One key: the spinner drains it and takes it itself.
        assert_eq!(a_spinner_looks_after_adds(1), (0, 1));
        // Two ready keys are more than it takes: it wakes the parked worker
        // for the other, and leaves that one for it.
        assert_eq!(a_spinner_looks_after_adds(2), (1, 1));
    }

    #[test]
    fn an_add_wakes_a_parked_worker_once_and_a_worker_parks_only_on_an_empty_intake() {
        let mut st: State<u32, u32> = State::new(100, 1, 1);
        let intake = Mutex::new(Intake::new());
        st.workers_live = 1;
        let (wakes_seen, waker) = counting_waker();
        let (mut id, mut spun) = (None, false);
        let mut wakes = Wakeups::default();
        let (mut runs, mut items) = (Vec::new(), Batch::new());
        st.worker_polled(&mut id, &mut spun);
        assert_eq!(
            look(&mut st, &intake, &mut runs, &mut items, &mut wakes),
            Take::Wait
        );
        // An add between the look and the park: the worker must not park.
        add(&mut st, &intake, 1, 1);
        assert!(!st.worker_park(&mut id, &waker, &intake));
        assert_eq!(st.worker_waits, 0, "not parked");
        assert_eq!(
            look(&mut st, &intake, &mut runs, &mut items, &mut wakes),
            Take::Job
        );
        report_all(&mut st, std::mem::take(&mut runs), &mut items);
        // Nothing left: it parks; many adds wake it once.
        st.worker_polled(&mut id, &mut spun);
        assert_eq!(
            look(&mut st, &intake, &mut runs, &mut items, &mut wakes),
            Take::Wait
        );
        assert!(st.worker_park(&mut id, &waker, &intake));
        for i in 0..10 {
            add(&mut st, &intake, i, i);
        }
        assert_eq!(wakes_seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(st.pending(), 10);
        assert_eq!(st.keys(), 0, "still in the intake");
        st.drain(&intake, &mut wakes);
        assert_eq!(st.keys(), 10);
    }

    /// Runs every queued item to completion, one batch at a time.
    fn run_all(st: &mut State<u32, u32>, intake: &Mutex<Intake<u32, u32>>) {
        let mut wakes = Wakeups::default();
        loop {
            let (mut runs, mut items) = (Vec::new(), Batch::new());
            if look(st, intake, &mut runs, &mut items, &mut wakes) != Take::Job {
                return;
            }
            report_all(st, runs, &mut items);
        }
    }

    #[test]
    fn slots_are_reused_and_the_slab_shrinks_once_idle() {
        let mut st: State<u32, u32> = State::new(100_000, 1, 1);
        let intake = Mutex::new(Intake::new());
        st.workers_live = 1;
        let mut wakes = Wakeups::default();
        for k in 0..10_000 {
            add(&mut st, &intake, k, k);
        }
        st.drain(&intake, &mut wakes);
        assert_eq!((st.keys(), st.slots.len()), (10_000, 10_000));
        // One key stays busy at the far end of the slab: its slot cannot move.
        let (mut runs, mut items) = (Vec::new(), Batch::new());
        while st.ready.back() != Some(&9_999) {
            st.ready.rotate_left(1);
        }
        st.ready.rotate_right(1);
        assert_eq!(
            st.take(&mut runs, &mut items, false, &intake, &mut wakes),
            Take::Job
        );
        assert_eq!(runs[0].key, 9_999);
        run_all(&mut st, &intake);
        assert_eq!(st.keys(), 1, "only the busy key has an entry");
        assert_eq!(
            st.slots.len(),
            10_000,
            "the busy key's slot keeps the slab long"
        );
        let buffers = st
            .free
            .iter()
            .filter(|s| st.slots[**s].items.capacity() > 0)
            .count();
        assert!(
            buffers < 8,
            "free slots dropped their buffers: {buffers} kept"
        );
        assert!(
            st.index.capacity() < 10_000 / 4,
            "index shrunk: {}",
            st.index.capacity()
        );
        let mut dones = vec![Done {
            key: 9_999,
            slot: runs[0].slot,
            handled: 1,
            panicked: 0,
            left: 0,
            counted: 1,
        }];
        items.clear();
        st.finish(&mut dones, &mut items, &mut wakes);
        assert_eq!(
            (st.keys(), st.slots.len(), st.free.len()),
            (0, 0, 0),
            "the free slots at the end go"
        );
        // Reuse: a new key takes a free slot, the slab does not grow.
        for round in 0..3 {
            for k in 0..100 {
                add(&mut st, &intake, round * 1000 + k, k);
            }
            st.drain(&intake, &mut wakes);
            assert_eq!(st.slots.len(), 100, "free slots reused");
            run_all(&mut st, &intake);
            assert_eq!(st.keys(), 0);
        }
        assert!(st.slots.iter().all(|e| e.key.is_none()));
    }
}

#[cfg(all(test, not(loom)))]
mod model_tests {
    //! The dispatcher against a simple model: per-key FIFOs, a count of
    //! in-flight batches per key, a global bound, batches that run a prefix
    //! and hand the rest back.

    use std::collections::{BTreeMap, VecDeque};

    use std::hash::BuildHasher;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8, bool),
        /// Take a batch; several keys at once when `.0`.
        Take(bool),
        /// Finish run `.0`: run `.1 % (len + 1)` items of it, the first one
        /// panicking when `.2`, and hand the rest back.
        Finish(usize, usize, bool),
        /// The handler of item `1 + .1 % len` of run `.0` waits: the items
        /// after it go back ([`State::hand_back_rest`]); the run then
        /// finishes only with all its remaining items run.
        Wait(usize, usize),
        Close(bool),
        /// Move the intake into the queues, as `stats` does, and compare
        /// the live keys.
        Stats,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4u8, proptest::bool::weighted(0.1)).prop_map(|(k, h)| Op::Push(k, h)),
            4 => any::<bool>().prop_map(Op::Take),
            4 => (any::<usize>(), any::<usize>(), proptest::bool::weighted(0.1))
                .prop_map(|(i, r, p)| Op::Finish(i, r, p)),
            3 => (any::<usize>(), any::<usize>()).prop_map(|(i, r)| Op::Wait(i, r)),
            1 => any::<bool>().prop_map(Op::Close),
            1 => Just(Op::Stats),
        ]
    }

    /// A taken run in the model: key, the slot `take` named for it, items
    /// with their add order (the first counts as started), and whether its
    /// handler waited.
    type Job = (u8, Slot, Vec<(u64, u32)>, bool, usize);

    #[derive(Default)]
    struct Model {
        queues: BTreeMap<u8, VecDeque<u32>>,
        in_flight: BTreeMap<u8, usize>,
        /// Taken runs: key, slot, items and their add order, whether a
        /// handler waited (so all of them run), and how many of the items
        /// no longer count as pending (the batch's first item, and every
        /// item up to a handler that waited).
        jobs: Vec<Job>,
        /// Items handed back after an abort, not yet collected.
        returned: Vec<(u8, u32)>,
        closing: Option<Closing>,
    }

    impl Model {
        fn pending(&self) -> usize {
            let queued: usize = self.queues.values().map(VecDeque::len).sum();
            let reserved: usize = self
                .jobs
                .iter()
                .map(|(_, _, b, _, counted)| b.len() - *counted)
                .sum();
            queued + reserved
        }
        fn keys(&self) -> usize {
            let mut keys: Vec<u8> = self
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(k, _)| *k)
                .collect();
            keys.extend(
                self.in_flight
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, _)| *k),
            );
            keys.sort_unstable();
            keys.dedup();
            keys.len()
        }
        fn can_start(&self, per_key: usize) -> bool {
            self.queues.iter().any(|(k, q)| {
                !q.is_empty() && self.in_flight.get(k).copied().unwrap_or(0) < per_key
            })
        }
    }

    proptest! {
        #[test]
        fn dispatcher_matches_model(
            capacity in 1..6usize,
            per_key in 1..3usize,
            ops in proptest::collection::vec(op(), 1..160),
        ) {
            let mut st: State<u8, u32> = State::new(capacity, per_key, 1);
            let intake = Mutex::new(Intake::new());
            let used = st.used();
            st.workers_live = 1;
            let mut model = Model::default();
            let mut next = 0u32;
            let mut handled = 0u64;
            let mut panicked = 0u64;
            for op in ops {
                let mut wakes = Wakeups::default();
                match op {
                    Op::Push(k, from_handler) => {
                        let stopped = match model.closing {
                            None => false,
                            Some(Closing::Drain) => !from_handler,
                            Some(Closing::Abort) => true,
                        };
                        let full = !from_handler && model.pending() >= capacity;
                        match intake.lock().push(st.hasher().hash_one(k), k, next, from_handler, capacity, &used) {
                            Ok(_) => {
                                prop_assert!(!stopped && !full);
                                model.queues.entry(k).or_default().push_back(next);
                            }
                            Err((Refused::Stopped, k2, i)) => {
                                prop_assert!(stopped);
                                prop_assert_eq!((k2, i), (k, next));
                            }
                            Err((Refused::Full, k2, i)) => {
                                prop_assert!(full && !stopped);
                                prop_assert_eq!((k2, i), (k, next));
                            }
                        }
                        next += 1;
                    }
                    Op::Take(many) => {
                        let mut runs = Vec::new();
                        let mut batch = Batch::new();
                        match st.take(&mut runs, &mut batch, many, &intake, &mut wakes) {
                            Take::Job => {
                                prop_assert!(!runs.is_empty());
                                prop_assert!(many || (runs.len() == 1 && batch.len() == 1));
                                prop_assert!(batch.len() <= MAX_BATCH && runs.len() <= MAX_KEYS);
                                prop_assert!(batch.iter().zip(batch.iter().skip(1)).all(|(a, b)| a.0 != b.0));
                                for (run_no, Run { key: k, slot, len }) in runs.into_iter().enumerate() {
                                    let taken: Vec<(u64, u32)> = batch.drain(..len).collect();
                                    let q = model.queues.get_mut(&k).expect("key has a queue");
                                    prop_assert!(len >= 1 && len <= q.len());
                                    if per_key > 1 {
                                        prop_assert_eq!(len, 1);
                                    }
                                    let head: Vec<u32> = q.drain(..len).collect();
                                    let items: Vec<u32> = taken.iter().map(|(_, i)| *i).collect();
                                    prop_assert_eq!(&items, &head, "not the head of key {}", k);
                                    prop_assert!(taken.windows(2).all(|w| w[0].0 < w[1].0));
                                    let n = model.in_flight.entry(k).or_default();
                                    *n += 1;
                                    prop_assert!(*n <= per_key);
                                    prop_assert!(
                                        model.jobs.iter().all(|j| j.0 == k || j.1 != slot),
                                        "a slot names one key at a time"
                                    );
                                    model.jobs.push((k, slot, taken, false, usize::from(run_no == 0)));
                                }
                                prop_assert!(batch.is_empty());
                            }
                            Take::Wait => {
                                prop_assert!(batch.is_empty() && runs.is_empty());
                                prop_assert!(!model.can_start(per_key));
                                prop_assert!(model.closing.is_none() || !model.jobs.is_empty() || model.pending() > 0);
                            }
                            Take::Exit => {
                                prop_assert!(batch.is_empty() && runs.is_empty());
                                prop_assert!(model.closing.is_some() && model.jobs.is_empty() && model.pending() == 0);
                                st.workers_live = 1; // keep the single worker for the rest of the run
                            }
                        }
                    }
                    Op::Finish(i, r, first_panics) if !model.jobs.is_empty() => {
                        let (k, slot, items, waited, counted) = model.jobs.swap_remove(i % model.jobs.len());
                        // 0..=len items ran; 0 hands the whole run back (never
                        // the batch's first run: a worker always starts it).
                        let ran = if waited {
                            items.len()
                        } else if counted > 0 {
                            1 + r % items.len()
                        } else {
                            r % (items.len() + 1)
                        };
                        let p = u64::from(first_panics && ran > 0);
                        let mut left: Batch<u32> = items[ran..].iter().copied().collect();
                        let mut dones = vec![Done {
                            key: k,
                            slot,
                            handled: ran as u64 - p,
                            panicked: p,
                            left: items.len() - ran,
                            counted,
                        }];
                        st.finish(&mut dones, &mut left, &mut wakes);
                        prop_assert!(left.is_empty() && dones.is_empty(), "finish takes everything");
                        handled += ran as u64 - p;
                        panicked += p;
                        *model.in_flight.get_mut(&k).unwrap() -= 1;
                        if model.closing == Some(Closing::Abort) {
                            model.returned.extend(items[ran..].iter().map(|(_, i)| (k, *i)));
                        } else {
                            let q = model.queues.entry(k).or_default();
                            for (_, i) in items[ran..].iter().rev() {
                                q.push_front(*i);
                            }
                        }
                    }
                    Op::Finish(..) => {}
                    Op::Wait(i, r) if !model.jobs.is_empty() => {
                        let i = i % model.jobs.len();
                        let (k, slot, items, waited, counted) = &mut model.jobs[i];
                        if !*waited {
                            *waited = true;
                            let started = 1 + r % items.len();
                            let rest_items = items.split_off(started);
                            let mut rest: Batch<u32> = rest_items.iter().copied().collect();
                            st.hand_back_rest(*slot, &mut rest, started - *counted);
                            *counted = started;
                            prop_assert!(rest.is_empty(), "hand_back_rest takes everything");
                            if model.closing == Some(Closing::Abort) {
                                model.returned.extend(rest_items.iter().map(|(_, i)| (*k, *i)));
                            } else {
                                let q = model.queues.entry(*k).or_default();
                                for (_, i) in rest_items.iter().rev() {
                                    q.push_front(*i);
                                }
                            }
                        }
                    }
                    Op::Wait(..) => {}
                    Op::Stats => {
                        st.drain(&intake, &mut wakes);
                        prop_assert_eq!(st.keys(), model.keys(), "entries only for keys with work");
                    }
                    Op::Close(abort) => {
                        let how = if abort { Closing::Abort } else { Closing::Drain };
                        st.close(how, &intake, &mut wakes);
                        if abort || model.closing == Some(Closing::Abort) {
                            // The queues are empty after the first abort.
                            model.closing = Some(Closing::Abort);
                            for (k, q) in model.queues.iter_mut() {
                                model.returned.extend(q.drain(..).map(|i| (*k, i)));
                            }
                        } else {
                            model.closing = Some(Closing::Drain);
                        }
                    }
                }
                prop_assert_eq!(st.pending(), model.pending());
                prop_assert_eq!(st.aborted(), model.returned.len(), "abort keeps what it took");
                prop_assert_eq!(st.in_flight(), model.jobs.len());
                prop_assert_eq!(st.handled, handled);
                prop_assert_eq!(st.panicked, panicked);
            }
            let returned = st.take_returned();
            prop_assert!(returned.windows(2).all(|w| w[0].0 < w[1].0), "in add order");
            let returned: Vec<(u8, u32)> = returned.into_iter().map(|(_, k, i)| (k, i)).collect();
            // Items are numbered in add order.
            let mut expected = std::mem::take(&mut model.returned);
            expected.sort_unstable_by_key(|(_, i)| *i);
            prop_assert_eq!(returned, expected);
            prop_assert_eq!(st.aborted(), 0);
        }
    }
}
