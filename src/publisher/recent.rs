//! A topic's recent changes: which key changed at which index, for the last
//! N changes, so a subscriber resuming an unwatched key can be told "nothing
//! changed since your index" without a snapshot.
//!
//! # The rule
//!
//! `Recent` keeps, per topic, a map key → newest index among the topic's
//! last `window` changes, and a horizon `H`: every change above `H` is in
//! the map. A key `k` provably did not change in `(i, now]` when `i ≥ H` and
//! the map has no index above `i` for `k` (or no entry). When the window is
//! full, the oldest change is forgotten and `H` rises to its index. Before
//! the first change the publisher saw, nothing is known (the store may have
//! changed before the publisher existed): `H` starts at the first published
//! index minus one.
//!
//! # Cost
//!
//! Per published event: one hash-map insert and one deque push under the
//! topic's lock, which `publish` already holds. Memory: the deque holds
//! `window` entries of 24 bytes; the map one entry per distinct key among
//! them, about 50 bytes each with the hash table's spare room. The key
//! strings are shared with the events, not copied. A window of 0 disables it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// The last `window` changes of one topic (see the module docs).
#[derive(Debug)]
pub(crate) struct Recent {
    window: usize,
    last: HashMap<Arc<str>, u64>,
    /// The remembered changes, oldest first (a key may appear more than once;
    /// only its newest entry is in `last`).
    order: VecDeque<(u64, Arc<str>)>,
    /// Every change above it is in `last`; `None` before the first change.
    horizon: Option<u64>,
}

impl Recent {
    pub(crate) fn new(window: usize) -> Self {
        Self {
            window,
            last: HashMap::new(),
            order: VecDeque::new(),
            horizon: None,
        }
    }

    /// Records that `key` changed at `index` (indexes never decrease).
    pub(crate) fn record(&mut self, key: &Arc<str>, index: u64) {
        if self.window == 0 {
            return;
        }
        if self.horizon.is_none() {
            self.horizon = Some(index.saturating_sub(1));
        }
        // Forget before remembering, so the deque never holds more than
        // `window` (its capacity stays at the window, rounded to a power of two).
        while self.order.len() >= self.window {
            let Some((i, k)) = self.order.pop_front() else {
                break;
            };
            if self.last.get(&k) == Some(&i) {
                self.last.remove(&k);
            }
            self.horizon = Some(self.horizon.map_or(i, |h| h.max(i)));
        }
        self.last.insert(key.clone(), index);
        self.order.push_back((index, key.clone()));
    }

    /// Whether `key` provably did not change after `index`.
    pub(crate) fn unchanged_since(&self, key: &str, index: u64) -> bool {
        match self.horizon {
            Some(h) if index >= h => self.last.get(key).is_none_or(|&i| i <= index),
            _ => false,
        }
    }

    /// The horizon (for tests and stats).
    #[cfg(test)]
    pub(crate) fn horizon(&self) -> Option<u64> {
        self.horizon
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u8) -> Arc<str> {
        Arc::from(format!("k{i}"))
    }

    #[test]
    fn nothing_is_known_before_the_first_change() {
        let r = Recent::new(4);
        assert!(!r.unchanged_since("a", 10));
        let mut r = Recent::new(4);
        r.record(&key(1), 10);
        assert_eq!(r.horizon(), Some(9));
        assert!(r.unchanged_since("k2", 9), "(9, 10] holds only k1's change");
        assert!(!r.unchanged_since("k1", 9));
        assert!(r.unchanged_since("k1", 10));
        assert!(!r.unchanged_since("k2", 8), "below the horizon");
    }

    #[test]
    fn a_full_window_forgets_the_oldest_and_raises_the_horizon() {
        let mut r = Recent::new(2);
        r.record(&key(1), 1);
        r.record(&key(2), 2);
        r.record(&key(3), 3);
        assert_eq!(r.horizon(), Some(1));
        assert!(r.unchanged_since("k1", 1));
        assert!(!r.unchanged_since("k1", 0));
        assert!(!r.unchanged_since("k2", 1));
        assert!(r.unchanged_since("k2", 2));
        assert_eq!(r.last.len(), 2);
    }

    #[test]
    fn a_window_of_zero_knows_nothing() {
        let mut r = Recent::new(0);
        r.record(&key(1), 1);
        assert!(!r.unchanged_since("k2", 5));
        assert!(r.order.is_empty() && r.last.is_empty());
    }

    proptest! {
        /// Against a model that remembers every change: `unchanged_since`
        /// never says "unchanged" when the key changed after the index, and
        /// says it for every key and index at or above the horizon that did
        /// not. Memory stays within the window.
        #[test]
        fn recent_matches_a_full_history(
            window in 0usize..6,
            changes in prop::collection::vec((0u8..4, 1u64..3), 0..40),
            first in 0u64..5,
        ) {
            let mut r = Recent::new(window);
            let mut history: Vec<(u64, u8)> = Vec::new();
            let mut index = first;
            for (k, step) in changes {
                index += step;
                r.record(&key(k), index);
                history.push((index, k));
                prop_assert!(r.order.len() <= window && r.last.len() <= window);
                for q in 0..=index + 1 {
                    for k in 0u8..5 {
                        let changed = history.iter().any(|&(i, hk)| hk == k && i > q);
                        let says = r.unchanged_since(&format!("k{k}"), q);
                        if changed {
                            prop_assert!(!says, "k{} changed after {} yet said unchanged", k, q);
                        }
                        // Complete at or above the horizon.
                        if let Some(h) = r.horizon() {
                            if window > 0 && q >= h && !changed {
                                prop_assert!(says, "k{} unchanged since {} (horizon {})", k, q, h);
                            }
                        }
                    }
                }
            }
        }
    }
}
