//! A keyed, ordered worker pool.
//!
//! [`KeyedPool`] runs an async handler over items that carry a key, with a
//! fixed (resizable) number of worker tasks.
//!
//! # Guarantees
//!
//! * **Exactly once.** Every item that was accepted (an `add` that returned
//!   `Ok`) is handed to the handler exactly once, unless [`StopMode::Abort`]
//!   hands it back to the caller instead.
//! * **In order per key.** Items of one key start in the order they were
//!   added, and with the default per-key concurrency of 1 one starts only after
//!   the previous one finished. With [`Builder::per_key_concurrency`] `c > 1`,
//!   up to `c` items of a key run at once; they still *start* in order.
//! * **No head-of-line blocking.** A busy key never holds up another key: a
//!   key occupies at most `c` workers, and workers pick keys round-robin.
//! * **Nothing kept for idle keys.** A key's entry exists only while it has
//!   pending or in-flight items ([`Stats::keys`] counts them). Entries live
//!   in a table of slots as long as the most keys live at once (about the
//!   capacity plus the workers); a free slot belongs to no key and keeps at
//!   most a small empty queue for the next one, and the table shrinks again
//!   once mostly empty.
//!
//! # Dispatch
//!
//! Each key has its own FIFO; a queue of *ready keys* (keys with pending items
//! and a free concurrency slot) feeds the workers. No journal is scanned, so
//! a backlog of 100,000 items on one hot key costs the other keys nothing: a
//! cold key waits behind at most the other ready keys, never behind the hot
//! key's backlog.
//!
//! An add touches none of that: it hashes the key and pushes the item onto
//! an *intake* vector behind a lock of its own, held for the push (O(1),
//! amortised). Workers move the intake into the keys' queues in bulk when
//! they look for work, under the lock of the queues, which producers take
//! only to wake a parked worker (a producer waiting for room waits on the
//! intake's lock too), so a fast producer and busy workers do not contend
//! item by item.
//!
//! Workers take work in *batches*, one lock for many items: with the
//! default per-key concurrency of 1 a worker takes the queued items of the
//! next ready key (and, while its handlers finish without waiting, of more
//! ready keys, leaving one for each other worker already woken), up to
//! 64 items, and runs them one after the other. Three rules keep batches from
//! costing anything but locks:
//!
//! * **A time slice.** After about 50 µs (and at least two items) the worker
//!   stops and hands back what it did not start: the rest of a key's items go
//!   back to the front of its queue, the key to the back of the ready keys,
//!   so a key with a long queue takes turns with the others.
//! * **Waiting hands back.** When a handler has to wait, the worker first
//!   reports the keys it finished and hands back every item it had not
//!   started: the keys it had not reached, so no key ever waits on another
//!   key's handler, and the rest of the waiting handler's own key (back to
//!   the front of its queue; the key stays busy until the handler returns),
//!   so a stuck handler holds nothing but its own item. Until one of its
//!   handlers finishes without waiting, the worker then takes one item at a
//!   time.
//! * **Abort hands back.** After [`StopMode::Abort`] a worker starts nothing
//!   more from its batch and the rest is returned by [`KeyedPool::stop`].
//!
//! Items of one key still run one at a time and in order. With a per-key
//! concurrency above 1 a batch is a single item.
//!
//! A worker that finds nothing to do yields to the runtime a few times
//! (tokio's `yield_now`: every other ready task goes first) and looks
//! again before it parks. Meanwhile an add does not wake a parked worker
//! for the key the spinning one will take, so a producer that keeps the
//! pool nearly empty costs few wake-ups, and the worker's thread does not
//! go to sleep (and have to be woken, tens of µs on a VM) between items.
//! [`Stats::worker_waits`] counts the parks.
//!
//! # Back-pressure
//!
//! At most [`capacity`](Builder::capacity) items are *pending* (accepted, not
//! yet started; the items of a worker's batch after its first count until
//! the worker reports them, so items it hands back unstarted never leave the
//! count). [`add`](KeyedPool::add) waits for room;
//! [`try_add`](KeyedPool::try_add) returns the item in [`TryAddError::Full`].
//! Producers blocked in `add` are woken once an eighth of the capacity is
//! free, so a woken producer adds a run of items rather than one, and for
//! any free slot when a worker stops making room (it parks, or its handler
//! has to wait), so a producer never waits on room nobody will report. A
//! newly arriving `add` may take the room first: there is no FIFO among
//! blocked producers.
//!
//! # Re-entrant adds
//!
//! A handler may add to its own pool through an [`Adder`] (see
//! [`Builder::build_with`]). An add made *from inside one of this pool's
//! handlers* is admitted at once, even above the capacity, so a handler can
//! never wait on itself; the bound applies to outside producers. (The check
//! uses a tokio task-local: tasks a handler spawns count as outside.)
//!
//! # Panics
//!
//! A handler that panics (while being called or while being polled) is
//! contained: the item counts as done (in [`Stats::panicked`]), the key moves
//! on to its next item, the worker keeps going, and the
//! [`on_panic`](Builder::on_panic) callback receives a [`HandlerPanic`].
//!
//! # Stopping
//!
//! [`stop`](KeyedPool::stop) closes intake and waits until every worker has
//! exited. [`StopMode::Drain`] lets the workers handle everything pending
//! first; [`StopMode::Abort`] returns what is pending, in add order (hence in
//! order per key), and only waits for the items already in flight. Dropping
//! the last [`KeyedPool`] handle starts a drain without waiting for it.
//!
//! An accepted item never vanishes on the way out. What an abort takes out
//! stays in the pool until a `stop` returns it: a `stop` given up on (its
//! future dropped, say by a timeout) leaves the items for the next `stop`,
//! and [`Stats::aborted`] counts them meanwhile. A handler that never
//! returns keeps `stop` waiting; [`stop_timeout`](KeyedPool::stop_timeout)
//! bounds the wait, aborting at the deadline and returning every item that
//! has not started (a stuck handler holds only its own item, see
//! [Dispatch](self#dispatch)).
//!
//! # Feeding from a stream
//!
//! [`run`](KeyedPool::run) adds every `(key, item)` a [`Stream`] yields, with
//! back-pressure, so a subscription can feed the pool directly:
//! `pool.run(subscription.map(|event| (event.key(), event)))`.
//!
//! # Examples
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use snapstream::workpool::{KeyedPool, StopMode};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let pool = KeyedPool::builder()
//!     .workers(2)
//!     .build(move |key: &'static str, n: u32| {
//!         let log = log.clone();
//!         async move { log.lock().unwrap().push((key, n)) }
//!     })
//!     .unwrap();
//! let events = futures::stream::iter([("qa", 1), ("qb", 1), ("qa", 2), ("qa", 3), ("qb", 2)]);
//! pool.run(events).await.unwrap();
//! pool.stop(StopMode::Drain).await;
//!
//! let seen = seen.lock().unwrap();
//! let qa: Vec<u32> = seen.iter().filter(|(k, _)| *k == "qa").map(|(_, n)| *n).collect();
//! assert_eq!(qa, [1, 2, 3]);
//! # }
//! ```

