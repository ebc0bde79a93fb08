//! A lease pool: per-key targets for concurrent leases, set at any time.
//!
//! [`LeasePool`] works like a set of semaphores, one per key, whose sizes
//! (*targets*) change at run time. Workers take a [`Lease`] before they work
//! on a key's resource and give it back by dropping it.
//!
//! # Targets
//!
//! [`set`](LeasePool::set) takes effect when it returns: raising a target
//! grants the new headroom to waiting acquirers before `set` returns.
//! Lowering it revokes nothing; the key just grants nothing until its active
//! count is below the new target. Setting 0 removes the key once its leases
//! are gone; leases still outstanding keep counting if the key is set again.
//!
//! # Acquiring
//!
//! [`acquire(key)`](LeasePool::acquire) waits for a lease of one key;
//! acquirers of one key are served first come, first served.
//! [`leases()`](LeasePool::leases) is a [`Stream`] of leases from any key with
//! headroom.
//!
//! # Fairness
//!
//! When a key gains headroom, its own acquirers are served first; what is
//! left goes to the stream. The stream picks among the keys with headroom by
//! *smooth weighted round-robin, weighted by headroom* (`target - active`):
//! over a run of picks each key's share is proportional to its headroom (with
//! steady headrooms, exactly, within one pick). A key with target 2 and one
//! with target 1 whose leases are released at once get 2/3 and 1/3 of the
//! stream's leases. Picking is O(number of keys); `acquire(key)` is O(1).
//!
//! # Leases
//!
//! A lease is released when dropped; [`Lease::release`] releases it early
//! and is idempotent. Lease ids are unique and increase in grant order.
//!
//! # Stopping
//!
//! [`stop`](LeasePool::stop) ends every waiting acquirer with
//! [`AcquireError::Stopped`] and ends every stream; later acquires fail the
//! same way. Outstanding leases stay valid, and releasing them after the stop
//! is harmless.
//!
//! # Examples
//!
//! ```
//! use snapstream::lease::{Counts, LeasePool};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let pool = LeasePool::new();
//! pool.set("spam", 2);
//! pool.set("eggs", 1);
//! let a = pool.acquire("spam").await.unwrap();
//! let b = pool.acquire("spam").await.unwrap();
//! assert!(a.id() < b.id());
//! assert_eq!(pool.get(&"spam"), Counts { target: 2, active: 2 });
//! drop(a);
//! assert_eq!(pool.get(&"spam").active, 1);
//! # }
//! ```

mod state;

#[cfg(all(test, loom))]
mod tests;

use std::fmt;
use std::future::poll_fn;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::stream::FusedStream;
use futures::Stream;

use crate::sync::{Arc, AtomicU64, Mutex, Ordering};
use state::State;

/// Target and active lease counts of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Counts {
    /// The number of concurrent leases the key should converge to.
    pub target: u64,
    /// The number of leases currently held.
    pub active: u64,
}

/// Acquiring a lease failed.
///
/// # Examples
///
/// ```
/// use snapstream::lease::{AcquireError, LeasePool};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = LeasePool::<u32>::new();
/// pool.stop();
/// assert!(matches!(pool.acquire(1).await, Err(AcquireError::Stopped)));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// The pool was stopped.
    #[error("lease pool is stopped")]
    Stopped,
}

/// [`LeasePool::try_acquire`] failed.
///
/// # Examples
///
/// ```
/// use snapstream::lease::{LeasePool, TryAcquireError};
///
/// let pool = LeasePool::new();
/// assert_eq!(pool.try_acquire("k").unwrap_err(), TryAcquireError::NoHeadroom);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TryAcquireError {
    /// The key is at its target, or others are already waiting for it.
    #[error("no headroom for key")]
    NoHeadroom,
    /// The pool was stopped.
    #[error("lease pool is stopped")]
    Stopped,
}

struct Shared<K> {
    state: Mutex<State<K>>,
    /// `acquire` calls that had to wait (counted under the state lock).
    waits: AtomicU64,
}

