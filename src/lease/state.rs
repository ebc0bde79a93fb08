//! The lease pool's bookkeeping: groups (one per key), waiters and grants.
//!
//! Grants are handed off: when a key gains headroom, the longest-waiting
//! acquirer of that key gets the lease written into its waiter slot *before*
//! it is woken, so a wake-up can neither be lost nor stolen. After every
//! operation no key has both headroom and waiters, and no stream waiter waits
//! while any key has headroom.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::task::Waker;

/// The maps' hasher: with SipHash, an uncontended acquire + release spent a
/// third of its time in its two lookups.
type Hasher = crate::FastHasher;

#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) target: u64,
    pub(crate) active: u64,
    /// Acquirers of this key, oldest first.
    waiters: VecDeque<u64>,
    /// Smooth weighted round-robin credit for the any-key stream.
    credit: i128,
}

impl Group {
    fn headroom(&self) -> u64 {
        self.target.saturating_sub(self.active)
    }
}

#[derive(Debug)]
pub(crate) struct Waiter<K> {
    waker: Waker,
    pub(crate) grant: Option<(K, u64)>,
    /// `None` for a stream (any-key) waiter.
    key: Option<K>,
}

#[derive(Debug)]
pub(crate) struct State<K> {
    pub(crate) groups: HashMap<K, Group, Hasher>,
    waiters: HashMap<u64, Waiter<K>, Hasher>,
    any: VecDeque<u64>,
    next_lease: u64,
    next_waiter: u64,
    pub(crate) stopped: bool,
}

/// The outcome of polling an acquirer.
pub(crate) enum Poll<K> {
    Granted(K, u64),
    Stopped,
    Pending,
}

impl<K: Hash + Eq + Clone> State<K> {
    pub(crate) fn new() -> Self {
        State {
            groups: HashMap::default(),
            waiters: HashMap::default(),
            any: VecDeque::new(),
            next_lease: 1,
            next_waiter: 0,
            stopped: false,
        }
    }

    fn new_group() -> Group {
        Group {
            target: 0,
            active: 0,
            waiters: VecDeque::new(),
            credit: 0,
        }
    }

    fn grant(&mut self, key: &K) -> u64 {
        let group = self.groups.get_mut(key).expect("granted key has a group");
        debug_assert!(group.active < group.target);
        group.active += 1;
        let id = self.next_lease;
        self.next_lease += 1;
        id
    }

    /// Removes a key's group once it holds nothing worth keeping.
    fn tidy(&mut self, key: &K) {
        if let Some(g) = self.groups.get(key) {
            if g.target == 0 && g.active == 0 && g.waiters.is_empty() {
                self.groups.remove(key);
            }
        }
    }

    /// Gives `key`'s headroom to its waiters, then any headroom left to the
    /// stream waiters.
    fn serve(&mut self, key: &K, wakes: &mut Vec<Waker>) {
        if self.stopped {
            return;
        }
        while let Some(group) = self.groups.get_mut(key) {
            if group.headroom() == 0 {
                break;
            }
            let Some(wid) = group.waiters.pop_front() else {
                break;
            };
            let id = self.grant(key);
            let w = self.waiters.get_mut(&wid).expect("queued waiter exists");
            w.grant = Some((key.clone(), id));
            wakes.push(w.waker.clone());
        }
        self.serve_any(wakes);
    }

    /// Serves stream waiters from keys with headroom, in proportion to it.
    fn serve_any(&mut self, wakes: &mut Vec<Waker>) {
        while !self.any.is_empty() {
            let Some(key) = self.pick() else { break };
            let wid = self.any.pop_front().expect("checked non-empty");
            let id = self.grant(&key);
            let w = self.waiters.get_mut(&wid).expect("queued waiter exists");
            w.grant = Some((key, id));
            wakes.push(w.waker.clone());
        }
    }

    /// Smooth weighted round-robin over the keys with headroom, weighted by
    /// headroom: every candidate earns its headroom in credit, the richest
    /// wins and pays the total. Over a run of picks with steady headrooms each
    /// key gets exactly its share (within one pick).
    fn pick(&mut self) -> Option<K> {
        let mut total: i128 = 0;
        let mut best: Option<(&K, i128)> = None;
        for (key, g) in self.groups.iter_mut() {
            let h = g.headroom();
            if h == 0 || !g.waiters.is_empty() {
                g.credit = 0;
                continue;
            }
            g.credit += i128::from(h);
            total += i128::from(h);
            if best.is_none_or(|(_, c)| g.credit > c) {
                best = Some((key, g.credit));
            }
        }
        let key = best?.0.clone();
        self.groups.get_mut(&key).expect("picked key").credit -= total;
        Some(key)
    }