mod error;
mod state;
mod wait;

#[cfg(all(test, loom))]
mod tests;

use std::any::Any;
use std::fmt;
use std::future::{poll_fn, Future};
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::task::Poll;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};

pub use error::{BuildError, StopTimeoutError, StoppedError, TryAddError};

use crate::sync::{Arc, AtomicBool, AtomicUsize, Ordering, PoolMutex as Mutex};
use state::{Batch, Closing, Done, Intake, Refused, Room, Run, Slot, State, Take};
use wait::Wakeups;

/// Default number of workers.
pub const DEFAULT_WORKERS: usize = 4;
/// Default bound on pending items.
pub const DEFAULT_CAPACITY: usize = 1024;
/// Default number of items of one key that may run at once.
pub const DEFAULT_PER_KEY_CONCURRENCY: usize = 1;

#[cfg(not(loom))]
tokio::task_local! {
    /// The id of the pool whose handler the current task is running.
    static IN_HANDLER: u64;
}

static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How [`KeyedPool::stop`] treats pending items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopMode {
    /// Handle everything pending, then stop.
    Drain,
    /// Hand back everything pending (in add order); finish only what is in flight.
    Abort,
}

impl From<StopMode> for Closing {
    fn from(mode: StopMode) -> Self {
        match mode {
            StopMode::Drain => Closing::Drain,
            StopMode::Abort => Closing::Abort,
        }
    }
}

/// A handler panic, as given to the [`on_panic`](Builder::on_panic) callback.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HandlerPanic<K> {
    /// The key of the item whose handler panicked.
    pub key: K,
    /// The panic message (`"<non-string panic payload>"` when it was not a string).
    pub message: String,
}

/// A snapshot of the pool's counters.
///
/// Workers report what they ran when they are done with a batch (see
/// [Dispatch](self#dispatch)), so during a batch its items may still count as
/// pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Items accepted and not yet started.
    pub pending: usize,
    /// Keys a worker has taken items of and not yet reported (one per item
    /// with a per-key concurrency above 1). While a handler waits, its
    /// worker holds only that handler's key and item.
    pub in_flight: usize,
    /// Keys with pending or in-flight items (the per-key entries held in memory).
    pub keys: usize,
    /// Items [`StopMode::Abort`] took out of the pool (they never started)
    /// that no [`stop`](KeyedPool::stop) has returned yet: a `stop` given up
    /// on (its future dropped) leaves them for the next one.
    pub aborted: usize,
    /// Items whose handler returned.
    pub handled: u64,
    /// Items whose handler panicked.
    pub panicked: u64,
    /// Live workers.
    pub workers: usize,
    /// Calls to [`add`](KeyedPool::add) that had to wait for room (the
    /// pool was at capacity when they first tried), since it was built.
    pub add_waits: u64,
    /// Batches the workers took (one lock each; see [Dispatch](self#dispatch)).
    pub batches: u64,
    /// Times a worker found nothing to do and parked until woken.
    pub worker_waits: u64,
}

type PanicHook<K> = std::sync::Arc<dyn Fn(HandlerPanic<K>) + Send + Sync>;
type Spawner<K, T> = std::sync::Arc<dyn Fn(Arc<Shared<K, T>>) + Send + Sync>;

/// Keeps what it holds on a cache line (two, for the adjacent-line
/// prefetcher) of its own, so adds and the workers' bookkeeping do not write
/// to the same line.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// What adds touch (see `state`'s [Intake](state#intake)), and the one
/// place producers wait for room (see `state`'s [`Room`]).
struct Front<K, T> {
    intake: Mutex<Intake<K, T>>,
    /// Pending items (the state's count).
    used: Arc<AtomicUsize>,
    capacity: usize,
    room: Room,
}

impl<K, T> Front<K, T> {
    fn free(&self) -> usize {
        self.capacity
            .saturating_sub(self.used.load(Ordering::SeqCst))
    }

    /// Registers a producer that found the pool full, then looks again:
    /// `true` when it must try again at once (room came, or a `stop` closed
    /// intake and woke the list before this registration).
    fn wait_for_room(&self, id: &mut Option<u64>, waker: &std::task::Waker, first: bool) -> bool {
        let mut intake = self.intake.lock();
        intake.room.register(id, waker);
        self.room.wanted.store(true, Ordering::SeqCst);
        if intake.is_closed() || self.free() > 0 {
            return true;
        }
        if first {
            intake.add_waits += 1;
        }
        false
    }

    /// A producer leaves the room list: done, or gone. One that is gone
    /// passes on a wake-up it was given and did not use.
    fn leave_room(&self, id: u64, gone: bool, wakes: &mut Wakeups) {
        let mut intake = self.intake.lock();
        let popped = !intake.room.remove(id);
        let pass_on = if gone && popped {
            self.free().min(1)
        } else {
            0
        };
        intake.wake_room(pass_on, &self.room.wanted, wakes);
    }

    /// Wakes producers waiting for room, if there is enough of it: a free
    /// `Room::margin`, or with `any` (the caller stops making room) a free
    /// slot.
    fn wake_for_room(&self, any: bool, wakes: &mut Wakeups) {
        if !self.room.wanted.load(Ordering::SeqCst) {
            return;
        }
        let free = self.free();
        if free == 0 || (!any && free < Room::margin(self.capacity)) {
            return;
        }
        self.intake.lock().wake_room(free, &self.room.wanted, wakes);
    }