impl<K: Hash + Eq + Clone> Shared<K> {
    fn release(&self, key: &K) {
        let mut wakes = Vec::new();
        self.state.lock().release(key, &mut wakes);
        wakes.into_iter().for_each(Waker::wake);
    }

    fn cancel(&self, wid: u64) {
        let mut wakes = Vec::new();
        self.state.lock().cancel(wid, &mut wakes);
        wakes.into_iter().for_each(Waker::wake);
    }
}

/// Per-key pools of leases with targets that change at run time.
///
/// Cloning gives another handle to the same pool. See the
/// [module documentation](self) for the semantics.
///
/// # Examples
///
/// ```
/// use snapstream::lease::LeasePool;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = LeasePool::new();
/// pool.set("proxy-1", 1);
/// let lease = pool.acquire("proxy-1").await.unwrap();
/// assert_eq!(*lease.key(), "proxy-1");
/// assert!(pool.try_acquire("proxy-1").is_err());
/// drop(lease);
/// assert!(pool.try_acquire("proxy-1").is_ok());
/// # }
/// ```
pub struct LeasePool<K: Hash + Eq + Clone> {
    shared: Arc<Shared<K>>,
}

impl<K: Hash + Eq + Clone> Clone for LeasePool<K> {
    fn clone(&self) -> Self {
        LeasePool {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> fmt::Debug for LeasePool<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeasePool").finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> Default for LeasePool<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq + Clone> LeasePool<K> {
    /// An empty pool: every key has target 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::{Counts, LeasePool};
    ///
    /// let pool = LeasePool::<String>::new();
    /// assert_eq!(pool.get(&"any".to_owned()), Counts::default());
    /// ```
    pub fn new() -> Self {
        LeasePool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new()),
                waits: AtomicU64::new(0),
            }),
        }
    }

    /// Sets the target of `key`. Waiting acquirers that fit under the new
    /// target hold their leases when this returns.
    ///
    /// After [`stop`](Self::stop) the target is recorded but nothing is granted.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set(7, 3);
    /// assert_eq!(pool.get(&7).target, 3);
    /// pool.set(7, 0);
    /// assert_eq!(pool.keys(), 0);
    /// ```
    pub fn set(&self, key: K, target: u64) {
        let mut wakes = Vec::new();
        self.shared.state.lock().set(key, target, &mut wakes);
        wakes.into_iter().for_each(Waker::wake);
    }

    /// The target and active counts of `key` (zeros for an unknown key).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::{Counts, LeasePool};
    ///
    /// let pool = LeasePool::new();
    /// pool.set("k", 2);
    /// let _lease = pool.try_acquire("k").unwrap();
    /// assert_eq!(pool.get(&"k"), Counts { target: 2, active: 1 });
    /// ```
    pub fn get(&self, key: &K) -> Counts {
        let st = self.shared.state.lock();
        st.groups
            .get(key)
            .map(|g| Counts {
                target: g.target,
                active: g.active,
            })
            .unwrap_or_default()
    }

    /// The number of keys the pool keeps (a target, leases or waiters).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set("a", 1);
    /// pool.set("b", 1);
    /// assert_eq!(pool.keys(), 2);
    /// ```
    pub fn keys(&self) -> usize {
        self.shared.state.lock().groups.len()
    }

    /// How many [`acquire`](Self::acquire) calls had to wait (found no
    /// headroom, or others waiting, when first polled), since the pool was
    /// made.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = LeasePool::new();
    /// let waiter = tokio::spawn({
    ///     let pool = pool.clone();
    ///     async move { pool.acquire("k").await.unwrap().id() }
    /// });
    /// tokio::task::yield_now().await; // the waiter polls and waits
    /// pool.set("k", 1);
    /// waiter.await.unwrap();
    /// assert_eq!(pool.waits(), 1);
    /// # }
    /// ```
    pub fn waits(&self) -> u64 {
        self.shared.waits.load(Ordering::Relaxed)
    }

    fn lease(&self, key: K, id: u64) -> Lease<K> {
        Lease {
            id,
            key,
            pool: Some(self.shared.clone()),
        }
    }

    /// Acquires a lease of `key`, waiting until the key has headroom.
    ///
    /// Acquirers of one key are served in order of their first poll.
    ///
    /// # Errors
    ///
    /// [`AcquireError::Stopped`] when the pool is or gets stopped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped acquire holds nothing; a lease granted to it
    /// but not yet returned is released (and passed to the next acquirer).
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = LeasePool::new();
    /// let waiter = tokio::spawn({
    ///     let pool = pool.clone();
    ///     async move { pool.acquire("k").await.unwrap().id() }
    /// });
    /// pool.set("k", 1); // the waiter holds its lease when this returns
    /// assert_eq!(waiter.await.unwrap(), 1);
    /// # }
    /// ```
    pub async fn acquire(&self, key: K) -> Result<Lease<K>, AcquireError> {
        let mut guard = WaiterGuard {
            shared: &self.shared,
            id: None,
        };
        let mut waited = false;
        poll_fn(|cx| {
            let res = self
                .shared
                .state
                .lock()
                .poll_acquire(Some(&key), &mut guard.id, cx.waker());
            match res {
                state::Poll::Granted(k, id) => Poll::Ready(Ok(self.lease(k, id))),
                state::Poll::Stopped => Poll::Ready(Err(AcquireError::Stopped)),
                state::Poll::Pending => {
                    if !waited {
                        waited = true;
                        self.shared.waits.fetch_add(1, Ordering::Relaxed);
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Takes a lease of `key` if it has headroom and nobody is waiting for it.
    ///
    /// # Errors
    ///
    /// [`TryAcquireError::NoHeadroom`] or [`TryAcquireError::Stopped`].
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set("k", 1);
    /// let lease = pool.try_acquire("k").unwrap();
    /// assert!(pool.try_acquire("k").is_err());
    /// # drop(lease);
    /// ```
    pub fn try_acquire(&self, key: K) -> Result<Lease<K>, TryAcquireError> {
        let mut st = self.shared.state.lock();
        if st.stopped {
            return Err(TryAcquireError::Stopped);
        }
        let mut slot = None;
        match st.poll_acquire(Some(&key), &mut slot, futures::task::noop_waker_ref()) {
            state::Poll::Granted(k, id) => {
                drop(st);
                Ok(self.lease(k, id))
            }
            state::Poll::Stopped => Err(TryAcquireError::Stopped),
            state::Poll::Pending => {
                let mut wakes = Vec::new();
                st.cancel(slot.expect("pending acquirer is registered"), &mut wakes);
                debug_assert!(wakes.is_empty());
                Err(TryAcquireError::NoHeadroom)
            }
        }
    }

    /// A stream of leases from any key with headroom (see the
    /// [fairness policy](self#fairness)). It ends when the pool is stopped.
    ///
    /// Each poll that finds no headroom queues one request; the stream holds
    /// at most one request at a time.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::StreamExt;
    /// use snapstream::lease::LeasePool;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = LeasePool::new();
    /// pool.set("a", 1);
    /// pool.set("b", 1);
    /// let mut leases = pool.leases();
    /// let x = leases.next().await.unwrap();
    /// let y = leases.next().await.unwrap();
    /// assert_ne!(x.key(), y.key());
    /// # }
    /// ```
    pub fn leases(&self) -> Leases<K> {
        Leases {
            pool: self.clone(),
            waiter: None,
            ended: false,
        }
    }

    /// Stops the pool: waiting acquirers fail with [`AcquireError::Stopped`],
    /// streams end, later acquires fail. Outstanding leases stay valid.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set(1, 1);
    /// let lease = pool.try_acquire(1).unwrap();
    /// pool.stop();
    /// assert!(pool.is_stopped());
    /// drop(lease); // harmless
    /// assert_eq!(pool.get(&1).active, 0);
    /// ```
    pub fn stop(&self) {
        let mut wakes = Vec::new();
        self.shared.state.lock().stop(&mut wakes);
        wakes.into_iter().for_each(Waker::wake);
    }

    /// Whether [`stop`](Self::stop) was called.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::<u8>::new();
    /// assert!(!pool.is_stopped());
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.shared.state.lock().stopped
    }
}

/// Deregisters a dropped acquirer.
struct WaiterGuard<'a, K: Hash + Eq + Clone> {
    shared: &'a Shared<K>,
    id: Option<u64>,
}

impl<K: Hash + Eq + Clone> Drop for WaiterGuard<'_, K> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.cancel(id);
        }
    }
}

