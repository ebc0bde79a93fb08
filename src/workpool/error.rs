//! Errors of the keyed worker pool. Every failed add hands the item back.

use std::fmt;

/// [`try_add`](super::KeyedPool::try_add) failed; the key and item are handed back.
///
/// # Examples
///
/// ```
/// use snapstream::workpool::{KeyedPool, TryAddError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = KeyedPool::<u32, &str>::builder()
///     .capacity(1)
///     .build(|_key, _item| async {})
///     .unwrap();
/// pool.try_add(1, "first").unwrap();
/// match pool.try_add(1, "second") {
///     Err(TryAddError::Full(key, item)) => assert_eq!((key, item), (1, "second")),
///     other => panic!("expected full, got {other:?}"),
/// }
/// # pool.stop(snapstream::workpool::StopMode::Drain).await;
/// # }
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum TryAddError<K, T> {
    /// The pool holds `capacity` pending items.
    #[error("pool is full")]
    Full(K, T),
    /// The pool was stopped.
    #[error("pool is stopped")]
    Stopped(K, T),
}

impl<K, T> TryAddError<K, T> {
    /// The key and item that were not added.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::workpool::TryAddError;
    ///
    /// let err = TryAddError::Full("k", 7);
    /// assert_eq!(err.into_inner(), ("k", 7));
    /// ```
    pub fn into_inner(self) -> (K, T) {
        match self {
            TryAddError::Full(k, t) | TryAddError::Stopped(k, t) => (k, t),
        }
    }
}

impl<K, T> fmt::Debug for TryAddError<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryAddError::Full(..) => f.write_str("Full(..)"),
            TryAddError::Stopped(..) => f.write_str("Stopped(..)"),
        }
    }
}

/// [`add`](super::KeyedPool::add) or [`run`](super::KeyedPool::run) failed
/// because the pool was stopped; the key and item are handed back.
///
/// # Examples
///
/// ```
/// use snapstream::workpool::{KeyedPool, StopMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = KeyedPool::<u32, &str>::builder().build(|_k, _i| async {}).unwrap();
/// pool.stop(StopMode::Drain).await;
/// let err = pool.add(1, "late").await.unwrap_err();
/// assert_eq!(err.into_inner(), (1, "late"));
/// # }
/// ```
#[derive(thiserror::Error)]
#[error("pool is stopped")]
pub struct StoppedError<K, T> {
    /// The key that was not added.
    pub key: K,
    /// The item that was not added.
    pub item: T,
}

impl<K, T> StoppedError<K, T> {
    /// The key and item that were not added.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::workpool::StoppedError;
    ///
    /// let err = StoppedError { key: 1, item: "x" };
    /// assert_eq!(err.into_inner(), (1, "x"));
    /// ```
    pub fn into_inner(self) -> (K, T) {
        (self.key, self.item)
    }
}

impl<K, T> fmt::Debug for StoppedError<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoppedError(..)")
    }
}

/// [`stop_timeout`](super::KeyedPool::stop_timeout) gave up waiting for the
/// workers; the items that did not start are handed back.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use snapstream::workpool::{KeyedPool, StopMode, StopTimeoutError};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// // Every handler tells it started, then never returns.
/// let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
/// let pool = KeyedPool::builder()
///     .workers(1)
///     .build(move |_key: u8, item: u8| {
///         let _ = tx.send(item);
///         std::future::pending::<()>()
///     })
///     .unwrap();
/// pool.try_add(1, 1).unwrap();
/// pool.try_add(1, 2).unwrap();
/// assert_eq!(started.recv().await, Some(1));
/// let err = pool.stop_timeout(StopMode::Drain, Duration::from_secs(5)).await.unwrap_err();
/// assert_eq!(err.to_string(), "pool did not stop in time: 1 handler(s) still running");
/// let StopTimeoutError::TimedOut { items, in_flight, .. } = err else { unreachable!() };
/// assert_eq!((items, in_flight), (vec![(1, 2)], 1));
/// # }
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum StopTimeoutError<K, T> {
    /// The workers were still running at the deadline; the pool was aborted.
    #[error("pool did not stop in time: {in_flight} handler(s) still running")]
    #[non_exhaustive]
    TimedOut {
        /// Every item that had not started, in add order (in order per key).
        items: Vec<(K, T)>,
        /// Handlers still running when the wait ended (keys in flight, as
        /// in [`Stats::in_flight`](super::Stats::in_flight)); their workers
        /// exit when they return.
        in_flight: usize,
    },
}

impl<K, T> StopTimeoutError<K, T> {
    /// The items that were handed back.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use snapstream::workpool::{KeyedPool, StopMode};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    /// let pool = KeyedPool::builder()
    ///     .workers(1)
    ///     .build(move |_key: u8, item: u8| {
    ///         let _ = tx.send(item);
    ///         std::future::pending::<()>()
    ///     })
    ///     .unwrap();
    /// pool.try_add(1, 1).unwrap();
    /// pool.try_add(1, 2).unwrap();
    /// assert_eq!(started.recv().await, Some(1)); // and never returns
    /// let err = pool.stop_timeout(StopMode::Abort, Duration::from_secs(5)).await.unwrap_err();
    /// assert_eq!(err.into_items(), [(1, 2)]);
    /// # }
    /// ```
    pub fn into_items(self) -> Vec<(K, T)> {
        match self {
            StopTimeoutError::TimedOut { items, .. } => items,
        }
    }
}

impl<K, T> fmt::Debug for StopTimeoutError<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopTimeoutError::TimedOut { items, in_flight } => f
                .debug_struct("TimedOut")
                .field("items", &items.len())
                .field("in_flight", in_flight)
                .finish(),
        }
    }
}

/// The pool could not be built or resized.
///
/// # Examples
///
/// ```
/// use snapstream::workpool::{BuildError, KeyedPool};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let err = KeyedPool::<u32, u32>::builder()
///     .workers(0)
///     .build(|_k, _i| async {})
///     .unwrap_err();
/// assert!(matches!(err, BuildError::ZeroWorkers));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The number of workers must be at least one.
    #[error("workers must be at least 1")]
    ZeroWorkers,
    /// The capacity must be at least one.
    #[error("capacity must be at least 1")]
    ZeroCapacity,
    /// The per-key concurrency must be at least one.
    #[error("per-key concurrency must be at least 1")]
    ZeroConcurrency,
    /// `build` was called outside a tokio runtime.
    #[error("no tokio runtime")]
    NoRuntime,
    /// The pool was stopped (only from `set_workers`).
    #[error("pool is stopped")]
    Stopped,
}