    pub(crate) fn set(&mut self, key: K, target: u64, wakes: &mut Vec<Waker>) {
        self.groups
            .entry(key.clone())
            .or_insert_with(Self::new_group)
            .target = target;
        self.serve(&key, wakes);
        self.tidy(&key);
    }

    pub(crate) fn release(&mut self, key: &K, wakes: &mut Vec<Waker>) {
        // Fast path (one lookup): nobody waits for this key or for any key.
        if let Some(g) = self.groups.get_mut(key) {
            g.active = g.active.saturating_sub(1);
            if g.waiters.is_empty() && self.any.is_empty() {
                if g.target == 0 && g.active == 0 {
                    self.groups.remove(key);
                }
                return;
            }
        }
        self.serve(key, wakes);
        self.tidy(key);
    }

    /// Polls an acquirer of `key` (`None`: any key). `slot` holds its waiter id.
    pub(crate) fn poll_acquire(
        &mut self,
        key: Option<&K>,
        slot: &mut Option<u64>,
        waker: &Waker,
    ) -> Poll<K> {
        if self.stopped {
            *slot = None;
            return Poll::Stopped;
        }
        if let Some(wid) = *slot {
            let w = self
                .waiters
                .get_mut(&wid)
                .expect("registered waiter exists");
            if let Some((k, id)) = w.grant.take() {
                self.waiters.remove(&wid);
                *slot = None;
                return Poll::Granted(k, id);
            }
            if !w.waker.will_wake(waker) {
                w.waker.clone_from(waker);
            }
            return Poll::Pending;
        }
        // First poll: take headroom at once if nobody is ahead.
        let now = match key {
            Some(k) => {
                // Fast path (one lookup, no clone): the key exists and has headroom.
                if let Some(g) = self.groups.get_mut(k) {
                    if g.headroom() > 0 && g.waiters.is_empty() {
                        g.active += 1;
                        let id = self.next_lease;
                        self.next_lease += 1;
                        return Poll::Granted(k.clone(), id);
                    }
                }
                self.groups.entry(k.clone()).or_insert_with(Self::new_group);
                None
            }
            None if self.any.is_empty() => self.pick(),
            None => None,
        };
        if let Some(k) = now {
            let id = self.grant(&k);
            return Poll::Granted(k, id);
        }
        let wid = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.insert(
            wid,
            Waiter {
                waker: waker.clone(),
                grant: None,
                key: key.cloned(),
            },
        );
        match key {
            Some(k) => self
                .groups
                .get_mut(k)
                .expect("group created above")
                .waiters
                .push_back(wid),
            None => self.any.push_back(wid),
        }
        *slot = Some(wid);
        Poll::Pending
    }

    /// Deregisters a dropped acquirer; a grant it did not collect is released.
    pub(crate) fn cancel(&mut self, wid: u64, wakes: &mut Vec<Waker>) {
        let Some(w) = self.waiters.remove(&wid) else {
            return;
        };
        if let Some((k, _)) = w.grant {
            self.release(&k, wakes);
            return;
        }
        match w.key {
            Some(k) => {
                if let Some(g) = self.groups.get_mut(&k) {
                    g.waiters.retain(|x| *x != wid);
                }
                self.tidy(&k);
            }
            None => self.any.retain(|x| *x != wid),
        }
    }

    /// Stops the pool: every waiter (granted or not) ends with an error.
    pub(crate) fn stop(&mut self, wakes: &mut Vec<Waker>) {
        self.stopped = true;
        self.any.clear();
        for (_, w) in self.waiters.drain() {
            if let Some((k, _)) = &w.grant {
                if let Some(g) = self.groups.get_mut(k) {
                    g.active = g.active.saturating_sub(1);
                }
            }
            wakes.push(w.waker);
        }
        let keys: Vec<K> = self.groups.keys().cloned().collect();
        for k in keys {
            if let Some(g) = self.groups.get_mut(&k) {
                g.waiters.clear();
            }
            self.tidy(&k);
        }
    }
}
