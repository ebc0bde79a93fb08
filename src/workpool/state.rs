//! The dispatcher: per-key FIFO queues plus a queue of ready keys.
//!
//! Everything here runs under one mutex and is O(1) (amortised) per item:
//! a key sits in `ready` at most once, and only while it has queued items and
//! fewer than `per_key` of them in flight. A key's entry exists only while it
//! has queued or in-flight items.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use super::wait::{WaitList, Wakeups};

/// How many empty per-key queues are kept for reuse.
const SPARE_QUEUES: usize = 64;
/// The largest per-key queue (in items) kept for reuse.
const SPARE_QUEUE_CAPACITY: usize = 16;

/// Tables at most this large are never shrunk.
const SHRINK_ABOVE: usize = 1024;

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
#[derive(Debug)]
pub(crate) enum Take<K, T> {
    Job(K, T),
    Wait,
    Exit,
}

#[derive(Debug)]
struct KeyQueue<T> {
    items: VecDeque<(u64, T)>,
    in_flight: usize,
    in_ready: bool,
}

#[derive(Debug)]
pub(crate) struct State<K, T> {
    keys: HashMap<K, KeyQueue<T>>,
    ready: VecDeque<K>,
    /// Empty per-key queues kept for reuse.
    spare: Vec<VecDeque<(u64, T)>>,
    pending: usize,
    in_flight: usize,
    capacity: usize,
    per_key: usize,
    seq: u64,
    pub(crate) handled: u64,
    pub(crate) panicked: u64,
    pub(crate) workers_target: usize,
    pub(crate) workers_live: usize,
    pub(crate) closing: Option<Closing>,
    /// Idle workers.
    idle: WaitList,
    /// Idle workers woken (popped from `idle`) that have not polled yet.
    woken: usize,
    /// Producers waiting for room.
    pub(crate) room: WaitList,
    /// `stop` callers waiting for the workers to exit.
    pub(crate) done: WaitList,
}