/// A lease of one key; released when dropped.
///
/// # Examples
///
/// ```
/// use snapstream::lease::LeasePool;
///
/// let pool = LeasePool::new();
/// pool.set("k", 1);
/// let mut lease = pool.try_acquire("k").unwrap();
/// lease.release();
/// lease.release(); // no effect
/// assert!(lease.is_released());
/// assert_eq!(pool.get(&"k").active, 0);
/// ```
#[must_use = "a lease is released as soon as it is dropped"]
pub struct Lease<K: Hash + Eq + Clone> {
    id: u64,
    key: K,
    pool: Option<Arc<Shared<K>>>,
}

impl<K: Hash + Eq + Clone + fmt::Debug> fmt::Debug for Lease<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("released", &self.pool.is_none())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> Lease<K> {
    /// The lease's id: unique in its pool and increasing in grant order.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set("k", 2);
    /// let a = pool.try_acquire("k").unwrap();
    /// let b = pool.try_acquire("k").unwrap();
    /// assert!(b.id() > a.id());
    /// ```
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The key this lease belongs to.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set("k", 1);
    /// assert_eq!(*pool.try_acquire("k").unwrap().key(), "k");
    /// ```
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Releases the lease now; calling it again has no effect.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set("k", 1);
    /// let mut lease = pool.try_acquire("k").unwrap();
    /// lease.release();
    /// lease.release();
    /// assert_eq!(pool.get(&"k").active, 0);
    /// ```
    pub fn release(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.release(&self.key);
        }
    }

    /// Whether [`release`](Self::release) was called.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::lease::LeasePool;
    ///
    /// let pool = LeasePool::new();
    /// pool.set("k", 1);
    /// let lease = pool.try_acquire("k").unwrap();
    /// assert!(!lease.is_released());
    /// ```
    pub fn is_released(&self) -> bool {
        self.pool.is_none()
    }
}