    /// Wakes every producer waiting for room (intake is closed).
    fn wake_all_for_room(&self, wakes: &mut Wakeups) {
        self.intake
            .lock()
            .wake_room(usize::MAX, &self.room.wanted, wakes);
    }
}

pub(crate) struct Shared<K, T> {
    front: Padded<Front<K, T>>,
    /// The state's key hasher (adds hash before they lock anything).
    hasher: crate::FastHasher,
    state: Mutex<State<K, T>>,
    /// Live [`KeyedPool`] handles; the last one dropped starts a drain.
    handles: AtomicUsize,
    /// Set once stopped with [`StopMode::Abort`]: workers stop their batch
    /// and hand back what they did not start.
    aborting: AtomicBool,
    on_panic: Option<PanicHook<K>>,
    id: u64,
}

impl<K: Hash + Eq + Clone, T> Shared<K, T> {
    pub(crate) fn new(
        capacity: usize,
        per_key: usize,
        on_panic: Option<PanicHook<K>>,
    ) -> Arc<Self> {
        let state = State::new(capacity, per_key, 0);
        Arc::new(Shared {
            front: Padded(Front {
                intake: Mutex::new(Intake::new()),
                used: state.used(),
                capacity: state.capacity(),
                room: Room::default(),
            }),
            hasher: state.hasher(),
            state: Mutex::new(state),
            handles: AtomicUsize::new(1),
            aborting: AtomicBool::new(false),
            on_panic,
            id: NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn intake(&self) -> &Mutex<Intake<K, T>> {
        &self.front.intake
    }

    /// Whether the current task runs one of this pool's handlers.
    fn in_own_handler(&self) -> bool {
        #[cfg(not(loom))]
        {
            IN_HANDLER.try_with(|id| *id == self.id).unwrap_or(false)
        }
        #[cfg(loom)]
        {
            false
        }
    }

    /// Admits an item to the intake, and wakes a worker if one parked with
    /// nothing to do (see `state`'s [Intake](state#intake)).
    fn push(&self, key: K, item: T, from_handler: bool) -> Result<(), (Refused, K, T)> {
        let hash = self.hasher.hash_one(&key);
        let front = &*self.front;
        let wake =
            front
                .intake
                .lock()
                .push(hash, key, item, from_handler, front.capacity, &front.used)?;
        if wake {
            let mut wakes = Wakeups::default();
            self.state.lock().wake_for_intake(&mut wakes);
            wakes.wake();
        }
        Ok(())
    }

    fn try_add(&self, key: K, item: T) -> Result<(), TryAddError<K, T>> {
        let from_handler = self.in_own_handler();
        self.push(key, item, from_handler)
            .map_err(|(why, k, t)| match why {
                Refused::Full => TryAddError::Full(k, t),
                Refused::Stopped => TryAddError::Stopped(k, t),
            })
    }

    pub(crate) async fn add(&self, key: K, item: T) -> Result<(), StoppedError<K, T>> {
        let from_handler = self.in_own_handler();
        let mut slot = Some((key, item));
        let mut guard = RoomWaiter {
            shared: self,
            id: None,
        };
        let mut waited = false;
        poll_fn(|cx| loop {
            let (key, item) = slot.take().expect("polled after completion");
            let res = match self.push(key, item, from_handler) {
                Ok(()) => Ok(()),
                Err((Refused::Stopped, key, item)) => Err(StoppedError { key, item }),
                Err((Refused::Full, key, item)) => {
                    slot = Some((key, item));
                    if self.front.wait_for_room(&mut guard.id, cx.waker(), !waited) {
                        continue;
                    }
                    waited = true;
                    return Poll::Pending;
                }
            };
            if let Some(id) = guard.id.take() {
                self.front.leave_room(id, false, &mut Wakeups::default());
            }
            return Poll::Ready(res);
        })
        .await
    }

    /// A worker's handler has to wait: takes the report of the runs done
    /// and not started (`dones`, with the latter's items in `left`) and the
    /// items of the waiting handler's run after it (`rest`), lets the run's
    /// `started` items that still count as pending leave the count, and
    /// releases the batch, all under one lock (see [`State::finish`],
    /// [`State::hand_back_rest`], [`State::release`]).
    fn hand_back(
        &self,
        dones: &mut Vec<Done<K>>,
        left: &mut Batch<T>,
        slot: Slot,
        rest: &mut Batch<T>,
        started: usize,
    ) {
        let mut wakes = Wakeups::default();
        {
            let mut st = self.state.lock();
            if !dones.is_empty() {
                st.finish(dones, left, &mut wakes);
            }
            st.hand_back_rest(slot, rest, started);
            st.release(&mut wakes);
        }
        // The handler waits: this worker makes no room meanwhile.
        self.front.wake_for_room(true, &mut wakes);
        wakes.wake();
    }

    /// A handler of a one-item batch has to wait: the worker makes no room
    /// meanwhile, so producers waiting for any free slot are woken now.
    fn handler_waits(&self) {
        let mut wakes = Wakeups::default();
        self.front.wake_for_room(true, &mut wakes);
        wakes.wake();
    }

    fn close(&self, how: Closing) {
        let mut wakes = Wakeups::default();
        {
            let mut st = self.state.lock();
            if how == Closing::Abort {
                self.aborting.store(true, Ordering::Relaxed);
            }
            st.close(how, self.intake(), &mut wakes);
        }
        // Every producer waiting for room: they find intake closed.
        self.front.wake_all_for_room(&mut wakes);
        wakes.wake();
    }

    /// The items an abort took out, in add order (see [`State::take_returned`]).
    fn take_returned(&self) -> Vec<(K, T)> {
        let returned = self.state.lock().take_returned();
        returned
            .into_iter()
            .map(|(_, key, item)| (key, item))
            .collect()
    }

    /// Waits until every worker exited.
    async fn wait_stopped(&self) {
        self.wait_for(|st| st.workers_live == 0).await;
    }

    /// Waits until no worker holds items it has not started (or every worker
    /// exited). Only after an abort is this bound to happen soon: a worker
    /// stops its batch after its current item, or hands the rest back when
    /// a handler waits.
    async fn wait_handed_back(&self) {
        self.wait_for(|st| st.workers_live == 0 || !st.holding())
            .await;
    }

    /// Waits on the `done` list until `cond` holds. It is woken when the
    /// last worker exits, and after an abort when the last batch held is
    /// released.
    async fn wait_for(&self, cond: impl Fn(&State<K, T>) -> bool) {
        let mut guard = DoneWaiter {
            shared: self,
            id: None,
        };
        poll_fn(|cx| {
            let mut st = self.state.lock();
            if cond(&st) {
                if let Some(id) = guard.id.take() {
                    st.done.remove(id);
                }
                Poll::Ready(())
            } else {
                st.done.register(&mut guard.id, cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    fn stats(&self) -> Stats {
        let mut wakes = Wakeups::default();
        let mut st = self.state.lock();
        // Items still in the intake count under their keys.
        st.drain(self.intake(), &mut wakes);
        let add_waits = self.intake().lock().add_waits;
        let stats = Stats {
            pending: st.pending(),
            in_flight: st.in_flight(),
            keys: st.keys(),
            aborted: st.aborted(),
            handled: st.handled,
            panicked: st.panicked,
            workers: st.workers_live,
            add_waits,
            batches: st.batches,
            worker_waits: st.worker_waits,
        };
        drop(st);
        wakes.wake();
        stats
    }

    fn report_panic(&self, key: K, payload: Box<dyn Any + Send>) {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "<non-string panic payload>".to_owned()
        };
        tracing::warn!(%message, "keyed pool handler panicked");
        if let Some(hook) = &self.on_panic {
            // A panicking callback must not take the worker down either.
            let _ =
                std::panic::catch_unwind(AssertUnwindSafe(|| hook(HandlerPanic { key, message })));
        }
    }
}

/// Deregisters a producer waiting for room; passes on a wake-up it did not use.
struct RoomWaiter<'a, K: Hash + Eq + Clone, T> {
    shared: &'a Shared<K, T>,
    id: Option<u64>,
}

impl<K: Hash + Eq + Clone, T> Drop for RoomWaiter<'_, K, T> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut wakes = Wakeups::default();
            self.shared.front.leave_room(id, true, &mut wakes);
            wakes.wake();
        }
    }
}

struct DoneWaiter<'a, K: Hash + Eq + Clone, T> {
    shared: &'a Shared<K, T>,
    id: Option<u64>,
}

impl<K: Hash + Eq + Clone, T> Drop for DoneWaiter<'_, K, T> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.state.lock().done.remove(id);
        }
    }
}