impl<K: Hash + Eq + Clone, T> State<K, T> {
    pub(crate) fn new(capacity: usize, per_key: usize, workers: usize) -> Self {
        Self {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            spare: Vec::new(),
            pending: 0,
            in_flight: 0,
            capacity,
            per_key,
            seq: 0,
            handled: 0,
            panicked: 0,
            workers_target: workers,
            workers_live: 0,
            closing: None,
            idle: WaitList::default(),
            woken: 0,
            room: WaitList::default(),
            done: WaitList::default(),
        }
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Live per-key entries (keys with queued or in-flight items).
    pub(crate) fn keys(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn has_room(&self) -> bool {
        self.pending < self.capacity
    }

    /// Queues an item. `from_handler` admits it above the bound (and while
    /// draining), so a handler adding to its own pool never waits on itself.
    pub(crate) fn push(
        &mut self,
        key: K,
        item: T,
        from_handler: bool,
        wakes: &mut Wakeups,
    ) -> Result<(), (Refused, K, T)> {
        match self.closing {
            None => {}
            Some(Closing::Drain) if from_handler => {}
            Some(_) => return Err((Refused::Stopped, key, item)),
        }
        if !from_handler && self.pending >= self.capacity {
            return Err((Refused::Full, key, item));
        }
        let seq = self.seq;
        self.seq += 1;
        self.pending += 1;
        let per_key = self.per_key;
        if !self.keys.contains_key(&key) {
            let items = self.spare.pop().unwrap_or_default();
            self.keys.insert(
                key.clone(),
                KeyQueue {
                    items,
                    in_flight: 0,
                    in_ready: false,
                },
            );
        }
        let entry = self.keys.get_mut(&key).expect("inserted above");
        entry.items.push_back((seq, item));
        if !entry.in_ready && entry.in_flight < per_key {
            entry.in_ready = true;
            self.ready.push_back(key);
            self.wake_worker(wakes);
        }
        Ok(())
    }

    /// Hands the next job to a worker, or tells it to wait or exit.
    pub(crate) fn take(&mut self, wakes: &mut Wakeups) -> Take<K, T> {
        if self.workers_live > self.workers_target {
            return self.exit(wakes);
        }
        if let Some(key) = self.ready.pop_front() {
            let per_key = self.per_key;
            let entry = self.keys.get_mut(&key).expect("ready key has an entry");
            let (_, item) = entry.items.pop_front().expect("ready key has items");
            entry.in_flight += 1;
            self.pending -= 1;
            self.in_flight += 1;
            let again = !entry.items.is_empty() && entry.in_flight < per_key;
            if again {
                // Round robin: the key goes to the back behind the other keys.
                self.ready.push_back(key.clone());
                if !self.ready.is_empty() {
                    self.wake_worker(wakes);
                }
            } else {
                entry.in_ready = false;
            }
            self.wake_producers(wakes);
            return Take::Job(key, item);
        }
        if self.closing.is_some() && self.pending == 0 && self.in_flight == 0 {
            return self.exit(wakes);
        }
        Take::Wait
    }

    /// Wakes an idle worker for a ready key, unless enough workers were
    /// woken already and have not run yet (each takes a ready key when it
    /// runs), so a fast producer does not wake a worker per item.
    fn wake_worker(&mut self, wakes: &mut Wakeups) {
        if self.ready.len() > self.woken {
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
    /// been woken, it no longer counts as on its way.
    pub(crate) fn worker_polled(&mut self, waiter: &mut Option<u64>) {
        if let Some(id) = waiter.take() {
            if !self.idle.remove(id) {
                self.woken = self.woken.saturating_sub(1);
            }
        }
    }

    /// Parks a worker that found nothing to do.
    pub(crate) fn worker_park(&mut self, waiter: &mut Option<u64>, waker: &std::task::Waker) {
        self.idle.register(waiter, waker);
    }

    /// Wakes a producer waiting for room: one per slot freed. (Waking them
    /// in batches was tried: it saves wake-ups, but a producer could then
    /// wait while there is room, and deadlock against handlers that wait for
    /// that producer.)
    fn wake_producers(&mut self, wakes: &mut Wakeups) {
        if self.pending < self.capacity {
            wakes.push(self.room.pop());
        }
    }

    fn exit(&mut self, wakes: &mut Wakeups) -> Take<K, T> {
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
        } else if self.closing.is_some() && self.pending == 0 && self.in_flight == 0 {
            self.wake_all_workers(wakes);
        }
        Take::Exit
    }

    /// Records that a job of `key` finished.
    pub(crate) fn finish(&mut self, key: K, panicked: bool, wakes: &mut Wakeups) {
        if panicked {
            self.panicked += 1;
        } else {
            self.handled += 1;
        }
        self.in_flight -= 1;
        let per_key = self.per_key;
        let entry = self.keys.get_mut(&key).expect("in-flight key has an entry");
        entry.in_flight -= 1;
        if entry.items.is_empty() {
            if entry.in_flight == 0 {
                if let Some(gone) = self.keys.remove(&key) {
                    self.recycle(gone.items);
                }
                self.maybe_shrink();
            }
        } else if !entry.in_ready && entry.in_flight < per_key {
            entry.in_ready = true;
            self.ready.push_back(key);
            self.wake_worker(wakes);
        }
        if self.closing.is_some() && self.pending == 0 && self.in_flight == 0 {
            // Drained: every idle worker may exit now.
            self.wake_all_workers(wakes);
        }
    }

    /// Keeps a few small empty queues so a new key costs no allocation.
    fn recycle(&mut self, items: VecDeque<(u64, T)>) {
        if self.spare.len() < SPARE_QUEUES && items.capacity() <= SPARE_QUEUE_CAPACITY {
            self.spare.push(items);
        }
    }

    /// Gives memory back once the tables are mostly empty. The wide
    /// hysteresis (shrink below 1/16, to 1/4 of the capacity) keeps a steady
    /// churn of keys from reallocating over and over.
    fn maybe_shrink(&mut self) {
        let cap = self.keys.capacity();
        if cap > SHRINK_ABOVE && self.keys.len() * 16 < cap {
            self.keys.shrink_to(cap / 4);
        }
        let cap = self.ready.capacity();
        if cap > SHRINK_ABOVE && self.ready.len() * 16 < cap {
            self.ready.shrink_to(cap / 4);
        }
    }

    /// Closes intake. With `Abort`, hands back every pending item in add order
    /// (hence in order per key).
    pub(crate) fn close(&mut self, how: Closing, wakes: &mut Wakeups) -> Vec<(K, T)> {
        let mut out = Vec::new();
        match (self.closing, how) {
            (Some(Closing::Abort), _) => {}
            (_, Closing::Drain) => self.closing = Some(Closing::Drain),
            (_, Closing::Abort) => {
                self.closing = Some(Closing::Abort);
                let mut taken: Vec<(u64, K, T)> = Vec::with_capacity(self.pending);
                self.keys.retain(|key, entry| {
                    for (seq, item) in entry.items.drain(..) {
                        taken.push((seq, key.clone(), item));
                    }
                    entry.in_ready = false;
                    entry.in_flight > 0
                });
                self.ready.clear();
                self.pending = 0;
                taken.sort_unstable_by_key(|(seq, _, _)| *seq);
                out = taken.into_iter().map(|(_, k, t)| (k, t)).collect();
                self.maybe_shrink();
            }
        }
        wakes.extend(self.room.take_all());
        if self.pending == 0 && self.in_flight == 0 {
            self.wake_all_workers(wakes);
        }
        if self.workers_live == 0 {
            wakes.extend(self.done.take_all());
        }
        out
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
mod model_tests {
    //! The dispatcher against a simple model: per-key FIFOs, a count of
    //! in-flight items per key, a global bound.

    use std::collections::{BTreeMap, VecDeque};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8, bool),
        Take,
        Finish(usize, bool),
        Close(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4u8, proptest::bool::weighted(0.1)).prop_map(|(k, h)| Op::Push(k, h)),
            4 => Just(Op::Take),
            4 => (any::<usize>(), proptest::bool::weighted(0.1)).prop_map(|(i, p)| Op::Finish(i, p)),
            1 => any::<bool>().prop_map(Op::Close),
        ]
    }

    #[derive(Default)]
    struct Model {
        queues: BTreeMap<u8, VecDeque<u32>>,
        in_flight: BTreeMap<u8, usize>,
        closing: Option<Closing>,
    }

    impl Model {
        fn pending(&self) -> usize {
            self.queues.values().map(VecDeque::len).sum()
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
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let mut st: State<u8, u32> = State::new(capacity, per_key, 1);
            st.workers_live = 1;
            let mut model = Model::default();
            let mut jobs: Vec<(u8, u32)> = Vec::new();
            let mut next = 0u32;
            let mut handled = 0u64;
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
                        match st.push(k, next, from_handler, &mut wakes) {
                            Ok(()) => {
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
                    Op::Take => match st.take(&mut wakes) {
                        Take::Job(k, i) => {
                            let front = model.queues.get_mut(&k).and_then(VecDeque::pop_front);
                            prop_assert_eq!(front, Some(i), "not the head of key {}", k);
                            let n = model.in_flight.entry(k).or_default();
                            *n += 1;
                            prop_assert!(*n <= per_key);
                            jobs.push((k, i));
                        }
                        Take::Wait => {
                            prop_assert!(!model.can_start(per_key));
                            prop_assert!(model.closing.is_none() || !jobs.is_empty() || model.pending() > 0);
                        }
                        Take::Exit => {
                            prop_assert!(model.closing.is_some() && jobs.is_empty() && model.pending() == 0);
                            st.workers_live = 1; // keep the single worker for the rest of the run
                        }
                    },
                    Op::Finish(i, panicked) if !jobs.is_empty() => {
                        let (k, _) = jobs.swap_remove(i % jobs.len());
                        st.finish(k, panicked, &mut wakes);
                        *model.in_flight.get_mut(&k).unwrap() -= 1;
                        if !panicked {
                            handled += 1;
                        }
                    }
                    Op::Finish(..) => {}
                    Op::Close(abort) => {
                        let how = if abort { Closing::Abort } else { Closing::Drain };
                        let out = st.close(how, &mut wakes);
                        if abort || model.closing == Some(Closing::Abort) {
                            let was_abort = model.closing == Some(Closing::Abort);
                            model.closing = Some(Closing::Abort);
                            let mut expected: Vec<(u8, u32)> = Vec::new();
                            for (k, q) in model.queues.iter_mut() {
                                expected.extend(q.drain(..).map(|i| (*k, i)));
                            }
                            expected.sort_unstable_by_key(|(_, i)| *i);
                            if was_abort {
                                prop_assert!(out.is_empty());
                            } else {
                                prop_assert_eq!(out, expected, "abort hands back in add order");
                            }
                        } else {
                            model.closing = Some(Closing::Drain);
                            prop_assert!(out.is_empty());
                        }
                    }
                }
                prop_assert_eq!(st.pending(), model.pending());
                prop_assert_eq!(st.in_flight(), jobs.len());
                prop_assert_eq!(st.keys(), model.keys(), "entries only for keys with work");
                prop_assert_eq!(st.handled, handled);
            }
        }
    }
}