impl<K: Hash + Eq + Clone> Drop for Lease<K> {
    fn drop(&mut self) {
        self.release();
    }
}

/// A [`Stream`] of leases from any key with headroom; see [`LeasePool::leases`].
///
/// # Examples
///
/// ```
/// use futures::StreamExt;
/// use snapstream::lease::LeasePool;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = LeasePool::new();
/// pool.set("a", 1);
/// let mut leases = pool.leases();
/// let lease = leases.next().await.unwrap();
/// pool.stop();
/// assert!(leases.next().await.is_none());
/// # drop(lease);
/// # }
/// ```
#[must_use = "streams do nothing unless polled"]
pub struct Leases<K: Hash + Eq + Clone> {
    pool: LeasePool<K>,
    waiter: Option<u64>,
    ended: bool,
}

impl<K: Hash + Eq + Clone> fmt::Debug for Leases<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leases")
            .field("waiting", &self.waiter.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

impl<K: Hash + Eq + Clone> Stream for Leases<K> {
    type Item = Lease<K>;

    /// # Cancel safety
    ///
    /// Dropping the stream while it waits gives up its request; a lease
    /// granted to it but not yet returned is released.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Lease<K>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let res = this
            .pool
            .shared
            .state
            .lock()
            .poll_acquire(None, &mut this.waiter, cx.waker());
        match res {
            state::Poll::Granted(k, id) => Poll::Ready(Some(this.pool.lease(k, id))),
            state::Poll::Stopped => {
                this.ended = true;
                Poll::Ready(None)
            }
            state::Poll::Pending => Poll::Pending,
        }
    }
}

impl<K: Hash + Eq + Clone> FusedStream for Leases<K> {
    fn is_terminated(&self) -> bool {
        self.ended
    }
}

impl<K: Hash + Eq + Clone> Drop for Leases<K> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter.take() {
            self.pool.shared.cancel(id);
        }
    }
}