/// How long a worker keeps running items of one key before it hands the rest
/// of its batch back and lets other keys' items go first.
#[cfg(not(loom))]
const SLICE: std::time::Duration = std::time::Duration::from_micros(50);

/// What a worker does after a look at the state.
enum Next {
    Job,
    Exit,
    /// Nothing to do: yield, then look again.
    Spin,
}

/// How many times in a row a worker that finds nothing to do yields and
/// looks again before it parks. Parking costs a wake-up later, and when the
/// worker's thread has nothing else to run, a wake-up of the thread too (a
/// futex or eventfd round trip, tens of µs on a VM); a yield to tokio's
/// scheduler costs about a µs when the thread is otherwise idle, and lets
/// any other task go first.
#[cfg(not(loom))]
const SPINS: u32 = 32;
#[cfg(loom)]
const SPINS: u32 = 1;

/// A worker whose batch held fewer items than this (and whose handlers all
/// completed at once) yields once before it reports the batch and takes the
/// next one.
///
/// Without it a busy pool can settle into taking a few items per
/// batch: the workers keep up with the producers, so each look under the
/// state lock finds a few items, and the producers' adds and the workers'
/// looks contend for the lock and its cache lines item by item, which slows
/// the producers, which keeps the batches small. One yield (about a µs, and
/// a turn for any task on the worker's thread, a producer included) lets
/// the next batch fill: 10 to 47 items per batch after it, against 2 to 6
/// (`SNAPSTREAM_BENCH_DIAG=1 SNAPSTREAM_BENCH_SECTION=go cargo bench --bench
/// pools`); the throughput it brought is in the README's pool section. Half
/// of [`MAX_BATCH`](state::MAX_BATCH) did better than 8, 16 or all of it.
const SMALL_BATCH: usize = 32;

/// How many times in a row a worker that finds the queues' lock taken (by
/// a worker on another thread, in the middle of its look) yields to the other
/// tasks of its own thread before it waits for the lock. A look holds the
/// lock for a few µs; a yield lets a producer on this thread add meanwhile
/// instead of the thread spinning or sleeping on the lock: +3–8% items/s at
/// 16 and 10,000 uniform keys (`GITPOD_POOL_ANCHOR=/none
/// SNAPSTREAM_BENCH_SECTION=go cargo bench --bench pools`, 4 alternations, 4
/// rounds each, 2026-12-04); 16 did no better. (Not under loom: the path
/// changes nothing before it yields.)
#[cfg(not(loom))]
const BUSY_YIELDS: u32 = 4;

