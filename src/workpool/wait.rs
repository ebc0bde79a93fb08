//! A list of parked tasks, kept inside a state mutex.
//!
//! Registration and the check of the condition a task waits for happen under
//! the same lock, so a wake-up can never fall between the two. Each waiter
//! has an id; a waiter that was woken (popped) but is dropped before it used
//! its turn passes the wake-up on, so none is lost.

use std::collections::VecDeque;
use std::task::Waker;

#[derive(Debug, Default)]
pub(crate) struct WaitList {
    next_id: u64,
    entries: VecDeque<(u64, Waker)>,
}

impl WaitList {
    /// Registers (or refreshes) the waiter whose id is in `slot`.
    pub(crate) fn register(&mut self, slot: &mut Option<u64>, waker: &Waker) {
        if let Some(id) = *slot {
            if let Some(entry) = self.entries.iter_mut().find(|(i, _)| *i == id) {
                if !entry.1.will_wake(waker) {
                    entry.1.clone_from(waker);
                }
                return;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push_back((id, waker.clone()));
        *slot = Some(id);
    }

    /// Removes a waiter; `false` when it was already popped (woken).
    pub(crate) fn remove(&mut self, id: u64) -> bool {
        match self.entries.iter().position(|(i, _)| *i == id) {
            Some(pos) => {
                self.entries.remove(pos);
                true
            }
            None => false,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pops the longest-waiting waiter.
    pub(crate) fn pop(&mut self) -> Option<Waker> {
        self.entries.pop_front().map(|(_, w)| w)
    }

    /// Pops every waiter.
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = Waker> + '_ {
        self.entries.drain(..).map(|(_, w)| w)
    }
}

/// Wakers collected under a lock and woken after it is released.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    one: Option<Waker>,
    more: Vec<Waker>,
}

impl Wakeups {
    pub(crate) fn push(&mut self, waker: Option<Waker>) {
        if let Some(w) = waker {
            if self.one.is_none() {
                self.one = Some(w);
            } else {
                self.more.push(w);
            }
        }
    }

    pub(crate) fn extend(&mut self, wakers: impl Iterator<Item = Waker>) {
        for w in wakers {
            self.push(Some(w));
        }
    }

    /// Wakes everything collected. Call with no lock held.
    #[inline]
    pub(crate) fn wake(self) {
        // Most calls (an add that finds a worker already on its way) have
        // nothing to wake: keep that path inline and the loop out of line.
        if let Some(w) = self.one {
            w.wake();
            if !self.more.is_empty() {
                Self::wake_more(self.more);
            }
        }
    }

    #[inline(never)]
    fn wake_more(more: Vec<Waker>) {
        for w in more {
            w.wake();
        }
    }
}