/// Lets every other ready task run, then resumes: tokio's `yield_now`, which
/// defers the wake-up until the thread has nothing else to run (so it never
/// wakes another thread).
async fn spin_yield() {
    #[cfg(not(loom))]
    tokio::task::yield_now().await;
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// One worker: take a batch of one key's items, run the handler over them
/// (for at most [`SLICE`]), report what ran and hand back the rest (and
/// take the next batch under the same lock), until told to exit.
pub(crate) async fn work<K, T, H, F>(shared: Arc<Shared<K, T>>, handler: std::sync::Arc<H>)
where
    K: Hash + Eq + Clone,
    H: Fn(K, T) -> F,
    F: Future<Output = ()>,
{
    #[cfg(not(loom))]
    {
        // Everything the worker runs is inside this pool's handler scope, so
        // an add from a handler is recognised as re-entrant.
        let id = shared.id;
        IN_HANDLER.scope(id, work_loop(shared, handler)).await;
    }
    #[cfg(loom)]
    work_loop(shared, handler).await;
}

async fn work_loop<K, T, H, F>(shared: Arc<Shared<K, T>>, handler: std::sync::Arc<H>)
where
    K: Hash + Eq + Clone,
    H: Fn(K, T) -> F,
    F: Future<Output = ()>,
{
    // Reused across batches: what was taken, what ran, what is handed back.
    let mut runs: Vec<Run<K>> = Vec::new();
    let mut items: Batch<T> = Batch::new();
    let mut dones: Vec<Done<K>> = Vec::new();
    let mut left: Batch<T> = Batch::new();
    let mut waiter: Option<u64> = None;
    // Take several items at once only while handlers complete without
    // waiting: a handler that waits makes the worker hand the rest of the
    // batch back first, so taking it was wasted work.
    let mut many = true;
    // Whether the batch taken holds items not started (more than one item)
    // that the worker has not handed back yet (see `State::release`).
    let mut held = false;
    // Times in a row the worker found nothing and yielded instead of parking
    // (up to `SPINS`); `spun` while it counts as spinning in the state.
    let mut spins = 0u32;
    let mut spun = false;
    // Times in a row the worker found the queues' lock taken and yielded.
    #[cfg(not(loom))]
    let mut busy = 0u32;
    loop {
        let job = poll_fn(|cx| {
            let mut wakes = Wakeups::default();
            #[cfg(not(loom))]
            let mut st = match shared.state.try_lock() {
                Some(st) => {
                    busy = 0;
                    st
                }
                None if busy < BUSY_YIELDS => {
                    // The other thread's worker is looking: let this
                    // thread's other tasks (a producer, say) run first.
                    busy += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                None => {
                    busy = 0;
                    shared.state.lock()
                }
            };
            #[cfg(loom)]
            let mut st = shared.state.lock();
            st.worker_polled(&mut waiter, &mut spun);
            if !dones.is_empty() {
                st.finish(&mut dones, &mut left, &mut wakes);
            }
            if std::mem::take(&mut held) {
                st.release(&mut wakes);
            }
            let res = loop {
                break match st.take(&mut runs, &mut items, many, shared.intake(), &mut wakes) {
                    Take::Job => Poll::Ready(Next::Job),
                    Take::Exit => Poll::Ready(Next::Exit),
                    Take::Wait if spins < SPINS => {
                        st.worker_spin(&mut spun);
                        Poll::Ready(Next::Spin)
                    }
                    Take::Wait => {
                        if !st.worker_park(&mut waiter, cx.waker(), shared.intake()) {
                            // Adds came since the look: look again.
                            continue;
                        }
                        Poll::Pending
                    }
                };
            };
            drop(st);
            // Parking or exiting, the worker makes no more room.
            let stops = !matches!(res, Poll::Ready(Next::Job));
            shared.front.wake_for_room(stops, &mut wakes);
            wakes.wake();
            res
        })
        .await;
        match job {
            Next::Job => spins = 0,
            Next::Exit => return,
            Next::Spin => {
                spins += 1;
                spin_yield().await;
                continue;
            }
        }
        many = true;
        held = items.len() > 1;
        let small = items.len() < SMALL_BATCH;
        #[cfg(not(loom))]
        let (mut started, mut count) = (None::<std::time::Instant>, 0u32);
        let mut stop = false;
        let mut runs_iter = std::mem::take(&mut runs).into_iter();
        // The batch's first item no longer counts as pending (see
        // `State::take`); the first run always starts it.
        let mut first = true;
        while let Some(Run { key, slot, mut len }) = runs_iter.next() {
            let mut counted = usize::from(std::mem::take(&mut first));
            let (mut handled, mut panicked) = (0, 0);
            let mut ran = 0;
            while ran < len && !stop {
                let (_, item) = items.pop_front().expect("a run's items are in the batch");
                ran += 1;
                let outcome =
                    match std::panic::catch_unwind(AssertUnwindSafe(|| handler(key.clone(), item)))
                    {
                        Err(payload) => Err(payload),
                        Ok(fut) => {
                            let mut fut = std::pin::pin!(AssertUnwindSafe(fut).catch_unwind());
                            match futures::poll!(fut.as_mut()) {
                                Poll::Ready(outcome) => outcome,
                                Poll::Pending => {
                                    many = false;
                                    // About to wait: first report the keys done
                                    // so far and hand back every item not
                                    // started (the other keys', and this key's
                                    // after this one), so no key waits on this
                                    // handler and an abort finds them all.
                                    if std::mem::take(&mut held) {
                                        let rest = runs_iter.as_slice();
                                        let rest_len: usize = rest.iter().map(|r| r.len).sum();
                                        left.extend(items.drain(items.len() - rest_len..));
                                        dones.extend(runs_iter.by_ref().map(
                                            |Run { key, slot, len }| Done {
                                                key,
                                                slot,
                                                handled: 0,
                                                panicked: 0,
                                                left: len,
                                                counted: 0,
                                            },
                                        ));
                                        // What is left in `items` is this run's rest.
                                        shared.hand_back(
                                            &mut dones,
                                            &mut left,
                                            slot,
                                            &mut items,
                                            ran - counted,
                                        );
                                        counted = ran;
                                        len = ran;
                                    } else {
                                        // A batch of one item, no longer
                                        // pending: no room to hand back, but
                                        // this worker makes none while it
                                        // waits.
                                        shared.handler_waits();
                                    }
                                    fut.await
                                }
                            }
                        }
                    };
                match outcome {
                    Ok(()) => handled += 1,
                    Err(payload) => {
                        shared.report_panic(key.clone(), payload);
                        panicked += 1;
                    }
                }
                #[cfg(not(loom))]
                tokio::task::coop::consume_budget().await;
                if shared.aborting.load(Ordering::Relaxed) {
                    stop = true;
                }
                #[cfg(not(loom))]
                if !stop && (ran < len || runs_iter.len() > 0) {
                    // More to run: time-slice. The clock starts after the
                    // first item and is read after items 2, 4, 8, ...: at
                    // most a few reads per batch, and a slice of at least
                    // two items and at most about twice `SLICE`.
                    count += 1;
                    if count == 1 {
                        started = Some(std::time::Instant::now());
                    } else if count.is_power_of_two() {
                        stop = started.is_some_and(|t| t.elapsed() >= SLICE);
                    }
                }
            }
            // What did not run is handed back with the report.
            if ran < len {
                left.extend(items.drain(..len - ran));
            }
            dones.push(Done {
                key,
                slot,
                handled,
                panicked,
                left: len - ran,
                counted,
            });
        }
        runs = runs_iter.collect(); // empty: keeps the allocation
        debug_assert!(items.is_empty());
        if small && many {
            // See `SMALL_BATCH`: let more items come before the next look.
            spin_yield().await;
        }
    }
}

/// Configures and builds a [`KeyedPool`].
///
/// | setting | default |
/// |---|---|
/// | [`workers`](Self::workers) | [`DEFAULT_WORKERS`] (4) |
/// | [`capacity`](Self::capacity) | [`DEFAULT_CAPACITY`] (1024 pending items) |
/// | [`per_key_concurrency`](Self::per_key_concurrency) | [`DEFAULT_PER_KEY_CONCURRENCY`] (1) |
/// | [`on_panic`](Self::on_panic) | none (panics are logged with `tracing` and counted) |
///
/// # Examples
///
/// ```
/// use snapstream::workpool::{KeyedPool, StopMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = KeyedPool::<u64, String>::builder()
///     .workers(8)
///     .capacity(10_000)
///     .per_key_concurrency(2)
///     .on_panic(|p| eprintln!("key {} panicked: {}", p.key, p.message))
///     .build(|_key, _item| async {})
///     .unwrap();
/// assert_eq!(pool.stats().workers, 8);
/// pool.stop(StopMode::Drain).await;
/// # }
/// ```
#[must_use]
pub struct Builder<K, T> {
    workers: usize,
    capacity: usize,
    per_key: usize,
    on_panic: Option<PanicHook<K>>,
    _items: PhantomData<fn(T)>,
}

impl<K, T> fmt::Debug for Builder<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("workers", &self.workers)
            .field("capacity", &self.capacity)
            .field("per_key_concurrency", &self.per_key)
            .field("on_panic", &self.on_panic.is_some())
            .finish()
    }
}

impl<K, T> Builder<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
{
    /// Sets the number of worker tasks (at least 1).
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::KeyedPool;
    /// let _builder = KeyedPool::<u32, u32>::builder().workers(16);
    /// ```
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets the bound on pending items (at least 1).
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::KeyedPool;
    /// let _builder = KeyedPool::<u32, u32>::builder().capacity(100);
    /// ```
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets how many items of one key may run at once (at least 1).
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::KeyedPool;
    /// let _builder = KeyedPool::<u32, u32>::builder().per_key_concurrency(4);
    /// ```
    pub fn per_key_concurrency(mut self, per_key: usize) -> Self {
        self.per_key = per_key;
        self
    }

    /// Sets a callback told about every handler panic.
    ///
    /// It runs on the worker task; a panic inside it is swallowed.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::KeyedPool;
    /// let _builder = KeyedPool::<u32, u32>::builder()
    ///     .on_panic(|p| eprintln!("handler for {} panicked: {}", p.key, p.message));
    /// ```
    pub fn on_panic(mut self, hook: impl Fn(HandlerPanic<K>) + Send + Sync + 'static) -> Self {
        self.on_panic = Some(std::sync::Arc::new(hook));
        self
    }

    /// Builds the pool and starts its workers on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError::ZeroWorkers`], [`BuildError::ZeroCapacity`] or
    /// [`BuildError::ZeroConcurrency`] for a zero setting;
    /// [`BuildError::NoRuntime`] outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder()
    ///     .build(|key: u32, item: String| async move { println!("{key}: {item}") })
    ///     .unwrap();
    /// pool.add(1, "hello".to_owned()).await.unwrap();
    /// pool.stop(StopMode::Drain).await;
    /// assert_eq!(pool.stats().handled, 1);
    /// # }
    /// ```
    pub fn build<H, F>(self, handler: H) -> Result<KeyedPool<K, T>, BuildError>
    where
        H: Fn(K, T) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        self.build_with(|_| handler)
    }

    /// Builds the pool with a handler that can add to its own pool through
    /// the given [`Adder`].
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // Counts down: each item adds the next smaller one to the same key.
    /// let pool = KeyedPool::<&str, u32>::builder()
    ///     .capacity(1)
    ///     .build_with(|adder| {
    ///         move |key, n| {
    ///             let adder = adder.clone();
    ///             async move {
    ///                 if n > 0 {
    ///                     adder.add(key, n - 1).await.unwrap();
    ///                 }
    ///             }
    ///         }
    ///     })
    ///     .unwrap();
    /// pool.add("countdown", 10).await.unwrap();
    /// pool.stop(StopMode::Drain).await;
    /// assert_eq!(pool.stats().handled, 11);
    /// # }
    /// ```
    pub fn build_with<H, F>(
        self,
        make_handler: impl FnOnce(Adder<K, T>) -> H,
    ) -> Result<KeyedPool<K, T>, BuildError>
    where
        H: Fn(K, T) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        if self.workers == 0 {
            return Err(BuildError::ZeroWorkers);
        }
        if self.capacity == 0 {
            return Err(BuildError::ZeroCapacity);
        }
        if self.per_key == 0 {
            return Err(BuildError::ZeroConcurrency);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let shared = Shared::new(self.capacity, self.per_key, self.on_panic);
        let handler = std::sync::Arc::new(make_handler(Adder {
            shared: shared.clone(),
        }));
        let spawner: Spawner<K, T> = std::sync::Arc::new(move |shared| {
            runtime.spawn(work(shared, handler.clone()));
        });
        let pool = KeyedPool { shared, spawner };
        pool.set_workers(self.workers)?;
        Ok(pool)
    }
}

/// A pool of workers running an async handler over keyed items, in order per key.
///
/// Cloning gives another handle to the same pool; when the last handle is
/// dropped the pool drains and its workers exit. See the
/// [module documentation](self) for the guarantees.
///
/// # Examples
///
/// ```
/// use snapstream::workpool::{KeyedPool, StopMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = KeyedPool::builder()
///     .build(|user: u64, event: &'static str| async move { let _ = (user, event); })
///     .unwrap();
/// pool.add(7, "login").await.unwrap();
/// pool.add(7, "logout").await.unwrap();
/// assert!(pool.stop(StopMode::Drain).await.is_empty());
/// assert_eq!(pool.stats().handled, 2);
/// # }
/// ```
pub struct KeyedPool<K: Hash + Eq + Clone, T> {
    shared: Arc<Shared<K, T>>,
    spawner: Spawner<K, T>,
}

impl<K: Hash + Eq + Clone, T> fmt::Debug for KeyedPool<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPool").finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, T> Clone for KeyedPool<K, T> {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        KeyedPool {
            shared: self.shared.clone(),
            spawner: self.spawner.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, T> Drop for KeyedPool<K, T> {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle: close intake, pending items still run.
            self.shared.close(Closing::Drain);
        }
    }
}

impl<K, T> KeyedPool<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
{
    /// Starts configuring a pool; see [`Builder`] for the defaults.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::KeyedPool;
    /// let _builder = KeyedPool::<String, Vec<u8>>::builder();
    /// ```
    pub fn builder() -> Builder<K, T> {
        Builder {
            workers: DEFAULT_WORKERS,
            capacity: DEFAULT_CAPACITY,
            per_key: DEFAULT_PER_KEY_CONCURRENCY,
            on_panic: None,
            _items: PhantomData,
        }
    }

    /// Adds an item, waiting while the pool is full.
    ///
    /// Called from inside one of this pool's handlers it never waits (see the
    /// [module documentation](self#re-entrant-adds)).
    ///
    /// # Errors
    ///
    /// [`StoppedError`] (with the item) once the pool was stopped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the item was
    /// not added (it is dropped with the future), and no wake-up is lost for
    /// other waiting producers.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().build(|_k: u8, _i: u8| async {}).unwrap();
    /// pool.add(1, 2).await.unwrap();
    /// # pool.stop(StopMode::Drain).await;
    /// # }
    /// ```
    pub async fn add(&self, key: K, item: T) -> Result<(), StoppedError<K, T>> {
        self.shared.add(key, item).await
    }

    /// Adds an item if there is room, without waiting.
    ///
    /// # Errors
    ///
    /// [`TryAddError::Full`] when `capacity` items are pending,
    /// [`TryAddError::Stopped`] once stopped; both hand the item back.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().build(|_k: u8, _i: u8| async {}).unwrap();
    /// pool.try_add(1, 2).unwrap();
    /// # pool.stop(StopMode::Drain).await;
    /// # }
    /// ```
    pub fn try_add(&self, key: K, item: T) -> Result<(), TryAddError<K, T>> {
        self.shared.try_add(key, item)
    }

    /// Adds every `(key, item)` the stream yields, waiting for room as
    /// needed, until the stream ends. Returns how many items were added.
    ///
    /// The pool is not stopped when the stream ends.
    ///
    /// # Errors
    ///
    /// [`StoppedError`] with the item in hand when the pool was stopped; the
    /// rest of the stream is not polled.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: an item taken from the stream but not yet added is
    /// dropped with the future. Items added before are in the pool.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().build(|_k: u8, _i: u32| async {}).unwrap();
    /// let added = pool.run(futures::stream::iter((0..100).map(|i| (i as u8 % 3, i)))).await.unwrap();
    /// assert_eq!(added, 100);
    /// pool.stop(StopMode::Drain).await;
    /// assert_eq!(pool.stats().handled, 100);
    /// # }
    /// ```
    pub async fn run<S>(&self, stream: S) -> Result<u64, StoppedError<K, T>>
    where
        S: Stream<Item = (K, T)>,
    {
        let mut stream = std::pin::pin!(stream);
        let mut added = 0;
        while let Some((key, item)) = stream.next().await {
            self.shared.add(key, item).await?;
            added += 1;
        }
        Ok(added)
    }

    /// Stops the pool: closes intake, then waits until every worker exited.
    ///
    /// With [`StopMode::Drain`] everything pending is handled first and the
    /// result is empty; with [`StopMode::Abort`] the pending items are
    /// returned in add order (in order per key) and only in-flight items are
    /// waited for. Called again, it waits again (an `Abort` after a `Drain`
    /// still hands back what is left). Called from one of the pool's own
    /// handlers it closes intake but does not wait (it would wait on itself);
    /// items a worker hands back after such an abort (the rest of its batch,
    /// see [Dispatch](self#dispatch)) are returned by the next call.
    ///
    /// A handler that never returns keeps this waiting forever: bound the
    /// wait with [`stop_timeout`](Self::stop_timeout), or drop this future
    /// (see below) and call `stop` again later.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: intake is closed (and, with `Abort`, the pending items
    /// taken out) at the first poll. If the future is dropped before it
    /// completes, nothing is lost: the items taken out stay in the pool
    /// ([`Stats::aborted`] counts them) and the next `stop` (or
    /// `stop_timeout`) returns them, like a message
    /// `tokio::sync::mpsc::Receiver::recv` did not return. Only dropping the
    /// last handle drops them.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().build(|_k: u8, _i: u8| async {}).unwrap();
    /// pool.try_add(1, 1).unwrap();
    /// let left = pool.stop(StopMode::Abort).await;
    /// assert!(left.len() <= 1);
    /// assert_eq!(pool.stats().workers, 0);
    /// # }
    /// ```
    pub async fn stop(&self, mode: StopMode) -> Vec<(K, T)> {
        self.shared.close(mode.into());
        if !self.shared.in_own_handler() {
            self.shared.wait_stopped().await;
        }
        self.shared.take_returned()
    }

    /// Stops the pool as [`stop`](Self::stop) does, but waits at most
    /// `timeout` for the workers to exit.
    ///
    /// If they have not exited by then (a handler is stuck, or, with
    /// [`StopMode::Drain`], too much is pending), the pool is aborted: every
    /// item that has not started is taken out, those a worker was about to
    /// run included, and returned in [`StopTimeoutError::TimedOut`], in add
    /// order. The handlers still running are not cancelled; they finish in
    /// the background, and their workers exit when they return (a later
    /// `stop` waits for that). Waiting for a drain without aborting the rest
    /// is `tokio::time::timeout(d, pool.stop(StopMode::Drain))`.
    ///
    /// After the deadline this waits only until every worker has handed back
    /// what it had not started: at once for a worker whose handler waits,
    /// and after the current item for one whose handlers run without waiting
    /// (a handler that blocks its thread is bounded by nothing).
    ///
    /// Called from one of the pool's own handlers it closes intake and
    /// returns at once, as `stop` does.
    ///
    /// # Errors
    ///
    /// [`StopTimeoutError::TimedOut`], with every item not started, when the
    /// workers were still running at the deadline.
    ///
    /// # Cancel safety
    ///
    /// As [`stop`](Self::stop): cancel safe; items taken out stay in the pool
    /// for the next `stop` if the future is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use snapstream::workpool::{KeyedPool, StopMode, StopTimeoutError};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// // The handler of item 0 never returns.
    /// let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    /// let pool = KeyedPool::builder()
    ///     .workers(1)
    ///     .build(move |_key: &str, i: u32| {
    ///         let tx = tx.clone();
    ///         async move {
    ///             let _ = tx.send(i);
    ///             if i == 0 {
    ///                 std::future::pending::<()>().await;
    ///             }
    ///         }
    ///     })
    ///     .unwrap();
    /// for i in 0..3 {
    ///     pool.try_add("stuck", i).unwrap();
    /// }
    /// assert_eq!(started.recv().await, Some(0));
    /// match pool.stop_timeout(StopMode::Abort, Duration::from_secs(1)).await {
    ///     Err(StopTimeoutError::TimedOut { items, in_flight, .. }) => {
    ///         assert_eq!(items, [("stuck", 1), ("stuck", 2)]);
    ///         assert_eq!(in_flight, 1);
    ///     }
    ///     other => panic!("expected a timeout, got {other:?}"),
    /// }
    /// # }
    /// ```
    pub async fn stop_timeout(
        &self,
        mode: StopMode,
        timeout: Duration,
    ) -> Result<Vec<(K, T)>, StopTimeoutError<K, T>> {
        self.shared.close(mode.into());
        if self.shared.in_own_handler()
            || tokio::time::timeout(timeout, self.shared.wait_stopped())
                .await
                .is_ok()
        {
            return Ok(self.shared.take_returned());
        }
        self.shared.close(Closing::Abort);
        self.shared.wait_handed_back().await;
        let items = self.shared.take_returned();
        let in_flight = self.shared.state.lock().in_flight();
        Err(StopTimeoutError::TimedOut { items, in_flight })
    }

    /// Changes the number of workers at run time.
    ///
    /// Growing spawns workers at once; shrinking lets surplus workers exit
    /// as soon as they are idle or finish their current item.
    ///
    /// # Errors
    ///
    /// [`BuildError::ZeroWorkers`] for 0, [`BuildError::Stopped`] once stopped.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().workers(1).build(|_k: u8, _i: u8| async {}).unwrap();
    /// pool.set_workers(4).unwrap();
    /// assert_eq!(pool.stats().workers, 4);
    /// # pool.stop(StopMode::Drain).await;
    /// # }
    /// ```
    pub fn set_workers(&self, workers: usize) -> Result<(), BuildError> {
        if workers == 0 {
            return Err(BuildError::ZeroWorkers);
        }
        let mut wakes = Wakeups::default();
        let spawn = {
            let mut st = self.shared.state.lock();
            if st.closing.is_some() {
                return Err(BuildError::Stopped);
            }
            st.resize(workers, &mut wakes)
        };
        wakes.wake();
        for _ in 0..spawn {
            (self.spawner)(self.shared.clone());
        }
        Ok(())
    }

    /// The pool's counters.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().workers(2).build(|_k: u8, _i: u8| async {}).unwrap();
    /// let stats = pool.stats();
    /// assert_eq!((stats.pending, stats.in_flight, stats.keys, stats.workers), (0, 0, 0, 2));
    /// # pool.stop(StopMode::Drain).await;
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// A handle that can add items but does not keep the pool alive.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().build(|_k: u8, _i: u8| async {}).unwrap();
    /// let adder = pool.adder();
    /// adder.add(1, 1).await.unwrap();
    /// # pool.stop(StopMode::Drain).await;
    /// # }
    /// ```
    pub fn adder(&self) -> Adder<K, T> {
        Adder {
            shared: self.shared.clone(),
        }
    }
}

/// A handle that adds items to a [`KeyedPool`] without keeping it alive.
///
/// Handlers use it to add to their own pool ([`Builder::build_with`]); adds
/// from inside a handler never wait for room.
///
/// # Examples
///
/// ```
/// # use snapstream::workpool::{KeyedPool, StopMode};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = KeyedPool::builder().build(|_k: u8, _i: u8| async {}).unwrap();
/// let adder = pool.adder();
/// adder.try_add(3, 4).unwrap();
/// # pool.stop(StopMode::Drain).await;
/// # }
/// ```
pub struct Adder<K, T> {
    shared: Arc<Shared<K, T>>,
}

impl<K, T> Clone for Adder<K, T> {
    fn clone(&self) -> Self {
        Adder {
            shared: self.shared.clone(),
        }
    }
}

impl<K, T> fmt::Debug for Adder<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adder").finish_non_exhaustive()
    }
}

impl<K, T> Adder<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
{
    /// As [`KeyedPool::add`].
    ///
    /// # Errors
    ///
    /// [`StoppedError`] (with the item) once the pool was stopped or dropped.
    ///
    /// # Cancel safety
    ///
    /// As [`KeyedPool::add`]: cancel safe.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().build(|_k: u8, _i: u8| async {}).unwrap();
    /// pool.adder().add(1, 1).await.unwrap();
    /// # pool.stop(StopMode::Drain).await;
    /// # }
    /// ```
    pub async fn add(&self, key: K, item: T) -> Result<(), StoppedError<K, T>> {
        self.shared.add(key, item).await
    }

    /// As [`KeyedPool::try_add`].
    ///
    /// # Errors
    ///
    /// [`TryAddError::Full`] or [`TryAddError::Stopped`], with the item.
    ///
    /// # Examples
    ///
    /// ```
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = KeyedPool::builder().build(|_k: u8, _i: u8| async {}).unwrap();
    /// pool.adder().try_add(1, 1).unwrap();
    /// # pool.stop(StopMode::Drain).await;
    /// # }
    /// ```
    pub fn try_add(&self, key: K, item: T) -> Result<(), TryAddError<K, T>> {
        self.shared.try_add(key, item)
    }
}
